//! TCP scenarios ported from libuv's test suite (`test/test-tcp-*.c`,
//! `test-ping-pong.c`, `test-shutdown-*.c`, `test-emfile.c`, ...).
mod util;

use std::cell::{Cell, RefCell};
use std::io;
use std::net::SocketAddr;
use std::os::fd::OwnedFd;
use std::rc::Rc;
use std::time::Duration;

use util::*;
use uvcluster::uv::{BindFlags, Handle, Loop, StaleHandle, Tcp};

const ECANCELED: i32 = nix::libc::ECANCELED;

fn errno_of(e: &io::Error) -> Option<i32> {
    e.raw_os_error()
}

/// A listening server on `addr` whose connections are handed to `on_conn`.
fn server(
    lp: &mut Loop,
    addr: &str,
    mut on_conn: impl FnMut(&mut Loop, Handle<Tcp>) + 'static,
) -> (Handle<Tcp>, SocketAddr) {
    let s = lp.tcp_init();
    lp.tcp_bind(s, addr.parse().unwrap(), BindFlags::default())
        .unwrap();
    lp.tcp_listen(s, 128, move |lp, _, c| on_conn(lp, c.unwrap()))
        .unwrap();
    let a = lp.tcp_getsockname(s).unwrap();
    (s, a)
}

/// Echoes everything; closes on EOF.
fn echo(lp: &mut Loop, c: Handle<Tcp>) {
    lp.read_start(c, |lp, c, r| match r {
        Ok([]) | Err(_) => lp.close(c, |_| {}).unwrap(),
        Ok(data) => lp.write(c, &[data], |_, _, r| r.unwrap()).unwrap(),
    })
    .unwrap();
}

fn ipv6_loopback_available() -> bool {
    std::net::TcpListener::bind("[::1]:0").is_ok()
}

// ----- ping-pong ------------------------------------------------------------

/// libuv's `tcp_ping_pong`: PING and PONG one at a time, then shutdown, EOF
/// on both sides, close.
fn ping_pong(addr: &str) {
    const PINGS: usize = 1000;
    let mut lp = Loop::new().unwrap();
    let (srv, saddr) = server(&mut lp, addr, echo);
    let client = lp.tcp_init();
    let pongs = Counter::new();
    let eof = Counter::new();
    let shut = Counter::new();
    let (p, e, sh) = (pongs.clone(), eof.clone(), shut.clone());
    lp.tcp_connect(client, saddr, move |lp, c, r| {
        r.unwrap();
        lp.write(c, &[b"PING"], |_, _, r| r.unwrap()).unwrap();
        let acc = RefCell::new(Vec::new());
        let (p, e, sh) = (p.clone(), e.clone(), sh.clone());
        lp.read_start(c, move |lp, c, r| {
            let data = r.unwrap();
            if data.is_empty() {
                e.hit();
                lp.close(c, |_| {}).unwrap();
                lp.close(srv, |_| {}).unwrap();
                return;
            }
            let mut acc = acc.borrow_mut();
            acc.extend_from_slice(data);
            while acc.len() >= 4 {
                assert_eq!(&acc[..4], b"PING");
                acc.drain(..4);
                p.hit();
                if p.get() == PINGS {
                    let sh = sh.clone();
                    lp.shutdown(c, move |_, _, r| {
                        r.unwrap();
                        sh.hit();
                    })
                    .unwrap();
                } else {
                    lp.write(c, &[b"PI", b"NG"], |_, _, r| r.unwrap()).unwrap();
                }
            }
        })
        .unwrap();
    })
    .unwrap();
    run_with_deadline(&mut lp, 10_000);
    assert_eq!(pongs.get(), PINGS);
    assert_eq!(shut.get(), 1);
    assert_eq!(eof.get(), 1);
    assert_loop_empty(&lp);
}

#[test]
fn tcp_ping_pong_v4() {
    ping_pong("127.0.0.1:0");
}

#[test]
fn tcp_ping_pong_v6() {
    if !ipv6_loopback_available() {
        eprintln!("skipped: IPv6 loopback unavailable");
        return;
    }
    ping_pong("[::1]:0");
}

// ----- writealot ------------------------------------------------------------

/// libuv's `tcp_writealot`: one 64 MiB write to a reader that pauses (read
/// stop, a timer, read start) every 4 MiB; the write completes through
/// backpressure, its callback and the shutdown's run before the client sees
/// the server's EOF, and the queue drains to 0.
#[test]
fn tcp_writealot() {
    const TOTAL: usize = 64 << 20;
    const PAUSE_EVERY: usize = 4 << 20;
    let mut lp = Loop::new().unwrap();
    let received = Rc::new(Cell::new(0usize));
    let pauses = Counter::new();
    let server_eof = Counter::new();
    let (r, pa, se) = (received.clone(), pauses.clone(), server_eof.clone());
    let (srv, saddr) = server(&mut lp, "127.0.0.1:0", move |lp, c| {
        start_slow_read(lp, c, r.clone(), pa.clone(), se.clone(), PAUSE_EVERY);
    });
    let log = Log::new();
    let client = lp.tcp_init();
    let l = log.clone();
    lp.tcp_connect(client, saddr, move |lp, c, r| {
        r.unwrap();
        let data = vec![b'x'; TOTAL];
        let l2 = l.clone();
        lp.write(c, &[&data], move |lp, c, r| {
            r.unwrap();
            assert_eq!(lp.write_queue_size(c), 0);
            l2.push("write");
        })
        .unwrap();
        assert!(lp.write_queue_size(c) > 0, "64 MiB cannot fit the socket");
        let l3 = l.clone();
        lp.shutdown(c, move |_, _, r| {
            r.unwrap();
            l3.push("shutdown");
        })
        .unwrap();
        let l4 = l.clone();
        lp.read_start(c, move |lp, c, r| {
            assert!(r.unwrap().is_empty(), "the server sends nothing");
            l4.push("eof");
            lp.close(c, |_| {}).unwrap();
            lp.close(srv, |_| {}).unwrap();
        })
        .unwrap();
    })
    .unwrap();
    run_with_deadline(&mut lp, 60_000);
    assert_eq!(received.get(), TOTAL);
    assert_eq!(server_eof.get(), 1);
    assert!(pauses.get() >= TOTAL / PAUSE_EVERY - 1);
    assert_eq!(log.joined(), "write shutdown eof");
    assert_loop_empty(&lp);
}

fn start_slow_read(
    lp: &mut Loop,
    c: Handle<Tcp>,
    received: Rc<Cell<usize>>,
    pauses: Counter,
    eof: Counter,
    every: usize,
) {
    let (r, p, e) = (received.clone(), pauses.clone(), eof.clone());
    lp.read_start(c, move |lp, c, res| {
        let data = res.unwrap();
        if data.is_empty() {
            e.hit();
            lp.close(c, |_| {}).unwrap();
            return;
        }
        let before = r.get();
        r.set(before + data.len());
        if before / every != r.get() / every {
            // Pause: stop reading, resume from a timer.
            lp.read_stop(c).unwrap();
            p.hit();
            let t = lp.timer_init();
            let (r, p, e) = (r.clone(), p.clone(), e.clone());
            lp.timer_start(t, Duration::from_millis(1), Duration::ZERO, move |lp, t| {
                lp.close(t, |_| {}).unwrap();
                start_slow_read(lp, c, r.clone(), p.clone(), e.clone(), every);
            })
            .unwrap();
        }
    })
    .unwrap();
}

