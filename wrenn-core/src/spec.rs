//! What a caller asks for when creating a capsule, and the checks on it.

use crate::egress::EgressPolicy;
use crate::id::CapsuleId;
use crate::template::{InvalidTemplateName, TemplateName};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;

/// Options of `create`. Unset fields take the defaults of [`Limits`].
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct CreateOptions {
    pub template: Option<String>,
    pub vcpus: Option<u32>,
    pub memory_mb: Option<u32>,
    pub disk_mb: Option<u64>,
    /// Default environment of every process in the capsule.
    pub envs: HashMap<String, String>,
    /// Caller's labels, kept with the capsule.
    pub metadata: HashMap<String, String>,
    /// Boot the template's kernel even when the template has a pre-booted snapshot.
    pub cold_boot: bool,
    /// Which destinations the guest may reach (default: all but the always-denied ones).
    pub network: EgressPolicy,
}

/// Bounds and defaults for capsule sizes.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Limits {
    pub default_template: String,
    pub default_vcpus: u32,
    pub max_vcpus: u32,
    pub default_memory_mb: u32,
    pub min_memory_mb: u32,
    pub max_memory_mb: u32,
    pub default_disk_mb: u64,
    pub min_disk_mb: u64,
    pub max_disk_mb: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            default_template: "minimal".into(),
            default_vcpus: 1,
            // The guest kernel is built with NR_CPUS=8.
            max_vcpus: 8,
            default_memory_mb: 512,
            min_memory_mb: 128,
            max_memory_mb: 16384,
            default_disk_mb: 2048,
            min_disk_mb: 256,
            max_disk_mb: 65536,
        }
    }
}

