//! Host discovery for `wrenn serve`: which registered hosts' agents to drive and where
//! (`--discovery`). Registration in the database is the default; a static list and the
//! pods of a Kubernetes DaemonSet are the others.

use anyhow::{bail, Context, Result};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use wrenn::scheduler::HostId;
use wrenn_api::cluster::{Found, HostDiscovery, RegisteredHosts, StaticHosts};

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum DiscoveryKind {
    /// The addresses hosts registered with (the `hosts` table).
    Registered,
    /// The hosts and addresses given with `--static-host ID=ADDR`.
    Static,
    /// The pods of the agents' DaemonSet, found through the Kubernetes API: a pod's
    /// node name is its host's id, its IP (host networking) and `--k8s-agent-port`
    /// where its agent listens.
    Kubernetes,
}

#[derive(Debug, clap::Args)]
pub struct DiscoveryArgs {
    /// How the control plane finds the agents of registered hosts.
    #[arg(long, env = "WRENN_DISCOVERY", value_enum, default_value_t = DiscoveryKind::Registered)]
    discovery: DiscoveryKind,
    /// With `--discovery static`: a registered host and where its agent is
    /// (`ID=HOST:PORT`), repeated or comma-separated.
    #[arg(long = "static-host", env = "WRENN_STATIC_HOSTS", value_delimiter = ',', value_parser = parse_static)]
    static_hosts: Vec<Found>,
    /// With `--discovery kubernetes`: the API server (default: in-cluster, from
    /// KUBERNETES_SERVICE_HOST/PORT; `http://127.0.0.1:8001` for `kubectl proxy` — plain
    /// HTTP only to loopback addresses).
    #[arg(long, env = "WRENN_K8S_API")]
    k8s_api: Option<String>,
    /// Namespace of the agents' pods (default: the service account's).
    #[arg(long, env = "WRENN_K8S_NAMESPACE")]
    k8s_namespace: Option<String>,
    /// Label selector of the agents' pods.
    #[arg(
        long,
        env = "WRENN_K8S_AGENT_SELECTOR",
        default_value = "app.kubernetes.io/name=wrenn-agent"
    )]
    k8s_agent_selector: String,
    /// Port the agents listen on (their `--advertise` port).
    #[arg(long, env = "WRENN_K8S_AGENT_PORT", default_value_t = 7070)]
    k8s_agent_port: u16,
    /// Bearer token file for the API server (default: the service account's, if any;
    /// read again at every listing, as projected tokens rotate).
    #[arg(long, env = "WRENN_K8S_TOKEN_FILE")]
    k8s_token_file: Option<PathBuf>,
}

fn parse_static(s: &str) -> Result<Found, String> {
    let (id, address) = s
        .split_once('=')
        .ok_or_else(|| format!("{s:?}: expected ID=HOST:PORT"))?;
    let id = HostId::parse(id)?;
    if address
        .rsplit_once(':')
        .is_none_or(|(_, p)| p.parse::<u16>().is_err())
    {
        return Err(format!("{s:?}: expected ID=HOST:PORT"));
    }
    Ok(Found {
        id,
        address: address.to_string(),
    })
}

const SERVICE_ACCOUNT: &str = "/var/run/secrets/kubernetes.io/serviceaccount";

impl DiscoveryArgs {
    pub fn build(self) -> Result<Arc<dyn HostDiscovery>> {
        if self.discovery != DiscoveryKind::Static && !self.static_hosts.is_empty() {
            bail!("--static-host is for --discovery static");
        }
        Ok(match self.discovery {
            DiscoveryKind::Registered => Arc::new(RegisteredHosts),
            DiscoveryKind::Static => {
                if self.static_hosts.is_empty() {
                    bail!("--discovery static: give the hosts with --static-host ID=HOST:PORT");
                }
                Arc::new(StaticHosts(self.static_hosts))
            }
            DiscoveryKind::Kubernetes => Arc::new(KubernetesPods::new(self)?),
        })
    }
}

/// The agents of a DaemonSet, from the Kubernetes API's pod list.
#[derive(Debug)]
pub struct KubernetesPods {
    lister: Arc<PodLister>,
    /// The last listing, reused for a few seconds (the host monitor asks every tick).
    cache: Mutex<Option<(Instant, Vec<Found>)>>,
}

/// Lists the agents' pods (blocking HTTP).
struct PodLister {
    pods_url: String,
    selector: String,
    port: u16,
    token_file: Option<PathBuf>,
    http: ureq::Agent,
}

impl std::fmt::Debug for PodLister {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PodLister")
            .field("pods_url", &self.pods_url)
            .field("selector", &self.selector)
            .finish_non_exhaustive()
    }
}

/// How long a pod listing is reused.
const LISTING_TTL: Duration = Duration::from_secs(3);

