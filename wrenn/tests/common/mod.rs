//! Shared helpers of the end-to-end tests: they boot real guests (TCG on hosts
//! without usable KVM) from the images under the data directory.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::time::Duration;
use wrenn::{CapsuleId, CapsuleInfo, ExecRequest, Host, HostOptions};

/// The local host, or `None` (with a loud SKIPPED line) when this machine cannot run capsules at all.
pub async fn host() -> Option<Host> {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("SKIPPED: capsule tests need root (network namespaces, taps, nftables)");
        return None;
    }
    if !Path::new("/usr/bin/qemu-system-x86_64").exists()
        && std::env::var_os("WRENN_QEMU").is_none()
    {
        eprintln!("SKIPPED: qemu-system-x86_64 is not installed");
        return None;
    }
    // Images are built by the test script; their absence is a failure, not a skip.
    let host = Host::local(HostOptions::default())
        .await
        .expect("local host (run `wrenn image build` first)");
    eprintln!(
        "accel: {} ({})",
        host.accel_probe().accel,
        host.accel_probe().reason
    );
    Some(host)
}

/// [`host`] over a data directory of its own (the built kernel and `minimal` template
/// linked in), for tests that count what appears in the data directory while other
/// tests create capsules in the shared one. Keep the directory for the host's lifetime.
pub async fn isolated_host() -> Option<(Host, tempfile::TempDir)> {
    host().await?;
    let images = wrenn::DataDir::from_env();
    std::fs::create_dir_all("/var/lib/wrenn-test").expect("test root");
    let dir = tempfile::tempdir_in("/var/lib/wrenn-test").expect("temp data dir");
    let root = dir.path();
    std::os::unix::fs::symlink(images.root().join("images"), root.join("images"))
        .expect("link images");
    std::fs::create_dir_all(root.join("templates")).expect("templates dir");
    std::os::unix::fs::symlink(
        images.template_dir("minimal"),
        root.join("templates/minimal"),
    )
    .expect("link template");
    // Same boot, same host: reuse the acceleration probe of the default data dir.
    if let Ok(probe) = std::fs::read("/run/wrenn/accel-probe.json") {
        let _ = std::fs::create_dir_all(root.join("run"));
        let _ = std::fs::write(root.join("run/accel-probe.json"), probe);
    }
    let host = Host::local(HostOptions {
        data_dir: wrenn::DataDir::new(root),
        ..Default::default()
    })
    .await
    .expect("local host over its own data directory");
    Some((host, dir))
}

pub fn sh(script: &str) -> ExecRequest {
    ExecRequest {
        cmd: "/bin/sh".into(),
        args: vec!["-c".into(), script.into()],
        ..Default::default()
    }
}

/// Runs a shell script and returns (stdout, stderr, exit code).
pub async fn run(host: &Host, id: &CapsuleId, script: &str) -> (String, String, i32) {
    let out = host
        .capsules()
        .run(id, &sh(script), None)
        .await
        .expect("run");
    (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
        out.exit.code,
    )
}

/// Everything a capsule holds on the host, to check it is gone afterwards.
#[derive(Debug)]
pub struct Footprint {
    pub vmm_pid: u32,
    pub netns: PathBuf,
    pub host_veth: String,
    pub dir: PathBuf,
}

pub fn footprint(host: &Host, info: &CapsuleInfo) -> Footprint {
    let dir = host.data_dir().capsules().join(info.id.as_str());
    let state: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("state.json")).expect("state.json"))
            .expect("state json");
    Footprint {
        vmm_pid: state["vmm_pid"].as_u64().expect("vmm pid") as u32,
        netns: PathBuf::from(state["slot"]["netns_path"].as_str().expect("netns")),
        host_veth: state["slot"]["host_veth"]
            .as_str()
            .expect("veth")
            .to_string(),
        dir,
    }
}

pub fn link_exists(name: &str) -> bool {
    Path::new("/sys/class/net").join(name).exists()
}

pub fn process_alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => !stat
            .rsplit(')')
            .next()
            .unwrap_or("")
            .trim_start()
            .starts_with('Z'),
        Err(_) => false,
    }
}

/// Asserts nothing of the capsule is left (within a short grace for the kernel).
pub async fn assert_gone(fp: &Footprint) {
    for _ in 0..100 {
        if !process_alive(fp.vmm_pid) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        !process_alive(fp.vmm_pid),
        "VMM process {} still running",
        fp.vmm_pid
    );
    assert!(
        !fp.netns.exists(),
        "namespace {} still exists",
        fp.netns.display()
    );
    assert!(
        !link_exists(&fp.host_veth),
        "veth {} still exists",
        fp.host_veth
    );
    assert!(
        !fp.dir.exists(),
        "capsule dir {} (disk overlay, state) still exists",
        fp.dir.display()
    );
}
