//! Node's test-cluster-*.js, group E (UDP), ported with Rust workers (the
//! helper `helper_dgram`, one `MODE` each) under a Rust primary and under a
//! real Node primary (`tests/node/ports_primary.js`). In both policies UDP
//! is a shared socket bound by the primary.

mod cluster_node_common;
mod util;

use std::net::SocketAddr;

use cluster_node_common::*;
use serde_json::{Value, json};
use util::*;
use uvcluster::cluster::protocol::AddressType;
use uvcluster::cluster::{Primary, Settings, Worker};
use uvcluster::net::{BindOptions, bind_dgram};
use uvcluster::uv::{BindFlags, Handle, Loop, Udp};

const PACKETS: usize = 10;

fn dgram_worker(mode: &str, more: &[(&str, &str)]) -> Settings {
    let mut s = rust_worker("helper_dgram", RR);
    s.env.as_mut().unwrap().extend(env(&[("MODE", mode)]));
    s.env.as_mut().unwrap().extend(env(more));
    s
}

/// A free UDP port (for tests that need one fixed port in advance).
fn free_udp_port() -> u16 {
    std::net::UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Sends `n` datagrams to `to` from a fresh socket, then closes it.
fn send_datagrams(lp: &mut Loop, to: SocketAddr, n: usize) {
    let tx = lp.udp_init();
    lp.udp_bind(tx, localhost(0), BindFlags::default()).unwrap();
    let sent = Counter::new();
    for i in 0..n {
        let s = sent.clone();
        lp.udp_send(tx, &[format!("d{i}").as_bytes()], to, move |lp, tx, r| {
            r.unwrap();
            s.hit();
            if s.get() == n {
                lp.close(tx, |_| {}).unwrap();
            }
        })
        .unwrap();
    }
}

/// Runs workers of `settings`; `on_msg` sees their messages. Every worker
/// must exit 0 after a disconnect; the loop ends empty.
fn run_dgram(
    settings: Settings,
    n: usize,
    on_msg: impl FnMut(&mut Loop, &Primary, Worker, Value) + 'static,
) -> (Vec<Worker>, Vec<uvcluster::cluster::Address>) {
    let mut lp = Loop::new().unwrap();
    let (p, _log) = primary(&mut lp, settings);
    let listening = shared(Vec::new());
    let l = listening.clone();
    p.on_listening(&mut lp, move |_, _, a| l.borrow_mut().push(a.clone()));
    let mut on_msg = on_msg;
    let p2 = p;
    p.on_message(&mut lp, move |lp, w, m, _| on_msg(lp, &p2, w, m));
    let ws: Vec<Worker> = (0..n).map(|_| p.fork(&mut lp, vec![]).unwrap()).collect();
    run(&mut lp, 20_000);
    for w in &ws {
        assert_eq!(
            w.exit_status(&lp),
            Some((Some(0), None)),
            "worker {}",
            w.id()
        );
        assert_eq!(w.exited_after_disconnect(&lp), Some(true));
    }
    assert!(p.workers(&lp).is_empty());
    assert_loop_empty(&lp);
    let l = listening.borrow().clone();
    (ws, l)
}

/// test-cluster-dgram-1: 4 workers `bind(0)` share one port; the primary
/// sends 40 datagrams and every worker takes 10 (each closes its copy
/// after 10, so the others take the rest).
#[test]
fn dgram_1_workers_share_one_port_rust_primary() {
    let ports = shared(Vec::new());
    let received = shared(Vec::new());
    let (ps, r) = (ports.clone(), received.clone());
    let (_, listening) = run_dgram(
        dgram_worker("recv", &[]),
        4,
        move |lp, p, _, m| match m["op"].as_str().unwrap() {
            "bound" => {
                ps.borrow_mut().push(m["port"].as_u64().unwrap() as u16);
                if ps.borrow().len() == 4 {
                    let port = ps.borrow()[0];
                    send_datagrams(lp, localhost(port), 4 * PACKETS);
                }
            }
            "received" => {
                r.borrow_mut().push(m["n"].as_u64().unwrap());
                if r.borrow().len() == 4 {
                    p.disconnect(lp, |_| {});
                }
            }
            other => panic!("unexpected {other}: {m}"),
        },
    );
    let ports = ports.borrow();
    assert!(ports.iter().all(|p| *p == ports[0] && *p > 0), "{ports:?}");
    assert_eq!(*received.borrow(), [PACKETS as u64; 4]);
    // Every worker reported `listening` for its UDP socket.
    assert_eq!(listening.len(), 4);
    for a in &listening {
        assert_eq!(a.address_type, AddressType::Udp4);
        assert_eq!(a.port, Some(i64::from(ports[0])));
    }
}

/// test-cluster-dgram-2: workers bind through the primary and send to the
/// primary's own socket; `cluster.disconnect()` once all arrived.
#[test]
fn dgram_2_workers_send_to_the_primary_rust_primary() {
    let mut lp = Loop::new().unwrap();
    let rx = lp.udp_init();
    lp.udp_bind(rx, localhost(0), BindFlags::default()).unwrap();
    let port = lp.udp_getsockname(rx).unwrap().port();
    let (p, _log) = primary(
        &mut lp,
        dgram_worker("send", &[("PORT", &port.to_string())]),
    );
    // Disconnect once every datagram and both workers' `sent` are in (a
    // worker still sending `sent` must not find its channel closed).
    let (got, sent) = (Counter::new(), Counter::new());
    let done = {
        let (got, sent, p) = (got.clone(), sent.clone(), p);
        move |lp: &mut Loop| {
            if got.get() == 2 * PACKETS && sent.get() == 2 {
                p.disconnect(lp, |_| {});
            }
        }
    };
    let (s, d) = (sent.clone(), done.clone());
    p.on_message(&mut lp, move |lp, _, m, _| {
        assert_eq!(m["op"], "sent", "{m}");
        s.hit();
        d(lp);
    });
    let g = got.clone();
    lp.udp_recv_start(rx, move |lp, rx, r| {
        let (data, _) = r.unwrap();
        assert_eq!(data, b"hi");
        g.hit();
        if g.get() == 2 * PACKETS {
            lp.close(rx, |_| {}).unwrap();
            done(lp);
        }
    })
    .unwrap();
    let ws: Vec<Worker> = (0..2).map(|_| p.fork(&mut lp, vec![]).unwrap()).collect();
    run(&mut lp, 20_000);
    assert_eq!(got.get(), 2 * PACKETS);
    for w in &ws {
        assert_eq!(w.exit_status(&lp), Some((Some(0), None)));
    }
    assert_loop_empty(&lp);
}

/// test-cluster-dgram-ipv6only: a udp6 `ipv6Only` socket and a udp4 socket
/// on the same port in one worker both bind (through the primary).
#[test]
fn dgram_ipv6only_and_udp4_on_one_port_rust_primary() {
    let seen = shared(Value::Null);
    let s = seen.clone();
    run_dgram(dgram_worker("ipv6only", &[]), 1, move |lp, _, w, m| {
        *s.borrow_mut() = m;
        w.disconnect(lp);
    });
    let m = seen.borrow();
    assert_eq!(m["op"], "ipv6only", "{m}");
    assert!(m["port6"].as_u64().unwrap() > 0);
    assert_eq!(m["port6"], m["port4"]);
}

/// Sockets bound to UDP `port` (`ss`).
fn udp_sockets_on(port: u16) -> usize {
    let out = std::process::Command::new("ss")
        .args(["-Hun", "-a", &format!("sport = :{port}")])
        .output()
        .expect("ss (iproute2)");
    String::from_utf8_lossy(&out.stdout).lines().count()
}

/// test-cluster-dgram-reuse: two `reuseAddr` sockets on one port in one
/// worker get two indexes, so two keys, so the primary binds two sockets
/// with `SO_REUSEADDR` (two sockets on the port, seen with `ss`).
#[test]
fn dgram_reuse_two_sockets_two_keys_rust_primary() {
    let port = free_udp_port();
    let seen = shared(Value::Null);
    let s = seen.clone();
    let (_, listening) = run_dgram(
        dgram_worker("reuse", &[("PORT", &port.to_string())]),
        1,
        move |lp, _, w, m| {
            assert_eq!(udp_sockets_on(port), 2);
            *s.borrow_mut() = m;
            w.disconnect(lp);
        },
    );
    assert_eq!(seen.borrow()["ports"], json!([port, port]));
    assert_eq!(listening.len(), 2);
}

/// test-cluster-child-index-dgram: two concurrent `bind(0)`s in one worker,
/// each closed and re-bound once bound: all four binds succeed.
#[test]
fn child_index_dgram_rust_primary() {
    let seen = shared(Value::Null);
    let s = seen.clone();
    run_dgram(dgram_worker("child_index", &[]), 1, move |lp, _, w, m| {
        *s.borrow_mut() = m;
        w.disconnect(lp);
    });
    assert_eq!(seen.borrow()["binds"], 4);
}

/// test-cluster-disconnect-unshared-udp: an idle worker, then a worker that
/// binds UDP; once that one is listening the idle one is disconnected,
/// then the whole cluster. Both exit 0.
///
/// It was `#[ignore]`d for hanging about 1 run in 40 under load (worker 2
/// never disconnected); since the channel and primary fixes that followed
/// it has passed 220 runs out of 220, 8 at a time beside the whole suite.
#[test]
fn disconnect_unshared_udp_rust_primary() {
    let mut lp = Loop::new().unwrap();
    let (p, log) = primary(&mut lp, dgram_worker("idle", &[]));
    let bound: Shared<Option<Worker>> = shared(None);
    let (b, p2) = (bound.clone(), p);
    let unbound = p.fork(&mut lp, vec![]).unwrap();
    unbound.on_online(&mut lp, move |lp, _| {
        *b.borrow_mut() = Some(p2.fork(lp, env(&[("MODE", "bind")])).unwrap());
    });
    let u = unbound;
    let p3 = p;
    let listening = Counter::new();
    let l = listening.clone();
    p.on_listening(&mut lp, move |lp, w, a| {
        l.hit();
        assert_eq!(w.id(), 2);
        assert_eq!(a.address_type, AddressType::Udp4);
        u.disconnect(lp);
    });
    let p4 = p3;
    unbound.on_disconnect(&mut lp, move |lp, _| p4.disconnect(lp, |_| {}));
    run(&mut lp, 20_000);
    let bound = (*bound.borrow()).unwrap();
    for w in [&unbound, &bound] {
        assert_eq!(
            w.exit_status(&lp),
            Some((Some(0), None)),
            "worker {}",
            w.id()
        );
    }
    assert_eq!(listening.get(), 1);
    let _ = log;
    assert!(p3.workers(&lp).is_empty());
    assert_loop_empty(&lp);
}

// ----- a Node primary with Rust workers -------------------------------------

#[test]
fn dgram_1_and_2_node_primary() {
    let v = node_primary("dgram", &["recv"]);
    assert_eq!(v["received"], json!([10, 10, 10, 10]), "{v}");
    assert_eq!(v["ports"].as_array().unwrap().len(), 1, "one port: {v}");
    assert_eq!(v["listening"], 4, "{v}");
    let v = node_primary("dgram", &["send"]);
    assert_eq!(v["got"], 20, "{v}");
}

#[test]
fn dgram_ipv6only_reuse_child_index_node_primary() {
    let v = node_primary("dgram", &["ipv6only"]);
    assert_eq!(v["msg"]["port6"], v["msg"]["port4"], "{v}");
    let port = free_udp_port().to_string();
    let v = node_primary("dgram", &["reuse", &port]);
    assert_eq!(v["listening"], 2, "{v}");
    let v = node_primary("dgram", &["child_index"]);
    assert_eq!(v["msg"]["binds"], 4, "{v}");
}

#[test]
fn disconnect_unshared_udp_node_primary() {
    let v = node_primary("dgram", &["unshared"]);
    assert_eq!(v["exits"], json!([[0, null], [0, null]]), "{v}");
}

// ----- the Rust worker ------------------------------------------------------

fn bind(
    lp: &mut Loop,
    socks: &Shared<Vec<Handle<Udp>>>,
    opts: BindOptions,
    then: impl FnOnce(&mut Loop, Handle<Udp>, u16) + 'static,
) {
    let socks = socks.clone();
    bind_dgram(lp, opts, move |lp, r| {
        let u = r.unwrap_or_else(|e| panic!("bind: {e:?}"));
        socks.borrow_mut().push(u);
        let port = lp.udp_getsockname(u).unwrap().port();
        then(lp, u, port)
    });
}

fn close_udp(lp: &mut Loop, u: Handle<Udp>) {
    if !lp.is_closing(u) {
        lp.close(u, |_| {}).unwrap();
    }
}

/// The Rust worker: `MODE` says what it does; it closes its sockets when
/// disconnected (by either side).
#[test]
fn helper_dgram() {
    as_worker("helper_dgram", |lp, w| {
        let mode = std::env::var("MODE").unwrap();
        let port: u16 = std::env::var("PORT").ok().map_or(0, |p| p.parse().unwrap());
        let socks: Shared<Vec<Handle<Udp>>> = shared(Vec::new());
        let s = socks.clone();
        w.on_disconnect(lp, move |lp, _| {
            for u in s.borrow_mut().drain(..) {
                close_udp(lp, u);
            }
        });
        let send = move |lp: &mut Loop, w: Worker, m: Value| w.send(lp, &m, None).unwrap();
        match mode.as_str() {
            "idle" => {}
            "bind" => bind(lp, &socks, BindOptions::default(), |_, _, _| {}),
            "recv" => {
                bind(lp, &socks, BindOptions::default(), move |lp, u, port| {
                    send(lp, w, json!({"op":"bound","port":port}));
                    let mut n = 0;
                    lp.udp_recv_start(u, move |lp, u, r| {
                        r.unwrap();
                        n += 1;
                        if n == PACKETS {
                            close_udp(lp, u);
                            send(lp, w, json!({"op":"received","n":n}));
                        }
                    })
                    .unwrap();
                });
            }
            "send" => {
                let opts = BindOptions {
                    address: Some("127.0.0.1".into()),
                    ..Default::default()
                };
                bind(lp, &socks, opts, move |lp, u, _| {
                    let left = Counter::new();
                    for _ in 0..PACKETS {
                        let (l, w) = (left.clone(), w);
                        lp.udp_send(u, &[b"hi"], localhost(port), move |lp, _, r| {
                            r.unwrap();
                            l.hit();
                            if l.get() == PACKETS {
                                send(lp, w, json!({"op":"sent"}));
                            }
                        })
                        .unwrap();
                    }
                });
            }
            "ipv6only" => {
                let v6 = BindOptions {
                    address: Some("::1".into()),
                    ipv6: true,
                    ipv6_only: true,
                    ..Default::default()
                };
                let s2 = socks.clone();
                bind(lp, &socks, v6, move |lp, _, port6| {
                    let v4 = BindOptions {
                        address: Some("127.0.0.1".into()),
                        port: port6,
                        ..Default::default()
                    };
                    bind(lp, &s2, v4, move |lp, _, port4| {
                        send(lp, w, json!({"op":"ipv6only","port6":port6,"port4":port4}));
                    });
                });
            }
            "reuse" => {
                let ports = shared(Vec::new());
                for _ in 0..2 {
                    let (w, ports) = (w, ports.clone());
                    let opts = BindOptions {
                        port,
                        reuse_addr: true,
                        ..Default::default()
                    };
                    bind(lp, &socks, opts, move |lp, _, p| {
                        ports.borrow_mut().push(p);
                        if ports.borrow().len() == 2 {
                            let ports = ports.borrow().clone();
                            send(lp, w, json!({"op":"reuse","ports":ports}));
                        }
                    });
                }
            }
            "child_index" => {
                let binds = Counter::new();
                for _ in 0..2 {
                    let (w, b, s2) = (w, binds.clone(), socks.clone());
                    bind(lp, &socks, BindOptions::default(), move |lp, u, _| {
                        b.hit();
                        close_udp(lp, u);
                        bind(lp, &s2, BindOptions::default(), move |lp, u, _| {
                            b.hit();
                            close_udp(lp, u);
                            if b.get() == 4 {
                                send(lp, w, json!({"op":"done","binds":4}));
                            }
                        });
                    });
                }
            }
            other => panic!("unknown MODE {other}"),
        }
    });
}

/// test-cluster-dgram-bind-fd: the primary holds a bound UDP socket; a Node
/// worker binds `{fd}` with its number (in the primary's fd table), the
/// primary shares that socket, and a datagram to its port reaches the
/// worker.
#[test]
fn dgram_bind_fd_node_worker() {
    use std::os::fd::AsRawFd;
    let held = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let port = held.local_addr().unwrap().port();
    let mut s = node_worker("dgram_fd", NONE);
    let fd = held.as_raw_fd().to_string();
    s.env.as_mut().unwrap().extend(env(&[("FD", &fd)]));
    let got = shared(Vec::new());
    let g = got.clone();
    run_dgram(s, 1, move |lp, _, w, m| {
        g.borrow_mut().push(m.clone());
        match m["op"].as_str().unwrap() {
            "bound" => {
                assert_eq!(m["port"], port, "{m}");
                send_datagrams(lp, localhost(port), 1);
            }
            "dgram" => w.disconnect(lp),
            other => panic!("unexpected {other}: {m}"),
        }
    });
    assert_eq!(got.borrow().len(), 2);
    assert_eq!(got.borrow()[1]["data"], "d0");
    drop(held);
}
