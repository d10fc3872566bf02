//! Dispatch modes beyond Node: `ReusePort`, `LeastConnections` and a user
//! scheduler, each serving traffic through real Node workers
//! (tests/node/cluster_worker.js, `SERVER=net`: it writes its pid and ends
//! the connection, or holds it with `HOLD=1`) and through Rust workers (this
//! test binary re-run as `helper_pid_server`, which does the same).

mod util;

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::ffi::OsString;
use std::hash::{DefaultHasher, Hash, Hasher};
use std::path::PathBuf;
use std::rc::Rc;
use std::time::Duration;

use util::*;
use uvcluster::cluster::{
    self, ClusterError, ConnInfo, HandoffFailure, HandoffOutcome, Primary, SchedulingPolicy,
    Settings, WorkerLoad,
};
use uvcluster::net::{ListenOptions, Server};
use uvcluster::uv::{BindFlags, Handle, Loop, ProcessOptions, RunMode, Stream, Tcp};

#[derive(Clone, Copy, Debug, PartialEq)]
enum Workers {
    Node,
    Rust,
}

fn settings(kind: Workers, policy: SchedulingPolicy, hold: bool) -> Settings {
    let mut env: Vec<(OsString, OsString)> = vec![("SERVER".into(), "net".into())];
    if hold {
        env.push(("HOLD".into(), "1".into()));
    }
    match kind {
        Workers::Node => {
            require_node();
            Settings {
                exec_path: Some("node".into()),
                exec: Some(
                    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
                        .join("tests/node/cluster_worker.js")
                        .into(),
                ),
                exec_argv: Some(vec![]),
                args: Some(vec![]),
                env: Some(env),
                scheduling_policy: Some(policy),
                ..Settings::default()
            }
        }
        Workers::Rust => {
            env.push(("UVCLUSTER_TEST_HELPER".into(), "helper_pid_server".into()));
            Settings {
                exec_path: Some(std::env::current_exe().unwrap().into()),
                args: Some(
                    [
                        "helper_pid_server",
                        "--exact",
                        "--nocapture",
                        "--test-threads=1",
                    ]
                    .map(OsString::from)
                    .to_vec(),
                ),
                env: Some(env),
                scheduling_policy: Some(policy),
                // The helper's test-harness output would mix with ours.
                silent: Some(true),
                ..Settings::default()
            }
        }
    }
}

/// The Rust worker: writes its pid on each connection, then ends it (or,
/// with `HOLD`, writes it once the client sends something, and keeps the
/// connection open). With `NOFILE_HEADROOM=<n>` it can hold only n
/// connections once listening.
#[test]
fn helper_pid_server() {
    if !is_helper("helper_pid_server") {
        return;
    }
    let mut lp = Loop::new().unwrap();
    cluster::setup_worker(&mut lp).unwrap().expect("a worker");
    let hold = std::env::var("HOLD").is_ok();
    let pid = std::process::id().to_string();
    let server = Server::new(&mut lp, move |lp, s, conn| {
        let Stream::Tcp(t) = conn else { return };
        if !hold {
            lp.write(t, &[pid.as_bytes()], move |lp, t, _| {
                s.close_connection(lp, Stream::Tcp(t));
            })
            .unwrap();
            return;
        }
        // Write the pid when asked, at the end of that loop iteration, and
        // keep the connection open until the client goes. (A Rust worker
        // answers the primary's `newconn` at the end of the iteration after
        // the one that accepted; the request is read no earlier, so the
        // answer goes out first, and a client opening connections one after
        // another sees each placed with the previous one counted.)
        let pid = pid.clone();
        let mut asked = false;
        lp.read_start(t, move |lp, t, r| match r {
            Ok(d) if !d.is_empty() => {
                if !asked {
                    asked = true;
                    let pid = pid.clone();
                    let timer = lp.timer_init();
                    lp.timer_start(timer, Duration::ZERO, Duration::ZERO, move |lp, timer| {
                        lp.close(timer, |_| {}).unwrap();
                        let _ = lp.write(t, &[pid.as_bytes()], |_, _, _| {});
                    })
                    .unwrap();
                }
                // `stall <port>`: a handler that keeps this loop busy (in
                // a blocking read) until the test at <port> says go.
                let msg = String::from_utf8_lossy(d);
                if let Some(port) = msg.trim().strip_prefix("stall ") {
                    let port: u16 = port.parse().unwrap();
                    let mut go = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
                    let _ = std::io::Read::read(&mut go, &mut [0u8; 1]);
                }
            }
            _ => s.close_connection(lp, Stream::Tcp(t)),
        })
        .unwrap();
    });
    server
        .listen(&mut lp, ListenOptions::port(0), |_, _, r| {
            r.unwrap();
            // `NOFILE_HEADROOM=<n>`: from now on, room for n more fds
            // (RLIMIT_NOFILE), so n connections: a worker at its fd limit.
            if let Ok(n) = std::env::var("NOFILE_HEADROOM") {
                leave_fds(n.parse().unwrap());
            }
        })
        .unwrap();
    lp.run(RunMode::Default).unwrap();
}

