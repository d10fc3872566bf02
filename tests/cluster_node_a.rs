//! Node's test-cluster-*.js, group A (startup, settings, messaging), ported:
//! a Rust primary with real Node workers (`tests/node/ports_worker.js`), a
//! real Node primary with Rust workers (`tests/node/ports_primary.js`), and
//! a Rust primary with Rust workers.

mod cluster_node_common;
mod util;

use cluster_node_common::*;
use serde_json::{Value, json};
use util::*;
use uvcluster::cluster::protocol::AddressType;
use uvcluster::cluster::{self, Settings, WorkerState};
use uvcluster::net::{ListenOptions, Server};
use uvcluster::uv::{Loop, Signum};

/// test-cluster-basic, fork-env, cwd, setup-primary (args reach the
/// worker), listening-port: ids from 1, none→online→listening→dead,
/// listening info {address, port, addressType, fd}, exit (code, signal),
/// NODE_UNIQUE_ID removed, env merged with fork's env winning.
#[test]
fn basic_fork_env_cwd_args_with_node_worker() {
    let mut lp = Loop::new().unwrap();
    let dir = tmpdir("cwd");
    let mut s = node_worker("basic", RR);
    s.env
        .as_mut()
        .unwrap()
        .extend(env(&[("A", "settings"), ("B", "settings")]));
    s.cwd = Some(dir.clone());
    s.args = Some(vec!["custom".into(), "args".into()]);
    let (p, log) = primary(&mut lp, s);
    let states = Log::new();
    let st = states.clone();
    p.on_fork(&mut lp, move |lp, w| {
        st.push(format!("fork:{:?}", w.state(lp)))
    });
    let st = states.clone();
    p.on_online(&mut lp, move |lp, w| {
        st.push(format!("online:{:?}", w.state(lp)))
    });
    let (st, l) = (states.clone(), log.clone());
    p.on_listening(&mut lp, move |lp, w, addr| {
        l.push(format!("listening:{}", w.id()));
        st.push(format!("listening:{:?}", w.state(lp)));
        assert_eq!(addr.address, None);
        assert_eq!(addr.address_type, AddressType::Tcp4);
        assert_eq!(addr.fd, None);
        let port = addr.port.expect("a numeric port");
        assert!(port > 0);
        fetch(
            lp,
            &Target::Tcp(localhost(port as u16)),
            HTTP_GET,
            move |lp, r| {
                assert_eq!(body(&r.unwrap()), w.pid(lp).unwrap().to_string());
                w.kill(lp, None).unwrap();
            },
        );
    });
    let st = states.clone();
    let (l, d) = (log.clone(), dir.clone());
    p.on_exit(&mut lp, move |lp, w, code, signal| {
        l.push(format!("exit:{}", w.id()));
        st.push(format!("exit:{:?}", w.state(lp)));
        assert_eq!((code, signal), (None, Some(Signum::SIGTERM)));
        let _ = &d;
    });
    let got = shared(Value::Null);
    let g = got.clone();
    p.on_message(&mut lp, move |_, _, m, _| {
        if m["op"] == "env" {
            *g.borrow_mut() = m;
        }
    });
    let w = p.fork(&mut lp, env(&[("B", "fork")])).unwrap();
    assert_eq!(w.id(), 1);
    assert_eq!(w.state(&lp), WorkerState::None);
    run(&mut lp, 20_000);
    assert_eq!(
        states.joined(),
        "fork:None online:Online listening:Listening exit:Dead"
    );
    assert_eq!(events(&log, 1), ["listening", "disconnect", "exit"]);
    let m = got.borrow();
    assert_eq!(m["uid"], Value::Null, "NODE_UNIQUE_ID deleted: {m}");
    assert_eq!(
        (m["isWorker"].clone(), m["isPrimary"].clone()),
        (json!(true), json!(false))
    );
    assert_eq!(m["id"], 1);
    assert_eq!(m["argv"], json!(["custom", "args"]));
    assert_eq!(
        m["cwd"],
        json!(dir.canonicalize().unwrap().to_str().unwrap())
    );
    assert_eq!(
        (m["A"].clone(), m["B"].clone()),
        (json!("settings"), json!("fork"))
    );
    assert_eq!(m["PATH"], true, "the primary's env is passed on");
    assert_eq!(w.exit_status(&lp), Some((None, Some(Signum::SIGTERM))));
    assert!(p.workers(&lp).is_empty());
    assert_loop_empty(&lp);
    std::fs::remove_dir_all(dir).unwrap();
}

