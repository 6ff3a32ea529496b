//! The `wrenn` command end to end: real guests, real processes, and a crash.

#![allow(clippy::tests_outside_test_module)] // integration tests are their own crate

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const WRENN: &str = env!("CARGO_BIN_EXE_wrenn");

fn can_run() -> bool {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("SKIPPED: the wrenn CLI tests need root (network namespaces, taps, nftables)");
        return false;
    }
    true
}

fn data_dir() -> PathBuf {
    std::env::var_os("WRENN_DATA_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| "/var/lib/wrenn".into())
}

#[test]
fn run_prints_output_and_exits_with_the_command_status() {
    if !can_run() {
        return;
    }
    let out = Command::new(WRENN)
        .args([
            "run",
            "--template",
            "minimal",
            "--",
            "sh",
            "-c",
            "echo hello; echo to-stderr >&2; exit 7",
        ])
        .output()
        .expect("run wrenn");
    assert_eq!(String::from_utf8_lossy(&out.stdout), "hello\n");
    assert!(String::from_utf8_lossy(&out.stderr).contains("to-stderr"));
    assert_eq!(
        out.status.code(),
        Some(7),
        "stderr: {}",
        String::from_utf8_lossy(&out.stderr)
    );

    let out = Command::new(WRENN)
        .args(["run", "--stdin", "--", "tr", "a-z", "A-Z"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .and_then(|mut c| {
            use std::io::Write;
            c.stdin.take().expect("stdin").write_all(b"shout\n")?;
            c.wait_with_output()
        })
        .expect("run with stdin");
    assert_eq!(String::from_utf8_lossy(&out.stdout), "SHOUT\n");
    assert_eq!(out.status.code(), Some(0));

    let out = Command::new(WRENN)
        .args(["run", "--template", "no-such", "--", "true"])
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("Unknown template 'no-such'"),
        "{out:?}"
    );
}

#[test]
fn doctor_names_the_acceleration() {
    if !can_run() {
        return;
    }
    let out = Command::new(WRENN).arg("doctor").output().expect("doctor");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("acceleration"), "{text}");
    assert!(text.contains("TCG —") || text.contains("KVM —"), "{text}");
    assert_eq!(out.status.code(), Some(0), "{text}");
}

/// Capsule ids whose state file names `pid` as owner.
fn capsules_of(pid: u32) -> Vec<(String, serde_json::Value)> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(data_dir().join("capsules"))
        .into_iter()
        .flatten()
        .flatten()
    {
        if let Ok(b) = std::fs::read(e.path().join("state.json")) {
            if let Ok(v) = serde_json::from_slice::<serde_json::Value>(&b) {
                if v["owner"]["pid"].as_u64() == Some(u64::from(pid)) {
                    out.push((e.file_name().to_string_lossy().into_owned(), v));
                }
            }
        }
    }
    out
}

fn qemu_tagged(id: &str) -> bool {
    std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .any(|e| {
            std::fs::read(e.path().join("cmdline"))
                .map(|c| String::from_utf8_lossy(&c).contains(&format!("wrenn-{id}")))
                .unwrap_or(false)
        })
}

