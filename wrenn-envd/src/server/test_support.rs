//! Fixtures of the permission tests: a tree with root-only and user-owned parts,
//! and an unprivileged account (Debian's `nobody`/`nogroup`, 65534:65534).

use super::{AppState, Config};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

/// The unprivileged account the tests act as.
pub const USER: &str = "nobody";
pub const UID: u32 = 65534;
pub const GID: u32 = 65534;

/// Whether the permission tests can run: they need root (to build the tree and to
/// switch identities) and the `nobody` account. Prints why when they cannot.
pub fn can_run() -> bool {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("skipped: needs root");
        return false;
    }
    match super::users::lookup_user(USER) {
        Some(u) if (u.uid, u.gid) == (UID, GID) => true,
        _ => {
            eprintln!("skipped: no {USER} account with {UID}:{GID}");
            false
        }
    }
}

/// Daemon state as the server builds it (default user root).
pub fn state() -> Arc<AppState> {
    AppState::new(Config {
        default_user: "root".into(),
        sync_clock: false,
        env_file: None,
    })
}

/// `(uid, gid)` of `path` itself (not following a symlink).
pub fn owner(path: &Path) -> (u32, u32) {
    let m = std::fs::symlink_metadata(path).unwrap();
    (m.uid(), m.gid())
}

/// A scratch tree under the temp dir, removed when dropped:
///
/// ```text
/// base/              root 0755
///   secret           root 0600  "top secret"
///   public.txt       root 0644  "hello"
///   rootonly/        root 0755  (user may enter, not write)
///   private/         root 0700  (user may not enter)
///     file           root 0644
///   userdir/         nobody 0755
///     link_new    -> base/rootonly/planted (does not exist)
///     link_secret -> base/secret
///     link_dir    -> base/rootonly
/// ```
#[derive(Debug)]
pub struct Tree {
    pub base: PathBuf,
}

impl Tree {
    pub fn new(tag: &str) -> Tree {
        static N: AtomicU32 = AtomicU32::new(0);
        let base = std::env::temp_dir().join(format!(
            "envd-perm-{tag}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&base);
        let t = Tree { base };
        let mode = |p: &Path, m: u32| {
            std::fs::set_permissions(p, std::fs::Permissions::from_mode(m)).unwrap()
        };
        std::fs::create_dir(&t.base).unwrap();
        mode(&t.base, 0o755);
        std::fs::write(t.p("secret"), b"top secret").unwrap();
        mode(&t.p("secret"), 0o600);
        std::fs::write(t.p("public.txt"), b"hello").unwrap();
        mode(&t.p("public.txt"), 0o644);
        std::fs::create_dir(t.p("rootonly")).unwrap();
        mode(&t.p("rootonly"), 0o755);
        std::fs::create_dir(t.p("private")).unwrap();
        mode(&t.p("private"), 0o700);
        std::fs::write(t.p("private/file"), b"x").unwrap();
        mode(&t.p("private/file"), 0o644);
        std::fs::create_dir(t.p("userdir")).unwrap();
        mode(&t.p("userdir"), 0o755);
        std::os::unix::fs::chown(t.p("userdir"), Some(UID), Some(GID)).unwrap();
        for (link, target) in [
            ("link_new", "rootonly/planted"),
            ("link_secret", "secret"),
            ("link_dir", "rootonly"),
        ] {
            let link = t.p(&format!("userdir/{link}"));
            std::os::unix::fs::symlink(t.p(target), &link).unwrap();
            // As if the user had planted it.
            std::os::unix::fs::lchown(&link, Some(UID), Some(GID)).unwrap();
        }
        t
    }

    /// A path inside the tree.
    pub fn p(&self, rel: &str) -> PathBuf {
        self.base.join(rel)
    }

    /// The same, as the string a client would send.
    pub fn s(&self, rel: &str) -> String {
        self.p(rel).display().to_string()
    }
}

impl Drop for Tree {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.base);
    }
}
