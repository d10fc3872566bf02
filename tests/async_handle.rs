//! Async handles: wake-ups from other threads, coalesced (libuv's
//! `test/test-async.c`, `test-async-null-cb.c`).
mod util;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use util::*;
use uvcluster::uv::{Loop, RunMode, StaleHandle};

/// test-async.c: a thread, started by the first prepare callback, sends
/// until the async callback has run 3 times; the third callback closes the
/// async handle (from its own callback) and the prepare watcher.
#[test]
fn async_thread_sends_until_three_callbacks_then_close_from_callback() {
    let mut lp = Loop::new().unwrap();
    let called = Arc::new(AtomicUsize::new(0));
    let prepare_called = Counter::new();
    let closed = Counter::new();
    let prepare = lp.prepare_init();

    let (c, cl) = (called.clone(), closed.clone());
    let a = lp
        .async_init(move |lp, h| {
            let n = c.fetch_add(1, Ordering::SeqCst) + 1;
            if n == 3 {
                let cl2 = cl.clone();
                lp.close(h, move |_| cl2.hit()).unwrap();
                let cl3 = cl.clone();
                lp.close(prepare, move |_| cl3.hit()).unwrap();
            }
        })
        .unwrap();
    assert!(lp.is_active(a), "an async handle is active from init");
    let tx = lp.async_sender(a).unwrap();

    let thread = Rc::new(std::cell::RefCell::new(None));
    let (th, p, c) = (thread.clone(), prepare_called.clone(), called.clone());
    lp.prepare_start(prepare, move |_, _| {
        p.hit();
        if p.get() > 1 {
            return;
        }
        let (tx, c) = (tx.clone(), c.clone());
        *th.borrow_mut() = Some(std::thread::spawn(move || {
            // Bounded: the loop's deadline below fails the test first.
            let until = Instant::now() + Duration::from_secs(10);
            let mut sends = 0u64;
            while c.load(Ordering::SeqCst) < 3 && Instant::now() < until {
                // After the third callback closed the handle, a late send is
                // refused, never harmful.
                let _ = tx.send();
                sends += 1;
                std::thread::yield_now();
            }
            sends
        }));
    })
    .unwrap();

    run_with_deadline(&mut lp, 5000);
    let sends = thread.borrow_mut().take().unwrap().join().unwrap();
    assert!(prepare_called.get() > 0);
    assert_eq!(called.load(Ordering::SeqCst), 3);
    assert_eq!(closed.get(), 2);
    assert!(sends >= 3, "the thread sent {sends} times");
    assert_loop_empty(&lp);
}

use std::rc::Rc;

/// test-async-null-cb.c: an async handle whose callback does nothing
/// (libuv's NULL callback), sent to from a thread; a check watcher closes
/// both in the first iteration; the loop ends.
#[test]
fn async_null_cb() {
    let mut lp = Loop::new().unwrap();
    let a = lp.async_init(|_, _| {}).unwrap();
    let tx = lp.async_sender(a).unwrap();
    let check = lp.check_init();
    let called = Counter::new();
    let c = called.clone();
    lp.check_start(check, move |lp, check| {
        assert_eq!(c.get(), 0);
        lp.close(a, |_| {}).unwrap();
        lp.close(check, |_| {}).unwrap();
        c.hit();
    })
    .unwrap();
    let t = std::thread::spawn(move || {
        let _ = tx.send();
    });
    run_with_deadline(&mut lp, 5000);
    t.join().unwrap();
    assert_eq!(called.get(), 1);
    assert_loop_empty(&lp);
}

