//! The supervisor's policy as a pure state machine (GUIDE.md §3, "Pure
//! core, I/O shell"): no I/O, no clock; time is the loop's milliseconds,
//! passed with every event.
//!
//! The shell ([`Supervisor`](super::Supervisor)) feeds it **events** (a
//! worker forked, came online, listened, sent `'ready'`, disconnected,
//! exited; the timer fired; a signal arrived; the user asked for a reload,
//! a scale, a restart or a stop; an RSS or connection-count sample; a
//! handoff left unanswered) and executes the **actions** it queues, in
//! order ([`Action`]): fork a worker for a slot, drain a worker (the
//! dispatcher stops handing it connections *before* anything is sent to
//! it), disconnect it, kill it, release a slot's sockets, close the
//! listeners, arm the one timer, finish a reload, exit, report a
//! lifecycle event.
//!
//! # Model
//!
//! The service has `workers` **slots**. A slot has at most one *current*
//! worker (starting or ready) and, while it is being replaced, one
//! *replacement*; workers it retired (drained, disconnected, waiting for
//! their exit or the kill timeout) are no longer its. A slot whose worker
//! crashed forks again: at once the first time since the slot was last
//! stable (up for the stable period), then after a backoff delay that
//! starts at the initial backoff and doubles up to its cap; a slot that crashes
//! too often, or fails to start too many times in a row, is **errored**
//! and left empty. A **replacement** (a rolling reload's step, a
//! `restart`, a limit) forks the new worker first and retires the old one
//! only once the new one is ready; if it is not ready in time it is
//! killed and the old one keeps serving (fail closed).

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::fmt;
use std::time::Duration;

use super::config::{MAX_WORKERS, ReadyMode, RestartPolicy, SupervisorConfig};
use crate::uv::Signum;

/// A worker, by its cluster id.
pub type WorkerId = u32;
/// A slot, by its index (0, 1, ...; a slot added by a scale up gets the
/// lowest index no slot holds, as PM2's instance numbers).
pub type SlotId = usize;

/// How a worker's process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExitInfo {
    /// The exit code, if it exited.
    pub code: Option<i64>,
    /// The signal that ended it, if one did.
    pub signal: Option<Signum>,
}

impl ExitInfo {
    /// Whether this is a clean exit (code 0, no signal).
    pub fn is_success(&self) -> bool {
        self.code == Some(0) && self.signal.is_none()
    }
}

impl fmt::Display for ExitInfo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (self.code, self.signal) {
            (_, Some(s)) => write!(f, "killed by {s}"),
            (Some(c), None) => write!(f, "exit code {c}"),
            (None, None) => f.write_str("exit status unknown"),
        }
    }
}

/// Why a worker's start failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StartFailure {
    /// The process could not be forked (the error's text).
    Fork(String),
    /// It exited before it was ready.
    Exited(ExitInfo),
    /// It was not ready within the ready timeout (then killed).
    ReadyTimeout(Duration),
}

impl fmt::Display for StartFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StartFailure::Fork(e) => write!(f, "could not be forked: {e}"),
            StartFailure::Exited(e) => write!(f, "exited before it was ready ({e})"),
            StartFailure::ReadyTimeout(d) => {
                write!(f, "was not ready within {} ms", d.as_millis())
            }
        }
    }
}

/// A rolling reload that completed: every slot runs a new worker.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReloadReport {
    /// How many workers were replaced.
    pub replaced: usize,
    /// From the start of this reload (not of its wait in the queue) to
    /// its end.
    pub duration: Duration,
}

impl fmt::Display for ReloadReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} worker(s) replaced in {} ms",
            self.replaced,
            self.duration.as_millis()
        )
    }
}

/// A rolling reload that did not complete.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReloadError {
    /// A replacement did not become ready (fail closed): it was killed,
    /// the old workers of the slots not yet replaced keep serving, and the
    /// roll stopped there.
    NotReady {
        /// The slot whose replacement failed.
        slot: SlotId,
        /// Why.
        failure: StartFailure,
        /// How many slots had been replaced before.
        replaced: usize,
    },
    /// A stop began before the reload completed.
    Stopped,
    /// Asked for during a stop: refused, nothing was started.
    Refused,
}

impl fmt::Display for ReloadError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ReloadError::NotReady {
                slot,
                failure,
                replaced,
            } => write!(
                f,
                "the replacement for slot {slot} {failure}; the old worker keeps serving \
                 ({replaced} slot(s) replaced before, roll stopped)"
            ),
            ReloadError::Stopped => f.write_str("the supervisor is stopping"),
            ReloadError::Refused => f.write_str(REFUSED),
        }
    }
}

impl std::error::Error for ReloadError {}

/// Why a worker is replaced gracefully outside a reload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplaceReason {
    /// [`Supervisor::restart`](super::Supervisor::restart) asked for it.
    Requested,
    /// Its resident set exceeded `max_memory` (the RSS sampled, bytes).
    Memory(u64),
    /// The dispatcher handed it its `max_connections` (with jitter).
    Connections(u64),
}

impl fmt::Display for ReplaceReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ReplaceReason::Requested => f.write_str("restart requested"),
            ReplaceReason::Memory(b) => {
                write!(f, "memory limit reached ({} resident)", size_words(*b))
            }
            ReplaceReason::Connections(n) => write!(f, "connection limit reached ({n} handed)"),
        }
    }
}

/// Why the supervisor killed a worker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KillReason {
    /// It was not ready within the ready timeout.
    ReadyTimeout,
    /// It did not exit within the kill timeout after its disconnect.
    KillTimeout,
    /// It held a handed-over connection unanswered (hung).
    Hung,
    /// An immediate stop.
    ImmediateStop,
    /// A replacement abandoned (its slot was removed, or a stop began).
    Abandoned,
}

impl fmt::Display for KillReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            KillReason::ReadyTimeout => "not ready within the ready timeout",
            KillReason::KillTimeout => "still running after the kill timeout",
            KillReason::Hung => "hung: left a connection unanswered",
            KillReason::ImmediateStop => "immediate stop",
            KillReason::Abandoned => "no longer needed",
        })
    }
}

