//! The supervisor's options, with the defaults a PM2, gunicorn or systemd
//! user expects.
//!
//! Every field is plain data (durations are [`Duration`], sizes are bytes),
//! so the CLI can fill a [`SupervisorConfig`] from flags, environment and a
//! `uvcluster.toml` and a Rust primary can build one in code. Each default
//! names the tool it follows; where the proposal and a tool's
//! convention disagree, the tool wins and the reason is written on the field.

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

/// The most workers a supervisor runs (`workers`, `scale`): a bound, so
/// that a typo (`-w 100000`) is an error and not a fork storm that takes
/// the machine down (each worker is a process with its own memory).
pub const MAX_WORKERS: usize = 4096;

/// When an exited worker is replaced (`--restart`).
///
/// Only exits the supervisor did not ask for count: a worker that exits
/// after a disconnect it was sent (Node's `exitedAfterDisconnect`), or
/// during a stop, a reload or a scale-down, is never replaced by this
/// rule.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum RestartPolicy {
    /// Replace a worker whatever its exit code or signal (the Node
    /// documentation's re-fork-on-exit pattern, PM2's `autorestart: true`,
    /// systemd's `Restart=always`). The default.
    #[default]
    Always,
    /// Replace a worker that exited with a non-zero code or by a signal;
    /// a worker that exits 0 on its own leaves its slot empty (systemd's
    /// `Restart=on-failure`).
    OnFailure,
    /// Never replace a worker (PM2's `autorestart: false`); the primary
    /// exits when none is left.
    Never,
}

impl RestartPolicy {
    /// The values accepted by [`FromStr`], for error messages and `--help`.
    pub const VALUES: &'static [&'static str] = &["always", "on-failure", "never"];
}

impl fmt::Display for RestartPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            RestartPolicy::Always => "always",
            RestartPolicy::OnFailure => "on-failure",
            RestartPolicy::Never => "never",
        })
    }
}

impl FromStr for RestartPolicy {
    type Err = ConfigError;

    /// Parses `always`, `on-failure` or `never` (also `on_failure`).
    ///
    /// # Errors
    ///
    /// [`ConfigError`] naming the valid values for anything else.
    fn from_str(s: &str) -> Result<Self, ConfigError> {
        match s {
            "always" => Ok(RestartPolicy::Always),
            "on-failure" | "on_failure" => Ok(RestartPolicy::OnFailure),
            "never" => Ok(RestartPolicy::Never),
            _ => Err(ConfigError::invalid("restart", s, RestartPolicy::VALUES)),
        }
    }
}

/// When a started worker counts as ready (`--wait-ready`).
///
/// Readiness gates a rolling reload (the old worker is drained only once
/// its replacement is ready), resets nothing by itself (see
/// [`SupervisorConfig::stable_period`]) and decides whether a failed start
/// counts against the crash-loop budget.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum ReadyMode {
    /// Ready when the worker listens on every address its slot listened on
    /// before; on a slot's first start, when it has listened at least once
    /// (Node's `listening` event, PM2's default for cluster mode). The
    /// default.
    #[default]
    Listening,
    /// Ready when the worker sends the user message `'ready'`
    /// (`process.send('ready')`), PM2's `wait_ready` convention, so apps
    /// written for PM2 work unchanged.
    Message,
}

impl ReadyMode {
    /// The values accepted by [`FromStr`].
    pub const VALUES: &'static [&'static str] = &["listening", "message"];
}

impl fmt::Display for ReadyMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ReadyMode::Listening => "listening",
            ReadyMode::Message => "message",
        })
    }
}

impl FromStr for ReadyMode {
    type Err = ConfigError;

    /// Parses `listening` or `message` (also `ready`, PM2's word).
    ///
    /// # Errors
    ///
    /// [`ConfigError`] naming the valid values for anything else.
    fn from_str(s: &str) -> Result<Self, ConfigError> {
        match s {
            "listening" => Ok(ReadyMode::Listening),
            "message" | "ready" => Ok(ReadyMode::Message),
            _ => Err(ConfigError::invalid("ready", s, ReadyMode::VALUES)),
        }
    }
}

/// A rejected option: which one, the value given, and what is accepted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    /// The option's name, as in the config file (`restart`, `workers`).
    pub option: &'static str,
    /// The value that was refused.
    pub value: String,
    /// What would have been accepted, in words.
    pub expected: String,
}

impl ConfigError {
    fn invalid(option: &'static str, value: &str, values: &[&str]) -> ConfigError {
        ConfigError {
            option,
            value: value.to_owned(),
            expected: format!("one of {}", values.join(", ")),
        }
    }

    fn range(option: &'static str, value: impl fmt::Display, expected: &str) -> ConfigError {
        ConfigError {
            option,
            value: value.to_string(),
            expected: expected.to_owned(),
        }
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "invalid value '{}' for {}: expected {}",
            self.value, self.option, self.expected
        )
    }
}

impl std::error::Error for ConfigError {}

