//! The hosts this control plane drives: one connection per host agent, what each last
//! reported of itself, where a new capsule goes, and the host monitor that notices a
//! host going silent or coming back.
//!
//! Capsule rows name their host; every operation on a capsule goes to that host's
//! agent, so a slow or dead agent holds up only the requests for its own capsules.
//! With one host (the default single-machine mode) every capsule goes to it and its own
//! admission control decides, as before; with several, a [`Scheduler`] picks among the
//! reachable ones by what they reported.

use crate::agent::{HostAgent, HostError, HostErrorKind, HostInfo, HostVersions};
use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};
use std::time::{Duration, Instant};
use wrenn_core::scheduler::{
    Amounts, HostId, HostView, LeastLoaded, PlacementError, PlacementRequest, Scheduler,
};

/// How the control plane watches its hosts.
#[derive(Clone, Debug)]
pub struct MonitorConfig {
    /// How often each host is asked for its report.
    pub interval: Duration,
    /// A host that has not answered for this long is `unreachable`: it takes no new
    /// capsules until it answers again.
    pub timeout: Duration,
    /// vCPUs handed out per physical core when placing among several hosts.
    pub cpu_overcommit: f64,
}

impl Default for MonitorConfig {
    fn default() -> Self {
        MonitorConfig {
            interval: Duration::from_secs(2),
            timeout: Duration::from_secs(4),
            cpu_overcommit: 1.5,
        }
    }
}

#[derive(Debug, Default)]
struct Seen {
    info: Option<HostInfo>,
    /// When the host last answered.
    last_ok: Option<Instant>,
    /// Silent past the monitor's timeout.
    unreachable: bool,
    /// Capsules placed here that its last report may not include yet, by ticket.
    placed: BTreeMap<u64, Pending>,
    next_ticket: u64,
    /// From the `hosts` table: draining hosts take no new capsules, team-owned ones
    /// only their team's.
    draining: bool,
    team: Option<String>,
    /// When its report was last written to the `hosts` table.
    recorded: Option<Instant>,
    /// Whether its team was last told it is up (host.up) rather than down.
    announced_up: bool,
}

/// How long an ended placement is counted at most when no report comes.
const FORGET_ENDED: Duration = Duration::from_secs(600);

/// A placed capsule, counted against its host until a report asked after its create
/// ended (and so including it, or its failure) arrives.
#[derive(Debug, Clone, Copy)]
struct Pending {
    vcpus: u64,
    memory_mb: u64,
    ended: Option<Instant>,
}

/// One host agent and what the control plane knows of it.
#[derive(Debug)]
pub struct HostConn {
    pub id: HostId,
    pub agent: Arc<dyn HostAgent>,
    /// Where the agent was reached (`None` for the in-process host).
    pub address: Option<String>,
    versions: tokio::sync::OnceCell<HostVersions>,
    /// The agent instance last seen (a new one means the agent restarted).
    instance: Mutex<Option<String>>,
    seen: Mutex<Seen>,
}

impl HostConn {
    pub fn new(id: HostId, agent: Arc<dyn HostAgent>, address: Option<String>) -> Self {
        HostConn {
            id,
            agent,
            address,
            versions: tokio::sync::OnceCell::new(),
            instance: Mutex::new(None),
            seen: Mutex::new(Seen::default()),
        }
    }

    /// A connection to `agent`, named by the id it reports (asked now).
    pub async fn connect(
        agent: Arc<dyn HostAgent>,
        address: Option<String>,
    ) -> Result<Self, HostError> {
        let asked = Instant::now();
        let info = agent.info().await?;
        let conn = HostConn::new(info.id.clone(), agent, address);
        conn.answered(info, asked);
        Ok(conn)
    }

    fn seen(&self) -> MutexGuard<'_, Seen> {
        self.seen.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Versions of what runs capsules on the host, asked once.
    pub async fn versions(&self) -> Result<&HostVersions, HostError> {
        self.versions
            .get_or_try_init(|| self.agent.versions())
            .await
    }

    /// Records the host agent instance seen now; true when an earlier one was seen and
    /// this one differs (the agent restarted since).
    pub fn instance_changed(&self, instance: &str) -> bool {
        let mut seen = self.instance.lock().unwrap_or_else(|p| p.into_inner());
        let changed = seen.as_deref().is_some_and(|s| s != instance);
        *seen = Some(instance.to_string());
        changed
    }

