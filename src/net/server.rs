//! `net.Server` (lib/net.js: `Server.prototype.listen`, `listenInCluster`,
//! `createServerHandle`, `setupListenHandle`).

use std::any::Any;
use std::fmt;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use super::NetContext;
use crate::uv::{
    AnyHandle, BindFlags, CallbackSlot, Errno, Handle, Id, Idle, Loop, Socket, Stream, Timer,
};

/// Node's `TIMEOUT_MAX` (2^31 - 1 ms): the keep-alive timer's period.
const KEEP_ALIVE_MS: u64 = (1 << 31) - 1;

/// Where a server listens (`server.address()`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ServerAddress {
    /// A TCP address.
    Inet(SocketAddr),
    /// A Unix socket path.
    Unix(PathBuf),
}

impl ServerAddress {
    /// The TCP port, if this is a TCP address.
    pub fn port(&self) -> Option<u16> {
        match self {
            ServerAddress::Inet(a) => Some(a.port()),
            ServerAddress::Unix(_) => None,
        }
    }
}

/// What to listen on (`server.listen(options)`). Exactly one of `path`,
/// `fd`, or `port` (with an optional `host`) is used, in that order.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ListenOptions {
    /// TCP port; 0 picks one (in a cluster, every worker gets the same).
    pub port: u16,
    /// An IP address to bind; `None` binds `::` (dual-stack), falling back
    /// to `0.0.0.0`. Host names are not resolved.
    pub host: Option<String>,
    /// A Unix socket path.
    pub path: Option<PathBuf>,
    /// An fd of this process, by number, to listen on (Node's
    /// `listen({fd})`; in a cluster worker: an fd of the primary). The
    /// server listens on a duplicate ([`dup_fd_number`](crate::uv::dup_fd_number)),
    /// so the fd stays its owner's: a number never hands over ownership.
    pub fd: Option<i32>,
    /// The listen backlog (default 511).
    pub backlog: Option<i32>,
    /// In a cluster worker: bind locally instead of through the primary.
    pub exclusive: bool,
    /// Bind an IPv6 host for IPv6 only.
    pub ipv6_only: bool,
    /// Unix sockets: make the path readable by everyone.
    pub readable_all: bool,
    /// Unix sockets: make the path writable by everyone.
    pub writable_all: bool,
}

impl ListenOptions {
    /// Listen on a TCP port of every address.
    pub fn port(port: u16) -> ListenOptions {
        ListenOptions {
            port,
            ..Default::default()
        }
    }

    /// Listen on a Unix socket path.
    pub fn path(path: impl Into<PathBuf>) -> ListenOptions {
        ListenOptions {
            path: Some(path.into()),
            ..Default::default()
        }
    }

    /// Sets the host to bind.
    pub fn host(mut self, host: impl Into<String>) -> ListenOptions {
        self.host = Some(host.into());
        self
    }

    /// The backlog, with Node's default.
    pub fn backlog_or_default(&self) -> i32 {
        match self.backlog {
            Some(b) if b > 0 => b,
            _ => 511,
        }
    }
}

/// A port that is not one: Node's `ERR_SOCKET_BAD_PORT`, for a value read
/// from the environment or a command line (`PORT=99999`, `PORT=abc`,
/// `PORT=-1`). Its message names the variable and the value, as Node's
/// `options.port should be >= 0 and < 65536. Received ...` does.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BadPort {
    /// What the value was given as (`PORT`, `--port`).
    pub name: String,
    /// The value as given.
    pub value: String,
}

impl fmt::Display for BadPort {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} should be >= 0 and < 65536. Received {:?} (ERR_SOCKET_BAD_PORT)",
            self.name, self.value
        )
    }
}

impl std::error::Error for BadPort {}

impl From<BadPort> for io::Error {
    fn from(e: BadPort) -> io::Error {
        io::Error::new(io::ErrorKind::InvalidInput, e)
    }
}

/// Parses a TCP port given as text (lib/internal/validators.js
/// `validatePort`): decimal digits, surrounding whitespace allowed, 0 to
/// 65535. `name` says where the value came from, for the error.
///
/// Node also takes what JavaScript's `+value` reads as a whole number
/// (`0x1f40`, `8e3`, `8000.0`); those are refused here.
///
/// # Errors
///
/// [`BadPort`] for anything else: empty, signed, fractional, not a number,
/// or above 65535.
///
/// # Examples
///
/// ```
/// use uvcluster::net::parse_port;
///
/// assert_eq!(parse_port("PORT", "8000"), Ok(8000));
/// let e = parse_port("PORT", "99999").unwrap_err();
/// assert_eq!(
///     e.to_string(),
///     "PORT should be >= 0 and < 65536. Received \"99999\" (ERR_SOCKET_BAD_PORT)"
/// );
/// assert!(parse_port("PORT", "abc").is_err());
/// assert!(parse_port("PORT", "-1").is_err());
/// ```
pub fn parse_port(name: &str, value: &str) -> Result<u16, BadPort> {
    let t = value.trim();
    let bad = || BadPort {
        name: name.to_owned(),
        value: value.to_owned(),
    };
    if t.is_empty() || !t.bytes().all(|b| b.is_ascii_digit()) {
        return Err(bad());
    }
    t.parse::<u16>().map_err(|_| bad())
}

