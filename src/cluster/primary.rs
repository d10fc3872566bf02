//! The primary (`lib/internal/cluster/primary.js`).
//!
//! A [`Primary`] forks workers with an IPC channel, answers their
//! `queryServer` requests with a [`RoundRobinHandle`] (TCP and Unix
//! sockets under [`SchedulingPolicy::RoundRobin`]) or a [`SharedHandle`]
//! (UDP always, everything under [`SchedulingPolicy::None`]), and reports
//! each worker's life cycle: `fork`, `online`, `listening`, `message`,
//! `disconnect`, `exit`, in Node 20's order and with its rules for
//! `exitedAfterDisconnect`.

use std::cell::RefCell;
use std::collections::{BTreeMap, HashMap};
use std::ffi::OsString;
use std::fmt;
use std::io;
use std::path::{Component, Path, PathBuf};
use std::rc::{Rc, Weak};
use std::time::Duration;

use serde_json::{Map, Value};

use super::NODE_UNIQUE_ID;
use super::dispatch::{DEFAULT_HANDOFF_WINDOW, HANDOFF_WINDOW_ENV, parse_handoff_window};
use super::protocol::{
    self, Ack, Act, ActKind, AddressType, Grant, Malformed, Parsed, ProtocolError, Query,
    QueryReply, Received,
};
use super::round_robin_handle::{
    self, ConnInfo, DEFAULT_HANDOFF_TIMEOUT, HandoffFailure, HandoffOutcome, Pick,
    RoundRobinHandle, Scheduler, WorkerLoad,
};
use super::settings::{SchedulingPolicy, Settings};
use super::shared_handle::SharedHandle;
use super::worker::{Address, Side, Worker, WorkerState};
use crate::ipc::{self, Channel, ChannelError, ForkOptions, Forked};
use crate::net::defer;
use crate::uv::{Errno, Handle, Loop, Pipe, Signum, Socket};

/// An error reported by the cluster through an `error` callback. (A worker
/// that cannot be forked is no such report: [`Primary::fork`] returns the
/// error.)
#[derive(Debug)]
pub enum ClusterError {
    /// The worker's IPC channel reported a fault (malformed message, stray
    /// fd, I/O error).
    Channel(ChannelError),
    /// A cluster message was malformed or out of place.
    Protocol(ProtocolError),
    /// A connection handed to the worker (round-robin and the modes built
    /// on it) came back without the worker's answer, or connections waited
    /// too long for a worker able to take them (then no worker is named).
    /// The service goes on: this says what happened to the connection.
    /// Node has no such report: its primary waits for the answer forever
    /// and the worker gets no other connection.
    Handoff {
        /// How the handoff ended.
        failure: HandoffFailure,
        /// What became of the connection(s).
        outcome: HandoffOutcome,
        /// How many connections this is about (more than one only for
        /// [`HandoffFailure::NoWorker`]).
        connections: usize,
    },
    /// A worker's shared socket did not reach it (`EMFILE`, after the
    /// worker answered `NODE_HANDLE_NACK`: it is out of fds); the worker's
    /// `listen` (or `bind`) fails with the same error. (A bind that fails
    /// in the primary is only the worker's error, as in Node: its `listen`
    /// fails with it.)
    Listen {
        /// The errno (`EMFILE`).
        errno: Errno,
        /// Node's error code (`"EADDRINUSE"`).
        code: String,
        /// The failing call (`"bind"`, `"listen"`).
        syscall: String,
    },
}

impl fmt::Display for ClusterError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ClusterError::Channel(e) => write!(f, "worker channel: {e}"),
            ClusterError::Protocol(m) => write!(f, "cluster protocol: {m}"),
            ClusterError::Handoff {
                failure,
                outcome,
                connections,
            } => {
                if *connections == 1 {
                    write!(f, "{failure}; the connection was {outcome}")
                } else {
                    write!(f, "{failure}; {connections} connections were {outcome}")
                }
            }
            ClusterError::Listen {
                errno,
                code,
                syscall,
            } => write!(f, "{syscall} {code} ({})", errno.to_wire()),
        }
    }
}

impl std::error::Error for ClusterError {}

type WorkerCb = Box<dyn FnMut(&mut Loop, &Worker)>;
type ListeningCb = Box<dyn FnMut(&mut Loop, &Worker, &Address)>;
type MessageCb = Box<dyn FnMut(&mut Loop, &Worker, Value, Option<Socket>)>;
type ExitCb = Box<dyn FnMut(&mut Loop, &Worker, Option<i64>, Option<Signum>)>;
type SetupCb = Box<dyn FnMut(&mut Loop, &Settings)>;
type ErrorCb = Box<dyn FnMut(&mut Loop, Option<&Worker>, &ClusterError)>;
type DoneCb = Box<dyn FnOnce(&mut Loop)>;

/// A server handle under one key.
#[derive(Debug)]
enum ServerHandle {
    RoundRobin(RoundRobinHandle),
    Shared(SharedHandle),
}

#[derive(Debug)]
struct ServerEntry {
    /// The server data echoed in every reply (TLS ticket keys).
    data: Value,
    handle: ServerHandle,
}

pub(crate) struct PrimaryInner {
    settings: Settings,
    /// Set by the first `setup_primary` or `fork`, which freezes the policy.
    initialized: bool,
    policy: SchedulingPolicy,
    /// A user scheduler for round-robin handles created from now on.
    scheduler: Option<Scheduler>,
    /// The handoff timeout for round-robin handles created from now on.
    handoff_timeout: std::time::Duration,
    /// The handoff window for round-robin handles created from now on.
    handoff_window: usize,
    /// The last id given out.
    ids: u32,
    /// Node's `cluster.workers`.
    workers: BTreeMap<u32, Worker>,
    /// Workers not yet both disconnected and dead (a worker the primary
    /// disconnected leaves `workers` at once but stays here).
    alive: BTreeMap<u32, Worker>,
    handles: HashMap<String, ServerEntry>,
    /// Round-robin handles that were forgotten with connections still in
    /// flight, kept until those are answered or lost.
    retired_rr: Vec<RoundRobinHandle>,
    disconnect_cbs: Vec<DoneCb>,
    on_fork: Option<WorkerCb>,
    on_online: Option<WorkerCb>,
    on_listening: Option<ListeningCb>,
    on_message: Option<MessageCb>,
    on_disconnect: Option<WorkerCb>,
    on_exit: Option<ExitCb>,
    on_setup: Option<SetupCb>,
    on_error: Option<ErrorCb>,
}

pub(crate) type PrimaryRef = Weak<RefCell<PrimaryInner>>;

