//! Notification channels: a team's lifecycle events, sent to a webhook or a chat
//! service's incoming webhook as they happen.
//!
//! The dispatcher subscribes to the server's [`EventBus`](crate::events::EventBus) and
//! turns the events channels care about (`capsule.created`, `.running`, `.paused`,
//! `.destroyed`, `template.snapshot.created`, `.deleted`, and `host.up` / `host.down`
//! of the team's own hosts) into rows of the deliveries
//! outbox, one per subscribed channel. Workers of any server claim due deliveries
//! (a lease, so two servers never send one at once), send them and record what
//! happened; a failed attempt is retried with exponential backoff until the attempts
//! run out. Webhooks are signed: `X-Wrenn-Signature: sha256=<hex HMAC-SHA256(secret,
//! timestamp + "." + body)>`, with `X-Wrenn-Timestamp` (RFC 3339) and `X-Wrenn-Delivery`
//! (the delivery's id, the same on every retry).
//!
//! Receivers are reached over HTTP/1.1, with a 10 s limit and no redirects, only at
//! public addresses unless the server allows private ones
//! (`--channels-allow-private-addresses`): the name is resolved here and the connection
//! goes to the checked address, so a channel cannot be used to reach the control
//! plane's own network.

use crate::events::Event;
use crate::state::AppState;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use serde::Serialize;
use serde_json::Value;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use wrenn_core::addr::is_public;
use wrenn_db::{Attempt, Channel, Delivery};

/// The event types a channel may receive.
pub const EVENT_TYPES: &[&str] = &[
    "capsule.created",
    "capsule.running",
    "capsule.paused",
    "capsule.destroyed",
    "template.snapshot.created",
    "template.snapshot.deleted",
    "host.up",
    "host.down",
];

/// How channels are served.
#[derive(Clone, Debug)]
pub struct ChannelConfig {
    /// Receivers may be at loopback, private and link-local addresses.
    pub allow_private: bool,
    /// Attempts per delivery (the first included).
    pub max_attempts: u32,
    /// Wait before the first retry; doubled for each further one (at most 10 min).
    pub retry_base: Duration,
    /// Limit of one attempt (connect, send, answer).
    pub timeout: Duration,
    /// Deliveries sent at once by this server.
    pub workers: usize,
}

impl Default for ChannelConfig {
    fn default() -> Self {
        ChannelConfig {
            allow_private: false,
            max_attempts: 5,
            retry_base: Duration::from_secs(2),
            timeout: Duration::from_secs(10),
            workers: 4,
        }
    }
}

/// A channel's provider: where and how its messages go.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Provider {
    /// Any HTTP endpoint: the event's JSON, signed.
    Webhook,
    /// Incoming webhooks of chat services: a line of text.
    Slack,
    Discord,
    Teams,
    GoogleChat,
}

impl Provider {
    pub fn parse(s: &str) -> Result<Self, String> {
        Ok(match s {
            "webhook" => Provider::Webhook,
            "slack" => Provider::Slack,
            "discord" => Provider::Discord,
            "teams" => Provider::Teams,
            "googlechat" => Provider::GoogleChat,
            "telegram" | "matrix" => {
                return Err(format!(
                    "provider {s} is not supported by this server \
                     (supported: webhook, slack, discord, teams, googlechat)"
                ))
            }
            other => {
                return Err(format!(
                    "unknown provider {other:?} (webhook, slack, discord, teams or googlechat)"
                ))
            }
        })
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Provider::Webhook => "webhook",
            Provider::Slack => "slack",
            Provider::Discord => "discord",
            Provider::Teams => "teams",
            Provider::GoogleChat => "googlechat",
        }
    }
}

/// A channel's settings, as stored (sealed) and used.
#[derive(Clone, Debug, PartialEq, Eq, serde::Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    pub url: String,
    /// The webhook signing secret.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret: Option<String>,
}

/// Shortest signing secret accepted.
const MIN_SECRET: usize = 16;

