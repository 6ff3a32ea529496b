//! Capsule records as files (`capsules/<id>/state.json`) and host process facts.

use crate::paths::DataDir;
use async_trait::async_trait;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use wrenn_core::id::CapsuleId;
use wrenn_core::record::{CapsuleRecord, Owner, StateError, StateStore};

const STATE_FILE: &str = "state.json";

/// Stores records under `capsules/` of a data directory.
#[derive(Clone, Debug)]
pub struct FsStateStore {
    data: DataDir,
}

impl FsStateStore {
    pub fn new(data: DataDir) -> Self {
        FsStateStore { data }
    }

    fn dir(&self, id: &CapsuleId) -> PathBuf {
        self.data.capsules().join(id.as_str())
    }
}

fn err(context: String, e: impl std::error::Error + Send + Sync + 'static) -> StateError {
    StateError {
        context,
        source: Box::new(e),
    }
}

use wrenn_net::owner::process_start_time;

/// Capsule ids of running VMM processes tagged `-name wrenn-<id>`, with their pids.
pub fn tagged_vmms() -> Vec<(u32, CapsuleId)> {
    let mut out = Vec::new();
    let Ok(rd) = std::fs::read_dir("/proc") else {
        return out;
    };
    for e in rd.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        let Ok(cmdline) = std::fs::read(e.path().join("cmdline")) else {
            continue;
        };
        let args: Vec<&[u8]> = cmdline.split(|b| *b == 0).collect();
        for w in args.windows(2) {
            if w[0] == b"-name" {
                let name = String::from_utf8_lossy(w[1]);
                let tag = name.split(',').next().unwrap_or("");
                if let Some(id) = tag
                    .strip_prefix("wrenn-")
                    .and_then(|s| CapsuleId::parse(s).ok())
                {
                    out.push((pid, id));
                }
            }
        }
    }
    out
}

/// A capsule directory younger than this without a readable record is a create in
/// progress (its record follows within milliseconds), not a leftover.
const RECORD_GRACE: std::time::Duration = std::time::Duration::from_secs(30);

/// The record in capsule directory `dir`, if it has a readable one.
fn read_record(dir: &Path) -> Option<CapsuleRecord> {
    std::fs::read(dir.join(STATE_FILE))
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
}

fn recently_created(dir: &Path) -> bool {
    std::fs::metadata(dir)
        .and_then(|m| m.modified())
        .ok()
        .and_then(|t| t.elapsed().ok())
        .is_some_and(|age| age < RECORD_GRACE)
}

fn rand_u32() -> u32 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    nanos ^ std::process::id().rotate_left(13)
}

#[async_trait]
impl StateStore for FsStateStore {
    async fn create_dir(&self, id: &CapsuleId) -> Result<PathBuf, StateError> {
        let dir = self.dir(id);
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&dir)
            .map_err(|e| err(format!("creating {}", dir.display()), e))?;
        Ok(dir)
    }

    async fn remove_dir(&self, id: &CapsuleId) -> Result<(), StateError> {
        let dir = self.dir(id);
        match tokio::fs::remove_dir_all(&dir).await {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(err(format!("removing {}", dir.display()), e)),
        }
    }

    async fn scratch_dir(&self, id: &CapsuleId, what: &str) -> Result<PathBuf, StateError> {
        let dir = self.dir(id).join(format!("{what}-{:08x}", rand_u32()));
        std::fs::create_dir_all(&dir).map_err(|e| err(format!("creating {}", dir.display()), e))?;
        Ok(dir)
    }

    async fn remove_scratch(&self, dir: &Path) {
        let _ = tokio::fs::remove_dir_all(dir).await;
    }

    fn available_bytes(&self) -> Option<u64> {
        let st = nix::sys::statvfs::statvfs(&self.data.capsules()).ok()?;
        Some(st.blocks_available().saturating_mul(st.fragment_size()))
    }

    fn allocated_bytes(&self, path: &Path) -> u64 {
        use std::os::unix::fs::MetadataExt;
        std::fs::metadata(path)
            .map(|m| m.blocks().saturating_mul(512))
            .unwrap_or(0)
    }

    async fn save(&self, record: &CapsuleRecord) -> Result<(), StateError> {
        let path = self.dir(&record.id).join(STATE_FILE);
        let bytes = serde_json::to_vec_pretty(record)
            .map_err(|e| err("encoding capsule record".into(), e))?;
        let p = path.clone();
        tokio::task::spawn_blocking(move || wrenn_core::fsutil::write_atomic(&p, &bytes))
            .await
            .map_err(|e| err("writing capsule record".into(), e))?
            .map_err(|e| err(format!("writing {}", path.display()), e))
    }

    async fn list(&self) -> Result<Vec<(CapsuleId, Option<CapsuleRecord>)>, StateError> {
        let mut out = Vec::new();
        let root = self.data.capsules();
        let rd = match std::fs::read_dir(&root) {
            Ok(rd) => rd,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(out),
            Err(e) => return Err(err(format!("listing {}", root.display()), e)),
        };
        for e in rd.flatten() {
            let Some(id) = e
                .file_name()
                .to_str()
                .and_then(|s| CapsuleId::parse(s).ok())
            else {
                continue;
            };
            let rec = read_record(&e.path());
            if rec.is_none() && recently_created(&e.path()) {
                // Another process is creating it and has not written its record yet.
                continue;
            }
            out.push((id, rec));
        }
        out.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(out)
    }

    fn current_owner(&self) -> Owner {
        let pid = std::process::id();
        Owner {
            pid,
            start_time: process_start_time(pid).unwrap_or(0),
        }
    }

    fn owner_alive(&self, owner: &Owner) -> bool {
        process_start_time(owner.pid) == Some(owner.start_time)
    }

    async fn kill_orphan_vmms(&self, keep: &[CapsuleId]) -> usize {
        // VMMs of other data directories (other hosts on this machine) are not ours.
        let ours = |pid: u32, id: &CapsuleId| {
            let dir = self.dir(id);
            std::fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|c| {
                c.windows(dir.as_os_str().len() + 1)
                    .any(|w| w.starts_with(dir.as_os_str().as_encoded_bytes()) && w.ends_with(b"/"))
            })
        };
        // A capsule another live process created after the caller listed the records
        // is that process's, not an orphan: its record is read again before a kill.
        let me = std::process::id();
        let owned_elsewhere = |id: &CapsuleId| {
            read_record(&self.dir(id))
                .is_some_and(|r| r.owner.pid != me && self.owner_alive(&r.owner))
        };
        let mut killed = Vec::new();
        for (pid, id) in tagged_vmms() {
            if keep.contains(&id) || !ours(pid, &id) || owned_elsewhere(&id) {
                continue;
            }
            let Ok(p) = i32::try_from(pid) else { continue };
            tracing::info!(pid, capsule = %id, "killing orphaned VMM");
            let _ = kill(Pid::from_raw(-p), Signal::SIGKILL);
            if kill(Pid::from_raw(p), Signal::SIGKILL).is_ok() {
                killed.push(pid);
            }
        }
        if !killed.is_empty() {
            // Let the kernel tear the processes down before their taps and files go.
            for _ in 0..50 {
                if tagged_vmms().iter().all(|(pid, _)| !killed.contains(pid)) {
                    break;
                }
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            }
        }
        killed.len()
    }
}
