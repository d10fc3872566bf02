//! Signal handles (libuv's `src/unix/signal.c`).
//!
//! Signal dispositions are process-wide; signal handles belong to a loop.
//! The first watcher of a signal number in the process installs a handler
//! (`SA_RESTART`, every signal blocked while it runs; `SA_RESETHAND` while
//! every watcher of that number is one-shot) that writes the signal number
//! to the self-pipe of every loop watching it. Each loop creates its pipe
//! lazily, on its first [`Loop::signal_start`], and reads it in the poll
//! phase after the other events of the batch: each delivered signal calls
//! every started handle of that number on the loop once, in start order.
//! When the last watcher of a number in the process stops, the disposition
//! goes back to `SIG_DFL` (not to whatever was there before, as in libuv).
//!
//! Several loops on several threads may watch the same signal: each gets
//! its own callbacks. The kernel may merge deliveries of a signal that is
//! already pending, so `n` signals sent may run a callback fewer times.

use std::io;
use std::os::fd::AsRawFd;

use mio::Interest;
use mio::unix::SourceFd;

use super::callback::CallbackSlot;
use super::event_loop::{Data, Loop, SIGNAL_TOKEN, closing_err};
use super::handle::{Handle, RawHandle, Signal, flags};
use super::signum::Signum;
use crate::sys;
use crate::sys::signal::LoopPipe;

type SignalFn = dyn FnMut(&mut Loop, RawHandle, Signum);
pub(crate) type SignalCb = Box<SignalFn>;

/// Per-loop signal state: the self-pipe the process-wide handler writes to.
#[derive(Default)]
pub(crate) struct LoopSignals {
    /// Created by the first start; its `Drop` (when the loop drops)
    /// unregisters the loop from the process-wide table.
    pipe: Option<LoopPipe>,
    /// Started handles, oldest first.
    started: Vec<RawHandle>,
    /// Bytes read from the pipe; kept for its allocation.
    buf: Vec<u8>,
}

/// The state of a signal handle.
pub(crate) struct SignalState {
    /// The watched signal number; 0 while stopped.
    signum: i32,
    oneshot: bool,
    cb: CallbackSlot<SignalFn>,
}

impl SignalState {
    pub(crate) fn new() -> SignalState {
        SignalState {
            signum: 0,
            oneshot: false,
            cb: CallbackSlot::empty(),
        }
    }
}

fn state_mut(lp: &mut Loop, raw: RawHandle) -> io::Result<&mut SignalState> {
    match &mut lp.slot_mut(raw)?.data {
        Data::Signal(s) => Ok(s),
        _ => unreachable!("a Handle<Signal> always names a signal slot"),
    }
}

fn einval() -> io::Error {
    io::Error::from_raw_os_error(nix::libc::EINVAL)
}

fn ensure_pipe(lp: &mut Loop) -> io::Result<&mut LoopPipe> {
    if lp.signals.pipe.is_none() {
        let pipe = LoopPipe::new()?;
        let fd = pipe.read_fd().as_raw_fd();
        lp.poll
            .registry()
            .register(&mut SourceFd(&fd), SIGNAL_TOKEN, Interest::READABLE)?;
        lp.signals.pipe = Some(pipe);
    }
    Ok(lp.signals.pipe.as_mut().expect("just created"))
}

/// Starts `raw` on `signum` (`uv__signal_start`). The same signum only
/// swaps the callback; another one stops the handle first.
pub(crate) fn start_raw(
    lp: &mut Loop,
    raw: RawHandle,
    signum: i32,
    oneshot: bool,
    cb: SignalCb,
) -> io::Result<()> {
    if lp.slot(raw)?.flags & flags::CLOSING != 0 {
        return Err(closing_err());
    }
    if !sys::signal::valid_signum(signum) {
        return Err(einval());
    }
    let st = state_mut(lp, raw)?;
    if st.signum == signum {
        st.cb.set(cb);
        return Ok(());
    }
    stop_raw(lp, raw);
    ensure_pipe(lp)?.start(signum, oneshot)?;
    let st = state_mut(lp, raw)?;
    st.signum = signum;
    st.oneshot = oneshot;
    st.cb.set(cb);
    lp.signals.started.push(raw);
    lp.activate(raw);
    Ok(())
}

/// Stops `raw` if it is started (`uv__signal_stop`).
pub(crate) fn stop_raw(lp: &mut Loop, raw: RawHandle) {
    let Ok(st) = state_mut(lp, raw) else { return };
    if st.signum == 0 {
        return;
    }
    let (signum, oneshot) = (st.signum, st.oneshot);
    st.signum = 0;
    if let Some(pipe) = lp.signals.pipe.as_mut() {
        pipe.stop(signum, oneshot);
    }
    lp.signals.started.retain(|&r| r != raw);
    lp.deactivate(raw);
}

pub(crate) fn close_now(lp: &mut Loop, raw: RawHandle) {
    stop_raw(lp, raw);
    if let Ok(st) = state_mut(lp, raw) {
        st.cb.clear();
    }
}

/// Reads the loop's self-pipe and runs the callbacks of the signals caught.
pub(crate) fn dispatch(lp: &mut Loop) {
    let Some(pipe) = lp.signals.pipe.as_ref() else {
        return;
    };
    let mut buf = std::mem::take(&mut lp.signals.buf);
    buf.clear();
    pipe.drain(&mut buf);
    let mut targets = Vec::new();
    for &byte in &buf {
        let signum = i32::from(byte);
        targets.clear();
        targets.extend(lp.signals.started.iter().copied().filter(|&r| {
            matches!(lp.slot(r), Ok(s) if matches!(&s.data, Data::Signal(st) if st.signum == signum))
        }));
        for &raw in &targets {
            call(lp, raw, signum);
        }
    }
    buf.clear();
    lp.signals.buf = buf;
}

