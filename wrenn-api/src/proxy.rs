//! Reverse proxy into capsules: `{port}-{capsule}.{domain}` Host names and E2B's
//! `E2b-Sandbox-Id` / `E2b-Sandbox-Port` headers reach any TCP port of a running
//! capsule over HTTP, streaming bodies and passing WebSocket (and other) upgrades through.
//! The proxy asks for no credentials of its own: envd checks its own access token,
//! and guest services are public unless the capsule was created with private ports
//! (E2B's `allowPublicTraffic: false`), whose requests must carry the capsule's
//! `e2b-traffic-access-token`. Killing or pausing a
//! capsule ends everything in flight to it at once ([`LiveStreams`]).

use crate::agent::HostAgent;
use crate::error::{ApiError, E2bError};
use crate::state::AppState;
use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode, Uri};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use futures_util::future::BoxFuture;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use wrenn_core::host::{GuestStream, HostErrorKind};
use wrenn_core::id::CapsuleId;
use wrenn_core::status::CapsuleStatus;
use wrenn_envd::dial::{Dial, DialConnector};

mod ending;
pub use ending::{LiveStreams, Reason as EndReason};

/// Where a proxied request goes.
#[derive(Debug, PartialEq, Eq)]
pub struct Target {
    pub capsule: String,
    pub port: u16,
}

/// `{port}-{capsule id}.{anything}` (port stripped from the Host first).
pub fn target_from_host(host: &str) -> Option<Target> {
    let host = host.split(':').next()?;
    let label = host.split('.').next()?;
    if label.len() == host.len() {
        return None;
    }
    let (port, id) = label.split_once('-')?;
    if port.is_empty() || !port.bytes().all(|b| b.is_ascii_digit()) || !id.starts_with("cl-") {
        return None;
    }
    Some(Target {
        capsule: id.to_string(),
        port: port.parse().ok()?,
    })
}

fn target_from_headers(h: &HeaderMap) -> Option<Result<Target, ApiError>> {
    let id = h.get("e2b-sandbox-id")?.to_str().ok()?.to_string();
    let port = match h.get("e2b-sandbox-port") {
        None => Ok(49983),
        Some(p) => p
            .to_str()
            .ok()
            .and_then(|p| p.parse::<u16>().ok())
            .ok_or_else(|| ApiError::invalid("E2b-Sandbox-Port must be a TCP port")),
    };
    Some(port.map(|port| Target { capsule: id, port }))
}

/// The pooled HTTP client of the proxy.
pub type ProxyClient = Client<DialConnector, Body>;

/// Where the proxy's connections go. A connection's name is
/// `{capsule id}-{epoch}.capsule` and pooled connections are keyed by name, so they
/// are never reused for the same capsule after a pause (its guest would reset them: a
/// spurious 502); each name leads to its capsule, opened by the capsule's host agent.
#[derive(Clone, Debug)]
pub struct ProxyRoutes(moka::sync::Cache<String, (Arc<dyn HostAgent>, CapsuleId)>);

impl Default for ProxyRoutes {
    fn default() -> Self {
        ProxyRoutes(
            moka::sync::Cache::builder()
                .max_capacity(100_000)
                .time_to_idle(Duration::from_secs(600))
                .build(),
        )
    }
}

impl ProxyRoutes {
    /// The name of connections to `capsule` in its `epoch`, routed to `agent`.
    fn route(&self, capsule: &CapsuleId, epoch: u64, agent: &Arc<dyn HostAgent>) -> String {
        let name = format!("{capsule}-{epoch}.capsule");
        self.0
            .entry(name.clone())
            .or_insert_with(|| (agent.clone(), capsule.clone()));
        name
    }
}

impl Dial for ProxyRoutes {
    fn dial(&self, uri: &Uri) -> BoxFuture<'static, std::io::Result<GuestStream>> {
        let route = uri.host().and_then(|h| self.0.get(h));
        let port = uri.port_u16();
        Box::pin(async move {
            let ((agent, id), Some(port)) = (
                route.ok_or_else(|| {
                    std::io::Error::new(std::io::ErrorKind::NotFound, "no route to that capsule")
                })?,
                port,
            ) else {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::InvalidInput,
                    "no port in the URI",
                ));
            };
            agent.open(&id, port).await.map_err(std::io::Error::other)
        })
    }
}

/// The proxy's client and the routes its connections take.
pub fn client() -> (ProxyClient, ProxyRoutes) {
    let routes = ProxyRoutes::default();
    let client = Client::builder(TokioExecutor::new())
        .pool_idle_timeout(Duration::from_secs(30))
        .build(DialConnector::new(Arc::new(routes.clone())));
    (client, routes)
}

