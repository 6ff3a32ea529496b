//! `wrenn image build`: kernel, guest binaries and template root filesystems,
//! by the scripts under `images/`, with a progress spinner per stage.

use anyhow::{bail, Context, Result};
use indicatif::{ProgressBar, ProgressStyle};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, BufReader};
use wrenn::DataDir;

/// The source tree holding `images/` and `scripts/` (`WRENN_SRC_DIR`, else where this binary was built from).
pub fn source_dir() -> PathBuf {
    std::env::var_os("WRENN_SRC_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            Path::new(env!("CARGO_MANIFEST_DIR"))
                .parent()
                .map(Path::to_path_buf)
                .unwrap_or_default()
        })
}

/// Runs one stage; its output lines drive the spinner and go to a log file.
/// Returns the last line the command printed on stdout.
pub(crate) async fn stage(
    title: &str,
    log: &Path,
    mut cmd: tokio::process::Command,
) -> Result<String> {
    let bar = ProgressBar::new_spinner();
    bar.set_style(
        ProgressStyle::with_template("{spinner} {prefix:.bold} [{elapsed}] {wide_msg}")
            .unwrap_or_else(|_| ProgressStyle::default_spinner()),
    );
    bar.set_prefix(title.to_string());
    bar.enable_steady_tick(Duration::from_millis(120));
    // Without a terminal the spinner is hidden: say what happens in plain lines instead.
    let plain = bar.is_hidden();
    if plain {
        eprintln!("==> {title}");
    }
    // The scripts print progress lines on stderr: often enough to drive the spinner
    // on a terminal, every 30 s in plain logs.
    if !plain {
        cmd.env("WRENN_PROGRESS_INTERVAL", "2");
    }
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .stdin(Stdio::null())
        .spawn()
        .with_context(|| format!("starting {title}"))?;
    let (Some(out), Some(err)) = (child.stdout.take(), child.stderr.take()) else {
        bail!("no pipes for {title}")
    };
    if let Some(dir) = log.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let mut logf = tokio::fs::File::create(log)
        .await
        .with_context(|| format!("creating {}", log.display()))?;
    let mut out_lines = BufReader::new(out).lines();
    let mut err_lines = BufReader::new(err).lines();
    let mut last_stdout = String::new();
    let (mut out_done, mut err_done) = (false, false);
    while !(out_done && err_done) {
        let line = tokio::select! {
            l = out_lines.next_line(), if !out_done => match l? {
                Some(l) => { last_stdout = l.clone(); l }
                None => { out_done = true; continue }
            },
            l = err_lines.next_line(), if !err_done => match l? {
                Some(l) => {
                    // Progress and stage lines of the scripts (`[tag hh:mm:ss] ...`).
                    if plain && l.starts_with('[') {
                        eprintln!("    {l}");
                    }
                    l
                }
                None => { err_done = true; continue }
            },
        };
        use tokio::io::AsyncWriteExt;
        logf.write_all(line.as_bytes()).await?;
        logf.write_all(b"\n").await?;
        if !line.trim().is_empty() {
            bar.set_message(line.chars().take(120).collect::<String>());
        }
    }
    let status = child.wait().await?;
    if !status.success() {
        bar.abandon_with_message(format!("failed ({status}); log: {}", log.display()));
        let text = std::fs::read_to_string(log).unwrap_or_default();
        let tail: Vec<&str> = text.lines().rev().take(25).collect();
        for l in tail.iter().rev() {
            eprintln!("  | {l}");
        }
        bail!("{title} failed; full log in {}", log.display());
    }
    bar.finish_with_message(format!("done ({})", last_stdout));
    if plain {
        eprintln!("    {title}: done ({last_stdout})");
    }
    Ok(last_stdout)
}

fn script(src: &Path, rel: &str, data: &DataDir) -> tokio::process::Command {
    let mut c = tokio::process::Command::new("bash");
    c.arg(src.join(rel))
        .current_dir(src)
        .env("WRENN_DATA_DIR", data.root());
    c
}