fn call(lp: &mut Loop, raw: RawHandle, signum: i32) {
    let Ok(s) = lp.slot_mut(raw) else { return };
    if s.flags & flags::CLOSING != 0 {
        return;
    }
    let Data::Signal(st) = &mut s.data else {
        return;
    };
    // A callback earlier in this batch may have stopped or restarted it.
    if st.signum != signum {
        return;
    }
    let oneshot = st.oneshot;
    let cb = st.cb.take();
    // A one-shot handle stops before its callback, which may restart it.
    if oneshot {
        stop_raw(lp, raw);
    }
    // The callback slot's rule: put back unless the handle was closed or
    // a start inside the callback replaced it.
    if let Some(mut f) = cb
        && let Some(sig) = Signum::new(signum)
    {
        f(lp, raw, sig);
        if let Ok(s) = lp.slot_mut(raw)
            && let Data::Signal(st) = &mut s.data
        {
            st.cb.put_back(f);
        }
    }
}

impl Loop {
    /// Creates a signal handle (`uv_signal_init`). It watches nothing until
    /// started.
    pub fn signal_init(&mut self) -> Handle<Signal> {
        Handle::from_raw(self.insert(Data::Signal(SignalState::new())))
    }

    /// Watches signal `signum` (`uv_signal_start`): `cb` runs in the poll
    /// phase, once per delivered signal, with the signal. The handle is
    /// active while started.
    ///
    /// Dispositions are process-wide, handles per loop: the first watcher of
    /// `signum` in the process installs one handler (`SA_RESTART`, all
    /// signals blocked while it runs) that only writes the signal number to
    /// the self-pipe of every loop watching it; each loop reads its pipe in
    /// its poll phase, after the other events of the batch, and calls every
    /// started handle of that number once per delivered signal, oldest
    /// first. Several loops on several threads each get their own calls.
    /// The kernel merges a signal sent while the same one is pending. When
    /// the last watcher of `signum` in the process stops, the disposition
    /// goes back to `SIG_DFL`.
    ///
    /// Starting a started handle on the same signum only swaps the
    /// callback; on another signum it first stops the handle.
    ///
    /// # Examples
    ///
    /// ```
    /// use uvcluster::uv::{Loop, Signum};
    ///
    /// let mut lp = Loop::new()?;
    /// let s = lp.signal_init();
    /// lp.signal_start(s, Signum::SIGUSR1, |lp, s, signum| {
    ///     println!("got {signum}");
    ///     lp.close(s, |_| {}).unwrap();
    /// })?;
    /// assert!(lp.is_active(s));
    /// lp.close(s, |_| {})?;
    /// lp.run(uvcluster::uv::RunMode::Default)?;
    /// # Ok::<(), std::io::Error>(())
    /// ```
    ///
    /// # Errors
    ///
    /// A stale id or closing handle; `EINVAL` for a signal that cannot be
    /// caught (`SIGKILL`, `SIGSTOP`);
    /// `EMFILE` if the loop's self-pipe cannot be created. `cb` is then
    /// dropped.
    pub fn signal_start(
        &mut self,
        h: Handle<Signal>,
        signum: Signum,
        mut cb: impl FnMut(&mut Loop, Handle<Signal>, Signum) + 'static,
    ) -> io::Result<()> {
        start_raw(
            self,
            h.raw,
            signum.as_raw(),
            false,
            Box::new(move |lp, raw, s| cb(lp, Handle::from_raw(raw), s)),
        )
    }

    /// Like [`signal_start`](Self::signal_start), but the handle stops
    /// itself just before its callback runs, so the callback runs at most
    /// once per start (`uv_signal_start_oneshot`). While every watcher of
    /// `signum` in the process is one-shot, the handler is installed with
    /// `SA_RESETHAND`: a second signal that arrives before the first is
    /// dispatched gets the default action.
    ///
    /// # Errors
    ///
    /// As [`signal_start`](Self::signal_start); `cb` is then dropped.
    pub fn signal_start_oneshot(
        &mut self,
        h: Handle<Signal>,
        signum: Signum,
        cb: impl FnOnce(&mut Loop, Handle<Signal>, Signum) + 'static,
    ) -> io::Result<()> {
        let mut cb = Some(cb);
        start_raw(
            self,
            h.raw,
            signum.as_raw(),
            true,
            Box::new(move |lp, raw, s| {
                if let Some(cb) = cb.take() {
                    cb(lp, Handle::from_raw(raw), s)
                }
            }),
        )
    }

    /// Stops watching (`uv_signal_stop`). Signals caught but not yet
    /// dispatched are dropped for this handle. Stopping a stopped handle is
    /// fine. The last watcher of a signal in the process restores
    /// `SIG_DFL`.
    ///
    /// # Errors
    ///
    /// A stale id.
    pub fn signal_stop(&mut self, h: Handle<Signal>) -> io::Result<()> {
        self.slot(h.raw)?;
        stop_raw(self, h.raw);
        Ok(())
    }

    /// The signal the handle watches, or `None` while it is stopped
    /// (`uv_signal_t.signum`, 0 when stopped).
    ///
    /// # Errors
    ///
    /// A stale id.
    pub fn signal_signum(&mut self, h: Handle<Signal>) -> io::Result<Option<Signum>> {
        Ok(Signum::new(state_mut(self, h.raw)?.signum))
    }
}
