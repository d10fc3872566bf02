//! Node's test-cluster-*.js, group F (lifecycle: disconnect, kill, exit),
//! ported: a Rust primary with real Node workers
//! (`tests/node/ports_worker.js`), a real Node primary with Rust workers
//! (`tests/node/ports_primary.js`), and Rust on both sides.

mod cluster_node_common;
mod util;

use cluster_node_common::*;
use serde_json::json;
use std::time::Duration;
use util::*;
use uvcluster::cluster::{Primary, Settings, Worker, WorkerState};
use uvcluster::net::{ListenOptions, Server};
use uvcluster::uv::{Loop, Signum};

/// (code, signal, exitedAfterDisconnect, isDead, state) at `exit`.
type AtExit = (Option<i64>, Option<Signum>, Option<bool>, bool, WorkerState);

/// What a worker looked like at its `disconnect` and `exit` events.
#[derive(Debug, Default, Clone, PartialEq)]
struct Seen {
    disconnects: usize,
    exits: usize,
    /// (state, exitedAfterDisconnect, isConnected) at `disconnect`.
    at_disconnect: Option<(WorkerState, Option<bool>, bool)>,
    /// (code, signal, exitedAfterDisconnect, isDead, state) at `exit`.
    at_exit: Option<AtExit>,
    /// cluster.workers still holding it at `exit`.
    listed_at_exit: bool,
}

fn watch(lp: &mut Loop, p: &Primary, seen: &Shared<Vec<Seen>>) {
    let s = seen.clone();
    p.on_disconnect(lp, move |lp, w| {
        let mut s = s.borrow_mut();
        let e = &mut s[w.id() as usize - 1];
        e.disconnects += 1;
        e.at_disconnect = Some((
            w.state(lp),
            w.exited_after_disconnect(lp),
            w.is_connected(lp),
        ));
    });
    let (s, p2) = (seen.clone(), *p);
    p.on_exit(lp, move |lp, w, code, signal| {
        let mut s = s.borrow_mut();
        let e = &mut s[w.id() as usize - 1];
        e.exits += 1;
        e.at_exit = Some((
            code,
            signal,
            w.exited_after_disconnect(lp),
            w.is_dead(lp),
            w.state(lp),
        ));
        e.listed_at_exit = p2.worker(lp, w.id()).is_some();
    });
}

/// Runs `n` workers of `settings`, calling `on_msg` with their messages,
/// and returns what each looked like at disconnect and exit.
fn run_workers(
    settings: Settings,
    n: usize,
    on_msg: impl FnMut(&mut Loop, Worker, serde_json::Value) + 'static,
) -> Vec<Seen> {
    let mut lp = Loop::new().unwrap();
    let (p, _log) = primary(&mut lp, settings);
    let seen = shared(vec![Seen::default(); n]);
    watch(&mut lp, &p, &seen);
    let mut on_msg = on_msg;
    p.on_message(&mut lp, move |lp, w, m, _| on_msg(lp, w, m));
    for _ in 0..n {
        let w = p.fork(&mut lp, vec![]).unwrap();
        assert!(
            w.is_connected(&lp) && !w.is_dead(&lp),
            "isconnected / isdead"
        );
    }
    run(&mut lp, 30_000);
    assert!(p.workers(&lp).is_empty());
    assert_loop_empty(&lp);
    seen.take()
}

fn listen_then(how: &str) -> Settings {
    let mut s = node_worker("listen_then", RR);
    s.env.as_mut().unwrap().extend(env(&[("HOW", how)]));
    s
}

const D: WorkerState = WorkerState::Disconnected;

