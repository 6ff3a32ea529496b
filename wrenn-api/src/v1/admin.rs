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

/// A team, with its counts.
#[derive(Debug, Serialize, ToSchema)]
pub struct AdminTeamView {
    pub id: String,
    pub name: String,
    pub slug: String,
    pub created_at: chrono::DateTime<chrono::Utc>,
    pub member_count: u64,
    /// The owner's e-mail.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub owner: Option<String>,
    /// Capsules not stopped.
    pub active_capsule_count: u64,
    pub channel_count: u64,
}

#[utoipa::path(get, path = "/v1/admin/teams", tag = "admin",
    responses((status = 200, body = Vec<AdminTeamView>), (status = 401, body = ErrorBody), (status = 403, body = ErrorBody)),
    security(("bearer" = [])))]
/// Every team, with its member, capsule and channel counts.
pub async fn teams(State(st): S, Auth(who): Auth) -> ApiResult<Json<Vec<AdminTeamView>>> {
    platform_admin(&who)?;
    let rows = st.db.admin_team_summaries().await?;
    Ok(Json(
        rows.into_iter()
            .map(|t| AdminTeamView {
                id: t.team.id,
                name: t.team.name,
                slug: t.team.slug,
                created_at: t.team.created_at,
                member_count: t.member_count,
                owner: t.owner,
                active_capsule_count: t.active_capsules,
                channel_count: t.channel_count,
            })
            .collect(),
    ))
}

/// An account.
#[derive(Debug, Serialize, ToSchema)]
pub struct AdminUserView {
    pub id: String,
    pub email: String,
    pub name: String,
    pub is_admin: bool,
    /// active or disabled.
    pub status: String,
    pub created_at: chrono::DateTime<chrono::Utc>,
}

impl From<wrenn_db::User> for AdminUserView {
    fn from(u: wrenn_db::User) -> Self {
        AdminUserView {
            status: if u.disabled { "disabled" } else { "active" }.into(),
            id: u.id,
            email: u.email,
            name: u.name,
            is_admin: u.is_admin,
            created_at: u.created_at,
        }
    }
}

#[derive(Debug, Serialize, ToSchema)]
pub struct AdminUsers {
    pub items: Vec<AdminUserView>,
    pub page: u32,
    pub per_page: u32,
    pub total: u64,
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct UsersQuery {
    /// 1-based (default 1).
    #[param(minimum = 1)]
    pub page: Option<u32>,
    /// Default 50.
    #[param(minimum = 1, maximum = 200)]
    pub per_page: Option<u32>,
}

#[utoipa::path(get, path = "/v1/admin/users", tag = "admin", params(UsersQuery),
    responses((status = 200, body = AdminUsers), (status = 400, body = ErrorBody),
        (status = 401, body = ErrorBody), (status = 403, body = ErrorBody)),
    security(("bearer" = [])))]
/// Every account, a page at a time (oldest first).
pub async fn users(
    State(st): S,
    Auth(who): Auth,
    q: Result<axum::extract::Query<UsersQuery>, axum::extract::rejection::QueryRejection>,
) -> ApiResult<Json<AdminUsers>> {
    platform_admin(&who)?;
    let axum::extract::Query(q) = q.map_err(crate::error::query_rejection)?;
    let page = q.page.unwrap_or(1);
    let per_page = q.per_page.unwrap_or(50);
    if page == 0 || !(1..=200).contains(&per_page) {
        return Err(ApiError::invalid(
            "page starts at 1; per_page is between 1 and 200",
        ));
    }
    let offset = u64::from(page - 1) * u64::from(per_page);
    let (rows, total) = st.db.admin_users(per_page, offset).await?;
    Ok(Json(AdminUsers {
        items: rows.into_iter().map(AdminUserView::from).collect(),
        page,
        per_page,
        total,
    }))
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SetActive {
    pub active: bool,
}

#[utoipa::path(put, path = "/v1/admin/users/{id}/active", tag = "admin", params(("id" = String, Path)),
    request_body = SetActive,
    responses((status = 200, body = AdminUserView), (status = 400, body = ErrorBody),
        (status = 401, body = ErrorBody), (status = 403, body = ErrorBody), (status = 404, body = ErrorBody),
        (status = 409, body = ErrorBody)),
    security(("bearer" = [])))]
