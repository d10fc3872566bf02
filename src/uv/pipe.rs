//! Pipe handles: Unix-domain stream sockets, and IPC pipes that carry file
//! descriptors with their bytes (libuv's `src/unix/pipe.c` and the
//! handle-passing parts of `src/unix/stream.c`).
//!
//! On an IPC pipe every read is a `recvmsg`; the fds that arrive are queued
//! on the pipe in order. Inside the read callback, [`Loop::pipe_pending_count`]
//! says how many are waiting and [`Loop::pipe_accept_pending`] turns the next
//! one into a handle of the right type. Fds never accepted are closed with
//! the pipe. Every received fd is CLOEXEC (`MSG_CMSG_CLOEXEC`).

use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};

use nix::sys::socket::{AddressFamily, SockType};

use super::event_loop::{Data, Loop, einval};
use super::handle::sealed::Raw as _;
use super::handle::{Handle, Pipe, Socket};
use super::stream::{self, Sock, StreamState, stream_mut, stream_ref};
use crate::sys;
use crate::sys::fd::SocketKind;

/// The type of the next fd waiting on an IPC pipe (`uv_pipe_pending_type`,
/// decided like `uv_guess_handle`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PendingType {
    /// An inet stream socket: listening, connected or only bound.
    Tcp,
    /// A Unix stream socket.
    Pipe,
    /// An inet datagram socket.
    Udp,
    /// Anything else (a file, a FIFO, a raw socket...).
    Unknown,
}

fn kind_to_type(k: SocketKind) -> PendingType {
    match k {
        SocketKind::TcpListener | SocketKind::TcpStream { .. } => PendingType::Tcp,
        SocketKind::UnixListener | SocketKind::UnixStream { .. } => PendingType::Pipe,
        SocketKind::Udp => PendingType::Udp,
        SocketKind::Other => PendingType::Unknown,
    }
}

impl Loop {
    /// Creates a pipe handle (`uv_pipe_init`); `ipc` makes it an IPC pipe
    /// that can send and receive handles.
    pub fn pipe_init(&mut self, ipc: bool) -> Handle<Pipe> {
        Handle::from_raw(self.insert(Data::Pipe(StreamState::new(Sock::Unset, ipc))))
    }

    /// Two connected pipe handles over a `socketpair` (libuv's `uv_pipe`
    /// followed by two `uv_pipe_open`), both in IPC mode if `ipc`.
    ///
    /// # Errors
    ///
    /// The `socketpair` error (EMFILE...).
    pub fn pipe_pair(&mut self, ipc: bool) -> io::Result<(Handle<Pipe>, Handle<Pipe>)> {
        let (a, b) = sys::fd::socketpair()?;
        let ha = self.pipe_init(ipc);
        let hb = self.pipe_init(ipc);
        self.pipe_open(ha, a)?;
        self.pipe_open(hb, b)?;
        Ok((ha, hb))
    }

    /// Adopts a Unix stream socket fd (`uv_pipe_open`), connected, listening
    /// or bound. The fd is made non-blocking and CLOEXEC.
    ///
    /// # Errors
    ///
    /// A stale id, a handle that already has a socket (`EBUSY`), or an fd
    /// that is not a Unix stream socket (`EINVAL`).
    pub fn pipe_open(&mut self, h: Handle<Pipe>, fd: OwnedFd) -> io::Result<()> {
        let s = stream_mut(self, h.raw)?;
        if !matches!(s.sock, Sock::Unset) {
            return Err(io::Error::from_raw_os_error(nix::libc::EBUSY));
        }
        sys::fd::set_cloexec_nonblock(fd.as_fd())?;
        let kind = sys::fd::socket_kind(fd.as_fd());
        self.pipe_adopt(h, fd, kind)
    }

