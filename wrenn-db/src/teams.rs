//! Teams (name, slug `xxxxxx-yyyyyy`) and memberships with a role.

use crate::error::Ctx;
use crate::id::{new_id, prefix, random_hex};
use crate::row::{boolean, text, ts, R};
use crate::time::{now, to_db, Timestamp};
use crate::{Db, DbError};
use sqlx::any::AnyRow;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Team {
    pub id: String,
    pub name: String,
    pub slug: String,
    pub created_at: Timestamp,
}

/// A member's role in a team.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Owner,
    Admin,
    Member,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Owner => "owner",
            Role::Admin => "admin",
            Role::Member => "member",
        }
    }

    pub fn parse(s: &str) -> Option<Role> {
        match s {
            "owner" => Some(Role::Owner),
            "admin" => Some(Role::Admin),
            "member" => Some(Role::Member),
            _ => None,
        }
    }

    /// Owners and admins manage members and keys.
    pub fn can_manage(self) -> bool {
        matches!(self, Role::Owner | Role::Admin)
    }
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One user's membership of one team.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Membership {
    pub team_id: String,
    pub user_id: String,
    pub role: Role,
    pub is_default: bool,
    pub created_at: Timestamp,
}

/// A team as seen by one of its members.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TeamWithRole {
    pub team: Team,
    pub role: Role,
    pub is_default: bool,
}

/// A member as a team lists them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Member {
    pub user_id: String,
    pub name: String,
    pub email: String,
    pub role: Role,
    pub joined_at: Timestamp,
}

fn team(row: &AnyRow) -> R<Team> {
    Ok(Team {
        id: text(row, "id")?,
        name: text(row, "name")?,
        slug: text(row, "slug")?,
        created_at: ts(row, "created_at")?,
    })
}

fn role(row: &AnyRow, col: &str) -> R<Role> {
    let s = text(row, col)?;
    Role::parse(&s).ok_or_else(|| crate::row::decode(col, format!("unknown role {s:?}")))
}

fn check_team_name(name: &str) -> Result<(), DbError> {
    let n = name.trim().chars().count();
    if n == 0 || n > 100 {
        return Err(DbError::invalid("team name", "must be 1 to 100 characters"));
    }
    Ok(())
}

/// Slugs are random; a clash is astronomically rare but retried a bounded number of times.
const SLUG_ATTEMPTS: usize = 3;

fn new_slug() -> String {
    format!("{}-{}", random_hex(3), random_hex(3))
}

impl Db {
    /// Creates a team with `owner` as its owner (and, if they have no team yet, their
    /// default team).
    pub async fn create_team(&self, name: &str, owner: &str) -> Result<Team, DbError> {
        check_team_name(name)?;
        let mut last = None;
        for _ in 0..SLUG_ATTEMPTS {
            match self.try_create_team(name.trim(), owner, &new_slug()).await {
                Err(DbError::Conflict { what: "team slug" }) => {
                    last = Some(DbError::Conflict { what: "team slug" })
                }
                other => return other,
            }
        }
        Err(last.unwrap_or(DbError::Conflict { what: "team slug" }))
    }

    async fn try_create_team(&self, name: &str, owner: &str, slug: &str) -> Result<Team, DbError> {
        let ctx = Ctx::op("create team").unique("team slug").missing("user");
        let t = to_db(now());
        let mut tx = self.pool().begin().await.map_err(|e| ctx.err(e))?;
        let row = sqlx::query(
            "INSERT INTO teams (id, name, slug, created_at) VALUES ($1, $2, $3, $4) \
             RETURNING id, name, slug, created_at",
        )
        .bind(new_id(prefix::TEAM))
        .bind(name)
        .bind(slug)
        .bind(t)
        .fetch_one(&mut *tx)
        .await
        .map_err(|e| ctx.err(e))?;
        let team = team(&row).map_err(|e| ctx.err(e))?;
        let has_default = sqlx::query(
            "SELECT team_id FROM memberships WHERE user_id = $1 AND is_default = $2 LIMIT 1",
        )
        .bind(owner)
        .bind(true)
        .fetch_optional(&mut *tx)
        .await
        .map_err(|e| ctx.err(e))?
        .is_some();
        sqlx::query(
            "INSERT INTO memberships (team_id, user_id, role, is_default, created_at) \
             VALUES ($1, $2, $3, $4, $5)",
        )
        .bind(&team.id)
        .bind(owner)
        .bind(Role::Owner.as_str())
        .bind(!has_default)
        .bind(t)
        .execute(&mut *tx)
        .await
        .map_err(|e| ctx.err(e))?;
        tx.commit().await.map_err(|e| ctx.err(e))?;
        Ok(team)
    }

