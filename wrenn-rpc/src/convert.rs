//! Between `wrenn_core::host` types and their wire messages, and between host errors
//! and gRPC statuses.

use crate::proto as pb;
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tonic::{Code, Status};
use wrenn_core::egress::{EgressPolicy, EgressPolicyWire};
use wrenn_core::host::{
    CapsuleSpec, Endpoint, HostCapsule, HostError, HostErrorKind, HostImage, HostInfo,
    HostTemplate, HostVersions, ImageSpec, PoolStats,
};
use wrenn_core::id::CapsuleId;
use wrenn_core::metrics::{MetricPoint, PendingWindow, TierSnapshot};
use wrenn_core::scheduler::{HostId, Usage};
use wrenn_core::snapshot::{PauseMode, ResumeMode};
use wrenn_core::status::CapsuleStatus;

/// Status metadata naming the [`HostErrorKind`] of a failure.
pub const ERROR_KIND: &str = "wrenn-error-kind";

const KINDS: [(HostErrorKind, &str, Code); 9] = [
    (HostErrorKind::NotFound, "not_found", Code::NotFound),
    (
        HostErrorKind::InvalidArgument,
        "invalid_argument",
        Code::InvalidArgument,
    ),
    (
        HostErrorKind::InvalidState,
        "invalid_state",
        Code::FailedPrecondition,
    ),
    (HostErrorKind::Conflict, "conflict", Code::AlreadyExists),
    (HostErrorKind::Unavailable, "unavailable", Code::Unavailable),
    (
        HostErrorKind::InsufficientStorage,
        "insufficient_storage",
        Code::ResourceExhausted,
    ),
    (HostErrorKind::Timeout, "timeout", Code::DeadlineExceeded),
    (HostErrorKind::Guest, "guest", Code::Aborted),
    (HostErrorKind::Internal, "internal", Code::Internal),
];

/// A host error as a status: the closest gRPC code, the exact kind in metadata.
pub fn status(e: HostError) -> Status {
    let (name, code) = KINDS
        .iter()
        .find(|(k, _, _)| *k == e.kind)
        .map_or(("internal", Code::Internal), |(_, n, c)| (*n, *c));
    let mut s = Status::new(code, e.message);
    s.metadata_mut().insert(
        ERROR_KIND,
        name.parse().unwrap_or_else(|_| {
            // Every name above is ASCII; this arm is never taken.
            tonic::metadata::MetadataValue::from_static("internal")
        }),
    );
    s
}

/// A status as a host error: the kind its metadata names, else one from its code (a
/// transport failure is the host being unavailable).
pub fn host_error(s: &Status) -> HostError {
    let named = s
        .metadata()
        .get(ERROR_KIND)
        .and_then(|v| v.to_str().ok())
        .and_then(|n| KINDS.iter().find(|(_, name, _)| *name == n))
        .map(|(k, _, _)| *k);
    let kind = named.unwrap_or_else(|| match s.code() {
        Code::NotFound => HostErrorKind::NotFound,
        Code::InvalidArgument | Code::OutOfRange => HostErrorKind::InvalidArgument,
        Code::FailedPrecondition => HostErrorKind::InvalidState,
        Code::AlreadyExists => HostErrorKind::Conflict,
        Code::ResourceExhausted => HostErrorKind::InsufficientStorage,
        // tonic ends a call past its deadline as cancelled ("Timeout expired").
        Code::DeadlineExceeded | Code::Cancelled => HostErrorKind::Timeout,
        // Without a kind the status did not come from the agent's handlers: the
        // connection failed (refused, reset, TLS refused after the handshake).
        Code::Unavailable | Code::Unknown => HostErrorKind::Unavailable,
        _ => HostErrorKind::Internal,
    });
    let message = if named.is_some() {
        s.message().to_string()
    } else {
        format!("host agent: {}", s.message())
    };
    HostError::new(kind, message)
}

fn invalid(what: &str, detail: impl std::fmt::Display) -> HostError {
    HostError::new(HostErrorKind::InvalidArgument, format!("{what}: {detail}"))
}

pub fn capsule_id(s: &str) -> Result<CapsuleId, HostError> {
    CapsuleId::parse(s).map_err(|e| invalid("capsule id", e))
}

fn unix_ms(t: SystemTime) -> i64 {
    match t.duration_since(UNIX_EPOCH) {
        Ok(d) => i64::try_from(d.as_millis()).unwrap_or(i64::MAX),
        Err(e) => -i64::try_from(e.duration().as_millis()).unwrap_or(i64::MAX),
    }
}

fn from_unix_ms(ms: i64) -> SystemTime {
    let d = Duration::from_millis(ms.unsigned_abs());
    if ms >= 0 {
        UNIX_EPOCH + d
    } else {
        UNIX_EPOCH - d
    }
}

pub fn duration_ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