/// The cluster primary (Node's `cluster` object in the primary process).
///
/// Cheap to clone: clones name the same primary. Each `on_*` method sets
/// that event's callback for every worker, replacing an earlier one; a
/// worker's own callback (set on the [`Worker`]) runs first, then the
/// primary's. Callbacks never run inside the call that caused them.
///
/// # Examples
///
/// Fork two Node workers running an HTTP server, and stop them once both
/// listen:
///
/// ```no_run
/// use uvcluster::cluster::{Primary, Settings};
/// use uvcluster::uv::{Loop, RunMode};
///
/// let mut lp = Loop::new()?;
/// let primary = Primary::new();
/// primary.setup_primary(&mut lp, Settings {
///     exec_path: Some("node".into()),
///     exec: Some("server.js".into()),
///     args: Some(vec![]),
///     ..Settings::default()
/// });
/// let p = primary.clone();
/// let mut listening = 0;
/// primary.on_listening(move |lp, worker, addr| {
///     println!("worker {} listens on port {:?}", worker.id(), addr.port);
///     listening += 1;
///     if listening == 2 {
///         p.disconnect(lp, |_| println!("all workers gone"));
///     }
/// });
/// primary.on_exit(|_, worker, code, signal| {
///     println!("worker {} exited: {code:?} {signal:?}", worker.id());
/// });
/// for _ in 0..2 {
///     primary.fork(&mut lp, vec![])?;
/// }
/// lp.run(RunMode::Default)?;
/// # Ok::<(), std::io::Error>(())
/// ```
#[derive(Clone)]
pub struct Primary {
    inner: Rc<RefCell<PrimaryInner>>,
}

impl fmt::Debug for Primary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let i = self.inner.borrow();
        f.debug_struct("Primary")
            .field("policy", &i.policy)
            .field("workers", &i.workers.keys().collect::<Vec<_>>())
            .field("handles", &i.handles.keys().collect::<Vec<_>>())
            .finish_non_exhaustive()
    }
}

impl Default for Primary {
    fn default() -> Self {
        Primary::new()
    }
}

macro_rules! primary_emit {
    ($self:ident, $lp:ident, $field:ident, |$cb:ident| $call:expr) => {{
        let taken = $self.inner.borrow_mut().$field.take();
        if let Some(mut $cb) = taken {
            $call;
            let mut i = $self.inner.borrow_mut();
            if i.$field.is_none() {
                i.$field = Some($cb);
            }
        }
    }};
}

impl Primary {
    /// A primary with Node's default settings and the scheduling policy
    /// from `NODE_CLUSTER_SCHED_POLICY` ([`SchedulingPolicy::from_env`]).
    pub fn new() -> Primary {
        Primary {
            inner: Rc::new(RefCell::new(PrimaryInner {
                settings: Settings::default(),
                initialized: false,
                policy: SchedulingPolicy::from_env(),
                scheduler: None,
                handoff_timeout: DEFAULT_HANDOFF_TIMEOUT,
                handoff_window: handoff_window_from_env(),
                ids: 0,
                workers: BTreeMap::new(),
                alive: BTreeMap::new(),
                handles: HashMap::new(),
                retired_rr: Vec::new(),
                disconnect_cbs: Vec::new(),
                on_fork: None,
                on_online: None,
                on_listening: None,
                on_message: None,
                on_disconnect: None,
                on_exit: None,
                on_setup: None,
                on_error: None,
            })),
        }
    }

    fn from_ref(p: &PrimaryRef) -> Option<Primary> {
        p.upgrade().map(|inner| Primary { inner })
    }

    /// Merges `settings` into the current settings (`cluster.setupPrimary`)
    /// and fills Node's defaults: `exec_path` this executable, `args` this
    /// process's arguments, `exec_argv` none, `silent` false. The first call
    /// (or the first [`fork`](Self::fork)) freezes the scheduling policy:
    /// `settings.scheduling_policy` if given, otherwise the one from the
    /// environment. The `setup` event follows on the next loop iteration,
    /// once per call. The first call also marks every fd above 2 that the
    /// process inherited `FD_CLOEXEC`
    /// ([`disable_stdio_inheritance`](crate::uv::disable_stdio_inheritance)),
    /// as Node's start-up does, so workers get only their stdio and IPC
    /// channel.
    pub fn setup_primary(&self, lp: &mut Loop, settings: Settings) {
        let snapshot = {
            let mut i = self.inner.borrow_mut();
            i.settings.merge(settings);
            let s = &mut i.settings;
            if s.exec_path.is_none() {
                s.exec_path = std::env::current_exe().ok().map(PathBuf::into_os_string);
            }
            if s.args.is_none() {
                s.args = Some(std::env::args_os().skip(1).collect());
            }
            if s.exec_argv.is_none() {
                s.exec_argv = Some(Vec::new());
            }
            if s.silent.is_none() {
                s.silent = Some(false);
            }
            if !i.initialized {
                i.initialized = true;
                // Node's start-up does this for every process (src/node.cc).
                crate::uv::disable_stdio_inheritance();
                if let Some(p) = i.settings.scheduling_policy {
                    i.policy = p;
                }
            }
            i.settings.scheduling_policy = Some(i.policy);
            i.settings.clone()
        };
        let me = Rc::downgrade(&self.inner);
        defer(lp, move |lp| {
            if let Some(p) = Primary::from_ref(&me) {
                primary_emit!(p, lp, on_setup, |cb| cb(lp, &snapshot));
            }
        });
    }

    /// The current settings (`cluster.settings`).
    pub fn settings(&self) -> Settings {
        self.inner.borrow().settings.clone()
    }

    /// The scheduling policy (`cluster.schedulingPolicy`): frozen by the
    /// first [`setup_primary`](Self::setup_primary) or [`fork`](Self::fork).
    pub fn scheduling_policy(&self) -> SchedulingPolicy {
        self.inner.borrow().policy
    }

    /// The live workers, by id (`cluster.workers`). A worker leaves once it
    /// is both disconnected and dead, or at once when the primary
    /// disconnects it ([`Worker::disconnect`]), as in Node.
    pub fn workers(&self) -> Vec<Worker> {
        self.inner.borrow().workers.values().cloned().collect()
    }

    /// Sets a scheduler that picks the worker for each connection the
    /// primary accepts (round-robin handles created after this call; the
    /// policy must be [`SchedulingPolicy::RoundRobin`]). It sees the
    /// client's address and every worker's load; returning `None`, or an
    /// id that is not a worker of that server, falls back to the first free
    /// worker. A connection placed on a busy worker waits for it.
    ///
    /// # Examples
    ///
    /// Sticky sessions by client IP:
    ///
    /// ```
    /// use std::hash::{DefaultHasher, Hash, Hasher};
    /// use uvcluster::cluster::{ConnInfo, Primary, WorkerLoad};
    ///
    /// let primary = Primary::new();
    /// primary.set_scheduler(|conn: &ConnInfo, workers: &[WorkerLoad]| {
    ///     let ip = conn.peer?.ip();
    ///     let mut h = DefaultHasher::new();
    ///     ip.hash(&mut h);
    ///     let i = h.finish() as usize % workers.len();
    ///     Some(workers[i].id)
    /// });
    /// ```
    pub fn set_scheduler(&self, f: impl Fn(&ConnInfo, &[WorkerLoad]) -> Option<u32> + 'static) {
        self.inner.borrow_mut().scheduler = Some(Rc::new(f));
    }

