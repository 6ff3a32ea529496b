//! E2B's template builder, as the `e2b` SDK's `Template.build` drives it:
//!
//! 1. `POST /v3/templates` names the template and its size and gets a build id;
//! 2. `GET /templates/{id}/files/{hash}` says whether the files of a `copy()` are
//!    already here and hands out a signed URL, to which the SDK `PUT`s them as a tar;
//! 3. `POST /v2/templates/{id}/builds/{build}` sends the steps, which become a recipe
//!    for the template build workers (see [`crate::builds`]);
//! 4. `GET /templates/{id}/builds/{build}/status` reports it, with its log.
//!
//! The template id is the template's name. A build starts from a template (`fromTemplate`)
//! or from E2B's base image (`e2bdev/base`, Wrenn's `base` template); its steps run as
//! `user` in `/home/user` until they say otherwise, as E2B's do, and are numbered as the
//! client numbered them.

use super::{bad, json, E2bAuth, E2bQuery, R, S};
use crate::auth::Principal;
use crate::error::{ApiError, E2bError, E2bErrorBody};
use crate::v1::builds::{self as builds_api, CreateBuild, RegistryLogin};
use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, JsonRejection};
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::Json;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::collections::HashMap;
use utoipa::{IntoParams, ToSchema};
use wrenn_core::template::TemplateName;
use wrenn_db::{Build, BuildFile, BuildStatus, LogStream};

/// The image E2B's builder starts from by default; Wrenn's `base` template stands for it.
const E2B_BASE_IMAGE: &str = "e2bdev/base";
/// Time one step may take (E2B's steps have no limit of their own).
const STEP_TIMEOUT: &str = "1h";
/// Time limit of a whole build.
const BUILD_TIMEOUT_SEC: u32 = 3600;
/// Size of a template when the request names none (E2B's defaults).
const DEFAULT_VCPUS: u32 = 2;
const DEFAULT_MEMORY_MB: u32 = 512;
/// How long an upload URL is good for.
const UPLOAD_URL_TTL_SEC: i64 = 3600;
/// Most log entries one status answer carries (as E2B's).
const MAX_LOG_ENTRIES: u32 = 100;
/// E2B's only tag when none is given.
const DEFAULT_TAG: &str = "default";
/// Where E2B's steps start: `user` in `/home/user`.
const START_USER: &str = "user";
const START_WORKDIR: &str = "/home/user";
/// Metadata of a build made through this API: how many client steps it has (the
/// recipe is those steps, then a `START`).
const E2B_STEPS_KEY: &str = "e2b_steps";
/// E2B's names for what comes before and after the client's steps.
const BASE_STEP: &str = "base";
const FINALIZE_STEP: &str = "finalize";

/// `POST /v3/templates`: a template build to prepare.
#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct TemplateBuildRequest {
    /// `name` or `name:tag` (only the `default` tag).
    pub name: Option<String>,
    /// Older name of `name`.
    pub alias: Option<String>,
    /// Tags to give the build (only `default`).
    pub tags: Option<Vec<String>>,
    /// The caller's own team, when given.
    #[serde(rename = "teamID")]
    pub team_id: Option<String>,
    /// vCPUs of the template's sandboxes (default 2).
    #[schema(minimum = 1, maximum = 8)]
    pub cpu_count: Option<u32>,
    /// Memory of the template's sandboxes (default 512).
    #[serde(rename = "memoryMB")]
    #[schema(minimum = 128, maximum = 16384)]
    pub memory_mb: Option<u32>,
    /// Only 0: a capsule's disk has the size of its template's.
    pub min_free_disk_mb: Option<u64>,
}

#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct TemplateRequestResponse {
    #[serde(rename = "templateID")]
    pub template_id: String,
    #[serde(rename = "buildID")]
    pub build_id: String,
    pub public: bool,
    pub names: Vec<String>,
    pub tags: Vec<String>,
    pub aliases: Vec<String>,
}

/// Where a `copy()`'s files go.
#[derive(Debug, Serialize, ToSchema)]
pub struct TemplateBuildFileUpload {
    /// The files are already here (from an earlier upload of the team).
    pub present: bool,
    /// Signed URL to `PUT` the files to, as a tar or tar.gz (valid for an hour).
    pub url: String,
}

