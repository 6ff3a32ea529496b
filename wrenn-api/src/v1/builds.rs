//! `/v1/builds`: template builds from recipes (the team's), and `/v1/admin/builds`
//! (every team's, for platform admins).

use crate::auth::{Auth, Principal};
use crate::error::{json_rejection, ApiError, ApiResult, ErrorBody};
use crate::service;
use crate::state::AppState;
use axum::extract::rejection::QueryRejection;
use axum::extract::{FromRequest, Multipart, Path, Query, Request, State};
use axum::http::{header, StatusCode};
use axum::Json;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use std::collections::HashMap;
use std::io::Read;
use std::sync::Arc;
use utoipa::{IntoParams, ToSchema};
use wrenn_db::{Build, BuildFile, NewBuild};

type S = State<Arc<AppState>>;

/// Longest a build may be given.
const MAX_BUILD_TIMEOUT: u32 = 6 * 3600;
/// Most files one build may upload.
const MAX_FILES: usize = 10_000;
/// Log lines a build's view carries (the logs route pages through all of them).
const VIEW_LOG_LINES: u32 = 1000;

/// A build to queue.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateBuild {
    /// The template it makes (an existing one of the team is replaced when the build
    /// succeeds).
    pub name: String,
    /// The template it starts from (default `minimal`; not with `base_image`).
    #[serde(default)]
    pub base_template: Option<String>,
    /// A container image it starts from instead of a template: `registry/name:tag` or
    /// `name@sha256:…`, pulled for linux/amd64. Its layers become the root
    /// filesystem (Wrenn's init, envd and the `user` account are added); its `ENV`,
    /// `WORKDIR` and `USER` are where the steps start and the template's defaults.
    #[serde(default)]
    pub base_image: Option<String>,
    /// Credentials of `base_image`'s registry (kept sealed until the build pulls).
    #[serde(default)]
    pub registry: Option<RegistryLogin>,
    /// The steps, one instruction each: `RUN [--timeout=<dur>] <sh>`, `ENV K=V…`,
    /// `WORKDIR <path>`, `USER <name>`, `COPY <src…> <dst>`, `START <sh>`.
    #[serde(default)]
    pub recipe: Vec<String>,
    /// Readiness check of the start commands: `[--interval=3s] [--timeout=10s]
    /// [--start-period=0s] [--retries=0] (--port=<port> | <sh>)`.
    pub healthcheck: Option<String>,
    /// vCPUs of the build's capsule, and so of a snapshot result (default: the base
    /// template's, so the build's capsule restores from its snapshot; else 1).
    #[schema(minimum = 1, maximum = 8)]
    pub vcpus: Option<u32>,
    /// Memory of the build's capsule in MiB (default: the base template's, else 1024).
    #[schema(minimum = 128, maximum = 16384)]
    pub memory_mb: Option<u32>,
    /// Skip the pre-build (package index update) and post-build (cleanup) phases.
    #[serde(default)]
    pub skip_pre_post: bool,
    /// Time limit of the whole build (default 1800 s); past it the build is cancelled.
    #[schema(minimum = 1, maximum = 21600)]
    pub timeout_sec: Option<u32>,
    /// What the build saves: `snapshot` (default; memory and disk, so a create
    /// restores it with its start commands running) or `disk` (the disk alone,
    /// flattened and sparse: capsules boot it fresh; no `START` or readiness check).
    #[serde(default)]
    pub result: Option<String>,
}

/// A registry's username and password (or token).
#[derive(Clone, Deserialize, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RegistryLogin {
    pub username: String,
    pub password: String,
}

impl std::fmt::Debug for RegistryLogin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RegistryLogin")
            .field("username", &self.username)
            .field("password", &"<redacted>")
            .finish()
    }
}