/// Disables an account (it cannot log in and its tokens stop working at once; its
/// teams, capsules and keys stay) or enables it again. Platform admins are not
/// disabled.
pub async fn set_active(
    State(st): S,
    Auth(who): Auth,
    Path(id): Path<String>,
    body: Result<Json<SetActive>, JsonRejection>,
) -> ApiResult<Json<AdminUserView>> {
    platform_admin(&who)?;
    let Json(body) = body.map_err(json_rejection)?;
    let target = st.db.get_user(&id).await?;
    if !body.active && target.is_admin {
        return Err(ApiError::conflict(
            "user_is_admin",
            "a platform admin's account cannot be disabled",
        ));
    }
    let u = st.db.set_user_disabled(&id, !body.active).await?;
    st.members.invalidate_user(&id);
    st.audit(
        &who,
        if body.active {
            "user.enable"
        } else {
            "user.disable"
        },
        "user",
        Some(&id),
        true,
        Some(serde_json::json!({"email": u.email})),
    )
    .await;
    Ok(Json(u.into()))
}

/// A capsule of any team.
#[derive(Debug, Serialize, ToSchema)]
pub struct AdminCapsuleView {
    pub team_id: String,
    /// The host it runs (or is paused) on.
    pub host_id: String,
    #[serde(flatten)]
    pub capsule: super::capsules::CapsuleView,
}

#[utoipa::path(get, path = "/v1/admin/capsules", tag = "admin",
    responses((status = 200, body = Vec<AdminCapsuleView>), (status = 401, body = ErrorBody), (status = 403, body = ErrorBody)),
    security(("bearer" = [])))]
/// Every team's capsules that are not stopped.
pub async fn capsules(State(st): S, Auth(who): Auth) -> ApiResult<Json<Vec<AdminCapsuleView>>> {
    platform_admin(&who)?;
    let rows = st.db.system_live_capsules().await?;
    Ok(Json(
        rows.iter()
            .map(|c| AdminCapsuleView {
                team_id: c.team_id.clone(),
                host_id: c.host_id.to_string(),
                capsule: super::capsules::CapsuleView::of(&st, c),
            })
            .collect(),
    ))
}

#[utoipa::path(get, path = "/v1/admin/capsules/{id}", tag = "admin", params(("id" = String, Path)),
    responses((status = 200, body = AdminCapsuleView), (status = 401, body = ErrorBody),
        (status = 403, body = ErrorBody), (status = 404, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn capsule(
    State(st): S,
    Auth(who): Auth,
    Path(id): Path<String>,
) -> ApiResult<Json<AdminCapsuleView>> {
    platform_admin(&who)?;
    let c = st.db.system_get_capsule(&id).await?;
    Ok(Json(AdminCapsuleView {
        team_id: c.team_id.clone(),
        host_id: c.host_id.to_string(),
        capsule: super::capsules::CapsuleView::of(&st, &c),
    }))
}

#[utoipa::path(delete, path = "/v1/admin/capsules/{id}", tag = "admin", params(("id" = String, Path)),
    responses((status = 204), (status = 401, body = ErrorBody), (status = 403, body = ErrorBody),
        (status = 404, body = ErrorBody)),
    security(("bearer" = [])))]
/// Destroys any team's capsule (audited in that team's log, as the admin's doing).
pub async fn destroy_capsule(
    State(st): S,
    Auth(who): Auth,
    Path(id): Path<String>,
) -> ApiResult<axum::http::StatusCode> {
    platform_admin(&who)?;
    let c = st.db.system_get_capsule(&id).await?;
    service::destroy(&st, &who.actor, who.actor_name.clone(), &c).await?;
    Ok(axum::http::StatusCode::NO_CONTENT)
}

/// A template of the platform or of a team.
#[derive(Debug, Serialize, ToSchema)]
pub struct AdminTemplateView {
    /// The owning team (none: a platform template).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub team_id: Option<String>,
    #[serde(flatten)]
    pub template: super::snapshots::TemplateView,
}

#[utoipa::path(get, path = "/v1/admin/templates", tag = "admin",
    responses((status = 200, body = Vec<AdminTemplateView>), (status = 401, body = ErrorBody), (status = 403, body = ErrorBody)),
    security(("bearer" = [])))]
/// The platform templates, then every team's snapshot templates.
pub async fn templates(State(st): S, Auth(who): Auth) -> ApiResult<Json<Vec<AdminTemplateView>>> {
    platform_admin(&who)?;
    let mut out: Vec<AdminTemplateView> = super::snapshots::platform_views(&st)
        .await?
        .into_iter()
        .map(|t| AdminTemplateView {
            team_id: None,
            template: t,
        })
        .collect();
    for t in st.db.admin_templates().await? {
        out.push(AdminTemplateView {
            team_id: Some(t.team_id.clone()),
            template: super::snapshots::team_view(&t),
        });
    }
    Ok(Json(out))
}
