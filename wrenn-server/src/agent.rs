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
    #[command(flatten)]
    host: HostArgs,
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
    let local = Arc::new(start_host(data_dir, a.host).await?);
    let listener = tokio::net::TcpListener::bind(a.listen)
        .await
        .with_context(|| format!("cannot listen on {}", a.listen))?;
    let addr = listener.local_addr().context("listening address")?;
    tracing::info!(%addr, "wrenn agent listening");
    println!("wrenn agent listening on http://{addr}");
    let served = wrenn_rpc::serve(local.clone(), listener, crate::serve::shutdown_signal()).await;
    for (id, e) in local.shutdown().await {
        tracing::error!(capsule = %id, error = %e, "shutdown: pause failed");
    }
    served.context("wrenn agent")?;
    Ok(0)
}