pub fn versions_to(v: HostVersions) -> pb::Versions {
    pb::Versions {
        envd_version: v.envd_version,
        kernel_version: v.kernel_version,
        vmm_version: v.vmm_version,
        agent_version: v.agent_version,
        accel: v.accel,
        instance: v.instance,
    }
}

pub fn versions_from(v: pb::Versions) -> HostVersions {
    HostVersions {
        envd_version: v.envd_version,
        kernel_version: v.kernel_version,
        vmm_version: v.vmm_version,
        agent_version: v.agent_version,
        accel: v.accel,
        instance: v.instance,
    }
}

pub fn info_to(i: HostInfo) -> pb::HostInfo {
    pb::HostInfo {
        id: i.id.0,
        arch: i.arch,
        cpu_cores: i.cpu_cores,
        memory_mb: i.memory_mb,
        disk_mb: i.disk_mb,
        disk_room_mb: i.disk_room_mb,
        running_vcpus: i.used.running_vcpus,
        running_memory_mb: i.used.running_memory_mb,
        paused_memory_mb: i.used.paused_memory_mb,
        used_disk_mb: i.used.disk_mb,
        running: i.running,
        paused: i.paused,
        snapshot_templates: i.snapshot_templates,
        pool_ready: i.pool_ready.into_iter().collect(),
        draining: i.draining,
    }
}

pub fn info_from(i: pb::HostInfo) -> HostInfo {
    HostInfo {
        id: HostId(i.id),
        arch: i.arch,
        cpu_cores: i.cpu_cores,
        memory_mb: i.memory_mb,
        disk_mb: i.disk_mb,
        disk_room_mb: i.disk_room_mb,
        used: Usage {
            running_vcpus: i.running_vcpus,
            running_memory_mb: i.running_memory_mb,
            paused_memory_mb: i.paused_memory_mb,
            disk_mb: i.used_disk_mb,
        },
        running: i.running,
        paused: i.paused,
        snapshot_templates: i.snapshot_templates,
        pool_ready: i.pool_ready.into_iter().collect(),
        draining: i.draining,
    }
}

pub fn policy_to(p: EgressPolicy) -> pb::EgressPolicy {
    let w = EgressPolicyWire::from(p);
    pb::EgressPolicy {
        allow_out: w.allow_out,
        deny_out: w.deny_out,
        dns_servers: w.dns_servers.map(|servers| pb::DnsServers { servers }),
    }
}

pub fn policy_from(p: Option<pb::EgressPolicy>) -> Result<EgressPolicy, HostError> {
    let p = p.unwrap_or_default();
    EgressPolicy::try_from(EgressPolicyWire {
        allow_out: p.allow_out,
        deny_out: p.deny_out,
        dns_servers: p.dns_servers.map(|d| d.servers),
    })
    .map_err(|e| invalid("egress policy", e))
}

pub fn spec_to(s: CapsuleSpec) -> pb::CapsuleSpec {
    pb::CapsuleSpec {
        template: s.template,
        vcpus: s.vcpus,
        memory_mb: s.memory_mb,
        envs: s.envs,
        labels: s.labels,
        cold_boot: s.cold_boot,
        network: Some(policy_to(s.network)),
    }
}

pub fn spec_from(s: pb::CapsuleSpec) -> Result<CapsuleSpec, HostError> {
    Ok(CapsuleSpec {
        template: s.template,
        vcpus: s.vcpus,
        memory_mb: s.memory_mb,
        envs: s.envs,
        labels: s.labels,
        cold_boot: s.cold_boot,
        network: policy_from(s.network)?,
    })
}

const STATUSES: [(CapsuleStatus, pb::CapsuleStatus); 8] = [
    (CapsuleStatus::Starting, pb::CapsuleStatus::Starting),
    (CapsuleStatus::Running, pb::CapsuleStatus::Running),
    (CapsuleStatus::Pausing, pb::CapsuleStatus::Pausing),
    (CapsuleStatus::Paused, pb::CapsuleStatus::Paused),
    (CapsuleStatus::Resuming, pb::CapsuleStatus::Resuming),
    (CapsuleStatus::Stopping, pb::CapsuleStatus::Stopping),
    (CapsuleStatus::Stopped, pb::CapsuleStatus::Stopped),
    (CapsuleStatus::Error, pb::CapsuleStatus::Error),
];

pub fn capsule_to(c: HostCapsule) -> pb::Capsule {
    let status = STATUSES
        .iter()
        .find(|(s, _)| *s == c.status)
        .map_or(pb::CapsuleStatus::Unspecified, |(_, p)| *p);
    pb::Capsule {
        id: c.id.to_string(),
        status: status.into(),
        template: c.template,
        vcpus: c.vcpus,
        memory_mb: c.memory_mb,
        disk_mb: c.disk_mb,
        labels: c.labels,
    }
}

