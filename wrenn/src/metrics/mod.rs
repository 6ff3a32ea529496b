//! Per-capsule resource history: CPU, memory and disk use of each running capsule's VMM
//! process, sampled in the background and kept in three resolutions (see [`Tiers`]).
//!
//! ```no_run
//! # async fn demo(host: &wrenn::Host, id: &wrenn::CapsuleId) {
//! use std::time::Duration;
//! use wrenn::metrics::{MetricsSampler, DEFAULT_PERIOD};
//! let sampler = MetricsSampler::start(host.capsules().clone(), DEFAULT_PERIOD);
//! let last_hour = sampler.points(id, Duration::from_secs(3600)); // 30 s averages
//! # }
//! ```

mod procfs;

pub use procfs::{cpu_percent, sample_process, RawSample};
pub use wrenn_core::metrics::{MetricPoint, Tier, TierSnapshot, Tiers};

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tokio::task::JoinHandle;
use wrenn_core::{CapsuleId, Capsules, VmmProcess};

/// How often [`MetricsSampler`] samples by default (the resolution of [`Tier::Fine`]).
pub const DEFAULT_PERIOD: Duration = Duration::from_millis(500);

type Rings = Mutex<HashMap<CapsuleId, Tiers>>;

/// Samples every running capsule of a manager periodically, keeping each one's history.
/// Capsules that stop running keep their history and just get no new samples; call
/// [`MetricsSampler::forget`] when one is destroyed. The sampling task stops when the
/// sampler is dropped (or the manager is).
#[derive(Debug)]
pub struct MetricsSampler {
    rings: Arc<Rings>,
    task: JoinHandle<()>,
}

impl MetricsSampler {
    /// Starts sampling `capsules` every `period` ([`DEFAULT_PERIOD`] normally).
    ///
    /// # Panics
    /// Outside a Tokio runtime.
    pub fn start(capsules: Arc<Capsules>, period: Duration) -> MetricsSampler {
        let rings: Arc<Rings> = Arc::default();
        let period = period.max(Duration::from_millis(10));
        let task = tokio::spawn(run(Arc::downgrade(&capsules), rings.clone(), period));
        MetricsSampler { rings, task }
    }

    /// The history of capsule `id` over the last `range`, oldest first, from the finest
    /// tier covering it ([`Tier::for_range`]). Empty for unknown capsules and for ones that
    /// were not sampled during `range`.
    pub fn points(&self, id: &CapsuleId, range: Duration) -> Vec<MetricPoint> {
        lock(&self.rings)
            .get(id)
            .map(|t| t.points(range, unix_ms_now()))
            .unwrap_or_default()
    }

    /// The most recent sample of capsule `id`.
    pub fn latest(&self, id: &CapsuleId) -> Option<MetricPoint> {
        lock(&self.rings).get(id).and_then(Tiers::latest)
    }

    /// Drops the history of capsule `id` (once it is destroyed).
    pub fn forget(&self, id: &CapsuleId) {
        lock(&self.rings).remove(id);
    }

    /// The whole history of capsule `id`, to persist while it is paused.
    pub fn export(&self, id: &CapsuleId) -> Option<TierSnapshot> {
        lock(&self.rings).get(id).map(Tiers::snapshot)
    }

    /// Replaces the history of capsule `id` with a persisted one; new samples continue it.
    /// Call it before resuming the capsule (samples taken in between would be replaced).
    pub fn import(&self, id: &CapsuleId, snapshot: TierSnapshot) {
        lock(&self.rings).insert(id.clone(), Tiers::from_snapshot(snapshot));
    }
}

impl Drop for MetricsSampler {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn lock(rings: &Rings) -> MutexGuard<'_, HashMap<CapsuleId, Tiers>> {
    // The map is never left half-updated, so a poisoned lock is still consistent.
    rings.lock().unwrap_or_else(|e| e.into_inner())
}

fn unix_ms_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

/// The previous sample of a capsule's VMM, for the CPU delta.
#[derive(Debug)]
struct Baseline {
    pid: u32,
    at: Instant,
    raw: RawSample,
}

/// The outcome of sampling one capsule.
#[derive(Debug)]
struct Taken {
    vmm: VmmProcess,
    at: Instant,
    result: std::io::Result<RawSample>,
}

