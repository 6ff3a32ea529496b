//! The control plane's life: open its data directory and database ([`ControlPlane::open`]),
//! then serve the API over host agents until shutdown ([`ControlPlane::serve`]). The
//! host agents are the caller's: `wrenn serve` starts one in process, or drives the
//! `wrenn agent`s it is given.

use crate::agent::HostAgent;
use crate::hosts::{HostConn, MonitorConfig};
use crate::state::{ApiConfig, AppState};
use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

#[derive(Clone, Debug)]
pub struct ServeOptions {
    pub listen: SocketAddr,
    /// Data directory (images, templates, capsules; the SQLite database by default).
    pub data_dir: PathBuf,
    /// `postgres://…` or `sqlite://…`; `None` = `<data_dir>/wrenn.db`.
    pub database_url: Option<String>,
    /// Make the first start's API key this one (`wrn_` + 32 hex).
    pub bootstrap_key: Option<String>,
    /// Password of the bootstrap admin (`admin@wrenn.local`, owner of the first team),
    /// set if the account has none yet (never replaced).
    pub bootstrap_admin_password: Option<String>,
    /// HS256 secret for user tokens; `None` = generated once and kept in the data dir.
    pub jwt_secret: Option<String>,
    /// Start even if the database records another data directory's capsules (or none
    /// while this data directory was served by another database), pairing the two anew.
    pub adopt_data_dir: bool,
    /// This process runs a host on the data directory (its capsule rows must match
    /// it); a control plane without one has nothing to pair.
    pub local_host: bool,
    pub config: ApiConfig,
    /// How the host monitor watches the host agents, and placement among them.
    pub monitor: MonitorConfig,
    /// Reaches the agents of hosts registered in the database (`None`: hosts can
    /// register, but this control plane does not drive them).
    pub host_dialer: Option<Arc<dyn crate::cluster::HostDialer>>,
    /// How long the certificates of registered hosts are valid (they are renewed when
    /// a third of it is left).
    pub host_cert_lifetime: std::time::Duration,
    /// Where registered hosts' agents are (`None`: at the addresses they registered).
    pub discovery: Option<Arc<dyn crate::cluster::HostDiscovery>>,
}

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("Database failed")]
    Db(#[source] wrenn_db::DbError),
    #[error("JWT secret: {0}")]
    Secret(String),
    #[error("Cannot listen on {addr}")]
    Listen {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("Reconciliation with the host failed: {0}")]
    Reconcile(String),
    #[error("Host agent: {0}")]
    Host(String),
    #[error("Cluster certificates")]
    Cluster(#[source] crate::cluster::ClusterError),
    #[error("{0}")]
    DataDirMismatch(String),
    #[error("Server failed")]
    Serve(#[source] std::io::Error),
}

fn jwt_secret(opts: &ServeOptions) -> Result<Vec<u8>, ServeError> {
    if let Some(s) = &opts.jwt_secret {
        if s.len() < 32 {
            return Err(ServeError::Secret("must be at least 32 characters".into()));
        }
        return Ok(s.as_bytes().to_vec());
    }
    let path = opts.data_dir.join("jwt.secret");
    match std::fs::read_to_string(&path) {
        Ok(s) if s.trim().len() >= 32 => return Ok(s.trim().as_bytes().to_vec()),
        Ok(_) => {
            return Err(ServeError::Secret(format!(
                "{} is too short",
                path.display()
            )))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(ServeError::Secret(format!("{}: {e}", path.display()))),
    }
    let secret: String = (0..32)
        .map(|_| format!("{:02x}", rand::random::<u8>()))
        .collect();
    write_private(&path, secret.as_bytes())
        .map_err(|e| ServeError::Secret(format!("{}: {e}", path.display())))?;
    Ok(secret.into_bytes())
}

/// The setting and the file that pair a database with its data directory.
const DATA_DIR_ID_SETTING: &str = "data_dir_id";
const DATA_DIR_ID_FILE: &str = "data-dir.id";

/// Checks that the database records this data directory's capsules: both carry the same
/// pairing id, written on the first start. A database paired with another data
/// directory, or a fresh database meeting a data directory another database served, is
/// refused (its reconciliation would misjudge every capsule) unless `adopt` says to pair
/// them anew.
pub async fn pair_data_dir(
    db: &wrenn_db::Db,
    data_dir: &std::path::Path,
    adopt: bool,
) -> Result<(), ServeError> {
    let path = data_dir.join(DATA_DIR_ID_FILE);
    let on_disk = match std::fs::read_to_string(&path) {
        Ok(s) if !s.trim().is_empty() => Some(s.trim().to_owned()),
        Ok(_) => None,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => {
            return Err(ServeError::DataDirMismatch(format!(
                "cannot read {}: {e}",
                path.display()
            )))
        }
    };
    let in_db = db
        .system_setting(DATA_DIR_ID_SETTING)
        .await
        .map_err(ServeError::Db)?;
    let id = match (&on_disk, &in_db) {
        (Some(f), Some(d)) if f == d => return Ok(()),
        (None, None) => wrenn_db::new_id("dir-"),
        _ if adopt => {
            tracing::warn!(data_dir = %data_dir.display(), file = ?on_disk, database = ?in_db,
                "pairing the database with this data directory anew (--adopt-data-dir)");
            on_disk.clone().unwrap_or_else(|| wrenn_db::new_id("dir-"))
        }
        (Some(f), None) => {
            return Err(ServeError::DataDirMismatch(format!(
                "the database has no record of data directory {} (pairing {f}), which another \
                 database served: its capsules would be unknown here. Point DATABASE_URL at \
                 that database, or start with --adopt-data-dir to pair this one with it",
                data_dir.display()
            )))
        }
        (_, Some(d)) => {
            return Err(ServeError::DataDirMismatch(format!(
                "the database belongs to another data directory (pairing {d}) than {} \
                 (pairing {}): its capsule rows would not match this host. Use the data \
                 directory it was created with, or start with --adopt-data-dir to pair them \
                 anew",
                data_dir.display(),
                on_disk.as_deref().unwrap_or("none")
            )))
        }
    };
    db.system_set_setting(DATA_DIR_ID_SETTING, &id)
        .await
        .map_err(ServeError::Db)?;
    write_private(&path, id.as_bytes())
        .map_err(|e| ServeError::DataDirMismatch(format!("cannot write {}: {e}", path.display())))
}

/// Makes `path` exist with mode 0600 (an existing file's contents are kept).
fn private_file(path: &std::path::Path) -> std::io::Result<()> {
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(path)?;
    f.set_permissions(std::fs::Permissions::from_mode(0o600))
}

/// Writes `bytes` to `path` (mode 0600) durably: a synced temporary file renamed over it.
fn write_private(path: &std::path::Path, bytes: &[u8]) -> std::io::Result<()> {
    wrenn_core::fsutil::write_atomic(path, bytes)
}

/// Opens the database (SQLite in the data dir unless a URL is given) and runs bootstrap;
/// returns the new API key on a first start.
pub async fn open_db(opts: &ServeOptions) -> Result<(wrenn_db::Db, Option<String>), ServeError> {
    let url = match &opts.database_url {
        Some(url) => url.clone(),
        None => {
            // Created 0600 before SQLite opens it: it holds the server's records
            // (SQLite gives its journal files the database file's mode).
            let path = opts.data_dir.join("wrenn.db");
            private_file(&path).map_err(|e| {
                ServeError::Secret(format!("cannot create {}: {e}", path.display()))
            })?;
            for journal in ["wrenn.db-wal", "wrenn.db-shm"] {
                let p = opts.data_dir.join(journal);
                if p.exists() {
                    private_file(&p).map_err(|e| {
                        ServeError::Secret(format!("cannot protect {}: {e}", p.display()))
                    })?;
                }
            }
            wrenn_db::Db::sqlite_url(&path)
        }
    };
    let db = wrenn_db::Db::open(&url).await.map_err(ServeError::Db)?;
    let key = wrenn_db::ensure_bootstrap(&db, opts.bootstrap_key.as_deref())
        .await
        .map_err(ServeError::Db)?;
    if let Some(password) = &opts.bootstrap_admin_password {
        wrenn_db::ensure_bootstrap_admin_password(&db, password)
            .await
            .map_err(ServeError::Db)?;
    }
    Ok((db, key))
}

/// A control plane whose data directory and database are open and paired, ready to
/// serve once a host agent is there.
#[derive(Debug)]
pub struct ControlPlane {
    opts: ServeOptions,
    db: wrenn_db::Db,
    secret: Vec<u8>,
    bootstrap_key: Option<String>,
}

impl ControlPlane {
    /// Opens the data directory and the database and checks they belong together: done
    /// before a host starts on the data directory.
    pub async fn open(opts: ServeOptions) -> Result<Self, ServeError> {
        std::fs::create_dir_all(&opts.data_dir).map_err(|e| {
            ServeError::Secret(format!("cannot create {}: {e}", opts.data_dir.display()))
        })?;
        let secret = jwt_secret(&opts)?;
        let (db, bootstrap_key) = open_db(&opts).await?;
        if opts.local_host {
            if let Err(e) = pair_data_dir(&db, &opts.data_dir, opts.adopt_data_dir).await {
                db.close().await;
                return Err(e);
            }
        }
        Ok(ControlPlane {
            opts,
            db,
            secret,
            bootstrap_key,
        })
    }

    /// Serves the API over the host agents `agents` (each with the address it was
    /// reached at, if remote) until `shutdown` completes, then pauses the running
    /// capsules it knows and returns. `on_ready` gets the bound address and, on a
    /// first start, the bootstrap API key. With one agent, it must answer now; with
    /// several, those that do not are taken when they answer.
    pub async fn serve(
        self,
        agents: Vec<(Arc<dyn HostAgent>, Option<String>)>,
        shutdown: impl Future<Output = ()> + Send + 'static,
        on_ready: impl FnOnce(SocketAddr, Option<&str>),
    ) -> Result<(), ServeError> {
        let ControlPlane {
            opts,
            db,
            secret,
            bootstrap_key,
        } = self;
        let state = Arc::new(AppState::new(
            db.clone(),
            opts.monitor.clone(),
            opts.config.clone(),
            &secret,
        ));
        let pki = crate::cluster::ClusterPki::load(&db, &state.tokens, opts.host_cert_lifetime)
            .await
            .map_err(ServeError::Cluster)?;
        let _ = state.cluster.set(crate::cluster::Cluster {
            pki,
            dialer: opts.host_dialer.clone(),
            discovery: opts
                .discovery
                .clone()
                .unwrap_or_else(|| Arc::new(crate::cluster::RegisteredHosts)),
        });
        let single = agents.len() == 1;
        for (agent, address) in agents {
            let conn = match HostConn::connect(agent.clone(), address.clone()).await {
                Ok(conn) => conn,
                Err(e) if !single => {
                    tracing::warn!(address = ?address, error = %e,
                        "host agent not answering; it takes capsules once it does");
                    state.hosts.add_unresolved(agent, address);
                    continue;
                }
                Err(e) => return Err(ServeError::Host(e.to_string())),
            };
            let conn = state
                .hosts
                .add(conn)
                .map_err(|e| ServeError::Host(e.to_string()))?;
            crate::lifecycle::record_online(&db, &conn)
                .await
                .map_err(ServeError::Db)?;
            // The agent instance this reconciliation sees: a later one means it restarted.
            if let Ok(v) = conn.agent.versions().await {
                conn.instance_changed(&v.instance);
            }
        }
        crate::lifecycle::reconcile(&state)
            .await
            .map_err(ServeError::Reconcile)?;
        let monitor = crate::lifecycle::spawn_monitor(state.clone());
        let reaper = crate::lifecycle::spawn_reaper(state.clone());
        let builders = crate::builds::spawn_builders(state.clone());
        let channels = crate::channels::spawn(state.clone());
        let sampler = crate::v1::stats::spawn_sampler(state.clone());
        let listener = tokio::net::TcpListener::bind(opts.listen)
            .await
            .map_err(|source| ServeError::Listen {
                addr: opts.listen,
                source,
            })?;
        let addr = listener.local_addr().map_err(ServeError::Serve)?;
        tracing::info!(%addr, "wrenn serve listening");
        on_ready(addr, bootstrap_key.as_deref());
        let app = crate::router(state.clone());
        // With the peer address: sign-up and login are throttled per client address.
        let served = axum::serve(
            listener,
            app.into_make_service_with_connect_info::<SocketAddr>(),
        )
        .with_graceful_shutdown({
            let st = state.clone();
            async move {
                shutdown.await;
                st.events.close();
            }
        })
        .await;
        builders.abort();
        channels.abort();
        sampler.abort();
        reaper.abort();
        monitor.abort();
        crate::lifecycle::pause_all_running(&state).await;
        db.close().await;
        served.map_err(ServeError::Serve)
    }
}
