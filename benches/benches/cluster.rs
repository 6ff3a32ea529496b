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
//! - `template_fetch_mib_s`: a template copied from one agent to another as the control
//!   plane relays it (`template_manifest` → `import_state` → `export_template` →
//!   `import_template`, through two `RemoteAgent`s), both agents served by
//!   `wrenn_rpc::serve` on loopback (listeners with `TCP_NODELAY`, as a registered
//!   agent's connections have) in this process, their templates in directories of
//!   their own (`FsTemplates`, as `LocalAgent` copies them). The template is a
//!   snapshot template's files: a 2 GiB sparse root filesystem image (110 MiB written),
//!   a 512 MiB memory image of random data with one MiB in eight a hole, device state
//!   and metadata. MiB/s of the bytes sent (the non-zero chunks: zero ranges are not
//!   sent) from the manifest request until the import has answered (synced, every file
//!   checked against its checksum, installed by rename); each copy is checked against
//!   the source byte for byte, then deleted; median of 3 (goal ≥ 200). The source's
//!   files are in the page cache; the copy's are synced to disk.
//!
//! `WRENN_BENCH_ROUNDS` (default 20) sets the create rounds.

// Benchmarks are their own crate; the lint targets unit tests.
#![allow(clippy::tests_outside_test_module)]

use anyhow::{Context, Result};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};
use wrenn::{DataDir, FsTemplates, Host, HostOptions};
use wrenn_agent::{LocalAgent, LocalAgentOptions};
use wrenn_api::hosts::{HostConn, MonitorConfig};
use wrenn_api::AppState;
use wrenn_benches::{env_num, median_p99_ms, print_result, print_table, round2, TimedAgent};
use wrenn_core::egress::EgressPolicy;
use wrenn_core::host::{
    CapsuleSpec, Endpoint, GuestStream, HostAgent, HostCapsule, HostError, HostErrorKind, HostInfo,
    HostTemplate, HostVersions, PoolStats, TemplateChunks,
};
use wrenn_core::id::CapsuleId;
use wrenn_core::metrics::{MetricPoint, TierSnapshot};
use wrenn_core::scheduler::{
    Amounts, HostId, HostView, LeastLoaded, PlacementRequest, Scheduler, Usage,
};
use wrenn_core::snapshot::{PauseMode, ResumeMode};
use wrenn_core::template::{TemplateError, TemplateManifest, TemplateName, TemplateStore};
use wrenn_core::testing::ReportingHost;
use wrenn_storage::capsnap::template_files;

const HOSTS: usize = 1000;
const PLACEMENTS: usize = 20_000;

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

/// The template copied between agents: a snapshot template's files.
const FETCHED: &str = "bench-snap";
const MIB: u64 = 1 << 20;
/// Its memory image: random data, one MiB in eight a hole (not sent).
const MEMORY_MIB: u64 = 512;
/// Its root filesystem: a sparse image, dense at the start, with scattered extents.
const ROOTFS_MIB: u64 = 2048;
const FETCH_RUNS: usize = 3;

/// A host agent whose templates are a data directory's, copied as `LocalAgent` copies
/// them (`FsTemplates` on blocking threads, the export a few chunks ahead of the
/// stream); anything else answers as a host that only reports itself.
#[derive(Debug)]
struct TemplateHost {
    reporting: ReportingHost,
    store: FsTemplates,
}

impl TemplateHost {
    /// Its side of template copies, as a `wrenn agent` does them.
    fn copies(&self) -> wrenn_agent::TemplateCopies {
        wrenn_agent::TemplateCopies(self.store.clone())
    }
}

fn template_name(name: &str) -> Result<TemplateName, HostError> {
    TemplateName::parse(name)
        .map_err(|e| HostError::new(HostErrorKind::InvalidArgument, e.to_string()))
}

fn template_error(e: &TemplateError) -> HostError {
    let kind = match e {
        TemplateError::Unknown { .. } => HostErrorKind::NotFound,
        _ => HostErrorKind::Internal,
    };
    HostError::new(kind, wrenn_core::manager::error_chain(e))
}

