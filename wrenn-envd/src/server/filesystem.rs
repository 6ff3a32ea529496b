//! `filesystem.Filesystem`: stat, list, make, move, remove, and directory watches
//! (a real server stream, and the create/poll/remove trio).

use super::identity::{as_user, IdentityError};
use super::rpc::{open_stream, stream_error_response, Rpc, RpcError};
use super::users::{Names, User};
use super::AppState;
use crate::connect::{Code, ConnectError};
use crate::proto::filesystem::watch_dir_response::{Event, KeepAlive, StartEvent};
use crate::proto::filesystem::*;
use crate::proto::Timestamp;
use axum::extract::State;
use axum::response::Response;
use axum::routing::post;
use axum::Router;
use futures_util::StreamExt;
use inotify::{Inotify, WatchDescriptor, WatchMask};
use std::collections::{HashMap, VecDeque};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use tokio::sync::mpsc;

/// Most polling watchers alive at once (each holds an inotify instance).
const MAX_WATCHERS: usize = 256;
/// Events a polling watcher buffers between polls; older ones are dropped.
const MAX_BUFFERED_EVENTS: usize = 65_536;
/// Prefix of the xattrs that carry user metadata.
pub const XATTR_PREFIX: &str = "user.e2b.";

pub fn router() -> Router<Arc<AppState>> {
    Router::new()
        .route("/filesystem.Filesystem/Stat", post(stat))
        .route("/filesystem.Filesystem/MakeDir", post(make_dir))
        .route("/filesystem.Filesystem/Move", post(move_entry))
        .route("/filesystem.Filesystem/ListDir", post(list_dir))
        .route("/filesystem.Filesystem/Remove", post(remove))
        .route("/filesystem.Filesystem/WatchDir", post(watch_dir))
        .route("/filesystem.Filesystem/CreateWatcher", post(create_watcher))
        .route(
            "/filesystem.Filesystem/GetWatcherEvents",
            post(get_watcher_events),
        )
        .route("/filesystem.Filesystem/RemoveWatcher", post(remove_watcher))
}

fn permissions_string(mode: u32, kind: char) -> String {
    let mut s = String::with_capacity(10);
    s.push(kind);
    for shift in [6u32, 3, 0] {
        let bits = (mode >> shift) & 7;
        s.push(if bits & 4 != 0 { 'r' } else { '-' });
        s.push(if bits & 2 != 0 { 'w' } else { '-' });
        s.push(if bits & 1 != 0 { 'x' } else { '-' });
    }
    s
}

/// User metadata (`user.e2b.*` xattrs, prefix stripped) from a listing and a getter.
fn collect_metadata(
    names: std::io::Result<xattr::XAttrs>,
    get: impl Fn(&str) -> std::io::Result<Option<Vec<u8>>>,
) -> HashMap<String, String> {
    let mut out = HashMap::new();
    if let Ok(names) = names {
        for name in names {
            let Some(name) = name.to_str() else { continue };
            let Some(key) = name.strip_prefix(XATTR_PREFIX) else {
                continue;
            };
            if let Ok(Some(v)) = get(name) {
                out.insert(key.to_string(), String::from_utf8_lossy(&v).into_owned());
            }
        }
    }
    out
}

/// User metadata of a file (`user.e2b.*` xattrs, prefix stripped).
pub fn read_metadata(path: &Path) -> HashMap<String, String> {
    collect_metadata(xattr::list(path), |name| xattr::get(path, name))
}

/// User metadata of an open file.
pub fn read_file_metadata(file: &std::fs::File) -> HashMap<String, String> {
    use xattr::FileExt;
    collect_metadata(file.list_xattr(), |name| file.get_xattr(name))
}

