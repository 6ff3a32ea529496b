//! Per-capsule network slots: one network namespace per running capsule, with a
//! veth link to the host, a persistent tap for the VMM and nftables NAT.
//!
//! Every slot gives its guest the same identity ([`wrenn_core::net::GUEST_IP`]
//! behind tap [`wrenn_core::net::TAP_NAME`]), so memory snapshots restore into
//! any slot. The host reaches a guest at the slot's unique
//! [`NetSlot::host_addr`] (the veth peer address inside the namespace), which an
//! nft rule in the namespace DNATs to the guest. Addresses are link-local
//! (`169.254.128.0/17`, one /30 per slot); no private range is used.
//!
//! Layout of slot `n` (see [`slot_for`]):
//!
//! ```text
//! root ns:  wrenn-veth-<n>  169.254.128.0+4n+1/30
//!              │ veth
//! wrenn-ns-<n>: veth0  169.254.128.0+4n+2/30  (default route via +1)
//!               tap0   169.254.0.22/30  ── guest eth0 169.254.0.21
//!               nft `ip wrenn`: DNAT peer → guest; masquerade out of veth0
//! ```
//!
//! The host table `inet wrenn` drops traffic between slots and new connections
//! from slots to the host, and masquerades slot traffic leaving the machine.
//!
//! What this crate does not do: start VMMs, shape traffic, filter egress
//! destinations, or IPv6.

mod dns;
mod error;
mod netns;
mod nft;
pub mod owner;
mod rtnl;
mod slot;
mod tap;

pub use dns::{upstream_from_resolv_conf, MAX_TTL, MIN_TTL};
pub use error::{error_chain, SlotError};
pub use nft::{egress_commands, host_ruleset, slot_ruleset, DNS_PORT, HOST_TABLE, SLOT_TABLE};
pub use slot::{
    host_veth_addr, parse_index, peer_addr, slot_for, HOST_VETH_PREFIX, MAX_INDEX, NETNS_DIR,
    NETNS_PREFIX, PEER_VETH, SLOT_RANGE, SLOT_RANGE_PREFIX, TAP_TXQUEUELEN,
};

use async_trait::async_trait;
use std::collections::{BTreeSet, HashMap, HashSet};
use std::fs::File;
use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use tracing::{debug, info, warn};
use wrenn_core::egress::EgressPolicy;
use wrenn_core::net::{NetError, NetSlot, Network, SlotIndex, GATEWAY_IP, GUEST_PREFIX, TAP_NAME};

const IP_FORWARD: &str = "/proc/sys/net/ipv4/ip_forward";
/// MAC of the tap (the guest's gateway), identical in every slot.
pub const GATEWAY_MAC: [u8; 6] = [0x02, 0xfc, 0x00, 0x00, 0x00, 0x06];

/// Settings of a [`NetnsNetwork`].
#[derive(Clone, Debug)]
pub struct NetConfig {
    /// Highest slot index handed out (slots are `1..=capacity`); clamped to
    /// `1..=`[`MAX_INDEX`].
    pub capacity: u32,
    /// The `nft` binary.
    pub nft: PathBuf,
    /// Resolver that capsules' filtering resolvers forward allowed names to
    /// (reached from the host's namespace). Default: the host's first IPv4
    /// nameserver in `/etc/resolv.conf`, else 8.8.8.8.
    pub dns_upstream: SocketAddr,
}

impl Default for NetConfig {
    fn default() -> Self {
        let sbin = Path::new("/usr/sbin/nft");
        let dns_upstream = std::fs::read_to_string("/etc/resolv.conf")
            .ok()
            .and_then(|t| upstream_from_resolv_conf(&t))
            .unwrap_or_else(|| {
                SocketAddr::from((wrenn_core::egress::DEFAULT_DNS_SERVER, nft::DNS_PORT))
            });
        Self {
            capacity: 1024,
            nft: if sbin.exists() {
                sbin.to_owned()
            } else {
                PathBuf::from("nft")
            },
            dns_upstream,
        }
    }
}

/// The parts of a slot, in creation order. Teardown runs them in reverse and
/// removes the namespace (the part the sweep rediscovers) last.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Part {
    Netns,
    HostVeth,
    /// Everything inside the namespace that should go before it: tap, nft table.
    Inside,
}

