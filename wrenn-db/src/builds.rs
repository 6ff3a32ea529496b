//! Template builds (`template_builds`), their log lines and uploaded files.

use crate::error::Ctx;
use crate::id::{new_id, prefix};
use crate::row::{boolean, int, json_map, opt_text, opt_ts, text, ts, u32_col, R};
use crate::time::{now, to_db, Timestamp};
use crate::{Db, DbError};
use serde_json::{Map, Value};
use sqlx::any::AnyRow;
use sqlx::Row;

/// Where a build is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BuildStatus {
    /// Queued for a worker.
    Pending,
    /// A worker runs it.
    Running,
    /// Its template exists.
    Success,
    Failed,
    Cancelled,
}

impl BuildStatus {
    pub const ALL: [BuildStatus; 5] = [
        BuildStatus::Pending,
        BuildStatus::Running,
        BuildStatus::Success,
        BuildStatus::Failed,
        BuildStatus::Cancelled,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            BuildStatus::Pending => "pending",
            BuildStatus::Running => "running",
            BuildStatus::Success => "success",
            BuildStatus::Failed => "failed",
            BuildStatus::Cancelled => "cancelled",
        }
    }

    pub fn parse(s: &str) -> Option<BuildStatus> {
        Self::ALL.into_iter().find(|b| b.as_str() == s)
    }

    /// The build will not change any more.
    pub fn is_final(self) -> bool {
        matches!(
            self,
            BuildStatus::Success | BuildStatus::Failed | BuildStatus::Cancelled
        )
    }
}

/// A build's row.
#[derive(Clone, Debug, PartialEq)]
pub struct Build {
    pub id: String,
    pub team_id: String,
    /// The template it makes.
    pub name: String,
    pub base_template: String,
    /// The steps as written, one instruction each.
    pub recipe: Vec<String>,
    pub healthcheck: Option<String>,
    pub vcpus: u32,
    pub memory_mb: u32,
    pub skip_pre_post: bool,
    /// Time limit of the whole build.
    pub timeout_sec: u32,
    pub status: BuildStatus,
    /// Steps done (pre- and post-build phases excluded).
    pub current_step: u32,
    pub total_steps: u32,
    pub error: Option<String>,
    /// The capsule it runs in, while it runs.
    pub capsule_id: Option<String>,
    pub host_id: Option<String>,
    /// The template row it made.
    pub template_id: Option<String>,
    pub default_user: Option<String>,
    pub default_env: Map<String, Value>,
    pub metadata: Map<String, Value>,
    pub created_by: Option<String>,
    pub created_at: Timestamp,
    pub started_at: Option<Timestamp>,
    pub completed_at: Option<Timestamp>,
    pub cancel_requested: bool,
}

/// A build to queue.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct NewBuild {
    pub name: String,
    pub base_template: String,
    pub recipe: Vec<String>,
    pub healthcheck: Option<String>,
    pub vcpus: u32,
    pub memory_mb: u32,
    pub skip_pre_post: bool,
    pub timeout_sec: u32,
    pub metadata: Map<String, Value>,
    pub created_by: Option<String>,
}

/// A file uploaded with a build, for its `COPY` steps.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BuildFile {
    /// Relative path inside the upload (`/`-separated, no `..`).
    pub path: String,
    /// Unix permission bits.
    pub mode: u32,
    pub data: Vec<u8>,
}

/// Which output a log line came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogStream {
    Stdout,
    Stderr,
    /// The builder's own lines (phase and step headers, errors).
    System,
}

impl LogStream {
    pub fn as_str(self) -> &'static str {
        match self {
            LogStream::Stdout => "stdout",
            LogStream::Stderr => "stderr",
            LogStream::System => "system",
        }
    }
}

/// One line of a build's log.
#[derive(Clone, Debug, PartialEq)]
pub struct BuildLog {
    /// 0-based position in the build's log.
    pub seq: u64,
    /// The step it belongs to (1-based; 0 = before the steps).
    pub step: u32,
    pub stream: LogStream,
    pub line: String,
    pub created_at: Timestamp,
}