impl Settings {
    /// Checks `config` for `provider`; a webhook without a secret gets a new one.
    pub fn parse(provider: Provider, config: &Value) -> Result<Settings, String> {
        let mut s: Settings = serde_json::from_value(config.clone()).map_err(|e| {
            format!("config: {e} (expected {{\"url\": …}} and, for webhooks, \"secret\")")
        })?;
        url_parts(&s.url)?;
        match (provider, &s.secret) {
            (Provider::Webhook, None) => {
                s.secret = Some(format!("whsec_{:032x}", rand::random::<u128>()));
            }
            (Provider::Webhook, Some(secret)) if secret.len() < MIN_SECRET => {
                return Err(format!(
                    "config.secret: at least {MIN_SECRET} characters, got {}",
                    secret.len()
                ))
            }
            (Provider::Webhook, Some(_)) => {}
            (_, Some(_)) => {
                return Err(format!(
                    "config.secret: {} channels are not signed",
                    provider.as_str()
                ))
            }
            (_, None) => {}
        }
        Ok(s)
    }

    /// What the API shows of them: the URL's scheme and host (its path and query may
    /// hold a chat service's token); never the secret.
    pub fn redacted(&self) -> Value {
        let shown = match url_parts(&self.url) {
            Ok(u) if u.rest.is_empty() => format!("{}://{}", u.scheme, u.authority),
            Ok(u) => format!("{}://{}/…", u.scheme, u.authority),
            Err(_) => "…".into(),
        };
        serde_json::json!({ "url": shown })
    }
}

/// An http(s) URL taken apart (only what sending needs).
#[derive(Debug, PartialEq, Eq)]
struct UrlParts {
    scheme: String,
    /// `host[:port]` as written.
    authority: String,
    host: String,
    port: u16,
    /// Path and query (`/` when empty).
    rest: String,
}

fn url_parts(url: &str) -> Result<UrlParts, String> {
    let bad = |why: &str| format!("config.url: {url:?} {why}");
    let (scheme, after) = url.split_once("://").ok_or_else(|| bad("is not a URL"))?;
    let scheme = scheme.to_ascii_lowercase();
    if scheme != "https" && scheme != "http" {
        return Err(bad("is not an http(s) URL"));
    }
    let (authority, rest) = match after.find(['/', '?', '#']) {
        Some(i) => after.split_at(i),
        None => (after, ""),
    };
    if authority.contains('@') {
        return Err(bad("has credentials in it"));
    }
    let rest = rest.split('#').next().unwrap_or_default();
    let default_port = if scheme == "https" { 443 } else { 80 };
    let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
        let (h, p) = v6
            .split_once(']')
            .ok_or_else(|| bad("has a bad IPv6 host"))?;
        (h.to_string(), p.strip_prefix(':').unwrap_or(""))
    } else {
        match authority.rsplit_once(':') {
            Some((h, p)) => (h.to_string(), p),
            None => (authority.to_string(), ""),
        }
    };
    let port = if port.is_empty() {
        default_port
    } else {
        port.parse().map_err(|_| bad("has a bad port"))?
    };
    if host.is_empty() || port == 0 {
        return Err(bad("has no host"));
    }
    Ok(UrlParts {
        scheme,
        authority: authority.to_string(),
        host: host.to_ascii_lowercase(),
        port,
        rest: if rest.is_empty() {
            "/".into()
        } else if rest.starts_with('?') {
            format!("/{rest}")
        } else {
            rest.to_string()
        },
    })
}

/// The addresses `host:port` may be reached at under this server's policy.
async fn resolve(host: &str, port: u16, allow_private: bool) -> Result<Vec<SocketAddr>, String> {
    let addrs: Vec<SocketAddr> = tokio::net::lookup_host((host, port))
        .await
        .map_err(|e| format!("cannot resolve {host}: {e}"))?
        .collect();
    let allowed: Vec<SocketAddr> = addrs
        .iter()
        .copied()
        .filter(|a| allow_private || is_public(a.ip()))
        .collect();
    if allowed.is_empty() {
        return Err(format!(
            "{host} is not a public address ({}); this server sends channels only to \
             public ones (--channels-allow-private-addresses)",
            addrs
                .iter()
                .map(|a| a.ip().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        ));
    }
    Ok(allowed)
}

/// Checks that a receiver URL may be used under `config`'s policy (what sending
/// would find out, said when the channel is made).
pub async fn check_url(url: &str, config: &ChannelConfig) -> Result<(), String> {
    let u = url_parts(url)?;
    resolve(&u.host, u.port, config.allow_private)
        .await
        .map(|_| ())
}

/// One event as channels send it.
#[derive(Clone, Debug, Serialize)]
pub struct Payload {
    /// A channel event type, or `channel.test`.
    #[serde(rename = "type")]
    pub kind: String,
    pub team_id: String,
    pub timestamp: chrono::DateTime<chrono::Utc>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub resource: Option<crate::events::EventResource>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub actor: Option<crate::events::EventActor>,
    /// Event-specific context (`from` and `to` of a state change).
    pub metadata: std::collections::BTreeMap<String, String>,
}

/// The channel event types a bus event is (none, or more than one: a capsule is
/// recorded running when its create succeeds).
pub fn channel_events(e: &Event) -> &'static [&'static str] {
    let ok = e.outcome.as_deref() == Some("success");
    match e.event.as_str() {
        "capsule.create" if ok => &["capsule.created", "capsule.running"],
        "capsule.state.changed" => match e.metadata.get("to").map(String::as_str) {
            Some("running") => &["capsule.running"],
            Some("paused") => &["capsule.paused"],
            Some("stopped") => &["capsule.destroyed"],
            _ => &[],
        },
        "template.snapshot.create" if ok => &["template.snapshot.created"],
        "template.snapshot.delete" if ok => &["template.snapshot.deleted"],
        "host.up" => &["host.up"],
        "host.down" => &["host.down"],
        _ => &[],
    }
}

