//! Signal handles: one and several watchers, one-shot, several loops on
//! several threads, restoring `SIG_DFL` (libuv's `test/test-signal.c`,
//! `test-signal-multiple-loops.c`, `test-signal-pending-on-close.c`).
//!
//! A signal sent to the process reaches whichever test thread the kernel
//! picks, and kills the process when no handler is installed, so every test
//! that raises one runs alone in its own process through
//! [`util::isolated`].
mod util;

use std::rc::Rc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Barrier};

use nix::libc;
use util::*;
use uvcluster::uv::{Handle, Loop, Signal, Signum};

const SIGUSR1: Signum = Signum::SIGUSR1;
const SIGUSR2: Signum = Signum::SIGUSR2;

fn raise(signum: Signum) {
    uvcluster::uv::kill(std::process::id() as i32, signum).unwrap();
}

/// Whether this process has a handler installed for `signum` (the
/// `SigCgt` mask of `/proc/self/status`).
fn caught(signum: Signum) -> bool {
    let signum = signum.as_raw();
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = status.lines().find(|l| l.starts_with("SigCgt:")).unwrap();
    let mask = u64::from_str_radix(line["SigCgt:".len()..].trim(), 16).unwrap();
    mask & (1 << (signum - 1)) != 0
}

/// A callback that counts and checks the signal number.
fn counting(c: &Counter, want: Signum) -> impl FnMut(&mut Loop, Handle<Signal>, Signum) + 'static {
    let c = c.clone();
    move |_, _, signum| {
        assert_eq!(signum, want);
        c.hit();
    }
}

#[test]
fn we_get_signal() {
    isolated("we_get_signal", || {
        let before = open_fds();
        let mut lp = Loop::new().unwrap();
        let s = lp.signal_init();
        let calls = Counter::new();
        let c = calls.clone();
        lp.signal_start(s, SIGUSR1, move |lp, s, signum| {
            assert_eq!(signum, SIGUSR1);
            c.hit();
            lp.close(s, |_| {}).unwrap();
        })
        .unwrap();
        assert!(lp.is_active(s));
        assert_eq!(lp.signal_signum(s).unwrap(), Some(SIGUSR1));
        assert!(caught(SIGUSR1));
        raise(SIGUSR1);
        run_with_deadline(&mut lp, 5000);
        assert_eq!(calls.get(), 1);
        assert!(!caught(SIGUSR1), "the last watcher restores SIG_DFL");
        assert_loop_empty(&lp);
        drop(lp);
        assert_eq!(open_fds(), before, "the self-pipe is closed with the loop");
    });
}

#[test]
fn we_get_signals() {
    isolated("we_get_signals", || {
        let mut lp = Loop::new().unwrap();
        let counters: Vec<Counter> = (0..4).map(|_| Counter::new()).collect();
        let handles: Vec<_> = counters
            .iter()
            .map(|c| {
                let s = lp.signal_init();
                lp.signal_start(s, SIGUSR1, counting(c, SIGUSR1)).unwrap();
                s
            })
            .collect();
        let other = Counter::new();
        let s2 = lp.signal_init();
        lp.signal_start(s2, SIGUSR2, counting(&other, SIGUSR2))
            .unwrap();
        for round in 1..=3 {
            raise(SIGUSR1);
            let cs = counters.clone();
            run_until(&mut lp, 5000, move |_| cs.iter().all(|c| c.get() == round));
        }
        raise(SIGUSR2);
        let o = other.clone();
        run_until(&mut lp, 5000, move |_| o.get() == 1);
        for c in &counters {
            assert_eq!(c.get(), 3, "one call per handle per signal");
        }
        assert_eq!(other.get(), 1);
        for s in handles.into_iter().chain([s2]) {
            lp.close(s, |_| {}).unwrap();
        }
        run_with_deadline(&mut lp, 5000);
        assert!(!caught(SIGUSR1) && !caught(SIGUSR2));
        assert_loop_empty(&lp);
    });
}