async fn run(capsules: Weak<Capsules>, rings: Arc<Rings>, period: Duration) {
    let mut ticks = tokio::time::interval(period);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut baselines: HashMap<CapsuleId, Baseline> = HashMap::new();
    let mut failing: HashSet<CapsuleId> = HashSet::new();
    loop {
        ticks.tick().await;
        let Some(vmms) = capsules.upgrade().map(|c| c.running_vmms()) else {
            tracing::debug!("metrics: capsule manager gone; sampler stops");
            return;
        };
        // /proc reads and stat calls block (briefly); keep them off the runtime's workers.
        let taken = match tokio::task::spawn_blocking(move || sample_all(vmms)).await {
            Ok(t) => t,
            Err(e) => {
                tracing::warn!(error = %e, "metrics: sampling task failed");
                continue;
            }
        };
        // Only capsules still running now get points: one destroyed (and forgotten)
        // since the list was taken must not get its history back. The list is taken
        // under the rings' lock, so a `forget` after a `destroy` either came before it
        // (and the capsule is not listed) or comes after these pushes (and drops them).
        let mut rings = lock(&rings);
        let Some(still) = capsules.upgrade().map(|c| c.running_vmms()) else {
            return;
        };
        let still: HashSet<(CapsuleId, u32)> = still.into_iter().map(|v| (v.id, v.pid)).collect();
        let now_ms = unix_ms_now();
        baselines.retain(|id, b| still.contains(&(id.clone(), b.pid)));
        failing.retain(|id| still.iter().any(|(i, _)| i == id));
        for t in taken {
            let id = t.vmm.id.clone();
            let raw = match t.result {
                Ok(raw) => raw,
                Err(e) => {
                    let running = still.contains(&(id.clone(), t.vmm.pid));
                    if running && failing.insert(id.clone()) {
                        tracing::warn!(capsule = %id, pid = t.vmm.pid, error = %e, "metrics: cannot sample capsule");
                    } else {
                        tracing::debug!(capsule = %id, pid = t.vmm.pid, error = %e, "metrics: cannot sample capsule");
                    }
                    continue;
                }
            };
            failing.remove(&id);
            if !still.contains(&(id.clone(), t.vmm.pid)) {
                continue;
            }
            let prev = baselines.insert(
                id.clone(),
                Baseline {
                    pid: t.vmm.pid,
                    at: t.at,
                    raw,
                },
            );
            // The first sample of a VMM process only sets the CPU baseline.
            let Some(prev) = prev.filter(|p| p.pid == t.vmm.pid) else {
                continue;
            };
            let cpu = cpu_percent(
                &prev.raw,
                &raw,
                t.at.saturating_duration_since(prev.at),
                t.vmm.vcpus,
            );
            rings
                .entry(id)
                .or_default()
                .push(now_ms, cpu, raw.rss_bytes, raw.disk_bytes);
        }
    }
}

fn sample_all(vmms: Vec<VmmProcess>) -> Vec<Taken> {
    static CGROUPS: std::sync::OnceLock<Option<wrenn_vmm::cgroup::Layout>> =
        std::sync::OnceLock::new();
    let layout = CGROUPS.get_or_init(|| wrenn_vmm::cgroup::Layout::detect().ok());
    vmms.into_iter()
        .map(|vmm| {
            let disks: Vec<PathBuf> = vmm.disk.iter().cloned().collect();
            let at = Instant::now();
            let result = sample_process(vmm.pid, &disks).map(|mut raw| {
                // A confined VMM is measured by its cgroup: everything charged to it
                // (its threads' CPU, guest RAM it touched, its own memory).
                if let Some(u) = layout.as_ref().and_then(|l| l.usage_of(vmm.pid)) {
                    raw.rss_bytes = u.memory_bytes;
                    if let Some(us) = u.cpu_usage_us {
                        raw.cpu_time = Duration::from_micros(us);
                    }
                }
                raw
            });
            Taken { vmm, at, result }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_task_ends_without_a_manager() {
        let rings: Arc<Rings> = Arc::default();
        let task = tokio::spawn(run(Weak::new(), rings.clone(), DEFAULT_PERIOD));
        tokio::time::timeout(Duration::from_secs(5), task)
            .await
            .expect("sampler task ended")
            .expect("sampler task did not panic");
    }

    #[tokio::test]
    async fn dropping_the_sampler_aborts_its_task() {
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            let _held = tx;
            std::future::pending::<()>().await;
        });
        let sampler = MetricsSampler {
            rings: Arc::default(),
            task,
        };
        drop(sampler);
        // The aborted task drops its sender.
        let closed = tokio::time::timeout(Duration::from_secs(5), rx).await;
        assert!(matches!(closed, Ok(Err(_))), "{closed:?}");
    }

    #[test]
    fn points_serialise_with_their_field_names() {
        let p = MetricPoint {
            timestamp_unix: 1_700_000_000,
            cpu_pct: 12.5,
            mem_bytes: 1 << 30,
            disk_bytes: 4096,
        };
        let json = serde_json::to_value(p).expect("serialise");
        assert_eq!(
            json,
            serde_json::json!({
                "timestamp_unix": 1_700_000_000,
                "cpu_pct": 12.5,
                "mem_bytes": 1u64 << 30,
                "disk_bytes": 4096,
            })
        );
        assert_eq!(
            serde_json::from_value::<MetricPoint>(json).expect("parse"),
            p
        );
    }
}
