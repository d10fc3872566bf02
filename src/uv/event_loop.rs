//! The loop: handle table, run modes and the phase order of one iteration
//! (libuv's `src/unix/core.c: uv_run`, `src/unix/loop.c`).

use std::collections::{HashMap, VecDeque};
use std::io;
use std::mem;
use std::os::fd::OwnedFd;
use std::time::{Duration, Instant};

use slab::Slab;

use super::r#async::{AsyncState, LoopAsync};
use super::context::Contexts;
use super::fs_event::{FsEventState, LoopInotify};
use super::handle::{AnyHandle, Handle, HandleId, RawHandle, flags, stale};
use super::loop_watcher::{WatcherList, WatcherState};
use super::poll::PollState;
use super::process::{LoopProcesses, ProcessState};
use super::signal::{LoopSignals, SignalState};
use super::stream::StreamState;
use super::timer::{TimerQueue, TimerState};
use super::udp::UdpState;

/// How [`Loop::run`] runs (libuv's `uv_run_mode`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RunMode {
    /// Run until no active, referenced handle or request is left, or until
    /// [`Loop::stop`] is called.
    Default,
    /// One iteration; block in poll if there is nothing else to do.
    Once,
    /// One iteration; poll without blocking.
    NoWait,
}

pub(crate) type CloseCb = Box<dyn FnOnce(&mut Loop)>;

/// One entry of the handle table.
pub(crate) struct Slot {
    pub(crate) gen_: u32,
    pub(crate) flags: u8,
    pub(crate) close_cb: Option<CloseCb>,
    pub(crate) data: Data,
}

/// The type-specific state of a handle. Large states are boxed so that the
/// table stays compact for the common small handles (timers).
pub(crate) enum Data {
    Timer(TimerState),
    Idle(WatcherState),
    Prepare(WatcherState),
    Check(WatcherState),
    Tcp(Box<StreamState>),
    Pipe(Box<StreamState>),
    Udp(Box<UdpState>),
    Signal(SignalState),
    Process(Box<ProcessState>),
    Async(AsyncState),
    Poll(PollState),
    FsEvent(Box<FsEventState>),
}

/// What a readiness event said, in the loop's own terms.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct Ready {
    pub(crate) readable: bool,
    pub(crate) writable: bool,
    pub(crate) error: bool,
    /// The peer closed its write side (or the socket hung up) by the time
    /// the event was collected: a short read is then not proof of a
    /// drained socket, since EOF is still to be read and, edge-triggered,
    /// no further event will announce it.
    pub(crate) read_closed: bool,
    /// Urgent data (`EPOLLPRI`): only `Poll` handles ask for it.
    pub(crate) priority: bool,
}

/// Token of the loop's signal self-pipe; handle tokens never reach it
/// because generations are 32-bit and indices are below `u32::MAX`.
pub(crate) const SIGNAL_TOKEN: mio::Token = mio::Token(usize::MAX);
/// Token of the loop's waker, shared by its `Async` handles (`async.rs`).
pub(crate) const WAKER_TOKEN: mio::Token = mio::Token(usize::MAX - 1);
/// Token of the loop's inotify fd, shared by its `FsEvent` handles
/// (`fs_event.rs`).
pub(crate) const INOTIFY_TOKEN: mio::Token = mio::Token(usize::MAX - 2);

/// How many times the pending queue is drained after poll (libuv: 8).
const PENDING_AFTER_POLL: usize = 8;

