//! UDP handles (libuv's `test/test-udp-*.c`).
mod util;

use std::cell::Cell;
use std::io;
use std::net::SocketAddr;
use std::rc::Rc;

use util::*;
use uvcluster::uv::{BindFlags, Handle, Loop, Socket, Udp};

fn bound(lp: &mut Loop, addr: &str) -> (Handle<Udp>, SocketAddr) {
    let h = lp.udp_init();
    lp.udp_bind(h, addr.parse().unwrap(), BindFlags::default())
        .unwrap();
    let a = lp.udp_getsockname(h).unwrap();
    (h, a)
}

fn ipv6_loopback_available() -> bool {
    std::net::UdpSocket::bind("[::1]:0").is_ok()
}

/// PING from a client to a server, PONG back to the sender's address
/// (libuv's `udp_send_and_recv`).
fn ping_pong(server_addr: &str) {
    let mut lp = Loop::new().unwrap();
    let (server, saddr) = bound(&mut lp, server_addr);
    let server_recv = Counter::new();
    let sends = Counter::new();
    let client_recv = Counter::new();
    let closes = Counter::new();
    {
        let (r, s, c) = (server_recv.clone(), sends.clone(), closes.clone());
        lp.udp_recv_start(server, move |lp, h, res| {
            let (data, from) = res.unwrap();
            assert_eq!(data, b"PING");
            r.hit();
            let s = s.clone();
            lp.udp_send(h, &[b"PO", b"NG"], from, move |_, _, r| {
                r.unwrap();
                s.hit();
            })
            .unwrap();
            let c = c.clone();
            lp.close(h, move |_| c.hit()).unwrap();
        })
        .unwrap();
    }
    assert!(lp.is_active(server));
    let client = lp.udp_init();
    {
        let (r, c) = (client_recv.clone(), closes.clone());
        lp.udp_recv_start(client, move |lp, h, res| {
            let (data, from) = res.unwrap();
            assert_eq!(data, b"PONG");
            assert_eq!(from, saddr);
            r.hit();
            let c = c.clone();
            lp.close(h, move |_| c.hit()).unwrap();
        })
        .unwrap();
    }
    // A handle without a socket binds the wildcard address of the family.
    let unspecified: SocketAddr = if saddr.is_ipv6() {
        "[::]:0".parse().unwrap()
    } else {
        "0.0.0.0:0".parse().unwrap()
    };
    assert_eq!(
        lp.udp_getsockname(client).unwrap().ip(),
        unspecified.ip(),
        "recv_start binds 0.0.0.0 when unbound"
    );
    let _ = unspecified;
    {
        let s = sends.clone();
        lp.udp_send(client, &[b"PING"], saddr, move |_, _, r| {
            r.unwrap();
            s.hit();
        })
        .unwrap();
    }
    run_with_deadline(&mut lp, 5000);
    assert_eq!(server_recv.get(), 1);
    assert_eq!(client_recv.get(), 1);
    assert_eq!(sends.get(), 2);
    assert_eq!(closes.get(), 2);
    assert_loop_empty(&lp);
}

#[test]
fn udp_send_and_recv() {
    ping_pong("127.0.0.1:0");
}

#[test]
fn udp_send_and_recv_ipv6() {
    if !ipv6_loopback_available() {
        eprintln!("skipped: IPv6 loopback unavailable");
        return;
    }
    let mut lp = Loop::new().unwrap();
    let (server, saddr) = bound(&mut lp, "[::1]:0");
    assert!(saddr.is_ipv6());
    let got = Counter::new();
    let g = got.clone();
    lp.udp_recv_start(server, move |lp, h, res| {
        let (data, from) = res.unwrap();
        assert_eq!(data, b"six");
        assert!(from.is_ipv6());
        g.hit();
        lp.close(h, |_| {}).unwrap();
    })
    .unwrap();
    // The client's socket is created by the send, in the destination's family.
    let client = lp.udp_init();
    let sent = Counter::new();
    let s = sent.clone();
    lp.udp_send(client, &[b"six"], saddr, move |lp, h, r| {
        r.unwrap();
        s.hit();
        lp.close(h, |_| {}).unwrap();
    })
    .unwrap();
    assert!(lp.udp_getsockname(client).unwrap().is_ipv6());
    run_with_deadline(&mut lp, 5000);
    assert_eq!((got.get(), sent.get()), (1, 1));
    assert_loop_empty(&lp);
}

