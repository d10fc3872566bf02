//! `uvcluster run`: the pool under a [`Supervisor`], its events in the
//! log, the worker output prefixes, and the exit status.

use std::cell::{Cell, RefCell};
use std::collections::{BTreeSet, HashMap, VecDeque};
use std::ffi::{OsStr, OsString};
use std::io::{self, Write};
use std::path::Path;
use std::rc::Rc;
use std::time::Duration;

use uvcluster::cluster::{Primary, Settings, Worker};
use uvcluster::ipc::ForkStdio;
use uvcluster::supervisor::{LifecycleEvent, ReadyMode, ReloadError, StartFailure, Supervisor};
use uvcluster::systemd::Notifier;
use uvcluster::uv::{Loop, RunMode, Signum};

use crate::control::Control;
use crate::events;
use crate::metrics::Metrics;
use crate::ops::Ops;
use crate::options::RunOptions;
use crate::values::show_duration;

/// Starts the control socket (`--control`) and the metrics endpoint
/// (`--metrics`) on `ops`, before any worker runs: a control socket a live
/// primary owns stops this one here.
fn operations(
    lp: &mut Loop,
    ops: &Ops,
    opts: &RunOptions,
) -> io::Result<(Option<Control>, Option<Metrics>)> {
    let control = match opts.control.path() {
        Some(_) => Some(
            Control::start(lp, ops.clone(), &opts.control, opts.control_timeout)
                .map_err(|e| io::Error::new(e.kind(), format!("control socket: {e}")))?,
        ),
        None => None,
    };
    let metrics = match opts.metrics {
        Some(addr) => Some(
            Metrics::start(lp, ops.clone(), addr)
                .map_err(|e| io::Error::new(e.kind(), format!("metrics on {addr}: {e}")))?
                .0,
        ),
        None => None,
    };
    Ok((control, metrics))
}

/// How a run ended; [`Outcome::code`] is the process's exit status.
#[derive(Debug, PartialEq, Eq)]
pub enum Outcome {
    /// The supervisor's own code: 0 after a graceful stop (its kill timeout
    /// included, as gunicorn's graceful timeout) or when every worker
    /// exited 0 and none is to be restarted; 1 when no worker is left
    /// running and none will be restarted after failures (a crash loop,
    /// every slot errored; not with `--watch`, where such a pool waits for
    /// the next change).
    Supervisor(i32),
    /// Stopped at once by this signal (a second SIGTERM/SIGINT, or
    /// SIGQUIT). Exit 128 + its number, as a shell reports a process
    /// killed by it.
    Immediate(Signum),
}

impl Outcome {
    /// The exit status (docs/cli.md, "Exit status").
    pub fn code(&self) -> u8 {
        match self {
            Outcome::Supervisor(c) => u8::try_from(*c).unwrap_or(1),
            Outcome::Immediate(s) => u8::try_from(128 + s.as_raw()).unwrap_or(1),
        }
    }
}

/// A program that cannot be started at all (exit 1, a start failure).
#[derive(Debug)]
pub struct CannotRun {
    /// The program as given.
    pub program: OsString,
    /// Why: `ENOENT` or `EACCES`.
    pub errno: nix::errno::Errno,
}

impl std::fmt::Display for CannotRun {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Node's words for a failed spawn (`spawn app ENOENT (No such file
        // or directory)`, as the library's spawn error), then what to check.
        let program = self.program.to_string_lossy();
        let hint = match self.errno {
            nix::errno::Errno::ENOENT if !program.contains('/') => "no such program in PATH",
            nix::errno::Errno::ENOENT => "no such file",
            _ => "not executable",
        };
        write!(
            f,
            "spawn {program} {:?} ({}): {program:?} {hint}",
            self.errno,
            self.errno.desc()
        )
    }
}

/// Either failure of [`run`] before the loop runs.
#[derive(Debug)]
pub enum StartError {
    /// The program cannot be started.
    CannotRun(CannotRun),
    /// Anything else (the loop, a signal handler, the configuration).
    Io(io::Error),
}

impl From<io::Error> for StartError {
    fn from(e: io::Error) -> StartError {
        StartError::Io(e)
    }
}

