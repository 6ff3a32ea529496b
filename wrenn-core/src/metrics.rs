//! Resource metrics of capsules: a sample ([`MetricPoint`]) and one capsule's history
//! in three resolutions ([`Tiers`]; as plain data, [`TierSnapshot`], which is what a
//! host hands the control plane to keep while the capsule is paused). Pure data: time
//! is passed in.

use serde::{Deserialize, Serialize};
use std::collections::VecDeque;
use std::time::Duration;

/// A capsule's resource use at one time (or averaged over one window of a coarser tier).
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct MetricPoint {
    /// Unix seconds (for windows, their start).
    pub timestamp_unix: i64,
    /// CPU time of the VMM process as a percentage of the capsule's vCPUs (0–100).
    pub cpu_pct: f64,
    /// Resident memory of the VMM process.
    pub mem_bytes: u64,
    /// Space allocated to the capsule's writable disk layer.
    pub disk_bytes: u64,
}

/// One resolution of the history.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Tier {
    /// Every sample (0.5 s apart at the default period), the last 1200.
    Fine,
    /// 30 s averages, the last 240 (2 h).
    Mid,
    /// 5 min averages, the last 288 (24 h).
    Coarse,
}

impl Tier {
    /// The finest tier whose span covers `range`: up to 10 min → [`Tier::Fine`], up to
    /// 2 h → [`Tier::Mid`], longer → [`Tier::Coarse`].
    pub fn for_range(range: Duration) -> Tier {
        if range <= Tier::Fine.span() {
            Tier::Fine
        } else if range <= Tier::Mid.span() {
            Tier::Mid
        } else {
            Tier::Coarse
        }
    }

    /// How many points the tier keeps.
    pub const fn capacity(self) -> usize {
        match self {
            Tier::Fine => 1200,
            Tier::Mid => 240,
            Tier::Coarse => 288,
        }
    }

    /// The time one point stands for (for [`Tier::Fine`], the nominal 0.5 s sample period).
    pub const fn resolution(self) -> Duration {
        match self {
            Tier::Fine => Duration::from_millis(500),
            Tier::Mid => Duration::from_secs(30),
            Tier::Coarse => Duration::from_secs(300),
        }
    }

    /// The time a full tier covers.
    pub const fn span(self) -> Duration {
        match self {
            Tier::Fine => Duration::from_secs(600),
            Tier::Mid => Duration::from_secs(2 * 3600),
            Tier::Coarse => Duration::from_secs(24 * 3600),
        }
    }
}

/// Fixed-capacity ring of points, oldest first; a push onto a full ring drops the oldest.
#[derive(Clone, Debug, PartialEq)]
struct Ring {
    cap: usize,
    points: VecDeque<MetricPoint>,
}

impl Ring {
    fn new(cap: usize) -> Ring {
        Ring {
            cap,
            points: VecDeque::with_capacity(cap),
        }
    }

    /// A ring holding the newest `cap` of `points`.
    fn from_vec(cap: usize, mut points: Vec<MetricPoint>) -> Ring {
        let excess = points.len().saturating_sub(cap);
        points.drain(..excess);
        let mut ring = Ring::new(cap);
        ring.points.extend(points);
        ring
    }

    fn push(&mut self, p: MetricPoint) {
        if self.points.len() == self.cap {
            self.points.pop_front();
        }
        self.points.push_back(p);
    }
}

/// Sums of the samples of one window of a coarser tier, not yet closed.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PendingWindow {
    /// Window number: start time in ms divided by the window length.
    pub index: i64,
    /// Samples summed so far.
    pub count: u64,
    pub cpu_sum: f64,
    pub mem_sum: u64,
    /// The newest sample's disk use.
    pub disk_last: u64,
}

impl PendingWindow {
    fn point(&self, window_ms: i64) -> MetricPoint {
        let n = self.count.max(1);
        MetricPoint {
            timestamp_unix: (self.index.saturating_mul(window_ms)).div_euclid(1000),
            cpu_pct: self.cpu_sum / n as f64,
            mem_bytes: self.mem_sum / n,
            disk_bytes: self.disk_last,
        }
    }
}

/// A coarser tier: closed windows in a ring, plus the window samples are going into.
#[derive(Clone, Debug, PartialEq)]
struct Rollup {
    window_ms: i64,
    ring: Ring,
    pending: Option<PendingWindow>,
}

