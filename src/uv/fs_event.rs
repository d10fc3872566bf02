//! File system event handles on inotify (libuv's `src/unix/linux.c`:
//! `uv_fs_event_start`, `uv_fs_event_stop`, `uv__inotify_read`).
//!
//! **One inotify instance per loop**, made by the first
//! [`Loop::fs_event_start`] and registered with the poller, as libuv does.
//! A watch descriptor (one per watched inode: watching a path twice gives
//! the same descriptor) is shared by every handle that watches it; it is
//! removed (`inotify_rm_watch`) when its last handle stops (libuv's
//! `watcher_list`). When the fd is readable, the poll phase reads every
//! queued event and calls, for each, every handle watching its descriptor.
//!
//! **Events, as libuv reports them.** An event carries
//! [`FsEvents::CHANGE`] when its mask has `IN_ATTRIB` or `IN_MODIFY`, and
//! [`FsEvents::RENAME`] when it has any other bit (a create, delete, move,
//! the watched file's own deletion or move, `IN_IGNORED`, `IN_ISDIR`).
//! The file name is the entry's name for an event inside a watched
//! directory, and the watched path's last component for an event on the
//! watched file or directory itself.
//!
//! **Recursion**, which libuv does not offer on Linux (its
//! `UV_FS_EVENT_RECURSIVE` works on macOS and Windows only): with
//! [`FsEventFlags::recursive`], the start walks the directory tree (never
//! following symlinks) and watches every directory; a directory created or
//! moved into the tree later is walked and watched when its event arrives,
//! and a directory deleted or moved out loses its watches. File names are
//! then paths relative to the watched directory (`src/lib.rs`), as on macOS
//! and Windows. Entries that appear inside a new directory before its watch
//! is in place are found by the walk and reported as
//! [`FsEvents::RENAME`] events, so none is missed (one made just as the
//! watch goes in may be reported twice, by the walk and by inotify). Events on a
//! subdirectory itself (its deletion) are reported once, by its parent, by
//! name. An ignore predicate ([`FsEventFlags::ignore`]) keeps directories
//! out of the walk and events out of the callback.
//!
//! **Overflow.** When the kernel's queue overflows
//! (`fs.inotify.max_queued_events`, `IN_Q_OVERFLOW`), events were lost:
//! every started handle of the loop gets one callback with an error
//! wrapping [`InotifyOverflow`] (libuv drops the event silently). A
//! watcher that must not miss anything rescans then.

use std::collections::HashMap;
use std::fmt;
use std::io;
use std::ops::{BitOr, BitOrAssign};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::rc::Rc;

use mio::Interest;
use mio::unix::SourceFd;
use nix::libc;

use super::callback::CallbackSlot;
use super::event_loop::{Data, INOTIFY_TOKEN, Loop, closing_err};
use super::handle::{FsEvent, Handle, RawHandle, flags};
use crate::sys::inotify::{Event, Inotify, Wd};

type FsEventFn = dyn FnMut(&mut Loop, Handle<FsEvent>, Option<&Path>, io::Result<FsEvents>);

/// What happened to a watched file (libuv's `uv_fs_event`): combine with
/// `|`, test with [`contains`](Self::contains). The values are libuv's
/// (`UV_RENAME` = 1, `UV_CHANGE` = 2).
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct FsEvents(u8);

impl FsEvents {
    /// An entry appeared, disappeared or was renamed (`UV_RENAME`).
    pub const RENAME: FsEvents = FsEvents(1);
    /// A file's data or attributes changed (`UV_CHANGE`).
    pub const CHANGE: FsEvents = FsEvents(2);

    /// Whether every event of `other` is in `self`.
    pub const fn contains(self, other: FsEvents) -> bool {
        self.0 & other.0 == other.0
    }

    /// Whether the set is empty.
    pub const fn is_empty(self) -> bool {
        self.0 == 0
    }

    /// libuv's number for the set.
    pub const fn bits(self) -> u8 {
        self.0
    }
}

