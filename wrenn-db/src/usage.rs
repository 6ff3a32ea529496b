//! Team load over time (`team_samples`, one row per team and 10 s slot) and daily usage
//! rolled up from it (`daily_usage`).
//!
//! A sample counts what a team holds: its running capsules, their vCPUs, and their
//! memory plus half the memory of its paused ones (a paused capsule keeps no vCPU but
//! its memory image and disk). Recording is the one cross-team write here: every
//! control plane samples, and the slot key makes the second writer's row a no-op.

use crate::error::Ctx;
use crate::row::{int, text, ts, R};
use crate::time::{now, to_db, Timestamp};
use crate::{Db, DbError};
use sqlx::any::AnyRow;
use sqlx::Row;
use std::collections::BTreeMap;
use wrenn_core::status::CapsuleStatus;

/// Seconds one sample stands for.
pub const SAMPLE_SECS: i64 = 10;

/// A team's load at one moment.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Load {
    pub running_count: u32,
    pub vcpus: u32,
    pub memory_mb: u64,
}

impl Load {
    /// The load of capsules in these statuses with these sizes.
    pub fn of(capsules: impl IntoIterator<Item = (CapsuleStatus, u32, u32)>) -> Self {
        let mut l = Load::default();
        for (status, vcpus, memory_mb) in capsules {
            match status {
                CapsuleStatus::Running => {
                    l.running_count += 1;
                    l.vcpus += vcpus;
                    l.memory_mb += u64::from(memory_mb);
                }
                CapsuleStatus::Paused => l.memory_mb += u64::from(memory_mb).div_ceil(2),
                _ => {}
            }
        }
        l
    }

    fn is_zero(&self) -> bool {
        *self == Load::default()
    }
}

/// One stored sample.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Sample {
    pub at: Timestamp,
    pub load: Load,
}

/// One day's usage of a team.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct DayUsage {
    pub day: chrono::NaiveDate,
    pub cpu_minutes: f64,
    pub ram_mb_minutes: f64,
}

fn sample(row: &AnyRow) -> R<Sample> {
    let n =
        |c: &str| -> R<u64> { u64::try_from(int(row, c)?).map_err(|e| crate::row::decode(c, e)) };
    Ok(Sample {
        at: ts(row, "sampled_at")?,
        load: Load {
            running_count: u32::try_from(n("running_count")?).unwrap_or(u32::MAX),
            vcpus: u32::try_from(n("vcpus_reserved")?).unwrap_or(u32::MAX),
            memory_mb: n("memory_mb_reserved")?,
        },
    })
}

/// The 10 s slot `t` falls in (its start).
pub fn slot_of(t: Timestamp) -> Timestamp {
    let secs = t.timestamp();
    let start = secs - secs.rem_euclid(SAMPLE_SECS);
    chrono::DateTime::from_timestamp(start, 0).unwrap_or(t)
}

fn day_bounds(day: chrono::NaiveDate) -> (i64, i64) {
    let start = day.and_hms_opt(0, 0, 0).map(|t| t.and_utc());
    let end = day
        .succ_opt()
        .and_then(|d| d.and_hms_opt(0, 0, 0))
        .map(|t| t.and_utc());
    match (start, end) {
        (Some(s), Some(e)) => (to_db(s), to_db(e)),
        _ => (i64::MAX, i64::MAX),
    }
}

/// Minutes of a sum of per-sample values.
fn minutes(sum: i64) -> f64 {
    (sum as f64 * SAMPLE_SECS as f64 / 60.0 * 10_000.0).round() / 10_000.0
}

