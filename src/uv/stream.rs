//! Streams: the reading, writing and shutdown machinery shared by [`Tcp`]
//! and [`Pipe`] handles (libuv's `src/unix/stream.c`).
//!
//! mio is edge-triggered. A stream remembers what the last events said
//! (`readable`, `writable`) until an operation hits `WouldBlock`; where it
//! stops early on purpose (the per-event bounds on reads and accepts), it puts
//! itself on the loop's still-ready list and is serviced again at the next
//! poll, which then does not block.
//!
//! Sockets are registered with the poller lazily, the first time the loop
//! must wait on them (reading, a write that would block, a connect). A socket
//! that is accepted and handed straight to another process never costs an
//! `epoll_ctl`. Interest is readable, plus writable only while the stream
//! needs it: a connect in progress, writes queued behind `EAGAIN`, or a
//! shutdown waiting for the queue. A write that completes at once (the
//! common case) therefore never touches `epoll_ctl` (libuv does one
//! redundant `EPOLL_CTL_MOD` per write). Writable interest is not kept on
//! permanently because on a Unix-domain socket every read by the peer wakes
//! a writable-interested waiter (`unix_write_space`): a one-in-flight
//! ping-pong then pays an extra wake-up and context switch per message.

use std::collections::VecDeque;
use std::io::{self, IoSlice, Read, Write};
use std::mem;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::PathBuf;
use std::time::Duration;

use mio::Interest;

use super::callback::CallbackSlot;
use super::event_loop::{Data, Loop, READ_BUF_SIZE, Ready, closing_err};
use super::handle::{Handle, HandleId, HandleType, Pipe, RawHandle, Stream, Tcp, flags};
use crate::sys;

/// Reads per readiness event before yielding to other handles (libuv: 32).
const READS_PER_EVENT: usize = 32;
/// Accepts per readiness event before yielding to other handles.
pub(crate) const ACCEPTS_PER_EVENT: usize = 32;

type ReadFn = dyn FnMut(&mut Loop, RawHandle, io::Result<&[u8]>);
type ConnFn = dyn FnMut(&mut Loop, RawHandle, io::Result<RawHandle>);
pub(crate) type ConnCb = Box<ConnFn>;
pub(crate) type ReqCb = Box<dyn FnOnce(&mut Loop, RawHandle, io::Result<()>)>;

/// The socket under a stream handle, by state.
#[derive(Default)]
pub(crate) enum Sock {
    /// No socket yet (a TCP handle before bind or connect), or closed.
    #[default]
    Unset,
    /// A socket that is bound but neither listening nor connected.
    Bound(OwnedFd),
    TcpListener(mio::net::TcpListener),
    TcpStream(mio::net::TcpStream),
    UnixListener(mio::net::UnixListener),
    UnixStream(mio::net::UnixStream),
}

impl Sock {
    pub(crate) fn fd(&self) -> Option<BorrowedFd<'_>> {
        match self {
            Sock::Unset => None,
            Sock::Bound(fd) => Some(fd.as_fd()),
            Sock::TcpListener(s) => Some(s.as_fd()),
            Sock::TcpStream(s) => Some(s.as_fd()),
            Sock::UnixListener(s) => Some(s.as_fd()),
            Sock::UnixStream(s) => Some(s.as_fd()),
        }
    }

    fn is_connected_stream(&self) -> bool {
        matches!(self, Sock::TcpStream(_) | Sock::UnixStream(_))
    }

    fn read(&self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Sock::TcpStream(s) => (&*s).read(buf),
            Sock::UnixStream(s) => (&*s).read(buf),
            _ => Err(io::Error::from(io::ErrorKind::NotConnected)),
        }
    }

    fn write_vectored(&self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        match self {
            Sock::TcpStream(s) => (&*s).write_vectored(bufs),
            Sock::UnixStream(s) => (&*s).write_vectored(bufs),
            _ => Err(io::Error::from(io::ErrorKind::NotConnected)),
        }
    }

    /// One buffer: a plain `send` (`write` on a Unix socket), which spares
    /// the kernel the iovec import of `writev`.
    fn write(&self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Sock::TcpStream(s) => (&*s).write(buf),
            Sock::UnixStream(s) => (&*s).write(buf),
            _ => Err(io::Error::from(io::ErrorKind::NotConnected)),
        }
    }
}

struct WriteReq {
    buf: Vec<u8>,
    off: usize,
    /// The fd to send with the first byte of this request (IPC pipes).
    fd: Option<OwnedFd>,
    cb: ReqCb,
}

/// The state of a TCP or pipe handle.
#[derive(Default)]
pub(crate) struct StreamState {
    pub(crate) sock: Sock,
    pub(crate) ipc: bool,
    registered: bool,
    /// The registered interest includes WRITABLE.
    write_interest: bool,
    /// Remembered readiness (edge-triggered: true until `WouldBlock`).
    readable: bool,
    writable: bool,
    /// An event said the peer closed its side: read on past short reads
    /// until EOF (see [`Ready::read_closed`]).
    read_closed: bool,
    reading: bool,
    listening: bool,
    /// Out of fds, with [`OnEmfile::Pause`]: no accept until the retry
    /// timer clears it.
    accept_paused: bool,
    /// What accept does out of fds (libuv's trick unless set).
    on_emfile: OnEmfile,
    connecting: bool,
    /// A shutdown was requested; no more writes are accepted.
    shut: bool,
    /// A write failed; later writes fail with EPIPE.
    write_failed: bool,
    in_pending: bool,
    pub(crate) delayed_error: Option<io::Error>,
    read_cb: CallbackSlot<ReadFn>,
    conn_cb: CallbackSlot<ConnFn>,
    connect_cb: Option<ReqCb>,
    connect_result: Option<io::Result<()>>,
    shutdown_cb: Option<ReqCb>,
    shutdown_result: Option<io::Result<()>>,
    writes: VecDeque<WriteReq>,
    queued_bytes: usize,
    /// Completed requests whose callbacks wait for the pending phase.
    done: Vec<(ReqCb, io::Result<()>)>,
    /// Fds received on an IPC pipe and not yet accepted.
    pub(crate) pending_fds: VecDeque<OwnedFd>,
    /// The path this pipe bound; unlinked when the pipe closes, as libuv does.
    pub(crate) bound_path: Option<PathBuf>,
}

