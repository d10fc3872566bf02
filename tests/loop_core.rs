//! The loop core: run modes, stop, alive, ref/unref, close ordering, the
//! idle/prepare/check rules, and the phase order (libuv's test-loop-*.c,
//! test-ref.c, test-close-order.c, test-idle.c, test-active.c,
//! test-walk-handles.c, test-callback-stack.c).

mod util;

use std::io;
use std::time::Duration;

use util::*;
use uvcluster::uv::{AnyHandle, Loop, RunMode, StaleHandle};

#[test]
fn loop_alive() {
    let mut lp = Loop::new().unwrap();
    assert!(!lp.alive());
    let t = lp.timer_init();
    assert!(
        !lp.alive(),
        "an unstarted timer does not make the loop alive"
    );
    let hits = Counter::new();
    let h = hits.clone();
    lp.timer_start(t, Duration::from_millis(1), Duration::ZERO, move |_, _| {
        h.hit()
    })
    .unwrap();
    assert!(lp.alive());
    assert!(!lp.run(RunMode::Default).unwrap());
    assert_eq!(hits.get(), 1);
    assert!(!lp.alive());
    lp.close(t, |_| {}).unwrap();
    assert!(lp.alive(), "a pending close keeps the loop alive");
    lp.run(RunMode::Default).unwrap();
    assert_loop_empty(&lp);
}

#[test]
fn loop_stop() {
    let mut lp = Loop::new().unwrap();
    let t = lp.timer_init();
    let ticks = Counter::new();
    let k = ticks.clone();
    lp.timer_start(
        t,
        Duration::from_millis(1),
        Duration::from_millis(1),
        move |lp, _| {
            k.hit();
            if k.get() == 3 {
                lp.stop();
            }
        },
    )
    .unwrap();
    // stop ends DEFAULT after the current iteration, while still alive.
    assert!(lp.run(RunMode::Default).unwrap());
    assert_eq!(ticks.get(), 3);
    // The flag is cleared: running again continues.
    let k = ticks.clone();
    lp.timer_start(t, Duration::from_millis(1), Duration::ZERO, move |_, _| {
        k.hit()
    })
    .unwrap();
    assert!(!lp.run(RunMode::Default).unwrap());
    assert_eq!(ticks.get(), 4);
    lp.close(t, |_| {}).unwrap();
    lp.run(RunMode::Default).unwrap();
    assert_loop_empty(&lp);
}

#[test]
fn loop_stop_before_run() {
    let mut lp = Loop::new().unwrap();
    let t = lp.timer_init();
    let hits = Counter::new();
    let h = hits.clone();
    lp.timer_start(t, Duration::ZERO, Duration::ZERO, move |_, _| h.hit())
        .unwrap();
    lp.stop();
    assert!(lp.run(RunMode::Default).unwrap());
    assert_eq!(hits.get(), 0, "a stop before run runs nothing");
    lp.close(t, |_| {}).unwrap();
    lp.run(RunMode::Default).unwrap();
    assert_loop_empty(&lp);
}

#[test]
fn run_once_drives_idle_ticks() {
    let mut lp = Loop::new().unwrap();
    let idle = lp.idle_init();
    let ticks = Counter::new();
    let k = ticks.clone();
    lp.idle_start(idle, move |lp, h| {
        k.hit();
        if k.get() == 64 {
            lp.idle_stop(h).unwrap();
        }
    })
    .unwrap();
    let mut runs = 0;
    while lp.run(RunMode::Once).unwrap() {
        runs += 1;
    }
    assert_eq!(ticks.get(), 64);
    assert_eq!(runs, 63);
    lp.close(idle, |_| {}).unwrap();
    lp.run(RunMode::Default).unwrap();
    assert_loop_empty(&lp);
}

#[test]
fn run_nowait_does_not_block() {
    let mut lp = Loop::new().unwrap();
    let t = lp.timer_init();
    let hits = Counter::new();
    let h = hits.clone();
    lp.timer_start(
        t,
        Duration::from_millis(100),
        Duration::ZERO,
        move |_, _| h.hit(),
    )
    .unwrap();
    assert!(lp.run(RunMode::NoWait).unwrap());
    assert_eq!(hits.get(), 0);
    lp.close(t, |_| {}).unwrap();
    lp.run(RunMode::Default).unwrap();
    assert_loop_empty(&lp);
}

