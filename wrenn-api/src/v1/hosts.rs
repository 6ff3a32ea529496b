//! `/v1/hosts`: the hosts that run capsules, for platform admins — what each is, its
//! status as the host monitor last saw it, and the capsules it runs or holds; creating
//! hosts (with a one-time registration token), their tags, and deleting them. And
//! `POST /v1/hosts/register`, where an agent trades its token for its certificate.

use crate::auth::Auth;
use crate::error::{json_rejection, ApiError, ApiResult, ErrorBody};
use crate::state::AppState;
use crate::v1::admin::platform_admin;
use axum::extract::rejection::JsonRejection;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::{Deserialize, Serialize};
use std::sync::Arc;
use utoipa::{IntoParams, ToSchema};
use wrenn_core::scheduler::HostId;

type S = State<Arc<AppState>>;

/// A host, as the reference's `Host` (fields it does not have yet are left out).
#[derive(Debug, Serialize, ToSchema)]
pub struct HostView {
    pub id: String,
    /// `regular`, or `byoc` for a team-owned host.
    #[serde(rename = "type")]
    pub kind: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub team_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub arch: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cpu_cores: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub memory_mb: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub disk_gb: Option<u64>,
    /// The agent's endpoint (absent for the control plane's in-process host).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub address: Option<String>,
    /// `pending`, `online`, `offline`, `draining` or `unreachable`.
    pub status: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_heartbeat_at: Option<chrono::DateTime<chrono::Utc>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub provider: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub availability_zone: Option<String>,
    /// The admin who created it (absent for hosts given on the command line).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub created_by: Option<String>,
    /// When its certificate expires (registered hosts).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cert_expires_at: Option<chrono::DateTime<chrono::Utc>>,
    pub created_at: chrono::DateTime<chrono::Utc>,
    pub updated_at: chrono::DateTime<chrono::Utc>,
}

impl From<wrenn_db::Host> for HostView {
    fn from(h: wrenn_db::Host) -> Self {
        HostView {
            id: h.id.0,
            kind: if h.team_id.is_some() {
                "byoc"
            } else {
                "regular"
            }
            .into(),
            team_id: h.team_id,
            arch: h.arch,
            cpu_cores: h.cpu_cores,
            memory_mb: h.memory_mb,
            disk_gb: h.disk_gb,
            address: h.address,
            status: h.status.as_str().into(),
            last_heartbeat_at: h.last_heartbeat_at,
            provider: h.provider,
            availability_zone: h.availability_zone,
            created_by: h.created_by,
            cert_expires_at: h.cert_expires_at,
            created_at: h.created_at,
            updated_at: h.updated_at,
        }
    }
}

/// A host and the capsules that deleting it would take with it.
#[derive(Debug, Serialize, ToSchema)]
pub struct DeletePreview {
    pub host: HostView,
    /// Capsules (not stopped) the host runs or holds paused.
    pub sandbox_ids: Vec<String>,
}

async fn host(st: &AppState, id: &str) -> ApiResult<wrenn_db::Host> {
    st.db.system_host(id).await.map_err(|e| {
        if e.is_not_found() {
            ApiError::not_found(&format!("host {id}"))
        } else {
            e.into()
        }
    })
}

