//! Paused capsules and snapshot templates on disk: [`FsSnapshotStore`].
//!
//! ```text
//! snapshots/<id>/current -> v<N>      the commit point (a symlink swapped atomically)
//! snapshots/<id>/v<N>/                one immutable version:
//!     meta.json  device.state  memory.header  memory.gen-*   memory state
//!     memory.base (hardlink of the template memory image, when there is one)
//!     disk.base   (hardlink of the template root image)  disk-<k>.qcow2 layers
//! snapshots/<id>/next/                the pause being written (discarded if it dies)
//! templates/<name>/rootfs.img, templates/<name>/snapshot/{meta.json,device.state,memory.raw}
//! ```
//! A pause builds `next/` from hardlinks of the current version plus the new
//! generation, device state and disk layer, renames it to `v<N+1>` and swaps
//! `current`: killing the process at any point leaves the previous version whole.
//! Files of a version are never written after it is committed.

use crate::snapshot::{BaseRef, Id, MemorySnapshot, PAGE_SIZE};
use async_trait::async_trait;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use wrenn_core::id::CapsuleId;
use wrenn_core::memory::{PageContent, PageSource};
use wrenn_core::snapshot::{PauseReport, Restorable, SnapshotError, SnapshotMeta, SnapshotStore};
use wrenn_core::storage::{CowDisk, CowStore, StorageError};
use wrenn_core::template::TemplateName;
use wrenn_core::vmm::{ChangedPages, MemoryBase, SavedState};

/// Generations kept before they are merged into one.
pub const DEFAULT_GENERATION_CAP: usize = 8;
/// Disk layers kept before the newest is rebased onto the base image.
pub const DISK_LAYER_CAP: usize = 8;

/// The files of a template, under `templates/<name>/`: the one place that layout is
/// spelled out (the template store and the snapshot store use these).
pub mod template_files {
    /// The read-only root filesystem image.
    pub const ROOTFS: &str = "rootfs.img";
    /// The directory of its pre-booted snapshot (absent when it has none).
    pub const SNAPSHOT: &str = "snapshot";
    /// The snapshot's memory image, inside [`SNAPSHOT`].
    pub const MEMORY: &str = "memory.raw";
    /// The snapshot's metadata (a `SnapshotMeta`), inside [`SNAPSHOT`].
    pub const META: &str = super::META;
}
use template_files::{
    MEMORY as TEMPLATE_MEMORY, ROOTFS as TEMPLATE_ROOTFS, SNAPSHOT as TEMPLATE_SNAPSHOT,
};

const META: &str = "meta.json";
const DEVICE_STATE: &str = "device.state";
const MEMORY_BASE: &str = "memory.base";
const DISK_BASE: &str = "disk.base";

fn backend(e: impl std::error::Error + Send + Sync + 'static) -> SnapshotError {
    SnapshotError::Backend(Box::new(e))
}

fn io_err(step: &str, path: &Path) -> impl FnOnce(std::io::Error) -> SnapshotError {
    let (step, path) = (step.to_string(), path.to_path_buf());
    move |e| SnapshotError::Backend(format!("{step} {}: {e}", path.display()).into())
}

fn corrupt(e: crate::snapshot::SnapshotError) -> SnapshotError {
    use crate::snapshot::SnapshotError as S;
    match e {
        S::Io { .. } => backend(e),
        other => SnapshotError::Corrupt {
            reason: other.to_string(),
        },
    }
}

/// Flushes a file written by another program (the VMM, `qemu-img`) or copied, before the
/// rename or commit that makes it part of a version.
fn sync_file(path: &Path) -> Result<(), SnapshotError> {
    std::fs::File::open(path)
        .and_then(|f| f.sync_all())
        .map_err(io_err("fsync", path))
}

fn sync_dir(dir: &Path) -> Result<(), SnapshotError> {
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_err("fsync", dir))
}

fn write_file_atomic(path: &Path, bytes: &[u8]) -> Result<(), SnapshotError> {
    wrenn_core::fsutil::write_atomic(path, bytes).map_err(io_err("write", path))
}

