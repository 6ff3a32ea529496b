//! Template builds: workers that run recipes in capsules and save the result as the
//! team's template.
//!
//! A build is queued in the database (`template_builds`); each server's workers claim
//! queued builds (one winner per build across servers) and run them:
//!
//! 1. a capsule of the base template (a capsule row of the team marked with
//!    [`BUILD_METADATA_KEY`], so reconciliation keeps it and quotas count it);
//! 2. the pre-build phase (package index update, best effort) unless skipped;
//! 3. the steps, in order, each logged line by line;
//! 4. the post-build phase (package caches cleaned) unless skipped;
//! 5. the readiness check, retried until it passes;
//! 6. envd's defaults (the final `USER`, `WORKDIR` and `ENV`) set, and the capsule
//!    saved as a snapshot template: a create restores it with its start commands
//!    running.
//!
//! The capsule is destroyed whatever happens. A worker touches its build while it runs;
//! a build whose worker went silent (its server was killed) is failed by any server's
//! sweep, which destroys its capsule.

use crate::auth::Principal;
use crate::error::ApiError;
use crate::service::{self, CreateParams};
use crate::state::AppState;
use bytes::Bytes;
use serde_json::{Map, Value};
use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};
use wrenn_core::guest::{ExecEvent, ExecRequest, GuestAgent, GuestInit};
use wrenn_db::{Actor, Build, BuildEnd, BuildStatus, Capsule, LogStream};
use wrenn_recipe::{Check, Healthcheck, Step};

/// Metadata key of a build's capsule: the build's id.
pub const BUILD_METADATA_KEY: &str = "wrenn.build";
/// Template metadata keys of a built template's defaults.
pub const DEFAULT_ENV_KEY: &str = "default_env";
pub const DEFAULT_USER_KEY: &str = "default_user";
pub const DEFAULT_WORKDIR_KEY: &str = "default_workdir";
/// Build metadata keys: the user and working directory the steps start with (else
/// root in `/`).
pub const START_USER_KEY: &str = "start_user";
pub const START_WORKDIR_KEY: &str = "start_workdir";
/// Build metadata key of a platform build (`true`): the result is saved on the host
/// under the build's name, a template of every team, instead of as the team's
/// snapshot template.
pub const PLATFORM_KEY: &str = "platform";

/// Build metadata key of a build from a container image (`true`): its
/// `base_template` is the image reference.
pub const BASE_IMAGE_KEY: &str = "base_image";
/// Build metadata key of the image registry's credentials, sealed.
pub const REGISTRY_KEY: &str = "registry";

/// Build metadata key of what the build saves: [`RESULT_DISK`] for a disk-only
/// template (else a snapshot template).
pub const RESULT_KEY: &str = "result";
pub const RESULT_DISK: &str = "disk";

/// `snapshot` or `disk`: what build `b` saves.
pub fn result_kind(b: &Build) -> &'static str {
    if b.metadata.get(RESULT_KEY).and_then(Value::as_str) == Some(RESULT_DISK) {
        RESULT_DISK
    } else {
        "snapshot"
    }
}

/// Whether `b` starts from a container image.
pub fn is_image(b: &Build) -> bool {
    b.metadata.get(BASE_IMAGE_KEY).and_then(Value::as_bool) == Some(true)
}

/// What the registry credentials of `image` are sealed for: they open for that image
/// only.
pub fn registry_aad(image: &str) -> String {
    format!("registry credentials for {image}")
}

/// The host request for `image` under this server's policy.
pub fn image_spec(
    st: &AppState,
    image: &str,
    login: Option<crate::v1::builds::RegistryLogin>,
) -> wrenn_core::host::ImageSpec {
    let (username, password) = match login {
        Some(l) => (Some(l.username), Some(l.password)),
        None => (None, None),
    };
    wrenn_core::host::ImageSpec {
        image: image.to_string(),
        username,
        password,
        allow_private: st.config.builds.registry_allow_private,
    }
}

/// Whether `b` builds a platform template.
pub fn is_platform(b: &Build) -> bool {
    b.metadata.get(PLATFORM_KEY).and_then(Value::as_bool) == Some(true)
}

/// Lines kept of one output line.
const MAX_LINE: usize = 4096;
/// Lines of a failed step's log tail in the build's error.
const ERROR_TAIL: usize = 10;