pub fn capsule_from(c: pb::Capsule) -> Result<HostCapsule, HostError> {
    let status = STATUSES
        .iter()
        .find(|(_, p)| *p as i32 == c.status)
        .map(|(s, _)| *s)
        .ok_or_else(|| {
            HostError::new(
                HostErrorKind::Internal,
                format!("host agent sent an unknown capsule status {}", c.status),
            )
        })?;
    let id = CapsuleId::parse(&c.id).map_err(|e| {
        HostError::new(
            HostErrorKind::Internal,
            format!("host agent sent a bad capsule id: {e}"),
        )
    })?;
    Ok(HostCapsule {
        id,
        status,
        template: c.template,
        vcpus: c.vcpus,
        memory_mb: c.memory_mb,
        disk_mb: c.disk_mb,
        labels: c.labels,
    })
}

pub fn capsules_from(l: pb::CapsuleList) -> Result<Vec<HostCapsule>, HostError> {
    l.capsules.into_iter().map(capsule_from).collect()
}

pub fn template_to(t: HostTemplate) -> pb::Template {
    pb::Template {
        name: t.name,
        snapshot: t.snapshot,
        vcpus: t.vcpus,
        memory_mb: t.memory_mb,
        size_bytes: t.size_bytes,
        created_at_ms: t.created_at.map(unix_ms),
    }
}

pub fn template_from(t: pb::Template) -> HostTemplate {
    HostTemplate {
        name: t.name,
        snapshot: t.snapshot,
        vcpus: t.vcpus,
        memory_mb: t.memory_mb,
        size_bytes: t.size_bytes,
        created_at: t.created_at_ms.map(from_unix_ms),
    }
}

pub fn pause_mode_to(m: PauseMode) -> pb::PauseMode {
    match m {
        PauseMode::Full => pb::PauseMode::Full,
        PauseMode::DiskOnly => pb::PauseMode::DiskOnly,
    }
}

pub fn pause_mode_from(m: i32) -> Result<PauseMode, HostError> {
    match pb::PauseMode::try_from(m) {
        Ok(pb::PauseMode::Full) => Ok(PauseMode::Full),
        Ok(pb::PauseMode::DiskOnly) => Ok(PauseMode::DiskOnly),
        Err(_) => Err(invalid("pause mode", m)),
    }
}

pub fn resume_mode_to(m: ResumeMode) -> pb::ResumeMode {
    match m {
        ResumeMode::Restore => pb::ResumeMode::Restore,
        ResumeMode::Reboot => pb::ResumeMode::Reboot,
    }
}

pub fn resume_mode_from(m: i32) -> Result<ResumeMode, HostError> {
    match pb::ResumeMode::try_from(m) {
        Ok(pb::ResumeMode::Restore) => Ok(ResumeMode::Restore),
        Ok(pb::ResumeMode::Reboot) => Ok(ResumeMode::Reboot),
        Err(_) => Err(invalid("resume mode", m)),
    }
}

pub fn endpoint_to(e: Endpoint) -> pb::Endpoint {
    pb::Endpoint {
        addr: e.addr.to_string(),
        access_token: e.access_token,
    }
}

pub fn endpoint_from(e: pb::Endpoint) -> Result<Endpoint, HostError> {
    let addr = e.addr.parse().map_err(|err| {
        HostError::new(
            HostErrorKind::Internal,
            format!("host agent sent a bad endpoint {:?}: {err}", e.addr),
        )
    })?;
    Ok(Endpoint {
        addr,
        access_token: e.access_token,
    })
}

pub fn point_to(p: MetricPoint) -> pb::MetricPoint {
    pb::MetricPoint {
        timestamp_unix: p.timestamp_unix,
        cpu_pct: p.cpu_pct,
        mem_bytes: p.mem_bytes,
        disk_bytes: p.disk_bytes,
    }
}

pub fn point_from(p: pb::MetricPoint) -> MetricPoint {
    MetricPoint {
        timestamp_unix: p.timestamp_unix,
        cpu_pct: p.cpu_pct,
        mem_bytes: p.mem_bytes,
        disk_bytes: p.disk_bytes,
    }
}

fn points_to(v: Vec<MetricPoint>) -> Vec<pb::MetricPoint> {
    v.into_iter().map(point_to).collect()
}

fn points_from(v: Vec<pb::MetricPoint>) -> Vec<MetricPoint> {
    v.into_iter().map(point_from).collect()
}

fn window_to(w: PendingWindow) -> pb::PendingWindow {
    pb::PendingWindow {
        index: w.index,
        count: w.count,
        cpu_sum: w.cpu_sum,
        mem_sum: w.mem_sum,
        disk_last: w.disk_last,
    }
}