#[test]
fn update_time_and_backend_timeout() {
    let mut lp = Loop::new().unwrap();
    // No timers and nothing active: poll would not block.
    assert_eq!(lp.backend_timeout(), Some(Duration::ZERO));
    let t = lp.timer_init();
    lp.timer_start(t, Duration::from_millis(1000), Duration::ZERO, |_, _| {})
        .unwrap();
    let due = lp.backend_timeout().unwrap();
    assert!(
        (Duration::from_millis(999)..=Duration::from_millis(1000)).contains(&due),
        "{due:?}"
    );
    let start = lp.now();
    let deadline = std::time::Instant::now() + std::time::Duration::from_millis(3);
    while std::time::Instant::now() < deadline {
        lp.run(RunMode::NoWait).unwrap();
    }
    // One run after the deadline: a thread preempted between the runs and
    // the last check (a loaded machine) may otherwise never have run once
    // the 3 ms were past, and the cached time would be the start's.
    lp.run(RunMode::NoWait).unwrap();
    assert!(lp.now() >= start + 2, "now() advances across NOWAIT runs");
    lp.close(t, |_| {}).unwrap();
    lp.run(RunMode::Default).unwrap();
    assert_loop_empty(&lp);
}

#[test]
fn only_check_handle_blocks_forever() {
    // Prepare and check do not shorten the poll timeout (libuv 1.2).
    let mut lp = Loop::new().unwrap();
    let c = lp.check_init();
    lp.check_start(c, |_, _| {}).unwrap();
    assert_eq!(lp.backend_timeout(), None);
    let i = lp.idle_init();
    lp.idle_start(i, |_, _| {}).unwrap();
    assert_eq!(lp.backend_timeout(), Some(Duration::ZERO));
    lp.close(c, |_| {}).unwrap();
    lp.close(i, |_| {}).unwrap();
    lp.run(RunMode::Default).unwrap();
    assert_loop_empty(&lp);
}

#[test]
fn phase_order_default_and_once() {
    for (mode, expect) in [
        (RunMode::Default, "timer idle prepare check close"),
        (RunMode::Once, "idle prepare check close timer"),
    ] {
        let mut lp = Loop::new().unwrap();
        let log = Log::new();
        let t = lp.timer_init();
        let (i, p, c) = (lp.idle_init(), lp.prepare_init(), lp.check_init());
        let l = log.clone();
        lp.timer_start(t, Duration::ZERO, Duration::ZERO, move |lp, t| {
            l.push("timer");
            lp.close(t, |_| {}).unwrap();
        })
        .unwrap();
        let l = log.clone();
        lp.idle_start(i, move |lp, i| {
            l.push("idle");
            lp.close(i, |_| {}).unwrap();
        })
        .unwrap();
        let l = log.clone();
        lp.prepare_start(p, move |lp, p| {
            l.push("prepare");
            lp.close(p, |_| {}).unwrap();
        })
        .unwrap();
        let l = log.clone();
        lp.check_start(c, move |lp, c| {
            l.push("check");
            let l = l.clone();
            lp.close(c, move |_| l.push("close")).unwrap();
        })
        .unwrap();
        lp.run(mode).unwrap();
        assert_eq!(log.joined(), expect, "{mode:?}");
        lp.run(RunMode::Default).unwrap();
        assert_loop_empty(&lp);
    }
}

