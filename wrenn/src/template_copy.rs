//! Copying a template between hosts, the store's side: listing its files with their
//! checksums, reading them as chunks (zero ranges skipped: sparse images stay sparse),
//! and writing a copy into a staging directory that survives an interrupted transfer
//! (a retry resumes where the last recorded progress was), is checked file by file
//! against the checksums, and becomes the template by one rename.

use crate::templates::FsTemplates;
use bytes::BytesMut;
use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::{Seek, SeekFrom, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use wrenn_core::template::{
    TemplateChunk, TemplateError, TemplateFile, TemplateManifest, TemplateName,
};

/// Chunk size read and sent (all-zero chunks are not sent).
pub const CHUNK: usize = 1 << 20;
/// How often (bytes written) an import records its progress.
const PROGRESS_EVERY: u64 = 64 << 20;
const MANIFEST: &str = "manifest.json";
const PROGRESS: &str = "progress.json";

fn backend(what: String) -> TemplateError {
    TemplateError::Backend(what.into())
}

fn io(step: &str, path: &Path) -> impl FnOnce(std::io::Error) -> TemplateError {
    let what = format!("{step} {}", path.display());
    move |e| backend(format!("{what}: {e}"))
}

/// The first range of data of `file` at or after `at` and before `size` (start, end),
/// or `None` when only holes remain. A filesystem that cannot tell reports all data.
fn data_after(file: &File, at: u64, size: u64) -> Option<(u64, u64)> {
    use nix::unistd::{lseek, Whence};
    use std::os::fd::AsRawFd;
    let fd = file.as_raw_fd();
    let Ok(pos) = i64::try_from(at) else {
        return Some((at, size));
    };
    let found = match lseek(fd, pos, Whence::SeekData) {
        Ok(s) => s.max(pos),
        Err(nix::errno::Errno::ENXIO) => return None,
        Err(_) => return Some((at, size)),
    };
    let start = u64::try_from(found).unwrap_or(at);
    if start >= size {
        return None;
    }
    let end = lseek(fd, found, Whence::SeekHole)
        .ok()
        .and_then(|e| u64::try_from(e).ok())
        .map_or(size, |e| e.clamp(start + 1, size));
    Some((start, end))
}

/// CRC-32 of a file's whole content (holes are hashed as the zeros they read as,
/// without reading them).
fn crc_of(path: &Path) -> Result<u32, TemplateError> {
    use std::os::unix::fs::FileExt;
    let f = File::open(path).map_err(io("opening", path))?;
    let size = f.metadata().map_err(io("reading", path))?.len();
    let mut h = crc32fast::Hasher::new();
    let mut buf = vec![0u8; CHUNK];
    let zeros = vec![0u8; CHUNK];
    let mut at = 0;
    while at < size {
        let (start, end) = data_after(&f, at, size).unwrap_or((size, size));
        while at < start {
            let n = usize::try_from(start - at).map_or(CHUNK, |n| n.min(CHUNK));
            h.update(&zeros[..n]);
            at += n as u64;
        }
        while at < end {
            let want = usize::try_from(end - at).map_or(CHUNK, |n| n.min(CHUNK));
            let n = f
                .read_at(&mut buf[..want], at)
                .map_err(io("reading", path))?;
            if n == 0 {
                return Err(backend(format!("{} shrank while read", path.display())));
            }
            h.update(&buf[..n]);
            at += n as u64;
        }
    }
    Ok(h.finalize())
}

fn files_under(dir: &Path, prefix: &str, out: &mut Vec<(String, PathBuf)>) -> std::io::Result<()> {
    let mut entries: Vec<_> = std::fs::read_dir(dir)?.collect::<Result<_, _>>()?;
    entries.sort_by_key(|e| e.file_name());
    for e in entries {
        let name = e.file_name().to_string_lossy().into_owned();
        let rel = if prefix.is_empty() {
            name
        } else {
            format!("{prefix}/{name}")
        };
        let t = e.file_type()?;
        if t.is_dir() {
            files_under(&e.path(), &rel, out)?;
        } else if t.is_file() {
            out.push((rel, e.path()));
        }
    }
    Ok(())
}

impl FsTemplates {
    fn staging(&self, name: &TemplateName) -> PathBuf {
        self.data()
            .templates()
            .join(format!(".import-{}", name.as_str()))
    }

    /// The files of template `name` with their checksums (reads them all: blocking).
    pub fn manifest(&self, name: &TemplateName) -> Result<TemplateManifest, TemplateError> {
        let mut files = Vec::new();
        for (rel, path, meta) in self.listing(name)? {
            files.push(TemplateFile {
                path: rel,
                size: meta.len(),
                crc32: crc_of(&path)?,
                mode: meta.permissions().mode() & 0o777,
            });
        }
        Ok(TemplateManifest {
            name: name.clone(),
            files,
        })
    }

    /// Template `name`'s files in manifest order: relative path, path, metadata.
    fn listing(
        &self,
        name: &TemplateName,
    ) -> Result<Vec<(String, PathBuf, std::fs::Metadata)>, TemplateError> {
        let dir = self.data().template_dir(name.as_str());
        if !dir.is_dir() {
            return Err(TemplateError::Unknown {
                name: name.to_string(),
            });
        }
        let mut found = Vec::new();
        files_under(&dir, "", &mut found).map_err(io("listing", &dir))?;
        found
            .into_iter()
            .map(|(rel, path)| {
                let meta = std::fs::metadata(&path).map_err(io("reading", &path))?;
                Ok((rel, path, meta))
            })
            .collect()
    }

    /// Reads template `name`'s files from the offsets in `from` (0 for others) and
    /// hands each non-zero chunk to `send`; stops early when `send` says so (blocking).
    /// Checksums are the manifest's business: only the chunks' bytes are read (holes,
    /// which read as zeros, are skipped unread).
    pub fn export(
        &self,
        name: &TemplateName,
        from: &BTreeMap<String, u64>,
        mut send: impl FnMut(TemplateChunk) -> bool,
    ) -> Result<(), TemplateError> {
        use std::os::unix::fs::FileExt;
        for (rel, path, meta) in self.listing(name)? {
            let size = meta.len();
            let file = File::open(&path).map_err(io("opening", &path))?;
            let mut offset = from.get(&rel).copied().unwrap_or(0).min(size);
            // The end of the range of data `offset` is in; holes (which read as zeros,
            // so would not be sent) are skipped a whole chunk at a time, unread.
            let mut data_end = offset;
            while offset < size {
                if offset >= data_end {
                    let Some((start, end)) = data_after(&file, offset, size) else {
                        break;
                    };
                    offset += (start - offset) / CHUNK as u64 * CHUNK as u64;
                    data_end = end;
                }
                let want = usize::try_from((size - offset).min(CHUNK as u64)).unwrap_or(CHUNK);
                let mut buf = BytesMut::zeroed(want);
                file.read_exact_at(&mut buf, offset)
                    .map_err(io("reading", &path))?;
                if buf.iter().any(|b| *b != 0) {
                    let chunk = TemplateChunk {
                        file: rel.clone(),
                        offset,
                        data: buf.freeze(),
                    };
                    if !send(chunk) {
                        return Ok(());
                    }
                }
                offset += want as u64;
            }
        }
        Ok(())
    }

    /// What an interrupted import of `manifest` left (per file, bytes known written);
    /// empty when there is none or it was of other content.
    pub fn import_state(&self, manifest: &TemplateManifest) -> BTreeMap<String, u64> {
        let dir = self.staging(&manifest.name);
        let same = std::fs::read(dir.join(MANIFEST))
            .ok()
            .and_then(|b| serde_json::from_slice::<TemplateManifest>(&b).ok())
            .is_some_and(|m| m == *manifest);
        if !same {
            return BTreeMap::new();
        }
        std::fs::read(dir.join(PROGRESS))
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default()
    }

    /// Starts (or resumes) an import of `manifest` (blocking).
    pub fn import(&self, manifest: TemplateManifest) -> Result<Import, TemplateError> {
        manifest.validate().map_err(backend)?;
        let target = self.data().template_dir(manifest.name.as_str());
        if target.exists() {
            return Err(backend(format!(
                "template {} is already on this host",
                manifest.name
            )));
        }
        let progress = self.import_state(&manifest);
        let dir = self.staging(&manifest.name);
        if progress.is_empty() {
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(&dir).map_err(io("creating", &dir))?;
            let m = serde_json::to_vec(&manifest).map_err(|e| backend(e.to_string()))?;
            wrenn_core::fsutil::write_atomic(&dir.join(MANIFEST), &m)
                .map_err(io("writing", &dir))?;
        }
        let mut files = BTreeMap::new();
        for f in &manifest.files {
            let path = dir.join("files").join(&f.path);
            if let Some(parent) = path.parent() {
                std::fs::create_dir_all(parent).map_err(io("creating", parent))?;
            }
            let file = OpenOptions::new()
                .create(true)
                .truncate(false)
                .write(true)
                .read(true)
                .open(&path)
                .map_err(io("creating", &path))?;
            // Past the recorded progress anything may have been written: zero it (a
            // resumed export skips zero ranges), keeping the file's size.
            let done = progress.get(&f.path).copied().unwrap_or(0).min(f.size);
            file.set_len(done).map_err(io("sizing", &path))?;
            file.set_len(f.size).map_err(io("sizing", &path))?;
            files.insert(f.path.clone(), file);
        }
        Ok(Import {
            store: self.clone(),
            dir,
            manifest,
            files,
            progress,
            unsaved: 0,
        })
    }
}

/// A template copy being written (staged until [`Import::finish`]).
pub struct Import {
    store: FsTemplates,
    dir: PathBuf,
    manifest: TemplateManifest,
    files: BTreeMap<String, File>,
    progress: BTreeMap<String, u64>,
    unsaved: u64,
}

impl std::fmt::Debug for Import {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Import")
            .field("template", &self.manifest.name)
            .finish_non_exhaustive()
    }
}

