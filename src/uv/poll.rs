//! Poll handles: readiness of an fd the user owns (libuv's
//! `src/unix/poll.c`, `uv_poll_t`).
//!
//! A poll handle watches a descriptor it does not own: it never reads,
//! writes or closes it, it only registers it with the loop's poller. The
//! user does the I/O in the callback.
//!
//! **Level-triggered, as libuv's epoll.** mio is edge-triggered: a socket
//! with unread data is reported once. After every callback that reported
//! something, the handle re-arms its registration (`EPOLL_CTL_MOD`, mio's
//! `reregister`), and the kernel evaluates the fd's readiness again right
//! then: if the condition still holds (data left unread, a socket still
//! writable), the next poll reports it at once, without blocking; if it no
//! longer holds, nothing is reported until the next change. So a callback
//! runs in every iteration while its condition holds, as with libuv, at the
//! cost of one `epoll_ctl` per callback. Events the user did not ask for
//! (data on a handle started for [`PollEvents::DISCONNECT`] only: mio has
//! no way to register `EPOLLRDHUP` without `EPOLLIN`) are dropped without
//! re-arming, so they cannot spin the loop.

use std::fmt;
use std::io;
use std::ops::{BitOr, BitOrAssign};
use std::os::fd::{AsRawFd, BorrowedFd, RawFd};

use mio::Interest;
use mio::unix::SourceFd;

use super::callback::CallbackSlot;
use super::event_loop::{Data, Loop, Ready, closing_err};
use super::handle::{Handle, Poll, RawHandle, flags};
use crate::sys;

type PollFn = dyn FnMut(&mut Loop, Handle<Poll>, io::Result<PollEvents>);

/// A set of readiness events (libuv's `uv_poll_event`): what
/// [`Loop::poll_start`] watches and what its callback reports.
///
/// Combine with `|`; test with [`contains`](Self::contains). The values are
/// libuv's (`UV_READABLE` = 1, `UV_WRITABLE` = 2, `UV_DISCONNECT` = 4,
/// `UV_PRIORITIZED` = 8).
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct PollEvents(u8);

impl PollEvents {
    /// No event: [`Loop::poll_start`] with it stops the handle.
    pub const EMPTY: PollEvents = PollEvents(0);
    /// Data to read, a connection to accept, or end of file
    /// (`UV_READABLE`, `POLLIN`).
    pub const READABLE: PollEvents = PollEvents(1);
    /// Room to write (`UV_WRITABLE`, `POLLOUT`).
    pub const WRITABLE: PollEvents = PollEvents(2);
    /// The peer closed its write side (`UV_DISCONNECT`, `POLLRDHUP`).
    pub const DISCONNECT: PollEvents = PollEvents(4);
    /// Urgent data: TCP out-of-band data, a sysfs attribute changed
    /// (`UV_PRIORITIZED`, `POLLPRI`).
    pub const PRIORITIZED: PollEvents = PollEvents(8);

    /// Whether every event of `other` is in `self`.
    pub const fn contains(self, other: PollEvents) -> bool {
        self.0 & other.0 == other.0
    }

    /// Whether the set is empty.
    pub const fn is_empty(self) -> bool {
        self.0 == 0
    }

    /// The events in both sets.
    pub const fn intersection(self, other: PollEvents) -> PollEvents {
        PollEvents(self.0 & other.0)
    }

    /// libuv's number for the set (`UV_READABLE | UV_WRITABLE` is 3).
    pub const fn bits(self) -> u8 {
        self.0
    }
}

impl BitOr for PollEvents {
    type Output = PollEvents;
    fn bitor(self, rhs: PollEvents) -> PollEvents {
        PollEvents(self.0 | rhs.0)
    }
}

impl BitOrAssign for PollEvents {
    fn bitor_assign(&mut self, rhs: PollEvents) {
        self.0 |= rhs.0;
    }
}

impl fmt::Debug for PollEvents {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let names = [
            (PollEvents::READABLE, "READABLE"),
            (PollEvents::WRITABLE, "WRITABLE"),
            (PollEvents::DISCONNECT, "DISCONNECT"),
            (PollEvents::PRIORITIZED, "PRIORITIZED"),
        ];
        let mut first = true;
        for (e, name) in names {
            if self.contains(e) {
                if !first {
                    f.write_str(" | ")?;
                }
                f.write_str(name)?;
                first = false;
            }
        }
        if first {
            f.write_str("EMPTY")?;
        }
        Ok(())
    }
}

/// The state of a poll handle.
pub(crate) struct PollState {
    /// The user's fd, by number: never read, written or closed here.
    fd: RawFd,
    /// What the handle watches; empty while stopped.
    events: PollEvents,
    /// Registered with the poller (between a start and a stop).
    registered: bool,
    /// Bumped by every start and stop, so that the re-arm after a callback
    /// is skipped when the callback restarted or stopped the handle.
    stamp: u32,
    cb: CallbackSlot<PollFn>,
}