impl BitOr for FsEvents {
    type Output = FsEvents;
    fn bitor(self, rhs: FsEvents) -> FsEvents {
        FsEvents(self.0 | rhs.0)
    }
}

impl BitOrAssign for FsEvents {
    fn bitor_assign(&mut self, rhs: FsEvents) {
        self.0 |= rhs.0;
    }
}

impl fmt::Debug for FsEvents {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (
            self.contains(FsEvents::RENAME),
            self.contains(FsEvents::CHANGE),
        ) {
            (true, true) => f.write_str("RENAME | CHANGE"),
            (true, false) => f.write_str("RENAME"),
            (false, true) => f.write_str("CHANGE"),
            (false, false) => f.write_str("EMPTY"),
        }
    }
}

/// A predicate on paths relative to the watched directory.
type Ignore = Rc<dyn Fn(&Path) -> bool>;

/// How [`Loop::fs_event_start`] watches (libuv's `uv_fs_event_flags`, and
/// an ignore predicate libuv does not have).
///
/// # Examples
///
/// ```
/// use std::path::Path;
/// use uvcluster::uv::FsEventFlags;
///
/// let flags = FsEventFlags::new().recursive(true).ignore(|p: &Path| {
///     p.components().any(|c| matches!(c.as_os_str().to_str(), Some(".git" | "target")))
/// });
/// assert!(flags.is_recursive());
/// assert!(flags.is_ignored(Path::new("target/debug")));
/// assert!(!flags.is_ignored(Path::new("src/lib.rs")));
/// ```
#[derive(Clone, Default)]
pub struct FsEventFlags {
    recursive: bool,
    ignore: Option<Ignore>,
}

impl fmt::Debug for FsEventFlags {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FsEventFlags")
            .field("recursive", &self.recursive)
            .field("ignore", &self.ignore.is_some())
            .finish()
    }
}

impl FsEventFlags {
    /// Not recursive, nothing ignored: libuv's flags 0.
    pub fn new() -> FsEventFlags {
        FsEventFlags::default()
    }

    /// Watch a directory's whole tree (`UV_FS_EVENT_RECURSIVE`, which
    /// libuv implements on macOS and Windows only): see the
    /// [`Loop::fs_event_start`] docs for how. No effect on a file.
    pub fn recursive(mut self, on: bool) -> FsEventFlags {
        self.recursive = on;
        self
    }

    /// Leave out every path for which `f` returns `true`. `f` receives
    /// paths relative to the watched directory (`target`,
    /// `src/.git/HEAD`); an ignored directory is not walked or watched, so
    /// nothing below it is reported, and an event whose file name is
    /// ignored does not reach the callback.
    pub fn ignore(mut self, f: impl Fn(&Path) -> bool + 'static) -> FsEventFlags {
        self.ignore = Some(Rc::new(f));
        self
    }

    /// Whether the flags ask for a recursive watch.
    pub fn is_recursive(&self) -> bool {
        self.recursive
    }

    /// Whether the ignore predicate leaves `rel` out (`false` without one).
    pub fn is_ignored(&self, rel: &Path) -> bool {
        self.ignore.as_ref().is_some_and(|f| f(rel))
    }
}

/// The error a callback receives when the kernel's inotify queue
/// overflowed (`IN_Q_OVERFLOW`): events were lost, for every handle of the
/// loop. Wrapped in an [`io::Error`] of kind `Other`; the handles stay
/// started.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InotifyOverflow;

impl fmt::Display for InotifyOverflow {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(
            "the inotify event queue overflowed (more than fs.inotify.max_queued_events \
             events were waiting): some events were lost",
        )
    }
}

impl std::error::Error for InotifyOverflow {}

/// The error for a watch refused because the user's inotify watch limit
/// is reached (`ENOSPC` from `inotify_add_watch`). Wrapped in an
/// [`io::Error`] of kind `StorageFull` (`ENOSPC`'s kind).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WatchLimit {
    path: PathBuf,
}