impl Import {
    /// Writes one chunk (blocking).
    pub fn write(&mut self, chunk: &TemplateChunk) -> Result<(), TemplateError> {
        let f = self
            .manifest
            .file(&chunk.file)
            .ok_or_else(|| backend(format!("chunk of unknown file {:?}", chunk.file)))?;
        let end = chunk
            .offset
            .checked_add(chunk.data.len() as u64)
            .filter(|end| *end <= f.size)
            .ok_or_else(|| backend(format!("chunk past the end of {:?}", chunk.file)))?;
        let file = self
            .files
            .get_mut(&chunk.file)
            .ok_or_else(|| backend(format!("chunk of unknown file {:?}", chunk.file)))?;
        file.seek(SeekFrom::Start(chunk.offset))
            .and_then(|_| file.write_all(&chunk.data))
            .map_err(|e| backend(format!("writing {}: {e}", chunk.file)))?;
        self.progress.insert(chunk.file.clone(), end);
        self.unsaved += chunk.data.len() as u64;
        if self.unsaved >= PROGRESS_EVERY {
            self.save_progress()?;
        }
        Ok(())
    }

    /// Records what is durably written, for a retry to resume from.
    fn save_progress(&mut self) -> Result<(), TemplateError> {
        for (path, file) in &self.files {
            file.sync_data()
                .map_err(|e| backend(format!("syncing {path}: {e}")))?;
        }
        let p = serde_json::to_vec(&self.progress).map_err(|e| backend(e.to_string()))?;
        wrenn_core::fsutil::write_atomic(&self.dir.join(PROGRESS), &p)
            .map_err(io("writing", &self.dir))?;
        self.unsaved = 0;
        Ok(())
    }