fn state_mut(lp: &mut Loop, raw: RawHandle) -> io::Result<&mut PollState> {
    match &mut lp.slot_mut(raw)?.data {
        Data::Poll(s) => Ok(s),
        _ => unreachable!("a Handle<Poll> always names a poll slot"),
    }
}

fn interest(events: PollEvents) -> Option<Interest> {
    let mut i: Option<Interest> = None;
    let mut add = |x: Interest| i = Some(i.map_or(x, |i| i | x));
    // mio registers EPOLLRDHUP with EPOLLIN: DISCONNECT needs READABLE.
    if events.contains(PollEvents::READABLE) || events.contains(PollEvents::DISCONNECT) {
        add(Interest::READABLE);
    }
    if events.contains(PollEvents::WRITABLE) {
        add(Interest::WRITABLE);
    }
    if events.contains(PollEvents::PRIORITIZED) {
        add(Interest::PRIORITY);
    }
    i
}

/// Stops the handle: deregisters the fd (`uv__poll_stop`).
fn stop_raw(lp: &mut Loop, raw: RawHandle) {
    let Ok(st) = state_mut(lp, raw) else { return };
    st.events = PollEvents::EMPTY;
    st.stamp = st.stamp.wrapping_add(1);
    if st.registered {
        st.registered = false;
        let fd = st.fd;
        // The user may already have closed the fd (the kernel then dropped
        // the registration itself): nothing to undo.
        let _ = lp.poll.registry().deregister(&mut SourceFd(&fd));
    }
    lp.deactivate(raw);
}

pub(crate) fn close_now(lp: &mut Loop, raw: RawHandle) {
    stop_raw(lp, raw);
    if let Ok(st) = state_mut(lp, raw) {
        st.cb.clear();
    }
}

/// A readiness event for a poll handle (`uv__poll_io`).
pub(crate) fn on_io(lp: &mut Loop, raw: RawHandle, ready: Ready) {
    let Ok(st) = state_mut(lp, raw) else { return };
    let watched = st.events;
    if watched.is_empty() {
        // Stopped earlier in this batch.
        return;
    }
    // POLLERR without POLLPRI is an error (sysfs reports POLLERR|POLLPRI
    // for a changed attribute): the handle stops and reports EBADF, as
    // libuv does.
    if ready.error && !ready.priority {
        stop_raw(lp, raw);
        call(lp, raw, Err(io::Error::from_raw_os_error(nix::libc::EBADF)));
        return;
    }
    let mut got = PollEvents::EMPTY;
    if ready.readable {
        got |= PollEvents::READABLE;
    }
    if ready.writable {
        got |= PollEvents::WRITABLE;
    }
    if ready.read_closed {
        got |= PollEvents::DISCONNECT;
    }
    if ready.priority {
        got |= PollEvents::PRIORITIZED;
    }
    let got = got.intersection(watched);
    if got.is_empty() {
        return;
    }
    let stamp = st.stamp;
    call(lp, raw, Ok(got));
    // Re-arm: the kernel re-evaluates readiness now and reports again at
    // the next poll if the condition still holds (level triggering).
    if let Ok(s) = lp.slot(raw)
        && s.flags & flags::CLOSING == 0
        && let Data::Poll(st) = &s.data
        && st.stamp == stamp
        && st.registered
        && let Some(i) = interest(st.events)
    {
        let fd = st.fd;
        if let Err(e) =
            lp.poll
                .registry()
                .reregister(&mut SourceFd(&fd), mio::Token(raw.token()), i)
        {
            // The fd was closed under the handle (a broken contract): stop
            // and say so, as libuv reports a dead fd.
            stop_raw(lp, raw);
            call(lp, raw, Err(e));
        }
    }
}

fn call(lp: &mut Loop, raw: RawHandle, r: io::Result<PollEvents>) {
    let Ok(st) = state_mut(lp, raw) else { return };
    let Some(mut f) = st.cb.take() else { return };
    f(lp, Handle::from_raw(raw), r);
    if let Ok(st) = state_mut(lp, raw) {
        st.cb.put_back(f);
    }
}

