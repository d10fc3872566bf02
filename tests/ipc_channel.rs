//! The IPC channel, Rust to Rust: two [`Channel`]s over `pipe_pair(true)` in
//! one loop, or a channel against a raw peer (a plain IPC pipe that writes
//! arbitrary bytes and fds and decides when to ACK). Node's
//! `test-child-process-fork*.js`, `test-cluster-send-deadlock.js` and the
//! bad-input cases of `parseChannelMessages`.
mod util;

use std::cell::RefCell;
use std::io;
use std::rc::Rc;
use std::time::Duration;

use serde_json::{Map, Value, json};
use util::*;
use uvcluster::ipc::{
    AfterAck, Attach, Channel, ChannelError, ChannelOptions, FrameError, HandleKind, RawMessage,
};
use uvcluster::uv::{BindFlags, Handle, Loop, Pipe, RunMode, Socket, Tcp, Udp};

type Shared<T> = Rc<RefCell<Vec<T>>>;

fn shared<T>() -> Shared<T> {
    Rc::new(RefCell::new(Vec::new()))
}

/// Two connected channels in one loop.
fn pair(lp: &mut Loop) -> (Channel, Channel) {
    let (a, b) = lp.pipe_pair(true).unwrap();
    let a = Channel::open(lp, a, ChannelOptions::default()).unwrap();
    let b = Channel::open(lp, b, ChannelOptions::default()).unwrap();
    (a, b)
}

/// The far end of a channel as a plain IPC pipe: it records what it reads
/// and writes whatever the test wants.
struct Raw {
    pipe: Handle<Pipe>,
    buf: Rc<RefCell<Vec<u8>>>,
    eof: Counter,
}

impl Raw {
    fn lines(&self) -> Vec<Value> {
        self.buf
            .borrow()
            .split(|&b| b == b'\n')
            .filter(|l| !l.is_empty())
            .map(|l| serde_json::from_slice(l).unwrap())
            .collect()
    }
    fn line_count(&self) -> usize {
        self.buf.borrow().iter().filter(|&&b| b == b'\n').count()
    }
    fn write(&self, lp: &mut Loop, bytes: &[u8]) {
        lp.write(self.pipe, &[bytes], |_, _, r| r.unwrap()).unwrap();
    }
    fn write_with(&self, lp: &mut Loop, bytes: &[u8], h: impl Into<uvcluster::uv::Socket>) {
        lp.write2(self.pipe, &[bytes], h, |_, _, r| r.unwrap())
            .unwrap();
    }
    fn ack(&self, lp: &mut Loop) {
        self.write(lp, b"{\"cmd\":\"NODE_HANDLE_ACK\"}\n");
    }
}

fn raw_peer(lp: &mut Loop, opts: ChannelOptions) -> (Channel, Raw) {
    let (a, r) = lp.pipe_pair(true).unwrap();
    let ch = Channel::open(lp, a, opts).unwrap();
    let buf = Rc::new(RefCell::new(Vec::new()));
    let eof = Counter::new();
    let (b, e) = (buf.clone(), eof.clone());
    lp.read_start(r, move |lp, r, res| match res {
        Ok([]) | Err(_) => {
            e.hit();
            lp.close(r, |_| {}).unwrap();
        }
        Ok(data) => b.borrow_mut().extend_from_slice(data),
    })
    .unwrap();
    (ch, Raw { pipe: r, buf, eof })
}

/// Records user messages (with whether a handle came) and errors.
fn record(lp: &mut Loop, ch: &Channel) -> (Shared<Value>, Shared<ChannelError>, Counter) {
    let msgs = shared();
    let errs = shared();
    let disc = Counter::new();
    let (m, e, d) = (msgs.clone(), errs.clone(), disc.clone());
    ch.on_message(lp, move |lp, _, v, h| {
        if let Some(h) = h {
            lp.close_if_open(h);
        }
        m.borrow_mut().push(v)
    });
    ch.on_error(lp, move |_, _, err| e.borrow_mut().push(err));
    ch.on_disconnect(lp, move |_, _| d.hit());
    (msgs, errs, disc)
}

/// A second pair of channels on the same loop, to show a fault on one
/// channel does not touch another. `finish` checks it worked and closes it.
struct Bystander {
    a: Channel,
    /// Kept: a channel nobody references stops reading.
    _b: Channel,
    got: Shared<Value>,
}

impl Bystander {
    fn new(lp: &mut Loop) -> Bystander {
        let (a, b) = pair(lp);
        let got = shared();
        let g = got.clone();
        b.on_message(lp, move |_, _, v, _| g.borrow_mut().push(v));
        b.on_error(lp, |_, _, e| panic!("bystander error: {e}"));
        a.on_error(lp, |_, _, e| panic!("bystander error: {e}"));
        a.send(lp, &json!({"bystander": 1}), None).unwrap();
        Bystander { a, _b: b, got }
    }
    fn finish(self, lp: &mut Loop) {
        let got = self.got.clone();
        run_until(lp, 5000, move |_| !got.borrow().is_empty());
        assert_eq!(*self.got.borrow(), vec![json!({"bystander": 1})]);
        self.a.disconnect(lp);
        let b = self._b;
        run_until(lp, 5000, move |lp| !b.is_connected(lp));
    }
}

fn bound_tcp(lp: &mut Loop) -> Handle<Tcp> {
    let h = lp.tcp_init();
    lp.tcp_bind(h, "127.0.0.1:0".parse().unwrap(), BindFlags::default())
        .unwrap();
    h
}

fn bound_udp(lp: &mut Loop) -> Handle<Udp> {
    let h = lp.udp_init();
    lp.udp_bind(h, "127.0.0.1:0".parse().unwrap(), BindFlags::default())
        .unwrap();
    h
}

fn no_wait(lp: &mut Loop, n: usize) {
    for _ in 0..n {
        lp.run(RunMode::NoWait).unwrap();
    }
}

// ----- user messages ------------------------------------------------------

#[test]
fn channel_user_messages_both_ways() {
    let mut lp = Loop::new().unwrap();
    let (a, b) = pair(&mut lp);
    let msgs = vec![
        json!({"nested": {"a": [1, 2, {"b": null}], "t": true, "f": 1.5}}),
        json!("ünïcødé ✓ 日本語 😀 \u{2028}\u{2029}"),
        json!("line\nbreak and \"quotes\" and \\"),
        json!(42),
        json!(-7.25),
        json!(null),
        json!(true),
        json!([]),
        json!({"cmd": "NODE_"}),
        json!({"cmd": "node_x"}),
    ];
    let (got_a, errs_a, disc_a) = record(&mut lp, &a);
    let (got_b, errs_b, disc_b) = record(&mut lp, &b);
    for m in &msgs {
        a.send(&mut lp, m, None).unwrap();
        b.send(&mut lp, m, None).unwrap();
    }
    let (ga, gb, n) = (got_a.clone(), got_b.clone(), msgs.len());
    run_until(&mut lp, 5000, move |_| {
        ga.borrow().len() == n && gb.borrow().len() == n
    });
    assert_eq!(*got_a.borrow(), msgs);
    assert_eq!(*got_b.borrow(), msgs);
    a.disconnect(&mut lp);
    run_with_deadline(&mut lp, 5000);
    assert!(errs_a.borrow().is_empty() && errs_b.borrow().is_empty());
    assert_eq!((disc_a.get(), disc_b.get()), (1, 1));
    assert_loop_empty(&lp);
}