/// Describes one path. Symlinks report their target's type and set `symlinkTarget`.
pub fn entry_info(path: &Path, names: &Names) -> std::io::Result<EntryInfo> {
    let lmeta = std::fs::symlink_metadata(path)?;
    let is_symlink = lmeta.file_type().is_symlink();
    let (meta, target) = if is_symlink {
        let target = std::fs::read_link(path).ok().map(|t| {
            let abs = if t.is_absolute() {
                t
            } else {
                path.parent().unwrap_or(Path::new("/")).join(t)
            };
            super::users::clean(&abs).display().to_string()
        });
        (std::fs::metadata(path).unwrap_or(lmeta), target)
    } else {
        (lmeta, None)
    };
    let ft = meta.file_type();
    let (kind, ch) = if ft.is_dir() {
        (FileType::Directory, 'd')
    } else if ft.is_symlink() {
        // A dangling link: its target cannot be described.
        (FileType::Symlink, 'L')
    } else {
        (FileType::File, '-')
    };
    let mode = meta.permissions().mode() & 0o777;
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "/".to_string());
    Ok(EntryInfo {
        name,
        r#type: kind as i32,
        path: path.display().to_string(),
        size: i64::try_from(meta.len()).unwrap_or(i64::MAX),
        mode,
        permissions: permissions_string(mode, ch),
        owner: names.user(meta.uid()),
        group: names.group(meta.gid()),
        modified_time: Some(Timestamp {
            seconds: meta.mtime(),
            nanos: i32::try_from(meta.mtime_nsec()).unwrap_or(0),
        }),
        symlink_target: target,
        metadata: read_metadata(path),
        is_symlink,
    })
}

