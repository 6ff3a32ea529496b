//! Who is calling: API keys (`X-API-Key`, cached briefly after a database check),
//! user JWTs (`Authorization: Bearer`, whose team membership and role are checked
//! against the database, cached briefly), and the per-caller rate limit; and the
//! throttling of sign-up and login (per client address and per account, before any
//! password is hashed, with a bound on concurrent hashes).

use crate::error::ApiError;
use crate::state::AppState;
use axum::extract::{ConnectInfo, FromRequestParts};
use axum::http::request::Parts;
use axum::http::{HeaderMap, StatusCode};
use jsonwebtoken::{decode, encode, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, TryAcquireError};
use wrenn_db::{Actor, ApiKey, Db, DbError, Role};

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

    /// Whether `token` was signed with this server's key, expired or not (the proxy
    /// strips such tokens from what it forwards into capsules).
    pub fn signed_by_us(&self, token: &str) -> bool {
        let mut v = Validation::default();
        v.validate_exp = false;
        v.required_spec_claims.clear();
        decode::<serde_json::Value>(token, &self.dec, &v).is_ok()
    }

    pub fn verify(&self, token: &str) -> Result<UserClaims, ApiError> {
        decode::<UserClaims>(token, &self.dec, &Validation::default())
            .map(|d| d.claims)
            .map_err(|_| ApiError::unauthorized("invalid or expired token"))
    }
}

/// Checked keys by hash, so that hot paths do not hash-and-query on every request.
#[derive(Debug)]
pub struct KeyCache {
    entries: moka::sync::Cache<String, ApiKey>,
}

impl Default for KeyCache {
    fn default() -> Self {
        KeyCache {
            entries: moka::sync::Cache::builder()
                .max_capacity(10_000)
                .time_to_live(KEY_CACHE_TTL)
                .build(),
        }
    }
}

impl KeyCache {
    fn get(&self, hash: &str) -> Option<ApiKey> {
        self.entries.get(hash)
    }

    fn put(&self, hash: String, key: ApiKey) {
        self.entries.insert(hash, key);
    }

    fn forget(&self, drop: impl Fn(&ApiKey) -> bool) {
        for (hash, key) in self.entries.iter() {
            if drop(&key) {
                self.entries.invalidate(hash.as_str());
            }
        }
    }

    /// Forgets a deleted key at once.
    pub fn revoke(&self, key_id: &str) {
        self.forget(|k| k.id == key_id);
    }

    /// Forgets a deleted team's keys at once.
    pub fn revoke_team(&self, team_id: &str) {
        self.forget(|k| k.team_id == team_id);
    }
}

/// How long a user token's checked membership (and role) is trusted without asking the
/// database again. Changes made through this server invalidate it at once; this bounds
/// how late a change made elsewhere (another server on the same database) is seen.
pub const MEMBER_CACHE_TTL: Duration = Duration::from_secs(5);
const MEMBER_CACHE_MAX: u64 = 10_000;

/// The current role of each (user, team) pair that user tokens name, from the database.
#[derive(Debug)]
pub struct MemberCache {
    /// (user id, team id) → role.
    roles: crate::cache::ReadThrough<(String, String), Role>,
}

impl Default for MemberCache {
    fn default() -> Self {
        MemberCache {
            roles: crate::cache::ReadThrough::new(MEMBER_CACHE_MAX, MEMBER_CACHE_TTL),
        }
    }
}

impl MemberCache {
    /// The user's current role in the team; `None` if they are not a member (removed,
    /// left, the team or the account deleted). Not-a-member is never cached.
    pub async fn role(
        &self,
        db: &Db,
        team_id: &str,
        user_id: &str,
    ) -> Result<Option<Role>, DbError> {
        let key = (user_id.to_owned(), team_id.to_owned());
        if let Some(role) = self.roles.get(&key) {
            return Ok(Some(role));
        }
        let start = self.roles.begin();
        let role = match db.member_role(team_id, user_id).await {
            Ok(r) => r,
            Err(e) if e.is_not_found() => return Ok(None),
            Err(e) => return Err(e),
        };
        self.roles.put(start, key, role);
        Ok(Some(role))
    }

    fn forget(&self, drop: impl Fn(&str, &str) -> bool) {
        self.roles.invalidate_if(|(user, team), _| drop(user, team));
    }

    /// Call after changing `user_id`'s membership of `team_id` (role, removal, leaving).
    pub fn invalidate(&self, team_id: &str, user_id: &str) {
        self.forget(|u, t| u == user_id && t == team_id);
    }

    /// Call after deleting a team.
    pub fn invalidate_team(&self, team_id: &str) {
        self.forget(|_, t| t == team_id);
    }