/// Validated create options.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CapsuleSpec {
    pub template: TemplateName,
    pub vcpus: u32,
    pub memory_mb: u32,
    pub disk_mb: u64,
    pub envs: HashMap<String, String>,
    pub metadata: HashMap<String, String>,
    /// Egress policy; records written before policies existed read as open.
    #[serde(default)]
    pub network: EgressPolicy,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum InvalidSpec {
    #[error(transparent)]
    TemplateName(#[from] InvalidTemplateName),
    #[error("vcpus must be between 1 and {max}, got {got}")]
    Vcpus { got: u32, max: u32 },
    #[error("memory_mb must be between {min} and {max}, got {got}")]
    Memory { got: u32, min: u32, max: u32 },
    #[error("disk_mb must be between {min} and {max}, got {got}")]
    Disk { got: u64, min: u64, max: u64 },
    #[error("Invalid environment variable name {0:?}")]
    EnvName(String),
    #[error("Cannot pool: {0}")]
    Pool(String),
}

impl CreateOptions {
    pub fn validate(&self, limits: &Limits) -> Result<CapsuleSpec, InvalidSpec> {
        let template =
            TemplateName::parse(self.template.as_deref().unwrap_or(&limits.default_template))?;
        let vcpus = self.vcpus.unwrap_or(limits.default_vcpus);
        if vcpus == 0 || vcpus > limits.max_vcpus {
            return Err(InvalidSpec::Vcpus {
                got: vcpus,
                max: limits.max_vcpus,
            });
        }
        let memory_mb = self.memory_mb.unwrap_or(limits.default_memory_mb);
        if !(limits.min_memory_mb..=limits.max_memory_mb).contains(&memory_mb) {
            return Err(InvalidSpec::Memory {
                got: memory_mb,
                min: limits.min_memory_mb,
                max: limits.max_memory_mb,
            });
        }
        let disk_mb = self.disk_mb.unwrap_or(limits.default_disk_mb);
        if !(limits.min_disk_mb..=limits.max_disk_mb).contains(&disk_mb) {
            return Err(InvalidSpec::Disk {
                got: disk_mb,
                min: limits.min_disk_mb,
                max: limits.max_disk_mb,
            });
        }
        for k in self.envs.keys() {
            if k.is_empty() || k.contains('=') || k.contains('\0') {
                return Err(InvalidSpec::EnvName(k.clone()));
            }
        }
        Ok(CapsuleSpec {
            template,
            vcpus,
            memory_mb,
            disk_mb,
            envs: self.envs.clone(),
            metadata: self.metadata.clone(),
            network: self.network.clone(),
        })
    }
}

/// Label naming the template as the capsule's creator knows it (a platform's template
/// id or alias), for the guest's `WRENN_TEMPLATE_ID`; without it the host's template
/// name is used.
pub const TEMPLATE_ID_LABEL: &str = "wrenn.template_id";
/// Label set on capsules made through E2B's API: their guests also see E2B's names.
pub const E2B_LABEL: &str = "wrenn.e2b";
/// Labels naming the user and directory commands run as and in by default, given to
/// envd when the capsule boots (a restored snapshot keeps its own).
pub const DEFAULT_USER_LABEL: &str = "wrenn.default_user";
pub const DEFAULT_WORKDIR_LABEL: &str = "wrenn.default_workdir";

impl CapsuleSpec {
    /// The default user and working directory its labels name, for a boot.
    pub fn guest_defaults(&self) -> (Option<String>, Option<String>) {
        (
            self.metadata.get(DEFAULT_USER_LABEL).cloned(),
            self.metadata.get(DEFAULT_WORKDIR_LABEL).cloned(),
        )
    }

    /// The environment every process in capsule `id` starts with: the caller's
    /// variables, and the capsule's identity, which they cannot override.
    pub fn guest_env(&self, id: &CapsuleId) -> HashMap<String, String> {
        let mut env = self.envs.clone();
        let template = self
            .metadata
            .get(TEMPLATE_ID_LABEL)
            .cloned()
            .unwrap_or_else(|| self.template.as_str().to_string());
        if self.metadata.contains_key(E2B_LABEL) {
            env.insert("E2B_SANDBOX".into(), "true".into());
            env.insert("E2B_SANDBOX_ID".into(), id.to_string());
            env.insert("E2B_SANDBOX_TEMPLATE_ID".into(), template.clone());
        }
        env.insert("WRENN_CAPSULE_ID".into(), id.to_string());
        env.insert("WRENN_TEMPLATE_ID".into(), template);
        env
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guest_env_names_the_capsule_and_its_template() {
        let l = Limits::default();
        let id = CapsuleId::random();
        let mut o = CreateOptions::default();
        o.envs.insert("A".into(), "1".into());
        o.envs.insert("WRENN_CAPSULE_ID".into(), "spoofed".into());
        let env = o.validate(&l).unwrap().guest_env(&id);
        assert_eq!(env["A"], "1");
        assert_eq!(env["WRENN_CAPSULE_ID"], id.to_string());
        assert_eq!(env["WRENN_TEMPLATE_ID"], "minimal");
        assert!(!env.contains_key("E2B_SANDBOX_ID"));

        o.metadata.insert(TEMPLATE_ID_LABEL.into(), "my-tpl".into());
        o.metadata.insert(E2B_LABEL.into(), "1".into());
        let env = o.validate(&l).unwrap().guest_env(&id);
        assert_eq!(env["WRENN_TEMPLATE_ID"], "my-tpl");
        assert_eq!(env["E2B_SANDBOX_ID"], id.to_string());
        assert_eq!(env["E2B_SANDBOX_TEMPLATE_ID"], "my-tpl");
    }

    #[test]
    fn defaults_and_bounds() {
        let l = Limits::default();
        let s = CreateOptions::default().validate(&l).unwrap();
        assert_eq!(
            (s.template.as_str(), s.vcpus, s.memory_mb),
            ("minimal", 1, 512)
        );
        let bad = |o: CreateOptions| o.validate(&l).unwrap_err();
        assert_eq!(
            bad(CreateOptions {
                vcpus: Some(0),
                ..Default::default()
            }),
            InvalidSpec::Vcpus { got: 0, max: 8 }
        );
        assert_eq!(
            bad(CreateOptions {
                vcpus: Some(9),
                ..Default::default()
            }),
            InvalidSpec::Vcpus { got: 9, max: 8 }
        );
        assert!(matches!(
            bad(CreateOptions {
                memory_mb: Some(16),
                ..Default::default()
            }),
            InvalidSpec::Memory { .. }
        ));
        assert!(matches!(
            bad(CreateOptions {
                disk_mb: Some(1),
                ..Default::default()
            }),
            InvalidSpec::Disk { .. }
        ));
        assert!(matches!(
            bad(CreateOptions {
                template: Some("../x".into()),
                ..Default::default()
            }),
            InvalidSpec::TemplateName(_)
        ));
        let mut envs = HashMap::new();
        envs.insert("A=B".into(), "x".into());
        assert!(matches!(
            bad(CreateOptions {
                envs,
                ..Default::default()
            }),
            InvalidSpec::EnvName(_)
        ));
    }
}
