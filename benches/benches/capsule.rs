//! Capsule lifecycle benchmark: cold create (boot) to envd ready, destroy, and
//! the exec round trip of `true`, on this host's acceleration.
//!
//! `cargo bench --bench capsule` (repo root, as root, images built).
//! `WRENN_BENCH_ROUNDS` sets the create/destroy rounds (default 5).

use anyhow::{Context, Result};
use std::time::{Duration, Instant};
use wrenn::{CreateOptions, ExecRequest, Host, HostOptions};
use wrenn_benches::{median_p99_ms, print_result, print_table, round2};

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<()> {
    let rounds: usize = std::env::var("WRENN_BENCH_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(5);
    let host = Host::local(HostOptions::default())
        .await
        .context("local host (run as root after `wrenn image build`)")?;
    let caps = host.capsules();
    let accel = host.accel_probe().accel;
    // A real boot, not a restore of the template's pre-booted snapshot.
    let opts = CreateOptions {
        template: Some("minimal".into()),
        memory_mb: Some(256),
        cold_boot: true,
        ..Default::default()
    };

    let (mut creates, mut destroys) = (Vec::new(), Vec::new());
    for _ in 0..rounds {
        let t = Instant::now();
        let info = caps.create(opts.clone()).await?;
        creates.push(t.elapsed());
        let t = Instant::now();
        caps.destroy(&info.id).await?;
        destroys.push(t.elapsed());
    }

    let info = caps.create(opts.clone()).await?;
    let true_cmd = ExecRequest {
        cmd: "/bin/true".into(),
        ..Default::default()
    };
    caps.run(&info.id, &true_cmd, None).await?; // warm the guest's page cache
    let mut execs: Vec<Duration> = Vec::new();
    for _ in 0..30 {
        let t = Instant::now();
        let out = caps.run(&info.id, &true_cmd, None).await?;
        execs.push(t.elapsed());
        anyhow::ensure!(out.exit.code == 0, "true exited {}", out.exit.code);
    }
    caps.destroy(&info.id).await?;

    let (create_ms, create_p99) = median_p99_ms(&mut creates);
    let (destroy_ms, destroy_p99) = median_p99_ms(&mut destroys);
    let (exec_ms, exec_p99) = median_p99_ms(&mut execs);
    print_table(
        &format!(
            "capsule lifecycle (accel: {accel} — {})",
            host.accel_probe().reason
        ),
        &[
            (
                format!("cold create → envd ready (n={rounds})"),
                format!("{create_ms:.0} ms median, {create_p99:.0} ms max"),
            ),
            (
                format!("destroy (n={rounds})"),
                format!("{destroy_ms:.1} ms median, {destroy_p99:.1} ms max"),
            ),
            (
                "exec round trip of `true` (n=30)".into(),
                format!("{exec_ms:.2} ms median, {exec_p99:.2} ms p99"),
            ),
        ],
    );
    print_result(&serde_json::json!({
        "accel": accel.as_str(),
        "cold_create_ms": round2(create_ms),
        "destroy_ms": round2(destroy_ms),
        "exec_rtt_ms": round2(exec_ms),
    }));
    Ok(())
}
