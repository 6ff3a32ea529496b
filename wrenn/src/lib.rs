//! Wrenn on one host, wired with the default parts: QEMU microVMs
//! ([`wrenn_vmm`]), per-capsule network namespaces ([`wrenn_net`]), qcow2 disks
//! ([`wrenn_storage`]) and envd ([`wrenn_envd`]). The CLI, the server and the
//! Python binding all start here, so the wiring lives in one place.
//!
//! ```no_run
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! use wrenn::ExecRequestExt;
//! let host = wrenn::Host::local(wrenn::HostOptions::default()).await?;
//! let capsule = host.capsules().create(Default::default()).await?;
//! let out = host.capsules().run(&capsule.id, &wrenn::ExecRequest::shell("echo hello"), None).await?;
//! assert_eq!(out.stdout, b"hello\n");
//! host.capsules().destroy(&capsule.id).await?;
//! # Ok(()) }
//! ```

pub mod metrics;
pub mod paths;
mod state;
pub mod template_copy;
mod templates;
mod wiring;

pub use paths::DataDir;
pub use state::FsStateStore;
pub use templates::FsTemplates;
pub use wiring::{Host, HostError, HostOptions};
pub use wrenn_core::guest::{ExecEvent, ExecRequest, PtySize};
pub use wrenn_core::*;
pub use wrenn_vmm::jail::JailConfig;

/// Convenience constructors for commands.
pub trait ExecRequestExt {
    /// `/bin/sh -c <script>`.
    fn shell(script: &str) -> ExecRequest;
}

impl ExecRequestExt for ExecRequest {
    fn shell(script: &str) -> ExecRequest {
        ExecRequest {
            cmd: "/bin/sh".into(),
            args: vec!["-c".into(), script.into()],
            ..Default::default()
        }
    }
}