    /// Forgets the instance seen, so that the next one seen counts as a restart.
    pub fn forget_instance(&self) {
        let mut seen = self.instance.lock().unwrap_or_else(|p| p.into_inner());
        *seen = Some(String::new());
    }

    /// The last report, if the host ever answered.
    pub fn info(&self) -> Option<HostInfo> {
        self.seen().info.clone()
    }

    pub fn unreachable(&self) -> bool {
        self.seen().unreachable
    }

    /// Records that the host is `up` (it answered) or not (silent past the timeout);
    /// true when that changes what its team was last told.
    pub fn announce(&self, up: bool) -> bool {
        let mut seen = self.seen();
        let changed = seen.announced_up != up;
        seen.announced_up = up;
        changed
    }

    /// The team that owns the host (team-owned hosts only).
    pub fn team(&self) -> Option<String> {
        self.seen().team.clone()
    }

    /// Whether its report is due to be written to the `hosts` table (once per
    /// `every`); counts it as written.
    pub fn record_due(&self, every: Duration) -> bool {
        let mut seen = self.seen();
        if seen.recorded.is_some_and(|t| t.elapsed() < every) {
            return false;
        }
        seen.recorded = Some(Instant::now());
        true
    }

    /// Takes a report asked for at `asked`: the host answered. Placements that ended
    /// before it was asked are in it.
    fn answered(&self, info: HostInfo, asked: Instant) {
        let mut seen = self.seen();
        seen.info = Some(info);
        seen.last_ok = Some(Instant::now());
        seen.unreachable = false;
        seen.placed
            .retain(|_, p| p.ended.is_none_or(|ended| ended >= asked));
    }

    fn placement_ended(&self, ticket: u64) {
        if let Some(p) = self.seen().placed.get_mut(&ticket) {
            p.ended = Some(Instant::now());
        }
    }

    /// The host did not answer; returns true when that makes it unreachable now
    /// (silent for `timeout`, or never heard from since `since`).
    fn silent(&self, timeout: Duration, since: Instant) -> bool {
        let mut seen = self.seen();
        let last = seen.last_ok.unwrap_or(since);
        if !seen.unreachable && last.elapsed() >= timeout {
            seen.unreachable = true;
            return true;
        }
        false
    }

    fn view(&self) -> Option<HostView> {
        let seen = self.seen();
        let info = seen.info.as_ref()?;
        let mut used = info.used;
        for p in seen.placed.values() {
            used.running_vcpus += p.vcpus;
            used.running_memory_mb += p.memory_mb;
        }
        Some(HostView {
            id: self.id.clone(),
            schedulable: !seen.unreachable && !seen.draining,
            tags: Default::default(),
            team: seen.team.clone(),
            // Disk as allocated to capsules against what capsules could have (what they
            // hold plus the room left above the host's reserve): the rest of the
            // filesystem is not theirs to weigh.
            capacity: Amounts {
                vcpus: u64::from(info.cpu_cores),
                memory_mb: info.memory_mb,
                disk_mb: info.used.disk_mb.saturating_add(info.disk_room_mb),
            },
            reserved: Amounts::default(),
            used,
            templates: info.snapshot_templates.iter().cloned().collect(),
            pool_ready: info
                .pool_ready
                .iter()
                .map(|(t, n)| (t.clone(), *n as usize))
                .collect(),
        })
    }
}

/// An agent that did not answer yet (when the control plane started, or a registered
/// host just found): asked again by the host monitor until it does.
#[derive(Debug)]
struct Unresolved {
    agent: Arc<dyn HostAgent>,
    address: Option<String>,
    /// The id of the registered host it is the agent of.
    registered: Option<HostId>,
}

/// A capsule's place: its host, which counts the capsule in advance until the host's
/// own report can include it (a report asked after this is dropped, i.e. after the
/// create ended one way or the other).
#[derive(Debug)]
pub struct Placement {
    conn: Arc<HostConn>,
    ticket: u64,
}

impl Placement {
    pub fn host(&self) -> &Arc<HostConn> {
        &self.conn
    }
}

impl std::ops::Deref for Placement {
    type Target = HostConn;

    fn deref(&self) -> &HostConn {
        &self.conn
    }
}

impl Drop for Placement {
    fn drop(&mut self) {
        self.conn.placement_ended(self.ticket);
    }
}