/// A lifecycle event, for logs and [`Supervisor::on_event`](super::Supervisor::on_event).
///
/// `Display` gives one line in words (no Rust debug formatting), the
/// form `uvcluster run` logs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LifecycleEvent {
    /// A worker was forked for a slot.
    Forked {
        /// The worker.
        worker: WorkerId,
        /// Its slot.
        slot: SlotId,
    },
    /// A slot's fork failed.
    ForkFailed {
        /// The slot.
        slot: SlotId,
        /// The error, in words.
        error: String,
    },
    /// A worker became ready.
    Ready {
        /// The worker.
        worker: WorkerId,
        /// Its slot.
        slot: SlotId,
        /// Since its fork.
        after: Duration,
    },
    /// A worker was taken out of rotation, then told to disconnect.
    Draining {
        /// The worker.
        worker: WorkerId,
        /// Its slot.
        slot: SlotId,
    },
    /// A worker was killed.
    Killed {
        /// The worker.
        worker: WorkerId,
        /// Its slot.
        slot: SlotId,
        /// The signal sent.
        signal: Signum,
        /// Why.
        reason: KillReason,
    },
    /// A worker exited.
    Exited {
        /// The worker.
        worker: WorkerId,
        /// Its slot.
        slot: SlotId,
        /// How.
        exit: ExitInfo,
        /// Whether the supervisor asked for it (drain, stop, kill), so
        /// it is no crash.
        expected: bool,
    },
    /// A slot will fork again after a delay.
    Restarting {
        /// The slot.
        slot: SlotId,
        /// The backoff delay.
        delay: Duration,
    },
    /// A slot stopped being restarted.
    Errored {
        /// The slot.
        slot: SlotId,
        /// Its last worker's end.
        last: Option<ExitInfo>,
        /// Which budget was exhausted, in words.
        why: String,
    },
    /// A slot is being replaced gracefully outside a reload.
    Replacing {
        /// The slot.
        slot: SlotId,
        /// The worker being replaced.
        worker: WorkerId,
        /// Why.
        reason: ReplaceReason,
    },
    /// A replacement outside a reload failed; the old worker stays.
    ReplaceFailed {
        /// The slot.
        slot: SlotId,
        /// Why.
        failure: StartFailure,
    },
    /// A rolling reload began.
    ReloadStarted {
        /// Slots to replace.
        slots: usize,
    },
    /// A reload was asked for while one runs: it runs after it.
    ReloadQueued,
    /// A rolling reload completed.
    ReloadFinished(ReloadReport),
    /// A rolling reload failed.
    ReloadFailed(ReloadError),
    /// The number of slots changed.
    Scaled {
        /// Before.
        from: usize,
        /// After.
        to: usize,
    },
    /// A scale was asked for (a signal, the API) and nothing changed.
    NotScaled {
        /// The workers running, as before.
        workers: usize,
        /// Why, in words.
        why: String,
    },
    /// A stop began.
    Stopping {
        /// Graceful (drain, disconnect, kill timeout) or immediate.
        graceful: bool,
        /// The signal that asked for it, if one did.
        signal: Option<Signum>,
    },
    /// A request made during a stop (`what`: a signal's name, `reload`,
    /// `scale`) was refused ([`REFUSED`]); nothing changed.
    Refused {
        /// What was asked for: `SIGHUP`, `SIGTTIN`, `reload`, ...
        what: String,
        /// The workers still running (the stop's, going).
        workers: usize,
    },
    /// A signal was a second delivery of the previous one, and ignored.
    DuplicateSignal(Signum),
    /// The primary exits.
    Exiting {
        /// Its exit code.
        code: i32,
    },
}

/// The signals a terminal or a service manager sends a whole process
/// group or cgroup to stop it: a worker ended by one of them is not
/// restarted at once (see [`Core::exited`]).
const GROUP_STOP_SIGNALS: [Signum; 4] = [
    Signum::SIGINT,
    Signum::SIGTERM,
    Signum::SIGQUIT,
    Signum::SIGHUP,
];

/// A duration in words, as humantime writes it (`10s`, `1m 30s`,
/// `250ms`), to the millisecond.
pub(crate) fn duration_words(d: Duration) -> String {
    let ms = ms(d);
    if ms == 0 {
        return "0ms".into();
    }
    let parts = [
        (ms / 86_400_000, "d"),
        (ms / 3_600_000 % 24, "h"),
        (ms / 60_000 % 60, "m"),
        (ms / 1000 % 60, "s"),
        (ms % 1000, "ms"),
    ];
    let words: Vec<String> = (parts.iter())
        .filter(|(n, _)| *n > 0)
        .map(|(n, u)| format!("{n}{u}"))
        .collect();
    words.join(" ")
}

/// A size in bytes in binary units, rounded (`195 MiB`, `512 KiB`,
/// `100 bytes`).
pub(crate) fn size_words(bytes: u64) -> String {
    for (shift, unit) in [(30, "GiB"), (20, "MiB"), (10, "KiB")] {
        if bytes >= 1 << shift {
            let n = (bytes + (1 << (shift - 1))) >> shift;
            return format!("{n} {unit}");
        }
    }
    format!("{bytes} bytes")
}

fn ms(d: Duration) -> u64 {
    d.as_millis().min(u64::MAX as u128) as u64
}

impl fmt::Display for LifecycleEvent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        use LifecycleEvent as E;
        match self {
            E::Forked { worker, slot } => write!(f, "worker {worker} forked (slot {slot})"),
            E::ForkFailed { slot, error } => write!(f, "slot {slot}: fork failed: {error}"),
            E::Ready {
                worker,
                slot,
                after,
            } => write!(
                f,
                "worker {worker} ready (slot {slot}) after {} ms",
                after.as_millis()
            ),
            E::Draining { worker, slot } => write!(f, "worker {worker} draining (slot {slot})"),
            E::Killed {
                worker,
                slot,
                signal,
                reason,
            } => write!(f, "worker {worker} (slot {slot}) sent {signal}: {reason}"),
            E::Exited {
                worker,
                slot,
                exit,
                expected,
            } => {
                let how = if *expected { "" } else { " unexpectedly" };
                write!(f, "worker {worker} (slot {slot}) exited{how}: {exit}")
            }
            E::Restarting { slot, delay } => {
                write!(f, "slot {slot} restarting in {} ms", delay.as_millis())
            }
            E::Errored { slot, last, why } => {
                write!(f, "slot {slot} errored: {why}")?;
                if let Some(last) = last {
                    write!(f, "; last worker: {last}")?;
                }
                Ok(())
            }
            E::Replacing {
                slot,
                worker,
                reason,
            } => write!(f, "slot {slot}: replacing worker {worker}: {reason}"),
            E::ReplaceFailed { slot, failure } => write!(
                f,
                "slot {slot}: the replacement {failure}; the old worker keeps serving"
            ),
            E::ReloadStarted { slots } => write!(f, "reload started ({slots} slot(s))"),
            E::ReloadQueued => f.write_str("reload queued: one is running"),
            E::ReloadFinished(r) => write!(f, "reload finished: {r}"),
            E::ReloadFailed(e) => write!(f, "reload failed: {e}"),
            E::Scaled { from, to } => write!(f, "scaled from {from} to {to} worker(s)"),
            E::NotScaled { workers, why } => {
                write!(f, "not scaled: {why}; still {workers} worker(s)")
            }
            E::Stopping { graceful, signal } => {
                let kind = if *graceful { "graceful" } else { "immediate" };
                write!(f, "{kind} stop")?;
                if let Some(s) = signal {
                    write!(f, " on {s}")?;
                }
                Ok(())
            }
            E::Refused { what, workers } => {
                write!(f, "{what} {REFUSED}; {workers} worker(s) still running")
            }
            E::DuplicateSignal(s) => write!(
                f,
                "{s} received again within the duplicate window: the same request, ignored"
            ),
            E::Exiting { code } => write!(f, "primary exiting with code {code}"),
        }
    }
}

/// Why a request made during a stop (a reload, a scale, a restart, their
/// signals) does nothing.
pub const REFUSED: &str = "refused: the primary is stopping";

