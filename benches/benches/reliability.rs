//! Reliability under kills, faults and load: runs the chaos driver
//! (`tests/chaos/chaos.py`) in its long form against a real `wrenn serve` and
//! reports what it found:
//! - `kill_points`: times a process was killed with SIGKILL during an operation
//!   (of `ops` mixed lifecycle operations) and restarted: `wrenn serve`, then, with
//!   the control plane and the host agent as two processes, `wrenn serve --agent` and
//!   `wrenn agent` in turn (`agent_kill_points` of them the agent);
//! - `leaks`: QEMU processes, network namespaces, veths, slot leases, capsule or
//!   snapshot directories no listed capsule owns, after each restart and at the end;
//! - `lost_paused`: capsules paused before a kill that did not come back with
//!   their files;
//! - `load_errors` / `load_p99_ms`: answers other than 2xx or 429 (clients and
//!   churn), and the p99 latency of the API clients' requests (GETs and execs in a
//!   shared capsule), while capsules are created and destroyed in a loop (their
//!   create + destroy time is shown apart).
//!
//! `cargo bench --bench reliability` (repo root, as root, images built, the
//! project venv in `.venv`). Sizes: `WRENN_RELIABILITY_OPS` (100),
//! `_KILLS` (10), `_CLIENTS` (200), `_LOAD_SECS` (60), `_CHURN` (20), `_SEED` (7),
//! `_SPLIT_OPS` (50), `_SPLIT_KILLS` (6).

use anyhow::{ensure, Context, Result};
use std::path::Path;
use std::process::{Command, Stdio};
use wrenn_benches::{print_result, print_table};

fn env_or(name: &str, default: &str) -> String {
    std::env::var(format!("WRENN_RELIABILITY_{name}")).unwrap_or_else(|_| default.to_string())
}

fn main() -> Result<()> {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .context("repo root")?
        .to_path_buf();
    let python = repo.join(".venv/bin/python");
    ensure!(
        python.exists(),
        "{} is missing: run ./scripts/deps.sh first",
        python.display()
    );
    eprintln!("building wrenn (debug) for the driver ...");
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let built = Command::new(cargo)
        .args(["build", "-q", "-p", "wrenn-server"])
        .current_dir(&repo)
        .status()
        .context("cargo build")?;
    ensure!(built.success(), "cargo build -p wrenn-server failed");

    let args = [
        ("--ops", env_or("OPS", "100")),
        ("--kills", env_or("KILLS", "10")),
        ("--clients", env_or("CLIENTS", "200")),
        ("--load-secs", env_or("LOAD_SECS", "60")),
        ("--churn", env_or("CHURN", "20")),
        ("--seed", env_or("SEED", "7")),
        ("--split-ops", env_or("SPLIT_OPS", "50")),
        ("--split-kills", env_or("SPLIT_KILLS", "6")),
    ];
    let mut cmd = Command::new(&python);
    cmd.args(["-m", "tests.chaos.chaos"]).current_dir(&repo);
    for (k, v) in &args {
        cmd.args([*k, v.as_str()]);
    }
    eprintln!("running the chaos driver (progress below) ...");
    let out = cmd
        .stderr(Stdio::inherit())
        .output()
        .context("running tests/chaos/chaos.py")?;
    ensure!(
        out.status.success(),
        "the chaos driver failed: {}",
        out.status
    );
    let line = String::from_utf8_lossy(&out.stdout);
    let v: serde_json::Value = serde_json::from_str(line.trim()).context("driver output")?;
    let get = |k: &str| v.get(k).cloned().unwrap_or(serde_json::Value::Null);

    let rows: Vec<(String, String)> = [
        ("operations", "ops"),
        ("kill -9 points (restarts)", "kill_points"),
        ("  of them wrenn agent", "agent_kill_points"),
        ("leaks found", "leaks"),
        ("paused capsules brought back and checked", "paused_checked"),
        ("paused capsules lost", "lost_paused"),
        ("fault checks failed", "fault_problems"),
        ("load: requests", "load_requests"),
        ("load: errors (not 2xx/429)", "load_errors"),
        ("load: p50 ms", "load_p50_ms"),
        ("load: p99 ms", "load_p99_ms"),
        ("load: capsules churned", "load_churned_capsules"),
        (
            "load: churn create+destroy p50 ms",
            "churn_create_destroy_p50_ms",
        ),
    ]
    .iter()
    .map(|(label, key)| (label.to_string(), get(key).to_string()))
    .collect();
    print_table("reliability (tests/chaos/chaos.py)", &rows);
    if let Some(problems) = v.get("problems").and_then(|p| p.as_array()) {
        for p in problems {
            println!("problem: {}", p.as_str().unwrap_or_default());
        }
    }
    print_result(&serde_json::json!({
        "ops": get("ops"),
        "kill_points": get("kill_points"),
        "agent_kill_points": get("agent_kill_points"),
        "leaks": get("leaks"),
        "lost_paused": get("lost_paused"),
        "paused_checked": get("paused_checked"),
        "fault_problems": get("fault_problems"),
        "load_requests": get("load_requests"),
        "load_errors": get("load_errors"),
        "load_p50_ms": get("load_p50_ms"),
        "load_p99_ms": get("load_p99_ms"),
    }));
    Ok(())
}