impl WatchLimit {
    /// The path that could not be watched.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl fmt::Display for WatchLimit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "cannot watch {}: the inotify watch limit is reached (ENOSPC); \
             raise fs.inotify.max_user_watches (sysctl fs.inotify.max_user_watches=524288) \
             or ignore more directories",
            self.path.display()
        )
    }
}

impl std::error::Error for WatchLimit {}

/// The error for a failed `inotify_add_watch` on `path`: `ENOSPC` becomes
/// a [`WatchLimit`], every other errno is kept as it is.
pub(crate) fn watch_error(e: io::Error, path: &Path) -> io::Error {
    if e.raw_os_error() == Some(libc::ENOSPC) {
        io::Error::new(
            io::ErrorKind::StorageFull,
            WatchLimit {
                path: path.to_path_buf(),
            },
        )
    } else {
        e
    }
}

/// One watch descriptor and the handles using it (libuv's
/// `watcher_list`).
struct Watch {
    /// The path it was added for (the first handle's).
    path: PathBuf,
    /// Each handle using it, with the directory's path relative to that
    /// handle's root (empty for the root itself).
    users: Vec<(RawHandle, PathBuf)>,
}

/// Per-loop inotify state.
#[derive(Default)]
pub(crate) struct LoopInotify {
    ino: Option<Inotify>,
    watches: HashMap<Wd, Watch>,
    /// Events read; kept for its allocation.
    buf: Vec<Event>,
}

/// The state of an fs event handle.
pub(crate) struct FsEventState {
    /// The watched path as given; `None` while stopped.
    path: Option<PathBuf>,
    flags: FsEventFlags,
    /// The directories this handle watches, by path relative to its root
    /// (the root itself is the empty path).
    wds: HashMap<PathBuf, Wd>,
    cb: CallbackSlot<FsEventFn>,
}

fn state_mut(lp: &mut Loop, raw: RawHandle) -> io::Result<&mut FsEventState> {
    match &mut lp.slot_mut(raw)?.data {
        Data::FsEvent(s) => Ok(s),
        _ => unreachable!("a Handle<FsEvent> always names an fs event slot"),
    }
}

fn state(lp: &Loop, raw: RawHandle) -> io::Result<&FsEventState> {
    match &lp.slot(raw)?.data {
        Data::FsEvent(s) => Ok(s),
        _ => unreachable!("a Handle<FsEvent> always names an fs event slot"),
    }
}

fn ensure_inotify(lp: &mut Loop) -> io::Result<()> {
    if lp.inotify.ino.is_none() {
        let ino = Inotify::new()?;
        let fd = ino.fd().as_raw_fd();
        lp.poll
            .registry()
            .register(&mut SourceFd(&fd), INOTIFY_TOKEN, Interest::READABLE)?;
        lp.inotify.ino = Some(ino);
    }
    Ok(())
}

/// Watches `abs` for handle `raw`, as its directory `rel`.
fn add(lp: &mut Loop, raw: RawHandle, rel: PathBuf, abs: &Path, only_dir: bool) -> io::Result<()> {
    let ino = lp.inotify.ino.as_ref().expect("inotify is created first");
    let wd = ino
        .add_watch(abs, only_dir)
        .map_err(|e| watch_error(e, abs))?;
    let st = state_mut(lp, raw)?;
    if let Some(old) = st.wds.insert(rel.clone(), wd)
        && old != wd
    {
        remove_user(lp, raw, old);
    }
    let w = lp.inotify.watches.entry(wd).or_insert_with(|| Watch {
        path: abs.to_path_buf(),
        users: Vec::new(),
    });
    if !w.users.iter().any(|(r, p)| *r == raw && *p == rel) {
        w.users.retain(|(r, _)| *r != raw);
        w.users.push((raw, rel));
    }
    Ok(())
}

