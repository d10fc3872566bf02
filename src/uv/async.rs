//! Async handles: a wake-up from another thread (libuv's
//! `src/unix/async.c`, `uv_async_t`).
//!
//! Each loop has at most one `mio::Waker` (an eventfd), made by its first
//! [`Loop::async_init`] and shared by every async handle of the loop, as
//! libuv shares one eventfd per loop. A handle's senders
//! ([`AsyncSender`], any thread) set the handle's `pending` flag and, only
//! when it was clear, wake the loop: many sends before the loop looks
//! become one wake-up and one callback. In the poll phase the loop takes
//! the waker's event, walks its async handles in creation order and calls
//! every handle whose flag it clears (libuv's `uv__async_io`).
//!
//! libuv's `pending` word also counts senders still inside
//! `uv_async_send`, so that `uv_close` can spin until none is left before
//! the memory goes away. Here a sender holds an `Arc` of the shared flags,
//! so nothing can go away under it and there is nothing to wait for.

use std::fmt;
use std::io;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use super::callback::CallbackSlot;
use super::event_loop::{Data, Loop, WAKER_TOKEN};
use super::handle::{Async, Handle, RawHandle, flags, stale};

type AsyncFn = dyn FnMut(&mut Loop, Handle<Async>);

/// Per-loop async state: the waker and the handles it serves.
#[derive(Default)]
pub(crate) struct LoopAsync {
    /// Made by the first `async_init`; one per loop (mio allows one waker
    /// per `Poll`).
    waker: Option<Arc<mio::Waker>>,
    /// Open async handles, oldest first (libuv's `async_handles` queue),
    /// with what they share with their senders.
    handles: Vec<(RawHandle, Arc<Shared>)>,
}

impl Drop for LoopAsync {
    /// The loop is gone: senders that outlive it are refused, as after a
    /// close.
    fn drop(&mut self) {
        for (_, shared) in &self.handles {
            shared.closed.store(true, Ordering::Release);
        }
    }
}

/// What a handle shares with its senders.
struct Shared {
    /// Set by a send, cleared by the loop just before the callback.
    pending: AtomicBool,
    /// Set when the handle is closed: later sends are refused.
    closed: AtomicBool,
    waker: Arc<mio::Waker>,
}

/// The state of an async handle.
pub(crate) struct AsyncState {
    shared: Arc<Shared>,
    cb: CallbackSlot<AsyncFn>,
}

/// The sending half of an async handle: `Send`, `Sync` and `Clone`, so any
/// thread can wake the loop with [`send`](Self::send) (`uv_async_send`).
///
/// Made by [`Loop::async_sender`]. A sender does not keep the handle open:
/// once the handle is closed, or its loop dropped, `send` returns an error
/// and does nothing. A sender may outlive the loop.
///
/// # Examples
///
/// ```
/// use uvcluster::uv::{Loop, RunMode};
///
/// let mut lp = Loop::new()?;
/// let h = lp.async_init(|lp, h| {
///     println!("woken");
///     lp.close(h, |_| {}).unwrap();
/// })?;
/// let tx = lp.async_sender(h)?;
/// let t = std::thread::spawn(move || tx.send().unwrap());
/// lp.run(RunMode::Default)?; // returns once the callback has closed h
/// t.join().unwrap();
/// # Ok::<(), std::io::Error>(())
/// ```
#[derive(Clone)]
pub struct AsyncSender {
    shared: Arc<Shared>,
}

impl fmt::Debug for AsyncSender {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AsyncSender")
            .field("pending", &self.shared.pending.load(Ordering::Relaxed))
            .field("closed", &self.shared.closed.load(Ordering::Relaxed))
            .finish()
    }
}

impl AsyncSender {
    /// Wakes the loop and has it call the handle's callback
    /// (`uv_async_send`). Safe to call from any thread, any number of
    /// times: sends made before the loop gets to the handle are coalesced,
    /// so `n` sends run the callback at least once and at most `n` times.
    /// Everything this thread did before `send` is visible to the callback.
    ///
    /// Only the first send after a callback costs a system call (an eventfd
    /// write); the others find the flag already set and return at once.
    ///
    /// # Errors
    ///
    /// The handle has been closed or its loop dropped: an error wrapping
    /// [`StaleHandle`](crate::uv::StaleHandle), and nothing happens. (libuv
    /// leaves a send after close undefined.) An error writing the eventfd,
    /// which Linux does not produce for a counter this small.
    pub fn send(&self) -> io::Result<()> {
        let s = &self.shared;
        if s.closed.load(Ordering::Acquire) {
            return Err(stale());
        }
        // A cheap read first, as libuv does: a pending handle needs nothing.
        if s.pending.load(Ordering::Relaxed) {
            return Ok(());
        }
        // Release: what this thread wrote is visible to the loop, which
        // clears the flag with Acquire before it calls the callback.
        if s.pending.swap(true, Ordering::AcqRel) {
            return Ok(());
        }
        s.waker.wake()
    }

