//! UDP handles (libuv's `src/unix/udp.c`).
//!
//! A UDP handle is a datagram socket with a receive callback and a queue of
//! send requests. It follows the stream conventions of [`stream`](super::stream):
//!
//! * the socket is registered with the poller lazily, the first time the
//!   loop must wait on it (receiving, or a send that would block), and then
//!   always for readable + writable, so no send ever re-registers;
//! * readiness is remembered (mio is edge-triggered) until a call hits
//!   `WouldBlock`; a receive pass stops after a bounded number of datagrams
//!   and puts the handle on the loop's still-ready list to come back next
//!   poll;
//! * a send is tried at once if nothing is queued; what would block is
//!   queued and flushed in order when the socket becomes writable; every
//!   send callback runs later, from the pending phase, never inside
//!   [`Loop::udp_send`];
//! * closing cancels queued sends: their callbacks run with `ECANCELED`
//!   before the close callback.
//!
//! A handle is active while it receives. Sends in flight are requests: they
//! keep the loop alive whether or not the handle is referenced.

use std::collections::VecDeque;
use std::io;
use std::mem;
use std::net::SocketAddr;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};

use mio::Interest;
use nix::sys::socket::SockType;

use super::callback::CallbackSlot;
use super::event_loop::{Data, Loop, READ_BUF_SIZE, Ready, einval};
use super::handle::{Handle, RawHandle, Udp};
use super::tcp::BindFlags;
use crate::sys;
use crate::sys::fd::BindOpts;

/// Datagrams received per readiness event before other handles get a turn
/// (libuv's `uv__udp_recvmsg` reads at most 32).
const RECVS_PER_EVENT: usize = 32;

type RecvFn = dyn FnMut(&mut Loop, RawHandle, io::Result<(&[u8], SocketAddr)>);
type SendCb = Box<dyn FnOnce(&mut Loop, RawHandle, io::Result<()>)>;

struct SendReq {
    buf: Vec<u8>,
    addr: SocketAddr,
    cb: SendCb,
}

/// The state of a UDP handle.
#[derive(Default)]
pub(crate) struct UdpState {
    sock: Option<mio::net::UdpSocket>,
    registered: bool,
    /// Remembered readiness (edge-triggered: true until `WouldBlock`).
    readable: bool,
    writable: bool,
    receiving: bool,
    in_pending: bool,
    recv_cb: CallbackSlot<RecvFn>,
    /// Sends that would have blocked, in order.
    sends: VecDeque<SendReq>,
    /// Bytes in `sends` (`uv_udp_get_send_queue_size`).
    queued_bytes: usize,
    /// Finished sends whose callbacks wait for the pending phase.
    done: Vec<(SendCb, io::Result<()>)>,
}

impl UdpState {
    pub(crate) fn fd(&self) -> Option<BorrowedFd<'_>> {
        self.sock.as_ref().map(|s| s.as_fd())
    }
}

fn udp_mut(lp: &mut Loop, raw: RawHandle) -> io::Result<&mut UdpState> {
    match &mut lp.slot_mut(raw)?.data {
        Data::Udp(u) => Ok(u),
        _ => unreachable!("a Handle<Udp> always names a UDP slot"),
    }
}

fn udp_ref(lp: &Loop, raw: RawHandle) -> io::Result<&UdpState> {
    match &lp.slot(raw)?.data {
        Data::Udp(u) => Ok(u),
        _ => unreachable!("a Handle<Udp> always names a UDP slot"),
    }
}

fn open_udp_mut(lp: &mut Loop, raw: RawHandle) -> io::Result<&mut UdpState> {
    match &mut lp.open_slot_mut(raw)?.data {
        Data::Udp(u) => Ok(u),
        _ => unreachable!("a Handle<Udp> always names a UDP slot"),
    }
}

fn errno(code: i32) -> io::Error {
    io::Error::from_raw_os_error(code)
}

/// Registers the socket with the poller if it is not yet.
fn ensure_registered(lp: &mut Loop, raw: RawHandle) -> io::Result<()> {
    let Loop { slots, poll, .. } = lp;
    let u = match &mut slots[raw.index as usize].data {
        Data::Udp(u) => u,
        _ => unreachable!(),
    };
    if u.registered {
        return Ok(());
    }
    let sock = u.sock.as_mut().ok_or_else(|| errno(nix::libc::EBADF))?;
    poll.registry().register(
        sock,
        mio::Token(raw.token()),
        Interest::READABLE | Interest::WRITABLE,
    )?;
    u.registered = true;
    Ok(())
}

