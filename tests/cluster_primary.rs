//! The cluster primary against real Node workers (tests/node/cluster_*.js):
//! round-robin and shared handles, events in Node's order, messages,
//! disconnect and kill, bind errors, UDP, Unix sockets, and the ownership of
//! connections when workers die.

mod util;

use std::cell::RefCell;
use std::collections::{HashMap, HashSet};
use std::ffi::OsString;
use std::io;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::rc::Rc;

use serde_json::{Value, json};
use util::*;
use uvcluster::cluster::protocol::AddressType;
use uvcluster::cluster::{ClusterError, Primary, SchedulingPolicy, Settings, Worker};
use uvcluster::uv::{BindFlags, Handle, Loop, StreamType};

// ----- helpers ---------------------------------------------------------------

fn script(name: &str) -> OsString {
    util::require_node();
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/node")
        .join(name)
        .into_os_string()
}

fn node_settings(name: &str, policy: SchedulingPolicy) -> Settings {
    Settings {
        exec_path: Some("node".into()),
        exec: Some(script(name)),
        exec_argv: Some(vec![]),
        args: Some(vec![]),
        scheduling_policy: Some(policy),
        ..Settings::default()
    }
}

fn env(pairs: &[(&str, &str)]) -> Vec<(OsString, OsString)> {
    pairs
        .iter()
        .map(|(k, v)| (OsString::from(k), OsString::from(v)))
        .collect()
}

type Shared<T> = Rc<RefCell<T>>;
fn shared<T>(t: T) -> Shared<T> {
    Rc::new(RefCell::new(t))
}

/// Logs every primary event as `event:id`, and fails on errors.
fn log_events(p: &Primary, log: &Log) {
    let l = log.clone();
    p.on_fork(move |_, w| l.push(format!("fork:{}", w.id())));
    let l = log.clone();
    p.on_online(move |_, w| l.push(format!("online:{}", w.id())));
    let l = log.clone();
    p.on_listening(move |_, w, _| l.push(format!("listening:{}", w.id())));
    let l = log.clone();
    p.on_disconnect(move |_, w| l.push(format!("disconnect:{}", w.id())));
    let l = log.clone();
    p.on_exit(move |_, w, _, _| l.push(format!("exit:{}", w.id())));
    p.on_error(|_, w, e| panic!("cluster error from {:?}: {e}", w.map(Worker::id)));
}

/// The events of worker `id`, without the id.
fn events_of(log: &Log, id: u32) -> Vec<String> {
    let suffix = format!(":{id}");
    log.joined()
        .split(' ')
        .filter_map(|e| e.strip_suffix(&suffix).map(str::to_owned))
        .collect()
}

fn read_to_end<K: StreamType>(
    lp: &mut Loop,
    h: Handle<K>,
    cb: impl FnOnce(&mut Loop, io::Result<Vec<u8>>) + 'static,
) {
    let mut buf = Vec::new();
    let mut cb = Some(cb);
    lp.read_start(h, move |lp, h, r| {
        let done = match r {
            Ok([]) => Ok(std::mem::take(&mut buf)),
            Ok(d) => {
                buf.extend_from_slice(d);
                return;
            }
            Err(e) => Err(e),
        };
        lp.close(h, |_| {}).unwrap();
        if let Some(cb) = cb.take() {
            cb(lp, done);
        }
    })
    .unwrap();
}

/// Where a client connects, and what it sends first.
#[derive(Clone, Debug)]
enum Target {
    Tcp(SocketAddr),
    Unix(PathBuf),
}

const HTTP_GET: &[u8] = b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n";

/// One client connection on the loop: connect, send `req`, read to EOF.
fn fetch(
    lp: &mut Loop,
    t: &Target,
    req: &'static [u8],
    cb: impl FnOnce(&mut Loop, io::Result<Vec<u8>>) + 'static,
) {
    match t {
        Target::Tcp(addr) => {
            let h = lp.tcp_init();
            lp.tcp_connect(h, *addr, move |lp, h, r| match r {
                Ok(()) => {
                    if !req.is_empty() {
                        lp.write(h, &[req], |_, _, _| {}).unwrap();
                    }
                    read_to_end(lp, h, cb);
                }
                Err(e) => {
                    lp.close(h, |_| {}).unwrap();
                    cb(lp, Err(e));
                }
            })
            .unwrap();
        }
        Target::Unix(path) => {
            let h = lp.pipe_init(false);
            lp.pipe_connect(h, path, move |lp, h, r| match r {
                Ok(()) => {
                    if !req.is_empty() {
                        lp.write(h, &[req], |_, _, _| {}).unwrap();
                    }
                    read_to_end(lp, h, cb);
                }
                Err(e) => {
                    lp.close(h, |_| {}).unwrap();
                    cb(lp, Err(e));
                }
            })
            .unwrap();
        }
    }
}

/// The body of an HTTP response (or the whole of a raw one).
fn body(resp: &[u8]) -> String {
    let s = String::from_utf8_lossy(resp);
    match s.find("\r\n\r\n") {
        Some(i) => s[i + 4..].to_string(),
        None => s.into_owned(),
    }
}

type EachCb = Box<dyn FnMut(&mut Loop, io::Result<Vec<u8>>)>;
type DoneCb = Box<dyn FnOnce(&mut Loop)>;

struct Load {
    target: Target,
    req: &'static [u8],
    total: usize,
    started: usize,
    finished: usize,
    on_each: Option<EachCb>,
    done: Option<DoneCb>,
}

/// Makes `total` connections, `concurrency` at a time, calling `on_each`
/// with every result and `done` after the last.
fn load(
    lp: &mut Loop,
    target: Target,
    req: &'static [u8],
    total: usize,
    concurrency: usize,
    on_each: impl FnMut(&mut Loop, io::Result<Vec<u8>>) + 'static,
    done: impl FnOnce(&mut Loop) + 'static,
) {
    let st = shared(Load {
        target,
        req,
        total,
        started: 0,
        finished: 0,
        on_each: Some(Box::new(on_each)),
        done: Some(Box::new(done)),
    });
    for _ in 0..concurrency.min(total) {
        load_next(lp, &st);
    }
}