type Pids = Rc<RefCell<Vec<String>>>;

/// Opens `n` connections to `port` on the loop; each records the pid the
/// worker wrote. Held connections stay open (returned) once their pid came.
fn connect_many(
    lp: &mut Loop,
    port: u16,
    n: usize,
    pids: &Pids,
    held: &Rc<RefCell<Vec<Handle<Tcp>>>>,
    hold: bool,
    ask: bool,
) {
    for _ in 0..n {
        let c = lp.tcp_init();
        let (pids, held) = (pids.clone(), held.clone());
        lp.tcp_connect(c, ([127, 0, 0, 1], port).into(), move |lp, c, r| {
            r.unwrap();
            if ask {
                lp.write(c, &[b"pid?\n"], |_, _, _| {}).unwrap();
            }
            let mut buf = Vec::new();
            lp.read_start(c, move |lp, c, r| {
                let data = r.unwrap();
                if !data.is_empty() {
                    buf.extend_from_slice(data);
                    if hold {
                        pids.borrow_mut()
                            .push(String::from_utf8_lossy(&buf).into_owned());
                        lp.read_stop(c).unwrap();
                        held.borrow_mut().push(c);
                    }
                    return;
                }
                pids.borrow_mut()
                    .push(String::from_utf8_lossy(&buf).into_owned());
                lp.close(c, |_| {}).unwrap();
            })
            .unwrap();
        })
        .unwrap();
    }
}

/// Opens `n` connections to `port` one after another (each once the
/// previous one's pid came) and holds them; `ask`: ask for the pid (a
/// held Rust worker's connection, see `helper_pid_server`).
fn connect_one_by_one(
    lp: &mut Loop,
    port: u16,
    n: usize,
    pids: &Pids,
    held: &Rc<RefCell<Vec<Handle<Tcp>>>>,
    ask: bool,
) {
    if n == 0 {
        return;
    }
    let c = lp.tcp_init();
    let (pids, held) = (pids.clone(), held.clone());
    lp.tcp_connect(c, ([127, 0, 0, 1], port).into(), move |lp, c, r| {
        r.unwrap();
        if ask {
            lp.write(c, &[b"pid?\n"], |_, _, _| {}).unwrap();
        }
        lp.read_start(c, move |lp, c, r| {
            let data = r.unwrap();
            assert!(!data.is_empty(), "the worker ended a held connection");
            pids.borrow_mut()
                .push(String::from_utf8_lossy(data).into_owned());
            lp.read_stop(c).unwrap();
            held.borrow_mut().push(c);
            connect_one_by_one(lp, port, n - 1, &pids, &held, ask);
        })
        .unwrap();
    })
    .unwrap();
}

fn counts(pids: &[String]) -> BTreeMap<String, usize> {
    let mut m = BTreeMap::new();
    for p in pids {
        *m.entry(p.clone()).or_default() += 1;
    }
    m
}

/// Two workers; once both listen, `n` connections; returns the pids seen.
fn serve(
    kind: Workers,
    policy: SchedulingPolicy,
    (mut lp, primary): (Loop, Primary),
    n: usize,
) -> Vec<String> {
    primary.setup_primary(&mut lp, settings(kind, policy, false));
    primary.on_error(&mut lp, |_, w, e| {
        panic!("worker {:?}: {e}", w.map(|w| w.id()))
    });
    let pids: Pids = Rc::default();
    let held = Rc::default();
    let listening = Counter::new();
    let (p2, l2) = (pids.clone(), listening.clone());
    primary.on_listening(&mut lp, move |lp, _, a| {
        l2.hit();
        if l2.get() == 2 {
            connect_many(lp, a.port.unwrap() as u16, n, &p2, &held, false, false);
        }
    });
    let (p3, prim) = (pids.clone(), primary);
    let done = lp.check_init();
    lp.check_start(done, move |lp, c| {
        if p3.borrow().len() == n {
            prim.disconnect(lp, |_| {});
            lp.close(c, |_| {}).unwrap();
        }
    })
    .unwrap();
    fork_two_and_run(&mut lp, &primary);
    pids.take()
}