// ----- write queue, close ---------------------------------------------------

/// libuv's `tcp_write_queue_order`: writes to a peer that does not read
/// build a queue; closing completes them in order, the unsent ones with
/// `ECANCELED`, all before the close callback.
#[test]
fn tcp_write_queue_order() {
    const WRITES: usize = 64;
    let mut lp = Loop::new().unwrap();
    let accepted: Rc<Cell<Option<Handle<Tcp>>>> = Rc::default();
    let a = accepted.clone();
    let (srv, saddr) = server(&mut lp, "127.0.0.1:0", move |_, c| a.set(Some(c)));
    let log = Log::new();
    let client = lp.tcp_init();
    let l = log.clone();
    lp.tcp_connect(client, saddr, move |lp, c, r| {
        r.unwrap();
        let chunk = vec![0u8; 1 << 20];
        for i in 0..WRITES {
            let l = l.clone();
            lp.write(c, &[&chunk], move |_, _, r| match r {
                Ok(()) => l.push(format!("ok{i}")),
                Err(e) => {
                    assert_eq!(errno_of(&e), Some(ECANCELED));
                    l.push(format!("cancel{i}"));
                }
            })
            .unwrap();
        }
        assert!(lp.write_queue_size(c) > 0);
        // Close from a timer, once the loop has had a chance to write some.
        let t = lp.timer_init();
        let l = l.clone();
        lp.timer_start(
            t,
            Duration::from_millis(10),
            Duration::ZERO,
            move |lp, t| {
                lp.close(t, |_| {}).unwrap();
                let l = l.clone();
                lp.close(c, move |_| l.push("close")).unwrap();
            },
        )
        .unwrap();
    })
    .unwrap();
    run_until(&mut lp, 10_000, |_| log.joined().ends_with("close"));
    let entries = log.take();
    assert_eq!(entries.len(), WRITES + 1);
    let first_cancel = entries
        .iter()
        .position(|e| e.starts_with("cancel"))
        .expect("some writes were still queued");
    for (i, e) in entries[..WRITES].iter().enumerate() {
        let want = if i < first_cancel { "ok" } else { "cancel" };
        assert_eq!(*e, format!("{want}{i}"));
    }
    lp.close(accepted.get().unwrap(), |_| {}).unwrap();
    lp.close(srv, |_| {}).unwrap();
    run_with_deadline(&mut lp, 5000);
    assert_loop_empty(&lp);
}

/// libuv's `tcp_close`: writes issued, then close at once: every write
/// callback runs (successfully: the data was written) before the close
/// callback, and the peer receives all the data.
#[test]
fn tcp_close_after_writes() {
    const WRITES: usize = 32;
    let mut lp = Loop::new().unwrap();
    let got = Rc::new(Cell::new(0usize));
    let g = got.clone();
    let srv_h: Rc<Cell<Option<Handle<Tcp>>>> = Rc::default();
    let sh = srv_h.clone();
    let (srv, saddr) = server(&mut lp, "127.0.0.1:0", move |lp, c| {
        let (g, sh) = (g.clone(), sh.clone());
        lp.read_start(c, move |lp, c, r| {
            let data = r.unwrap();
            if data.is_empty() {
                lp.close(c, |_| {}).unwrap();
                lp.close(sh.get().unwrap(), |_| {}).unwrap();
            } else {
                g.set(g.get() + data.len());
            }
        })
        .unwrap();
    });
    srv_h.set(Some(srv));
    let log = Log::new();
    let client = lp.tcp_init();
    let l = log.clone();
    lp.tcp_connect(client, saddr, move |lp, c, r| {
        r.unwrap();
        for _ in 0..WRITES {
            let l = l.clone();
            lp.write(c, &[b"PING"], move |_, _, r| {
                r.unwrap();
                l.push("w");
            })
            .unwrap();
        }
        let l = l.clone();
        lp.close(c, move |_| l.push("close")).unwrap();
    })
    .unwrap();
    run_with_deadline(&mut lp, 5000);
    let mut want = vec!["w"; WRITES];
    want.push("close");
    assert_eq!(log.joined(), want.join(" "));
    assert_eq!(got.get(), WRITES * 4);
    assert_loop_empty(&lp);
}

/// libuv's `tcp_close_while_connecting`: the connect callback runs with
/// `ECANCELED`, before the close callback.
#[test]
fn tcp_close_while_connecting() {
    let mut lp = Loop::new().unwrap();
    let (srv, saddr) = server(&mut lp, "127.0.0.1:0", |lp, c| lp.close(c, |_| {}).unwrap());
    let log = Log::new();
    let client = lp.tcp_init();
    let l = log.clone();
    lp.tcp_connect(client, saddr, move |_, _, r| {
        assert_eq!(errno_of(&r.unwrap_err()), Some(ECANCELED));
        l.push("connect");
    })
    .unwrap();
    // A second connect while one is outstanding is refused.
    assert_eq!(
        errno_of(
            &lp.tcp_connect(client, saddr, |_, _, _| unreachable!())
                .unwrap_err()
        ),
        Some(nix::libc::EALREADY)
    );
    let l = log.clone();
    lp.close(client, move |_| l.push("close")).unwrap();
    lp.close(srv, |_| {}).unwrap();
    run_with_deadline(&mut lp, 5000);
    assert_eq!(log.joined(), "connect close");
    assert_loop_empty(&lp);
}

// ----- shutdown -------------------------------------------------------------

fn connected_pair(lp: &mut Loop) -> (Handle<Tcp>, Handle<Tcp>, Handle<Tcp>) {
    let accepted: Rc<Cell<Option<Handle<Tcp>>>> = Rc::default();
    let a = accepted.clone();
    let (srv, saddr) = server(lp, "127.0.0.1:0", move |_, c| a.set(Some(c)));
    let client = lp.tcp_init();
    let connected = Counter::new();
    let cc = connected.clone();
    lp.tcp_connect(client, saddr, move |_, _, r| {
        r.unwrap();
        cc.hit();
    })
    .unwrap();
    run_until(lp, 5000, |_| {
        connected.get() == 1 && accepted.get().is_some()
    });
    (srv, client, accepted.get().unwrap())
}

