//! Qcow2Store against real files and the real qemu-img/qemu-io.
// An integration-test crate is test-only as a whole; the lint targets unit tests.
#![allow(clippy::tests_outside_test_module)]

mod common;

use common::*;
use wrenn_core::storage::{CowStore, DiskFormat, StorageError};
use wrenn_storage::{DiskError, Qcow2Store};

#[tokio::test]
async fn create_write_flatten_remove() {
    if !have_qemu_utils("create_write_flatten_remove") {
        return;
    }
    let s = Scratch::new("qcow2");
    let base = s.path("base.img");
    let base_bytes = make_base(&base);
    let store = Qcow2Store::new();
    assert_eq!(store.format(), DiskFormat::Qcow2);

    // A base path with `..` in it: the overlay must record the canonical absolute path.
    std::fs::create_dir(s.path("sub")).unwrap();
    let indirect_base = s.dir.join("sub").join("..").join("base.img");
    let overlay = s.path("capsule.qcow2");
    let disk = store
        .create(&indirect_base, &overlay, 16)
        .await
        .expect("create");
    let canonical_base = std::fs::canonicalize(&base).unwrap();
    assert_eq!(disk.path, overlay);
    assert_eq!(disk.format, DiskFormat::Qcow2);
    assert_eq!(disk.base, canonical_base);
    assert_eq!(disk.size_bytes, 16 * MIB);
    assert_eq!(
        s.entries(),
        ["base.img", "capsule.qcow2", "sub"],
        "temp file left behind"
    );

    let info = qemu_img_info(&overlay);
    assert_eq!(info["format"], "qcow2");
    assert_eq!(info["virtual-size"], 16 * MIB);
    assert_eq!(info["backing-filename"], canonical_base.to_str().unwrap());
    assert_eq!(info["backing-filename-format"], "raw");
    // An overlay costs metadata only.
    assert!(
        allocated(&overlay) < MIB,
        "overlay allocated {} bytes",
        allocated(&overlay)
    );

    // Guest writes: over base data, over a base hole, and past the base's end.
    let writes = [
        (MIB, 0xab, 64 * 1024),
        (3 * MIB, 0xcd, 4096),
        (12 * MIB, 0xef, 128 * 1024),
    ];
    for &(off, byte, len) in &writes {
        qemu_io_write(&overlay, "qcow2", byte, off, len);
    }
    assert_same_bytes(&std::fs::read(&base).unwrap(), &base_bytes);

    let flat = s.path("flat.raw");
    store.flatten(&disk, &flat).await.expect("flatten");
    let mut expected = base_bytes.clone();
    apply(&mut expected, 16 * MIB, &writes);
    assert_same_bytes(&std::fs::read(&flat).unwrap(), &expected);
    assert_eq!(std::fs::metadata(&flat).unwrap().len(), 16 * MIB);
    let data: u64 = BASE_PIECES.iter().map(|p| p.2 as u64).sum::<u64>()
        + writes.iter().map(|w| w.2).sum::<u64>();
    assert!(
        allocated(&flat) < data + MIB,
        "flattened image not sparse: {} bytes allocated",
        allocated(&flat)
    );
    assert_eq!(qemu_img_info(&flat)["format"], "raw");

    // Flattening again replaces the destination atomically.
    qemu_io_write(&overlay, "qcow2", 0x77, 0, 4096);
    store.flatten(&disk, &flat).await.expect("re-flatten");
    apply(&mut expected, 16 * MIB, &[(0, 0x77, 4096)]);
    assert_same_bytes(&std::fs::read(&flat).unwrap(), &expected);

    // Flattening onto the disk itself is refused.
    let err = store.flatten(&disk, &overlay).await.unwrap_err();
    assert!(
        matches!(disk_error(&err), DiskError::FlattenOntoSelf { .. }),
        "{err:?}"
    );

    store.remove(&disk).await.expect("remove");
    assert!(!overlay.exists());
    store.remove(&disk).await.expect("remove is idempotent");
    assert_same_bytes(&std::fs::read(&base).unwrap(), &base_bytes);
    assert_eq!(s.entries(), ["base.img", "flat.raw", "sub"]);
}

