//! Resource containment of capsules, with real guests: every VMM runs in a cgroup
//! of its own with the limits its size implies, the group goes with the VMM, and
//! a capsule running a fork bomb and a memory hog leaves another one responsive.

// Integration tests are their own crate; the lint targets unit tests.
#![allow(clippy::tests_outside_test_module)]

mod common;

use common::*;
use std::path::PathBuf;
use std::time::{Duration, Instant};
use wrenn::CreateOptions;
use wrenn_vmm::cgroup::{Layout, CPU_PERIOD_US};
use wrenn_vmm::qemu::process::{VMM_OVERHEAD_MB, VMM_PIDS_MAX};

fn minimal(vcpus: u32, memory_mb: u32) -> CreateOptions {
    CreateOptions {
        template: Some("minimal".into()),
        vcpus: Some(vcpus),
        memory_mb: Some(memory_mb),
        ..Default::default()
    }
}

/// The groups (one per hierarchy) process `pid` is in, as directories.
fn groups_of(layout: &Layout, pid: u32) -> Vec<PathBuf> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).expect("cgroup file");
    let mut dirs = Vec::new();
    for line in text.lines() {
        let mut it = line.splitn(3, ':');
        let (_, ctrls, path) = (it.next().unwrap(), it.next().unwrap(), it.next().unwrap());
        let rel = path.trim_start_matches('/');
        match layout {
            Layout::V2(root) if ctrls.is_empty() => dirs.push(root.join(rel)),
            Layout::V1 {
                memory, cpu, pids, ..
            } => {
                let c: Vec<&str> = ctrls.split(',').collect();
                if c.contains(&"memory") {
                    dirs.push(memory.join(rel));
                } else if c.contains(&"cpu") {
                    dirs.push(cpu.join(rel));
                } else if c.contains(&"pids") {
                    dirs.push(pids.join(rel));
                }
            }
            _ => {}
        }
    }
    dirs
}

