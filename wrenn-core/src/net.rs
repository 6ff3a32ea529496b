//! Capsule networking: one slot per running capsule.
//!
//! Every capsule sees the same network identity inside its own namespace
//! ([`GUEST_IP`], [`GATEWAY_IP`], [`GUEST_MAC`], tap [`TAP_NAME`]), so a memory
//! snapshot taken in one slot restores into any other. The host reaches a capsule
//! through the slot's unique [`NetSlot::host_addr`], which the slot forwards to the guest.

use crate::egress::EgressPolicy;
use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use std::fmt::Debug;
use std::net::Ipv4Addr;
use std::path::PathBuf;

/// The guest's address, identical in every slot.
pub const GUEST_IP: Ipv4Addr = Ipv4Addr::new(169, 254, 0, 21);
/// The guest's gateway (the tap inside the slot's namespace).
pub const GATEWAY_IP: Ipv4Addr = Ipv4Addr::new(169, 254, 0, 22);
/// Prefix length of the guest link.
pub const GUEST_PREFIX: u8 = 30;
/// The guest NIC's MAC address, identical in every slot.
pub const GUEST_MAC: &str = "02:fc:00:00:00:05";
/// Name of the tap device inside every slot's namespace.
pub const TAP_NAME: &str = "tap0";
/// Prefix of every host object Wrenn creates (namespaces, links, nft tables).
pub const NAME_PREFIX: &str = "wrenn-";

/// Kernel `ip=` argument configuring the guest's fixed identity.
pub fn guest_ip_kernel_arg() -> String {
    format!("ip={GUEST_IP}::{GATEWAY_IP}:255.255.255.252:capsule:eth0:off")
}

/// Index of a network slot (1-based; 0 is never allocated).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct SlotIndex(pub u32);

impl std::fmt::Display for SlotIndex {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Display::fmt(&self.0, f)
    }
}

/// A live network slot: everything a VMM needs to attach a capsule to it.
/// Plain data; the owning [`Network`] releases it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetSlot {
    pub index: SlotIndex,
    /// Network namespace name (under `/run/netns/`).
    pub netns: String,
    /// Path of the namespace file a VMM process enters (`setns`).
    pub netns_path: PathBuf,
    /// Tap device inside the namespace (always [`TAP_NAME`]).
    pub tap: String,
    /// Host-side veth name.
    pub host_veth: String,
    /// Address the host uses to reach the guest; forwarded to [`GUEST_IP`].
    pub host_addr: Ipv4Addr,
}

/// Errors callers branch on; implementations keep the details in `Backend`.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum NetError {
    #[error("No free network slot (all {capacity} in use)")]
    Exhausted { capacity: u32 },
    #[error("Missing permission for network setup: {what}")]
    Permission { what: String },
    #[error("Network backend failed")]
    Backend(#[source] Box<dyn std::error::Error + Send + Sync>),
}

/// Creates and removes network slots.
#[async_trait]
pub trait Network: Send + Sync + Debug {
    /// Allocates the lowest free slot and creates its namespace, links and rules,
    /// with `policy` in force before anything can use the slot. On error nothing
    /// of the slot is left behind.
    async fn allocate(&self, policy: &EgressPolicy) -> Result<NetSlot, NetError>;

    /// Replaces the egress policy of a live slot, atomically: a connection is
    /// judged by the old policy or the new one, never by neither.
    async fn set_egress(&self, slot: &NetSlot, policy: &EgressPolicy) -> Result<(), NetError>;

    /// Removes everything of a slot and frees its index. Idempotent: parts already
    /// gone count as removed.
    async fn release(&self, slot: &NetSlot) -> Result<(), NetError>;

    /// Marks a slot found on disk (e.g. from a capsule's state file) as in use so
    /// `allocate` will not hand it out; used when adopting capsules after a restart.
    /// A slot whose owner process died becomes this process's (other processes
    /// sharing the machine's slots then leave it alone).
    fn adopt(&self, slot: &NetSlot);

    /// Removes every `wrenn-` namespace, link and rule not held by a live slot of
    /// this process (leftovers of a crash). Returns how many slots were removed.
    async fn sweep(&self, keep: &[SlotIndex]) -> Result<usize, NetError>;
}
