//! Control-plane benchmark: what the `/v1` API server adds on top of the capsule
//! manager and the guest agent, measured side by side in one run on this host's
//! acceleration. The server (`wrenn_api::router` over a `LocalAgent`, a fresh SQLite
//! database, rate limit off) runs in this process and runtime; the same host's
//! `Capsules` is called directly for the comparisons.
//!
//! - create overhead: `POST /v1/capsules` minus `Capsules::create` (same template).
//!   API and direct creates run interleaved and the median of their paired
//!   differences is shown, but boot-time noise under TCG (tens of ms) swamps a few
//!   ms there; the figure kept (`create_overhead_ms`) is each API call minus the time
//!   that same call spent in `Capsules::create` (timed by a wrapper of the server's
//!   `LocalAgent`), median over the rounds;
//! - `GET /v1/capsules/{id}` under 64 concurrent keep-alive HTTP/1.1 connections:
//!   requests per second and p99 latency;
//! - exec overhead: `POST /v1/capsules/{id}/exec` of `/bin/true` minus the same exec
//!   through the capsule's guest agent client, interleaved, median difference;
//! - (table only) an envd Connect RPC through the server's proxy (`E2b-Sandbox-Id`)
//!   minus the same RPC sent to envd directly.
//!
//! `cargo bench --bench api` (repo root, as root, images built). `WRENN_BENCH_ROUNDS`
//! sets the create rounds (default 20), `WRENN_BENCH_GET_SECS` the GET load time
//! (default 5), `WRENN_DATA_DIR` where the images are (default `/var/lib/wrenn`).

use anyhow::{bail, ensure, Context, Result};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::SendRequest;
use hyper::{Method, Request, StatusCode};
use hyper_util::rt::TokioIo;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};
use wrenn::{CapsuleId, CreateOptions, DataDir, ExecEvent, ExecRequest, Host, HostOptions};
use wrenn_agent::{LocalAgent, LocalAgentOptions};
use wrenn_api::{ApiConfig, AppState};
use wrenn_benches::{
    bench_data_dir, env_num, load_average, median_p99_ms, print_result, print_table, round2,
    TimedAgent,
};

const TEMPLATE: &str = "minimal";
const GET_CLIENTS: usize = 64;
// Under TCG an exec of `true` takes tens of ms and varies by several: the overhead
// (well under a millisecond) needs many pairs to stand out of that noise.
const EXEC_ROUNDS: usize = 300;
const RPC_ROUNDS: usize = 200;
const ENVD_PORT: u16 = 49983;

/// One keep-alive HTTP/1.1 connection.
struct Conn {
    send: SendRequest<Full<Bytes>>,
}

impl Conn {
    async fn open(addr: SocketAddr) -> Result<Conn> {
        let tcp = tokio::net::TcpStream::connect(addr)
            .await
            .with_context(|| format!("connecting to {addr}"))?;
        tcp.set_nodelay(true)?;
        let (send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp)).await?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        Ok(Conn { send })
    }

    async fn call(
        &mut self,
        method: Method,
        path: &str,
        headers: &[(&str, &str)],
        body: Option<&serde_json::Value>,
    ) -> Result<(StatusCode, Bytes)> {
        let mut req = Request::builder()
            .method(method)
            .uri(path)
            .header("host", "127.0.0.1");
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let body = match body {
            Some(b) => {
                req = req.header("content-type", "application/json");
                Full::new(Bytes::from(serde_json::to_vec(b)?))
            }
            None => Full::new(Bytes::new()),
        };
        self.send.ready().await?;
        let resp = self.send.send_request(req.body(body)?).await?;
        let status = resp.status();
        let bytes = resp.into_body().collect().await?.to_bytes();
        Ok((status, bytes))
    }
}