fn schedule_pending(lp: &mut Loop, raw: RawHandle) {
    if let Ok(u) = udp_mut(lp, raw)
        && !u.in_pending
    {
        u.in_pending = true;
        lp.add_pending(raw);
    }
}

/// Gives a handle without a socket one bound to the wildcard address of
/// `addr`'s family, as libuv's `uv__udp_maybe_deferred_bind` does before a
/// send or receive.
fn maybe_deferred_bind(u: &mut UdpState, addr: &SocketAddr) -> io::Result<()> {
    if u.sock.is_some() {
        return Ok(());
    }
    let any: SocketAddr = match addr {
        SocketAddr::V4(_) => ([0, 0, 0, 0], 0).into(),
        SocketAddr::V6(_) => (std::net::Ipv6Addr::UNSPECIFIED, 0).into(),
    };
    let fd = sys::fd::bind_inet_socket(SockType::Datagram, &any, BindOpts::default())?;
    u.sock = Some(mio::net::UdpSocket::from_std(fd.into()));
    Ok(())
}

fn send_now(sock: &mio::net::UdpSocket, buf: &[u8], addr: SocketAddr) -> io::Result<usize> {
    loop {
        match sock.send_to(buf, addr) {
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            r => return r,
        }
    }
}

// ----- events -----------------------------------------------------------

pub(crate) fn on_io(lp: &mut Loop, raw: RawHandle, ready: Ready) {
    let Ok(u) = udp_mut(lp, raw) else { return };
    u.readable |= ready.readable || ready.error;
    u.writable |= ready.writable || ready.error;
    if u.readable && u.receiving {
        do_recv(lp, raw);
    }
    let Ok(u) = udp_ref(lp, raw) else { return };
    if u.writable && !u.sends.is_empty() {
        do_send(lp, raw);
    }
}

/// Receives up to [`RECVS_PER_EVENT`] datagrams into the loop's shared
/// buffer, calling the receive callback for each (`uv__udp_recvmsg`).
fn do_recv(lp: &mut Loop, raw: RawHandle) {
    if lp.read_buf.len() < READ_BUF_SIZE {
        lp.read_buf.resize(READ_BUF_SIZE, 0);
    }
    for _ in 0..RECVS_PER_EVENT {
        let mut buf = mem::take(&mut lp.read_buf);
        let Ok(u) = udp_mut(lp, raw) else {
            lp.read_buf = buf;
            return;
        };
        if !u.receiving {
            lp.read_buf = buf;
            return;
        }
        let res = match &u.sock {
            Some(s) => s.recv_from(&mut buf),
            None => Err(errno(nix::libc::EBADF)),
        };
        let outcome = match res {
            Ok((n, addr)) => Ok((n, addr)),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                u.readable = false;
                lp.read_buf = buf;
                return;
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {
                lp.read_buf = buf;
                continue;
            }
            // Errors such as ECONNREFUSED (an ICMP error for an earlier
            // send) are reported and receiving goes on, as in libuv.
            Err(e) => Err(e),
        };
        // The callback slot's rule, and the handle must still receive.
        if let Some(mut f) = u.recv_cb.take() {
            match outcome {
                Ok((n, addr)) => f(lp, raw, Ok((&buf[..n], addr))),
                Err(e) => f(lp, raw, Err(e)),
            }
            if let Ok(u) = udp_mut(lp, raw)
                && u.receiving
            {
                u.recv_cb.put_back(f);
            }
        }
        lp.read_buf = buf;
    }
    // The bound was hit with datagrams possibly left: come back next pass.
    lp.still_ready.push(raw);
}

