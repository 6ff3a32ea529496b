//! What Wrenn reads of qcow2 headers: the backing file name and the incompatible
//! feature bits. A writable layer is written by its VMM, so before host tools
//! (`qemu-img`, the VMM jail) follow its header, [`check_guest_layer`] makes sure it
//! still names the backing file Wrenn gave it and no external data file.

use crate::DiskError;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

/// Incompatible feature bit: the guest data lives in an external file named by a
/// header extension.
pub const INCOMPAT_DATA_FILE: u64 = 1 << 2;
/// Longest backing file name QEMU writes.
const MAX_BACKING_NAME: u32 = 1023;

/// The parts of a qcow2 header Wrenn uses.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Header {
    /// As written (relative names are relative to the image's directory).
    pub backing: Option<PathBuf>,
    pub incompatible_features: u64,
}

/// The header of `path`; `None` when it is not a qcow2 image.
pub fn read_header(path: &Path) -> io::Result<Option<Header>> {
    let f = std::fs::File::open(path)?;
    let mut h = [0u8; 104];
    let n = f.read_at(&mut h, 0)?;
    if n < 20 || h[..4] != *b"QFI\xfb" {
        return Ok(None);
    }
    let be64 = |at: usize| {
        let mut b = [0u8; 8];
        b.copy_from_slice(&h[at..at + 8]);
        u64::from_be_bytes(b)
    };
    let be32 = |at: usize| {
        let mut b = [0u8; 4];
        b.copy_from_slice(&h[at..at + 4]);
        u32::from_be_bytes(b)
    };
    let version = be32(4);
    let (offset, size) = (be64(8), be32(16));
    let incompatible_features = if version >= 3 && n >= 80 { be64(72) } else { 0 };
    let backing = if offset == 0 || size == 0 {
        None
    } else {
        if size > MAX_BACKING_NAME {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("{}: backing file name of {size} bytes", path.display()),
            ));
        }
        let mut name = vec![0u8; size as usize];
        f.read_exact_at(&mut name, offset)?;
        Some(PathBuf::from(std::ffi::OsStr::from_bytes(&name)))
    };
    Ok(Some(Header {
        backing,
        incompatible_features,
    }))
}

/// `backing` as QEMU resolves it: relative to the directory of `image`.
fn resolve(image: &Path, backing: &Path) -> PathBuf {
    if backing.is_absolute() {
        backing.to_path_buf()
    } else {
        image.parent().unwrap_or(Path::new("/")).join(backing)
    }
}

/// The files of a disk image: the image and, for qcow2, its backing chain.
pub fn disk_chain(top: &Path) -> io::Result<Vec<PathBuf>> {
    let mut out = vec![top.to_path_buf()];
    let mut cur = top.to_path_buf();
    while let Some(next) = read_header(&cur)?.and_then(|h| h.backing) {
        let next = resolve(&cur, &next);
        if out.contains(&next) || out.len() > 64 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!(
                    "the backing chain of {} loops or is too long",
                    top.display()
                ),
            ));
        }
        out.push(next.clone());
        cur = next;
    }
    Ok(out)
}

/// A layer a VMM wrote may be read by host tools only if its header still names
/// `expected_backing` and no external data file.
pub fn check_guest_layer(layer: &Path, expected_backing: &Path) -> Result<(), DiskError> {
    let untrusted = |reason: String| DiskError::UntrustedLayer {
        path: layer.to_path_buf(),
        reason,
    };
    let header = read_header(layer)
        .map_err(|e| untrusted(format!("unreadable header: {e}")))?
        .ok_or_else(|| untrusted("not a qcow2 image any more".into()))?;
    if header.incompatible_features & INCOMPAT_DATA_FILE != 0 {
        return Err(untrusted("it names an external data file".into()));
    }
    let same = |a: &Path, b: &Path| match (a.canonicalize(), b.canonicalize()) {
        (Ok(a), Ok(b)) => a == b,
        _ => a == b,
    };
    match header.backing {
        Some(b) if same(&resolve(layer, &b), expected_backing) => Ok(()),
        Some(b) => Err(untrusted(format!(
            "its backing file is {}, not {}",
            b.display(),
            expected_backing.display()
        ))),
        None => Err(untrusted("it has no backing file".into())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A minimal qcow2 v3 header naming `backing`, with `incompat` features.
    fn qcow(dir: &Path, name: &str, backing: &str, incompat: u64) -> PathBuf {
        let mut h = vec![0u8; 512];
        h[..4].copy_from_slice(b"QFI\xfb");
        h[4..8].copy_from_slice(&3u32.to_be_bytes());
        h[8..16].copy_from_slice(&256u64.to_be_bytes());
        h[16..20].copy_from_slice(&(backing.len() as u32).to_be_bytes());
        h[72..80].copy_from_slice(&incompat.to_be_bytes());
        h[256..256 + backing.len()].copy_from_slice(backing.as_bytes());
        let p = dir.join(name);
        std::fs::write(&p, h).expect("qcow2");
        p
    }

    #[test]
    fn chains_are_followed_and_raw_ends_them() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join("base.raw"), vec![0u8; 4096]).expect("raw");
        let mid = qcow(dir.path(), "mid.qcow2", "base.raw", 0);
        let top = qcow(dir.path(), "top.qcow2", &mid.display().to_string(), 0);
        let chain = disk_chain(&top).expect("chain");
        assert_eq!(chain, vec![top, mid, dir.path().join("base.raw")]);
        let looped = qcow(dir.path(), "loop.qcow2", "loop.qcow2", 0);
        assert!(disk_chain(&looped).is_err());
    }

    #[test]
    fn a_layer_naming_another_backing_or_a_data_file_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let base = dir.path().join("base.raw");
        std::fs::write(&base, vec![0u8; 4096]).expect("raw");
        let good = qcow(dir.path(), "good.qcow2", &base.display().to_string(), 0);
        check_guest_layer(&good, &base).expect("as made");
        let relative = qcow(dir.path(), "rel.qcow2", "base.raw", 0);
        check_guest_layer(&relative, &base).expect("relative name, same file");
        let elsewhere = qcow(dir.path(), "evil.qcow2", "/etc/shadow", 0);
        assert!(matches!(
            check_guest_layer(&elsewhere, &base),
            Err(DiskError::UntrustedLayer { .. })
        ));
        let data_file = qcow(dir.path(), "df.qcow2", "base.raw", INCOMPAT_DATA_FILE);
        assert!(check_guest_layer(&data_file, &base).is_err());
        std::fs::write(dir.path().join("raw-now"), vec![0u8; 4096]).expect("raw");
        assert!(check_guest_layer(&dir.path().join("raw-now"), &base).is_err());
    }
}