/// One step of E2B's builder.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct TemplateStep {
    /// RUN, COPY, ENV, WORKDIR or USER.
    #[serde(rename = "type")]
    pub kind: String,
    /// RUN: command, user; COPY: source, destination, user, mode; ENV: key, value, …;
    /// WORKDIR: path; USER: name.
    #[serde(default)]
    pub args: Vec<String>,
    /// COPY: the hash its files were uploaded under.
    pub files_hash: Option<String>,
    /// Rebuild this layer (there is no layer cache here: every build runs every step).
    pub force: Option<bool>,
}

/// `POST /v2/templates/{id}/builds/{build}`: what to build.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct TemplateBuildStart {
    /// `e2bdev/base` (container images are not served yet).
    pub from_image: Option<String>,
    /// A template of the team or of the platform.
    pub from_template: Option<String>,
    /// Registry credentials (only with container images).
    pub from_image_registry: Option<Value>,
    /// Rebuild everything (there is no layer cache here: every build does).
    pub force: Option<bool>,
    #[serde(default)]
    pub steps: Vec<TemplateStep>,
    /// Started in the background at the end and kept running in the template.
    pub start_cmd: Option<String>,
    /// Retried until it exits 0 before the template is saved.
    pub ready_cmd: Option<String>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct BuildLogEntry {
    pub timestamp: chrono::DateTime<chrono::Utc>,
    pub message: String,
    /// debug, info, warn or error.
    pub level: String,
}

#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct BuildStatusReason {
    pub message: String,
    /// The client's step that failed (1-based), `base` or `finalize`.
    pub step: String,
    pub log_entries: Vec<BuildLogEntry>,
}

#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct TemplateBuildInfo {
    pub logs: Vec<String>,
    pub log_entries: Vec<BuildLogEntry>,
    #[serde(rename = "templateID")]
    pub template_id: String,
    #[serde(rename = "buildID")]
    pub build_id: String,
    /// waiting (no steps yet, or queued), building, ready or error.
    pub status: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<BuildStatusReason>,
}

#[derive(Debug, Deserialize, IntoParams)]
#[serde(rename_all = "camelCase")]
#[into_params(parameter_in = Query)]
pub struct StatusQuery {
    /// Log entries already read.
    #[param(minimum = 0, maximum = 9223372036854775807_i64)]
    pub logs_offset: Option<u64>,
    /// Most log entries returned (default and maximum 100).
    #[param(minimum = 0, maximum = 100)]
    pub limit: Option<u32>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct TemplateAliasResponse {
    #[serde(rename = "templateID")]
    pub template_id: String,
    /// A platform template (every team's).
    pub public: bool,
}

/// Query of a signed upload URL.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct UploadQuery {
    pub team: String,
    /// Unix time the URL stops working.
    pub expires: i64,
    pub signature: String,
}

/// A template name from E2B's `name` or `name:tag`.
fn template_name(raw: &str) -> R<TemplateName> {
    let (name, tag) = match raw.split_once(':') {
        Some((n, t)) => (n, Some(t)),
        None => (raw, None),
    };
    if tag.is_some_and(|t| t != DEFAULT_TAG) {
        return Err(bad(format!(
            "{raw}: template tags are not supported by this server; give the build its own name"
        )));
    }
    TemplateName::parse(name).map_err(|e| bad(format!("template name: {e}")))
}

/// An upload hash: what the SDK sends (hex SHA-256), nothing that could be a path.
fn check_hash(hash: &str) -> R<()> {
    if hash.is_empty() || hash.len() > 128 || !hash.chars().all(|c| c.is_ascii_alphanumeric()) {
        return Err(bad(format!(
            "files hash {hash:?} must be 1 to 128 letters and digits"
        )));
    }
    Ok(())
}

fn e2b(e: impl Into<ApiError>) -> E2bError {
    E2bError(e.into())
}

#[utoipa::path(post, path = "/v3/templates", tag = "e2b",
    request_body = TemplateBuildRequest,
    responses((status = 202, body = TemplateRequestResponse), (status = 400, body = E2bErrorBody),
        (status = 401, body = E2bErrorBody), (status = 403, body = E2bErrorBody),
        (status = 409, body = E2bErrorBody)),
    security(("api_key" = [])))]
