//! Round-robin dispatch (`lib/internal/cluster/round_robin_handle.js`): the
//! I/O shell around the [`Dispatcher`].
//!
//! The primary listens and accepts. Each accepted connection is given to
//! the handle's [`Dispatcher`], a pure state machine that decides which
//! worker takes it and when (`dispatch/`: Node's round-robin, least
//! connections or a user scheduler, the handoff window, back-off and
//! timeouts). This file does the I/O it asks for, and nothing else:
//!
//! * it owns the listener and the primary's copy of every connection the
//!   dispatcher knows, by the [`ConnId`] the dispatcher gave it;
//! * it executes the dispatcher's [`Action`]s: a `newconn` message carrying
//!   the connection's fd (a `NODE_HANDLE` of type `net.Native`, our copy
//!   kept), a close, a report through the primary's `error` event, the one
//!   timer;
//! * it feeds back what happened to each `newconn` as events: the
//!   channel's `NODE_HANDLE_ACK`/`NACK` or write failure
//!   ([`Dispatcher::delivered`]), a send that could not even be queued
//!   ([`Dispatcher::send_failed`]), the worker's `{accepted, load?}` answer
//!   ([`Dispatcher::answered`]), its load reports, the timer.
//!
//! # Ownership (GUIDE.md §4)
//!
//! At every instant each accepted connection has exactly one owner: the
//! queue, "in flight to worker N", or worker N (after `accepted: true`,
//! when our copy is closed). The dispatcher keeps the ledger; this shell
//! holds the handles and closes one exactly when the dispatcher says so.
//!
//! # A handoff that ends without an answer
//!
//! Node's handle waits for the answer to each `newconn` forever. Here every
//! way a handoff can end without an answer is handled (see
//! [`HandoffFailure`] and [`Dispatcher`]), and reported through the
//! primary's `error` event as [`ClusterError::Handoff`]. The rules are the
//! dispatcher's; ARCHITECTURE.md tabulates them.
//!
//! [`Dispatcher`]: super::dispatch::Dispatcher
//! [`Dispatcher::delivered`]: super::dispatch::Dispatcher::delivered
//! [`Dispatcher::send_failed`]: super::dispatch::Dispatcher::send_failed
//! [`Dispatcher::answered`]: super::dispatch::Dispatcher::answered
//! [`ConnId`]: super::dispatch::ConnId
//! [`Action`]: super::dispatch::Action
//! [`ClusterError::Handoff`]: super::ClusterError::Handoff

use std::cell::RefCell;
use std::collections::{BTreeMap, HashMap};
use std::io;
use std::rc::Rc;
use std::time::Duration;

use serde_json::Value;

use super::dispatch::{
    Action, Config, ConnId, Delivery, Dispatcher, HandoffId, LeastConnections, RoundRobin,
    Strategy, UserScheduler, WorkerId,
};
pub(super) use super::dispatch::{
    ConnInfo, DEFAULT_HANDOFF_TIMEOUT, HandoffFailure, HandoffOutcome, Scheduler, WorkerLoad,
};
use super::primary::ClusterError;
use super::protocol::{AcceptReply, Act, Query, Sockname};
use super::shared_handle::create_server_handle;
use super::worker::Worker;
use crate::ipc::{AfterAck, Attach, Channel, HandleDelivery, HandleKind};
use crate::uv::{Errno, Handle, Loop, OnEmfile, Socket, Timer};

/// Reports a cluster error through the primary's `error` event.
pub(super) type Report = Rc<dyn Fn(&mut Loop, Option<&Worker>, ClusterError)>;

/// The primary out of fds: its fds are mostly connections waiting for a
/// worker (queued or in flight), which free up as workers take them, so
/// new clients wait in the kernel's backlog (nginx's rule, retried every
/// 100 ms) instead of being accepted and dropped (libuv's trick, which a
/// Node primary applies): with workers at their own fd limit NACKing, the
/// trick turned a short shortage into refused clients (issue 10).
const PRIMARY_ON_EMFILE: OnEmfile = OnEmfile::Pause(Duration::from_millis(100));

