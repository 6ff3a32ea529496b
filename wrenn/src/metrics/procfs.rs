//! Reading one process's resource use from `/proc`, and the disk space its files take.

use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::Duration;

/// What one look at a process finds. CPU time is cumulative; a percentage needs two samples
/// (see [`cpu_percent`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RawSample {
    /// User + system CPU time of all the process's threads since it started.
    pub cpu_time: Duration,
    /// Resident set size (`VmRSS`).
    pub rss_bytes: u64,
    /// Space allocated to the given disk files (`st_blocks * 512`, summed).
    pub disk_bytes: u64,
}

/// Samples process `pid` and the allocated size of `disk_paths`. Fails when the process is
/// gone (or exiting) or a disk file cannot be examined.
pub fn sample_process(pid: u32, disk_paths: &[PathBuf]) -> io::Result<RawSample> {
    let proc_dir = PathBuf::from(format!("/proc/{pid}"));
    let stat = std::fs::read_to_string(proc_dir.join("stat"))?;
    let ticks = parse_stat_cpu_ticks(&stat).ok_or_else(|| malformed(&proc_dir, "stat"))?;
    let status = std::fs::read_to_string(proc_dir.join("status"))?;
    // Zombies and exiting processes have no VmRSS line.
    let rss_bytes = parse_status_rss(&status).ok_or_else(|| malformed(&proc_dir, "status"))?;
    let mut disk_bytes = 0u64;
    for path in disk_paths {
        disk_bytes = disk_bytes.saturating_add(allocated_bytes(path)?);
    }
    Ok(RawSample {
        cpu_time: ticks_to_duration(ticks, clock_ticks_per_second()),
        rss_bytes,
        disk_bytes,
    })
}

/// CPU use between two samples of one process, as a percentage of `vcpus` full CPUs,
/// clamped to 0–100 (a VMM's own threads can briefly exceed its vCPUs).
pub fn cpu_percent(prev: &RawSample, cur: &RawSample, wall: Duration, vcpus: u32) -> f64 {
    let wall = wall.as_secs_f64();
    if wall <= 0.0 {
        return 0.0;
    }
    let used = cur.cpu_time.saturating_sub(prev.cpu_time).as_secs_f64();
    let pct = used / wall / f64::from(vcpus.max(1)) * 100.0;
    pct.clamp(0.0, 100.0)
}

/// Bytes allocated to a file on disk (sparse holes take none).
fn allocated_bytes(path: &Path) -> io::Result<u64> {
    let meta = std::fs::metadata(path).map_err(|e| {
        io::Error::new(
            e.kind(),
            format!("examining disk file {}: {e}", path.display()),
        )
    })?;
    Ok(meta.blocks().saturating_mul(512))
}

fn malformed(proc_dir: &Path, file: &str) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        format!("unexpected contents of {}/{file}", proc_dir.display()),
    )
}

/// `utime + stime` (fields 14 and 15, in clock ticks) of a `/proc/<pid>/stat` line. The
/// command name (field 2) is in parentheses and may itself contain spaces and parentheses,
/// so fields are counted from the last `)`.
pub(crate) fn parse_stat_cpu_ticks(stat: &str) -> Option<u64> {
    let (_, rest) = stat.rsplit_once(')')?;
    // rest: " <state:3> <ppid:4> ... <utime:14> <stime:15> ..."
    let mut fields = rest.split_ascii_whitespace().skip(11);
    let utime: u64 = fields.next()?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    Some(utime.saturating_add(stime))
}

/// `VmRSS` of a `/proc/<pid>/status` file, in bytes.
pub(crate) fn parse_status_rss(status: &str) -> Option<u64> {
    let line = status.lines().find_map(|l| l.strip_prefix("VmRSS:"))?;
    let mut parts = line.split_ascii_whitespace();
    let value: u64 = parts.next()?.parse().ok()?;
    match parts.next()? {
        "kB" => Some(value.saturating_mul(1024)),
        _ => None,
    }
}

fn ticks_to_duration(ticks: u64, per_second: u64) -> Duration {
    let per_second = per_second.max(1);
    let secs = ticks / per_second;
    let rem = ticks % per_second;
    Duration::from_secs(secs) + Duration::from_nanos(rem * 1_000_000_000 / per_second)
}

