//! Killing the owning process in the middle of a pause (or of the merge a pause
//! triggers) never loses the last good snapshot. Own test binary: the adoption of
//! the dead child's capsule must not race other tests' startup sweeps.

#![allow(clippy::tests_outside_test_module)] // integration tests are their own crate

mod common;

use common::*;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use wrenn::{CapsuleStatus, CreateOptions, HostOptions};

const CHILD_ENV: &str = "WRENN_TEST_PAUSER_ID_FILE";

/// Run by the parent as a separate process: pauses and resumes a capsule in a loop
/// (merging every other pause) until it is killed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "helper process of kill_during_pause_keeps_the_last_good_snapshot"]
async fn pauser_child() {
    let Some(id_file) = std::env::var_os(CHILD_ENV) else {
        return;
    };
    let host = wrenn::Host::local(HostOptions {
        generation_cap: 2,
        ..Default::default()
    })
    .await
    .expect("host");
    let caps = host.capsules();
    let info = caps
        .create(CreateOptions {
            template: Some("minimal".into()),
            ..Default::default()
        })
        .await
        .expect("create");
    run(
        &host,
        &info.id,
        "echo committed > /home/user/marker; head -c 2097152 /dev/urandom > /dev/shm/blob",
    )
    .await;
    caps.pause(&info.id).await.expect("first pause");
    std::fs::write(&id_file, info.id.as_str()).expect("id file");
    for i in 0.. {
        caps.resume(&info.id).await.expect("resume");
        run(&host, &info.id, &format!("dd if=/dev/urandom of=/dev/shm/blob bs=4096 count=128 seek={} conv=notrunc 2>/dev/null", i % 4 * 128)).await;
        caps.pause(&info.id).await.expect("pause");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_during_pause_keeps_the_last_good_snapshot() {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("SKIPPED: capsule tests need root");
        return;
    }
    let id_file: PathBuf =
        std::env::temp_dir().join(format!("wrenn-pauser-{}", std::process::id()));
    let _ = std::fs::remove_file(&id_file);
    let data = wrenn::DataDir::from_env();
    for round in 0..3 {
        let mut child = Command::new(std::env::current_exe().unwrap())
            .args(["--exact", "pauser_child", "--ignored", "--nocapture"])
            .env(CHILD_ENV, &id_file)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn child");
        let deadline = Instant::now() + Duration::from_secs(120);
        let id = loop {
            if let Ok(id) = std::fs::read_to_string(&id_file) {
                break id;
            }
            assert!(Instant::now() < deadline, "child never paused its capsule");
            assert!(child.try_wait().unwrap().is_none(), "child exited early");
            std::thread::sleep(Duration::from_millis(20));
        };
        let _ = std::fs::remove_file(&id_file);
        // Kill while a later pause is being written (its staging directory exists).
        let next = data.snapshots().join(&id).join("next");
        let deadline = Instant::now() + Duration::from_secs(120);
        let mut seen = 0;
        loop {
            if next.exists() {
                seen += 1;
                // Vary the moment: the first, second or third pause in progress we see.
                if seen > round {
                    std::thread::sleep(Duration::from_millis(5 * round as u64));
                    break;
                }
                while next.exists() && Instant::now() < deadline {
                    std::thread::sleep(Duration::from_millis(1));
                }
            }
            assert!(Instant::now() < deadline, "no pause in progress seen");
            std::thread::sleep(Duration::from_millis(1));
        }
        child.kill().expect("kill child");
        let _ = child.wait();

        // A new process adopts the capsule as of its last committed pause and resumes it.
        let Some(host) = host().await else { return };
        let caps = host.capsules();
        let cid = wrenn::CapsuleId::parse(&id).unwrap();
        let info = caps.adopt(&cid).await.expect("the capsule was adopted");
        assert_eq!(info.status, CapsuleStatus::Paused);
        caps.resume(&cid)
            .await
            .expect("the last good snapshot resumes");
        let (out, _, _) = run(
            &host,
            &cid,
            "cat /home/user/marker; test -s /dev/shm/blob && echo blob",
        )
        .await;
        assert_eq!(out, "committed\nblob\n");
        caps.destroy(&cid).await.expect("destroy");
        assert!(!data.snapshots().join(&id).exists());
    }
}
