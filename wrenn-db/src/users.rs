//! Users: e-mail (unique, stored lower-case), name, optional argon2 password hash.

use crate::error::Ctx;
use crate::id::{new_id, prefix};
use crate::row::{boolean, text, ts, R};
use crate::time::{now, to_db, Timestamp};
use crate::{password, Db, DbError};
use sqlx::any::AnyRow;

/// A user as the API shows it; the password hash never leaves this crate.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct User {
    pub id: String,
    pub email: String,
    pub name: String,
    pub is_admin: bool,
    pub has_password: bool,
    /// Disabled by a platform admin: no login, no working token.
    pub disabled: bool,
    pub created_at: Timestamp,
    pub updated_at: Timestamp,
}

pub(crate) const COLS: &str =
    "id, email, name, is_admin, password_hash IS NOT NULL AS has_password, \
                    disabled_at IS NOT NULL AS disabled, created_at, updated_at";

pub(crate) fn user(row: &AnyRow) -> R<User> {
    Ok(User {
        id: text(row, "id")?,
        email: text(row, "email")?,
        name: text(row, "name")?,
        is_admin: boolean(row, "is_admin")?,
        has_password: boolean(row, "has_password")?,
        disabled: boolean(row, "disabled")?,
        created_at: ts(row, "created_at")?,
        updated_at: ts(row, "updated_at")?,
    })
}

/// Trimmed and lower-cased; a light shape check (the server may validate further).
pub(crate) fn normalize_email(email: &str) -> Result<String, DbError> {
    let email = email.trim().to_lowercase();
    let ok = email.len() <= 254
        && matches!(email.split_once('@'), Some((local, domain)) if !local.is_empty() && !domain.is_empty())
        && !email.chars().any(char::is_whitespace);
    if ok {
        Ok(email)
    } else {
        Err(DbError::invalid(
            "email",
            format!("{email:?} is not an e-mail address"),
        ))
    }
}

fn check_name(name: &str) -> Result<(), DbError> {
    if name.chars().count() > 100 {
        return Err(DbError::invalid("name", "longer than 100 characters"));
    }
    Ok(())
}

impl Db {
    /// Creates a user; `password` (if any) is hashed with argon2id. Conflict "email".
    pub async fn create_user(
        &self,
        email: &str,
        name: &str,
        password: Option<&str>,
        is_admin: bool,
    ) -> Result<User, DbError> {
        let email = normalize_email(email)?;
        check_name(name)?;
        let hash = match password {
            Some(p) => Some(password::hash(p).await?),
            None => None,
        };
        let t = now();
        let row = sqlx::query(&format!(
            "INSERT INTO users (id, email, name, password_hash, is_admin, created_at, updated_at) \
             VALUES ($1, $2, $3, $4, $5, $6, $6) RETURNING {COLS}"
        ))
        .bind(new_id(prefix::USER))
        .bind(email)
        .bind(name)
        .bind(hash)
        .bind(is_admin)
        .bind(to_db(t))
        .fetch_one(self.pool())
        .await
        .map_err(|e| Ctx::op("create user").unique("email").err(e))?;
        user(&row).map_err(|e| DbError::backend("create user", e))
    }

    pub async fn get_user(&self, id: &str) -> Result<User, DbError> {
        let row = sqlx::query(&format!("SELECT {COLS} FROM users WHERE id = $1"))
            .bind(id)
            .fetch_optional(self.pool())
            .await
            .map_err(|e| Ctx::op("get user").err(e))?
            .ok_or(DbError::NotFound { what: "user" })?;
        user(&row).map_err(|e| DbError::backend("get user", e))
    }

    pub async fn get_user_by_email(&self, email: &str) -> Result<User, DbError> {
        let email = normalize_email(email).map_err(|_| DbError::NotFound { what: "user" })?;
        let row = sqlx::query(&format!("SELECT {COLS} FROM users WHERE email = $1"))
            .bind(email)
            .fetch_optional(self.pool())
            .await
            .map_err(|e| Ctx::op("get user by email").err(e))?
            .ok_or(DbError::NotFound { what: "user" })?;
        user(&row).map_err(|e| DbError::backend("get user by email", e))
    }

    /// The user with this e-mail and password, or `None` (unknown e-mail, no password
    /// set, or a wrong password — indistinguishable to the caller and in timing).
    pub async fn verify_password(
        &self,
        email: &str,
        password: &str,
    ) -> Result<Option<User>, DbError> {
        let found = match normalize_email(email) {
            Ok(email) => sqlx::query(&format!(
                "SELECT {COLS}, password_hash FROM users WHERE email = $1"
            ))
            .bind(email)
            .fetch_optional(self.pool())
            .await
            .map_err(|e| Ctx::op("verify password").err(e))?,
            Err(_) => None,
        };
        let (user, phc) = match found {
            Some(row) => {
                let u = user(&row).map_err(|e| DbError::backend("verify password", e))?;
                let phc = crate::row::opt_text(&row, "password_hash")
                    .map_err(|e| DbError::backend("verify password", e))?;
                (Some(u), phc)
            }
            None => (None, None),
        };
        let ok = password::verify(password, phc).await?;
        Ok(user.filter(|_| ok))
    }

    /// Sets (or replaces) the user's password.
    pub async fn set_password(&self, user_id: &str, password: &str) -> Result<(), DbError> {
        let hash = password::hash(password).await?;
        let done =
            sqlx::query("UPDATE users SET password_hash = $1, updated_at = $2 WHERE id = $3")
                .bind(hash)
                .bind(to_db(now()))
                .bind(user_id)
                .execute(self.pool())
                .await
                .map_err(|e| Ctx::op("set password").err(e))?;
        if done.rows_affected() == 0 {
            return Err(DbError::NotFound { what: "user" });
        }
        Ok(())
    }