/// The port in environment variable `var` ([`parse_port`]), or `default`
/// when it is not set.
///
/// # Errors
///
/// [`BadPort`] when it is set to something that is not a port (also when
/// it is not UTF-8).
pub fn port_from_env(var: &str, default: u16) -> Result<u16, BadPort> {
    match std::env::var_os(var) {
        None => Ok(default),
        Some(v) => parse_port(var, &v.to_string_lossy()),
    }
}

/// A failed listen, as Node reports it: `listen EADDRINUSE: address already
/// in use :::8000` has code `EADDRINUSE`, errno `EADDRINUSE` (Node's
/// `err.errno`, `-98`, is its wire form: [`Errno::to_wire`], which is also
/// how it serializes), syscall `listen`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ListenError {
    /// Node's code (`EADDRINUSE`, `EACCES`, `EADDRNOTAVAIL`, ...), the
    /// errno's name.
    pub code: String,
    /// The errno.
    pub errno: Errno,
    /// The failing call: `bind` or `listen`.
    pub syscall: String,
    /// The address asked for.
    pub address: Option<String>,
    /// The port asked for.
    pub port: Option<i64>,
}

impl ListenError {
    /// Builds one from an errno.
    pub fn new(
        errno: Errno,
        syscall: &str,
        address: Option<String>,
        port: Option<i64>,
    ) -> ListenError {
        ListenError {
            code: errno.code(),
            errno,
            syscall: syscall.to_owned(),
            address,
            port,
        }
    }

    pub(crate) fn from_io(
        e: &io::Error,
        syscall: &str,
        address: Option<String>,
        port: Option<i64>,
    ) -> ListenError {
        ListenError::new(Errno::of_failed(e), syscall, address, port)
    }

    /// The positive OS errno.
    pub fn os_errno(&self) -> i32 {
        self.errno.raw()
    }
}

impl fmt::Display for ListenError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let desc = io::Error::from_raw_os_error(self.os_errno());
        write!(f, "{} {}: {}", self.syscall, self.code, desc)?;
        match (&self.address, self.port) {
            (Some(a), Some(p)) if p >= 0 => write!(f, " {a}:{p}"),
            (Some(a), _) => write!(f, " {a}"),
            (None, Some(p)) => write!(f, " :{p}"),
            _ => Ok(()),
        }
    }
}

impl std::error::Error for ListenError {}

impl From<ListenError> for io::Error {
    fn from(e: ListenError) -> io::Error {
        let kind = io::Error::from_raw_os_error(e.os_errno()).kind();
        io::Error::new(kind, e)
    }
}

type ConnFn = dyn FnMut(&mut Loop, Server, Stream);
type ListenCb = Box<dyn FnOnce(&mut Loop, Server, Result<ServerAddress, ListenError>)>;
type CloseCb = Box<dyn FnOnce(&mut Loop, Server)>;
type EndedFn = dyn FnMut(&mut Loop, Server);

enum Listener {
    None,
    /// A listening TCP or Unix socket of this process.
    Local(Stream),
    /// Round-robin in a cluster worker: the primary accepts and sends
    /// connections; there is no local socket.
    Remote,
}

/// A server's state, owned by the loop (in the `net` layer's context,
/// [`NetContext`](super::NetContext)) and named by a [`Server`] id.
pub(super) struct ServerState {
    listener: Listener,
    address: Option<ServerAddress>,
    listening: bool,
    /// `listen` was called and has not finished.
    pending: bool,
    closing: bool,
    on_connection: CallbackSlot<ConnFn>,
    listen_cb: Option<ListenCb>,
    close_cbs: Vec<CloseCb>,
    max_connections: Option<usize>,
    /// The connections handed out whose handles have not finished closing,
    /// each with when its user marked it idle (loop time, ms; `None`:
    /// busy): Node's http `ConnectionsList`, reduced to what `close` needs.
    connections: ConnMap<Option<u64>>,
    /// Data the cluster hook keeps per server (its key and index).
    hook_data: Option<Box<dyn Any>>,
    /// Round-robin in a cluster worker: a timer that never fires, so that
    /// the server keeps the loop alive like a listening socket does
    /// (Node's fake handle runs `setInterval(noop, TIMEOUT_MAX)`).
    keep_alive: Option<Handle<Timer>>,
    /// Runs whenever a connection ends (the cluster hook's load reports to
    /// a load-aware primary).
    on_ended: CallbackSlot<EndedFn>,
    /// How long a connection must have been idle before a closing server
    /// closes it ([`Server::set_idle_grace`]; zero: at once, as Node).
    idle_grace: Duration,
    /// Idle connections found with unread bytes when they were due to be
    /// closed, each with how many loop iterations have begun since (see
    /// [`Server::close_idle_connections`]).
    peeked: ConnMap<u8>,
    /// While `peeked` is not empty: the watcher that gives those
    /// connections a poll to be read in, then ends the unread ones.
    peek_watcher: Option<Handle<Idle>>,
    /// Closing with a grace: the timer that closes the connections whose
    /// grace ends later.
    grace_timer: Option<Handle<Timer>>,
}

