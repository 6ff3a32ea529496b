//! Replays every committed fuzz input (`fuzz/corpus/TARGET/*`, and crash
//! reproducers under `fuzz/artifacts/TARGET/`) through its target's checks.

// Integration tests are their own crate; the lint targets unit tests.
#![allow(clippy::tests_outside_test_module)]

use std::path::Path;

#[test]
fn every_committed_input_passes_its_target() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz");
    for (name, check) in wrenn_fuzz::TARGETS {
        let mut replayed = 0;
        for dir in ["corpus", "artifacts"] {
            let Ok(entries) = std::fs::read_dir(root.join(dir).join(name)) else {
                continue;
            };
            for entry in entries.flatten() {
                let data = std::fs::read(entry.path()).expect("read input");
                check(&data);
                replayed += 1;
            }
        }
        assert!(replayed > 0, "no committed inputs for fuzz target {name}");
        println!("{name}: {replayed} inputs replayed");
    }
}