impl Payload {
    fn of(kind: &str, e: &Event) -> Self {
        Payload {
            kind: kind.to_string(),
            team_id: e.team_id.clone(),
            timestamp: e.timestamp,
            resource: e.resource.clone(),
            actor: e.actor.clone(),
            metadata: e.metadata.clone(),
        }
    }

    /// A test message of team `team_id`.
    pub fn test(team_id: &str) -> Self {
        Payload {
            kind: "channel.test".into(),
            team_id: team_id.to_string(),
            timestamp: chrono::Utc::now(),
            resource: None,
            actor: None,
            metadata: Default::default(),
        }
    }
}

/// The line chat services show for a payload.
fn text_of(p: &Value) -> String {
    let kind = p["type"].as_str().unwrap_or("event");
    if kind == "channel.test" {
        return "Wrenn: this channel works.".into();
    }
    let what = match (p["resource"]["type"].as_str(), p["resource"]["id"].as_str()) {
        (Some(t), Some(id)) => format!("{t} {id}"),
        _ => kind.to_string(),
    };
    let verb = kind.rsplit('.').next().unwrap_or(kind);
    format!("Wrenn: {what} {verb}")
}

/// The body sent to `provider` for `payload` (the stored JSON).
fn body_for(provider: Provider, payload: &str) -> Result<String, String> {
    if provider == Provider::Webhook {
        return Ok(payload.to_string());
    }
    let p: Value = serde_json::from_str(payload).map_err(|e| format!("payload: {e}"))?;
    let text = text_of(&p);
    let body = match provider {
        Provider::Discord => serde_json::json!({ "content": text }),
        _ => serde_json::json!({ "text": text }),
    };
    Ok(body.to_string())
}

/// `sha256=<hex>` of HMAC-SHA256(`secret`, `timestamp.body`).
pub fn signature(secret: &str, timestamp: &str, body: &str) -> String {
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, secret.as_bytes());
    let mut ctx = ring::hmac::Context::with_key(&key);
    ctx.update(timestamp.as_bytes());
    ctx.update(b".");
    ctx.update(body.as_bytes());
    let tag = ctx.sign();
    let hex: String = tag.as_ref().iter().map(|b| format!("{b:02x}")).collect();
    format!("sha256={hex}")
}