/// test-cluster-setup-primary, -cumulative, -multiple, -emit: defaults,
/// merging, one asynchronous `setup` per call with the latest settings.
#[test]
fn setup_primary_cumulative_multiple_and_async() {
    let mut lp = Loop::new().unwrap();
    let p = uvcluster::cluster::Primary::new(&mut lp);
    let seen = Log::new();
    let s = seen.clone();
    p.on_setup(&mut lp, move |_, st| {
        s.push(format!(
            "{}|{:?}|{:?}",
            st.exec
                .as_ref()
                .map(|e| e.to_string_lossy().into_owned())
                .unwrap_or_default(),
            st.args,
            st.silent
        ))
    });
    p.setup_primary(
        &mut lp,
        Settings {
            exec: Some("one.js".into()),
            args: Some(vec!["a".into()]),
            ..Settings::default()
        },
    );
    let d = p.settings(&lp);
    assert_eq!(d.silent, Some(false), "default silent");
    assert_eq!(d.exec_argv, Some(vec![]), "default execArgv");
    assert!(d.exec_path.is_some());
    p.setup_primary(
        &mut lp,
        Settings {
            exec: Some("two.js".into()),
            silent: Some(true),
            ..Settings::default()
        },
    );
    assert_eq!(seen.joined(), "", "setup is emitted asynchronously");
    let d = p.settings(&lp);
    assert_eq!(d.args, Some(vec!["a".into()]), "cumulative");
    assert_eq!(d.exec, Some("two.js".into()));
    run(&mut lp, 5_000);
    assert_eq!(
        seen.take(),
        [
            "one.js|Some([\"a\"])|Some(false)",
            "two.js|Some([\"a\"])|Some(true)"
        ]
    );
    assert_loop_empty(&lp);
}

/// test-cluster-worker-init, worker-events, message: a message sent on
/// `online` reaches both `cluster.worker` and `process` in the worker; the
/// reply reaches the worker object and the primary; `send` succeeds.
#[test]
fn worker_init_and_messages_with_node_worker() {
    let mut lp = Loop::new().unwrap();
    let (p, log) = primary(&mut lp, node_worker("init", RR));
    p.on_online(&mut lp, |lp, w| {
        w.send(lp, &json!({"op":"hello"}), None).unwrap();
    });
    let on_worker = Counter::new();
    let on_primary = Counter::new();
    let op = on_primary.clone();
    p.on_message(&mut lp, move |_, _, m, _| {
        assert_eq!(m["op"], "hello-back");
        op.hit();
    });
    let w = p.fork(&mut lp, vec![]).unwrap();
    let ow = on_worker.clone();
    w.on_message(&mut lp, move |lp, w, m, _| {
        assert_eq!(m["seen"], json!({"worker":1,"process":1}));
        ow.hit();
        w.disconnect(lp);
    });
    run(&mut lp, 20_000);
    assert_eq!((on_worker.get(), on_primary.get()), (1, 1));
    assert_eq!(events(&log, 1), ["fork", "disconnect", "exit"]);
    assert_eq!(w.exit_status(&lp), Some((Some(0), None)));
    assert_eq!(w.exited_after_disconnect(&lp), Some(true));
    assert_loop_empty(&lp);
}

/// test-cluster-invalid-message: `{cmd:'NODE_CLUSTER', ack:-1}` sent as a
/// user message is taken as cluster traffic with an unknown ack and
/// ignored; the worker exits 0 after disconnect.
#[test]
fn invalid_message_is_ignored_by_a_node_worker() {
    let mut lp = Loop::new().unwrap();
    let (p, _log) = primary(&mut lp, node_worker("invalid", RR));
    let unexpected = Counter::new();
    let u = unexpected.clone();
    p.on_message(&mut lp, move |lp, w, m, _| match m["op"].as_str() {
        Some("ready") => {
            w.send(lp, &json!({"cmd":"NODE_CLUSTER","ack":-1}), None)
                .unwrap();
            w.disconnect(lp);
        }
        _ => u.hit(),
    });
    let w = p.fork(&mut lp, vec![]).unwrap();
    run(&mut lp, 20_000);
    assert_eq!(unexpected.get(), 0);
    assert_eq!(w.exit_status(&lp), Some((Some(0), None)));
    assert_loop_empty(&lp);
}

// ----- a real Node primary with Rust workers ----------------------------------

/// test-cluster-basic (Node primary's view): events on cluster and worker,
/// states, listening info with exactly four keys, exit (code, signal).
#[test]
fn node_primary_basic_rust_worker() {
    let v = node_primary("basic", &[]);
    assert_eq!(v["ok"], true, "{v}");
}

#[test]
fn helper_basic() {
    as_worker("helper_basic", |lp, w| {
        assert!(std::env::var("NODE_UNIQUE_ID").is_err());
        assert!(cluster::is_worker(lp) && !cluster::is_primary(lp));
        assert_eq!(cluster::worker_id(lp), Some(w.id()));
        let s = Server::new(lp, |lp, s, c| s.close_connection(lp, c));
        s.listen(lp, ListenOptions::port(0), |_, _, r| {
            r.unwrap();
        })
        .unwrap();
    });
}

