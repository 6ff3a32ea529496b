//! Capsule lifecycle as both APIs need it: the database row and the host stay in step,
//! every mutation is audited, and one team never reaches another team's capsule.

use crate::agent::{CapsuleSpec, HostCapsule, HostError, HostErrorKind, PauseMode, ResumeMode};
use crate::auth::Principal;
use crate::error::{ApiError, ApiResult};
use crate::hosts::HostConn;
use crate::state::AppState;
use serde_json::{Map, Value};
use std::collections::HashMap;
use std::sync::Arc;
use wrenn_core::egress::EgressPolicy;
use wrenn_core::id::CapsuleId;
use wrenn_core::metrics::TierSnapshot;
use wrenn_core::spec;
use wrenn_core::status::CapsuleStatus;
use wrenn_db::{Actor, Capsule, NewCapsule};

/// Label on the host naming the team that owns a capsule.
pub const TEAM_LABEL: &str = "wrenn.team";
/// Template metadata key holding a team snapshot's name on the host.
pub const HOST_TEMPLATE_KEY: &str = "host_template";
/// The template used when a request names none.
pub const DEFAULT_TEMPLATE: &str = "minimal";
/// Names that mean "the default template" (the Wrenn SDK's and E2B's defaults).
const DEFAULT_ALIASES: &[&str] = &["minimal-ubuntu", "base"];
/// Metadata keys owned by the system.
pub const RESERVED_METADATA: &[&str] = &[
    "envd_version",
    "kernel_version",
    "vmm_version",
    "agent_version",
    "firecracker_version",
];

#[derive(Clone, Debug, Default)]
pub struct CreateParams {
    pub template: Option<String>,
    pub vcpus: Option<u32>,
    pub memory_mb: Option<u32>,
    pub timeout_sec: u32,
    pub pause_on_timeout: bool,
    /// The timeout is an end time (E2B) instead of an inactivity timer (Wrenn).
    pub deadline: bool,
    /// A pause on timeout keeps the memory (else the disk only).
    pub timeout_pause_memory: bool,
    /// Traffic through the proxy to the paused capsule resumes it.
    pub auto_resume: bool,
    pub metadata: Map<String, Value>,
    pub envs: HashMap<String, String>,
    pub network: NetworkParams,
    /// Made through E2B's API: the guest also sees E2B's identity variables.
    pub e2b: bool,
    /// Start from a container image a host imported (a build's base) instead of
    /// `template`.
    pub image_base: Option<ImageBase>,
}

/// A container image imported by a host, as a capsule's template.
#[derive(Clone, Debug)]
pub struct ImageBase {
    /// The reference (the capsule's template as the API shows it).
    pub image: String,
    /// The host template made of it.
    pub host_template: String,
    /// The host that holds it.
    pub host: wrenn_core::scheduler::HostId,
}

/// A capsule's network settings as the API sets them.
#[derive(Clone, Debug, Default)]
pub struct NetworkParams {
    /// Egress policy, enforced by the host.
    pub egress: EgressPolicy,
    /// false: the proxy requires the capsule's traffic access token on its ports.
    pub private_ports: bool,
}

/// A new capsule row's timeout: seconds (0 = never), what it does, what it measures,
/// what its pause keeps.
#[derive(Clone, Copy, Debug)]
struct TimeoutPolicy {
    sec: u32,
    pause: bool,
    deadline: bool,
    pause_memory: bool,
    auto_resume: bool,
}

/// A capsule's disk size as shown: rows written before the size was recorded show the
/// reference default.
pub fn disk_size_mb(c: &Capsule) -> u64 {
    if c.disk_mb > 0 {
        c.disk_mb
    } else {
        wrenn_db::DEFAULT_DISK_MB
    }
}

/// Parses a capsule id from a path; anything malformed is simply not found.
pub fn parse_id(id: &str) -> ApiResult<CapsuleId> {
    CapsuleId::parse(id).map_err(|_| ApiError::not_found("capsule"))
}

/// A capsule row of the caller's team.
pub async fn get(state: &AppState, who: &Principal, id: &str) -> ApiResult<Capsule> {
    parse_id(id)?;
    Ok(state
        .capsule_cache
        .get(&state.db, Some(&who.team_id), id)
        .await?)
}

/// A capsule of the caller's team that is running (409 otherwise).
pub async fn running(state: &AppState, who: &Principal, id: &str) -> ApiResult<Capsule> {
    let c = get(state, who, id).await?;
    if c.status != CapsuleStatus::Running {
        return Err(ApiError::invalid_state(format!(
            "capsule {id} is {}; it must be running",
            c.status
        )));
    }
    Ok(c)
}

/// A template as a create finds it.
#[derive(Debug, Clone)]
pub struct Resolved {
    /// As the caller named it.
    pub name: String,
    /// Its name on the hosts.
    pub host_name: String,
    /// The host holding it, for a team snapshot (platform templates are on every host).
    pub holder: Option<wrenn_core::scheduler::HostId>,
    /// A team snapshot's row id and the other hosts holding a copy of it.
    pub snapshot: Option<(String, Vec<wrenn_core::scheduler::HostId>)>,
    /// Environment a built template gives its capsules (theirs override it).
    pub default_env: HashMap<String, String>,
    /// Host labels a built template gives its capsules: its default user and
    /// directory, which a cold boot (a disk-only template) gives envd.
    pub labels: HashMap<String, String>,
}