/// Takes handle `raw` off descriptor `wd`; the last user removes the watch
/// (libuv's `maybe_free_watcher_list`).
fn remove_user(lp: &mut Loop, raw: RawHandle, wd: Wd) {
    let Some(w) = lp.inotify.watches.get_mut(&wd) else {
        return;
    };
    w.users.retain(|(r, _)| *r != raw);
    if w.users.is_empty() {
        lp.inotify.watches.remove(&wd);
        if let Some(ino) = &lp.inotify.ino {
            ino.rm_watch(wd);
        }
    }
}

/// Walks the directory `rel` of handle `raw` (already watched) and watches
/// every directory below it that the ignore predicate keeps. Entries found
/// go to `found` when given. Directories that vanish or cannot be read are
/// skipped; a watch refused for the watch limit ends the walk with that
/// error.
fn walk(
    lp: &mut Loop,
    raw: RawHandle,
    rel: PathBuf,
    mut found: Option<&mut Vec<PathBuf>>,
) -> io::Result<()> {
    let (root, flags) = {
        let st = state_mut(lp, raw)?;
        let Some(root) = st.path.clone() else {
            return Ok(());
        };
        (root, st.flags.clone())
    };
    let mut stack = vec![rel];
    while let Some(dir) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(root.join(&dir)) else {
            continue;
        };
        for entry in entries.flatten() {
            let child = dir.join(entry.file_name());
            if flags.is_ignored(&child) {
                continue;
            }
            if let Some(found) = found.as_deref_mut() {
                found.push(child.clone());
            }
            // DirEntry::file_type does not follow symlinks.
            if !entry.file_type().is_ok_and(|t| t.is_dir()) {
                continue;
            }
            match add(lp, raw, child.clone(), &root.join(&child), true) {
                Ok(()) => stack.push(child),
                Err(e) if e.kind() == io::ErrorKind::StorageFull => return Err(e),
                // Gone, replaced by a file, or unreadable: skip it.
                Err(_) => {}
            }
        }
    }
    Ok(())
}

/// Stops `raw` if it is started (`uv_fs_event_stop`).
fn stop_raw(lp: &mut Loop, raw: RawHandle) {
    let Ok(st) = state_mut(lp, raw) else { return };
    st.path = None;
    let wds: Vec<Wd> = st.wds.drain().map(|(_, wd)| wd).collect();
    for wd in wds {
        remove_user(lp, raw, wd);
    }
    lp.deactivate(raw);
}

pub(crate) fn close_now(lp: &mut Loop, raw: RawHandle) {
    stop_raw(lp, raw);
    if let Ok(st) = state_mut(lp, raw) {
        st.cb.clear();
    }
}

fn call(lp: &mut Loop, raw: RawHandle, name: Option<&Path>, r: io::Result<FsEvents>) {
    let Ok(s) = lp.slot_mut(raw) else { return };
    if s.flags & (flags::CLOSING | flags::ACTIVE) != flags::ACTIVE {
        return;
    }
    let Data::FsEvent(st) = &mut s.data else {
        return;
    };
    let Some(mut f) = st.cb.take() else { return };
    f(lp, Handle::from_raw(raw), name, r);
    if let Ok(st) = state_mut(lp, raw) {
        st.cb.put_back(f);
    }
}

/// The event bits as libuv maps them (`uv__inotify_read`).
fn events_of(mask: u32) -> FsEvents {
    let mut ev = FsEvents::default();
    if mask & (libc::IN_ATTRIB | libc::IN_MODIFY) != 0 {
        ev |= FsEvents::CHANGE;
    }
    if mask & !(libc::IN_ATTRIB | libc::IN_MODIFY) != 0 {
        ev |= FsEvents::RENAME;
    }
    ev
}

/// The inotify fd is readable: read every event and run the callbacks
/// (`uv__inotify_read`).
pub(crate) fn dispatch(lp: &mut Loop) {
    let Some(ino) = lp.inotify.ino.as_ref() else {
        return;
    };
    let mut evs = std::mem::take(&mut lp.inotify.buf);
    evs.clear();
    if let Err(e) = ino.read(&mut evs) {
        log::warn!("reading inotify events: {e}");
    }
    for ev in evs.drain(..) {
        on_event(lp, ev);
    }
    lp.inotify.buf = evs;
}

