//! Timers (libuv's test-timer.c, test-timer-again.c, test-timer-from-check.c).

mod util;

use std::time::{Duration, Instant};

use util::*;
use uvcluster::uv::{Loop, RunMode};

#[test]
fn one_shot_and_repeat() {
    let mut lp = Loop::new().unwrap();
    let once = Counter::new();
    let rep = Counter::new();
    // libuv's timer_early_check: measured on the loop's own clock, a timer
    // never fires before now + timeout.
    lp.update_time();
    let start = lp.now();
    let t1 = lp.timer_init();
    let o = once.clone();
    lp.timer_start(
        t1,
        Duration::from_millis(20),
        Duration::ZERO,
        move |lp, t| {
            lp.update_time();
            assert!(lp.now() >= start + 20, "never early");
            o.hit();
            assert!(!lp.is_active(t));
            lp.close(t, |_| {}).unwrap();
        },
    )
    .unwrap();
    let t2 = lp.timer_init();
    let r = rep.clone();
    lp.timer_start(
        t2,
        Duration::from_millis(5),
        Duration::from_millis(5),
        move |lp, t| {
            r.hit();
            assert!(
                lp.is_active(t),
                "a repeating timer is re-armed before its callback"
            );
            if r.get() == 5 {
                lp.close(t, |_| {}).unwrap();
            }
        },
    )
    .unwrap();
    run_with_deadline(&mut lp, 5000);
    assert_eq!((once.get(), rep.get()), (1, 5));
    assert_loop_empty(&lp);
}

#[test]
fn start_twice_restarts() {
    let mut lp = Loop::new().unwrap();
    let t = lp.timer_init();
    let hits = Counter::new();
    lp.timer_start(t, Duration::from_millis(10), Duration::ZERO, |_, _| {
        panic!("replaced")
    })
    .unwrap();
    let h = hits.clone();
    lp.timer_start(t, Duration::from_millis(10), Duration::ZERO, move |_, _| {
        h.hit()
    })
    .unwrap();
    run_with_deadline(&mut lp, 5000);
    assert_eq!(hits.get(), 1);
    lp.close(t, |_| {}).unwrap();
    lp.run(RunMode::Default).unwrap();
    assert_loop_empty(&lp);
}

#[test]
fn equal_timeouts_fire_in_start_order_and_restart_moves_behind() {
    let mut lp = Loop::new().unwrap();
    let log = Log::new();
    let ts: Vec<_> = (0..3).map(|_| lp.timer_init()).collect();
    for (n, &t) in ["A", "B", "C"].iter().zip(&ts) {
        let l = log.clone();
        lp.timer_start(t, Duration::ZERO, Duration::ZERO, move |_, _| l.push(*n))
            .unwrap();
    }
    let l = log.clone();
    lp.timer_start(ts[0], Duration::ZERO, Duration::ZERO, move |_, _| {
        l.push("A")
    })
    .unwrap();
    lp.run(RunMode::Default).unwrap();
    assert_eq!(log.joined(), "B C A");
    for t in ts {
        lp.close(t, |_| {}).unwrap();
    }
    lp.run(RunMode::Default).unwrap();
    assert_loop_empty(&lp);
}

#[test]
fn zero_timeout_rearm_is_not_a_busy_loop() {
    // libuv >= 1.48: a 0 ms timer re-armed in its callback runs once per pass.
    let mut lp = Loop::new().unwrap();
    let t = lp.timer_init();
    let hits = Counter::new();
    fn rearm(lp: &mut Loop, t: uvcluster::uv::Handle<uvcluster::uv::Timer>, h: Counter) {
        lp.timer_start(t, Duration::ZERO, Duration::ZERO, move |lp, t| {
            h.hit();
            rearm(lp, t, h.clone());
        })
        .unwrap();
    }
    rearm(&mut lp, t, hits.clone());
    lp.run(RunMode::NoWait).unwrap();
    assert_eq!(hits.get(), 1);
    lp.run(RunMode::NoWait).unwrap();
    assert_eq!(hits.get(), 2);
    lp.close(t, |_| {}).unwrap();
    lp.run(RunMode::Default).unwrap();
    assert_loop_empty(&lp);
}

