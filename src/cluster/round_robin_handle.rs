//! Round-robin dispatch (`lib/internal/cluster/round_robin_handle.js`).
//!
//! The primary listens and accepts. Each accepted connection joins a FIFO
//! (`handles`) and is handed to the first free worker as a `newconn`
//! message carrying the fd. A worker gets its next connection only after it
//! answered `{accepted}` for the previous one, so each worker has at most
//! one connection in flight:
//!
//! * `accepted: true`: the worker owns the connection; we close our copy.
//! * `accepted: false` (its server is closed, or `maxConnections` is
//!   reached): the same connection goes back through [`distribute`] to
//!   another worker.
//!
//! # Ownership (GUIDE.md §4)
//!
//! At every instant each accepted connection has exactly one owner: the
//! queue, "in flight to worker N" (`in_flight`), or worker N (after
//! `accepted: true`, when our copy is closed). Node loses a connection that
//! was in flight to a worker whose channel closed before it answered (the
//! reply callback never runs and the fd leaks in the primary). Here the
//! primary calls [`RoundRobinHandle::lost`] when a worker's channel closes,
//! which puts that connection back at the head of the queue, or closes it
//! when no worker is left.
//!
//! [`distribute`]: RoundRobinHandle::distribute

use std::cell::RefCell;
use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::io;
use std::rc::Rc;

use serde_json::{Map, Value};

use super::protocol::{self, Query};
use super::shared_handle::{ServerSocket, create_server_handle, neg_errno};
use super::worker::Worker;
use crate::ipc::{AfterAck, Attach, HandleKind, SendHandle, close_accepted};
use crate::uv::{Handle, Loop, Pipe, Tcp, Timer};

/// An accepted connection, owned by the handle until a worker accepts it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Conn {
    Tcp(Handle<Tcp>),
    Pipe(Handle<Pipe>),
}

impl Conn {
    fn close(self, lp: &mut Loop) {
        let _ = match self {
            Conn::Tcp(h) => lp.close(h, |_| {}),
            Conn::Pipe(h) => lp.close(h, |_| {}),
        };
    }

    fn send_handle(self) -> SendHandle {
        match self {
            Conn::Tcp(h) => SendHandle::Tcp(h),
            Conn::Pipe(h) => SendHandle::Pipe(h),
        }
    }
}

/// What a scheduler sees of one worker when it picks where a connection
/// goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WorkerLoad {
    /// The worker's id.
    pub id: u32,
    /// Open connections: as the worker last reported them (Rust workers
    /// report with every accept reply and when connections end), plus those
    /// it accepted since; for a Node worker, everything it has accepted.
    pub open: u64,
    /// Connections handed to it and not yet answered, or waiting for it.
    pub queued: u64,
    /// Connections it has accepted in all.
    pub accepted: u64,
    /// When the worker last spoke to the primary (an accept reply or a
    /// load report), as a count that only grows: of two workers, the one
    /// with the larger `heard` answered more recently. A worker stuck in a
    /// long synchronous handler falls behind.
    pub heard: u64,
}

/// What a scheduler sees of the connection to place.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConnInfo {
    /// The client's address (TCP), if known; an IPv4 client of a
    /// dual-stack listener appears as its IPv4 address.
    pub peer: Option<std::net::SocketAddr>,
}

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

/// A user scheduler: picks the worker for a connection from every worker's
/// load, or `None` for the default (first free worker).
pub type Scheduler = Rc<dyn Fn(&ConnInfo, &[WorkerLoad]) -> Option<u32>>;

