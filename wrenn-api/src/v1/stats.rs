//! Team-level usage: `/v1/capsules/stats` and `/v1/capsules/usage`.

use crate::auth::Auth;
use crate::error::{ApiError, ApiResult, ErrorBody};
use crate::state::AppState;
use axum::extract::{Query, State};
use axum::Json;
use serde::{Deserialize, Serialize};
use std::sync::Arc;
use utoipa::{IntoParams, ToSchema};

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
    let load = wrenn_db::Load::of(rows.iter().map(|c| (c.status, c.vcpus, c.memory_mb)));
    let now = wrenn_db::now();
    let peaks = st
        .db
        .team_peaks(&who.team_id, now - chrono::Duration::days(PEAK_DAYS))
        .await?;
    let (span, step) = range_span(&range);
    let samples = st.db.team_samples(&who.team_id, now - span).await?;
    Ok(Json(CapsuleStats {
        range,
        current: Current {
            running_count: load.running_count,
            vcpus_reserved: load.vcpus,
            memory_mb_reserved: load.memory_mb,
            sampled_at: now,
        },
        peaks: Peaks {
            running_count: peaks.running_count.max(load.running_count),
            vcpus: peaks.vcpus.max(load.vcpus),
            memory_mb: peaks.memory_mb.max(load.memory_mb),
        },
        series: series(&samples, now, span, step),
    }))
}

/// Peaks are over this many days.
const PEAK_DAYS: i64 = 30;

/// How far back a range reaches, and the width of its points.
fn range_span(range: &str) -> (chrono::Duration, chrono::Duration) {
    use chrono::Duration as D;
    match range {
        "1h" => (D::hours(1), D::minutes(1)),
        "6h" => (D::hours(6), D::minutes(5)),
        "24h" => (D::hours(24), D::minutes(15)),
        "30d" => (D::days(30), D::hours(6)),
        _ => (D::minutes(5), D::seconds(wrenn_db::SAMPLE_SECS)),
    }
}

/// The samples in points of width `step` ending now: each point the highest of its
/// samples (no sample: the team held nothing).
fn series(
    samples: &[wrenn_db::Sample],
    now: chrono::DateTime<chrono::Utc>,
    span: chrono::Duration,
    step: chrono::Duration,
) -> Series {
    let step_s = step.num_seconds().max(1);
    let end = wrenn_db::slot_of(now).timestamp();
    let end = end - end.rem_euclid(step_s);
    let n = (span.num_seconds() / step_s).max(1);
    let first = end - (n - 1) * step_s;
    let mut out = Series {
        labels: Vec::new(),
        running: vec![0; n as usize],
        vcpus: vec![0; n as usize],
        memory_mb: vec![0; n as usize],
    };
    for i in 0..n {
        if let Some(t) = chrono::DateTime::from_timestamp(first + i * step_s, 0) {
            out.labels.push(t);
        }
    }
    for s in samples {
        let t = s.at.timestamp();
        if t < first || t >= end + step_s {
            continue;
        }
        let i = ((t - first) / step_s) as usize;
        if i < out.running.len() {
            out.running[i] = out.running[i].max(s.load.running_count);
            out.vcpus[i] = out.vcpus[i].max(s.load.vcpus);
            out.memory_mb[i] = out.memory_mb[i].max(s.load.memory_mb);
        }
    }
    out
}

/// Samples are kept this long.
const KEEP_SAMPLES_DAYS: i64 = 60;

/// Samples every team's load each 10 s; each hour forgets old samples and rolls the
/// last two days up into the daily usage.
pub fn spawn_sampler(st: Arc<AppState>) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let every = std::time::Duration::from_secs(wrenn_db::SAMPLE_SECS as u64);
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut housekeeping: Option<std::time::Instant> = None;
        loop {
            tick.tick().await;
            if let Err(e) = st.db.record_team_samples().await {
                tracing::warn!(error = %e, "team load not sampled");
            }
            if housekeeping.is_none_or(|t| t.elapsed() >= std::time::Duration::from_secs(3600)) {
                housekeeping = Some(std::time::Instant::now());
                let now = wrenn_db::now();
                let _ = st
                    .db
                    .prune_team_samples(now - chrono::Duration::days(KEEP_SAMPLES_DAYS))
                    .await;
                for back in 1..=2 {
                    let day = (now - chrono::Duration::days(back)).date_naive();
                    if let Err(e) = st.db.roll_up_usage(day).await {
                        tracing::warn!(%day, error = %e, "usage not rolled up");
                    }
                }
            }
        }
    })
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

/// Reserved vCPU and memory minutes per day, from the team's load sampled every 10 s:
/// running capsules count their vCPUs and memory, paused ones no vCPU and half their
/// memory. Past days come from the hourly roll-up, today from the samples so far.
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
    let days = st.db.team_daily_usage(&who.team_id, from, to).await?;
    let mut points = Vec::new();
    let mut d = from;
    while d <= to {
        let u = days.iter().find(|u| u.day == d);
        points.push(UsagePoint {
            date: d,
            cpu_minutes: u.map_or(0.0, |u| u.cpu_minutes),
            ram_mb_minutes: u.map_or(0.0, |u| u.ram_mb_minutes),
        });
        d = match d.succ_opt() {
            Some(n) => n,
            None => break,
        };
    }
    Ok(Json(Usage { from, to, points }))
}
