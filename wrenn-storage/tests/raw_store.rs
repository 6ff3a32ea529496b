//! RawCopyStore against real files (ext4 under $TMPDIR; XFS on a loop mount when root).
// An integration-test crate is test-only as a whole; the lint targets unit tests.
#![allow(clippy::tests_outside_test_module)]

mod common;

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use common::*;
use wrenn_core::storage::{CowDisk, CowStore, DiskFormat, StorageError};
use wrenn_storage::{store_for, CopyMethod, DiskError, Qcow2Store, RawCopyStore};

fn write_at(path: &Path, writes: &[(u64, u8, u64)]) {
    let f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    for &(off, byte, len) in writes {
        f.write_all_at(&vec![byte; usize::try_from(len).unwrap()], off)
            .unwrap();
    }
    f.sync_all().unwrap();
}

/// The full create → write → flatten → remove cycle in `dir`; returns the copy method.
async fn cycle(store: &RawCopyStore, dir: &Path) -> CopyMethod {
    let base = dir.join("base.img");
    let base_bytes = make_base(&base);
    let disk_path = dir.join("capsule.raw");
    let (disk, method) = store
        .create_with_method(&base, &disk_path, 16)
        .await
        .expect("create");
    assert_eq!(disk.format, DiskFormat::Raw);
    assert_eq!(disk.size_bytes, 16 * MIB);
    assert_eq!(disk.base, std::fs::canonicalize(&base).unwrap());
    assert_eq!(std::fs::metadata(&disk_path).unwrap().len(), 16 * MIB);

    let mut expected = base_bytes.clone();
    apply(&mut expected, 16 * MIB, &[]);
    assert_same_bytes(&std::fs::read(&disk_path).unwrap(), &expected);
    let base_data: u64 = BASE_PIECES.iter().map(|p| p.2 as u64).sum();
    if method == CopyMethod::Sparse {
        assert!(
            allocated(&disk_path) < base_data + MIB,
            "copy not sparse: {} bytes allocated",
            allocated(&disk_path)
        );
    }

    let writes = [
        (MIB, 0xab, 64 * 1024),
        (3 * MIB, 0xcd, 4096),
        (12 * MIB, 0xef, 128 * 1024),
    ];
    write_at(&disk_path, &writes);
    apply(&mut expected, 16 * MIB, &writes);
    assert_same_bytes(&std::fs::read(&base).unwrap(), &base_bytes);

    let flat = dir.join("flat.raw");
    store.flatten(&disk, &flat).await.expect("flatten");
    assert_same_bytes(&std::fs::read(&flat).unwrap(), &expected);
    let data = base_data + writes.iter().map(|w| w.2).sum::<u64>();
    assert!(
        allocated(&flat) < data + MIB,
        "flattened image not sparse: {} bytes allocated",
        allocated(&flat)
    );

    store.remove(&disk).await.expect("remove");
    assert!(!disk_path.exists());
    store.remove(&disk).await.expect("remove is idempotent");
    assert_same_bytes(&std::fs::read(&base).unwrap(), &base_bytes);
    assert_same_bytes(&std::fs::read(&flat).unwrap(), &expected);

    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n != "lost+found")
        .collect();
    names.sort();
    assert_eq!(names, ["base.img", "flat.raw"], "temp file left behind");
    method
}

#[tokio::test]
async fn create_write_flatten_remove_sparse() {
    let s = Scratch::new("raw");
    // ext4 (or tmpfs) under $TMPDIR cannot reflink: the store falls back to a sparse copy.
    let method = cycle(&RawCopyStore::new(), &s.dir).await;
    eprintln!("raw store on $TMPDIR used {method:?}");
    let s2 = Scratch::new("raw-noreflink");
    assert_eq!(
        cycle(&RawCopyStore::without_reflink(), &s2.dir).await,
        CopyMethod::Sparse
    );
}