/// The supervisor's options.
///
/// [`Default`] gives the values below; each names the tool whose users
/// expect it. Durations are wall-clock (the loop's monotonic clock).
///
/// | field | default | follows |
/// |---|---|---|
/// | `workers` | number of CPUs | PM2 `-i max`, Node docs' `availableParallelism()` |
/// | `restart` | `always` | Node docs' re-fork pattern, PM2 `autorestart` |
/// | `backoff_initial` | 100 ms (the first restart is immediate) | PM2 `exp_backoff_restart_delay` (100 ms), Node docs' re-fork at once |
/// | `backoff_cap` | 15 s | PM2's exponential backoff cap (15 s) |
/// | `stable_period` | 30 s | PM2 resets the backoff after 30 s up |
/// | `max_restarts` / `restart_window` | 5 in 10 s | systemd `StartLimitBurst=5` / `StartLimitIntervalSec=10s` |
/// | `fail_before_ready` | `true` | a start that never gets ready is a crash loop (PM2 `min_uptime` idea) |
/// | `ready` | `listening` | PM2 cluster mode; `message` = PM2 `wait_ready` |
/// | `ready_timeout` | 30 s | between PM2 `listen_timeout` (8 s default, often raised) and systemd `TimeoutStartSec=90s` |
/// | `kill_timeout` | 30 s | gunicorn `graceful_timeout` (30 s) |
/// | `reload_batch` | 1 | one slot at a time (PM2 `reload`, gunicorn's rolling USR2+WINCH is one pool) |
/// | `worker_timeout` | 30 s | gunicorn `timeout` (30 s) |
/// | `max_memory` | none | PM2 `max_memory_restart` (off by default) |
/// | `max_connections` / jitter | none / 0 | gunicorn `max_requests` / `max_requests_jitter` (off by default) |
/// | `exit_grace` | 1 s | how long a primary with no worker left and nothing to restart waits before exiting non-zero |
/// | `duplicate_signal_window` | 500 ms | a second SIGTERM/SIGINT within it is the same request delivered twice |
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SupervisorConfig {
    /// How many worker slots to run (`--workers`); at least 1.
    pub workers: usize,
    /// Which exits are followed by a restart (`--restart`).
    pub restart: RestartPolicy,
    /// The backoff between restarts of one slot (`--backoff-initial`).
    /// The first restart of a slot that has been stable (its worker stayed
    /// up for [`stable_period`](Self::stable_period)), or never restarted,
    /// is immediate, so a lone crash costs only the replacement's start;
    /// the next restart within the stable period waits this long, and
    /// each further one twice the previous, up to
    /// [`backoff_cap`](Self::backoff_cap). A worker ended by SIGINT,
    /// SIGTERM, SIGQUIT or SIGHUP (what a terminal or a service manager
    /// sends the whole group) always waits at least this long, so that
    /// the primary's own copy of the signal, a stop, comes first.
    pub backoff_initial: Duration,
    /// The largest restart delay (`--backoff-cap`).
    pub backoff_cap: Duration,
    /// A worker that stays up this long resets its slot's backoff and
    /// crash count (`--stable-period`).
    pub stable_period: Duration,
    /// At most this many unrequested exits of one slot within
    /// [`restart_window`](Self::restart_window); one more and the slot is
    /// `errored` and no longer restarted (`--max-restarts`).
    pub max_restarts: u32,
    /// The window of [`max_restarts`](Self::max_restarts)
    /// (`--restart-window`).
    pub restart_window: Duration,
    /// A slot whose worker fails before it was ever ready (on its slot's
    /// first start, or as a restart's replacement) is `errored` at once
    /// after [`max_restarts`](Self::max_restarts) such failures in a row,
    /// whatever the window: a program that cannot start does not get better
    /// with time (`--fail-before-ready`). When `false`, such failures count
    /// like any other crash.
    pub fail_before_ready: bool,
    /// When a worker counts as ready (`--wait-ready` sets
    /// [`ReadyMode::Message`]).
    pub ready: ReadyMode,
    /// A worker not ready this long after its fork is killed (SIGKILL) and
    /// counts as a failed start (`--ready-timeout`).
    pub ready_timeout: Duration,
    /// How long a disconnected worker may take to exit before it is
    /// SIGKILLed (`--kill-timeout`); also bounds a graceful stop.
    pub kill_timeout: Duration,
    /// How many slots a rolling reload replaces at once (`--reload-batch`);
    /// at least 1.
    pub reload_batch: usize,
    /// A worker that leaves a handed-over connection unanswered this long is
    /// hung: killed and replaced (`--worker-timeout`). `None` disables it.
    pub worker_timeout: Option<Duration>,
    /// Replace a worker gracefully once its resident set exceeds this many
    /// bytes (`--max-memory`), sampled from `/proc`. `None` disables it.
    pub max_memory: Option<u64>,
    /// How often RSS is sampled when [`max_memory`](Self::max_memory) is
    /// set.
    pub memory_check_interval: Duration,
    /// Replace a worker gracefully after the dispatcher has handed it this
    /// many connections (`--max-connections`), counted on each handoff it
    /// accepts; at the limit it is also taken out of rotation at once when
    /// another worker is in rotation, so it is handed at most the limit
    /// plus the handoff window. Round-robin policies only (`rr`,
    /// `leastconn`, a user scheduler): under `none` and `reuseport` the
    /// kernel hands out the connections and nothing counts them. `None`
    /// disables it.
    pub max_connections: Option<u64>,
    /// Each worker's limit is `max_connections + random(0..=jitter)`, so the
    /// workers of a pool are not all replaced at once (gunicorn's
    /// `max_requests_jitter`) (`--max-connections-jitter`).
    pub max_connections_jitter: u64,
    /// When no worker is running and none will be restarted, the primary
    /// exits non-zero after this grace (so systemd or a container runtime
    /// applies its own restart policy).
    pub exit_grace: Duration,
    /// A SIGTERM or SIGINT arriving within this window after the previous
    /// one is the same request delivered twice (Ctrl-C reaches the whole
    /// process group, `timeout` may send twice), not the user's second
    /// request for an immediate stop.
    pub duplicate_signal_window: Duration,
}

