//! `envd`: the in-capsule agent. Runs as an ordinary program on any Linux host too.

use clap::Parser;
use std::net::{IpAddr, SocketAddr};
use wrenn_envd::server::forward::{ForwardAddrs, ForwardConfig, Forwarder, SCAN_INTERVAL};
use wrenn_envd::server::{serve, AppState, Config};

#[derive(Debug, Parser)]
#[command(name = "envd", version = wrenn_envd::ENVD_VERSION, about = "Wrenn's in-guest agent (E2B envd protocol)")]
struct Args {
    /// TCP port to listen on.
    #[arg(long, default_value_t = wrenn_envd::DEFAULT_PORT)]
    port: u16,
    /// Address to bind.
    #[arg(long, default_value = "0.0.0.0")]
    addr: IpAddr,
    /// User that runs processes and owns files when a request names none.
    #[arg(long, default_value = "user")]
    default_user: String,
    /// Set the system clock from the host time sent to /init (inside a capsule).
    #[arg(long)]
    sync_clock: bool,
    /// Keep the environment variables of the last /init in this file (`KEY=VALUE`
    /// entries ending in NUL, as /proc/PID/environ), for processes that started
    /// before it: a snapshot's long-running services pick up the identity of the
    /// capsule they were restored into.
    #[arg(long, value_name = "PATH")]
    env_file: Option<std::path::PathBuf>,
    /// Expose services that listen only on loopback at this address, on the same port
    /// (repeatable). Default: every non-loopback IPv4 address of the up interfaces.
    #[arg(long = "forward-addr", value_name = "IP", value_parser = forward_ip)]
    forward_addr: Vec<IpAddr>,
    /// Do not expose loopback-only services (for envd running outside a capsule).
    #[arg(long, conflicts_with = "forward_addr")]
    no_forward: bool,
}

/// A forward address must be one address: binding a wildcard would collide with the
/// very listeners it forwards to.
fn forward_ip(s: &str) -> Result<IpAddr, String> {
    let ip: IpAddr = s.parse().map_err(|e| format!("{e}"))?;
    if ip.is_unspecified() {
        return Err("a wildcard address cannot be a forward address".into());
    }
    Ok(ip)
}

fn main() -> std::process::ExitCode {
    let args = Args::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("ENVD_LOG")
                .unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    // One thread is plenty for an agent and keeps its footprint small.
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .max_blocking_threads(16)
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("envd: cannot start the runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let result = rt.block_on(async {
        let addr = SocketAddr::new(args.addr, args.port);
        let listener = tokio::net::TcpListener::bind(addr).await?;
        tracing::info!(%addr, version = wrenn_envd::ENVD_VERSION, "envd listening");
        if !args.no_forward {
            let addrs = if args.forward_addr.is_empty() {
                ForwardAddrs::Interfaces
            } else {
                ForwardAddrs::Fixed(args.forward_addr.clone())
            };
            tracing::info!(?addrs, "forwarding loopback-only listeners");
            tokio::spawn(
                Forwarder::new(ForwardConfig {
                    addrs,
                    exclude_ports: vec![args.port],
                    interval: SCAN_INTERVAL,
                })
                .run(),
            );
        }
        let state = AppState::new(Config {
            default_user: args.default_user,
            sync_clock: args.sync_clock,
            env_file: args.env_file,
        });
        serve(listener, state, shutdown_signal()).await
    });
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("envd: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        return std::future::pending().await;
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
    tracing::info!("envd shutting down");
}
