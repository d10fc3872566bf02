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
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::io;
use std::rc::Rc;

use serde_json::{Map, Value};

use super::protocol::{self, Query};
use super::shared_handle::{ServerSocket, create_server_handle, neg_errno};
use super::worker::Worker;
use crate::ipc::{AfterAck, Attach, HandleKind, SendHandle, close_accepted};
use crate::uv::{Handle, Loop, Pipe, Tcp};

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
    /// The worker with the fewest open and queued connections.
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

#[derive(Debug)]
struct State {
    pick: Pick,
    /// Per worker: reported open connections, accepted in all.
    open: HashMap<u32, u64>,
    accepted: HashMap<u32, u64>,
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
    in_flight: HashMap<u32, Conn>,
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
                assigned: HashMap::new(),
                key,
                listener: None,
                errno: None,
                sockname: None,
                all: BTreeMap::new(),
                free: VecDeque::new(),
                handles: VecDeque::new(),
                in_flight: HashMap::new(),
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
    /// joins the queue and the first free worker takes the head.
    fn distribute(&self, lp: &mut Loop, conn: Conn) {
        let target = self.choose(lp, conn);
        let Some(id) = target else {
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

    /// The worker a non-FIFO pick places `conn` on, or `None` for the
    /// shared queue.
    fn choose(&self, lp: &mut Loop, conn: Conn) -> Option<u32> {
        let (pick, loads) = {
            let st = self.st.borrow();
            if matches!(st.pick, Pick::Fifo) || st.all.is_empty() {
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
                })
                .collect();
            (st.pick.clone(), loads)
        };
        let id = match pick {
            Pick::Fifo => return None,
            // The worker with the fewest connections, open or on their way
            // to it; among equals, one free to take it now, then the one
            // that has accepted fewer.
            Pick::LeastConnections => loads
                .iter()
                .min_by_key(|l| (l.open + l.queued, l.queued > 0, l.accepted, l.id))
                .map(|l| l.id),
            Pick::Custom(f) => {
                let peer = match conn {
                    Conn::Tcp(h) => lp.tcp_getpeername(h).ok().map(unmap_v4),
                    Conn::Pipe(_) => None,
                };
                f(&ConnInfo { peer }, &loads)
            }
        };
        id.filter(|id| self.st.borrow().all.contains_key(id))
    }

    /// Whether this handle picks by load, so workers should report theirs.
    pub(super) fn wants_load(&self) -> bool {
        !matches!(self.st.borrow().pick, Pick::Fifo)
    }

    /// A worker reported its open connections on this server.
    pub(super) fn set_load(&self, id: u32, load: u64) {
        let mut st = self.st.borrow_mut();
        if st.all.contains_key(&id) {
            st.open.insert(id, load);
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
            let id = st.free.pop_front();
            id.and_then(|id| st.all.get(&id).cloned())
        };
        if let Some(w) = next {
            self.handoff(lp, &w);
        }
    }

    /// Gives the worker the next queued connection, or marks it free
    /// (Node's `handoff`).
    pub(super) fn handoff(&self, lp: &mut Loop, w: &Worker) {
        let id = w.id();
        let (conn, key) = {
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
            st.in_flight.insert(id, conn);
            (conn, st.key.clone())
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
                        me.on_reply(lp, &worker, &reply);
                    })),
                )
                .map(drop),
            None => Err(io::ErrorKind::NotConnected.into()),
        };
        if sent.is_err() {
            // The channel is gone: the connection is still ours. Another
            // free worker takes it; this one is removed when its
            // disconnect is handled.
            self.st.borrow_mut().in_flight.remove(&id);
            self.enqueue(lp, conn, true);
        }
    }

    fn on_reply(&self, lp: &mut Loop, w: &Worker, reply: &Value) {
        let id = w.id();
        let conn = self.st.borrow_mut().in_flight.remove(&id);
        let Some(conn) = conn else { return };
        let accepted = truthy(reply.get("accepted"));
        {
            // Rust workers send their open-connection count with the reply;
            // for others, count what they accepted.
            let mut st = self.st.borrow_mut();
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
        let conn = self.st.borrow_mut().in_flight.remove(&id);
        if let Some(conn) = conn {
            self.enqueue(lp, conn, true);
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
        let (queued, assigned, listener) = {
            let mut st = self.st.borrow_mut();
            st.free.clear();
            (
                std::mem::take(&mut st.handles),
                std::mem::take(&mut st.assigned),
                st.listener.take(),
            )
        };
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
            st.in_flight.drain().map(|(_, c)| c).collect()
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