/// Finds `program` as `execvp` would (in `PATH` unless it names a path)
/// and checks it can be executed, so that a typo fails at once, naming the
/// program, rather than after the supervisor's crash-loop budget of failed
/// forks.
fn preflight(program: &OsStr) -> Result<(), CannotRun> {
    use nix::unistd::{AccessFlags, access};
    let executable = |p: &Path| p.is_file() && access(p, AccessFlags::X_OK).is_ok();
    let fail = |errno| {
        Err(CannotRun {
            program: program.to_owned(),
            errno,
        })
    };
    let path = Path::new(program);
    if program.as_encoded_bytes().contains(&b'/') {
        return match (path.exists(), executable(path)) {
            (_, true) => Ok(()),
            (true, false) => fail(nix::errno::Errno::EACCES),
            (false, _) => fail(nix::errno::Errno::ENOENT),
        };
    }
    let dirs = std::env::var_os("PATH").unwrap_or_else(|| "/usr/local/bin:/usr/bin:/bin".into());
    let mut seen = false;
    for dir in std::env::split_paths(&dirs) {
        let dir = if dir.as_os_str().is_empty() {
            Path::new(".").to_path_buf()
        } else {
            dir
        };
        let candidate = dir.join(path);
        if executable(&candidate) {
            return Ok(());
        }
        seen |= candidate.is_file();
    }
    fail(if seen {
        nix::errno::Errno::EACCES
    } else {
        nix::errno::Errno::ENOENT
    })
}

/// The settings that start the workers: the command, the policy, stderr
/// always piped (teed to ours, so that an `errored` line can quote its
/// last lines) and stdout piped when it is prefixed.
fn settings(opts: &RunOptions) -> Settings {
    let mut command = opts.command.iter().cloned();
    Settings {
        exec_path: command.next(),
        args: Some(command.collect()),
        exec_argv: Some(Vec::new()),
        scheduling_policy: Some(opts.policy),
        stdio: Some(vec![
            ForkStdio::Inherit,
            if opts.prefix_output {
                ForkStdio::Pipe
            } else {
                ForkStdio::Inherit
            },
            ForkStdio::Pipe,
            ForkStdio::Ipc,
        ]),
        ..Settings::default()
    }
}

/// Copies worker `w`'s piped output to ours: its stderr always (keeping
/// the slot's last lines in `tail`), its stdout with `--prefix-output`.
///
/// With `prefix`, each line is prefixed with `[worker ID] ` and written
/// whole, so lines of two workers never interleave, a last line without a
/// newline being written at the end of the stream. Without it the bytes
/// are written as they come, one write per read, as the worker wrote them
/// to an inherited stderr: the terminal shows the same text (Node sees a
/// pipe, not a TTY, on fd 2: docs/cli.md says so).
fn relay_output(lp: &mut Loop, w: Worker, tail: Tail, prefix: bool) {
    for fd in [1, 2] {
        let Some(pipe) = w.stdio(lp, fd) else {
            continue;
        };
        let prefix = if prefix {
            format!("[worker {}] ", w.id())
        } else {
            String::new()
        };
        // Bytes of a line not ended yet: to prefix it, or to keep it in
        // the tail (at most a tail line's worth).
        let mut partial: Vec<u8> = Vec::new();
        let tail = tail.clone();
        // The primary (and the supervisor, for stderr) read the pipe until
        // we take it over; nothing has been read yet: this runs in the
        // same callback as the fork.
        let _ = lp.read_stop(pipe);
        let res = lp.read_start(pipe, move |lp, pipe, r| {
            let data = r.unwrap_or(&[]);
            let eof = data.is_empty();
            if eof {
                lp.close_if_open(pipe);
            }
            let mut out = Vec::new();
            if prefix.is_empty() {
                out.extend_from_slice(data);
            }
            partial.extend_from_slice(data);
            let mut lines = Vec::new();
            while let Some(nl) = partial.iter().position(|&b| b == b'\n') {
                lines.push(partial.drain(..=nl).collect::<Vec<u8>>());
            }
            if eof && !partial.is_empty() {
                let mut last = std::mem::take(&mut partial);
                last.push(b'\n');
                lines.push(last);
            }
            // A line without an end is kept up to a tail line's worth.
            if prefix.is_empty() {
                partial.truncate(TAIL_LINE_CHARS * 4);
            }
            for line in &lines {
                if !prefix.is_empty() {
                    out.extend_from_slice(prefix.as_bytes());
                    out.extend_from_slice(line);
                }
                if fd == 2 {
                    let mut t = tail.borrow_mut();
                    let text = String::from_utf8_lossy(line);
                    t.push_back(text.trim_end().chars().take(TAIL_LINE_CHARS).collect());
                    if t.len() > TAIL_LINES {
                        t.pop_front();
                    }
                }
            }
            if !out.is_empty() {
                // A closed stdout/stderr of ours must not stop the primary.
                let _ = if fd == 1 {
                    io::stdout().lock().write_all(&out)
                } else {
                    io::stderr().lock().write_all(&out)
                };
            }
        });
        if let Err(e) = res {
            log::warn!(
                target: events::TARGET,
                "worker {}: cannot relay its output: {e}",
                w.id()
            );
        }
    }
}