const ALL_PARTS: [Part; 3] = [Part::Netns, Part::HostVeth, Part::Inside];

/// [`Network`] backed by named network namespaces, veth pairs, persistent taps
/// and nftables. Needs root (CAP_NET_ADMIN and CAP_SYS_ADMIN).
#[derive(Debug)]
pub struct NetnsNetwork {
    config: NetConfig,
    /// Indexes allocated, adopted or being allocated by this instance.
    used: Mutex<BTreeSet<u32>>,
    /// Whether the host table has been loaded by this instance.
    host_ready: tokio::sync::Mutex<bool>,
    /// Filtering resolvers of the slots whose policy allows domains.
    dns: Mutex<HashMap<u32, dns::DnsFilter>>,
}

impl NetnsNetwork {
    pub fn new(mut config: NetConfig) -> Self {
        config.capacity = config.capacity.clamp(1, MAX_INDEX);
        Self {
            config,
            used: Mutex::new(BTreeSet::new()),
            host_ready: tokio::sync::Mutex::new(false),
            dns: Mutex::new(HashMap::new()),
        }
    }

    /// Highest slot index this instance hands out.
    pub fn capacity(&self) -> u32 {
        self.config.capacity
    }

    /// Enables forwarding and loads the host table, once per instance (later
    /// calls do nothing). `allocate` calls it; `sweep` reloads the table.
    pub async fn ensure_host_rules(&self) -> Result<(), NetError> {
        self.host_rules(false).await.map_err(NetError::from)
    }

    /// Removes the host table (for a clean shutdown of the last user; slots
    /// still running lose isolation and egress NAT).
    pub async fn remove_host_rules(&self) -> Result<(), NetError> {
        let mut ready = self.host_ready.lock().await;
        let nft = self.config.nft.clone();
        netns::run(None, move || {
            nft::apply(&nft, HOST_TABLE, &nft::delete_ruleset(HOST_TABLE))
        })
        .await?;
        *ready = false;
        Ok(())
    }

    async fn host_rules(&self, force: bool) -> Result<(), SlotError> {
        let mut ready = self.host_ready.lock().await;
        if *ready && !force {
            return Ok(());
        }
        let nft = self.config.nft.clone();
        netns::run(None, move || {
            write_sysctl(IP_FORWARD, "1")?;
            nft::apply(&nft, HOST_TABLE, &nft::host_ruleset())
        })
        .await?;
        *ready = true;
        debug!("Host nft table {HOST_TABLE} loaded");
        Ok(())
    }

    fn used(&self) -> std::sync::MutexGuard<'_, BTreeSet<u32>> {
        self.used.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Claims the lowest index that is not used here, not in `skip`, and not held
    /// by another live process (its owner file is created exclusively).
    fn claim(&self, skip: &BTreeSet<u32>) -> Result<Option<SlotIndex>, SlotError> {
        let mut used = self.used();
        for n in 1..=self.config.capacity {
            // Registered first: a sweep by another instance skips it from then on.
            if used.contains(&n) || skip.contains(&n) || !owner::try_register(n) {
                continue;
            }
            match owner::claim(n) {
                Ok(true) => {
                    used.insert(n);
                    return Ok(Some(SlotIndex(n)));
                }
                Ok(false) => owner::unregister(n),
                Err(source) => {
                    owner::unregister(n);
                    return Err(SlotError::OwnerFile { index: n, source });
                }
            }
        }
        Ok(None)
    }

    fn unclaim(&self, index: SlotIndex) {
        self.used().remove(&index.0);
        owner::unregister(index.0);
        owner::release(index.0);
    }

