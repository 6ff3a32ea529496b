//! Team API keys: `wrn_` + 32 lowercase hex, shown once, stored as SHA-256 hex.
//! `e2b_` + the same 32 hex is another spelling of the same key, for E2B SDK releases
//! that accept only keys matching `^e2b_[0-9a-f]+$`.

use crate::error::Ctx;
use crate::id::{hex, new_id, prefix, random_hex};
use crate::row::{opt_text, opt_ts, text, ts, R};
use crate::time::{now, to_db, Timestamp};
use crate::{Db, DbError};
use sha2::{Digest, Sha256};
use sqlx::any::AnyRow;
use std::time::Duration;

pub const API_KEY_PREFIX: &str = "wrn_";
/// The prefix of a key's E2B spelling.
pub const E2B_KEY_PREFIX: &str = "e2b_";
/// Characters of the key kept for display (`wrn_` + 6 hex).
const DISPLAY_PREFIX_LEN: usize = 10;

/// `last_used` is rewritten at most this often per key, so that a busy key does not
/// turn every authenticated read into a database write.
pub const LAST_USED_GRANULARITY: Duration = Duration::from_secs(10);

/// A key as listed: never the plaintext, never the hash.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ApiKey {
    pub id: String,
    pub team_id: String,
    pub name: String,
    pub key_prefix: String,
    pub created_by: Option<String>,
    pub creator_email: Option<String>,
    pub created_at: Timestamp,
    pub last_used: Option<Timestamp>,
}

/// A freshly created key with its plaintext: show `key` once, it is not stored.
#[derive(Clone, PartialEq, Eq)]
pub struct CreatedApiKey {
    pub api_key: ApiKey,
    pub key: String,
}

impl std::fmt::Debug for CreatedApiKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CreatedApiKey")
            .field("api_key", &self.api_key)
            .field("key", &"<redacted>")
            .finish()
    }
}

/// A new random key: `wrn_` + 32 lowercase hex (16 random bytes).
pub fn generate_api_key() -> String {
    format!("{API_KEY_PREFIX}{}", random_hex(16))
}

/// The Wrenn spelling of a key given in either spelling (`e2b_…` becomes `wrn_…`).
pub fn canonical_api_key(key: &str) -> std::borrow::Cow<'_, str> {
    match key.strip_prefix(E2B_KEY_PREFIX) {
        Some(rest) => std::borrow::Cow::Owned(format!("{API_KEY_PREFIX}{rest}")),
        None => std::borrow::Cow::Borrowed(key),
    }
}

/// The E2B spelling (`e2b_` + the same hex) of a Wrenn key.
pub fn e2b_spelling(key: &str) -> String {
    let canonical = canonical_api_key(key);
    let hex = canonical.strip_prefix(API_KEY_PREFIX).unwrap_or(&canonical);
    format!("{E2B_KEY_PREFIX}{hex}")
}

/// Whether `key` has the exact shape `wrn_` (or `e2b_`) + 32 lowercase hex.
pub fn validate_api_key(key: &str) -> Result<(), DbError> {
    let ok = canonical_api_key(key)
        .strip_prefix(API_KEY_PREFIX)
        .is_some_and(|h| {
            h.len() == 32 && h.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
        });
    if ok {
        Ok(())
    } else {
        Err(DbError::invalid(
            "API key",
            "expected wrn_ (or e2b_) followed by 32 lowercase hex characters",
        ))
    }
}

/// The stored form of a key: SHA-256 of its Wrenn spelling, lowercase hex (both
/// spellings of one key hash alike).
pub fn hash_api_key(key: &str) -> String {
    hex(&Sha256::digest(canonical_api_key(key).as_bytes()))
}

const COLS: &str =
    "k.id, k.team_id, k.name, k.key_prefix, k.created_by, u.email AS creator_email, \
                    k.created_at, k.last_used";
const FROM: &str = "api_keys k LEFT JOIN users u ON u.id = k.created_by";

fn api_key(row: &AnyRow) -> R<ApiKey> {
    Ok(ApiKey {
        id: text(row, "id")?,
        team_id: text(row, "team_id")?,
        name: text(row, "name")?,
        key_prefix: text(row, "key_prefix")?,
        created_by: opt_text(row, "created_by")?,
        creator_email: opt_text(row, "creator_email")?,
        created_at: ts(row, "created_at")?,
        last_used: opt_ts(row, "last_used")?,
    })
}

impl Db {
    /// Creates a random key for the team. The plaintext is in the result only.
    pub async fn create_api_key(
        &self,
        team_id: &str,
        name: &str,
        created_by: Option<&str>,
    ) -> Result<CreatedApiKey, DbError> {
        self.insert_api_key(team_id, name, created_by, generate_api_key())
            .await
    }

    /// Stores a caller-chosen key (bootstrap, scripts); it must pass [`validate_api_key`].
    pub async fn insert_api_key(
        &self,
        team_id: &str,
        name: &str,
        created_by: Option<&str>,
        key: String,
    ) -> Result<CreatedApiKey, DbError> {
        validate_api_key(&key)?;
        let key = canonical_api_key(&key).into_owned();
        let name = name.trim();
        if name.is_empty() || name.chars().count() > 100 {
            return Err(DbError::invalid(
                "API key name",
                "must be 1 to 100 characters",
            ));
        }
        let id = new_id(prefix::API_KEY);
        sqlx::query(
            "INSERT INTO api_keys (id, team_id, name, key_hash, key_prefix, created_by, created_at) \
             VALUES ($1, $2, $3, $4, $5, $6, $7)",
        )
        .bind(&id)
        .bind(team_id)
        .bind(name)
        .bind(hash_api_key(&key))
        .bind(&key[..DISPLAY_PREFIX_LEN])
        .bind(created_by)
        .bind(to_db(now()))
        .execute(self.pool())
        .await
        .map_err(|e| Ctx::op("create API key").unique("API key").missing("team or user").err(e))?;
        let api_key = self.get_api_key(team_id, &id).await?;
        Ok(CreatedApiKey { api_key, key })
    }