/// Creates `path` and every missing parent.
///
/// Runs inside [`as_user`]: the kernel checks each step against the user's
/// permissions and the new directories belong to the user from the start.
pub fn create_dirs(path: &Path) -> std::io::Result<()> {
    let mut missing = Vec::new();
    let mut cur = path;
    loop {
        match std::fs::symlink_metadata(cur) {
            Ok(_) => break,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                missing.push(cur.to_path_buf());
                match cur.parent() {
                    Some(p) => cur = p,
                    None => break,
                }
            }
            Err(e) => return Err(e),
        }
    }
    for dir in missing.iter().rev() {
        match std::fs::create_dir(dir) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

fn not_found_or(e: std::io::Error, path: &Path) -> ConnectError {
    if e.kind() == std::io::ErrorKind::NotFound {
        ConnectError::not_found(format!("path '{}' does not exist", path.display()))
    } else {
        ConnectError::from_io(&e, &format!("'{}'", path.display()))
    }
}

async fn stat(
    State(st): State<Arc<AppState>>,
    rpc: Rpc<StatRequest>,
) -> Result<Response, RpcError> {
    let user = st.rpc_user(&rpc.headers)?;
    let path = st.resolve_path(&rpc.msg.path, &user);
    let entry = as_user(&user, move || {
        entry_info(&path, &Names::load()).map_err(|e| not_found_or(e, &path))
    })
    .await?;
    Ok(rpc.reply(&StatResponse { entry: Some(entry) }))
}

async fn make_dir(
    State(st): State<Arc<AppState>>,
    rpc: Rpc<MakeDirRequest>,
) -> Result<Response, RpcError> {
    let user = st.rpc_user(&rpc.headers)?;
    let path = st.resolve_path(&rpc.msg.path, &user);
    let entry = as_user(&user, move || {
        match std::fs::metadata(&path) {
            Ok(m) if m.is_dir() => {
                return Err(ConnectError::new(
                    Code::AlreadyExists,
                    format!("directory '{}' already exists", path.display()),
                ))
            }
            Ok(_) => {
                return Err(ConnectError::invalid_argument(format!(
                    "path '{}' already exists and is not a directory",
                    path.display()
                )))
            }
            Err(_) => {}
        }
        create_dirs(&path).map_err(|e| ConnectError::from_io(&e, "creating directory"))?;
        entry_info(&path, &Names::load()).map_err(|e| not_found_or(e, &path))
    })
    .await?;
    Ok(rpc.reply(&MakeDirResponse { entry: Some(entry) }))
}

async fn move_entry(
    State(st): State<Arc<AppState>>,
    rpc: Rpc<MoveRequest>,
) -> Result<Response, RpcError> {
    let user = st.rpc_user(&rpc.headers)?;
    let src = st.resolve_path(&rpc.msg.source, &user);
    let dst = st.resolve_path(&rpc.msg.destination, &user);
    let entry = as_user(&user, move || {
        std::fs::symlink_metadata(&src).map_err(|e| not_found_or(e, &src))?;
        if let Some(parent) = dst.parent() {
            create_dirs(parent).map_err(|e| ConnectError::from_io(&e, "creating parent"))?;
        }
        std::fs::rename(&src, &dst).map_err(|e| ConnectError::from_io(&e, "moving"))?;
        entry_info(&dst, &Names::load()).map_err(|e| not_found_or(e, &dst))
    })
    .await?;
    Ok(rpc.reply(&MoveResponse { entry: Some(entry) }))
}

fn walk(dir: &Path, depth: u32, names: &Names, out: &mut Vec<EntryInfo>) -> std::io::Result<()> {
    let mut children: Vec<_> = std::fs::read_dir(dir)?.filter_map(Result::ok).collect();
    children.sort_by_key(|e| e.file_name());
    for child in children {
        let path = child.path();
        // Entries may vanish while listing; skip those.
        let Ok(info) = entry_info(&path, names) else {
            continue;
        };
        out.push(info);
        let real_dir = child.file_type().map(|t| t.is_dir()).unwrap_or(false);
        if depth > 1 && real_dir {
            // Unreadable subdirectories are listed but not descended into.
            let _ = walk(&path, depth - 1, names, out);
        }
    }
    Ok(())
}

async fn list_dir(
    State(st): State<Arc<AppState>>,
    rpc: Rpc<ListDirRequest>,
) -> Result<Response, RpcError> {
    let user = st.rpc_user(&rpc.headers)?;
    let path = st.resolve_path(&rpc.msg.path, &user);
    let depth = rpc.msg.depth.max(1);
    let entries = as_user(&user, move || {
        let meta = std::fs::metadata(&path).map_err(|e| not_found_or(e, &path))?;
        if !meta.is_dir() {
            return Err(ConnectError::invalid_argument(format!(
                "path '{}' is not a directory",
                path.display()
            )));
        }
        let mut out = Vec::new();
        walk(&path, depth, &Names::load(), &mut out).map_err(|e| not_found_or(e, &path))?;
        Ok(out)
    })
    .await?;
    Ok(rpc.reply(&ListDirResponse { entries }))
}

async fn remove(
    State(st): State<Arc<AppState>>,
    rpc: Rpc<RemoveRequest>,
) -> Result<Response, RpcError> {
    let user = st.rpc_user(&rpc.headers)?;
    let path = st.resolve_path(&rpc.msg.path, &user);
    as_user(&user, move || {
        let res = match std::fs::symlink_metadata(&path) {
            Ok(m) if m.is_dir() => std::fs::remove_dir_all(&path),
            Ok(_) => std::fs::remove_file(&path),
            Err(e) => Err(e),
        };
        match res {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(ConnectError::from_io(
                &e,
                &format!("removing '{}'", path.display()),
            )),
        }
    })
    .await?;
    Ok(rpc.reply(&RemoveResponse {}))
}

// ---- watches ----

fn is_network_mount(path: &Path) -> bool {
    const NFS: i64 = 0x6969;
    const SMB: i64 = 0x517B;
    const CIFS: i64 = 0xFF53_4D42;
    const SMB2: i64 = 0xFE53_4D42;
    const FUSE: i64 = 0x6573_5546;
    match nix::sys::statfs::statfs(path) {
        #[allow(clippy::unnecessary_cast)]
        Ok(s) => matches!(s.filesystem_type().0 as i64, NFS | SMB | CIFS | SMB2 | FUSE),
        Err(_) => false,
    }
}

const WATCH_MASK: WatchMask = WatchMask::CREATE
    .union(WatchMask::MODIFY)
    .union(WatchMask::DELETE)
    .union(WatchMask::MOVED_FROM)
    .union(WatchMask::MOVED_TO)
    .union(WatchMask::ATTRIB);

/// A running inotify watch whose events arrive on `rx`; dropping `task`'s handle stops it.
struct Watch {
    rx: mpsc::Receiver<FilesystemEvent>,
    task: tokio::task::JoinHandle<()>,
}

/// Watches `dir` and, when `recursive`, the directories below it (those that
/// cannot be watched are skipped). Runs inside [`as_user`]: adding a watch needs
/// read access to the directory. Fails only when `dir` itself cannot be watched.
fn add_tree(
    watches: &mut inotify::Watches,
    dir: &Path,
    recursive: bool,
    map: &mut HashMap<WatchDescriptor, PathBuf>,
) -> std::io::Result<()> {
    let wd = watches.add(dir, WATCH_MASK)?;
    map.insert(wd, dir.to_path_buf());
    if !recursive {
        return Ok(());
    }
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd.filter_map(Result::ok) {
            if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                let _ = add_tree(watches, &e.path(), true, map);
            }
        }
    }
    Ok(())
}