#[utoipa::path(get, path = "/v1/hosts", tag = "hosts",
    responses((status = 200, body = Vec<HostView>), (status = 401, body = ErrorBody), (status = 403, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn list(State(st): S, Auth(who): Auth) -> ApiResult<Json<Vec<HostView>>> {
    platform_admin(&who)?;
    let hosts = st.db.system_hosts().await?;
    Ok(Json(hosts.into_iter().map(HostView::from).collect()))
}

#[utoipa::path(get, path = "/v1/hosts/{id}", tag = "hosts",
    params(("id" = String, Path)),
    responses((status = 200, body = HostView), (status = 401, body = ErrorBody),
        (status = 403, body = ErrorBody), (status = 404, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn get(
    State(st): S,
    Auth(who): Auth,
    Path(id): Path<String>,
) -> ApiResult<Json<HostView>> {
    platform_admin(&who)?;
    Ok(Json(host(&st, &id).await?.into()))
}

#[utoipa::path(get, path = "/v1/hosts/{id}/delete-preview", tag = "hosts",
    params(("id" = String, Path)),
    responses((status = 200, body = DeletePreview), (status = 401, body = ErrorBody),
        (status = 403, body = ErrorBody), (status = 404, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn delete_preview(
    State(st): S,
    Auth(who): Auth,
    Path(id): Path<String>,
) -> ApiResult<Json<DeletePreview>> {
    platform_admin(&who)?;
    let h = host(&st, &id).await?;
    let sandbox_ids = st.db.system_host_capsules(&id).await?;
    Ok(Json(DeletePreview {
        host: h.into(),
        sandbox_ids,
    }))
}

fn body<T>(b: Result<Json<T>, JsonRejection>) -> ApiResult<T> {
    b.map(|Json(v)| v).map_err(json_rejection)
}

/// A host to create.
#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateHost {
    /// `regular` (default) or `byoc` (owned by `team_id`, which only that team's
    /// capsules use).
    #[serde(rename = "type", default)]
    pub kind: Option<String>,
    pub team_id: Option<String>,
    pub provider: Option<String>,
    pub availability_zone: Option<String>,
}

/// A host and the token its agent registers with (valid one hour, once; shown once).
#[derive(Debug, Serialize, ToSchema)]
pub struct HostWithToken {
    pub host: HostView,
    pub registration_token: String,
}

fn short_text(what: &str, v: &Option<String>) -> ApiResult<()> {
    match v {
        Some(s) if s.is_empty() || s.len() > 64 || s.chars().any(char::is_control) => Err(
            ApiError::invalid(format!("{what} must be 1 to 64 printable characters")),
        ),
        _ => Ok(()),
    }
}

#[utoipa::path(post, path = "/v1/hosts", tag = "hosts", request_body = CreateHost,
    responses((status = 201, body = HostWithToken), (status = 400, body = ErrorBody),
        (status = 401, body = ErrorBody), (status = 403, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn create(
    State(st): S,
    Auth(who): Auth,
    req: Result<Json<CreateHost>, JsonRejection>,
) -> ApiResult<(StatusCode, Json<HostWithToken>)> {
    platform_admin(&who)?;
    let req = body(req)?;
    let byoc = match req.kind.as_deref() {
        None | Some("regular") => false,
        Some("byoc") => true,
        Some(other) => {
            return Err(ApiError::invalid(format!(
                "type {other:?}: expected \"regular\" or \"byoc\""
            )))
        }
    };
    match (byoc, &req.team_id) {
        (true, None) => {
            return Err(ApiError::invalid(
                "a byoc host needs the team_id that owns it",
            ))
        }
        (false, Some(_)) => {
            return Err(ApiError::invalid(
                "team_id is for byoc hosts (set \"type\": \"byoc\")",
            ))
        }
        (true, Some(team)) => {
            st.db.get_team(team).await.map_err(|e| {
                if e.is_not_found() {
                    ApiError::invalid(format!("team {team} does not exist"))
                } else {
                    e.into()
                }
            })?;
        }
        (false, None) => {}
    }
    short_text("provider", &req.provider)?;
    short_text("availability_zone", &req.availability_zone)?;
    let (host, token) = st
        .db
        .create_host(&wrenn_db::NewHost {
            team_id: req.team_id,
            provider: req.provider,
            availability_zone: req.availability_zone,
            created_by: Some(who.user()?.sub.clone()),
        })
        .await?;
    st.audit(&who, "host.create", "host", Some(&host.id.0), true, None)
        .await;
    Ok((
        StatusCode::CREATED,
        Json(HostWithToken {
            host: host.into(),
            registration_token: token,
        }),
    ))
}

#[utoipa::path(post, path = "/v1/hosts/{id}/token", tag = "hosts",
    params(("id" = String, Path)),
    responses((status = 201, body = HostWithToken), (status = 401, body = ErrorBody),
        (status = 403, body = ErrorBody), (status = 404, body = ErrorBody),
        (status = 409, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn new_token(
    State(st): S,
    Auth(who): Auth,
    Path(id): Path<String>,
) -> ApiResult<(StatusCode, Json<HostWithToken>)> {
    platform_admin(&who)?;
    let h = host(&st, &id).await?;
    if h.address.is_none() && h.status != wrenn_db::HostStatus::Pending {
        return Err(ApiError::invalid_state(format!(
            "host {id} is not a registered host (it was given on the command line)"
        )));
    }
    let token = st
        .db
        .new_host_token(&id, Some(&who.user()?.sub))
        .await
        .map_err(|e| {
            if e.is_not_found() {
                ApiError::not_found(&format!("host {id}"))
            } else {
                e.into()
            }
        })?;
    st.audit(&who, "host.token", "host", Some(&id), true, None)
        .await;
    Ok((
        StatusCode::CREATED,
        Json(HostWithToken {
            host: h.into(),
            registration_token: token,
        }),
    ))
}

#[derive(Debug, Default, Deserialize, IntoParams)]
pub struct DeleteQuery {
    /// Destroy the host's capsules (running and paused) with it.
    #[serde(default)]
    pub force: bool,
}

/// 409 naming the capsules that keep a host from being deleted (ids also at the top
/// level, where the reference SDK reads them).
fn has_capsules(id: &str, ids: Vec<String>) -> Response {
    let message = format!(
        "host {id} runs or holds {} capsule(s); destroy them or delete with ?force=true",
        ids.len()
    );
    (
        StatusCode::CONFLICT,
        Json(serde_json::json!({
            "error": {"code": "host_has_capsules", "message": message, "sandbox_ids": ids},
            "capsule_ids": ids,
            "sandbox_ids": ids,
        })),
    )
        .into_response()
}

#[utoipa::path(delete, path = "/v1/hosts/{id}", tag = "hosts",
    params(("id" = String, Path), DeleteQuery),
    responses((status = 204), (status = 401, body = ErrorBody), (status = 403, body = ErrorBody),
        (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn delete(
    State(st): S,
    Auth(who): Auth,
    Path(id): Path<String>,
    Query(q): Query<DeleteQuery>,
) -> ApiResult<Response> {
    platform_admin(&who)?;
    let h = host(&st, &id).await?;
    if h.address.is_none() && h.status != wrenn_db::HostStatus::Pending {
        return Err(ApiError::invalid_state(format!(
            "host {id} is not a registered host: stop its agent or the server instead"
        )));
    }
    let ids = st.db.system_host_capsules(&id).await?;
    if !ids.is_empty() && !q.force {
        return Ok(has_capsules(&id, ids));
    }
    for cid in &ids {
        let c = match st.capsule_cache.get(&st.db, None, cid).await {
            Ok(c) => c,
            Err(e) if e.is_not_found() => continue,
            Err(e) => return Err(e.into()),
        };
        // An unreachable host's capsules go with it: their rows end stopped.
        if let Err(e) = crate::service::destroy(&st, &who.actor, who.actor_name.clone(), &c).await {
            tracing::warn!(capsule = %cid, host = %id, error = %e,
                "host delete: capsule not destroyed on its host; recorded stopped");
            crate::service::set_status(&st, &c, wrenn_core::status::CapsuleStatus::Stopped).await?;
        }
    }
    st.db.delete_host(&id).await?;
    st.hosts.remove(&HostId(id.clone()));
    st.audit(
        &who,
        "host.delete",
        "host",
        Some(&id),
        true,
        Some(serde_json::json!({ "capsules": ids.len() })),
    )
    .await;
    Ok(StatusCode::NO_CONTENT.into_response())
}

#[utoipa::path(get, path = "/v1/hosts/{id}/tags", tag = "hosts",
    params(("id" = String, Path)),
    responses((status = 200, body = Vec<String>), (status = 401, body = ErrorBody),
        (status = 403, body = ErrorBody), (status = 404, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn tags(
    State(st): S,
    Auth(who): Auth,
    Path(id): Path<String>,
) -> ApiResult<Json<Vec<String>>> {
    platform_admin(&who)?;
    host(&st, &id).await?;
    Ok(Json(st.db.host_tags(&id).await?))
}

/// A tag to add.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct AddTag {
    pub tag: String,
}

fn valid_tag(tag: &str) -> ApiResult<()> {
    let ok = !tag.is_empty()
        && tag.len() <= 63
        && tag
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.:=/".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(ApiError::invalid(
            "a tag is 1 to 63 letters, digits or - _ . : = /",
        ))
    }
}

#[utoipa::path(post, path = "/v1/hosts/{id}/tags", tag = "hosts", request_body = AddTag,
    params(("id" = String, Path)),
    responses((status = 201, body = Vec<String>), (status = 400, body = ErrorBody),
        (status = 401, body = ErrorBody), (status = 403, body = ErrorBody),
        (status = 404, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn add_tag(
    State(st): S,
    Auth(who): Auth,
    Path(id): Path<String>,
    req: Result<Json<AddTag>, JsonRejection>,
) -> ApiResult<(StatusCode, Json<Vec<String>>)> {
    platform_admin(&who)?;
    let req = body(req)?;
    valid_tag(&req.tag)?;
    host(&st, &id).await?;
    st.db.add_host_tag(&id, &req.tag).await?;
    st.audit(
        &who,
        "host.tag",
        "host",
        Some(&id),
        true,
        Some(serde_json::json!({"tag": req.tag})),
    )
    .await;
    Ok((StatusCode::CREATED, Json(st.db.host_tags(&id).await?)))
}

#[utoipa::path(delete, path = "/v1/hosts/{id}/tags/{tag}", tag = "hosts",
    params(("id" = String, Path), ("tag" = String, Path)),
    responses((status = 204), (status = 401, body = ErrorBody), (status = 403, body = ErrorBody),
        (status = 404, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn remove_tag(
    State(st): S,
    Auth(who): Auth,
    Path((id, tag)): Path<(String, String)>,
) -> ApiResult<StatusCode> {
    platform_admin(&who)?;
    host(&st, &id).await?;
    if !st.db.remove_host_tag(&id, &tag).await? {
        return Err(ApiError::not_found(&format!("tag {tag:?} of host {id}")));
    }
    st.audit(
        &who,
        "host.untag",
        "host",
        Some(&id),
        true,
        Some(serde_json::json!({"tag": tag})),
    )
    .await;
    Ok(StatusCode::NO_CONTENT)
}

/// An agent's registration: its one-time token and what it detected of its machine.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Register {
    pub token: String,
    pub arch: String,
    pub cpu_cores: u32,
    pub memory_mb: u64,
    pub disk_gb: u64,
    /// Where the control plane reaches the agent (`host:port`).
    pub address: String,
    /// With a join token: the id the new host gets (a lowercase DNS name, e.g. the
    /// Kubernetes node's name); default generated. A one-time token's host has its id.
    #[serde(default)]
    pub host_id: Option<String>,
}

/// What a registered agent serves with: its host certificate and key, and the CA of
/// the control plane's certificates (the only clients it accepts).
#[derive(Debug, Serialize, ToSchema)]
pub struct Registered {
    pub host: HostView,
    pub cert_pem: String,
    pub key_pem: String,
    /// The CA the control plane's client certificates come from.
    pub ca_cert_pem: String,
    pub cert_expires_at: chrono::DateTime<chrono::Utc>,
    /// Trades for a renewed certificate (`POST /v1/hosts/auth/refresh`), once: each
    /// use gives the next one. Valid 60 days.
    pub refresh_token: String,
}

/// A registered agent's refresh token.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Refresh {
    pub refresh_token: String,
}

fn valid_address(a: &str) -> ApiResult<()> {
    let (host, port) = a
        .rsplit_once(':')
        .ok_or_else(|| ApiError::invalid(format!("address {a:?}: expected host:port")))?;
    let port_ok = port.parse::<u16>().is_ok_and(|p| p > 0);
    let host_ok = !host.is_empty()
        && host.len() <= 253
        && (host.parse::<std::net::IpAddr>().is_ok()
            || host
                .trim_start_matches('[')
                .trim_end_matches(']')
                .parse::<std::net::Ipv6Addr>()
                .is_ok()
            || host
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.'));
    if port_ok && host_ok {
        Ok(())
    } else {
        Err(ApiError::invalid(format!(
            "address {a:?}: expected host:port"
        )))
    }
}

#[utoipa::path(post, path = "/v1/hosts/register", tag = "hosts", request_body = Register,
    responses((status = 201, body = Registered), (status = 400, body = ErrorBody),
        (status = 401, body = ErrorBody), (status = 503, body = ErrorBody)))]
pub async fn register(
    State(st): S,
    req: Result<Json<Register>, JsonRejection>,
) -> ApiResult<(StatusCode, Json<Registered>)> {
    let req = body(req)?;
    valid_address(&req.address)?;
    if req.arch.is_empty() || req.arch.len() > 32 || req.cpu_cores == 0 || req.memory_mb == 0 {
        return Err(ApiError::invalid(
            "arch, cpu_cores and memory_mb describe the machine (non-empty, above zero)",
        ));
    }
    let cluster = st.cluster.get().ok_or_else(|| {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "unavailable",
            "this control plane is starting; register again shortly",
        )
    })?;
    let specs = wrenn_db::HostSpecs {
        arch: req.arch.clone(),
        cpu_cores: req.cpu_cores,
        memory_mb: req.memory_mb,
        disk_gb: req.disk_gb,
    };
    let redeemed = if req.token.trim().starts_with(JOIN_TOKEN_PREFIX) {
        let id = match &req.host_id {
            Some(id) => HostId::parse(id).map_err(ApiError::invalid)?,
            None => HostId(wrenn_db::new_id(wrenn_db::prefix::HOST)),
        };
        st.db
            .join_host(req.token.trim(), &id.0, &req.address, &specs)
            .await?
    } else {
        st.db
            .redeem_host_token(&req.token, &req.address, &specs)
            .await?
    };
    let h = match redeemed {
        Ok(h) => h,
        Err(bad) => {
            st.audit_platform(
                "host.register",
                None,
                false,
                serde_json::json!({"address": req.address, "reason": bad.to_string()}),
            )
            .await;
            return Err(ApiError::unauthorized(bad.to_string()));
        }
    };
    let refresh_token = st.db.new_host_refresh_token(&h.id.0).await?;
    let creds = credentials(&st, cluster, &h.id.0, refresh_token).await?;
    if let Some(team) = &h.team_id {
        st.audit_team(
            team,
            wrenn_db::Actor::System,
            None,
            "host.register",
            "host",
            Some(&h.id.0),
            true,
            Some(serde_json::json!({"address": req.address})),
        )
        .await;
    }
    st.audit_platform(
        "host.register",
        Some(&h.id.0),
        true,
        serde_json::json!({"address": req.address, "cert_expires_at": creds.cert_expires_at}),
    )
    .await;
    Ok((StatusCode::CREATED, Json(creds)))
}

/// Issues host `id` a certificate and records it; the registration answer.
async fn credentials(
    st: &AppState,
    cluster: &crate::cluster::Cluster,
    id: &str,
    refresh_token: String,
) -> ApiResult<Registered> {
    let issued = cluster
        .pki
        .issue_host(id)
        .map_err(|e| ApiError::internal(format!("cannot issue the host certificate: {e}")))?;
    let expires: chrono::DateTime<chrono::Utc> = issued.not_after.into();
    st.db
        .set_host_certificate(id, &issued.fingerprint, expires)
        .await?;
    let h = host(st, id).await?;
    Ok(Registered {
        host: h.into(),
        cert_pem: issued.cert_pem,
        key_pem: issued.key_pem,
        ca_cert_pem: cluster.pki.control_plane_ca_pem().to_string(),
        cert_expires_at: expires,
        refresh_token,
    })
}

#[utoipa::path(post, path = "/v1/hosts/auth/refresh", tag = "hosts", request_body = Refresh,
    responses((status = 200, body = Registered), (status = 400, body = ErrorBody),
        (status = 401, body = ErrorBody), (status = 503, body = ErrorBody)))]
/// Renews a registered agent's certificate: its refresh token (used once) gives a new
/// certificate and key, and the next refresh token.
pub async fn refresh(
    State(st): S,
    req: Result<Json<Refresh>, JsonRejection>,
) -> ApiResult<Json<Registered>> {
    let req = body(req)?;
    let cluster = st.cluster.get().ok_or_else(|| {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "unavailable",
            "this control plane is starting; try again shortly",
        )
    })?;
    let (h, next) = match st.db.redeem_host_refresh_token(&req.refresh_token).await? {
        Ok(found) => found,
        Err(bad) => {
            st.audit_platform(
                "host.refresh",
                None,
                false,
                serde_json::json!({"reason": bad.to_string()}),
            )
            .await;
            return Err(ApiError::unauthorized(bad.to_string()));
        }
    };
    let creds = credentials(&st, cluster, &h.id.0, next).await?;
    st.audit_platform(
        "host.refresh",
        Some(&h.id.0),
        true,
        serde_json::json!({"cert_expires_at": creds.cert_expires_at}),
    )
    .await;
    Ok(Json(creds))
}

async fn set_draining(
    st: &AppState,
    who: &crate::auth::Principal,
    id: &str,
    draining: bool,
) -> ApiResult<Json<HostView>> {
    platform_admin(who)?;
    let h = host(st, id).await?;
    st.db.set_host_draining(id, draining).await?;
    st.hosts.set_policy(&h.id, draining, h.team_id.clone());
    // The agent refuses new capsules itself too; one that does not answer now is told
    // by the host monitor when it does.
    if let Ok(conn) = st.hosts.get(&h.id) {
        if let Err(e) = conn.agent.drain(draining).await {
            tracing::warn!(host = %h.id, error = %e, "the agent was not told of the drain yet");
        }
    }
    let action = if draining {
        "host.drain"
    } else {
        "host.undrain"
    };
    st.audit(who, action, "host", Some(id), true, None).await;
    Ok(Json(host(st, id).await?.into()))
}

#[utoipa::path(post, path = "/v1/hosts/{id}/drain", tag = "hosts",
    params(("id" = String, Path)),
    responses((status = 200, body = HostView), (status = 401, body = ErrorBody),
        (status = 403, body = ErrorBody), (status = 404, body = ErrorBody)),
    security(("bearer" = [])))]
/// Drains a host: it keeps its capsules and takes no new ones.
pub async fn drain(
    State(st): S,
    Auth(who): Auth,
    Path(id): Path<String>,
) -> ApiResult<Json<HostView>> {
    set_draining(&st, &who, &id, true).await
}

#[utoipa::path(delete, path = "/v1/hosts/{id}/drain", tag = "hosts",
    params(("id" = String, Path)),
    responses((status = 200, body = HostView), (status = 401, body = ErrorBody),
        (status = 403, body = ErrorBody), (status = 404, body = ErrorBody)),
    security(("bearer" = [])))]
/// Ends a drain: the host takes new capsules again.
pub async fn undrain(
    State(st): S,
    Auth(who): Auth,
    Path(id): Path<String>,
) -> ApiResult<Json<HostView>> {
    set_draining(&st, &who, &id, false).await
}

/// What join tokens start with (one-time host tokens do not).
const JOIN_TOKEN_PREFIX: &str = wrenn_db::prefix::HOST_JOIN;

/// A join token to create: it registers hosts until it expires, is revoked or has
/// registered `max_hosts`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewJoinToken {
    /// Most hosts it registers (default: no limit).
    #[serde(default)]
    #[schema(minimum = 1)]
    pub max_hosts: Option<u32>,
    /// Hours it works (1 to 720, default 24).
    #[serde(default)]
    #[schema(minimum = 1, maximum = 720)]
    pub ttl_hours: Option<u32>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct JoinTokenView {
    pub id: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_hosts: Option<u32>,
    /// Hosts registered with it.
    pub used: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub created_by: Option<String>,
    pub created_at: chrono::DateTime<chrono::Utc>,
    pub expires_at: chrono::DateTime<chrono::Utc>,
    /// The token itself: only in the answer that created it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub token: Option<String>,
}

impl From<wrenn_db::JoinToken> for JoinTokenView {
    fn from(j: wrenn_db::JoinToken) -> Self {
        JoinTokenView {
            id: j.id,
            max_hosts: j.max_hosts,
            used: j.used,
            created_by: j.created_by,
            created_at: j.created_at,
            expires_at: j.expires_at,
            token: None,
        }
    }
}

#[utoipa::path(post, path = "/v1/hosts/join-tokens", tag = "hosts", request_body = NewJoinToken,
    responses((status = 201, body = JoinTokenView), (status = 400, body = ErrorBody),
        (status = 401, body = ErrorBody), (status = 403, body = ErrorBody)),
    security(("bearer" = [])))]
