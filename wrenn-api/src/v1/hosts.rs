//! `/v1/hosts`: the hosts that run capsules, for platform admins — what each is, its
//! status as the host monitor last saw it, and the capsules it runs or holds.

use crate::auth::Auth;
use crate::error::{ApiError, ApiResult, ErrorBody};
use crate::state::AppState;
use crate::v1::admin::platform_admin;
use axum::extract::{Path, State};
use axum::Json;
use serde::Serialize;
use std::sync::Arc;
use utoipa::ToSchema;

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
