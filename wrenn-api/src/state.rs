//! What every handler shares.

use crate::agent::{HostAgent, HostError};
use crate::auth::{JwtKeys, KeyCache, Principal, RateLimiter};
use crate::metrics::ServerMetrics;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use wrenn_core::guest::{GuestAgent, GuestConnector};
use wrenn_core::host::Endpoint;
use wrenn_core::id::CapsuleId;
use wrenn_db::{AuditResult, Capsule, Db, DbError, NewAuditEntry};

/// Guest agent clients, one per capsule, each with its own connection pool. A client is
/// replaced when the host hands out another endpoint for the capsule (every restore
/// gives its guest a new token, a new network slot may give a new address), so no
/// pooled connection outlives the guest it was opened to.
#[derive(Debug)]
pub struct GuestClients {
    by_capsule: moka::sync::Cache<CapsuleId, (Endpoint, Arc<dyn GuestAgent>)>,
}

impl Default for GuestClients {
    fn default() -> Self {
        GuestClients {
            by_capsule: moka::sync::Cache::builder()
                .max_capacity(100_000)
                .time_to_idle(Duration::from_secs(600))
                .build(),
        }
    }
}

/// Opens connections to ports of one capsule through its host's agent.
#[derive(Debug)]
pub struct CapsuleDial {
    pub agent: Arc<dyn HostAgent>,
    pub id: CapsuleId,
}

impl wrenn_envd::dial::Dial for CapsuleDial {
    fn dial(
        &self,
        uri: &hyper::Uri,
    ) -> futures_util::future::BoxFuture<'static, std::io::Result<wrenn_core::host::GuestStream>>
    {
        let (agent, id, port) = (self.agent.clone(), self.id.clone(), uri.port_u16());
        Box::pin(async move {
            let port = port.ok_or_else(|| {
                std::io::Error::new(std::io::ErrorKind::InvalidInput, "no port in the URI")
            })?;
            agent.open(&id, port).await.map_err(std::io::Error::other)
        })
    }
}

impl GuestClients {
    /// The client of `id`'s guest agent at `ep`, connected through `agent`.
    pub fn client(
        &self,
        id: &CapsuleId,
        ep: Endpoint,
        agent: &Arc<dyn HostAgent>,
    ) -> Arc<dyn GuestAgent> {
        let connect = |ep: &Endpoint| {
            let dial = CapsuleDial {
                agent: agent.clone(),
                id: id.clone(),
            };
            wrenn_envd::client::EnvdConnector::dialing(Arc::new(dial))
                .connect(ep.addr, ep.access_token.clone())
        };
        // Concurrent first requests share one client (and its connections).
        let (known, client) = self
            .by_capsule
            .entry(id.clone())
            .or_insert_with(|| (ep.clone(), connect(&ep)))
            .into_value();
        if known == ep {
            return client;
        }
        let client = connect(&ep);
        self.by_capsule.insert(id.clone(), (ep, client.clone()));
        client
    }

    /// Drops the client of a capsule that is gone or paused.
    pub fn forget(&self, id: &CapsuleId) {
        self.by_capsule.invalidate(id);
    }
}

