//! `wrenn agent`: this machine's capsules behind the host agent's gRPC endpoint.

use crate::host_args::{start_host, HostArgs};
use anyhow::{bail, Context, Result};
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;

#[derive(Debug, clap::Args)]
pub struct AgentArgs {
    /// Address of the gRPC endpoint. Loopback addresses only: the endpoint does not
    /// authenticate its callers yet.
    #[arg(long, env = "WRENN_AGENT_LISTEN", default_value = "127.0.0.1:7070")]
    listen: SocketAddr,
    /// This host's id in the control plane (lowercase letters, digits and `-`, at most
    /// 63). Default: generated once and kept in the data directory (`host-id`).
    #[arg(long, env = "WRENN_HOST_ID", value_parser = parse_host_id)]
    host_id: Option<String>,
    #[command(flatten)]
    host: HostArgs,
}

fn parse_host_id(s: &str) -> Result<String, String> {
    let ok = !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-');
    if ok {
        Ok(s.to_string())
    } else {
        Err(format!(
            "{s:?}: expected lowercase letters, digits and '-' (at most 63, not starting with '-')"
        ))
    }
}

/// The host id kept in the data directory, made on first use.
fn kept_host_id(data_dir: &Path) -> Result<String> {
    let path = data_dir.join("host-id");
    match std::fs::read_to_string(&path) {
        Ok(s) => parse_host_id(s.trim()).map_err(|e| anyhow::anyhow!("{}: {e}", path.display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            // Hex digits: a valid id.
            let id = format!("host-{}", &wrenn::id::random_token()[..10]);
            let tmp = data_dir.join("host-id.tmp");
            std::fs::write(&tmp, format!("{id}\n"))
                .and_then(|()| std::fs::rename(&tmp, &path))
                .with_context(|| format!("cannot write {}", path.display()))?;
            Ok(id)
        }
        Err(e) => Err(e).with_context(|| format!("cannot read {}", path.display())),
    }
}

pub async fn run(data_dir: &Path, a: AgentArgs) -> Result<u8> {
    if !a.listen.ip().is_loopback() {
        bail!(
            "--listen {}: the agent's gRPC endpoint does not authenticate its callers yet, so \
             it listens on loopback addresses only (run the control plane on this machine \
             with `wrenn serve --agent http://127.0.0.1:{}`)",
            a.listen,
            a.listen.port()
        );
    }
    std::fs::create_dir_all(data_dir)
        .with_context(|| format!("cannot create {}", data_dir.display()))?;
    let host_id = match a.host_id {
        Some(id) => id,
        None => kept_host_id(data_dir)?,
    };
    let local = Arc::new(start_host(data_dir, a.host, &host_id).await?);
    let listener = tokio::net::TcpListener::bind(a.listen)
        .await
        .with_context(|| format!("cannot listen on {}", a.listen))?;
    let addr = listener.local_addr().context("listening address")?;
    tracing::info!(%addr, host = %host_id, "wrenn agent listening");
    println!("wrenn agent listening on http://{addr} (host {host_id})");
    let served = wrenn_rpc::serve(local.clone(), listener, crate::serve::shutdown_signal()).await;
    for (id, e) in local.shutdown().await {
        tracing::error!(capsule = %id, error = %e, "shutdown: pause failed");
    }
    served.context("wrenn agent")?;
    Ok(0)
}
