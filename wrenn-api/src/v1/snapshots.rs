//! `/v1/snapshots`: the team's snapshot templates plus the platform's templates.

use crate::auth::Auth;
use crate::error::{json_rejection, ApiError, ApiResult, ErrorBody};
use crate::service;
use crate::state::AppState;
use axum::extract::rejection::JsonRejection;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::Json;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::sync::Arc;
use utoipa::{IntoParams, ToSchema};

type S = State<Arc<AppState>>;

#[derive(Debug, Serialize, ToSchema)]
pub struct TemplateView {
    pub name: String,
    /// base or snapshot.
    #[serde(rename = "type")]
    pub kind: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub vcpus: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub memory_mb: Option<u32>,
    pub size_bytes: u64,
    pub created_at: chrono::DateTime<chrono::Utc>,
    /// Platform-managed (visible to every team).
    pub platform: bool,
    /// Cannot be deleted.
    pub protected: bool,
    pub metadata: HashMap<String, String>,
}

/// The platform templates (a host's own: built in, or made by platform builds).
pub async fn platform_views(st: &AppState) -> ApiResult<Vec<TemplateView>> {
    let any = st.hosts.any().map_err(service::host_err)?;
    let mut out = Vec::new();
    for t in any.agent.templates().await.map_err(service::host_err)? {
        if service::is_private_host_template(&t.name) {
            continue;
        }
        out.push(TemplateView {
            name: t.name,
            kind: "base".into(),
            vcpus: t.vcpus,
            memory_mb: t.memory_mb,
            size_bytes: t.size_bytes,
            created_at: t.created_at.map(chrono::DateTime::from).unwrap_or_default(),
            platform: true,
            protected: true,
            metadata: HashMap::new(),
        });
    }
    Ok(out)
}

pub fn team_view(t: &wrenn_db::Template) -> TemplateView {
    let mut metadata: HashMap<String, String> = t
        .metadata
        .iter()
        .filter(|(k, _)| k.as_str() != service::HOST_TEMPLATE_KEY)
        .filter_map(|(k, v)| v.as_str().map(|s| (k.clone(), s.to_string())))
        .collect();
    if let Some(src) = &t.source_capsule {
        metadata.insert("source_capsule".into(), src.clone());
    }
    TemplateView {
        name: t.name.to_string(),
        kind: t.kind.as_str().to_string(),
        vcpus: t.vcpus,
        memory_mb: t.memory_mb,
        size_bytes: t.size_bytes,
        created_at: t.created_at,
        platform: false,
        protected: false,
        metadata,
    }
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateSnapshotRequest {
    /// The running capsule to snapshot.
    pub sandbox_id: String,
    /// Template name; `template-<8 hex>` if omitted.
    pub name: Option<String>,
}

#[derive(Debug, Deserialize, IntoParams)]
pub struct OverwriteQuery {
    /// Replace an existing snapshot of the same name.
    pub overwrite: Option<bool>,
}

#[utoipa::path(post, path = "/v1/snapshots", tag = "snapshots",
    request_body = CreateSnapshotRequest, params(OverwriteQuery),
    responses((status = 201, body = TemplateView), (status = 400, body = ErrorBody),
        (status = 404, body = ErrorBody), (status = 409, body = ErrorBody), (status = 403, body = ErrorBody), (status = 429, body = ErrorBody), (status = 507, body = ErrorBody)),
    security(("api_key" = []), ("bearer" = [])))]
pub async fn create(
    State(st): S,
    Auth(who): Auth,
    q: Result<Query<OverwriteQuery>, axum::extract::rejection::QueryRejection>,
    body: Result<Json<CreateSnapshotRequest>, JsonRejection>,
) -> ApiResult<(StatusCode, Json<TemplateView>)> {
    let Query(q) = q.map_err(crate::error::query_rejection)?;
    let Json(req) = body.map_err(json_rejection)?;
    let name = req
        .name
        .filter(|n| !n.is_empty())
        .unwrap_or_else(|| format!("template-{:08x}", rand::random::<u32>()));
    wrenn_core::template::TemplateName::parse(&name)
        .map_err(|e| ApiError::invalid(format!("name: {e}")))?;
    let c = service::get(&st, &who, &req.sandbox_id).await?;
    let t = service::snapshot_with(&st, &who, &c, &name, q.overwrite == Some(true)).await?;
    Ok((StatusCode::CREATED, Json(team_view(&t))))
}

#[derive(Debug, Deserialize, IntoParams)]
pub struct TypeQuery {
    /// base or snapshot.
    #[serde(rename = "type")]
    pub kind: Option<String>,
}

#[utoipa::path(get, path = "/v1/snapshots", tag = "snapshots", params(TypeQuery),
    responses((status = 200, body = Vec<TemplateView>), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody)),
    security(("api_key" = []), ("bearer" = [])))]
pub async fn list(
    State(st): S,
    Auth(who): Auth,
    Query(q): Query<TypeQuery>,
) -> ApiResult<Json<Vec<TemplateView>>> {
    let kind =
        match q.kind.as_deref() {
            None | Some("") => None,
            Some(k) => Some(wrenn_db::TemplateKind::parse(k).ok_or_else(|| {
                ApiError::invalid(format!("type {k:?}: expected base or snapshot"))
            })?),
        };
    let mut out = Vec::new();
    if kind != Some(wrenn_db::TemplateKind::Snapshot) {
        out.extend(platform_views(&st).await?);
    }
    let team = st.db.list_templates(&who.team_id, kind).await?;
    out.extend(team.iter().map(team_view));
    Ok(Json(out))
}

#[utoipa::path(delete, path = "/v1/snapshots/{name}", tag = "snapshots",
    params(("name" = String, Path)),
    responses((status = 204), (status = 403, body = ErrorBody), (status = 404, body = ErrorBody)),
    security(("api_key" = []), ("bearer" = [])))]
pub async fn delete(
    State(st): S,
    Auth(who): Auth,
    Path(name): Path<String>,
) -> ApiResult<StatusCode> {
    if wrenn_core::template::TemplateName::parse(&name).is_err() {
        return Err(ApiError::not_found(&format!("template {name}")));
    }
    match st.db.get_template(&who.team_id, &name).await {
        Ok(_) => {}
        Err(e) if e.is_not_found() => {
            let platform = match st.hosts.any() {
                Ok(h) => h.agent.template(&name).await.is_ok(),
                Err(_) => false,
            };
            if platform && !service::is_private_host_template(&name) {
                return Err(ApiError::forbidden(format!(
                    "{name} is a protected platform template"
                )));
            }
            return Err(ApiError::not_found(&format!("template {name}")));
        }
        Err(e) => return Err(e.into()),
    }
    service::delete_snapshot(&st, &who, &name).await?;
    Ok(StatusCode::NO_CONTENT)
}
