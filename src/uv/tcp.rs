//! TCP handles (libuv's `src/unix/tcp.c`): bind, listen, connect, socket
//! options, and adopting a socket received over IPC.

use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsFd, OwnedFd};

use nix::sys::socket::SockType;

use super::event_loop::{Data, Loop, einval};
use super::handle::{Handle, Tcp};
use super::stream::{self, Sock, StreamState, stream_mut, stream_ref};
use crate::sys;
use crate::sys::fd::{BindOpts, SocketKind};

/// Flags for [`Loop::tcp_bind`] and [`Loop::udp_bind`] (libuv's `UV_TCP_*` and
/// `UV_UDP_*` bind flags).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BindFlags {
    /// Bind an IPv6 address for IPv6 only (`IPV6_V6ONLY`; libuv's
    /// `UV_TCP_IPV6ONLY`). Without it, `[::]` also accepts IPv4.
    pub ipv6_only: bool,
    /// Set `SO_REUSEPORT`, so several sockets (usually in several processes)
    /// bind the same address and the kernel spreads connections among them
    /// (libuv's `UV_TCP_REUSEPORT`).
    pub reuse_port: bool,
    /// UDP only: set `SO_REUSEADDR` (libuv's `UV_UDP_REUSEADDR`). TCP
    /// sockets always get it, as in libuv.
    pub reuse_addr: bool,
}

impl Loop {
    /// Creates a TCP handle with no socket yet (`uv_tcp_init`).
    pub fn tcp_init(&mut self) -> Handle<Tcp> {
        Handle::from_raw(self.insert(Data::Tcp(StreamState::new(Sock::Unset, false))))
    }

    /// Adopts a socket (`uv_tcp_open`): a listening socket (call
    /// [`tcp_listen`](Self::tcp_listen) to accept from it), a connected one,
    /// or one that is only bound. This is how a socket received over IPC
    /// becomes a handle. The fd is made non-blocking and CLOEXEC.
    ///
    /// # Errors
    ///
    /// A stale id, a handle that already has a socket (`EBUSY`), or an fd
    /// that is not an inet stream socket (`EINVAL`).
    pub fn tcp_open(&mut self, h: Handle<Tcp>, fd: OwnedFd) -> io::Result<()> {
        let s = stream_mut(self, h.raw)?;
        if !matches!(s.sock, Sock::Unset) {
            return Err(io::Error::from_raw_os_error(nix::libc::EBUSY));
        }
        sys::fd::set_cloexec_nonblock(fd.as_fd())?;
        let kind = sys::fd::socket_kind(fd.as_fd());
        self.tcp_adopt(h, fd, kind)
    }

    /// [`tcp_open`](Self::tcp_open) for an fd that is already CLOEXEC and
    /// non-blocking and whose kind is known (a handle received over IPC):
    /// no more syscalls.
    pub(crate) fn tcp_adopt(
        &mut self,
        h: Handle<Tcp>,
        fd: OwnedFd,
        kind: SocketKind,
    ) -> io::Result<()> {
        let s = stream_mut(self, h.raw)?;
        if !matches!(s.sock, Sock::Unset) {
            return Err(io::Error::from_raw_os_error(nix::libc::EBUSY));
        }
        s.sock = match kind {
            SocketKind::TcpListener => {
                Sock::TcpListener(mio::net::TcpListener::from_std(fd.into()))
            }
            SocketKind::TcpStream { connected: true } => {
                Sock::TcpStream(mio::net::TcpStream::from_std(fd.into()))
            }
            SocketKind::TcpStream { connected: false } => Sock::Bound(fd),
            _ => return Err(einval("tcp_open: not a TCP socket")),
        };
        Ok(())
    }

    /// Binds the handle to `addr` (`uv_tcp_bind`), creating its socket with
    /// `SO_REUSEADDR` set. As in libuv, `EADDRINUSE` is not reported here
    /// but by the following [`tcp_listen`](Self::tcp_listen) (or connect).
    /// If the loop inherited a listener for `addr` (socket activation,
    /// [`Loop::listen_fds`]), the handle takes a duplicate of it instead.
    ///
    /// # Errors
    ///
    /// A stale id, a handle that already has a socket (`EINVAL`), or the
    /// socket or bind error (`EADDRNOTAVAIL`, `EACCES`, ...).
    pub fn tcp_bind(
        &mut self,
        h: Handle<Tcp>,
        addr: SocketAddr,
        flags: BindFlags,
    ) -> io::Result<()> {
        if !matches!(stream_mut(self, h.raw)?.sock, Sock::Unset) {
            return Err(einval("tcp_bind: the handle already has a socket"));
        }
        if let Some(fd) = super::listen_fds::take_tcp(self, &addr, flags.reuse_port)? {
            stream_mut(self, h.raw)?.sock = Sock::Bound(fd); // socket activation
            return Ok(());
        }
        let s = stream_mut(self, h.raw)?;
        let opts = BindOpts {
            ipv6_only: flags.ipv6_only,
            reuse_addr: true,
            reuse_port: flags.reuse_port,
        };
        match sys::fd::bind_inet_socket(SockType::Stream, &addr, opts) {
            Ok(fd) => s.sock = Sock::Bound(fd),
            Err(e) if e.raw_os_error() == Some(nix::libc::EADDRINUSE) => {
                s.sock = Sock::Bound(sys::fd::socket(
                    sys::fd::family_of(&addr),
                    SockType::Stream,
                )?);
                s.delayed_error = Some(e);
            }
            Err(e) => return Err(e),
        }
        Ok(())
    }

