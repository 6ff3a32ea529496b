//! Container images as capsule root filesystems.
//!
//! [`Importer::import`] pulls an image from an OCI registry (for `linux/amd64`),
//! applies its layers with their whiteouts ([`layer`]), adds Wrenn's init, envd and
//! `user` account ([`rootfs`]) and makes an ext4 image of the tree: a host template
//! `img-<key>/` that a capsule cold-boots. The key is a hash of the image manifest's
//! digest and the guest binaries, so an image is imported once per host and again
//! only when it or the guest side changes.

pub mod layer;
pub mod registry;
pub mod rootfs;

pub use registry::{parse_reference, Credentials, ImageConfig, PullPolicy};
pub use rootfs::GuestBinaries;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Instant;

/// Prefix of the host templates made from images.
pub const TEMPLATE_PREFIX: &str = "img-";
/// File of an image template describing where it came from.
pub const IMAGE_META: &str = "image.json";
/// Prefix of an import's scratch directory under the templates directory
/// (`.img-<pid>-<random>`).
const STAGING_PREFIX: &str = ".img-";

/// Why an image cannot be used. Every variant but [`ImageError::Io`] and
/// [`ImageError::Guest`] is the request's problem.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error("image {image}: {reason}")]
    InvalidReference { image: String, reason: String },
    #[error("registry {registry} is not allowed: {reason}")]
    Refused { registry: String, reason: String },
    #[error("registry {registry} is unreachable: {reason}")]
    Unreachable { registry: String, reason: String },
    #[error("registry {registry}: {reason}")]
    Unauthorized { registry: String, reason: String },
    #[error("image {image} was not found in its registry")]
    NotFound { image: String },
    #[error("image {image} is for {found}; capsules run linux/amd64")]
    Platform { image: String, found: String },
    #[error("image {image} cannot be used: {reason}")]
    Unsupported { image: String, reason: String },
    #[error("registry {registry} failed: {reason}")]
    Registry { registry: String, reason: String },
    #[error("this host has no guest binaries to add: {0}")]
    Guest(String),
    #[error("{0}")]
    Io(String),
}

impl ImageError {
    /// Whether the request is at fault (a bad, unreachable or refused image), as
    /// opposed to this host.
    pub fn is_request_error(&self) -> bool {
        !matches!(self, ImageError::Io(_) | ImageError::Guest(_))
    }
}

fn io_err(what: impl std::fmt::Display) -> impl FnOnce(std::io::Error) -> ImageError {
    move |e| ImageError::Io(format!("{what}: {e}"))
}

/// An image to use.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct ImageRequest {
    /// The reference, e.g. `registry.example.com/team/app:1.2`.
    pub image: String,
    pub credentials: Option<Credentials>,
    pub policy: PullPolicy,
}

/// An image found in its registry.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageSummary {
    /// The reference in full (registry, repository, tag or digest).
    pub image: String,
    /// Digest of the `linux/amd64` image manifest.
    pub digest: String,
    pub config: ImageConfig,
    pub layers: usize,
    /// Bytes of the layers as stored (compressed).
    pub layer_bytes: u64,
}

/// An image imported as a host template.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Imported {
    /// The host template's name (`img-<key>`).
    pub template: String,
    pub summary: ImageSummary,
    /// The template was there already.
    pub cached: bool,
    /// Bytes of the layers' tar streams, uncompressed.
    pub unpacked_bytes: u64,
    pub pull_secs: f64,
    /// Applying the layers to the tree.
    pub unpack_secs: f64,
    /// The guest side added and the ext4 image made.
    pub image_secs: f64,
}

/// Imports images into a host's templates directory.
#[derive(Debug)]
pub struct Importer {
    templates: PathBuf,
    /// One import of a template at a time; others wait for it and find it done.
    busy: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
}

