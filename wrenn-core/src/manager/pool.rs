//! Warm pools: capsules restored from a template ahead of time, envd ready, network
//! attached, their vCPUs stopped, and without an identity yet. A create of that template
//! takes one and gives it its identity (new envd token, env, clock; its id, disk overlay
//! and memory were its own from the start and were never seen by anyone), so it costs a
//! vCPU resume and an envd `/init` instead of a restore; the pool refills behind it.
//!
//! Pool entries are not in the manager's table: no list, lookup, sampler or proxy sees
//! them. Their records are marked `pooled`, so a crashed process's entries are swept
//! like any dead capsule, and [`Capsules::drain_pools`] destroys them on shutdown.

use super::*;
use crate::snapshot::Restorable;
use std::collections::VecDeque;

/// One template's pool, as reported to operators.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PoolStats {
    pub template: String,
    /// How many ready entries the pool keeps.
    pub target: usize,
    pub ready: usize,
    /// Entries being restored right now.
    pub filling: usize,
    /// Creates served from the pool, and creates that found it empty.
    pub hits: u64,
    pub misses: u64,
    /// How long the last refill took (restore to ready).
    pub last_refill_ms: Option<u64>,
    /// Guest memory the ready and filling entries were given, in MiB.
    pub memory_mb: u64,
}

/// Which template snapshot an entry was restored from: an entry of a snapshot that has
/// since been rebuilt is not handed out.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct Origin {
    device_state: PathBuf,
    device_state_inode: u64,
    created_at: i64,
}

impl Origin {
    pub(super) fn of(r: &Restorable) -> Origin {
        use std::os::unix::fs::MetadataExt;
        Origin {
            device_state: r.device_state.clone(),
            device_state_inode: std::fs::metadata(&r.device_state)
                .map(|m| m.ino())
                .unwrap_or(0),
            created_at: r.meta.created_at,
        }
    }
}

/// A restored, ready capsule waiting in a pool.
pub(super) struct Ready {
    record: CapsuleRecord,
    res: Resources,
    agent: Arc<dyn GuestAgent>,
    origin: Origin,
}

#[derive(Default)]
struct PoolState {
    target: usize,
    ready: VecDeque<Ready>,
    filling: usize,
    hits: u64,
    misses: u64,
    last_refill: Option<Duration>,
    memory_mb_each: u64,
}

/// All pools of a manager.
#[derive(Default)]
pub(super) struct Pools {
    state: Mutex<HashMap<String, PoolState>>,
    /// Guest memory all pools together may hold, in MiB (0 = no cap).
    budget_mb: u64,
}

impl std::fmt::Debug for Pools {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pools")
            .field("budget_mb", &self.budget_mb)
            .finish_non_exhaustive()
    }
}

