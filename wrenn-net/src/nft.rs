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
use wrenn_core::egress::{EgressPolicy, Ipv4Net, ALWAYS_DENIED};
use wrenn_core::net::{GATEWAY_IP, GUEST_IP, TAP_NAME};

/// DNS port the filtering resolver intercepts.
pub const DNS_PORT: u16 = 53;

/// Table inside every slot namespace.
pub const SLOT_TABLE: &str = "ip wrenn";
/// Table in the host (root) namespace.
pub const HOST_TABLE: &str = "inet wrenn";

/// Slot table: host → `peer` is DNATed to the guest; traffic leaving through the
/// peer veth (guest egress) is masqueraded to the peer address; the guest's
/// egress is filtered by `policy` (see [`egress_commands`]), and new
/// connections from the guest to the slot namespace itself are refused (DNS to
/// the gateway, where the filtering resolver listens, excepted).
pub fn slot_ruleset(peer: Ipv4Addr, policy: &EgressPolicy) -> String {
    let always: Vec<String> = ALWAYS_DENIED.iter().map(ToString::to_string).collect();
    let mut r = format!(
        "table {SLOT_TABLE}
delete table {SLOT_TABLE}
table {SLOT_TABLE} {{
  set always_deny {{ type ipv4_addr; flags interval; elements = {{ {always} }} }}
  set allow {{ type ipv4_addr; flags interval; auto-merge; }}
  set deny {{ type ipv4_addr; flags interval; auto-merge; }}
  set resolved {{ type ipv4_addr; flags timeout; }}
  chain prerouting {{
    type nat hook prerouting priority dstnat; policy accept;
    ip daddr {peer} meta l4proto {{ tcp, udp, icmp }} dnat to {GUEST_IP}
    iifname \"{TAP_NAME}\" jump dns
  }}
  chain dns {{
  }}
  chain postrouting {{
    type nat hook postrouting priority srcnat; policy accept;
    oifname \"{PEER_VETH}\" masquerade
  }}
  chain forward {{
    type filter hook forward priority filter; policy accept;
    iifname \"{TAP_NAME}\" ct direction reply accept
    iifname \"{TAP_NAME}\" ip daddr @always_deny goto refuse
    iifname \"{TAP_NAME}\" jump egress
  }}
  chain egress {{
  }}
  chain input {{
    type filter hook input priority filter; policy accept;
    iifname \"{TAP_NAME}\" ct direction reply accept
    iifname \"{TAP_NAME}\" ip daddr {GATEWAY_IP} meta l4proto udp udp dport {DNS_PORT} accept
    iifname \"{TAP_NAME}\" goto refuse
  }}
  chain refuse {{
    meta l4proto tcp reject with tcp reset
    reject with icmp type admin-prohibited
  }}
}}
",
        always = always.join(", ")
    );
    r.push_str(&egress_commands(policy));
    r
}

/// Replaces the egress part of a slot table with `policy`, as commands that
/// `nft -f` applies in one atomic batch: the allow and deny sets, the verdict
/// chain, the DNS redirect to the filtering resolver, and (emptied) the
/// addresses allowed names resolved to under the previous policy.
pub fn egress_commands(policy: &EgressPolicy) -> String {
    let mut r = String::new();
    for chain in ["egress", "dns"] {
        r.push_str(&format!("flush chain {SLOT_TABLE} {chain}\n"));
    }
    for set in ["allow", "deny", "resolved"] {
        r.push_str(&format!("flush set {SLOT_TABLE} {set}\n"));
    }
    let elements = |nets: &[Ipv4Net]| {
        nets.iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join(", ")
    };
    let allowed = policy.allowed_nets();
    if !allowed.is_empty() {
        r.push_str(&format!(
            "add element {SLOT_TABLE} allow {{ {} }}\n",
            elements(&allowed)
        ));
        r.push_str(&format!(
            "add rule {SLOT_TABLE} egress ip daddr @allow accept\n"
        ));
    }
    if policy.filters_dns() {
        r.push_str(&format!(
            "add rule {SLOT_TABLE} egress ip daddr @resolved accept\n\
             add rule {SLOT_TABLE} dns meta l4proto {{ tcp, udp }} th dport {DNS_PORT} dnat to {GATEWAY_IP}:{DNS_PORT}\n"
        ));
    }
    if !policy.deny().is_empty() {
        r.push_str(&format!(
            "add element {SLOT_TABLE} deny {{ {} }}\n\
             add rule {SLOT_TABLE} egress ip daddr @deny goto refuse\n",
            elements(policy.deny())
        ));
    }
    r
}