/// Multipart form of `POST /v1/builds`: the JSON `config`, and the files its `COPY`
/// steps use as a tar or tar.gz `archive`.
#[derive(Debug, ToSchema)]
#[allow(dead_code)]
pub struct BuildForm {
    config: CreateBuild,
    #[schema(format = Binary, content_media_type = "application/octet-stream")]
    archive: String,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct BuildLogView {
    /// Position in the build's log (0-based).
    pub seq: u64,
    /// The step it belongs to (1-based; 0 before the steps, total + 1 after them).
    pub step: u32,
    /// stdout, stderr or system (the builder's own lines).
    pub stream: String,
    pub line: String,
    pub created_at: chrono::DateTime<chrono::Utc>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct BuildView {
    pub id: String,
    pub name: String,
    /// The template it starts from, or the image (`base_image`).
    pub base_template: String,
    /// The container image it starts from.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub base_image: Option<String>,
    pub recipe: Vec<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub healthcheck: Option<String>,
    pub vcpus: u32,
    pub memory_mb: u32,
    pub skip_pre_post: bool,
    pub timeout_sec: u32,
    /// pending (queued), running, success (the template exists), failed or cancelled.
    pub status: String,
    /// Steps done.
    pub current_step: u32,
    pub total_steps: u32,
    /// The log's first lines (all of them through `GET /v1/builds/{id}/logs`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub logs: Option<Vec<BuildLogView>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// The capsule it runs in, while it runs.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sandbox_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub host_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub default_user: Option<String>,
    pub default_env: HashMap<String, String>,
    /// A platform template's build (`POST /v1/admin/builds`): every team may create
    /// capsules from what it makes.
    pub platform: bool,
    /// `snapshot` or `disk` (see the request).
    pub result: String,
    pub team_id: String,
    pub created_at: chrono::DateTime<chrono::Utc>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub started_at: Option<chrono::DateTime<chrono::Utc>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub completed_at: Option<chrono::DateTime<chrono::Utc>>,
}

fn log_view(l: wrenn_db::BuildLog) -> BuildLogView {
    BuildLogView {
        seq: l.seq,
        step: l.step,
        stream: l.stream.as_str().into(),
        line: l.line,
        created_at: l.created_at,
    }
}

fn view(b: Build, logs: Option<Vec<wrenn_db::BuildLog>>) -> BuildView {
    let platform = crate::builds::is_platform(&b);
    let base_image = crate::builds::is_image(&b).then(|| b.base_template.clone());
    let result = crate::builds::result_kind(&b).to_string();
    BuildView {
        id: b.id,
        name: b.name,
        base_template: b.base_template,
        base_image,
        recipe: b.recipe,
        healthcheck: b.healthcheck,
        vcpus: b.vcpus,
        memory_mb: b.memory_mb,
        skip_pre_post: b.skip_pre_post,
        timeout_sec: b.timeout_sec,
        status: b.status.as_str().into(),
        current_step: b.current_step,
        total_steps: b.total_steps,
        logs: logs.map(|l| l.into_iter().map(log_view).collect()),
        error: b.error,
        sandbox_id: b.capsule_id,
        host_id: b.host_id,
        default_user: b.default_user,
        default_env: b
            .default_env
            .into_iter()
            .filter_map(|(k, v)| Some((k, v.as_str()?.to_string())))
            .collect(),
        platform,
        result,
        team_id: b.team_id,
        created_at: b.created_at,
        started_at: b.started_at,
        completed_at: b.completed_at,
    }
}

/// Reads a tar or tar.gz archive of build files.
pub(crate) fn read_archive(data: &[u8]) -> ApiResult<Vec<BuildFile>> {
    if data.starts_with(b"PK\x03\x04") {
        return Err(ApiError::invalid(
            "archive: zip is not supported; send a tar or tar.gz archive",
        ));
    }
    let reader: Box<dyn Read> = if data.starts_with(&[0x1f, 0x8b]) {
        Box::new(flate2::read::GzDecoder::new(data))
    } else {
        Box::new(data)
    };
    let bad = |e: std::io::Error| ApiError::invalid(format!("archive: {e}"));
    let mut archive = tar::Archive::new(reader);
    let mut files = Vec::new();
    for entry in archive.entries().map_err(bad)? {
        let mut entry = entry.map_err(bad)?;
        let kind = entry.header().entry_type();
        if kind.is_dir() {
            continue;
        }
        let path = entry.path().map_err(bad)?.to_string_lossy().into_owned();
        let path = path.trim_start_matches("./").to_string();
        if path.is_empty()
            || path.starts_with('/')
            || path.split('/').any(|c| c == "..")
            || path.contains('\0')
        {
            return Err(ApiError::invalid(format!(
                "archive: {path:?} is not a relative path inside the archive"
            )));
        }
        if !kind.is_file() {
            return Err(ApiError::invalid(format!(
                "archive: {path} is not a regular file (links and devices are not copied)"
            )));
        }
        let mode = entry.header().mode().map_err(bad)? & 0o7777;
        let mut data = Vec::new();
        entry.read_to_end(&mut data).map_err(bad)?;
        files.push(BuildFile { path, mode, data });
        if files.len() > MAX_FILES {
            return Err(ApiError::invalid(format!(
                "archive: more than {MAX_FILES} files"
            )));
        }
    }
    files.sort_by(|a, b| a.path.cmp(&b.path));
    files.dedup_by(|a, b| a.path == b.path);
    Ok(files)
}

/// The request as JSON or as a multipart form with its archive.
async fn read_request(st: &AppState, req: Request) -> ApiResult<(CreateBuild, Vec<BuildFile>)> {
    let multipart = req
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("multipart/form-data"));
    if !multipart {
        let Json(body) = Json::<CreateBuild>::from_request(req, st)
            .await
            .map_err(json_rejection)?;
        return Ok((body, Vec::new()));
    }
    let mut form = Multipart::from_request(req, st)
        .await
        .map_err(|e| ApiError::invalid(format!("multipart: {e}")))?;
    let (mut config, mut files) = (None, Vec::new());
    while let Some(field) = form
        .next_field()
        .await
        .map_err(|e| ApiError::invalid(format!("multipart: {e}")))?
    {
        match field.name() {
            Some("config") => {
                let text = field
                    .text()
                    .await
                    .map_err(|e| ApiError::invalid(format!("multipart config: {e}")))?;
                config = Some(
                    serde_json::from_str::<CreateBuild>(&text)
                        .map_err(|e| ApiError::invalid(format!("config: {e}")))?,
                );
            }
            Some("archive") => {
                let data = field
                    .bytes()
                    .await
                    .map_err(|e| ApiError::invalid(format!("multipart archive: {e}")))?;
                files = read_archive(&data)?;
            }
            other => {
                return Err(ApiError::invalid(format!(
                    "multipart: unknown field {other:?} (expected config and archive)"
                )))
            }
        }
    }
    let config =
        config.ok_or_else(|| ApiError::invalid("multipart: the config field is missing"))?;
    Ok((config, files))
}

/// Checks a build request; what a worker would only find out later is refused now.
pub async fn validate(
    st: &AppState,
    who: &Principal,
    req: &CreateBuild,
    files: &[BuildFile],
) -> ApiResult<NewBuild> {
    validate_for(st, who, req, files, false).await
}

/// [`validate`], for a team's template or (`platform`) a platform template.
async fn validate_for(
    st: &AppState,
    who: &Principal,
    req: &CreateBuild,
    files: &[BuildFile],
    platform: bool,
) -> ApiResult<NewBuild> {
    let name = wrenn_core::template::TemplateName::parse(&req.name)
        .map_err(|e| ApiError::invalid(format!("name: {e}")))?;
    if service::is_private_host_template(name.as_str()) {
        return Err(ApiError::invalid(format!(
            "name: {name} is reserved (snap- and img- names are the hosts' own)"
        )));
    }
    let any = st.hosts.any().map_err(service::host_err)?;
    if any.agent.template(name.as_str()).await.is_ok() {
        return Err(ApiError::conflict(
            "name_reserved",
            format!("{name} is a platform template"),
        ));
    }
    let mut metadata = Map::new();
    if platform {
        metadata.insert(crate::builds::PLATFORM_KEY.to_string(), Value::Bool(true));
    }
    let mut base_sizes: (Option<u32>, Option<u32>) = (None, None);
    let base = match (req.base_template.as_deref(), req.base_image.as_deref()) {
        (Some(_), Some(_)) => {
            return Err(ApiError::invalid(
                "give base_template or base_image, not both",
            ))
        }
        (_, Some(image)) => {
            let login = req.registry.as_ref();
            if login.is_some_and(|l| l.username.is_empty() || l.password.is_empty()) {
                return Err(ApiError::invalid(
                    "registry: username and password are both required",
                ));
            }
            let found = inspect_image(st, who, image, login).await?;
            tracing::debug!(image = %found.image, digest = %found.digest, "base image found");
            metadata.insert(crate::builds::BASE_IMAGE_KEY.into(), Value::Bool(true));
            if let Some(l) = login {
                let clear =
                    serde_json::to_string(l).map_err(|e| ApiError::internal(e.to_string()))?;
                metadata.insert(
                    crate::builds::REGISTRY_KEY.into(),
                    Value::String(
                        st.channel_sealer
                            .seal(&crate::builds::registry_aad(image), &clear),
                    ),
                );
            }
            image.to_string()
        }
        (template, None) => {
            if req.registry.is_some() {
                return Err(ApiError::invalid(
                    "registry: credentials are for a base_image",
                ));
            }
            let template = template.unwrap_or(service::DEFAULT_TEMPLATE);
            let resolved = service::resolve_template(st, who, Some(template))
                .await
                .map_err(|e| match e.status {
                    StatusCode::NOT_FOUND => ApiError::not_found(&format!(
                        "base template {template} (a container image is `base_image`, e.g. {template}:latest)"
                    )),
                    _ => e,
                })?;
            // The base's own sizes: a build's capsule of them restores its snapshot
            // instead of booting.
            let holder = match &resolved.holder {
                Some(h) => st.hosts.get(h).ok(),
                None => None,
            };
            let probe = holder.unwrap_or_else(|| any.clone());
            if let Ok(t) = probe.agent.template(&resolved.host_name).await {
                base_sizes = (t.vcpus, t.memory_mb);
            }
            template.to_string()
        }
    };
    let steps = wrenn_recipe::parse_steps(&req.recipe)
        .map_err(|e| ApiError::invalid(format!("recipe {e}")))?;
    match req.result.as_deref() {
        None | Some("snapshot") => {}
        Some("disk") => {
            if steps
                .iter()
                .any(|s| matches!(s, wrenn_recipe::Step::Start { .. }))
            {
                return Err(ApiError::invalid(
                    "recipe: START needs result snapshot (a disk-only template keeps no running services)",
                ));
            }
            if req.healthcheck.is_some() {
                return Err(ApiError::invalid(
                    "healthcheck: a disk-only template keeps no running services to check",
                ));
            }
            metadata.insert(
                crate::builds::RESULT_KEY.into(),
                Value::String(crate::builds::RESULT_DISK.into()),
            );
        }
        Some(other) => {
            return Err(ApiError::invalid(format!(
                "result must be snapshot or disk, got {other:?}"
            )))
        }
    }
    if let Some(hc) = &req.healthcheck {
        wrenn_recipe::parse_healthcheck(hc)
            .map_err(|e| ApiError::invalid(format!("healthcheck: {e}")))?;
    }
    for step in &steps {
        if let wrenn_recipe::Step::Copy { srcs, .. } = step {
            for src in srcs {
                let found = files
                    .iter()
                    .any(|f| wrenn_recipe::copy_relative(src, &f.path).is_some());
                if !found {
                    return Err(ApiError::invalid(format!(
                        "recipe: COPY {src}: not in the uploaded archive"
                    )));
                }
            }
        }
    }
    let vcpus = req.vcpus.or(base_sizes.0).unwrap_or(1);
    if !(1..=8).contains(&vcpus) {
        return Err(ApiError::invalid(format!(
            "vcpus must be between 1 and 8, got {vcpus}"
        )));
    }
    let memory_mb = req.memory_mb.or(base_sizes.1).unwrap_or(1024);
    if !(128..=16384).contains(&memory_mb) {
        return Err(ApiError::invalid(format!(
            "memory_mb must be between 128 and 16384, got {memory_mb}"
        )));
    }
    let timeout_sec = req.timeout_sec.unwrap_or(1800);
    if !(1..=MAX_BUILD_TIMEOUT).contains(&timeout_sec) {
        return Err(ApiError::invalid(format!(
            "timeout_sec must be between 1 and {MAX_BUILD_TIMEOUT}, got {timeout_sec}"
        )));
    }
    Ok(NewBuild {
        name: name.to_string(),
        base_template: base,
        recipe: req.recipe.clone(),
        healthcheck: req.healthcheck.clone(),
        vcpus,
        memory_mb,
        skip_pre_post: req.skip_pre_post,
        timeout_sec,
        metadata,
        created_by: who.user.as_ref().map(|u| u.sub.clone()),
    })
}

/// Finds a base image in its registry, through a host (the control plane reaches no
/// registry itself): a bad, refused, unreachable or foreign image is a 400 naming it.
async fn inspect_image(
    st: &AppState,
    who: &Principal,
    image: &str,
    login: Option<&RegistryLogin>,
) -> ApiResult<wrenn_core::host::HostImage> {
    let any = st.hosts.any_for(&who.team_id).map_err(service::host_err)?;
    let spec = crate::builds::image_spec(st, image, login.cloned());
    any.agent
        .inspect_image(spec)
        .await
        .map_err(|e| match e.kind {
            wrenn_core::host::HostErrorKind::InvalidArgument => {
                ApiError::invalid(format!("base_image: {}", e.message))
            }
            _ => service::host_err(e),
        })
}

/// Queues a validated build and wakes a worker.
pub async fn queue(
    st: &AppState,
    who: &Principal,
    new: NewBuild,
    files: Vec<BuildFile>,
) -> ApiResult<Build> {
    let b = st.db.insert_build(&who.team_id, new, files).await?;
    queued(st, who, &b).await;
    Ok(b)
}

/// Wakes a worker for build `b`, just queued, and audits it.
pub(crate) async fn queued(st: &AppState, who: &Principal, b: &Build) {
    st.builders.queued();
    st.audit(
        who,
        "template.build",
        "build",
        Some(&b.id),
        true,
        Some(serde_json::json!({"name": b.name, "base_template": b.base_template})),
    )
    .await;
}

#[utoipa::path(post, path = "/v1/builds", tag = "builds",
    request_body(content((CreateBuild = "application/json"), (BuildForm = "multipart/form-data"))),
    responses((status = 202, body = BuildView), (status = 400, body = ErrorBody),
        (status = 401, body = ErrorBody), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody),
        (status = 413, body = ErrorBody)),
    security(("api_key" = []), ("bearer" = [])))]
