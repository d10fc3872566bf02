//! The supervisor with Rust workers (this test binary, re-run as the
//! helper `sup_rust_worker`): restart, backoff, the crash-loop budget,
//! readiness, fail-closed and zero-loss rolling reloads in every policy,
//! graceful stop with the kill timeout, the signal table, scaling.
//!
//! No test sleeps: each drives the loop until a condition or a deadline.
//! Loads are client threads with a bounded number of requests.

mod supervisor_common;
mod util;

use std::cell::Cell;
use std::rc::Rc;
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use supervisor_common::*;
use uvcluster::cluster::{self, SchedulingPolicy};
use uvcluster::supervisor::{ReadyMode, ReloadError, StartFailure, SupervisorConfig};
use uvcluster::uv::{Loop, RunMode};

const HELPER: &str = "sup_rust_worker";

/// The worker: an HTTP hello world on port 0 through the primary; what
/// else it does is `SUP_MODE`'s (see `tests/node/supervised_app.js`,
/// the same modes, plus `linger`: keep running after the disconnect).
#[test]
fn sup_rust_worker() {
    if !util::is_helper(HELPER) {
        return;
    }
    let mut lp = Loop::new().unwrap();
    let w = cluster::setup_worker(&mut lp).unwrap().expect("a worker");
    let mode = std::env::var("SUP_MODE").unwrap_or_default();
    match mode.as_str() {
        "crash" | "syntax" => {
            eprintln!("sup_rust_worker: cannot start ({mode})");
            std::process::exit(3)
        }
        "linger" => {
            // Something that keeps the process up after its server closed.
            let t = lp.timer_init();
            lp.timer_start(t, Duration::from_secs(120), Duration::ZERO, |_, _| {})
                .unwrap();
        }
        _ => {}
    }
    if mode == "hang" {
        // A worker whose loop stops at its first connection (a handler
        // that never returns): it answers nothing from then on.
        let server = uvcluster::net::Server::new(&mut lp, |_, _, _| {
            loop {
                std::hint::spin_loop();
            }
        });
        server
            .listen(
                &mut lp,
                uvcluster::net::ListenOptions::port(0),
                |_, _, r| {
                    r.unwrap();
                },
            )
            .unwrap();
        lp.run(RunMode::Default).unwrap();
        return;
    }
    let _server = util::serve_hello(&mut lp, 0);
    if mode == "wait-ready" {
        let t = lp.timer_init();
        lp.timer_start(
            t,
            Duration::from_millis(200),
            Duration::ZERO,
            move |lp, t| {
                lp.close_if_open(t);
                w.send(lp, &serde_json::json!("ready"), None).unwrap();
            },
        )
        .unwrap();
    }
    lp.run(RunMode::Default).unwrap();
}

fn rust(lp: &mut Loop, mode: &str, policy: SchedulingPolicy, cfg: SupervisorConfig) -> Sup {
    supervisor(lp, rust_settings(HELPER, mode, policy), cfg)
}

#[test]
fn restart_after_crash_with_backoff() {
    let mut lp = Loop::new().unwrap();
    let s = rust(&mut lp, "serve", SchedulingPolicy::RoundRobin, config(2));
    start_ready(&mut lp, &s, 2);
    let port = s.port.get();
    let victim = s.pids(&lp)[0];
    kill_and_wait_replaced(&mut lp, &s, victim, 2);
    assert_eq!(
        s.count("exited unexpectedly: killed by SIGKILL"),
        1,
        "{}",
        s.lines()
    );
    // A lone crash: its slot's first restart is immediate.
    assert_eq!(s.count("restarting in 0 ms"), 1, "{}", s.lines());
    let st = s.sup.status(&lp);
    assert_eq!(st.iter().map(|w| w.restarts).sum::<u32>(), 1);
    // Still serving on the same port.
    let load = Load::start(port, 2, 20);
    let errors = load.finish(&mut lp, 20_000);
    assert!(errors.is_empty(), "{errors:?}");
    // A second crash of the same slot within the stable period waits
    // the initial backoff.
    let slot_pid = st.iter().find(|w| w.restarts == 1).unwrap().pid.unwrap();
    kill_and_wait_replaced(&mut lp, &s, slot_pid, 2);
    assert_eq!(s.count("restarting in 0 ms"), 1, "{}", s.lines());
    assert_eq!(stop_and_wait(&mut lp, &s), 0);
}

