//! The host disk reserve, with real guests: work that could take the data
//! directory's filesystem below the reserve is refused up front with a typed
//! error, and nothing of it is left behind. One test in this binary, so the free
//! space it computes its reserve from is not moved by other tests of its own.

// Integration tests are their own crate; the lint targets unit tests.
#![allow(clippy::tests_outside_test_module)]

mod common;

use common::*;
use wrenn::{CapsuleError, CreateOptions, DiskOvercommit, Host, HostOptions};

fn free_mb(dir: &std::path::Path) -> u64 {
    let st = nix::sys::statvfs::statvfs(dir).expect("statvfs");
    (st.blocks_available() * st.fragment_size()) >> 20
}

async fn host_with_reserve(dir: &std::path::Path, reserve_mb: u64) -> Host {
    host_with(dir, reserve_mb, DiskOvercommit::NONE).await
}

async fn host_with(dir: &std::path::Path, reserve_mb: u64, overcommit: DiskOvercommit) -> Host {
    Host::local(HostOptions {
        data_dir: wrenn::DataDir::new(dir),
        disk_reserve_mb: reserve_mb,
        disk_overcommit: overcommit,
        sweep: false,
        ..Default::default()
    })
    .await
    .expect("host")
}

fn entries(dir: &std::path::Path) -> usize {
    std::fs::read_dir(dir).map(|d| d.count()).unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn work_that_would_eat_the_reserve_is_refused() {
    let Some((_host, dir)) = isolated_host().await else {
        return;
    };
    let opts = || CreateOptions {
        template: Some("minimal".into()),
        cold_boot: true,
        memory_mb: Some(256),
        disk_mb: Some(2048),
        ..Default::default()
    };

    // A reserve larger than the disk: nothing may start, and nothing is left.
    let full = host_with_reserve(dir.path(), u64::MAX >> 21).await;
    let capsules_dir = full.data_dir().capsules();
    let before = entries(&capsules_dir);
    match full.capsules().create(opts()).await {
        Err(e @ CapsuleError::InsufficientStorage { .. }) => {
            assert_eq!(e.kind(), "insufficient_storage");
            assert!(e.to_string().contains("disk space"), "{e}");
        }
        other => panic!("expected InsufficientStorage, got {other:?}"),
    }
    assert_eq!(
        entries(&capsules_dir),
        before,
        "a refused create left files"
    );
    assert!(full.capsules().list().is_empty());
    drop(full);

    // A reserve that leaves room for the capsule's disk but not for its memory
    // too: it starts, but a full pause is refused and it keeps running.
    let free = free_mb(dir.path());
    let reserve = free.saturating_sub(2048 + 128);
    let tight = host_with_reserve(dir.path(), reserve).await;
    let caps = tight.capsules();
    let info = caps
        .create(opts())
        .await
        .expect("create within the reserve");
    let fp = footprint(&tight, &info);
    match caps.pause(&info.id).await {
        Err(CapsuleError::InsufficientStorage { op, .. }) => assert!(op.contains("pause")),
        other => panic!("expected InsufficientStorage, got {other:?}"),
    }
    assert_eq!(run(&tight, &info.id, "echo alive").await.0, "alive\n");
    // A disk-only pause needs almost nothing and still works.
    caps.pause_with(&info.id, wrenn::snapshot::PauseMode::DiskOnly)
        .await
        .expect("disk-only pause");
    caps.destroy(&info.id).await.expect("destroy");
    assert_gone(&fp).await;
    drop(tight);

    // The same room with disks thin-provisioned 4:1: the running capsule's disk
    // counts a quarter, so the full pause that was refused above now fits.
    let free = free_mb(dir.path());
    let reserve = free.saturating_sub(2048 + 128);
    let ratio = DiskOvercommit::new(4.0).expect("ratio");
    let thin = host_with(dir.path(), reserve, ratio).await;
    let caps = thin.capsules();
    let info = caps.create(opts()).await.expect("create");
    let fp = footprint(&thin, &info);
    caps.pause(&info.id)
        .await
        .expect("a full pause with thin-provisioned disks");
    caps.destroy(&info.id).await.expect("destroy");
    assert_gone(&fp).await;
}
