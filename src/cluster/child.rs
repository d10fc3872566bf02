//! The worker side (`lib/internal/cluster/child.js`): `online`, servers that
//! listen through the primary (`queryServer`, round-robin `newconn`, shared
//! handles), and the worker's ways out (disconnect, destroy, a lost
//! channel).

use std::collections::{BTreeSet, HashMap};
use std::io;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::rc::Rc;
use std::time::Duration;

use serde_json::Value;

use super::error::ClusterError;
use super::protocol::{
    self, AcceptReply, Act, AddressType, Grant, Parsed, Query, QueryReply, Received, Sockname,
};
use super::worker::{Address, ExitRequest, Worker, WorkerState, rec_mut};
use super::{ClusterContext, Side};
use crate::ipc::{Channel, ChannelOptions};
use crate::net::{
    BindCb, BindOptions, ClusterHook, ListenError, ListenOptions, Server, ServerAddress, defer,
};
use crate::uv::{Errno, Handle, Loop, Socket, Stream, Timer};

/// The worker side's state, kept in the cluster's context
/// ([`ClusterContext`]) from [`setup_worker`] until the channel to the
/// primary closes (Node's `child.js` module state).
pub(crate) struct ChildState {
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
    /// UDP binds waiting for the primary's reply, by request number (the
    /// reply callback holds the number; a send that fails finds the bind
    /// callback here).
    binds: HashMap<u64, BindCb>,
    next_bind: u64,
    /// A disconnect waiting for the worker's servers to close: how many
    /// are still closing, and whether the primary asked for it.
    closing: Option<(usize, bool)>,
}

/// Answers to `newconn` for a load-aware primary, sent once the loop has
/// been through its poll phase again, with one timer for all of them:
/// queued during an iteration, they move to `ready` when its timers run
/// (timers run last) and go out when the next iteration's do.
#[derive(Default)]
struct LateAnswers {
    /// Each server with the `seq` of the `newconn` answered.
    waiting: Vec<(Server, Option<u64>)>,
    ready: Vec<(Server, Option<u64>)>,
    timer: Option<Handle<Timer>>,
}

fn child(lp: &Loop) -> Option<&ChildState> {
    lp.context::<ClusterContext>()?.child.as_ref()
}

fn child_mut(lp: &mut Loop) -> Option<&mut ChildState> {
    lp.context_mut::<ClusterContext>().child.as_mut()
}

/// The channel to the primary, while the worker side is set up.
fn channel(lp: &Loop) -> Option<Channel> {
    child(lp).map(|c| c.channel)
}

/// The worker side ends (its channel closed): its state goes.
fn drop_child(lp: &mut Loop) {
    lp.context_mut::<ClusterContext>().child = None;
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
/// process exits with code 0, as a Node worker does, unless
/// [`Worker::on_exit_request`] says otherwise.
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
    let Some(id) = super::worker_id(lp) else {
        return Ok(None);
    };
    if let Some(c) = child(lp) {
        return Ok(Some(c.worker));
    }
    crate::uv::disable_stdio_inheritance();
    let channel = Channel::from_env(lp, ChannelOptions::default())?.ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::NotFound,
            "NODE_UNIQUE_ID is set but NODE_CHANNEL_FD is not: not started by a cluster primary",
        )
    })?;
    let worker = Worker::new(lp, id, Side::Child);
    if let Some(w) = rec_mut(lp, worker) {
        w.state = WorkerState::Online;
        w.channel = Some(channel);
        w.pid = Some(std::process::id() as i32);
    }
    lp.context_mut::<ClusterContext>().child = Some(ChildState {
        worker,
        channel,
        handles: HashMap::new(),
        indexes: HashMap::new(),
        destroying: false,
        late: LateAnswers::default(),
        binds: HashMap::new(),
        next_bind: 0,
        closing: None,
    });
    crate::net::set_cluster_hook(lp, Some(Rc::new(Hook)));
    listen_to_primary(lp, worker, channel);
    channel.send_cluster(lp, Act::Online.to_fields(), None, None)?;
    Ok(Some(worker))
}

