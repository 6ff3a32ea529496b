//! One control group per VMM process: memory, CPU, process-count and I/O limits,
//! so a capsule that hits a limit hurts only its own VMM.
//!
//! Works on a pure cgroup v2 host (`/sys/fs/cgroup`) and on a hybrid host, where
//! the v2 tree (often at `/sys/fs/cgroup/unified`) has no controllers and memory,
//! cpu and pids are v1 hierarchies: each controller is set up wherever the host
//! mounts it. Every capsule gets `wrenn/<name>` in each hierarchy; the VMM joins
//! them before it executes (so nothing it allocates is charged elsewhere), and
//! the groups are removed once it has exited.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

/// Parent group of every capsule's group, in each hierarchy.
pub const PARENT: &str = "wrenn";
/// Scheduler period for the CPU quota.
pub const CPU_PERIOD_US: u64 = 100_000;

/// Where each controller lives on this host.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Layout {
    /// All controllers in one v2 tree rooted here.
    V2(PathBuf),
    /// v1 hierarchies: memory, cpu and pids each at their own mount.
    V1 {
        memory: PathBuf,
        cpu: PathBuf,
        pids: PathBuf,
        /// `blkio` (its weight needs a proportional I/O scheduler; optional).
        blkio: Option<PathBuf>,
    },
}