/// How one attempt ended: the receiver's status (2xx is delivered), or why there was
/// none.
#[derive(Clone, Debug, Serialize, utoipa::ToSchema)]
pub struct SendResult {
    pub ok: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub status: Option<u16>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

fn tls_config() -> Arc<rustls::ClientConfig> {
    static CONFIG: std::sync::OnceLock<Arc<rustls::ClientConfig>> = std::sync::OnceLock::new();
    CONFIG
        .get_or_init(|| {
            let roots =
                rustls::RootCertStore::from_iter(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
            // ring, as the cluster's TLS uses: the post-quantum key exchange only
            // aws-lc-rs offers is not needed to post a webhook.
            #[allow(deprecated)]
            let provider = Arc::new(rustls::crypto::ring::default_provider());
            let config = rustls::ClientConfig::builder_with_provider(provider)
                .with_safe_default_protocol_versions()
                .map(|b| b.with_root_certificates(roots).with_no_client_auth());
            match config {
                Ok(c) => Arc::new(c),
                // The ring provider supports the default versions; never reached.
                Err(e) => unreachable!("TLS client config: {e}"),
            }
        })
        .clone()
}

/// Sends `body` to `url` (POST, JSON) with `headers`, under `config`'s policy.
async fn post(
    url: &str,
    headers: &[(&str, String)],
    body: String,
    config: &ChannelConfig,
) -> SendResult {
    let fail = |e: String| SendResult {
        ok: false,
        status: None,
        error: Some(e),
    };
    let attempt = async {
        let u = url_parts(url)?;
        let addrs = resolve(&u.host, u.port, config.allow_private).await?;
        let mut last = String::new();
        let mut stream = None;
        for a in addrs {
            match tokio::net::TcpStream::connect(a).await {
                Ok(s) => {
                    stream = Some(s);
                    break;
                }
                Err(e) => last = format!("connecting to {a}: {e}"),
            }
        }
        let stream = stream.ok_or(last)?;
        let mut req = hyper::Request::post(u.rest.as_str())
            .header(hyper::header::HOST, u.authority.as_str())
            .header(hyper::header::CONTENT_TYPE, "application/json")
            .header(
                hyper::header::USER_AGENT,
                concat!("wrenn/", env!("CARGO_PKG_VERSION")),
            );
        for (k, v) in headers {
            req = req.header(*k, v.as_str());
        }
        let req = req
            .body(Full::new(Bytes::from(body)))
            .map_err(|e| format!("request: {e}"))?;
        let status = if u.scheme == "https" {
            let name = rustls::pki_types::ServerName::try_from(u.host.clone())
                .map_err(|e| format!("{}: {e}", u.host))?;
            let tls = tokio_rustls::TlsConnector::from(tls_config())
                .connect(name, stream)
                .await
                .map_err(|e| format!("TLS with {}: {e}", u.host))?;
            send_on(tls, req).await?
        } else {
            send_on(stream, req).await?
        };
        Ok::<u16, String>(status)
    };
    match tokio::time::timeout(config.timeout, attempt).await {
        Ok(Ok(status)) => SendResult {
            ok: (200..300).contains(&status),
            status: Some(status),
            error: (!(200..300).contains(&status))
                .then(|| format!("the receiver answered {status}")),
        },
        Ok(Err(e)) => fail(e),
        Err(_) => fail(format!("no answer within {} s", config.timeout.as_secs())),
    }
}

async fn send_on<S>(io: S, req: hyper::Request<Full<Bytes>>) -> Result<u16, String>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(io))
            .await
            .map_err(|e| format!("HTTP: {e}"))?;
    let conn = tokio::spawn(conn);
    let res = sender
        .send_request(req)
        .await
        .map_err(|e| format!("HTTP: {e}"));
    let status = match res {
        Ok(r) => {
            let status = r.status().as_u16();
            // The answer's body is read and dropped (bounded by the attempt's limit).
            let _ = r.into_body().collect().await;
            Ok(status)
        }
        Err(e) => Err(e),
    };
    conn.abort();
    status
}

/// Sends `payload` (the stored JSON) through `provider` with `settings`; `delivery`
/// names the delivery in the webhook's headers.
pub async fn send(
    provider: Provider,
    settings: &Settings,
    delivery: &str,
    payload: &str,
    config: &ChannelConfig,
) -> SendResult {
    let body = match body_for(provider, payload) {
        Ok(b) => b,
        Err(e) => {
            return SendResult {
                ok: false,
                status: None,
                error: Some(e),
            }
        }
    };
    let mut headers = Vec::new();
    if let (Provider::Webhook, Some(secret)) = (provider, &settings.secret) {
        let timestamp = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
        let kind = serde_json::from_str::<Value>(payload)
            .ok()
            .and_then(|p| p["type"].as_str().map(str::to_string))
            .unwrap_or_default();
        headers.push(("X-Wrenn-Signature", signature(secret, &timestamp, &body)));
        headers.push(("X-Wrenn-Timestamp", timestamp));
        headers.push(("X-Wrenn-Delivery", delivery.to_string()));
        headers.push(("X-Wrenn-Event", kind));
    }
    post(&settings.url, &headers, body, config).await
}

