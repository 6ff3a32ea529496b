//! Platform templates built from a recipe (`images/recipes/<name>/recipe`) by the
//! template build system, as part of `wrenn image build`.
//!
//! The build runs on a control plane and host of this process, on a scratch data
//! directory (`<data>/.image-build/`) that links the real one's kernels and
//! templates, so it touches no capsule of a server using the data directory. It is
//! a platform build (`POST /v1/admin/builds`, followed as `wrenn template build
//! --platform` follows one); the template it saves is moved into `<data>/templates/`
//! with a `recipe.json` holding the hash of what it was built from, and rebuilt only
//! when that changes (the recipe directory, its wheelhouse, the base template's image,
//! the kernel).

use crate::images::stage;
use anyhow::{bail, Context, Result};
use serde_json::json;
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use wrenn::DataDir;

/// Templates built from recipes, after the root filesystem ones they start from.
pub const RECIPE_TEMPLATES: &[&str] = &["code-runner-beta"];

/// What a recipe template was built from, kept beside it.
const STAMP: &str = "recipe.json";
/// The build's capsule: sizes of the template's capsules.
const BUILD_VCPUS: u32 = 1;
const BUILD_MEMORY_MB: u32 = 1024;
/// Time limit of one recipe template's build.
const BUILD_TIMEOUT_SEC: u32 = 3600;

pub fn is_recipe_template(name: &str) -> bool {
    RECIPE_TEMPLATES.contains(&name)
}

/// Hash of the recipe directory's files (names and contents, sorted), plus `extra`.
fn key_of(dir: &Path, extra: &[String]) -> Result<String> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .with_context(|| format!("reading {}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_file())
        .collect();
    files.sort();
    let mut h = Sha256::new();
    for f in &files {
        h.update(f.file_name().unwrap_or_default().as_encoded_bytes());
        h.update([0]);
        h.update(std::fs::read(f).with_context(|| format!("reading {}", f.display()))?);
        h.update([0]);
    }
    for e in extra {
        h.update(e.as_bytes());
        h.update([0]);
    }
    Ok(h.finalize()
        .iter()
        .take(8)
        .map(|b| format!("{b:02x}"))
        .collect())
}

/// Builds recipe template `name` unless the one in `data` was built from the same
/// inputs.
pub async fn build(data: &DataDir, src: &Path, name: &str) -> Result<()> {
    let recipe_dir = src.join("images/recipes").join(name);
    let recipe_file = recipe_dir.join("recipe");
    let text = std::fs::read_to_string(&recipe_file)
        .with_context(|| format!("reading {}", recipe_file.display()))?;
    let recipe = wrenn_recipe::parse_file(&text)
        .map_err(|e| anyhow::anyhow!("{}: {e}", recipe_file.display()))?;
    let base = recipe
        .base
        .clone()
        .with_context(|| format!("{}: no FROM", recipe_file.display()))?;
    let base_stamp = data.template_dir(&base).join("build.json");
    let base_build = std::fs::read(&base_stamp).with_context(|| {
        format!(
            "{name} starts from template {base}, which is not built ({} is missing; \
             wrenn image build --template {base})",
            base_stamp.display()
        )
    })?;
    // What the base image was made from (not when: a rebuild of the same is the same).
    let base_build: serde_json::Value = serde_json::from_slice(&base_build)
        .with_context(|| format!("reading {}", base_stamp.display()))?;
    let base_build = ["template", "recipe", "envd_sha256", "init_sha256"]
        .map(|k| base_build[k].to_string())
        .join(" ");
    let logs = data.root().join("images/logs");
    // The packages a guest without a package index installs: fetched on the host.
    let wheels = if recipe_dir.join("requirements.txt").is_file() {
        let mut c = tokio::process::Command::new("bash");
        c.arg(src.join("images/build-wheelhouse.sh"))
            .arg(&recipe_dir)
            .current_dir(src)
            .env("WRENN_DATA_DIR", data.root());
        let out = stage(
            &format!("wheels for {name}"),
            &logs.join(format!("wheels-{name}.log")),
            c,
        )
        .await?;
        Some(PathBuf::from(out.trim()))
    } else {
        None
    };
    let kernel = data
        .kernel()
        .context("no guest kernel (wrenn image build builds it first)")?;
    let key = key_of(
        &recipe_dir,
        &[
            base,
            base_build,
            wheels
                .as_ref()
                .map(|w| w.display().to_string())
                .unwrap_or_default(),
            kernel.display().to_string(),
        ],
    )?;
    let dest = data.template_dir(name);
    let stamp: Option<serde_json::Value> = std::fs::read(dest.join(STAMP))
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok());
    if stamp.as_ref().and_then(|s| s["key"].as_str()) == Some(key.as_str())
        && dest.join("snapshot/meta.json").is_file()
    {
        eprintln!("    template {name}: cached ({})", dest.display());
        return Ok(());
    }

    let scratch = data.root().join(".image-build");
    if scratch.exists() {
        std::fs::remove_dir_all(&scratch)
            .with_context(|| format!("removing {}", scratch.display()))?;
    }
    let result = build_in(data, &scratch, &recipe_dir, wheels.as_deref(), name).await;
    let result = result.and_then(|built| {
        install(&built, &dest, &scratch)?;
        let stamp =
            json!({"key": key, "recipe": recipe.lines, "healthcheck": recipe.healthcheck_line});
        std::fs::write(dest.join(STAMP), serde_json::to_vec_pretty(&stamp)?)?;
        Ok(())
    });
    if let Err(e) = std::fs::remove_dir_all(&scratch) {
        tracing::warn!(dir = %scratch.display(), error = %e, "scratch directory not removed");
    }
    result?;
    eprintln!("    template {name}: done ({})", dest.display());
    Ok(())
}

