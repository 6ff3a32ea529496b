//! Turning an image's tree into a capsule's root: Wrenn's init and envd, the `user`
//! account, the guest's identity files, then an ext4 image.

use crate::layer::resolve;
use std::fs;
use std::io;
use std::os::unix::fs::{symlink, PermissionsExt};
use std::path::{Path, PathBuf};

/// The guest binaries every capsule runs.
#[derive(Clone, Debug)]
pub struct GuestBinaries {
    pub init: PathBuf,
    pub envd: PathBuf,
}

/// Where the guest binaries live in a root (as the built-in images have them).
pub const INIT_PATH: &str = "usr/local/bin/wrenn-init";
pub const ENVD_PATH: &str = "usr/local/bin/envd";

/// The unprivileged account commands run as by default.
const USER: &str = "user";
const FIRST_UID: u32 = 1000;

/// Writes `data` at `rel` inside `root` (links resolved inside it), replacing what
/// was there.
fn put(root: &Path, rel: &str, data: &[u8], mode: u32) -> io::Result<PathBuf> {
    let rel = Path::new(rel);
    let dir = resolve(root, rel.parent().unwrap_or(Path::new("")))?;
    fs::create_dir_all(&dir)?;
    let dest = dir.join(rel.file_name().unwrap_or_default());
    if let Ok(m) = fs::symlink_metadata(&dest) {
        if m.is_dir() {
            fs::remove_dir_all(&dest)?;
        } else {
            fs::remove_file(&dest)?;
        }
    }
    fs::write(&dest, data)?;
    fs::set_permissions(&dest, fs::Permissions::from_mode(mode))?;
    Ok(dest)
}

/// Adds Wrenn's guest side to the tree at `root`.
pub fn finish(root: &Path, guest: &GuestBinaries, label: &str) -> io::Result<()> {
    let read = |p: &Path| {
        fs::read(p).map_err(|e| io::Error::new(e.kind(), format!("reading {}: {e}", p.display())))
    };
    put(root, INIT_PATH, &read(&guest.init)?, 0o755)?;
    put(root, ENVD_PATH, &read(&guest.envd)?, 0o755)?;
    let sbin = resolve(root, Path::new("usr/local/sbin"))?;
    fs::create_dir_all(&sbin)?;
    for name in ["poweroff", "reboot", "halt"] {
        let p = sbin.join(name);
        let _ = fs::remove_file(&p);
        symlink("/usr/local/bin/wrenn-init", &p)?;
    }
    add_user(root)?;
    put(root, "etc/hostname", b"capsule\n", 0o644)?;
    put(
        root,
        "etc/hosts",
        b"127.0.0.1\tlocalhost\n127.0.1.1\tcapsule\n::1\tlocalhost ip6-localhost ip6-loopback\n",
        0o644,
    )?;
    put(
        root,
        "etc/resolv.conf",
        b"nameserver 8.8.8.8\nnameserver 8.8.4.4\n",
        0o644,
    )?;
    for dir in ["proc", "sys", "dev", "run", "tmp"] {
        let p = resolve(root, Path::new(dir))?;
        if !p.exists() {
            fs::create_dir_all(&p)?;
        }
        if dir == "tmp" {
            fs::set_permissions(&p, fs::Permissions::from_mode(0o1777))?;
        }
    }
    put(
        root,
        "etc/wrenn-template",
        format!("image={label}\n").as_bytes(),
        0o644,
    )?;
    Ok(())
}

/// A numeric id field of a `passwd` or `group` line.
fn id_field(line: &str, i: usize) -> Option<u32> {
    line.split(':').nth(i)?.parse().ok()
}

