//! Template build benchmark, measured side by side in one run on this host's
//! acceleration. The server (`wrenn_api::router` with its build workers over a
//! `LocalAgent`, a fresh SQLite database) runs in this process.
//!
//! - `build_overhead_s`: wall time of a recipe build (`POST /v1/builds` until it reads
//!   `success`: capsule start, pre- and post-build phases, steps, snapshot) minus its
//!   steps' own run time, which is the same commands run through
//!   `POST /v1/capsules/{id}/exec` in a capsule of the base template, in the same run;
//!   median over the rounds (goal ≤ 5 s);
//! - `create_from_built_template_ratio`: `POST /v1/capsules` from the built snapshot
//!   template (its start command restored running) over a cold boot of its base
//!   template, interleaved, medians (goal ≤ 1/30 under KVM; reported under TCG);
//! - `oci_unpack_mib_s`: a container image layer applied to a root tree
//!   (`wrenn_oci::layer::apply`: gzip decompression, tar entries written, whiteouts) in
//!   the data directory, where an import stages it: MiB of the uncompressed tar per
//!   second, median of 3 (goal ≥ 100). The layer is the `minimal` template's files as
//!   one tar.gz (gzip level 6, as registries commonly hold them), made before timing.
//!   `oci_unpack_tmpfs_mib_s` is the same into `/dev/shm` (no disk under it: the
//!   unpacker's own speed), interleaved; the root image made of the tree after (guest
//!   side added, `mkfs.ext4 -d`) is timed apart.
//!
//! `cargo bench --bench templates` (repo root, as root, images built).
//! `WRENN_BENCH_ROUNDS` sets the build rounds (default 2), `WRENN_DATA_DIR` where the
//! images are (default `/var/lib/wrenn`).

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};
use wrenn::{CreateOptions, DataDir, Host, HostOptions};
use wrenn_agent::{LocalAgent, LocalAgentOptions};
use wrenn_api::builds::BuildConfig;
use wrenn_api::{ApiConfig, AppState};
use wrenn_benches::{
    bench_data_dir, env_num, load_average, median_p99_ms, print_result, print_table, round2,
};

const BASE: &str = "minimal";
/// The steps that take time: their run time is measured apart.
const TIMED_STEPS: [&str; 3] = ["sleep 1", "sleep 1", "sleep 1"];
const CREATE_ROUNDS: usize = 3;

/// The recipe built: the timed steps, then steps that only set things, and a service.
fn recipe() -> Vec<String> {
    let mut r: Vec<String> = TIMED_STEPS.iter().map(|c| format!("RUN {c}")).collect();
    r.extend(
        [
            "ENV STAGE=bench",
            "WORKDIR /srv/app",
            "USER user",
            "START sleep infinity",
        ]
        .map(String::from),
    );
    r
}

/// A blocking client of the in-process server.
struct Api {
    base: String,
    key: String,
    agent: ureq::Agent,
}

impl Api {
    fn call(&self, method: &str, path: &str, body: Option<Value>) -> Result<Value> {
        let req = self
            .agent
            .request(method, &format!("{}{path}", self.base))
            .set("x-api-key", &self.key);
        let resp = match body {
            Some(b) => req
                .set("content-type", "application/json")
                .send_string(&b.to_string()),
            None => req.call(),
        };
        match resp {
            Ok(r) => {
                let text = r.into_string()?;
                Ok(if text.is_empty() {
                    Value::Null
                } else {
                    serde_json::from_str(&text)?
                })
            }
            Err(ureq::Error::Status(code, r)) => {
                bail!(
                    "{method} {path}: {code} {}",
                    r.into_string().unwrap_or_default()
                )
            }
            Err(e) => Err(e.into()),
        }
    }

    fn create(&self, template: &str) -> Result<String> {
        let c = self.call("POST", "/v1/capsules", Some(json!({"template": template})))?;
        c["id"]
            .as_str()
            .map(String::from)
            .context("create answered no id")
    }

    fn destroy(&self, id: &str) -> Result<()> {
        self.call("DELETE", &format!("/v1/capsules/{id}"), None)?;
        Ok(())
    }