/// libuv's `shutdown_close_tcp`: a shutdown followed at once by close still
/// gets its callback, before the close callback.
#[test]
fn tcp_shutdown_close() {
    let mut lp = Loop::new().unwrap();
    let (srv, client, conn) = connected_pair(&mut lp);
    let log = Log::new();
    let l = log.clone();
    lp.shutdown(client, move |_, _, r| {
        assert!(r.is_ok() || errno_of(&r.unwrap_err()) == Some(ECANCELED));
        l.push("shutdown");
    })
    .unwrap();
    let l = log.clone();
    lp.close(client, move |_| l.push("close")).unwrap();
    for h in [srv, conn] {
        lp.close(h, |_| {}).unwrap();
    }
    run_with_deadline(&mut lp, 5000);
    assert_eq!(log.joined(), "shutdown close");
    assert_loop_empty(&lp);
}

/// libuv's `shutdown_eof` and `shutdown_twice`: after writing and shutting
/// down, the peer reads the data then EOF; the shutting side can still read
/// the peer's reply and its EOF. A second shutdown is rejected (`ENOTCONN`)
/// and its callback dropped; a write after shutdown fails (`EPIPE`).
#[test]
fn tcp_shutdown_eof_and_twice() {
    let mut lp = Loop::new().unwrap();
    let (srv, client, conn) = connected_pair(&mut lp);
    let log = Log::new();
    let l = log.clone();
    lp.read_start(conn, move |lp, c, r| {
        let data = r.unwrap();
        if data.is_empty() {
            l.push("server-eof");
            lp.write(c, &[b"BYE"], |lp, c, r| {
                r.unwrap();
                lp.close(c, |_| {}).unwrap();
            })
            .unwrap();
        } else {
            l.push(format!("server-{}", String::from_utf8_lossy(data)));
        }
    })
    .unwrap();
    lp.write(client, &[b"HELLO"], |_, _, r| r.unwrap()).unwrap();
    let l = log.clone();
    lp.shutdown(client, move |_, _, r| {
        r.unwrap();
        l.push("shutdown");
    })
    .unwrap();
    let e = lp.shutdown(client, |_, _, _| unreachable!()).unwrap_err();
    assert_eq!(errno_of(&e), Some(nix::libc::ENOTCONN));
    let e = lp
        .write(client, &[b"late"], |_, _, _| unreachable!())
        .unwrap_err();
    assert_eq!(errno_of(&e), Some(nix::libc::EPIPE));
    let l = log.clone();
    lp.read_start(client, move |lp, c, r| {
        let data = r.unwrap();
        if data.is_empty() {
            l.push("client-eof");
            lp.close(c, |_| {}).unwrap();
            lp.close(srv, |_| {}).unwrap();
        } else {
            l.push(format!("client-{}", String::from_utf8_lossy(data)));
        }
    })
    .unwrap();
    run_with_deadline(&mut lp, 5000);
    let joined = log.joined();
    // "shutdown" may come before or after the server's reads; the rest is ordered.
    let without: Vec<_> = log.take().into_iter().filter(|e| e != "shutdown").collect();
    assert!(joined.contains("shutdown"), "{joined}");
    assert_eq!(
        without.join(" "),
        "server-HELLO server-eof client-BYE client-eof"
    );
    assert_loop_empty(&lp);
}

// ----- reading --------------------------------------------------------------

/// libuv's `tcp_read_stop_start`: data that arrives while reading is
/// stopped waits, the loop does not spin meanwhile, and `read_start` from a
/// timer picks it up.
#[test]
fn tcp_read_stop_start() {
    let mut lp = Loop::new().unwrap();
    let (srv, client, conn) = connected_pair(&mut lp);
    let iterations = Counter::new();
    let prep = lp.prepare_init();
    let it = iterations.clone();
    lp.prepare_start(prep, move |_, _| it.hit()).unwrap();
    lp.unref_handle(prep).unwrap();
    let log = Log::new();
    let l = log.clone();
    let it = iterations.clone();
    lp.read_start(client, move |lp, c, r| {
        let data = r.unwrap();
        assert_eq!(data, b"A");
        l.push("A");
        lp.read_stop(c).unwrap();
        // More data arrives while we are not reading.
        lp.write(conn, &[b"B"], |_, _, r| r.unwrap()).unwrap();
        let t = lp.timer_init();
        let start = it.get();
        let (l, it) = (l.clone(), it.clone());
        lp.timer_start(
            t,
            Duration::from_millis(50),
            Duration::ZERO,
            move |lp, t| {
                lp.close(t, |_| {}).unwrap();
                let spins = it.get() - start;
                assert!(spins < 20, "the loop spun {spins} times while not reading");
                let l = l.clone();
                lp.read_start(c, move |lp, c, r| {
                    assert_eq!(r.unwrap(), b"B");
                    l.push("B");
                    lp.close(c, |_| {}).unwrap();
                })
                .unwrap();
            },
        )
        .unwrap();
    })
    .unwrap();
    lp.write(conn, &[b"A"], |_, _, r| r.unwrap()).unwrap();
    lp.read_start(conn, move |lp, c, r| {
        assert!(r.unwrap().is_empty());
        lp.close(c, |_| {}).unwrap();
        lp.close(srv, |_| {}).unwrap();
    })
    .unwrap();
    run_with_deadline(&mut lp, 5000);
    assert_eq!(log.joined(), "A B");
    lp.close(prep, |_| {}).unwrap();
    run_with_deadline(&mut lp, 5000);
    assert_loop_empty(&lp);
}

/// libuv's `tcp_try_write`: `try_write` writes at once; it returns
/// `WouldBlock` once the socket is full and while writes are queued.
#[test]
fn tcp_try_write() {
    let mut lp = Loop::new().unwrap();
    let (srv, client, conn) = connected_pair(&mut lp);
    assert_eq!(lp.try_write(client, &[b"he", b"llo"]).unwrap(), 5);
    let chunk = vec![1u8; 64 << 10];
    let mut sent = 5;
    loop {
        match lp.try_write(client, &[&chunk]) {
            Ok(n) => sent += n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
            Err(e) => panic!("{e}"),
        }
        assert!(sent < 256 << 20, "try_write never blocked");
    }
    let wrote = Counter::new();
    let w = wrote.clone();
    lp.write(client, &[&chunk], move |_, _, r| {
        r.unwrap();
        w.hit();
    })
    .unwrap();
    assert!(lp.write_queue_size(client) > 0);
    let e = lp.try_write(client, &[b"x"]).unwrap_err();
    assert_eq!(e.kind(), io::ErrorKind::WouldBlock, "queued writes first");
    let total = sent + chunk.len();
    let got = Rc::new(Cell::new(0usize));
    let g = got.clone();
    lp.read_start(conn, move |lp, c, r| {
        g.set(g.get() + r.unwrap().len());
        if g.get() == total {
            lp.close(c, |_| {}).unwrap();
            lp.close(client, |_| {}).unwrap();
            lp.close(srv, |_| {}).unwrap();
        }
    })
    .unwrap();
    run_with_deadline(&mut lp, 10_000);
    assert_eq!(got.get(), total);
    assert_eq!(wrote.get(), 1);
    assert_loop_empty(&lp);
}