impl StreamState {
    pub(crate) fn new(sock: Sock, ipc: bool) -> Box<StreamState> {
        Box::new(StreamState {
            sock,
            ipc,
            ..Default::default()
        })
    }
}

mod sealed {
    pub trait Sealed {}
    impl Sealed for super::Tcp {}
    impl Sealed for super::Pipe {}
}

/// Handle kinds that are streams: [`Tcp`] and [`Pipe`]. Sealed.
pub trait StreamType: HandleType + sealed::Sealed {}
impl StreamType for Tcp {}
impl StreamType for Pipe {}

/// Anything that names one stream: a `Handle<Tcp>`, a `Handle<Pipe>`, or a
/// [`Stream`]. The stream operations that take no callback
/// ([`Loop::read_stop`], [`Loop::is_reading`], [`Loop::try_write`],
/// [`Loop::write_queue_size`]) take any of them. Sealed.
pub trait StreamId: HandleId {}
impl<K: StreamType> StreamId for Handle<K> {}
impl StreamId for Stream {}

pub(crate) fn stream_mut(lp: &mut Loop, raw: RawHandle) -> io::Result<&mut StreamState> {
    match &mut lp.slot_mut(raw)?.data {
        Data::Tcp(s) | Data::Pipe(s) => Ok(s),
        _ => unreachable!("a stream handle always names a stream slot"),
    }
}

pub(crate) fn stream_ref(lp: &Loop, raw: RawHandle) -> io::Result<&StreamState> {
    match &lp.slot(raw)?.data {
        Data::Tcp(s) | Data::Pipe(s) => Ok(s),
        _ => unreachable!("a stream handle always names a stream slot"),
    }
}

fn open_stream_mut(lp: &mut Loop, raw: RawHandle) -> io::Result<&mut StreamState> {
    match &mut lp.open_slot_mut(raw)?.data {
        Data::Tcp(s) | Data::Pipe(s) => Ok(s),
        _ => unreachable!("a stream handle always names a stream slot"),
    }
}

fn ecanceled() -> io::Error {
    io::Error::from_raw_os_error(nix::libc::ECANCELED)
}

fn errno(code: i32) -> io::Error {
    io::Error::from_raw_os_error(code)
}

/// Whether the stream must hear about writability: a connect in progress,
/// queued writes, or a shutdown waiting for the queue to drain.
fn needs_write(s: &StreamState) -> bool {
    s.connecting
        || !s.writes.is_empty()
        || (s.shut && s.shutdown_cb.is_some() && s.shutdown_result.is_none())
}

/// Registers the socket with the poller if it is not yet, and brings its
/// interest in line with [`needs_write`]: readable always, writable only
/// when needed. Changing the interest of a registered socket is one
/// `EPOLL_CTL_MOD`; the kernel re-polls the socket then, so an edge that
/// already happened is reported again and nothing is missed.
pub(crate) fn ensure_registered(lp: &mut Loop, raw: RawHandle) -> io::Result<()> {
    let Loop { slots, poll, .. } = lp;
    let s = match &mut slots[raw.index as usize].data {
        Data::Tcp(s) | Data::Pipe(s) => s,
        _ => unreachable!(),
    };
    let listener = matches!(s.sock, Sock::TcpListener(_) | Sock::UnixListener(_));
    let want = !listener && needs_write(s);
    if s.registered && s.write_interest == want {
        return Ok(());
    }
    let token = mio::Token(raw.token());
    let interest = if want {
        Interest::READABLE | Interest::WRITABLE
    } else {
        Interest::READABLE
    };
    let reg = poll.registry();
    let again = s.registered;
    match &mut s.sock {
        Sock::TcpStream(x) if again => reg.reregister(x, token, interest)?,
        Sock::TcpStream(x) => reg.register(x, token, interest)?,
        Sock::UnixStream(x) if again => reg.reregister(x, token, interest)?,
        Sock::UnixStream(x) => reg.register(x, token, interest)?,
        Sock::TcpListener(x) => reg.register(x, token, interest)?,
        Sock::UnixListener(x) => reg.register(x, token, interest)?,
        Sock::Unset | Sock::Bound(_) => return Err(errno(nix::libc::ENOTCONN)),
    }
    s.registered = true;
    s.write_interest = want;
    Ok(())
}

/// Drops writable interest once nothing needs it any more (only for a
/// stream that is registered; an unregistered one stays so).
fn drop_write_interest(lp: &mut Loop, raw: RawHandle) {
    if let Ok(s) = stream_ref(lp, raw)
        && s.registered
        && s.write_interest
        && !needs_write(s)
    {
        let _ = ensure_registered(lp, raw);
    }
}

fn schedule_pending(lp: &mut Loop, raw: RawHandle) {
    if let Ok(s) = stream_mut(lp, raw)
        && !s.in_pending
    {
        s.in_pending = true;
        lp.add_pending(raw);
    }
}

fn update_active(lp: &mut Loop, raw: RawHandle) {
    if let Ok(s) = stream_ref(lp, raw) {
        let active = s.reading || s.listening;
        lp.set_active(raw, active);
    }
}

