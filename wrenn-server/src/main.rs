//! `wrenn`: build guest images, run capsules from the command line, check the host.

mod agent;
mod discovery;
mod doctor;
mod host_args;
mod images;
mod recipe_templates;
mod serve;
mod template;

use anyhow::{bail, Context, Result};
use bytes::Bytes;
use clap::{Parser, Subcommand};
use std::collections::HashMap;
use std::io::Write;
use std::time::Duration;
use tokio::io::AsyncReadExt;
use wrenn::{CapsuleId, CreateOptions, DataDir, ExecEvent, ExecRequest, Host, HostOptions};

#[derive(Debug, Parser)]
#[command(
    name = "wrenn",
    version,
    about = "Wrenn: capsules (microVMs) that run untrusted code"
)]
struct Cli {
    /// Data directory (images, templates, capsules).
    #[arg(long, global = true, env = "WRENN_DATA_DIR", default_value = wrenn::paths::DEFAULT_DATA_DIR)]
    data_dir: std::path::PathBuf,
    /// Log filter (e.g. info, debug, wrenn=debug); default `info` for `serve`, else `warn`.
    #[arg(long, global = true, env = "WRENN_LOG")]
    log: Option<String>,
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Build guest images.
    Image {
        #[command(subcommand)]
        command: ImageCmd,
    },
    /// Template builds on a control plane.
    Template {
        #[command(subcommand)]
        command: TemplateCmd,
    },
    /// Create a capsule, run one command in it, stream its output, destroy it,
    /// and exit with the command's exit code.
    Run(RunArgs),
    /// Resume a paused capsule, run a command in it (optional), and pause it again.
    Resume {
        id: String,
        #[command(flatten)]
        exec: ExecArgs,
    },
    /// Save a paused capsule as snapshot template NAME (it stays paused).
    Snapshot {
        id: String,
        name: String,
        /// Replace an existing template of that name.
        #[arg(long)]
        overwrite: bool,
    },
    /// Fork a paused capsule into N capsules, run a command in each (optional),
    /// print their ids, and pause them all.
    Fork {
        id: String,
        #[arg(short = 'n', long, default_value_t = 1)]
        count: usize,
        #[command(flatten)]
        exec: ExecArgs,
    },
    /// Run the control plane (REST API, E2B-compatible API, proxy) with this host's
    /// capsules.
    Serve(Box<serve::ServeArgs>),
    /// Run this host's capsules behind a gRPC endpoint for a control plane
    /// (`wrenn serve --agent http://ADDR`).
    Agent(Box<agent::AgentArgs>),
    /// Check this host: acceleration, QEMU, images, permissions.
    Doctor,
    /// List capsules recorded in the data directory.
    Ps,
    /// Remove capsules left behind by crashed processes, or destroy the given
    /// (paused or orphaned) capsules.
    Rm {
        /// Capsule ids; without any, every capsule whose owner process is gone
        /// (paused capsules are kept).
        ids: Vec<String>,
    },
}

#[derive(Debug, Subcommand)]
enum ImageCmd {
    /// Build the kernel (cached by input hash), the guest binaries and template root filesystems.
    Build {
        /// Template(s) to build; default: minimal, python, base and the recipe templates
        /// (code-runner-beta).
        #[arg(long = "template")]
        templates: Vec<String>,
    },
}

#[derive(Debug, Subcommand)]
enum TemplateCmd {
    /// Build a template from a recipe file on a control plane (`wrenn serve`),
    /// following its progress and log; exits non-zero if the build fails.
    Build(template::BuildArgs),
}

#[derive(Debug, clap::Args)]
struct ExecArgs {
    /// Guest user (default `user`; `root` for root).
    #[arg(long)]
    user: Option<String>,
    /// The command and its arguments.
    #[arg(last = true)]
    command: Vec<String>,
}