fn window_from(w: pb::PendingWindow) -> PendingWindow {
    PendingWindow {
        index: w.index,
        count: w.count,
        cpu_sum: w.cpu_sum,
        mem_sum: w.mem_sum,
        disk_last: w.disk_last,
    }
}

pub fn history_to(h: TierSnapshot) -> pb::MetricHistory {
    pb::MetricHistory {
        fine: points_to(h.fine),
        mid: points_to(h.mid),
        coarse: points_to(h.coarse),
        mid_open: h.mid_open.map(window_to),
        coarse_open: h.coarse_open.map(window_to),
        last_unix_ms: h.last_unix_ms,
    }
}

pub fn history_from(h: pb::MetricHistory) -> TierSnapshot {
    TierSnapshot {
        fine: points_from(h.fine),
        mid: points_from(h.mid),
        coarse: points_from(h.coarse),
        mid_open: h.mid_open.map(window_from),
        coarse_open: h.coarse_open.map(window_from),
        last_unix_ms: h.last_unix_ms,
    }
}

pub fn points_msg(v: Vec<MetricPoint>) -> pb::MetricPoints {
    pb::MetricPoints {
        points: points_to(v),
    }
}

pub fn points_of(m: pb::MetricPoints) -> Vec<MetricPoint> {
    points_from(m.points)
}

pub fn pool_to(p: PoolStats) -> pb::PoolStats {
    pb::PoolStats {
        template: p.template,
        target: p.target as u64,
        ready: p.ready as u64,
        filling: p.filling as u64,
        hits: p.hits,
        misses: p.misses,
        last_refill_ms: p.last_refill_ms,
        memory_mb: p.memory_mb,
    }
}

pub fn pool_from(p: pb::PoolStats) -> PoolStats {
    let size = |n: u64| usize::try_from(n).unwrap_or(usize::MAX);
    PoolStats {
        template: p.template,
        target: size(p.target),
        ready: size(p.ready),
        filling: size(p.filling),
        hits: p.hits,
        misses: p.misses,
        last_refill_ms: p.last_refill_ms,
        memory_mb: p.memory_mb,
    }
}

pub fn manifest_to(m: &wrenn_core::template::TemplateManifest) -> pb::Manifest {
    pb::Manifest {
        name: m.name.to_string(),
        files: m
            .files
            .iter()
            .map(|f| pb::TemplateFile {
                path: f.path.clone(),
                size: f.size,
                crc32: f.crc32,
                mode: f.mode,
            })
            .collect(),
    }
}

pub fn manifest_from(m: pb::Manifest) -> Result<wrenn_core::template::TemplateManifest, HostError> {
    let name = wrenn_core::template::TemplateName::parse(&m.name)
        .map_err(|e| invalid("template name", e))?;
    Ok(wrenn_core::template::TemplateManifest {
        name,
        files: m
            .files
            .into_iter()
            .map(|f| wrenn_core::template::TemplateFile {
                path: f.path,
                size: f.size,
                crc32: f.crc32,
                mode: f.mode,
            })
            .collect(),
    })
}

pub fn chunk_to(c: wrenn_core::template::TemplateChunk) -> pb::TemplateChunk {
    pb::TemplateChunk {
        file: c.file,
        offset: c.offset,
        data: c.data,
    }
}

pub fn chunk_from(c: pb::TemplateChunk) -> wrenn_core::template::TemplateChunk {
    wrenn_core::template::TemplateChunk {
        file: c.file,
        offset: c.offset,
        data: c.data,
    }
}

pub fn image_spec_to(s: ImageSpec) -> pb::ImageRequest {
    pb::ImageRequest {
        image: s.image,
        username: s.username,
        password: s.password,
        allow_private: s.allow_private,
    }
}

pub fn image_spec_from(r: pb::ImageRequest) -> ImageSpec {
    ImageSpec {
        image: r.image,
        username: r.username,
        password: r.password,
        allow_private: r.allow_private,
    }
}

pub fn image_to(i: HostImage) -> pb::Image {
    pb::Image {
        image: i.image,
        digest: i.digest,
        env: i.env,
        working_dir: i.working_dir,
        user: i.user,
        layers: i.layers,
        layer_bytes: i.layer_bytes,
        template: i.template,
        cached: i.cached,
        unpacked_bytes: i.unpacked_bytes,
        pull_secs: i.pull_secs,
        unpack_secs: i.unpack_secs,
        image_secs: i.image_secs,
    }
}

pub fn image_from(i: pb::Image) -> HostImage {
    HostImage {
        image: i.image,
        digest: i.digest,
        env: i.env,
        working_dir: i.working_dir,
        user: i.user,
        layers: i.layers,
        layer_bytes: i.layer_bytes,
        template: i.template,
        cached: i.cached,
        unpacked_bytes: i.unpacked_bytes,
        pull_secs: i.pull_secs,
        unpack_secs: i.unpack_secs,
        image_secs: i.image_secs,
    }
}
