//! Templates: what a capsule starts from.

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use std::fmt::Debug;
use std::path::PathBuf;

/// A validated template or snapshot name: `^[a-zA-Z0-9][a-zA-Z0-9._-]{0,63}$`.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct TemplateName(String);

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("Invalid template name {0:?}: use 1-64 characters from a-z A-Z 0-9 . _ -, starting with a letter or digit")]
pub struct InvalidTemplateName(pub String);

impl TemplateName {
    pub fn parse(s: &str) -> Result<Self, InvalidTemplateName> {
        let mut chars = s.chars();
        let ok = match chars.next() {
            Some(c) if c.is_ascii_alphanumeric() => {
                s.len() <= 64
                    && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
            }
            _ => false,
        };
        if ok {
            Ok(TemplateName(s.to_string()))
        } else {
            Err(InvalidTemplateName(s.to_string()))
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for TemplateName {
    type Error = InvalidTemplateName;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        TemplateName::parse(&s)
    }
}

impl From<TemplateName> for String {
    fn from(n: TemplateName) -> String {
        n.0
    }
}

impl std::fmt::Display for TemplateName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// A template resolved to files on the host.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Template {
    pub name: TemplateName,
    /// Read-only root filesystem image (raw ext4).
    pub rootfs: PathBuf,
    /// Guest kernel.
    pub kernel: PathBuf,
    /// Extra kernel command-line arguments of this template.
    #[serde(default)]
    pub kernel_args: String,
}

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TemplateError {
    #[error("Unknown template '{name}'")]
    Unknown { name: String },
    #[error("Template '{name}' is incomplete: {missing} is missing (build it with `wrenn image build --template {name}`)")]
    Incomplete { name: String, missing: String },
    #[error("Template store failed")]
    Backend(#[source] Box<dyn std::error::Error + Send + Sync>),
}

/// One file of a template, as a copy to another host lists it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TemplateFile {
    /// Relative to the template's directory, `/`-separated (`rootfs.img`,
    /// `snapshot/memory.raw`).
    pub path: String,
    pub size: u64,
    /// CRC-32 (IEEE) of the whole content.
    pub crc32: u32,
    /// Permission bits.
    pub mode: u32,
}

/// What a template consists of: the files a copy must reproduce exactly.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TemplateManifest {
    pub name: TemplateName,
    pub files: Vec<TemplateFile>,
}

/// Largest file a template copy takes.
pub const MAX_TEMPLATE_FILE: u64 = 1 << 40;

impl TemplateManifest {
    /// Checks what a copy would write: relative paths of plain names (at most two
    /// levels), each once, sizes within [`MAX_TEMPLATE_FILE`].
    pub fn validate(&self) -> Result<(), String> {
        let mut seen = std::collections::BTreeSet::new();
        if self.files.is_empty() {
            return Err("a template has files".into());
        }
        for f in &self.files {
            let parts: Vec<&str> = f.path.split('/').collect();
            let plain = |p: &&str| {
                !p.is_empty()
                    && !p.starts_with('.')
                    && p.len() <= 64
                    && p.bytes()
                        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
            };
            if parts.len() > 2 || !parts.iter().all(plain) {
                return Err(format!("file {:?}: not a plain relative path", f.path));
            }
            if !seen.insert(f.path.as_str()) {
                return Err(format!("file {:?} is listed twice", f.path));
            }
            if parts.len() == 1
                && self
                    .files
                    .iter()
                    .any(|o| o.path.starts_with(&format!("{}/", f.path)))
            {
                return Err(format!("{:?} is both a file and a directory", f.path));
            }
            if f.size > MAX_TEMPLATE_FILE {
                return Err(format!("file {:?} is too large ({} bytes)", f.path, f.size));
            }
        }
        Ok(())
    }

    pub fn file(&self, path: &str) -> Option<&TemplateFile> {
        self.files.iter().find(|f| f.path == path)
    }
}

/// A piece of one file of a template being copied (ranges not sent are zeros).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TemplateChunk {
    pub file: String,
    pub offset: u64,
    pub data: bytes::Bytes,
}

/// What a store knows of one template, for listings.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TemplateInfo {
    pub name: TemplateName,
    /// The sizes of its pre-booted snapshot, when it has one (creates restore it).
    pub snapshot: Option<SnapshotSizes>,
    /// Bytes the template's files take on disk.
    pub size_bytes: u64,
    /// When its root filesystem was written.
    pub created_at: Option<std::time::SystemTime>,
}

/// The machine a template's snapshot was taken of (its capsules get the same).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotSizes {
    pub vcpus: u32,
    pub memory_mb: u32,
}

/// A file a capsule starts from, pinned into its directory ([`TemplateStore::pin`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Pin {
    /// The read-only image under its writable disk.
    RootDisk,
    /// The memory image its RAM is restored over.
    Memory,
    /// The device state it is restored from.
    DeviceState,
}

/// Owns the templates: their layout, what they hold, and their removal. Nothing
/// else knows where a template's files are.
#[async_trait]
pub trait TemplateStore: Send + Sync + Debug {
    async fn get(&self, name: &TemplateName) -> Result<Template, TemplateError>;
    async fn list(&self) -> Result<Vec<TemplateName>, TemplateError>;

    /// Describes one template ([`TemplateError::Unknown`] when there is none).
    async fn describe(&self, name: &TemplateName) -> Result<TemplateInfo, TemplateError>;

    /// Removes a template. Capsules started from it keep their own links to its
    /// files ([`TemplateStore::pin`]), so they are not affected.
    async fn delete(&self, name: &TemplateName) -> Result<(), TemplateError>;

    /// Gives the capsule directory `dir` its own link to `path`, one of the files a
    /// capsule starts from (a template's, or a fork's), so it keeps the exact image
    /// even when the template is rebuilt or removed. `what` says which of the
    /// capsule's files it is; the store names the link. Returns the linked path.
    async fn pin(
        &self,
        path: &std::path::Path,
        dir: &std::path::Path,
        what: Pin,
    ) -> Result<PathBuf, TemplateError>;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_validate() {
        for ok in ["minimal", "python", "a", "my-snap_1.2", &"x".repeat(64)] {
            assert!(TemplateName::parse(ok).is_ok(), "{ok}");
        }
        for bad in ["", "-x", ".x", "a/b", "a b", "../etc", &"x".repeat(65), "é"] {
            assert!(TemplateName::parse(bad).is_err(), "{bad}");
        }
    }
}
