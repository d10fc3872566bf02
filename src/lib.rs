//! uvcluster: a libuv-style event loop on mio, and Node's `cluster` module on
//! top of it.
//!
//! * [`uv`] — the loop and its handles (timers, idle/prepare/check, TCP,
//!   pipes with fd passing, UDP, signals, processes), with libuv's phase
//!   order and callback rules.
#![warn(missing_docs, missing_debug_implementations)]

pub mod cluster;
pub mod ipc;
mod sys;
pub mod uv;
