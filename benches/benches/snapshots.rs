//! Snapshot benchmark, all measured side by side in one run on this host's
//! acceleration: create-from-template vs cold boot, resume vs cold boot, bytes a
//! pause writes vs bytes the guest dirtied (1, 10, 100 MiB), host memory per idle
//! clone (20 clones of one 512 MiB template), create from a warm pool and what a ready
//! pool entry costs (PSS), and the userfaultfd memory server's
//! 4 KiB fault service rate vs a plain memcpy.
//!
//! `cargo bench --bench snapshots` (repo root, as root, images built).

use anyhow::{Context, Result};
use std::time::{Duration, Instant};
use wrenn::{CapsuleId, CreateOptions, Host, HostOptions};
use wrenn_benches::{median_p99_ms, print_result, print_table, round2};

const MIB: u64 = 1024 * 1024;

fn round3(v: f64) -> f64 {
    format!("{v:.3}").parse().unwrap_or(v)
}

/// Proportional and resident set size of a process, in KiB (`smaps_rollup`).
fn pss_rss_kib(pid: u32) -> (u64, u64) {
    let text = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).unwrap_or_default();
    let get = |key: &str| {
        text.lines()
            .find(|l| l.starts_with(key))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    (get("Pss:"), get("Rss:"))
}

fn vmm_pid(host: &Host, id: &CapsuleId) -> Option<u32> {
    let state = std::fs::read(
        host.data_dir()
            .capsules()
            .join(id.as_str())
            .join("state.json"),
    )
    .ok()?;
    let v: serde_json::Value = serde_json::from_slice(&state).ok()?;
    v["vmm_pid"].as_u64().map(|p| p as u32)
}

fn pool_stats(host: &Host, template: &str) -> wrenn::PoolStats {
    host.capsules()
        .pool_stats()
        .into_iter()
        .find(|p| p.template == template)
        .unwrap_or_default()
}