/// Middleware: proxies requests addressed to a capsule, passes the rest on.
pub async fn layer(State(st): State<Arc<AppState>>, req: Request, next: Next) -> Response {
    let (target, by_headers) = match target_from_headers(req.headers()) {
        Some(Ok(t)) => (Some(t), true),
        Some(Err(e)) => return closing(e.into_response()),
        None => (
            req.headers()
                .get(header::HOST)
                .and_then(|h| h.to_str().ok())
                .and_then(target_from_host),
            false,
        ),
    };
    match target {
        Some(t) => {
            let (capsule, port) = (t.capsule.clone(), t.port);
            match proxy(&st, t, req).await {
                Ok(r) => r,
                Err(e) if by_headers => closing(e2b_unavailable(&capsule, port, e).into_response()),
                Err(e) => closing(e.into_response()),
            }
        }
        None => next.run(req).await,
    }
}

/// An answer given without reading the request body (which may be a stream the client
/// is still sending): the connection cannot serve another request, so say it closes, or
/// the client reuses it and its next request fails with a broken pipe.
fn closing(mut resp: Response) -> Response {
    resp.headers_mut()
        .insert(header::CONNECTION, HeaderValue::from_static("close"));
    resp
}

/// Errors for E2B's header-routed (SDK) traffic as E2B's proxy gives them: 502 saying
/// the sandbox "was not found" when it is not running (the SDK then reports it killed or
/// timed out, and `is_running()` is false), 502 "port is not open" when it is running but
/// the port does not answer.
fn e2b_unavailable(capsule: &str, port: u16, e: ApiError) -> E2bError {
    let gone = format!("The sandbox {capsule} was not found");
    E2bError(match e.status {
        StatusCode::NOT_FOUND | StatusCode::CONFLICT => {
            ApiError::new(StatusCode::BAD_GATEWAY, "sandbox_not_found", gone)
        }
        StatusCode::BAD_GATEWAY => ApiError::new(
            StatusCode::BAD_GATEWAY,
            "agent_error",
            format!(
                "The sandbox {capsule} is running but port is not open (port {port}: {})",
                e.message
            ),
        ),
        _ => e,
    })
}

const HOP_BY_HOP: &[&str] = &[
    "connection",
    "keep-alive",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
];

fn strip_hop_headers(h: &mut HeaderMap) {
    for name in HOP_BY_HOP {
        h.remove(*name);
    }
    h.remove("e2b-sandbox-id");
    h.remove("e2b-sandbox-port");
}

/// The capsule, the address of its port (on its host), and the agent of its host.
async fn resolve(
    st: &AppState,
    t: &Target,
    headers: &HeaderMap,
) -> Result<(CapsuleId, SocketAddr, Arc<dyn HostAgent>), ApiError> {
    let not_found = || ApiError::not_found(&format!("capsule {}", t.capsule));
    let id = CapsuleId::parse(&t.capsule).map_err(|_| not_found())?;
    let mut c = st
        .capsule_cache
        .get(&st.db, None, id.as_str())
        .await
        .map_err(|e| {
            if e.is_not_found() {
                not_found()
            } else {
                e.into()
            }
        })?;
    if !c.public_traffic && t.port != ENVD_PORT {
        check_traffic_token(st, &c, headers).await?;
    }
    match c.status {
        CapsuleStatus::Running => {}
        CapsuleStatus::Stopped | CapsuleStatus::Error => return Err(not_found()),
        // Traffic wakes a capsule created with auto-resume.
        CapsuleStatus::Paused | CapsuleStatus::Pausing | CapsuleStatus::Resuming
            if c.auto_resume =>
        {
            c = crate::service::auto_resume(st, &c).await?;
        }
        s => {
            return Err(ApiError::invalid_state(format!(
                "capsule {} is {s}",
                t.capsule
            )))
        }
    }
    crate::service::touch(st, &c).await;
    let agent = st.agent_of(&c)?;
    let addr = agent.port(&id, t.port).await?.addr;
    Ok((id, addr, agent))
}

/// Header carrying a capsule's traffic access token (E2B's name).
pub const TRAFFIC_TOKEN_HEADER: &str = "e2b-traffic-access-token";

/// A capsule whose ports are private answers only requests carrying its traffic
/// access token (envd's port keeps its own token check).
async fn check_traffic_token(
    st: &AppState,
    c: &wrenn_db::Capsule,
    headers: &HeaderMap,
) -> Result<(), ApiError> {
    let given = headers
        .get(TRAFFIC_TOKEN_HEADER)
        .and_then(|v| v.to_str().ok())
        .ok_or_else(|| {
            ApiError::forbidden(format!(
                "capsule {} only accepts traffic with its {TRAFFIC_TOKEN_HEADER} header",
                c.id
            ))
        })?;
    let expected = crate::service::traffic_token(st, c)
        .await?
        .unwrap_or_default();
    let same = !expected.is_empty()
        && given.len() == expected.len()
        && given
            .bytes()
            .zip(expected.bytes())
            .fold(0u8, |acc, (a, b)| acc | (a ^ b))
            == 0;
    if same {
        Ok(())
    } else {
        Err(ApiError::forbidden(format!(
            "wrong {TRAFFIC_TOKEN_HEADER} for capsule {}",
            c.id
        )))
    }
}

