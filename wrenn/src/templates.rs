//! Templates found in the data directory.

use crate::paths::DataDir;
use async_trait::async_trait;
use wrenn_core::template::{Template, TemplateError, TemplateName, TemplateStore};

/// `templates/<name>/rootfs.img` plus the kernel in use.
#[derive(Clone, Debug)]
pub struct FsTemplates {
    data: DataDir,
}

impl FsTemplates {
    pub fn new(data: DataDir) -> Self {
        FsTemplates { data }
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
        let rootfs = dir.join("rootfs.img");
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

    async fn pin(
        &self,
        path: &std::path::Path,
        dir: &std::path::Path,
        link: &str,
    ) -> Result<std::path::PathBuf, TemplateError> {
        let dest = dir.join(link);
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
                if e.path().join("rootfs.img").is_file() {
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