/// test-cluster-kill-disconnect, disconnect-exitedAfterDisconnect-race,
/// worker-destroy, isconnected, isdead: a worker-side `disconnect()`,
/// `kill()` or `destroy()` gives exitedAfterDisconnect true at both
/// `disconnect` and `exit`, exit (0, null), one of each event.
#[test]
fn worker_side_disconnect_kill_destroy() {
    for how in ["disconnect", "kill", "destroy", "disconnect_then_destroy"] {
        let s = run_workers(listen_then(how), 1, |_, _, _| {});
        let s = &s[0];
        assert_eq!((s.disconnects, s.exits), (1, 1), "{how}: {s:?}");
        assert_eq!(s.at_disconnect, Some((D, Some(true), false)), "{how}");
        let (code, signal, ead, dead, state) = s.at_exit.unwrap();
        assert_eq!(
            (code, signal, ead, dead, state),
            (Some(0), None, Some(true), true, WorkerState::Dead),
            "{how}"
        );
        assert!(!s.listed_at_exit, "{how}");
    }
}

/// test-cluster-process-disconnect, worker-exit, worker-death: a raw
/// `process.disconnect()` exits (0, null); `process.exit(42)` gives exactly
/// one disconnect and one exit, (42, null), exitedAfterDisconnect false.
#[test]
fn process_disconnect_and_exit_42() {
    let s = run_workers(listen_then("process_disconnect"), 1, |_, _, _| {});
    assert_eq!((s[0].disconnects, s[0].exits), (1, 1));
    let e = s[0].at_exit.unwrap();
    assert_eq!((e.0, e.1), (Some(0), None));
    let s = run_workers(listen_then("exit42"), 1, |_, _, _| {});
    assert_eq!((s[0].disconnects, s[0].exits), (1, 1));
    assert_eq!(s[0].at_disconnect, Some((D, Some(false), false)));
    let e = s[0].at_exit.unwrap();
    assert_eq!((e.0, e.1, e.2, e.3), (Some(42), None, Some(false), true));
}

/// test-cluster-worker-kill, worker-kill-signal, kill-infinite-loop:
/// SIGKILL from the primary gives (null, SIGKILL), exitedAfterDisconnect
/// false, one disconnect and one exit, the worker gone from `workers` at
/// exit; a busy-looping worker dies of the default SIGTERM.
#[test]
fn primary_kill_sigkill_and_sigterm_of_a_busy_loop() {
    let mut lp = Loop::new().unwrap();
    let (p, _log) = primary(&mut lp, listen_then("none"));
    let seen = shared(vec![Seen::default()]);
    watch(&mut lp, &p, &seen);
    p.on_listening(&mut lp, |lp, w, _| {
        w.kill(lp, Some(Signum::SIGKILL)).unwrap()
    });
    p.fork(&mut lp, vec![]).unwrap();
    run(&mut lp, 20_000);
    let s = &seen.borrow()[0];
    assert_eq!((s.disconnects, s.exits), (1, 1));
    assert_eq!(s.at_disconnect.unwrap().1, Some(false));
    let e = s.at_exit.unwrap();
    assert_eq!((e.0, e.1, e.2), (None, Some(Signum::SIGKILL), Some(false)));
    assert!(!s.listed_at_exit);
    assert_loop_empty(&lp);

    let s = run_workers(node_worker("loop", RR), 1, |lp, w, m| {
        assert_eq!(m["op"], "looping");
        w.kill(lp, None).unwrap();
    });
    let e = s[0].at_exit.unwrap();
    assert_eq!((e.0, e.1, e.2), (None, Some(Signum::SIGTERM), Some(false)));
}

fn idle(exit_in_disconnect: bool) -> Settings {
    let mut s = node_worker("idle", RR);
    if exit_in_disconnect {
        s.env
            .as_mut()
            .unwrap()
            .extend(env(&[("EXIT_IN_DISCONNECT", "1")]));
    }
    s
}