/// libuv's `tcp_write_after_connect`: a write issued right after
/// `tcp_connect` is queued and sent once connected; the connect callback
/// runs first.
#[test]
fn tcp_write_after_connect() {
    let mut lp = Loop::new().unwrap();
    let log = Log::new();
    let l = log.clone();
    let srv_h: Rc<Cell<Option<Handle<Tcp>>>> = Rc::default();
    let sh = srv_h.clone();
    let (srv, saddr) = server(&mut lp, "127.0.0.1:0", move |lp, c| {
        let (l, sh) = (l.clone(), sh.clone());
        lp.read_start(c, move |lp, c, r| {
            let data = r.unwrap();
            if data.is_empty() {
                lp.close(c, |_| {}).unwrap();
                lp.close(sh.get().unwrap(), |_| {}).unwrap();
            } else {
                l.push(format!("got-{}", String::from_utf8_lossy(data)));
            }
        })
        .unwrap();
    });
    srv_h.set(Some(srv));
    let client = lp.tcp_init();
    let l = log.clone();
    lp.tcp_connect(client, saddr, move |_, _, r| {
        r.unwrap();
        l.push("connect");
    })
    .unwrap();
    let l = log.clone();
    lp.write(client, &[b"early"], move |lp, c, r| {
        r.unwrap();
        l.push("write");
        lp.close(c, |_| {}).unwrap();
    })
    .unwrap();
    run_with_deadline(&mut lp, 5000);
    assert_eq!(log.joined(), "connect write got-early");
    assert_loop_empty(&lp);
}

// ----- errors ---------------------------------------------------------------

/// libuv's `tcp_bind_error_addrinuse_listen` and `..._connect`: binding a
/// port in use succeeds, the error surfaces at listen, or through connect's
/// callback.
#[test]
fn tcp_bind_error_addrinuse() {
    let mut lp = Loop::new().unwrap();
    let (srv, saddr) = server(&mut lp, "127.0.0.1:0", |_, _| unreachable!());
    let second = lp.tcp_init();
    lp.tcp_bind(second, saddr, BindFlags::default()).unwrap();
    let e = lp
        .tcp_listen(second, 128, |_, _, _| unreachable!())
        .unwrap_err();
    assert_eq!(errno_of(&e), Some(nix::libc::EADDRINUSE));
    let third = lp.tcp_init();
    lp.tcp_bind(third, saddr, BindFlags::default()).unwrap();
    let called = Counter::new();
    let c = called.clone();
    lp.tcp_connect(third, saddr, move |_, _, r| {
        assert_eq!(errno_of(&r.unwrap_err()), Some(nix::libc::EADDRINUSE));
        c.hit();
    })
    .unwrap();
    run_until(&mut lp, 5000, |_| called.get() == 1);
    for h in [srv, second, third] {
        lp.close(h, |_| {}).unwrap();
    }
    run_with_deadline(&mut lp, 5000);
    assert_loop_empty(&lp);
}

/// libuv's `tcp_connect_error_after_write`/`connection_fail`: connecting to a
/// closed port reports `ECONNREFUSED` to the callback, and the handle stays
/// open until closed.
#[test]
fn tcp_connect_refused() {
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    let mut lp = Loop::new().unwrap();
    let client = lp.tcp_init();
    let called = Counter::new();
    let c = called.clone();
    lp.tcp_connect(client, port, move |lp, h, r| {
        assert_eq!(errno_of(&r.unwrap_err()), Some(nix::libc::ECONNREFUSED));
        assert!(
            !lp.is_closing(h),
            "a failed connect does not close the handle"
        );
        c.hit();
    })
    .unwrap();
    run_with_deadline(&mut lp, 5000);
    assert_eq!(called.get(), 1);
    assert_eq!(lp.handle_count(), 1);
    lp.close(client, |_| {}).unwrap();
    run_with_deadline(&mut lp, 5000);
    assert_loop_empty(&lp);
}

/// libuv's `multiple_listen`: listening twice succeeds; one connection is
/// accepted once.
#[test]
fn tcp_multiple_listen() {
    let mut lp = Loop::new().unwrap();
    let accepted = Counter::new();
    let (srv, saddr) = server(&mut lp, "127.0.0.1:0", |_, _| unreachable!());
    let a = accepted.clone();
    lp.tcp_listen(srv, 128, move |lp, s, c| {
        a.hit();
        lp.close(c.unwrap(), |_| {}).unwrap();
        lp.close(s, |_| {}).unwrap();
    })
    .unwrap();
    let client = lp.tcp_init();
    lp.tcp_connect(client, saddr, |lp, c, r| {
        r.unwrap();
        lp.close(c, |_| {}).unwrap();
    })
    .unwrap();
    run_with_deadline(&mut lp, 5000);
    assert_eq!(accepted.get(), 1);
    assert_loop_empty(&lp);
}

/// libuv's `tcp_close_accept`: the server closes while connections wait in
/// its backlog; the clients see EOF or a reset, nothing hangs or leaks.
#[test]
fn tcp_close_server_with_pending_connections() {
    const CLIENTS: usize = 4;
    let mut lp = Loop::new().unwrap();
    let conns = Counter::new();
    let c = conns.clone();
    let (srv, saddr) = server(&mut lp, "127.0.0.1:0", move |lp, conn| {
        c.hit();
        lp.close(conn, |_| {}).unwrap();
    });
    let ended = Counter::new();
    let connected = Counter::new();
    for _ in 0..CLIENTS {
        let client = lp.tcp_init();
        let (e, cn) = (ended.clone(), connected.clone());
        lp.tcp_connect(client, saddr, move |lp, c, r| {
            r.unwrap();
            cn.hit();
            let e = e.clone();
            lp.read_start(c, move |lp, c, r| {
                match r {
                    Ok(d) => assert!(d.is_empty()),
                    Err(e) => assert_eq!(errno_of(&e), Some(nix::libc::ECONNRESET)),
                }
                e.hit();
                lp.close(c, |_| {}).unwrap();
            })
            .unwrap();
        })
        .unwrap();
    }
    // Close the server in the first iteration's check phase: after the
    // clients' connects were issued and before it accepts them all.
    let chk = lp.check_init();
    lp.check_start(chk, move |lp, chk| {
        lp.close(chk, |_| {}).unwrap();
        lp.close(srv, |_| {}).unwrap();
    })
    .unwrap();
    run_with_deadline(&mut lp, 5000);
    assert_eq!(connected.get(), CLIENTS);
    assert_eq!(ended.get(), CLIENTS);
    assert!(conns.get() <= CLIENTS);
    assert_loop_empty(&lp);
}

// ----- adopting, options, addresses ----------------------------------------

