//! Shared helpers of the envd integration tests: the real `envd` binary runs as a
//! host process on a free loopback port.
#![allow(dead_code)]

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use std::net::{Ipv4Addr, SocketAddr, TcpListener};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use wrenn_core::guest::GuestAgent;
use wrenn_envd::client::EnvdClient;

/// A port nothing listens on right now (the kernel's pick for an ephemeral bind).
pub fn free_port() -> u16 {
    let l = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).expect("bind an ephemeral port");
    l.local_addr().expect("local addr").port()
}

/// The name of the user running the tests (envd's default user, so no switch is needed).
pub fn current_user() -> String {
    nix::unistd::User::from_uid(nix::unistd::getuid())
        .ok()
        .flatten()
        .map(|u| u.name)
        .expect("the test user has a passwd entry")
}

/// One `envd` process on `127.0.0.1:<port>`; SIGTERM, then SIGKILL, when dropped.
#[derive(Debug)]
pub struct Envd {
    child: Child,
    pub addr: SocketAddr,
}

impl Envd {
    /// Starts envd with `extra` arguments and waits until it answers `/health`.
    pub async fn start(extra: &[&str]) -> Envd {
        let port = free_port();
        let user = current_user();
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_envd"));
        cmd.args(["--addr", "127.0.0.1", "--port", &port.to_string()])
            .args(["--default-user", &user])
            .args(extra)
            .stdin(Stdio::null());
        // Quiet unless asked for (ENVD_LOG=debug cargo test ...).
        if std::env::var_os("ENVD_LOG").is_none() {
            cmd.env("ENVD_LOG", "warn");
        }
        let child = cmd.spawn().expect("spawn envd");
        let envd = Envd {
            child,
            addr: SocketAddr::from((Ipv4Addr::LOCALHOST, port)),
        };
        envd.client()
            .wait_ready(Duration::from_secs(15))
            .await
            .expect("envd becomes healthy");
        envd
    }

    pub fn client(&self) -> EnvdClient {
        EnvdClient::new(self.addr, None)
    }
}

impl Drop for Envd {
    fn drop(&mut self) {
        if let Ok(pid) = i32::try_from(self.child.id()) {
            let _ = kill(Pid::from_raw(pid), Signal::SIGTERM);
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