impl KubernetesPods {
    fn new(a: DiscoveryArgs) -> Result<Self> {
        let sa = PathBuf::from(SERVICE_ACCOUNT);
        let api = match a.k8s_api {
            Some(api) => api.trim_end_matches('/').to_string(),
            None => {
                let host = std::env::var("KUBERNETES_SERVICE_HOST").context(
                    "--discovery kubernetes: not in a cluster (no KUBERNETES_SERVICE_HOST); \
                     give --k8s-api",
                )?;
                let port = std::env::var("KUBERNETES_SERVICE_PORT").unwrap_or("443".into());
                if host.contains(':') {
                    format!("https://[{host}]:{port}")
                } else {
                    format!("https://{host}:{port}")
                }
            }
        };
        let url = url::Url::parse(&api).with_context(|| format!("--k8s-api {api}"))?;
        let mut http = ureq::AgentBuilder::new().timeout(Duration::from_secs(10));
        match url.scheme() {
            "https" => {
                let ca = sa.join("ca.crt");
                if ca.exists() {
                    let pem = std::fs::read_to_string(&ca)
                        .with_context(|| format!("cannot read {}", ca.display()))?;
                    let tls = wrenn_pki::client_config_trusting(&pem)
                        .with_context(|| format!("{}", ca.display()))?;
                    http = http.tls_config(Arc::new(tls));
                }
            }
            "http" => {
                let loopback = match url.host() {
                    Some(url::Host::Ipv4(ip)) => ip.is_loopback(),
                    Some(url::Host::Ipv6(ip)) => ip.is_loopback(),
                    Some(url::Host::Domain(d)) => d == "localhost",
                    None => false,
                };
                if !loopback {
                    bail!(
                        "--k8s-api {api}: plain HTTP only to a loopback address (kubectl proxy); \
                         use https"
                    );
                }
            }
            other => bail!("--k8s-api {api}: unknown scheme {other}"),
        }
        let namespace = match a.k8s_namespace {
            Some(ns) => ns,
            None => std::fs::read_to_string(sa.join("namespace"))
                .map(|s| s.trim().to_string())
                .context("--k8s-namespace: not given and no service account namespace")?,
        };
        let token_file = a
            .k8s_token_file
            .or_else(|| Some(sa.join("token")).filter(|p| p.exists()));
        Ok(KubernetesPods {
            lister: Arc::new(PodLister {
                pods_url: format!("{api}/api/v1/namespaces/{namespace}/pods"),
                selector: a.k8s_agent_selector,
                port: a.k8s_agent_port,
                token_file,
                http: http.build(),
            }),
            cache: Mutex::new(None),
        })
    }
}

impl PodLister {
    /// Lists the agents' pods: each running pod with an IP and a node is a host.
    fn list(&self) -> Result<Vec<Found>> {
        let mut req = self
            .http
            .get(&self.pods_url)
            .query("labelSelector", &self.selector);
        if let Some(f) = &self.token_file {
            let token = std::fs::read_to_string(f)
                .with_context(|| format!("cannot read {}", f.display()))?;
            req = req.set("Authorization", &format!("Bearer {}", token.trim()));
        }
        let list: serde_json::Value = match req.call() {
            Ok(r) => r.into_json().context("the pod list")?,
            Err(ureq::Error::Status(code, r)) => bail!(
                "{}: {code}: {}",
                self.pods_url,
                r.into_string().unwrap_or_default()
            ),
            Err(e) => bail!("{}: {e}", self.pods_url),
        };
        let items = list["items"]
            .as_array()
            .context("the pod list has no items")?;
        let mut found = Vec::new();
        for pod in items {
            let running = pod["status"]["phase"] == "Running"
                && pod["metadata"]["deletionTimestamp"].is_null();
            let (Some(node), Some(ip)) = (
                pod["spec"]["nodeName"].as_str(),
                pod["status"]["podIP"].as_str(),
            ) else {
                continue;
            };
            let Ok(ip) = ip.parse::<std::net::IpAddr>() else {
                continue;
            };
            if !running {
                continue;
            }
            match HostId::parse(node) {
                Ok(id) => found.push(Found {
                    id,
                    address: std::net::SocketAddr::new(ip, self.port).to_string(),
                }),
                Err(e) => tracing::warn!(error = %e, "agent pod's node name is no host id"),
            }
        }
        Ok(found)
    }
}

#[async_trait::async_trait]
impl HostDiscovery for KubernetesPods {
    async fn find(&self, rows: &[wrenn_db::Host]) -> Result<Vec<Found>, String> {
        let cached = self
            .cache
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
            .filter(|(at, _)| at.elapsed() < LISTING_TTL)
            .map(|(_, f)| f.clone());
        let pods = match cached {
            Some(p) => p,
            None => {
                let lister = self.lister.clone();
                let pods = tokio::task::spawn_blocking(move || lister.list())
                    .await
                    .map_err(|e| e.to_string())?
                    .map_err(|e| format!("{e:#}"))?;
                *self.cache.lock().unwrap_or_else(|p| p.into_inner()) =
                    Some((Instant::now(), pods.clone()));
                pods
            }
        };
        // Only registered hosts: a pod is where a host is, not who it is.
        Ok(pods
            .into_iter()
            .filter(|f| {
                rows.iter()
                    .any(|h| h.id == f.id && h.cert_expires_at.is_some())
            })
            .collect())
    }
}
