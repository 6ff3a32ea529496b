//! Shared helpers for the disk-store integration tests: scratch dirs, base images,
//! qemu-utils wrappers.
#![allow(dead_code)]

use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};

use wrenn_core::storage::StorageError;
use wrenn_storage::DiskError;

pub const MIB: u64 = 1 << 20;

/// A scratch directory, removed on drop.
pub struct Scratch {
    pub dir: PathBuf,
}

impl Scratch {
    pub fn new(tag: &str) -> Self {
        static N: AtomicU64 = AtomicU64::new(0);
        let dir = std::env::temp_dir().join(format!(
            "wrenn-storage-it-{tag}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("create scratch dir");
        Scratch { dir }
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    /// Names of the entries in the directory, sorted.
    pub fn entries(&self) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(&self.dir)
            .expect("read_dir")
            .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Data islands of the synthetic base: (offset, byte, length). Everything else is a hole.
pub const BASE_PIECES: [(u64, u8, usize); 4] = [
    (0, 0x01, 4096),
    (MIB + 512, 0x02, 10_000),
    (5 * MIB, 0x03, 64 * 1024),
    (8 * MIB - 4096, 0x04, 4096),
];

/// Writes an 8 MiB sparse raw base with [`BASE_PIECES`].
pub fn make_base(path: &Path) -> Vec<u8> {
    let f = std::fs::File::create(path).expect("create base");
    f.set_len(8 * MIB).expect("set_len base");
    for &(off, byte, n) in &BASE_PIECES {
        f.write_all_at(&vec![byte; n], off).expect("write base");
    }
    f.sync_all().expect("sync base");
    std::fs::read(path).expect("read base")
}

/// Bytes actually allocated on disk for `path`.
pub fn allocated(path: &Path) -> u64 {
    std::fs::metadata(path).expect("metadata").blocks() * 512
}

/// Whether `tool <version_flag>` runs and succeeds.
pub fn have(tool: &str, version_flag: &str) -> bool {
    Command::new(tool)
        .arg(version_flag)
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false)
}

/// True when qemu-img and qemu-io are usable; prints a loud skip message otherwise.
pub fn have_qemu_utils(test: &str) -> bool {
    let ok = wrenn_storage::find_qemu_img().is_some() && have("qemu-io", "--version");
    if !ok {
        eprintln!("!!! SKIPPING {test}: qemu-img/qemu-io missing (apt-get install -y qemu-utils)");
    }
    ok
}

/// `qemu-io -f <fmt> -c 'write -P <pattern> <off> <len>' <image>`.
pub fn qemu_io_write(image: &Path, format: &str, pattern: u8, off: u64, len: u64) {
    let out = Command::new("qemu-io")
        .args(["-f", format, "-c"])
        .arg(format!("write -P {pattern:#x} {off} {len}"))
        .arg(image)
        .output()
        .expect("spawn qemu-io");
    assert!(
        out.status.success(),
        "qemu-io failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `qemu-img info --output=json <image>`.
pub fn qemu_img_info(image: &Path) -> serde_json::Value {
    let out = Command::new("qemu-img")
        .args(["info", "--output=json"])
        .arg(image)
        .output()
        .expect("spawn qemu-img info");
    assert!(
        out.status.success(),
        "qemu-img info failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("qemu-img info json")
}

/// Applies `(offset, byte, len)` writes to an expected image.
pub fn apply(expected: &mut Vec<u8>, size: u64, writes: &[(u64, u8, u64)]) {
    expected.resize(usize::try_from(size).unwrap(), 0);
    for &(off, byte, len) in writes {
        let (off, len) = (usize::try_from(off).unwrap(), usize::try_from(len).unwrap());
        expected[off..off + len].fill(byte);
    }
}

/// Asserts two images are equal, reporting the first differing offset instead of
/// dumping megabytes.
pub fn assert_same_bytes(got: &[u8], want: &[u8]) {
    assert_eq!(got.len(), want.len(), "image sizes differ");
    if let Some(i) = got.iter().zip(want).position(|(a, b)| a != b) {
        panic!(
            "images differ at offset {i}: got {:#x}, want {:#x}",
            got[i], want[i]
        );
    }
}

/// The crate's rich error inside a `StorageError::Backend`.
pub fn disk_error(err: &StorageError) -> &DiskError {
    match err {
        StorageError::Backend(inner) => inner
            .downcast_ref::<DiskError>()
            .unwrap_or_else(|| panic!("backend error is not a DiskError: {inner}")),
        other => panic!("expected a backend error, got {other:?}"),
    }
}