/// How a handle picks the worker for each connection.
#[derive(Clone)]
pub(super) enum Pick {
    /// Node's round-robin: the first free worker.
    Fifo,
    /// The worker with the fewest connections, among those known to be
    /// responsive (see [`RoundRobinHandle::dispatch_lc`]).
    LeastConnections,
    /// A user scheduler.
    Custom(Scheduler),
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

/// How long a worker may leave a connection unanswered before
/// [`Pick::LeastConnections`] passes it over, in loop milliseconds (so
/// between 1 and 2 ms of real time). A Rust worker answers once its loop
/// has polled again, which takes microseconds unless a handler keeps the
/// loop busy.
const STALL_MS: u64 = 2;

/// A connection sent to a worker, not yet answered.
#[derive(Clone, Copy, Debug)]
struct InFlight {
    conn: Conn,
    /// Loop time when it was sent.
    sent: u64,
}

#[derive(Debug)]
struct State {
    pick: Pick,
    /// Per worker: reported open connections, accepted in all.
    open: HashMap<u32, u64>,
    accepted: HashMap<u32, u64>,
    /// Per worker: when it last spoke (an accept reply or a load report),
    /// as a tick of `clock`.
    heard: HashMap<u32, u64>,
    clock: u64,
    /// Connections a scheduler placed on a worker that was busy; it takes
    /// them, in order, before the shared queue.
    assigned: HashMap<u32, VecDeque<Conn>>,
    key: String,
    /// The listening socket; `None` once closed (or if listening failed).
    listener: Option<ServerSocket>,
    /// The bind or listen error, as Node's negative errno.
    errno: Option<i64>,
    /// `{address, family, port}` for TCP listeners.
    sockname: Option<Value>,
    /// Every worker using this key (Node's `all`).
    all: BTreeMap<u32, Worker>,
    /// Idle workers, in the order they became idle (Node's `free`).
    free: VecDeque<u32>,
    /// Accepted connections not yet handed out (Node's `handles`).
    handles: VecDeque<Conn>,
    /// The connection in flight to each worker.
    in_flight: HashMap<u32, InFlight>,
    /// Workers that left a connection unanswered for [`STALL_MS`]:
    /// [`Pick::LeastConnections`] passes them over until they answer.
    stalled: HashSet<u32>,
    /// Wakes [`Pick::LeastConnections`] when the worker it waits for has
    /// been silent for [`STALL_MS`].
    stall_timer: Option<Handle<Timer>>,
    /// When `stall_timer` fires, if it is armed.
    stall_due: Option<u64>,
}

/// One step of [`RoundRobinHandle::dispatch_lc`].
enum LcStep {
    /// Send the head of the queue to this worker.
    Send(Worker),
    /// Wait for an answer, at most until this loop time (ms).
    Wait(u64),
    /// Nothing to send, or no worker to send to.
    Idle,
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
        pick: Pick,
    ) -> Self {
        let rr = RoundRobinHandle {
            st: Rc::new(RefCell::new(State {
                pick,
                open: HashMap::new(),
                accepted: HashMap::new(),
                heard: HashMap::new(),
                clock: 0,
                assigned: HashMap::new(),
                key,
                listener: None,
                errno: None,
                sockname: None,
                all: BTreeMap::new(),
                free: VecDeque::new(),
                handles: VecDeque::new(),
                in_flight: HashMap::new(),
                stalled: HashSet::new(),
                stall_timer: None,
                stall_due: None,
            })),
        };
        match rr.listen(lp, address, q) {
            Ok((sock, sockname)) => {
                let mut st = rr.st.borrow_mut();
                st.listener = Some(sock);
                st.sockname = sockname;
            }
            Err(e) => rr.st.borrow_mut().errno = Some(neg_errno(&e)),
        }
        rr
    }