/// libuv's `tcp_open`: adopt a listening socket and a connected socket.
#[test]
fn tcp_open_adopts_fds() {
    let mut lp = Loop::new().unwrap();
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let srv = lp.tcp_init();
    lp.tcp_open(srv, OwnedFd::from(listener)).unwrap();
    assert_eq!(lp.tcp_getsockname(srv).unwrap(), addr);
    let got = Counter::new();
    let g = got.clone();
    lp.tcp_listen(srv, 128, move |lp, s, c| {
        let g = g.clone();
        lp.read_start(c.unwrap(), move |lp, c, r| {
            let d = r.unwrap();
            if d.is_empty() {
                lp.close(c, |_| {}).unwrap();
            } else {
                assert_eq!(d, b"adopted");
                g.hit();
            }
        })
        .unwrap();
        lp.close(s, |_| {}).unwrap();
    })
    .unwrap();
    let stream = std::net::TcpStream::connect(addr).unwrap();
    let client = lp.tcp_init();
    lp.tcp_open(client, OwnedFd::from(stream)).unwrap();
    assert_eq!(lp.tcp_getpeername(client).unwrap(), addr);
    // A handle that already has a socket refuses another.
    let other = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    assert_eq!(
        errno_of(&lp.tcp_open(client, OwnedFd::from(other)).unwrap_err()),
        Some(nix::libc::EBUSY)
    );
    let udp = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let t = lp.tcp_init();
    assert!(lp.tcp_open(t, OwnedFd::from(udp)).is_err(), "not TCP");
    lp.close(t, |_| {}).unwrap();
    lp.write(client, &[b"adopted"], |lp, c, r| {
        r.unwrap();
        lp.close(c, |_| {}).unwrap();
    })
    .unwrap();
    run_with_deadline(&mut lp, 5000);
    assert_eq!(got.get(), 1);
    assert_loop_empty(&lp);
}

#[test]
fn tcp_options_and_addresses() {
    let mut lp = Loop::new().unwrap();
    let unset = lp.tcp_init();
    assert_eq!(
        errno_of(&lp.tcp_nodelay(unset, true).unwrap_err()),
        Some(nix::libc::EBADF)
    );
    assert!(lp.tcp_getsockname(unset).is_err());
    lp.close(unset, |_| {}).unwrap();
    let (srv, client, conn) = connected_pair(&mut lp);
    lp.tcp_nodelay(client, true).unwrap();
    lp.tcp_nodelay(client, false).unwrap();
    lp.tcp_keepalive(client, true, 60).unwrap();
    lp.tcp_keepalive(client, false, 0).unwrap();
    let saddr = lp.tcp_getsockname(srv).unwrap();
    assert_eq!(lp.tcp_getpeername(client).unwrap(), saddr);
    assert_eq!(
        lp.tcp_getpeername(conn).unwrap(),
        lp.tcp_getsockname(client).unwrap()
    );
    assert_eq!(lp.tcp_getsockname(conn).unwrap(), saddr);
    assert_eq!(
        errno_of(&lp.tcp_getpeername(srv).unwrap_err()),
        Some(nix::libc::ENOTCONN)
    );
    for h in [srv, client, conn] {
        lp.close(h, |_| {}).unwrap();
    }
    run_with_deadline(&mut lp, 5000);
    assert_loop_empty(&lp);
}

/// `IPV6_V6ONLY`: a v4-mapped loopback address can be bound only by a
/// dual-stack socket, which then accepts an IPv4 client.
#[test]
fn tcp_ipv6_only() {
    if !ipv6_loopback_available() {
        eprintln!("skipped: IPv6 unavailable");
        return;
    }
    let mut lp = Loop::new().unwrap();
    let mapped: SocketAddr = "[::ffff:127.0.0.1]:0".parse().unwrap();
    let v6only = lp.tcp_init();
    let only = BindFlags {
        ipv6_only: true,
        ..Default::default()
    };
    assert!(lp.tcp_bind(v6only, mapped, only).is_err());
    lp.close(v6only, |_| {}).unwrap();
    let dual = lp.tcp_init();
    lp.tcp_bind(dual, mapped, BindFlags::default()).unwrap();
    let accepted = Counter::new();
    let a = accepted.clone();
    lp.tcp_listen(dual, 8, move |lp, s, c| {
        a.hit();
        lp.close(c.unwrap(), |_| {}).unwrap();
        lp.close(s, |_| {}).unwrap();
    })
    .unwrap();
    let port = lp.tcp_getsockname(dual).unwrap().port();
    let client = lp.tcp_init();
    lp.tcp_connect(client, ([127, 0, 0, 1], port).into(), |lp, c, r| {
        r.unwrap();
        lp.close(c, |_| {}).unwrap();
    })
    .unwrap();
    run_with_deadline(&mut lp, 5000);
    assert_eq!(accepted.get(), 1);
    assert_loop_empty(&lp);
}

/// libuv's `tcp_reuseport`: two sockets with `SO_REUSEPORT` listen on one
/// port; every connection is accepted by exactly one of them.
#[test]
fn tcp_reuseport() {
    const CONNS: usize = 16;
    let mut lp = Loop::new().unwrap();
    let flags = BindFlags {
        reuse_port: true,
        ..Default::default()
    };
    let accepted = Counter::new();
    let mut servers = Vec::new();
    let mut port = 0;
    for _ in 0..2 {
        let s = lp.tcp_init();
        lp.tcp_bind(s, ([127, 0, 0, 1], port).into(), flags)
            .unwrap();
        let a = accepted.clone();
        lp.tcp_listen(s, 128, move |lp, _, c| {
            a.hit();
            lp.close(c.unwrap(), |_| {}).unwrap();
        })
        .unwrap();
        port = lp.tcp_getsockname(s).unwrap().port();
        servers.push(s);
    }
    assert_eq!(
        lp.tcp_getsockname(servers[0]).unwrap(),
        lp.tcp_getsockname(servers[1]).unwrap()
    );
    let done = Counter::new();
    for _ in 0..CONNS {
        let c = lp.tcp_init();
        let d = done.clone();
        lp.tcp_connect(c, ([127, 0, 0, 1], port).into(), move |lp, c, r| {
            r.unwrap();
            let d = d.clone();
            lp.read_start(c, move |lp, c, r| {
                let _ = r;
                d.hit();
                lp.close(c, |_| {}).unwrap();
            })
            .unwrap();
        })
        .unwrap();
    }
    run_until(&mut lp, 5000, |_| {
        done.get() == CONNS && accepted.get() == CONNS
    });
    for s in servers {
        lp.close(s, |_| {}).unwrap();
    }
    run_with_deadline(&mut lp, 5000);
    assert_eq!(accepted.get(), CONNS);
    assert_loop_empty(&lp);
}