    /// The team, if `user_id` is a member of it (otherwise NotFound).
    pub async fn get_team_for_member(
        &self,
        team_id: &str,
        user_id: &str,
    ) -> Result<TeamWithRole, DbError> {
        let row = sqlx::query(
            "SELECT t.id, t.name, t.slug, t.created_at, m.role, m.is_default \
             FROM teams t JOIN memberships m ON m.team_id = t.id \
             WHERE t.id = $1 AND m.user_id = $2",
        )
        .bind(team_id)
        .bind(user_id)
        .fetch_optional(self.pool())
        .await
        .map_err(|e| Ctx::op("get team").err(e))?
        .ok_or(DbError::NotFound { what: "team" })?;
        team_with_role(&row).map_err(|e| DbError::backend("get team", e))
    }

    /// The team by id, regardless of membership (API-key callers know their team).
    pub async fn get_team(&self, team_id: &str) -> Result<Team, DbError> {
        let row = sqlx::query("SELECT id, name, slug, created_at FROM teams WHERE id = $1")
            .bind(team_id)
            .fetch_optional(self.pool())
            .await
            .map_err(|e| Ctx::op("get team").err(e))?
            .ok_or(DbError::NotFound { what: "team" })?;
        team(&row).map_err(|e| DbError::backend("get team", e))
    }

    /// The teams `user_id` belongs to, oldest first.
    pub async fn teams_of_user(&self, user_id: &str) -> Result<Vec<TeamWithRole>, DbError> {
        let rows = sqlx::query(
            "SELECT t.id, t.name, t.slug, t.created_at, m.role, m.is_default \
             FROM teams t JOIN memberships m ON m.team_id = t.id \
             WHERE m.user_id = $1 ORDER BY t.created_at, t.id",
        )
        .bind(user_id)
        .fetch_all(self.pool())
        .await
        .map_err(|e| Ctx::op("list teams").err(e))?;
        rows.iter()
            .map(team_with_role)
            .collect::<R<Vec<_>>>()
            .map_err(|e| DbError::backend("list teams", e))
    }

    /// The user's default team (the one login puts in the token), if any.
    pub async fn default_team(&self, user_id: &str) -> Result<Option<TeamWithRole>, DbError> {
        let teams = self.teams_of_user(user_id).await?;
        let default = teams.iter().position(|t| t.is_default).unwrap_or(0);
        Ok(teams.into_iter().nth(default))
    }

    pub async fn rename_team(&self, team_id: &str, name: &str) -> Result<Team, DbError> {
        check_team_name(name)?;
        let row = sqlx::query(
            "UPDATE teams SET name = $1 WHERE id = $2 RETURNING id, name, slug, created_at",
        )
        .bind(name.trim())
        .bind(team_id)
        .fetch_optional(self.pool())
        .await
        .map_err(|e| Ctx::op("rename team").err(e))?
        .ok_or(DbError::NotFound { what: "team" })?;
        team(&row).map_err(|e| DbError::backend("rename team", e))
    }

    /// Deletes the team and, by cascade, its memberships, keys, capsule records,
    /// templates and audit rows. The caller makes sure no capsule still runs.
    pub async fn delete_team(&self, team_id: &str) -> Result<(), DbError> {
        let done = sqlx::query("DELETE FROM teams WHERE id = $1")
            .bind(team_id)
            .execute(self.pool())
            .await
            .map_err(|e| Ctx::op("delete team").err(e))?;
        if done.rows_affected() == 0 {
            return Err(DbError::NotFound { what: "team" });
        }
        Ok(())
    }

