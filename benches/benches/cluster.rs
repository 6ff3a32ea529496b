//! The cluster's figures, as far as the cluster exists: run as root after `wrenn image
//! build`, `cargo bench --bench cluster`.
//!
//! - `grpc_create_overhead_ms`: what the gRPC hop adds to a create: a create through
//!   `RemoteAgent` → `wrenn_rpc::serve` → `LocalAgent` on loopback, minus the time the
//!   create spent in the `LocalAgent` (recorded inside the served agent), median over
//!   the rounds; beside it the same for the in-process call (trait object, no network).
//! - `schedule_us_1000_hosts`: one `LeastLoaded` placement among 1,000 simulated hosts
//!   (varied sizes, load, tags, team-owned hosts, held snapshots), mean over many.
//! - `heartbeats_per_s`, `failover_detect_s`, `template_fetch_mib_s`: `null` — agents do
//!   not register, heartbeat or fetch templates from each other yet.
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
use wrenn_benches::{median_p99_ms, print_result, print_table, round2, TimedAgent};
use wrenn_core::host::{CapsuleSpec, HostAgent};
use wrenn_core::scheduler::{
    Amounts, HostId, HostView, LeastLoaded, PlacementRequest, Scheduler, Usage,
};

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

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<()> {
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
                "heartbeats, failover, template transfer".into(),
                "not measured: not built yet".into(),
            ),
        ],
    );
    print_result(&serde_json::json!({
        "grpc_create_overhead_ms": round2(grpc_ms),
        "local_create_overhead_ms": round2(local_ms),
        "schedule_us_1000_hosts": round2(schedule),
        "heartbeats_per_s": null,
        "failover_detect_s": null,
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