/// Removes Wrenn's own credentials (API keys, user tokens) from a request going into a
/// capsule: the guest runs untrusted code and must not learn them. Other values of
/// these headers (the guest application's own auth) pass.
fn strip_wrenn_credentials(st: &AppState, h: &mut HeaderMap) {
    let ours = |v: &str| {
        let v = v.trim();
        wrenn_db::validate_api_key(v).is_ok() || st.jwt.signed_by_us(v)
    };
    if h.get_all("x-api-key")
        .iter()
        .any(|v| v.to_str().is_ok_and(ours))
    {
        h.remove("x-api-key");
    }
    let bearer = |v: &HeaderValue| {
        v.to_str().is_ok_and(|s| {
            let mut it = s.trim().splitn(2, ' ');
            let scheme = it.next().unwrap_or("");
            scheme.eq_ignore_ascii_case("bearer") && ours(it.next().unwrap_or(""))
        })
    };
    if h.get_all(header::AUTHORIZATION).iter().any(bearer) {
        h.remove(header::AUTHORIZATION);
    }
}

async fn proxy(st: &AppState, t: Target, mut req: Request) -> Result<Response, ApiError> {
    strip_wrenn_credentials(st, req.headers_mut());
    // Watched before the lookup: a kill or pause that comes after the lookup said
    // "running" ends this request instead of leaving it waiting on a guest that is gone.
    let mut ended = st.streams.watch(&t.capsule);
    let (id, addr, agent) = resolve(st, &t, req.headers()).await?;
    req.headers_mut().remove(TRAFFIC_TOKEN_HEADER);
    st.metrics.proxied();
    let path = req
        .uri()
        .path_and_query()
        .map(|p| p.as_str().to_string())
        .unwrap_or_else(|| "/".into());
    // The pool key names the capsule's epoch: no connection survives a pause.
    let name = st.proxy_routes.route(&id, ended.epoch(), &agent);
    let uri: Uri = format!("http://{name}:{}{path}", t.port)
        .parse()
        .map_err(|_| ApiError::invalid("bad request path"))?;
    let upgrade = req.headers().contains_key(header::UPGRADE);
    if upgrade {
        let conn = Upstream {
            agent: &agent,
            capsule: &id,
            addr,
        };
        return proxy_upgrade(conn, uri, req, ended).await;
    }
    let capped = t.port == ENVD_PORT
        && matches!(*req.method(), Method::POST | Method::PUT)
        && req.uri().path().starts_with("/files");
    let limit = st.config.upload_limit;
    if capped {
        let declared = req
            .headers()
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        // A refused upload's body is read (a bounded amount of it) first, so the
        // client gets to see the answer instead of a broken pipe.
        if let Some(n) = declared {
            if let Err(e) = agent.ensure_space(n).await {
                drain(req.body_mut()).await;
                return Err(e.into());
            }
        }
        if declared.is_some_and(|n| n > limit.saturating_add(64 * 1024)) {
            drain(req.body_mut()).await;
            return Ok(upload_too_large(limit));
        }
    }
    *req.uri_mut() = uri;
    strip_hop_headers(req.headers_mut());
    if capped {
        // Chunked uploads are cut off at the cap (plus multipart framing).
        let (parts, body) = req.into_parts();
        let limited = http_body_util::Limited::new(
            body,
            usize::try_from(limit.saturating_add(64 * 1024)).unwrap_or(usize::MAX),
        );
        req = Request::from_parts(parts, Body::new(limited));
    }
    let resp = tokio::select! {
        r = st.proxy.request(req) => r,
        why = ended.wait() => {
            return Err(ApiError::not_found(&format!("capsule {} ({why})", t.capsule)));
        }
    };
    if capped {
        if let Err(e) = &resp {
            let mut source: Option<&(dyn std::error::Error + 'static)> = Some(e);
            while let Some(err) = source {
                if err.is::<http_body_util::LengthLimitError>() {
                    return Ok(upload_too_large(limit));
                }
                source = err.source();
            }
        }
    }
    let resp = resp.map_err(|e| {
        ApiError::new(
            StatusCode::BAD_GATEWAY,
            "agent_error",
            format!("capsule port {} did not answer: {e}", t.port),
        )
    })?;
    let (mut parts, body) = resp.into_parts();
    strip_hop_headers(&mut parts.headers);
    let connect = parts
        .headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|ct| ct.starts_with("application/connect+"));
    let body = ending::CutBody::new(Body::new(body), ended, t.capsule, connect);
    Ok(Response::from_parts(parts, Body::new(body)))
}