/// Links `src` at `dst`, replacing `dst`.
fn link(src: &Path, dst: &Path) -> Result<(), SnapshotError> {
    let _ = std::fs::remove_file(dst);
    std::fs::hard_link(src, dst).map_err(io_err("hard-link", src))
}

/// A 16-byte id for a base memory file, stable for the file (inode and size).
fn base_id(path: &Path) -> Result<(Id, u64), SnapshotError> {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(path).map_err(io_err("stat", path))?;
    let v = (u128::from(m.dev()) << 64) | u128::from(m.ino());
    Ok((Id(v.max(1).to_be_bytes()), m.len()))
}

fn disk_err(e: StorageError) -> SnapshotError {
    SnapshotError::Backend(Box::new(e))
}

/// Moves a file into place (a copy when it is on another filesystem), synced.
fn take_file(src: &Path, dest: &Path) -> Result<(), SnapshotError> {
    if src != dest && std::fs::rename(src, dest).is_err() {
        std::fs::copy(src, dest).map_err(io_err("copy", src))?;
    }
    sync_file(dest)
}

/// Snapshot versions, generations and templates under a data directory. Disk
/// layers are chained, folded and flattened by its [`CowStore`].
#[derive(Clone, Debug)]
pub struct FsSnapshotStore {
    snapshots: PathBuf,
    templates: PathBuf,
    generation_cap: usize,
    disks: Arc<dyn CowStore>,
}

impl FsSnapshotStore {
    /// `disks` is the store that made the capsules' writable disks; it must flatten
    /// a disk a paused VMM still has open (templates are written from paused VMs).
    pub fn new(
        snapshots: impl Into<PathBuf>,
        templates: impl Into<PathBuf>,
        disks: Arc<dyn CowStore>,
    ) -> Self {
        FsSnapshotStore {
            snapshots: snapshots.into(),
            templates: templates.into(),
            generation_cap: DEFAULT_GENERATION_CAP,
            disks,
        }
    }

