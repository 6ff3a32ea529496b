//! The filtering resolver of a slot whose egress policy allows domains.
//!
//! The slot table redirects the guest's DNS (UDP and TCP port 53, whatever
//! server it asks) to the gateway address, where this resolver listens on a UDP
//! socket created inside the slot's namespace. A query for a name the policy
//! allows is forwarded to the upstream resolver (from the host's namespace);
//! the IPv4 addresses in the answer are added to the slot's `resolved` set for
//! their TTL *before* the answer reaches the guest, so its first connection
//! already passes. Any other query is answered `REFUSED` and never leaves the
//! host, so DNS is not a way out either. TCP DNS is refused (RST).
//!
//! What a domain rule covers: every port and protocol to the addresses its
//! names resolved to (not only HTTP/TLS), for the TTL of the answer (at least
//! [`MIN_TTL`] seconds). An address that several names share (a CDN) is open
//! to all of them once an allowed name resolved to it.

use crate::error::SlotError;
use crate::nft::{self, DNS_PORT, SLOT_TABLE};
use hickory_proto::op::{Message, MessageType, ResponseCode};
use hickory_proto::rr::RData;
use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};
use tokio::net::UdpSocket;
use tokio::sync::Semaphore;
use tracing::{debug, warn};
use wrenn_core::egress::EgressPolicy;
use wrenn_core::net::GATEWAY_IP;

/// Shortest time an allowed answer's addresses stay open.
pub const MIN_TTL: u32 = 30;
/// Longest time (a day), whatever the answer says.
pub const MAX_TTL: u32 = 86_400;
/// How long the upstream resolver may take.
const UPSTREAM_TIMEOUT: Duration = Duration::from_secs(3);
/// Queries of one capsule in flight at once; more are dropped (the guest retries).
const MAX_IN_FLIGHT: usize = 128;
/// Largest DNS message over UDP with EDNS.
const MAX_MESSAGE: usize = 4096;

/// A running filter; dropping it stops the resolver.
#[derive(Debug)]
pub(crate) struct DnsFilter {
    state: Arc<State>,
    task: tokio::task::JoinHandle<()>,
}

#[derive(Debug)]
struct State {
    policy: RwLock<EgressPolicy>,
    upstream: SocketAddr,
    nft: PathBuf,
    netns_path: PathBuf,
    /// Addresses already in the `resolved` set, with when they leave it.
    open: Mutex<HashMap<Ipv4Addr, Instant>>,
}

impl Drop for DnsFilter {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl DnsFilter {
    /// Binds the resolver's socket at the gateway address inside the slot's
    /// namespace and starts serving it.
    pub(crate) async fn start(
        netns_path: PathBuf,
        nft: PathBuf,
        upstream: SocketAddr,
        policy: EgressPolicy,
    ) -> Result<Self, SlotError> {
        let path = netns_path.clone();
        let std_socket = crate::netns::run(Some(path), || {
            let s = std::net::UdpSocket::bind(SocketAddrV4::new(GATEWAY_IP, DNS_PORT)).map_err(
                |source| SlotError::Dns {
                    step: "bind the resolver socket",
                    source,
                },
            )?;
            s.set_nonblocking(true).map_err(|source| SlotError::Dns {
                step: "set the resolver socket non-blocking",
                source,
            })?;
            Ok(s)
        })
        .await?;
        let socket = UdpSocket::from_std(std_socket).map_err(|source| SlotError::Dns {
            step: "register the resolver socket",
            source,
        })?;
        let state = Arc::new(State {
            policy: RwLock::new(policy),
            upstream,
            nft,
            netns_path,
            open: Mutex::new(HashMap::new()),
        });
        let task = tokio::spawn(serve(Arc::new(socket), state.clone()));
        Ok(Self { state, task })
    }

