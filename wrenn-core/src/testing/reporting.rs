//! [`ReportingHost`]: a host agent that only reports itself — what a control plane's
//! placement and host monitor ask — and can be made to stop answering. Every other
//! operation fails with `Unavailable`.

use crate::egress::EgressPolicy;
use crate::host::{
    CapsuleSpec, Endpoint, GuestStream, HostAgent, HostCapsule, HostError, HostErrorKind, HostInfo,
    HostTemplate, HostVersions, PoolStats,
};
use crate::id::CapsuleId;
use crate::metrics::{MetricPoint, TierSnapshot};
use crate::scheduler::{HostId, Usage};
use crate::snapshot::{PauseMode, ResumeMode};
use async_trait::async_trait;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

#[derive(Debug)]
pub struct ReportingHost {
    pub info: HostInfo,
    down: AtomicBool,
    draining: AtomicBool,
}

impl ReportingHost {
    /// Host `id` with `cores` CPUs and `memory_mb` of memory, `running_memory_mb` of it
    /// taken by its capsules, and 90 GB of disk room.
    pub fn new(id: &str, cores: u32, memory_mb: u64, running_memory_mb: u64) -> Self {
        ReportingHost {
            info: HostInfo {
                id: HostId(id.into()),
                arch: std::env::consts::ARCH.into(),
                cpu_cores: cores,
                memory_mb,
                disk_mb: 100_000,
                disk_room_mb: 90_000,
                used: Usage {
                    running_memory_mb,
                    ..Default::default()
                },
                ..Default::default()
            },
            down: AtomicBool::new(false),
            draining: AtomicBool::new(false),
        }
    }

    /// Whether it was told to drain.
    pub fn draining(&self) -> bool {
        self.draining.load(Ordering::SeqCst)
    }

    /// Stops (or resumes) answering its reports.
    pub fn set_down(&self, down: bool) {
        self.down.store(down, Ordering::SeqCst);
    }
}

fn no<T>() -> Result<T, HostError> {
    Err(HostError::new(
        HostErrorKind::Unavailable,
        "this host only reports itself",
    ))
}

#[async_trait]
impl HostAgent for ReportingHost {
    async fn versions(&self) -> Result<HostVersions, HostError> {
        Ok(HostVersions {
            instance: "reporting".into(),
            ..Default::default()
        })
    }
    async fn info(&self) -> Result<HostInfo, HostError> {
        if self.down.load(Ordering::SeqCst) {
            return Err(HostError::new(HostErrorKind::Unavailable, "down"));
        }
        Ok(HostInfo {
            draining: self.draining(),
            ..self.info.clone()
        })
    }
    async fn drain(&self, draining: bool) -> Result<(), HostError> {
        self.draining.store(draining, Ordering::SeqCst);
        Ok(())
    }
    async fn create(&self, _: CapsuleSpec) -> Result<HostCapsule, HostError> {
        no()
    }
    async fn get(&self, _: &CapsuleId) -> Result<HostCapsule, HostError> {
        no()
    }
    async fn list(&self) -> Result<Vec<HostCapsule>, HostError> {
        Ok(Vec::new())
    }
    async fn pause(&self, _: &CapsuleId, _: PauseMode) -> Result<(), HostError> {
        no()
    }
    async fn resume(&self, _: &CapsuleId, _: ResumeMode) -> Result<HostCapsule, HostError> {
        no()
    }
    async fn destroy(&self, _: &CapsuleId) -> Result<(), HostError> {
        no()
    }
    async fn set_network(&self, _: &CapsuleId, _: EgressPolicy) -> Result<(), HostError> {
        no()
    }
    async fn fork(
        &self,
        _: &CapsuleId,
        _: usize,
        _: HashMap<String, String>,
    ) -> Result<Vec<HostCapsule>, HostError> {
        no()
    }
    async fn snapshot(&self, _: &CapsuleId, _: &str) -> Result<HostTemplate, HostError> {
        no()
    }
    async fn templates(&self) -> Result<Vec<HostTemplate>, HostError> {
        Ok(Vec::new())
    }
    async fn template(&self, _: &str) -> Result<HostTemplate, HostError> {
        no()
    }
    async fn delete_template(&self, _: &str) -> Result<(), HostError> {
        no()
    }
    async fn envd(&self, _: &CapsuleId) -> Result<Endpoint, HostError> {
        no()
    }
    async fn port(&self, _: &CapsuleId, _: u16) -> Result<Endpoint, HostError> {
        no()
    }
    async fn open(&self, _: &CapsuleId, _: u16) -> Result<GuestStream, HostError> {
        no()
    }
    async fn metrics(&self, _: &CapsuleId, _: Duration) -> Result<Vec<MetricPoint>, HostError> {
        no()
    }
    async fn export_metrics(&self, _: &CapsuleId) -> Result<Option<TierSnapshot>, HostError> {
        no()
    }
    async fn import_metrics(&self, _: &CapsuleId, _: TierSnapshot) -> Result<(), HostError> {
        no()
    }
    async fn pools(&self) -> Result<Vec<PoolStats>, HostError> {
        Ok(Vec::new())
    }
    async fn set_pool(&self, _: &str, _: usize) -> Result<(), HostError> {
        no()
    }
}
