//! Wrenn's control-plane state: users, teams and memberships, API keys, capsule
//! records, snapshot templates and audit logs, kept in SQLite (the embedded default)
//! or PostgreSQL through one set of queries.
//!
//! What it does not do: it takes no lifecycle decisions (legal status transitions are
//! `wrenn_core`'s), talks to no VMM, and knows nothing of HTTP or JWTs. It stores and
//! finds rows, and it enforces tenancy in the queries themselves: every capsule,
//! template, key and audit function takes the caller's team id and filters by it, so
//! another team's row is [`DbError::NotFound`], never "forbidden". The few functions
//! that cross teams (start-up reconciliation, the inactivity reaper) live in
//! [`system`] and are not for request handlers.
//!
//! Both backends go through sqlx's `Any` driver with runtime-checked queries (no
//! `DATABASE_URL` at build time). That fixes a few storage conventions, the same in
//! both schemas: timestamps are integer microseconds since the epoch (exposed as
//! `chrono::DateTime<Utc>`), JSON is text, and placeholders are `$N`, which SQLite
//! also understands. Migrations are embedded per backend and applied by [`Db::open`].

#![forbid(unsafe_code)]

mod admin;
mod api_keys;
mod audit;
mod bootstrap;
mod builds;
mod capsules;
mod channels;
mod error;
mod hosts;
mod id;
mod migrate;
mod password;
mod row;
pub mod system;
mod teams;
mod template_uploads;
mod templates;
mod time;
mod usage;
mod users;

pub use admin::TeamSummary;
pub use api_keys::{
    canonical_api_key, e2b_spelling, generate_api_key, hash_api_key, validate_api_key, ApiKey,
    CreatedApiKey, API_KEY_PREFIX, E2B_KEY_PREFIX, LAST_USED_GRANULARITY,
};
pub use audit::{
    Actor, AuditCursor, AuditEntry, AuditPage, AuditQuery, AuditResult, AuditScope, NewAuditEntry,
    AUDIT_DEFAULT_LIMIT, AUDIT_MAX_LIMIT,
};
pub use bootstrap::{
    ensure_bootstrap, ensure_bootstrap_admin_password, BOOTSTRAP_ADMIN_EMAIL, BOOTSTRAP_TEAM_NAME,
};
pub use builds::{Build, BuildEnd, BuildFile, BuildLog, BuildStatus, LogStream, NewBuild};
pub use capsules::{Capsule, NewCapsule, TeamUsage, DEFAULT_DISK_MB};
pub use channels::{Attempt, Channel, ChannelUpdate, Delivery, DeliveryStatus, NewChannel};
pub use error::DbError;
pub use hosts::{
    BadHostToken, BadRefreshToken, Host, HostSpecs, HostStatus, JoinToken, NewHost,
    HOST_REFRESH_TTL, HOST_TOKEN_TTL, LOCAL_HOST,
};
pub use id::{new_id, prefix};
pub use teams::{
    CreatedInvitation, Invitation, Member, MemberError, MemberRule, Membership, Role, Team,
    TeamWithRole, INVITATION_TOKEN_PREFIX,
};
pub use template_uploads::BuildRequest;
pub use templates::{NewTemplate, Template, TemplateKind};
pub use time::{now, Timestamp};
pub use usage::{slot_of, DayUsage, Load, Sample, SAMPLE_SECS};
pub use users::User;

use sqlx::any::AnyPoolOptions;
use sqlx::AnyPool;
use sqlx::Executor;
use std::time::Duration;

/// Which database a [`Db`] talks to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

/// A handle to the state database: a connection pool, cheap to clone.
#[derive(Clone, Debug)]
pub struct Db {
    pool: AnyPool,
    backend: Backend,
}

impl Db {
    /// Opens `url` and applies pending migrations.
    ///
    /// `sqlite://<path>?mode=rwc` (see [`Db::sqlite_url`]) creates the file if needed and
    /// runs it in WAL mode with foreign keys on; `postgres://…` needs an existing database.
    pub async fn open(url: &str) -> Result<Db, DbError> {
        let backend = if url.starts_with("sqlite:") {
            Backend::Sqlite
        } else if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            Backend::Postgres
        } else {
            return Err(DbError::InvalidInput {
                field: "database url",
                reason: "expected sqlite://… or postgres://…".into(),
            });
        };
        sqlx::any::install_default_drivers();
        let mut options = AnyPoolOptions::new().acquire_timeout(Duration::from_secs(10));
        if backend == Backend::Sqlite {
            // WAL lets readers run beside the single writer; `synchronous = NORMAL` is
            // durable across process crashes (only power loss can drop the last commits).
            // sqlx sets a 5 s busy timeout; foreign keys are off by default in SQLite.
            options = options.max_connections(8).after_connect(|conn, _meta| {
                Box::pin(async move {
                    conn.execute("PRAGMA journal_mode = WAL").await?;
                    conn.execute("PRAGMA synchronous = NORMAL").await?;
                    conn.execute("PRAGMA foreign_keys = ON").await?;
                    Ok(())
                })
            });
        }
        let pool = options
            .connect(url)
            .await
            .map_err(|e| DbError::backend("connect", e))?;
        let db = Db { pool, backend };
        db.migrate().await?;
        Ok(db)
    }

    /// The URL that [`Db::open`] takes for an SQLite file at `path` (created if missing).
    pub fn sqlite_url(path: &std::path::Path) -> String {
        format!("sqlite://{}?mode=rwc", path.display())
    }

    /// Applies the embedded migrations that are not applied yet. Idempotent.
    pub async fn migrate(&self) -> Result<(), DbError> {
        migrate::run(self).await
    }

    pub fn backend(&self) -> Backend {
        self.backend
    }

    /// Waits for connections to be returned and closes the pool.
    pub async fn close(&self) {
        self.pool.close().await;
    }

    pub(crate) fn pool(&self) -> &AnyPool {
        &self.pool
    }
}