impl Db {
    /// Records every team's load now, in the current slot (teams holding nothing are
    /// not recorded: no row is a zero). Returns the teams recorded.
    pub async fn record_team_samples(&self) -> Result<usize, DbError> {
        let op = "record team samples";
        let rows = sqlx::query(
            "SELECT team_id, status, vcpus, memory_mb FROM capsules \
             WHERE status IN ('running', 'paused')",
        )
        .fetch_all(self.pool())
        .await
        .map_err(|e| Ctx::op(op).err(e))?;
        let mut by_team: BTreeMap<String, Vec<(CapsuleStatus, u32, u32)>> = BTreeMap::new();
        for r in &rows {
            let read = || -> R<(String, CapsuleStatus, u32, u32)> {
                let status = match text(r, "status")?.as_str() {
                    "running" => CapsuleStatus::Running,
                    _ => CapsuleStatus::Paused,
                };
                Ok((
                    text(r, "team_id")?,
                    status,
                    crate::row::u32_col(r, "vcpus")?,
                    crate::row::u32_col(r, "memory_mb")?,
                ))
            };
            let (team, status, vcpus, mem) = read().map_err(|e| DbError::backend(op, e))?;
            by_team.entry(team).or_default().push((status, vcpus, mem));
        }
        let at = to_db(slot_of(now()));
        let mut recorded = 0;
        for (team, caps) in by_team {
            let l = Load::of(caps);
            if l.is_zero() {
                continue;
            }
            sqlx::query(
                "INSERT INTO team_samples (team_id, sampled_at, running_count, vcpus_reserved, \
                 memory_mb_reserved) VALUES ($1, $2, $3, $4, $5) \
                 ON CONFLICT (team_id, sampled_at) DO NOTHING",
            )
            .bind(&team)
            .bind(at)
            .bind(i64::from(l.running_count))
            .bind(i64::from(l.vcpus))
            .bind(i64::try_from(l.memory_mb).unwrap_or(i64::MAX))
            .execute(self.pool())
            .await
            .map_err(|e| Ctx::op(op).err(e))?;
            recorded += 1;
        }
        Ok(recorded)
    }

    /// Team `team_id`'s samples since `since`, oldest first.
    pub async fn team_samples(
        &self,
        team_id: &str,
        since: Timestamp,
    ) -> Result<Vec<Sample>, DbError> {
        let rows = sqlx::query(
            "SELECT sampled_at, running_count, vcpus_reserved, memory_mb_reserved \
             FROM team_samples WHERE team_id = $1 AND sampled_at >= $2 ORDER BY sampled_at",
        )
        .bind(team_id)
        .bind(to_db(since))
        .fetch_all(self.pool())
        .await
        .map_err(|e| Ctx::op("team samples").err(e))?;
        rows.iter()
            .map(|r| sample(r).map_err(|e| DbError::backend("team samples", e)))
            .collect()
    }

    /// The highest of each of team `team_id`'s figures since `since`.
    pub async fn team_peaks(&self, team_id: &str, since: Timestamp) -> Result<Load, DbError> {
        let op = "team peaks";
        let row = sqlx::query(
            "SELECT COALESCE(MAX(running_count), 0) AS r, COALESCE(MAX(vcpus_reserved), 0) AS v, \
             COALESCE(MAX(memory_mb_reserved), 0) AS m FROM team_samples \
             WHERE team_id = $1 AND sampled_at >= $2",
        )
        .bind(team_id)
        .bind(to_db(since))
        .fetch_one(self.pool())
        .await
        .map_err(|e| Ctx::op(op).err(e))?;
        let read = || -> R<Load> {
            Ok(Load {
                running_count: u32::try_from(int(&row, "r")?).unwrap_or(0),
                vcpus: u32::try_from(int(&row, "v")?).unwrap_or(0),
                memory_mb: u64::try_from(int(&row, "m")?).unwrap_or(0),
            })
        };
        read().map_err(|e| DbError::backend(op, e))
    }

    /// Forgets samples taken before `before`; returns how many.
    pub async fn prune_team_samples(&self, before: Timestamp) -> Result<u64, DbError> {
        let done = sqlx::query("DELETE FROM team_samples WHERE sampled_at < $1")
            .bind(to_db(before))
            .execute(self.pool())
            .await
            .map_err(|e| Ctx::op("prune team samples").err(e))?;
        Ok(done.rows_affected())
    }

