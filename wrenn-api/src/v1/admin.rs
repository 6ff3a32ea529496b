//! `/v1/admin/…`: operator routes, for platform admins (a user token whose account is
//! an admin of the platform, not only of a team).

use crate::auth::Auth;
use crate::error::{json_rejection, ApiError, ApiResult, ErrorBody};
use crate::service;
use crate::state::AppState;
use axum::extract::rejection::JsonRejection;
use axum::extract::{Path, State};
use axum::Json;
use serde::{Deserialize, Serialize};
use std::sync::Arc;
use utoipa::ToSchema;

type S = State<Arc<AppState>>;

/// One template's warm pool.
#[derive(Debug, Serialize, ToSchema)]
pub struct PoolView {
    pub template: String,
    /// Ready capsules kept.
    pub target: usize,
    pub ready: usize,
    pub filling: usize,
    pub hits: u64,
    pub misses: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_refill_ms: Option<u64>,
    /// Guest memory of the ready and filling entries, in MiB.
    pub memory_mb: u64,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SetPool {
    /// Ready capsules to keep (0 = no pool).
    #[schema(maximum = 64)]
    pub size: usize,
}

/// Most ready capsules one pool may keep.
const MAX_POOL: usize = 64;

pub(crate) fn platform_admin(who: &crate::auth::Principal) -> ApiResult<()> {
    if who.user()?.is_admin {
        Ok(())
    } else {
        Err(ApiError::forbidden(
            "this route is for platform admins (the bootstrap admin account)",
        ))
    }
}

/// The warm pools of every host, summed per template.
async fn views(st: &AppState) -> ApiResult<Vec<PoolView>> {
    let mut by_template: std::collections::BTreeMap<String, PoolView> = Default::default();
    for host in st.hosts.all() {
        for p in host.agent.pools().await? {
            let v = by_template
                .entry(p.template.clone())
                .or_insert_with(|| PoolView {
                    template: p.template.clone(),
                    target: 0,
                    ready: 0,
                    filling: 0,
                    hits: 0,
                    misses: 0,
                    last_refill_ms: None,
                    memory_mb: 0,
                });
            v.target += p.target;
            v.ready += p.ready;
            v.filling += p.filling;
            v.hits += p.hits;
            v.misses += p.misses;
            v.last_refill_ms = v.last_refill_ms.max(p.last_refill_ms);
            v.memory_mb += p.memory_mb;
        }
    }
    Ok(by_template.into_values().collect())
}

#[utoipa::path(get, path = "/v1/admin/pools", tag = "admin",
    responses((status = 200, body = Vec<PoolView>), (status = 401, body = ErrorBody), (status = 403, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn pools(State(st): S, Auth(who): Auth) -> ApiResult<Json<Vec<PoolView>>> {
    platform_admin(&who)?;
    Ok(Json(views(&st).await?))
}

#[utoipa::path(put, path = "/v1/admin/pools/{template}", tag = "admin",
    params(("template" = String, Path)), request_body = SetPool,
    responses((status = 200, body = Vec<PoolView>), (status = 400, body = ErrorBody),
        (status = 401, body = ErrorBody), (status = 403, body = ErrorBody), (status = 404, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn set_pool(
    State(st): S,
    Auth(who): Auth,
    Path(template): Path<String>,
    body: Result<Json<SetPool>, JsonRejection>,
) -> ApiResult<Json<Vec<PoolView>>> {
    platform_admin(&who)?;
    let Json(req) = body.map_err(json_rejection)?;
    if req.size > MAX_POOL {
        return Err(ApiError::invalid(format!(
            "size: at most {MAX_POOL} ready capsules per template"
        )));
    }
    // Every host keeps the pool (each places its own capsules from it).
    for host in st.hosts.all() {
        host.agent
            .set_pool(&template, req.size)
            .await
            .map_err(service::host_err)?;
    }
    st.audit(
        &who,
        "pool.set",
        "template",
        Some(&template),
        true,
        Some(serde_json::json!({"size": req.size})),
    )
    .await;
    Ok(Json(views(&st).await?))
}

#[utoipa::path(get, path = "/v1/admin/audit-logs", tag = "admin",
    params(super::account::AuditParams),
    responses((status = 200, body = super::account::AuditPageView),
        (status = 400, body = ErrorBody), (status = 401, body = ErrorBody),
        (status = 403, body = ErrorBody)),
    security(("bearer" = [])))]
/// The platform-wide audit log (platform admins): every team's rows and the
/// platform's own (host registrations and renewals, refused host credentials).
pub async fn audit_logs(
    State(st): State<Arc<AppState>>,
    Auth(who): Auth,
    q: Result<
        axum::extract::Query<super::account::AuditParams>,
        axum::extract::rejection::QueryRejection,
    >,
) -> ApiResult<Json<super::account::AuditPageView>> {
    platform_admin(&who)?;
    let query = super::account::audit_query(q)?;
    let page = st
        .db
        .list_audit_in(wrenn_db::AuditScope::All, &query)
        .await?;
    Ok(Json(page.into()))
}