/// A closed handle's id is stale: every use is an error wrapping
/// [`StaleHandle`], including a second close; closing twice before the
/// close callback is an error too.
#[test]
fn tcp_stale_handle_and_double_close() {
    let mut lp = Loop::new().unwrap();
    let (s, _) = server(&mut lp, "127.0.0.1:0", |_, _| unreachable!());
    let closes = Counter::new();
    let c = closes.clone();
    lp.close(s, move |_| c.hit()).unwrap();
    assert!(lp.is_closing(s));
    assert!(lp.close(s, |_| unreachable!()).is_err(), "closing twice");
    run_with_deadline(&mut lp, 5000);
    assert_eq!(closes.get(), 1);
    let e = lp.tcp_getsockname(s).unwrap_err();
    assert!(e.get_ref().is_some_and(|i| i.is::<StaleHandle>()), "{e:?}");
    let e = lp.close(s, |_| unreachable!()).unwrap_err();
    assert!(e.get_ref().is_some_and(|i| i.is::<StaleHandle>()));
    assert!(lp.read_start(s, |_, _, _| unreachable!()).is_err());
    // The slot is reused by a new handle; the old id still misses.
    let t = lp.tcp_init();
    assert_ne!(t, s);
    assert!(lp.tcp_nodelay(s, true).is_err());
    lp.close(t, |_| {}).unwrap();
    run_with_deadline(&mut lp, 5000);
    assert_loop_empty(&lp);
}

// ----- EMFILE ---------------------------------------------------------------

/// libuv's `emfile`: with the fd table full, a client's connect succeeds and
/// then sees EOF or a reset; the server's connection callback is not called
/// and the loop does not spin. Once fds are free, connections are accepted
/// normally.
#[test]
fn tcp_emfile() {
    isolated("tcp_emfile", || {
        use nix::sys::resource::{Resource, getrlimit, setrlimit};
        let mut lp = Loop::new().unwrap();
        let conns = Counter::new();
        let c = conns.clone();
        let (srv, saddr) = server(&mut lp, "127.0.0.1:0", move |lp, conn| {
            c.hit();
            lp.close(conn, |_| {}).unwrap();
        });
        let iterations = Counter::new();
        let prep = lp.prepare_init();
        let it = iterations.clone();
        lp.prepare_start(prep, move |_, _| it.hit()).unwrap();
        lp.unref_handle(prep).unwrap();

        let (_, hard) = getrlimit(Resource::RLIMIT_NOFILE).unwrap();
        let limit = (open_fds() + 16) as u64;
        setrlimit(Resource::RLIMIT_NOFILE, limit, hard).unwrap();
        let mut fillers = Vec::new();
        loop {
            match std::fs::File::open("/dev/null") {
                Ok(f) => fillers.push(f),
                Err(e) => {
                    assert_eq!(e.raw_os_error(), Some(nix::libc::EMFILE));
                    break;
                }
            }
        }
        // Room for the client's socket only.
        fillers.pop();

        let client = lp.tcp_init();
        let ended = Counter::new();
        let e = ended.clone();
        lp.tcp_connect(client, saddr, move |lp, c, r| {
            r.unwrap();
            let e = e.clone();
            lp.read_start(c, move |lp, c, r| {
                match r {
                    Ok(d) => assert!(d.is_empty()),
                    Err(err) => assert_eq!(errno_of(&err), Some(nix::libc::ECONNRESET)),
                }
                e.hit();
                lp.close(c, |_| {}).unwrap();
            })
            .unwrap();
        })
        .unwrap();
        let start = iterations.get();
        run_until(&mut lp, 5000, |_| ended.get() == 1);
        assert_eq!(conns.get(), 0, "connection callback called at EMFILE");
        let spins = iterations.get() - start;
        assert!(spins < 50, "the loop spun {spins} times");

        // Free the fds: the next connection is accepted normally.
        drop(fillers);
        let client = lp.tcp_init();
        lp.tcp_connect(client, saddr, |lp, c, r| {
            r.unwrap();
            lp.close(c, |_| {}).unwrap();
        })
        .unwrap();
        run_until(&mut lp, 5000, |_| conns.get() == 1);
        lp.close(srv, |_| {}).unwrap();
        lp.close(prep, |_| {}).unwrap();
        run_with_deadline(&mut lp, 5000);
        assert_loop_empty(&lp);
    });
}

/// libuv's `tcp_rst`/`tcp_close_reset` territory: the peer goes away while
/// writes are queued. The failing write and every write queued behind it
/// report an error (none hangs), later writes fail at once with `EPIPE`,
/// and the reader sees a reset or EOF.
#[test]
fn tcp_write_to_closed_peer() {
    let mut lp = Loop::new().unwrap();
    let (srv, client, conn) = connected_pair(&mut lp);
    // Closing the accepted side with unread data makes the kernel reset.
    lp.close(conn, |_| {}).unwrap();
    lp.close(srv, |_| {}).unwrap();
    let results = Rc::new(RefCell::new(Vec::new()));
    let chunk = vec![0u8; 1 << 20];
    for _ in 0..32 {
        let r = results.clone();
        lp.write(client, &[&chunk], move |_, _, res| {
            r.borrow_mut().push(res.map_err(|e| e.raw_os_error()));
        })
        .unwrap();
    }
    let read_end = Counter::new();
    let re = read_end.clone();
    lp.read_start(client, move |_, _, r| {
        match r {
            Ok(d) => assert!(d.is_empty()),
            Err(e) => assert_eq!(errno_of(&e), Some(nix::libc::ECONNRESET)),
        }
        re.hit();
    })
    .unwrap();
    run_until(&mut lp, 10_000, |_| results.borrow().len() == 32);
    let res = results.borrow().clone();
    let first_err = res.iter().position(|r| r.is_err()).expect("a write failed");
    assert!(res[first_err..].iter().all(|r| r.is_err()), "{res:?}");
    let e = lp
        .write(client, &[b"x"], |_, _, _| unreachable!())
        .unwrap_err();
    assert_eq!(errno_of(&e), Some(nix::libc::EPIPE));
    run_until(&mut lp, 5000, |_| read_end.get() == 1);
    lp.close(client, |_| {}).unwrap();
    run_with_deadline(&mut lp, 5000);
    assert_loop_empty(&lp);
}

// ----- net::Server: connection tracking and graceful close ------------------

/// What a loop-side client saw: the bytes it read and whether it read EOF.
#[derive(Clone, Default)]
struct Seen {
    data: Rc<RefCell<Vec<u8>>>,
    eof: Counter,
}

/// A `net::Server` on 127.0.0.1:0 that keeps every connection it is handed
/// in `conns` (and reads nothing from them), listening once this returns.
fn net_server(
    lp: &mut Loop,
) -> (
    uvcluster::net::Server,
    SocketAddr,
    Rc<RefCell<Vec<uvcluster::uv::Stream>>>,
) {
    use uvcluster::net::{ListenOptions, Server, ServerAddress};
    let conns: Rc<RefCell<Vec<uvcluster::uv::Stream>>> = Rc::default();
    let c = conns.clone();
    let server = Server::new(lp, move |_, _, conn| c.borrow_mut().push(conn));
    let addr: Rc<Cell<Option<SocketAddr>>> = Rc::default();
    let a = addr.clone();
    server
        .listen(
            lp,
            ListenOptions::port(0).host("127.0.0.1"),
            move |_, _, r| match r.unwrap() {
                ServerAddress::Inet(x) => a.set(Some(x)),
                other => panic!("{other:?}"),
            },
        )
        .unwrap();
    run_until(lp, 5000, |_| addr.get().is_some());
    (server, addr.get().unwrap(), conns)
}

