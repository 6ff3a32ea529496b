//! Capsule records: what the API lists and the reconciler compares with the host.
//!
//! The envd access token is stored here but read only through
//! [`Db::capsule_envd_token`]; the list and get queries never select it.

use crate::error::Ctx;
use crate::row::{int, json_map, opt_ts, text, ts, u32_col, R};
use crate::time::{now, to_db, Timestamp};
use crate::{Db, DbError};
use serde_json::{Map, Value};
use sqlx::any::AnyRow;
use wrenn_core::egress::EgressPolicy;
use wrenn_core::id::CapsuleId;
use wrenn_core::scheduler::HostId;
use wrenn_core::status::CapsuleStatus;

#[derive(Clone, Debug, PartialEq)]
pub struct Capsule {
    pub id: CapsuleId,
    pub team_id: String,
    pub status: CapsuleStatus,
    pub template: String,
    pub vcpus: u32,
    pub memory_mb: u32,
    /// Inactivity auto-pause TTL; 0 = never.
    pub timeout_sec: u32,
    pub created_at: Timestamp,
    /// First time the capsule became running.
    pub started_at: Option<Timestamp>,
    pub last_active_at: Option<Timestamp>,
    pub last_updated: Timestamp,
    pub metadata: Map<String, Value>,
    /// What the inactivity timeout does: pause (`true`) or destroy.
    pub pause_on_timeout: bool,
    pub disk_mb: u64,
    /// The timeout is an end time (`last_active_at` + `timeout_sec`, moved only by
    /// [`Db::set_capsule_timeout`]) rather than an inactivity timer.
    pub deadline: bool,
    /// A pause on timeout keeps the memory (`true`) or the disk only.
    pub timeout_pause_memory: bool,
    /// Traffic to the paused capsule resumes it.
    pub auto_resume: bool,
    /// Egress policy.
    pub network: EgressPolicy,
    /// Ports are reachable through the proxy without the traffic access token.
    pub public_traffic: bool,
    /// The host that runs or holds it.
    pub host_id: HostId,
}

/// What creating a capsule record needs; the id comes from the capsule manager.
#[derive(Clone, PartialEq)]
pub struct NewCapsule {
    pub id: CapsuleId,
    pub status: CapsuleStatus,
    pub template: String,
    pub vcpus: u32,
    pub memory_mb: u32,
    pub timeout_sec: u32,
    pub metadata: Map<String, Value>,
    pub envd_access_token: Option<String>,
    pub pause_on_timeout: bool,
    pub disk_mb: u64,
    /// See [`Capsule::deadline`].
    pub deadline: bool,
    /// See [`Capsule::timeout_pause_memory`].
    pub timeout_pause_memory: bool,
    /// See [`Capsule::auto_resume`].
    pub auto_resume: bool,
    pub network: EgressPolicy,
    /// See [`Capsule::public_traffic`].
    pub public_traffic: bool,
    /// Sealed; set when `public_traffic` is off.
    pub traffic_access_token: Option<String>,
    /// The host that runs it.
    pub host_id: HostId,
}

impl std::fmt::Debug for NewCapsule {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NewCapsule")
            .field("id", &self.id)
            .field("status", &self.status)
            .field("template", &self.template)
            .field("vcpus", &self.vcpus)
            .field("memory_mb", &self.memory_mb)
            .field("timeout_sec", &self.timeout_sec)
            .field("metadata", &self.metadata)
            .field("pause_on_timeout", &self.pause_on_timeout)
            .field("disk_mb", &self.disk_mb)
            .field("deadline", &self.deadline)
            .field("timeout_pause_memory", &self.timeout_pause_memory)
            .field("auto_resume", &self.auto_resume)
            .field("network", &self.network)
            .field("public_traffic", &self.public_traffic)
            .field(
                "envd_access_token",
                &self.envd_access_token.as_ref().map(|_| "<redacted>"),
            )
            .field(
                "traffic_access_token",
                &self.traffic_access_token.as_ref().map(|_| "<redacted>"),
            )
            .field("host_id", &self.host_id)
            .finish()
    }
}

/// Every column but the tokens.
pub(crate) const COLS: &str = "id, team_id, status, template, vcpus, memory_mb, timeout_sec, \
                               created_at, started_at, last_active_at, last_updated, metadata, \
                               on_timeout, disk_mb, timeout_kind, timeout_pause, auto_resume, \
                               network, public_traffic, host_id";