impl Pools {
    pub(super) fn new(budget_mb: u64) -> Pools {
        Pools {
            state: Mutex::default(),
            budget_mb,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, PoolState>> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Memory held by every pool, in MiB.
    fn held_mb(map: &HashMap<String, PoolState>) -> u64 {
        map.values()
            .map(|p| (p.ready.len() + p.filling) as u64 * p.memory_mb_each)
            .sum()
    }

    /// Takes a ready entry of `template` restored from `origin` with `disk_mb` of disk;
    /// entries of an older snapshot come back in `stale` (to be destroyed).
    pub(super) fn take(
        &self,
        template: &str,
        origin: &Origin,
        disk_mb: u64,
        stale: &mut Vec<Ready>,
    ) -> Option<Ready> {
        let mut map = self.lock();
        let pool = map.get_mut(template)?;
        let (fresh, old): (VecDeque<Ready>, VecDeque<Ready>) = std::mem::take(&mut pool.ready)
            .into_iter()
            .partition(|r| &r.origin == origin);
        pool.ready = fresh;
        stale.extend(old);
        let i = pool
            .ready
            .iter()
            .position(|r| r.record.spec.disk_mb == disk_mb);
        match i.and_then(|i| pool.ready.remove(i)) {
            Some(r) => {
                pool.hits += 1;
                Some(r)
            }
            None => {
                if pool.target > 0 {
                    pool.misses += 1;
                }
                None
            }
        }
    }
}

impl Capsules {
    /// Keeps `size` ready capsules of `template` (0 = none): grows in the background,
    /// shrinks at once. The template must have a pre-booted snapshot.
    pub async fn set_pool(
        self: &Arc<Self>,
        template: &str,
        size: usize,
    ) -> Result<(), CapsuleError> {
        let name = TemplateName::parse(template).map_err(crate::spec::InvalidSpec::from)?;
        let mut memory_mb = 0;
        if size > 0 {
            self.ctx.parts.templates.get(&name).await?;
            let snap = self
                .ctx
                .parts
                .snapshots
                .open_template(&name)
                .await?
                .filter(|r| r.meta.accel == self.ctx.parts.vmm.accel());
            let Some(snap) = snap else {
                return Err(CapsuleError::InvalidSpec(crate::spec::InvalidSpec::Pool(
                    format!(
                        "template {name} has no pre-booted snapshot for this host's {} \
                         acceleration; only such templates can be pooled",
                        self.ctx.parts.vmm.accel()
                    ),
                )));
            };
            memory_mb = u64::from(snap.meta.spec.memory_mb);
        }
        let extra: Vec<Ready> = {
            let mut map = self.pools.lock();
            let pool = map.entry(name.to_string()).or_default();
            pool.target = size;
            if memory_mb > 0 {
                pool.memory_mb_each = memory_mb;
            }
            let keep = size.min(pool.ready.len());
            pool.ready.drain(keep..).collect()
        };
        for r in extra {
            self.discard(r).await;
        }
        self.refill(name.as_str());
        Ok(())
    }

    /// Every pool's state.
    pub fn pool_stats(&self) -> Vec<PoolStats> {
        let map = self.pools.lock();
        let mut out: Vec<PoolStats> = map
            .iter()
            .map(|(t, p)| PoolStats {
                template: t.clone(),
                target: p.target,
                ready: p.ready.len(),
                filling: p.filling,
                hits: p.hits,
                misses: p.misses,
                last_refill_ms: p.last_refill.map(|d| d.as_millis() as u64),
                memory_mb: (p.ready.len() + p.filling) as u64 * p.memory_mb_each,
            })
            .collect();
        out.sort_by(|a, b| a.template.cmp(&b.template));
        out
    }

    /// Destroys the ready entries of `template` (its pool refills from the template as
    /// it is now, if it still has a target and the template exists). Returns how many.
    pub async fn drain_pool(self: &Arc<Self>, template: &str) -> usize {
        let drained: Vec<Ready> = {
            let mut map = self.pools.lock();
            map.get_mut(template)
                .map(|p| p.ready.drain(..).collect())
                .unwrap_or_default()
        };
        let n = drained.len();
        for r in drained {
            self.discard(r).await;
        }
        n
    }

    /// Destroys every pool entry and stops refilling (shutdown).
    pub async fn drain_pools(&self) -> usize {
        let drained: Vec<Ready> = {
            let mut map = self.pools.lock();
            map.values_mut()
                .flat_map(|p| {
                    p.target = 0;
                    p.ready.drain(..).collect::<Vec<_>>()
                })
                .collect()
        };
        let n = drained.len();
        for r in drained {
            self.discard(r).await;
        }
        n
    }

    /// Starts restores until the pool of `template` has its target (within the budget).
    pub(super) fn refill(self: &Arc<Self>, template: &str) {
        {
            let mut map = self.pools.lock();
            let held = Pools::held_mb(&map);
            let budget = self.pools.budget_mb;
            let Some(pool) = map.get_mut(template) else {
                return;
            };
            // One restore at a time per template: refills stay in the background.
            if pool.filling > 0 || pool.ready.len() >= pool.target {
                return;
            }
            if budget > 0 && held + pool.memory_mb_each > budget {
                tracing::debug!(template, held, budget, "pool memory budget reached");
                return;
            }
            pool.filling += 1;
        }
        let this = self.clone();
        let name = template.to_string();
        tokio::spawn(async move {
            let started = tokio::time::Instant::now();
            let made = this.prepare(&name).await;
            let mut discard = None;
            let refill_again = {
                let mut map = this.pools.lock();
                let pool = map.entry(name.clone()).or_default();
                pool.filling = pool.filling.saturating_sub(1);
                match made {
                    Ok(ready) if pool.ready.len() < pool.target => {
                        pool.memory_mb_each = u64::from(ready.record.spec.memory_mb);
                        pool.last_refill = Some(started.elapsed());
                        pool.ready.push_back(ready);
                        true
                    }
                    Ok(ready) => {
                        discard = Some(ready);
                        false
                    }
                    Err(e) => {
                        tracing::warn!(template = %name, error = %error_chain(&e),
                            "pool refill failed");
                        false
                    }
                }
            };
            if let Some(r) = discard {
                this.discard(r).await;
            }
            if refill_again {
                this.refill(&name);
            }
        });
    }

    /// Restores one pool entry of `template`: like a create, without registering it.
    async fn prepare(self: &Arc<Self>, template: &str) -> Result<Ready, CapsuleError> {
        let parts = self.ctx.parts.clone();
        let opts = CreateOptions {
            template: Some(template.to_string()),
            ..Default::default()
        };
        let mut spec = opts.validate(&self.ctx.config.limits)?;
        let snap = parts
            .snapshots
            .open_template(&spec.template)
            .await?
            .filter(|r| r.meta.accel == parts.vmm.accel())
            .ok_or_else(|| {
                CapsuleError::InvalidSpec(crate::spec::InvalidSpec::Pool(format!(
                    "template {template} has no pre-booted snapshot for this host"
                )))
            })?;
        spec.vcpus = snap.meta.spec.vcpus;
        spec.memory_mb = snap.meta.spec.memory_mb;
        spec.disk_mb = spec.disk_mb.max(snap.meta.spec.disk_mb);
        let origin = Origin::of(&snap);
        let mut record = self.new_record(spec);
        record.pooled = true;
        let id = record.id.clone();
        let dir = self.open_record(&record).await?;
        let mut res = Resources::default();
        let result = async {
            let start = restore_start(&parts, &snap, &dir).await?;
            let agent = self
                .ctx
                .bring_up(&mut record, &mut res, start, &dir)
                .await?;
            // Ready: its vCPUs stop until a create takes it.
            if let Some(vmm) = res.vmm.as_ref() {
                vmm.pause().await?;
            }
            record.transition(CapsuleStatus::Running)?;
            parts.state.save(&record).await?;
            Ok::<_, CapsuleError>(agent)
        }
        .await;
        match result {
            Ok(agent) => Ok(Ready {
                record,
                res,
                agent,
                origin,
            }),
            Err(e) => {
                for err in res.release(&parts).await {
                    tracing::warn!(capsule = %id, %err, "cleanup after failed pool restore");
                }
                let _ = parts.state.remove_dir(&id).await;
                Err(e)
            }
        }
    }

    /// Gives a pool entry its identity and registers it as a running capsule.
    pub(super) async fn claim(
        self: &Arc<Self>,
        ready: Ready,
        spec: crate::spec::CapsuleSpec,
    ) -> Result<CapsuleInfo, CapsuleError> {
        let Ready {
            mut record,
            mut res,
            agent,
            ..
        } = ready;
        let parts = self.ctx.parts.clone();
        let token = random_token();
        let given = async {
            // The entry's slot was made open; the caller's policy holds before the guest runs.
            if let Some(slot) = res.slot.as_ref().filter(|_| !spec.network.is_open()) {
                parts.net.set_egress(slot, &spec.network).await?;
            }
            if let Some(vmm) = res.vmm.as_ref() {
                vmm.resume().await?;
            }
            agent
                .init(&GuestInit {
                    access_token: Some(token.clone()),
                    env_vars: spec.guest_env(&record.id),
                    default_user: None,
                    default_workdir: None,
                    timestamp: Some(SystemTime::now()),
                    entropy: Some(fresh_entropy()),
                })
                .await?;
            Ok::<_, CapsuleError>(())
        }
        .await;
        // The entry is already running: it becomes the caller's capsule.
        let (vcpus, memory_mb, disk_mb) = (
            record.spec.vcpus,
            record.spec.memory_mb,
            record.spec.disk_mb,
        );
        record.spec = crate::spec::CapsuleSpec {
            vcpus,
            memory_mb,
            disk_mb,
            ..spec
        };
        record.access_token = token;
        record.pooled = false;
        record.created_at = now_unix();
        let saved = match given {
            Ok(()) => parts.state.save(&record).await.map_err(CapsuleError::from),
            Err(e) => Err(e),
        };
        if let Err(e) = saved {
            for err in res.release(&parts).await {
                tracing::warn!(capsule = %record.id, %err, "cleanup after failed pool claim");
            }
            let _ = parts.state.remove_dir(&record.id).await;
            return Err(e);
        }
        let addr = record
            .slot
            .as_ref()
            .map(|s| SocketAddr::new(s.host_addr.into(), crate::ENVD_PORT));
        let agent = match addr {
            Some(addr) => parts
                .guests
                .connect(addr, Some(record.access_token.clone())),
            None => agent,
        };
        tracing::info!(capsule = %record.id, template = %record.spec.template, "capsule running (from the pool)");
        let info = CapsuleInfo::from(&record);
        self.start_actor(record, res, Some(agent));
        Ok(info)
    }

    /// Destroys a pool entry.
    pub(super) async fn discard(&self, ready: Ready) {
        let Ready {
            record, mut res, ..
        } = ready;
        for err in res.release(&self.ctx.parts).await {
            tracing::warn!(capsule = %record.id, %err, "releasing a pool entry");
        }
        if let Err(e) = self.ctx.parts.state.remove_dir(&record.id).await {
            tracing::warn!(capsule = %record.id, error = %error_chain(&e), "removing a pool entry's dir");
        }
    }
}

/// How a capsule starts from the pre-booted snapshot `r` of a template: its memory and
/// disk base pinned into the capsule's `dir`.
pub(super) async fn restore_start(
    parts: &HostParts,
    r: &Restorable,
    dir: &Path,
) -> Result<Start, CapsuleError> {
    let memory = match &r.meta.memory_base {
        MemoryBase::File(p) => MemoryBase::File(parts.templates.pin(p, dir, Pin::Memory).await?),
        MemoryBase::Zero => MemoryBase::Zero,
    };
    let disk_base = parts
        .templates
        .pin(&r.disk_base, dir, Pin::RootDisk)
        .await?;
    Ok(Start::Restore {
        kernel: r.meta.kernel.clone(),
        cmdline: r.meta.cmdline.clone(),
        memory,
        device_state: r.device_state.clone(),
        overlay: r.overlay.clone(),
        disk_base,
        old_token: r.meta.access_token.clone(),
    })
}