/// A loop-side client of `addr` that records what it reads and closes
/// itself at EOF or on a read error.
fn seeing_client(lp: &mut Loop, addr: SocketAddr) -> (Handle<Tcp>, Seen) {
    let seen = Seen::default();
    let s = seen.clone();
    let c = lp.tcp_init();
    lp.tcp_connect(c, addr, move |lp, c, r| {
        r.unwrap();
        lp.read_start(c, move |lp, c, r| match r {
            Ok([]) | Err(_) => {
                s.eof.hit();
                lp.close(c, |_| {}).unwrap();
            }
            Ok(d) => s.data.borrow_mut().extend_from_slice(d),
        })
        .unwrap();
    })
    .unwrap();
    (c, seen)
}

/// Node's `http.Server.close()` at the `net` level: the connection marked
/// idle is closed at once, the busy one is left to finish (its handler
/// sees `is_closing`), and the close callback runs once it has.
#[test]
fn net_server_close_closes_idle_connections_and_waits_for_busy_ones() {
    use uvcluster::uv::Stream;
    let mut lp = Loop::new().unwrap();
    let (server, addr, conns) = net_server(&mut lp);
    let (_, idle_seen) = seeing_client(&mut lp, addr);
    run_until(&mut lp, 5000, |_| conns.borrow().len() == 1);
    let (_, busy_seen) = seeing_client(&mut lp, addr);
    run_until(&mut lp, 5000, |_| conns.borrow().len() == 2);
    let (idle, busy) = (conns.borrow()[0], conns.borrow()[1]);
    assert_eq!(server.connections(&lp), 2);
    server.set_idle(&mut lp, idle, true).unwrap();
    assert!(server.is_idle(&lp, idle));
    assert!(!server.is_idle(&lp, busy));
    // A connection this server never handed out is refused, typed.
    let stranger = Stream::Tcp(lp.tcp_init());
    let e = server.set_idle(&mut lp, stranger, true).unwrap_err();
    assert_eq!(e.kind(), io::ErrorKind::NotFound);
    if let Stream::Tcp(h) = stranger {
        lp.close(h, |_| {}).unwrap();
    }

    let closed = Counter::new();
    let c = closed.clone();
    server.close(&mut lp, move |_, _| c.hit());
    assert!(server.is_closing(&lp));
    run_until(&mut lp, 5000, |_| idle_seen.eof.get() == 1);
    // The idle one is gone and counted gone; the busy one is untouched.
    assert_eq!(server.connections(&lp), 1);
    assert_eq!(busy_seen.eof.get(), 0);
    assert_eq!(closed.get(), 0);

    // The busy connection's handler finishes its reply and ends it.
    let Stream::Tcp(b) = busy else { unreachable!() };
    let s = server;
    lp.write(b, &[b"last reply"], move |lp, _, r| {
        r.unwrap();
        s.close_connection(lp, busy);
    })
    .unwrap();
    run_until(&mut lp, 5000, |_| closed.get() == 1);
    run_until(&mut lp, 5000, |_| busy_seen.eof.get() == 1);
    assert_eq!(&busy_seen.data.borrow()[..], b"last reply");
    assert!(idle_seen.data.borrow().is_empty());
    assert_eq!(server.connections(&lp), 0);
    run_with_deadline(&mut lp, 5000);
    assert_eq!(closed.get(), 1);
    assert_loop_empty(&lp);
}

/// A connection marked idle while the server is closing is ended then;
/// what was queued for it still goes out before the FIN (16 MiB, more than
/// the socket takes at once from a client that has not read yet).
#[test]
fn net_server_connection_marked_idle_while_closing_flushes_then_closes() {
    const LEN: usize = 16 << 20;
    let mut lp = Loop::new().unwrap();
    let (server, addr, conns) = net_server(&mut lp);
    let (_, seen) = seeing_client(&mut lp, addr);
    run_until(&mut lp, 5000, |_| conns.borrow().len() == 1);
    let conn = conns.borrow()[0];
    let closed = Counter::new();
    let c = closed.clone();
    server.close(&mut lp, move |_, _| c.hit());
    let uvcluster::uv::Stream::Tcp(h) = conn else {
        unreachable!()
    };
    let big = vec![7u8; LEN];
    lp.write(h, &[&big], |_, _, r| r.unwrap()).unwrap();
    assert!(lp.write_queue_size(h) > 0, "the write should have queued");
    server.set_idle(&mut lp, conn, true).unwrap();
    run_with_deadline(&mut lp, 10_000);
    assert_eq!(seen.data.borrow().len(), LEN);
    assert_eq!(seen.eof.get(), 1);
    assert_eq!(closed.get(), 1);
    assert_eq!(server.connections(&lp), 0);
    assert_loop_empty(&lp);
}

/// The idle grace counts from the last time a connection was marked idle
/// (the idle-since time now lives in the connection map itself, one
/// lookup per `set_idle`): marked busy again it is not idle; marked idle
/// again while the server closes, it is kept for the whole grace from
/// then and closed after it; the close then completes.
#[test]
fn net_server_idle_grace_counts_from_the_last_idle_mark() {
    use std::time::{Duration, Instant};
    let mut lp = Loop::new().unwrap();
    let (server, addr, conns) = net_server(&mut lp);
    server.set_idle_grace(&mut lp, Duration::from_millis(200));
    let (_, seen) = seeing_client(&mut lp, addr);
    run_until(&mut lp, 5000, |_| conns.borrow().len() == 1);
    let conn = conns.borrow()[0];
    server.set_idle(&mut lp, conn, true).unwrap();
    assert!(server.is_idle(&lp, conn));
    server.set_idle(&mut lp, conn, false).unwrap();
    assert!(!server.is_idle(&lp, conn));
    let closed = Counter::new();
    let c = closed.clone();
    server.close(&mut lp, move |_, _| c.hit());
    // Busy: `close` leaves it.
    lp.run(uvcluster::uv::RunMode::NoWait).unwrap();
    assert_eq!(server.connections(&lp), 1);
    assert_eq!(server.close_idle_connections(&mut lp), 0);
    lp.update_time();
    let marked = Instant::now();
    server.set_idle(&mut lp, conn, true).unwrap();
    assert!(server.is_idle(&lp, conn));
    lp.run(uvcluster::uv::RunMode::NoWait).unwrap();
    assert_eq!(server.connections(&lp), 1, "kept for its grace");
    run_until(&mut lp, 5000, |_| seen.eof.get() == 1);
    assert!(
        marked.elapsed() >= Duration::from_millis(190),
        "closed after {:?}",
        marked.elapsed()
    );
    run_until(&mut lp, 5000, |_| closed.get() == 1);
    assert_eq!(server.connections(&lp), 0);
    assert!(seen.data.borrow().is_empty());
    run_with_deadline(&mut lp, 5000);
    assert_loop_empty(&lp);
}

