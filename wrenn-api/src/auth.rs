//! Who is calling: API keys (`X-API-Key`, cached briefly after a database check),
//! user JWTs (`Authorization: Bearer`), and the per-caller rate limit.

use crate::error::ApiError;
use crate::state::AppState;
use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use axum::http::HeaderMap;
use jsonwebtoken::{decode, encode, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use wrenn_db::{Actor, ApiKey, Role};

/// How long a JWT is valid.
pub const JWT_TTL: Duration = Duration::from_secs(6 * 3600);
/// How long a checked API key is trusted without asking the database again.
const KEY_CACHE_TTL: Duration = Duration::from_secs(10);

/// An authenticated caller, always acting for exactly one team.
#[derive(Clone, Debug)]
pub struct Principal {
    pub team_id: String,
    pub actor: Actor,
    /// Display name for audit rows (e-mail or key name).
    pub actor_name: Option<String>,
    /// Set for users (JWT); API keys act with member rights on their team.
    pub user: Option<UserClaims>,
}

impl Principal {
    pub fn user(&self) -> Result<&UserClaims, ApiError> {
        self.user.as_ref().ok_or_else(|| {
            ApiError::unauthorized(
                "this route needs a user token (Authorization: Bearer <jwt>), not an API key",
            )
        })
    }

    pub fn role(&self) -> Role {
        self.user
            .as_ref()
            .and_then(|u| Role::parse(&u.role))
            .unwrap_or(Role::Member)
    }

    fn rate_key(&self) -> &str {
        match &self.actor {
            Actor::User { id } | Actor::ApiKey { id } => id,
            Actor::System => "",
        }
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct UserClaims {
    pub sub: String,
    pub team_id: String,
    pub role: String,
    pub email: String,
    pub name: String,
    pub is_admin: bool,
    pub iat: i64,
    pub exp: i64,
}

/// HS256 keys for user tokens.
pub struct JwtKeys {
    enc: EncodingKey,
    dec: DecodingKey,
}

impl std::fmt::Debug for JwtKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("JwtKeys(<redacted>)")
    }
}

impl JwtKeys {
    pub fn new(secret: &[u8]) -> Self {
        JwtKeys {
            enc: EncodingKey::from_secret(secret),
            dec: DecodingKey::from_secret(secret),
        }
    }

    pub fn issue(&self, mut claims: UserClaims) -> Result<String, ApiError> {
        let now = chrono::Utc::now().timestamp();
        claims.iat = now;
        claims.exp = now + JWT_TTL.as_secs() as i64;
        encode(&Header::default(), &claims, &self.enc)
            .map_err(|e| ApiError::internal(format!("cannot sign token: {e}")))
    }

    pub fn verify(&self, token: &str) -> Result<UserClaims, ApiError> {
        decode::<UserClaims>(token, &self.dec, &Validation::default())
            .map(|d| d.claims)
            .map_err(|_| ApiError::unauthorized("invalid or expired token"))
    }
}

/// Checked keys by hash, so that hot paths do not hash-and-query on every request.
#[derive(Debug, Default)]
pub struct KeyCache {
    entries: Mutex<HashMap<String, (ApiKey, Instant)>>,
}

impl KeyCache {
    fn get(&self, hash: &str) -> Option<ApiKey> {
        let map = self.entries.lock().ok()?;
        let (key, at) = map.get(hash)?;
        (at.elapsed() < KEY_CACHE_TTL).then(|| key.clone())
    }

    fn put(&self, hash: String, key: ApiKey) {
        if let Ok(mut map) = self.entries.lock() {
            if map.len() > 10_000 {
                map.retain(|_, (_, at)| at.elapsed() < KEY_CACHE_TTL);
            }
            map.insert(hash, (key, Instant::now()));
        }
    }

    /// Forgets a deleted key at once.
    pub fn revoke(&self, key_id: &str) {
        if let Ok(mut map) = self.entries.lock() {
            map.retain(|_, (k, _)| k.id != key_id);
        }
    }
}

/// Token buckets per caller.
#[derive(Debug)]
pub struct RateLimiter {
    /// Sustained requests per second; 0 disables limiting.
    rate: f64,
    burst: f64,
    buckets: Mutex<HashMap<String, (f64, Instant)>>,
}

impl RateLimiter {
    pub fn new(rate: u32, burst: u32) -> Self {
        RateLimiter {
            rate: f64::from(rate),
            burst: f64::from(burst.max(rate)),
            buckets: Mutex::new(HashMap::new()),
        }
    }

    /// Takes one token; on refusal, the seconds until one is available.
    pub fn check(&self, who: &str) -> Result<(), u64> {
        if self.rate <= 0.0 {
            return Ok(());
        }
        let Ok(mut map) = self.buckets.lock() else {
            return Ok(());
        };
        let now = Instant::now();
        let (tokens, last) = map.entry(who.to_string()).or_insert((self.burst, now));
        *tokens = (*tokens + now.duration_since(*last).as_secs_f64() * self.rate).min(self.burst);
        *last = now;
        if *tokens >= 1.0 {
            *tokens -= 1.0;
            Ok(())
        } else {
            Err(((1.0 - *tokens) / self.rate).ceil().max(1.0) as u64)
        }
    }
}

fn header<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers.get(name).and_then(|v| v.to_str().ok())
}