#[test]
fn no_double_call_in_once_and_nowait() {
    for mode in [RunMode::Once, RunMode::NoWait] {
        let mut lp = Loop::new().unwrap();
        let t = lp.timer_init();
        let hits = Counter::new();
        let h = hits.clone();
        lp.timer_start(t, Duration::ZERO, Duration::ZERO, move |_, _| h.hit())
            .unwrap();
        // Make sure the timer is due by the time the pass runs.
        let spin = Instant::now();
        while spin.elapsed().as_millis() < 2 {}
        lp.run(mode).unwrap();
        assert_eq!(hits.get(), 1, "{mode:?}");
        lp.close(t, |_| {}).unwrap();
        lp.run(RunMode::Default).unwrap();
        assert_loop_empty(&lp);
    }
}

#[test]
fn huge_timeout_and_repeat_saturate() {
    let mut lp = Loop::new().unwrap();
    let (a, b, c) = (lp.timer_init(), lp.timer_init(), lp.timer_init());
    lp.timer_start(
        a,
        Duration::from_millis(u64::MAX - 1),
        Duration::ZERO,
        |_, _| panic!("never"),
    )
    .unwrap();
    lp.timer_start(
        b,
        Duration::from_millis(u64::MAX),
        Duration::ZERO,
        |_, _| panic!("never"),
    )
    .unwrap();
    let hits = Counter::new();
    let h = hits.clone();
    lp.timer_start(
        c,
        Duration::ZERO,
        Duration::from_millis(u64::MAX),
        move |lp, t| {
            h.hit();
            assert_eq!(lp.timer_repeat(t).unwrap(), Duration::from_millis(u64::MAX));
            lp.close(t, |_| {}).unwrap();
        },
    )
    .unwrap();
    assert!(lp.timer_due_in(b).unwrap() > Duration::from_millis(u64::MAX / 2));
    lp.run(RunMode::Once).unwrap();
    lp.run(RunMode::NoWait).unwrap();
    assert_eq!(hits.get(), 1);
    lp.close(a, |_| {}).unwrap();
    lp.close(b, |_| {}).unwrap();
    lp.run(RunMode::Default).unwrap();
    assert_loop_empty(&lp);
}

#[test]
fn closing_timer_cannot_start() {
    let mut lp = Loop::new().unwrap();
    let t = lp.timer_init();
    lp.close(t, |_| {}).unwrap();
    assert!(lp.is_closing(t));
    assert!(
        lp.timer_start(t, Duration::from_millis(1), Duration::ZERO, |_, _| panic!(
            "dropped"
        ))
        .is_err()
    );
    lp.run(RunMode::Default).unwrap();
    assert_loop_empty(&lp);
}

#[test]
fn unref_timer_does_not_run() {
    let mut lp = Loop::new().unwrap();
    let t = lp.timer_init();
    lp.timer_start(t, Duration::ZERO, Duration::ZERO, |_, _| {
        panic!("an unref'd timer alone must not fire")
    })
    .unwrap();
    lp.unref_handle(t).unwrap();
    assert!(!lp.run(RunMode::Default).unwrap());
    lp.close(t, |_| {}).unwrap();
    lp.run(RunMode::Default).unwrap();
    assert_loop_empty(&lp);
}

#[test]
fn stop_from_earlier_callback_in_the_same_pass() {
    let mut lp = Loop::new().unwrap();
    let a = lp.timer_init();
    let b = lp.timer_init();
    let log = Log::new();
    let l = log.clone();
    lp.timer_start(a, Duration::ZERO, Duration::ZERO, move |lp, _| {
        l.push("a");
        lp.timer_stop(b).unwrap();
    })
    .unwrap();
    lp.timer_start(b, Duration::ZERO, Duration::ZERO, |_, _| {
        panic!("stopped before its turn")
    })
    .unwrap();
    lp.run(RunMode::Default).unwrap();
    assert_eq!(log.joined(), "a");
    lp.close(a, |_| {}).unwrap();
    lp.close(b, |_| {}).unwrap();
    lp.run(RunMode::Default).unwrap();
    assert_loop_empty(&lp);
}