#[async_trait::async_trait]
impl HostAgent for TemplateHost {
    async fn versions(&self) -> Result<HostVersions, HostError> {
        self.reporting.versions().await
    }
    async fn info(&self) -> Result<HostInfo, HostError> {
        self.reporting.info().await
    }
    async fn create(&self, spec: CapsuleSpec) -> Result<HostCapsule, HostError> {
        self.reporting.create(spec).await
    }
    async fn get(&self, id: &CapsuleId) -> Result<HostCapsule, HostError> {
        self.reporting.get(id).await
    }
    async fn list(&self) -> Result<Vec<HostCapsule>, HostError> {
        self.reporting.list().await
    }
    async fn pause(&self, id: &CapsuleId, mode: PauseMode) -> Result<(), HostError> {
        self.reporting.pause(id, mode).await
    }
    async fn resume(&self, id: &CapsuleId, mode: ResumeMode) -> Result<HostCapsule, HostError> {
        self.reporting.resume(id, mode).await
    }
    async fn destroy(&self, id: &CapsuleId) -> Result<(), HostError> {
        self.reporting.destroy(id).await
    }
    async fn set_network(&self, id: &CapsuleId, policy: EgressPolicy) -> Result<(), HostError> {
        self.reporting.set_network(id, policy).await
    }
    async fn fork(
        &self,
        id: &CapsuleId,
        count: usize,
        labels: HashMap<String, String>,
    ) -> Result<Vec<HostCapsule>, HostError> {
        self.reporting.fork(id, count, labels).await
    }
    async fn snapshot(&self, id: &CapsuleId, name: &str) -> Result<HostTemplate, HostError> {
        self.reporting.snapshot(id, name).await
    }
    async fn templates(&self) -> Result<Vec<HostTemplate>, HostError> {
        let names = self.store.list().await.map_err(|e| template_error(&e))?;
        let mut out = Vec::with_capacity(names.len());
        for n in names {
            out.push(self.template(n.as_str()).await?);
        }
        Ok(out)
    }
    async fn template(&self, name: &str) -> Result<HostTemplate, HostError> {
        let t = self
            .store
            .describe(&template_name(name)?)
            .await
            .map_err(|e| template_error(&e))?;
        Ok(HostTemplate {
            name: t.name.to_string(),
            snapshot: t.snapshot.is_some(),
            vcpus: t.snapshot.map(|s| s.vcpus),
            memory_mb: t.snapshot.map(|s| s.memory_mb),
            size_bytes: t.size_bytes,
            created_at: t.created_at,
        })
    }
    async fn delete_template(&self, name: &str) -> Result<(), HostError> {
        self.store
            .delete(&template_name(name)?)
            .await
            .map_err(|e| template_error(&e))
    }

    async fn template_manifest(&self, name: &str) -> Result<TemplateManifest, HostError> {
        self.copies().manifest(name).await
    }

    async fn export_template(
        &self,
        name: &str,
        from: BTreeMap<String, u64>,
    ) -> Result<TemplateChunks, HostError> {
        self.copies().export(name, from).await
    }

    async fn import_state(
        &self,
        manifest: &TemplateManifest,
    ) -> Result<BTreeMap<String, u64>, HostError> {
        self.copies().import_state(manifest).await
    }

    async fn import_template(
        &self,
        manifest: TemplateManifest,
        chunks: TemplateChunks,
    ) -> Result<HostTemplate, HostError> {
        let name = self.copies().import(manifest, chunks).await?;
        self.template(&name).await
    }

    async fn envd(&self, id: &CapsuleId) -> Result<Endpoint, HostError> {
        self.reporting.envd(id).await
    }
    async fn port(&self, id: &CapsuleId, port: u16) -> Result<Endpoint, HostError> {
        self.reporting.port(id, port).await
    }
    async fn open(&self, id: &CapsuleId, port: u16) -> Result<GuestStream, HostError> {
        self.reporting.open(id, port).await
    }
    async fn metrics(
        &self,
        id: &CapsuleId,
        range: Duration,
    ) -> Result<Vec<MetricPoint>, HostError> {
        self.reporting.metrics(id, range).await
    }
    async fn export_metrics(&self, id: &CapsuleId) -> Result<Option<TierSnapshot>, HostError> {
        self.reporting.export_metrics(id).await
    }
    async fn import_metrics(&self, id: &CapsuleId, saved: TierSnapshot) -> Result<(), HostError> {
        self.reporting.import_metrics(id, saved).await
    }
    async fn pools(&self) -> Result<Vec<PoolStats>, HostError> {
        self.reporting.pools().await
    }
    async fn set_pool(&self, template: &str, size: usize) -> Result<(), HostError> {
        self.reporting.set_pool(template, size).await
    }
}

/// Fills `buf` from a xorshift sequence: incompressible, no zero runs.
fn fill_random(buf: &mut [u8], seed: &mut u64) {
    for word in buf.chunks_exact_mut(8) {
        *seed ^= *seed << 13;
        *seed ^= *seed >> 7;
        *seed ^= *seed << 17;
        word.copy_from_slice(&seed.to_le_bytes());
    }
}

