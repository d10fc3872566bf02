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
pub(crate) struct RawHandle {
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

mod sealed {
    pub trait Sealed {}
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
        impl sealed::Sealed for $name {}
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
}

/// Any handle, with its kind; what [`Loop::walk`](crate::uv::Loop::walk) reports.
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
}

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