/// Many sends before the loop runs make one callback, not one per send,
/// from another thread and from the loop's own.
#[test]
fn async_sends_before_the_loop_runs_coalesce_into_one_callback() {
    let mut lp = Loop::new().unwrap();
    let called = Counter::new();
    let c = called.clone();
    let a = lp.async_init(move |_, _| c.hit()).unwrap();
    let senders: Vec<_> = (0..4).map(|_| lp.async_sender(a).unwrap()).collect();
    let threads: Vec<_> = senders
        .into_iter()
        .map(|tx| {
            std::thread::spawn(move || {
                for _ in 0..1000 {
                    tx.send().unwrap();
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    for _ in 0..100 {
        lp.async_send(a).unwrap();
    }
    run_until(&mut lp, 5000, |_| called.get() > 0);
    // Nothing more is pending: further iterations call nothing.
    lp.run(RunMode::NoWait).unwrap();
    lp.run(RunMode::NoWait).unwrap();
    assert_eq!(called.get(), 1, "4100 sends, one callback");

    // A send after the callback runs it again.
    lp.async_send(a).unwrap();
    run_until(&mut lp, 5000, |_| called.get() == 2);
    lp.close(a, |_| {}).unwrap();
    lp.run(RunMode::Default).unwrap();
    assert_loop_empty(&lp);
}

/// A thread wakes a loop that is blocked in poll with nothing else to do
/// (no timer, no idle watcher), each time it sends.
#[test]
fn async_send_wakes_a_loop_blocked_in_poll() {
    let mut lp = Loop::new().unwrap();
    let called = Arc::new(AtomicUsize::new(0));
    let c = called.clone();
    let a = lp
        .async_init(move |lp, h| {
            if c.fetch_add(1, Ordering::SeqCst) + 1 == 5 {
                lp.close(h, |_| {}).unwrap();
            }
        })
        .unwrap();
    let tx = lp.async_sender(a).unwrap();
    let c = called.clone();
    let t = std::thread::spawn(move || {
        let until = Instant::now() + Duration::from_secs(10);
        // Send once per callback seen, so every send finds the loop asleep
        // or about to sleep.
        let mut seen = usize::MAX;
        while Instant::now() < until {
            let n = c.load(Ordering::SeqCst);
            if n >= 5 {
                break;
            }
            if n != seen {
                seen = n;
                tx.send().unwrap();
            }
            std::thread::yield_now();
        }
    });
    // Nothing but the async handle: poll would block without a timeout.
    // The deadline's watchdog timer bounds it to 5 s, and only a send can
    // end the wait sooner.
    assert_eq!(lp.backend_timeout(), None);
    run_with_deadline(&mut lp, 5000);
    t.join().unwrap();
    assert_eq!(called.load(Ordering::SeqCst), 5);
    assert_loop_empty(&lp);
}

/// A send after close is refused with `StaleHandle` and runs nothing; so
/// is a send after the loop was dropped.
#[test]
fn async_send_after_close_or_after_the_loop_is_dropped_is_refused() {
    let mut lp = Loop::new().unwrap();
    let called = Counter::new();
    let c = called.clone();
    let a = lp.async_init(move |_, _| c.hit()).unwrap();
    let tx = lp.async_sender(a).unwrap();
    lp.close(a, |_| {}).unwrap();
    assert!(tx.is_closed());
    let e = tx.send().unwrap_err();
    assert!(e.get_ref().is_some_and(|e| e.is::<StaleHandle>()), "{e}");
    assert!(lp.async_sender(a).is_err(), "closing: no new sender");
    lp.run(RunMode::Default).unwrap();
    assert!(lp.async_send(a).is_err(), "stale id");
    assert_eq!(called.get(), 0);
    assert_loop_empty(&lp);

    let b = lp.async_init(|_, _| {}).unwrap();
    let tx = lp.async_sender(b).unwrap();
    drop(lp);
    assert!(tx.is_closed());
    assert!(tx.send().is_err());
}

/// Ref and unref (test-ref.c's async cases): an unreferenced async handle
/// does not keep the loop alive, but its callback still runs while the
/// loop runs for something else.
#[test]
fn async_unref_lets_the_loop_end_and_ref_keeps_it() {
    let mut lp = Loop::new().unwrap();
    let called = Counter::new();
    let c = called.clone();
    let a = lp.async_init(move |_, _| c.hit()).unwrap();
    assert!(lp.alive());
    lp.unref_handle(a).unwrap();
    assert!(!lp.alive());
    assert!(!lp.run(RunMode::Default).unwrap(), "returns at once");

    // Still delivered while a timer keeps the loop running.
    lp.async_send(a).unwrap();
    let t = lp.timer_init();
    lp.timer_start(t, Duration::from_millis(1), Duration::ZERO, |_, _| {})
        .unwrap();
    run_until(&mut lp, 5000, |_| called.get() == 1);
    lp.close(t, |_| {}).unwrap();

    lp.ref_handle(a).unwrap();
    assert!(lp.alive());
    lp.close(a, |_| {}).unwrap();
    lp.run(RunMode::Default).unwrap();
    assert_loop_empty(&lp);
}
