//! The QEMU backend.

mod argv;
pub mod console;
mod error;
pub mod guestmem;
pub mod migstream;
pub mod process;
pub mod qmp;

pub use argv::{build_argv, StartMode, RAM_BLOCK, SANDBOX, TAP_FD};
pub use error::QemuError;
pub use process::{QemuConfig, QemuHandle, QemuVmm};

/// Reads `qemu-system-x86_64 --version` (e.g. "7.2.22").
pub async fn qemu_version(binary: &std::path::Path) -> Option<String> {
    let out = tokio::process::Command::new(binary)
        .arg("--version")
        .output()
        .await
        .ok()?;
    let text = String::from_utf8_lossy(&out.stdout);
    text.split_whitespace()
        .skip_while(|w| *w != "version")
        .nth(1)
        .map(str::to_string)
}
