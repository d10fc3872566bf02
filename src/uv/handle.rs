//! Typed, generational handle ids and the per-handle bookkeeping shared by
//! every handle type (libuv's `src/uv-common.h`: the ACTIVE, REF and CLOSING
//! flags, `uv_ref`, `uv_unref`, `uv_close`).
//!
//! A [`Handle<K>`] is a copyable id: a slot index in the loop's handle table
//! plus the generation the slot had when the handle was created. Every use is
//! checked against the slot's current generation, so an id whose handle was
//! closed (and whose slot may since hold another handle) is reported as
//! [`stale`](crate::uv::StaleHandle) instead of touching the new occupant.

use std::fmt;
use std::hash::{Hash, Hasher};
use std::marker::PhantomData;

/// The raw, untyped part of a handle id: slot index and generation.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub struct RawHandle {
    pub(crate) index: u32,
    pub(crate) gen_: u32,
}

impl RawHandle {
    /// The mio token for this handle: generation in the high half, index in
    /// the low half, so an event for a closed handle never reaches a new
    /// handle that reuses the slot.
    pub(crate) fn token(self) -> usize {
        ((self.gen_ as usize) << 32) | self.index as usize
    }

    pub(crate) fn from_token(token: usize) -> RawHandle {
        RawHandle {
            index: token as u32,
            gen_: (token >> 32) as u32,
        }
    }
}

/// A typed id for a handle owned by a [`Loop`](crate::uv::Loop).
///
/// `K` is one of the marker types ([`Timer`], [`Tcp`], ...). Ids are `Copy`;
/// copying an id does not copy the handle. All operations go through the loop:
/// `lp.timer_start(t, ...)`, `lp.close(t, ...)`.
pub struct Handle<K> {
    pub(crate) raw: RawHandle,
    _kind: PhantomData<fn() -> K>,
}

impl<K> Handle<K> {
    pub(crate) fn from_raw(raw: RawHandle) -> Self {
        Handle {
            raw,
            _kind: PhantomData,
        }
    }
}

impl<K> Clone for Handle<K> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<K> Copy for Handle<K> {}
impl<K> PartialEq for Handle<K> {
    fn eq(&self, other: &Self) -> bool {
        self.raw == other.raw
    }
}
impl<K> Eq for Handle<K> {}
impl<K> Hash for Handle<K> {
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.raw.hash(state)
    }
}
impl<K: HandleType> fmt::Debug for Handle<K> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "Handle<{}>({}#{})",
            K::NAME,
            self.raw.index,
            self.raw.gen_
        )
    }
}

pub(crate) mod sealed {
    use super::{AnyHandle, Handle, RawHandle};

    /// The crate-private half of [`HandleType`](super::HandleType): how a
    /// typed id becomes an [`AnyHandle`].
    pub trait Sealed: Sized {
        fn any(h: Handle<Self>) -> AnyHandle;
    }

    /// The crate-private half of [`HandleId`](super::HandleId).
    pub trait Raw {
        fn raw(&self) -> RawHandle;
    }
}

/// Implemented by the marker types that name a handle kind. Sealed.
pub trait HandleType: sealed::Sealed + 'static {
    /// The kind's name, as used in `Debug` output and error messages.
    const NAME: &'static str;
}

