//! Hosts that run capsules (the `hosts` table). `wrenn serve` records its in-process host
//! as [`LOCAL_HOST`]; capsule and snapshot rows name the host that holds them.

use crate::error::Ctx;
use crate::row::{decode, json_map, opt_int, opt_text, opt_ts, text, ts, R};
use crate::time::{now, to_db, Timestamp};
use crate::{Db, DbError};
use serde_json::{Map, Value};
use sqlx::any::AnyRow;
use wrenn_core::scheduler::HostId;

pub use wrenn_core::scheduler::LOCAL_HOST;

/// Where a host is in its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum HostStatus {
    /// Created, not registered yet.
    Pending,
    Online,
    Offline,
    /// Takes no new capsules.
    Draining,
    /// Silent past the heartbeat timeout.
    Unreachable,
}

impl HostStatus {
    pub const ALL: [HostStatus; 5] = [
        HostStatus::Pending,
        HostStatus::Online,
        HostStatus::Offline,
        HostStatus::Draining,
        HostStatus::Unreachable,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            HostStatus::Pending => "pending",
            HostStatus::Online => "online",
            HostStatus::Offline => "offline",
            HostStatus::Draining => "draining",
            HostStatus::Unreachable => "unreachable",
        }
    }
}

/// A host's row.
#[derive(Clone, Debug, PartialEq)]
pub struct Host {
    pub id: HostId,
    /// Owned by a team (bring your own compute): only that team's capsules run there.
    pub team_id: Option<String>,
    /// The agent's endpoint; `None` for the in-process host.
    pub address: Option<String>,
    pub arch: Option<String>,
    pub cpu_cores: Option<u32>,
    pub memory_mb: Option<u64>,
    pub disk_gb: Option<u64>,
    pub status: HostStatus,
    pub last_heartbeat_at: Option<Timestamp>,
    pub metadata: Map<String, Value>,
    pub provider: Option<String>,
    pub availability_zone: Option<String>,
    /// The admin who created it (hosts found otherwise have none).
    pub created_by: Option<String>,
    /// When the certificate the host last received expires.
    pub cert_expires_at: Option<Timestamp>,
    pub created_at: Timestamp,
    pub updated_at: Timestamp,
}

/// A host an admin creates (to be registered by its agent).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NewHost {
    /// Owning team: a team-owned (BYOC) host takes only that team's capsules.
    pub team_id: Option<String>,
    pub provider: Option<String>,
    pub availability_zone: Option<String>,
    pub created_by: Option<String>,
}

/// How long a host registration token is valid.
pub const HOST_TOKEN_TTL: std::time::Duration = std::time::Duration::from_secs(3600);

/// How long a host's refresh token works (each use replaces it).
pub const HOST_REFRESH_TTL: std::time::Duration = std::time::Duration::from_secs(60 * 86_400);

/// A refresh token that does not refresh: unknown, replaced, expired, or its host
/// was deleted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the host refresh token is unknown, replaced or expired")]
pub struct BadRefreshToken;

/// A join token (its value is shown once, at creation).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct JoinToken {
    pub id: String,
    pub created_by: Option<String>,
    pub created_at: Timestamp,
    pub expires_at: Timestamp,
    pub max_hosts: Option<u32>,
    /// Hosts registered with it.
    pub used: u32,
}

const JOIN_COLS: &str = "id, created_by, created_at, expires_at, max_hosts, used";

fn join_token(row: &AnyRow) -> R<JoinToken> {
    let small = |col: &str, v: i64| u32::try_from(v).map_err(|e| decode(col, e));
    Ok(JoinToken {
        id: text(row, "id")?,
        created_by: opt_text(row, "created_by")?,
        created_at: ts(row, "created_at")?,
        expires_at: ts(row, "expires_at")?,
        max_hosts: opt_int(row, "max_hosts")?
            .map(|v| small("max_hosts", v))
            .transpose()?,
        used: small(
            "used",
            opt_int(row, "used")?.ok_or_else(|| decode("used", "missing"))?,
        )?,
    })
}

