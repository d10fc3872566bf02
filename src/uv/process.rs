//! Child processes (libuv's `src/unix/process.c`).

use super::event_loop::Loop;
use super::handle::RawHandle;

/// Per-loop process state: this loop's children, reaped on SIGCHLD.
#[derive(Default)]
pub(crate) struct LoopProcesses {}

/// The state of a process handle.
pub(crate) struct ProcessState {}

pub(crate) fn close_now(_lp: &mut Loop, _raw: RawHandle) {}