/// A map keyed by a connection (its handle, an id this loop assigned).
type ConnMap<V> = crate::uv::IdMap<Stream, V>;

/// A server (Node's `net.Server`): a typed id for state the loop owns.
///
/// Like a handle, a `Server` is a copyable id: the loop keeps the
/// server's state (its listener, its connections, its callbacks), every
/// method takes the loop, and every callback receives `&mut Loop` and the
/// server's id, so a callback may do anything with the server, close it
/// included. The state lives from [`new`](Self::new) until the close
/// callbacks of [`close`](Self::close) have run; from then on the id is
/// stale, and the methods answer as for a closed server (`listen` fails,
/// `deliver` refuses, `connections` is 0, `address` is `None`).
///
/// The connection callback gets each new connection as a [`Stream`]; it
/// owns it and closes it when done, with
/// [`close_connection`](Self::close_connection) or a plain
/// [`Loop::close`]: the server counts the connection gone when its handle
/// has closed, whoever closed it.
///
/// # Examples
///
/// ```no_run
/// use uvcluster::net::{ListenOptions, Server};
/// use uvcluster::uv::{Loop, RunMode, Stream};
///
/// let mut lp = Loop::new()?;
/// let server = Server::new(&mut lp, |lp, server, conn| {
///     // Greet and hang up.
///     if let Stream::Tcp(c) = conn {
///         lp.write(c, &[b"hello\n"], move |lp, _, _| server.close_connection(lp, conn))
///             .unwrap();
///     }
/// });
/// server.listen(&mut lp, ListenOptions::port(8000).host("127.0.0.1"), |_, _, r| {
///     println!("listening on {:?}", r.unwrap());
/// })?;
/// lp.run(RunMode::Default)?;
/// # Ok::<(), std::io::Error>(())
/// ```
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub struct Server(Id<ServerState>);

fn state(lp: &Loop, s: Server) -> Option<&ServerState> {
    lp.context::<NetContext>()?.servers.get(s.0)
}

fn state_mut(lp: &mut Loop, s: Server) -> Option<&mut ServerState> {
    lp.context_mut::<NetContext>().servers.get_mut(s.0)
}

fn not_listening() -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, "server is already listening")
}

impl Server {
    /// A server whose `on_connection` receives each new connection. Its
    /// state is kept in `lp` until its [`close`](Self::close) completes.
    pub fn new(
        lp: &mut Loop,
        on_connection: impl FnMut(&mut Loop, Server, Stream) + 'static,
    ) -> Server {
        let st = ServerState {
            listener: Listener::None,
            address: None,
            listening: false,
            pending: false,
            closing: false,
            on_connection: CallbackSlot::new(Box::new(on_connection)),
            listen_cb: None,
            close_cbs: Vec::new(),
            max_connections: None,
            connections: ConnMap::default(),
            idle_grace: Duration::ZERO,
            peeked: ConnMap::default(),
            peek_watcher: None,
            grace_timer: None,
            hook_data: None,
            keep_alive: None,
            on_ended: CallbackSlot::empty(),
        };
        Server(lp.context_mut::<NetContext>().servers.insert(st))
    }

    /// Starts listening (`server.listen`). `cb` gets the bound address or a
    /// [`ListenError`], always from the loop, never inside this call. In a
    /// cluster worker (unless `opts.exclusive`), the primary binds: see
    /// [`cluster`](crate::cluster).
    ///
    /// # Errors
    ///
    /// `InvalidInput` if the server is already listening, closing or
    /// closed; `cb` is then dropped.
    pub fn listen(
        self,
        lp: &mut Loop,
        opts: ListenOptions,
        cb: impl FnOnce(&mut Loop, Server, Result<ServerAddress, ListenError>) + 'static,
    ) -> io::Result<()> {
        {
            let st = state_mut(lp, self).ok_or_else(not_listening)?;
            if st.listening || st.pending || st.closing {
                return Err(not_listening());
            }
            st.pending = true;
            st.listen_cb = Some(Box::new(cb));
        }
        match super::cluster_hook(lp) {
            Some(hook) if !opts.exclusive => hook.listen(lp, self, &opts),
            _ => {
                let r = self.listen_local(lp, &opts);
                super::defer(lp, move |lp| self.finish_listen(lp, r));
            }
        }
        Ok(())
    }