pub async fn request_build(
    State(st): S,
    E2bAuth(who): E2bAuth,
    body: Result<Json<TemplateBuildRequest>, JsonRejection>,
) -> R<(StatusCode, Json<TemplateRequestResponse>)> {
    let req = json(body)?;
    let raw = req
        .name
        .or(req.alias)
        .filter(|n| !n.is_empty())
        .ok_or_else(|| bad("name is required"))?;
    let name = template_name(&raw)?;
    if let Some(tag) = req.tags.iter().flatten().find(|t| *t != DEFAULT_TAG) {
        return Err(bad(format!(
            "tags: {tag:?}: template tags are not supported by this server; give the build its own name"
        )));
    }
    if req.team_id.as_ref().is_some_and(|t| *t != who.team_id) {
        return Err(E2bError(ApiError::forbidden(
            "teamID names a team this credential does not act for",
        )));
    }
    if req.min_free_disk_mb.is_some_and(|m| m > 0) {
        return Err(bad(
            "minFreeDiskMb is not supported by this server: a template's disk keeps the size of the template it starts from",
        ));
    }
    // The name and sizes are checked now, as the builds API checks them.
    let probe = CreateBuild {
        name: name.to_string(),
        base_template: None,
        base_image: None,
        registry: None,
        recipe: Vec::new(),
        healthcheck: None,
        vcpus: Some(req.cpu_count.unwrap_or(DEFAULT_VCPUS)),
        memory_mb: Some(req.memory_mb.unwrap_or(DEFAULT_MEMORY_MB)),
        skip_pre_post: false,
        timeout_sec: Some(BUILD_TIMEOUT_SEC),
        result: None,
    };
    let checked = builds_api::validate(&st, &who, &probe, &[])
        .await
        .map_err(E2bError)?;
    let r = st
        .db
        .insert_build_request(
            &who.team_id,
            name.as_str(),
            checked.vcpus,
            checked.memory_mb,
            checked.created_by,
        )
        .await
        .map_err(e2b)?;
    Ok((
        StatusCode::ACCEPTED,
        Json(TemplateRequestResponse {
            template_id: name.to_string(),
            build_id: r.id,
            public: false,
            names: vec![name.to_string()],
            tags: vec![DEFAULT_TAG.into()],
            aliases: vec![name.to_string()],
        }),
    ))
}

/// What an upload URL's signature covers.
fn upload_message(team: &str, hash: &str, expires: i64) -> String {
    format!("template-upload\n{team}\n{hash}\n{expires}")
}

/// The URL the caller reached this server by (the upload goes to the same place).
fn base_url(headers: &HeaderMap) -> R<String> {
    let host = headers
        .get("host")
        .and_then(|h| h.to_str().ok())
        .filter(|h| !h.is_empty())
        .ok_or_else(|| bad("a Host header is needed to hand out an upload URL"))?;
    let scheme = match headers
        .get("x-forwarded-proto")
        .and_then(|h| h.to_str().ok())
    {
        Some("https") => "https",
        _ => "http",
    };
    Ok(format!("{scheme}://{host}"))
}

#[utoipa::path(get, path = "/templates/{templateID}/files/{hash}", tag = "e2b",
    params(("templateID" = String, Path), ("hash" = String, Path)),
    responses((status = 201, body = TemplateBuildFileUpload), (status = 400, body = E2bErrorBody),
        (status = 401, body = E2bErrorBody)),
    security(("api_key" = [])))]
pub async fn file_upload_link(
    State(st): S,
    E2bAuth(who): E2bAuth,
    Path((template_id, hash)): Path<(String, String)>,
    headers: HeaderMap,
) -> R<(StatusCode, Json<TemplateBuildFileUpload>)> {
    let name = template_name(&template_id)?;
    check_hash(&hash)?;
    let present = st
        .db
        .template_upload_present(&who.team_id, &hash)
        .await
        .map_err(e2b)?;
    let expires = chrono::Utc::now().timestamp() + UPLOAD_URL_TTL_SEC;
    let signature = st
        .url_signer
        .sign(&upload_message(&who.team_id, &hash, expires));
    let url = format!(
        "{}/templates/{name}/files/{hash}?team={}&expires={expires}&signature={signature}",
        base_url(&headers)?,
        who.team_id
    );
    Ok((
        StatusCode::CREATED,
        Json(TemplateBuildFileUpload { present, url }),
    ))
}