/// test-cluster-worker-disconnect, worker-forced-exit: after the primary's
/// `worker.disconnect()` the worker is not forced out (its own handler
/// exits 42), the primary sees state disconnected and
/// exitedAfterDisconnect true; after a raw channel disconnect the worker is
/// forced to exit 0.
#[test]
fn primary_disconnect_and_forced_exit() {
    let s = run_workers(idle(true), 1, |lp, w, m| {
        assert_eq!(m["connected"], true);
        w.disconnect(lp);
    });
    assert_eq!(s[0].at_disconnect, Some((D, Some(true), false)));
    let e = s[0].at_exit.unwrap();
    assert_eq!((e.0, e.1, e.2), (Some(42), None, Some(true)));

    let s = run_workers(idle(false), 1, |lp, w, _| {
        w.channel(lp).unwrap().disconnect(lp);
    });
    assert_eq!((s[0].disconnects, s[0].exits), (1, 1));
    let e = s[0].at_exit.unwrap();
    assert_eq!((e.0, e.1), (Some(0), None));
}

/// test-cluster-disconnect-before-exit, disconnect-idle-worker,
/// concurrent-disconnect, call-and-destroy: `cluster.disconnect()` inside
/// the first worker's 'disconnect' skips the disconnected one and its
/// callback runs once all are gone; many workers disconnecting or
/// destroying themselves at once all exit 0; `kill` in the primary's
/// 'disconnect' handler after a worker-initiated disconnect is safe.
#[test]
fn disconnect_before_exit_concurrent_and_call_and_destroy() {
    let mut lp = Loop::new().unwrap();
    let (p, _log) = primary(&mut lp, idle(false));
    let ready = Counter::new();
    let cb = Counter::new();
    let (c, p2) = (cb.clone(), p);
    let first = Counter::new();
    p.on_disconnect(&mut lp, move |lp, w| {
        first.hit();
        if first.get() == 1 {
            assert_eq!(w.id(), 1);
            let c = c.clone();
            p2.disconnect(lp, move |_| c.hit());
        }
    });
    let ws: Vec<Worker> = (0..3).map(|_| p.fork(&mut lp, vec![]).unwrap()).collect();
    let w1 = ws[0];
    let r = ready.clone();
    let p3 = p;
    p.on_message(&mut lp, move |lp, _, _, _| {
        r.hit();
        if r.get() == 3 {
            w1.disconnect(lp);
            assert_eq!(
                p3.workers(lp).len(),
                2,
                "a disconnected worker leaves `workers`"
            );
        }
    });
    run(&mut lp, 20_000);
    assert_eq!(cb.get(), 1);
    for w in &ws {
        assert_eq!(w.exit_status(&lp), Some((Some(0), None)));
    }
    assert_loop_empty(&lp);

    // Concurrent: 6 workers, half disconnect and half destroy themselves.
    let mut lp = Loop::new().unwrap();
    let (p, _log) = primary(&mut lp, listen_then("disconnect"));
    let ws: Vec<Worker> = (0..6)
        .map(|i| {
            let how = if i % 2 == 0 { "disconnect" } else { "destroy" };
            p.fork(&mut lp, env(&[("HOW", how)])).unwrap()
        })
        .collect();
    // call-and-destroy: kill from the primary's 'disconnect' handler.
    p.on_disconnect(&mut lp, |lp, w| {
        assert!(!w.is_connected(lp));
        let _ = w.kill(lp, None);
    });
    run(&mut lp, 30_000);
    for w in &ws {
        let (code, signal) = w.exit_status(&lp).unwrap();
        assert!(
            code == Some(0) || signal == Some(Signum::SIGTERM),
            "worker {}: {code:?} {signal:?}",
            w.id()
        );
        assert_eq!(w.exited_after_disconnect(&lp), Some(true));
    }
    assert_loop_empty(&lp);
}