    /// Adds `user_id` to the team. Conflict "membership" if already a member.
    pub async fn add_member(
        &self,
        team_id: &str,
        user_id: &str,
        role: Role,
    ) -> Result<Membership, DbError> {
        let t = now();
        sqlx::query(
            "INSERT INTO memberships (team_id, user_id, role, is_default, created_at) \
             VALUES ($1, $2, $3, $4, $5)",
        )
        .bind(team_id)
        .bind(user_id)
        .bind(role.as_str())
        .bind(false)
        .bind(to_db(t))
        .execute(self.pool())
        .await
        .map_err(|e| {
            Ctx::op("add member")
                .unique("membership")
                .missing("team or user")
                .err(e)
        })?;
        Ok(Membership {
            team_id: team_id.to_owned(),
            user_id: user_id.to_owned(),
            role,
            is_default: false,
            created_at: t,
        })
    }

    /// The user's role in the team, or NotFound if they are not a member.
    pub async fn member_role(&self, team_id: &str, user_id: &str) -> Result<Role, DbError> {
        // A disabled account is a member of nothing.
        let row = sqlx::query(
            "SELECT m.role FROM memberships m JOIN users u ON u.id = m.user_id \
             WHERE m.team_id = $1 AND m.user_id = $2 AND u.disabled_at IS NULL",
        )
        .bind(team_id)
        .bind(user_id)
        .fetch_optional(self.pool())
        .await
        .map_err(|e| Ctx::op("get member role").err(e))?
        .ok_or(DbError::NotFound { what: "membership" })?;
        role(&row, "role").map_err(|e| DbError::backend("get member role", e))
    }

    /// Sets a member's role to admin or member, without checking who asks (the API uses
    /// [`Db::change_member_role`]). The owner's row is never changed here, and nobody
    /// becomes owner: ownership moves only by [`Db::transfer_ownership`].
    pub async fn set_member_role(
        &self,
        team_id: &str,
        user_id: &str,
        to: Role,
    ) -> Result<(), DbError> {
        if to == Role::Owner {
            return Err(DbError::invalid(
                "role",
                MemberRule::OwnerRoleFixed.message(),
            ));
        }
        let done = sqlx::query(
            "UPDATE memberships SET role = $1 \
             WHERE team_id = $2 AND user_id = $3 AND role <> 'owner'",
        )
        .bind(to.as_str())
        .bind(team_id)
        .bind(user_id)
        .execute(self.pool())
        .await
        .map_err(|e| Ctx::op("set member role").err(e))?;
        if done.rows_affected() == 0 {
            return match self.member_role(team_id, user_id).await? {
                Role::Owner => Err(DbError::invalid(
                    "role",
                    MemberRule::OwnerRoleFixed.message(),
                )),
                _ => Err(DbError::NotFound { what: "membership" }),
            };
        }
        Ok(())
    }

    /// Removes a member, without checking who asks (the API uses
    /// [`Db::remove_member_by`]); never the owner.
    pub async fn remove_member(&self, team_id: &str, user_id: &str) -> Result<(), DbError> {
        let done = sqlx::query(
            "DELETE FROM memberships WHERE team_id = $1 AND user_id = $2 AND role <> 'owner'",
        )
        .bind(team_id)
        .bind(user_id)
        .execute(self.pool())
        .await
        .map_err(|e| Ctx::op("remove member").err(e))?;
        if done.rows_affected() == 0 {
            return match self.member_role(team_id, user_id).await? {
                Role::Owner => Err(DbError::invalid(
                    "membership",
                    MemberRule::OwnerNotRemovable.message(),
                )),
                _ => Err(DbError::NotFound { what: "membership" }),
            };
        }
        Ok(())
    }