/// Moves the built template `built` to `dest`, the old one (if any) out of the way
/// first, so `dest` is always a whole template.
fn install(built: &Path, dest: &Path, scratch: &Path) -> Result<()> {
    let old = scratch.join("replaced");
    if dest.exists() {
        std::fs::rename(dest, &old).with_context(|| format!("moving {} aside", dest.display()))?;
    }
    std::fs::rename(built, dest)
        .with_context(|| format!("moving {} to {}", built.display(), dest.display()))?;
    Ok(())
}

/// Runs the build on a control plane and host of this process over a scratch data
/// directory; returns the directory of the template it saved.
async fn build_in(
    data: &DataDir,
    scratch: &Path,
    recipe_dir: &Path,
    wheels: Option<&Path>,
    name: &str,
) -> Result<PathBuf> {
    // The build's files: the recipe directory, with `wheels/` the wheelhouse.
    let files = scratch.join("recipe");
    std::fs::create_dir_all(&files)?;
    for e in std::fs::read_dir(recipe_dir)?.flatten() {
        std::os::unix::fs::symlink(e.path(), files.join(e.file_name()))?;
    }
    if let Some(w) = wheels {
        std::os::unix::fs::symlink(w, files.join("wheels"))?;
    }
    // The scratch data directory: the real one's kernels and templates, linked.
    let root = scratch.join("data");
    std::fs::create_dir_all(root.join("templates"))?;
    std::os::unix::fs::symlink(data.root().join("images"), root.join("images"))?;
    for e in std::fs::read_dir(data.root().join("templates"))?.flatten() {
        let t = e.file_name();
        let t = t.to_string_lossy();
        if t != name && !t.starts_with("snap-") && e.path().join("rootfs.img").is_file() {
            std::os::unix::fs::symlink(e.path(), root.join("templates").join(&*t))?;
        }
    }

    let password = format!("{:032x}", rand::random::<u128>());
    let opts = wrenn_api::server::ServeOptions {
        listen: std::net::SocketAddr::from(([127, 0, 0, 1], 0)),
        data_dir: root.clone(),
        database_url: None,
        bootstrap_key: None,
        bootstrap_admin_password: Some(password.clone()),
        jwt_secret: None,
        adopt_data_dir: false,
        local_host: true,
        config: wrenn_api::ApiConfig {
            upload_limit: 4 << 30,
            builds: wrenn_api::builds::BuildConfig {
                workers: 1,
                ..Default::default()
            },
            ..Default::default()
        },
        monitor: Default::default(),
        host_dialer: None,
        host_cert_lifetime: wrenn_api::cluster::HOST_CERT_VALIDITY,
        discovery: None,
    };
    let control_plane = wrenn_api::server::ControlPlane::open(opts)
        .await
        .context("control plane of the build")?;
    let host = wrenn::Host::local(wrenn::HostOptions {
        data_dir: DataDir::new(&root),
        ..Default::default()
    })
    .await
    .context("host of the build")?;
    let agent = Arc::new(wrenn_agent::LocalAgent::new(
        host,
        wrenn_agent::LocalAgentOptions {
            host_id: wrenn::scheduler::HostId(wrenn_agent::LOCAL_HOST.to_string()),
            ..Default::default()
        },
    ));
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let (addr_tx, addr_rx) = tokio::sync::oneshot::channel();
    let agents: Vec<(Arc<dyn wrenn_api::agent::HostAgent>, Option<String>)> =
        vec![(agent.clone(), None)];
    let server = tokio::spawn(control_plane.serve(
        agents,
        async {
            let _ = stop_rx.await;
        },
        move |addr, _| {
            let _ = addr_tx.send(addr);
        },
    ));
    let built = async {
        let addr = tokio::time::timeout(Duration::from_secs(60), addr_rx)
            .await
            .context("the build's control plane did not start")?
            .context("the build's control plane stopped")?;
        let url = format!("http://{addr}");
        let args = crate::template::BuildArgs {
            file: files.join("recipe"),
            name: name.to_string(),
            url: url.clone(),
            api_key: None,
            token: None,
            platform: true,
            vcpus: Some(BUILD_VCPUS),
            memory: Some(BUILD_MEMORY_MB),
            timeout: Some(BUILD_TIMEOUT_SEC),
            // No package manager runs in these recipes, and the guest has no index.
            skip_pre_post: true,
            no_wait: false,
            disk_only: false,
            registry_username: None,
            registry_password: None,
        };
        tokio::task::spawn_blocking(move || -> Result<u8> {
            let login: serde_json::Value = ureq::post(&format!("{url}/v1/auth/login"))
                .send_json(json!({"email": "admin@wrenn.local", "password": password}))
                .context("logging in to the build's control plane")?
                .into_json()?;
            let token = login["token"]
                .as_str()
                .context("the login answer has no token")?;
            crate::template::build(crate::template::BuildArgs {
                token: Some(token.to_string()),
                ..args
            })
        })
        .await
        .context("the build's client")??;
        Ok::<_, anyhow::Error>(())
    }
    .await;
    let _ = stop_tx.send(());
    match server.await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => tracing::warn!(error = %e, "the build's control plane"),
        Err(e) => tracing::warn!(error = %e, "the build's control plane"),
    }
    for (id, e) in agent.shutdown().await {
        tracing::warn!(capsule = %id, error = %e, "capsule of the build not stopped");
    }
    built?;
    let dir = root.join("templates").join(name);
    if !dir.join("snapshot/meta.json").is_file() {
        bail!(
            "the build succeeded but saved no template at {}",
            dir.display()
        );
    }
    Ok(dir)
}