    /// Builds `name` from the recipe; its wall time.
    fn build(&self, name: &str) -> Result<Duration> {
        let t = Instant::now();
        let b = self.call(
            "POST",
            "/v1/builds",
            Some(
                json!({"name": name, "base_template": BASE, "recipe": recipe(),
                        "timeout_sec": 1800}),
            ),
        )?;
        let id = b["id"]
            .as_str()
            .context("build answered no id")?
            .to_string();
        loop {
            let b = self.call("GET", &format!("/v1/builds/{id}"), None)?;
            match b["status"].as_str() {
                Some("success") => return Ok(t.elapsed()),
                Some("failed" | "cancelled") => bail!("build {id} ended: {}", b["error"]),
                _ => std::thread::sleep(Duration::from_millis(100)),
            }
        }
    }

    /// The timed steps run through exec in a capsule of the base template.
    fn steps_run_time(&self) -> Result<Duration> {
        let id = self.create(BASE)?;
        let mut total = Duration::ZERO;
        for cmd in TIMED_STEPS {
            let t = Instant::now();
            let r = self.call(
                "POST",
                &format!("/v1/capsules/{id}/exec"),
                Some(json!({"cmd": "/bin/sh", "args": ["-c", cmd]})),
            )?;
            total += t.elapsed();
            if r["exit_code"].as_i64() != Some(0) {
                bail!("{cmd}: {r}");
            }
        }
        self.destroy(&id)?;
        Ok(total)
    }
}

fn secs(d: Duration) -> f64 {
    d.as_secs_f64()
}

fn median_s(v: &[Duration]) -> f64 {
    median_p99_ms(&mut v.to_vec()).0 / 1000.0
}

fn main() -> Result<()> {
    let rounds = env_num("WRENN_BENCH_ROUNDS", 2).max(1) as usize;
    let images = DataDir::from_env().root().to_path_buf();
    let load_before = load_average();
    let data = bench_data_dir(&images, "templates")?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let result = run(&rt, &data, rounds, &load_before);
    let _ = std::fs::remove_dir_all(&data);
    result
}

