//! `wrenn agent`: this machine's capsules behind the host agent's gRPC endpoint.

use crate::host_args::{start_host, HostArgs};
use anyhow::{bail, Context, Result};
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;

#[derive(Debug, clap::Args)]
pub struct AgentArgs {
    /// Address of the gRPC endpoint. A registered agent (mutual TLS) listens on its
    /// `--advertise` address by default; an unregistered one serves plaintext on
    /// loopback addresses only (default 127.0.0.1:7070).
    #[arg(long, env = "WRENN_AGENT_LISTEN")]
    listen: Option<SocketAddr>,
    /// The control plane to register with (`http://host:port`), with `--register`.
    #[arg(long, env = "WRENN_CONTROL_PLANE", requires = "register")]
    control_plane: Option<String>,
    /// One-time registration token (`POST /v1/hosts` gives it). Once registered, the
    /// agent keeps its certificate in the data directory and starts without it.
    #[arg(long, env = "WRENN_REGISTER_TOKEN", requires = "advertise")]
    register: Option<String>,
    /// Where the control plane reaches this agent (`host:port`).
    #[arg(long, env = "WRENN_ADVERTISE")]
    advertise: Option<String>,
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

/// What a registered agent keeps (0600 in its data directory).
#[derive(serde::Serialize, serde::Deserialize)]
struct Credentials {
    host_id: String,
    address: String,
    cert_pem: String,
    key_pem: String,
    /// The CA of the control plane's client certificates.
    ca_cert_pem: String,
}

const CREDENTIALS: &str = "agent-credentials.json";

fn load_credentials(data_dir: &Path) -> Result<Option<Credentials>> {
    let path = data_dir.join(CREDENTIALS);
    match std::fs::read(&path) {
        Ok(b) => serde_json::from_slice(&b)
            .map(Some)
            .with_context(|| format!("{} is damaged", path.display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e).with_context(|| format!("cannot read {}", path.display())),
    }
}

/// Trades the one-time `token` for this host's certificate.
async fn register(
    control_plane: &str,
    token: &str,
    advertise: &str,
    data_dir: &Path,
) -> Result<Credentials> {
    let m = wrenn_agent::machine_specs(data_dir);
    let url = format!("{}/v1/hosts/register", control_plane.trim_end_matches('/'));
    let body = serde_json::json!({
        "token": token, "arch": m.arch, "cpu_cores": m.cpu_cores,
        "memory_mb": m.memory_mb, "disk_gb": m.disk_mb >> 10, "address": advertise,
    });
    let answer = tokio::task::spawn_blocking(move || {
        let r = ureq::post(&url)
            .timeout(std::time::Duration::from_secs(30))
            .send_json(body);
        match r {
            Ok(r) => r
                .into_json::<serde_json::Value>()
                .map_err(|e| anyhow::anyhow!("{url}: {e}")),
            Err(ureq::Error::Status(code, r)) => {
                let text = r.into_string().unwrap_or_default();
                Err(anyhow::anyhow!("{url}: refused ({code}): {text}"))
            }
            Err(e) => Err(anyhow::anyhow!("{url}: {e}")),
        }
    })
    .await
    .context("registration")??;
    let field = |k: &str| -> Result<String> {
        answer
            .pointer(k)
            .and_then(|v| v.as_str())
            .map(str::to_string)
            .with_context(|| format!("the control plane's answer has no {k}"))
    };
    Ok(Credentials {
        host_id: field("/host/id")?,
        address: advertise.to_string(),
        cert_pem: field("/cert_pem")?,
        key_pem: field("/key_pem")?,
        ca_cert_pem: field("/ca_cert_pem")?,
    })
}

pub async fn run(data_dir: &Path, a: AgentArgs) -> Result<u8> {
    std::fs::create_dir_all(data_dir)
        .with_context(|| format!("cannot create {}", data_dir.display()))?;
    let mut creds = load_credentials(data_dir)?;
    if let (None, Some(cp), Some(token), Some(advertise)) =
        (&creds, &a.control_plane, &a.register, &a.advertise)
    {
        let c = register(cp, token, advertise, data_dir).await?;
        let path = data_dir.join(CREDENTIALS);
        wrenn::fsutil::write_atomic(&path, &serde_json::to_vec_pretty(&c)?)
            .with_context(|| format!("cannot write {}", path.display()))?;
        println!("registered with {cp} as host {}", c.host_id);
        creds = Some(c);
    }
    let (host_id, listen, tls) = match &creds {
        Some(c) => {
            if a.host_id.as_ref().is_some_and(|id| *id != c.host_id) {
                bail!(
                    "--host-id: this agent is registered as host {} ({})",
                    c.host_id,
                    data_dir.join(CREDENTIALS).display()
                );
            }
            let listen = match a.listen {
                Some(l) => l,
                None => c.address.parse().with_context(|| {
                    format!(
                        "--listen: the advertised address {} is not an IP:port",
                        c.address
                    )
                })?,
            };
            let tls = wrenn_pki::AgentIdentity {
                cert_pem: c.cert_pem.clone(),
                key_pem: c.key_pem.clone(),
                client_ca_pem: c.ca_cert_pem.clone(),
            }
            .server_config()
            .context("the agent's certificate")?;
            (c.host_id.clone(), listen, Some(Arc::new(tls)))
        }
        None => {
            let listen = a.listen.unwrap_or(SocketAddr::from(([127, 0, 0, 1], 7070)));
            if !listen.ip().is_loopback() {
                bail!(
                    "--listen {listen}: an unregistered agent does not authenticate its callers, \
                     so it listens on loopback addresses only (register it with \
                     --control-plane URL --register TOKEN --advertise ADDR:PORT, or run the \
                     control plane on this machine with `wrenn serve --agent \
                     http://127.0.0.1:{}`)",
                    listen.port()
                );
            }
            let id = match a.host_id {
                Some(id) => id,
                None => kept_host_id(data_dir)?,
            };
            (id, listen, None)
        }
    };
    let local = Arc::new(start_host(data_dir, a.host, &host_id).await?);
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .with_context(|| format!("cannot listen on {listen}"))?;
    let addr = listener.local_addr().context("listening address")?;
    tracing::info!(%addr, host = %host_id, tls = tls.is_some(), "wrenn agent listening");
    let shutdown = crate::serve::shutdown_signal();
    let served = match tls {
        Some(tls) => {
            println!("wrenn agent listening on {addr} with mutual TLS (host {host_id})");
            wrenn_rpc::serve_tls(local.clone(), listener, tls, shutdown).await
        }
        None => {
            println!("wrenn agent listening on http://{addr} (host {host_id})");
            wrenn_rpc::serve(local.clone(), listener, shutdown).await
        }
    };
    for (id, e) in local.shutdown().await {
        tracing::error!(capsule = %id, error = %e, "shutdown: pause failed");
    }
    served.context("wrenn agent")?;
    Ok(0)
}