    /// Merge generations when a pause would make this many (default 8).
    /// Removes the staging directories of template writes whose process is gone
    /// (killed mid-write) from the templates directory; how many. Writes of live
    /// processes sharing the directory are left alone.
    pub fn remove_unfinished_templates(&self) -> usize {
        let Ok(rd) = std::fs::read_dir(&self.templates) else {
            return 0;
        };
        let mut removed = 0;
        for e in rd.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let gone = stage_writer(&name).is_some_and(|pid| !wrenn_core::process::runs(pid));
            if gone {
                match std::fs::remove_dir_all(e.path()) {
                    Ok(()) => removed += 1,
                    Err(err) => tracing::warn!(dir = %e.path().display(), error = %err,
                        "unfinished template write not removed"),
                }
            }
        }
        removed
    }

    /// Flattens `disk` (its VM stopped) into the staged template `stage` and puts it in
    /// place of template `name`; a failure removes the stage.
    async fn publish_with_disk(
        &self,
        stage: PathBuf,
        name: &TemplateName,
        disk: &CowDisk,
    ) -> Result<(), SnapshotError> {
        let result = async {
            self.disks
                .flatten(disk, &stage.join(TEMPLATE_ROOTFS))
                .await
                .map_err(disk_err)?;
            let (templates, name, stage) = (self.templates.clone(), name.clone(), stage.clone());
            blocking(move || publish_template_blocking(&templates, &name, &stage)).await
        }
        .await;
        if result.is_err() {
            let _ = std::fs::remove_dir_all(&stage);
        }
        result
    }

    pub fn with_generation_cap(mut self, cap: usize) -> Self {
        self.generation_cap = cap.max(1);
        self
    }

    fn root(&self, id: &CapsuleId) -> PathBuf {
        self.snapshots.join(id.as_str())
    }

    fn current(&self, id: &CapsuleId) -> Option<PathBuf> {
        let root = self.root(id);
        let target = std::fs::read_link(root.join("current")).ok()?;
        Some(root.join(target))
    }

    /// Base memory file of a version, if its memory is layered over one.
    fn base_file(dir: &Path) -> Option<PathBuf> {
        let p = dir.join(MEMORY_BASE);
        p.exists().then_some(p)
    }

    fn disk_layers(dir: &Path) -> Vec<(u32, PathBuf)> {
        let mut layers: Vec<(u32, PathBuf)> = std::fs::read_dir(dir)
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| {
                let name = e.file_name().to_str()?.to_string();
                let k: u32 = name
                    .strip_prefix("disk-")?
                    .strip_suffix(".qcow2")?
                    .parse()
                    .ok()?;
                Some((k, e.path()))
            })
            .collect();
        layers.sort();
        layers
    }

    fn read_meta(dir: &Path) -> Result<SnapshotMeta, SnapshotError> {
        let p = dir.join(META);
        let bytes = std::fs::read(&p).map_err(io_err("read", &p))?;
        serde_json::from_slice(&bytes).map_err(|e| SnapshotError::Corrupt {
            reason: format!("{}: {e}", p.display()),
        })
    }

    /// Fills `next/` with what a new version keeps of the current one and the
    /// memory of `saved` (`None`: a disk-only version, no memory, no device state).
    /// Returns the pause's report and the current version.
    fn stage_blocking(
        &self,
        id: &CapsuleId,
        meta: &SnapshotMeta,
        saved: Option<&SavedState>,
    ) -> Result<(PauseReport, Option<PathBuf>), SnapshotError> {
        let root = self.root(id);
        let next = root.join("next");
        let current = self.current(id);
        // A disk-only version holds no memory: the next full pause starts a new chain.
        let current_memory = match &current {
            Some(cur) => !Self::read_meta(cur)?.disk_only,
            None => false,
        };
        if let Some(cur) = &current {
            for e in std::fs::read_dir(cur)
                .map_err(io_err("list", cur))?
                .flatten()
            {
                let name = e.file_name();
                let n = name.to_string_lossy();
                let memory_file = n.starts_with("memory.");
                if (memory_file && current_memory && saved.is_some())
                    || n == DISK_BASE
                    || (n.starts_with("disk-") && n.ends_with(".qcow2"))
                {
                    link(&e.path(), &next.join(&name))?;
                }
            }
        }
        let mut report = PauseReport::default();
        if let Some(saved) = saved {
            take_file(&saved.device_state, &next.join(DEVICE_STATE))?;
            report = Self::add_memory(
                &next,
                meta,
                &saved.changed,
                current_memory,
                self.generation_cap,
            )?;
        }
        Ok((report, current))
    }

    /// Commits `next/` as the new current version: the memory of `saved` (`None`: a
    /// disk-only version), `disk` as the newest layer (`None`: the current version's
    /// disk chain is kept as it is).
    async fn commit(
        &self,
        id: &CapsuleId,
        meta: &SnapshotMeta,
        saved: Option<SavedState>,
        disk: Option<&CowDisk>,
    ) -> Result<PauseReport, SnapshotError> {
        let (me, id2, meta2) = (self.clone(), id.clone(), meta.clone());
        let (report, current) =
            blocking(move || me.stage_blocking(&id2, &meta2, saved.as_ref())).await?;
        let root = self.root(id);
        let next = root.join("next");
        match disk {
            Some(disk) => self.add_disk_layer(&next, disk, current.is_none()).await?,
            None if current.is_none() => {
                return Err(SnapshotError::NotFound { id: id.to_string() })
            }
            None => {}
        }
        let meta = meta.clone();
        blocking(move || Self::switch(&root, &next, current, &meta)).await?;
        Ok(report)
    }

    /// The memory part of a full pause (the device state is in `next/`): the
    /// changed pages as a new generation over the linked chain (a new chain when
    /// there is none to continue).
    fn add_memory(
        next: &Path,
        meta: &SnapshotMeta,
        changed: &ChangedPages,
        continue_chain: bool,
        generation_cap: usize,
    ) -> Result<PauseReport, SnapshotError> {
        let device_state = next.join(DEVICE_STATE);
        let device_state_bytes = std::fs::metadata(&device_state)
            .map_err(io_err("stat", &device_state))?
            .len();
        let mem = if continue_chain {
            MemorySnapshot::load(next).map_err(corrupt)?
        } else {
            let base = match &meta.memory_base {
                MemoryBase::Zero => BaseRef::Zero,
                MemoryBase::File(p) => {
                    link(p, &next.join(MEMORY_BASE))?;
                    let (id, size) = base_id(&next.join(MEMORY_BASE))?;
                    BaseRef::File { id, size }
                }
            };
            MemorySnapshot::create(next, meta.mem_bytes, base).map_err(corrupt)?
        };
        // Pages written back at the last restore look changed to the VMM; keep only real changes.
        let source = mem
            .page_source(Self::base_file(next).as_deref())
            .map_err(corrupt)?;
        let mut buf = vec![0u8; PAGE_SIZE as usize];
        let mut kept: Vec<(u64, &[u8])> = Vec::with_capacity(changed.len());
        for (page, data) in changed.iter() {
            let same = match source.read_page(page * PAGE_SIZE, &mut buf) {
                Ok(PageContent::Data) => buf.as_slice() == data,
                Ok(PageContent::Zero) => data.iter().all(|b| *b == 0),
                Err(_) => false,
            };
            if !same {
                kept.push((page, data));
            }
        }
        drop(source);
        let memory_bytes_written = kept
            .iter()
            .filter(|(_, d)| d.iter().any(|b| *b != 0))
            .count() as u64
            * PAGE_SIZE;
        let mut mem = mem.add_generation(kept.iter().copied()).map_err(corrupt)?;
        let merged = mem.generations() >= generation_cap;
        if merged {
            mem = mem.merge().map_err(corrupt)?;
        }
        Ok(PauseReport {
            memory_bytes_written,
            pages_reported: changed.len() as u64,
            device_state_bytes,
            generations: mem.generations(),
            merged,
        })
    }

    /// The VM's writable layer joins the disk chain of `next/`, backed by its sibling;
    /// past [`DISK_LAYER_CAP`] layers the newest takes in the rest and stands on the base.
    async fn add_disk_layer(
        &self,
        next: &Path,
        disk: &CowDisk,
        first: bool,
    ) -> Result<(), SnapshotError> {
        // The layer's VMM wrote it; the disk store and later VMMs will read it.
        self.disks.check(disk).await.map_err(disk_err)?;
        let (dir, d) = (next.to_path_buf(), disk.clone());
        let (layer, below) = blocking(move || {
            if first {
                link(&d.base, &dir.join(DISK_BASE))?;
            }
            let layers = Self::disk_layers(&dir);
            let k = layers.last().map(|(k, _)| k + 1).unwrap_or(0);
            let layer = dir.join(format!("disk-{k}.qcow2"));
            link(&d.path, &layer)?;
            Ok((layer, layers))
        })
        .await?;
        // The layer was made over a path elsewhere; its sibling holds the same data.
        let backing = match below.last() {
            Some((_, p)) => PathBuf::from(p.file_name().unwrap_or_default()),
            None => PathBuf::from(DISK_BASE),
        };
        self.disks
            .rebind(&layer, &backing)
            .await
            .map_err(disk_err)?;
        if below.len() + 1 > DISK_LAYER_CAP {
            self.disks
                .fold(&layer, Path::new(DISK_BASE))
                .await
                .map_err(disk_err)?;
            blocking(move || {
                for (_, p) in below {
                    std::fs::remove_file(&p).map_err(io_err("remove", &p))?;
                }
                Ok(())
            })
            .await?;
        }
        Ok(())
    }

    /// Writes the meta into `next/`, renames it to the next version and points
    /// `current` at it; the previous version goes.
    fn switch(
        root: &Path,
        next: &Path,
        current: Option<PathBuf>,
        meta: &SnapshotMeta,
    ) -> Result<(), SnapshotError> {
        let bytes = serde_json::to_vec_pretty(meta).map_err(backend)?;
        write_file_atomic(&next.join(META), &bytes)?;
        sync_dir(next)?;
        let version = current
            .as_ref()
            .and_then(|c| {
                c.file_name()?
                    .to_str()?
                    .strip_prefix('v')?
                    .parse::<u64>()
                    .ok()
            })
            .map(|n| n + 1)
            .unwrap_or(1);
        let vdir = root.join(format!("v{version}"));
        let _ = std::fs::remove_dir_all(&vdir);
        std::fs::rename(next, &vdir).map_err(io_err("rename", next))?;
        let link_tmp = root.join("current.tmp");
        let _ = std::fs::remove_file(&link_tmp);
        std::os::unix::fs::symlink(format!("v{version}"), &link_tmp)
            .map_err(io_err("symlink", &link_tmp))?;
        std::fs::rename(&link_tmp, root.join("current")).map_err(io_err("rename", &link_tmp))?;
        sync_dir(root)?;
        // The previous version is no longer referenced.
        if let Some(cur) = current {
            let _ = std::fs::remove_dir_all(cur);
        }
        Ok(())
    }

    fn open_blocking(&self, id: &CapsuleId) -> Result<Restorable, SnapshotError> {
        let dir = self
            .current(id)
            .ok_or_else(|| SnapshotError::NotFound { id: id.to_string() })?;
        let meta = Self::read_meta(&dir)?;
        let disk_base = Self::disk_layers(&dir)
            .last()
            .map(|(_, p)| p.clone())
            .unwrap_or_else(|| dir.join(DISK_BASE));
        if meta.disk_only {
            return Ok(Restorable {
                meta,
                device_state: dir.join(DEVICE_STATE),
                overlay: std::sync::Arc::new(ChangedPages::default()),
                disk_base,
            });
        }
        let mem = MemorySnapshot::load(&dir).map_err(corrupt)?;
        let base_file = Self::base_file(&dir);
        let mut meta = meta;
        meta.memory_base = match base_file {
            Some(p) => MemoryBase::File(p),
            None => MemoryBase::Zero,
        };
        let device_state = dir.join(DEVICE_STATE);
        if !device_state.is_file() {
            return Err(SnapshotError::Corrupt {
                reason: format!("{} is missing", device_state.display()),
            });
        }
        Ok(Restorable {
            meta,
            device_state,
            overlay: std::sync::Arc::new(mem),
            disk_base,
        })
    }
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, SnapshotError> + Send + 'static,
) -> Result<T, SnapshotError> {
    tokio::task::spawn_blocking(f).await.map_err(backend)?
}

