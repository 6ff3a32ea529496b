//! Team-level usage: `/v1/capsules/stats` and `/v1/capsules/usage`.

use crate::auth::Auth;
use crate::error::{ApiError, ApiResult, ErrorBody};
use crate::state::AppState;
use axum::extract::{Query, State};
use axum::Json;
use serde::{Deserialize, Serialize};
use std::sync::Arc;
use utoipa::{IntoParams, ToSchema};
use wrenn_core::status::CapsuleStatus;

#[derive(Debug, Deserialize, IntoParams)]
pub struct StatsQuery {
    /// 5m, 1h, 6h, 24h or 30d (default 5m).
    pub range: Option<String>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct Current {
    pub running_count: u32,
    pub vcpus_reserved: u32,
    pub memory_mb_reserved: u64,
    pub sampled_at: chrono::DateTime<chrono::Utc>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct Peaks {
    pub running_count: u32,
    pub vcpus: u32,
    pub memory_mb: u64,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct Series {
    pub labels: Vec<chrono::DateTime<chrono::Utc>>,
    pub running: Vec<u32>,
    pub vcpus: Vec<u32>,
    pub memory_mb: Vec<u64>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct CapsuleStats {
    pub range: String,
    pub current: Current,
    pub peaks: Peaks,
    pub series: Series,
}

#[utoipa::path(get, path = "/v1/capsules/stats", tag = "capsules", params(StatsQuery),
    responses((status = 200, body = CapsuleStats), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody)),
    security(("api_key" = []), ("bearer" = [])))]
pub async fn stats(
    State(st): State<Arc<AppState>>,
    Auth(who): Auth,
    Query(q): Query<StatsQuery>,
) -> ApiResult<Json<CapsuleStats>> {
    let range = q.range.unwrap_or_else(|| "5m".into());
    if !["5m", "1h", "6h", "24h", "30d"].contains(&range.as_str()) {
        return Err(ApiError::invalid(format!(
            "range {range:?}: expected 5m, 1h, 6h, 24h or 30d"
        )));
    }
    let rows = st.db.list_capsules(&who.team_id, false).await?;
    let running: Vec<_> = rows
        .iter()
        .filter(|c| c.status == CapsuleStatus::Running)
        .collect();
    let paused = rows.len() - running.len();
    let count = running.len() as u32;
    let vcpus: u32 = running.iter().map(|c| c.vcpus).sum();
    // Paused capsules hold half their memory's worth of host resources (disk state).
    let mem: u64 = running.iter().map(|c| u64::from(c.memory_mb)).sum::<u64>()
        + rows
            .iter()
            .filter(|c| c.status == CapsuleStatus::Paused)
            .map(|c| u64::from(c.memory_mb).div_ceil(2))
            .sum::<u64>();
    let _ = paused;
    let now = wrenn_db::now();
    Ok(Json(CapsuleStats {
        range,
        current: Current {
            running_count: count,
            vcpus_reserved: vcpus,
            memory_mb_reserved: mem,
            sampled_at: now,
        },
        peaks: Peaks {
            running_count: count,
            vcpus,
            memory_mb: mem,
        },
        series: Series {
            labels: vec![now],
            running: vec![count],
            vcpus: vec![vcpus],
            memory_mb: vec![mem],
        },
    }))
}

#[derive(Debug, Deserialize, IntoParams)]
pub struct UsageQuery {
    /// First day (YYYY-MM-DD), default 30 days ago.
    pub from: Option<String>,
    /// Last day (YYYY-MM-DD), default today.
    pub to: Option<String>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct UsagePoint {
    pub date: chrono::NaiveDate,
    pub cpu_minutes: f64,
    pub ram_mb_minutes: f64,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct Usage {
    pub from: chrono::NaiveDate,
    pub to: chrono::NaiveDate,
    pub points: Vec<UsagePoint>,
}

fn day(s: Option<&str>, default: chrono::NaiveDate, what: &str) -> ApiResult<chrono::NaiveDate> {
    match s {
        None | Some("") => Ok(default),
        Some(s) => chrono::NaiveDate::parse_from_str(s, "%Y-%m-%d")
            .map_err(|_| ApiError::invalid(format!("{what} must be a date (YYYY-MM-DD)"))),
    }
}

/// Reserved vCPU and memory minutes per day, from each capsule's life span (created to
/// last update for ended capsules, to now for live ones).
#[utoipa::path(get, path = "/v1/capsules/usage", tag = "capsules", params(UsageQuery),
    responses((status = 200, body = Usage), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody)),
    security(("api_key" = []), ("bearer" = [])))]
pub async fn usage(
    State(st): State<Arc<AppState>>,
    Auth(who): Auth,
    Query(q): Query<UsageQuery>,
) -> ApiResult<Json<Usage>> {
    let today = chrono::Utc::now().date_naive();
    let to = day(q.to.as_deref(), today, "to")?;
    let from = day(q.from.as_deref(), to - chrono::Duration::days(30), "from")?;
    if from > to || (to - from).num_days() > 366 {
        return Err(ApiError::invalid(
            "from must be before to, at most a year apart",
        ));
    }
    let rows = st.db.list_capsules(&who.team_id, true).await?;
    let now = chrono::Utc::now();
    let mut points = Vec::new();
    let mut d = from;
    while d <= to {
        let (Some(start), Some(end)) = (
            d.and_hms_opt(0, 0, 0).map(|t| t.and_utc()),
            d.succ_opt()
                .and_then(|n| n.and_hms_opt(0, 0, 0))
                .map(|t| t.and_utc()),
        ) else {
            break;
        };
        let (mut cpu, mut ram) = (0.0, 0.0);
        for c in &rows {
            let live_end = match c.status {
                CapsuleStatus::Stopped | CapsuleStatus::Error => c.last_updated,
                _ => now,
            };
            let a = c.created_at.max(start);
            let b = live_end.min(end);
            if b > a {
                let mins = (b - a).num_seconds() as f64 / 60.0;
                cpu += mins * f64::from(c.vcpus);
                ram += mins * f64::from(c.memory_mb);
            }
        }
        points.push(UsagePoint {
            date: d,
            cpu_minutes: (cpu * 10_000.0).round() / 10_000.0,
            ram_mb_minutes: (ram * 10_000.0).round() / 10_000.0,
        });
        d = match d.succ_opt() {
            Some(n) => n,
            None => break,
        };
    }
    Ok(Json(Usage { from, to, points }))
}