/// An event loop: one per thread, usually one per process.
///
/// The loop owns every handle's state. Handles are named by typed ids
/// ([`Handle<Timer>`], [`Handle<Tcp>`](super::Tcp), ...) and all operations go
/// through the loop, libuv-style: `lp.timer_start(t, Duration::from_millis(10), Duration::ZERO, cb)` mirrors
/// `uv_timer_start(t, cb, 10, 0)`. Callbacks receive `&mut Loop` and their
/// handle's id, so a callback can start, stop or close anything.
///
/// One iteration runs, in order: pending callbacks, idle, prepare, poll for
/// I/O, pending callbacks again, check, close callbacks, then due timers (the
/// order of libuv 1.45 and later). See ARCHITECTURE.md for the full model.
///
/// # Examples
///
/// ```
/// use std::time::Duration;
/// use uvcluster::uv::{Loop, RunMode};
///
/// let mut lp = Loop::new()?;
/// let t = lp.timer_init();
/// lp.timer_start(t, Duration::from_millis(5), Duration::ZERO, |lp, t| {
///     println!("fired after {} ms", lp.now());
///     lp.close(t, |_| {}).unwrap();
/// })?;
/// lp.run(RunMode::Default)?;
/// assert!(!lp.alive());
/// # Ok::<(), std::io::Error>(())
/// ```
pub struct Loop {
    pub(crate) poll: mio::Poll,
    events: mio::Events,
    pub(crate) slots: Slab<Slot>,
    next_gen: u32,
    /// Handles that are both ACTIVE and REF (libuv's `active_handles`).
    active_refs: usize,
    /// Requests in flight: writes, connects, shutdowns, sends.
    pub(crate) active_reqs: usize,
    now: u64,
    /// `CLOCK_MONOTONIC` in ms when the loop was created; `now` counts from it.
    epoch_ms: u64,
    stop_flag: bool,
    running: bool,
    pub(crate) timers: TimerQueue,
    pub(crate) watchers: [WatcherList; 3],
    /// Handles with deferred callbacks (libuv's `pending_queue`).
    pub(crate) pending: VecDeque<RawHandle>,
    closing: Vec<RawHandle>,
    /// Crate-internal observers of a handle's end (see `watch_close`): kept
    /// apart from the slots so that handles without one pay nothing.
    close_watches: HashMap<RawHandle, CloseCb>,
    /// I/O handles that stopped short of `WouldBlock` (a per-event bound was
    /// hit): mio is edge-triggered, so they are serviced again at the next
    /// poll without waiting for another event, and poll does not block.
    pub(crate) still_ready: Vec<RawHandle>,
    /// One read buffer shared by every stream (libuv suggests 64 KiB).
    pub(crate) read_buf: Vec<u8>,
    /// The spare fd for the EMFILE trick (libuv's `emfile_fd`).
    pub(crate) emfile_fd: Option<OwnedFd>,
    // Read by signal.rs and process.rs (see `Data::Signal`).
    pub(crate) signals: LoopSignals,
    pub(crate) processes: LoopProcesses,
    /// The waker and the `Async` handles it serves (`async.rs`).
    pub(crate) asyncs: LoopAsync,
    /// The inotify fd and its watches (`fs_event.rs`).
    pub(crate) inotify: LoopInotify,
    /// The layers' state, one value per type (`context_mut`). Declared
    /// last, so it drops after the handles: nothing in it may need them.
    pub(crate) contexts: Contexts,
}

impl std::fmt::Debug for Loop {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Loop")
            .field("handles", &self.slots.len())
            .field("active_refs", &self.active_refs)
            .field("active_reqs", &self.active_reqs)
            .field("now", &self.now)
            .finish_non_exhaustive()
    }
}

pub(crate) const READ_BUF_SIZE: usize = 64 * 1024;

impl Loop {
    /// Creates a loop. Its clock starts at 0 ms.
    ///
    /// # Errors
    ///
    /// Fails if the OS refuses a new epoll instance (for example on EMFILE).
    pub fn new() -> io::Result<Loop> {
        let mut lp = Loop {
            poll: mio::Poll::new()?,
            events: mio::Events::with_capacity(1024),
            slots: Slab::new(),
            next_gen: 1,
            active_refs: 0,
            active_reqs: 0,
            now: 0,
            epoch_ms: monotonic_ms(),
            stop_flag: false,
            running: false,
            timers: TimerQueue::default(),
            watchers: Default::default(),
            pending: VecDeque::new(),
            closing: Vec::new(),
            close_watches: HashMap::new(),
            still_ready: Vec::new(),
            read_buf: Vec::new(),
            emfile_fd: None,
            signals: LoopSignals::default(),
            processes: LoopProcesses::default(),
            asyncs: LoopAsync::default(),
            inotify: LoopInotify::default(),
            contexts: Contexts::default(),
        };
        // Socket activation: the first loop takes LISTEN_FDS (listen_fds.rs).
        super::listen_fds::adopt_from_env(&mut lp);
        Ok(lp)
    }

