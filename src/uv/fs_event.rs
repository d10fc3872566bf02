//! File system events (libuv's `src/unix/linux.c`, inotify part).

use super::event_loop::Loop;
use super::handle::RawHandle;

#[derive(Default)]
pub(crate) struct LoopInotify {}

pub(crate) struct FsEventState {}

pub(crate) fn close_now(_lp: &mut Loop, _raw: RawHandle) {}

pub(crate) fn dispatch(_lp: &mut Loop) {}
