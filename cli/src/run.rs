//! `uvcluster run`: the workers under a primary, the signals, the output
//! prefixes and the exit status.

use std::cell::{Cell, RefCell};
use std::ffi::OsString;
use std::io::{self, Write};
use std::rc::Rc;

use uvcluster::cluster::{Primary, Settings, Worker};
use uvcluster::ipc::ForkStdio;
use uvcluster::uv::{Loop, RunMode, Signum};

use crate::events;
use crate::options::RunOptions;
use crate::values::show_duration;

/// How a run ended; [`Outcome::code`] is the process's exit status.
#[derive(Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Stopped cleanly: a graceful stop finished (its kill timeout
    /// included, as gunicorn's graceful timeout), or every worker exited 0
    /// on its own. Exit 0.
    Clean,
    /// The service failed: a worker ended with a non-zero code or a signal
    /// nobody sent, and none is left. Exit 1.
    Failed,
    /// Stopped at once by this signal (a second SIGTERM/SIGINT, or
    /// SIGQUIT). Exit 128 + its number, as a shell reports a process
    /// killed by it.
    Immediate(Signum),
}

impl Outcome {
    /// The exit status (docs/cli.md, "Exit status").
    pub fn code(&self) -> u8 {
        match self {
            Outcome::Clean => 0,
            Outcome::Failed => 1,
            Outcome::Immediate(s) => u8::try_from(128 + s.as_raw()).unwrap_or(1),
        }
    }
}

/// A program that could not be started at all (exit 1, a start failure).
#[derive(Debug)]
pub struct CannotRun {
    /// The program as given.
    pub program: OsString,
    /// Why.
    pub error: io::Error,
}

impl std::fmt::Display for CannotRun {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The library's error names the program as Node does (`spawn
        // app ENOENT (No such file or directory)`); the words after it say
        // what to check.
        let program = self.program.to_string_lossy();
        let hint = match self.error.kind() {
            io::ErrorKind::NotFound if !program.contains('/') => "no such program in PATH",
            io::ErrorKind::NotFound => "no such file",
            io::ErrorKind::PermissionDenied => "not executable",
            _ => "cannot be started",
        };
        write!(f, "{}: {program:?} {hint}", self.error)
    }
}

/// Either failure of [`run`] before the loop runs.
#[derive(Debug)]
pub enum StartError {
    /// The program could not be started.
    CannotRun(CannotRun),
    /// Anything else (the loop, a signal handler).
    Io(io::Error),
}

impl From<io::Error> for StartError {
    fn from(e: io::Error) -> StartError {
        StartError::Io(e)
    }
}

/// The settings that start the workers: the command, the policy, and piped
/// output when it is prefixed.
fn settings(opts: &RunOptions) -> Settings {
    let mut command = opts.command.iter().cloned();
    Settings {
        exec_path: command.next(),
        args: Some(command.collect()),
        exec_argv: Some(Vec::new()),
        scheduling_policy: Some(opts.policy),
        stdio: opts.prefix_output.then(|| {
            vec![
                ForkStdio::Inherit,
                ForkStdio::Pipe,
                ForkStdio::Pipe,
                ForkStdio::Ipc,
            ]
        }),
        ..Settings::default()
    }
}

