//! Pause/resume, snapshot templates and fork, with real guests.

#![allow(clippy::tests_outside_test_module)] // integration tests are their own crate

mod common;

use common::*;
use std::collections::HashMap;
use std::time::Duration;
use wrenn::guest::ExecRequest;
use wrenn::{CapsuleError, CapsuleStatus, CreateOptions};

fn opts() -> CreateOptions {
    CreateOptions {
        template: Some("minimal".into()),
        memory_mb: Some(256),
        ..Default::default()
    }
}

async fn counter(host: &wrenn::Host, id: &wrenn::CapsuleId) -> u64 {
    let (out, _, _) = run(host, id, "cat /tmp/counter").await;
    out.trim()
        .parse()
        .unwrap_or_else(|_| panic!("counter not a number: {out:?}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pause_resume_keeps_processes_files_and_env_and_moves_slots() {
    let Some(host) = host().await else { return };
    let caps = host.capsules();
    let mut o = opts();
    o.envs = HashMap::from([("KEEP".to_string(), "me".to_string())]);
    let info = caps.create(o).await.expect("create");
    let id = info.id.clone();
    // A process that keeps counting, started in the background.
    let bg = ExecRequest {
        cmd: "/bin/sh".into(),
        args: vec![
            "-c".into(),
            "i=0; while true; do i=$((i+1)); echo $i > /tmp/counter; sleep 0.1; done".into(),
        ],
        ..Default::default()
    };
    let stream = caps.exec(&id, &bg).await.expect("start counter");
    let pid = stream.pid;
    drop(stream);
    run(&host, &id, "echo persisted > /home/user/note.txt").await;
    tokio::time::sleep(Duration::from_millis(800)).await;
    let before = counter(&host, &id).await;
    assert!(before > 0);
    let old_addr = caps.get(&id).expect("get").host_addr;

    let report = caps.pause(&id).await.expect("pause");
    assert!(report.memory_bytes_written > 0);
    assert_eq!(caps.get(&id).expect("get").status, CapsuleStatus::Paused);
    assert!(matches!(
        caps.run(&id, &sh("true"), None).await,
        Err(CapsuleError::InvalidState { .. })
    ));
    assert!(matches!(
        caps.pause(&id).await,
        Err(CapsuleError::InvalidState { .. })
    ));
    // Another capsule takes the freed slot, so the resume must land elsewhere.
    let other = caps.create(opts()).await.expect("create other");

    let resumed = caps.resume(&id).await.expect("resume");
    assert_eq!(resumed.status, CapsuleStatus::Running);
    assert_ne!(resumed.host_addr, old_addr, "resumed into the same slot");
    assert!(matches!(
        caps.resume(&id).await,
        Err(CapsuleError::InvalidState { .. })
    ));
    let after = counter(&host, &id).await;
    assert!(after >= before, "counter went back: {before} -> {after}");
    tokio::time::sleep(Duration::from_millis(800)).await;
    let later = counter(&host, &id).await;
    assert!(
        later > after,
        "counter stopped after resume: {after} -> {later}"
    );
    let (note, _, _) = run(
        &host,
        &id,
        "cat /home/user/note.txt; echo $KEEP; kill -0 "
            .to_string()
            .as_str(),
    )
    .await;
    let _ = note;
    let (out, _, code) = run(
        &host,
        &id,
        &format!("cat /home/user/note.txt; echo $KEEP; kill -0 {pid} && echo alive"),
    )
    .await;
    assert_eq!(code, 0);
    assert_eq!(out, "persisted\nme\nalive\n");
    // The guest clock was corrected after the resume (within a couple of seconds of the host's).
    let (guest_now, _, _) = run(&host, &id, "date +%s").await;
    let host_now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    assert!(
        (guest_now.trim().parse::<i64>().unwrap() - host_now).abs() <= 3,
        "guest clock {guest_now} vs {host_now}"
    );

    caps.destroy(&other.id).await.expect("destroy other");
    caps.destroy(&id).await.expect("destroy");
    assert!(
        !host.data_dir().snapshots().join(id.as_str()).exists(),
        "snapshot left after destroy"
    );
}