/// Adds `ips` to the slot's `resolved` set for `ttl` seconds each, replacing
/// an existing element (and its timeout): add (a no-op when present), delete,
/// add again, in one batch.
pub fn resolved_commands(ips: &[(Ipv4Addr, u32)]) -> String {
    let mut r = String::new();
    for (ip, ttl) in ips {
        r.push_str(&format!(
            "add element {SLOT_TABLE} resolved {{ {ip} timeout {ttl}s }}\n\
             delete element {SLOT_TABLE} resolved {{ {ip} }}\n\
             add element {SLOT_TABLE} resolved {{ {ip} timeout {ttl}s }}\n"
        ));
    }
    r
}

/// Host table: no traffic between slots, no new connections from a slot to the
/// host (both refused with a TCP reset or an ICMP error), and egress NAT for slot traffic leaving through a non-slot interface.
pub fn host_ruleset() -> String {
    let veths = format!("{HOST_VETH_PREFIX}*");
    format!(
        "table {HOST_TABLE}
delete table {HOST_TABLE}
table {HOST_TABLE} {{
  chain forward {{
    type filter hook forward priority filter; policy accept;
    iifname \"{veths}\" oifname \"{veths}\" goto refuse
    ct state established,related accept
  }}
  chain input {{
    type filter hook input priority filter; policy accept;
    iifname \"{veths}\" ct state established,related accept
    iifname \"{veths}\" goto refuse
  }}
  chain refuse {{
    meta l4proto tcp reject with tcp reset
    meta nfproto ipv4 reject with icmp type admin-prohibited
    drop
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
        let r = slot_ruleset(Ipv4Addr::new(169, 254, 128, 6), &EgressPolicy::default());
        assert!(r.starts_with("table ip wrenn\ndelete table ip wrenn\n"));
        assert!(r.contains(
            "ip daddr 169.254.128.6 meta l4proto { tcp, udp, icmp } dnat to 169.254.0.21"
        ));
        assert!(r.contains("oifname \"veth0\" masquerade"));
    }

    #[test]
    fn egress_commands_follow_the_policy() {
        let open = egress_commands(&EgressPolicy::default());
        assert!(!open.contains("add rule"), "{open}");
        assert!(open.contains("flush set ip wrenn resolved"));
        let p = EgressPolicy::new(
            &["198.18.0.0/24", "*.example.com"],
            &["0.0.0.0/0"],
            Some(&[]),
        )
        .unwrap();
        let r = egress_commands(&p);
        assert!(
            r.contains("add element ip wrenn allow { 198.18.0.0/24 }"),
            "{r}"
        );
        assert!(r.contains("add element ip wrenn deny { 0.0.0.0/0 }"), "{r}");
        assert!(r.contains("dnat to 169.254.0.22:53"), "{r}");
        // allow, then resolved names, then deny.
        let at = |needle: &str| r.find(needle).unwrap();
        assert!(at("@allow accept") < at("@resolved accept"));
        assert!(at("@resolved accept") < at("@deny goto refuse"));
        let deny_only = egress_commands(&EgressPolicy::new(&["example.com"], &[], None).unwrap());
        assert!(
            !deny_only.contains("dnat"),
            "a domain with nothing denied filters nothing"
        );
    }

    #[test]
    fn host_ruleset_isolates_slots() {
        let r = host_ruleset();
        assert!(r.contains("iifname \"wrenn-veth-*\" oifname \"wrenn-veth-*\" goto refuse"));
        assert!(r.contains("iifname \"wrenn-veth-*\" goto refuse"));
        assert!(r.contains("ip saddr 169.254.128.0/17 oifname != \"wrenn-veth-*\" masquerade"));
        // The drop between slots comes before the established accept.
        assert!(
            r.find("oifname \"wrenn-veth-*\" goto refuse")
                < r.find("ct state established,related accept")
        );
    }

    #[test]
    fn rulesets_are_braced() {
        let strict = EgressPolicy::new(&["example.com"], &["0.0.0.0/0"], None).unwrap();
        for r in [
            slot_ruleset(Ipv4Addr::LOCALHOST, &EgressPolicy::default()),
            slot_ruleset(Ipv4Addr::LOCALHOST, &strict),
            host_ruleset(),
        ] {
            assert_eq!(r.matches('{').count(), r.matches('}').count());
        }
    }
}