/// Settings of the build workers.
#[derive(Clone, Debug)]
pub struct BuildConfig {
    /// Builds run at once by this server.
    pub workers: usize,
    /// Pre-build phase (as root; a failure is logged, not fatal).
    pub pre_build: String,
    /// Post-build phase (as root; a failure is logged, not fatal).
    pub post_build: String,
    /// A running build not heard from for this long is failed by the sweep (its
    /// worker touches it six times as often).
    pub stale_after: Duration,
    /// Base images may come from registries at private and loopback addresses.
    pub registry_allow_private: bool,
}

impl Default for BuildConfig {
    fn default() -> Self {
        BuildConfig {
            workers: 2,
            pre_build:
                "if command -v apt-get >/dev/null 2>&1; then \
                        apt-get update -q || echo 'package index update failed; continuing' >&2; fi"
                    .into(),
            post_build: "if command -v apt-get >/dev/null 2>&1; then \
                         apt-get clean; rm -rf /var/lib/apt/lists/*; fi; true"
                .into(),
            stale_after: Duration::from_secs(60),
            registry_allow_private: false,
        }
    }
}

/// The build workers' shared state: woken when a build is queued.
#[derive(Debug, Default)]
pub struct Builders {
    wake: tokio::sync::Notify,
}

impl Builders {
    /// A build was queued: a free worker takes it now rather than at its next look.
    pub fn queued(&self) {
        self.wake.notify_one();
    }
}

/// Starts the build workers and the sweep of abandoned builds.
pub fn spawn_builders(st: Arc<AppState>) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let slots = Arc::new(tokio::sync::Semaphore::new(st.config.builds.workers.max(1)));
        let stale_after = st.config.builds.stale_after;
        let mut last_sweep: Option<Instant> = None;
        loop {
            if last_sweep.is_none_or(|t| t.elapsed() >= stale_after / 2) {
                sweep(&st).await;
                last_sweep = Some(Instant::now());
            }
            while let Ok(permit) = slots.clone().try_acquire_owned() {
                match st.db.claim_build().await {
                    Ok(Some(b)) => {
                        let st = st.clone();
                        tokio::spawn(async move {
                            run(&st, b).await;
                            drop(permit);
                            st.builders.queued();
                        });
                    }
                    Ok(None) => break,
                    Err(e) => {
                        tracing::warn!(error = %e, "cannot claim a build");
                        break;
                    }
                }
            }
            let _ = tokio::time::timeout(Duration::from_secs(2), st.builders.wake.notified()).await;
        }
    })
}

/// How long files uploaded for E2B's template builder, and build requests whose steps
/// never came, are kept.
const UPLOADS_KEPT: Duration = Duration::from_secs(24 * 3600);

/// Fails running builds whose worker went silent and destroys their capsules; forgets
/// old uploads and build requests.
async fn sweep(st: &AppState) {
    match st
        .db
        .expire_template_uploads(wrenn_db::now() - UPLOADS_KEPT)
        .await
    {
        Ok(0) => {}
        Ok(n) => tracing::info!(rows = n, "expired template uploads and build requests"),
        Err(e) => tracing::warn!(error = %e, "template uploads not expired"),
    }
    let Ok(stale) = st
        .db
        .stale_builds(wrenn_db::now() - st.config.builds.stale_after)
        .await
    else {
        return;
    };
    for b in stale {
        tracing::warn!(build = %b.id, "build abandoned by its worker: failing it");
        if let Some(c) = build_capsule(st, &b).await {
            let _ = service::destroy(st, &Actor::System, None, &c).await;
        }
        let _ = st
            .db
            .finish_build(
                &b.id,
                failed("the server running the build stopped while it ran".into()),
            )
            .await;
    }
}

/// The build's capsule, if it still lives.
async fn build_capsule(st: &AppState, b: &Build) -> Option<Capsule> {
    let id = b.capsule_id.as_deref()?;
    let c = st.db.get_capsule(&b.team_id, id).await.ok()?;
    (c.status != wrenn_core::status::CapsuleStatus::Stopped).then_some(c)
}

fn failed(error: String) -> BuildEnd {
    BuildEnd {
        status: BuildStatus::Failed,
        error: Some(error),
        template_id: None,
        default_user: None,
        default_env: Map::new(),
    }
}

/// Why a build stopped early.
#[derive(Debug)]
enum Stop {
    Failed(String),
    Cancelled(String),
}

impl From<ApiError> for Stop {
    fn from(e: ApiError) -> Self {
        Stop::Failed(e.message)
    }
}

/// The build's log: lines buffered and written in batches.
struct Log {
    st: Arc<AppState>,
    id: String,
    seq: u64,
    step: u32,
    buf: Vec<(u32, LogStream, String)>,
    flushed: Instant,
    /// The last lines of the current step, for a failure's message.
    tail: std::collections::VecDeque<String>,
}

