//! Accounts, teams, members, API keys and audit logs.

use crate::auth::{Auth, ClientIp, Principal, UserAuth, UserClaims};
use crate::error::{json_rejection, ApiError, ApiResult, ErrorBody};
use crate::state::AppState;
use axum::extract::rejection::JsonRejection;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::Json;
use serde::{Deserialize, Serialize};
use std::sync::Arc;
use utoipa::{IntoParams, ToSchema};
use wrenn_db::{MemberError, MemberRule, Role, User};

type S = State<Arc<AppState>>;

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SignupRequest {
    #[schema(format = Email)]
    pub email: String,
    #[schema(min_length = 8, max_length = 1024)]
    pub password: String,
    #[schema(max_length = 100)]
    pub name: Option<String>,
    /// An invitation token (`wrninv_…`) for this e-mail: signs up also while sign-up is
    /// closed, and joins the inviting team instead of creating a team of one's own.
    #[schema(max_length = 128)]
    pub invitation: Option<String>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct MessageResponse {
    pub message: String,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct LoginRequest {
    pub email: String,
    pub password: String,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct LoginResponse {
    pub token: String,
    pub user_id: String,
    pub team_id: String,
    pub email: String,
    pub name: String,
}

fn claims(user: &User, team_id: &str, role: Role) -> UserClaims {
    UserClaims {
        sub: user.id.clone(),
        team_id: team_id.to_string(),
        role: role.as_str().to_string(),
        email: user.email.clone(),
        name: user.name.clone(),
        is_admin: user.is_admin,
        iat: 0,
        exp: 0,
    }
}

fn login_response(
    st: &AppState,
    user: &User,
    team_id: &str,
    role: Role,
) -> ApiResult<LoginResponse> {
    Ok(LoginResponse {
        token: st.jwt.issue(claims(user, team_id, role))?,
        user_id: user.id.clone(),
        team_id: team_id.to_string(),
        email: user.email.clone(),
        name: user.name.clone(),
    })
}

#[utoipa::path(post, path = "/v1/auth/signup", tag = "auth", request_body = SignupRequest,
    responses((status = 201, body = MessageResponse), (status = 400, body = ErrorBody),
        (status = 403, body = ErrorBody), (status = 409, body = ErrorBody),
        (status = 429, body = ErrorBody), (status = 503, body = ErrorBody)))]
pub async fn signup(
    State(st): S,
    ip: ClientIp,
    body: Result<Json<SignupRequest>, JsonRejection>,
) -> ApiResult<(StatusCode, Json<MessageResponse>)> {
    let Json(req) = body.map_err(json_rejection)?;
    if req.invitation.is_none() && !st.config.open_signup {
        return Err(ApiError::forbidden(
            "sign-up is closed on this server: ask a team's owner or admin for an invitation",
        ));
    }
    if req.password.chars().count() < 8 {
        return Err(ApiError::invalid("password must be at least 8 characters"));
    }
    let name = req.name.unwrap_or_default();
    if name.chars().count() > 100 {
        return Err(ApiError::invalid("name must be at most 100 characters"));
    }
    let display = if name.trim().is_empty() {
        req.email.split('@').next().unwrap_or("user").to_string()
    } else {
        name
    };
    // Throttled before anything is hashed; the hash waits for its turn.
    let attempt = st.auth_throttle.attempt(ip, &req.email)?;
    let bad_invitation = || {
        ApiError::new(
            StatusCode::FORBIDDEN,
            "invalid_invitation",
            "the invitation is unknown, used, expired or for another e-mail address",
        )
    };
    if let Some(token) = &req.invitation {
        st.db.invitation_for(token, &req.email).await.map_err(|e| {
            if e.is_not_found() {
                bad_invitation()
            } else {
                e.into()
            }
        })?;
    }
    let permit = st.auth_throttle.hash_permit().await?;
    let email_taken = || ApiError::conflict("email_taken", "an account with this e-mail exists");
    let (user, team_id, action) = match &req.invitation {
        Some(token) => {
            let (user, inv) = match st
                .db
                .create_user_from_invitation(token, &req.email, &display, &req.password)
                .await
            {
                Ok(done) => done,
                Err(wrenn_db::DbError::Conflict { .. }) => return Err(email_taken()),
                Err(e) if e.is_not_found() => return Err(bad_invitation()),
                Err(e) => return Err(e.into()),
            };
            (user, inv.team_id, "user.signup_invited")
        }
        None => {
            let user = match st
                .db
                .create_user(&req.email, &display, Some(&req.password), false)
                .await
            {
                Ok(u) => u,
                Err(wrenn_db::DbError::Conflict { .. }) => return Err(email_taken()),
                Err(e) => return Err(e.into()),
            };
            let team = st
                .db
                .create_team(&format!("{}'s team", user.name), &user.id)
                .await?;
            (user, team.id, "user.signup")
        }
    };
    drop(permit);
    attempt.succeeded();
    st.audit_team(
        &team_id,
        wrenn_db::Actor::User {
            id: user.id.clone(),
        },
        Some(user.email.clone()),
        action,
        "user",
        Some(&user.id),
        true,
        None,
    )
    .await;
    Ok((
        StatusCode::CREATED,
        Json(MessageResponse {
            message: "account created; log in with POST /v1/auth/login".into(),
        }),
    ))
}

#[utoipa::path(post, path = "/v1/auth/login", tag = "auth", request_body = LoginRequest,
    responses((status = 200, body = LoginResponse), (status = 400, body = ErrorBody),
        (status = 401, body = ErrorBody), (status = 403, body = ErrorBody),
        (status = 429, body = ErrorBody), (status = 503, body = ErrorBody)))]