async fn wait_pool(host: &Host, template: &str, n: usize) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(120);
    while pool_stats(host, template).ready < n {
        anyhow::ensure!(
            Instant::now() < deadline,
            "the pool of {template} did not fill"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(())
}

/// VMM processes of the pool entries (their records say `pooled`).
fn pooled_vmm_pids(host: &Host) -> Vec<u32> {
    let Ok(dirs) = std::fs::read_dir(host.data_dir().capsules()) else {
        return Vec::new();
    };
    dirs.flatten()
        .filter_map(|d| std::fs::read(d.path().join("state.json")).ok())
        .filter_map(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
        .filter(|v| v["pooled"] == true)
        .filter_map(|v| v["vmm_pid"].as_u64().map(|p| p as u32))
        .collect()
}

async fn sh(host: &Host, id: &CapsuleId, script: &str) -> Result<String> {
    let req = wrenn::ExecRequest {
        cmd: "/bin/sh".into(),
        args: vec!["-c".into(), script.into()],
        ..Default::default()
    };
    let out = host.capsules().run(id, &req, None).await?;
    anyhow::ensure!(
        out.exit.code == 0,
        "{script}: exit {} {}",
        out.exit.code,
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<()> {
    let host = Host::local(HostOptions::default())
        .await
        .context("local host (root, `wrenn image build` done)")?;
    let caps = host.capsules();
    let accel = host.accel_probe().accel;
    let template = CreateOptions {
        template: Some("minimal".into()),
        ..Default::default()
    };
    let cold = CreateOptions {
        cold_boot: true,
        ..template.clone()
    };
    let rounds = 3;

    // Cold boot and create-from-template, interleaved so both see the same load.
    let (mut cold_t, mut tpl_t, mut resume_t) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..rounds {
        let t = Instant::now();
        let c = caps.create(cold.clone()).await?;
        cold_t.push(t.elapsed());
        caps.destroy(&c.id).await?;
        let t = Instant::now();
        let c = caps.create(template.clone()).await?;
        tpl_t.push(t.elapsed());
        caps.pause(&c.id).await?;
        let t = Instant::now();
        caps.resume(&c.id).await?;
        resume_t.push(t.elapsed());
        caps.destroy(&c.id).await?;
    }
    let (cold_ms, _) = median_p99_ms(&mut cold_t);
    let (tpl_ms, _) = median_p99_ms(&mut tpl_t);
    let (resume_ms, _) = median_p99_ms(&mut resume_t);

    // Create from a warm pool (one ready capsule, refilled between rounds).
    caps.set_pool("minimal", 1).await?;
    let mut pool_t = Vec::new();
    for _ in 0..rounds {
        wait_pool(&host, "minimal", 1).await?;
        let t = Instant::now();
        let c = caps.create(template.clone()).await?;
        pool_t.push(t.elapsed());
        caps.destroy(&c.id).await?;
    }
    let hits = pool_stats(&host, "minimal").hits;
    anyhow::ensure!(
        hits == rounds as u64,
        "only {hits} of {rounds} creates came from the pool"
    );
    let (pool_ms, _) = median_p99_ms(&mut pool_t);
    // What a ready pool entry costs the host: PSS of idle entries' VMMs.
    let pool_n = 4;
    caps.set_pool("minimal", pool_n).await?;
    wait_pool(&host, "minimal", pool_n).await?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let pool_pss_kib: u64 = pooled_vmm_pids(&host)
        .into_iter()
        .map(|pid| pss_rss_kib(pid).0)
        .sum();
    let pool_pss_mb = pool_pss_kib as f64 / 1024.0 / pool_n as f64;
    caps.set_pool("minimal", 0).await?;

    // Pause amplification: bytes written by a pause vs bytes the guest dirtied.
    let c = caps.create(template.clone()).await?;
    sh(
        &host,
        &c.id,
        "head -c 110m /dev/zero > /dev/null; mkdir -p /dev/shm/b",
    )
    .await?;
    caps.pause(&c.id).await?;
    // What the guest dirties by itself in one resume/exec/pause cycle (kernel, envd,
    // the writer process), measured with an empty write: part of what it dirties.
    caps.resume(&c.id).await?;
    sh(
        &host,
        &c.id,
        "dd if=/dev/urandom of=/dev/shm/b/f0 bs=64k count=0 2>/dev/null",
    )
    .await?;
    let background = caps.pause(&c.id).await?.memory_bytes_written;
    let mut amp = Vec::new();
    for size in [1u64, 10, 100] {
        caps.resume(&c.id).await?;
        sh(
            &host,
            &c.id,
            &format!("head -c {}m /dev/urandom > /dev/shm/b/f{size}", size),
        )
        .await?;
        let report = caps.pause(&c.id).await?;
        let dirtied = size * MIB + background;
        amp.push((
            size,
            report.memory_bytes_written as f64 / dirtied as f64,
            report.memory_bytes_written,
        ));
        caps.resume(&c.id).await?;
        sh(&host, &c.id, &format!("rm /dev/shm/b/f{size}")).await?;
        caps.pause(&c.id).await?;
    }
    caps.destroy(&c.id).await?;

    // Host memory per idle clone: 20 clones of the 512 MiB template.
    let clones_n = 20;
    let mut clones = Vec::new();
    for _ in 0..clones_n {
        clones.push(caps.create(template.clone()).await?);
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (mut pss, mut rss) = (0u64, 0u64);
    for c in &clones {
        if let Some(pid) = vmm_pid(&host, &c.id) {
            let (p, r) = pss_rss_kib(pid);
            pss += p;
            rss += r;
        }
    }
    let mem_mb = clones.first().map(|c| c.memory_mb).unwrap_or(0);
    for c in &clones {
        caps.destroy(&c.id).await?;
    }
    let pss_per_clone_mb = pss as f64 / 1024.0 / clones_n as f64;
    let rss_per_clone_mb = rss as f64 / 1024.0 / clones_n as f64;

    // userfaultfd memory server vs memcpy.
    let rate = wrenn_storage::memserver::testing::measure_fault_rate(
        64 * 1024 * 1024,
        wrenn_storage::memserver::ServerOptions {
            prefetch: false,
            ..Default::default()
        },
    )?;

    let create_ratio = tpl_ms / cold_ms;
    let resume_ratio = resume_ms / cold_ms;
    let pool_ratio = pool_ms / cold_ms;
    let mut rows = vec![
        (
            "cold boot → envd ready (median)".to_string(),
            format!("{cold_ms:.0} ms"),
        ),
        (
            "create from template snapshot".to_string(),
            format!("{tpl_ms:.0} ms  (ratio {create_ratio:.3}, goal ≤ 0.033)"),
        ),
        (
            "create from a warm pool".to_string(),
            format!("{pool_ms:.1} ms  (ratio {pool_ratio:.4}, goal ≤ 0.01)"),
        ),
        (
            "resume paused capsule".to_string(),
            format!("{resume_ms:.0} ms  (ratio {resume_ratio:.3}, goal ≤ 0.033)"),
        ),
    ];
    rows.push((
        "guest's own dirtying per cycle (empty write)".to_string(),
        format!("{} KiB", background / 1024),
    ));
    for (size, a, bytes) in &amp {
        rows.push((
            format!("pause after writing {size} MiB"),
            format!(
                "{} KiB written / ({size} MiB + background) = {a:.2}x (goal ≤ 1.2x)",
                bytes / 1024
            ),
        ));
    }
    rows.push((
        format!("host memory per idle clone ({clones_n} × {mem_mb} MiB)"),
        format!("{pss_per_clone_mb:.1} MB proportional (PSS), {rss_per_clone_mb:.1} MB RSS counting shared pages in full"),
    ));
    rows.push((
        format!("host memory per ready pool entry ({pool_n} idle)"),
        format!("{pool_pss_mb:.1} MB PSS (goal ≤ {pss_per_clone_mb:.1}, an idle clone's)"),
    ));
    rows.push((
        "uffd 4 KiB fault service vs memcpy".to_string(),
        format!(
            "{:.0} MiB/s vs {:.0} MiB/s = {:.2}x (goal ≥ 0.5x)",
            rate.bytes as f64 / MIB as f64 / rate.fault_secs,
            rate.bytes as f64 / MIB as f64 / rate.memcpy_secs,
            rate.ratio()
        ),
    ));
    print_table(&format!("snapshots (accel: {accel})"), &rows);
    print_result(&serde_json::json!({
        "accel": accel.as_str(),
        "cold_boot_ms": round2(cold_ms),
        "create_from_template_ms": round2(tpl_ms),
        "create_ratio": round3(create_ratio),
        "create_from_pool_ms": round2(pool_ms),
        "pool_ratio": round3(pool_ratio),
        "pool_pss_mb": round2(pool_pss_mb),
        "resume_ms": round2(resume_ms),
        "resume_ratio": round3(resume_ratio),
        "pause_amplification_1m": round2(amp[0].1),
        "pause_amplification_10m": round2(amp[1].1),
        "pause_amplification_100m": round2(amp[2].1),
        "rss_per_clone_mb": round2(pss_per_clone_mb),
        "memserver_vs_memcpy": round2(rate.ratio()),
    }));
    Ok(())
}
