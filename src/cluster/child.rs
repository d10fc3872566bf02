//! The worker side (`lib/internal/cluster/child.js`): `online`, servers that
//! listen through the primary (`queryServer`, round-robin `newconn`, shared
//! handles), and the worker's ways out (disconnect, destroy, a lost
//! channel).

use std::cell::RefCell;
use std::collections::{BTreeSet, HashMap};
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::rc::Rc;
use std::time::Duration;

use serde_json::{Map, Value, json};

use super::primary::ClusterError;
use super::protocol::{Act, AddressType, Query, QueryReply};
use super::worker::{Address, Side, Worker, WorkerState};
use crate::ipc::{Channel, ChannelOptions};
use crate::net::{
    BindCb, BindOptions, ClusterHook, ListenError, ListenOptions, Server, ServerAddress,
};
use crate::uv::{Handle, Loop, Socket, Stream, Timer};

struct Child {
    worker: Worker,
    channel: Channel,
    /// Servers by the key the primary gave them.
    handles: HashMap<String, Server>,
    /// Per `address:port:addressType:fd`: the next index and those in use.
    indexes: HashMap<String, (u64, BTreeSet<u64>)>,
    /// `destroy()` was called: exit once the channel is closed.
    destroying: bool,
    /// Answers to `newconn` held until the loop has polled again.
    late: LateAnswers,
}

/// Answers to `newconn` for a load-aware primary, sent once the loop has
/// been through its poll phase again, with one timer for all of them:
/// queued during an iteration, they move to `ready` when its timers run
/// (timers run last) and go out when the next iteration's do.
#[derive(Default)]
struct LateAnswers {
    waiting: Vec<(Server, Map<String, Value>)>,
    ready: Vec<(Server, Map<String, Value>)>,
    timer: Option<Handle<Timer>>,
}

type ChildRef = Rc<RefCell<Child>>;

thread_local! {
    static CHILD: RefCell<Option<ChildRef>> = const { RefCell::new(None) };
}

fn child() -> Option<ChildRef> {
    CHILD.with(|c| c.borrow().clone())
}

/// What the hook keeps on each server.
struct HookData {
    /// The primary's key, once the reply came.
    key: Option<String>,
    /// The primary asked for load reports (a load-aware policy).
    report_load: bool,
    /// A load report is scheduled for the next loop iteration.
    report_pending: bool,
    indexes_key: String,
    index: u64,
}

/// Sets this process up as a cluster worker (Node does this at bootstrap
/// when `NODE_UNIQUE_ID` is set): opens the IPC channel from
/// `NODE_CHANNEL_FD`, sends `online`, and makes every
/// [`net::Server::listen`](crate::net::Server::listen) on this thread go
/// through the primary. Returns `None` in a primary.
///
/// The worker then lives as long as its channel: if the channel closes
/// without a disconnect that either side asked for (the primary died), the
/// process exits with code 0, as a Node worker does.
///
/// Like Node's start-up (`src/node.cc`), it first marks every fd above 2
/// that the process inherited `FD_CLOEXEC`
/// ([`disable_stdio_inheritance`](crate::uv::disable_stdio_inheritance)), so
/// the worker's own children get only what it places for them.
///
/// # Errors
///
/// `NODE_UNIQUE_ID` without a usable `NODE_CHANNEL_FD`, or the channel's
/// own errors ([`Channel::from_env`]).
pub fn setup_worker(lp: &mut Loop) -> io::Result<Option<Worker>> {
    let Some(id) = super::worker_id() else {
        return Ok(None);
    };
    if let Some(c) = child() {
        return Ok(Some(c.borrow().worker.clone()));
    }
    crate::uv::disable_stdio_inheritance();
    let channel = Channel::from_env(lp, ChannelOptions::default())?.ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::NotFound,
            "NODE_UNIQUE_ID is set but NODE_CHANNEL_FD is not: not started by a cluster primary",
        )
    })?;
    let worker = Worker::new(id, Side::Child);
    {
        let mut w = worker.inner.borrow_mut();
        w.state = WorkerState::Online;
        w.channel = Some(channel.clone());
        w.pid = Some(std::process::id() as i32);
    }
    let state = Rc::new(RefCell::new(Child {
        worker: worker.clone(),
        channel: channel.clone(),
        handles: HashMap::new(),
        indexes: HashMap::new(),
        destroying: false,
        late: LateAnswers::default(),
    }));
    CHILD.with(|c| *c.borrow_mut() = Some(state.clone()));
    crate::net::set_cluster_hook(lp, Some(Rc::new(Hook)));

    let w = worker.clone();
    channel.on_message_raw(lp, move |lp, _, msg, h| {
        if !w.emit_message(lp, msg, h)
            && let Some(h) = h
        {
            lp.close_if_open(h);
        }
    });
    channel.on_internal(move |lp, _, msg, h| on_internal(lp, msg, h));
    let w = worker.clone();
    channel.on_error(move |lp, _, e| w.emit_error(lp, &ClusterError::Channel(e)));
    let w = worker.clone();
    channel.on_disconnect(move |lp, _| {
        let destroying = child().is_some_and(|c| c.borrow().destroying);
        w.inner.borrow_mut().state = WorkerState::Disconnected;
        w.emit_disconnect(lp);
        let planned = w.exited_after_disconnect() == Some(true);
        if destroying || !planned {
            // Node: a worker whose channel closes unexpectedly exits at
            // once; `destroy()` exits once disconnected.
            std::process::exit(0);
        }
        CHILD.with(|c| c.borrow_mut().take());
    });
    channel.send_cluster(lp, Act::Online.to_fields(), None, None)?;
    Ok(Some(worker))
}

