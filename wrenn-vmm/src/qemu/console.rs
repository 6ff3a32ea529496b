//! The guest's serial console, kept in a bounded log.
//!
//! QEMU writes the serial port into a FIFO in the VM's run directory; a thread of ours
//! drains it into `console.log`, and when that file would grow past its cap it becomes
//! `console.log.1` (replacing the older one) and a new `console.log` starts. The guest
//! runs untrusted code and can print without end: at most two capped files ever exist,
//! and the FIFO is always drained, so the guest never stalls on its console either.

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

/// The file the newest console output is in.
pub const CONSOLE_LOG: &str = "console.log";
/// The FIFO QEMU writes the serial console into.
pub const CONSOLE_PIPE: &str = "console.pipe";
/// Default size of each of the two console log files.
pub const DEFAULT_CONSOLE_CAP: u64 = 1024 * 1024;

/// The drain of one VM's console. Until [`ConsoleLog::writer_attached`] is called it
/// holds a write end of the FIFO itself, so that the drain does not see end-of-file
/// before QEMU has opened it; afterwards the drain ends when QEMU closes it (exits).
#[derive(Debug)]
pub struct ConsoleLog {
    keepalive: Option<File>,
}

impl ConsoleLog {
    /// Creates the FIFO in `run_dir` and starts draining it into `console.log` (each file
    /// at most `cap` bytes). Returns the drain and the FIFO's path for QEMU.
    pub fn start(run_dir: &Path, cap: u64) -> std::io::Result<(ConsoleLog, PathBuf)> {
        let fifo = run_dir.join(CONSOLE_PIPE);
        match std::fs::remove_file(&fifo) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600))?;
        // Opening the read end first lets the write ends open at once.
        let reader = open_reader(&fifo)?;
        let keepalive = OpenOptions::new()
            .write(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(&fifo)?;
        spawn_drain(reader, run_dir, cap)?;
        Ok((
            ConsoleLog {
                keepalive: Some(keepalive),
            },
            fifo,
        ))
    }

    /// Drains the FIFO of a running QEMU again (its earlier drain went with the process
    /// that started it; meanwhile QEMU's writes were refused, not queued).
    pub fn reattach(run_dir: &Path, cap: u64) -> std::io::Result<ConsoleLog> {
        let reader = open_reader(&run_dir.join(CONSOLE_PIPE))?;
        spawn_drain(reader, run_dir, cap)?;
        Ok(ConsoleLog { keepalive: None })
    }

    /// QEMU has opened the FIFO (it is running): from now on the drain ends with it.
    pub fn writer_attached(&mut self) {
        self.keepalive = None;
    }
}

/// The FIFO's read end: opened without waiting for a writer, then blocking.
fn open_reader(fifo: &Path) -> std::io::Result<File> {
    let reader = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(fifo)?;
    set_blocking(&reader)?;
    Ok(reader)
}

/// Drains `reader` into `run_dir`'s capped console log on a thread of its own.
fn spawn_drain(reader: File, run_dir: &Path, cap: u64) -> std::io::Result<()> {
    let log = run_dir.join(CONSOLE_LOG);
    std::thread::Builder::new()
        .name("wrenn-vmm-console".into())
        .spawn(move || drain(reader, &log, cap.max(4096)))?;
    Ok(())
}

fn set_blocking(f: &File) -> std::io::Result<()> {
    use nix::fcntl::{fcntl, FcntlArg, OFlag};
    let flags = fcntl(std::os::fd::AsRawFd::as_raw_fd(f), FcntlArg::F_GETFL)?;
    let flags = OFlag::from_bits_truncate(flags) & !OFlag::O_NONBLOCK;
    fcntl(std::os::fd::AsRawFd::as_raw_fd(f), FcntlArg::F_SETFL(flags))?;
    Ok(())
}

/// Copies the FIFO into the log until every writer has closed it. Errors writing the
/// log do not stop the draining (the guest must not stall on a full disk).
fn drain(mut fifo: File, log: &Path, cap: u64) {
    let rotated = log.with_extension("log.1");
    let mut out = Rotating::open(log, &rotated, cap);
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match fifo.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => out.write(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => {
                tracing::warn!(log = %log.display(), error = %e, "console drain stopped");
                break;
            }
        }
    }
}