    // ----- handle table -------------------------------------------------

    pub(crate) fn insert(&mut self, data: Data) -> RawHandle {
        let gen_ = self.next_gen;
        self.next_gen = self.next_gen.wrapping_add(1).max(1);
        let index = self.slots.insert(Slot {
            gen_,
            flags: flags::REF,
            close_cb: None,
            data,
        });
        let index = u32::try_from(index).expect("more than 2^32 handles");
        RawHandle { index, gen_ }
    }

    pub(crate) fn slot(&self, raw: RawHandle) -> io::Result<&Slot> {
        match self.slots.get(raw.index as usize) {
            Some(s) if s.gen_ == raw.gen_ => Ok(s),
            _ => Err(stale()),
        }
    }

    pub(crate) fn slot_mut(&mut self, raw: RawHandle) -> io::Result<&mut Slot> {
        match self.slots.get_mut(raw.index as usize) {
            Some(s) if s.gen_ == raw.gen_ => Ok(s),
            _ => Err(stale()),
        }
    }

    /// Like [`slot_mut`](Self::slot_mut), but also fails for a closing handle.
    pub(crate) fn open_slot_mut(&mut self, raw: RawHandle) -> io::Result<&mut Slot> {
        let s = self.slot_mut(raw)?;
        if s.flags & flags::CLOSING != 0 {
            return Err(closing_err());
        }
        Ok(s)
    }

    /// Marks a handle active (`uv__handle_start`).
    pub(crate) fn activate(&mut self, raw: RawHandle) {
        if let Ok(s) = self.slot_mut(raw)
            && s.flags & flags::ACTIVE == 0
        {
            s.flags |= flags::ACTIVE;
            if s.flags & flags::REF != 0 {
                self.active_refs += 1;
            }
        }
    }

    /// Marks a handle inactive (`uv__handle_stop`).
    pub(crate) fn deactivate(&mut self, raw: RawHandle) {
        if let Ok(s) = self.slot_mut(raw)
            && s.flags & flags::ACTIVE != 0
        {
            s.flags &= !flags::ACTIVE;
            if s.flags & flags::REF != 0 {
                self.active_refs -= 1;
            }
        }
    }

    pub(crate) fn set_active(&mut self, raw: RawHandle, active: bool) {
        if active {
            self.activate(raw)
        } else {
            self.deactivate(raw)
        }
    }

    pub(crate) fn add_pending(&mut self, raw: RawHandle) {
        self.pending.push_back(raw);
    }

    // ----- generic handle operations ----------------------------------

    /// Whether the handle is active: a started timer or watcher, a reading
    /// or listening stream, a receiving UDP socket, a started signal, a
    /// running process (`uv_is_active`). A stale id is not active.
    pub fn is_active(&self, h: impl HandleId) -> bool {
        self.slot(h.raw())
            .map(|s| s.flags & flags::ACTIVE != 0)
            .unwrap_or(false)
    }

    /// Whether [`close`](Self::close) has been called on the handle and its
    /// close callback has not run yet (`uv_is_closing`). A stale id (one
    /// whose close callback already ran) also reports `true`.
    pub fn is_closing(&self, h: impl HandleId) -> bool {
        self.slot(h.raw())
            .map(|s| s.flags & flags::CLOSING != 0)
            .unwrap_or(true)
    }

    /// Whether the handle is referenced (`uv_has_ref`).
    pub fn has_ref(&self, h: impl HandleId) -> bool {
        self.slot(h.raw())
            .map(|s| s.flags & flags::REF != 0)
            .unwrap_or(false)
    }

    /// References the handle: while active it keeps the loop alive
    /// (`uv_ref`). Idempotent.
    ///
    /// # Errors
    ///
    /// A stale id.
    pub fn ref_handle(&mut self, h: impl HandleId) -> io::Result<()> {
        self.set_ref(h.raw(), true)
    }

    /// Unreferences the handle: it no longer keeps the loop alive, though it
    /// still works while the loop runs for other reasons (`uv_unref`).
    /// Idempotent.
    ///
    /// # Errors
    ///
    /// A stale id.
    pub fn unref_handle(&mut self, h: impl HandleId) -> io::Result<()> {
        self.set_ref(h.raw(), false)
    }