    /// Sets the handoff timeout of round-robin handles created after this
    /// call (default [`DEFAULT_HANDOFF_TIMEOUT`], 5 s). It bounds how long
    /// a connection handed to a worker may go unanswered once the worker
    /// has acknowledged its fd (the primary then closes its copy, leaving
    /// the connection to the worker, and frees the worker's slot), when a
    /// handoff left unread is reported, and how long a connection may wait
    /// in the primary while no worker can take one (every worker backing
    /// off after a failed handoff, or not reading its channel) before it is
    /// closed. Each case is reported as [`ClusterError::Handoff`].
    ///
    /// Node has no such timeout: its round-robin handle waits for every
    /// answer forever (`lib/internal/cluster/round_robin_handle.js`).
    ///
    /// # Panics
    ///
    /// If `timeout` is zero.
    pub fn set_handoff_timeout(&self, timeout: std::time::Duration) {
        assert!(!timeout.is_zero(), "the handoff timeout must not be zero");
        self.inner.borrow_mut().handoff_timeout = timeout;
    }

    /// Sets how many connections may be in flight to one worker at a time
    /// under round-robin, least connections and a user scheduler, for
    /// handles created after this call. The default is
    /// [`DEFAULT_HANDOFF_WINDOW`], or what [`HANDOFF_WINDOW_ENV`]
    /// (`UVCLUSTER_HANDOFF_WINDOW`) said when the primary was created.
    ///
    /// A connection is *in flight* from the moment the primary sends it to
    /// a worker (`newconn`) until the worker answers whether it took it.
    /// Node's rule is a window of 1 (`lib/internal/cluster/round_robin_handle.js`:
    /// a worker is free again only once it answered): a worker that has
    /// just been sent a connection waits a round trip to the primary for
    /// its next one. With a window of `n`, a worker may be sent up to `n`
    /// connections before it answers, and its channel sends their fds back
    /// to back rather than each after the previous one's `NODE_HANDLE_ACK`
    /// ([`Channel::set_handles_in_flight`]); Node workers take them so
    /// (each `newconn` carries its own `seq`). A worker whose handoff
    /// failed gets one at a time until one reaches it again, a user
    /// scheduler's connection placed on a worker whose window is full waits
    /// for it, and least connections keeps one in flight whatever the
    /// window (its answer is the sign that the worker's loop runs). Where
    /// the primary's CPU per connection is the limit, a wider window gains
    /// little and lengthens round-robin's tail behind a slow handler;
    /// BENCHMARKS.md has what each window measured.
    ///
    /// [`Channel::set_handles_in_flight`]: crate::ipc::Channel::set_handles_in_flight
    ///
    /// # Panics
    ///
    /// If `window` is 0.
    pub fn set_handoff_window(&self, window: usize) {
        assert!(window > 0, "the handoff window must be at least 1");
        self.inner.borrow_mut().handoff_window = window;
    }

    /// Sends `msg` to every connected worker; returns how many it was
    /// sent to. Workers whose channel is closing are skipped.
    pub fn broadcast(&self, lp: &mut Loop, msg: &serde_json::Value) -> usize {
        self.workers()
            .iter()
            .filter(|w| w.is_connected(lp) && w.send(lp, msg, None).is_ok())
            .count()
    }

    /// The live worker with this id (`cluster.workers[id]`).
    pub fn worker(&self, id: u32) -> Option<Worker> {
        self.inner.borrow().workers.get(&id).cloned()
    }

    /// Forks a worker (`cluster.fork(env)`): runs
    /// `[exec_path, ...exec_argv, exec?, ...args]` from the settings with an
    /// IPC channel, and an environment made of this process's, then
    /// `settings.env`, then `env`, then `NODE_UNIQUE_ID=<id>`. Ids count
    /// from 1. Like Node, this calls [`setup_primary`](Self::setup_primary)
    /// with no changes first (so a `setup` event precedes each `fork`
    /// event). The `fork` event follows on the next loop iteration.
    ///
    /// # Errors
    ///
    /// What [`ipc::fork`] returns: the spawn error, a
    /// [`SpawnError`](crate::uv::SpawnError) that names the program
    /// (`spawn /no/such/cmd ENOENT ...`), or the channel's. No worker
    /// exists then (a child already started is killed and reaped), no id
    /// is used and no event is emitted (Node reports it asynchronously as
    /// the child process's `error`; here the caller has it at once).
    pub fn fork(&self, lp: &mut Loop, env: Vec<(OsString, OsString)>) -> io::Result<Worker> {
        self.setup_primary(lp, Settings::default());
        let (id, settings) = {
            let i = self.inner.borrow();
            (i.ids + 1, i.settings.clone())
        };
        let weak = Rc::downgrade(&self.inner);
        let worker = Worker::new(id, Side::Primary(weak.clone()));
        let mut opts = fork_options(&settings, id, env);
        let (p, w) = (weak.clone(), worker.clone());
        opts.process.on_exit = Some(Box::new(move |lp, process, status, signal| {
            lp.close_if_open(process);
            on_process_exit(lp, &p, &w, status, signal);
        }));
        let Forked {
            process,
            channel,
            stdio,
        } = ipc::fork(lp, opts)?;
        let pid = lp.process_pid(process).ok();
        let stdio = drain_stdio(lp, stdio);
        {
            let mut i = worker.inner.borrow_mut();
            i.channel = Some(channel);
            i.process = Some(process);
            i.pid = pid;
            i.stdio = stdio;
        }
        listen_to_worker(lp, &weak, &worker, &channel);
        {
            let mut i = self.inner.borrow_mut();
            i.ids = id;
            i.workers.insert(id, worker.clone());
            i.alive.insert(id, worker.clone());
        }
        let w = worker.clone();
        defer(lp, move |lp| {
            if let Some(p) = Primary::from_ref(&weak) {
                primary_emit!(p, lp, on_fork, |cb| cb(lp, &w));
            }
        });
        Ok(worker)
    }

    /// Disconnects every connected worker (`cluster.disconnect(cb)`), as
    /// [`Worker::disconnect`] does. `cb` runs once every worker is gone:
    /// [`workers`](Self::workers) is empty and every worker forked so far
    /// has both disconnected and exited. With no workers it runs on the
    /// next loop iteration.
    pub fn disconnect(&self, lp: &mut Loop, cb: impl FnOnce(&mut Loop) + 'static) {
        let workers = self.workers();
        if workers.is_empty() {
            let me = Rc::downgrade(&self.inner);
            defer(lp, move |lp| {
                if let Some(p) = Primary::from_ref(&me) {
                    p.maybe_all_gone(lp);
                }
            });
        } else {
            for w in workers {
                if w.is_connected(lp) {
                    w.disconnect(lp);
                }
            }
        }
        self.inner.borrow_mut().disconnect_cbs.push(Box::new(cb));
        // Every worker may already be gone (none was connected).
        if !workers_left(&self.inner.borrow()) {
            let me = Rc::downgrade(&self.inner);
            defer(lp, move |lp| {
                if let Some(p) = Primary::from_ref(&me) {
                    p.maybe_all_gone(lp);
                }
            });
        }
    }

