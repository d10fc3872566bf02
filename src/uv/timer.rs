//! Timers (libuv's `src/timer.c`).
//!
//! Timers live in a binary min-heap keyed by `(due, start_seq)`. The sequence
//! number is taken on every start, so timers with equal deadlines fire in
//! the order they were started, and restarting a timer moves it behind the
//! others. Stopping is lazy: a stopped or restarted timer leaves its old heap
//! entry behind, and an entry counts only while its sequence number is the
//! timer's current one. The heap is compacted when stale entries outnumber
//! live ones, so restart-heavy uses (idle timeouts) stay bounded.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::io;
use std::time::Duration;

use super::callback::CallbackSlot;
use super::event_loop::{Data, Loop, closing_err, einval};
use super::handle::{Handle, RawHandle, Timer, flags};

type TimerCb = dyn FnMut(&mut Loop, Handle<Timer>);

pub(crate) struct TimerState {
    due: u64,
    repeat: u64,
    seq: u64,
    cb: CallbackSlot<TimerCb>,
}

#[derive(PartialEq, Eq, PartialOrd, Ord)]
struct Entry {
    due: u64,
    seq: u64,
    index: u32,
}

#[derive(Default)]
pub(crate) struct TimerQueue {
    heap: BinaryHeap<Reverse<Entry>>,
    next_seq: u64,
    active: usize,
    ready: Vec<RawHandle>,
}

fn timer_mut(lp: &mut Loop, raw: RawHandle) -> io::Result<&mut TimerState> {
    match &mut lp.slot_mut(raw)?.data {
        Data::Timer(t) => Ok(t),
        _ => unreachable!("a Handle<Timer> always names a timer slot"),
    }
}

impl Loop {
    /// Creates a timer (`uv_timer_init`). It does nothing until started.
    pub fn timer_init(&mut self) -> Handle<Timer> {
        Handle::from_raw(self.insert(Data::Timer(TimerState {
            due: 0,
            repeat: 0,
            seq: 0,
            cb: CallbackSlot::empty(),
        })))
    }

    /// Arms the timer (`uv_timer_start`): `cb` runs `timeout` after the
    /// loop's cached [`now`](Loop::now), then every `repeat` if `repeat` is
    /// not zero. Restarting an armed timer first stops it.
    ///
    /// The loop's clock counts whole milliseconds, as libuv's does: a
    /// duration with a fraction of a millisecond is rounded *up* (a timer
    /// never fires early; `Duration::from_micros(1)` is 1 ms), and
    /// deadlines saturate at `u64::MAX` ms.
    ///
    /// A repeating timer is re-armed just before its callback runs, at
    /// `now + repeat` where `now` is the time its timer pass started
    /// (libuv ≥ 1.48), so a slow callback does not make it drift further.
    ///
    /// # Errors
    ///
    /// A stale id or a closing timer; `cb` is then dropped.
    pub fn timer_start(
        &mut self,
        h: Handle<Timer>,
        timeout: Duration,
        repeat: Duration,
        cb: impl FnMut(&mut Loop, Handle<Timer>) + 'static,
    ) -> io::Result<()> {
        if self.slot(h.raw)?.flags & flags::CLOSING != 0 {
            return Err(closing_err());
        }
        self.timer_stop_raw(h.raw);
        timer_mut(self, h.raw)?.cb.set(Box::new(cb));
        self.timer_arm(h.raw, to_ms(timeout), to_ms(repeat));
        Ok(())
    }

    fn timer_arm(&mut self, raw: RawHandle, timeout: u64, repeat: u64) {
        // Sequence numbers start at 1: 0 marks a timer never started.
        self.timers.next_seq += 1;
        let seq = self.timers.next_seq;
        let due = self.now().saturating_add(timeout);
        let Ok(t) = timer_mut(self, raw) else { return };
        t.due = due;
        t.repeat = repeat;
        t.seq = seq;
        self.timers.heap.push(Reverse(Entry {
            due,
            seq,
            index: raw.index,
        }));
        self.timers.active += 1;
        self.activate(raw);
    }

    /// Disarms the timer (`uv_timer_stop`). Stopping a stopped timer is fine.
    /// A timer stopped by an earlier callback of the same timer pass does
    /// not fire in that pass.
    ///
    /// # Errors
    ///
    /// A stale id.
    pub fn timer_stop(&mut self, h: Handle<Timer>) -> io::Result<()> {
        self.slot(h.raw)?;
        self.timer_stop_raw(h.raw);
        Ok(())
    }

    /// Closing a timer: disarm it and drop its callback (also when the
    /// callback is running: it is not put back).
    pub(crate) fn timer_close_now(&mut self, raw: RawHandle) {
        self.timer_stop_raw(raw);
        if let Ok(t) = timer_mut(self, raw) {
            t.cb.clear();
        }
    }

    pub(crate) fn timer_stop_raw(&mut self, raw: RawHandle) {
        let Ok(s) = self.slot_mut(raw) else { return };
        s.flags &= !flags::TIMER_READY;
        if s.flags & flags::ACTIVE == 0 {
            return;
        }
        self.deactivate(raw);
        self.timers.active -= 1;
        // The heap entry stays behind; it no longer matches an active timer.
        let heap_len = self.timers.heap.len();
        if heap_len > 1024 && heap_len > 4 * self.timers.active {
            self.compact_timers();
        }
    }

    fn compact_timers(&mut self) {
        let slots = &self.slots;
        self.timers.heap.retain(|Reverse(e)| entry_live(slots, e));
    }

