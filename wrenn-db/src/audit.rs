//! Audit log: one row per mutating action, read newest first with keyset pagination
//! on `(created_at, id)` descending. The id breaks ties between equal timestamps,
//! so pages neither skip nor repeat rows.

use crate::error::Ctx;
use crate::id::{new_id, prefix};
use crate::row::{opt_text, text, ts, R};
use crate::time::{now, to_db, Timestamp};
use crate::{Db, DbError};
use serde_json::Value;
use sqlx::any::AnyRow;

pub const AUDIT_DEFAULT_LIMIT: u32 = 50;
pub const AUDIT_MAX_LIMIT: u32 = 200;

/// Who did it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Actor {
    User {
        id: String,
    },
    ApiKey {
        id: String,
    },
    /// The server itself (auto-pause, reconciliation).
    System,
}

impl Actor {
    pub fn kind(&self) -> &'static str {
        match self {
            Actor::User { .. } => "user",
            Actor::ApiKey { .. } => "api_key",
            Actor::System => "system",
        }
    }

    pub fn id(&self) -> Option<&str> {
        match self {
            Actor::User { id } | Actor::ApiKey { id } => Some(id),
            Actor::System => None,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AuditResult {
    Success,
    Failure,
}

impl AuditResult {
    pub fn as_str(self) -> &'static str {
        match self {
            AuditResult::Success => "success",
            AuditResult::Failure => "failure",
        }
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct AuditEntry {
    pub id: String,
    /// `None` for an event of the platform (see [`Db::insert_platform_audit`]).
    pub team_id: Option<String>,
    pub actor: Actor,
    /// Display name of the actor when it was recorded (user e-mail, key name).
    pub actor_name: Option<String>,
    pub action: String,
    pub resource_type: String,
    pub resource_id: Option<String>,
    pub result: AuditResult,
    pub metadata: Option<Value>,
    pub created_at: Timestamp,
}

#[derive(Clone, Debug, PartialEq)]
pub struct NewAuditEntry {
    pub actor: Actor,
    pub actor_name: Option<String>,
    /// e.g. `capsule.create`, `api_key.delete`.
    pub action: String,
    /// e.g. `capsule`, `snapshot`, `api_key`.
    pub resource_type: String,
    pub resource_id: Option<String>,
    pub result: AuditResult,
    pub metadata: Option<Value>,
    /// `None` = now; set only to import or to test.
    pub created_at: Option<Timestamp>,
}

/// Position after the last row of a page: pass it back as `before`. The API carries it
/// as `next_before` (RFC 3339 with microseconds) and `next_before_id`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AuditCursor {
    pub created_at: Timestamp,
    pub id: String,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AuditQuery {
    pub before: Option<AuditCursor>,
    /// 1..=200; `None` = 50. Values above the maximum are clamped.
    pub limit: Option<u32>,
    pub resource_type: Option<String>,
    pub action: Option<String>,
}

#[derive(Clone, Debug, PartialEq)]
pub struct AuditPage {
    pub items: Vec<AuditEntry>,
    /// Set when more rows follow.
    pub next: Option<AuditCursor>,
}

const COLS: &str = "id, team_id, actor_type, actor_id, actor_name, action, resource_type, \
                    resource_id, result, metadata, created_at";

/// The platform log's columns, shaped as [`COLS`].
const PLATFORM_COLS: &str = "id, NULL AS team_id, actor_type, actor_id, actor_name, action, \
                             resource_type, resource_id, result, metadata, created_at";

/// Whose audit log to read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AuditScope<'a> {
    /// One team's.
    Team(&'a str),
    /// The platform's own events (hosts, refused host credentials).
    Platform,
    /// Every team's and the platform's.
    All,
}

fn entry(row: &AnyRow) -> R<AuditEntry> {
    let kind = text(row, "actor_type")?;
    let actor_id = opt_text(row, "actor_id")?;
    let actor = match (kind.as_str(), actor_id) {
        ("user", Some(id)) => Actor::User { id },
        ("api_key", Some(id)) => Actor::ApiKey { id },
        ("system", _) => Actor::System,
        (other, _) => {
            return Err(crate::row::decode(
                "actor_type",
                format!("bad actor {other:?}"),
            ))
        }
    };
    let result = match text(row, "result")?.as_str() {
        "success" => AuditResult::Success,
        "failure" => AuditResult::Failure,
        other => {
            return Err(crate::row::decode(
                "result",
                format!("unknown result {other:?}"),
            ))
        }
    };
    let metadata = opt_text(row, "metadata")?
        .map(|s| serde_json::from_str(&s))
        .transpose()
        .map_err(|e| crate::row::decode("metadata", e))?;
    Ok(AuditEntry {
        id: text(row, "id")?,
        team_id: opt_text(row, "team_id")?,
        actor,
        actor_name: opt_text(row, "actor_name")?,
        action: text(row, "action")?,
        resource_type: text(row, "resource_type")?,
        resource_id: opt_text(row, "resource_id")?,
        result,
        metadata,
        created_at: ts(row, "created_at")?,
    })
}

impl Db {
    pub async fn insert_audit(
        &self,
        team_id: &str,
        new: NewAuditEntry,
    ) -> Result<AuditEntry, DbError> {
        self.insert_audit_in(Some(team_id), new).await
    }

    /// Records an event of the platform rather than of a team (a host registering,
    /// a host credential refused); platform admins read them.
    pub async fn insert_platform_audit(&self, new: NewAuditEntry) -> Result<AuditEntry, DbError> {
        self.insert_audit_in(None, new).await
    }

    async fn insert_audit_in(
        &self,
        team_id: Option<&str>,
        new: NewAuditEntry,
    ) -> Result<AuditEntry, DbError> {
        if new.action.is_empty() || new.resource_type.is_empty() {
            return Err(DbError::invalid(
                "audit entry",
                "action and resource type are required",
            ));
        }
        // The team, when there is one, is the last column and bind.
        let (table, team_col, team_val, returning) = match team_id {
            Some(_) => ("audit_logs", ", team_id", ", $11", COLS),
            None => ("platform_audit_logs", "", "", PLATFORM_COLS),
        };
        let sql = format!(
            "INSERT INTO {table} (id, actor_type, actor_id, actor_name, action, resource_type, \
             resource_id, result, metadata, created_at{team_col}) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10{team_val}) RETURNING {returning}"
        );
        let mut q = sqlx::query(&sql)
            .bind(new_id(prefix::AUDIT_LOG))
            .bind(new.actor.kind())
            .bind(new.actor.id().map(str::to_owned))
            .bind(new.actor_name)
            .bind(new.action)
            .bind(new.resource_type)
            .bind(new.resource_id)
            .bind(new.result.as_str())
            .bind(new.metadata.map(|m| m.to_string()))
            .bind(to_db(new.created_at.unwrap_or_else(now)));
        if let Some(team) = team_id {
            q = q.bind(team);
        }
        let row = q.fetch_one(self.pool()).await.map_err(|e| {
            Ctx::op("insert audit entry")
                .unique("audit entry")
                .missing("team")
                .err(e)
        })?;
        entry(&row).map_err(|e| DbError::backend("insert audit entry", e))
    }

    /// One page of the team's audit log, newest first.
    pub async fn list_audit(
        &self,
        team_id: &str,
        query: &AuditQuery,
    ) -> Result<AuditPage, DbError> {
        self.list_audit_in(AuditScope::Team(team_id), query).await
    }

    /// One page of the audit log of `scope`, newest first.
    pub async fn list_audit_in(
        &self,
        scope: AuditScope<'_>,
        query: &AuditQuery,
    ) -> Result<AuditPage, DbError> {
        let limit = query
            .limit
            .unwrap_or(AUDIT_DEFAULT_LIMIT)
            .clamp(1, AUDIT_MAX_LIMIT);
        // One row more than asked tells whether another page follows.
        let fetch = i64::from(limit) + 1;
        let (source, team_id) = match scope {
            AuditScope::Team(team) => ("audit_logs".to_string(), Some(team)),
            AuditScope::Platform => (
                format!("(SELECT {PLATFORM_COLS} FROM platform_audit_logs) AS a"),
                None,
            ),
            AuditScope::All => (
                format!(
                    "(SELECT {COLS} FROM audit_logs UNION ALL \
                     SELECT {PLATFORM_COLS} FROM platform_audit_logs) AS a"
                ),
                None,
            ),
        };
        let filters = "($1 IS NULL OR team_id = $1) AND ($2 IS NULL OR resource_type = $2) \
                       AND ($3 IS NULL OR action = $3)";
        let order = "ORDER BY created_at DESC, id DESC LIMIT $4";
        let sql = match &query.before {
            None => format!("SELECT {COLS} FROM {source} WHERE {filters} {order}"),
            Some(_) => format!(
                "SELECT {COLS} FROM {source} WHERE {filters} \
                 AND (created_at < $5 OR (created_at = $5 AND id < $6)) {order}"
            ),
        };
        let mut q = sqlx::query(&sql)
            .bind(team_id)
            .bind(query.resource_type.as_deref())
            .bind(query.action.as_deref())
            .bind(fetch);
        if let Some(c) = &query.before {
            q = q.bind(to_db(c.created_at)).bind(c.id.as_str());
        }
        let rows = q
            .fetch_all(self.pool())
            .await
            .map_err(|e| Ctx::op("list audit entries").err(e))?;
        let mut items = rows
            .iter()
            .map(entry)
            .collect::<R<Vec<_>>>()
            .map_err(|e| DbError::backend("list audit entries", e))?;
        let more = items.len() > limit as usize;
        items.truncate(limit as usize);
        let next = if more {
            items.last().map(|e| AuditCursor {
                created_at: e.created_at,
                id: e.id.clone(),
            })
        } else {
            None
        };
        Ok(AuditPage { items, next })
    }
}
