//! `wrenn serve`: the control plane and an in-process host agent on one machine.

use crate::agent::{HostAgent, LocalAgent, LocalAgentOptions};
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
    /// HS256 secret for user tokens; `None` = generated once and kept in the data dir.
    pub jwt_secret: Option<String>,
    pub config: ApiConfig,
}

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("Host setup failed")]
    Host(#[source] wrenn::HostError),
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
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(|e| ServeError::Secret(format!("{}: {e}", tmp.display())))?;
    f.write_all(secret.as_bytes())
        .and_then(|_| f.sync_all())
        .and_then(|_| std::fs::rename(&tmp, &path))
        .map_err(|e| ServeError::Secret(format!("{}: {e}", path.display())))?;
    Ok(secret.into_bytes())
}

/// Opens the database (SQLite in the data dir unless a URL is given) and runs bootstrap;
/// returns the new API key on a first start.
pub async fn open_db(opts: &ServeOptions) -> Result<(wrenn_db::Db, Option<String>), ServeError> {
    let url = opts
        .database_url
        .clone()
        .unwrap_or_else(|| wrenn_db::Db::sqlite_url(&opts.data_dir.join("wrenn.db")));
    let db = wrenn_db::Db::open(&url).await.map_err(ServeError::Db)?;
    let key = wrenn_db::ensure_bootstrap(&db, opts.bootstrap_key.as_deref())
        .await
        .map_err(ServeError::Db)?;
    Ok((db, key))
}

/// Runs until `shutdown` completes, then pauses running capsules and returns.
/// `on_ready` gets the bound address and, on a first start, the bootstrap API key.
pub async fn run(
    opts: ServeOptions,
    shutdown: impl Future<Output = ()> + Send + 'static,
    on_ready: impl FnOnce(SocketAddr, Option<&str>),
) -> Result<(), ServeError> {
    std::fs::create_dir_all(&opts.data_dir).map_err(|e| {
        ServeError::Secret(format!("cannot create {}: {e}", opts.data_dir.display()))
    })?;
    let secret = jwt_secret(&opts)?;
    let (db, key) = open_db(&opts).await?;
    let host = wrenn::Host::local(wrenn::HostOptions {
        data_dir: wrenn::DataDir::new(&opts.data_dir),
        ..Default::default()
    })
    .await
    .map_err(ServeError::Host)?;
    tracing::info!(accel = %host.accel_probe().accel, reason = %host.accel_probe().reason, "host ready");
    let agent: Arc<dyn HostAgent> = Arc::new(LocalAgent::new(host, LocalAgentOptions::default()));
    let state = Arc::new(AppState::new(
        db.clone(),
        agent,
        opts.config.clone(),
        &secret,
    ));
    crate::lifecycle::reconcile(&state)
        .await
        .map_err(ServeError::Reconcile)?;
    let reaper = crate::lifecycle::spawn_reaper(state.clone());
    let listener = tokio::net::TcpListener::bind(opts.listen)
        .await
        .map_err(|source| ServeError::Listen {
            addr: opts.listen,
            source,
        })?;
    let addr = listener.local_addr().map_err(ServeError::Serve)?;
    tracing::info!(%addr, "wrenn serve listening");
    on_ready(addr, key.as_deref());
    let app = crate::router(state.clone());
    let served = axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await;
    reaper.abort();
    crate::lifecycle::pause_all_running(&state).await;
    db.close().await;
    served.map_err(ServeError::Serve)
}