#[derive(Debug, clap::Args)]
struct RunArgs {
    #[arg(long, default_value = "minimal")]
    template: String,
    #[arg(long)]
    vcpus: Option<u32>,
    /// Memory in MiB.
    #[arg(long)]
    memory: Option<u32>,
    /// Disk size in MB.
    #[arg(long)]
    disk: Option<u64>,
    /// Environment variable for the command (repeatable).
    #[arg(long = "env", short = 'e', value_parser = parse_env)]
    envs: Vec<(String, String)>,
    /// Working directory in the guest.
    #[arg(long)]
    cwd: Option<String>,
    /// Guest user (default `user`; `root` for root).
    #[arg(long)]
    user: Option<String>,
    /// Kill the command after this many seconds.
    #[arg(long)]
    timeout: Option<u64>,
    /// Forward this process's stdin to the command.
    #[arg(long, short = 'i')]
    stdin: bool,
    /// Pause the capsule at the end instead of destroying it (prints its id).
    #[arg(long)]
    keep: bool,
    /// The command and its arguments.
    #[arg(last = true, required = true)]
    command: Vec<String>,
}

fn parse_env(s: &str) -> Result<(String, String), String> {
    s.split_once('=')
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .filter(|(k, _)| !k.is_empty())
        .ok_or_else(|| format!("expected KEY=VALUE, got {s:?}"))
}

fn main() -> std::process::ExitCode {
    // Everything Wrenn and the VMMs it starts create (disks, memory snapshots, logs,
    // sockets, the database) is the host's alone.
    nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o077));
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_new(cli.log.as_deref().unwrap_or(
                if matches!(cli.command, Cmd::Serve(_) | Cmd::Agent(_)) {
                    "info"
                } else {
                    "warn"
                },
            ))
            .unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("wrenn: cannot start the runtime: {e}");
            return std::process::ExitCode::from(1);
        }
    };
    match rt.block_on(dispatch(cli)) {
        Ok(code) => std::process::ExitCode::from(code),
        Err(e) => {
            eprintln!("wrenn: {e:#}");
            std::process::ExitCode::from(1)
        }
    }
}

async fn dispatch(cli: Cli) -> Result<u8> {
    let data = DataDir::new(&cli.data_dir);
    match cli.command {
        Cmd::Image {
            command: ImageCmd::Build { templates },
        } => images::build(&data, &templates).await.map(|_| 0),
        Cmd::Template {
            command: TemplateCmd::Build(args),
        } => tokio::task::spawn_blocking(move || template::build(args))
            .await
            .context("template build")?,
        Cmd::Run(args) => run(data, args).await,
        Cmd::Resume { id, exec } => resume(data, &id, exec).await,
        Cmd::Snapshot {
            id,
            name,
            overwrite,
        } => snapshot(data, &id, &name, overwrite).await.map(|_| 0),
        Cmd::Fork { id, count, exec } => fork(data, &id, count, exec).await,
        Cmd::Serve(args) => serve::serve(cli.data_dir.clone(), *args).await,
        Cmd::Agent(args) => agent::run(&cli.data_dir, *args).await,
        Cmd::Doctor => doctor::run(&data).await,
        Cmd::Ps => ps(&data).await.map(|_| 0),
        Cmd::Rm { ids } => rm(data, ids).await.map(|_| 0),
    }
}

async fn host(data: DataDir) -> Result<Host> {
    Host::local(HostOptions {
        data_dir: data,
        ..Default::default()
    })
    .await
    .context("setting up the local host")
}

