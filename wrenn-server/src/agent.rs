//! `wrenn agent`: this machine's capsules behind the host agent's gRPC endpoint.

use crate::host_args::{start_host, HostArgs};
use anyhow::{bail, Context, Result};
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

#[derive(Debug, clap::Args)]
pub struct AgentArgs {
    /// Address of the gRPC endpoint. A registered agent (mutual TLS) listens on its
    /// `--advertise` address by default; an unregistered one serves plaintext on
    /// loopback addresses only (default 127.0.0.1:7070).
    #[arg(long, env = "WRENN_AGENT_LISTEN")]
    listen: Option<SocketAddr>,
    /// The control plane to register with (`http://host:port`), with `--register`.
    #[arg(long, env = "WRENN_CONTROL_PLANE")]
    control_plane: Option<String>,
    /// Registration token: a host's one-time token (`POST /v1/hosts`), or a join token
    /// (`POST /v1/hosts/join-tokens`) that registers this machine as a new host named
    /// by `--host-id`. Once registered, the agent keeps its certificate in the data
    /// directory and starts without it (a token given then is not used).
    #[arg(long, env = "WRENN_REGISTER_TOKEN", requires = "advertise")]
    register: Option<String>,
    /// Where the control plane reaches this agent (`host:port`).
    #[arg(long, env = "WRENN_ADVERTISE")]
    advertise: Option<String>,
    /// This host's id in the control plane (a lowercase DNS name, e.g. the Kubernetes
    /// node's). Default: generated once and kept in the data directory (`host-id`); a
    /// host created with `POST /v1/hosts` has the id the control plane gave it.
    #[arg(long, env = "WRENN_HOST_ID", value_parser = parse_host_id)]
    host_id: Option<String>,
    #[command(flatten)]
    host: HostArgs,
}