/// test-cluster-worker-init / invalid-message / fork-env / cwd /
/// setup-primary (Node primary's view): a message on `online` reaches the
/// Rust worker, which answers with its env, cwd and args; a user message
/// shaped like `{cmd:'NODE_CLUSTER', ack:-1}` is ignored.
#[test]
fn node_primary_messages_env_cwd_args_invalid() {
    let dir = tmpdir("ncwd");
    let v = node_primary("init", &[dir.to_str().unwrap()]);
    let m = &v["reply"];
    assert_eq!(m["B"], "fork", "{v}");
    assert_eq!(m["A"], "primary-env", "{v}");
    assert_eq!(
        m["cwd"],
        json!(dir.canonicalize().unwrap().to_str().unwrap())
    );
    assert_eq!(m["argv_tail"], json!(["custom-arg"]));
    assert_eq!(v["exit"], json!([0, null]), "{v}");
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn helper_init() {
    as_worker("helper_init", |lp, w| {
        let n = shared(0);
        w.on_message(lp, move |lp, w, m, _| {
            *n.borrow_mut() += 1;
            assert_eq!(
                *n.borrow(),
                1,
                "only the hello, not the invalid message: {m}"
            );
            assert_eq!(m["op"], "hello");
            let argv: Vec<String> = std::env::args().collect();
            w.send(
                lp,
                &json!({
                    "op": "reply",
                    "A": std::env::var("A").ok(),
                    "B": std::env::var("B").ok(),
                    "cwd": std::env::current_dir().unwrap(),
                    "argv_tail": argv[argv.len() - 1..],
                }),
                None,
            )
            .unwrap();
        });
        let _ = lp;
    });
}

/// test-cluster-advanced-serialization does not apply: the channel refuses
/// `serialization: 'advanced'` with a clear error, and the worker exits.
#[test]
fn node_primary_advanced_serialization_is_refused_clearly() {
    let v = node_primary("advanced", &[]);
    assert_eq!(v["exit"], json!([3, null]), "{v}");
}

#[test]
fn helper_advanced() {
    if !is_helper("helper_advanced") {
        return;
    }
    let mut lp = Loop::new().unwrap();
    let e = cluster::setup_worker(&mut lp).unwrap_err();
    assert_eq!(e.kind(), std::io::ErrorKind::InvalidInput);
    assert!(e.to_string().contains("advanced"), "{e}");
    assert!(e.to_string().contains("json"), "{e}");
    std::process::exit(3);
}

// ----- a Rust primary with Rust workers ---------------------------------------

/// test-cluster-basic / message with Rust on both sides: ids, states,
/// messages both ways, disconnect from the primary.
#[test]
fn rust_primary_rust_worker_basic_and_messages() {
    let mut lp = Loop::new().unwrap();
    let (p, log) = primary(&mut lp, rust_worker("helper_rr_basic", RR));
    let replies = Counter::new();
    let r = replies.clone();
    let addrs = shared(Vec::new());
    let a = addrs.clone();
    let p2 = p;
    p.on_listening(&mut lp, move |lp, _, addr| {
        // Both listen(0)s share one handle while both are listening.
        a.borrow_mut().push(addr.clone());
        if a.borrow().len() == 2 {
            for w in p2.workers(lp) {
                w.send(lp, &json!({"op":"ping"}), None).unwrap();
            }
        }
    });
    p.on_message(&mut lp, move |lp, w, m, _| {
        assert_eq!(m, json!({"op":"pong","id":w.id()}));
        r.hit();
        w.disconnect(lp);
    });
    let w1 = p.fork(&mut lp, vec![]).unwrap();
    let w2 = p.fork(&mut lp, vec![]).unwrap();
    assert_eq!((w1.id(), w2.id()), (1, 2));
    run(&mut lp, 20_000);
    assert_eq!(replies.get(), 2);
    let a = addrs.borrow();
    assert_eq!(a.len(), 2);
    assert_eq!(a[0].port, a[1].port);
    for w in [&w1, &w2] {
        assert_eq!(w.exit_status(&lp), Some((Some(0), None)));
        assert_eq!(w.exited_after_disconnect(&lp), Some(true));
        // 'disconnect' and 'exit' may come in either order (as in Node).
        let mut ev = events(&log, w.id());
        ev[2..].sort();
        assert_eq!(ev, ["fork", "online", "disconnect", "exit"]);
    }
    assert_loop_empty(&lp);
}

#[test]
fn helper_rr_basic() {
    as_worker("helper_rr_basic", |lp, w| {
        let s = Server::new(lp, |lp, s, c| s.close_connection(lp, c));
        s.listen(lp, ListenOptions::port(0), |_, _, r| {
            r.unwrap();
        })
        .unwrap();
        w.on_message(lp, |lp, w, m, _| {
            assert_eq!(m["op"], "ping");
            w.send(lp, &json!({"op":"pong","id":w.id()}), None).unwrap();
        });
    });
}