/// Server settings (command line and environment).
#[derive(Clone, Debug)]
pub struct ApiConfig {
    /// Domain of `{port}-{capsule}.{domain}` host names (E2B `domain`); `None` = the
    /// Host the request came in on.
    pub domain: Option<String>,
    /// Largest accepted file upload per request, in bytes.
    pub upload_limit: u64,
    /// Most output (stdout and stderr together) a synchronous exec collects; a command
    /// printing more is stopped and the request answered 413.
    pub exec_output_limit: u64,
    /// Requests per second per key (0 = unlimited) and burst.
    pub rate_limit: u32,
    pub rate_burst: u32,
    /// Positive inactivity TTLs below this are raised to it (Wrenn API).
    pub min_idle_timeout: u32,
    /// E2B sandbox timeout when the request gives none.
    pub e2b_default_timeout: u32,
    /// How often the inactivity reaper looks.
    pub reaper_period: Duration,
    /// Limits every team is held to.
    pub team_limits: crate::quota::TeamLimits,
    /// Allow `POST /v1/auth/signup` without an invitation (with one it is always
    /// allowed). `wrenn serve` opens it by default only on a loopback listen address.
    pub open_signup: bool,
    /// Sign-up and login attempts per minute per client address (0 = unlimited).
    pub auth_ip_rate: u32,
    /// Failed login (and sign-up) attempts per minute per account (0 = unlimited).
    pub auth_account_rate: u32,
    /// Password hashes at a time (0 = one per CPU).
    pub hash_concurrency: usize,
    /// Callers waiting for a password hash beyond which more are answered 503.
    pub hash_queue: usize,
    /// Reverse proxies whose `X-Forwarded-For` names the client (for sign-in throttling);
    /// anyone else's header is ignored.
    pub trusted_proxies: Vec<std::net::IpAddr>,
    /// Template build workers.
    pub builds: crate::builds::BuildConfig,
    /// Notification channels: where receivers may be, attempts and their spacing.
    pub channels: crate::channels::ChannelConfig,
}

impl Default for ApiConfig {
    fn default() -> Self {
        ApiConfig {
            domain: None,
            upload_limit: 100 * 1024 * 1024,
            exec_output_limit: 16 * 1024 * 1024,
            team_limits: crate::quota::TeamLimits::default(),
            rate_limit: 200,
            rate_burst: 400,
            min_idle_timeout: 60,
            e2b_default_timeout: 300,
            reaper_period: Duration::from_secs(2),
            open_signup: true,
            auth_ip_rate: 20,
            auth_account_rate: 10,
            hash_concurrency: 0,
            hash_queue: 32,
            trusted_proxies: Vec::new(),
            builds: crate::builds::BuildConfig::default(),
            channels: crate::channels::ChannelConfig::default(),
        }
    }
}

#[derive(Debug)]
pub struct AppState {
    pub db: Db,
    /// The host agents this control plane drives; capsule rows name theirs.
    pub hosts: crate::hosts::Hosts,
    /// Guest agent clients by capsule, for the endpoint the host handed out.
    pub(crate) guests: GuestClients,
    pub config: ApiConfig,
    pub jwt: JwtKeys,
    pub keys: KeyCache,
    pub limiter: RateLimiter,
    pub metrics: ServerMetrics,
    pub activity: Activity,
    pub idempotency: Idempotency,
    /// Capsule rows recently read, invalidated by this server's writes.
    pub capsule_cache: CapsuleCache,
    /// Pooled client of the proxy into capsules.
    pub proxy: crate::proxy::ProxyClient,
    /// Where the proxy's connections go.
    pub proxy_routes: crate::proxy::ProxyRoutes,
    /// Registered hosts: the cluster's certificates and how their agents are reached
    /// (set once the database is open).
    pub cluster: std::sync::OnceLock<crate::cluster::Cluster>,
    /// Template copies between hosts in progress (one per template and host).
    pub copy_locks: crate::service::CopyLocks,
    /// What is in flight through the proxy, per capsule: ended on kill and pause.
    pub streams: crate::proxy::LiveStreams,
    /// Auto-resumes in progress, one per capsule.
    pub resumes: crate::service::Resumes,
    /// Per-team limits and the reservations of requests in flight.
    pub quotas: crate::quota::Quotas,
    /// Seals the envd tokens kept in the database.
    pub tokens: crate::secrets::TokenSealer,
    /// Signs the upload URLs of E2B template files.
    pub url_signer: crate::secrets::UrlSigner,
    /// Seals the settings of notification channels kept in the database.
    pub channel_sealer: crate::secrets::ConfigSealer,
    /// Capsules whose timeout action failed, retried later rather than every tick.
    pub reaper_backoff: crate::lifecycle::ReaperBackoff,
    /// Team roles of user tokens, checked against the database (briefly cached).
    pub members: crate::auth::MemberCache,
    /// Sign-up and login throttling and the bound on concurrent password hashes.
    pub auth_throttle: crate::auth::AuthThrottle,
    /// Template build workers.
    pub builders: crate::builds::Builders,
    /// Lifecycle events, to `/v1/events/stream` subscribers.
    pub events: crate::events::EventBus,
}

