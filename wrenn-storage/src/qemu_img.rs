//! Running `qemu-img`: one lookup of the program, one way to run it (from async
//! code, or from a blocking thread), one summary of its stderr, for every caller
//! (the qcow2 disk store and the snapshot store).

use std::ffi::OsStr;
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::process::{ExitStatus, Stdio};

use crate::error::DiskError;

/// Environment variable naming the `qemu-img` binary; overrides the `PATH` search.
pub const QEMU_IMG_ENV: &str = "WRENN_QEMU_IMG";

/// How much of qemu-img's stderr an error keeps (the tail, where the reason is).
const STDERR_LIMIT: usize = 4096;

/// Finds `qemu-img`: `$WRENN_QEMU_IMG` if set and non-empty, else the first executable
/// `qemu-img` on `PATH`.
pub fn find_qemu_img() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os(QEMU_IMG_ENV).filter(|p| !p.is_empty()) {
        return Some(PathBuf::from(p));
    }
    find_on_path("qemu-img")
}

/// The first executable file `name` in a directory of `PATH`.
pub fn find_on_path(name: &str) -> Option<PathBuf> {
    std::env::split_paths(&std::env::var_os("PATH")?)
        .map(|dir| dir.join(name))
        .find(|p| {
            std::fs::metadata(p)
                .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
                .unwrap_or(false)
        })
}

/// A `qemu-img` to run: a given binary, or the one [`find_qemu_img`] finds at each call.
#[derive(Clone, Debug, Default)]
pub struct QemuImg {
    program: Option<PathBuf>,
}

impl QemuImg {
    /// Looks the binary up at each call.
    pub fn new() -> Self {
        Self::default()
    }

    /// Runs this binary.
    pub fn with_program(path: impl Into<PathBuf>) -> Self {
        QemuImg {
            program: Some(path.into()),
        }
    }

    pub fn program(&self) -> Result<PathBuf, DiskError> {
        self.program
            .clone()
            .or_else(find_qemu_img)
            .ok_or(DiskError::QemuImgNotFound)
    }

    fn command(&self, args: &[&OsStr]) -> Result<(PathBuf, std::process::Command), DiskError> {
        let program = self.program()?;
        tracing::debug!(program = %program.display(), ?args, "running qemu-img");
        let mut cmd = std::process::Command::new(&program);
        cmd.args(args)
            .env("LC_ALL", "C")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        Ok((program, cmd))
    }

    /// Runs it with `args` (`step` names the call in errors); returns its exit
    /// status and the tail of its stderr. Killed if the future is dropped.
    pub async fn run(
        &self,
        step: &'static str,
        args: &[&OsStr],
    ) -> Result<(ExitStatus, String), DiskError> {
        let (program, cmd) = self.command(args)?;
        let out = tokio::process::Command::from(cmd)
            .kill_on_drop(true)
            .output()
            .await
            .map_err(|source| DiskError::SpawnQemuImg {
                program,
                step,
                source,
            })?;
        Ok((out.status, stderr_tail(&out.stderr)))
    }

    /// [`QemuImg::run`] from a blocking thread, failing on a non-zero exit.
    pub fn run_blocking(&self, step: &'static str, args: &[&OsStr]) -> Result<(), DiskError> {
        let (program, mut cmd) = self.command(args)?;
        let out = cmd.output().map_err(|source| DiskError::SpawnQemuImg {
            program,
            step,
            source,
        })?;
        if out.status.success() {
            Ok(())
        } else {
            Err(DiskError::QemuImgFailed {
                step,
                status: out.status,
                stderr: stderr_tail(&out.stderr),
            })
        }
    }
}

fn stderr_tail(raw: &[u8]) -> String {
    let text = String::from_utf8_lossy(raw);
    let text = text.trim();
    if text.len() <= STDERR_LIMIT {
        return text.to_owned();
    }
    let mut start = text.len() - STDERR_LIMIT;
    while !text.is_char_boundary(start) {
        start += 1;
    }
    format!("…{}", &text[start..])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stderr_tail_keeps_the_end() {
        assert_eq!(stderr_tail(b"  boom\n"), "boom");
        let long = "é".repeat(STDERR_LIMIT);
        let tail = stderr_tail(long.as_bytes());
        assert!(tail.starts_with('…'));
        assert!(tail.len() <= STDERR_LIMIT + '…'.len_utf8());
    }

    #[test]
    fn a_failing_run_names_its_step_and_keeps_stderr() {
        let false_bin = find_on_path("false").expect("false(1)");
        let err = QemuImg::with_program(false_bin)
            .run_blocking("rebase", &[OsStr::new("x")])
            .expect_err("false fails");
        assert!(
            matches!(err, DiskError::QemuImgFailed { step: "rebase", .. }),
            "{err:?}"
        );
        let missing = QemuImg::with_program("/nonexistent/qemu-img")
            .run_blocking("convert", &[])
            .expect_err("no such program");
        assert!(
            matches!(
                missing,
                DiskError::SpawnQemuImg {
                    step: "convert",
                    ..
                }
            ),
            "{missing:?}"
        );
    }
}
