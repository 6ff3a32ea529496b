//! The forwarder as wired into the envd binary: `--forward-addr` exposes a
//! loopback-only service within a scan or two, never envd's own port, and drops the
//! forward when the service goes away.
//!
//! A separate test binary: this envd forwards every loopback-only listener of the
//! host to 127.0.0.3 while it runs, which must not race with other tests' listeners.

#![allow(clippy::tests_outside_test_module)] // integration tests are their own crate

mod common;

use std::net::{Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const FWD: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 3);

async fn ask(addr: SocketAddr) -> std::io::Result<Vec<u8>> {
    let mut s = TcpStream::connect(addr).await?;
    s.write_all(b"ping").await?;
    s.shutdown().await?;
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut out))
        .await
        .map_err(|_| std::io::Error::other("read timed out"))??;
    Ok(out)
}

#[tokio::test]
async fn envd_exposes_loopback_services_but_not_itself() {
    let svc = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .await
        .expect("bind the service");
    let port = svc.local_addr().expect("local addr").port();
    let task = tokio::spawn(async move {
        while let Ok((mut s, _)) = svc.accept().await {
            tokio::spawn(async move {
                let mut buf = Vec::new();
                if s.read_to_end(&mut buf).await.is_ok() {
                    let _ = s.write_all(b"pong:").await;
                    let _ = s.write_all(&buf).await;
                }
            });
        }
    });
    let exposed = SocketAddr::from((FWD, port));
    assert!(
        TcpStream::connect(exposed).await.is_err(),
        "{exposed} open before envd"
    );

    let envd = common::Envd::start(&["--forward-addr", "127.0.0.3"]).await;

    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match ask(exposed).await {
            Ok(reply) => {
                assert_eq!(reply, b"pong:ping");
                break;
            }
            Err(e) if Instant::now() < deadline => {
                let _ = e;
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => panic!("{exposed} never forwarded: {e}"),
        }
    }
    // envd itself listens on loopback only here, yet its port is not forwarded
    // (the scan that exposed the service saw it too).
    let own = SocketAddr::from((FWD, envd.addr.port()));
    assert!(
        TcpStream::connect(own).await.is_err(),
        "envd's own port forwarded"
    );

    task.abort();
    let _ = task.await;
    let deadline = Instant::now() + Duration::from_secs(10);
    while TcpStream::connect(exposed).await.is_ok() {
        assert!(
            Instant::now() < deadline,
            "{exposed} still forwarded after the service stopped"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
