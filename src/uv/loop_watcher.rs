//! Idle, prepare and check watchers from one implementation (libuv's
//! `src/unix/loop-watcher.c`).
//!
//! Each kind runs once per iteration in its phase: idle and prepare before
//! poll, check after it. An active idle watcher makes poll not block. Within
//! a phase the most recently started watcher runs first (libuv inserts at
//! the head of the list), and a watcher started during its own phase first
//! runs in the next iteration.

use std::io;

use super::callback::CallbackSlot;
use super::event_loop::{Data, Loop, closing_err};
use super::handle::{Check, Handle, HandleType, Idle, Prepare, RawHandle, flags};

pub(crate) const IDLE: usize = 0;
pub(crate) const PREPARE: usize = 1;
pub(crate) const CHECK: usize = 2;

type WatcherFn = dyn FnMut(&mut Loop, RawHandle);
pub(crate) type WatcherCb = Box<WatcherFn>;

pub(crate) struct WatcherState {
    cb: CallbackSlot<WatcherFn>,
    /// Which start this is; a snapshot entry runs only if it still matches,
    /// so a watcher stopped and restarted inside the phase waits a turn.
    stamp: u64,
}

/// The started watchers of one phase, oldest first.
#[derive(Default)]
pub(crate) struct WatcherList {
    list: Vec<(RawHandle, u64)>,
    scratch: Vec<(RawHandle, u64)>,
    next_stamp: u64,
}

impl WatcherList {
    pub(crate) fn is_empty(&self) -> bool {
        self.list.is_empty()
    }
}

fn phase_of(data: &Data) -> usize {
    match data {
        Data::Idle(_) => IDLE,
        Data::Prepare(_) => PREPARE,
        Data::Check(_) => CHECK,
        _ => unreachable!("not a loop watcher"),
    }
}

fn state_mut(data: &mut Data) -> &mut WatcherState {
    match data {
        Data::Idle(w) | Data::Prepare(w) | Data::Check(w) => w,
        _ => unreachable!("not a loop watcher"),
    }
}

impl Loop {
    fn watcher_init(&mut self, phase: usize) -> RawHandle {
        let w = WatcherState {
            cb: CallbackSlot::empty(),
            stamp: 0,
        };
        self.insert(match phase {
            IDLE => Data::Idle(w),
            PREPARE => Data::Prepare(w),
            _ => Data::Check(w),
        })
    }

    fn watcher_start(&mut self, raw: RawHandle, cb: WatcherCb) -> io::Result<()> {
        let s = self.slot(raw)?;
        if s.flags & flags::CLOSING != 0 {
            return Err(closing_err());
        }
        if s.flags & flags::ACTIVE != 0 {
            return Ok(());
        }
        let phase = phase_of(&s.data);
        let stamp = self.watchers[phase].next_stamp + 1;
        let w = state_mut(&mut self.slot_mut(raw)?.data);
        w.cb.set(cb);
        w.stamp = stamp;
        let list = &mut self.watchers[phase];
        list.next_stamp = stamp;
        list.list.push((raw, stamp));
        self.activate(raw);
        Ok(())
    }

    /// Closing a watcher: stop it and drop its callback.
    pub(crate) fn watcher_close_now(&mut self, raw: RawHandle) {
        self.watcher_stop_raw(raw);
        if let Ok(s) = self.slot_mut(raw) {
            state_mut(&mut s.data).cb.clear();
        }
    }

    pub(crate) fn watcher_stop_raw(&mut self, raw: RawHandle) {
        let Ok(s) = self.slot(raw) else { return };
        if s.flags & flags::ACTIVE == 0 {
            return;
        }
        let list = &mut self.watchers[phase_of(&s.data)].list;
        if let Some(i) = list.iter().position(|&(r, _)| r == raw) {
            list.remove(i);
        }
        self.deactivate(raw);
    }

    pub(crate) fn run_watchers(&mut self, phase: usize) {
        if self.watchers[phase].list.is_empty() {
            return;
        }
        let mut snap = std::mem::take(&mut self.watchers[phase].scratch);
        snap.extend(self.watchers[phase].list.iter().rev());
        for &(raw, stamp) in &snap {
            let Ok(s) = self.slot_mut(raw) else { continue };
            if s.flags & flags::ACTIVE == 0 {
                continue;
            }
            let w = state_mut(&mut s.data);
            if w.stamp != stamp {
                continue;
            }
            // The callback slot's rule: put back unless the watcher was
            // closed or restarted with a new callback inside it.
            if let Some(mut f) = w.cb.take() {
                f(self, raw);
                if let Ok(s) = self.slot_mut(raw) {
                    state_mut(&mut s.data).cb.put_back(f);
                }
            }
        }
        snap.clear();
        self.watchers[phase].scratch = snap;
    }
}

macro_rules! watcher_api {
    ($kind:ident, $phase:expr, $init:ident, $start:ident, $stop:ident, $uv:literal, $when:literal) => {
        impl Loop {
            #[doc = concat!("Creates a ", stringify!($kind), " watcher (`uv_", $uv, "_init`).")]
            pub fn $init(&mut self) -> Handle<$kind> {
                Handle::from_raw(self.watcher_init($phase))
            }

            #[doc = concat!("Starts the watcher: `cb` runs once per loop iteration, ", $when,
                " (`uv_", $uv, "_start`). Starting an active watcher does nothing.")]
            ///
            /// # Errors
            ///
            /// A stale id or a closing handle; `cb` is then dropped.
            pub fn $start(
                &mut self,
                h: Handle<$kind>,
                mut cb: impl FnMut(&mut Loop, Handle<$kind>) + 'static,
            ) -> io::Result<()> {
                self.watcher_start(h.raw, Box::new(move |lp, raw| cb(lp, Handle::from_raw(raw))))
            }

            #[doc = concat!("Stops the watcher (`uv_", $uv, "_stop`). Stopping a stopped watcher is fine.")]
            ///
            /// # Errors
            ///
            /// A stale id.
            pub fn $stop(&mut self, h: Handle<$kind>) -> io::Result<()> {
                self.slot(h.raw)?;
                self.watcher_stop_raw(h.raw);
                Ok(())
            }
        }
        const _: &str = <$kind as HandleType>::NAME;
    };
}

watcher_api!(
    Idle,
    IDLE,
    idle_init,
    idle_start,
    idle_stop,
    "idle",
    "before prepare, and poll does not block while it is active"
);
watcher_api!(
    Prepare,
    PREPARE,
    prepare_init,
    prepare_start,
    prepare_stop,
    "prepare",
    "just before the loop polls for I/O"
);
watcher_api!(
    Check,
    CHECK,
    check_init,
    check_start,
    check_stop,
    "check",
    "just after the loop polled for I/O"
);
