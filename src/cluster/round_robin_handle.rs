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
//! `accepted: true`, when our copy is closed).
//!
//! # A handoff that ends without an answer
//!
//! Node's handle waits for the answer to each `newconn` forever: a worker
//! whose answer never comes never gets another connection, and the
//! connection stays open in the primary. Here every way a handoff can end
//! without an answer is handled (see [`HandoffFailure`]), and reported
//! through the primary's `error` event as [`ClusterError::Handoff`]:
//!
//! * **NACK** (the fd did not reach the worker: out of fds, `MSG_CTRUNC`)
//!   or a **failed write** (the worker's end of the channel is closed): the
//!   connection goes back to the head of the queue, to the next free
//!   worker, and the worker backs off: it is tried again after
//!   [`BACKOFF_MIN_MS`], doubling with each failure in a row up to
//!   [`BACKOFF_MAX_MS`], until a handoff reaches it. So a worker at its fd
//!   limit is neither hammered nor lost: it takes connections again once it
//!   has fds.
//! * **The channel closes** or **the process exits** before the answer: the
//!   primary calls [`RoundRobinHandle::remove`] with the reason, which puts
//!   the connection back at the head of the queue (Node leaks it), or
//!   closes it when no worker is left.
//! * **No answer** within the handoff timeout (default
//!   [`DEFAULT_HANDOFF_TIMEOUT`]) after the worker acknowledged the fd: the
//!   worker holds the connection and may be serving it, so it cannot be
//!   given to another; our copy is closed and the worker's slot freed. A
//!   late answer only updates its counts.
//! * **Not read** within the timeout (no ACK: the worker's loop is not
//!   reading its channel): the fd waits in the worker's socket buffer, so
//!   re-handing it could make two workers serve one connection. It stays in
//!   flight (if the worker dies it is re-handed; if it NACKs it is
//!   re-handed) and the worker gets nothing else until it reads.
//! * Connections queued while **no worker can take one** (every worker is
//!   backing off or has left a handoff unread past the timeout) are closed
//!   once they have waited the timeout, rather than held forever. While
//!   some worker is healthy the queue waits for it, as Node's does.
//!
//! [`distribute`]: RoundRobinHandle::distribute
//! [`ClusterError::Handoff`]: super::ClusterError::Handoff

use std::cell::RefCell;
use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::io;
use std::rc::Rc;
use std::time::Duration;

use serde_json::Value;

use super::primary::ClusterError;
use super::protocol::{AcceptReply, Act, Query, Sockname};
use super::shared_handle::create_server_handle;
use super::worker::Worker;
use crate::ipc::{AfterAck, Attach, Channel, HandleDelivery, HandleKind};
use crate::uv::{Errno, Handle, Loop, OnEmfile, Socket, Timer};

/// How long a handoff may go unanswered, and how long a connection may wait
/// while no worker can take it, unless
/// [`Primary::set_handoff_timeout`](super::Primary::set_handoff_timeout)
/// says otherwise. A worker answers a `newconn` within a loop iteration or
/// two; five seconds is far beyond that, and short of the minutes a client
/// would otherwise hang.
pub const DEFAULT_HANDOFF_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// The first back-off of a worker whose handoff failed (NACK or a failed
/// write), in loop milliseconds; it doubles with each failure in a row.
pub(super) const BACKOFF_MIN_MS: u64 = 10;

/// The longest back-off, in loop milliseconds: a worker at its fd limit is
/// tried at most twice a second, and takes connections again within half a
/// second of having fds.
pub(super) const BACKOFF_MAX_MS: u64 = 500;