#[test]
fn we_get_signal_one_shot() {
    isolated("we_get_signal_one_shot", || {
        let mut lp = Loop::new().unwrap();
        let s = lp.signal_init();
        let calls = Counter::new();
        let c = calls.clone();
        let start = move |lp: &mut Loop| {
            let c = c.clone();
            lp.signal_start_oneshot(s, SIGUSR1, move |lp, s, signum| {
                assert_eq!(signum, SIGUSR1);
                // Stopped before its callback runs.
                assert!(!lp.is_active(s));
                c.hit();
            })
            .unwrap();
        };
        start(&mut lp);
        raise(SIGUSR1);
        run_with_deadline(&mut lp, 5000);
        assert_eq!(calls.get(), 1);
        assert!(!lp.is_active(s));
        assert!(!caught(SIGUSR1));
        // Restarted, it fires once more.
        start(&mut lp);
        raise(SIGUSR1);
        run_with_deadline(&mut lp, 5000);
        assert_eq!(calls.get(), 2);
        lp.close(s, |_| {}).unwrap();
        run_with_deadline(&mut lp, 5000);
        assert_loop_empty(&lp);
    });
}

#[test]
fn we_get_signals_mixed() {
    isolated("we_get_signals_mixed", || {
        let mut lp = Loop::new().unwrap();
        let once: Vec<Counter> = (0..2).map(|_| Counter::new()).collect();
        let many: Vec<Counter> = (0..2).map(|_| Counter::new()).collect();
        let mut handles = Vec::new();
        for (o, m) in once.iter().zip(&many) {
            let s = lp.signal_init();
            let o = o.clone();
            lp.signal_start_oneshot(s, SIGUSR1, move |_, _, _| o.hit())
                .unwrap();
            handles.push(s);
            let s = lp.signal_init();
            lp.signal_start(s, SIGUSR1, counting(m, SIGUSR1)).unwrap();
            handles.push(s);
        }
        for round in 1..=2 {
            raise(SIGUSR1);
            let m = many.clone();
            run_until(&mut lp, 5000, move |_| m.iter().all(|c| c.get() == round));
        }
        for c in &once {
            assert_eq!(c.get(), 1);
        }
        for c in &many {
            assert_eq!(c.get(), 2);
        }
        for s in handles {
            lp.close(s, |_| {}).unwrap();
        }
        run_with_deadline(&mut lp, 5000);
        assert!(!caught(SIGUSR1));
        assert_loop_empty(&lp);
    });
}

/// Every loop watching a signal gets it (test-signal-multiple-loops.c).
#[test]
fn signal_multiple_loops() {
    isolated("signal_multiple_loops", || {
        const LOOPS: usize = 4;
        let barrier = Arc::new(Barrier::new(LOOPS + 1));
        let total = Arc::new(AtomicUsize::new(0));
        let threads: Vec<_> = (0..LOOPS)
            .map(|_| {
                let barrier = barrier.clone();
                let total = total.clone();
                std::thread::spawn(move || {
                    let mut lp = Loop::new().unwrap();
                    let calls = Counter::new();
                    for _ in 0..2 {
                        let s = lp.signal_init();
                        let c = calls.clone();
                        let t = total.clone();
                        lp.signal_start(s, SIGUSR1, move |lp, s, _| {
                            c.hit();
                            t.fetch_add(1, Ordering::SeqCst);
                            lp.close(s, |_| {}).unwrap();
                        })
                        .unwrap();
                    }
                    barrier.wait();
                    run_with_deadline(&mut lp, 5000);
                    assert_eq!(calls.get(), 2);
                    assert_loop_empty(&lp);
                })
            })
            .collect();
        // Every loop has started its watchers before the signal is sent.
        barrier.wait();
        raise(SIGUSR1);
        for t in threads {
            t.join().unwrap();
        }
        assert_eq!(total.load(Ordering::SeqCst), LOOPS * 2);
        assert!(!caught(SIGUSR1));
    });
}

/// A signal caught but not yet dispatched is not delivered after close
/// (test-signal-pending-on-close.c), and the close callback runs.
#[test]
fn signal_close_no_callback_after() {
    isolated("signal_close_no_callback_after", || {
        let mut lp = Loop::new().unwrap();
        let s = lp.signal_init();
        let keep = lp.signal_init();
        let kept = Counter::new();
        lp.signal_start(s, SIGUSR1, |_, _, _| panic!("callback after close"))
            .unwrap();
        // A second watcher keeps the handler installed, so the signal sent
        // below is caught and lands in the pipe.
        let k = kept.clone();
        lp.signal_start(keep, SIGUSR1, move |lp, h, _| {
            k.hit();
            lp.close(h, |_| {}).unwrap();
        })
        .unwrap();
        raise(SIGUSR1);
        let closed = Counter::new();
        let c = closed.clone();
        lp.close(s, move |_| c.hit()).unwrap();
        assert!(lp.alive(), "a closing handle keeps the loop alive");
        run_with_deadline(&mut lp, 5000);
        assert_eq!(closed.get(), 1);
        assert_eq!(kept.get(), 1);
        assert_loop_empty(&lp);
    });
}