impl AppState {
    /// A control plane state with no host yet: hosts are added to
    /// [`AppState::hosts`] as they are found.
    pub fn new(
        db: Db,
        monitor: crate::hosts::MonitorConfig,
        config: ApiConfig,
        jwt_secret: &[u8],
    ) -> Self {
        let (proxy, proxy_routes) = crate::proxy::client();
        AppState {
            quotas: crate::quota::Quotas::new(config.team_limits),
            resumes: crate::service::Resumes::default(),
            limiter: RateLimiter::new(config.rate_limit, config.rate_burst),
            members: crate::auth::MemberCache::default(),
            auth_throttle: crate::auth::AuthThrottle::new(
                config.auth_ip_rate,
                config.auth_account_rate,
                config.hash_concurrency,
                config.hash_queue,
            ),
            db,
            hosts: crate::hosts::Hosts::new(monitor),
            guests: GuestClients::default(),
            config,
            jwt: JwtKeys::new(jwt_secret),
            tokens: crate::secrets::TokenSealer::new(jwt_secret),
            url_signer: crate::secrets::UrlSigner::new(jwt_secret),
            channel_sealer: crate::secrets::ConfigSealer::new(jwt_secret),
            keys: KeyCache::default(),
            metrics: ServerMetrics::new(),
            activity: Activity::default(),
            idempotency: Idempotency::default(),
            capsule_cache: CapsuleCache::default(),
            proxy,
            proxy_routes,
            cluster: std::sync::OnceLock::new(),
            copy_locks: Default::default(),
            streams: crate::proxy::LiveStreams::default(),
            reaper_backoff: crate::lifecycle::ReaperBackoff::default(),
            builders: crate::builds::Builders::default(),
            events: crate::events::EventBus::default(),
        }
    }

    /// The host that runs or holds capsule `c`.
    pub fn host_of(&self, c: &Capsule) -> Result<Arc<crate::hosts::HostConn>, HostError> {
        self.hosts.get(&c.host_id)
    }

    /// The agent of the host that runs or holds capsule `c`.
    pub fn agent_of(&self, c: &Capsule) -> Result<Arc<dyn HostAgent>, HostError> {
        Ok(self.host_of(c)?.agent.clone())
    }

    /// A client of the guest agent (envd) of running capsule `c`, at the endpoint its
    /// host gives.
    pub async fn guest(&self, c: &Capsule) -> Result<Arc<dyn GuestAgent>, HostError> {
        let agent = self.agent_of(c)?;
        let ep = agent.envd(&c.id).await?;
        Ok(self.guests.client(&c.id, ep, &agent))
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
        let error = metadata
            .as_ref()
            .and_then(|m| m.get("error"))
            .and_then(serde_json::Value::as_str)
            .map(str::to_string);
        let published = (
            actor.clone(),
            actor_name.clone(),
            resource_id.map(str::to_string),
        );
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
        let (actor, actor_name, resource_id) = published;
        self.events.action(
            team_id,
            &actor,
            actor_name.as_deref(),
            action,
            resource_type,
            resource_id.as_deref(),
            ok,
            error.as_deref(),
        );
    }

    /// Records an event of the platform (hosts and their credentials), by the system
    /// itself; also logged under the `wrenn::audit` target.
    pub async fn audit_platform(
        &self,
        action: &str,
        resource_id: Option<&str>,
        ok: bool,
        metadata: serde_json::Value,
    ) {
        if ok {
            tracing::info!(target: "wrenn::audit", action, host = resource_id, %metadata);
        } else {
            tracing::warn!(target: "wrenn::audit", action, host = resource_id, %metadata, "refused");
        }
        let entry = NewAuditEntry {
            actor: wrenn_db::Actor::System,
            actor_name: None,
            action: action.to_string(),
            resource_type: "host".to_string(),
            resource_id: resource_id.map(str::to_string),
            result: if ok {
                AuditResult::Success
            } else {
                AuditResult::Failure
            },
            metadata: Some(metadata),
            created_at: None,
        };
        if let Err(e) = self.db.insert_platform_audit(entry).await {
            tracing::error!(error = %wrenn_core::manager::error_chain(&e), action, "audit row not written");
        }
    }
}