/// How a handoff (a `newconn` sent to a worker with a connection's fd)
/// ended without the worker's `{accepted}` answer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HandoffFailure {
    /// The worker answered `NODE_HANDLE_NACK`: the message reached it
    /// without its fd. The kernel drops an fd the receiver has no room for
    /// (`MSG_CTRUNC`), as when the worker is at its `RLIMIT_NOFILE`.
    Rejected,
    /// The message could not be written to the worker's channel: its end is
    /// closed (`EPIPE`), because the worker exited or closed it.
    NotSent,
    /// The worker's channel closed before it answered (it exited or
    /// disconnected).
    ChannelClosed,
    /// The worker's process exited before it answered.
    Exited,
    /// The worker acknowledged the fd but sent no answer within the
    /// handoff timeout.
    NoAnswer,
    /// The worker has not read the handoff (no ACK) within the handoff
    /// timeout: its loop is not reading its channel.
    Unread,
    /// Connections waited the handoff timeout while no worker could take
    /// one (every worker was backing off or had a handoff unread).
    NoWorker,
}

impl std::fmt::Display for HandoffFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            HandoffFailure::Rejected => {
                "the worker could not receive a connection's fd (NODE_HANDLE_NACK; \
                 out of file descriptors?)"
            }
            HandoffFailure::NotSent => {
                "a connection could not be written to the worker's channel \
                 (its end is closed: the worker exited)"
            }
            HandoffFailure::ChannelClosed => {
                "the worker's channel closed (it exited or disconnected) before it \
                 answered for a connection"
            }
            HandoffFailure::Exited => "the worker exited before it answered for a connection",
            HandoffFailure::NoAnswer => {
                "the worker took a connection but sent no answer within the handoff timeout"
            }
            HandoffFailure::Unread => {
                "the worker has not read a connection handed to it within the handoff timeout"
            }
            HandoffFailure::NoWorker => {
                "connections waited the handoff timeout with no worker able to take them"
            }
        })
    }
}

/// What became of the connection(s) of a failed handoff.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HandoffOutcome {
    /// Back at the head of the queue: the next free worker takes it.
    Rehanded,
    /// Closed (no worker is left, or none could take it in time).
    Closed,
    /// Left to the worker, which holds it; the primary closed its copy.
    LeftWithWorker,
    /// Still in flight to the worker, which gets no other connection until
    /// it reads it.
    StillInFlight,
}

impl std::fmt::Display for HandoffOutcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            HandoffOutcome::Rehanded => "re-handed to the next free worker",
            HandoffOutcome::Closed => "closed",
            HandoffOutcome::LeftWithWorker => "left to the worker (the primary closed its copy)",
            HandoffOutcome::StillInFlight => "still in flight until the worker reads it",
        })
    }
}

/// Reports a cluster error through the primary's `error` event.
pub(super) type Report = Rc<dyn Fn(&mut Loop, Option<&Worker>, ClusterError)>;

/// The primary out of fds: its fds are mostly connections waiting for a
/// worker (queued or in flight), which free up as workers take them, so
/// new clients wait in the kernel's backlog (nginx's rule, retried every
/// 100 ms) instead of being accepted and dropped (libuv's trick, which a
/// Node primary applies): with workers at their own fd limit NACKing, the
/// trick turned a short shortage into refused clients (issue 10).
const PRIMARY_ON_EMFILE: OnEmfile = OnEmfile::Pause(std::time::Duration::from_millis(100));

// An accepted connection, owned by the handle until a worker accepts it.
use crate::uv::Stream as Conn;

/// A connection waiting for a worker, with the loop time it was accepted.
#[derive(Clone, Copy, Debug)]
struct Queued {
    conn: Conn,
    since: u64,
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
    /// Loop time when it was accepted.
    since: u64,
    /// Loop time when it was sent.
    sent: u64,
    /// Loop time when the worker acknowledged the fd (`NODE_HANDLE_ACK`).
    acked: Option<u64>,
    /// Whether it was reported as [`HandoffFailure::Unread`].
    unread: bool,
}

/// A worker whose handoffs failed: how many in a row, and the loop time
/// before which it is not tried again.
#[derive(Clone, Copy, Debug)]
struct Backoff {
    failures: u32,
    until: u64,
}

