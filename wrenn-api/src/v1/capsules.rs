//! `/v1/capsules`: lifecycle, exec, processes and metrics.

use crate::auth::Auth;
use crate::error::{json_rejection, ApiError, ApiResult, ErrorBody};
use crate::service::{self, CreateParams};
use crate::state::AppState;
use axum::extract::rejection::JsonRejection;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use base64::Engine;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};
use utoipa::{IntoParams, ToSchema};
use wrenn_core::guest::{ExecEvent, ExecRequest};
use wrenn_core::status::CapsuleStatus;

type S = State<Arc<AppState>>;

/// A capsule as the API shows it.
#[derive(Clone, Debug, Serialize, ToSchema)]
pub struct CapsuleView {
    pub id: String,
    /// pending, starting, running, pausing, paused, resuming, stopping, stopped, missing or error.
    pub status: String,
    pub template: String,
    pub vcpus: u32,
    pub memory_mb: u32,
    #[schema(value_type = u64)]
    pub timeout_sec: u32,
    pub created_at: chrono::DateTime<chrono::Utc>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub started_at: Option<chrono::DateTime<chrono::Utc>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_active_at: Option<chrono::DateTime<chrono::Utc>>,
    pub last_updated: chrono::DateTime<chrono::Utc>,
    pub metadata: HashMap<String, String>,
    pub disk_size_mb: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub disk_used_mb: Option<u64>,
    /// Egress policy (`{}`: everything but the always-denied ranges is open).
    pub network: CapsuleNetwork,
}

/// A capsule's egress policy. Everything is allowed unless denied; an entry of
/// `allow_out` beats any entry of `deny_out`. `allow_out` takes IPv4 addresses,
/// CIDR blocks and domain names (`example.com`, `*.example.com`: names below
/// it); `deny_out` takes addresses and CIDR blocks (`0.0.0.0/0`: the whole
/// internet). A domain opens, for the TTL of the answer, the addresses the
/// capsule's filtering resolver returned for it; while a domain is allowed and
/// anything is denied, the capsule's DNS goes to that resolver, which refuses
/// other names. `dns_servers` (IPv4) are reachable while a domain is allowed
/// (default 8.8.8.8). The host itself, other capsules, link-local (metadata)
/// and loopback addresses are never reachable.
#[derive(Clone, Debug, Default, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CapsuleNetwork {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub allow_out: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub deny_out: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dns_servers: Option<Vec<String>>,
}

impl CapsuleNetwork {
    fn of(p: &wrenn_core::egress::EgressPolicy) -> Self {
        let w = wrenn_core::egress::EgressPolicyWire::from(p.clone());
        CapsuleNetwork {
            allow_out: w.allow_out,
            deny_out: w.deny_out,
            dns_servers: w.dns_servers,
        }
    }

    fn policy(&self) -> ApiResult<wrenn_core::egress::EgressPolicy> {
        wrenn_core::egress::EgressPolicy::new(
            &self.allow_out,
            &self.deny_out,
            self.dns_servers.as_deref(),
        )
        .map_err(|e| ApiError::invalid(format!("network: {e}")))
    }
}

impl CapsuleView {
    /// The row as shown now: a live capsule whose host is unreachable (or not
    /// connected) is `missing` until its host answers again.
    pub fn of(st: &AppState, c: &wrenn_db::Capsule) -> Self {
        let mut v = Self::from_row(c);
        let live = matches!(
            c.status,
            CapsuleStatus::Starting
                | CapsuleStatus::Running
                | CapsuleStatus::Pausing
                | CapsuleStatus::Resuming
        );
        if live && !st.hosts.reachable(&c.host_id) {
            v.status = "missing".into();
        }
        v
    }

    pub fn from_row(c: &wrenn_db::Capsule) -> Self {
        CapsuleView {
            id: c.id.to_string(),
            status: c.status.as_str().to_string(),
            template: c.template.clone(),
            vcpus: c.vcpus,
            memory_mb: c.memory_mb,
            timeout_sec: c.timeout_sec,
            created_at: c.created_at,
            started_at: c.started_at,
            last_active_at: c.last_active_at,
            last_updated: c.last_updated,
            metadata: c
                .metadata
                .iter()
                .filter_map(|(k, v)| v.as_str().map(|s| (k.clone(), s.to_string())))
                .collect(),
            disk_size_mb: service::disk_size_mb(c),
            disk_used_mb: None,
            network: CapsuleNetwork::of(&c.network),
        }
    }
}

