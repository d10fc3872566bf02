//! The log: one line per lifecycle event, in one vocabulary, through the
//! `log` crate and `env_logger` (`RUST_LOG` honoured; `info` when unset).
//!
//! Every line about a worker starts `worker ID (pid PID)` and ends with what
//! happened (`forked`, `listening on 127.0.0.1:8000`, `ready`, `draining`,
//! `exited`, `exited with code 3`, `killed by signal 9
//! (SIGKILL)`), so `grep 'worker 3 '` follows one worker. Nothing a user
//! reads is Rust's `Debug` spelling: durations print as `250ms` or `1m 30s`,
//! signals by name.

use std::io::Write;
use std::time::Duration;

use uvcluster::cluster::SchedulingPolicy;
use uvcluster::uv::Signum;

use crate::values::show_duration;

/// The `log` target of the CLI's own lines (the library's records keep
/// their module paths, `uvcluster::cluster::primary`).
pub const TARGET: &str = "uvcluster";

/// Sets up `env_logger`: `RUST_LOG` when set, else `info`. On a terminal
/// or a file each line is `TIME LEVEL TARGET: message` (RFC 3339 UTC
/// time to the millisecond; the target is `uvcluster` for the CLI's own
/// lines, a module path for the library's); under systemd
/// (`JOURNAL_STREAM` set) it is `<PRIORITY>message`, the syslog prefix the
/// journal reads as the line's level, without a second timestamp.
pub fn init() {
    let journal = std::env::var_os("JOURNAL_STREAM").is_some();
    // The supervisor also logs each event in its own words; the CLI writes
    // each in its own (with pids), so the supervisor's copies are dropped
    // unless RUST_LOG names the supervisor.
    let own_words = std::env::var("RUST_LOG").is_ok_and(|v| v.contains("supervisor"));
    let logger =
        env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info"))
            .format(move |buf, r| {
                if journal {
                    let prio = match r.level() {
                        log::Level::Error => 3,
                        log::Level::Warn => 4,
                        log::Level::Info => 6,
                        log::Level::Debug | log::Level::Trace => 7,
                    };
                    writeln!(buf, "<{prio}>{}", r.args())
                } else {
                    writeln!(
                        buf,
                        "{} {:<5} {}: {}",
                        buf.timestamp_millis(),
                        r.level(),
                        r.target(),
                        r.args()
                    )
                }
            })
            .build();
    let max = logger.filter();
    let logger = Filtered {
        inner: logger,
        drop_event_echoes: !own_words,
    };
    if log::set_boxed_logger(Box::new(logger)).is_ok() {
        log::set_max_level(max);
    }
}

/// The log target of the supervisor's records.
const SUPERVISOR_TARGET: &str = "uvcluster::supervisor::shell";

/// `env_logger` without the supervisor's echo of each event (and of a
/// slot's stderr lines, which the CLI's `errored` line quotes): of the
/// supervisor's records, those that start `cluster: ` (the cluster's
/// error reports) or `supervisor: ` (its own faults) stay.
struct Filtered {
    inner: env_logger::Logger,
    drop_event_echoes: bool,
}

impl log::Log for Filtered {
    fn enabled(&self, m: &log::Metadata<'_>) -> bool {
        self.inner.enabled(m)
    }

    fn log(&self, r: &log::Record<'_>) {
        if self.drop_event_echoes && r.target() == SUPERVISOR_TARGET {
            let msg = r.args().to_string();
            if !msg.starts_with("cluster: ") && !msg.starts_with("supervisor: ") {
                return;
            }
        }
        self.inner.log(r);
    }

    fn flush(&self) {
        self.inner.flush();
    }
}

/// `worker 3 (pid 1234)`, or `worker 3` before it has a pid.
pub fn who(id: u32, pid: Option<i32>) -> String {
    match pid {
        Some(pid) => format!("worker {id} (pid {pid})"),
        None => format!("worker {id}"),
    }
}

