//! Poll handles: readiness of fds the test owns, level-triggered (libuv's
//! `test/test-poll.c`, `test-poll-close.c`, `test-poll-oob.c`).
mod util;

use std::cell::RefCell;
use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::os::fd::{AsFd, AsRawFd};
use std::os::unix::net::UnixStream;
use std::rc::Rc;

use nix::sys::socket::{AddressFamily, MsgFlags, SockFlag, SockType, recv, send, socket};
use util::*;
use uvcluster::uv::{Handle, Loop, Poll, PollEvents, RunMode};

fn tcp_pair() -> (TcpStream, TcpStream) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let c = TcpStream::connect(l.local_addr().unwrap()).unwrap();
    let (s, _) = l.accept().unwrap();
    (c, s)
}

/// One side of test-poll.c's duplex transfer: write `TOTAL` bytes, then
/// shut down the write side; read until EOF; close the poll handle when
/// both are done and the peer's disconnect was seen.
struct Side {
    sock: TcpStream,
    sent: usize,
    received: usize,
    eof: bool,
    shut: bool,
    disconnects: usize,
    valid_writable: usize,
    spurious_writable: usize,
    done: bool,
    watching: PollEvents,
}

const TOTAL: usize = 1 << 20;

fn drive(lp: &mut Loop, h: Handle<Poll>, side: &Rc<RefCell<Side>>, ev: PollEvents) {
    let mut s = side.borrow_mut();
    let mut buf = [0u8; 16 * 1024];
    if ev.contains(PollEvents::READABLE) {
        loop {
            match s.sock.read(&mut buf) {
                Ok(0) => {
                    s.eof = true;
                    break;
                }
                Ok(n) => {
                    assert!(buf[..n].iter().all(|&b| b == b'x'));
                    s.received += n;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => panic!("read: {e}"),
            }
        }
    }
    if ev.contains(PollEvents::DISCONNECT) && s.disconnects == 0 {
        s.disconnects += 1;
    }
    if ev.contains(PollEvents::WRITABLE) && !s.shut {
        let mut wrote = false;
        while s.sent < TOTAL {
            let n = (TOTAL - s.sent).min(buf.len());
            match s.sock.write(&[b'x'; 16 * 1024][..n]) {
                Ok(n) => {
                    s.sent += n;
                    wrote = true;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => panic!("write: {e}"),
            }
        }
        if wrote {
            s.valid_writable += 1;
        } else {
            s.spurious_writable += 1;
        }
        if s.sent == TOTAL {
            s.sock.shutdown(Shutdown::Write).unwrap();
            s.shut = true;
        }
    }
    // Watch only what is still to come: a writable socket after the last
    // write, or a read side at EOF, would be reported in every iteration.
    let mut want = PollEvents::EMPTY;
    if !s.shut {
        want |= PollEvents::WRITABLE;
    }
    if !s.eof {
        want |= PollEvents::READABLE;
    }
    // As test-poll.c: the disconnect is watched for until it is seen, even
    // after EOF was read.
    if s.disconnects == 0 {
        want |= PollEvents::DISCONNECT;
    }
    if want.is_empty() {
        s.done = true;
        drop(s);
        lp.close(h, |_| {}).unwrap();
    } else if want != s.watching {
        drop(s);
        restart(lp, h, side, want);
    }
}

fn restart(lp: &mut Loop, h: Handle<Poll>, side: &Rc<RefCell<Side>>, want: PollEvents) {
    side.borrow_mut().watching = want;
    let side2 = side.clone();
    lp.poll_start(h, want, move |lp, h, ev| {
        drive(lp, h, &side2, ev.unwrap());
    })
    .unwrap();
}

/// test-poll.c `poll_duplex`, reduced to one connection: both ends of a
/// TCP connection send 1 MiB and shut down through poll handles; each side
/// receives every byte, sees the peer's disconnect, and at most 5% of the
/// writable wake-ups were spurious.
#[test]
fn poll_duplex_tcp_transfer_with_disconnect() {
    let (a, b) = tcp_pair();
    let mut lp = Loop::new().unwrap();
    let sides: Vec<_> = [a, b]
        .into_iter()
        .map(|sock| {
            let h = lp.poll_init(sock.as_fd()).unwrap();
            let side = Rc::new(RefCell::new(Side {
                sock,
                sent: 0,
                received: 0,
                eof: false,
                shut: false,
                disconnects: 0,
                valid_writable: 0,
                spurious_writable: 0,
                done: false,
                watching: PollEvents::EMPTY,
            }));
            restart(
                &mut lp,
                h,
                &side,
                PollEvents::READABLE | PollEvents::WRITABLE | PollEvents::DISCONNECT,
            );
            side
        })
        .collect();
    run_with_deadline(&mut lp, 20_000);
    for s in &sides {
        let s = s.borrow();
        assert!(s.done);
        assert_eq!((s.sent, s.received), (TOTAL, TOTAL));
        assert_eq!(s.disconnects, 1, "the peer's shutdown seen");
        let (v, sp) = (s.valid_writable, s.spurious_writable);
        assert!(sp == 0 || (v + sp) / sp > 20, "{sp} spurious of {}", v + sp);
    }
    assert_loop_empty(&lp);
}

/// Level triggering: 10 bytes waiting, a callback that reads one byte at a
/// time runs 10 times (mio alone would report the data once), then no more.
#[test]
fn poll_readable_is_reported_again_while_data_is_left() {
    let (mut a, b) = UnixStream::pair().unwrap();
    a.write_all(b"0123456789").unwrap();
    let mut lp = Loop::new().unwrap();
    let h = lp.poll_init(b.as_fd()).unwrap();
    let got = Rc::new(RefCell::new(Vec::new()));
    let g = got.clone();
    let b = Rc::new(b);
    let b2 = b.clone();
    lp.poll_start(h, PollEvents::READABLE, move |_, _, ev| {
        assert_eq!(ev.unwrap(), PollEvents::READABLE);
        let mut byte = [0u8; 1];
        assert_eq!((&*b2).read(&mut byte).unwrap(), 1);
        g.borrow_mut().push(byte[0]);
    })
    .unwrap();
    run_until(&mut lp, 5000, |_| got.borrow().len() == 10);
    // Drained: a few more iterations call nothing.
    for _ in 0..3 {
        lp.run(RunMode::NoWait).unwrap();
    }
    assert_eq!(&*got.borrow(), b"0123456789");
    // New data is reported again.
    a.write_all(b"z").unwrap();
    run_until(&mut lp, 5000, |_| got.borrow().len() == 11);
    lp.close(h, |_| {}).unwrap();
    lp.run(RunMode::Default).unwrap();
    assert_loop_empty(&lp);
}

/// Level triggering for writes: a writable socket that is not written to
/// is reported in every iteration until the handle stops.
#[test]
fn poll_writable_is_reported_in_every_iteration_until_stopped() {
    let (_a, b) = UnixStream::pair().unwrap();
    let mut lp = Loop::new().unwrap();
    let h = lp.poll_init(b.as_fd()).unwrap();
    let n = Counter::new();
    let c = n.clone();
    lp.poll_start(h, PollEvents::WRITABLE, move |lp, h, ev| {
        assert_eq!(ev.unwrap(), PollEvents::WRITABLE);
        c.hit();
        if c.get() == 5 {
            lp.poll_stop(h).unwrap();
        }
    })
    .unwrap();
    for _ in 0..5 {
        lp.run(RunMode::NoWait).unwrap();
    }
    assert_eq!(n.get(), 5, "once per iteration");
    assert!(!lp.is_active(h));
    assert!(!lp.alive(), "stopped: nothing keeps the loop");
    lp.run(RunMode::NoWait).unwrap();
    assert_eq!(n.get(), 5);
    lp.close(h, |_| {}).unwrap();
    lp.run(RunMode::Default).unwrap();
    assert_loop_empty(&lp);
}

/// `DISCONNECT` alone: data from the peer runs nothing (and does not spin
/// the loop); the peer's shutdown of its write side is reported.
#[test]
fn poll_disconnect_only_ignores_data_and_reports_the_peer_shutdown() {
    let (mut a, b) = UnixStream::pair().unwrap();
    let mut lp = Loop::new().unwrap();
    let h = lp.poll_init(b.as_fd()).unwrap();
    let log = Rc::new(RefCell::new(Vec::new()));
    let l = log.clone();
    lp.poll_start(h, PollEvents::DISCONNECT, move |lp, h, ev| {
        l.borrow_mut().push(ev.unwrap());
        lp.close(h, |_| {}).unwrap();
    })
    .unwrap();
    a.write_all(b"data").unwrap();
    for _ in 0..3 {
        lp.run(RunMode::NoWait).unwrap();
    }
    assert!(log.borrow().is_empty(), "data is not a disconnect");
    a.shutdown(Shutdown::Write).unwrap();
    run_with_deadline(&mut lp, 5000);
    assert_eq!(&*log.borrow(), &[PollEvents::DISCONNECT]);
    assert_loop_empty(&lp);
}

/// test-poll-close.c: 64 sockets, each with a started poll handle, closed
/// before the loop runs: 64 close callbacks, and no poll callback.
#[test]
fn poll_close() {
    let mut lp = Loop::new().unwrap();
    let closed = Counter::new();
    let socks: Vec<_> = (0..64)
        .map(|_| {
            socket(
                AddressFamily::Inet,
                SockType::Stream,
                SockFlag::SOCK_CLOEXEC,
                None,
            )
            .unwrap()
        })
        .collect();
    let handles: Vec<_> = socks
        .iter()
        .map(|s| {
            let h = lp.poll_init(s.as_fd()).unwrap();
            lp.poll_start(h, PollEvents::READABLE | PollEvents::WRITABLE, |_, _, _| {
                panic!("closed before the loop ran")
            })
            .unwrap();
            h
        })
        .collect();
    for h in handles {
        let c = closed.clone();
        lp.close(h, move |_| c.hit()).unwrap();
    }
    run_with_deadline(&mut lp, 5000);
    assert_eq!(closed.get(), 64);
    assert_loop_empty(&lp);
}

/// The handle never owns the fd: after the handle is closed, the fd is
/// still open and usable, and the test closes it. Alone in its process,
/// so that the fd count is its own.
#[test]
fn poll_close_leaves_the_fd_open() {
    isolated(
        "poll_close_leaves_the_fd_open",
        poll_close_leaves_the_fd_open_body,
    );
}

fn poll_close_leaves_the_fd_open_body() {
    let (a, mut b) = UnixStream::pair().unwrap();
    let fds = open_fds();
    let mut lp = Loop::new().unwrap();
    let h = lp.poll_init(a.as_fd()).unwrap();
    lp.poll_start(h, PollEvents::READABLE, |_, _, _| {})
        .unwrap();
    lp.close(h, |_| {}).unwrap();
    lp.run(RunMode::Default).unwrap();
    assert_loop_empty(&lp);
    drop(lp);
    assert_eq!(
        open_fds(),
        fds,
        "the loop's own fds are gone, the socket stays"
    );
    nix::fcntl::fcntl(a.as_fd(), nix::fcntl::FcntlArg::F_GETFD).expect("fd still open");
    b.write_all(b"still here").unwrap();
    let mut buf = [0u8; 10];
    (&a).read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"still here");
}

/// test-poll.c `poll_bad_fdtype`: a directory cannot be polled (epoll says
/// `EPERM`); and a fd this loop already polls is `EEXIST` (libuv's
/// `uv__fd_exists`).
#[test]
fn poll_bad_fdtype_and_a_fd_already_watched() {
    let mut lp = Loop::new().unwrap();
    let dir = std::fs::File::open(".").unwrap();
    let e = lp.poll_init(dir.as_fd()).unwrap_err();
    assert_eq!(e.raw_os_error(), Some(nix::libc::EPERM), "{e}");

    let (a, _b) = UnixStream::pair().unwrap();
    let h = lp.poll_init(a.as_fd()).unwrap();
    lp.poll_start(h, PollEvents::READABLE, |_, _, _| {})
        .unwrap();
    let e = lp.poll_init(a.as_fd()).unwrap_err();
    assert_eq!(e.raw_os_error(), Some(nix::libc::EEXIST), "{e}");
    lp.close(h, |_| {}).unwrap();
    lp.run(RunMode::Default).unwrap();
    assert_loop_empty(&lp);
}

/// Start twice replaces events and callback; start with no events stops;
/// stop twice is fine; a stopped handle keeps nothing alive; a closing
/// handle refuses start and stop.
#[test]
fn poll_start_twice_stop_twice_and_closing() {
    let (_a, b) = UnixStream::pair().unwrap();
    let mut lp = Loop::new().unwrap();
    let h = lp.poll_init(b.as_fd()).unwrap();
    assert!(!lp.is_active(h));
    lp.poll_start(h, PollEvents::READABLE, |_, _, _| panic!("replaced"))
        .unwrap();
    let n = Counter::new();
    let c = n.clone();
    lp.poll_start(h, PollEvents::WRITABLE, move |lp, h, ev| {
        assert_eq!(ev.unwrap(), PollEvents::WRITABLE);
        c.hit();
        lp.poll_start(h, PollEvents::EMPTY, |_, _, _| {}).unwrap();
    })
    .unwrap();
    assert!(lp.is_active(h));
    run_with_deadline(&mut lp, 5000);
    assert_eq!(n.get(), 1);
    assert!(!lp.is_active(h));
    lp.poll_stop(h).unwrap();
    lp.poll_stop(h).unwrap();
    lp.close(h, |_| {}).unwrap();
    assert!(
        lp.poll_start(h, PollEvents::READABLE, |_, _, _| {})
            .is_err()
    );
    assert!(lp.poll_stop(h).is_err());
    lp.run(RunMode::Default).unwrap();
    assert_loop_empty(&lp);
}

/// test-poll-oob.c, reduced: TCP urgent data is reported as
/// `PRIORITIZED` and read with `MSG_OOB`; ordinary data as `READABLE`.
#[test]
fn poll_oob_data_is_prioritized() {
    let (c, s) = tcp_pair();
    send(c.as_raw_fd(), b"!", MsgFlags::MSG_OOB).unwrap();
    let mut lp = Loop::new().unwrap();
    let h = lp.poll_init(s.as_fd()).unwrap();
    let log = Rc::new(RefCell::new(Vec::new()));
    let l = log.clone();
    let fd = s.as_raw_fd();
    lp.poll_start(
        h,
        PollEvents::READABLE | PollEvents::PRIORITIZED,
        move |lp, h, ev| {
            let ev = ev.unwrap();
            l.borrow_mut().push(ev);
            assert!(ev.contains(PollEvents::PRIORITIZED), "{ev:?}");
            let mut b = [0u8; 1];
            assert_eq!(recv(fd, &mut b, MsgFlags::MSG_OOB).unwrap(), 1);
            assert_eq!(&b, b"!");
            lp.close(h, |_| {}).unwrap();
        },
    )
    .unwrap();
    run_with_deadline(&mut lp, 5000);
    assert_eq!(log.borrow().len(), 1);
    assert_loop_empty(&lp);
    drop((c, s));
}