/// Worker ids to pids, for the log lines of events that carry ids only.
type Pids = Rc<RefCell<HashMap<u32, i32>>>;

/// The last lines a slot's workers wrote on stderr (piped and teed to
/// ours), for its `errored` line.
type Tail = Rc<RefCell<VecDeque<String>>>;

/// What the CLI keeps of each slot for the lines of its failures (the
/// `errored` line, a failed reload or replacement, and the `ctl reload`
/// reply, which [`reload_failure`] writes without the journal): its
/// stderr tail, and what its workers listened on. One pool runs per
/// process, on its loop's thread, so the notes are that thread's.
#[derive(Default)]
struct SlotNotes {
    /// Each slot's stderr tail.
    tails: HashMap<usize, Tail>,
    /// What each worker listened on (`*:3114`, `127.0.0.1:8000`, a path),
    /// by worker id: kept until it exits, or, for the newest worker of its
    /// slot (a failed replacement), until its slot forks again.
    listened: HashMap<u32, BTreeSet<String>>,
    /// The newest worker forked for each slot.
    newest: HashMap<usize, u32>,
    /// What each slot's ready workers listened on: what its replacement
    /// must listen on to be ready (the supervisor's rule under
    /// [`ReadyMode::Listening`]).
    needs: HashMap<usize, BTreeSet<String>>,
    /// Readiness is the `'ready'` message (`--wait-ready`): where a worker
    /// listens does not make it ready.
    by_message: bool,
}

thread_local! {
    static NOTES: RefCell<SlotNotes> = RefCell::default();
}

/// What a failure line of slot `slot` adds to `failure`: for a ready
/// timeout of a worker that listened, but not on what its slot needs,
/// `; it listened on *:3199; its slot needs *:3114`; then the slot's last
/// stderr lines, `; its last output: QUOTE` (see [`quote`]).
fn failure_notes(slot: usize, failure: &StartFailure) -> String {
    NOTES.with(|n| {
        let n = n.borrow();
        let mut more = String::new();
        if let StartFailure::ReadyTimeout(_) = failure
            && !n.by_message
        {
            let listened = n.newest.get(&slot).and_then(|w| n.listened.get(w));
            let needs = n.needs.get(&slot);
            if let (Some(listened), Some(needs)) = (listened, needs)
                && !listened.is_empty()
                && !needs.is_subset(listened)
            {
                let join = |s: &BTreeSet<String>| s.iter().cloned().collect::<Vec<_>>().join(", ");
                more.push_str(&format!(
                    "; it listened on {}; its slot needs {}",
                    join(listened),
                    join(needs)
                ));
            }
        }
        let quoted = n
            .tails
            .get(&slot)
            .map(|t| quote(t.borrow().iter().map(String::as_str)))
            .unwrap_or_default();
        if !quoted.is_empty() {
            more.push_str(&format!("; its last output: {}", quoted.join(" | ")));
        }
        more
    })
}

/// How many stderr lines of a slot are kept for its `errored` line
/// (which quotes a few of them, see [`quote`]): enough to reach back past
/// a stack trace to the error above it.
const TAIL_LINES: usize = 50;

/// How many lines an `errored` line quotes when none looks like an error.
const QUOTE_LAST: usize = 3;

/// How much of each quoted line.
const TAIL_LINE_CHARS: usize = 200;

/// How often a graceful stop that is still waiting says for whom.
const STILL_WAITING: Duration = Duration::from_secs(5);

/// Whether `line` (from a worker's stderr) reads as the statement of an
/// error: Node's `Error: ...`/`TypeError: ...`, a Rust panic, a Python
/// `Traceback`/`ValueError: ...`, a Java `Exception`, a C tool's
/// `error: ...`. Indented lines (stack frames) never are.
fn looks_like_error(line: &str) -> bool {
    if line.starts_with(char::is_whitespace) || line.is_empty() {
        return false;
    }
    let lower = line.to_ascii_lowercase();
    line.contains("Error")
        || lower.starts_with("error")
        || lower.contains(" error:")
        || lower.contains("fatal")
        || line.contains("panicked at")
        || line.contains("Exception")
        || line.starts_with("Traceback")
}