impl Default for SupervisorConfig {
    fn default() -> SupervisorConfig {
        SupervisorConfig {
            workers: std::thread::available_parallelism().map_or(1, |n| n.get()),
            restart: RestartPolicy::Always,
            backoff_initial: Duration::from_millis(100),
            backoff_cap: Duration::from_secs(15),
            stable_period: Duration::from_secs(30),
            max_restarts: 5,
            restart_window: Duration::from_secs(10),
            fail_before_ready: true,
            ready: ReadyMode::Listening,
            ready_timeout: Duration::from_secs(30),
            kill_timeout: Duration::from_secs(30),
            reload_batch: 1,
            worker_timeout: Some(Duration::from_secs(30)),
            max_memory: None,
            memory_check_interval: Duration::from_secs(1),
            max_connections: None,
            max_connections_jitter: 0,
            exit_grace: Duration::from_secs(1),
            duplicate_signal_window: Duration::from_millis(500),
        }
    }
}

impl SupervisorConfig {
    /// Checks the values the supervisor cannot run with.
    ///
    /// # Errors
    ///
    /// [`ConfigError`] for `workers` or `reload_batch` of 0, a zero
    /// `backoff_initial`, a `backoff_cap` below `backoff_initial`, a
    /// `max_restarts` of 0, or a zero `ready_timeout`, `restart_window` or
    /// `memory_check_interval`.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.workers == 0 {
            return Err(ConfigError::range("workers", 0, "at least 1"));
        }
        if self.workers > MAX_WORKERS {
            return Err(ConfigError::range("workers", self.workers, "at most 4096"));
        }
        if self.reload_batch == 0 {
            return Err(ConfigError::range("reload-batch", 0, "at least 1"));
        }
        if self.backoff_initial.is_zero() {
            return Err(ConfigError::range("backoff-initial", "0", "more than 0"));
        }
        if self.backoff_cap < self.backoff_initial {
            return Err(ConfigError::range(
                "backoff-cap",
                format!("{} ms", self.backoff_cap.as_millis()),
                "at least backoff-initial",
            ));
        }
        if self.max_restarts == 0 {
            return Err(ConfigError::range("max-restarts", 0, "at least 1"));
        }
        for (name, d) in [
            ("ready-timeout", self.ready_timeout),
            ("restart-window", self.restart_window),
            ("memory-check-interval", self.memory_check_interval),
        ] {
            if d.is_zero() {
                return Err(ConfigError::range(name, "0", "more than 0"));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid_and_as_documented() {
        let c = SupervisorConfig::default();
        c.validate().unwrap();
        assert_eq!(c.kill_timeout, Duration::from_secs(30));
        assert_eq!(c.backoff_initial, Duration::from_millis(100));
        assert_eq!(c.backoff_cap, Duration::from_secs(15));
        assert_eq!(c.restart, RestartPolicy::Always);
        assert!(c.workers >= 1);
    }

    #[test]
    fn parse_errors_name_the_valid_values() {
        assert_eq!("on-failure".parse(), Ok(RestartPolicy::OnFailure));
        let e = "sometimes".parse::<RestartPolicy>().unwrap_err();
        assert_eq!(
            e.to_string(),
            "invalid value 'sometimes' for restart: expected one of always, on-failure, never"
        );
        assert_eq!("ready".parse(), Ok(ReadyMode::Message));
        assert!("x".parse::<ReadyMode>().is_err());
    }

    #[test]
    fn validate_rejects_zero_workers() {
        let c = SupervisorConfig {
            workers: 0,
            ..SupervisorConfig::default()
        };
        assert_eq!(c.validate().unwrap_err().option, "workers");
    }
}
