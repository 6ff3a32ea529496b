//! Fork a running capsule: the children continue from the parent's state (its
//! memory and disk at the fork), then go their own ways.
//!
//! ```sh
//! cargo run --example fork     # as root, images built
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

async fn demo(
    capsules: &Arc<Capsules>,
    parent: &CapsuleId,
    made: &mut Vec<CapsuleId>,
) -> Result<()> {
    sh(capsules, parent, "echo from-the-parent > /tmp/state").await?;
    let children = capsules.fork(parent, 2).await?;
    made.extend(children.iter().map(|c| c.id.clone()));
    for (i, child) in children.iter().enumerate() {
        let seen = sh(
            capsules,
            &child.id,
            &format!("cat /tmp/state; echo child-{i} >> /tmp/state; cat /tmp/state"),
        )
        .await?;
        println!("{}:\n{seen}", child.id);
        ensure!(seen == format!("from-the-parent\nfrom-the-parent\nchild-{i}\n"));
    }
    let parent_state = sh(capsules, parent, "cat /tmp/state").await?;
    ensure!(
        parent_state == "from-the-parent\n",
        "the parent saw its children: {parent_state}"
    );
    Ok(())
}

#[tokio::main]
async fn main() -> Result<()> {
    let host = Host::local(HostOptions::default())
        .await
        .context("a local host over /var/lib/wrenn (run as root, images built)")?;
    let capsules = host.capsules();
    let parent = capsules
        .create(CreateOptions {
            template: Some("minimal".into()),
            ..Default::default()
        })
        .await?;
    let mut made = vec![parent.id.clone()];
    let result = demo(capsules, &parent.id, &mut made).await;
    for id in &made {
        capsules.destroy(id).await?;
    }
    result
}