/// Why a worker is forked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ForkReason {
    /// The slot's first start (or a scale up).
    Start,
    /// After a crash, once the backoff delay passed.
    Restart,
    /// A replacement (reload, restart, limit): the slot's current worker
    /// keeps serving until it is ready.
    Replace,
}

/// What the shell must do, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Fork a worker for `slot`; answer with [`Core::forked`] or
    /// [`Core::fork_failed`].
    Fork {
        /// The slot.
        slot: SlotId,
        /// Why.
        reason: ForkReason,
    },
    /// Take the worker out of the dispatcher's rotation (before anything
    /// is sent to it).
    Drain(WorkerId),
    /// Keep the worker out of the dispatcher's rotation until
    /// [`Action::Admit`] (not ready yet, or at its connection limit while
    /// its replacement starts).
    Hold(WorkerId),
    /// Put a held worker back in rotation (it is ready; or its
    /// replacement failed and it serves on).
    Admit(WorkerId),
    /// Have the dispatcher count the connections it hands the worker and
    /// report the limit reached ([`Core::handed`]).
    LimitConnections(WorkerId, u64),
    /// Disconnect the worker gracefully (`worker.disconnect()`).
    Disconnect(WorkerId),
    /// Send the worker a signal.
    Kill(WorkerId, Signum),
    /// The slot is gone (scaled down, errored): close the sockets kept for
    /// it (`SO_REUSEPORT`).
    ReleaseSlot(SlotId),
    /// Stop accepting: close the primary's listeners once no worker uses
    /// them, keep none across an empty pool.
    CloseListeners,
    /// Arm the one timer for this loop time, or drop it.
    Timer(Option<u64>),
    /// Complete the reload requests with this ticket.
    ReloadDone(u64, Result<ReloadReport, ReloadError>),
    /// Exit the process with this code.
    Exit(i32),
    /// Report a lifecycle event.
    Report(LifecycleEvent),
}

/// A worker's state, as [`status`](super::Supervisor::status) shows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WorkerState {
    /// Forked, not ready yet.
    Starting,
    /// Ready and in rotation.
    Ready,
    /// Out of rotation, finishing what it holds, then exiting.
    Draining,
    /// The slot is not restarted any more (no worker).
    Errored,
    /// The slot waits for its backoff delay (no worker).
    Restarting,
    /// The slot's worker is gone and a stop is under way: it will not be
    /// restarted (PM2's `stopped`).
    Stopped,
    /// The slot's worker exited and the slot is not restarted (restart
    /// policy `never`, `on-failure` after a clean exit, or a worker that
    /// left on purpose); a reload or a scale fills it again.
    Exited,
}

impl fmt::Display for WorkerState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            WorkerState::Starting => "starting",
            WorkerState::Ready => "ready",
            WorkerState::Draining => "draining",
            WorkerState::Errored => "errored",
            WorkerState::Restarting => "restarting",
            WorkerState::Stopped => "stopped",
            WorkerState::Exited => "exited",
        })
    }
}

/// One row of the core's status.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StatusRow {
    /// The worker, if the row has one.
    pub worker: Option<WorkerId>,
    /// Its slot.
    pub slot: SlotId,
    /// Its state.
    pub state: WorkerState,
    /// Since its fork.
    pub uptime: Duration,
    /// How many times the slot was restarted after a crash.
    pub restarts: u32,
    /// Connections the dispatcher handed it, as last reported.
    pub handed: u64,
    /// The slot's last worker's end, for an errored slot.
    pub last_exit: Option<ExitInfo>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Role {
    Current,
    Replacement,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Starting,
    Ready,
    /// Drained and disconnected (or killed): only its exit is awaited.
    Retiring,
}

#[derive(Debug)]
struct Worker {
    slot: SlotId,
    role: Option<Role>,
    phase: Phase,
    forked_at: u64,
    ready_at: Option<u64>,
    listened: BTreeSet<String>,
    ready_deadline: Option<u64>,
    kill_at: Option<u64>,
    /// Why it was killed, if the supervisor killed it.
    killed: Option<KillReason>,
    /// The supervisor asked it to go (drain/disconnect/kill).
    requested: bool,
    handed: u64,
    conn_limit: Option<u64>,
    /// A graceful replacement was asked for it already.
    replacing: bool,
    /// Held out of rotation at its connection limit while its
    /// replacement starts.
    held: bool,
}

#[derive(Debug)]
struct Slot {
    current: Option<WorkerId>,
    replacement: Option<WorkerId>,
    /// A fork was asked for and not answered yet, in this role.
    pending: Option<Role>,
    restart_at: Option<u64>,
    next_delay: u64,
    /// Times of its unrequested exits, within the restart window.
    crashes: VecDeque<u64>,
    fails_before_ready: u32,
    restarts: u32,
    addresses: BTreeSet<String>,
    errored: bool,
    last_exit: Option<ExitInfo>,
    removed: bool,
    /// Retired workers of this slot still alive.
    retiring: BTreeSet<WorkerId>,
    /// Why the running replacement was started, outside a reload.
    replace_reason: Option<ReplaceReason>,
}

#[derive(Debug)]
struct Roll {
    ticket: u64,
    todo: VecDeque<SlotId>,
    batch: BTreeSet<SlotId>,
    replaced: usize,
    started: u64,
}

#[derive(Debug, Clone, Copy)]
struct Stop {
    graceful: bool,
    /// The last stop signal and when it came.
    last_signal: Option<(Signum, u64)>,
}

/// The supervisor's state machine. See the [module docs](self).
#[derive(Debug)]
pub struct Core {
    cfg: SupervisorConfig,
    slots: BTreeMap<SlotId, Slot>,
    workers: BTreeMap<WorkerId, Worker>,
    roll: Option<Roll>,
    /// The ticket of the queued reload, if one is queued.
    queued_reload: Option<u64>,
    next_ticket: u64,
    /// Slots waiting for a graceful replacement (one at a time).
    replace_queue: VecDeque<(SlotId, WorkerId, ReplaceReason)>,
    /// The slot being replaced outside a reload.
    replacing: Option<SlotId>,
    stop: Option<Stop>,
    started: bool,
    exit_at: Option<u64>,
    exited: bool,
    /// An errored pool waits for a reload instead of exiting.
    hold_errored: bool,
    timer: Option<u64>,
    rng: u64,
    actions: VecDeque<Action>,
}

impl Core {
    /// A core with `cfg` (validated by the caller) and a seed for the
    /// connection-limit jitter.
    pub fn new(cfg: SupervisorConfig, seed: u64) -> Core {
        Core {
            cfg,
            slots: BTreeMap::new(),
            workers: BTreeMap::new(),
            roll: None,
            queued_reload: None,
            next_ticket: 1,
            replace_queue: VecDeque::new(),
            replacing: None,
            stop: None,
            started: false,
            exit_at: None,
            exited: false,
            hold_errored: false,
            timer: None,
            rng: seed | 1,
            actions: VecDeque::new(),
        }
    }

    /// The configuration.
    pub fn config(&self) -> &SupervisorConfig {
        &self.cfg
    }

    /// The next action to execute.
    pub fn next_action(&mut self) -> Option<Action> {
        self.actions.pop_front()
    }

