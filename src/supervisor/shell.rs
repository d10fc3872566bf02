//! The I/O shell: executes the [`Core`]'s actions on a
//! [`cluster::Primary`](crate::cluster::Primary) and feeds it the
//! primary's events, the signals and the timer.
//!
//! Everything this file knows of the cluster is here: the `on_*`
//! callbacks it sets on the primary, and the calls of
//! [`Action`] (fork, [`Primary::drain`], disconnect, kill,
//! [`Primary::release_slot`], [`Primary::set_keep_listeners`]).

use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::io;
use std::time::Duration;

use super::config::{ConfigError, SupervisorConfig};
use super::core::{
    Action, Core, ExitInfo, LifecycleEvent, ReloadError, ReloadReport, ReplaceReason, SlotId,
    WorkerId, WorkerState,
};
use crate::cluster::{Address, ClusterError, HandoffFailure, Primary, Worker};
use crate::uv::{CallbackSlot, Handle, Id, Ids, Loop, Signal, Signum, Timer};

type EventFn = dyn FnMut(&mut Loop, &LifecycleEvent);
type ExitFn = dyn FnMut(&mut Loop, i32);
type ReloadCb = Box<dyn FnOnce(&mut Loop, Result<ReloadReport, ReloadError>)>;
type ListeningFn = dyn FnMut(&mut Loop, Worker, &Address);
type MessageFn = dyn FnMut(&mut Loop, Worker, serde_json::Value);
type ErrorFn = dyn FnMut(&mut Loop, Option<Worker>, &ClusterError);

/// One worker (or one empty slot) as [`Supervisor::status`] shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkerStatus {
    /// The worker's cluster id; `None` for a slot with no worker (errored,
    /// or waiting to restart).
    pub id: Option<u32>,
    /// Its process id.
    pub pid: Option<i32>,
    /// Its slot.
    pub slot: usize,
    /// Its state.
    pub state: WorkerState,
    /// Since it was forked.
    pub uptime: Duration,
    /// How many times its slot was restarted after a crash.
    pub restarts: u32,
    /// Connections the primary's dispatcher handed it and it accepted
    /// (round-robin policies; 0 where the kernel hands them out).
    pub connections: u64,
    /// For an empty slot: how its last worker ended.
    pub last_exit: Option<ExitInfo>,
    /// For an empty slot: the last lines its workers wrote on stderr (at
    /// most [`STDERR_LINES`]), when the primary pipes the workers' stdio
    /// (`Settings::silent`); empty otherwise.
    pub last_stderr: Vec<String>,
}

/// How many of a slot's last stderr lines the supervisor keeps.
pub const STDERR_LINES: usize = 10;

impl fmt::Display for WorkerStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.id {
            Some(id) => write!(f, "worker {id}")?,
            None => f.write_str("no worker")?,
        }
        write!(f, " slot {} {}", self.slot, self.state)?;
        if let Some(pid) = self.pid {
            write!(f, " pid {pid}")?;
        }
        write!(
            f,
            " up {} ms, {} restart(s), {} connection(s)",
            self.uptime.as_millis(),
            self.restarts,
            self.connections
        )?;
        if let Some(e) = self.last_exit {
            write!(f, ", last: {e}")?;
        }
        Ok(())
    }
}

/// The supervisors of one loop, kept in it ([`Loop::context_mut`]), as
/// the cluster keeps its primaries (ARCHITECTURE.md, *One model for every
/// layer*).
#[derive(Default)]
struct SupervisorContext {
    supervisors: Ids<SupervisorState>,
}

/// The most bytes the broadcast relay lets wait in a worker's channel
/// (1 MiB, about 100 messages of 10 KB): past it, relayed messages for
/// that worker are dropped (see [`Supervisor::set_broadcast`]).
pub const RELAY_QUEUE_LIMIT: usize = 1 << 20;

/// What [`Supervisor::send_all`] wrote a message to.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SendCount {
    /// Workers in the pool (starting or ready).
    pub pool: usize,
    /// Other workers: draining (out of rotation, about to exit), or about
    /// to be, their slot's replacement having been forked.
    pub draining: usize,
}

