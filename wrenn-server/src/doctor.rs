//! `wrenn doctor`: what this host can do, each problem with a fix.

use anyhow::Result;
use std::path::Path;
use wrenn::DataDir;

struct Report {
    problems: usize,
}

impl Report {
    fn ok(&self, what: &str, detail: impl AsRef<str>) {
        println!("  ok    {what:<22} {}", detail.as_ref());
    }
    fn warn(&self, what: &str, detail: impl AsRef<str>) {
        println!("  note  {what:<22} {}", detail.as_ref());
    }
    fn fail(&mut self, what: &str, detail: impl AsRef<str>, fix: &str) {
        self.problems += 1;
        println!("  FAIL  {what:<22} {}\n        fix: {fix}", detail.as_ref());
    }
}

fn which(bin: &str) -> Option<std::path::PathBuf> {
    if bin.contains('/') {
        return Path::new(bin).is_file().then(|| bin.into());
    }
    std::env::var_os("PATH")?
        .to_str()?
        .split(':')
        .map(|d| Path::new(d).join(bin))
        .find(|p| p.is_file())
}

pub async fn run(data: &DataDir) -> Result<u8> {
    let mut r = Report { problems: 0 };
    println!("wrenn doctor (data dir {})", data.root().display());

    let root = nix::unistd::geteuid().is_root();
    if root {
        r.ok("privileges", "running as root");
    } else {
        r.fail(
            "privileges",
            "not root: namespaces, taps and nftables need CAP_NET_ADMIN/CAP_SYS_ADMIN",
            "run wrenn as root",
        );
    }

    let qemu = wrenn_vmm::qemu::process::default_binary();
    match which(&qemu.display().to_string()) {
        Some(p) => {
            let v = wrenn_vmm::qemu::qemu_version(&p)
                .await
                .unwrap_or_else(|| "unknown".into());
            let major: u32 = v
                .split('.')
                .next()
                .and_then(|m| m.parse().ok())
                .unwrap_or(0);
            if major >= 7 {
                r.ok("qemu", format!("{} {v}", p.display()));
            } else {
                r.fail(
                    "qemu",
                    format!("{} {v} is older than 7.2", p.display()),
                    "apt-get install qemu-system-x86 (bookworm-backports has 10.0)",
                );
            }
        }
        None => r.fail(
            "qemu",
            "qemu-system-x86_64 not found",
            "apt-get install qemu-system-x86 (or set WRENN_QEMU)",
        ),
    }
    match which("qemu-img") {
        Some(p) => r.ok("qemu-img", p.display().to_string()),
        None => r.fail(
            "qemu-img",
            "not found (needed for qcow2 disks)",
            "apt-get install qemu-utils",
        ),
    }
    match which("nft") {
        Some(p) => r.ok("nftables", p.display().to_string()),
        None => r.fail(
            "nftables",
            "nft not found (needed for capsule NAT and isolation)",
            "apt-get install nftables",
        ),
    }
    if std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/net/tun")
        .is_ok()
    {
        r.ok("tap devices", "/dev/net/tun opens read-write");
    } else {
        r.fail(
            "tap devices",
            "/dev/net/tun cannot be opened",
            "modprobe tun, and run as root",
        );
    }
    match wrenn_vmm::cgroup::Layout::detect() {
        Ok(layout) => r.ok("VMM cgroups", layout.describe()),
        Err(e) => r.fail(
            "VMM cgroups",
            e.to_string(),
            "mount cgroup v2 (or the v1 memory, cpu and pids controllers)",
        ),
    }
    // The jail mounts a `/proc` with `subset=pid` (Linux 5.8).
    let release = nix::sys::utsname::uname()
        .map(|u| u.release().to_string_lossy().into_owned())
        .unwrap_or_default();
    let mut version = release
        .split(|c: char| !c.is_ascii_digit())
        .filter_map(|v| v.parse::<u32>().ok());
    let kernel = (version.next().unwrap_or(0), version.next().unwrap_or(0));
    let jail = wrenn::JailConfig::default();
    if !root {
        r.fail(
            "VMM jail",
            "jailing VMMs (own uid, mount namespace) needs root",
            "run wrenn as root",
        );
    } else if kernel < (5, 8) {
        r.fail(
            "VMM jail",
            format!("Linux {release} cannot mount a /proc with subset=pid (5.8+)"),
            "run a newer kernel",
        );
    } else {
        r.ok(
            "VMM jail",
            format!(
                "each VMM: its own uid from {}-{} (--jail-uids), no capabilities, seccomp, own mount namespace",
                jail.first_uid,
                jail.first_uid + (jail.uids - 1)
            ),
        );
    }
    let resolv = std::fs::read_to_string("/etc/resolv.conf").unwrap_or_default();
    match wrenn_net::upstream_from_resolv_conf(&resolv) {
        Some(up) => r.ok(
            "egress DNS filter",
            format!("allowed names are resolved through {up} (--dns-upstream to change)"),
        ),
        None => r.warn(
            "egress DNS filter",
            "no IPv4 nameserver in /etc/resolv.conf: domain rules forward to 8.8.8.8 (set --dns-upstream)",
        ),
    }
    let netns_ok = Path::new("/proc/self/ns/net").exists();
    if netns_ok {
        r.ok("network namespaces", "supported by the kernel");
    } else {
        r.fail(
            "network namespaces",
            "/proc/self/ns/net missing",
            "use a kernel with CONFIG_NET_NS",
        );
    }

    match data.kernel() {
        Some(k) => {
            r.ok("guest kernel", k.display().to_string());
            let probe = wrenn_vmm::probe(&qemu, &k, Some(&data.run_dir())).await;
            let times = match (probe.kvm_boot_ms, probe.tcg_boot_ms) {
                (Some(k), Some(t)) => format!(" [boot: kvm {k} ms, tcg {t} ms]"),
                (None, Some(t)) => format!(" [boot: tcg {t} ms, kvm did not finish]"),
                _ => String::new(),
            };
            let line = format!(
                "{} — {}{times}",
                probe.accel.as_str().to_uppercase(),
                probe.reason
            );
            match probe.accel {
                wrenn::vmm::Accel::Kvm => r.ok("acceleration", line),
                wrenn::vmm::Accel::Tcg if probe.kvm_device && !probe.forced => r.warn(
                    "acceleration",
                    format!("{line}\n        guests run under software emulation (slow); on a host with working KVM they use it automatically"),
                ),
                wrenn::vmm::Accel::Tcg => r.warn("acceleration", line),
            }
        }
        None => {
            r.fail(
                "guest kernel",
                format!("none under {}", data.kernels().display()),
                "wrenn image build",
            );
            r.warn(
                "acceleration",
                "not probed: it boots the guest kernel, which is missing",
            );
        }
    }
    let templates = ["minimal", "python", "base"];
    for t in templates {
        let img = data.template_rootfs(t);
        if img.is_file() {
            let size = std::fs::metadata(&img)
                .map(|m| m.len() / (1024 * 1024))
                .unwrap_or(0);
            r.ok(
                &format!("template {t}"),
                format!("{} ({size} MiB)", img.display()),
            );
        } else {
            r.fail(
                &format!("template {t}"),
                format!("{} missing", img.display()),
                &format!("wrenn image build --template {t}"),
            );
        }
    }
    match std::fs::create_dir_all(data.capsules()) {
        Ok(()) => r.ok(
            "data directory",
            format!("{} writable", data.root().display()),
        ),
        Err(e) => r.fail(
            "data directory",
            format!("{}: {e}", data.capsules().display()),
            "run as root or set WRENN_DATA_DIR",
        ),
    }
    // Warm pools of running servers, as their records in the data directory say.
    {
        use wrenn::record::StateStore;
        let store = wrenn::FsStateStore::new(data.clone());
        let mut pools: std::collections::BTreeMap<String, (usize, u64)> = Default::default();
        for (_, rec) in store.list().await.unwrap_or_default() {
            if let Some(rec) = rec.filter(|r| r.pooled && store.owner_alive(&r.owner)) {
                let e = pools.entry(rec.spec.template.to_string()).or_default();
                e.0 += 1;
                e.1 += u64::from(rec.spec.memory_mb);
            }
        }
        if pools.is_empty() {
            r.ok(
                "warm pools",
                "none (wrenn serve --pool TEMPLATE=N keeps N ready capsules of a template)",
            );
        } else {
            let list: Vec<String> = pools
                .iter()
                .map(|(t, (n, mb))| format!("{t}: {n} ready ({mb} MiB of guest memory)"))
                .collect();
            r.ok("warm pools", list.join(", "));
        }
    }
    if wrenn_api::dashboard_built() {
        r.ok("dashboard", "built in: wrenn serve serves it at /");
    } else {
        r.warn(
            "dashboard",
            "not built into this binary (the API works; / says how to build it): \
             ./scripts/dashboard.sh, then rebuild wrenn",
        );
    }
    println!();
    if r.problems == 0 {
        println!("all checks passed");
        Ok(0)
    } else {
        println!("{} problem(s) found", r.problems);
        Ok(1)
    }
}
