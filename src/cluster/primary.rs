//! The primary (`lib/internal/cluster/primary.js`).
//!
//! A [`Primary`] forks workers with an IPC channel, answers their
//! `queryServer` requests with a [`RoundRobinHandle`] (TCP and Unix
//! sockets under [`SchedulingPolicy::RoundRobin`]) or a [`SharedHandle`]
//! (UDP always, everything under [`SchedulingPolicy::None`]), and reports
//! each worker's life cycle: `fork`, `online`, `listening`, `message`,
//! `disconnect`, `exit`, in Node 20's order and with its rules for
//! `exitedAfterDisconnect`.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::ffi::OsString;
use std::io;
use std::path::{Component, Path, PathBuf};
use std::rc::Rc;
use std::time::Duration;

use serde_json::{Map, Value};

use super::dispatch::{
    DEFAULT_HANDOFF_WINDOW, DispatchStats, HANDOFF_WINDOW_ENV, LatencyHistogram,
    parse_handoff_window,
};
use super::protocol::{
    self, Ack, Act, ActKind, AddressType, Grant, Malformed, Parsed, ProtocolError, Query,
    QueryReply, Received,
};
use super::round_robin_handle::{
    self, ConnInfo, DEFAULT_HANDOFF_TIMEOUT, HandoffFailure, Pick, RoundRobinHandle, Scheduler,
    WorkerLoad,
};
use super::settings::{SchedulingPolicy, Settings};
use super::shared_handle::{SharedHandle, SocketKey};
use super::worker::{Address, Worker, WorkerState, rec_mut};
use super::{ClusterContext, NODE_UNIQUE_ID, Side};
use crate::ipc::{self, Channel, ChannelError, ForkOptions, Forked};
use crate::net::defer;
use crate::uv::{CallbackSlot, Errno, Handle, Id, Loop, Pipe, Signum, Socket};

pub use super::error::ClusterError;

type WorkerFn = dyn FnMut(&mut Loop, Worker);
type ListeningFn = dyn FnMut(&mut Loop, Worker, &Address);
type MessageFn = dyn FnMut(&mut Loop, Worker, Value, Option<Socket>);
type ExitFn = dyn FnMut(&mut Loop, Worker, Option<i64>, Option<Signum>);
type SetupFn = dyn FnMut(&mut Loop, &Settings);
type ErrorFn = dyn FnMut(&mut Loop, Option<Worker>, &ClusterError);
type HandedLimitFn = dyn FnMut(&mut Loop, Worker, u64);
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

/// A primary's state, owned by the loop (in the cluster's context,
/// [`ClusterContext`]) and named by a [`Primary`] id.
pub(crate) struct PrimaryState {
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
    /// The handoff latencies of round-robin handles dropped since.
    closed_latency: LatencyHistogram,
    disconnect_cbs: Vec<DoneCb>,
    /// Server handles outlive their last worker (a supervisor's primary).
    keep_listeners: bool,
    /// The supervisor slot of each worker that has one (ReusePort sockets
    /// are kept per slot).
    slots: HashMap<u32, u32>,
    /// Workers held out of rotation until [`Primary::admit`].
    held: HashSet<u32>,
    /// Per worker with a limit ([`Primary::set_handed_limit`]): the
    /// connections it accepted since, and the limit.
    handed_limits: HashMap<u32, (u64, u64)>,
    on_handed_limit: CallbackSlot<HandedLimitFn>,
    on_fork: CallbackSlot<WorkerFn>,
    on_online: CallbackSlot<WorkerFn>,
    on_listening: CallbackSlot<ListeningFn>,
    on_message: CallbackSlot<MessageFn>,
    on_disconnect: CallbackSlot<WorkerFn>,
    on_exit: CallbackSlot<ExitFn>,
    on_setup: CallbackSlot<SetupFn>,
    on_error: CallbackSlot<ErrorFn>,
}

/// The cluster primary (Node's `cluster` object in the primary process): a
/// typed id for state the loop owns.
///
/// Like a [`Server`](crate::net::Server), a `Primary` is a copyable id:
/// the loop keeps the primary's state (its settings, workers, server
/// handles and callbacks), every method takes the loop, and every callback
/// receives `&mut Loop` and the ids it concerns. Each `on_*` method sets
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
/// let primary = Primary::new(&mut lp);
/// primary.setup_primary(&mut lp, Settings {
///     exec_path: Some("node".into()),
///     exec: Some("server.js".into()),
///     args: Some(vec![]),
///     ..Settings::default()
/// });
/// let mut listening = 0;
/// primary.on_listening(&mut lp, move |lp, worker, addr| {
///     println!("worker {} listens on port {:?}", worker.id(), addr.port);
///     listening += 1;
///     if listening == 2 {
///         primary.disconnect(lp, |_| println!("all workers gone"));
///     }
/// });
/// primary.on_exit(&mut lp, |_, worker, code, signal| {
///     println!("worker {} exited: {code:?} {signal:?}", worker.id());
/// });
/// for _ in 0..2 {
///     primary.fork(&mut lp, vec![])?;
/// }
/// lp.run(RunMode::Default)?;
/// # Ok::<(), std::io::Error>(())
/// ```
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub struct Primary(Id<PrimaryState>);

impl Primary {
    /// A primary with Node's default settings and the scheduling policy
    /// from `NODE_CLUSTER_SCHED_POLICY` ([`SchedulingPolicy::from_env`]),
    /// kept in `lp` for as long as the loop lives.
    pub fn new(lp: &mut Loop) -> Primary {
        let st = PrimaryState {
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
            closed_latency: LatencyHistogram::default(),
            disconnect_cbs: Vec::new(),
            keep_listeners: false,
            slots: HashMap::new(),
            held: HashSet::new(),
            handed_limits: HashMap::new(),
            on_handed_limit: CallbackSlot::empty(),
            on_fork: CallbackSlot::empty(),
            on_online: CallbackSlot::empty(),
            on_listening: CallbackSlot::empty(),
            on_message: CallbackSlot::empty(),
            on_disconnect: CallbackSlot::empty(),
            on_exit: CallbackSlot::empty(),
            on_setup: CallbackSlot::empty(),
            on_error: CallbackSlot::empty(),
        };
        Primary(lp.context_mut::<ClusterContext>().primaries.insert(st))
    }