async fn start_watch(
    st: &AppState,
    req: &WatchDirRequest,
    user: &User,
) -> Result<Watch, ConnectError> {
    let root = st.resolve_path(&req.path, user);
    let recursive = req.recursive;
    let allow_network_mounts = req.allow_network_mounts;
    let dir = root.clone();
    let (inotify, mut map) = as_user(user, move || {
        let meta = std::fs::metadata(&dir).map_err(|e| not_found_or(e, &dir))?;
        if !meta.is_dir() {
            return Err(ConnectError::invalid_argument(format!(
                "path '{}' is not a directory",
                dir.display()
            )));
        }
        if !allow_network_mounts && is_network_mount(&dir) {
            return Err(ConnectError::new(
                Code::FailedPrecondition,
                format!(
                    "'{}' is on a network mount; set allow_network_mounts to watch it",
                    dir.display()
                ),
            ));
        }
        let inotify = Inotify::init().map_err(|e| ConnectError::from_io(&e, "inotify"))?;
        let mut map = HashMap::new();
        add_tree(&mut inotify.watches(), &dir, recursive, &mut map)
            .map_err(|e| ConnectError::from_io(&e, &format!("watching '{}'", dir.display())))?;
        Ok((inotify, map))
    })
    .await?;
    let mut stream = inotify
        .into_event_stream(vec![0u8; 16 * 1024])
        .map_err(|e| ConnectError::from_io(&e, "inotify stream"))?;
    let (tx, rx) = mpsc::channel(1024);
    let include_entry = req.include_entry;
    let user = user.clone();
    let task = tokio::spawn(async move {
        let watches = stream.watches();
        let mut names: Option<Arc<Names>> = None;
        while let Some(Ok(ev)) = stream.next().await {
            if ev.mask.contains(inotify::EventMask::IGNORED) {
                map.remove(&ev.wd);
                continue;
            }
            let (Some(dir), Some(name)) = (map.get(&ev.wd).cloned(), ev.name) else {
                continue;
            };
            let full = dir.join(&name);
            let kind = if ev
                .mask
                .intersects(inotify::EventMask::CREATE | inotify::EventMask::MOVED_TO)
            {
                if recursive && ev.mask.contains(inotify::EventMask::ISDIR) {
                    // New subdirectories are watched as the user too.
                    let (mut w, dir) = (watches.clone(), full.clone());
                    let added = as_user(&user, move || {
                        let mut added = HashMap::new();
                        let _ = add_tree(&mut w, &dir, true, &mut added);
                        Ok::<_, IdentityError>(added)
                    })
                    .await;
                    map.extend(added.unwrap_or_default());
                }
                EventType::Create
            } else if ev.mask.contains(inotify::EventMask::MODIFY) {
                EventType::Write
            } else if ev.mask.contains(inotify::EventMask::DELETE) {
                EventType::Remove
            } else if ev.mask.contains(inotify::EventMask::MOVED_FROM) {
                EventType::Rename
            } else if ev.mask.contains(inotify::EventMask::ATTRIB) {
                EventType::Chmod
            } else {
                continue;
            };
            let rel = full
                .strip_prefix(&root)
                .unwrap_or(&full)
                .display()
                .to_string();
            let entry = if include_entry && !matches!(kind, EventType::Remove | EventType::Rename) {
                let names = names.get_or_insert_with(|| Arc::new(Names::load())).clone();
                let path = full.clone();
                as_user(&user, move || entry_info(&path, &names)).await.ok()
            } else {
                None
            };
            let event = FilesystemEvent {
                name: rel,
                r#type: kind as i32,
                entry,
            };
            if tx.send(event).await.is_err() {
                break;
            }
        }
    });
    Ok(Watch { rx, task })
}

