//! `wrenn template build FILE`: sends a recipe file (and the files its `COPY` steps
//! name) to a control plane, then follows the build with a progress bar and its log.

use anyhow::{bail, Context, Result};
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::{json, Value};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

#[derive(Debug, clap::Args)]
pub struct BuildArgs {
    /// The recipe file: `FROM <template>`, steps (RUN, ENV, WORKDIR, USER, COPY, START)
    /// and an optional `HEALTHCHECK`. `COPY` sources are relative to its directory.
    pub file: PathBuf,
    /// Name of the template it makes (replaced if the team has one).
    #[arg(long)]
    pub name: String,
    /// The control plane.
    #[arg(long, env = "WRENN_BASE_URL", default_value = "http://127.0.0.1:8080")]
    pub url: String,
    /// An API key of the team the template is for.
    #[arg(
        long,
        env = "WRENN_API_KEY",
        hide_env_values = true,
        required_unless_present = "token"
    )]
    pub api_key: Option<String>,
    /// A user token (`POST /v1/auth/login`) instead of an API key; `--platform` needs
    /// a platform admin's.
    #[arg(long, env = "WRENN_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// Build a platform template (`POST /v1/admin/builds`): every team may create
    /// capsules from it.
    #[arg(long, requires = "token")]
    pub platform: bool,
    /// vCPUs of the build's capsule.
    #[arg(long)]
    pub vcpus: Option<u32>,
    /// Memory of the build's capsule, in MiB.
    #[arg(long)]
    pub memory: Option<u32>,
    /// Time limit of the whole build, in seconds.
    #[arg(long)]
    pub timeout: Option<u32>,
    /// Skip the pre-build (package index update) and post-build (cleanup) phases.
    #[arg(long)]
    pub skip_pre_post: bool,
    /// Print the build's id and return once it is queued.
    #[arg(long)]
    pub no_wait: bool,
    /// Save the disk only (flattened, sparse; capsules boot it fresh) instead of a
    /// memory snapshot. Recipes with `START` or `HEALTHCHECK` need the snapshot.
    #[arg(long)]
    pub disk_only: bool,
    /// Username for the registry of a `FROM` container image.
    #[arg(long, env = "WRENN_REGISTRY_USERNAME", requires = "registry_password")]
    pub registry_username: Option<String>,
    /// Password (or token) for the registry of a `FROM` container image.
    #[arg(
        long,
        env = "WRENN_REGISTRY_PASSWORD",
        hide_env_values = true,
        requires = "registry_username"
    )]
    pub registry_password: Option<String>,
}

/// The files `COPY` steps name, as a tar.gz of paths relative to `dir`.
fn archive(dir: &Path, steps: &[wrenn_recipe::Step]) -> Result<Option<Vec<u8>>> {
    let mut sources = Vec::new();
    for step in steps {
        if let wrenn_recipe::Step::Copy { srcs, .. } = step {
            sources.extend(srcs.iter().cloned());
        }
    }
    if sources.is_empty() {
        return Ok(None);
    }
    let gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    let mut tar = tar::Builder::new(gz);
    tar.follow_symlinks(true);
    for src in sources {
        let rel = src.trim_end_matches('/');
        let path = dir.join(rel);
        let meta = std::fs::metadata(&path)
            .with_context(|| format!("COPY {src}: {} not found", path.display()))?;
        if meta.is_dir() {
            tar.append_dir_all(rel, &path)
                .with_context(|| format!("archiving {}", path.display()))?;
        } else {
            tar.append_path_with_name(&path, rel)
                .with_context(|| format!("archiving {}", path.display()))?;
        }
    }
    Ok(Some(tar.into_inner()?.finish()?))
}

/// A multipart/form-data body of a `config` field and an optional `archive` file.
fn multipart(config: &str, archive: Option<&[u8]>) -> (String, Vec<u8>) {
    let boundary = format!("wrenn-{:032x}", rand::random::<u128>());
    let mut body = Vec::new();
    let _ = write!(
        body,
        "--{boundary}\r\nContent-Disposition: form-data; name=\"config\"\r\n\
         Content-Type: application/json\r\n\r\n{config}\r\n"
    );
    if let Some(data) = archive {
        let _ = write!(
            body,
            "--{boundary}\r\nContent-Disposition: form-data; name=\"archive\"; \
             filename=\"files.tar.gz\"\r\nContent-Type: application/gzip\r\n\r\n"
        );
        body.extend_from_slice(data);
        body.extend_from_slice(b"\r\n");
    }
    let _ = write!(body, "--{boundary}--\r\n");
    (format!("multipart/form-data; boundary={boundary}"), body)
}