/// Every host agent this control plane drives.
#[derive(Debug)]
pub struct Hosts {
    by_id: RwLock<BTreeMap<HostId, Arc<HostConn>>>,
    unresolved: Mutex<Vec<Unresolved>>,
    /// Hosts found registered in the database (not given on the command line).
    registered: Mutex<BTreeSet<HostId>>,
    scheduler: Box<dyn Scheduler>,
    pub config: MonitorConfig,
    started: Instant,
}

fn unavailable(message: impl Into<String>) -> HostError {
    HostError::new(HostErrorKind::Unavailable, message)
}

impl Hosts {
    pub fn new(config: MonitorConfig) -> Self {
        Hosts {
            by_id: RwLock::new(BTreeMap::new()),
            unresolved: Mutex::new(Vec::new()),
            registered: Mutex::new(BTreeSet::new()),
            scheduler: Box::new(LeastLoaded {
                cpu_overcommit: config.cpu_overcommit,
                ..LeastLoaded::default()
            }),
            config,
            started: Instant::now(),
        }
    }

    /// Adds a host; refuses a second host with the same id.
    pub fn add(&self, conn: HostConn) -> Result<Arc<HostConn>, HostError> {
        let mut map = self.by_id.write().unwrap_or_else(|p| p.into_inner());
        if let Some(known) = map.get(&conn.id) {
            return Err(HostError::new(
                HostErrorKind::Conflict,
                format!(
                    "host id {} is already taken by the agent at {}",
                    conn.id,
                    known.address.as_deref().unwrap_or("this process")
                ),
            ));
        }
        let conn = Arc::new(conn);
        map.insert(conn.id.clone(), conn.clone());
        Ok(conn)
    }

    /// Keeps an agent that did not answer yet, to be asked again by
    /// [`Hosts::resolve`].
    pub fn add_unresolved(&self, agent: Arc<dyn HostAgent>, address: Option<String>) {
        self.unresolved
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(Unresolved {
                agent,
                address,
                registered: None,
            });
    }

    /// Adds the agent of registered host `id`, to join when it answers.
    pub fn add_registered(&self, id: HostId, agent: Arc<dyn HostAgent>, address: String) {
        self.registered
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(id.clone());
        self.unresolved
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(Unresolved {
                agent,
                address: Some(address),
                registered: Some(id),
            });
    }

    /// Whether host `id` is driven here, or its agent is waited for.
    pub fn knows(&self, id: &HostId) -> bool {
        self.by_id
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .contains_key(id)
            || self
                .unresolved
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .iter()
                .any(|u| u.registered.as_ref() == Some(id))
    }

    /// The address host `id`'s agent is reached at (driven or waited for).
    pub fn address_of(&self, id: &HostId) -> Option<String> {
        if let Some(conn) = self.by_id.read().unwrap_or_else(|p| p.into_inner()).get(id) {
            return conn.address.clone();
        }
        self.unresolved
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .find(|u| u.registered.as_ref() == Some(id))
            .and_then(|u| u.address.clone())
    }

    /// The registered hosts driven or waited for.
    pub fn registered_ids(&self) -> Vec<HostId> {
        self.registered
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .cloned()
            .collect()
    }

    /// Stops driving host `id` (deleted): no capsule is placed there or reached
    /// through it any more.
    pub fn remove(&self, id: &HostId) -> Option<Arc<HostConn>> {
        self.registered
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(id);
        self.unresolved
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .retain(|u| u.registered.as_ref() != Some(id));
        self.by_id
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .remove(id)
    }

