//! Loopback port forwarder: guest services that listen only on loopback (127.0.0.0/8
//! or `::1`) become reachable from outside the guest on the guest's own address and
//! the same port, like E2B's envd does with socat.
//!
//! Every [`SCAN_INTERVAL`] the kernel's `/proc/net/tcp` and `/proc/net/tcp6` are read
//! for LISTEN sockets. A port is forwarded when something listens on it on a loopback
//! address and nothing (but the forwarder itself) listens on it on a wildcard address
//! (`0.0.0.0`, `::`) or on a forward address. For each such port the forwarder binds
//! the forward address(es) on that port and relays every accepted connection to the
//! loopback listener. When the loopback listener goes away, so does the forward
//! (connections already relayed run to their end).
//!
//! The forward addresses are fixed ([`ForwardAddrs::Fixed`]) or, by default, every
//! non-loopback IPv4 address of the interfaces that are up, looked up on every scan.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

/// How often the socket tables are read.
pub const SCAN_INTERVAL: Duration = Duration::from_secs(1);

/// TCP state `LISTEN` in `/proc/net/tcp*` (`TCP_LISTEN` = 10).
const TCP_LISTEN: &str = "0A";

const PROC_NET_TCP: &str = "/proc/net/tcp";
const PROC_NET_TCP6: &str = "/proc/net/tcp6";

/// A line of a `/proc/net/tcp*` table that is not in the kernel's format.
#[derive(Debug, thiserror::Error)]
#[error("line {line}: {reason}")]
pub struct ParseError {
    /// 1-based line number in the table (the header is line 1).
    pub line: usize,
    pub reason: String,
}

#[derive(Debug, thiserror::Error)]
pub enum ForwardError {
    #[error("reading {path}: {source}")]
    Read {
        path: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("parsing {path}: {source}")]
    Parse {
        path: &'static str,
        #[source]
        source: ParseError,
    },
    #[error("listing network interfaces: {0}")]
    Interfaces(#[source] nix::Error),
}

/// Decodes one `ADDR:PORT` column: the address is the raw network-order bytes printed
/// as native-endian 32-bit words (one for IPv4, four for IPv6), the port plain hex.
fn parse_socket(col: &str) -> Result<SocketAddr, String> {
    let (addr, port) = col
        .split_once(':')
        .ok_or_else(|| format!("no ':' in address {col:?}"))?;
    let port = u16::from_str_radix(port, 16).map_err(|_| format!("bad port in {col:?}"))?;
    let word = |hex: &str| {
        u32::from_str_radix(hex, 16)
            .map(u32::to_ne_bytes)
            .map_err(|_| format!("bad address in {col:?}"))
    };
    let ip = match addr.len() {
        8 => IpAddr::V4(Ipv4Addr::from(word(addr)?)),
        32 => {
            let mut bytes = [0u8; 16];
            for (i, chunk) in bytes.chunks_exact_mut(4).enumerate() {
                let hex = addr
                    .get(i * 8..i * 8 + 8)
                    .ok_or_else(|| format!("bad address in {col:?}"))?;
                chunk.copy_from_slice(&word(hex)?);
            }
            IpAddr::V6(Ipv6Addr::from(bytes))
        }
        _ => return Err(format!("address of unexpected length in {col:?}")),
    };
    Ok(SocketAddr::new(ip, port))
}

/// The local addresses of the LISTEN sockets in a `/proc/net/tcp` or `/proc/net/tcp6`
/// table (header line included, as the kernel prints it).
pub fn parse_listeners(table: &str) -> Result<Vec<SocketAddr>, ParseError> {
    let mut out = Vec::new();
    for (idx, line) in table.lines().enumerate().skip(1) {
        let err = |reason: String| ParseError {
            line: idx + 1,
            reason,
        };
        let mut cols = line.split_whitespace();
        let Some(_slot) = cols.next() else {
            continue; // blank line
        };
        let (Some(local), Some(_remote), Some(state)) = (cols.next(), cols.next(), cols.next())
        else {
            return Err(err(format!("too few columns: {line:?}")));
        };
        if state != TCP_LISTEN {
            continue;
        }
        out.push(parse_socket(local).map_err(err)?);
    }
    Ok(out)
}

/// Every LISTEN socket of this network namespace (IPv4 and IPv6 tables).
pub fn listening_sockets() -> Result<Vec<SocketAddr>, ForwardError> {
    let mut out = Vec::new();
    for path in [PROC_NET_TCP, PROC_NET_TCP6] {
        let table = match std::fs::read_to_string(path) {
            Ok(t) => t,
            // No IPv6 in this kernel: no tcp6 table.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && path == PROC_NET_TCP6 => continue,
            Err(source) => return Err(ForwardError::Read { path, source }),
        };
        out.extend(parse_listeners(&table).map_err(|source| ForwardError::Parse { path, source })?);
    }
    Ok(out)
}

/// Every non-loopback IPv4 address of the interfaces that are up.
pub fn interface_addrs() -> Result<Vec<IpAddr>, ForwardError> {
    use nix::net::if_::InterfaceFlags;
    let mut out = Vec::new();
    for ifa in nix::ifaddrs::getifaddrs().map_err(ForwardError::Interfaces)? {
        if !ifa.flags.contains(InterfaceFlags::IFF_UP)
            || ifa.flags.contains(InterfaceFlags::IFF_LOOPBACK)
        {
            continue;
        }
        let Some(ip) = ifa
            .address
            .as_ref()
            .and_then(|a| a.as_sockaddr_in())
            .map(|a| a.ip())
        else {
            continue;
        };
        if !ip.is_loopback() && !ip.is_unspecified() && !out.contains(&IpAddr::V4(ip)) {
            out.push(IpAddr::V4(ip));
        }
    }
    Ok(out)
}

/// Where forwarded ports are exposed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ForwardAddrs {
    /// Every non-loopback IPv4 address of the up interfaces, looked up on every scan.
    Interfaces,
    /// Exactly these addresses.
    Fixed(Vec<IpAddr>),
}