// ----- events -----------------------------------------------------------

pub(crate) fn on_io(lp: &mut Loop, raw: RawHandle, ready: Ready) {
    let Ok(s) = stream_mut(lp, raw) else { return };
    s.readable |= ready.readable || ready.error;
    s.writable |= ready.writable || ready.error;
    s.read_closed |= ready.read_closed;
    if s.connecting {
        if !s.writable {
            return;
        }
        finish_connect(lp, raw);
    }
    let Ok(s) = stream_ref(lp, raw) else { return };
    if s.listening {
        if s.readable {
            do_accept(lp, raw);
        }
        return;
    }
    if s.readable && s.reading {
        do_read(lp, raw);
    }
    let Ok(s) = stream_ref(lp, raw) else { return };
    if s.writable && (!s.writes.is_empty() || (s.shut && s.shutdown_result.is_none())) {
        do_write(lp, raw);
    }
}

fn finish_connect(lp: &mut Loop, raw: RawHandle) {
    let Ok(s) = stream_mut(lp, raw) else { return };
    s.connecting = false;
    let res = match s.sock.fd().map(sys::fd::take_socket_error) {
        Some(Ok(None)) => Ok(()),
        Some(Ok(Some(e))) | Some(Err(e)) => Err(e),
        None => Err(errno(nix::libc::EBADF)),
    };
    if res.is_err() {
        // libuv cancels writes queued behind a failed connect.
        cancel_writes(s, ecanceled);
    }
    s.connect_result = Some(res);
    schedule_pending(lp, raw);
    drop_write_interest(lp, raw);
}

fn do_accept(lp: &mut Loop, raw: RawHandle) {
    for _ in 0..ACCEPTS_PER_EVENT {
        let Ok(s) = stream_mut(lp, raw) else { return };
        if !s.listening || s.accept_paused {
            return;
        }
        let accepted = match &s.sock {
            Sock::TcpListener(l) => l
                .accept()
                .map(|(c, _)| Data::Tcp(StreamState::new(Sock::TcpStream(c), false))),
            Sock::UnixListener(l) => l
                .accept()
                .map(|(c, _)| Data::Pipe(StreamState::new(Sock::UnixStream(c), false))),
            _ => return,
        };
        let result = match accepted {
            Ok(data) => Ok(lp.insert(data)),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                s.readable = false;
                return;
            }
            Err(e)
                if matches!(
                    e.raw_os_error(),
                    Some(nix::libc::EMFILE | nix::libc::ENFILE)
                ) =>
            {
                match s.on_emfile {
                    OnEmfile::Shed => emfile_trick(lp, raw),
                    OnEmfile::Pause(delay) => pause_accepting(lp, raw, delay),
                }
                return;
            }
            Err(e)
                if e.kind() == io::ErrorKind::Interrupted
                    || e.raw_os_error() == Some(nix::libc::ECONNABORTED) =>
            {
                continue;
            }
            Err(e) => Err(e),
        };
        if result.is_err() {
            // A persistent error (ENOMEM, ENOBUFS, EPERM from a firewall
            // hook) would repeat on every retry: report it once and wait
            // for the next connection's edge instead of spinning.
            if let Ok(s) = stream_mut(lp, raw) {
                s.readable = false;
            }
            call_conn_cb(lp, raw, result);
            return;
        }
        call_conn_cb(lp, raw, result);
    }
    lp.still_ready.push(raw);
}

fn call_conn_cb(lp: &mut Loop, raw: RawHandle, result: io::Result<RawHandle>) {
    let Ok(s) = stream_mut(lp, raw) else { return };
    let Some(mut cb) = s.conn_cb.take() else {
        // No callback (cannot happen while listening): do not leak the client.
        if let Ok(c) = result {
            let _ = lp.close_raw(c, None);
        }
        return;
    };
    cb(lp, raw, result);
    // The callback slot's rule, and the handle must still be listening.
    if let Ok(s) = stream_mut(lp, raw)
        && s.listening
    {
        s.conn_cb.put_back(cb);
    }
}

/// libuv's `uv__emfile_trick`: out of fds, release the spare one, accept and
/// close everything pending so clients see a close rather than hang in the
/// backlog and the listener does not spin, then take the spare back.
fn emfile_trick(lp: &mut Loop, raw: RawHandle) {
    let spare = lp.emfile_fd.take();
    if spare.is_none() {
        log::warn!("accept: out of file descriptors and no spare fd to recover with");
    }
    drop(spare);
    if let Ok(s) = stream_mut(lp, raw) {
        loop {
            let r = match &s.sock {
                Sock::TcpListener(l) => l.accept().map(drop),
                Sock::UnixListener(l) => l.accept().map(drop),
                _ => break,
            };
            match r {
                Ok(()) => continue,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    s.readable = false;
                    break;
                }
                Err(_) => break,
            }
        }
    }
    lp.emfile_fd = sys::fd::open_spare().ok();
}

/// nginx's rule out of fds (`ngx_event_accept` disables accept events for
/// `accept_mutex_delay`): stop accepting, leave pending connections in the
/// kernel's backlog, and try again after `delay`. Readiness stays
/// remembered, since nothing was drained.
fn pause_accepting(lp: &mut Loop, raw: RawHandle, delay: Duration) {
    let Ok(s) = stream_mut(lp, raw) else { return };
    s.accept_paused = true;
    let timer = lp.timer_init();
    let started = lp.timer_start(timer, delay, Duration::ZERO, move |lp, t| {
        let _ = lp.close(t, |_| {});
        if let Ok(s) = stream_mut(lp, raw) {
            s.accept_paused = false;
            if s.listening && s.readable {
                lp.still_ready.push(raw);
            }
        }
    });
    if started.is_err() {
        // Cannot happen for a fresh timer; never leave the listener paused.
        if let Ok(s) = stream_mut(lp, raw) {
            s.accept_paused = false;
        }
        let _ = lp.close(timer, |_| {});
        return;
    }
    // The listener keeps the loop alive, not its retry timer.
    let _ = lp.unref_handle(timer);
}

