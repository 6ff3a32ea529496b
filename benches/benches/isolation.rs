//! Isolation costs, measured side by side in one run:
//! - `jail_create_overhead_ms`: VMM start (spawn → QMP ready, joined to its
//!   cgroup) jailed — own uid, mount namespace, cgroup — minus unconfined,
//!   interleaved rounds;
//! - `egress_rule_update_ms`: replacing a live slot's egress policy (a 100-entry
//!   allow list + deny-all ↔ a 10-entry deny list);
//! - `dns_filter_qps`: answers per second of a slot's filtering resolver for
//!   allowed names (64 queries in flight, upstream on loopback);
//! - `vmm_overhead_mb`: what an idle confined VMM's cgroup holds beyond the
//!   guest RAM it touched (the basis of the cgroup's memory headroom).
//!
//! `cargo bench --bench isolation` (repo root, as root, images built).

use anyhow::{ensure, Context, Result};
use std::net::{Ipv4Addr, SocketAddr, UdpSocket as StdUdp};
use std::sync::Arc;
use std::time::{Duration, Instant};
use wrenn::vmm::{Accel, BootSource, MachineConfig, MemoryBase, VmSpec};
use wrenn::{CreateOptions, Host, HostOptions};
use wrenn_benches::{median_p99_ms, print_result, print_table, round2};
use wrenn_core::egress::EgressPolicy;
use wrenn_core::net::{Network, GATEWAY_IP};
use wrenn_net::{NetConfig, NetnsNetwork};
use wrenn_vmm::qemu::{QemuHandle, StartMode};
use wrenn_vmm::QemuConfig;

const ROUNDS: usize = 12;