pub async fn build(data: &DataDir, templates: &[String]) -> Result<()> {
    let src = source_dir();
    if !src.join("images/build-kernel.sh").is_file() {
        bail!(
            "cannot find images/ under {} (set WRENN_SRC_DIR to the Wrenn source tree)",
            src.display()
        );
    }
    let templates: Vec<String> = if templates.is_empty() {
        ["minimal", "python", "base"]
            .iter()
            .chain(crate::recipe_templates::RECIPE_TEMPLATES)
            .map(|t| t.to_string())
            .collect()
    } else {
        templates.to_vec()
    };
    for t in &templates {
        wrenn::template::TemplateName::parse(t)?;
    }
    let logs = data.root().join("images/logs");

    let vmlinux = stage(
        "kernel",
        &logs.join("kernel.log"),
        script(&src, "images/build-kernel.sh", data),
    )
    .await?;
    let hash = Path::new(vmlinux.trim())
        .parent()
        .and_then(|p| p.file_name())
        .and_then(|n| n.to_str())
        .context("build-kernel.sh did not print the kernel path")?
        .to_string();
    std::fs::write(data.kernels().join("current"), format!("{hash}\n"))?;

    let mut guest = tokio::process::Command::new("bash");
    guest
        .arg(src.join("scripts/build-guest.sh"))
        .current_dir(&src);
    stage("envd + wrenn-init", &logs.join("guest.log"), guest).await?;

    let (recipes, templates): (Vec<String>, Vec<String>) = templates
        .into_iter()
        .partition(|t| crate::recipe_templates::is_recipe_template(t));
    for t in &templates {
        let mut c = script(&src, "images/build-rootfs.sh", data);
        c.arg(t);
        stage(
            &format!("template {t}"),
            &logs.join(format!("rootfs-{t}.log")),
            c,
        )
        .await?;
    }
    // Pre-booted snapshots: creating a capsule from these templates is a restore.
    let host = wrenn::Host::local(wrenn::HostOptions {
        data_dir: data.clone(),
        ..Default::default()
    })
    .await?;
    for t in &templates {
        let bar = ProgressBar::new_spinner();
        bar.set_prefix(format!("snapshot {t}"));
        bar.enable_steady_tick(Duration::from_millis(120));
        if bar.is_hidden() {
            eprintln!("==> snapshot {t}");
        }
        bar.set_message("booting");
        let caps = host.capsules();
        let opts = wrenn::CreateOptions {
            template: Some(t.clone()),
            cold_boot: true,
            ..Default::default()
        };
        let info = caps
            .create(opts)
            .await
            .map_err(|e| anyhow::anyhow!(wrenn::manager::error_chain(&e)))?;
        bar.set_message("saving");
        // The snapshot replaces the template's directory: what the image was built
        // from (`build.json`, which keys the recipe templates built on it) is kept.
        let stamp = std::fs::read(data.template_dir(t).join("build.json")).ok();
        let saved = caps.snapshot(&info.id, t, true).await;
        if let (Ok(_), Some(stamp)) = (&saved, stamp) {
            std::fs::write(data.template_dir(t).join("build.json"), stamp)?;
        }
        let destroyed = caps.destroy(&info.id).await;
        saved.map_err(|e| anyhow::anyhow!(wrenn::manager::error_chain(&e)))?;
        destroyed.map_err(|e| anyhow::anyhow!(wrenn::manager::error_chain(&e)))?;
        bar.finish_with_message(format!("done ({})", data.template_snapshot(t).display()));
        if bar.is_hidden() {
            eprintln!("    snapshot {t}: done");
        }
    }
    drop(host);
    // Recipe templates, by the template build system, from the ones just built.
    for t in &recipes {
        eprintln!("==> template {t} (a recipe build)");
        crate::recipe_templates::build(data, &src, t).await?;
    }
    println!("images ready under {}", data.root().display());
    Ok(())
}