/// Node's `process.on('message')`, `on('internalMessage')` and
/// `once('disconnect')` in a worker: routes what the channel delivers.
fn listen_to_primary(lp: &mut Loop, worker: Worker, channel: Channel) {
    channel.on_message_raw(lp, move |lp, _, msg, h| {
        if !worker.emit_message(lp, msg, h)
            && let Some(h) = h
        {
            lp.close_if_open(h);
        }
    });
    channel.on_internal(lp, move |lp, _, msg, h| on_internal(lp, msg, h));
    // The round-robin hot path: `newconn` in Node's shape, read without a
    // `Value` (any other shape reaches `on_internal`).
    channel.on_newconn(lp, move |lp, _, key, seq, h| {
        if child(lp).is_some() {
            on_connection(lp, key, Some(seq), Some(h));
        } else {
            lp.close_if_open(h);
        }
    });
    channel.on_error(lp, move |lp, _, e| {
        worker.emit_error(lp, &ClusterError::Channel(e))
    });
    channel.on_disconnect(lp, move |lp, _| channel_closed(lp, worker));
}

struct Hook;

impl ClusterHook for Hook {
    fn listen(&self, lp: &mut Loop, server: Server, opts: &ListenOptions) {
        query_server(lp, server, opts);
    }

    fn close(&self, lp: &mut Loop, server: Server) {
        server_closed(lp, server);
    }

    fn bind_udp(&self, lp: &mut Loop, opts: &BindOptions, cb: BindCb) {
        query_udp(lp, opts, cb);
    }
}

/// The channel to the primary closed (Node's `process.once('disconnect')`
/// in `_setupWorker`, and `destroy`'s). A worker whose channel closes
/// without a disconnect it knew of (the primary died), or that is being
/// destroyed, ends its process: `process.exit(0)` in Node, the worker's
/// [exit request](Worker::on_exit_request) here.
fn channel_closed(lp: &mut Loop, w: Worker) {
    let destroying = child(lp).is_some_and(|c| c.destroying);
    w.set_state(lp, WorkerState::Disconnected);
    w.emit_disconnect(lp);
    let planned = w.exited_after_disconnect(lp) == Some(true);
    drop_child(lp);
    if destroying {
        w.request_exit(lp, ExitRequest::Destroyed);
    } else if !planned {
        w.request_exit(lp, ExitRequest::ChannelLost);
    }
}

/// `dgram.Socket.bind` in a worker: UDP is always a shared socket, bound by
/// the primary (`{addressType: "udp4", fd: -1, flags}`). The index stays
/// taken until the worker disconnects: closing the UDP handle does not tell
/// the primary (Node's `dgram` close does).
fn query_udp(lp: &mut Loop, opts: &BindOptions, cb: BindCb) {
    let port = Some(opts.port as i64);
    let fail = |lp: &mut Loop, cb: BindCb, errno: Errno, address: Option<String>| {
        let e = ListenError::new(errno, "bind", address, port);
        defer(lp, move |lp| cb(lp, Err(e)));
    };
    let Some(c) = child_mut(lp) else {
        return fail(lp, cb, Errno::ENOTCONN, None);
    };
    let mut q = udp_query(opts);
    q.index = take_index(c, &q.indexes_key());
    // The bind callback waits in the child state: the reply callback is
    // dropped if the send fails, and the bind must be answered all the same.
    let bind = c.next_bind;
    c.next_bind += 1;
    c.binds.insert(bind, cb);
    let channel = c.channel;
    let address = q.address.clone();
    let listening = q.clone();
    let sent = channel.send_cluster(
        lp,
        Act::QueryServer(q).to_fields(),
        None,
        Some(Box::new(move |lp, _, reply, handle| {
            if let Some(cb) = child_mut(lp).and_then(|c| c.binds.remove(&bind)) {
                on_udp_reply(lp, cb, listening, &reply, handle);
            }
        })),
    );
    if sent.is_err()
        && let Some(cb) = child_mut(lp).and_then(|c| c.binds.remove(&bind))
    {
        fail(lp, cb, Errno::ENOTCONN, address);
    }
}

