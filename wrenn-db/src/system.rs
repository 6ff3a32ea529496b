//! Cross-team queries for the server's own background work: start-up reconciliation
//! and the inactivity reaper. Request handlers must not use these: they see every
//! team's rows.

use crate::capsules::{many, one, Capsule, COLS, ENDED};
use crate::error::Ctx;
use crate::time::{to_db, Timestamp};
use crate::{Db, DbError};
use wrenn_core::status::CapsuleStatus;

impl Db {
    /// Every capsule not stopped or failed, of every team (reconciliation input).
    pub async fn system_live_capsules(&self) -> Result<Vec<Capsule>, DbError> {
        let rows = sqlx::query(&format!(
            "SELECT {COLS} FROM capsules WHERE status NOT IN {ENDED} ORDER BY created_at, id"
        ))
        .fetch_all(self.pool())
        .await
        .map_err(|e| Ctx::op("list live capsules").err(e))?;
        many("list live capsules", rows)
    }

    /// Running capsules with a TTL whose last activity is older than it at `at`.
    pub async fn system_idle_capsules(&self, at: Timestamp) -> Result<Vec<Capsule>, DbError> {
        let rows = sqlx::query(&format!(
            "SELECT {COLS} FROM capsules WHERE status = 'running' AND timeout_sec > 0 \
             AND COALESCE(last_active_at, created_at) + timeout_sec * 1000000 <= $1 \
             ORDER BY created_at, id"
        ))
        .bind(to_db(at))
        .fetch_all(self.pool())
        .await
        .map_err(|e| Ctx::op("list idle capsules").err(e))?;
        many("list idle capsules", rows)
    }

    /// Sets a capsule's status by id alone (the reconciler does not know the team).
    pub async fn system_set_capsule_status(
        &self,
        id: &str,
        status: CapsuleStatus,
    ) -> Result<Capsule, DbError> {
        let team: String = {
            let row = sqlx::query("SELECT team_id FROM capsules WHERE id = $1")
                .bind(id)
                .fetch_optional(self.pool())
                .await
                .map_err(|e| Ctx::op("set capsule status").err(e))?;
            let row = row.ok_or(DbError::NotFound { what: "capsule" })?;
            crate::row::text(&row, "team_id")
                .map_err(|e| DbError::backend("set capsule status", e))?
        };
        self.set_capsule_status(&team, id, status).await
    }

    /// One capsule by id alone (port proxy by Host name, reconciliation).
    pub async fn system_get_capsule(&self, id: &str) -> Result<Capsule, DbError> {
        let row = sqlx::query(&format!("SELECT {COLS} FROM capsules WHERE id = $1"))
            .bind(id)
            .fetch_optional(self.pool())
            .await
            .map_err(|e| Ctx::op("get capsule").err(e))?;
        one("get capsule", row)
    }

    /// A server-wide setting (see the `settings` table), `None` when unset.
    pub async fn system_setting(&self, key: &str) -> Result<Option<String>, DbError> {
        let row = sqlx::query("SELECT value FROM settings WHERE key = $1")
            .bind(key)
            .fetch_optional(self.pool())
            .await
            .map_err(|e| Ctx::op("get setting").err(e))?;
        row.map(|r| crate::row::text(&r, "value"))
            .transpose()
            .map_err(|e| DbError::backend("get setting", e))
    }

    /// Sets a server-wide setting, replacing any value it had.
    pub async fn system_set_setting(&self, key: &str, value: &str) -> Result<(), DbError> {
        sqlx::query(
            "INSERT INTO settings (key, value) VALUES ($1, $2) \
             ON CONFLICT (key) DO UPDATE SET value = excluded.value",
        )
        .bind(key)
        .bind(value)
        .execute(self.pool())
        .await
        .map_err(|e| Ctx::op("set setting").err(e))?;
        Ok(())
    }
}