#[test]
fn channel_one_and_ten_mib_messages() {
    let mut lp = Loop::new().unwrap();
    let (a, b) = pair(&mut lp);
    let (got_a, _, _) = record(&mut lp, &a);
    let (got_b, _, _) = record(&mut lp, &b);
    a.on_error(&mut lp, |_, _, e| panic!("{e}"));
    b.on_error(&mut lp, |_, _, e| panic!("{e}"));
    let one = json!({"big": "é".repeat(1 << 19), "n": 1});
    let ten = json!("x".repeat(10 << 20));
    a.send(&mut lp, &one, None).unwrap();
    a.send(&mut lp, &ten, None).unwrap();
    b.send(&mut lp, &ten, None).unwrap();
    b.send(&mut lp, &one, None).unwrap();
    let (ga, gb) = (got_a.clone(), got_b.clone());
    run_until(&mut lp, 20_000, move |_| {
        ga.borrow().len() == 2 && gb.borrow().len() == 2
    });
    assert!(*got_b.borrow() == vec![one.clone(), ten.clone()]);
    assert!(*got_a.borrow() == vec![ten, one]);
    b.disconnect(&mut lp);
    run_with_deadline(&mut lp, 5000);
    assert_loop_empty(&lp);
}

#[test]
fn channel_many_messages_in_one_read() {
    let mut lp = Loop::new().unwrap();
    let (a, r) = raw_peer(&mut lp, ChannelOptions::default());
    let (got, errs, disc) = record(&mut lp, &a);
    r.write(
        &mut lp,
        b"1\n\"x\"\nnull\n{\"a\":[1,{\"b\":\"\xc3\xa9\"}]}\r\n[]\n",
    );
    let g = got.clone();
    run_until(&mut lp, 5000, move |_| g.borrow().len() == 5);
    assert_eq!(
        *got.borrow(),
        vec![
            json!(1),
            json!("x"),
            json!(null),
            json!({"a": [1, {"b": "é"}]}),
            json!([])
        ]
    );
    a.disconnect(&mut lp);
    run_with_deadline(&mut lp, 5000);
    assert!(errs.borrow().is_empty());
    assert_eq!((disc.get(), r.eof.get()), (1, 1));
    assert_loop_empty(&lp);
}

#[test]
fn channel_one_message_over_many_reads() {
    let mut lp = Loop::new().unwrap();
    let (a, r) = raw_peer(&mut lp, ChannelOptions::default());
    let (got, errs, _) = record(&mut lp, &a);
    let msg = json!({"s": "é😀日".repeat(50), "n": [1, 2, 3], "o": {"k": null}});
    let mut bytes = serde_json::to_vec(&msg).unwrap();
    bytes.push(b'\n');
    // Chunks of 1..=7 bytes, which split multi-byte code points; one chunk
    // per loop iteration, so each arrives in its own read.
    let mut chunks: Vec<Vec<u8>> = Vec::new();
    let mut rest = &bytes[..];
    let mut k = 0;
    while !rest.is_empty() {
        let n = (k % 7 + 1).min(rest.len());
        chunks.push(rest[..n].to_vec());
        rest = &rest[n..];
        k += 1;
    }
    let nchunks = chunks.len();
    let chunks = Rc::new(RefCell::new(chunks.into_iter()));
    let pipe = r.pipe;
    let t = lp.timer_init();
    let g = got.clone();
    lp.timer_start(
        t,
        Duration::ZERO,
        Duration::from_millis(1),
        move |lp, t| match chunks.borrow_mut().next() {
            Some(c) => {
                assert!(g.borrow().is_empty(), "delivered before its newline");
                lp.write(pipe, &[&c], |_, _, r| r.unwrap()).unwrap();
            }
            None => lp.close(t, |_| {}).unwrap(),
        },
    )
    .unwrap();
    let g = got.clone();
    run_until(&mut lp, 10_000, move |_| !g.borrow().is_empty());
    assert!(nchunks > 100);
    assert_eq!(*got.borrow(), vec![msg]);
    a.disconnect(&mut lp);
    run_with_deadline(&mut lp, 5000);
    assert!(errs.borrow().is_empty(), "{:?}", errs.borrow());
    assert_loop_empty(&lp);
}

// ----- handles --------------------------------------------------------------

#[test]
fn channel_sends_tcp_listener() {
    let mut lp = Loop::new().unwrap();
    let (a, b) = pair(&mut lp);
    a.on_error(&mut lp, |_, _, e| panic!("{e}"));
    b.on_error(&mut lp, |_, _, e| panic!("{e}"));
    let srv = bound_tcp(&mut lp);
    let addr = lp.tcp_getsockname(srv).unwrap();
    let attach = Attach {
        handle: srv.into(),
        kind: HandleKind::NetServer,
        after_ack: AfterAck::Close,
    };
    a.send_handle(&mut lp, json!({"what": "server"}), attach, Map::new(), None)
        .unwrap();
    let log = Log::new();
    let l = log.clone();
    b.on_message(&mut lp, move |lp, ch, msg, h| {
        assert_eq!(msg, json!({"what": "server"}));
        let Some(Socket::Tcp(listener)) = h else {
            panic!("expected Socket::Tcp, got {h:?}")
        };
        assert_eq!(lp.tcp_getsockname(listener).unwrap(), addr);
        let (ch, l2) = (ch, l.clone());
        lp.tcp_listen(listener, 8, move |lp, listener, conn| {
            l2.push("accepted");
            lp.close(conn.unwrap(), |_| {}).unwrap();
            lp.close(listener, |_| {}).unwrap();
            ch.disconnect(lp);
        })
        .unwrap();
        let c = lp.tcp_init();
        let l = l.clone();
        lp.tcp_connect(c, addr, move |lp, c, r| {
            r.unwrap();
            l.push("connected");
            lp.close(c, |_| {}).unwrap();
        })
        .unwrap();
    });
    run_with_deadline(&mut lp, 5000);
    let mut events = log.take();
    events.sort();
    assert_eq!(events, ["accepted", "connected"]);
    assert!(!a.is_connected(&lp));
    assert_loop_empty(&lp);
}

#[test]
fn channel_sends_connected_tcp_socket_and_closes_its_copy_on_ack() {
    let mut lp = Loop::new().unwrap();
    let (a, b) = pair(&mut lp);
    a.on_error(&mut lp, |_, _, e| panic!("{e}"));
    b.on_error(&mut lp, |_, _, e| panic!("{e}"));
    let srv = bound_tcp(&mut lp);
    let addr = lp.tcp_getsockname(srv).unwrap();
    let got = Rc::new(RefCell::new(Vec::new()));
    let g = got.clone();
    let a2 = a;
    lp.tcp_listen(srv, 8, move |lp, srv, conn| {
        let conn = conn.unwrap();
        lp.close(srv, |_| {}).unwrap();
        let (g, a2) = (g.clone(), a2);
        lp.read_start(conn, move |lp, conn, r| {
            let data = r.unwrap();
            if data.is_empty() {
                // EOF only once both copies of the client socket are
                // closed: b's, and a's (AfterAck::Close).
                lp.close(conn, |_| {}).unwrap();
                a2.disconnect(lp);
            } else {
                g.borrow_mut().extend_from_slice(data);
            }
        })
        .unwrap();
    })
    .unwrap();
    let c = lp.tcp_init();
    let a2 = a;
    lp.tcp_connect(c, addr, move |lp, c, r| {
        r.unwrap();
        let attach = Attach {
            handle: c.into(),
            kind: HandleKind::NetSocket,
            after_ack: AfterAck::Close,
        };
        a2.send_handle(lp, json!({"what": "socket"}), attach, Map::new(), None)
            .unwrap();
    })
    .unwrap();
    b.on_message(&mut lp, |lp, _, msg, h| {
        assert_eq!(msg, json!({"what": "socket"}));
        let Some(Socket::Tcp(s)) = h else {
            panic!("expected Socket::Tcp, got {h:?}")
        };
        lp.write(s, &[b"via b"], |lp, s, r| {
            r.unwrap();
            lp.close(s, |_| {}).unwrap();
        })
        .unwrap();
    });
    run_with_deadline(&mut lp, 5000);
    assert_eq!(&got.borrow()[..], b"via b");
    assert!(lp.tcp_getsockname(c).is_err(), "a's copy still open");
    assert_loop_empty(&lp);
}