/// Writes `size` bytes at `path` (mode `mode`), random in the MiB ranges `data` picks
/// and a hole elsewhere; synced, so no writeback of it overlaps the copies.
fn write_file(
    path: &Path,
    size: u64,
    mode: u32,
    seed: &mut u64,
    data: impl Fn(u64) -> bool,
) -> Result<()> {
    use std::io::{Seek, SeekFrom, Write};
    use std::os::unix::fs::PermissionsExt;
    let mut f =
        std::fs::File::create(path).with_context(|| format!("creating {}", path.display()))?;
    let mut buf = vec![0u8; MIB as usize];
    let mut at = 0;
    while at < size {
        let n = (size - at).min(MIB);
        if data(at / MIB) {
            fill_random(&mut buf[..n as usize], seed);
            f.seek(SeekFrom::Start(at))?;
            f.write_all(&buf[..n as usize])?;
        }
        at += n;
    }
    f.set_len(size)?;
    f.sync_all()?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))?;
    Ok(())
}

/// A snapshot template's files under data directory `root`, as `wrenn` lays them out:
/// a sparse root filesystem image, the snapshot's memory image, device state and
/// metadata.
fn make_template(root: &Path) -> Result<()> {
    let dir = DataDir::new(root).template_dir(FETCHED);
    let snap = dir.join(template_files::SNAPSHOT);
    std::fs::create_dir_all(&snap)?;
    let mut seed = 0x7e3a_11c5_9d2b_4f01;
    // A fresh ext4 image: its first 48 MiB written, then an extent every 32 MiB.
    write_file(
        &dir.join(template_files::ROOTFS),
        ROOTFS_MIB * MIB,
        0o640,
        &mut seed,
        |mib| mib < 48 || mib % 32 == 5,
    )?;
    write_file(
        &snap.join(template_files::MEMORY),
        MEMORY_MIB * MIB,
        0o600,
        &mut seed,
        |mib| mib % 8 != 7,
    )?;
    write_file(
        &snap.join("device.state"),
        29 * 1024 + 312,
        0o600,
        &mut seed,
        |_| true,
    )?;
    let meta = serde_json::json!({
        "bench": "template_fetch",
        "spec": { "vcpus": 1, "memory_mb": MEMORY_MIB },
    });
    std::fs::write(snap.join(template_files::META), serde_json::to_vec(&meta)?)?;
    Ok(())
}

/// Checks that the template copy in `b` has the files of `a`: sizes, modes, bytes.
fn same_files(a: &Path, b: &Path) -> Result<()> {
    use std::io::Read;
    use std::os::unix::fs::PermissionsExt;
    for (rel, path) in [
        template_files::ROOTFS.to_string(),
        format!("{}/{}", template_files::SNAPSHOT, template_files::MEMORY),
        format!("{}/device.state", template_files::SNAPSHOT),
        format!("{}/{}", template_files::SNAPSHOT, template_files::META),
    ]
    .iter()
    .map(|rel| (rel, a.join(rel)))
    {
        let copy = b.join(rel);
        let (ma, mb) = (std::fs::metadata(&path)?, std::fs::metadata(&copy)?);
        anyhow::ensure!(ma.len() == mb.len(), "{rel}: sizes differ");
        anyhow::ensure!(
            ma.permissions().mode() & 0o777 == mb.permissions().mode() & 0o777,
            "{rel}: modes differ"
        );
        let (mut fa, mut fb) = (std::fs::File::open(&path)?, std::fs::File::open(&copy)?);
        let (mut ba, mut bb) = (vec![0u8; MIB as usize], vec![0u8; MIB as usize]);
        let mut left = ma.len();
        while left > 0 {
            let n = left.min(MIB) as usize;
            fa.read_exact(&mut ba[..n])?;
            fb.read_exact(&mut bb[..n])?;
            anyhow::ensure!(ba[..n] == bb[..n], "{rel}: content differs");
            left -= n as u64;
        }
    }
    let files = |d: &Path| -> Result<usize> {
        Ok(std::fs::read_dir(d)?.count()
            + std::fs::read_dir(d.join(template_files::SNAPSHOT))?.count())
    };
    anyhow::ensure!(files(a)? == files(b)?, "the copy's files differ in number");
    Ok(())
}

/// One copy, as the control plane relays it.
#[derive(Clone, Copy, Debug)]
struct Fetch {
    took: Duration,
    /// Bytes of the chunks sent (the non-zero MiB ranges).
    sent: u64,
    /// Total size of the template's files.
    file_bytes: u64,
    manifest: Duration,
    /// From the manifest's return to the last chunk through the relay.
    stream: Duration,
    /// From the last chunk to the import's answer (sync, checksums, rename).
    finish: Duration,
}

impl Fetch {
    fn mib_s(&self) -> f64 {
        self.sent as f64 / MIB as f64 / self.took.as_secs_f64()
    }
}

