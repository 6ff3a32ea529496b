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
    pub created_at: Timestamp,
    pub updated_at: Timestamp,
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
                    last_heartbeat_at, metadata, created_at, updated_at";

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
}