#[async_trait]
impl SnapshotStore for FsSnapshotStore {
    async fn begin_pause(&self, id: &CapsuleId) -> Result<PathBuf, SnapshotError> {
        let next = self.root(id).join("next");
        // A `next/` left by a pause that died is not part of any version.
        let _ = std::fs::remove_dir_all(&next);
        std::fs::create_dir_all(&next).map_err(io_err("create", &next))?;
        Ok(next)
    }

    async fn commit_pause(
        &self,
        id: &CapsuleId,
        meta: &SnapshotMeta,
        saved: &SavedState,
        disk: &CowDisk,
    ) -> Result<PauseReport, SnapshotError> {
        let result = self.commit(id, meta, Some(saved.clone()), Some(disk)).await;
        if result.is_err() {
            let _ = std::fs::remove_dir_all(self.root(id).join("next"));
        }
        result
    }

    async fn commit_disk_only(
        &self,
        id: &CapsuleId,
        meta: &SnapshotMeta,
        disk: Option<&CowDisk>,
    ) -> Result<PauseReport, SnapshotError> {
        let next = self.begin_pause(id).await?;
        let mut meta = meta.clone();
        meta.disk_only = true;
        let result = self.commit(id, &meta, None, disk).await;
        if result.is_err() {
            let _ = std::fs::remove_dir_all(next);
        }
        result
    }