impl Importer {
    /// An importer writing to `templates` (scratch directories of imports whose
    /// process is gone are removed).
    pub fn new(templates: PathBuf) -> Self {
        if let Ok(rd) = std::fs::read_dir(&templates) {
            for e in rd.flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                let writer = name
                    .strip_prefix(STAGING_PREFIX)
                    .and_then(|rest| rest.split_once('-'))
                    .and_then(|(pid, _)| pid.parse::<u32>().ok());
                if writer.is_some_and(|pid| !wrenn_core::process::runs(pid)) {
                    tracing::info!(dir = %e.path().display(), "removing an unfinished image import");
                    let _ = std::fs::remove_dir_all(e.path());
                }
            }
        }
        Importer {
            templates,
            busy: Mutex::new(HashMap::new()),
        }
    }

    /// Finds the image in its registry (manifest and configuration only).
    pub async fn inspect(&self, req: &ImageRequest) -> Result<ImageSummary, ImageError> {
        let reference = parse_reference(&req.image)?;
        let reg =
            registry::Registry::connect(&reference, req.credentials.as_ref(), req.policy).await?;
        Ok(summary(&reg.inspect().await?))
    }

    /// Imports the image, with the guest binaries found in `guest_source` (the ext4
    /// root image of a built-in template).
    pub async fn import(
        &self,
        req: &ImageRequest,
        guest_source: &Path,
    ) -> Result<Imported, ImageError> {
        let reference = parse_reference(&req.image)?;
        let reg =
            registry::Registry::connect(&reference, req.credentials.as_ref(), req.policy).await?;
        let inspected = reg.inspect().await?;
        let summary = summary(&inspected);
        let staging = self.templates.join(format!(
            "{STAGING_PREFIX}{}-{}",
            std::process::id(),
            wrenn_core::id::random_token()
        ));
        std::fs::create_dir_all(&staging)
            .map_err(io_err(format!("creating {}", staging.display())))?;
        let result = self
            .import_in(&reg, &inspected, summary, guest_source, &staging)
            .await;
        let _ = tokio::fs::remove_dir_all(&staging).await;
        result
    }

    async fn import_in(
        &self,
        reg: &registry::Registry,
        inspected: &registry::Inspected,
        summary: ImageSummary,
        guest_source: &Path,
        staging: &Path,
    ) -> Result<Imported, ImageError> {
        let guest = rootfs::extract_guest(guest_source, &staging.join("guest")).await?;
        let key = {
            let mut h = Sha256::new();
            h.update(inspected.digest.as_bytes());
            for p in [&guest.init, &guest.envd] {
                h.update(std::fs::read(p).map_err(io_err(format!("reading {}", p.display())))?);
            }
            hex::encode(h.finalize())
        };
        let name = format!("{TEMPLATE_PREFIX}{}", &key[..16]);
        let lock = self
            .busy
            .lock()
            .map_err(|_| ImageError::Io("image import lock poisoned".into()))?
            .entry(name.clone())
            .or_default()
            .clone();
        let _held = lock.lock().await;
        let dest = self.templates.join(&name);
        if let Ok(meta) = std::fs::read(dest.join(IMAGE_META)) {
            if let Ok(mut done) = serde_json::from_slice::<Imported>(&meta) {
                done.cached = true;
                done.summary = summary;
                return Ok(done);
            }
        }

        let started = Instant::now();
        let blobs = staging.join("blobs");
        std::fs::create_dir_all(&blobs).map_err(io_err("creating the blob directory"))?;
        let mut files = Vec::new();
        for (i, l) in inspected.manifest.layers.iter().enumerate() {
            let path = blobs.join(format!("{i}"));
            reg.fetch(l, &path).await?;
            let compression =
                layer::Compression::of_media_type(&l.media_type).ok_or_else(|| {
                    ImageError::Unsupported {
                        image: summary.image.clone(),
                        reason: format!("layer media type {}", l.media_type),
                    }
                })?;
            files.push((path, compression));
        }
        let pull_secs = started.elapsed().as_secs_f64();

        let started = Instant::now();
        let root = staging.join("root");
        let unpacked_bytes = {
            let root = root.clone();
            let image = summary.image.clone();
            tokio::task::spawn_blocking(move || apply_all(&root, &files, &image))
                .await
                .map_err(|e| ImageError::Io(format!("layer task: {e}")))??
        };
        let _ = std::fs::remove_dir_all(&blobs);
        let unpack_secs = started.elapsed().as_secs_f64();

        let started = Instant::now();
        let label = format!("{}@{}", summary.image, summary.digest);
        {
            let (root, guest) = (root.clone(), guest.clone());
            tokio::task::spawn_blocking(move || rootfs::finish(&root, &guest, &label))
                .await
                .map_err(|e| ImageError::Io(format!("rootfs task: {e}")))?
                .map_err(io_err("adding the guest side"))?;
        }
        let out = staging.join("template");
        std::fs::create_dir_all(&out).map_err(io_err("creating the template directory"))?;
        let size = rootfs::image_size(rootfs::tree_bytes(&root));
        rootfs::make_ext4(&root, &out.join(ROOTFS), size)
            .await
            .map_err(io_err("making the root image"))?;
        let done = Imported {
            template: name.clone(),
            summary,
            cached: false,
            unpacked_bytes,
            pull_secs,
            unpack_secs,
            image_secs: started.elapsed().as_secs_f64(),
        };
        let meta = serde_json::to_vec_pretty(&done).map_err(|e| ImageError::Io(e.to_string()))?;
        std::fs::write(out.join(IMAGE_META), meta).map_err(io_err("writing image.json"))?;
        std::fs::rename(&out, &dest)
            .map_err(io_err(format!("moving the template to {}", dest.display())))?;
        tracing::info!(
            template = %name, image = %done.summary.image, digest = %done.summary.digest,
            layers = done.summary.layers, unpacked_mib = unpacked_bytes >> 20,
            pull_s = pull_secs, unpack_s = unpack_secs, image_s = done.image_secs,
            "image imported"
        );
        Ok(done)
    }
}

/// File name of a template's root image (as built-in templates have it).
pub const ROOTFS: &str = "rootfs.img";

fn summary(i: &registry::Inspected) -> ImageSummary {
    ImageSummary {
        image: i.reference.whole(),
        digest: i.digest.clone(),
        config: i.config.clone(),
        layers: i.manifest.layers.len(),
        layer_bytes: i.layer_bytes,
    }
}

/// Applies the layer files to `root` in order; the bytes of their tar streams.
fn apply_all(
    root: &Path,
    files: &[(PathBuf, layer::Compression)],
    image: &str,
) -> Result<u64, ImageError> {
    std::fs::create_dir_all(root).map_err(io_err("creating the root"))?;
    let mut total = 0;
    for (i, (path, compression)) in files.iter().enumerate() {
        let f = std::fs::File::open(path).map_err(io_err(format!("opening {}", path.display())))?;
        let stats = layer::apply(
            std::io::BufReader::with_capacity(1 << 20, f),
            *compression,
            root,
        )
        .map_err(|e| {
            let what = format!("layer {} of {}: {e}", i + 1, files.len());
            // A full disk is this host's problem; anything else is the layer's.
            if e.kind() == std::io::ErrorKind::StorageFull {
                ImageError::Io(what)
            } else {
                ImageError::Unsupported {
                    image: image.to_string(),
                    reason: what,
                }
            }
        })?;
        total += stats.tar_bytes;
    }
    Ok(total)
}
