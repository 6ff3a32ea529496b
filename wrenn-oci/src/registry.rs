//! Reading images from an OCI registry (the distribution protocol is `oci-client`'s).

use crate::ImageError;
use oci_client::client::{ClientConfig, ClientProtocol};
use oci_client::manifest::{OciImageManifest, OciManifest};
use oci_client::secrets::RegistryAuth;
use oci_client::Reference;
use serde::{Deserialize, Serialize};
use std::path::Path;
use std::time::Duration;

/// The platform capsules run: images are taken for it only.
pub const OS: &str = "linux";
pub const ARCH: &str = "amd64";

/// Credentials of a registry (HTTP basic, or a token service that takes them).
#[derive(Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Credentials {
    pub username: String,
    pub password: String,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials")
            .field("username", &self.username)
            .field("password", &"<redacted>")
            .finish()
    }
}

/// Where images may come from.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PullPolicy {
    /// Registries at loopback, private and link-local addresses are allowed (else
    /// only the public internet's). Registries on loopback speak plain HTTP, as
    /// container engines treat them.
    pub allow_private: bool,
}

/// An image's configuration as a capsule uses it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageConfig {
    pub architecture: String,
    pub os: String,
    /// `KEY=value` pairs.
    #[serde(default)]
    pub env: Vec<String>,
    #[serde(default)]
    pub working_dir: String,
    #[serde(default)]
    pub user: String,
}

/// An image found in its registry: what the pull needs.
#[derive(Clone, Debug)]
pub struct Inspected {
    pub reference: Reference,
    /// Digest of the platform's image manifest.
    pub digest: String,
    pub manifest: OciImageManifest,
    pub config: ImageConfig,
    /// Bytes of the layers as stored (compressed).
    pub layer_bytes: u64,
}

/// The `config` blob's fields this crate reads.
#[derive(Deserialize)]
struct RawConfig {
    #[serde(default)]
    architecture: String,
    #[serde(default)]
    os: String,
    #[serde(default)]
    config: Option<RawRunConfig>,
}

#[derive(Deserialize)]
struct RawRunConfig {
    #[serde(rename = "Env", default)]
    env: Option<Vec<String>>,
    #[serde(rename = "WorkingDir", default)]
    working_dir: Option<String>,
    #[serde(rename = "User", default)]
    user: Option<String>,
}

/// Parses an image reference (`registry/name:tag`, `name@sha256:…`; Docker Hub's
/// short names such as `python:3.12` as Docker reads them).
pub fn parse_reference(image: &str) -> Result<Reference, ImageError> {
    if image.is_empty() || image.len() > 512 || image.chars().any(char::is_whitespace) {
        return Err(ImageError::InvalidReference {
            image: image.to_string(),
            reason: "an image reference is one word of at most 512 characters".into(),
        });
    }
    image
        .parse::<Reference>()
        .map_err(|e| ImageError::InvalidReference {
            image: image.to_string(),
            reason: e.to_string(),
        })
}

/// The registry part of a reference without its port, for the address policy.
fn registry_host(registry: &str) -> (&str, u16) {
    if let Some(rest) = registry.strip_prefix('[') {
        if let Some((h, p)) = rest.split_once(']') {
            let port = p
                .strip_prefix(':')
                .and_then(|p| p.parse().ok())
                .unwrap_or(443);
            return (h, port);
        }
    }
    match registry.rsplit_once(':') {
        Some((h, p)) if !h.contains(':') => (h, p.parse().unwrap_or(443)),
        _ => (registry, 443),
    }
}

fn is_loopback_name(host: &str) -> bool {
    host == "localhost"
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// A registry client for one image, under a policy.
pub struct Registry {
    client: oci_client::Client,
    auth: RegistryAuth,
    reference: Reference,
}

impl std::fmt::Debug for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registry")
            .field("reference", &self.reference.whole())
            .finish_non_exhaustive()
    }
}