const COLS: &str = "id, team_id, name, base_template, recipe, healthcheck, vcpus, memory_mb, \
                    skip_pre_post, timeout_sec, status, current_step, total_steps, error, \
                    capsule_id, host_id, template_id, default_user, default_env, metadata, \
                    created_by, created_at, started_at, completed_at, cancel_requested";

fn build(row: &AnyRow) -> R<Build> {
    let status = text(row, "status")?;
    let recipe = text(row, "recipe")?;
    let map = |col: &str| -> R<Map<String, Value>> {
        match opt_text(row, col)? {
            Some(_) => json_map(row, col),
            None => Ok(Map::new()),
        }
    };
    Ok(Build {
        id: text(row, "id")?,
        team_id: text(row, "team_id")?,
        name: text(row, "name")?,
        base_template: text(row, "base_template")?,
        recipe: serde_json::from_str(&recipe).map_err(|e| crate::row::decode("recipe", e))?,
        healthcheck: opt_text(row, "healthcheck")?,
        vcpus: u32_col(row, "vcpus")?,
        memory_mb: u32_col(row, "memory_mb")?,
        skip_pre_post: boolean(row, "skip_pre_post")?,
        timeout_sec: u32_col(row, "timeout_sec")?,
        status: BuildStatus::parse(&status).ok_or_else(|| {
            crate::row::decode("status", format!("unknown build status {status:?}"))
        })?,
        current_step: u32_col(row, "current_step")?,
        total_steps: u32_col(row, "total_steps")?,
        error: opt_text(row, "error")?,
        capsule_id: opt_text(row, "capsule_id")?,
        host_id: opt_text(row, "host_id")?,
        template_id: opt_text(row, "template_id")?,
        default_user: opt_text(row, "default_user")?,
        default_env: map("default_env")?,
        metadata: map("metadata")?,
        created_by: opt_text(row, "created_by")?,
        created_at: ts(row, "created_at")?,
        started_at: opt_ts(row, "started_at")?,
        completed_at: opt_ts(row, "completed_at")?,
        cancel_requested: boolean(row, "cancel_requested")?,
    })
}

fn one(op: &'static str, row: Option<AnyRow>) -> Result<Build, DbError> {
    let row = row.ok_or(DbError::NotFound { what: "build" })?;
    build(&row).map_err(|e| DbError::backend(op, e))
}

fn many(op: &'static str, rows: Vec<AnyRow>) -> Result<Vec<Build>, DbError> {
    rows.iter()
        .map(build)
        .collect::<R<Vec<_>>>()
        .map_err(|e| DbError::backend(op, e))
}

/// How a build ended.
#[derive(Clone, Debug, PartialEq)]
pub struct BuildEnd {
    pub status: BuildStatus,
    pub error: Option<String>,
    pub template_id: Option<String>,
    pub default_user: Option<String>,
    pub default_env: Map<String, Value>,
}

impl Db {
    /// Queues a build of team `team_id` with the files its `COPY` steps use.
    pub async fn insert_build(
        &self,
        team_id: &str,
        new: NewBuild,
        files: Vec<BuildFile>,
    ) -> Result<Build, DbError> {
        let op = "insert build";
        let mut tx = self.pool().begin().await.map_err(|e| Ctx::op(op).err(e))?;
        let row = insert_build_in(&mut tx, &new_id(prefix::BUILD), team_id, new, files).await?;
        tx.commit().await.map_err(|e| Ctx::op(op).err(e))?;
        Ok(row)
    }

    /// Build `id`, of team `team_id` (any team's with `None`).
    pub async fn get_build(&self, team_id: Option<&str>, id: &str) -> Result<Build, DbError> {
        let row = sqlx::query(&format!(
            "SELECT {COLS} FROM template_builds WHERE id = $1 AND ($2 IS NULL OR team_id = $2)"
        ))
        .bind(id)
        .bind(team_id)
        .fetch_optional(self.pool())
        .await
        .map_err(|e| Ctx::op("get build").err(e))?;
        one("get build", row)
    }