/// What a handle needs from the primary.
#[derive(Clone)]
pub(super) struct Options {
    pub(super) pick: Pick,
    /// The handoff timeout, in loop milliseconds.
    pub(super) timeout_ms: u64,
    pub(super) report: Report,
}

impl std::fmt::Debug for Options {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Options")
            .field("pick", &self.pick)
            .field("timeout_ms", &self.timeout_ms)
            .finish_non_exhaustive()
    }
}

#[derive(Debug)]
struct State {
    opts: Options,
    /// Per worker: reported open connections, accepted in all.
    open: HashMap<u32, u64>,
    accepted: HashMap<u32, u64>,
    /// Per worker: when it last spoke (an accept reply or a load report),
    /// as a tick of `clock`.
    heard: HashMap<u32, u64>,
    clock: u64,
    /// Connections a scheduler placed on a worker that was busy; it takes
    /// them, in order, before the shared queue.
    assigned: HashMap<u32, VecDeque<Queued>>,
    key: String,
    /// The listening socket; `None` once closed (or if listening failed).
    listener: Option<Socket>,
    /// The bind or listen error.
    errno: Option<Errno>,
    /// `{address, family, port}` for TCP listeners.
    sockname: Option<Sockname>,
    /// Every worker using this key (Node's `all`).
    all: BTreeMap<u32, Worker>,
    /// Idle workers, in the order they became idle (Node's `free`).
    free: VecDeque<u32>,
    /// Accepted connections not yet handed out (Node's `handles`).
    handles: VecDeque<Queued>,
    /// The connection in flight to each worker.
    in_flight: HashMap<u32, InFlight>,
    /// Workers whose handoffs failed, backing off.
    backoff: HashMap<u32, Backoff>,
    /// Workers that left a connection unanswered for [`STALL_MS`]:
    /// [`Pick::LeastConnections`] passes them over until they answer.
    stalled: HashSet<u32>,
    /// Wakes [`Pick::LeastConnections`] when the worker it waits for has
    /// been silent for [`STALL_MS`].
    stall_timer: Option<Handle<Timer>>,
    /// When `stall_timer` fires, if it is armed.
    stall_due: Option<u64>,
    /// Wakes [`RoundRobinHandle::expire`]: back-offs that end, handoffs
    /// that time out, queued connections that wait too long.
    deadline_timer: Option<Handle<Timer>>,
    /// When `deadline_timer` fires, if it is armed.
    deadline_due: Option<u64>,
}

impl State {
    /// Whether worker `id` is backing off at loop time `now`.
    fn cooling(&self, id: u32, now: u64) -> bool {
        self.backoff.get(&id).is_some_and(|b| b.until > now)
    }

    /// Whether worker `id` cannot be counted on to take a connection: its
    /// last handoff failed and none has reached it since, or it has left
    /// one unread for the timeout.
    fn failing(&self, id: u32, now: u64) -> bool {
        self.backoff.contains_key(&id)
            || self
                .in_flight
                .get(&id)
                .is_some_and(|f| f.acked.is_none() && now >= f.sent + self.opts.timeout_ms)
    }