#[utoipa::path(put, path = "/templates/{templateID}/files/{hash}", tag = "e2b",
    params(("templateID" = String, Path), ("hash" = String, Path), UploadQuery),
    request_body(content = Vec<u8>, content_type = "application/octet-stream",
        description = "The files, as a tar or tar.gz archive"),
    responses((status = 200), (status = 400, body = E2bErrorBody), (status = 403, body = E2bErrorBody),
        (status = 413, body = E2bErrorBody)))]
pub async fn upload_files(
    State(st): S,
    Path((template_id, hash)): Path<(String, String)>,
    E2bQuery(q): E2bQuery<UploadQuery>,
    body: Result<Bytes, BytesRejection>,
) -> R<StatusCode> {
    template_name(&template_id)?;
    check_hash(&hash)?;
    if q.expires < chrono::Utc::now().timestamp() {
        return Err(E2bError(ApiError::forbidden("this upload URL has expired")));
    }
    if !st
        .url_signer
        .verify(&upload_message(&q.team, &hash, q.expires), &q.signature)
    {
        return Err(E2bError(ApiError::forbidden(
            "this upload URL's signature does not match it",
        )));
    }
    let body = body.map_err(|e| match e.status() {
        StatusCode::PAYLOAD_TOO_LARGE => E2bError(ApiError::too_large(st.config.upload_limit)),
        status => E2bError(ApiError::new(status, "bad_request", e.body_text())),
    })?;
    let files = builds_api::read_archive(&body).map_err(E2bError)?;
    st.db
        .put_template_upload(&q.team, &hash, files)
        .await
        .map_err(e2b)?;
    Ok(StatusCode::OK)
}

/// E2B's `fromImageRegistry`: a general registry's username and password (the cloud
/// providers' kinds need their SDKs' credentials, which this server does not take).
fn registry_login(v: &Value) -> R<RegistryLogin> {
    let field = |k: &str| v.get(k).and_then(Value::as_str).filter(|s| !s.is_empty());
    match field("type") {
        Some("registry") => {}
        Some(other @ ("aws" | "gcp")) => {
            return Err(bad(format!(
                "fromImageRegistry: {other} registries are not supported by this server; give a registry's username and password (type registry)"
            )))
        }
        other => {
            return Err(bad(format!(
                "fromImageRegistry: unknown type {}",
                other.unwrap_or("(none)")
            )))
        }
    }
    match (field("username"), field("password")) {
        (Some(u), Some(p)) => Ok(RegistryLogin {
            username: u.to_string(),
            password: p.to_string(),
        }),
        _ => Err(bad(
            "fromImageRegistry: username and password are both required",
        )),
    }
}

/// A build request turned into a recipe.
struct Recipe {
    base: String,
    /// The base is this container image (else `base` is a template).
    image: Option<String>,
    registry: Option<RegistryLogin>,
    lines: Vec<String>,
    healthcheck: Option<String>,
    /// The files its `COPY` steps use, each under `<hash>/`.
    files: Vec<BuildFile>,
}

/// An upload's path of `COPY` source `src` under `hash` (`.` is the whole upload).
fn upload_source(hash: &str, src: &str) -> String {
    let mut s = src.trim();
    while let Some(rest) = s.strip_prefix("./") {
        s = rest;
    }
    let s = s.trim_end_matches('/');
    if s.is_empty() || s == "." {
        hash.to_string()
    } else {
        format!("{hash}/{s}")
    }
}