#[test]
fn crash_loop_is_bounded_and_the_primary_exits_non_zero() {
    let mut lp = Loop::new().unwrap();
    let s = rust(&mut lp, "crash", SchedulingPolicy::RoundRobin, config(1));
    let t0 = Instant::now();
    s.sup.start(&mut lp);
    let exit = s.exit.clone();
    // A worker that exits at once, for up to 10 s: the budget ends it.
    util::run_until(&mut lp, 10_000, move |_| exit.get().is_some());
    assert_eq!(s.exit.get(), Some(1));
    let forks = s.count("forked");
    // No fork storm: one start and max_restarts (5) restarts, the first
    // at once, then spaced by the backoff (100 + 200 + 400 + 800 ms).
    assert_eq!(forks, 6, "{}", s.lines());
    assert_eq!(s.count("restarting in 0 ms"), 1, "{}", s.lines());
    assert!(t0.elapsed() >= Duration::from_millis(1_500));
    assert_eq!(s.count("errored"), 1);
    assert!(
        s.lines().contains("last worker: exit code 3"),
        "{}",
        s.lines()
    );
    lp.run(RunMode::Default).unwrap();
}

#[test]
fn wait_ready_waits_for_the_ready_message() {
    let mut lp = Loop::new().unwrap();
    let cfg = SupervisorConfig {
        ready: ReadyMode::Message,
        ..config(1)
    };
    let s = rust(&mut lp, "wait-ready", SchedulingPolicy::RoundRobin, cfg);
    s.sup.start(&mut lp);
    util::run_until(&mut lp, 20_000, |lp| s.ready_workers(lp) == 1);
    let line = s
        .log
        .borrow()
        .iter()
        .find(|l| l.contains("ready"))
        .cloned()
        .unwrap();
    let ms: u64 = line
        .rsplit("after ")
        .next()
        .unwrap()
        .trim_end_matches(" ms")
        .parse()
        .unwrap();
    assert!(ms >= 200, "ready before its message: {line}");
    assert_eq!(stop_and_wait(&mut lp, &s), 0);
}

#[test]
fn ready_timeout_kills_and_counts_as_a_failed_start() {
    let mut lp = Loop::new().unwrap();
    let cfg = SupervisorConfig {
        ready: ReadyMode::Message,
        ready_timeout: Duration::from_millis(300),
        max_restarts: 1,
        ..config(1)
    };
    let s = rust(&mut lp, "never-ready", SchedulingPolicy::RoundRobin, cfg);
    s.sup.start(&mut lp);
    assert_eq!(wait_exit(&mut lp, &s), 1);
    assert_eq!(
        s.count("not ready within the ready timeout"),
        2,
        "{}",
        s.lines()
    );
    assert_eq!(s.count("forked"), 2);
    assert!(
        s.lines()
            .contains("starts in a row failed before the worker was ready")
    );
}

#[test]
fn fail_closed_reload_keeps_the_old_workers_serving() {
    let mut lp = Loop::new().unwrap();
    let s = rust(&mut lp, "serve", SchedulingPolicy::RoundRobin, config(2));
    start_ready(&mut lp, &s, 2);
    let before = s.pids(&lp);
    let load = Load::start(s.port.get(), 4, 100_000);
    // The "new version" cannot start.
    s.sup
        .primary(&lp)
        .setup_primary(&mut lp, rust_env(HELPER, "crash"));
    let result = Rc::new(std::cell::RefCell::new(None));
    let r = result.clone();
    s.sup
        .reload(&mut lp, move |_, res| *r.borrow_mut() = Some(res));
    util::run_until(&mut lp, 20_000, |_| result.borrow().is_some());
    let res = result.borrow_mut().take().unwrap();
    assert!(
        matches!(
            res,
            Err(ReloadError::NotReady {
                failure: StartFailure::Exited(_),
                replaced: 0,
                ..
            })
        ),
        "{res:?}"
    );
    // Let the load run on a little after the failure.
    let ok = load.ok.clone();
    let base = ok.load(std::sync::atomic::Ordering::SeqCst);
    run_until_threads(&mut lp, 20_000, move || {
        ok.load(std::sync::atomic::Ordering::SeqCst) > base + 50
    });
    let errors = load.finish(&mut lp, 20_000);
    assert!(errors.is_empty(), "{errors:?}");
    assert_eq!(s.pids(&lp), before, "the old workers still serve");
    assert_eq!(s.count("draining"), 0);
    assert_eq!(s.count("reload failed"), 1);
    assert_eq!(stop_and_wait(&mut lp, &s), 0);
}