/// Whether `line` states an error by its class: `Error: ...`,
/// `TypeError [ERR_X]: ...`, `java.io.IOException: ...` (a word ending in
/// `Error` or `Exception`, an optional `[CODE]`, then `:`), a Rust
/// `panicked at`, a Python `Traceback`. Such a line is quoted before any
/// other, so that Node's `Emitted 'error' event on Server instance at:`
/// (which comes after the cause of an unhandled `'error'` event) does not
/// hide the cause.
fn names_an_error_class(line: &str) -> bool {
    if line.contains("panicked at") || line.trim_start().starts_with("Traceback") {
        return true;
    }
    let t = line.trim_start();
    // The class: letters, digits, `_` and `.` (a Java package).
    let word_end = t
        .find(|c: char| !(c.is_alphanumeric() || c == '_' || c == '.'))
        .unwrap_or(t.len());
    let (class, rest) = t.split_at(word_end);
    if !(class.ends_with("Error") || class.ends_with("Exception")) {
        return false;
    }
    let rest = rest.trim_start();
    let rest = match rest.strip_prefix('[') {
        Some(r) => match r.split_once(']') {
            Some((code, after))
                if !code.is_empty() && code.chars().all(|c| c.is_alphanumeric() || c == '_') =>
            {
                after
            }
            _ => return false,
        },
        None => rest,
    };
    rest.starts_with(':')
}

/// Node's own lines after an unhandled error, which never state it:
/// `Emitted 'error' event on Server instance at:` and `Node.js v20.20.2`.
fn is_node_epilogue(line: &str) -> bool {
    line.starts_with("Emitted '")
        || line
            .strip_prefix("Node.js v")
            .is_some_and(|v| v.starts_with(|c: char| c.is_ascii_digit()))
}

/// Whether `line` is a stack frame (Node's `    at f (file:1:2)`,
/// Python's `  File "x.py", line 1`, Rust's `   0: f`).
fn looks_like_frame(line: &str) -> bool {
    line.starts_with(char::is_whitespace) && !line.trim().is_empty()
}

/// What an `errored` line quotes of a slot's last stderr `lines` (oldest
/// first): the last line that [`names_an_error_class`], else the last
/// line that states an error (one that [`looks_like_error`], or an
/// unindented line followed by stack frames; never Node's
/// [`is_node_epilogue`] lines),
/// with the line after it when it ends in `:` (a Rust panic's message
/// follows its `panicked at file:line:col:`), and the last line written,
/// blank lines skipped; without such a line, the last [`QUOTE_LAST`]
/// lines. A Node startup exception thus reads `Error: startup failure |
/// Node.js v20.20.2` instead of five stack frames.
fn quote<'a>(lines: impl Iterator<Item = &'a str>) -> Vec<String> {
    let lines: Vec<&str> = lines.filter(|l| !l.trim().is_empty()).collect();
    let error = (0..lines.len())
        .rev()
        .find(|&i| names_an_error_class(lines[i]))
        .or_else(|| {
            (0..lines.len()).rev().find(|&i| {
                !is_node_epilogue(lines[i])
                    && (looks_like_error(lines[i])
                        || (!lines[i].starts_with(char::is_whitespace)
                            && lines.get(i + 1).is_some_and(|n| looks_like_frame(n))))
            })
        });
    let Some(i) = error else {
        let from = lines.len().saturating_sub(QUOTE_LAST);
        return lines[from..].iter().map(|l| l.to_string()).collect();
    };
    let mut picked = vec![i];
    if lines[i].trim_end().ends_with(':') && lines.get(i + 1).is_some_and(|n| !looks_like_frame(n))
    {
        picked.push(i + 1);
    }
    let last = lines.len() - 1;
    if !picked.contains(&last) {
        picked.push(last);
    }
    picked.into_iter().map(|i| lines[i].to_string()).collect()
}

/// Why a start failed, in the log's words.
pub(crate) fn start_failure(f: &StartFailure) -> String {
    match f {
        StartFailure::Fork(e) => format!("could not be forked: {e}"),
        StartFailure::Exited(e) => format!(
            "{} before it was ready",
            events::how_it_ended(e.code, e.signal)
        ),
        StartFailure::ReadyTimeout(d) => {
            format!("was not ready within {}", show_duration(*d))
        }
    }
}

/// Why a reload failed, in the log's words (also the control socket's
/// reply): durations as the log writes them (`2s`, not `2000 ms`).
pub(crate) fn reload_failure(e: &ReloadError) -> String {
    match e {
        ReloadError::NotReady {
            slot,
            failure,
            replaced,
        } => format!(
            "the replacement for slot {slot} {} ({replaced} slot(s) replaced before it){}",
            start_failure(failure),
            failure_notes(*slot, failure)
        ),
        ReloadError::Stopped => "the primary is stopping".into(),
        ReloadError::Refused => uvcluster::supervisor::REFUSED.into(),
    }
}

/// What the log lines of the supervisor's events need besides the event.
struct Journal {
    primary: Primary,
    pids: Pids,
    prefix_output: bool,
    kill_timeout: Duration,
    /// The size of the pool the current (or last) reload replaces.
    reload_slots: Cell<usize>,
    /// The command is `node -e SCRIPT` with nothing after the script: an
    /// `errored` slot says why such workers never listen.
    node_eval: bool,
}

