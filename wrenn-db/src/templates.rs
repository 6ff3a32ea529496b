//! Team templates and snapshots: name unique per team.

use crate::error::Ctx;
use crate::id::{new_id, prefix};
use crate::row::{int, json_map, opt_text, opt_u32, text, ts, R};
use crate::time::{now, to_db, Timestamp};
use crate::{Db, DbError};
use serde_json::{Map, Value};
use sqlx::any::AnyRow;
use wrenn_core::scheduler::HostId;
use wrenn_core::template::TemplateName;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TemplateKind {
    Base,
    Snapshot,
}

impl TemplateKind {
    pub fn as_str(self) -> &'static str {
        match self {
            TemplateKind::Base => "base",
            TemplateKind::Snapshot => "snapshot",
        }
    }

    pub fn parse(s: &str) -> Option<TemplateKind> {
        match s {
            "base" => Some(TemplateKind::Base),
            "snapshot" => Some(TemplateKind::Snapshot),
            _ => None,
        }
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct Template {
    pub id: String,
    pub team_id: String,
    pub name: TemplateName,
    pub kind: TemplateKind,
    /// The capsule a snapshot was taken from.
    pub source_capsule: Option<String>,
    pub vcpus: Option<u32>,
    pub memory_mb: Option<u32>,
    pub size_bytes: u64,
    pub metadata: Map<String, Value>,
    pub created_at: Timestamp,
    /// The host holding a snapshot's files.
    pub host_id: Option<HostId>,
}

#[derive(Clone, Debug, PartialEq)]
pub struct NewTemplate {
    pub name: TemplateName,
    pub kind: TemplateKind,
    pub source_capsule: Option<String>,
    pub vcpus: Option<u32>,
    pub memory_mb: Option<u32>,
    pub size_bytes: u64,
    pub metadata: Map<String, Value>,
    pub host_id: Option<HostId>,
}

const COLS: &str =
    "id, team_id, name, kind, source_capsule, vcpus, memory_mb, size_bytes, metadata, created_at, \
     host_id";

fn template(row: &AnyRow) -> R<Template> {
    let name = text(row, "name")?;
    let kind = text(row, "kind")?;
    Ok(Template {
        id: text(row, "id")?,
        team_id: text(row, "team_id")?,
        name: TemplateName::parse(&name).map_err(|e| crate::row::decode("name", e))?,
        kind: TemplateKind::parse(&kind)
            .ok_or_else(|| crate::row::decode("kind", format!("unknown kind {kind:?}")))?,
        source_capsule: opt_text(row, "source_capsule")?,
        vcpus: opt_u32(row, "vcpus")?,
        memory_mb: opt_u32(row, "memory_mb")?,
        size_bytes: u64::try_from(int(row, "size_bytes")?)
            .map_err(|e| crate::row::decode("size_bytes", e))?,
        metadata: json_map(row, "metadata")?,
        created_at: ts(row, "created_at")?,
        host_id: opt_text(row, "host_id")?.map(HostId),
    })
}

fn one(op: &'static str, row: Option<AnyRow>) -> Result<Template, DbError> {
    let row = row.ok_or(DbError::NotFound { what: "template" })?;
    template(&row).map_err(|e| DbError::backend(op, e))
}

impl Db {
    /// Hosts holding a copy of template `template_id` (besides its own host).
    pub async fn template_copies(&self, template_id: &str) -> Result<Vec<HostId>, DbError> {
        let rows = sqlx::query(
            "SELECT host_id FROM template_copies WHERE template_id = $1 ORDER BY host_id",
        )
        .bind(template_id)
        .fetch_all(self.pool())
        .await
        .map_err(|e| Ctx::op("list template copies").err(e))?;
        rows.iter()
            .map(|r| text(r, "host_id").map(HostId))
            .collect::<R<Vec<_>>>()
            .map_err(|e| DbError::backend("list template copies", e))
    }

    /// Records that host `host` holds a copy of template `template_id`.
    pub async fn add_template_copy(&self, template_id: &str, host: &HostId) -> Result<(), DbError> {
        sqlx::query(
            "INSERT INTO template_copies (template_id, host_id) VALUES ($1, $2) \
             ON CONFLICT (template_id, host_id) DO NOTHING",
        )
        .bind(template_id)
        .bind(host.0.as_str())
        .execute(self.pool())
        .await
        .map_err(|e| Ctx::op("record template copy").err(e))?;
        Ok(())
    }

    /// Forgets host `host`'s copy of template `template_id` (its files are gone).
    pub async fn remove_template_copy(
        &self,
        template_id: &str,
        host: &HostId,
    ) -> Result<(), DbError> {
        sqlx::query("DELETE FROM template_copies WHERE template_id = $1 AND host_id = $2")
            .bind(template_id)
            .bind(host.0.as_str())
            .execute(self.pool())
            .await
            .map_err(|e| Ctx::op("forget template copy").err(e))?;
        Ok(())
    }

    /// Records a template of the team. Conflict "template name" if the team has one
    /// by that name.
    pub async fn insert_template(
        &self,
        team_id: &str,
        new: NewTemplate,
    ) -> Result<Template, DbError> {
        let size = i64::try_from(new.size_bytes)
            .map_err(|_| DbError::invalid("size_bytes", "too large"))?;
        let row = sqlx::query(&format!(
            "INSERT INTO templates (id, team_id, name, kind, source_capsule, vcpus, memory_mb, \
             size_bytes, metadata, created_at, host_id) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11) \
             RETURNING {COLS}"
        ))
        .bind(new_id(prefix::TEMPLATE))
        .bind(team_id)
        .bind(new.name.as_str())
        .bind(new.kind.as_str())
        .bind(new.source_capsule)
        .bind(new.vcpus.map(i64::from))
        .bind(new.memory_mb.map(i64::from))
        .bind(size)
        .bind(Value::Object(new.metadata).to_string())
        .bind(to_db(now()))
        .bind(new.host_id.map(|h| h.0))
        .fetch_optional(self.pool())
        .await
        .map_err(|e| {
            Ctx::op("insert template")
                .unique("template name")
                .missing("team")
                .err(e)
        })?;
        one("insert template", row)
    }

    pub async fn get_template(&self, team_id: &str, name: &str) -> Result<Template, DbError> {
        let row = sqlx::query(&format!(
            "SELECT {COLS} FROM templates WHERE team_id = $1 AND name = $2"
        ))
        .bind(team_id)
        .bind(name)
        .fetch_optional(self.pool())
        .await
        .map_err(|e| Ctx::op("get template").err(e))?;
        one("get template", row)
    }

    /// The team's templates by name, optionally of one kind.
    /// Every team's templates (platform admins), by team and name.
    pub async fn admin_templates(&self) -> Result<Vec<Template>, DbError> {
        let rows = sqlx::query(&format!(
            "SELECT {COLS} FROM templates ORDER BY team_id, name"
        ))
        .fetch_all(self.pool())
        .await
        .map_err(|e| Ctx::op("list every template").err(e))?;
        rows.iter()
            .map(template)
            .collect::<R<Vec<_>>>()
            .map_err(|e| DbError::backend("list every template", e))
    }

    pub async fn list_templates(
        &self,
        team_id: &str,
        kind: Option<TemplateKind>,
    ) -> Result<Vec<Template>, DbError> {
        let rows = sqlx::query(&format!(
            "SELECT {COLS} FROM templates WHERE team_id = $1 AND ($2 IS NULL OR kind = $2) \
             ORDER BY name"
        ))
        .bind(team_id)
        .bind(kind.map(TemplateKind::as_str))
        .fetch_all(self.pool())
        .await
        .map_err(|e| Ctx::op("list templates").err(e))?;
        rows.iter()
            .map(template)
            .collect::<R<Vec<_>>>()
            .map_err(|e| DbError::backend("list templates", e))
    }

    /// Replaces the team's template `new.name` with `new` in one statement (same id, new
    /// contents and creation time); returns the old row, whose files the caller then
    /// removes. NotFound if the team has no template by that name.
    pub async fn replace_template(
        &self,
        team_id: &str,
        new: NewTemplate,
    ) -> Result<(Template, Template), DbError> {
        let size = i64::try_from(new.size_bytes)
            .map_err(|_| DbError::invalid("size_bytes", "too large"))?;
        let mut tx = self
            .pool()
            .begin()
            .await
            .map_err(|e| Ctx::op("replace template").err(e))?;
        let old = sqlx::query(&format!(
            "SELECT {COLS} FROM templates WHERE team_id = $1 AND name = $2"
        ))
        .bind(team_id)
        .bind(new.name.as_str())
        .fetch_optional(&mut *tx)
        .await
        .map_err(|e| Ctx::op("replace template").err(e))?;
        let old = one("replace template", old)?;
        let row = sqlx::query(&format!(
            "UPDATE templates SET kind = $1, source_capsule = $2, vcpus = $3, memory_mb = $4, \
             size_bytes = $5, metadata = $6, created_at = $7, host_id = $10 \
             WHERE team_id = $8 AND name = $9 \
             RETURNING {COLS}"
        ))
        .bind(new.kind.as_str())
        .bind(new.source_capsule)
        .bind(new.vcpus.map(i64::from))
        .bind(new.memory_mb.map(i64::from))
        .bind(size)
        .bind(Value::Object(new.metadata).to_string())
        .bind(to_db(now()))
        .bind(team_id)
        .bind(new.name.as_str())
        .bind(new.host_id.map(|h| h.0))
        .fetch_optional(&mut *tx)
        .await
        .map_err(|e| Ctx::op("replace template").err(e))?;
        let row = one("replace template", row)?;
        tx.commit()
            .await
            .map_err(|e| Ctx::op("replace template").err(e))?;
        Ok((old, row))
    }

    /// Deletes the row and returns it (the caller then removes the files).
    pub async fn delete_template(&self, team_id: &str, name: &str) -> Result<Template, DbError> {
        let row = sqlx::query(&format!(
            "DELETE FROM templates WHERE team_id = $1 AND name = $2 RETURNING {COLS}"
        ))
        .bind(team_id)
        .bind(name)
        .fetch_optional(self.pool())
        .await
        .map_err(|e| Ctx::op("delete template").err(e))?;
        one("delete template", row)
    }
}