struct Hook;

impl ClusterHook for Hook {
    fn listen(&self, lp: &mut Loop, server: Server, opts: &ListenOptions) {
        query_server(lp, &server, opts);
    }

    fn close(&self, lp: &mut Loop, server: Server) {
        server_closed(lp, &server);
    }

    fn bind_udp(&self, lp: &mut Loop, opts: &BindOptions, cb: BindCb) {
        query_udp(lp, opts, cb);
    }
}

/// `dgram.Socket.bind` in a worker: UDP is always a shared socket, bound by
/// the primary (`{addressType: "udp4", fd: -1, flags}`). The index stays
/// taken until the worker disconnects: closing the UDP handle does not tell
/// the primary (Node's `dgram` close does).
fn query_udp(lp: &mut Loop, opts: &BindOptions, cb: BindCb) {
    let fail = |lp: &mut Loop, cb: BindCb, errno: i32, address: Option<String>| {
        let e = ListenError::new(-(errno as i64), "bind", address, Some(opts.port as i64));
        crate::net::defer(lp, move |lp| cb(lp, Err(e)));
    };
    let Some(state) = child() else {
        return fail(lp, cb, nix::libc::ENOTCONN, None);
    };
    let address = opts
        .address
        .clone()
        .unwrap_or_else(|| if opts.ipv6 { "::" } else { "0.0.0.0" }.to_owned());
    let kind = if opts.ipv6 {
        AddressType::Udp6
    } else {
        AddressType::Udp4
    };
    let indexes_key = format!(
        "{address}:{}:{}:-1",
        opts.port,
        super::protocol::js_string(Some(&kind.to_wire()))
    );
    let index = {
        let mut st = state.borrow_mut();
        let entry = st.indexes.entry(indexes_key).or_default();
        let i = entry.0;
        entry.0 += 1;
        entry.1.insert(i);
        i
    };
    let q = Query {
        index,
        data: Value::Null,
        address: json!(address),
        port: json!(opts.port),
        address_type: kind.to_wire(),
        fd: Some(json!(-1)),
        flags: Some(json!(opts.wire_flags())),
        backlog: None,
        readable_all: None,
        writable_all: None,
        extra: Map::new(),
    };
    let channel = state.borrow().channel.clone();
    let port = opts.port as i64;
    let addr = address.clone();
    let cb = std::rc::Rc::new(std::cell::Cell::new(Some(cb)));
    let cb2 = cb.clone();
    let listening = q.clone();
    let sent = channel.send_cluster(
        lp,
        Act::QueryServer(q).to_fields(),
        None,
        Some(Box::new(move |lp, _, reply, handle| {
            let Some(cb) = cb2.take() else { return };
            let errno = QueryReply::parse(&reply)
                .and_then(|r| r.errno)
                .filter(|e| *e != 0);
            match (errno, handle) {
                (None, Some(Socket::Udp(u))) => {
                    let real_port = lp.udp_getsockname(u).map(|a| a.port()).ok();
                    cb(lp, Ok(u));
                    udp_listening(lp, listening, real_port);
                }
                (e, h) => {
                    if let Some(h) = h {
                        lp.close_if_open(h);
                    }
                    let errno = e.unwrap_or(-(nix::libc::EPROTO as i64));
                    cb(
                        lp,
                        Err(ListenError::new(errno, "bind", Some(addr), Some(port))),
                    );
                }
            }
        })),
    );
    if sent.is_err()
        && let Some(cb) = cb.take()
    {
        fail(lp, cb, nix::libc::ENOTCONN, Some(address));
    }
}

