//! `/v1/capsules/{id}/files/*`: read, write (streamed, size-capped), list, mkdir, remove.

use crate::auth::Auth;
use crate::error::{json_rejection, ApiError, ApiResult, ErrorBody};
use crate::service;
use crate::state::AppState;
use axum::body::Body;
use axum::extract::rejection::JsonRejection;
use axum::extract::{Multipart, Path, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use bytes::Bytes;
use serde::{Deserialize, Serialize};
use std::sync::Arc;
use utoipa::ToSchema;
use wrenn_core::guest::{AgentError, ByteStream, EntryKind, FileEntry};

type S = State<Arc<AppState>>;

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PathBody {
    /// Path inside the capsule.
    #[schema(min_length = 1)]
    pub path: String,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ListBody {
    #[schema(min_length = 1)]
    pub path: String,
    /// Recursion depth (1 = immediate children).
    #[schema(minimum = 0, maximum = 32)]
    pub depth: Option<u32>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct FileEntryView {
    pub name: String,
    pub path: String,
    /// file, directory or symlink.
    #[serde(rename = "type")]
    pub kind: String,
    pub size: u64,
    pub mode: u32,
    pub permissions: String,
    pub owner: String,
    pub group: String,
    /// Unix seconds.
    pub modified_at: i64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub symlink_target: Option<String>,
}

impl From<FileEntry> for FileEntryView {
    fn from(e: FileEntry) -> Self {
        FileEntryView {
            name: e.name,
            path: e.path,
            kind: match e.kind {
                EntryKind::Dir => "directory",
                EntryKind::Symlink => "symlink",
                EntryKind::File | EntryKind::Other => "file",
            }
            .to_string(),
            size: e.size,
            mode: e.mode,
            permissions: e.permissions,
            owner: e.owner,
            group: e.group,
            modified_at: e.modified,
            symlink_target: e.symlink_target,
        }
    }
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ListDirResponse {
    pub entries: Vec<FileEntryView>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct MakeDirResponse {
    pub entry: FileEntryView,
}

fn p_shown(p: &Option<String>) -> &str {
    p.as_deref().unwrap_or("")
}

fn check_path(p: &str) -> ApiResult<()> {
    if p.is_empty() || p.contains('\0') || p.len() > 4096 {
        return Err(ApiError::invalid(
            "path must be a non-empty path without NUL bytes",
        ));
    }
    Ok(())
}

async fn guest_of(
    st: &AppState,
    who: &crate::auth::Principal,
    id: &str,
) -> ApiResult<Arc<dyn wrenn_core::guest::GuestAgent>> {
    capsule_guest(st, who, id).await.map(|(_, g)| g)
}

async fn capsule_guest(
    st: &AppState,
    who: &crate::auth::Principal,
    id: &str,
) -> ApiResult<(wrenn_db::Capsule, Arc<dyn wrenn_core::guest::GuestAgent>)> {
    let c = service::running(st, who, id).await?;
    service::touch(st, &c).await;
    let g = st.guest(&c).await.map_err(service::host_err)?;
    Ok((c, g))
}

fn file_err(e: AgentError) -> ApiError {
    match e {
        AgentError::NotFound(m) => ApiError::new(StatusCode::NOT_FOUND, "not_found", m),
        AgentError::InvalidArgument(m) => ApiError::invalid(m),
        AgentError::PermissionDenied(m) => ApiError::forbidden(m),
        other => service::guest_err(other),
    }
}

#[utoipa::path(post, path = "/v1/capsules/{id}/files/read", tag = "files",
    params(("id" = String, Path)), request_body = PathBody,
    responses((status = 200, content_type = "application/octet-stream", body = Vec<u8>),
        (status = 400, body = ErrorBody), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)),
    security(("api_key" = []), ("bearer" = [])))]
pub async fn read(
    State(st): S,
    Auth(who): Auth,
    Path(id): Path<String>,
    body: Result<Json<PathBody>, JsonRejection>,
) -> ApiResult<Response> {
    let Json(b) = body.map_err(json_rejection)?;
    check_path(&b.path)?;
    let guest = guest_of(&st, &who, &id).await?;
    let stream = guest.read_file(&b.path).await.map_err(file_err)?;
    Ok((
        [(header::CONTENT_TYPE, "application/octet-stream")],
        Body::from_stream(stream),
    )
        .into_response())
}

#[utoipa::path(post, path = "/v1/capsules/{id}/files/stream/read", tag = "files",
    params(("id" = String, Path)), request_body = PathBody,
    responses((status = 200, content_type = "application/octet-stream", body = Vec<u8>),
        (status = 400, body = ErrorBody), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)),
    security(("api_key" = []), ("bearer" = [])))]