/// Capsule activity (exec, files, ping, proxied traffic) resets the inactivity timer;
/// the database is written at most once a second per capsule.
#[derive(Debug)]
pub struct Activity {
    /// Capsules whose row was written in the last second.
    written: moka::sync::Cache<String, ()>,
}

impl Default for Activity {
    fn default() -> Self {
        Activity {
            written: moka::sync::Cache::builder()
                .max_capacity(100_000)
                .time_to_live(Duration::from_secs(1))
                .build(),
        }
    }
}

impl Activity {
    /// Returns whether the row was written (at most once a second per capsule).
    pub async fn touch(&self, db: &Db, team_id: &str, capsule_id: &str) -> bool {
        let due = self
            .written
            .entry_by_ref(capsule_id)
            .or_insert(())
            .is_fresh();
        if due {
            if let Err(e) = db.touch_capsule(team_id, capsule_id).await {
                tracing::debug!(capsule = capsule_id, error = %e, "activity not recorded");
            }
        }
        due
    }

    pub fn forget(&self, capsule_id: &str) {
        self.written.invalidate(capsule_id);
    }
}

/// How long a cached capsule row is used: the bound on how late this server sees a
/// change it did not make itself (another server on the same database).
pub const CAPSULE_CACHE_TTL: Duration = Duration::from_secs(2);
const CAPSULE_CACHE_MAX: u64 = 10_000;

/// Capsule rows as last read, so that polling a capsule (`GET /v1/capsules/{id}`, the
/// status check of every exec or proxied request) does not query the database each
/// time. Every write to a capsule row through this server is followed by
/// [`CapsuleCache::invalidate`], so a read after a write sees it.
#[derive(Debug)]
pub struct CapsuleCache {
    rows: crate::cache::ReadThrough<String, Capsule>,
}

impl Default for CapsuleCache {
    fn default() -> Self {
        CapsuleCache {
            rows: crate::cache::ReadThrough::new(CAPSULE_CACHE_MAX, CAPSULE_CACHE_TTL),
        }
    }
}

impl CapsuleCache {
    /// Capsule `id` of team `team` (of any team with `None`, for the proxy): cached,
    /// else from the database.
    pub async fn get(&self, db: &Db, team: Option<&str>, id: &str) -> Result<Capsule, DbError> {
        if let Some(row) = self.rows.get(&id.to_string()) {
            return match team {
                Some(t) if t != row.team_id => Err(DbError::NotFound { what: "capsule" }),
                _ => Ok(row),
            };
        }
        let start = self.rows.begin();
        let row = fetch(db, team, id).await?;
        self.rows.put(start, id.to_string(), row.clone());
        Ok(row)
    }

    /// Call after every write to capsule `id`'s row.
    pub fn invalidate(&self, id: &str) {
        self.rows.invalidate(&id.to_string());
    }

    /// Call after writes that may touch any capsule row (a team deleted).
    pub fn clear(&self) {
        self.rows.clear();
    }
}

async fn fetch(db: &Db, team: Option<&str>, id: &str) -> Result<Capsule, DbError> {
    match team {
        Some(t) => db.get_capsule(t, id).await,
        None => db.system_get_capsule(id).await,
    }
}

/// Retried creates with the same `Idempotency-Key` get the first one's capsule.
#[derive(Debug)]
pub struct Idempotency {
    seen: moka::sync::Cache<TeamKey, String>,
    /// One lock per key in use, so a retry waits for the first attempt while creates
    /// with other keys go ahead.
    gates: Mutex<HashMap<TeamKey, Arc<tokio::sync::Mutex<()>>>>,
}

/// (team id, idempotency key).
type TeamKey = (String, String);

const IDEMPOTENCY_TTL: Duration = Duration::from_secs(600);

impl Default for Idempotency {
    fn default() -> Self {
        Idempotency {
            seen: moka::sync::Cache::builder()
                .max_capacity(100_000)
                .time_to_live(IDEMPOTENCY_TTL)
                .build(),
            gates: Mutex::default(),
        }
    }
}

