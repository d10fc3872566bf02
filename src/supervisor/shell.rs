//! The I/O shell: executes the [`Core`]'s actions on a
//! [`cluster::Primary`](crate::cluster::Primary) and feeds it the
//! primary's events, the signals and the timer.
//!
//! Everything this file knows of the cluster is here: the `on_*`
//! callbacks it sets on the primary, and the calls of
//! [`Action`] (fork, [`Primary::drain`], disconnect, kill,
//! [`Primary::release_slot`], [`Primary::set_keep_listeners`]).

use std::cell::RefCell;
use std::collections::HashMap;
use std::fmt;
use std::io;
use std::rc::{Rc, Weak};
use std::time::Duration;

use super::config::{ConfigError, SupervisorConfig};
use super::core::{
    Action, Core, ExitInfo, LifecycleEvent, ReloadError, ReloadReport, ReplaceReason, SlotId,
    WorkerId, WorkerState,
};
use crate::cluster::{Address, ClusterError, HandoffFailure, Primary, Worker};
use crate::uv::{Handle, Loop, Signal, Signum, Timer};

type EventCb = Box<dyn FnMut(&mut Loop, &LifecycleEvent)>;
type ExitCb = Box<dyn FnMut(&mut Loop, i32)>;
type ReloadCb = Box<dyn FnOnce(&mut Loop, Result<ReloadReport, ReloadError>)>;
type ListeningCb = Box<dyn FnMut(&mut Loop, &Worker, &Address)>;
type MessageCb = Box<dyn FnMut(&mut Loop, &Worker, serde_json::Value)>;

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

struct Inner {
    core: Core,
    primary: Primary,
    workers: HashMap<WorkerId, Worker>,
    timer: Option<Handle<Timer>>,
    sampler: Option<Handle<Timer>>,
    signals: Vec<Handle<Signal>>,
    reload_cbs: HashMap<u64, Vec<ReloadCb>>,
    on_event: Option<EventCb>,
    on_exit: Option<ExitCb>,
    on_listening: Option<ListeningCb>,
    on_message: Option<MessageCb>,
    exit_code: Option<i32>,
    started: bool,
    broadcast: bool,
    /// The last stderr lines of each slot's workers (piped stdio only).
    stderr: HashMap<SlotId, std::collections::VecDeque<String>>,
}

/// A supervisor: keeps a pool of cluster workers up, reloads it without
/// dropping a connection, and stops it gracefully.
///
/// It runs a [`Primary`] (give it one with
/// [`with_primary`](Self::with_primary) to choose the program and the
/// policy) and takes over the primary's `fork`, `listening`, `message`,
/// `disconnect`, `exit` and `error` callbacks; a worker's own callbacks
/// ([`Worker::on_exit`] and the others) stay the caller's. The policy is
/// the pure state machine of `core.rs`; `docs/supervisor.md` gives its
/// rules, the signal table and the defaults.
///
/// Cheap to clone: clones name the same supervisor.
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
///     sup.on_event(|_, e| eprintln!("{e}"));
///     sup.handle_signals(&mut lp)?;
///     sup.start(&mut lp);
/// }
/// lp.run(RunMode::Default)?;
/// # Ok::<(), std::io::Error>(())
/// ```
#[derive(Clone)]
pub struct Supervisor {
    inner: Rc<RefCell<Inner>>,
}