fn on_event(lp: &mut Loop, ev: Event) {
    if ev.mask & libc::IN_Q_OVERFLOW != 0 {
        let mut users: Vec<RawHandle> = lp
            .inotify
            .watches
            .values()
            .flat_map(|w| w.users.iter().map(|(r, _)| *r))
            .collect();
        users.sort_by_key(|r| r.index);
        users.dedup();
        for raw in users {
            call(lp, raw, None, Err(io::Error::other(InotifyOverflow)));
        }
        return;
    }
    let Some(w) = lp.inotify.watches.get(&ev.wd) else {
        // A watch removed since the event was queued.
        return;
    };
    let events = events_of(ev.mask);
    let base = w
        .path
        .file_name()
        .map(PathBuf::from)
        .unwrap_or_else(|| w.path.clone());
    let users = w.users.clone();
    let is_dir = ev.mask & libc::IN_ISDIR != 0;
    for (raw, rel) in users {
        let Ok(st) = state_mut(lp, raw) else { continue };
        // Stopped, or restarted elsewhere, by an earlier callback.
        if st.wds.get(&rel) != Some(&ev.wd) {
            continue;
        }
        let name: PathBuf = match &ev.name {
            Some(n) => rel.join(n),
            // An event on a subdirectory itself: its parent reports it.
            None if !rel.as_os_str().is_empty() => continue,
            // libuv: the watched path's last component.
            None => base.clone(),
        };
        // The predicate judges entries; an event on the watched path itself
        // (named by its last component) is always reported.
        if ev.name.is_some() && st.flags.is_ignored(&name) {
            continue;
        }
        let recursive = st.flags.recursive;
        let mut found = Vec::new();
        let mut limit = None;
        if recursive && is_dir && ev.name.is_some() {
            if ev.mask & (libc::IN_DELETE | libc::IN_MOVED_FROM) != 0 {
                let gone: Vec<(PathBuf, Wd)> = st
                    .wds
                    .iter()
                    .filter(|(p, _)| p.starts_with(&name))
                    .map(|(p, wd)| (p.clone(), *wd))
                    .collect();
                for (p, wd) in gone {
                    if let Ok(st) = state_mut(lp, raw) {
                        st.wds.remove(&p);
                    }
                    remove_user(lp, raw, wd);
                }
            }
            if ev.mask & (libc::IN_CREATE | libc::IN_MOVED_TO) != 0
                && let Some(root) = state_mut(lp, raw).ok().and_then(|st| st.path.clone())
            {
                let r = add(lp, raw, name.clone(), &root.join(&name), true)
                    .and_then(|()| walk(lp, raw, name.clone(), Some(&mut found)));
                match r {
                    Err(e) if e.kind() == io::ErrorKind::StorageFull => limit = Some(e),
                    // Gone again before the walk: its delete event follows.
                    _ => {}
                }
            }
        }
        call(lp, raw, Some(&name), Ok(events));
        for f in &found {
            call(lp, raw, Some(f), Ok(FsEvents::RENAME));
        }
        if let Some(e) = limit {
            call(lp, raw, None, Err(e));
        }
    }
    if ev.mask & libc::IN_IGNORED != 0
        && let Some(w) = lp.inotify.watches.remove(&ev.wd)
    {
        // The kernel dropped the watch (its file is gone): forget it.
        for (raw, rel) in w.users {
            if let Ok(st) = state_mut(lp, raw)
                && st.wds.get(&rel) == Some(&ev.wd)
            {
                st.wds.remove(&rel);
            }
        }
    }
}

impl Loop {
    /// Creates a file system event handle (`uv_fs_event_init`). It
    /// watches nothing until started.
    pub fn fs_event_init(&mut self) -> Handle<FsEvent> {
        Handle::from_raw(self.insert(Data::FsEvent(Box::new(FsEventState {
            path: None,
            flags: FsEventFlags::default(),
            wds: HashMap::new(),
            cb: CallbackSlot::empty(),
        }))))
    }