    /// The team's members, by join time.
    pub async fn list_members(&self, team_id: &str) -> Result<Vec<Member>, DbError> {
        let rows = sqlx::query(
            "SELECT u.id, u.name, u.email, m.role, m.created_at \
             FROM memberships m JOIN users u ON u.id = m.user_id \
             WHERE m.team_id = $1 ORDER BY m.created_at, u.id",
        )
        .bind(team_id)
        .fetch_all(self.pool())
        .await
        .map_err(|e| Ctx::op("list members").err(e))?;
        rows.iter()
            .map(|row| {
                Ok(Member {
                    user_id: text(row, "id")?,
                    name: text(row, "name")?,
                    email: text(row, "email")?,
                    role: role(row, "role")?,
                    joined_at: ts(row, "created_at")?,
                })
            })
            .collect::<R<Vec<_>>>()
            .map_err(|e| DbError::backend("list members", e))
    }
}

/// A rule of team membership that refused a change. The rules keep exactly one owner
/// per team: the owner's role changes only by handing ownership over, nobody removes
/// the owner, and the owner leaves only after handing ownership over. Admins manage
/// members; only the owner manages admins.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MemberRule {
    /// Only the owner grants or revokes the admin role, removes admins, hands over
    /// ownership and deletes the team.
    NeedsOwner,
    /// Only the owner and admins manage members.
    NeedsManager,
    /// The owner's role changes only by handing ownership over to another member.
    OwnerRoleFixed,
    /// Nobody removes the owner.
    OwnerNotRemovable,
    /// The owner leaves only after handing ownership over (or deletes the team).
    OwnerCannotLeave,
    /// The memberships changed while the request ran; nothing was written.
    Changed,
}

impl MemberRule {
    pub fn message(self) -> &'static str {
        match self {
            MemberRule::NeedsOwner => "only the team's owner can do this",
            MemberRule::NeedsManager => "only the team's owner or admins can do this",
            MemberRule::OwnerRoleFixed => {
                "the owner's role cannot be changed; the owner hands ownership over by giving another member the role owner"
            }
            MemberRule::OwnerNotRemovable => "the team's owner cannot be removed",
            MemberRule::OwnerCannotLeave => {
                "the owner cannot leave the team; hand ownership over to another member first, or delete the team"
            }
            MemberRule::Changed => "the team's memberships changed meanwhile; nothing was done, retry",
        }
    }
}

impl std::fmt::Display for MemberRule {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.message())
    }
}

/// What a checked membership change fails with: a rule refused it, or the database.
#[derive(Debug, thiserror::Error)]
pub enum MemberError {
    #[error("{0}")]
    Refused(MemberRule),
    #[error(transparent)]
    Db(#[from] DbError),
}

/// The checked membership changes, for diagnosing a conditional write that matched no row.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum MemberOp {
    ChangeRole,
    Remove,
    Leave,
    Transfer,
    DeleteTeam,
}

/// Whether `op` by a caller with `actor` role on a member with `target` role is allowed
/// (`None`: not a member). The SQL of each change encodes the same rules; this only
/// names the one that refused it.
fn member_rule(op: MemberOp, actor: Option<Role>, target: Option<Role>) -> Result<(), MemberError> {
    let Some(actor) = actor else {
        return Err(DbError::NotFound { what: "team" }.into());
    };
    if op == MemberOp::DeleteTeam {
        return if actor == Role::Owner {
            Ok(())
        } else {
            Err(MemberError::Refused(MemberRule::NeedsOwner))
        };
    }
    let Some(target) = target else {
        return Err(DbError::NotFound { what: "membership" }.into());
    };
    let refuse = |r| Err(MemberError::Refused(r));
    match op {
        MemberOp::Leave if target == Role::Owner => refuse(MemberRule::OwnerCannotLeave),
        MemberOp::Leave => Ok(()),
        MemberOp::ChangeRole if target == Role::Owner => refuse(MemberRule::OwnerRoleFixed),
        MemberOp::Remove if target == Role::Owner => refuse(MemberRule::OwnerNotRemovable),
        MemberOp::ChangeRole | MemberOp::Remove | MemberOp::Transfer if actor == Role::Owner => {
            Ok(())
        }
        MemberOp::Remove if actor == Role::Admin && target == Role::Member => Ok(()),
        MemberOp::Remove if actor == Role::Member => refuse(MemberRule::NeedsManager),
        _ => refuse(MemberRule::NeedsOwner),
    }
}