fn do_read(lp: &mut Loop, raw: RawHandle) {
    if lp.read_buf.len() < READ_BUF_SIZE {
        lp.read_buf.resize(READ_BUF_SIZE, 0);
    }
    for _ in 0..READS_PER_EVENT {
        let mut buf = mem::take(&mut lp.read_buf);
        let Ok(s) = stream_mut(lp, raw) else {
            lp.read_buf = buf;
            return;
        };
        if !s.reading {
            lp.read_buf = buf;
            return;
        }
        // The bytes read, and whether control data came with them.
        let res = if s.ipc {
            match s.sock.fd() {
                Some(fd) => {
                    let r = sys::scm_rights::recv_with_fds(fd, &mut buf, &mut s.pending_fds);
                    r.map(|rcv| {
                        if rcv.truncated {
                            log::warn!("IPC read: control data truncated, some fds were dropped");
                        }
                        if rcv.other_cmsgs > 0 {
                            log::debug!(
                                "IPC read: ignored {} unexpected control messages",
                                rcv.other_cmsgs
                            );
                        }
                        (rcv.bytes, rcv.brought_control())
                    })
                }
                None => Err(errno(nix::libc::EBADF)),
            }
        } else {
            s.sock.read(&mut buf).map(|n| (n, false))
        };
        let (outcome, more) = match res {
            Ok((0, _)) => {
                s.reading = false;
                s.readable = false;
                (Some(Ok(0)), false)
            }
            // A short read drained the socket (any data that arrives later
            // raises a new edge), unless the peer has closed: then EOF is
            // still to be read and no new edge will announce it. On an IPC
            // pipe a short read proves it only if it brought no fds (see
            // `Received::brought_control`).
            Ok((n, with_control)) => {
                let more = n == buf.len() || with_control || s.read_closed;
                if !more {
                    s.readable = false;
                }
                (Some(Ok(n)), more)
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                s.readable = false;
                (None, false)
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => (None, true),
            Err(e) => {
                s.reading = false;
                s.readable = false;
                (Some(Err(e)), false)
            }
        };
        let Some(outcome) = outcome else {
            lp.read_buf = buf;
            if more {
                continue;
            }
            return;
        };
        let stopped = outcome.as_ref().map_or(true, |n| *n == 0);
        if stopped {
            update_active(lp, raw);
        }
        let Ok(s) = stream_mut(lp, raw) else {
            lp.read_buf = buf;
            return;
        };
        // The callback slot's rule, and the stream must still be reading
        // (EOF and errors stop it before the call).
        if let Some(mut f) = s.read_cb.take() {
            match outcome {
                Ok(n) => f(lp, raw, Ok(&buf[..n])),
                Err(e) => f(lp, raw, Err(e)),
            }
            if let Ok(s) = stream_mut(lp, raw)
                && s.reading
            {
                s.read_cb.put_back(f);
            }
        }
        lp.read_buf = buf;
        if !more || stream_ref(lp, raw).is_err() {
            return;
        }
    }
    // The bound was hit with data possibly left: come back next pass.
    lp.still_ready.push(raw);
}

/// Writes queued requests until the queue is empty or the socket is full,
/// then performs a deferred shutdown once the queue has drained.
fn do_write(lp: &mut Loop, raw: RawHandle) {
    let Ok(s) = stream_mut(lp, raw) else { return };
    let mut completed = false;
    while let Some(req) = s.writes.front_mut() {
        let rest = &req.buf[req.off..];
        let res = if rest.is_empty() && req.fd.is_none() {
            Ok(0)
        } else {
            let iov = [IoSlice::new(rest)];
            match (&req.fd, s.sock.fd()) {
                (Some(fd), Some(sock)) => sys::scm_rights::send_with_fd(sock, &iov, fd.as_fd()),
                _ => s.sock.write(rest),
            }
        };
        match res {
            Ok(n) => {
                req.off += n;
                s.queued_bytes -= n;
                req.fd = None;
                if req.off == req.buf.len() {
                    let req = s.writes.pop_front().expect("front exists");
                    s.done.push((req.cb, Ok(())));
                    completed = true;
                }
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                s.writable = false;
                break;
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => {
                let code = e.raw_os_error().unwrap_or(nix::libc::EPIPE);
                let req = s.writes.pop_front().expect("front exists");
                s.queued_bytes -= req.buf.len() - req.off;
                s.done.push((req.cb, Err(e)));
                cancel_writes(s, || errno(code));
                s.write_failed = true;
                completed = true;
                break;
            }
        }
    }
    if s.writes.is_empty() && s.shut && s.shutdown_cb.is_some() && s.shutdown_result.is_none() {
        let res = match s.sock.fd() {
            Some(fd) if !s.write_failed => sys::fd::shutdown_write(fd),
            _ => Err(errno(nix::libc::EPIPE)),
        };
        s.shutdown_result = Some(res);
        completed = true;
    }
    if completed {
        schedule_pending(lp, raw);
        drop_write_interest(lp, raw);
    }
}

fn cancel_writes(s: &mut StreamState, err: impl Fn() -> io::Error) {
    for req in s.writes.drain(..) {
        s.done.push((req.cb, Err(err())));
    }
    s.queued_bytes = 0;
}

/// Runs the deferred callbacks of a stream: connect, then completed writes in
/// order, then shutdown.
pub(crate) fn run_pending(lp: &mut Loop, raw: RawHandle) {
    let Ok(s) = stream_mut(lp, raw) else { return };
    s.in_pending = false;
    if let Some(res) = s.connect_result.take()
        && let Some(cb) = s.connect_cb.take()
    {
        lp.active_reqs -= 1;
        cb(lp, raw, res);
    }
    call_done(lp, raw);
    let Ok(s) = stream_mut(lp, raw) else { return };
    if let Some(res) = s.shutdown_result.take()
        && let Some(cb) = s.shutdown_cb.take()
    {
        lp.active_reqs -= 1;
        cb(lp, raw, res);
    }
}

fn call_done(lp: &mut Loop, raw: RawHandle) {
    let Ok(s) = stream_mut(lp, raw) else { return };
    if s.done.is_empty() {
        return;
    }
    if s.done.len() == 1 {
        // One completion (the usual case): no need to move the list aside.
        // Completions queued by the callback go to the emptied list and,
        // as below, wait for the next pending pass.
        let (cb, res) = s.done.pop().expect("one entry");
        lp.active_reqs -= 1;
        cb(lp, raw, res);
        return;
    }
    let mut done = mem::take(&mut s.done);
    for (cb, res) in done.drain(..) {
        lp.active_reqs -= 1;
        cb(lp, raw, res);
    }
    // Keep the vector's allocation for the next batch.
    if let Ok(s) = stream_mut(lp, raw)
        && s.done.is_empty()
    {
        s.done = done;
    }
}

// ----- close --------------------------------------------------------------

pub(crate) fn close_now(lp: &mut Loop, raw: RawHandle) {
    let Loop { slots, poll, .. } = lp;
    let s = match &mut slots[raw.index as usize].data {
        Data::Tcp(s) | Data::Pipe(s) => s,
        _ => unreachable!(),
    };
    s.reading = false;
    s.listening = false;
    s.read_cb.clear();
    s.conn_cb.clear();
    if s.registered {
        let reg = poll.registry();
        let _ = match &mut s.sock {
            Sock::TcpStream(x) => reg.deregister(x),
            Sock::UnixStream(x) => reg.deregister(x),
            Sock::TcpListener(x) => reg.deregister(x),
            Sock::UnixListener(x) => reg.deregister(x),
            _ => Ok(()),
        };
        s.registered = false;
    }
    s.sock = Sock::Unset;
    s.pending_fds.clear();
    if let Some(path) = s.bound_path.take() {
        let _ = std::fs::remove_file(path);
    }
}

/// Cancels what is still outstanding and runs those callbacks, before the
/// close callback (uv__stream_destroy).
pub(crate) fn finish_close(lp: &mut Loop, raw: RawHandle) {
    let Ok(s) = stream_mut(lp, raw) else { return };
    s.connecting = false;
    let connect_cb = s.connect_cb.take();
    s.connect_result = None;
    if let Some(cb) = connect_cb {
        // Even a connect that completed (or failed) before the close reports
        // ECANCELED when its callback had not run yet, as in libuv
        // (uv__stream_destroy): the user closed the handle first.
        lp.active_reqs -= 1;
        cb(lp, raw, Err(ecanceled()));
    }
    if let Ok(s) = stream_mut(lp, raw) {
        cancel_writes(s, ecanceled);
    }
    call_done(lp, raw);
    let Ok(s) = stream_mut(lp, raw) else { return };
    if let Some(cb) = s.shutdown_cb.take() {
        let res = s.shutdown_result.take().unwrap_or_else(|| Err(ecanceled()));
        lp.active_reqs -= 1;
        cb(lp, raw, res);
    }
}

// ----- API -------------------------------------------------------------------

/// What a listening stream does when `accept` fails for want of file
/// descriptors (`EMFILE`, `ENFILE`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum OnEmfile {
    /// libuv's `uv__emfile_trick` (the default): release a spare fd, accept
    /// and close every pending connection, so clients see a close rather
    /// than hang in the backlog, and take the spare back.
    #[default]
    Shed,
    /// nginx's rule: stop accepting for this long, leaving pending
    /// connections in the kernel's backlog, then try again. Right for a
    /// process whose fds are held by work that will end (a cluster primary's
    /// queue of connections waiting for a worker): the clients wait instead
    /// of being dropped.
    Pause(Duration),
}

impl Loop {
    /// Sets what the listening stream `h` does when it runs out of fds
    /// (see [`OnEmfile`]; libuv has only [`OnEmfile::Shed`]).
    ///
    /// # Errors
    ///
    /// A stale id or closing handle.
    pub fn listen_on_emfile<K: StreamType>(
        &mut self,
        h: Handle<K>,
        on: OnEmfile,
    ) -> io::Result<()> {
        open_stream_mut(self, h.raw)?.on_emfile = on;
        Ok(())
    }

    /// Starts reading (`uv_read_start`). `cb` gets each chunk as
    /// `Ok(&[u8])` (borrowed from one buffer the loop reuses), `Ok(&[])` once
    /// at end of stream, or `Err` on a read error; after EOF or an error the
    /// stream stops reading by itself. The stream is active while reading.
    ///
    /// # Errors
    ///
    /// A stale id or closing handle; `EALREADY` if already reading;
    /// `ENOTCONN` if the stream is not connected.
    pub fn read_start<K: StreamType>(
        &mut self,
        h: Handle<K>,
        mut cb: impl FnMut(&mut Loop, Handle<K>, io::Result<&[u8]>) + 'static,
    ) -> io::Result<()> {
        let s = open_stream_mut(self, h.raw)?;
        if s.reading {
            return Err(errno(nix::libc::EALREADY));
        }
        if !s.sock.is_connected_stream() {
            return Err(errno(nix::libc::ENOTCONN));
        }
        s.reading = true;
        s.read_cb
            .set(Box::new(move |lp, raw, r| cb(lp, Handle::from_raw(raw), r)));
        let resume = s.readable && !s.connecting;
        if let Err(e) = ensure_registered(self, h.raw) {
            let s = stream_mut(self, h.raw)?;
            s.reading = false;
            s.read_cb.clear();
            return Err(e);
        }
        if resume {
            // Data arrived while we were not reading: no new edge will come.
            self.still_ready.push(h.raw);
        }
        update_active(self, h.raw);
        Ok(())
    }

    /// Stops reading (`uv_read_stop`). Data that arrives meanwhile stays in
    /// the kernel and is read after the next [`read_start`](Self::read_start).
    ///
    /// # Errors
    ///
    /// A stale id.
    pub fn read_stop(&mut self, h: impl StreamId) -> io::Result<()> {
        let raw = h.raw();
        let s = stream_mut(self, raw)?;
        s.reading = false;
        s.read_cb.clear();
        update_active(self, raw);
        Ok(())
    }

    /// Whether bytes have arrived on the connected stream `h` that nobody
    /// has read yet: in the kernel's receive buffer, or seen readable by
    /// the loop and not read (a peek; nothing is consumed). `false` at end
    /// of stream, for a stream that is not connected, and for a stale id.
    ///
    /// Beyond libuv. What a server that is about to close an idle
    /// connection checks first: a request already sent is read and
    /// answered, not reset (`net::Server`'s graceful close).
    pub fn has_unread_input(&self, h: impl StreamId) -> bool {
        stream_ref(self, h.raw()).is_ok_and(|s| {
            s.sock.is_connected_stream()
                && s.sock
                    .fd()
                    .is_some_and(|fd| sys::fd::has_unread_input(fd).unwrap_or(false))
        })
    }

    /// Whether the stream is reading.
    pub fn is_reading(&self, h: impl StreamId) -> bool {
        stream_ref(self, h.raw()).is_ok_and(|s| s.reading)
    }

    /// Writes `bufs` in order (`uv_write`). `cb` runs once every byte has been
    /// handed to the kernel, or with the error that stopped it, always from
    /// a later phase, never inside this call.
    ///
    /// The data is written at once if nothing is queued; whatever the socket
    /// does not take is copied into the stream's queue and sent when it
    /// becomes writable. Writes may be queued while a connect is in progress.
    ///
    /// # Errors
    ///
    /// A stale id or closing handle, `ENOTCONN` on a socket that is not a
    /// connected stream, `EPIPE` after shutdown or a failed write; `cb` is
    /// then dropped.
    pub fn write<K: StreamType>(
        &mut self,
        h: Handle<K>,
        bufs: &[&[u8]],
        cb: impl FnOnce(&mut Loop, Handle<K>, io::Result<()>) + 'static,
    ) -> io::Result<()> {
        write_impl(
            self,
            h.raw,
            bufs,
            None,
            Box::new(move |lp, raw, r| cb(lp, Handle::from_raw(raw), r)),
        )
    }

    /// Writes as much of `bufs` as the socket takes now, without queueing
    /// (`uv_try_write`). Returns the number of bytes written.
    ///
    /// # Errors
    ///
    /// `WouldBlock` while writes are queued, a connect is in progress, or the
    /// socket is full; otherwise as [`write`](Self::write).
    pub fn try_write(&mut self, h: impl StreamId, bufs: &[&[u8]]) -> io::Result<usize> {
        let s = open_stream_mut(self, h.raw())?;
        check_writable(s)?;
        if s.connecting || !s.writes.is_empty() {
            return Err(io::ErrorKind::WouldBlock.into());
        }
        let n = write_now(&s.sock, bufs, None);
        if let Err(e) = &n
            && e.kind() == io::ErrorKind::WouldBlock
        {
            s.writable = false;
        }
        n
    }

    /// Bytes queued and not yet written (`uv_stream_get_write_queue_size`).
    pub fn write_queue_size(&self, h: impl StreamId) -> usize {
        stream_ref(self, h.raw()).map_or(0, |s| s.queued_bytes)
    }

    /// Shuts down the write side once every queued write is done
    /// (`uv_shutdown`); the peer then reads EOF. `cb` always runs, with
    /// `ECANCELED` if the stream is closed first.
    ///
    /// # Errors
    ///
    /// A stale id or closing handle, `ENOTCONN` if the stream is not
    /// connected or already shut down; `cb` is then dropped.
    pub fn shutdown<K: StreamType>(
        &mut self,
        h: Handle<K>,
        cb: impl FnOnce(&mut Loop, Handle<K>, io::Result<()>) + 'static,
    ) -> io::Result<()> {
        let s = open_stream_mut(self, h.raw)?;
        if s.shut || !s.sock.is_connected_stream() {
            return Err(errno(nix::libc::ENOTCONN));
        }
        s.shut = true;
        s.shutdown_cb = Some(Box::new(move |lp, raw, r| cb(lp, Handle::from_raw(raw), r)));
        let connecting = s.connecting;
        let queued = !s.writes.is_empty();
        self.active_reqs += 1;
        if !connecting {
            // Either the queue is empty and this shuts down now, or the
            // shutdown waits for the queue's last write.
            if !queued {
                do_write(self, h.raw);
            } else {
                ensure_registered(self, h.raw)?;
            }
        }
        Ok(())
    }
}

fn check_writable(s: &StreamState) -> io::Result<()> {
    if !s.sock.is_connected_stream() {
        return Err(errno(nix::libc::ENOTCONN));
    }
    if s.shut || s.write_failed {
        return Err(errno(nix::libc::EPIPE));
    }
    Ok(())
}

fn total_len(bufs: &[&[u8]]) -> usize {
    bufs.iter().map(|b| b.len()).sum()
}

fn write_now(sock: &Sock, bufs: &[&[u8]], fd: Option<BorrowedFd<'_>>) -> io::Result<usize> {
    const MAX_IOV: usize = 16;
    if let ([buf], None) = (bufs, fd) {
        loop {
            match sock.write(buf) {
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                r => return r,
            }
        }
    }
    if bufs.len() <= MAX_IOV {
        let mut iov = [IoSlice::new(&[]); MAX_IOV];
        for (slot, b) in iov.iter_mut().zip(bufs) {
            *slot = IoSlice::new(b);
        }
        let iov = &iov[..bufs.len()];
        loop {
            let r = match (fd, sock.fd()) {
                (Some(fd), Some(s)) => sys::scm_rights::send_with_fd(s, iov, fd),
                _ => sock.write_vectored(iov),
            };
            match r {
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                r => return r,
            }
        }
    } else {
        let joined = bufs.concat();
        write_now(sock, &[&joined], fd)
    }
}

/// `uv_write2`: the shared path of `write` and `write2`.
pub(crate) fn write_impl(
    lp: &mut Loop,
    raw: RawHandle,
    bufs: &[&[u8]],
    send: Option<RawHandle>,
    cb: ReqCb,
) -> io::Result<()> {
    let total = total_len(bufs);
    if send.is_none() {
        // The hot path (a plain write on an idle stream that the socket takes
        // whole) with one handle-table lookup instead of five.
        let Loop {
            slots,
            pending,
            active_reqs,
            ..
        } = &mut *lp;
        let slot = match slots.get_mut(raw.index as usize) {
            Some(slot) if slot.gen_ == raw.gen_ => slot,
            _ => return Err(super::handle::stale()),
        };
        if slot.flags & flags::CLOSING != 0 {
            return Err(closing_err());
        }
        let (Data::Tcp(s) | Data::Pipe(s)) = &mut slot.data else {
            unreachable!("a stream handle always names a stream slot")
        };
        check_writable(s)?;
        if s.writes.is_empty() && !s.connecting && total > 0 {
            let r = write_now(&s.sock, bufs, None);
            if let Ok(n) = r
                && n == total
            {
                *active_reqs += 1;
                s.done.push((cb, Ok(())));
                if !s.in_pending {
                    s.in_pending = true;
                    pending.push_back(raw);
                }
                return Ok(());
            }
            let (written, failed) = match r {
                Ok(n) => (n, None),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => (0, None),
                Err(e) => (0, Some(e)),
            };
            return write_finish(lp, raw, bufs, None, cb, total, written, false, failed, true);
        }
        return write_finish(lp, raw, bufs, None, cb, total, 0, false, None, false);
    }
    let (written, fd_sent, failed, tried) = {
        let s = stream_ref(lp, raw)?;
        if lp.slot(raw)?.flags & flags::CLOSING != 0 {
            return Err(closing_err());
        }
        check_writable(s)?;
        let send_fd = match send {
            Some(h) => {
                if !s.ipc {
                    return Err(super::event_loop::einval(
                        "write2 with a handle needs an IPC pipe",
                    ));
                }
                if total == 0 {
                    return Err(super::event_loop::einval(
                        "a write that carries a handle needs at least one byte",
                    ));
                }
                Some(handle_fd(lp, h)?)
            }
            None => None,
        };
        if s.writes.is_empty() && !s.connecting && (total > 0 || send_fd.is_some()) {
            match write_now(&s.sock, bufs, send_fd) {
                Ok(n) => (n, send_fd.is_some(), None, true),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => (0, false, None, true),
                Err(e) => (0, false, Some(e), true),
            }
        } else {
            (0, false, None, false)
        }
    };
    write_finish(
        lp, raw, bufs, send, cb, total, written, fd_sent, failed, tried,
    )
}

/// The rest of `write_impl` once the immediate write was tried: complete,
/// fail, or queue what is left.
#[allow(clippy::too_many_arguments)]
fn write_finish(
    lp: &mut Loop,
    raw: RawHandle,
    bufs: &[&[u8]],
    send: Option<RawHandle>,
    cb: ReqCb,
    total: usize,
    written: usize,
    fd_sent: bool,
    failed: Option<io::Error>,
    tried: bool,
) -> io::Result<()> {
    // The fd to keep for a queued request: a duplicate, since the caller may
    // close its handle before the queue drains.
    let keep_fd = match send {
        Some(h) if !fd_sent && failed.is_none() => Some(sys::fd::dup(handle_fd(lp, h)?)?),
        _ => None,
    };
    lp.active_reqs += 1;
    let s = stream_mut(lp, raw)?;
    if let Some(e) = failed {
        s.write_failed = true;
        s.done.push((cb, Err(e)));
        schedule_pending(lp, raw);
        return Ok(());
    }
    if written == total && s.writes.is_empty() && !s.connecting {
        s.done.push((cb, Ok(())));
        schedule_pending(lp, raw);
        return Ok(());
    }
    // Queue what is left.
    let mut buf = Vec::with_capacity(total - written);
    let mut skip = written;
    for b in bufs {
        if skip >= b.len() {
            skip -= b.len();
            continue;
        }
        buf.extend_from_slice(&b[skip..]);
        skip = 0;
    }
    s.queued_bytes += buf.len();
    s.writes.push_back(WriteReq {
        buf,
        off: 0,
        fd: keep_fd,
        cb,
    });
    // Only a write that was tried and came up short proves the socket full.
    // One queued behind others was not tried: clearing the flag then lost
    // the writable edge of an event that also brought data, when the read
    // callback wrote (an echo, a reply), and with it the queue (issue 10's
    // trial: a channel and a TCP echo stalled with both kernel queues
    // empty).
    if tried {
        s.writable = false;
    }
    ensure_registered(lp, raw)
}

/// The fd of a handle that can be sent over IPC.
pub(crate) fn handle_fd(lp: &Loop, raw: RawHandle) -> io::Result<BorrowedFd<'_>> {
    let slot = lp.slot(raw)?;
    if slot.flags & flags::CLOSING != 0 {
        return Err(errno(nix::libc::EBADF));
    }
    let fd = match &slot.data {
        Data::Tcp(s) | Data::Pipe(s) => s.sock.fd(),
        Data::Udp(u) => u.fd(),
        _ => None,
    };
    fd.ok_or_else(|| errno(nix::libc::EBADF))
}

