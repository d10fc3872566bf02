//! uvcluster: a libuv-style event loop on mio, and Node's `cluster` module on
//! top of it.
//!
//! The crate has two halves. [`uv`] reimplements libuv's single-threaded
//! event loop on `mio`: the same handles, the same phase order and the same
//! callback rules; where it departs from libuv, `ARCHITECTURE.md` says how
//! and why. [`ipc`], [`net`] and [`cluster`] put Node's child-process
//! channel, the cluster-aware parts of Node's `net` and Node's `cluster`
//! module on that loop, speaking Node's wire protocol exactly, so that our
//! processes and real `node` processes can be each other's primary or
//! worker (the interop tests run real `node`). Linux only.
//!
//! * [`uv`] — the loop and its handles (timers, idle/prepare/check, TCP,
//!   pipes with fd passing, UDP, signals, processes), with libuv's phase
//!   order and callback rules.
//! * [`ipc`] — Node's IPC protocol over a [`uv::Pipe`]: newline-delimited
//!   JSON, handle passing with ACK/NACK, seq/ack requests; [`ipc::fork`] is
//!   Node's `child_process.fork`.
//! * [`net`] — Node's `net.Server` and `dgram` sockets on `uv` handles; in a
//!   worker, `listen` goes through the primary.
//! * [`cluster`] — Node's `cluster`: [`Primary`](cluster::Primary),
//!   [`setup_worker`](cluster::setup_worker), round-robin and shared
//!   scheduling, and our `reuseport` and `leastconn` policies. Its docs
//!   show a Rust primary and Rust workers in one binary, and the
//!   restart-on-exit pattern.
//! * [`supervisor`] — what Node leaves to PM2: a
//!   [`Supervisor`](supervisor::Supervisor) on a primary restarts workers
//!   with backoff, reloads them one at a time without losing a connection,
//!   drains, scales and stops gracefully.
//!
//! Messages are [`serde_json::Value`]s: the crate re-exports
//! [`serde_json`], so `uvcluster::serde_json::json!` builds one without a
//! dependency of your own, and [`Signum`] names the signals that the
//! signal and process functions take (`Signum::SIGTERM`).
//!
//! Layers point one way, `sys ← uv ← ipc ← net ← cluster ← supervisor`: only the private
//! `sys` module holds `unsafe` code and raw fds, and only [`uv`] names
//! `mio`. `ARCHITECTURE.md` at the repository root describes the model in
//! full.
//!
//! # The model
//!
//! A [`Loop`](uv::Loop) owns every handle. A handle is a typed, copyable id
//! such as [`Handle<Tcp>`](uv::Handle); every operation is a method on the
//! loop named after its libuv function (`lp.timer_start(t, ..)` is
//! `uv_timer_start`). Callbacks receive `&mut Loop` and their handle's id,
//! so they can start, stop or close anything; they never run inside the
//! call that registered them, and a call that returns `Err` drops its
//! callback. [`Loop::run`](uv::Loop::run) runs until no active, referenced
//! handle and no request is left. Every handle must be closed with
//! [`Loop::close`](uv::Loop::close) (or the quiet
//! [`Loop::close_if_open`](uv::Loop::close_if_open)); its id is then stale,
//! and using it is an error, never a hit on another handle.
//!
//! The layers above the loop follow the same model: a
//! [`net::Server`] is a typed id for state the loop keeps
//! ([`Loop::context_mut`](uv::Loop::context_mut), [`Ids`](uv::Ids)), and
//! callbacks are stored in [`CallbackSlot`](uv::CallbackSlot)s and called
//! with [`Loop::call_slot`](uv::Loop::call_slot). Arguments are typed at
//! the edge: timeouts are `Duration`s, signals [`Signum`]s, and
//! fds a handle takes over `OwnedFd`s.
//!
//! # A tour
//!
//! * Start here: [`Loop::new`](uv::Loop::new), [`Loop::run`](uv::Loop::run)
//!   and [`RunMode`](uv::RunMode), [`Loop::stop`](uv::Loop::stop),
//!   [`Loop::close`](uv::Loop::close), [`Loop::walk`](uv::Loop::walk).
//! * Time: [`Loop::timer_start`](uv::Loop::timer_start),
//!   [`Loop::now`](uv::Loop::now); per-iteration hooks:
//!   [`Loop::idle_start`](uv::Loop::idle_start),
//!   [`Loop::prepare_start`](uv::Loop::prepare_start),
//!   [`Loop::check_start`](uv::Loop::check_start).
//! * TCP: [`Loop::tcp_bind`](uv::Loop::tcp_bind),
//!   [`Loop::tcp_listen`](uv::Loop::tcp_listen) (each client arrives as a new
//!   handle), [`Loop::tcp_connect`](uv::Loop::tcp_connect); any stream:
//!   [`Loop::read_start`](uv::Loop::read_start),
//!   [`Loop::write`](uv::Loop::write), [`Loop::shutdown`](uv::Loop::shutdown).
//! * Pipes and fd passing: [`Loop::pipe_pair`](uv::Loop::pipe_pair),
//!   [`Loop::write2`](uv::Loop::write2),
//!   [`Loop::pipe_accept_pending`](uv::Loop::pipe_accept_pending) (a
//!   received fd becomes a [`Socket`](uv::Socket)),
//!   [`Loop::socket_open`](uv::Loop::socket_open) for an `OwnedFd`, and
//!   [`take_env_fd`](uv::take_env_fd) for an fd a parent placed.
//! * UDP: [`Loop::udp_bind`](uv::Loop::udp_bind),
//!   [`Loop::udp_send`](uv::Loop::udp_send),
//!   [`Loop::udp_recv_start`](uv::Loop::udp_recv_start).
//! * Signals and children: [`Loop::signal_start`](uv::Loop::signal_start),
//!   [`Loop::spawn`](uv::Loop::spawn) with
//!   [`ProcessOptions`](uv::ProcessOptions) (only the fds it places reach
//!   the child; a failure is a [`SpawnError`](uv::SpawnError) naming the
//!   program), and [`disable_stdio_inheritance`](uv::disable_stdio_inheritance)
//!   for a process that starts children (Node calls it at start-up).
//!
//! # Example: a TCP echo server
//!
//! The same code is in `README.md`; `examples/tcp_echo.rs` adds a
//! configurable port and a clean stop on SIGINT/SIGTERM.
//!
//! ```no_run
//! use std::io;
//! use uvcluster::uv::{BindFlags, Handle, Loop, RunMode, Tcp};
//!
//! fn main() -> io::Result<()> {
//!     let mut lp = Loop::new()?;
//!     let server = lp.tcp_init();
//!     lp.tcp_bind(server, ([127, 0, 0, 1], 7000).into(), BindFlags::default())?;
//!     // Each accepted client arrives as a new handle that the callback owns.
//!     lp.tcp_listen(server, 128, |lp, _server, client| match client {
//!         Ok(c) => lp.read_start(c, on_read).unwrap_or_else(|_| close(lp, c)),
//!         Err(e) => eprintln!("accept: {e}"),
//!     })?;
//!     lp.run(RunMode::Default)?; // until every handle is closed
//!     Ok(())
//! }
//!
//! fn on_read(lp: &mut Loop, c: Handle<Tcp>, data: io::Result<&[u8]>) {
//!     match data {
//!         Ok([]) | Err(_) => close(lp, c), // EOF or a read error
//!         // Writes what the socket takes now, queues (copies) the rest;
//!         // the write callback runs later, from a loop phase.
//!         Ok(data) => lp.write(c, &[data], |_, _, _| {}).unwrap_or_else(|_| close(lp, c)),
//!     }
//! }
//!
//! fn close(lp: &mut Loop, c: Handle<Tcp>) {
//!     // Closes unless a close is already under way; no close callback.
//!     lp.close_if_open(c);
//! }
//! ```
#![warn(missing_docs, missing_debug_implementations)]

pub mod cluster;
pub mod ipc;
pub mod net;
pub mod supervisor;
mod sys;
pub mod uv;

/// The JSON crate of every message this crate sends and receives
/// ([`serde_json::Value`]), re-exported so that its version always matches
/// ours.
pub use serde_json;

/// Signals by name ([`uv::Signum`], re-exported at the root): what
/// [`Loop::signal_start`](uv::Loop::signal_start),
/// [`Loop::process_kill`](uv::Loop::process_kill) and
/// [`Worker::kill`](cluster::Worker::kill) take.
///
/// ```
/// use uvcluster::Signum;
///
/// assert_eq!(Signum::SIGTERM.as_raw(), 15);
/// assert_eq!(Signum::try_from(10).unwrap(), Signum::SIGUSR1);
/// ```
pub use uv::Signum;