pub async fn login(
    State(st): S,
    ip: ClientIp,
    body: Result<Json<LoginRequest>, JsonRejection>,
) -> ApiResult<Json<LoginResponse>> {
    let Json(req) = body.map_err(json_rejection)?;
    // Throttled per address and per account before the password is hashed.
    let attempt = st.auth_throttle.attempt(ip, &req.email)?;
    let permit = st.auth_throttle.hash_permit().await?;
    let user = st.db.verify_password(&req.email, &req.password).await?;
    drop(permit);
    let user = user.ok_or_else(|| {
        ApiError::new(
            StatusCode::UNAUTHORIZED,
            "wrong_password",
            "wrong e-mail or password",
        )
    })?;
    attempt.succeeded();
    if user.disabled {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "account_disabled",
            "this account is disabled (by a platform admin)",
        ));
    }
    let team = st.db.default_team(&user.id).await?.ok_or_else(|| {
        ApiError::new(StatusCode::FORBIDDEN, "no_team", "the account has no team")
    })?;
    Ok(Json(login_response(&st, &user, &team.team.id, team.role)?))
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SwitchTeamRequest {
    pub team_id: String,
}

#[utoipa::path(post, path = "/v1/auth/switch-team", tag = "auth", request_body = SwitchTeamRequest,
    responses((status = 200, body = LoginResponse), (status = 401, body = ErrorBody), (status = 404, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn switch_team(
    State(st): S,
    UserAuth(who): UserAuth,
    body: Result<Json<SwitchTeamRequest>, JsonRejection>,
) -> ApiResult<Json<LoginResponse>> {
    let Json(req) = body.map_err(json_rejection)?;
    let u = who.user()?;
    let user = st.db.get_user(&u.sub).await?;
    let t = st.db.get_team_for_member(&req.team_id, &user.id).await?;
    Ok(Json(login_response(&st, &user, &t.team.id, t.role)?))
}

#[derive(Debug, Serialize, ToSchema)]
pub struct MeResponse {
    pub id: String,
    pub name: String,
    pub email: String,
    pub has_password: bool,
    pub is_admin: bool,
    pub providers: Vec<String>,
    pub team_id: String,
    pub role: String,
}

fn me_view(user: User, team_id: &str, claims: &UserClaims) -> MeResponse {
    MeResponse {
        id: user.id,
        name: user.name,
        email: user.email,
        has_password: user.has_password,
        is_admin: user.is_admin,
        providers: Vec::new(),
        team_id: team_id.to_string(),
        role: claims.role.clone(),
    }
}

#[utoipa::path(get, path = "/v1/me", tag = "account",
    responses((status = 200, body = MeResponse), (status = 401, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn me(State(st): S, UserAuth(who): UserAuth) -> ApiResult<Json<MeResponse>> {
    let u = who.user()?;
    let user = st.db.get_user(&u.sub).await?;
    Ok(Json(me_view(user, &who.team_id, u)))
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RenameRequest {
    #[schema(min_length = 1, max_length = 100)]
    pub name: String,
}

#[utoipa::path(patch, path = "/v1/me", tag = "account", request_body = RenameRequest,
    responses((status = 200, body = MeResponse), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn update_me(
    State(st): S,
    UserAuth(who): UserAuth,
    body: Result<Json<RenameRequest>, JsonRejection>,
) -> ApiResult<Json<MeResponse>> {
    let Json(req) = body.map_err(json_rejection)?;
    let u = who.user()?;
    let n = req.name.trim().chars().count();
    if n == 0 || n > 100 {
        return Err(ApiError::invalid("name must be 1 to 100 characters"));
    }
    let user = st.db.rename_user(&u.sub, req.name.trim()).await?;
    Ok(Json(me_view(user, &who.team_id, u)))
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PasswordRequest {
    pub current_password: Option<String>,
    #[schema(min_length = 8, max_length = 1024)]
    pub new_password: String,
    pub confirm_password: String,
}

#[utoipa::path(post, path = "/v1/me/password", tag = "account", request_body = PasswordRequest,
    responses((status = 204), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn change_password(
    State(st): S,
    UserAuth(who): UserAuth,
    body: Result<Json<PasswordRequest>, JsonRejection>,
) -> ApiResult<StatusCode> {
    let Json(req) = body.map_err(json_rejection)?;
    let u = who.user()?;
    if req.new_password != req.confirm_password {
        return Err(ApiError::invalid(
            "new_password and confirm_password differ",
        ));
    }
    if req.new_password.chars().count() < 8 {
        return Err(ApiError::invalid("password must be at least 8 characters"));
    }
    let user = st.db.get_user(&u.sub).await?;
    let _permit = st.auth_throttle.hash_permit().await?;
    if user.has_password {
        let current = req.current_password.unwrap_or_default();
        if st
            .db
            .verify_password(&user.email, &current)
            .await?
            .is_none()
        {
            return Err(ApiError::new(
                StatusCode::UNAUTHORIZED,
                "wrong_password",
                "current password is wrong",
            ));
        }
    }
    st.db.set_password(&user.id, &req.new_password).await?;
    st.audit(&who, "user.password", "user", Some(&user.id), true, None)
        .await;
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Debug, Serialize, ToSchema)]
pub struct TeamView {
    pub id: String,
    pub name: String,
    pub slug: String,
    pub is_byoc: bool,
    pub created_at: chrono::DateTime<chrono::Utc>,
    pub role: String,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct MemberView {
    pub user_id: String,
    pub name: String,
    pub email: String,
    pub role: String,
    pub joined_at: chrono::DateTime<chrono::Utc>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct TeamDetail {
    #[serde(flatten)]
    pub team: TeamView,
    pub members: Vec<MemberView>,
}

fn team_view(t: &wrenn_db::TeamWithRole) -> TeamView {
    TeamView {
        id: t.team.id.clone(),
        name: t.team.name.clone(),
        slug: t.team.slug.clone(),
        is_byoc: false,
        created_at: t.team.created_at,
        role: t.role.as_str().to_string(),
    }
}

fn member_view(m: &wrenn_db::Member) -> MemberView {
    MemberView {
        user_id: m.user_id.clone(),
        name: m.name.clone(),
        email: m.email.clone(),
        role: m.role.as_str().to_string(),
        joined_at: m.joined_at,
    }
}

#[utoipa::path(get, path = "/v1/teams", tag = "teams",
    responses((status = 200, body = Vec<TeamView>), (status = 401, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn list_teams(State(st): S, UserAuth(who): UserAuth) -> ApiResult<Json<Vec<TeamView>>> {
    let u = who.user()?;
    let teams = st.db.teams_of_user(&u.sub).await?;
    Ok(Json(teams.iter().map(team_view).collect()))
}

#[utoipa::path(post, path = "/v1/teams", tag = "teams", request_body = RenameRequest,
    responses((status = 201, body = TeamView), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn create_team(
    State(st): S,
    UserAuth(who): UserAuth,
    body: Result<Json<RenameRequest>, JsonRejection>,
) -> ApiResult<(StatusCode, Json<TeamView>)> {
    let Json(req) = body.map_err(json_rejection)?;
    let u = who.user()?;
    let team = st.db.create_team(&req.name, &u.sub).await?;
    let t = st.db.get_team_for_member(&team.id, &u.sub).await?;
    st.audit_team(
        &team.id,
        who.actor.clone(),
        who.actor_name.clone(),
        "team.create",
        "team",
        Some(&team.id),
        true,
        None,
    )
    .await;
    Ok((StatusCode::CREATED, Json(team_view(&t))))
}

/// The team if the caller is a member; 404 otherwise (never confirms it exists).
async fn my_team(st: &AppState, user_id: &str, team_id: &str) -> ApiResult<wrenn_db::TeamWithRole> {
    Ok(st.db.get_team_for_member(team_id, user_id).await?)
}

#[utoipa::path(get, path = "/v1/teams/{id}", tag = "teams", params(("id" = String, Path)),
    responses((status = 200, body = TeamDetail), (status = 401, body = ErrorBody), (status = 404, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn get_team(
    State(st): S,
    UserAuth(who): UserAuth,
    Path(id): Path<String>,
) -> ApiResult<Json<TeamDetail>> {
    let u = who.user()?;
    let t = my_team(&st, &u.sub, &id).await?;
    let members = st.db.list_members(&id).await?;
    Ok(Json(TeamDetail {
        team: team_view(&t),
        members: members.iter().map(member_view).collect(),
    }))
}

fn need_manager(t: &wrenn_db::TeamWithRole) -> ApiResult<()> {
    if t.role.can_manage() {
        Ok(())
    } else {
        Err(ApiError::forbidden(MemberRule::NeedsManager.message()))
    }
}

/// A refused membership change: 409 for leaving as the owner (hand ownership over
/// first) and for a change that lost a race, 403 for the other rules.
fn member_error(e: MemberError) -> ApiError {
    match e {
        MemberError::Refused(rule @ MemberRule::OwnerCannotLeave) => {
            ApiError::conflict("owner_cannot_leave", rule.message())
        }
        MemberError::Refused(rule @ MemberRule::Changed) => {
            ApiError::conflict("conflict", rule.message())
        }
        MemberError::Refused(rule) => ApiError::forbidden(rule.message()),
        MemberError::Db(e) => e.into(),
    }
}

#[utoipa::path(patch, path = "/v1/teams/{id}", tag = "teams", params(("id" = String, Path)), request_body = RenameRequest,
    responses((status = 200, body = TeamView), (status = 403, body = ErrorBody), (status = 404, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn rename_team(
    State(st): S,
    UserAuth(who): UserAuth,
    Path(id): Path<String>,
    body: Result<Json<RenameRequest>, JsonRejection>,
) -> ApiResult<Json<TeamView>> {
    let Json(req) = body.map_err(json_rejection)?;
    let u = who.user()?;
    let t = my_team(&st, &u.sub, &id).await?;
    need_manager(&t)?;
    st.db.rename_team(&id, &req.name).await?;
    let t = my_team(&st, &u.sub, &id).await?;
    st.audit_team(
        &id,
        who.actor.clone(),
        who.actor_name.clone(),
        "team.rename",
        "team",
        Some(&id),
        true,
        None,
    )
    .await;
    Ok(Json(team_view(&t)))
}

#[utoipa::path(delete, path = "/v1/teams/{id}", tag = "teams", params(("id" = String, Path)),
    responses((status = 204), (status = 403, body = ErrorBody), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn delete_team(
    State(st): S,
    UserAuth(who): UserAuth,
    Path(id): Path<String>,
) -> ApiResult<StatusCode> {
    let u = who.user()?;
    let t = my_team(&st, &u.sub, &id).await?;
    if t.role != Role::Owner {
        return Err(ApiError::forbidden("only the team's owner can delete it"));
    }
    if st.db.count_live_capsules(&id).await? > 0 {
        return Err(ApiError::conflict(
            "conflict",
            "the team still has capsules; destroy them first",
        ));
    }
    st.db
        .delete_team_by_owner(&id, &u.sub)
        .await
        .map_err(member_error)?;
    st.members.invalidate_team(&id);
    st.keys.revoke_team(&id);
    st.capsule_cache.clear();
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct AddMemberRequest {
    pub email: String,
    /// admin or member (default member).
    pub role: Option<String>,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RoleRequest {
    /// owner, admin or member.
    pub role: String,
}

fn parse_role(s: Option<&str>) -> ApiResult<Role> {
    match s {
        None => Ok(Role::Member),
        Some(r) => Role::parse(r).ok_or_else(|| {
            ApiError::invalid(format!("role {r:?}: expected owner, admin or member"))
        }),
    }
}

#[utoipa::path(get, path = "/v1/teams/{id}/members", tag = "teams", params(("id" = String, Path)),
    responses((status = 200, body = Vec<MemberView>), (status = 404, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn list_members(
    State(st): S,
    UserAuth(who): UserAuth,
    Path(id): Path<String>,
) -> ApiResult<Json<Vec<MemberView>>> {
    let u = who.user()?;
    my_team(&st, &u.sub, &id).await?;
    let members = st.db.list_members(&id).await?;
    Ok(Json(members.iter().map(member_view).collect()))
}

/// The role `requested` for someone joining team `id`, checked against the caller: owners
/// and admins `verb` members, only the owner admins, and nobody a second owner.
async fn grantable_role(
    st: &AppState,
    who: &crate::auth::Principal,
    id: &str,
    requested: Option<&str>,
    verb: &str,
) -> ApiResult<Role> {
    let u = who.user()?;
    let t = my_team(st, &u.sub, id).await?;
    need_manager(&t)?;
    let role = parse_role(requested)?;
    if role == Role::Owner {
        return Err(ApiError::invalid(format!(
            "a team has one owner; {verb} an admin or a member"
        )));
    }
    if role == Role::Admin && t.role != Role::Owner {
        return Err(ApiError::forbidden(MemberRule::NeedsOwner.message()));
    }
    Ok(role)
}

#[utoipa::path(post, path = "/v1/teams/{id}/members", tag = "teams", params(("id" = String, Path)), request_body = AddMemberRequest,
    responses((status = 201, body = MemberView), (status = 400, body = ErrorBody), (status = 403, body = ErrorBody),
        (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn add_member(
    State(st): S,
    UserAuth(who): UserAuth,
    Path(id): Path<String>,
    body: Result<Json<AddMemberRequest>, JsonRejection>,
) -> ApiResult<(StatusCode, Json<MemberView>)> {
    let Json(req) = body.map_err(json_rejection)?;
    let role = grantable_role(&st, &who, &id, req.role.as_deref(), "add").await?;
    let user = st.db.get_user_by_email(&req.email).await?;
    st.db.add_member(&id, &user.id, role).await?;
    st.members.invalidate(&id, &user.id);
    let m = st
        .db
        .list_members(&id)
        .await?
        .into_iter()
        .find(|m| m.user_id == user.id)
        .ok_or_else(|| ApiError::not_found("member"))?;
    st.audit_team(
        &id,
        who.actor.clone(),
        who.actor_name.clone(),
        "member.add",
        "user",
        Some(&user.id),
        true,
        None,
    )
    .await;
    Ok((StatusCode::CREATED, Json(member_view(&m))))
}

#[utoipa::path(patch, path = "/v1/teams/{id}/members/{uid}", tag = "teams",
    params(("id" = String, Path), ("uid" = String, Path)), request_body = RoleRequest,
    responses((status = 204), (status = 400, body = ErrorBody), (status = 403, body = ErrorBody), (status = 404, body = ErrorBody),
        (status = 409, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn set_role(
    State(st): S,
    UserAuth(who): UserAuth,
    Path((id, uid)): Path<(String, String)>,
    body: Result<Json<RoleRequest>, JsonRejection>,
) -> ApiResult<StatusCode> {
    let Json(req) = body.map_err(json_rejection)?;
    let u = who.user()?;
    my_team(&st, &u.sub, &id).await?;
    let role = parse_role(Some(&req.role))?;
    // Only the owner changes roles (never their own); the role owner hands ownership
    // over, the owner becoming an admin. Checked and written atomically.
    let changed = st.db.change_member_role(&id, &u.sub, &uid, role).await;
    st.members.invalidate(&id, &uid);
    st.members.invalidate(&id, &u.sub);
    changed.map_err(member_error)?;
    st.audit_team(
        &id,
        who.actor.clone(),
        who.actor_name.clone(),
        "member.role",
        "user",
        Some(&uid),
        true,
        Some(serde_json::json!({"role": req.role})),
    )
    .await;
    Ok(StatusCode::NO_CONTENT)
}

#[utoipa::path(delete, path = "/v1/teams/{id}/members/{uid}", tag = "teams",
    params(("id" = String, Path), ("uid" = String, Path)),
    responses((status = 204), (status = 403, body = ErrorBody), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn remove_member(
    State(st): S,
    UserAuth(who): UserAuth,
    Path((id, uid)): Path<(String, String)>,
) -> ApiResult<StatusCode> {
    let u = who.user()?;
    my_team(&st, &u.sub, &id).await?;
    // The owner removes anyone but themselves, admins remove members; removing oneself
    // is leaving. Checked and written atomically.
    let removed = st.db.remove_member_by(&id, &u.sub, &uid).await;
    st.members.invalidate(&id, &uid);
    removed.map_err(member_error)?;
    st.audit_team(
        &id,
        who.actor.clone(),
        who.actor_name.clone(),
        "member.remove",
        "user",
        Some(&uid),
        true,
        None,
    )
    .await;
    Ok(StatusCode::NO_CONTENT)
}

#[utoipa::path(post, path = "/v1/teams/{id}/leave", tag = "teams", params(("id" = String, Path)),
    responses((status = 204), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn leave_team(
    State(st): S,
    UserAuth(who): UserAuth,
    Path(id): Path<String>,
) -> ApiResult<StatusCode> {
    let u = who.user()?;
    my_team(&st, &u.sub, &id).await?;
    let left = st.db.leave_team(&id, &u.sub).await;
    st.members.invalidate(&id, &u.sub);
    left.map_err(member_error)?;
    st.audit_team(
        &id,
        who.actor.clone(),
        who.actor_name.clone(),
        "member.leave",
        "user",
        Some(&u.sub),
        true,
        None,
    )
    .await;
    Ok(StatusCode::NO_CONTENT)
}

/// How long an invitation can be used.
pub const INVITATION_TTL: std::time::Duration = std::time::Duration::from_secs(7 * 24 * 3600);

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct InvitationRequest {
    #[schema(format = Email)]
    pub email: String,
    /// admin or member (default member); inviting an admin is for the owner.
    pub role: Option<String>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct InvitationView {
    pub id: String,
    pub team_id: String,
    pub email: String,
    pub role: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub created_by: Option<String>,
    pub created_at: chrono::DateTime<chrono::Utc>,
    pub expires_at: chrono::DateTime<chrono::Utc>,
    /// The token, in the create response only: the invited person signs up with it
    /// (`POST /v1/auth/signup` with `invitation`), once, before `expires_at`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub token: Option<String>,
}

fn invitation_view(i: &wrenn_db::Invitation, token: Option<String>) -> InvitationView {
    InvitationView {
        id: i.id.clone(),
        team_id: i.team_id.clone(),
        email: i.email.clone(),
        role: i.role.as_str().to_string(),
        created_by: i.created_by.clone(),
        created_at: i.created_at,
        expires_at: i.expires_at,
        token,
    }
}

#[utoipa::path(post, path = "/v1/teams/{id}/invitations", tag = "teams", params(("id" = String, Path)),
    request_body = InvitationRequest,
    responses((status = 201, body = InvitationView), (status = 400, body = ErrorBody), (status = 403, body = ErrorBody),
        (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn create_invitation(
    State(st): S,
    UserAuth(who): UserAuth,
    Path(id): Path<String>,
    body: Result<Json<InvitationRequest>, JsonRejection>,
) -> ApiResult<(StatusCode, Json<InvitationView>)> {
    let Json(req) = body.map_err(json_rejection)?;
    let role = grantable_role(&st, &who, &id, req.role.as_deref(), "invite").await?;
    let u = who.user()?;
    if st.db.get_user_by_email(&req.email).await.is_ok() {
        return Err(ApiError::conflict(
            "email_taken",
            format!(
                "{} has an account: add them with POST /v1/teams/{id}/members",
                req.email.trim()
            ),
        ));
    }
    let created = st
        .db
        .create_invitation(&id, &req.email, role, Some(&u.sub), INVITATION_TTL)
        .await?;
    st.audit_team(
        &id,
        who.actor.clone(),
        who.actor_name.clone(),
        "invitation.create",
        "invitation",
        Some(&created.invitation.id),
        true,
        Some(serde_json::json!({"email": created.invitation.email, "role": role.as_str()})),
    )
    .await;
    Ok((
        StatusCode::CREATED,
        Json(invitation_view(
            &created.invitation,
            Some(created.token.clone()),
        )),
    ))
}

#[utoipa::path(get, path = "/v1/teams/{id}/invitations", tag = "teams", params(("id" = String, Path)),
    responses((status = 200, body = Vec<InvitationView>), (status = 403, body = ErrorBody), (status = 404, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn list_invitations(
    State(st): S,
    UserAuth(who): UserAuth,
    Path(id): Path<String>,
) -> ApiResult<Json<Vec<InvitationView>>> {
    let u = who.user()?;
    need_manager(&my_team(&st, &u.sub, &id).await?)?;
    let list = st.db.list_invitations(&id).await?;
    Ok(Json(
        list.iter().map(|i| invitation_view(i, None)).collect(),
    ))
}

#[utoipa::path(delete, path = "/v1/teams/{id}/invitations/{invitation}", tag = "teams",
    params(("id" = String, Path), ("invitation" = String, Path)),
    responses((status = 204), (status = 403, body = ErrorBody), (status = 404, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn delete_invitation(
    State(st): S,
    UserAuth(who): UserAuth,
    Path((id, invitation)): Path<(String, String)>,
) -> ApiResult<StatusCode> {
    let u = who.user()?;
    need_manager(&my_team(&st, &u.sub, &id).await?)?;
    st.db.delete_invitation(&id, &invitation).await?;
    st.audit_team(
        &id,
        who.actor.clone(),
        who.actor_name.clone(),
        "invitation.delete",
        "invitation",
        Some(&invitation),
        true,
        None,
    )
    .await;
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ApiKeyView {
    pub id: String,
    pub team_id: String,
    pub name: String,
    pub key_prefix: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub created_by: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub creator_email: Option<String>,
    pub created_at: chrono::DateTime<chrono::Utc>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_used: Option<chrono::DateTime<chrono::Utc>>,
    /// The key itself: in the create response only.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
    /// The same key spelled `e2b_…`, for E2B SDK releases that check the key's form:
    /// in the create response only.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub e2b_key: Option<String>,
}

fn key_view(k: &wrenn_db::ApiKey, key: Option<String>) -> ApiKeyView {
    ApiKeyView {
        id: k.id.clone(),
        team_id: k.team_id.clone(),
        name: k.name.clone(),
        key_prefix: k.key_prefix.clone(),
        created_by: k.created_by.clone(),
        creator_email: k.creator_email.clone(),
        created_at: k.created_at,
        last_used: k.last_used,
        e2b_key: key.as_deref().map(wrenn_db::e2b_spelling),
        key,
    }
}

#[derive(Debug, Deserialize, ToSchema, Default)]
#[serde(deny_unknown_fields)]
pub struct CreateKeyRequest {
    #[schema(max_length = 100)]
    pub name: Option<String>,
}

/// Creating and deleting API keys is for the team's owner and admins, with their user
/// token: API keys act with member rights and never mint or delete keys. The role is
/// read from the database at the time of the request.
async fn need_key_manager<'a>(st: &AppState, who: &'a Principal) -> ApiResult<&'a UserClaims> {
    let Some(u) = who.user.as_ref() else {
        return Err(ApiError::forbidden(
            "API keys cannot create or delete API keys (they act with member rights): use \
             the user token (Authorization: Bearer) of the team's owner or an admin",
        ));
    };
    let role = st.db.member_role(&who.team_id, &u.sub).await.map_err(|e| {
        if e.is_not_found() {
            ApiError::unauthorized("this token's team membership has ended; log in again")
        } else {
            e.into()
        }
    })?;
    if !role.can_manage() {
        return Err(ApiError::forbidden(
            "only the team's owner or admins can create or delete API keys",
        ));
    }
    Ok(u)
}

#[utoipa::path(post, path = "/v1/api-keys", tag = "api-keys", request_body = CreateKeyRequest,
    responses((status = 201, body = ApiKeyView), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody),
        (status = 403, body = ErrorBody)),
    security(("api_key" = []), ("bearer" = [])))]
pub async fn create_key(
    State(st): S,
    Auth(who): Auth,
    body: Result<Json<CreateKeyRequest>, JsonRejection>,
) -> ApiResult<(StatusCode, Json<ApiKeyView>)> {
    let Json(req) = body.map_err(json_rejection)?;
    let creator = need_key_manager(&st, &who).await?.sub.clone();
    let name = req
        .name
        .filter(|n| !n.trim().is_empty())
        .unwrap_or_else(|| "Unnamed API Key".into());
    if name.chars().count() > 100 {
        return Err(ApiError::invalid("name must be at most 100 characters"));
    }
    let created = st
        .db
        .create_api_key(&who.team_id, &name, Some(&creator))
        .await?;
    st.audit(
        &who,
        "api_key.create",
        "api_key",
        Some(&created.api_key.id),
        true,
        None,
    )
    .await;
    Ok((
        StatusCode::CREATED,
        Json(key_view(&created.api_key, Some(created.key.clone()))),
    ))
}

#[utoipa::path(get, path = "/v1/api-keys", tag = "api-keys",
    responses((status = 200, body = Vec<ApiKeyView>), (status = 401, body = ErrorBody)),
    security(("api_key" = []), ("bearer" = [])))]
pub async fn list_keys(State(st): S, Auth(who): Auth) -> ApiResult<Json<Vec<ApiKeyView>>> {
    let keys = st.db.list_api_keys(&who.team_id).await?;
    Ok(Json(keys.iter().map(|k| key_view(k, None)).collect()))
}

#[utoipa::path(delete, path = "/v1/api-keys/{id}", tag = "api-keys", params(("id" = String, Path)),
    responses((status = 204), (status = 401, body = ErrorBody), (status = 403, body = ErrorBody),
        (status = 404, body = ErrorBody)),
    security(("api_key" = []), ("bearer" = [])))]
pub async fn delete_key(
    State(st): S,
    Auth(who): Auth,
    Path(id): Path<String>,
) -> ApiResult<StatusCode> {
    // Another team's key is not found (never forbidden); one's own team's needs a manager.
    st.db.get_api_key(&who.team_id, &id).await?;
    need_key_manager(&st, &who).await?;
    st.db.delete_api_key(&who.team_id, &id).await?;
    st.keys.revoke(&id);
    st.audit(&who, "api_key.delete", "api_key", Some(&id), true, None)
        .await;
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct AuditParams {
    /// `next_before` of the previous page (RFC 3339).
    pub before: Option<String>,
    /// `next_before_id` of the previous page.
    pub before_id: Option<String>,
    /// 1..200 (default 50).
    #[param(minimum = 1, maximum = 200)]
    pub limit: Option<u32>,
    pub resource_type: Option<String>,
    pub action: Option<String>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct AuditItem {
    pub id: String,
    pub actor_type: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub actor_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub actor_name: Option<String>,
    pub resource_type: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub resource_id: Option<String>,
    pub action: String,
    /// `team`, or `platform` for events of the platform (hosts and their credentials).
    pub scope: String,
    /// The team, where the row is a team's (in the platform-wide log).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub team_id: Option<String>,
    /// success or failure.
    pub status: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub metadata: Option<serde_json::Value>,
    pub created_at: chrono::DateTime<chrono::Utc>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct AuditPageView {
    pub items: Vec<AuditItem>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub next_before: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub next_before_id: Option<String>,
}

#[utoipa::path(get, path = "/v1/audit-logs", tag = "audit", params(AuditParams),
    responses((status = 200, body = AuditPageView), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody)),
    security(("api_key" = []), ("bearer" = [])))]
pub async fn audit_logs(
    State(st): S,
    Auth(who): Auth,
    q: Result<Query<AuditParams>, axum::extract::rejection::QueryRejection>,
) -> ApiResult<Json<AuditPageView>> {
    let query = audit_query(q)?;
    let page = st.db.list_audit(&who.team_id, &query).await?;
    Ok(Json(AuditPageView::from(page)))
}

/// The audit query a request's parameters ask for.
pub(crate) fn audit_query(
    q: Result<Query<AuditParams>, axum::extract::rejection::QueryRejection>,
) -> ApiResult<wrenn_db::AuditQuery> {
    let Query(q) = q.map_err(crate::error::query_rejection)?;
    let before = match (q.before, q.before_id) {
        (None, None) => None,
        (Some(b), Some(id)) => {
            let t = chrono::DateTime::parse_from_rfc3339(&b)
                .map_err(|_| ApiError::invalid("before must be an RFC 3339 time"))?;
            Some(wrenn_db::AuditCursor {
                created_at: t.with_timezone(&chrono::Utc),
                id,
            })
        }
        _ => return Err(ApiError::invalid("before and before_id go together")),
    };
    if q.limit == Some(0) || q.limit.is_some_and(|l| l > 200) {
        return Err(ApiError::invalid("limit must be 1 to 200"));
    }
    Ok(wrenn_db::AuditQuery {
        before,
        limit: q.limit,
        resource_type: q.resource_type,
        action: q.action,
    })
}

impl From<wrenn_db::AuditPage> for AuditPageView {
    fn from(page: wrenn_db::AuditPage) -> Self {
        AuditPageView {
            items: page
                .items
                .into_iter()
                .map(|e| AuditItem {
                    id: e.id,
                    actor_type: e.actor.kind().to_string(),
                    actor_id: e.actor.id().map(str::to_string),
                    actor_name: e.actor_name,
                    resource_type: e.resource_type,
                    resource_id: e.resource_id,
                    action: e.action,
                    scope: if e.team_id.is_some() {
                        "team"
                    } else {
                        "platform"
                    }
                    .into(),
                    team_id: e.team_id,
                    status: e.result.as_str().to_string(),
                    metadata: e.metadata,
                    created_at: e.created_at,
                })
                .collect(),
            next_before: page.next.as_ref().map(|c| {
                c.created_at
                    .to_rfc3339_opts(chrono::SecondsFormat::Micros, true)
            }),
            next_before_id: page.next.map(|c| c.id),
        }
    }
}