// An accepted connection, owned by the handle until a worker accepts it.
use crate::uv::Stream as Conn;

/// An IPv4 client of a dual-stack listener shows as `::ffff:a.b.c.d`;
/// schedulers see it as the IPv4 address it is.
fn unmap_v4(a: std::net::SocketAddr) -> std::net::SocketAddr {
    match a.ip() {
        std::net::IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => std::net::SocketAddr::new(v4.into(), a.port()),
            None => a,
        },
        _ => a,
    }
}

/// How a handle picks the worker for each connection: which
/// [`Strategy`] its dispatcher runs.
#[derive(Clone)]
pub(super) enum Pick {
    /// Node's round-robin: the first free worker.
    Fifo,
    /// The worker with the fewest connections, among those known to be
    /// responsive.
    LeastConnections,
    /// A user scheduler.
    Custom(Scheduler),
}

impl Pick {
    fn strategy(&self) -> Box<dyn Strategy> {
        match self {
            Pick::Fifo => Box::new(RoundRobin),
            Pick::LeastConnections => Box::<LeastConnections>::default(),
            Pick::Custom(f) => Box::new(UserScheduler::new(f.clone())),
        }
    }
}

impl std::fmt::Debug for Pick {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Pick::Fifo => "Fifo",
            Pick::LeastConnections => "LeastConnections",
            Pick::Custom(_) => "Custom",
        })
    }
}

/// What a handle needs from the primary.
#[derive(Clone)]
pub(super) struct Options {
    pub(super) pick: Pick,
    /// The handoff timeout, in loop milliseconds.
    pub(super) timeout_ms: u64,
    /// Handoffs that may be in flight to one worker at a time.
    pub(super) window: usize,
    pub(super) report: Report,
}

impl std::fmt::Debug for Options {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Options")
            .field("pick", &self.pick)
            .field("timeout_ms", &self.timeout_ms)
            .field("window", &self.window)
            .finish_non_exhaustive()
    }
}

struct State {
    key: String,
    /// The listening socket; `None` once closed (or if listening failed).
    listener: Option<Socket>,
    /// The bind or listen error.
    errno: Option<Errno>,
    /// `{address, family, port}` for TCP listeners.
    sockname: Option<Sockname>,
    /// Every worker using this key (Node's `all`), for its channel.
    workers: BTreeMap<WorkerId, Worker>,
    /// The primary's copy of each connection the dispatcher knows.
    conns: HashMap<ConnId, Conn>,
    /// Where each connection goes.
    core: Dispatcher,
    /// The dispatcher's one timer (unreferenced: it never keeps the loop
    /// alive on its own).
    timer: Option<Handle<Timer>>,
    report: Report,
}

impl std::fmt::Debug for State {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("State")
            .field("key", &self.key)
            .field("listener", &self.listener)
            .field("workers", &self.workers.keys().collect::<Vec<_>>())
            .field("conns", &self.conns.len())
            .field("core", &self.core)
            .finish_non_exhaustive()
    }
}

/// One listening socket of the primary, shared round-robin by the workers
/// that asked for its key. Cheap to clone (a shared reference).
#[derive(Clone, Debug)]
pub(super) struct RoundRobinHandle {
    st: Rc<RefCell<State>>,
}

impl RoundRobinHandle {
    /// Creates the listener as Node's constructor does:
    /// `listen({fd, backlog})`, `listen({port, host, ipv6Only, backlog})`,
    /// or `listen({path, backlog, readableAll, writableAll})`. A failure is
    /// kept and reported to every worker that asks.
    pub(super) fn new(
        lp: &mut Loop,
        key: String,
        address: Option<&str>,
        q: &Query,
        opts: Options,
    ) -> Self {
        let core = Dispatcher::new(
            opts.pick.strategy(),
            Config {
                timeout_ms: opts.timeout_ms.max(1),
                window: opts.window.max(1),
            },
        );
        let rr = RoundRobinHandle {
            st: Rc::new(RefCell::new(State {
                key,
                listener: None,
                errno: None,
                sockname: None,
                workers: BTreeMap::new(),
                conns: HashMap::new(),
                core,
                timer: None,
                report: opts.report,
            })),
        };
        match rr.listen(lp, address, q) {
            Ok((sock, sockname)) => {
                let mut st = rr.st.borrow_mut();
                st.listener = Some(sock);
                st.sockname = sockname;
            }
            Err(e) => rr.st.borrow_mut().errno = Some(Errno::of_failed(&e)),
        }
        rr
    }