    /// Sets the `fork` callback: a worker was forked.
    pub fn on_fork(&self, cb: impl FnMut(&mut Loop, &Worker) + 'static) {
        self.inner.borrow_mut().on_fork = Some(Box::new(cb));
    }
    /// Sets the `online` callback: a worker sent `online`.
    pub fn on_online(&self, cb: impl FnMut(&mut Loop, &Worker) + 'static) {
        self.inner.borrow_mut().on_online = Some(Box::new(cb));
    }
    /// Sets the `listening` callback: a worker's server is listening, at
    /// the [`Address`] it asked for with the real port.
    pub fn on_listening(&self, cb: impl FnMut(&mut Loop, &Worker, &Address) + 'static) {
        self.inner.borrow_mut().on_listening = Some(Box::new(cb));
    }
    /// Sets the `message` callback: a worker's user message, with the
    /// handle sent along, if any. Both the worker's and the primary's
    /// callback see the handle; the primary's callback owns it (must close
    /// it) when set, otherwise the worker's. Without either it is closed.
    pub fn on_message(&self, cb: impl FnMut(&mut Loop, &Worker, Value, Option<Socket>) + 'static) {
        self.inner.borrow_mut().on_message = Some(Box::new(cb));
    }
    /// Sets the `disconnect` callback: a worker's channel closed.
    pub fn on_disconnect(&self, cb: impl FnMut(&mut Loop, &Worker) + 'static) {
        self.inner.borrow_mut().on_disconnect = Some(Box::new(cb));
    }
    /// Sets the `exit` callback: a worker's process exited, with its exit
    /// code (`None` if a signal ended it) and signal (`None` if it exited).
    pub fn on_exit(
        &self,
        cb: impl FnMut(&mut Loop, &Worker, Option<i64>, Option<Signum>) + 'static,
    ) {
        self.inner.borrow_mut().on_exit = Some(Box::new(cb));
    }
    /// Sets the `setup` callback: runs after each
    /// [`setup_primary`](Self::setup_primary) with the settings then.
    pub fn on_setup(&self, cb: impl FnMut(&mut Loop, &Settings) + 'static) {
        self.inner.borrow_mut().on_setup = Some(Box::new(cb));
    }
    /// Sets the `error` callback: a fault on a worker's channel, or a
    /// malformed or misplaced cluster message from it. Other workers are
    /// not affected. Without a callback errors are logged.
    pub fn on_error(&self, cb: impl FnMut(&mut Loop, Option<&Worker>, &ClusterError) + 'static) {
        self.inner.borrow_mut().on_error = Some(Box::new(cb));
    }

    /// Closes every server handle and queued connection and forgets all
    /// workers' callbacks, without touching the workers' processes. For
    /// tearing down a primary whose workers are already gone or killed.
    pub fn close(&self, lp: &mut Loop) {
        let (handles, retired) = {
            let mut i = self.inner.borrow_mut();
            (
                std::mem::take(&mut i.handles),
                std::mem::take(&mut i.retired_rr),
            )
        };
        for (_, e) in handles {
            match e.handle {
                ServerHandle::RoundRobin(rr) => rr.close_all(lp),
                ServerHandle::Shared(mut s) => s.close(lp),
            }
        }
        for rr in retired {
            rr.close_all(lp);
        }
    }

    // ----- events --------------------------------------------------------

    /// The primary's `message` event; `false` if no callback is set.
    fn emit_message(&self, lp: &mut Loop, w: &Worker, msg: Value, h: Option<Socket>) -> bool {
        let has = self.inner.borrow().on_message.is_some();
        primary_emit!(self, lp, on_message, |cb| cb(lp, w, msg, h));
        has
    }

    fn emit_error(&self, lp: &mut Loop, w: Option<&Worker>, e: &ClusterError) {
        if let Some(w) = w {
            w.emit_error(lp, e);
        }
        let has = self.inner.borrow().on_error.is_some();
        if has {
            primary_emit!(self, lp, on_error, |cb| cb(lp, w, e));
        } else {
            log::error!(
                "cluster: worker {}: {e}",
                w.map_or_else(|| "-".to_string(), |w| w.id().to_string())
            );
        }
    }

    /// What round-robin handles report through: this primary's `error`
    /// event (held weakly: the handles live in the primary).
    fn reporter(&self) -> round_robin_handle::Report {
        let me = Rc::downgrade(&self.inner);
        Rc::new(move |lp: &mut Loop, w: Option<&Worker>, e: ClusterError| {
            match Primary::from_ref(&me) {
                Some(p) => p.emit_error(lp, w, &e),
                None => log::warn!("cluster: {e}"),
            }
        })
    }

    /// A worker broke the cluster protocol: reported, and counted against
    /// its channel's budget of bad messages, so that a flood of them cuts
    /// the worker off as a flood of garbage does.
    fn protocol_error(&self, lp: &mut Loop, w: &Worker, e: ProtocolError) {
        let e = ClusterError::Protocol(e);
        match w.channel() {
            Some(ch) => ch.peer_fault(lp, |lp| self.emit_error(lp, Some(w), &e)),
            None => self.emit_error(lp, Some(w), &e),
        }
    }

    /// Fires `disconnect` callbacks once no worker is left at all.
    fn maybe_all_gone(&self, lp: &mut Loop) {
        let cbs = {
            let mut i = self.inner.borrow_mut();
            if workers_left(&i) {
                return;
            }
            std::mem::take(&mut i.disconnect_cbs)
        };
        for cb in cbs {
            cb(lp);
        }
    }

    /// Node's `removeWorker`: drops the worker from `cluster.workers`;
    /// `finished` also drops it from the workers still alive.
    fn remove_worker(&self, lp: &mut Loop, w: &Worker, finished: bool) {
        {
            let mut i = self.inner.borrow_mut();
            i.workers.remove(&w.id());
            if finished {
                i.alive.remove(&w.id());
            }
        }
        self.maybe_all_gone(lp);
    }

    /// Node's `removeHandlesForWorker`, plus giving back connections that
    /// were in flight to the worker once it can no longer answer: its
    /// channel is closed, or `exited` (its process is dead and its channel
    /// was not closed with it).
    fn remove_handles_for_worker(&self, lp: &mut Loop, w: &Worker, exited: bool) {
        let gone = if !w.is_connected(lp) {
            Some(if w.is_dead() {
                HandoffFailure::Exited
            } else {
                HandoffFailure::ChannelClosed
            })
        } else if exited {
            Some(HandoffFailure::Exited)
        } else {
            None
        };
        let handles: Vec<(String, ServerHandleRef)> = {
            let i = self.inner.borrow();
            i.handles
                .iter()
                .map(|(k, e)| (k.clone(), ServerHandleRef::of(&e.handle)))
                .collect()
        };
        for (key, h) in handles {
            self.remove_from_handle(lp, &key, h, w, gone);
        }
        if let Some(why) = gone {
            let retired = self.inner.borrow().retired_rr.clone();
            for rr in retired {
                rr.lost(lp, w, why);
            }
            self.prune_retired();
        }
    }