/// `copy_template`'s relay from `from` to `to`, timed.
async fn relay(from: &dyn HostAgent, to: &dyn HostAgent) -> Result<Fetch> {
    use futures_util::StreamExt;
    let t = Instant::now();
    let manifest = from.template_manifest(FETCHED).await?;
    let manifest_at = t.elapsed();
    let have = to.import_state(&manifest).await?;
    anyhow::ensure!(have.is_empty(), "a previous import was left: {have:?}");
    let chunks = from.export_template(FETCHED, have).await?;
    let seen = Arc::new(std::sync::Mutex::new((0u64, manifest_at)));
    let counted = {
        let seen = seen.clone();
        chunks.inspect(move |c| {
            if let (Ok(c), Ok(mut s)) = (c, seen.lock()) {
                *s = (s.0 + c.data.len() as u64, t.elapsed());
            }
        })
    };
    let file_bytes = manifest.files.iter().map(|f| f.size).sum();
    to.import_template(manifest, Box::pin(counted)).await?;
    let took = t.elapsed();
    let (sent, last) = *seen.lock().map_err(|_| anyhow::anyhow!("poisoned"))?;
    Ok(Fetch {
        took,
        sent,
        file_bytes,
        manifest: manifest_at,
        stream: last - manifest_at,
        finish: took - last,
    })
}

/// Copies of a snapshot template from one agent to another, both served over gRPC on
/// loopback with their templates in directories of their own; the median copy (by
/// throughput) of [`FETCH_RUNS`].
async fn template_fetch(dir: &Path) -> Result<Fetch> {
    let (src, dst) = (dir.join("source"), dir.join("destination"));
    let _ = std::fs::remove_dir_all(dir);
    std::fs::create_dir_all(DataDir::new(&dst).templates())?;
    make_template(&src)?;
    let mut urls = Vec::new();
    let mut servers = Vec::new();
    for (i, root) in [&src, &dst].into_iter().enumerate() {
        let agent: Arc<dyn HostAgent> = Arc::new(TemplateHost {
            reporting: ReportingHost::new(&format!("copy-{i}"), 2, 4096, 0),
            store: FsTemplates::new(DataDir::new(root)),
        });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        urls.push(format!("http://{}", listener.local_addr()?));
        servers.push(tokio::spawn(wrenn_rpc::serve(
            agent,
            listener,
            std::future::pending(),
        )));
    }
    let from = wrenn_rpc::RemoteAgent::connect_lazy(&urls[0], Default::default())?;
    let to = wrenn_rpc::RemoteAgent::connect_lazy(&urls[1], Default::default())?;
    let (a, b) = (
        DataDir::new(&src).template_dir(FETCHED),
        DataDir::new(&dst).template_dir(FETCHED),
    );
    let mut runs = Vec::new();
    for _ in 0..FETCH_RUNS {
        let fetch = relay(&from, &to).await.context("copying the template")?;
        same_files(&a, &b).context("checking the copy")?;
        anyhow::ensure!(
            !DataDir::new(&dst)
                .templates()
                .join(format!(".import-{FETCHED}"))
                .exists(),
            "the import's staging directory was left"
        );
        to.delete_template(FETCHED).await?;
        runs.push(fetch);
    }
    for s in servers {
        s.abort();
    }
    runs.sort_by(|x, y| x.mib_s().total_cmp(&y.mib_s()));
    Ok(runs[runs.len() / 2])
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
    let fetch = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?
        .block_on(template_fetch(&scratch.join("template-fetch")));
    let _ = std::fs::remove_dir_all(&scratch);
    let (heartbeats, monitor_rounds) = heartbeats?;
    let failover = failover?;
    let fetch = fetch?;
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?
        .block_on(creates_and_placement(
            heartbeats,
            monitor_rounds,
            failover,
            interval,
            fetch,
        ))
}

async fn creates_and_placement(
    heartbeats: f64,
    monitor_rounds: usize,
    failover: f64,
    interval: Duration,
    fetch: Fetch,
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
                format!("template copy between agents (gRPC loopback), median of {FETCH_RUNS}"),
                format!("{:.1} MiB/s of data sent (goal ≥ 200)", fetch.mib_s()),
            ),
            (
                "  the template copied".into(),
                format!(
                    "{:.0} MiB in files, {:.0} MiB of it sent (non-zero), in {:.2} s",
                    fetch.file_bytes as f64 / MIB as f64,
                    fetch.sent as f64 / MIB as f64,
                    fetch.took.as_secs_f64()
                ),
            ),
            (
                "  its phases: manifest, chunks streamed, import finished".into(),
                format!(
                    "{:.2} s, {:.2} s, {:.2} s",
                    fetch.manifest.as_secs_f64(),
                    fetch.stream.as_secs_f64(),
                    fetch.finish.as_secs_f64()
                ),
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
        "template_fetch_mib_s": (fetch.mib_s() * 10.0).round() / 10.0,
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
