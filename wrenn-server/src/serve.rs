//! `wrenn serve`: the control plane with an in-process host agent.

use crate::host_args::{start_host, HostArgs};
use anyhow::{Context, Result};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use wrenn_agent::LOCAL_HOST;
use wrenn_api::agent::HostAgent;
use wrenn_api::hosts::MonitorConfig;
use wrenn_api::quota::TeamLimits;
use wrenn_api::server::{ControlPlane, ServeOptions};
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
    /// Serve the capsules of the host agent at this address (`http://HOST:PORT`, a
    /// `wrenn agent`) instead of starting one in this process. Repeat it (or
    /// comma-separate in the environment) for several hosts: new capsules go to the
    /// least loaded reachable one.
    #[arg(
        long = "agent",
        env = "WRENN_AGENTS",
        value_delimiter = ',',
        conflicts_with = "HostArgs"
    )]
    agents: Vec<String>,
    /// Run no host in this process: capsules go only to host agents (`--agent`, or
    /// hosts registered in the database).
    #[arg(long, env = "WRENN_NO_LOCAL_HOST", conflicts_with = "HostArgs")]
    no_local_host: bool,
    /// Seconds between the host monitor's checks of each host agent.
    #[arg(long, env = "WRENN_HOST_CHECK_INTERVAL", default_value_t = 2.0, value_parser = positive_secs)]
    host_check_interval: f64,
    /// Seconds a host agent may stay silent before its host is `unreachable` and takes
    /// no new capsules (default: two check intervals, so a dead agent is noticed within
    /// three).
    #[arg(long, env = "WRENN_HOST_TIMEOUT", value_parser = positive_secs)]
    host_timeout: Option<f64>,
    /// Seconds a registered host's certificate is valid (default 30 days); its agent
    /// renews it when a third of that is left.
    #[arg(long, env = "WRENN_HOST_CERT_LIFETIME", value_parser = cert_lifetime)]
    host_cert_lifetime: Option<f64>,
    /// vCPUs placed per physical core of a host, when choosing among several hosts.
    #[arg(long, env = "WRENN_CPU_OVERCOMMIT", default_value_t = 1.5, value_parser = overcommit)]
    cpu_overcommit: f64,
    #[command(flatten)]
    discovery: crate::discovery::DiscoveryArgs,
    #[command(flatten)]
    host: HostArgs,
    /// Most output a synchronous exec returns, in MiB (more: the command is stopped, 413).
    #[arg(long, env = "WRENN_EXEC_OUTPUT_LIMIT_MIB", default_value_t = 16)]
    exec_output_limit_mib: u64,
    /// Capsules a team may hold (not stopped; 0 = unlimited).
    #[arg(long, env = "WRENN_TEAM_MAX_CAPSULES", default_value_t = TeamLimits::default().capsules)]
    team_max_capsules: u64,
    /// vCPUs of a team's capsules that are not paused (0 = unlimited).
    #[arg(long, env = "WRENN_TEAM_MAX_VCPUS", default_value_t = TeamLimits::default().vcpus)]
    team_max_vcpus: u64,
    /// Memory of a team's capsules that are not paused, in MiB (0 = unlimited).
    #[arg(long, env = "WRENN_TEAM_MAX_MEMORY_MB", default_value_t = TeamLimits::default().memory_mb)]
    team_max_memory_mb: u64,
    /// Disk of a team's capsules, in MB (0 = unlimited).
    #[arg(long, env = "WRENN_TEAM_MAX_DISK_MB", default_value_t = TeamLimits::default().disk_mb)]
    team_max_disk_mb: u64,
    /// Snapshot templates a team may keep (0 = unlimited).
    #[arg(long, env = "WRENN_TEAM_MAX_SNAPSHOTS", default_value_t = TeamLimits::default().snapshots)]
    team_max_snapshots: u64,
    /// Forks one request may make (0 = unlimited).
    #[arg(long, env = "WRENN_TEAM_MAX_FORKS", default_value_t = TeamLimits::default().fork_count)]
    team_max_forks: u64,
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
    /// Template builds this server runs at once.
    #[arg(long, env = "WRENN_BUILD_WORKERS", default_value_t = 2)]
    build_workers: usize,
    /// Pre-build phase of template builds, run as root in the build's capsule (a failure
    /// is logged, not fatal). Default: a package index update where apt is.
    #[arg(long, env = "WRENN_BUILD_PRE_COMMAND")]
    build_pre_command: Option<String>,
    /// Post-build phase of template builds (default: package caches cleaned).
    #[arg(long, env = "WRENN_BUILD_POST_COMMAND")]
    build_post_command: Option<String>,
    /// Seconds after which a running build whose server went silent is failed and its
    /// capsule destroyed.
    #[arg(long, env = "WRENN_BUILD_HEARTBEAT_TIMEOUT", default_value_t = 60)]
    build_heartbeat_timeout: u64,
    /// Let notification channels send to loopback, private and link-local addresses
    /// (by default only public ones: a channel must not reach this network's services).
    #[arg(long, env = "WRENN_CHANNELS_ALLOW_PRIVATE_ADDRESSES")]
    channels_allow_private_addresses: bool,
    /// Let template builds pull container images from registries at loopback, private
    /// and link-local addresses (by default only public ones). Registries on loopback
    /// are spoken to over plain HTTP, as container engines do.
    #[arg(long, env = "WRENN_REGISTRY_ALLOW_PRIVATE_ADDRESSES")]
    registry_allow_private_addresses: bool,
    /// Start even if the database and the data directory were not used together before
    /// (a fresh database for a data directory with capsules, or the database of another
    /// data directory), and pair them from now on.
    #[arg(long, env = "WRENN_ADOPT_DATA_DIR")]
    adopt_data_dir: bool,
    /// Password for the bootstrap admin `admin@wrenn.local` (owner of the first team), set
    /// if that account has none yet (never replaced): log in with it to create API keys,
    /// invite people and manage the team.
    #[arg(long, env = "WRENN_BOOTSTRAP_ADMIN_PASSWORD", hide_env_values = true)]
    bootstrap_admin_password: Option<String>,
    /// Who may `POST /v1/auth/signup` without an invitation: `open`, `closed`, or `auto`
    /// (open only when listening on a loopback address).
    #[arg(long, env = "WRENN_SIGNUP", value_enum, default_value_t = SignupMode::Auto)]
    signup: SignupMode,
    /// Refuse sign-up without an invitation (the same as `--signup closed`).
    #[arg(long, env = "WRENN_DISABLE_SIGNUP")]
    disable_signup: bool,
    /// Sign-up and login attempts per minute per client address (0 = unlimited).
    #[arg(long, env = "WRENN_AUTH_RATE_LIMIT", default_value_t = 20)]
    auth_rate_limit: u32,
    /// Failed login attempts per minute per account (0 = unlimited).
    #[arg(long, env = "WRENN_AUTH_ACCOUNT_RATE_LIMIT", default_value_t = 10)]
    auth_account_rate_limit: u32,
    /// Password hashes computed at a time (0 = one per CPU); each takes ~19 MiB.
    #[arg(long, env = "WRENN_PASSWORD_HASH_CONCURRENCY", default_value_t = 0)]
    password_hash_concurrency: usize,
    /// Sign-ins waiting for a password hash beyond which more are answered 503.
    #[arg(long, env = "WRENN_PASSWORD_HASH_QUEUE", default_value_t = 32)]
    password_hash_queue: usize,
    /// A reverse proxy in front of the server (repeatable, or comma-separated): its
    /// `X-Forwarded-For` names the client that sign-in throttling counts.
    #[arg(
        long = "trusted-proxy",
        env = "WRENN_TRUSTED_PROXIES",
        value_delimiter = ','
    )]
    trusted_proxies: Vec<std::net::IpAddr>,
}