/// Sends queued datagrams in order until the queue is empty or the socket
/// is full (`uv__udp_sendmsg`).
fn do_send(lp: &mut Loop, raw: RawHandle) {
    let Ok(u) = udp_mut(lp, raw) else { return };
    let mut completed = false;
    while let Some(req) = u.sends.front() {
        let res = match &u.sock {
            Some(s) => send_now(s, &req.buf, req.addr),
            None => Err(errno(nix::libc::EBADF)),
        };
        match res {
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                u.writable = false;
                break;
            }
            // A datagram goes whole or not at all: any other outcome
            // finishes the request, and the next one is tried.
            r => {
                let req = u.sends.pop_front().expect("front exists");
                u.queued_bytes -= req.buf.len();
                u.done.push((req.cb, r.map(drop)));
                completed = true;
            }
        }
    }
    if completed {
        schedule_pending(lp, raw);
    }
}

/// Runs the callbacks of finished sends, in order.
pub(crate) fn run_pending(lp: &mut Loop, raw: RawHandle) {
    let Ok(u) = udp_mut(lp, raw) else { return };
    u.in_pending = false;
    call_done(lp, raw);
}

fn call_done(lp: &mut Loop, raw: RawHandle) {
    let Ok(u) = udp_mut(lp, raw) else { return };
    if u.done.is_empty() {
        return;
    }
    let mut done = mem::take(&mut u.done);
    for (cb, res) in done.drain(..) {
        lp.active_reqs -= 1;
        cb(lp, raw, res);
    }
    // Keep the vector's allocation for the next batch.
    if let Ok(u) = udp_mut(lp, raw)
        && u.done.is_empty()
    {
        u.done = done;
    }
}

// ----- close --------------------------------------------------------------

pub(crate) fn close_now(lp: &mut Loop, raw: RawHandle) {
    let Loop { slots, poll, .. } = lp;
    let u = match &mut slots[raw.index as usize].data {
        Data::Udp(u) => u,
        _ => unreachable!(),
    };
    u.receiving = false;
    u.recv_cb.clear();
    if u.registered
        && let Some(s) = u.sock.as_mut()
    {
        let _ = poll.registry().deregister(s);
    }
    u.registered = false;
    u.sock = None;
}

/// Cancels queued sends and runs every outstanding send callback (finished
/// ones first, in order, then the cancelled ones with `ECANCELED`), before
/// the close callback (`uv__udp_finish_close`).
pub(crate) fn finish_close(lp: &mut Loop, raw: RawHandle) {
    let Ok(u) = udp_mut(lp, raw) else { return };
    for req in u.sends.drain(..) {
        u.done.push((req.cb, Err(errno(nix::libc::ECANCELED))));
    }
    u.queued_bytes = 0;
    call_done(lp, raw);
}

// ----- API -------------------------------------------------------------------

impl Loop {
    /// Creates a UDP handle with no socket yet (`uv_udp_init`). The socket
    /// is created by [`udp_bind`](Self::udp_bind) or
    /// [`udp_open`](Self::udp_open), or on the first send or receive (bound
    /// to the wildcard address and an ephemeral port).
    ///
    /// # Examples
    ///
    /// ```
    /// use uvcluster::uv::{BindFlags, Loop, RunMode};
    ///
    /// let mut lp = Loop::new()?;
    /// let rx = lp.udp_init();
    /// lp.udp_bind(rx, "127.0.0.1:0".parse().unwrap(), BindFlags::default())?;
    /// let to = lp.udp_getsockname(rx)?;
    /// lp.udp_recv_start(rx, |lp, rx, r| {
    ///     let (data, _from) = r.unwrap();
    ///     assert_eq!(data, b"hello");
    ///     lp.close(rx, |_| {}).unwrap();
    /// })?;
    /// let tx = lp.udp_init();
    /// lp.udp_send(tx, &[b"hel", b"lo"], to, |lp, tx, r| {
    ///     r.unwrap();
    ///     lp.close(tx, |_| {}).unwrap();
    /// })?;
    /// lp.run(RunMode::Default)?;
    /// # Ok::<(), std::io::Error>(())
    /// ```
    pub fn udp_init(&mut self) -> Handle<Udp> {
        Handle::from_raw(self.insert(Data::Udp(Box::default())))
    }

