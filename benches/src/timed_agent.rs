//! A host agent that records how long each create spent in the agent it wraps, so that
//! a caller's own overhead is its round trip minus that.

use async_trait::async_trait;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use wrenn_core::egress::EgressPolicy;
use wrenn_core::host::{
    CapsuleSpec, Endpoint, GuestStream, HostAgent, HostCapsule, HostError, HostInfo, HostTemplate,
    HostVersions, PoolStats,
};
use wrenn_core::id::CapsuleId;
use wrenn_core::metrics::{MetricPoint, TierSnapshot};
use wrenn_core::snapshot::{PauseMode, ResumeMode};

/// A host agent with the time each create spends in the inner one recorded.
#[derive(Debug)]
pub struct TimedAgent {
    inner: Arc<dyn HostAgent>,
    creates: Mutex<Vec<Duration>>,
}

impl TimedAgent {
    pub fn new(inner: Arc<dyn HostAgent>) -> Self {
        TimedAgent {
            inner,
            creates: Mutex::default(),
        }
    }

    /// The time the last create spent in the inner agent.
    pub fn take_create(&self) -> Option<Duration> {
        self.creates.lock().ok()?.pop()
    }
}

#[async_trait]
impl HostAgent for TimedAgent {
    async fn versions(&self) -> Result<HostVersions, HostError> {
        self.inner.versions().await
    }
    async fn info(&self) -> Result<HostInfo, HostError> {
        self.inner.info().await
    }
    async fn create(&self, spec: CapsuleSpec) -> Result<HostCapsule, HostError> {
        let t = Instant::now();
        let r = self.inner.create(spec).await;
        if let Ok(mut v) = self.creates.lock() {
            v.push(t.elapsed());
        }
        r
    }
    async fn get(&self, id: &CapsuleId) -> Result<HostCapsule, HostError> {
        self.inner.get(id).await
    }
    async fn list(&self) -> Result<Vec<HostCapsule>, HostError> {
        self.inner.list().await
    }
    async fn pause(&self, id: &CapsuleId, mode: PauseMode) -> Result<(), HostError> {
        self.inner.pause(id, mode).await
    }
    async fn resume(&self, id: &CapsuleId, mode: ResumeMode) -> Result<HostCapsule, HostError> {
        self.inner.resume(id, mode).await
    }
    async fn destroy(&self, id: &CapsuleId) -> Result<(), HostError> {
        self.inner.destroy(id).await
    }
    async fn set_network(&self, id: &CapsuleId, policy: EgressPolicy) -> Result<(), HostError> {
        self.inner.set_network(id, policy).await
    }
    async fn fork(
        &self,
        id: &CapsuleId,
        count: usize,
        labels: HashMap<String, String>,
    ) -> Result<Vec<HostCapsule>, HostError> {
        self.inner.fork(id, count, labels).await
    }
    async fn snapshot(&self, id: &CapsuleId, name: &str) -> Result<HostTemplate, HostError> {
        self.inner.snapshot(id, name).await
    }
    async fn templates(&self) -> Result<Vec<HostTemplate>, HostError> {
        self.inner.templates().await
    }
    async fn template(&self, name: &str) -> Result<HostTemplate, HostError> {
        self.inner.template(name).await
    }
    async fn delete_template(&self, name: &str) -> Result<(), HostError> {
        self.inner.delete_template(name).await
    }
    async fn ensure_space(&self, bytes: u64) -> Result<(), HostError> {
        self.inner.ensure_space(bytes).await
    }
    async fn envd(&self, id: &CapsuleId) -> Result<Endpoint, HostError> {
        self.inner.envd(id).await
    }
    async fn port(&self, id: &CapsuleId, port: u16) -> Result<Endpoint, HostError> {
        self.inner.port(id, port).await
    }
    async fn open(&self, id: &CapsuleId, port: u16) -> Result<GuestStream, HostError> {
        self.inner.open(id, port).await
    }
    async fn metrics(
        &self,
        id: &CapsuleId,
        range: Duration,
    ) -> Result<Vec<MetricPoint>, HostError> {
        self.inner.metrics(id, range).await
    }
    async fn latest_metric(
        &self,
        id: &CapsuleId,
        within: Duration,
    ) -> Result<Option<MetricPoint>, HostError> {
        self.inner.latest_metric(id, within).await
    }
    async fn export_metrics(&self, id: &CapsuleId) -> Result<Option<TierSnapshot>, HostError> {
        self.inner.export_metrics(id).await
    }
    async fn import_metrics(&self, id: &CapsuleId, saved: TierSnapshot) -> Result<(), HostError> {
        self.inner.import_metrics(id, saved).await
    }
    async fn pools(&self) -> Result<Vec<PoolStats>, HostError> {
        self.inner.pools().await
    }
    async fn set_pool(&self, template: &str, size: usize) -> Result<(), HostError> {
        self.inner.set_pool(template, size).await
    }
}