    /// Creates every part of `slot`, recording each part in `made` as soon as it
    /// may exist, so the caller can undo exactly that.
    async fn build(
        &self,
        slot: &NetSlot,
        policy: &EgressPolicy,
        made: &mut Vec<Part>,
    ) -> Result<(), SlotError> {
        netns::create(slot.netns.clone(), slot.netns_path.clone()).await?;
        made.push(Part::Netns);

        made.push(Part::HostVeth);
        let (path, host_veth) = (slot.netns_path.clone(), slot.host_veth.clone());
        let host_ip = host_veth_addr(slot.index);
        netns::run(None, move || {
            let ns = File::open(&path).map_err(|source| SlotError::EnterNetns {
                path: path.clone(),
                source,
            })?;
            rtnl::with_netlink(|h| async move {
                // A veth with this name can only be a leftover: the namespace
                // claim above was exclusive.
                rtnl::delete_link(&h, &host_veth).await?;
                rtnl::create_veth(&h, &host_veth, PEER_VETH, ns.as_raw_fd()).await?;
                let i = rtnl::require_index(&h, &host_veth).await?;
                rtnl::add_addr(&h, &host_veth, i, host_ip, slot::VETH_PREFIX).await?;
                rtnl::set_up(&h, &host_veth, i, None, None).await
            })
        })
        .await?;

        made.push(Part::Inside);
        let peer = peer_addr(slot.index);
        let nft = self.config.nft.clone();
        let ruleset = nft::slot_ruleset(peer, policy);
        netns::run(Some(slot.netns_path.clone()), move || {
            rtnl::with_netlink(|h| async move {
                let lo = rtnl::require_index(&h, "lo").await?;
                rtnl::set_up(&h, "lo", lo, None, None).await?;
                let p = rtnl::require_index(&h, PEER_VETH).await?;
                rtnl::add_addr(&h, PEER_VETH, p, peer, slot::VETH_PREFIX).await?;
                rtnl::set_up(&h, PEER_VETH, p, None, None).await?;
                rtnl::add_default_route(&h, PEER_VETH, p, host_ip).await?;
                tap::create_persistent(TAP_NAME)?;
                let t = rtnl::require_index(&h, TAP_NAME).await?;
                rtnl::add_addr(&h, TAP_NAME, t, GATEWAY_IP, GUEST_PREFIX).await?;
                // The guest's gateway has the same MAC in every slot, so a restored guest's
                // ARP entry stays valid wherever it lands.
                rtnl::set_up(&h, TAP_NAME, t, Some(TAP_TXQUEUELEN), Some(GATEWAY_MAC)).await
            })?;
            write_sysctl(IP_FORWARD, "1")?;
            nft::apply(&nft, SLOT_TABLE, &ruleset)
        })
        .await?;
        // The redirect to the resolver is in place; start it before the slot is handed out.
        self.sync_dns_filter(slot, policy).await
    }

    fn dns_filters(&self) -> std::sync::MutexGuard<'_, HashMap<u32, dns::DnsFilter>> {
        self.dns.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Starts, updates or stops the slot's filtering resolver to match `policy`.
    async fn sync_dns_filter(
        &self,
        slot: &NetSlot,
        policy: &EgressPolicy,
    ) -> Result<(), SlotError> {
        if !policy.filters_dns() {
            self.dns_filters().remove(&slot.index.0);
            return Ok(());
        }
        if let Some(filter) = self.dns_filters().get(&slot.index.0) {
            filter.set_policy(policy.clone());
            return Ok(());
        }
        let filter = dns::DnsFilter::start(
            slot.netns_path.clone(),
            self.config.nft.clone(),
            self.config.dns_upstream,
            policy.clone(),
        )
        .await?;
        self.dns_filters().insert(slot.index.0, filter);
        Ok(())
    }

    async fn apply_egress(&self, slot: &NetSlot, policy: &EgressPolicy) -> Result<(), SlotError> {
        let slot = checked_slot(slot.index)?;
        // The resolver is ready before the redirect to it exists, and goes after it is gone.
        if policy.filters_dns() {
            self.sync_dns_filter(&slot, policy).await?;
        }
        let nft = self.config.nft.clone();
        let commands = nft::egress_commands(policy);
        netns::run(Some(slot.netns_path.clone()), move || {
            nft::apply(&nft, SLOT_TABLE, &commands)
        })
        .await?;
        if !policy.filters_dns() {
            self.sync_dns_filter(&slot, policy).await?;
        }
        debug!(slot = %slot.index, open = policy.is_open(), "Egress policy applied");
        Ok(())
    }

