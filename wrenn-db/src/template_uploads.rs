//! Template builds requested in two phases (`template_build_requests`) and the files
//! uploaded for them (`template_uploads`), as E2B's template builder sends them: a
//! request reserves a build id for a name and size, files arrive under the hash the
//! client gave them, and the steps come last, which queues the build.

use crate::builds::{files, insert_build_in, Build, BuildFile, NewBuild};
use crate::error::Ctx;
use crate::id::{new_id, prefix};
use crate::row::{opt_text, text, ts, u32_col, R};
use crate::time::{now, to_db, Timestamp};
use crate::{Db, DbError};

/// A build whose steps have not arrived yet.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BuildRequest {
    /// The id the build will have.
    pub id: String,
    pub team_id: String,
    pub name: String,
    pub vcpus: u32,
    pub memory_mb: u32,
    pub created_by: Option<String>,
    pub created_at: Timestamp,
}

impl Db {
    /// Reserves a build id for template `name` of team `team_id`.
    pub async fn insert_build_request(
        &self,
        team_id: &str,
        name: &str,
        vcpus: u32,
        memory_mb: u32,
        created_by: Option<String>,
    ) -> Result<BuildRequest, DbError> {
        let req = BuildRequest {
            id: new_id(prefix::BUILD),
            team_id: team_id.to_string(),
            name: name.to_string(),
            vcpus,
            memory_mb,
            created_by,
            created_at: now(),
        };
        sqlx::query(
            "INSERT INTO template_build_requests (id, team_id, name, vcpus, memory_mb, \
             created_by, created_at) VALUES ($1, $2, $3, $4, $5, $6, $7)",
        )
        .bind(&req.id)
        .bind(team_id)
        .bind(name)
        .bind(i64::from(vcpus))
        .bind(i64::from(memory_mb))
        .bind(req.created_by.clone())
        .bind(to_db(req.created_at))
        .execute(self.pool())
        .await
        .map_err(|e| Ctx::op("insert build request").missing("team").err(e))?;
        Ok(req)
    }

    /// Team `team_id`'s requested build `id` (not yet queued).
    pub async fn get_build_request(
        &self,
        team_id: &str,
        id: &str,
    ) -> Result<BuildRequest, DbError> {
        let row = sqlx::query(
            "SELECT id, team_id, name, vcpus, memory_mb, created_by, created_at \
             FROM template_build_requests WHERE id = $1 AND team_id = $2",
        )
        .bind(id)
        .bind(team_id)
        .fetch_optional(self.pool())
        .await
        .map_err(|e| Ctx::op("get build request").err(e))?
        .ok_or(DbError::NotFound { what: "build" })?;
        let read = || -> R<BuildRequest> {
            Ok(BuildRequest {
                id: text(&row, "id")?,
                team_id: text(&row, "team_id")?,
                name: text(&row, "name")?,
                vcpus: u32_col(&row, "vcpus")?,
                memory_mb: u32_col(&row, "memory_mb")?,
                created_by: opt_text(&row, "created_by")?,
                created_at: ts(&row, "created_at")?,
            })
        };
        read().map_err(|e| DbError::backend("get build request", e))
    }

    /// Queues requested build `id` with its steps and files: the request becomes a
    /// pending build with the same id, in one transaction (a second start finds no
    /// request: not found).
    pub async fn start_build_request(
        &self,
        team_id: &str,
        id: &str,
        new: NewBuild,
        files: Vec<BuildFile>,
    ) -> Result<Build, DbError> {
        let op = "start build request";
        let mut tx = self.pool().begin().await.map_err(|e| Ctx::op(op).err(e))?;
        let gone = sqlx::query(
            "DELETE FROM template_build_requests WHERE id = $1 AND team_id = $2 RETURNING id",
        )
        .bind(id)
        .bind(team_id)
        .fetch_optional(&mut *tx)
        .await
        .map_err(|e| Ctx::op(op).err(e))?;
        if gone.is_none() {
            return Err(DbError::NotFound { what: "build" });
        }
        let build = insert_build_in(&mut tx, id, team_id, new, files).await?;
        tx.commit().await.map_err(|e| Ctx::op(op).err(e))?;
        Ok(build)
    }

    /// Keeps `files` as team `team_id`'s upload `hash` (replacing an earlier one).
    pub async fn put_template_upload(
        &self,
        team_id: &str,
        hash: &str,
        files: Vec<BuildFile>,
    ) -> Result<(), DbError> {
        let op = "keep template upload";
        let mut tx = self.pool().begin().await.map_err(|e| Ctx::op(op).err(e))?;
        sqlx::query("DELETE FROM template_uploads WHERE team_id = $1 AND hash = $2")
            .bind(team_id)
            .bind(hash)
            .execute(&mut *tx)
            .await
            .map_err(|e| Ctx::op(op).err(e))?;
        let at = to_db(now());
        for f in files {
            sqlx::query(
                "INSERT INTO template_uploads (team_id, hash, path, mode, data, created_at) \
                 VALUES ($1, $2, $3, $4, $5, $6)",
            )
            .bind(team_id)
            .bind(hash)
            .bind(f.path)
            .bind(i64::from(f.mode))
            .bind(f.data)
            .bind(at)
            .execute(&mut *tx)
            .await
            .map_err(|e| Ctx::op(op).missing("team").unique("uploaded file").err(e))?;
        }
        tx.commit().await.map_err(|e| Ctx::op(op).err(e))
    }

    /// Whether team `team_id` has an upload `hash`.
    pub async fn template_upload_present(
        &self,
        team_id: &str,
        hash: &str,
    ) -> Result<bool, DbError> {
        let row = sqlx::query(
            "SELECT 1 AS one FROM template_uploads WHERE team_id = $1 AND hash = $2 LIMIT 1",
        )
        .bind(team_id)
        .bind(hash)
        .fetch_optional(self.pool())
        .await
        .map_err(|e| Ctx::op("find template upload").err(e))?;
        Ok(row.is_some())
    }

    /// The files of team `team_id`'s upload `hash` (none when it has no such upload).
    pub async fn template_upload_files(
        &self,
        team_id: &str,
        hash: &str,
    ) -> Result<Vec<BuildFile>, DbError> {
        let rows = sqlx::query(
            "SELECT path, mode, data FROM template_uploads WHERE team_id = $1 AND hash = $2 \
             ORDER BY path",
        )
        .bind(team_id)
        .bind(hash)
        .fetch_all(self.pool())
        .await
        .map_err(|e| Ctx::op("read template upload").err(e))?;
        files("read template upload", &rows)
    }

    /// Forgets build requests whose steps never came and uploads older than `before`;
    /// returns how many rows went.
    pub async fn expire_template_uploads(&self, before: Timestamp) -> Result<u64, DbError> {
        let op = "expire template uploads";
        let mut n = 0;
        for table in ["template_build_requests", "template_uploads"] {
            n += sqlx::query(&format!("DELETE FROM {table} WHERE created_at < $1"))
                .bind(to_db(before))
                .execute(self.pool())
                .await
                .map_err(|e| Ctx::op(op).err(e))?
                .rows_affected();
        }
        Ok(n)
    }
}