// ----- shared by tcp.rs and pipe.rs -----------------------------------------

pub(crate) fn listen_raw(
    lp: &mut Loop,
    raw: RawHandle,
    backlog: i32,
    cb: ConnCb,
) -> io::Result<()> {
    let s = open_stream_mut(lp, raw)?;
    if let Some(e) = s.delayed_error.take() {
        return Err(e);
    }
    if s.ipc {
        return Err(super::event_loop::einval("an IPC pipe cannot listen"));
    }
    let sock = mem::take(&mut s.sock);
    s.sock = match sock {
        Sock::Bound(fd) => {
            if let Err(e) = sys::fd::listen(fd.as_fd(), backlog) {
                s.sock = Sock::Bound(fd);
                return Err(e);
            }
            match sys::fd::socket_kind(fd.as_fd()) {
                sys::fd::SocketKind::UnixListener => {
                    Sock::UnixListener(mio::net::UnixListener::from_std(fd.into()))
                }
                _ => Sock::TcpListener(mio::net::TcpListener::from_std(fd.into())),
            }
        }
        Sock::TcpListener(l) => {
            // Listening again only updates the backlog (libuv's multiple_listen).
            sys::fd::listen(l.as_fd(), backlog)?;
            Sock::TcpListener(l)
        }
        Sock::UnixListener(l) => {
            sys::fd::listen(l.as_fd(), backlog)?;
            Sock::UnixListener(l)
        }
        other => {
            s.sock = other;
            return Err(errno(nix::libc::EINVAL));
        }
    };
    s.conn_cb.set(cb);
    s.listening = true;
    let resume = s.readable;
    if lp.emfile_fd.is_none() {
        lp.emfile_fd = sys::fd::open_spare().ok();
    }
    ensure_registered(lp, raw)?;
    if resume {
        lp.still_ready.push(raw);
    }
    update_active(lp, raw);
    Ok(())
}