fn crash_and_sweep(kill_when_running: bool) {
    let log = tempfile::NamedTempFile::new().expect("log file");
    let mut child = Command::new(WRENN)
        .args(["run", "--", "sleep", "1000"])
        .env("WRENN_LOG", "info")
        .stdout(Stdio::null())
        .stderr(log.reopen().expect("log file"))
        .spawn()
        .expect("spawn wrenn run");
    let read_log = || std::fs::read_to_string(log.path()).unwrap_or_default();
    let pid = child.id();
    // Generous: the other tests of this file boot their guests at the same time, all
    // under TCG on few cores here.
    let deadline = Instant::now() + Duration::from_secs(180);
    let (id, state) = loop {
        let found = capsules_of(pid);
        let ready = found
            .iter()
            .find(|(_, v)| !kill_when_running || v["status"] == "running")
            .cloned();
        if let Some(f) = ready {
            break f;
        }
        if let Ok(Some(status)) = child.try_wait() {
            panic!(
                "wrenn run ended ({status}) before its capsule ran:\n{}",
                read_log()
            );
        }
        assert!(
            Instant::now() < deadline,
            "wrenn run never created its capsule:\n{}",
            read_log()
        );
        std::thread::sleep(Duration::from_millis(if kill_when_running {
            100
        } else {
            5
        }));
    };
    child.kill().expect("kill -9 wrenn");
    let _ = child.wait();

    let ps = Command::new(WRENN).arg("ps").output().expect("ps");
    assert!(
        String::from_utf8_lossy(&ps.stdout).contains(&id),
        "ps does not show the orphan"
    );
    let rm = Command::new(WRENN).arg("rm").output().expect("rm");
    assert_eq!(
        rm.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&rm.stderr)
    );
    assert!(
        String::from_utf8_lossy(&rm.stdout).contains("removed"),
        "{rm:?}"
    );

    assert!(
        !data_dir().join("capsules").join(&id).exists(),
        "capsule dir survived the sweep"
    );
    assert!(!qemu_tagged(&id), "QEMU of the crashed capsule still runs");
    if let Some(ns) = state["slot"]["netns_path"].as_str() {
        assert!(!Path::new(ns).exists(), "namespace {ns} survived the sweep");
    }
    if let Some(veth) = state["slot"]["host_veth"].as_str() {
        assert!(
            !Path::new("/sys/class/net").join(veth).exists(),
            "veth {veth} survived the sweep"
        );
    }
}

#[test]
fn a_crash_mid_create_leaves_nothing_after_the_next_start() {
    if can_run() {
        crash_and_sweep(false);
    }
}

#[test]
fn a_crash_mid_run_leaves_nothing_after_the_next_start() {
    if can_run() {
        crash_and_sweep(true);
    }
}

#[test]
fn pause_resume_fork_and_snapshot_from_the_command_line() {
    if !can_run() {
        return;
    }
    let wrenn = |args: &[&str]| {
        let out = Command::new(WRENN).args(args).output().expect("wrenn");
        assert!(
            out.status.success(),
            "wrenn {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        (
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (_, err) = wrenn(&["run", "--keep", "--", "sh", "-c", "echo one > /home/user/n"]);
    let id = err
        .split_whitespace()
        .find(|w| w.starts_with("cl-"))
        .expect("paused capsule id")
        .to_string();
    assert!(wrenn(&["ps"]).0.contains(&format!("{id}   paused")));
    let (out, _) = wrenn(&[
        "resume",
        &id,
        "--",
        "sh",
        "-c",
        "cat /home/user/n; echo two >> /home/user/n",
    ]);
    assert_eq!(out, "one\n");
    let (out, _) = wrenn(&["fork", &id, "-n", "2", "--", "cat", "/home/user/n"]);
    let children: Vec<&str> = out.lines().filter(|l| l.starts_with("cl-")).collect();
    assert_eq!(children.len(), 2, "{out}");
    assert_eq!(out.matches("one\ntwo\n").count(), 2, "{out}");
    let name = format!("cli-tpl-{}", std::process::id());
    wrenn(&["snapshot", &id, &name]);
    let (out, _) = wrenn(&["run", "--template", &name, "--", "cat", "/home/user/n"]);
    assert_eq!(out, "one\ntwo\n");
    let mut rm = vec!["rm", id.as_str()];
    rm.extend(children.iter().copied());
    wrenn(&rm);
    let ps = wrenn(&["ps"]).0;
    for c in rm.iter().skip(1) {
        assert!(!ps.contains(c), "{c} still listed");
        assert!(!data_dir().join("snapshots").join(c).exists());
    }
    let _ = std::fs::remove_dir_all(data_dir().join("templates").join(&name));
}
