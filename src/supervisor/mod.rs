//! What Node's cluster leaves to the application and PM2: restart with
//! backoff, readiness, rolling reload, draining, limits, scaling and a
//! graceful stop.
//!
//! The policy is a pure state machine (`core`: events in, actions out,
//! time an input); the `Supervisor` shell executes its actions on a
//! [`cluster::Primary`](crate::cluster::Primary). See `docs/supervisor.md`
//! for the signal table and the defaults.

mod config;
mod core;

pub use config::{ConfigError, ReadyMode, RestartPolicy, SupervisorConfig};