#[tokio::test]
async fn create_errors() {
    if !have_qemu_utils("create_errors") {
        return;
    }
    let s = Scratch::new("qcow2-err");
    let base = s.path("base.img");
    make_base(&base);
    let store = Qcow2Store::new();

    let missing = s.path("nope.img");
    let err = store
        .create(&missing, &s.path("a.qcow2"), 16)
        .await
        .unwrap_err();
    assert!(
        matches!(&err, StorageError::BaseMissing { path } if *path == missing),
        "{err:?}"
    );

    let err = store
        .create(&base, &s.path("a.qcow2"), 4)
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            StorageError::TooSmall {
                requested_mb: 4,
                base_mb: 8
            }
        ),
        "{err:?}"
    );

    // A base that is not a whole number of MiB rounds up.
    let odd = s.path("odd.img");
    std::fs::File::create(&odd)
        .unwrap()
        .set_len(8 * MIB + 1)
        .unwrap();
    let err = store.create(&odd, &s.path("a.qcow2"), 8).await.unwrap_err();
    assert!(
        matches!(
            err,
            StorageError::TooSmall {
                requested_mb: 8,
                base_mb: 9
            }
        ),
        "{err:?}"
    );
    store
        .create(&odd, &s.path("odd.qcow2"), 9)
        .await
        .expect("9 MiB fits");

    // Same size as the base is fine; an existing destination is not overwritten.
    let dest = s.path("same.qcow2");
    store.create(&base, &dest, 8).await.expect("create");
    let before = std::fs::read(&dest).unwrap();
    let err = store.create(&base, &dest, 16).await.unwrap_err();
    assert!(
        matches!(disk_error(&err), DiskError::DestinationExists { .. }),
        "{err:?}"
    );
    assert_eq!(std::fs::read(&dest).unwrap(), before);

    // The base being a directory.
    let err = store
        .create(&s.dir, &s.path("b.qcow2"), 16)
        .await
        .unwrap_err();
    assert!(
        matches!(disk_error(&err), DiskError::BaseNotFile { .. }),
        "{err:?}"
    );

    assert_eq!(
        s.entries(),
        ["base.img", "odd.img", "odd.qcow2", "same.qcow2"]
    );
}

#[tokio::test]
async fn qemu_img_failures_leave_nothing_behind() {
    let s = Scratch::new("qcow2-fail");
    let base = s.path("base.img");
    make_base(&base);

    // qemu-img that exits non-zero.
    let store = Qcow2Store::with_qemu_img("/bin/false");
    let err = store
        .create(&base, &s.path("a.qcow2"), 16)
        .await
        .unwrap_err();
    assert!(
        matches!(disk_error(&err), DiskError::QemuImgCreate { .. }),
        "{err:?}"
    );

    // qemu-img that does not exist.
    let store = Qcow2Store::with_qemu_img(s.path("no-such-qemu-img"));
    let err = store
        .create(&base, &s.path("a.qcow2"), 16)
        .await
        .unwrap_err();
    let DiskError::SpawnQemuImg { step, .. } = disk_error(&err) else {
        panic!("{err:?}");
    };
    assert_eq!(*step, "create");
    assert!(std::error::Error::source(disk_error(&err)).is_some());

    assert_eq!(s.entries(), ["base.img"]);
}

#[tokio::test]
async fn flatten_failure_keeps_old_destination() {
    if !have_qemu_utils("flatten_failure_keeps_old_destination") {
        return;
    }
    let s = Scratch::new("qcow2-flatfail");
    let base = s.path("base.img");
    make_base(&base);
    let store = Qcow2Store::new();
    let disk = store.create(&base, &s.path("c.qcow2"), 16).await.unwrap();
    let flat = s.path("flat.raw");
    std::fs::write(&flat, b"previous snapshot").unwrap();

    // Break the overlay past the fields Wrenn checks (an impossible cluster size;
    // magic, backing name and features intact): convert must fail, leaving the old
    // flat file intact.
    let mut image = std::fs::read(&disk.path).unwrap();
    image[20..24].copy_from_slice(&99u32.to_be_bytes());
    std::fs::write(&disk.path, &image).unwrap();
    let err = store.flatten(&disk, &flat).await.unwrap_err();
    let DiskError::QemuImgConvert { stderr, .. } = disk_error(&err) else {
        panic!("{err:?}");
    };
    assert!(!stderr.is_empty(), "stderr not captured");
    assert_eq!(std::fs::read(&flat).unwrap(), b"previous snapshot");
    assert_eq!(s.entries(), ["base.img", "c.qcow2", "flat.raw"]);

    // A header the VMM rewrote is not followed at all.
    std::fs::write(&disk.path, b"not a qcow2 image").unwrap();
    let err = store.flatten(&disk, &flat).await.unwrap_err();
    assert!(
        matches!(disk_error(&err), DiskError::UntrustedLayer { .. }),
        "{err:?}"
    );
    assert_eq!(std::fs::read(&flat).unwrap(), b"previous snapshot");
}

#[tokio::test]
async fn flattens_a_real_ext4_base() {
    if !have_qemu_utils("flattens_a_real_ext4_base") {
        return;
    }
    if !have("mkfs.ext4", "-V") {
        eprintln!("!!! SKIPPING flattens_a_real_ext4_base: mkfs.ext4 missing");
        return;
    }
    let s = Scratch::new("qcow2-ext4");
    let base = s.path("rootfs.ext4");
    std::fs::File::create(&base)
        .unwrap()
        .set_len(32 * MIB)
        .unwrap();
    let out = std::process::Command::new("mkfs.ext4")
        .args(["-q", "-F"])
        .arg(&base)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let base_bytes = std::fs::read(&base).unwrap();

    let store = Qcow2Store::new();
    let disk = store.create(&base, &s.path("c.qcow2"), 64).await.unwrap();
    qemu_io_write(&disk.path, "qcow2", 0x5a, 40 * MIB, MIB);
    let flat = s.path("flat.raw");
    store.flatten(&disk, &flat).await.unwrap();

    let mut expected = base_bytes;
    apply(&mut expected, 64 * MIB, &[(40 * MIB, 0x5a, MIB)]);
    assert_same_bytes(&std::fs::read(&flat).unwrap(), &expected);
    assert!(
        allocated(&flat) < 16 * MIB,
        "flattened ext4 not sparse: {}",
        allocated(&flat)
    );
    // The flattened image is still a valid filesystem.
    let out = std::process::Command::new("e2fsck")
        .args(["-n", "-f"])
        .arg(&flat)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "e2fsck: {}",
        String::from_utf8_lossy(&out.stdout)
    );
}

