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

use util::*;
use uvcluster::cluster::{self, ConnInfo, Primary, SchedulingPolicy, Settings, WorkerLoad};
use uvcluster::net::{Conn, ListenOptions, Server};
use uvcluster::uv::{Handle, Loop, RunMode, Tcp};

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
/// with `HOLD`, keeps it open).
#[test]
fn helper_pid_server() {
    if !is_helper("helper_pid_server") {
        return;
    }
    let mut lp = Loop::new().unwrap();
    cluster::setup_worker(&mut lp).unwrap().expect("a worker");
    let hold = std::env::var("HOLD").is_ok();
    let pid = std::process::id().to_string();
    let server = Server::new(move |lp, s, conn| {
        let Conn::Tcp(t) = conn else { return };
        let s = s.clone();
        lp.write(t, &[pid.as_bytes()], move |lp, t, _| {
            if hold {
                // Keep it open until the client goes.
                let s2 = s.clone();
                let _ = lp.read_start(t, move |lp, t, r| {
                    if !matches!(r, Ok(d) if !d.is_empty()) {
                        s2.close_connection(lp, Conn::Tcp(t));
                    }
                });
            } else {
                s.close_connection(lp, Conn::Tcp(t));
            }
        })
        .unwrap();
    });
    server
        .listen(&mut lp, ListenOptions::port(0), |_, _, r| {
            r.unwrap();
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
) {
    for _ in 0..n {
        let c = lp.tcp_init();
        let (pids, held) = (pids.clone(), held.clone());
        lp.tcp_connect(c, ([127, 0, 0, 1], port).into(), move |lp, c, r| {
            r.unwrap();
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

fn counts(pids: &[String]) -> BTreeMap<String, usize> {
    let mut m = BTreeMap::new();
    for p in pids {
        *m.entry(p.clone()).or_default() += 1;
    }
    m
}

/// Two workers; once both listen, `n` connections; returns the pids seen.
fn serve(kind: Workers, policy: SchedulingPolicy, primary: Primary, n: usize) -> Vec<String> {
    let mut lp = Loop::new().unwrap();
    primary.setup_primary(&mut lp, settings(kind, policy, false));
    primary.on_error(|_, w, e| panic!("worker {:?}: {e}", w.map(|w| w.id())));
    let pids: Pids = Rc::default();
    let held = Rc::default();
    let listening = Counter::new();
    let (p2, l2) = (pids.clone(), listening.clone());
    primary.on_listening(move |lp, _, a| {
        l2.hit();
        if l2.get() == 2 {
            connect_many(lp, a.port.unwrap() as u16, n, &p2, &held, false);
        }
    });
    let (p3, prim) = (pids.clone(), primary.clone());
    let done = lp.check_init();
    lp.check_start(done, move |lp, c| {
        if p3.borrow().len() == n {
            prim.disconnect(lp, |_| {});
            lp.close(c, |_| {}).unwrap();
        }
    })
    .unwrap();
    for _ in 0..2 {
        primary.fork(&mut lp, vec![]).unwrap();
    }
    run_with_deadline(&mut lp, 30_000);
    assert_loop_empty(&lp);
    pids.take()
}

fn both_serve(kind: Workers, policy: SchedulingPolicy) {
    let pids = serve(kind, policy, Primary::new(), 40);
    assert_eq!(pids.len(), 40);
    let c = counts(&pids);
    assert_eq!(c.len(), 2, "both workers served: {c:?}");
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
        let p = Primary::new();
        let calls = Counter::new();
        let c = calls.clone();
        p.set_scheduler(move |conn: &ConnInfo, workers: &[WorkerLoad]| {
            c.hit();
            let ip = conn.peer?.ip();
            assert!(ip.is_loopback());
            let mut h = DefaultHasher::new();
            ip.hash(&mut h);
            Some(workers[h.finish() as usize % workers.len()].id)
        });
        let pids = serve(kind, SchedulingPolicy::RoundRobin, p, 20);
        assert_eq!(calls.get(), 20);
        // Every connection comes from 127.0.0.1: one worker takes them all.
        assert_eq!(counts(&pids).len(), 1, "{kind:?}: {:?}", counts(&pids));
    }
}

/// Worker 1 holds 6 open connections when worker 2 joins; the next 6 go to
/// the less loaded worker 2 under LeastConnections (round-robin would split
/// them 3/3).
fn least_connections_prefers_the_less_loaded(kind: Workers) {
    let mut lp = Loop::new().unwrap();
    let p = Primary::new();
    p.setup_primary(
        &mut lp,
        settings(kind, SchedulingPolicy::LeastConnections, true),
    );
    p.on_error(|_, w, e| panic!("worker {:?}: {e}", w.map(|w| w.id())));
    let pids: Pids = Rc::default();
    let held: Rc<RefCell<Vec<Handle<Tcp>>>> = Rc::default();
    let (p2, h2, prim) = (pids.clone(), held.clone(), p.clone());
    p.on_listening(move |lp, w, a| {
        let port = a.port.unwrap() as u16;
        // Six held connections when each worker starts listening.
        let _ = w;
        connect_many(lp, port, 6, &p2, &h2, true);
        let _ = &prim;
    });
    let (p3, prim, h3) = (pids.clone(), p.clone(), held.clone());
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