    fn listen_local(
        self,
        lp: &mut Loop,
        opts: &ListenOptions,
    ) -> Result<ServerAddress, ListenError> {
        let backlog = opts.backlog_or_default();
        if let Some(path) = &opts.path {
            return self.listen_local_path(lp, path, opts, backlog);
        }
        if let Some(fd) = opts.fd {
            // A duplicate: the caller keeps its fd (no safe call takes
            // ownership of an fd number).
            let h = crate::uv::dup_fd_number(fd)
                .and_then(|d| lp.socket_open(d))
                .map_err(|e| ListenError::from_io(&e, "listen", None, None))?;
            return self.listen_on(lp, h, backlog, None, None);
        }
        self.listen_local_tcp(lp, opts, backlog)
    }

    /// Binds the Unix socket `path` (with the permissions asked for) and
    /// listens on it.
    fn listen_local_path(
        self,
        lp: &mut Loop,
        path: &std::path::Path,
        opts: &ListenOptions,
        backlog: i32,
    ) -> Result<ServerAddress, ListenError> {
        let addr = Some(path.display().to_string());
        let p = lp.pipe_init(false);
        let r = lp
            .pipe_bind(p, path)
            .map_err(|e| ListenError::from_io(&e, "listen", addr.clone(), Some(-1)));
        let r = r.and_then(|()| {
            if opts.readable_all || opts.writable_all {
                lp.pipe_chmod(p, opts.readable_all, opts.writable_all)
                    .map_err(|e| ListenError::from_io(&e, "chmod", addr.clone(), Some(-1)))?;
            }
            Ok(())
        });
        if let Err(e) = r {
            lp.close_if_open(p);
            return Err(e);
        }
        self.listen_on(lp, Socket::Pipe(p), backlog, addr, Some(-1))
    }

