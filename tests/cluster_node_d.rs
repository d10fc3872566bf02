//! Node's test-cluster-*.js, group D (bind and listen errors), ported: a
//! Rust primary with real Node workers (`tests/node/ports_worker.js`).

mod cluster_node_common;
mod util;

use std::net::TcpListener;
use std::os::unix::net::UnixListener;

use cluster_node_common::*;
use serde_json::Value;
use util::*;
use uvcluster::cluster::{SchedulingPolicy, Settings};
use uvcluster::uv::Loop;

fn listen_on(on: &str, policy: SchedulingPolicy) -> Settings {
    let mut s = node_worker("listen_on", policy);
    s.env.as_mut().unwrap().extend(env(&[("LISTEN", on)]));
    s
}

/// Runs one worker listening on `on` and returns its first report.
fn first_report(settings: Settings) -> Value {
    let mut lp = Loop::new().unwrap();
    let (p, _log) = primary(&mut lp, settings);
    let got = shared(Value::Null);
    let g = got.clone();
    p.on_message(&mut lp, move |lp, w, m, _| {
        *g.borrow_mut() = m;
        w.disconnect(lp);
    });
    let w = p.fork(&mut lp, vec![]).unwrap();
    run(&mut lp, 20_000);
    assert_eq!(w.exit_status(&lp), Some((Some(0), None)));
    assert_loop_empty(&lp);
    got.take()
}

fn assert_eaddrinuse(m: &Value) {
    assert_eq!(m["op"], "error", "{m}");
    assert_eq!(m["code"], "EADDRINUSE", "{m}");
    assert_eq!(m["errno"], -98);
    assert_eq!(m["syscall"], "bind");
}

/// test-cluster-bind-twice: two separate primaries; the second one's
/// worker gets EADDRINUSE on the first one's port.
#[test]
fn bind_twice_two_primaries() {
    let mut lp = Loop::new().unwrap();
    let (p1, _l1) = primary(&mut lp, listen_on("0", RR));
    let (p2, _l2) = primary(&mut lp, listen_on("0", RR));
    let got = shared(Value::Null);
    let (g, p2b, p1b) = (got.clone(), p2, p1);
    p1.on_message(&mut lp, move |lp, _, m, _| {
        let port = m["port"].as_u64().unwrap().to_string();
        let (g, p1c) = (g.clone(), p1b);
        p2b.on_message(lp, move |lp, w, m, _| {
            *g.borrow_mut() = m;
            w.disconnect(lp);
            p1c.disconnect(lp, |_| {});
        });
        p2b.fork(lp, env(&[("LISTEN", &port)])).unwrap();
    });
    p1.fork(&mut lp, vec![]).unwrap();
    run(&mut lp, 20_000);
    assert_eaddrinuse(&got.borrow());
    assert!(p1.workers(&lp).is_empty() && p2.workers(&lp).is_empty());
    assert_loop_empty(&lp);
}

/// test-cluster-shared-handle-bind-error: SCHED_NONE, a port held by the
/// primary's own socket gives EADDRINUSE in the worker (libuv defers the
/// bind error; the worker compares ports).
#[test]
fn shared_handle_bind_error() {
    let held = TcpListener::bind("0.0.0.0:0").unwrap();
    let port = held.local_addr().unwrap().port().to_string();
    assert_eaddrinuse(&first_report(listen_on(&port, NONE)));
    assert_eaddrinuse(&first_report(listen_on(&port, RR)));
}

/// test-cluster-eaccess: a Unix socket path already taken gives
/// EADDRINUSE in the worker, with its code.
#[test]
fn taken_unix_path_is_eaddrinuse() {
    let dir = tmpdir("eaccess");
    let path = dir.join("taken.sock");
    let _held = UnixListener::bind(&path).unwrap();
    for policy in [RR, NONE] {
        let m = first_report(listen_on(path.to_str().unwrap(), policy));
        assert_eq!(m["code"], "EADDRINUSE", "{m}");
    }
    std::fs::remove_dir_all(dir).unwrap();
}

/// test-cluster-bind-privileged-port / shared-handle-bind-privileged-port:
/// port 42 as a normal user gives EACCES (nothing to check as root, as in
/// Node, where the test is skipped).
#[test]
fn privileged_port_is_eacces_unless_root() {
    if nix::unistd::geteuid().is_root() {
        return;
    }
    for policy in [RR, NONE] {
        let m = first_report(listen_on("42", policy));
        assert_eq!(m["code"], "EACCES", "{m}");
    }
}

/// test-cluster-worker-disconnect-on-error: SCHED_NONE, a port conflict;
/// the Rust worker disconnects from its listen error callback and exits 0
/// (the primary sees `disconnect` and `exit`, `exitedAfterDisconnect`).
#[test]
fn worker_disconnect_on_error_rust_worker() {
    let held = TcpListener::bind("0.0.0.0:0").unwrap();
    let port = held.local_addr().unwrap().port().to_string();
    let mut lp = Loop::new().unwrap();
    let mut s = rust_worker("helper_disconnect_on_error", NONE);
    s.env.as_mut().unwrap().extend(env(&[("PORT", &port)]));
    let (p, log) = primary(&mut lp, s);
    let w = p.fork(&mut lp, vec![]).unwrap();
    run(&mut lp, 20_000);
    assert_eq!(w.exit_status(&lp), Some((Some(0), None)));
    assert_eq!(w.exited_after_disconnect(&lp), Some(true));
    let mut ev = events(&log, 1);
    ev[2..].sort();
    assert_eq!(ev, ["fork", "online", "disconnect", "exit"]);
    assert!(p.workers(&lp).is_empty());
    assert_loop_empty(&lp);
}

#[test]
fn helper_disconnect_on_error() {
    use uvcluster::net::{ListenOptions, Server};
    as_worker("helper_disconnect_on_error", |lp, w| {
        let port: u16 = std::env::var("PORT").unwrap().parse().unwrap();
        let s = Server::new(lp, |_, _, c| panic!("unexpected connection {c:?}"));
        s.listen(lp, ListenOptions::port(port), move |lp, _, r| {
            let e = r.unwrap_err();
            assert_eq!(e.code, "EADDRINUSE");
            w.disconnect(lp);
        })
        .unwrap();
    });
}
