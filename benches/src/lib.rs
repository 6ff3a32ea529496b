//! Helpers shared by Wrenn's benchmarks: locating binaries, reading process
//! memory, and printing the table and the final `RESULT {json}` line.

mod timed_agent;

pub use timed_agent::TimedAgent;

use std::path::{Path, PathBuf};
use std::time::Duration;

/// The repository root (benchmarks run from anywhere inside it).
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_default()
}

/// Resident set size of a process, in KiB (`VmRSS`), or its peak (`VmHWM`).
pub fn rss_kib(pid: u32, peak: bool) -> Option<u64> {
    let key = if peak { "VmHWM:" } else { "VmRSS:" };
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find(|l| l.starts_with(key))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

/// A TCP port that was free a moment ago.
pub fn free_port() -> std::io::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// Median and 99th percentile of a set of durations, in milliseconds.
pub fn median_p99_ms(samples: &mut [Duration]) -> (f64, f64) {
    if samples.is_empty() {
        return (0.0, 0.0);
    }
    samples.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    let p99 = ((samples.len() * 99).div_ceil(100)).saturating_sub(1);
    (ms(samples[samples.len() / 2]), ms(samples[p99]))
}

/// Prints a two-column table of figures.
pub fn print_table(title: &str, rows: &[(String, String)]) {
    let w = rows.iter().map(|(k, _)| k.len()).max().unwrap_or(0).max(6);
    println!("\n{title}");
    println!("{}", "-".repeat(w + 24));
    for (k, v) in rows {
        println!("{k:<w$}  {v}");
    }
    println!("{}", "-".repeat(w + 24));
}

/// Prints the machine-readable last line.
pub fn print_result(json: &serde_json::Value) {
    println!("RESULT {json}");
}

/// Rounds to two decimals for display and JSON.
pub fn round2(v: f64) -> f64 {
    (v * 100.0).round() / 100.0
}

/// A number from the environment, or `default`.
pub fn env_num(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// The load averages (1, 5, 15 min), for the table.
pub fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|s| {
            let f: Vec<&str> = s.split_whitespace().take(3).collect();
            (f.len() == 3).then(|| f.join(" "))
        })
        .unwrap_or_else(|| "?".into())
}

/// A data dir of the benchmark's own (`/var/lib/wrenn-test/bench-<tag>-<pid>`): the
/// built images and platform templates under `images` linked in, as the API suites do.
pub fn bench_data_dir(images: &Path, tag: &str) -> std::io::Result<PathBuf> {
    let dir = PathBuf::from(format!(
        "/var/lib/wrenn-test/bench-{tag}-{}",
        std::process::id()
    ));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(dir.join("templates"))?;
    std::os::unix::fs::symlink(images.join("images"), dir.join("images"))?;
    for e in std::fs::read_dir(images.join("templates"))?.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let rootfs = wrenn_storage::capsnap::template_files::ROOTFS;
        if e.path().join(rootfs).is_file()
            && !name.starts_with("snap-")
            && !name.starts_with("img-")
        {
            std::os::unix::fs::symlink(e.path(), dir.join("templates").join(&name))?;
        }
    }
    Ok(dir)
}
