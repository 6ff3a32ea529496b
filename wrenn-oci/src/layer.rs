//! Applying image layers to a directory tree, as a container runtime does.
//!
//! A layer is a tar stream (plain, gzip or zstd). Its entries are written over the
//! tree of the layers below, and its whiteouts remove what those layers had:
//! `.wh.<name>` removes `<name>`, `.wh..wh..opq` empties its directory of everything
//! the lower layers put there.
//!
//! Paths are resolved inside the root: a symbolic link in a layer, absolute or
//! relative, is followed as if the root were `/`, so no entry, link or whiteout ever
//! touches anything outside it.

use std::collections::HashSet;
use std::ffi::OsString;
use std::fs;
use std::io::{self, Read};
use std::path::{Component, Path, PathBuf};

/// Whiteout prefix of a removed file.
const WHITEOUT: &str = ".wh.";
/// Marker of an opaque directory.
const OPAQUE: &str = ".wh..wh..opq";
/// Symbolic links followed while resolving one path (as the kernel's limit).
const MAX_LINKS: usize = 40;

/// How a layer's tar stream is compressed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Compression {
    None,
    Gzip,
    Zstd,
}

impl Compression {
    /// The compression of a layer media type, or `None` for a type that is no
    /// filesystem layer Wrenn can apply.
    pub fn of_media_type(media_type: &str) -> Option<Compression> {
        match media_type {
            "application/vnd.oci.image.layer.v1.tar"
            | "application/vnd.docker.image.rootfs.diff.tar" => Some(Compression::None),
            "application/vnd.oci.image.layer.v1.tar+gzip"
            | "application/vnd.docker.image.rootfs.diff.tar.gzip" => Some(Compression::Gzip),
            "application/vnd.oci.image.layer.v1.tar+zstd"
            | "application/vnd.docker.image.rootfs.diff.tar.zstd" => Some(Compression::Zstd),
            _ => None,
        }
    }
}

/// What applying a layer did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LayerStats {
    /// Bytes of the uncompressed tar stream.
    pub tar_bytes: u64,
    pub entries: u64,
    pub whiteouts: u64,
}

/// Counts the bytes read through it.
struct Counting<R> {
    inner: R,
    n: u64,
}

impl<R: Read> Read for Counting<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.n += n as u64;
        Ok(n)
    }
}

/// Applies the layer read from `src` (compressed as `compression`) to the tree at
/// `root`.
///
/// A compressed layer is decompressed on a thread of its own, a chunk ahead of the
/// entries being written, so decompression and the filesystem's work overlap.
pub fn apply(
    src: impl Read + Send,
    compression: Compression,
    root: &Path,
) -> io::Result<LayerStats> {
    match compression {
        Compression::None => apply_tar(src, root),
        Compression::Gzip => ahead(flate2::read::MultiGzDecoder::new(src), root),
        Compression::Zstd => ahead(zstd::stream::read::Decoder::new(src)?, root),
    }
}

/// Chunks of decompressed data in flight between the two threads (of [`CHUNK`]).
const CHUNKS_AHEAD: usize = 8;
const CHUNK: usize = 1 << 20;

/// Applies the tar stream `src` yields, reading it on another thread.
fn ahead(mut src: impl Read + Send, root: &Path) -> io::Result<LayerStats> {
    let (tx, rx) = std::sync::mpsc::sync_channel::<io::Result<Vec<u8>>>(CHUNKS_AHEAD);
    std::thread::scope(|scope| {
        scope.spawn(move || loop {
            let mut buf = vec![0u8; CHUNK];
            let mut filled = 0;
            let r = loop {
                match src.read(&mut buf[filled..]) {
                    Ok(0) => break Ok(()),
                    Ok(n) => {
                        filled += n;
                        if filled == buf.len() {
                            break Ok(());
                        }
                    }
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => break Err(e),
                }
            };
            buf.truncate(filled);
            let last = filled == 0;
            let sent = match r {
                Ok(()) if last => break,
                Ok(()) => tx.send(Ok(buf)),
                Err(e) => {
                    let _ = tx.send(Err(e));
                    break;
                }
            };
            // The applying side stopped (an error): nothing more to read for.
            if sent.is_err() {
                break;
            }
        });
        apply_tar(
            Chunks {
                rx,
                cur: Vec::new(),
                pos: 0,
            },
            root,
        )
    })
}

/// A reader over the chunks another thread sends.
struct Chunks {
    rx: std::sync::mpsc::Receiver<io::Result<Vec<u8>>>,
    cur: Vec<u8>,
    pos: usize,
}