/// `sysconf(_SC_CLK_TCK)`: the unit of the CPU times in `/proc/<pid>/stat`.
fn clock_ticks_per_second() -> u64 {
    static TCK: OnceLock<u64> = OnceLock::new();
    *TCK.get_or_init(
        || match nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK) {
            Ok(Some(t)) if t > 0 => u64::try_from(t).unwrap_or(100),
            other => {
                tracing::warn!(?other, "sysconf(CLK_TCK) failed; assuming 100");
                100
            }
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    // A real line of a QEMU process, with a command name made awkward on purpose.
    const STAT: &str = "4242 (qemu (x) 1) S 1 4242 4242 0 -1 4194560 91214 0 3 0 \
                        1234 567 0 0 20 0 5 0 925628 3133440 407 18446744073709551615 \
                        1 1 0 0 0 0 0 4096 0 0 0 0 17 1 0 0 0 0 0\n";

    #[test]
    fn stat_sums_utime_and_stime_after_the_last_paren() {
        assert_eq!(parse_stat_cpu_ticks(STAT), Some(1234 + 567));
        let plain = "1 (init) S 0 1 1 0 -1 4194560 1 2 3 4 10 20 0 0 20 0 1 0 5 6 7";
        assert_eq!(parse_stat_cpu_ticks(plain), Some(30));
    }

    #[test]
    fn stat_rejects_truncated_or_garbled_lines() {
        assert_eq!(parse_stat_cpu_ticks(""), None);
        assert_eq!(parse_stat_cpu_ticks("4242 (qemu) S 1 2 3"), None);
        let bad = "1 (init) S 0 1 1 0 -1 4194560 1 2 3 4 x 20 0";
        assert_eq!(parse_stat_cpu_ticks(bad), None);
    }

    #[test]
    fn status_rss_in_bytes() {
        let status = "Name:\tqemu-system-x86\nUmask:\t0022\nState:\tS (sleeping)\n\
                      VmPeak:\t  812344 kB\nVmRSS:\t  262144 kB\nRssAnon:\t  200000 kB\n";
        assert_eq!(parse_status_rss(status), Some(262_144 * 1024));
    }

    #[test]
    fn status_without_rss_is_none() {
        // Kernel threads and zombies have no VmRSS line.
        let zombie = "Name:\tqemu\nState:\tZ (zombie)\nThreads:\t1\n";
        assert_eq!(parse_status_rss(zombie), None);
        assert_eq!(parse_status_rss("VmRSS:\tlots kB\n"), None);
        assert_eq!(parse_status_rss("VmRSS:\t12 MB\n"), None);
    }

    #[test]
    fn ticks_convert_with_the_clock_rate() {
        assert_eq!(ticks_to_duration(250, 100), Duration::from_millis(2500));
        assert_eq!(ticks_to_duration(3, 1000), Duration::from_millis(3));
        assert_eq!(ticks_to_duration(7, 0), Duration::from_secs(7));
    }

    #[test]
    fn cpu_percent_is_normalised_to_vcpus_and_clamped() {
        let at = |ms: u64| RawSample {
            cpu_time: Duration::from_millis(ms),
            rss_bytes: 0,
            disk_bytes: 0,
        };
        let half_s = Duration::from_millis(500);
        // 250 ms of CPU in 500 ms: 50 % of one vCPU, 25 % of two.
        assert_eq!(cpu_percent(&at(1000), &at(1250), half_s, 1), 50.0);
        assert_eq!(cpu_percent(&at(1000), &at(1250), half_s, 2), 25.0);
        // More than the vCPUs (emulator threads) is capped; going backwards is zero.
        assert_eq!(cpu_percent(&at(0), &at(900), half_s, 1), 100.0);
        assert_eq!(cpu_percent(&at(900), &at(0), half_s, 1), 0.0);
        assert_eq!(cpu_percent(&at(0), &at(10), Duration::ZERO, 1), 0.0);
        // vcpus 0 is treated as 1 rather than dividing by zero.
        assert_eq!(cpu_percent(&at(1000), &at(1250), half_s, 0), 50.0);
    }

    #[test]
    fn samples_this_process() {
        let dir = std::env::temp_dir().join(format!("wrenn-metrics-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let disk = dir.join("layer.img");
        let mut file = std::fs::File::create(&disk).expect("create disk file");
        std::io::Write::write_all(&mut file, &[0x5a; 256 * 1024]).expect("write disk file");
        file.sync_all().expect("sync disk file");
        let pid = std::process::id();

        let before = sample_process(pid, &[]).expect("first sample");
        let started = std::time::Instant::now();
        let mut x = 0u64;
        while started.elapsed() < Duration::from_millis(300) {
            x = std::hint::black_box(x.wrapping_mul(6364136223846793005).wrapping_add(1));
        }
        let after = sample_process(pid, std::slice::from_ref(&disk)).expect("second sample");
        let wall = started.elapsed();
        std::fs::remove_dir_all(&dir).expect("remove temp dir");

        let pct = cpu_percent(&before, &after, wall, 1);
        assert!(after.cpu_time > before.cpu_time, "{before:?} -> {after:?}");
        assert!(pct > 0.0 && pct <= 100.0, "cpu {pct}");
        assert!(after.rss_bytes > 0);
        assert_eq!(before.disk_bytes, 0);
        assert!(after.disk_bytes >= 256 * 1024, "{after:?}");
    }

    #[test]
    fn missing_process_or_disk_is_an_error() {
        let missing = PathBuf::from("/nonexistent/wrenn/disk.qcow2");
        let e = sample_process(std::process::id(), &[missing]).expect_err("missing disk");
        assert_eq!(e.kind(), io::ErrorKind::NotFound);
        // Pids are at most 2^22 on Linux.
        let e = sample_process(u32::MAX, &[]).expect_err("no such process");
        assert_eq!(e.kind(), io::ErrorKind::NotFound);
    }
}