    /// How many slots there are (not counting slots being removed).
    pub fn slot_count(&self) -> usize {
        self.slots.values().filter(|s| !s.removed).count()
    }

    fn report(&mut self, e: LifecycleEvent) {
        self.actions.push_back(Action::Report(e));
    }

    fn rand(&mut self) -> u64 {
        // xorshift64: deterministic for a seed, enough for jitter.
        let mut x = self.rng;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.rng = x;
        x
    }

    /// A new slot, numbered as PM2 numbers its instances
    /// (`NODE_APP_INSTANCE`): the lowest number no slot holds, so that
    /// after a scale down and up the slots are `0..n` again. A removed
    /// slot keeps its number until its last worker has exited.
    fn new_slot(&mut self) -> SlotId {
        let id = (0..)
            .find(|i| !self.slots.contains_key(i))
            .expect("a free slot");
        self.slots.insert(
            id,
            Slot {
                current: None,
                replacement: None,
                pending: None,
                restart_at: None,
                next_delay: 0,
                crashes: VecDeque::new(),
                fails_before_ready: 0,
                restarts: 0,
                addresses: BTreeSet::new(),
                errored: false,
                last_exit: None,
                removed: false,
                retiring: BTreeSet::new(),
                replace_reason: None,
            },
        );
        id
    }

    fn fork(&mut self, slot: SlotId, role: Role, reason: ForkReason) {
        let s = self.slots.get_mut(&slot).expect("slot exists");
        s.pending = Some(role);
        if role == Role::Current {
            s.restart_at = None;
        }
        self.exit_at = None;
        self.actions.push_back(Action::Fork { slot, reason });
    }

    // ----- events ----------------------------------------------------------

    /// Starts the pool: forks every slot.
    pub fn start(&mut self, now: u64) {
        if self.started {
            return;
        }
        self.started = true;
        for _ in 0..self.cfg.workers.max(1) {
            let s = self.new_slot();
            self.fork(s, Role::Current, ForkReason::Start);
        }
        self.settle(now);
    }

    /// The shell forked worker `w` for `slot` (answering [`Action::Fork`]).
    pub fn forked(&mut self, now: u64, slot: SlotId, w: WorkerId) {
        let Some(s) = self.slots.get_mut(&slot) else {
            return;
        };
        let role = s.pending.take().unwrap_or(Role::Current);
        match role {
            Role::Current => s.current = Some(w),
            Role::Replacement => s.replacement = Some(w),
        }
        let conn_limit = self.cfg.max_connections.map(|m| {
            let j = self.cfg.max_connections_jitter;
            m + if j == 0 { 0 } else { self.rand() % (j + 1) }
        });
        self.workers.insert(
            w,
            Worker {
                slot,
                role: Some(role),
                phase: Phase::Starting,
                forked_at: now,
                ready_at: None,
                listened: BTreeSet::new(),
                ready_deadline: Some(now + ms(self.cfg.ready_timeout)),
                kill_at: None,
                killed: None,
                requested: false,
                handed: 0,
                conn_limit,
                replacing: false,
                held: false,
            },
        );
        // With `--wait-ready` a worker that listens before it sent
        // 'ready' gets no connection (under the round-robin policies).
        if self.cfg.ready == ReadyMode::Message {
            self.actions.push_back(Action::Hold(w));
        }
        if let Some(l) = conn_limit {
            self.actions.push_back(Action::LimitConnections(w, l));
        }
        self.report(LifecycleEvent::Forked { worker: w, slot });
        self.settle(now);
    }

    /// The fork asked for `slot` failed.
    pub fn fork_failed(&mut self, now: u64, slot: SlotId, error: String) {
        let Some(s) = self.slots.get_mut(&slot) else {
            return;
        };
        let role = s.pending.take().unwrap_or(Role::Current);
        self.report(LifecycleEvent::ForkFailed {
            slot,
            error: error.clone(),
        });
        let failure = StartFailure::Fork(error);
        match role {
            Role::Replacement => self.replacement_failed(now, slot, failure),
            Role::Current => self.slot_failed(now, slot, None, true),
        }
        self.settle(now);
    }

    /// Worker `w` listened on `address` (a key naming the address).
    pub fn listening(&mut self, now: u64, w: WorkerId, address: String) {
        let Some(wk) = self.workers.get_mut(&w) else {
            return;
        };
        wk.listened.insert(address.clone());
        let (slot, phase) = (wk.slot, wk.phase);
        if phase == Phase::Ready {
            if let Some(s) = self.slots.get_mut(&slot) {
                s.addresses.insert(address);
            }
            return;
        }
        if self.cfg.ready == ReadyMode::Listening && phase == Phase::Starting {
            let needed = &self.slots[&slot].addresses;
            let wk = &self.workers[&w];
            if needed.is_subset(&wk.listened) {
                self.became_ready(now, w);
            }
        }
        self.settle(now);
    }

    /// Worker `w` sent the user message `'ready'`.
    pub fn ready_message(&mut self, now: u64, w: WorkerId) {
        if self.cfg.ready != ReadyMode::Message {
            return;
        }
        if self
            .workers
            .get(&w)
            .is_some_and(|wk| wk.phase == Phase::Starting)
        {
            self.became_ready(now, w);
        }
        self.settle(now);
    }

    fn became_ready(&mut self, now: u64, w: WorkerId) {
        let wk = self.workers.get_mut(&w).expect("worker");
        wk.phase = Phase::Ready;
        wk.ready_at = Some(now);
        wk.ready_deadline = None;
        let (slot, role, after) = (wk.slot, wk.role, now - wk.forked_at);
        let listened = wk.listened.clone();
        if self.cfg.ready == ReadyMode::Message {
            self.actions.push_back(Action::Admit(w));
        }
        let s = self.slots.get_mut(&slot).expect("slot");
        s.fails_before_ready = 0;
        s.addresses.extend(listened);
        self.report(LifecycleEvent::Ready {
            worker: w,
            slot,
            after: Duration::from_millis(after),
        });
        if role == Some(Role::Replacement) {
            self.replacement_ready(now, slot, w);
        }
        // Handed its limit before it was ready (it listened on part of
        // its addresses): the limit applies now.
        if let Some(wk) = self.workers.get(&w)
            && wk.conn_limit.is_some_and(|l| wk.handed >= l)
        {
            let total = wk.handed;
            self.handed(now, w, total);
        }
    }

    /// The replacement `w` of `slot` is ready: it becomes the slot's
    /// worker, and the old one is retired.
    fn replacement_ready(&mut self, now: u64, slot: SlotId, w: WorkerId) {
        let s = self.slots.get_mut(&slot).expect("slot");
        s.replacement = None;
        let old = s.current.replace(w);
        s.replace_reason = None;
        if let Some(wk) = self.workers.get_mut(&w) {
            wk.role = Some(Role::Current);
        }
        if let Some(old) = old {
            self.retire(now, old);
        }
        if let Some(roll) = self.roll.as_mut()
            && roll.batch.remove(&slot)
        {
            roll.replaced += 1;
            self.advance_roll(now);
        } else if self.replacing == Some(slot) {
            self.replacing = None;
            self.next_replacement(now);
        }
    }

