//! envd benchmark: exec round trip, file upload/download throughput, idle RSS and
//! binary size of the static guest agent, run natively on this host.
//!
//! `cargo bench --bench envd` (repo root). `WRENN_BENCH_FILE_MIB` changes the
//! transfer size (default 100); `WRENN_ENVD_BIN` points at another envd binary.

use anyhow::{bail, Context, Result};
use std::io::{Read, Write};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use wrenn_benches::{
    free_port, median_p99_ms, print_result, print_table, repo_root, round2, rss_kib,
};
use wrenn_envd::connect::{encode_envelope, EnvelopeDecoder};
use wrenn_envd::proto::process::process_event::Event;
use wrenn_envd::proto::process::{ProcessConfig, StartRequest, StartResponse};

const EXEC_ITERATIONS: usize = 100;

struct Envd {
    child: Child,
    base: String,
}

impl Drop for Envd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn envd_binary() -> Result<PathBuf> {
    if let Ok(p) = std::env::var("WRENN_ENVD_BIN") {
        return Ok(PathBuf::from(p));
    }
    let root = repo_root();
    let status = Command::new(root.join("scripts/build-guest.sh"))
        .current_dir(&root)
        .stdout(Stdio::null())
        .status()
        .context("running scripts/build-guest.sh")?;
    if !status.success() {
        bail!("building envd failed");
    }
    Ok(root.join("target/x86_64-unknown-linux-gnu/guest/envd"))
}