/// VMM start to QMP ready, jailed and not, interleaved.
async fn jail_overhead(kernel: std::path::PathBuf, accel: Accel) -> Result<(f64, f64, f64)> {
    let pool = wrenn_vmm::cgroup::Pool::new(wrenn_vmm::cgroup::Layout::detect()?);
    let dir = tempfile_dir()?;
    let kernel_dir = kernel
        .parent()
        .map(std::path::Path::to_path_buf)
        .unwrap_or_default();
    let jail = wrenn_vmm::jail::Jail::new(
        wrenn_vmm::jail::JailConfig::default(),
        &[dir.clone(), kernel_dir],
    )?;
    let (mut plain, mut jailed) = (Vec::new(), Vec::new());
    for i in 0..ROUNDS * 2 {
        let confined = i % 2 == 1;
        let mut config = QemuConfig::new(accel);
        if confined {
            config.cgroups = Some(pool.clone());
            config.jail = Some(jail.clone());
        }
        let spec = VmSpec {
            name: format!("wrenn-bench-jail-{i}"),
            run_dir: dir.join(format!("vm{i}")),
            boot: BootSource {
                kernel: kernel.clone(),
                cmdline: String::new(),
            },
            machine: MachineConfig {
                vcpus: 1,
                memory_mb: 256,
            },
            drives: Vec::new(),
            nets: Vec::new(),
            memory: MemoryBase::Zero,
        };
        let t = Instant::now();
        let vm = QemuHandle::start(&config, &spec, StartMode::Incoming).await?;
        let took = t.elapsed();
        wrenn::vmm::VmmHandle::shutdown(&vm).await?;
        if i >= 2 {
            // The first pair warms the page cache.
            if confined {
                jailed.push(took)
            } else {
                plain.push(took)
            }
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
    let (p, _) = median_p99_ms(&mut plain);
    let (j, _) = median_p99_ms(&mut jailed);
    Ok((j - p, j, p))
}

fn tempfile_dir() -> Result<std::path::PathBuf> {
    let d = std::path::PathBuf::from(format!(
        "/var/lib/wrenn-test/bench-iso-{}",
        std::process::id()
    ));
    std::fs::create_dir_all(&d)?;
    Ok(d)
}

/// An upstream DNS server on loopback answering every A query with one address.
fn upstream() -> Result<SocketAddr> {
    let s = StdUdp::bind((Ipv4Addr::LOCALHOST, 0))?;
    let addr = s.local_addr()?;
    std::thread::spawn(move || {
        let mut buf = [0u8; 512];
        while let Ok((n, from)) = s.recv_from(&mut buf) {
            if n < 12 {
                continue;
            }
            let mut r = buf[..n].to_vec();
            r[2] = 0x81;
            r[3] = 0x80;
            r[6] = 0;
            r[7] = 1; // one answer
            r.extend_from_slice(&[0xc0, 0x0c, 0, 1, 0, 1, 0, 0, 1, 44, 0, 4, 198, 18, 0, 2]);
            let _ = s.send_to(&r, from);
        }
    });
    Ok(addr)
}

fn query(id: u16, name: &str) -> Vec<u8> {
    let mut q = vec![(id >> 8) as u8, id as u8, 1, 0, 0, 1, 0, 0, 0, 0, 0, 0];
    for label in name.split('.') {
        q.push(label.len() as u8);
        q.extend_from_slice(label.as_bytes());
    }
    q.extend_from_slice(&[0, 0, 1, 0, 1]);
    q
}

/// Queries per second through the slot's resolver, from inside its namespace.
fn dns_qps(netns: std::path::PathBuf, total: usize) -> Result<f64> {
    let ns = std::fs::File::open(&netns)?;
    std::thread::spawn(move || -> Result<f64> {
        nix::sched::setns(&ns, nix::sched::CloneFlags::CLONE_NEWNET)?;
        let s = StdUdp::bind((Ipv4Addr::UNSPECIFIED, 0))?;
        s.connect((GATEWAY_IP, 53))?;
        s.set_read_timeout(Some(Duration::from_secs(5)))?;
        let names: Vec<String> = (0..16).map(|i| format!("n{i}.bench.test")).collect();
        // Warm: every name resolved once (their addresses enter the nft set).
        for (i, n) in names.iter().enumerate() {
            s.send(&query(i as u16, n))?;
            let mut buf = [0u8; 512];
            let len = s.recv(&mut buf)?;
            ensure!(len > 12 && buf[3] & 0xf == 0, "warm-up query failed");
        }
        let window = 64;
        let mut buf = [0u8; 512];
        let started = Instant::now();
        let (mut sent, mut got) = (0usize, 0usize);
        while got < total {
            while sent < total && sent - got < window {
                s.send(&query(sent as u16, &names[sent % names.len()]))?;
                sent += 1;
            }
            let len = s.recv(&mut buf).context("answer")?;
            ensure!(len > 12 && buf[3] & 0xf == 0, "a query failed");
            got += 1;
        }
        Ok(total as f64 / started.elapsed().as_secs_f64())
    })
    .join()
    .map_err(|_| anyhow::anyhow!("query thread panicked"))?
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<()> {
    // The host: kernel, acceleration, and an idle capsule for the VMM overhead.
    let host = Host::local(HostOptions::default())
        .await
        .context("local host (run as root after `wrenn image build`)")?;
    let accel = host.accel_probe().accel;
    let kernel = host.data_dir().kernel().context("guest kernel")?;
    let info = host
        .capsules()
        .create(CreateOptions {
            template: Some("minimal".into()),
            ..Default::default()
        })
        .await?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let pid: u32 = serde_json::from_slice::<serde_json::Value>(&std::fs::read(
        host.data_dir()
            .capsules()
            .join(info.id.as_str())
            .join("state.json"),
    )?)?["vmm_pid"]
        .as_u64()
        .context("vmm pid")? as u32;
    let layout = wrenn_vmm::cgroup::Layout::detect()?;
    let usage = layout.usage_of(pid).context("cgroup usage")?;
    let guest_touched = guest_rss_kib(pid).unwrap_or(0) << 10;
    let overhead_mb = usage.memory_bytes.saturating_sub(guest_touched) as f64 / 1048576.0;
    host.capsules().destroy(&info.id).await?;

    let (jail_ms, jailed_start_ms, plain_start_ms) = jail_overhead(kernel, accel).await?;

    // Egress: a slot of its own, two policies swapped back and forth.
    let net = Arc::new(NetnsNetwork::new(NetConfig {
        dns_upstream: upstream()?,
        ..NetConfig::default()
    }));
    let wide: Vec<String> = (0..100).map(|i| format!("10.{i}.0.0/16")).collect();
    let mut with_domain = wide.clone();
    with_domain.push("*.bench.test".into());
    let allow = EgressPolicy::new(&with_domain, &["0.0.0.0/0".to_string()], None)?;
    let deny: Vec<String> = (0..10).map(|i| format!("192.0.{i}.0/24")).collect();
    let deny = EgressPolicy::new(&[], &deny, None)?;
    let slot = net.allocate(&allow).await?;
    let mut updates = Vec::new();
    for i in 0..40 {
        let p = if i % 2 == 0 { &deny } else { &allow };
        let t = Instant::now();
        net.set_egress(&slot, p).await?;
        updates.push(t.elapsed());
    }
    // Ends on `allow`: the resolver is running.
    let qps = dns_qps(slot.netns_path.clone(), 20_000)?;
    net.release(&slot).await?;
    let (update_ms, update_p99) = median_p99_ms(&mut updates);

    print_table(
        &format!("Isolation ({accel}, {ROUNDS} VMM starts each way, 40 policy updates)"),
        &[
            (
                "VMM start, jailed / plain (median ms)".into(),
                format!("{jailed_start_ms:.1} / {plain_start_ms:.1}"),
            ),
            ("jail_create_overhead_ms".into(), format!("{jail_ms:.2}")),
            (
                "egress_rule_update_ms (median / p99)".into(),
                format!("{update_ms:.2} / {update_p99:.2}"),
            ),
            ("dns_filter_qps".into(), format!("{qps:.0}")),
            (
                "vmm_overhead_mb (idle, cgroup − guest RSS)".into(),
                format!("{overhead_mb:.1}"),
            ),
        ],
    );
    print_result(&serde_json::json!({
        "accel": accel.to_string(),
        "jail_create_overhead_ms": round2(jail_ms),
        "egress_rule_update_ms": round2(update_ms),
        "egress_rule_update_p99_ms": round2(update_p99),
        "dns_filter_qps": qps.round(),
        "vmm_overhead_mb": round2(overhead_mb),
    }));
    Ok(())
}

/// Guest RAM the VMM touched: resident pages of its memory mapping (KiB).
fn guest_rss_kib(pid: u32) -> Option<u64> {
    let smaps = std::fs::read_to_string(format!("/proc/{pid}/smaps")).ok()?;
    let mut in_guest = false;
    let mut total = 0;
    for line in smaps.lines() {
        if line.contains('-') && line.split_whitespace().count() >= 5 {
            in_guest = line.contains("memory.") && line.contains("/capsules/");
        } else if in_guest {
            if let Some(v) = line.strip_prefix("Rss:") {
                total += v.split_whitespace().next()?.parse::<u64>().ok()?;
            }
        }
    }
    Some(total)
}