    /// Takes `w` out of rotation, disconnects it, and arms its kill
    /// timeout. Drain always comes first.
    fn retire(&mut self, now: u64, w: WorkerId) {
        let Some(wk) = self.workers.get_mut(&w) else {
            return;
        };
        if wk.phase == Phase::Retiring {
            return;
        }
        wk.phase = Phase::Retiring;
        wk.requested = true;
        wk.role = None;
        wk.ready_deadline = None;
        wk.kill_at = Some(now + ms(self.cfg.kill_timeout));
        let slot = wk.slot;
        if let Some(s) = self.slots.get_mut(&slot) {
            s.retiring.insert(w);
            if s.current == Some(w) {
                s.current = None;
            }
            if s.replacement == Some(w) {
                s.replacement = None;
            }
        }
        self.actions.push_back(Action::Drain(w));
        self.report(LifecycleEvent::Draining { worker: w, slot });
        self.actions.push_back(Action::Disconnect(w));
    }

    /// Gives up a replacement that is not ready: stopped gracefully if it
    /// listened (the kernel may already hand it connections, under `none`
    /// and `reuseport`), else killed.
    fn abandon(&mut self, now: u64, w: WorkerId) {
        if self
            .workers
            .get(&w)
            .is_some_and(|wk| !wk.listened.is_empty())
        {
            self.retire(now, w);
        } else {
            self.kill(w, KillReason::Abandoned);
        }
    }

    /// Kills `w` now (it leaves its slot's roles).
    fn kill(&mut self, w: WorkerId, reason: KillReason) {
        let Some(wk) = self.workers.get_mut(&w) else {
            return;
        };
        if wk.killed.is_some() {
            return;
        }
        wk.killed = Some(reason);
        wk.ready_deadline = None;
        wk.kill_at = None;
        if reason != KillReason::Hung && reason != KillReason::ReadyTimeout {
            wk.requested = true;
        }
        let slot = wk.slot;
        // A worker being killed takes no more connections.
        if wk.phase != Phase::Retiring {
            self.actions.push_back(Action::Drain(w));
        }
        self.actions.push_back(Action::Kill(w, Signum::SIGKILL));
        self.report(LifecycleEvent::Killed {
            worker: w,
            slot,
            signal: Signum::SIGKILL,
            reason,
        });
    }

    /// Worker `w`'s channel closed.
    pub fn disconnected(&mut self, now: u64, w: WorkerId) {
        // Its exit follows; what matters is decided there.
        let _ = w;
        self.settle(now);
    }

    /// Worker `w` exited; `after_disconnect` is Node's
    /// `exitedAfterDisconnect`.
    pub fn exited(&mut self, now: u64, w: WorkerId, exit: ExitInfo, after_disconnect: bool) {
        let Some(wk) = self.workers.remove(&w) else {
            return;
        };
        let slot = wk.slot;
        let expected = wk.requested || self.stop.is_some();
        self.report(LifecycleEvent::Exited {
            worker: w,
            slot,
            exit,
            expected,
        });
        let Some(s) = self.slots.get_mut(&slot) else {
            self.settle(now);
            return;
        };
        s.last_exit = Some(exit);
        s.retiring.remove(&w);
        let was_current = s.current == Some(w);
        let was_replacement = s.replacement == Some(w);
        if was_current {
            s.current = None;
        }
        if was_replacement {
            s.replacement = None;
        }
        if self.stop.is_some() || s.removed {
            self.maybe_drop_slot(slot);
            self.settle(now);
            return;
        }
        if was_replacement {
            let failure = if wk.killed == Some(KillReason::ReadyTimeout) {
                StartFailure::ReadyTimeout(self.cfg.ready_timeout)
            } else {
                StartFailure::Exited(exit)
            };
            self.replacement_failed(now, slot, failure);
        } else if was_current && !wk.requested {
            let never_ready = wk.ready_at.is_none();
            let up_since = wk.ready_at.unwrap_or(wk.forked_at);
            let stable = now.saturating_sub(up_since) >= ms(self.cfg.stable_period);
            if stable {
                let s = self.slots.get_mut(&slot).expect("slot");
                s.next_delay = 0;
                s.crashes.clear();
            }
            let on_purpose = after_disconnect && wk.killed.is_none();
            let restart = !on_purpose
                && match self.cfg.restart {
                    RestartPolicy::Always => true,
                    RestartPolicy::OnFailure => !exit.is_success(),
                    RestartPolicy::Never => false,
                };
            if restart {
                // A stop signal that reached the worker directly (Ctrl-C
                // reaches the whole process group, systemd signals the
                // whole cgroup) may be read before the primary's own copy:
                // such an exit waits at least the initial backoff, so that
                // the stop, not a restart, comes first.
                if exit.signal.is_some_and(|s| GROUP_STOP_SIGNALS.contains(&s)) {
                    let initial = ms(self.cfg.backoff_initial).max(1);
                    let s = self.slots.get_mut(&slot).expect("slot");
                    s.next_delay = s.next_delay.max(initial);
                }
                self.slot_failed(now, slot, Some(exit), never_ready);
            } else {
                // Left on purpose, or not to be restarted: the slot stays
                // empty until a reload or a scale fills it.
                self.maybe_drop_slot(slot);
            }
        }
        self.settle(now);
    }

    /// The slot's current worker failed (crashed, or never started):
    /// restart after the backoff delay, or mark the slot errored.
    fn slot_failed(&mut self, now: u64, slot: SlotId, exit: Option<ExitInfo>, before_ready: bool) {
        let window = ms(self.cfg.restart_window);
        let (max, fbr) = (self.cfg.max_restarts, self.cfg.fail_before_ready);
        let cap = ms(self.cfg.backoff_cap).max(1);
        let initial = ms(self.cfg.backoff_initial).clamp(1, cap);
        let s = self.slots.get_mut(&slot).expect("slot");
        s.crashes.push_back(now);
        while s.crashes.front().is_some_and(|&t| t + window <= now) {
            s.crashes.pop_front();
        }
        if before_ready {
            s.fails_before_ready += 1;
        } else {
            s.fails_before_ready = 0;
        }
        // The more specific reason first.
        let why = if fbr && s.fails_before_ready > max {
            Some(format!(
                "{} starts in a row failed before the worker was ready",
                s.fails_before_ready
            ))
        } else if s.crashes.len() as u64 > u64::from(max) {
            Some(format!(
                "{} crashes within {} (at most {max} restarts)",
                s.crashes.len(),
                duration_words(Duration::from_millis(window))
            ))
        } else {
            None
        };
        if let Some(why) = why {
            s.errored = true;
            s.restart_at = None;
            let last = s.last_exit.or(exit);
            self.report(LifecycleEvent::Errored { slot, last, why });
            self.actions.push_back(Action::ReleaseSlot(slot));
            // A reload waiting on this slot moves on without it.
            if let Some(roll) = self.roll.as_mut() {
                roll.todo.retain(|&x| x != slot);
            }
            return;
        }
        // Immediate when the slot has not restarted since it was last
        // stable; then the initial backoff, doubling up to the cap.
        let delay = s.next_delay;
        s.next_delay = if delay == 0 {
            initial
        } else {
            delay.saturating_mul(2).min(cap)
        };
        s.restart_at = Some(now + delay);
        s.restarts += 1;
        self.report(LifecycleEvent::Restarting {
            slot,
            delay: Duration::from_millis(delay),
        });
    }