/// Starting a started handle on the same signal swaps the callback; on
/// another signal it moves the handle.
#[test]
fn signal_restart_swaps_callback() {
    isolated("signal_restart_swaps_callback", || {
        let mut lp = Loop::new().unwrap();
        let s = lp.signal_init();
        let first = Counter::new();
        let second = Counter::new();
        lp.signal_start(s, SIGUSR1, counting(&first, SIGUSR1))
            .unwrap();
        lp.signal_start(s, SIGUSR1, counting(&second, SIGUSR1))
            .unwrap();
        raise(SIGUSR1);
        let c = second.clone();
        run_until(&mut lp, 5000, move |_| c.get() == 1);
        assert_eq!(first.get(), 0);
        // Move it to SIGUSR2: SIGUSR1 has no watcher left.
        let third = Counter::new();
        lp.signal_start(s, SIGUSR2, counting(&third, SIGUSR2))
            .unwrap();
        assert!(!caught(SIGUSR1) && caught(SIGUSR2));
        raise(SIGUSR2);
        let c = third.clone();
        run_until(&mut lp, 5000, move |_| c.get() == 1);
        assert_eq!(second.get(), 1);
        lp.signal_stop(s).unwrap();
        assert!(!lp.is_active(s));
        assert!(!caught(SIGUSR2));
        lp.close(s, |_| {}).unwrap();
        run_with_deadline(&mut lp, 5000);
        assert_loop_empty(&lp);
    });
}

/// Invalid signal numbers fail with EINVAL and drop the callback
/// (test-signal.c: kill_invalid_signum and friends). Nothing is raised, so
/// this runs in the shared process. Numbers that are no signal at all are
/// refused where they become a `Signum`; signals that cannot be caught
/// by `signal_start`.
#[test]
fn signal_invalid_signum() {
    let mut lp = Loop::new().unwrap();
    let s = lp.signal_init();
    let token = Rc::new(());
    let einval = std::io::Error::from_raw_os_error(libc::EINVAL).kind();
    for n in [0, -1, 65, 1000] {
        let err = std::io::Error::from(Signum::try_from(n).unwrap_err());
        assert_eq!(err.kind(), einval, "signum {n}");
    }
    for signum in [Signum::SIGKILL, Signum::SIGSTOP] {
        let t = token.clone();
        let err = lp
            .signal_start(s, signum, move |_, _, _| {
                let _ = &t;
            })
            .unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::EINVAL), "signum {signum}");
        let t = token.clone();
        let err = lp
            .signal_start_oneshot(s, signum, move |_, _, _| {
                let _ = &t;
            })
            .unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::EINVAL), "signum {signum}");
    }
    assert_eq!(Rc::strong_count(&token), 1, "callbacks were dropped");
    assert!(!lp.is_active(s));
    let err = std::io::Error::from(Signum::try_from(-1).unwrap_err());
    assert_eq!(err.kind(), einval);
    lp.close(s, |_| {}).unwrap();
    // A closing or closed handle cannot be started.
    assert!(lp.signal_start(s, SIGUSR2, |_, _, _| {}).is_err());
    run_with_deadline(&mut lp, 5000);
    assert!(lp.signal_start(s, SIGUSR2, |_, _, _| {}).is_err());
    assert_loop_empty(&lp);
}

/// A started signal handle keeps the loop alive unless unreferenced, and a
/// stopped one does not. Nothing is raised.
#[test]
fn signal_ref_and_stop() {
    let mut lp = Loop::new().unwrap();
    let s = lp.signal_init();
    lp.signal_start(s, SIGUSR2, |_, _, _| panic!("no signal was sent"))
        .unwrap();
    assert!(lp.alive());
    lp.unref_handle(s).unwrap();
    assert!(!lp.alive());
    run_with_deadline(&mut lp, 5000);
    lp.ref_handle(s).unwrap();
    lp.signal_stop(s).unwrap();
    lp.signal_stop(s).unwrap();
    assert!(!lp.alive());
    assert_eq!(lp.signal_signum(s).unwrap(), None);
    lp.close(s, |_| {}).unwrap();
    run_with_deadline(&mut lp, 5000);
    assert_loop_empty(&lp);
}