/// Node's query for a dgram socket (`dgram.js` `_getServer` arguments).
fn udp_query(opts: &BindOptions) -> Query {
    let address = opts
        .address
        .clone()
        .unwrap_or_else(|| if opts.ipv6 { "::" } else { "0.0.0.0" }.to_owned());
    Query {
        index: 0,
        data: Value::Null,
        address: Some(address),
        port: Some(opts.port.into()),
        address_type: if opts.ipv6 {
            AddressType::Udp6
        } else {
            AddressType::Udp4
        },
        fd: Some(-1),
        flags: Some(opts.wire_flags() as u32),
        backlog: None,
        readable_all: false,
        writable_all: false,
    }
}

/// The primary answered a dgram `queryServer`: the bound socket, or the
/// errno (`EPROTO` for a reply that does not parse, or that grants no
/// UDP socket).
fn on_udp_reply(lp: &mut Loop, cb: BindCb, q: Query, reply: &Value, handle: Option<Socket>) {
    let reply = QueryReply::from_wire(reply, handle.is_some()).map(|r| r.result);
    match (reply, handle) {
        (Ok(Ok(Grant::Shared)), Some(Socket::Udp(u))) => {
            let real_port = lp.udp_getsockname(u).map(|a| a.port()).ok();
            cb(lp, Ok(u));
            udp_listening(lp, q, real_port);
        }
        (reply, h) => {
            if let Some(h) = h {
                lp.close_if_open(h);
            }
            let errno = match reply {
                Ok(Err(e)) => e,
                _ => Errno::EPROTO,
            };
            cb(lp, Err(ListenError::new(errno, "bind", q.address, q.port)));
        }
    }
}

/// Takes the next index among the servers at `indexes_key` (Node's
/// `indexSet.nextIndex++`).
fn take_index(c: &mut ChildState, indexes_key: &str) -> u64 {
    let entry = c.indexes.entry(indexes_key.to_owned()).or_default();
    let i = entry.0;
    entry.0 += 1;
    entry.1.insert(i);
    i
}

/// Node's `_getServer` once a dgram socket is bound: the worker is
/// `listening` and tells the primary, with the real port.
fn udp_listening(lp: &mut Loop, mut q: Query, real_port: Option<u16>) {
    if let Some(p) = real_port.filter(|p| *p != 0) {
        q.port = Some(p.into());
    }
    announce_listening(lp, q);
}

/// The worker is `listening`: tell the primary (with the real port), then
/// run the worker's `listening` callback.
fn announce_listening(lp: &mut Loop, q: Query) {
    let Some((worker, channel)) = child(lp).map(|c| (c.worker, c.channel)) else {
        return;
    };
    worker.set_state(lp, WorkerState::Listening);
    let addr = Address::from_query(&q);
    let _ = channel.send_cluster(lp, Act::Listening(q).to_fields(), None, None);
    worker.emit_listening(lp, &addr);
}

/// What a `listen` through the primary waits with for the reply.
struct PendingListen {
    server: Server,
    /// The query sent (its `listening` follows).
    query: Query,
    backlog: i32,
    requested_port: u16,
    /// A Unix socket path, as given.
    path: Option<PathBuf>,
}

impl PendingListen {
    /// The address for errors.
    fn address(&self) -> Option<String> {
        self.query.address.clone()
    }

    /// Fails the listen: the index is free again.
    fn fail(self, lp: &mut Loop, errno: Errno) {
        release_index(lp, self.server);
        let e = ListenError::new(errno, "bind", self.address(), self.query.port);
        self.server.finish_listen(lp, Err(e));
    }
}

/// Node's `listenInCluster` + `cluster._getServer`: take an index, ask
/// the primary, and listen as its reply says ([`on_query_reply`]).
fn query_server(lp: &mut Loop, server: Server, opts: &ListenOptions) {
    let Some((q, channel)) = indexed_query(lp, server, opts) else {
        return fail_listen_later(lp, server, Errno::ENOTCONN, None);
    };
    let pending = PendingListen {
        server,
        query: q.clone(),
        backlog: opts.backlog_or_default(),
        requested_port: opts.port,
        path: opts.path.clone(),
    };
    let sent = channel.send_cluster(
        lp,
        Act::QueryServer(q).to_fields(),
        None,
        Some(Box::new(move |lp, _, reply, handle| {
            on_query_reply(lp, pending, &reply, handle);
        })),
    );
    if let Err(e) = sent {
        release_index(lp, server);
        let errno = Errno::of(&e).unwrap_or(Errno::ENOTCONN);
        fail_listen_later(lp, server, errno, Some(opts.port as i64));
    }
}