    /// A replacement did not get ready: kill it if it runs, keep the old
    /// worker, stop the roll.
    fn replacement_failed(&mut self, now: u64, slot: SlotId, failure: StartFailure) {
        if let Some(roll) = self.roll.as_mut()
            && roll.batch.contains(&slot)
        {
            let (ticket, replaced) = (roll.ticket, roll.replaced);
            let batch: Vec<SlotId> = roll.batch.iter().copied().collect();
            self.roll = None;
            // Fail closed: every replacement of the batch still starting
            // goes; the old workers stay.
            for b in batch {
                if let Some(r) = self.slots.get(&b).and_then(|s| s.replacement) {
                    self.abandon(now, r);
                }
            }
            let e = ReloadError::NotReady {
                slot,
                failure,
                replaced,
            };
            self.report(LifecycleEvent::ReloadFailed(e.clone()));
            self.actions.push_back(Action::ReloadDone(ticket, Err(e)));
            self.after_roll(now);
            return;
        }
        if self.replacing == Some(slot) {
            self.replacing = None;
            if let Some(s) = self.slots.get_mut(&slot) {
                // A user's restart may be asked for again; a limit is not
                // retried for this worker (a replacement that cannot start
                // would otherwise be forked at every sample).
                let again = s.replace_reason.take() == Some(ReplaceReason::Requested);
                let current = s.current;
                if let Some(w) = current.and_then(|c| self.workers.get_mut(&c)) {
                    if again {
                        w.replacing = false;
                    }
                    // Held at its limit: it serves on.
                    if std::mem::take(&mut w.held) {
                        self.actions
                            .push_back(Action::Admit(current.expect("current")));
                    }
                }
            }
            self.report(LifecycleEvent::ReplaceFailed { slot, failure });
            self.next_replacement(now);
        }
        // A slot with no current worker left (it crashed meanwhile)
        // restarts as after a crash.
        if let Some(s) = self.slots.get(&slot)
            && s.current.is_none()
            && s.replacement.is_none()
            && s.pending.is_none()
            && s.restart_at.is_none()
            && !s.errored
            && !s.removed
        {
            self.slot_failed(now, slot, None, true);
        }
    }

    /// The timer fired (or the shell wants the core to look at the time).
    pub fn tick(&mut self, now: u64) {
        // The shell's timer has fired: it is armed again for whatever is
        // next, even the same time (a deadline not yet due is not lost).
        if self.timer.is_some_and(|t| t <= now) {
            self.timer = None;
        }
        self.settle(now);
    }

    fn check_deadlines(&mut self, now: u64) {
        let due_restarts: Vec<SlotId> = self
            .slots
            .iter()
            .filter(|(_, s)| s.restart_at.is_some_and(|t| t <= now))
            .map(|(&id, _)| id)
            .collect();
        for slot in due_restarts {
            let s = self.slots.get_mut(&slot).expect("slot");
            s.restart_at = None;
            if s.current.is_none() && s.pending.is_none() && s.replacement.is_none() {
                self.fork(slot, Role::Current, ForkReason::Restart);
            }
        }
        let mut not_ready = Vec::new();
        let mut overdue = Vec::new();
        for (&id, w) in &self.workers {
            if w.ready_deadline.is_some_and(|t| t <= now) {
                not_ready.push(id);
            }
            if w.kill_at.is_some_and(|t| t <= now) {
                overdue.push(id);
            }
        }
        for w in not_ready {
            let wk = &self.workers[&w];
            if wk.role == Some(Role::Replacement) && !wk.listened.is_empty() {
                // It listened: under `none` and `reuseport` the kernel
                // already hands it connections, which a SIGKILL would
                // reset. It is stopped gracefully (drained, disconnected,
                // killed after the kill timeout); the failure is reported
                // now (its `draining` event, then the failed reload's).
                let slot = wk.slot;
                self.retire(now, w);
                self.replacement_failed(
                    now,
                    slot,
                    StartFailure::ReadyTimeout(self.cfg.ready_timeout),
                );
            } else {
                self.kill(w, KillReason::ReadyTimeout);
            }
        }
        for w in overdue {
            self.kill(w, KillReason::KillTimeout);
        }
    }

    /// A signal reached the primary: the signal table.
    ///
    /// | signal | action |
    /// |---|---|
    /// | SIGTERM, SIGINT | graceful stop; during one, a different or late second one: immediate stop |
    /// | SIGQUIT | immediate stop |
    /// | SIGHUP | rolling reload |
    /// | SIGTTIN / SIGTTOU | one slot more / one fewer (never below 1 nor above [`MAX_WORKERS`]; a [`LifecycleEvent::NotScaled`] says why nothing changed) |
    /// | SIGHUP, SIGTTIN, SIGTTOU during a stop | refused: a [`LifecycleEvent::Refused`] with the workers still running |
    pub fn signal(&mut self, now: u64, sig: Signum) {
        if sig == Signum::SIGTERM || sig == Signum::SIGINT {
            match self.stop {
                None => self.begin_stop(now, true, Some(sig)),
                Some(st) => {
                    let dup = st.last_signal.is_some_and(|(s, t)| {
                        s == sig && now.saturating_sub(t) < ms(self.cfg.duplicate_signal_window)
                    });
                    if dup {
                        self.report(LifecycleEvent::DuplicateSignal(sig));
                    } else if st.graceful {
                        self.begin_stop(now, false, Some(sig));
                    }
                }
            }
        } else if sig == Signum::SIGQUIT {
            if self.stop.is_none_or(|s| s.graceful) {
                self.begin_stop(now, false, Some(sig));
            }
        } else if self.stop.is_some()
            && [Signum::SIGHUP, Signum::SIGTTIN, Signum::SIGTTOU].contains(&sig)
        {
            self.refuse(&sig.to_string());
        } else if sig == Signum::SIGHUP {
            let _ = self.reload(now);
        } else if sig == Signum::SIGTTIN || sig == Signum::SIGTTOU {
            let from = self.slot_count();
            let why = if sig == Signum::SIGTTOU && from <= 1 {
                Some(format!(
                    "{sig} asks for one worker fewer, and one is the fewest"
                ))
            } else if sig == Signum::SIGTTIN && from >= MAX_WORKERS {
                Some(format!(
                    "{sig} asks for one worker more, and {MAX_WORKERS} is the most"
                ))
            } else {
                None
            };
            match why {
                Some(why) => self.report(LifecycleEvent::NotScaled { workers: from, why }),
                None if sig == Signum::SIGTTIN => self.scale(now, from + 1),
                None => self.scale(now, from - 1),
            }
        }
        self.settle(now);
    }

    /// Whether a stop has begun (then reloads, scales and restarts are
    /// refused: [`REFUSED`]).
    pub fn stopping(&self) -> bool {
        self.stop.is_some()
    }

    /// Reports a request refused during a stop.
    pub fn refuse(&mut self, what: &str) {
        let workers = self.workers.len();
        self.report(LifecycleEvent::Refused {
            what: what.to_string(),
            workers,
        });
    }