/// A registration token that does not register: unknown, already used or expired.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the host registration token is unknown, used or expired")]
pub struct BadHostToken;

fn hash_host_token(token: &str) -> String {
    use sha2::{Digest, Sha256};
    crate::id::hex(&Sha256::digest(token.trim().as_bytes()))
}

/// What a host reports of itself.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct HostSpecs {
    pub arch: String,
    pub cpu_cores: u32,
    pub memory_mb: u64,
    pub disk_gb: u64,
}

const COLS: &str = "id, team_id, address, arch, cpu_cores, memory_mb, disk_gb, status, \
                    last_heartbeat_at, metadata, provider, availability_zone, created_by, \
                    cert_expires_at, created_at, updated_at";

fn opt_u64(row: &AnyRow, col: &str) -> R<Option<u64>> {
    opt_int(row, col)?
        .map(|v| u64::try_from(v).map_err(|e| decode(col, e)))
        .transpose()
}

fn host(row: &AnyRow) -> R<Host> {
    let status = text(row, "status")?;
    Ok(Host {
        id: HostId(text(row, "id")?),
        team_id: opt_text(row, "team_id")?,
        address: opt_text(row, "address")?,
        arch: opt_text(row, "arch")?,
        cpu_cores: opt_u64(row, "cpu_cores")?
            .map(|v| u32::try_from(v).map_err(|e| decode("cpu_cores", e)))
            .transpose()?,
        memory_mb: opt_u64(row, "memory_mb")?,
        disk_gb: opt_u64(row, "disk_gb")?,
        status: HostStatus::ALL
            .into_iter()
            .find(|s| s.as_str() == status)
            .ok_or_else(|| decode("status", format!("unknown host status {status:?}")))?,
        last_heartbeat_at: opt_ts(row, "last_heartbeat_at")?,
        metadata: json_map(row, "metadata")?,
        provider: opt_text(row, "provider")?,
        availability_zone: opt_text(row, "availability_zone")?,
        created_by: opt_text(row, "created_by")?,
        cert_expires_at: opt_ts(row, "cert_expires_at")?,
        created_at: ts(row, "created_at")?,
        updated_at: ts(row, "updated_at")?,
    })
}

