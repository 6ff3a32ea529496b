//! The E2B-compatible API (`/sandboxes`, `/v2/sandboxes`, `/snapshots`, `/templates`) that
//! the official `e2b` SDK calls. Errors are E2B's `{"code": <status>, "message": …}`.

use crate::agent::{PauseMode, ResumeMode};
use crate::auth::{authenticate, Principal};
use crate::error::{ApiError, E2bError, E2bErrorBody};
use crate::service::{self, CreateParams};
use crate::state::AppState;
use axum::extract::rejection::JsonRejection;
use axum::extract::{FromRequestParts, Path, Query, State};
use axum::http::request::Parts;
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;
use utoipa::{IntoParams, ToSchema};
use wrenn_core::status::CapsuleStatus;

pub mod templates;

type S = State<Arc<AppState>>;
type R<T> = Result<T, E2bError>;

/// E2B's constant client id.
const CLIENT_ID: &str = "6532622b";
/// Longest sandbox timeout accepted (24 h, E2B Pro's maximum).
const MAX_TIMEOUT: u64 = 24 * 3600;

/// Extractor: API key (or user token) with E2B-shaped rejections.
#[derive(Debug, Clone)]
pub struct E2bAuth(pub Principal);

impl FromRequestParts<Arc<AppState>> for E2bAuth {
    type Rejection = E2bError;

    async fn from_request_parts(
        parts: &mut Parts,
        st: &Arc<AppState>,
    ) -> Result<Self, Self::Rejection> {
        authenticate(st, &parts.headers)
            .await
            .map(E2bAuth)
            .map_err(E2bError)
    }
}

/// Query string extractor with E2B-shaped 400s (axum's own rejections are plain text).
#[derive(Debug, Clone)]
pub struct E2bQuery<T>(pub T);

impl<T: serde::de::DeserializeOwned, St: Send + Sync> FromRequestParts<St> for E2bQuery<T> {
    type Rejection = E2bError;

    async fn from_request_parts(parts: &mut Parts, st: &St) -> Result<Self, Self::Rejection> {
        Query::<T>::from_request_parts(parts, st)
            .await
            .map(|Query(q)| E2bQuery(q))
            .map_err(|e| E2bError(ApiError::invalid(e.body_text())))
    }
}

fn json<T>(body: Result<Json<T>, JsonRejection>) -> R<T> {
    body.map(|Json(b)| b)
        .map_err(|e| E2bError(ApiError::invalid(e.body_text())))
}

/// Optional JSON body: an empty body means all defaults.
fn json_or_default<T: Default>(body: Result<Json<T>, JsonRejection>) -> R<T> {
    match body {
        Ok(Json(b)) => Ok(b),
        Err(JsonRejection::MissingJsonContentType(_)) => Ok(T::default()),
        Err(e) if e.body_text().contains("EOF while parsing") => Ok(T::default()),
        Err(e) => Err(E2bError(ApiError::invalid(e.body_text()))),
    }
}

#[derive(Debug, Deserialize, ToSchema, Default)]
#[serde(rename_all = "camelCase")]
pub struct NewSandbox {
    /// Template name, alias or snapshot id (default `base`).
    #[serde(rename = "templateID")]
    pub template_id: Option<String>,
    /// Seconds until the sandbox times out (default 300).
    #[schema(minimum = 0, maximum = 86400)]
    pub timeout: Option<u64>,
    /// Pause instead of kill on timeout.
    pub auto_pause: Option<bool>,
    /// false: the pause on timeout keeps the disk only (a resume boots afresh).
    pub auto_pause_memory: Option<bool>,
    pub metadata: Option<HashMap<String, String>>,
    pub env_vars: Option<HashMap<String, String>>,
    pub secure: Option<bool>,
    #[serde(rename = "allow_internet_access")]
    pub allow_internet_access: Option<bool>,
    /// `{enabled: bool}`: traffic to the paused sandbox resumes it.
    pub auto_resume: Option<Map<String, Value>>,
    /// `allowOut`, `denyOut`, `dnsServers` (enforced by the host),
    /// `allowPublicTraffic`; what cannot be enforced (`egressProxy`, `rules`,
    /// `maskRequestHost`, `httpsPorts`) is refused with a 400.
    pub network: Option<Map<String, Value>>,
    pub mcp: Option<Map<String, Value>>,
    pub volume_mounts: Option<Vec<Map<String, Value>>>,
}

#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct Sandbox {
    #[serde(rename = "templateID")]
    pub template_id: String,
    #[serde(rename = "sandboxID")]
    pub sandbox_id: String,
    #[serde(rename = "clientID")]
    pub client_id: String,
    pub envd_version: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub envd_access_token: Option<String>,
    /// Required as `e2b-traffic-access-token` on the sandbox's ports when
    /// `network.allowPublicTraffic` was false.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub traffic_access_token: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub domain: Option<String>,
}

/// The network settings of a sandbox, as `GET /sandboxes/{id}` shows them.
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct SandboxNetwork {
    pub allow_public_traffic: bool,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub allow_out: Vec<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub deny_out: Vec<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dns_servers: Option<Vec<String>>,
}

impl SandboxNetwork {
    fn of(c: &wrenn_db::Capsule) -> Self {
        let wire = wrenn_core::egress::EgressPolicyWire::from(c.network.clone());
        SandboxNetwork {
            allow_public_traffic: c.public_traffic,
            allow_out: wire.allow_out,
            deny_out: wire.deny_out,
            dns_servers: wire.dns_servers,
        }
    }
}