/// How a worker ended: `exited`, `exited with code 3`, `killed by signal 9
/// (SIGKILL)`.
pub fn how_it_ended(code: Option<i64>, signal: Option<Signum>) -> String {
    match (code, signal) {
        (Some(0), _) | (None, None) => "exited".into(),
        (Some(c), _) => format!("exited with code {c}"),
        (None, Some(s)) => format!("killed by signal {} ({s})", s.as_raw()),
    }
}

/// The pool starts: what runs, and the options a reader of the log most
/// often needs.
pub fn starting(opts: &crate::options::RunOptions) {
    let s = &opts.supervisor;
    let command: Vec<String> = opts
        .command
        .iter()
        .map(|w| w.to_string_lossy().into_owned())
        .collect();
    let mut limits = String::new();
    if let Some(m) = s.max_memory {
        limits.push_str(&format!(", max memory {}", crate::values::show_size(m)));
    }
    // The dispatcher counts connections only where the primary accepts
    // them: under `none` and `reuseport` the kernel hands them out, so
    // the limit does nothing there (a warning, not a refusal: the same
    // configuration may serve under another policy).
    let kernel = matches!(
        opts.policy,
        SchedulingPolicy::None | SchedulingPolicy::ReusePort
    );
    if let Some(n) = s.max_connections {
        if kernel {
            log::warn!(
                target: TARGET,
                "--max-connections {n} has no effect under policy {}: the kernel hands \
                 connections to the workers there, and nothing counts them (use rr or leastconn)",
                opts.policy.as_str()
            );
        } else {
            limits.push_str(&format!(", max connections {n}"));
        }
    }
    let from = match &opts.config_file {
        Some(f) => format!(", options from {}", f.display()),
        None => String::new(),
    };
    log::info!(
        target: TARGET,
        "starting {} worker(s) of `{}` (policy {}, restart {}, kill timeout {}{limits}{from})",
        s.workers,
        command.join(" "),
        opts.policy.as_str(),
        s.restart,
        show_duration(s.kill_timeout),
    );
}

/// A worker was forked.
pub fn forked(id: u32, pid: Option<i32>) {
    log::info!(target: TARGET, "{} forked", who(id, pid));
}

/// A worker listens on `addr` (`127.0.0.1:8000`, a path).
pub fn listening(id: u32, pid: Option<i32>, addr: &str) {
    log::info!(target: TARGET, "{} listening on {addr}", who(id, pid));
}

/// A worker is ready (it listens, or it sent `'ready'`), `after` its fork.
pub fn ready(id: u32, pid: Option<i32>, after: Duration) {
    log::info!(
        target: TARGET,
        "{} ready (after {})",
        who(id, pid),
        show_duration(after)
    );
}

/// A worker is out of rotation and being disconnected.
pub fn draining(id: u32, pid: Option<i32>) {
    log::info!(target: TARGET, "{} draining", who(id, pid));
}

/// A worker exited. An exit nobody asked for, with a non-zero code or a
/// signal, is a warning.
pub fn exited(id: u32, pid: Option<i32>, code: Option<i64>, signal: Option<Signum>, asked: bool) {
    let how = how_it_ended(code, signal);
    if asked || matches!((code, signal), (Some(0), _) | (None, None)) {
        log::info!(target: TARGET, "{} {how}", who(id, pid));
    } else {
        log::warn!(target: TARGET, "{} {how}", who(id, pid));
    }
}

/// Slot `slot` forks again after `delay` (its backoff): `at once` for
/// the first restart since the slot was stable.
pub fn restarting(slot: usize, delay: Duration) {
    if delay.is_zero() {
        log::info!(target: TARGET, "slot {slot} restarting at once");
    } else {
        log::info!(
            target: TARGET,
            "slot {slot} restarting in {}",
            show_duration(delay)
        );
    }
}

