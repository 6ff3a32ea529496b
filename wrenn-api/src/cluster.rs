//! Registered hosts: the cluster's CAs kept in the database (shared by every control
//! plane of the deployment), the control plane's identity towards agents, and how the
//! agents of hosts registered in the database are found and reached.

use crate::agent::HostAgent;
use crate::secrets::TokenSealer;
use crate::state::AppState;
use std::collections::BTreeSet;
use std::fmt::Debug;
use std::sync::Arc;
use std::time::{Duration, SystemTime};
use wrenn_core::scheduler::HostId;
use wrenn_db::{Db, DbError};

use wrenn_pki::{Ca, CaKind, ControlPlaneIdentity, Issued, PkiError};

/// How long a host's certificate is valid by default (`wrenn serve
/// --host-cert-lifetime`); agents renew theirs when a third of it is left.
pub const HOST_CERT_VALIDITY: Duration = Duration::from_secs(30 * 86_400);
/// How long the control plane's client certificate is valid; it is renewed when a
/// third of that is left.
pub const CONTROL_PLANE_CERT_VALIDITY: Duration = Duration::from_secs(30 * 86_400);

/// Whether a certificate valid until `not_after`, for `lifetime`, is due for renewal
/// (a third of its lifetime or less left).
pub fn renewal_due(not_after: SystemTime, lifetime: Duration) -> bool {
    match not_after.duration_since(SystemTime::now()) {
        Ok(left) => left <= lifetime / 3,
        Err(_) => true,
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    #[error("database")]
    Db(#[from] DbError),
    #[error("certificates")]
    Pki(#[from] PkiError),
    #[error("the stored {0} CA key does not open with this server's secret")]
    Sealed(&'static str),
}

/// The cluster's certificates as this control plane uses them.
pub struct ClusterPki {
    hosts: Ca,
    control_planes: Ca,
    /// How long the host certificates it issues are valid.
    host_cert_lifetime: Duration,
    /// This control plane's TLS towards agents.
    pub identity: ControlPlaneIdentity,
    /// When the client certificate in `identity` expires.
    client_not_after: std::sync::Mutex<SystemTime>,
}

impl Debug for ClusterPki {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ClusterPki(<redacted>)")
    }
}

fn sealing_label(kind: CaKind) -> String {
    format!("cluster-ca:{}", kind.name())
}

async fn load_ca(db: &Db, sealer: &TokenSealer, kind: CaKind) -> Result<Ca, ClusterError> {
    let open = |cert: &str, sealed: &str| -> Result<Ca, ClusterError> {
        if !sealed.starts_with("sealed1:") {
            return Err(ClusterError::Sealed(kind.name()));
        }
        let key = sealer
            .open(&sealing_label(kind), sealed)
            .map_err(|_| ClusterError::Sealed(kind.name()))?;
        Ok(Ca::from_pem(kind, cert, &key)?)
    };
    if let Some((cert, sealed)) = db.cluster_ca(kind.name()).await? {
        return open(&cert, &sealed);
    }
    let ca = Ca::generate(kind)?;
    let sealed = sealer.seal(&sealing_label(kind), &ca.key_pem());
    db.insert_cluster_ca(kind.name(), ca.cert_pem(), &sealed)
        .await?;
    // Another control plane may have stored its CA first: the stored one is the CA.
    match db.cluster_ca(kind.name()).await? {
        Some((cert, sealed)) => open(&cert, &sealed),
        None => Ok(ca),
    }
}

impl ClusterPki {
    /// The stored CAs (made on first use) and a new client certificate; host
    /// certificates it issues are valid for `host_cert_lifetime`.
    pub async fn load(
        db: &Db,
        sealer: &TokenSealer,
        host_cert_lifetime: Duration,
    ) -> Result<Self, ClusterError> {
        let hosts = load_ca(db, sealer, CaKind::Hosts).await?;
        let control_planes = load_ca(db, sealer, CaKind::ControlPlane).await?;
        let client = control_planes.issue_control_plane(CONTROL_PLANE_CERT_VALIDITY)?;
        Ok(ClusterPki {
            identity: ControlPlaneIdentity::new(
                hosts.cert_pem(),
                &client.cert_pem,
                &client.key_pem,
            )?,
            client_not_after: std::sync::Mutex::new(client.not_after),
            hosts,
            control_planes,
            host_cert_lifetime,
        })
    }

    /// A certificate for host `id`.
    pub fn issue_host(&self, id: &str) -> Result<Issued, PkiError> {
        self.hosts.issue_host(id, self.host_cert_lifetime)
    }

    /// The CA of the control plane's certificates (what agents trust).
    pub fn control_plane_ca_pem(&self) -> &str {
        self.control_planes.cert_pem()
    }

    /// Renews this control plane's client certificate when a third of its life is
    /// left (connections made from then on present the new one).
    pub fn renew_client_if_due(&self) -> Result<bool, PkiError> {
        let mut not_after = self
            .client_not_after
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if !renewal_due(*not_after, CONTROL_PLANE_CERT_VALIDITY) {
            return Ok(false);
        }
        let client = self
            .control_planes
            .issue_control_plane(CONTROL_PLANE_CERT_VALIDITY)?;
        self.identity
            .cert
            .replace(&client.cert_pem, &client.key_pem)?;
        *not_after = client.not_after;
        tracing::info!(fingerprint = %client.fingerprint, "control-plane certificate renewed");
        Ok(true)
    }
}

/// Reaches the agent of a registered host (the control plane does not link the
/// transport: the binary gives this).
pub trait HostDialer: Send + Sync + Debug {
    fn dial(
        &self,
        id: &HostId,
        address: &str,
        identity: &ControlPlaneIdentity,
    ) -> Result<Arc<dyn HostAgent>, String>;
}

/// Registered hosts this control plane reaches.
#[derive(Debug)]
pub struct Cluster {
    pub pki: ClusterPki,
    /// `None`: hosts register, but this control plane does not reach them (a build
    /// without the agent transport).
    pub dialer: Option<Arc<dyn HostDialer>>,
    /// Where the agents of registered hosts are.
    pub discovery: Arc<dyn HostDiscovery>,
}

/// A registered host's agent, and where it is now.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Found {
    pub id: HostId,
    /// `host:port` of its gRPC endpoint.
    pub address: String,
}

/// Finds the agents of registered hosts: which hosts the control plane drives, and at
/// which address. Only registered hosts (they hold a certificate of the cluster) are
/// driven, whatever a discovery finds: discovery says where, registration says who.
#[async_trait::async_trait]
pub trait HostDiscovery: Send + Sync + Debug {
    /// `rows` is the `hosts` table. An error keeps the hosts driven as they are.
    async fn find(&self, rows: &[wrenn_db::Host]) -> Result<Vec<Found>, String>;
}

/// The registered hosts of the `hosts` table, at the addresses they registered with
/// (the default).
#[derive(Debug, Default)]
pub struct RegisteredHosts;

/// Whether host row `h` holds a certificate of the cluster.
fn is_registered(h: &wrenn_db::Host) -> bool {
    h.cert_expires_at.is_some()
}

#[async_trait::async_trait]
impl HostDiscovery for RegisteredHosts {
    async fn find(&self, rows: &[wrenn_db::Host]) -> Result<Vec<Found>, String> {
        Ok(rows
            .iter()
            .filter(|h| is_registered(h))
            .filter_map(|h| {
                Some(Found {
                    id: h.id.clone(),
                    address: h.address.clone()?,
                })
            })
            .collect())
    }
}

/// Registered hosts at addresses given in the configuration (`wrenn serve
/// --discovery static --static-host ID=ADDR`): only those are driven.
#[derive(Debug, Default)]
pub struct StaticHosts(pub Vec<Found>);

#[async_trait::async_trait]
impl HostDiscovery for StaticHosts {
    async fn find(&self, rows: &[wrenn_db::Host]) -> Result<Vec<Found>, String> {
        Ok(self
            .0
            .iter()
            .filter(|f| rows.iter().any(|h| h.id == f.id && is_registered(h)))
            .cloned()
            .collect())
    }
}

/// Finds the agents of registered hosts (each monitor tick): connects to those it
/// does not drive yet (they join once they answer), follows those that moved, and lets
/// go of those deleted or no longer found (their hosts are `unreachable`, their
/// capsules `missing`, until they are found again). Hosts given on the command line
/// (`--agent`) are not touched.
pub async fn discover(st: &AppState, rows: &[wrenn_db::Host]) {
    let Some(Cluster {
        pki,
        dialer: Some(dialer),
        discovery,
    }) = st.cluster.get()
    else {
        return;
    };
    if let Err(e) = pki.renew_client_if_due() {
        tracing::warn!(error = %e, "cannot renew the control-plane certificate");
    }
    let found = match discovery.find(rows).await {
        Ok(found) => found,
        Err(e) => {
            tracing::warn!(error = %e, "host discovery failed; the hosts driven stay as they are");
            return;
        }
    };
    let mut driven = BTreeSet::new();
    for Found { id, address } in found {
        if !driven.insert(id.clone()) {
            continue;
        }
        match st.hosts.address_of(&id) {
            Some(now) if now == address => continue,
            Some(now) => {
                tracing::info!(host = %id, from = %now, to = %address, "host agent moved");
                st.hosts.remove(&id);
            }
            None => {}
        }
        match dialer.dial(&id, &address, &pki.identity) {
            Ok(agent) => {
                tracing::info!(host = %id, %address, "registered host found; connecting");
                st.hosts.add_registered(id, agent, address);
            }
            Err(e) => {
                tracing::warn!(host = %id, %address, error = %e, "cannot reach registered host")
            }
        }
    }
    for id in st.hosts.registered_ids() {
        if driven.contains(&id) {
            continue;
        }
        st.hosts.remove(&id);
        if rows.iter().any(|h| h.id == id) {
            tracing::warn!(host = %id, "host agent no longer found; its host is unreachable");
            if let Err(e) = st.db.system_host_unreachable(&id).await {
                tracing::warn!(host = %id, error = %e, "host not recorded unreachable");
            }
        } else {
            tracing::info!(host = %id, "host deleted; no longer driven");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(id: &str, address: Option<&str>, registered: bool) -> wrenn_db::Host {
        let now = chrono::Utc::now();
        wrenn_db::Host {
            id: HostId(id.into()),
            team_id: None,
            address: address.map(str::to_string),
            arch: None,
            cpu_cores: None,
            memory_mb: None,
            disk_gb: None,
            status: wrenn_db::HostStatus::Online,
            last_heartbeat_at: None,
            metadata: Default::default(),
            provider: None,
            availability_zone: None,
            created_by: None,
            cert_expires_at: registered.then_some(now),
            created_at: now,
            updated_at: now,
        }
    }

    fn found(id: &str, address: &str) -> Found {
        Found {
            id: HostId(id.into()),
            address: address.into(),
        }
    }

    #[tokio::test]
    async fn discoveries_drive_only_registered_hosts() {
        let rows = [
            row("a", Some("10.0.0.1:7070"), true),
            // Created, not registered yet: no certificate.
            row("b", Some("10.0.0.2:7070"), false),
            // Given on the command line (`--agent`): no certificate either.
            row("local", None, false),
        ];
        assert_eq!(
            RegisteredHosts.find(&rows).await.expect("found"),
            [found("a", "10.0.0.1:7070")]
        );
        let fixed = StaticHosts(vec![
            found("a", "10.9.0.1:7070"),
            found("b", "10.9.0.2:7070"),
            found("gone", "10.9.0.3:7070"),
        ]);
        assert_eq!(
            fixed.find(&rows).await.expect("found"),
            [found("a", "10.9.0.1:7070")],
            "the list says where, registration who"
        );
    }

    #[test]
    fn renewal_is_due_with_a_third_of_the_lifetime_left() {
        let life = Duration::from_secs(3000);
        let now = SystemTime::now();
        assert!(!renewal_due(now + Duration::from_secs(1500), life));
        assert!(renewal_due(now + Duration::from_secs(900), life));
        assert!(renewal_due(now - Duration::from_secs(1), life), "expired");
    }
}