/// Body of `PUT /sandboxes/{id}/network`: replaces the egress configuration
/// (omitted fields are cleared, as E2B does).
#[derive(Debug, Default, Deserialize, ToSchema)]
pub struct NetworkUpdate {
    #[serde(flatten)]
    pub fields: Map<String, Value>,
}

#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct Lifecycle {
    pub auto_resume: bool,
    /// kill or pause.
    pub on_timeout: String,
}

#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct SandboxDetail {
    #[serde(rename = "templateID")]
    pub template_id: String,
    #[serde(rename = "sandboxID")]
    pub sandbox_id: String,
    #[serde(rename = "clientID")]
    pub client_id: String,
    pub started_at: chrono::DateTime<chrono::Utc>,
    pub end_at: chrono::DateTime<chrono::Utc>,
    pub envd_version: String,
    pub cpu_count: u32,
    #[serde(rename = "memoryMB")]
    pub memory_mb: u32,
    #[serde(rename = "diskSizeMB")]
    pub disk_size_mb: u64,
    /// running or paused.
    pub state: String,
    pub metadata: HashMap<String, String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub envd_access_token: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub domain: Option<String>,
    pub lifecycle: Lifecycle,
    pub allow_internet_access: bool,
    pub network: SandboxNetwork,
}

fn domain(st: &AppState, headers: &HeaderMap) -> Option<String> {
    st.config.domain.clone().or_else(|| {
        headers
            .get("host")
            .and_then(|h| h.to_str().ok())
            .map(str::to_string)
    })
}

/// E2B's two states: a live capsule that is not running counts as paused.
fn state_name(c: &wrenn_db::Capsule) -> &'static str {
    if c.status == CapsuleStatus::Running {
        "running"
    } else {
        "paused"
    }
}

fn user_metadata(c: &wrenn_db::Capsule) -> HashMap<String, String> {
    c.metadata
        .iter()
        .filter(|(k, _)| !service::RESERVED_METADATA.contains(&k.as_str()))
        .filter_map(|(k, v)| v.as_str().map(|s| (k.clone(), s.to_string())))
        .collect()
}

fn end_at(c: &wrenn_db::Capsule) -> chrono::DateTime<chrono::Utc> {
    let from = c.last_active_at.unwrap_or(c.created_at);
    if c.timeout_sec == 0 {
        from + chrono::Duration::days(365 * 100)
    } else {
        from + chrono::Duration::seconds(i64::from(c.timeout_sec))
    }
}

fn envd_version(c: &wrenn_db::Capsule) -> String {
    c.metadata
        .get("envd_version")
        .and_then(Value::as_str)
        .unwrap_or(crate::ENVD_VERSION)
        .to_string()
}

/// `autoResume: {enabled: bool}` (absent: off).
fn auto_resume_enabled(v: Option<&Map<String, Value>>) -> R<bool> {
    match v.and_then(|m| m.get("enabled")) {
        None | Some(Value::Null) => Ok(false),
        Some(Value::Bool(b)) => Ok(*b),
        Some(_) => Err(bad("autoResume.enabled must be a boolean")),
    }
}

async fn sandbox(st: &AppState, headers: &HeaderMap, c: &wrenn_db::Capsule) -> R<Sandbox> {
    let token = service::envd_token(st, c).await.map_err(E2bError)?;
    let traffic = service::traffic_token(st, c).await.map_err(E2bError)?;
    Ok(Sandbox {
        template_id: c.template.clone(),
        sandbox_id: c.id.to_string(),
        client_id: CLIENT_ID.into(),
        envd_version: envd_version(c),
        envd_access_token: token,
        traffic_access_token: traffic,
        domain: domain(st, headers),
    })
}

async fn detail(st: &AppState, headers: &HeaderMap, c: &wrenn_db::Capsule) -> R<SandboxDetail> {
    let token = service::envd_token(st, c).await.map_err(E2bError)?;
    Ok(SandboxDetail {
        template_id: c.template.clone(),
        sandbox_id: c.id.to_string(),
        client_id: CLIENT_ID.into(),
        started_at: c.started_at.unwrap_or(c.created_at),
        end_at: end_at(c),
        envd_version: envd_version(c),
        cpu_count: c.vcpus,
        memory_mb: c.memory_mb,
        disk_size_mb: service::disk_size_mb(c),
        state: state_name(c).into(),
        metadata: user_metadata(c),
        envd_access_token: token,
        domain: domain(st, headers),
        lifecycle: Lifecycle {
            auto_resume: c.auto_resume,
            on_timeout: if c.pause_on_timeout { "pause" } else { "kill" }.into(),
        },
        allow_internet_access: !c.network.internet_denied(),
        network: SandboxNetwork::of(c),
    })
}

/// A list of strings in a network object (absent or null: `None`).
fn string_list(m: &Map<String, Value>, key: &str) -> R<Option<Vec<String>>> {
    match m.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Array(items)) => items
            .iter()
            .map(|v| {
                v.as_str()
                    .map(str::to_string)
                    .ok_or_else(|| bad(format!("network.{key} must be a list of strings")))
            })
            .collect::<R<Vec<_>>>()
            .map(Some),
        Some(_) => Err(bad(format!("network.{key} must be a list of strings"))),
    }
}