impl Log {
    fn line(&mut self, stream: LogStream, mut line: String) {
        if line.len() > MAX_LINE {
            let mut end = MAX_LINE;
            while !line.is_char_boundary(end) {
                end -= 1;
            }
            line.truncate(end);
        }
        if stream != LogStream::System {
            if self.tail.len() == ERROR_TAIL {
                self.tail.pop_front();
            }
            self.tail.push_back(line.clone());
        }
        self.buf.push((self.step, stream, line));
    }

    fn system(&mut self, line: impl Into<String>) {
        self.line(LogStream::System, line.into());
    }

    async fn flush(&mut self) {
        if self.buf.is_empty() {
            return;
        }
        let lines = std::mem::take(&mut self.buf);
        if let Err(e) = self
            .st
            .db
            .append_build_logs(&self.id, self.seq, &lines)
            .await
        {
            tracing::warn!(build = %self.id, error = %e, "build log lines lost");
        }
        self.seq += lines.len() as u64;
        self.flushed = Instant::now();
    }

    async fn maybe_flush(&mut self) {
        if self.buf.len() >= 64 || self.flushed.elapsed() >= Duration::from_millis(500) {
            self.flush().await;
        }
    }
}

/// Splits output chunks into lines.
#[derive(Default)]
struct Lines(Vec<u8>);

impl Lines {
    fn push(&mut self, chunk: &[u8], mut out: impl FnMut(String)) {
        self.0.extend_from_slice(chunk);
        while let Some(i) = self.0.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = self.0.drain(..=i).collect();
            out(String::from_utf8_lossy(&line[..i])
                .trim_end_matches('\r')
                .to_string());
        }
        if self.0.len() > MAX_LINE {
            let line: Vec<u8> = std::mem::take(&mut self.0);
            out(String::from_utf8_lossy(&line).into_owned());
        }
    }

    fn finish(&mut self, out: impl FnOnce(String)) {
        if !self.0.is_empty() {
            out(String::from_utf8_lossy(&std::mem::take(&mut self.0)).into_owned());
        }
    }
}

/// What the steps so far have set.
#[derive(Clone, Debug)]
struct Context {
    env: Vec<(String, String)>,
    user: String,
    workdir: String,
    /// Set by a `USER` / `WORKDIR` step (else the base template's defaults stay).
    user_set: bool,
    workdir_set: bool,
    started: bool,
}

impl Context {
    fn envs(&self) -> HashMap<String, String> {
        self.env.iter().cloned().collect()
    }

    fn set_env(&mut self, k: String, v: String) {
        match self.env.iter_mut().find(|(key, _)| *key == k) {
            Some(e) => e.1 = v,
            None => self.env.push((k, v)),
        }
    }
}

/// Where an image's steps start, and what its template keeps: the image's `ENV`,
/// `WORKDIR` and (a named) `USER`, as a container of it would run.
fn image_defaults(ctx: &mut Context, img: &wrenn_core::host::HostImage) {
    for kv in &img.env {
        if let Some((k, v)) = kv.split_once('=') {
            ctx.set_env(k.to_string(), v.to_string());
        }
    }
    if img.working_dir.starts_with('/') {
        ctx.workdir = img.working_dir.clone();
        ctx.workdir_set = true;
    }
    // A user given by number (or user:group) has no name envd could run as: the
    // capsule's default user stays.
    let user = img.user.as_str();
    if !user.is_empty() && !user.contains(':') && !user.chars().all(|c| c.is_ascii_digit()) {
        ctx.user = user.to_string();
        ctx.user_set = true;
    }
}

/// One build, start to end.
struct Run {
    st: Arc<AppState>,
    build: Build,
    who: Principal,
    log: Log,
    deadline: Instant,
    capsule: Option<Capsule>,
    guest: Option<Arc<dyn GuestAgent>>,
    /// The build's uploaded files, read once at its first `COPY`.
    files: Option<Arc<Vec<wrenn_db::BuildFile>>>,
}