fn start_envd(bin: &PathBuf) -> Result<Envd> {
    let port = free_port()?;
    let child = Command::new(bin)
        .args([
            "--port",
            &port.to_string(),
            "--addr",
            "127.0.0.1",
            "--default-user",
            "root",
        ])
        .stderr(Stdio::null())
        .spawn()
        .with_context(|| format!("starting {}", bin.display()))?;
    let envd = Envd {
        child,
        base: format!("http://127.0.0.1:{port}"),
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if ureq::get(&format!("{}/health", envd.base)).call().is_ok() {
            return Ok(envd);
        }
        if Instant::now() > deadline {
            bail!("envd did not become healthy");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// One `Start{/bin/true}` stream, read to its end; returns the exit code.
fn exec_true(agent: &ureq::Agent, base: &str) -> Result<i32> {
    let req = StartRequest {
        process: Some(ProcessConfig {
            cmd: "/bin/true".into(),
            ..Default::default()
        }),
        stdin: Some(false),
        ..Default::default()
    };
    let body = encode_envelope(0, &serde_json::to_vec(&req)?);
    let resp = agent
        .post(&format!("{base}/process.Process/Start"))
        .set("Content-Type", "application/connect+json")
        .send_bytes(&body)?;
    let mut raw = Vec::new();
    resp.into_reader().read_to_end(&mut raw)?;
    let mut dec = EnvelopeDecoder::new();
    dec.push(&raw);
    while let Some(env) = dec.next_envelope()? {
        if env.is_end_stream() {
            break;
        }
        let msg: StartResponse = serde_json::from_slice(&env.data)?;
        if let Some(Event::End(end)) = msg.event.and_then(|e| e.event) {
            return Ok(end.exit_code);
        }
    }
    bail!("stream ended without an end event")
}

/// A deterministic, incompressible-enough byte source of `len` bytes.
struct Pattern {
    left: u64,
    state: u64,
}

impl Read for Pattern {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = buf
            .len()
            .min(usize::try_from(self.left).unwrap_or(usize::MAX));
        for chunk in buf[..n].chunks_mut(8) {
            self.state = self
                .state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let bytes = self.state.to_le_bytes();
            chunk.copy_from_slice(&bytes[..chunk.len()]);
        }
        self.left -= n as u64;
        Ok(n)
    }
}

fn main() -> Result<()> {
    let mib: u64 = std::env::var("WRENN_BENCH_FILE_MIB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100);
    let bin = envd_binary()?;
    let binary_mb = std::fs::metadata(&bin)?.len() as f64 / 1_000_000.0;
    let envd = start_envd(&bin)?;
    let pid = envd.child.id();
    std::thread::sleep(Duration::from_millis(300));
    let idle_rss_mb =
        rss_kib(pid, false).context("reading envd RSS")? as f64 * 1024.0 / 1_000_000.0;

    let agent = ureq::AgentBuilder::new()
        .timeout(Duration::from_secs(120))
        .build();
    // Warm up once (first spawn pays page faults for the binary).
    exec_true(&agent, &envd.base)?;
    let mut samples = Vec::with_capacity(EXEC_ITERATIONS);
    for _ in 0..EXEC_ITERATIONS {
        let t = Instant::now();
        let code = exec_true(&agent, &envd.base)?;
        samples.push(t.elapsed());
        if code != 0 {
            bail!("/bin/true exited {code}");
        }
    }
    let (exec_rtt_ms, exec_p99_ms) = median_p99_ms(&mut samples);

    let dir = std::env::temp_dir().join(format!("wrenn-envd-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let path = dir.join("blob.bin");
    let path_s = path.display().to_string();
    let bytes = mib * 1024 * 1024;

    let t = Instant::now();
    let resp = agent
        .post(&format!("{}/files", envd.base))
        .query("path", &path_s)
        .set("Content-Type", "application/octet-stream")
        .send(Pattern {
            left: bytes,
            state: 7,
        })?;
    if resp.status() != 200 {
        bail!("upload answered {}", resp.status());
    }
    let upload_s = t.elapsed().as_secs_f64();
    let written = std::fs::metadata(&path)?.len();
    if written != bytes {
        bail!("upload wrote {written} bytes, expected {bytes}");
    }

    let t = Instant::now();
    let resp = agent
        .get(&format!("{}/files", envd.base))
        .query("path", &path_s)
        .call()?;
    let mut reader = resp.into_reader();
    let mut buf = vec![0u8; 256 * 1024];
    let mut got = 0u64;
    loop {
        let n = reader.read(&mut buf)?;
        if n == 0 {
            break;
        }
        got += n as u64;
    }
    let download_s = t.elapsed().as_secs_f64();
    if got != bytes {
        bail!("download returned {got} bytes, expected {bytes}");
    }
    let peak_rss_mb = rss_kib(pid, true).unwrap_or(0) as f64 * 1024.0 / 1_000_000.0;
    let _ = std::fs::remove_dir_all(&dir);
    drop(envd);

    let upload_mib_s = mib as f64 / upload_s;
    let download_mib_s = mib as f64 / download_s;
    let _ = std::io::stdout().flush();
    print_table(
        "envd (native, static binary)",
        &[
            (
                "exec round trip of `true` (median)".into(),
                format!("{exec_rtt_ms:.2} ms (p99 {exec_p99_ms:.2} ms, n={EXEC_ITERATIONS})"),
            ),
            (
                format!("upload {mib} MiB (octet-stream)"),
                format!("{upload_mib_s:.0} MiB/s"),
            ),
            (
                format!("download {mib} MiB"),
                format!("{download_mib_s:.0} MiB/s"),
            ),
            (
                "idle RSS".into(),
                format!("{idle_rss_mb:.2} MB (target <= 5)"),
            ),
            (
                format!("peak RSS after {mib} MiB up + down"),
                format!("{peak_rss_mb:.2} MB"),
            ),
            (
                "stripped binary".into(),
                format!("{binary_mb:.2} MB (target <= 4)"),
            ),
        ],
    );
    print_result(&serde_json::json!({
        "exec_rtt_ms": round2(exec_rtt_ms),
        "upload_mib_s": round2(upload_mib_s),
        "download_mib_s": round2(download_mib_s),
        "idle_rss_mb": round2(idle_rss_mb),
        "binary_mb": round2(binary_mb),
        "peak_rss_mb": round2(peak_rss_mb),
    }));
    Ok(())
}