#[derive(Debug, Deserialize, ToSchema, Default)]
#[serde(deny_unknown_fields)]
pub struct CreateCapsuleRequest {
    /// Template or snapshot name (default `minimal`).
    pub template: Option<String>,
    #[schema(minimum = 1, maximum = 64)]
    pub vcpus: Option<u32>,
    #[schema(minimum = 128, maximum = 65536)]
    pub memory_mb: Option<u32>,
    /// Inactivity auto-pause TTL in seconds; 0 = never.
    #[schema(value_type = Option<u64>, minimum = 0, maximum = 4294967295u64)]
    pub timeout_sec: Option<u32>,
    /// User labels: ≤ 20 keys, values ≤ 64 characters.
    pub metadata: Option<HashMap<String, String>>,
    /// Traffic through the proxy to the capsule while it is paused resumes it
    /// (default false: such traffic is answered 409).
    pub auto_resume: Option<bool>,
    /// Egress policy (default: open).
    pub network: Option<CapsuleNetwork>,
}

#[utoipa::path(post, path = "/v1/capsules", tag = "capsules",
    request_body = CreateCapsuleRequest,
    responses((status = 201, body = CapsuleView), (status = 400, body = ErrorBody),
        (status = 401, body = ErrorBody), (status = 404, body = ErrorBody), (status = 403, body = ErrorBody), (status = 429, body = ErrorBody), (status = 507, body = ErrorBody)),
    security(("api_key" = []), ("bearer" = [])))]
pub async fn create(
    State(st): S,
    Auth(who): Auth,
    body: Result<Json<CreateCapsuleRequest>, JsonRejection>,
) -> ApiResult<(StatusCode, Json<CapsuleView>)> {
    let Json(req) = body.map_err(json_rejection)?;
    let egress = req
        .network
        .as_ref()
        .map(CapsuleNetwork::policy)
        .transpose()?
        .unwrap_or_default();
    let metadata: serde_json::Map<String, serde_json::Value> = req
        .metadata
        .unwrap_or_default()
        .into_iter()
        .map(|(k, v)| (k, v.into()))
        .collect();
    service::validate_metadata(&metadata)?;
    let mut timeout = req.timeout_sec.unwrap_or(0);
    if timeout > 0 {
        timeout = timeout.max(st.config.min_idle_timeout);
    }
    let row = service::create(
        &st,
        &who,
        CreateParams {
            template: req.template,
            vcpus: req.vcpus,
            memory_mb: req.memory_mb,
            timeout_sec: timeout,
            pause_on_timeout: true,
            metadata,
            deadline: false,
            timeout_pause_memory: true,
            auto_resume: req.auto_resume.unwrap_or(false),
            envs: HashMap::new(),
            network: service::NetworkParams {
                egress,
                private_ports: false,
            },
            e2b: false,
            image_base: None,
        },
    )
    .await?;
    Ok((StatusCode::CREATED, Json(CapsuleView::from_row(&row))))
}

#[utoipa::path(get, path = "/v1/capsules", tag = "capsules",
    responses((status = 200, body = Vec<CapsuleView>), (status = 401, body = ErrorBody)),
    security(("api_key" = []), ("bearer" = [])))]
pub async fn list(State(st): S, Auth(who): Auth) -> ApiResult<Json<Vec<CapsuleView>>> {
    let rows = st.db.list_capsules(&who.team_id, false).await?;
    Ok(Json(rows.iter().map(|c| CapsuleView::of(&st, c)).collect()))
}

#[utoipa::path(get, path = "/v1/capsules/{id}", tag = "capsules",
    params(("id" = String, Path)),
    responses((status = 200, body = CapsuleView), (status = 401, body = ErrorBody), (status = 404, body = ErrorBody)),
    security(("api_key" = []), ("bearer" = [])))]