macro_rules! kinds {
    ($($(#[$doc:meta])* $name:ident),* $(,)?) => {$(
        $(#[$doc])*
        #[derive(Debug)]
        pub enum $name {}
        impl sealed::Sealed for $name {
            fn any(h: Handle<Self>) -> AnyHandle {
                AnyHandle::$name(h)
            }
        }
        impl HandleType for $name {
            const NAME: &'static str = stringify!($name);
        }
    )*};
}

kinds! {
    /// A timer (`uv_timer_t`); see [`Loop::timer_start`](crate::uv::Loop::timer_start).
    Timer,
    /// An idle watcher (`uv_idle_t`): runs once per iteration and keeps poll from blocking.
    Idle,
    /// A prepare watcher (`uv_prepare_t`): runs once per iteration, just before poll.
    Prepare,
    /// A check watcher (`uv_check_t`): runs once per iteration, just after poll.
    Check,
    /// A TCP socket: listener or stream (`uv_tcp_t`).
    Tcp,
    /// A Unix-domain stream socket, optionally in IPC mode (`uv_pipe_t`).
    Pipe,
    /// A UDP socket (`uv_udp_t`).
    Udp,
    /// A signal watcher (`uv_signal_t`).
    Signal,
    /// A child process (`uv_process_t`).
    Process,
    /// A wake-up from any thread (`uv_async_t`); see [`Loop::async_init`](crate::uv::Loop::async_init).
    Async,
    /// Readiness of an fd the user owns (`uv_poll_t`); see [`Loop::poll_start`](crate::uv::Loop::poll_start).
    Poll,
    /// A file or directory watch (`uv_fs_event_t`); see [`Loop::fs_event_start`](crate::uv::Loop::fs_event_start).
    FsEvent,
}

/// Any handle, with its kind: what [`Loop::walk`](crate::uv::Loop::walk)
/// reports. Every typed id, [`Socket`] and [`Stream`] converts into one
/// (`From`).
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
#[allow(missing_docs)]
pub enum AnyHandle {
    Timer(Handle<Timer>),
    Idle(Handle<Idle>),
    Prepare(Handle<Prepare>),
    Check(Handle<Check>),
    Tcp(Handle<Tcp>),
    Pipe(Handle<Pipe>),
    Udp(Handle<Udp>),
    Signal(Handle<Signal>),
    Process(Handle<Process>),
    Async(Handle<Async>),
    Poll(Handle<Poll>),
    FsEvent(Handle<FsEvent>),
}

impl<K: HandleType> From<Handle<K>> for AnyHandle {
    fn from(h: Handle<K>) -> AnyHandle {
        K::any(h)
    }
}

/// A socket handle of any of the three socket kinds: what an fd received
/// over an IPC pipe becomes ([`Loop::pipe_accept_pending`]), what
/// [`Loop::socket_open`] makes of an fd, and what [`Loop::write2`] sends.
///
/// `From<Handle<Tcp>>`, `From<Handle<Pipe>>`, `From<Handle<Udp>>` and
/// `From<Stream>` make one; [`Loop::close`], [`Loop::close_if_open`],
/// [`Loop::is_closing`] and the other generic handle operations take one
/// as they take a typed id.
///
/// [`Loop::pipe_accept_pending`]: crate::uv::Loop::pipe_accept_pending
/// [`Loop::socket_open`]: crate::uv::Loop::socket_open
/// [`Loop::write2`]: crate::uv::Loop::write2
/// [`Loop::close`]: crate::uv::Loop::close
/// [`Loop::close_if_open`]: crate::uv::Loop::close_if_open
/// [`Loop::is_closing`]: crate::uv::Loop::is_closing
///
/// # Examples
///
/// ```
/// use uvcluster::uv::{Loop, Socket};
///
/// let mut lp = Loop::new()?;
/// let (a, b) = lp.pipe_pair(false)?;
/// let s: Socket = a.into();
/// assert_eq!(s, Socket::Pipe(a));
/// lp.close(s, |_| {})?;
/// assert!(lp.close_if_open(b));
/// lp.run(uvcluster::uv::RunMode::Default)?;
/// # Ok::<(), std::io::Error>(())
/// ```
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub enum Socket {
    /// A TCP socket: a listener, a connection, or only bound.
    Tcp(Handle<Tcp>),
    /// A Unix stream socket.
    Pipe(Handle<Pipe>),
    /// A UDP socket.
    Udp(Handle<Udp>),
}

/// A stream handle of either stream kind: a TCP connection or a Unix
/// stream socket (libuv's `uv_stream_t`). What a server hands out as a
/// connection.
///
/// `From<Handle<Tcp>>` and `From<Handle<Pipe>>` make one, `TryFrom<Socket>`
/// takes one out of a [`Socket`]. The stream operations that take no
/// callback ([`Loop::read_stop`], [`Loop::is_reading`],
/// [`Loop::try_write`], [`Loop::write_queue_size`]) take a `Stream` as
/// they take a typed id, and so do the generic handle operations.
///
/// [`Loop::read_stop`]: crate::uv::Loop::read_stop
/// [`Loop::is_reading`]: crate::uv::Loop::is_reading
/// [`Loop::try_write`]: crate::uv::Loop::try_write
/// [`Loop::write_queue_size`]: crate::uv::Loop::write_queue_size
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub enum Stream {
    /// A TCP stream.
    Tcp(Handle<Tcp>),
    /// A Unix stream socket.
    Pipe(Handle<Pipe>),
}

impl From<Handle<Tcp>> for Socket {
    fn from(h: Handle<Tcp>) -> Socket {
        Socket::Tcp(h)
    }
}
impl From<Handle<Pipe>> for Socket {
    fn from(h: Handle<Pipe>) -> Socket {
        Socket::Pipe(h)
    }
}
impl From<Handle<Udp>> for Socket {
    fn from(h: Handle<Udp>) -> Socket {
        Socket::Udp(h)
    }
}
impl From<Stream> for Socket {
    fn from(s: Stream) -> Socket {
        match s {
            Stream::Tcp(h) => Socket::Tcp(h),
            Stream::Pipe(h) => Socket::Pipe(h),
        }
    }
}
impl From<Handle<Tcp>> for Stream {
    fn from(h: Handle<Tcp>) -> Stream {
        Stream::Tcp(h)
    }
}
impl From<Handle<Pipe>> for Stream {
    fn from(h: Handle<Pipe>) -> Stream {
        Stream::Pipe(h)
    }
}

/// A [`Socket`] that is not a stream (a UDP socket), refused by
/// `Stream::try_from`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NotAStream(pub Socket);

impl fmt::Display for NotAStream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?} is not a stream", self.0)
    }
}