/// `console.log` and its one predecessor, each at most `cap` bytes.
struct Rotating<'a> {
    path: &'a Path,
    rotated: &'a Path,
    cap: u64,
    file: Option<File>,
    len: u64,
}

impl<'a> Rotating<'a> {
    fn open(path: &'a Path, rotated: &'a Path, cap: u64) -> Self {
        let mut r = Rotating {
            path,
            rotated,
            cap,
            file: None,
            len: 0,
        };
        r.reopen();
        r
    }

    /// Appends to the existing log (a resumed capsule continues its console).
    fn reopen(&mut self) {
        self.file = OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o600)
            .open(self.path)
            .ok();
        self.len = self
            .file
            .as_ref()
            .and_then(|f| f.metadata().ok())
            .map_or(0, |m| m.len());
    }

    fn rotate(&mut self) {
        self.file = None;
        let _ = std::fs::rename(self.path, self.rotated);
        self.reopen();
        if self.len >= self.cap {
            // The rename failed: start the one file over rather than grow it.
            if let Some(f) = &self.file {
                let _ = f.set_len(0);
            }
            self.len = 0;
        }
    }

    fn write(&mut self, mut data: &[u8]) {
        while !data.is_empty() {
            if self.len >= self.cap {
                self.rotate();
            }
            let room = usize::try_from(self.cap - self.len).unwrap_or(usize::MAX);
            let (now, rest) = data.split_at(room.min(data.len()));
            if let Some(f) = self.file.as_mut() {
                if f.write_all(now).is_err() {
                    // Full disk or the like: drop this output, keep draining.
                    self.file = None;
                }
            }
            self.len += now.len() as u64;
            data = rest;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endless_output_keeps_two_capped_files_with_the_newest_bytes() {
        let dir = tempfile::tempdir().expect("dir");
        let cap = 64 * 1024;
        let (mut console, fifo) = ConsoleLog::start(dir.path(), cap).expect("start");
        let mut writer = OpenOptions::new().write(true).open(&fifo).expect("writer");
        console.writer_attached();
        // 40 caps' worth, numbered lines so the order can be checked.
        let mut total = 0u64;
        let mut i = 0u64;
        while total < 40 * cap {
            let line = format!("line {i:08}\n");
            writer.write_all(line.as_bytes()).expect("write");
            total += line.len() as u64;
            i += 1;
        }
        writer.write_all(b"the end\n").expect("write");
        drop(writer);
        // The drain ends once the last writer is gone.
        let log = dir.path().join(CONSOLE_LOG);
        let old = dir.path().join("console.log.1");
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while !std::fs::read(&log)
            .map(|b| b.ends_with(b"the end\n"))
            .unwrap_or(false)
        {
            assert!(std::time::Instant::now() < deadline, "drain did not finish");
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        let (new_len, old_len) = (
            std::fs::metadata(&log).expect("log").len(),
            std::fs::metadata(&old).expect("rotated").len(),
        );
        assert!(new_len <= cap && old_len == cap, "{new_len} {old_len}");
        let files: Vec<_> = std::fs::read_dir(dir.path())
            .expect("list")
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(files.len(), 3, "{files:?}"); // the FIFO and two logs
        let both = [
            std::fs::read(&old).expect("old"),
            std::fs::read(&log).expect("new"),
        ]
        .concat();
        let text = String::from_utf8_lossy(&both);
        let last = format!("line {:08}\n", i - 1);
        assert!(text.contains(&last), "the newest lines are kept");
        assert!(!text.contains("line 00000000\n"), "the oldest are gone");
    }

    #[test]
    fn drain_ends_when_no_writer_ever_attached() {
        let dir = tempfile::tempdir().expect("dir");
        let (console, _fifo) = ConsoleLog::start(dir.path(), 4096).expect("start");
        drop(console);
        // Nothing to assert but that this returns: the thread saw end-of-file.
        std::thread::sleep(std::time::Duration::from_millis(50));
        assert!(dir.path().join(CONSOLE_LOG).exists());
    }
}