pub async fn get(
    State(st): S,
    Auth(who): Auth,
    Path(id): Path<String>,
) -> ApiResult<Json<CapsuleView>> {
    let c = service::get(&st, &who, &id).await?;
    let mut view = CapsuleView::of(&st, &c);
    if view.status == "running" {
        view.disk_used_mb = match st.agent_of(&c) {
            Ok(agent) => agent
                .latest_metric(&c.id, Duration::from_secs(5))
                .await
                .ok()
                .flatten(),
            Err(_) => None,
        }
        .map(|p| p.disk_bytes >> 20);
    }
    Ok(Json(view))
}

/// Replaces the egress policy of a running or paused capsule: in force when this
/// answers (a paused capsule resumes with it).
#[utoipa::path(patch, path = "/v1/capsules/{id}/network", tag = "capsules",
    params(("id" = String, Path)), request_body = CapsuleNetwork,
    responses((status = 200, body = CapsuleView), (status = 400, body = ErrorBody),
        (status = 401, body = ErrorBody), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)),
    security(("api_key" = []), ("bearer" = [])))]
pub async fn set_network(
    State(st): S,
    Auth(who): Auth,
    Path(id): Path<String>,
    body: Result<Json<CapsuleNetwork>, JsonRejection>,
) -> ApiResult<Json<CapsuleView>> {
    let Json(req) = body.map_err(json_rejection)?;
    let policy = req.policy()?;
    let c = service::get(&st, &who, &id).await?;
    if !matches!(c.status, CapsuleStatus::Running | CapsuleStatus::Paused) {
        return Err(ApiError::invalid_state(format!(
            "capsule {id} is {}; its network can change while it is running or paused",
            c.status
        )));
    }
    let row = service::set_network(&st, &who, &c, policy).await?;
    Ok(Json(CapsuleView::from_row(&row)))
}

#[utoipa::path(delete, path = "/v1/capsules/{id}", tag = "capsules",
    params(("id" = String, Path)),
    responses((status = 204), (status = 401, body = ErrorBody), (status = 404, body = ErrorBody)),
    security(("api_key" = []), ("bearer" = [])))]
pub async fn destroy(
    State(st): S,
    Auth(who): Auth,
    Path(id): Path<String>,
) -> ApiResult<StatusCode> {
    let c = service::get(&st, &who, &id).await?;
    if matches!(c.status, CapsuleStatus::Stopped | CapsuleStatus::Error) {
        return Err(ApiError::not_found("capsule"));
    }
    service::destroy(&st, &who.actor, who.actor_name.clone(), &c).await?;
    Ok(StatusCode::NO_CONTENT)
}

#[utoipa::path(post, path = "/v1/capsules/{id}/ping", tag = "capsules",
    params(("id" = String, Path)),
    responses((status = 204), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)),
    security(("api_key" = []), ("bearer" = [])))]
pub async fn ping(State(st): S, Auth(who): Auth, Path(id): Path<String>) -> ApiResult<StatusCode> {
    let c = service::running(&st, &who, &id).await?;
    st.activity.forget(c.id.as_str());
    service::touch(&st, &c).await;
    Ok(StatusCode::NO_CONTENT)
}

#[utoipa::path(post, path = "/v1/capsules/{id}/pause", tag = "capsules",
    params(("id" = String, Path)),
    responses((status = 200, body = CapsuleView), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody), (status = 507, body = ErrorBody)),
    security(("api_key" = []), ("bearer" = [])))]
pub async fn pause(
    State(st): S,
    Auth(who): Auth,
    Path(id): Path<String>,
) -> ApiResult<Json<CapsuleView>> {
    let c = service::get(&st, &who, &id).await?;
    let row = service::pause(&st, &who.actor, who.actor_name.clone(), &c).await?;
    Ok(Json(CapsuleView::from_row(&row)))
}

#[utoipa::path(post, path = "/v1/capsules/{id}/resume", tag = "capsules",
    params(("id" = String, Path)),
    responses((status = 200, body = CapsuleView), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody), (status = 403, body = ErrorBody), (status = 429, body = ErrorBody), (status = 507, body = ErrorBody)),
    security(("api_key" = []), ("bearer" = [])))]