    /// Whether the handle has been closed: `send` would fail.
    pub fn is_closed(&self) -> bool {
        self.shared.closed.load(Ordering::Acquire)
    }
}

fn state(lp: &Loop, raw: RawHandle) -> io::Result<&AsyncState> {
    match &lp.slot(raw)?.data {
        Data::Async(s) => Ok(s),
        _ => unreachable!("a Handle<Async> always names an async slot"),
    }
}

fn waker(lp: &mut Loop) -> io::Result<Arc<mio::Waker>> {
    if let Some(w) = &lp.asyncs.waker {
        return Ok(w.clone());
    }
    let w = Arc::new(mio::Waker::new(lp.poll.registry(), WAKER_TOKEN)?);
    lp.asyncs.waker = Some(w.clone());
    Ok(w)
}

pub(crate) fn close_now(lp: &mut Loop, raw: RawHandle) {
    if let Ok(Data::Async(st)) = lp.slot_mut(raw).map(|s| &mut s.data) {
        st.shared.closed.store(true, Ordering::Release);
        st.cb.clear();
    }
    lp.asyncs.handles.retain(|(r, _)| *r != raw);
}

/// The waker fired: call every handle whose flag was set
/// (`uv__async_io`). A handle sent to while its callback runs is called
/// again at the next wake-up, which that send caused.
pub(crate) fn dispatch(lp: &mut Loop) {
    let handles: Vec<RawHandle> = lp.asyncs.handles.iter().map(|(r, _)| *r).collect();
    for raw in handles {
        let Ok(s) = lp.slot_mut(raw) else { continue };
        if s.flags & flags::CLOSING != 0 {
            continue;
        }
        let Data::Async(st) = &mut s.data else {
            continue;
        };
        if !st.shared.pending.swap(false, Ordering::AcqRel) {
            continue;
        }
        let Some(mut f) = st.cb.take() else { continue };
        f(lp, Handle::from_raw(raw));
        if let Ok(s) = lp.slot_mut(raw)
            && let Data::Async(st) = &mut s.data
        {
            st.cb.put_back(f);
        }
    }
}

impl Loop {
    /// Creates an async handle (`uv_async_init`): `cb` runs in the poll
    /// phase after one or more [`AsyncSender::send`]s, from any thread,
    /// or [`async_send`](Self::async_send)s.
    ///
    /// As in libuv, the handle is **active from creation**: it keeps
    /// [`run`](Self::run) going until it is closed or unreferenced
    /// ([`unref_handle`](Self::unref_handle)). There is no start or stop.
    /// libuv's `NULL` callback (a handle that only wakes the loop) is a
    /// callback that does nothing.
    ///
    /// The first async handle of a loop makes the loop's waker (an eventfd
    /// registered with the poller); every later one shares it.
    ///
    /// # Examples
    ///
    /// ```
    /// use uvcluster::uv::{Loop, RunMode};
    ///
    /// let mut lp = Loop::new()?;
    /// let h = lp.async_init(|lp, h| lp.close(h, |_| {}).unwrap())?;
    /// assert!(lp.is_active(h));
    /// lp.async_send(h)?;
    /// lp.async_send(h)?; // coalesced with the first
    /// lp.run(RunMode::Default)?;
    /// assert!(!lp.alive());
    /// # Ok::<(), std::io::Error>(())
    /// ```
    ///
    /// # Errors
    ///
    /// The waker cannot be created (`EMFILE`); `cb` is then dropped.
    pub fn async_init(
        &mut self,
        mut cb: impl FnMut(&mut Loop, Handle<Async>) + 'static,
    ) -> io::Result<Handle<Async>> {
        let waker = waker(self)?;
        let shared = Arc::new(Shared {
            pending: AtomicBool::new(false),
            closed: AtomicBool::new(false),
            waker,
        });
        let st = AsyncState {
            shared: shared.clone(),
            cb: CallbackSlot::new(Box::new(move |lp, h| cb(lp, h))),
        };
        let raw = self.insert(Data::Async(st));
        self.asyncs.handles.push((raw, shared));
        self.activate(raw);
        Ok(Handle::from_raw(raw))
    }

    /// A sender for `h`, to hand to other threads ([`AsyncSender`]).
    ///
    /// # Errors
    ///
    /// A stale id or a closing handle.
    pub fn async_sender(&self, h: Handle<Async>) -> io::Result<AsyncSender> {
        if self.slot(h.raw)?.flags & flags::CLOSING != 0 {
            return Err(super::event_loop::closing_err());
        }
        Ok(AsyncSender {
            shared: state(self, h.raw)?.shared.clone(),
        })
    }

    /// Sends to `h` from the loop's own thread (`uv_async_send`): the
    /// same as [`AsyncSender::send`], without making a sender.
    ///
    /// # Errors
    ///
    /// A stale id or a closing handle; the eventfd write failing.
    pub fn async_send(&self, h: Handle<Async>) -> io::Result<()> {
        self.async_sender(h)?.send()
    }
}