pub async fn create(
    State(st): S,
    Auth(who): Auth,
    req: Request,
) -> ApiResult<(StatusCode, Json<BuildView>)> {
    let (body, files) = read_request(&st, req).await?;
    let new = validate(&st, &who, &body, &files).await?;
    let b = queue(&st, &who, new, files).await?;
    Ok((StatusCode::ACCEPTED, Json(view(b, None))))
}

/// Builds a platform template: like `POST /v1/builds`, but what it makes is saved on
/// the building host under its own name, as the built-in templates are, and every
/// team may create capsules from it. For platform admins. The build itself (its
/// capsule, log and row) belongs to the admin's team.
#[utoipa::path(post, path = "/v1/admin/builds", tag = "builds",
    request_body(content((CreateBuild = "application/json"), (BuildForm = "multipart/form-data"))),
    responses((status = 202, body = BuildView), (status = 400, body = ErrorBody),
        (status = 401, body = ErrorBody), (status = 403, body = ErrorBody), (status = 404, body = ErrorBody),
        (status = 409, body = ErrorBody), (status = 413, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn admin_create(
    State(st): S,
    Auth(who): Auth,
    req: Request,
) -> ApiResult<(StatusCode, Json<BuildView>)> {
    super::admin::platform_admin(&who)?;
    let (body, files) = read_request(&st, req).await?;
    let new = validate_for(&st, &who, &body, &files, true).await?;
    let b = queue(&st, &who, new, files).await?;
    Ok((StatusCode::ACCEPTED, Json(view(b, None))))
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct ListQuery {
    /// Most builds returned (newest first; default 50).
    #[param(minimum = 1, maximum = 200)]
    pub limit: Option<u32>,
}

async fn list_for(st: &AppState, team: Option<&str>, q: ListQuery) -> ApiResult<Vec<BuildView>> {
    let limit = q.limit.unwrap_or(50);
    if !(1..=200).contains(&limit) {
        return Err(ApiError::invalid(format!(
            "limit must be between 1 and 200, got {limit}"
        )));
    }
    Ok(st
        .db
        .list_builds(team, limit)
        .await?
        .into_iter()
        .map(|b| view(b, None))
        .collect())
}

/// A build lookup's error: not found (or another team's) names the build; a database
/// failure stays one.
fn build_err(id: &str, e: wrenn_db::DbError) -> ApiError {
    if e.is_not_found() {
        ApiError::not_found(&format!("build {id}"))
    } else {
        e.into()
    }
}

async fn get_for(st: &AppState, team: Option<&str>, id: &str) -> ApiResult<BuildView> {
    let b = st
        .db
        .get_build(team, id)
        .await
        .map_err(|e| build_err(id, e))?;
    let logs = st.db.build_logs(&b.id, 0, VIEW_LOG_LINES).await?;
    Ok(view(b, Some(logs)))
}

async fn cancel_for(
    st: &AppState,
    who: &Principal,
    team: Option<&str>,
    id: &str,
) -> ApiResult<BuildView> {
    let b = st
        .db
        .cancel_build(team, id)
        .await
        .map_err(|e| build_err(id, e))?;
    st.audit(who, "template.build.cancel", "build", Some(id), true, None)
        .await;
    Ok(view(b, None))
}

#[utoipa::path(get, path = "/v1/builds", tag = "builds", params(ListQuery),
    responses((status = 200, body = Vec<BuildView>), (status = 401, body = ErrorBody)),
    security(("api_key" = []), ("bearer" = [])))]
pub async fn list(
    State(st): S,
    Auth(who): Auth,
    q: Result<Query<ListQuery>, QueryRejection>,
) -> ApiResult<Json<Vec<BuildView>>> {
    let Query(q) = q.map_err(crate::error::query_rejection)?;
    Ok(Json(list_for(&st, Some(&who.team_id), q).await?))
}

#[utoipa::path(get, path = "/v1/builds/{id}", tag = "builds", params(("id" = String, Path)),
    responses((status = 200, body = BuildView), (status = 404, body = ErrorBody)),
    security(("api_key" = []), ("bearer" = [])))]