/// The settings of a stored channel.
pub fn open(st: &AppState, c: &Channel) -> Result<(Provider, Settings), String> {
    let provider = Provider::parse(&c.provider)?;
    let clear = st
        .channel_sealer
        .open(&c.id, &c.config)
        .map_err(|e| e.to_string())?;
    let settings: Settings = serde_json::from_str(&clear).map_err(|e| e.to_string())?;
    Ok((provider, settings))
}

/// When attempt `attempts` (1-based, just failed) is retried, if it is.
fn retry_at(config: &ChannelConfig, attempts: u32) -> Option<wrenn_db::Timestamp> {
    if attempts >= config.max_attempts {
        return None;
    }
    let wait = config
        .retry_base
        .saturating_mul(1 << attempts.saturating_sub(1).min(16))
        .min(Duration::from_secs(600));
    Some(chrono::Utc::now() + chrono::Duration::from_std(wait).unwrap_or_default())
}

/// Sends one claimed delivery and records the attempt.
async fn deliver(st: &AppState, d: Delivery, c: Channel) {
    let config = &st.config.channels;
    let result = match open(st, &c) {
        Ok((provider, settings)) => send(provider, &settings, &d.id, &d.payload, config).await,
        Err(e) => SendResult {
            ok: false,
            status: None,
            error: Some(format!("channel settings: {e}")),
        },
    };
    let attempts = d.attempts + 1;
    let retry = if result.ok {
        None
    } else {
        retry_at(config, attempts)
    };
    if !result.ok {
        tracing::info!(delivery = %d.id, channel = %c.id, attempts, error = ?result.error,
            retry = retry.is_some(), "channel delivery failed");
    }
    let recorded = st
        .db
        .record_attempt(
            &d.id,
            Attempt {
                ok: result.ok,
                status: result.status,
                error: result.error,
                retry_at: retry,
            },
        )
        .await;
    if let Err(e) = recorded {
        tracing::warn!(delivery = %d.id, error = %e, "delivery attempt not recorded");
    }
}

/// Finished deliveries are kept this long.
const KEEP_DELIVERIES: chrono::Duration = chrono::Duration::days(7);

/// Starts the dispatcher: events into deliveries, and the workers that send them.
pub fn spawn(st: Arc<AppState>) -> tokio::task::JoinHandle<()> {
    let wake = Arc::new(tokio::sync::Notify::new());
    let (mut rx, _closed) = st.events.subscribe();
    let queue = {
        let (st, wake) = (st.clone(), wake.clone());
        async move {
            loop {
                let e = match rx.recv().await {
                    Ok(e) => e,
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                        tracing::warn!(skipped = n, "channel dispatcher fell behind the events");
                        continue;
                    }
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
                };
                for &kind in channel_events(&e) {
                    let Ok(payload) = serde_json::to_string(&Payload::of(kind, &e)) else {
                        continue;
                    };
                    match st.db.queue_deliveries(&e.team_id, kind, &payload).await {
                        Ok(q) if !q.is_empty() => wake.notify_one(),
                        Ok(_) => {}
                        Err(err) => {
                            tracing::warn!(team = %e.team_id, event = kind, error = %err,
                                "channel deliveries not queued")
                        }
                    }
                }
            }
        }
    };
    let send = async move {
        let slots = Arc::new(tokio::sync::Semaphore::new(
            st.config.channels.workers.max(1),
        ));
        let lease = st.config.channels.timeout * 3;
        let mut swept = std::time::Instant::now();
        loop {
            let Ok(permit) = slots.clone().acquire_owned().await else {
                return;
            };
            match st.db.claim_delivery(lease).await {
                Ok(Some((d, c))) => {
                    let st = st.clone();
                    tokio::spawn(async move {
                        deliver(&st, d, c).await;
                        drop(permit);
                    });
                    continue;
                }
                Ok(None) => {}
                Err(e) => tracing::warn!(error = %e, "claiming a channel delivery"),
            }
            drop(permit);
            if swept.elapsed() > Duration::from_secs(3600) {
                swept = std::time::Instant::now();
                let _ = st
                    .db
                    .expire_deliveries(chrono::Utc::now() - KEEP_DELIVERIES)
                    .await;
            }
            // Retries come due and other servers queue deliveries: look again soon.
            let _ = tokio::time::timeout(Duration::from_secs(1), wake.notified()).await;
        }
    };
    tokio::spawn(async move {
        tokio::join!(queue, send);
    })
}

