//! Egress policies on real slots, as root. Without root every test prints a
//! loud SKIPPED line and passes.
//!
//! The guest is a network namespace behind the slot's `tap0` (the persistent
//! tap is swapped for a veth of the same name), so its traffic takes the path
//! a VM's does: in through `tap0`, forwarded by the slot, out through the host.
//! The "internet" is a namespace the test creates on 198.18.0.0/24 (the
//! benchmarking range) with TCP and UDP echo servers and a DNS server; nothing
//! leaves the machine.

// Integration tests are their own crate; the lint targets unit tests.
#![allow(clippy::tests_outside_test_module)]

mod common;

use common::*;
use hickory_proto::op::{Message, MessageType, OpCode, Query, ResponseCode};
use hickory_proto::rr::rdata::A;
use hickory_proto::rr::{Name, RData, Record, RecordType};
use std::io::{ErrorKind, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::path::PathBuf;
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};
use wrenn_core::egress::EgressPolicy;
use wrenn_core::net::{NetSlot, Network, GATEWAY_IP, GUEST_IP};
use wrenn_net::{host_veth_addr, NetConfig, NetnsNetwork};

static WORLD_LOCK: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

const WAIT: Duration = Duration::from_secs(3);
const HOST_SIDE: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 1);
/// What `good.test` and `*.wild.test` resolve to.
const GOOD: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 2);
/// What `bad.test` resolves to.
const BAD: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 3);
/// A metadata service in the test internet, routed from the host as a cloud's is.
const METADATA: Ipv4Addr = Ipv4Addr::new(169, 254, 169, 254);
const TCP_PORT: u16 = 8080;
const UDP_PORT: u16 = 7007;

fn netns_path(name: &str) -> PathBuf {
    PathBuf::from("/run/netns").join(name)
}

/// The test internet: echo servers on GOOD and BAD, a DNS server on GOOD.
struct World {
    name: String,
    link: String,
}

impl World {
    fn create() -> Self {
        let pid = std::process::id();
        let w = World {
            name: format!("wt-world-{pid}"),
            link: format!("wtw-{pid}"),
        };
        ip_ok(&["netns", "add", &w.name]);
        ip_ok(&[
            "link", "add", &w.link, "type", "veth", "peer", "name", "eth0", "netns", &w.name,
        ]);
        ip_ok(&["addr", "add", &format!("{HOST_SIDE}/24"), "dev", &w.link]);
        ip_ok(&["link", "set", &w.link, "up"]);
        for a in [GOOD, BAD] {
            ip_ok(&[
                "-n",
                &w.name,
                "addr",
                "add",
                &format!("{a}/24"),
                "dev",
                "eth0",
            ]);
        }
        ip_ok(&["-n", &w.name, "link", "set", "eth0", "up"]);
        ip_ok(&["-n", &w.name, "link", "set", "lo", "up"]);
        ip_ok(&[
            "-n",
            &w.name,
            "route",
            "add",
            "default",
            "via",
            &HOST_SIDE.to_string(),
        ]);
        ip_ok(&[
            "-n",
            &w.name,
            "addr",
            "add",
            &format!("{METADATA}/32"),
            "dev",
            "eth0",
        ]);
        ip_ok(&[
            "route",
            "add",
            &format!("{METADATA}/32"),
            "via",
            &GOOD.to_string(),
            "dev",
            &w.link,
        ]);
        let path = netns_path(&w.name);
        for addr in [GOOD, BAD, METADATA] {
            let l = in_ns(&path, move || {
                TcpListener::bind((addr, TCP_PORT)).expect("bind tcp")
            });
            std::thread::spawn(move || {
                for s in l.incoming().flatten() {
                    std::thread::spawn(move || echo(s));
                }
            });
            let u = in_ns(&path, move || {
                UdpSocket::bind((addr, UDP_PORT)).expect("bind udp")
            });
            std::thread::spawn(move || {
                let mut buf = [0u8; 512];
                while let Ok((n, from)) = u.recv_from(&mut buf) {
                    let _ = u.send_to(&buf[..n], from);
                }
            });
        }
        let dns = in_ns(&path, || UdpSocket::bind((GOOD, 53)).expect("bind dns"));
        std::thread::spawn(move || serve_dns(dns));
        w
    }
}

impl Drop for World {
    fn drop(&mut self) {
        let _ = ip(&["link", "del", &self.link]);
        let _ = ip(&["netns", "del", &self.name]);
    }
}