    /// `handle.remove(worker)`, deleting the key when it was the last.
    fn remove_from_handle(
        &self,
        lp: &mut Loop,
        key: &str,
        h: ServerHandleRef,
        w: &Worker,
        gone: Option<HandoffFailure>,
    ) {
        let last = match &h {
            ServerHandleRef::RoundRobin(rr) => rr.remove(lp, w, gone),
            ServerHandleRef::Shared => {
                // Closing a uv handle runs no callback now, so the borrow
                // can be held.
                let mut i = self.inner.borrow_mut();
                match i.handles.get_mut(key).map(|e| &mut e.handle) {
                    Some(ServerHandle::Shared(s)) => s.remove(lp, w.id()),
                    _ => false,
                }
            }
        };
        if last {
            let mut i = self.inner.borrow_mut();
            if let Some(ServerEntry {
                handle: ServerHandle::RoundRobin(rr),
                ..
            }) = i.handles.remove(key)
                && rr.has_in_flight()
            {
                i.retired_rr.push(rr);
            }
        }
    }

    fn prune_retired(&self) {
        self.inner
            .borrow_mut()
            .retired_rr
            .retain(|rr| rr.has_in_flight() || !rr.is_closed());
    }

    // ----- messages from workers (Node's `onmessage`) ----------------------

    fn on_internal_message(&self, lp: &mut Loop, w: &Worker, msg: Value, h: Option<Socket>) {
        if let Some(h) = h {
            // No worker-to-primary cluster message carries a handle.
            lp.close_if_open(h);
            let message = msg.to_string();
            self.protocol_error(lp, w, ProtocolError::UnexpectedHandle { message });
            return;
        }
        match protocol::parse(&msg) {
            Parsed::Message(Received { act, seq }) => self.on_act(lp, w, act, seq),
            Parsed::Malformed(m) => self.on_malformed(lp, w, m),
            // Another internal protocol, no act, an unknown act (including
            // replies with an unknown ack): Node ignores them.
            Parsed::Ignored => {}
        }
    }

    /// Node's `methodMessageMapping`, plus our `load`.
    fn on_act(&self, lp: &mut Loop, w: &Worker, act: Act, seq: Option<u64>) {
        match act {
            Act::Online => self.worker_online(lp, w),
            Act::QueryServer(q) => match seq {
                Some(seq) => self.query_server(lp, w, q, seq),
                None => self.protocol_error(lp, w, no_seq(ActKind::QueryServer)),
            },
            Act::Listening(q) => self.worker_listening(lp, w, &q),
            Act::Close { key } => self.worker_closed(lp, w, &key),
            Act::ExitedAfterDisconnect => self.exited_after_disconnect(lp, w, seq),
            Act::Load { key, load } => self.worker_load(lp, w, &key, load),
            Act::NewConn { .. } | Act::Disconnect => {
                let kind = act.kind();
                self.protocol_error(lp, w, ProtocolError::FromPrimaryOnly { kind });
            }
        }
    }

    /// A known act with bad fields. Node's primary would trip over its own
    /// acts (it ignores the others): report those, and answer a malformed
    /// `queryServer` with `EINVAL` so that the worker is not left waiting.
    fn on_malformed(&self, lp: &mut Loop, w: &Worker, m: Malformed) {
        if !m.kind.node_primary_handles() {
            return;
        }
        self.protocol_error(lp, w, m.error);
        if let (ActKind::QueryServer, Some(seq)) = (m.kind, m.seq)
            && w.exited_after_disconnect() != Some(true)
        {
            self.reply_failed(lp, w, m.key, Value::Null, seq, Errno::EINVAL);
        }
    }

    fn worker_online(&self, lp: &mut Loop, w: &Worker) {
        w.inner.borrow_mut().state = WorkerState::Online;
        w.emit_online(lp);
        primary_emit!(self, lp, on_online, |cb| cb(lp, w));
    }

    fn worker_listening(&self, lp: &mut Loop, w: &Worker, q: &Query) {
        let addr = Address::from_query(q);
        w.inner.borrow_mut().state = WorkerState::Listening;
        w.emit_listening(lp, &addr);
        primary_emit!(self, lp, on_listening, |cb| cb(lp, w, &addr));
    }

    /// The worker closed its server: it leaves the handle (which may be
    /// gone already, removed with the worker).
    fn worker_closed(&self, lp: &mut Loop, w: &Worker, key: &str) {
        let h = self.handle_ref(key);
        if let Some(h) = h {
            self.remove_from_handle(lp, key, h, w, None);
        }
    }

    /// The worker is disconnecting on its own: note it and acknowledge.
    fn exited_after_disconnect(&self, lp: &mut Loop, w: &Worker, seq: Option<u64>) {
        w.inner.borrow_mut().exited_after_disconnect = Some(true);
        match seq {
            Some(seq) => self.send_to(lp, w, Ack.to_fields(seq), None),
            None => self.protocol_error(lp, w, no_seq(ActKind::ExitedAfterDisconnect)),
        }
    }

    /// Beyond Node: a worker's open connections on a round-robin server.
    fn worker_load(&self, lp: &mut Loop, w: &Worker, key: &str, load: u64) {
        let rr = match self.inner.borrow().handles.get(key).map(|e| &e.handle) {
            Some(ServerHandle::RoundRobin(rr)) => Some(rr.clone()),
            _ => None,
        };
        if let Some(rr) = rr {
            rr.set_load(lp, w.id(), load);
        }
    }

    /// The handle under `key`, usable without borrowing the primary.
    fn handle_ref(&self, key: &str) -> Option<ServerHandleRef> {
        let i = self.inner.borrow();
        i.handles.get(key).map(|e| ServerHandleRef::of(&e.handle))
    }

    fn send_to(
        &self,
        lp: &mut Loop,
        w: &Worker,
        fields: Map<String, Value>,
        attach: Option<ipc::Attach>,
    ) {
        if let Some(ch) = w.channel() {
            // A closed channel: the worker is gone and its disconnect is
            // being handled; there is no one to answer.
            let _ = ch.send_cluster(lp, fields, attach, None);
        }
    }

    /// Answers request `seq` with a failed `queryServer` reply.
    fn reply_failed(
        &self,
        lp: &mut Loop,
        w: &Worker,
        key: String,
        data: Value,
        seq: u64,
        e: Errno,
    ) {
        let reply = QueryReply {
            result: Err(e),
            key,
            data,
        };
        self.send_to(lp, w, reply.to_fields(seq), None);
    }