/// Statuses that `list_capsules` leaves out unless asked: the capsule is gone.
pub(crate) const ENDED: &str = "('stopped', 'error')";
/// Disk of a capsule whose row predates the `disk_mb` column.
pub const DEFAULT_DISK_MB: u64 = 5120;

/// What a team holds (see [`Db::team_usage`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TeamUsage {
    pub capsules: u64,
    pub vcpus: u64,
    pub memory_mb: u64,
    pub disk_mb: u64,
    pub snapshots: u64,
}

pub(crate) fn capsule(row: &AnyRow) -> R<Capsule> {
    let id = text(row, "id")?;
    let status = text(row, "status")?;
    Ok(Capsule {
        id: CapsuleId::parse(&id).map_err(|e| crate::row::decode("id", e))?,
        team_id: text(row, "team_id")?,
        status: CapsuleStatus::ALL
            .into_iter()
            .find(|s| s.as_str() == status)
            .ok_or_else(|| crate::row::decode("status", format!("unknown status {status:?}")))?,
        template: text(row, "template")?,
        vcpus: u32_col(row, "vcpus")?,
        memory_mb: u32_col(row, "memory_mb")?,
        timeout_sec: u32_col(row, "timeout_sec")?,
        created_at: ts(row, "created_at")?,
        started_at: opt_ts(row, "started_at")?,
        last_active_at: opt_ts(row, "last_active_at")?,
        last_updated: ts(row, "last_updated")?,
        metadata: json_map(row, "metadata")?,
        pause_on_timeout: text(row, "on_timeout")? != "kill",
        disk_mb: u64::from(u32_col(row, "disk_mb")?),
        deadline: text(row, "timeout_kind")? == "deadline",
        timeout_pause_memory: text(row, "timeout_pause")? != "disk",
        auto_resume: text(row, "auto_resume")? == "on",
        network: serde_json::from_str(&text(row, "network")?)
            .map_err(|e| crate::row::decode("network", e))?,
        public_traffic: text(row, "public_traffic")? != "off",
        host_id: HostId(text(row, "host_id")?),
    })
}

pub(crate) fn one(op: &'static str, row: Option<AnyRow>) -> Result<Capsule, DbError> {
    let row = row.ok_or(DbError::NotFound { what: "capsule" })?;
    capsule(&row).map_err(|e| DbError::backend(op, e))
}

pub(crate) fn many(op: &'static str, rows: Vec<AnyRow>) -> Result<Vec<Capsule>, DbError> {
    rows.iter()
        .map(capsule)
        .collect::<R<Vec<_>>>()
        .map_err(|e| DbError::backend(op, e))
}

fn policy_json(p: &EgressPolicy) -> String {
    serde_json::to_string(p).unwrap_or_else(|_| "{}".into())
}

impl Db {
    /// Records a new capsule of `team_id`. Conflict "capsule" if the id exists.
    pub async fn insert_capsule(&self, team_id: &str, new: NewCapsule) -> Result<Capsule, DbError> {
        let t = to_db(now());
        let running = new.status == CapsuleStatus::Running;
        let row = sqlx::query(&format!(
            "INSERT INTO capsules (id, team_id, status, template, vcpus, memory_mb, timeout_sec, \
             created_at, started_at, last_active_at, last_updated, metadata, envd_access_token, \
             on_timeout, disk_mb, timeout_kind, timeout_pause, auto_resume, network, \
             public_traffic, traffic_access_token, host_id) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $9, $8, $10, $11, $12, $13, $14, $15, $16, \
             $17, $18, $19, $20) \
             RETURNING {COLS}"
        ))
        .bind(new.id.as_str())
        .bind(team_id)
        .bind(new.status.as_str())
        .bind(new.template)
        .bind(i64::from(new.vcpus))
        .bind(i64::from(new.memory_mb))
        .bind(i64::from(new.timeout_sec))
        .bind(t)
        .bind(running.then_some(t))
        .bind(Value::Object(new.metadata).to_string())
        .bind(new.envd_access_token)
        .bind(if new.pause_on_timeout {
            "pause"
        } else {
            "kill"
        })
        .bind(i64::try_from(new.disk_mb).unwrap_or(i64::MAX))
        .bind(if new.deadline { "deadline" } else { "idle" })
        .bind(if new.timeout_pause_memory {
            "full"
        } else {
            "disk"
        })
        .bind(if new.auto_resume { "on" } else { "off" })
        .bind(policy_json(&new.network))
        .bind(if new.public_traffic { "on" } else { "off" })
        .bind(new.traffic_access_token)
        .bind(new.host_id.0)
        .fetch_optional(self.pool())
        .await
        .map_err(|e| {
            Ctx::op("insert capsule")
                .unique("capsule")
                .missing("team")
                .err(e)
        })?;
        one("insert capsule", row)
    }