/// Node's `_getServer` once a dgram socket is bound: the worker is
/// `listening` and tells the primary, with the real port.
fn udp_listening(lp: &mut Loop, mut q: Query, real_port: Option<u16>) {
    let Some(state) = child() else { return };
    let (worker, channel) = {
        let st = state.borrow();
        (st.worker.clone(), st.channel.clone())
    };
    worker.inner.borrow_mut().state = WorkerState::Listening;
    if let Some(p) = real_port.filter(|p| *p != 0) {
        q.port = json!(p);
    }
    let addr = Address::from_query(&q);
    let _ = channel.send_cluster(lp, Act::Listening(q).to_fields(), None, None);
    worker.emit_listening(lp, &addr);
}

/// Node's `listenInCluster` + `cluster._getServer`.
fn query_server(lp: &mut Loop, server: &Server, opts: &ListenOptions) {
    let Some(state) = child() else {
        let e = ListenError::new(-(nix::libc::ENOTCONN as i64), "listen", None, None);
        let s = *server;
        crate::net::defer(lp, move |lp| s.finish_listen(lp, Err(e)));
        return;
    };
    let mut q = Query {
        index: 0,
        data: Value::Null,
        address: Value::Null,
        port: json!(opts.port),
        address_type: AddressType::Tcp4.to_wire(),
        fd: None,
        flags: None,
        backlog: Some(json!(opts.backlog.unwrap_or(0))),
        readable_all: None,
        writable_all: None,
        extra: Map::new(),
    };
    if let Some(path) = &opts.path {
        let abs = std::path::absolute(path).unwrap_or_else(|_| path.clone());
        q.address = json!(abs.to_string_lossy());
        q.port = json!(-1);
        q.address_type = AddressType::Unix.to_wire();
        if opts.readable_all {
            q.readable_all = Some(json!(true));
        }
        if opts.writable_all {
            q.writable_all = Some(json!(true));
        }
    } else if let Some(fd) = opts.fd {
        q.port = Value::Null;
        q.address_type = Value::Null;
        q.fd = Some(json!(fd));
    } else if let Some(host) = &opts.host {
        let ip: Option<IpAddr> = host.parse().ok();
        q.address = json!(host);
        q.address_type = match ip {
            Some(IpAddr::V6(_)) => AddressType::Tcp6.to_wire(),
            _ => AddressType::Tcp4.to_wire(),
        };
        q.flags = Some(json!(if opts.ipv6_only { 1 } else { 0 }));
    }
    // Node's indexesKey: [address, port, addressType, fd].join(':').
    let part = |v: Option<&Value>| match v {
        None | Some(Value::Null) => String::new(),
        Some(v) => super::protocol::js_string(Some(v)),
    };
    let indexes_key = format!(
        "{}:{}:{}:{}",
        part(Some(&q.address)),
        part(Some(&q.port)),
        part(Some(&q.address_type)),
        part(q.fd.as_ref())
    );
    let index = {
        let mut st = state.borrow_mut();
        let entry = st.indexes.entry(indexes_key.clone()).or_default();
        let i = entry.0;
        entry.0 += 1;
        entry.1.insert(i);
        i
    };
    q.index = index;
    server.with_hook_data(lp, |d| {
        *d = Some(Box::new(HookData {
            key: None,
            report_load: false,
            report_pending: false,
            indexes_key,
            index,
        }))
    });
    let backlog = opts.backlog_or_default();
    let requested_port = opts.port;
    let has_path = opts.path.clone();
    let channel = state.borrow().channel.clone();
    let s = *server;
    let query = q.clone();
    let sent = channel.send_cluster(
        lp,
        Act::QueryServer(q.clone()).to_fields(),
        None,
        Some(Box::new(move |lp, _, reply, handle| {
            on_query_reply(
                lp,
                &s,
                query,
                reply,
                handle,
                backlog,
                requested_port,
                has_path,
            );
        })),
    );
    if let Err(e) = sent {
        release_index(lp, server);
        let err = ListenError::new(
            -(e.raw_os_error().unwrap_or(nix::libc::ENOTCONN) as i64),
            "listen",
            None,
            Some(requested_port as i64),
        );
        let s = *server;
        crate::net::defer(lp, move |lp| s.finish_listen(lp, Err(err)));
    }
}

