//! The cluster's figures, as far as the cluster exists: run as root after `wrenn image
//! build`, `cargo bench --bench cluster`.
//!
//! - `grpc_create_overhead_ms`: what the gRPC hop adds to a create: a create through
//!   `RemoteAgent` → `wrenn_rpc::serve` → `LocalAgent` on loopback, minus the time the
//!   create spent in the `LocalAgent` (recorded inside the served agent), median over
//!   the rounds; beside it the same for the in-process call (trait object, no network).
//! - `schedule_us_1000_hosts`: one `LeastLoaded` placement among 1,000 simulated hosts
//!   (varied sizes, load, tags, team-owned hosts, held snapshots), mean over many.
//! - `heartbeats_per_s`: host reports one control plane takes in per second on one
//!   core: its host monitor, pinned to one CPU, asks 200 simulated agents (hosts that
//!   only report themselves, served over gRPC on loopback by a runtime pinned to the
//!   other CPU) round after round, and records them in its SQLite database as it does
//!   (a status change at once, a heartbeat every few seconds).
//! - `failover_detect_s`: from the moment a simulated agent's runtime is dropped (its
//!   sockets close, as at `kill -9`) until the host monitor has marked its host
//!   unreachable, with `wrenn serve`'s default timeout of two check intervals, at a
//!   1 s interval; median of 3 (goal ≤ 3 intervals).
//! - `template_fetch_mib_s`: `null` — agents do not fetch templates from each other yet.
//!
//! `WRENN_BENCH_ROUNDS` (default 20) sets the create rounds.

// Benchmarks are their own crate; the lint targets unit tests.
#![allow(clippy::tests_outside_test_module)]

use anyhow::{Context, Result};
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};
use wrenn::{DataDir, Host, HostOptions};
use wrenn_agent::{LocalAgent, LocalAgentOptions};
use wrenn_api::hosts::{HostConn, MonitorConfig};
use wrenn_api::AppState;
use wrenn_benches::{median_p99_ms, print_result, print_table, round2, TimedAgent};
use wrenn_core::host::{CapsuleSpec, HostAgent};
use wrenn_core::scheduler::{
    Amounts, HostId, HostView, LeastLoaded, PlacementRequest, Scheduler, Usage,
};
use wrenn_core::testing::ReportingHost;

const HOSTS: usize = 1000;
const PLACEMENTS: usize = 20_000;

