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

use std::collections::{BTreeMap, HashMap};
use std::io;
use std::time::Duration;

use super::ClusterContext;
use super::dispatch::{
    Action, Config, ConnId, Delivery, Dispatcher, HandoffId, LeastConnections, RoundRobin,
    Strategy, UserScheduler, WorkerId,
};
pub(super) use super::dispatch::{
    ConnInfo, DEFAULT_HANDOFF_TIMEOUT, HandoffFailure, Scheduler, WorkerLoad,
};
use super::error::ClusterError;
use super::primary::Primary;
use super::protocol::{AcceptReply, Act, Query, Sockname};
use super::shared_handle::create_server_handle;
use super::worker::Worker;
use crate::ipc::{AfterAck, Attach, Channel, Fields, FieldsReplyCb, HandleDelivery, HandleKind};
use crate::uv::{Errno, Handle, Id, Loop, OnEmfile, Socket, Timer};

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
#[derive(Clone, Debug)]
pub(super) struct Options {
    pub(super) pick: Pick,
    /// The handoff timeout, in loop milliseconds.
    pub(super) timeout_ms: u64,
    /// Handoffs that may be in flight to one worker at a time.
    pub(super) window: usize,
    /// The primary whose `error` event reports this handle's failures.
    pub(super) primary: Primary,
    /// Stay open with no worker (see [`RoundRobinHandle::set_keep_open`]).
    pub(super) keep_open: bool,
}

/// A round-robin handle's state, owned by the loop (in the cluster's
/// context, [`ClusterContext`]) and named by a [`RoundRobinHandle`] id.
pub(crate) struct RrState {
    key: String,
    /// The fields of this key's `newconn`, as JSON text
    /// (`"act":"newconn","key":"..."`): encoded once, written for every
    /// connection.
    newconn_fields: Box<[u8]>,
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
    primary: Primary,
}

