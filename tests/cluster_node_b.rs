//! Node's test-cluster-*.js, group B (passing handles through the cluster
//! channel), ported: a Rust primary with real Node workers
//! (`tests/node/ports_worker.js`) and with Rust workers.

mod cluster_node_common;
mod util;

use cluster_node_common::*;
use serde_json::json;
use util::*;
use uvcluster::cluster::{Settings, Worker};
use uvcluster::ipc::{AfterAck, Attach, HandleKind};
use uvcluster::uv::{BindFlags, Handle, Loop, Socket, Tcp};

fn socket(h: Handle<Tcp>) -> Attach {
    Attach {
        handle: h.into(),
        kind: HandleKind::NetSocket,
        after_ack: AfterAck::Close,
    }
}

/// Reads `h` to EOF and closes it.
fn read_all(lp: &mut Loop, h: Handle<Tcp>, done: impl FnOnce(&mut Loop, String) + 'static) {
    let mut buf = Vec::new();
    let mut done = Some(done);
    lp.read_start(h, move |lp, h, r| match r {
        Ok([]) | Err(_) => {
            lp.close(h, |_| {}).unwrap();
            if let Some(d) = done.take() {
                d(lp, String::from_utf8_lossy(&buf).into_owned());
            }
        }
        Ok(d) => buf.extend_from_slice(d),
    })
    .unwrap();
}

/// test-cluster-send-deadlock (and, with `twice`, send-handle-twice): the
/// primary listens; the worker connects and sends its end of the
/// connection to the primary while the primary sends its accepted end to
/// the worker, both at once. The worker writes "worker" on the socket it
/// got and ends it; the primary reads that from the socket it got. With
/// `twice` the worker sends its socket a second time: that message comes
/// without a handle (the first send's ACK closed the socket), as in Node.
/// Every worker exits 0.
fn send_sockets(settings: Settings, twice: bool) {
    let mut lp = Loop::new().unwrap();
    let srv = lp.tcp_init();
    lp.tcp_bind(srv, localhost(0), BindFlags::default())
        .unwrap();
    let port = lp.tcp_getsockname(srv).unwrap().port();
    let mut settings = settings;
    let mut e = env(&[("PORT", &port.to_string())]);
    if twice {
        e.extend(env(&[("TWICE", "1")]));
    }
    settings.env.as_mut().unwrap().extend(e);
    let (p, log) = primary(&mut lp, settings);
    let worker: Shared<Option<Worker>> = shared(None);
    let wk = worker.clone();
    lp.tcp_listen(srv, 8, move |lp, srv, c| {
        // The worker's connection: its accepted end goes to the worker.
        lp.close(srv, |_| {}).unwrap();
        let w = (*wk.borrow()).unwrap();
        w.send(lp, &json!({"op":"socket"}), Some(socket(c.unwrap())))
            .unwrap();
    })
    .unwrap();
    let seen = Log::new();
    let (s, left) = (seen.clone(), Counter::new());
    let expect = if twice { 3 } else { 2 };
    p.on_message(&mut lp, move |lp, w, m, h| {
        let done = {
            let (w, s, left) = (w, s.clone(), left.clone());
            move |lp: &mut Loop, what: String| {
                s.push(what);
                left.hit();
                if left.get() == expect {
                    w.disconnect(lp);
                }
            }
        };
        match (m["op"].as_str().unwrap(), h) {
            ("got-socket", None) => done(lp, "got-socket".into()),
            ("socket", Some(Socket::Tcp(c))) => {
                let n = m["n"].clone();
                read_all(lp, c, move |lp, data| done(lp, format!("socket{n}:{data}")));
            }
            ("socket", None) => done(lp, format!("socket{}:no-handle", m["n"])),
            (op, h) => panic!("unexpected {op} {h:?}"),
        }
    });
    *worker.borrow_mut() = Some(p.fork(&mut lp, vec![]).unwrap());
    run(&mut lp, 20_000);
    let mut got = seen.take();
    got.sort();
    let mut want = vec!["got-socket", "socket1:worker"];
    if twice {
        want.push("socket2:no-handle");
    }
    assert_eq!(got, want);
    let w = (*worker.borrow()).unwrap();
    assert_eq!(w.exit_status(&lp), Some((Some(0), None)));
    let mut ev = events(&log, 1);
    ev[2..].sort();
    assert_eq!(ev, ["fork", "online", "disconnect", "exit"]);
    assert_loop_empty(&lp);
}

#[test]
fn send_deadlock_node_worker() {
    send_sockets(node_worker("send_socket", RR), false);
}

#[test]
fn send_handle_twice_node_worker() {
    send_sockets(node_worker("send_socket", RR), true);
}

#[test]
fn send_deadlock_rust_worker() {
    send_sockets(rust_worker("helper_send_socket", RR), false);
}

#[test]
fn send_handle_twice_rust_worker() {
    send_sockets(rust_worker("helper_send_socket", RR), true);
}

/// The Rust twin of `ports_worker.js`'s `send_socket`.
#[test]
fn helper_send_socket() {
    as_worker("helper_send_socket", |lp, w| {
        let port: u16 = std::env::var("PORT").unwrap().parse().unwrap();
        let twice = std::env::var("TWICE").is_ok();
        w.on_message(lp, |lp, w, m, h| {
            assert_eq!(m["op"], "socket");
            let Some(Socket::Tcp(s)) = h else {
                panic!("no socket: {h:?}")
            };
            lp.write(s, &[b"worker"], |lp, s, _| lp.close(s, |_| {}).unwrap())
                .unwrap();
            w.send(lp, &json!({"op":"got-socket"}), None).unwrap();
        });
        let c = lp.tcp_init();
        lp.tcp_connect(c, localhost(port), move |lp, c, r| {
            r.unwrap();
            w.send(lp, &json!({"op":"socket","n":1}), Some(socket(c)))
                .unwrap();
            if twice {
                w.send(lp, &json!({"op":"socket","n":2}), Some(socket(c)))
                    .unwrap();
            }
        })
        .unwrap();
    });
}
