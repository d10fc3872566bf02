//! systemd integration: readiness notification (`sd_notify(3)`) and the
//! watchdog, for a primary run as a `Type=notify` or `Type=notify-reload`
//! service. Socket activation (`sd_listen_fds(3)`) is in the loop itself,
//! since every bind must see it: see [`Loop::listen_fds`](crate::uv::Loop::listen_fds).
//!
//! The model: systemd starts the service with `NOTIFY_SOCKET` naming a
//! Unix datagram socket; the service sends it newline-separated
//! assignments. A [`Notifier`] made by [`Notifier::from_env`] sends them:
//!
//! | Call | Datagram | When |
//! | --- | --- | --- |
//! | [`Notifier::ready`] | `READY=1` | once every worker listens, and at the end of each reload |
//! | [`Notifier::reloading`] | `RELOADING=1`, `MONOTONIC_USEC=<µs>` | at the start of a reload (`Type=notify-reload`) |
//! | [`Notifier::stopping`] | `STOPPING=1` | when a graceful stop begins |
//! | [`Notifier::status`] | `STATUS=<text>` | a one-line status for `systemctl status` |
//! | [`Notifier::watchdog`], [`Notifier::start_watchdog`] | `WATCHDOG=1` | every half `WATCHDOG_USEC`, from a loop timer |
//!
//! Without `NOTIFY_SOCKET` every call is a no-op that succeeds, so a
//! program calls them unconditionally. `docs/systemd.md` has the unit
//! files and how to try them.
//!
//! The datagram format is a few lines, and the `sd-notify` crate (0.5)
//! cannot reach an abstract socket (`NOTIFY_SOCKET=@name`, which
//! `sd_notify(3)` accepts and container managers use): the protocol is
//! written here, over std's `UnixDatagram` (`src/sys/notify.rs`).

mod notify;

pub use notify::{Notifier, NotifyEnvError};
