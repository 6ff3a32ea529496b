//! Warm pools with real guests: a capsule from the pool behaves like a fresh one, pool
//! entries are nobody's, and stale or drained pools leave nothing behind.

#![allow(clippy::tests_outside_test_module)] // integration tests are their own crate

mod common;

use common::*;
use std::collections::HashMap;
use std::time::Duration;
use wrenn::{CapsuleStatus, CreateOptions, PoolStats};

fn stats(host: &wrenn::Host, template: &str) -> PoolStats {
    host.capsules()
        .pool_stats()
        .into_iter()
        .find(|p| p.template == template)
        .unwrap_or_default()
}

async fn wait_ready(host: &wrenn::Host, template: &str, n: usize) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    while stats(host, template).ready < n {
        assert!(
            tokio::time::Instant::now() < deadline,
            "pool of {template} not filled: {:?}",
            stats(host, template)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn capsule_dirs(dir: &std::path::Path) -> usize {
    std::fs::read_dir(dir.join("capsules"))
        .map(|d| d.count())
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pooled_capsule_is_a_fresh_capsule() {
    let Some((host, dir)) = isolated_host().await else {
        return;
    };
    let caps = host.capsules();
    caps.set_pool("minimal", 2).await.expect("set pool");
    wait_ready(&host, "minimal", 2).await;
    // Pool entries are nobody's capsules.
    assert!(caps.list().is_empty(), "{:?}", caps.list());

    let first = caps
        .create(CreateOptions {
            template: Some("minimal".into()),
            envs: HashMap::from([("POOLED".to_string(), "first".to_string())]),
            ..Default::default()
        })
        .await
        .expect("create from the pool");
    assert_eq!(stats(&host, "minimal").hits, 1);
    assert_eq!(first.status, CapsuleStatus::Running);
    assert_eq!(caps.list().len(), 1);
    let (out, _, code) = run(
        &host,
        &first.id,
        "echo $POOLED; whoami; date +%s; echo secret > /tmp/left-behind; \
         echo secret > /home/user/left-behind; echo $WRENN_CAPSULE_ID $WRENN_TEMPLATE_ID",
    )
    .await;
    assert_eq!(code, 0);
    let mut lines = out.lines();
    assert_eq!(lines.next(), Some("first"), "env given at create: {out}");
    // The guest knows the id it was claimed as, not the pool entry's old one.
    assert_eq!(
        out.lines().last(),
        Some(format!("{} minimal", first.id).as_str()),
        "{out}"
    );
    assert_eq!(lines.next(), Some("user"), "the default user: {out}");
    let guest_now: i64 = lines.next().and_then(|l| l.parse().ok()).expect("date");
    let host_now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs() as i64;
    assert!(
        (guest_now - host_now).abs() <= 5,
        "guest clock {guest_now} vs {host_now}"
    );
    let cwd = wrenn::ExecRequest {
        cwd: Some("/tmp".into()),
        ..sh("pwd")
    };
    let out = caps.run(&first.id, &cwd, None).await.expect("run in cwd");
    assert_eq!(String::from_utf8_lossy(&out.stdout), "/tmp\n");

    // The next one sees nothing of the first, and has its own token.
    let second = caps
        .create(CreateOptions {
            template: Some("minimal".into()),
            ..Default::default()
        })
        .await
        .expect("second from the pool");
    assert_eq!(stats(&host, "minimal").hits, 2);
    assert_ne!(
        caps.access_token(&first.id).expect("token"),
        caps.access_token(&second.id).expect("token")
    );
    let (out, _, _) = run(
        &host,
        &second.id,
        "cat /tmp/left-behind /home/user/left-behind 2>&1; echo ${POOLED:-unset}",
    )
    .await;
    assert!(!out.contains("secret"), "{out}");
    assert!(out.ends_with("unset\n"), "{out}");

    // An empty pool falls back to a normal restore.
    caps.set_pool("minimal", 0).await.expect("pool off");
    let third = caps
        .create(CreateOptions {
            template: Some("minimal".into()),
            ..Default::default()
        })
        .await
        .expect("create without a pool");
    let (out, _, _) = run(&host, &third.id, "echo ok").await;
    assert_eq!(out, "ok\n");
    for id in [&first.id, &second.id, &third.id] {
        caps.destroy(id).await.expect("destroy");
    }
    // Draining leaves nothing: no pool entry, no capsule dir.
    assert_eq!(stats(&host, "minimal").ready, 0);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while capsule_dirs(dir.path()) > 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{} capsule dirs left",
            capsule_dirs(dir.path())
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rebuilt_template_drains_its_pool_and_misses_are_counted() {
    let Some((host, dir)) = isolated_host().await else {
        return;
    };
    let caps = host.capsules();
    let src = caps
        .create(CreateOptions {
            template: Some("minimal".into()),
            ..Default::default()
        })
        .await
        .expect("source");
    run(&host, &src.id, "echo one > /home/user/version").await;
    caps.snapshot(&src.id, "pooltpl", false)
        .await
        .expect("snapshot");
    caps.set_pool("pooltpl", 1).await.expect("pool");
    wait_ready(&host, "pooltpl", 1).await;

    // The template is rebuilt: the ready entry is of the old one and is not handed out.
    run(&host, &src.id, "echo two > /home/user/version").await;
    caps.snapshot(&src.id, "pooltpl", true)
        .await
        .expect("overwrite");
    let c = caps
        .create(CreateOptions {
            template: Some("pooltpl".into()),
            ..Default::default()
        })
        .await
        .expect("create");
    let (out, _, _) = run(&host, &c.id, "cat /home/user/version").await;
    assert_eq!(out, "two\n", "made from the rebuilt template");
    let s = stats(&host, "pooltpl");
    assert_eq!((s.hits, s.misses), (0, 1), "{s:?}");
    // The pool refills from the new snapshot, and that entry is used.
    wait_ready(&host, "pooltpl", 1).await;
    let d = caps
        .create(CreateOptions {
            template: Some("pooltpl".into()),
            ..Default::default()
        })
        .await
        .expect("create from the refilled pool");
    assert_eq!(stats(&host, "pooltpl").hits, 1);
    let (out, _, _) = run(&host, &d.id, "cat /home/user/version").await;
    assert_eq!(out, "two\n");

    // Templates without a pre-booted snapshot cannot be pooled.
    let err = caps
        .set_pool("no-such-template", 1)
        .await
        .expect_err("unknown");
    assert_eq!(err.kind(), "template_not_found", "{err}");

    // Shutdown drains the pools.
    wait_ready(&host, "pooltpl", 1).await;
    for id in [&src.id, &c.id, &d.id] {
        caps.destroy(id).await.expect("destroy");
    }
    assert_eq!(caps.drain_pools().await, 1);
    assert_eq!(capsule_dirs(dir.path()), 0);
}