    /// Asks the agents that have not answered yet; adds those that do (their rows are
    /// reconciled at the next check of host restarts). Returns the hosts added.
    pub async fn resolve(&self) -> Vec<Arc<HostConn>> {
        let waiting: Vec<Unresolved> =
            std::mem::take(&mut *self.unresolved.lock().unwrap_or_else(|p| p.into_inner()));
        let mut added = Vec::new();
        for u in waiting {
            let (agent, address) = (u.agent.clone(), u.address.clone());
            let asked = tokio::time::timeout(
                self.config.timeout,
                HostConn::connect(agent.clone(), address.clone()),
            )
            .await;
            match asked {
                Ok(Ok(conn)) if u.registered.as_ref().is_some_and(|r| *r != conn.id) => {
                    tracing::error!(address = ?address, expected = ?u.registered, reported = %conn.id,
                        "a registered host's agent reports another id; not used");
                }
                // Deleted while it was being asked.
                Ok(Ok(conn)) if u.registered.is_some() && !self.is_registered(&conn.id) => {}
                Ok(Ok(conn)) => {
                    // Its rows were not reconciled at start-up: the first restart check
                    // does it.
                    conn.forget_instance();
                    match self.add(conn) {
                        Ok(conn) => {
                            tracing::info!(host = %conn.id, address = ?address, "host agent answered; it takes capsules");
                            added.push(conn);
                        }
                        Err(e) => {
                            tracing::error!(address = ?address, error = %e, "host agent refused")
                        }
                    }
                }
                _ => self
                    .unresolved
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .push(u),
            }
        }
        added
    }

    fn is_registered(&self, id: &HostId) -> bool {
        self.registered
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains(id)
    }

    /// Whether host `id` is connected and answering.
    pub fn reachable(&self, id: &HostId) -> bool {
        self.get(id).is_ok_and(|c| !c.unreachable())
    }

    /// The host with id `id`.
    pub fn get(&self, id: &HostId) -> Result<Arc<HostConn>, HostError> {
        self.by_id
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(id)
            .cloned()
            .ok_or_else(|| unavailable(format!("host {id} is not connected to this control plane")))
    }

    /// Every host, by id.
    pub fn all(&self) -> Vec<Arc<HostConn>> {
        self.by_id
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .cloned()
            .collect()
    }

    /// A host to ask about what every host has (the platform templates): the first
    /// that is not known to be unreachable.
    pub fn any(&self) -> Result<Arc<HostConn>, HostError> {
        let all = self.all();
        all.iter()
            .find(|c| !c.unreachable())
            .or(all.first())
            .cloned()
            .ok_or_else(|| unavailable("no host is connected to this control plane"))
    }

    /// A host that may work for `team` (a platform host or one of the team's own),
    /// preferring reachable ones: what is sent to it (registry credentials) never
    /// reaches another team's host.
    pub fn any_for(&self, team: &str) -> Result<Arc<HostConn>, HostError> {
        let all: Vec<Arc<HostConn>> = self
            .all()
            .into_iter()
            .filter(|c| c.team().is_none_or(|t| t == team))
            .collect();
        all.iter()
            .find(|c| !c.unreachable())
            .or(all.first())
            .cloned()
            .ok_or_else(|| unavailable("no host this team may use is connected"))
    }

    /// Picks the host for a new capsule, among `only` when given (the hosts holding
    /// the template), and counts the capsule against it until a report asked after
    /// the returned [`Placement`] is dropped arrives.
    pub async fn place(
        &self,
        req: &PlacementRequest,
        only: Option<&[HostId]>,
    ) -> Result<Placement, HostError> {
        let candidates: Vec<Arc<HostConn>> = self
            .all()
            .into_iter()
            .filter(|c| only.is_none_or(|ids| ids.contains(&c.id)))
            .collect();
        let conn = match candidates.as_slice() {
            [] if only.is_some() => {
                return Err(unavailable(format!(
                    "no host that holds template {} is connected",
                    req.template
                )))
            }
            [] => return Err(unavailable("no host is connected to this control plane")),
            // One host: its own admission control decides (single-machine mode).
            [one] if self.by_id.read().map_or(0, |m| m.len()) == 1 => one.clone(),
            _ => {
                // Hosts not heard from yet are asked now.
                for c in candidates.iter().filter(|c| c.info().is_none()) {
                    self.probe(c).await;
                }
                let views: Vec<HostView> = candidates.iter().filter_map(|c| c.view()).collect();
                let result = self.scheduler.place(req, &views);
                tracing::debug!(
                    placed = ?result,
                    views = ?views.iter().map(|v| (&v.id.0, v.schedulable, v.used)).collect::<Vec<_>>(),
                    "placement"
                );
                let id = result.map_err(|e| match e {
                    PlacementError::NoHosts => {
                        unavailable("no host is reachable and taking new capsules")
                    }
                    other => unavailable(other.to_string()),
                })?;
                candidates
                    .into_iter()
                    .find(|c| c.id == id)
                    .ok_or_else(|| unavailable(format!("host {id} is gone")))?
            }
        };
        let ticket = {
            let mut seen = conn.seen();
            // A host that never answers again keeps no count of what ended long ago.
            seen.placed
                .retain(|_, p| p.ended.is_none_or(|e| e.elapsed() < FORGET_ENDED));
            let ticket = seen.next_ticket;
            seen.next_ticket += 1;
            seen.placed.insert(
                ticket,
                Pending {
                    vcpus: req.vcpus,
                    memory_mb: req.memory_mb,
                    ended: None,
                },
            );
            ticket
        };
        Ok(Placement { conn, ticket })
    }