    /// A stop: graceful (close the listeners, drain and disconnect every
    /// worker, kill what remains after the kill timeout) or immediate
    /// (SIGKILL every worker).
    pub fn stop(&mut self, now: u64, graceful: bool) {
        match self.stop {
            Some(st) if !st.graceful || graceful => {}
            _ => self.begin_stop(now, graceful, None),
        }
        self.settle(now);
    }

    fn begin_stop(&mut self, now: u64, graceful: bool, signal: Option<Signum>) {
        let first = self.stop.is_none();
        self.stop = Some(Stop {
            graceful,
            last_signal: signal.map(|s| (s, now)),
        });
        self.report(LifecycleEvent::Stopping { graceful, signal });
        if first {
            self.actions.push_back(Action::CloseListeners);
            if let Some(roll) = self.roll.take() {
                self.report(LifecycleEvent::ReloadFailed(ReloadError::Stopped));
                self.actions
                    .push_back(Action::ReloadDone(roll.ticket, Err(ReloadError::Stopped)));
            }
            if let Some(t) = self.queued_reload.take() {
                self.actions
                    .push_back(Action::ReloadDone(t, Err(ReloadError::Stopped)));
            }
            self.replace_queue.clear();
            self.replacing = None;
            for s in self.slots.values_mut() {
                s.restart_at = None;
            }
        }
        let ids: Vec<WorkerId> = self.workers.keys().copied().collect();
        for w in ids {
            if graceful {
                let starting = self.workers[&w].phase == Phase::Starting;
                if starting && self.workers[&w].role == Some(Role::Replacement) {
                    self.abandon(now, w);
                } else {
                    self.retire(now, w);
                }
            } else {
                self.kill(w, KillReason::ImmediateStop);
            }
        }
    }

    /// Asks for a rolling reload; returns the ticket its
    /// [`Action::ReloadDone`] will carry. A reload asked for while one
    /// runs is queued (one at most: later requests join the queued one,
    /// which reloads to the newest code anyway).
    pub fn reload(&mut self, now: u64) -> u64 {
        if self.stop.is_some() {
            let t = self.next_ticket;
            self.next_ticket += 1;
            self.refuse("reload");
            self.actions
                .push_back(Action::ReloadDone(t, Err(ReloadError::Refused)));
            return t;
        }
        if self.roll.is_some() || self.replacing.is_some() {
            if let Some(t) = self.queued_reload {
                return t;
            }
            let t = self.next_ticket;
            self.next_ticket += 1;
            self.queued_reload = Some(t);
            self.report(LifecycleEvent::ReloadQueued);
            return t;
        }
        let t = self.next_ticket;
        self.next_ticket += 1;
        self.begin_roll(now, t);
        self.settle(now);
        t
    }

    fn begin_roll(&mut self, now: u64, ticket: u64) {
        let todo: VecDeque<SlotId> = self
            .slots
            .iter()
            .filter(|(_, s)| !s.removed)
            .map(|(&id, _)| id)
            .collect();
        self.report(LifecycleEvent::ReloadStarted { slots: todo.len() });
        self.roll = Some(Roll {
            ticket,
            todo,
            batch: BTreeSet::new(),
            replaced: 0,
            started: now,
        });
        self.advance_roll(now);
    }

    /// Starts the next batch once the current one is done; finishes the
    /// roll when nothing is left.
    fn advance_roll(&mut self, now: u64) {
        let batch = self.cfg.reload_batch.max(1);
        loop {
            let Some(roll) = self.roll.as_mut() else {
                return;
            };
            if !roll.batch.is_empty() {
                return;
            }
            if roll.todo.is_empty() {
                let roll = self.roll.take().expect("roll");
                let r = ReloadReport {
                    replaced: roll.replaced,
                    duration: Duration::from_millis(now - roll.started),
                };
                self.report(LifecycleEvent::ReloadFinished(r.clone()));
                self.actions
                    .push_back(Action::ReloadDone(roll.ticket, Ok(r)));
                self.after_roll(now);
                return;
            }
            let mut started = Vec::new();
            while started.len() < batch {
                let Some(slot) = self.roll.as_mut().and_then(|r| r.todo.pop_front()) else {
                    break;
                };
                let Some(s) = self.slots.get_mut(&slot) else {
                    continue;
                };
                if s.removed {
                    continue;
                }
                // An errored or waiting slot gets its chance with the new
                // code; a first start still under way is replaced too.
                s.errored = false;
                s.restart_at = None;
                s.fails_before_ready = 0;
                s.crashes.clear();
                started.push(slot);
            }
            for &slot in &started {
                self.roll.as_mut().expect("roll").batch.insert(slot);
                self.fork(slot, Role::Replacement, ForkReason::Replace);
            }
        }
    }

    fn after_roll(&mut self, now: u64) {
        if let Some(t) = self.queued_reload.take() {
            self.begin_roll(now, t);
        } else {
            self.next_replacement(now);
        }
    }

    /// Asks for a graceful replacement of worker `w`'s slot (restart
    /// requested by the user, or a limit).
    pub fn replace(&mut self, now: u64, w: WorkerId, reason: ReplaceReason) -> bool {
        if self.stop.is_some() {
            return false;
        }
        let Some(wk) = self.workers.get_mut(&w) else {
            return false;
        };
        if wk.phase != Phase::Ready || wk.role != Some(Role::Current) || wk.replacing {
            return false;
        }
        wk.replacing = true;
        let slot = wk.slot;
        self.replace_queue.push_back((slot, w, reason));
        self.next_replacement(now);
        self.settle(now);
        true
    }

    fn next_replacement(&mut self, now: u64) {
        if self.roll.is_some() || self.replacing.is_some() || self.stop.is_some() {
            return;
        }
        if let Some(t) = self.queued_reload.take() {
            self.begin_roll(now, t);
            return;
        }
        while let Some((slot, w, reason)) = self.replace_queue.pop_front() {
            let ok = self
                .slots
                .get(&slot)
                .is_some_and(|s| s.current == Some(w) && !s.removed && s.replacement.is_none());
            if !ok {
                continue;
            }
            self.replacing = Some(slot);
            self.slots.get_mut(&slot).expect("slot").replace_reason = Some(reason);
            self.report(LifecycleEvent::Replacing {
                slot,
                worker: w,
                reason,
            });
            self.fork(slot, Role::Replacement, ForkReason::Replace);
            return;
        }
    }

    /// Sets the number of slots (at least 1). Removed slots are the
    /// newest; their workers are drained first.
    pub fn scale(&mut self, now: u64, n: usize) {
        if self.stop.is_some() {
            return;
        }
        let n = n.max(1);
        let from = self.slot_count();
        if n == from {
            return;
        }
        if n > from {
            for _ in from..n {
                let s = self.new_slot();
                self.fork(s, Role::Current, ForkReason::Start);
            }
        } else {
            let remove: Vec<SlotId> = self
                .slots
                .iter()
                .filter(|(_, s)| !s.removed)
                .map(|(&id, _)| id)
                .rev()
                .take(from - n)
                .collect();
            for slot in remove {
                let s = self.slots.get_mut(&slot).expect("slot");
                s.removed = true;
                s.restart_at = None;
                let (cur, rep) = (s.current, s.replacement);
                if let Some(r) = rep {
                    self.abandon(now, r);
                }
                if let Some(c) = cur {
                    self.retire(now, c);
                }
                if let Some(roll) = self.roll.as_mut() {
                    roll.todo.retain(|&x| x != slot);
                    if roll.batch.remove(&slot) {
                        self.advance_roll(now);
                    }
                }
                if self.replacing == Some(slot) {
                    self.replacing = None;
                    self.next_replacement(now);
                }
                self.maybe_drop_slot(slot);
            }
        }
        self.report(LifecycleEvent::Scaled { from, to: n });
        self.settle(now);
    }