    async fn open(&self, id: &CapsuleId) -> Result<Restorable, SnapshotError> {
        let (me, id) = (self.clone(), id.clone());
        blocking(move || me.open_blocking(&id)).await
    }

    async fn remove(&self, id: &CapsuleId) -> Result<(), SnapshotError> {
        match tokio::fs::remove_dir_all(self.root(id)).await {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(backend(e)),
        }
    }

    async fn list(&self) -> Result<Vec<CapsuleId>, SnapshotError> {
        let mut out = Vec::new();
        for e in std::fs::read_dir(&self.snapshots)
            .into_iter()
            .flatten()
            .flatten()
        {
            if let Some(id) = e
                .file_name()
                .to_str()
                .and_then(|s| CapsuleId::parse(s).ok())
            {
                if e.path().join("current").exists() {
                    out.push(id);
                }
            }
        }
        out.sort();
        Ok(out)
    }

    async fn write_template(
        &self,
        name: &TemplateName,
        meta: &SnapshotMeta,
        saved: &SavedState,
        disk: &CowDisk,
        overwrite: bool,
    ) -> Result<(), SnapshotError> {
        let (templates, name2, meta2, saved) = (
            self.templates.clone(),
            name.clone(),
            meta.clone(),
            saved.clone(),
        );
        let stage = blocking(move || {
            stage_template_blocking(&templates, &name2, &meta2, &saved, overwrite)
        })
        .await?;
        self.publish_with_disk(stage, name, disk).await
    }