async fn watch_dir(State(st): State<Arc<AppState>>, rpc: Rpc<WatchDirRequest>) -> Response {
    let codec = rpc.codec;
    let keepalive = rpc.keepalive_interval();
    let watch = match st.rpc_user(&rpc.headers) {
        Ok(user) => start_watch(&st, &rpc.msg, &user).await,
        Err(e) => Err(e),
    };
    let watch = match watch {
        Ok(w) => w,
        Err(e) => return stream_error_response(codec, e),
    };
    let (sender, resp) = open_stream(codec);
    tokio::spawn(async move {
        let Watch { mut rx, task } = watch;
        let start = WatchDirResponse {
            event: Some(Event::Start(StartEvent {})),
        };
        if sender.send(&start).await.is_ok() {
            loop {
                let next = tokio::select! {
                    ev = tokio::time::timeout(keepalive, rx.recv()) => ev,
                    _ = sender.closed() => break,
                };
                let msg = match next {
                    Ok(Some(ev)) => Event::Filesystem(ev),
                    Ok(None) => break,
                    Err(_idle) => Event::Keepalive(KeepAlive {}),
                };
                if sender
                    .send(&WatchDirResponse { event: Some(msg) })
                    .await
                    .is_err()
                {
                    break;
                }
            }
        }
        task.abort();
        if !sender.is_closed() {
            sender.finish(None).await;
        }
    });
    resp
}

/// A polling watcher: events are buffered until `GetWatcherEvents` drains them.
#[derive(Debug)]
struct PollWatcher {
    events: Arc<Mutex<VecDeque<FilesystemEvent>>>,
    tasks: [tokio::task::JoinHandle<()>; 2],
}