impl Journal {
    /// A worker was forked for `slot`: its line, its pid, its `listening`
    /// lines and its output (stderr, and stdout with `--prefix-output`). The supervisor
    /// reports the fork in the call that made it, before the loop reads
    /// anything the worker wrote.
    fn forked(&self, lp: &mut Loop, id: u32, slot: usize) {
        let Some(w) = self.primary.worker(lp, id) else {
            events::forked(id, None);
            return;
        };
        let pid = w.pid(lp);
        if let Some(pid) = pid {
            self.pids.borrow_mut().insert(id, pid);
        }
        events::forked(id, pid);
        // The supervisor takes the primary's `listening`; a worker's own
        // stays ours.
        w.on_listening(lp, |lp, w, a| {
            let addr = a.address.as_deref().unwrap_or("*");
            let addr = match a.port {
                Some(port) if port >= 0 => format!("{addr}:{port}"),
                _ => addr.to_string(),
            };
            events::listening(w.id(), w.pid(lp), &addr);
            NOTES.with(|n| {
                n.borrow_mut()
                    .listened
                    .entry(w.id())
                    .or_default()
                    .insert(addr)
            });
        });
        let tail = NOTES.with(|n| {
            let mut n = n.borrow_mut();
            // The slot's previous newest worker, when it has exited (a
            // failed replacement), is forgotten now.
            if let Some(prev) = n.newest.insert(slot, id)
                && !self.pids.borrow().contains_key(&prev)
            {
                n.listened.remove(&prev);
            }
            n.tails.entry(slot).or_default().clone()
        });
        relay_output(lp, w, tail, self.prefix_output);
    }

    /// What the `errored` line of slot `slot` quotes of its last stderr
    /// lines (see [`quote`]), oldest first.
    fn tail(&self, slot: usize) -> Vec<String> {
        NOTES.with(|n| {
            n.borrow()
                .tails
                .get(&slot)
                .map(|t| quote(t.borrow().iter().map(String::as_str)))
                .unwrap_or_default()
        })
    }

    /// Writes the log line of one supervisor event (docs/cli.md, "The
    /// log").
    fn event(&self, lp: &mut Loop, e: &LifecycleEvent) {
        log_event(lp, e, self)
    }
}

