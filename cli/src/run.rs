//! `uvcluster run`: the workers under a supervisor, the signals, the output
//! prefixes and the exit status; the control socket and the metrics
//! endpoint on the same loop.

use std::cell::{Cell, RefCell};
use std::ffi::OsString;
use std::io::{self, Write};
use std::rc::Rc;

use uvcluster::cluster::{Primary, Settings, Worker};
use uvcluster::ipc::ForkStdio;
use uvcluster::supervisor::{LifecycleEvent, Supervisor};
use uvcluster::uv::{Loop, RunMode, Signum};

use crate::control::Control;
use crate::events;
use crate::metrics::Metrics;
use crate::ops::Ops;
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

/// The first fork's failure as a [`CannotRun`], when it says the program
/// cannot be run at all (the library's error, `spawn app ENOENT (...)`,
/// reaches the supervisor's event as text).
fn cannot_run(program: &OsString, error: &str) -> Option<CannotRun> {
    let kind = if error.contains("ENOENT") {
        io::ErrorKind::NotFound
    } else if error.contains("EACCES") {
        io::ErrorKind::PermissionDenied
    } else {
        return None;
    };
    Some(CannotRun {
        program: program.clone(),
        error: io::Error::new(kind, error.to_owned()),
    })
}

/// Runs the workers under a [`Supervisor`] until it is done; returns how
/// it ended. The control socket (`--control`), the metrics endpoint
/// (`--metrics`) and the message relay (`--broadcast`) run on the same
/// loop.
///
/// # Errors
///
/// [`StartError::CannotRun`] when the first fork finds no program to run;
/// [`StartError::Io`] when the loop, a signal handler, the control socket
/// or the metrics listener cannot be set up.
pub fn run(opts: RunOptions) -> Result<Outcome, StartError> {
    uvcluster::uv::disable_stdio_inheritance();
    let mut lp = Loop::new()?;
    let primary = Primary::new();
    primary.setup_primary(&mut lp, settings(&opts));
    primary.set_handoff_window(opts.handoff_window);
    let kill_timeout = opts.supervisor.kill_timeout;
    let sup = Supervisor::with_primary(&mut lp, primary.clone(), opts.supervisor.clone())
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e.to_string()))?;
    sup.set_broadcast(opts.broadcast);
    let ops = Ops::new(sup.clone());

    // Before any worker runs: a control socket a live primary owns stops
    // this one here.
    let control = match opts.control.path() {
        Some(_) => Some(
            Control::start(&mut lp, ops.clone(), &opts.control, opts.control_timeout)
                .map_err(|e| io::Error::new(e.kind(), format!("control socket: {e}")))?,
        ),
        None => None,
    };
    let metrics = match opts.metrics {
        Some(addr) => Some(
            Metrics::start(&mut lp, ops.clone(), addr)
                .map_err(|e| io::Error::new(e.kind(), format!("metrics on {addr}: {e}")))?
                .0,
        ),
        None => None,
    };

    let stopping = Rc::new(Cell::new(false));
    let immediate: Rc<Cell<Option<Signum>>> = Rc::default();
    let first_fork: Rc<RefCell<Option<Option<String>>>> = Rc::default();
    let exit_code: Rc<Cell<Option<i32>>> = Rc::default();

    let prefix = opts.prefix_output;
    {
        let stopping = stopping.clone();
        let ops = ops.clone();
        primary.on_fork(move |lp, w| {
            events::forked(w.id(), w.pid());
            if prefix {
                prefix_output(lp, w);
            }
            w.on_listening(|_, w, a| {
                let addr = a.address.as_deref().unwrap_or("*");
                match a.port {
                    Some(port) if port >= 0 => {
                        events::listening(w.id(), w.pid(), &format!("{addr}:{port}"))
                    }
                    _ => events::listening(w.id(), w.pid(), addr),
                }
            });
            let stopping = stopping.clone();
            let ops = ops.clone();
            w.on_exit(move |lp, w, code, signal| {
                // Before the supervisor forgets it: its last count.
                ops.refresh(lp);
                let asked = stopping.get() || w.exited_after_disconnect() == Some(true);
                events::exited(w.id(), w.pid(), code, signal, asked);
            });
        });
    }
    {
        let ops = ops.clone();
        let stopping = stopping.clone();
        let immediate = immediate.clone();
        let first_fork = first_fork.clone();
        let sup2 = sup.clone();
        sup.on_event(move |lp, e| {
            ops.event(lp, e);
            let pid = |id: u32| sup2.primary().worker(id).and_then(|w| w.pid());
            match e {
                LifecycleEvent::Ready { worker, .. } => events::ready(*worker, pid(*worker)),
                LifecycleEvent::Draining { worker, .. } => events::draining(*worker, pid(*worker)),
                LifecycleEvent::ReloadStarted { slots } => events::reload_started(*slots),
                LifecycleEvent::ReloadFinished(r) => {
                    events::reload_finished(r.replaced, r.duration)
                }
                LifecycleEvent::ReloadFailed(e) => events::reload_failed(&e.to_string()),
                LifecycleEvent::Forked { .. } => {
                    first_fork.borrow_mut().get_or_insert(None);
                }
                LifecycleEvent::ForkFailed { error, .. } => {
                    first_fork.borrow_mut().get_or_insert(Some(error.clone()));
                }
                LifecycleEvent::Stopping {
                    graceful: true,
                    signal,
                } => {
                    stopping.set(true);
                    let by = signal
                        .map_or_else(|| "control socket".to_owned(), |s| format!("signal {s}"));
                    log::info!(
                        target: events::TARGET,
                        "{by}: stopping gracefully, disconnecting workers (killed after {}; \
                         a second SIGINT/SIGTERM stops at once)",
                        show_duration(kill_timeout)
                    );
                    // A graceful stop does not wait silently (issue 10):
                    // every 5 s it says for whom it waits.
                    let reminder = lp.timer_init();
                    let sup = sup2.clone();
                    let _ = lp.timer_start(reminder, STILL_WAITING, STILL_WAITING, move |lp, _| {
                        let left: Vec<String> = sup
                            .status(lp)
                            .iter()
                            .filter_map(|r| Some(format!("{} (pid {})", r.id?, r.pid.unwrap_or(0))))
                            .collect();
                        log::info!(
                            target: events::TARGET,
                            "still waiting for worker(s) {} to finish; a second SIGINT/SIGTERM \
                             stops at once",
                            left.join(", ")
                        );
                    });
                    let _ = lp.unref_handle(reminder);
                }
                LifecycleEvent::Stopping {
                    graceful: false,
                    signal,
                } => {
                    stopping.set(true);
                    if let Some(s) = signal {
                        immediate.set(Some(*s));
                        log::warn!(
                            target: events::TARGET,
                            "signal {s}: stopping at once, killing every worker"
                        );
                    }
                }
                _ => {}
            }
        });
    }
    {
        let exit_code = exit_code.clone();
        sup.on_exit(move |lp, code| {
            exit_code.set(Some(code));
            if let Some(c) = &control {
                c.close(lp);
            }
            if let Some(m) = &metrics {
                m.close(lp);
            }
        });
    }
    sup.handle_signals(&mut lp)?;

    events::starting(&opts);
    sup.start(&mut lp);
    let failed_first = first_fork.borrow().clone().flatten();
    if let Some(c) = failed_first.and_then(|e| cannot_run(&opts.command[0], &e)) {
        sup.stop(&mut lp, false);
        lp.run(RunMode::Default)?;
        return Err(StartError::CannotRun(c));
    }
    lp.run(RunMode::Default)?;
    Ok(match (immediate.get(), exit_code.get()) {
        (Some(s), _) => Outcome::Immediate(s),
        (None, Some(0)) => Outcome::Clean,
        (None, _) => Outcome::Failed,
    })
}
