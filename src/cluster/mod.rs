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
pub use worker::{Address, Worker, WorkerState};

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
