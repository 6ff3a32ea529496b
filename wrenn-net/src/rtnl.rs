//! rtnetlink helpers. Each call runs on the current thread's namespace: the
//! netlink socket binds to the namespace of the thread that opens it.

use crate::error::{netlink_errno, SlotError};
use futures_util::TryStreamExt;
use rtnetlink::packet_route::link::{InfoData, InfoKind, InfoVeth};
use rtnetlink::{Handle, LinkMessageBuilder, LinkUnspec, LinkVeth, RouteMessageBuilder};
use std::future::Future;
use std::net::{IpAddr, Ipv4Addr};
use std::os::fd::RawFd;

/// Runs `f` with a netlink handle opened in this thread's namespace, on a
/// current-thread runtime owned by this (dedicated) thread.
pub(crate) fn with_netlink<T, F, Fut>(f: F) -> Result<T, SlotError>
where
    F: FnOnce(Handle) -> Fut,
    Fut: Future<Output = Result<T, SlotError>>,
{
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .build()
        .map_err(SlotError::NetlinkConnect)?;
    rt.block_on(async move {
        let (conn, handle, _) = rtnetlink::new_connection().map_err(SlotError::NetlinkConnect)?;
        tokio::spawn(conn);
        f(handle).await
    })
}

fn nl(step: &'static str, link: &str) -> impl FnOnce(rtnetlink::Error) -> SlotError {
    let link = link.to_owned();
    move |source| SlotError::Netlink { step, link, source }
}

/// Index of link `name`, `None` if there is no such link.
pub(crate) async fn link_index(h: &Handle, name: &str) -> Result<Option<u32>, SlotError> {
    let mut links = h.link().get().match_name(name.to_owned()).execute();
    match links.try_next().await {
        Ok(found) => Ok(found.map(|m| m.header.index)),
        Err(e) if netlink_errno(&e) == Some(libc::ENODEV) => Ok(None),
        Err(e) => Err(nl("get link", name)(e)),
    }
}

/// Names of every link in this namespace.
pub(crate) async fn link_names(h: &Handle) -> Result<Vec<String>, SlotError> {
    use rtnetlink::packet_route::link::LinkAttribute;
    let mut links = h.link().get().execute();
    let mut out = Vec::new();
    while let Some(m) = links.try_next().await.map_err(nl("list links", "*"))? {
        for a in m.attributes {
            if let LinkAttribute::IfName(n) = a {
                out.push(n);
            }
        }
    }
    Ok(out)
}

/// Deletes link `name`; a missing link counts as deleted.
pub(crate) async fn delete_link(h: &Handle, name: &str) -> Result<(), SlotError> {
    let Some(index) = link_index(h, name).await? else {
        return Ok(());
    };
    match h.link().del(index).execute().await {
        Ok(()) => Ok(()),
        Err(e) if netlink_errno(&e) == Some(libc::ENODEV) => Ok(()),
        Err(e) => Err(nl("delete link", name)(e)),
    }
}

/// Creates veth pair `host` (in this namespace) / `peer` (created directly in
/// the namespace whose fd is `peer_netns`).
pub(crate) async fn create_veth(
    h: &Handle,
    host: &str,
    peer: &str,
    peer_netns: RawFd,
) -> Result<(), SlotError> {
    let peer_msg = LinkMessageBuilder::<LinkUnspec>::new()
        .name(peer.to_owned())
        .setns_by_fd(peer_netns)
        .build();
    let msg = LinkMessageBuilder::<LinkVeth>::new_with_info_kind(InfoKind::Veth)
        .name(host.to_owned())
        .set_info_data(InfoData::Veth(InfoVeth::Peer(peer_msg)))
        .build();
    h.link()
        .add(msg)
        .execute()
        .await
        .map_err(nl("create veth", host))
}

/// Resolves `name`, failing if it does not exist.
pub(crate) async fn require_index(h: &Handle, name: &str) -> Result<u32, SlotError> {
    link_index(h, name)
        .await?
        .ok_or_else(|| SlotError::Netlink {
            step: "find link",
            link: name.to_owned(),
            source: rtnetlink::Error::RequestFailed,
        })
}

/// Adds `addr/prefix` to link `name` (already present counts as added).
pub(crate) async fn add_addr(
    h: &Handle,
    name: &str,
    index: u32,
    addr: Ipv4Addr,
    prefix: u8,
) -> Result<(), SlotError> {
    match h
        .address()
        .add(index, IpAddr::V4(addr), prefix)
        .execute()
        .await
    {
        Ok(()) => Ok(()),
        Err(e) if netlink_errno(&e) == Some(libc::EEXIST) => Ok(()),
        Err(e) => Err(nl("add address", name)(e)),
    }
}

/// Sets link `name` up, with an optional transmit queue length.
pub(crate) async fn set_up(
    h: &Handle,
    name: &str,
    index: u32,
    txqueuelen: Option<u32>,
    mac: Option<[u8; 6]>,
) -> Result<(), SlotError> {
    let mut msg = LinkUnspec::new_with_index(index).up();
    if let Some(len) = txqueuelen {
        msg = msg.txqueuelen(len);
    }
    if let Some(mac) = mac {
        msg = msg.address(mac.to_vec());
    }
    h.link()
        .set(msg.build())
        .execute()
        .await
        .map_err(nl("set up", name))
}

/// Adds the default route via `gateway` out of link `index`.
pub(crate) async fn add_default_route(
    h: &Handle,
    name: &str,
    index: u32,
    gateway: Ipv4Addr,
) -> Result<(), SlotError> {
    let msg = RouteMessageBuilder::<Ipv4Addr>::new()
        .gateway(gateway)
        .output_interface(index)
        .build();
    match h.route().add(msg).execute().await {
        Ok(()) => Ok(()),
        Err(e) if netlink_errno(&e) == Some(libc::EEXIST) => Ok(()),
        Err(e) => Err(nl("add default route", name)(e)),
    }
}