/// A supervisor's state, owned by the loop and named by a [`Supervisor`]
/// id.
struct SupervisorState {
    core: Core,
    primary: Primary,
    workers: HashMap<WorkerId, Worker>,
    timer: Option<Handle<Timer>>,
    sampler: Option<Handle<Timer>>,
    signals: Vec<Handle<Signal>>,
    reload_cbs: HashMap<u64, Vec<ReloadCb>>,
    on_event: CallbackSlot<EventFn>,
    on_exit: CallbackSlot<ExitFn>,
    on_listening: CallbackSlot<ListeningFn>,
    on_message: CallbackSlot<MessageFn>,
    on_error: CallbackSlot<ErrorFn>,
    exit_code: Option<i32>,
    started: bool,
    broadcast: bool,
    /// Workers the broadcast relay skips because they do not read (their
    /// channel holds more than [`RELAY_QUEUE_LIMIT`]): how many relayed
    /// messages each lost in the current episode.
    relay_drops: HashMap<WorkerId, u64>,
    /// The last stderr lines of each slot's workers (piped stdio only).
    stderr: HashMap<SlotId, VecDeque<String>>,
}

/// A supervisor: keeps a pool of cluster workers up, reloads it without
/// dropping a connection, and stops it gracefully.
///
/// It runs a [`Primary`] (give it one with
/// [`with_primary`](Self::with_primary) to choose the program and the
/// policy) and takes over the primary's `listening`, `message`,
/// `disconnect`, `exit` and `error` callbacks; a worker's own callbacks
/// ([`Worker::on_exit`] and the others) stay the caller's. The policy is
/// the pure state machine of `core.rs`; `docs/supervisor.md` gives its
/// rules, the signal table and the defaults.
///
/// Like a [`Primary`], a `Supervisor` is a copyable id: the loop keeps its
/// state (for as long as the loop lives), every method takes the loop, and
/// every callback receives `&mut Loop`.
///
/// # Examples
///
/// Four workers of this same program, restarted when they crash, reloaded
/// on SIGHUP, stopped gracefully on SIGTERM:
///
/// ```no_run
/// use uvcluster::cluster;
/// use uvcluster::supervisor::{Supervisor, SupervisorConfig};
/// use uvcluster::uv::{Loop, RunMode};
///
/// let mut lp = Loop::new()?;
/// if cluster::setup_worker(&mut lp)?.is_some() {
///     // A worker: listen and serve (see the cluster module).
/// } else {
///     let config = SupervisorConfig { workers: 4, ..SupervisorConfig::default() };
///     let sup = Supervisor::new(&mut lp, config).expect("a valid config");
///     sup.on_event(&mut lp, |_, e| eprintln!("{e}"));
///     sup.handle_signals(&mut lp)?;
///     sup.start(&mut lp);
/// }
/// lp.run(RunMode::Default)?;
/// # Ok::<(), std::io::Error>(())
/// ```
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub struct Supervisor(Id<SupervisorState>);

impl Supervisor {
    /// A supervisor on a new [`Primary`] (this program as its workers,
    /// Node's default settings, the policy from
    /// `NODE_CLUSTER_SCHED_POLICY`). Nothing starts before
    /// [`start`](Self::start).
    ///
    /// # Errors
    ///
    /// [`ConfigError`] from [`SupervisorConfig::validate`].
    pub fn new(lp: &mut Loop, config: SupervisorConfig) -> Result<Supervisor, ConfigError> {
        let primary = Primary::new(lp);
        Supervisor::with_primary(lp, primary, config)
    }

    /// A supervisor on `primary` (set up with
    /// [`Primary::setup_primary`] for the program and the policy), kept in
    /// `lp` for as long as the loop lives.
    ///
    /// # Errors
    ///
    /// [`ConfigError`] from [`SupervisorConfig::validate`].
    pub fn with_primary(
        lp: &mut Loop,
        primary: Primary,
        config: SupervisorConfig,
    ) -> Result<Supervisor, ConfigError> {
        config.validate()?;
        let seed = u64::from(std::process::id()) ^ 0x9e37_79b9_7f4a_7c15;
        let state = SupervisorState {
            core: Core::new(config, seed),
            primary,
            workers: HashMap::new(),
            timer: None,
            sampler: None,
            signals: Vec::new(),
            reload_cbs: HashMap::new(),
            on_event: CallbackSlot::empty(),
            on_exit: CallbackSlot::empty(),
            on_listening: CallbackSlot::empty(),
            on_message: CallbackSlot::empty(),
            on_error: CallbackSlot::empty(),
            exit_code: None,
            started: false,
            broadcast: false,
            relay_drops: HashMap::new(),
            stderr: HashMap::new(),
        };
        let sup = Supervisor((lp.context_mut::<SupervisorContext>().supervisors).insert(state));
        sup.hook(lp, primary);
        Ok(sup)
    }