impl fmt::Debug for Supervisor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let i = self.inner.borrow();
        f.debug_struct("Supervisor")
            .field("core", &i.core)
            .field("exit_code", &i.exit_code)
            .finish_non_exhaustive()
    }
}

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
    /// [`Primary::setup_primary`] for the program and the policy).
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
        let sup = Supervisor {
            inner: Rc::new(RefCell::new(Inner {
                core: Core::new(config, seed),
                primary,
                workers: HashMap::new(),
                timer: None,
                sampler: None,
                signals: Vec::new(),
                reload_cbs: HashMap::new(),
                on_event: None,
                on_exit: None,
                on_listening: None,
                on_message: None,
                exit_code: None,
                started: false,
                broadcast: false,
                stderr: HashMap::new(),
            })),
        };
        sup.hook(lp, primary);
        Ok(sup)
    }

    /// The primary it runs.
    pub fn primary(&self) -> Primary {
        self.inner.borrow().primary
    }

    /// The configuration.
    pub fn config(&self) -> SupervisorConfig {
        self.inner.borrow().core.config().clone()
    }

    fn weak(&self) -> Weak<RefCell<Inner>> {
        Rc::downgrade(&self.inner)
    }

    fn from_weak(w: &Weak<RefCell<Inner>>) -> Option<Supervisor> {
        w.upgrade().map(|inner| Supervisor { inner })
    }

    /// Sets the primary's callbacks that feed the core.
    fn hook(&self, lp: &mut Loop, p: Primary) {
        let me = self.weak();
        p.on_listening(lp, move |lp, w, addr| {
            if let Some(s) = Supervisor::from_weak(&me) {
                let now = lp.now();
                s.inner
                    .borrow_mut()
                    .core
                    .listening(now, w.id(), address_key(addr));
                s.pump(lp);
                let cb = s.inner.borrow_mut().on_listening.take();
                if let Some(mut cb) = cb {
                    cb(lp, &w, addr);
                    let mut i = s.inner.borrow_mut();
                    if i.on_listening.is_none() {
                        i.on_listening = Some(cb);
                    }
                }
            }
        });
        let me = self.weak();
        p.on_message(lp, move |lp, w, msg, h| {
            if let Some(h) = h {
                lp.close_if_open(h);
            }
            let Some(s) = Supervisor::from_weak(&me) else {
                return;
            };
            // PM2's convention: `process.send('ready')`.
            if msg.as_str() == Some("ready") {
                let now = lp.now();
                s.inner.borrow_mut().core.ready_message(now, w.id());
                s.pump(lp);
                return;
            }
            if s.inner.borrow().broadcast {
                s.relay(lp, w.id(), &msg);
            }
            let cb = s.inner.borrow_mut().on_message.take();
            if let Some(mut cb) = cb {
                cb(lp, &w, msg);
                let mut i = s.inner.borrow_mut();
                if i.on_message.is_none() {
                    i.on_message = Some(cb);
                }
            }
        });
        let me = self.weak();
        p.on_disconnect(lp, move |lp, w| {
            if let Some(s) = Supervisor::from_weak(&me) {
                let now = lp.now();
                s.inner.borrow_mut().core.disconnected(now, w.id());
                s.pump(lp);
            }
        });
        let me = self.weak();
        p.on_exit(lp, move |lp, w, code, signal| {
            if let Some(s) = Supervisor::from_weak(&me) {
                let now = lp.now();
                let after = w.exited_after_disconnect(lp) == Some(true);
                {
                    let mut i = s.inner.borrow_mut();
                    i.workers.remove(&w.id());
                    i.core.exited(now, w.id(), ExitInfo { code, signal }, after);
                }
                s.pump(lp);
            }
        });
        let me = self.weak();
        p.on_error(lp, move |lp, w, e| {
            let hung = matches!(
                e,
                ClusterError::Handoff {
                    failure: HandoffFailure::NoAnswer | HandoffFailure::Unread,
                    ..
                }
            );
            // As the primary logs it when it has no `error` callback.
            log::error!(
                "cluster: worker {}: {e}",
                w.map_or_else(|| "-".to_string(), |w| w.id().to_string())
            );
            if let (true, Some(w), Some(s)) = (hung, w, Supervisor::from_weak(&me)) {
                let on = s.inner.borrow().core.config().worker_timeout.is_some();
                if on {
                    let now = lp.now();
                    s.inner.borrow_mut().core.hung(now, w.id());
                    s.pump(lp);
                }
            }
        });
    }

    /// Starts the pool: forks every slot's worker. Keeps the primary's
    /// listeners open across changes of workers
    /// ([`Primary::set_keep_listeners`]) and, when a worker timeout is
    /// set, makes it the primary's handoff timeout (a connection left
    /// unanswered that long marks its worker hung). Call once.
    pub fn start(&self, lp: &mut Loop) {
        let (primary, cfg) = {
            let mut i = self.inner.borrow_mut();
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
        if cfg.max_memory.is_some() || cfg.max_connections.is_some() {
            self.start_sampler(lp, cfg.memory_check_interval);
        }
        let now = lp.now();
        self.inner.borrow_mut().core.start(now);
        self.pump(lp);
    }

    /// Starts a rolling reload: each slot (or `reload_batch` slots at a
    /// time) forks a replacement; once it is ready the old worker is
    /// drained, disconnected, and killed after the kill timeout. `cb` gets
    /// the outcome. A replacement that is not ready in time is killed,
    /// the old workers keep serving and the reload fails (fail closed). A
    /// reload asked for while one runs waits for it (several waiting ones
    /// are one reload); a reload never interleaves with another.
    pub fn reload(
        &self,
        lp: &mut Loop,
        cb: impl FnOnce(&mut Loop, Result<ReloadReport, ReloadError>) + 'static,
    ) {
        let now = lp.now();
        {
            let mut i = self.inner.borrow_mut();
            let ticket = i.core.reload(now);
            i.reload_cbs.entry(ticket).or_default().push(Box::new(cb));
        }
        self.pump(lp);
    }

    /// Sets the number of workers. Added slots fork at once; removed slots
    /// (the newest) are drained, disconnected and killed after the kill
    /// timeout.
    ///
    /// # Errors
    ///
    /// `InvalidInput` for 0 (at least one worker runs).
    pub fn scale(&self, lp: &mut Loop, n: usize) -> io::Result<()> {
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "scale: at least 1 worker",
            ));
        }
        let now = lp.now();
        self.inner.borrow_mut().core.scale(now, n);
        self.pump(lp);
        Ok(())
    }

    /// Replaces worker `id` gracefully: a new worker for its slot, then,
    /// once it is ready, the old one drained (fail closed as a reload).
    ///
    /// # Errors
    ///
    /// `NotFound` if `id` is not a ready worker in rotation (starting,
    /// draining, gone, already being replaced), or during a stop.
    pub fn restart(&self, lp: &mut Loop, id: u32) -> io::Result<()> {
        let now = lp.now();
        let ok = self
            .inner
            .borrow_mut()
            .core
            .replace(now, id, ReplaceReason::Requested);
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
    pub fn stop(&self, lp: &mut Loop, graceful: bool) {
        let now = lp.now();
        self.inner.borrow_mut().core.stop(now, graceful);
        self.pump(lp);
    }

    /// One row per worker (and per empty slot), by slot.
    pub fn status(&self, lp: &Loop) -> Vec<WorkerStatus> {
        let i = self.inner.borrow();
        i.core
            .status(lp.now())
            .into_iter()
            .map(|r| {
                let w = r.worker.and_then(|id| i.workers.get(&id));
                WorkerStatus {
                    id: r.worker,
                    pid: w.and_then(|w| w.pid(lp)),
                    slot: r.slot,
                    state: r.state,
                    uptime: r.uptime,
                    restarts: r.restarts,
                    connections: w.map_or(r.handed, |&w| i.primary.handed(lp, w)),
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
    /// sup.set_broadcast(true);
    /// # Ok::<(), std::io::Error>(())
    /// ```
    pub fn set_broadcast(&self, on: bool) {
        self.inner.borrow_mut().broadcast = on;
    }

    /// Sends `msg` from worker `from` to every other connected worker.
    fn relay(&self, lp: &mut Loop, from: u32, msg: &serde_json::Value) {
        let to: Vec<Worker> = {
            let i = self.inner.borrow();
            let mut ws: Vec<Worker> = i
                .workers
                .values()
                .filter(|w| w.id() != from && w.is_connected(lp))
                .copied()
                .collect();
            ws.sort_by_key(|w| w.id());
            ws
        };
        for w in to {
            // A worker whose channel just closed misses it, as in Node.
            if let Err(e) = w.send(lp, msg, None) {
                log::debug!("supervisor: broadcast to worker {}: {e}", w.id());
            }
        }
    }

    /// Sends `msg` to every connected worker (`uvcluster ctl send`);
    /// returns how many it was sent to.
    pub fn send_all(&self, lp: &mut Loop, msg: &serde_json::Value) -> usize {
        let ws: Vec<Worker> = self.inner.borrow().workers.values().copied().collect();
        ws.into_iter()
            .filter(|w| w.is_connected(lp) && w.send(lp, msg, None).is_ok())
            .count()
    }

    /// Sets the lifecycle-event callback (each event is also logged
    /// through `log`, one line).
    pub fn on_event(&self, cb: impl FnMut(&mut Loop, &LifecycleEvent) + 'static) {
        self.inner.borrow_mut().on_event = Some(Box::new(cb));
    }

    /// Sets the `listening` callback: a worker listens (the primary's
    /// [`Primary::on_listening`], which the supervisor uses; this runs
    /// after the supervisor has seen it).
    pub fn on_listening(&self, cb: impl FnMut(&mut Loop, &Worker, &Address) + 'static) {
        self.inner.borrow_mut().on_listening = Some(Box::new(cb));
    }

    /// Sets the `message` callback for workers' user messages other than
    /// `'ready'` (which the supervisor takes); a handle sent along is
    /// closed.
    pub fn on_message(&self, cb: impl FnMut(&mut Loop, &Worker, serde_json::Value) + 'static) {
        self.inner.borrow_mut().on_message = Some(Box::new(cb));
    }

    /// Sets the callback run when the supervisor is done, with the exit
    /// code it chose: 0 after a stop, 1 when no worker is left running and
    /// none will be restarted (a crash loop, or every worker failed under
    /// `restart = never`). Its timers and signal handlers are closed
    /// before; a program usually exits with the code (`uvcluster run`
    /// does). Without a callback, read it with
    /// [`exit_code`](Self::exit_code) once the loop has returned.
    pub fn on_exit(&self, cb: impl FnMut(&mut Loop, i32) + 'static) {
        self.inner.borrow_mut().on_exit = Some(Box::new(cb));
    }

    /// The exit code, once the supervisor is done.
    pub fn exit_code(&self) -> Option<i32> {
        self.inner.borrow().exit_code
    }

    /// Installs the signal table (see `docs/supervisor.md`): SIGTERM and
    /// SIGINT stop gracefully (a second one, not a duplicate delivery
    /// within the duplicate window, stops at once), SIGQUIT stops at
    /// once, SIGHUP reloads, SIGTTIN adds a worker and SIGTTOU removes one
    /// (never below one). The handlers are closed when the supervisor is
    /// done.
    ///
    /// # Errors
    ///
    /// The error of [`Loop::signal_start`].
    pub fn handle_signals(&self, lp: &mut Loop) -> io::Result<()> {
        for sig in [
            Signum::SIGTERM,
            Signum::SIGINT,
            Signum::SIGQUIT,
            Signum::SIGHUP,
            Signum::SIGTTIN,
            Signum::SIGTTOU,
        ] {
            let h = lp.signal_init();
            let me = self.weak();
            let r = lp.signal_start(h, sig, move |lp, _, sig| {
                if let Some(s) = Supervisor::from_weak(&me) {
                    let now = lp.now();
                    s.inner.borrow_mut().core.signal(now, sig);
                    s.pump(lp);
                }
            });
            if let Err(e) = r {
                lp.close_if_open(h);
                return Err(e);
            }
            self.inner.borrow_mut().signals.push(h);
        }
        Ok(())
    }

    fn start_sampler(&self, lp: &mut Loop, every: Duration) {
        let t = lp.timer_init();
        let _ = lp.unref_handle(t);
        let me = self.weak();
        let started = lp.timer_start(t, every, every, move |lp, _| {
            if let Some(s) = Supervisor::from_weak(&me) {
                s.sample(lp);
            }
        });
        if started.is_ok() {
            self.inner.borrow_mut().sampler = Some(t);
        } else {
            lp.close_if_open(t);
        }
    }

    /// Samples each worker's RSS (`/proc/<pid>/status`) and the
    /// connections handed to it.
    fn sample(&self, lp: &mut Loop) {
        let now = lp.now();
        let samples: Vec<(WorkerId, Option<u64>, u64)> = {
            let i = self.inner.borrow();
            i.workers
                .iter()
                .map(|(&id, &w)| (id, w.pid(lp).and_then(rss_bytes), i.primary.handed(lp, w)))
                .collect()
        };
        {
            let mut i = self.inner.borrow_mut();
            for (id, rss, handed) in samples {
                if let Some(b) = rss {
                    i.core.rss(now, id, b);
                }
                i.core.handed(now, id, handed);
            }
        }
        self.pump(lp);
    }

    /// Executes the core's actions until none is left.
    fn pump(&self, lp: &mut Loop) {
        loop {
            let action = self.inner.borrow_mut().core.next_action();
            let Some(action) = action else { return };
            self.execute(lp, action);
        }
    }

    fn worker(&self, id: WorkerId) -> Option<Worker> {
        self.inner.borrow().workers.get(&id).copied()
    }

    fn execute(&self, lp: &mut Loop, action: Action) {
        match action {
            Action::Fork { slot, .. } => self.fork(lp, slot),
            Action::Drain(id) => {
                if let Some(w) = self.worker(id) {
                    let p = self.primary();
                    p.drain(lp, w);
                }
            }
            Action::Disconnect(id) => {
                if let Some(w) = self.worker(id)
                    && w.is_connected(lp)
                {
                    w.disconnect(lp);
                }
            }
            Action::Kill(id, sig) => {
                if let Some(w) = self.worker(id) {
                    // ESRCH: it is exiting; its exit is on its way.
                    let _ = w.kill(lp, Some(sig));
                }
            }
            Action::ReleaseSlot(slot) => {
                let p = self.primary();
                p.release_slot(lp, slot as u32);
            }
            Action::CloseListeners => {
                let p = self.primary();
                p.set_keep_listeners(lp, false);
            }
            Action::Timer(at) => self.arm(lp, at),
            Action::ReloadDone(ticket, result) => {
                let cbs = self.inner.borrow_mut().reload_cbs.remove(&ticket);
                for cb in cbs.into_iter().flatten() {
                    cb(lp, result.clone());
                }
            }
            Action::Exit(code) => self.exit(lp, code),
            Action::Report(e) => self.report(lp, &e),
        }
    }

    fn fork(&self, lp: &mut Loop, slot: SlotId) {
        let p = self.primary();
        let now = lp.now();
        match p.fork(lp, Vec::new()) {
            Ok(w) => {
                p.set_worker_slot(lp, w, slot as u32);
                self.capture_stderr(lp, w, slot);
                let mut i = self.inner.borrow_mut();
                i.workers.insert(w.id(), w);
                i.core.forked(now, slot, w.id());
            }
            Err(e) => {
                let mut i = self.inner.borrow_mut();
                i.core.fork_failed(now, slot, e.to_string());
            }
        }
    }

    /// With piped stdio, keeps the last [`STDERR_LINES`] lines the
    /// worker writes on stderr, by slot (the primary would drop them).
    fn capture_stderr(&self, lp: &mut Loop, w: Worker, slot: SlotId) {
        let Some(pipe) = w.stdio(lp, 2) else { return };
        let _ = lp.read_stop(pipe);
        let me = self.weak();
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
            let Some(s) = Supervisor::from_weak(&me) else {
                return;
            };
            let mut i = s.inner.borrow_mut();
            let lines = i.stderr.entry(slot).or_default();
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

    fn arm(&self, lp: &mut Loop, at: Option<u64>) {
        let Some(at) = at else {
            let t = self.inner.borrow_mut().timer.take();
            if let Some(t) = t {
                lp.close_if_open(t);
            }
            return;
        };
        let existing = self.inner.borrow().timer;
        let t = match existing {
            Some(t) => t,
            None => {
                let t = lp.timer_init();
                self.inner.borrow_mut().timer = Some(t);
                t
            }
        };
        let me = self.weak();
        let delay = Duration::from_millis(at.saturating_sub(lp.now()));
        let started = lp.timer_start(t, delay, Duration::ZERO, move |lp, _| {
            if let Some(s) = Supervisor::from_weak(&me) {
                let now = lp.now();
                s.inner.borrow_mut().core.tick(now);
                s.pump(lp);
            }
        });
        if let Err(e) = started {
            log::error!("supervisor: cannot arm its timer: {e}");
        }
    }

    fn report(&self, lp: &mut Loop, e: &LifecycleEvent) {
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
            let lines: Vec<String> = (self.inner.borrow().stderr.get(slot))
                .map(|l| l.iter().cloned().collect())
                .unwrap_or_default();
            for l in lines {
                log::warn!("slot {slot} stderr: {l}");
            }
        }
        let cb = self.inner.borrow_mut().on_event.take();
        if let Some(mut cb) = cb {
            cb(lp, e);
            let mut i = self.inner.borrow_mut();
            if i.on_event.is_none() {
                i.on_event = Some(cb);
            }
        }
    }

    fn exit(&self, lp: &mut Loop, code: i32) {
        let (timer, sampler, signals) = {
            let mut i = self.inner.borrow_mut();
            i.exit_code = Some(code);
            (
                i.timer.take(),
                i.sampler.take(),
                std::mem::take(&mut i.signals),
            )
        };
        for t in timer.into_iter().chain(sampler) {
            lp.close_if_open(t);
        }
        for s in signals {
            lp.close_if_open(s);
        }
        let p = self.primary();
        p.set_keep_listeners(lp, false);
        let cb = self.inner.borrow_mut().on_exit.take();
        if let Some(mut cb) = cb {
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
