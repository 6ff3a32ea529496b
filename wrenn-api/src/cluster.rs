//! Registered hosts: the cluster's CAs kept in the database (shared by every control
//! plane of the deployment), the control plane's identity towards agents, and how the
//! agents of hosts registered in the database are found and reached.

use crate::agent::HostAgent;
use crate::secrets::TokenSealer;
use crate::state::AppState;
use std::collections::BTreeSet;
use std::fmt::Debug;
use std::sync::Arc;
use std::time::Duration;
use wrenn_core::scheduler::HostId;
use wrenn_db::{Db, DbError};

use wrenn_pki::{Ca, CaKind, ControlPlaneIdentity, Issued, PkiError};

/// How long a host's certificate is valid.
pub const HOST_CERT_VALIDITY: Duration = Duration::from_secs(30 * 86_400);
/// How long the control plane's client certificate is valid (one is issued at every
/// start).
pub const CONTROL_PLANE_CERT_VALIDITY: Duration = Duration::from_secs(30 * 86_400);

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
    /// The CA agents check the control plane's certificate against.
    control_plane_ca_pem: String,
    /// This control plane's TLS towards agents.
    pub identity: ControlPlaneIdentity,
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
    /// The stored CAs (made on first use) and a new client certificate.
    pub async fn load(db: &Db, sealer: &TokenSealer) -> Result<Self, ClusterError> {
        let hosts = load_ca(db, sealer, CaKind::Hosts).await?;
        let cps = load_ca(db, sealer, CaKind::ControlPlane).await?;
        let client = cps.issue_control_plane(CONTROL_PLANE_CERT_VALIDITY)?;
        Ok(ClusterPki {
            identity: ControlPlaneIdentity {
                host_ca_pem: hosts.cert_pem().to_string(),
                cert_pem: client.cert_pem,
                key_pem: client.key_pem,
            },
            control_plane_ca_pem: cps.cert_pem().to_string(),
            hosts,
        })
    }

    /// A certificate for host `id`.
    pub fn issue_host(&self, id: &str) -> Result<Issued, PkiError> {
        self.hosts.issue_host(id, HOST_CERT_VALIDITY)
    }

    /// The CA of the control plane's certificates (what agents trust).
    pub fn control_plane_ca_pem(&self) -> &str {
        &self.control_plane_ca_pem
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
}

/// Finds the hosts registered in the database: connects to those it does not drive yet
/// (they join once they answer) and lets go of those deleted since. Hosts given on the
/// command line and the in-process host are not in its charge.
pub fn discover(st: &AppState, rows: &[wrenn_db::Host]) {
    let Some(Cluster {
        pki,
        dialer: Some(dialer),
    }) = st.cluster.get()
    else {
        return;
    };
    let mut registered = BTreeSet::new();
    for h in rows {
        let (Some(address), Some(_)) = (h.address.as_deref(), h.cert_expires_at) else {
            continue;
        };
        registered.insert(h.id.clone());
        if st.hosts.knows(&h.id) {
            continue;
        }
        match dialer.dial(&h.id, address, &pki.identity) {
            Ok(agent) => {
                tracing::info!(host = %h.id, %address, "registered host found; connecting");
                st.hosts
                    .add_registered(h.id.clone(), agent, address.to_string());
            }
            Err(e) => {
                tracing::warn!(host = %h.id, %address, error = %e, "cannot reach registered host")
            }
        }
    }
    for id in st.hosts.registered_ids() {
        if !registered.contains(&id) {
            tracing::info!(host = %id, "host deleted; no longer driven");
            st.hosts.remove(&id);
        }
    }
}