    /// Adopts a UDP socket (`uv_udp_open`), for example one received over
    /// an IPC pipe. The fd is made non-blocking and CLOEXEC.
    ///
    /// # Errors
    ///
    /// A stale id, a handle that already has a socket (`EBUSY`), or an fd
    /// that is not an inet datagram socket (`EINVAL`).
    pub fn udp_open(&mut self, h: Handle<Udp>, fd: OwnedFd) -> io::Result<()> {
        let u = udp_mut(self, h.raw)?;
        if u.sock.is_some() {
            return Err(io::Error::from_raw_os_error(nix::libc::EBUSY));
        }
        if sys::fd::socket_kind(fd.as_fd()) != sys::fd::SocketKind::Udp {
            return Err(einval("udp_open: not a UDP socket"));
        }
        sys::fd::set_cloexec_nonblock(fd.as_fd())?;
        u.sock = Some(mio::net::UdpSocket::from_std(fd.into()));
        Ok(())
    }

    /// Binds the handle to `addr` (`uv_udp_bind`), creating its socket.
    /// `flags.reuse_addr` sets `SO_REUSEADDR`, `flags.reuse_port` sets
    /// `SO_REUSEPORT` (several sockets then bind the same port), and
    /// `flags.ipv6_only` restricts an IPv6 socket to IPv6.
    ///
    /// # Errors
    ///
    /// A stale id or closing handle, a handle that already has a socket
    /// (`EINVAL`), or the socket or bind error (`EADDRINUSE`,
    /// `EADDRNOTAVAIL`, ...). Unlike TCP, `EADDRINUSE` is reported here.
    pub fn udp_bind(
        &mut self,
        h: Handle<Udp>,
        addr: SocketAddr,
        flags: BindFlags,
    ) -> io::Result<()> {
        let u = open_udp_mut(self, h.raw)?;
        if u.sock.is_some() {
            return Err(einval("udp_bind: the handle already has a socket"));
        }
        let opts = BindOpts {
            ipv6_only: flags.ipv6_only,
            reuse_addr: flags.reuse_addr,
            reuse_port: flags.reuse_port,
        };
        let fd = sys::fd::bind_inet_socket(SockType::Datagram, &addr, opts)?;
        u.sock = Some(mio::net::UdpSocket::from_std(fd.into()));
        Ok(())
    }

    /// The address the socket is bound to (`uv_udp_getsockname`).
    ///
    /// # Errors
    ///
    /// A stale id, or `EBADF` for a handle without a socket.
    pub fn udp_getsockname(&self, h: Handle<Udp>) -> io::Result<SocketAddr> {
        let u = udp_ref(self, h.raw)?;
        sys::fd::local_inet_addr(u.fd().ok_or_else(|| errno(nix::libc::EBADF))?)
    }

    /// Starts receiving (`uv_udp_recv_start`). `cb` gets each datagram as
    /// `Ok((data, sender))`, with `data` borrowed from one buffer the loop
    /// reuses (an empty datagram gives an empty slice), or `Err` for a
    /// socket error such as `ECONNREFUSED` after an earlier send; receiving
    /// continues after an error. A handle without a socket is bound to
    /// `0.0.0.0:0` first. The handle is active while receiving.
    ///
    /// At most 32 datagrams are received per readiness event before other
    /// handles get a turn.
    ///
    /// # Errors
    ///
    /// A stale id or closing handle, `EALREADY` if already receiving, or the
    /// implicit bind failing; `cb` is then dropped.
    pub fn udp_recv_start(
        &mut self,
        h: Handle<Udp>,
        mut cb: impl FnMut(&mut Loop, Handle<Udp>, io::Result<(&[u8], SocketAddr)>) + 'static,
    ) -> io::Result<()> {
        let u = open_udp_mut(self, h.raw)?;
        if u.receiving {
            return Err(errno(nix::libc::EALREADY));
        }
        maybe_deferred_bind(u, &([0, 0, 0, 0], 0).into())?;
        let resume = u.readable;
        ensure_registered(self, h.raw)?;
        let u = udp_mut(self, h.raw)?;
        u.receiving = true;
        u.recv_cb
            .set(Box::new(move |lp, raw, r| cb(lp, Handle::from_raw(raw), r)));
        if resume {
            // Datagrams arrived while we were not receiving: no new edge
            // will come for them.
            self.still_ready.push(h.raw);
        }
        self.activate(h.raw);
        Ok(())
    }

