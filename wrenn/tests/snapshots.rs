//! Pause/resume, snapshot templates and fork, with real guests.

#![allow(clippy::tests_outside_test_module)] // integration tests are their own crate

mod common;

use common::*;
use std::collections::HashMap;
use std::time::Duration;
use wrenn::guest::ExecRequest;
use wrenn::snapshot::{PauseMode, ResumeMode};
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
            "i=0; while true; do i=$((i+1)); echo $i > /tmp/counter.new; mv /tmp/counter.new /tmp/counter; sleep 0.1; done".into(),
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clones_of_a_snapshot_template_are_independent() {
    let Some(host) = host().await else { return };
    let caps = host.capsules();
    let name = format!("test-tpl-{}", std::process::id());
    let src = caps.create(opts()).await.expect("create source");
    run(&host, &src.id, "echo from-template > /home/user/base.txt").await;
    caps.snapshot(&src.id, &name, false)
        .await
        .expect("snapshot");
    // The source keeps running.
    assert_eq!(
        run(&host, &src.id, "cat /home/user/base.txt").await.0,
        "from-template\n"
    );
    // Same name again: refused unless overwrite is asked.
    let again = caps.snapshot(&src.id, &name, false).await;
    assert!(
        matches!(
            again,
            Err(CapsuleError::Snapshot(
                wrenn::snapshot::SnapshotError::NameTaken { .. }
            ))
        ),
        "{again:?}"
    );
    caps.snapshot(&src.id, &name, true)
        .await
        .expect("overwrite");
    caps.destroy(&src.id).await.expect("destroy source");

    // The template no longer depends on the capsule it came from.
    let mut clones = Vec::new();
    for _ in 0..3 {
        let o = CreateOptions {
            template: Some(name.clone()),
            ..Default::default()
        };
        clones.push(caps.create(o).await.expect("clone"));
    }
    for (i, c) in clones.iter().enumerate() {
        let (out, _, _) = run(
            &host,
            &c.id,
            &format!("cat /home/user/base.txt; echo clone-{i} > /home/user/mine.txt"),
        )
        .await;
        assert_eq!(out, "from-template\n");
    }
    for (i, c) in clones.iter().enumerate() {
        let (out, _, _) = run(&host, &c.id, "cat /home/user/mine.txt").await;
        assert_eq!(out, format!("clone-{i}\n"), "cross-talk between clones");
    }
    for c in &clones {
        caps.destroy(&c.id).await.expect("destroy clone");
    }
    let _ = std::fs::remove_dir_all(host.data_dir().template_dir(&name));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fork_gives_independent_capsules_that_continue_from_the_same_state() {
    let Some(host) = host().await else { return };
    let caps = host.capsules();
    let src = caps.create(opts()).await.expect("create");
    let bg = ExecRequest {
        cmd: "/bin/sh".into(),
        args: vec![
            "-c".into(),
            "i=0; while true; do i=$((i+1)); echo $i > /tmp/counter.new; mv /tmp/counter.new /tmp/counter; sleep 0.1; done".into(),
        ],
        ..Default::default()
    };
    drop(caps.exec(&src.id, &bg).await.expect("counter"));
    run(&host, &src.id, "echo shared > /home/user/shared.txt").await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let at_fork = counter(&host, &src.id).await;
    let children = caps.fork(&src.id, 2).await.expect("fork");
    assert_eq!(children.len(), 2);
    let mut tokens = vec![caps.access_token(&src.id).expect("token")];
    for (i, c) in children.iter().enumerate() {
        assert_ne!(c.id, src.id);
        tokens.push(caps.access_token(&c.id).expect("token"));
        let (out, _, _) = run(
            &host,
            &c.id,
            &format!("cat /home/user/shared.txt; echo child-{i} > /home/user/own.txt"),
        )
        .await;
        assert_eq!(out, "shared\n");
        // The counter process came along and keeps counting.
        let n = counter(&host, &c.id).await;
        assert!(n >= at_fork, "child counter {n} < {at_fork}");
        tokio::time::sleep(Duration::from_millis(600)).await;
        assert!(counter(&host, &c.id).await > n, "child counter stopped");
    }
    tokens.sort();
    tokens.dedup();
    assert_eq!(tokens.len(), 3, "fork reused an access token");
    // No cross-talk: each has its own disk.
    assert_eq!(
        run(
            &host,
            &src.id,
            "cat /home/user/own.txt 2>/dev/null || echo none"
        )
        .await
        .0,
        "none\n"
    );
    for (i, c) in children.iter().enumerate() {
        assert_eq!(
            run(&host, &c.id, "cat /home/user/own.txt").await.0,
            format!("child-{i}\n")
        );
    }
    // The source kept running.
    assert!(counter(&host, &src.id).await >= at_fork);
    for c in children.iter().chain(std::iter::once(&src)) {
        caps.destroy(&c.id).await.expect("destroy");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_pause_resume_cycles_across_the_generation_cap_keep_memory_identical() {
    let Some(host) = host().await else { return };
    let caps = host.capsules();
    let info = caps.create(opts()).await.expect("create");
    let id = info.id.clone();
    // 8 MiB of data in guest RAM (tmpfs), changed a little before every pause.
    run(&host, &id, "head -c 8388608 /dev/urandom > /dev/shm/data").await;
    let mut merged = false;
    for cycle in 0..10 {
        let (sum_before, _, code) = run(
            &host,
            &id,
            &format!("dd if=/dev/urandom of=/dev/shm/data bs=4096 count=64 seek={} conv=notrunc 2>/dev/null; sha256sum /dev/shm/data", cycle * 100),
        )
        .await;
        assert_eq!(code, 0);
        let report = caps
            .pause(&id)
            .await
            .unwrap_or_else(|e| panic!("pause {cycle}: {e}"));
        merged |= report.merged;
        assert!(
            report.generations <= 8,
            "generation cap exceeded: {}",
            report.generations
        );
        caps.resume(&id)
            .await
            .unwrap_or_else(|e| panic!("resume {cycle}: {e}"));
        let (sum_after, _, _) = run(&host, &id, "sha256sum /dev/shm/data").await;
        assert_eq!(
            sum_after, sum_before,
            "guest memory changed across pause/resume cycle {cycle}"
        );
    }
    assert!(merged, "10 cycles never merged generations");
    caps.destroy(&id).await.expect("destroy");
}

/// The version `current` points at in the capsule's snapshot directory.
fn current_version(host: &wrenn::Host, id: &wrenn::CapsuleId) -> std::path::PathBuf {
    let root = host.data_dir().snapshots().join(id.as_str());
    root.join(std::fs::read_link(root.join("current")).expect("current version"))
}

fn memory_files(dir: &std::path::Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .expect("version dir")
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("memory.") || n == "device.state")
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disk_only_pause_boots_afresh_and_a_later_full_pause_starts_a_new_memory_chain() {
    let Some(host) = host().await else { return };
    let caps = host.capsules();
    let info = caps.create(opts()).await.expect("create");
    let id = info.id.clone();
    const BOOT_ID: &str = "cat /proc/sys/kernel/random/boot_id";
    let (boot1, _, _) = run(&host, &id, BOOT_ID).await;
    // Written just before the pause: the guest's sync must put it on the disk.
    run(
        &host,
        &id,
        "echo on-disk > /home/user/kept; echo in-ram > /dev/shm/gone",
    )
    .await;

    let report = caps
        .pause_with(&id, PauseMode::DiskOnly)
        .await
        .expect("disk-only pause");
    assert_eq!(report.memory_bytes_written, 0);
    let v = current_version(&host, &id);
    assert!(
        memory_files(&v).is_empty(),
        "disk-only version holds {:?}",
        memory_files(&v)
    );
    let meta: serde_json::Value =
        serde_json::from_slice(&std::fs::read(v.join("meta.json")).expect("meta")).expect("json");
    assert_eq!(meta["disk_only"], true);

    caps.resume(&id).await.expect("resume boots from the disk");
    let (boot2, _, _) = run(&host, &id, BOOT_ID).await;
    assert_ne!(boot1, boot2, "a disk-only resume is a fresh boot");
    assert_eq!(run(&host, &id, "cat /home/user/kept").await.0, "on-disk\n");
    assert_ne!(
        run(&host, &id, "cat /dev/shm/gone").await.2,
        0,
        "tmpfs is gone"
    );

    // A full pause now: memory over a new chain (the fresh boot's), restored exactly.
    let (sum, _, _) = run(
        &host,
        &id,
        "head -c 4194304 /dev/urandom > /dev/shm/data; sha256sum /dev/shm/data",
    )
    .await;
    caps.pause(&id).await.expect("full pause after the reboot");
    assert!(!memory_files(&current_version(&host, &id)).is_empty());
    caps.resume(&id).await.expect("restore");
    assert_eq!(
        run(&host, &id, BOOT_ID).await.0,
        boot2,
        "restored, not rebooted"
    );
    assert_eq!(run(&host, &id, "sha256sum /dev/shm/data").await.0, sum);

    // Reboot on resume drops a full snapshot's memory and keeps the disk.
    caps.pause(&id).await.expect("full pause");
    caps.resume_with(&id, ResumeMode::Reboot)
        .await
        .expect("reboot resume");
    assert_ne!(run(&host, &id, BOOT_ID).await.0, boot2);
    assert_eq!(run(&host, &id, "cat /home/user/kept").await.0, "on-disk\n");
    caps.destroy(&id).await.expect("destroy");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corrupt_snapshot_is_a_typed_error_and_is_left_as_it_was() {
    let Some(host) = host().await else { return };
    let caps = host.capsules();
    let info = caps.create(opts()).await.expect("create");
    caps.pause(&info.id).await.expect("pause");
    let current = std::fs::canonicalize(
        host.data_dir()
            .snapshots()
            .join(info.id.as_str())
            .join("current"),
    )
    .unwrap();
    let gen = std::fs::read_dir(&current)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .unwrap()
                .to_string_lossy()
                .starts_with("memory.gen-")
        })
        .expect("a generation file");
    let mut bytes = std::fs::read(&gen).unwrap();
    bytes[4096 + 7] ^= 0xff;
    std::fs::write(&gen, &bytes).unwrap();
    let before: Vec<_> = std::fs::read_dir(&current)
        .unwrap()
        .flatten()
        .map(|e| e.file_name())
        .collect();
    let err = caps.resume(&info.id).await;
    assert!(
        matches!(
            err,
            Err(CapsuleError::Snapshot(
                wrenn::snapshot::SnapshotError::Corrupt { .. }
            ))
        ),
        "{err:?}"
    );
    assert_eq!(caps.get(&info.id).unwrap().status, CapsuleStatus::Paused);
    let after: Vec<_> = std::fs::read_dir(&current)
        .unwrap()
        .flatten()
        .map(|e| e.file_name())
        .collect();
    assert_eq!(before, after);
    assert_eq!(
        std::fs::read(&gen).unwrap(),
        bytes,
        "the corrupt file was modified"
    );
    caps.destroy(&info.id).await.expect("destroy");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_pauses_are_serialised() {
    let Some(host) = host().await else { return };
    let caps = host.capsules();
    let info = caps.create(opts()).await.expect("create");
    let (a, b) = tokio::join!(caps.pause(&info.id), caps.pause(&info.id));
    // One pause wins; the other finds the capsule already paused.
    let oks = [a.is_ok(), b.is_ok()].iter().filter(|x| **x).count();
    assert_eq!(oks, 1, "{a:?} {b:?}");
    assert!(matches!(
        a.err().or(b.err()),
        Some(CapsuleError::InvalidState { .. })
    ));
    caps.resume(&info.id).await.expect("resume");
    assert_eq!(run(&host, &info.id, "echo ok").await.0, "ok\n");
    caps.destroy(&info.id).await.expect("destroy");
}

/// Dirty or under-writeback page-cache pages of `path` (Linux `cachestat`, 6.5+);
/// `None` when the kernel lacks the call.
#[cfg(target_arch = "x86_64")]
fn unsynced_pages(path: &std::path::Path) -> Option<u64> {
    use std::os::fd::AsRawFd;
    #[repr(C)]
    struct Range {
        off: u64,
        len: u64,
    }
    #[repr(C)]
    #[derive(Default)]
    struct Stat {
        nr_cache: u64,
        nr_dirty: u64,
        nr_writeback: u64,
        nr_evicted: u64,
        nr_recently_evicted: u64,
    }
    const SYS_CACHESTAT: libc::c_long = 451;
    let f = std::fs::File::open(path).expect("open for cachestat");
    let range = Range { off: 0, len: 0 };
    let mut st = Stat::default();
    // SAFETY: cachestat reads `range` and writes one `Stat` (the kernel's
    // `struct cachestat`, five u64s) through the pointers, both valid for the call; the
    // fd is open for its duration.
    let rc = unsafe {
        libc::syscall(
            SYS_CACHESTAT,
            f.as_raw_fd(),
            &range as *const Range,
            &mut st as *mut Stat,
            0u32,
        )
    };
    (rc == 0).then_some(st.nr_dirty + st.nr_writeback)
}

/// A committed pause is on the disk, not only in the page cache: every file of the
/// new version (device state written by QEMU, disk layer, memory) was fsynced before
/// the version's rename.
#[cfg(target_arch = "x86_64")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_committed_pause_is_synced_to_disk() {
    let Some(host) = host().await else { return };
    let caps = host.capsules();
    let info = caps.create(opts()).await.expect("create");
    let id = info.id.clone();
    // Dirty the guest's disk and memory.
    run(
        &host,
        &id,
        "head -c 4000000 /dev/urandom > /home/user/blob; sync",
    )
    .await;
    let name = format!("synced-{}", &id.to_string()[3..11]);
    caps.snapshot(&id, &name, false).await.expect("snapshot");
    caps.pause(&id).await.expect("pause");
    let template = host.data_dir().template_dir(&name);
    let version = host
        .data_dir()
        .snapshots()
        .join(id.to_string())
        .join("current");
    let mut checked = Vec::new();
    let files = [
        template.join("rootfs.img"),
        template.join("snapshot/device.state"),
        template.join("snapshot/memory.raw"),
        template.join("snapshot/meta.json"),
    ]
    .into_iter()
    .chain(
        std::fs::read_dir(&version)
            .expect("version dir")
            .flatten()
            .map(|e| e.path()),
    );
    for p in files {
        let Some(n) = unsynced_pages(&p) else {
            eprintln!("SKIPPED: this kernel has no cachestat (Linux >= 6.5); fsync not checked");
            caps.destroy(&id).await.expect("destroy");
            return;
        };
        assert_eq!(n, 0, "{} has {n} pages not on disk", p.display());
        checked.push(p);
    }
    assert!(
        checked.iter().any(|p| p.ends_with("current/device.state"))
            && checked.iter().any(|p| p
                .file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("disk-"))),
        "{checked:?}"
    );
    caps.destroy(&id).await.expect("destroy");
    let _ = std::fs::remove_dir_all(&template);
}
