//! Shared handles (`lib/internal/cluster/shared_handle.js`), and the
//! socket creation both strategies use (`net._createServerHandle`,
//! `dgram._createSocketHandle`).
//!
//! Under [`SchedulingPolicy::None`](super::SchedulingPolicy::None), and for
//! every UDP socket, the primary only *binds*. The bound socket goes to each
//! worker in its `queryServer` reply; each worker listens (or receives) on
//! its own copy, and the kernel spreads connections or datagrams.

use std::collections::BTreeSet;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::Path;

use super::protocol::{AddressType, Query};
use crate::ipc::{AfterAck, Attach, HandleKind};
use crate::uv::{BindFlags, Errno, Handle, Loop, Socket, Tcp};

/// libuv's `UV_TCP_IPV6ONLY` and `UV_UDP_IPV6ONLY`.
const IPV6ONLY: u32 = 1;
/// libuv's `UV_UDP_REUSEADDR`.
const UDP_REUSEADDR: u32 = 4;

fn einval(msg: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, msg.to_owned())
}

/// The port of a TCP or UDP query, if it is a valid one.
fn port_of(q: &Query) -> io::Result<u16> {
    q.inet_port().ok_or_else(|| einval("queryServer: bad port"))
}

fn parse_ip(address: &str) -> io::Result<IpAddr> {
    address
        .parse()
        .map_err(|_| einval("queryServer: address is not an IP address"))
}

fn bind_tcp(lp: &mut Loop, addr: SocketAddr, ipv6_only: bool) -> io::Result<Handle<Tcp>> {
    let h = lp.tcp_init();
    let flags = BindFlags {
        ipv6_only,
        ..BindFlags::default()
    };
    match lp.tcp_bind(h, addr, flags) {
        Ok(()) => Ok(h),
        Err(e) => {
            lp.close_if_open(h);
            Err(e)
        }
    }
}

/// Adopts an fd of the primary, by number: a duplicate of it, so the
/// original stays the caller's.
fn open_fd(lp: &mut Loop, fd: i32, udp: bool) -> io::Result<Socket> {
    if udp {
        let h = lp.udp_init();
        return match crate::uv::dup_fd_number(fd).and_then(|d| lp.udp_open(h, d)) {
            Ok(()) => Ok(Socket::Udp(h)),
            Err(e) => {
                lp.close_if_open(h);
                Err(e)
            }
        };
    }
    let h = lp.tcp_init();
    match crate::uv::dup_fd_number(fd).and_then(|d| lp.tcp_open(h, d)) {
        Ok(()) => return Ok(Socket::Tcp(h)),
        Err(e) => {
            lp.close_if_open(h);
            if Errno::of(&e) == Some(Errno::EBADF) {
                return Err(e);
            }
        }
    }
    let p = lp.pipe_init(false);
    match crate::uv::dup_fd_number(fd).and_then(|d| lp.pipe_open(p, d)) {
        Ok(()) => Ok(Socket::Pipe(p)),
        Err(e) => {
            lp.close_if_open(p);
            Err(e)
        }
    }
}

/// Node's `net._createServerHandle(address, port, addressType, fd, flags)`
/// and `dgram._createSocketHandle(...)`: a socket bound as the query asks,
/// not yet listening. `address` is the query's address, already shortened
/// for Unix paths. With no address a TCP socket binds `[::]` (dual-stack
/// unless `flags & 1`), falling back to `0.0.0.0`.
///
/// As in libuv, `EADDRINUSE` from a TCP bind only shows at `listen`.
pub(super) fn create_server_handle(
    lp: &mut Loop,
    address: Option<&str>,
    q: &Query,
) -> io::Result<Socket> {
    let kind = q.address_type;
    if let Some(fd) = q.listen_fd() {
        return open_fd(lp, fd, kind.is_udp());
    }
    let address = address.filter(|a| !a.is_empty());
    match kind {
        AddressType::Fd => Err(einval("queryServer: no fd")),
        AddressType::Unix => {
            let path = address.ok_or_else(|| einval("queryServer: no path"))?;
            bind_unix(lp, Path::new(path))
        }
        AddressType::Tcp4 | AddressType::Tcp6 => bind_tcp_query(lp, address, q),
        AddressType::Udp4 | AddressType::Udp6 => bind_udp_query(lp, address, q),
    }
}