/// Creates a join token (platform admins): agents register with it as new regular
/// hosts (`wrenn agent --register TOKEN --host-id ID`), e.g. a Kubernetes DaemonSet's.
pub async fn create_join_token(
    State(st): S,
    Auth(who): Auth,
    req: Result<Json<NewJoinToken>, JsonRejection>,
) -> ApiResult<(StatusCode, Json<JoinTokenView>)> {
    platform_admin(&who)?;
    let req = body(req)?;
    if req.max_hosts == Some(0) {
        return Err(ApiError::invalid("max_hosts must be at least 1"));
    }
    let hours = req.ttl_hours.unwrap_or(24);
    if !(1..=720).contains(&hours) {
        return Err(ApiError::invalid("ttl_hours must be 1 to 720"));
    }
    let by = who.user()?.sub.clone();
    let (row, token) = st
        .db
        .create_join_token(
            req.max_hosts,
            std::time::Duration::from_secs(u64::from(hours) * 3600),
            Some(&by),
        )
        .await?;
    st.audit(
        &who,
        "host.join_token",
        "host",
        None,
        true,
        Some(serde_json::json!({"join_token": row.id, "max_hosts": row.max_hosts})),
    )
    .await;
    let mut view = JoinTokenView::from(row);
    view.token = Some(token);
    Ok((StatusCode::CREATED, Json(view)))
}