/// The query for `opts` with the next free index (kept on the server as
/// its [`HookData`]), and the channel to send it on; `None` when the
/// worker side is not set up.
fn indexed_query(lp: &mut Loop, server: Server, opts: &ListenOptions) -> Option<(Query, Channel)> {
    let c = child_mut(lp)?;
    let mut q = server_query(opts);
    let indexes_key = q.indexes_key();
    q.index = take_index(c, &indexes_key);
    let channel = c.channel;
    let index = q.index;
    server.with_hook_data(lp, |d| {
        *d = Some(Box::new(HookData {
            key: None,
            report_load: false,
            report_pending: false,
            indexes_key,
            index,
        }))
    });
    Some((q, channel))
}

/// Fails `server`'s listen from the loop (never inside `listen`).
fn fail_listen_later(lp: &mut Loop, server: Server, errno: Errno, port: Option<i64>) {
    let e = ListenError::new(errno, "listen", None, port);
    defer(lp, move |lp| server.finish_listen(lp, Err(e)));
}

/// Node's `serverQuery` for these listen options (`net.js`
/// `listenInCluster`): a port (`addressType` 4 with no host), a host and
/// port, a Unix socket path (made absolute), or an fd.
fn server_query(opts: &ListenOptions) -> Query {
    let mut q = Query {
        index: 0,
        data: Value::Null,
        address: None,
        port: Some(opts.port.into()),
        address_type: AddressType::Tcp4,
        fd: None,
        flags: None,
        backlog: Some(opts.backlog.unwrap_or(0)),
        readable_all: false,
        writable_all: false,
    };
    if let Some(path) = &opts.path {
        let abs = std::path::absolute(path).unwrap_or_else(|_| path.clone());
        q.address = Some(abs.to_string_lossy().into_owned());
        q.port = Some(-1);
        q.address_type = AddressType::Unix;
        q.readable_all = opts.readable_all;
        q.writable_all = opts.writable_all;
    } else if let Some(fd) = opts.fd {
        q.port = None;
        q.address_type = AddressType::Fd;
        q.fd = Some(fd.into());
    } else if let Some(host) = &opts.host {
        q.address = Some(host.clone());
        q.address_type = match host.parse() {
            Ok(IpAddr::V6(_)) => AddressType::Tcp6,
            _ => AddressType::Tcp4,
        };
        q.flags = Some(u32::from(opts.ipv6_only));
    }
    q
}

/// The primary answered a `queryServer`: listen as it says (`child.js`
/// `shared` or `rr`), or fail.
fn on_query_reply(lp: &mut Loop, p: PendingListen, reply: &Value, handle: Option<Socket>) {
    let reply = QueryReply::from_wire(reply, handle.is_some());
    if reply.is_ok() && p.server.is_closing(lp) {
        if let Some(h) = handle {
            lp.close_if_open(h);
        }
        return;
    }
    let (grant, key) = match reply {
        Ok(QueryReply {
            result: Ok(grant),
            key,
            ..
        }) => (grant, key),
        failed => {
            if let Some(h) = handle {
                lp.close_if_open(h);
            }
            let errno = match failed {
                Ok(QueryReply { result: Err(e), .. }) => e,
                _ => Errno::EPROTO,
            };
            return p.fail(lp, errno);
        }
    };
    let (result, load_reports) = match (grant, handle) {
        (Grant::Shared, Some(h)) => (listen_shared(lp, &p, h), false),
        (
            Grant::RoundRobin {
                sockname,
                load_reports,
            },
            _,
        ) => (Ok(listen_round_robin(lp, &p, sockname)), load_reports),
        (Grant::Shared, None) => unreachable!("a shared grant comes with its handle"),
    };
    match result {
        Ok(addr) => listening(lp, p, key, addr, load_reports),
        Err(Some(e)) => {
            release_index(lp, p.server);
            p.server.finish_listen(lp, Err(e));
        }
        Err(None) => p.fail(lp, Errno::EADDRINUSE),
    }
}

