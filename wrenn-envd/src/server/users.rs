//! Accounts and paths as envd sees them.
//!
//! Users are read from `/etc/passwd` and `/etc/group` directly (no NSS), which is
//! all a capsule has and keeps the static binary free of glibc's NSS loading.

use std::collections::HashMap;
use std::path::{Component, Path, PathBuf};

/// A local account.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct User {
    pub name: String,
    pub uid: u32,
    pub gid: u32,
    pub home: PathBuf,
    pub shell: String,
}

impl User {
    /// Supplementary group ids of this user (from `/etc/group` member lists).
    pub fn groups(&self) -> Vec<u32> {
        let mut out = vec![self.gid];
        if let Ok(text) = std::fs::read_to_string("/etc/group") {
            for line in text.lines() {
                let f: Vec<&str> = line.split(':').collect();
                if f.len() < 4 {
                    continue;
                }
                if f[3].split(',').any(|m| m == self.name) {
                    if let Ok(gid) = f[2].parse::<u32>() {
                        if !out.contains(&gid) {
                            out.push(gid);
                        }
                    }
                }
            }
        }
        out
    }
}

fn parse_passwd_line(line: &str) -> Option<User> {
    let f: Vec<&str> = line.split(':').collect();
    if f.len() < 7 || line.starts_with('#') {
        return None;
    }
    Some(User {
        name: f[0].to_string(),
        uid: f[2].parse().ok()?,
        gid: f[3].parse().ok()?,
        home: PathBuf::from(f[5]),
        shell: f[6].to_string(),
    })
}

/// Looks a user up by name.
pub fn lookup_user(name: &str) -> Option<User> {
    let text = std::fs::read_to_string("/etc/passwd").ok()?;
    text.lines()
        .filter_map(parse_passwd_line)
        .find(|u| u.name == name)
}

/// Looks a user up by uid.
pub fn lookup_uid(uid: u32) -> Option<User> {
    let text = std::fs::read_to_string("/etc/passwd").ok()?;
    text.lines()
        .filter_map(parse_passwd_line)
        .find(|u| u.uid == uid)
}

/// uid/gid → name tables, read once per request that lists many entries.
#[derive(Debug, Default)]
pub struct Names {
    users: HashMap<u32, String>,
    groups: HashMap<u32, String>,
}

impl Names {
    pub fn load() -> Self {
        let mut names = Names::default();
        if let Ok(text) = std::fs::read_to_string("/etc/passwd") {
            for u in text.lines().filter_map(parse_passwd_line) {
                names.users.entry(u.uid).or_insert(u.name);
            }
        }
        if let Ok(text) = std::fs::read_to_string("/etc/group") {
            for line in text.lines() {
                let f: Vec<&str> = line.split(':').collect();
                if f.len() >= 3 {
                    if let Ok(gid) = f[2].parse::<u32>() {
                        names.groups.entry(gid).or_insert_with(|| f[0].to_string());
                    }
                }
            }
        }
        names
    }

    pub fn user(&self, uid: u32) -> String {
        self.users
            .get(&uid)
            .cloned()
            .unwrap_or_else(|| uid.to_string())
    }

    pub fn group(&self, gid: u32) -> String {
        self.groups
            .get(&gid)
            .cloned()
            .unwrap_or_else(|| gid.to_string())
    }
}

/// Lexically normalises a path: removes `.`, resolves `..` without touching the disk.
pub fn clean(path: &Path) -> PathBuf {
    let mut out = PathBuf::new();
    for c in path.components() {
        match c {
            Component::ParentDir => {
                if !out.pop() && !out.has_root() {
                    out.push("..");
                }
            }
            Component::CurDir => {}
            other => out.push(other.as_os_str()),
        }
    }
    if out.as_os_str().is_empty() {
        out.push(".");
    }
    out
}

/// Resolves a client path for `base` (the user's home or the default workdir):
/// `~` and `~/x` are the user's home, relative paths are joined to `base`.
pub fn resolve(path: &str, home: &Path, base: &Path) -> PathBuf {
    let p = if path == "~" {
        home.to_path_buf()
    } else if let Some(rest) = path.strip_prefix("~/") {
        home.join(rest)
    } else if path.starts_with('/') {
        PathBuf::from(path)
    } else {
        base.join(path)
    };
    clean(&p)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwd_lines_parse() {
        let u = parse_passwd_line("user:x:1000:1000:,,,:/home/user:/bin/bash").unwrap();
        assert_eq!(
            (u.uid, u.gid, u.home.as_path()),
            (1000, 1000, Path::new("/home/user"))
        );
        assert!(parse_passwd_line("garbage").is_none());
        assert!(parse_passwd_line("a:x:notanumber:1:::").is_none());
    }

    #[test]
    fn paths_resolve_like_envd() {
        let home = Path::new("/home/user");
        assert_eq!(resolve("~", home, home), PathBuf::from("/home/user"));
        assert_eq!(
            resolve("~/a/b", home, home),
            PathBuf::from("/home/user/a/b")
        );
        assert_eq!(resolve("a/../b", home, home), PathBuf::from("/home/user/b"));
        assert_eq!(
            resolve("/etc/../tmp/./x", home, home),
            PathBuf::from("/tmp/x")
        );
        assert_eq!(resolve("/../..", home, home), PathBuf::from("/"));
        assert_eq!(
            resolve("x", home, Path::new("/work")),
            PathBuf::from("/work/x")
        );
    }
}
