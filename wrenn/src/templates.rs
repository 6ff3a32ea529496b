//! Templates found in the data directory.

use crate::paths::DataDir;
use async_trait::async_trait;
use std::path::Path;
use wrenn_core::snapshot::SnapshotMeta;
use wrenn_core::template::{
    Pin, SnapshotSizes, Template, TemplateError, TemplateInfo, TemplateName, TemplateStore,
};
use wrenn_storage::capsnap::template_files;

/// `templates/<name>/` (layout: [`template_files`]) plus the kernel in use.
#[derive(Clone, Debug)]
pub struct FsTemplates {
    data: DataDir,
}

impl FsTemplates {
    pub fn new(data: DataDir) -> Self {
        FsTemplates { data }
    }

    pub fn data(&self) -> &DataDir {
        &self.data
    }
}

#[async_trait]
impl TemplateStore for FsTemplates {
    async fn get(&self, name: &TemplateName) -> Result<Template, TemplateError> {
        let dir = self.data.template_dir(name.as_str());
        if !dir.is_dir() {
            return Err(TemplateError::Unknown {
                name: name.to_string(),
            });
        }
        let rootfs = dir.join(template_files::ROOTFS);
        if !rootfs.is_file() {
            return Err(TemplateError::Incomplete {
                name: name.to_string(),
                missing: rootfs.display().to_string(),
            });
        }
        let kernel = self
            .data
            .kernel()
            .ok_or_else(|| TemplateError::Incomplete {
                name: name.to_string(),
                missing: format!("a guest kernel under {}", self.data.kernels().display()),
            })?;
        Ok(Template {
            name: name.clone(),
            rootfs,
            kernel,
            kernel_args: String::new(),
        })
    }

    async fn describe(&self, name: &TemplateName) -> Result<TemplateInfo, TemplateError> {
        let dir = self.data.template_dir(name.as_str());
        let unknown = || TemplateError::Unknown {
            name: name.to_string(),
        };
        let rootfs = std::fs::metadata(dir.join(template_files::ROOTFS)).map_err(|_| unknown())?;
        let snapshot = std::fs::read(
            dir.join(template_files::SNAPSHOT)
                .join(template_files::META),
        )
        .ok()
        .and_then(|b| serde_json::from_slice::<SnapshotMeta>(&b).ok())
        .map(|m| SnapshotSizes {
            vcpus: m.spec.vcpus,
            memory_mb: m.spec.memory_mb,
        });
        Ok(TemplateInfo {
            name: name.clone(),
            snapshot,
            size_bytes: allocated_bytes(&dir),
            created_at: rootfs.modified().ok(),
        })
    }

    async fn delete(&self, name: &TemplateName) -> Result<(), TemplateError> {
        self.describe(name).await?;
        let dir = self.data.template_dir(name.as_str());
        tokio::fs::remove_dir_all(&dir)
            .await
            .map_err(|e| TemplateError::Backend(format!("removing {}: {e}", dir.display()).into()))
    }

    async fn pin(
        &self,
        path: &std::path::Path,
        dir: &std::path::Path,
        what: Pin,
    ) -> Result<std::path::PathBuf, TemplateError> {
        let dest = dir.join(match what {
            Pin::RootDisk => "rootfs.base",
            Pin::Memory => "memory.base",
            Pin::DeviceState => "device.state",
        });
        let _ = std::fs::remove_file(&dest);
        std::fs::hard_link(path, &dest).map_err(|e| {
            TemplateError::Backend(
                format!("linking {} to {}: {e}", path.display(), dest.display()).into(),
            )
        })?;
        Ok(dest)
    }

    async fn list(&self) -> Result<Vec<TemplateName>, TemplateError> {
        let mut out = Vec::new();
        if let Ok(rd) = std::fs::read_dir(self.data.templates()) {
            for e in rd.flatten() {
                if e.path().join(template_files::ROOTFS).is_file() {
                    if let Some(n) = e
                        .file_name()
                        .to_str()
                        .and_then(|n| TemplateName::parse(n).ok())
                    {
                        out.push(n);
                    }
                }
            }
        }
        out.sort();
        Ok(out)
    }
}

/// Bytes the files under `dir` take on disk (sparse images count what they hold).
fn allocated_bytes(dir: &Path) -> u64 {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return 0;
    };
    rd.flatten()
        .map(|e| match e.metadata() {
            Ok(m) if m.is_dir() => allocated_bytes(&e.path()),
            Ok(m) => {
                use std::os::unix::fs::MetadataExt;
                m.blocks() * 512
            }
            Err(_) => 0,
        })
        .sum()
}