#[test]
fn close_callbacks_run_in_reverse_order_after_check() {
    let mut lp = Loop::new().unwrap();
    let log = Log::new();
    let hs: Vec<_> = (0..3).map(|_| lp.timer_init()).collect();
    let c = lp.check_init();
    let l = log.clone();
    lp.check_start(c, move |lp, c| {
        l.push("check");
        for (name, &h) in ["A", "B", "C"].iter().zip(&hs) {
            let l = l.clone();
            lp.close(h, move |_| l.push(*name)).unwrap();
        }
        lp.close(c, |_| {}).unwrap();
    })
    .unwrap();
    // The close issued in check runs in the same iteration. (ONCE would
    // block in poll: a lone check handle does not shorten the timeout.)
    assert!(!lp.run(RunMode::NoWait).unwrap());
    assert_eq!(log.joined(), "check C B A");
    assert_loop_empty(&lp);
}

#[test]
fn close_from_close_callback_finishes_next_iteration() {
    let mut lp = Loop::new().unwrap();
    let log = Log::new();
    let a = lp.timer_init();
    let b = lp.timer_init();
    let l = log.clone();
    lp.close(a, move |lp| {
        l.push("a");
        let l = l.clone();
        lp.close(b, move |_| l.push("b")).unwrap();
    })
    .unwrap();
    lp.run(RunMode::NoWait).unwrap();
    assert_eq!(log.joined(), "a");
    lp.run(RunMode::NoWait).unwrap();
    assert_eq!(log.joined(), "a b");
    assert_loop_empty(&lp);
}

#[test]
fn watcher_rules() {
    // Newest first; a watcher started in its phase runs next iteration;
    // each runs once per iteration; self-stop and self-close work.
    let mut lp = Loop::new().unwrap();
    let log = Log::new();
    let ids: Vec<_> = (0..3).map(|_| lp.idle_init()).collect();
    for (n, &h) in ["A", "B", "C"].iter().zip(&ids) {
        let l = log.clone();
        lp.idle_start(h, move |_, _| l.push(*n)).unwrap();
    }
    lp.run(RunMode::NoWait).unwrap();
    assert_eq!(log.take().join(" "), "C B A");

    let late = lp.idle_init();
    let l = log.clone();
    let started = Counter::new();
    let s = started.clone();
    let first = ids[0];
    lp.idle_stop(first).unwrap();
    lp.idle_start(first, move |lp, _| {
        l.push("A");
        if s.get() == 0 {
            s.hit();
            let l = l.clone();
            lp.idle_start(late, move |lp, h| {
                l.push("late");
                lp.close(h, |_| {}).unwrap();
            })
            .unwrap();
        }
    })
    .unwrap();
    lp.run(RunMode::NoWait).unwrap();
    assert_eq!(log.take().join(" "), "A C B", "late started in phase waits");
    lp.run(RunMode::NoWait).unwrap();
    assert_eq!(log.take().join(" "), "late A C B");
    for h in ids {
        lp.close(h, |_| {}).unwrap();
    }
    lp.run(RunMode::Default).unwrap();
    assert_loop_empty(&lp);
}

#[test]
fn stopped_and_restarted_in_phase_waits_a_turn() {
    let mut lp = Loop::new().unwrap();
    let log = Log::new();
    let a = lp.check_init();
    let b = lp.check_init();
    let l = log.clone();
    lp.check_start(a, move |_, _| l.push("a")).unwrap();
    let l = log.clone();
    lp.check_start(b, move |lp, _| {
        l.push("b");
        // b runs first (newest); restarting a moves it to the head for next time.
        lp.check_stop(a).unwrap();
        let l = l.clone();
        lp.check_start(a, move |_, _| l.push("a2")).unwrap();
    })
    .unwrap();
    lp.run(RunMode::NoWait).unwrap();
    assert_eq!(log.take().join(" "), "b");
    lp.close(a, |_| {}).unwrap();
    lp.close(b, |_| {}).unwrap();
    lp.run(RunMode::Default).unwrap();
    assert_loop_empty(&lp);
}

#[test]
fn idle_does_not_starve_timers() {
    let mut lp = Loop::new().unwrap();
    let idle = lp.idle_init();
    let t = lp.timer_init();
    let spins = Counter::new();
    let s = spins.clone();
    lp.idle_start(idle, move |_, _| s.hit()).unwrap();
    lp.timer_start(
        t,
        Duration::from_millis(20),
        Duration::ZERO,
        move |lp, t| {
            lp.close(idle, |_| {}).unwrap();
            lp.close(t, |_| {}).unwrap();
        },
    )
    .unwrap();
    run_with_deadline(&mut lp, 5000);
    assert!(spins.get() > 1);
    assert_loop_empty(&lp);
}