/// Limits of one capsule's VMM.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    pub memory_bytes: u64,
    /// CPU time per [`CPU_PERIOD_US`], in µs (vCPUs × period).
    pub cpu_quota_us: u64,
    pub pids: u64,
    /// Proportional I/O weight, 1..=10000 (v2 scale; v1 is mapped to 10..=1000).
    pub io_weight: u16,
}

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CgroupError {
    #[error("No usable cgroup hierarchy for {controller} (looked at /proc/self/mountinfo)")]
    Missing { controller: &'static str },
    #[error("cgroup {path}: {step} failed")]
    Io {
        path: PathBuf,
        step: &'static str,
        #[source]
        source: io::Error,
    },
}

fn io_err(path: &Path, step: &'static str) -> impl FnOnce(io::Error) -> CgroupError {
    let path = path.to_owned();
    move |source| CgroupError::Io { path, step, source }
}

impl Layout {
    /// Finds the hierarchies from `/proc/self/mountinfo`.
    pub fn detect() -> Result<Self, CgroupError> {
        let info = fs::read_to_string("/proc/self/mountinfo")
            .map_err(io_err(Path::new("/proc/self/mountinfo"), "read"))?;
        Self::from_mountinfo(&info, |p| fs::read_to_string(p).ok())
    }

    /// The layout described by `mountinfo`; `read` reads a file (for the v2
    /// tree's `cgroup.controllers`).
    pub fn from_mountinfo(
        mountinfo: &str,
        read: impl Fn(&Path) -> Option<String>,
    ) -> Result<Self, CgroupError> {
        let mut v2 = None;
        let mut v1: Vec<(PathBuf, Vec<String>)> = Vec::new();
        for line in mountinfo.lines() {
            // ID PARENT MAJ:MIN ROOT MOUNTPOINT OPTIONS [OPTIONAL...] - FSTYPE SOURCE SUPEROPTS
            let Some((left, right)) = line.split_once(" - ") else {
                continue;
            };
            let mount = left.split(' ').nth(4).map(PathBuf::from);
            let mut r = right.split(' ');
            let (fstype, _source, superopts) = (r.next(), r.next(), r.next().unwrap_or(""));
            match (fstype, mount) {
                (Some("cgroup2"), Some(m)) => v2 = v2.or(Some(m)),
                (Some("cgroup"), Some(m)) => {
                    v1.push((m, superopts.split(',').map(str::to_string).collect()))
                }
                _ => {}
            }
        }
        if let Some(root) = &v2 {
            let controllers = read(&root.join("cgroup.controllers")).unwrap_or_default();
            let has = |c: &str| controllers.split_whitespace().any(|x| x == c);
            if has("memory") && has("cpu") && has("pids") {
                return Ok(Layout::V2(root.clone()));
            }
        }
        let find = |c: &str| {
            v1.iter()
                .find(|(_, opts)| opts.iter().any(|o| o == c))
                .map(|(m, _)| m.clone())
        };
        Ok(Layout::V1 {
            memory: find("memory").ok_or(CgroupError::Missing {
                controller: "memory",
            })?,
            cpu: find("cpu").ok_or(CgroupError::Missing { controller: "cpu" })?,
            pids: find("pids").ok_or(CgroupError::Missing { controller: "pids" })?,
            blkio: find("blkio"),
        })
    }

    /// `v2` or `v1 (hybrid)`, for logs and `wrenn doctor`.
    pub fn describe(&self) -> String {
        match self {
            Layout::V2(root) => format!("cgroup v2 at {}", root.display()),
            Layout::V1 { memory, .. } => format!(
                "cgroup v1 controllers (memory at {}); the v2 tree has none",
                memory.display()
            ),
        }
    }

    /// Every hierarchy this layout uses.
    fn roots(&self) -> Vec<PathBuf> {
        match self {
            Layout::V2(root) => vec![root.clone()],
            Layout::V1 {
                memory,
                cpu,
                pids,
                blkio,
            } => {
                let mut v = vec![memory.clone(), cpu.clone(), pids.clone()];
                v.extend(blkio.clone());
                v
            }
        }
    }

    /// Creates the group `name` with `limits`; the VMM joins it through
    /// [`Cgroup::attach`].
    pub fn create(&self, name: &str, limits: &Limits) -> Result<Cgroup, CgroupError> {
        let mut made = Cgroup {
            dirs: Vec::new(),
            layout: self.clone(),
        };
        for root in self.roots() {
            let parent = root.join(PARENT);
            if let Layout::V2(_) = self {
                enable_controllers(&root)?;
                ensure_dir(&parent)?;
                enable_controllers(&parent)?;
            } else {
                ensure_dir(&parent)?;
            }
            let dir = parent.join(name);
            match fs::create_dir(&dir) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
                Err(e) => return Err(io_err(&dir, "create")(e)),
            }
            made.dirs.push(dir);
        }
        made.apply(limits)?;
        Ok(made)
    }

    /// The groups process `pid` is in, one per hierarchy Wrenn uses (v2: the
    /// one; v1: memory, cpu, pids and blkio where present), as directories.
    pub fn groups_of(&self, pid: u32) -> Option<Vec<PathBuf>> {
        let text = fs::read_to_string(format!("/proc/{pid}/cgroup")).ok()?;
        let path_for = |controller: Option<&str>| {
            text.lines().find_map(|l| {
                let mut it = l.splitn(3, ':');
                let (_, ctrls, path) = (it.next()?, it.next()?, it.next()?);
                let hit = match controller {
                    None => ctrls.is_empty(),
                    Some(c) => ctrls.split(',').any(|x| x == c),
                };
                hit.then(|| path.trim_start_matches('/').to_string())
            })
        };
        match self {
            Layout::V2(root) => Some(vec![root.join(path_for(None)?)]),
            Layout::V1 {
                memory,
                cpu,
                pids,
                blkio,
            } => {
                let mut dirs = vec![
                    memory.join(path_for(Some("memory"))?),
                    cpu.join(path_for(Some("cpu"))?),
                    pids.join(path_for(Some("pids"))?),
                ];
                if let Some(b) = blkio {
                    dirs.push(b.join(path_for(Some("blkio"))?));
                }
                Some(dirs)
            }
        }
    }

    /// The usage counters of the groups process `pid` is in, when they are
    /// Wrenn's (under [`PARENT`]).
    pub fn usage_of(&self, pid: u32) -> Option<wrenn_core::vmm::VmmUsage> {
        let dirs = self.groups_of(pid)?;
        let ours = |d: &PathBuf| self.roots().iter().any(|r| d.starts_with(r.join(PARENT)));
        if !dirs.iter().all(ours) {
            return None;
        }
        let group = Cgroup {
            dirs,
            layout: self.clone(),
        };
        Some(wrenn_core::vmm::VmmUsage {
            memory_bytes: group.memory_bytes()?,
            cpu_usage_us: group.cpu_usage_us(),
        })
    }

    /// Removes the groups of VMMs that are gone (leftovers of a crash): every
    /// empty group under [`PARENT`] older than a minute (a younger one may be
    /// waiting for the VMM another process is starting). Groups with a live
    /// process stay (the kernel refuses to remove them).
    pub fn sweep(&self) -> usize {
        let mut removed = 0;
        let young = |p: &Path| {
            fs::metadata(p)
                .and_then(|m| m.modified())
                .ok()
                .and_then(|t| t.elapsed().ok())
                .is_none_or(|age| age < std::time::Duration::from_secs(60))
        };
        for root in self.roots() {
            let Ok(rd) = fs::read_dir(root.join(PARENT)) else {
                continue;
            };
            for e in rd.flatten() {
                let p = e.path();
                let live_spare = e
                    .file_name()
                    .to_str()
                    .and_then(spare_owner)
                    .is_some_and(|pid| Path::new(&format!("/proc/{pid}")).exists());
                if p.is_dir() && !live_spare && !young(&p) && fs::remove_dir(&p).is_ok() {
                    removed += 1;
                }
            }
        }
        removed
    }
}