/// The same streamed read as `files/read` (both stream), under the reference's second path.
pub async fn stream_read(
    st: S,
    who: Auth,
    id: Path<String>,
    body: Result<Json<PathBody>, JsonRejection>,
) -> ApiResult<Response> {
    read(st, who, id, body).await
}

/// Multipart upload: form field `path`, then file part `file`.
#[derive(Debug, ToSchema)]
#[allow(dead_code)]
pub struct UploadForm {
    path: String,
    #[schema(format = Binary, content_media_type = "application/octet-stream")]
    file: String,
}

/// Most of a refused upload's body read (and dropped) before answering.
const MAX_DRAIN: u64 = 256 << 20;
/// Longest multipart `path` field (a path is at most 4096 bytes).
const MAX_PATH_FIELD: usize = 4096;
/// Multipart framing and the `path` field on top of the file's own bytes.
const MULTIPART_OVERHEAD: u64 = 64 * 1024;

/// A multipart error as an answer: the body-wide cap surfaces as 413.
fn multipart_err(e: axum::extract::multipart::MultipartError, limit: u64) -> ApiError {
    if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
        ApiError::too_large(limit)
    } else {
        ApiError::invalid(format!("multipart: {}", e.body_text()))
    }
}

/// A failed upload's answer: its body may be partly unread, so the connection is not
/// reused (a client would otherwise send its next request into a closing socket).
fn refused(e: ApiError) -> Response {
    let mut resp = e.into_response();
    resp.headers_mut()
        .insert(header::CONNECTION, HeaderValue::from_static("close"));
    resp
}