fn echo(mut s: TcpStream) {
    let mut buf = [0u8; 4];
    let _ = s.set_read_timeout(Some(WAIT));
    if s.read_exact(&mut buf).is_ok() {
        let _ = s.write_all(&buf);
    }
}

/// Answers A queries: good.test and *.wild.test → GOOD, bad.test → BAD.
fn serve_dns(sock: UdpSocket) {
    let mut buf = [0u8; 1500];
    while let Ok((n, from)) = sock.recv_from(&mut buf) {
        let Ok(q) = Message::from_vec(&buf[..n]) else {
            continue;
        };
        let mut r = Message::response(q.metadata.id, OpCode::Query);
        r.queries = q.queries.clone();
        let name = q
            .queries
            .first()
            .map(|q| q.name().to_ascii())
            .unwrap_or_default();
        let ip = match name.trim_end_matches('.') {
            "good.test" => Some(GOOD),
            "bad.test" => Some(BAD),
            n if n.ends_with(".wild.test") => Some(GOOD),
            _ => None,
        };
        match ip {
            Some(ip) => {
                let owner = q.queries[0].name().clone();
                r.answers
                    .push(Record::from_rdata(owner, 60, RData::A(A(ip))));
            }
            None => r.metadata.response_code = ResponseCode::NXDomain,
        }
        if let Ok(bytes) = r.to_vec() {
            let _ = sock.send_to(&bytes, from);
        }
    }
}

/// A guest namespace behind the slot's `tap0`.
struct Guest {
    name: String,
}

impl Guest {
    fn attach(slot: &NetSlot) -> Self {
        let g = Guest {
            name: format!("wt-guest-{}-{}", std::process::id(), slot.index),
        };
        ip_ok(&["netns", "add", &g.name]);
        ip_ok(&["-n", &slot.netns, "link", "del", "tap0"]);
        ip_ok(&[
            "-n",
            &slot.netns,
            "link",
            "add",
            "tap0",
            "type",
            "veth",
            "peer",
            "name",
            "eth0",
            "netns",
            &g.name,
        ]);
        ip_ok(&[
            "-n",
            &slot.netns,
            "addr",
            "add",
            &format!("{GATEWAY_IP}/30"),
            "dev",
            "tap0",
        ]);
        ip_ok(&["-n", &slot.netns, "link", "set", "tap0", "up"]);
        ip_ok(&[
            "-n",
            &g.name,
            "addr",
            "add",
            &format!("{GUEST_IP}/30"),
            "dev",
            "eth0",
        ]);
        ip_ok(&["-n", &g.name, "link", "set", "eth0", "up"]);
        ip_ok(&["-n", &g.name, "link", "set", "lo", "up"]);
        ip_ok(&[
            "-n",
            &g.name,
            "route",
            "add",
            "default",
            "via",
            &GATEWAY_IP.to_string(),
        ]);
        g
    }

    fn path(&self) -> PathBuf {
        netns_path(&self.name)
    }

    /// A TCP round trip to `to`: Ok, or the error kind (refused vs timed out).
    fn tcp(&self, to: Ipv4Addr, port: u16) -> Result<(), ErrorKind> {
        in_ns(&self.path(), move || {
            let addr = SocketAddr::from((to, port));
            let mut s = TcpStream::connect_timeout(&addr, WAIT).map_err(|e| e.kind())?;
            s.set_read_timeout(Some(WAIT)).map_err(|e| e.kind())?;
            s.write_all(b"ping").map_err(|e| e.kind())?;
            let mut buf = [0u8; 4];
            s.read_exact(&mut buf).map_err(|e| e.kind())?;
            assert_eq!(&buf, b"ping");
            Ok(())
        })
    }

    /// A UDP round trip to `to`.
    fn udp(&self, to: Ipv4Addr) -> Result<(), ErrorKind> {
        in_ns(&self.path(), move || {
            let s = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0)).map_err(|e| e.kind())?;
            s.connect((to, UDP_PORT)).map_err(|e| e.kind())?;
            s.set_read_timeout(Some(WAIT)).map_err(|e| e.kind())?;
            s.send(b"ping").map_err(|e| e.kind())?;
            let mut buf = [0u8; 4];
            s.recv(&mut buf).map_err(|e| e.kind())?;
            Ok(())
        })
    }

    /// Resolves `name` through `server` (the slot may intercept it): the first
    /// A record, or the response code.
    fn resolve(&self, server: Ipv4Addr, name: &str) -> Result<Ipv4Addr, String> {
        let name = name.to_owned();
        in_ns(&self.path(), move || {
            let s = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0)).map_err(|e| e.to_string())?;
            s.set_read_timeout(Some(WAIT)).map_err(|e| e.to_string())?;
            let mut q = Message::new(4242, MessageType::Query, OpCode::Query);
            q.metadata.recursion_desired = true;
            q.queries.push(Query::query(
                Name::from_ascii(&name).unwrap(),
                RecordType::A,
            ));
            s.send_to(&q.to_vec().unwrap(), (server, 53))
                .map_err(|e| e.to_string())?;
            let mut buf = [0u8; 1500];
            let n = s.recv(&mut buf).map_err(|e| e.to_string())?;
            let r = Message::from_vec(&buf[..n]).map_err(|e| e.to_string())?;
            assert_eq!(r.metadata.id, 4242);
            r.answers
                .iter()
                .find_map(|a| match &a.data {
                    RData::A(a) => Some(a.0),
                    _ => None,
                })
                .ok_or_else(|| format!("{:?}", r.metadata.response_code))
        })
    }
}