/// Shared: listen on our copy of the primary's bound socket. libuv defers
/// `EADDRINUSE` from bind to listen, so the primary may have replied
/// errno 0 with an unbound socket: compare ports (Node's
/// `checkBindError`); `Err(None)` then.
fn listen_shared(
    lp: &mut Loop,
    p: &PendingListen,
    h: Socket,
) -> Result<ServerAddress, Option<ListenError>> {
    if let Socket::Tcp(t) = h
        && p.requested_port > 0
        && lp.tcp_getsockname(t).map(|a| a.port()).unwrap_or(0) != p.requested_port
    {
        lp.close_if_open(h);
        return Err(None);
    }
    p.server
        .listen_on(lp, h, p.backlog, p.address(), p.query.port)
        .map_err(Some)
}

/// Round-robin: the primary accepts; connections arrive as `newconn`. The
/// server's address is the listener's (TCP), or the path.
fn listen_round_robin(
    lp: &mut Loop,
    p: &PendingListen,
    sockname: Option<Sockname>,
) -> ServerAddress {
    p.server.listen_remote(lp);
    match (&p.path, sockname) {
        (Some(path), _) => ServerAddress::Unix(path.clone()),
        (None, Some(Sockname(addr))) => ServerAddress::Inet(addr),
        (None, None) => ServerAddress::Inet(SocketAddr::new(
            Ipv4Addr::UNSPECIFIED.into(),
            p.requested_port,
        )),
    }
}

/// The server listens: remember its key, run the user's listen callback,
/// then tell the primary (`listening`, with the real port), as Node does
/// in that order.
fn listening(lp: &mut Loop, p: PendingListen, key: String, addr: ServerAddress, load: bool) {
    let PendingListen {
        server, mut query, ..
    } = p;
    server.with_hook_data(lp, |d| {
        if let Some(d) = d.as_mut().and_then(|d| d.downcast_mut::<HookData>()) {
            d.key = Some(key.clone());
            d.report_load = load;
        }
    });
    if load {
        server.set_on_ended(lp, schedule_load_report);
    }
    if let Some(c) = child_mut(lp) {
        c.handles.insert(key, server);
    }
    let real_port = addr.port();
    server.finish_listen(lp, Ok(addr));
    if let Some(p) = real_port.filter(|p| *p != 0) {
        query.port = Some(p.into());
    }
    announce_listening(lp, query);
}

fn reports_load(lp: &mut Loop, server: Server) -> bool {
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
    if schedule {
        defer(lp, move |lp| send_load_report(lp, server));
    }
}

/// Sends `server`'s count of open connections to the primary, unless an
/// answer on its way carries a newer one.
fn send_load_report(lp: &mut Loop, server: Server) {
    let key = server.with_hook_data(lp, |d| {
        let d = d.as_mut().and_then(|d| d.downcast_mut::<HookData>())?;
        d.report_pending = false;
        d.key.clone()
    });
    let key = key.filter(|_| !answer_pending(lp, server));
    if let (Some(key), Some(channel)) = (key, channel(lp))
        && channel.is_connected(lp)
    {
        let load = server.connections(lp) as u64;
        let _ = channel.send_cluster(lp, Act::Load { key, load }.to_fields(), None, None);
    }
}

fn release_index(lp: &mut Loop, server: Server) {
    let data = server.with_hook_data(lp, |d| d.take());
    let Some(data) = data.and_then(|d| d.downcast::<HookData>().ok()) else {
        return;
    };
    let Some(c) = child_mut(lp) else { return };
    if let Some(key) = &data.key {
        c.handles.remove(key);
    }
    if let Some(entry) = c.indexes.get_mut(&data.indexes_key) {
        entry.1.remove(&data.index);
        if entry.1.is_empty() {
            c.indexes.remove(&data.indexes_key);
        }
    }
}