    /// [`pipe_open`](Self::pipe_open) for an fd that is already CLOEXEC and
    /// non-blocking and whose kind is known: no more syscalls.
    fn pipe_adopt(&mut self, h: Handle<Pipe>, fd: OwnedFd, kind: SocketKind) -> io::Result<()> {
        let s = stream_mut(self, h.raw)?;
        if !matches!(s.sock, Sock::Unset) {
            return Err(io::Error::from_raw_os_error(nix::libc::EBUSY));
        }
        s.sock = match kind {
            SocketKind::UnixListener => {
                Sock::UnixListener(mio::net::UnixListener::from_std(fd.into()))
            }
            SocketKind::UnixStream { connected: true } => {
                Sock::UnixStream(mio::net::UnixStream::from_std(fd.into()))
            }
            SocketKind::UnixStream { connected: false } => Sock::Bound(fd),
            _ => return Err(einval("pipe_open: not a Unix stream socket")),
        };
        Ok(())
    }

    /// Binds the pipe to a filesystem path (`uv_pipe_bind`). The path is
    /// unlinked when the handle closes. If the loop inherited a listener on
    /// that path (socket activation, [`Loop::listen_fds`]) the handle takes
    /// a duplicate of it instead, and leaves the path in place.
    ///
    /// # Errors
    ///
    /// A stale id, a handle that already has a socket (`EINVAL`), or the
    /// bind error (`EADDRINUSE` if the path exists, `EACCES`, `ENAMETOOLONG`).
    pub fn pipe_bind(&mut self, h: Handle<Pipe>, path: impl AsRef<Path>) -> io::Result<()> {
        if !matches!(stream_mut(self, h.raw)?.sock, Sock::Unset) {
            return Err(einval("pipe_bind: the handle already has a socket"));
        }
        if let Some(fd) = super::listen_fds::take_unix(self, path.as_ref())? {
            // Socket activation: no bound_path, so never unlinked here.
            stream_mut(self, h.raw)?.sock = Sock::Bound(fd);
            return Ok(());
        }
        let s = stream_mut(self, h.raw)?;
        let fd = sys::fd::bind_unix(path.as_ref())?;
        s.sock = Sock::Bound(fd);
        s.bound_path = Some(path.as_ref().to_path_buf());
        Ok(())
    }