    async fn write_disk_template(
        &self,
        name: &TemplateName,
        disk: &CowDisk,
        overwrite: bool,
    ) -> Result<(), SnapshotError> {
        let dest = self.templates.join(name.as_str());
        if dest.join(TEMPLATE_ROOTFS).exists() && !overwrite {
            return Err(SnapshotError::NameTaken {
                name: name.to_string(),
            });
        }
        let stage = self.templates.join(stage_name(name));
        std::fs::create_dir_all(&stage).map_err(io_err("create", &stage))?;
        self.publish_with_disk(stage, name, disk).await
    }

    async fn open_template(
        &self,
        name: &TemplateName,
    ) -> Result<Option<Restorable>, SnapshotError> {
        let dir = self.templates.join(name.as_str());
        let snap = dir.join(TEMPLATE_SNAPSHOT);
        if !snap.join(META).is_file() {
            return Ok(None);
        }
        let mut meta = Self::read_meta(&snap)?;
        let memory = snap.join(TEMPLATE_MEMORY);
        let device_state = snap.join(DEVICE_STATE);
        for p in [&memory, &device_state] {
            if !p.is_file() {
                return Err(SnapshotError::Corrupt {
                    reason: format!("{} is missing", p.display()),
                });
            }
        }
        meta.memory_base = MemoryBase::File(memory);
        Ok(Some(Restorable {
            meta,
            device_state,
            overlay: std::sync::Arc::new(wrenn_core::vmm::NoOverlay),
            disk_base: dir.join(TEMPLATE_ROOTFS),
        }))
    }
}

