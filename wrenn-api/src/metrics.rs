//! The server's own metrics in Prometheus text format (`GET /metrics`), and reading
//! the kept sample history of paused capsules.

use crate::state::AppState;
use axum::extract::{MatchedPath, Request, State};
use axum::http::header;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGaugeVec, Opts,
    Registry, TextEncoder,
};
use std::sync::Arc;
use std::time::{Duration, Instant};
use wrenn_core::metrics::{MetricPoint, TierSnapshot, Tiers};

#[derive(Debug)]
pub struct ServerMetrics {
    registry: Registry,
    requests: IntCounterVec,
    latency: HistogramVec,
    creates: Histogram,
    execs: Histogram,
    proxied: IntCounter,
    capsules: IntGaugeVec,
    /// Warm pools by template and what (target, ready, filling, hits, misses,
    /// last_refill_ms, memory_mb); refreshed on scrape.
    pools: IntGaugeVec,
}

fn build() -> Result<ServerMetrics, prometheus::Error> {
    let registry = Registry::new_custom(Some("wrenn".into()), None)?;
    let requests = IntCounterVec::new(
        Opts::new("http_requests_total", "HTTP requests by route and status"),
        &["method", "route", "status"],
    )?;
    let latency = HistogramVec::new(
        HistogramOpts::new("http_request_duration_seconds", "HTTP request latency").buckets(vec![
            0.0005, 0.001, 0.0025, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 30.0,
        ]),
        &["method", "route"],
    )?;
    let creates = Histogram::with_opts(
        HistogramOpts::new(
            "capsule_create_seconds",
            "Capsule create time (ready to use)",
        )
        .buckets(vec![0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0]),
    )?;
    let execs = Histogram::with_opts(
        HistogramOpts::new("exec_seconds", "Foreground exec time through /v1")
            .buckets(vec![0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 30.0]),
    )?;
    let proxied = IntCounter::new("proxied_requests_total", "Requests proxied into capsules")?;
    let capsules = IntGaugeVec::new(
        Opts::new("capsules", "Capsules by status (refreshed on scrape)"),
        &["status"],
    )?;
    registry.register(Box::new(requests.clone()))?;
    registry.register(Box::new(latency.clone()))?;
    registry.register(Box::new(creates.clone()))?;
    registry.register(Box::new(execs.clone()))?;
    registry.register(Box::new(proxied.clone()))?;
    let pools = IntGaugeVec::new(
        Opts::new(
            "pool",
            "Warm pools by template: target, ready, filling, hits, misses, \
             last_refill_ms, memory_mb (refreshed on scrape)",
        ),
        &["template", "what"],
    )?;
    registry.register(Box::new(capsules.clone()))?;
    registry.register(Box::new(pools.clone()))?;
    Ok(ServerMetrics {
        pools,
        registry,
        requests,
        latency,
        creates,
        execs,
        proxied,
        capsules,
    })
}

impl ServerMetrics {
    pub fn new() -> Self {
        // Registration fails only on duplicate names, which `build` does not have.
        build().unwrap_or_else(|e| panic!("metric definitions are inconsistent: {e}"))
    }

    pub fn capsule_created(&self, d: Duration) {
        self.creates.observe(d.as_secs_f64());
    }

    pub fn exec_done(&self, d: Duration) {
        self.execs.observe(d.as_secs_f64());
    }

    pub fn proxied(&self) {
        self.proxied.inc();
    }
}

impl Default for ServerMetrics {
    fn default() -> Self {
        Self::new()
    }
}

/// Middleware: counts and times requests by their route template.
pub async fn track(State(st): State<Arc<AppState>>, req: Request, next: Next) -> Response {
    // Cheap clones (an `Arc<str>` and a standard method), no per-request strings.
    let matched = req.extensions().get::<MatchedPath>().cloned();
    let route = matched.as_ref().map_or("unmatched", MatchedPath::as_str);
    let method = req.method().clone();
    let start = Instant::now();
    let resp = next.run(req).await;
    let m = &st.metrics;
    m.latency
        .with_label_values(&[method.as_str(), route])
        .observe(start.elapsed().as_secs_f64());
    m.requests
        .with_label_values(&[method.as_str(), route, resp.status().as_str()])
        .inc();
    resp
}

/// `GET /metrics`.
pub async fn serve(State(st): State<Arc<AppState>>) -> Response {
    if let Ok(live) = st.db.system_live_capsules().await {
        st.metrics.capsules.reset();
        for c in live {
            st.metrics
                .capsules
                .with_label_values(&[c.status.as_str()])
                .inc();
        }
    }
    st.metrics.pools.reset();
    let mut pools = Vec::new();
    for host in st.hosts.all() {
        pools.extend(host.agent.pools().await.unwrap_or_default());
    }
    for p in pools {
        let as_i64 = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
        for (what, v) in [
            ("target", p.target as u64),
            ("ready", p.ready as u64),
            ("filling", p.filling as u64),
            ("hits", p.hits),
            ("misses", p.misses),
            ("last_refill_ms", p.last_refill_ms.unwrap_or(0)),
            ("memory_mb", p.memory_mb),
        ] {
            st.metrics
                .pools
                .with_label_values(&[p.template.as_str(), what])
                .set(as_i64(v));
        }
    }
    let mut buf = Vec::new();
    let enc = TextEncoder::new();
    if let Err(e) = enc.encode(&st.metrics.registry.gather(), &mut buf) {
        return crate::error::ApiError::internal(format!("metrics: {e}")).into_response();
    }
    ([(header::CONTENT_TYPE, enc.format_type().to_string())], buf).into_response()
}

/// Points of a kept sample history (as exported by the host agent).
pub fn points_from_saved(saved: &serde_json::Value, range: Duration) -> Vec<MetricPoint> {
    let Ok(snap) = serde_json::from_value::<TierSnapshot>(saved.clone()) else {
        return Vec::new();
    };
    let tiers = Tiers::from_snapshot(snap);
    // A paused capsule's history ends when it paused: the range counts back from there.
    let end = tiers
        .latest()
        .map(|p| p.timestamp_unix * 1000)
        .unwrap_or_else(|| chrono::Utc::now().timestamp_millis());
    tiers.points(range, end)
}