/// E2B's network settings (`network` object plus `allow_internet_access`) as
/// Wrenn enforces them. `extra` are the keys the route takes besides the egress
/// lists. Settings this server cannot enforce are refused, never ignored.
fn network_params(
    allow_internet_access: Option<bool>,
    network: Option<&Map<String, Value>>,
    extra: &[&str],
) -> R<service::NetworkParams> {
    let empty = Map::new();
    let m = network.unwrap_or(&empty);
    for (k, v) in m {
        let set = !matches!(v, Value::Null)
            && !matches!(v, Value::Array(a) if a.is_empty())
            && !matches!(v, Value::Object(o) if o.is_empty());
        match k.as_str() {
            "allowOut" | "denyOut" | "dnsServers" => {}
            k if extra.contains(&k) => {}
            "egressProxy" | "rules" | "maskRequestHost" | "httpsPorts" if !set => {}
            "egressProxy" => {
                return Err(bad(
                    "network.egressProxy is not supported by this server and cannot be enforced",
                ))
            }
            "rules" => {
                return Err(bad(
                    "network.rules (per-host request transforms) is not supported by this server",
                ))
            }
            "maskRequestHost" | "httpsPorts" => {
                return Err(bad(format!("network.{k} is not supported by this server")))
            }
            other => return Err(bad(format!("unknown network setting {other:?}"))),
        }
    }
    let allow = string_list(m, "allowOut")?.unwrap_or_default();
    let deny = string_list(m, "denyOut")?.unwrap_or_default();
    let dns = string_list(m, "dnsServers")?;
    let mut egress = wrenn_core::egress::EgressPolicy::new(&allow, &deny, dns.as_deref())
        .map_err(|e| bad(format!("network: {e}")))?;
    if allow_internet_access == Some(false) {
        egress = egress.with_internet_denied();
    }
    let private_ports = match m.get("allowPublicTraffic") {
        None | Some(Value::Null) => false,
        Some(Value::Bool(b)) => !b,
        Some(_) => return Err(bad("network.allowPublicTraffic must be a boolean")),
    };
    Ok(service::NetworkParams {
        egress,
        private_ports,
    })
}

fn check_timeout(t: u64) -> Result<u32, E2bError> {
    if t > MAX_TIMEOUT {
        return Err(E2bError(ApiError::invalid(format!(
            "timeout must be at most {MAX_TIMEOUT} seconds"
        ))));
    }
    Ok(t as u32)
}

/// A live capsule of the caller's team (404 for stopped ones too, as E2B forgets them).
async fn live(st: &AppState, who: &Principal, id: &str) -> R<wrenn_db::Capsule> {
    let c = service::get(st, who, id).await.map_err(|e| {
        if e.status == StatusCode::NOT_FOUND {
            E2bError(ApiError::not_found(&format!("sandbox {id}")))
        } else {
            E2bError(e)
        }
    })?;
    if matches!(c.status, CapsuleStatus::Stopped | CapsuleStatus::Error) {
        return Err(E2bError(ApiError::not_found(&format!("sandbox {id}"))));
    }
    Ok(c)
}

/// [`live`], after waiting out a pause or resume in progress (e.g. a timeout's
/// auto-pause), as E2B's connect does.
async fn settled(st: &AppState, who: &Principal, id: &str) -> R<wrenn_db::Capsule> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let c = live(st, who, id).await?;
        let busy = matches!(
            c.status,
            CapsuleStatus::Pausing | CapsuleStatus::Resuming | CapsuleStatus::Starting
        );
        if !busy || tokio::time::Instant::now() >= deadline {
            return Ok(c);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[utoipa::path(post, path = "/sandboxes", tag = "e2b", request_body = NewSandbox,
    responses((status = 201, body = Sandbox), (status = 400, body = E2bErrorBody),
        (status = 401, body = E2bErrorBody), (status = 404, body = E2bErrorBody), (status = 403, body = E2bErrorBody), (status = 429, body = E2bErrorBody), (status = 507, body = E2bErrorBody)),
    security(("api_key" = [])))]
pub async fn create(
    State(st): S,
    E2bAuth(who): E2bAuth,
    headers: HeaderMap,
    body: Result<Json<NewSandbox>, JsonRejection>,
) -> R<(StatusCode, Json<Sandbox>)> {
    let req = json(body)?;
    let idem = headers
        .get("idempotency-key")
        .and_then(|v| v.to_str().ok())
        .filter(|k| !k.is_empty() && k.len() <= 256)
        .map(str::to_string);
    let _gate = match &idem {
        Some(key) => Some(st.idempotency.guard(&who.team_id, key).await),
        None => None,
    };
    if let Some(key) = &idem {
        if let Some(id) = st.idempotency.get(&who.team_id, key) {
            let c = live(&st, &who, &id).await?;
            return Ok((StatusCode::CREATED, Json(sandbox(&st, &headers, &c).await?)));
        }
    }
    let timeout = check_timeout(
        req.timeout
            .unwrap_or(u64::from(st.config.e2b_default_timeout)),
    )?;
    let metadata: Map<String, Value> = req
        .metadata
        .unwrap_or_default()
        .into_iter()
        .map(|(k, v)| (k, Value::String(v)))
        .collect();
    if metadata
        .keys()
        .any(|k| service::RESERVED_METADATA.contains(&k.as_str()) || k.starts_with("wrenn."))
    {
        return Err(E2bError(ApiError::invalid("metadata uses a reserved key")));
    }
    let network = network_params(
        req.allow_internet_access,
        req.network.as_ref(),
        &["allowPublicTraffic"],
    )?;
    let auto_resume = auto_resume_enabled(req.auto_resume.as_ref())?;
    if auto_resume && req.auto_pause_memory == Some(false) {
        // A filesystem-only pause cold-boots on resume: traffic cannot wake it in place.
        return Err(bad(
            "autoResume cannot be combined with a filesystem-only auto-pause (autoPauseMemory: false)",
        ));
    }
    let c = service::create(
        &st,
        &who,
        CreateParams {
            template: Some(req.template_id.unwrap_or_else(|| "base".into())),
            vcpus: None,
            memory_mb: None,
            timeout_sec: timeout,
            pause_on_timeout: req.auto_pause.unwrap_or(false),
            deadline: true,
            timeout_pause_memory: req.auto_pause_memory.unwrap_or(true),
            auto_resume,
            metadata,
            envs: req.env_vars.unwrap_or_default(),
            network,
            e2b: true,
            image_base: None,
        },
    )
    .await
    .map_err(E2bError)?;
    if let Some(key) = &idem {
        st.idempotency.put(&who.team_id, key, c.id.as_str());
    }
    Ok((StatusCode::CREATED, Json(sandbox(&st, &headers, &c).await?)))
}

#[derive(Debug, Deserialize, ToSchema, Default)]
#[serde(rename_all = "camelCase")]
pub struct ConnectSandbox {
    #[schema(minimum = 0, maximum = 86400)]
    pub timeout: Option<u64>,
    /// false: a paused sandbox boots afresh from its kept disk instead of restoring
    /// its memory.
    pub memory: Option<bool>,
    pub auto_pause: Option<bool>,
}

/// `POST /v2/sandboxes` (SDK ≥ 2.51): the same as `POST /sandboxes`.
#[utoipa::path(post, path = "/v2/sandboxes", tag = "e2b", request_body = NewSandbox,
    responses((status = 201, body = Sandbox), (status = 400, body = E2bErrorBody),
        (status = 401, body = E2bErrorBody), (status = 404, body = E2bErrorBody), (status = 403, body = E2bErrorBody), (status = 429, body = E2bErrorBody), (status = 507, body = E2bErrorBody)),
    security(("api_key" = [])))]