    /// Removes `parts` of `slot`; missing pieces count as removed. Every error is
    /// collected; the namespace goes last and only if everything else went.
    async fn teardown(&self, slot: &NetSlot, parts: &[Part]) -> Result<(), SlotError> {
        self.dns_filters().remove(&slot.index.0);
        let mut errors = Vec::new();
        if parts.contains(&Part::Inside) {
            let nft = self.config.nft.clone();
            let inside = netns::run(Some(slot.netns_path.clone()), move || {
                let mut errs = Vec::new();
                if let Err(e) = nft::apply(&nft, SLOT_TABLE, &nft::delete_ruleset(SLOT_TABLE)) {
                    errs.push(e);
                }
                if let Err(e) = delete_tap(TAP_NAME) {
                    errs.push(e);
                }
                Ok(errs)
            })
            .await;
            match inside {
                Ok(errs) => errors.extend(errs),
                Err(e) if netns::is_gone(&e) => {}
                Err(e) => errors.push(e),
            }
        }
        if parts.contains(&Part::HostVeth) {
            let host_veth = slot.host_veth.clone();
            let r = netns::run(None, move || {
                rtnl::with_netlink(|h| async move { rtnl::delete_link(&h, &host_veth).await })
            })
            .await;
            if let Err(e) = r {
                errors.push(e);
            }
        }
        if parts.contains(&Part::Netns) && errors.is_empty() {
            if let Err(e) = netns::delete(slot.netns.clone(), slot.netns_path.clone()).await {
                errors.push(e);
            }
        }
        if errors.is_empty() {
            Ok(())
        } else {
            Err(SlotError::Teardown {
                index: slot.index,
                errors,
            })
        }
    }

    async fn allocate_slot(&self, policy: &EgressPolicy) -> Result<NetSlot, SlotError> {
        self.host_rules(false).await?;
        let mut skip = BTreeSet::new();
        loop {
            let index = self.claim(&skip)?.ok_or(SlotError::Exhausted {
                capacity: self.config.capacity,
            })?;
            let slot = slot_for(index);
            let mut made = Vec::new();
            match self.build(&slot, policy, &mut made).await {
                Ok(()) => {
                    info!(slot = %index, host_addr = %slot.host_addr, "Network slot allocated");
                    return Ok(slot);
                }
                Err(SlotError::NetnsExists { name }) => {
                    // A leftover without a live owner: the sweep removes it.
                    debug!(%name, "Namespace exists, trying the next index");
                    self.used().remove(&index.0);
                    owner::unregister(index.0);
                    skip.insert(index.0);
                }
                Err(e) => {
                    if let Err(undo) = self.teardown(&slot, &made).await {
                        warn!(slot = %index, error = %error_chain(&undo), "Undoing a failed slot left parts behind");
                    }
                    self.unclaim(index);
                    return Err(e);
                }
            }
        }
    }

    async fn sweep_slots(&self, keep: &[SlotIndex]) -> Result<usize, SlotError> {
        let keep: HashSet<u32> = keep
            .iter()
            .map(|i| i.0)
            .chain(self.used().iter().copied())
            .collect();
        let mut removed = BTreeSet::new();
        let mut errors = Vec::new();
        // A slot survives the sweep when something still holds it: a capsule the
        // caller keeps, a live instance of this process, or another live process.
        // Otherwise the sweep takes it, as an allocation would, before removing
        // anything: an allocation cannot take it meanwhile and lose its parts.
        let take = |n: u32| -> bool {
            if keep.contains(&n) || !owner::try_register(n) {
                return false;
            }
            if owner::holder(n) == owner::Holder::Me {
                // Left by a dropped instance of this process.
                owner::release(n);
            }
            if owner::claim(n).unwrap_or(false) {
                true
            } else {
                owner::unregister(n);
                false
            }
        };
        let give_back = |n: u32| {
            owner::unregister(n);
            owner::release(n);
        };
        for index in netns::list_slots()? {
            if !take(index.0) {
                continue;
            }
            match self.teardown(&slot_for(index), &ALL_PARTS).await {
                Ok(()) => {
                    removed.insert(index.0);
                }
                Err(e) => errors.push(e),
            }
            give_back(index.0);
        }
        let stray = netns::run(None, || {
            rtnl::with_netlink(|h| async move {
                let names = rtnl::link_names(&h).await?;
                Ok(names
                    .into_iter()
                    .filter_map(|n| parse_index(&n, HOST_VETH_PREFIX))
                    .collect::<Vec<_>>())
            })
        })
        .await?;
        for index in stray {
            if !take(index.0) {
                continue;
            }
            let name = slot_for(index).host_veth;
            let r = netns::run(None, move || {
                rtnl::with_netlink(|h| async move { rtnl::delete_link(&h, &name).await })
            })
            .await;
            match r {
                Ok(()) => {
                    removed.insert(index.0);
                }
                Err(e) => errors.push(e),
            }
            give_back(index.0);
        }
        if let Err(e) = self.host_rules(true).await {
            errors.push(e);
        }
        for e in &errors {
            warn!(error = %error_chain(e), "Sweep could not remove a leftover");
        }
        if !removed.is_empty() {
            info!(count = removed.len(), "Swept leftover network slots");
        }
        if errors.is_empty() {
            Ok(removed.len())
        } else {
            Err(SlotError::Sweep { errors })
        }
    }
}