/// The API's message of an error answer.
fn api_error(e: ureq::Error) -> anyhow::Error {
    match e {
        ureq::Error::Status(code, r) => {
            let body: Value = r.into_json().unwrap_or(Value::Null);
            let msg = body["error"]["message"]
                .as_str()
                .unwrap_or("(no message)")
                .to_string();
            anyhow::anyhow!("{code}: {msg}")
        }
        other => anyhow::anyhow!(other),
    }
}

/// The request with the caller's credentials: the token if given, else the API key.
fn authed(req: ureq::Request, args: &BuildArgs) -> ureq::Request {
    match (&args.token, &args.api_key) {
        (Some(token), _) => req.set("Authorization", &format!("Bearer {token}")),
        (None, Some(key)) => req.set("X-API-Key", key),
        (None, None) => req,
    }
}

/// Runs the command; returns the exit code (0 when the template was built).
pub fn build(args: BuildArgs) -> Result<u8> {
    let text = std::fs::read_to_string(&args.file)
        .with_context(|| format!("reading {}", args.file.display()))?;
    let recipe = wrenn_recipe::parse_file(&text)
        .map_err(|e| anyhow::anyhow!("{}: {e}", args.file.display()))?;
    let dir = args
        .file
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let files = archive(dir, &recipe.steps)?;
    let mut config = json!({
        "name": args.name,
        "recipe": recipe.lines,
        "skip_pre_post": args.skip_pre_post,
    });
    match &recipe.base {
        Some(base) if wrenn_recipe::is_image_reference(base) => {
            config["base_image"] = json!(base);
        }
        Some(base) => config["base_template"] = json!(base),
        None => {}
    }
    if args.disk_only {
        config["result"] = json!("disk");
    }
    if let (Some(username), Some(password)) = (&args.registry_username, &args.registry_password) {
        config["registry"] = json!({"username": username, "password": password});
    }
    if let Some(hc) = &recipe.healthcheck_line {
        config["healthcheck"] = json!(hc);
    }
    for (key, v) in [
        ("vcpus", args.vcpus),
        ("memory_mb", args.memory),
        ("timeout_sec", args.timeout),
    ] {
        if let Some(v) = v {
            config[key] = json!(v);
        }
    }
    let base = args.url.trim_end_matches('/');
    let agent = ureq::AgentBuilder::new()
        .timeout(Duration::from_secs(120))
        .build();
    let (content_type, body) = multipart(&config.to_string(), files.as_deref());
    let route = if args.platform {
        "v1/admin/builds"
    } else {
        "v1/builds"
    };
    let queued: Value = authed(agent.post(&format!("{base}/{route}")), &args)
        .set("Content-Type", &content_type)
        .send_bytes(&body)
        .map_err(api_error)
        .context("queueing the build")?
        .into_json()?;
    let id = queued["id"]
        .as_str()
        .context("the answer has no build id")?
        .to_string();
    if args.no_wait {
        println!("{id}");
        return Ok(0);
    }
    eprintln!("build {id} queued");
    let total = queued["total_steps"].as_u64().unwrap_or(0);
    let bar = ProgressBar::new(total);
    bar.set_style(
        ProgressStyle::with_template(
            "{spinner} [{elapsed_precise}] {bar:30} {pos}/{len} steps {msg}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    bar.enable_steady_tick(Duration::from_millis(200));
    let mut offset = 0u64;
    loop {
        let page: Value = authed(agent.get(&format!("{base}/v1/builds/{id}/logs")), &args)
            .query("offset", &offset.to_string())
            .call()
            .map_err(api_error)
            .context("reading the build's log")?
            .into_json()?;
        let lines = page["logs"].as_array().cloned().unwrap_or_default();
        for l in &lines {
            let line = l["line"].as_str().unwrap_or_default();
            // Printed around the bar (which is hidden when stderr is no terminal).
            let prefix = if l["stream"] == "system" {
                "==>"
            } else {
                "   "
            };
            bar.suspend(|| println!("{prefix} {line}"));
        }
        offset = page["next_offset"].as_u64().unwrap_or(offset);
        let status = page["status"].as_str().unwrap_or_default().to_string();
        if matches!(status.as_str(), "success" | "failed" | "cancelled") && lines.is_empty() {
            let b: Value = authed(agent.get(&format!("{base}/v1/builds/{id}")), &args)
                .call()
                .map_err(api_error)?
                .into_json()?;
            bar.set_position(b["current_step"].as_u64().unwrap_or(0));
            bar.finish_and_clear();
            return match status.as_str() {
                "success" => {
                    println!("template {} built (build {id})", args.name);
                    Ok(0)
                }
                other => {
                    let err = b["error"].as_str().unwrap_or("no reason given");
                    bail!("build {id} {other}: {err}")
                }
            };
        }
        if let Some(step) = lines.last().and_then(|l| l["step"].as_u64()) {
            bar.set_position(step.saturating_sub(1).min(total));
        }
        bar.set_message(status);
        if lines.is_empty() {
            std::thread::sleep(Duration::from_millis(500));
        }
    }
}
