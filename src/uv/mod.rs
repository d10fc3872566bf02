//! The event loop and its handles: libuv's model on mio.
//!
//! # Handle life cycle
//!
//! A handle is created by an `*_init` call (`timer_init`, `tcp_init`, ...),
//! which returns a typed id such as [`Handle<Timer>`]. It becomes *active*
//! when started (a timer armed, a stream reading or listening, a process
//! running) and *inactive* when stopped. An active handle that is
//! *referenced* (the default; see [`Loop::unref_handle`]) keeps
//! [`Loop::run`] going. Outstanding requests (writes, connects, shutdowns)
//! keep the loop alive too, and cannot be unreferenced.
//!
//! [`Loop::close`] ends a handle: it stops at once and releases its fd, its
//! outstanding requests are cancelled, and its close callback runs in the
//! closing phase of the current iteration, after all other callbacks. Then
//! the id is stale: every later use returns an error wrapping
//! [`StaleHandle`]. Every handle must be closed; dropping the id does not
//! close anything.
//!
//! # Callbacks
//!
//! Every callback receives `&mut Loop` and its handle's id. Callbacks never
//! run inside the API call that registered them, only from a loop phase. If
//! a call that takes a callback returns `Err`, the callback is dropped and
//! never runs (libuv's rule).

mod event_loop;
mod handle;
mod loop_watcher;
mod pipe;
mod process;
mod signal;
mod stream;
mod tcp;
mod timer;
mod udp;

pub use event_loop::{Loop, RunMode};
pub use handle::{
    AnyHandle, Check, Handle, HandleType, Idle, Pipe, Prepare, Process, Signal, StaleHandle, Tcp,
    Timer, Udp,
};
pub use pipe::{Accepted, PendingType, Sendable, dup_fd_number, take_env_var};
pub use process::{ProcessOptions, Stdio, kill};
pub use stream::StreamType;
pub use tcp::BindFlags;