    pub(crate) fn set_ref(&mut self, raw: RawHandle, on: bool) -> io::Result<()> {
        let s = self.slot_mut(raw)?;
        let was = s.flags & flags::REF != 0;
        if was == on {
            return Ok(());
        }
        let counted = s.flags & flags::ACTIVE != 0 && s.flags & flags::CLOSING == 0;
        if on {
            s.flags |= flags::REF;
        } else {
            s.flags &= !flags::REF;
        }
        if counted {
            if on {
                self.active_refs += 1;
            } else {
                self.active_refs -= 1;
            }
        }
        Ok(())
    }

    /// Closes a handle (`uv_close`).
    ///
    /// `h` is a typed id, a [`Socket`](super::Socket), a
    /// [`Stream`](super::Stream) or an [`AnyHandle`]: closing never needs a
    /// match on the handle's kind. The handle stops at once (timers disarm,
    /// sockets close their fd, queued writes are cancelled), and `on_close`
    /// runs in this iteration's closing phase, after every other callback of
    /// the iteration. Callbacks of requests still outstanding (writes,
    /// connect, shutdown) run first, with `ECANCELED`. After `on_close` the
    /// id is stale.
    ///
    /// To close a handle that may already be closing, with nothing to do
    /// once it has closed, use [`close_if_open`](Self::close_if_open).
    ///
    /// # Errors
    ///
    /// A stale id, or a handle that is already closing (libuv asserts; here
    /// it is an error and `on_close` is dropped).
    pub fn close(
        &mut self,
        h: impl HandleId,
        on_close: impl FnOnce(&mut Loop) + 'static,
    ) -> io::Result<()> {
        self.close_raw(h.raw(), Some(Box::new(on_close)))
    }

    /// Closes `h` unless it is already closing or closed, with no close
    /// callback: the quiet, idempotent form of [`close`](Self::close), for
    /// "this handle must end, whoever else is ending it". Returns whether
    /// this call started the close (`false` for a closing handle or a stale
    /// id, which are left alone).
    ///
    /// The handle ends exactly as with `close`: it stops at once, its
    /// outstanding requests' callbacks run with `ECANCELED` in the closing
    /// phase, and then its id is stale.
    ///
    /// # Examples
    ///
    /// ```
    /// use uvcluster::uv::{Loop, RunMode};
    ///
    /// let mut lp = Loop::new()?;
    /// let t = lp.timer_init();
    /// assert!(lp.close_if_open(t));
    /// assert!(!lp.close_if_open(t)); // already closing: nothing to do
    /// lp.run(RunMode::Default)?;
    /// assert!(!lp.close_if_open(t)); // stale: nothing to do
    /// # Ok::<(), std::io::Error>(())
    /// ```
    pub fn close_if_open(&mut self, h: impl HandleId) -> bool {
        self.close_raw(h.raw(), None).is_ok()
    }

    pub(crate) fn close_raw(&mut self, raw: RawHandle, cb: Option<CloseCb>) -> io::Result<()> {
        let s = self.open_slot_mut(raw)?;
        s.flags |= flags::CLOSING;
        s.close_cb = cb;
        // Type-specific close: stop the handle and release its OS resources
        // now, as libuv's uv_close does; the rest happens in the closing phase.
        match s.data {
            Data::Timer(_) => self.timer_close_now(raw),
            Data::Idle(_) | Data::Prepare(_) | Data::Check(_) => self.watcher_close_now(raw),
            Data::Tcp(_) | Data::Pipe(_) => super::stream::close_now(self, raw),
            Data::Udp(_) => super::udp::close_now(self, raw),
            Data::Signal(_) => super::signal::close_now(self, raw),
            Data::Process(_) => super::process::close_now(self, raw),
            Data::Async(_) => super::r#async::close_now(self, raw),
            Data::Poll(_) => super::poll::close_now(self, raw),
            Data::FsEvent(_) => super::fs_event::close_now(self, raw),
        }
        // A closing handle no longer counts as active; the closing list
        // keeps the loop alive until its callback has run.
        self.deactivate(raw);
        self.closing.push(raw);
        Ok(())
    }