fn run(rt: &tokio::runtime::Runtime, data: &Path, rounds: usize, load_before: &str) -> Result<()> {
    let (host, state, db) = rt.block_on(async {
        let host = Host::local(HostOptions {
            data_dir: DataDir::new(data),
            ..Default::default()
        })
        .await
        .context("local host (run as root after `wrenn image build`)")?;
        let agent = Arc::new(LocalAgent::new(host.clone(), LocalAgentOptions::default()));
        let db = wrenn_db::Db::open(&wrenn_db::Db::sqlite_url(&data.join("wrenn.db"))).await?;
        let config = ApiConfig {
            rate_limit: 0,
            builds: BuildConfig {
                // No network here: the phases run, doing nothing.
                pre_build: "true".into(),
                post_build: "true".into(),
                ..Default::default()
            },
            ..Default::default()
        };
        let state = Arc::new(AppState::new(
            db.clone(),
            Default::default(),
            config,
            b"wrenn-bench-templates-jwt-secret",
        ));
        let conn = wrenn_api::hosts::HostConn::connect(agent, None)
            .await
            .map_err(|e| anyhow::anyhow!("host agent: {e}"))?;
        state
            .hosts
            .add(conn)
            .map_err(|e| anyhow::anyhow!("host agent: {e}"))?;
        anyhow::Ok((host, state, db))
    })?;
    let key = rt
        .block_on(wrenn_db::ensure_bootstrap(&db, None))?
        .context("fresh database gave no bootstrap key")?;
    let listener = rt.block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))?;
    let addr = listener.local_addr()?;
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let builders = {
        let _in_runtime = rt.enter();
        wrenn_api::builds::spawn_builders(state.clone())
    };
    let server = rt.spawn(async move {
        axum::serve(listener, wrenn_api::router(state))
            .with_graceful_shutdown(async {
                let _ = stop_rx.await;
            })
            .await
    });
    let api = Api {
        base: format!("http://{addr}"),
        key,
        agent: ureq::AgentBuilder::new()
            .timeout(Duration::from_secs(1800))
            .build(),
    };
    let measured = measure(&api, &host, rt, rounds);
    // Nothing outlives the benchmark, whatever failed.
    rt.block_on(async {
        for (id, e) in host.capsules().destroy_all().await {
            eprintln!("destroying {id}: {e}");
        }
    });
    let _ = stop_tx.send(());
    builders.abort();
    let _ = rt.block_on(async { tokio::time::timeout(Duration::from_secs(10), server).await });
    rt.block_on(db.close());
    let m = measured?;

    let overheads: Vec<Duration> = m
        .builds
        .iter()
        .zip(&m.steps)
        .map(|(b, s)| b.saturating_sub(*s))
        .collect();
    let build_overhead_s = median_s(&overheads);
    let ratio = median_s(&m.from_built) / median_s(&m.cold);
    let accel = host.accel_probe();
    let oci = rt.block_on(measure_unpack(data))?;
    print_table(
        "template builds",
        &[
            (
                "accel".into(),
                format!("{} ({})", accel.accel, accel.reason),
            ),
            (
                "load average (1/5/15 min), start → end".into(),
                format!("{load_before} → {}", load_average()),
            ),
            (
                format!("recipe on {BASE}"),
                format!(
                    "{} steps ({} timed), START, no readiness check",
                    recipe().len(),
                    TIMED_STEPS.len()
                ),
            ),
            (
                format!("build wall time (n={rounds})"),
                format!("{:.2} s median", median_s(&m.builds)),
            ),
            (
                "its timed steps run through exec".into(),
                format!("{:.2} s median", median_s(&m.steps)),
            ),
            (
                "build overhead (wall − steps)".into(),
                format!(
                    "{build_overhead_s:.2} s median (goal ≤ 5: {})",
                    if build_overhead_s <= 5.0 {
                        "met"
                    } else {
                        "MISSED"
                    }
                ),
            ),
            (
                format!("create from the built template (n={CREATE_ROUNDS})"),
                format!("{:.0} ms median", median_s(&m.from_built) * 1000.0),
            ),
            (
                format!("cold boot of {BASE}, interleaved (n={CREATE_ROUNDS})"),
                format!("{:.0} ms median", median_s(&m.cold) * 1000.0),
            ),
            (
                "create from built / cold boot".into(),
                format!("{ratio:.3} (goal ≤ 1/30 under KVM)"),
            ),
            (
                "OCI layer (minimal's files, tar.gz)".into(),
                format!(
                    "{:.1} MiB tar, {:.1} MiB gzip, {} entries",
                    oci.tar_mib, oci.gz_mib, oci.entries
                ),
            ),
            (
                "layer applied in the data directory (n=3)".into(),
                format!(
                    "{:.2} s median: {:.0} MiB/s (goal ≥ 100: {})",
                    oci.apply_s,
                    oci.mib_s,
                    if oci.mib_s >= 100.0 { "met" } else { "MISSED" }
                ),
            ),
            (
                "the same into /dev/shm, interleaved".into(),
                format!("{:.0} MiB/s (no disk under it)", oci.tmpfs_mib_s),
            ),
            (
                "root image of it (guest side, mkfs.ext4 -d)".into(),
                format!("{:.2} s", oci.image_s),
            ),
        ],
    );
    print_result(&json!({
        "accel": accel.accel.to_string(),
        "build_overhead_s": round2(build_overhead_s),
        "build_wall_s": round2(median_s(&m.builds)),
        "create_from_built_template_ratio": (ratio * 1000.0).round() / 1000.0,
        "oci_unpack_mib_s": oci.mib_s.round(),
        "oci_unpack_tmpfs_mib_s": oci.tmpfs_mib_s.round(),
    }));
    Ok(())
}

struct Unpack {
    tar_mib: f64,
    gz_mib: f64,
    entries: u64,
    apply_s: f64,
    mib_s: f64,
    tmpfs_mib_s: f64,
    image_s: f64,
}