fn load_next(lp: &mut Loop, st: &Shared<Load>) {
    let (t, req) = {
        let mut s = st.borrow_mut();
        if s.started == s.total {
            return;
        }
        s.started += 1;
        (s.target.clone(), s.req)
    };
    let st2 = st.clone();
    fetch(lp, &t, req, move |lp, r| {
        let mut each = st2.borrow_mut().on_each.take().unwrap();
        each(lp, r);
        let finished = {
            let mut s = st2.borrow_mut();
            s.on_each = Some(each);
            s.finished += 1;
            s.finished == s.total
        };
        if finished {
            let done = st2.borrow_mut().done.take().unwrap();
            done(lp);
        } else {
            load_next(lp, &st2);
        }
    });
}

fn localhost(port: u16) -> Target {
    Target::Tcp(SocketAddr::from(([127, 0, 0, 1], port)))
}

/// Both policies: two HTTP workers on `listen(0)` share one port, both
/// serve requests, and the events come in Node's order.
fn serve_from_both_workers(policy: SchedulingPolicy) {
    let mut lp = Loop::new().unwrap();
    let p = Primary::new();
    p.setup_primary(&mut lp, node_settings("cluster_worker.js", policy));
    assert_eq!(p.scheduling_policy(), policy);
    let log = Log::new();
    log_events(&p, &log);
    let addrs = shared(Vec::new());
    let (a, p2, l2) = (addrs.clone(), p.clone(), log.clone());
    let pids: Shared<HashMap<String, usize>> = shared(HashMap::new());
    let pids2 = pids.clone();
    p.on_listening(move |lp, w, addr| {
        l2.push(format!("listening:{}", w.id()));
        a.borrow_mut().push(addr.clone());
        if a.borrow().len() < 2 {
            return;
        }
        let port = a.borrow()[0].port.unwrap() as u16;
        // Keep making requests until both workers served some (the kernel
        // picks under SCHED_NONE), at most 400.
        let (pids, p3) = (pids2.clone(), p2.clone());
        fn more(lp: &mut Loop, port: u16, pids: Shared<HashMap<String, usize>>, p: Primary) {
            let total: usize = pids.borrow().values().sum();
            if pids.borrow().len() == 2 && total >= 10 || total >= 400 {
                p.disconnect(lp, |_| {});
                return;
            }
            let (pids2, p2) = (pids.clone(), p.clone());
            load(
                lp,
                localhost(port),
                HTTP_GET,
                10,
                4,
                move |_, r| {
                    let b = body(&r.expect("request failed"));
                    *pids2.borrow_mut().entry(b).or_default() += 1;
                },
                move |lp| more(lp, port, pids, p2),
            );
        }
        more(lp, port, pids, p3);
        let _ = w;
    });
    let msgs = Counter::new();
    let (m, l3) = (msgs.clone(), log.clone());
    p.on_message(move |_, w, msg, h| {
        assert!(h.is_none());
        if msg["op"] == "listening" {
            l3.push(format!("message:{}", w.id()));
        }
        m.hit();
    });
    let w1 = p.fork(&mut lp, vec![]).unwrap();
    let w2 = p.fork(&mut lp, vec![]).unwrap();
    assert_eq!((w1.id(), w2.id()), (1, 2));
    assert!(log.joined().is_empty(), "fork is emitted asynchronously");
    run_with_deadline(&mut lp, 30_000);

    let addrs = addrs.borrow();
    assert_eq!(addrs.len(), 2);
    assert_eq!(addrs[0].port, addrs[1].port, "listen(0) gives one port");
    for a in addrs.iter() {
        assert_eq!(a.address, None);
        assert_eq!(a.address_type, AddressType::Tcp4);
        assert_eq!(a.fd, None);
        assert!(a.port.unwrap() > 0);
    }
    let pids = pids.borrow();
    assert_eq!(pids.len(), 2, "both workers served: {pids:?}");
    let worker_pids: HashSet<String> = [&w1, &w2]
        .iter()
        .map(|w| w.pid().unwrap().to_string())
        .collect();
    assert_eq!(pids.keys().cloned().collect::<HashSet<_>>(), worker_pids);
    for w in [&w1, &w2] {
        assert_eq!(
            events_of(&log, w.id()),
            [
                "fork",
                "online",
                "message",
                "listening",
                "disconnect",
                "exit"
            ],
            "{}",
            log.joined()
        );
        assert_eq!(w.exited_after_disconnect(), Some(true));
        assert_eq!(w.exit_status(), Some((Some(0), None)));
        assert!(w.is_dead() && !w.is_connected());
    }
    assert!(msgs.get() >= 4);
    assert!(p.workers().is_empty());
    assert_loop_empty(&lp);
}

// ----- tests -------------------------------------------------------------------

#[test]
fn round_robin_serves_from_both_node_workers_in_node_event_order() {
    serve_from_both_workers(SchedulingPolicy::RoundRobin);
}

#[test]
fn shared_handle_serves_from_both_node_workers_in_node_event_order() {
    serve_from_both_workers(SchedulingPolicy::None);
}

#[test]
fn setup_is_async_and_freezes_the_policy_disconnect_without_workers_is_async() {
    let mut lp = Loop::new().unwrap();
    let p = Primary::new();
    let setups = Counter::new();
    let s = setups.clone();
    p.on_setup(move |_, settings| {
        assert_eq!(settings.exec.as_deref(), Some("x.js".as_ref()));
        s.hit();
    });
    p.setup_primary(
        &mut lp,
        Settings {
            exec: Some("x.js".into()),
            scheduling_policy: Some(SchedulingPolicy::None),
            ..Settings::default()
        },
    );
    p.setup_primary(
        &mut lp,
        Settings {
            scheduling_policy: Some(SchedulingPolicy::RoundRobin),
            ..Settings::default()
        },
    );
    assert_eq!(setups.get(), 0, "setup is emitted asynchronously");
    assert_eq!(p.scheduling_policy(), SchedulingPolicy::None, "frozen");
    let settings = p.settings();
    assert_eq!(settings.exec_argv, Some(vec![]));
    assert_eq!(settings.silent, Some(false));
    assert!(settings.exec_path.is_some() && settings.args.is_some());
    let done = Counter::new();
    let d = done.clone();
    p.disconnect(&mut lp, move |_| d.hit());
    assert_eq!(done.get(), 0, "the callback runs asynchronously");
    run_with_deadline(&mut lp, 5_000);
    assert_eq!((setups.get(), done.get()), (2, 1));
    assert_loop_empty(&lp);
}