#[tokio::test]
async fn create_errors_and_formats() {
    let s = Scratch::new("raw-err");
    let base = s.path("base.img");
    make_base(&base);
    let store = RawCopyStore::new();
    assert_eq!(store.format(), DiskFormat::Raw);

    let missing = s.path("nope.img");
    let err = store
        .create(&missing, &s.path("a.raw"), 16)
        .await
        .unwrap_err();
    assert!(
        matches!(&err, StorageError::BaseMissing { path } if *path == missing),
        "{err:?}"
    );

    let err = store.create(&base, &s.path("a.raw"), 7).await.unwrap_err();
    assert!(
        matches!(
            err,
            StorageError::TooSmall {
                requested_mb: 7,
                base_mb: 8
            }
        ),
        "{err:?}"
    );

    let dest = s.path("same.raw");
    let disk = store
        .create(&base, &dest, 8)
        .await
        .expect("create at base size");
    assert_eq!(std::fs::metadata(&dest).unwrap().len(), 8 * MIB);
    let err = store.create(&base, &dest, 16).await.unwrap_err();
    assert!(
        matches!(disk_error(&err), DiskError::DestinationExists { .. }),
        "{err:?}"
    );
    assert_eq!(std::fs::metadata(&dest).unwrap().len(), 8 * MIB);

    // Destination directory missing: the temp file cannot be made, nothing appears.
    let err = store
        .create(&base, &s.dir.join("no-dir").join("x.raw"), 16)
        .await
        .unwrap_err();
    assert!(
        matches!(disk_error(&err), DiskError::CreateTemp { .. }),
        "{err:?}"
    );

    // A raw store does not flatten qcow2 disks; onto itself is refused.
    let qdisk = CowDisk {
        format: DiskFormat::Qcow2,
        ..disk.clone()
    };
    let err = store.flatten(&qdisk, &s.path("f.raw")).await.unwrap_err();
    assert!(
        matches!(disk_error(&err), DiskError::WrongFormat { .. }),
        "{err:?}"
    );
    let err = store.flatten(&disk, &dest).await.unwrap_err();
    assert!(
        matches!(disk_error(&err), DiskError::FlattenOntoSelf { .. }),
        "{err:?}"
    );

    // Removing a disk whose file is already gone is fine.
    std::fs::remove_file(&dest).unwrap();
    store.remove(&disk).await.expect("remove missing");
    assert_eq!(s.entries(), ["base.img"]);
}

#[tokio::test]
async fn qcow2_store_flattens_raw_disks_too() {
    if !have_qemu_utils("qcow2_store_flattens_raw_disks_too") {
        return;
    }
    let s = Scratch::new("raw-via-qemu");
    let base = s.path("base.img");
    let base_bytes = make_base(&base);
    let disk = RawCopyStore::new()
        .create(&base, &s.path("d.raw"), 12)
        .await
        .unwrap();
    write_at(&disk.path, &[(9 * MIB, 0x42, 4096)]);
    Qcow2Store::new()
        .flatten(&disk, &s.path("f.raw"))
        .await
        .expect("flatten");
    let mut expected = base_bytes;
    apply(&mut expected, 12 * MIB, &[(9 * MIB, 0x42, 4096)]);
    assert_same_bytes(&std::fs::read(s.path("f.raw")).unwrap(), &expected);
}

#[test]
fn store_for_picks_the_format() {
    assert_eq!(store_for(DiskFormat::Raw).format(), DiskFormat::Raw);
    assert_eq!(store_for(DiskFormat::Qcow2).format(), DiskFormat::Qcow2);
}

/// A loop-mounted XFS with reflink=1, unmounted and detached on drop.
struct XfsMount {
    image: PathBuf,
    mnt: PathBuf,
}

impl XfsMount {
    fn new(s: &Scratch) -> Option<Self> {
        // Mounting needs CAP_SYS_ADMIN.
        let is_root = Command::new("id")
            .arg("-u")
            .output()
            .map(|o| o.stdout.trim_ascii() == b"0")
            .unwrap_or(false);
        if !is_root || !have("mkfs.xfs", "-V") {
            eprintln!("!!! SKIPPING reflink test: needs root and mkfs.xfs (xfsprogs)");
            return None;
        }
        let image = s.path("xfs.img");
        let mnt = s.path("mnt");
        std::fs::create_dir(&mnt).unwrap();
        std::fs::File::create(&image)
            .unwrap()
            .set_len(512 * MIB)
            .unwrap();
        let run = |cmd: &mut Command| {
            let out = cmd.output().expect("spawn");
            assert!(
                out.status.success(),
                "{cmd:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        };
        run(Command::new("mkfs.xfs")
            .args(["-q", "-m", "reflink=1"])
            .arg(&image));
        let mounted = Command::new("mount")
            .args(["-o", "loop"])
            .arg(&image)
            .arg(&mnt)
            .output()
            .expect("spawn mount");
        if !mounted.status.success() {
            eprintln!(
                "!!! SKIPPING reflink test: loop mount failed: {}",
                String::from_utf8_lossy(&mounted.stderr)
            );
            return None;
        }
        Some(XfsMount { image, mnt })
    }
}

impl Drop for XfsMount {
    fn drop(&mut self) {
        // `mount -o loop` sets autoclear, so unmounting detaches the loop device.
        let _ = Command::new("umount").arg(&self.mnt).status();
        let _ = std::fs::remove_file(&self.image);
    }
}

#[tokio::test]
async fn reflinks_on_xfs() {
    let s = Scratch::new("raw-xfs");
    let Some(xfs) = XfsMount::new(&s) else {
        return;
    };
    let dir = xfs.mnt.join("work");
    std::fs::create_dir(&dir).unwrap();
    assert_eq!(cycle(&RawCopyStore::new(), &dir).await, CopyMethod::Reflink);
}