async fn run(st: &Arc<AppState>, build: Build) {
    let who = Principal {
        team_id: build.team_id.clone(),
        actor: match &build.created_by {
            Some(id) => Actor::User { id: id.clone() },
            None => Actor::System,
        },
        actor_name: None,
        user: None,
    };
    let heartbeat = {
        let (st, id) = (st.clone(), build.id.clone());
        let every = st.config.builds.stale_after / 6;
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(every).await;
                let _ = st.db.touch_build(&id).await;
            }
        })
    };
    let mut r = Run {
        st: st.clone(),
        deadline: Instant::now() + Duration::from_secs(u64::from(build.timeout_sec)),
        log: Log {
            st: st.clone(),
            id: build.id.clone(),
            seq: 0,
            step: 0,
            buf: Vec::new(),
            flushed: Instant::now(),
            tail: Default::default(),
        },
        build,
        who,
        capsule: None,
        guest: None,
        files: None,
    };
    tracing::info!(build = %r.build.id, name = %r.build.name, "build started");
    let result = r.execute().await;
    let end = match result {
        Ok(end) => {
            r.log.system(format!("built template {}", r.build.name));
            end
        }
        Err(Stop::Failed(e)) => {
            r.log.system(format!("build failed: {e}"));
            failed(e)
        }
        Err(Stop::Cancelled(e)) => {
            r.log.system(format!("build cancelled: {e}"));
            BuildEnd {
                status: BuildStatus::Cancelled,
                ..failed(e)
            }
        }
    };
    if let Some(c) = r.capsule.take() {
        if let Err(e) = service::destroy(st, &Actor::System, None, &c).await {
            tracing::warn!(build = %r.build.id, capsule = %c.id, error = %e.message,
                "build capsule not destroyed; the sweep retries");
        }
    }
    r.log.flush().await;
    heartbeat.abort();
    tracing::info!(build = %r.build.id, status = end.status.as_str(), "build ended");
    if let Err(e) = st.db.finish_build(&r.build.id, end).await {
        tracing::warn!(build = %r.build.id, error = %e, "build end not recorded");
    }
}

