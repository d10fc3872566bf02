//! The supervisor with real Node workers (`tests/node/supervised_app.js`,
//! a Node `http` server under `cluster`): restart after a crash, the
//! crash-loop bound, PM2's `process.send('ready')`, a fail-closed reload
//! of a version with a syntax error, and zero failed requests across
//! rolling reloads under load in every policy.

mod supervisor_common;
mod util;

use std::cell::{Cell, RefCell};
use std::rc::Rc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use nix::sys::signal::Signal;
use supervisor_common::*;
use uvcluster::cluster::SchedulingPolicy;
use uvcluster::supervisor::{ReadyMode, ReloadError, StartFailure, SupervisorConfig};
use uvcluster::uv::Loop;

fn node(lp: &mut Loop, mode: &str, policy: SchedulingPolicy, cfg: SupervisorConfig) -> Sup {
    util::require_node();
    supervisor(lp, node_settings(mode, policy), cfg)
}

#[test]
fn node_worker_restarted_after_crash_and_still_serving() {
    let mut lp = Loop::new().unwrap();
    let s = node(&mut lp, "serve", SchedulingPolicy::RoundRobin, config(2));
    start_ready(&mut lp, &s, 2);
    let victim = s.pids(&lp)[0];
    kill_and_wait_replaced(&mut lp, &s, victim, 2);
    assert_eq!(s.count("restarting in 0 ms"), 1, "{}", s.lines());
    let load = Load::start(s.port.get(), 2, 20);
    let errors = load.finish(&mut lp, 30_000);
    assert!(errors.is_empty(), "{errors:?}");
    assert_eq!(stop_and_wait(&mut lp, &s), 0);
}

#[test]
fn node_crash_loop_is_bounded_and_the_primary_exits_non_zero() {
    let mut lp = Loop::new().unwrap();
    let s = node(&mut lp, "crash", SchedulingPolicy::RoundRobin, config(1));
    s.sup.start(&mut lp);
    let exit = s.exit.clone();
    util::run_until(&mut lp, 10_000, move |_| exit.get().is_some());
    assert_eq!(s.exit.get(), Some(1));
    assert_eq!(s.count("forked"), 6, "{}", s.lines());
    assert!(s.lines().contains("last worker: exit code 3"));
}

#[test]
fn node_wait_ready_uses_pm2s_ready_message() {
    let mut lp = Loop::new().unwrap();
    let cfg = SupervisorConfig {
        ready: ReadyMode::Message,
        ..config(1)
    };
    let s = node(&mut lp, "wait-ready", SchedulingPolicy::RoundRobin, cfg);
    start_ready(&mut lp, &s, 1);
    let line = (s.log.borrow().iter())
        .find(|l| l.contains(" ready "))
        .cloned()
        .unwrap();
    let ms: u64 = (line.rsplit("after ").next().unwrap())
        .trim_end_matches(" ms")
        .parse()
        .unwrap();
    assert!(ms >= 200, "ready before its message: {line}");
    assert_eq!(stop_and_wait(&mut lp, &s), 0);
}

/// `--wait-ready` under the primary's dispatch: a replacement that
/// listens, then sends `'ready'` 1.5 s later, is handed no connection
/// before it is ready (it would answer `not-ready`, a failure for
/// [`Load`]); the old worker serves meanwhile.
fn node_wait_ready_holds_the_replacement(policy: SchedulingPolicy) {
    let mut lp = Loop::new().unwrap();
    let cfg = SupervisorConfig {
        ready: ReadyMode::Message,
        ..config(1)
    };
    let s = node(&mut lp, "wait-ready", policy, cfg);
    start_ready(&mut lp, &s, 1);
    let before = s.pids(&lp);
    let mut env = node_env("wait-ready");
    env.env
        .get_or_insert_with(Vec::new)
        .push(("READY_DELAY_MS".into(), "1500".into()));
    s.sup.primary(&lp).setup_primary(&mut lp, env);
    let load = Load::start(s.port.get(), 2, 100_000);
    let done = Rc::new(Cell::new(0));
    reload_times(&mut lp, &s.sup, 1, done.clone());
    // The replacement was forked in the call: watch it listen.
    let new = (s.sup.status(&lp).iter())
        .find(|w| w.state == uvcluster::supervisor::WorkerState::Starting)
        .and_then(|w| w.id)
        .expect("a replacement starting");
    let w = s.sup.primary(&lp).worker(&lp, new).unwrap();
    let ok_at_listen = Rc::new(Cell::new(None));
    let (o, counter) = (ok_at_listen.clone(), load.ok.clone());
    w.on_listening(&mut lp, move |_, _, _| {
        o.set(Some(counter.load(Ordering::SeqCst)))
    });
    util::run_until(&mut lp, 30_000, |_| done.get() == 1);
    let ok_at_ready = load.ok();
    let listened = ok_at_listen.get().expect("the replacement listened");
    assert!(
        ok_at_ready > listened + 10,
        "requests served while it listened, not ready: {listened} -> {ok_at_ready}"
    );
    // And the new worker serves once ready.
    let ok = load.ok.clone();
    run_until_threads(&mut lp, 30_000, move || {
        ok.load(Ordering::SeqCst) > ok_at_ready + 20
    });
    let errors = load.finish(&mut lp, 30_000);
    let first = &errors[..errors.len().min(3)];
    assert!(
        errors.is_empty(),
        "{} failed, first: {first:?}",
        errors.len()
    );
    assert_ne!(s.pids(&lp), before);
    assert_eq!(stop_and_wait(&mut lp, &s), 0);
}