#[test]
fn channel_sends_udp_socket_and_keeps_its_copy() {
    let mut lp = Loop::new().unwrap();
    let (a, b) = pair(&mut lp);
    a.on_error(&mut lp, |_, _, e| panic!("{e}"));
    b.on_error(&mut lp, |_, _, e| panic!("{e}"));
    let u = bound_udp(&mut lp);
    let addr = lp.udp_getsockname(u).unwrap();
    let attach = Attach {
        handle: u.into(),
        kind: HandleKind::DgramSocket,
        after_ack: AfterAck::Keep,
    };
    let mut extra = Map::new();
    extra.insert("dgramType".into(), "udp4".into());
    a.send_handle(&mut lp, json!({"what": "udp"}), attach, extra, None)
        .unwrap();
    // Queued behind the handle: when b sees it, a has processed the ACK.
    a.send(&mut lp, &json!({"what": "after"}), None).unwrap();
    let log = Log::new();
    let l = log.clone();
    b.on_message(&mut lp, move |lp, ch, msg, h| {
        l.push(msg["what"].as_str().unwrap());
        if msg["what"] == "after" {
            // Keep: a's copy still works after the ACK.
            assert_eq!(lp.udp_getsockname(u).unwrap(), addr);
            lp.close(u, |_| {}).unwrap();
            if l.take_len() == 3 {
                ch.disconnect(lp);
            }
            return;
        }
        let Some(Socket::Udp(v)) = h else {
            panic!("expected Socket::Udp, got {h:?}")
        };
        assert_eq!(lp.udp_getsockname(v).unwrap(), addr);
        let (l, ch) = (l.clone(), ch);
        lp.udp_recv_start(v, move |lp, v, r| {
            let (data, _) = r.unwrap();
            l.push(String::from_utf8_lossy(data).into_owned());
            lp.close(v, |_| {}).unwrap();
            if l.take_len() == 3 {
                ch.disconnect(lp);
            }
        })
        .unwrap();
        let s = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        s.send_to(b"dgram", addr).unwrap();
    });
    run_with_deadline(&mut lp, 5000);
    let mut events = log.take();
    events.sort();
    assert_eq!(events, ["after", "dgram", "udp"]);
    assert_loop_empty(&lp);
}

#[test]
fn channel_sends_unix_socket() {
    let mut lp = Loop::new().unwrap();
    let (a, b) = pair(&mut lp);
    a.on_error(&mut lp, |_, _, e| panic!("{e}"));
    b.on_error(&mut lp, |_, _, e| panic!("{e}"));
    let (x, y) = lp.pipe_pair(false).unwrap();
    let attach = Attach {
        handle: x.into(),
        kind: HandleKind::NetNative,
        after_ack: AfterAck::Close,
    };
    a.send_handle(&mut lp, json!({"what": "unix"}), attach, Map::new(), None)
        .unwrap();
    b.on_message(&mut lp, |lp, _, _, h| {
        let Some(Socket::Pipe(p)) = h else {
            panic!("expected Socket::Pipe, got {h:?}")
        };
        lp.write(p, &[b"over unix"], |lp, p, r| {
            r.unwrap();
            lp.close(p, |_| {}).unwrap();
        })
        .unwrap();
    });
    let got = Rc::new(RefCell::new(Vec::new()));
    let g = got.clone();
    lp.read_start(y, move |lp, y, r| {
        let data = r.unwrap();
        if data.is_empty() {
            lp.close(y, |_| {}).unwrap();
            a.disconnect(lp);
        } else {
            g.borrow_mut().extend_from_slice(data);
        }
    })
    .unwrap();
    run_with_deadline(&mut lp, 5000);
    assert_eq!(&got.borrow()[..], b"over unix");
    assert_loop_empty(&lp);
}

/// After `send_handle`, later sends wait for the ACK, then go in order;
/// `after_ack` decides what happens to the sender's copy.
fn queue_until_ack(after_ack: AfterAck) {
    let mut lp = Loop::new().unwrap();
    let (a, r) = raw_peer(&mut lp, ChannelOptions::default());
    let (_, errs, disc) = record(&mut lp, &a);
    let h = bound_tcp(&mut lp);
    let attach = Attach {
        handle: h.into(),
        kind: HandleKind::NetNative,
        after_ack,
    };
    let sent = Log::new();
    let s = sent.clone();
    a.send_handle(
        &mut lp,
        json!({"n": 0}),
        attach,
        Map::new(),
        Some(Box::new(move |_, r| {
            r.unwrap();
            s.push("0")
        })),
    )
    .unwrap();
    for n in 1..=3 {
        let s = sent.clone();
        a.send(
            &mut lp,
            &json!({"n": n}),
            Some(Box::new(move |_, r| {
                r.unwrap();
                s.push(n.to_string())
            })),
        )
        .unwrap();
    }
    let pipe = r.pipe;
    let buf = r.buf.clone();
    run_until(&mut lp, 5000, move |_| buf.borrow().ends_with(b"\n"));
    no_wait(&mut lp, 10);
    assert_eq!(
        r.lines(),
        vec![json!({"cmd": "NODE_HANDLE", "type": "net.Native", "msg": {"n": 0}})]
    );
    assert_eq!(lp.pipe_pending_count(pipe), 1);
    assert_eq!(sent.joined(), "0");
    assert!(lp.tcp_getsockname(h).is_ok());
    r.ack(&mut lp);
    let buf = r.buf.clone();
    run_until(&mut lp, 5000, move |_| {
        buf.borrow().iter().filter(|&&b| b == b'\n').count() == 4
    });
    assert_eq!(
        r.lines()[1..],
        [json!({"n": 1}), json!({"n": 2}), json!({"n": 3})]
    );
    assert_eq!(r.line_count(), 4);
    match after_ack {
        AfterAck::Keep => {
            assert!(!lp.is_closing(h));
            assert!(lp.tcp_getsockname(h).is_ok());
            lp.close(h, |_| {}).unwrap();
        }
        AfterAck::Close => {
            assert!(lp.is_closing(h) || lp.tcp_getsockname(h).is_err());
        }
    }
    a.disconnect(&mut lp);
    run_with_deadline(&mut lp, 5000);
    assert_eq!(sent.joined(), "0 1 2 3");
    assert!(errs.borrow().is_empty(), "{:?}", errs.borrow());
    assert_eq!((disc.get(), r.eof.get()), (1, 1));
    assert!(lp.tcp_getsockname(h).is_err());
    assert_loop_empty(&lp);
}

#[test]
fn channel_queues_sends_until_ack_and_keeps_handle() {
    queue_until_ack(AfterAck::Keep);
}

#[test]
fn channel_queues_sends_until_ack_and_closes_handle() {
    queue_until_ack(AfterAck::Close);
}