    /// Binds the TCP port (on the host, or `::` then `0.0.0.0`) and
    /// listens on it.
    fn listen_local_tcp(
        self,
        lp: &mut Loop,
        opts: &ListenOptions,
        backlog: i32,
    ) -> Result<ServerAddress, ListenError> {
        let port = Some(opts.port as i64);
        let flags = BindFlags {
            ipv6_only: opts.ipv6_only,
            ..Default::default()
        };
        let candidates: Vec<SocketAddr> = match &opts.host {
            Some(h) => {
                let ip: IpAddr = h.parse().map_err(|_| {
                    ListenError::new(Errno::EINVAL, "listen", Some(h.clone()), port)
                })?;
                vec![SocketAddr::new(ip, opts.port)]
            }
            None => vec![
                SocketAddr::new(IpAddr::V6(Ipv6Addr::UNSPECIFIED), opts.port),
                SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), opts.port),
            ],
        };
        let mut last = None;
        for addr in candidates {
            let t = lp.tcp_init();
            let host = Some(addr.ip().to_string());
            match lp.tcp_bind(t, addr, flags) {
                Ok(()) => return self.listen_on(lp, Socket::Tcp(t), backlog, host, port),
                Err(e) => {
                    lp.close_if_open(t);
                    last = Some(ListenError::from_io(&e, "listen", host, port));
                }
            }
        }
        Err(last.expect("at least one candidate address"))
    }

    /// Listens on a socket that is bound (or already listening): a local
    /// bind, an inherited fd, or a shared handle received from a cluster
    /// primary. The server owns `h` from here on, success or not.
    pub(crate) fn listen_on(
        self,
        lp: &mut Loop,
        h: Socket,
        backlog: i32,
        address: Option<String>,
        port: Option<i64>,
    ) -> Result<ServerAddress, ListenError> {
        // The listener's callback names the server by its id; closing the
        // listener drops the callback.
        let r = match h {
            Socket::Tcp(t) => lp
                .tcp_listen(t, backlog, move |lp, _, client| {
                    if let Ok(c) = client {
                        self.incoming(lp, Stream::Tcp(c));
                    }
                })
                .and_then(|()| lp.tcp_getsockname(t).map(ServerAddress::Inet))
                .map(|a| (Listener::Local(t.into()), a)),
            Socket::Pipe(p) => lp
                .pipe_listen(p, backlog, move |lp, _, client| {
                    if let Ok(c) = client {
                        self.incoming(lp, Stream::Pipe(c));
                    }
                })
                .and_then(|()| lp.pipe_getsockname(p).map(ServerAddress::Unix))
                .map(|a| (Listener::Local(p.into()), a)),
            Socket::Udp(u) => {
                lp.close_if_open(u);
                Err(Errno::ENOTSOCK.into())
            }
        };
        match (r, state_mut(lp, self)) {
            (Ok((l, a)), Some(st)) => {
                st.listener = l;
                Ok(a)
            }
            (r, _) => {
                lp.close_if_open(h);
                let e = r.err().unwrap_or_else(|| {
                    io::Error::new(io::ErrorKind::InvalidInput, crate::uv::StaleHandle)
                });
                Err(ListenError::from_io(&e, "listen", address, port))
            }
        }
    }

    /// Round-robin in a cluster worker: connections will come through
    /// [`deliver`](Self::deliver).
    pub(crate) fn listen_remote(self, lp: &mut Loop) {
        if let Some(st) = state_mut(lp, self) {
            st.listener = Listener::Remote;
        }
    }

    /// Ends a `listen`: records the result and runs the listen callback.
    pub(crate) fn finish_listen(self, lp: &mut Loop, r: Result<ServerAddress, ListenError>) {
        let remote = r.is_ok()
            && state(lp, self).is_some_and(|st| {
                matches!(st.listener, Listener::Remote) && st.keep_alive.is_none()
            });
        if remote {
            let t = lp.timer_init();
            let period = Duration::from_millis(KEEP_ALIVE_MS);
            match lp.timer_start(t, period, period, |_, _| {}) {
                Ok(()) => {
                    if let Some(st) = state_mut(lp, self) {
                        st.keep_alive = Some(t);
                    }
                }
                Err(_) => {
                    lp.close_if_open(t);
                }
            }
        }
        let Some(st) = state_mut(lp, self) else {
            return;
        };
        st.pending = false;
        match &r {
            Ok(a) => {
                st.listening = true;
                st.address = Some(a.clone());
            }
            Err(_) => st.listener = Listener::None,
        }
        if let Some(cb) = st.listen_cb.take() {
            cb(lp, self, r);
        }
    }

    fn incoming(self, lp: &mut Loop, conn: Stream) {
        if !self.deliver(lp, conn) {
            lp.close_if_open(conn);
        }
    }

    /// Hands a connection to the server's callback. `false` (and the caller
    /// keeps the connection) when the server is not listening or is at
    /// `max_connections` — in a cluster worker that is `accepted: false`.
    ///
    /// From here on the connection counts as open until its handle has
    /// finished closing, however it is closed (Node decrements
    /// `server._connections` from the socket's `close` event).
    pub fn deliver(self, lp: &mut Loop, conn: Stream) -> bool {
        match state(lp, self) {
            Some(st) if st.listening && !st.closing => {
                if st
                    .max_connections
                    .is_some_and(|m| st.connections.len() >= m)
                {
                    return false;
                }
            }
            _ => return false,
        }
        if lp
            .watch_close(conn, move |lp| self.connection_closed(lp, conn))
            .is_err()
        {
            return false;
        }
        if let Some(st) = state_mut(lp, self) {
            st.connections.insert(conn, None);
        }
        lp.call_slot(
            |lp| state_mut(lp, self).map(|st| &mut st.on_connection),
            |lp, f| f(lp, self, conn),
        );
        true
    }

    /// Closes a connection this server handed out (nothing if it is already
    /// closing). The same as [`Loop::close_if_open`]: either way the server
    /// counts it gone once its handle has closed.
    pub fn close_connection(self, lp: &mut Loop, conn: Stream) {
        lp.close_if_open(conn);
    }

    /// A connection's handle finished closing: count it gone, tell the
    /// cluster hook, and finish a pending `close` if it was the last.
    fn connection_closed(self, lp: &mut Loop, conn: Stream) {
        let Some(st) = state_mut(lp, self) else {
            return;
        };
        if !st.peeked.is_empty() {
            st.peeked.remove(&conn);
        }
        if st.connections.remove(&conn).is_none() {
            return;
        }
        lp.call_slot(
            |lp| state_mut(lp, self).map(|st| &mut st.on_ended),
            |lp, f| f(lp, self),
        );
        self.maybe_closed(lp);
    }

    /// Open connections handed out whose handles have not finished closing
    /// (`server.connections`).
    pub fn connections(self, lp: &Loop) -> usize {
        state(lp, self).map_or(0, |st| st.connections.len())
    }

    /// Marks a connection idle (`true`: between requests, nothing owed to
    /// the peer) or busy (`false`, the state every connection starts in).
    ///
    /// This is what an HTTP server built on this one reports to make a
    /// graceful [`close`](Self::close) prompt, as Node's `http.Server`
    /// does with its connections list: `close` closes the connections that
    /// are idle at that moment (Node's `closeIdleConnections`), and one
    /// marked idle while the server is closing is closed then. A busy
    /// connection is left to finish; its handler sees
    /// [`is_closing`](Self::is_closing) and ends the connection after the
    /// response in progress (an HTTP server answers it with
    /// `Connection: close`). A server whose user never marks a connection
    /// keeps `net.Server`'s behaviour: `close` waits for every connection.
    ///
    /// An idle connection is closed at once if nothing is queued for
    /// writing, or else shut down (the queued bytes go out, then a FIN)
    /// and then closed. Mark a connection idle after its response is
    /// queued, not before.
    ///
    /// # Errors
    ///
    /// `NotFound` if `conn` is not an open connection of this server (never
    /// handed out by it, or already closed).
    pub fn set_idle(self, lp: &mut Loop, conn: Stream, idle: bool) -> io::Result<()> {
        let not_found = || {
            io::Error::new(
                io::ErrorKind::NotFound,
                "not an open connection of this server",
            )
        };
        let now = lp.now();
        let st = state_mut(lp, self).ok_or_else(not_found)?;
        let closing = st.closing;
        let mark = st.connections.get_mut(&conn).ok_or_else(not_found)?;
        // Marked idle again: idle since now.
        *mark = idle.then_some(now);
        if !st.peeked.is_empty() {
            st.peeked.remove(&conn);
        }
        if idle && closing {
            self.close_idle_connections(lp);
        }
        Ok(())
    }

    /// How long a connection must have been idle before a closing server
    /// closes it (default zero: at once, Node's `closeIdleConnections`).
    ///
    /// A keep-alive client sends its next request as soon as it has the
    /// answer, so a connection that went idle a moment ago is likely to
    /// carry a request already on its way: closing it then loses that
    /// request (HTTP/1.1's close race, RFC 9112 section 9.6; a client may
    /// retry only an idempotent request). With a grace,
    /// [`close`](Self::close) closes at once only the connections idle for
    /// at least `grace`; a younger one is closed when its grace ends,
    /// unless a request comes first, which is then answered (with
    /// `Connection: close`, since the server is closing) and the
    /// connection ends. A connection handed to a closing server and marked
    /// idle before its first request is read is kept the same way. Keep
    /// `grace` well under a client's own idle timeout (Node's
    /// `keepAliveTimeout` is 5 s); `cluster_hello` uses 500 ms. Whatever
    /// the grace, a connection whose next request has already arrived is
    /// answered, not closed (see
    /// [`close_idle_connections`](Self::close_idle_connections)).
    pub fn set_idle_grace(self, lp: &mut Loop, grace: Duration) {
        if let Some(st) = state_mut(lp, self) {
            st.idle_grace = grace;
        }
    }

    /// Whether `conn` is an open connection of this server marked idle with
    /// [`set_idle`](Self::set_idle).
    pub fn is_idle(self, lp: &Loop, conn: Stream) -> bool {
        state(lp, self).is_some_and(|st| st.connections.get(&conn).is_some_and(Option::is_some))
    }

    /// Closes every connection marked idle (Node's
    /// `server.closeIdleConnections()`), once idle for the
    /// [grace](Self::set_idle_grace); returns how many it closed.
    /// [`close`](Self::close) does this itself.
    ///
    /// Beyond Node: a connection whose next request has already arrived
    /// (bytes in its receive buffer that the loop has not read yet,
    /// [`Loop::has_unread_input`]) is not closed, since closing a socket
    /// with unread input resets it and the client loses a request it has
    /// sent. It is kept until the loop has polled once more (the polls
    /// meanwhile do not block), in which the loop reads the request and
    /// its handler answers it (with `Connection: close`, the server
    /// closing); one still marked idle with its input unread after that
    /// is closed, since its user does not read it. This happens when the
    /// loop is held up (a stalled process reads a disconnect and a request
    /// in the same poll, the disconnect first) or when a request comes as
    /// the grace ends.
    pub fn close_idle_connections(self, lp: &mut Loop) -> usize {
        let now = lp.now();
        let mut later: Option<u64> = None;
        let idle: Vec<Stream> = state(lp, self).map_or_else(Vec::new, |st| {
            let grace = st.idle_grace.as_millis() as u64;
            let mut due_now = Vec::new();
            for (&c, &since) in &st.connections {
                // A peeked connection is the peek watcher's to end.
                let Some(since) = since else { continue };
                if st.peeked.contains_key(&c) {
                    continue;
                }
                let due = since + grace;
                if due <= now {
                    due_now.push(c);
                } else {
                    later = Some(later.map_or(due, |l| l.min(due)));
                }
            }
            due_now
        });
        // A connection with unread bytes is not idle any more: its next
        // request has arrived, and the loop has not read it yet (it polls
        // after this, or it was held up: a stalled process, or a
        // disconnect read before the request in the same poll). It is
        // kept until the loop has polled once more, to be read and
        // answered (with `Connection: close`) meanwhile; one still idle
        // and unread then is ended: its user does not read it.
        let mut closed = 0;
        let mut peeked = false;
        for c in idle {
            if lp.has_unread_input(c) {
                if let Some(st) = state_mut(lp, self) {
                    st.peeked.insert(c, 0);
                    peeked = true;
                }
                continue;
            }
            end_idle(lp, c);
            closed += 1;
        }
        if peeked {
            self.watch_peeked(lp);
        }
        if let Some(due) = later {
            self.arm_grace(lp, due - now);
        }
        closed
    }

    /// Starts the peek watcher: an idle watcher (so the polls meanwhile do
    /// not block), which counts the iterations that begin after a
    /// connection was peeked. From the second on, a poll has run since the
    /// peek, in which the loop read what was waiting on a connection that
    /// is read: one still marked idle with input unread is ended.
    fn watch_peeked(self, lp: &mut Loop) {
        let w = match state(lp, self).and_then(|st| st.peek_watcher) {
            Some(w) => w,
            None => {
                let w = lp.idle_init();
                if let Some(st) = state_mut(lp, self) {
                    st.peek_watcher = Some(w);
                }
                w
            }
        };
        let started = lp.idle_start(w, move |lp, w| {
            let mut due = Vec::new();
            let mut empty = true;
            if let Some(st) = state_mut(lp, self) {
                for (&c, n) in st.peeked.iter_mut() {
                    *n += 1;
                    if *n >= 2 {
                        due.push(c);
                    }
                }
                for c in &due {
                    st.peeked.remove(c);
                }
                empty = st.peeked.is_empty();
            }
            if empty {
                let _ = lp.idle_stop(w);
            }
            for c in due {
                if self.is_idle(lp, c) && lp.has_unread_input(c) {
                    end_idle(lp, c);
                }
            }
            // What is idle and no longer peeked goes by the grace again.
            if state(lp, self).is_some_and(|st| st.closing) {
                self.close_idle_connections(lp);
            }
        });
        if started.is_err() {
            // Cannot happen for a fresh open watcher; never keep a peeked
            // connection with nothing to end it.
            let peeked: Vec<Stream> = state_mut(lp, self)
                .map(|st| st.peeked.drain().map(|(c, _)| c).collect())
                .unwrap_or_default();
            for c in peeked {
                end_idle(lp, c);
            }
        }
    }

    /// Closing with a grace: closes what has been idle long enough in `ms`.
    fn arm_grace(self, lp: &mut Loop, ms: u64) {
        let timer = match state(lp, self).and_then(|st| st.grace_timer) {
            Some(t) => t,
            None => {
                let t = lp.timer_init();
                if let Some(st) = state_mut(lp, self) {
                    st.grace_timer = Some(t);
                }
                t
            }
        };
        let _ = lp.timer_start(
            timer,
            Duration::from_millis(ms),
            Duration::ZERO,
            move |lp, _| {
                if state(lp, self).is_some_and(|st| st.closing) {
                    self.close_idle_connections(lp);
                }
            },
        );
    }

    /// Closes every open connection of this server, busy or idle (Node's
    /// `server.closeAllConnections()`): what a graceful close falls back on
    /// when its deadline passes. Queued writes are cancelled. Returns how
    /// many were closed.
    pub fn close_all_connections(self, lp: &mut Loop) -> usize {
        let all: Vec<Stream> =
            state(lp, self).map_or_else(Vec::new, |st| st.connections.keys().copied().collect());
        all.into_iter().filter(|&c| lp.close_if_open(c)).count()
    }

    /// Refuses connections beyond `max` (`server.maxConnections`).
    pub fn set_max_connections(self, lp: &mut Loop, max: Option<usize>) {
        if let Some(st) = state_mut(lp, self) {
            st.max_connections = max;
        }
    }

    /// Where the server listens, once listening (`server.address()`);
    /// `None` before, and once closed.
    pub fn address(self, lp: &Loop) -> Option<ServerAddress> {
        state(lp, self)?.address.clone()
    }

    /// Whether the server is listening (`server.listening`).
    pub fn is_listening(self, lp: &Loop) -> bool {
        state(lp, self).is_some_and(|st| st.listening)
    }

    /// Stops accepting (`server.close(cb)`). `cb` runs once the listener is
    /// closed and every connection handed out has ended; then the server's
    /// state is dropped and its id is stale. In a cluster worker the
    /// primary is told; a worker's graceful disconnect closes its servers
    /// this way.
    ///
    /// Connections marked idle with [`set_idle`](Self::set_idle) are closed
    /// now, as Node's `http.Server.close()` closes idle keep-alive
    /// connections (after their [grace](Self::set_idle_grace), and not
    /// while a request has arrived on one unread: see
    /// [`close_idle_connections`](Self::close_idle_connections)); busy ones
    /// are left to end by themselves (their handlers see
    /// [`is_closing`](Self::is_closing)).
    pub fn close(self, lp: &mut Loop, cb: impl FnOnce(&mut Loop, Server) + 'static) {
        let (listener, keep_alive, hooked) = {
            let Some(st) = state_mut(lp, self) else {
                return;
            };
            st.close_cbs.push(Box::new(cb));
            if st.closing {
                return;
            }
            st.closing = true;
            st.listening = false;
            (
                std::mem::replace(&mut st.listener, Listener::None),
                st.keep_alive.take(),
                st.hook_data.is_some(),
            )
        };
        if let Listener::Local(l) = listener {
            lp.close_if_open(l);
        }
        if let Some(t) = keep_alive {
            lp.close_if_open(t);
        }
        if hooked && let Some(hook) = super::cluster_hook(lp) {
            hook.close(lp, self);
        }
        self.close_idle_connections(lp);
        super::defer(lp, move |lp| self.maybe_closed(lp));
    }

    /// Once closing and every connection has ended: runs the close
    /// callbacks, then drops the state.
    fn maybe_closed(self, lp: &mut Loop) {
        let cbs = match state_mut(lp, self) {
            Some(st) if st.closing && st.connections.is_empty() => {
                std::mem::take(&mut st.close_cbs)
            }
            _ => return,
        };
        if let Some(t) = state_mut(lp, self).and_then(|st| st.grace_timer.take()) {
            lp.close_if_open(t);
        }
        if let Some(w) = state_mut(lp, self).and_then(|st| st.peek_watcher.take()) {
            lp.close_if_open(w);
        }
        for cb in cbs {
            cb(lp, self);
        }
        lp.context_mut::<NetContext>().servers.remove(self.0);
    }

    /// Whether `close` was called: the flag a connection's handler reads
    /// to end its connection after the response in progress (an HTTP
    /// server sends `Connection: close`). `true` for a closed server.
    pub fn is_closing(self, lp: &Loop) -> bool {
        state(lp, self).is_none_or(|st| st.closing)
    }

    /// Sets what runs whenever a connection of this server ends.
    pub(crate) fn set_on_ended(self, lp: &mut Loop, f: impl FnMut(&mut Loop, Server) + 'static) {
        if let Some(st) = state_mut(lp, self) {
            st.on_ended.set(Box::new(f));
        }
    }

    /// The cluster hook's per-server data (`None` for a closed server).
    pub(crate) fn with_hook_data<R>(
        self,
        lp: &mut Loop,
        f: impl FnOnce(&mut Option<Box<dyn Any>>) -> R,
    ) -> R {
        match state_mut(lp, self) {
            Some(st) => f(&mut st.hook_data),
            None => f(&mut None),
        }
    }

    /// Sets whether the listening socket keeps the loop alive
    /// (`server.ref()` / `server.unref()`).
    ///
    /// # Errors
    ///
    /// A closed listener.
    pub fn set_ref(self, lp: &mut Loop, on: bool) -> io::Result<()> {
        let (l, keep_alive) = match state(lp, self) {
            Some(st) => match st.listener {
                Listener::Local(l) => (Some(l), st.keep_alive),
                _ => (None, st.keep_alive),
            },
            None => (None, None),
        };
        let target: Option<AnyHandle> = keep_alive.map(Into::into).or(l.map(Into::into));
        match (target, on) {
            (Some(h), true) => lp.ref_handle(h),
            (Some(h), false) => lp.unref_handle(h),
            _ => Ok(()),
        }
    }
}