    /// Runs `cb` once `h` has finished closing, however and by whom it is
    /// closed: in the closing phase, right after the handle's own close
    /// callback. `net::Server` counts its connections with it, so that a
    /// connection closed with a plain [`close`](Self::close) is counted
    /// gone too. A second watch on the same handle runs after the first.
    ///
    /// # Errors
    ///
    /// A stale id; `cb` is then dropped.
    pub(crate) fn watch_close(
        &mut self,
        h: impl HandleId,
        cb: impl FnOnce(&mut Loop) + 'static,
    ) -> io::Result<()> {
        let raw = h.raw();
        self.slot(raw)?;
        let cb: CloseCb = match self.close_watches.remove(&raw) {
            Some(first) => Box::new(move |lp: &mut Loop| {
                first(lp);
                cb(lp);
            }),
            None => Box::new(cb),
        };
        self.close_watches.insert(raw, cb);
        Ok(())
    }

    /// Calls `f` for every live handle that the user created (closing ones
    /// included, internal ones not), in table order (`uv_walk`).
    pub fn walk(&self, mut f: impl FnMut(AnyHandle)) {
        for (index, s) in &self.slots {
            if s.flags & flags::INTERNAL != 0 {
                continue;
            }
            let raw = RawHandle {
                index: index as u32,
                gen_: s.gen_,
            };
            f(match s.data {
                Data::Timer(_) => AnyHandle::Timer(Handle::from_raw(raw)),
                Data::Idle(_) => AnyHandle::Idle(Handle::from_raw(raw)),
                Data::Prepare(_) => AnyHandle::Prepare(Handle::from_raw(raw)),
                Data::Check(_) => AnyHandle::Check(Handle::from_raw(raw)),
                Data::Tcp(_) => AnyHandle::Tcp(Handle::from_raw(raw)),
                Data::Pipe(_) => AnyHandle::Pipe(Handle::from_raw(raw)),
                Data::Udp(_) => AnyHandle::Udp(Handle::from_raw(raw)),
                Data::Signal(_) => AnyHandle::Signal(Handle::from_raw(raw)),
                Data::Process(_) => AnyHandle::Process(Handle::from_raw(raw)),
                Data::Async(_) => AnyHandle::Async(Handle::from_raw(raw)),
                Data::Poll(_) => AnyHandle::Poll(Handle::from_raw(raw)),
                Data::FsEvent(_) => AnyHandle::FsEvent(Handle::from_raw(raw)),
            })
        }
    }

    /// The number of live handles the user created (what [`walk`](Self::walk)
    /// visits). Tests use it to check that a loop ends with none left.
    pub fn handle_count(&self) -> usize {
        self.slots
            .iter()
            .filter(|(_, s)| s.flags & flags::INTERNAL == 0)
            .count()
    }

    // ----- time ---------------------------------------------------------

    /// The loop's cached time in milliseconds since the loop was created
    /// (`uv_now`). It is refreshed once per iteration, after poll, so it may
    /// lag real time inside a long callback; see [`update_time`](Self::update_time).
    pub fn now(&self) -> u64 {
        self.now
    }

    /// Refreshes the cached time (`uv_update_time`).
    pub fn update_time(&mut self) {
        self.now = monotonic_ms().saturating_sub(self.epoch_ms);
    }

    /// A monotonic high-resolution time in nanoseconds (`uv_hrtime`), from an
    /// arbitrary origin shared by every loop of the process.
    pub fn hrtime() -> u64 {
        use std::sync::OnceLock;
        static ORIGIN: OnceLock<Instant> = OnceLock::new();
        ORIGIN.get_or_init(Instant::now).elapsed().as_nanos() as u64
    }

    // ----- running ------------------------------------------------------

    /// Whether the loop has work: an active referenced handle, a request in
    /// flight, a deferred callback, or a handle closing (`uv_loop_alive`).
    pub fn alive(&self) -> bool {
        self.active_refs > 0
            || self.active_reqs > 0
            || !self.pending.is_empty()
            || !self.closing.is_empty()
    }

    /// Asks [`run`](Self::run) to return after the current iteration
    /// (`uv_stop`). Set before `run`, it makes `run` return at once.
    pub fn stop(&mut self) {
        self.stop_flag = true;
    }