fn env_num(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn data_dir(images: &Path) -> Result<PathBuf> {
    let dir = PathBuf::from(format!(
        "/var/lib/wrenn-test/bench-cluster-{}",
        std::process::id()
    ));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(dir.join("templates"))
        .with_context(|| format!("creating {}", dir.display()))?;
    std::os::unix::fs::symlink(images.join("images"), dir.join("images"))?;
    std::os::unix::fs::symlink(
        images.join("templates/minimal"),
        dir.join("templates/minimal"),
    )?;
    Ok(dir)
}

fn spec() -> CapsuleSpec {
    CapsuleSpec {
        template: "minimal".into(),
        labels: [("wrenn.team".to_string(), "bench".to_string())].into(),
        ..Default::default()
    }
}

/// Round trips of creates through `caller` minus the time each spent in `timed`.
async fn create_overheads(
    caller: &dyn HostAgent,
    timed: &TimedAgent,
    rounds: usize,
) -> Result<Vec<Duration>> {
    let mut out = Vec::with_capacity(rounds);
    for round in 0..rounds + 2 {
        let t = Instant::now();
        let c = caller.create(spec()).await.context("create")?;
        let total = t.elapsed();
        let inner = timed.take_create().context("no create recorded")?;
        caller.destroy(&c.id).await.context("destroy")?;
        // The first rounds warm connections and caches.
        if round >= 2 {
            out.push(total.saturating_sub(inner));
        }
    }
    Ok(out)
}

/// 1,000 hosts of a few sizes and loads, some tagged, some team-owned, some holding
/// the template's snapshot.
fn hosts() -> Vec<HostView> {
    let mut seed: u64 = 0x5eed;
    let mut next = move || {
        // xorshift: a fixed, varied sequence without a dependency.
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    (0..HOSTS)
        .map(|i| {
            let r: [u64; 10] = std::array::from_fn(|_| next());
            let size = [16u64, 32, 64, 96][(r[0] % 4) as usize];
            let memory_mb = size * 4096;
            let disk_mb = size * 20_000;
            let frac = |draw: u64, n: u64| (draw % 90) as f64 / 100.0 * n as f64;
            HostView {
                id: HostId(format!("host-{i:04}")),
                schedulable: !r[1].is_multiple_of(50),
                tags: if r[2].is_multiple_of(3) {
                    BTreeSet::from(["gpu".to_string()])
                } else {
                    BTreeSet::new()
                },
                team: r[3]
                    .is_multiple_of(20)
                    .then(|| format!("team-{}", r[4] % 5)),
                capacity: Amounts {
                    vcpus: size,
                    memory_mb,
                    disk_mb,
                },
                reserved: Amounts {
                    vcpus: 1,
                    memory_mb: 2048,
                    disk_mb: 10_000,
                },
                used: Usage {
                    running_vcpus: frac(r[5], size) as u64,
                    running_memory_mb: frac(r[6], memory_mb) as u64,
                    paused_memory_mb: frac(r[7], memory_mb / 2) as u64,
                    disk_mb: frac(r[8], disk_mb) as u64,
                },
                templates: if r[9].is_multiple_of(4) {
                    BTreeSet::from(["snap-team".to_string()])
                } else {
                    BTreeSet::new()
                },
                pool_ready: BTreeMap::new(),
            }
        })
        .collect()
}

fn schedule_us() -> Result<f64> {
    let hosts = hosts();
    let scheduler = LeastLoaded::default();
    let requests: Vec<PlacementRequest> = (0..16)
        .map(|i: u64| PlacementRequest {
            team: format!("team-{}", i % 7),
            template: if i.is_multiple_of(2) {
                "snap-team"
            } else {
                "minimal"
            }
            .into(),
            vcpus: 1 + i % 4,
            memory_mb: 512 << (i % 4),
            disk_mb: 2048,
            tags: if i.is_multiple_of(5) {
                BTreeSet::from(["gpu".to_string()])
            } else {
                BTreeSet::new()
            },
        })
        .collect();
    // Warm up, and check that placements succeed.
    for r in &requests {
        scheduler
            .place(r, &hosts)
            .with_context(|| format!("placing {r:?}"))?;
    }
    let t = Instant::now();
    let mut placed = 0usize;
    for i in 0..PLACEMENTS {
        let r = &requests[i % requests.len()];
        if std::hint::black_box(scheduler.place(r, std::hint::black_box(&hosts))).is_ok() {
            placed += 1;
        }
    }
    let per = t.elapsed().as_secs_f64() * 1e6 / PLACEMENTS as f64;
    anyhow::ensure!(placed == PLACEMENTS, "only {placed} of {PLACEMENTS} placed");
    Ok(per)
}

/// Simulated agents (hosts that only report themselves) served over gRPC on loopback
/// by a runtime of their own; dropping the runtime closes their sockets, as a killed
/// agent's would.
struct Agents {
    runtime: tokio::runtime::Runtime,
    urls: Vec<String>,
}

fn agents(first: usize, n: usize, cpu: Option<usize>) -> Result<Agents> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .on_thread_start(move || {
            if let Some(cpu) = cpu {
                pin(cpu);
            }
        })
        .build()?;
    let urls = runtime.block_on(async {
        let mut urls = Vec::with_capacity(n);
        for i in first..first + n {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
            let addr = listener.local_addr()?;
            let agent: Arc<dyn HostAgent> = Arc::new(ReportingHost::new(
                &format!("sim-{i:04}"),
                32,
                128 * 1024,
                (i as u64 % 64) * 1024,
            ));
            tokio::spawn(wrenn_rpc::serve(agent, listener, std::future::pending()));
            urls.push(format!("http://{addr}"));
        }
        Ok::<_, anyhow::Error>(urls)
    })?;
    Ok(Agents { runtime, urls })
}

/// Keeps the calling thread on one CPU (best effort: the figure is per core).
fn pin(cpu: usize) {
    let mut set = nix::sched::CpuSet::new();
    if set.set(cpu).is_ok() {
        let _ = nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), &set);
    }
}

