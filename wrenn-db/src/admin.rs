//! What platform admins see across teams: every team with its counts, every account
//! (and disabling one). Not for team-scoped request handlers.

use crate::error::Ctx;
use crate::row::{int, opt_text, text, ts, R};
use crate::teams::Team;
use crate::time::{now, to_db};
use crate::users::{user, User, COLS as USER_COLS};
use crate::{Db, DbError};

/// A team as platform admins list it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TeamSummary {
    pub team: Team,
    pub member_count: u64,
    /// The owner's e-mail.
    pub owner: Option<String>,
    /// Capsules not stopped.
    pub active_capsules: u64,
    pub channel_count: u64,
}

impl Db {
    /// Every team, oldest first, with its counts.
    pub async fn admin_team_summaries(&self) -> Result<Vec<TeamSummary>, DbError> {
        let op = "list teams";
        let rows = sqlx::query(
            "SELECT t.id, t.name, t.slug, t.created_at, \
             (SELECT COUNT(*) FROM memberships m WHERE m.team_id = t.id) AS members, \
             (SELECT u.email FROM memberships m JOIN users u ON u.id = m.user_id \
              WHERE m.team_id = t.id AND m.role = 'owner' LIMIT 1) AS owner, \
             (SELECT COUNT(*) FROM capsules c WHERE c.team_id = t.id \
              AND c.status NOT IN ('stopped', 'error')) AS active, \
             (SELECT COUNT(*) FROM channels ch WHERE ch.team_id = t.id) AS channels \
             FROM teams t ORDER BY t.created_at, t.id",
        )
        .fetch_all(self.pool())
        .await
        .map_err(|e| Ctx::op(op).err(e))?;
        rows.iter()
            .map(|r| {
                let read = || -> R<TeamSummary> {
                    let n = |c: &str| -> R<u64> { Ok(u64::try_from(int(r, c)?).unwrap_or(0)) };
                    Ok(TeamSummary {
                        team: Team {
                            id: text(r, "id")?,
                            name: text(r, "name")?,
                            slug: text(r, "slug")?,
                            created_at: ts(r, "created_at")?,
                        },
                        member_count: n("members")?,
                        owner: opt_text(r, "owner")?,
                        active_capsules: n("active")?,
                        channel_count: n("channels")?,
                    })
                };
                read().map_err(|e| DbError::backend(op, e))
            })
            .collect()
    }

    /// A page of every account, oldest first, and how many there are.
    pub async fn admin_users(&self, limit: u32, offset: u64) -> Result<(Vec<User>, u64), DbError> {
        let op = "list users";
        let rows = sqlx::query(&format!(
            "SELECT {USER_COLS} FROM users ORDER BY created_at, id LIMIT $1 OFFSET $2"
        ))
        .bind(i64::from(limit))
        .bind(i64::try_from(offset).unwrap_or(i64::MAX))
        .fetch_all(self.pool())
        .await
        .map_err(|e| Ctx::op(op).err(e))?;
        let users = rows
            .iter()
            .map(user)
            .collect::<R<Vec<_>>>()
            .map_err(|e| DbError::backend(op, e))?;
        let total = sqlx::query("SELECT COUNT(*) AS n FROM users")
            .fetch_one(self.pool())
            .await
            .map_err(|e| Ctx::op(op).err(e))?;
        let total = int(&total, "n").map_err(|e| DbError::backend(op, e))?;
        Ok((users, u64::try_from(total).unwrap_or(0)))
    }

    /// Disables (or enables again) account `id`.
    pub async fn set_user_disabled(&self, id: &str, disabled: bool) -> Result<User, DbError> {
        let t = to_db(now());
        let row = sqlx::query(&format!(
            "UPDATE users SET disabled_at = $2, updated_at = $3 WHERE id = $1 RETURNING {USER_COLS}"
        ))
        .bind(id)
        .bind(disabled.then_some(t))
        .bind(t)
        .fetch_optional(self.pool())
        .await
        .map_err(|e| Ctx::op("disable user").err(e))?
        .ok_or(DbError::NotFound { what: "user" })?;
        user(&row).map_err(|e| DbError::backend("disable user", e))
    }
}
