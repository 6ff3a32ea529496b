//! Pause a capsule to a memory snapshot and resume it where it was: a file it
//! wrote and a process it started are both still there.
//!
//! ```sh
//! cargo run --example pause_resume     # as root, images built
//! ```

use anyhow::{ensure, Context, Result};
use std::sync::Arc;
use wrenn::{CapsuleId, Capsules, CreateOptions, ExecRequest, Host, HostOptions};

async fn sh(capsules: &Arc<Capsules>, id: &CapsuleId, script: &str) -> Result<String> {
    let out = capsules
        .run(
            id,
            &ExecRequest {
                cmd: "/bin/sh".into(),
                args: vec!["-c".into(), script.into()],
                ..Default::default()
            },
            None,
        )
        .await?;
    ensure!(out.exit.code == 0, "{script}: {}", out.exit.status);
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

async fn demo(capsules: &Arc<Capsules>, id: &CapsuleId) -> Result<()> {
    sh(capsules, id, "echo remembered > /tmp/note; (sleep 1000 &)").await?;
    let paused = capsules.pause(id).await?;
    println!(
        "paused: {} bytes of memory written, {} of device state",
        paused.memory_bytes_written, paused.device_state_bytes
    );
    let resumed = capsules.resume(id).await?;
    println!("resumed: {:?}", resumed.status);
    let note = sh(capsules, id, "cat /tmp/note").await?;
    let sleeper = sh(
        capsules,
        id,
        "pgrep -f 'sleep 1000' >/dev/null && echo alive",
    )
    .await?;
    print!("{note}{sleeper}");
    ensure!(note == "remembered\n" && sleeper == "alive\n");
    Ok(())
}

#[tokio::main]
async fn main() -> Result<()> {
    let host = Host::local(HostOptions::default())
        .await
        .context("a local host over /var/lib/wrenn (run as root, images built)")?;
    let capsules = host.capsules();
    let info = capsules
        .create(CreateOptions {
            template: Some("minimal".into()),
            ..Default::default()
        })
        .await?;
    let result = demo(capsules, &info.id).await;
    capsules.destroy(&info.id).await?;
    result
}
