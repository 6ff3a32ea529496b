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
