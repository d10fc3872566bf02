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
//!             let primary = Primary::new(&mut lp);
//!             primary.on_listening(&mut lp, |_, w, addr| {
//!                 println!("worker {} on {addr:?}", w.id())
//!             });
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
mod error;
mod primary;
pub mod protocol;
mod round_robin_handle;
mod settings;
mod shared_handle;
mod worker;

pub use child::setup_worker;
pub use dispatch::{
    ConnInfo, DEFAULT_HANDOFF_TIMEOUT, DEFAULT_HANDOFF_WINDOW, HANDOFF_WINDOW_ENV, HandoffFailure,
    HandoffOutcome, MAX_HANDOFF_WINDOW, Scheduler, WorkerLoad, parse_handoff_window,
};
pub use primary::{ClusterError, Primary};
pub use settings::{SchedulingPolicy, Settings};
pub use worker::{Address, ExitRequest, Worker, WorkerState};

use std::io;

use crate::uv::{CallbackSlot, Ids, Loop, Signum};

/// The environment variable that makes a process a worker and carries its id.
pub const NODE_UNIQUE_ID: &str = "NODE_UNIQUE_ID";

type ExitHandlerFn = dyn FnMut(&mut Loop, Worker, ExitRequest);

/// What ends a worker process the cluster would end (see
/// [`set_exit_handler`]).
pub type ExitHandler = Box<ExitHandlerFn>;

/// Which side a [`Worker`] lives on. Node's `Worker` is one class that
/// `primary.js` and `child.js` each extend; here the record says which,
/// and the methods whose meaning differs ([`Worker::disconnect`],
/// [`Worker::kill`]) are wired here, so that `worker.rs` depends on
/// neither side.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Side {
    /// The primary's record of a child.
    Primary(Primary),
    /// `cluster.worker` inside the worker process.
    Child,
}

impl Worker {
    /// Disconnects gracefully (`worker.disconnect()`). In the primary: sends
    /// `disconnect`; the worker closes its servers and its channel and
    /// exits once idle. In a worker: closes every server, tells the primary
    /// (`exitedAfterDisconnect`), then closes the channel.
    pub fn disconnect(self, lp: &mut Loop) {
        match self.side(lp) {
            Some(Side::Primary(p)) => p.disconnect_worker(lp, self),
            Some(Side::Child) => child::disconnect_self(lp, self),
            None => {}
        }
    }

    /// Kills the worker (`worker.kill(signal)`, default SIGTERM). In the
    /// primary this only signals the process, as Node 20 does, so
    /// `exited_after_disconnect` ends up `false`. In a worker it disconnects
    /// and then ends the process as the loop's exit handler says
    /// ([`set_exit_handler`](set_exit_handler); by default Node's
    /// `process.exit(0)`, `worker.destroy()`), unless
    /// [`on_exit_request`](Self::on_exit_request) says otherwise.
    ///
    /// # Errors
    ///
    /// The `kill(2)` error in the primary (`ESRCH` after exit).
    pub fn kill(self, lp: &mut Loop, signal: Option<Signum>) -> io::Result<()> {
        match self.side(lp) {
            Some(Side::Child) => {
                child::destroy_self(lp, self);
                Ok(())
            }
            _ => {
                let p = self
                    .process(lp)
                    .ok_or_else(|| io::Error::from_raw_os_error(3))?;
                lp.process_kill(p, signal.unwrap_or(Signum::SIGTERM))
            }
        }
    }
}

/// The cluster's state, kept in the loop ([`Loop::context_mut`]): every
/// object of the cluster layer, by id. Nothing of the cluster lives
/// outside it (ARCHITECTURE.md, *One model for every layer*).
#[derive(Default)]
pub(crate) struct ClusterContext {
    /// Primaries ([`Primary`] ids), usually one.
    primaries: Ids<primary::PrimaryState>,
    /// Workers ([`Worker`] ids): the primary's records of its children, or
    /// in a worker process its own record.
    workers: Ids<worker::WorkerRecord>,
    /// The primary's round-robin handles, each with its dispatcher.
    round_robin: Ids<round_robin_handle::RrState>,
    /// In a worker process, once [`setup_worker`] ran: its side of the
    /// cluster (`child.js`).
    child: Option<child::ChildState>,
    /// This process's role, read from `NODE_UNIQUE_ID` by the first
    /// [`worker_id`] on this loop: `Some(None)` in a primary.
    role: Option<Option<u32>>,
    /// What ends a worker process the cluster would end (see
    /// [`set_exit_handler`]); empty: Node's `process.exit(0)`.
    exit_handler: CallbackSlot<ExitHandlerFn>,
}

/// This process's worker id, read from `NODE_UNIQUE_ID` the first time a
/// role function is called on this loop, which also removes the variable
/// from the environment (so processes this one spawns are not workers by
/// accident). `None` in a primary. Call it at start-up, before spawning
/// threads; with one loop per process (as in Node), every later call
/// agrees with the first.
pub fn worker_id(lp: &mut Loop) -> Option<u32> {
    let ctx = lp.context_mut::<ClusterContext>();
    *ctx.role.get_or_insert_with(|| {
        let v = crate::uv::take_env_var(NODE_UNIQUE_ID)?;
        // Node: `+process.env.NODE_UNIQUE_ID | 0`.
        Some(
            v.to_str()
                .and_then(|s| s.trim().parse::<f64>().ok())
                .map_or(0, |f| f as i64 as u32),
        )
    })
}

/// Whether this process is a cluster worker (`cluster.isWorker`); see
/// [`worker_id`].
pub fn is_worker(lp: &mut Loop) -> bool {
    worker_id(lp).is_some()
}

/// Whether this process is a primary (`cluster.isPrimary`); see
/// [`worker_id`].
pub fn is_primary(lp: &mut Loop) -> bool {
    !is_worker(lp)
}

/// Sets what ends this worker process when the cluster would end it and
/// its [`Worker::on_exit_request`] is not set: its channel to the primary
/// was lost, or it was [killed](Worker::kill) from inside. The default,
/// and what `None` restores, is Node's: `process.exit(0)`
/// (`lib/internal/cluster/child.js`), which here is
/// [`std::process::exit`]`(0)`. An embedder that owns the process (a
/// test harness, a program that must flush or run destructors first) sets
/// its own for the whole loop.
///
/// # Examples
///
/// ```no_run
/// use uvcluster::cluster;
/// use uvcluster::uv::Loop;
///
/// let mut lp = Loop::new()?;
/// cluster::set_exit_handler(&mut lp, Some(Box::new(|lp: &mut Loop, _, why| {
///     eprintln!("the cluster asks this process to end: {why:?}");
///     lp.stop();
/// })));
/// # Ok::<(), std::io::Error>(())
/// ```
pub fn set_exit_handler(lp: &mut Loop, handler: Option<ExitHandler>) {
    let slot = &mut lp.context_mut::<ClusterContext>().exit_handler;
    match handler {
        Some(h) => slot.set(h),
        None => {
            slot.clear();
        }
    }
}

/// Ends a worker process as the loop's exit handler says; without one, as
/// Node does: `process.exit(0)`.
fn exit_by_default(lp: &mut Loop, w: Worker, why: ExitRequest) {
    let handled = lp.call_slot(
        |lp| Some(&mut lp.context_mut::<ClusterContext>().exit_handler),
        |lp, f| f(lp, w, why),
    );
    if handled.is_none() {
        // Node: `process.exit(kNoFailure)`.
        std::process::exit(0);
    }
}
