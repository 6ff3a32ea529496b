//! Plain HTTP routes: `/health`, `/init`, `/metrics`, `/envs`.

use super::auth::{check_token_header, http_error, HttpError};
use super::AppState;
use crate::proto::{InitRequest, Metrics};
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Clock drift tolerated before `/init` sets the guest clock.
const CLOCK_TOLERANCE: Duration = Duration::from_millis(50);

pub async fn health() -> Response {
    (
        StatusCode::NO_CONTENT,
        [(header::CACHE_CONTROL, "no-store")],
    )
        .into_response()
}

pub async fn envs(State(st): State<Arc<AppState>>) -> Response {
    (StatusCode::OK, axum::Json(st.default_env())).into_response()
}

fn now_ns() -> i128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as i128)
        .unwrap_or(0)
}

/// `/init` timestamp: RFC 3339 string (any offset) or unix seconds (number or numeric string).
fn parse_init_timestamp(v: &serde_json::Value) -> Option<i128> {
    match v {
        serde_json::Value::Number(n) => n.as_f64().map(|s| (s * 1e9) as i128),
        serde_json::Value::String(s) => {
            if let Ok(secs) = s.parse::<f64>() {
                return Some((secs * 1e9) as i128);
            }
            serde_json::from_value::<crate::proto::Timestamp>(v.clone())
                .ok()
                .map(|t| i128::from(t.seconds) * 1_000_000_000 + i128::from(t.nanos))
        }
        _ => None,
    }
}

fn set_clock(ns: i128) -> std::io::Result<()> {
    let secs = i64::try_from(ns.div_euclid(1_000_000_000)).map_err(std::io::Error::other)?;
    let nanos = i64::try_from(ns.rem_euclid(1_000_000_000)).map_err(std::io::Error::other)?;
    let ts = nix::sys::time::TimeSpec::new(secs, nanos);
    nix::time::clock_settime(nix::time::ClockId::CLOCK_REALTIME, ts).map_err(std::io::Error::from)
}

pub async fn init(
    State(st): State<Arc<AppState>>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, HttpError> {
    check_token_header(&st, &headers)?;
    let req: InitRequest = if body.iter().all(u8::is_ascii_whitespace) {
        InitRequest::default()
    } else {
        serde_json::from_slice(&body)
            .map_err(|e| http_error(StatusCode::BAD_REQUEST, format!("invalid init body: {e}")))?
    };
    let stamp = match req.timestamp.as_ref() {
        None | Some(serde_json::Value::Null) => None,
        Some(v) => match parse_init_timestamp(v) {
            Some(t) => Some(t),
            None => {
                return Err(http_error(
                    StatusCode::BAD_REQUEST,
                    format!("invalid timestamp {v}"),
                ))
            }
        },
    };
    if let Some(user) = req.default_user.as_deref().filter(|u| !u.is_empty()) {
        if super::users::lookup_user(user).is_none() {
            return Err(http_error(
                StatusCode::BAD_REQUEST,
                format!("default user '{user}' does not exist"),
            ));
        }
    }
    if let Some(b64) = req.entropy.as_deref() {
        use base64::Engine as _;
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(b64)
            .map_err(|e| http_error(StatusCode::BAD_REQUEST, format!("invalid entropy: {e}")))?;
        // Mixed in even when the /init is stale: fresh randomness never hurts. A
        // guest that cannot reseed says so instead of running with a cloned RNG.
        super::entropy::inject(&bytes).map_err(|e| {
            http_error(
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("cannot reseed the kernel RNG: {e}"),
            )
        })?;
        tracing::debug!(bytes = bytes.len(), "kernel RNG reseeded");
    }
    {
        let Ok(mut d) = st.defaults.write() else {
            return Err(http_error(
                StatusCode::INTERNAL_SERVER_ERROR,
                "state poisoned",
            ));
        };
        if let (Some(t), Some(last)) = (stamp, d.last_init_ns) {
            if t <= last {
                // A stale or replayed /init: acknowledged, not applied.
                return Ok(StatusCode::NO_CONTENT.into_response());
            }
        }
        if let Some(t) = stamp {
            d.last_init_ns = Some(t);
            let drift = (now_ns() - t).unsigned_abs();
            if st.config.sync_clock && drift > CLOCK_TOLERANCE.as_nanos() {
                match set_clock(t) {
                    Ok(()) => tracing::info!(
                        drift_ms = drift / 1_000_000,
                        "guest clock set from host time"
                    ),
                    Err(e) => tracing::warn!(error = %e, "cannot set the guest clock"),
                }
            }
        }
        if let Some(env) = req.env_vars {
            if let Some(path) = &st.config.env_file {
                if let Err(e) = write_env_file(path, &env) {
                    tracing::warn!(path = %path.display(), error = %e, "cannot write the environment file");
                }
            }
            d.env_vars = env;
        }
        if let Some(user) = req.default_user.filter(|u| !u.is_empty()) {
            d.user = Some(user);
        }
        if let Some(dir) = req.default_workdir.filter(|u| !u.is_empty()) {
            d.workdir = Some(dir);
        }
    }
    if let Ok(mut t) = st.token.write() {
        *t = req.access_token.filter(|t| !t.is_empty());
    }
    Ok((
        StatusCode::NO_CONTENT,
        [(header::CACHE_CONTROL, "no-store")],
    )
        .into_response())
}

/// Writes `env` to `path` as `/proc/PID/environ` is written (`KEY=VALUE` entries, each
/// ending in NUL, sorted), readable by every user of the guest (whose processes get
/// these variables anyway), replacing the file atomically.
fn write_env_file(path: &std::path::Path, env: &HashMap<String, String>) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let mut entries: Vec<_> = env.iter().collect();
    entries.sort();
    let mut data = Vec::new();
    for (k, v) in entries {
        data.extend_from_slice(k.as_bytes());
        data.push(b'=');
        data.extend_from_slice(v.as_bytes());
        data.push(0);
    }
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o644)
        .open(&tmp)?;
    f.set_permissions(std::fs::Permissions::from_mode(0o644))?;
    f.write_all(&data)?;
    drop(f);
    std::fs::rename(&tmp, path)
}