/// A chain of layers moved into a directory of their own (the snapshot store's
/// use): `rebind` points each at its sibling without touching other links to the
/// old file, `fold` makes the newest stand on the base alone, and the content the
/// guest saw never changes.
#[tokio::test]
async fn layers_rebind_to_siblings_and_fold_onto_the_base() {
    if !have_qemu_utils("layers_rebind_to_siblings_and_fold_onto_the_base") {
        return;
    }
    let s = Scratch::new("qcow2-chain");
    let base = s.path("base.img");
    let mut expected = make_base(&base);
    let store = Qcow2Store::new();
    let chain = s.path("chain");
    std::fs::create_dir(&chain).unwrap();
    std::fs::hard_link(&base, chain.join("disk.base")).unwrap();

    // Layer 0 over the base, moved into the chain and pointed at its sibling.
    let l0 = store.create(&base, &s.path("l0.qcow2"), 16).await.unwrap();
    let w0 = [(MIB, 0xab, 64 * 1024), (12 * MIB, 0xef, 4096)];
    for &(off, byte, len) in &w0 {
        qemu_io_write(&l0.path, "qcow2", byte, off, len);
    }
    apply(&mut expected, 16 * MIB, &w0);
    std::fs::hard_link(&l0.path, chain.join("disk-0.qcow2")).unwrap();
    store
        .rebind(
            &chain.join("disk-0.qcow2"),
            std::path::Path::new("disk.base"),
        )
        .await
        .expect("rebind");
    assert_eq!(
        qemu_img_info(&chain.join("disk-0.qcow2"))["backing-filename"],
        "disk.base"
    );
    // The capsule's own link still names the base it was made over.
    assert_eq!(
        qemu_img_info(&l0.path)["backing-filename"],
        std::fs::canonicalize(&base).unwrap().to_str().unwrap()
    );

    // Layer 1 over layer 0, likewise.
    let l1 = store
        .create(&chain.join("disk-0.qcow2"), &s.path("l1.qcow2"), 16)
        .await
        .unwrap();
    let w1 = [(MIB, 0x11, 4096), (3 * MIB, 0xcd, 4096)];
    for &(off, byte, len) in &w1 {
        qemu_io_write(&l1.path, "qcow2", byte, off, len);
    }
    apply(&mut expected, 16 * MIB, &w1);
    let top = chain.join("disk-1.qcow2");
    std::fs::hard_link(&l1.path, &top).unwrap();
    store
        .rebind(&top, std::path::Path::new("disk-0.qcow2"))
        .await
        .expect("rebind");

    // Folded onto the base, the middle layer can go and nothing is lost.
    store
        .fold(&top, std::path::Path::new("disk.base"))
        .await
        .expect("fold");
    assert_eq!(qemu_img_info(&top)["backing-filename"], "disk.base");
    std::fs::remove_file(chain.join("disk-0.qcow2")).unwrap();
    let folded = wrenn_core::storage::CowDisk {
        path: top.clone(),
        format: DiskFormat::Qcow2,
        base: std::fs::canonicalize(chain.join("disk.base")).unwrap(),
        size_bytes: 16 * MIB,
    };
    let flat = s.path("flat.raw");
    store.flatten(&folded, &flat).await.expect("flatten");
    assert_same_bytes(&std::fs::read(&flat).unwrap(), &expected);
    let mut names = std::fs::read_dir(&chain)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect::<Vec<_>>();
    names.sort();
    assert_eq!(
        names,
        ["disk-1.qcow2", "disk.base"],
        "temp file left behind"
    );

    // A backing that is not there is refused, and the layer is left as it was.
    let err = store
        .rebind(&top, std::path::Path::new("missing.base"))
        .await
        .unwrap_err();
    assert!(
        matches!(&err, StorageError::BaseMissing { path } if path.ends_with("missing.base")),
        "{err:?}"
    );
    assert_eq!(qemu_img_info(&top)["backing-filename"], "disk.base");
    // A layer that is not an image fails in qemu-img, with its words.
    std::fs::write(chain.join("junk.qcow2"), b"not an image").unwrap();
    let err = store
        .fold(&chain.join("junk.qcow2"), std::path::Path::new("disk.base"))
        .await
        .unwrap_err();
    assert!(
        matches!(disk_error(&err), DiskError::QemuImgRebase { .. }),
        "{err:?}"
    );
    assert_eq!(
        std::fs::read(chain.join("junk.qcow2")).unwrap(),
        b"not an image"
    );
}