    fn listen(
        &self,
        lp: &mut Loop,
        address: Option<&str>,
        q: &Query,
    ) -> io::Result<(Socket, Option<Sockname>)> {
        let sock = create_server_handle(lp, address, q)?;
        let backlog = q.backlog();
        let weak = Rc::downgrade(&self.st);
        let r = match sock {
            Socket::Tcp(h) => {
                let w = weak.clone();
                lp.tcp_listen(h, backlog, move |lp, _, r| {
                    if let Ok(c) = r {
                        match w.upgrade() {
                            Some(st) => RoundRobinHandle { st }.accepted(lp, Conn::Tcp(c)),
                            None => {
                                lp.close_if_open(c);
                            }
                        }
                    }
                })
                .and_then(|()| lp.listen_on_emfile(h, PRIMARY_ON_EMFILE))
                .and_then(|()| lp.tcp_getsockname(h))
                .map(|a| Some(Sockname(a)))
            }
            Socket::Pipe(h) => {
                let w = weak.clone();
                let listening = lp.pipe_listen(h, backlog, move |lp, _, r| {
                    if let Ok(c) = r {
                        match w.upgrade() {
                            Some(st) => RoundRobinHandle { st }.accepted(lp, Conn::Pipe(c)),
                            None => {
                                lp.close_if_open(c);
                            }
                        }
                    }
                });
                let listening = listening.and_then(|()| lp.listen_on_emfile(h, PRIMARY_ON_EMFILE));
                let (readable, writable) = (q.readable_all, q.writable_all);
                listening
                    .and_then(|()| {
                        if readable || writable {
                            lp.pipe_chmod(h, readable, writable)
                        } else {
                            Ok(())
                        }
                    })
                    .map(|()| None)
            }
            Socket::Udp(_) => Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "round-robin needs a stream socket",
            )),
        };
        match r {
            Ok(sockname) => Ok((sock, sockname)),
            Err(e) => {
                lp.close_if_open(sock);
                Err(e)
            }
        }
    }

    /// Whether worker `id` already uses this handle.
    pub(super) fn has(&self, id: u32) -> bool {
        self.st.borrow().workers.contains_key(&id)
    }

    /// Whether the handle is closed: listening failed, or its last worker
    /// left. A closed handle only waits for connections still in flight.
    pub(super) fn is_closed(&self) -> bool {
        self.st.borrow().listener.is_none()
    }

    /// Whether connections are still in flight to some worker.
    pub(super) fn has_in_flight(&self) -> bool {
        self.st.borrow().core.has_in_flight()
    }

    /// Adds a worker (Node's `add`): returns the listener's `sockname`
    /// (TCP) for the reply, or the errno. After sending the reply, call
    /// [`handoff`](Self::handoff) for the worker.
    pub(super) fn add(&self, w: &Worker) -> Result<Option<Sockname>, Errno> {
        let mut st = self.st.borrow_mut();
        if let Some(errno) = st.errno {
            return Err(errno);
        }
        st.workers.insert(w.id(), w.clone());
        Ok(st.sockname)
    }

    /// The worker's `queryServer` reply is out: it takes connections from
    /// now on (Node's `handoff` after `add`).
    pub(super) fn handoff(&self, lp: &mut Loop, w: &Worker) {
        let now = lp.now();
        let window = {
            let mut st = self.st.borrow_mut();
            if !st.workers.contains_key(&w.id()) {
                return;
            }
            st.core.add_worker(now, w.id());
            st.core.window()
        };
        // A window wider than Node's 1 is worth something only if the
        // channel sends its fds back to back, rather than each after the
        // previous one's ACK.
        if let Some(ch) = w.channel()
            && window > ch.handles_in_flight(lp)
        {
            ch.set_handles_in_flight(lp, window);
        }
        self.run(lp, Some(w));
    }

    /// Whether this handle picks by load, so workers should report theirs.
    pub(super) fn wants_load(&self) -> bool {
        self.st.borrow().core.wants_load()
    }

    /// A worker reported its open connections on this server.
    pub(super) fn set_load(&self, lp: &mut Loop, id: u32, load: u64) {
        let now = lp.now();
        self.st.borrow_mut().core.load(now, id, load);
        self.run(lp, None);
    }

    /// The listener accepted a connection.
    fn accepted(&self, lp: &mut Loop, conn: Conn) {
        let now = lp.now();
        let wants_info = self.st.borrow().core.wants_conn_info();
        let info = ConnInfo {
            peer: match conn {
                Conn::Tcp(h) if wants_info => lp.tcp_getpeername(h).ok().map(unmap_v4),
                _ => None,
            },
        };
        {
            let mut st = self.st.borrow_mut();
            let id = st.core.accept(now, info);
            st.conns.insert(id, conn);
        }
        self.run(lp, None);
    }

    /// Executes the dispatcher's actions, in order, until none is left.
    /// `ctx` is the worker the event concerned: reports about a worker
    /// that has already left the handle name it.
    fn run(&self, lp: &mut Loop, ctx: Option<&Worker>) {
        loop {
            let action = self.st.borrow_mut().core.next_action();
            match action {
                None => return,
                Some(Action::Send {
                    worker,
                    conn,
                    handoff,
                }) => self.send(lp, worker, conn, handoff),
                Some(Action::Close(conn)) => {
                    let c = self.st.borrow_mut().conns.remove(&conn);
                    if let Some(c) = c {
                        lp.close_if_open(c);
                    }
                }
                Some(Action::Report {
                    worker,
                    failure,
                    outcome,
                    connections,
                }) => {
                    let (w, report) = {
                        let st = self.st.borrow();
                        let w = worker.and_then(|id| {
                            (st.workers.get(&id).cloned())
                                .or_else(|| ctx.filter(|w| w.id() == id).cloned())
                        });
                        (w, st.report.clone())
                    };
                    let e = ClusterError::Handoff {
                        failure,
                        outcome,
                        connections,
                    };
                    report(lp, w.as_ref(), e);
                }
                Some(Action::Timer(at)) => self.arm(lp, at),
            }
        }
    }

    /// Sends connection `conn` to worker `id` as `newconn` (handoff
    /// `handoff`), telling the dispatcher at once if it cannot be queued on
    /// the channel.
    fn send(&self, lp: &mut Loop, id: WorkerId, conn: ConnId, handoff: HandoffId) {
        let (w, c, key) = {
            let st = self.st.borrow();
            (
                st.workers.get(&id).cloned(),
                st.conns.get(&conn).copied(),
                st.key.clone(),
            )
        };
        let sent = match (&w, c) {
            (Some(w), Some(c)) => self.send_newconn(lp, w, c, key, handoff),
            _ => false,
        };
        if !sent {
            let now = lp.now();
            self.st.borrow_mut().core.send_failed(now, id, handoff);
        }
    }

    /// Writes the `newconn` (or queues it on the channel); `false` if the
    /// channel is gone.
    fn send_newconn(
        &self,
        lp: &mut Loop,
        w: &Worker,
        conn: Conn,
        key: String,
        handoff: HandoffId,
    ) -> bool {
        let Some(ch) = w.channel() else {
            return false;
        };
        let attach = Attach {
            handle: conn.into(),
            kind: HandleKind::NetNative,
            after_ack: AfterAck::Keep,
        };
        let (me, worker) = (self.clone(), w.clone());
        let on_reply = Box::new(
            move |lp: &mut Loop, _: Channel, reply: Value, h: Option<Socket>| {
                if let Some(h) = h {
                    lp.close_if_open(h);
                }
                let AcceptReply { accepted, load } = AcceptReply::from_wire(&reply);
                me.on_answer(lp, &worker, handoff, accepted, load);
            },
        );
        let (me, worker) = (self.clone(), w.clone());
        let on_delivery = Box::new(move |lp: &mut Loop, _: Channel, d: HandleDelivery| {
            let d = match d {
                HandleDelivery::Acked => Delivery::Acked,
                HandleDelivery::Nacked => Delivery::Nacked,
                HandleDelivery::NotSent(_) => Delivery::NotSent,
            };
            let now = lp.now();
            me.st
                .borrow_mut()
                .core
                .delivered(now, worker.id(), handoff, d);
            me.run(lp, Some(&worker));
        });
        ch.send_cluster_handle(
            lp,
            Act::NewConn { key }.to_fields(),
            attach,
            Some(on_reply),
            on_delivery,
        )
        .is_ok()
    }

    fn on_answer(
        &self,
        lp: &mut Loop,
        w: &Worker,
        handoff: HandoffId,
        accepted: bool,
        load: Option<u64>,
    ) {
        let now = lp.now();
        (self.st.borrow_mut().core).answered(now, w.id(), handoff, accepted, load);
        self.run(lp, Some(w));
    }

    /// Arms the dispatcher's timer for loop time `at`, or closes it.
    fn arm(&self, lp: &mut Loop, at: Option<u64>) {
        let Some(at) = at else {
            let t = self.st.borrow_mut().timer.take();
            if let Some(t) = t {
                lp.close_if_open(t);
            }
            return;
        };
        let timer = *self.st.borrow_mut().timer.get_or_insert_with(|| {
            let t = lp.timer_init();
            let _ = lp.unref_handle(t);
            t
        });
        let weak = Rc::downgrade(&self.st);
        let ms = at.saturating_sub(lp.now());
        let _ = lp.timer_start(
            timer,
            Duration::from_millis(ms),
            Duration::ZERO,
            move |lp, _| {
                let Some(st) = weak.upgrade() else { return };
                let me = RoundRobinHandle { st };
                let now = lp.now();
                me.st.borrow_mut().core.tick(now);
                me.run(lp, None);
            },
        );
    }

    /// Worker `w` is gone (its channel closed, or its process exited):
    /// what was in flight to it never reaches a worker's `onconnection`, so
    /// it goes back to the head of the queue, or is closed when the handle
    /// is closed. `why` is reported with it.
    pub(super) fn lost(&self, lp: &mut Loop, w: &Worker, why: HandoffFailure) {
        let now = lp.now();
        self.st.borrow_mut().core.lost(now, w.id(), why);
        self.run(lp, Some(w));
    }

    /// Removes a worker (Node's `remove`). `gone` says why, when the worker
    /// can no longer answer (its channel closed, or its process exited):
    /// what is in flight to it is then requeued (see [`lost`](Self::lost)).
    /// Otherwise it stays in flight, and its answer decides. Returns `true`
    /// when it was the last worker: queued connections and the listener are
    /// then closed, and the caller forgets the key.
    pub(super) fn remove(&self, lp: &mut Loop, w: &Worker, gone: Option<HandoffFailure>) -> bool {
        let now = lp.now();
        let last = {
            let mut st = self.st.borrow_mut();
            if st.workers.remove(&w.id()).is_none() {
                // A worker that left earlier (its server closed) and is now
                // gone: what it still had in flight comes back.
                if let Some(why) = gone {
                    st.core.lost(now, w.id(), why);
                    drop(st);
                    self.run(lp, Some(w));
                }
                return false;
            }
            st.core.remove_worker(now, w.id(), gone)
        };
        self.run(lp, Some(w));
        if last {
            self.close_listener(lp);
        }
        last
    }

    fn close_listener(&self, lp: &mut Loop) {
        let listener = self.st.borrow_mut().listener.take();
        if let Some(l) = listener {
            lp.close_if_open(l);
        }
    }

    /// Closes everything, including connections in flight (the primary is
    /// going away and no answer will be handled).
    pub(super) fn close_all(&self, lp: &mut Loop) {
        let now = lp.now();
        {
            let mut st = self.st.borrow_mut();
            st.workers.clear();
            st.core.close_all(now);
        }
        self.run(lp, None);
        self.close_listener(lp);
    }
}
