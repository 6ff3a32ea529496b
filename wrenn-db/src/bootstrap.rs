//! First start: an admin user, a team and an API key on an empty database.

use crate::api_keys::{generate_api_key, validate_api_key};
use crate::{Db, DbError};

pub const BOOTSTRAP_ADMIN_EMAIL: &str = "admin@wrenn.local";
pub const BOOTSTRAP_TEAM_NAME: &str = "Default";
const BOOTSTRAP_KEY_NAME: &str = "Bootstrap key";

/// On a database without users, creates the admin user (no password), the team
/// "Default" it owns, and an API key — `given_key` if set (it must be `wrn_` + 32
/// lowercase hex), else a random one — and returns the key's plaintext, once. On a
/// database that has users it does nothing and returns `None`.
///
/// The three rows are not one transaction (the key and team functions each commit), so a
/// crash between them leaves a user without a key; that database is then no longer
/// "empty" and the operator creates keys through the API. A concurrent bootstrap
/// loses the race on the admin's unique e-mail and returns `None`.
pub async fn ensure_bootstrap(db: &Db, given_key: Option<&str>) -> Result<Option<String>, DbError> {
    if let Some(key) = given_key {
        validate_api_key(key)?;
    }
    let any_user = sqlx::query("SELECT id FROM users LIMIT 1")
        .fetch_optional(db.pool())
        .await
        .map_err(|e| DbError::backend("check for bootstrap", e))?;
    if any_user.is_some() {
        if let Some(key) = given_key {
            if db.api_key_by_hash(&crate::hash_api_key(key)).await.is_err() {
                tracing::warn!("The given bootstrap API key is not in the database, which is not empty: ignored");
            }
        }
        return Ok(None);
    }
    let admin = match db
        .create_user(BOOTSTRAP_ADMIN_EMAIL, "Admin", None, true)
        .await
    {
        Ok(u) => u,
        Err(DbError::Conflict { .. }) => return Ok(None),
        Err(e) => return Err(e),
    };
    let team = db.create_team(BOOTSTRAP_TEAM_NAME, &admin.id).await?;
    let key = given_key.map_or_else(generate_api_key, str::to_owned);
    let created = db
        .insert_api_key(&team.id, BOOTSTRAP_KEY_NAME, Some(&admin.id), key)
        .await?;
    tracing::info!(team = %team.id, key_prefix = %created.api_key.key_prefix, "Bootstrapped admin user, team and API key");
    Ok(Some(created.key))
}

/// Gives the bootstrap admin ([`BOOTSTRAP_ADMIN_EMAIL`], the owner of the first team)
/// `password` if the account has none yet, so that it can log in and manage its team
/// (API keys cannot create or delete keys). Never replaces a password; returns whether
/// it set one (false when the account has a password or does not exist).
pub async fn ensure_bootstrap_admin_password(db: &Db, password: &str) -> Result<bool, DbError> {
    if password.chars().count() < 8 {
        return Err(DbError::invalid(
            "bootstrap admin password",
            "must be at least 8 characters",
        ));
    }
    let admin = match db.get_user_by_email(BOOTSTRAP_ADMIN_EMAIL).await {
        Ok(u) => u,
        Err(DbError::NotFound { .. }) => return Ok(false),
        Err(e) => return Err(e),
    };
    if admin.has_password {
        return Ok(false);
    }
    let set = db.set_password_if_unset(&admin.id, password).await?;
    if set {
        tracing::info!(
            email = BOOTSTRAP_ADMIN_EMAIL,
            "Set the bootstrap admin's password"
        );
    }
    Ok(set)
}