impl std::fmt::Debug for RrState {
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

/// `Act::NewConn { key }`'s fields as the channel writes them
/// (`"act":"newconn","key":"..."`), for
/// [`Channel::send_cluster_handle_json`].
fn newconn_fields(key: &str) -> Box<[u8]> {
    let fields = Act::NewConn { key: key.into() }.to_fields();
    let mut out = Vec::new();
    for (k, v) in &fields {
        if !out.is_empty() {
            out.push(b',');
        }
        out.extend_from_slice(&serde_json::to_vec(k).expect("a string serializes"));
        out.push(b':');
        out.extend_from_slice(&serde_json::to_vec(v).expect("a string serializes"));
    }
    out.into()
}

/// One listening socket of the primary, shared round-robin by the workers
/// that asked for its key: an id for state the loop owns. The primary
/// drops the state ([`drop_state`](Self::drop_state)) once the handle is
/// closed and nothing is in flight from it; from then on the id finds
/// nothing, and events for it (a late answer) are ignored.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub(super) struct RoundRobinHandle(Id<RrState>);

fn st(lp: &Loop, rr: RoundRobinHandle) -> Option<&RrState> {
    lp.context::<ClusterContext>()?.round_robin.get(rr.0)
}

fn st_mut(lp: &mut Loop, rr: RoundRobinHandle) -> Option<&mut RrState> {
    lp.context_mut::<ClusterContext>().round_robin.get_mut(rr.0)
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
        let mut core = Dispatcher::new(
            opts.pick.strategy(),
            Config {
                timeout_ms: opts.timeout_ms.max(1),
                window: opts.window.max(1),
            },
        );
        if opts.keep_open {
            core.set_keep_open(0, true);
        }
        let newconn_fields = newconn_fields(&key);
        let state = RrState {
            key,
            newconn_fields,
            listener: None,
            errno: None,
            sockname: None,
            workers: BTreeMap::new(),
            conns: HashMap::new(),
            core,
            timer: None,
            primary: opts.primary,
        };
        let rr = RoundRobinHandle(lp.context_mut::<ClusterContext>().round_robin.insert(state));
        let listened = rr.listen(lp, address, q);
        if let Some(st) = st_mut(lp, rr) {
            match listened {
                Ok((sock, sockname)) => {
                    st.listener = Some(sock);
                    st.sockname = sockname;
                }
                Err(e) => st.errno = Some(Errno::of_failed(&e)),
            }
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
        let me = *self;
        // The listener's callback names the handle by its id.
        let r = match sock {
            Socket::Tcp(h) => lp
                .tcp_listen(h, backlog, move |lp, _, r| {
                    if let Ok(c) = r {
                        me.accepted(lp, Conn::Tcp(c));
                    }
                })
                .and_then(|()| lp.listen_on_emfile(h, PRIMARY_ON_EMFILE))
                .and_then(|()| lp.tcp_getsockname(h))
                .map(|a| Some(Sockname(a))),
            Socket::Pipe(h) => {
                let listening = lp.pipe_listen(h, backlog, move |lp, _, r| {
                    if let Ok(c) = r {
                        me.accepted(lp, Conn::Pipe(c));
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
    pub(super) fn has(self, lp: &Loop, id: u32) -> bool {
        st(lp, self).is_some_and(|st| st.workers.contains_key(&id))
    }

    /// Whether the handle is closed: listening failed, or its last worker
    /// left. A closed handle only waits for connections still in flight.
    pub(super) fn is_closed(self, lp: &Loop) -> bool {
        st(lp, self).is_none_or(|st| st.listener.is_none())
    }

    /// Whether connections are still in flight to some worker.
    pub(super) fn has_in_flight(self, lp: &Loop) -> bool {
        st(lp, self).is_some_and(|st| st.core.has_in_flight())
    }

    /// Adds a worker (Node's `add`): returns the listener's `sockname`
    /// (TCP) for the reply, or the errno. After sending the reply, call
    /// [`handoff`](Self::handoff) for the worker.
    pub(super) fn add(self, lp: &mut Loop, w: Worker) -> Result<Option<Sockname>, Errno> {
        let st = st_mut(lp, self).ok_or(Errno::EBADF)?;
        if let Some(errno) = st.errno {
            return Err(errno);
        }
        st.workers.insert(w.id(), w);
        Ok(st.sockname)
    }

    /// The worker's `queryServer` reply is out: it takes connections from
    /// now on (Node's `handoff` after `add`).
    pub(super) fn handoff(self, lp: &mut Loop, w: Worker) {
        let now = lp.now();
        let held = st(lp, self).is_some_and(|st| st.primary.is_held(lp, w.id()));
        let Some(st) = st_mut(lp, self).filter(|st| st.workers.contains_key(&w.id())) else {
            return;
        };
        st.core.add_worker_held(now, w.id(), held);
        let window = st.core.window();
        // A window wider than Node's 1 is worth something only if the
        // channel sends its fds back to back, rather than each after the
        // previous one's ACK.
        if let Some(ch) = w.channel(lp)
            && window > ch.handles_in_flight(lp)
        {
            ch.set_handles_in_flight(lp, window);
        }
        self.run(lp, Some(w));
    }

    /// Whether this handle picks by load, so workers should report theirs.
    pub(super) fn wants_load(self, lp: &Loop) -> bool {
        st(lp, self).is_some_and(|st| st.core.wants_load())
    }

    /// A worker reported its open connections on this server.
    pub(super) fn set_load(self, lp: &mut Loop, id: u32, load: u64) {
        self.event(lp, None, |core, now| core.load(now, id, load));
    }

    /// Feeds one event to the dispatcher (at loop time `now`), then
    /// executes what it asks for. Nothing happens for a dropped handle.
    fn event(self, lp: &mut Loop, ctx: Option<Worker>, f: impl FnOnce(&mut Dispatcher, u64)) {
        let now = lp.now();
        let Some(st) = st_mut(lp, self) else { return };
        f(&mut st.core, now);
        self.run(lp, ctx);
    }

    /// The listener accepted a connection.
    fn accepted(self, lp: &mut Loop, conn: Conn) {
        let now = lp.now();
        let Some(wants_info) = st(lp, self).map(|st| st.core.wants_conn_info()) else {
            lp.close_if_open(conn);
            return;
        };
        let info = ConnInfo {
            peer: match conn {
                Conn::Tcp(h) if wants_info => lp.tcp_getpeername(h).ok().map(unmap_v4),
                _ => None,
            },
        };
        if let Some(st) = st_mut(lp, self) {
            let id = st.core.accept(now, info);
            st.conns.insert(id, conn);
        }
        self.run(lp, None);
    }

    /// Executes the dispatcher's actions, in order, until none is left.
    /// `ctx` is the worker the event concerned: reports about a worker
    /// that has already left the handle name it.
    fn run(self, lp: &mut Loop, ctx: Option<Worker>) {
        while let Some(action) = st_mut(lp, self).and_then(|st| st.core.next_action()) {
            match action {
                Action::Send {
                    worker,
                    conn,
                    handoff,
                } => self.send(lp, worker, conn, handoff),
                Action::Close(conn) => {
                    if let Some(c) = st_mut(lp, self).and_then(|st| st.conns.remove(&conn)) {
                        lp.close_if_open(c);
                    }
                }
                Action::Report {
                    worker,
                    failure,
                    outcome,
                    connections,
                } => {
                    let e = ClusterError::Handoff {
                        failure,
                        outcome,
                        connections,
                    };
                    self.report(lp, worker, ctx, e);
                }
                Action::Timer(at) => self.arm(lp, at),
            }
        }
    }

    /// Reports `e` through the primary's `error` event, naming worker `id`
    /// if it still uses the handle, or is `ctx`.
    fn report(self, lp: &mut Loop, id: Option<WorkerId>, ctx: Option<Worker>, e: ClusterError) {
        let Some(st) = st(lp, self) else { return };
        let w = id
            .and_then(|id| (st.workers.get(&id).copied()).or_else(|| ctx.filter(|w| w.id() == id)));
        let primary = st.primary;
        primary.emit_error(lp, w, &e);
    }

    /// Sends connection `conn` to worker `id` as `newconn` (handoff
    /// `handoff`), telling the dispatcher at once if it cannot be queued on
    /// the channel.
    fn send(self, lp: &mut Loop, id: WorkerId, conn: ConnId, handoff: HandoffId) {
        let found = st(lp, self).map(|st| {
            (
                st.workers.get(&id).copied(),
                st.conns.get(&conn).copied(),
                st.primary,
            )
        });
        let sent = match found {
            Some((Some(w), Some(c), p)) => self.send_newconn(lp, w, c, handoff, p),
            _ => false,
        };
        if !sent {
            self.event(lp, None, |core, now| core.send_failed(now, id, handoff));
        }
    }

    /// Writes the `newconn` (or queues it on the channel); `false` if the
    /// channel is gone. The reply and delivery callbacks name the handle
    /// and the worker by id.
    fn send_newconn(
        self,
        lp: &mut Loop,
        w: Worker,
        conn: Conn,
        handoff: HandoffId,
        primary: Primary,
    ) -> bool {
        let Some(ch) = w.channel(lp) else {
            return false;
        };
        let attach = Attach {
            handle: conn.into(),
            kind: HandleKind::NetNative,
            after_ack: AfterAck::Keep,
        };
        let on_reply: FieldsReplyCb = Box::new(
            move |lp: &mut Loop, _: Channel, reply: Fields<'_>, h: Option<Socket>| {
                if let Some(h) = h {
                    lp.close_if_open(h);
                }
                let AcceptReply { accepted, load } = AcceptReply::from_fields(&reply);
                self.event(lp, Some(w), |core, now| {
                    core.answered(now, w.id(), handoff, accepted, load)
                });
                if accepted {
                    primary.count_handed(lp, w);
                }
            },
        );
        let on_delivery = Box::new(move |lp: &mut Loop, _: Channel, d: HandleDelivery| {
            let d = match d {
                HandleDelivery::Acked => Delivery::Acked,
                HandleDelivery::Nacked => Delivery::Nacked,
                HandleDelivery::NotSent(_) => Delivery::NotSent,
            };
            self.event(lp, Some(w), |core, now| {
                core.delivered(now, w.id(), handoff, d)
            });
        });
        // The fields' text leaves the state for the time of the write.
        let Some(fields) = st_mut(lp, self).map(|st| std::mem::take(&mut st.newconn_fields)) else {
            return false;
        };
        let sent = ch.send_cluster_handle_json(lp, &fields, attach, Some(on_reply), on_delivery);
        if let Some(st) = st_mut(lp, self) {
            st.newconn_fields = fields;
        }
        sent.is_ok()
    }

    /// Arms the dispatcher's timer for loop time `at`, or closes it.
    fn arm(self, lp: &mut Loop, at: Option<u64>) {
        let Some(at) = at else {
            if let Some(t) = st_mut(lp, self).and_then(|st| st.timer.take()) {
                lp.close_if_open(t);
            }
            return;
        };
        let timer = match st(lp, self).map(|st| st.timer) {
            None => return,
            Some(Some(t)) => t,
            Some(None) => {
                let t = lp.timer_init();
                let _ = lp.unref_handle(t);
                if let Some(st) = st_mut(lp, self) {
                    st.timer = Some(t);
                }
                t
            }
        };
        let ms = at.saturating_sub(lp.now());
        let _ = lp.timer_start(
            timer,
            Duration::from_millis(ms),
            Duration::ZERO,
            move |lp, _| self.event(lp, None, |core, now| core.tick(now)),
        );
    }

    /// Worker `w` is gone (its channel closed, or its process exited):
    /// what was in flight to it never reaches a worker's `onconnection`, so
    /// it goes back to the head of the queue, or is closed when the handle
    /// is closed. `why` is reported with it.
    pub(super) fn lost(self, lp: &mut Loop, w: Worker, why: HandoffFailure) {
        self.event(lp, Some(w), |core, now| core.lost(now, w.id(), why));
    }

    /// Removes a worker (Node's `remove`). `gone` says why, when the worker
    /// can no longer answer (its channel closed, or its process exited):
    /// what is in flight to it is then requeued (see [`lost`](Self::lost)).
    /// Otherwise it stays in flight, and its answer decides. Returns `true`
    /// when it was the last worker: queued connections and the listener are
    /// then closed, and the caller forgets the key.
    pub(super) fn remove(self, lp: &mut Loop, w: Worker, gone: Option<HandoffFailure>) -> bool {
        let now = lp.now();
        let Some(st) = st_mut(lp, self) else {
            return false;
        };
        if st.workers.remove(&w.id()).is_none() {
            // A worker that left earlier (its server closed) and is now
            // gone: what it still had in flight comes back.
            if let Some(why) = gone {
                st.core.lost(now, w.id(), why);
                self.run(lp, Some(w));
            }
            return false;
        }
        let last = st.core.remove_worker(now, w.id(), gone);
        self.run(lp, Some(w));
        if last {
            self.close_listener(lp);
        }
        last
    }

    /// Worker `id` takes no new connection from now on (the supervisor
    /// drains it before it tells it anything): what waits on it goes to
    /// the others; what is in flight to it stays, and its answers count.
    pub(super) fn drain(self, lp: &mut Loop, id: u32) {
        self.event(lp, None, |core, now| core.drain(now, id));
    }

    /// Worker `id` takes nothing new until [`admit`](Self::admit) (see
    /// [`Primary::hold`]).
    pub(super) fn hold(self, lp: &mut Loop, id: u32) {
        self.event(lp, None, |core, now| core.hold(now, id));
    }

    /// Worker `id`, held, takes connections again (see [`Primary::admit`]).
    pub(super) fn admit(self, lp: &mut Loop, id: u32) {
        self.event(lp, None, |core, now| core.admit(now, id));
    }

    /// Whether the handle (its listener) stays open when its last worker
    /// leaves, for a supervisor that replaces workers: connections then
    /// wait for the next worker, up to the handoff timeout. Turning it off
    /// with no worker left closes it and returns `true` (the caller
    /// forgets the key).
    pub(super) fn set_keep_open(self, lp: &mut Loop, keep: bool) -> bool {
        let now = lp.now();
        let Some(st) = st_mut(lp, self) else {
            return false;
        };
        let closed = st.core.set_keep_open(now, keep);
        self.run(lp, None);
        if closed {
            self.close_listener(lp);
        }
        closed
    }

    /// How many connections worker `id` accepted from this handle.
    /// What the handle's dispatcher holds (see [`Dispatcher::stats`]).
    ///
    /// [`Dispatcher::stats`]: super::dispatch::Dispatcher::stats
    pub(super) fn stats(self, lp: &Loop) -> Option<super::dispatch::DispatchStats> {
        st(lp, self).map(|st| st.core.stats())
    }

    /// The handle's handoff latencies so far (empty once its state is
    /// dropped).
    pub(super) fn latency(self, lp: &Loop) -> super::dispatch::LatencyHistogram {
        st(lp, self).map_or_else(Default::default, |st| st.core.latency().clone())
    }

    pub(super) fn accepted_by(self, lp: &Loop, id: u32) -> u64 {
        st(lp, self).map_or(0, |st| st.core.accepted(id))
    }

    fn close_listener(self, lp: &mut Loop) {
        if let Some(l) = st_mut(lp, self).and_then(|st| st.listener.take()) {
            lp.close_if_open(l);
        }
    }

    /// Closes everything, including connections in flight (the primary is
    /// going away and no answer will be handled), and drops the state.
    pub(super) fn close_all(self, lp: &mut Loop) {
        let now = lp.now();
        if let Some(st) = st_mut(lp, self) {
            st.workers.clear();
            st.core.close_all(now);
        }
        self.run(lp, None);
        self.close_listener(lp);
        self.drop_state(lp);
    }

    /// Drops the handle's state once it is closed and nothing is in flight
    /// from it (or [`close_all`](Self::close_all) closed everything): its
    /// timer and any connection it still holds are closed, and the id finds
    /// nothing from then on.
    pub(super) fn drop_state(self, lp: &mut Loop) {
        let Some(st) = lp
            .context_mut::<ClusterContext>()
            .round_robin
            .remove(self.0)
        else {
            return;
        };
        if let Some(t) = st.timer {
            lp.close_if_open(t);
        }
        if let Some(l) = st.listener {
            lp.close_if_open(l);
        }
        for (_, c) in st.conns {
            lp.close_if_open(c);
        }
    }
}
