//! Signal handles (libuv's `src/unix/signal.c`).

use super::event_loop::Loop;
use super::handle::RawHandle;

/// Per-loop signal state: the self-pipe the process-wide handler writes to.
#[derive(Default)]
pub(crate) struct LoopSignals {}

/// The state of a signal handle.
pub(crate) struct SignalState {}

pub(crate) fn close_now(_lp: &mut Loop, _raw: RawHandle) {}

/// Reads the loop's self-pipe and runs the callbacks of the signals caught.
pub(crate) fn dispatch(_lp: &mut Loop) {}