impl Run {
    async fn execute(&mut self) -> Result<BuildEnd, Stop> {
        let b = self.build.clone();
        let steps = wrenn_recipe::parse_steps(&b.recipe)
            .map_err(|e| Stop::Failed(format!("recipe: {e}")))?;
        let healthcheck = b
            .healthcheck
            .as_deref()
            .map(wrenn_recipe::parse_healthcheck)
            .transpose()
            .map_err(|e| Stop::Failed(format!("healthcheck: {e}")))?;

        let image = if is_image(&b) {
            Some(self.import_base().await?)
        } else {
            None
        };
        self.check_stop().await?;
        self.log
            .system(format!("starting a capsule of {}", b.base_template));
        self.log.flush().await;
        let mut metadata = Map::new();
        metadata.insert(BUILD_METADATA_KEY.into(), Value::String(b.id.clone()));
        let c = service::create(
            &self.st,
            &self.who,
            CreateParams {
                template: Some(b.base_template.clone()),
                vcpus: Some(b.vcpus),
                memory_mb: Some(b.memory_mb),
                timeout_sec: 0,
                pause_on_timeout: false,
                deadline: false,
                timeout_pause_memory: false,
                auto_resume: false,
                metadata,
                envs: HashMap::new(),
                network: Default::default(),
                e2b: false,
                image_base: image.as_ref().map(|(img, host)| service::ImageBase {
                    image: b.base_template.clone(),
                    host_template: img.template.clone(),
                    host: host.clone(),
                }),
            },
        )
        .await?;
        let _ = self
            .st
            .db
            .build_progress(&b.id, 0, Some((c.id.as_str(), c.host_id.0.as_str())))
            .await;
        self.guest = Some(self.st.guest(&c).await.map_err(service::host_err)?);
        self.capsule = Some(c);

        // Steps run as root in `/` (or as the build says) until the recipe says
        // otherwise.
        let mut ctx = root_at("/");
        if let Some((img, _)) = &image {
            image_defaults(&mut ctx, img);
        }
        if let Some(user) = b.metadata.get(START_USER_KEY).and_then(Value::as_str) {
            ctx.user = user.to_string();
        }
        if let Some(dir) = b.metadata.get(START_WORKDIR_KEY).and_then(Value::as_str) {
            ctx.workdir = dir.to_string();
        }
        if !b.skip_pre_post {
            self.log.system("pre-build");
            let cmd = self.st.config.builds.pre_build.clone();
            self.phase(&cmd).await?;
        }
        let total = steps.len();
        for (i, (step, line)) in steps.iter().zip(&b.recipe).enumerate() {
            self.check_stop().await?;
            self.log.step = u32::try_from(i + 1).unwrap_or(u32::MAX);
            self.log.tail.clear();
            self.log.system(format!("step {}/{total}: {line}", i + 1));
            self.log.flush().await;
            let _ = self
                .st
                .db
                .build_progress(&b.id, self.log.step - 1, None)
                .await;
            self.step(step, &mut ctx).await.map_err(|stop| match stop {
                Stop::Failed(e) => Stop::Failed(format!("step {} ({line}): {e}", i + 1)),
                other => other,
            })?;
        }
        let _ = self
            .st
            .db
            .build_progress(&b.id, u32::try_from(total).unwrap_or(u32::MAX), None)
            .await;
        self.log.step = u32::try_from(total + 1).unwrap_or(u32::MAX);
        if !b.skip_pre_post {
            self.log.system("post-build");
            let cmd = self.st.config.builds.post_build.clone();
            self.phase(&cmd).await?;
        }
        if let Some(hc) = &healthcheck {
            self.wait_ready(hc, &ctx).await?;
        }
        self.check_stop().await?;

        // The template's defaults: envd keeps them in the saved memory.
        let c = self
            .capsule
            .clone()
            .ok_or_else(|| Stop::Failed("no capsule".into()))?;
        let token = service::envd_token(&self.st, &c).await?;
        self.guest()?
            .init(&GuestInit {
                access_token: token,
                env_vars: ctx.envs(),
                default_user: ctx.user_set.then(|| ctx.user.clone()),
                default_workdir: ctx.workdir_set.then(|| ctx.workdir.clone()),
                timestamp: Some(std::time::SystemTime::now()),
                entropy: None,
            })
            .await
            .map_err(|e| Stop::Failed(format!("setting the template's defaults: {e}")))?;
        if !ctx.started && healthcheck.is_none() {
            self.log
                .system("no start command: the template is saved without running services");
        }
        self.log.system(format!(
            "saving template {} ({})",
            b.name,
            if result_kind(&b) == RESULT_DISK {
                "disk only"
            } else {
                "memory and disk"
            }
        ));
        self.log.flush().await;
        let env_map: Map<String, Value> = ctx
            .env
            .iter()
            .map(|(k, v)| (k.clone(), Value::String(v.clone())))
            .collect();
        let mut extra = Map::new();
        extra.insert(DEFAULT_ENV_KEY.into(), Value::Object(env_map.clone()));
        if ctx.user_set {
            extra.insert(DEFAULT_USER_KEY.into(), Value::String(ctx.user.clone()));
        }
        if ctx.workdir_set {
            extra.insert(
                DEFAULT_WORKDIR_KEY.into(),
                Value::String(ctx.workdir.clone()),
            );
        }
        extra.insert("build_id".into(), Value::String(b.id.clone()));
        let disk_only = result_kind(&b) == RESULT_DISK;
        if disk_only {
            extra.insert(RESULT_KEY.into(), Value::String(RESULT_DISK.into()));
        }
        let template_id = if is_platform(&b) {
            service::snapshot_platform(&self.st, &self.who, &c, &b.name, &b.id, disk_only).await?;
            None
        } else {
            let t = service::snapshot_as(&self.st, &self.who, &c, &b.name, true, extra, disk_only)
                .await?;
            Some(t.id)
        };
        Ok(BuildEnd {
            status: BuildStatus::Success,
            error: None,
            template_id,
            default_user: ctx.user_set.then(|| ctx.user.clone()),
            default_env: env_map,
        })
    }