    /// The primary's state. A primary's state is never removed from its
    /// loop, so an id from this loop always finds it.
    fn st(self, lp: &Loop) -> &PrimaryState {
        (lp.context::<ClusterContext>())
            .and_then(|c| c.primaries.get(self.0))
            .expect("a primary's state lives as long as its loop")
    }

    fn st_mut(self, lp: &mut Loop) -> &mut PrimaryState {
        (lp.context_mut::<ClusterContext>().primaries)
            .get_mut(self.0)
            .expect("a primary's state lives as long as its loop")
    }

    /// Runs the primary's callback in `slot`, if set; `false` if not.
    fn emit<F: ?Sized>(
        self,
        lp: &mut Loop,
        slot: impl Fn(&mut PrimaryState) -> &mut CallbackSlot<F>,
        call: impl FnOnce(&mut Loop, &mut F),
    ) -> bool {
        lp.call_slot(
            |lp| {
                lp.context_mut::<ClusterContext>()
                    .primaries
                    .get_mut(self.0)
                    .map(&slot)
            },
            call,
        )
        .is_some()
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
    pub fn setup_primary(self, lp: &mut Loop, settings: Settings) {
        let i = self.st_mut(lp);
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
        let snapshot = i.settings.clone();
        defer(lp, move |lp| {
            self.emit(lp, |s| &mut s.on_setup, |lp, f| f(lp, &snapshot));
        });
    }

    /// The current settings (`cluster.settings`).
    pub fn settings(self, lp: &Loop) -> Settings {
        self.st(lp).settings.clone()
    }

    /// The scheduling policy (`cluster.schedulingPolicy`): frozen by the
    /// first [`setup_primary`](Self::setup_primary) or [`fork`](Self::fork).
    pub fn scheduling_policy(self, lp: &Loop) -> SchedulingPolicy {
        self.st(lp).policy
    }

    /// The live workers, by id (`cluster.workers`). A worker leaves once it
    /// is both disconnected and dead, or at once when the primary
    /// disconnects it ([`Worker::disconnect`]), as in Node.
    pub fn workers(self, lp: &Loop) -> Vec<Worker> {
        self.st(lp).workers.values().copied().collect()
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
    /// use uvcluster::uv::Loop;
    ///
    /// let mut lp = Loop::new()?;
    /// let primary = Primary::new(&mut lp);
    /// primary.set_scheduler(&mut lp, |conn: &ConnInfo, workers: &[WorkerLoad]| {
    ///     let ip = conn.peer?.ip();
    ///     let mut h = DefaultHasher::new();
    ///     ip.hash(&mut h);
    ///     let i = h.finish() as usize % workers.len();
    ///     Some(workers[i].id)
    /// });
    /// # Ok::<(), std::io::Error>(())
    /// ```
    pub fn set_scheduler(
        self,
        lp: &mut Loop,
        f: impl Fn(&ConnInfo, &[WorkerLoad]) -> Option<u32> + 'static,
    ) {
        self.st_mut(lp).scheduler = Some(Rc::new(f));
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
    pub fn set_handoff_timeout(self, lp: &mut Loop, timeout: std::time::Duration) {
        assert!(!timeout.is_zero(), "the handoff timeout must not be zero");
        self.st_mut(lp).handoff_timeout = timeout;
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
    pub fn set_handoff_window(self, lp: &mut Loop, window: usize) {
        assert!(window > 0, "the handoff window must be at least 1");
        self.st_mut(lp).handoff_window = window;
    }

    /// Sends `msg` to every connected worker; returns how many it was
    /// sent to. Workers whose channel is closing are skipped.
    pub fn broadcast(self, lp: &mut Loop, msg: &serde_json::Value) -> usize {
        self.workers(lp)
            .into_iter()
            .filter(|w| w.is_connected(lp) && w.send(lp, msg, None).is_ok())
            .count()
    }

    /// The live worker with this id (`cluster.workers[id]`).
    pub fn worker(self, lp: &Loop, id: u32) -> Option<Worker> {
        self.st(lp).workers.get(&id).copied()
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
    pub fn fork(self, lp: &mut Loop, env: Vec<(OsString, OsString)>) -> io::Result<Worker> {
        self.setup_primary(lp, Settings::default());
        let (id, opts) = {
            let i = self.st(lp);
            (i.ids + 1, fork_options(&i.settings, i.ids + 1, env))
        };
        let (worker, forked) = self.spawn_worker(lp, id, opts)?;
        self.adopt_worker(lp, worker, forked);
        defer(lp, move |lp| {
            self.emit(lp, |s| &mut s.on_fork, |lp, f| f(lp, worker));
        });
        Ok(worker)
    }

    /// The fork itself: the worker's record, and the child with its
    /// channel. A failed fork leaves no record behind.
    fn spawn_worker(
        self,
        lp: &mut Loop,
        id: u32,
        mut opts: ForkOptions,
    ) -> io::Result<(Worker, Forked)> {
        let worker = Worker::new(lp, id, Side::Primary(self));
        opts.process.on_exit = Some(Box::new(move |lp, process, status, signal| {
            lp.close_if_open(process);
            self.on_process_exit(lp, worker, status, signal);
        }));
        match ipc::fork(lp, opts) {
            Ok(forked) => Ok((worker, forked)),
            Err(e) => {
                worker.forget(lp);
                Err(e)
            }
        }
    }

    /// Records what the fork gave the worker, routes its channel to the
    /// primary, and lists it in `cluster.workers`.
    fn adopt_worker(self, lp: &mut Loop, worker: Worker, forked: Forked) {
        let Forked {
            process,
            channel,
            stdio,
        } = forked;
        let pid = lp.process_pid(process).ok();
        let stdio = drain_stdio(lp, stdio);
        if let Some(r) = rec_mut(lp, worker) {
            r.channel = Some(channel);
            r.process = Some(process);
            r.pid = pid;
            r.stdio = stdio;
        }
        self.listen_to_worker(lp, worker, channel);
        let i = self.st_mut(lp);
        i.ids = worker.id();
        i.workers.insert(worker.id(), worker);
        i.alive.insert(worker.id(), worker);
    }

    /// Disconnects every connected worker (`cluster.disconnect(cb)`), as
    /// [`Worker::disconnect`] does. `cb` runs once every worker is gone:
    /// [`workers`](Self::workers) is empty and every worker forked so far
    /// has both disconnected and exited. With no workers it runs on the
    /// next loop iteration.
    pub fn disconnect(self, lp: &mut Loop, cb: impl FnOnce(&mut Loop) + 'static) {
        let workers = self.workers(lp);
        if workers.is_empty() {
            defer(lp, move |lp| self.maybe_all_gone(lp));
        } else {
            for w in workers {
                if w.is_connected(lp) {
                    w.disconnect(lp);
                }
            }
        }
        self.st_mut(lp).disconnect_cbs.push(Box::new(cb));
        // Every worker may already be gone (none was connected).
        if !workers_left(self.st(lp)) {
            defer(lp, move |lp| self.maybe_all_gone(lp));
        }
    }

    // ----- for a supervisor (`crate::supervisor`) ---------------------------

    /// Takes worker `w` out of rotation: the primary's dispatcher hands it
    /// no new connection from now on (round-robin, least connections, a
    /// user scheduler); what waits for it goes to the other workers, what
    /// is in flight to it stays and its answers count. Nothing is sent to
    /// the worker: a supervisor drains a worker *before* it disconnects it,
    /// so that no connection reaches a worker that is closing. Under the
    /// shared-socket policies the kernel hands out connections, and a
    /// worker leaves rotation when its server closes (on disconnect).
    ///
    /// Node has no such call: its `disconnect` removes the worker from the
    /// handle and tells it at the same time.
    pub fn drain(self, lp: &mut Loop, w: Worker) {
        self.st_mut(lp).held.remove(&w.id());
        for rr in self.rr_handles_of(lp, w) {
            rr.drain(lp, w.id());
        }
    }

    /// The round-robin handles worker `w` uses.
    fn rr_handles_of(self, lp: &Loop, w: Worker) -> Vec<RoundRobinHandle> {
        (self.st(lp).handles.values())
            .filter_map(|e| match e.handle {
                ServerHandle::RoundRobin(rr) => Some(rr),
                ServerHandle::Shared(_) => None,
            })
            .filter(|rr| rr.has(lp, w.id()))
            .collect()
    }

    /// Holds worker `w` out of rotation until [`admit`](Self::admit):
    /// the dispatcher hands it nothing, on the servers it uses now and on
    /// those it listens on from now on (it joins them held), and what
    /// waits for it goes to the other workers, as under
    /// [`drain`](Self::drain); but unlike a drain it ends. A supervisor
    /// holds a worker that listens before it is ready (PM2's
    /// `process.send('ready')`), and one at its connection limit whose
    /// replacement is not ready yet. Under the shared-socket policies
    /// ([`SchedulingPolicy::None`], [`SchedulingPolicy::ReusePort`]) the
    /// kernel hands out connections: nothing can be held there.
    ///
    /// Node has no such call (its primary hands connections to every
    /// worker that listens).
    pub fn hold(self, lp: &mut Loop, w: Worker) {
        self.st_mut(lp).held.insert(w.id());
        for rr in self.rr_handles_of(lp, w) {
            rr.hold(lp, w.id());
        }
    }

    /// Puts worker `w`, held by [`hold`](Self::hold), back in rotation.
    /// Nothing for a worker not held (one drained stays drained).
    pub fn admit(self, lp: &mut Loop, w: Worker) {
        if !self.st_mut(lp).held.remove(&w.id()) {
            return;
        }
        for rr in self.rr_handles_of(lp, w) {
            rr.admit(lp, w.id());
        }
    }

    /// Whether worker `id` is held (see [`hold`](Self::hold)).
    pub(super) fn is_held(self, lp: &Loop, id: u32) -> bool {
        self.st(lp).held.contains(&id)
    }

    /// Sets a limit on the connections the dispatcher hands worker `w`:
    /// once `w` has accepted `limit` more of them (counted on each
    /// accepted handoff, round-robin policies only), the
    /// [`on_handed_limit`](Self::on_handed_limit) callback runs, once,
    /// with the count. Handoffs already in flight then (at most the
    /// handoff window) may still be accepted: take the worker out of
    /// rotation in the callback ([`hold`](Self::hold) or
    /// [`drain`](Self::drain)) and it gets nothing more. gunicorn's
    /// `max_requests`, counted where the connections are handed out; a
    /// `limit` of 0 removes the limit.
    pub fn set_handed_limit(self, lp: &mut Loop, w: Worker, limit: u64) {
        let limits = &mut self.st_mut(lp).handed_limits;
        if limit == 0 {
            limits.remove(&w.id());
        } else {
            limits.insert(w.id(), (0, limit));
        }
    }

    /// Sets the callback of [`set_handed_limit`](Self::set_handed_limit):
    /// a worker reached its limit (the count it has reached).
    pub fn on_handed_limit(self, lp: &mut Loop, cb: impl FnMut(&mut Loop, Worker, u64) + 'static) {
        self.st_mut(lp).on_handed_limit.set(Box::new(cb));
    }

    /// Worker `w` accepted a connection a round-robin handle handed it:
    /// counts it against its limit, if it has one.
    pub(super) fn count_handed(self, lp: &mut Loop, w: Worker) {
        let Some(i) = (lp.context_mut::<ClusterContext>().primaries).get_mut(self.0) else {
            return;
        };
        if i.handed_limits.is_empty() {
            return;
        }
        let Some(e) = i.handed_limits.get_mut(&w.id()) else {
            return;
        };
        e.0 += 1;
        let n = e.0;
        if n < e.1 {
            return;
        }
        i.handed_limits.remove(&w.id());
        self.emit(lp, |s| &mut s.on_handed_limit, |lp, f| f(lp, w, n));
    }

    /// Whether the primary's listeners outlive their last worker (off by
    /// default, as in Node, whose handle closes when its last worker
    /// leaves). A supervisor turns it on so that the listening socket
    /// stays open while a lone worker is replaced: connections wait (in the
    /// primary's queue under round-robin, up to the handoff timeout; in the
    /// socket's backlog under the shared policies) instead of being
    /// refused. Turning it off closes every listener no worker uses, as a
    /// graceful stop needs.
    pub fn set_keep_listeners(self, lp: &mut Loop, keep: bool) {
        self.st_mut(lp).keep_listeners = keep;
        let keys: Vec<String> = self.st(lp).handles.keys().cloned().collect();
        for key in keys {
            let closed = match self.handle_ref(lp, &key) {
                Some(ServerHandleRef::RoundRobin(rr)) => rr.set_keep_open(lp, keep),
                Some(ServerHandleRef::Shared) => {
                    self.with_shared(lp, &key, |lp, s| s.set_keep(lp, keep))
                }
                None => false,
            };
            if !closed {
                continue;
            }
            let removed = self.st_mut(lp).handles.remove(&key);
            if let Some(ServerEntry {
                handle: ServerHandle::RoundRobin(rr),
                ..
            }) = removed
            {
                if rr.has_in_flight(lp) {
                    self.st_mut(lp).retired_rr.push(rr);
                } else {
                    self.drop_rr(lp, rr);
                }
            }
        }
    }

    /// Puts worker `w` in supervisor slot `slot`, before it listens. Under
    /// [`SchedulingPolicy::ReusePort`] the workers of one slot share one
    /// `SO_REUSEPORT` socket per address: the primary keeps it (with
    /// [`set_keep_listeners`](Self::set_keep_listeners)) and hands it to
    /// the slot's next worker, so nothing queued on it is reset (on Linux,
    /// closing one socket of a reuseport group drops its accept queue).
    /// Without a slot, each worker gets its own socket, closed when it
    /// leaves (Node's model).
    pub fn set_worker_slot(self, lp: &mut Loop, w: Worker, slot: u32) {
        self.st_mut(lp).slots.insert(w.id(), slot);
    }

    /// Slot `slot` is gone (scaled down, or no longer restarted): closes
    /// its kept `SO_REUSEPORT` sockets that no worker uses.
    pub fn release_slot(self, lp: &mut Loop, slot: u32) {
        self.st_mut(lp).slots.retain(|_, s| *s != slot);
        let keys: Vec<String> = (self.st(lp).handles.iter())
            .filter(|(_, e)| matches!(e.handle, ServerHandle::Shared(_)))
            .map(|(k, _)| k.clone())
            .collect();
        for key in keys {
            self.with_shared(lp, &key, |lp, s| {
                s.release_slot(lp, slot);
                false
            });
        }
    }

    /// How many connections the primary's dispatcher handed worker `w` and
    /// it accepted, over all its round-robin servers (0 under the shared
    /// policies, where the kernel hands them out).
    pub fn handed(self, lp: &Loop, w: Worker) -> u64 {
        (self.st(lp).handles.values())
            .map(|e| match e.handle {
                ServerHandle::RoundRobin(rr) => rr.accepted_by(lp, w.id()),
                ServerHandle::Shared(_) => 0,
            })
            .sum()
    }

    /// What the primary's dispatchers hold right now, summed over its
    /// round-robin server handles (those of
    /// [`SchedulingPolicy::RoundRobin`], `LeastConnections` and a user
    /// scheduler), as Node has no counterpart for (its
    /// `RoundRobinHandle` keeps `handles` and `free` but shows neither):
    ///
    /// - [`queued`](DispatchStats::queued): the dispatch queue length,
    ///   connections the primary accepted that wait for a worker;
    /// - [`in_flight`](DispatchStats::in_flight): connections sent to a
    ///   worker that has not answered yet;
    /// - [`handoff_latency`](DispatchStats::handoff_latency): for each
    ///   answered handoff, from sending the `newconn` to the worker's answer,
    ///   in loop milliseconds, merged over every handle, those closed since
    ///   included (its counts never go down);
    /// - [`workers`](DispatchStats::workers): per worker, what waits for or
    ///   is in flight to it, and its open connections where the primary
    ///   knows them (`Some` only for a worker that reports its load; `None`
    ///   under plain round-robin, where the primary never sees a connection
    ///   close).
    ///
    /// Under [`SchedulingPolicy::None`] and
    /// [`SchedulingPolicy::ReusePort`] the kernel queues connections and
    /// hands them to workers: the queue and flights read 0, the histogram
    /// stays empty and `workers` is empty.
    pub fn dispatch_stats(self, lp: &Loop) -> DispatchStats {
        let st = self.st(lp);
        let mut out = DispatchStats {
            handoff_latency: st.closed_latency.clone(),
            ..DispatchStats::default()
        };
        let live = st.handles.values().filter_map(|e| match e.handle {
            ServerHandle::RoundRobin(rr) => Some(rr),
            ServerHandle::Shared(_) => None,
        });
        // A worker's open connections are known only when every handle it
        // serves knows them.
        let mut seen = std::collections::BTreeSet::new();
        for rr in live.chain(st.retired_rr.iter().copied()) {
            let Some(s) = rr.stats(lp) else { continue };
            out.queued += s.queued;
            out.in_flight += s.in_flight;
            out.handoff_latency.merge(&s.handoff_latency);
            for (id, w) in s.workers {
                let e = out.workers.entry(id).or_default();
                e.queued += w.queued;
                e.open = match (seen.insert(id), e.open, w.open) {
                    (true, _, open) => open,
                    (false, Some(a), Some(b)) => Some(a + b),
                    (false, _, _) => None,
                };
            }
        }
        out
    }

    /// Sets the `fork` callback: a worker was forked.
    pub fn on_fork(self, lp: &mut Loop, cb: impl FnMut(&mut Loop, Worker) + 'static) {
        self.st_mut(lp).on_fork.set(Box::new(cb));
    }
    /// Sets the `online` callback: a worker sent `online`.
    pub fn on_online(self, lp: &mut Loop, cb: impl FnMut(&mut Loop, Worker) + 'static) {
        self.st_mut(lp).on_online.set(Box::new(cb));
    }
    /// Sets the `listening` callback: a worker's server is listening, at
    /// the [`Address`] it asked for with the real port.
    pub fn on_listening(
        self,
        lp: &mut Loop,
        cb: impl FnMut(&mut Loop, Worker, &Address) + 'static,
    ) {
        self.st_mut(lp).on_listening.set(Box::new(cb));
    }
    /// Sets the `message` callback: a worker's user message, with the
    /// handle sent along, if any. Both the worker's and the primary's
    /// callback see the handle; the primary's callback owns it (must close
    /// it) when set, otherwise the worker's. Without either it is closed.
    pub fn on_message(
        self,
        lp: &mut Loop,
        cb: impl FnMut(&mut Loop, Worker, Value, Option<Socket>) + 'static,
    ) {
        self.st_mut(lp).on_message.set(Box::new(cb));
    }
    /// Sets the `disconnect` callback: a worker's channel closed.
    pub fn on_disconnect(self, lp: &mut Loop, cb: impl FnMut(&mut Loop, Worker) + 'static) {
        self.st_mut(lp).on_disconnect.set(Box::new(cb));
    }
    /// Sets the `exit` callback: a worker's process exited, with its exit
    /// code (`None` if a signal ended it) and signal (`None` if it exited).
    pub fn on_exit(
        self,
        lp: &mut Loop,
        cb: impl FnMut(&mut Loop, Worker, Option<i64>, Option<Signum>) + 'static,
    ) {
        self.st_mut(lp).on_exit.set(Box::new(cb));
    }
    /// Sets the `setup` callback: runs after each
    /// [`setup_primary`](Self::setup_primary) with the settings then.
    pub fn on_setup(self, lp: &mut Loop, cb: impl FnMut(&mut Loop, &Settings) + 'static) {
        self.st_mut(lp).on_setup.set(Box::new(cb));
    }
    /// Sets the `error` callback: a fault on a worker's channel, or a
    /// malformed or misplaced cluster message from it. Other workers are
    /// not affected. Without a callback errors are logged.
    pub fn on_error(
        self,
        lp: &mut Loop,
        cb: impl FnMut(&mut Loop, Option<Worker>, &ClusterError) + 'static,
    ) {
        self.st_mut(lp).on_error.set(Box::new(cb));
    }

    /// Closes every server handle and queued connection and forgets all
    /// workers' callbacks, without touching the workers' processes. For
    /// tearing down a primary whose workers are already gone or killed.
    pub fn close(self, lp: &mut Loop) {
        let i = self.st_mut(lp);
        let handles = std::mem::take(&mut i.handles);
        let retired = std::mem::take(&mut i.retired_rr);
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
    fn emit_message(self, lp: &mut Loop, w: Worker, msg: Value, h: Option<Socket>) -> bool {
        self.emit(lp, |s| &mut s.on_message, |lp, f| f(lp, w, msg, h))
    }

    pub(super) fn emit_error(self, lp: &mut Loop, w: Option<Worker>, e: &ClusterError) {
        if let Some(w) = w {
            w.emit_error(lp, e);
        }
        if !self.emit(lp, |s| &mut s.on_error, |lp, f| f(lp, w, e)) {
            log::error!(
                "cluster: worker {}: {e}",
                w.map_or_else(|| "-".to_string(), |w| w.id().to_string())
            );
        }
    }

    /// A worker broke the cluster protocol: reported, and counted against
    /// its channel's budget of bad messages, so that a flood of them cuts
    /// the worker off as a flood of garbage does.
    fn protocol_error(self, lp: &mut Loop, w: Worker, e: ProtocolError) {
        let e = ClusterError::Protocol(e);
        match w.channel(lp) {
            Some(ch) => ch.peer_fault(lp, |lp| self.emit_error(lp, Some(w), &e)),
            None => self.emit_error(lp, Some(w), &e),
        }
    }

    /// Fires `disconnect` callbacks once no worker is left at all.
    fn maybe_all_gone(self, lp: &mut Loop) {
        let i = self.st_mut(lp);
        if workers_left(i) {
            return;
        }
        for cb in std::mem::take(&mut i.disconnect_cbs) {
            cb(lp);
        }
    }

    /// Node's `removeWorker`: drops the worker from `cluster.workers`;
    /// `finished` also drops it from the workers still alive.
    fn remove_worker(self, lp: &mut Loop, w: Worker, finished: bool) {
        let i = self.st_mut(lp);
        i.workers.remove(&w.id());
        if finished {
            i.alive.remove(&w.id());
            i.slots.remove(&w.id());
            i.held.remove(&w.id());
            i.handed_limits.remove(&w.id());
        }
        self.maybe_all_gone(lp);
    }

    /// Node's `removeHandlesForWorker`, plus giving back connections that
    /// were in flight to the worker once it can no longer answer: its
    /// channel is closed, or `exited` (its process is dead and its channel
    /// was not closed with it).
    fn remove_handles_for_worker(self, lp: &mut Loop, w: Worker, exited: bool) {
        let gone = if !w.is_connected(lp) {
            Some(if w.is_dead(lp) {
                HandoffFailure::Exited
            } else {
                HandoffFailure::ChannelClosed
            })
        } else if exited {
            Some(HandoffFailure::Exited)
        } else {
            None
        };
        let handles: Vec<(String, ServerHandleRef)> = (self.st(lp).handles.iter())
            .map(|(k, e)| (k.clone(), ServerHandleRef::of(&e.handle)))
            .collect();
        for (key, h) in handles {
            self.remove_from_handle(lp, &key, h, w, gone);
        }
        if let Some(why) = gone {
            let retired = self.st(lp).retired_rr.clone();
            for rr in retired {
                rr.lost(lp, w, why);
            }
            self.prune_retired(lp);
        }
    }

    /// `handle.remove(worker)`, deleting the key when it was the last.
    fn remove_from_handle(
        self,
        lp: &mut Loop,
        key: &str,
        h: ServerHandleRef,
        w: Worker,
        gone: Option<HandoffFailure>,
    ) {
        let last = match h {
            ServerHandleRef::RoundRobin(rr) => rr.remove(lp, w, gone),
            ServerHandleRef::Shared => self.with_shared(lp, key, |lp, s| s.remove(lp, w.id())),
        };
        if !last {
            return;
        }
        let removed = self.st_mut(lp).handles.remove(key);
        if let Some(ServerEntry {
            handle: ServerHandle::RoundRobin(rr),
            ..
        }) = removed
        {
            if rr.has_in_flight(lp) {
                self.st_mut(lp).retired_rr.push(rr);
            } else {
                self.drop_rr(lp, rr);
            }
        }
    }

    /// Runs `f` on the shared handle under `key` (taken out of the table
    /// while it runs; binding and closing sockets run no callback);
    /// `false` if there is none.
    fn with_shared(
        self,
        lp: &mut Loop,
        key: &str,
        f: impl FnOnce(&mut Loop, &mut SharedHandle) -> bool,
    ) -> bool {
        let entry = self.st_mut(lp).handles.remove(key);
        let Some(mut entry) = entry else { return false };
        let r = match &mut entry.handle {
            ServerHandle::Shared(s) => f(lp, s),
            ServerHandle::RoundRobin(_) => false,
        };
        self.st_mut(lp).handles.insert(key.to_owned(), entry);
        r
    }

    /// Drops round-robin handle `rr`'s state, keeping its handoff latencies
    /// for [`dispatch_stats`](Self::dispatch_stats).
    fn drop_rr(self, lp: &mut Loop, rr: RoundRobinHandle) {
        let h = rr.latency(lp);
        self.st_mut(lp).closed_latency.merge(&h);
        rr.drop_state(lp);
    }

    /// Drops the retired round-robin handles nothing is in flight to.
    fn prune_retired(self, lp: &mut Loop) {
        let retired = std::mem::take(&mut self.st_mut(lp).retired_rr);
        let (keep, done): (Vec<_>, Vec<_>) = retired
            .into_iter()
            .partition(|rr| rr.has_in_flight(lp) || !rr.is_closed(lp));
        for rr in done {
            self.drop_rr(lp, rr);
        }
        self.st_mut(lp).retired_rr = keep;
    }

    // ----- messages from workers (Node's `onmessage`) ----------------------

    fn on_internal_message(self, lp: &mut Loop, w: Worker, msg: Value, h: Option<Socket>) {
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
    fn on_act(self, lp: &mut Loop, w: Worker, act: Act, seq: Option<u64>) {
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
    fn on_malformed(self, lp: &mut Loop, w: Worker, m: Malformed) {
        if !m.kind.node_primary_handles() {
            return;
        }
        self.protocol_error(lp, w, m.error);
        if let (ActKind::QueryServer, Some(seq)) = (m.kind, m.seq)
            && w.exited_after_disconnect(lp) != Some(true)
        {
            self.reply_failed(lp, w, m.key, Value::Null, seq, Errno::EINVAL);
        }
    }

    fn worker_online(self, lp: &mut Loop, w: Worker) {
        w.set_state(lp, WorkerState::Online);
        w.emit_online(lp);
        self.emit(lp, |s| &mut s.on_online, |lp, f| f(lp, w));
    }

    fn worker_listening(self, lp: &mut Loop, w: Worker, q: &Query) {
        let addr = Address::from_query(q);
        w.set_state(lp, WorkerState::Listening);
        w.emit_listening(lp, &addr);
        self.emit(lp, |s| &mut s.on_listening, |lp, f| f(lp, w, &addr));
    }

    /// The worker closed its server: it leaves the handle (which may be
    /// gone already, removed with the worker).
    fn worker_closed(self, lp: &mut Loop, w: Worker, key: &str) {
        let h = self.handle_ref(lp, key);
        if let Some(h) = h {
            self.remove_from_handle(lp, key, h, w, None);
        }
    }

    /// The worker is disconnecting on its own: note it and acknowledge.
    fn exited_after_disconnect(self, lp: &mut Loop, w: Worker, seq: Option<u64>) {
        w.set_exited_after_disconnect(lp, true);
        match seq {
            Some(seq) => self.send_to(lp, w, Ack.to_fields(seq), None),
            None => self.protocol_error(lp, w, no_seq(ActKind::ExitedAfterDisconnect)),
        }
    }

    /// Beyond Node: a worker's open connections on a round-robin server.
    fn worker_load(self, lp: &mut Loop, w: Worker, key: &str, load: u64) {
        let rr = match self.st(lp).handles.get(key).map(|e| &e.handle) {
            Some(ServerHandle::RoundRobin(rr)) => Some(*rr),
            _ => None,
        };
        if let Some(rr) = rr {
            rr.set_load(lp, w.id(), load);
        }
    }

    /// The handle under `key`, usable without borrowing the primary.
    fn handle_ref(self, lp: &Loop, key: &str) -> Option<ServerHandleRef> {
        let i = self.st(lp);
        i.handles.get(key).map(|e| ServerHandleRef::of(&e.handle))
    }

    fn send_to(
        self,
        lp: &mut Loop,
        w: Worker,
        fields: Map<String, Value>,
        attach: Option<ipc::Attach>,
    ) {
        if let Some(ch) = w.channel(lp) {
            // A closed channel: the worker is gone and its disconnect is
            // being handled; there is no one to answer.
            let _ = ch.send_cluster(lp, fields, attach, None);
        }
    }

    /// Answers request `seq` with a failed `queryServer` reply.
    fn reply_failed(self, lp: &mut Loop, w: Worker, key: String, data: Value, seq: u64, e: Errno) {
        let reply = QueryReply {
            result: Err(e),
            key,
            data,
        };
        self.send_to(lp, w, reply.to_fields(seq), None);
    }

    /// Node's `queryServer`: find or create the handle for the key, add the
    /// worker, and reply.
    fn query_server(self, lp: &mut Loop, w: Worker, q: Query, seq: u64) {
        if w.exited_after_disconnect(lp) == Some(true) {
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
        let data = self.store_data(lp, &key, &q.data);
        if self.has_worker(lp, &key, w) {
            self.protocol_error(lp, w, ProtocolError::AlreadyAdded { key: key.clone() });
            self.reply_failed(lp, w, key, data, seq, Errno::EINVAL);
            return;
        }
        match self.add_worker(lp, &key, w) {
            Added::RoundRobin(rr, result) => {
                let granted = result.is_ok();
                let result = result.map(|sockname| Grant::RoundRobin {
                    sockname,
                    load_reports: rr.wants_load(lp),
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
    fn reply(self, lp: &mut Loop, w: Worker, reply: QueryReply, seq: u64) {
        if reply.result.is_err() {
            self.forget_handle(lp, &reply.key);
        }
        self.send_to(lp, w, reply.to_fields(seq), None);
    }

    /// Creates the handle for `key` unless there is one: round-robin for
    /// TCP and Unix sockets under the round-robin policies, shared for UDP,
    /// under `None`, and per worker under `ReusePort`.
    fn ensure_handle(self, lp: &mut Loop, key: &str, q: &Query) {
        if self.st(lp).handles.contains_key(key) {
            return;
        }
        let address = server_address(q);
        let address = address.as_deref();
        let (policy, scheduler, timeout, window, keep) = {
            let i = self.st(lp);
            (
                i.policy,
                i.scheduler.clone(),
                i.handoff_timeout,
                i.handoff_window,
                i.keep_listeners,
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
                    primary: self,
                    keep_open: keep,
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
        let mut handle = handle;
        if let ServerHandle::Shared(s) = &mut handle
            && keep
        {
            s.set_keep(lp, true);
        }
        let entry = ServerEntry {
            data: Value::Null,
            handle,
        };
        self.st_mut(lp).handles.insert(key.to_owned(), entry);
    }

    /// Node's `if (!handle.data) handle.data = message.data`; returns the
    /// data to reply with.
    fn store_data(self, lp: &mut Loop, key: &str, data: &Value) -> Value {
        let i = self.st_mut(lp);
        let e = i.handles.get_mut(key).expect("the handle exists");
        if !protocol::truthy(&e.data) {
            e.data = data.clone();
        }
        e.data.clone()
    }

    /// Whether worker `w` already uses the handle under `key`.
    fn has_worker(self, lp: &Loop, key: &str, w: Worker) -> bool {
        let i = self.st(lp);
        match i.handles.get(key).map(|e| &e.handle) {
            Some(ServerHandle::RoundRobin(rr)) => rr.has(lp, w.id()),
            Some(ServerHandle::Shared(s)) => s.has(w.id()),
            None => false,
        }
    }

    /// Node's `handle.add(worker)`.
    fn add_worker(self, lp: &mut Loop, key: &str, w: Worker) -> Added {
        let rr = match &self
            .st(lp)
            .handles
            .get(key)
            .expect("the handle exists")
            .handle
        {
            ServerHandle::RoundRobin(rr) => Some(*rr),
            ServerHandle::Shared(_) => None,
        };
        if let Some(rr) = rr {
            return Added::RoundRobin(rr, rr.add(lp, w));
        }
        let socket = match self.st(lp).slots.get(&w.id()) {
            Some(&slot) => SocketKey::Slot(slot),
            None => SocketKey::Worker(w.id()),
        };
        let mut added = None;
        self.with_shared(lp, key, |lp, s| {
            added = Some(s.add(lp, w.id(), socket));
            true
        });
        Added::Shared(added.expect("the handle is a shared one"))
    }

    /// Deletes the handle under `key` (a failed one), closing a shared
    /// socket.
    fn forget_handle(self, lp: &mut Loop, key: &str) {
        let removed = self.st_mut(lp).handles.remove(key);
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
        self,
        lp: &mut Loop,
        w: Worker,
        reply: QueryReply,
        attach: ipc::Attach,
        seq: u64,
    ) {
        let Some(ch) = w.channel(lp) else { return };
        let fields = reply.to_fields(seq);
        let on_delivery = Box::new(move |lp: &mut Loop, _: ipc::Channel, d| {
            // A failed write: the worker is gone, and its disconnect is
            // handled as any other.
            if matches!(d, ipc::HandleDelivery::Nacked) {
                self.shared_socket_refused(lp, w, reply, seq);
            }
        });
        // A closed channel: the worker is gone; its disconnect is handled.
        let _ = ch.send_cluster_handle(lp, fields, attach, None, on_delivery);
    }

    /// Worker `w` NACKed the shared socket of `reply`: it leaves the
    /// handle, and its request is answered again, with `EMFILE`.
    fn shared_socket_refused(self, lp: &mut Loop, w: Worker, reply: QueryReply, seq: u64) {
        let QueryReply { key, data, .. } = reply;
        if let Some(h) = self.handle_ref(lp, &key) {
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
fn workers_left(i: &PrimaryState) -> bool {
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
            ServerHandle::RoundRobin(rr) => ServerHandleRef::RoundRobin(*rr),
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

impl Primary {
    /// Node's `worker.process.on('internalMessage')`, `on('message')`, and
    /// `once('disconnect')`: routes what the worker's channel delivers.
    /// Each callback names the primary and the worker by id.
    fn listen_to_worker(self, lp: &mut Loop, w: Worker, ch: Channel) {
        ch.on_internal(lp, move |lp, _, msg, h| {
            self.on_internal_message(lp, w, msg, h)
        });
        ch.on_message_raw(lp, move |lp, _, msg, h| {
            let had_worker_cb = w.emit_message(lp, msg.clone(), h);
            let had_primary_cb = self.emit_message(lp, w, msg.into_value(), h);
            if !had_worker_cb
                && !had_primary_cb
                && let Some(h) = h
            {
                lp.close_if_open(h);
            }
        });
        ch.on_error(lp, move |lp, _, e| self.on_channel_error(lp, w, e));
        ch.on_disconnect(lp, move |lp, _| self.on_channel_disconnect(lp, w));
    }

    /// A fault on a worker's channel. The worker's end of the channel being
    /// gone is none: it exited (or closed its channel). Node's channel treats
    /// a read error as the end of the stream (a worker killed with unread
    /// messages resets the connection), and a write to a closed end fails
    /// with EPIPE. Neither is an I/O fault of the primary: the `disconnect`
    /// and `exit` events report what happened, and a connection that was
    /// being handed to the worker is reported as re-handed
    /// (`ClusterError::Handoff`).
    fn on_channel_error(self, lp: &mut Loop, w: Worker, e: ChannelError) {
        if let ChannelError::Io(io) = &e
            && matches!(
                io.kind(),
                io::ErrorKind::ConnectionReset | io::ErrorKind::BrokenPipe
            )
        {
            return;
        }
        self.emit_error(lp, Some(w), &ClusterError::Channel(e));
    }

    /// The worker's process exited (Node's `worker.process.once('exit')`).
    fn on_process_exit(self, lp: &mut Loop, w: Worker, status: i64, signal: Option<Signum>) {
        let connected = w.is_connected(lp);
        if let Some(r) = rec_mut(lp, w) {
            if signal.is_some() {
                r.exit_code = None;
                r.signal_code = signal;
            } else {
                r.exit_code = Some(status);
                r.signal_code = None;
            }
        }
        if connected {
            self.give_back_after_grace(lp, w);
        } else {
            self.remove_handles_for_worker(lp, w, true);
            self.remove_worker(lp, w, true);
        }
        let (code, sig) = w.settle(lp, WorkerState::Dead);
        w.emit_exit(lp, code, sig);
        // The stdio pipes outlive nothing but the process.
        let pipes = rec_mut(lp, w).map(|r| std::mem::take(&mut r.stdio));
        for p in pipes.into_iter().flatten().flatten() {
            lp.close_if_open(p);
        }
        self.emit(lp, |s| &mut s.on_exit, |lp, f| f(lp, w, code, sig));
        if !connected {
            w.clear_callbacks(lp);
        }
    }

    /// A worker exited with its channel open. The channel usually closes
    /// with the process, and its end of stream, read after everything the
    /// worker wrote, is where a connection in flight to it is given back.
    /// If the channel stays open (another process holds the worker's end),
    /// nothing more can come from the dead worker once what it wrote has
    /// been read: after a grace period, give back what was in flight to it.
    fn give_back_after_grace(self, lp: &mut Loop, w: Worker) {
        let t = lp.timer_init();
        let started = lp.timer_start(
            t,
            Duration::from_millis(EXIT_GRACE_MS),
            Duration::ZERO,
            move |lp, t| {
                lp.close_if_open(t);
                if w.is_connected(lp) {
                    self.remove_handles_for_worker(lp, w, true);
                }
            },
        );
        if started.is_err() {
            lp.close_if_open(t);
        }
    }

    /// The worker's channel closed (Node's `worker.process.once('disconnect')`).
    fn on_channel_disconnect(self, lp: &mut Loop, w: Worker) {
        let dead = w.is_dead(lp);
        self.remove_handles_for_worker(lp, w, dead);
        if dead {
            self.remove_worker(lp, w, true);
        }
        w.settle(lp, WorkerState::Disconnected);
        w.emit_disconnect(lp);
        self.emit(lp, |s| &mut s.on_disconnect, |lp, f| f(lp, w));
        if dead {
            w.clear_callbacks(lp);
        }
    }

    /// `worker.disconnect()` in the primary: sends `disconnect`, marks the
    /// worker as leaving on purpose, and drops its server handles and its
    /// place in `cluster.workers` at once (Node 20's order).
    pub(crate) fn disconnect_worker(self, lp: &mut Loop, w: Worker) {
        w.set_exited_after_disconnect(lp, true);
        self.send_to(lp, w, Act::Disconnect.to_fields(), None);
        self.remove_handles_for_worker(lp, w, false);
        self.remove_worker(lp, w, false);
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
