//! The IPC channel against real `node`: a Rust parent forks `node child.js`
//! (tests/node/child.js) and they exchange messages and handles.

mod util;

use std::cell::RefCell;
use std::io::Read;
use std::path::PathBuf;
use std::rc::Rc;

use serde_json::{Value, json};
use util::*;
use uvcluster::ipc::{AfterAck, Attach, Channel, ForkOptions, HandleKind, fork};
use uvcluster::uv::{Accepted, BindFlags, Loop};

fn node_script(name: &str) -> PathBuf {
    util::require_node();
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/node")
        .join(name)
}

#[test]
fn rust_parent_node_child_messages_both_ways() {
    let mut lp = Loop::new().unwrap();
    let exits = Counter::new();
    let e = exits.clone();
    let mut opts = ForkOptions::node(node_script("child.js"));
    opts.on_exit = Some(Box::new(move |lp, p, status, sig| {
        assert_eq!((status, sig), (0, 0));
        e.hit();
        lp.close(p, |_| {}).unwrap();
    }));
    let child = fork(&mut lp, opts).unwrap();
    let got = Rc::new(RefCell::new(Vec::<Value>::new()));
    let g = got.clone();
    let big = "x".repeat(1 << 20);
    let big2 = big.clone();
    let disconnects = Counter::new();
    let d = disconnects.clone();
    child.channel.on_disconnect(move |_, _| d.hit());
    child
        .channel
        .on_error(|_, _, e| panic!("channel error: {e}"));
    child.channel.on_message(&mut lp, move |lp, ch, msg, h| {
        assert!(h.is_none());
        g.borrow_mut().push(msg.clone());
        match msg["op"].as_str().unwrap() {
            "ready" => {
                ch.send(
                    lp,
                    &json!({"op":"echo","payload":{"nested":[1,{"a":"ünïcødé ✓"}],"n":null}}),
                    None,
                )
                .unwrap();
                ch.send(lp, &json!({"op":"echo","payload":big2.clone()}), None)
                    .unwrap();
            }
            "echo" if msg["payload"].is_string() => {
                assert_eq!(msg["payload"].as_str().unwrap().len(), 1 << 20);
                ch.send(lp, &json!({"op":"disconnect"}), None).unwrap();
            }
            "echo" => assert_eq!(msg["payload"]["nested"][1]["a"], "ünïcødé ✓"),
            other => panic!("unexpected {other}"),
        }
    });
    run_with_deadline(&mut lp, 20_000);
    assert_eq!(got.borrow().len(), 3);
    assert_eq!(exits.get(), 1);
    assert_eq!(disconnects.get(), 1);
    assert_loop_empty(&lp);
    drop(big);
}

#[test]
fn rust_parent_passes_server_and_socket_to_node_and_gets_one_back() {
    let mut lp = Loop::new().unwrap();
    let mut opts = ForkOptions::node(node_script("child.js"));
    opts.on_exit = Some(Box::new(|lp, p, status, _| {
        assert_eq!(status, 0);
        lp.close(p, |_| {}).unwrap();
    }));
    let child = fork(&mut lp, opts).unwrap();
    child
        .channel
        .on_error(|_, _, e| panic!("channel error: {e}"));
    let server = lp.tcp_init();
    lp.tcp_bind(server, "127.0.0.1:0".parse().unwrap(), BindFlags::default())
        .unwrap();
    let addr = lp.tcp_getsockname(server).unwrap();
    let steps = Rc::new(RefCell::new(Vec::<String>::new()));
    let s = steps.clone();
    let peer = Rc::new(RefCell::new(None::<std::thread::JoinHandle<String>>));
    let p = peer.clone();
    let peer = p.clone();
    child
        .channel
        .on_message(&mut lp, move |lp, ch: &Channel, msg, h| {
            let op = msg["op"].as_str().unwrap().to_string();
            s.borrow_mut().push(op.clone());
            match op.as_str() {
                "ready" => {
                    // A bound socket: node listens and accepts on it.
                    let attach = Attach {
                        handle: server.into(),
                        kind: HandleKind::NetServer,
                        after_ack: AfterAck::Close,
                    };
                    ch.send_handle(lp, json!({"op":"server"}), attach, Default::default(), None)
                        .unwrap();
                }
                "listening" => {
                    // Connect from a plain thread: node accepts and greets.
                    std::thread::spawn(move || {
                        let mut c = std::net::TcpStream::connect(addr).unwrap();
                        let mut s = String::new();
                        c.read_to_string(&mut s).unwrap();
                        assert!(s.starts_with("hello from node"), "{s}");
                    });
                }
                "served" => {
                    // A connected socket: node writes on it and ends it.
                    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
                    let a = l.local_addr().unwrap();
                    let t = std::thread::spawn(move || {
                        let (mut c, _) = l.accept().unwrap();
                        let mut s = String::new();
                        c.read_to_string(&mut s).unwrap();
                        s
                    });
                    *peer.borrow_mut() = Some(t);
                    let sock = lp.tcp_init();
                    lp.tcp_connect(sock, a, |_, _, r| r.unwrap()).unwrap();
                    let attach = Attach {
                        handle: sock.into(),
                        kind: HandleKind::NetSocket,
                        after_ack: AfterAck::Close,
                    };
                    ch.send_handle(lp, json!({"op":"socket"}), attach, Default::default(), None)
                        .unwrap();
                }
                "socket-done" => {
                    ch.send(lp, &json!({"op":"send-back"}), None).unwrap();
                }
                "here" => {
                    let Some(Accepted::Tcp(sock)) = h else {
                        panic!("expected a TCP socket, got {h:?}")
                    };
                    let ch = ch.clone();
                    let buf = Rc::new(RefCell::new(Vec::new()));
                    lp.read_start(sock, move |lp, sock, r| {
                        let data = r.unwrap();
                        if data.is_empty() {
                            assert_eq!(&buf.borrow()[..], b"from node via rust\n");
                            lp.close(sock, |_| {}).unwrap();
                            ch.send(lp, &json!({"op":"exit","code":0}), None).unwrap();
                        } else {
                            buf.borrow_mut().extend_from_slice(data);
                        }
                    })
                    .unwrap();
                }
                other => panic!("unexpected {other}"),
            }
        });
    run_with_deadline(&mut lp, 20_000);
    assert_eq!(
        steps.borrow().join(" "),
        "ready listening served socket-done here"
    );
    let got = p.borrow_mut().take().unwrap().join().unwrap();
    assert_eq!(got, "node got your socket\n");
    assert_loop_empty(&lp);
}