async fn run(data: DataDir, args: RunArgs) -> Result<u8> {
    let host = host(data).await?;
    let caps = host.capsules().clone();
    tracing::info!(accel = %host.accel_probe().accel, "creating capsule");
    let opts = CreateOptions {
        template: Some(args.template.clone()),
        vcpus: args.vcpus,
        memory_mb: args.memory,
        disk_mb: args.disk,
        ..Default::default()
    };
    let info = caps
        .create(opts)
        .await
        .map_err(|e| anyhow::anyhow!(wrenn::manager::error_chain(&e)))?;
    let id = info.id.clone();
    let result = tokio::select! {
        r = run_command(&host, &id, &args) => r,
        _ = tokio::signal::ctrl_c() => {
            eprintln!("wrenn: interrupted; destroying capsule {id}");
            Ok(130)
        }
    };
    if args.keep {
        match caps.pause(&id).await {
            Ok(_) => eprintln!("wrenn: capsule {id} paused (resume with `wrenn resume {id}`)"),
            Err(e) => eprintln!(
                "wrenn: pausing capsule {id}: {}",
                wrenn::manager::error_chain(&e)
            ),
        }
    } else if let Err(e) = caps.destroy(&id).await {
        eprintln!(
            "wrenn: destroying capsule {id}: {}",
            wrenn::manager::error_chain(&e)
        );
    }
    result
}

fn chain(e: wrenn::CapsuleError) -> anyhow::Error {
    anyhow::anyhow!(wrenn::manager::error_chain(&e))
}

/// Runs `exec.command` (if any) in capsule `id`, streaming its output; returns its exit code.
async fn run_in(host: &Host, id: &CapsuleId, exec: &ExecArgs) -> Result<u8> {
    if exec.command.is_empty() {
        return Ok(0);
    }
    let args = RunArgs {
        template: String::new(),
        vcpus: None,
        memory: None,
        disk: None,
        envs: Vec::new(),
        cwd: None,
        user: exec.user.clone(),
        timeout: None,
        stdin: false,
        keep: false,
        command: exec.command.clone(),
    };
    run_command(host, id, &args).await
}

async fn resume(data: DataDir, raw: &str, exec: ExecArgs) -> Result<u8> {
    let id = CapsuleId::parse(raw)?;
    let host = host(data).await?;
    let caps = host.capsules();
    caps.resume(&id).await.map_err(chain)?;
    let code = run_in(&host, &id, &exec).await;
    caps.pause(&id).await.map_err(chain)?;
    code
}

async fn snapshot(data: DataDir, raw: &str, name: &str, overwrite: bool) -> Result<()> {
    let id = CapsuleId::parse(raw)?;
    let host = host(data).await?;
    let caps = host.capsules();
    caps.resume(&id).await.map_err(chain)?;
    let saved = caps.snapshot(&id, name, overwrite).await;
    caps.pause(&id).await.map_err(chain)?;
    saved.map_err(chain)?;
    println!("template {name} saved from {id}");
    Ok(())
}

async fn fork(data: DataDir, raw: &str, count: usize, exec: ExecArgs) -> Result<u8> {
    let id = CapsuleId::parse(raw)?;
    let host = host(data).await?;
    let caps = host.capsules();
    caps.resume(&id).await.map_err(chain)?;
    let children = caps.fork(&id, count).await;
    let mut code = 0;
    if let Ok(children) = &children {
        for c in children {
            println!("{}", c.id);
            code = code.max(run_in(&host, &c.id, &exec).await?);
            caps.pause(&c.id).await.map_err(chain)?;
        }
    }
    caps.pause(&id).await.map_err(chain)?;
    children.map_err(chain)?;
    Ok(code)
}