#[test]
fn once_with_self_stopping_idle_still_runs_check() {
    let mut lp = Loop::new().unwrap();
    let idle = lp.idle_init();
    let check = lp.check_init();
    let checks = Counter::new();
    lp.idle_start(idle, |lp, h| lp.idle_stop(h).unwrap())
        .unwrap();
    let c = checks.clone();
    lp.check_start(check, move |_, _| c.hit()).unwrap();
    lp.run(RunMode::Once).unwrap();
    assert_eq!(checks.get(), 1);
    lp.close(idle, |_| {}).unwrap();
    lp.close(check, |_| {}).unwrap();
    lp.run(RunMode::Default).unwrap();
    assert_loop_empty(&lp);
}

#[test]
fn active_and_closing_flags() {
    let mut lp = Loop::new().unwrap();
    let t = lp.timer_init();
    assert!(!lp.is_active(t) && !lp.is_closing(t));
    lp.timer_start(t, Duration::from_millis(10), Duration::ZERO, |_, _| {})
        .unwrap();
    assert!(lp.is_active(t));
    lp.timer_stop(t).unwrap();
    assert!(!lp.is_active(t));
    lp.timer_start(t, Duration::from_millis(10), Duration::ZERO, |_, _| {})
        .unwrap();
    lp.close(t, |_| {}).unwrap();
    assert!(!lp.is_active(t) && lp.is_closing(t));
    lp.run(RunMode::Default).unwrap();
    assert_loop_empty(&lp);
}

#[test]
fn unref_handles_do_not_keep_the_loop_alive() {
    let mut lp = Loop::new().unwrap();
    let hits = Counter::new();
    let (i, p, c, t) = (
        lp.idle_init(),
        lp.prepare_init(),
        lp.check_init(),
        lp.timer_init(),
    );
    let h = hits.clone();
    lp.idle_start(i, move |_, _| h.hit()).unwrap();
    let h = hits.clone();
    lp.prepare_start(p, move |_, _| h.hit()).unwrap();
    let h = hits.clone();
    lp.check_start(c, move |_, _| h.hit()).unwrap();
    let h = hits.clone();
    lp.timer_start(t, Duration::ZERO, Duration::ZERO, move |_, _| h.hit())
        .unwrap();
    for r in [
        lp.unref_handle(i),
        lp.unref_handle(p),
        lp.unref_handle(c),
        lp.unref_handle(t),
    ] {
        r.unwrap();
    }
    assert!(!lp.has_ref(t));
    assert!(!lp.alive());
    assert!(!lp.run(RunMode::Default).unwrap());
    assert_eq!(
        hits.get(),
        0,
        "unreferenced handles do not run on their own"
    );
    // ref/unref are idempotent flags, not counters.
    lp.ref_handle(t).unwrap();
    lp.ref_handle(t).unwrap();
    lp.unref_handle(t).unwrap();
    assert!(!lp.alive());
    // Close on an unreferenced handle still calls the close callback.
    let closed = Counter::new();
    for h in [
        AnyHandle::Idle(i),
        AnyHandle::Prepare(p),
        AnyHandle::Check(c),
        AnyHandle::Timer(t),
    ] {
        let k = closed.clone();
        let cb = move |_: &mut Loop| k.hit();
        match h {
            AnyHandle::Idle(h) => lp.close(h, cb),
            AnyHandle::Prepare(h) => lp.close(h, cb),
            AnyHandle::Check(h) => lp.close(h, cb),
            AnyHandle::Timer(h) => lp.close(h, cb),
            _ => unreachable!(),
        }
        .unwrap();
    }
    lp.run(RunMode::Default).unwrap();
    assert_eq!(closed.get(), 4);
    assert_loop_empty(&lp);
}