fn read(dir: &std::path::Path, file: &str) -> String {
    std::fs::read_to_string(dir.join(file))
        .unwrap_or_else(|e| panic!("{}/{file}: {e}", dir.display()))
        .trim()
        .to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_vmm_has_its_own_cgroup_with_limits() {
    let Some(host) = host().await else { return };
    let layout = Layout::detect().expect("cgroup layout");
    eprintln!("{}", layout.describe());
    let caps = host.capsules();
    let info = caps
        .create(CreateOptions {
            cold_boot: true,
            ..minimal(2, 384)
        })
        .await
        .expect("create");
    assert_eq!((info.vcpus, info.memory_mb), (2, 384));
    let fp = footprint(&host, &info);
    let groups = groups_of(&layout, fp.vmm_pid);
    assert!(!groups.is_empty());
    for g in &groups {
        assert!(
            g.components().any(|c| c.as_os_str() == "wrenn"),
            "VMM not in a wrenn group: {}",
            g.display()
        );
        assert!(
            g.to_string_lossy().contains(info.id.as_str()),
            "group {} is not the capsule's own",
            g.display()
        );
    }
    // Guest RAM (a pre-booted template keeps its own size) + overhead + 32 MiB of
    // TCG translation cache (none under KVM).
    let tb = if info.accel == wrenn::vmm::Accel::Tcg {
        32
    } else {
        0
    };
    let memory = (u64::from(info.memory_mb) + VMM_OVERHEAD_MB + tb) << 20;
    let quota = u64::from(info.vcpus) * CPU_PERIOD_US;
    match &layout {
        Layout::V2(_) => {
            let g = &groups[0];
            assert_eq!(read(g, "memory.max"), memory.to_string());
            assert_eq!(read(g, "cpu.max"), format!("{quota} {CPU_PERIOD_US}"));
            assert_eq!(read(g, "pids.max"), VMM_PIDS_MAX.to_string());
        }
        Layout::V1 { .. } => {
            let by = |c: &str| {
                groups
                    .iter()
                    .find(|g| g.join(c).exists())
                    .unwrap_or_else(|| panic!("no group with {c}"))
                    .clone()
            };
            assert_eq!(
                read(&by("memory.limit_in_bytes"), "memory.limit_in_bytes"),
                memory.to_string()
            );
            assert_eq!(
                read(&by("cpu.cfs_quota_us"), "cpu.cfs_quota_us"),
                quota.to_string()
            );
            assert_eq!(read(&by("pids.max"), "pids.max"), VMM_PIDS_MAX.to_string());
        }
    }
    // The group's counters feed the capsule's metrics.
    let usage = layout.usage_of(fp.vmm_pid).expect("usage from the cgroup");
    assert!(
        usage.memory_bytes > 0 && usage.memory_bytes <= memory,
        "{usage:?}"
    );

    caps.destroy(&info.id).await.expect("destroy");
    let deadline = Instant::now() + Duration::from_secs(5);
    while groups.iter().any(|g| g.exists()) && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    for g in &groups {
        assert!(!g.exists(), "{} outlived its VMM", g.display());
    }
    assert_gone(&fp).await;
}

/// Median round trip of `true` in capsule `id`.
async fn exec_rtt(host: &wrenn::Host, id: &wrenn::CapsuleId, n: usize) -> Duration {
    let mut v = Vec::new();
    for _ in 0..n {
        let t = Instant::now();
        let (_, _, code) = run(host, id, "true").await;
        assert_eq!(code, 0);
        v.push(t.elapsed());
    }
    v.sort();
    v[v.len() / 2]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fork_bomb_and_a_memory_hog_hurt_only_their_own_capsule() {
    let Some(host) = host().await else { return };
    let caps = host.capsules();
    let hog = caps.create(minimal(1, 256)).await.expect("create hog");
    let calm = caps.create(minimal(1, 256)).await.expect("create calm");
    let hog_fp = footprint(&host, &hog);
    exec_rtt(&host, &calm.id, 3).await; // warm up
    let before = exec_rtt(&host, &calm.id, 7).await;

    // A fork bomb and a process eating all the memory it can, as the capsule's user.
    let bomb = "nohup sh -c 'b(){ b|b& }; b' >/dev/null 2>&1 & \
                nohup sh -c 'tail /dev/zero' >/dev/null 2>&1 & echo started";
    let (out, _, _) = run(&host, &hog.id, bomb).await;
    assert_eq!(out.trim(), "started");
    tokio::time::sleep(Duration::from_secs(3)).await;
    let during = exec_rtt(&host, &calm.id, 7).await;
    eprintln!("calm capsule exec round trip: before {before:?}, during {during:?}");
    assert!(
        during <= before * 3 + Duration::from_millis(50),
        "the other capsule slowed from {before:?} to {during:?}"
    );
    // The hog's VMM stays within its limit (or was stopped by it), never beyond.
    let layout = Layout::detect().expect("layout");
    if let Some(u) = layout.usage_of(hog_fp.vmm_pid) {
        let limit = (256 + VMM_OVERHEAD_MB + 32) << 20;
        assert!(u.memory_bytes <= limit, "{u:?} over {limit}");
    }
    // The host is fine too: it still starts and tears down capsules.
    let probe = caps
        .create(minimal(1, 256))
        .await
        .expect("create during the hog");
    caps.destroy(&probe.id).await.expect("destroy probe");

    caps.destroy(&hog.id).await.expect("destroy hog");
    caps.destroy(&calm.id).await.expect("destroy calm");
    assert_gone(&hog_fp).await;
}

/// `Key:\tvalue` of `/proc/<pid>/status`.
fn status_field(pid: u32, key: &str) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .expect("status")
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{key}:")))
        .unwrap_or_else(|| panic!("no {key} in /proc/{pid}/status"))
        .trim()
        .to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vmms_run_without_capabilities_under_seccomp() {
    let Some(host) = host().await else { return };
    let caps = host.capsules();
    // A restore (the template's snapshot) and a boot: both paths start QEMU.
    for cold_boot in [false, true] {
        let info = caps
            .create(CreateOptions {
                cold_boot,
                ..minimal(1, 256)
            })
            .await
            .expect("create");
        let pid = footprint(&host, &info).vmm_pid;
        assert_eq!(
            status_field(pid, "Seccomp"),
            "2",
            "QEMU has no seccomp filter"
        );
        assert_eq!(status_field(pid, "NoNewPrivs"), "1");
        for set in ["CapEff", "CapPrm", "CapBnd", "CapAmb", "CapInh"] {
            assert_eq!(
                u64::from_str_radix(&status_field(pid, set), 16).unwrap(),
                0,
                "{set} of QEMU is not empty"
            );
        }
        // It still works: networking (tap handed over as a descriptor), disk, exec.
        let (out, _, code) = run(
            &host,
            &info.id,
            "ip -4 -o addr show dev eth0 && echo ok > /tmp/f && cat /tmp/f",
        )
        .await;
        assert_eq!(code, 0, "{out}");
        assert!(
            out.contains("169.254.0.21") && out.ends_with("ok\n"),
            "{out}"
        );
        // Pause (device state out through a socket) and resume (in through one).
        caps.pause(&info.id).await.expect("pause");
        caps.resume(&info.id).await.expect("resume");
        let pid = footprint(&host, &info).vmm_pid;
        assert_eq!(status_field(pid, "Seccomp"), "2");
        assert_eq!(run(&host, &info.id, "cat /tmp/f").await.0, "ok\n");
        caps.destroy(&info.id).await.expect("destroy");
    }
}