/// The most of a refused upload that is read before answering (as envd does).
const MAX_DRAIN: u64 = 1 << 30;
/// The longest a refused upload is read before answering.
const DRAIN_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

/// envd's port: its `/files` uploads get the server's upload cap.
const ENVD_PORT: u16 = 49983;

/// 413 in envd's error shape, closing the connection (the rest of the body is not read).
fn upload_too_large(limit: u64) -> Response {
    let mut resp = (
        StatusCode::PAYLOAD_TOO_LARGE,
        axum::Json(serde_json::json!({
            "code": 413,
            "message": format!("upload exceeds the limit of {limit} bytes"),
        })),
    )
        .into_response();
    resp.headers_mut()
        .insert(header::CONNECTION, HeaderValue::from_static("close"));
    resp
}

/// The capsule port an upgraded request goes to.
struct Upstream<'a> {
    agent: &'a Arc<dyn HostAgent>,
    capsule: &'a CapsuleId,
    /// Its address on the host (the request's `Host` when it has none).
    addr: SocketAddr,
}

/// Upgrades (WebSocket and the like): one dedicated connection, then raw bytes both ways.
async fn proxy_upgrade(
    up: Upstream<'_>,
    uri: Uri,
    mut req: Request,
    mut ended: ending::Ended,
) -> Result<Response, ApiError> {
    let addr = up.addr;
    let bad_gateway = |e: &dyn std::fmt::Display| {
        ApiError::new(
            StatusCode::BAD_GATEWAY,
            "agent_error",
            format!("capsule port {} did not answer: {e}", addr.port()),
        )
    };
    let stream = up
        .agent
        .open(up.capsule, addr.port())
        .await
        .map_err(|e| match e.kind {
            HostErrorKind::Guest => {
                ApiError::new(StatusCode::BAD_GATEWAY, "agent_error", e.message)
            }
            _ => e.into(),
        })?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| bad_gateway(&e))?;
    tokio::spawn(async move {
        if let Err(e) = conn.with_upgrades().await {
            tracing::debug!(error = %e, "proxied upgrade connection ended");
        }
    });
    let client_upgrade = hyper::upgrade::on(&mut req);
    let (mut parts, body) = req.into_parts();
    parts.uri = uri.path_and_query().map_or_else(
        || Uri::from_static("/"),
        |p| Uri::try_from(p.as_str()).unwrap_or_else(|_| Uri::from_static("/")),
    );
    parts.headers.remove("e2b-sandbox-id");
    parts.headers.remove("e2b-sandbox-port");
    if let Ok(v) = HeaderValue::from_str(&addr.to_string()) {
        parts.headers.entry(header::HOST).or_insert(v);
    }
    let out = hyper::Request::from_parts(parts, body);
    let mut resp = sender
        .send_request(out)
        .await
        .map_err(|e| bad_gateway(&e))?;
    if resp.status() == StatusCode::SWITCHING_PROTOCOLS {
        let server_upgrade = hyper::upgrade::on(&mut resp);
        tokio::spawn(async move {
            let (Ok(a), Ok(b)) = (client_upgrade.await, server_upgrade.await) else {
                return;
            };
            let mut a = TokioIo::new(a);
            let mut b = TokioIo::new(b);
            // Both sides are closed when the capsule is killed or paused.
            tokio::select! {
                _ = tokio::io::copy_bidirectional(&mut a, &mut b) => {}
                _ = ended.wait() => {}
            }
        });
    }
    let (parts, body) = resp.into_parts();
    Ok(Response::from_parts(parts, Body::new(body)))
}

/// Reads and drops up to [`MAX_DRAIN`] bytes (for at most [`DRAIN_TIMEOUT`]) of a
/// request body the answer refuses.
async fn drain(body: &mut Body) {
    let mut body = std::mem::take(body).into_data_stream();
    let read = async {
        let mut drained = 0u64;
        while let Some(Ok(chunk)) = futures_util::StreamExt::next(&mut body).await {
            drained += chunk.len() as u64;
            if drained > MAX_DRAIN {
                break;
            }
        }
    };
    let _ = tokio::time::timeout(DRAIN_TIMEOUT, read).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_names() {
        assert_eq!(
            target_from_host("8080-cl-abc123.example.com:3000"),
            Some(Target {
                capsule: "cl-abc123".into(),
                port: 8080
            })
        );
        assert_eq!(target_from_host("127.0.0.1:3000"), None);
        assert_eq!(target_from_host("api.example.com"), None);
        assert_eq!(target_from_host("80-xyz.example.com"), None);
        assert_eq!(target_from_host("99999-cl-a.example.com"), None);
        assert_eq!(target_from_host("8080-cl-abc"), None);
    }
}