/// Three handles allowed in flight: three handles go out back to back
/// before any ACK (the peer holds their three fds), the fourth and a plain
/// message wait; the peer's NACK and ACKs are matched to the handles
/// oldest first, each answer letting one more out.
#[test]
fn channel_with_three_handles_in_flight_sends_them_back_to_back_and_matches_answers_in_order() {
    let mut lp = Loop::new().unwrap();
    let (a, r) = raw_peer(&mut lp, ChannelOptions::default());
    let (_, errs, _) = record(&mut lp, &a);
    assert_eq!(a.handles_in_flight(&lp), 1);
    a.set_handles_in_flight(&mut lp, 3);
    let fared = Log::new();
    for n in 0..4 {
        let h = bound_tcp(&mut lp);
        let attach = Attach {
            handle: h.into(),
            kind: HandleKind::NetNative,
            after_ack: AfterAck::Close,
        };
        let f = fared.clone();
        a.send_cluster_handle(
            &mut lp,
            cluster(json!({"act": "newconn", "n": n})),
            attach,
            None,
            Box::new(move |_, _, d| f.push(format!("{n}:{d:?}"))),
        )
        .unwrap();
    }
    a.send(&mut lp, &json!("after"), None).unwrap();
    let (pipe, buf) = (r.pipe, r.buf.clone());
    run_until(&mut lp, 5000, move |lp| {
        buf.borrow().iter().filter(|&&b| b == b'\n').count() == 3
            && lp.pipe_pending_count(pipe) == 3
    });
    no_wait(&mut lp, 10);
    assert_eq!(r.line_count(), 3, "the fourth waits for an answer");
    assert_eq!(
        r.lines()
            .iter()
            .map(|l| l["msg"]["n"].clone())
            .collect::<Vec<_>>(),
        [json!(0), json!(1), json!(2)]
    );
    assert_eq!(fared.joined(), "");
    r.write(&mut lp, b"{\"cmd\":\"NODE_HANDLE_NACK\"}\n");
    let buf = r.buf.clone();
    run_until(&mut lp, 5000, move |_| {
        buf.borrow().iter().filter(|&&b| b == b'\n').count() == 4
    });
    no_wait(&mut lp, 10);
    assert_eq!(fared.joined(), "0:Nacked");
    assert_eq!(r.lines()[3]["msg"]["n"], 3);
    assert_eq!(r.line_count(), 4, "the plain message still waits");
    for _ in 0..3 {
        r.ack(&mut lp);
    }
    let buf = r.buf.clone();
    run_until(&mut lp, 5000, move |_| {
        buf.borrow().iter().filter(|&&b| b == b'\n').count() == 5
    });
    no_wait(&mut lp, 10);
    assert_eq!(fared.joined(), "0:Nacked 1:Acked 2:Acked 3:Acked");
    assert_eq!(r.lines()[4], json!("after"));
    assert!(errs.borrow().is_empty(), "{:?}", errs.borrow());
    // (The peer's four fds are closed with its pipe.)
    a.disconnect(&mut lp);
    run_with_deadline(&mut lp, 5000);
    assert_loop_empty(&lp);
}

#[test]
fn channel_nack_reports_handle_rejected_and_flushes_queue() {
    let mut lp = Loop::new().unwrap();
    let (a, r) = raw_peer(&mut lp, ChannelOptions::default());
    let (_, errs, _) = record(&mut lp, &a);
    let h = bound_tcp(&mut lp);
    let attach = Attach {
        handle: h.into(),
        kind: HandleKind::NetSocket,
        after_ack: AfterAck::Close,
    };
    a.send_handle(&mut lp, json!(1), attach, Map::new(), None)
        .unwrap();
    a.send(&mut lp, &json!(2), None).unwrap();
    let buf = r.buf.clone();
    run_until(&mut lp, 5000, move |_| buf.borrow().ends_with(b"\n"));
    r.write(&mut lp, b"{\"cmd\":\"NODE_HANDLE_NACK\"}\n");
    let buf = r.buf.clone();
    run_until(&mut lp, 5000, move |_| {
        buf.borrow().iter().filter(|&&b| b == b'\n').count() == 2
    });
    assert_eq!(r.lines()[1], json!(2));
    assert!(matches!(errs.borrow()[..], [ChannelError::HandleRejected]));
    a.disconnect(&mut lp);
    run_with_deadline(&mut lp, 5000);
    assert_loop_empty(&lp);
}

/// Both ends pass handles to each other at the same time, each followed by
/// a plain message (Node's test-cluster-send-deadlock): ACKs bypass the
/// queues, so neither waits on the other forever.
#[test]
fn channel_handles_both_ways_at_once_do_not_deadlock() {
    const N: usize = 20;
    let mut lp = Loop::new().unwrap();
    let (a, b) = pair(&mut lp);
    let mut ends = Vec::new();
    for ch in [&a, &b] {
        ch.on_error(&mut lp, |_, _, e| panic!("{e}"));
        let got = shared::<(Value, bool)>();
        let g = got.clone();
        ch.on_message(&mut lp, move |lp, _, v, h| {
            g.borrow_mut().push((v, h.is_some()));
            if let Some(h) = h {
                lp.close_if_open(h);
            }
        });
        ends.push(got);
    }
    for i in 0..N {
        for ch in [&a, &b] {
            let h = bound_tcp(&mut lp);
            let attach = Attach {
                handle: h.into(),
                kind: HandleKind::NetNative,
                after_ack: AfterAck::Close,
            };
            ch.send_handle(&mut lp, json!({"h": i}), attach, Map::new(), None)
                .unwrap();
            ch.send(&mut lp, &json!({"m": i}), None).unwrap();
        }
    }
    let e2 = ends.clone();
    run_until(&mut lp, 10_000, move |_| {
        e2.iter().all(|g| g.borrow().len() == 2 * N)
    });
    for got in &ends {
        let want: Vec<(Value, bool)> = (0..N)
            .flat_map(|i| [(json!({"h": i}), true), (json!({"m": i}), false)])
            .collect();
        assert_eq!(*got.borrow(), want);
    }
    a.disconnect(&mut lp);
    run_with_deadline(&mut lp, 5000);
    assert_loop_empty(&lp);
}

// ----- seq / ack ------------------------------------------------------------

fn cluster(fields: Value) -> Map<String, Value> {
    let Value::Object(m) = fields else {
        unreachable!()
    };
    m
}

#[test]
fn channel_send_cluster_replies_by_ack() {
    let mut lp = Loop::new().unwrap();
    let (a, b) = pair(&mut lp);
    a.on_error(&mut lp, |_, _, e| panic!("{e}"));
    b.on_error(&mut lp, |_, _, e| panic!("{e}"));
    let log = Log::new();
    // b answers like Node's cluster primary: {cmd, ack: seq, ...}.
    b.on_internal(&mut lp, |lp, ch, v, h| {
        assert!(h.is_none());
        let seq = v["seq"].clone();
        match v["act"].as_str().unwrap() {
            "plain" => ch
                .send(
                    lp,
                    &json!({"cmd": "NODE_CLUSTER", "ack": seq, "act": "r1"}),
                    None,
                )
                .unwrap(),
            "with-fd" => {
                let h = bound_tcp(lp);
                let attach = Attach {
                    handle: h.into(),
                    kind: HandleKind::NetNative,
                    after_ack: AfterAck::Close,
                };
                ch.send_handle(
                    lp,
                    json!({"cmd": "NODE_CLUSTER", "ack": seq, "act": "r2"}),
                    attach,
                    Map::new(),
                    None,
                )
                .unwrap();
            }
            "stray" => ch
                .send(
                    lp,
                    &json!({"cmd": "NODE_CLUSTER", "ack": 1u64 << 60, "act": "stray"}),
                    None,
                )
                .unwrap(),
            other => panic!("{other}"),
        }
    });
    let l = log.clone();
    a.on_internal(&mut lp, move |lp, _, v, h| {
        assert!(h.is_none());
        assert_eq!(v["act"], "stray");
        l.push("internal:stray");
        lp.stop();
    });
    let l = log.clone();
    let s1 = a
        .send_cluster(
            &mut lp,
            cluster(json!({"act": "plain"})),
            None,
            Some(Box::new(move |_, _, v, h| {
                assert!(h.is_none());
                assert_eq!(v["act"], "r1");
                l.push("reply:r1");
            })),
        )
        .unwrap();
    let l = log.clone();
    let s2 = a
        .send_cluster(
            &mut lp,
            cluster(json!({"act": "with-fd"})),
            None,
            Some(Box::new(move |lp, _, v, h| {
                assert_eq!(v["act"], "r2");
                let Some(Socket::Tcp(t)) = h else {
                    panic!("expected a TCP handle with the reply, got {h:?}")
                };
                lp.close(t, |_| {}).unwrap();
                l.push("reply:r2");
            })),
        )
        .unwrap();
    let s3 = a
        .send_cluster(&mut lp, cluster(json!({"act": "stray"})), None, None)
        .unwrap();
    assert!(s1 < s2 && s2 < s3, "{s1} {s2} {s3}");
    let l = log.clone();
    run_until(&mut lp, 5000, move |_| l.take_len() == 3);
    assert_eq!(log.joined(), "reply:r1 reply:r2 internal:stray");
    a.disconnect(&mut lp);
    run_with_deadline(&mut lp, 5000);
    assert_loop_empty(&lp);
}