pub async fn create_v2(
    st: S,
    auth: E2bAuth,
    headers: HeaderMap,
    body: Result<Json<NewSandbox>, JsonRejection>,
) -> R<(StatusCode, Json<Sandbox>)> {
    create(st, auth, headers, body).await
}

/// `POST /v2/sandboxes/{id}/connect` (SDK ≥ 2.51): the same as `POST /sandboxes/{id}/connect`.
#[utoipa::path(post, path = "/v2/sandboxes/{id}/connect", tag = "e2b", params(("id" = String, Path)),
    request_body = ConnectSandbox,
    responses((status = 200, body = Sandbox), (status = 201, body = Sandbox), (status = 400, body = E2bErrorBody),
        (status = 404, body = E2bErrorBody), (status = 409, body = E2bErrorBody), (status = 403, body = E2bErrorBody), (status = 429, body = E2bErrorBody), (status = 507, body = E2bErrorBody)),
    security(("api_key" = [])))]
pub async fn connect_v2(
    st: S,
    auth: E2bAuth,
    id: Path<String>,
    headers: HeaderMap,
    body: Result<Json<ConnectSandbox>, JsonRejection>,
) -> R<(StatusCode, Json<Sandbox>)> {
    connect(st, auth, id, headers, body).await
}

/// Connect: extends the timeout of a running sandbox (200) or resumes a paused one (201).
#[utoipa::path(post, path = "/sandboxes/{id}/connect", tag = "e2b", params(("id" = String, Path)),
    request_body = ConnectSandbox,
    responses((status = 200, body = Sandbox), (status = 201, body = Sandbox), (status = 400, body = E2bErrorBody),
        (status = 404, body = E2bErrorBody), (status = 409, body = E2bErrorBody), (status = 403, body = E2bErrorBody), (status = 429, body = E2bErrorBody), (status = 507, body = E2bErrorBody)),
    security(("api_key" = [])))]
pub async fn connect(
    State(st): S,
    E2bAuth(who): E2bAuth,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: Result<Json<ConnectSandbox>, JsonRejection>,
) -> R<(StatusCode, Json<Sandbox>)> {
    let req = json_or_default(body)?;
    let timeout = check_timeout(
        req.timeout
            .unwrap_or(u64::from(st.config.e2b_default_timeout)),
    )?;
    let mut c = settled(&st, &who, &id).await?;
    let status = if c.status == CapsuleStatus::Paused {
        c = service::resume_with(
            &st,
            &who,
            &c,
            ResumeMode::keeping_memory(req.memory != Some(false)),
        )
        .await
        .map_err(E2bError)?;
        StatusCode::CREATED
    } else if c.status == CapsuleStatus::Running {
        StatusCode::OK
    } else {
        return Err(E2bError(ApiError::invalid_state(format!(
            "sandbox {id} is {}",
            c.status
        ))));
    };
    // Connect only extends the deadline.
    let now = chrono::Utc::now();
    let wanted = now + chrono::Duration::seconds(i64::from(timeout));
    if status == StatusCode::CREATED || wanted > end_at(&c) {
        c = st
            .db
            .set_capsule_timeout(&c.team_id, c.id.as_str(), timeout)
            .await
            .map_err(|e| E2bError(e.into()))?;
        st.capsule_cache.invalidate(c.id.as_str());
    }
    Ok((status, Json(sandbox(&st, &headers, &c).await?)))
}

/// Resume (SDK ≤ 2.5): 201 when resumed, 409 when already running.
#[utoipa::path(post, path = "/sandboxes/{id}/resume", tag = "e2b", params(("id" = String, Path)),
    request_body = ConnectSandbox,
    responses((status = 201, body = Sandbox), (status = 400, body = E2bErrorBody), (status = 404, body = E2bErrorBody),
        (status = 409, body = E2bErrorBody), (status = 403, body = E2bErrorBody), (status = 429, body = E2bErrorBody), (status = 507, body = E2bErrorBody)),
    security(("api_key" = [])))]