/// The process a spare group (`spare-<pid>-<n>`) was made by.
fn spare_owner(name: &str) -> Option<u32> {
    name.strip_prefix("spare-")?.split('-').next()?.parse().ok()
}

/// Groups made ahead of time, so a VMM start does not wait for `mkdir` in every
/// hierarchy (milliseconds each on some hosts). A spare is renamed to its VMM's
/// name when taken, which v1 hierarchies allow; on a v2 host (one `mkdir`, and no
/// rename) groups are made on demand.
#[derive(Debug)]
pub struct Pool {
    layout: Layout,
    spares: std::sync::Mutex<Vec<Cgroup>>,
    refilling: std::sync::atomic::AtomicBool,
    next: std::sync::atomic::AtomicU64,
}

/// Spares kept ready.
const SPARES: usize = 2;

impl Pool {
    pub fn new(layout: Layout) -> std::sync::Arc<Self> {
        let pool = std::sync::Arc::new(Pool {
            layout,
            spares: std::sync::Mutex::new(Vec::new()),
            refilling: std::sync::atomic::AtomicBool::new(false),
            next: std::sync::atomic::AtomicU64::new(0),
        });
        pool.refill();
        pool
    }

    pub fn layout(&self) -> &Layout {
        &self.layout
    }

    /// The group `name` with `limits`: a renamed spare when one is ready.
    pub fn take(
        self: &std::sync::Arc<Self>,
        name: &str,
        limits: &Limits,
    ) -> Result<Cgroup, CgroupError> {
        let spare = match self.layout {
            Layout::V1 { .. } => self.spares.lock().ok().and_then(|mut s| s.pop()),
            Layout::V2(_) => None,
        };
        let group = match spare.map(|s| s.rename(name)) {
            Some(Ok(g)) => {
                g.apply(limits)?;
                g
            }
            Some(Err(leftover)) => {
                let _ = leftover.remove();
                self.layout.create(name, limits)?
            }
            None => self.layout.create(name, limits)?,
        };
        self.refill();
        Ok(group)
    }

    /// The existing group `name` (of a VMM started by an earlier process of this host,
    /// taken over by this one).
    pub fn adopt(&self, name: &str) -> Result<Cgroup, CgroupError> {
        let dirs: Vec<PathBuf> = self
            .layout
            .roots()
            .into_iter()
            .map(|root| root.join(PARENT).join(name))
            .collect();
        if let Some(missing) = dirs.iter().find(|d| !d.is_dir()) {
            return Err(CgroupError::Io {
                path: missing.clone(),
                step: "adopt",
                source: std::io::Error::from(std::io::ErrorKind::NotFound),
            });
        }
        Ok(Cgroup {
            dirs,
            layout: self.layout.clone(),
        })
    }

    /// Makes spares up to [`SPARES`], on a thread of its own.
    fn refill(self: &std::sync::Arc<Self>) {
        use std::sync::atomic::Ordering;
        if !matches!(self.layout, Layout::V1 { .. }) || self.refilling.swap(true, Ordering::AcqRel)
        {
            return;
        }
        let me = self.clone();
        let spawned = std::thread::Builder::new()
            .name("wrenn-cgroup-spares".into())
            .spawn(move || {
                loop {
                    let have = me.spares.lock().map(|s| s.len()).unwrap_or(SPARES);
                    if have >= SPARES {
                        break;
                    }
                    let n = me.next.fetch_add(1, Ordering::Relaxed);
                    let name = format!("spare-{}-{n}", std::process::id());
                    let unlimited = Limits {
                        memory_bytes: u64::MAX >> 2,
                        cpu_quota_us: CPU_PERIOD_US * 64,
                        pids: 4096,
                        io_weight: 100,
                    };
                    match me.layout.create(&name, &unlimited) {
                        Ok(g) => match me.spares.lock() {
                            Ok(mut s) => s.push(g),
                            Err(_) => break,
                        },
                        Err(e) => {
                            tracing::warn!(error = %e, "cannot make a spare cgroup");
                            break;
                        }
                    }
                }
                me.refilling.store(false, Ordering::Release);
            });
        if spawned.is_err() {
            self.refilling
                .store(false, std::sync::atomic::Ordering::Release);
        }
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        if let Ok(spares) = self.spares.get_mut() {
            for g in spares.drain(..) {
                let _ = g.remove();
            }
        }
    }
}

