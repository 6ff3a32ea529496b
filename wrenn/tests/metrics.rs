//! End-to-end: the metrics sampler watching a real guest through create, load, pause
//! (history exported and forgotten), resume (history imported) and destroy.

#![allow(clippy::tests_outside_test_module)] // integration tests are their own crate

mod common;

use common::*;
use std::time::Duration;
use wrenn::metrics::{MetricPoint, MetricsSampler, TierSnapshot};
use wrenn::{CapsuleId, CreateOptions};

const PERIOD: Duration = Duration::from_millis(200);

/// Waits until capsule `id` has a sample stamped after `after` (Unix seconds).
async fn sample_after(sampler: &MetricsSampler, id: &CapsuleId, after: i64) -> MetricPoint {
    for _ in 0..100 {
        if let Some(p) = sampler.latest(id).filter(|p| p.timestamp_unix > after) {
            return p;
        }
        tokio::time::sleep(PERIOD).await;
    }
    panic!("no sample of {id} after {after}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn samples_a_capsule_across_pause_resume_and_destroy() {
    let Some(host) = host().await else { return };
    let caps = host.capsules();
    let sampler = MetricsSampler::start(caps.clone(), PERIOD);
    let info = caps
        .create(CreateOptions {
            template: Some("minimal".into()),
            memory_mb: Some(256),
            ..Default::default()
        })
        .await
        .expect("create");
    let fp = footprint(&host, &info);
    let id = info.id.clone();

    // One vCPU kept busy for 3 s shows up as CPU use.
    let busy = "end=$(($(date +%s) + 3)); while [ $(date +%s) -lt $end ]; do :; done";
    assert_eq!(run(&host, &id, busy).await.2, 0);
    let p = sample_after(&sampler, &id, 0).await;
    assert!(p.mem_bytes > 16 << 20, "VMM RSS {p:?}");
    assert!(p.disk_bytes > 0, "disk layer {p:?}");
    let minute = sampler.points(&id, Duration::from_secs(60));
    assert!(minute.len() >= 10, "{} points", minute.len());
    assert!(minute
        .windows(2)
        .all(|w| w[0].timestamp_unix <= w[1].timestamp_unix));
    let peak = minute.iter().map(|p| p.cpu_pct).fold(0.0, f64::max);
    assert!(peak > 20.0 && peak <= 100.0, "peak cpu {peak}: {minute:?}");
    eprintln!(
        "latest {p:?}, peak cpu {peak:.1} % over {} points",
        minute.len()
    );
    let hour = sampler.points(&id, Duration::from_secs(3600));
    assert!(
        !hour.is_empty() && hour.len() <= 2,
        "30 s windows: {hour:?}"
    );

    // Paused: no new samples; the history goes out as JSON and the rings are dropped.
    caps.pause(&id).await.expect("pause");
    let before = sampler.latest(&id).expect("latest before pause");
    tokio::time::sleep(PERIOD * 5).await;
    assert_eq!(sampler.latest(&id), Some(before), "sampled while paused");
    let json = serde_json::to_string(&sampler.export(&id).expect("export")).expect("json");
    sampler.forget(&id);
    assert!(sampler.latest(&id).is_none());
    assert!(sampler.export(&id).is_none());

    // Resumed (a new VMM process): the imported history carries on.
    let snapshot: TierSnapshot = serde_json::from_str(&json).expect("parse");
    sampler.import(&id, snapshot);
    caps.resume(&id).await.expect("resume");
    let first_vmm = fp.vmm_pid;
    let fp = footprint(&host, &info);
    assert_ne!(fp.vmm_pid, first_vmm, "resume starts a new VMM");
    let after = sample_after(&sampler, &id, before.timestamp_unix).await;
    assert!(after.mem_bytes > 0);
    let minute = sampler.points(&id, Duration::from_secs(60));
    assert!(minute
        .iter()
        .any(|p| p.timestamp_unix <= before.timestamp_unix));
    assert!(minute
        .iter()
        .any(|p| p.timestamp_unix > before.timestamp_unix));

    // Destroyed and forgotten: the history does not come back.
    caps.destroy(&id).await.expect("destroy");
    sampler.forget(&id);
    tokio::time::sleep(PERIOD * 5).await;
    assert!(sampler.latest(&id).is_none());
    assert!(sampler.points(&id, Duration::from_secs(600)).is_empty());
    drop(sampler);
    assert_gone(&fp).await;
}