/// A server in this worker closed: tell the primary and free its index.
fn server_closed(lp: &mut Loop, server: Server) {
    let key = server.with_hook_data(lp, |d| {
        d.as_ref()
            .and_then(|d| d.downcast_ref::<HookData>())
            .and_then(|d| d.key.clone())
    });
    release_index(lp, server);
    if let (Some(key), Some(channel)) = (key, channel(lp))
        && channel.is_connected(lp)
    {
        let _ = channel.send_cluster(lp, Act::Close { key }.to_fields(), None, None);
    }
}

/// The primary's cluster messages to a worker (Node's `child.js`
/// `onmessage`): `newconn` and `disconnect`.
fn on_internal(lp: &mut Loop, msg: Value, handle: Option<Socket>) {
    let set_up = child(lp).map(|c| c.worker);
    match (protocol::parse(&msg), set_up) {
        (
            Parsed::Message(Received {
                act: Act::NewConn { key },
                seq,
            }),
            Some(_),
        ) => on_connection(lp, &key, seq, handle),
        (
            Parsed::Message(Received {
                act: Act::Disconnect,
                ..
            }),
            Some(worker),
        ) => close_servers_then(lp, worker, true),
        _ => {
            // Node ignores cluster messages it does not know.
            if let Some(h) = handle {
                lp.close_if_open(h);
            }
        }
    }
}

/// Node's `onconnection`: a round-robin connection for the server `key`.
/// It is accepted unless the server is gone, closed or full, and the
/// primary told (`{ack, accepted}`).
fn on_connection(lp: &mut Loop, key: &str, seq: Option<u64>, handle: Option<Socket>) {
    let server = child(lp).and_then(|c| c.handles.get(key).copied());
    let accepted = deliver(lp, server, handle);
    let server = child(lp).and_then(|c| c.handles.get(key).copied());
    if let Some(s) = server.filter(|s| accepted && reports_load(lp, *s)) {
        // Beyond Node: a load-aware primary hears back only after
        // this loop has polled again, with the open-connection
        // count then. The new connection's first request was
        // already waiting, so it has been handled by then: a
        // handler that keeps the loop busy keeps the answer back,
        // and the primary sends the next connection elsewhere.
        answer_after_next_poll(lp, s, seq);
        return;
    }
    let reply = AcceptReply {
        accepted,
        load: None,
    };
    if let Some(channel) = channel(lp) {
        send_accept_reply(lp, channel, reply, seq);
    }
}

/// Sends `{"cmd":"NODE_CLUSTER","ack":seq,"accepted":..,"seq":n}` (with
/// `load` when there is one), written field by field.
fn send_accept_reply(lp: &mut Loop, channel: Channel, reply: AcceptReply, seq: Option<u64>) {
    let mut buf = [0; 96];
    let n = reply.write_fields(seq, &mut buf);
    let _ = channel.send_cluster_json(lp, &buf[..n]);
}

/// Hands the connection that came with a `newconn` to its server
/// ([`Server::deliver`], which runs the user's connection callback);
/// whether the server took it. One it did not take is closed.
fn deliver(lp: &mut Loop, server: Option<Server>, handle: Option<Socket>) -> bool {
    let conn = match handle.map(Stream::try_from) {
        Some(Ok(c)) => c,
        Some(Err(other)) => {
            lp.close_if_open(other.0);
            return false;
        }
        None => return false,
    };
    if let Some(s) = server
        && s.deliver(lp, conn)
    {
        return true;
    }
    lp.close_if_open(conn);
    false
}

/// Whether an answer for `server` is waiting in [`LateAnswers`].
fn answer_pending(lp: &Loop, server: Server) -> bool {
    child(lp).is_some_and(|c| {
        (c.late.waiting.iter())
            .chain(&c.late.ready)
            .any(|(s, _)| *s == server)
    })
}

/// Queues the answer to `newconn` `seq` for `server` (see
/// [`LateAnswers`]): accepted, with the count of open connections when it
/// goes out.
fn answer_after_next_poll(lp: &mut Loop, server: Server, seq: Option<u64>) {
    let Some(c) = child_mut(lp) else { return };
    let late = &mut c.late;
    let idle = late.waiting.is_empty() && late.ready.is_empty();
    late.waiting.push((server, seq));
    if !idle {
        return;
    }
    let t = match late.timer {
        Some(t) => t,
        None => {
            let t = lp.timer_init();
            if let Some(c) = child_mut(lp) {
                c.late.timer = Some(t);
            }
            t
        }
    };
    let _ = lp.timer_start(t, Duration::ZERO, Duration::ZERO, late_answers_due);
}