fn ensure_dir(dir: &Path) -> Result<(), CgroupError> {
    match fs::create_dir(dir) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(()),
        Err(e) => Err(io_err(dir, "create")(e)),
    }
}

/// Lets the children of `dir` (v2) use memory, cpu, pids and, where present, io.
fn enable_controllers(dir: &Path) -> Result<(), CgroupError> {
    let available = fs::read_to_string(dir.join("cgroup.controllers")).unwrap_or_default();
    let enabled = fs::read_to_string(dir.join("cgroup.subtree_control")).unwrap_or_default();
    let want: Vec<String> = ["memory", "cpu", "pids", "io"]
        .into_iter()
        .filter(|c| available.split_whitespace().any(|a| a == *c))
        .filter(|c| !enabled.split_whitespace().any(|a| a == *c))
        .map(|c| format!("+{c}"))
        .collect();
    if want.is_empty() {
        return Ok(());
    }
    let path = dir.join("cgroup.subtree_control");
    fs::write(&path, want.join(" ")).map_err(io_err(&path, "enable controllers"))
}

/// One capsule's groups (one per hierarchy).
#[derive(Debug)]
pub struct Cgroup {
    dirs: Vec<PathBuf>,
    layout: Layout,
}

impl Cgroup {
    /// The same groups under another name (v1 hierarchies allow renames); on
    /// failure, what is left to remove.
    fn rename(self, name: &str) -> Result<Cgroup, Cgroup> {
        let mut renamed = Vec::new();
        for dir in &self.dirs {
            let to = dir.with_file_name(name);
            if fs::rename(dir, &to).is_err() {
                // Put back what moved, and hand everything back for removal.
                for (from, to) in renamed.iter().zip(self.dirs.iter()) {
                    let _ = fs::rename(from, to);
                }
                return Err(self);
            }
            renamed.push(to);
        }
        Ok(Cgroup {
            dirs: renamed,
            layout: self.layout,
        })
    }

    fn write(&self, dir: &Path, file: &str, value: &str) -> Result<(), CgroupError> {
        let path = dir.join(file);
        fs::write(&path, value).map_err(io_err(&path, "write a limit"))
    }

    fn dir_of(&self, root: &Path) -> Option<&PathBuf> {
        self.dirs.iter().find(|d| d.starts_with(root))
    }

    /// Writes `limits` (also to change them later).
    pub fn apply(&self, limits: &Limits) -> Result<(), CgroupError> {
        match &self.layout {
            Layout::V2(_) => {
                let dir = &self.dirs[0];
                self.write(dir, "memory.max", &limits.memory_bytes.to_string())?;
                // No swapping the VMM out to dodge its limit.
                if dir.join("memory.swap.max").exists() {
                    self.write(dir, "memory.swap.max", "0")?;
                }
                self.write(
                    dir,
                    "cpu.max",
                    &format!("{} {CPU_PERIOD_US}", limits.cpu_quota_us),
                )?;
                self.write(dir, "pids.max", &limits.pids.to_string())?;
                if dir.join("io.weight").exists() {
                    self.write(dir, "io.weight", &format!("default {}", limits.io_weight))?;
                }
            }
            Layout::V1 {
                memory,
                cpu,
                pids,
                blkio,
            } => {
                if let Some(d) = self.dir_of(memory) {
                    self.write(d, "memory.limit_in_bytes", &limits.memory_bytes.to_string())?;
                    if d.join("memory.memsw.limit_in_bytes").exists() {
                        self.write(
                            d,
                            "memory.memsw.limit_in_bytes",
                            &limits.memory_bytes.to_string(),
                        )?;
                    }
                }
                if let Some(d) = self.dir_of(cpu) {
                    self.write(d, "cpu.cfs_period_us", &CPU_PERIOD_US.to_string())?;
                    self.write(d, "cpu.cfs_quota_us", &limits.cpu_quota_us.to_string())?;
                }
                if let Some(d) = self.dir_of(pids) {
                    self.write(d, "pids.max", &limits.pids.to_string())?;
                }
                if let Some(d) = blkio.as_ref().and_then(|b| self.dir_of(b)) {
                    // Only with a proportional I/O scheduler (BFQ); else not offered.
                    if d.join("blkio.bfq.weight").exists() {
                        let w = (u64::from(limits.io_weight) / 10).clamp(10, 1000);
                        self.write(d, "blkio.bfq.weight", &w.to_string())?;
                    }
                }
            }
        }
        Ok(())
    }