    /// Call after deleting (or disabling) a user.
    pub fn invalidate_user(&self, user_id: &str) {
        self.forget(|u, _| u == user_id);
    }
}

/// Request rate per caller: governor's keyed GCRA (a token bucket of `burst`
/// refilled at `rate` a second). Callers idle long enough to be back at a full
/// bucket are evicted every [`EVICT_EVERY`] checks, so memory follows the active
/// callers, not every caller ever seen.
pub struct RateLimiter {
    /// `None`: no limit.
    limiter: Option<governor::DefaultKeyedRateLimiter<String>>,
    checks: AtomicU64,
}

/// Checks between two evictions of idle callers.
const EVICT_EVERY: u64 = 4096;

impl std::fmt::Debug for RateLimiter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RateLimiter")
            .field("enabled", &self.limiter.is_some())
            .field("tracked", &self.tracked())
            .finish()
    }
}

impl RateLimiter {
    /// `rate` requests a second sustained (0: unlimited), bursts of `burst`.
    pub fn new(rate: u32, burst: u32) -> Self {
        let limiter = std::num::NonZeroU32::new(rate).map(|r| {
            let burst = std::num::NonZeroU32::new(burst.max(rate)).unwrap_or(r);
            governor::RateLimiter::keyed(governor::Quota::per_second(r).allow_burst(burst))
        });
        RateLimiter {
            limiter,
            checks: AtomicU64::new(0),
        }
    }

    /// Takes one request; on refusal, the seconds until one is allowed.
    pub fn check(&self, who: &str) -> Result<(), u64> {
        use governor::clock::{Clock, DefaultClock};
        let Some(limiter) = &self.limiter else {
            return Ok(());
        };
        if self.checks.fetch_add(1, Ordering::Relaxed) % EVICT_EVERY == EVICT_EVERY - 1 {
            limiter.retain_recent();
            limiter.shrink_to_fit();
        }
        limiter.check_key(&who.to_owned()).map_err(|not_until| {
            let wait = not_until.wait_time_from(DefaultClock::default().now());
            wait.as_secs_f64().ceil().max(1.0) as u64
        })
    }