/// Ends an idle connection: closes it now if nothing is queued for
/// writing, else shuts it down first so that the queued bytes go out.
fn end_idle(lp: &mut Loop, conn: Stream) {
    if lp.is_closing(conn) {
        return;
    }
    if lp.write_queue_size(conn) == 0 {
        lp.close_if_open(conn);
        return;
    }
    let shut = match conn {
        Stream::Tcp(h) => lp.shutdown(h, |lp, h, _| {
            lp.close_if_open(h);
        }),
        Stream::Pipe(h) => lp.shutdown(h, |lp, h, _| {
            lp.close_if_open(h);
        }),
    };
    if shut.is_err() {
        lp.close_if_open(conn);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_port_takes_decimal_ports_only() {
        for (s, p) in [
            ("0", 0),
            ("8000", 8000),
            (" 80 ", 80),
            ("65535", 65535),
            ("007", 7),
        ] {
            assert_eq!(parse_port("PORT", s), Ok(p), "{s:?}");
        }
        for s in [
            "", " ", "65536", "99999", "-1", "+1", "2.5", "0x1f40", "8e3", "abc", "80 80",
        ] {
            let e = parse_port("PORT", s).unwrap_err();
            assert_eq!(e.value, s);
            assert_eq!(
                e.to_string(),
                format!("PORT should be >= 0 and < 65536. Received {s:?} (ERR_SOCKET_BAD_PORT)")
            );
            assert_eq!(io::Error::from(e).kind(), io::ErrorKind::InvalidInput);
        }
    }
}
