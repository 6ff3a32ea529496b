//! Notification channels of a team (`channels`) and the outbox of their deliveries
//! (`channel_deliveries`). A channel's provider settings arrive here sealed: the
//! database never holds them in clear.

use crate::error::Ctx;
use crate::id::{new_id, prefix};
use crate::row::{decode, opt_int, opt_text, opt_ts, text, ts, u32_col, R};
use crate::time::{now, to_db, Timestamp};
use crate::{Db, DbError};
use sqlx::any::AnyRow;

/// A notification channel.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Channel {
    pub id: String,
    pub team_id: String,
    pub name: String,
    pub provider: String,
    /// The provider's settings, sealed by the server.
    pub config: String,
    /// The event types it receives.
    pub event_types: Vec<String>,
    pub created_by: Option<String>,
    pub created_at: Timestamp,
    pub updated_at: Timestamp,
}

/// A channel to create.
#[derive(Clone, Debug)]
pub struct NewChannel {
    /// Chosen by the caller (the sealed config is bound to it).
    pub id: String,
    pub name: String,
    pub provider: String,
    pub config: String,
    pub event_types: Vec<String>,
    pub created_by: Option<String>,
}

/// What a channel update changes (`None`: kept).
#[derive(Clone, Debug, Default)]
pub struct ChannelUpdate {
    pub name: Option<String>,
    pub config: Option<String>,
    pub event_types: Option<Vec<String>>,
}

/// Where a delivery is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeliveryStatus {
    /// Waiting for its (next) attempt.
    Pending,
    Delivered,
    /// Out of attempts.
    Failed,
}

impl DeliveryStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            DeliveryStatus::Pending => "pending",
            DeliveryStatus::Delivered => "delivered",
            DeliveryStatus::Failed => "failed",
        }
    }

    fn parse(s: &str) -> R<Self> {
        Ok(match s {
            "pending" => DeliveryStatus::Pending,
            "delivered" => DeliveryStatus::Delivered,
            "failed" => DeliveryStatus::Failed,
            other => {
                return Err(decode(
                    "status",
                    format!("unknown delivery status {other:?}"),
                ))
            }
        })
    }
}

/// One event for one channel.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Delivery {
    pub id: String,
    pub channel_id: String,
    pub team_id: String,
    pub event_type: String,
    /// The JSON body sent.
    pub payload: String,
    pub status: DeliveryStatus,
    pub attempts: u32,
    pub last_error: Option<String>,
    /// The receiver's last HTTP status.
    pub last_status: Option<u16>,
    /// When the next attempt is due (pending ones).
    pub next_at: Timestamp,
    pub created_at: Timestamp,
    pub delivered_at: Option<Timestamp>,
}

/// How an attempt ended.
#[derive(Clone, Debug)]
pub struct Attempt {
    pub ok: bool,
    pub status: Option<u16>,
    pub error: Option<String>,
    /// When to try again (`None`: no more attempts; a failure is final).
    pub retry_at: Option<Timestamp>,
}

const CHANNEL_COLS: &str =
    "id, team_id, name, provider, config, event_types, created_by, created_at, updated_at";
const DELIVERY_COLS: &str = "id, channel_id, team_id, event_type, payload, status, attempts, \
     last_error, last_status, next_at, created_at, delivered_at";

fn channel(row: &AnyRow) -> R<Channel> {
    let types: Vec<String> =
        serde_json::from_str(&text(row, "event_types")?).map_err(|e| decode("event_types", e))?;
    Ok(Channel {
        id: text(row, "id")?,
        team_id: text(row, "team_id")?,
        name: text(row, "name")?,
        provider: text(row, "provider")?,
        config: text(row, "config")?,
        event_types: types,
        created_by: opt_text(row, "created_by")?,
        created_at: ts(row, "created_at")?,
        updated_at: ts(row, "updated_at")?,
    })
}

fn delivery(row: &AnyRow) -> R<Delivery> {
    Ok(Delivery {
        id: text(row, "id")?,
        channel_id: text(row, "channel_id")?,
        team_id: text(row, "team_id")?,
        event_type: text(row, "event_type")?,
        payload: text(row, "payload")?,
        status: DeliveryStatus::parse(&text(row, "status")?)?,
        attempts: u32_col(row, "attempts")?,
        last_error: opt_text(row, "last_error")?,
        last_status: opt_int(row, "last_status")?
            .map(|v| u16::try_from(v).map_err(|e| decode("last_status", e)))
            .transpose()?,
        next_at: ts(row, "next_at")?,
        created_at: ts(row, "created_at")?,
        delivered_at: opt_ts(row, "delivered_at")?,
    })
}

fn read<T>(op: &'static str, row: &AnyRow, f: fn(&AnyRow) -> R<T>) -> Result<T, DbError> {
    f(row).map_err(|e| DbError::backend(op, e))
}

