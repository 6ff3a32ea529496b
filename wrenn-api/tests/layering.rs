//! The control plane links no host stack: neither its code, its build nor its tests
//! pull in the VMM, network, memory-server or host-wiring crates, so it can run on a
//! machine that runs no capsules and drive remote host agents.

#![allow(clippy::tests_outside_test_module)] // integration tests are their own crate

use std::collections::BTreeSet;
use std::process::Command;

/// Crates that only a host needs.
const HOST_STACK: [&str; 8] = [
    "wrenn",
    "wrenn-agent",
    "wrenn-vmm",
    "wrenn-net",
    "wrenn-storage",
    "userfaultfd",
    "rtnetlink",
    "netlink-sys",
];

#[test]
fn the_control_plane_links_no_host_stack() {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let out = Command::new(cargo)
        .args([
            "tree",
            "--package",
            "wrenn-api",
            "--edges",
            "normal,build,dev",
            "--prefix",
            "none",
            "--format",
            "{p}",
            "--offline",
        ])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .expect("run cargo tree");
    assert!(
        out.status.success(),
        "cargo tree failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let tree = String::from_utf8_lossy(&out.stdout);
    let crates: BTreeSet<&str> = tree
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .collect();
    assert!(
        crates.contains("wrenn-core") && crates.contains("wrenn-db"),
        "unexpected cargo tree output:\n{tree}"
    );
    let linked: Vec<&str> = HOST_STACK
        .iter()
        .copied()
        .filter(|c| crates.contains(c))
        .collect();
    assert!(
        linked.is_empty(),
        "wrenn-api depends on host crates {linked:?}"
    );
}