    pub async fn get_capsule(&self, team_id: &str, id: &str) -> Result<Capsule, DbError> {
        let row = sqlx::query(&format!(
            "SELECT {COLS} FROM capsules WHERE team_id = $1 AND id = $2"
        ))
        .bind(team_id)
        .bind(id)
        .fetch_optional(self.pool())
        .await
        .map_err(|e| Ctx::op("get capsule").err(e))?;
        one("get capsule", row)
    }

    /// The team's capsules, newest first; stopped and failed ones only if `include_ended`.
    pub async fn list_capsules(
        &self,
        team_id: &str,
        include_ended: bool,
    ) -> Result<Vec<Capsule>, DbError> {
        let filter = if include_ended {
            ""
        } else {
            " AND status NOT IN ('stopped', 'error')"
        };
        let rows = sqlx::query(&format!(
            "SELECT {COLS} FROM capsules WHERE team_id = $1{filter} ORDER BY created_at DESC, id DESC"
        ))
        .bind(team_id)
        .fetch_all(self.pool())
        .await
        .map_err(|e| Ctx::op("list capsules").err(e))?;
        many("list capsules", rows)
    }

    /// Stores a new status (the caller has checked the transition). Becoming running
    /// sets `started_at` the first time and counts as activity.
    pub async fn set_capsule_status(
        &self,
        team_id: &str,
        id: &str,
        status: CapsuleStatus,
    ) -> Result<Capsule, DbError> {
        let t = to_db(now());
        let running = status == CapsuleStatus::Running;
        let row = sqlx::query(&format!(
            "UPDATE capsules SET status = $1, last_updated = $2, \
             started_at = CASE WHEN $3 = 1 THEN COALESCE(started_at, $2) ELSE started_at END, \
             last_active_at = CASE WHEN $3 = 1 THEN $2 ELSE last_active_at END \
             WHERE team_id = $4 AND id = $5 RETURNING {COLS}"
        ))
        .bind(status.as_str())
        .bind(t)
        .bind(i64::from(running))
        .bind(team_id)
        .bind(id)
        .fetch_optional(self.pool())
        .await
        .map_err(|e| Ctx::op("set capsule status").err(e))?;
        one("set capsule status", row)
    }

    /// Moves the capsule from `from` to `to` only if its status is still `from`: the
    /// check and the write are one statement, so two callers racing for one capsule
    /// (a user's pause and the reaper's) cannot both win. `None` when the capsule is no
    /// longer `from` (or does not exist).
    pub async fn transition_capsule_status(
        &self,
        team_id: &str,
        id: &str,
        from: CapsuleStatus,
        to: CapsuleStatus,
    ) -> Result<Option<Capsule>, DbError> {
        let t = to_db(now());
        let running = to == CapsuleStatus::Running;
        let row = sqlx::query(&format!(
            "UPDATE capsules SET status = $1, last_updated = $2, \
             started_at = CASE WHEN $3 = 1 THEN COALESCE(started_at, $2) ELSE started_at END, \
             last_active_at = CASE WHEN $3 = 1 THEN $2 ELSE last_active_at END \
             WHERE team_id = $4 AND id = $5 AND status = $6 RETURNING {COLS}"
        ))
        .bind(to.as_str())
        .bind(t)
        .bind(i64::from(running))
        .bind(team_id)
        .bind(id)
        .bind(from.as_str())
        .fetch_optional(self.pool())
        .await
        .map_err(|e| Ctx::op("change capsule status").err(e))?;
        row.map(|r| capsule(&r))
            .transpose()
            .map_err(|e| DbError::backend("change capsule status", e))
    }