    /// Builds of team `team_id` (of every team with `None`), newest first.
    pub async fn list_builds(
        &self,
        team_id: Option<&str>,
        limit: u32,
    ) -> Result<Vec<Build>, DbError> {
        let rows = sqlx::query(&format!(
            "SELECT {COLS} FROM template_builds WHERE ($1 IS NULL OR team_id = $1) \
             ORDER BY created_at DESC, id DESC LIMIT $2"
        ))
        .bind(team_id)
        .bind(i64::from(limit))
        .fetch_all(self.pool())
        .await
        .map_err(|e| Ctx::op("list builds").err(e))?;
        many("list builds", rows)
    }

    /// Takes the oldest queued build for a worker (`pending` → `running`): of workers
    /// racing for one, on any server of the database, one gets it.
    pub async fn claim_build(&self) -> Result<Option<Build>, DbError> {
        let op = "claim build";
        loop {
            let next = sqlx::query(
                "SELECT id FROM template_builds WHERE status = 'pending' \
                 ORDER BY created_at, id LIMIT 1",
            )
            .fetch_optional(self.pool())
            .await
            .map_err(|e| Ctx::op(op).err(e))?;
            let Some(next) = next else { return Ok(None) };
            let id: String = next.try_get("id").map_err(|e| DbError::backend(op, e))?;
            let t = to_db(now());
            let row = sqlx::query(&format!(
                "UPDATE template_builds SET status = 'running', started_at = $2, heartbeat_at = $2 \
                 WHERE id = $1 AND status = 'pending' RETURNING {COLS}"
            ))
            .bind(&id)
            .bind(t)
            .fetch_optional(self.pool())
            .await
            .map_err(|e| Ctx::op(op).err(e))?;
            if let Some(row) = row {
                return one(op, Some(row)).map(Some);
            }
            // Another worker took it, or it was cancelled: look again.
        }
    }

    /// Records a running build's progress (and that its worker is alive).
    pub async fn build_progress(
        &self,
        id: &str,
        current_step: u32,
        capsule: Option<(&str, &str)>,
    ) -> Result<(), DbError> {
        sqlx::query(
            "UPDATE template_builds SET current_step = $2, heartbeat_at = $3, \
             capsule_id = COALESCE($4, capsule_id), host_id = COALESCE($5, host_id) \
             WHERE id = $1",
        )
        .bind(id)
        .bind(i64::from(current_step))
        .bind(to_db(now()))
        .bind(capsule.map(|c| c.0))
        .bind(capsule.map(|c| c.1))
        .execute(self.pool())
        .await
        .map_err(|e| Ctx::op("record build progress").err(e))?;
        Ok(())
    }

    /// Records that a running build's worker is alive.
    pub async fn touch_build(&self, id: &str) -> Result<(), DbError> {
        sqlx::query("UPDATE template_builds SET heartbeat_at = $2 WHERE id = $1")
            .bind(id)
            .bind(to_db(now()))
            .execute(self.pool())
            .await
            .map_err(|e| Ctx::op("touch build").err(e))?;
        Ok(())
    }

    /// Ends a running (or queued) build; its uploaded files go. False if it had
    /// already ended.
    pub async fn finish_build(&self, id: &str, end: BuildEnd) -> Result<bool, DbError> {
        let op = "finish build";
        let mut tx = self.pool().begin().await.map_err(|e| Ctx::op(op).err(e))?;
        let done = sqlx::query(
            "UPDATE template_builds SET status = $2, error = $3, template_id = $4, \
             default_user = $5, default_env = $6, completed_at = $7, capsule_id = NULL \
             WHERE id = $1 AND status IN ('pending', 'running')",
        )
        .bind(id)
        .bind(end.status.as_str())
        .bind(end.error)
        .bind(end.template_id)
        .bind(end.default_user)
        .bind(Value::Object(end.default_env).to_string())
        .bind(to_db(now()))
        .execute(&mut *tx)
        .await
        .map_err(|e| Ctx::op(op).err(e))?
        .rows_affected()
            == 1;
        sqlx::query("DELETE FROM template_build_files WHERE build_id = $1")
            .bind(id)
            .execute(&mut *tx)
            .await
            .map_err(|e| Ctx::op(op).err(e))?;
        tx.commit().await.map_err(|e| Ctx::op(op).err(e))?;
        Ok(done)
    }