fn expect(what: &str, want: StatusCode, (got, body): (StatusCode, Bytes)) -> Result<Bytes> {
    if got != want {
        bail!("{what}: {got} {}", String::from_utf8_lossy(&body));
    }
    Ok(body)
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// Median of paired differences `a[i] - b[i]` and its distribution-free 95%
/// confidence interval (order statistics), in milliseconds.
fn median_diff_ms(a: &[Duration], b: &[Duration]) -> (f64, f64, f64) {
    let mut d: Vec<f64> = a.iter().zip(b).map(|(x, y)| ms(*x) - ms(*y)).collect();
    d.sort_by(f64::total_cmp);
    let n = d.len();
    if n == 0 {
        return (0.0, 0.0, 0.0);
    }
    let median = if n % 2 == 1 {
        d[n / 2]
    } else {
        (d[n / 2 - 1] + d[n / 2]) / 2.0
    };
    let k = ((n as f64 / 2.0 - 0.98 * (n as f64).sqrt()).floor().max(0.0) as usize).min(n - 1);
    (median, d[k], d[n - 1 - k])
}

/// `median ms (95% CI lo … hi)`.
fn with_ci((median, lo, hi): (f64, f64, f64)) -> String {
    format!("{median:.2} ms (95% CI {lo:.2} … {hi:.2})")
}

fn median_ms(v: &[Duration]) -> f64 {
    median_p99_ms(&mut v.to_vec()).0
}

/// `/bin/true` through the capsule's guest agent client: start, then events until
/// the exit.
async fn direct_exec(host: &Host, id: &CapsuleId) -> Result<()> {
    let agent = host.capsules().agent(id)?;
    let req = ExecRequest {
        cmd: "/bin/true".into(),
        timeout: Some(Duration::from_secs(30)),
        ..Default::default()
    };
    let mut stream = agent.exec(&req).await?;
    while let Some(ev) = stream.events.recv().await {
        if let ExecEvent::Exited(s) = ev? {
            ensure!(s.code == 0, "true exited {}", s.code);
            return Ok(());
        }
    }
    bail!("exec stream ended without an exit")
}

struct Bench {
    host: Host,
    agent: Arc<TimedAgent>,
    api: SocketAddr,
    key: String,
}

impl Bench {
    fn auth(&self) -> [(&str, &str); 1] {
        [("x-api-key", self.key.as_str())]
    }

    async fn api_create(&self, c: &mut Conn) -> Result<String> {
        let body = serde_json::json!({ "template": TEMPLATE });
        let out = c
            .call(Method::POST, "/v1/capsules", &self.auth(), Some(&body))
            .await?;
        let out = expect("POST /v1/capsules", StatusCode::CREATED, out)?;
        let v: serde_json::Value = serde_json::from_slice(&out)?;
        v["id"]
            .as_str()
            .map(str::to_string)
            .context("create answered no id")
    }

    async fn api_destroy(&self, c: &mut Conn, id: &str) -> Result<()> {
        let out = c
            .call(
                Method::DELETE,
                &format!("/v1/capsules/{id}"),
                &self.auth(),
                None,
            )
            .await?;
        expect("DELETE /v1/capsules/{id}", StatusCode::NO_CONTENT, out)?;
        Ok(())
    }

    /// API create vs manager create, interleaved (the order alternates per round); also
    /// the time each API create spent in the manager.
    async fn create_overhead(&self, rounds: usize) -> Result<Creates> {
        let caps = self.host.capsules();
        let mut c = Conn::open(self.api).await?;
        let (mut api, mut direct, mut inside) = (Vec::new(), Vec::new(), Vec::new());
        // One unmeasured round of each: page cache, template metadata, database.
        let id = self.api_create(&mut c).await?;
        self.agent.take_create();
        self.api_destroy(&mut c, &id).await?;
        let info = caps.create(direct_opts()).await?;
        caps.destroy(&info.id).await?;
        for round in 0..rounds {
            for side in [round % 2, 1 - round % 2] {
                if side == 0 {
                    let t = Instant::now();
                    let id = self.api_create(&mut c).await?;
                    api.push(t.elapsed());
                    inside.push(self.agent.take_create().context("create not timed")?);
                    self.api_destroy(&mut c, &id).await?;
                } else {
                    let t = Instant::now();
                    let info = caps.create(direct_opts()).await?;
                    direct.push(t.elapsed());
                    caps.destroy(&info.id).await?;
                }
            }
        }
        Ok(Creates {
            api,
            direct,
            inside,
        })
    }

    /// `GET /v1/capsules/{id}` from `GET_CLIENTS` connections for `secs`.
    async fn get_load(&self, id: &str, secs: u64) -> Result<(f64, f64, u64)> {
        let path = Arc::new(format!("/v1/capsules/{id}"));
        let run = |dur: Duration, keep: bool| {
            let mut tasks = Vec::new();
            for _ in 0..GET_CLIENTS {
                let (addr, key, path) = (self.api, self.key.clone(), path.clone());
                tasks.push(tokio::spawn(async move {
                    let mut c = Conn::open(addr).await?;
                    let mut lat = Vec::new();
                    let mut n = 0u64;
                    let end = Instant::now() + dur;
                    while Instant::now() < end {
                        let t = Instant::now();
                        let out = c
                            .call(Method::GET, &path, &[("x-api-key", &key)], None)
                            .await?;
                        let d = t.elapsed();
                        expect("GET /v1/capsules/{id}", StatusCode::OK, out)?;
                        n += 1;
                        if keep {
                            lat.push(d);
                        }
                    }
                    anyhow::Ok((n, lat))
                }));
            }
            tasks
        };
        // Warm-up: connections, caches, the allocator.
        for t in run(Duration::from_millis(500), false) {
            t.await??;
        }
        let start = Instant::now();
        let tasks = run(Duration::from_secs(secs), true);
        let (mut total, mut lat) = (0u64, Vec::new());
        for t in tasks {
            let (n, l) = t.await??;
            total += n;
            lat.extend(l);
        }
        let elapsed = start.elapsed().as_secs_f64();
        let (_, p99) = median_p99_ms(&mut lat);
        Ok((total as f64 / elapsed, p99, total))
    }

    /// API exec of `/bin/true` vs the guest agent's, interleaved.
    async fn exec_overhead(&self, id: &str) -> Result<(Vec<Duration>, Vec<Duration>)> {
        let cid = CapsuleId::parse(id)?;
        let mut c = Conn::open(self.api).await?;
        let path = format!("/v1/capsules/{id}/exec");
        let body = serde_json::json!({ "cmd": "/bin/true" });
        let (mut api, mut direct) = (Vec::new(), Vec::new());
        for round in 0..EXEC_ROUNDS + 2 {
            let (mut a, mut d) = (Duration::ZERO, Duration::ZERO);
            for side in [round % 2, 1 - round % 2] {
                let t = Instant::now();
                if side == 0 {
                    let out = c
                        .call(Method::POST, &path, &self.auth(), Some(&body))
                        .await?;
                    a = t.elapsed();
                    let out = expect("POST exec", StatusCode::OK, out)?;
                    let v: serde_json::Value = serde_json::from_slice(&out)?;
                    ensure!(v["exit_code"] == 0, "exec answered {v}");
                } else {
                    direct_exec(&self.host, &cid).await?;
                    d = t.elapsed();
                }
            }
            // The first rounds warm the guest's page cache and both clients' pools.
            if round >= 2 {
                api.push(a);
                direct.push(d);
            }
        }
        Ok((api, direct))
    }

    /// A unary envd Connect RPC (`filesystem.Filesystem/Stat`) through the server's
    /// proxy vs sent to envd directly, each over its own keep-alive connection.
    async fn rpc_overhead(&self, id: &str) -> Result<(Vec<Duration>, Vec<Duration>)> {
        let cid = CapsuleId::parse(id)?;
        let caps = self.host.capsules();
        let token = caps.access_token(&cid)?;
        let guest = caps
            .get(&cid)?
            .host_addr
            .context("capsule has no address")?
            .parse::<std::net::Ipv4Addr>()?;
        let mut via = Conn::open(self.api).await?;
        let mut direct = Conn::open(SocketAddr::from((guest, ENVD_PORT))).await?;
        let path = "/filesystem.Filesystem/Stat";
        let body = serde_json::json!({ "path": "/" });
        let common = [
            ("x-access-token", token.as_str()),
            ("connect-protocol-version", "1"),
        ];
        let proxied = [common[0], common[1], ("e2b-sandbox-id", id)];
        let (mut a, mut d) = (Vec::new(), Vec::new());
        for round in 0..RPC_ROUNDS + 2 {
            let (mut ta, mut td) = (Duration::ZERO, Duration::ZERO);
            for side in [round % 2, 1 - round % 2] {
                let t = Instant::now();
                if side == 0 {
                    let out = via.call(Method::POST, path, &proxied, Some(&body)).await?;
                    ta = t.elapsed();
                    expect("Stat through the proxy", StatusCode::OK, out)?;
                } else {
                    let out = direct
                        .call(Method::POST, path, &common, Some(&body))
                        .await?;
                    td = t.elapsed();
                    expect("Stat direct", StatusCode::OK, out)?;
                }
            }
            if round >= 2 {
                a.push(ta);
                d.push(td);
            }
        }
        Ok((a, d))
    }
}

fn direct_opts() -> CreateOptions {
    // What the API's create asks of the host (`LocalAgent::create`): the template's
    // defaults and the owning team's label.
    let mut metadata = std::collections::HashMap::new();
    metadata.insert("wrenn.team".to_string(), "bench".to_string());
    CreateOptions {
        template: Some(TEMPLATE.into()),
        metadata,
        ..Default::default()
    }
}

fn goal(met: bool) -> &'static str {
    if met {
        "met"
    } else {
        "MISSED"
    }
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<()> {
    let rounds = env_num("WRENN_BENCH_ROUNDS", 20) as usize;
    let get_secs = env_num("WRENN_BENCH_GET_SECS", 5);
    let images = DataDir::from_env().root().to_path_buf();
    let load_before = load_average();
    let data = bench_data_dir(&images, "api")?;
    let result = run(&data, rounds, get_secs, &load_before).await;
    let _ = std::fs::remove_dir_all(&data);
    result
}

async fn run(data: &Path, rounds: usize, get_secs: u64, load_before: &str) -> Result<()> {
    let host = Host::local(HostOptions {
        data_dir: DataDir::new(data),
        ..Default::default()
    })
    .await
    .context("local host (run as root after `wrenn image build`)")?;
    let accel = host.accel_probe().accel;
    let agent = Arc::new(TimedAgent::new(Arc::new(LocalAgent::new(
        host.clone(),
        LocalAgentOptions::default(),
    ))));
    let db = wrenn_db::Db::open(&wrenn_db::Db::sqlite_url(&data.join("wrenn.db"))).await?;
    let key = wrenn_db::ensure_bootstrap(&db, None)
        .await?
        .context("fresh database gave no bootstrap key")?;
    let config = ApiConfig {
        rate_limit: 0,
        ..Default::default()
    };
    // Only API keys are used here; user tokens are never issued.
    let secret = b"wrenn-bench-api-unused-jwt-secret";
    let state = Arc::new(AppState::new(
        db.clone(),
        Default::default(),
        config,
        secret,
    ));
    let conn = wrenn_api::hosts::HostConn::connect(agent.clone(), None)
        .await
        .map_err(|e| anyhow::anyhow!("host agent: {e}"))?;
    state
        .hosts
        .add(conn)
        .map_err(|e| anyhow::anyhow!("host agent: {e}"))?;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let api = listener.local_addr()?;
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(async move {
        axum::serve(listener, wrenn_api::router(state))
            .with_graceful_shutdown(async {
                let _ = stop_rx.await;
            })
            .await
    });
    let bench = Bench {
        host,
        agent,
        api,
        key,
    };

    let measured = measure(&bench, rounds, get_secs).await;
    // Nothing outlives the benchmark, whatever failed.
    for (id, e) in bench.host.capsules().destroy_all().await {
        eprintln!("destroying {id}: {e}");
    }
    let _ = stop_tx.send(());
    let _ = tokio::time::timeout(Duration::from_secs(10), server).await;
    db.close().await;
    let m = measured?;

    let c = &m.creates;
    // Interleaved A/B: API creates vs direct ones. Boot-time noise (tens of ms under
    // TCG) swamps a few ms here, so the figure kept is the per-request one: each API
    // create minus the time that very request spent in `Capsules::create`.
    let create_ab = median_diff_ms(&c.api, &c.direct);
    let create_oh = median_diff_ms(&c.api, &c.inside);
    let exec_oh = median_diff_ms(&m.exec_api, &m.exec_direct);
    let rpc_oh = median_diff_ms(&m.rpc_api, &m.rpc_direct);
    let (create_ms, exec_ms) = (create_oh.0, exec_oh.0);
    let load_after = load_average();
    print_table(
        "control plane overhead (API server vs capsule manager / guest agent)",
        &[
            (
                "accel".into(),
                format!("{accel} ({})", bench.host.accel_probe().reason),
            ),
            (
                "server".into(),
                "in process, SQLite, rate limit off (rate_limit: 0)".into(),
            ),
            (
                "load average (1/5/15 min), start → end".into(),
                format!("{load_before} → {load_after}"),
            ),
            (
                format!("create: POST /v1/capsules (n={rounds})"),
                format!("{:.1} ms median", median_ms(&c.api)),
            ),
            (
                format!("create: Capsules::create, direct, interleaved (n={rounds})"),
                format!("{:.1} ms median", median_ms(&c.direct)),
            ),
            (
                "create overhead A/B (median of paired diffs)".into(),
                with_ci(create_ab),
            ),
            (
                "create: Capsules::create inside those API calls".into(),
                format!("{:.1} ms median", median_ms(&c.inside)),
            ),
            (
                "create overhead (API call minus its own manager create)".into(),
                format!(
                    "{}  goal ≤ 5: {}",
                    with_ci(create_oh),
                    goal(create_ms <= 5.0)
                ),
            ),
            (
                format!("GET /v1/capsules/{{id}}, {GET_CLIENTS} keep-alive conns, {get_secs} s"),
                format!(
                    "{:.0} req/s ({} requests)  goal ≥ 20000: {}",
                    m.get_rps,
                    m.get_total,
                    goal(m.get_rps >= 20_000.0)
                ),
            ),
            (
                "GET p99 latency (client and server share 2 cores)".into(),
                format!("{:.2} ms  goal ≤ 5: {}", m.get_p99, goal(m.get_p99 <= 5.0)),
            ),
            (
                format!("exec /bin/true: POST …/exec (n={EXEC_ROUNDS})"),
                format!("{:.2} ms median", median_ms(&m.exec_api)),
            ),
            (
                format!("exec /bin/true: GuestAgent::exec (n={EXEC_ROUNDS})"),
                format!("{:.2} ms median", median_ms(&m.exec_direct)),
            ),
            (
                "exec overhead (median of paired diffs)".into(),
                format!("{}  goal ≤ 1: {}", with_ci(exec_oh), goal(exec_ms <= 1.0)),
            ),
            (
                format!("envd Stat via proxy (E2b-Sandbox-Id) (n={RPC_ROUNDS})"),
                format!("{:.2} ms median", median_ms(&m.rpc_api)),
            ),
            (
                format!("envd Stat direct (n={RPC_ROUNDS})"),
                format!("{:.2} ms median", median_ms(&m.rpc_direct)),
            ),
            (
                "E2B proxy overhead (median of paired diffs)".into(),
                with_ci(rpc_oh),
            ),
        ],
    );
    print_result(&serde_json::json!({
        "accel": accel.as_str(),
        "create_overhead_ms": round2(create_ms),
        "get_rps": m.get_rps.round(),
        "get_p99_ms": round2(m.get_p99),
        "exec_overhead_ms": round2(exec_ms),
    }));
    Ok(())
}

struct Creates {
    /// `POST /v1/capsules` round trips.
    api: Vec<Duration>,
    /// `Capsules::create` called directly, interleaved with those.
    direct: Vec<Duration>,
    /// The time each API create spent in `Capsules::create`.
    inside: Vec<Duration>,
}

struct Measured {
    creates: Creates,
    get_rps: f64,
    get_p99: f64,
    get_total: u64,
    exec_api: Vec<Duration>,
    exec_direct: Vec<Duration>,
    rpc_api: Vec<Duration>,
    rpc_direct: Vec<Duration>,
}

async fn measure(b: &Bench, rounds: usize, get_secs: u64) -> Result<Measured> {
    let creates = b.create_overhead(rounds).await?;
    let mut c = Conn::open(b.api).await?;
    let id = b.api_create(&mut c).await?;
    let (get_rps, get_p99, get_total) = b.get_load(&id, get_secs).await?;
    let (exec_api, exec_direct) = b.exec_overhead(&id).await?;
    let (rpc_api, rpc_direct) = b.rpc_overhead(&id).await?;
    b.api_destroy(&mut c, &id).await?;
    Ok(Measured {
        creates,
        get_rps,
        get_p99,
        get_total,
        exec_api,
        exec_direct,
        rpc_api,
        rpc_direct,
    })
}