impl Db {
    /// Creates channel `new` of team `team_id` (a name the team uses already is a
    /// conflict).
    pub async fn insert_channel(&self, team_id: &str, new: NewChannel) -> Result<Channel, DbError> {
        let t = now();
        let types = serde_json::to_string(&new.event_types)
            .map_err(|e| DbError::backend("insert channel", e))?;
        let row = sqlx::query(&format!(
            "INSERT INTO channels ({CHANNEL_COLS}) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $8) \
             RETURNING {CHANNEL_COLS}"
        ))
        .bind(&new.id)
        .bind(team_id)
        .bind(&new.name)
        .bind(&new.provider)
        .bind(&new.config)
        .bind(types)
        .bind(new.created_by)
        .bind(to_db(t))
        .fetch_one(self.pool())
        .await
        .map_err(|e| {
            Ctx::op("insert channel")
                .unique("channel name")
                .missing("team")
                .err(e)
        })?;
        read("insert channel", &row, channel)
    }

    /// Team `team_id`'s channels, by name.
    pub async fn list_channels(&self, team_id: &str) -> Result<Vec<Channel>, DbError> {
        let rows = sqlx::query(&format!(
            "SELECT {CHANNEL_COLS} FROM channels WHERE team_id = $1 ORDER BY name"
        ))
        .bind(team_id)
        .fetch_all(self.pool())
        .await
        .map_err(|e| Ctx::op("list channels").err(e))?;
        rows.iter()
            .map(|r| read("list channels", r, channel))
            .collect()
    }

    /// Team `team_id`'s channel `id`.
    pub async fn get_channel(&self, team_id: &str, id: &str) -> Result<Channel, DbError> {
        let row = sqlx::query(&format!(
            "SELECT {CHANNEL_COLS} FROM channels WHERE id = $1 AND team_id = $2"
        ))
        .bind(id)
        .bind(team_id)
        .fetch_optional(self.pool())
        .await
        .map_err(|e| Ctx::op("get channel").err(e))?
        .ok_or(DbError::NotFound { what: "channel" })?;
        read("get channel", &row, channel)
    }

    /// Changes team `team_id`'s channel `id`.
    pub async fn update_channel(
        &self,
        team_id: &str,
        id: &str,
        update: ChannelUpdate,
    ) -> Result<Channel, DbError> {
        let types = update
            .event_types
            .map(|t| serde_json::to_string(&t))
            .transpose()
            .map_err(|e| DbError::backend("update channel", e))?;
        let row = sqlx::query(&format!(
            "UPDATE channels SET name = COALESCE($3, name), config = COALESCE($4, config), \
             event_types = COALESCE($5, event_types), updated_at = $6 \
             WHERE id = $1 AND team_id = $2 RETURNING {CHANNEL_COLS}"
        ))
        .bind(id)
        .bind(team_id)
        .bind(update.name)
        .bind(update.config)
        .bind(types)
        .bind(to_db(now()))
        .fetch_optional(self.pool())
        .await
        .map_err(|e| Ctx::op("update channel").unique("channel name").err(e))?
        .ok_or(DbError::NotFound { what: "channel" })?;
        read("update channel", &row, channel)
    }

    /// Deletes team `team_id`'s channel `id` and its deliveries.
    pub async fn delete_channel(&self, team_id: &str, id: &str) -> Result<(), DbError> {
        let mut tx = self
            .pool()
            .begin()
            .await
            .map_err(|e| Ctx::op("delete channel").err(e))?;
        sqlx::query("DELETE FROM channel_deliveries WHERE channel_id = $1 AND team_id = $2")
            .bind(id)
            .bind(team_id)
            .execute(&mut *tx)
            .await
            .map_err(|e| Ctx::op("delete channel").err(e))?;
        let done = sqlx::query("DELETE FROM channels WHERE id = $1 AND team_id = $2")
            .bind(id)
            .bind(team_id)
            .execute(&mut *tx)
            .await
            .map_err(|e| Ctx::op("delete channel").err(e))?;
        if done.rows_affected() == 0 {
            return Err(DbError::NotFound { what: "channel" });
        }
        tx.commit()
            .await
            .map_err(|e| Ctx::op("delete channel").err(e))
    }

    /// Queues `payload` (event `event_type`) for every channel of team `team_id` that
    /// receives that event type; returns the deliveries queued.
    pub async fn queue_deliveries(
        &self,
        team_id: &str,
        event_type: &str,
        payload: &str,
    ) -> Result<Vec<Delivery>, DbError> {
        let op = "queue deliveries";
        let mut out = Vec::new();
        for c in self.list_channels(team_id).await? {
            if !c.event_types.iter().any(|t| t == event_type) {
                continue;
            }
            let t = to_db(now());
            let row = sqlx::query(&format!(
                "INSERT INTO channel_deliveries ({DELIVERY_COLS}) \
                 VALUES ($1, $2, $3, $4, $5, 'pending', 0, NULL, NULL, $6, $6, NULL) \
                 RETURNING {DELIVERY_COLS}"
            ))
            .bind(new_id(prefix::DELIVERY))
            .bind(&c.id)
            .bind(team_id)
            .bind(event_type)
            .bind(payload)
            .bind(t)
            .fetch_optional(self.pool())
            .await
            .map_err(|e| Ctx::op(op).err(e))?;
            // A channel deleted meanwhile takes its deliveries with it.
            if let Some(row) = row {
                out.push(read(op, &row, delivery)?);
            }
        }
        Ok(out)
    }