    /// The poll timeout the next iteration would use, in whole
    /// milliseconds; `None` means it would block until an event
    /// (`uv_backend_timeout`).
    pub fn backend_timeout(&mut self) -> Option<Duration> {
        self.backend_timeout_ms().map(Duration::from_millis)
    }

    fn backend_timeout_ms(&mut self) -> Option<u64> {
        if self.stop_flag
            || (self.active_refs == 0 && self.active_reqs == 0)
            || !self.pending.is_empty()
            || !self.watchers[super::loop_watcher::IDLE].is_empty()
            || !self.closing.is_empty()
            || !self.still_ready.is_empty()
        {
            return Some(0);
        }
        self.next_timer_due()
            .map(|due| due.saturating_sub(self.now))
    }

    /// Runs the loop (`uv_run`).
    ///
    /// Returns whether the loop is still alive: in [`RunMode::Default`] that is
    /// `true` only when [`stop`](Self::stop) ended it early.
    ///
    /// # Errors
    ///
    /// A call from inside a callback of this loop (the loop is not
    /// reentrant), or a failure of the OS poll itself.
    pub fn run(&mut self, mode: RunMode) -> io::Result<bool> {
        if self.running {
            return Err(io::Error::new(
                io::ErrorKind::ResourceBusy,
                "Loop::run called from inside a callback of the same loop",
            ));
        }
        self.running = true;
        let r = self.run_inner(mode);
        self.running = false;
        r
    }

    fn run_inner(&mut self, mode: RunMode) -> io::Result<bool> {
        let mut r = self.alive();
        if !r {
            self.update_time();
        }
        // libuv >= 1.45 runs due timers once before the first iteration in
        // DEFAULT mode, for backward compatibility with the old order.
        if mode == RunMode::Default && r && !self.stop_flag {
            self.update_time();
            self.run_timers();
        }
        while r && !self.stop_flag {
            let can_sleep =
                self.pending.is_empty() && self.watchers[super::loop_watcher::IDLE].is_empty();
            self.run_pending();
            self.run_watchers(super::loop_watcher::IDLE);
            self.run_watchers(super::loop_watcher::PREPARE);
            let timeout = if (mode == RunMode::Once && can_sleep) || mode == RunMode::Default {
                self.backend_timeout_ms()
            } else {
                Some(0)
            };
            self.io_poll(timeout)?;
            for _ in 0..PENDING_AFTER_POLL {
                if self.pending.is_empty() {
                    break;
                }
                self.run_pending();
            }
            self.run_watchers(super::loop_watcher::CHECK);
            self.run_closing();
            self.update_time();
            self.run_timers();
            r = self.alive();
            if mode != RunMode::Default {
                break;
            }
        }
        self.stop_flag = false;
        Ok(r)
    }

    /// Runs the deferred callbacks queued so far; ones queued meanwhile wait
    /// for the next pass (`uv__run_pending`).
    fn run_pending(&mut self) {
        let n = self.pending.len();
        for _ in 0..n {
            let Some(raw) = self.pending.pop_front() else {
                break;
            };
            let Ok(s) = self.slot(raw) else { continue };
            match s.data {
                Data::Tcp(_) | Data::Pipe(_) => super::stream::run_pending(self, raw),
                Data::Udp(_) => super::udp::run_pending(self, raw),
                _ => {}
            }
        }
    }