    /// Every team's usage on `day` from its samples, as `(team, usage)`.
    async fn usage_from_samples(
        &self,
        team_id: Option<&str>,
        day: chrono::NaiveDate,
    ) -> Result<Vec<(String, DayUsage)>, DbError> {
        let op = "usage from samples";
        let (start, end) = day_bounds(day);
        // SUM of a BIGINT is a NUMERIC on PostgreSQL: cast back.
        let sums = "SELECT team_id, CAST(SUM(vcpus_reserved) AS BIGINT) AS v, \
             CAST(SUM(memory_mb_reserved) AS BIGINT) AS m FROM team_samples \
             WHERE sampled_at >= $1 AND sampled_at < $2";
        let rows = match team_id {
            Some(team) => {
                sqlx::query(&format!("{sums} AND team_id = $3 GROUP BY team_id"))
                    .bind(start)
                    .bind(end)
                    .bind(team)
                    .fetch_all(self.pool())
                    .await
            }
            None => {
                sqlx::query(&format!("{sums} GROUP BY team_id"))
                    .bind(start)
                    .bind(end)
                    .fetch_all(self.pool())
                    .await
            }
        }
        .map_err(|e| Ctx::op(op).err(e))?;
        rows.iter()
            .map(|r| {
                let read = || -> R<(String, DayUsage)> {
                    Ok((
                        text(r, "team_id")?,
                        DayUsage {
                            day,
                            cpu_minutes: minutes(int(r, "v")?),
                            ram_mb_minutes: minutes(int(r, "m")?),
                        },
                    ))
                };
                read().map_err(|e| DbError::backend(op, e))
            })
            .collect()
    }

    /// Rolls `day` up into `daily_usage` for every team (rerunning it replaces the
    /// day's rows); returns the teams written.
    pub async fn roll_up_usage(&self, day: chrono::NaiveDate) -> Result<usize, DbError> {
        let op = "roll up usage";
        let usage = self.usage_from_samples(None, day).await?;
        for (team, u) in &usage {
            sqlx::query(
                "INSERT INTO daily_usage (team_id, day, cpu_minutes, ram_mb_minutes) \
                 VALUES ($1, $2, $3, $4) ON CONFLICT (team_id, day) DO UPDATE SET \
                 cpu_minutes = excluded.cpu_minutes, ram_mb_minutes = excluded.ram_mb_minutes",
            )
            .bind(team)
            .bind(day.to_string())
            .bind(u.cpu_minutes)
            .bind(u.ram_mb_minutes)
            .execute(self.pool())
            .await
            .map_err(|e| Ctx::op(op).missing("team").err(e))?;
        }
        Ok(usage.len())
    }

    /// Team `team_id`'s usage per day from `from` to `to` (inclusive; days without
    /// any are left out): rolled-up days from `daily_usage`, today from the samples.
    pub async fn team_daily_usage(
        &self,
        team_id: &str,
        from: chrono::NaiveDate,
        to: chrono::NaiveDate,
    ) -> Result<Vec<DayUsage>, DbError> {
        let op = "team usage";
        let rows = sqlx::query(
            "SELECT day, cpu_minutes, ram_mb_minutes FROM daily_usage \
             WHERE team_id = $1 AND day >= $2 AND day <= $3 ORDER BY day",
        )
        .bind(team_id)
        .bind(from.to_string())
        .bind(to.to_string())
        .fetch_all(self.pool())
        .await
        .map_err(|e| Ctx::op(op).err(e))?;
        let mut out = Vec::new();
        for r in &rows {
            let read = || -> R<DayUsage> {
                let day: String = text(r, "day")?;
                Ok(DayUsage {
                    day: day
                        .parse()
                        .map_err(|e: chrono::ParseError| crate::row::decode("day", e))?,
                    cpu_minutes: r.try_get("cpu_minutes")?,
                    ram_mb_minutes: r.try_get("ram_mb_minutes")?,
                })
            };
            out.push(read().map_err(|e| DbError::backend(op, e))?);
        }
        let today = now().date_naive();
        if (from..=to).contains(&today) {
            out.retain(|u| u.day != today);
            if let Some((_, u)) = self
                .usage_from_samples(Some(team_id), today)
                .await?
                .into_iter()
                .next()
            {
                out.push(u);
            }
        }
        Ok(out)
    }
}