trait LogLen {
    fn take_len(&self) -> usize;
}
impl LogLen for Log {
    fn take_len(&self) -> usize {
        self.joined().split(' ').filter(|s| !s.is_empty()).count()
    }
}

#[test]
fn channel_late_on_message_gets_backlog_in_order() {
    let mut lp = Loop::new().unwrap();
    let (a, b) = pair(&mut lp);
    let marker = Counter::new();
    let m = marker.clone();
    b.on_internal(&mut lp, move |_, _, _, _| m.hit());
    for i in 0..3 {
        a.send(&mut lp, &json!({"i": i}), None).unwrap();
    }
    a.send_cluster(&mut lp, cluster(json!({"act": "marker"})), None, None)
        .unwrap();
    let m = marker.clone();
    run_until(&mut lp, 5000, move |_| m.get() == 1);
    let got = shared();
    let g = got.clone();
    b.on_message(&mut lp, move |_, _, v, _| g.borrow_mut().push(v));
    assert!(
        got.borrow().is_empty(),
        "backlog replayed inside on_message"
    );
    a.send(&mut lp, &json!({"i": 3}), None).unwrap();
    let g = got.clone();
    run_until(&mut lp, 5000, move |_| g.borrow().len() == 4);
    assert_eq!(
        *got.borrow(),
        (0..4).map(|i| json!({"i": i})).collect::<Vec<_>>()
    );
    b.disconnect(&mut lp);
    run_with_deadline(&mut lp, 5000);
    assert_loop_empty(&lp);
}

// ----- disconnect -----------------------------------------------------------

fn disconnect_from(first: bool) {
    let mut lp = Loop::new().unwrap();
    let (a, b) = pair(&mut lp);
    let (_, errs_a, disc_a) = record(&mut lp, &a);
    let (_, errs_b, disc_b) = record(&mut lp, &b);
    assert!(a.is_connected(&lp) && b.is_connected(&lp));
    let (who, other) = if first { (&a, &b) } else { (&b, &a) };
    who.disconnect(&mut lp);
    assert!(!who.is_connected(&lp));
    let e = who.send(&mut lp, &json!(1), None).unwrap_err();
    assert_eq!(e.kind(), io::ErrorKind::NotConnected);
    who.disconnect(&mut lp); // a second call does nothing
    run_with_deadline(&mut lp, 5000);
    assert_eq!((disc_a.get(), disc_b.get()), (1, 1));
    assert!(!a.is_connected(&lp) && !b.is_connected(&lp));
    for ch in [&a, &b] {
        let e = ch.send(&mut lp, &json!(1), None).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::NotConnected);
        let e = ch
            .send_cluster(&mut lp, Map::new(), None, None)
            .unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::NotConnected);
    }
    other.disconnect(&mut lp);
    run_with_deadline(&mut lp, 5000);
    assert_eq!((disc_a.get(), disc_b.get()), (1, 1));
    assert!(errs_a.borrow().is_empty() && errs_b.borrow().is_empty());
    assert_loop_empty(&lp);
}

#[test]
fn channel_disconnect_from_first_end() {
    disconnect_from(true);
}

#[test]
fn channel_disconnect_from_second_end() {
    disconnect_from(false);
}

#[test]
fn channel_disconnect_waits_for_handle_ack() {
    let mut lp = Loop::new().unwrap();
    let (a, r) = raw_peer(&mut lp, ChannelOptions::default());
    let (_, errs, disc) = record(&mut lp, &a);
    let h = bound_tcp(&mut lp);
    let attach = Attach {
        handle: h.into(),
        kind: HandleKind::NetNative,
        after_ack: AfterAck::Close,
    };
    a.send_handle(&mut lp, json!("h"), attach, Map::new(), None)
        .unwrap();
    a.disconnect(&mut lp);
    assert!(!a.is_connected(&lp));
    let e = a.send(&mut lp, &json!(1), None).unwrap_err();
    assert_eq!(e.kind(), io::ErrorKind::NotConnected);
    let buf = r.buf.clone();
    run_until(&mut lp, 5000, move |_| buf.borrow().ends_with(b"\n"));
    no_wait(&mut lp, 10);
    assert_eq!((r.eof.get(), disc.get()), (0, 0), "closed before the ACK");
    r.ack(&mut lp);
    run_with_deadline(&mut lp, 5000);
    assert_eq!((r.eof.get(), disc.get()), (1, 1));
    assert!(errs.borrow().is_empty());
    assert_loop_empty(&lp);
}

#[test]
fn channel_unref_lets_loop_end() {
    let mut lp = Loop::new().unwrap();
    let (a, b) = pair(&mut lp);
    a.set_ref(&mut lp, false).unwrap();
    b.set_ref(&mut lp, false).unwrap();
    assert!(!lp.alive());
    run_with_deadline(&mut lp, 5000);
    assert!(a.is_connected(&lp) && b.is_connected(&lp));
    b.set_ref(&mut lp, true).unwrap();
    let disc = Counter::new();
    let d = disc.clone();
    b.on_disconnect(&mut lp, move |_, _| d.hit());
    a.disconnect(&mut lp);
    run_with_deadline(&mut lp, 5000);
    assert_eq!(disc.get(), 1);
    assert_loop_empty(&lp);
}

// ----- bad input --------------------------------------------------------------

#[test]
fn channel_bad_lines_are_typed_errors_and_lose_nothing_else() {
    let mut lp = Loop::new().unwrap();
    let by = Bystander::new(&mut lp);
    let (a, r) = raw_peer(&mut lp, ChannelOptions::default());
    let (got, errs, disc) = record(&mut lp, &a);
    r.write(&mut lp, b"{\"before\":1}\ngarbage\n\n\xff\xfe{}\n{\"a\":\n");
    r.write(&mut lp, b"{\"after\":1}\n");
    let g = got.clone();
    run_until(&mut lp, 5000, move |_| g.borrow().len() == 2);
    assert_eq!(*got.borrow(), vec![json!({"before":1}), json!({"after":1})]);
    {
        let errs = errs.borrow();
        assert_eq!(errs.len(), 4, "{errs:?}");
        assert!(
            matches!(&errs[0], ChannelError::Frame(FrameError::Malformed { prefix, .. }) if prefix == "garbage")
        );
        assert!(matches!(
            errs[1],
            ChannelError::Frame(FrameError::EmptyLine)
        ));
        assert!(matches!(
            errs[2],
            ChannelError::Frame(FrameError::InvalidUtf8 { valid_up_to: 0 })
        ));
        assert!(matches!(
            errs[3],
            ChannelError::Frame(FrameError::Malformed { .. })
        ));
    }
    assert!(a.is_connected(&lp));
    by.finish(&mut lp);
    a.disconnect(&mut lp);
    run_with_deadline(&mut lp, 5000);
    assert_eq!(disc.get(), 1);
    assert_loop_empty(&lp);
}