    /// Node's `queryServer`: find or create the handle for the key, add the
    /// worker, and reply.
    fn query_server(&self, lp: &mut Loop, w: &Worker, q: Query, seq: u64) {
        if w.exited_after_disconnect() == Some(true) {
            return;
        }
        let key = q.key();
        if let Err(reason) = validate(&q) {
            let data = q.data.clone();
            self.protocol_error(
                lp,
                w,
                ProtocolError::BadQuery {
                    key: key.clone(),
                    reason,
                },
            );
            self.reply_failed(lp, w, key, data, seq, Errno::EINVAL);
            return;
        }
        self.ensure_handle(lp, &key, &q);
        let data = self.store_data(&key, &q.data);
        if self.has_worker(&key, w) {
            self.protocol_error(lp, w, ProtocolError::AlreadyAdded { key: key.clone() });
            self.reply_failed(lp, w, key, data, seq, Errno::EINVAL);
            return;
        }
        match self.add_worker(lp, &key, w) {
            Added::RoundRobin(rr, result) => {
                let granted = result.is_ok();
                let result = result.map(|sockname| Grant::RoundRobin {
                    sockname,
                    load_reports: rr.wants_load(),
                });
                self.reply(lp, w, QueryReply { result, key, data }, seq);
                if granted {
                    rr.handoff(lp, w);
                }
            }
            Added::Shared(Ok(attach)) => {
                let reply = QueryReply {
                    result: Ok(Grant::Shared),
                    key,
                    data,
                };
                self.send_shared(lp, w, reply, attach, seq);
            }
            Added::Shared(Err(e)) => {
                let reply = QueryReply {
                    result: Err(e),
                    key,
                    data,
                };
                self.reply(lp, w, reply, seq);
            }
        }
    }

    /// Sends a `queryServer` reply without a socket. A failed one deletes
    /// the key first, which gives other workers a chance to retry (Node).
    fn reply(&self, lp: &mut Loop, w: &Worker, reply: QueryReply, seq: u64) {
        if reply.result.is_err() {
            self.forget_handle(lp, &reply.key);
        }
        self.send_to(lp, w, reply.to_fields(seq), None);
    }

    /// Creates the handle for `key` unless there is one: round-robin for
    /// TCP and Unix sockets under the round-robin policies, shared for UDP,
    /// under `None`, and per worker under `ReusePort`.
    fn ensure_handle(&self, lp: &mut Loop, key: &str, q: &Query) {
        if self.inner.borrow().handles.contains_key(key) {
            return;
        }
        let address = server_address(q);
        let address = address.as_deref();
        let (policy, scheduler, timeout, window) = {
            let i = self.inner.borrow();
            (
                i.policy,
                i.scheduler.clone(),
                i.handoff_timeout,
                i.handoff_window,
            )
        };
        let pick = match policy {
            SchedulingPolicy::LeastConnections => Some(Pick::LeastConnections),
            SchedulingPolicy::RoundRobin => Some(scheduler.map_or(Pick::Fifo, Pick::Custom)),
            SchedulingPolicy::None | SchedulingPolicy::ReusePort => None,
        };
        let kind = q.address_type;
        let handle = match pick {
            _ if kind.is_udp() => ServerHandle::Shared(SharedHandle::new(lp, address, q)),
            _ if policy == SchedulingPolicy::ReusePort
                && kind.is_tcp()
                && q.listen_fd().is_none() =>
            {
                ServerHandle::Shared(SharedHandle::new_reuse_port(address, q))
            }
            Some(pick) => {
                let opts = round_robin_handle::Options {
                    pick,
                    timeout_ms: (timeout.as_millis() as u64).max(1),
                    window,
                    report: self.reporter(),
                };
                ServerHandle::RoundRobin(RoundRobinHandle::new(
                    lp,
                    key.to_owned(),
                    address,
                    q,
                    opts,
                ))
            }
            None => ServerHandle::Shared(SharedHandle::new(lp, address, q)),
        };
        let entry = ServerEntry {
            data: Value::Null,
            handle,
        };
        self.inner
            .borrow_mut()
            .handles
            .insert(key.to_owned(), entry);
    }

    /// Node's `if (!handle.data) handle.data = message.data`; returns the
    /// data to reply with.
    fn store_data(&self, key: &str, data: &Value) -> Value {
        let mut i = self.inner.borrow_mut();
        let e = i.handles.get_mut(key).expect("the handle exists");
        if !protocol::truthy(&e.data) {
            e.data = data.clone();
        }
        e.data.clone()
    }

    /// Whether worker `w` already uses the handle under `key`.
    fn has_worker(&self, key: &str, w: &Worker) -> bool {
        let i = self.inner.borrow();
        match i.handles.get(key).map(|e| &e.handle) {
            Some(ServerHandle::RoundRobin(rr)) => rr.has(w.id()),
            Some(ServerHandle::Shared(s)) => s.has(w.id()),
            None => false,
        }
    }

    /// Node's `handle.add(worker)`.
    fn add_worker(&self, lp: &mut Loop, key: &str, w: &Worker) -> Added {
        let mut i = self.inner.borrow_mut();
        match &mut i.handles.get_mut(key).expect("the handle exists").handle {
            ServerHandle::RoundRobin(rr) => Added::RoundRobin(rr.clone(), rr.add(w)),
            // Binding a socket runs no callback now, so the borrow can be
            // held.
            ServerHandle::Shared(s) => Added::Shared(s.add(lp, w.id())),
        }
    }

    /// Deletes the handle under `key` (a failed one), closing a shared
    /// socket.
    fn forget_handle(&self, lp: &mut Loop, key: &str) {
        let removed = self.inner.borrow_mut().handles.remove(key);
        if let Some(ServerEntry {
            handle: ServerHandle::Shared(mut s),
            ..
        }) = removed
        {
            s.close(lp);
        }
    }
}

/// What adding a worker to a handle gave.
enum Added {
    /// The listener's sockname, or the error; the handle to hand
    /// connections from.
    RoundRobin(RoundRobinHandle, Result<Option<protocol::Sockname>, Errno>),
    /// The socket to send, or the error.
    Shared(Result<ipc::Attach, Errno>),
}

/// A request that came without the `seq` its reply must name.
fn no_seq(kind: ActKind) -> ProtocolError {
    ProtocolError::NoSeq { kind }
}

impl Primary {
    /// Sends a shared handle's `queryServer` reply with its socket. If the
    /// socket does not reach the worker (`NODE_HANDLE_NACK`: the kernel
    /// dropped the fd, as it does for a worker at its fd limit), the worker
    /// leaves the handle and is answered again, without a socket, with
    /// `EMFILE`: its `listen` (or `bind`) fails with that error instead of
    /// waiting forever, as a Node worker's does (Node's primary drops the
    /// NACKed reply and the worker's callback never runs). The failure is
    /// reported as [`ClusterError::Listen`].
    fn send_shared(
        &self,
        lp: &mut Loop,
        w: &Worker,
        reply: QueryReply,
        attach: ipc::Attach,
        seq: u64,
    ) {
        let Some(ch) = w.channel() else { return };
        let fields = reply.to_fields(seq);
        let (me, w2) = (Rc::downgrade(&self.inner), w.clone());
        let on_delivery = Box::new(move |lp: &mut Loop, _: ipc::Channel, d| {
            // A failed write: the worker is gone, and its disconnect is
            // handled as any other.
            if !matches!(d, ipc::HandleDelivery::Nacked) {
                return;
            }
            if let Some(p) = Primary::from_ref(&me) {
                p.shared_socket_refused(lp, &w2, reply, seq);
            }
        });
        // A closed channel: the worker is gone; its disconnect is handled.
        let _ = ch.send_cluster_handle(lp, fields, attach, None, on_delivery);
    }

