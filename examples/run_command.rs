//! The library without a server: a capsule from the `minimal` template, one
//! command, its output, and the capsule destroyed.
//!
//! As root, once `./scripts/setup.sh` has built the images:
//!
//! ```sh
//! cargo run --example run_command
//! ```

use anyhow::{Context, Result};
use wrenn::{CreateOptions, ExecRequest, Host, HostOptions};

#[tokio::main]
async fn main() -> Result<()> {
    // Probes the acceleration (KVM or TCG), jails and confines every VMM, sweeps
    // what a crashed process left behind.
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
    println!("capsule {} running ({})", info.id, info.accel);
    let out = capsules
        .run(
            &info.id,
            &ExecRequest {
                cmd: "/bin/sh".into(),
                args: vec!["-c".into(), "echo hello from $(uname -n); exit 3".into()],
                ..Default::default()
            },
            None,
        )
        .await;
    // Destroyed whatever the command did.
    capsules.destroy(&info.id).await?;
    let out = out?;
    print!("{}", String::from_utf8_lossy(&out.stdout));
    println!("exit code {}", out.exit.code);
    anyhow::ensure!(out.exit.code == 3, "unexpected exit: {}", out.exit.status);
    Ok(())
}