    /// The supervisor's state. It is never removed from its loop, so an id
    /// from this loop always finds it.
    fn st(self, lp: &Loop) -> &SupervisorState {
        (lp.context::<SupervisorContext>())
            .and_then(|c| c.supervisors.get(self.0))
            .expect("a supervisor's state lives as long as its loop")
    }

    fn st_mut(self, lp: &mut Loop) -> &mut SupervisorState {
        (lp.context_mut::<SupervisorContext>().supervisors)
            .get_mut(self.0)
            .expect("a supervisor's state lives as long as its loop")
    }

    /// Runs the supervisor's callback in `slot`, if set; `false` if not.
    fn emit<F: ?Sized>(
        self,
        lp: &mut Loop,
        slot: impl Fn(&mut SupervisorState) -> &mut CallbackSlot<F>,
        call: impl FnOnce(&mut Loop, &mut F),
    ) -> bool {
        lp.call_slot(
            |lp| {
                (lp.context_mut::<SupervisorContext>().supervisors)
                    .get_mut(self.0)
                    .map(&slot)
            },
            call,
        )
        .is_some()
    }

    /// The primary it runs.
    pub fn primary(self, lp: &Loop) -> Primary {
        self.st(lp).primary
    }

    /// The configuration.
    pub fn config(self, lp: &Loop) -> SupervisorConfig {
        self.st(lp).core.config().clone()
    }

    /// Sets the primary's callbacks that feed the core. Each names the
    /// supervisor by its id.
    fn hook(self, lp: &mut Loop, p: Primary) {
        p.on_listening(lp, move |lp, w, addr| {
            let now = lp.now();
            (self.st_mut(lp).core).listening(now, w.id(), address_key(addr));
            self.pump(lp);
            self.emit(lp, |s| &mut s.on_listening, |lp, f| f(lp, w, addr));
        });
        p.on_message(lp, move |lp, w, msg, h| {
            if let Some(h) = h {
                lp.close_if_open(h);
            }
            // PM2's convention: `process.send('ready')`.
            if msg.as_str() == Some("ready") {
                let now = lp.now();
                self.st_mut(lp).core.ready_message(now, w.id());
                self.pump(lp);
                return;
            }
            if self.st(lp).broadcast {
                self.relay(lp, w.id(), &msg);
            }
            self.emit(lp, |s| &mut s.on_message, |lp, f| f(lp, w, msg));
        });
        p.on_disconnect(lp, move |lp, w| {
            let now = lp.now();
            self.st_mut(lp).core.disconnected(now, w.id());
            self.pump(lp);
        });
        p.on_exit(lp, move |lp, w, code, signal| {
            let now = lp.now();
            let after = w.exited_after_disconnect(lp) == Some(true);
            let i = self.st_mut(lp);
            i.workers.remove(&w.id());
            i.relay_drops.remove(&w.id());
            i.core.exited(now, w.id(), ExitInfo { code, signal }, after);
            self.pump(lp);
        });
        p.on_handed_limit(lp, move |lp, w, n| {
            let now = lp.now();
            self.st_mut(lp).core.handed(now, w.id(), n);
            self.pump(lp);
        });
        p.on_error(lp, move |lp, w, e| {
            let hung = matches!(
                e,
                ClusterError::Handoff {
                    failure: HandoffFailure::NoAnswer | HandoffFailure::Unread,
                    ..
                }
            );
            // The caller's `error` callback, or a log line as the primary
            // writes one when it has no callback.
            let handled = self.emit(lp, |s| &mut s.on_error, |lp, f| f(lp, w, e));
            if !handled {
                match w {
                    Some(w) => log::error!("cluster: worker {}: {e}", w.id()),
                    None => log::error!("cluster: {e}"),
                }
            }
            if let (true, Some(w)) = (hung, w)
                && self.st(lp).core.config().worker_timeout.is_some()
            {
                let now = lp.now();
                self.st_mut(lp).core.hung(now, w.id());
                self.pump(lp);
            }
        });
    }