#[test]
fn unref_in_prepare_callback() {
    let mut lp = Loop::new().unwrap();
    let p = lp.prepare_init();
    let hits = Counter::new();
    let h = hits.clone();
    lp.prepare_start(p, move |lp, p| {
        h.hit();
        lp.unref_handle(p).unwrap();
    })
    .unwrap();
    lp.run(RunMode::Default).unwrap();
    assert_eq!(hits.get(), 1);
    lp.close(p, |_| {}).unwrap();
    lp.run(RunMode::Default).unwrap();
    assert_loop_empty(&lp);
}

#[test]
fn walk_sees_live_handles_only() {
    let mut lp = Loop::new().unwrap();
    let t = lp.timer_init();
    let i = lp.idle_init();
    let mut seen = Vec::new();
    lp.walk(|h| seen.push(h));
    assert_eq!(seen, vec![AnyHandle::Timer(t), AnyHandle::Idle(i)]);
    lp.close(t, |_| {}).unwrap();
    lp.run(RunMode::NoWait).unwrap();
    seen.clear();
    lp.walk(|h| seen.push(h));
    assert_eq!(seen, vec![AnyHandle::Idle(i)]);
    assert_eq!(lp.handle_count(), 1);
    lp.close(i, |_| {}).unwrap();
    lp.run(RunMode::Default).unwrap();
    assert_loop_empty(&lp);
}

#[test]
fn close_callback_never_runs_inside_close() {
    let mut lp = Loop::new().unwrap();
    let t = lp.timer_init();
    let closed = Counter::new();
    let k = closed.clone();
    lp.close(t, move |_| k.hit()).unwrap();
    assert_eq!(closed.get(), 0);
    lp.run(RunMode::Default).unwrap();
    assert_eq!(closed.get(), 1);
    assert_loop_empty(&lp);
}

#[test]
fn stale_handles_and_double_close_are_errors() {
    let mut lp = Loop::new().unwrap();
    let t = lp.timer_init();
    lp.close(t, |_| {}).unwrap();
    let again = lp.close(t, |_| panic!("dropped, never called"));
    assert_eq!(again.unwrap_err().kind(), io::ErrorKind::InvalidInput);
    lp.run(RunMode::Default).unwrap();
    let err = lp
        .timer_start(t, Duration::from_millis(1), Duration::ZERO, |_, _| {})
        .unwrap_err();
    assert!(err.get_ref().unwrap().is::<StaleHandle>());
    // The slot is reused by a new handle; the old id still does not reach it.
    let t2 = lp.timer_init();
    assert!(lp.timer_stop(t).is_err());
    assert!(!lp.is_active(t));
    lp.timer_start(t2, Duration::from_millis(1), Duration::ZERO, |_, _| {})
        .unwrap();
    assert!(lp.close(t, |_| {}).is_err());
    assert!(lp.is_active(t2));
    lp.close(t2, |_| {}).unwrap();
    lp.run(RunMode::Default).unwrap();
    assert_loop_empty(&lp);
}

#[test]
fn run_is_not_reentrant() {
    let mut lp = Loop::new().unwrap();
    let t = lp.timer_init();
    let hits = Counter::new();
    let h = hits.clone();
    lp.timer_start(t, Duration::ZERO, Duration::ZERO, move |lp, t| {
        assert!(lp.run(RunMode::NoWait).is_err());
        h.hit();
        lp.close(t, |_| {}).unwrap();
    })
    .unwrap();
    lp.run(RunMode::Default).unwrap();
    assert_eq!(hits.get(), 1);
    assert_loop_empty(&lp);
}