/// Adds `user` (uid and gid 1000, or the next free ones) with a home directory and,
/// where the image has sudo, password-less sudo — unless the image has one already.
fn add_user(root: &Path) -> io::Result<()> {
    let passwd_path = resolve(root, Path::new("etc/passwd"))?;
    let group_path = resolve(root, Path::new("etc/group"))?;
    let mut passwd = fs::read_to_string(&passwd_path).unwrap_or_default();
    let mut group = fs::read_to_string(&group_path).unwrap_or_default();
    if passwd.is_empty() {
        passwd = "root:x:0:0:root:/root:/bin/sh\n".into();
    }
    if group.is_empty() {
        group = "root:x:0:\n".into();
    }
    if passwd.lines().any(|l| l.split(':').next() == Some(USER)) {
        return Ok(());
    }
    let taken_uids: Vec<u32> = passwd.lines().filter_map(|l| id_field(l, 2)).collect();
    let taken_gids: Vec<u32> = group.lines().filter_map(|l| id_field(l, 2)).collect();
    let mut id = FIRST_UID;
    while taken_uids.contains(&id) || taken_gids.contains(&id) {
        id += 1;
    }
    let shell = if resolve(root, Path::new("bin/bash"))?.exists() {
        "/bin/bash"
    } else {
        "/bin/sh"
    };
    let has_sudo = resolve(root, Path::new("etc/sudoers.d"))?.is_dir();
    if !passwd.ends_with('\n') {
        passwd.push('\n');
    }
    passwd.push_str(&format!("{USER}:x:{id}:{id}::/home/{USER}:{shell}\n"));
    if !group.ends_with('\n') {
        group.push('\n');
    }
    group.push_str(&format!("{USER}:x:{id}:\n"));
    if has_sudo {
        group = group
            .lines()
            .map(|l| {
                if l.starts_with("sudo:") {
                    if l.ends_with(':') {
                        format!("{l}{USER}")
                    } else {
                        format!("{l},{USER}")
                    }
                } else {
                    l.to_string()
                }
            })
            .collect::<Vec<_>>()
            .join("\n")
            + "\n";
    }
    put(root, "etc/passwd", passwd.as_bytes(), 0o644)?;
    put(root, "etc/group", group.as_bytes(), 0o644)?;
    let shadow_path = resolve(root, Path::new("etc/shadow"))?;
    if let Ok(mut shadow) = fs::read_to_string(&shadow_path) {
        if !shadow.ends_with('\n') && !shadow.is_empty() {
            shadow.push('\n');
        }
        shadow.push_str(&format!("{USER}:!:20000:0:99999:7:::\n"));
        put(root, "etc/shadow", shadow.as_bytes(), 0o640)?;
    }
    if has_sudo {
        put(
            root,
            "etc/sudoers.d/user",
            format!("{USER} ALL=(ALL:ALL) NOPASSWD:ALL\n").as_bytes(),
            0o440,
        )?;
    }
    let home = resolve(root, Path::new("home"))?.join(USER);
    fs::create_dir_all(&home)?;
    fs::set_permissions(&home, fs::Permissions::from_mode(0o755))?;
    std::os::unix::fs::chown(&home, Some(id), Some(id))?;
    Ok(())
}

/// Copies the guest binaries out of a built-in template's ext4 root image into
/// `dir` (so an image gets exactly the init and envd the host's templates run).
pub async fn extract_guest(rootfs: &Path, dir: &Path) -> Result<GuestBinaries, crate::ImageError> {
    let guest_err = |m: String| crate::ImageError::Guest(m);
    fs::create_dir_all(dir).map_err(|e| guest_err(format!("creating {}: {e}", dir.display())))?;
    let bins = GuestBinaries {
        init: dir.join("wrenn-init"),
        envd: dir.join("envd"),
    };
    for (inside, out) in [(INIT_PATH, &bins.init), (ENVD_PATH, &bins.envd)] {
        let request = format!("dump -p /{inside} {}", out.display());
        let output = tokio::process::Command::new("debugfs")
            .arg("-R")
            .arg(&request)
            .arg(rootfs)
            .output()
            .await
            .map_err(|e| guest_err(format!("running debugfs: {e}")))?;
        let size = fs::metadata(out).map(|m| m.len()).unwrap_or(0);
        if !output.status.success() || size == 0 {
            return Err(guest_err(format!(
                "/{inside} not found in {} ({})",
                rootfs.display(),
                String::from_utf8_lossy(&output.stderr).trim()
            )));
        }
    }
    Ok(bins)
}

/// Bytes the tree at `root` holds (apparent sizes of its files).
pub fn tree_bytes(root: &Path) -> u64 {
    fn walk(p: &Path) -> u64 {
        let Ok(rd) = fs::read_dir(p) else { return 0 };
        rd.flatten()
            .map(|e| match e.file_type() {
                Ok(t) if t.is_dir() => walk(&e.path()) + 4096,
                Ok(_) => e.metadata().map(|m| m.len()).unwrap_or(0),
                Err(_) => 0,
            })
            .sum()
    }
    walk(root)
}