    /// Sets who may connect to a bound pipe's path (`uv_pipe_chmod`): read
    /// and/or write permission for everyone. A listener the handle did not
    /// bind itself (adopted, or inherited by socket activation) is changed
    /// at the path it is bound to, as libuv reads it with
    /// `uv_pipe_getsockname`.
    ///
    /// # Errors
    ///
    /// A stale id, a pipe not bound to a filesystem path (`EBADF`), or
    /// `chmod`'s error.
    pub fn pipe_chmod(
        &mut self,
        h: Handle<Pipe>,
        readable: bool,
        writable: bool,
    ) -> io::Result<()> {
        use std::os::unix::fs::PermissionsExt;
        let s = stream_ref(self, h.raw)?;
        // A socket this handle did not bind (socket-activated, adopted) has
        // no bound_path: its own name, as libuv's uv_pipe_chmod reads it.
        let path = s
            .bound_path
            .clone()
            .or_else(|| s.sock.fd().and_then(|fd| sys::fd::local_unix_path(fd).ok()))
            .filter(|p| {
                !p.as_os_str().is_empty() && !p.as_os_str().as_encoded_bytes().starts_with(b"\0")
            })
            .ok_or_else(|| io::Error::from_raw_os_error(nix::libc::EBADF))?;
        let mut mode = std::fs::metadata(&path)?.permissions().mode();
        if readable {
            mode |= 0o444;
        }
        if writable {
            mode |= 0o222;
        }
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode))
    }

    /// Listens for connections on a bound pipe (`uv_listen`). See
    /// [`tcp_listen`](Self::tcp_listen) for the callback's contract.
    ///
    /// # Errors
    ///
    /// A stale id or closing handle, an IPC pipe (`EINVAL`), an unbound pipe
    /// (`EINVAL`), or `listen`'s error; `cb` is then dropped.
    pub fn pipe_listen(
        &mut self,
        h: Handle<Pipe>,
        backlog: i32,
        mut cb: impl FnMut(&mut Loop, Handle<Pipe>, io::Result<Handle<Pipe>>) + 'static,
    ) -> io::Result<()> {
        stream::listen_raw(
            self,
            h.raw,
            backlog,
            Box::new(move |lp, raw, r| cb(lp, Handle::from_raw(raw), r.map(Handle::from_raw))),
        )
    }

    /// Connects to the pipe bound at `path` (`uv_pipe_connect`). Errors such
    /// as `ENOENT` or `ECONNREFUSED` are delivered to `cb`, never returned.
    ///
    /// # Errors
    ///
    /// A stale id or closing handle, a handle that already has a socket
    /// (`EINVAL`), or socket creation failing; `cb` is then dropped.
    pub fn pipe_connect(
        &mut self,
        h: Handle<Pipe>,
        path: impl AsRef<Path>,
        cb: impl FnOnce(&mut Loop, Handle<Pipe>, io::Result<()>) + 'static,
    ) -> io::Result<()> {
        if self.slot(h.raw)?.flags & super::handle::flags::CLOSING != 0 {
            return Err(super::event_loop::closing_err());
        }
        let s = stream_mut(self, h.raw)?;
        if !matches!(s.sock, Sock::Unset) {
            return Err(einval("pipe_connect: the handle already has a socket"));
        }
        let fd = sys::fd::socket(AddressFamily::Unix, SockType::Stream)?;
        let done = sys::fd::connect_unix(fd.as_fd(), path.as_ref());
        s.sock = Sock::UnixStream(mio::net::UnixStream::from_std(fd.into()));
        stream::start_connect(
            self,
            h.raw,
            done,
            Box::new(move |lp, raw, r| cb(lp, Handle::from_raw(raw), r)),
        )
    }

    /// The path the pipe is bound to (`uv_pipe_getsockname`); empty for an
    /// unnamed socket. Abstract names start with a NUL byte.
    ///
    /// # Errors
    ///
    /// A stale id or `EBADF` without a socket.
    pub fn pipe_getsockname(&self, h: Handle<Pipe>) -> io::Result<PathBuf> {
        let s = stream_ref(self, h.raw)?;
        sys::fd::local_unix_path(
            s.sock
                .fd()
                .ok_or_else(|| io::Error::from_raw_os_error(nix::libc::EBADF))?,
        )
    }

    /// The path of the peer's socket (`uv_pipe_getpeername`).
    ///
    /// # Errors
    ///
    /// A stale id, `EBADF` without a socket, `ENOTCONN` when not connected.
    pub fn pipe_getpeername(&self, h: Handle<Pipe>) -> io::Result<PathBuf> {
        let s = stream_ref(self, h.raw)?;
        sys::fd::peer_unix_path(
            s.sock
                .fd()
                .ok_or_else(|| io::Error::from_raw_os_error(nix::libc::EBADF))?,
        )
    }

    /// Whether the pipe is in IPC mode.
    pub fn pipe_is_ipc(&self, h: Handle<Pipe>) -> bool {
        stream_ref(self, h.raw).is_ok_and(|s| s.ipc)
    }

    /// How many received fds wait to be accepted (`uv_pipe_pending_count`);
    /// always 0 on a pipe that is not in IPC mode.
    pub fn pipe_pending_count(&self, h: Handle<Pipe>) -> usize {
        stream_ref(self, h.raw).map_or(0, |s| s.pending_fds.len())
    }

    /// The type of the next received fd (`uv_pipe_pending_type`), or `None`
    /// if none is waiting.
    pub fn pipe_pending_type(&self, h: Handle<Pipe>) -> Option<PendingType> {
        let s = stream_ref(self, h.raw).ok()?;
        let fd = s.pending_fds.front()?;
        Some(kind_to_type(sys::fd::socket_kind(fd.as_fd())))
    }

    /// Takes the next received fd off the pipe without making a handle of
    /// it. The fd is CLOEXEC.
    ///
    /// # Errors
    ///
    /// A stale id, or `EAGAIN` if no fd is waiting.
    pub fn pipe_take_pending_fd(&mut self, h: Handle<Pipe>) -> io::Result<OwnedFd> {
        let s = stream_mut(self, h.raw)?;
        s.pending_fds
            .pop_front()
            .ok_or_else(|| io::Error::from_raw_os_error(nix::libc::EAGAIN))
    }

    /// Turns the next received fd into a handle of its type (`uv_accept`
    /// on an IPC pipe).
    ///
    /// # Errors
    ///
    /// A stale id; `EAGAIN` if no fd is waiting; `ENOTSUP` for an fd that is
    /// no socket we know, which is closed (nothing leaks).
    pub fn pipe_accept_pending(&mut self, h: Handle<Pipe>) -> io::Result<Socket> {
        let fd = self.pipe_take_pending_fd(h)?;
        // The fd arrived with MSG_CMSG_CLOEXEC; it only may lack O_NONBLOCK
        // (a status flag of the open file, shared with the sender). The kind
        // is looked up once, not again by the open.
        sys::fd::ensure_nonblock(fd.as_fd())?;
        let kind = sys::fd::socket_kind(fd.as_fd());
        self.adopt_socket(fd, kind)
    }

    /// Makes a handle of `fd`'s type for an fd that is CLOEXEC and
    /// non-blocking already and whose kind is known. On error the handle
    /// is closed and the fd with it.
    fn adopt_socket(&mut self, fd: OwnedFd, kind: SocketKind) -> io::Result<Socket> {
        let (h, r): (Socket, _) = match kind_to_type(kind) {
            PendingType::Tcp => {
                let t = self.tcp_init();
                (t.into(), self.tcp_adopt(t, fd, kind))
            }
            PendingType::Pipe => {
                let p = self.pipe_init(false);
                (p.into(), self.pipe_adopt(p, fd, kind))
            }
            PendingType::Udp => {
                let u = self.udp_init();
                (u.into(), self.udp_open(u, fd))
            }
            PendingType::Unknown => return Err(io::Error::from_raw_os_error(nix::libc::ENOTSUP)),
        };
        match r {
            Ok(()) => Ok(h),
            Err(e) => {
                self.close_if_open(h);
                Err(e)
            }
        }
    }

    /// Writes `bufs` on an IPC pipe with `send`'s socket attached
    /// (`uv_write2`); `send` is a `Handle<Tcp>`, `Handle<Pipe>`,
    /// `Handle<Udp>` or any [`Socket`]: the fd travels in one `SCM_RIGHTS` message with the
    /// first byte of this write. The sender keeps its handle; the receiver
    /// gets its own copy of the socket. `bufs` must hold at least one byte
    /// (Linux drops an fd sent with no data).
    ///
    /// # Errors
    ///
    /// As [`write`](Self::write); also `EINVAL` on a pipe not in IPC mode or
    /// with empty `bufs`, and `EBADF` if `send` has no socket or is closing.
    pub fn write2(
        &mut self,
        h: Handle<Pipe>,
        bufs: &[&[u8]],
        send: impl Into<Socket>,
        cb: impl FnOnce(&mut Loop, Handle<Pipe>, io::Result<()>) + 'static,
    ) -> io::Result<()> {
        stream::write_impl(
            self,
            h.raw,
            bufs,
            Some(send.into().raw()),
            Box::new(move |lp, raw, r| cb(lp, Handle::from_raw(raw), r)),
        )
    }
}

