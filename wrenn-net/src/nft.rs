//! nftables rulesets, built from typed values and loaded with `nft -f -` as one
//! atomic batch. No shell is involved: the ruleset goes to nft's stdin.
//!
//! Each ruleset starts with `table …` + `delete table …`, so loading it replaces
//! any previous version of the table atomically (and works when there is none).

use crate::error::SlotError;
use crate::slot::{HOST_VETH_PREFIX, PEER_VETH, SLOT_RANGE, SLOT_RANGE_PREFIX};
use std::io::Write;
use std::net::Ipv4Addr;
use std::path::Path;
use std::process::{Command, Stdio};
use wrenn_core::net::GUEST_IP;

/// Table inside every slot namespace.
pub const SLOT_TABLE: &str = "ip wrenn";
/// Table in the host (root) namespace.
pub const HOST_TABLE: &str = "inet wrenn";

/// Slot table: host → `peer` is DNATed to the guest; traffic leaving through the
/// peer veth (guest egress) is masqueraded to the peer address.
pub fn slot_ruleset(peer: Ipv4Addr) -> String {
    format!(
        "table {SLOT_TABLE}
delete table {SLOT_TABLE}
table {SLOT_TABLE} {{
  chain prerouting {{
    type nat hook prerouting priority dstnat; policy accept;
    ip daddr {peer} meta l4proto {{ tcp, udp, icmp }} dnat to {GUEST_IP}
  }}
  chain postrouting {{
    type nat hook postrouting priority srcnat; policy accept;
    oifname \"{PEER_VETH}\" masquerade
  }}
}}
"
    )
}

/// Host table: no traffic between slots, no new connections from a slot to the
/// host, and egress NAT for slot traffic leaving through a non-slot interface.
pub fn host_ruleset() -> String {
    let veths = format!("{HOST_VETH_PREFIX}*");
    format!(
        "table {HOST_TABLE}
delete table {HOST_TABLE}
table {HOST_TABLE} {{
  chain forward {{
    type filter hook forward priority filter; policy accept;
    iifname \"{veths}\" oifname \"{veths}\" drop
    ct state established,related accept
  }}
  chain input {{
    type filter hook input priority filter; policy accept;
    iifname \"{veths}\" ct state established,related accept
    iifname \"{veths}\" drop
  }}
  chain postrouting {{
    type nat hook postrouting priority srcnat; policy accept;
    ip saddr {SLOT_RANGE}/{SLOT_RANGE_PREFIX} oifname != \"{veths}\" masquerade
  }}
}}
"
    )
}

/// Removes `table` if present.
pub fn delete_ruleset(table: &str) -> String {
    format!("table {table}\ndelete table {table}\n")
}

/// Loads `ruleset` into the calling thread's namespace (the child inherits it).
/// Blocking: call it from a namespace worker thread.
pub(crate) fn apply(nft: &Path, table: &'static str, ruleset: &str) -> Result<(), SlotError> {
    let spawn_err = |source| SlotError::NftSpawn {
        nft: nft.to_owned(),
        table,
        source,
    };
    let mut child = Command::new(nft)
        .args(["-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(spawn_err)?;
    let written = child
        .stdin
        .take()
        .map(|mut stdin| stdin.write_all(ruleset.as_bytes()))
        .unwrap_or(Ok(()));
    // Wait even if writing failed, so no zombie is left; report the exit first.
    let out = child.wait_with_output().map_err(spawn_err)?;
    if !out.status.success() {
        return Err(SlotError::NftRejected {
            table,
            status: out.status.code().unwrap_or(-1),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        });
    }
    written.map_err(spawn_err)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slot_ruleset_names_the_peer_and_guest() {
        let r = slot_ruleset(Ipv4Addr::new(169, 254, 128, 6));
        assert!(r.starts_with("table ip wrenn\ndelete table ip wrenn\n"));
        assert!(r.contains(
            "ip daddr 169.254.128.6 meta l4proto { tcp, udp, icmp } dnat to 169.254.0.21"
        ));
        assert!(r.contains("oifname \"veth0\" masquerade"));
    }

    #[test]
    fn host_ruleset_isolates_slots() {
        let r = host_ruleset();
        assert!(r.contains("iifname \"wrenn-veth-*\" oifname \"wrenn-veth-*\" drop"));
        assert!(r.contains("iifname \"wrenn-veth-*\" drop"));
        assert!(r.contains("ip saddr 169.254.128.0/17 oifname != \"wrenn-veth-*\" masquerade"));
        // The drop between slots comes before the established accept.
        assert!(
            r.find("oifname \"wrenn-veth-*\" drop") < r.find("ct state established,related accept")
        );
    }

    #[test]
    fn rulesets_are_braced() {
        for r in [slot_ruleset(Ipv4Addr::LOCALHOST), host_ruleset()] {
            assert_eq!(r.matches('{').count(), r.matches('}').count());
        }
    }
}