/// A control plane with no API listener: its state over a fresh SQLite database, with
/// the agents at `urls` as its hosts.
async fn control_plane(
    dir: &Path,
    monitor: MonitorConfig,
    urls: &[String],
) -> Result<Arc<AppState>> {
    std::fs::create_dir_all(dir)?;
    let db = wrenn_db::Db::open(&wrenn_db::Db::sqlite_url(&dir.join("wrenn.db"))).await?;
    let st = Arc::new(AppState::new(
        db,
        monitor,
        Default::default(),
        b"wrenn-bench-cluster-unused-jwt-secret",
    ));
    for url in urls {
        let agent = wrenn_rpc::RemoteAgent::connect_lazy(url, Default::default())?;
        let conn = HostConn::connect(Arc::new(agent), Some(url.clone()))
            .await
            .map_err(|e| anyhow::anyhow!("{url}: {e}"))?;
        st.hosts
            .add(conn)
            .map_err(|e| anyhow::anyhow!("{url}: {e}"))?;
    }
    Ok(st)
}

const SIMULATED: usize = 200;

/// Host reports the monitor takes in per second, on one core.
fn heartbeats_per_s(dir: &Path) -> Result<(f64, usize)> {
    let sim = agents(0, SIMULATED, Some(1))?;
    let urls = sim.urls.clone();
    let dir = dir.to_path_buf();
    let measured = std::thread::spawn(move || -> Result<(f64, usize)> {
        pin(0);
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        rt.block_on(async {
            let st = control_plane(&dir, MonitorConfig::default(), &urls).await?;
            // Warm up (connections, the first writes of every host).
            wrenn_api::lifecycle::monitor_once(&st).await;
            let t = Instant::now();
            let mut rounds = 0usize;
            while t.elapsed() < Duration::from_secs(6) {
                wrenn_api::lifecycle::monitor_once(&st).await;
                rounds += 1;
            }
            let answered = st.hosts.all().iter().filter(|h| !h.unreachable()).count();
            anyhow::ensure!(answered == urls.len(), "only {answered} hosts answered");
            Ok((
                (rounds * urls.len()) as f64 / t.elapsed().as_secs_f64(),
                rounds,
            ))
        })
    })
    .join()
    .map_err(|_| anyhow::anyhow!("heartbeat measurement panicked"))?;
    drop(sim);
    measured
}