/// Reads an environment variable and removes it, so that processes spawned
/// later do not inherit it. Call it at start-up, before spawning threads:
/// changing the environment races with other threads reading it.
pub fn take_env_var(name: impl AsRef<std::ffi::OsStr>) -> Option<std::ffi::OsString> {
    sys::env::take_var(name.as_ref())
}

impl Loop {
    /// Makes a handle of the right type for a socket fd: a TCP socket
    /// (listening, connected or only bound) becomes a `Handle<Tcp>`, a Unix
    /// stream socket a `Handle<Pipe>` (not in IPC mode), a UDP socket a
    /// `Handle<Udp>` (`uv_guess_handle` followed by the matching `*_open`).
    /// This is how Node's `listen({fd})` and `bind({fd})` open an fd. The
    /// fd is made non-blocking and CLOEXEC; the handle owns it from here on.
    ///
    /// The fd comes as an [`OwnedFd`]: an fd known only by its number (one
    /// this process inherited) becomes one through [`take_env_fd`] when an
    /// environment variable names it, through [`dup_fd_number`] to listen
    /// on a copy, or through the `unsafe` `OwnedFd::from_raw_fd`, whose
    /// caller vouches that nothing else owns it.
    ///
    /// # Examples
    ///
    /// ```
    /// use std::os::fd::OwnedFd;
    /// use uvcluster::uv::{Loop, RunMode, Socket};
    ///
    /// let mut lp = Loop::new()?;
    /// let std_listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    /// let port = std_listener.local_addr()?.port();
    /// let Socket::Tcp(t) = lp.socket_open(OwnedFd::from(std_listener))? else {
    ///     unreachable!("a TCP listener opens as a Handle<Tcp>");
    /// };
    /// assert_eq!(lp.tcp_getsockname(t)?.port(), port);
    /// lp.close(t, |_| {})?;
    /// lp.run(RunMode::Default)?;
    /// # Ok::<(), std::io::Error>(())
    /// ```
    ///
    /// # Errors
    ///
    /// `ENOTSUP` if `fd` is not a TCP, Unix stream or UDP socket; the
    /// `fcntl` error making it non-blocking. The fd is closed either way.
    pub fn socket_open(&mut self, fd: OwnedFd) -> io::Result<Socket> {
        sys::fd::set_cloexec_nonblock(fd.as_fd())?;
        let kind = sys::fd::socket_kind(fd.as_fd());
        self.adopt_socket(fd, kind)
    }
}