#[test]
fn channel_handle_without_fd_is_nacked_and_dropped() {
    let mut lp = Loop::new().unwrap();
    let by = Bystander::new(&mut lp);
    let (a, r) = raw_peer(&mut lp, ChannelOptions::default());
    let (got, errs, _) = record(&mut lp, &a);
    r.write(
        &mut lp,
        b"{\"cmd\":\"NODE_HANDLE\",\"type\":\"net.Native\",\"msg\":{\"lost\":1}}\n{\"next\":1}\n",
    );
    let (g, buf) = (got.clone(), r.buf.clone());
    run_until(&mut lp, 5000, move |_| {
        !g.borrow().is_empty() && buf.borrow().ends_with(b"\n")
    });
    assert_eq!(*got.borrow(), vec![json!({"next":1})]);
    assert!(matches!(errs.borrow()[..], [ChannelError::HandleWithoutFd]));
    assert_eq!(r.lines(), vec![json!({"cmd":"NODE_HANDLE_NACK"})]);
    by.finish(&mut lp);
    a.disconnect(&mut lp);
    run_with_deadline(&mut lp, 5000);
    assert_loop_empty(&lp);
}

#[test]
fn channel_fd_without_handle_is_closed() {
    isolated("channel_fd_without_handle_is_closed", || {
        let mut lp = Loop::new().unwrap();
        let by = Bystander::new(&mut lp);
        let (a, r) = raw_peer(&mut lp, ChannelOptions::default());
        let (got, errs, _) = record(&mut lp, &a);
        let u = bound_udp(&mut lp);
        let baseline = open_fds();
        r.write_with(&mut lp, b"{\"plain\":1}\n", u);
        r.write(&mut lp, b"{\"next\":1}\n");
        let g = got.clone();
        run_until(&mut lp, 5000, move |_| g.borrow().len() == 2);
        assert_eq!(*got.borrow(), vec![json!({"plain":1}), json!({"next":1})]);
        assert!(
            matches!(
                errs.borrow()[..],
                [ChannelError::FdWithoutHandle { count: 1 }]
            ),
            "{:?}",
            errs.borrow()
        );
        assert_eq!(open_fds(), baseline, "the stray fd leaked");
        lp.close(u, |_| {}).unwrap();
        by.finish(&mut lp);
        a.disconnect(&mut lp);
        run_with_deadline(&mut lp, 5000);
        assert_loop_empty(&lp);
    });
}

#[test]
fn channel_unknown_handle_type_is_closed_and_nacked() {
    isolated("channel_unknown_handle_type_is_closed_and_nacked", || {
        let mut lp = Loop::new().unwrap();
        let by = Bystander::new(&mut lp);
        let (a, r) = raw_peer(&mut lp, ChannelOptions::default());
        let (got, errs, _) = record(&mut lp, &a);
        let u = bound_udp(&mut lp);
        let baseline = open_fds();
        r.write_with(
            &mut lp,
            b"{\"cmd\":\"NODE_HANDLE\",\"type\":\"bogus.Type\",\"msg\":{\"lost\":1}}\n",
            u,
        );
        r.write(&mut lp, b"{\"next\":1}\n");
        let (g, buf) = (got.clone(), r.buf.clone());
        run_until(&mut lp, 5000, move |_| {
            !g.borrow().is_empty() && buf.borrow().ends_with(b"\n")
        });
        assert_eq!(*got.borrow(), vec![json!({"next":1})]);
        assert!(
            matches!(&errs.borrow()[..], [ChannelError::UnknownHandleType(t)] if t == "bogus.Type"),
            "{:?}",
            errs.borrow()
        );
        assert_eq!(r.lines(), vec![json!({"cmd":"NODE_HANDLE_NACK"})]);
        assert_eq!(open_fds(), baseline, "the fd of the unknown handle leaked");
        lp.close(u, |_| {}).unwrap();
        by.finish(&mut lp);
        a.disconnect(&mut lp);
        run_with_deadline(&mut lp, 5000);
        assert_loop_empty(&lp);
    });
}

/// An oversized line used to close the channel; now it is reported, the
/// rest of it is dropped without being buffered, and the next line is read.
#[test]
fn channel_oversized_line_is_skipped_and_channel_stays_usable() {
    let mut lp = Loop::new().unwrap();
    let by = Bystander::new(&mut lp);
    let opts = ChannelOptions {
        max_message: 1024,
        ..ChannelOptions::default()
    };
    let (a, r) = raw_peer(&mut lp, opts);
    let (got, errs, disc) = record(&mut lp, &a);
    r.write(&mut lp, b"{\"small\":1}\n");
    // 256 KiB with no newline, more than the socket buffer holds at once:
    // the channel must give up on it at the limit, not buffer it all.
    let big = vec![b'x'; 256 << 10];
    lp.write(r.pipe, &[&big], |_, _, r| r.unwrap()).unwrap();
    r.write(&mut lp, b"\n{\"after\":1}\n");
    let g = got.clone();
    run_until(&mut lp, 5000, move |_| g.borrow().len() == 2);
    assert_eq!(*got.borrow(), vec![json!({"small":1}), json!({"after":1})]);
    {
        let errs = errs.borrow();
        assert_eq!(errs.len(), 1, "{errs:?}");
        let ChannelError::Frame(FrameError::Oversized { size, limit }) = errs[0] else {
            panic!("{errs:?}")
        };
        assert_eq!(limit, 1024);
        assert!(size > 1024 && size <= 1024 + 65536, "{size}");
    }
    assert!(a.is_connected(&lp));
    by.finish(&mut lp);
    a.disconnect(&mut lp);
    run_with_deadline(&mut lp, 5000);
    assert_eq!((disc.get(), r.eof.get()), (1, 1));
    assert_loop_empty(&lp);
}

#[test]
fn channel_eof_inside_a_message_is_truncated_at_eof() {
    let mut lp = Loop::new().unwrap();
    let by = Bystander::new(&mut lp);
    let (a, r) = raw_peer(&mut lp, ChannelOptions::default());
    let (got, errs, disc) = record(&mut lp, &a);
    let n = lp.try_write(r.pipe, &[b"{\"a\":1}\n{\"b\""]).unwrap();
    assert_eq!(n, 12);
    lp.read_stop(r.pipe).unwrap();
    lp.close(r.pipe, |_| {}).unwrap();
    let d = disc.clone();
    run_until(&mut lp, 5000, move |_| d.get() == 1);
    assert_eq!(*got.borrow(), vec![json!({"a":1})]);
    assert!(
        matches!(
            errs.borrow()[..],
            [ChannelError::Frame(FrameError::TruncatedAtEof { size: 4 })]
        ),
        "{:?}",
        errs.borrow()
    );
    assert!(!a.is_connected(&lp));
    by.finish(&mut lp);
    run_with_deadline(&mut lp, 5000);
    assert_eq!(disc.get(), 1);
    assert_loop_empty(&lp);
}

// ----- every line Node can write, and bad lines that never block -------------

/// Records user messages as [`RawMessage`]s.
fn record_raw(lp: &mut Loop, ch: &Channel) -> (Shared<RawMessage>, Shared<ChannelError>) {
    let msgs = shared();
    let errs = shared();
    let (m, e) = (msgs.clone(), errs.clone());
    ch.on_message_raw(lp, move |lp, _, v, h| {
        if let Some(h) = h {
            lp.close_if_open(h);
        }
        m.borrow_mut().push(v)
    });
    ch.on_error(lp, move |_, _, err| e.borrow_mut().push(err));
    (msgs, errs)
}