/// Validates a template name and finds it: a snapshot of the caller's team first, then a
/// platform template.
pub async fn resolve_template(
    state: &AppState,
    who: &Principal,
    name: Option<&str>,
) -> ApiResult<Resolved> {
    let name = name.filter(|n| !n.is_empty()).unwrap_or(DEFAULT_TEMPLATE);
    let parsed = wrenn_core::template::TemplateName::parse(name)
        .map_err(|e| ApiError::invalid(format!("template: {e}")))?;
    match state.db.get_template(&who.team_id, parsed.as_str()).await {
        Ok(t) => {
            let host = t
                .metadata
                .get(HOST_TEMPLATE_KEY)
                .and_then(Value::as_str)
                .ok_or_else(|| ApiError::internal("snapshot has no host template"))?;
            let copies = state.db.template_copies(&t.id).await?;
            let default_env = t
                .metadata
                .get(crate::builds::DEFAULT_ENV_KEY)
                .and_then(Value::as_object)
                .map(|m| {
                    m.iter()
                        .filter_map(|(k, v)| Some((k.clone(), v.as_str()?.to_string())))
                        .collect()
                })
                .unwrap_or_default();
            let labels = [
                (crate::builds::DEFAULT_USER_KEY, spec::DEFAULT_USER_LABEL),
                (
                    crate::builds::DEFAULT_WORKDIR_KEY,
                    spec::DEFAULT_WORKDIR_LABEL,
                ),
            ]
            .into_iter()
            .filter_map(|(key, label)| {
                Some((
                    label.to_string(),
                    t.metadata.get(key)?.as_str()?.to_string(),
                ))
            })
            .collect();
            return Ok(Resolved {
                name: name.to_string(),
                host_name: host.to_string(),
                holder: t.host_id,
                snapshot: Some((t.id, copies)),
                default_env,
                labels,
            });
        }
        Err(e) if e.is_not_found() => {}
        Err(e) => return Err(e.into()),
    }
    let any = state.hosts.any()?.agent.clone();
    let host_name = if DEFAULT_ALIASES.contains(&name) && any.template(name).await.is_err() {
        DEFAULT_TEMPLATE
    } else {
        name
    };
    if is_private_host_template(host_name) {
        return Err(ApiError::not_found(&format!("template {name}")));
    }
    match any.template(host_name).await {
        Ok(_) => Ok(Resolved {
            name: name.to_string(),
            host_name: host_name.to_string(),
            holder: None,
            snapshot: None,
            default_env: HashMap::new(),
            labels: HashMap::new(),
        }),
        Err(e) if e.kind == HostErrorKind::NotFound => {
            Err(ApiError::not_found(&format!("template {name}")))
        }
        Err(e) => Err(e.into()),
    }
}

/// Host names of team snapshots; never offered as platform templates.
pub fn is_team_snapshot_name(name: &str) -> bool {
    name.starts_with("snap-")
}

/// Host templates no team names: team snapshots, and images the hosts imported for
/// builds. Never offered as platform templates.
pub fn is_private_host_template(name: &str) -> bool {
    is_team_snapshot_name(name) || name.starts_with("img-")
}

/// Validates user metadata of the Wrenn API: ≤ 20 keys, names like template names,
/// values ≤ 64 characters, no reserved keys.
pub fn validate_metadata(m: &Map<String, Value>) -> ApiResult<()> {
    if m.len() > 20 {
        return Err(ApiError::invalid("metadata: at most 20 keys"));
    }
    for (k, v) in m {
        if wrenn_core::template::TemplateName::parse(k).is_err() {
            return Err(ApiError::invalid(format!(
                "metadata key {k:?}: must match [a-zA-Z0-9][a-zA-Z0-9._-]{{0,63}}"
            )));
        }
        if RESERVED_METADATA.contains(&k.as_str()) || k.starts_with("wrenn.") {
            return Err(ApiError::invalid(format!("metadata key {k:?} is reserved")));
        }
        match v {
            Value::String(s) if s.chars().count() <= 64 => {}
            Value::String(_) => {
                return Err(ApiError::invalid(format!(
                    "metadata value of {k:?}: at most 64 characters"
                )))
            }
            _ => {
                return Err(ApiError::invalid(format!(
                    "metadata value of {k:?}: must be a string"
                )))
            }
        }
    }
    Ok(())
}

async fn system_metadata(host: &HostConn) -> Map<String, Value> {
    let mut m = Map::new();
    match host.versions().await {
        Ok(v) => {
            m.insert("envd_version".into(), v.envd_version.clone().into());
            m.insert("kernel_version".into(), v.kernel_version.clone().into());
            m.insert("vmm_version".into(), v.vmm_version.clone().into());
            m.insert("agent_version".into(), v.agent_version.clone().into());
        }
        Err(e) => tracing::warn!(error = %e, "host versions unknown"),
    }
    m
}

/// The access token of a running capsule's guest agent, as its host gives it.
async fn envd_access_token(host: &HostConn, id: &CapsuleId) -> Option<String> {
    host.agent
        .envd(id)
        .await
        .ok()
        .and_then(|ep| ep.access_token)
}

