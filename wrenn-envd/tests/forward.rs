//! The loopback port forwarder on this host's real socket tables: services on
//! loopback, forwarded to another 127/8 address (Linux routes all of 127.0.0.0/8 to
//! `lo`, so 127.0.0.2 stands in for the guest's eth0 address).
//!
//! Each test only applies the socket-table rows of its own ports, so services that
//! happen to run on the host (or in parallel tests) are never forwarded.

#![allow(clippy::tests_outside_test_module)] // integration tests are their own crate

use std::collections::HashSet;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;
use wrenn_envd::server::forward::{
    listening_sockets, ForwardAddrs, ForwardConfig, Forwarder, SCAN_INTERVAL,
};

const FWD: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 2);

/// A service that answers every connection with `echo:` and what it read, then closes.
async fn echo_service(bind: SocketAddr) -> (SocketAddr, JoinHandle<()>) {
    let l = TcpListener::bind(bind)
        .await
        .expect("bind the echo service");
    let addr = l.local_addr().expect("local addr");
    let task = tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                let mut buf = Vec::new();
                if s.read_to_end(&mut buf).await.is_ok() {
                    let _ = s.write_all(b"echo:").await;
                    let _ = s.write_all(&buf).await;
                }
            });
        }
    });
    (addr, task)
}

/// Stops a service: its listener is closed when this returns.
async fn stop(task: JoinHandle<()>) {
    task.abort();
    let _ = task.await;
}

async fn round_trip(addr: SocketAddr, msg: &[u8]) -> std::io::Result<Vec<u8>> {
    let mut s = tokio::time::timeout(Duration::from_secs(5), TcpStream::connect(addr))
        .await
        .map_err(|_| std::io::Error::other("connect timed out"))??;
    s.write_all(msg).await?;
    s.shutdown().await?;
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut out))
        .await
        .map_err(|_| std::io::Error::other("read timed out"))??;
    Ok(out)
}

async fn refused(addr: SocketAddr) -> bool {
    matches!(
        TcpStream::connect(addr).await,
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused
    )
}

fn forwarder(exclude_ports: Vec<u16>) -> Forwarder {
    Forwarder::new(ForwardConfig {
        addrs: ForwardAddrs::Fixed(vec![IpAddr::V4(FWD)]),
        exclude_ports,
        interval: SCAN_INTERVAL,
    })
}

/// One scan of the real socket tables, restricted to `ports`.
async fn scan(fwd: &mut Forwarder, ports: &[u16]) {
    let mine: Vec<SocketAddr> = listening_sockets()
        .expect("read /proc/net/tcp*")
        .into_iter()
        .filter(|s| ports.contains(&s.port()))
        .collect();
    fwd.apply(&mine, &[IpAddr::V4(FWD)]).await;
}

#[tokio::test]
async fn loopback_listener_is_forwarded_until_it_goes_away() {
    let (svc, task) = echo_service((Ipv4Addr::LOCALHOST, 0).into()).await;
    let port = svc.port();
    let exposed = SocketAddr::from((FWD, port));
    assert!(
        refused(exposed).await,
        "{exposed} must be closed before forwarding"
    );

    let mut fwd = forwarder(vec![]);
    scan(&mut fwd, &[port]).await;
    assert_eq!(fwd.forwards(), vec![(exposed, svc)]);
    let got = round_trip(exposed, b"through the forward")
        .await
        .expect("round trip through the forward");
    assert_eq!(got, b"echo:through the forward");

    // The next scan sees the forwarder's own listener too and keeps the forward.
    scan(&mut fwd, &[port]).await;
    assert_eq!(fwd.forwards(), vec![(exposed, svc)]);
    assert_eq!(
        round_trip(exposed, b"again").await.expect("second trip"),
        b"echo:again"
    );

    // The service goes away: so does the forward.
    stop(task).await;
    scan(&mut fwd, &[port]).await;
    assert!(fwd.forwards().is_empty(), "{:?}", fwd.forwards());
    assert!(
        refused(exposed).await,
        "{exposed} still open after the service stopped"
    );
}

#[tokio::test]
async fn ipv6_loopback_listener_is_forwarded() {
    let (svc, task) = echo_service("[::1]:0".parse().expect("addr")).await;
    let port = svc.port();
    let exposed = SocketAddr::from((FWD, port));
    let mut fwd = forwarder(vec![]);
    scan(&mut fwd, &[port]).await;
    assert_eq!(fwd.forwards(), vec![(exposed, svc)]);
    assert_eq!(
        round_trip(exposed, b"v6").await.expect("round trip to ::1"),
        b"echo:v6"
    );
    stop(task).await;
    scan(&mut fwd, &[port]).await;
    assert!(fwd.forwards().is_empty());
}

#[tokio::test]
async fn excluded_and_already_exposed_ports_are_left_alone() {
    // An excluded port (envd's own) is never forwarded.
    let (own, own_task) = echo_service((Ipv4Addr::LOCALHOST, 0).into()).await;
    // A service that listens on loopback and on the forward address itself.
    let (both, both_task) = echo_service((Ipv4Addr::LOCALHOST, 0).into()).await;
    let (_theirs, theirs_task) = echo_service((FWD, both.port()).into()).await;
    // A wildcard listener (reachable everywhere already).
    let (wild, wild_task) = echo_service((Ipv4Addr::UNSPECIFIED, 0).into()).await;

    let mut fwd = forwarder(vec![own.port()]);
    scan(&mut fwd, &[own.port(), both.port(), wild.port()]).await;
    assert!(fwd.forwards().is_empty(), "{:?}", fwd.forwards());
    assert!(refused((FWD, own.port()).into()).await);
    // The service's own listener on 127.0.0.2 still answers (not displaced).
    assert_eq!(
        round_trip((FWD, both.port()).into(), b"x")
            .await
            .expect("theirs"),
        b"echo:x"
    );

    // A control: the same forwarder does forward a plain loopback-only port.
    let (plain, plain_task) = echo_service((Ipv4Addr::LOCALHOST, 0).into()).await;
    scan(
        &mut fwd,
        &[own.port(), both.port(), wild.port(), plain.port()],
    )
    .await;
    let listening: HashSet<SocketAddr> = fwd.forwards().into_iter().map(|(l, _)| l).collect();
    assert_eq!(
        listening,
        HashSet::from([SocketAddr::from((FWD, plain.port()))])
    );

    for t in [own_task, both_task, theirs_task, wild_task, plain_task] {
        stop(t).await;
    }
}