    /// Pulls the build's base image on the host that will run the build: the host
    /// template made of it, and the host.
    async fn import_base(
        &mut self,
    ) -> Result<(wrenn_core::host::HostImage, wrenn_core::scheduler::HostId), Stop> {
        let b = self.build.clone();
        let login = match b.metadata.get(REGISTRY_KEY).and_then(Value::as_str) {
            Some(sealed) => {
                let clear = self
                    .st
                    .channel_sealer
                    .open(&registry_aad(&b.base_template), sealed)
                    .map_err(|_| {
                        Stop::Failed("the registry credentials cannot be opened".into())
                    })?;
                Some(
                    serde_json::from_str::<crate::v1::builds::RegistryLogin>(&clear)
                        .map_err(|e| Stop::Failed(format!("registry credentials: {e}")))?,
                )
            }
            None => None,
        };
        let req = wrenn_core::scheduler::PlacementRequest {
            team: b.team_id.clone(),
            template: String::new(),
            vcpus: u64::from(b.vcpus),
            memory_mb: u64::from(b.memory_mb),
            disk_mb: 0,
            tags: Default::default(),
        };
        let host = self
            .st
            .hosts
            .place(&req, None)
            .await
            .map_err(|e| Stop::Failed(format!("no host for the build: {}", e.message)))?
            .host()
            .clone();
        self.log
            .system(format!("pulling {} on host {}", b.base_template, host.id));
        self.log.flush().await;
        let spec = image_spec(&self.st, &b.base_template, login);
        let left = self.deadline.saturating_duration_since(Instant::now());
        let img = match tokio::time::timeout(left, host.agent.import_image(spec)).await {
            Ok(r) => r.map_err(|e| Stop::Failed(format!("base image: {}", e.message)))?,
            Err(_) => {
                return Err(Stop::Cancelled(format!(
                    "the build exceeded its time limit of {} s while pulling its image",
                    b.timeout_sec
                )))
            }
        };
        let mib = |b: u64| b as f64 / f64::from(1 << 20);
        if img.cached {
            self.log.system(format!(
                "image {} ({}) is on the host already",
                img.image, img.digest
            ));
        } else {
            self.log.system(format!(
                "pulled {} ({}): {} layers, {:.1} MiB in {:.1} s; applied ({:.1} MiB) in {:.1} s; root image made in {:.1} s",
                img.image,
                img.digest,
                img.layers,
                mib(img.layer_bytes),
                img.pull_secs,
                mib(img.unpacked_bytes),
                img.unpack_secs,
                img.image_secs
            ));
        }
        self.log.flush().await;
        Ok((img, host.id.clone()))
    }

    fn guest(&self) -> Result<Arc<dyn GuestAgent>, Stop> {
        self.guest
            .clone()
            .ok_or_else(|| Stop::Failed("no capsule".into()))
    }

    /// Cancelled by a user, or past the build's time limit.
    async fn check_stop(&self) -> Result<(), Stop> {
        if Instant::now() >= self.deadline {
            return Err(Stop::Cancelled(format!(
                "the build exceeded its time limit of {} s",
                self.build.timeout_sec
            )));
        }
        match self.st.db.get_build(None, &self.build.id).await {
            Ok(b) if b.cancel_requested => Err(Stop::Cancelled("cancelled on request".into())),
            _ => Ok(()),
        }
    }

    /// A pre- or post-build phase: as root, failures logged only.
    async fn phase(&mut self, cmd: &str) -> Result<(), Stop> {
        let ctx = root_at("/");
        match self.sh(cmd, &ctx, Duration::from_secs(300)).await {
            Ok(0) => Ok(()),
            Ok(code) => {
                self.log
                    .system(format!("phase exited with code {code}; continuing"));
                Ok(())
            }
            Err(Stop::Failed(e)) => {
                self.log.system(format!("phase failed ({e}); continuing"));
                Ok(())
            }
            Err(stop) => Err(stop),
        }
    }

    async fn step(&mut self, step: &Step, ctx: &mut Context) -> Result<(), Stop> {
        match step {
            Step::Run { cmd, timeout, user } => {
                let code = match user {
                    Some(u) => {
                        self.check_user(u).await?;
                        let as_user = Context {
                            user: u.clone(),
                            ..ctx.clone()
                        };
                        self.sh(cmd, &as_user, *timeout).await?
                    }
                    None => self.sh(cmd, ctx, *timeout).await?,
                };
                if code != 0 {
                    let tail: Vec<String> = self.log.tail.iter().cloned().collect();
                    return Err(Stop::Failed(format!(
                        "exited with code {code}{}",
                        if tail.is_empty() {
                            String::new()
                        } else {
                            format!("; last lines:\n{}", tail.join("\n"))
                        }
                    )));
                }
            }
            Step::Env { vars } => {
                for (k, v) in vars {
                    ctx.set_env(k.clone(), v.clone());
                }
            }
            Step::Workdir { path } => {
                let path = wrenn_recipe::resolve(&ctx.workdir, path);
                let q = shell_words::quote(&path);
                let owner = if ctx.user == "root" {
                    String::new()
                } else {
                    format!(" && chown {}: {q}", shell_words::quote(&ctx.user))
                };
                self.root(&format!("mkdir -p {q}{owner}")).await?;
                ctx.workdir = path;
                ctx.workdir_set = true;
            }
            Step::User { name } => {
                self.check_user(name).await?;
                ctx.user = name.clone();
                ctx.user_set = true;
            }
            Step::Copy {
                srcs,
                dst,
                owner,
                mode,
            } => {
                if let Some(o) = owner {
                    self.check_user(o).await?;
                }
                let owner = owner.as_deref().unwrap_or(&ctx.user);
                self.copy(srcs, dst, &ctx.workdir, owner, *mode).await?
            }
            Step::Start { cmd } => {
                // Detached from envd's process table: it keeps running in the template.
                let script = format!(
                    "nohup setsid sh -c {} >>/tmp/wrenn-start.log 2>&1 </dev/null &",
                    shell_words::quote(cmd)
                );
                let code = self.sh(&script, ctx, Duration::from_secs(30)).await?;
                if code != 0 {
                    return Err(Stop::Failed(format!(
                        "could not start it (exit code {code})"
                    )));
                }
                ctx.started = true;
            }
        }
        Ok(())
    }