/// The goal: zero failed requests across 20 reloads.
const RELOADS: usize = 20;

/// K rolling reloads under a closed-loop load: not one request fails.
fn zero_loss_reloads(policy: SchedulingPolicy) {
    let mut lp = Loop::new().unwrap();
    let s = rust(&mut lp, "serve", policy, config(2));
    start_ready(&mut lp, &s, 2);
    let before = s.pids(&lp);
    let load = Load::start(s.port.get(), 4, 100_000);
    let done = Rc::new(Cell::new(0));
    reload_times(&mut lp, &s.sup, RELOADS, done.clone());
    util::run_until(&mut lp, 60_000, |_| done.get() == RELOADS);
    let served = load.ok();
    let errors = load.finish(&mut lp, 20_000);
    eprintln!("{policy:?}: {served} requests served across {RELOADS} reloads");
    assert!(errors.is_empty(), "{} failed: {errors:?}", errors.len());
    assert!(served > 0);
    let after = s.pids(&lp);
    assert!(
        after.iter().all(|p| !before.contains(p)),
        "every worker replaced"
    );
    assert_eq!(s.count("reload finished"), RELOADS);
    assert_eq!(stop_and_wait(&mut lp, &s), 0);
}

#[test]
fn reload_under_load_loses_nothing_round_robin() {
    zero_loss_reloads(SchedulingPolicy::RoundRobin);
}

#[test]
fn reload_under_load_loses_nothing_none() {
    zero_loss_reloads(SchedulingPolicy::None);
}

#[test]
fn reload_under_load_loses_nothing_reuseport() {
    zero_loss_reloads(SchedulingPolicy::ReusePort);
}

#[test]
fn reload_under_load_loses_nothing_least_connections() {
    zero_loss_reloads(SchedulingPolicy::LeastConnections);
}

#[test]
fn graceful_stop_kills_what_outlives_the_kill_timeout() {
    let mut lp = Loop::new().unwrap();
    let cfg = SupervisorConfig {
        kill_timeout: Duration::from_millis(500),
        ..config(2)
    };
    let s = rust(&mut lp, "linger", SchedulingPolicy::RoundRobin, cfg);
    start_ready(&mut lp, &s, 2);
    let t0 = Instant::now();
    assert_eq!(stop_and_wait(&mut lp, &s), 0);
    assert!(t0.elapsed() >= Duration::from_millis(500));
    assert_eq!(
        s.count("still running after the kill timeout"),
        2,
        "{}",
        s.lines()
    );
    assert_eq!(s.count("forked"), 2, "nothing restarted during the stop");
    assert_eq!(s.count("unexpectedly"), 0);
    lp.run(RunMode::Default).unwrap();
}

#[test]
fn scale_up_and_down_drains_the_removed_workers() {
    let mut lp = Loop::new().unwrap();
    let s = rust(&mut lp, "serve", SchedulingPolicy::RoundRobin, config(1));
    start_ready(&mut lp, &s, 1);
    s.sup.scale(&mut lp, 3).unwrap();
    util::run_until(&mut lp, 20_000, |lp| s.ready_workers(lp) == 3);
    let load = Load::start(s.port.get(), 2, 100_000);
    s.sup.scale(&mut lp, 1).unwrap();
    util::run_until(&mut lp, 20_000, |lp| s.sup.status(lp).len() == 1);
    let errors = load.finish(&mut lp, 20_000);
    assert!(errors.is_empty(), "{errors:?}");
    assert_eq!(s.count("draining"), 2);
    assert_eq!(s.count("unexpectedly"), 0);
    assert!(s.sup.scale(&mut lp, 0).is_err());
    assert_eq!(stop_and_wait(&mut lp, &s), 0);
}