/// A Unix socket bound at `path`.
fn bind_unix(lp: &mut Loop, path: &Path) -> io::Result<Socket> {
    let p = lp.pipe_init(false);
    match lp.pipe_bind(p, path) {
        Ok(()) => Ok(Socket::Pipe(p)),
        Err(e) => {
            lp.close_if_open(p);
            Err(e)
        }
    }
}

/// A TCP socket bound as the query says: with no address `[::]`
/// (dual-stack unless `flags & 1`), falling back to `0.0.0.0`.
fn bind_tcp_query(lp: &mut Loop, address: Option<&str>, q: &Query) -> io::Result<Socket> {
    let port = port_of(q)?;
    let ipv6_only = q.flags() & IPV6ONLY != 0;
    match address {
        None => {
            let any6 = SocketAddr::new(Ipv6Addr::UNSPECIFIED.into(), port);
            bind_tcp(lp, any6, ipv6_only).or_else(|_| {
                bind_tcp(
                    lp,
                    SocketAddr::new(Ipv4Addr::UNSPECIFIED.into(), port),
                    false,
                )
            })
        }
        Some(a) => {
            let ip = parse_ip(a)?;
            bind_tcp(lp, SocketAddr::new(ip, port), ip.is_ipv6() && ipv6_only)
        }
    }
    .map(Socket::Tcp)
}

/// A UDP socket bound as the query says (`dgram._createSocketHandle`).
fn bind_udp_query(lp: &mut Loop, address: Option<&str>, q: &Query) -> io::Result<Socket> {
    let port = port_of(q)?;
    let flags = q.flags();
    let ip = match (address, q.address_type) {
        (Some(a), _) => parse_ip(a)?,
        (None, AddressType::Udp6) => Ipv6Addr::UNSPECIFIED.into(),
        (None, _) => Ipv4Addr::UNSPECIFIED.into(),
    };
    let h = lp.udp_init();
    let bind = BindFlags {
        ipv6_only: ip.is_ipv6() && flags & IPV6ONLY != 0,
        reuse_addr: flags & UDP_REUSEADDR != 0,
        reuse_port: false,
    };
    match lp.udp_bind(h, SocketAddr::new(ip, port), bind) {
        Ok(()) => Ok(Socket::Udp(h)),
        Err(e) => {
            lp.close_if_open(h);
            Err(e)
        }
    }
}

/// A socket bound once by the primary and shared by every worker that
/// asked for the same key (Node's `SharedHandle`); or, under
/// [`SchedulingPolicy::ReusePort`](super::SchedulingPolicy::ReusePort), one
/// `SO_REUSEPORT` socket per worker on the same address.
#[derive(Debug)]
pub(super) struct SharedHandle {
    workers: BTreeSet<u32>,
    handle: Option<Socket>,
    /// The bind error; `None` when bound.
    errno: Option<Errno>,
    /// ReusePort: where to bind each worker's socket, and the sockets.
    per_worker: Option<PerWorker>,
    /// Keep the sockets when their last worker leaves (a supervisor
    /// replaces workers): see [`SharedHandle::set_keep`].
    keep: bool,
}

/// Whose `SO_REUSEPORT` socket: one worker's, or a supervisor slot's,
/// shared by the slot's successive workers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(super) enum SocketKey {
    /// Worker `id`'s own socket (Node's model: one per worker).
    Worker(u32),
    /// Slot `n`'s socket, handed from each worker of the slot to the next.
    Slot(u32),
}

#[derive(Debug)]
struct PerWorker {
    /// Addresses to try, in order (`[::]` then `0.0.0.0` for "any").
    addrs: Vec<SocketAddr>,
    ipv6_only: bool,
    sockets: std::collections::BTreeMap<SocketKey, Handle<Tcp>>,
    /// Which socket each worker uses.
    users: std::collections::BTreeMap<u32, SocketKey>,
}