#[test]
fn node_wait_ready_holds_the_replacement_round_robin() {
    node_wait_ready_holds_the_replacement(SchedulingPolicy::RoundRobin);
}

#[test]
fn node_wait_ready_holds_the_replacement_least_connections() {
    node_wait_ready_holds_the_replacement(SchedulingPolicy::LeastConnections);
}

/// `--max-connections` is counted by the dispatcher on each handoff: a
/// worker at its limit leaves rotation at once, so the requests it
/// answered (its pid in each answer) are at most the limit plus the
/// handoff window; then it is replaced gracefully, losing nothing.
#[test]
fn node_connection_limit_is_counted_by_the_dispatcher() {
    const LIMIT: u64 = 40;
    const WINDOW: usize = 4;
    let mut lp = Loop::new().unwrap();
    let cfg = SupervisorConfig {
        max_connections: Some(LIMIT),
        ..config(2)
    };
    let s = node(&mut lp, "serve", SchedulingPolicy::RoundRobin, cfg);
    s.sup.primary(&lp).set_handoff_window(&mut lp, WINDOW);
    start_ready(&mut lp, &s, 2);
    let first = s.pids(&lp);
    let load = Load::start(s.port.get(), 4, 100_000);
    // Both first workers replaced, and their replacements serving.
    util::run_until(&mut lp, 60_000, |lp| {
        s.count("draining") >= 2 && s.pids(lp).iter().all(|p| !first.contains(p))
    });
    let ok = load.ok.clone();
    let base = load.ok();
    run_until_threads(&mut lp, 30_000, move || {
        ok.load(Ordering::SeqCst) > base + 20
    });
    let by_server = load.by_server.clone();
    let errors = load.finish(&mut lp, 30_000);
    let first_errors = &errors[..errors.len().min(3)];
    assert!(
        errors.is_empty(),
        "{} failed: {first_errors:?}",
        errors.len()
    );
    let by_server = by_server.lock().unwrap();
    for pid in &first {
        let n = by_server.get(&pid.to_string()).copied().unwrap_or(0) as u64;
        assert!(
            (LIMIT..=LIMIT + WINDOW as u64).contains(&n),
            "worker pid {pid} answered {n} for a limit of {LIMIT}: {by_server:?}\n{}",
            s.lines()
        );
    }
    assert!(
        s.count("connection limit reached (40 handed)") >= 2,
        "{}",
        s.lines()
    );
    assert_eq!(s.count("unexpectedly"), 0);
    assert_eq!(stop_and_wait(&mut lp, &s), 0);
}