    fn listen(
        &self,
        lp: &mut Loop,
        address: Option<&str>,
        q: &Query,
    ) -> io::Result<(ServerSocket, Option<Value>)> {
        let sock = create_server_handle(lp, address, q)?;
        let backlog = q.backlog();
        let weak = Rc::downgrade(&self.st);
        let r = match sock {
            ServerSocket::Tcp(h) => {
                let w = weak.clone();
                lp.tcp_listen(h, backlog, move |lp, _, r| {
                    if let Ok(c) = r {
                        match w.upgrade() {
                            Some(st) => RoundRobinHandle { st }.distribute(lp, Conn::Tcp(c)),
                            None => Conn::Tcp(c).close(lp),
                        }
                    }
                })
                .and_then(|()| lp.tcp_getsockname(h))
                .map(|a| Some(protocol::sockname(&a)))
            }
            ServerSocket::Pipe(h) => {
                let w = weak.clone();
                let listening = lp.pipe_listen(h, backlog, move |lp, _, r| {
                    if let Ok(c) = r {
                        match w.upgrade() {
                            Some(st) => RoundRobinHandle { st }.distribute(lp, Conn::Pipe(c)),
                            None => Conn::Pipe(c).close(lp),
                        }
                    }
                });
                let readable = truthy(q.readable_all.as_ref());
                let writable = truthy(q.writable_all.as_ref());
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
            ServerSocket::Udp(_) => Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "round-robin needs a stream socket",
            )),
        };
        match r {
            Ok(sockname) => Ok((sock, sockname)),
            Err(e) => {
                sock.close(lp);
                Err(e)
            }
        }
    }

    /// Whether worker `id` already uses this handle.
    pub(super) fn has(&self, id: u32) -> bool {
        self.st.borrow().all.contains_key(&id)
    }

    /// Whether the handle is closed: listening failed, or its last worker
    /// left. A closed handle only waits for connections still in flight.
    pub(super) fn is_closed(&self) -> bool {
        self.st.borrow().listener.is_none()
    }

    /// Whether connections are still in flight to some worker.
    pub(super) fn has_in_flight(&self) -> bool {
        !self.st.borrow().in_flight.is_empty()
    }

    /// Adds a worker (Node's `add`): returns the reply's `errno` (`None` on
    /// success) and `sockname`. After sending the reply, call
    /// [`handoff`](Self::handoff) for the worker.
    pub(super) fn add(&self, w: &Worker) -> (Option<i64>, Option<Value>) {
        let mut st = self.st.borrow_mut();
        if let Some(errno) = st.errno {
            return (Some(errno), None);
        }
        st.all.insert(w.id(), w.clone());
        (None, st.sockname.clone())
    }

    /// A connection was accepted, or came back (Node's `distribute`): it
    /// joins the queue and the first free worker takes the head, or, when
    /// a scheduler placed it, waits for its worker.
    fn distribute(&self, lp: &mut Loop, conn: Conn) {
        if self.is_lc() {
            self.enqueue(lp, conn, false);
            return;
        }
        let Some(id) = self.choose(lp, conn) else {
            self.enqueue(lp, conn, false);
            return;
        };
        let next = {
            let mut st = self.st.borrow_mut();
            st.assigned.entry(id).or_default().push_back(conn);
            let was_free = st.free.contains(&id);
            st.free.retain(|&f| f != id);
            if was_free {
                st.all.get(&id).cloned()
            } else {
                None
            }
        };
        if let Some(w) = next {
            self.handoff(lp, &w);
        }
    }

    fn is_lc(&self) -> bool {
        matches!(self.st.borrow().pick, Pick::LeastConnections)
    }

    /// The worker a user scheduler places `conn` on, or `None` for the
    /// shared queue.
    fn choose(&self, lp: &mut Loop, conn: Conn) -> Option<u32> {
        let (f, loads) = {
            let st = self.st.borrow();
            let Pick::Custom(f) = &st.pick else {
                return None;
            };
            if st.all.is_empty() {
                return None;
            }
            let loads: Vec<WorkerLoad> = st
                .all
                .keys()
                .map(|&id| WorkerLoad {
                    id,
                    open: st.open.get(&id).copied().unwrap_or(0),
                    queued: st.assigned.get(&id).map_or(0, |q| q.len() as u64)
                        + u64::from(st.in_flight.contains_key(&id)),
                    accepted: st.accepted.get(&id).copied().unwrap_or(0),
                    heard: st.heard.get(&id).copied().unwrap_or(0),
                })
                .collect();
            (f.clone(), loads)
        };
        let peer = match conn {
            Conn::Tcp(h) => lp.tcp_getpeername(h).ok().map(unmap_v4),
            Conn::Pipe(_) => None,
        };
        f(&ConnInfo { peer }, &loads).filter(|id| self.st.borrow().all.contains_key(id))
    }

    /// Whether this handle picks by load, so workers should report theirs.
    pub(super) fn wants_load(&self) -> bool {
        !matches!(self.st.borrow().pick, Pick::Fifo)
    }

    /// A worker reported its open connections on this server.
    pub(super) fn set_load(&self, lp: &mut Loop, id: u32, load: u64) {
        {
            let mut st = self.st.borrow_mut();
            if !st.all.contains_key(&id) {
                return;
            }
            st.open.insert(id, load);
            st.clock += 1;
            let now = st.clock;
            st.heard.insert(id, now);
        }
        if self.is_lc() {
            self.dispatch_lc(lp);
        }
    }

    fn enqueue(&self, lp: &mut Loop, conn: Conn, front: bool) {
        let next = {
            let mut st = self.st.borrow_mut();
            if st.listener.is_none() {
                drop(st);
                conn.close(lp);
                return;
            }
            if front {
                st.handles.push_front(conn);
            } else {
                st.handles.push_back(conn);
            }
            if matches!(st.pick, Pick::LeastConnections) {
                None
            } else {
                let id = st.free.pop_front();
                id.and_then(|id| st.all.get(&id).cloned())
            }
        };
        if self.is_lc() {
            self.dispatch_lc(lp);
        } else if let Some(w) = next {
            self.handoff(lp, &w);
        }
    }

    /// Gives the worker the next queued connection, or marks it free
    /// (Node's `handoff`). Under [`Pick::LeastConnections`] the whole
    /// queue is reconsidered instead.
    pub(super) fn handoff(&self, lp: &mut Loop, w: &Worker) {
        if self.is_lc() {
            self.dispatch_lc(lp);
            return;
        }
        let id = w.id();
        let conn = {
            let mut st = self.st.borrow_mut();
            if !st.all.contains_key(&id) || st.in_flight.contains_key(&id) {
                return;
            }
            let mine = st.assigned.get_mut(&id).and_then(VecDeque::pop_front);
            let Some(conn) = mine.or_else(|| st.handles.pop_front()) else {
                if !st.free.contains(&id) {
                    st.free.push_back(id);
                }
                return;
            };
            conn
        };
        if !self.send(lp, w, conn) {
            // The channel is gone: the connection is still ours. Another
            // free worker takes it; this one is removed when its
            // disconnect is handled.
            self.enqueue(lp, conn, true);
        }
    }

    /// Sends `conn` to `w` as `newconn`; `false` (and `conn` is still
    /// ours, not in flight) if the channel is gone.
    fn send(&self, lp: &mut Loop, w: &Worker, conn: Conn) -> bool {
        let id = w.id();
        let key = {
            let mut st = self.st.borrow_mut();
            let sent = lp.now();
            st.in_flight.insert(id, InFlight { conn, sent });
            st.key.clone()
        };
        let mut fields = Map::new();
        fields.insert("act".into(), "newconn".into());
        fields.insert("key".into(), key.into());
        let attach = Attach {
            handle: conn.send_handle(),
            kind: HandleKind::NetNative,
            after_ack: AfterAck::Keep,
        };
        let me = self.clone();
        let worker = w.clone();
        let sent = match w.channel() {
            Some(ch) => ch
                .send_cluster(
                    lp,
                    fields,
                    Some(attach),
                    Some(Box::new(move |lp, _, reply, h| {
                        if let Some(h) = h {
                            close_accepted(lp, h);
                        }
                        me.on_reply(lp, &worker, conn, &reply);
                    })),
                )
                .is_ok(),
            None => false,
        };
        if !sent {
            self.take_in_flight(id, conn);
        }
        sent
    }

    /// Removes `conn` from worker `id`'s connection in flight; `false` if
    /// it was not there (already requeued).
    fn take_in_flight(&self, id: u32, conn: Conn) -> bool {
        let mut st = self.st.borrow_mut();
        match st.in_flight.get(&id) {
            Some(f) if f.conn == conn => {
                st.in_flight.remove(&id);
                true
            }
            _ => false,
        }
    }

    /// [`Pick::LeastConnections`]: hands out queued connections while it
    /// can (see [`lc_step`](Self::lc_step)).
    fn dispatch_lc(&self, lp: &mut Loop) {
        loop {
            match self.lc_step(lp.now()) {
                LcStep::Send(w) => {
                    let Some(conn) = self.st.borrow_mut().handles.pop_front() else {
                        return;
                    };
                    if !self.send(lp, &w, conn) {
                        // Its channel is gone: pass it over until it is
                        // removed.
                        let mut st = self.st.borrow_mut();
                        st.handles.push_front(conn);
                        st.stalled.insert(w.id());
                    }
                }
                LcStep::Wait(due) => {
                    self.arm_stall_timer(lp, due);
                    return;
                }
                LcStep::Idle => return,
            }
        }
    }

    /// Where the head of the queue goes under [`Pick::LeastConnections`].
    ///
    /// Each worker's load is its open connections (as it last reported
    /// them; for a Node worker, all it has accepted) plus the one in
    /// flight to it. The least loaded worker (ties: nothing in flight,
    /// then heard from last) takes the connection if it has answered for
    /// everything it was sent. If it has not, it may be stuck in a long
    /// handler: the least loaded worker that has answered takes the
    /// connection unless it carries more than `2 × load + 1`; then the
    /// connection waits for the busy worker's answer, but only until that
    /// worker has been silent for [`STALL_MS`], after which it is passed
    /// over until it answers. If no worker has answered for everything,
    /// the connection waits for the first answer.
    fn lc_step(&self, now: u64) -> LcStep {
        let st = self.st.borrow();
        if st.handles.is_empty() {
            return LcStep::Idle;
        }
        let busy = |id: u32| st.in_flight.contains_key(&id);
        let load = |id: u32| st.open.get(&id).copied().unwrap_or(0) + u64::from(busy(id));
        let rank = |id: &u32| {
            let id = *id;
            (
                load(id),
                busy(id),
                std::cmp::Reverse(st.heard.get(&id).copied().unwrap_or(0)),
                id,
            )
        };
        let candidates = || {
            st.all
                .iter()
                .filter(|(id, w)| !st.stalled.contains(id) && w.is_connected())
                .map(|(id, _)| *id)
        };
        let Some(best) = candidates().min_by_key(rank) else {
            return LcStep::Idle;
        };
        let pick = if !busy(best) {
            best
        } else {
            // Every worker busy: the next answer runs this again.
            let Some(free) = candidates().filter(|&id| !busy(id)).min_by_key(rank) else {
                return LcStep::Idle;
            };
            if load(free) > 2 * load(best) + 1 {
                let sent = st.in_flight.get(&best).map_or(now, |f| f.sent);
                return LcStep::Wait(sent + STALL_MS);
            }
            free
        };
        match st.all.get(&pick) {
            Some(w) => LcStep::Send(w.clone()),
            None => LcStep::Idle,
        }
    }

    /// Wakes [`dispatch_lc`](Self::dispatch_lc) at loop time `due` (or
    /// earlier, if it is already set to), marking the workers silent for
    /// [`STALL_MS`] as stalled.
    fn arm_stall_timer(&self, lp: &mut Loop, due: u64) {
        let timer = {
            let mut st = self.st.borrow_mut();
            if st.listener.is_none() || st.stall_due.is_some_and(|d| d <= due) {
                return;
            }
            st.stall_due = Some(due);
            *st.stall_timer.get_or_insert_with(|| {
                let t = lp.timer_init();
                let _ = lp.unref_handle(t);
                t
            })
        };
        let weak = Rc::downgrade(&self.st);
        let ms = due.saturating_sub(lp.now()).max(1);
        let _ = lp.timer_start(timer, ms, 0, move |lp, _| {
            let Some(st) = weak.upgrade() else { return };
            let me = RoundRobinHandle { st };
            {
                let now = lp.now();
                let mut st = me.st.borrow_mut();
                st.stall_due = None;
                let late: Vec<u32> = st
                    .in_flight
                    .iter()
                    .filter(|(_, f)| now >= f.sent + STALL_MS)
                    .map(|(&id, _)| id)
                    .collect();
                st.stalled.extend(late);
            }
            me.dispatch_lc(lp);
        });
    }

    fn on_reply(&self, lp: &mut Loop, w: &Worker, conn: Conn, reply: &Value) {
        let id = w.id();
        if !self.take_in_flight(id, conn) {
            return;
        }
        let accepted = truthy(reply.get("accepted"));
        {
            // Rust workers send their open-connection count with the reply;
            // for others, count what they accepted.
            let mut st = self.st.borrow_mut();
            st.stalled.remove(&id);
            let reported = reply.get("load").and_then(Value::as_u64);
            let open = st.open.entry(id).or_default();
            match reported {
                Some(n) => *open = n,
                None if accepted => *open += 1,
                None => {}
            }
            if accepted {
                *st.accepted.entry(id).or_default() += 1;
            }
            st.clock += 1;
            let now = st.clock;
            st.heard.insert(id, now);
        }
        if accepted {
            conn.close(lp);
        } else {
            self.distribute(lp, conn);
        }
        self.handoff(lp, w);
    }

    /// Worker `id`'s channel closed: the connection in flight to it (if
    /// any) never reaches a worker's `onconnection`, so it goes back to the
    /// head of the queue, or is closed when the handle is closed.
    pub(super) fn lost(&self, lp: &mut Loop, id: u32) {
        let conn = {
            let mut st = self.st.borrow_mut();
            st.stalled.remove(&id);
            st.in_flight.remove(&id)
        };
        if let Some(f) = conn {
            self.enqueue(lp, f.conn, true);
        }
        self.reassign(lp, id);
    }

    /// Connections placed on worker `id` that it never took go back through
    /// the pick, among the workers left.
    fn reassign(&self, lp: &mut Loop, id: u32) {
        let queued = self.st.borrow_mut().assigned.remove(&id);
        for conn in queued.into_iter().flatten() {
            if self.st.borrow().all.contains_key(&id) {
                self.enqueue(lp, conn, false);
            } else {
                self.distribute(lp, conn);
            }
        }
    }

    /// Removes a worker (Node's `remove`). A connection in flight to it
    /// stays in flight while its channel is open (its answer decides), and
    /// is requeued otherwise. Returns `true` when it was the last worker:
    /// queued connections and the listener are then closed, and the caller
    /// forgets the key.
    pub(super) fn remove(&self, lp: &mut Loop, w: &Worker) -> bool {
        let id = w.id();
        {
            let mut st = self.st.borrow_mut();
            if st.all.remove(&id).is_none() {
                return false;
            }
            st.free.retain(|&f| f != id);
            st.open.remove(&id);
            st.stalled.remove(&id);
        }
        if !w.is_connected() {
            self.lost(lp, id);
        } else {
            self.reassign(lp, id);
        }
        if !self.st.borrow().all.is_empty() {
            return false;
        }
        self.close(lp);
        true
    }

    /// Closes the listener and every queued connection.
    pub(super) fn close(&self, lp: &mut Loop) {
        let (queued, assigned, listener, timer) = {
            let mut st = self.st.borrow_mut();
            st.free.clear();
            (
                std::mem::take(&mut st.handles),
                std::mem::take(&mut st.assigned),
                st.listener.take(),
                st.stall_timer.take(),
            )
        };
        if let Some(t) = timer {
            let _ = lp.close(t, |_| {});
        }
        for c in queued.into_iter().chain(assigned.into_values().flatten()) {
            c.close(lp);
        }
        if let Some(l) = listener {
            l.close(lp);
        }
    }

    /// Closes everything, including connections in flight (the primary is
    /// going away and no answer will be handled).
    pub(super) fn close_all(&self, lp: &mut Loop) {
        self.close(lp);
        let in_flight: Vec<Conn> = {
            let mut st = self.st.borrow_mut();
            st.all.clear();
            st.in_flight.drain().map(|(_, f)| f.conn).collect()
        };
        for c in in_flight {
            c.close(lp);
        }
    }
}

/// JavaScript truthiness of an optional JSON value.
pub(super) fn truthy(v: Option<&Value>) -> bool {
    match v {
        None | Some(Value::Null) => false,
        Some(Value::Bool(b)) => *b,
        Some(Value::Number(n)) => n.as_f64().is_some_and(|f| f != 0.0 && !f.is_nan()),
        Some(Value::String(s)) => !s.is_empty(),
        Some(_) => true,
    }
}