/// `close_if_open` closes a handle unless it is already closing, with no
/// close callback, and says whether it did; the handle ends exactly as
/// with `close`: a queued write is cancelled with `ECANCELED` first.
#[test]
fn close_if_open_is_quiet_and_idempotent() {
    let mut lp = Loop::new().unwrap();
    let t = lp.timer_init();
    assert!(lp.close_if_open(t), "an open handle is closed");
    assert!(lp.is_closing(t));
    assert!(!lp.close_if_open(t), "a closing handle is left alone");
    assert!(lp.close(t, |_| {}).is_err(), "close still refuses it");

    let (a, b) = lp.pipe_pair(false).unwrap();
    let cancelled = Counter::new();
    let c = cancelled.clone();
    let big = vec![1u8; 8 << 20];
    lp.write(a, &[&big], move |_, _, r| {
        assert_eq!(
            r.unwrap_err().raw_os_error(),
            Some(nix::libc::ECANCELED),
            "the queued write ends with the handle"
        );
        c.hit();
    })
    .unwrap();
    assert!(lp.write_queue_size(a) > 0, "the write is queued");
    assert!(lp.close_if_open(a));
    assert!(lp.close_if_open(b));
    lp.run(RunMode::Default).unwrap();
    assert_eq!(cancelled.get(), 1);
    assert!(!lp.close_if_open(t), "a stale id is left alone");
    assert!(!lp.close_if_open(a));
    assert_loop_empty(&lp);
}

/// One `close` takes a typed id, a `Socket`, a `Stream` or an `AnyHandle`,
/// and so do the other operations every handle has: no caller matches on
/// a socket's kind to close it.
#[test]
fn close_takes_sockets_streams_and_any_handles() {
    use uvcluster::uv::{Socket, Stream};

    let mut lp = Loop::new().unwrap();
    let (a, b) = lp.pipe_pair(false).unwrap();
    let t = lp.tcp_init();
    let u = lp.udp_init();
    let timer = lp.timer_init();
    let (sa, sb, st): (Socket, Stream, Socket) = (a.into(), b.into(), t.into());
    assert_eq!(sa, Socket::Pipe(a));
    assert_eq!(sb, Stream::Pipe(b));
    assert_eq!(Stream::try_from(st), Ok(Stream::Tcp(t)));
    assert!(
        Stream::try_from(Socket::from(u)).is_err(),
        "UDP is no stream"
    );
    assert_eq!(AnyHandle::from(sb), AnyHandle::Pipe(b));

    // The stream operations without a callback take a `Stream` too.
    lp.read_start(b, |_, _, _| {}).unwrap();
    assert!(lp.is_reading(sb) && lp.is_active(sb));
    lp.unref_handle(sb).unwrap();
    assert!(!lp.has_ref(b));
    lp.read_stop(sb).unwrap();
    assert!(!lp.is_reading(b));
    assert_eq!(lp.write_queue_size(sb), 0);

    let closed = Counter::new();
    for h in [
        AnyHandle::from(sa),
        AnyHandle::from(sb),
        AnyHandle::from(Socket::Udp(u)),
        AnyHandle::from(timer),
    ] {
        let c = closed.clone();
        lp.close(h, move |_| c.hit()).unwrap();
        assert!(lp.is_closing(h));
    }
    let c = closed.clone();
    lp.close(st, move |_| c.hit()).unwrap();
    assert!(lp.is_closing(t));
    lp.run(RunMode::Default).unwrap();
    assert_eq!(closed.get(), 5);
    assert!(lp.close(sa, |_| {}).is_err(), "stale through any id");
    assert_loop_empty(&lp);
}

/// Timer arguments are `Duration`s in the loop's whole milliseconds,
/// rounded up: a timer never fires before its timeout.
#[test]
fn timer_durations_round_up_to_whole_milliseconds() {
    let mut lp = Loop::new().unwrap();
    let t = lp.timer_init();
    lp.timer_start(
        t,
        Duration::from_micros(1500),
        Duration::from_nanos(1),
        |_, _| {},
    )
    .unwrap();
    assert_eq!(lp.timer_due_in(t).unwrap(), Duration::from_millis(2));
    assert_eq!(lp.timer_repeat(t).unwrap(), Duration::from_millis(1));
    lp.timer_set_repeat(t, Duration::from_micros(2001)).unwrap();
    assert_eq!(lp.timer_repeat(t).unwrap(), Duration::from_millis(3));
    lp.close(t, |_| {}).unwrap();
    lp.run(RunMode::Default).unwrap();
    assert_loop_empty(&lp);
}
