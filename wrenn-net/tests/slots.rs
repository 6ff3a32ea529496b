//! Real network slots, as root. Without root every test prints a loud SKIPPED
//! line and passes.
//!
//! No VM is started: the guest is emulated by putting [`GUEST_IP`] on `lo`
//! inside the slot namespace, which exercises the same DNAT, routing and NAT
//! rules a guest behind the tap would. Traffic only goes to namespaces these
//! tests create.

// Integration tests are their own crate; the lint targets unit tests.
#![allow(clippy::tests_outside_test_module)]

mod common;

use common::*;
use nix::sched::{setns, CloneFlags};
use std::collections::BTreeSet;
use std::fs::File;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::mpsc;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};
use wrenn_core::egress::EgressPolicy;
use wrenn_core::net::{NetError, NetSlot, Network, SlotIndex, GUEST_IP};
use wrenn_net::{host_veth_addr, slot_for, NetConfig, NetnsNetwork};

/// Tests that create slots hold it shared; the sweep test holds it exclusively
/// so it never sweeps a slot another test is building.
static SLOTS_LOCK: tokio::sync::RwLock<()> = tokio::sync::RwLock::const_new(());

const SHORT: Duration = Duration::from_millis(700);
const LONG: Duration = Duration::from_secs(5);

fn link_exists(name: &str) -> bool {
    ip(&["link", "show", "dev", name]).status.success()
}

fn network() -> Arc<NetnsNetwork> {
    Arc::new(NetnsNetwork::new(NetConfig::default()))
}

/// Puts the guest address on `lo` in the slot, standing in for the guest.
fn emulate_guest(slot: &NetSlot) {
    ip_ok(&[
        "-n",
        &slot.netns,
        "addr",
        "add",
        &format!("{GUEST_IP}/32"),
        "dev",
        "lo",
    ]);
}

/// Echo server inside a namespace: accepts one connection, reports the peer
/// address and echoes what it reads. Stops by itself after `LONG`.
fn echo_server(path: &Path, bind: SocketAddrV4) -> JoinHandle<Option<SocketAddr>> {
    let (ready_tx, ready_rx) = mpsc::channel();
    let handle = spawn_in_ns(path, move || {
        let listener = TcpListener::bind(bind).expect("bind in netns");
        listener.set_nonblocking(true).unwrap();
        ready_tx.send(()).unwrap();
        let deadline = Instant::now() + LONG;
        loop {
            match listener.accept() {
                Ok((mut s, peer)) => {
                    s.set_nonblocking(false).unwrap();
                    s.set_read_timeout(Some(LONG)).unwrap();
                    let mut buf = [0u8; 4];
                    if s.read_exact(&mut buf).is_ok() {
                        let _ = s.write_all(&buf);
                    }
                    return Some(peer);
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    if Instant::now() > deadline {
                        return None;
                    }
                    std::thread::sleep(Duration::from_millis(10));
                }
                Err(e) => panic!("accept: {e}"),
            }
        }
    });
    ready_rx.recv_timeout(LONG).expect("server ready");
    handle
}

fn ping_pong(mut s: TcpStream) -> std::io::Result<()> {
    s.set_read_timeout(Some(LONG))?;
    s.write_all(b"ping")?;
    let mut buf = [0u8; 4];
    s.read_exact(&mut buf)?;
    assert_eq!(&buf, b"ping");
    Ok(())
}

/// Connects from inside a namespace, optionally from a fixed source address.
/// Only the handshake is checked; the returned stream is blocking.
fn connect_in_ns(
    path: &Path,
    source: Option<Ipv4Addr>,
    to: SocketAddrV4,
    timeout: Duration,
) -> std::io::Result<TcpStream> {
    in_ns(path, move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let sock = tokio::net::TcpSocket::new_v4()?;
            if let Some(src) = source {
                sock.bind(SocketAddr::V4(SocketAddrV4::new(src, 0)))?;
            }
            let stream = tokio::time::timeout(timeout, sock.connect(SocketAddr::V4(to)))
                .await
                .map_err(|_| std::io::Error::from(std::io::ErrorKind::TimedOut))??;
            let stream = stream.into_std()?;
            stream.set_nonblocking(false)?;
            Ok(stream)
        })
    })
}

/// Releases the slot on drop if the test did not (panics included), then checks
/// nothing of it is left.
struct SlotGuard {
    net: Arc<NetnsNetwork>,
    slot: Option<NetSlot>,
}

impl SlotGuard {
    fn new(net: &Arc<NetnsNetwork>, slot: NetSlot) -> Self {
        Self {
            net: net.clone(),
            slot: Some(slot),
        }
    }
    fn slot(&self) -> &NetSlot {
        self.slot.as_ref().unwrap()
    }
    async fn release(mut self) {
        let slot = self.slot.take().unwrap();
        self.net.release(&slot).await.expect("release");
        assert_slot_gone(&slot);
    }
}