#[allow(clippy::too_many_arguments)]
fn on_query_reply(
    lp: &mut Loop,
    server: &Server,
    query: Query,
    reply: Value,
    handle: Option<Socket>,
    backlog: i32,
    requested_port: u16,
    path: Option<std::path::PathBuf>,
) {
    let address = query.address.as_str().map(str::to_owned);
    let port = query.port.as_i64();
    let Some(r) = QueryReply::parse(&reply) else {
        if let Some(h) = handle {
            lp.close_if_open(h);
        }
        release_index(lp, server);
        let e = ListenError::new(-(nix::libc::EPROTO as i64), "bind", address, port);
        server.finish_listen(lp, Err(e));
        return;
    };
    let errno = r.errno.filter(|e| *e != 0);
    if server.is_closing(lp) {
        if let Some(h) = handle {
            lp.close_if_open(h);
        }
        return;
    }
    if let Some(e) = errno {
        if let Some(h) = handle {
            lp.close_if_open(h);
        }
        release_index(lp, server);
        server.finish_listen(lp, Err(ListenError::new(e, "bind", address, port)));
        return;
    }
    let result = match handle {
        // Shared: listen on our copy of the primary's bound socket. libuv
        // defers EADDRINUSE from bind to listen, so the primary may have
        // replied errno 0 with an unbound socket: compare ports (Node's
        // checkBindError).
        Some(h) => {
            if let Socket::Tcp(t) = h
                && requested_port > 0
                && lp.tcp_getsockname(t).map(|a| a.port()).unwrap_or(0) != requested_port
            {
                lp.close_if_open(h);
                release_index(lp, server);
                let e = ListenError::new(-(nix::libc::EADDRINUSE as i64), "bind", address, port);
                server.finish_listen(lp, Err(e));
                return;
            }
            server.listen_on(lp, h, backlog, address.clone(), port)
        }
        // Round-robin: the primary accepts; connections arrive as newconn.
        None => {
            server.listen_remote(lp);
            let addr = match (&path, &r.sockname) {
                (Some(p), _) => ServerAddress::Unix(p.clone()),
                (None, Some(s)) => {
                    let ip = s
                        .get("address")
                        .and_then(Value::as_str)
                        .and_then(|a| a.parse().ok());
                    let port = s.get("port").and_then(Value::as_u64).unwrap_or(0) as u16;
                    ServerAddress::Inet(SocketAddr::new(
                        ip.unwrap_or(IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED)),
                        port,
                    ))
                }
                (None, None) => {
                    ServerAddress::Inet(SocketAddr::from(([0, 0, 0, 0], requested_port)))
                }
            };
            Ok(addr)
        }
    };
    match result {
        Ok(addr) => {
            let wants_load = reply.get("loadReports").and_then(Value::as_bool) == Some(true);
            server.with_hook_data(lp, |d| {
                if let Some(d) = d.as_mut().and_then(|d| d.downcast_mut::<HookData>()) {
                    d.key = Some(r.key.clone());
                    d.report_load = wants_load;
                }
            });
            if wants_load {
                server.set_on_ended(lp, schedule_load_report);
            }
            if let Some(state) = child() {
                state.borrow_mut().handles.insert(r.key.clone(), *server);
            }
            let real_port = addr.port().map(i64::from);
            // The user's listen callback runs before `listening` is sent.
            server.finish_listen(lp, Ok(addr));
            if let Some(state) = child() {
                let (worker, channel) = {
                    let st = state.borrow();
                    (st.worker.clone(), st.channel.clone())
                };
                worker.inner.borrow_mut().state = WorkerState::Listening;
                let mut q = query;
                if let Some(p) = real_port.filter(|p| *p != 0) {
                    q.port = json!(p);
                }
                let addr = Address::from_query(&q);
                let _ = channel.send_cluster(lp, Act::Listening(q).to_fields(), None, None);
                worker.emit_listening(lp, &addr);
            }
        }
        Err(e) => {
            release_index(lp, server);
            server.finish_listen(lp, Err(e));
        }
    }
}

fn reports_load(lp: &mut Loop, server: &Server) -> bool {
    server.with_hook_data(lp, |d| {
        d.as_ref()
            .and_then(|d| d.downcast_ref::<HookData>())
            .is_some_and(|d| d.report_load)
    })
}