/// Cumulative CPU jiffies from `/proc/stat`.
#[derive(Clone, Copy, Debug)]
pub struct CpuSample {
    busy: u64,
    total: u64,
}

impl CpuSample {
    pub fn read() -> Option<Self> {
        let text = std::fs::read_to_string("/proc/stat").ok()?;
        let line = text.lines().next()?;
        let vals: Vec<u64> = line
            .split_whitespace()
            .skip(1)
            .filter_map(|v| v.parse().ok())
            .collect();
        if vals.len() < 4 {
            return None;
        }
        let idle = vals[3] + vals.get(4).copied().unwrap_or(0);
        let total: u64 = vals.iter().take(8).sum();
        Some(CpuSample {
            busy: total - idle,
            total,
        })
    }
}

fn meminfo() -> (u64, u64, u64) {
    let text = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let get = |key: &str| {
        text.lines()
            .find(|l| l.starts_with(key))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0)
            * 1024
    };
    let total = get("MemTotal:");
    let available = get("MemAvailable:");
    let cache = get("Cached:") + get("Buffers:");
    (total, total.saturating_sub(available), cache)
}

pub async fn metrics(State(st): State<Arc<AppState>>) -> Response {
    let now = CpuSample::read();
    let cpu_used_pct = match (
        st.cpu
            .lock()
            .ok()
            .and_then(|mut g| std::mem::replace(&mut *g, now)),
        now,
    ) {
        (Some(prev), Some(cur)) if cur.total > prev.total => {
            let pct = (cur.busy.saturating_sub(prev.busy)) as f64 * 100.0
                / (cur.total - prev.total) as f64;
            (pct * 100.0).round() as f32 / 100.0
        }
        _ => 0.0,
    };
    let (mem_total, mem_used, mem_cache) = meminfo();
    let (disk_total, disk_used) = match nix::sys::statvfs::statvfs("/") {
        #[allow(clippy::unnecessary_cast)]
        Ok(s) => {
            let f = s.fragment_size() as u64;
            let total = s.blocks() as u64 * f;
            (total, total.saturating_sub(s.blocks_free() as u64 * f))
        }
        Err(_) => (0, 0),
    };
    let m = Metrics {
        ts: i64::try_from(now_ns() / 1_000_000_000).unwrap_or(0),
        cpu_count: std::thread::available_parallelism()
            .map(|n| n.get() as u32)
            .unwrap_or(1),
        cpu_used_pct,
        mem_total,
        mem_used,
        mem_cache,
        mem_total_mib: mem_total / (1024 * 1024),
        mem_used_mib: mem_used / (1024 * 1024),
        disk_used,
        disk_total,
    };
    (
        StatusCode::OK,
        [(header::CACHE_CONTROL, "no-store")],
        axum::Json(m),
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn init_timestamps_parse() {
        assert_eq!(
            parse_init_timestamp(&serde_json::json!(1.5)),
            Some(1_500_000_000)
        );
        assert_eq!(
            parse_init_timestamp(&serde_json::json!("2")),
            Some(2_000_000_000)
        );
        assert_eq!(
            parse_init_timestamp(&serde_json::json!("1970-01-01T00:00:01.000000002Z")),
            Some(1_000_000_002)
        );
        assert_eq!(parse_init_timestamp(&serde_json::json!("yesterday")), None);
    }

    #[test]
    fn env_file_is_environ_shaped_and_world_readable() {
        use std::os::unix::fs::PermissionsExt;
        let dir = std::env::temp_dir().join(format!("envd-env-{}", std::process::id()));
        let path = dir.join("run/env");
        let env = HashMap::from([
            ("B".to_string(), "two words\nand a line".to_string()),
            ("A".to_string(), "1=one".to_string()),
        ]);
        write_env_file(&path, &env).unwrap();
        assert_eq!(
            std::fs::read(&path).unwrap(),
            b"A=1=one\0B=two words\nand a line\0"
        );
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o644);
        // Replaced whole by the next /init.
        write_env_file(&path, &HashMap::new()).unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