/// Forks two workers and runs the loop until everything has closed.
fn fork_two_and_run(lp: &mut Loop, primary: &Primary) {
    for _ in 0..2 {
        primary.fork(lp, vec![]).unwrap();
    }
    run_with_deadline(lp, 30_000);
    assert_loop_empty(lp);
}

/// A loop and a primary kept in it.
fn new_primary() -> (Loop, Primary) {
    let mut lp = Loop::new().unwrap();
    let p = Primary::new(&mut lp);
    (lp, p)
}

fn both_serve(kind: Workers, policy: SchedulingPolicy) {
    let pids = serve(kind, policy, new_primary(), 40);
    assert_eq!(pids.len(), 40);
    let c = counts(&pids);
    assert_eq!(c.len(), 2, "both workers served: {c:?}");
}

/// Round-robin with a handoff window of 4: each worker may be sent four
/// connections before it answers. Node workers see the messages a Node
/// primary sends (one fd at a time, each after the previous one's ACK) and
/// serve as usual; so do Rust workers.
fn a_window_of_4_serves(kind: Workers) {
    let (mut lp, p) = new_primary();
    p.set_handoff_window(&mut lp, 4);
    let pids = serve(kind, SchedulingPolicy::RoundRobin, (lp, p), 40);
    assert_eq!(pids.len(), 40);
    let c = counts(&pids);
    assert_eq!(c.len(), 2, "both workers served: {c:?}");
}

#[test]
fn round_robin_with_a_handoff_window_of_4_serves_through_node_workers() {
    a_window_of_4_serves(Workers::Node);
}

#[test]
fn round_robin_with_a_handoff_window_of_4_serves_through_rust_workers() {
    a_window_of_4_serves(Workers::Rust);
}

#[test]
fn reuse_port_serves_through_node_workers() {
    both_serve(Workers::Node, SchedulingPolicy::ReusePort);
}

#[test]
fn reuse_port_serves_through_rust_workers() {
    both_serve(Workers::Rust, SchedulingPolicy::ReusePort);
}

#[test]
fn least_connections_serves_through_node_workers() {
    both_serve(Workers::Node, SchedulingPolicy::LeastConnections);
}

#[test]
fn least_connections_serves_through_rust_workers() {
    both_serve(Workers::Rust, SchedulingPolicy::LeastConnections);
}

#[test]
fn user_scheduler_sticky_by_client_ip() {
    for kind in [Workers::Rust, Workers::Node] {
        let (mut lp, p) = new_primary();
        let calls = Counter::new();
        let c = calls.clone();
        p.set_scheduler(&mut lp, move |conn: &ConnInfo, workers: &[WorkerLoad]| {
            c.hit();
            let ip = conn.peer?.ip();
            assert!(ip.is_loopback());
            let mut h = DefaultHasher::new();
            ip.hash(&mut h);
            Some(workers[h.finish() as usize % workers.len()].id)
        });
        let pids = serve(kind, SchedulingPolicy::RoundRobin, (lp, p), 20);
        assert_eq!(calls.get(), 20);
        // Every connection comes from 127.0.0.1: one worker takes them all.
        assert_eq!(counts(&pids).len(), 1, "{kind:?}: {:?}", counts(&pids));
    }
}

/// Worker 1 holds 6 open connections when worker 2 joins; the next 6,
/// opened one after another, go to the less loaded worker 2 under
/// LeastConnections (round-robin would split them 3/3).
fn least_connections_prefers_the_less_loaded(kind: Workers) {
    let mut lp = Loop::new().unwrap();
    let p = Primary::new(&mut lp);
    p.setup_primary(
        &mut lp,
        settings(kind, SchedulingPolicy::LeastConnections, true),
    );
    p.on_error(&mut lp, |_, w, e| {
        panic!("worker {:?}: {e}", w.map(|w| w.id()))
    });
    let pids: Pids = Rc::default();
    let held: Rc<RefCell<Vec<Handle<Tcp>>>> = Rc::default();
    let (p2, h2, prim) = (pids.clone(), held.clone(), p);
    p.on_listening(&mut lp, move |lp, w, a| {
        let port = a.port.unwrap() as u16;
        // Six held connections when each worker starts listening: at
        // once for the first, one after another for the second.
        let _ = &prim;
        if w.id() == 1 {
            connect_many(lp, port, 6, &p2, &h2, true, kind == Workers::Rust);
        } else {
            connect_one_by_one(lp, port, 6, &p2, &h2, kind == Workers::Rust);
        }
    });
    let (p3, prim, h3) = (pids.clone(), p, held.clone());
    let forked = Rc::new(std::cell::Cell::new(false));
    let check = lp.check_init();
    lp.check_start(check, move |lp, c| {
        let n = p3.borrow().len();
        if n == 6 && !forked.get() {
            forked.set(true);
            prim.fork(lp, vec![]).unwrap();
        }
        if n == 12 {
            for h in h3.borrow_mut().drain(..) {
                lp.close(h, |_| {}).unwrap();
            }
            prim.disconnect(lp, |_| {});
            lp.close(c, |_| {}).unwrap();
        }
    })
    .unwrap();
    p.fork(&mut lp, vec![]).unwrap();
    run_with_deadline(&mut lp, 30_000);
    assert_loop_empty(&lp);
    let pids = pids.borrow();
    let first = &pids[0];
    assert!(pids[..6].iter().all(|p| p == first));
    let to_new = pids[6..].iter().filter(|p| *p != first).count();
    assert!(
        to_new >= 5,
        "{kind:?}: the new worker got {to_new} of 6: {pids:?}"
    );
}