#[test]
fn hung_worker_is_killed_and_replaced() {
    let mut lp = Loop::new().unwrap();
    let cfg = SupervisorConfig {
        worker_timeout: Some(Duration::from_millis(1_000)),
        ..config(2)
    };
    let s = rust(&mut lp, "hang", SchedulingPolicy::RoundRobin, cfg);
    start_ready(&mut lp, &s, 2);
    // Their replacements serve.
    s.sup
        .primary(&lp)
        .setup_primary(&mut lp, rust_env(HELPER, "serve"));
    let load = Load::start(s.port.get(), 1, 30);
    let finished = load.finished.clone();
    run_until_threads(&mut lp, 30_000, move || {
        finished.load(std::sync::atomic::Ordering::SeqCst) == 1
    });
    let served = load.ok();
    let errors = load.finish(&mut lp, 20_000);
    assert!(
        s.count("hung: left a connection unanswered") >= 1,
        "{}",
        s.lines()
    );
    // Each hung worker holds at most the one connection it stopped on;
    // the others it was handed go to another worker.
    assert!(errors.len() <= 2, "{errors:?}");
    assert_eq!(served + errors.len(), 30);
    assert!(s.count("restarting in") >= 1);
    assert_eq!(stop_and_wait(&mut lp, &s), 0);
}

#[test]
fn connection_limit_replaces_workers_gracefully() {
    let mut lp = Loop::new().unwrap();
    let cfg = SupervisorConfig {
        max_connections: Some(10),
        ..config(2)
    };
    let s = rust(&mut lp, "serve", SchedulingPolicy::RoundRobin, cfg);
    start_ready(&mut lp, &s, 2);
    let load = Load::start(s.port.get(), 2, 100_000);
    util::run_until(&mut lp, 30_000, |_| {
        s.count("connection limit reached") >= 2
    });
    let errors = load.finish(&mut lp, 20_000);
    assert!(errors.is_empty(), "{errors:?}");
    assert!(s.count("draining") >= 1, "{}", s.lines());
    assert_eq!(s.count("unexpectedly"), 0);
    assert_eq!(stop_and_wait(&mut lp, &s), 0);
}

#[test]
fn restart_replaces_one_worker_gracefully() {
    let mut lp = Loop::new().unwrap();
    let s = rust(&mut lp, "serve", SchedulingPolicy::RoundRobin, config(2));
    start_ready(&mut lp, &s, 2);
    let st = s.sup.status(&lp);
    let (id, pid) = (st[0].id.unwrap(), st[0].pid.unwrap());
    let load = Load::start(s.port.get(), 2, 100_000);
    s.sup.restart(&mut lp, id).unwrap();
    util::run_until(&mut lp, 20_000, |lp| {
        s.ready_workers(lp) == 2 && !s.pids(lp).contains(&pid)
    });
    let errors = load.finish(&mut lp, 20_000);
    assert!(errors.is_empty(), "{errors:?}");
    assert_eq!(s.count("restart requested"), 1);
    assert!(s.sup.restart(&mut lp, 999).is_err());
    assert_eq!(stop_and_wait(&mut lp, &s), 0);
}

// ----- signals: each in a process of its own (`util::isolated`), since
// they go to the whole test process -------------------------------------

fn me() -> i32 {
    std::process::id() as i32
}

#[test]
fn signal_to_the_whole_group_during_stop_is_not_a_crash() {
    util::isolated(
        "signal_to_the_whole_group_during_stop_is_not_a_crash",
        || {
            let mut lp = Loop::new().unwrap();
            let s = rust(&mut lp, "linger", SchedulingPolicy::RoundRobin, config(2));
            s.sup.handle_signals(&mut lp).unwrap();
            start_ready(&mut lp, &s, 2);
            // What Ctrl-C or systemd's KillMode=control-group does: the same
            // signal to the primary and to every worker, at once.
            for pid in s.pids(&lp) {
                kill(pid, Signal::SIGINT);
            }
            kill(me(), Signal::SIGINT);
            assert_eq!(wait_exit(&mut lp, &s), 0);
            assert_eq!(s.count("forked"), 2, "nothing restarted: {}", s.lines());
            assert_eq!(s.count("errored"), 0);
            assert_eq!(s.count("graceful stop on SIGINT"), 1, "{}", s.lines());
        },
    );
}