    pub async fn rename_user(&self, user_id: &str, name: &str) -> Result<User, DbError> {
        check_name(name)?;
        let row = sqlx::query(&format!(
            "UPDATE users SET name = $1, updated_at = $2 WHERE id = $3 RETURNING {COLS}"
        ))
        .bind(name)
        .bind(to_db(now()))
        .bind(user_id)
        .fetch_optional(self.pool())
        .await
        .map_err(|e| Ctx::op("rename user").err(e))?
        .ok_or(DbError::NotFound { what: "user" })?;
        user(&row).map_err(|e| DbError::backend("rename user", e))
    }

    /// Deletes the user and their memberships; keys they created stay with the team.
    /// Refused (InvalidInput) while they own a team that has other members: they hand
    /// ownership over first, so that no team is left without an owner.
    pub async fn delete_user(&self, user_id: &str) -> Result<(), DbError> {
        let done = sqlx::query(
            "DELETE FROM users WHERE id = $1 AND NOT EXISTS ( \
                 SELECT 1 FROM memberships o JOIN memberships m \
                   ON m.team_id = o.team_id AND m.user_id <> o.user_id \
                 WHERE o.user_id = $1 AND o.role = 'owner')",
        )
        .bind(user_id)
        .execute(self.pool())
        .await
        .map_err(|e| Ctx::op("delete user").err(e))?;
        if done.rows_affected() == 0 {
            self.get_user(user_id).await?;
            return Err(DbError::invalid(
                "user",
                "owns a team with other members: hand its ownership over first",
            ));
        }
        Ok(())
    }

    /// Signs up `email` with an invitation (see [`Db::create_invitation`]): creates the
    /// user and makes them a member of the invitation's team (their default team) with
    /// its role, and uses the invitation up, all or nothing. NotFound "invitation" for a
    /// token that is wrong, expired, used or for another address (checked before the
    /// password is hashed); Conflict "email" if the address has an account.
    pub async fn create_user_from_invitation(
        &self,
        token: &str,
        email: &str,
        name: &str,
        password: &str,
    ) -> Result<(User, crate::Invitation), DbError> {
        let invitation = self.invitation_for(token, email).await?;
        check_name(name)?;
        let hash = password::hash(password).await?;
        let ctx = Ctx::op("sign up with invitation")
            .unique("email")
            .missing("invitation");
        let t = now();
        let mut tx = self.pool().begin().await.map_err(|e| ctx.err(e))?;
        let used = sqlx::query("DELETE FROM invitations WHERE id = $1 AND expires_at > $2")
            .bind(&invitation.id)
            .bind(to_db(t))
            .execute(&mut *tx)
            .await
            .map_err(|e| ctx.err(e))?;
        if used.rows_affected() != 1 {
            return Err(DbError::NotFound { what: "invitation" });
        }
        let row = sqlx::query(&format!(
            "INSERT INTO users (id, email, name, password_hash, is_admin, created_at, updated_at) \
             VALUES ($1, $2, $3, $4, $5, $6, $6) RETURNING {COLS}"
        ))
        .bind(new_id(prefix::USER))
        .bind(&invitation.email)
        .bind(name)
        .bind(hash)
        .bind(false)
        .bind(to_db(t))
        .fetch_one(&mut *tx)
        .await
        .map_err(|e| ctx.err(e))?;
        let user = user(&row).map_err(|e| DbError::backend("sign up with invitation", e))?;
        sqlx::query(
            "INSERT INTO memberships (team_id, user_id, role, is_default, created_at) \
             VALUES ($1, $2, $3, $4, $5)",
        )
        .bind(&invitation.team_id)
        .bind(&user.id)
        .bind(invitation.role.as_str())
        .bind(true)
        .bind(to_db(t))
        .execute(&mut *tx)
        .await
        .map_err(|e| ctx.err(e))?;
        tx.commit().await.map_err(|e| ctx.err(e))?;
        Ok((user, invitation))
    }

    /// Gives the user a password if they have none (never replaces one); whether it did.
    pub(crate) async fn set_password_if_unset(
        &self,
        user_id: &str,
        password: &str,
    ) -> Result<bool, DbError> {
        let hash = password::hash(password).await?;
        let done = sqlx::query(
            "UPDATE users SET password_hash = $1, updated_at = $2 \
             WHERE id = $3 AND password_hash IS NULL",
        )
        .bind(hash)
        .bind(to_db(now()))
        .bind(user_id)
        .execute(self.pool())
        .await
        .map_err(|e| Ctx::op("set password").err(e))?;
        Ok(done.rows_affected() == 1)
    }

    /// Users whose e-mail starts with `prefix` (at most `limit`, by e-mail).
    pub async fn search_users_by_email(
        &self,
        prefix: &str,
        limit: u32,
    ) -> Result<Vec<User>, DbError> {
        let pattern = format!(
            "{}%",
            prefix
                .trim()
                .to_lowercase()
                .replace('\\', "\\\\")
                .replace('%', "\\%")
                .replace('_', "\\_")
        );
        let rows = sqlx::query(&format!(
            "SELECT {COLS} FROM users WHERE email LIKE $1 ESCAPE '\\' ORDER BY email LIMIT $2"
        ))
        .bind(pattern)
        .bind(i64::from(limit.min(100)))
        .fetch_all(self.pool())
        .await
        .map_err(|e| Ctx::op("search users").err(e))?;
        rows.iter()
            .map(user)
            .collect::<R<Vec<_>>>()
            .map_err(|e| DbError::backend("search users", e))
    }
}