/// Who may sign up without an invitation.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum SignupMode {
    /// Open when the server listens on a loopback address, closed otherwise.
    Auto,
    Open,
    Closed,
}

/// Whether sign-up without an invitation is open: by default only for a server that
/// nobody beyond this machine can reach.
fn signup_open(mode: SignupMode, disabled: bool, listen: SocketAddr) -> bool {
    !disabled
        && match mode {
            SignupMode::Open => true,
            SignupMode::Closed => false,
            SignupMode::Auto => listen.ip().is_loopback(),
        }
}

/// A certificate lifetime in seconds: at least a minute (renewal happens when a third
/// is left, and clocks of different machines differ a little).
fn cert_lifetime(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(v) if v.is_finite() && (60.0..=10.0 * 365.0 * 86_400.0).contains(&v) => Ok(v),
        _ => Err(format!("{s:?}: expected seconds from 60 to 315360000")),
    }
}

fn positive_secs(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(v) if v.is_finite() && (0.05..=3600.0).contains(&v) => Ok(v),
        _ => Err(format!("{s:?}: expected seconds between 0.05 and 3600")),
    }
}

fn overcommit(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(v) if v.is_finite() && (0.1..=100.0).contains(&v) => Ok(v),
        _ => Err(format!("{s:?}: expected a ratio between 0.1 and 100")),
    }
}