/// issue 10: `{"note":"a\ud800b"}` (what `JSON.stringify` writes for a string
/// with an unpaired surrogate) was dropped with a "lone leading surrogate"
/// error. It is delivered, with U+FFFD in the value and the exact text
/// kept, and echoed back unchanged by `send_raw`.
#[test]
fn lone_surrogate_message_is_delivered_and_echoed_exactly() {
    let mut lp = Loop::new().unwrap();
    let (a, r) = raw_peer(&mut lp, ChannelOptions::default());
    let (got, errs) = record_raw(&mut lp, &a);
    let lines: [&[u8]; 4] = [
        br#"{"note":"a\ud800b"}"#,
        br#"["\udc00","\ud83d\ude00","\ud83d"]"#,
        br#"{"big":1e400,"small":-1e-400}"#,
        br#"{"plain":"\u00e9"}"#,
    ];
    for l in lines {
        r.write(&mut lp, &[l, b"\n"].concat());
    }
    let g = got.clone();
    run_until(&mut lp, 5000, move |_| g.borrow().len() == 4);
    assert!(errs.borrow().is_empty(), "{:?}", errs.borrow());
    let got = got.borrow();
    assert_eq!(got[0].value(), &json!({"note":"a\u{FFFD}b"}));
    assert_eq!(got[1].value(), &json!(["\u{FFFD}", "😀", "\u{FFFD}"]));
    assert_eq!(got[2].value(), &json!({"big":null,"small":-0.0}));
    assert_eq!(got[3].value(), &json!({"plain":"é"}));
    for (m, l) in got.iter().zip(lines).take(3) {
        assert!(!m.is_exact());
        assert_eq!(&m.json()[..], l);
    }
    assert!(got[3].is_exact());
    for m in got.iter() {
        a.send_raw(&mut lp, m, None).unwrap();
    }
    let buf = r.buf.clone();
    run_until(&mut lp, 5000, move |_| {
        buf.borrow().iter().filter(|&&b| b == b'\n').count() == 4
    });
    let want: Vec<u8> = [
        lines[0],
        b"\n",
        lines[1],
        b"\n",
        lines[2],
        b"\n",
        "{\"plain\":\"é\"}".as_bytes(),
        b"\n",
    ]
    .concat();
    assert_eq!(*r.buf.borrow(), want);
    a.disconnect(&mut lp);
    run_with_deadline(&mut lp, 5000);
    assert_loop_empty(&lp);
}