/// The settings of a new or replaced channel config, checked (a webhook without a
/// secret gets one).
pub async fn prepare(
    st: &AppState,
    provider: Provider,
    config: &Value,
) -> Result<Settings, String> {
    let settings = Settings::parse(provider, config)?;
    check_url(&settings.url, &st.config.channels).await?;
    Ok(settings)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_split_and_redact() {
        let u = url_parts("https://hooks.example.com/services/T0/B0/secret?x=1").unwrap();
        assert_eq!(
            (u.host.as_str(), u.port, u.rest.as_str()),
            ("hooks.example.com", 443, "/services/T0/B0/secret?x=1")
        );
        let u = url_parts("http://[::1]:8080").unwrap();
        assert_eq!(
            (u.host.as_str(), u.port, u.rest.as_str()),
            ("::1", 8080, "/")
        );
        assert!(url_parts("https://user:pw@example.com/").is_err());
        assert!(url_parts("example.com").is_err());
        assert!(url_parts("https://example.com:99999/").is_err());
        let s = Settings {
            url: "https://hooks.example.com/services/T0/B0/secret".into(),
            secret: None,
        };
        assert_eq!(s.redacted()["url"], "https://hooks.example.com/…");
    }

    #[test]
    fn settings_are_checked_per_provider() {
        let s = Settings::parse(
            Provider::Webhook,
            &serde_json::json!({"url": "https://x.test/h"}),
        )
        .unwrap();
        assert!(s.secret.as_deref().is_some_and(|k| k.starts_with("whsec_")));
        assert!(Settings::parse(
            Provider::Webhook,
            &serde_json::json!({"url": "https://x.test/h", "secret": "short"})
        )
        .is_err());
        assert!(Settings::parse(
            Provider::Slack,
            &serde_json::json!({"url": "https://x.test/h", "secret": "0123456789abcdef"})
        )
        .is_err());
        assert!(Settings::parse(Provider::Slack, &serde_json::json!({"url": "ftp://x/"})).is_err());
        assert!(Settings::parse(
            Provider::Slack,
            &serde_json::json!({"url": "https://x/", "x": 1})
        )
        .is_err());
        assert!(Provider::parse("telegram")
            .unwrap_err()
            .contains("not supported"));
    }

    #[test]
    fn signatures_are_hmac_of_timestamp_and_body() {
        let a = signature("whsec_1", "2026-01-01T00:00:00.000Z", "{}");
        assert_eq!(a, signature("whsec_1", "2026-01-01T00:00:00.000Z", "{}"));
        assert_ne!(a, signature("whsec_2", "2026-01-01T00:00:00.000Z", "{}"));
        assert_ne!(a, signature("whsec_1", "2026-01-01T00:00:00.001Z", "{}"));
        // Known answer: HMAC-SHA256("key", "a.b").
        assert_eq!(
            signature("key", "a", "b"),
            "sha256=dd17e3f2c79de32e3f3fa66503e34c711b58d419eb910f5e29d1505ce73aae08"
        );
    }

    #[test]
    fn retries_back_off_and_stop() {
        let c = ChannelConfig {
            max_attempts: 3,
            retry_base: Duration::from_secs(1),
            ..Default::default()
        };
        let now = chrono::Utc::now();
        let first = retry_at(&c, 1).unwrap() - now;
        let second = retry_at(&c, 2).unwrap() - now;
        assert!(first.num_milliseconds() >= 900 && first.num_milliseconds() < 1500);
        assert!(second.num_milliseconds() >= 1900 && second.num_milliseconds() < 2500);
        assert!(retry_at(&c, 3).is_none());
    }

    #[test]
    fn chat_providers_get_a_line() {
        let p = serde_json::json!({"type": "capsule.paused", "resource": {"type": "capsule", "id": "cl-1"}});
        let body = body_for(Provider::Slack, &p.to_string()).unwrap();
        assert_eq!(body, r#"{"text":"Wrenn: capsule cl-1 paused"}"#);
        let body = body_for(Provider::Discord, &p.to_string()).unwrap();
        assert_eq!(body, r#"{"content":"Wrenn: capsule cl-1 paused"}"#);
        assert_eq!(body_for(Provider::Webhook, "{}").unwrap(), "{}");
    }
}