/// A connection of a load-reporting server ended: report the new count
/// once per loop iteration at most (`{act: "load"}`), so a burst of closes
/// costs one message.
fn schedule_load_report(lp: &mut Loop, server: Server) {
    let schedule = server.with_hook_data(lp, |d| {
        match d.as_mut().and_then(|d| d.downcast_mut::<HookData>()) {
            Some(d) if d.report_load && !d.report_pending && d.key.is_some() => {
                d.report_pending = true;
                true
            }
            _ => false,
        }
    });
    if !schedule {
        return;
    }
    let s = server;
    crate::net::defer(lp, move |lp| {
        let key = s.with_hook_data(lp, |d| {
            let d = d.as_mut().and_then(|d| d.downcast_mut::<HookData>())?;
            d.report_pending = false;
            d.key.clone()
        });
        // An answer on its way carries a newer count.
        let key = key.filter(|_| !answer_pending(&s));
        if let (Some(key), Some(state)) = (key, child()) {
            let channel = state.borrow().channel.clone();
            if channel.is_connected() {
                let load = s.connections(lp) as u64;
                let _ = channel.send_cluster(lp, Act::Load { key, load }.to_fields(), None, None);
            }
        }
    });
}

fn release_index(lp: &mut Loop, server: &Server) {
    let data = server.with_hook_data(lp, |d| d.take());
    let Some(data) = data.and_then(|d| d.downcast::<HookData>().ok()) else {
        return;
    };
    if let Some(state) = child() {
        let mut st = state.borrow_mut();
        if let Some(key) = &data.key {
            st.handles.remove(key);
        }
        if let Some(entry) = st.indexes.get_mut(&data.indexes_key) {
            entry.1.remove(&data.index);
            if entry.1.is_empty() {
                st.indexes.remove(&data.indexes_key);
            }
        }
    }
}

/// A server in this worker closed: tell the primary and free its index.
fn server_closed(lp: &mut Loop, server: &Server) {
    let key = server.with_hook_data(lp, |d| {
        d.as_ref()
            .and_then(|d| d.downcast_ref::<HookData>())
            .and_then(|d| d.key.clone())
    });
    release_index(lp, server);
    if let (Some(key), Some(state)) = (key, child()) {
        let channel = state.borrow().channel.clone();
        if channel.is_connected() {
            let _ = channel.send_cluster(lp, Act::Close { key }.to_fields(), None, None);
        }
    }
}

fn on_internal(lp: &mut Loop, msg: Value, handle: Option<Socket>) {
    let Some(state) = child() else {
        if let Some(h) = handle {
            lp.close_if_open(h);
        }
        return;
    };
    match Act::parse(&msg) {
        Some(Act::NewConn { key }) => {
            let seq = msg.get("seq").cloned().unwrap_or(Value::Null);
            let (server, channel) = {
                let st = state.borrow();
                (st.handles.get(&key).cloned(), st.channel.clone())
            };
            let conn = match handle.map(Stream::try_from) {
                Some(Ok(c)) => Some(c),
                Some(Err(other)) => {
                    lp.close_if_open(other.0);
                    None
                }
                None => None,
            };
            let accepted = match (server, conn) {
                (Some(s), Some(c)) => {
                    if s.deliver(lp, c) {
                        true
                    } else {
                        lp.close_if_open(c);
                        false
                    }
                }
                (None, Some(c)) => {
                    lp.close_if_open(c);
                    false
                }
                _ => false,
            };
            let mut m = Map::new();
            m.insert("ack".into(), seq);
            m.insert("accepted".into(), accepted.into());
            let server = state.borrow().handles.get(&key).cloned();
            if let Some(s) = server.filter(|s| accepted && reports_load(lp, s)) {
                // Beyond Node: a load-aware primary hears back only after
                // this loop has polled again, with the open-connection
                // count then. The new connection's first request was
                // already waiting, so it has been handled by then: a
                // handler that keeps the loop busy keeps the answer back,
                // and the primary sends the next connection elsewhere.
                answer_after_next_poll(lp, &state, s, m);
                return;
            }
            let _ = channel.send_cluster(lp, m, None, None);
        }
        Some(Act::Disconnect) => {
            let worker = state.borrow().worker.clone();
            close_servers_then(lp, &worker, true);
        }
        _ => {
            // Node ignores cluster messages it does not know.
            if let Some(h) = handle {
                lp.close_if_open(h);
            }
        }
    }
}

