//! The data directory layout (`WRENN_DATA_DIR`, default `/var/lib/wrenn`).
//!
//! ```text
//! images/kernels/<hash>/vmlinux     built once per kernel-config hash
//! images/kernels/current            name of the hash in use
//! templates/<name>/rootfs.img       read-only base image
//! templates/<name>/snapshot/        pre-booted memory + device state (create = restore)
//! capsules/<id>/                    state.json, disk, console.log, qmp.sock
//! snapshots/<id>/current -> v<N>    a paused capsule: memory generations, device state, disk layers
//! ```

use std::path::{Path, PathBuf};

/// Default data directory when running as root.
pub const DEFAULT_DATA_DIR: &str = "/var/lib/wrenn";

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DataDir {
    root: PathBuf,
}

impl DataDir {
    pub fn new(root: impl Into<PathBuf>) -> Self {
        DataDir { root: root.into() }
    }

    /// `WRENN_DATA_DIR`, else `/var/lib/wrenn`.
    pub fn from_env() -> Self {
        DataDir::new(
            std::env::var_os("WRENN_DATA_DIR")
                .map(PathBuf::from)
                .unwrap_or_else(|| DEFAULT_DATA_DIR.into()),
        )
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn kernels(&self) -> PathBuf {
        self.root.join("images/kernels")
    }

    pub fn templates(&self) -> PathBuf {
        self.root.join("templates")
    }

    pub fn template_dir(&self, name: &str) -> PathBuf {
        self.templates().join(name)
    }

    /// A template's root filesystem image.
    pub fn template_rootfs(&self, name: &str) -> PathBuf {
        self.template_dir(name)
            .join(wrenn_storage::capsnap::template_files::ROOTFS)
    }

    /// A template's pre-booted snapshot directory.
    pub fn template_snapshot(&self, name: &str) -> PathBuf {
        self.template_dir(name)
            .join(wrenn_storage::capsnap::template_files::SNAPSHOT)
    }

    pub fn capsules(&self) -> PathBuf {
        self.root.join("capsules")
    }

    /// Paused capsules' snapshots.
    pub fn snapshots(&self) -> PathBuf {
        self.root.join("snapshots")
    }

    /// Per-boot state (the accel probe cache): `/run/wrenn` for the default data
    /// dir, `<data>/run` otherwise.
    pub fn run_dir(&self) -> PathBuf {
        if self.root == Path::new(DEFAULT_DATA_DIR) {
            PathBuf::from("/run/wrenn")
        } else {
            self.root.join("run")
        }
    }

    /// Where files shared by VMMs (kernels, template and snapshot disks) may
    /// live: the data directory, and where its linked parts (`images`, a
    /// template directory) really are.
    pub fn vmm_input_roots(&self) -> Vec<PathBuf> {
        let mut roots = vec![self.root.clone()];
        let linked = |dir: &Path| -> Vec<PathBuf> {
            std::fs::read_dir(dir)
                .map(|rd| {
                    rd.flatten()
                        .map(|e| e.path())
                        .filter(|p| p.is_symlink())
                        .filter_map(|p| p.canonicalize().ok())
                        .collect()
                })
                .unwrap_or_default()
        };
        roots.extend(linked(&self.root));
        roots.extend(linked(&self.templates()));
        roots.retain(|r| r.exists());
        roots
    }

    /// The kernel in use: `images/kernels/current` names its hash; without it,
    /// the most recently built `vmlinux`. The path is the file's real one (snapshots
    /// record it), so it holds whichever data directory links to `images/`.
    pub fn kernel(&self) -> Option<PathBuf> {
        let found = self.find_kernel()?;
        Some(std::fs::canonicalize(&found).unwrap_or(found))
    }

    fn find_kernel(&self) -> Option<PathBuf> {
        let dir = self.kernels();
        if let Ok(hash) = std::fs::read_to_string(dir.join("current")) {
            let p = dir.join(hash.trim()).join("vmlinux");
            if p.is_file() {
                return Some(p);
            }
        }
        let mut best: Option<(std::time::SystemTime, PathBuf)> = None;
        for e in std::fs::read_dir(&dir).ok()?.flatten() {
            let p = e.path().join("vmlinux");
            if let Ok(m) = std::fs::metadata(&p).and_then(|m| m.modified()) {
                if best.as_ref().is_none_or(|(t, _)| m > *t) {
                    best = Some((m, p));
                }
            }
        }
        best.map(|(_, p)| p)
    }
}