    /// Cancels build `id` of team `team_id` (any team's with `None`): a queued one at
    /// once, a running one by asking its worker. Returns the build as it now is.
    pub async fn cancel_build(&self, team_id: Option<&str>, id: &str) -> Result<Build, DbError> {
        let b = self.get_build(team_id, id).await?;
        match b.status {
            BuildStatus::Pending => {
                self.finish_build(
                    id,
                    BuildEnd {
                        status: BuildStatus::Cancelled,
                        error: Some("cancelled before it started".into()),
                        template_id: None,
                        default_user: None,
                        default_env: Map::new(),
                    },
                )
                .await?;
            }
            BuildStatus::Running => {
                sqlx::query("UPDATE template_builds SET cancel_requested = 1 WHERE id = $1")
                    .bind(id)
                    .execute(self.pool())
                    .await
                    .map_err(|e| Ctx::op("cancel build").err(e))?;
            }
            _ => {}
        }
        self.get_build(team_id, id).await
    }

    /// Running builds whose worker has not been heard from since `before`.
    pub async fn stale_builds(&self, before: Timestamp) -> Result<Vec<Build>, DbError> {
        let rows = sqlx::query(&format!(
            "SELECT {COLS} FROM template_builds WHERE status = 'running' \
             AND (heartbeat_at IS NULL OR heartbeat_at < $1)"
        ))
        .bind(to_db(before))
        .fetch_all(self.pool())
        .await
        .map_err(|e| Ctx::op("list stale builds").err(e))?;
        many("list stale builds", rows)
    }

    /// Appends lines to build `id`'s log, from position `seq` on.
    pub async fn append_build_logs(
        &self,
        id: &str,
        seq: u64,
        lines: &[(u32, LogStream, String)],
    ) -> Result<(), DbError> {
        let t = to_db(now());
        let mut tx = self
            .pool()
            .begin()
            .await
            .map_err(|e| Ctx::op("append build log").err(e))?;
        for (i, (step, stream, line)) in lines.iter().enumerate() {
            sqlx::query(
                "INSERT INTO template_build_logs (build_id, seq, step, stream, line, created_at) \
                 VALUES ($1, $2, $3, $4, $5, $6)",
            )
            .bind(id)
            .bind(i64::try_from(seq + i as u64).unwrap_or(i64::MAX))
            .bind(i64::from(*step))
            .bind(stream.as_str())
            .bind(line)
            .bind(t)
            .execute(&mut *tx)
            .await
            .map_err(|e| Ctx::op("append build log").err(e))?;
        }
        tx.commit()
            .await
            .map_err(|e| Ctx::op("append build log").err(e))?;
        Ok(())
    }

    /// Up to `limit` lines of build `id`'s log from position `offset`.
    pub async fn build_logs(
        &self,
        id: &str,
        offset: u64,
        limit: u32,
    ) -> Result<Vec<BuildLog>, DbError> {
        let rows = sqlx::query(
            "SELECT seq, step, stream, line, created_at FROM template_build_logs \
             WHERE build_id = $1 AND seq >= $2 ORDER BY seq LIMIT $3",
        )
        .bind(id)
        .bind(i64::try_from(offset).unwrap_or(i64::MAX))
        .bind(i64::from(limit))
        .fetch_all(self.pool())
        .await
        .map_err(|e| Ctx::op("read build log").err(e))?;
        log_lines(&rows)
    }