/// Writes the log line of one supervisor event (docs/cli.md, "The log").
fn log_event(lp: &mut Loop, e: &LifecycleEvent, j: &Journal) {
    use LifecycleEvent as E;
    let pids = &j.pids;
    let kill_timeout = j.kill_timeout;
    let pid = |id: &u32| pids.borrow().get(id).copied();
    match e {
        E::Forked { worker, slot } => j.forked(lp, *worker, *slot),
        E::ForkFailed { slot, error } => log::error!(
            target: events::TARGET,
            "slot {slot}: cannot fork a worker: {error}"
        ),
        E::Ready {
            worker,
            slot,
            after,
        } => {
            NOTES.with(|n| {
                let mut n = n.borrow_mut();
                let listened = n.listened.get(worker).cloned().unwrap_or_default();
                n.needs.entry(*slot).or_default().extend(listened);
            });
            events::ready(*worker, pid(worker), *after)
        }
        E::Draining { worker, .. } => events::draining(*worker, pid(worker)),
        E::Killed {
            worker,
            signal,
            reason,
            ..
        } => log::warn!(
            target: events::TARGET,
            "{} sent {signal}: {reason}",
            events::who(*worker, pid(worker))
        ),
        E::Exited {
            worker,
            exit,
            expected,
            ..
        } => {
            let p = pids.borrow_mut().remove(worker);
            NOTES.with(|n| {
                let mut n = n.borrow_mut();
                if !n.newest.values().any(|w| w == worker) {
                    n.listened.remove(worker);
                }
            });
            events::exited(*worker, p, exit.code, exit.signal, *expected);
        }
        E::Restarting { slot, delay } => events::restarting(*slot, *delay),
        E::Errored { slot, last, why } => {
            let last = last.map(|l| events::how_it_ended(l.code, l.signal));
            events::errored(*slot, why, last.as_deref(), &j.tail(*slot));
            if j.node_eval {
                log::warn!(
                    target: events::TARGET,
                    "slot {slot}: `node -e SCRIPT` with no argument after the script cannot be \
                     a cluster worker: Node makes a process one only when process.argv[1] is \
                     set, and -e alone leaves it unset, so it exits before it listens; give the \
                     script an argument (`node -e SCRIPT worker`) or run it from a file"
                );
            }
        }
        E::Replacing {
            slot,
            worker,
            reason,
        } => log::info!(
            target: events::TARGET,
            "slot {slot}: replacing {}: {reason}",
            events::who(*worker, pid(worker))
        ),
        E::ReplaceFailed { slot, failure } => log::error!(
            target: events::TARGET,
            "slot {slot}: the replacement {}{}; the old worker keeps serving",
            start_failure(failure),
            failure_notes(*slot, failure)
        ),
        E::ReloadStarted { slots } => {
            j.reload_slots.set(*slots);
            events::reload_started(*slots)
        }
        E::ReloadQueued => log::info!(
            target: events::TARGET,
            "reload queued: it runs once the current one ends"
        ),
        E::ReloadFinished(r) => events::reload_finished(r.replaced, r.duration),
        E::ReloadFailed(e @ ReloadError::NotReady { .. }) => {
            events::reload_failed(&reload_failure(e), j.reload_slots.get())
        }
        E::ReloadFailed(ReloadError::Stopped) => events::reload_abandoned(),
        // Not emitted as a failed reload (a refusal is its own event).
        E::ReloadFailed(ReloadError::Refused) => {}
        E::Refused { what, workers } => log::warn!(
            target: events::TARGET,
            "{what} {}; {} still running",
            uvcluster::supervisor::REFUSED,
            events::workers(*workers)
        ),
        E::Scaled { from, to } => log::info!(
            target: events::TARGET,
            "scaled from {from} to {}",
            events::workers(*to)
        ),
        E::NotScaled { workers, why } => log::warn!(
            target: events::TARGET,
            "not scaled: {why}; still {}",
            events::workers(*workers)
        ),
        E::Stopping {
            graceful: true,
            signal,
        } => {
            let by = signal.map_or_else(|| "stop".to_string(), |s| format!("signal {s}"));
            log::info!(
                target: events::TARGET,
                "{by}: stopping gracefully, disconnecting workers (killed after {}; \
                 a second SIGINT/SIGTERM stops at once)",
                show_duration(kill_timeout)
            );
            still_waiting(lp, pids.clone());
        }
        E::Stopping {
            graceful: false,
            signal,
        } => {
            let by = signal.map_or_else(|| "stop".to_string(), |s| format!("signal {s}"));
            log::warn!(
                target: events::TARGET,
                "{by}: stopping at once, killing every worker"
            );
        }
        E::DuplicateSignal(s) => log::info!(
            target: events::TARGET,
            "signal {s} again: the same request delivered twice, ignored"
        ),
        E::Exiting { code } => log::debug!(target: events::TARGET, "supervisor done, code {code}"),
    }
}

/// A graceful stop never waits silently (issue 10): every 5 s it says for
/// which workers it waits. The timer does not keep the loop alive.
fn still_waiting(lp: &mut Loop, pids: Pids) {
    let t = lp.timer_init();
    let _ = lp.timer_start(t, STILL_WAITING, STILL_WAITING, move |lp, t| {
        let mut left: Vec<(u32, i32)> = pids.borrow().iter().map(|(&i, &p)| (i, p)).collect();
        if left.is_empty() {
            // Every worker has exited: the stop waits for nothing more
            // (the primary exits next), and there is no one to name.
            lp.close_if_open(t);
            return;
        }
        left.sort_unstable();
        let left: Vec<String> = left
            .iter()
            .map(|(id, pid)| format!("{id} (pid {pid})"))
            .collect();
        log::info!(
            target: events::TARGET,
            "still waiting for worker(s) {} to finish; a second SIGINT/SIGTERM stops at once",
            left.join(", ")
        );
    });
    let _ = lp.unref_handle(t);
}