impl Read for Chunks {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        while self.pos == self.cur.len() {
            match self.rx.recv() {
                Ok(chunk) => {
                    self.cur = chunk?;
                    self.pos = 0;
                }
                Err(_) => return Ok(0),
            }
        }
        let n = buf.len().min(self.cur.len() - self.pos);
        buf[..n].copy_from_slice(&self.cur[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
}

fn apply_tar(src: impl Read, root: &Path) -> io::Result<LayerStats> {
    let mut counting = Counting { inner: src, n: 0 };
    let mut stats = LayerStats::default();
    {
        let mut archive = tar::Archive::new(&mut counting);
        archive.set_preserve_permissions(true);
        archive.set_preserve_ownerships(true);
        archive.set_preserve_mtime(true);
        archive.set_unpack_xattrs(true);
        archive.set_overwrite(true);
        // Paths this layer wrote: whiteouts and opaque markers only hide the layers
        // below.
        let mut written: HashSet<PathBuf> = HashSet::new();
        for entry in archive.entries()? {
            let mut entry = entry?;
            let path = entry.path()?.into_owned();
            let Some((parent, name)) = split(&path)? else {
                continue; // the root itself
            };
            stats.entries += 1;
            let dir = resolve(root, &parent)?;
            let name_str = name.to_string_lossy();
            if name_str == OPAQUE {
                stats.whiteouts += 1;
                if dir.is_dir() {
                    clear_lower(&dir, &written)?;
                }
                continue;
            }
            if let Some(hidden) = name_str.strip_prefix(WHITEOUT) {
                stats.whiteouts += 1;
                let target = dir.join(hidden);
                if !written.contains(&target) {
                    remove_any(&target)?;
                }
                continue;
            }
            fs::create_dir_all(&dir)?;
            let dest = dir.join(&name);
            let kind = entry.header().entry_type();
            let existing = fs::symlink_metadata(&dest).ok();
            match kind {
                tar::EntryType::Directory => {
                    if existing.is_some_and(|m| !m.is_dir()) {
                        fs::remove_file(&dest)?;
                    }
                    entry.unpack(&dest)?;
                }
                tar::EntryType::Link => {
                    let link = entry
                        .link_name()?
                        .ok_or_else(|| {
                            invalid(format!("{}: hard link without a target", path.display()))
                        })?
                        .into_owned();
                    let Some((lparent, lname)) = split(&link)? else {
                        return Err(invalid(format!(
                            "{}: hard link to the root",
                            path.display()
                        )));
                    };
                    let target = resolve(root, &lparent)?.join(lname);
                    if existing.is_some() {
                        remove_any(&dest)?;
                    }
                    fs::hard_link(&target, &dest).map_err(|e| {
                        io::Error::new(
                            e.kind(),
                            format!("{}: hard link to {}: {e}", path.display(), link.display()),
                        )
                    })?;
                }
                tar::EntryType::Regular
                | tar::EntryType::Continuous
                | tar::EntryType::Symlink
                | tar::EntryType::Char
                | tar::EntryType::Block
                | tar::EntryType::Fifo => {
                    if existing.is_some() {
                        remove_any(&dest)?;
                    }
                    entry.unpack(&dest)?;
                }
                other => {
                    tracing::debug!(path = %path.display(), kind = ?other, "layer entry skipped");
                    continue;
                }
            }
            written.insert(dest);
        }
    }
    // A layer's tar may end before the stream does (padding): read it out so the
    // count is the whole stream's.
    io::copy(&mut counting, &mut io::sink())?;
    stats.tar_bytes = counting.n;
    Ok(stats)
}

fn invalid(msg: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg)
}

/// An entry path's parent (relative, normalised) and last component; `None` for the
/// root. `..` components are refused.
fn split(path: &Path) -> io::Result<Option<(PathBuf, OsString)>> {
    let mut parts: Vec<OsString> = Vec::new();
    for c in path.components() {
        match c {
            Component::Normal(n) => parts.push(n.to_os_string()),
            Component::CurDir | Component::RootDir | Component::Prefix(_) => {}
            Component::ParentDir => {
                return Err(invalid(format!("{}: `..` in a layer path", path.display())))
            }
        }
    }
    Ok(parts.pop().map(|name| (parts.iter().collect(), name)))
}

/// The real location of `rel` inside `root`, following symbolic links as if `root`
/// were `/`: the result is always `root` or below it.
pub fn resolve(root: &Path, rel: &Path) -> io::Result<PathBuf> {
    let mut done: Vec<OsString> = Vec::new();
    let mut todo: Vec<OsString> = Vec::new();
    push_components(&mut todo, rel);
    let mut links = 0;
    while let Some(part) = todo.pop() {
        if part == ".." {
            done.pop();
            continue;
        }
        let here: PathBuf = root.join(done.iter().collect::<PathBuf>()).join(&part);
        match fs::symlink_metadata(&here) {
            Ok(m) if m.file_type().is_symlink() => {
                links += 1;
                if links > MAX_LINKS {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        format!("{}: too many levels of symbolic links", rel.display()),
                    ));
                }
                let target = fs::read_link(&here)?;
                if target.is_absolute() {
                    done.clear();
                }
                push_components(&mut todo, &target);
            }
            _ => done.push(part),
        }
    }
    Ok(root.join(done.iter().collect::<PathBuf>()))
}