    /// Fails the step unless user `name` exists in the capsule.
    async fn check_user(&mut self, name: &str) -> Result<(), Stop> {
        let q = shell_words::quote(name);
        let code = self
            .sh(
                &format!("id -u {q} >/dev/null"),
                &root_at("/"),
                Duration::from_secs(30),
            )
            .await?;
        if code != 0 {
            return Err(Stop::Failed(format!(
                "user {name} does not exist in the capsule"
            )));
        }
        Ok(())
    }

    /// Runs a script as root; a non-zero exit fails the step.
    async fn root(&mut self, script: &str) -> Result<(), Stop> {
        match self
            .sh(script, &root_at("/"), Duration::from_secs(60))
            .await?
        {
            0 => Ok(()),
            code => Err(Stop::Failed(format!("exited with code {code}"))),
        }
    }

    /// Copies uploaded files: staged in /tmp through envd, then installed as root with
    /// `mode` (else their own) and given to `owner`.
    async fn copy(
        &mut self,
        srcs: &[String],
        dst: &str,
        workdir: &str,
        owner: &str,
        mode: Option<u32>,
    ) -> Result<(), Stop> {
        if self.files.is_none() {
            let loaded = self
                .st
                .db
                .build_files(&self.build.id)
                .await
                .map_err(ApiError::from)?;
            self.files = Some(Arc::new(loaded));
        }
        let files = self.files.clone().unwrap_or_default();
        let dst = wrenn_recipe::resolve(workdir, dst);
        let into_dir = dst.ends_with('/') || srcs.len() > 1;
        let dir = dst.trim_end_matches('/');
        let mut plan: Vec<(&wrenn_db::BuildFile, String)> = Vec::new();
        for src in srcs {
            let covered: Vec<_> = files
                .iter()
                .filter_map(|f| Some((f, wrenn_recipe::copy_relative(src, &f.path)?)))
                .collect();
            match covered.iter().find(|(_, rel)| rel.is_empty()) {
                // The source is one file.
                Some((f, _)) => {
                    let s = src.trim_end_matches('/');
                    let name = s.rsplit('/').next().unwrap_or(s);
                    let to = if into_dir {
                        format!("{dir}/{name}")
                    } else {
                        dst.clone()
                    };
                    plan.push((f, to));
                }
                None if covered.is_empty() => {
                    return Err(Stop::Failed(format!(
                        "{src} is not among the build's uploaded files"
                    )))
                }
                // A directory: its files keep their places under the destination.
                None => plan.extend(covered.iter().map(|(f, rel)| (*f, format!("{dir}/{rel}")))),
            }
        }
        let guest = self.guest()?;
        let stage = format!("/tmp/.wrenn-build-{}", self.build.id);
        guest
            .make_dir(&stage)
            .await
            .map_err(|e| Stop::Failed(format!("staging the files: {e}")))?;
        let mut script = String::from("set -e\n");
        for (i, (f, to)) in plan.iter().enumerate() {
            let staged = format!("{stage}/{i}");
            let data = Bytes::from(f.data.clone());
            let body: wrenn_core::guest::ByteStream =
                Box::pin(futures_util::stream::once(async move { Ok(data) }));
            guest
                .write_file(&staged, body)
                .await
                .map_err(|e| Stop::Failed(format!("uploading {}: {e}", f.path)))?;
            script.push_str(&format!(
                "install -D -m {:o} {} {}\n",
                mode.unwrap_or(f.mode) & 0o7777,
                shell_words::quote(&staged),
                shell_words::quote(to)
            ));
            if owner != "root" {
                script.push_str(&format!(
                    "chown {}: {}\n",
                    shell_words::quote(owner),
                    shell_words::quote(to)
                ));
            }
            self.log.system(format!("{} → {to}", f.path));
        }
        script.push_str(&format!("rm -rf {}\n", shell_words::quote(&stage)));
        self.root(&script).await
    }

