//! FsSnapshotStore's disk chain over a real Qcow2Store: every pause adds the VM's
//! writable disk as a layer over its sibling, past the cap the newest layer takes in
//! the others, and what a resume would boot from always holds exactly what the guest
//! wrote.
// An integration-test crate is test-only as a whole; the lint targets unit tests.
#![allow(clippy::tests_outside_test_module)]

mod common;

use common::*;
use std::process::Command;
use std::sync::Arc;
use wrenn_core::id::CapsuleId;
use wrenn_core::snapshot::{SnapshotMeta, SnapshotStore};
use wrenn_core::spec::CapsuleSpec;
use wrenn_core::storage::CowStore;
use wrenn_core::template::TemplateName;
use wrenn_core::vmm::{Accel, MemoryBase};
use wrenn_storage::capsnap::DISK_LAYER_CAP;
use wrenn_storage::{FsSnapshotStore, Qcow2Store};

fn meta() -> SnapshotMeta {
    SnapshotMeta {
        spec: CapsuleSpec {
            template: TemplateName::parse("minimal").unwrap(),
            vcpus: 1,
            memory_mb: 128,
            disk_mb: 16,
            envs: Default::default(),
            metadata: Default::default(),
            network: Default::default(),
        },
        accel: Accel::Tcg,
        mem_bytes: 0,
        memory_base: MemoryBase::Zero,
        access_token: String::new(),
        kernel: "/nonexistent/vmlinux".into(),
        cmdline: String::new(),
        created_at: 0,
        disk_only: true,
    }
}

fn layers(version: &std::path::Path) -> usize {
    std::fs::read_dir(version)
        .unwrap()
        .filter(|e| {
            let n = e.as_ref().unwrap().file_name().into_string().unwrap();
            n.starts_with("disk-") && n.ends_with(".qcow2")
        })
        .count()
}

#[tokio::test]
async fn pauses_chain_disk_layers_and_fold_them_at_the_cap() {
    if !have_qemu_utils("pauses_chain_disk_layers_and_fold_them_at_the_cap") {
        return;
    }
    let s = Scratch::new("snapdisks");
    let base = s.path("base.img");
    let mut expected = make_base(&base);
    let disks = Arc::new(Qcow2Store::new());
    let store = FsSnapshotStore::new(s.path("snapshots"), s.path("templates"), disks.clone());
    let id = CapsuleId::random();
    let capsule = s.path("capsule");
    std::fs::create_dir(&capsule).unwrap();

    let mut below = base.clone();
    for round in 0..(DISK_LAYER_CAP as u64 + 3) {
        // A VM runs on a fresh layer over what the last pause kept, and writes.
        let disk = disks
            .create(&below, &disks.disk_path(&capsule), 16)
            .await
            .expect("create");
        let write = [(round * MIB, 0x10 + round as u8, 8192)];
        qemu_io_write(&disk.path, "qcow2", write[0].1, write[0].0, write[0].2);
        apply(&mut expected, 16 * MIB, &write);
        store.begin_pause(&id).await.expect("begin");
        store
            .commit_disk_only(&id, &meta(), Some(&disk))
            .await
            .expect("commit");
        // The snapshot holds its own link; the capsule's goes with the VM.
        disks.remove(&disk).await.expect("remove");

        let r = store.open(&id).await.expect("open");
        let version = r.disk_base.parent().unwrap().to_path_buf();
        let n = layers(&version);
        assert!(n <= DISK_LAYER_CAP, "round {round}: {n} layers");
        if round as usize == DISK_LAYER_CAP {
            assert_eq!(n, 1, "round {round}: the chain was not folded");
        }
        let flat = s.path("flat.raw");
        let out = Command::new("qemu-img")
            .args(["convert", "-O", "raw"])
            .arg(&r.disk_base)
            .arg(&flat)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_same_bytes(&std::fs::read(&flat).unwrap(), &expected);
        std::fs::remove_file(&flat).unwrap();
        below = r.disk_base;
    }
    store.remove(&id).await.expect("remove");
    assert!(!s.path("snapshots").join(id.as_str()).exists());
}