/// Copies worker `w`'s stdout and stderr to ours, each line prefixed with
/// `[worker ID] ` (`--prefix-output`). A line is written whole, so lines of
/// two workers never interleave; a last line without a newline is written
/// at the end of the stream.
fn prefix_output(lp: &mut Loop, w: &Worker) {
    for fd in [1, 2] {
        let Some(pipe) = w.stdio(fd) else { continue };
        let prefix = format!("[worker {}] ", w.id());
        let mut partial: Vec<u8> = Vec::new();
        // The primary drains the pipe until we take it over (it has not
        // run yet: this is the fork callback).
        let _ = lp.read_stop(pipe);
        let res = lp.read_start(pipe, move |_, _, r| {
            let data = match r {
                Ok(d) => d,
                Err(_) => &[][..],
            };
            let eof = data.is_empty();
            partial.extend_from_slice(data);
            let mut out = Vec::new();
            while let Some(nl) = partial.iter().position(|&b| b == b'\n') {
                out.extend_from_slice(prefix.as_bytes());
                out.extend(partial.drain(..=nl));
            }
            if eof && !partial.is_empty() {
                out.extend_from_slice(prefix.as_bytes());
                out.append(&mut partial);
                out.push(b'\n');
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
            log::warn!(target: events::TARGET, "worker {}: cannot prefix its output: {e}", w.id());
        }
    }
}

/// How often a graceful stop that is still waiting says for whom.
const STILL_WAITING: std::time::Duration = std::time::Duration::from_secs(5);

/// Runs the workers until they are gone; returns how it ended.
///
/// # Errors
///
/// [`StartError::CannotRun`] when the first fork finds no program to run;
/// [`StartError::Io`] when the loop or a signal handler cannot be set up.
pub fn run(opts: RunOptions) -> Result<Outcome, StartError> {
    uvcluster::uv::disable_stdio_inheritance();
    let mut lp = Loop::new()?;
    let primary = Primary::new();
    primary.setup_primary(&mut lp, settings(&opts));
    primary.set_handoff_window(opts.handoff_window);
    let kill_timeout = opts.supervisor.kill_timeout;

    let failed = Rc::new(Cell::new(false));
    let stopping = Rc::new(Cell::new(false));
    let immediate: Rc<Cell<Option<Signum>>> = Rc::default();
    let forked: Rc<RefCell<Vec<Worker>>> = Rc::default();

    let prefix = opts.prefix_output;
    primary.on_fork(move |lp, w| {
        events::forked(w.id(), w.pid());
        if prefix {
            prefix_output(lp, w);
        }
    });
    primary.on_listening(|_, w, a| {
        let addr = a.address.as_deref().unwrap_or("*");
        match a.port {
            Some(port) if port >= 0 => {
                events::listening(w.id(), w.pid(), &format!("{addr}:{port}"))
            }
            _ => events::listening(w.id(), w.pid(), addr),
        }
    });
    {
        let failed = failed.clone();
        let stopping = stopping.clone();
        primary.on_exit(move |_, w, code, signal| {
            let asked = stopping.get() || w.exited_after_disconnect() == Some(true);
            // During a stop, however a worker ends it was asked to.
            if !asked && !matches!((code, signal), (Some(0), _) | (None, None)) {
                failed.set(true);
            }
            events::exited(w.id(), w.pid(), code, signal, asked);
        });
    }
    primary.on_error(|_, w, e| match w {
        Some(w) => log::error!(target: events::TARGET, "worker {}: {e}", w.id()),
        None => log::error!(target: events::TARGET, "{e}"),
    });

    // SIGINT/SIGTERM: a graceful stop bounded by --kill-timeout; a second
    // one, or SIGQUIT, stops at once. A worker being disconnected has
    // already left `primary.workers()` (Node's order), so kills go to every
    // forked worker still alive.
    let kill_all = {
        let forked = forked.clone();
        move |lp: &mut Loop| {
            for w in forked.borrow().iter().filter(|w| !w.is_dead()) {
                let _ = w.kill(lp, Some(Signum::SIGKILL));
            }
        }
    };
    for signum in [Signum::SIGINT, Signum::SIGTERM, Signum::SIGQUIT] {
        let sig = lp.signal_init();
        let p = primary.clone();
        let stopping = stopping.clone();
        let immediate = immediate.clone();
        let kill_all = kill_all.clone();
        let forked = forked.clone();
        lp.signal_start(sig, signum, move |lp, _, signum| {
            if signum == Signum::SIGQUIT || stopping.replace(true) {
                log::warn!(
                    target: events::TARGET,
                    "signal {signum}: stopping at once, killing every worker"
                );
                immediate.set(Some(signum));
                kill_all(lp);
                return;
            }
            log::info!(
                target: events::TARGET,
                "signal {signum}: stopping gracefully, disconnecting workers (killed after {}; \
                 a second SIGINT/SIGTERM stops at once)",
                show_duration(kill_timeout)
            );
            p.disconnect(lp, |_| {});
            let timer = lp.timer_init();
            let kill_all = kill_all.clone();
            let held = forked.clone();
            let _ = lp.timer_start(timer, kill_timeout, std::time::Duration::ZERO, move |lp, _| {
                let left: Vec<String> = held
                    .borrow()
                    .iter()
                    .filter(|w| !w.is_dead())
                    .map(|w| events::who(w.id(), w.pid()))
                    .collect();
                if !left.is_empty() {
                    log::warn!(
                        target: events::TARGET,
                        "kill timeout ({}) reached: killing {}",
                        show_duration(kill_timeout),
                        left.join(", ")
                    );
                    kill_all(lp);
                }
            });
            // The timer must not keep the primary alive by itself.
            let _ = lp.unref_handle(timer);
            // Nor must a graceful stop wait silently (issue 10): every 5 s
            // it says for whom it waits.
            let reminder = lp.timer_init();
            let forked = forked.clone();
            let _ = lp.timer_start(reminder, STILL_WAITING, STILL_WAITING, move |_, _| {
                let left: Vec<String> = forked
                    .borrow()
                    .iter()
                    .filter(|w| !w.is_dead())
                    .map(|w| format!("{} (pid {})", w.id(), w.pid().unwrap_or(0)))
                    .collect();
                log::info!(
                    target: events::TARGET,
                    "still waiting for worker(s) {} to finish; a second SIGINT/SIGTERM stops at once",
                    left.join(", ")
                );
            });
            let _ = lp.unref_handle(reminder);
        })?;
        // Nor must the signals, once the workers are gone.
        lp.unref_handle(sig)?;
    }
    // SIGHUP would end the primary (its default action): a reload is the
    // supervisor's; until then, refuse it in the log and keep serving.
    let hup = lp.signal_init();
    lp.signal_start(hup, Signum::SIGHUP, |_, _, _| {
        log::warn!(target: events::TARGET, "signal SIGHUP: reload is not available in this build; ignored");
    })?;
    lp.unref_handle(hup)?;

    events::starting(&opts);
    for n in 0..opts.supervisor.workers {
        match primary.fork(&mut lp, Vec::new()) {
            Ok(w) => forked.borrow_mut().push(w),
            Err(e) if n == 0 => {
                return Err(StartError::CannotRun(CannotRun {
                    program: opts.command[0].clone(),
                    error: e,
                }));
            }
            Err(e) => {
                log::error!(target: events::TARGET, "cannot fork worker {}: {e}", n + 1);
                failed.set(true);
            }
        }
    }
    lp.run(RunMode::Default)?;
    Ok(match immediate.get() {
        Some(s) => Outcome::Immediate(s),
        None if failed.get() => Outcome::Failed,
        None => Outcome::Clean,
    })
}