    /// Runs `sh -c cmd` with the context's user, directory and environment, logging
    /// its output; returns its exit code. Cancels and the time limit stop it.
    async fn sh(&mut self, cmd: &str, ctx: &Context, timeout: Duration) -> Result<i32, Stop> {
        let guest = self.guest()?;
        let remaining = self.deadline.saturating_duration_since(Instant::now());
        let limit = timeout.min(remaining.max(Duration::from_secs(1)));
        let req = ExecRequest {
            cmd: "/bin/sh".into(),
            args: vec!["-c".into(), cmd.to_string()],
            envs: ctx.envs(),
            cwd: Some(ctx.workdir.clone()),
            user: Some(ctx.user.clone()),
            timeout: Some(limit),
            ..Default::default()
        };
        // Taken before the request leaves: the guest's timer starts later, so a command
        // it killed at `limit` has always run `limit` by this clock.
        let started = Instant::now();
        let mut stream = guest
            .exec(&req)
            .await
            .map_err(|e| Stop::Failed(format!("could not run it: {e}")))?;
        let (mut out, mut err) = (Lines::default(), Lines::default());
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        let code = loop {
            tokio::select! {
                ev = stream.events.recv() => match ev {
                    Some(Ok(ExecEvent::Stdout(b))) => {
                        let log = &mut self.log;
                        out.push(&b, |l| log.line(LogStream::Stdout, l));
                    }
                    Some(Ok(ExecEvent::Stderr(b))) => {
                        let log = &mut self.log;
                        err.push(&b, |l| log.line(LogStream::Stderr, l));
                    }
                    Some(Ok(ExecEvent::Exited(s))) => break s.code,
                    Some(Ok(ExecEvent::Started { .. })) => {}
                    Some(Err(e)) => return Err(Stop::Failed(format!("lost the command: {e}"))),
                    None => return Err(Stop::Failed("the command's stream ended early".into())),
                },
                _ = tick.tick() => {
                    if let Err(stop) = self.check_stop().await {
                        let _ = guest.signal(stream.pid, true).await;
                        return Err(stop);
                    }
                    if started.elapsed() > limit + Duration::from_secs(5) {
                        let _ = guest.signal(stream.pid, true).await;
                        return Err(Stop::Failed(format!("timed out after {} s", limit.as_secs())));
                    }
                }
            }
            self.log.maybe_flush().await;
        };
        let log = &mut self.log;
        out.finish(|l| log.line(LogStream::Stdout, l));
        err.finish(|l| log.line(LogStream::Stderr, l));
        self.log.flush().await;
        if code == -1 && started.elapsed() >= limit {
            // Killed at its limit: the build's own, or the step's.
            self.check_stop().await?;
            return Err(Stop::Failed(format!(
                "timed out after {} s",
                limit.as_secs()
            )));
        }
        Ok(code)
    }

    /// Retries the readiness check until it passes.
    async fn wait_ready(&mut self, hc: &Healthcheck, ctx: &Context) -> Result<(), Stop> {
        self.log.system(match &hc.check {
            Check::Port { port } => format!("waiting for port {port}"),
            Check::Command { cmd } => format!("waiting for: {cmd}"),
        });
        self.log.flush().await;
        let start = Instant::now();
        let mut failures = 0u32;
        loop {
            self.check_stop().await?;
            let ok = match &hc.check {
                Check::Port { port } => {
                    let c = self
                        .capsule
                        .clone()
                        .ok_or_else(|| Stop::Failed("no capsule".into()))?;
                    let agent = self.st.agent_of(&c).map_err(service::host_err)?;
                    matches!(
                        tokio::time::timeout(hc.timeout, agent.open(&c.id, *port)).await,
                        Ok(Ok(_))
                    )
                }
                Check::Command { cmd } => matches!(self.sh(cmd, ctx, hc.timeout).await, Ok(0)),
            };
            if ok {
                self.log.system(format!(
                    "ready after {:.1} s",
                    start.elapsed().as_secs_f64()
                ));
                return Ok(());
            }
            if start.elapsed() >= hc.start_period {
                failures += 1;
                if hc.retries > 0 && failures > hc.retries {
                    return Err(Stop::Failed(format!(
                        "the readiness check failed {failures} times"
                    )));
                }
            }
            tokio::time::sleep(hc.interval).await;
        }
    }
}

fn root_at(dir: &str) -> Context {
    Context {
        env: Vec::new(),
        user: "root".into(),
        workdir: dir.into(),
        user_set: false,
        workdir_set: false,
        started: false,
    }
}