    /// Starts the pool: forks every slot's worker. Keeps the primary's
    /// listeners open across changes of workers
    /// ([`Primary::set_keep_listeners`]) and, when a worker timeout is
    /// set, makes it the primary's handoff timeout (a connection left
    /// unanswered that long marks its worker hung). Call once.
    pub fn start(self, lp: &mut Loop) {
        let (primary, cfg) = {
            let i = self.st_mut(lp);
            if i.started {
                return;
            }
            i.started = true;
            (i.primary, i.core.config().clone())
        };
        primary.set_keep_listeners(lp, true);
        if let Some(t) = cfg.worker_timeout.filter(|t| !t.is_zero()) {
            primary.set_handoff_timeout(lp, t);
        }
        // The connection limit is counted by the dispatcher, on each
        // handoff (`Primary::set_handed_limit`); only memory is sampled.
        if cfg.max_memory.is_some() {
            self.start_sampler(lp, cfg.memory_check_interval);
        }
        let now = lp.now();
        self.st_mut(lp).core.start(now);
        self.pump(lp);
    }

    /// Starts a rolling reload: each slot (or `reload_batch` slots at a
    /// time) forks a replacement; once it is ready the old worker is
    /// drained, disconnected, and killed after the kill timeout. `cb` gets
    /// the outcome. A replacement that is not ready in time is killed,
    /// the old workers keep serving and the reload fails (fail closed). A
    /// reload asked for while one runs waits for it (several waiting ones
    /// are one reload); a reload never interleaves with another. During a
    /// stop it is refused: `cb` gets [`ReloadError::Refused`].
    pub fn reload(
        self,
        lp: &mut Loop,
        cb: impl FnOnce(&mut Loop, Result<ReloadReport, ReloadError>) + 'static,
    ) {
        let now = lp.now();
        let i = self.st_mut(lp);
        let ticket = i.core.reload(now);
        i.reload_cbs.entry(ticket).or_default().push(Box::new(cb));
        self.pump(lp);
    }

    /// With `on`, a pool whose every worker is gone because its slots
    /// errored (a crash loop) does not exit: it waits, empty, until the
    /// next [`reload`](Self::reload), which starts every errored slot
    /// afresh with its restart budget reset (`uvcluster run --watch`: the
    /// fix of a broken file brings the pool back, as nodemon's "app
    /// crashed - waiting for file changes before starting..."). A stop
    /// still ends it, with code 0. Nothing of the supervisor keeps the
    /// loop alive while it waits: the caller's handles do. Off by default:
    /// such a pool exits with code 1 (see [`on_exit`](Self::on_exit)).
    pub fn hold_when_errored(self, lp: &mut Loop, on: bool) {
        let now = lp.now();
        self.st_mut(lp).core.hold_errored(now, on);
        self.pump(lp);
    }