    /// Restarts a repeating timer with its repeat as the timeout
    /// (`uv_timer_again`); a timer whose repeat is 0 is left alone.
    ///
    /// # Errors
    ///
    /// A stale id, or a timer that was never started (`EINVAL` in libuv).
    pub fn timer_again(&mut self, h: Handle<Timer>) -> io::Result<()> {
        if self.slot(h.raw)?.flags & flags::CLOSING != 0 {
            return Err(closing_err());
        }
        let t = timer_mut(self, h.raw)?;
        // Not `cb.is_none()`: inside its own callback the callback is out
        // of its slot, and libuv allows `uv_timer_again` there.
        if t.seq == 0 {
            return Err(einval("timer_again on a timer that was never started"));
        }
        let repeat = t.repeat;
        if repeat != 0 {
            self.timer_stop_raw(h.raw);
            self.timer_arm(h.raw, repeat, repeat);
        }
        Ok(())
    }

    /// Sets the repeat interval, used from the next re-arm on
    /// (`uv_timer_set_repeat`). Rounded up to whole milliseconds, as in
    /// [`timer_start`](Self::timer_start).
    ///
    /// # Errors
    ///
    /// A stale id.
    pub fn timer_set_repeat(&mut self, h: Handle<Timer>, repeat: Duration) -> io::Result<()> {
        timer_mut(self, h.raw)?.repeat = to_ms(repeat);
        Ok(())
    }

    /// The repeat interval (`uv_timer_get_repeat`), in whole milliseconds.
    ///
    /// # Errors
    ///
    /// A stale id.
    pub fn timer_repeat(&mut self, h: Handle<Timer>) -> io::Result<Duration> {
        Ok(Duration::from_millis(timer_mut(self, h.raw)?.repeat))
    }

    /// The time until the timer is due by the loop's cached clock, zero if
    /// it is due or not armed (`uv_timer_get_due_in`), in whole
    /// milliseconds.
    ///
    /// # Errors
    ///
    /// A stale id.
    pub fn timer_due_in(&mut self, h: Handle<Timer>) -> io::Result<Duration> {
        let now = self.now();
        let active = self.is_active(h);
        let t = timer_mut(self, h.raw)?;
        Ok(Duration::from_millis(if active {
            t.due.saturating_sub(now)
        } else {
            0
        }))
    }

    /// The deadline of the earliest armed timer, dropping stale heap entries
    /// found on top.
    pub(crate) fn next_timer_due(&mut self) -> Option<u64> {
        loop {
            let Reverse(top) = self.timers.heap.peek()?;
            if entry_live(&self.slots, top) {
                return Some(top.due);
            }
            self.timers.heap.pop();
        }
    }

    /// Runs due timers (`uv__run_timers`, libuv ≥ 1.48): first pop every due
    /// timer into a ready list and stop it, then re-arm and call each one
    /// still ready. A timer re-armed for 0 ms inside its callback therefore
    /// runs in the next iteration, never in the same pass.
    pub(crate) fn run_timers(&mut self) {
        let now = self.now();
        let mut ready = std::mem::take(&mut self.timers.ready);
        while let Some(Reverse(top)) = self.timers.heap.peek() {
            if top.due > now {
                break;
            }
            let Reverse(e) = self.timers.heap.pop().expect("peeked");
            if !entry_live(&self.slots, &e) {
                continue;
            }
            let s = &mut self.slots[e.index as usize];
            let raw = RawHandle {
                index: e.index,
                gen_: s.gen_,
            };
            s.flags |= flags::TIMER_READY;
            // Stop without clearing READY: the timer leaves the heap but
            // stays in this pass's ready list.
            self.deactivate(raw);
            self.timers.active -= 1;
            ready.push(raw);
        }
        for &raw in &ready {
            let Ok(s) = self.slot_mut(raw) else { continue };
            if s.flags & flags::TIMER_READY == 0 {
                continue;
            }
            s.flags &= !flags::TIMER_READY;
            let Data::Timer(t) = &mut s.data else {
                unreachable!()
            };
            let repeat = t.repeat;
            let cb = t.cb.take();
            if repeat != 0 {
                self.timer_arm(raw, repeat, repeat);
            }
            // The callback slot's rule: put back unless the timer was
            // closed or a timer_start inside the callback replaced it.
            if let Some(mut f) = cb {
                f(self, Handle::from_raw(raw));
                if let Ok(t) = timer_mut(self, raw) {
                    t.cb.put_back(f);
                }
            }
        }
        ready.clear();
        self.timers.ready = ready;
    }
}

/// A timer argument in the loop's unit, whole milliseconds: rounded up, so
/// that a timer never fires before the duration it was given has passed,
/// and saturated at `u64::MAX`.
pub(crate) fn to_ms(d: Duration) -> u64 {
    let ms = d.as_millis() + u128::from(!d.subsec_nanos().is_multiple_of(1_000_000));
    u64::try_from(ms).unwrap_or(u64::MAX)
}

fn entry_live(slots: &slab::Slab<super::event_loop::Slot>, e: &Entry) -> bool {
    match slots.get(e.index as usize) {
        Some(s) => match &s.data {
            Data::Timer(t) => t.seq == e.seq && s.flags & flags::ACTIVE != 0,
            _ => false,
        },
        None => false,
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::to_ms;

    #[test]
    fn durations_round_up_to_whole_milliseconds() {
        assert_eq!(to_ms(Duration::ZERO), 0);
        assert_eq!(to_ms(Duration::from_nanos(1)), 1);
        assert_eq!(to_ms(Duration::from_micros(999)), 1);
        assert_eq!(to_ms(Duration::from_millis(1)), 1);
        assert_eq!(to_ms(Duration::from_micros(1001)), 2);
        assert_eq!(to_ms(Duration::from_secs(5)), 5000);
        assert_eq!(to_ms(Duration::MAX), u64::MAX);
    }
}