impl ForwardAddrs {
    pub fn resolve(&self) -> Result<Vec<IpAddr>, ForwardError> {
        match self {
            ForwardAddrs::Interfaces => interface_addrs(),
            ForwardAddrs::Fixed(v) => Ok(v.clone()),
        }
    }
}

/// Settings of a [`Forwarder`].
#[derive(Clone, Debug)]
pub struct ForwardConfig {
    pub addrs: ForwardAddrs,
    /// Ports never forwarded (envd's own).
    pub exclude_ports: Vec<u16>,
    pub interval: Duration,
}

/// `::ffff:a.b.c.d` (a dual-stack socket bound to an IPv4 address) as `a.b.c.d`.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6
            .to_ipv4_mapped()
            .map(IpAddr::V4)
            .unwrap_or(IpAddr::V6(v6)),
        v4 => v4,
    }
}

/// The forwards the socket table asks for: listen address → loopback target.
///
/// `listeners` is the table's LISTEN sockets, `own` the ones the forwarder itself
/// holds (they are not services). A port qualifies when a service listens on it on
/// a loopback address that is not a forward address, and no service listens on it on
/// a wildcard address or on any forward address. The target prefers 127.0.0.1, then
/// the lowest other 127/8 address, then `::1`.
pub fn plan(
    listeners: &[SocketAddr],
    forward_addrs: &[IpAddr],
    own: &HashSet<SocketAddr>,
    exclude_ports: &[u16],
) -> BTreeMap<SocketAddr, SocketAddr> {
    let forward_addrs: Vec<IpAddr> = forward_addrs.iter().copied().map(canonical).collect();
    // port → (loopback targets, blocked)
    let mut ports: BTreeMap<u16, (Vec<IpAddr>, bool)> = BTreeMap::new();
    for sock in listeners {
        if own.contains(sock) || exclude_ports.contains(&sock.port()) {
            continue;
        }
        let ip = canonical(sock.ip());
        let entry = ports.entry(sock.port()).or_default();
        if ip.is_unspecified() || forward_addrs.contains(&ip) {
            entry.1 = true;
        } else if ip.is_loopback() {
            entry.0.push(ip);
        }
    }
    let mut out = BTreeMap::new();
    for (port, (mut targets, blocked)) in ports {
        if blocked {
            continue;
        }
        // V4 sorts before V6; 127.0.0.1 is the lowest usable 127/8 address.
        targets.sort();
        let Some(target) = targets.first() else {
            continue;
        };
        for addr in &forward_addrs {
            out.insert(SocketAddr::new(*addr, port), SocketAddr::new(*target, port));
        }
    }
    out
}