/// Whether an answer for `server` is waiting in [`LateAnswers`].
fn answer_pending(server: &Server) -> bool {
    child().is_some_and(|c| {
        let c = c.borrow();
        (c.late.waiting.iter())
            .chain(&c.late.ready)
            .any(|(s, _)| s == server)
    })
}

/// Queues the answer `m` for `server` (see [`LateAnswers`]); its `load`
/// is the count when it goes out.
fn answer_after_next_poll(lp: &mut Loop, state: &ChildRef, server: Server, m: Map<String, Value>) {
    let start = {
        let mut c = state.borrow_mut();
        let late = &mut c.late;
        let idle = late.waiting.is_empty() && late.ready.is_empty();
        late.waiting.push((server, m));
        idle.then(|| *late.timer.get_or_insert_with(|| lp.timer_init()))
    };
    if let Some(t) = start {
        let _ = lp.timer_start(t, Duration::ZERO, Duration::ZERO, late_answers_due);
    }
}

/// The late-answer timer: sends what was queued an iteration ago, and
/// waits one more iteration for what was queued in this one.
fn late_answers_due(lp: &mut Loop, timer: Handle<Timer>) {
    let Some(state) = child() else { return };
    let (due, channel, more) = {
        let mut c = state.borrow_mut();
        let waiting = std::mem::take(&mut c.late.waiting);
        let due = std::mem::replace(&mut c.late.ready, waiting);
        (due, c.channel.clone(), !c.late.ready.is_empty())
    };
    for (s, mut m) in due {
        m.insert("load".into(), (s.connections(lp) as u64).into());
        let _ = channel.send_cluster(lp, m, None, None);
    }
    if more {
        // A timer started by a timer callback waits for the next iteration.
        let _ = lp.timer_start(timer, Duration::ZERO, Duration::ZERO, late_answers_due);
    }
}

/// Node's `_disconnect`: close every server (waiting for their
/// connections), then either close the channel (primary-initiated) or tell
/// the primary first with `exitedAfterDisconnect`.
fn close_servers_then(lp: &mut Loop, worker: &Worker, primary_initiated: bool) {
    worker.inner.borrow_mut().exited_after_disconnect = Some(true);
    let Some(state) = child() else { return };
    let servers: Vec<Server> = state.borrow().handles.values().cloned().collect();
    let waiting = Rc::new(std::cell::Cell::new(servers.len() + 1));
    let done = {
        let waiting = waiting.clone();
        let state = state.clone();
        Rc::new(move |lp: &mut Loop| {
            waiting.set(waiting.get() - 1);
            if waiting.get() != 0 {
                return;
            }
            let channel = state.borrow().channel.clone();
            // Primary-initiated: just close. Otherwise tell the primary first
            // (or close at once if that cannot be sent).
            if primary_initiated || tell_primary_then_disconnect(lp, &channel).is_err() {
                channel.disconnect(lp);
            }
        })
    };
    for s in servers {
        let d = done.clone();
        s.close(lp, move |lp, _| d(lp));
    }
    done(lp);
}

/// `cluster.worker.disconnect()` inside the worker.
pub(crate) fn disconnect_self(lp: &mut Loop, w: &Worker) {
    {
        let mut i = w.inner.borrow_mut();
        if i.state == WorkerState::Disconnecting || i.state == WorkerState::Disconnected {
            return;
        }
        i.state = WorkerState::Disconnecting;
    }
    close_servers_then(lp, w, false);
}

/// `cluster.worker.destroy()` / `kill()` inside the worker: tell the
/// primary, close the channel, exit 0.
pub(crate) fn destroy_self(lp: &mut Loop, w: &Worker) {
    w.inner.borrow_mut().exited_after_disconnect = Some(true);
    let Some(state) = child() else {
        std::process::exit(0);
    };
    let channel = state.borrow().channel.clone();
    if !channel.is_connected() {
        std::process::exit(0);
    }
    state.borrow_mut().destroying = true;
    w.inner.borrow_mut().state = WorkerState::Disconnecting;
    if tell_primary_then_disconnect(lp, &channel).is_err() {
        std::process::exit(0);
    }
}

/// Sends `exitedAfterDisconnect` and closes the channel once the primary
/// acknowledges it.
fn tell_primary_then_disconnect(lp: &mut Loop, channel: &Channel) -> io::Result<u64> {
    let ch = channel.clone();
    channel.send_cluster(
        lp,
        Act::ExitedAfterDisconnect.to_fields(),
        None,
        Some(Box::new(move |lp, _, _, _| ch.disconnect(lp))),
    )
}