/// Creates a capsule: the host starts it (ready when this returns), then the row is
/// written; if the row cannot be written the capsule is destroyed again.
pub async fn create(state: &AppState, who: &Principal, p: CreateParams) -> ApiResult<Capsule> {
    let started = std::time::Instant::now();
    let resolved = match &p.image_base {
        Some(base) => Resolved {
            name: base.image.clone(),
            host_name: base.host_template.clone(),
            holder: Some(base.host.clone()),
            snapshot: None,
            default_env: HashMap::new(),
            labels: HashMap::new(),
        },
        None => resolve_template(state, who, p.template.as_deref()).await?,
    };
    let (template, host_template) = (resolved.name.clone(), resolved.host_name.clone());
    let mut labels = resolved.labels.clone();
    labels.insert(TEAM_LABEL.to_string(), who.team_id.clone());
    labels.insert(spec::TEMPLATE_ID_LABEL.to_string(), template.clone());
    if p.e2b {
        labels.insert(spec::E2B_LABEL.to_string(), "1".to_string());
    }
    // A pre-booted template restores with the sizes it was saved with: other sizes
    // of a platform template boot it instead; a team snapshot keeps its own.
    let (mut vcpus, mut memory_mb, mut cold_boot) = (p.vcpus, p.memory_mb, false);
    let probe = match &resolved.holder {
        Some(h) => state.hosts.get(h)?,
        None => state.hosts.any()?,
    };
    let host_tpl = probe.agent.template(&host_template).await.ok();
    if is_team_snapshot_name(&host_template) && host_tpl.as_ref().is_none_or(|t| t.snapshot) {
        // A disk-only team template has no memory to restore: it boots at any size.
        (vcpus, memory_mb) = (None, None);
    } else if let Some(t) = &host_tpl {
        let differs = |want: Option<u32>, have: Option<u32>| want.is_some() && want != have;
        cold_boot = t.snapshot && (differs(vcpus, t.vcpus) || differs(memory_mb, t.memory_mb));
    }
    let want_vcpus = vcpus
        .or(host_tpl.as_ref().and_then(|t| t.vcpus))
        .unwrap_or(1);
    let want_memory = memory_mb
        .or(host_tpl.as_ref().and_then(|t| t.memory_mb))
        .unwrap_or(512);
    let want_disk = host_tpl
        .as_ref()
        .map(|t| t.size_bytes.div_ceil(1 << 20))
        .filter(|mb| *mb > 0)
        .unwrap_or(wrenn_db::DEFAULT_DISK_MB);
    let _reserved = state
        .quotas
        .reserve(
            &state.db,
            &who.team_id,
            crate::quota::Ask::capsules(
                1,
                u64::from(want_vcpus),
                u64::from(want_memory),
                want_disk,
            ),
        )
        .await?;
    // A team snapshot goes anywhere while a host holding it answers (placement
    // prefers those; another host gets a copy first), else only where it is.
    let holders: Option<Vec<wrenn_core::scheduler::HostId>> = resolved.holder.clone().map(|h| {
        let mut all = vec![h];
        if let Some((_, copies)) = &resolved.snapshot {
            all.extend(copies.iter().cloned());
        }
        all
    });
    let source = holders.as_ref().and_then(|hs| {
        hs.iter()
            .find_map(|h| state.hosts.get(h).ok().filter(|c| !c.unreachable()))
    });
    let req = wrenn_core::scheduler::PlacementRequest {
        team: who.team_id.clone(),
        template: host_template.clone(),
        vcpus: u64::from(want_vcpus),
        memory_mb: u64::from(want_memory),
        // The host checks its disk itself (it knows its overcommit); placement weighs
        // how full each host's disk is.
        disk_mb: 0,
        tags: Default::default(),
    };
    let host = match (&holders, &source) {
        // A host holding it if one can take the capsule, else any (with a copy).
        (Some(hs), Some(_)) => match state.hosts.place(&req, Some(hs)).await {
            Ok(h) => h,
            Err(_) => state.hosts.place(&req, None).await?,
        },
        (Some(hs), None) => state.hosts.place(&req, Some(hs)).await?,
        (None, _) => state.hosts.place(&req, None).await?,
    };
    if let (Some(hs), Some(src), Some((template_id, _))) = (&holders, &source, &resolved.snapshot) {
        if !hs.contains(&host.id) {
            copy_template(state, template_id, &host_template, src, host.host()).await?;
        }
    }
    let spec = CapsuleSpec {
        template: host_template,
        vcpus,
        memory_mb,
        envs: {
            let mut envs = resolved.default_env.clone();
            envs.extend(p.envs);
            envs
        },
        labels,
        cold_boot,
        network: p.network.egress.clone(),
    };
    let hc = match host.agent.create(spec).await {
        Ok(c) => c,
        Err(e) => {
            let err = ApiError::from(e);
            state
                .audit(
                    who,
                    "capsule.create",
                    "capsule",
                    None,
                    false,
                    Some(serde_json::json!({"template": template, "error": err.message})),
                )
                .await;
            return Err(err);
        }
    };
    let row = record(
        state,
        who,
        &host,
        &hc,
        &template,
        &p.metadata,
        TimeoutPolicy {
            sec: p.timeout_sec,
            pause: p.pause_on_timeout,
            deadline: p.deadline,
            pause_memory: p.timeout_pause_memory,
            auto_resume: p.auto_resume,
        },
        &p.network,
    )
    .await?;
    state.metrics.capsule_created(started.elapsed());
    state
        .audit(
            who,
            "capsule.create",
            "capsule",
            Some(hc.id.as_str()),
            true,
            Some(serde_json::json!({"template": template})),
        )
        .await;
    Ok(row)
}