#[test]
fn close_timer_from_its_own_callback_and_from_another() {
    let mut lp = Loop::new().unwrap();
    let a = lp.timer_init();
    let b = lp.timer_init();
    let closed = Counter::new();
    let k = closed.clone();
    lp.timer_start(
        a,
        Duration::from_millis(1),
        Duration::from_millis(1),
        move |lp, t| {
            let k2 = k.clone();
            lp.close(t, move |_| k2.hit()).unwrap();
            let k3 = k.clone();
            lp.close(b, move |_| k3.hit()).unwrap();
        },
    )
    .unwrap();
    lp.timer_start(
        b,
        Duration::from_millis(1),
        Duration::from_millis(1),
        |_, _| panic!("closed by a in the same pass"),
    )
    .unwrap();
    run_with_deadline(&mut lp, 5000);
    assert_eq!(closed.get(), 2);
    assert_loop_empty(&lp);
}

#[test]
fn timer_again_semantics() {
    let mut lp = Loop::new().unwrap();
    let t = lp.timer_init();
    assert!(lp.timer_again(t).is_err(), "never started: EINVAL");
    let hits = Counter::new();
    let h = hits.clone();
    lp.timer_start(
        t,
        Duration::from_millis(1000),
        Duration::ZERO,
        move |_, _| h.hit(),
    )
    .unwrap();
    // repeat 0: again leaves the timer alone.
    lp.timer_again(t).unwrap();
    assert!(lp.timer_due_in(t).unwrap() > Duration::from_millis(900));
    // With a repeat, again restarts it with the repeat as timeout.
    lp.timer_set_repeat(t, Duration::from_millis(5)).unwrap();
    lp.timer_again(t).unwrap();
    assert!(lp.timer_due_in(t).unwrap() <= Duration::from_millis(5));
    let h = hits.clone();
    let c = lp.check_init();
    lp.check_start(c, move |lp, c| {
        if h.get() >= 3 {
            lp.timer_set_repeat(t, Duration::ZERO).unwrap();
            lp.close(c, |_| {}).unwrap();
        }
    })
    .unwrap();
    run_with_deadline(&mut lp, 5000);
    assert!(hits.get() >= 3);
    assert!(!lp.is_active(t));
    lp.close(t, |_| {}).unwrap();
    lp.run(RunMode::Default).unwrap();
    assert_loop_empty(&lp);
}

#[test]
fn timer_from_check() {
    // A timer re-armed in check; prepare runs before the next timer.
    let mut lp = Loop::new().unwrap();
    let log = Log::new();
    let (p, c, t) = (lp.prepare_init(), lp.check_init(), lp.timer_init());
    let l = log.clone();
    lp.prepare_start(p, move |_, _| l.push("prepare")).unwrap();
    let l = log.clone();
    let rounds = Counter::new();
    lp.check_start(c, move |lp, c| {
        l.push("check");
        rounds.hit();
        if rounds.get() == 2 {
            lp.close(c, |_| {}).unwrap();
            lp.close(p, |_| {}).unwrap();
            return;
        }
        let l = l.clone();
        lp.timer_start(t, Duration::ZERO, Duration::ZERO, move |_, _| {
            l.push("timer")
        })
        .unwrap();
    })
    .unwrap();
    // NOWAIT: with only prepare and check active, poll would block forever.
    lp.run(RunMode::NoWait).unwrap();
    lp.run(RunMode::NoWait).unwrap();
    assert_eq!(log.joined(), "prepare check timer prepare check");
    lp.close(t, |_| {}).unwrap();
    lp.run(RunMode::Default).unwrap();
    assert_loop_empty(&lp);
}

#[test]
fn many_restarts_keep_the_heap_bounded() {
    // Idle-timeout style: restart one timer many times; lazily stopped
    // entries must not accumulate without bound.
    let mut lp = Loop::new().unwrap();
    let t = lp.timer_init();
    for _ in 0..100_000 {
        lp.timer_start(t, Duration::from_millis(1000), Duration::ZERO, |_, _| {})
            .unwrap();
    }
    assert!(lp.timer_due_in(t).unwrap() > Duration::from_millis(900));
    lp.close(t, |_| {}).unwrap();
    lp.run(RunMode::Default).unwrap();
    assert_loop_empty(&lp);
}