/// Members with the owner role in a team: the subquery the checked changes use.
const ACTOR_IS_OWNER: &str = "EXISTS (SELECT 1 FROM memberships a \
     WHERE a.team_id = $1 AND a.user_id = $3 AND a.role = 'owner')";

impl Db {
    async fn role_in(&self, team_id: &str, user_id: &str) -> Result<Option<Role>, DbError> {
        match self.member_role(team_id, user_id).await {
            Ok(r) => Ok(Some(r)),
            Err(DbError::NotFound { .. }) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Why a checked change of `target` by `actor` matched no row: the rule that refuses
    /// it now, or [`MemberRule::Changed`] when none does (it lost a race).
    async fn refusal(&self, op: MemberOp, team_id: &str, actor: &str, target: &str) -> MemberError {
        let roles = async {
            Ok::<_, DbError>((
                self.role_in(team_id, actor).await?,
                self.role_in(team_id, target).await?,
            ))
        };
        match roles.await {
            Ok((a, t)) => match member_rule(op, a, t) {
                Err(e) => e,
                Ok(()) => MemberError::Refused(MemberRule::Changed),
            },
            Err(e) => e.into(),
        }
    }

    /// Sets `target`'s role in the team as `actor` asks. Giving the role owner hands
    /// ownership over ([`Db::transfer_ownership`]); otherwise only the owner changes
    /// roles, and never their own. Checked and written in one statement.
    pub async fn change_member_role(
        &self,
        team_id: &str,
        actor: &str,
        target: &str,
        to: Role,
    ) -> Result<(), MemberError> {
        if to == Role::Owner {
            return self.transfer_ownership(team_id, actor, target).await;
        }
        let done = sqlx::query(&format!(
            "UPDATE memberships SET role = $4 \
             WHERE team_id = $1 AND user_id = $2 AND role <> 'owner' AND {ACTOR_IS_OWNER}"
        ))
        .bind(team_id)
        .bind(target)
        .bind(actor)
        .bind(to.as_str())
        .execute(self.pool())
        .await
        .map_err(|e| Ctx::op("change member role").err(e))?;
        if done.rows_affected() == 0 {
            return Err(self
                .refusal(MemberOp::ChangeRole, team_id, actor, target)
                .await);
        }
        Ok(())
    }

    /// Hands the team's ownership from `owner` to the member `to`, atomically: `owner`
    /// becomes an admin. Refused unless `owner` owns the team when it runs.
    pub async fn transfer_ownership(
        &self,
        team_id: &str,
        owner: &str,
        to: &str,
    ) -> Result<(), MemberError> {
        let ctx = Ctx::op("transfer ownership");
        if owner == to {
            // Handing ownership to oneself: nothing to do for the owner.
            return match self.role_in(team_id, owner).await? {
                Some(Role::Owner) => Ok(()),
                Some(_) => Err(MemberError::Refused(MemberRule::NeedsOwner)),
                None => Err(DbError::NotFound { what: "team" }.into()),
            };
        }
        let mut tx = self.pool().begin().await.map_err(|e| ctx.err(e))?;
        // The owner's row first: a concurrent change of it waits, then finds no owner.
        let demoted = sqlx::query(
            "UPDATE memberships SET role = 'admin' \
             WHERE team_id = $1 AND user_id = $2 AND role = 'owner'",
        )
        .bind(team_id)
        .bind(owner)
        .execute(&mut *tx)
        .await
        .map_err(|e| ctx.err(e))?;
        let promoted = if demoted.rows_affected() == 1 {
            sqlx::query("UPDATE memberships SET role = 'owner' WHERE team_id = $1 AND user_id = $2")
                .bind(team_id)
                .bind(to)
                .execute(&mut *tx)
                .await
                .map_err(|e| ctx.err(e))?
                .rows_affected()
        } else {
            0
        };
        if promoted != 1 {
            tx.rollback().await.map_err(|e| ctx.err(e))?;
            return Err(self.refusal(MemberOp::Transfer, team_id, owner, to).await);
        }
        tx.commit().await.map_err(|e| ctx.err(e))?;
        Ok(())
    }

    /// Removes `target` from the team as `actor` asks: the owner removes anyone but
    /// themselves, admins remove members; removing oneself is [`Db::leave_team`].
    /// Checked and written in one statement.
    pub async fn remove_member_by(
        &self,
        team_id: &str,
        actor: &str,
        target: &str,
    ) -> Result<(), MemberError> {
        if actor == target {
            return self.leave_team(team_id, actor).await;
        }
        let done = sqlx::query(&format!(
            "DELETE FROM memberships \
             WHERE team_id = $1 AND user_id = $2 AND role <> 'owner' \
               AND ({ACTOR_IS_OWNER} OR (role = 'member' AND EXISTS (SELECT 1 FROM memberships a \
                    WHERE a.team_id = $1 AND a.user_id = $3 AND a.role = 'admin')))"
        ))
        .bind(team_id)
        .bind(target)
        .bind(actor)
        .execute(self.pool())
        .await
        .map_err(|e| Ctx::op("remove member").err(e))?;
        if done.rows_affected() == 0 {
            return Err(self.refusal(MemberOp::Remove, team_id, actor, target).await);
        }
        Ok(())
    }

    /// `user_id` leaves the team; the owner cannot (they hand ownership over first).
    pub async fn leave_team(&self, team_id: &str, user_id: &str) -> Result<(), MemberError> {
        let done = sqlx::query(
            "DELETE FROM memberships WHERE team_id = $1 AND user_id = $2 AND role <> 'owner'",
        )
        .bind(team_id)
        .bind(user_id)
        .execute(self.pool())
        .await
        .map_err(|e| Ctx::op("leave team").err(e))?;
        if done.rows_affected() == 0 {
            return Err(self
                .refusal(MemberOp::Leave, team_id, user_id, user_id)
                .await);
        }
        Ok(())
    }

    /// Deletes the team (as [`Db::delete_team`]) if `actor` owns it when it runs.
    pub async fn delete_team_by_owner(
        &self,
        team_id: &str,
        actor: &str,
    ) -> Result<(), MemberError> {
        let done = sqlx::query(
            "DELETE FROM teams WHERE id = $1 AND EXISTS (SELECT 1 FROM memberships a \
             WHERE a.team_id = $1 AND a.user_id = $2 AND a.role = 'owner')",
        )
        .bind(team_id)
        .bind(actor)
        .execute(self.pool())
        .await
        .map_err(|e| Ctx::op("delete team").err(e))?;
        if done.rows_affected() == 0 {
            return Err(self
                .refusal(MemberOp::DeleteTeam, team_id, actor, actor)
                .await);
        }
        Ok(())
    }

    /// Creates an invitation for `email` to join the team as `role` (admin or member),
    /// valid for `ttl`. The token is in the result only.
    pub async fn create_invitation(
        &self,
        team_id: &str,
        email: &str,
        role: Role,
        created_by: Option<&str>,
        ttl: std::time::Duration,
    ) -> Result<CreatedInvitation, DbError> {
        if role == Role::Owner {
            return Err(DbError::invalid(
                "role",
                "an invitation is for an admin or a member; a team has one owner",
            ));
        }
        let email = crate::users::normalize_email(email)?;
        let token = format!("{INVITATION_TOKEN_PREFIX}{}", random_hex(16));
        let created_at = now();
        let ttl = chrono::Duration::from_std(ttl)
            .map_err(|_| DbError::invalid("invitation lifetime", "too long"))?;
        let invitation = Invitation {
            id: new_id(INVITATION_ID_PREFIX),
            team_id: team_id.to_owned(),
            email,
            role,
            created_by: created_by.map(str::to_owned),
            created_at,
            expires_at: created_at + ttl,
        };
        sqlx::query(
            "INSERT INTO invitations \
             (id, team_id, email, role, token_hash, created_by, created_at, expires_at) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
        )
        .bind(&invitation.id)
        .bind(team_id)
        .bind(&invitation.email)
        .bind(role.as_str())
        .bind(hash_invitation_token(&token))
        .bind(created_by)
        .bind(to_db(invitation.created_at))
        .bind(to_db(invitation.expires_at))
        .execute(self.pool())
        .await
        .map_err(|e| {
            Ctx::op("create invitation")
                .unique("invitation")
                .missing("team or user")
                .err(e)
        })?;
        Ok(CreatedInvitation { invitation, token })
    }

    /// The team's invitations (expired ones too), newest first.
    pub async fn list_invitations(&self, team_id: &str) -> Result<Vec<Invitation>, DbError> {
        let rows = sqlx::query(&format!(
            "SELECT {INVITATION_COLS} FROM invitations WHERE team_id = $1 \
             ORDER BY created_at DESC, id DESC"
        ))
        .bind(team_id)
        .fetch_all(self.pool())
        .await
        .map_err(|e| Ctx::op("list invitations").err(e))?;
        rows.iter()
            .map(invitation)
            .collect::<R<Vec<_>>>()
            .map_err(|e| DbError::backend("list invitations", e))
    }

    pub async fn delete_invitation(&self, team_id: &str, id: &str) -> Result<(), DbError> {
        let done = sqlx::query("DELETE FROM invitations WHERE team_id = $1 AND id = $2")
            .bind(team_id)
            .bind(id)
            .execute(self.pool())
            .await
            .map_err(|e| Ctx::op("delete invitation").err(e))?;
        if done.rows_affected() == 0 {
            return Err(DbError::NotFound { what: "invitation" });
        }
        Ok(())
    }

    /// The unexpired invitation with this token for this e-mail, else NotFound
    /// "invitation" (a wrong token, another address, or expired: indistinguishable).
    pub async fn invitation_for(&self, token: &str, email: &str) -> Result<Invitation, DbError> {
        let missing = DbError::NotFound { what: "invitation" };
        let Ok(email) = crate::users::normalize_email(email) else {
            return Err(missing);
        };
        let row = sqlx::query(&format!(
            "SELECT {INVITATION_COLS} FROM invitations \
             WHERE token_hash = $1 AND email = $2 AND expires_at > $3"
        ))
        .bind(hash_invitation_token(token.trim()))
        .bind(email)
        .bind(to_db(now()))
        .fetch_optional(self.pool())
        .await
        .map_err(|e| Ctx::op("look up invitation").err(e))?
        .ok_or(missing)?;
        invitation(&row).map_err(|e| DbError::backend("look up invitation", e))
    }
}

/// The prefix of invitation ids.
const INVITATION_ID_PREFIX: &str = "inv-";
/// Invitation tokens: this prefix and 32 lowercase hex.
pub const INVITATION_TOKEN_PREFIX: &str = "wrninv_";

/// The stored form of an invitation token: SHA-256, lowercase hex.
pub(crate) fn hash_invitation_token(token: &str) -> String {
    use sha2::{Digest, Sha256};
    crate::id::hex(&Sha256::digest(token.as_bytes()))
}

/// An invitation to sign up and join a team; never the token.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Invitation {
    pub id: String,
    pub team_id: String,
    pub email: String,
    pub role: Role,
    pub created_by: Option<String>,
    pub created_at: Timestamp,
    pub expires_at: Timestamp,
}

/// A new invitation with its token: show `token` once, it is not stored.
#[derive(Clone, PartialEq, Eq)]
pub struct CreatedInvitation {
    pub invitation: Invitation,
    pub token: String,
}

impl std::fmt::Debug for CreatedInvitation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CreatedInvitation")
            .field("invitation", &self.invitation)
            .field("token", &"<redacted>")
            .finish()
    }
}

pub(crate) const INVITATION_COLS: &str =
    "id, team_id, email, role, created_by, created_at, expires_at";

pub(crate) fn invitation(row: &AnyRow) -> R<Invitation> {
    Ok(Invitation {
        id: text(row, "id")?,
        team_id: text(row, "team_id")?,
        email: text(row, "email")?,
        role: role(row, "role")?,
        created_by: crate::row::opt_text(row, "created_by")?,
        created_at: ts(row, "created_at")?,
        expires_at: ts(row, "expires_at")?,
    })
}

fn team_with_role(row: &AnyRow) -> R<TeamWithRole> {
    Ok(TeamWithRole {
        team: team(row)?,
        role: role(row, "role")?,
        is_default: boolean(row, "is_default")?,
    })
}