pub async fn get(
    State(st): S,
    Auth(who): Auth,
    Path(id): Path<String>,
) -> ApiResult<Json<BuildView>> {
    Ok(Json(get_for(&st, Some(&who.team_id), &id).await?))
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct LogsQuery {
    /// First line wanted (the `next_offset` of the previous page).
    #[param(minimum = 0, maximum = 9223372036854775807_i64)]
    pub offset: Option<u64>,
    /// Most lines returned (default 500).
    #[param(minimum = 1, maximum = 5000)]
    pub limit: Option<u32>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct BuildLogs {
    pub logs: Vec<BuildLogView>,
    /// Where the next page starts.
    pub next_offset: u64,
    /// The build's status when the lines were read: once it is final and a page
    /// comes back short, the log is complete.
    pub status: String,
}

#[utoipa::path(get, path = "/v1/builds/{id}/logs", tag = "builds",
    params(("id" = String, Path), LogsQuery),
    responses((status = 200, body = BuildLogs), (status = 404, body = ErrorBody)),
    security(("api_key" = []), ("bearer" = [])))]
pub async fn logs(
    State(st): S,
    Auth(who): Auth,
    Path(id): Path<String>,
    q: Result<Query<LogsQuery>, QueryRejection>,
) -> ApiResult<Json<BuildLogs>> {
    let Query(q) = q.map_err(crate::error::query_rejection)?;
    let b = st
        .db
        .get_build(Some(&who.team_id), &id)
        .await
        .map_err(|e| build_err(&id, e))?;
    let offset = q.offset.unwrap_or(0);
    if i64::try_from(offset).is_err() {
        return Err(ApiError::invalid(format!(
            "offset must be at most {}, got {offset}",
            i64::MAX
        )));
    }
    let limit = q.limit.unwrap_or(500);
    if !(1..=5000).contains(&limit) {
        return Err(ApiError::invalid(format!(
            "limit must be between 1 and 5000, got {limit}"
        )));
    }
    let lines = st.db.build_logs(&b.id, offset, limit).await?;
    let next_offset = lines.last().map_or(offset, |l| l.seq + 1);
    Ok(Json(BuildLogs {
        logs: lines.into_iter().map(log_view).collect(),
        next_offset,
        status: b.status.as_str().into(),
    }))
}