    /// Moves process `pid` (all its threads) into every group. On a v1
    /// hierarchy each move waits for an RCU grace period (milliseconds), so
    /// callers overlap it with the VMM's own start-up.
    pub fn attach(&self, pid: u32) -> Result<(), CgroupError> {
        for d in &self.dirs {
            let procs = d.join("cgroup.procs");
            fs::write(&procs, pid.to_string()).map_err(io_err(&procs, "attach"))?;
        }
        Ok(())
    }

    /// The group directories (one per hierarchy).
    pub fn dirs(&self) -> &[PathBuf] {
        &self.dirs
    }

    /// Bytes the group's processes use now (page cache included).
    pub fn memory_bytes(&self) -> Option<u64> {
        let file = match &self.layout {
            Layout::V2(_) => self.dirs[0].join("memory.current"),
            Layout::V1 { memory, .. } => self.dir_of(memory)?.join("memory.usage_in_bytes"),
        };
        fs::read_to_string(file).ok()?.trim().parse().ok()
    }

    /// CPU time the group used, in µs.
    pub fn cpu_usage_us(&self) -> Option<u64> {
        match &self.layout {
            Layout::V2(_) => {
                let stat = fs::read_to_string(self.dirs[0].join("cpu.stat")).ok()?;
                stat.lines()
                    .find_map(|l| l.strip_prefix("usage_usec "))
                    .and_then(|v| v.trim().parse().ok())
            }
            Layout::V1 { cpu, .. } => {
                let d = self.dir_of(cpu)?;
                // cpuacct is often co-mounted with cpu; else it has its own hierarchy.
                let ns: u64 = fs::read_to_string(d.join("cpuacct.usage"))
                    .ok()?
                    .trim()
                    .parse()
                    .ok()?;
                Some(ns / 1000)
            }
        }
    }

    /// Removes the groups; call once the VMM has exited. Retries briefly, since
    /// a group stays busy until its last task is fully released.
    pub fn remove(&self) -> Result<(), CgroupError> {
        for dir in self.dirs.iter().rev() {
            let mut tries = 0;
            loop {
                match fs::remove_dir(dir) {
                    Ok(()) => break,
                    Err(e) if e.kind() == io::ErrorKind::NotFound => break,
                    Err(e) if tries < 50 => {
                        let _ = e;
                        tries += 1;
                        std::thread::sleep(std::time::Duration::from_millis(10));
                    }
                    Err(e) => return Err(io_err(dir, "remove")(e)),
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HYBRID: &str = "\
30 23 0:26 / /sys/fs/cgroup ro,nosuid,nodev,noexec shared:9 - tmpfs tmpfs ro,mode=755
31 30 0:27 / /sys/fs/cgroup/unified rw,nosuid,nodev,noexec,relatime shared:10 - cgroup2 cgroup2 rw,nsdelegate
33 30 0:29 / /sys/fs/cgroup/memory rw,nosuid,nodev,noexec,relatime shared:13 - cgroup cgroup rw,memory
34 30 0:30 / /sys/fs/cgroup/cpu,cpuacct rw,nosuid,nodev,noexec,relatime shared:14 - cgroup cgroup rw,cpu,cpuacct
35 30 0:31 / /sys/fs/cgroup/pids rw,nosuid,nodev,noexec,relatime shared:15 - cgroup cgroup rw,pids
36 30 0:32 / /sys/fs/cgroup/blkio rw,nosuid,nodev,noexec,relatime shared:16 - cgroup cgroup rw,blkio
";

    #[test]
    fn hybrid_hosts_use_the_v1_controllers() {
        let l = Layout::from_mountinfo(HYBRID, |_| Some("hugetlb\n".into())).unwrap();
        assert_eq!(
            l,
            Layout::V1 {
                memory: "/sys/fs/cgroup/memory".into(),
                cpu: "/sys/fs/cgroup/cpu,cpuacct".into(),
                pids: "/sys/fs/cgroup/pids".into(),
                blkio: Some("/sys/fs/cgroup/blkio".into()),
            }
        );
    }

    #[test]
    fn a_v2_tree_with_the_controllers_wins() {
        let l = Layout::from_mountinfo(HYBRID, |_| Some("cpu io memory pids\n".into())).unwrap();
        assert_eq!(l, Layout::V2("/sys/fs/cgroup/unified".into()));
        let pure = "25 1 0:22 / /sys/fs/cgroup rw,nosuid - cgroup2 cgroup2 rw\n";
        let l =
            Layout::from_mountinfo(pure, |_| Some("cpuset cpu io memory pids\n".into())).unwrap();
        assert_eq!(l, Layout::V2("/sys/fs/cgroup".into()));
        assert!(matches!(
            Layout::from_mountinfo(pure, |_| Some(String::new())),
            Err(CgroupError::Missing { .. })
        ));
    }
}