impl Loop {
    /// Creates a poll handle for `fd` (`uv_poll_init`), which it borrows
    /// and never owns: the handle never reads, writes or closes it.
    ///
    /// As libuv does, this puts `fd` in non-blocking mode (the callback
    /// is expected to read or write until `WouldBlock`).
    ///
    /// **The fd's contract.** The handle keeps the fd's *number* until it
    /// is closed (`BorrowedFd`'s lifetime covers this call only). The
    /// caller must keep the fd open until the handle is closed, as libuv
    /// requires. Breaking it is not undefined behaviour: the handle only
    /// ever passes the number to `epoll_ctl`, so it cannot touch another
    /// owner's data; a start after the fd was closed fails with `EBADF`, a
    /// started handle whose fd was closed stops reporting (the kernel drops
    /// the registration), and if the number is reused the handle may report
    /// the readiness of another file.
    ///
    /// # Examples
    ///
    /// ```
    /// use std::io::Write;
    /// use std::os::fd::AsFd;
    /// use std::os::unix::net::UnixStream;
    /// use uvcluster::uv::{Loop, PollEvents, RunMode};
    ///
    /// let (a, mut b) = UnixStream::pair()?;
    /// let mut lp = Loop::new()?;
    /// let h = lp.poll_init(a.as_fd())?;
    /// lp.poll_start(h, PollEvents::READABLE, |lp, h, ev| {
    ///     assert!(ev.unwrap().contains(PollEvents::READABLE));
    ///     lp.close(h, |_| {}).unwrap();
    /// })?;
    /// b.write_all(b"x")?;
    /// lp.run(RunMode::Default)?;
    /// drop(a); // the handle never closed it
    /// # Ok::<(), std::io::Error>(())
    /// ```
    ///
    /// # Errors
    ///
    /// `EPERM` for a fd epoll cannot watch (a regular file, a directory);
    /// `EEXIST` for a fd this loop already watches (a started poll handle,
    /// a socket handle of the loop); `fd` cannot be made non-blocking.
    pub fn poll_init(&mut self, fd: BorrowedFd<'_>) -> io::Result<Handle<Poll>> {
        // libuv's uv__io_check_fd: epoll must accept the fd (it refuses
        // regular files and directories with EPERM), and it must not be
        // watched already by this loop (EEXIST).
        let raw_fd = fd.as_raw_fd();
        let reg = self.poll.registry();
        reg.register(
            &mut SourceFd(&raw_fd),
            mio::Token(usize::MAX - 3),
            Interest::READABLE,
        )?;
        reg.deregister(&mut SourceFd(&raw_fd))?;
        sys::fd::ensure_nonblock(fd)?;
        let st = PollState {
            fd: fd.as_raw_fd(),
            events: PollEvents::EMPTY,
            registered: false,
            stamp: 0,
            cb: CallbackSlot::empty(),
        };
        Ok(Handle::from_raw(self.insert(Data::Poll(st))))
    }

    /// Watches the handle's fd for `events` (`uv_poll_start`): `cb` runs in
    /// the poll phase with the events that hold, a subset of `events`, and
    /// runs again in every iteration while they hold (level-triggered, as
    /// libuv's epoll: after each callback the handle re-arms its
    /// registration, one `epoll_ctl`, and the kernel reports a condition
    /// that still holds at the next poll; the loop still sleeps when nothing
    /// is ready). The handle is active while
    /// started. Starting a started handle replaces its events and callback;
    /// starting with [`PollEvents::EMPTY`] stops it.
    ///
    /// A hang-up or error on the fd reports every watched event, so that the
    /// read or write in the callback finds the error. `POLLERR` alone (not
    /// with `POLLPRI`) stops the handle and runs `cb` with `EBADF`, as in
    /// libuv.
    ///
    /// # Errors
    ///
    /// A stale id or closing handle; `EEXIST` when the fd is already watched
    /// by this loop (another poll handle, or a socket handle of the loop);
    /// `EBADF` when the fd was closed; `EPERM` for a regular file, which
    /// epoll refuses. `cb` is then dropped and the handle is stopped.
    pub fn poll_start(
        &mut self,
        h: Handle<Poll>,
        events: PollEvents,
        mut cb: impl FnMut(&mut Loop, Handle<Poll>, io::Result<PollEvents>) + 'static,
    ) -> io::Result<()> {
        if self.slot(h.raw)?.flags & flags::CLOSING != 0 {
            return Err(closing_err());
        }
        stop_raw(self, h.raw);
        let Some(i) = interest(events) else {
            return Ok(());
        };
        let st = state_mut(self, h.raw)?;
        let fd = st.fd;
        self.poll
            .registry()
            .register(&mut SourceFd(&fd), mio::Token(h.raw.token()), i)?;
        let st = state_mut(self, h.raw)?;
        st.registered = true;
        st.events = events;
        st.cb.set(Box::new(move |lp, h, r| cb(lp, h, r)));
        self.activate(h.raw);
        Ok(())
    }

    /// Stops watching (`uv_poll_stop`): the fd is deregistered and no
    /// further callback runs, even for events already collected in this
    /// iteration. Stopping a stopped handle is fine.
    ///
    /// # Errors
    ///
    /// A stale id or closing handle.
    pub fn poll_stop(&mut self, h: Handle<Poll>) -> io::Result<()> {
        if self.slot(h.raw)?.flags & flags::CLOSING != 0 {
            return Err(closing_err());
        }
        stop_raw(self, h.raw);
        Ok(())
    }
}