/// test-cluster-disconnect: 8 workers × 2 servers serve traffic, then
/// `cluster.disconnect(cb)`; repeated to confirm the cleanup.
#[test]
fn disconnect_8_workers_2_servers_repeated() {
    for round in 0..2 {
        let mut lp = Loop::new().unwrap();
        let mut s = node_worker("two_servers", RR);
        s.env
            .as_mut()
            .unwrap()
            .extend(env(&[("PORT1", "0"), ("PORT2", "0")]));
        let (p, _log) = primary(&mut lp, s);
        let ports = shared(Vec::<u64>::new());
        let served = Counter::new();
        let (pp, sv, p2) = (ports.clone(), served.clone(), p);
        let cb = Counter::new();
        let c = cb.clone();
        p.on_message(&mut lp, move |lp, _, m, _| {
            assert_eq!(m["op"], "listening2", "{m}");
            let mut mine: Vec<u64> = m["ports"]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_u64().unwrap())
                .collect();
            mine.sort();
            let all = {
                let mut pp = pp.borrow_mut();
                pp.extend(mine);
                pp.len() == 16
            };
            if !all {
                return;
            }
            let mut uniq = pp.borrow().clone();
            uniq.sort();
            uniq.dedup();
            assert_eq!(uniq.len(), 2, "two ports shared by all workers");
            for &port in &uniq {
                for _ in 0..4 {
                    let (sv, p2, c) = (sv.clone(), p2, c.clone());
                    fetch(
                        lp,
                        &Target::Tcp(localhost(port as u16)),
                        b"",
                        move |lp, r| {
                            assert!(!r.unwrap().is_empty());
                            sv.hit();
                            if sv.get() == 8 {
                                p2.disconnect(lp, move |_| c.hit());
                            }
                        },
                    );
                }
            }
        });
        let ws: Vec<Worker> = (0..8).map(|_| p.fork(&mut lp, vec![]).unwrap()).collect();
        run(&mut lp, 60_000);
        assert_eq!((served.get(), cb.get()), (8, 1), "round {round}");
        for w in &ws {
            assert_eq!(w.exit_status(&lp), Some((Some(0), None)));
        }
        assert!(p.workers(&lp).is_empty());
        assert_loop_empty(&lp);
    }
}

/// test-cluster-worker-no-exit, worker-wait-server-close: after the
/// primary disconnects it, a worker holding an open client connection
/// stays alive (and its 'disconnect' waits for the server to close) until
/// the client closes.
#[test]
fn no_exit_while_a_connection_is_open_node_worker() {
    no_exit(node_worker("hold", RR));
}

/// The same with a Rust worker.
#[test]
fn no_exit_while_a_connection_is_open_rust_worker() {
    no_exit(rust_worker("helper_hold", RR));
}

#[test]
fn helper_hold() {
    as_worker("helper_hold", |lp, _| {
        let s = Server::new(lp, |lp, s, c| {
            let uvcluster::uv::Stream::Tcp(t) = c else {
                unreachable!()
            };
            let pid = std::process::id().to_string();
            lp.write(t, &[pid.as_bytes()], |_, _, _| {}).unwrap();
            lp.read_start(t, move |lp, t, r| {
                if !matches!(r, Ok(d) if !d.is_empty()) {
                    s.close_connection(lp, uvcluster::uv::Stream::Tcp(t));
                }
            })
            .unwrap();
        });
        s.listen(lp, ListenOptions::port(0), |_, _, r| {
            r.unwrap();
        })
        .unwrap();
    });
}