#[test]
fn fork_of_a_missing_program_fails_and_leaves_nothing() {
    let mut lp = Loop::new().unwrap();
    let p = Primary::new();
    p.setup_primary(
        &mut lp,
        Settings {
            exec_path: Some("/nonexistent/uvcluster-node".into()),
            args: Some(vec![]),
            ..Settings::default()
        },
    );
    let forks = Counter::new();
    let f = forks.clone();
    p.on_fork(move |_, _| f.hit());
    let e = p.fork(&mut lp, vec![]).unwrap_err();
    assert_eq!(e.kind(), io::ErrorKind::NotFound);
    assert!(p.workers().is_empty());
    run_with_deadline(&mut lp, 5_000);
    assert_eq!(forks.get(), 0);
    assert_loop_empty(&lp);
}

#[test]
fn user_messages_both_ways_and_broadcast_env_reaches_workers() {
    let mut lp = Loop::new().unwrap();
    let p = Primary::new();
    let mut s = node_settings("cluster_worker.js", SchedulingPolicy::RoundRobin);
    s.env = Some(env(&[("SERVER", "none"), ("EXTRA", "from-settings")]));
    p.setup_primary(&mut lp, s);
    p.on_error(|_, _, e| panic!("{e}"));
    let log = Log::new();
    let echoes = shared(Vec::<Value>::new());
    let ready = Counter::new();
    let (e2, r2, p2, l2) = (echoes.clone(), ready.clone(), p.clone(), log.clone());
    p.on_message(move |lp, w, msg, _| {
        let op = msg["op"].as_str().unwrap().to_owned();
        if w.id() == 1 {
            l2.push(format!("primary:{op}"));
        }
        match op.as_str() {
            "ready" => {
                assert_eq!(msg["id"], json!(w.id()));
                // Node deletes NODE_UNIQUE_ID from the worker's environment.
                assert_eq!(msg["uid"], Value::Null);
                let extra = if w.id() == 1 {
                    "from-fork"
                } else {
                    "from-settings"
                };
                assert_eq!(msg["extra"], json!(extra));
                r2.hit();
                if r2.get() == 2 {
                    // One message to each worker, then a broadcast that
                    // every worker answers with a ping.
                    for w in p2.workers() {
                        w.send_with_callback(
                            lp,
                            &json!({"op":"echo","payload":{"to":w.id()}}),
                            None,
                            |_, r| r.unwrap(),
                        )
                        .unwrap();
                    }
                }
            }
            "echo" => {
                assert_eq!(msg["payload"]["to"], json!(w.id()));
                e2.borrow_mut().push(msg.clone());
                if e2.borrow().len() == 2 {
                    p2.disconnect(lp, |_| {});
                }
            }
            other => panic!("unexpected {other}"),
        }
    });
    let w1 = p.fork(&mut lp, env(&[("EXTRA", "from-fork")])).unwrap();
    let l = log.clone();
    // The worker's own callback runs before the primary's.
    w1.on_message(move |_, _, msg, _| l.push(format!("worker:{}", msg["op"].as_str().unwrap())));
    let w2 = p.fork(&mut lp, vec![]).unwrap();
    run_with_deadline(&mut lp, 20_000);
    assert_eq!(ready.get(), 2);
    assert_eq!(echoes.borrow().len(), 2);
    assert_eq!(
        log.joined(),
        "worker:ready primary:ready worker:echo primary:echo"
    );
    for w in [&w1, &w2] {
        assert_eq!(w.exit_status(), Some((Some(0), None)));
    }
    assert_loop_empty(&lp);
}

#[test]
fn kill_sends_sigterm_and_exited_after_disconnect_is_false() {
    let mut lp = Loop::new().unwrap();
    let p = Primary::new();
    let mut s = node_settings("cluster_worker.js", SchedulingPolicy::RoundRobin);
    s.env = Some(env(&[("SERVER", "none")]));
    p.setup_primary(&mut lp, s);
    let log = Log::new();
    log_events(&p, &log);
    let l = log.clone();
    p.on_online(move |lp, w| {
        l.push(format!("online:{}", w.id()));
        w.kill(lp, None).unwrap();
    });
    let exits = shared(Vec::new());
    let (e, l, p2) = (exits.clone(), log.clone(), p.clone());
    p.on_exit(move |_, w, code, sig| {
        l.push(format!("exit:{}", w.id()));
        e.borrow_mut()
            .push((code, sig, w.exited_after_disconnect(), p2.workers().len()));
    });
    let w = p.fork(&mut lp, vec![]).unwrap();
    run_with_deadline(&mut lp, 20_000);
    let exits = exits.borrow();
    assert_eq!(exits.len(), 1);
    let (code, sig, ead, _) = exits[0];
    assert_eq!((code, sig, ead), (None, Some(15), Some(false)));
    let ev = events_of(&log, w.id());
    assert_eq!(ev.len(), 4, "{ev:?}");
    assert!(ev.contains(&"disconnect".to_string()));
    assert_eq!(w.exited_after_disconnect(), Some(false));
    assert!(p.workers().is_empty());
    assert_loop_empty(&lp);
}