impl Drop for Guest {
    fn drop(&mut self) {
        let _ = ip(&["netns", "del", &self.name]);
    }
}

fn network() -> Arc<NetnsNetwork> {
    Arc::new(NetnsNetwork::new(NetConfig {
        dns_upstream: SocketAddr::from((GOOD, 53)),
        ..NetConfig::default()
    }))
}

fn policy(allow: &[&str], deny: &[&str]) -> EgressPolicy {
    EgressPolicy::new(allow, deny, None).expect("valid policy")
}

const REFUSED: Result<(), ErrorKind> = Err(ErrorKind::ConnectionRefused);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn policies_are_enforced_and_changed_live() {
    if !is_root() {
        return;
    }
    let _lock = WORLD_LOCK.lock().await;
    let world = World::create();
    let net = network();
    let slot = net
        .allocate(&EgressPolicy::default())
        .await
        .expect("allocate");
    let guest = Guest::attach(&slot);

    // Open: both servers answer, TCP and UDP.
    assert_eq!(guest.tcp(GOOD, TCP_PORT), Ok(()));
    assert_eq!(guest.tcp(BAD, TCP_PORT), Ok(()));
    assert_eq!(guest.udp(BAD), Ok(()));

    // Deny all: TCP is reset, UDP gets an ICMP error; neither hangs.
    net.set_egress(&slot, &EgressPolicy::deny_all())
        .await
        .expect("deny all");
    let started = Instant::now();
    assert_eq!(guest.tcp(GOOD, TCP_PORT), REFUSED);
    assert!(guest.udp(GOOD).is_err());
    assert!(
        started.elapsed() < WAIT,
        "refusals must not wait for a timeout"
    );
    let ping = in_ns(&guest.path(), || {
        Command::new("ping")
            .args(["-c1", "-W1", &GOOD.to_string()])
            .output()
    });
    if let Ok(out) = ping {
        assert!(!out.status.success(), "ICMP passed a deny-all policy");
    }

    // Allow a CIDR: exactly that passes.
    net.set_egress(&slot, &policy(&["198.18.0.2/32"], &["0.0.0.0/0"]))
        .await
        .expect("allow one address");
    assert_eq!(guest.tcp(GOOD, TCP_PORT), Ok(()));
    assert_eq!(guest.udp(GOOD), Ok(()));
    assert_eq!(guest.tcp(BAD, TCP_PORT), REFUSED);

    // Deny a CIDR only: the rest stays open.
    net.set_egress(&slot, &policy(&[], &["198.18.0.3"]))
        .await
        .expect("deny one address");
    assert_eq!(guest.tcp(GOOD, TCP_PORT), Ok(()));
    assert_eq!(guest.tcp(BAD, TCP_PORT), REFUSED);

    // A live change takes effect at once, for an established connection too.
    net.set_egress(&slot, &EgressPolicy::default())
        .await
        .unwrap();
    let path = guest.path();
    let mut held = in_ns(&path, || {
        TcpStream::connect_timeout(&SocketAddr::from((BAD, TCP_PORT)), WAIT).expect("connect")
    });
    let t = Instant::now();
    net.set_egress(&slot, &EgressPolicy::deny_all())
        .await
        .unwrap();
    let update = t.elapsed();
    assert!(update < Duration::from_secs(1), "update took {update:?}");
    held.set_read_timeout(Some(WAIT)).unwrap();
    let wrote = held.write_all(b"ping");
    let mut buf = [0u8; 4];
    assert!(
        wrote.is_err() || held.read_exact(&mut buf).is_err(),
        "an established connection outlived a deny-all policy"
    );

    net.release(&slot).await.expect("release");
    drop(guest);
    drop(world);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn domain_rules_go_through_the_filtering_resolver() {
    if !is_root() {
        return;
    }
    let _lock = WORLD_LOCK.lock().await;
    let world = World::create();
    let net = network();
    let strict = policy(&["good.test", "*.wild.test"], &["0.0.0.0/0"]);
    let slot = net.allocate(&strict).await.expect("allocate");
    let guest = Guest::attach(&slot);

    // Before any lookup, even the allowed name's address is closed.
    assert_eq!(guest.tcp(GOOD, TCP_PORT), REFUSED);
    // Whatever server the guest asks, the slot's resolver answers.
    assert_eq!(
        guest.resolve(Ipv4Addr::new(8, 8, 8, 8), "good.test"),
        Ok(GOOD)
    );
    assert_eq!(guest.tcp(GOOD, TCP_PORT), Ok(()));
    assert_eq!(guest.udp(GOOD), Ok(()));
    assert_eq!(
        guest.resolve(Ipv4Addr::new(1, 2, 3, 4), "a.b.wild.test"),
        Ok(GOOD)
    );
    // Names not allowed are refused and never reach the upstream resolver.
    assert_eq!(
        guest.resolve(Ipv4Addr::new(8, 8, 8, 8), "bad.test"),
        Err("Refused".to_owned())
    );
    assert_eq!(
        guest.resolve(Ipv4Addr::new(8, 8, 8, 8), "wild.test"),
        Err("Refused".to_owned())
    );
    // A hard-coded address no allowed name resolved to stays closed.
    assert_eq!(guest.tcp(BAD, TCP_PORT), REFUSED);
    // TCP DNS is refused, not forwarded around the filter.
    assert_eq!(guest.tcp(GOOD, 53), REFUSED);

    // A new policy forgets what the old one's names opened.
    let other = policy(&["*.wild.test"], &["0.0.0.0/0"]);
    net.set_egress(&slot, &other).await.expect("update");
    assert_eq!(guest.tcp(GOOD, TCP_PORT), REFUSED);
    assert_eq!(
        guest.resolve(Ipv4Addr::new(8, 8, 8, 8), "good.test"),
        Err("Refused".to_owned())
    );
    // Without domain rules DNS is ordinary traffic again (here: denied).
    net.set_egress(&slot, &EgressPolicy::deny_all())
        .await
        .unwrap();
    assert!(guest.resolve(GOOD, "good.test").is_err());

    net.release(&slot).await.expect("release");
    drop(guest);
    drop(world);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn host_and_link_local_are_denied_under_every_policy() {
    if !is_root() {
        return;
    }
    let _lock = WORLD_LOCK.lock().await;
    let world = World::create();
    let net = network();
    let slot = net
        .allocate(&EgressPolicy::default())
        .await
        .expect("allocate");
    let other = net
        .allocate(&EgressPolicy::default())
        .await
        .expect("allocate");
    let guest = Guest::attach(&slot);
    // Host services: one on the host side of the slot's veth, one on the
    // host's side of the world link (any host address).
    let host_veth = host_veth_addr(slot.index);
    let listeners: Vec<TcpListener> = [host_veth, HOST_SIDE]
        .into_iter()
        .map(|a| TcpListener::bind((a, TCP_PORT)).expect("host listener"))
        .collect();

    // The metadata server is there, for the host.
    let probe = TcpStream::connect_timeout(&SocketAddr::from((METADATA, TCP_PORT)), WAIT);
    assert!(
        probe.is_ok(),
        "the test metadata server is not reachable from the host"
    );

    let everything = policy(&["0.0.0.0/0", "169.254.169.254"], &[]);
    for p in [
        EgressPolicy::default(),
        everything,
        EgressPolicy::deny_all(),
    ] {
        net.set_egress(&slot, &p).await.expect("policy");
        for (to, what) in [
            (host_veth, "the host side of the slot's veth"),
            (HOST_SIDE, "another host address"),
            (METADATA, "the metadata address"),
            (other.host_addr, "another capsule"),
            (host_veth_addr(other.index), "another slot's veth"),
        ] {
            let r = guest.tcp(to, TCP_PORT);
            assert!(r.is_err(), "{what} ({to}) was reachable under {p:?}");
            assert_ne!(
                r,
                Err(ErrorKind::TimedOut),
                "{what} was dropped, not refused"
            );
        }
    }
    drop(listeners);
    net.release(&other).await.unwrap();
    net.release(&slot).await.unwrap();
    drop(guest);
    drop(world);
}
