//! inotify, for `FsEvent` handles (libuv's `src/unix/linux.c`:
//! `init_inotify`, `uv__inotify_read`): one instance per loop, created
//! `IN_CLOEXEC | IN_NONBLOCK`, through `nix`'s safe wrappers.

use std::ffi::OsString;
use std::io;
use std::os::fd::{AsFd, BorrowedFd};
use std::path::Path;

use nix::errno::Errno;
use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify as NixInotify, WatchDescriptor};

use super::fd::errno;

/// A watch descriptor: what `inotify_add_watch` returns. The same inode
/// watched twice gives the same descriptor.
pub(crate) type Wd = WatchDescriptor;

/// What every watch asks for: libuv's mask (`uv_fs_event_start`).
pub(crate) const WATCH_MASK: u32 = nix::libc::IN_ATTRIB
    | nix::libc::IN_CREATE
    | nix::libc::IN_MODIFY
    | nix::libc::IN_DELETE
    | nix::libc::IN_DELETE_SELF
    | nix::libc::IN_MOVE_SELF
    | nix::libc::IN_MOVED_FROM
    | nix::libc::IN_MOVED_TO;

/// One event as read.
#[derive(Debug)]
pub(crate) struct Event {
    pub(crate) wd: Wd,
    /// The raw `IN_*` bits.
    pub(crate) mask: u32,
    /// The entry's name, for an event inside a watched directory.
    pub(crate) name: Option<OsString>,
}

/// A loop's inotify instance.
#[derive(Debug)]
pub(crate) struct Inotify(NixInotify);

impl Inotify {
    /// `inotify_init1(IN_CLOEXEC | IN_NONBLOCK)`.
    pub(crate) fn new() -> io::Result<Inotify> {
        NixInotify::init(InitFlags::IN_CLOEXEC | InitFlags::IN_NONBLOCK)
            .map(Inotify)
            .map_err(errno)
    }

    /// The fd, to register with the poller.
    pub(crate) fn fd(&self) -> BorrowedFd<'_> {
        self.0.as_fd()
    }

    /// Watches `path` for [`WATCH_MASK`]; `only_dir` adds `IN_ONLYDIR |
    /// IN_DONT_FOLLOW` (a directory found by a walk, which must not have
    /// become a file or a symlink meanwhile). Errors keep their errno.
    pub(crate) fn add_watch(&self, path: &Path, only_dir: bool) -> io::Result<Wd> {
        let mut mask = AddWatchFlags::from_bits_retain(WATCH_MASK);
        if only_dir {
            mask |= AddWatchFlags::IN_ONLYDIR | AddWatchFlags::IN_DONT_FOLLOW;
        }
        self.0.add_watch(path, mask).map_err(errno)
    }

    /// Removes a watch. A watch the kernel already dropped (its file
    /// deleted) is `EINVAL`, which is ignored.
    pub(crate) fn rm_watch(&self, wd: Wd) {
        let _ = self.0.rm_watch(wd);
    }

    /// Reads every queued event into `out`, until the queue is empty.
    ///
    /// # Errors
    ///
    /// A read error other than `EAGAIN` (`EINTR` is retried).
    pub(crate) fn read(&self, out: &mut Vec<Event>) -> io::Result<()> {
        loop {
            match self.0.read_events() {
                Ok(evs) => out.extend(evs.into_iter().map(|e| Event {
                    wd: e.wd,
                    mask: e.mask.bits(),
                    name: e.name,
                })),
                Err(Errno::EAGAIN) => return Ok(()),
                Err(Errno::EINTR) => continue,
                Err(e) => return Err(errno(e)),
            }
        }
    }
}