/// Starts a connect on a socket that is already created; `done` says
/// whether it completed at once.
pub(crate) fn start_connect(
    lp: &mut Loop,
    raw: RawHandle,
    done: io::Result<bool>,
    cb: ReqCb,
) -> io::Result<()> {
    lp.active_reqs += 1;
    let s = stream_mut(lp, raw)?;
    s.connect_cb = Some(cb);
    match done {
        Ok(true) => {
            s.connect_result = Some(Ok(()));
            schedule_pending(lp, raw);
        }
        Ok(false) => {
            s.connecting = true;
            if let Err(e) = ensure_registered(lp, raw) {
                let s = stream_mut(lp, raw)?;
                s.connecting = false;
                s.connect_result = Some(Err(e));
                schedule_pending(lp, raw);
            }
        }
        Err(e) => {
            // Errors are reported through the callback, as libuv does.
            s.connect_result = Some(Err(e));
            schedule_pending(lp, raw);
        }
    }
    Ok(())
}

pub(crate) fn is_connecting(lp: &Loop, raw: RawHandle) -> bool {
    stream_ref(lp, raw).is_ok_and(|s| s.connecting || s.connect_cb.is_some())
}

#[cfg(test)]
mod tests {
    use std::cell::Cell;
    use std::rc::Rc;