#[allow(clippy::too_many_arguments)]
async fn record(
    state: &AppState,
    who: &Principal,
    host: &HostConn,
    hc: &HostCapsule,
    template: &str,
    user_metadata: &Map<String, Value>,
    timeout: TimeoutPolicy,
    network: &NetworkParams,
) -> ApiResult<Capsule> {
    let mut metadata = user_metadata.clone();
    metadata.extend(system_metadata(host).await);
    let token = envd_access_token(host, &hc.id)
        .await
        .map(|t| state.tokens.seal(hc.id.as_str(), &t));
    let traffic_token = network.private_ports.then(|| {
        state
            .tokens
            .seal(hc.id.as_str(), &wrenn_core::id::random_token())
    });
    let new = NewCapsule {
        id: hc.id.clone(),
        status: CapsuleStatus::Running,
        template: template.to_string(),
        vcpus: hc.vcpus,
        memory_mb: hc.memory_mb,
        timeout_sec: timeout.sec,
        metadata,
        envd_access_token: token,
        pause_on_timeout: timeout.pause,
        disk_mb: hc.disk_mb,
        deadline: timeout.deadline,
        timeout_pause_memory: timeout.pause_memory,
        auto_resume: timeout.auto_resume,
        network: network.egress.clone(),
        public_traffic: !network.private_ports,
        traffic_access_token: traffic_token,
        host_id: host.id.clone(),
    };
    match state.db.insert_capsule(&who.team_id, new).await {
        Ok(row) => Ok(row),
        Err(e) => {
            tracing::error!(capsule = %hc.id, error = %e, "capsule row not written; destroying the capsule");
            if let Err(d) = host.agent.destroy(&hc.id).await {
                tracing::error!(capsule = %hc.id, error = %d, "destroying the unrecorded capsule failed");
            }
            Err(e.into())
        }
    }
}

/// A template (by its name on the hosts) and the host it is copied to.
type CopyKey = (String, wrenn_core::scheduler::HostId);

/// One copy of a template to one host at a time.
#[derive(Debug, Default)]
pub struct CopyLocks(std::sync::Mutex<HashMap<CopyKey, Arc<tokio::sync::Mutex<()>>>>);

impl CopyLocks {
    fn of(&self, name: &str, host: &wrenn_core::scheduler::HostId) -> Arc<tokio::sync::Mutex<()>> {
        let mut map = self.0.lock().unwrap_or_else(|p| p.into_inner());
        map.entry((name.to_string(), host.clone()))
            .or_default()
            .clone()
    }
}

/// Copies snapshot template `host_name` (row `template_id`) from host `from` to host
/// `to`, relayed through this control plane: `to` resumes an interrupted copy, checks
/// every file's checksum and installs it whole. The copy is recorded first, so a
/// delete reaches it even if this stops midway.
pub async fn copy_template(
    state: &AppState,
    template_id: &str,
    host_name: &str,
    from: &HostConn,
    to: &HostConn,
) -> ApiResult<()> {
    let lock = state.copy_locks.of(host_name, &to.id);
    let _one = lock.lock().await;
    if to.agent.template(host_name).await.is_ok() {
        return Ok(());
    }
    state.db.add_template_copy(template_id, &to.id).await?;
    let started = std::time::Instant::now();
    let manifest = from.agent.template_manifest(host_name).await?;
    let have = to.agent.import_state(&manifest).await?;
    let resumed: u64 = have.values().sum();
    let chunks = from.agent.export_template(host_name, have).await?;
    to.agent.import_template(manifest.clone(), chunks).await?;
    tracing::info!(template = host_name, from = %from.id, to = %to.id,
        bytes = manifest.files.iter().map(|f| f.size).sum::<u64>(), resumed,
        took_ms = started.elapsed().as_millis() as u64, "template copied");
    Ok(())
}

/// Removes template `host_name`'s files from `holder` and from every host in `copies`
/// (absent files count as removed); forgets the copies removed. Fails (keeping what
/// could not be removed recorded) when a host holding one does not answer.
async fn remove_everywhere(
    state: &AppState,
    template_id: &str,
    host_name: &str,
    holder: Result<Arc<HostConn>, HostError>,
    copies: &[wrenn_core::scheduler::HostId],
) -> Result<(), HostError> {
    let gone = |r: Result<(), HostError>| match r {
        Err(e) if e.kind == HostErrorKind::NotFound => Ok(()),
        other => other,
    };
    let mut failed = None;
    if let Err(e) = gone(match holder {
        Ok(h) => h.agent.delete_template(host_name).await,
        Err(e) => Err(e),
    }) {
        failed = Some(e);
    }
    for id in copies {
        let removed = match state.hosts.get(id) {
            Ok(h) => gone(h.agent.delete_template(host_name).await),
            Err(e) => Err(e),
        };
        match removed {
            Ok(()) => {
                if let Err(e) = state.db.remove_template_copy(template_id, id).await {
                    tracing::warn!(template = host_name, host = %id, error = %e, "copy not forgotten");
                }
            }
            Err(e) => failed = Some(e),
        }
    }
    failed.map_or(Ok(()), Err)
}

/// Records activity on a capsule (resets its inactivity timer). A capsule whose
/// timeout is an end time (E2B) is left alone: activity does not move it.
pub async fn touch(state: &AppState, c: &Capsule) {
    if c.deadline {
        return;
    }
    if state
        .activity
        .touch(&state.db, &c.team_id, c.id.as_str())
        .await
    {
        state.capsule_cache.invalidate(c.id.as_str());
    }
}

pub(crate) async fn set_status(
    state: &AppState,
    c: &Capsule,
    s: CapsuleStatus,
) -> ApiResult<Capsule> {
    // What the row says before (`c` may be as the caller first read it), for the
    // state change event.
    let before = state
        .db
        .get_capsule(&c.team_id, c.id.as_str())
        .await
        .map_or(c.status, |r| r.status);
    let row = state
        .db
        .set_capsule_status(&c.team_id, c.id.as_str(), s)
        .await;
    state.capsule_cache.invalidate(c.id.as_str());
    let row = row?;
    state
        .events
        .state_changed(&c.team_id, c.id.as_str(), before.as_str(), s.as_str());
    Ok(row)
}

/// The capsule's envd access token in clear (stored sealed).
pub async fn envd_token(state: &AppState, c: &Capsule) -> ApiResult<Option<String>> {
    let stored = state
        .db
        .capsule_envd_token(&c.team_id, c.id.as_str())
        .await?;
    stored
        .map(|s| state.tokens.open(c.id.as_str(), &s))
        .transpose()
        .map_err(|e| ApiError::internal(e.to_string()))
}

