//! Argon2id password hashes (PHC strings), computed on the blocking pool: one hash
//! costs tens of milliseconds of CPU and must not stall a tokio worker.

use crate::DbError;
use argon2::password_hash::rand_core::OsRng;
use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use argon2::Argon2;

/// Longest password accepted; bounds the hashing work an attacker can ask for.
pub(crate) const MAX_PASSWORD_LEN: usize = 1024;

pub(crate) async fn hash(password: &str) -> Result<String, DbError> {
    if password.len() > MAX_PASSWORD_LEN {
        return Err(DbError::invalid("password", "longer than 1024 bytes"));
    }
    let password = password.to_owned();
    tokio::task::spawn_blocking(move || {
        let salt = SaltString::generate(&mut OsRng);
        Argon2::default()
            .hash_password(password.as_bytes(), &salt)
            .map(|h| h.to_string())
            .map_err(|e| DbError::backend("hash password", e.to_string()))
    })
    .await
    .map_err(|e| DbError::backend("hash password", e))?
}

/// Whether `password` matches `phc`. With `phc = None` (unknown user, or an account
/// without a password) it still does one hash's worth of work and answers false, so
/// the timing does not reveal which accounts exist.
pub(crate) async fn verify(password: &str, phc: Option<String>) -> Result<bool, DbError> {
    if password.len() > MAX_PASSWORD_LEN {
        return Ok(false);
    }
    let password = password.to_owned();
    tokio::task::spawn_blocking(move || {
        let Some(phc) = phc else {
            let salt = SaltString::generate(&mut OsRng);
            let _ = Argon2::default().hash_password(password.as_bytes(), &salt);
            return Ok(false);
        };
        let parsed = PasswordHash::new(&phc)
            .map_err(|e| DbError::backend("parse password hash", e.to_string()))?;
        Ok(Argon2::default()
            .verify_password(password.as_bytes(), &parsed)
            .is_ok())
    })
    .await
    .map_err(|e| DbError::backend("verify password", e))?
}