fn parse_host_id(s: &str) -> Result<String, String> {
    wrenn::scheduler::HostId::parse(s).map(|h| h.0)
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
#[derive(Clone, serde::Serialize, serde::Deserialize)]
struct Credentials {
    host_id: String,
    address: String,
    cert_pem: String,
    key_pem: String,
    /// The CA of the control plane's client certificates.
    ca_cert_pem: String,
    /// The control plane that renews the certificate, with `refresh_token`.
    #[serde(default)]
    control_plane: Option<String>,
    #[serde(default)]
    refresh_token: Option<String>,
    /// When the certificate was received and when it expires (renewed when a third
    /// of that time is left).
    #[serde(default)]
    cert_received_at: Option<chrono::DateTime<chrono::Utc>>,
    #[serde(default)]
    cert_expires_at: Option<chrono::DateTime<chrono::Utc>>,
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

fn save_credentials(data_dir: &Path, c: &Credentials) -> Result<()> {
    let path = data_dir.join(CREDENTIALS);
    wrenn::fsutil::write_atomic(&path, &serde_json::to_vec_pretty(c)?)
        .with_context(|| format!("cannot write {}", path.display()))
}

/// How the control plane answered a registration or refresh.
enum Answer {
    Ok(serde_json::Value),
    /// The credential was refused (401): retrying will not help.
    Refused(String),
}

/// POSTs `body` to the control plane's `path`.
async fn post(control_plane: &str, path: &str, body: serde_json::Value) -> Result<Answer> {
    let url = format!("{}{path}", control_plane.trim_end_matches('/'));
    tokio::task::spawn_blocking(move || {
        let r = ureq::post(&url)
            .timeout(std::time::Duration::from_secs(30))
            .send_json(body);
        match r {
            Ok(r) => r
                .into_json::<serde_json::Value>()
                .map(Answer::Ok)
                .map_err(|e| anyhow::anyhow!("{url}: {e}")),
            Err(ureq::Error::Status(401, r)) => Ok(Answer::Refused(format!(
                "{url}: refused (401): {}",
                r.into_string().unwrap_or_default()
            ))),
            Err(ureq::Error::Status(code, r)) => {
                let text = r.into_string().unwrap_or_default();
                Err(anyhow::anyhow!("{url}: refused ({code}): {text}"))
            }
            Err(e) => Err(anyhow::anyhow!("{url}: {e}")),
        }
    })
    .await
    .context("request to the control plane")?
}

/// The credentials in a registration or refresh answer.
fn credentials_of(
    answer: &serde_json::Value,
    address: &str,
    control_plane: &str,
) -> Result<Credentials> {
    let field = |k: &str| -> Result<String> {
        answer
            .pointer(k)
            .and_then(|v| v.as_str())
            .map(str::to_string)
            .with_context(|| format!("the control plane's answer has no {k}"))
    };
    let expires = chrono::DateTime::parse_from_rfc3339(&field("/cert_expires_at")?)
        .context("the control plane's answer: cert_expires_at")?
        .with_timezone(&chrono::Utc);
    Ok(Credentials {
        host_id: field("/host/id")?,
        address: address.to_string(),
        cert_pem: field("/cert_pem")?,
        key_pem: field("/key_pem")?,
        ca_cert_pem: field("/ca_cert_pem")?,
        control_plane: Some(control_plane.to_string()),
        refresh_token: Some(field("/refresh_token")?),
        cert_received_at: Some(chrono::Utc::now()),
        cert_expires_at: Some(expires),
    })
}

/// Trades the one-time `token` for this host's certificate.
async fn register(
    control_plane: &str,
    token: &str,
    advertise: &str,
    data_dir: &Path,
    host_id: Option<String>,
) -> Result<Credentials> {
    let m = wrenn_agent::machine_specs(data_dir);
    let mut body = serde_json::json!({
        "token": token, "arch": m.arch, "cpu_cores": m.cpu_cores,
        "memory_mb": m.memory_mb, "disk_gb": m.disk_mb >> 10, "address": advertise,
    });
    if let Some(id) = host_id {
        body["host_id"] = id.into();
    }
    match post(control_plane, "/v1/hosts/register", body).await? {
        Answer::Ok(a) => credentials_of(&a, advertise, control_plane),
        Answer::Refused(why) => bail!("{why}"),
    }
}

/// When `c`'s certificate is due for renewal: once two thirds of its life have passed.
fn renewal_time(c: &Credentials) -> Option<chrono::DateTime<chrono::Utc>> {
    let (from, until) = (c.cert_received_at?, c.cert_expires_at?);
    Some(from + (until - from) * 2 / 3)
}

/// Renews the agent's certificate before it expires, for as long as the agent runs:
/// new connections present the new certificate (`slot`), and it is kept on disk for
/// the next start. A refused refresh token ends the renewals (the host must be
/// registered again); other failures are retried.
async fn renew_certificates(
    data_dir: std::path::PathBuf,
    mut c: Credentials,
    slot: wrenn_pki::CertSlot,
) {
    let (Some(control_plane), Some(_)) = (c.control_plane.clone(), c.refresh_token.as_ref()) else {
        tracing::warn!("these credentials have no refresh token: the certificate is not renewed");
        return;
    };
    let Some(mut due) = renewal_time(&c) else {
        return;
    };
    loop {
        let wait = (due - chrono::Utc::now()).to_std().unwrap_or_default();
        tokio::time::sleep(wait).await;
        let body = serde_json::json!({ "refresh_token": c.refresh_token });
        let outcome = match post(&control_plane, "/v1/hosts/auth/refresh", body).await {
            Ok(Answer::Ok(a)) => credentials_of(&a, &c.address, &control_plane),
            Ok(Answer::Refused(why)) => {
                tracing::error!(%why, "the control plane refused this host's refresh token: \
                    the certificate will not be renewed (register the host again)");
                return;
            }
            Err(e) => Err(e),
        };
        let renewed = outcome.and_then(|n| {
            slot.replace(&n.cert_pem, &n.key_pem)
                .context("the renewed certificate")?;
            save_credentials(&data_dir, &n)?;
            Ok(n)
        });
        match renewed {
            Ok(n) => {
                tracing::info!(expires = ?n.cert_expires_at, "host certificate renewed");
                c = n;
                let Some(next) = renewal_time(&c) else {
                    return;
                };
                due = next;
            }
            Err(e) => {
                // Retried at a tenth of the time left, between 1 s and a minute.
                let left = c
                    .cert_expires_at
                    .and_then(|t| (t - chrono::Utc::now()).to_std().ok())
                    .unwrap_or_default();
                let retry = (left / 10).clamp(Duration::from_secs(1), Duration::from_secs(60));
                tracing::warn!(error = %format!("{e:#}"), retry_s = retry.as_secs(),
                    "cannot renew the host certificate yet");
                due = chrono::Utc::now()
                    + chrono::Duration::from_std(retry)
                        .unwrap_or_else(|_| chrono::Duration::seconds(60));
            }
        }
    }
}

pub async fn run(data_dir: &Path, a: AgentArgs) -> Result<u8> {
    std::fs::create_dir_all(data_dir)
        .with_context(|| format!("cannot create {}", data_dir.display()))?;
    let mut creds = load_credentials(data_dir)?;
    if creds.is_none() && a.register.is_some() && a.control_plane.is_none() {
        bail!("--register: give the control plane to register with (--control-plane URL)");
    }
    if let (None, Some(cp), Some(token), Some(advertise)) =
        (&creds, &a.control_plane, &a.register, &a.advertise)
    {
        // A join token makes a new host of this machine, under its own id.
        let host_id = match (token.trim().starts_with("hjoin-"), &a.host_id) {
            (false, _) => None,
            (true, Some(id)) => Some(id.clone()),
            (true, None) => Some(kept_host_id(data_dir)?),
        };
        let c = register(cp, token, advertise, data_dir, host_id).await?;
        save_credentials(data_dir, &c)?;
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
            let (tls, slot) = wrenn_pki::AgentIdentity {
                cert_pem: c.cert_pem.clone(),
                key_pem: c.key_pem.clone(),
                client_ca_pem: c.ca_cert_pem.clone(),
            }
            .rotating_server_config()
            .context("the agent's certificate")?;
            tokio::spawn(renew_certificates(data_dir.to_path_buf(), c.clone(), slot));
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
    // Its capsules outlive a crash of the agent: a restart takes them over.
    let local = Arc::new(start_host(data_dir, a.host, &host_id, true).await?);
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