pub async fn resume(
    State(st): S,
    E2bAuth(who): E2bAuth,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: Result<Json<ConnectSandbox>, JsonRejection>,
) -> R<(StatusCode, Json<Sandbox>)> {
    let req = json_or_default(body)?;
    let timeout = check_timeout(
        req.timeout
            .unwrap_or(u64::from(st.config.e2b_default_timeout)),
    )?;
    let c = settled(&st, &who, &id).await?;
    if c.status == CapsuleStatus::Running {
        return Err(E2bError(ApiError::conflict(
            "conflict",
            format!("sandbox {id} is already running"),
        )));
    }
    let c = service::resume_with(
        &st,
        &who,
        &c,
        ResumeMode::keeping_memory(req.memory != Some(false)),
    )
    .await
    .map_err(E2bError)?;
    let c = st
        .db
        .set_capsule_timeout(&c.team_id, c.id.as_str(), timeout)
        .await
        .map_err(|e| E2bError(e.into()))?;
    st.capsule_cache.invalidate(c.id.as_str());
    Ok((StatusCode::CREATED, Json(sandbox(&st, &headers, &c).await?)))
}

#[utoipa::path(get, path = "/sandboxes/{id}", tag = "e2b", params(("id" = String, Path)),
    responses((status = 200, body = SandboxDetail), (status = 404, body = E2bErrorBody)),
    security(("api_key" = [])))]
pub async fn get(
    State(st): S,
    E2bAuth(who): E2bAuth,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> R<Json<SandboxDetail>> {
    let c = live(&st, &who, &id).await?;
    Ok(Json(detail(&st, &headers, &c).await?))
}

#[utoipa::path(delete, path = "/sandboxes/{id}", tag = "e2b", params(("id" = String, Path)),
    responses((status = 204), (status = 404, body = E2bErrorBody)),
    security(("api_key" = [])))]
pub async fn kill(State(st): S, E2bAuth(who): E2bAuth, Path(id): Path<String>) -> R<StatusCode> {
    let c = live(&st, &who, &id).await?;
    service::destroy(&st, &who.actor, who.actor_name.clone(), &c)
        .await
        .map_err(E2bError)?;
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Debug, Deserialize, ToSchema)]
pub struct TimeoutRequest {
    #[schema(minimum = 0, maximum = 86400)]
    pub timeout: u64,
}

#[utoipa::path(post, path = "/sandboxes/{id}/timeout", tag = "e2b", params(("id" = String, Path)),
    request_body = TimeoutRequest,
    responses((status = 204), (status = 400, body = E2bErrorBody), (status = 404, body = E2bErrorBody)),
    security(("api_key" = [])))]
pub async fn set_timeout(
    State(st): S,
    E2bAuth(who): E2bAuth,
    Path(id): Path<String>,
    body: Result<Json<TimeoutRequest>, JsonRejection>,
) -> R<StatusCode> {
    let req = json(body)?;
    let t = check_timeout(req.timeout)?;
    let c = live(&st, &who, &id).await?;
    st.db
        .set_capsule_timeout(&c.team_id, c.id.as_str(), t.max(1))
        .await
        .map_err(|e| E2bError(e.into()))?;
    st.capsule_cache.invalidate(c.id.as_str());
    st.activity.forget(c.id.as_str());
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Debug, Deserialize, ToSchema, Default)]
#[serde(rename_all = "camelCase")]
pub struct PauseRequest {
    pub memory: Option<bool>,
    pub require_healthy_guest: Option<bool>,
}

#[utoipa::path(post, path = "/sandboxes/{id}/pause", tag = "e2b", params(("id" = String, Path)),
    request_body = PauseRequest,
    responses((status = 204), (status = 400, body = E2bErrorBody), (status = 404, body = E2bErrorBody),
        (status = 409, body = E2bErrorBody), (status = 507, body = E2bErrorBody)),
    security(("api_key" = [])))]
pub async fn pause(
    State(st): S,
    E2bAuth(who): E2bAuth,
    Path(id): Path<String>,
    body: Result<Json<PauseRequest>, JsonRejection>,
) -> R<StatusCode> {
    let req: PauseRequest = json_or_default(body)?;
    let c = live(&st, &who, &id).await?;
    if c.status != CapsuleStatus::Running {
        return Err(E2bError(ApiError::conflict(
            "conflict",
            format!("sandbox {id} is already paused"),
        )));
    }
    // memory: false keeps the disk only: the next connect boots afresh from it.
    let mode = PauseMode::keeping_memory(req.memory != Some(false));
    service::pause_with(&st, &who.actor, who.actor_name.clone(), &c, mode)
        .await
        .map_err(E2bError)?;
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct ListedSandbox {
    #[serde(rename = "templateID")]
    pub template_id: String,
    #[serde(rename = "sandboxID")]
    pub sandbox_id: String,
    #[serde(rename = "clientID")]
    pub client_id: String,
    pub started_at: chrono::DateTime<chrono::Utc>,
    pub end_at: chrono::DateTime<chrono::Utc>,
    pub cpu_count: u32,
    #[serde(rename = "memoryMB")]
    pub memory_mb: u32,
    #[serde(rename = "diskSizeMB")]
    pub disk_size_mb: u64,
    pub state: String,
    pub envd_version: String,
    pub metadata: HashMap<String, String>,
}

#[derive(Debug, Deserialize, IntoParams)]
#[serde(rename_all = "camelCase")]
#[into_params(parameter_in = Query)]
pub struct ListQuery {
    /// URL-encoded `k=v&k2=v2` pairs that must all match.
    pub metadata: Option<String>,
    /// Comma-separated: running, paused.
    pub state: Option<String>,
    /// asc or desc by start time (default desc).
    pub order: Option<String>,
    /// RFC 3339; sandboxes started at or after it.
    pub started_after: Option<String>,
    /// RFC 3339; sandboxes started at or before it.
    pub started_before: Option<String>,
    pub template: Option<String>,
    /// 1..100 (default 100).
    #[param(minimum = 1, maximum = 100)]
    pub limit: Option<u32>,
    pub next_token: Option<String>,
}

/// `PUT /sandboxes/{id}/network`: replaces the sandbox's egress rules (E2B's
/// `update_network`); in force when this answers, kept across pause and resume.
#[utoipa::path(put, path = "/sandboxes/{id}/network", tag = "e2b", params(("id" = String, Path)),
    request_body = NetworkUpdate,
    responses((status = 204), (status = 400, body = E2bErrorBody), (status = 404, body = E2bErrorBody),
        (status = 403, body = E2bErrorBody)),
    security(("api_key" = [])))]