    /// What the team holds now: capsules not stopped or failed; the vCPUs and memory of
    /// those not paused; the disk of all of them; and its snapshot templates.
    pub async fn team_usage(&self, team_id: &str) -> Result<TeamUsage, DbError> {
        let row = sqlx::query(&format!(
            "SELECT COUNT(*) AS capsules, \
             CAST(COALESCE(SUM(CASE WHEN status <> 'paused' THEN vcpus ELSE 0 END), 0) AS BIGINT) AS vcpus, \
             CAST(COALESCE(SUM(CASE WHEN status <> 'paused' THEN memory_mb ELSE 0 END), 0) AS BIGINT) AS memory_mb, \
             CAST(COALESCE(SUM(CASE WHEN disk_mb > 0 THEN disk_mb ELSE {DEFAULT_DISK_MB} END), 0) AS BIGINT) AS disk_mb \
             FROM capsules WHERE team_id = $1 AND status NOT IN {ENDED}"
        ))
        .bind(team_id)
        .fetch_one(self.pool())
        .await
        .map_err(|e| Ctx::op("team usage").err(e))?;
        let snapshots = sqlx::query(
            "SELECT COUNT(*) AS n FROM templates WHERE team_id = $1 AND kind = 'snapshot'",
        )
        .bind(team_id)
        .fetch_one(self.pool())
        .await
        .map_err(|e| Ctx::op("team usage").err(e))?;
        let get = |r: &AnyRow, c: &str| -> Result<u64, DbError> {
            int(r, c)
                .map(|v| u64::try_from(v).unwrap_or(0))
                .map_err(|e| DbError::backend("team usage", e))
        };
        Ok(TeamUsage {
            capsules: get(&row, "capsules")?,
            vcpus: get(&row, "vcpus")?,
            memory_mb: get(&row, "memory_mb")?,
            disk_mb: get(&row, "disk_mb")?,
            snapshots: get(&snapshots, "n")?,
        })
    }

    /// Records activity (exec, ping, …): resets the inactivity timer. A capsule whose
    /// timeout is a deadline keeps it (activity does not move an end time).
    pub async fn touch_capsule(&self, team_id: &str, id: &str) -> Result<Timestamp, DbError> {
        let t = now();
        let done = sqlx::query(
            "UPDATE capsules SET last_active_at = \
             CASE WHEN timeout_kind = 'deadline' THEN last_active_at ELSE $1 END \
             WHERE team_id = $2 AND id = $3",
        )
        .bind(to_db(t))
        .bind(team_id)
        .bind(id)
        .execute(self.pool())
        .await
        .map_err(|e| Ctx::op("touch capsule").err(e))?;
        if done.rows_affected() == 0 {
            return Err(DbError::NotFound { what: "capsule" });
        }
        Ok(t)
    }

    /// Sets the timeout, counted from now (E2B set-timeout: the end time becomes now +
    /// `timeout_sec`); 0 = never.
    pub async fn set_capsule_timeout(
        &self,
        team_id: &str,
        id: &str,
        timeout_sec: u32,
    ) -> Result<Capsule, DbError> {
        let t = to_db(now());
        let row = sqlx::query(&format!(
            "UPDATE capsules SET timeout_sec = $1, last_active_at = $2, last_updated = $2 \
             WHERE team_id = $3 AND id = $4 RETURNING {COLS}"
        ))
        .bind(i64::from(timeout_sec))
        .bind(t)
        .bind(team_id)
        .bind(id)
        .fetch_optional(self.pool())
        .await
        .map_err(|e| Ctx::op("set capsule timeout").err(e))?;
        one("set capsule timeout", row)
    }

    /// Replaces the capsule's egress policy.
    pub async fn set_capsule_network(
        &self,
        team_id: &str,
        id: &str,
        network: &EgressPolicy,
    ) -> Result<Capsule, DbError> {
        let row = sqlx::query(&format!(
            "UPDATE capsules SET network = $1, last_updated = $2 \
             WHERE team_id = $3 AND id = $4 RETURNING {COLS}"
        ))
        .bind(policy_json(network))
        .bind(to_db(now()))
        .bind(team_id)
        .bind(id)
        .fetch_optional(self.pool())
        .await
        .map_err(|e| Ctx::op("set capsule network").err(e))?;
        one("set capsule network", row)
    }

    /// The capsule's (sealed) traffic access token, if its ports are private.
    pub async fn capsule_traffic_token(&self, id: &str) -> Result<Option<String>, DbError> {
        let row = sqlx::query("SELECT traffic_access_token FROM capsules WHERE id = $1")
            .bind(id)
            .fetch_optional(self.pool())
            .await
            .map_err(|e| Ctx::op("get traffic token").err(e))?
            .ok_or(DbError::NotFound { what: "capsule" })?;
        crate::row::opt_text(&row, "traffic_access_token")
            .map_err(|e| DbError::backend("get traffic token", e))
    }