/// The sources a `COPY` of `src` takes from upload `hash`: the path itself, or for a
/// glob (`*`, `?`, `[`) every file or directory it matches (a directory covers what is
/// in it).
fn copy_sources(hash: &str, src: &str, files: &[BuildFile]) -> R<Vec<String>> {
    let whole = upload_source(hash, src);
    if !src.contains(['*', '?', '[']) {
        return Ok(vec![whole]);
    }
    let pattern = glob::Pattern::new(src.trim_start_matches("./").trim_end_matches('/'))
        .map_err(|e| bad(format!("COPY {src}: {e}")))?;
    let mut found: Vec<String> = Vec::new();
    for f in files {
        let Some(rel) = f.path.strip_prefix(&format!("{hash}/")) else {
            continue;
        };
        // The shortest matching prefix of the path: a matched directory is copied whole.
        let parts: Vec<&str> = rel.split('/').collect();
        let options = glob::MatchOptions {
            require_literal_separator: true,
            ..Default::default()
        };
        if let Some(n) =
            (1..=parts.len()).find(|&n| pattern.matches_with(&parts[..n].join("/"), options))
        {
            let source = format!("{hash}/{}", parts[..n].join("/"));
            if !found.contains(&source) {
                found.push(source);
            }
        }
    }
    if found.is_empty() {
        return Err(bad(format!(
            "COPY {src}: no uploaded file matches it (upload {hash})"
        )));
    }
    Ok(found)
}

/// The recipe of a build request, and the uploads it needs.
async fn recipe(st: &crate::state::AppState, who: &Principal, b: &TemplateBuildStart) -> R<Recipe> {
    let registry = match b.from_image_registry.as_ref().filter(|v| !v.is_null()) {
        None => None,
        Some(r) => Some(registry_login(r)?),
    };
    let (base, image) = match (b.from_template.as_deref(), b.from_image.as_deref()) {
        (Some(t), None) => (template_name(t)?.to_string(), None),
        (None, Some(img))
            if img == E2B_BASE_IMAGE
                || img
                    .strip_prefix(E2B_BASE_IMAGE)
                    .is_some_and(|t| t.starts_with(':')) =>
        {
            ("base".to_string(), None)
        }
        (None, Some(img)) => (img.to_string(), Some(img.to_string())),
        (Some(_), Some(_)) => return Err(bad("give fromTemplate or fromImage, not both")),
        (None, None) => return Err(bad("fromTemplate or fromImage is required")),
    };
    if registry.is_some() && image.is_none() {
        return Err(bad(
            "fromImageRegistry: credentials are for a fromImage from a registry",
        ));
    }
    let mut lines: Vec<String> = Vec::new();
    let mut uploads: HashMap<String, Vec<BuildFile>> = HashMap::new();
    let q = |s: &str| shell_words::quote(s).into_owned();
    for (i, step) in b.steps.iter().enumerate() {
        let n = i + 1;
        let arg = |k: usize| {
            step.args
                .get(k)
                .map(String::as_str)
                .filter(|a| !a.is_empty())
        };
        // A user or mode is one word of the recipe line.
        let word = |k: usize, what: &str| -> R<Option<&str>> {
            match arg(k) {
                Some(a) if a.chars().any(char::is_whitespace) => {
                    Err(bad(format!("step {n}: invalid {what} {a:?}")))
                }
                other => Ok(other),
            }
        };
        let line = match step.kind.to_ascii_uppercase().as_str() {
            "RUN" => {
                let cmd = arg(0).ok_or_else(|| bad(format!("step {n}: RUN needs a command")))?;
                match word(1, "user name")? {
                    Some(user) => format!("RUN --timeout={STEP_TIMEOUT} --user={user} {cmd}"),
                    None => format!("RUN --timeout={STEP_TIMEOUT} {cmd}"),
                }
            }
            "ENV" => {
                if step.args.is_empty() || step.args.len() % 2 != 0 {
                    return Err(bad(format!("step {n}: ENV takes key, value pairs")));
                }
                let pairs: Vec<String> = step
                    .args
                    .chunks(2)
                    .map(|kv| q(&format!("{}={}", kv[0], kv[1])))
                    .collect();
                format!("ENV {}", pairs.join(" "))
            }
            "WORKDIR" => format!(
                "WORKDIR {}",
                arg(0).ok_or_else(|| bad(format!("step {n}: WORKDIR needs a path")))?
            ),
            "USER" => format!(
                "USER {}",
                arg(0).ok_or_else(|| bad(format!("step {n}: USER needs a name")))?
            ),
            "COPY" => {
                let (src, dst) = match (arg(0), arg(1)) {
                    (Some(s), Some(d)) => (s, d),
                    _ => {
                        return Err(bad(format!(
                            "step {n}: COPY needs a source and a destination"
                        )))
                    }
                };
                let hash = step
                    .files_hash
                    .as_deref()
                    .ok_or_else(|| bad(format!("step {n}: COPY needs filesHash")))?;
                check_hash(hash)?;
                if !uploads.contains_key(hash) {
                    let files = st
                        .db
                        .template_upload_files(&who.team_id, hash)
                        .await
                        .map_err(e2b)?;
                    if files.is_empty() {
                        return Err(bad(format!(
                            "step {n}: COPY {src}: its files (hash {hash}) were not uploaded"
                        )));
                    }
                    let files = files
                        .into_iter()
                        .map(|f| BuildFile {
                            path: format!("{hash}/{}", f.path),
                            ..f
                        })
                        .collect();
                    uploads.insert(hash.to_string(), files);
                }
                let sources = copy_sources(hash, src, &uploads[hash])?;
                let mut opts = String::new();
                if let Some(user) = word(2, "user name")? {
                    opts.push_str(&format!("--chown={user} "));
                }
                if let Some(mode) = word(3, "mode")? {
                    opts.push_str(&format!("--chmod={mode} "));
                }
                let srcs: Vec<String> = sources.iter().map(|s| q(s)).collect();
                // Several sources, or a directory destination: into it, as Docker does.
                let dst = if sources.len() > 1 && !dst.ends_with('/') {
                    format!("{dst}/")
                } else {
                    dst.to_string()
                };
                format!("COPY {opts}{} {}", srcs.join(" "), q(&dst))
            }
            other => {
                return Err(bad(format!(
                    "step {n}: unknown step type {other:?} (RUN, COPY, ENV, WORKDIR or USER)"
                )))
            }
        };
        lines.push(line);
    }
    if let Some(cmd) = b.start_cmd.as_deref().filter(|c| !c.trim().is_empty()) {
        lines.push(format!("START {cmd}"));
    }
    let healthcheck = b
        .ready_cmd
        .as_deref()
        .filter(|c| !c.trim().is_empty())
        .map(|c| format!("--interval=1s {c}"));
    let mut files: Vec<BuildFile> = uploads.into_values().flatten().collect();
    files.sort_by(|a, b| a.path.cmp(&b.path));
    Ok(Recipe {
        base,
        image,
        registry,
        lines,
        healthcheck,
        files,
    })
}

