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
    let groups = layout.groups_of(fp.vmm_pid).expect("the VMM's groups");
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

/// Paths (relative to `/`) of every file and directory a process sees.
fn visible_tree(pid: u32) -> Vec<String> {
    fn walk(root: &std::path::Path, dir: &std::path::Path, out: &mut Vec<String>) {
        let Ok(rd) = std::fs::read_dir(dir) else {
            return;
        };
        for e in rd.flatten() {
            let p = e.path();
            let rel = p.strip_prefix(root).unwrap_or(&p).display().to_string();
            // Its own /proc and the system under /usr are not the data.
            if rel == "proc" || rel == "usr" {
                out.push(rel);
                continue;
            }
            out.push(rel);
            if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                walk(root, &p, out);
            }
        }
    }
    let root = PathBuf::from(format!("/proc/{pid}/root"));
    let mut out = Vec::new();
    walk(&root, &root, &mut out);
    out.sort();
    out
}

fn ids(pid: u32, key: &str) -> Vec<u32> {
    status_field(pid, key)
        .split_whitespace()
        .map(|v| v.parse().expect("id"))
        .collect()
}

/// The jail of a running capsule's VMM: its own uid (not another VMM's), the
/// jail group, no capabilities, QEMU's seccomp filter, and a mount namespace
/// showing its own files only.
fn check_jail(host: &wrenn::Host, info: &wrenn::CapsuleInfo, other: &wrenn::CapsuleInfo) -> u32 {
    let pid = footprint(host, info).vmm_pid;
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
    let uids = ids(pid, "Uid");
    let uid = uids[0];
    assert!(
        uid >= wrenn_vmm::jail::DEFAULT_FIRST_UID,
        "QEMU runs as uid {uid}"
    );
    assert!(
        uids.iter().all(|u| *u == uid),
        "real/effective/saved/fs uids differ: {uids:?}"
    );
    assert!(ids(pid, "Gid")
        .iter()
        .all(|g| *g == wrenn_vmm::jail::DEFAULT_GID));
    assert_eq!(status_field(pid, "Groups"), "", "supplementary groups");
    assert_ne!(
        std::fs::read_link(format!("/proc/{pid}/ns/mnt")).expect("mnt ns"),
        std::fs::read_link("/proc/self/ns/mnt").expect("own mnt ns"),
        "QEMU shares the host's mount namespace"
    );
    let seen = visible_tree(pid);
    let data = host.data_dir().root().canonicalize().expect("data dir");
    let data_rel = data
        .strip_prefix("/")
        .expect("absolute")
        .display()
        .to_string();
    let own = footprint(host, info).dir;
    let own_rel = own.canonicalize().expect("own dir");
    let own_rel = own_rel
        .strip_prefix("/")
        .expect("absolute")
        .display()
        .to_string();
    let other_dir = footprint(host, other)
        .dir
        .canonicalize()
        .expect("other dir");
    let other_rel = other_dir
        .strip_prefix("/")
        .expect("absolute")
        .display()
        .to_string();
    assert!(
        !seen.iter().any(|p| p.starts_with(&other_rel)),
        "the jail shows another capsule's directory: {seen:?}"
    );
    for p in &seen {
        // In the data directory: only this capsule's own files (its disk, memory
        // file, console pipe), never its state, sockets or logs.
        if let Some(rest) = p.strip_prefix(&format!("{own_rel}/")) {
            assert!(
                ["disk.qcow2", "memory.zero", "console.pipe", "rootfs.base"].contains(&rest),
                "the jail shows {p}"
            );
        }
        assert!(
            !p.ends_with("state.json") && !p.ends_with(".sock") && !p.ends_with("qemu.log"),
            "the jail shows {p}"
        );
    }
    assert!(
        !seen
            .iter()
            .any(|p| p.starts_with(&format!("{data_rel}/snapshots/"))
                && !p.contains(&info.id.to_string())),
        "the jail shows other capsules' snapshots: {seen:?}"
    );
    // A jail has a /proc only to name its sealed memory image; it shows its own
    // process only (listed with its credentials: root sees every process).
    if std::path::Path::new(&format!("/proc/{pid}/root/proc")).exists() {
        let (lister, listing) = {
            use std::os::unix::process::CommandExt;
            let child = std::process::Command::new("/bin/ls")
                .arg(format!("/proc/{pid}/root/proc"))
                .uid(uid)
                .gid(wrenn_vmm::jail::DEFAULT_GID)
                .stdout(std::process::Stdio::piped())
                .spawn()
                .expect("ls as the VMM's uid");
            (child.id(), child.wait_with_output().expect("ls"))
        };
        assert!(listing.status.success(), "{listing:?}");
        let procs: Vec<String> = String::from_utf8_lossy(&listing.stdout)
            .split_whitespace()
            .filter(|n| n.chars().all(|c| c.is_ascii_digit()))
            .map(str::to_string)
            .collect();
        assert!(!procs.is_empty(), "{listing:?}");
        assert!(
            procs
                .iter()
                .all(|p| *p == pid.to_string() || *p == lister.to_string()),
            "the jail's /proc shows {procs:?} (QEMU is {pid})"
        );
    }
    // Its writable disk is its uid's alone.
    let disk = own.join("disk.qcow2");
    let meta = std::fs::metadata(&disk).expect("disk");
    use std::os::unix::fs::MetadataExt;
    assert_eq!((meta.uid(), meta.mode() & 0o777), (uid, 0o600));
    // The layers under it are shared: root's, readable, written by no one else
    // (a layer an earlier VMM wrote is no longer its uid's).
    let chain = wrenn_storage::qcow2::disk_chain(&disk).expect("disk chain");
    assert!(chain.len() >= 2, "{chain:?}");
    for layer in &chain[1..] {
        let m = std::fs::metadata(layer).expect("layer");
        assert_eq!(m.uid(), 0, "{} belongs to uid {}", layer.display(), m.uid());
        assert_eq!(
            m.mode() & 0o022,
            0,
            "{} is writable by others",
            layer.display()
        );
    }
    uid
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vmms_run_jailed() {
    // As `wrenn` runs: files it creates are its own (the jail must not depend on
    // a permissive umask).
    // SAFETY: umask only changes this process's file-creation mask.
    unsafe { libc::umask(0o077) };
    let Some(host) = host().await else { return };
    let caps = host.capsules();
    // A restore (the template's snapshot, memory from a sealed image) and a boot:
    // both paths start QEMU.
    let restored = caps.create(minimal(1, 256)).await.expect("create");
    let booted = caps
        .create(CreateOptions {
            cold_boot: true,
            ..minimal(1, 256)
        })
        .await
        .expect("cold boot");
    let a = check_jail(&host, &restored, &booted);
    let b = check_jail(&host, &booted, &restored);
    assert_ne!(a, b, "two VMMs run as one uid");
    let maps = std::fs::read_to_string(format!(
        "/proc/{}/maps",
        footprint(&host, &restored).vmm_pid
    ))
    .expect("maps");
    assert!(
        maps.contains("/memfd:wrenn-memory"),
        "the restored VMM does not map the sealed image"
    );
    for info in [&restored, &booted] {
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
        // Pause (device state out through a descriptor) and resume (in through
        // one), into a new jail.
        caps.pause(&info.id).await.expect("pause");
        caps.resume(&info.id).await.expect("resume");
        assert_eq!(run(&host, &info.id, "cat /tmp/f").await.0, "ok\n");
    }
    check_jail(&host, &restored, &booted);
    check_jail(&host, &booted, &restored);
    // A fork child: its memory base is the parent's sealed image plus its pages.
    let child = caps.fork(&restored.id, 1).await.expect("fork").remove(0);
    check_jail(&host, &child, &restored);
    assert_eq!(run(&host, &child.id, "cat /tmp/f").await.0, "ok\n");
    for info in [&restored, &booted, &child] {
        caps.destroy(&info.id).await.expect("destroy");
    }
}

/// Under KVM a jailed VMM opens `/dev/kvm` from its own root: a device node made
/// for it, owned by its uid. Where this host's `/dev/kvm` can set up a vCPU, the
/// VMM reaches QMP and the node and its open descriptor are checked; where it
/// cannot (a paravirtual module that rejects QEMU's MSRs, as on the CI
/// machines), QEMU must still have opened the node and failed later, at vCPU
/// setup, not with "Could not access KVM kernel module".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_jailed_kvm_vmm_gets_its_own_dev_kvm() {
    if !std::path::Path::new("/dev/kvm").exists() {
        eprintln!(
            "\n********** SKIPPED a_jailed_kvm_vmm_gets_its_own_dev_kvm: no /dev/kvm **********\n"
        );
        return;
    }
    let Some(host) = host().await else { return };
    let data = host.data_dir();
    let kernel = data.kernel().expect("kernel");
    let jail = wrenn_vmm::jail::Jail::new(
        wrenn_vmm::jail::JailConfig::default(),
        &data.vmm_input_roots(),
    )
    .expect("jail");
    let mut config = wrenn_vmm::QemuConfig::new(wrenn::vmm::Accel::Kvm);
    config.jail = Some(jail);
    let spec = wrenn::vmm::VmSpec {
        name: format!("wrenn-test-kvm-jail-{}", std::process::id()),
        run_dir: data
            .capsules()
            .join(format!("kvm-jail-{}", std::process::id())),
        boot: wrenn::vmm::BootSource {
            kernel,
            cmdline: String::new(),
        },
        machine: wrenn::vmm::MachineConfig {
            vcpus: 1,
            memory_mb: 128,
        },
        drives: Vec::new(),
        nets: Vec::new(),
        memory: wrenn::vmm::MemoryBase::Zero,
    };
    let started =
        wrenn_vmm::qemu::QemuHandle::start(&config, &spec, wrenn_vmm::qemu::StartMode::Incoming)
            .await;
    let vm = match started {
        Ok(vm) => vm,
        Err(wrenn_vmm::qemu::QemuError::EarlyExit { status, log_tail }) => {
            let _ = std::fs::remove_dir_all(&spec.run_dir);
            assert!(
                !log_tail.contains("Could not access KVM kernel module")
                    && !log_tail.contains("failed to initialize kvm"),
                "the jailed QEMU could not open its /dev/kvm: {log_tail}"
            );
            assert!(
                log_tail.contains("kvm") || log_tail.contains("MSR"),
                "QEMU failed before reaching KVM: {status}: {log_tail}"
            );
            eprintln!(
                "\n********** PARTLY SKIPPED a_jailed_kvm_vmm_gets_its_own_dev_kvm: this host's \
                 /dev/kvm opened in the jail but cannot run a vCPU ({status}: {log_tail}) **********\n"
            );
            return;
        }
        Err(e) => panic!("a jailed QEMU under KVM: {e}"),
    };
    let pid = wrenn::vmm::VmmHandle::pid(&vm).expect("pid");
    let uid = ids(pid, "Uid")[0];
    assert!(uid >= wrenn_vmm::jail::DEFAULT_FIRST_UID);
    use std::os::unix::fs::{FileTypeExt, MetadataExt};
    let node = std::fs::metadata(format!("/proc/{pid}/root/dev/kvm")).expect("jail /dev/kvm");
    let host_node = std::fs::metadata("/dev/kvm").expect("/dev/kvm");
    assert!(node.file_type().is_char_device());
    assert_eq!(
        (node.rdev(), node.uid(), node.mode() & 0o777),
        (host_node.rdev(), uid, 0o600)
    );
    // QEMU holds it open.
    let holds = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .expect("fds")
        .flatten()
        .filter_map(|e| std::fs::read_link(e.path()).ok())
        .any(|t| t == std::path::Path::new("/dev/kvm"));
    assert!(holds, "QEMU has no /dev/kvm open");
    wrenn::vmm::VmmHandle::shutdown(&vm)
        .await
        .expect("shutdown");
    let _ = std::fs::remove_dir_all(&spec.run_dir);
}