#[test]
fn worker_disconnect_from_the_primary_exits_zero_with_exited_after_disconnect() {
    let mut lp = Loop::new().unwrap();
    let p = Primary::new();
    p.setup_primary(
        &mut lp,
        node_settings("cluster_worker.js", SchedulingPolicy::RoundRobin),
    );
    let log = Log::new();
    log_events(&p, &log);
    let (l, p2) = (log.clone(), p.clone());
    p.on_listening(move |lp, w, _| {
        l.push(format!("listening:{}", w.id()));
        w.disconnect(lp);
        // Node removes the worker from cluster.workers at once.
        assert!(p2.worker(w.id()).is_none());
        assert_eq!(w.exited_after_disconnect(), Some(true));
    });
    let states = shared(Vec::new());
    let (st, l) = (states.clone(), log.clone());
    p.on_disconnect(move |_, w| {
        l.push(format!("disconnect:{}", w.id()));
        st.borrow_mut()
            .push((w.state(), w.exited_after_disconnect()));
    });
    let w = p.fork(&mut lp, vec![]).unwrap();
    run_with_deadline(&mut lp, 20_000);
    assert_eq!(
        events_of(&log, w.id()),
        ["fork", "online", "listening", "disconnect", "exit"]
    );
    use uvcluster::cluster::WorkerState;
    assert_eq!(*states.borrow(), [(WorkerState::Disconnected, Some(true))]);
    assert_eq!(w.exit_status(), Some((Some(0), None)));
    assert_eq!(w.state(), WorkerState::Dead);
    assert_loop_empty(&lp);
}

#[test]
fn primary_disconnect_with_idle_workers_runs_the_callback_once_all_are_gone() {
    let mut lp = Loop::new().unwrap();
    let p = Primary::new();
    let mut s = node_settings("cluster_worker.js", SchedulingPolicy::RoundRobin);
    s.env = Some(env(&[("SERVER", "none")]));
    p.setup_primary(&mut lp, s);
    let log = Log::new();
    log_events(&p, &log);
    let online = Counter::new();
    let done = Counter::new();
    let (o, d, l, p2) = (online.clone(), done.clone(), log.clone(), p.clone());
    p.on_online(move |lp, w| {
        l.push(format!("online:{}", w.id()));
        o.hit();
        if o.get() == 2 {
            let (d, l, p3) = (d.clone(), l.clone(), p2.clone());
            p2.disconnect(lp, move |_| {
                assert!(p3.workers().is_empty());
                l.push("done:0");
                d.hit();
            });
        }
    });
    p.fork(&mut lp, vec![]).unwrap();
    p.fork(&mut lp, vec![]).unwrap();
    run_with_deadline(&mut lp, 20_000);
    assert_eq!(done.get(), 1);
    // The callback runs after both workers disconnected and before the
    // last exit event (Node emits it from removeWorker).
    let all = log.joined();
    let d = all.find("done").unwrap();
    assert_eq!(all[..d].matches("disconnect").count(), 2, "{all}");
    assert_eq!(all[d..].matches("exit").count(), 1, "{all}");
    assert_loop_empty(&lp);
}

#[test]
fn eaddrinuse_reaches_the_node_worker_which_retries() {
    let mut lp = Loop::new().unwrap();
    let holder = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = holder.local_addr().unwrap().port();
    let holder = shared(Some(holder));
    let p = Primary::new();
    let mut s = node_settings("cluster_worker.js", SchedulingPolicy::RoundRobin);
    s.env = Some(env(&[
        ("SERVER", "net"),
        ("HOST", "127.0.0.1"),
        ("LISTEN", &port.to_string()),
    ]));
    p.setup_primary(&mut lp, s);
    p.on_error(|_, _, e| panic!("{e}"));
    let got = Log::new();
    let (g, h) = (got.clone(), holder.clone());
    p.on_message(move |lp, w, msg, _| match msg["op"].as_str().unwrap() {
        "error" => {
            g.push(format!(
                "{}:{}:{}",
                msg["code"].as_str().unwrap(),
                msg["errno"],
                msg["syscall"].as_str().unwrap()
            ));
            h.borrow_mut().take();
            w.send(lp, &json!({"op":"retry"}), None).unwrap();
        }
        "listening" => {
            g.push(format!("listening:{}", msg["port"]));
            w.disconnect(lp);
        }
        _ => {}
    });
    let listening = shared(Vec::new());
    let l = listening.clone();
    p.on_listening(move |_, _, a| l.borrow_mut().push(a.clone()));
    p.fork(&mut lp, vec![]).unwrap();
    run_with_deadline(&mut lp, 20_000);
    assert_eq!(
        got.joined(),
        format!("EADDRINUSE:-98:bind listening:{port}")
    );
    let listening = listening.borrow();
    assert_eq!(listening.len(), 1);
    assert_eq!(listening[0].address.as_deref(), Some("127.0.0.1"));
    assert_eq!(listening[0].port, Some(port as i64));
    assert_loop_empty(&lp);
}

#[test]
fn rejected_connection_goes_to_another_worker() {
    let mut lp = Loop::new().unwrap();
    let p = Primary::new();
    let mut s = node_settings("cluster_worker.js", SchedulingPolicy::RoundRobin);
    s.env = Some(env(&[("SERVER", "net")]));
    p.setup_primary(&mut lp, s);
    p.on_error(|_, _, e| panic!("{e}"));
    let held: Shared<Option<Handle<uvcluster::uv::Tcp>>> = shared(None);
    let bodies = shared(Vec::<String>::new());
    let port = shared(0u16);
    let (held2, bodies2, port2, p2) = (held.clone(), bodies.clone(), port.clone(), p.clone());
    p.on_listening(move |lp, w, a| {
        if w.id() == 1 {
            // Worker 1 (maxConnections 1) holds connection A.
            *port2.borrow_mut() = a.port.unwrap() as u16;
            let h = lp.tcp_init();
            let (held3, p3) = (held2.clone(), p2.clone());
            let addr = SocketAddr::from(([127, 0, 0, 1], *port2.borrow()));
            lp.tcp_connect(h, addr, move |lp, h, r| {
                r.unwrap();
                *held3.borrow_mut() = Some(h);
                let p4 = p3.clone();
                lp.read_start(h, move |lp, h, r| {
                    let d = r.unwrap();
                    assert!(!d.is_empty());
                    lp.read_stop(h).unwrap();
                    // Worker 1 is now full: start worker 2.
                    p4.fork(lp, vec![]).unwrap();
                })
                .unwrap();
            })
            .unwrap();
        } else {
            // Connections B and C are offered to worker 1 first (it is
            // first in the free list), rejected, and served by worker 2.
            let (b, held4, p5) = (bodies2.clone(), held2.clone(), p2.clone());
            let port = *port2.borrow();
            load(
                lp,
                localhost(port),
                b"",
                3,
                1,
                move |_, r| b.borrow_mut().push(body(&r.unwrap())),
                move |lp| {
                    let h = held4.borrow_mut().take().unwrap();
                    lp.close(h, |_| {}).unwrap();
                    p5.disconnect(lp, |_| {});
                },
            );
        }
    });
    let w1 = p
        .fork(&mut lp, env(&[("MAX_CONN", "1"), ("HOLD", "1")]))
        .unwrap();
    run_with_deadline(&mut lp, 20_000);
    let w2 = {
        let b = bodies.borrow();
        assert_eq!(b.len(), 3);
        b[0].clone()
    };
    assert_ne!(w2, w1.pid().unwrap().to_string());
    assert!(
        bodies.borrow().iter().all(|b| *b == w2),
        "{:?}",
        bodies.borrow()
    );
    assert_loop_empty(&lp);
}