    /// Worker `w` NACKed the shared socket of `reply`: it leaves the
    /// handle, and its request is answered again, with `EMFILE`.
    fn shared_socket_refused(&self, lp: &mut Loop, w: &Worker, reply: QueryReply, seq: u64) {
        let QueryReply { key, data, .. } = reply;
        if let Some(h) = self.handle_ref(&key) {
            self.remove_from_handle(lp, &key, h, w, None);
        }
        self.reply_failed(lp, w, key, data, seq, Errno::EMFILE);
        let e = ClusterError::Listen {
            errno: Errno::EMFILE,
            code: Errno::EMFILE.code(),
            syscall: "bind".into(),
        };
        self.emit_error(lp, Some(w), &e);
    }
}

/// The handoff window from [`HANDOFF_WINDOW_ENV`], or
/// [`DEFAULT_HANDOFF_WINDOW`] when it is unset or invalid (an invalid value
/// is logged; `uvcluster run` and the examples refuse it before starting).
fn handoff_window_from_env() -> usize {
    match std::env::var(HANDOFF_WINDOW_ENV) {
        Ok(v) => parse_handoff_window(&v).unwrap_or_else(|e| {
            log::warn!("cluster: {e}; using {DEFAULT_HANDOFF_WINDOW}");
            DEFAULT_HANDOFF_WINDOW
        }),
        Err(_) => DEFAULT_HANDOFF_WINDOW,
    }
}

/// Whether any worker is still listed or alive.
fn workers_left(i: &PrimaryInner) -> bool {
    !i.workers.is_empty() || !i.alive.is_empty()
}

/// A reference to a handle that can be used without borrowing the primary.
enum ServerHandleRef {
    RoundRobin(RoundRobinHandle),
    Shared,
}

impl ServerHandleRef {
    fn of(h: &ServerHandle) -> ServerHandleRef {
        match h {
            ServerHandle::RoundRobin(rr) => ServerHandleRef::RoundRobin(rr.clone()),
            ServerHandle::Shared(_) => ServerHandleRef::Shared,
        }
    }
}

/// Node's `createWorkerProcess`: the fork of worker `id` under these
/// settings. argv is `[exec_path, ...exec_argv, exec?, ...args]`; the
/// environment is this process's, then `settings.env`, then `env`, then
/// `NODE_UNIQUE_ID`, later entries winning.
fn fork_options(s: &Settings, id: u32, env: Vec<(OsString, OsString)>) -> ForkOptions {
    let mut opts = ForkOptions::exec(s.exec_path.clone().unwrap_or_else(|| "node".into()));
    opts.exec_args = s.exec_argv.clone().unwrap_or_default();
    opts.module = s.exec.clone();
    opts.process.args = s.args.clone().unwrap_or_default();
    opts.process.cwd = s.cwd.clone();
    opts.process.uid = s.uid;
    opts.process.gid = s.gid;
    opts.silent = s.silent.unwrap_or(false);
    opts.stdio = s.stdio.clone();
    let mut vars = s.env.clone().unwrap_or_default();
    vars.extend(env);
    vars.push((NODE_UNIQUE_ID.into(), id.to_string().into()));
    opts.env = last_of_each(vars);
    opts
}

/// Keeps the last value of each variable, in the order of those last
/// values.
fn last_of_each(vars: Vec<(OsString, OsString)>) -> Vec<(OsString, OsString)> {
    let mut seen = std::collections::HashSet::new();
    let mut kept: Vec<_> = vars
        .into_iter()
        .rev()
        .filter(|(k, _)| seen.insert(k.clone()))
        .collect();
    kept.reverse();
    kept
}

/// The primary's ends of a worker's `pipe` stdio slots (`silent`, or a
/// custom `stdio`): the worker's stdin gets EOF; what it writes to 1 and
/// 2 is read and dropped, so it never blocks (the caller may take over
/// with `Worker::stdio`); slots from 3 up are the caller's
/// (`Worker::stdio`). All are closed at exit.
fn drain_stdio(lp: &mut Loop, pipes: Vec<Option<Handle<Pipe>>>) -> Vec<Option<Handle<Pipe>>> {
    let mut kept = Vec::with_capacity(pipes.len());
    for (fd, p) in pipes.into_iter().enumerate() {
        let Some(p) = p else {
            kept.push(None);
            continue;
        };
        if fd == 0 {
            let _ = lp.close(p, |_| {});
            kept.push(None);
            continue;
        }
        if fd <= 2 {
            let drained = lp.read_start(p, |lp, p, r| {
                if !matches!(r, Ok(data) if !data.is_empty()) {
                    let _ = lp.close(p, |_| {});
                }
            });
            if drained.is_err() {
                let _ = lp.close(p, |_| {});
                kept.push(None);
                continue;
            }
        }
        kept.push(Some(p));
    }
    kept
}

/// Node's `worker.process.on('internalMessage')`, `on('message')`, and
/// `once('disconnect')`: routes what the worker's channel delivers.
fn listen_to_worker(lp: &mut Loop, p: &PrimaryRef, w: &Worker, ch: &Channel) {
    let (p1, w1) = (p.clone(), w.clone());
    ch.on_internal(lp, move |lp, _, msg, h| match Primary::from_ref(&p1) {
        Some(p) => p.on_internal_message(lp, &w1, msg, h),
        None => {
            if let Some(h) = h {
                lp.close_if_open(h);
            }
        }
    });
    let (p2, w2) = (p.clone(), w.clone());
    ch.on_message_raw(lp, move |lp, _, msg, h| {
        let had_worker_cb = w2.emit_message(lp, msg.clone(), h);
        let had_primary_cb = match Primary::from_ref(&p2) {
            Some(p) => p.emit_message(lp, &w2, msg.into_value(), h),
            None => false,
        };
        if !had_worker_cb
            && !had_primary_cb
            && let Some(h) = h
        {
            lp.close_if_open(h);
        }
    });
    let (p3, w3) = (p.clone(), w.clone());
    ch.on_error(lp, move |lp, _, e| on_channel_error(lp, &p3, &w3, e));
    let (p4, w4) = (p.clone(), w.clone());
    ch.on_disconnect(lp, move |lp, _| on_channel_disconnect(lp, &p4, &w4));
}

/// A fault on a worker's channel. The worker's end of the channel being
/// gone is none: it exited (or closed its channel). Node's channel treats
/// a read error as the end of the stream (a worker killed with unread
/// messages resets the connection), and a write to a closed end fails
/// with EPIPE. Neither is an I/O fault of the primary: the `disconnect`
/// and `exit` events report what happened, and a connection that was
/// being handed to the worker is reported as re-handed
/// (`ClusterError::Handoff`).
fn on_channel_error(lp: &mut Loop, p: &PrimaryRef, w: &Worker, e: ChannelError) {
    if let ChannelError::Io(io) = &e
        && matches!(
            io.kind(),
            io::ErrorKind::ConnectionReset | io::ErrorKind::BrokenPipe
        )
    {
        return;
    }
    let e = ClusterError::Channel(e);
    match Primary::from_ref(p) {
        Some(p) => p.emit_error(lp, Some(w), &e),
        None => w.emit_error(lp, &e),
    }
}