impl Registry {
    /// A client for `reference`'s registry, refused if the policy does not allow the
    /// registry's address.
    pub async fn connect(
        reference: &Reference,
        credentials: Option<&Credentials>,
        policy: PullPolicy,
    ) -> Result<Registry, ImageError> {
        // The TLS stack's crypto: the process's default if one is installed, else ring
        // (as the rest of Wrenn's TLS; the post-quantum key exchange only aws-lc-rs
        // offers is not needed to read a registry).
        #[allow(deprecated)]
        let _ = rustls::crypto::ring::default_provider().install_default();
        let registry = reference.resolve_registry().to_string();
        let (host, port) = registry_host(&registry);
        let addrs: Vec<std::net::SocketAddr> = tokio::net::lookup_host((host, port))
            .await
            .map_err(|e| ImageError::Unreachable {
                registry: registry.clone(),
                reason: format!("cannot resolve {host}: {e}"),
            })?
            .collect();
        if !policy.allow_private {
            if let Some(a) = addrs.iter().find(|a| !wrenn_core::addr::is_public(a.ip())) {
                return Err(ImageError::Refused {
                    registry,
                    reason: format!(
                        "it is at {}, not a public address (the server's operator can allow private registries)",
                        a.ip()
                    ),
                });
            }
        }
        let protocol = if is_loopback_name(host) {
            ClientProtocol::HttpsExcept(vec![registry.clone()])
        } else {
            ClientProtocol::Https
        };
        let config = ClientConfig {
            protocol,
            platform_resolver: None,
            connect_timeout: Some(Duration::from_secs(10)),
            read_timeout: Some(Duration::from_secs(60)),
            user_agent: concat!("wrenn/", env!("CARGO_PKG_VERSION")),
            ..Default::default()
        };
        let client = oci_client::Client::try_from(config).map_err(|e| ImageError::Registry {
            registry: registry.clone(),
            reason: e.to_string(),
        })?;
        let auth = match credentials {
            Some(c) => RegistryAuth::Basic(c.username.clone(), c.password.clone()),
            None => RegistryAuth::Anonymous,
        };
        Ok(Registry {
            client,
            auth,
            reference: reference.clone(),
        })
    }

    /// The image's manifest for this platform and its configuration.
    pub async fn inspect(&self) -> Result<Inspected, ImageError> {
        let (manifest, digest) = self
            .client
            .pull_manifest(&self.reference, &self.auth)
            .await
            .map_err(|e| self.error(e))?;
        let (manifest, digest) = match manifest {
            OciManifest::Image(m) => (m, digest),
            OciManifest::ImageIndex(index) => {
                let found = index.manifests.iter().find(|m| {
                    m.platform.as_ref().is_some_and(|p| {
                        p.os.to_string() == OS && p.architecture.to_string() == ARCH
                    })
                });
                let Some(entry) = found else {
                    let platforms: Vec<String> = index
                        .manifests
                        .iter()
                        .filter_map(|m| m.platform.as_ref())
                        .map(|p| format!("{}/{}", p.os, p.architecture))
                        .collect();
                    return Err(ImageError::Platform {
                        image: self.reference.whole(),
                        found: if platforms.is_empty() {
                            "no platform".into()
                        } else {
                            platforms.join(", ")
                        },
                    });
                };
                let by_digest = self.reference.clone_with_digest(entry.digest.clone());
                let (m, d) = self
                    .client
                    .pull_manifest(&by_digest, &self.auth)
                    .await
                    .map_err(|e| self.error(e))?;
                match m {
                    OciManifest::Image(m) => (m, d),
                    OciManifest::ImageIndex(_) => {
                        return Err(ImageError::Unsupported {
                            image: self.reference.whole(),
                            reason: "an image index names another index".into(),
                        })
                    }
                }
            }
        };
        let mut raw = Vec::new();
        self.client
            .pull_blob(&self.reference, &manifest.config, &mut raw)
            .await
            .map_err(|e| self.error(e))?;
        let parsed: RawConfig =
            serde_json::from_slice(&raw).map_err(|e| ImageError::Unsupported {
                image: self.reference.whole(),
                reason: format!("its configuration is not an image configuration: {e}"),
            })?;
        let run = parsed.config.unwrap_or(RawRunConfig {
            env: None,
            working_dir: None,
            user: None,
        });
        let config = ImageConfig {
            architecture: parsed.architecture,
            os: parsed.os,
            env: run.env.unwrap_or_default(),
            working_dir: run.working_dir.unwrap_or_default(),
            user: run.user.unwrap_or_default(),
        };
        if config.os != OS || config.architecture != ARCH {
            return Err(ImageError::Platform {
                image: self.reference.whole(),
                found: format!("{}/{}", config.os, config.architecture),
            });
        }
        for l in &manifest.layers {
            if crate::layer::Compression::of_media_type(&l.media_type).is_none() {
                return Err(ImageError::Unsupported {
                    image: self.reference.whole(),
                    reason: format!("layer {} has media type {}", l.digest, l.media_type),
                });
            }
        }
        let layer_bytes = manifest
            .layers
            .iter()
            .map(|l| u64::try_from(l.size).unwrap_or(0))
            .sum();
        Ok(Inspected {
            reference: self.reference.clone(),
            digest,
            manifest,
            config,
            layer_bytes,
        })
    }