/// One exposed port: the task accepting on it.
#[derive(Debug)]
struct Active {
    target: SocketAddr,
    accept: JoinHandle<()>,
}

/// Keeps the forwards in line with the socket table, one scan at a time.
#[derive(Debug)]
pub struct Forwarder {
    config: ForwardConfig,
    active: HashMap<SocketAddr, Active>,
    /// Listen addresses that could not be bound (warned once, retried every scan).
    failed: HashSet<SocketAddr>,
    last_error: Option<String>,
}

impl Forwarder {
    pub fn new(config: ForwardConfig) -> Self {
        Forwarder {
            config,
            active: HashMap::new(),
            failed: HashSet::new(),
            last_error: None,
        }
    }

    /// Current forwards: listen address → target, sorted.
    pub fn forwards(&self) -> Vec<(SocketAddr, SocketAddr)> {
        let mut v: Vec<_> = self.active.iter().map(|(l, a)| (*l, a.target)).collect();
        v.sort();
        v
    }

    /// Reads the socket tables and the forward addresses, then applies them.
    pub async fn scan(&mut self) -> Result<(), ForwardError> {
        let addrs = self.config.addrs.resolve()?;
        let listeners = listening_sockets()?;
        self.apply(&listeners, &addrs).await;
        Ok(())
    }

    /// Makes the forwards match `listeners` (LISTEN sockets as in the socket tables,
    /// the forwarder's own included) for the forward addresses `addrs`. Forwards no
    /// longer wanted are closed before this returns.
    pub async fn apply(&mut self, listeners: &[SocketAddr], addrs: &[IpAddr]) {
        let own: HashSet<SocketAddr> = self.active.keys().copied().collect();
        let want = plan(listeners, addrs, &own, &self.config.exclude_ports);

        let stale: Vec<SocketAddr> = self
            .active
            .iter()
            .filter(|(listen, a)| want.get(listen) != Some(&a.target))
            .map(|(listen, _)| *listen)
            .collect();
        for listen in stale {
            if let Some(a) = self.active.remove(&listen) {
                a.accept.abort();
                // Cancelled: the listener is closed once the task has been dropped.
                let _ = a.accept.await;
                tracing::info!(%listen, target = %a.target, "port forward removed");
            }
        }
        self.failed.retain(|l| want.contains_key(l));

        for (listen, target) in want {
            if self.active.contains_key(&listen) {
                continue;
            }
            match TcpListener::bind(listen).await {
                Ok(listener) => {
                    self.failed.remove(&listen);
                    tracing::info!(%listen, %target, "port forward added");
                    let accept = tokio::spawn(accept_loop(listener, target));
                    self.active.insert(listen, Active { target, accept });
                }
                Err(e) => {
                    if self.failed.insert(listen) {
                        tracing::warn!(%listen, %target, error = %e, "cannot expose loopback listener");
                    }
                }
            }
        }
    }

    /// Scans every interval, forever.
    pub async fn run(mut self) {
        let mut tick = tokio::time::interval(self.config.interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            match self.scan().await {
                Ok(()) => self.last_error = None,
                Err(e) => {
                    let msg = e.to_string();
                    // Once per distinct failure, not every second.
                    if self.last_error.as_deref() != Some(msg.as_str()) {
                        tracing::warn!(error = %msg, "port forwarder scan failed");
                        self.last_error = Some(msg);
                    }
                }
            }
        }
    }
}

impl Drop for Forwarder {
    fn drop(&mut self) {
        for a in self.active.values() {
            a.accept.abort();
        }
    }
}