impl Idempotency {
    /// Holds off other creates with the same team and key until the guard drops.
    pub async fn guard(&self, team: &str, key: &str) -> tokio::sync::OwnedMutexGuard<()> {
        let gate = match self.gates.lock() {
            Ok(mut m) => {
                // Locks nobody holds or waits for are not needed any more.
                m.retain(|_, g| Arc::strong_count(g) > 1);
                m.entry((team.to_string(), key.to_string()))
                    .or_default()
                    .clone()
            }
            Err(_) => Arc::default(),
        };
        gate.lock_owned().await
    }

    pub fn get(&self, team: &str, key: &str) -> Option<String> {
        self.seen.get(&(team.to_string(), key.to_string()))
    }

    pub fn put(&self, team: &str, key: &str, capsule: &str) {
        self.seen
            .insert((team.to_string(), key.to_string()), capsule.to_string());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use wrenn_core::id::CapsuleId;
    use wrenn_core::status::CapsuleStatus;

    #[tokio::test]
    async fn capsule_cache_serves_rows_until_invalidated() {
        let dir = tempfile::tempdir().expect("temp dir");
        let db = Db::open(&Db::sqlite_url(&dir.path().join("t.db")))
            .await
            .expect("db");
        let key = wrenn_db::ensure_bootstrap(&db, None)
            .await
            .expect("bootstrap")
            .expect("key");
        let team_id = db.authenticate_api_key(&key).await.expect("key").team_id;
        let team_id = team_id.as_str();
        let team = Some(team_id);
        let id = CapsuleId::random();
        let new = wrenn_db::NewCapsule {
            id: id.clone(),
            status: CapsuleStatus::Running,
            template: "minimal".into(),
            vcpus: 1,
            memory_mb: 256,
            timeout_sec: 0,
            metadata: Default::default(),
            envd_access_token: None,
            pause_on_timeout: true,
            disk_mb: 0,
            deadline: false,
            timeout_pause_memory: true,
            auto_resume: false,
            network: Default::default(),
            public_traffic: true,
            traffic_access_token: None,
            host_id: wrenn_core::scheduler::HostId(wrenn_db::LOCAL_HOST.into()),
        };
        db.insert_capsule(team_id, new).await.expect("row");
        let cache = CapsuleCache::default();
        let id = id.as_str();
        let status = |r: Result<Capsule, DbError>| r.expect("row").status;
        assert_eq!(
            status(cache.get(&db, team, id).await),
            CapsuleStatus::Running
        );

        // Cached: another team still cannot see it; the proxy's lookup can.
        let other = cache.get(&db, Some("team-other"), id).await;
        assert!(other.expect_err("other team").is_not_found());
        assert_eq!(
            status(cache.get(&db, None, id).await),
            CapsuleStatus::Running
        );

        // A write is seen once the writer invalidates, as every server write does
        // (and not before: the row is served from the cache).
        db.set_capsule_status(team_id, id, CapsuleStatus::Paused)
            .await
            .expect("write");
        assert_eq!(
            status(cache.get(&db, team, id).await),
            CapsuleStatus::Running
        );
        cache.invalidate(id);
        assert_eq!(
            status(cache.get(&db, team, id).await),
            CapsuleStatus::Paused
        );
        db.set_capsule_status(team_id, id, CapsuleStatus::Running)
            .await
            .expect("write");
        cache.clear();
        assert_eq!(
            status(cache.get(&db, None, id).await),
            CapsuleStatus::Running
        );

        // Missing rows are not cached.
        let missing = CapsuleId::random();
        let r = cache.get(&db, team, missing.as_str()).await;
        assert!(r.expect_err("missing").is_not_found());
        db.close().await;
    }

    #[test]
    fn idempotency_keys_are_per_team() {
        let idem = Idempotency::default();
        assert_eq!(idem.get("t1", "k"), None);
        idem.put("t1", "k", "cl-1");
        assert_eq!(idem.get("t1", "k").as_deref(), Some("cl-1"));
        assert_eq!(idem.get("t2", "k"), None);
    }
}