    /// Downloads blob `desc` to `path` (its digest checked on the way).
    pub async fn fetch(
        &self,
        desc: &oci_client::manifest::OciDescriptor,
        path: &Path,
    ) -> Result<(), ImageError> {
        let mut file = tokio::fs::File::create(path)
            .await
            .map_err(|e| ImageError::Io(format!("creating {}: {e}", path.display())))?;
        self.client
            .pull_blob(&self.reference, desc, &mut file)
            .await
            .map_err(|e| self.error(e))?;
        use tokio::io::AsyncWriteExt;
        file.flush()
            .await
            .map_err(|e| ImageError::Io(format!("writing {}: {e}", path.display())))
    }

    /// A client error as this crate's, named by what went wrong for the user.
    fn error(&self, e: oci_client::errors::OciDistributionError) -> ImageError {
        use oci_client::errors::{OciDistributionError as E, OciErrorCode};
        let registry = self.reference.resolve_registry().to_string();
        let image = self.reference.whole();
        let denied = || match self.auth {
            RegistryAuth::Anonymous => ImageError::Unauthorized {
                registry: registry.clone(),
                reason: "the registry wants credentials (give a username and password)".into(),
            },
            _ => ImageError::Unauthorized {
                registry: registry.clone(),
                reason: "the registry refused the credentials".into(),
            },
        };
        match e {
            E::AuthenticationFailure(_) | E::UnauthorizedError { .. } => denied(),
            E::ImageManifestNotFoundError(_) => ImageError::NotFound { image },
            E::RegistryError { envelope, .. } => {
                let codes: Vec<&OciErrorCode> = envelope.errors.iter().map(|e| &e.code).collect();
                if codes.iter().any(|c| {
                    matches!(
                        c,
                        OciErrorCode::ManifestUnknown
                            | OciErrorCode::NameUnknown
                            | OciErrorCode::NotFound
                    )
                }) {
                    ImageError::NotFound { image }
                } else if codes
                    .iter()
                    .any(|c| matches!(c, OciErrorCode::Unauthorized | OciErrorCode::Denied))
                {
                    denied()
                } else {
                    ImageError::Registry {
                        registry,
                        reason: envelope
                            .errors
                            .iter()
                            .map(|e| format!("{:?}: {}", e.code, e.message))
                            .collect::<Vec<_>>()
                            .join("; "),
                    }
                }
            }
            E::ServerError {
                code: 401 | 403, ..
            } => denied(),
            E::ServerError { code: 404, .. } => ImageError::NotFound { image },
            E::RequestError(r) if r.is_connect() || r.is_timeout() => ImageError::Unreachable {
                registry,
                reason: std::error::Error::source(&r)
                    .map(|s| s.to_string())
                    .unwrap_or_else(|| r.to_string()),
            },
            E::DigestError(d) => ImageError::Registry {
                registry,
                reason: format!("a blob did not match its digest: {d}"),
            },
            other => ImageError::Registry {
                registry,
                reason: other.to_string(),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn references_and_registry_hosts() {
        let r = parse_reference("python:3.12").unwrap();
        assert_eq!(r.resolve_registry(), "index.docker.io");
        let r = parse_reference("127.0.0.1:5000/team/app:1").unwrap();
        assert_eq!(r.resolve_registry(), "127.0.0.1:5000");
        assert_eq!(registry_host("127.0.0.1:5000"), ("127.0.0.1", 5000));
        assert_eq!(registry_host("[::1]:5000"), ("::1", 5000));
        assert_eq!(registry_host("ghcr.io"), ("ghcr.io", 443));
        assert!(is_loopback_name("localhost") && is_loopback_name("::1"));
        assert!(!is_loopback_name("10.0.0.1"));
        for bad in ["", "a b", "UPPER/Case:1", "x@sha256:zz"] {
            assert!(parse_reference(bad).is_err(), "{bad}");
        }
    }

    #[tokio::test]
    async fn private_registries_need_the_operator() {
        let r = parse_reference("127.0.0.1:1/x:1").unwrap();
        let e = Registry::connect(&r, None, PullPolicy::default())
            .await
            .unwrap_err();
        assert!(matches!(e, ImageError::Refused { .. }), "{e}");
        // Allowed, nothing listens there: unreachable, named as such.
        let reg = Registry::connect(
            &r,
            None,
            PullPolicy {
                allow_private: true,
            },
        )
        .await
        .unwrap();
        let e = reg.inspect().await.unwrap_err();
        assert!(matches!(e, ImageError::Unreachable { .. }), "{e}");
    }
}