/// Streams the multipart `file` part to the guest, refusing more than the upload cap.
async fn write_impl(
    st: &Arc<AppState>,
    who: &crate::auth::Principal,
    id: &str,
    headers: &HeaderMap,
    mut form: Multipart,
) -> ApiResult<StatusCode> {
    let limit = st.config.upload_limit;
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    // Multipart framing adds a few hundred bytes; a body far beyond the cap is refused
    // before anything is read.
    if declared.is_some_and(|n| n > limit.saturating_add(MULTIPART_OVERHEAD)) {
        return Err(ApiError::too_large(limit));
    }
    let (capsule, guest) = capsule_guest(st, who, id).await?;
    let mut path: Option<String> = None;
    let mut written = false;
    while let Some(mut field) = form
        .next_field()
        .await
        .map_err(|e| multipart_err(e, limit))?
    {
        match field.name() {
            Some("path") => {
                let mut raw = Vec::new();
                while let Some(chunk) = field.chunk().await.map_err(|e| multipart_err(e, limit))? {
                    raw.extend_from_slice(&chunk);
                    if raw.len() > MAX_PATH_FIELD {
                        return Err(ApiError::invalid(format!(
                            "multipart path: longer than {MAX_PATH_FIELD} bytes"
                        )));
                    }
                }
                let p = String::from_utf8(raw)
                    .map_err(|_| ApiError::invalid("multipart path: not UTF-8"))?;
                check_path(&p)?;
                path = Some(p);
            }
            Some("file") => {
                let Some(p) = path.clone() else {
                    return Err(ApiError::invalid(
                        "multipart: the `path` field must come before the `file` part",
                    ));
                };
                let (tx, rx) = tokio::sync::mpsc::channel::<Result<Bytes, AgentError>>(4);
                let stream: ByteStream =
                    Box::pin(futures_util::stream::unfold(rx, |mut rx| async {
                        rx.recv().await.map(|item| (item, rx))
                    }));
                let g = guest.clone();
                let writer = tokio::spawn(async move { g.write_file(&p, stream).await });
                let mut total = 0u64;
                let mut failure: Option<ApiError> = None;
                loop {
                    match field.chunk().await {
                        Ok(Some(chunk)) => {
                            total += chunk.len() as u64;
                            if total > limit {
                                let _ = tx
                                    .send(Err(AgentError::InvalidArgument(
                                        "upload too large".into(),
                                    )))
                                    .await;
                                failure = Some(ApiError::too_large(limit));
                                // Read (and drop) the rest, so the client gets this
                                // answer instead of a reset connection.
                                let mut drained = 0u64;
                                while let Ok(Some(c)) = field.chunk().await {
                                    drained += c.len() as u64;
                                    if drained > MAX_DRAIN {
                                        break;
                                    }
                                }
                                break;
                            }
                            if tx.send(Ok(chunk)).await.is_err() {
                                break;
                            }
                        }
                        Ok(None) => break,
                        Err(e) => {
                            let _ = tx
                                .send(Err(AgentError::Protocol("upload interrupted".into())))
                                .await;
                            failure = Some(multipart_err(e, limit));
                            break;
                        }
                    }
                }
                drop(tx);
                let result = writer
                    .await
                    .map_err(|e| ApiError::internal(format!("upload task: {e}")))?;
                if let Some(f) = failure {
                    return Err(f);
                }
                result.map_err(file_err)?;
                crate::v1::capsules::audit_later(
                    st,
                    who,
                    "file.write",
                    &capsule,
                    serde_json::json!({"path": p_shown(&path), "bytes": total}),
                );
                written = true;
            }
            _ => {}
        }
    }
    if !written {
        return Err(ApiError::invalid(
            "multipart: expected a `path` field and a `file` part",
        ));
    }
    Ok(StatusCode::NO_CONTENT)
}

#[utoipa::path(post, path = "/v1/capsules/{id}/files/write", tag = "files",
    params(("id" = String, Path)),
    request_body(content = UploadForm, content_type = "multipart/form-data"),
    responses((status = 204), (status = 400, body = ErrorBody), (status = 404, body = ErrorBody),
        (status = 409, body = ErrorBody), (status = 413, body = ErrorBody), (status = 507, body = ErrorBody)),
    security(("api_key" = []), ("bearer" = [])))]
pub async fn write(
    State(st): S,
    Auth(who): Auth,
    Path(id): Path<String>,
    req: axum::extract::Request,
) -> Result<StatusCode, Response> {
    // The whole body is capped, whatever its framing (a chunked body has no length to
    // check up front) and whichever part it is in.
    let (parts, body) = req.into_parts();
    // The host's disk must take the upload above its reserve (checked up front when
    // the length is declared; the capsule's own disk size bounds the rest).
    let declared = parts
        .headers
        .get(axum::http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if let Some(n) = declared {
        // The capsule's host takes the upload (an unknown capsule is reported below).
        if let Some(agent) = service::get(&st, &who, &id)
            .await
            .ok()
            .and_then(|c| st.agent_of(&c).ok())
        {
            agent
                .ensure_space(n)
                .await
                .map_err(|e| refused(ApiError::from(e)))?;
        }
    }
    let cap = usize::try_from(st.config.upload_limit.saturating_add(MULTIPART_OVERHEAD))
        .unwrap_or(usize::MAX);
    let headers = parts.headers.clone();
    let req = axum::extract::Request::from_parts(
        parts,
        Body::new(http_body_util::Limited::new(body, cap)),
    );
    let form = <Multipart as axum::extract::FromRequest<()>>::from_request(req, &())
        .await
        .map_err(|e| refused(ApiError::invalid(e.body_text())))?;
    write_impl(&st, &who, &id, &headers, form)
        .await
        .map_err(refused)
}

#[utoipa::path(post, path = "/v1/capsules/{id}/files/stream/write", tag = "files",
    params(("id" = String, Path)),
    request_body(content = UploadForm, content_type = "multipart/form-data"),
    responses((status = 204), (status = 400, body = ErrorBody), (status = 404, body = ErrorBody),
        (status = 409, body = ErrorBody), (status = 413, body = ErrorBody), (status = 507, body = ErrorBody)),
    security(("api_key" = []), ("bearer" = [])))]
