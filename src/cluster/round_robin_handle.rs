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

#[derive(Debug)]
struct State {
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
    pub(super) fn new(lp: &mut Loop, key: String, address: Option<&str>, q: &Query) -> Self {
        let rr = RoundRobinHandle {
            st: Rc::new(RefCell::new(State {
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
        self.enqueue(lp, conn, false);
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
            let Some(conn) = st.handles.pop_front() else {
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
        let conn = self.st.borrow_mut().in_flight.remove(&w.id());
        let Some(conn) = conn else { return };
        if truthy(reply.get("accepted")) {
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
        }
        if !w.is_connected() {
            self.lost(lp, id);
        }
        if !self.st.borrow().all.is_empty() {
            return false;
        }
        self.close(lp);
        true
    }

    /// Closes the listener and every queued connection.
    pub(super) fn close(&self, lp: &mut Loop) {
        let (queued, listener) = {
            let mut st = self.st.borrow_mut();
            st.free.clear();
            (std::mem::take(&mut st.handles), st.listener.take())
        };
        for c in queued {
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