/// Pushes `p`'s components onto a stack popped front to back (`..` kept as a word).
fn push_components(stack: &mut Vec<OsString>, p: &Path) {
    let parts: Vec<OsString> = p
        .components()
        .filter_map(|c| match c {
            Component::Normal(n) => Some(n.to_os_string()),
            Component::ParentDir => Some(OsString::from("..")),
            _ => None,
        })
        .collect();
    stack.extend(parts.into_iter().rev());
}

/// Removes a file, link or directory tree; a missing one is fine.
fn remove_any(p: &Path) -> io::Result<()> {
    match fs::symlink_metadata(p) {
        Ok(m) if m.is_dir() => fs::remove_dir_all(p),
        Ok(_) => fs::remove_file(p),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}

/// Removes from `dir` everything this layer did not write (an opaque directory shows
/// only its own layer's content).
fn clear_lower(dir: &Path, written: &HashSet<PathBuf>) -> io::Result<()> {
    for e in fs::read_dir(dir)? {
        let p = e?.path();
        if !written.contains(&p) {
            remove_any(&p)?;
        } else if fs::symlink_metadata(&p)?.is_dir() {
            clear_lower(&p, written)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    /// A tar stream of `entries`: (path, kind, content or link target). Names are
    /// written raw, as a hostile layer could.
    fn tar_of(entries: &[(&str, char, &str)]) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        for (path, kind, data) in entries {
            let mut h = tar::Header::new_gnu();
            h.set_mode(0o644);
            h.set_uid(0);
            h.set_gid(0);
            h.set_mtime(1_700_000_000);
            h.set_size(0);
            let gnu = h.as_gnu_mut().unwrap();
            gnu.name[..path.len()].copy_from_slice(path.as_bytes());
            let body: &[u8] = match kind {
                'd' => {
                    h.set_entry_type(tar::EntryType::Directory);
                    h.set_mode(0o755);
                    &[]
                }
                'f' => {
                    h.set_entry_type(tar::EntryType::Regular);
                    h.set_size(data.len() as u64);
                    data.as_bytes()
                }
                'l' | 'h' => {
                    h.set_entry_type(if *kind == 'l' {
                        tar::EntryType::Symlink
                    } else {
                        tar::EntryType::Link
                    });
                    let gnu = h.as_gnu_mut().unwrap();
                    gnu.linkname[..data.len()].copy_from_slice(data.as_bytes());
                    &[]
                }
                _ => unreachable!(),
            };
            h.set_cksum();
            b.append(&h, body).unwrap();
        }
        b.into_inner().unwrap()
    }

    fn gz(data: &[u8]) -> Vec<u8> {
        use std::io::Write;
        let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        e.write_all(data).unwrap();
        e.finish().unwrap()
    }

    fn read(root: &Path, p: &str) -> Option<String> {
        fs::read_to_string(root.join(p)).ok()
    }

    #[test]
    fn layers_stack_with_whiteouts_and_opaque_dirs() {
        let t = tempfile::tempdir().unwrap();
        let root = t.path();
        let lower = tar_of(&[
            ("etc", 'd', ""),
            ("etc/motd", 'f', "hello"),
            ("etc/keep", 'f', "kept"),
            ("opt", 'd', ""),
            ("opt/app", 'd', ""),
            ("opt/app/old", 'f', "old"),
            ("opt/app/sub", 'd', ""),
            ("opt/app/sub/deep", 'f', "deep"),
            ("bin", 'd', ""),
            ("bin/tool", 'f', "v1"),
            ("usr", 'd', ""),
            ("usr/lib", 'd', ""),
            ("lib", 'l', "usr/lib"),
        ]);
        let s = apply(&gz(&lower)[..], Compression::Gzip, root).unwrap();
        assert_eq!(s.tar_bytes, lower.len() as u64);
        assert_eq!(s.entries, 13);
        let upper = tar_of(&[
            ("etc/.wh.motd", 'f', ""),
            ("opt/app/new", 'f', "new"),
            ("opt/app/.wh..wh..opq", 'f', ""),
            ("bin/tool", 'f', "v2"),
            ("bin/tool2", 'h', "bin/tool"),
            ("lib/libx.so", 'f', "through the link"),
        ]);
        let s = apply(&upper[..], Compression::None, root).unwrap();
        assert_eq!(s.whiteouts, 2);
        assert_eq!(read(root, "etc/motd"), None);
        assert_eq!(read(root, "etc/keep").as_deref(), Some("kept"));
        // The opaque marker came after `new`: the layer's own file stays, the lower
        // layer's are gone.
        assert_eq!(read(root, "opt/app/new").as_deref(), Some("new"));
        assert!(!root.join("opt/app/old").exists());
        assert!(!root.join("opt/app/sub").exists());
        assert_eq!(read(root, "bin/tool").as_deref(), Some("v2"));
        let (a, b) = (
            fs::metadata(root.join("bin/tool")).unwrap(),
            fs::metadata(root.join("bin/tool2")).unwrap(),
        );
        assert_eq!(a.ino(), b.ino());
        assert_eq!(
            read(root, "usr/lib/libx.so").as_deref(),
            Some("through the link")
        );
    }

    #[test]
    fn links_never_lead_outside_the_root() {
        let outside = tempfile::tempdir().unwrap();
        fs::write(outside.path().join("victim"), "safe").unwrap();
        let t = tempfile::tempdir().unwrap();
        let root = t.path();
        let out = outside.path().to_str().unwrap();
        let layer = tar_of(&[
            ("abs", 'l', out),
            ("rel", 'l', "../../../../../../../../.."),
            ("abs/victim", 'f', "written in the root"),
            ("rel/escaped", 'f', "also in the root"),
        ]);
        apply(&layer[..], Compression::None, root).unwrap();
        let whiteout = tar_of(&[("abs/.wh.victim", 'f', "")]);
        apply(&whiteout[..], Compression::None, root).unwrap();
        assert_eq!(
            fs::read_to_string(outside.path().join("victim")).unwrap(),
            "safe"
        );
        // `abs` resolved to <root><outside path>: the file went there, then its whiteout
        // removed it there.
        assert!(!root
            .join(out.trim_start_matches('/'))
            .join("victim")
            .exists());
        assert_eq!(read(root, "escaped").as_deref(), Some("also in the root"));
        let dotdot = tar_of(&[("../evil", 'f', "x")]);
        assert!(apply(&dotdot[..], Compression::None, root).is_err());
        let hard = tar_of(&[("stolen", 'h', &format!("{out}/victim"))]);
        // A hard link's target is a path inside the root too: there is no such file.
        assert!(apply(&hard[..], Compression::None, root).is_err());
    }

    #[test]
    fn link_loops_are_refused() {
        let t = tempfile::tempdir().unwrap();
        let root = t.path();
        let layer = tar_of(&[("a", 'l', "b"), ("b", 'l', "a"), ("a/file", 'f', "x")]);
        let e = apply(&layer[..], Compression::None, root).unwrap_err();
        assert!(e.to_string().contains("symbolic links"), "{e}");
    }

    #[test]
    fn a_corrupt_compressed_layer_is_an_error() {
        let t = tempfile::tempdir().unwrap();
        let mut bad = gz(&tar_of(&[("a", 'f', "x")]));
        let n = bad.len();
        bad[n / 2..].fill(0xff);
        assert!(apply(&bad[..], Compression::Gzip, t.path()).is_err());
        assert!(apply(&b"not compressed at all"[..], Compression::Zstd, t.path()).is_err());
    }

    #[test]
    fn media_types() {
        assert_eq!(
            Compression::of_media_type("application/vnd.oci.image.layer.v1.tar+gzip"),
            Some(Compression::Gzip)
        );
        assert_eq!(
            Compression::of_media_type("application/vnd.docker.image.rootfs.diff.tar.gzip"),
            Some(Compression::Gzip)
        );
        assert_eq!(
            Compression::of_media_type("application/vnd.docker.image.rootfs.foreign.diff.tar.gzip"),
            None
        );
    }
}