    /// Watches `path`, a file or a directory, for changes
    /// (`uv_fs_event_start`): `cb` runs in the poll phase with the file name
    /// and the events, or with `None` and an error. The handle is active
    /// while started.
    ///
    /// For a file, every event names the file (its last component). For a
    /// directory, an event on an entry names the entry, relative to the
    /// directory (`new.txt`), and an event on the directory itself names
    /// the directory. [`FsEvents::CHANGE`] is a data or attribute change,
    /// [`FsEvents::RENAME`] anything else (created, deleted, renamed):
    /// libuv's mapping, `CHANGE` for `IN_ATTRIB` or `IN_MODIFY` and `RENAME`
    /// for any other bit of the inotify mask (so a directory's attribute
    /// change, `IN_ATTRIB | IN_ISDIR`, is both). A rename inside a watched
    /// directory is two events, one per name. Deleting a watched file
    /// reports `CHANGE` (its link count), then `RENAME` twice (the deletion,
    /// the watch's end); the handle stays active until stopped, and reports
    /// nothing more.
    ///
    /// With [`FsEventFlags::recursive`] on a directory the whole tree is
    /// watched: one inotify watch per directory (files need none), added by
    /// a walk at the start and as directories appear; names are relative
    /// paths (`src/uv/mod.rs`). Directories the ignore predicate leaves out
    /// are not walked. Every loop shares one inotify fd among its handles,
    /// so an idle watch over any tree costs nothing per iteration; its cost
    /// is one watch per directory against the user's
    /// `fs.inotify.max_user_watches`.
    ///
    /// Errors after the start reach `cb` with no file name: an
    /// [`InotifyOverflow`] (events were lost), or a [`WatchLimit`] for a new
    /// directory that could not be watched. The handle stays started.
    ///
    /// # Examples
    ///
    /// ```
    /// use uvcluster::uv::{FsEventFlags, FsEvents, Loop, RunMode};
    ///
    /// let dir = std::env::temp_dir().join(format!("uvcluster-doc-fs-event-{}", std::process::id()));
    /// std::fs::create_dir_all(&dir)?;
    /// let mut lp = Loop::new()?;
    /// let h = lp.fs_event_init();
    /// lp.fs_event_start(h, &dir, FsEventFlags::new(), |lp, h, name, ev| {
    ///     assert_eq!(name.unwrap(), std::path::Path::new("new.txt"));
    ///     assert!(ev.unwrap().contains(FsEvents::RENAME));
    ///     lp.close(h, |_| {}).unwrap();
    /// })?;
    /// std::fs::write(dir.join("new.txt"), b"hello")?;
    /// lp.run(RunMode::Default)?;
    /// std::fs::remove_dir_all(&dir)?;
    /// # Ok::<(), std::io::Error>(())
    /// ```
    ///
    /// # Errors
    ///
    /// A stale id or closing handle; `EINVAL` for a handle already started
    /// (libuv's rule: stop it first); the errno of `inotify_add_watch` for
    /// `path` (`ENOENT` for a missing path, `EACCES`); a [`WatchLimit`]
    /// (kind `StorageFull`) when the watch limit is reached, at the root or
    /// anywhere in a recursive walk (the watches already added are then
    /// removed); `EMFILE` when the loop's inotify instance cannot be made.
    /// `cb` is then dropped and the handle is stopped. Subdirectories that
    /// vanish or cannot be read during a walk are skipped.
    pub fn fs_event_start(
        &mut self,
        h: Handle<FsEvent>,
        path: impl AsRef<Path>,
        flags: FsEventFlags,
        mut cb: impl FnMut(&mut Loop, Handle<FsEvent>, Option<&Path>, io::Result<FsEvents>) + 'static,
    ) -> io::Result<()> {
        let raw = h.raw;
        let s = self.slot(raw)?;
        if s.flags & flags::CLOSING != 0 {
            return Err(closing_err());
        }
        if s.flags & flags::ACTIVE != 0 {
            return Err(io::Error::from_raw_os_error(libc::EINVAL));
        }
        let path = path.as_ref().to_path_buf();
        ensure_inotify(self)?;
        let recursive = flags.recursive;
        {
            let st = state_mut(self, raw)?;
            st.path = Some(path.clone());
            st.flags = flags;
        }
        let r = add(self, raw, PathBuf::new(), &path, false).and_then(|()| {
            if recursive && path.is_dir() {
                walk(self, raw, PathBuf::new(), None)
            } else {
                Ok(())
            }
        });
        if let Err(e) = r {
            stop_raw(self, raw);
            return Err(e);
        }
        let st = state_mut(self, raw)?;
        st.cb
            .set(Box::new(move |lp, h, name, ev| cb(lp, h, name, ev)));
        self.activate(raw);
        Ok(())
    }