#[utoipa::path(post, path = "/v2/templates/{templateID}/builds/{buildID}", tag = "e2b",
    params(("templateID" = String, Path), ("buildID" = String, Path)),
    request_body = TemplateBuildStart,
    responses((status = 202), (status = 400, body = E2bErrorBody), (status = 401, body = E2bErrorBody),
        (status = 404, body = E2bErrorBody), (status = 409, body = E2bErrorBody)),
    security(("api_key" = [])))]
pub async fn start_build(
    State(st): S,
    E2bAuth(who): E2bAuth,
    Path((template_id, build_id)): Path<(String, String)>,
    body: Result<Json<TemplateBuildStart>, JsonRejection>,
) -> R<StatusCode> {
    let start = json(body)?;
    let name = template_name(&template_id)?;
    let not_found = || {
        E2bError(ApiError::not_found(&format!(
            "build {build_id} of template {template_id}"
        )))
    };
    let req = match st.db.get_build_request(&who.team_id, &build_id).await {
        Ok(r) if r.name == name.as_str() => r,
        Ok(_) => return Err(not_found()),
        Err(e) if e.is_not_found() => {
            return Err(match st.db.get_build(Some(&who.team_id), &build_id).await {
                Ok(_) => E2bError(ApiError::conflict(
                    "build_started",
                    format!("build {build_id} has already been started"),
                )),
                Err(_) => not_found(),
            })
        }
        Err(e) => return Err(e2b(e)),
    };
    let recipe = recipe(&st, &who, &start).await?;
    let client_steps = start.steps.len();
    let create = CreateBuild {
        name: req.name.clone(),
        base_template: recipe.image.is_none().then_some(recipe.base),
        base_image: recipe.image,
        registry: recipe.registry,
        recipe: recipe.lines,
        healthcheck: recipe.healthcheck,
        vcpus: Some(req.vcpus),
        memory_mb: Some(req.memory_mb),
        skip_pre_post: false,
        timeout_sec: Some(BUILD_TIMEOUT_SEC),
        result: None,
    };
    let mut new = builds_api::validate(&st, &who, &create, &recipe.files)
        .await
        .map_err(E2bError)?;
    new.created_by = req.created_by.clone();
    new.metadata
        .insert(E2B_STEPS_KEY.into(), Value::from(client_steps as u64));
    new.metadata
        .insert(crate::builds::START_USER_KEY.into(), START_USER.into());
    new.metadata.insert(
        crate::builds::START_WORKDIR_KEY.into(),
        START_WORKDIR.into(),
    );
    let b = st
        .db
        .start_build_request(&who.team_id, &build_id, new, recipe.files)
        .await
        .map_err(|e| {
            if e.is_not_found() {
                not_found()
            } else {
                e2b(e)
            }
        })?;
    builds_api::queued(&st, &who, &b).await;
    Ok(StatusCode::ACCEPTED)
}