impl std::error::Error for NotAStream {}

impl TryFrom<Socket> for Stream {
    type Error = NotAStream;
    fn try_from(s: Socket) -> Result<Stream, NotAStream> {
        match s {
            Socket::Tcp(h) => Ok(Stream::Tcp(h)),
            Socket::Pipe(h) => Ok(Stream::Pipe(h)),
            Socket::Udp(_) => Err(NotAStream(s)),
        }
    }
}

impl From<Socket> for AnyHandle {
    fn from(s: Socket) -> AnyHandle {
        match s {
            Socket::Tcp(h) => AnyHandle::Tcp(h),
            Socket::Pipe(h) => AnyHandle::Pipe(h),
            Socket::Udp(h) => AnyHandle::Udp(h),
        }
    }
}
impl From<Stream> for AnyHandle {
    fn from(s: Stream) -> AnyHandle {
        Socket::from(s).into()
    }
}

/// Anything that names one handle: a typed id [`Handle<K>`], a [`Socket`],
/// a [`Stream`] or an [`AnyHandle`]. The operations every handle has
/// ([`Loop::close`](crate::uv::Loop::close),
/// [`Loop::close_if_open`](crate::uv::Loop::close_if_open),
/// [`Loop::is_active`](crate::uv::Loop::is_active),
/// [`Loop::is_closing`](crate::uv::Loop::is_closing),
/// [`Loop::ref_handle`](crate::uv::Loop::ref_handle), ...) take any of
/// them, so no caller has to match on a socket's kind to close it. Sealed.
pub trait HandleId: sealed::Raw + Copy {}

impl<K: HandleType> sealed::Raw for Handle<K> {
    fn raw(&self) -> RawHandle {
        self.raw
    }
}
impl<K: HandleType> HandleId for Handle<K> {}

impl sealed::Raw for AnyHandle {
    fn raw(&self) -> RawHandle {
        match self {
            AnyHandle::Timer(h) => h.raw,
            AnyHandle::Idle(h) => h.raw,
            AnyHandle::Prepare(h) => h.raw,
            AnyHandle::Check(h) => h.raw,
            AnyHandle::Tcp(h) => h.raw,
            AnyHandle::Pipe(h) => h.raw,
            AnyHandle::Udp(h) => h.raw,
            AnyHandle::Signal(h) => h.raw,
            AnyHandle::Process(h) => h.raw,
            AnyHandle::Async(h) => h.raw,
            AnyHandle::Poll(h) => h.raw,
            AnyHandle::FsEvent(h) => h.raw,
        }
    }
}
impl HandleId for AnyHandle {}

impl sealed::Raw for Socket {
    fn raw(&self) -> RawHandle {
        match self {
            Socket::Tcp(h) => h.raw,
            Socket::Pipe(h) => h.raw,
            Socket::Udp(h) => h.raw,
        }
    }
}
impl HandleId for Socket {}

impl sealed::Raw for Stream {
    fn raw(&self) -> RawHandle {
        match self {
            Stream::Tcp(h) => h.raw,
            Stream::Pipe(h) => h.raw,
        }
    }
}
impl HandleId for Stream {}

impl<T: HandleId> sealed::Raw for &T {
    fn raw(&self) -> RawHandle {
        (**self).raw()
    }
}
impl<T: HandleId> HandleId for &T {}

/// Handle flags (libuv's `UV_HANDLE_*`).
pub(crate) mod flags {
    /// Started: counts toward `alive` while also REF.
    pub const ACTIVE: u8 = 1;
    /// Referenced (the default).
    pub const REF: u8 = 2;
    /// `close` was called; the close callback has not run yet.
    pub const CLOSING: u8 = 4;
    /// Created by the loop for itself; not reported by `walk`.
    pub const INTERNAL: u8 = 8;
    /// Timers: popped as due in the current pass and not yet called.
    pub const TIMER_READY: u8 = 16;
}

/// The error for a handle id whose handle has been closed, or that belongs to
/// another loop. Wrapped in an [`std::io::Error`] of kind `InvalidInput`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StaleHandle;

impl fmt::Display for StaleHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("handle is closed or does not belong to this loop")
    }
}

impl std::error::Error for StaleHandle {}

pub(crate) fn stale() -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidInput, StaleHandle)
}