pub async fn update_network(
    State(st): S,
    E2bAuth(who): E2bAuth,
    Path(id): Path<String>,
    body: Result<Json<NetworkUpdate>, JsonRejection>,
) -> R<StatusCode> {
    let mut fields = json(body)?.fields;
    let allow_internet = match fields.remove("allow_internet_access") {
        None | Some(Value::Null) => None,
        Some(Value::Bool(b)) => Some(b),
        Some(_) => return Err(bad("allow_internet_access must be a boolean")),
    };
    let params = network_params(allow_internet, Some(&fields), &[])?;
    let c = settled(&st, &who, &id).await?;
    service::set_network(&st, &who, &c, params.egress)
        .await
        .map_err(E2bError)?;
    Ok(StatusCode::NO_CONTENT)
}

fn bad(msg: impl Into<String>) -> E2bError {
    E2bError(ApiError::invalid(msg))
}

/// An optional RFC 3339 query time.
fn rfc3339(v: Option<&str>, name: &str) -> R<Option<chrono::DateTime<chrono::Utc>>> {
    match v {
        None | Some("") => Ok(None),
        Some(t) => chrono::DateTime::parse_from_rfc3339(t)
            .map(|t| Some(t.with_timezone(&chrono::Utc)))
            .map_err(|_| bad(format!("{name} must be an RFC 3339 time, got {t:?}"))),
    }
}

/// Lists the team's sandboxes with E2B's filters and `X-Next-Token` pagination.
async fn list_impl(st: &AppState, who: &Principal, q: ListQuery) -> R<Response> {
    let limit = q.limit.unwrap_or(100);
    if !(1..=100).contains(&limit) {
        return Err(bad("limit must be 1 to 100"));
    }
    let states: Vec<String> = match q.state.as_deref() {
        None | Some("") => vec!["running".into(), "paused".into()],
        Some(s) => s.split(',').map(|x| x.trim().to_string()).collect(),
    };
    for s in &states {
        if s != "running" && s != "paused" {
            return Err(bad(format!("state {s:?}: expected running or paused")));
        }
    }
    let want_meta: Vec<(String, String)> = match q.metadata.as_deref() {
        None | Some("") => Vec::new(),
        Some(m) => form_urlencoded::parse(m.as_bytes())
            .map(|(k, v)| (k.into_owned(), v.into_owned()))
            .collect(),
    };
    let after = rfc3339(q.started_after.as_deref(), "startedAfter")?;
    let before = rfc3339(q.started_before.as_deref(), "startedBefore")?;
    let desc = match q.order.as_deref() {
        None | Some("desc") => true,
        Some("asc") => false,
        Some(o) => return Err(bad(format!("order {o:?}: expected asc or desc"))),
    };
    let offset: usize = match q.next_token.as_deref() {
        None | Some("") => 0,
        Some(t) => t
            .parse()
            .map_err(|_| bad("nextToken is not one this server issued"))?,
    };
    let rows = st
        .db
        .list_capsules(&who.team_id, false)
        .await
        .map_err(|e| E2bError(e.into()))?;
    let mut rows: Vec<_> = rows
        .into_iter()
        .filter(|c| {
            let state = match c.status {
                CapsuleStatus::Running => "running",
                CapsuleStatus::Paused | CapsuleStatus::Pausing | CapsuleStatus::Resuming => {
                    "paused"
                }
                _ => return false,
            };
            states.iter().any(|s| s == state)
        })
        .filter(|c| {
            want_meta
                .iter()
                .all(|(k, v)| c.metadata.get(k).and_then(Value::as_str) == Some(v.as_str()))
        })
        .filter(|c| {
            // Both bounds are inclusive, as E2B's API documents.
            let started = c.started_at.unwrap_or(c.created_at);
            after.is_none_or(|a| started >= a) && before.is_none_or(|b| started <= b)
        })
        .filter(|c| q.template.as_deref().is_none_or(|t| c.template == t))
        .collect();
    rows.sort_by_key(|c| (c.created_at, c.id.to_string()));
    if desc {
        rows.reverse();
    }
    let total_running = rows
        .iter()
        .filter(|c| c.status == CapsuleStatus::Running)
        .count();
    let page: Vec<ListedSandbox> = rows
        .iter()
        .skip(offset)
        .take(limit as usize)
        .map(|c| ListedSandbox {
            template_id: c.template.clone(),
            sandbox_id: c.id.to_string(),
            client_id: CLIENT_ID.into(),
            started_at: c.started_at.unwrap_or(c.created_at),
            end_at: end_at(c),
            cpu_count: c.vcpus,
            memory_mb: c.memory_mb,
            disk_size_mb: service::disk_size_mb(c),
            state: state_name(c).into(),
            envd_version: envd_version(c),
            metadata: user_metadata(c),
        })
        .collect();
    let next = offset + page.len();
    let mut resp = Json(page).into_response();
    if next < rows.len() {
        if let Ok(v) = HeaderValue::from_str(&next.to_string()) {
            resp.headers_mut().insert("x-next-token", v);
        }
    }
    if let Ok(v) = HeaderValue::from_str(&total_running.to_string()) {
        resp.headers_mut().insert("x-total-running", v);
    }
    Ok(resp)
}