pub async fn resume(
    State(st): S,
    Auth(who): Auth,
    Path(id): Path<String>,
) -> ApiResult<Json<CapsuleView>> {
    let c = service::get(&st, &who, &id).await?;
    let row = service::resume(&st, &who, &c).await?;
    Ok(Json(CapsuleView::from_row(&row)))
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ExecBody {
    /// Program to run (e.g. `/bin/sh`).
    #[schema(min_length = 1)]
    pub cmd: String,
    #[serde(default)]
    pub args: Vec<String>,
    /// Foreground timeout in seconds (default 30), clamped to 1..86400.
    #[schema(value_type = Option<u64>, minimum = 0, maximum = 4294967295u64)]
    pub timeout_sec: Option<u32>,
    #[serde(default)]
    pub background: bool,
    /// Tag of a background process (default `proc-<8 hex>`).
    pub tag: Option<String>,
    pub envs: Option<HashMap<String, String>>,
    pub cwd: Option<String>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ExecResult {
    pub sandbox_id: String,
    pub cmd: String,
    pub stdout: String,
    pub stderr: String,
    pub exit_code: i32,
    pub duration_ms: u64,
    /// `utf-8`, or `base64` when the output is not valid UTF-8.
    pub encoding: String,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct BackgroundExec {
    pub sandbox_id: String,
    pub cmd: String,
    pub pid: u32,
    pub tag: String,
}

/// Writes an audit row off the request path (frequent guest operations).
pub fn audit_later(
    st: &Arc<AppState>,
    who: &crate::auth::Principal,
    action: &'static str,
    c: &wrenn_db::Capsule,
    metadata: serde_json::Value,
) {
    let (st, who, id) = (st.clone(), who.clone(), c.id.to_string());
    tokio::spawn(async move {
        st.audit(&who, action, "capsule", Some(&id), true, Some(metadata))
            .await;
    });
}

pub fn random_tag(prefix: &str) -> String {
    format!("{prefix}-{:08x}", rand::random::<u32>())
}

#[utoipa::path(post, path = "/v1/capsules/{id}/exec", tag = "exec",
    params(("id" = String, Path)), request_body = ExecBody,
    responses((status = 200, body = ExecResult), (status = 202, body = BackgroundExec),
        (status = 400, body = ErrorBody), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody),
        (status = 413, body = ErrorBody)),
    security(("api_key" = []), ("bearer" = [])))]