    /// The next loop time at which [`RoundRobinHandle::expire`] has work.
    fn next_deadline(&self, now: u64) -> Option<u64> {
        let t = self.opts.timeout_ms;
        let backoffs = self.backoff.values().map(|b| b.until).filter(|&u| u > now);
        let flights = self.in_flight.values().filter_map(|f| match f.acked {
            Some(a) => Some(a + t),
            None if !f.unread => Some(f.sent + t),
            None => None,
        });
        // A queued connection's deadline counts only when it is ahead, or
        // when every worker is failing (then `expire` closes it).
        let all_failing = self.all.keys().all(|&id| self.failing(id, now));
        let queued = (self.handles.front().into_iter())
            .chain(self.assigned.values().filter_map(VecDeque::front))
            .map(|q| q.since + t)
            .filter(|&d| d > now || all_failing);
        backoffs.chain(flights).chain(queued).min()
    }
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
        opts: Options,
    ) -> Self {
        let rr = RoundRobinHandle {
            st: Rc::new(RefCell::new(State {
                opts,
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
                backoff: HashMap::new(),
                stalled: HashSet::new(),
                stall_timer: None,
                stall_due: None,
                deadline_timer: None,
                deadline_due: None,
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

    /// Adds a worker (Node's `add`): returns the listener's `sockname`
    /// (TCP) for the reply, or the errno. After sending the reply, call
    /// [`handoff`](Self::handoff) for the worker.
    pub(super) fn add(&self, w: &Worker) -> Result<Option<Sockname>, Errno> {
        let mut st = self.st.borrow_mut();
        if let Some(errno) = st.errno {
            return Err(errno);
        }
        st.all.insert(w.id(), w.clone());
        Ok(st.sockname)
    }

    fn report(&self, lp: &mut Loop, w: Option<&Worker>, e: ClusterError) {
        let report = self.st.borrow().opts.report.clone();
        report(lp, w, e);
    }

    fn report_handoff(
        &self,
        lp: &mut Loop,
        w: Option<&Worker>,
        failure: HandoffFailure,
        outcome: HandoffOutcome,
        connections: usize,
    ) {
        let e = ClusterError::Handoff {
            failure,
            outcome,
            connections,
        };
        self.report(lp, w, e);
    }

    /// The listener accepted a connection.
    fn accepted(&self, lp: &mut Loop, conn: Conn) {
        let since = lp.now();
        self.distribute(lp, Queued { conn, since });
    }

    /// A connection was accepted, or came back (Node's `distribute`): it
    /// joins the queue and the first free worker takes the head, or, when
    /// a scheduler placed it, waits for its worker.
    fn distribute(&self, lp: &mut Loop, q: Queued) {
        if self.is_lc() {
            self.enqueue(lp, q, false);
            return;
        }
        let Some(id) = self.choose(lp, q.conn) else {
            self.enqueue(lp, q, false);
            return;
        };
        let next = {
            let mut st = self.st.borrow_mut();
            st.assigned.entry(id).or_default().push_back(q);
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
        self.arm_deadline(lp);
    }

    fn is_lc(&self) -> bool {
        matches!(self.st.borrow().opts.pick, Pick::LeastConnections)
    }

    /// The worker a user scheduler places `conn` on, or `None` for the
    /// shared queue (also when it picks a worker that is backing off).
    fn choose(&self, lp: &mut Loop, conn: Conn) -> Option<u32> {
        let (f, loads) = {
            let st = self.st.borrow();
            let Pick::Custom(f) = &st.opts.pick else {
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
        let now = lp.now();
        f(&ConnInfo { peer }, &loads).filter(|&id| {
            let st = self.st.borrow();
            st.all.contains_key(&id) && !st.cooling(id, now)
        })
    }

    /// Whether this handle picks by load, so workers should report theirs.
    pub(super) fn wants_load(&self) -> bool {
        !matches!(self.st.borrow().opts.pick, Pick::Fifo)
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

    fn enqueue(&self, lp: &mut Loop, q: Queued, front: bool) {
        let next = {
            let mut st = self.st.borrow_mut();
            if st.listener.is_none() {
                drop(st);
                lp.close_if_open(q.conn);
                return;
            }
            if front {
                st.handles.push_front(q);
            } else {
                st.handles.push_back(q);
            }
            if matches!(st.opts.pick, Pick::LeastConnections) {
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
        self.arm_deadline(lp);
    }

    /// Gives the worker the next queued connection, or marks it free
    /// (Node's `handoff`). Under [`Pick::LeastConnections`] the whole
    /// queue is reconsidered instead. A worker that is backing off is left
    /// alone: the deadline timer hands it the next connection when its
    /// back-off ends.
    pub(super) fn handoff(&self, lp: &mut Loop, w: &Worker) {
        if self.is_lc() {
            self.dispatch_lc(lp);
            return;
        }
        let id = w.id();
        let now = lp.now();
        let q = {
            let mut st = self.st.borrow_mut();
            if !st.all.contains_key(&id) || st.in_flight.contains_key(&id) || st.cooling(id, now) {
                return;
            }
            let mine = st.assigned.get_mut(&id).and_then(VecDeque::pop_front);
            let Some(q) = mine.or_else(|| st.handles.pop_front()) else {
                if !st.free.contains(&id) {
                    st.free.push_back(id);
                }
                return;
            };
            q
        };
        if !self.send(lp, w, q) {
            // The channel is gone: the connection is still ours. Another
            // free worker takes it; this one is removed when its
            // disconnect is handled.
            self.enqueue(lp, q, true);
        }
    }

    /// Sends `q` to `w` as `newconn`; `false` (and the connection is still
    /// ours, not in flight) if the channel is gone.
    fn send(&self, lp: &mut Loop, w: &Worker, q: Queued) -> bool {
        let id = w.id();
        let conn = q.conn;
        let key = {
            let mut st = self.st.borrow_mut();
            let sent = lp.now();
            st.in_flight.insert(
                id,
                InFlight {
                    conn,
                    since: q.since,
                    sent,
                    acked: None,
                    unread: false,
                },
            );
            st.key.clone()
        };
        let fields = Act::NewConn { key }.to_fields();
        let attach = Attach {
            handle: conn.into(),
            kind: HandleKind::NetNative,
            after_ack: AfterAck::Keep,
        };
        let (me, worker) = (self.clone(), w.clone());
        let on_reply = Box::new(
            move |lp: &mut Loop, _: &Channel, reply: Value, h: Option<Socket>| {
                if let Some(h) = h {
                    lp.close_if_open(h);
                }
                me.on_reply(lp, &worker, conn, AcceptReply::from_wire(&reply));
            },
        );
        let (me, worker) = (self.clone(), w.clone());
        let on_delivery = Box::new(move |lp: &mut Loop, _: &Channel, d: HandleDelivery| {
            me.on_delivery(lp, &worker, conn, d);
        });
        let sent = match w.channel() {
            Some(ch) => ch
                .send_cluster_handle(lp, fields, attach, Some(on_reply), on_delivery)
                .is_ok(),
            None => false,
        };
        if sent {
            self.arm_deadline(lp);
        } else {
            self.take_in_flight(id, conn);
        }
        sent
    }

    /// Removes `conn` from worker `id`'s connection in flight; `None` if
    /// it was not there (already requeued, or given up).
    fn take_in_flight(&self, id: u32, conn: Conn) -> Option<InFlight> {
        let mut st = self.st.borrow_mut();
        match st.in_flight.get(&id) {
            Some(f) if f.conn == conn => st.in_flight.remove(&id),
            _ => None,
        }
    }

    /// How the `NODE_HANDLE` of a `newconn` fared.
    fn on_delivery(&self, lp: &mut Loop, w: &Worker, conn: Conn, d: HandleDelivery) {
        let id = w.id();
        let now = lp.now();
        let failure = match d {
            HandleDelivery::Acked => {
                let mut st = self.st.borrow_mut();
                if let Some(f) = st.in_flight.get_mut(&id).filter(|f| f.conn == conn) {
                    f.acked = Some(now);
                }
                // The fd reached it: whatever made it fail is over.
                st.backoff.remove(&id);
                drop(st);
                self.arm_deadline(lp);
                return;
            }
            HandleDelivery::Nacked => HandoffFailure::Rejected,
            HandleDelivery::NotSent(_) => HandoffFailure::NotSent,
        };
        let Some(f) = self.take_in_flight(id, conn) else {
            return;
        };
        let first = {
            let mut st = self.st.borrow_mut();
            let b = st.backoff.entry(id).or_insert(Backoff {
                failures: 0,
                until: now,
            });
            b.failures += 1;
            let delay = BACKOFF_MIN_MS
                .saturating_mul(1 << (b.failures - 1).min(16))
                .min(BACKOFF_MAX_MS);
            b.until = now + delay;
            let first = b.failures == 1;
            st.free.retain(|&f| f != id);
            first
        };
        let closed = self.is_closed();
        // Connections placed on it go to the others while it backs off.
        self.reassign(lp, id);
        self.enqueue(
            lp,
            Queued {
                conn,
                since: f.since,
            },
            true,
        );
        if first || failure == HandoffFailure::NotSent {
            // One report per run of failures, not one per retry.
            let outcome = if closed {
                HandoffOutcome::Closed
            } else {
                HandoffOutcome::Rehanded
            };
            self.report_handoff(lp, Some(w), failure, outcome, 1);
        }
        self.arm_deadline(lp);
        self.maybe_close_timers(lp);
    }

    /// [`Pick::LeastConnections`]: hands out queued connections while it
    /// can (see [`lc_step`](Self::lc_step)).
    fn dispatch_lc(&self, lp: &mut Loop) {
        loop {
            match self.lc_step(lp.now()) {
                LcStep::Send(w) => {
                    let Some(q) = self.st.borrow_mut().handles.pop_front() else {
                        return;
                    };
                    if !self.send(lp, &w, q) {
                        // Its channel is gone: pass it over until it is
                        // removed.
                        let mut st = self.st.borrow_mut();
                        st.handles.push_front(q);
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
    /// the connection waits for the first answer. Workers backing off
    /// after a failed handoff are not candidates.
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
                .filter(|(id, w)| {
                    !st.stalled.contains(id) && !st.cooling(**id, now) && w.is_connected()
                })
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
        let _ = lp.timer_start(
            timer,
            Duration::from_millis(ms),
            Duration::ZERO,
            move |lp, _| {
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
            },
        );
    }

    /// Arms the deadline timer for the next deadline (see
    /// [`State::next_deadline`]), if it is not already armed for it or
    /// earlier.
    fn arm_deadline(&self, lp: &mut Loop) {
        let now = lp.now();
        let (timer, due) = {
            let mut st = self.st.borrow_mut();
            if st.listener.is_none() && st.in_flight.is_empty() {
                return;
            }
            let Some(due) = st.next_deadline(now) else {
                return;
            };
            // An armed timer that fires no later still does: `expire`
            // looks at everything that is due by then. (It may be due
            // already, as when the loop has not yet reached its timers
            // this iteration; re-arming it later lost a back-off that had
            // ended meanwhile, and with it the worker, for good.)
            if st.deadline_due.is_some_and(|d| d <= due) {
                return;
            }
            st.deadline_due = Some(due);
            let t = *st.deadline_timer.get_or_insert_with(|| {
                let t = lp.timer_init();
                let _ = lp.unref_handle(t);
                t
            });
            (t, due)
        };
        let weak = Rc::downgrade(&self.st);
        let ms = due.saturating_sub(now);
        let _ = lp.timer_start(
            timer,
            Duration::from_millis(ms),
            Duration::ZERO,
            move |lp, _| {
                let Some(st) = weak.upgrade() else { return };
                let me = RoundRobinHandle { st };
                me.st.borrow_mut().deadline_due = None;
                me.expire(lp);
            },
        );
    }

    /// The deadline timer: workers whose back-off ended are tried again;
    /// handoffs past the timeout are given up or reported; queued
    /// connections are closed once they waited the timeout while no worker
    /// could take one. Then the timer is armed for what comes next.
    fn expire(&self, lp: &mut Loop) {
        let now = lp.now();
        let t = self.st.borrow().opts.timeout_ms;
        // Back-offs that ended.
        let retry: Vec<Worker> = {
            let st = self.st.borrow();
            st.backoff
                .iter()
                .filter(|(id, b)| b.until <= now && !st.in_flight.contains_key(id))
                .filter_map(|(id, _)| st.all.get(id).cloned())
                .collect()
        };
        for w in &retry {
            self.handoff(lp, w);
        }
        // Handoffs without an answer.
        let (no_answer, unread): (Vec<(u32, InFlight)>, Vec<u32>) = {
            let mut st = self.st.borrow_mut();
            let no_answer: Vec<u32> = st
                .in_flight
                .iter()
                .filter(|(_, f)| f.acked.is_some_and(|a| now >= a + t))
                .map(|(&id, _)| id)
                .collect();
            let no_answer = no_answer
                .into_iter()
                .filter_map(|id| st.in_flight.remove(&id).map(|f| (id, f)))
                .collect();
            let mut unread = Vec::new();
            for (&id, f) in st.in_flight.iter_mut() {
                if f.acked.is_none() && !f.unread && now >= f.sent + t {
                    f.unread = true;
                    unread.push(id);
                }
            }
            (no_answer, unread)
        };
        for (id, f) in no_answer {
            // The worker holds the connection and may be serving it: it
            // cannot go to another. Ours is closed; its slot is free.
            lp.close_if_open(f.conn);
            let w = {
                let mut st = self.st.borrow_mut();
                if matches!(st.opts.pick, Pick::LeastConnections) {
                    // Silent: passed over until it answers.
                    st.stalled.insert(id);
                }
                st.all.get(&id).cloned()
            };
            self.report_handoff(
                lp,
                w.as_ref(),
                HandoffFailure::NoAnswer,
                HandoffOutcome::LeftWithWorker,
                1,
            );
            if let Some(w) = w {
                self.handoff(lp, &w);
            }
        }
        for id in unread {
            let w = self.st.borrow().all.get(&id).cloned();
            self.report_handoff(
                lp,
                w.as_ref(),
                HandoffFailure::Unread,
                HandoffOutcome::StillInFlight,
                1,
            );
        }
        // Queued connections that no worker can take.
        let expired: Vec<Conn> = {
            let mut st = self.st.borrow_mut();
            let all_failing = st.all.keys().all(|&id| st.failing(id, now));
            if all_failing {
                let mut out: Vec<Conn> = Vec::new();
                let keep = |q: &Queued| q.since + t > now;
                st.handles.retain(|q| keep(q) || !out_push(&mut out, q));
                for qs in st.assigned.values_mut() {
                    qs.retain(|q| keep(q) || !out_push(&mut out, q));
                }
                out
            } else {
                Vec::new()
            }
        };
        if !expired.is_empty() {
            for c in &expired {
                lp.close_if_open(c);
            }
            self.report_handoff(
                lp,
                None,
                HandoffFailure::NoWorker,
                HandoffOutcome::Closed,
                expired.len(),
            );
        }
        if self.is_lc() {
            self.dispatch_lc(lp);
        }
        self.arm_deadline(lp);
        self.maybe_close_timers(lp);
    }

    /// Closes the deadline timer once the handle is closed and nothing is
    /// in flight.
    fn maybe_close_timers(&self, lp: &mut Loop) {
        let timer = {
            let mut st = self.st.borrow_mut();
            if st.listener.is_some() || !st.in_flight.is_empty() {
                return;
            }
            st.deadline_due = None;
            st.deadline_timer.take()
        };
        if let Some(t) = timer {
            lp.close_if_open(t);
        }
    }

    fn on_reply(&self, lp: &mut Loop, w: &Worker, conn: Conn, reply: AcceptReply) {
        let id = w.id();
        let taken = self.take_in_flight(id, conn);
        let AcceptReply {
            accepted,
            load: reported,
        } = reply;
        {
            // Rust workers send their open-connection count with the reply;
            // for others, count what they accepted. A late answer (to a
            // handoff given up) counts as well: it is what the worker did.
            let mut st = self.st.borrow_mut();
            if !st.all.contains_key(&id) && taken.is_none() {
                return;
            }
            st.stalled.remove(&id);
            st.backoff.remove(&id);
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
        if let Some(f) = taken {
            if accepted {
                lp.close_if_open(conn);
            } else {
                self.distribute(
                    lp,
                    Queued {
                        conn,
                        since: f.since,
                    },
                );
            }
        }
        self.handoff(lp, w);
        self.maybe_close_timers(lp);
    }

    /// Worker `w` is gone (its channel closed, or its process exited): the
    /// connection in flight to it (if any) never reaches a worker's
    /// `onconnection`, so it goes back to the head of the queue, or is
    /// closed when the handle is closed. `why` is reported with it.
    pub(super) fn lost(&self, lp: &mut Loop, w: &Worker, why: HandoffFailure) {
        let id = w.id();
        let f = {
            let mut st = self.st.borrow_mut();
            st.stalled.remove(&id);
            st.backoff.remove(&id);
            st.free.retain(|&f| f != id);
            st.in_flight.remove(&id)
        };
        if let Some(f) = f {
            // With no worker left the handle closes, and the connection
            // with it.
            let outcome = if self.is_closed() || self.st.borrow().all.is_empty() {
                HandoffOutcome::Closed
            } else {
                HandoffOutcome::Rehanded
            };
            self.enqueue(
                lp,
                Queued {
                    conn: f.conn,
                    since: f.since,
                },
                true,
            );
            self.report_handoff(lp, Some(w), why, outcome, 1);
        }
        self.reassign(lp, id);
        self.maybe_close_timers(lp);
    }

    /// Connections placed on worker `id` that it never took go back through
    /// the pick, among the workers left (or, while it backs off, to the
    /// shared queue).
    fn reassign(&self, lp: &mut Loop, id: u32) {
        let queued = self.st.borrow_mut().assigned.remove(&id);
        for q in queued.into_iter().flatten() {
            if self.st.borrow().all.contains_key(&id) {
                self.enqueue(lp, q, false);
            } else {
                self.distribute(lp, q);
            }
        }
    }

    /// Removes a worker (Node's `remove`). `gone` says why, when the worker
    /// can no longer answer (its channel closed, or its process exited):
    /// the connection in flight to it is then requeued (see
    /// [`lost`](Self::lost)). Otherwise it stays in flight, and its answer
    /// decides. Returns `true` when it was the last worker: queued
    /// connections and the listener are then closed, and the caller
    /// forgets the key.
    pub(super) fn remove(&self, lp: &mut Loop, w: &Worker, gone: Option<HandoffFailure>) -> bool {
        let id = w.id();
        {
            let mut st = self.st.borrow_mut();
            if st.all.remove(&id).is_none() {
                return false;
            }
            st.free.retain(|&f| f != id);
            st.open.remove(&id);
            st.stalled.remove(&id);
            st.backoff.remove(&id);
        }
        match gone {
            Some(why) => self.lost(lp, w, why),
            None => self.reassign(lp, id),
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
            lp.close_if_open(t);
        }
        for q in queued.into_iter().chain(assigned.into_values().flatten()) {
            lp.close_if_open(q.conn);
        }
        if let Some(l) = listener {
            lp.close_if_open(l);
        }
        self.maybe_close_timers(lp);
    }

    /// Closes everything, including connections in flight (the primary is
    /// going away and no answer will be handled).
    pub(super) fn close_all(&self, lp: &mut Loop) {
        let in_flight: Vec<Conn> = {
            let mut st = self.st.borrow_mut();
            st.all.clear();
            st.in_flight.drain().map(|(_, f)| f.conn).collect()
        };
        self.close(lp);
        for c in in_flight {
            lp.close_if_open(c);
        }
    }
}

/// Moves `q`'s connection to `out`; returns `true` (for `retain`).
fn out_push(out: &mut Vec<Conn>, q: &Queued) -> bool {
    out.push(q.conn);
    true
}