impl Drop for PollWatcher {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

/// The polling watchers, by id.
#[derive(Debug, Default)]
pub struct Watchers {
    map: Mutex<HashMap<String, PollWatcher>>,
    next: std::sync::atomic::AtomicU64,
}

async fn create_watcher(
    State(st): State<Arc<AppState>>,
    rpc: Rpc<CreateWatcherRequest>,
) -> Result<Response, RpcError> {
    if st.watchers.map.lock().map(|m| m.len()).unwrap_or(0) >= MAX_WATCHERS {
        return Err(ConnectError::new(
            Code::ResourceExhausted,
            "too many watchers; remove some first",
        )
        .into());
    }
    let user = st.rpc_user(&rpc.headers)?;
    let Watch { mut rx, task } = start_watch(&st, &rpc.msg.clone().into(), &user).await?;
    let events = Arc::new(Mutex::new(VecDeque::new()));
    let sink = events.clone();
    let collector = tokio::spawn(async move {
        while let Some(ev) = rx.recv().await {
            if let Ok(mut q) = sink.lock() {
                if q.len() >= MAX_BUFFERED_EVENTS {
                    q.pop_front();
                }
                q.push_back(ev);
            }
        }
    });
    let n = st
        .watchers
        .next
        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let id = format!("w-{:08x}{:08x}", std::process::id(), n);
    if let Ok(mut m) = st.watchers.map.lock() {
        m.insert(
            id.clone(),
            PollWatcher {
                events,
                tasks: [task, collector],
            },
        );
    }
    Ok(rpc.reply(&CreateWatcherResponse { watcher_id: id }))
}

async fn get_watcher_events(
    State(st): State<Arc<AppState>>,
    rpc: Rpc<GetWatcherEventsRequest>,
) -> Result<Response, RpcError> {
    let events = {
        let m = st
            .watchers
            .map
            .lock()
            .map_err(|_| ConnectError::internal("watchers poisoned"))?;
        let w = m.get(&rpc.msg.watcher_id).ok_or_else(|| {
            ConnectError::not_found(format!("watcher '{}' not found", rpc.msg.watcher_id))
        })?;
        let mut q = w
            .events
            .lock()
            .map_err(|_| ConnectError::internal("watcher poisoned"))?;
        q.drain(..).collect::<Vec<_>>()
    };
    Ok(rpc.reply(&GetWatcherEventsResponse { events }))
}

async fn remove_watcher(
    State(st): State<Arc<AppState>>,
    rpc: Rpc<RemoveWatcherRequest>,
) -> Result<Response, RpcError> {
    let removed = st
        .watchers
        .map
        .lock()
        .ok()
        .and_then(|mut m| m.remove(&rpc.msg.watcher_id));
    if removed.is_none() {
        return Err(
            ConnectError::not_found(format!("watcher '{}' not found", rpc.msg.watcher_id)).into(),
        );
    }
    Ok(rpc.reply(&RemoveWatcherResponse {}))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn permissions_render_like_go() {
        assert_eq!(permissions_string(0o644, '-'), "-rw-r--r--");
        assert_eq!(permissions_string(0o755, 'd'), "drwxr-xr-x");
    }

    #[test]
    fn entry_info_follows_symlinks() {
        let dir = std::env::temp_dir().join(format!("envd-entry-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("sub")).unwrap();
        std::fs::write(dir.join("f.txt"), b"12345").unwrap();
        std::os::unix::fs::symlink("sub", dir.join("link")).unwrap();
        let names = Names::load();
        let f = entry_info(&dir.join("f.txt"), &names).unwrap();
        assert_eq!(
            (f.r#type, f.size, f.is_symlink),
            (FileType::File as i32, 5, false)
        );
        let l = entry_info(&dir.join("link"), &names).unwrap();
        assert_eq!(l.r#type, FileType::Directory as i32);
        assert!(l.is_symlink);
        assert_eq!(
            l.symlink_target.as_deref(),
            Some(dir.join("sub").to_str().unwrap())
        );
        let mut out = Vec::new();
        walk(&dir, 2, &names, &mut out).unwrap();
        let listed: Vec<_> = out.iter().map(|e| e.name.as_str()).collect();
        assert_eq!(listed, ["f.txt", "link", "sub"]);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    // ---- permissions: every RPC acts with the requested user's rights ----

    use crate::connect::Codec;
    use crate::server::test_support::{can_run, owner, state, Tree, GID, UID, USER};
    use base64::Engine;

    /// A JSON unary request as user `user` (HTTP Basic, like the SDK).
    fn rpc<M>(msg: M, user: &str) -> Rpc<M> {
        let mut headers = axum::http::HeaderMap::new();
        let basic = base64::engine::general_purpose::STANDARD.encode(format!("{user}:"));
        headers.insert(
            axum::http::header::AUTHORIZATION,
            format!("Basic {basic}").parse().unwrap(),
        );
        Rpc {
            msg,
            codec: Codec::Json,
            headers,
        }
    }

    /// The Connect code of a failed call, `None` on success.
    fn code(res: Result<Response, RpcError>) -> Option<Code> {
        match res {
            Ok(r) => {
                assert!(r.status().is_success(), "{r:?}");
                None
            }
            Err(RpcError(e)) => Some(e.code),
        }
    }

    const DENIED: Option<Code> = Some(Code::PermissionDenied);

    #[tokio::test]
    async fn stat_and_list_dir_check_the_users_permissions() {
        if !can_run() {
            return;
        }
        let t = Tree::new("stat");
        let st = state();
        let stat_as =
            |p: &str, u: &str| stat(State(st.clone()), rpc(StatRequest { path: t.s(p) }, u));
        assert_eq!(code(stat_as("private/file", USER).await), DENIED);
        assert_eq!(code(stat_as("private/file", "root").await), None);
        assert_eq!(
            code(stat_as("secret", USER).await),
            None,
            "stat needs no read access"
        );
        let list_as = |p: &str, u: &str| {
            list_dir(
                State(st.clone()),
                rpc(
                    ListDirRequest {
                        path: t.s(p),
                        depth: 1,
                    },
                    u,
                ),
            )
        };
        assert_eq!(code(list_as("private", USER).await), DENIED);
        assert_eq!(code(list_as("private", "root").await), None);
        assert_eq!(code(list_as("userdir", USER).await), None);
    }

    #[tokio::test]
    async fn make_dir_creates_as_the_user() {
        if !can_run() {
            return;
        }
        let t = Tree::new("mkdir");
        let st = state();
        let mk =
            |p: &str, u: &str| make_dir(State(st.clone()), rpc(MakeDirRequest { path: t.s(p) }, u));
        assert_eq!(code(mk("rootonly/d", USER).await), DENIED);
        assert!(!t.p("rootonly/d").exists());
        assert_eq!(code(mk("userdir/link_dir/d", USER).await), DENIED);
        assert!(!t.p("rootonly/d").exists());
        assert_eq!(code(mk("private/d/e", USER).await), DENIED);
        assert_eq!(code(mk("userdir/x/y", USER).await), None);
        assert_eq!(owner(&t.p("userdir/x")), (UID, GID));
        assert_eq!(owner(&t.p("userdir/x/y")), (UID, GID));
        assert_eq!(
            code(mk("userdir/x/y", USER).await),
            Some(Code::AlreadyExists)
        );
        assert_eq!(code(mk("rootonly/d", "root").await), None);
        assert_eq!(owner(&t.p("rootonly/d")), (0, 0));
    }

    #[tokio::test]
    async fn move_and_remove_check_the_users_permissions() {
        if !can_run() {
            return;
        }
        let t = Tree::new("mv");
        let st = state();
        std::fs::write(t.p("userdir/mine"), b"m").unwrap();
        std::os::unix::fs::chown(t.p("userdir/mine"), Some(UID), Some(GID)).unwrap();
        let mv = |a: &str, b: &str, u: &str| {
            move_entry(
                State(st.clone()),
                rpc(
                    MoveRequest {
                        source: t.s(a),
                        destination: t.s(b),
                    },
                    u,
                ),
            )
        };
        // Out of a directory the user cannot write, or into one: refused.
        assert_eq!(code(mv("secret", "userdir/stolen", USER).await), DENIED);
        assert!(t.p("secret").exists() && !t.p("userdir/stolen").exists());
        assert_eq!(
            code(mv("userdir/mine", "rootonly/mine", USER).await),
            DENIED
        );
        assert_eq!(
            code(mv("userdir/mine", "userdir/link_dir/mine", USER).await),
            DENIED
        );
        assert!(!t.p("rootonly/mine").exists());
        // Within its own directory, with new parents owned by the user.
        assert_eq!(
            code(mv("userdir/mine", "userdir/sub/mine", USER).await),
            None
        );
        assert_eq!(owner(&t.p("userdir/sub")), (UID, GID));

        let rm =
            |p: &str, u: &str| remove(State(st.clone()), rpc(RemoveRequest { path: t.s(p) }, u));
        assert_eq!(code(rm("secret", USER).await), DENIED);
        assert_eq!(code(rm("rootonly", USER).await), DENIED);
        assert!(t.p("secret").exists() && t.p("rootonly").exists());
        assert_eq!(code(rm("userdir/sub", USER).await), None);
        assert!(!t.p("userdir/sub").exists());
        assert_eq!(code(rm("secret", "root").await), None);
        assert!(!t.p("secret").exists());
        // Root moves anything.
        assert_eq!(code(mv("public.txt", "private/moved", "root").await), None);
        assert!(t.p("private/moved").exists());
    }

    #[tokio::test]
    async fn watches_need_the_users_read_access() {
        if !can_run() {
            return;
        }
        let t = Tree::new("watch");
        let st = state();
        let watch = |p: &str, u: &str| {
            create_watcher(
                State(st.clone()),
                rpc(
                    CreateWatcherRequest {
                        path: t.s(p),
                        ..Default::default()
                    },
                    u,
                ),
            )
        };
        assert_eq!(code(watch("private", USER).await), DENIED);
        assert_eq!(code(watch("private", "root").await), None);
        assert_eq!(code(watch("userdir", USER).await), None);
        // The streaming variant reports the same refusal.
        let resp = watch_dir(
            State(st.clone()),
            rpc(
                WatchDirRequest {
                    path: t.s("private"),
                    ..Default::default()
                },
                USER,
            ),
        )
        .await;
        let body = axum::body::to_bytes(resp.into_body(), usize::MAX)
            .await
            .unwrap();
        assert!(
            String::from_utf8_lossy(&body).contains("permission_denied"),
            "{body:?}"
        );
    }

    /// A recursive watch adds directories created later as the user: it does not
    /// descend into one the user cannot read. Reported entries are described too.
    #[tokio::test]
    async fn recursive_watch_adds_new_directories_as_the_user() {
        if !can_run() {
            return;
        }
        let t = Tree::new("watchrec");
        let st = state();
        let res = create_watcher(
            State(st.clone()),
            rpc(
                CreateWatcherRequest {
                    path: t.s("userdir"),
                    recursive: true,
                    include_entry: true,
                    ..Default::default()
                },
                USER,
            ),
        )
        .await
        .unwrap();
        let body = axum::body::to_bytes(res.into_body(), usize::MAX)
            .await
            .unwrap();
        let id: CreateWatcherResponse = Codec::Json.decode(&body).unwrap();
        // Root creates a directory the user cannot read and one it can.
        std::fs::create_dir(t.p("userdir/closed")).unwrap();
        std::fs::set_permissions(
            t.p("userdir/closed"),
            std::fs::Permissions::from_mode(0o700),
        )
        .unwrap();
        std::fs::create_dir(t.p("userdir/open")).unwrap();
        tokio::time::sleep(std::time::Duration::from_millis(300)).await;
        std::fs::write(t.p("userdir/closed/hidden"), b"x").unwrap();
        std::fs::write(t.p("userdir/open/seen"), b"x").unwrap();
        tokio::time::sleep(std::time::Duration::from_millis(300)).await;
        let res = get_watcher_events(
            State(st.clone()),
            rpc(
                GetWatcherEventsRequest {
                    watcher_id: id.watcher_id.clone(),
                },
                USER,
            ),
        )
        .await
        .unwrap();
        let body = axum::body::to_bytes(res.into_body(), usize::MAX)
            .await
            .unwrap();
        let events: GetWatcherEventsResponse = Codec::Json.decode(&body).unwrap();
        let names: Vec<_> = events.events.iter().map(|e| e.name.as_str()).collect();
        assert!(names.contains(&"open/seen"), "{names:?}");
        let seen = events.events.iter().find(|e| e.name == "open/seen");
        assert_eq!(
            seen.and_then(|e| e.entry.as_ref()).map(|e| e.size),
            Some(1),
            "{seen:?}"
        );
        assert!(!names.contains(&"closed/hidden"), "{names:?}");
        let _ = remove_watcher(
            State(st.clone()),
            rpc(
                RemoveWatcherRequest {
                    watcher_id: id.watcher_id,
                },
                USER,
            ),
        )
        .await;
    }
}