impl Rollup {
    fn new(tier: Tier) -> Rollup {
        Rollup {
            window_ms: i64::try_from(tier.resolution().as_millis()).unwrap_or(i64::MAX),
            ring: Ring::new(tier.capacity()),
            pending: None,
        }
    }

    fn push(&mut self, at_ms: i64, cpu_pct: f64, mem_bytes: u64, disk_bytes: u64) {
        let index = at_ms.div_euclid(self.window_ms);
        if let Some(w) = self.pending.take_if(|w| w.index != index) {
            self.ring.push(w.point(self.window_ms));
        }
        let w = self.pending.get_or_insert(PendingWindow {
            index,
            count: 0,
            cpu_sum: 0.0,
            mem_sum: 0,
            disk_last: 0,
        });
        w.count += 1;
        w.cpu_sum += cpu_pct;
        w.mem_sum = w.mem_sum.saturating_add(mem_bytes);
        w.disk_last = disk_bytes;
    }

    /// Closed windows, then the open one (its average so far).
    fn points(&self) -> impl Iterator<Item = MetricPoint> + '_ {
        let open = self.pending.as_ref().map(|w| w.point(self.window_ms));
        self.ring.points.iter().cloned().chain(open)
    }
}

/// A capsule's history: every sample in the fine tier, and 30 s / 5 min windows holding
/// the average CPU and memory and the last disk size of the samples that fell in them.
///
/// Timestamps are Unix milliseconds, passed in. A sample older than the previous one is
/// taken as happening at the previous one's time, so every tier stays oldest first.
/// Aggregated points carry the start of their window.
#[derive(Clone, Debug, PartialEq)]
pub struct Tiers {
    fine: Ring,
    mid: Rollup,
    coarse: Rollup,
    last_ms: Option<i64>,
}

impl Default for Tiers {
    fn default() -> Self {
        Tiers::new()
    }
}

impl Tiers {
    pub fn new() -> Tiers {
        Tiers {
            fine: Ring::new(Tier::Fine.capacity()),
            mid: Rollup::new(Tier::Mid),
            coarse: Rollup::new(Tier::Coarse),
            last_ms: None,
        }
    }

    /// Records one sample taken at `at_unix_ms`.
    pub fn push(&mut self, at_unix_ms: i64, cpu_pct: f64, mem_bytes: u64, disk_bytes: u64) {
        let at = self.last_ms.map_or(at_unix_ms, |last| at_unix_ms.max(last));
        self.last_ms = Some(at);
        self.fine.push(MetricPoint {
            timestamp_unix: at.div_euclid(1000),
            cpu_pct,
            mem_bytes,
            disk_bytes,
        });
        self.mid.push(at, cpu_pct, mem_bytes, disk_bytes);
        self.coarse.push(at, cpu_pct, mem_bytes, disk_bytes);
    }

    /// The most recent sample.
    pub fn latest(&self) -> Option<MetricPoint> {
        self.fine.points.back().cloned()
    }

    /// The points of `tier`, oldest first; for the coarser tiers the last point is the
    /// window still being filled.
    pub fn tier_points(&self, tier: Tier) -> Vec<MetricPoint> {
        match tier {
            Tier::Fine => self.fine.points.iter().cloned().collect(),
            Tier::Mid => self.mid.points().collect(),
            Tier::Coarse => self.coarse.points().collect(),
        }
    }

    /// The points of the last `range` before `now_unix_ms`, oldest first, from the finest
    /// tier covering `range` ([`Tier::for_range`]). A point is included when the time it
    /// stands for overlaps the range.
    pub fn points(&self, range: Duration, now_unix_ms: i64) -> Vec<MetricPoint> {
        let tier = Tier::for_range(range);
        let range_ms = i64::try_from(range.as_millis()).unwrap_or(i64::MAX);
        let from_ms = now_unix_ms.saturating_sub(range_ms);
        // Fine points carry whole seconds: each stands for its second.
        let width_ms = match tier {
            Tier::Fine => 1000,
            Tier::Mid => self.mid.window_ms,
            Tier::Coarse => self.coarse.window_ms,
        };
        self.tier_points(tier)
            .into_iter()
            .filter(|p| {
                let end = p
                    .timestamp_unix
                    .saturating_mul(1000)
                    .saturating_add(width_ms);
                end > from_ms && p.timestamp_unix.saturating_mul(1000) <= now_unix_ms
            })
            .collect()
    }