pub async fn exec(
    State(st): S,
    Auth(who): Auth,
    Path(id): Path<String>,
    body: Result<Json<ExecBody>, JsonRejection>,
) -> ApiResult<Response> {
    let Json(req) = body.map_err(json_rejection)?;
    if req.cmd.is_empty() {
        return Err(ApiError::invalid("cmd must not be empty"));
    }
    let c = service::running(&st, &who, &id).await?;
    service::touch(&st, &c).await;
    let guest = st.guest(&c).await.map_err(service::host_err)?;
    let timeout = Duration::from_secs(u64::from(req.timeout_sec.unwrap_or(30).clamp(1, 86_400)));
    let tag = req
        .background
        .then(|| req.tag.clone().unwrap_or_else(|| random_tag("proc")));
    let exec = ExecRequest {
        cmd: req.cmd.clone(),
        args: req.args.clone(),
        envs: req.envs.clone().unwrap_or_default(),
        cwd: req.cwd.clone(),
        timeout: (!req.background).then_some(timeout),
        tag: tag.clone(),
        ..Default::default()
    };
    let shown = std::iter::once(req.cmd.as_str())
        .chain(req.args.iter().map(String::as_str))
        .collect::<Vec<_>>()
        .join(" ");
    let started = Instant::now();
    let mut stream = guest.exec(&exec).await.map_err(service::guest_err)?;
    if let Some(tag) = tag {
        st.audit(
            &who,
            "capsule.exec",
            "capsule",
            Some(c.id.as_str()),
            true,
            Some(serde_json::json!({"background": true, "tag": tag})),
        )
        .await;
        let body = BackgroundExec {
            sandbox_id: c.id.to_string(),
            cmd: shown,
            pid: stream.pid,
            tag,
        };
        return Ok((StatusCode::ACCEPTED, Json(body)).into_response());
    }
    let (mut out, mut err) = (Vec::new(), Vec::new());
    let mut code = None;
    let deadline = tokio::time::Instant::now() + timeout + Duration::from_secs(5);
    loop {
        let ev = tokio::time::timeout_at(deadline, stream.events.recv()).await;
        match ev {
            Err(_) => {
                let _ = guest.signal(stream.pid, true).await;
                return Err(ApiError::new(
                    StatusCode::GATEWAY_TIMEOUT,
                    "timeout",
                    format!("command did not finish within {} s", timeout.as_secs()),
                ));
            }
            Ok(None) => break,
            Ok(Some(Err(e))) => return Err(service::guest_err(e)),
            Ok(Some(Ok(ExecEvent::Stdout(b) | ExecEvent::Stderr(b))))
                if (out.len() + err.len() + b.len()) as u64 > st.config.exec_output_limit =>
            {
                let _ = guest.signal(stream.pid, true).await;
                return Err(ApiError::new(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    "too_large",
                    format!(
                        "command output exceeds the limit of {} bytes (stdout and stderr \
                         together); the command was stopped. Redirect it to a file, or run it \
                         in the background (tag) and stream its output",
                        st.config.exec_output_limit
                    ),
                ));
            }
            Ok(Some(Ok(ExecEvent::Stdout(b)))) => out.extend_from_slice(&b),
            Ok(Some(Ok(ExecEvent::Stderr(b)))) => err.extend_from_slice(&b),
            Ok(Some(Ok(ExecEvent::Exited(s)))) => {
                code = Some(s.code);
                break;
            }
            Ok(Some(Ok(ExecEvent::Started { .. }))) => {}
        }
    }
    let duration_ms = started.elapsed().as_millis() as u64;
    st.metrics.exec_done(started.elapsed());
    audit_later(
        &st,
        &who,
        "capsule.exec",
        &c,
        serde_json::json!({"cmd": shown, "exit_code": code}),
    );
    let (stdout, stderr, encoding) = match (std::str::from_utf8(&out), std::str::from_utf8(&err)) {
        (Ok(o), Ok(e)) => (o.to_string(), e.to_string(), "utf-8"),
        _ => {
            let b64 = base64::engine::general_purpose::STANDARD;
            (b64.encode(&out), b64.encode(&err), "base64")
        }
    };
    Ok(Json(ExecResult {
        sandbox_id: c.id.to_string(),
        cmd: shown,
        stdout,
        stderr,
        exit_code: code.unwrap_or(-1),
        duration_ms,
        encoding: encoding.to_string(),
    })
    .into_response())
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ProcessView {
    pub pid: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tag: Option<String>,
    pub cmd: String,
    pub args: Vec<String>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ProcessList {
    pub processes: Vec<ProcessView>,
}

#[utoipa::path(get, path = "/v1/capsules/{id}/processes", tag = "exec",
    params(("id" = String, Path)),
    responses((status = 200, body = ProcessList), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)),
    security(("api_key" = []), ("bearer" = [])))]
pub async fn processes(
    State(st): S,
    Auth(who): Auth,
    Path(id): Path<String>,
) -> ApiResult<Json<ProcessList>> {
    let c = service::running(&st, &who, &id).await?;
    service::touch(&st, &c).await;
    let guest = st.guest(&c).await.map_err(service::host_err)?;
    let list = guest.list_processes().await.map_err(service::guest_err)?;
    Ok(Json(ProcessList {
        processes: list
            .into_iter()
            .map(|p| ProcessView {
                pid: p.pid,
                tag: p.tag,
                cmd: p.cmd,
                args: p.args,
            })
            .collect(),
    }))
}

/// Finds a process by pid or tag.
pub async fn select_process(
    guest: &dyn wrenn_core::guest::GuestAgent,
    selector: &str,
) -> ApiResult<u32> {
    let list = guest.list_processes().await.map_err(service::guest_err)?;
    let found = match selector.parse::<u32>() {
        Ok(pid) => list.iter().find(|p| p.pid == pid),
        Err(_) => list.iter().find(|p| p.tag.as_deref() == Some(selector)),
    };
    found
        .map(|p| p.pid)
        .ok_or_else(|| ApiError::not_found(&format!("process {selector}")))
}

#[derive(Debug, Deserialize, IntoParams)]
pub struct KillQuery {
    /// SIGKILL (default) or SIGTERM.
    pub signal: Option<String>,
}