    /// Asks one host for its report; returns whether it answered.
    pub async fn probe(&self, conn: &HostConn) -> bool {
        let wait = self.config.timeout.max(Duration::from_secs(1));
        let asked = Instant::now();
        match tokio::time::timeout(wait, conn.agent.info()).await {
            Ok(Ok(info)) if info.id == conn.id => {
                // The agent drains as the `hosts` table says (it may have restarted,
                // or missed the drain while unreachable).
                let want = conn.seen().draining;
                let differs = info.draining != want;
                conn.answered(info, asked);
                if differs {
                    if let Err(e) = conn.agent.drain(want).await {
                        tracing::debug!(host = %conn.id, error = %e, "drain not passed on");
                    }
                }
                true
            }
            Ok(Ok(info)) => {
                tracing::error!(host = %conn.id, answered_as = %info.id,
                    "the agent at this host's address now reports another host id");
                false
            }
            Ok(Err(e)) => {
                tracing::debug!(host = %conn.id, error = %e, "host did not answer");
                false
            }
            Err(_) => false,
        }
    }

    /// Marks a host silent; true when it just became unreachable.
    pub fn silent(&self, conn: &HostConn) -> bool {
        conn.silent(self.config.timeout, self.started)
    }

    /// Takes what the `hosts` table says of a host (draining, team-owned).
    pub fn set_policy(&self, id: &HostId, draining: bool, team: Option<String>) {
        if let Ok(conn) = self.get(id) {
            let mut seen = conn.seen();
            seen.draining = draining;
            seen.team = team;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use wrenn_core::testing::ReportingHost;

    fn host(id: &str, cores: u32, memory_mb: u64, running_memory_mb: u64) -> Arc<ReportingHost> {
        Arc::new(ReportingHost::new(id, cores, memory_mb, running_memory_mb))
    }

    fn request(memory_mb: u64) -> PlacementRequest {
        PlacementRequest {
            team: "team-a".into(),
            template: "python".into(),
            vcpus: 1,
            memory_mb,
            disk_mb: 0,
            tags: Default::default(),
        }
    }

    async fn hosts_of(agents: &[Arc<ReportingHost>], config: MonitorConfig) -> Hosts {
        let hosts = Hosts::new(config);
        for a in agents {
            let agent: Arc<dyn HostAgent> = a.clone();
            let conn = HostConn::connect(agent, Some(format!("agent-{}", a.info.id)))
                .await
                .expect("connect");
            hosts.add(conn).expect("add");
        }
        hosts
    }

    fn ids(placed: &[Placement]) -> Vec<&str> {
        placed.iter().map(|c| c.id.0.as_str()).collect()
    }

    #[tokio::test]
    async fn places_on_the_least_loaded_and_counts_what_it_placed() {
        // b is emptier: it takes capsules until what was placed there (not yet in its
        // report) makes a the lighter one.
        let (a, b) = (host("a", 8, 16_384, 4096), host("b", 8, 16_384, 0));
        let hosts = hosts_of(&[a, b], MonitorConfig::default()).await;
        let mut placed = Vec::new();
        for _ in 0..4 {
            placed.push(hosts.place(&request(2048), None).await.expect("placed"));
        }
        assert_eq!(ids(&placed), ["b", "b", "a", "b"]);
        // Creates that ended are in the reports asked after them.
        drop(placed);
        let b = hosts.get(&HostId("b".into())).expect("b");
        let a = hosts.get(&HostId("a".into())).expect("a");
        assert!(hosts.probe(&a).await && hosts.probe(&b).await);
        let held = hosts.place(&request(8192), None).await.expect("placed");
        assert_eq!(held.id.0, "b");
        // A report asked while that create is in flight may not include it: it still
        // counts (b: 8 + 2 GiB against a: 4 + 2).
        assert!(hosts.probe(&b).await);
        assert_eq!(
            ids(&[hosts.place(&request(2048), None).await.expect("placed")]),
            ["a"]
        );
        // Once it ended, the next report of b is taken as including it.
        drop(held);
        assert!(hosts.probe(&b).await);
        assert_eq!(
            ids(&[hosts.place(&request(2048), None).await.expect("placed")]),
            ["b"]
        );
    }

    #[tokio::test]
    async fn the_monitor_tells_an_agent_to_drain_as_the_table_says() {
        let b = host("b", 8, 16_384, 0);
        let hosts = hosts_of(std::slice::from_ref(&b), MonitorConfig::default()).await;
        let conn = hosts.get(&HostId("b".into())).expect("b");
        assert!(hosts.probe(&conn).await);
        assert!(!b.draining());
        hosts.set_policy(&conn.id, true, None);
        assert!(hosts.probe(&conn).await);
        assert!(b.draining(), "told at the next report");
        // A restarted agent (no drain) is told again; an ended drain is passed on.
        b.drain(false).await.expect("drain");
        assert!(hosts.probe(&conn).await);
        assert!(b.draining());
        hosts.set_policy(&conn.id, false, None);
        assert!(hosts.probe(&conn).await);
        assert!(!b.draining());
    }

    #[tokio::test]
    async fn a_silent_host_becomes_unreachable_and_takes_nothing_until_it_answers() {
        let (a, b) = (host("a", 8, 16_384, 8192), host("b", 8, 16_384, 0));
        let hosts = hosts_of(
            &[a, b.clone()],
            MonitorConfig {
                timeout: Duration::from_millis(50),
                ..MonitorConfig::default()
            },
        )
        .await;
        let conn_b = hosts.get(&HostId("b".into())).expect("b");
        b.set_down(true);
        assert!(!hosts.probe(&conn_b).await);
        // Silent, but not for the timeout yet: still placed on.
        assert!(!hosts.silent(&conn_b));
        assert_eq!(
            ids(&[hosts.place(&request(512), None).await.expect("placed")]),
            ["b"]
        );
        tokio::time::sleep(Duration::from_millis(60)).await;
        assert!(hosts.silent(&conn_b), "silent past the timeout");
        assert!(!hosts.silent(&conn_b), "reported once");
        for _ in 0..3 {
            let c = hosts.place(&request(512), None).await.expect("placed");
            assert_eq!(c.id.0, "a");
        }
        b.set_down(false);
        assert!(hosts.probe(&conn_b).await);
        assert!(!conn_b.unreachable());
        assert_eq!(
            ids(&[hosts.place(&request(512), None).await.expect("placed")]),
            ["b"]
        );
    }

    #[tokio::test]
    async fn templates_held_by_one_host_go_there_and_a_single_host_takes_everything() {
        let (a, b) = (host("a", 8, 16_384, 0), host("b", 8, 16_384, 8192));
        let hosts = hosts_of(&[a, b.clone()], MonitorConfig::default()).await;
        let only_b = [HostId("b".into())];
        let c = hosts
            .place(&request(512), Some(&only_b))
            .await
            .expect("placed");
        assert_eq!(c.id.0, "b");
        let gone = [HostId("c".into())];
        let e = hosts
            .place(&request(512), Some(&gone))
            .await
            .expect_err("no holder");
        assert_eq!(e.kind, HostErrorKind::Unavailable);
        assert!(e.message.contains("holds template python"), "{}", e.message);

        // Nothing fits on two hosts: refused, naming the need.
        let e = hosts
            .place(&request(64 * 1024), None)
            .await
            .expect_err("too big");
        assert_eq!(e.kind, HostErrorKind::Unavailable);
        assert!(e.message.contains("no host has room"), "{}", e.message);

        // One host: its own admission control decides, whatever its report says.
        let one = hosts_of(&[host("solo", 1, 1024, 1024)], MonitorConfig::default()).await;
        let c = one.place(&request(64 * 1024), None).await.expect("placed");
        assert_eq!(c.id.0, "solo");

        // Two agents claiming one id: the second is refused.
        let twin: Arc<dyn HostAgent> = b;
        let e = hosts
            .add(HostConn::connect(twin, None).await.expect("connect"))
            .expect_err("same id");
        assert_eq!(e.kind, HostErrorKind::Conflict);
    }
}