/// Duplicates an fd of this process, given by number, into a new fd the
/// caller owns (CLOEXEC); the original stays open and keeps its owner. For
/// APIs that name an fd by number without giving it away, such as Node's
/// `server.listen({fd})` (answered by a cluster primary, or by a server
/// listening on its own). Open the result with [`Loop::socket_open`] or
/// one of [`Loop::tcp_open`], [`Loop::pipe_open`], [`Loop::udp_open`].
///
/// This takes ownership of nothing, so it is safe: whatever owns the
/// number keeps it, and the copy is closed by its own owner. (Like
/// reading `/proc/self/fd/N`, it can reach any fd of the process; it is
/// meant for numbers the program was given on purpose.)
///
/// # Errors
///
/// `EBADF` if no such fd is open, `EINVAL` for a negative number, `EMFILE`.
pub fn dup_fd_number(fd: i32) -> io::Result<OwnedFd> {
    sys::env::dup_fd_number(fd)
}

/// Takes the fd that environment variable `var` names, as a parent that
/// placed an fd for this process says where it is: `NODE_CHANNEL_FD` for
/// Node's IPC channel, a `LISTEN_FD`-style variable for an inherited
/// listening socket. The variable is removed from the environment (so
/// children do not inherit it, and the fd cannot be taken twice through
/// it), and the fd becomes an [`OwnedFd`] that the caller owns and whose
/// drop closes it. Returns `Ok(None)` when `var` is not set.
///
/// This is the one place where the crate turns an fd number into an owned
/// fd without `unsafe` at the call: the variable is the parent's statement
/// that the fd was placed for this process, and removing it when it is
/// read makes this its only adoption. Call it at start-up, before threads
/// are spawned (it changes the environment), once per variable, and do not
/// also adopt the same number some other way.
///
/// # Examples
///
/// ```
/// use uvcluster::uv::take_env_fd;
///
/// // Not set: nothing to take.
/// assert!(take_env_fd("UVCLUSTER_DOC_NO_SUCH_FD")?.is_none());
/// # Ok::<(), std::io::Error>(())
/// ```
///
/// # Errors
///
/// `InvalidInput` if the value is not a decimal fd number (the message
/// names the variable and the value); `EBADF` if no such fd is open. The
/// variable is removed in every case.
pub fn take_env_fd(var: impl AsRef<std::ffi::OsStr>) -> io::Result<Option<OwnedFd>> {
    sys::env::take_env_fd(var.as_ref())
}