    /// Replaces the capsule's metadata map.
    pub async fn set_capsule_metadata(
        &self,
        team_id: &str,
        id: &str,
        metadata: Map<String, Value>,
    ) -> Result<Capsule, DbError> {
        let row = sqlx::query(&format!(
            "UPDATE capsules SET metadata = $1, last_updated = $2 \
             WHERE team_id = $3 AND id = $4 RETURNING {COLS}"
        ))
        .bind(Value::Object(metadata).to_string())
        .bind(to_db(now()))
        .bind(team_id)
        .bind(id)
        .fetch_optional(self.pool())
        .await
        .map_err(|e| Ctx::op("set capsule metadata").err(e))?;
        one("set capsule metadata", row)
    }

    /// The capsule's envd access token — only for its own team's authenticated caller.
    pub async fn capsule_envd_token(
        &self,
        team_id: &str,
        id: &str,
    ) -> Result<Option<String>, DbError> {
        let row =
            sqlx::query("SELECT envd_access_token FROM capsules WHERE team_id = $1 AND id = $2")
                .bind(team_id)
                .bind(id)
                .fetch_optional(self.pool())
                .await
                .map_err(|e| Ctx::op("get envd token").err(e))?
                .ok_or(DbError::NotFound { what: "capsule" })?;
        crate::row::opt_text(&row, "envd_access_token")
            .map_err(|e| DbError::backend("get envd token", e))
    }

    /// Removes the record (normally a destroyed capsule is kept as `stopped`).
    pub async fn delete_capsule(&self, team_id: &str, id: &str) -> Result<(), DbError> {
        let done = sqlx::query("DELETE FROM capsules WHERE team_id = $1 AND id = $2")
            .bind(team_id)
            .bind(id)
            .execute(self.pool())
            .await
            .map_err(|e| Ctx::op("delete capsule").err(e))?;
        if done.rows_affected() == 0 {
            return Err(DbError::NotFound { what: "capsule" });
        }
        Ok(())
    }

    /// Running and paused capsules of the team (for stats and scheduling).
    pub async fn count_live_capsules(&self, team_id: &str) -> Result<u64, DbError> {
        let row = sqlx::query(&format!(
            "SELECT COUNT(*) AS n FROM capsules WHERE team_id = $1 AND status NOT IN {ENDED}"
        ))
        .bind(team_id)
        .fetch_one(self.pool())
        .await
        .map_err(|e| Ctx::op("count capsules").err(e))?;
        let n = int(&row, "n").map_err(|e| DbError::backend("count capsules", e))?;
        Ok(u64::try_from(n).unwrap_or(0))
    }
}

impl Db {
    /// Keeps the sample history of a (paused) capsule; replaces what was kept before.
    pub async fn save_capsule_metrics(&self, id: &str, samples: &Value) -> Result<(), DbError> {
        let t = to_db(now());
        sqlx::query(
            "INSERT INTO capsule_metrics (capsule_id, samples, updated_at) VALUES ($1, $2, $3) \
             ON CONFLICT (capsule_id) DO UPDATE SET samples = excluded.samples, \
             updated_at = excluded.updated_at",
        )
        .bind(id)
        .bind(samples.to_string())
        .bind(t)
        .execute(self.pool())
        .await
        .map_err(|e| Ctx::op("save capsule metrics").missing("capsule").err(e))?;
        Ok(())
    }

    /// The kept sample history of a capsule, if any.
    pub async fn load_capsule_metrics(&self, id: &str) -> Result<Option<Value>, DbError> {
        let row = sqlx::query("SELECT samples FROM capsule_metrics WHERE capsule_id = $1")
            .bind(id)
            .fetch_optional(self.pool())
            .await
            .map_err(|e| Ctx::op("load capsule metrics").err(e))?;
        let Some(row) = row else { return Ok(None) };
        let text =
            text(&row, "samples").map_err(|e| DbError::backend("load capsule metrics", e))?;
        Ok(serde_json::from_str(&text).ok())
    }
}

impl Db {
    /// Replaces the capsule's envd access token (it changes on every restore).
    pub async fn set_capsule_envd_token(
        &self,
        team_id: &str,
        id: &str,
        token: Option<&str>,
    ) -> Result<(), DbError> {
        let done = sqlx::query(
            "UPDATE capsules SET envd_access_token = $1 WHERE team_id = $2 AND id = $3",
        )
        .bind(token)
        .bind(team_id)
        .bind(id)
        .execute(self.pool())
        .await
        .map_err(|e| Ctx::op("set capsule envd token").err(e))?;
        if done.rows_affected() == 0 {
            return Err(DbError::NotFound { what: "capsule" });
        }
        Ok(())
    }
}