    /// Claims the oldest due pending delivery for `lease` (no other dispatcher takes it
    /// until then), with its channel.
    pub async fn claim_delivery(
        &self,
        lease: std::time::Duration,
    ) -> Result<Option<(Delivery, Channel)>, DbError> {
        let op = "claim delivery";
        loop {
            let t = to_db(now());
            let next = sqlx::query(
                "SELECT id FROM channel_deliveries WHERE status = 'pending' AND next_at <= $1 \
                 AND (lease_until IS NULL OR lease_until <= $1) ORDER BY next_at, id LIMIT 1",
            )
            .bind(t)
            .fetch_optional(self.pool())
            .await
            .map_err(|e| Ctx::op(op).err(e))?;
            let Some(next) = next else { return Ok(None) };
            let id = text(&next, "id").map_err(|e| DbError::backend(op, e))?;
            let until = t.saturating_add(i64::try_from(lease.as_micros()).unwrap_or(i64::MAX));
            let row = sqlx::query(&format!(
                "UPDATE channel_deliveries SET lease_until = $2 WHERE id = $1 \
                 AND status = 'pending' AND (lease_until IS NULL OR lease_until <= $3) \
                 RETURNING {DELIVERY_COLS}"
            ))
            .bind(&id)
            .bind(until)
            .bind(t)
            .fetch_optional(self.pool())
            .await
            .map_err(|e| Ctx::op(op).err(e))?;
            let Some(row) = row else { continue };
            let d = read(op, &row, delivery)?;
            match self.get_channel(&d.team_id, &d.channel_id).await {
                Ok(c) => return Ok(Some((d, c))),
                // Its channel went: so does it.
                Err(e) if e.is_not_found() => {
                    sqlx::query("DELETE FROM channel_deliveries WHERE id = $1")
                        .bind(&d.id)
                        .execute(self.pool())
                        .await
                        .map_err(|e| Ctx::op(op).err(e))?;
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Records an attempt at delivery `id`.
    pub async fn record_attempt(&self, id: &str, a: Attempt) -> Result<Delivery, DbError> {
        let t = now();
        let (status, next_at, delivered) = match (a.ok, a.retry_at) {
            (true, _) => (DeliveryStatus::Delivered, t, Some(to_db(t))),
            (false, Some(at)) => (DeliveryStatus::Pending, at, None),
            (false, None) => (DeliveryStatus::Failed, t, None),
        };
        let row = sqlx::query(&format!(
            "UPDATE channel_deliveries SET status = $2, attempts = attempts + 1, \
             last_error = $3, last_status = $4, next_at = $5, lease_until = NULL, \
             delivered_at = $6 WHERE id = $1 RETURNING {DELIVERY_COLS}"
        ))
        .bind(id)
        .bind(status.as_str())
        .bind(a.error)
        .bind(a.status.map(i64::from))
        .bind(to_db(next_at))
        .bind(delivered)
        .fetch_optional(self.pool())
        .await
        .map_err(|e| Ctx::op("record delivery attempt").err(e))?
        .ok_or(DbError::NotFound { what: "delivery" })?;
        read("record delivery attempt", &row, delivery)
    }

    /// The newest deliveries of team `team_id`'s channel `channel_id`.
    pub async fn list_deliveries(
        &self,
        team_id: &str,
        channel_id: &str,
        limit: u32,
    ) -> Result<Vec<Delivery>, DbError> {
        let rows = sqlx::query(&format!(
            "SELECT {DELIVERY_COLS} FROM channel_deliveries WHERE channel_id = $1 \
             AND team_id = $2 ORDER BY created_at DESC, id DESC LIMIT $3"
        ))
        .bind(channel_id)
        .bind(team_id)
        .bind(i64::from(limit))
        .fetch_all(self.pool())
        .await
        .map_err(|e| Ctx::op("list deliveries").err(e))?;
        rows.iter()
            .map(|r| read("list deliveries", r, delivery))
            .collect()
    }

    /// Forgets finished deliveries created before `before`; returns how many.
    pub async fn expire_deliveries(&self, before: Timestamp) -> Result<u64, DbError> {
        let done = sqlx::query(
            "DELETE FROM channel_deliveries WHERE status <> 'pending' AND created_at < $1",
        )
        .bind(to_db(before))
        .execute(self.pool())
        .await
        .map_err(|e| Ctx::op("expire deliveries").err(e))?;
        Ok(done.rows_affected())
    }
}