/// The same streamed write as `files/write` (both stream), under the reference's second path.
pub async fn stream_write(
    st: S,
    who: Auth,
    id: Path<String>,
    req: axum::extract::Request,
) -> Result<StatusCode, Response> {
    write(st, who, id, req).await
}

#[utoipa::path(post, path = "/v1/capsules/{id}/files/list", tag = "files",
    params(("id" = String, Path)), request_body = ListBody,
    responses((status = 200, body = ListDirResponse), (status = 400, body = ErrorBody),
        (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)),
    security(("api_key" = []), ("bearer" = [])))]
pub async fn list(
    State(st): S,
    Auth(who): Auth,
    Path(id): Path<String>,
    body: Result<Json<ListBody>, JsonRejection>,
) -> ApiResult<Json<ListDirResponse>> {
    let Json(b) = body.map_err(json_rejection)?;
    check_path(&b.path)?;
    let depth = b.depth.unwrap_or(1);
    if depth > 32 {
        return Err(ApiError::invalid("depth must be at most 32"));
    }
    let guest = guest_of(&st, &who, &id).await?;
    let entries = guest
        .list_dir(&b.path, depth.max(1))
        .await
        .map_err(file_err)?;
    Ok(Json(ListDirResponse {
        entries: entries.into_iter().map(Into::into).collect(),
    }))
}

#[utoipa::path(post, path = "/v1/capsules/{id}/files/mkdir", tag = "files",
    params(("id" = String, Path)), request_body = PathBody,
    responses((status = 200, body = MakeDirResponse), (status = 400, body = ErrorBody),
        (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)),
    security(("api_key" = []), ("bearer" = [])))]
pub async fn mkdir(
    State(st): S,
    Auth(who): Auth,
    Path(id): Path<String>,
    body: Result<Json<PathBody>, JsonRejection>,
) -> ApiResult<Json<MakeDirResponse>> {
    let Json(b) = body.map_err(json_rejection)?;
    check_path(&b.path)?;
    let (c, guest) = capsule_guest(&st, &who, &id).await?;
    let entry = guest.make_dir(&b.path).await.map_err(|e| match e {
        // envd's AlreadyExists arrives as InvalidArgument; an existing directory is a
        // conflict (409), which the SDK's idempotent `make_dir` relies on.
        AgentError::InvalidArgument(m)
            if m.starts_with("directory ") && m.ends_with(" already exists") =>
        {
            ApiError::conflict("conflict", m)
        }
        other => file_err(other),
    })?;
    crate::v1::capsules::audit_later(
        &st,
        &who,
        "file.mkdir",
        &c,
        serde_json::json!({"path": b.path}),
    );
    Ok(Json(MakeDirResponse {
        entry: entry.into(),
    }))
}

#[utoipa::path(post, path = "/v1/capsules/{id}/files/remove", tag = "files",
    params(("id" = String, Path)), request_body = PathBody,
    responses((status = 204), (status = 400, body = ErrorBody), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)),
    security(("api_key" = []), ("bearer" = [])))]
pub async fn remove(
    State(st): S,
    Auth(who): Auth,
    Path(id): Path<String>,
    body: Result<Json<PathBody>, JsonRejection>,
) -> ApiResult<StatusCode> {
    let Json(b) = body.map_err(json_rejection)?;
    check_path(&b.path)?;
    let (c, guest) = capsule_guest(&st, &who, &id).await?;
    guest.remove(&b.path).await.map_err(file_err)?;
    crate::v1::capsules::audit_later(
        &st,
        &who,
        "file.remove",
        &c,
        serde_json::json!({"path": b.path}),
    );
    Ok(StatusCode::NO_CONTENT)
}