    fn io_poll(&mut self, timeout: Option<u64>) -> io::Result<()> {
        let mut events = mem::replace(&mut self.events, mio::Events::with_capacity(0));
        // The wait is measured against the loop's cached time, as libuv's
        // uv__io_poll does: no clock read before the wait, and one after it
        // (the update_time below), which the loop needs anyway.
        let base = self.now;
        let mut left = timeout;
        let res = loop {
            match self.poll.poll(&mut events, left.map(Duration::from_millis)) {
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {
                    // A signal interrupted the wait: retry with what is left.
                    self.update_time();
                    match timeout {
                        Some(0) => {
                            events.clear();
                            break Ok(());
                        }
                        Some(t) => {
                            let spent = self.now.saturating_sub(base);
                            if spent >= t {
                                events.clear();
                                break Ok(());
                            }
                            left = Some(t - spent);
                        }
                        None => {}
                    }
                }
                other => break other,
            }
        };
        self.update_time();
        if let Err(e) = res {
            self.events = events;
            return Err(e);
        }
        // Handles left over from the previous pass go after this batch;
        // handles that stop short during this pass wait for the next one.
        let resume = mem::take(&mut self.still_ready);
        let mut signalled = false;
        for ev in events.iter() {
            if ev.token() == SIGNAL_TOKEN {
                signalled = true;
                continue;
            }
            if ev.token() == WAKER_TOKEN {
                super::r#async::dispatch(self);
                continue;
            }
            if ev.token() == INOTIFY_TOKEN {
                super::fs_event::dispatch(self);
                continue;
            }
            let ready = Ready {
                readable: ev.is_readable() || ev.is_read_closed(),
                writable: ev.is_writable() || ev.is_write_closed(),
                error: ev.is_error(),
                read_closed: ev.is_read_closed() || ev.is_error(),
                priority: ev.is_priority(),
            };
            self.dispatch_io(RawHandle::from_token(ev.token().0), ready);
        }
        self.events = events;
        for &raw in &resume {
            self.dispatch_io(raw, Ready::default());
        }
        // Signals are dispatched after the other events of the batch, as libuv does.
        if signalled {
            super::signal::dispatch(self);
        }
        Ok(())
    }

    fn dispatch_io(&mut self, raw: RawHandle, ready: Ready) {
        let Ok(s) = self.slot(raw) else { return };
        if s.flags & flags::CLOSING != 0 {
            return;
        }
        match s.data {
            Data::Tcp(_) | Data::Pipe(_) => super::stream::on_io(self, raw, ready),
            Data::Udp(_) => super::udp::on_io(self, raw, ready),
            Data::Poll(_) => super::poll::on_io(self, raw, ready),
            _ => {}
        }
    }

    /// Runs the close callbacks of the handles closed so far, most recently
    /// closed first (libuv's closing list is a stack). A close made inside
    /// a close callback finishes in the next iteration.
    fn run_closing(&mut self) {
        if self.closing.is_empty() {
            return;
        }
        let mut list = mem::take(&mut self.closing);
        for &raw in list.iter().rev() {
            self.finish_close(raw);
        }
        list.clear();
        if self.closing.is_empty() {
            self.closing = list;
        }
    }

    fn finish_close(&mut self, raw: RawHandle) {
        let Ok(s) = self.slot(raw) else { return };
        // Outstanding requests are cancelled and their callbacks run before
        // the close callback (uv__stream_destroy).
        match s.data {
            Data::Tcp(_) | Data::Pipe(_) => super::stream::finish_close(self, raw),
            Data::Udp(_) => super::udp::finish_close(self, raw),
            _ => {}
        }
        let slot = self.slots.remove(raw.index as usize);
        if slot.flags & flags::ACTIVE != 0 && slot.flags & flags::REF != 0 {
            self.active_refs -= 1;
        }
        if let Some(cb) = slot.close_cb {
            cb(self);
        }
        if !self.close_watches.is_empty()
            && let Some(watch) = self.close_watches.remove(&raw)
        {
            watch(self);
        }
    }
}

/// `CLOCK_MONOTONIC` in whole milliseconds, as libuv's `uv__update_time`
/// computes `loop->time`. One vDSO call and an integer division: cheaper
/// than `Instant::elapsed`, which goes through `Timespec` subtraction and
/// `Duration`, and the loop reads the clock twice per iteration. (libuv
/// would use `CLOCK_MONOTONIC_COARSE` where its resolution is 1 ms or finer;
/// with HZ=250 it is 4 ms, too coarse, so this keeps the precise clock.)
fn monotonic_ms() -> u64 {
    match nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC) {
        Ok(ts) => ts.tv_sec() as u64 * 1000 + ts.tv_nsec() as u64 / 1_000_000,
        // CLOCK_MONOTONIC cannot fail on Linux; fall back to std if it does.
        Err(_) => {
            use std::sync::OnceLock;
            static ORIGIN: OnceLock<Instant> = OnceLock::new();
            ORIGIN.get_or_init(Instant::now).elapsed().as_millis() as u64
        }
    }
}

pub(crate) fn closing_err() -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, "handle is closing")
}

pub(crate) fn einval(msg: &'static str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, msg)
}
