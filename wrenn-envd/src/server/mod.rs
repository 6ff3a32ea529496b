//! The guest daemon: one listener serving envd's HTTP routes and its Connect services.

mod auth;
mod entropy;
mod files;
mod filesystem;
pub mod forward;
mod http;
mod identity;
pub mod process;
mod rpc;
#[cfg(test)]
mod test_support;
pub mod upload;
pub mod users;

use crate::connect::ConnectError;
use axum::http::HeaderMap;
use axum::routing::{get, post};
use axum::Router;
use base64::Engine;
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, RwLock};
use users::User;

/// Settings fixed at start.
#[derive(Clone, Debug)]
pub struct Config {
    /// Default user when `/init` named none.
    pub default_user: String,
    /// Set the guest clock from `/init` timestamps (only inside a capsule).
    pub sync_clock: bool,
    /// Where the environment variables of the last applied `/init` are written.
    pub env_file: Option<std::path::PathBuf>,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            default_user: "user".into(),
            sync_clock: false,
            env_file: None,
        }
    }
}

/// What `/init` configures.
#[derive(Debug, Default)]
struct Defaults {
    env_vars: HashMap<String, String>,
    user: Option<String>,
    workdir: Option<String>,
    /// Unix nanoseconds of the newest applied `/init` timestamp.
    last_init_ns: Option<i128>,
}

/// Shared state of the daemon.
#[derive(Debug)]
pub struct AppState {
    config: Config,
    token: RwLock<Option<String>>,
    defaults: RwLock<Defaults>,
    processes: process::ProcessTable,
    watchers: filesystem::Watchers,
    cpu: Mutex<Option<http::CpuSample>>,
}

impl AppState {
    pub fn new(config: Config) -> Arc<Self> {
        if users::lookup_user(&config.default_user).is_none() {
            tracing::warn!(user = %config.default_user, "default user does not exist; falling back to the daemon's own user");
        }
        Arc::new(AppState {
            config,
            token: RwLock::new(None),
            defaults: RwLock::new(Defaults::default()),
            processes: process::ProcessTable::default(),
            watchers: filesystem::Watchers::default(),
            cpu: Mutex::new(http::CpuSample::read()),
        })
    }

    fn access_token(&self) -> Option<String> {
        self.token.read().map(|t| t.clone()).unwrap_or(None)
    }

    fn default_env(&self) -> HashMap<String, String> {
        self.defaults
            .read()
            .map(|d| d.env_vars.clone())
            .unwrap_or_default()
    }

    fn default_workdir(&self) -> Option<String> {
        self.defaults.read().ok().and_then(|d| d.workdir.clone())
    }

    /// Resolves a requested user name; empty or absent means the default user.
    fn resolve_user(&self, name: Option<&str>) -> Result<User, ConnectError> {
        match name.filter(|n| !n.is_empty()) {
            Some(n) => users::lookup_user(n)
                .ok_or_else(|| ConnectError::unauthenticated(format!("invalid username: '{n}'"))),
            None => {
                let configured = self.defaults.read().ok().and_then(|d| d.user.clone());
                if let Some(n) = configured {
                    return users::lookup_user(&n).ok_or_else(|| {
                        ConnectError::unauthenticated(format!("invalid default username: '{n}'"))
                    });
                }
                users::lookup_user(&self.config.default_user)
                    .or_else(|| users::lookup_uid(nix::unistd::getuid().as_raw()))
                    .ok_or_else(|| ConnectError::unauthenticated("no default user available"))
            }
        }
    }

    /// User of an RPC: HTTP Basic username, else the default user.
    fn rpc_user(&self, headers: &HeaderMap) -> Result<User, ConnectError> {
        let name = headers
            .get(axum::http::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| {
                v.strip_prefix("Basic ")
                    .or_else(|| v.strip_prefix("basic "))
            })
            .map(|b64| {
                let raw = base64::engine::general_purpose::STANDARD
                    .decode(b64.trim())
                    .map_err(|_| {
                        ConnectError::unauthenticated("invalid basic authorization header")
                    })?;
                let text = String::from_utf8(raw).map_err(|_| {
                    ConnectError::unauthenticated("invalid basic authorization header")
                })?;
                Ok::<_, ConnectError>(text.split(':').next().unwrap_or("").to_string())
            })
            .transpose()?;
        self.resolve_user(name.as_deref())
    }

    /// Resolves a client path for `user` (relative paths against the default workdir or home).
    fn resolve_path(&self, path: &str, user: &User) -> PathBuf {
        let base = self
            .default_workdir()
            .map(PathBuf::from)
            .unwrap_or_else(|| user.home.clone());
        users::resolve(path, &user.home, &base)
    }
}

/// The full router: HTTP routes, both Connect services, and the token check.
pub fn router(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/health", get(http::health))
        .route("/init", post(http::init))
        .route("/metrics", get(http::metrics))
        .route("/envs", get(http::envs))
        .route("/files", get(files::download).post(files::upload))
        .merge(process::router())
        .merge(filesystem::router())
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            auth::require_token,
        ))
        .with_state(state)
}

/// Serves until `shutdown` resolves.
pub async fn serve(
    listener: tokio::net::TcpListener,
    state: Arc<AppState>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    use axum::serve::ListenerExt;
    let app = router(state.clone());
    // Streams are many small frames; Nagle would hold each behind a delayed ACK.
    let listener = listener.tap_io(|tcp| {
        let _ = tcp.set_nodelay(true);
    });
    let res = axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await;
    state.processes.kill_all();
    res
}