    /// Stops receiving (`uv_udp_recv_stop`). Datagrams that arrive meanwhile
    /// wait in the kernel (up to its buffer size) for the next
    /// [`udp_recv_start`](Self::udp_recv_start). Stopping a handle that is
    /// not receiving is fine.
    ///
    /// # Errors
    ///
    /// A stale id.
    pub fn udp_recv_stop(&mut self, h: Handle<Udp>) -> io::Result<()> {
        let u = udp_mut(self, h.raw)?;
        u.receiving = false;
        u.recv_cb.clear();
        self.deactivate(h.raw);
        Ok(())
    }

    /// Whether the handle is receiving.
    pub fn udp_is_receiving(&self, h: Handle<Udp>) -> bool {
        udp_ref(self, h.raw).is_ok_and(|u| u.receiving)
    }

    /// Sends one datagram made of `bufs` to `addr` (`uv_udp_send`).
    ///
    /// The datagram is sent at once if no earlier send is queued; otherwise,
    /// or if the socket's buffer is full, it is copied into the handle's
    /// queue and sent when the socket becomes writable. Sends complete in
    /// order. `cb` runs afterwards, always from a later phase, never inside
    /// this call, with the send's result (`EMSGSIZE` for a datagram that is
    /// too large, ...), or `ECANCELED` if the handle is closed first; it
    /// runs before the close callback. A handle without a socket is bound
    /// to the wildcard address of `addr`'s family first.
    ///
    /// # Errors
    ///
    /// A stale id or closing handle, or the implicit bind failing; `cb` is
    /// then dropped. Send errors go to `cb`.
    pub fn udp_send(
        &mut self,
        h: Handle<Udp>,
        bufs: &[&[u8]],
        addr: SocketAddr,
        cb: impl FnOnce(&mut Loop, Handle<Udp>, io::Result<()>) + 'static,
    ) -> io::Result<()> {
        let u = open_udp_mut(self, h.raw)?;
        maybe_deferred_bind(u, &addr)?;
        let cb: SendCb = Box::new(move |lp, raw, r| cb(lp, Handle::from_raw(raw), r));
        let joined;
        let data: &[u8] = match bufs {
            [one] => one,
            _ => {
                joined = bufs.concat();
                &joined
            }
        };
        if u.sends.is_empty() {
            let sock = u.sock.as_ref().expect("bound above");
            match send_now(sock, data, addr) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => u.writable = false,
                r => {
                    u.done.push((cb, r.map(drop)));
                    self.active_reqs += 1;
                    schedule_pending(self, h.raw);
                    return Ok(());
                }
            }
        }
        ensure_registered(self, h.raw)?;
        let u = udp_mut(self, h.raw)?;
        u.queued_bytes += data.len();
        u.sends.push_back(SendReq {
            buf: data.to_vec(),
            addr,
            cb,
        });
        self.active_reqs += 1;
        Ok(())
    }

    /// Sends one datagram now if it can be done without queueing
    /// (`uv_udp_try_send`). Returns the number of bytes sent (the whole
    /// datagram).
    ///
    /// # Errors
    ///
    /// A stale id or closing handle; `WouldBlock` while sends are queued or
    /// when the socket's buffer is full; the send error otherwise.
    pub fn udp_try_send(
        &mut self,
        h: Handle<Udp>,
        bufs: &[&[u8]],
        addr: SocketAddr,
    ) -> io::Result<usize> {
        let u = open_udp_mut(self, h.raw)?;
        if !u.sends.is_empty() {
            return Err(io::ErrorKind::WouldBlock.into());
        }
        maybe_deferred_bind(u, &addr)?;
        let sock = u.sock.as_ref().expect("bound above");
        let r = match bufs {
            [one] => send_now(sock, one, addr),
            _ => send_now(sock, &bufs.concat(), addr),
        };
        if let Err(e) = &r
            && e.kind() == io::ErrorKind::WouldBlock
        {
            u.writable = false;
        }
        r
    }

    /// Bytes queued and not yet sent (`uv_udp_get_send_queue_size`).
    pub fn udp_send_queue_size(&self, h: Handle<Udp>) -> usize {
        udp_ref(self, h.raw).map_or(0, |u| u.queued_bytes)
    }

    /// Datagrams queued and not yet sent (`uv_udp_get_send_queue_count`).
    pub fn udp_send_queue_count(&self, h: Handle<Udp>) -> usize {
        udp_ref(self, h.raw).map_or(0, |u| u.sends.len())
    }
}