#[utoipa::path(get, path = "/v2/sandboxes", tag = "e2b", params(ListQuery),
    responses((status = 200, body = Vec<ListedSandbox>), (status = 400, body = E2bErrorBody), (status = 401, body = E2bErrorBody)),
    security(("api_key" = [])))]
pub async fn list_v2(
    State(st): S,
    E2bAuth(who): E2bAuth,
    E2bQuery(q): E2bQuery<ListQuery>,
) -> R<Response> {
    list_impl(&st, &who, q).await
}

#[utoipa::path(get, path = "/sandboxes", tag = "e2b", params(ListQuery),
    responses((status = 200, body = Vec<ListedSandbox>), (status = 400, body = E2bErrorBody), (status = 401, body = E2bErrorBody)),
    security(("api_key" = [])))]
pub async fn list_v1(
    State(st): S,
    E2bAuth(who): E2bAuth,
    E2bQuery(mut q): E2bQuery<ListQuery>,
) -> R<Response> {
    if q.state.is_none() {
        q.state = Some("running".into());
    }
    list_impl(&st, &who, q).await
}

#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct SandboxMetric {
    pub timestamp: chrono::DateTime<chrono::Utc>,
    pub timestamp_unix: i64,
    pub cpu_count: u32,
    pub cpu_used_pct: f64,
    pub mem_used: u64,
    pub mem_total: u64,
    pub mem_cache: u64,
    pub disk_used: u64,
    pub disk_total: u64,
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct MetricsQuery {
    /// Unix seconds (default: 10 minutes ago).
    pub start: Option<i64>,
    /// Unix seconds (default: now).
    pub end: Option<i64>,
}

#[utoipa::path(get, path = "/sandboxes/{id}/metrics", tag = "e2b", params(("id" = String, Path), MetricsQuery),
    responses((status = 200, body = Vec<SandboxMetric>), (status = 400, body = E2bErrorBody), (status = 404, body = E2bErrorBody)),
    security(("api_key" = [])))]
pub async fn metrics(
    State(st): S,
    E2bAuth(who): E2bAuth,
    Path(id): Path<String>,
    E2bQuery(q): E2bQuery<MetricsQuery>,
) -> R<Json<Vec<SandboxMetric>>> {
    let now = chrono::Utc::now().timestamp();
    let end = q.end.unwrap_or(now);
    let start = q.start.unwrap_or(end.saturating_sub(600));
    if start > end {
        return Err(bad("start must not be after end"));
    }
    let c = live(&st, &who, &id).await?;
    let span = now.saturating_sub(start).clamp(1, 24 * 3600) as u64;
    let points = crate::v1::capsules::metric_points(&st, &c, Duration::from_secs(span))
        .await
        .map_err(E2bError)?;
    let mem_total = u64::from(c.memory_mb) << 20;
    let disk_total = service::disk_size_mb(&c) << 20;
    Ok(Json(
        points
            .into_iter()
            .filter(|p| p.timestamp_unix >= start && p.timestamp_unix <= end)
            .map(|p| SandboxMetric {
                timestamp: chrono::DateTime::from_timestamp(p.timestamp_unix, 0)
                    .unwrap_or_default(),
                timestamp_unix: p.timestamp_unix,
                cpu_count: c.vcpus,
                cpu_used_pct: p.cpu_pct,
                mem_used: p.mem_bytes.min(mem_total),
                mem_total,
                mem_cache: 0,
                disk_used: p.disk_bytes,
                disk_total,
            })
            .collect(),
    ))
}

#[derive(Debug, Deserialize, ToSchema, Default)]
pub struct ForkRequest {
    #[schema(minimum = 0, maximum = 86400)]
    pub timeout: Option<u64>,
    #[schema(minimum = 1, maximum = 100)]
    pub count: Option<u32>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ForkResult {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sandbox: Option<Sandbox>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<E2bErrorBody>,
}

#[utoipa::path(post, path = "/sandboxes/{id}/fork", tag = "e2b", params(("id" = String, Path)),
    request_body = ForkRequest,
    responses((status = 201, body = Vec<ForkResult>), (status = 400, body = E2bErrorBody), (status = 404, body = E2bErrorBody),
        (status = 409, body = E2bErrorBody), (status = 403, body = E2bErrorBody), (status = 429, body = E2bErrorBody), (status = 507, body = E2bErrorBody)),
    security(("api_key" = [])))]
pub async fn fork(
    State(st): S,
    E2bAuth(who): E2bAuth,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: Result<Json<ForkRequest>, JsonRejection>,
) -> R<(StatusCode, Json<Vec<ForkResult>>)> {
    let req = json_or_default(body)?;
    let count = req.count.unwrap_or(1);
    if !(1..=100).contains(&count) {
        return Err(bad("count must be 1 to 100"));
    }
    let timeout = check_timeout(
        req.timeout
            .unwrap_or(u64::from(st.config.e2b_default_timeout)),
    )?;
    let c = live(&st, &who, &id).await?;
    let forks = service::fork(&st, &who, &c, count as usize, timeout)
        .await
        .map_err(E2bError)?;
    let mut out = Vec::new();
    for f in &forks {
        out.push(ForkResult {
            sandbox: Some(sandbox(&st, &headers, f).await?),
            error: None,
        });
    }
    Ok((StatusCode::CREATED, Json(out)))
}

#[derive(Debug, Deserialize, ToSchema, Default)]
pub struct SnapshotRequest {
    pub name: Option<String>,
    pub memory: Option<bool>,
}