    /// Stops watching (`uv_fs_event_stop`): the handle's watches are
    /// removed (unless another handle shares them) and no further callback
    /// runs, even for events already read in this iteration. Stopping a
    /// stopped handle is fine.
    ///
    /// # Errors
    ///
    /// A stale id.
    pub fn fs_event_stop(&mut self, h: Handle<FsEvent>) -> io::Result<()> {
        self.slot(h.raw)?;
        stop_raw(self, h.raw);
        Ok(())
    }

    /// The path the handle watches, as given to
    /// [`fs_event_start`](Self::fs_event_start); `None` while it is stopped
    /// (`uv_fs_event_getpath`, which fails with `EINVAL` then).
    ///
    /// # Errors
    ///
    /// A stale id.
    pub fn fs_event_getpath(&self, h: Handle<FsEvent>) -> io::Result<Option<PathBuf>> {
        Ok(state(self, h.raw)?.path.clone())
    }

    /// The number of directories (and files) a started handle watches:
    /// 1 for a file or a plain directory watch, one per directory of the
    /// tree for a recursive one. 0 while stopped, and for a watched path
    /// that was deleted (the kernel ended its watch). Each is one inotify watch
    /// against `fs.inotify.max_user_watches`, shared with other handles
    /// that watch the same directory.
    ///
    /// # Errors
    ///
    /// A stale id.
    pub fn fs_event_watch_count(&self, h: Handle<FsEvent>) -> io::Result<usize> {
        Ok(state(self, h.raw)?.wds.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_are_mapped_as_libuv_does() {
        assert_eq!(events_of(libc::IN_MODIFY), FsEvents::CHANGE);
        assert_eq!(events_of(libc::IN_ATTRIB), FsEvents::CHANGE);
        assert_eq!(events_of(libc::IN_CREATE), FsEvents::RENAME);
        assert_eq!(events_of(libc::IN_MOVED_TO), FsEvents::RENAME);
        assert_eq!(events_of(libc::IN_IGNORED), FsEvents::RENAME);
        // libuv counts IN_ISDIR among "other bits".
        assert_eq!(
            events_of(libc::IN_ATTRIB | libc::IN_ISDIR),
            FsEvents::CHANGE | FsEvents::RENAME
        );
    }

    #[test]
    fn enospc_becomes_a_watch_limit_error_naming_the_sysctl() {
        let e = watch_error(
            io::Error::from_raw_os_error(libc::ENOSPC),
            Path::new("/srv/app/src"),
        );
        assert_eq!(e.kind(), io::ErrorKind::StorageFull);
        let limit = e.get_ref().unwrap().downcast_ref::<WatchLimit>().unwrap();
        assert_eq!(limit.path(), Path::new("/srv/app/src"));
        let msg = e.to_string();
        assert!(msg.contains("fs.inotify.max_user_watches"), "{msg}");
        assert!(msg.contains("/srv/app/src"), "{msg}");
        // Other errors keep their errno.
        let e = watch_error(io::Error::from_raw_os_error(libc::ENOENT), Path::new("x"));
        assert_eq!(e.raw_os_error(), Some(libc::ENOENT));
    }
}
