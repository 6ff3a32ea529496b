//! `GET /files` and `POST /files`: streamed downloads and uploads (multipart or
//! octet-stream, gzip both ways, byte ranges, signed URLs, xattr metadata).
//! Bodies are never held whole in memory.

use super::auth::{check_file_access, http_error, FileQuery, HttpError};
use super::filesystem::{create_dir_all_owned, read_metadata, XATTR_PREFIX};
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
use std::collections::HashSet;
use std::path::{Path, PathBuf};
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
    let meta = tokio::fs::metadata(&path)
        .await
        .map_err(|e| io_error(&e, &path))?;
    if meta.is_dir() {
        return Err(http_error(
            StatusCode::BAD_REQUEST,
            format!("path '{}' is a directory", path.display()),
        ));
    }
    let mut file = tokio::fs::File::open(&path)
        .await
        .map_err(|e| io_error(&e, &path))?;
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
    let len = meta.len();
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

/// Replaces a file's user metadata with `meta`.
fn set_metadata(path: &Path, meta: &[(String, String)]) -> std::io::Result<()> {
    if let Ok(names) = xattr::list(path) {
        for n in names {
            if n.to_str().is_some_and(|s| s.starts_with(XATTR_PREFIX)) {
                xattr::remove(path, &n)?;
            }
        }
    }
    for (k, v) in meta {
        xattr::set(path, format!("{XATTR_PREFIX}{k}"), v.as_bytes())?;
    }
    Ok(())
}

/// Streams `body` into `path` (parents created, truncated, owned by `user`).
async fn write_file(
    path: &Path,
    user: &User,
    mut body: impl Stream<Item = std::io::Result<Bytes>> + Unpin,
) -> Result<(), HttpError> {
    if let Some(parent) = path.parent() {
        let (p, u) = (parent.to_path_buf(), user.clone());
        let res = tokio::task::spawn_blocking(move || create_dir_all_owned(&p, &u))
            .await
            .unwrap_or_else(|e| Err(std::io::Error::other(e)));
        res.map_err(|e| io_error(&e, parent))?;
    }
    if tokio::fs::metadata(path)
        .await
        .map(|m| m.is_dir())
        .unwrap_or(false)
    {
        return Err(http_error(
            StatusCode::BAD_REQUEST,
            format!("path '{}' is a directory", path.display()),
        ));
    }
    let file = tokio::fs::File::create(path)
        .await
        .map_err(|e| io_error(&e, path))?;
    // Body chunks are small; batching them saves a blocking-pool round trip per chunk.
    let mut file = tokio::io::BufWriter::with_capacity(4 * CHUNK, file);
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
    drop(file);
    std::os::unix::fs::lchown(path, Some(user.uid), Some(user.gid))
        .map_err(|e| io_error(&e, path))?;
    Ok(())
}

fn finish_entry(path: &Path, meta: &[(String, String)]) -> Result<UploadedEntry, HttpError> {
    set_metadata(path, meta).map_err(|e| io_error(&e, path))?;
    Ok(UploadedEntry {
        path: path.display().to_string(),
        name: path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default(),
        kind: "file".into(),
        metadata: read_metadata(path),
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
            write_file(&path, &user, stream).await?;
            Ok(vec![finish_entry(&path, &meta)?])
        }
        "multipart/form-data" => {
            let boundary = multer::parse_boundary(ct).map_err(|e| {
                http_error(
                    StatusCode::BAD_REQUEST,
                    format!("invalid multipart content type: {e}"),
                )
            })?;
            let mut mp = multer::Multipart::new(stream, boundary);
            let mut seen: HashSet<PathBuf> = HashSet::new();
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
                let dest = match (query_path, field.file_name()) {
                    (Some(p), _) => p.to_string(),
                    (None, Some(f)) if !f.is_empty() => f.to_string(),
                    _ => {
                        return Err(http_error(
                            StatusCode::BAD_REQUEST,
                            "a file part needs a filename or the 'path' query parameter",
                        ))
                    }
                };
                let path = st.resolve_path(&dest, &user);
                if !seen.insert(path.clone()) {
                    return Err(http_error(
                        StatusCode::BAD_REQUEST,
                        format!("two parts resolve to the same path '{}'", path.display()),
                    ));
                }
                let data = field.map_err(std::io::Error::other);
                write_file(&path, &user, Box::pin(data)).await?;
                out.push(finish_entry(&path, &meta)?);
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
}