#[cfg(test)]
mod tests {
    //! The queued-send paths. A send to loopback never blocks on Linux
    //! (loopback transmit orphans the datagram from the socket at once), so
    //! the integration tests cannot fill the queue; these tests queue
    //! requests directly, as a send that hit `WouldBlock` does.
    use super::*;
    use crate::uv::RunMode;
    use std::cell::RefCell;
    use std::rc::Rc;

    fn queue(
        lp: &mut Loop,
        h: Handle<Udp>,
        to: SocketAddr,
        tag: &'static str,
        log: &Rc<RefCell<Vec<String>>>,
    ) {
        let log = log.clone();
        let u = udp_mut(lp, h.raw).unwrap();
        u.queued_bytes += tag.len();
        u.sends.push_back(SendReq {
            buf: tag.as_bytes().to_vec(),
            addr: to,
            cb: Box::new(move |_, _, r| {
                log.borrow_mut().push(match r {
                    Ok(()) => format!("{tag}:ok"),
                    Err(e) => format!("{tag}:{}", e.raw_os_error().unwrap_or(0)),
                })
            }),
        });
        lp.active_reqs += 1;
    }

    #[test]
    fn queued_sends_flush_in_order_when_writable() {
        let mut lp = Loop::new().unwrap();
        let rx = lp.udp_init();
        lp.udp_bind(rx, "127.0.0.1:0".parse().unwrap(), BindFlags::default())
            .unwrap();
        let to = lp.udp_getsockname(rx).unwrap();
        let tx = lp.udp_init();
        lp.udp_bind(tx, "127.0.0.1:0".parse().unwrap(), BindFlags::default())
            .unwrap();
        let log = Rc::new(RefCell::new(Vec::new()));
        queue(&mut lp, tx, to, "a", &log);
        queue(&mut lp, tx, to, "b", &log);
        assert_eq!(lp.udp_send_queue_count(tx), 2);
        assert_eq!(lp.udp_send_queue_size(tx), 2);
        // A send behind a queue is queued too, and try_send refuses.
        let l = log.clone();
        lp.udp_send(tx, &[b"c"], to, move |_, _, r| {
            r.unwrap();
            l.borrow_mut().push("c:ok".into());
        })
        .unwrap();
        assert_eq!(lp.udp_send_queue_count(tx), 3);
        assert_eq!(
            lp.udp_try_send(tx, &[b"d"], to).unwrap_err().kind(),
            io::ErrorKind::WouldBlock
        );
        // Registration reports the socket writable; the queue drains.
        for _ in 0..100 {
            if log.borrow().len() == 3 {
                break;
            }
            lp.run(RunMode::Once).unwrap();
        }
        assert_eq!(*log.borrow(), ["a:ok", "b:ok", "c:ok"]);
        assert_eq!(lp.udp_send_queue_size(tx), 0);
        lp.close(tx, |_| {}).unwrap();
        lp.close(rx, |_| {}).unwrap();
        lp.run(RunMode::Default).unwrap();
        assert!(!lp.alive());
    }

    #[test]
    fn close_cancels_queued_sends_before_close_cb() {
        let mut lp = Loop::new().unwrap();
        let tx = lp.udp_init();
        lp.udp_bind(tx, "127.0.0.1:0".parse().unwrap(), BindFlags::default())
            .unwrap();
        let to = lp.udp_getsockname(tx).unwrap();
        let log = Rc::new(RefCell::new(Vec::new()));
        // One send completes at once (its callback is deferred), two wait.
        let l = log.clone();
        lp.udp_send(tx, &[b"first"], to, move |_, _, r| {
            r.unwrap();
            l.borrow_mut().push("first:ok".into());
        })
        .unwrap();
        queue(&mut lp, tx, to, "a", &log);
        queue(&mut lp, tx, to, "b", &log);
        let l = log.clone();
        lp.close(tx, move |_| l.borrow_mut().push("close".into()))
            .unwrap();
        lp.run(RunMode::Default).unwrap();
        let ecanceled = nix::libc::ECANCELED;
        assert_eq!(
            *log.borrow(),
            [
                "first:ok".to_string(),
                format!("a:{ecanceled}"),
                format!("b:{ecanceled}"),
                "close".to_string()
            ]
        );
        assert!(!lp.alive());
    }
}
