//! Argon2id password hashes (PHC strings), computed on the blocking pool: one hash
//! costs tens of milliseconds of CPU and must not stall a tokio worker.
//!
//! Each hash needs Argon2's working memory (19 MiB with the default parameters). It is
//! taken from a small pool of buffers and given back afterwards, rather than allocated
//! and freed per hash: with the system allocator, a freed region that size tends to
//! stay resident while the next hash gets a fresh one (measured: the process grew by
//! the full 19 MiB per login), so memory grew with the number of logins instead of with
//! the number of concurrent ones. How many hashes run at once is the caller's to bound
//! (the API server does); at most [`KEPT_MAX`] buffers are kept.

use crate::DbError;
use argon2::password_hash::rand_core::OsRng;
use argon2::password_hash::{Output, ParamsString, PasswordHash, SaltString};
use argon2::{Algorithm, Argon2, Block, Params, Version};
use std::sync::Mutex;

/// Longest password accepted; bounds the hashing work an attacker can ask for.
pub(crate) const MAX_PASSWORD_LEN: usize = 1024;

/// Working-memory buffers of the default parameters' size, for reuse.
static MEMORY: Mutex<Vec<Vec<Block>>> = Mutex::new(Vec::new());
/// Most buffers kept for reuse (more concurrent hashes use buffers of their own).
const KEPT_MAX: usize = 8;

/// Runs `f` with at least `blocks` blocks of working memory.
fn with_memory<T>(blocks: usize, f: impl FnOnce(&mut [Block]) -> T) -> T {
    let pooled = blocks == Params::DEFAULT.block_count();
    let mut buf = if pooled {
        MEMORY
            .lock()
            .ok()
            .and_then(|mut m| m.pop())
            .unwrap_or_default()
    } else {
        Vec::new()
    };
    if buf.len() < blocks {
        buf = vec![Block::default(); blocks];
    }
    let out = f(&mut buf);
    if pooled {
        if let Ok(mut m) = MEMORY.lock() {
            if m.len() < KEPT_MAX {
                m.push(buf);
            }
        }
    }
    out
}

fn failed(op: &'static str) -> impl Fn(argon2::Error) -> DbError {
    move |e| DbError::backend(op, e.to_string())
}

fn failed_phc(op: &'static str) -> impl Fn(argon2::password_hash::Error) -> DbError {
    move |e| DbError::backend(op, e.to_string())
}

/// A new PHC string for `password` (Argon2id, default parameters, random salt): the
/// same string `Argon2::default().hash_password` makes.
fn hash_blocking(password: &[u8]) -> Result<String, DbError> {
    let op = "hash password";
    let salt = SaltString::generate(&mut OsRng);
    let mut salt_buf = [0u8; 64];
    let salt_bytes = salt
        .as_salt()
        .decode_b64(&mut salt_buf)
        .map_err(failed_phc(op))?;
    let params = Params::DEFAULT;
    let argon = Argon2::new(Algorithm::Argon2id, Version::V0x13, params.clone());
    let mut out = [0u8; Params::DEFAULT_OUTPUT_LEN];
    with_memory(params.block_count(), |mem| {
        argon.hash_password_into_with_memory(password, salt_bytes, &mut out, mem)
    })
    .map_err(failed(op))?;
    let phc = PasswordHash {
        algorithm: Algorithm::Argon2id.ident(),
        version: Some(Version::V0x13.into()),
        params: ParamsString::try_from(&params).map_err(failed_phc(op))?,
        salt: Some(salt.as_salt()),
        hash: Some(Output::new(&out).map_err(failed_phc(op))?),
    };
    Ok(phc.to_string())
}

/// Whether `password` hashes to the PHC string `phc` (with its own parameters).
fn verify_blocking(password: &[u8], phc: &str) -> Result<bool, DbError> {
    let op = "verify password";
    let parsed = PasswordHash::new(phc).map_err(failed_phc("parse password hash"))?;
    let algorithm = Algorithm::try_from(parsed.algorithm).map_err(failed_phc(op))?;
    let version = parsed
        .version
        .map(Version::try_from)
        .transpose()
        .map_err(failed(op))?
        .unwrap_or_default();
    let params = Params::try_from(&parsed).map_err(failed_phc(op))?;
    let (Some(salt), Some(expected)) = (parsed.salt, parsed.hash) else {
        return Err(DbError::backend(op, "password hash without salt or hash"));
    };
    let mut salt_buf = [0u8; 64];
    let salt_bytes = salt.decode_b64(&mut salt_buf).map_err(failed_phc(op))?;
    let argon = Argon2::new(algorithm, version, params.clone());
    let mut out = vec![0u8; expected.len()];
    with_memory(params.block_count(), |mem| {
        argon.hash_password_into_with_memory(password, salt_bytes, &mut out, mem)
    })
    .map_err(failed(op))?;
    // `Output` compares in constant time.
    Ok(Output::new(&out).map_err(failed_phc(op))? == expected)
}

pub(crate) async fn hash(password: &str) -> Result<String, DbError> {
    if password.len() > MAX_PASSWORD_LEN {
        return Err(DbError::invalid("password", "longer than 1024 bytes"));
    }
    let password = password.to_owned();
    tokio::task::spawn_blocking(move || hash_blocking(password.as_bytes()))
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
    tokio::task::spawn_blocking(move || match phc {
        Some(phc) => verify_blocking(password.as_bytes(), &phc),
        None => hash_blocking(password.as_bytes()).map(|_| false),
    })
    .await
    .map_err(|e| DbError::backend("verify password", e))?
}

#[cfg(test)]
mod tests {
    use super::*;
    use argon2::{PasswordHasher, PasswordVerifier};

    #[test]
    fn hashes_interoperate_with_the_argon2_crate() {
        // Ours verify with the crate's verifier, and the crate's (including other
        // parameters, which do not use the pool) with ours.
        let ours = hash_blocking(b"correct horse").unwrap();
        assert!(
            ours.starts_with("$argon2id$v=19$m=19456,t=2,p=1$"),
            "{ours}"
        );
        let parsed = PasswordHash::new(&ours).unwrap();
        assert!(Argon2::default()
            .verify_password(b"correct horse", &parsed)
            .is_ok());
        assert!(Argon2::default()
            .verify_password(b"wrong horse", &parsed)
            .is_err());
        for argon in [
            Argon2::default(),
            Argon2::new(
                Algorithm::Argon2id,
                Version::V0x13,
                Params::new(1024, 1, 1, None).unwrap(),
            ),
        ] {
            let salt = SaltString::generate(&mut OsRng);
            let theirs = argon
                .hash_password(b"battery staple", &salt)
                .unwrap()
                .to_string();
            assert!(verify_blocking(b"battery staple", &theirs).unwrap());
            assert!(!verify_blocking(b"battery stapler", &theirs).unwrap());
        }
        assert!(verify_blocking(b"x", "not a phc string").is_err());
    }

    #[test]
    fn working_memory_is_reused() {
        for _ in 0..3 {
            hash_blocking(b"pw").unwrap();
        }
        let kept = MEMORY.lock().unwrap().len();
        assert!((1..=KEPT_MAX).contains(&kept), "{kept}");
    }
}