    /// Everything, for persisting (see [`Tiers::from_snapshot`]).
    pub fn snapshot(&self) -> TierSnapshot {
        TierSnapshot {
            fine: self.tier_points(Tier::Fine),
            mid: self.mid.ring.points.iter().cloned().collect(),
            coarse: self.coarse.ring.points.iter().cloned().collect(),
            mid_open: self.mid.pending.clone(),
            coarse_open: self.coarse.pending.clone(),
            last_unix_ms: self.last_ms,
        }
    }

    /// The history a snapshot holds. Rings longer than their tier keep their newest points.
    pub fn from_snapshot(s: TierSnapshot) -> Tiers {
        let mut t = Tiers::new();
        t.fine = Ring::from_vec(Tier::Fine.capacity(), s.fine);
        t.mid.ring = Ring::from_vec(Tier::Mid.capacity(), s.mid);
        t.mid.pending = s.mid_open;
        t.coarse.ring = Ring::from_vec(Tier::Coarse.capacity(), s.coarse);
        t.coarse.pending = s.coarse_open;
        t.last_ms = s.last_unix_ms;
        t
    }
}

/// A capsule's whole history as plain data (JSON-serialisable), to persist while the
/// capsule is paused and restore on resume.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct TierSnapshot {
    /// Each tier's closed points, oldest first.
    pub fine: Vec<MetricPoint>,
    pub mid: Vec<MetricPoint>,
    pub coarse: Vec<MetricPoint>,
    /// The open windows of the coarser tiers.
    pub mid_open: Option<PendingWindow>,
    pub coarse_open: Option<PendingWindow>,
    /// When the newest sample was taken.
    pub last_unix_ms: Option<i64>,
}