/// Claims `c` for an operation: moves it from `from` to `to` only if it still is `from`
/// in the database, so of two racing callers (a user's pause and the reaper's) one wins
/// and the other gets a clear "invalid state" error and changes nothing.
async fn claim(
    state: &AppState,
    c: &Capsule,
    from: CapsuleStatus,
    to: CapsuleStatus,
    verb: &str,
) -> ApiResult<Capsule> {
    let row = state
        .db
        .transition_capsule_status(&c.team_id, c.id.as_str(), from, to)
        .await;
    state.capsule_cache.invalidate(c.id.as_str());
    match row? {
        Some(row) => {
            state
                .events
                .state_changed(&c.team_id, c.id.as_str(), from.as_str(), to.as_str());
            Ok(row)
        }
        None => {
            let now = state
                .db
                .get_capsule(&c.team_id, c.id.as_str())
                .await
                .map(|r| r.status.to_string())
                .unwrap_or_else(|_| "gone".into());
            Err(ApiError::invalid_state(format!(
                "capsule {} is {now}; {verb} needs it {from}",
                c.id
            )))
        }
    }
}

/// Pauses a running capsule (memory and disk); its sample history is kept in the database.
pub async fn pause(
    state: &AppState,
    actor: &Actor,
    actor_name: Option<String>,
    c: &Capsule,
) -> ApiResult<Capsule> {
    pause_with(state, actor, actor_name, c, PauseMode::Full).await
}

/// [`pause`], keeping what `mode` says.
pub async fn pause_with(
    state: &AppState,
    actor: &Actor,
    actor_name: Option<String>,
    c: &Capsule,
    mode: PauseMode,
) -> ApiResult<Capsule> {
    if c.status != CapsuleStatus::Running {
        return Err(ApiError::invalid_state(format!(
            "capsule {} is {}; pause needs it running",
            c.id, c.status
        )));
    }
    state.host_of(c)?;
    claim(
        state,
        c,
        CapsuleStatus::Running,
        CapsuleStatus::Pausing,
        "pause",
    )
    .await?;
    state
        .streams
        .end(c.id.as_str(), crate::proxy::EndReason::Paused);
    let agent = state.agent_of(c)?;
    let result = agent.pause(&c.id, mode).await;
    state.guests.forget(&c.id);
    let ok = result.is_ok();
    let row = match result {
        Ok(()) => {
            match agent.export_metrics(&c.id).await {
                Ok(Some(saved)) => {
                    let kept = match serde_json::to_value(&saved) {
                        Ok(v) => state
                            .db
                            .save_capsule_metrics(c.id.as_str(), &v)
                            .await
                            .map_err(|e| e.to_string()),
                        Err(e) => Err(e.to_string()),
                    };
                    if let Err(e) = kept {
                        tracing::warn!(capsule = %c.id, error = %e, "metrics history not kept");
                    }
                }
                Ok(None) => {}
                Err(e) => {
                    tracing::warn!(capsule = %c.id, error = %e, "metrics history not exported")
                }
            }
            set_status(state, c, CapsuleStatus::Paused).await
        }
        Err(e) => {
            let after = settle(state, c).await;
            let _ = after;
            Err(ApiError::from(e))
        }
    };
    state
        .audit_team(
            &c.team_id,
            actor.clone(),
            actor_name,
            "capsule.pause",
            "capsule",
            Some(c.id.as_str()),
            ok,
            (mode == PauseMode::DiskOnly).then(|| serde_json::json!({"memory": false})),
        )
        .await;
    row
}

/// After a failed operation: sets the row to what the host says the capsule is, or,
/// when the host cannot say (its agent is gone), back to what it was before the
/// operation (`c`, the row as claimed from), so that no row is left mid-operation; the
/// reconciliation with a restarted agent corrects it if the operation did complete.
async fn settle(state: &AppState, c: &Capsule) -> Option<Capsule> {
    let asked = match state.agent_of(c) {
        Ok(agent) => agent.get(&c.id).await,
        Err(e) => Err(e),
    };
    let status = match asked {
        Ok(hc) => hc.status,
        Err(e) if e.kind == HostErrorKind::NotFound => CapsuleStatus::Error,
        Err(e) => {
            tracing::warn!(capsule = %c.id, error = %e, was = %c.status,
                "the host cannot say how the operation ended; the row goes back to what it was");
            c.status
        }
    };
    set_status(state, c, status).await.ok()
}

pub async fn resume(state: &AppState, who: &Principal, c: &Capsule) -> ApiResult<Capsule> {
    resume_with(state, who, c, ResumeMode::Restore).await
}