async fn run_command(host: &Host, id: &CapsuleId, args: &RunArgs) -> Result<u8> {
    let caps = host.capsules();
    let mut cmd = args.command.clone();
    let program = cmd.remove(0);
    let req = ExecRequest {
        cmd: program,
        args: cmd,
        envs: args.envs.iter().cloned().collect::<HashMap<_, _>>(),
        cwd: args.cwd.clone(),
        user: args.user.clone(),
        stdin: args.stdin,
        timeout: args.timeout.map(Duration::from_secs),
        tag: None,
        pty: None,
    };
    let mut stream = caps
        .exec(id, &req)
        .await
        .map_err(|e| anyhow::anyhow!(wrenn::manager::error_chain(&e)))?;
    if args.stdin {
        let agent = caps.agent(id).map_err(|e| anyhow::anyhow!(e.to_string()))?;
        let pid = stream.pid;
        tokio::spawn(async move {
            let mut input = tokio::io::stdin();
            let mut buf = vec![0u8; 64 * 1024];
            loop {
                match input.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        if agent
                            .send_stdin(pid, Bytes::copy_from_slice(&buf[..n]))
                            .await
                            .is_err()
                        {
                            return;
                        }
                    }
                }
            }
            let _ = agent.close_stdin(pid).await;
        });
    }
    while let Some(ev) = stream.events.recv().await {
        match ev.map_err(|e| anyhow::anyhow!(e.to_string()))? {
            ExecEvent::Started { .. } => {}
            ExecEvent::Stdout(b) => {
                let mut out = std::io::stdout().lock();
                out.write_all(&b)?;
                out.flush()?;
            }
            ExecEvent::Stderr(b) => {
                let mut err = std::io::stderr().lock();
                err.write_all(&b)?;
                err.flush()?;
            }
            ExecEvent::Exited(exit) => {
                return Ok(if exit.exited {
                    u8::try_from(exit.code.clamp(0, 255)).unwrap_or(1)
                } else {
                    137
                });
            }
        }
    }
    bail!("the command's output ended without an exit status")
}

async fn ps(data: &DataDir) -> Result<()> {
    use wrenn::record::StateStore;
    let store = wrenn::FsStateStore::new(data.clone());
    let records = store.list().await?;
    println!(
        "{:<30} {:<9} {:<10} {:>5} {:>7} {:<16} OWNER",
        "ID", "STATUS", "TEMPLATE", "VCPUS", "MEM_MB", "ADDRESS"
    );
    for (id, rec) in records {
        match rec {
            Some(r) => {
                let owner = if store.owner_alive(&r.owner) {
                    format!("pid {}", r.owner.pid)
                } else {
                    format!("pid {} (gone)", r.owner.pid)
                };
                let addr = r
                    .slot
                    .as_ref()
                    .map(|s| s.host_addr.to_string())
                    .unwrap_or_else(|| "-".into());
                println!(
                    "{:<30} {:<9} {:<10} {:>5} {:>7} {:<16} {}",
                    id.as_str(),
                    // A warm-pool entry of a running server: nobody's capsule yet.
                    if r.pooled { "pool" } else { r.status.as_str() },
                    r.spec.template.as_str(),
                    r.spec.vcpus,
                    r.spec.memory_mb,
                    addr,
                    owner
                );
            }
            None => println!("{:<30} {:<9} (unreadable state file)", id.as_str(), "?"),
        }
    }
    Ok(())
}

async fn rm(data: DataDir, ids: Vec<String>) -> Result<()> {
    use wrenn::record::StateStore;
    let store = wrenn::FsStateStore::new(data.clone());
    for raw in &ids {
        let id = CapsuleId::parse(raw)?;
        let rec = store.list().await?.into_iter().find(|(i, _)| *i == id);
        match rec {
            None => bail!("no capsule {id} in {}", data.capsules().display()),
            Some((_, Some(r))) if store.owner_alive(&r.owner) => {
                bail!(
                    "capsule {id} belongs to the running process {}; stop that process instead",
                    r.owner.pid
                )
            }
            _ => {}
        }
    }
    // The startup sweep removes everything whose owner is gone (and adopts paused capsules).
    let host = host(data).await?;
    for raw in &ids {
        let id = CapsuleId::parse(raw)?;
        match host.capsules().destroy(&id).await {
            Ok(()) => println!("destroyed {id}"),
            // Already removed by the sweep above.
            Err(wrenn::CapsuleError::NotFound { .. }) => {}
            Err(e) => return Err(chain(e)),
        }
    }
    let r = host.sweep_report();
    println!(
        "removed {} capsule(s), killed {} VMM process(es), removed {} network slot(s); kept {} capsule(s) of running processes and {} paused",
        r.removed_capsules, r.killed_vmms, r.removed_slots, r.kept, r.paused
    );
    Ok(())
}