/// Runs the pool until the supervisor is done; returns how it ended.
///
/// # Errors
///
/// [`StartError::CannotRun`] when the program is not found or cannot be
/// executed; [`StartError::Io`] when the loop or a signal handler cannot be
/// set up.
pub fn run(opts: RunOptions) -> Result<Outcome, StartError> {
    uvcluster::uv::disable_stdio_inheritance();
    // Before any worker could inherit NOTIFY_SOCKET; the loop then takes
    // LISTEN_FDS (socket activation: a bind of an inherited address takes
    // the inherited socket).
    let notify = Notifier::from_env()?;
    let mut lp = Loop::new()?;
    let sd = Rc::new(crate::systemd::Systemd::start(
        &mut lp,
        notify,
        opts.supervisor.workers,
    )?);
    // After the systemd variables: a bad one is named before anything else.
    preflight(&opts.command[0]).map_err(StartError::CannotRun)?;
    let primary = Primary::new(&mut lp);
    primary.setup_primary(&mut lp, settings(&opts));
    primary.set_handoff_window(&mut lp, opts.handoff_window);

    NOTES.with(|n| {
        *n.borrow_mut() = SlotNotes {
            by_message: opts.supervisor.ready == ReadyMode::Message,
            ..SlotNotes::default()
        }
    });
    let journal = Journal {
        primary,
        pids: Rc::default(),
        prefix_output: opts.prefix_output,
        kill_timeout: opts.supervisor.kill_timeout,
        node_eval: crate::options::node_eval_without_argv1(&opts.command),
        reload_slots: Cell::new(opts.supervisor.workers),
    };
    let journal_pids = journal.pids.clone();
    let sup = Supervisor::with_primary(&mut lp, primary, opts.supervisor.clone())
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e.to_string()))?;
    let watcher = match &opts.watch {
        Some(w) => {
            // In development a crash loop after a broken save waits for
            // the fix instead of ending the primary (docs/deploy.md).
            sup.hold_when_errored(&mut lp, true);
            Some(crate::watch::Watcher::start(&mut lp, &sup, w)?)
        }
        None => None,
    };
    sup.set_broadcast(&mut lp, opts.broadcast);
    let ops = Ops::new(sup);
    let (control, metrics) = operations(&mut lp, &ops, &opts)?;
    sup.on_exit(&mut lp, move |lp, _| {
        if let Some(c) = &control {
            c.close(lp);
        }
        if let Some(m) = &metrics {
            m.close(lp);
        }
    });
    let immediate: Rc<Cell<Option<Signum>>> = Rc::default();
    {
        let immediate = immediate.clone();
        sup.on_event(&mut lp, move |lp, e| {
            ops.event(lp, e);
            if let LifecycleEvent::Stopping {
                graceful: false,
                signal: Some(s),
            } = e
            {
                immediate.set(Some(*s));
            }
            journal.event(lp, e);
            match e {
                LifecycleEvent::Forked { worker, .. } => sd.forked(*worker),
                LifecycleEvent::Ready { worker, .. } => sd.listening(lp, *worker),
                LifecycleEvent::Exited { worker, .. } => sd.exited(*worker),
                LifecycleEvent::Stopping { .. } => sd.stopping(),
                LifecycleEvent::ReloadStarted { slots } => sd.reloading(*slots),
                LifecycleEvent::Scaled { to, .. } => sd.scaled(*to),
                LifecycleEvent::ReloadFinished(_) | LifecycleEvent::ReloadFailed(_) => {
                    sd.reloaded()
                }
                _ => {}
            }
            if let Some(w) = &watcher {
                w.on_event(lp, e);
            }
        });
    }
    {
        let pids = journal_pids.clone();
        sup.on_error(&mut lp, move |lp, w, e| {
            events::cluster_error(
                w.map(|w| {
                    (
                        w.id(),
                        w.pid(lp).or_else(|| pids.borrow().get(&w.id()).copied()),
                    )
                }),
                e,
            );
        });
    }
    sup.handle_signals(&mut lp)?;
    events::starting(&opts);
    sup.start(&mut lp);
    lp.run(RunMode::Default)?;
    Ok(match (immediate.get(), sup.exit_code(&lp)) {
        (Some(s), _) => Outcome::Immediate(s),
        (None, Some(code)) => Outcome::Supervisor(code),
        // The loop ended without the supervisor's verdict: nothing kept it
        // alive, which only a failure explains.
        (None, None) => Outcome::Supervisor(1),
    })
}

#[cfg(test)]
mod tests {
    use super::{names_an_error_class, quote};

    fn q(text: &str) -> Vec<String> {
        quote(text.lines())
    }

    /// A Node startup exception: the `Error:` line and Node's version, not
    /// the stack frames.
    #[test]
    fn quote_finds_a_node_startup_exception() {
        let node = "/srv/app/crash_start.js:1\n\
                    throw new Error('startup failure xyz');\n\
                    ^\n\
                    \n\
                    Error: startup failure xyz\n    \
                    at Object.<anonymous> (/srv/app/crash_start.js:1:7)\n    \
                    at Module._compile (node:internal/modules/cjs/loader:1364:14)\n    \
                    at Module._extensions..js (node:internal/modules/cjs/loader:1422:10)\n    \
                    at Module.load (node:internal/modules/cjs/loader:1203:32)\n    \
                    at Module._load (node:internal/modules/cjs/loader:1019:12)\n    \
                    at node:internal/main/run_main_module:28:49\n\
                    \n\
                    Node.js v20.20.2\n";
        assert_eq!(q(node), ["Error: startup failure xyz", "Node.js v20.20.2"]);
    }