    pub async fn get_api_key(&self, team_id: &str, id: &str) -> Result<ApiKey, DbError> {
        let row = sqlx::query(&format!(
            "SELECT {COLS} FROM {FROM} WHERE k.team_id = $1 AND k.id = $2"
        ))
        .bind(team_id)
        .bind(id)
        .fetch_optional(self.pool())
        .await
        .map_err(|e| Ctx::op("get API key").err(e))?
        .ok_or(DbError::NotFound { what: "API key" })?;
        api_key(&row).map_err(|e| DbError::backend("get API key", e))
    }

    /// The team's keys, newest first.
    pub async fn list_api_keys(&self, team_id: &str) -> Result<Vec<ApiKey>, DbError> {
        let rows = sqlx::query(&format!(
            "SELECT {COLS} FROM {FROM} WHERE k.team_id = $1 ORDER BY k.created_at DESC, k.id DESC"
        ))
        .bind(team_id)
        .fetch_all(self.pool())
        .await
        .map_err(|e| Ctx::op("list API keys").err(e))?;
        rows.iter()
            .map(api_key)
            .collect::<R<Vec<_>>>()
            .map_err(|e| DbError::backend("list API keys", e))
    }

    pub async fn delete_api_key(&self, team_id: &str, id: &str) -> Result<(), DbError> {
        let done = sqlx::query("DELETE FROM api_keys WHERE team_id = $1 AND id = $2")
            .bind(team_id)
            .bind(id)
            .execute(self.pool())
            .await
            .map_err(|e| Ctx::op("delete API key").err(e))?;
        if done.rows_affected() == 0 {
            return Err(DbError::NotFound { what: "API key" });
        }
        Ok(())
    }

    /// The key whose SHA-256 hex is `key_hash`, whatever its team (the lookup that
    /// authentication starts from). Does not touch `last_used`.
    pub async fn api_key_by_hash(&self, key_hash: &str) -> Result<ApiKey, DbError> {
        let row = sqlx::query(&format!("SELECT {COLS} FROM {FROM} WHERE k.key_hash = $1"))
            .bind(key_hash)
            .fetch_optional(self.pool())
            .await
            .map_err(|e| Ctx::op("look up API key").err(e))?
            .ok_or(DbError::NotFound { what: "API key" })?;
        api_key(&row).map_err(|e| DbError::backend("look up API key", e))
    }

    /// Authenticates a presented key: NotFound unless it is well-formed and stored.
    /// Records the use in `last_used` (at most every [`LAST_USED_GRANULARITY`]).
    pub async fn authenticate_api_key(&self, key: &str) -> Result<ApiKey, DbError> {
        if validate_api_key(key).is_err() {
            return Err(DbError::NotFound { what: "API key" });
        }
        let mut found = self.api_key_by_hash(&hash_api_key(key)).await?;
        let t = now();
        let stale = found.last_used.is_none_or(|last| {
            t.signed_duration_since(last)
                .to_std()
                .is_ok_and(|d| d >= LAST_USED_GRANULARITY)
        });
        if stale {
            sqlx::query("UPDATE api_keys SET last_used = $1 WHERE id = $2")
                .bind(to_db(t))
                .bind(&found.id)
                .execute(self.pool())
                .await
                .map_err(|e| Ctx::op("record API key use").err(e))?;
            found.last_used = Some(t);
        }
        Ok(found)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_keys_validate_and_hash_to_sha256_hex() {
        let k = generate_api_key();
        assert_eq!(k.len(), 36);
        assert!(validate_api_key(&k).is_ok());
        let h = hash_api_key(&k);
        assert_eq!(h.len(), 64);
        assert_eq!(
            hash_api_key("abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }

    #[test]
    fn key_shape_is_checked_exactly() {
        for bad in [
            "",
            "wrn_",
            "wrn_0123456789abcdef0123456789abcde",
            "wrn_0123456789abcdef0123456789abcdef0",
            "wrn_0123456789ABCDEF0123456789abcdef",
            "wrx_0123456789abcdef0123456789abcdef",
            "wrn_0123456789abcdef0123456789abcdeg",
        ] {
            assert!(validate_api_key(bad).is_err(), "{bad:?}");
        }
        assert!(validate_api_key("wrn_0123456789abcdef0123456789abcdef").is_ok());
        assert!(validate_api_key("e2b_0123456789abcdef0123456789abcdef").is_ok());
        assert!(validate_api_key("e2b_0123456789abcdef0123456789abcde").is_err());
    }

    #[test]
    fn e2b_spelling_is_the_same_key() {
        let k = generate_api_key();
        let e = e2b_spelling(&k);
        assert!(e.starts_with("e2b_") && e[4..] == k[4..], "{e}");
        assert_eq!(hash_api_key(&e), hash_api_key(&k));
        assert_eq!(canonical_api_key(&e), k);
        assert_eq!(e2b_spelling(&e), e);
        // Only the E2B prefix is another spelling.
        assert_ne!(hash_api_key(&format!("x2b_{}", &k[4..])), hash_api_key(&k));
    }
}