    /// Saves the progress of an import that stops here (for a retry).
    pub fn suspend(mut self) -> Result<(), TemplateError> {
        self.save_progress()
    }

    /// Checks every file against its checksum and installs the template (blocking). A
    /// copy that does not match is dropped (the next attempt starts afresh).
    pub fn finish(mut self) -> Result<(), TemplateError> {
        self.save_progress()?;
        self.files.clear();
        let staged = self.dir.join("files");
        for f in &self.manifest.files {
            let path = staged.join(&f.path);
            let crc = crc_of(&path)?;
            if crc != f.crc32 {
                let _ = std::fs::remove_dir_all(&self.dir);
                return Err(backend(format!(
                    "copy of {} does not match its checksum ({crc:08x}, expected {:08x})",
                    f.path, f.crc32
                )));
            }
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(f.mode & 0o777))
                .map_err(io("setting the mode of", &path))?;
        }
        let target = self.store.data().template_dir(self.manifest.name.as_str());
        std::fs::rename(&staged, &target).map_err(io("installing", &target))?;
        let _ = std::fs::remove_dir_all(&self.dir);
        if let Some(parent) = target.parent() {
            if let Ok(d) = File::open(parent) {
                let _ = d.sync_all();
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::paths::DataDir;
    use std::os::unix::fs::FileExt;

    /// A sparse file (data ranges across chunk edges, whole chunks of hole) has the
    /// checksum of its content and copies exactly, its all-hole chunks not sent.
    #[test]
    fn sparse_files_copy_exactly() {
        let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let from = FsTemplates::new(DataDir::new(a.path()));
        let to = FsTemplates::new(DataDir::new(b.path()));
        let snap = a.path().join("templates/t/snapshot");
        std::fs::create_dir_all(&snap).unwrap();
        std::fs::create_dir_all(b.path().join("templates")).unwrap();
        std::fs::write(a.path().join("templates/t/rootfs.img"), b"root").unwrap();
        let path = snap.join("memory.raw");
        let f = File::create(&path).unwrap();
        let (chunk, size) = (CHUNK as u64, 5 * CHUNK as u64 + 4097);
        for (at, len) in [
            (10, 100),
            (chunk - 5, 10),
            (3 * chunk + 8192, 8192),
            (size - 3, 3),
        ] {
            f.write_all_at(&vec![0xa5; len], at).unwrap();
        }
        f.set_len(size).unwrap();
        let bytes = std::fs::read(&path).unwrap();
        assert_eq!(crc_of(&path).unwrap(), crc32fast::hash(&bytes));

        let name = TemplateName::parse("t").unwrap();
        let mut import = to.import(from.manifest(&name).unwrap()).unwrap();
        let mut sent = Vec::new();
        from.export(&name, &BTreeMap::new(), |c| {
            sent.push((c.file.clone(), c.offset));
            import.write(&c).unwrap();
            true
        })
        .unwrap();
        import.finish().unwrap();
        let copy = b.path().join("templates/t/snapshot/memory.raw");
        assert_eq!(std::fs::read(copy).unwrap(), bytes);
        let memory: Vec<u64> = sent
            .iter()
            .filter(|(f, _)| f == "snapshot/memory.raw")
            .map(|(_, o)| *o)
            .collect();
        assert_eq!(memory, [0, chunk, 3 * chunk, 5 * chunk]);
    }
}
