//! What every handler shares.

use crate::agent::HostAgent;
use crate::auth::{JwtKeys, KeyCache, Principal, RateLimiter};
use crate::metrics::ServerMetrics;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use wrenn_db::{AuditResult, Db, NewAuditEntry};

/// Server settings (command line and environment).
#[derive(Clone, Debug)]
pub struct ApiConfig {
    /// Domain of `{port}-{capsule}.{domain}` host names (E2B `domain`); `None` = the
    /// Host the request came in on.
    pub domain: Option<String>,
    /// Largest accepted file upload per request, in bytes.
    pub upload_limit: u64,
    /// Requests per second per key (0 = unlimited) and burst.
    pub rate_limit: u32,
    pub rate_burst: u32,
    /// Positive inactivity TTLs below this are raised to it (Wrenn API).
    pub min_idle_timeout: u32,
    /// E2B sandbox timeout when the request gives none.
    pub e2b_default_timeout: u32,
    /// How often the inactivity reaper looks.
    pub reaper_period: Duration,
    /// Allow `POST /v1/auth/signup`.
    pub open_signup: bool,
}

impl Default for ApiConfig {
    fn default() -> Self {
        ApiConfig {
            domain: None,
            upload_limit: 100 * 1024 * 1024,
            rate_limit: 200,
            rate_burst: 400,
            min_idle_timeout: 60,
            e2b_default_timeout: 300,
            reaper_period: Duration::from_secs(2),
            open_signup: true,
        }
    }
}

#[derive(Debug)]
pub struct AppState {
    pub db: Db,
    pub agent: Arc<dyn HostAgent>,
    pub config: ApiConfig,
    pub jwt: JwtKeys,
    pub keys: KeyCache,
    pub limiter: RateLimiter,
    pub metrics: ServerMetrics,
    pub activity: Activity,
    pub idempotency: Idempotency,
    /// Pooled client of the proxy into capsules.
    pub proxy: crate::proxy::ProxyClient,
}

impl AppState {
    pub fn new(db: Db, agent: Arc<dyn HostAgent>, config: ApiConfig, jwt_secret: &[u8]) -> Self {
        AppState {
            limiter: RateLimiter::new(config.rate_limit, config.rate_burst),
            db,
            agent,
            config,
            jwt: JwtKeys::new(jwt_secret),
            keys: KeyCache::default(),
            metrics: ServerMetrics::new(),
            activity: Activity::default(),
            idempotency: Idempotency::default(),
            proxy: crate::proxy::client(),
        }
    }

    /// Writes an audit row; a failure to write it is logged, never fatal to the action.
    pub async fn audit(
        &self,
        who: &Principal,
        action: &str,
        resource_type: &str,
        resource_id: Option<&str>,
        ok: bool,
        metadata: Option<serde_json::Value>,
    ) {
        self.audit_team(
            &who.team_id,
            who.actor.clone(),
            who.actor_name.clone(),
            action,
            resource_type,
            resource_id,
            ok,
            metadata,
        )
        .await
    }

    #[allow(clippy::too_many_arguments)]
    pub async fn audit_team(
        &self,
        team_id: &str,
        actor: wrenn_db::Actor,
        actor_name: Option<String>,
        action: &str,
        resource_type: &str,
        resource_id: Option<&str>,
        ok: bool,
        metadata: Option<serde_json::Value>,
    ) {
        let entry = NewAuditEntry {
            actor,
            actor_name,
            action: action.to_string(),
            resource_type: resource_type.to_string(),
            resource_id: resource_id.map(str::to_string),
            result: if ok {
                AuditResult::Success
            } else {
                AuditResult::Failure
            },
            metadata,
            created_at: None,
        };
        if let Err(e) = self.db.insert_audit(team_id, entry).await {
            tracing::error!(error = %wrenn_core::manager::error_chain(&e), action, "audit row not written");
        }
    }
}

/// Capsule activity (exec, files, ping, proxied traffic) resets the inactivity timer;
/// the database is written at most once a second per capsule.
#[derive(Debug, Default)]
pub struct Activity {
    last_write: Mutex<HashMap<String, Instant>>,
}

impl Activity {
    pub async fn touch(&self, db: &Db, team_id: &str, capsule_id: &str) {
        let due = match self.last_write.lock() {
            Ok(mut m) => {
                let now = Instant::now();
                match m.get(capsule_id) {
                    Some(t) if now.duration_since(*t) < Duration::from_secs(1) => false,
                    _ => {
                        m.insert(capsule_id.to_string(), now);
                        true
                    }
                }
            }
            Err(_) => true,
        };
        if due {
            if let Err(e) = db.touch_capsule(team_id, capsule_id).await {
                tracing::debug!(capsule = capsule_id, error = %e, "activity not recorded");
            }
        }
    }

    pub fn forget(&self, capsule_id: &str) {
        if let Ok(mut m) = self.last_write.lock() {
            m.remove(capsule_id);
        }
    }
}

/// Retried creates with the same `Idempotency-Key` get the first one's capsule.
#[derive(Debug, Default)]
pub struct Idempotency {
    seen: Mutex<HashMap<(String, String), (String, Instant)>>,
    /// Serialises creates that carry a key, so a retry waits for the first attempt.
    pub gate: tokio::sync::Mutex<()>,
}

const IDEMPOTENCY_TTL: Duration = Duration::from_secs(600);

impl Idempotency {
    pub fn get(&self, team: &str, key: &str) -> Option<String> {
        let m = self.seen.lock().ok()?;
        m.get(&(team.to_string(), key.to_string()))
            .filter(|(_, at)| at.elapsed() < IDEMPOTENCY_TTL)
            .map(|(id, _)| id.clone())
    }

    pub fn put(&self, team: &str, key: &str, capsule: &str) {
        if let Ok(mut m) = self.seen.lock() {
            m.retain(|_, (_, at)| at.elapsed() < IDEMPOTENCY_TTL);
            m.insert(
                (team.to_string(), key.to_string()),
                (capsule.to_string(), Instant::now()),
            );
        }
    }
}
