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
        let row = sqlx::query("SELECT role FROM memberships WHERE team_id = $1 AND user_id = $2")
            .bind(team_id)
            .bind(user_id)
            .fetch_optional(self.pool())
            .await
            .map_err(|e| Ctx::op("get member role").err(e))?
            .ok_or(DbError::NotFound { what: "membership" })?;
        role(&row, "role").map_err(|e| DbError::backend("get member role", e))
    }

    pub async fn set_member_role(
        &self,
        team_id: &str,
        user_id: &str,
        to: Role,
    ) -> Result<(), DbError> {
        let done =
            sqlx::query("UPDATE memberships SET role = $1 WHERE team_id = $2 AND user_id = $3")
                .bind(to.as_str())
                .bind(team_id)
                .bind(user_id)
                .execute(self.pool())
                .await
                .map_err(|e| Ctx::op("set member role").err(e))?;
        if done.rows_affected() == 0 {
            return Err(DbError::NotFound { what: "membership" });
        }
        Ok(())
    }

    pub async fn remove_member(&self, team_id: &str, user_id: &str) -> Result<(), DbError> {
        let done = sqlx::query("DELETE FROM memberships WHERE team_id = $1 AND user_id = $2")
            .bind(team_id)
            .bind(user_id)
            .execute(self.pool())
            .await
            .map_err(|e| Ctx::op("remove member").err(e))?;
        if done.rows_affected() == 0 {
            return Err(DbError::NotFound { what: "membership" });
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

fn team_with_role(row: &AnyRow) -> R<TeamWithRole> {
    Ok(TeamWithRole {
        team: team(row)?,
        role: role(row, "role")?,
        is_default: boolean(row, "is_default")?,
    })
}