#[utoipa::path(post, path = "/v1/builds/{id}/cancel", tag = "builds", params(("id" = String, Path)),
    responses((status = 200, body = BuildView), (status = 404, body = ErrorBody)),
    security(("api_key" = []), ("bearer" = [])))]
pub async fn cancel(
    State(st): S,
    Auth(who): Auth,
    Path(id): Path<String>,
) -> ApiResult<Json<BuildView>> {
    Ok(Json(cancel_for(&st, &who, Some(&who.team_id), &id).await?))
}

#[utoipa::path(get, path = "/v1/admin/builds", tag = "builds", params(ListQuery),
    responses((status = 200, body = Vec<BuildView>), (status = 403, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn admin_list(
    State(st): S,
    Auth(who): Auth,
    q: Result<Query<ListQuery>, QueryRejection>,
) -> ApiResult<Json<Vec<BuildView>>> {
    super::admin::platform_admin(&who)?;
    let Query(q) = q.map_err(crate::error::query_rejection)?;
    Ok(Json(list_for(&st, None, q).await?))
}

#[utoipa::path(get, path = "/v1/admin/builds/{id}", tag = "builds", params(("id" = String, Path)),
    responses((status = 200, body = BuildView), (status = 403, body = ErrorBody), (status = 404, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn admin_get(
    State(st): S,
    Auth(who): Auth,
    Path(id): Path<String>,
) -> ApiResult<Json<BuildView>> {
    super::admin::platform_admin(&who)?;
    Ok(Json(get_for(&st, None, &id).await?))
}

#[utoipa::path(post, path = "/v1/admin/builds/{id}/cancel", tag = "builds", params(("id" = String, Path)),
    responses((status = 200, body = BuildView), (status = 403, body = ErrorBody), (status = 404, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn admin_cancel(
    State(st): S,
    Auth(who): Auth,
    Path(id): Path<String>,
) -> ApiResult<Json<BuildView>> {
    super::admin::platform_admin(&who)?;
    Ok(Json(cancel_for(&st, &who, None, &id).await?))
}