#[test]
fn least_connections_prefers_the_less_loaded_node_worker() {
    least_connections_prefers_the_less_loaded(Workers::Node);
}

#[test]
fn least_connections_prefers_the_less_loaded_rust_worker() {
    least_connections_prefers_the_less_loaded(Workers::Rust);
}

/// LeastConnections passes over a worker whose handler keeps its loop
/// busy. A connection whose first request is `stall <port>` makes its
/// worker (P) block until the test answers on <port>. A Rust worker answers
/// `newconn` only after its loop has polled again, so P's answer is held
/// back and P is not known to be free: the next five connections, opened
/// one after another and held, all go to the other worker (Q), first
/// because P is not free and then, as Q grows more loaded than P, because
/// P stays silent past the stall time. Under round-robin, whose workers
/// answer at once, P would look free and take the next connection.
#[test]
fn least_connections_passes_over_a_stuck_rust_worker() {
    let mut lp = Loop::new().unwrap();
    let p = Primary::new(&mut lp);
    p.setup_primary(
        &mut lp,
        settings(Workers::Rust, SchedulingPolicy::LeastConnections, true),
    );
    p.on_error(&mut lp, |_, w, e| {
        panic!("worker {:?}: {e}", w.map(|w| w.id()))
    });
    let pids: Pids = Rc::default();
    let held: Rc<RefCell<Vec<Handle<Tcp>>>> = Rc::default();
    // P connects here once it is stuck; the test releases it by closing.
    let go = lp.tcp_init();
    lp.tcp_bind(go, ([127, 0, 0, 1], 0).into(), BindFlags::default())
        .unwrap();
    let go_port = lp.tcp_getsockname(go).unwrap().port();
    // The stuck connection, a blocking std socket.
    let stuck: Rc<RefCell<Option<std::net::TcpStream>>> = Rc::default();
    let port = Rc::new(std::cell::Cell::new(0u16));
    let listening = Counter::new();
    let (l2, port2, stuck2) = (listening.clone(), port.clone(), stuck.clone());
    p.on_listening(&mut lp, move |_, _, a| {
        l2.hit();
        if l2.get() == 2 {
            port2.set(a.port.unwrap() as u16);
            // A blocking connect and write: the request is there before
            // the primary (on this thread) accepts the connection.
            let mut s = std::net::TcpStream::connect(("127.0.0.1", port2.get())).unwrap();
            std::io::Write::write_all(&mut s, format!("stall {go_port}\n").as_bytes()).unwrap();
            *stuck2.borrow_mut() = Some(s);
        }
    });
    let release: Rc<RefCell<Option<Handle<Tcp>>>> = Rc::default();
    let (r2, p2, h2, port3) = (release.clone(), pids.clone(), held.clone(), port.clone());
    lp.tcp_listen(go, 1, move |lp, _, c| {
        // P is stuck: five more connections, one after another.
        *r2.borrow_mut() = Some(c.unwrap());
        connect_one_by_one(lp, port3.get(), 5, &p2, &h2, true);
    })
    .unwrap();
    let stuck_pid: Rc<RefCell<String>> = Rc::default();
    let (p3, prim, h3, r3) = (pids.clone(), p, held.clone(), release.clone());
    let (s3, sp3) = (stuck.clone(), stuck_pid.clone());
    let done = lp.check_init();
    lp.check_start(done, move |lp, c| {
        if p3.borrow().len() < 5 {
            return;
        }
        // Q served all five while P was stuck: release P, and finish.
        if let Some(h) = r3.borrow_mut().take() {
            lp.close(h, |_| {}).unwrap();
        }
        lp.close(go, |_| {}).unwrap();
        // P writes its pid once unstuck (the release is closed above, and a
        // closed socket's fd goes at once); then the stuck connection ends
        // too.
        let mut s = s3.borrow_mut().take().unwrap();
        s.set_read_timeout(Some(std::time::Duration::from_secs(20)))
            .unwrap();
        let mut buf = [0u8; 32];
        let n = std::io::Read::read(&mut s, &mut buf).unwrap();
        *sp3.borrow_mut() = String::from_utf8_lossy(&buf[..n]).into_owned();
        drop(s);
        for h in h3.borrow_mut().drain(..) {
            lp.close(h, |_| {}).unwrap();
        }
        prim.disconnect(lp, |_| {});
        lp.close(c, |_| {}).unwrap();
    })
    .unwrap();
    fork_two_and_run(&mut lp, &p);
    let stuck_pid = stuck_pid.borrow().clone();
    assert!(!stuck_pid.is_empty());
    let pids = pids.borrow();
    assert_eq!(pids.len(), 5);
    assert!(
        pids.iter().all(|p| *p == pids[0] && *p != stuck_pid),
        "stuck worker {stuck_pid}; the next five went to {pids:?}"
    );
}