#[utoipa::path(delete, path = "/v1/capsules/{id}/processes/{selector}", tag = "exec",
    params(("id" = String, Path), ("selector" = String, Path, description = "pid or tag"), KillQuery),
    responses((status = 204), (status = 400, body = ErrorBody), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)),
    security(("api_key" = []), ("bearer" = [])))]
pub async fn kill_process(
    State(st): S,
    Auth(who): Auth,
    Path((id, selector)): Path<(String, String)>,
    Query(q): Query<KillQuery>,
) -> ApiResult<StatusCode> {
    let kill = match q.signal.as_deref() {
        None | Some("SIGKILL") | Some("KILL") | Some("9") => true,
        Some("SIGTERM") | Some("TERM") | Some("15") => false,
        Some(other) => {
            return Err(ApiError::invalid(format!(
                "signal {other:?}: expected SIGKILL or SIGTERM"
            )))
        }
    };
    let c = service::running(&st, &who, &id).await?;
    service::touch(&st, &c).await;
    let guest = st.guest(&c).await.map_err(service::host_err)?;
    let pid = select_process(guest.as_ref(), &selector).await?;
    guest.signal(pid, kill).await.map_err(service::guest_err)?;
    st.audit(
        &who,
        "process.kill",
        "capsule",
        Some(c.id.as_str()),
        true,
        Some(serde_json::json!({"pid": pid})),
    )
    .await;
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Debug, Deserialize, IntoParams)]
pub struct RangeQuery {
    /// 5m, 10m, 1h, 2h, 6h, 12h or 24h (default 10m).
    pub range: Option<String>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct MetricPointView {
    pub timestamp_unix: i64,
    pub cpu_pct: f64,
    pub mem_bytes: u64,
    pub disk_bytes: u64,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct CapsuleMetrics {
    pub sandbox_id: String,
    pub range: String,
    pub points: Vec<MetricPointView>,
}

pub fn parse_range(r: Option<&str>) -> ApiResult<(String, Duration)> {
    let r = r.unwrap_or("10m");
    let secs = match r {
        "5m" => 300,
        "10m" => 600,
        "1h" => 3600,
        "2h" => 7200,
        "6h" => 6 * 3600,
        "12h" => 12 * 3600,
        "24h" => 24 * 3600,
        _ => {
            return Err(ApiError::invalid(format!(
                "range {r:?}: expected 5m, 10m, 1h, 2h, 6h, 12h or 24h"
            )))
        }
    };
    Ok((r.to_string(), Duration::from_secs(secs)))
}

/// Points of a capsule: live samples while it runs, the kept history while paused.
pub async fn metric_points(
    st: &AppState,
    c: &wrenn_db::Capsule,
    range: Duration,
) -> ApiResult<Vec<crate::agent::MetricPoint>> {
    match c.status {
        CapsuleStatus::Stopped | CapsuleStatus::Error => Err(ApiError::not_found("capsule")),
        CapsuleStatus::Running => Ok(st.agent_of(c)?.metrics(&c.id, range).await?),
        _ => {
            let saved = st.db.load_capsule_metrics(c.id.as_str()).await?;
            Ok(saved
                .map(|s| crate::metrics::points_from_saved(&s, range))
                .unwrap_or_default())
        }
    }
}

#[utoipa::path(get, path = "/v1/capsules/{id}/metrics", tag = "capsules",
    params(("id" = String, Path), RangeQuery),
    responses((status = 200, body = CapsuleMetrics), (status = 400, body = ErrorBody), (status = 404, body = ErrorBody)),
    security(("api_key" = []), ("bearer" = [])))]
pub async fn metrics(
    State(st): S,
    Auth(who): Auth,
    Path(id): Path<String>,
    Query(q): Query<RangeQuery>,
) -> ApiResult<Json<CapsuleMetrics>> {
    let (range, dur) = parse_range(q.range.as_deref())?;
    let c = service::get(&st, &who, &id).await?;
    let points = metric_points(&st, &c, dur).await?;
    Ok(Json(CapsuleMetrics {
        sandbox_id: c.id.to_string(),
        range,
        points: points
            .into_iter()
            .map(|p| MetricPointView {
                timestamp_unix: p.timestamp_unix,
                cpu_pct: p.cpu_pct,
                mem_bytes: p.mem_bytes,
                disk_bytes: p.disk_bytes,
            })
            .collect(),
    }))
}