    /// A Rust panic: its `panicked at` line, the message on the next line,
    /// and the last line.
    #[test]
    fn quote_finds_a_rust_panic() {
        let rust = "listening\n\
                    thread 'main' panicked at src/main.rs:2:5:\n\
                    startup failure xyz\n\
                    note: run with `RUST_BACKTRACE=1` environment variable to display a backtrace\n";
        assert_eq!(
            q(rust),
            [
                "thread 'main' panicked at src/main.rs:2:5:",
                "startup failure xyz",
                "note: run with `RUST_BACKTRACE=1` environment variable to display a backtrace"
            ]
        );
    }

    /// Node 20's report of an unhandled `'error'` event on a listen
    /// failure (`node app.js`, the port taken), captured from real node.
    const NODE_LISTEN_EADDRINUSE: &str = r#"node:events:502
      throw er; // Unhandled 'error' event
      ^

Error: listen EADDRINUSE: address already in use :::3111
    at Server.setupListenHandle [as _listen2] (node:net:1908:16)
    at listenInCluster (node:net:1965:12)
    at Server.listen (node:net:2067:7)
    at Object.<anonymous> (/tmp/qnode/app.js:1:50)
    at Module._compile (node:internal/modules/cjs/loader:1521:14)
    at Module._extensions..js (node:internal/modules/cjs/loader:1623:10)
    at Module.load (node:internal/modules/cjs/loader:1266:32)
    at Module._load (node:internal/modules/cjs/loader:1091:12)
    at Function.executeUserEntryPoint [as runMain] (node:internal/modules/run_main:164:12)
    at node:internal/main/run_main_module:28:49
Emitted 'error' event on Server instance at:
    at emitErrorNT (node:net:1944:8)
    at process.processTicksAndRejections (node:internal/process/task_queues:82:21) {
  code: 'EADDRINUSE',
  errno: -98,
  syscall: 'listen',
  address: '::',
  port: 3111
}

Node.js v20.20.2
"#;

    /// The same in a cluster worker under round-robin (the primary's bind
    /// failed), captured from real node.
    const NODE_RR_BIND_EADDRINUSE: &str = r#"node:events:502
      throw er; // Unhandled 'error' event
      ^

Error: bind EADDRINUSE null:3111
    at listenOnPrimaryHandle (node:net:1989:18)
    at rr (node:internal/cluster/child:163:12)
    at Worker.<anonymous> (node:internal/cluster/child:113:7)
    at process.onInternalMessage (node:internal/cluster/utils:49:5)
    at process.emit (node:events:536:35)
    at emit (node:internal/child_process:950:14)
    at process.processTicksAndRejections (node:internal/process/task_queues:83:21)
Emitted 'error' event on Server instance at:
    at listenOnPrimaryHandle (node:net:1990:21)
    at rr (node:internal/cluster/child:163:12)
    [... lines matching original stack trace ...]
    at process.processTicksAndRejections (node:internal/process/task_queues:83:21) {
  errno: -98,
  code: 'EADDRINUSE',
  syscall: 'bind',
  address: null,
  port: 3111
}

Node.js v20.20.2
"#;

    /// A Node listen failure quoted `Emitted 'error' event on Server
    /// instance at: | Node.js v20.20.2`, leaving out the cause above it.
    #[test]
    fn quote_prefers_the_error_class_over_nodes_emitted_error_event() {
        assert_eq!(
            q(NODE_LISTEN_EADDRINUSE),
            [
                "Error: listen EADDRINUSE: address already in use :::3111",
                "Node.js v20.20.2"
            ]
        );
        assert_eq!(
            q(NODE_RR_BIND_EADDRINUSE),
            ["Error: bind EADDRINUSE null:3111", "Node.js v20.20.2"]
        );
        assert_eq!(
            q("TypeError [ERR_INVALID_ARG_TYPE]: bad\n    at x (y:1:2)\nNode.js v20.20.2"),
            ["TypeError [ERR_INVALID_ARG_TYPE]: bad", "Node.js v20.20.2"]
        );
        assert!(names_an_error_class("java.io.IOException: gone"));
        assert!(!names_an_error_class(
            "Emitted 'error' event on Server instance at:"
        ));
        assert!(!names_an_error_class("ErrorHandler installed"));
    }

    /// Python's traceback ends with its error; plain output is quoted by
    /// its last lines, blank ones skipped.
    #[test]
    fn quote_python_and_plain_output() {
        let py = "Traceback (most recent call last):\n  \
                  File \"app.py\", line 1, in <module>\n    \
                  raise ValueError('bad port')\n\
                  ValueError: bad port\n";
        assert_eq!(q(py), ["ValueError: bad port"]);
        assert_eq!(
            q("a\n\nb\nc\n\nd\n\n"),
            ["b", "c", "d"],
            "the last 3 non-blank lines"
        );
        assert!(q("").is_empty());
    }
}
