//! The host-side client (`EnvdClient`, wrenn-core's `GuestAgent`) against the real
//! envd binary running as a host process.

#![allow(clippy::tests_outside_test_module)] // integration tests are their own crate

mod common;

use bytes::Bytes;
use std::time::Duration;
use wrenn_core::guest::{ExecEvent, ExecRequest, ExecStream, ExitStatus, GuestAgent, PtySize};

/// Everything a process printed so far, consumed match by match.
#[derive(Debug, Default)]
struct Transcript {
    text: String,
    /// Offset after the last match: later waits look only past it.
    seen: usize,
}

impl Transcript {
    /// Reads events until `needle` shows up in output not matched before.
    async fn wait_for(&mut self, stream: &mut ExecStream, needle: &str) {
        let found = tokio::time::timeout(Duration::from_secs(10), async {
            loop {
                if let Some(i) = self.text[self.seen..].find(needle) {
                    self.seen += i + needle.len();
                    return Ok(());
                }
                match stream.events.recv().await {
                    Some(Ok(ExecEvent::Stdout(b))) => {
                        self.text.push_str(&String::from_utf8_lossy(&b))
                    }
                    Some(Ok(ExecEvent::Stderr(b))) => {
                        return Err(format!(
                            "stderr on a pty: {:?}",
                            String::from_utf8_lossy(&b)
                        ))
                    }
                    Some(Ok(other)) => return Err(format!("unexpected event {other:?}")),
                    Some(Err(e)) => return Err(format!("stream error: {e}")),
                    None => return Err("stream closed".into()),
                }
            }
        })
        .await;
        match found {
            Ok(Ok(())) => {}
            Ok(Err(why)) => panic!(
                "waiting for {needle:?}: {why}; output so far: {:?}",
                self.text
            ),
            Err(_) => panic!(
                "{needle:?} not seen within 10 s; output so far: {:?}",
                self.text
            ),
        }
    }

    /// Reads events until the exit event (output before it is kept).
    async fn wait_exit(&mut self, stream: &mut ExecStream) -> ExitStatus {
        let res = tokio::time::timeout(Duration::from_secs(10), async {
            loop {
                match stream.events.recv().await {
                    Some(Ok(ExecEvent::Stdout(b))) => {
                        self.text.push_str(&String::from_utf8_lossy(&b))
                    }
                    Some(Ok(ExecEvent::Exited(st))) => return Ok(st),
                    Some(Ok(other)) => return Err(format!("unexpected event {other:?}")),
                    Some(Err(e)) => return Err(format!("stream error: {e}")),
                    None => return Err("stream closed without an exit event".to_string()),
                }
            }
        })
        .await;
        match res {
            Ok(Ok(st)) => st,
            Ok(Err(why)) => panic!("waiting for the exit: {why}; output: {:?}", self.text),
            Err(_) => panic!("no exit within 10 s; output: {:?}", self.text),
        }
    }
}

#[tokio::test]
async fn pty_shell_takes_input_resizes_and_exits() {
    let envd = common::Envd::start(&["--no-forward"]).await;
    let agent = envd.client();
    let req = ExecRequest {
        cmd: "/bin/sh".into(),
        pty: Some(PtySize { cols: 80, rows: 24 }),
        ..Default::default()
    };
    let mut stream = agent.exec(&req).await.expect("start sh on a pty");
    let pid = stream.pid;
    let mut out = Transcript::default();

    // The terminal echoes the line as typed; only the shell prints the sum.
    agent
        .send_pty_input(pid, Bytes::from_static(b"echo hi-$((40+2))\n"))
        .await
        .expect("pty input");
    out.wait_for(&mut stream, "hi-42").await;

    // Started at the requested size, then resized (stty prints rows then cols).
    agent
        .send_pty_input(pid, Bytes::from_static(b"stty size\n"))
        .await
        .expect("pty input");
    out.wait_for(&mut stream, "24 80").await;
    agent
        .resize_pty(
            pid,
            PtySize {
                cols: 100,
                rows: 40,
            },
        )
        .await
        .expect("resize");
    agent
        .send_pty_input(pid, Bytes::from_static(b"stty size\n"))
        .await
        .expect("pty input");
    out.wait_for(&mut stream, "40 100").await;

    agent
        .send_pty_input(pid, Bytes::from_static(b"exit\n"))
        .await
        .expect("pty input");
    let status = out.wait_exit(&mut stream).await;
    assert_eq!((status.code, status.exited), (0, true), "{status:?}");

    // The process is gone: its terminal takes no more input.
    let err = agent
        .send_pty_input(pid, Bytes::from_static(b"echo late\n"))
        .await
        .expect_err("input to an exited process");
    assert!(
        matches!(err, wrenn_core::guest::AgentError::NotFound(_)),
        "{err:?}"
    );
}

#[tokio::test]
async fn pty_calls_on_a_pipe_process_are_rejected() {
    let envd = common::Envd::start(&["--no-forward"]).await;
    let agent = envd.client();
    let req = ExecRequest {
        cmd: "/bin/sleep".into(),
        args: vec!["30".into()],
        ..Default::default()
    };
    let stream = agent.exec(&req).await.expect("start sleep");
    let err = agent
        .resize_pty(
            stream.pid,
            PtySize {
                cols: 100,
                rows: 40,
            },
        )
        .await
        .expect_err("resize of a process without a pty");
    assert!(
        matches!(err, wrenn_core::guest::AgentError::InvalidArgument(_)),
        "{err:?}"
    );
    agent.signal(stream.pid, true).await.expect("kill sleep");
}