    /// Switches to `policy`; the caller has emptied the `resolved` set.
    pub(crate) fn set_policy(&self, policy: EgressPolicy) {
        if let Ok(mut p) = self.state.policy.write() {
            *p = policy;
        }
        if let Ok(mut open) = self.state.open.lock() {
            open.clear();
        }
    }
}

async fn serve(socket: Arc<UdpSocket>, state: Arc<State>) {
    let limit = Arc::new(Semaphore::new(MAX_IN_FLIGHT));
    let mut buf = vec![0u8; MAX_MESSAGE];
    loop {
        let (n, from) = match socket.recv_from(&mut buf).await {
            Ok(r) => r,
            Err(e) => {
                warn!(error = %e, "DNS filter: receive failed");
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        let Ok(permit) = limit.clone().try_acquire_owned() else {
            debug!("DNS filter: too many queries in flight, dropping one");
            continue;
        };
        let query = buf[..n].to_vec();
        let (socket, state) = (socket.clone(), state.clone());
        tokio::spawn(async move {
            if let Some(reply) = answer(&state, &query).await {
                let _ = socket.send_to(&reply, from).await;
            }
            drop(permit);
        });
    }
}

/// The reply to one query, or `None` to stay silent (unparseable input).
async fn answer(state: &State, query: &[u8]) -> Option<Vec<u8>> {
    let msg = Message::from_vec(query).ok()?;
    if msg.metadata.message_type != MessageType::Query {
        return None;
    }
    let refuse = |code| {
        let mut r = Message::error_msg(msg.metadata.id, msg.metadata.op_code, code);
        r.metadata.recursion_desired = msg.metadata.recursion_desired;
        r.metadata.recursion_available = true;
        r.queries = msg.queries.clone();
        r.to_vec().ok()
    };
    let [q] = msg.queries.as_slice() else {
        return refuse(ResponseCode::FormErr);
    };
    let name = q.name().to_ascii();
    let allowed = state
        .policy
        .read()
        .map(|p| p.allows_name(&name))
        .unwrap_or(false);
    if !allowed {
        debug!(%name, "DNS filter: refused a name the policy does not allow");
        return refuse(ResponseCode::Refused);
    }
    let reply = match forward(state.upstream, query).await {
        Ok(r) => r,
        Err(e) => {
            debug!(%name, error = %e, "DNS filter: upstream failed");
            return refuse(ResponseCode::ServFail);
        }
    };
    let Ok(parsed) = Message::from_vec(&reply) else {
        return refuse(ResponseCode::ServFail);
    };
    if parsed.metadata.id != msg.metadata.id {
        return refuse(ResponseCode::ServFail);
    }
    let ips: Vec<(Ipv4Addr, u32)> = parsed
        .answers
        .iter()
        .filter_map(|r| match &r.data {
            RData::A(a) => Some((a.0, r.ttl.clamp(MIN_TTL, MAX_TTL))),
            _ => None,
        })
        .collect();
    if let Err(e) = open_addresses(state, &ips).await {
        warn!(%name, error = %e, "DNS filter: cannot open the resolved addresses");
        return refuse(ResponseCode::ServFail);
    }
    Some(reply)
}

/// Sends `query` to `upstream` from the host's namespace and returns its answer.
async fn forward(upstream: SocketAddr, query: &[u8]) -> std::io::Result<Vec<u8>> {
    let bind: SocketAddr = if upstream.is_ipv4() {
        (Ipv4Addr::UNSPECIFIED, 0).into()
    } else {
        (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
    };
    let socket = UdpSocket::bind(bind).await?;
    socket.connect(upstream).await?;
    socket.send(query).await?;
    let mut buf = vec![0u8; MAX_MESSAGE];
    let n = tokio::time::timeout(UPSTREAM_TIMEOUT, socket.recv(&mut buf))
        .await
        .map_err(|_| std::io::Error::from(std::io::ErrorKind::TimedOut))??;
    buf.truncate(n);
    Ok(buf)
}

/// Puts `ips` into the slot's `resolved` set, skipping those that stay open
/// for at least half their new TTL anyway.
async fn open_addresses(state: &State, ips: &[(Ipv4Addr, u32)]) -> Result<(), SlotError> {
    let now = Instant::now();
    let due: Vec<(Ipv4Addr, u32)> = {
        let Ok(open) = state.open.lock() else {
            return Ok(());
        };
        ips.iter()
            .copied()
            .filter(|(ip, ttl)| {
                open.get(ip)
                    .is_none_or(|until| *until < now + Duration::from_secs(u64::from(*ttl) / 2))
            })
            .collect()
    };
    if due.is_empty() {
        return Ok(());
    }
    let commands = nft::resolved_commands(&due);
    let nft = state.nft.clone();
    crate::netns::run(Some(state.netns_path.clone()), move || {
        nft::apply(&nft, SLOT_TABLE, &commands)
    })
    .await?;
    if let Ok(mut open) = state.open.lock() {
        open.retain(|_, until| *until > now);
        for (ip, ttl) in due {
            open.insert(ip, now + Duration::from_secs(u64::from(ttl)));
        }
    }
    Ok(())
}

/// The first IPv4 `nameserver` of a resolv.conf text, on port 53.
pub fn upstream_from_resolv_conf(text: &str) -> Option<SocketAddr> {
    text.lines()
        .filter_map(|l| l.trim().strip_prefix("nameserver"))
        .filter_map(|rest| rest.trim().parse::<Ipv4Addr>().ok())
        .map(|ip| SocketAddr::from((ip, DNS_PORT)))
        .next()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn upstream_is_the_first_ipv4_nameserver() {
        let text = "# comment\nnameserver ::1\nnameserver 10.0.0.2\nnameserver 1.1.1.1\n";
        assert_eq!(
            upstream_from_resolv_conf(text),
            Some("10.0.0.2:53".parse().unwrap())
        );
        assert_eq!(upstream_from_resolv_conf("search x\n"), None);
    }
}