#[test]
fn udp_recv_stop_and_restart() {
    let mut lp = Loop::new().unwrap();
    let (rx, addr) = bound(&mut lp, "127.0.0.1:0");
    let tx = lp.udp_init();
    let log = Log::new();
    let l = log.clone();
    lp.udp_recv_start(rx, move |lp, h, res| {
        let (data, _) = res.unwrap();
        l.push(String::from_utf8_lossy(data).into_owned());
        lp.udp_recv_stop(h).unwrap();
    })
    .unwrap();
    lp.udp_send(tx, &[b"one"], addr, |_, _, r| r.unwrap())
        .unwrap();
    lp.udp_send(tx, &[b"two"], addr, |_, _, r| r.unwrap())
        .unwrap();
    // Both datagrams are queued in the kernel before the loop runs; the
    // callback stops after the first, and the loop then has nothing active.
    run_with_deadline(&mut lp, 5000);
    assert_eq!(log.joined(), "one");
    assert!(!lp.is_active(rx));
    assert!(!lp.udp_is_receiving(rx));
    // The second datagram waited in the kernel.
    let l = log.clone();
    lp.udp_recv_start(rx, move |lp, h, res| {
        let (data, _) = res.unwrap();
        l.push(String::from_utf8_lossy(data).into_owned());
        lp.udp_recv_stop(h).unwrap();
    })
    .unwrap();
    assert!(lp.is_active(rx));
    assert_eq!(
        lp.udp_recv_start(rx, |_, _, _| unreachable!())
            .unwrap_err()
            .raw_os_error(),
        Some(libc_ealready())
    );
    run_with_deadline(&mut lp, 5000);
    assert_eq!(log.joined(), "one two");
    lp.close(rx, |_| {}).unwrap();
    lp.close(tx, |_| {}).unwrap();
    run_with_deadline(&mut lp, 5000);
    assert_loop_empty(&lp);
}

fn libc_ealready() -> i32 {
    nix::libc::EALREADY
}

#[test]
fn udp_send_callbacks_in_order_and_deferred() {
    let mut lp = Loop::new().unwrap();
    let (rx, addr) = bound(&mut lp, "127.0.0.1:0");
    let tx = lp.udp_init();
    let order = Rc::new(std::cell::RefCell::new(Vec::new()));
    let inside = Rc::new(Cell::new(true));
    for i in 0..20u32 {
        let (o, inside) = (order.clone(), inside.clone());
        lp.udp_send(tx, &[&i.to_be_bytes()], addr, move |_, _, r| {
            assert!(!inside.get(), "send callback ran inside udp_send");
            r.unwrap();
            o.borrow_mut().push(i);
        })
        .unwrap();
    }
    inside.set(false);
    assert!(lp.alive(), "sends in flight keep the loop alive");
    let received = Rc::new(std::cell::RefCell::new(Vec::new()));
    let r = received.clone();
    lp.udp_recv_start(rx, move |lp, h, res| {
        let (data, _) = res.unwrap();
        r.borrow_mut()
            .push(u32::from_be_bytes(data.try_into().unwrap()));
        if r.borrow().len() == 20 {
            lp.close(h, |_| {}).unwrap();
        }
    })
    .unwrap();
    run_with_deadline(&mut lp, 5000);
    assert_eq!(*order.borrow(), (0..20).collect::<Vec<_>>());
    assert_eq!(*received.borrow(), (0..20).collect::<Vec<_>>());
    lp.close(tx, |_| {}).unwrap();
    run_with_deadline(&mut lp, 5000);
    assert_loop_empty(&lp);
}

