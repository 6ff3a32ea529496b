//! What a host is started with (`wrenn serve` without `--agent`, and `wrenn agent`).

use anyhow::{Context, Result};
use std::path::Path;
use wrenn_agent::{LocalAgent, LocalAgentOptions};

#[derive(Debug, clap::Args)]
pub struct HostArgs {
    /// Keep N ready capsules of TEMPLATE (`TEMPLATE=N`; repeat, or comma-separate in the
    /// environment): creates of it take one instead of restoring.
    #[arg(long = "pool", env = "WRENN_POOLS", value_delimiter = ',', value_parser = parse_pool)]
    pools: Vec<(String, usize)>,
    /// Guest memory all warm pools together may hold, in MiB (0 = no cap).
    #[arg(long, env = "WRENN_POOL_MEMORY_MB", default_value_t = 4096)]
    pool_memory_mb: u64,
    /// DNS server (IP:PORT) that capsules' filtering resolvers forward allowed
    /// names to, when an egress policy allows domains (default: the host's first
    /// IPv4 nameserver in /etc/resolv.conf).
    #[arg(long, env = "WRENN_DNS_UPSTREAM")]
    dns_upstream: Option<std::net::SocketAddr>,
    /// Disk space (MiB) of the data directory's filesystem that capsules may never
    /// take: creates, resumes, forks, pauses, snapshots and uploads that could eat
    /// into it are refused with 507.
    #[arg(long, env = "WRENN_DISK_RESERVE_MB", default_value_t = 1024)]
    disk_reserve_mb: u64,
    /// Thin provisioning of capsules' writable disks, 1-100: room is kept on the
    /// host for 1/RATIO of what running capsules' disks may still grow by (1: all
    /// of it, so no guest can ever find the host disk full). Memory images and
    /// snapshots always count in full.
    #[arg(long, env = "WRENN_DISK_OVERCOMMIT", default_value_t = wrenn::DiskOvercommit::NONE)]
    disk_overcommit: wrenn::DiskOvercommit,
    /// Capsule VMs brought up (booted or restored, until their agent answers) at once;
    /// more creates and resumes wait their turn, so a burst cannot starve running
    /// capsules of CPU. 0: one per CPU.
    #[arg(long, env = "WRENN_MAX_CONCURRENT_STARTS", default_value_t = 0)]
    max_concurrent_starts: usize,
    /// The uids VMMs run as (FIRST-LAST, one per running VMM; the group is FIRST).
    /// Each VMM is jailed: that uid, no capabilities, its own mount namespace.
    #[arg(long, env = "WRENN_JAIL_UIDS", default_value = "990000-999999", value_parser = parse_jail)]
    jail_uids: wrenn::JailConfig,
}

impl HostArgs {
    fn options(self, data_dir: &Path, vmms_outlive_host: bool) -> wrenn::HostOptions {
        wrenn::HostOptions {
            vmms_outlive_host,
            data_dir: wrenn::DataDir::new(data_dir),
            pools: self.pools,
            pool_memory_budget_mb: self.pool_memory_mb,
            dns_upstream: self.dns_upstream,
            disk_reserve_mb: self.disk_reserve_mb,
            disk_overcommit: self.disk_overcommit,
            max_concurrent_starts: self.max_concurrent_starts,
            jail: Some(self.jail_uids),
            ..Default::default()
        }
    }
}

/// Starts this machine's host on `data_dir` (probe, sweep, pools) as an agent whose
/// host is `host_id`. With `vmms_outlive_host` (`wrenn agent`) its VMMs keep running
/// if this process dies, and the next start takes them over.
pub async fn start_host(
    data_dir: &Path,
    args: HostArgs,
    host_id: &str,
    vmms_outlive_host: bool,
) -> Result<LocalAgent> {
    let host = wrenn::Host::local(args.options(data_dir, vmms_outlive_host))
        .await
        .context("host setup failed")?;
    tracing::info!(accel = %host.accel_probe().accel, reason = %host.accel_probe().reason, "host ready");
    Ok(LocalAgent::new(
        host,
        LocalAgentOptions {
            host_id: wrenn::scheduler::HostId(host_id.to_string()),
            ..Default::default()
        },
    ))
}

fn parse_jail(s: &str) -> Result<wrenn::JailConfig, String> {
    wrenn::JailConfig::parse_range(s).map_err(|e| e.to_string())
}

/// `TEMPLATE=N`.
fn parse_pool(s: &str) -> Result<(String, usize), String> {
    let (t, n) = s
        .split_once('=')
        .ok_or_else(|| format!("{s:?}: expected TEMPLATE=N"))?;
    let n = n
        .trim()
        .parse()
        .map_err(|_| format!("{s:?}: N must be a number of capsules"))?;
    Ok((t.trim().to_string(), n))
}