#[test]
fn duplicate_sigterm_is_not_a_second_request() {
    util::isolated("duplicate_sigterm_is_not_a_second_request", || {
        let mut lp = Loop::new().unwrap();
        let cfg = SupervisorConfig {
            kill_timeout: Duration::from_millis(800),
            ..config(1)
        };
        let s = rust(&mut lp, "linger", SchedulingPolicy::RoundRobin, cfg);
        s.sup.handle_signals(&mut lp).unwrap();
        start_ready(&mut lp, &s, 1);
        // GNU timeout (and some init systems) may deliver SIGTERM twice.
        kill(me(), Signal::SIGTERM);
        util::run_until(&mut lp, 20_000, |_| s.count("graceful stop") == 1);
        kill(me(), Signal::SIGTERM);
        wait_exit(&mut lp, &s);
        assert_eq!(s.count("received again"), 1, "{}", s.lines());
        assert_eq!(s.count("immediate stop"), 0, "{}", s.lines());
        // The lingering worker was killed by the kill timeout, not at once.
        assert_eq!(s.count("still running after the kill timeout"), 1);
    });
}

#[test]
fn second_sigterm_later_or_sigquit_stops_at_once() {
    util::isolated("second_sigterm_later_or_sigquit_stops_at_once", || {
        let mut lp = Loop::new().unwrap();
        let cfg = SupervisorConfig {
            duplicate_signal_window: Duration::from_millis(100),
            ..config(1)
        };
        let s = rust(&mut lp, "linger", SchedulingPolicy::RoundRobin, cfg);
        s.sup.handle_signals(&mut lp).unwrap();
        start_ready(&mut lp, &s, 1);
        kill(me(), Signal::SIGTERM);
        util::run_until(&mut lp, 20_000, |_| s.count("graceful stop") == 1);
        // A timer, not a sleep: past the duplicate window.
        let later = Rc::new(Cell::new(false));
        let t = lp.timer_init();
        let l = later.clone();
        lp.timer_start(
            t,
            Duration::from_millis(300),
            Duration::ZERO,
            move |lp, t| {
                lp.close_if_open(t);
                l.set(true);
            },
        )
        .unwrap();
        util::run_until(&mut lp, 20_000, |_| later.get());
        kill(me(), Signal::SIGQUIT);
        wait_exit(&mut lp, &s);
        assert_eq!(s.count("immediate stop on SIGQUIT"), 1, "{}", s.lines());
        assert_eq!(s.count("immediate stop on"), 1);
    });
}

#[test]
fn sigttin_sigttou_and_sighup() {
    util::isolated("sigttin_sigttou_and_sighup", || {
        let mut lp = Loop::new().unwrap();
        let s = rust(&mut lp, "serve", SchedulingPolicy::RoundRobin, config(1));
        s.sup.handle_signals(&mut lp).unwrap();
        start_ready(&mut lp, &s, 1);
        kill(me(), Signal::SIGTTIN);
        util::run_until(&mut lp, 20_000, |lp| s.ready_workers(lp) == 2);
        kill(me(), Signal::SIGTTOU);
        util::run_until(&mut lp, 20_000, |lp| s.sup.status(lp).len() == 1);
        kill(me(), Signal::SIGTTOU);
        // Never below one, and the log says why nothing happened.
        util::run_until(&mut lp, 20_000, |_| s.count("not scaled") == 1);
        assert_eq!(
            s.count(
                "not scaled: SIGTTOU asks for one worker fewer, and one is the fewest; \
                 still 1 worker(s)"
            ),
            1,
            "{}",
            s.lines()
        );
        assert_eq!(s.sup.status(&lp).len(), 1, "never below one");
        let before = s.pids(&lp);
        kill(me(), Signal::SIGHUP);
        util::run_until(&mut lp, 20_000, |_| s.count("reload finished") == 1);
        assert_ne!(s.pids(&lp), before);
        kill(me(), Signal::SIGTERM);
        assert_eq!(wait_exit(&mut lp, &s), 0);
    });
}