/// Applies a layer of the `minimal` template's files to fresh trees (see the module
/// docs); the tree of the last round is made into a root image.
async fn measure_unpack(data: &Path) -> Result<Unpack> {
    use wrenn_oci::layer::{apply, Compression};
    let work = data.join("oci");
    let tree = work.join("src");
    std::fs::create_dir_all(&tree)?;
    let rootfs = data.join("templates").join(BASE).join(wrenn_oci::ROOTFS);
    let out = std::process::Command::new("debugfs")
        .arg("-R")
        .arg(format!("rdump / {}", tree.display()))
        .arg(&rootfs)
        .output()
        .context("running debugfs")?;
    if !out.status.success() {
        bail!("debugfs rdump: {}", String::from_utf8_lossy(&out.stderr));
    }
    let mut tar = tar::Builder::new(Vec::new());
    tar.follow_symlinks(false);
    tar.append_dir_all(".", &tree)?;
    let tar = tar.into_inner()?;
    let gz = {
        use std::io::Write;
        let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::new(6));
        e.write_all(&tar)?;
        e.finish()?
    };
    std::fs::remove_dir_all(&tree)?;
    let mut times = Vec::new();
    let mut tmpfs_times = Vec::new();
    let mut entries = 0;
    let root = work.join("root");
    let shm = Path::new("/dev/shm").join(format!("wrenn-bench-oci-{}", std::process::id()));
    for _ in 0..3 {
        for (dest, into) in [(&root, &mut times), (&shm, &mut tmpfs_times)] {
            let _ = std::fs::remove_dir_all(dest);
            std::fs::create_dir_all(dest)?;
            let t = Instant::now();
            let stats = apply(&gz[..], Compression::Gzip, dest)?;
            into.push(t.elapsed());
            entries = stats.entries;
        }
    }
    std::fs::remove_dir_all(&shm)?;
    let guest = wrenn_oci::rootfs::extract_guest(&rootfs, &work.join("guest"))
        .await
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let t = Instant::now();
    wrenn_oci::rootfs::finish(&root, &guest, "bench")?;
    let size = wrenn_oci::rootfs::image_size(wrenn_oci::rootfs::tree_bytes(&root));
    wrenn_oci::rootfs::make_ext4(&root, &work.join("rootfs.img"), size).await?;
    let image_s = secs(t.elapsed());
    std::fs::remove_dir_all(&work)?;
    let mib = |n: usize| n as f64 / f64::from(1 << 20);
    let apply_s = median_s(&times);
    Ok(Unpack {
        tar_mib: mib(tar.len()),
        gz_mib: mib(gz.len()),
        entries,
        apply_s,
        mib_s: mib(tar.len()) / apply_s,
        tmpfs_mib_s: mib(tar.len()) / median_s(&tmpfs_times),
        image_s,
    })
}

struct Measured {
    builds: Vec<Duration>,
    steps: Vec<Duration>,
    from_built: Vec<Duration>,
    cold: Vec<Duration>,
}

fn measure(
    api: &Api,
    host: &Host,
    rt: &tokio::runtime::Runtime,
    rounds: usize,
) -> Result<Measured> {
    let (mut builds, mut steps) = (Vec::new(), Vec::new());
    let mut name = String::new();
    for i in 0..rounds {
        name = format!("bench-built-{i}");
        steps.push(api.steps_run_time()?);
        builds.push(api.build(&name)?);
        eprintln!(
            "round {}: build {:.2} s, steps {:.2} s",
            i + 1,
            secs(builds[i]),
            secs(steps[i])
        );
    }
    let cold = CreateOptions {
        template: Some(BASE.into()),
        cold_boot: true,
        ..Default::default()
    };
    let caps = host.capsules();
    let (mut from_built, mut cold_t) = (Vec::new(), Vec::new());
    for _ in 0..CREATE_ROUNDS {
        let t = Instant::now();
        let id = api.create(&name)?;
        from_built.push(t.elapsed());
        api.destroy(&id)?;
        let t = Instant::now();
        let c = rt.block_on(caps.create(cold.clone()))?;
        cold_t.push(t.elapsed());
        rt.block_on(caps.destroy(&c.id))?;
    }
    Ok(Measured {
        builds,
        steps,
        from_built,
        cold: cold_t,
    })
}