/// issue 10: a `NODE_HANDLE` whose message held an unpaired surrogate was
/// neither delivered nor answered, so a Node sender queued every later
/// message (its `newconn`s too) forever. It is ACKed and delivered with its
/// handle, and what follows flows.
#[test]
fn lone_surrogate_handle_message_is_acked_and_delivered() {
    let mut lp = Loop::new().unwrap();
    let (a, r) = raw_peer(&mut lp, ChannelOptions::default());
    let (got, errs) = record_raw(&mut lp, &a);
    let handles = Counter::new();
    let hc = handles.clone();
    let g = got.clone();
    a.on_message_raw(&mut lp, move |lp, _, m, h| {
        if let Some(h) = h {
            hc.hit();
            lp.close_if_open(h);
        }
        g.borrow_mut().push(m);
    });
    let srv = bound_tcp(&mut lp);
    r.write_with(
        &mut lp,
        br#"{"cmd":"NODE_HANDLE","type":"net.Server","msg":{"note":"a\ud800b"}}
"#,
        srv,
    );
    r.write(&mut lp, b"{\"next\":1}\n");
    let (g, buf) = (got.clone(), r.buf.clone());
    run_until(&mut lp, 5000, move |_| {
        g.borrow().len() == 2 && buf.borrow().ends_with(b"\n")
    });
    assert_eq!(r.lines(), vec![json!({"cmd":"NODE_HANDLE_ACK"})]);
    assert_eq!(handles.get(), 1);
    {
        let got = got.borrow();
        assert_eq!(got[0].value(), &json!({"note":"a\u{FFFD}b"}));
        assert_eq!(&got[0].json()[..], br#"{"note":"a\ud800b"}"#);
        assert_eq!(got[1].value(), &json!({"next":1}));
    }
    assert!(errs.borrow().is_empty(), "{:?}", errs.borrow());
    lp.close(srv, |_| {}).unwrap();
    a.disconnect(&mut lp);
    run_with_deadline(&mut lp, 5000);
    assert_loop_empty(&lp);
}

/// A line that claims `NODE_HANDLE` but cannot be decoded (too deep, not
/// JSON, too long) never leaves the peer waiting: its fd is closed and the
/// peer gets ACK if an fd came, NACK if none did; later messages flow.
#[test]
fn undecodable_handle_lines_close_the_fd_and_answer_the_peer() {
    isolated(
        "undecodable_handle_lines_close_the_fd_and_answer_the_peer",
        || {
            let mut lp = Loop::new().unwrap();
            let by = Bystander::new(&mut lp);
            let opts = ChannelOptions {
                max_message: 4096,
                max_depth: 10,
                ..ChannelOptions::default()
            };
            let (a, r) = raw_peer(&mut lp, opts);
            let (got, errs, _) = record(&mut lp, &a);
            let u = bound_udp(&mut lp);
            let baseline = open_fds();
            let deep = format!(
                r#"{{"cmd":"NODE_HANDLE","type":"net.Native","msg":{}1{}}}"#,
                "[".repeat(11),
                "]".repeat(11)
            );
            r.write_with(&mut lp, format!("{deep}\n").as_bytes(), u);
            r.write(&mut lp, b"{\"n\":1}\n");
            // The claim comes after the fault.
            r.write_with(
                &mut lp,
                b"{\"msg\":{\"a\":},\"cmd\":\"NODE_HANDLE\",\"type\":\"net.Native\"}\n",
                u,
            );
            r.write(&mut lp, b"{\"n\":2}\n");
            // Too long, with its fd on its first bytes.
            let long = format!(
                r#"{{"cmd":"NODE_HANDLE","type":"net.Native","msg":"{}"}}"#,
                "x".repeat(100_000)
            );
            r.write_with(&mut lp, format!("{long}\n").as_bytes(), u);
            r.write(&mut lp, b"{\"n\":3}\n");
            // No fd at all (last: as in Node, a `NODE_HANDLE` takes an fd
            // that came in the same read even if it belongs further on).
            r.write(
                &mut lp,
                b"{\"cmd\":\"NODE_HANDLE\",\"type\":\"net.Native\",\"msg\":[}\n",
            );
            r.write(&mut lp, b"{\"n\":4}\n");
            let (g, buf) = (got.clone(), r.buf.clone());
            run_until(&mut lp, 5000, move |_| {
                g.borrow().len() == 4 && buf.borrow().iter().filter(|&&b| b == b'\n').count() == 4
            });
            assert_eq!(
                *got.borrow(),
                vec![
                    json!({"n":1}),
                    json!({"n":2}),
                    json!({"n":3}),
                    json!({"n":4})
                ]
            );
            let ack = json!({"cmd":"NODE_HANDLE_ACK"});
            let nack = json!({"cmd":"NODE_HANDLE_NACK"});
            assert_eq!(r.lines(), vec![ack.clone(), ack.clone(), ack, nack]);
            {
                let errs = errs.borrow();
                assert_eq!(errs.len(), 4, "{errs:?}");
                assert!(matches!(
                    errs[0],
                    ChannelError::UndecodableHandle {
                        error: FrameError::TooDeep { limit: 10 },
                        had_fd: true
                    }
                ));
                assert!(matches!(
                    errs[1],
                    ChannelError::UndecodableHandle {
                        error: FrameError::Malformed { .. },
                        had_fd: true
                    }
                ));
                assert!(matches!(
                    errs[2],
                    ChannelError::UndecodableHandle {
                        error: FrameError::Oversized { limit: 4096, .. },
                        had_fd: true
                    }
                ));
                assert!(matches!(
                    errs[3],
                    ChannelError::UndecodableHandle {
                        error: FrameError::Malformed { .. },
                        had_fd: false
                    }
                ));
            }
            assert_eq!(open_fds(), baseline, "an fd of an undecodable line leaked");
            assert!(a.is_connected(&lp));
            lp.close(u, |_| {}).unwrap();
            by.finish(&mut lp);
            a.disconnect(&mut lp);
            run_with_deadline(&mut lp, 5000);
            assert_loop_empty(&lp);
        },
    );
}

/// Runs `f` on a thread with a 256 MiB stack: values nested thousands deep
/// are dropped and compared recursively by serde_json.
fn big_stack(f: impl FnOnce() + Send + 'static) {
    std::thread::Builder::new()
        .stack_size(256 << 20)
        .spawn(f)
        .unwrap()
        .join()
        .unwrap();
}

fn nested(depth: usize) -> String {
    format!("{}{}", "[".repeat(depth), "]".repeat(depth))
}

/// Node's `process.send` writes at most 4182 nested arrays inside its own
/// (4183 levels); that much arrives. Past the limit, a typed error names it
/// and the channel goes on.
#[test]
fn nesting_node_can_write_is_delivered_and_deeper_is_a_typed_error() {
    big_stack(|| {
        let mut lp = Loop::new().unwrap();
        let (a, r) = raw_peer(&mut lp, ChannelOptions::default());
        let (got, errs, _) = record(&mut lp, &a);
        let deepest_node = nested(4183);
        r.write(&mut lp, format!("{deepest_node}\n").as_bytes());
        r.write(
            &mut lp,
            format!("{}\n", nested(uvcluster::ipc::DEFAULT_MAX_DEPTH + 1)).as_bytes(),
        );
        r.write(&mut lp, b"{\"next\":1}\n");
        let g = got.clone();
        run_until(&mut lp, 5000, move |_| g.borrow().len() == 2);
        {
            let got = got.borrow();
            let mut depth = 0;
            let mut v = &got[0];
            while let Some(a) = v.as_array() {
                depth += 1;
                match a.first() {
                    Some(inner) => v = inner,
                    None => break,
                }
            }
            assert_eq!(depth, 4183);
            assert_eq!(got[1], json!({"next":1}));
            // Back the same way, byte for byte.
            assert_eq!(
                uvcluster::ipc::encode(&got[0]).unwrap(),
                format!("{deepest_node}\n").into_bytes()
            );
        }
        assert!(matches!(
            errs.borrow()[..],
            [ChannelError::Frame(FrameError::TooDeep {
                limit: uvcluster::ipc::DEFAULT_MAX_DEPTH
            })]
        ));
        a.disconnect(&mut lp);
        run_with_deadline(&mut lp, 5000);
        got.borrow_mut().clear();
        assert_loop_empty(&lp);
    });
}

/// issue 10, part 5: a peer that floods the channel with malformed lines is
/// disconnected once past its budget, with one typed error, and only the
/// first few lines are reported; another channel is untouched.
#[test]
fn garbage_flood_is_cut_off_with_bounded_reports() {
    let mut lp = Loop::new().unwrap();
    let by = Bystander::new(&mut lp);
    let (a, r) = raw_peer(&mut lp, ChannelOptions::default());
    let (got, errs, disc) = record(&mut lp, &a);
    r.write(&mut lp, b"{\"before\":1}\n");
    // 200,000 garbage lines in one write; the write fails once we hang up.
    let flood = b"garbage\n".repeat(200_000);
    let write_done = Counter::new();
    let wd = write_done.clone();
    lp.write(r.pipe, &[&flood], move |_, _, _| wd.hit())
        .unwrap();
    let d = disc.clone();
    run_until(&mut lp, 10_000, move |_| d.get() == 1);
    assert_eq!(*got.borrow(), vec![json!({"before":1})]);
    {
        let errs = errs.borrow();
        assert_eq!(
            errs.len(),
            uvcluster::ipc::DEFAULT_REPORT_BAD_LINES + 1,
            "{errs:?}"
        );
        for e in &errs[..uvcluster::ipc::DEFAULT_REPORT_BAD_LINES] {
            assert!(
                matches!(e, ChannelError::Frame(FrameError::Malformed { prefix, .. }) if prefix == "garbage"),
                "{e:?}"
            );
        }
        assert!(matches!(
            errs.last().unwrap(),
            ChannelError::TooManyBadLines {
                count: 101,
                limit: uvcluster::ipc::DEFAULT_MAX_BAD_LINES
            }
        ));
    }
    assert!(!a.is_connected(&lp));
    by.finish(&mut lp);
    let (wd, eof) = (write_done.clone(), r.eof.clone());
    run_until(&mut lp, 10_000, move |_| wd.get() == 1 && eof.get() == 1);
    run_with_deadline(&mut lp, 5000);
    assert_loop_empty(&lp);
}

/// Bad lines under the budget past the first few are summed up once, when
/// the channel closes.
#[test]
fn unreported_bad_lines_are_summed_up_at_close() {
    let mut lp = Loop::new().unwrap();
    let opts = ChannelOptions {
        report_bad_lines: 2,
        ..ChannelOptions::default()
    };
    let (a, r) = raw_peer(&mut lp, opts);
    let (got, errs, disc) = record(&mut lp, &a);
    r.write(&mut lp, &b"\n".repeat(50));
    r.write(&mut lp, b"{\"after\":1}\n");
    let g = got.clone();
    run_until(&mut lp, 5000, move |_| g.borrow().len() == 1);
    assert_eq!(errs.borrow().len(), 2);
    assert!(a.is_connected(&lp));
    lp.read_stop(r.pipe).unwrap();
    lp.close(r.pipe, |_| {}).unwrap();
    let d = disc.clone();
    run_until(&mut lp, 5000, move |_| d.get() == 1);
    {
        let errs = errs.borrow();
        assert_eq!(errs.len(), 3, "{errs:?}");
        assert!(matches!(
            errs[0],
            ChannelError::Frame(FrameError::EmptyLine)
        ));
        assert!(matches!(
            errs[2],
            ChannelError::BadLinesNotReported { count: 48 }
        ));
    }
    run_with_deadline(&mut lp, 5000);
    assert_loop_empty(&lp);
}

/// What `send` writes is what `JSON.stringify` writes for the same value.
#[test]
fn send_writes_javascript_numbers() {
    let mut lp = Loop::new().unwrap();
    let (a, r) = raw_peer(&mut lp, ChannelOptions::default());
    a.send(
        &mut lp,
        &json!([1.0, -0.0, 1e21, 1e-7, 0.1, 123456789012.5, f64::MAX, 5e-324]),
        None,
    )
    .unwrap();
    let buf = r.buf.clone();
    run_until(&mut lp, 5000, move |_| buf.borrow().ends_with(b"\n"));
    assert_eq!(
        String::from_utf8_lossy(&r.buf.borrow()),
        "[1,0,1e+21,1e-7,0.1,123456789012.5,1.7976931348623157e+308,5e-324]\n"
    );
    a.disconnect(&mut lp);
    run_with_deadline(&mut lp, 5000);
    assert_loop_empty(&lp);
}
