//! `GET /files` and `POST /files`: streamed downloads and uploads (multipart or
//! octet-stream, gzip both ways, byte ranges, signed URLs, xattr metadata).
//! Bodies are never held whole in memory.

use super::auth::{check_file_access, http_error, FileQuery, HttpError};
use super::filesystem::{create_dirs, read_file_metadata, XATTR_PREFIX};
use super::identity::{as_user, IdentityError};
use super::upload::Destinations;
use super::users::User;
use super::AppState;
use crate::proto::UploadedEntry;
use async_compression::tokio::bufread::{GzipDecoder, GzipEncoder};
use axum::body::Body;
use axum::extract::{Query, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use futures_util::{Stream, StreamExt, TryStreamExt};
use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;
use tokio::io::{AsyncReadExt, AsyncSeekExt, AsyncWriteExt, BufReader};
use tokio_util::io::{ReaderStream, StreamReader};

/// Read and write buffer for file bodies.
const CHUNK: usize = 64 * 1024;
const MAX_METADATA_KEY: usize = 246;
const MAX_METADATA_TOTAL: usize = 4096;

type ByteStream = Pin<Box<dyn Stream<Item = std::io::Result<Bytes>> + Send>>;

fn io_error(e: &std::io::Error, path: &Path) -> HttpError {
    use std::io::ErrorKind as K;
    let p = path.display();
    match e.kind() {
        K::NotFound => http_error(StatusCode::NOT_FOUND, format!("path '{p}' does not exist")),
        K::IsADirectory => http_error(
            StatusCode::BAD_REQUEST,
            format!("path '{p}' is a directory"),
        ),
        K::NotADirectory => http_error(
            StatusCode::BAD_REQUEST,
            format!("a parent of '{p}' is not a directory"),
        ),
        K::PermissionDenied => http_error(
            StatusCode::FORBIDDEN,
            format!("permission denied for '{p}'"),
        ),
        K::StorageFull | K::QuotaExceeded => http_error(
            StatusCode::INSUFFICIENT_STORAGE,
            format!("not enough disk space for '{p}'"),
        ),
        _ => http_error(StatusCode::INTERNAL_SERVER_ERROR, format!("'{p}': {e}")),
    }
}

impl From<IdentityError> for HttpError {
    fn from(e: IdentityError) -> Self {
        let status = match e {
            IdentityError::Switch { .. } => StatusCode::FORBIDDEN,
            IdentityError::Worker(_) => StatusCode::INTERNAL_SERVER_ERROR,
        };
        http_error(status, e.to_string())
    }
}

fn file_user(st: &AppState, q: &FileQuery) -> Result<User, HttpError> {
    st.resolve_user(q.username.as_deref())
        .map_err(|e| http_error(StatusCode::UNAUTHORIZED, e.message))
}

/// Quality values for the two encodings we can produce.
#[derive(Debug, PartialEq)]
struct Accept {
    gzip: f32,
    identity: f32,
}

fn parse_accept_encoding(h: Option<&str>) -> Accept {
    let Some(h) = h else {
        return Accept {
            gzip: 0.0,
            identity: 1.0,
        };
    };
    let (mut gzip, mut identity, mut star) = (None, None, None);
    for part in h.split(',') {
        let mut it = part.split(';');
        let coding = it.next().unwrap_or("").trim().to_ascii_lowercase();
        let q = it
            .filter_map(|p| p.trim().strip_prefix("q="))
            .filter_map(|v| v.trim().parse::<f32>().ok())
            .next()
            .unwrap_or(1.0);
        match coding.as_str() {
            "gzip" | "x-gzip" => gzip = Some(q),
            "identity" => identity = Some(q),
            "*" => star = Some(q),
            _ => {}
        }
    }
    Accept {
        gzip: gzip.or(star).unwrap_or(0.0),
        identity: identity.or(star).unwrap_or(1.0),
    }
}

/// A single `bytes=a-b` range (multi-range requests are served whole).
fn parse_range(h: &str, len: u64) -> Option<Result<(u64, u64), ()>> {
    let spec = h.trim().strip_prefix("bytes=")?;
    if spec.contains(',') {
        return None;
    }
    let (a, b) = spec.split_once('-')?;
    let (a, b) = (a.trim(), b.trim());
    let range = if a.is_empty() {
        let n: u64 = b.parse().ok()?;
        if n == 0 || len == 0 {
            return Some(Err(()));
        }
        (len.saturating_sub(n), len - 1)
    } else {
        let start: u64 = a.parse().ok()?;
        let end = if b.is_empty() {
            len.saturating_sub(1)
        } else {
            b.parse::<u64>().ok()?.min(len.saturating_sub(1))
        };
        if start >= len || end < start {
            return Some(Err(()));
        }
        (start, end)
    };
    Some(Ok(range))
}

pub async fn download(
    State(st): State<Arc<AppState>>,
    headers: HeaderMap,
    Query(q): Query<FileQuery>,
) -> Result<Response, HttpError> {
    check_file_access(&st, &headers, &q, "read")?;
    let user = file_user(&st, &q)?;
    let Some(raw) = q.path.as_deref().filter(|p| !p.is_empty()) else {
        return Err(http_error(
            StatusCode::BAD_REQUEST,
            "query parameter 'path' is required",
        ));
    };
    let path = st.resolve_path(raw, &user);
    // Opened as the user: the open is the permission check; the stream then
    // reads through the checked descriptor.
    let (file, len) = as_user(&user, {
        let path = path.clone();
        move || open_for_download(&path).map_err(|e| io_error(&e, &path))
    })
    .await?;
    let mut file = tokio::fs::File::from_std(file);
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let mime = mime_guess::from_path(&path).first_or_octet_stream();
    let accept = parse_accept_encoding(
        headers
            .get(header::ACCEPT_ENCODING)
            .and_then(|v| v.to_str().ok()),
    );
    let mut resp = Response::builder()
        .header(header::CONTENT_TYPE, mime.as_ref())
        .header(
            header::CONTENT_DISPOSITION,
            format!("inline; filename=\"{}\"", name.replace('"', "\\\"")),
        )
        .header(header::ACCEPT_RANGES, "bytes")
        .header(header::VARY, "Accept-Encoding")
        .header(header::CACHE_CONTROL, "no-store");

    if let Some(range) = headers
        .get(header::RANGE)
        .and_then(|v| v.to_str().ok())
        .and_then(|r| parse_range(r, len))
    {
        if accept.identity <= 0.0 {
            return Err(http_error(
                StatusCode::NOT_ACCEPTABLE,
                "byte ranges are only served without content encoding",
            ));
        }
        let Ok((start, end)) = range else {
            return Ok(Response::builder()
                .status(StatusCode::RANGE_NOT_SATISFIABLE)
                .header(header::CONTENT_RANGE, format!("bytes */{len}"))
                .body(Body::empty())
                .unwrap_or_else(|_| StatusCode::RANGE_NOT_SATISFIABLE.into_response()));
        };
        file.seek(std::io::SeekFrom::Start(start))
            .await
            .map_err(|e| io_error(&e, &path))?;
        let count = end - start + 1;
        let body = Body::from_stream(ReaderStream::with_capacity(file.take(count), CHUNK));
        resp = resp
            .status(StatusCode::PARTIAL_CONTENT)
            .header(header::CONTENT_RANGE, format!("bytes {start}-{end}/{len}"))
            .header(header::CONTENT_LENGTH, count);
        return Ok(resp
            .body(body)
            .unwrap_or_else(|_| StatusCode::INTERNAL_SERVER_ERROR.into_response()));
    }

    let gzip = accept.gzip > 0.0 && accept.gzip >= accept.identity;
    if !gzip && accept.identity <= 0.0 {
        return Err(http_error(
            StatusCode::NOT_ACCEPTABLE,
            "no acceptable content encoding (identity, gzip)",
        ));
    }
    let body = if gzip {
        resp = resp.header(header::CONTENT_ENCODING, "gzip");
        // Clients (httpx) offer gzip by default: compress fast, not small.
        let enc = GzipEncoder::with_quality(
            BufReader::with_capacity(CHUNK, file),
            async_compression::Level::Fastest,
        );
        Body::from_stream(ReaderStream::with_capacity(enc, CHUNK))
    } else {
        resp = resp.header(header::CONTENT_LENGTH, len);
        Body::from_stream(ReaderStream::with_capacity(file, CHUNK))
    };
    Ok(resp
        .status(StatusCode::OK)
        .body(body)
        .unwrap_or_else(|_| StatusCode::INTERNAL_SERVER_ERROR.into_response()))
}

/// Opens a file to download and returns it with its size. Runs as the user.
fn open_for_download(path: &Path) -> std::io::Result<(std::fs::File, u64)> {
    let is_dir = || std::io::Error::from(std::io::ErrorKind::IsADirectory);
    if std::fs::metadata(path)?.is_dir() {
        return Err(is_dir());
    }
    let file = std::fs::File::open(path)?;
    let meta = file.metadata()?;
    if meta.is_dir() {
        return Err(is_dir());
    }
    Ok((file, meta.len()))
}

/// `X-Metadata-<key>` headers → xattr pairs, validated.
fn parse_metadata(headers: &HeaderMap) -> Result<Vec<(String, String)>, HttpError> {
    let mut out = Vec::new();
    let mut total = 0;
    for (name, value) in headers {
        let Some(key) = name.as_str().strip_prefix("x-metadata-") else {
            continue;
        };
        let value = value
            .to_str()
            .ok()
            .filter(|v| v.bytes().all(|b| (0x20..0x7f).contains(&b)))
            .ok_or_else(|| {
                http_error(
                    StatusCode::BAD_REQUEST,
                    format!("metadata '{key}' must be printable ASCII"),
                )
            })?;
        if key.is_empty() || key.len() > MAX_METADATA_KEY {
            return Err(http_error(
                StatusCode::BAD_REQUEST,
                format!("metadata key '{key}' must be 1..={MAX_METADATA_KEY} bytes"),
            ));
        }
        total += key.len() + value.len();
        out.push((key.to_ascii_lowercase(), value.to_string()));
    }
    if total > MAX_METADATA_TOTAL {
        return Err(http_error(
            StatusCode::BAD_REQUEST,
            format!("metadata exceeds {MAX_METADATA_TOTAL} bytes"),
        ));
    }
    Ok(out)
}

/// Replaces an open file's user metadata with `meta`. Runs as the user.
fn set_metadata(file: &std::fs::File, meta: &[(String, String)]) -> std::io::Result<()> {
    use xattr::FileExt;
    if let Ok(names) = file.list_xattr() {
        for n in names {
            if n.to_str().is_some_and(|s| s.starts_with(XATTR_PREFIX)) {
                file.remove_xattr(&n)?;
            }
        }
    }
    for (k, v) in meta {
        file.set_xattr(format!("{XATTR_PREFIX}{k}"), v.as_bytes())?;
    }
    Ok(())
}

/// Opens `path` for an upload, creating missing parents and truncating an
/// existing file. Runs as the user: parents and the file are created owned by
/// the user, and a path (or symlink) leading where the user may not write fails.
fn open_for_upload(path: &Path) -> Result<std::fs::File, HttpError> {
    if let Some(parent) = path.parent() {
        create_dirs(parent).map_err(|e| io_error(&e, parent))?;
    }
    std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(path)
        .map_err(|e| io_error(&e, path))
}

/// Streams `body` into `path` as `user` (see [`open_for_upload`]); returns the
/// written file.
async fn write_file(
    path: &Path,
    user: &User,
    mut body: impl Stream<Item = std::io::Result<Bytes>> + Unpin,
) -> Result<std::fs::File, HttpError> {
    let file = as_user(user, {
        let path = path.to_path_buf();
        move || open_for_upload(&path)
    })
    .await?;
    // Body chunks are small; batching them saves a blocking-pool round trip per chunk.
    let mut file = tokio::io::BufWriter::with_capacity(4 * CHUNK, tokio::fs::File::from_std(file));
    while let Some(chunk) = body.next().await {
        let chunk = chunk.map_err(|e| {
            if e.kind() == std::io::ErrorKind::InvalidData {
                http_error(
                    StatusCode::BAD_REQUEST,
                    format!("invalid request body: {e}"),
                )
            } else {
                http_error(
                    StatusCode::BAD_REQUEST,
                    format!("reading request body: {e}"),
                )
            }
        })?;
        file.write_all(&chunk)
            .await
            .map_err(|e| io_error(&e, path))?;
    }
    file.flush().await.map_err(|e| io_error(&e, path))?;
    Ok(file.into_inner().into_std().await)
}

/// Sets the uploaded file's metadata (as `user`) and describes it.
async fn finish_entry(
    path: &Path,
    user: &User,
    file: std::fs::File,
    meta: &[(String, String)],
) -> Result<UploadedEntry, HttpError> {
    let metadata = as_user(user, {
        let (path, meta) = (path.to_path_buf(), meta.to_vec());
        move || {
            set_metadata(&file, &meta).map_err(|e| io_error(&e, &path))?;
            Ok::<_, HttpError>(read_file_metadata(&file))
        }
    })
    .await?;
    Ok(UploadedEntry {
        path: path.display().to_string(),
        name: path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default(),
        kind: "file".into(),
        metadata,
    })
}

pub async fn upload(
    State(st): State<Arc<AppState>>,
    headers: HeaderMap,
    Query(q): Query<FileQuery>,
    body: Body,
) -> Response {
    // The body is read through a pump task. When the upload fails before the body
    // is consumed (bad token, unknown user, full disk), the pump drains what the
    // client still sends, so it reads our answer instead of a reset connection.
    let (tx, mut rx) = tokio::sync::mpsc::channel::<std::io::Result<Bytes>>(8);
    let pump = tokio::spawn(async move {
        let mut data = body.into_data_stream();
        let mut drained: u64 = 0;
        let mut consumer_gone = false;
        while let Some(chunk) = data.next().await {
            let chunk = chunk.map_err(std::io::Error::other);
            if !consumer_gone {
                if let Err(unsent) = tx.send(chunk).await {
                    consumer_gone = true;
                    drained += unsent.0.map(|c| c.len() as u64).unwrap_or(0);
                }
            } else if let Ok(c) = chunk {
                drained += c.len() as u64;
                if drained > MAX_DRAIN {
                    break;
                }
            }
        }
    });
    let stream: ByteStream = Box::pin(futures_util::stream::poll_fn(move |cx| rx.poll_recv(cx)));
    let result = upload_inner(&st, &headers, &q, stream).await;
    let _ = tokio::time::timeout(DRAIN_TIMEOUT, pump).await;
    match result {
        Ok(entries) => (StatusCode::OK, axum::Json(entries)).into_response(),
        Err(e) => e.into_response(),
    }
}

/// Most of a failed upload's body read (and discarded) before answering.
const MAX_DRAIN: u64 = 1 << 30;
const DRAIN_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

async fn upload_inner(
    st: &AppState,
    headers: &HeaderMap,
    q: &FileQuery,
    raw: ByteStream,
) -> Result<Vec<UploadedEntry>, HttpError> {
    check_file_access(st, headers, q, "write")?;
    let user = file_user(st, q)?;
    let meta = parse_metadata(headers)?;
    let query_path = q.path.as_deref().filter(|p| !p.is_empty());

    let encoding = headers
        .get(header::CONTENT_ENCODING)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("identity");
    let stream: ByteStream = match encoding.trim().to_ascii_lowercase().as_str() {
        "" | "identity" => raw,
        "gzip" | "x-gzip" => {
            let dec = GzipDecoder::new(StreamReader::new(raw));
            Box::pin(ReaderStream::with_capacity(dec, CHUNK))
        }
        other => {
            return Err(http_error(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                format!("unsupported content encoding '{other}'"),
            ))
        }
    };

    let ct = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let base = ct
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    match base.as_str() {
        "application/octet-stream" => {
            let raw_path = query_path.ok_or_else(|| {
                http_error(
                    StatusCode::BAD_REQUEST,
                    "query parameter 'path' is required for octet-stream uploads",
                )
            })?;
            let path = st.resolve_path(raw_path, &user);
            let file = write_file(&path, &user, stream).await?;
            Ok(vec![finish_entry(&path, &user, file, &meta).await?])
        }
        "multipart/form-data" => {
            let boundary = multer::parse_boundary(ct).map_err(|e| {
                http_error(
                    StatusCode::BAD_REQUEST,
                    format!("invalid multipart content type: {e}"),
                )
            })?;
            let mut mp = multer::Multipart::new(stream, boundary);
            let mut dests = Destinations::new(query_path);
            let mut out = Vec::new();
            loop {
                let field = mp.next_field().await.map_err(|e| {
                    http_error(
                        StatusCode::BAD_REQUEST,
                        format!("invalid multipart body: {e}"),
                    )
                })?;
                let Some(field) = field else { break };
                if field.name() != Some("file") {
                    continue;
                }
                let path = dests
                    .next(field.file_name(), |dest| st.resolve_path(dest, &user))
                    .map_err(|e| http_error(StatusCode::BAD_REQUEST, e.to_string()))?;
                let data = field.map_err(std::io::Error::other);
                let file = write_file(&path, &user, Box::pin(data)).await?;
                out.push(finish_entry(&path, &user, file, &meta).await?);
            }
            Ok(out)
        }
        _ => Err(http_error(
            StatusCode::BAD_REQUEST,
            format!("unsupported content type '{ct}'"),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn metadata_map(headers: &HeaderMap) -> Option<HashMap<String, String>> {
        parse_metadata(headers)
            .ok()
            .map(|v| v.into_iter().collect())
    }

    #[test]
    fn accept_encoding_negotiation() {
        assert_eq!(
            parse_accept_encoding(None),
            Accept {
                gzip: 0.0,
                identity: 1.0
            }
        );
        assert_eq!(
            parse_accept_encoding(Some("gzip")),
            Accept {
                gzip: 1.0,
                identity: 1.0
            }
        );
        assert_eq!(
            parse_accept_encoding(Some("gzip;q=0.5, identity;q=0")),
            Accept {
                gzip: 0.5,
                identity: 0.0
            }
        );
        assert_eq!(
            parse_accept_encoding(Some("*;q=0")),
            Accept {
                gzip: 0.0,
                identity: 0.0
            }
        );
        assert_eq!(
            parse_accept_encoding(Some("br")),
            Accept {
                gzip: 0.0,
                identity: 1.0
            }
        );
    }

    #[test]
    fn ranges() {
        assert_eq!(parse_range("bytes=0-9", 100), Some(Ok((0, 9))));
        assert_eq!(parse_range("bytes=90-", 100), Some(Ok((90, 99))));
        assert_eq!(parse_range("bytes=-10", 100), Some(Ok((90, 99))));
        assert_eq!(parse_range("bytes=100-", 100), Some(Err(())));
        assert_eq!(parse_range("bytes=0-1,5-6", 100), None);
        assert_eq!(parse_range("items=1-2", 100), None);
    }

    #[test]
    fn metadata_headers_validated() {
        let mut h = HeaderMap::new();
        h.insert("x-metadata-Owner", "alice".parse().unwrap());
        assert_eq!(
            metadata_map(&h).unwrap().get("owner").map(String::as_str),
            Some("alice")
        );
        h.insert("x-metadata-big", "x".repeat(5000).parse().unwrap());
        assert!(metadata_map(&h).is_none());
    }

    // ---- permissions: the handlers act with the requested user's rights ----

    use crate::server::test_support::{can_run, owner, state, Tree, GID, UID, USER};

    fn query(path: &str, user: &str) -> FileQuery {
        FileQuery {
            path: Some(path.to_string()),
            username: Some(user.to_string()),
            ..Default::default()
        }
    }

    /// `GET /files` through the handler; status and body.
    async fn get(st: &Arc<AppState>, path: &str, user: &str) -> (StatusCode, Bytes) {
        let resp = match download(
            State(st.clone()),
            HeaderMap::new(),
            Query(query(path, user)),
        )
        .await
        {
            Ok(r) => r,
            Err(e) => e.into_response(),
        };
        let status = resp.status();
        let body = axum::body::to_bytes(resp.into_body(), usize::MAX)
            .await
            .unwrap();
        (status, body)
    }

    /// `POST /files` (octet-stream) through the handler; status and body.
    async fn put(
        st: &Arc<AppState>,
        path: &str,
        user: &str,
        data: &'static [u8],
    ) -> (StatusCode, Bytes) {
        let mut headers = HeaderMap::new();
        headers.insert(
            header::CONTENT_TYPE,
            "application/octet-stream".parse().unwrap(),
        );
        let resp = upload(
            State(st.clone()),
            headers,
            Query(query(path, user)),
            Body::from(data),
        )
        .await;
        let status = resp.status();
        let body = axum::body::to_bytes(resp.into_body(), usize::MAX)
            .await
            .unwrap();
        (status, body)
    }

    fn error_code(body: &[u8]) -> Option<i64> {
        serde_json::from_slice::<serde_json::Value>(body)
            .ok()
            .and_then(|v| v["code"].as_i64())
    }

    #[tokio::test]
    async fn download_honours_the_users_permissions() {
        if !can_run() {
            return;
        }
        let t = Tree::new("dl");
        let st = state();
        // A 0600 root file: forbidden to the user, with envd's JSON error shape.
        let (status, body) = get(&st, &t.s("secret"), USER).await;
        assert_eq!(status, StatusCode::FORBIDDEN, "{body:?}");
        assert_eq!(error_code(&body), Some(403), "{body:?}");
        // Also through a symlink the user controls, and inside a 0700 directory.
        let (status, _) = get(&st, &t.s("userdir/link_secret"), USER).await;
        assert_eq!(status, StatusCode::FORBIDDEN);
        let (status, _) = get(&st, &t.s("private/file"), USER).await;
        assert_eq!(status, StatusCode::FORBIDDEN);
        // What the user may read, it reads; root reads everything.
        assert_eq!(
            get(&st, &t.s("public.txt"), USER).await,
            (StatusCode::OK, Bytes::from_static(b"hello"))
        );
        assert_eq!(
            get(&st, &t.s("secret"), "root").await,
            (StatusCode::OK, Bytes::from_static(b"top secret"))
        );
        assert_eq!(
            get(&st, &t.s("private/file"), "root").await.0,
            StatusCode::OK
        );
        // Unchanged answers for missing paths and directories.
        assert_eq!(get(&st, &t.s("nope"), USER).await.0, StatusCode::NOT_FOUND);
        assert_eq!(
            get(&st, &t.s("userdir"), USER).await.0,
            StatusCode::BAD_REQUEST
        );
    }

    #[tokio::test]
    async fn upload_runs_as_the_user() {
        if !can_run() {
            return;
        }
        let t = Tree::new("ul");
        let st = state();
        // Into a root-owned 0755 directory: refused, nothing created.
        let (status, body) = put(&st, &t.s("rootonly/x"), USER, b"data").await;
        assert_eq!(status, StatusCode::FORBIDDEN, "{body:?}");
        assert_eq!(error_code(&body), Some(403));
        assert!(!t.p("rootonly/x").exists());
        // Missing parents under a directory the user cannot write: refused too.
        let (status, _) = put(&st, &t.s("private/a/b"), USER, b"data").await;
        assert_eq!(status, StatusCode::FORBIDDEN);
        assert!(!t.p("private/a").exists());
        // Symlinks the user planted are not a way into root's files.
        let (status, _) = put(&st, &t.s("userdir/link_new"), USER, b"planted").await;
        assert_eq!(status, StatusCode::FORBIDDEN);
        assert!(!t.p("rootonly/planted").exists());
        let (status, _) = put(&st, &t.s("userdir/link_secret"), USER, b"overwritten").await;
        assert_eq!(status, StatusCode::FORBIDDEN);
        assert_eq!(std::fs::read(t.p("secret")).unwrap(), b"top secret");
        let (status, _) = put(&st, &t.s("userdir/link_dir/x"), USER, b"data").await;
        assert_eq!(status, StatusCode::FORBIDDEN);
        assert!(!t.p("rootonly/x").exists());
        // Where the user may write: parents created, everything owned by the user.
        let (status, body) = put(&st, &t.s("userdir/a/b/c.txt"), USER, b"mine").await;
        assert_eq!(status, StatusCode::OK, "{body:?}");
        assert_eq!(std::fs::read(t.p("userdir/a/b/c.txt")).unwrap(), b"mine");
        for p in ["userdir/a", "userdir/a/b", "userdir/a/b/c.txt"] {
            assert_eq!(owner(&t.p(p)), (UID, GID), "{p}");
        }
        // Root keeps full access, and what root writes stays root's.
        let (status, _) = put(&st, &t.s("rootonly/x"), "root", b"root data").await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(owner(&t.p("rootonly/x")), (0, 0));
        let (status, _) = put(&st, &t.s("private/a/b"), "root", b"root data").await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(owner(&t.p("private/a")), (0, 0));
    }

    /// The file belongs to the user while its body is still arriving (no
    /// create-as-root-then-chown window).
    #[tokio::test]
    async fn uploaded_file_is_the_users_from_the_start() {
        if !can_run() {
            return;
        }
        let t = Tree::new("own");
        let st = state();
        let (tx, mut rx) = tokio::sync::mpsc::channel::<std::io::Result<Bytes>>(4);
        let body = Body::from_stream(futures_util::stream::poll_fn(move |cx| rx.poll_recv(cx)));
        let mut headers = HeaderMap::new();
        headers.insert(
            header::CONTENT_TYPE,
            "application/octet-stream".parse().unwrap(),
        );
        let q = query(&t.s("userdir/new/streamed.bin"), USER);
        let call = tokio::spawn(upload(State(st.clone()), headers, Query(q), body));
        tx.send(Ok(Bytes::from_static(b"first "))).await.unwrap();
        let path = t.p("userdir/new/streamed.bin");
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while !path.exists() {
            assert!(std::time::Instant::now() < deadline, "file never appeared");
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
        assert_eq!(
            owner(&path),
            (UID, GID),
            "owner while the upload is in flight"
        );
        assert_eq!(owner(&t.p("userdir/new")), (UID, GID));
        tx.send(Ok(Bytes::from_static(b"second"))).await.unwrap();
        drop(tx);
        let resp = call.await.unwrap();
        assert_eq!(resp.status(), StatusCode::OK);
        assert_eq!(std::fs::read(&path).unwrap(), b"first second");
        assert_eq!(owner(&path), (UID, GID));
    }

    /// Many user and root operations on a runtime whose blocking pool has a
    /// single thread: each one sees exactly its own user's rights.
    #[test]
    fn pool_thread_identity_never_leaks_between_requests() {
        if !can_run() {
            return;
        }
        let rt = tokio::runtime::Builder::new_current_thread()
            .max_blocking_threads(1)
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let t = Tree::new("pool");
            let st = state();
            for i in 0..25 {
                assert_eq!(
                    get(&st, &t.s("secret"), USER).await.0,
                    StatusCode::FORBIDDEN,
                    "round {i}"
                );
                assert_eq!(
                    get(&st, &t.s("secret"), "root").await.0,
                    StatusCode::OK,
                    "round {i}"
                );
                assert_eq!(
                    put(&st, &t.s("rootonly/r"), USER, b"u").await.0,
                    StatusCode::FORBIDDEN
                );
                assert_eq!(
                    put(&st, &t.s("rootonly/r"), "root", b"r").await.0,
                    StatusCode::OK
                );
                assert_eq!(owner(&t.p("rootonly/r")), (0, 0), "round {i}");
                assert_eq!(
                    put(&st, &t.s("userdir/u"), USER, b"u").await.0,
                    StatusCode::OK
                );
                assert_eq!(owner(&t.p("userdir/u")), (UID, GID), "round {i}");
            }
        });
    }
}