    /// The last `n` lines of build `id`'s log, in order.
    pub async fn build_log_tail(&self, id: &str, n: u32) -> Result<Vec<BuildLog>, DbError> {
        let rows = sqlx::query(
            "SELECT seq, step, stream, line, created_at FROM template_build_logs \
             WHERE build_id = $1 ORDER BY seq DESC LIMIT $2",
        )
        .bind(id)
        .bind(i64::from(n))
        .fetch_all(self.pool())
        .await
        .map_err(|e| Ctx::op("read build log").err(e))?;
        let mut lines = log_lines(&rows)?;
        lines.reverse();
        Ok(lines)
    }

    /// The files uploaded with build `id`.
    pub async fn build_files(&self, id: &str) -> Result<Vec<BuildFile>, DbError> {
        let rows = sqlx::query(
            "SELECT path, mode, data FROM template_build_files WHERE build_id = $1 ORDER BY path",
        )
        .bind(id)
        .fetch_all(self.pool())
        .await
        .map_err(|e| Ctx::op("read build files").err(e))?;
        files("read build files", &rows)
    }
}

/// Files from rows of `path`, `mode` and `data`.
pub(crate) fn files(op: &'static str, rows: &[AnyRow]) -> Result<Vec<BuildFile>, DbError> {
    rows.iter()
        .map(|r| {
            Ok(BuildFile {
                path: text(r, "path")?,
                mode: u32_col(r, "mode")?,
                data: r.try_get("data")?,
            })
        })
        .collect::<R<Vec<_>>>()
        .map_err(|e| DbError::backend(op, e))
}

/// Inserts a pending build with id `id` and its files, in `tx`.
pub(crate) async fn insert_build_in(
    tx: &mut sqlx::Transaction<'_, sqlx::Any>,
    id: &str,
    team_id: &str,
    new: NewBuild,
    files: Vec<BuildFile>,
) -> Result<Build, DbError> {
    let op = "insert build";
    let row = sqlx::query(&format!(
        "INSERT INTO template_builds (id, team_id, name, base_template, recipe, healthcheck, \
         vcpus, memory_mb, skip_pre_post, timeout_sec, status, current_step, total_steps, \
         metadata, created_by, created_at) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, 'pending', 0, $11, $12, $13, $14) \
         RETURNING {COLS}"
    ))
    .bind(id)
    .bind(team_id)
    .bind(&new.name)
    .bind(&new.base_template)
    .bind(Value::from(new.recipe.clone()).to_string())
    .bind(new.healthcheck)
    .bind(i64::from(new.vcpus))
    .bind(i64::from(new.memory_mb))
    .bind(i64::from(new.skip_pre_post))
    .bind(i64::from(new.timeout_sec))
    .bind(i64::try_from(new.recipe.len()).unwrap_or(i64::MAX))
    .bind(Value::Object(new.metadata).to_string())
    .bind(new.created_by)
    .bind(to_db(now()))
    .fetch_optional(&mut **tx)
    .await
    .map_err(|e| Ctx::op(op).missing("team").err(e))?;
    for f in files {
        sqlx::query(
            "INSERT INTO template_build_files (build_id, path, mode, data) VALUES ($1, $2, $3, $4)",
        )
        .bind(id)
        .bind(f.path)
        .bind(i64::from(f.mode))
        .bind(f.data)
        .execute(&mut **tx)
        .await
        .map_err(|e| Ctx::op(op).unique("build file").err(e))?;
    }
    one(op, row)
}

fn log_lines(rows: &[AnyRow]) -> Result<Vec<BuildLog>, DbError> {
    rows.iter()
        .map(|r| {
            let stream = text(r, "stream")?;
            Ok(BuildLog {
                seq: u64::try_from(int(r, "seq")?).unwrap_or(0),
                step: u32_col(r, "step")?,
                stream: match stream.as_str() {
                    "stdout" => LogStream::Stdout,
                    "stderr" => LogStream::Stderr,
                    _ => LogStream::System,
                },
                line: text(r, "line")?,
                created_at: ts(r, "created_at")?,
            })
        })
        .collect::<R<Vec<_>>>()
        .map_err(|e| DbError::backend("read build log", e))
}