    use crate::uv::{Loop, RunMode};

    /// A write far larger than the socket buffer queues behind `EAGAIN`,
    /// adds writable interest, drains as the peer reads, drops the interest,
    /// and a shutdown queued behind it still reaches the peer as EOF.
    #[test]
    fn large_write_drains_then_shutdown() {
        let mut lp = Loop::new().unwrap();
        let (a, b) = lp.pipe_pair(false).unwrap();
        let data = vec![7u8; 8 << 20];
        let got = Rc::new(Cell::new(0usize));
        let eof = Rc::new(Cell::new(false));
        let wrote = Rc::new(Cell::new(false));
        let w = wrote.clone();
        lp.write(a, &[&data], move |_, _, r| {
            r.unwrap();
            w.set(true);
        })
        .unwrap();
        assert!(
            lp.write_queue_size(a) > 0,
            "the write should not fit at once"
        );
        lp.shutdown(a, |lp, a, r| {
            r.unwrap();
            lp.close(a, |_| {}).unwrap();
        })
        .unwrap();
        let (g, e) = (got.clone(), eof.clone());
        lp.read_start(b, move |lp, b, d| {
            let d = d.unwrap();
            if d.is_empty() {
                e.set(true);
                lp.close(b, |_| {}).unwrap();
            } else {
                g.set(g.get() + d.len());
            }
        })
        .unwrap();
        lp.run(RunMode::Default).unwrap();
        assert!(wrote.get());
        assert!(eof.get());
        assert_eq!(got.get(), data.len());
        assert_eq!(lp.handle_count(), 0);
    }
}