/// Seconds from an agent's death to its host being unreachable, median of `trials`.
fn failover_detect_s(dir: &Path, interval: Duration, trials: usize) -> Result<f64> {
    let mut took = Vec::new();
    for trial in 0..trials {
        let live = agents(trial * 2, 1, None)?;
        let doomed = agents(trial * 2 + 1, 1, None)?;
        let urls = [live.urls.clone(), doomed.urls.clone()].concat();
        let dir = dir.join(format!("failover-{trial}"));
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let monitor = MonitorConfig {
            interval,
            timeout: interval * 2,
            ..Default::default()
        };
        let st = rt.block_on(control_plane(&dir, monitor, &urls))?;
        let task = {
            let _in = rt.enter();
            wrenn_api::lifecycle::spawn_monitor(st.clone())
        };
        // Let the monitor settle into its rhythm, then kill at a point of its cycle
        // that differs per trial.
        let settle = interval * 2 + interval.mul_f64(trial as f64 / trials as f64);
        rt.block_on(async { tokio::time::sleep(settle).await });
        let victim = st
            .hosts
            .get(&HostId(format!("sim-{:04}", trial * 2 + 1)))
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        anyhow::ensure!(!victim.unreachable(), "unreachable before the kill");
        doomed.runtime.shutdown_background();
        let t = Instant::now();
        rt.block_on(async {
            while !victim.unreachable() {
                anyhow::ensure!(t.elapsed() < interval * 10, "never detected");
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            Ok(())
        })?;
        took.push(t.elapsed());
        let survivor = st
            .hosts
            .get(&HostId(format!("sim-{:04}", trial * 2)))
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        anyhow::ensure!(!survivor.unreachable(), "the live host was marked too");
        task.abort();
        drop(live);
    }
    took.sort();
    Ok(took[took.len() / 2].as_secs_f64())
}

fn main() -> Result<()> {
    let scratch = PathBuf::from(format!(
        "/var/lib/wrenn-test/bench-cluster-cp-{}",
        std::process::id()
    ));
    let _ = std::fs::remove_dir_all(&scratch);
    let heartbeats = heartbeats_per_s(&scratch.join("heartbeats"));
    let interval = Duration::from_secs(1);
    let failover = failover_detect_s(&scratch, interval, 3);
    let _ = std::fs::remove_dir_all(&scratch);
    let (heartbeats, monitor_rounds) = heartbeats?;
    let failover = failover?;
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?
        .block_on(creates_and_placement(
            heartbeats,
            monitor_rounds,
            failover,
            interval,
        ))
}

async fn creates_and_placement(
    heartbeats: f64,
    monitor_rounds: usize,
    failover: f64,
    interval: Duration,
) -> Result<()> {
    let rounds = env_num("WRENN_BENCH_ROUNDS", 20) as usize;
    let schedule = schedule_us()?;

    let images = DataDir::from_env().root().to_path_buf();
    let dir = data_dir(&images)?;
    let result = creates(&dir, rounds).await;
    let _ = std::fs::remove_dir_all(&dir);
    let (local_ms, grpc_ms, accel) = result?;

    print_table(
        &format!("cluster ({accel}; {rounds} creates per path; {HOSTS} simulated hosts)"),
        &[
            (
                "create overhead, in process (trait call), median".into(),
                format!("{local_ms:.3} ms"),
            ),
            (
                "create overhead over gRPC (loopback), median".into(),
                format!("{grpc_ms:.3} ms (goal ≤ 3)"),
            ),
            (
                format!("one placement among {HOSTS} hosts, mean"),
                format!("{schedule:.1} µs (goal ≤ 100)"),
            ),
            (
                format!(
                    "host reports taken in, one core ({SIMULATED} agents, {monitor_rounds} rounds)"
                ),
                format!("{heartbeats:.0} /s (goal ≥ 5000)"),
            ),
            (
                format!(
                    "agent killed → host unreachable ({}s checks, {}s timeout), median of 3",
                    interval.as_secs_f64(),
                    interval.as_secs_f64() * 2.0
                ),
                format!(
                    "{failover:.2} s = {:.2} intervals (goal ≤ 3)",
                    failover / interval.as_secs_f64()
                ),
            ),
            (
                "template transfer between agents".into(),
                "not measured: not built yet".into(),
            ),
        ],
    );
    print_result(&serde_json::json!({
        "grpc_create_overhead_ms": round2(grpc_ms),
        "local_create_overhead_ms": round2(local_ms),
        "schedule_us_1000_hosts": round2(schedule),
        "heartbeats_per_s": heartbeats.round(),
        "failover_detect_s": round2(failover),
        "failover_check_interval_s": interval.as_secs_f64(),
        "template_fetch_mib_s": null,
        "accel": accel,
    }));
    Ok(())
}

/// Median create overheads in process and over gRPC, measured side by side.
async fn creates(dir: &Path, rounds: usize) -> Result<(f64, f64, String)> {
    let host = Host::local(HostOptions {
        data_dir: DataDir::new(dir),
        ..Default::default()
    })
    .await
    .context("local host (run as root after `wrenn image build`)")?;
    let accel = host.accel_probe().accel.to_string();
    let timed = Arc::new(TimedAgent::new(Arc::new(LocalAgent::new(
        host,
        LocalAgentOptions::default(),
    ))));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let served: Arc<dyn HostAgent> = timed.clone();
    let server = tokio::spawn(wrenn_rpc::serve(served, listener, std::future::pending()));
    let remote =
        wrenn_rpc::RemoteAgent::connect_lazy(&format!("http://{addr}"), Default::default())?;
    let mut local = Vec::new();
    let mut grpc = Vec::new();
    // Alternate the paths so both see the same machine state.
    for _ in 0..rounds.div_ceil(5) {
        local.extend(create_overheads(timed.as_ref(), &timed, 5).await?);
        grpc.extend(create_overheads(&remote, &timed, 5).await?);
    }
    server.abort();
    Ok((
        median_p99_ms(&mut local).0,
        median_p99_ms(&mut grpc).0,
        accel,
    ))
}