#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct SnapshotInfo {
    #[serde(rename = "snapshotID")]
    pub snapshot_id: String,
    pub names: Vec<String>,
}

#[utoipa::path(post, path = "/sandboxes/{id}/snapshots", tag = "e2b", params(("id" = String, Path)),
    request_body = SnapshotRequest,
    responses((status = 201, body = SnapshotInfo), (status = 400, body = E2bErrorBody),
        (status = 404, body = E2bErrorBody), (status = 409, body = E2bErrorBody), (status = 403, body = E2bErrorBody), (status = 429, body = E2bErrorBody), (status = 507, body = E2bErrorBody)),
    security(("api_key" = [])))]
pub async fn create_snapshot(
    State(st): S,
    E2bAuth(who): E2bAuth,
    Path(id): Path<String>,
    body: Result<Json<SnapshotRequest>, JsonRejection>,
) -> R<(StatusCode, Json<SnapshotInfo>)> {
    let req: SnapshotRequest = json_or_default(body)?;
    if req.memory == Some(false) {
        // Refused rather than quietly taking a full memory snapshot.
        return Err(E2bError(ApiError::invalid(
            "memory: false (a filesystem-only snapshot template) is not supported by this \
             server; omit it to snapshot the sandbox with its memory",
        )));
    }
    let c = live(&st, &who, &id).await?;
    let name = req
        .name
        .filter(|n| !n.is_empty())
        .unwrap_or_else(|| format!("snapshot-{:08x}", rand::random::<u32>()));
    let t = service::snapshot(&st, &who, &c, &name)
        .await
        .map_err(E2bError)?;
    Ok((
        StatusCode::CREATED,
        Json(SnapshotInfo {
            snapshot_id: t.name.to_string(),
            names: vec![t.name.to_string()],
        }),
    ))
}

#[derive(Debug, Deserialize, IntoParams)]
#[serde(rename_all = "camelCase")]
#[into_params(parameter_in = Query)]
pub struct SnapshotListQuery {
    #[serde(rename = "sandboxID")]
    pub sandbox_id: Option<String>,
    pub name: Option<String>,
    /// 1..100 (default 100).
    #[param(minimum = 1, maximum = 100)]
    pub limit: Option<u32>,
    pub next_token: Option<String>,
}

#[utoipa::path(get, path = "/snapshots", tag = "e2b", params(SnapshotListQuery),
    responses((status = 200, body = Vec<SnapshotInfo>), (status = 400, body = E2bErrorBody), (status = 401, body = E2bErrorBody)),
    security(("api_key" = [])))]
pub async fn list_snapshots(
    State(st): S,
    E2bAuth(who): E2bAuth,
    E2bQuery(q): E2bQuery<SnapshotListQuery>,
) -> R<Response> {
    let limit = q.limit.unwrap_or(100);
    if !(1..=100).contains(&limit) {
        return Err(bad("limit must be 1 to 100"));
    }
    let offset: usize = match q.next_token.as_deref() {
        None | Some("") => 0,
        Some(t) => t
            .parse()
            .map_err(|_| bad("nextToken is not one this server issued"))?,
    };
    let all = st
        .db
        .list_templates(&who.team_id, Some(wrenn_db::TemplateKind::Snapshot))
        .await
        .map_err(|e| E2bError(e.into()))?;
    let all: Vec<_> = all
        .into_iter()
        .filter(|t| {
            q.sandbox_id
                .as_deref()
                .is_none_or(|s| t.source_capsule.as_deref() == Some(s))
        })
        .filter(|t| q.name.as_deref().is_none_or(|n| t.name.as_str() == n))
        .collect();
    let page: Vec<SnapshotInfo> = all
        .iter()
        .skip(offset)
        .take(limit as usize)
        .map(|t| SnapshotInfo {
            snapshot_id: t.name.to_string(),
            names: vec![t.name.to_string()],
        })
        .collect();
    let next = offset + page.len();
    let mut resp = Json(page).into_response();
    if next < all.len() {
        if let Ok(v) = HeaderValue::from_str(&next.to_string()) {
            resp.headers_mut().insert("x-next-token", v);
        }
    }
    Ok(resp)
}

#[utoipa::path(delete, path = "/templates/{id}", tag = "e2b", params(("id" = String, Path)),
    responses((status = 204), (status = 404, body = E2bErrorBody)),
    security(("api_key" = [])))]
pub async fn delete_template(
    State(st): S,
    E2bAuth(who): E2bAuth,
    Path(id): Path<String>,
) -> R<StatusCode> {
    if wrenn_core::template::TemplateName::parse(&id).is_err() {
        return Err(E2bError(ApiError::not_found(&format!("snapshot {id}"))));
    }
    service::delete_snapshot(&st, &who, &id)
        .await
        .map_err(E2bError)?;
    Ok(StatusCode::NO_CONTENT)
}

/// Path prefixes of E2B's API (including the parts Wrenn does not serve: template
/// builds, volumes, secrets, teams, keys): errors there are E2B-shaped.
const E2B_PREFIXES: &[&str] = &[
    "/sandboxes",
    "/v2/",
    "/v3/",
    "/templates",
    "/snapshots",
    "/volumes",
    "/secrets",
    "/teams",
    "/api-keys",
    "/access-tokens",
    "/nodes",
];

/// Whether `path` belongs to the E2B API (whose errors are `{code, message}`).
pub fn is_e2b_path(path: &str) -> bool {
    E2B_PREFIXES.iter().any(|p| {
        path.strip_prefix(p)
            .is_some_and(|rest| p.ends_with('/') || rest.is_empty() || rest.starts_with('/'))
    })
}