impl Drop for NetnsNetwork {
    fn drop(&mut self) {
        // Slots still held are leaked (like a crash): the sweep may now remove them.
        for n in self.used().iter() {
            owner::unregister(*n);
        }
    }
}

fn checked_slot(index: SlotIndex) -> Result<NetSlot, SlotError> {
    if (1..=MAX_INDEX).contains(&index.0) {
        Ok(slot_for(index))
    } else {
        Err(SlotError::InvalidIndex {
            index,
            max: MAX_INDEX,
        })
    }
}

/// Writes a sysctl of the calling thread's namespace.
fn write_sysctl(path: &'static str, value: &str) -> Result<(), SlotError> {
    std::fs::write(path, value).map_err(|source| SlotError::Sysctl { path, source })
}

/// Deletes tap `name` in the calling thread's namespace; missing counts as deleted.
fn delete_tap(name: &str) -> Result<(), SlotError> {
    let by_netlink = rtnl::with_netlink(|h| async move { rtnl::delete_link(&h, name).await });
    match by_netlink {
        Ok(()) => Ok(()),
        // Kernels that refuse RTM_DELLINK for tun devices: drop the persist flag.
        Err(SlotError::Netlink { ref source, .. })
            if error::netlink_errno(source) == Some(libc::EOPNOTSUPP) =>
        {
            tap::remove_persistent(name)
        }
        Err(e) => Err(e),
    }
}

#[async_trait]
impl Network for NetnsNetwork {
    async fn allocate(&self, policy: &EgressPolicy) -> Result<NetSlot, NetError> {
        Ok(self.allocate_slot(policy).await?)
    }

    async fn set_egress(&self, slot: &NetSlot, policy: &EgressPolicy) -> Result<(), NetError> {
        Ok(self.apply_egress(slot, policy).await?)
    }

    async fn release(&self, slot: &NetSlot) -> Result<(), NetError> {
        let canonical = checked_slot(slot.index)?;
        if canonical != *slot {
            warn!(slot = %slot.index, "Released slot differs from its derived names; using the derived ones");
        }
        self.teardown(&canonical, &ALL_PARTS).await?;
        self.unclaim(slot.index);
        info!(slot = %slot.index, "Network slot released");
        Ok(())
    }

    fn adopt(&self, slot: &NetSlot) {
        self.used().insert(slot.index.0);
        owner::register(slot.index.0);
        // A slot whose owner died (its capsule taken over after a restart) is this
        // process's from now on: the sweeps of other processes, which know only their
        // own capsules, leave it alone. A live owner's slot stays that owner's.
        if let Err(e) = owner::claim(slot.index.0) {
            warn!(slot = %slot.index, error = %e, "Cannot record this process as the slot's owner");
        }
    }

    async fn sweep(&self, keep: &[SlotIndex]) -> Result<usize, NetError> {
        Ok(self.sweep_slots(keep).await?)
    }
}