/// Closing a handle runs the callbacks of its outstanding sends before the
/// close callback: sends already handed to the kernel report success, any
/// still queued report `ECANCELED` (libuv's `uv__udp_finish_close`).
#[test]
fn udp_close_runs_send_callbacks_before_close_cb() {
    let mut lp = Loop::new().unwrap();
    let (rx, addr) = bound(&mut lp, "127.0.0.1:0");
    let tx = lp.udp_init();
    let log = Log::new();
    let big = vec![7u8; 60_000];
    for i in 0..200 {
        let l = log.clone();
        lp.udp_send(tx, &[&big], addr, move |_, _, r| match r {
            Ok(()) => l.push(format!("ok{i}")),
            Err(e) => {
                assert_eq!(e.raw_os_error(), Some(nix::libc::ECANCELED));
                l.push(format!("cancel{i}"));
            }
        })
        .unwrap();
    }
    let queued = lp.udp_send_queue_count(tx);
    let l = log.clone();
    lp.close(tx, move |_| l.push("close")).unwrap();
    // Sends on a closing handle are refused and their callbacks dropped.
    assert!(
        lp.udp_send(tx, &[b"x"], addr, |_, _, _| unreachable!())
            .is_err()
    );
    lp.close(rx, |_| {}).unwrap();
    run_with_deadline(&mut lp, 5000);
    let entries = log.take();
    assert_eq!(entries.len(), 201);
    assert_eq!(entries.last().unwrap(), "close");
    let cancelled = entries.iter().filter(|e| e.starts_with("cancel")).count();
    assert_eq!(cancelled, queued);
    // In order: every ok before every cancel, indices increasing.
    for (i, e) in entries[..200].iter().enumerate() {
        assert!(e.ends_with(&format!("{i}")) && (e.starts_with("ok") || e.starts_with("cancel")));
    }
    assert_loop_empty(&lp);
}

#[test]
fn udp_try_send() {
    let mut lp = Loop::new().unwrap();
    let (rx, addr) = bound(&mut lp, "127.0.0.1:0");
    let tx = lp.udp_init();
    assert_eq!(lp.udp_try_send(tx, &[b"ab", b"cd"], addr).unwrap(), 4);
    let got = Counter::new();
    let g = got.clone();
    lp.udp_recv_start(rx, move |lp, h, res| {
        let (data, _) = res.unwrap();
        assert_eq!(data, b"abcd");
        g.hit();
        lp.close(h, |_| {}).unwrap();
    })
    .unwrap();
    run_with_deadline(&mut lp, 5000);
    assert_eq!(got.get(), 1);
    lp.close(tx, |_| {}).unwrap();
    run_with_deadline(&mut lp, 5000);
    assert!(lp.udp_try_send(tx, &[b"x"], addr).is_err(), "stale handle");
    assert_loop_empty(&lp);
}

#[test]
fn udp_bind_errors() {
    let mut lp = Loop::new().unwrap();
    let (a, addr) = bound(&mut lp, "127.0.0.1:0");
    // Binding twice is EINVAL; binding a port in use is EADDRINUSE, at once.
    assert!(lp.udp_bind(a, addr, BindFlags::default()).is_err());
    let b = lp.udp_init();
    let e = lp.udp_bind(b, addr, BindFlags::default()).unwrap_err();
    assert_eq!(e.raw_os_error(), Some(nix::libc::EADDRINUSE));
    // With SO_REUSEPORT on both, two sockets share the port.
    let flags = BindFlags {
        reuse_port: true,
        ..Default::default()
    };
    let (c, caddr) = bound_with(&mut lp, "127.0.0.1:0", flags);
    let d = lp.udp_init();
    lp.udp_bind(d, caddr, flags).unwrap();
    assert_eq!(lp.udp_getsockname(d).unwrap(), caddr);
    for h in [a, b, c, d] {
        lp.close(h, |_| {}).unwrap();
    }
    assert!(lp.close(a, |_| {}).is_err(), "closing twice is an error");
    run_with_deadline(&mut lp, 5000);
    assert!(lp.udp_getsockname(a).is_err(), "stale handle");
    assert_loop_empty(&lp);
}