#[test]
fn node_ready_timeout_fails_the_reload_closed() {
    let mut lp = Loop::new().unwrap();
    let cfg = SupervisorConfig {
        ready: ReadyMode::Message,
        ready_timeout: Duration::from_millis(1_500),
        ..config(1)
    };
    let s = node(&mut lp, "wait-ready", SchedulingPolicy::RoundRobin, cfg);
    start_ready(&mut lp, &s, 1);
    let before = s.pids(&lp);
    s.sup
        .primary(&lp)
        .setup_primary(&mut lp, node_env("never-ready"));
    let result = Rc::new(RefCell::new(None));
    let r = result.clone();
    s.sup
        .reload(&mut lp, move |_, res| *r.borrow_mut() = Some(res));
    util::run_until(&mut lp, 30_000, |_| result.borrow().is_some());
    let res = result.borrow_mut().take().unwrap();
    assert!(
        matches!(
            res,
            Err(ReloadError::NotReady {
                failure: StartFailure::ReadyTimeout(_),
                ..
            })
        ),
        "{res:?}"
    );
    assert_eq!(s.pids(&lp), before);
    let load = Load::start(s.port.get(), 2, 20);
    let errors = load.finish(&mut lp, 30_000);
    assert!(errors.is_empty(), "{errors:?}");
    assert_eq!(stop_and_wait(&mut lp, &s), 0);
}

/// Regression (issue 13): under `none` the kernel hands a replacement
/// connections as soon as it listens; one that never sends `'ready'`
/// (`--wait-ready`) fails the reload at the ready timeout and is stopped
/// gracefully, not SIGKILLed with connections in hand: a closed-loop load
/// across the failed reload gets no failed request, and the old workers
/// keep serving.
#[test]
fn node_wait_ready_fail_closed_reload_under_none_loses_nothing() {
    let mut lp = Loop::new().unwrap();
    let cfg = SupervisorConfig {
        ready: ReadyMode::Message,
        ready_timeout: Duration::from_millis(1_500),
        ..config(2)
    };
    let s = node(&mut lp, "wait-ready", SchedulingPolicy::None, cfg);
    start_ready(&mut lp, &s, 2);
    let before = s.pids(&lp);
    let load = Load::start(s.port.get(), 4, 100_000);
    s.sup.primary(&lp).setup_primary(&mut lp, node_env("mute"));
    let result = Rc::new(RefCell::new(None));
    let r = result.clone();
    s.sup
        .reload(&mut lp, move |_, res| *r.borrow_mut() = Some(res));
    util::run_until(&mut lp, 30_000, |_| result.borrow().is_some());
    let res = result.borrow_mut().take().unwrap();
    assert!(
        matches!(
            res,
            Err(ReloadError::NotReady {
                failure: StartFailure::ReadyTimeout(_),
                ..
            })
        ),
        "{res:?}"
    );
    // The abandoned replacement leaves (drained, disconnected) while the
    // load goes on.
    let sup = s.sup;
    util::run_until(&mut lp, 30_000, |lp| sup.status(lp).len() == 2);
    let ok = load.ok.clone();
    let base = ok.load(Ordering::SeqCst);
    run_until_threads(&mut lp, 30_000, move || {
        ok.load(Ordering::SeqCst) > base + 50
    });
    let errors = load.finish(&mut lp, 30_000);
    assert!(errors.is_empty(), "{errors:?}");
    assert_eq!(s.pids(&lp), before, "the old workers still serve");
    assert_eq!(s.count("SIGKILL"), 0, "{}", s.lines());
    assert_eq!(stop_and_wait(&mut lp, &s), 0);
}

#[test]
fn node_fail_closed_reload_of_a_syntax_error_loses_nothing() {
    let mut lp = Loop::new().unwrap();
    let s = node(&mut lp, "serve", SchedulingPolicy::RoundRobin, config(2));
    start_ready(&mut lp, &s, 2);
    let before = s.pids(&lp);
    let load = Load::start(s.port.get(), 4, 100_000);
    s.sup
        .primary(&lp)
        .setup_primary(&mut lp, node_env("syntax"));
    let result = Rc::new(RefCell::new(None));
    let r = result.clone();
    s.sup
        .reload(&mut lp, move |_, res| *r.borrow_mut() = Some(res));
    util::run_until(&mut lp, 30_000, |_| result.borrow().is_some());
    let res = result.borrow_mut().take().unwrap();
    assert!(
        matches!(
            res,
            Err(ReloadError::NotReady {
                failure: StartFailure::Exited(_),
                ..
            })
        ),
        "{res:?}"
    );
    let ok = load.ok.clone();
    let base = ok.load(Ordering::SeqCst);
    run_until_threads(&mut lp, 30_000, move || {
        ok.load(Ordering::SeqCst) > base + 50
    });
    let errors = load.finish(&mut lp, 30_000);
    assert!(errors.is_empty(), "{errors:?}");
    assert_eq!(s.pids(&lp), before, "the old workers still serve");
    assert_eq!(stop_and_wait(&mut lp, &s), 0);
}