#[test]
fn policy_names() {
    for (name, p) in [
        ("rr", SchedulingPolicy::RoundRobin),
        ("none", SchedulingPolicy::None),
        ("reuseport", SchedulingPolicy::ReusePort),
        ("leastconn", SchedulingPolicy::LeastConnections),
    ] {
        assert_eq!(SchedulingPolicy::parse(name), Some(p));
        assert_eq!(p.as_str(), name);
    }
    assert_eq!(SchedulingPolicy::parse("fastest"), None);
}

// ----- a worker at its fd limit (issue 10, part 4) ---------------------------
//
// A worker with no fd left gets a `newconn` whose fd the kernel drops
// (`MSG_CTRUNC`) and answers `NODE_HANDLE_NACK`. Node's round-robin handle
// (and ours, before) then waited forever for an answer that never came: the
// worker got no other connection, and with one worker the service was
// down. Each test runs alone in its own process (`util::isolated`) so that
// the primary's fds can be checked against their baseline afterwards.

/// The dispatch a handoff test runs under.
#[derive(Clone, Copy, Debug)]
enum Dispatch {
    RoundRobin,
    LeastConnections,
    /// A user scheduler that prefers worker 1 whenever it is there.
    PreferFirst,
}

/// What a handoff report says: the worker, how the handoff ended, what
/// became of the connection, and how many connections.
type HandoffReport = (Option<u32>, HandoffFailure, HandoffOutcome, usize);

/// A primary of Rust workers that hold their connections (`HOLD`) under
/// `d`. Handoff reports are recorded, `then` runs after each; any other
/// error fails the test.
fn holding_primary(
    lp: &mut Loop,
    d: Dispatch,
    then: impl Fn(&mut Loop, &[HandoffReport]) + 'static,
) -> (Primary, Rc<RefCell<Vec<HandoffReport>>>) {
    let p = Primary::new(lp);
    let policy = match d {
        Dispatch::LeastConnections => SchedulingPolicy::LeastConnections,
        Dispatch::RoundRobin | Dispatch::PreferFirst => SchedulingPolicy::RoundRobin,
    };
    if let Dispatch::PreferFirst = d {
        p.set_scheduler(lp, |_, loads| loads.iter().any(|l| l.id == 1).then_some(1));
    }
    p.setup_primary(lp, settings(Workers::Rust, policy, true));
    let reports: Rc<RefCell<Vec<HandoffReport>>> = Rc::default();
    let r = reports.clone();
    p.on_error(lp, move |lp, w, e| {
        let ClusterError::Handoff {
            failure,
            outcome,
            connections,
        } = e
        else {
            panic!("worker {:?}: {e}", w.map(|w| w.id()));
        };
        r.borrow_mut()
            .push((w.map(|w| w.id()), *failure, *outcome, *connections));
        let all = r.borrow().clone();
        then(lp, &all);
    });
    (p, reports)
}

/// Opens what lives as long as the loop or the process (the SIGCHLD pipe,
/// the spare fd of the EMFILE trick) and returns the open-fd count then.
fn fd_baseline(lp: &mut Loop) -> usize {
    let t = lp.tcp_init();
    lp.tcp_bind(t, ([127, 0, 0, 1], 0).into(), BindFlags::default())
        .unwrap();
    lp.tcp_listen(t, 1, |_, _, _| {}).unwrap();
    lp.close(t, |_| {}).unwrap();
    lp.spawn(ProcessOptions::new("true").on_exit(|lp, p, _, _| {
        lp.close(p, |_| {}).unwrap();
    }))
    .unwrap();
    run_with_deadline(lp, 10_000);
    open_fds()
}

