//! What Node's cluster leaves to the application and PM2: restart with
//! backoff, readiness, rolling reload, draining, limits, scaling and a
//! graceful stop.
//!
//! The policy is a pure state machine (`core.rs`: events in, actions out,
//! time an input); the [`Supervisor`] shell executes its actions on a
//! [`cluster::Primary`](crate::cluster::Primary). See `docs/supervisor.md`
//! for the signal table and the defaults.

mod config;
mod core;
mod shell;

pub use config::{ConfigError, MAX_WORKERS, ReadyMode, RestartPolicy, SupervisorConfig};
pub use core::{
    ExitInfo, KillReason, LifecycleEvent, REFUSED, ReloadError, ReloadReport, ReplaceReason,
    SlotId, StartFailure, WorkerId, WorkerState,
};
pub use shell::{RELAY_QUEUE_LIMIT, STDERR_LINES, SendCount, Supervisor, WorkerStatus};
