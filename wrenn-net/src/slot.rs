//! Names and addresses of a slot, derived from its index alone.
//!
//! Because nothing about a slot is stored, the sweep can rebuild a leftover
//! slot from its namespace name and tear it down with the normal code path.

use std::net::Ipv4Addr;
use std::path::PathBuf;
use wrenn_core::net::{NetSlot, SlotIndex, TAP_NAME};

/// Directory where named network namespaces are bind-mounted (as `ip netns` does).
pub const NETNS_DIR: &str = "/run/netns";
/// Prefix of slot namespace names; the index follows.
pub const NETNS_PREFIX: &str = "wrenn-ns-";
/// Prefix of host-side veth names; the index follows.
pub const HOST_VETH_PREFIX: &str = "wrenn-veth-";
/// Name of the veth peer inside every slot namespace.
pub const PEER_VETH: &str = "veth0";
/// Link-local range that holds one /30 per slot.
pub const SLOT_RANGE: Ipv4Addr = Ipv4Addr::new(169, 254, 128, 0);
/// Prefix length of [`SLOT_RANGE`].
pub const SLOT_RANGE_PREFIX: u8 = 17;
/// Prefix length of each slot's veth link.
pub const VETH_PREFIX: u8 = 30;
/// Highest slot index that fits in [`SLOT_RANGE`] (index 0 is never used).
pub const MAX_INDEX: u32 = (1 << (32 - SLOT_RANGE_PREFIX)) / 4 - 1;
/// Transmit queue length of the tap.
pub const TAP_TXQUEUELEN: u32 = 5000;

/// First address of the slot's /30.
pub fn slot_base(index: SlotIndex) -> Ipv4Addr {
    assert!(
        (1..=MAX_INDEX).contains(&index.0),
        "Slot index {index} outside 1..={MAX_INDEX}"
    );
    Ipv4Addr::from(u32::from(SLOT_RANGE) + 4 * index.0)
}

/// Address of the host-side veth (the namespace's default gateway).
pub fn host_veth_addr(index: SlotIndex) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(slot_base(index)) + 1)
}

/// Address of the veth peer inside the namespace; the host reaches the guest through it.
pub fn peer_addr(index: SlotIndex) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(slot_base(index)) + 2)
}

/// Everything about slot `index`, computed from the index alone.
///
/// # Panics
/// If `index` is 0 or above [`MAX_INDEX`].
pub fn slot_for(index: SlotIndex) -> NetSlot {
    let netns = format!("{NETNS_PREFIX}{index}");
    NetSlot {
        index,
        netns_path: PathBuf::from(NETNS_DIR).join(&netns),
        netns,
        tap: TAP_NAME.to_owned(),
        host_veth: format!("{HOST_VETH_PREFIX}{index}"),
        host_addr: peer_addr(index),
    }
}

/// Parses the index out of a name like `wrenn-ns-12`; `None` for anything else.
pub fn parse_index(name: &str, prefix: &str) -> Option<SlotIndex> {
    let digits = name.strip_prefix(prefix)?;
    if digits.is_empty() || digits.starts_with('0') || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let n: u32 = digits.parse().ok()?;
    (1..=MAX_INDEX).contains(&n).then_some(SlotIndex(n))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_slot() {
        let s = slot_for(SlotIndex(1));
        assert_eq!(s.netns, "wrenn-ns-1");
        assert_eq!(s.netns_path, PathBuf::from("/run/netns/wrenn-ns-1"));
        assert_eq!(s.host_veth, "wrenn-veth-1");
        assert_eq!(s.tap, "tap0");
        assert_eq!(s.host_addr, Ipv4Addr::new(169, 254, 128, 6));
        assert_eq!(
            host_veth_addr(SlotIndex(1)),
            Ipv4Addr::new(169, 254, 128, 5)
        );
    }

    #[test]
    fn last_slot_stays_in_range_and_names_fit() {
        assert_eq!(MAX_INDEX, 8191);
        let s = slot_for(SlotIndex(MAX_INDEX));
        assert_eq!(s.host_addr, Ipv4Addr::new(169, 254, 255, 254));
        assert_eq!(
            host_veth_addr(SlotIndex(MAX_INDEX)),
            Ipv4Addr::new(169, 254, 255, 253)
        );
        // IFNAMSIZ is 16 including the NUL.
        assert!(s.host_veth.len() <= 15);
    }

    #[test]
    fn slots_do_not_overlap() {
        let mut seen = std::collections::HashSet::new();
        for n in 1..=MAX_INDEX {
            let i = SlotIndex(n);
            assert!(seen.insert(host_veth_addr(i)));
            assert!(seen.insert(peer_addr(i)));
            assert_eq!(u32::from(slot_base(i)) % 4, 0);
        }
    }

    #[test]
    #[should_panic(expected = "outside")]
    fn index_zero_is_rejected() {
        let _ = slot_for(SlotIndex(0));
    }

    #[test]
    fn parse_names() {
        assert_eq!(parse_index("wrenn-ns-7", NETNS_PREFIX), Some(SlotIndex(7)));
        assert_eq!(
            parse_index("wrenn-veth-8191", HOST_VETH_PREFIX),
            Some(SlotIndex(8191))
        );
        assert_eq!(parse_index("wrenn-ns-0", NETNS_PREFIX), None);
        assert_eq!(parse_index("wrenn-ns-07", NETNS_PREFIX), None);
        assert_eq!(parse_index("wrenn-ns-", NETNS_PREFIX), None);
        assert_eq!(parse_index("wrenn-ns-8192", NETNS_PREFIX), None);
        assert_eq!(parse_index("wrenn-ns-x1", NETNS_PREFIX), None);
        assert_eq!(parse_index("wrenn-test-egress-1", NETNS_PREFIX), None);
    }
}