/// Sets this process's RLIMIT_NOFILE so that exactly `n` more fds can be
/// opened: the limit bounds fd numbers, so it goes just past the n-th
/// number not in use (the listing's own fd is closed by then).
fn leave_fds(n: usize) {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let open: std::collections::BTreeSet<u64> = std::fs::read_dir("/proc/self/fd")
        .unwrap()
        .filter_map(|e| {
            let e = e.ok()?;
            let to = std::fs::read_link(e.path()).ok()?;
            let listing = to.starts_with("/proc") && to.ends_with("fd");
            (!listing).then(|| e.file_name().to_str()?.parse().ok())?
        })
        .collect();
    let limit = match n {
        0 => (0..).find(|f| !open.contains(f)).unwrap(),
        n => (0..).filter(|f| !open.contains(f)).nth(n - 1).unwrap() + 1,
    };
    let (_, hard) = getrlimit(Resource::RLIMIT_NOFILE).unwrap();
    setrlimit(Resource::RLIMIT_NOFILE, limit, hard).unwrap();
}

/// A Rust worker with no fd left before it listens (`LISTEN=tcp|udp`):
/// tells the primary how its listen (or bind) ended, `{"listen": "ok"}` or
/// `{"listen": <code>}`, and stays until disconnected.
#[test]
fn helper_listen_out_of_fds() {
    if !is_helper("helper_listen_out_of_fds") {
        return;
    }
    let mut lp = Loop::new().unwrap();
    let w = cluster::setup_worker(&mut lp).unwrap().expect("a worker");
    leave_fds(0);
    let report = move |lp: &mut Loop, r: Result<(), String>| {
        let v = serde_json::json!({ "listen": r.err().unwrap_or_else(|| "ok".into()) });
        w.send(lp, &v, None).unwrap();
    };
    if std::env::var("LISTEN").as_deref() == Ok("udp") {
        uvcluster::net::bind_dgram(&mut lp, Default::default(), move |lp, r| {
            if let Ok(u) = &r {
                lp.close(*u, |_| {}).unwrap();
            }
            report(lp, r.map(|_| ()).map_err(|e| e.code));
        });
    } else {
        let server = Server::new(&mut lp, |lp, s, c| s.close_connection(lp, c));
        server
            .listen(&mut lp, ListenOptions::port(0), move |lp, _, r| {
                report(lp, r.map(|_| ()).map_err(|e| e.code.clone()));
            })
            .unwrap();
    }
    lp.run(RunMode::Default).unwrap();
}

/// A worker at its fd limit asks for a shared socket (`SCHED_NONE`,
/// `ReusePort`, UDP): the socket is NACKed, and its listen fails with
/// `EMFILE`, reported on both sides, instead of waiting forever for a
/// reply the primary had sent (as a Node worker does).
fn listen_out_of_fds_fails_with_emfile(policy: SchedulingPolicy, listen: &str) {
    let mut lp = Loop::new().unwrap();
    let baseline = fd_baseline(&mut lp);
    let p = Primary::new(&mut lp);
    p.setup_primary(
        &mut lp,
        Settings {
            exec_path: Some(std::env::current_exe().unwrap().into()),
            args: Some(
                [
                    "helper_listen_out_of_fds",
                    "--exact",
                    "--nocapture",
                    "--test-threads=1",
                ]
                .map(OsString::from)
                .to_vec(),
            ),
            env: Some(vec![
                (
                    "UVCLUSTER_TEST_HELPER".into(),
                    "helper_listen_out_of_fds".into(),
                ),
                ("LISTEN".into(), listen.into()),
            ]),
            scheduling_policy: Some(policy),
            silent: Some(true),
            ..Settings::default()
        },
    );
    let errors: Rc<RefCell<Vec<String>>> = Rc::default();
    let e2 = errors.clone();
    p.on_error(&mut lp, move |_, w, e| {
        assert_eq!(w.map(|w| w.id()), Some(1));
        match e {
            ClusterError::Listen { code, syscall, .. } => {
                e2.borrow_mut().push(format!("{syscall} {code}"))
            }
            other => panic!("unexpected error: {other}"),
        }
    });
    let got: Rc<RefCell<Vec<serde_json::Value>>> = Rc::default();
    let g2 = got.clone();
    p.on_message(&mut lp, move |lp, w, msg, _| {
        g2.borrow_mut().push(msg);
        w.disconnect(lp);
    });
    let w = p.fork(&mut lp, vec![]).unwrap();
    run_with_deadline(&mut lp, 20_000);
    assert_eq!(*got.borrow(), [serde_json::json!({"listen": "EMFILE"})]);
    assert_eq!(*errors.borrow(), ["bind EMFILE"]);
    assert_eq!(w.exit_status(&lp), Some((Some(0), None)));
    assert_loop_empty(&lp);
    assert_eq!(open_fds(), baseline, "the primary's fds are back");
}