/// The late-answer timer: sends what was queued an iteration ago, and
/// waits one more iteration for what was queued in this one.
fn late_answers_due(lp: &mut Loop, timer: Handle<Timer>) {
    let Some(c) = child_mut(lp) else { return };
    let waiting = std::mem::take(&mut c.late.waiting);
    let due = std::mem::replace(&mut c.late.ready, waiting);
    let (channel, more) = (c.channel, !c.late.ready.is_empty());
    for (s, seq) in due {
        let reply = AcceptReply {
            accepted: true,
            load: Some(s.connections(lp) as u64),
        };
        send_accept_reply(lp, channel, reply, seq);
    }
    if more {
        // A timer started by a timer callback waits for the next iteration.
        let _ = lp.timer_start(timer, Duration::ZERO, Duration::ZERO, late_answers_due);
    }
}

/// Node's `_disconnect`: close every server (waiting for their
/// connections), then either close the channel (primary-initiated) or tell
/// the primary first with `exitedAfterDisconnect`.
fn close_servers_then(lp: &mut Loop, worker: Worker, primary_initiated: bool) {
    worker.set_exited_after_disconnect(lp, true);
    let Some(c) = child_mut(lp) else { return };
    let servers: Vec<Server> = c.handles.values().copied().collect();
    c.closing = Some((servers.len() + 1, primary_initiated));
    for s in servers {
        s.close(lp, move |lp, _| server_closed_for_disconnect(lp));
    }
    server_closed_for_disconnect(lp);
}

/// One more server closed during a disconnect (or the disconnect's own
/// start); once none is left, the channel goes. Primary-initiated: just
/// close it. Otherwise tell the primary first (or close at once if that
/// cannot be sent).
fn server_closed_for_disconnect(lp: &mut Loop) {
    let Some(c) = child_mut(lp) else { return };
    let Some((left, primary_initiated)) = c.closing.as_mut() else {
        return;
    };
    *left -= 1;
    if *left != 0 {
        return;
    }
    let primary_initiated = *primary_initiated;
    c.closing = None;
    let channel = c.channel;
    if primary_initiated || tell_primary_then_disconnect(lp, channel).is_err() {
        channel.disconnect(lp);
    }
}

/// `cluster.worker.disconnect()` inside the worker.
pub(crate) fn disconnect_self(lp: &mut Loop, w: Worker) {
    match w.state(lp) {
        WorkerState::Disconnecting | WorkerState::Disconnected => return,
        _ => w.set_state(lp, WorkerState::Disconnecting),
    }
    close_servers_then(lp, w, false);
}

/// `cluster.worker.destroy()` / `kill()` inside the worker: tell the
/// primary, close the channel, then end the process (Node:
/// `process.exit(0)`; here the worker's [exit
/// request](Worker::on_exit_request)), at once when the channel is closed
/// already.
pub(crate) fn destroy_self(lp: &mut Loop, w: Worker) {
    w.set_exited_after_disconnect(lp, true);
    let Some(channel) = channel(lp).filter(|c| c.is_connected(lp)) else {
        drop_child(lp);
        return w.request_exit(lp, ExitRequest::Destroyed);
    };
    if let Some(c) = child_mut(lp) {
        c.destroying = true;
    }
    w.set_state(lp, WorkerState::Disconnecting);
    if tell_primary_then_disconnect(lp, channel).is_err() {
        drop_child(lp);
        w.request_exit(lp, ExitRequest::Destroyed);
    }
}

/// Sends `exitedAfterDisconnect` and closes the channel once the primary
/// acknowledges it.
fn tell_primary_then_disconnect(lp: &mut Loop, channel: Channel) -> io::Result<u64> {
    channel.send_cluster(
        lp,
        Act::ExitedAfterDisconnect.to_fields(),
        None,
        Some(Box::new(move |lp, _, _, _| channel.disconnect(lp))),
    )
}