fn bound_with(lp: &mut Loop, addr: &str, flags: BindFlags) -> (Handle<Udp>, SocketAddr) {
    let h = lp.udp_init();
    lp.udp_bind(h, addr.parse().unwrap(), flags).unwrap();
    let a = lp.udp_getsockname(h).unwrap();
    (h, a)
}

/// A UDP socket sent over an IPC pipe is adopted by the receiver, which
/// receives on it (libuv's `ipc_send_recv` family, with a UDP handle).
#[test]
fn udp_socket_over_ipc() {
    let mut lp = Loop::new().unwrap();
    let (a, b) = lp.pipe_pair(true).unwrap();
    let (orig, addr) = bound(&mut lp, "127.0.0.1:0");
    let received = Counter::new();
    let accepted: Rc<Cell<Option<Handle<Udp>>>> = Rc::default();
    {
        let (received, accepted) = (received.clone(), accepted.clone());
        lp.read_start(b, move |lp, pipe, r: io::Result<&[u8]>| {
            let data = r.unwrap();
            if data.is_empty() {
                lp.close(pipe, |_| {}).unwrap();
                return;
            }
            assert_eq!(data, b"U");
            assert_eq!(lp.pipe_pending_count(pipe), 1);
            let Socket::Udp(u) = lp.pipe_accept_pending(pipe).unwrap() else {
                panic!("expected a UDP handle");
            };
            assert_eq!(lp.udp_getsockname(u).unwrap(), addr);
            accepted.set(Some(u));
            let received = received.clone();
            lp.udp_recv_start(u, move |lp, u, r| {
                let (data, _) = r.unwrap();
                assert_eq!(data, b"via ipc");
                received.hit();
                lp.close(u, |_| {}).unwrap();
            })
            .unwrap();
            // Sender side: the original may close; the receiver's copy lives on.
            let sender = lp.udp_init();
            lp.udp_send(sender, &[b"via ipc"], addr, |lp, s, r| {
                r.unwrap();
                lp.close(s, |_| {}).unwrap();
            })
            .unwrap();
        })
        .unwrap();
    }
    lp.write2(a, &[b"U"], orig, move |lp, a, r| {
        r.unwrap();
        lp.close(orig, |_| {}).unwrap();
        lp.close(a, |_| {}).unwrap();
    })
    .unwrap();
    run_with_deadline(&mut lp, 5000);
    assert_eq!(received.get(), 1);
    assert!(accepted.get().is_some());
    assert_loop_empty(&lp);
}

/// libuv's `udp_ref`/`udp_ref2`/`udp_ref3`: an unreferenced receiving
/// handle does not keep the loop alive, but a send in flight does.
#[test]
fn udp_ref() {
    let mut lp = Loop::new().unwrap();
    let (h, addr) = bound(&mut lp, "127.0.0.1:0");
    lp.udp_recv_start(h, |_, _, _| {}).unwrap();
    lp.unref_handle(h).unwrap();
    assert!(!lp.alive());
    let sent = Counter::new();
    let s = sent.clone();
    lp.udp_send(h, &[b"self"], addr, move |_, _, r| {
        r.unwrap();
        s.hit();
    })
    .unwrap();
    assert!(lp.alive(), "a send is a request");
    run_with_deadline(&mut lp, 5000);
    assert_eq!(sent.get(), 1);
    assert!(lp.is_active(h));
    lp.close(h, |_| {}).unwrap();
    run_with_deadline(&mut lp, 5000);
    assert_loop_empty(&lp);
}