#[utoipa::path(get, path = "/v1/hosts/join-tokens", tag = "hosts",
    responses((status = 200, body = Vec<JoinTokenView>), (status = 401, body = ErrorBody),
        (status = 403, body = ErrorBody)),
    security(("bearer" = [])))]
/// The join tokens (without their values).
pub async fn join_tokens(State(st): S, Auth(who): Auth) -> ApiResult<Json<Vec<JoinTokenView>>> {
    platform_admin(&who)?;
    Ok(Json(
        st.db
            .join_tokens()
            .await?
            .into_iter()
            .map(JoinTokenView::from)
            .collect(),
    ))
}

#[utoipa::path(delete, path = "/v1/hosts/join-tokens/{id}", tag = "hosts",
    params(("id" = String, Path)),
    responses((status = 204), (status = 401, body = ErrorBody),
        (status = 403, body = ErrorBody), (status = 404, body = ErrorBody)),
    security(("bearer" = [])))]
/// Revokes a join token (hosts registered with it stay).
pub async fn delete_join_token(
    State(st): S,
    Auth(who): Auth,
    Path(id): Path<String>,
) -> ApiResult<StatusCode> {
    platform_admin(&who)?;
    if !st.db.delete_join_token(&id).await? {
        return Err(ApiError::not_found(&format!("join token {id}")));
    }
    st.audit(
        &who,
        "host.join_token.delete",
        "host",
        None,
        true,
        Some(serde_json::json!({"join_token": id})),
    )
    .await;
    Ok(StatusCode::NO_CONTENT)
}