pub(crate) async fn shutdown_signal() {
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

/// Reaches registered hosts' agents over gRPC with mutual TLS.
#[derive(Debug)]
struct RpcDialer;

impl wrenn_api::cluster::HostDialer for RpcDialer {
    fn dial(
        &self,
        id: &wrenn::scheduler::HostId,
        address: &str,
        identity: &wrenn_pki::ControlPlaneIdentity,
    ) -> Result<Arc<dyn HostAgent>, String> {
        wrenn_rpc::RemoteAgent::connect_tls(
            address,
            &id.0,
            identity,
            wrenn_rpc::Timeouts::default(),
        )
        .map(|a| Arc::new(a) as Arc<dyn HostAgent>)
        .map_err(|e| e.to_string())
    }
}

pub async fn serve(data_dir: std::path::PathBuf, a: ServeArgs) -> Result<u8> {
    let opts = ServeOptions {
        listen: a.listen,
        data_dir: data_dir.clone(),
        database_url: a.database_url,
        bootstrap_key: a.bootstrap_api_key,
        jwt_secret: a.jwt_secret,
        bootstrap_admin_password: a.bootstrap_admin_password,
        adopt_data_dir: a.adopt_data_dir,
        local_host: a.agents.is_empty() && !a.no_local_host,
        config: ApiConfig {
            domain: a.domain,
            upload_limit: a.upload_limit_mib.saturating_mul(1024 * 1024),
            exec_output_limit: a.exec_output_limit_mib.saturating_mul(1024 * 1024),
            team_limits: TeamLimits {
                capsules: a.team_max_capsules,
                vcpus: a.team_max_vcpus,
                memory_mb: a.team_max_memory_mb,
                disk_mb: a.team_max_disk_mb,
                snapshots: a.team_max_snapshots,
                fork_count: a.team_max_forks,
            },
            rate_limit: a.rate_limit,
            rate_burst: a.rate_burst,
            min_idle_timeout: a.min_idle_timeout,
            reaper_period: Duration::from_secs(a.reaper_period.max(1)),
            open_signup: signup_open(a.signup, a.disable_signup, a.listen),
            auth_ip_rate: a.auth_rate_limit,
            auth_account_rate: a.auth_account_rate_limit,
            hash_concurrency: a.password_hash_concurrency,
            hash_queue: a.password_hash_queue,
            trusted_proxies: a.trusted_proxies,
            builds: {
                let d = wrenn_api::builds::BuildConfig::default();
                wrenn_api::builds::BuildConfig {
                    workers: a.build_workers.max(1),
                    pre_build: a.build_pre_command.unwrap_or(d.pre_build),
                    post_build: a.build_post_command.unwrap_or(d.post_build),
                    stale_after: Duration::from_secs(a.build_heartbeat_timeout.max(3)),
                    registry_allow_private: a.registry_allow_private_addresses,
                }
            },
            channels: wrenn_api::channels::ChannelConfig {
                allow_private: a.channels_allow_private_addresses,
                ..Default::default()
            },
            ..Default::default()
        },
        monitor: MonitorConfig {
            interval: Duration::from_secs_f64(a.host_check_interval),
            timeout: Duration::from_secs_f64(a.host_timeout.unwrap_or(a.host_check_interval * 3.0)),
            cpu_overcommit: a.cpu_overcommit,
        },
        host_dialer: Some(Arc::new(RpcDialer)),
        host_cert_lifetime: a
            .host_cert_lifetime
            .map(Duration::from_secs_f64)
            .unwrap_or(wrenn_api::cluster::HOST_CERT_VALIDITY),
        discovery: Some(a.discovery.build()?),
    };
    let admin_password = opts.bootstrap_admin_password.is_some();
    let signup = opts.config.open_signup;
    // The database is checked against the data directory before the host touches it.
    let control_plane = ControlPlane::open(opts).await.context("wrenn serve")?;
    let mut agents: Vec<(Arc<dyn HostAgent>, Option<String>)> = Vec::new();
    let mut local = None;
    if a.agents.is_empty() && !a.no_local_host {
        let host = Arc::new(start_host(&data_dir, a.host, LOCAL_HOST, false).await?);
        agents.push((host.clone(), None));
        local = Some(host);
    }
    for url in &a.agents {
        let remote = wrenn_rpc::RemoteAgent::connect_lazy(url, wrenn_rpc::Timeouts::default())
            .with_context(|| format!("--agent {url}"))?;
        tracing::info!(agent = %url, "serving the capsules of a remote host agent");
        agents.push((Arc::new(remote), Some(url.clone())));
    }
    let served = control_plane
        .serve(agents, shutdown_signal(), |addr, key| {
            if let Some(key) = key {
                println!(
                    "Created the admin team's API key (shown once): {key}\n  \
                 (the same key for E2B SDKs that want the e2b_ form: {})",
                    wrenn_api::e2b_spelling(key)
                );
                if !admin_password {
                    println!(
                    "  API keys cannot create keys: set WRENN_BOOTSTRAP_ADMIN_PASSWORD to log in \
                     as admin@wrenn.local and manage the team"
                );
                }
            }
            if !signup {
                println!("Sign-up is closed (invitations only); --signup open opens it");
            }
            println!("wrenn serve listening on http://{addr}");
            if wrenn_api::dashboard_built() {
                println!("  dashboard: http://{addr}/");
            } else {
                println!(
                    "  dashboard: not built into this binary (./scripts/dashboard.sh, then \
                     rebuild wrenn); / says so"
                );
            }
        })
        .await;
    // The control plane paused what it knows; the host pauses anything else still running.
    if let Some(local) = local {
        for (id, e) in local.shutdown().await {
            tracing::error!(capsule = %id, error = %e, "shutdown: pause failed");
        }
    }
    served.context("wrenn serve")?;
    Ok(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signup_is_open_by_default_only_on_loopback() {
        let at = |s: &str| s.parse::<SocketAddr>().expect("address");
        for (addr, open) in [
            ("127.0.0.1:8080", true),
            ("127.0.0.2:8080", true),
            ("[::1]:8080", true),
            ("0.0.0.0:8080", false),
            ("[::]:8080", false),
            ("192.168.1.10:8080", false),
        ] {
            assert_eq!(
                signup_open(SignupMode::Auto, false, at(addr)),
                open,
                "{addr}"
            );
        }
        assert!(signup_open(SignupMode::Open, false, at("0.0.0.0:80")));
        assert!(!signup_open(SignupMode::Closed, false, at("127.0.0.1:80")));
        assert!(!signup_open(SignupMode::Open, true, at("0.0.0.0:80")));
        assert!(!signup_open(SignupMode::Auto, true, at("127.0.0.1:80")));
    }
}