    /// Sets the number of workers. Added slots fork at once; removed slots
    /// (the newest) are drained, disconnected and killed after the kill
    /// timeout.
    ///
    /// # Errors
    ///
    /// `InvalidInput` for 0 (at least one worker runs) or more than
    /// [`MAX_WORKERS`](super::MAX_WORKERS); `Other` with
    /// [`REFUSED`](super::REFUSED) during a stop (nothing changes).
    pub fn scale(self, lp: &mut Loop, n: usize) -> io::Result<()> {
        if self.st(lp).core.stopping() {
            self.st_mut(lp).core.refuse(&format!("scale to {n}"));
            self.pump(lp);
            return Err(io::Error::other(super::REFUSED));
        }
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "scale: at least 1 worker",
            ));
        }
        if n > super::config::MAX_WORKERS {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "scale: at most {} workers. Received {n}",
                    super::config::MAX_WORKERS
                ),
            ));
        }
        let now = lp.now();
        self.st_mut(lp).core.scale(now, n);
        self.pump(lp);
        Ok(())
    }

    /// Replaces worker `id` gracefully: a new worker for its slot, then,
    /// once it is ready, the old one drained (fail closed as a reload).
    ///
    /// # Errors
    ///
    /// `NotFound` if `id` is not a ready worker in rotation (starting,
    /// draining, gone, already being replaced); `Other` with
    /// [`REFUSED`](super::REFUSED) during a stop.
    pub fn restart(self, lp: &mut Loop, id: u32) -> io::Result<()> {
        if self.st(lp).core.stopping() {
            self.st_mut(lp)
                .core
                .refuse(&format!("restart of worker {id}"));
            self.pump(lp);
            return Err(io::Error::other(super::REFUSED));
        }
        let now = lp.now();
        let ok = (self.st_mut(lp).core).replace(now, id, ReplaceReason::Requested);
        self.pump(lp);
        if ok {
            Ok(())
        } else {
            Err(io::Error::new(
                io::ErrorKind::NotFound,
                format!("restart: worker {id} is not a ready worker in rotation"),
            ))
        }
    }

    /// Stops: `graceful` closes the listeners, drains and disconnects
    /// every worker and kills what remains after the kill timeout;
    /// otherwise every worker is killed (SIGKILL) at once. Once every
    /// worker is gone the supervisor exits with code 0 (see
    /// [`on_exit`](Self::on_exit)).
    pub fn stop(self, lp: &mut Loop, graceful: bool) {
        let now = lp.now();
        self.st_mut(lp).core.stop(now, graceful);
        self.pump(lp);
    }

    /// One row per worker (and per empty slot), by slot.
    pub fn status(self, lp: &Loop) -> Vec<WorkerStatus> {
        let i = self.st(lp);
        i.core
            .status(lp.now())
            .into_iter()
            .map(|r| {
                let w = r.worker.and_then(|id| i.workers.get(&id).copied());
                WorkerStatus {
                    id: r.worker,
                    pid: w.and_then(|w| w.pid(lp)),
                    slot: r.slot,
                    state: r.state,
                    uptime: r.uptime,
                    restarts: r.restarts,
                    connections: w.map_or(r.handed, |w| i.primary.handed(lp, w)),
                    last_exit: r.last_exit,
                    last_stderr: if r.worker.is_none() {
                        i.stderr
                            .get(&r.slot)
                            .map(|l| l.iter().cloned().collect())
                            .unwrap_or_default()
                    } else {
                        Vec::new()
                    },
                }
            })
            .collect()
    }

    /// Relays every user message a worker sends to every other connected
    /// worker when `on` (`uvcluster run --broadcast`): the primary of
    /// Node's classic cluster example, `worker.on('message', m =>
    /// for (const id in cluster.workers) cluster.workers[id].send(m))`
    /// minus the sender, so workers that keep shared state by messages (a
    /// visit counter) work unchanged. The string `"ready"` is the
    /// supervisor's readiness message and is not relayed; a handle sent
    /// with a message is closed, not relayed. Off by default. A worker
    /// that answers every message it receives with a message of its own
    /// makes the workers relay forever, as under Node's classic primary.
    ///
    /// # Examples
    ///
    /// ```no_run
    /// use uvcluster::supervisor::{Supervisor, SupervisorConfig};
    /// use uvcluster::uv::Loop;
    ///
    /// let mut lp = Loop::new()?;
    /// let sup = Supervisor::new(&mut lp, SupervisorConfig::default()).expect("a valid config");
    /// sup.set_broadcast(&mut lp, true);
    /// # Ok::<(), std::io::Error>(())
    /// ```
    pub fn set_broadcast(self, lp: &mut Loop, on: bool) {
        self.st_mut(lp).broadcast = on;
    }

    /// Sends `msg` from worker `from` to every other connected worker,
    /// except one whose channel already holds more than
    /// [`RELAY_QUEUE_LIMIT`] bytes: that worker is not reading (stopped,
    /// busy), and the relay drops the message for it rather than buffer
    /// without limit (Node's primary would buffer: `worker.send` returns
    /// `false` and queues). One WARN starts an episode; the worker is
    /// relayed to again once its channel is below half the limit, with a
    /// WARN giving the count dropped.
    fn relay(self, lp: &mut Loop, from: u32, msg: &serde_json::Value) {
        let mut to: Vec<Worker> = (self.st(lp).workers.values())
            .copied()
            .filter(|w| w.id() != from && w.is_connected(lp))
            .collect();
        to.sort_by_key(|w| w.id());
        for w in to {
            let queued = w.channel(lp).map_or(0, |c| c.write_queue_size(lp));
            let pid = w.pid(lp).unwrap_or(0);
            let dropping = self.st(lp).relay_drops.contains_key(&w.id());
            if queued > RELAY_QUEUE_LIMIT || (dropping && queued > RELAY_QUEUE_LIMIT / 2) {
                if !dropping {
                    log::warn!(
                        "broadcast: worker {} (pid {pid}) is not reading; dropping relayed messages",
                        w.id()
                    );
                }
                *self.st_mut(lp).relay_drops.entry(w.id()).or_insert(0) += 1;
                continue;
            }
            if let Some(k) = self.st_mut(lp).relay_drops.remove(&w.id()) {
                log::warn!(
                    "broadcast: worker {} (pid {pid}) is reading again; {k} message{} dropped",
                    w.id(),
                    if k == 1 { " was" } else { "s were" }
                );
            }
            // A worker whose channel just closed misses it, as in Node.
            if let Err(e) = w.send(lp, msg, None) {
                log::debug!("supervisor: broadcast to worker {}: {e}", w.id());
            }
        }
    }

    /// How many relayed messages the broadcast relay has dropped for
    /// worker `id` in its current episode of not reading (see
    /// [`set_broadcast`](Self::set_broadcast)); `None` while the worker is
    /// relayed to normally (or is unknown).
    pub fn broadcast_dropped(self, lp: &Loop, id: u32) -> Option<u64> {
        self.st(lp).relay_drops.get(&id).copied()
    }

    /// Sends `msg` to every connected worker (`uvcluster ctl send`),
    /// draining ones included (they may still act on it), and says how
    /// many it was written to: [`pool`](SendCount::pool) counts each slot
    /// once (a slot whose worker is being replaced has two workers for a
    /// moment), [`draining`](SendCount::draining) the rest (out of rotation
    /// during a reload, restart or scale-down, or about to be).
    pub fn send_all(self, lp: &mut Loop, msg: &serde_json::Value) -> SendCount {
        let rows: HashMap<WorkerId, (SlotId, bool)> = (self.st(lp).core.status(lp.now()))
            .into_iter()
            .filter_map(|r| Some((r.worker?, (r.slot, r.state == WorkerState::Draining))))
            .collect();
        let mut ws: Vec<Worker> = self.st(lp).workers.values().copied().collect();
        ws.sort_by_key(|w| w.id());
        let mut slots = std::collections::HashSet::new();
        let mut written = 0;
        for w in ws {
            if w.is_connected(lp) && w.send(lp, msg, None).is_ok() {
                written += 1;
                if let Some(&(slot, false)) = rows.get(&w.id()) {
                    slots.insert(slot);
                }
            }
        }
        SendCount {
            pool: slots.len(),
            draining: written - slots.len(),
        }
    }

    /// Sets the lifecycle-event callback (each event is also logged
    /// through `log`, one line).
    pub fn on_event(self, lp: &mut Loop, cb: impl FnMut(&mut Loop, &LifecycleEvent) + 'static) {
        self.st_mut(lp).on_event.set(Box::new(cb));
    }

    /// Sets the `error` callback: the primary's errors
    /// ([`Primary::on_error`], which the supervisor uses; after this runs
    /// a hung worker is killed and replaced), with the worker concerned
    /// if one is (`None` for connections that no worker could take within
    /// the handoff timeout). Without a callback each is logged at `error`
    /// level, `cluster: worker 3: ...` or `cluster: ...`.
    pub fn on_error(
        self,
        lp: &mut Loop,
        cb: impl FnMut(&mut Loop, Option<Worker>, &ClusterError) + 'static,
    ) {
        self.st_mut(lp).on_error.set(Box::new(cb));
    }

    /// Sets the `listening` callback: a worker listens (the primary's
    /// [`Primary::on_listening`], which the supervisor uses; this runs
    /// after the supervisor has seen it).
    pub fn on_listening(
        self,
        lp: &mut Loop,
        cb: impl FnMut(&mut Loop, Worker, &Address) + 'static,
    ) {
        self.st_mut(lp).on_listening.set(Box::new(cb));
    }

    /// Sets the `message` callback for workers' user messages other than
    /// `'ready'` (which the supervisor takes); a handle sent along is
    /// closed.
    pub fn on_message(
        self,
        lp: &mut Loop,
        cb: impl FnMut(&mut Loop, Worker, serde_json::Value) + 'static,
    ) {
        self.st_mut(lp).on_message.set(Box::new(cb));
    }

    /// Sets the callback run when the supervisor is done, with the exit
    /// code it chose: 0 after a stop, 1 when no worker is left running and
    /// none will be restarted (a crash loop, or every worker failed under
    /// `restart = never`). Its timers and signal handlers are closed
    /// before; a program usually exits with the code (`uvcluster run`
    /// does). It runs once. Without a callback, read it with
    /// [`exit_code`](Self::exit_code) once the loop has returned.
    pub fn on_exit(self, lp: &mut Loop, cb: impl FnMut(&mut Loop, i32) + 'static) {
        self.st_mut(lp).on_exit.set(Box::new(cb));
    }

    /// The exit code, once the supervisor is done.
    pub fn exit_code(self, lp: &Loop) -> Option<i32> {
        self.st(lp).exit_code
    }

    /// Installs the signal table (see `docs/supervisor.md`): SIGTERM and
    /// SIGINT stop gracefully (a second one, not a duplicate delivery
    /// within the duplicate window, stops at once), SIGQUIT stops at
    /// once, SIGHUP reloads, SIGTTIN adds a worker and SIGTTOU removes one
    /// (never below one). SIGUSR1 and SIGUSR2 are caught and ignored:
    /// their default action would end the primary and leave its workers
    /// orphaned (nodemon and other tools send SIGUSR2). The handlers are
    /// closed when the supervisor is done.
    ///
    /// # Errors
    ///
    /// The error of [`Loop::signal_start`].
    pub fn handle_signals(self, lp: &mut Loop) -> io::Result<()> {
        for sig in [
            Signum::SIGTERM,
            Signum::SIGINT,
            Signum::SIGQUIT,
            Signum::SIGHUP,
            Signum::SIGTTIN,
            Signum::SIGTTOU,
            Signum::SIGUSR1,
            Signum::SIGUSR2,
        ] {
            let h = lp.signal_init();
            let r = lp.signal_start(h, sig, move |lp, _, sig| {
                let now = lp.now();
                self.st_mut(lp).core.signal(now, sig);
                self.pump(lp);
            });
            if let Err(e) = r {
                lp.close_if_open(h);
                return Err(e);
            }
            self.st_mut(lp).signals.push(h);
        }
        Ok(())
    }

    fn start_sampler(self, lp: &mut Loop, every: Duration) {
        let t = lp.timer_init();
        let _ = lp.unref_handle(t);
        let started = lp.timer_start(t, every, every, move |lp, _| self.sample(lp));
        if started.is_ok() {
            self.st_mut(lp).sampler = Some(t);
        } else {
            lp.close_if_open(t);
        }
    }

    /// Samples each worker's RSS (`/proc/<pid>/status`).
    fn sample(self, lp: &mut Loop) {
        let now = lp.now();
        let samples: Vec<(WorkerId, Option<u64>)> = {
            let i = self.st(lp);
            (i.workers.iter())
                .map(|(&id, &w)| (id, w.pid(lp).and_then(rss_bytes)))
                .collect()
        };
        let i = self.st_mut(lp);
        for (id, rss) in samples {
            if let Some(b) = rss {
                i.core.rss(now, id, b);
            }
        }
        self.pump(lp);
    }

    /// Executes the core's actions until none is left.
    fn pump(self, lp: &mut Loop) {
        while let Some(action) = self.st_mut(lp).core.next_action() {
            self.execute(lp, action);
        }
    }

    fn worker(self, lp: &Loop, id: WorkerId) -> Option<Worker> {
        self.st(lp).workers.get(&id).copied()
    }

    fn execute(self, lp: &mut Loop, action: Action) {
        match action {
            Action::Fork { slot, .. } => self.fork(lp, slot),
            Action::Drain(id) => {
                if let Some(w) = self.worker(lp, id) {
                    self.primary(lp).drain(lp, w);
                }
            }
            Action::Hold(id) => {
                if let Some(w) = self.worker(lp, id) {
                    self.primary(lp).hold(lp, w);
                }
            }
            Action::Admit(id) => {
                if let Some(w) = self.worker(lp, id) {
                    self.primary(lp).admit(lp, w);
                }
            }
            Action::LimitConnections(id, limit) => {
                if let Some(w) = self.worker(lp, id) {
                    self.primary(lp).set_handed_limit(lp, w, limit);
                }
            }
            Action::Disconnect(id) => {
                if let Some(w) = self.worker(lp, id)
                    && w.is_connected(lp)
                {
                    w.disconnect(lp);
                }
            }
            Action::Kill(id, sig) => {
                if let Some(w) = self.worker(lp, id) {
                    // ESRCH: it is exiting; its exit is on its way.
                    let _ = w.kill(lp, Some(sig));
                }
            }
            Action::ReleaseSlot(slot) => self.primary(lp).release_slot(lp, slot as u32),
            Action::CloseListeners => self.primary(lp).set_keep_listeners(lp, false),
            Action::Timer(at) => self.arm(lp, at),
            Action::ReloadDone(ticket, result) => {
                let cbs = self.st_mut(lp).reload_cbs.remove(&ticket);
                for cb in cbs.into_iter().flatten() {
                    cb(lp, result.clone());
                }
            }
            Action::Exit(code) => self.exit(lp, code),
            Action::Report(e) => self.report(lp, &e),
        }
    }

    fn fork(self, lp: &mut Loop, slot: SlotId) {
        let p = self.primary(lp);
        let now = lp.now();
        match p.fork(lp, Vec::new()) {
            Ok(w) => {
                p.set_worker_slot(lp, w, slot as u32);
                self.capture_stderr(lp, w, slot);
                let i = self.st_mut(lp);
                i.workers.insert(w.id(), w);
                i.core.forked(now, slot, w.id());
            }
            Err(e) => self.st_mut(lp).core.fork_failed(now, slot, e.to_string()),
        }
    }

    /// With piped stdio, keeps the last [`STDERR_LINES`] lines the
    /// worker writes on stderr, by slot (the primary would drop them).
    fn capture_stderr(self, lp: &mut Loop, w: Worker, slot: SlotId) {
        let Some(pipe) = w.stdio(lp, 2) else { return };
        let _ = lp.read_stop(pipe);
        let mut partial = Vec::new();
        let started = lp.read_start(pipe, move |lp, p, r| {
            let data = match r {
                Ok(d) if !d.is_empty() => d,
                _ => {
                    let _ = lp.close(p, |_| {});
                    return;
                }
            };
            partial.extend_from_slice(data);
            let lines = self.st_mut(lp).stderr.entry(slot).or_default();
            while let Some(n) = partial.iter().position(|&b| b == b'\n') {
                let line: Vec<u8> = partial.drain(..=n).collect();
                lines.push_back(String::from_utf8_lossy(&line).trim_end().to_owned());
                if lines.len() > STDERR_LINES {
                    lines.pop_front();
                }
            }
            // A line without an end is kept whole up to 4 KiB.
            partial.truncate(4096);
        });
        if started.is_err() {
            let _ = lp.close(pipe, |_| {});
        }
    }

    fn arm(self, lp: &mut Loop, at: Option<u64>) {
        let Some(at) = at else {
            if let Some(t) = self.st_mut(lp).timer.take() {
                lp.close_if_open(t);
            }
            return;
        };
        let t = match self.st(lp).timer {
            Some(t) => t,
            None => {
                let t = lp.timer_init();
                self.st_mut(lp).timer = Some(t);
                t
            }
        };
        let delay = Duration::from_millis(at.saturating_sub(lp.now()));
        let started = lp.timer_start(t, delay, Duration::ZERO, move |lp, _| {
            let now = lp.now();
            self.st_mut(lp).core.tick(now);
            self.pump(lp);
        });
        if let Err(e) = started {
            log::error!("supervisor: cannot arm its timer: {e}");
        }
    }

    fn report(self, lp: &mut Loop, e: &LifecycleEvent) {
        use LifecycleEvent as E;
        match e {
            E::Exited {
                expected: false, ..
            }
            | E::Errored { .. }
            | E::ForkFailed { .. }
            | E::ReloadFailed(_)
            | E::ReplaceFailed { .. }
            | E::Killed { .. } => log::warn!("{e}"),
            _ => log::info!("{e}"),
        }
        if let E::Errored { slot, .. } = e {
            let lines: Vec<String> = (self.st(lp).stderr.get(slot))
                .map(|l| l.iter().cloned().collect())
                .unwrap_or_default();
            for l in lines {
                log::warn!("slot {slot} stderr: {l}");
            }
        }
        self.emit(lp, |s| &mut s.on_event, |lp, f| f(lp, e));
    }

    fn exit(self, lp: &mut Loop, code: i32) {
        let i = self.st_mut(lp);
        i.exit_code = Some(code);
        let (timer, sampler, signals) = (
            i.timer.take(),
            i.sampler.take(),
            std::mem::take(&mut i.signals),
        );
        for t in timer.into_iter().chain(sampler) {
            lp.close_if_open(t);
        }
        for s in signals {
            lp.close_if_open(s);
        }
        self.primary(lp).set_keep_listeners(lp, false);
        // It runs once: taken out for good.
        if let Some(mut cb) = self.st_mut(lp).on_exit.clear() {
            cb(lp, code);
        }
    }
}

/// A key naming a listening address, for readiness (a replacement is
/// ready once it listens on every key its slot listened on).
fn address_key(a: &Address) -> String {
    let port = a.port.map_or_else(String::new, |p| p.to_string());
    let fd = a.fd.map_or_else(String::new, |p| p.to_string());
    let kind = if a.address_type.is_udp() {
        "udp"
    } else if a.address_type.is_tcp() {
        "tcp"
    } else {
        "unix"
    };
    format!("{kind}|{}|{port}|{fd}", a.address.as_deref().unwrap_or(""))
}

/// A process's resident set in bytes, from `/proc/<pid>/status` (`VmRSS`,
/// in kB); `None` where it cannot be read.
fn rss_bytes(pid: i32) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = s.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}