/// Checks the fields Node would trip over.
fn validate(q: &Query) -> Result<(), &'static str> {
    if q.listen_fd().is_some() {
        return Ok(());
    }
    match q.address_type {
        AddressType::Fd => Err("no address, port or fd"),
        AddressType::Unix => match q.address.as_deref() {
            Some(p) if !p.is_empty() => Ok(()),
            _ => Err("a Unix socket needs a path"),
        },
        _ => match q.port {
            Some(p) if (0..=65535).contains(&p) => Ok(()),
            _ => Err("bad port"),
        },
    }
}

/// The address to bind: for a Unix socket path, the shorter of the path
/// relative to our working directory and the absolute path (Node works
/// around the ~108-byte `sun_path` limit this way).
fn server_address(q: &Query) -> Option<String> {
    let address = q.address.clone()?;
    if q.address_type == AddressType::Unix
        && let Ok(cwd) = std::env::current_dir()
        && let Some(rel) = relative_path(&cwd, Path::new(&address))
    {
        let rel = rel.to_string_lossy().into_owned();
        if rel.len() <= address.len() {
            return Some(rel);
        }
    }
    Some(address)
}

/// Node's `path.relative(from, to)` for absolute paths.
fn relative_path(from: &Path, to: &Path) -> Option<PathBuf> {
    if !from.is_absolute() || !to.is_absolute() {
        return None;
    }
    fn norm(p: &Path) -> Vec<Component<'_>> {
        p.components()
            .filter(|c| !matches!(c, Component::CurDir))
            .collect()
    }
    let (f, t) = (norm(from), norm(to));
    let common = f.iter().zip(&t).take_while(|(a, b)| a == b).count();
    let mut out = PathBuf::new();
    for _ in common..f.len() {
        out.push("..");
    }
    for c in &t[common..] {
        out.push(c.as_os_str());
    }
    Some(out)
}

/// How long after a worker's exit the primary waits for its channel to
/// close before giving back a connection that was in flight to it, in
/// milliseconds. What the dead worker wrote is already in the channel and
/// is read at the next poll; this only matters when another process keeps
/// the worker's end of the channel open.
const EXIT_GRACE_MS: u64 = 100;

/// The worker's process exited (Node's `worker.process.once('exit')`).
fn on_process_exit(lp: &mut Loop, p: &PrimaryRef, w: &Worker, status: i64, signal: Option<Signum>) {
    let primary = Primary::from_ref(p);
    let connected = w.is_connected(lp);
    {
        let mut i = w.inner.borrow_mut();
        if signal.is_some() {
            i.exit_code = None;
            i.signal_code = signal;
        } else {
            i.exit_code = Some(status);
            i.signal_code = None;
        }
    }
    if !connected && let Some(p) = &primary {
        p.remove_handles_for_worker(lp, w, true);
        p.remove_worker(lp, w, true);
    }
    if connected {
        give_back_after_grace(lp, p, w);
    }
    let (code, sig) = {
        let mut i = w.inner.borrow_mut();
        i.exited_after_disconnect = Some(i.exited_after_disconnect.unwrap_or(false));
        i.state = WorkerState::Dead;
        (i.exit_code, i.signal_code)
    };
    w.emit_exit(lp, code, sig);
    // The stdio pipes outlive nothing but the process.
    let pipes = std::mem::take(&mut w.inner.borrow_mut().stdio);
    for p in pipes.into_iter().flatten() {
        lp.close_if_open(p);
    }
    if let Some(p) = &primary {
        primary_emit!(p, lp, on_exit, |cb| cb(lp, w, code, sig));
    }
    if !connected {
        w.clear_callbacks();
    }
}

/// A worker exited with its channel open. The channel usually closes with
/// the process, and its end of stream, read after everything the worker
/// wrote, is where a connection in flight to it is given back. If the
/// channel stays open (another process holds the worker's end), nothing
/// more can come from the dead worker once what it wrote has been read:
/// after a grace period, give back what was in flight to it.
fn give_back_after_grace(lp: &mut Loop, p: &PrimaryRef, w: &Worker) {
    let (p, w) = (p.clone(), w.clone());
    let t = lp.timer_init();
    let started = lp.timer_start(
        t,
        Duration::from_millis(EXIT_GRACE_MS),
        Duration::ZERO,
        move |lp, t| {
            lp.close_if_open(t);
            if w.is_connected(lp)
                && let Some(p) = Primary::from_ref(&p)
            {
                p.remove_handles_for_worker(lp, &w, true);
            }
        },
    );
    if started.is_err() {
        lp.close_if_open(t);
    }
}

/// The worker's channel closed (Node's `worker.process.once('disconnect')`).
fn on_channel_disconnect(lp: &mut Loop, p: &PrimaryRef, w: &Worker) {
    let primary = Primary::from_ref(p);
    let dead = {
        let i = w.inner.borrow();
        i.exit_code.is_some() || i.signal_code.is_some()
    };
    if let Some(p) = &primary {
        p.remove_handles_for_worker(lp, w, dead);
        if dead {
            p.remove_worker(lp, w, true);
        }
    }
    {
        let mut i = w.inner.borrow_mut();
        i.exited_after_disconnect = Some(i.exited_after_disconnect.unwrap_or(false));
        i.state = WorkerState::Disconnected;
    }
    w.emit_disconnect(lp);
    if let Some(p) = &primary {
        primary_emit!(p, lp, on_disconnect, |cb| cb(lp, w));
    }
    if dead {
        w.clear_callbacks();
    }
}

/// `worker.disconnect()` in the primary: sends `disconnect`, marks the
/// worker as leaving on purpose, and drops its server handles and its
/// place in `cluster.workers` at once (Node 20's order).
pub(crate) fn disconnect_worker(lp: &mut Loop, p: &PrimaryRef, w: &Worker) {
    w.inner.borrow_mut().exited_after_disconnect = Some(true);
    let Some(primary) = Primary::from_ref(p) else {
        return;
    };
    primary.send_to(lp, w, Act::Disconnect.to_fields(), None);
    primary.remove_handles_for_worker(lp, w, false);
    primary.remove_worker(lp, w, false);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relative_like_node() {
        let r = |a: &str, b: &str| {
            relative_path(Path::new(a), Path::new(b))
                .unwrap()
                .to_string_lossy()
                .into_owned()
        };
        assert_eq!(r("/a/b", "/a/b/c/sock"), "c/sock");
        assert_eq!(r("/a/b/x", "/a/b/c/sock"), "../c/sock");
        assert_eq!(r("/", "/tmp/s"), "tmp/s");
    }
}