impl Drop for SlotGuard {
    fn drop(&mut self) {
        if let Some(slot) = self.slot.take() {
            let net = self.net.clone();
            let _ = std::thread::spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .unwrap();
                if let Err(e) = rt.block_on(net.release(&slot)) {
                    eprintln!("guard release of slot {} failed: {e:?}", slot.index);
                }
            })
            .join();
        }
    }
}

fn assert_slot_gone(slot: &NetSlot) {
    assert!(
        !slot.netns_path.exists(),
        "{} still exists",
        slot.netns_path.display()
    );
    assert!(
        !link_exists(&slot.host_veth),
        "{} still exists",
        slot.host_veth
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_concurrent_slots_are_wired() {
    if !is_root() {
        return;
    }
    let _lock = SLOTS_LOCK.read().await;
    let net = network();
    let open = EgressPolicy::default();
    let (a, b) = tokio::join!(net.allocate(&open), net.allocate(&open));
    let a = SlotGuard::new(&net, a.expect("allocate a"));
    let b = SlotGuard::new(&net, b.expect("allocate b"));
    assert_ne!(a.slot().index, b.slot().index);

    for g in [&a, &b] {
        let s = g.slot();
        assert_eq!(*s, slot_for(s.index), "slot is derived from its index");
        assert!(s.netns_path.exists());
        assert!(link_exists(&s.host_veth));
        let host = ip_ok(&["-4", "-o", "addr", "show", "dev", &s.host_veth]);
        assert!(
            host.contains(&format!("{}/30", host_veth_addr(s.index))),
            "{host}"
        );

        let tap = ip_ok(&["-n", &s.netns, "-d", "link", "show", "dev", "tap0"]);
        assert!(tap.contains("tun type tap"), "{tap}");
        assert!(tap.contains("qlen 5000"), "{tap}");
        assert!(
            tap.contains(",UP") || tap.contains("<UP") || tap.contains(" UP"),
            "{tap}"
        );
        let tap_addr = ip_ok(&["-n", &s.netns, "-4", "-o", "addr", "show", "dev", "tap0"]);
        assert!(tap_addr.contains("169.254.0.22/30"), "{tap_addr}");
        let peer = ip_ok(&["-n", &s.netns, "-4", "-o", "addr", "show", "dev", "veth0"]);
        assert!(peer.contains(&format!("{}/30", s.host_addr)), "{peer}");
        let routes = ip_ok(&["-n", &s.netns, "-4", "route", "show", "default"]);
        assert!(
            routes.contains(&format!("via {}", host_veth_addr(s.index))),
            "{routes}"
        );
        let fwd = in_ns(&s.netns_path, || {
            std::fs::read_to_string("/proc/sys/net/ipv4/ip_forward").unwrap()
        });
        assert_eq!(fwd.trim(), "1");
    }

    // A persistent tap can be opened again by name from inside the namespace, as QEMU will.
    let path = a.slot().netns_path.clone();
    let attached = in_ns(&path, || {
        use std::os::fd::AsRawFd;
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/net/tun")
            .unwrap();
        // SAFETY: all-zero is a valid `ifreq` (plain C data).
        let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
        for (d, s) in req.ifr_name.iter_mut().zip(b"tap0") {
            *d = *s as libc::c_char;
        }
        req.ifr_ifru.ifru_flags =
            (libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR) as libc::c_short;
        // SAFETY: `f` is an open tun fd; TUNSETIFF reads/writes one `ifreq`, which `req` is.
        let rc =
            unsafe { libc::ioctl(f.as_raw_fd(), libc::TUNSETIFF, &mut req as *mut libc::ifreq) };
        rc == 0
    });
    assert!(attached, "tap0 could not be attached by name");
    // Closing the attached fd must not remove the persistent tap.
    let still = ip_ok(&["-n", &a.slot().netns, "link", "show", "dev", "tap0"]);
    assert!(still.contains("tap0"));

    // Adopted indexes are not handed out again.
    net.adopt(&slot_for(SlotIndex(4000)));

    a.release().await;
    b.release().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn host_reaches_guest_and_slots_are_isolated() {
    if !is_root() {
        return;
    }
    let _lock = SLOTS_LOCK.read().await;
    let net = network();
    let a = SlotGuard::new(
        &net,
        net.allocate(&EgressPolicy::default())
            .await
            .expect("allocate a"),
    );
    let b = SlotGuard::new(
        &net,
        net.allocate(&EgressPolicy::default())
            .await
            .expect("allocate b"),
    );
    emulate_guest(a.slot());
    emulate_guest(b.slot());
    let port = 47_011;

    // (1) Host → host_addr:port is DNATed to the guest, any port.
    let server = echo_server(&a.slot().netns_path, SocketAddrV4::new(GUEST_IP, port));
    let to = SocketAddr::V4(SocketAddrV4::new(a.slot().host_addr, port));
    let stream = TcpStream::connect_timeout(&to, LONG).expect("host → guest a");
    ping_pong(stream).expect("echo through DNAT");
    let seen = server.join().unwrap().expect("guest a saw the connection");
    assert_eq!(
        seen.ip(),
        std::net::IpAddr::V4(host_veth_addr(a.slot().index))
    );

    // (2) From slot a, slot b's address is unreachable, both from the namespace
    // and from the emulated guest; b itself is fine from the host.
    let server_b = echo_server(&b.slot().netns_path, SocketAddrV4::new(GUEST_IP, port));
    let b_addr = SocketAddrV4::new(b.slot().host_addr, port);
    let a_path = a.slot().netns_path.clone();
    assert!(
        connect_in_ns(&a_path, None, b_addr, SHORT).is_err(),
        "a reached b"
    );
    assert!(
        connect_in_ns(&a_path, Some(GUEST_IP), b_addr, SHORT).is_err(),
        "guest a reached b"
    );
    let stream = TcpStream::connect_timeout(&SocketAddr::V4(b_addr), LONG).expect("host → guest b");
    ping_pong(stream).expect("echo b");
    server_b.join().unwrap().expect("guest b saw the host");

    // A guest cannot open connections to host services (here: a listener on the
    // host side of its own veth).
    let host_ip = host_veth_addr(a.slot().index);
    let host_listener = TcpListener::bind(SocketAddrV4::new(host_ip, port)).expect("host listener");
    let r = connect_in_ns(
        &a_path,
        Some(GUEST_IP),
        SocketAddrV4::new(host_ip, port),
        SHORT,
    );
    assert!(r.is_err(), "guest reached a host service");
    drop(host_listener);

    a.release().await;
    b.release().await;
}

/// A test-owned "outside world": a namespace with a veth to the host.
struct EgressNs {
    name: String,
    host_link: String,
}

impl EgressNs {
    const HOST_IP: Ipv4Addr = Ipv4Addr::new(169, 254, 250, 1);
    const SERVER_IP: Ipv4Addr = Ipv4Addr::new(169, 254, 250, 2);

    fn create() -> Self {
        let pid = std::process::id();
        let me = Self {
            name: format!("wrenn-test-egress-{pid}"),
            host_link: format!("wte-{pid}"),
        };
        ip_ok(&["netns", "add", &me.name]);
        ip_ok(&[
            "link",
            "add",
            &me.host_link,
            "type",
            "veth",
            "peer",
            "name",
            "eth0",
            "netns",
            &me.name,
        ]);
        ip_ok(&[
            "addr",
            "add",
            &format!("{}/30", Self::HOST_IP),
            "dev",
            &me.host_link,
        ]);
        ip_ok(&["link", "set", &me.host_link, "up"]);
        ip_ok(&[
            "-n",
            &me.name,
            "addr",
            "add",
            &format!("{}/30", Self::SERVER_IP),
            "dev",
            "eth0",
        ]);
        ip_ok(&["-n", &me.name, "link", "set", "eth0", "up"]);
        ip_ok(&["-n", &me.name, "link", "set", "lo", "up"]);
        me
    }

    fn path(&self) -> PathBuf {
        PathBuf::from("/run/netns").join(&self.name)
    }
}

impl Drop for EgressNs {
    fn drop(&mut self) {
        let _ = ip(&["link", "del", &self.host_link]);
        let _ = ip(&["netns", "del", &self.name]);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn guest_egress_is_masqueraded() {
    if !is_root() {
        return;
    }
    let _lock = SLOTS_LOCK.read().await;
    let net = network();
    let a = SlotGuard::new(
        &net,
        net.allocate(&EgressPolicy::default())
            .await
            .expect("allocate"),
    );
    emulate_guest(a.slot());
    let world = EgressNs::create();
    let port = 47_012;

    let server = echo_server(&world.path(), SocketAddrV4::new(EgressNs::SERVER_IP, port));
    connect_in_ns(
        &a.slot().netns_path,
        Some(GUEST_IP),
        SocketAddrV4::new(EgressNs::SERVER_IP, port),
        LONG,
    )
    .and_then(ping_pong)
    .expect("guest → outside");
    let seen = server.join().unwrap().expect("server saw the guest");
    // The slot masquerades the guest to its peer address, and the host
    // masquerades slot traffic leaving through a non-slot link to that link's
    // address. The outside namespace has no route back to either the guest or
    // the slot range, so an answered connection proves both NAT steps.
    assert_eq!(seen.ip(), std::net::IpAddr::V4(EgressNs::HOST_IP));

    drop(world);
    a.release().await;
    assert!(!Path::new("/run/netns")
        .join(format!("wrenn-test-egress-{}", std::process::id()))
        .exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn release_removes_everything_and_is_idempotent() {
    if !is_root() {
        return;
    }
    let _lock = SLOTS_LOCK.read().await;
    let net = network();
    let slot = net
        .allocate(&EgressPolicy::default())
        .await
        .expect("allocate");
    let guard = SlotGuard::new(&net, slot.clone());
    // Hold the namespace open so its insides can be inspected after release.
    let held = File::open(&slot.netns_path).unwrap();
    guard.release().await;

    let inside = std::thread::spawn(move || {
        setns(&held, CloneFlags::CLONE_NEWNET).unwrap();
        let tap = Command::new("ip")
            .args(["link", "show", "dev", "tap0"])
            .output()
            .unwrap();
        let table = Command::new("nft")
            .args(["list", "table", "ip", "wrenn"])
            .output()
            .unwrap();
        (tap.status.success(), table.status.success())
    })
    .join()
    .unwrap();
    assert_eq!(inside, (false, false), "tap or nft table survived release");

    // Releasing again (everything already gone) succeeds.
    net.release(&slot).await.expect("second release");
    assert_slot_gone(&slot);
    // The host table stays for the other slots.
    assert!(Command::new("nft")
        .args(["list", "table", "inet", "wrenn"])
        .output()
        .unwrap()
        .status
        .success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn capacity_is_enforced() {
    if !is_root() {
        return;
    }
    let _lock = SLOTS_LOCK.read().await;
    let net = Arc::new(NetnsNetwork::new(NetConfig {
        capacity: 1,
        ..NetConfig::default()
    }));
    net.adopt(&slot_for(SlotIndex(1)));
    match net.allocate(&EgressPolicy::default()).await {
        Err(NetError::Exhausted { capacity: 1 }) => {}
        other => panic!("expected Exhausted, got {other:?}"),
    }
}

fn wrenn_netns() -> BTreeSet<String> {
    std::fs::read_dir("/run/netns")
        .map(|d| {
            d.filter_map(Result::ok)
                .filter_map(|e| e.file_name().into_string().ok())
                .filter(|n| n.starts_with("wrenn-"))
                .collect()
        })
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sweep_removes_leftovers_of_a_crash() {
    if !is_root() {
        return;
    }
    let _lock = SLOTS_LOCK.write().await;
    // A "crashed" process: allocates, then vanishes without releasing.
    let leaked = {
        let crashed = network();
        crashed
            .allocate(&EgressPolicy::default())
            .await
            .expect("allocate")
    };
    assert!(leaked.netns_path.exists());
    // A crash between creating the mount point and binding the namespace.
    let empty = slot_for(SlotIndex(8189));
    File::create(&empty.netns_path).unwrap();
    // A stray host veth whose namespace is already gone.
    let stray = slot_for(SlotIndex(8190));
    ip_ok(&[
        "link",
        "add",
        &stray.host_veth,
        "type",
        "veth",
        "peer",
        "name",
        &format!("wtp-{}", std::process::id()),
    ]);

    // Never sweep what other processes on this machine may be using right now.
    let ours: BTreeSet<u32> = [leaked.index.0, empty.index.0, stray.index.0].into();
    let keep: Vec<SlotIndex> = wrenn_netns()
        .iter()
        .filter_map(|n| wrenn_net::parse_index(n, wrenn_net::NETNS_PREFIX))
        .filter(|i| !ours.contains(&i.0))
        .collect();

    let fresh = network();
    let removed = fresh.sweep(&keep).await.expect("sweep");
    assert!(removed >= 3, "removed {removed}");
    assert_slot_gone(&leaked);
    assert!(!empty.netns_path.exists());
    assert!(!link_exists(&stray.host_veth));
    assert!(!link_exists(&format!("wtp-{}", std::process::id())));
    // The host table is back after the sweep.
    assert!(Command::new("nft")
        .args(["list", "table", "inet", "wrenn"])
        .output()
        .unwrap()
        .status
        .success());
    // Kept slots were left alone.
    for i in &keep {
        assert!(slot_for(*i).netns_path.exists() || !wrenn_netns().contains(&slot_for(*i).netns));
    }
}

/// Runs only without root (e.g. `setpriv --reuid=nobody`): allocation must
/// report a permission problem, not a generic backend failure.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_root_allocation_is_a_permission_error() {
    if nix::unistd::geteuid().is_root() {
        return;
    }
    match network().allocate(&EgressPolicy::default()).await {
        Err(NetError::Permission { what }) => eprintln!("permission error as expected: {what}"),
        other => panic!("expected Permission, got {other:?}"),
    }
}