/// A lone worker's crash: the listening socket stays open across its
/// restart, so clients that connect meanwhile wait and are served by the
/// replacement (Node closes a handle when its last worker leaves).
fn lone_worker_restart_keeps_the_listener(policy: SchedulingPolicy) {
    let mut lp = Loop::new().unwrap();
    let s = rust(&mut lp, "serve", policy, config(1));
    start_ready(&mut lp, &s, 1);
    let victim = s.pids(&lp)[0];
    kill(victim, Signal::SIGKILL);
    let load = Load::start(s.port.get(), 2, 10);
    util::run_until(&mut lp, 20_000, |lp| {
        s.ready_workers(lp) == 1 && !s.pids(lp).contains(&victim)
    });
    let errors = load.finish(&mut lp, 20_000);
    assert!(errors.is_empty(), "{errors:?}");
    assert_eq!(s.count("restarting in 0 ms"), 1, "{}", s.lines());
    assert_eq!(stop_and_wait(&mut lp, &s), 0);
}

#[test]
fn lone_worker_restart_keeps_the_listener_round_robin() {
    lone_worker_restart_keeps_the_listener(SchedulingPolicy::RoundRobin);
}

#[test]
fn lone_worker_restart_keeps_the_listener_none() {
    lone_worker_restart_keeps_the_listener(SchedulingPolicy::None);
}

#[test]
fn lone_worker_restart_keeps_the_listener_reuseport() {
    lone_worker_restart_keeps_the_listener(SchedulingPolicy::ReusePort);
}

// ----- the README's main job --------------------------------------------

/// `cluster_hello`'s primary runs on the supervisor: a worker killed is
/// replaced, SIGHUP reloads every worker under load without a failed
/// request, SIGTERM stops it with exit code 0.
#[test]
fn cluster_hello_restarts_a_killed_worker_and_reloads_on_sighup() {
    use std::io::BufRead;
    use std::process::{Command, Stdio};
    use std::sync::mpsc;

    let mut child = Command::new(util::example("cluster_hello"))
        .env("PORT", "0")
        .env("WORKERS", "2")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id() as i32;
    let (tx, lines) = mpsc::channel::<String>();
    let err = child.stderr.take().unwrap();
    std::thread::spawn(move || {
        for l in std::io::BufReader::new(err).lines() {
            let Ok(l) = l else { break };
            if tx.send(l).is_err() {
                break;
            }
        }
    });
    let limit = Duration::from_secs(20);
    let wait_for = |what: &str| -> String {
        loop {
            let l = lines
                .recv_timeout(limit)
                .unwrap_or_else(|_| panic!("no line with {what:?}"));
            if l.contains(what) {
                return l;
            }
        }
    };
    let mut out = std::io::BufReader::new(child.stdout.take().unwrap());
    let mut first = String::new();
    out.read_line(&mut first).unwrap();
    assert_eq!(first.trim(), "ready");
    let port: u16 = wait_for("listening on port")
        .rsplit(' ')
        .next()
        .unwrap()
        .parse()
        .unwrap();
    let children = || -> Vec<i32> {
        std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))
            .unwrap()
            .split_whitespace()
            .map(|p| p.parse().unwrap())
            .collect()
    };
    let victim = children()[0];
    kill(victim, Signal::SIGKILL);
    wait_for("exited unexpectedly: killed by SIGKILL");
    wait_for("restarting in 0 ms");
    wait_for("ready (slot");
    assert!(!children().contains(&victim));
    let load = Load::start(port, 4, 100_000);
    kill(pid, Signal::SIGHUP);
    wait_for("reload finished: 2 worker(s) replaced");
    let served = load.ok();
    let errors = load.finish_blocking();
    assert!(errors.is_empty(), "{errors:?}");
    assert!(served > 0);
    kill(pid, Signal::SIGTERM);
    let (stx, srx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = stx.send(child.wait().unwrap());
    });
    let status = srx.recv_timeout(limit).unwrap_or_else(|_| {
        kill(pid, Signal::SIGKILL);
        panic!("cluster_hello did not exit after SIGTERM");
    });
    assert_eq!(status.code(), Some(0));
}