/// E2B's status of a build.
fn status_name(s: BuildStatus) -> &'static str {
    match s {
        BuildStatus::Pending => "waiting",
        BuildStatus::Running => "building",
        BuildStatus::Success => "ready",
        BuildStatus::Failed | BuildStatus::Cancelled => "error",
    }
}

/// The client's step a failed build stopped at: its number (1-based), or `base` (the
/// capsule it runs in did not start) or `finalize` (start command, readiness, saving).
fn failed_step(b: &Build) -> String {
    let client_steps = b
        .metadata
        .get(E2B_STEPS_KEY)
        .and_then(Value::as_u64)
        .unwrap_or(0);
    let in_a_step = b.error.as_deref().is_some_and(|e| e.starts_with("step "));
    // `current_step` counts the steps done: the one that failed is the next.
    step_name(u64::from(b.current_step) + 1, client_steps, in_a_step)
}

/// E2B's name of recipe step `n` (1-based) of a build with `client_steps` steps of the
/// client's, when it failed inside a step or not.
fn step_name(n: u64, client_steps: u64, in_a_step: bool) -> String {
    if in_a_step && n <= client_steps {
        n.to_string()
    } else if n == 1 && !in_a_step {
        BASE_STEP.into()
    } else {
        FINALIZE_STEP.into()
    }
}

/// A log line as E2B's entry: the builder's line that says how a build failed is an
/// error, the rest is information.
fn entry(l: &wrenn_db::BuildLog) -> BuildLogEntry {
    let failure = l.stream == LogStream::System
        && (l.line.starts_with("build failed:") || l.line.starts_with("build cancelled:"));
    BuildLogEntry {
        timestamp: l.created_at,
        message: l.line.clone(),
        level: if failure { "error" } else { "info" }.into(),
    }
}

#[utoipa::path(get, path = "/templates/{templateID}/builds/{buildID}/status", tag = "e2b",
    params(("templateID" = String, Path), ("buildID" = String, Path), StatusQuery),
    responses((status = 200, body = TemplateBuildInfo), (status = 400, body = E2bErrorBody),
        (status = 401, body = E2bErrorBody), (status = 404, body = E2bErrorBody)),
    security(("api_key" = [])))]