#[test]
fn node_graceful_stop_kills_what_outlives_the_kill_timeout() {
    let mut lp = Loop::new().unwrap();
    let cfg = SupervisorConfig {
        kill_timeout: Duration::from_millis(500),
        ..config(2)
    };
    let s = node(&mut lp, "linger", SchedulingPolicy::RoundRobin, cfg);
    start_ready(&mut lp, &s, 2);
    let t0 = std::time::Instant::now();
    assert_eq!(stop_and_wait(&mut lp, &s), 0);
    assert!(t0.elapsed() >= Duration::from_millis(500));
    assert_eq!(
        s.count("still running after the kill timeout"),
        2,
        "{}",
        s.lines()
    );
    assert_eq!(s.count("forked"), 2);
}

#[test]
fn node_scale_up_and_down_drains_the_removed_workers() {
    let mut lp = Loop::new().unwrap();
    let s = node(&mut lp, "serve", SchedulingPolicy::RoundRobin, config(1));
    start_ready(&mut lp, &s, 1);
    s.sup.scale(&mut lp, 3).unwrap();
    util::run_until(&mut lp, 30_000, |lp| s.ready_workers(lp) == 3);
    let load = Load::start(s.port.get(), 2, 100_000);
    s.sup.scale(&mut lp, 1).unwrap();
    util::run_until(&mut lp, 30_000, |lp| s.sup.status(lp).len() == 1);
    let errors = load.finish(&mut lp, 30_000);
    assert!(errors.is_empty(), "{errors:?}");
    assert_eq!(s.count("draining"), 2);
    assert_eq!(s.count("unexpectedly"), 0);
    assert_eq!(stop_and_wait(&mut lp, &s), 0);
}

/// Ctrl-C reaches the Node workers too (they die of SIGINT, Node's
/// default): nothing is restarted, no crash, exit 0. In a process of its
/// own: the signal goes to the test process.
#[test]
fn node_signal_to_the_whole_group_during_stop_is_not_a_crash() {
    util::isolated(
        "node_signal_to_the_whole_group_during_stop_is_not_a_crash",
        || {
            let mut lp = Loop::new().unwrap();
            let s = node(&mut lp, "serve", SchedulingPolicy::RoundRobin, config(2));
            s.sup.handle_signals(&mut lp).unwrap();
            start_ready(&mut lp, &s, 2);
            for pid in s.pids(&lp) {
                kill(pid, Signal::SIGINT);
            }
            kill(std::process::id() as i32, Signal::SIGINT);
            assert_eq!(wait_exit(&mut lp, &s), 0);
            assert_eq!(s.count("forked"), 2, "{}", s.lines());
            assert_eq!(s.count("errored"), 0);
        },
    );
}

fn node_zero_loss_reloads(policy: SchedulingPolicy) {
    let mut lp = Loop::new().unwrap();
    let s = node(&mut lp, "serve", policy, config(2));
    start_ready(&mut lp, &s, 2);
    let before = s.pids(&lp);
    let load = Load::start(s.port.get(), 4, 100_000);
    let done = Rc::new(Cell::new(0));
    reload_times(&mut lp, &s.sup, 3, done.clone());
    util::run_until(&mut lp, 60_000, |_| done.get() == 3);
    let served = load.ok();
    let errors = load.finish(&mut lp, 30_000);
    assert!(errors.is_empty(), "{} failed: {errors:?}", errors.len());
    assert!(served > 0);
    assert!(s.pids(&lp).iter().all(|p| !before.contains(p)));
    assert_eq!(stop_and_wait(&mut lp, &s), 0);
}

#[test]
fn node_reload_under_load_loses_nothing_round_robin() {
    node_zero_loss_reloads(SchedulingPolicy::RoundRobin);
}

#[test]
fn node_reload_under_load_loses_nothing_none() {
    node_zero_loss_reloads(SchedulingPolicy::None);
}

#[test]
fn node_reload_under_load_loses_nothing_reuseport() {
    node_zero_loss_reloads(SchedulingPolicy::ReusePort);
}

#[test]
fn node_reload_under_load_loses_nothing_least_connections() {
    node_zero_loss_reloads(SchedulingPolicy::LeastConnections);
}