fn as_i64(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

impl Db {
    /// Records host `id` as online and heard from now (created if new), with its
    /// agent's `address` and `specs` when known (known ones are kept otherwise): the
    /// in-process host at every start of `wrenn serve`, each host agent whenever its
    /// report arrives.
    pub async fn system_host_online(
        &self,
        id: &HostId,
        address: Option<&str>,
        specs: Option<&HostSpecs>,
    ) -> Result<Host, DbError> {
        let t = to_db(now());
        let row = sqlx::query(&format!(
            "INSERT INTO hosts (id, arch, cpu_cores, memory_mb, disk_gb, status, \
             last_heartbeat_at, created_at, updated_at, address) \
             VALUES ($1, $2, $3, $4, $5, 'online', $6, $6, $6, $7) \
             ON CONFLICT (id) DO UPDATE SET arch = COALESCE(excluded.arch, hosts.arch), \
             cpu_cores = COALESCE(excluded.cpu_cores, hosts.cpu_cores), \
             memory_mb = COALESCE(excluded.memory_mb, hosts.memory_mb), \
             disk_gb = COALESCE(excluded.disk_gb, hosts.disk_gb), \
             address = COALESCE(excluded.address, hosts.address), \
             status = CASE WHEN hosts.status = 'draining' THEN 'draining' ELSE 'online' END, \
             last_heartbeat_at = excluded.last_heartbeat_at, updated_at = excluded.updated_at \
             RETURNING {COLS}"
        ))
        .bind(id.0.as_str())
        .bind(specs.map(|s| s.arch.clone()))
        .bind(specs.map(|s| i64::from(s.cpu_cores)))
        .bind(specs.map(|s| as_i64(s.memory_mb)))
        .bind(specs.map(|s| as_i64(s.disk_gb)))
        .bind(t)
        .bind(address)
        .fetch_one(self.pool())
        .await
        .map_err(|e| Ctx::op("record host").err(e))?;
        host(&row).map_err(|e| DbError::backend("record host", e))
    }

    /// Marks host `id` unreachable (silent past the monitor's timeout); a draining host
    /// stays draining. Returns whether a row changed.
    pub async fn system_host_unreachable(&self, id: &HostId) -> Result<bool, DbError> {
        let r = sqlx::query(
            "UPDATE hosts SET status = 'unreachable', updated_at = $2 \
             WHERE id = $1 AND status IN ('online', 'pending', 'offline')",
        )
        .bind(id.0.as_str())
        .bind(to_db(now()))
        .execute(self.pool())
        .await
        .map_err(|e| Ctx::op("mark host unreachable").err(e))?;
        Ok(r.rows_affected() > 0)
    }

    /// One host.
    pub async fn system_host(&self, id: &str) -> Result<Host, DbError> {
        let row = sqlx::query(&format!("SELECT {COLS} FROM hosts WHERE id = $1"))
            .bind(id)
            .fetch_optional(self.pool())
            .await
            .map_err(|e| Ctx::op("get host").err(e))?
            .ok_or(DbError::NotFound { what: "host" })?;
        host(&row).map_err(|e| DbError::backend("get host", e))
    }

    /// The ids of the live (not stopped) capsules a host runs or holds.
    pub async fn system_host_capsules(&self, id: &str) -> Result<Vec<String>, DbError> {
        let rows = sqlx::query(
            "SELECT id FROM capsules WHERE host_id = $1 AND status <> 'stopped' ORDER BY id",
        )
        .bind(id)
        .fetch_all(self.pool())
        .await
        .map_err(|e| Ctx::op("list host capsules").err(e))?;
        rows.iter()
            .map(|r| text(r, "id"))
            .collect::<R<Vec<_>>>()
            .map_err(|e| DbError::backend("list host capsules", e))
    }

    /// Every host, by id.
    pub async fn system_hosts(&self) -> Result<Vec<Host>, DbError> {
        let rows = sqlx::query(&format!("SELECT {COLS} FROM hosts ORDER BY id"))
            .fetch_all(self.pool())
            .await
            .map_err(|e| Ctx::op("list hosts").err(e))?;
        rows.iter()
            .map(host)
            .collect::<R<Vec<_>>>()
            .map_err(|e| DbError::backend("list hosts", e))
    }

    /// Creates a host (pending until its agent registers) and its first registration
    /// token; returns both (the token in clear, once).
    pub async fn create_host(&self, new: &NewHost) -> Result<(Host, String), DbError> {
        let id = crate::id::new_id(crate::id::prefix::HOST);
        let t = to_db(now());
        let mut tx = self
            .pool()
            .begin()
            .await
            .map_err(|e| Ctx::op("begin").err(e))?;
        let row = sqlx::query(&format!(
            "INSERT INTO hosts (id, type, team_id, provider, availability_zone, created_by, \
             status, created_at, updated_at) \
             VALUES ($1, $2, $3, $4, $5, $6, 'pending', $7, $7) RETURNING {COLS}"
        ))
        .bind(id.as_str())
        .bind(if new.team_id.is_some() {
            "byoc"
        } else {
            "regular"
        })
        .bind(new.team_id.clone())
        .bind(new.provider.clone())
        .bind(new.availability_zone.clone())
        .bind(new.created_by.clone())
        .bind(t)
        .fetch_one(&mut *tx)
        .await
        .map_err(|e| Ctx::op("create host").err(e))?;
        let token = insert_host_token(&mut tx, &id, new.created_by.as_deref()).await?;
        tx.commit()
            .await
            .map_err(|e| Ctx::op("create host").err(e))?;
        Ok((
            host(&row).map_err(|e| DbError::backend("create host", e))?,
            token,
        ))
    }

    /// A new registration token for host `id`; its unused earlier tokens stop working.
    pub async fn new_host_token(&self, id: &str, by: Option<&str>) -> Result<String, DbError> {
        let mut tx = self
            .pool()
            .begin()
            .await
            .map_err(|e| Ctx::op("begin").err(e))?;
        let found = sqlx::query("SELECT id FROM hosts WHERE id = $1")
            .bind(id)
            .fetch_optional(&mut *tx)
            .await
            .map_err(|e| Ctx::op("new host token").err(e))?;
        if found.is_none() {
            return Err(DbError::NotFound { what: "host" });
        }
        sqlx::query("DELETE FROM host_tokens WHERE host_id = $1 AND used_at IS NULL")
            .bind(id)
            .execute(&mut *tx)
            .await
            .map_err(|e| Ctx::op("new host token").err(e))?;
        let token = insert_host_token(&mut tx, id, by).await?;
        tx.commit()
            .await
            .map_err(|e| Ctx::op("new host token").err(e))?;
        Ok(token)
    }

    /// Uses registration token `token` (once: of racing registrations exactly one
    /// gets it) and records what the agent reports; returns the host.
    pub async fn redeem_host_token(
        &self,
        token: &str,
        address: &str,
        specs: &HostSpecs,
    ) -> Result<Result<Host, BadHostToken>, DbError> {
        let t = to_db(now());
        let used = sqlx::query(
            "UPDATE host_tokens SET used_at = $2 \
             WHERE token_hash = $1 AND used_at IS NULL AND expires_at > $2 RETURNING host_id",
        )
        .bind(hash_host_token(token))
        .bind(t)
        .fetch_optional(self.pool())
        .await
        .map_err(|e| Ctx::op("redeem host token").err(e))?;
        let Some(used) = used else {
            return Ok(Err(BadHostToken));
        };
        let id = text(&used, "host_id").map_err(|e| DbError::backend("redeem host token", e))?;
        let row = sqlx::query(&format!(
            "UPDATE hosts SET address = $2, arch = $3, cpu_cores = $4, memory_mb = $5, \
             disk_gb = $6, updated_at = $7 WHERE id = $1 RETURNING {COLS}"
        ))
        .bind(id.as_str())
        .bind(address)
        .bind(specs.arch.as_str())
        .bind(i64::from(specs.cpu_cores))
        .bind(as_i64(specs.memory_mb))
        .bind(as_i64(specs.disk_gb))
        .bind(t)
        .fetch_optional(self.pool())
        .await
        .map_err(|e| Ctx::op("register host").err(e))?;
        match row {
            Some(row) => Ok(Ok(
                host(&row).map_err(|e| DbError::backend("register host", e))?
            )),
            // Deleted meanwhile.
            None => Ok(Err(BadHostToken)),
        }
    }

    /// Records the certificate host `id` was given.
    pub async fn set_host_certificate(
        &self,
        id: &str,
        fingerprint: &str,
        expires_at: Timestamp,
    ) -> Result<(), DbError> {
        sqlx::query(
            "UPDATE hosts SET cert_fingerprint = $2, cert_expires_at = $3, updated_at = $4 \
             WHERE id = $1",
        )
        .bind(id)
        .bind(fingerprint)
        .bind(to_db(expires_at))
        .bind(to_db(now()))
        .execute(self.pool())
        .await
        .map_err(|e| Ctx::op("record host certificate").err(e))?;
        Ok(())
    }

    /// Gives host `id` a new refresh token (the one it had stops working); returns it
    /// in clear, once.
    pub async fn new_host_refresh_token(&self, id: &str) -> Result<String, DbError> {
        let (token, hash, expires) = refresh_token();
        let done = sqlx::query(
            "UPDATE hosts SET refresh_token_hash = $2, refresh_expires_at = $3 WHERE id = $1",
        )
        .bind(id)
        .bind(hash)
        .bind(to_db(expires))
        .execute(self.pool())
        .await
        .map_err(|e| Ctx::op("new host refresh token").err(e))?;
        if done.rows_affected() == 0 {
            return Err(DbError::NotFound { what: "host" });
        }
        Ok(token)
    }

    /// Trades refresh token `token` for a new one (once: of racing uses exactly one
    /// gets it); returns the host and the new token.
    pub async fn redeem_host_refresh_token(
        &self,
        token: &str,
    ) -> Result<Result<(Host, String), BadRefreshToken>, DbError> {
        let (new, hash, expires) = refresh_token();
        let t = now();
        let row = sqlx::query(&format!(
            "UPDATE hosts SET refresh_token_hash = $2, refresh_expires_at = $3, updated_at = $4 \
             WHERE refresh_token_hash = $1 AND refresh_expires_at > $4 RETURNING {COLS}"
        ))
        .bind(hash_host_token(token))
        .bind(hash)
        .bind(to_db(expires))
        .bind(to_db(t))
        .fetch_optional(self.pool())
        .await
        .map_err(|e| Ctx::op("refresh host credentials").err(e))?;
        match row {
            Some(row) => Ok(Ok((
                host(&row).map_err(|e| DbError::backend("refresh host credentials", e))?,
                new,
            ))),
            None => Ok(Err(BadRefreshToken)),
        }
    }

    /// A join token: each registration with it creates a host, up to `max_hosts`
    /// (`None`: any number), for `ttl`. Returns its row and the token in clear, once.
    pub async fn create_join_token(
        &self,
        max_hosts: Option<u32>,
        ttl: std::time::Duration,
        by: Option<&str>,
    ) -> Result<(JoinToken, String), DbError> {
        let token = secret_token(crate::id::prefix::HOST_JOIN);
        let created = now();
        let expires = after(created, ttl);
        let row = sqlx::query(&format!(
            "INSERT INTO host_join_tokens (id, token_hash, created_by, created_at, expires_at, \
             max_hosts) VALUES ($1, $2, $3, $4, $5, $6) RETURNING {JOIN_COLS}"
        ))
        .bind(crate::id::new_id(crate::id::prefix::HOST_JOIN))
        .bind(hash_host_token(&token))
        .bind(by)
        .bind(to_db(created))
        .bind(to_db(expires))
        .bind(max_hosts.map(i64::from))
        .fetch_one(self.pool())
        .await
        .map_err(|e| Ctx::op("create join token").err(e))?;
        Ok((
            join_token(&row).map_err(|e| DbError::backend("create join token", e))?,
            token,
        ))
    }

    /// Every join token, newest first.
    pub async fn join_tokens(&self) -> Result<Vec<JoinToken>, DbError> {
        let rows = sqlx::query(&format!(
            "SELECT {JOIN_COLS} FROM host_join_tokens ORDER BY created_at DESC, id"
        ))
        .fetch_all(self.pool())
        .await
        .map_err(|e| Ctx::op("list join tokens").err(e))?;
        rows.iter()
            .map(join_token)
            .collect::<R<Vec<_>>>()
            .map_err(|e| DbError::backend("list join tokens", e))
    }

    /// Revokes join token `id`; false if there is none.
    pub async fn delete_join_token(&self, id: &str) -> Result<bool, DbError> {
        let done = sqlx::query("DELETE FROM host_join_tokens WHERE id = $1")
            .bind(id)
            .execute(self.pool())
            .await
            .map_err(|e| Ctx::op("delete join token").err(e))?;
        Ok(done.rows_affected() > 0)
    }

    /// Registers a new host `host_id` with join token `token` (counted against its
    /// limit in the same transaction: racing registrations never exceed it). A host
    /// with that id already existing is a conflict.
    pub async fn join_host(
        &self,
        token: &str,
        host_id: &str,
        address: &str,
        specs: &HostSpecs,
    ) -> Result<Result<Host, BadHostToken>, DbError> {
        let t = to_db(now());
        let mut tx = self
            .pool()
            .begin()
            .await
            .map_err(|e| Ctx::op("begin").err(e))?;
        let used = sqlx::query(
            "UPDATE host_join_tokens SET used = used + 1 WHERE token_hash = $1 \
             AND expires_at > $2 AND (max_hosts IS NULL OR used < max_hosts) RETURNING created_by",
        )
        .bind(hash_host_token(token))
        .bind(t)
        .fetch_optional(&mut *tx)
        .await
        .map_err(|e| Ctx::op("redeem join token").err(e))?;
        let Some(used) = used else {
            return Ok(Err(BadHostToken));
        };
        let by = opt_text(&used, "created_by").map_err(|e| DbError::backend("join host", e))?;
        let row = sqlx::query(&format!(
            "INSERT INTO hosts (id, type, address, arch, cpu_cores, memory_mb, disk_gb, \
             created_by, status, created_at, updated_at) \
             VALUES ($1, 'regular', $2, $3, $4, $5, $6, $7, 'pending', $8, $8) RETURNING {COLS}"
        ))
        .bind(host_id)
        .bind(address)
        .bind(specs.arch.as_str())
        .bind(i64::from(specs.cpu_cores))
        .bind(as_i64(specs.memory_mb))
        .bind(as_i64(specs.disk_gb))
        .bind(by)
        .bind(t)
        .fetch_one(&mut *tx)
        .await
        .map_err(|e| Ctx::op("join host").unique("host").err(e))?;
        tx.commit().await.map_err(|e| Ctx::op("join host").err(e))?;
        Ok(Ok(host(&row).map_err(|e| DbError::backend("join host", e))?))
    }

    /// Sets host `id` draining (it takes no new capsules) or back to taking them;
    /// false if there is no such host.
    pub async fn set_host_draining(&self, id: &str, draining: bool) -> Result<bool, DbError> {
        let r = sqlx::query(
            "UPDATE hosts SET status = CASE WHEN $2 = 1 THEN 'draining' \
             WHEN status = 'draining' THEN 'online' ELSE status END, updated_at = $3 \
             WHERE id = $1",
        )
        .bind(id)
        .bind(i64::from(draining))
        .bind(to_db(now()))
        .execute(self.pool())
        .await
        .map_err(|e| Ctx::op("drain host").err(e))?;
        Ok(r.rows_affected() > 0)
    }

    /// Removes host `id` (its tokens and tags with it); false if there was none.
    pub async fn delete_host(&self, id: &str) -> Result<bool, DbError> {
        let r = sqlx::query("DELETE FROM hosts WHERE id = $1")
            .bind(id)
            .execute(self.pool())
            .await
            .map_err(|e| Ctx::op("delete host").err(e))?;
        Ok(r.rows_affected() > 0)
    }

    /// Host `id`'s tags, sorted.
    pub async fn host_tags(&self, id: &str) -> Result<Vec<String>, DbError> {
        let rows = sqlx::query("SELECT tag FROM host_tags WHERE host_id = $1 ORDER BY tag")
            .bind(id)
            .fetch_all(self.pool())
            .await
            .map_err(|e| Ctx::op("list host tags").err(e))?;
        rows.iter()
            .map(|r| text(r, "tag"))
            .collect::<R<Vec<_>>>()
            .map_err(|e| DbError::backend("list host tags", e))
    }

    /// Tags host `id` with `tag` (no change if it has it).
    pub async fn add_host_tag(&self, id: &str, tag: &str) -> Result<(), DbError> {
        sqlx::query(
            "INSERT INTO host_tags (host_id, tag) VALUES ($1, $2) \
             ON CONFLICT (host_id, tag) DO NOTHING",
        )
        .bind(id)
        .bind(tag)
        .execute(self.pool())
        .await
        .map_err(|e| Ctx::op("tag host").err(e))?;
        Ok(())
    }

    /// Removes `tag` from host `id`; false if it did not have it.
    pub async fn remove_host_tag(&self, id: &str, tag: &str) -> Result<bool, DbError> {
        let r = sqlx::query("DELETE FROM host_tags WHERE host_id = $1 AND tag = $2")
            .bind(id)
            .bind(tag)
            .execute(self.pool())
            .await
            .map_err(|e| Ctx::op("untag host").err(e))?;
        Ok(r.rows_affected() > 0)
    }

    /// The stored CA `name` (certificate PEM, sealed key), if one was made.
    pub async fn cluster_ca(&self, name: &str) -> Result<Option<(String, String)>, DbError> {
        let row = sqlx::query("SELECT cert_pem, key_sealed FROM cluster_cas WHERE name = $1")
            .bind(name)
            .fetch_optional(self.pool())
            .await
            .map_err(|e| Ctx::op("get cluster CA").err(e))?;
        row.map(|r| Ok((text(&r, "cert_pem")?, text(&r, "key_sealed")?)))
            .transpose()
            .map_err(|e: sqlx::Error| DbError::backend("get cluster CA", e))
    }

    /// Stores CA `name` unless one exists (control planes starting together agree on
    /// the first).
    pub async fn insert_cluster_ca(
        &self,
        name: &str,
        cert_pem: &str,
        key_sealed: &str,
    ) -> Result<(), DbError> {
        sqlx::query(
            "INSERT INTO cluster_cas (name, cert_pem, key_sealed, created_at) \
             VALUES ($1, $2, $3, $4) ON CONFLICT (name) DO NOTHING",
        )
        .bind(name)
        .bind(cert_pem)
        .bind(key_sealed)
        .bind(to_db(now()))
        .execute(self.pool())
        .await
        .map_err(|e| Ctx::op("store cluster CA").err(e))?;
        Ok(())
    }
}

async fn insert_host_token(
    tx: &mut sqlx::Transaction<'static, sqlx::Any>,
    host_id: &str,
    by: Option<&str>,
) -> Result<String, DbError> {
    let token = secret_token(crate::id::prefix::HOST_TOKEN);
    let created = now();
    let expires = after(created, HOST_TOKEN_TTL);
    sqlx::query(
        "INSERT INTO host_tokens (id, host_id, token_hash, created_by, created_at, expires_at) \
         VALUES ($1, $2, $3, $4, $5, $6)",
    )
    .bind(crate::id::new_id(crate::id::prefix::HOST_TOKEN))
    .bind(host_id)
    .bind(hash_host_token(&token))
    .bind(by)
    .bind(to_db(created))
    .bind(to_db(expires))
    .execute(&mut **tx)
    .await
    .map_err(|e| Ctx::op("create host token").err(e))?;
    Ok(token)
}

/// A new refresh token: in clear, hashed, and when it expires.
fn refresh_token() -> (String, String, Timestamp) {
    let token = secret_token(crate::id::prefix::HOST_REFRESH);
    let hash = hash_host_token(&token);
    (token, hash, after(now(), HOST_REFRESH_TTL))
}

/// A new secret: `prefix` and 32 random bytes in hex (stored hashed).
fn secret_token(prefix: &str) -> String {
    format!("{prefix}{}", crate::id::random_hex(32))
}

/// `ttl` after `t`.
fn after(t: Timestamp, ttl: std::time::Duration) -> Timestamp {
    t + chrono::Duration::from_std(ttl).unwrap_or_default()
}