pub async fn build_status(
    State(st): S,
    E2bAuth(who): E2bAuth,
    Path((template_id, build_id)): Path<(String, String)>,
    E2bQuery(q): E2bQuery<StatusQuery>,
) -> R<Json<TemplateBuildInfo>> {
    let name = template_name(&template_id)?;
    let offset = q.logs_offset.unwrap_or(0);
    if i64::try_from(offset).is_err() {
        return Err(bad(format!("logsOffset must be at most {}", i64::MAX)));
    }
    let limit = q.limit.unwrap_or(MAX_LOG_ENTRIES);
    if limit > MAX_LOG_ENTRIES {
        return Err(bad(format!("limit must be at most {MAX_LOG_ENTRIES}")));
    }
    let not_found = || {
        E2bError(ApiError::not_found(&format!(
            "build {build_id} of template {template_id}"
        )))
    };
    let b = match st.db.get_build(Some(&who.team_id), &build_id).await {
        Ok(b) if b.name == name.as_str() => b,
        Ok(_) => return Err(not_found()),
        Err(e) if e.is_not_found() => {
            // Steps not sent yet.
            return match st.db.get_build_request(&who.team_id, &build_id).await {
                Ok(r) if r.name == name.as_str() => Ok(Json(TemplateBuildInfo {
                    logs: Vec::new(),
                    log_entries: Vec::new(),
                    template_id: name.to_string(),
                    build_id,
                    status: "waiting".into(),
                    reason: None,
                })),
                Ok(_) => Err(not_found()),
                Err(e) if e.is_not_found() => Err(not_found()),
                Err(e) => Err(e2b(e)),
            };
        }
        Err(e) => return Err(e2b(e)),
    };
    let failed = matches!(b.status, BuildStatus::Failed | BuildStatus::Cancelled);
    let lines = if limit == 0 {
        Vec::new()
    } else {
        st.db.build_logs(&b.id, offset, limit).await.map_err(e2b)?
    };
    let log_entries: Vec<BuildLogEntry> = lines.iter().map(entry).collect();
    let reason = if failed {
        let tail = st.db.build_log_tail(&b.id, 10).await.map_err(e2b)?;
        Some(BuildStatusReason {
            message: b.error.clone().unwrap_or_else(|| "the build failed".into()),
            step: failed_step(&b),
            log_entries: tail.iter().map(entry).collect(),
        })
    } else {
        None
    };
    Ok(Json(TemplateBuildInfo {
        logs: log_entries.iter().map(|e| e.message.clone()).collect(),
        log_entries,
        template_id: name.to_string(),
        build_id: b.id,
        status: status_name(b.status).into(),
        reason,
    }))
}

#[utoipa::path(get, path = "/templates/aliases/{alias}", tag = "e2b",
    params(("alias" = String, Path)),
    responses((status = 200, body = TemplateAliasResponse), (status = 400, body = E2bErrorBody),
        (status = 401, body = E2bErrorBody), (status = 404, body = E2bErrorBody)),
    security(("api_key" = [])))]
pub async fn alias(
    State(st): S,
    E2bAuth(who): E2bAuth,
    Path(alias): Path<String>,
) -> R<Json<TemplateAliasResponse>> {
    let name = template_name(&alias)?;
    let t = crate::service::resolve_template(&st, &who, Some(name.as_str()))
        .await
        .map_err(E2bError)?;
    Ok(Json(TemplateAliasResponse {
        template_id: name.to_string(),
        public: t.snapshot.is_none(),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(path: &str) -> BuildFile {
        BuildFile {
            path: path.into(),
            mode: 0o644,
            data: Vec::new(),
        }
    }

    #[test]
    fn names_take_only_the_default_tag() {
        assert_eq!(template_name("my-env").unwrap().as_str(), "my-env");
        assert_eq!(template_name("my-env:default").unwrap().as_str(), "my-env");
        assert!(template_name("my-env:v2").is_err());
        assert!(template_name("team/my-env").is_err());
    }

    #[test]
    fn copy_sources_follow_paths_and_globs() {
        let files = [
            file("h/app.py"),
            file("h/lib/util.py"),
            file("h/lib/data/x.json"),
            file("h/README"),
        ];
        assert_eq!(copy_sources("h", "app.py", &files).unwrap(), ["h/app.py"]);
        assert_eq!(copy_sources("h", "./lib/", &files).unwrap(), ["h/lib"]);
        assert_eq!(copy_sources("h", ".", &files).unwrap(), ["h"]);
        assert_eq!(copy_sources("h", "*.py", &files).unwrap(), ["h/app.py"]);
        assert_eq!(copy_sources("h", "l*", &files).unwrap(), ["h/lib"]);
        assert!(copy_sources("h", "*.rs", &files).is_err());
        assert!(check_hash("../x").is_err() && check_hash("ab12").is_ok());
    }

    #[test]
    fn a_failure_names_the_clients_step() {
        let at = |done: u64, in_a_step| step_name(done + 1, 3, in_a_step);
        assert_eq!(at(0, false), "base");
        assert_eq!(at(0, true), "1");
        assert_eq!(at(2, true), "3");
        assert_eq!(at(3, true), "finalize");
        assert_eq!(at(3, false), "finalize");
    }
}
