//! `wrenn serve`: the control plane with an in-process host agent.

use anyhow::{Context, Result};
use std::net::SocketAddr;
use std::time::Duration;
use wrenn_api::server::{run, ServeOptions};
use wrenn_api::ApiConfig;

#[derive(Debug, clap::Args)]
pub struct ServeArgs {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:8080")]
    listen: SocketAddr,
    /// Database: `postgres://…` for PostgreSQL; default SQLite in the data directory.
    #[arg(long, env = "DATABASE_URL")]
    database_url: Option<String>,
    /// Make the first start's API key this one (`wrn_` + 32 hex).
    #[arg(long, env = "WRENN_BOOTSTRAP_API_KEY", hide_env_values = true)]
    bootstrap_api_key: Option<String>,
    /// Secret for user tokens (≥ 32 characters); default: generated once in the data directory.
    #[arg(long, env = "JWT_SECRET", hide_env_values = true)]
    jwt_secret: Option<String>,
    /// Domain of `{port}-{capsule}.{domain}` proxy host names (default: the request's Host).
    #[arg(long, env = "WRENN_DOMAIN")]
    domain: Option<String>,
    /// Largest file upload per request, in MiB.
    #[arg(long, env = "WRENN_UPLOAD_LIMIT_MIB", default_value_t = 100)]
    upload_limit_mib: u64,
    /// Requests per second per API key or user (0 = unlimited).
    #[arg(long, env = "WRENN_RATE_LIMIT", default_value_t = 200)]
    rate_limit: u32,
    /// Burst above the rate limit.
    #[arg(long, env = "WRENN_RATE_BURST", default_value_t = 400)]
    rate_burst: u32,
    /// Positive inactivity timeouts of /v1 capsules are raised to at least this (seconds).
    #[arg(long, env = "WRENN_MIN_IDLE_TIMEOUT", default_value_t = 60)]
    min_idle_timeout: u32,
    /// Seconds between inactivity checks.
    #[arg(long, env = "WRENN_REAPER_PERIOD", default_value_t = 2)]
    reaper_period: u64,
    /// Refuse `POST /v1/auth/signup`.
    #[arg(long, env = "WRENN_DISABLE_SIGNUP")]
    disable_signup: bool,
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = ctrl_c => {}
        _ = term => {}
    }
    tracing::info!("shutting down: finishing requests, then pausing running capsules");
}

pub async fn serve(data_dir: std::path::PathBuf, a: ServeArgs) -> Result<u8> {
    let opts = ServeOptions {
        listen: a.listen,
        data_dir,
        database_url: a.database_url,
        bootstrap_key: a.bootstrap_api_key,
        jwt_secret: a.jwt_secret,
        config: ApiConfig {
            domain: a.domain,
            upload_limit: a.upload_limit_mib.saturating_mul(1024 * 1024),
            rate_limit: a.rate_limit,
            rate_burst: a.rate_burst,
            min_idle_timeout: a.min_idle_timeout,
            reaper_period: Duration::from_secs(a.reaper_period.max(1)),
            open_signup: !a.disable_signup,
            ..Default::default()
        },
    };
    run(opts, shutdown_signal(), |addr, key| {
        if let Some(key) = key {
            println!(
                "Created the admin team's API key (shown once): {key}\n  \
                 (the same key for E2B SDKs that want the e2b_ form: {})",
                wrenn_api::e2b_spelling(key)
            );
        }
        println!("wrenn serve listening on http://{addr}");
    })
    .await
    .context("wrenn serve")?;
    Ok(0)
}