#[test]
fn worker_out_of_fds_gets_emfile_from_a_shared_listen() {
    util::isolated("worker_out_of_fds_gets_emfile_from_a_shared_listen", || {
        listen_out_of_fds_fails_with_emfile(SchedulingPolicy::None, "tcp")
    });
}

#[test]
fn worker_out_of_fds_gets_emfile_from_a_reuse_port_listen() {
    util::isolated(
        "worker_out_of_fds_gets_emfile_from_a_reuse_port_listen",
        || listen_out_of_fds_fails_with_emfile(SchedulingPolicy::ReusePort, "tcp"),
    );
}

#[test]
fn worker_out_of_fds_gets_emfile_from_a_cluster_udp_bind() {
    util::isolated(
        "worker_out_of_fds_gets_emfile_from_a_cluster_udp_bind",
        || listen_out_of_fds_fails_with_emfile(SchedulingPolicy::RoundRobin, "udp"),
    );
}

/// Opens `n` connections to `port` that stay idle (nothing sent).
fn connect_idle(lp: &mut Loop, port: u16, n: usize, idle: &Rc<RefCell<Vec<Handle<Tcp>>>>) {
    for _ in 0..n {
        let c = lp.tcp_init();
        let idle = idle.clone();
        lp.tcp_connect(c, ([127, 0, 0, 1], port).into(), move |_, c, r| {
            r.unwrap();
            idle.borrow_mut().push(c);
        })
        .unwrap();
    }
}

/// The case with one worker: it can hold 8 connections; 20 idle
/// clients fill it and the next `newconn` is NACKed. Once the idle clients
/// go, the worker has fds again and serves 5 requests. (Before: no request
/// was ever served, and the primary kept the NACKed connection open.)
fn one_worker_at_its_fd_limit_recovers(d: Dispatch) {
    let mut lp = Loop::new().unwrap();
    let baseline = fd_baseline(&mut lp);
    let idle: Rc<RefCell<Vec<Handle<Tcp>>>> = Rc::default();
    let pids: Pids = Rc::default();
    let held: Rc<RefCell<Vec<Handle<Tcp>>>> = Rc::default();
    let port = Rc::new(std::cell::Cell::new(0u16));
    let (i2, p2, h2, port2) = (idle.clone(), pids.clone(), held.clone(), port.clone());
    let (p, reports) = holding_primary(&mut lp, d, move |lp, all| {
        if all.len() > 1 {
            return;
        }
        // The worker is full: the idle clients go, then 5 requests.
        for c in i2.borrow_mut().drain(..) {
            lp.close(c, |_| {}).unwrap();
        }
        connect_many(lp, port2.get(), 5, &p2, &h2, true, true);
    });
    let (i3, port3) = (idle.clone(), port.clone());
    p.on_listening(&mut lp, move |lp, _, a| {
        port3.set(a.port.unwrap() as u16);
        connect_idle(lp, port3.get(), 20, &i3);
    });
    let done = lp.check_init();
    let (p3, h3, prim) = (pids.clone(), held.clone(), p);
    lp.check_start(done, move |lp, c| {
        if p3.borrow().len() == 5 {
            for h in h3.borrow_mut().drain(..) {
                lp.close(h, |_| {}).unwrap();
            }
            prim.disconnect(lp, |_| {});
            lp.close(c, |_| {}).unwrap();
        }
    })
    .unwrap();
    let w = p
        .fork(&mut lp, vec![("NOFILE_HEADROOM".into(), "8".into())])
        .unwrap();
    run_with_deadline(&mut lp, 30_000);
    let pid = w.pid(&lp).unwrap().to_string();
    assert_eq!(*pids.borrow(), vec![pid; 5], "every request served");
    let reports = reports.borrow();
    assert!(!reports.is_empty());
    for r in reports.iter() {
        assert_eq!(
            *r,
            (
                Some(1),
                HandoffFailure::Rejected,
                HandoffOutcome::Rehanded,
                1
            ),
            "{reports:?}"
        );
    }
    assert_eq!(w.exit_status(&lp), Some((Some(0), None)));
    assert_loop_empty(&lp);
    assert_eq!(open_fds(), baseline, "the primary's fds are back");
}

