//! The web dashboard's first page: what it weighs and how soon it is interactive.
//!
//! The dashboard's files (`wrenn_dashboard::router`, as `wrenn serve` serves them: gzip,
//! caching headers) are served from this process on loopback.
//!
//! - `first_page_gz_kib`: the JavaScript and CSS that `/` loads, as sent to a browser
//!   that accepts gzip (goal ≤ 300 KiB); `terminal_gz_kib` is the terminal's chunk
//!   (xterm.js), loaded only when a terminal opens.
//! - `interactive_ms`: navigation start to the dashboard's `wrenn:interactive` mark (the
//!   application mounted: the sign-in form answers), in headless Chromium with an empty
//!   cache each round, median and p99 over the rounds (goal ≤ 1000 ms);
//!   `load_ms` the load event, for comparison.
//!
//! `cargo bench --bench dashboard` (repo root). Needs the dashboard built
//! (`./scripts/dashboard.sh`), Debian's `chromium` and Playwright in the venv
//! (`scripts/deps.sh`; `WRENN_VENV`, default `.venv`). `WRENN_BENCH_ROUNDS` sets the
//! rounds (default 20).

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};
use std::io::Read;
use std::path::PathBuf;
use std::time::Duration;
use wrenn_benches::{env_num, median_p99_ms, print_result, print_table, round2};

fn main() -> Result<()> {
    if !wrenn_dashboard::built() {
        bail!("the dashboard is not built: run ./scripts/dashboard.sh, then this bench again");
    }
    let rounds = env_num("WRENN_BENCH_ROUNDS", 20).max(1);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?;
    let listener = rt.block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))?;
    let addr = listener.local_addr()?;
    rt.spawn(async move {
        let app: axum::Router = wrenn_dashboard::router();
        if let Err(e) = axum::serve(listener, app).await {
            eprintln!("dashboard server: {e}");
        }
    });
    let base = format!("http://{addr}");

    // What the first page loads, as sent with gzip.
    let (index, encoding) = get(&format!("{base}/"))?;
    let index = if encoding.as_deref() == Some("gzip") {
        let mut out = String::new();
        flate2::read::GzDecoder::new(&index[..])
            .read_to_string(&mut out)
            .context("index.html")?;
        out
    } else {
        String::from_utf8(index).context("index.html is not UTF-8")?
    };
    let mut first = 0usize;
    let mut files = Vec::new();
    for url in referenced(&index) {
        let (body, encoding) = get(&format!("{base}{url}"))?;
        if encoding.as_deref() != Some("gzip") {
            bail!("{url} was not sent gzipped");
        }
        first += body.len();
        files.push(url);
    }
    let terminal = wrenn_dashboard::files()
        .into_iter()
        .filter(|n| n.starts_with("assets/Terminal") && n.ends_with(".js"))
        .map(|n| get(&format!("{base}/{n}")).map(|(b, _)| b.len()))
        .sum::<Result<usize>>()?;

    // Time to interactive in Chromium.
    let repo = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let venv = std::env::var_os("WRENN_VENV")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo.join(".venv"));
    let out = std::process::Command::new(venv.join("bin/python"))
        .arg(repo.join("benches/dashboard_probe.py"))
        .arg(format!("{base}/"))
        .arg(rounds.to_string())
        .output()
        .with_context(|| format!("running the probe with {}", venv.display()))?;
    if !out.status.success() {
        bail!(
            "the browser probe failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let v: Value = serde_json::from_slice(&out.stdout).context("the probe's output")?;
    let series = |k: &str| -> Vec<Duration> {
        v[k].as_array()
            .map(|a| {
                a.iter()
                    .filter_map(Value::as_f64)
                    .map(|ms| Duration::from_secs_f64(ms / 1000.0))
                    .collect()
            })
            .unwrap_or_default()
    };
    let (tti, tti_p99) = median_p99_ms(&mut series("interactive_ms"));
    let (load, _) = median_p99_ms(&mut series("load_ms"));

    let kib = |n: usize| round2(n as f64 / 1024.0);
    print_table(
        &format!("dashboard first page ({rounds} rounds, fresh browser context each)"),
        &[
            ("files".into(), files.join(" ")),
            (
                "first page JS+CSS, gzip".into(),
                format!("{} KiB (goal <= 300)", kib(first)),
            ),
            (
                "terminal chunk, gzip".into(),
                format!("{} KiB (loaded on demand)", kib(terminal)),
            ),
            (
                "interactive".into(),
                format!("{:.0} ms median, {:.0} ms p99 (goal <= 1000)", tti, tti_p99),
            ),
            ("load event".into(), format!("{load:.0} ms median")),
        ],
    );
    print_result(&json!({
        "first_page_gz_kib": kib(first),
        "terminal_gz_kib": kib(terminal),
        "interactive_ms": round2(tti),
        "interactive_p99_ms": round2(tti_p99),
        "load_ms": round2(load),
    }));
    Ok(())
}

/// The scripts and style sheets a page references from its own origin.
fn referenced(html: &str) -> Vec<String> {
    let mut out = Vec::new();
    for attr in ["src=\"", "href=\""] {
        let mut rest = html;
        while let Some(i) = rest.find(attr) {
            rest = &rest[i + attr.len()..];
            let Some(end) = rest.find('"') else { break };
            let url = &rest[..end];
            if url.starts_with('/') && (url.ends_with(".js") || url.ends_with(".css")) {
                out.push(url.to_string());
            }
        }
    }
    out
}

/// A GET with `Accept-Encoding: gzip`: the body as sent, and its encoding.
fn get(url: &str) -> Result<(Vec<u8>, Option<String>)> {
    let res = ureq::get(url)
        .set("Accept-Encoding", "gzip")
        .call()
        .with_context(|| format!("GET {url}"))?;
    let enc = res.header("content-encoding").map(str::to_string);
    let mut body = Vec::new();
    res.into_reader()
        .read_to_end(&mut body)
        .with_context(|| format!("reading {url}"))?;
    Ok((body, enc))
}