    /// Listens for connections (`uv_listen`). `cb` is handed each accepted
    /// client as a new `Handle<Tcp>` that the callback owns (it must close
    /// it), or an accept error other than the transient ones. A handle with
    /// no socket is bound to `0.0.0.0:0` first. Calling it again on a
    /// listening handle replaces the callback and updates the backlog.
    ///
    /// Up to 32 connections are accepted per readiness event before other
    /// handles get a turn. When the process runs out of fds, pending
    /// connections are accepted and closed at once (libuv's EMFILE trick) so
    /// the loop does not spin; `cb` is not called for them.
    ///
    /// # Errors
    ///
    /// A stale id or closing handle, a delayed bind error (`EADDRINUSE`), or
    /// `listen`'s own error; `cb` is then dropped.
    pub fn tcp_listen(
        &mut self,
        h: Handle<Tcp>,
        backlog: i32,
        mut cb: impl FnMut(&mut Loop, Handle<Tcp>, io::Result<Handle<Tcp>>) + 'static,
    ) -> io::Result<()> {
        let s = stream_mut(self, h.raw)?;
        if matches!(s.sock, Sock::Unset) {
            let any: SocketAddr = ([0, 0, 0, 0], 0).into();
            self.tcp_bind(h, any, BindFlags::default())?;
        }
        stream::listen_raw(
            self,
            h.raw,
            backlog,
            Box::new(move |lp, raw, r| cb(lp, Handle::from_raw(raw), r.map(Handle::from_raw))),
        )
    }

    /// Connects to `addr` (`uv_tcp_connect`). `cb` runs once the connection
    /// is established or has failed; a failed connect leaves the handle
    /// open (close it). Writes may be queued before it completes.
    ///
    /// # Errors
    ///
    /// A stale id or closing handle, a handle already connected, listening
    /// or connecting (`EINVAL`/`EALREADY`), or socket creation failing;
    /// `cb` is then dropped. Connection errors go to `cb`.
    pub fn tcp_connect(
        &mut self,
        h: Handle<Tcp>,
        addr: SocketAddr,
        cb: impl FnOnce(&mut Loop, Handle<Tcp>, io::Result<()>) + 'static,
    ) -> io::Result<()> {
        if self.slot(h.raw)?.flags & super::handle::flags::CLOSING != 0 {
            return Err(super::event_loop::closing_err());
        }
        if stream::is_connecting(self, h.raw) {
            return Err(io::Error::from_raw_os_error(nix::libc::EALREADY));
        }
        let s = stream_mut(self, h.raw)?;
        let fd = match std::mem::take(&mut s.sock) {
            Sock::Unset => sys::fd::socket(sys::fd::family_of(&addr), SockType::Stream)?,
            Sock::Bound(fd) => fd,
            other => {
                s.sock = other;
                return Err(einval(
                    "tcp_connect: the handle is already connected or listening",
                ));
            }
        };
        let done = match s.delayed_error.take() {
            Some(e) => Err(e),
            None => sys::fd::connect_inet(fd.as_fd(), &addr),
        };
        s.sock = Sock::TcpStream(mio::net::TcpStream::from_std(fd.into()));
        stream::start_connect(
            self,
            h.raw,
            done,
            Box::new(move |lp, raw, r| cb(lp, Handle::from_raw(raw), r)),
        )
    }

    /// The address the socket is bound to (`uv_tcp_getsockname`).
    ///
    /// # Errors
    ///
    /// A stale id, or `EBADF` for a handle without a socket.
    pub fn tcp_getsockname(&self, h: Handle<Tcp>) -> io::Result<SocketAddr> {
        let s = stream_ref(self, h.raw)?;
        sys::fd::local_inet_addr(s.sock.fd().ok_or_else(ebadf)?)
    }

    /// The address of the peer (`uv_tcp_getpeername`).
    ///
    /// # Errors
    ///
    /// A stale id, `EBADF` without a socket, `ENOTCONN` when not connected.
    pub fn tcp_getpeername(&self, h: Handle<Tcp>) -> io::Result<SocketAddr> {
        let s = stream_ref(self, h.raw)?;
        sys::fd::peer_inet_addr(s.sock.fd().ok_or_else(ebadf)?)
    }

    /// Sets `TCP_NODELAY` (`uv_tcp_nodelay`).
    ///
    /// # Errors
    ///
    /// A stale id, `EBADF` without a socket, or the `setsockopt` error.
    pub fn tcp_nodelay(&mut self, h: Handle<Tcp>, on: bool) -> io::Result<()> {
        let s = stream_ref(self, h.raw)?;
        sys::fd::set_nodelay(s.sock.fd().ok_or_else(ebadf)?, on)
    }

    /// Sets `SO_KEEPALIVE`, with the idle time before the first probe in
    /// seconds when enabling (`uv_tcp_keepalive`).
    ///
    /// # Errors
    ///
    /// A stale id, `EBADF` without a socket, or the `setsockopt` error.
    pub fn tcp_keepalive(&mut self, h: Handle<Tcp>, on: bool, delay_secs: u32) -> io::Result<()> {
        let s = stream_ref(self, h.raw)?;
        sys::fd::set_keepalive(s.sock.fd().ok_or_else(ebadf)?, on, delay_secs)
    }
}

fn ebadf() -> io::Error {
    io::Error::from_raw_os_error(nix::libc::EBADF)
}