/// The size of a root's disk image: room for half the tree again and 512 MiB, at
/// least 2 GiB (sparse: only what it holds takes space).
pub fn image_size(tree: u64) -> u64 {
    let min = 2u64 << 30;
    (tree + tree / 2 + (512 << 20))
        .max(min)
        .next_multiple_of(1 << 20)
}

/// Makes an ext4 image at `out` holding the tree at `root`.
pub async fn make_ext4(root: &Path, out: &Path, size: u64) -> io::Result<()> {
    let f = fs::File::create(out)?;
    f.set_len(size)?;
    drop(f);
    let output = tokio::process::Command::new("mkfs.ext4")
        .args([
            "-q",
            "-F",
            "-L",
            "wrenn-root",
            "-m",
            "0",
            "-E",
            "root_owner=0:0",
            "-d",
        ])
        .arg(root)
        .arg(out)
        .output()
        .await
        .map_err(|e| io::Error::new(e.kind(), format!("running mkfs.ext4: {e}")))?;
    if !output.status.success() {
        let _ = fs::remove_file(out);
        return Err(io::Error::other(format!(
            "mkfs.ext4 failed ({}): {}",
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    #[test]
    fn finishing_adds_the_guest_side_and_a_free_user() {
        let t = tempfile::tempdir().unwrap();
        let root = t.path().join("root");
        fs::create_dir_all(root.join("etc/sudoers.d")).unwrap();
        fs::create_dir_all(root.join("bin")).unwrap();
        fs::write(root.join("bin/bash"), "").unwrap();
        fs::write(
            root.join("etc/passwd"),
            "root:x:0:0:root:/root:/bin/bash\nnode:x:1000:1000::/home/node:/bin/bash",
        )
        .unwrap();
        fs::write(
            root.join("etc/group"),
            "root:x:0:\nsudo:x:27:\nnode:x:1000:\n",
        )
        .unwrap();
        // A link out of the root, as images have for resolv.conf: replaced, not followed.
        symlink("/etc/outside-resolv.conf", root.join("etc/resolv.conf")).unwrap();
        let bins = t.path().join("bins");
        fs::create_dir_all(&bins).unwrap();
        fs::write(bins.join("init"), "INIT").unwrap();
        fs::write(bins.join("envd"), "ENVD").unwrap();
        let guest = GuestBinaries {
            init: bins.join("init"),
            envd: bins.join("envd"),
        };
        finish(&root, &guest, "registry/app:1@sha256:00").unwrap();
        assert_eq!(fs::read_to_string(root.join(INIT_PATH)).unwrap(), "INIT");
        assert_eq!(
            fs::metadata(root.join(ENVD_PATH)).unwrap().mode() & 0o777,
            0o755
        );
        assert_eq!(
            fs::read_link(root.join("usr/local/sbin/poweroff")).unwrap(),
            Path::new("/usr/local/bin/wrenn-init")
        );
        let passwd = fs::read_to_string(root.join("etc/passwd")).unwrap();
        assert!(
            passwd.ends_with("user:x:1001:1001::/home/user:/bin/bash\n"),
            "{passwd}"
        );
        let group = fs::read_to_string(root.join("etc/group")).unwrap();
        assert!(
            group.contains("sudo:x:27:user\n") && group.contains("user:x:1001:\n"),
            "{group}"
        );
        assert_eq!(fs::metadata(root.join("home/user")).unwrap().uid(), 1001);
        assert!(root.join("etc/sudoers.d/user").is_file());
        assert!(!Path::new("/etc/outside-resolv.conf").exists());
        assert!(fs::read_to_string(root.join("etc/resolv.conf"))
            .unwrap()
            .starts_with("nameserver"));
        // Twice is once.
        finish(&root, &guest, "x").unwrap();
        assert_eq!(
            fs::read_to_string(root.join("etc/passwd"))
                .unwrap()
                .lines()
                .filter(|l| l.starts_with("user:"))
                .count(),
            1
        );
    }

    #[test]
    fn image_sizes() {
        assert_eq!(image_size(0), 2 << 30);
        assert_eq!(image_size(4 << 30), (6u64 << 30) + (512 << 20));
    }
}