fn bearer(headers: &HeaderMap) -> Option<&str> {
    let v = header(headers, "authorization")?;
    let (scheme, token) = v.split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then_some(token.trim())
}

/// Authenticates a request's headers (API key or user JWT) and applies the rate limit.
pub async fn authenticate(state: &AppState, headers: &HeaderMap) -> Result<Principal, ApiError> {
    let p = if let Some(key) = header(headers, "x-api-key") {
        key_principal(state, key).await?
    } else if let Some(token) = bearer(headers) {
        token_principal(state, token)?
    } else {
        return Err(ApiError::unauthorized(
            "missing credentials: send X-API-Key or Authorization: Bearer <token>",
        ));
    };
    state
        .limiter
        .check(p.rate_key())
        .map_err(ApiError::rate_limited)?;
    Ok(p)
}

pub fn token_principal(state: &AppState, token: &str) -> Result<Principal, ApiError> {
    let claims = state.jwt.verify(token)?;
    Ok(Principal {
        team_id: claims.team_id.clone(),
        actor: Actor::User {
            id: claims.sub.clone(),
        },
        actor_name: Some(claims.email.clone()),
        user: Some(claims),
    })
}

async fn key_principal(state: &AppState, key: &str) -> Result<Principal, ApiError> {
    let key = key.trim();
    let bad = || ApiError::unauthorized("invalid API key");
    if key.is_empty() || key.len() > 128 {
        return Err(bad());
    }
    let hash = wrenn_db::hash_api_key(key);
    let api_key = match state.keys.get(&hash) {
        Some(k) => k,
        None => {
            let k = state.db.authenticate_api_key(key).await.map_err(|e| {
                if e.is_not_found() || matches!(e, wrenn_db::DbError::InvalidInput { .. }) {
                    bad()
                } else {
                    ApiError::from(e)
                }
            })?;
            state.keys.put(hash, k.clone());
            k
        }
    };
    Ok(Principal {
        team_id: api_key.team_id.clone(),
        actor: Actor::ApiKey {
            id: api_key.id.clone(),
        },
        actor_name: Some(api_key.name.clone()),
        user: None,
    })
}

/// Extractor: an API key or a user token.
#[derive(Debug, Clone)]
pub struct Auth(pub Principal);

impl FromRequestParts<Arc<AppState>> for Auth {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &Arc<AppState>,
    ) -> Result<Self, Self::Rejection> {
        authenticate(state, &parts.headers).await.map(Auth)
    }
}

/// Extractor: a user token only.
#[derive(Debug, Clone)]
pub struct UserAuth(pub Principal);

impl FromRequestParts<Arc<AppState>> for UserAuth {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &Arc<AppState>,
    ) -> Result<Self, Self::Rejection> {
        let p = authenticate(state, &parts.headers).await?;
        p.user()?;
        Ok(UserAuth(p))
    }
}