/// The cluster's error report (a failed handoff), an error line:
/// `worker 3 (pid 1234): the worker took a connection but ...` for one
/// worker, `cluster: connections waited ...` when no worker is concerned.
pub fn cluster_error(worker: Option<(u32, Option<i32>)>, e: &uvcluster::cluster::ClusterError) {
    match worker {
        Some((id, pid)) => log::error!(target: TARGET, "{}: {e}", who(id, pid)),
        None => log::error!(target: TARGET, "cluster: {e}"),
    }
}

/// A slot stopped being restarted (a crash loop, or starts that never got
/// ready): why, how its last worker ended, and the last lines its workers
/// wrote on stderr when the CLI saw them (`--prefix-output`).
pub fn errored(slot: usize, why: &str, last: Option<&str>, stderr: &[String]) {
    log::error!(target: TARGET, "{}", errored_line(slot, why, last, stderr));
}

/// The text of [`errored`]'s line.
fn errored_line(slot: usize, why: &str, last: Option<&str>, stderr: &[String]) -> String {
    let mut line = format!("slot {slot} errored: {why}");
    if let Some(last) = last {
        // `exited with code 7` reads as a verb; `killed by ...` needs one.
        let verb = if last.starts_with("killed") {
            "was "
        } else {
            ""
        };
        line.push_str(&format!("; its last worker {verb}{last}"));
    }
    line.push_str("; not restarted");
    if !stderr.is_empty() {
        line.push_str(&format!("; its last output: {}", stderr.join(" | ")));
    }
    line
}

/// `1 worker`, `2 workers`: a count of workers in words.
pub fn workers(n: usize) -> String {
    if n == 1 {
        "1 worker".into()
    } else {
        format!("{n} workers")
    }
}

/// A rolling reload began.
pub fn reload_started(workers: usize) {
    log::info!(target: TARGET, "reload started ({})", self::workers(workers));
}

/// A rolling reload replaced every worker.
pub fn reload_finished(workers: usize, took: Duration) {
    log::info!(
        target: TARGET,
        "reload finished ({} replaced in {})",
        self::workers(workers),
        show_duration(took)
    );
}

/// A stop began during a rolling reload: the reload ends there. The
/// replacements still starting are killed and every other worker is
/// stopped with the rest, so nothing "keeps serving".
pub fn reload_abandoned() {
    log::warn!(
        target: TARGET,
        "reload abandoned: a stop began; every worker, old or new, stops with it"
    );
}

/// A rolling reload of a pool of `workers` stopped, failing closed: the
/// old workers keep serving (`the old worker keeps serving` for one).
pub fn reload_failed(why: &str, workers: usize) {
    let old = if workers == 1 {
        "the old worker keeps serving"
    } else {
        "the old workers keep serving"
    };
    log::error!(target: TARGET, "reload failed: {why}; {old}");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exits_read_as_words() {
        assert_eq!(how_it_ended(Some(0), None), "exited");
        assert_eq!(how_it_ended(Some(3), None), "exited with code 3");
        assert_eq!(
            how_it_ended(None, Some(Signum::SIGKILL)),
            "killed by signal 9 (SIGKILL)"
        );
        assert_eq!(who(2, Some(77)), "worker 2 (pid 77)");
        assert_eq!(who(2, None), "worker 2");
        assert_eq!(workers(1), "1 worker");
        assert_eq!(workers(0), "0 workers");
        assert_eq!(workers(3), "3 workers");
    }

    /// `its last worker killed by signal 9` lacked its verb.
    #[test]
    fn errored_line_says_its_last_worker_was_killed() {
        let killed = how_it_ended(None, Some(Signum::SIGKILL));
        assert_eq!(
            errored_line(0, "crash loop", Some(&killed), &[]),
            "slot 0 errored: crash loop; its last worker was killed by signal 9 (SIGKILL); \
             not restarted"
        );
        let exited = how_it_ended(Some(7), None);
        assert_eq!(
            errored_line(
                1,
                "x",
                Some(&exited),
                &["Error: y".into(), "Node.js v20".into()]
            ),
            "slot 1 errored: x; its last worker exited with code 7; not restarted; \
             its last output: Error: y | Node.js v20"
        );
    }
}