fn no_exit(settings: Settings) {
    let mut lp = Loop::new().unwrap();
    let (p, log) = primary(&mut lp, settings);
    let l = log.clone();
    p.on_listening(&mut lp, move |lp, w, addr| {
        l.push("listening:1");
        let port = addr.port.unwrap() as u16;
        let h = lp.tcp_init();
        let (w, l) = (w, l.clone());
        lp.tcp_connect(h, localhost(port), move |lp, h, r| {
            r.unwrap();
            let (w, l) = (w, l.clone());
            let mut got = false;
            lp.read_start(h, move |lp, h, r| {
                if got {
                    assert!(matches!(r, Ok([])), "EOF after the client closes");
                    return;
                }
                got = true;
                assert_eq!(r.unwrap(), w.pid(lp).unwrap().to_string().as_bytes());
                w.disconnect(lp);
                // An observation window, not synchronisation: the worker
                // must still be there, and connected, after it.
                let t = lp.timer_init();
                let (w, l) = (w, l.clone());
                lp.timer_start(
                    t,
                    Duration::from_millis(300),
                    Duration::ZERO,
                    move |lp, t| {
                        lp.close(t, |_| {}).unwrap();
                        assert!(!w.is_dead(lp), "the worker stayed alive");
                        l.push("client-close:1");
                        lp.close(h, |_| {}).unwrap();
                    },
                )
                .unwrap();
            })
            .unwrap();
        })
        .unwrap();
    });
    let w = p.fork(&mut lp, vec![]).unwrap();
    run(&mut lp, 20_000);
    assert_eq!(
        events(&log, 1),
        [
            "fork",
            "online",
            "listening",
            "client-close",
            "disconnect",
            "exit"
        ]
    );
    assert_eq!(w.exit_status(&lp), Some((Some(0), None)));
    assert_eq!(w.exited_after_disconnect(&lp), Some(true));
    assert_loop_empty(&lp);
}

// ----- a real Node primary with Rust workers ----------------------------------

/// test-cluster-primary-kill: the primary exits; the Rust worker exits on
/// the channel's EOF.
#[test]
fn node_primary_exits_and_the_rust_worker_follows() {
    let v = node_primary("primary_kill", &[]);
    let pid = nix::unistd::Pid::from_raw(v["pid"].as_i64().unwrap() as i32);
    // The worker is not our child, so nothing tells us when it goes: check
    // on a loop timer, driving the loop to a deadline.
    let mut lp = uvcluster::uv::Loop::new().unwrap();
    let tick = lp.timer_init();
    lp.timer_start(
        tick,
        Duration::from_millis(5),
        Duration::from_millis(5),
        |_, _| {},
    )
    .unwrap();
    util::run_until(&mut lp, 10_000, move |_| {
        nix::sys::signal::kill(pid, None).is_err()
    });
    lp.close(tick, |_| {}).unwrap();
    lp.run(uvcluster::uv::RunMode::Default).unwrap();
}

#[test]
fn helper_primary_kill() {
    as_worker("helper_primary_kill", |lp, w| {
        w.send(lp, &json!({"pid": std::process::id()}), None)
            .unwrap();
    });
}

/// test-cluster-worker-disconnect, worker-forced-exit, worker-kill,
/// kill-signal, kill-infinite-loop, worker-death, process-disconnect
/// (Node primary's view of Rust workers).
#[test]
fn node_primary_lifecycle_of_rust_workers() {
    let v = node_primary("lifecycle", &[]);
    assert_eq!(
        v["exits"],
        json!({
            "disconnect": [0, null, true],
            "raw": [0, null, false],
            "sigkill": [null, "SIGKILL", false],
            "sigterm": [null, "SIGTERM", false],
            "exit42": [42, null, false],
            "process_disconnect": [0, null, false],
        }),
        "{v}"
    );
}

#[test]
fn helper_lifecycle() {
    as_worker("helper_lifecycle", |lp, w| {
        let how = std::env::var("HOW").unwrap();
        let s = Server::new(lp, |lp, s, c| s.close_connection(lp, c));
        s.listen(lp, ListenOptions::port(0), move |lp, _, r| {
            r.unwrap();
            match how.as_str() {
                "exit42" => uvcluster::net::defer(lp, |_| std::process::exit(42)),
                "process_disconnect" => {
                    let ch = w.channel(lp).unwrap();
                    uvcluster::net::defer(lp, move |lp| ch.disconnect(lp));
                }
                "busy" => uvcluster::net::defer(lp, |_| {
                    #[allow(clippy::empty_loop)]
                    loop {}
                }),
                _ => {}
            }
        })
        .unwrap();
    });
}