/// [`resume`]; `ResumeMode::Reboot` boots afresh from the kept disk.
pub async fn resume_with(
    state: &AppState,
    who: &Principal,
    c: &Capsule,
    mode: ResumeMode,
) -> ApiResult<Capsule> {
    if c.status != CapsuleStatus::Paused {
        return Err(ApiError::invalid_state(format!(
            "capsule {} is {}; resume needs it paused",
            c.id, c.status
        )));
    }
    // Its host holds its snapshot: resumed there or not at all.
    let host = state.host_of(c)?;
    // A paused capsule holds disk only; running again, it takes vCPUs and memory.
    let _reserved = state
        .quotas
        .reserve(
            &state.db,
            &c.team_id,
            crate::quota::Ask {
                vcpus: u64::from(c.vcpus),
                memory_mb: u64::from(c.memory_mb),
                ..Default::default()
            },
        )
        .await?;
    claim(
        state,
        c,
        CapsuleStatus::Paused,
        CapsuleStatus::Resuming,
        "resume",
    )
    .await?;
    let result = host.agent.resume(&c.id, mode).await;
    let ok = result.is_ok();
    let row = match result {
        Ok(_) => {
            if let Ok(Some(saved)) = state.db.load_capsule_metrics(c.id.as_str()).await {
                let restored = match serde_json::from_value::<TierSnapshot>(saved) {
                    Ok(history) => host
                        .agent
                        .import_metrics(&c.id, history)
                        .await
                        .map_err(|e| e.to_string()),
                    Err(e) => Err(format!("unreadable: {e}")),
                };
                if let Err(e) = restored {
                    tracing::warn!(capsule = %c.id, error = %e, "kept metrics history dropped");
                }
            }
            // The guest's access token changes on every restore.
            if let Some(token) = envd_access_token(&host, &c.id).await {
                if let Err(e) = state
                    .db
                    .set_capsule_envd_token(
                        &c.team_id,
                        c.id.as_str(),
                        Some(&state.tokens.seal(c.id.as_str(), &token)),
                    )
                    .await
                {
                    tracing::warn!(capsule = %c.id, error = %e, "envd token not recorded");
                }
            }
            let row = set_status(state, c, CapsuleStatus::Running).await;
            touch_now(state, c).await;
            row
        }
        Err(e) => {
            settle(state, c).await;
            Err(ApiError::from(e))
        }
    };
    state
        .audit(
            who,
            "capsule.resume",
            "capsule",
            Some(c.id.as_str()),
            ok,
            None,
        )
        .await;
    row
}

/// How long traffic to an auto-resuming capsule waits for it to run again.
const AUTO_RESUME_WAIT: std::time::Duration = std::time::Duration::from_secs(120);