impl PerWorker {
    fn used(&self, key: SocketKey) -> bool {
        self.users.values().any(|&k| k == key)
    }
}

impl SharedHandle {
    /// Binds the socket; a failure is kept and reported to every worker.
    pub(super) fn new(lp: &mut Loop, address: Option<&str>, q: &Query) -> SharedHandle {
        let (handle, errno) = match create_server_handle(lp, address, q) {
            Ok(h) => (Some(h), None),
            Err(e) => (None, Some(Errno::of_failed(&e))),
        };
        SharedHandle {
            workers: BTreeSet::new(),
            handle,
            errno,
            per_worker: None,
            keep: false,
        }
    }

    /// A ReusePort handle for a TCP query: nothing is bound until a worker
    /// is added; each gets its own `SO_REUSEPORT` socket on the address (a
    /// port of 0 is resolved by the first bind and reused after it).
    pub(super) fn new_reuse_port(address: Option<&str>, q: &Query) -> SharedHandle {
        // Elsewhere SO_REUSEPORT exists but does not spread connections
        // (on macOS the last socket bound takes them all): refuse, so the
        // worker's `listen` fails with EOPNOTSUPP rather than serving
        // unevenly.
        let supported: io::Result<()> = if cfg!(target_os = "linux") {
            Ok(())
        } else {
            Err(Errno::EOPNOTSUPP.into())
        };
        let plan = supported.and_then(|()| port_of(q)).and_then(|port| {
            let ipv6_only = q.flags() & IPV6ONLY != 0;
            let addrs = match address.filter(|a| !a.is_empty()) {
                None => vec![
                    SocketAddr::new(Ipv6Addr::UNSPECIFIED.into(), port),
                    SocketAddr::new(Ipv4Addr::UNSPECIFIED.into(), port),
                ],
                Some(a) => vec![SocketAddr::new(parse_ip(a)?, port)],
            };
            Ok(PerWorker {
                addrs,
                ipv6_only,
                sockets: Default::default(),
                users: Default::default(),
            })
        });
        match plan {
            Ok(p) => SharedHandle {
                workers: BTreeSet::new(),
                handle: None,
                errno: None,
                per_worker: Some(p),
                keep: false,
            },
            Err(e) => SharedHandle {
                workers: BTreeSet::new(),
                handle: None,
                errno: Some(Errno::of_failed(&e)),
                per_worker: None,
                keep: false,
            },
        }
    }

    /// ReusePort: the socket of `key` for worker `id`: the slot's kept
    /// socket when it has one (the replacement takes over its accept
    /// queue), or a new one.
    fn bind_for(&mut self, lp: &mut Loop, id: u32, key: SocketKey) -> io::Result<Handle<Tcp>> {
        let p = self.per_worker.as_mut().expect("a ReusePort handle");
        if let Some(&h) = p.sockets.get(&key) {
            p.users.insert(id, key);
            return Ok(h);
        }
        let mut last = None;
        for addr in p.addrs.clone() {
            let h = lp.tcp_init();
            let flags = BindFlags {
                ipv6_only: addr.is_ipv6() && p.ipv6_only,
                reuse_port: true,
                ..BindFlags::default()
            };
            // EADDRINUSE from bind is delayed to listen (libuv); the
            // worker's port check reports it. Other errors, including
            // ENOPROTOOPT where SO_REUSEPORT is unsupported, come back here.
            match lp.tcp_bind(h, addr, flags) {
                Ok(()) => {
                    if addr.port() == 0 {
                        // Every later worker binds the port the first got.
                        let port = lp.tcp_getsockname(h).map(|a| a.port()).unwrap_or(0);
                        for a in &mut p.addrs {
                            a.set_port(port);
                        }
                        p.addrs.retain(|a| a.is_ipv6() == addr.is_ipv6());
                    }
                    p.sockets.insert(key, h);
                    p.users.insert(id, key);
                    return Ok(h);
                }
                Err(e) => {
                    lp.close_if_open(h);
                    last = Some(e);
                }
            }
        }
        Err(last.unwrap_or_else(|| einval("no address to bind")))
    }