    /// Callers whose state is kept now.
    pub fn tracked(&self) -> usize {
        self.limiter.as_ref().map_or(0, |l| l.len())
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
        token_principal(state, token).await?
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

/// A user token's caller. Past the signature and expiry, the membership the token names
/// is checked against the database (cached briefly, see [`MemberCache`]): a removed
/// member's token stops working, and the role that authorises is the current one, not
/// the one the token was issued with.
pub async fn token_principal(state: &AppState, token: &str) -> Result<Principal, ApiError> {
    let mut claims = state.jwt.verify(token)?;
    let role = match state
        .members
        .role(&state.db, &claims.team_id, &claims.sub)
        .await?
    {
        Some(role) => role,
        None if state
            .db
            .get_user(&claims.sub)
            .await
            .is_ok_and(|u| u.disabled) =>
        {
            return Err(ApiError::unauthorized(
                "this token's account is disabled (by a platform admin)",
            ))
        }
        None => {
            return Err(ApiError::unauthorized(
                "this token's team membership has ended (removed from the team, or the team \
                 or the account deleted); log in again",
            ))
        }
    };
    claims.role = role.as_str().to_string();
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

/// The client's address as the listener saw it (axum's `ConnectInfo`, which `wrenn serve`
/// provides), or, when that is one of the configured trusted reverse proxies, the last
/// address of `X-Forwarded-For` (the one the proxy added). `None` without `ConnectInfo`
/// (in-process callers, tests): those share one bucket.
#[derive(Clone, Copy, Debug)]
pub struct ClientIp(pub Option<IpAddr>);

impl FromRequestParts<Arc<AppState>> for ClientIp {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &Arc<AppState>,
    ) -> Result<Self, Self::Rejection> {
        let peer = parts
            .extensions
            .get::<ConnectInfo<SocketAddr>>()
            .map(|c| c.0.ip());
        Ok(ClientIp(match peer {
            Some(p) if state.config.trusted_proxies.contains(&p) => {
                forwarded_for(&parts.headers).or(Some(p))
            }
            other => other,
        }))
    }
}

/// The last address in the last `X-Forwarded-For` header.
fn forwarded_for(headers: &HeaderMap) -> Option<IpAddr> {
    let last = headers.get_all("x-forwarded-for").iter().next_back()?;
    last.to_str().ok()?.rsplit(',').next()?.trim().parse().ok()
}

impl ClientIp {
    /// The throttling bucket: an IPv4 address, or the /64 of an IPv6 one (a single
    /// host commonly has a whole /64 to pick addresses from).
    fn bucket(self) -> String {
        match self.0 {
            None => "unknown".into(),
            Some(IpAddr::V4(a)) => a.to_string(),
            Some(IpAddr::V6(a)) => match a.to_ipv4_mapped() {
                Some(v4) => v4.to_string(),
                None => {
                    let s = a.segments();
                    format!("{:x}:{:x}:{:x}:{:x}::/64", s[0], s[1], s[2], s[3])
                }
            },
        }
    }
}

/// Most keys a [`Buckets`] tracks: past it, buckets that have refilled are forgotten, and
/// if that is not enough new keys are refused (a flood of distinct keys cannot grow it).
const BUCKETS_MAX: usize = 100_000;

/// Token buckets per key (a client address, an account), `per_minute` refilled
/// continuously up to a burst of as many.
#[derive(Debug)]
struct Buckets {
    /// 0 = unlimited.
    per_minute: f64,
    map: Mutex<HashMap<String, (f64, Instant)>>,
}

impl Buckets {
    fn new(per_minute: u32) -> Self {
        Buckets {
            per_minute: f64::from(per_minute),
            map: Mutex::new(HashMap::new()),
        }
    }

    /// Takes a token for `key`; on refusal, the seconds until one is available.
    fn take(&self, key: &str) -> Result<(), u64> {
        if self.per_minute <= 0.0 {
            return Ok(());
        }
        let (burst, rate) = (self.per_minute, self.per_minute / 60.0);
        let Ok(mut map) = self.map.lock() else {
            return Err(1);
        };
        let now = Instant::now();
        if map.len() >= BUCKETS_MAX && !map.contains_key(key) {
            map.retain(|_, (tokens, last)| {
                *tokens + now.duration_since(*last).as_secs_f64() * rate < burst
            });
            if map.len() >= BUCKETS_MAX {
                return Err(60);
            }
        }
        let (tokens, last) = map.entry(key.to_owned()).or_insert((burst, now));
        *tokens = (*tokens + now.duration_since(*last).as_secs_f64() * rate).min(burst);
        *last = now;
        if *tokens >= 1.0 {
            *tokens -= 1.0;
            Ok(())
        } else {
            Err(((1.0 - *tokens) / rate).ceil().max(1.0) as u64)
        }
    }

    /// Gives back a token that [`Buckets::take`] took.
    fn refund(&self, key: &str) {
        if let Ok(mut map) = self.map.lock() {
            if let Some((tokens, _)) = map.get_mut(key) {
                *tokens = (*tokens + 1.0).min(self.per_minute);
            }
        }
    }
}

fn too_many(retry_after: u64, message: &str) -> ApiError {
    ApiError {
        retry_after: Some(retry_after),
        ..ApiError::new(StatusCode::TOO_MANY_REQUESTS, "rate_limited", message)
    }
}

/// Sign-up and login throttling. Attempts are limited per client address and per
/// account (e-mail) before any password is hashed; an account's token is given back
/// when the attempt succeeds, so that only failures count against it. The hashes
/// themselves (Argon2id: ~19 MiB and tens of milliseconds of CPU each, on the blocking
/// pool) run at most `hash_concurrency` at a time with at most `hash_queue` callers
/// waiting; callers beyond that are answered 503 at once instead of piling up memory.
#[derive(Debug)]
pub struct AuthThrottle {
    per_ip: Buckets,
    per_account: Buckets,
    hashes: Arc<Semaphore>,
    hash_concurrency: usize,
    hash_queue: usize,
    waiting: AtomicUsize,
    running: Arc<AtomicUsize>,
    peak: AtomicUsize,
    admitted: AtomicU64,
}

/// What [`AuthThrottle`] has let through so far.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HashStats {
    /// Callers that got to hash (each hashes once or twice).
    pub admitted: u64,
    /// Most callers hashing at the same time.
    pub peak_concurrent: usize,
    /// Callers hashing now.
    pub running: usize,
    /// Callers waiting for their turn now.
    pub waiting: usize,
}

/// A sign-in attempt that passed the throttle: call [`Attempt::succeeded`] when the
/// password was right, so that it does not count against the account.
#[derive(Debug)]
#[must_use]
pub struct Attempt<'a> {
    throttle: &'a AuthThrottle,
    account: String,
}

impl Attempt<'_> {
    pub fn succeeded(self) {
        self.throttle.per_account.refund(&self.account);
    }
}

/// The right to hash passwords, held while hashing.
#[derive(Debug)]
pub struct HashPermit {
    _permit: OwnedSemaphorePermit,
    running: Arc<AtomicUsize>,
}

impl Drop for HashPermit {
    fn drop(&mut self) {
        self.running.fetch_sub(1, Ordering::SeqCst);
    }
}