#[test]
fn udp_is_shared_between_workers() {
    let mut lp = Loop::new().unwrap();
    let p = Primary::new();
    p.setup_primary(
        &mut lp,
        node_settings("cluster_dgram.js", SchedulingPolicy::RoundRobin),
    );
    p.on_error(|_, _, e| panic!("{e}"));
    let ports = shared(Vec::<u16>::new());
    let received = Counter::new();
    const N: usize = 20;
    let (ports2, r, p2) = (ports.clone(), received.clone(), p.clone());
    p.on_message(move |lp, _, msg, _| match msg["op"].as_str().unwrap() {
        "bound" => {
            ports2
                .borrow_mut()
                .push(msg["port"].as_u64().unwrap() as u16);
            if ports2.borrow().len() == 2 {
                let to = SocketAddr::from(([127, 0, 0, 1], ports2.borrow()[0]));
                let tx = lp.udp_init();
                lp.udp_bind(tx, "127.0.0.1:0".parse().unwrap(), BindFlags::default())
                    .unwrap();
                let sent = Counter::new();
                for i in 0..N {
                    let payload = format!("d{i}");
                    let s = sent.clone();
                    lp.udp_send(tx, &[payload.as_bytes()], to, move |lp, tx, r| {
                        r.unwrap();
                        s.hit();
                        if s.get() == N {
                            lp.close(tx, |_| {}).unwrap();
                        }
                    })
                    .unwrap();
                }
            }
        }
        "dgram" => {
            r.hit();
            if r.get() == N {
                p2.disconnect(lp, |_| {});
            }
        }
        other => panic!("unexpected {other}: {msg}"),
    });
    let listening = shared(Vec::new());
    let l = listening.clone();
    p.on_listening(move |_, _, a| l.borrow_mut().push(a.clone()));
    p.fork(&mut lp, vec![]).unwrap();
    p.fork(&mut lp, vec![]).unwrap();
    run_with_deadline(&mut lp, 20_000);
    let ports = ports.borrow();
    assert_eq!(ports.len(), 2);
    assert_eq!(ports[0], ports[1], "one shared socket");
    assert_eq!(received.get(), N);
    for a in listening.borrow().iter() {
        assert_eq!(a.address_type, AddressType::Udp4);
        assert_eq!(a.address.as_deref(), Some("127.0.0.1"));
    }
    assert_loop_empty(&lp);
}

