//! Node's `cluster` module (`lib/cluster.js`, `lib/internal/cluster/`).
//!
//! A process is a *worker* when it was started with `NODE_UNIQUE_ID` in its
//! environment (by our [`Primary`] or by a real Node primary), and a
//! *primary* otherwise. The worker id is read once and the variable removed
//! from the environment, as Node does.
//!
//! * [`Primary`] (`primary.js`): forks workers, answers their
//!   `queryServer` with a `RoundRobinHandle` (round-robin) or a
//!   `SharedHandle` (kernel-balanced), and reports their life cycle.
//! * [`setup_worker`] (`child.js`): in a worker, connects to the primary,
//!   announces `online`, and routes `net::Server::listen`
//!   through the primary.
//! * [`Worker`] (`worker.js`): one worker, seen from either side.
//!
//! # A Rust cluster in one binary
//!
//! As in Node, the primary and its workers are usually one program: the
//! primary forks its own executable (with its own arguments, unless
//! [`Settings`] say otherwise), and [`setup_worker`] tells the program which
//! one it is. Each worker's [`Server::listen`](crate::net::Server::listen)
//! goes through the primary, which shares the port among them (round-robin
//! by default, [`SchedulingPolicy`] for the others).
//!
//! ```no_run
//! use std::io;
//! use uvcluster::cluster::{self, Primary};
//! use uvcluster::net::{ListenOptions, Server};
//! use uvcluster::uv::{Loop, RunMode, Stream};
//!
//! fn main() -> io::Result<()> {
//!     let mut lp = Loop::new()?;
//!     match cluster::setup_worker(&mut lp)? {
//!         // A worker: serve on port 8000, shared with the other workers.
//!         Some(_worker) => {
//!             let server = Server::new(&mut lp, |lp, server, conn| {
//!                 let Stream::Tcp(t) = conn else {
//!                     return server.close_connection(lp, conn);
//!                 };
//!                 let sent = lp.write(t, &[b"hello\n"], move |lp, t, _| {
//!                     server.close_connection(lp, Stream::Tcp(t))
//!                 });
//!                 if sent.is_err() {
//!                     server.close_connection(lp, Stream::Tcp(t));
//!                 }
//!             });
//!             server.listen(&mut lp, ListenOptions::port(8000), |_, _, r| {
//!                 r.expect("listen on 8000");
//!             })?;
//!         }
//!         // The primary: fork two workers (this same executable).
//!         None => {
//!             let primary = Primary::new();
//!             primary.on_listening(|_, w, addr| println!("worker {} on {addr:?}", w.id()));
//!             for _ in 0..2 {
//!                 primary.fork(&mut lp, Vec::new())?;
//!             }
//!         }
//!     }
//!     lp.run(RunMode::Default)?; // the primary: until its workers are gone
//!     Ok(())
//! }
//! ```
//!
//! # Restart on exit
//!
//! Node's cluster does not replace a worker that dies; its documentation's
//! pattern does it in the `exit` event: fork again, unless the worker was
//! disconnected on purpose ([`Worker::exited_after_disconnect`]). Here with
//! a graceful stop on SIGINT/SIGTERM ([`Primary::disconnect`]), whose
//! workers are not replaced. This is `examples/cluster_restart.rs`
//! (`cargo run --example cluster_restart`), which the tests run.
//!
//! ```no_run
#![doc = include_str!("../../examples/cluster_restart.rs")]
//! ```

mod child;
mod dispatch;
mod primary;
pub mod protocol;
mod round_robin_handle;
mod settings;
mod shared_handle;
mod worker;

use std::sync::OnceLock;

pub use child::setup_worker;
pub use dispatch::{
    ConnInfo, DEFAULT_HANDOFF_TIMEOUT, DEFAULT_HANDOFF_WINDOW, HANDOFF_WINDOW_ENV, HandoffFailure,
    HandoffOutcome, MAX_HANDOFF_WINDOW, Scheduler, WorkerLoad, parse_handoff_window,
};
pub use primary::{ClusterError, Primary};
pub use settings::{SchedulingPolicy, Settings};
pub use worker::{Address, ExitRequest, Worker, WorkerState};

/// The environment variable that makes a process a worker and carries its id.
pub const NODE_UNIQUE_ID: &str = "NODE_UNIQUE_ID";

static ROLE: OnceLock<Option<u32>> = OnceLock::new();

/// This process's worker id, read from `NODE_UNIQUE_ID` the first time any
/// role function is called, which also removes the variable from the
/// environment (so processes this one spawns are not workers by accident).
/// `None` in a primary. Call it at start-up, before spawning threads.
pub fn worker_id() -> Option<u32> {
    *ROLE.get_or_init(|| {
        let v = crate::uv::take_env_var(NODE_UNIQUE_ID)?;
        // Node: `+process.env.NODE_UNIQUE_ID | 0`.
        Some(
            v.to_str()
                .and_then(|s| s.trim().parse::<f64>().ok())
                .map_or(0, |f| f as i64 as u32),
        )
    })
}

/// Whether this process is a cluster worker (`cluster.isWorker`).
pub fn is_worker() -> bool {
    worker_id().is_some()
}

/// Whether this process is a primary (`cluster.isPrimary`).
pub fn is_primary() -> bool {
    !is_worker()
}