/// A place in the hash queue, given up when dropped (served or cancelled).
struct QueueSlot<'a>(&'a AtomicUsize);

impl Drop for QueueSlot<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

impl AuthThrottle {
    /// `ip_per_minute` and `account_per_minute` attempts (0 = unlimited);
    /// `hash_concurrency` hashes at a time (0 = one per CPU), `hash_queue` waiting.
    pub fn new(
        ip_per_minute: u32,
        account_per_minute: u32,
        hash_concurrency: usize,
        hash_queue: usize,
    ) -> Self {
        let hash_concurrency = match hash_concurrency {
            0 => std::thread::available_parallelism().map_or(2, |n| n.get()),
            n => n,
        };
        AuthThrottle {
            per_ip: Buckets::new(ip_per_minute),
            per_account: Buckets::new(account_per_minute),
            hashes: Arc::new(Semaphore::new(hash_concurrency)),
            hash_concurrency,
            hash_queue,
            waiting: AtomicUsize::new(0),
            running: Arc::new(AtomicUsize::new(0)),
            peak: AtomicUsize::new(0),
            admitted: AtomicU64::new(0),
        }
    }

    /// Admits an attempt from `ip` for the account `email`, or refuses it (429 with
    /// Retry-After). Nothing is hashed before this.
    pub fn attempt(&self, ip: ClientIp, email: &str) -> Result<Attempt<'_>, ApiError> {
        self.per_ip.take(&ip.bucket()).map_err(|s| {
            too_many(
                s,
                "too many sign-up or login attempts from this address; retry later",
            )
        })?;
        let account = email.trim().to_lowercase();
        self.per_account.take(&account).map_err(|s| {
            too_many(
                s,
                "too many failed login attempts for this account; retry later",
            )
        })?;
        Ok(Attempt {
            throttle: self,
            account,
        })
    }

    /// Waits for a turn to hash (503 at once when the queue is full).
    pub async fn hash_permit(&self) -> Result<HashPermit, ApiError> {
        let permit = match self.hashes.clone().try_acquire_owned() {
            Ok(p) => p,
            Err(TryAcquireError::Closed) => return Err(ApiError::internal("hash gate closed")),
            Err(TryAcquireError::NoPermits) => {
                let ahead = self.waiting.fetch_add(1, Ordering::SeqCst);
                let _slot = QueueSlot(&self.waiting);
                if ahead >= self.hash_queue {
                    return Err(ApiError {
                        retry_after: Some(1),
                        ..ApiError::new(
                            StatusCode::SERVICE_UNAVAILABLE,
                            "overloaded",
                            "too many password checks in progress; retry shortly",
                        )
                    });
                }
                self.hashes
                    .clone()
                    .acquire_owned()
                    .await
                    .map_err(|_| ApiError::internal("hash gate closed"))?
            }
        };
        let now = self.running.fetch_add(1, Ordering::SeqCst) + 1;
        self.peak.fetch_max(now, Ordering::SeqCst);
        self.admitted.fetch_add(1, Ordering::SeqCst);
        Ok(HashPermit {
            _permit: permit,
            running: self.running.clone(),
        })
    }

    /// How many hashes may run at once.
    pub fn hash_concurrency(&self) -> usize {
        self.hash_concurrency
    }

    pub fn stats(&self) -> HashStats {
        HashStats {
            admitted: self.admitted.load(Ordering::SeqCst),
            peak_concurrent: self.peak.load(Ordering::SeqCst),
            running: self.running.load(Ordering::SeqCst),
            waiting: self.waiting.load(Ordering::SeqCst),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rate_limits_bursts_and_says_when_to_retry() {
        let l = RateLimiter::new(1, 3);
        for _ in 0..3 {
            assert_eq!(l.check("a"), Ok(()));
        }
        assert_eq!(l.check("a"), Err(1));
        // Callers are limited apart.
        assert_eq!(l.check("b"), Ok(()));
        let unlimited = RateLimiter::new(0, 0);
        for _ in 0..1000 {
            assert_eq!(unlimited.check("a"), Ok(()));
        }
        assert_eq!(unlimited.tracked(), 0);
    }

    #[test]
    fn idle_callers_are_evicted() {
        let l = RateLimiter::new(1000, 1);
        for i in 0..4000 {
            assert_eq!(l.check(&format!("old-{i}")), Ok(()));
        }
        assert_eq!(l.tracked(), 4000);
        // A millisecond refills these buckets: they are as good as new.
        std::thread::sleep(Duration::from_millis(20));
        for i in 0..1000 {
            assert_eq!(l.check(&format!("new-{i}")), Ok(()));
        }
        assert!(l.tracked() < 2000, "{} callers kept", l.tracked());
    }
}