    /// Whether `id` already uses this handle.
    pub(super) fn has(&self, id: u32) -> bool {
        self.workers.contains(&id)
    }

    /// Adds worker `id`, whose ReusePort socket is `key`'s: the bound
    /// socket to send with the reply, or the errno to reply with.
    pub(super) fn add(&mut self, lp: &mut Loop, id: u32, key: SocketKey) -> Result<Attach, Errno> {
        self.workers.insert(id);
        if self.per_worker.is_some() {
            return match self.bind_for(lp, id, key) {
                Ok(h) => Ok(Attach {
                    handle: h.into(),
                    kind: HandleKind::NetNative,
                    after_ack: AfterAck::Keep,
                }),
                Err(e) => {
                    self.workers.remove(&id);
                    Err(Errno::of_failed(&e))
                }
            };
        }
        match (self.handle, self.errno) {
            (Some(h), None) => Ok(Attach {
                handle: h,
                kind: match h {
                    Socket::Udp(_) => HandleKind::DgramNative,
                    _ => HandleKind::NetNative,
                },
                after_ack: AfterAck::Keep,
            }),
            (_, e) => Err(e.unwrap_or(Errno::EINVAL)),
        }
    }

    /// Removes worker `id`; when it was the last one, closes the socket and
    /// returns `true` (the caller then forgets the key).
    /// A socket is kept while another worker uses it, or while
    /// [`keep`](Self::set_keep) is on and it is a slot's (or the one
    /// shared socket).
    pub(super) fn remove(&mut self, lp: &mut Loop, id: u32) -> bool {
        let keep = self.keep;
        if let Some(p) = self.per_worker.as_mut()
            && let Some(key) = p.users.remove(&id)
            && !p.used(key)
            && !(keep && matches!(key, SocketKey::Slot(_)))
            && let Some(h) = p.sockets.remove(&key)
        {
            lp.close_if_open(h);
        }
        if !self.workers.remove(&id) || !self.workers.is_empty() || keep {
            return false;
        }
        if let Some(h) = self.handle.take() {
            lp.close_if_open(h);
        }
        true
    }

    /// Whether sockets outlive their last worker (for a supervisor, which
    /// forks the replacement: it gets the same socket, and with it what
    /// queued on it; closing a socket resets its queue, and under
    /// `SO_REUSEPORT` a socket's queue is its own). Turning it off closes
    /// the sockets no worker uses; with no worker left, the handle is
    /// closed and `true` returned (the caller forgets the key).
    pub(super) fn set_keep(&mut self, lp: &mut Loop, keep: bool) -> bool {
        self.keep = keep;
        if keep {
            return false;
        }
        if let Some(p) = self.per_worker.as_mut() {
            let unused: Vec<SocketKey> =
                p.sockets.keys().copied().filter(|&k| !p.used(k)).collect();
            for k in unused {
                if let Some(h) = p.sockets.remove(&k) {
                    lp.close_if_open(h);
                }
            }
        }
        if !self.workers.is_empty() {
            return false;
        }
        if let Some(h) = self.handle.take() {
            lp.close_if_open(h);
        }
        true
    }

    /// Closes slot `slot`'s kept ReusePort socket if no worker uses it
    /// (the slot is gone).
    pub(super) fn release_slot(&mut self, lp: &mut Loop, slot: u32) {
        let key = SocketKey::Slot(slot);
        if let Some(p) = self.per_worker.as_mut()
            && !p.used(key)
            && let Some(h) = p.sockets.remove(&key)
        {
            lp.close_if_open(h);
        }
    }

    /// Closes the socket whoever still uses it (the primary is going away).
    pub(super) fn close(&mut self, lp: &mut Loop) {
        self.workers.clear();
        if let Some(p) = self.per_worker.as_mut() {
            p.users.clear();
            for (_, h) in std::mem::take(&mut p.sockets) {
                lp.close_if_open(h);
            }
        }
        if let Some(h) = self.handle.take() {
            lp.close_if_open(h);
        }
    }
}