impl TierSnapshot {
    /// Whether the snapshot holds no samples at all.
    pub fn is_empty(&self) -> bool {
        self.fine.is_empty()
            && self.mid.is_empty()
            && self.coarse.is_empty()
            && self.mid_open.is_none()
            && self.coarse_open.is_none()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIN: i64 = 60_000;
    /// An arbitrary start, aligned to 5 minutes (so to 30 s too).
    const T0: i64 = 1_700_000_100_000;

    fn ts(p: &[MetricPoint]) -> Vec<i64> {
        p.iter().map(|p| p.timestamp_unix).collect()
    }

    #[test]
    fn range_picks_the_finest_covering_tier() {
        let m = |n: u64| Duration::from_secs(60 * n);
        assert_eq!(Tier::for_range(Duration::ZERO), Tier::Fine);
        assert_eq!(Tier::for_range(m(1)), Tier::Fine);
        assert_eq!(Tier::for_range(m(10)), Tier::Fine);
        assert_eq!(Tier::for_range(m(10) + Duration::from_millis(1)), Tier::Mid);
        assert_eq!(Tier::for_range(m(60)), Tier::Mid);
        assert_eq!(Tier::for_range(m(120)), Tier::Mid);
        assert_eq!(Tier::for_range(m(121)), Tier::Coarse);
        assert_eq!(Tier::for_range(m(24 * 60)), Tier::Coarse);
        assert_eq!(Tier::for_range(m(7 * 24 * 60)), Tier::Coarse);
        // Each full tier covers exactly its span at its resolution.
        for tier in [Tier::Fine, Tier::Mid, Tier::Coarse] {
            assert_eq!(tier.resolution() * tier.capacity() as u32, tier.span());
        }
    }

    #[test]
    fn fine_ring_wraps_keeping_the_newest_1200() {
        let mut t = Tiers::new();
        for i in 0..1500 {
            t.push(T0 + i * 500, i as f64, i as u64, 0);
        }
        let fine = t.tier_points(Tier::Fine);
        assert_eq!(fine.len(), 1200);
        assert_eq!(fine[0].mem_bytes, 300);
        assert_eq!(fine[1199].mem_bytes, 1499);
        assert!(fine
            .windows(2)
            .all(|w| w[0].mem_bytes + 1 == w[1].mem_bytes));
        assert_eq!(t.latest().map(|p| p.mem_bytes), Some(1499));
        assert_eq!(fine[1199].timestamp_unix, (T0 + 1499 * 500) / 1000);
    }

    #[test]
    fn mid_windows_average_cpu_and_memory_and_keep_the_last_disk() {
        let mut t = Tiers::new();
        // 120 samples at 0.5 s fill two 30 s windows; one more opens a third.
        for i in 0..121 {
            let cpu = if i < 120 { (i % 2 * 10) as f64 } else { 99.0 };
            t.push(T0 + i * 500, cpu, 1000 + i as u64, 5000 + i as u64);
        }
        let mid = t.tier_points(Tier::Mid);
        assert_eq!(ts(&mid), vec![T0 / 1000, T0 / 1000 + 30, T0 / 1000 + 60]);
        assert_eq!((mid[0].cpu_pct, mid[1].cpu_pct), (5.0, 5.0));
        // Means of 1000..=1059 and 1060..=1119 (1029.5 and 1089.5), in whole bytes.
        assert_eq!((mid[0].mem_bytes, mid[1].mem_bytes), (1029, 1089));
        assert_eq!((mid[0].disk_bytes, mid[1].disk_bytes), (5059, 5119));
        // The open window reports what it has so far.
        assert_eq!(
            mid[2],
            MetricPoint {
                timestamp_unix: T0 / 1000 + 60,
                cpu_pct: 99.0,
                mem_bytes: 1120,
                disk_bytes: 5120
            }
        );
        // The 5 min window holds all 121 samples.
        let coarse = t.tier_points(Tier::Coarse);
        assert_eq!(coarse.len(), 1);
        assert_eq!(coarse[0].cpu_pct, 699.0 / 121.0);
        assert_eq!(coarse[0].mem_bytes, 1060);
        assert_eq!(coarse[0].disk_bytes, 5120);
    }

    #[test]
    fn mid_ring_wraps_keeping_the_newest_240_windows() {
        let mut t = Tiers::new();
        // One sample every 30 s: each closes the previous window. 300 windows + 1 open.
        for i in 0..=300 {
            t.push(T0 + i * 30_000, 1.0, i as u64, 0);
        }
        let mid = t.tier_points(Tier::Mid);
        assert_eq!(mid.len(), 241, "240 closed + the open one");
        assert_eq!(mid[0].mem_bytes, 60);
        assert_eq!(mid[239].mem_bytes, 299);
        assert_eq!(mid[240].mem_bytes, 300);
        assert_eq!(mid[0].timestamp_unix, T0 / 1000 + 60 * 30);
        assert!(mid
            .windows(2)
            .all(|w| w[1].timestamp_unix - w[0].timestamp_unix == 30));
    }

    #[test]
    fn coarse_ring_wraps_keeping_the_newest_288_windows() {
        let mut t = Tiers::new();
        for i in 0..400 {
            // Two samples per 5 min window, the second one's disk wins.
            t.push(T0 + i * 5 * MIN, 10.0, 100, i as u64 * 2);
            t.push(T0 + i * 5 * MIN + 4 * MIN, 30.0, 300, i as u64 * 2 + 1);
        }
        t.push(T0 + 400 * 5 * MIN, 0.0, 0, 0); // closes window 399
        let coarse = t.tier_points(Tier::Coarse);
        assert_eq!(coarse.len(), 289);
        let closed = &coarse[..288];
        assert_eq!(closed[0].timestamp_unix, (T0 + 112 * 5 * MIN) / 1000);
        assert!(closed
            .iter()
            .all(|p| p.cpu_pct == 20.0 && p.mem_bytes == 200));
        assert_eq!(closed[0].disk_bytes, 112 * 2 + 1);
        assert_eq!(closed[287].disk_bytes, 399 * 2 + 1);
        assert!(coarse
            .windows(2)
            .all(|w| w[1].timestamp_unix - w[0].timestamp_unix == 300));
        // The mid tier saw the same samples: each closed 30 s window holds one sample.
        assert_eq!(t.tier_points(Tier::Mid).len(), 241);
    }

    #[test]
    fn gaps_leave_no_points_and_windows_follow_wall_time() {
        let mut t = Tiers::new();
        t.push(T0 + 1_000, 10.0, 1, 1);
        // Paused for 10 minutes, then back 12 s into a later 30 s window.
        t.push(T0 + 10 * MIN + 12_000, 20.0, 2, 2);
        let mid = t.tier_points(Tier::Mid);
        assert_eq!(ts(&mid), vec![T0 / 1000, (T0 + 10 * MIN) / 1000]);
        let coarse = t.tier_points(Tier::Coarse);
        assert_eq!(ts(&coarse), vec![T0 / 1000, (T0 + 10 * MIN) / 1000]);
    }

    #[test]
    fn a_clock_going_back_does_not_reorder_points() {
        let mut t = Tiers::new();
        t.push(T0 + 40_000, 1.0, 1, 1);
        t.push(T0 + 5_000, 2.0, 2, 2); // taken as T0 + 40 s
        t.push(T0 + 41_000, 3.0, 3, 3);
        assert_eq!(
            ts(&t.tier_points(Tier::Fine)),
            vec![T0 / 1000 + 40, T0 / 1000 + 40, T0 / 1000 + 41]
        );
        let mid = t.tier_points(Tier::Mid);
        assert_eq!(mid.len(), 1);
        assert_eq!(mid[0].cpu_pct, 2.0);
    }

    #[test]
    fn points_choose_the_tier_and_cut_to_the_range() {
        let mut t = Tiers::new();
        // Three hours of samples every 0.5 s.
        let n = 3 * 60 * 60 * 2;
        for i in 0..n {
            t.push(T0 + i * 500, 1.0, 7, 9);
        }
        let now = T0 + n * 500; // just after the last sample

        let last_minute = t.points(Duration::from_secs(60), now);
        // Seconds T0+10740 ..= T0+10799, two samples each.
        assert_eq!(last_minute.len(), 120);
        assert_eq!(last_minute[0].timestamp_unix, now / 1000 - 60);
        assert_eq!(last_minute[119].timestamp_unix, now / 1000 - 1);

        let ten = t.points(Duration::from_secs(600), now);
        assert_eq!(ten.len(), 1200);

        let hour = t.points(Duration::from_secs(3600), now);
        assert_eq!(hour.len(), 120, "30 s windows");
        assert!(hour
            .windows(2)
            .all(|w| w[0].timestamp_unix < w[1].timestamp_unix));
        assert_eq!(hour[0].timestamp_unix, now / 1000 - 3600);
        assert!(hour.iter().all(|p| p.mem_bytes == 7 && p.disk_bytes == 9));

        let two = t.points(Duration::from_secs(7200), now);
        assert_eq!(two.len(), 240);

        let day = t.points(Duration::from_secs(24 * 3600), now);
        assert_eq!(day.len(), 36, "5 min windows of the 3 hours");
        assert_eq!(day[0].timestamp_unix, T0 / 1000);

        // Later on, the last 10 minutes are empty: nothing was sampled.
        assert!(t
            .points(Duration::from_secs(600), now + 20 * MIN)
            .is_empty());

        // Points stamped after `now` are left out (second 30 holds two samples).
        let mut early = Tiers::new();
        for i in 0..100 {
            early.push(T0 + i * 500, 1.0, 7, 9);
        }
        assert_eq!(early.points(Duration::from_secs(60), T0 + 30_000).len(), 62);
    }

    #[test]
    fn snapshot_round_trips_through_json_and_continues() {
        let mut t = Tiers::new();
        for i in 0..100 {
            t.push(T0 + i * 500, i as f64, i as u64, i as u64);
        }
        let json = serde_json::to_string(&t.snapshot()).expect("serialise");
        let snap: TierSnapshot = serde_json::from_str(&json).expect("deserialise");
        assert!(!snap.is_empty());
        let mut back = Tiers::from_snapshot(snap);
        assert_eq!(back, t);
        // The open windows carry on: samples after the restore land in the same window.
        back.push(T0 + 100 * 500, 100.0, 100, 100);
        t.push(T0 + 100 * 500, 100.0, 100, 100);
        assert_eq!(back, t);
        assert_eq!(back.tier_points(Tier::Mid).len(), 2);
        assert!(TierSnapshot::default().is_empty());
        assert_eq!(Tiers::from_snapshot(TierSnapshot::default()), Tiers::new());
    }

    #[test]
    fn oversized_snapshots_keep_their_newest_points() {
        let point = |i: i64| MetricPoint {
            timestamp_unix: i,
            cpu_pct: 0.0,
            mem_bytes: 0,
            disk_bytes: 0,
        };
        let snap = TierSnapshot {
            fine: (0..2000).map(point).collect(),
            mid: (0..300).map(point).collect(),
            coarse: (0..300).map(point).collect(),
            ..Default::default()
        };
        let t = Tiers::from_snapshot(snap);
        assert_eq!(t.tier_points(Tier::Fine)[0].timestamp_unix, 800);
        assert_eq!(t.tier_points(Tier::Mid).len(), 240);
        assert_eq!(t.tier_points(Tier::Mid)[0].timestamp_unix, 60);
        assert_eq!(t.tier_points(Tier::Coarse).len(), 288);
        // A restored full ring still wraps.
        let mut t = t;
        t.push(5_000_000, 1.0, 1, 1);
        assert_eq!(t.tier_points(Tier::Fine).len(), 1200);
        assert_eq!(t.tier_points(Tier::Fine)[0].timestamp_unix, 801);
    }
}
