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
use uvcluster::uv::{BindFlags, Handle, Loop, Socket, Tcp};

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
    opts.process.on_exit = Some(Box::new(move |lp, p, status, sig| {
        assert_eq!((status, sig), (0, None));
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
    child.channel.on_disconnect(&mut lp, move |_, _| d.hit());
    child
        .channel
        .on_error(&mut lp, |_, _, e| panic!("channel error: {e}"));
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
    opts.process.on_exit = Some(Box::new(|lp, p, status, _| {
        assert_eq!(status, 0);
        lp.close(p, |_| {}).unwrap();
    }));
    let child = fork(&mut lp, opts).unwrap();
    child
        .channel
        .on_error(&mut lp, |_, _, e| panic!("channel error: {e}"));
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
        .on_message(&mut lp, move |lp, ch: Channel, msg, h| {
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
                    let Some(Socket::Tcp(sock)) = h else {
                        panic!("expected a TCP socket, got {h:?}")
                    };
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

/// With eight handles allowed in flight (`set_handles_in_flight`), a Node
/// child is sent eight connected sockets back to back, without waiting for
/// each one's `NODE_HANDLE_ACK`, and pairs each with its own message: each
/// socket carries its number (written by us) and then the tag Node read
/// from the message it came with.
#[test]
fn rust_parent_sends_sockets_back_to_back_and_node_pairs_each_with_its_message() {
    const N: usize = 8;
    let mut lp = Loop::new().unwrap();
    let mut opts = ForkOptions::node(node_script("child.js"));
    opts.process.on_exit = Some(Box::new(|lp, p, status, _| {
        assert_eq!(status, 0);
        lp.close(p, |_| {}).unwrap();
    }));
    let child = fork(&mut lp, opts).unwrap();
    child
        .channel
        .on_error(&mut lp, |_, _, e| panic!("channel error: {e}"));
    child.channel.set_handles_in_flight(&mut lp, N);
    assert_eq!(child.channel.handles_in_flight(&lp), N);
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    let peer = std::thread::spawn(move || {
        (0..N)
            .map(|_| {
                let (mut c, _) = l.accept().unwrap();
                let mut s = String::new();
                c.read_to_string(&mut s).unwrap();
                s
            })
            .collect::<Vec<String>>()
    });
    // Each socket says its number first; all are sent once connected and
    // the child is ready.
    type Numbered = Vec<(usize, Handle<Tcp>)>;
    let socks: Rc<RefCell<Numbered>> = Rc::default();
    let ready = Rc::new(std::cell::Cell::new(false));
    let send_all = {
        let (socks, ready, ch) = (socks.clone(), ready.clone(), child.channel);
        Rc::new(move |lp: &mut Loop| {
            if !ready.get() || socks.borrow().len() < N {
                return;
            }
            for (i, sock) in socks.borrow_mut().drain(..) {
                let attach = Attach {
                    handle: sock.into(),
                    kind: HandleKind::NetSocket,
                    after_ack: AfterAck::Close,
                };
                ch.send_handle(
                    lp,
                    json!({"op":"tagged","tag":i}),
                    attach,
                    Default::default(),
                    None,
                )
                .unwrap();
            }
        })
    };
    for i in 0..N {
        let sock = lp.tcp_init();
        let (socks, send_all) = (socks.clone(), send_all.clone());
        lp.tcp_connect(sock, addr, move |lp, sock, r| {
            r.unwrap();
            lp.write(sock, &[format!("{i}:").as_bytes()], |_, _, r| r.unwrap())
                .unwrap();
            socks.borrow_mut().push((i, sock));
            send_all(lp);
        })
        .unwrap();
    }
    let done = Counter::new();
    let d = done.clone();
    child
        .channel
        .on_message(&mut lp, move |lp, ch: Channel, msg, _| {
            match msg["op"].as_str().unwrap() {
                "ready" => {
                    ready.set(true);
                    send_all(lp);
                }
                "tagged-done" => {
                    d.hit();
                    if d.get() == N {
                        ch.send(lp, &json!({"op":"exit","code":0}), None).unwrap();
                    }
                }
                other => panic!("unexpected {other}"),
            }
        });
    run_with_deadline(&mut lp, 20_000);
    assert_eq!(done.get(), N);
    let mut got = peer.join().unwrap();
    got.sort();
    let mut want: Vec<String> = (0..N).map(|i| format!("{i}:{i}\n")).collect();
    want.sort();
    assert_eq!(got, want, "each socket with its own message");
    assert_loop_empty(&lp);
}

#[test]
fn rust_parent_node_child_env_udp_and_parent_disconnect() {
    let mut lp = Loop::new().unwrap();
    let exits = Counter::new();
    let e = exits.clone();
    let mut opts = ForkOptions::node(node_script("child.js"));
    opts.process.on_exit = Some(Box::new(move |lp, p, status, sig| {
        // The child exits 0 on its own once we disconnect.
        assert_eq!((status, sig), (0, None));
        e.hit();
        lp.close(p, |_| {}).unwrap();
    }));
    let child = fork(&mut lp, opts).unwrap();
    let disconnects = Counter::new();
    let d = disconnects.clone();
    child.channel.on_disconnect(&mut lp, move |_, _| d.hit());
    child
        .channel
        .on_error(&mut lp, |_, _, e| panic!("channel error: {e}"));
    let log = Log::new();
    let l = log.clone();
    let udp_addr = Rc::new(RefCell::new(None));
    child.channel.on_message(&mut lp, move |lp, ch, msg, h| {
        assert!(h.is_none());
        let op = msg["op"].as_str().unwrap();
        l.push(op);
        match op {
            "ready" => ch.send(lp, &json!({"op": "env"}), None).unwrap(),
            "env" => {
                assert_eq!(msg["fd"], false, "NODE_CHANNEL_FD left in the child");
                assert_eq!(msg["mode"], false, "mode variable left in the child");
                let u = lp.udp_init();
                lp.udp_bind(u, "127.0.0.1:0".parse().unwrap(), BindFlags::default())
                    .unwrap();
                *udp_addr.borrow_mut() = Some(lp.udp_getsockname(u).unwrap());
                let attach = Attach {
                    handle: u.into(),
                    kind: HandleKind::DgramSocket,
                    after_ack: AfterAck::Close,
                };
                let mut extra = serde_json::Map::new();
                extra.insert("dgramType".into(), "udp4".into());
                ch.send_handle(lp, json!({"op": "dgram"}), attach, extra, None)
                    .unwrap();
            }
            "dgram-ready" => {
                let addr = udp_addr.borrow().unwrap();
                assert_eq!(msg["port"], addr.port());
                let s = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
                s.send_to(b"dgram from rust", addr).unwrap();
            }
            "dgram-got" => {
                assert_eq!(msg["data"], "dgram from rust");
                assert_eq!(msg["ok"], true, "not a dgram.Socket in node");
                ch.disconnect(lp);
                assert!(!ch.is_connected(lp));
            }
            other => panic!("unexpected {other}"),
        }
    });
    run_with_deadline(&mut lp, 20_000);
    assert_eq!(log.joined(), "ready env dgram-ready dgram-got");
    assert_eq!((exits.get(), disconnects.get()), (1, 1));
    assert_loop_empty(&lp);
}

#[test]
fn rust_parent_sees_node_child_exit_status() {
    let mut lp = Loop::new().unwrap();
    let exits = Counter::new();
    let e = exits.clone();
    let mut opts = ForkOptions::node(node_script("child.js"));
    opts.process.on_exit = Some(Box::new(move |lp, p, status, sig| {
        assert_eq!((status, sig), (7, None));
        e.hit();
        lp.close(p, |_| {}).unwrap();
    }));
    let child = fork(&mut lp, opts).unwrap();
    let disconnects = Counter::new();
    let d = disconnects.clone();
    child.channel.on_disconnect(&mut lp, move |_, _| d.hit());
    child
        .channel
        .on_error(&mut lp, |_, _, e| panic!("channel error: {e}"));
    child.channel.on_message(&mut lp, |lp, ch, msg, _| {
        assert_eq!(msg["op"], "ready");
        ch.send(lp, &json!({"op": "exit", "code": 7}), None)
            .unwrap();
    });
    run_with_deadline(&mut lp, 20_000);
    assert_eq!((exits.get(), disconnects.get()), (1, 1));
    assert_loop_empty(&lp);
}

// ----- a Node parent, a Rust child ------------------------------------------

/// Runs `node parent.js <this test binary> <helper> <ending>` and checks it
/// printed PASS.
fn run_node_parent(helper: &str, ending: &str) -> String {
    let script = node_script("parent.js");
    let out = std::process::Command::new("node")
        .arg(script)
        .arg(std::env::current_exe().unwrap())
        .args([helper, ending])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && stdout.lines().any(|l| l.starts_with("PASS")),
        "node parent.js {helper} {ending}: {}\n--- stdout\n{stdout}\n--- stderr\n{stderr}",
        out.status
    );
    stdout
}

const FULL_RUN: &str = "PASS ready,echo,echo-big,listening,served,";

#[test]
fn node_parent_rust_child_messages_handles_and_rust_disconnect() {
    let out = run_node_parent("helper_rust_child", "rust-disconnect");
    assert!(out.contains(FULL_RUN), "{out}");
    assert!(out.contains(",here,disconnect,exit:0:null"), "{out}");
}

#[test]
fn node_parent_rust_child_node_disconnects() {
    let out = run_node_parent("helper_rust_child", "node-disconnect");
    assert!(out.contains(FULL_RUN), "{out}");
    assert!(out.contains("exit:3:null"), "{out}");
}

#[test]
fn node_parent_sees_rust_child_exit_status() {
    let out = run_node_parent("helper_rust_child", "exit7");
    assert!(out.contains(FULL_RUN), "{out}");
    assert!(out.contains("exit:7:null"), "{out}");
}

#[test]
fn node_parent_advanced_serialization_is_refused() {
    let out = run_node_parent("helper_rust_child_advanced", "advanced");
    assert!(out.contains("REFUSED: "), "{out}");
}

/// The Rust child of `parent.js`: echoes, uses the server and socket it is
/// sent, sends a socket back, and ends as told. Exits 3 when the parent
/// disconnected, 7 when told to.
#[test]
fn helper_rust_child() {
    if !is_helper("helper_rust_child") {
        return;
    }
    let mut lp = Loop::new().unwrap();
    let ch = Channel::from_env(&mut lp, Default::default())
        .unwrap()
        .expect("no NODE_CHANNEL_FD");
    let env = json!({
        "fd": std::env::var_os("NODE_CHANNEL_FD").is_some(),
        "mode": std::env::var_os("NODE_CHANNEL_SERIALIZATION_MODE").is_some(),
    });
    ch.on_error(&mut lp, |_, _, e| panic!("channel error: {e}"));
    let disconnects = Counter::new();
    let d = disconnects.clone();
    ch.on_disconnect(&mut lp, move |_, _| d.hit());
    let we_disconnected = Counter::new();
    let w = we_disconnected.clone();
    ch.on_message(&mut lp, move |lp, ch, msg, h| {
        let Some(op) = msg.get("op").and_then(Value::as_str) else {
            ch.send(lp, &json!({"op": "raw", "payload": msg}), None)
                .unwrap();
            return;
        };
        match op {
            "echo" => ch
                .send(lp, &json!({"op": "echo", "payload": msg["payload"]}), None)
                .unwrap(),
            "server" => {
                let Some(Socket::Tcp(l)) = h else {
                    panic!("expected a TCP server, got {h:?}")
                };
                assert_eq!(lp.tcp_getsockname(l).unwrap().port(), msg["port"]);
                lp.tcp_listen(l, 8, |lp, l, conn| {
                    lp.close(l, |_| {}).unwrap();
                    lp.write(conn.unwrap(), &[b"hello from rust\n"], |lp, c, r| {
                        r.unwrap();
                        lp.close(c, |_| {}).unwrap();
                    })
                    .unwrap();
                })
                .unwrap();
                ch.send(lp, &json!({"op": "listening", "port": msg["port"]}), None)
                    .unwrap();
            }
            "socket" => {
                let Some(Socket::Tcp(s)) = h else {
                    panic!("expected a TCP socket, got {h:?}")
                };
                let buf = Rc::new(RefCell::new(Vec::new()));
                let ch2 = ch;
                lp.read_start(s, move |lp, s, r| {
                    let data = r.unwrap();
                    assert!(!data.is_empty(), "EOF before the ping");
                    buf.borrow_mut().extend_from_slice(data);
                    if buf.borrow().ends_with(b"\n") {
                        assert_eq!(&buf.borrow()[..], b"ping from node\n");
                        lp.read_stop(s).unwrap();
                        lp.write(s, &[b"pong from rust\n"], |lp, s, r| {
                            r.unwrap();
                            lp.close(s, |_| {}).unwrap();
                        })
                        .unwrap();
                        ch2.send(lp, &json!({"op": "socket-done"}), None).unwrap();
                    }
                })
                .unwrap();
                ch.send(lp, &json!({"op": "socket-reading"}), None).unwrap();
            }
            "send-back" => {
                let l = lp.tcp_init();
                lp.tcp_bind(l, "127.0.0.1:0".parse().unwrap(), BindFlags::default())
                    .unwrap();
                let addr = lp.tcp_getsockname(l).unwrap();
                lp.tcp_listen(l, 8, |lp, l, conn| {
                    lp.close(l, |_| {}).unwrap();
                    lp.write(conn.unwrap(), &[b"data from rust\n"], |lp, c, r| {
                        r.unwrap();
                        lp.close(c, |_| {}).unwrap();
                    })
                    .unwrap();
                })
                .unwrap();
                let c = lp.tcp_init();
                lp.tcp_connect(c, addr, move |lp, c, r| {
                    r.unwrap();
                    let attach = Attach {
                        handle: c.into(),
                        kind: HandleKind::NetSocket,
                        after_ack: AfterAck::Close,
                    };
                    ch.send_handle(lp, json!({"op": "here"}), attach, Default::default(), None)
                        .unwrap();
                })
                .unwrap();
            }
            "disconnect" => {
                w.hit();
                ch.disconnect(lp);
            }
            "exit" => std::process::exit(msg["code"].as_i64().unwrap() as i32),
            other => panic!("unexpected {other}"),
        }
    });
    ch.send(&mut lp, &json!({"op": "ready", "env": env}), None)
        .unwrap();
    run_with_deadline(&mut lp, 30_000);
    assert_eq!(disconnects.get(), 1);
    assert!(!ch.is_connected(&lp));
    assert_loop_empty(&lp);
    if we_disconnected.get() == 0 {
        std::process::exit(3);
    }
}

/// Started with `serialization: 'advanced'`: `from_env` must refuse it,
/// naming the setting. Exits 0 if it did.
#[test]
fn helper_rust_child_advanced() {
    if !is_helper("helper_rust_child_advanced") {
        return;
    }
    let mut lp = Loop::new().unwrap();
    let err = Channel::from_env(&mut lp, Default::default()).unwrap_err();
    assert_eq!(err.kind(), std::io::ErrorKind::InvalidInput);
    let text = err.to_string();
    assert!(
        text.contains("NODE_CHANNEL_SERIALIZATION_MODE") && text.contains("advanced"),
        "{text}"
    );
    assert!(std::env::var_os("NODE_CHANNEL_FD").is_none());
    assert!(std::env::var_os("NODE_CHANNEL_SERIALIZATION_MODE").is_none());
    println!("REFUSED: {text}");
}

// ----- every value Node can send, and bad lines that never block (issue 10) ---

/// Runs `f` on a thread with a large stack: values nested thousands deep
/// are dropped and compared recursively by serde_json.
fn big_stack(f: impl FnOnce() + Send + 'static) {
    std::thread::Builder::new()
        .stack_size(256 << 20)
        .spawn(f)
        .unwrap()
        .join()
        .unwrap();
}

/// `node surrogate_primary.js <worker> <mode> [helper]`: what the Node
/// primary saw.
fn surrogate_primary(worker: &std::ffi::OsStr, mode: &str, helper: Option<&str>) -> Value {
    let mut cmd = std::process::Command::new("node");
    cmd.arg(node_script("surrogate_primary.js"))
        .arg(worker)
        .arg(mode);
    if let Some(h) = helper {
        cmd.arg(h);
    }
    let out = cmd.output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "node primary failed: {stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let line = stdout
        .lines()
        .find_map(|l| l.split_once("RESULT ").map(|(_, r)| r))
        .unwrap_or_else(|| panic!("no RESULT line: {stdout}"));
    // The line may hold an unpaired surrogate: read it as the channel does.
    uvcluster::ipc::parse_line(line.as_bytes()).unwrap()
}

/// issue 10: a Node primary sent `cluster_hello`, its worker, `{note:
/// 'a\ud800b'}` with a `net.Server`. The worker's channel rejected the
/// line and never answered the handle, so the primary queued everything
/// after it, `newconn` included: the worker answered none of 3 requests.
/// Node's own worker answers all 3 (checked here too), and so must ours.
#[test]
fn lone_surrogate_message_with_a_handle_does_not_stall_a_rust_worker() {
    let node = surrogate_primary("node".as_ref(), "handle", None);
    assert_eq!(node["answered"], 3, "Node's own worker: {node}");
    assert_eq!(node["messages"][0]["exact_note"], true, "{node}");
    let hello = util::example("cluster_hello");
    for mode in ["handle", "plain"] {
        let v = surrogate_primary(hello.as_os_str(), mode, None);
        assert_eq!(v["answered"], 3, "{mode}: {v}");
        assert!(v.get("timeout").is_none(), "{mode}: {v}");
    }
}

/// The same primary with a Rust worker that sends the message back exactly
/// as it got it: Node gets its unpaired surrogate back, with or without a
/// handle, as from its own worker.
#[test]
fn lone_surrogate_message_reaches_a_rust_worker_exactly() {
    let exe = std::env::current_exe().unwrap();
    for mode in ["handle", "plain"] {
        let v = surrogate_primary(exe.as_os_str(), mode, Some("helper_surrogate_worker"));
        assert_eq!(v["answered"], 3, "{mode}: {v}");
        let m = &v["messages"][0];
        assert_eq!(m["exact_note"], true, "{mode}: {v}");
        assert_eq!(m["handle"], mode == "handle", "{v}");
        assert_eq!(m["is_exact"], false, "{v}");
    }
}

/// The Rust worker of `surrogate_primary.js`: serves `hello world` on
/// `PORT` and sends back `{got: <the note as received>, handle}` with the
/// note's exact text, through the cluster worker's own
/// `on_message_raw`/`send_raw`.
#[test]
fn helper_surrogate_worker() {
    if !is_helper("helper_surrogate_worker") {
        return;
    }
    let mut lp = Loop::new().unwrap();
    let w = uvcluster::cluster::setup_worker(&mut lp)
        .unwrap()
        .expect("started as a worker");
    w.on_message_raw(&mut lp, |lp, w, m, h| {
        if let Some(h) = h {
            lp.close_if_open(h);
        }
        // {"note":"a\ud800b"} -> {"got":"a\ud800b","handle":..,"is_exact":..}
        let text = String::from_utf8(m.json().into_owned()).unwrap();
        let note = text
            .strip_prefix("{\"note\":")
            .and_then(|t| t.strip_suffix('}'))
            .unwrap_or_else(|| panic!("unexpected {text}"));
        let reply = format!(
            r#"{{"got":{note},"handle":{},"is_exact":{}}}"#,
            h.is_some(),
            m.is_exact()
        );
        let reply = uvcluster::ipc::RawMessage::parse(reply.as_bytes()).unwrap();
        w.send_raw(lp, &reply).unwrap();
    });
    let port: u16 = std::env::var("PORT").unwrap().parse().unwrap();
    util::serve_hello(&mut lp, port);
    // The primary kills the worker when it is done.
    lp.run(uvcluster::uv::RunMode::Default).unwrap();
}

/// A Node parent sends every kind of value `JSON.stringify` writes to a
/// Rust child, which echoes each exactly; then a message nested deeper
/// than the child's limit, with a `net.Server` and a message queued behind
/// it; then the child sends its own values (tests/node/json_edges_parent.js).
#[test]
fn node_values_round_trip_through_a_rust_child_and_bad_lines_never_block() {
    util::require_node();
    let out = std::process::Command::new("node")
        // A deeper stack, to stringify the 6000-deep message.
        .arg("--stack-size=3900")
        .arg(node_script("json_edges_parent.js"))
        .arg(std::env::current_exe().unwrap())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let pass = stdout
        .lines()
        .find_map(|l| l.strip_prefix("PASS "))
        .unwrap_or_else(|| {
            panic!(
                "node json_edges_parent.js: {}\n--- stdout\n{stdout}\n--- stderr\n{}",
                out.status,
                String::from_utf8_lossy(&out.stderr)
            )
        });
    let report = uvcluster::ipc::parse_line(pass.as_bytes()).unwrap();
    assert_eq!(report["echoed"], 15, "{report}");
    let child = &report["child"];
    // Which edges a Value could hold: the unpaired surrogates could not.
    assert_eq!(
        child["exact"],
        json!([
            false, false, false, false, true, true, true, true, true, true, false, false, true,
            true, true
        ]),
        "{report}"
    );
    let errors = child["errors"].as_array().unwrap();
    assert_eq!(errors.len(), 1, "{report}");
    assert_eq!(
        errors[0],
        "UndecodableHandle { error: TooDeep { limit: 4500 }, had_fd: true }"
    );
}

/// The Rust child of `json_edges_parent.js`.
#[test]
fn helper_json_echo() {
    if !is_helper("helper_json_echo") {
        return;
    }
    big_stack(|| {
        let mut lp = Loop::new().unwrap();
        let ch = Channel::from_env(&mut lp, Default::default())
            .unwrap()
            .expect("no NODE_CHANNEL_FD");
        let errors = Rc::new(RefCell::new(Vec::<String>::new()));
        let e = errors.clone();
        ch.on_error(&mut lp, move |_, _, err| {
            e.borrow_mut().push(format!("{err:?}"))
        });
        let exact = Rc::new(RefCell::new(Vec::<bool>::new()));
        ch.on_message_raw(&mut lp, move |lp, ch, m, h| {
            assert!(h.is_none(), "the too-deep message was delivered");
            match m.value()["op"].as_str().unwrap() {
                "echo" => {
                    exact.borrow_mut().push(m.is_exact());
                    ch.send_raw(lp, &m, None).unwrap();
                }
                "after" => {
                    let report = json!({
                        "op": "report",
                        "exact": *exact.borrow(),
                        "errors": *errors.borrow(),
                        "numbers": [1.0, -0.0, 1e21, 0.1, 100.0, 5e-324],
                    });
                    let mut text = uvcluster::ipc::encode(&report).unwrap();
                    // `}\n` -> `,"surrogate":"\ud800"}`
                    text.truncate(text.len() - 2);
                    text.extend_from_slice(br#","surrogate":"\ud800"}"#);
                    let m = uvcluster::ipc::RawMessage::parse(&text).unwrap();
                    ch.send_raw(lp, &m, None).unwrap();
                }
                other => panic!("unexpected {other}"),
            }
        });
        ch.send(&mut lp, &json!({"op": "ready"}), None).unwrap();
        run_with_deadline(&mut lp, 30_000);
        assert!(!ch.is_connected(&lp));
    });
}