/// `close_all_connections` (Node's `closeAllConnections`) ends busy
/// connections too, and the pending close then completes.
#[test]
fn net_server_close_all_connections_ends_busy_ones() {
    let mut lp = Loop::new().unwrap();
    let (server, addr, conns) = net_server(&mut lp);
    let seen: Vec<Seen> = (0..3).map(|_| seeing_client(&mut lp, addr).1).collect();
    run_until(&mut lp, 5000, |_| conns.borrow().len() == 3);
    let closed = Counter::new();
    let c = closed.clone();
    server.close(&mut lp, move |_, _| c.hit());
    // Nothing was marked idle: `close` waits for all three (net.Server).
    lp.run(uvcluster::uv::RunMode::NoWait).unwrap();
    assert_eq!(server.connections(&lp), 3);
    assert_eq!(server.close_all_connections(&mut lp), 3);
    run_with_deadline(&mut lp, 5000);
    assert_eq!(closed.get(), 1);
    assert!(seen.iter().all(|s| s.eof.get() == 1));
    assert_loop_empty(&lp);
}

/// Out of fds, a listener sheds its pending clients by default (libuv's
/// EMFILE trick: accepted and closed, so the client reads EOF) and, with
/// `OnEmfile::Pause`, leaves them in the kernel's backlog and accepts them
/// once fds are free again (nginx's rule), without spinning meanwhile.
#[test]
fn listener_out_of_fds_sheds_or_pauses() {
    use std::io::Read;
    use uvcluster::uv::OnEmfile;
    isolated("listener_out_of_fds_sheds_or_pauses", || {
        nix::sys::resource::setrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE, 64, 64).unwrap();
        for pause in [false, true] {
            let mut lp = Loop::new().unwrap();
            let srv = lp.tcp_init();
            lp.tcp_bind(srv, "127.0.0.1:0".parse().unwrap(), BindFlags::default())
                .unwrap();
            if pause {
                lp.listen_on_emfile(srv, OnEmfile::Pause(std::time::Duration::from_millis(10)))
                    .unwrap();
            }
            let accepted = Rc::new(Cell::new(0));
            let a = accepted.clone();
            lp.tcp_listen(srv, 8, move |lp, _, r| {
                a.set(a.get() + 1);
                lp.close(r.unwrap(), |_| {}).unwrap();
            })
            .unwrap();
            let addr = lp.tcp_getsockname(srv).unwrap();
            let mut client = std::net::TcpStream::connect(addr).unwrap();
            // Every fd left, taken.
            let mut filler = Vec::new();
            while let Ok(f) = std::fs::File::open("/dev/null") {
                filler.push(f);
            }
            // Twenty 10 ms retry periods with the table full.
            let t = lp.timer_init();
            lp.timer_start(
                t,
                std::time::Duration::from_millis(200),
                std::time::Duration::ZERO,
                |lp, t| lp.close(t, |_| {}).unwrap(),
            )
            .unwrap();
            run_until(&mut lp, 5_000, |lp| !lp.is_active(t));
            assert_eq!(accepted.get(), 0, "pause {pause}");
            client.set_nonblocking(true).unwrap();
            let mut b = [0u8; 1];
            match client.read(&mut b) {
                // Shed: accepted and closed.
                Ok(0) => assert!(!pause, "a paused listener dropped its client"),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    assert!(pause, "the EMFILE trick left its client waiting")
                }
                r => panic!("pause {pause}: {r:?}"),
            }
            drop(filler);
            if pause {
                run_until(&mut lp, 5_000, |_| accepted.get() == 1);
                assert_eq!(accepted.get(), 1);
            }
            lp.close(srv, |_| {}).unwrap();
            run_with_deadline(&mut lp, 5_000);
            assert_loop_empty(&lp);
        }
    });
}

/// `net::Server` is a typed id for state the loop owns (issue 11): its
/// connection callback gets `&mut Loop` and the id, and may close its own
/// server from inside; once the close has completed the state is gone and
/// the id is stale: it answers as a closed server and never reaches a
/// server made later.
#[test]
fn server_state_lives_in_the_loop_until_its_close_completes() {
    use uvcluster::net::{ListenOptions, Server, ServerAddress};

    let mut lp = Loop::new().unwrap();
    let closed = Counter::new();
    let cl = closed.clone();
    let server = Server::new(&mut lp, move |lp, me, conn| {
        // Re-entrant: close this very server from its own callback.
        let cl = cl.clone();
        me.close(lp, move |lp, s| {
            assert_eq!(s, me);
            assert_eq!(s.connections(lp), 0);
            cl.hit();
        });
        assert!(me.is_closing(lp));
        lp.close(conn, |_| {}).unwrap();
    });
    let addr: Rc<Cell<Option<SocketAddr>>> = Rc::default();
    let a = addr.clone();
    server
        .listen(
            &mut lp,
            ListenOptions::port(0).host("127.0.0.1"),
            move |_, _, r| match r.unwrap() {
                ServerAddress::Inet(x) => a.set(Some(x)),
                other => panic!("{other:?}"),
            },
        )
        .unwrap();
    run_until(&mut lp, 5000, |_| addr.get().is_some());
    assert!(server.is_listening(&lp));
    assert_eq!(
        server.address(&lp),
        Some(ServerAddress::Inet(addr.get().unwrap()))
    );
    let client = std::net::TcpStream::connect(addr.get().unwrap()).unwrap();
    run_with_deadline(&mut lp, 5000);
    assert_eq!(closed.get(), 1);
    drop(client);

    // Closed: the state is gone, the id answers as a closed server.
    assert!(!server.is_listening(&lp));
    assert!(server.is_closing(&lp));
    assert_eq!(server.connections(&lp), 0);
    assert_eq!(server.address(&lp), None);
    let err = server
        .listen(&mut lp, ListenOptions::port(0), |_, _, _| panic!("dropped"))
        .unwrap_err();
    assert_eq!(err.kind(), io::ErrorKind::InvalidInput);
    let stray = lp.tcp_init();
    assert!(!server.deliver(&mut lp, stray.into()), "refused");
    lp.close(stray, |_| {}).unwrap();

    // A server made now is another one, whatever slot it takes.
    let other = Server::new(&mut lp, |_, _, _| {});
    assert_ne!(other, server);
    other
        .listen(
            &mut lp,
            ListenOptions::port(0).host("127.0.0.1"),
            |_, _, r| {
                r.unwrap();
            },
        )
        .unwrap();
    run_until(&mut lp, 5000, |lp| other.is_listening(lp));
    assert!(!server.is_listening(&lp), "the stale id reaches nothing");
    let done = Counter::new();
    let d = done.clone();
    other.close(&mut lp, move |_, _| d.hit());
    run_with_deadline(&mut lp, 5000);
    assert_eq!(done.get(), 1);
    assert_loop_empty(&lp);
}