#[test]
fn unix_socket_path_round_robin_server() {
    let dir = std::env::temp_dir().join(format!("uvcluster-prim-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("http.sock");
    let _ = std::fs::remove_file(&path);
    let mut lp = Loop::new().unwrap();
    let p = Primary::new();
    let mut s = node_settings("cluster_worker.js", SchedulingPolicy::RoundRobin);
    s.env = Some(vec![("LISTEN".into(), path.clone().into_os_string())]);
    p.setup_primary(&mut lp, s);
    p.on_error(|_, _, e| panic!("{e}"));
    let pids = shared(Vec::<String>::new());
    let listening = shared(Vec::new());
    let (l, pids2, p2, path2) = (listening.clone(), pids.clone(), p.clone(), path.clone());
    p.on_listening(move |lp, _, a| {
        l.borrow_mut().push(a.clone());
        if l.borrow().len() == 2 {
            let (pids3, p3) = (pids2.clone(), p2.clone());
            load(
                lp,
                Target::Unix(path2.clone()),
                HTTP_GET,
                4,
                1,
                move |_, r| pids3.borrow_mut().push(body(&r.unwrap())),
                move |lp| p3.disconnect(lp, |_| {}),
            );
        }
    });
    p.fork(&mut lp, vec![]).unwrap();
    p.fork(&mut lp, vec![]).unwrap();
    run_with_deadline(&mut lp, 20_000);
    let pids = pids.borrow();
    assert_eq!(pids.len(), 4);
    // Sequential requests alternate between the two free workers.
    assert_ne!(pids[0], pids[1]);
    assert_eq!(pids[0], pids[2]);
    assert_eq!(pids[1], pids[3]);
    for a in listening.borrow().iter() {
        assert_eq!(a.address_type, AddressType::Unix);
        assert_eq!(a.address.as_deref(), path.to_str());
        assert_eq!(a.port, Some(-1));
    }
    assert!(
        !path.exists(),
        "the socket file is removed with the listener"
    );
    let _ = std::fs::remove_dir(&dir);
    assert_loop_empty(&lp);
}

#[test]
fn sigkill_during_round_robin_requeues_what_was_in_flight_to_the_dead_worker() {
    let mut lp = Loop::new().unwrap();
    let p = Primary::new();
    let mut s = node_settings("cluster_worker.js", SchedulingPolicy::RoundRobin);
    s.env = Some(env(&[("SERVER", "net"), ("REPORT", "1")]));
    p.setup_primary(&mut lp, s);
    p.on_error(|_, _, e| panic!("{e}"));
    const N: usize = 40;
    let results = shared(Vec::<String>::new());
    // Connections each worker accepted, by id.
    let accepted: Shared<HashMap<u32, usize>> = shared(HashMap::new());
    let listening = Counter::new();
    let (l, r, p2) = (listening.clone(), results.clone(), p.clone());
    p.on_listening(move |lp, _, a| {
        l.hit();
        if l.get() < 2 {
            return;
        }
        let (r2, p3) = (r.clone(), p2.clone());
        let port = a.port.unwrap() as u16;
        load(
            lp,
            localhost(port),
            b"",
            N,
            N,
            move |_, res| r2.borrow_mut().push(body(&res.unwrap_or_default())),
            move |lp| p3.disconnect(lp, |_| {}),
        );
    });
    let (acc, p4) = (accepted.clone(), p.clone());
    p.on_message(move |lp, w, msg, _| match msg["op"].as_str().unwrap() {
        "conn" => {
            *acc.borrow_mut().entry(w.id()).or_default() = msg["n"].as_u64().unwrap() as usize
        }
        "stalled" => {
            w.kill(lp, Some(9)).unwrap();
            let _ = &p4;
        }
        _ => {}
    });
    let exits = shared(Vec::new());
    let e = exits.clone();
    p.on_exit(move |_, w, code, sig| e.borrow_mut().push((w.id(), code, sig)));
    // Worker 1 serves one connection, then hangs (busy loop) until killed.
    let w1 = p.fork(&mut lp, env(&[("STALL", "1")])).unwrap();
    let w2 = p.fork(&mut lp, vec![]).unwrap();
    run_with_deadline(&mut lp, 30_000);
    let results = results.borrow();
    assert_eq!(results.len(), N);
    let pid1 = w1.pid().unwrap().to_string();
    let pid2 = w2.pid().unwrap().to_string();
    let by1 = results.iter().filter(|b| **b == pid1).count();
    let by2 = results.iter().filter(|b| **b == pid2).count();
    let empty = results.iter().filter(|b| b.is_empty()).count();
    assert_eq!(by1 + by2 + empty, N, "{results:?}");
    let acc = accepted.borrow();
    // Worker 1 served exactly one; anything else it accepted before the
    // busy loop was lost with it (closed, empty response). Every connection
    // it had *not* accepted, including the one in flight, went to worker 2.
    assert_eq!(by1, 1);
    let acc1 = acc.get(&1).copied().unwrap_or(0);
    assert_eq!(
        empty,
        acc1 - 1,
        "accepted by 1: {acc1}, results {results:?}"
    );
    assert_eq!(by2, N - acc1);
    assert_eq!(acc.get(&2).copied().unwrap_or(0), by2);
    let mut exits = exits.borrow().clone();
    exits.sort();
    assert_eq!(exits, [(1, None, Some(9)), (2, Some(0), None)]);
    assert_loop_empty(&lp);
}

#[test]
fn worker_initiated_disconnect_is_acked_and_exited_after_disconnect_is_true() {
    let mut lp = Loop::new().unwrap();
    let p = Primary::new();
    p.setup_primary(
        &mut lp,
        node_settings("cluster_worker.js", SchedulingPolicy::RoundRobin),
    );
    let log = Log::new();
    log_events(&p, &log);
    let l = log.clone();
    p.on_listening(move |lp, w, _| {
        l.push(format!("listening:{}", w.id()));
        // The worker closes its server, sends exitedAfterDisconnect, waits
        // for our ack, then closes the channel.
        w.send(lp, &json!({"op":"disconnect"}), None).unwrap();
    });
    let seen = shared(Vec::new());
    let (s1, l) = (seen.clone(), log.clone());
    p.on_disconnect(move |_, w| {
        l.push(format!("disconnect:{}", w.id()));
        s1.borrow_mut().push(w.exited_after_disconnect());
    });
    let (s2, l) = (seen.clone(), log.clone());
    p.on_exit(move |_, w, code, _| {
        l.push(format!("exit:{}", w.id()));
        assert_eq!(code, Some(0));
        s2.borrow_mut().push(w.exited_after_disconnect());
    });
    let w = p.fork(&mut lp, vec![]).unwrap();
    run_with_deadline(&mut lp, 20_000);
    assert_eq!(*seen.borrow(), [Some(true), Some(true)]);
    assert_eq!(
        events_of(&log, w.id()),
        ["fork", "online", "listening", "disconnect", "exit"]
    );
    assert!(p.workers().is_empty());
    assert_loop_empty(&lp);
}

#[test]
fn listen_on_an_fd_of_the_primary() {
    use std::os::fd::AsRawFd;
    let mut lp = Loop::new().unwrap();
    // The primary's own listening socket; workers name it by fd number.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let fd = listener.as_raw_fd();
    let p = Primary::new();
    let mut s = node_settings("cluster_worker.js", SchedulingPolicy::RoundRobin);
    s.env = Some(env(&[("SERVER", "net"), ("LISTEN_FD", &fd.to_string())]));
    p.setup_primary(&mut lp, s);
    p.on_error(|_, _, e| panic!("{e}"));
    let addrs = shared(Vec::new());
    let pids = shared(Vec::<String>::new());
    let (a, pids2, p2) = (addrs.clone(), pids.clone(), p.clone());
    p.on_listening(move |lp, _, addr| {
        a.borrow_mut().push(addr.clone());
        if a.borrow().len() == 2 {
            let (pids3, p3) = (pids2.clone(), p2.clone());
            load(
                lp,
                localhost(port),
                b"",
                4,
                1,
                move |_, r| pids3.borrow_mut().push(body(&r.unwrap())),
                move |lp| p3.disconnect(lp, |_| {}),
            );
        }
    });
    let w1 = p.fork(&mut lp, vec![]).unwrap();
    let w2 = p.fork(&mut lp, vec![]).unwrap();
    run_with_deadline(&mut lp, 20_000);
    for a in addrs.borrow().iter() {
        assert_eq!(a.fd, Some(fd as i64));
        assert_eq!(a.address_type, AddressType::Fd);
    }
    let got: HashSet<String> = pids.borrow().iter().cloned().collect();
    let want: HashSet<String> = [w1.pid().unwrap(), w2.pid().unwrap()]
        .iter()
        .map(|p| p.to_string())
        .collect();
    assert_eq!(got, want);
    // Our socket stays ours (the primary listened on a duplicate).
    listener.set_nonblocking(true).unwrap();
    assert_eq!(
        listener.accept().unwrap_err().kind(),
        io::ErrorKind::WouldBlock
    );
    assert_loop_empty(&lp);
}

/// Two workers serve `n` round-robin connections, then the primary
/// disconnects them. Returns the primary's open fds with the workers
/// listening and right after the load.
fn round_robin_round(lp: &mut Loop, n: usize) -> (usize, usize) {
    let p = Primary::new();
    let mut s = node_settings("cluster_worker.js", SchedulingPolicy::RoundRobin);
    s.env = Some(env(&[("SERVER", "net")]));
    p.setup_primary(lp, s);
    p.on_error(|_, _, e| panic!("{e}"));
    let served: Shared<HashMap<String, usize>> = shared(HashMap::new());
    let listening = Counter::new();
    let mid = shared(None);
    let (l, sv, p2, mid2) = (listening.clone(), served.clone(), p.clone(), mid.clone());
    p.on_listening(move |lp, _, a| {
        l.hit();
        if l.get() < 2 {
            return;
        }
        let (sv2, p3, mid3) = (sv.clone(), p2.clone(), mid2.clone());
        let with_workers = open_fds();
        load(
            lp,
            localhost(a.port.unwrap() as u16),
            b"",
            n,
            32,
            move |_, r| {
                let b = body(&r.expect("connection failed"));
                assert!(!b.is_empty());
                *sv2.borrow_mut().entry(b).or_default() += 1;
            },
            move |lp| {
                *mid3.borrow_mut() = Some((with_workers, open_fds()));
                p3.disconnect(lp, |_| {});
            },
        );
    });
    p.fork(lp, vec![]).unwrap();
    p.fork(lp, vec![]).unwrap();
    run_with_deadline(lp, 240_000);
    let served = served.borrow();
    assert_eq!(served.values().sum::<usize>(), n);
    assert_eq!(served.len(), 2, "both workers served");
    assert!(p.workers().is_empty());
    assert_loop_empty(lp);
    mid.take().unwrap()
}

#[test]
fn round_robin_20000_connections_fds_back_to_baseline() {
    util::isolated("round_robin_20000_connections_fds_back_to_baseline", || {
        let mut lp = Loop::new().unwrap();
        // A first, small round creates what lives as long as the process
        // or the loop (the SIGCHLD pipe, the loop's spare fd).
        round_robin_round(&mut lp, 100);
        let baseline = open_fds();
        let (with_workers, after_load) = round_robin_round(&mut lp, 20_000);
        // At most the few connections whose `accepted` reply had not been
        // read yet when the last client finished.
        assert!(
            after_load <= with_workers + 4,
            "fds after the load: {after_load}, before: {with_workers}"
        );
        let fds: Vec<_> = std::fs::read_dir("/proc/self/fd")
            .unwrap()
            .map(|e| std::fs::read_link(e.unwrap().path()).ok())
            .collect();
        assert_eq!(open_fds(), baseline, "fds back at the baseline: {fds:?}");
    });
}

/// A fake worker (this binary, re-executed) that speaks raw bytes on the
/// channel: good and malformed cluster messages, and garbage lines.
#[test]
fn fake_worker_helper() {
    if !util::is_helper("fake_worker_helper") {
        return;
    }
    let mut lp = Loop::new().unwrap();
    let fd: i32 = std::env::var("NODE_CHANNEL_FD").unwrap().parse().unwrap();
    let pipe = lp.pipe_init(false);
    lp.pipe_open_inherited(pipe, fd).unwrap();
    let lines: &[&[u8]] = &[
        b"{\"cmd\":\"NODE_CLUSTER\",\"act\":\"online\",\"seq\":0}\n",
        b"{\"cmd\":\"NODE_CLUSTER\",\"act\":\"queryServer\",\"seq\":1}\n",
        b"this is not json\n",
        b"{\"cmd\":\"NODE_CLUSTER\",\"act\":\"close\",\"seq\":2}\n",
        b"{\"cmd\":\"NODE_CLUSTER\",\"act\":\"newconn\",\"key\":\"k\",\"seq\":3}\n",
        b"{\"cmd\":\"NODE_CLUSTER\",\"ack\":-1}\n",
        b"{\"cmd\":\"NODE_CLUSTER\",\"act\":\"bogus\",\"seq\":4}\n",
        b"\n",
        b"{\"op\":\"fake-done\"}\n",
    ];
    lp.write(pipe, lines, |_, _, r| r.unwrap()).unwrap();
    let got = shared(Vec::<u8>::new());
    let g = got.clone();
    lp.read_start(pipe, move |lp, pipe, r| {
        let d = r.unwrap();
        g.borrow_mut().extend_from_slice(d);
        let text = String::from_utf8_lossy(&g.borrow()).into_owned();
        if d.is_empty() || text.contains("\"act\":\"disconnect\"") {
            lp.close(pipe, |_| {}).unwrap();
        }
    })
    .unwrap();
    lp.run(uvcluster::uv::RunMode::Default).unwrap();
    let text = String::from_utf8(got.borrow().clone()).unwrap();
    let replies: Vec<Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert!(
        replies
            .iter()
            .any(|r| r["ack"] == json!(1) && r["errno"] == json!(-22)),
        "{text}"
    );
    assert!(replies.iter().any(|r| r["act"] == "disconnect"), "{text}");
}

#[test]
fn malformed_messages_from_a_fake_worker_are_errors_and_do_not_disturb_a_node_worker() {
    let mut lp = Loop::new().unwrap();
    let p = Primary::new();
    p.setup_primary(
        &mut lp,
        Settings {
            exec_path: Some(std::env::current_exe().unwrap().into_os_string()),
            args: Some(
                [
                    "fake_worker_helper",
                    "--exact",
                    "--nocapture",
                    "--test-threads=1",
                ]
                .map(OsString::from)
                .to_vec(),
            ),
            // The helper's test-harness chatter to /dev/null; its stderr
            // (a panic) still shows.
            stdio: {
                use uvcluster::ipc::ForkStdio::{Ignore, Inherit, Ipc};
                Some(vec![Ignore, Ignore, Inherit, Ipc])
            },
            scheduling_policy: Some(SchedulingPolicy::RoundRobin),
            ..Settings::default()
        },
    );
    let errors = shared(Vec::<(u32, String)>::new());
    let e = errors.clone();
    p.on_error(move |_, w, err| {
        let kind = match err {
            ClusterError::Channel(_) => "channel",
            ClusterError::Protocol(_) => "protocol",
            _ => "other",
        };
        e.borrow_mut().push((w.unwrap().id(), kind.to_string()));
    });
    let fake = p
        .fork(
            &mut lp,
            env(&[("UVCLUSTER_TEST_HELPER", "fake_worker_helper")]),
        )
        .unwrap();
    p.setup_primary(
        &mut lp,
        node_settings("cluster_worker.js", SchedulingPolicy::RoundRobin),
    );
    let node = p.fork(&mut lp, vec![]).unwrap();
    let served = shared(Vec::<String>::new());
    let state = shared((false, 0u16)); // (fake done, node port)
    fn maybe_request(
        lp: &mut Loop,
        st: &Shared<(bool, u16)>,
        served: &Shared<Vec<String>>,
        p: &Primary,
    ) {
        let (done, port) = *st.borrow();
        if !done || port == 0 {
            return;
        }
        let (s, p2) = (served.clone(), p.clone());
        load(
            lp,
            localhost(port),
            HTTP_GET,
            3,
            1,
            move |_, r| s.borrow_mut().push(body(&r.unwrap())),
            move |lp| p2.disconnect(lp, |_| {}),
        );
    }
    let (st, sv, p2) = (state.clone(), served.clone(), p.clone());
    p.on_message(move |lp, w, msg, _| {
        if msg["op"] == "fake-done" {
            assert_eq!(w.id(), 1);
            st.borrow_mut().0 = true;
            maybe_request(lp, &st, &sv, &p2);
        }
    });
    let (st, sv, p2) = (state.clone(), served.clone(), p.clone());
    p.on_listening(move |lp, w, a| {
        assert_eq!(w.id(), 2);
        st.borrow_mut().1 = a.port.unwrap() as u16;
        maybe_request(lp, &st, &sv, &p2);
    });
    let onlines = Counter::new();
    let o = onlines.clone();
    p.on_online(move |_, _| o.hit());
    run_with_deadline(&mut lp, 30_000);
    assert_eq!(onlines.get(), 2);
    let errors = errors.borrow();
    // queryServer without fields, garbage, close without key, newconn from
    // a worker, and an empty line. `ack:-1` and an unknown act are ignored,
    // as Node does.
    let kinds: Vec<&str> = errors.iter().map(|(_, k)| k.as_str()).collect();
    assert_eq!(
        kinds,
        ["protocol", "channel", "protocol", "protocol", "channel"],
        "{errors:?}"
    );
    assert!(errors.iter().all(|(id, _)| *id == 1));
    let pid = node.pid().unwrap().to_string();
    assert_eq!(*served.borrow(), [pid.clone(), pid.clone(), pid]);
    assert_eq!(fake.exit_status(), Some((Some(0), None)));
    assert_eq!(node.exit_status(), Some((Some(0), None)));
    assert_loop_empty(&lp);
}

#[test]
fn broadcast_reaches_every_worker() {
    let mut lp = Loop::new().unwrap();
    let p = Primary::new();
    let mut s = node_settings("cluster_worker.js", SchedulingPolicy::RoundRobin);
    s.env = Some(env(&[("SERVER", "none")]));
    p.setup_primary(&mut lp, s);
    p.on_error(|_, _, e| panic!("{e}"));
    let ready = Counter::new();
    let echoed = shared(Vec::<u32>::new());
    let (r, e, p2) = (ready.clone(), echoed.clone(), p.clone());
    p.on_message(move |lp, w, msg, _| match msg["op"].as_str().unwrap() {
        "ready" => {
            r.hit();
            if r.get() == 3 {
                assert_eq!(p2.broadcast(lp, &json!({"op":"echo","payload":"all"})), 3);
            }
        }
        "echo" => {
            assert_eq!(msg["payload"], "all");
            e.borrow_mut().push(w.id());
            if e.borrow().len() == 3 {
                p2.disconnect(lp, |_| {});
            }
        }
        other => panic!("unexpected {other}"),
    });
    for _ in 0..3 {
        p.fork(&mut lp, vec![]).unwrap();
    }
    run_with_deadline(&mut lp, 20_000);
    let mut ids = echoed.borrow().clone();
    ids.sort();
    assert_eq!(ids, vec![1, 2, 3]);
    assert_loop_empty(&lp);
}

/// test-cluster-fork-stdio: custom stdio `['pipe','pipe','pipe','ipc','pipe']`;
/// the worker echoes on fd 4 through `Worker::stdio(4)`.
#[test]
fn fork_stdio_extra_pipe_echoes() {
    use uvcluster::ipc::ForkStdio;
    let mut lp = Loop::new().unwrap();
    let p = Primary::new();
    let mut s = node_settings("stdio_worker.js", SchedulingPolicy::RoundRobin);
    s.stdio = Some(vec![
        ForkStdio::Pipe,
        ForkStdio::Pipe,
        ForkStdio::Pipe,
        ForkStdio::Ipc,
        ForkStdio::Pipe,
    ]);
    p.setup_primary(&mut lp, s);
    p.on_error(|_, _, e| panic!("{e}"));
    let echoed = shared(Vec::<u8>::new());
    let e = echoed.clone();
    let w = p.fork(&mut lp, vec![]).unwrap();
    let pipe = w.stdio(4).expect("fd 4 is a pipe");
    assert!(w.stdio(3).is_none(), "fd 3 is the IPC channel");
    lp.write(pipe, &[b"hello fd 4\n"], |_, _, r| r.unwrap())
        .unwrap();
    let p2 = p.clone();
    lp.read_start(pipe, move |lp, pipe, r| {
        let data = r.unwrap();
        e.borrow_mut().extend_from_slice(data);
        if e.borrow().ends_with(b"\n") {
            lp.read_stop(pipe).unwrap();
            lp.shutdown(pipe, |_, _, _| {}).unwrap();
            p2.disconnect(lp, |_| {});
        }
    })
    .unwrap();
    run_with_deadline(&mut lp, 20_000);
    assert_eq!(&echoed.borrow()[..], b"hello fd 4\n");
    assert_eq!(w.exit_status(), Some((Some(0), None)));
    assert!(w.stdio(4).is_none(), "closed at exit");
    assert_loop_empty(&lp);
}