/// Writes a template's snapshot (memory image, device state, meta) into a new
/// staging directory next to where it will go, and returns that directory.
fn stage_template_blocking(
    templates: &Path,
    name: &TemplateName,
    meta: &SnapshotMeta,
    saved: &SavedState,
    overwrite: bool,
) -> Result<PathBuf, SnapshotError> {
    let dest = templates.join(name.as_str());
    if dest.join(TEMPLATE_ROOTFS).exists()
        && dest.join(TEMPLATE_SNAPSHOT).join(META).exists()
        && !overwrite
    {
        return Err(SnapshotError::NameTaken {
            name: name.to_string(),
        });
    }
    std::fs::create_dir_all(templates).map_err(io_err("create", templates))?;
    let stage = templates.join(stage_name(name));
    let snap = stage.join(TEMPLATE_SNAPSHOT);
    std::fs::create_dir_all(&snap).map_err(io_err("create", &snap))?;
    let result = (|| {
        // Memory: base + the changed pages, flattened into one sparse raw image.
        let scratch = stage.join("memory.work");
        let base_file = match &meta.memory_base {
            MemoryBase::File(p) => Some(p.clone()),
            MemoryBase::Zero => None,
        };
        let base = match &base_file {
            Some(p) => {
                let (id, size) = base_id(p)?;
                BaseRef::File { id, size }
            }
            None => BaseRef::Zero,
        };
        let mem = MemorySnapshot::create(&scratch, meta.mem_bytes, base).map_err(corrupt)?;
        let mem = mem.add_generation(saved.changed.iter()).map_err(corrupt)?;
        mem.write_raw_image(base_file.as_deref(), &snap.join(TEMPLATE_MEMORY))
            .map_err(corrupt)?;
        drop(mem);
        std::fs::remove_dir_all(&scratch).map_err(io_err("remove", &scratch))?;
        let device_state = &saved.device_state;
        std::fs::copy(device_state, snap.join(DEVICE_STATE))
            .map_err(io_err("copy", device_state))?;
        sync_file(&snap.join(DEVICE_STATE))?;
        let mut m = meta.clone();
        m.memory_base = MemoryBase::File(dest.join(TEMPLATE_SNAPSHOT).join(TEMPLATE_MEMORY));
        write_file_atomic(
            &snap.join(META),
            &serde_json::to_vec_pretty(&m).map_err(backend)?,
        )?;
        sync_dir(&snap)
    })();
    match result {
        Ok(()) => Ok(stage),
        Err(e) => {
            let _ = std::fs::remove_dir_all(&stage);
            Err(e)
        }
    }
}

/// Puts a staged template (its root image included) in place of `name`'s: a swap
/// when there is one, so running capsules keep the inodes they hold.
fn publish_template_blocking(
    templates: &Path,
    name: &TemplateName,
    stage: &Path,
) -> Result<(), SnapshotError> {
    sync_dir(stage)?;
    let dest = templates.join(name.as_str());
    if dest.exists() {
        nix::fcntl::renameat2(
            None,
            stage,
            None,
            &dest,
            nix::fcntl::RenameFlags::RENAME_EXCHANGE,
        )
        .map_err(|e| SnapshotError::Backend(format!("swapping {}: {e}", dest.display()).into()))?;
        let _ = std::fs::remove_dir_all(stage);
    } else {
        std::fs::rename(stage, &dest).map_err(io_err("rename", stage))?;
    }
    sync_dir(templates)
}

/// The staging directory of a write of template `name`: `.<name>.new-<pid>-<hex>`, so
/// a sweep can tell the writes of processes that are gone.
fn stage_name(name: &TemplateName) -> String {
    format!(
        ".{}.new-{}-{:08x}",
        name.as_str(),
        std::process::id(),
        rand_u32()
    )
}

/// The writer of staging directory `name`, if it is one ([`stage_name`]).
fn stage_writer(name: &str) -> Option<u32> {
    let rest = name.strip_prefix('.')?;
    let (_, tail) = rest.rsplit_once(".new-")?;
    tail.split_once('-')?.0.parse().ok()
}

fn rand_u32() -> u32 {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    t ^ std::process::id().rotate_left(16)
}

#[cfg(test)]
mod tests {
    #[test]
    fn staging_directories_name_their_writer() {
        let name = wrenn_core::template::TemplateName::parse("my.tpl-1").unwrap();
        let stage = super::stage_name(&name);
        assert_eq!(super::stage_writer(&stage), Some(std::process::id()));
        for other in ["my.tpl-1", ".my.tpl-1.new-0badf00d", ".img-12-x", "snap-x"] {
            assert_eq!(super::stage_writer(other), None, "{other}");
        }
    }
}