async fn accept_loop(listener: TcpListener, target: SocketAddr) {
    loop {
        match listener.accept().await {
            Ok((inbound, peer)) => {
                tokio::spawn(relay(inbound, peer, target));
            }
            Err(e) => {
                // Out of descriptors and the like: back off instead of spinning.
                tracing::debug!(%target, error = %e, "forward accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

async fn relay(mut inbound: TcpStream, peer: SocketAddr, target: SocketAddr) {
    let mut outbound = match TcpStream::connect(target).await {
        Ok(s) => s,
        Err(e) => {
            tracing::debug!(%peer, %target, error = %e, "forward target refused");
            return;
        }
    };
    // A relay must not add coalescing delay of its own; the endpoints chose theirs.
    let _ = inbound.set_nodelay(true);
    let _ = outbound.set_nodelay(true);
    match tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await {
        Ok((up, down)) => tracing::trace!(%peer, %target, up, down, "forwarded connection closed"),
        Err(e) => tracing::debug!(%peer, %target, error = %e, "forwarded connection broke"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TCP: &str = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 0100007F:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000  1000        0 41234 1 0000000000000000 100 0 0 10 0
   1: 00000000:C2CF 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 1528 1 0000000075491b82 100 0 0 10 0
   2: 1500FEA9:0016 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 1529 1 0000000000000000 100 0 0 10 0
   3: 0100007F:1F90 0100007F:D2B4 01 00000000:00000000 00:00000000 00000000  1000        0 41235 1 0000000000000000 20 4 30 10 -1
   4: 0200007F:0050 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 1530 1 0000000000000000 100 0 0 10 0
";

    const TCP6: &str = "  sl  local_address                         remote_address                        st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 00000000000000000000000001000000:0BB8 00000000000000000000000000000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 2001 1 0000000000000000 100 0 0 10 0
   1: 00000000000000000000000000000000:0050 00000000000000000000000000000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 2002 1 0000000000000000 100 0 0 10 0
   2: 0000000000000000FFFF00000100007F:1389 00000000000000000000000000000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 2003 1 0000000000000000 100 0 0 10 0
   3: 00000000000000000000000001000000:0BB8 00000000000000000000000001000000:A000 01 00000000:00000000 00:00000000 00000000     0        0 2004 1 0000000000000000 20 4 30 10 -1
";

    fn sa(s: &str) -> SocketAddr {
        s.parse().expect("test address")
    }

    #[test]
    fn parses_ipv4_listen_sockets_only() {
        let got = parse_listeners(TCP).expect("parse");
        assert_eq!(
            got,
            vec![
                sa("127.0.0.1:8080"),
                sa("0.0.0.0:49871"),
                sa("169.254.0.21:22"),
                sa("127.0.0.2:80"),
            ]
        );
    }

    #[test]
    fn parses_ipv6_listen_sockets_only() {
        let got = parse_listeners(TCP6).expect("parse");
        assert_eq!(
            got,
            vec![
                sa("[::1]:3000"),
                sa("[::]:80"),
                sa("[::ffff:127.0.0.1]:5001")
            ]
        );
    }

    #[test]
    fn header_only_and_blank_lines_are_empty() {
        assert!(parse_listeners("  sl  local_address\n")
            .expect("parse")
            .is_empty());
        assert!(parse_listeners("").expect("parse").is_empty());
        assert!(parse_listeners("header\n\n").expect("parse").is_empty());
    }

    #[test]
    fn malformed_lines_are_errors() {
        let e = parse_listeners("h\n 0: 0100007F:1F90\n").unwrap_err();
        assert_eq!(e.line, 2);
        for bad in [
            "h\n 0: 0100007F1F90 00000000:0000 0A\n",
            "h\n 0: 0100007G:1F90 00000000:0000 0A\n",
            "h\n 0: 0100007F:1F9G 00000000:0000 0A\n",
            "h\n 0: 0100007F:10000 00000000:0000 0A\n",
            "h\n 0: 0100007F00:1F90 00000000:0000 0A\n",
        ] {
            assert!(parse_listeners(bad).is_err(), "accepted {bad:?}");
        }
    }

    #[test]
    fn the_real_tables_parse() {
        // Whatever this host listens on, the kernel's own format must parse.
        listening_sockets().expect("real /proc/net/tcp*");
    }

    const GUEST: IpAddr = IpAddr::V4(Ipv4Addr::new(169, 254, 0, 21));

    fn plan_of(listeners: &[&str], own: &[&str]) -> Vec<(SocketAddr, SocketAddr)> {
        let listeners: Vec<SocketAddr> = listeners.iter().map(|s| sa(s)).collect();
        let own: HashSet<SocketAddr> = own.iter().map(|s| sa(s)).collect();
        plan(&listeners, &[GUEST], &own, &[49983])
            .into_iter()
            .collect()
    }

    #[test]
    fn loopback_only_ports_are_forwarded_to_their_listener() {
        assert_eq!(
            plan_of(
                &[
                    "127.0.0.1:8080",
                    "[::1]:3000",
                    "[::ffff:127.0.0.1]:5001",
                    "127.0.0.9:7000"
                ],
                &[]
            ),
            vec![
                (sa("169.254.0.21:3000"), sa("[::1]:3000")),
                (sa("169.254.0.21:5001"), sa("127.0.0.1:5001")),
                (sa("169.254.0.21:7000"), sa("127.0.0.9:7000")),
                (sa("169.254.0.21:8080"), sa("127.0.0.1:8080")),
            ]
        );
        // Both families on loopback: IPv4 127.0.0.1 is the target.
        assert_eq!(
            plan_of(&["[::1]:8080", "127.0.0.5:8080", "127.0.0.1:8080"], &[]),
            vec![(sa("169.254.0.21:8080"), sa("127.0.0.1:8080"))]
        );
    }

    #[test]
    fn ports_reachable_otherwise_are_left_alone() {
        let none: Vec<(SocketAddr, SocketAddr)> = Vec::new();
        // Wildcard in either family, or a service on the guest address itself.
        assert_eq!(plan_of(&["127.0.0.1:80", "0.0.0.0:80"], &[]), none);
        assert_eq!(plan_of(&["127.0.0.1:80", "[::]:80"], &[]), none);
        assert_eq!(plan_of(&["127.0.0.1:80", "169.254.0.21:80"], &[]), none);
        assert_eq!(
            plan_of(&["127.0.0.1:80", "[::ffff:169.254.0.21]:80"], &[]),
            none
        );
        // envd's own port, and ports with no loopback listener at all.
        assert_eq!(plan_of(&["127.0.0.1:49983"], &[]), none);
        assert_eq!(plan_of(&["10.0.0.5:80"], &[]), none);
    }

    #[test]
    fn the_forwarders_own_listeners_do_not_block_or_count() {
        // Its own listener on the guest address does not block the port...
        assert_eq!(
            plan_of(&["127.0.0.1:80", "169.254.0.21:80"], &["169.254.0.21:80"]),
            vec![(sa("169.254.0.21:80"), sa("127.0.0.1:80"))]
        );
        // ...and is not a reason to keep forwarding once the service is gone.
        assert_eq!(plan_of(&["169.254.0.21:80"], &["169.254.0.21:80"]), vec![]);
    }

    #[test]
    fn a_loopback_forward_address_is_never_a_target() {
        let fwd = [IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2))];
        let own: HashSet<SocketAddr> = [sa("127.0.0.2:80")].into();
        let got = plan(&[sa("127.0.0.1:80"), sa("127.0.0.2:80")], &fwd, &own, &[]);
        assert_eq!(
            got.into_iter().collect::<Vec<_>>(),
            vec![(sa("127.0.0.2:80"), sa("127.0.0.1:80"))]
        );
        // Only our own listener left: nothing to forward.
        assert!(plan(&[sa("127.0.0.2:80")], &fwd, &own, &[]).is_empty());
        // Someone else on the forward address: theirs, not ours.
        assert!(plan(
            &[sa("127.0.0.1:80"), sa("127.0.0.2:80")],
            &fwd,
            &HashSet::new(),
            &[]
        )
        .is_empty());
    }
}