#[test]
fn one_rust_worker_at_its_fd_limit_recovers_round_robin() {
    util::isolated(
        "one_rust_worker_at_its_fd_limit_recovers_round_robin",
        || one_worker_at_its_fd_limit_recovers(Dispatch::RoundRobin),
    );
}

#[test]
fn one_rust_worker_at_its_fd_limit_recovers_least_connections() {
    util::isolated(
        "one_rust_worker_at_its_fd_limit_recovers_least_connections",
        || one_worker_at_its_fd_limit_recovers(Dispatch::LeastConnections),
    );
}

#[test]
fn one_rust_worker_at_its_fd_limit_recovers_user_scheduler() {
    util::isolated(
        "one_rust_worker_at_its_fd_limit_recovers_user_scheduler",
        || one_worker_at_its_fd_limit_recovers(Dispatch::PreferFirst),
    );
}

/// Two workers, worker 1 able to hold only 3 connections: 40 held
/// connections are all served, worker 1's NACKed ones by worker 2, and
/// worker 1 is not sent more than it can take. (With 12, a loaded machine
/// could let worker 2 answer first every time, so that worker 1 never got
/// a fourth connection to refuse.)
fn the_worker_at_its_fd_limit_is_passed_over(d: Dispatch) {
    const HELD: usize = 40;
    let mut lp = Loop::new().unwrap();
    let baseline = fd_baseline(&mut lp);
    let (p, reports) = holding_primary(&mut lp, d, |_, _| {});
    let pids: Pids = Rc::default();
    let held: Rc<RefCell<Vec<Handle<Tcp>>>> = Rc::default();
    let listening = Counter::new();
    let (l2, p2, h2) = (listening.clone(), pids.clone(), held.clone());
    p.on_listening(&mut lp, move |lp, _, a| {
        l2.hit();
        if l2.get() == 2 {
            connect_many(lp, a.port.unwrap() as u16, HELD, &p2, &h2, true, true);
        }
    });
    let done = lp.check_init();
    let (p3, h3, prim) = (pids.clone(), held.clone(), p);
    lp.check_start(done, move |lp, c| {
        if p3.borrow().len() == HELD {
            for h in h3.borrow_mut().drain(..) {
                lp.close(h, |_| {}).unwrap();
            }
            prim.disconnect(lp, |_| {});
            lp.close(c, |_| {}).unwrap();
        }
    })
    .unwrap();
    let w1 = p
        .fork(&mut lp, vec![("NOFILE_HEADROOM".into(), "3".into())])
        .unwrap();
    let w2 = p.fork(&mut lp, vec![]).unwrap();
    run_with_deadline(&mut lp, 30_000);
    let c = counts(&pids.borrow());
    let by1 = c
        .get(&w1.pid(&lp).unwrap().to_string())
        .copied()
        .unwrap_or(0);
    let by2 = c
        .get(&w2.pid(&lp).unwrap().to_string())
        .copied()
        .unwrap_or(0);
    assert_eq!(by1 + by2, HELD, "{c:?}");
    assert!(by1 <= 3, "{c:?}");
    // One report for worker 1's run of NACKs: it never had fds again
    // before the end.
    assert_eq!(
        *reports.borrow(),
        [(
            Some(1),
            HandoffFailure::Rejected,
            HandoffOutcome::Rehanded,
            1
        )]
    );
    assert_loop_empty(&lp);
    assert_eq!(open_fds(), baseline, "the primary's fds are back");
}

#[test]
fn the_rust_worker_at_its_fd_limit_is_passed_over_round_robin() {
    util::isolated(
        "the_rust_worker_at_its_fd_limit_is_passed_over_round_robin",
        || the_worker_at_its_fd_limit_is_passed_over(Dispatch::RoundRobin),
    );
}

#[test]
fn the_rust_worker_at_its_fd_limit_is_passed_over_least_connections() {
    util::isolated(
        "the_rust_worker_at_its_fd_limit_is_passed_over_least_connections",
        || the_worker_at_its_fd_limit_is_passed_over(Dispatch::LeastConnections),
    );
}

#[test]
fn the_rust_worker_at_its_fd_limit_is_passed_over_user_scheduler() {
    util::isolated(
        "the_rust_worker_at_its_fd_limit_is_passed_over_user_scheduler",
        || the_worker_at_its_fd_limit_is_passed_over(Dispatch::PreferFirst),
    );
}