    /// Forgets a removed slot once none of its workers is left.
    fn maybe_drop_slot(&mut self, slot: SlotId) {
        let Some(s) = self.slots.get(&slot) else {
            return;
        };
        let empty = s.current.is_none()
            && s.replacement.is_none()
            && s.pending.is_none()
            && s.retiring.is_empty();
        if s.removed && empty {
            self.slots.remove(&slot);
            self.actions.push_back(Action::ReleaseSlot(slot));
        }
    }

    /// A resident-set sample of worker `w`, in bytes.
    pub fn rss(&mut self, now: u64, w: WorkerId, bytes: u64) {
        if self.cfg.max_memory.is_some_and(|m| bytes > m) {
            self.replace(now, w, ReplaceReason::Memory(bytes));
        }
    }

    /// The dispatcher has handed worker `w` `total` connections, as
    /// counted for [`Action::LimitConnections`]. At its limit the worker
    /// is held out of rotation at once, so it is handed at most its limit
    /// plus what was in flight (the handoff window), and replaced
    /// gracefully; if its replacement fails it is put back in rotation.
    /// Meanwhile the other workers take its share; a pool whose every
    /// worker is held (one worker, or all at their limit together: the
    /// jitter spreads them) queues new connections in the primary until a
    /// replacement is ready, as gunicorn's new worker is waited for.
    pub fn handed(&mut self, now: u64, w: WorkerId, total: u64) {
        let Some(wk) = self.workers.get_mut(&w) else {
            return;
        };
        wk.handed = total;
        let replaceable = wk.phase == Phase::Ready && wk.role == Some(Role::Current);
        if wk.conn_limit.is_none_or(|l| total < l)
            || !replaceable
            || wk.replacing
            || self.stop.is_some()
        {
            return;
        }
        // Out of rotation first, then its replacement.
        wk.held = true;
        self.actions.push_back(Action::Hold(w));
        self.replace(now, w, ReplaceReason::Connections(total));
    }

    /// Worker `w` left a handed-over connection unanswered beyond the
    /// worker timeout: it is hung; kill it (it is replaced as after a
    /// crash; the dispatcher gives the connection to another worker).
    pub fn hung(&mut self, now: u64, w: WorkerId) {
        if self
            .workers
            .get(&w)
            .is_some_and(|wk| wk.killed.is_none() && wk.phase != Phase::Retiring)
        {
            self.kill(w, KillReason::Hung);
        }
        self.settle(now);
    }

    // ----- bookkeeping -------------------------------------------------------

    /// Checks the deadlines, decides whether the process exits, and arms
    /// the timer for the next deadline.
    fn settle(&mut self, now: u64) {
        if self.exited {
            return;
        }
        self.check_deadlines(now);
        self.check_exit(now);
        if self.exited {
            return;
        }
        let mut next: Option<u64> = self.exit_at;
        let mut consider = |t: Option<u64>| {
            if let Some(t) = t {
                next = Some(next.map_or(t, |n| n.min(t)));
            }
        };
        for s in self.slots.values() {
            consider(s.restart_at);
        }
        for w in self.workers.values() {
            consider(w.ready_deadline);
            consider(w.kill_at);
        }
        if next != self.timer {
            self.timer = next;
            self.actions.push_back(Action::Timer(next));
        }
    }

    /// With `on`, a pool left with no worker because slots errored does
    /// not exit: it waits, empty, for a [`reload`](Self::reload), which
    /// starts the errored slots afresh (their restart budgets reset). A
    /// stop still ends it. Off by default (the pool exits with code 1).
    pub fn hold_errored(&mut self, now: u64, on: bool) {
        self.hold_errored = on;
        self.settle(now);
    }

    fn check_exit(&mut self, now: u64) {
        if !self.started {
            return;
        }
        let pending = self
            .slots
            .values()
            .any(|s| s.pending.is_some() || s.restart_at.is_some());
        let alive = !self.workers.is_empty();
        if alive || pending {
            self.exit_at = None;
            return;
        }
        let errored = self.slots.values().any(|s| s.errored);
        if errored && self.hold_errored && self.stop.is_none() {
            self.exit_at = None;
            return;
        }
        let failed = self
            .slots
            .values()
            .any(|s| s.last_exit.is_some_and(|e| !e.is_success()));
        let code = if self.stop.is_some() {
            0
        } else if errored || failed {
            1
        } else {
            0
        };
        let at = if self.stop.is_some() {
            now
        } else {
            *self.exit_at.get_or_insert(now + ms(self.cfg.exit_grace))
        };
        if at <= now {
            self.exited = true;
            if self.timer.is_some() {
                self.timer = None;
                self.actions.push_back(Action::Timer(None));
            }
            self.report(LifecycleEvent::Exiting { code });
            self.actions.push_back(Action::Exit(code));
        }
    }

    /// One row per worker (current, replacement, retiring) and per empty
    /// slot (errored, waiting to restart, stopped during a stop, or
    /// exited and not to be restarted).
    pub fn status(&self, now: u64) -> Vec<StatusRow> {
        let mut rows = Vec::new();
        for (&id, w) in &self.workers {
            let restarts = self.slots.get(&w.slot).map_or(0, |s| s.restarts);
            rows.push(StatusRow {
                worker: Some(id),
                slot: w.slot,
                state: match w.phase {
                    Phase::Starting => WorkerState::Starting,
                    Phase::Ready => WorkerState::Ready,
                    Phase::Retiring => WorkerState::Draining,
                },
                uptime: Duration::from_millis(now.saturating_sub(w.forked_at)),
                restarts,
                handed: w.handed,
                last_exit: None,
            });
        }
        for (&slot, s) in &self.slots {
            // During a stop a slot's draining worker is its row.
            let draining = self.stop.is_some() && !s.retiring.is_empty();
            if s.current.is_none()
                && s.replacement.is_none()
                && s.pending.is_none()
                && !s.removed
                && !draining
            {
                rows.push(StatusRow {
                    worker: None,
                    slot,
                    state: if s.errored {
                        WorkerState::Errored
                    } else if self.stop.is_some() {
                        WorkerState::Stopped
                    } else if s.restart_at.is_some() {
                        WorkerState::Restarting
                    } else {
                        WorkerState::Exited
                    },
                    uptime: Duration::ZERO,
                    restarts: s.restarts,
                    handed: 0,
                    last_exit: s.last_exit,
                });
            }
        }
        rows.sort_by_key(|r| (r.slot, r.worker));
        rows
    }
}

#[cfg(test)]
mod tests;
