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