/// Brings a paused capsule created with auto-resume back for traffic that reached it
/// (the proxy): one resume however many requests arrive at once; the others wait for it.
/// Returns the running row.
pub async fn auto_resume(state: &AppState, c: &Capsule) -> ApiResult<Capsule> {
    let lock = state.resumes.lock_for(c.id.as_str());
    let turn = lock.lock().await;
    let deadline = tokio::time::Instant::now() + AUTO_RESUME_WAIT;
    let system = Principal {
        team_id: c.team_id.clone(),
        actor: Actor::System,
        actor_name: Some("auto-resume".into()),
        user: None,
    };
    let result = loop {
        let now = state.db.get_capsule(&c.team_id, c.id.as_str()).await?;
        match now.status {
            CapsuleStatus::Running => break Ok(now),
            CapsuleStatus::Paused => {
                match resume_with(state, &system, &now, ResumeMode::Restore).await {
                    Ok(row) => {
                        tracing::info!(capsule = %c.id, "auto-resumed for traffic");
                        break Ok(row);
                    }
                    // Someone else resumed (or paused) it meanwhile: look again.
                    Err(e) if e.code == "invalid_state" => {}
                    Err(e) => break Err(e),
                }
            }
            CapsuleStatus::Stopped | CapsuleStatus::Error => {
                break Err(ApiError::not_found(&format!("capsule {}", c.id)))
            }
            // Pausing, resuming, starting: settles by itself.
            _ => {}
        }
        if tokio::time::Instant::now() >= deadline {
            break Err(ApiError::new(
                axum::http::StatusCode::SERVICE_UNAVAILABLE,
                "unavailable",
                format!("capsule {} did not become running in time", c.id),
            ));
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    };
    drop(turn);
    state.resumes.done(c.id.as_str(), lock);
    result
}

/// One lock per capsule being auto-resumed, so concurrent traffic resumes it once.
#[derive(Debug, Default)]
pub struct Resumes {
    locks: std::sync::Mutex<HashMap<String, std::sync::Arc<tokio::sync::Mutex<()>>>>,
}

impl Resumes {
    fn lock_for(&self, id: &str) -> std::sync::Arc<tokio::sync::Mutex<()>> {
        let mut m = self.locks.lock().unwrap_or_else(|p| p.into_inner());
        m.entry(id.to_owned()).or_default().clone()
    }

    /// Forgets the lock when no one else waits on it.
    fn done(&self, id: &str, lock: std::sync::Arc<tokio::sync::Mutex<()>>) {
        let mut m = self.locks.lock().unwrap_or_else(|p| p.into_inner());
        // The map's reference and ours: nobody else holds or waits for it.
        if std::sync::Arc::strong_count(&lock) <= 2 {
            m.remove(id);
        }
    }
}

async fn touch_now(state: &AppState, c: &Capsule) {
    state.activity.forget(c.id.as_str());
    touch(state, c).await;
}

/// Destroys a capsule of any live status; the row stays, `stopped`.
pub async fn destroy(
    state: &AppState,
    actor: &Actor,
    actor_name: Option<String>,
    c: &Capsule,
) -> ApiResult<()> {
    state
        .streams
        .end(c.id.as_str(), crate::proxy::EndReason::Killed);
    let agent = state
        .agent_of(c)
        .inspect_err(|_| state.streams.revive(c.id.as_str()))?;
    state.guests.forget(&c.id);
    let result = match agent.destroy(&c.id).await {
        Ok(()) => Ok(()),
        Err(e) if e.kind == HostErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    };
    let ok = result.is_ok();
    if !ok {
        state.streams.revive(c.id.as_str());
    }
    if ok {
        set_status(state, c, CapsuleStatus::Stopped).await?;
        state.activity.forget(c.id.as_str());
    }
    state
        .audit_team(
            &c.team_id,
            actor.clone(),
            actor_name,
            "capsule.destroy",
            "capsule",
            Some(c.id.as_str()),
            ok,
            None,
        )
        .await;
    result.map_err(ApiError::from)
}

/// Snapshots a running capsule as the team's template `name`.
pub async fn snapshot(
    state: &AppState,
    who: &Principal,
    c: &Capsule,
    name: &str,
) -> ApiResult<wrenn_db::Template> {
    snapshot_with(state, who, c, name, false).await
}

/// [`snapshot`]; with `overwrite`, an existing snapshot `name` of the team is replaced:
/// the new one is written first and swapped in, and only then is the old one removed,
/// so a failure leaves the old snapshot as it was.
pub async fn snapshot_with(
    state: &AppState,
    who: &Principal,
    c: &Capsule,
    name: &str,
    overwrite: bool,
) -> ApiResult<wrenn_db::Template> {
    snapshot_as(state, who, c, name, overwrite, Map::new(), false).await
}

/// [`snapshot_with`], the template row also carrying `extra` metadata (a built
/// template's defaults); `disk_only` saves the disk alone (capsules cold-boot it).
pub async fn snapshot_as(
    state: &AppState,
    who: &Principal,
    c: &Capsule,
    name: &str,
    overwrite: bool,
    extra: Map<String, Value>,
    disk_only: bool,
) -> ApiResult<wrenn_db::Template> {
    let parsed = snapshot_target(c, name)?;
    let agent = state.agent_of(c)?;
    if agent.template(name).await.is_ok() && !is_private_host_template(name) {
        return Err(ApiError::conflict(
            "name_reserved",
            format!("{name} is a platform template"),
        ));
    }
    let replaces = state.db.get_template(&who.team_id, name).await.is_ok();
    if replaces && !overwrite {
        return Err(ApiError::conflict(
            "template_name_taken",
            format!("template {name} already exists"),
        ));
    }
    let _reserved = state
        .quotas
        .reserve(
            &state.db,
            &who.team_id,
            crate::quota::Ask {
                snapshots: u64::from(!replaces),
                ..Default::default()
            },
        )
        .await?;
    let host_name = format!("snap-{}", wrenn_core::id::base36(rand::random::<u128>()));
    let result = if disk_only {
        agent.snapshot_disk(&c.id, &host_name).await
    } else {
        agent.snapshot(&c.id, &host_name).await
    };
    let ht = match result {
        Ok(t) => t,
        Err(e) => {
            state
                .audit(who, "snapshot.create", "snapshot", Some(name), false, None)
                .await;
            return Err(e.into());
        }
    };
    let mut metadata = extra;
    metadata.insert(HOST_TEMPLATE_KEY.into(), host_name.clone().into());
    let new = wrenn_db::NewTemplate {
        name: parsed,
        kind: wrenn_db::TemplateKind::Snapshot,
        source_capsule: Some(c.id.to_string()),
        vcpus: ht.vcpus.or(Some(c.vcpus)),
        memory_mb: ht.memory_mb.or(Some(c.memory_mb)),
        size_bytes: ht.size_bytes,
        metadata,
        // The capsule's host holds the snapshot's files.
        host_id: Some(c.host_id.clone()),
    };
    let stored = if replaces {
        state
            .db
            .replace_template(&who.team_id, new)
            .await
            .map(|(old, row)| (Some(old), row))
    } else {
        state
            .db
            .insert_template(&who.team_id, new)
            .await
            .map(|row| (None, row))
    };
    let (old, row) = match stored {
        Ok(t) => t,
        Err(e) => {
            let _ = agent.delete_template(&host_name).await;
            return Err(ApiError::from(e));
        }
    };
    // The old snapshot's files (and their copies) go only once the new one is in
    // place.
    if let Some((old_host, holder, t)) = old.as_ref().and_then(|t| {
        let name = t.metadata.get(HOST_TEMPLATE_KEY).and_then(Value::as_str)?;
        Some((name, holder_of(state, t), t))
    }) {
        let copies = state.db.template_copies(&t.id).await.unwrap_or_default();
        if let Err(e) = remove_everywhere(state, &t.id, old_host, holder, &copies).await {
            tracing::warn!(template = name, host = old_host, error = %e,
                "replaced snapshot's files not removed everywhere");
        }
    }
    state
        .audit(
            who,
            "snapshot.create",
            "snapshot",
            Some(name),
            true,
            Some(serde_json::json!({"capsule": c.id.as_str(), "replaced": old.is_some()})),
        )
        .await;
    Ok(row)
}

/// The template name a snapshot of `c` is saved as, once `c` may be snapshotted
/// (it runs) and `name` is a template name.
fn snapshot_target(c: &Capsule, name: &str) -> ApiResult<wrenn_core::template::TemplateName> {
    if c.status != CapsuleStatus::Running {
        return Err(ApiError::invalid_state(format!(
            "capsule {} is {}; snapshot needs it running",
            c.id, c.status
        )));
    }
    wrenn_core::template::TemplateName::parse(name)
        .map_err(|e| ApiError::invalid(format!("name: {e}")))
}

/// Saves capsule `c` (a platform build's) as platform template `name` on its host: the
/// host's files are the template, as a built-in one's are, so every team may create
/// capsules from it there. No team's row is written. `disk_only` as for
/// [`snapshot_as`].
pub async fn snapshot_platform(
    state: &AppState,
    who: &Principal,
    c: &Capsule,
    name: &str,
    build_id: &str,
    disk_only: bool,
) -> ApiResult<()> {
    snapshot_target(c, name)?;
    let agent = state.agent_of(c)?;
    if agent.template(name).await.is_ok() {
        return Err(ApiError::conflict(
            "name_reserved",
            format!("{name} is already a platform template"),
        ));
    }
    let result = if disk_only {
        agent.snapshot_disk(&c.id, name).await
    } else {
        agent.snapshot(&c.id, name).await
    };
    state
        .audit(
            who,
            "template.platform.create",
            "template",
            Some(name),
            result.is_ok(),
            Some(serde_json::json!({
                "capsule": c.id.as_str(),
                "host": c.host_id.0.as_str(),
                "build": build_id,
            })),
        )
        .await;
    result.map(|_| ()).map_err(ApiError::from)
}

/// The host holding a snapshot template's files (rows from before hosts were recorded
/// name none: the only host there was).
fn holder_of(
    state: &AppState,
    t: &wrenn_db::Template,
) -> Result<std::sync::Arc<HostConn>, HostError> {
    match &t.host_id {
        Some(id) => state.hosts.get(id),
        None => state.hosts.any(),
    }
}

pub async fn delete_snapshot(state: &AppState, who: &Principal, name: &str) -> ApiResult<()> {
    let t = state.db.get_template(&who.team_id, name).await?;
    if let Some(host) = t.metadata.get(HOST_TEMPLATE_KEY).and_then(Value::as_str) {
        // Every host holding it removes its files; the row goes only then.
        let copies = state.db.template_copies(&t.id).await?;
        if let Err(e) = remove_everywhere(state, &t.id, host, holder_of(state, &t), &copies).await {
            state
                .audit(who, "snapshot.delete", "snapshot", Some(name), false, None)
                .await;
            return Err(e.into());
        }
    }
    state.db.delete_template(&who.team_id, name).await?;
    state
        .audit(who, "snapshot.delete", "snapshot", Some(name), true, None)
        .await;
    Ok(())
}

/// Forks a running capsule; each fork gets its own row.
pub async fn fork(
    state: &AppState,
    who: &Principal,
    c: &Capsule,
    count: usize,
    timeout_sec: u32,
) -> ApiResult<Vec<Capsule>> {
    if c.status != CapsuleStatus::Running {
        return Err(ApiError::invalid_state(format!(
            "capsule {} is {}; fork needs it running",
            c.id, c.status
        )));
    }
    let n = count as u64;
    state.quotas.check_fork_count(n)?;
    let _reserved = state
        .quotas
        .reserve(
            &state.db,
            &who.team_id,
            crate::quota::Ask::capsules(
                n,
                u64::from(c.vcpus),
                u64::from(c.memory_mb),
                disk_size_mb(c),
            ),
        )
        .await?;
    let host = state.host_of(c)?;
    let mut labels = HashMap::new();
    labels.insert(TEAM_LABEL.to_string(), who.team_id.clone());
    let forks = host
        .agent
        .fork(&c.id, count, labels)
        .await
        .map_err(ApiError::from);
    let forks = match forks {
        Ok(f) => f,
        Err(e) => {
            state
                .audit(
                    who,
                    "capsule.fork",
                    "capsule",
                    Some(c.id.as_str()),
                    false,
                    None,
                )
                .await;
            return Err(e);
        }
    };
    let mut user_meta = c.metadata.clone();
    for k in RESERVED_METADATA {
        user_meta.remove(*k);
    }
    let mut rows = Vec::new();
    for hc in forks {
        rows.push(
            record(
                state,
                who,
                &host,
                &hc,
                &c.template,
                &user_meta,
                TimeoutPolicy {
                    sec: timeout_sec,
                    pause: c.pause_on_timeout,
                    deadline: c.deadline,
                    pause_memory: c.timeout_pause_memory,
                    auto_resume: c.auto_resume,
                },
                // Forks keep the parent's egress policy (the host applies it) and
                // port privacy, with tokens of their own.
                &NetworkParams {
                    egress: c.network.clone(),
                    private_ports: !c.public_traffic,
                },
            )
            .await?,
        );
        state
            .audit(
                who,
                "capsule.fork",
                "capsule",
                Some(hc.id.as_str()),
                true,
                Some(serde_json::json!({"from": c.id.as_str()})),
            )
            .await;
    }
    Ok(rows)
}

/// A new traffic access token (the `e2b-traffic-access-token` of private ports).
/// The capsule's traffic access token, when its ports are private.
pub async fn traffic_token(state: &AppState, c: &Capsule) -> ApiResult<Option<String>> {
    if c.public_traffic {
        return Ok(None);
    }
    let Some(sealed) = state.db.capsule_traffic_token(c.id.as_str()).await? else {
        return Ok(None);
    };
    state
        .tokens
        .open(c.id.as_str(), &sealed)
        .map(Some)
        .map_err(|_| ApiError::internal("the capsule's traffic token cannot be read"))
}

/// Replaces the egress policy of a running or paused capsule: the host enforces
/// it before this returns (a paused capsule resumes with it).
pub async fn set_network(
    state: &AppState,
    who: &Principal,
    c: &Capsule,
    policy: EgressPolicy,
) -> ApiResult<Capsule> {
    let r = state.agent_of(c)?.set_network(&c.id, policy.clone()).await;
    let ok = r.is_ok();
    state
        .audit(
            who,
            "capsule.network",
            "capsule",
            Some(c.id.as_str()),
            ok,
            Some(serde_json::to_value(&policy).unwrap_or_default()),
        )
        .await;
    r?;
    let row = state
        .db
        .set_capsule_network(&who.team_id, c.id.as_str(), &policy)
        .await?;
    state.capsule_cache.invalidate(c.id.as_str());
    Ok(row)
}

/// Maps a host error of a guest call.
pub fn guest_err(e: wrenn_core::guest::AgentError) -> ApiError {
    crate::agent::guest_error(&e).into()
}

pub fn host_err(e: HostError) -> ApiError {
    e.into()
}
