//! IPC pipes and fd passing (libuv's `test-pipe-sendmsg.c`, `test-ipc.c`,
//! `test-ipc-send-recv.c`, `test-ipc-heavy-traffic-deadlock-bug.c`).
//!
//! The tests that need a second process re-execute this test binary as a
//! helper (`helper_*` functions below), with one end of a socketpair as the
//! child's stdin; the child opens fd 0 as an IPC pipe, as a Node worker
//! opens its channel.
mod util;

use std::cell::RefCell;
use std::io::IoSlice;
use std::net::SocketAddr;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::process::{Child, Stdio};
use std::rc::Rc;
use std::time::Duration;

use nix::sys::socket::{
    AddressFamily, ControlMessage, MsgFlags, SockFlag, SockType, UnixAddr, UnixCredentials,
    sendmsg, setsockopt, socketpair, sockopt,
};
use util::*;
use uvcluster::uv::{BindFlags, Handle, Loop, PendingType, Pipe, Socket, Tcp};

fn raw_pair() -> (OwnedFd, OwnedFd) {
    socketpair(
        AddressFamily::Unix,
        SockType::Stream,
        None,
        SockFlag::SOCK_CLOEXEC,
    )
    .unwrap()
}

/// An IPC pipe on `lp` and the raw socket at its other end.
fn ipc_pipe_with_raw_peer(lp: &mut Loop) -> (OwnedFd, Handle<Pipe>) {
    let (tx, rx) = raw_pair();
    let p = lp.pipe_init(true);
    lp.pipe_open(p, rx).unwrap();
    (tx, p)
}

fn send_raw(fd: &OwnedFd, data: &[u8], cmsgs: &[ControlMessage]) {
    let n = sendmsg::<UnixAddr>(
        fd.as_raw_fd(),
        &[IoSlice::new(data)],
        cmsgs,
        MsgFlags::empty(),
        None,
    )
    .unwrap();
    assert_eq!(n, data.len());
}

/// Spawns helper `name` with an IPC channel as its stdin; returns the child
/// and the parent's end of the channel as an IPC pipe.
fn spawn_helper(lp: &mut Loop, name: &str) -> (Child, Handle<Pipe>) {
    let (ours, theirs) = raw_pair();
    let mut cmd = helper_command(name);
    cmd.stdin(Stdio::from(theirs))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let child = cmd.spawn().unwrap();
    // The Command holds the child's end until dropped: drop it so the
    // parent sees EOF when the child exits.
    drop(cmd);
    let p = lp.pipe_init(true);
    lp.pipe_open(p, ours).unwrap();
    (child, p)
}

fn wait_helper(child: Child) {
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "helper failed: {}\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// In a helper: fd 0 (a duplicate of it) as an IPC pipe.
fn channel_from_stdin(lp: &mut Loop) -> Handle<Pipe> {
    let fd = std::io::stdin().as_fd().try_clone_to_owned().unwrap();
    let p = lp.pipe_init(true);
    lp.pipe_open(p, fd).unwrap();
    p
}

fn send_byte(lp: &mut Loop, p: Handle<Pipe>, b: u8) {
    lp.write(p, &[&[b]], |_, _, r| r.unwrap()).unwrap();
}

// ----- (1) several fds in one message ----------------------------------------

/// libuv's `pipe_sendmsg`: 4 fds in one raw `sendmsg`, all accepted in a
/// single read callback through `pending_count`, `pending_type` and
/// `accept_pending`.
#[test]
fn ipc_pipe_sendmsg_four_fds() {
    let mut lp = Loop::new().unwrap();
    let (tx, p) = ipc_pipe_with_raw_peer(&mut lp);
    assert!(lp.pipe_is_ipc(p));
    {
        let (p1, p2) = raw_pair();
        let tcp = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let udp = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let fds = [
            p1.as_raw_fd(),
            p2.as_raw_fd(),
            tcp.as_raw_fd(),
            udp.as_raw_fd(),
        ];
        send_raw(&tx, b"four", &[ControlMessage::ScmRights(&fds)]);
        // Our copies close here; the receiver's are its own.
    }
    let reads = Counter::new();
    let r = reads.clone();
    lp.read_start(p, move |lp, p, res| {
        let data = res.unwrap();
        assert_eq!(data, b"four");
        r.hit();
        assert_eq!(lp.pipe_pending_count(p), 4);
        let mut types = Vec::new();
        while lp.pipe_pending_count(p) > 0 {
            types.push(lp.pipe_pending_type(p).unwrap());
            match lp.pipe_accept_pending(p).unwrap() {
                Socket::Tcp(h) => {
                    assert!(lp.tcp_getsockname(h).is_ok());
                    lp.close(h, |_| {}).unwrap();
                }
                Socket::Pipe(h) => lp.close(h, |_| {}).unwrap(),
                Socket::Udp(h) => {
                    assert!(lp.udp_getsockname(h).is_ok());
                    lp.close(h, |_| {}).unwrap();
                }
            }
        }
        assert_eq!(
            types,
            [
                PendingType::Pipe,
                PendingType::Pipe,
                PendingType::Tcp,
                PendingType::Udp
            ]
        );
        assert_eq!(lp.pipe_pending_type(p), None);
        assert_eq!(
            lp.pipe_accept_pending(p).unwrap_err().raw_os_error(),
            Some(nix::libc::EAGAIN)
        );
        lp.close(p, |_| {}).unwrap();
    })
    .unwrap();
    run_with_deadline(&mut lp, 5000);
    assert_eq!(reads.get(), 1);
    assert_loop_empty(&lp);
}

/// The kernel ends a read on an IPC pipe right after each message that
/// carries fds, so such a short read does not mean the socket is drained:
/// everything queued before the first edge (plain bytes, two fd-carrying
/// messages, plain bytes again) arrives without another write. A short
/// read that brought no fds does drain it, and later data raises a new
/// edge: the last write, sent from a timer, arrives too.
#[test]
fn ipc_reads_past_fd_messages_on_one_edge() {
    let mut lp = Loop::new().unwrap();
    let (tx, p) = ipc_pipe_with_raw_peer(&mut lp);
    let (a, b) = raw_pair();
    send_raw(&tx, b"one ", &[]);
    send_raw(&tx, b"two ", &[ControlMessage::ScmRights(&[a.as_raw_fd()])]);
    send_raw(
        &tx,
        b"three ",
        &[ControlMessage::ScmRights(&[b.as_raw_fd()])],
    );
    send_raw(&tx, b"four ", &[]);
    drop((a, b));
    let got = Rc::new(RefCell::new((Vec::new(), 0usize)));
    let g = got.clone();
    lp.read_start(p, move |lp, p, res| {
        let mut g = g.borrow_mut();
        g.0.extend_from_slice(res.unwrap());
        while let Ok(acc) = lp.pipe_accept_pending(p) {
            g.1 += 1;
            match acc {
                Socket::Pipe(h) => lp.close(h, |_| {}).unwrap(),
                other => panic!("expected a pipe, got {other:?}"),
            }
        }
        if g.0.ends_with(b"five") {
            lp.close(p, |_| {}).unwrap();
        }
    })
    .unwrap();
    // The last write goes out once the loop has read and polled again, so
    // only a new edge can deliver it.
    let t = lp.timer_init();
    let tx = Rc::new(tx);
    let (g, tx2) = (got.clone(), tx.clone());
    lp.timer_start(
        t,
        Duration::from_millis(1),
        Duration::from_millis(1),
        move |lp, t| {
            if g.borrow().0.ends_with(b"four ") {
                send_raw(&tx2, b"five", &[]);
                lp.close(t, |_| {}).unwrap();
            }
        },
    )
    .unwrap();
    run_with_deadline(&mut lp, 5000);
    let got = got.borrow();
    assert_eq!(got.0, b"one two three four five");
    assert_eq!(got.1, 2);
    assert_loop_empty(&lp);
}

// ----- (2) the cluster pattern: a shared listening socket --------------------

/// State of the parent in [`ipc_shared_tcp_server`].
struct Shared {
    pipe: Handle<Pipe>,
    srv: Handle<Tcp>,
    addr: SocketAddr,
    tags: Vec<u8>,
    made: usize,
}

const PHASE1: usize = 5;
const PHASE2: usize = 10;
const PHASE3: usize = 5;

fn make_connections(lp: &mut Loop, st: &Rc<RefCell<Shared>>, n: usize) {
    let addr = st.borrow().addr;
    st.borrow_mut().made += n;
    for _ in 0..n {
        let c = lp.tcp_init();
        let st = st.clone();
        lp.tcp_connect(c, addr, move |lp, c, r| {
            r.unwrap();
            let st = st.clone();
            let tag = RefCell::new(None);
            lp.read_start(c, move |lp, c, r| {
                let d = r.unwrap();
                if !d.is_empty() {
                    assert_eq!(d.len(), 1);
                    *tag.borrow_mut() = Some(d[0]);
                    return;
                }
                lp.close(c, |_| {}).unwrap();
                let t = tag.borrow().expect("a tag before EOF");
                st.borrow_mut().tags.push(t);
                connection_done(lp, &st);
            })
            .unwrap();
        })
        .unwrap();
    }
}

fn connection_done(lp: &mut Loop, st: &Rc<RefCell<Shared>>) {
    let (done, made, srv, pipe) = {
        let s = st.borrow();
        (s.tags.len(), s.made, s.srv, s.pipe)
    };
    if done != made {
        return;
    }
    if done == PHASE1 {
        // Phase 2: the parent listens on the same socket too.
        lp.tcp_listen(srv, 128, |lp, _, c| {
            let c = c.unwrap();
            lp.write(c, &[b"P"], |lp, c, r| {
                r.unwrap();
                lp.close(c, |_| {}).unwrap();
            })
            .unwrap();
        })
        .unwrap();
        make_connections(lp, st, PHASE2);
    } else if done == PHASE1 + PHASE2 {
        // Ask the child to stop accepting; phase 3 starts on its answer.
        send_byte(lp, pipe, b'X');
    } else if done == PHASE1 + PHASE2 + PHASE3 {
        lp.close(srv, |_| {}).unwrap();
        lp.close(pipe, |_| {}).unwrap();
    }
}

/// libuv's `ipc_listen_after_write`, the cluster pattern: the parent sends
/// its bound TCP socket to a child, which listens on it; the parent then
/// listens too, and both accept from the one socket. Phase 1: only the
/// child listens; phase 2: both; phase 3: only the parent. Every connection
/// is accepted exactly once.
#[test]
fn ipc_shared_tcp_server() {
    let mut lp = Loop::new().unwrap();
    let srv = lp.tcp_init();
    lp.tcp_bind(srv, "127.0.0.1:0".parse().unwrap(), BindFlags::default())
        .unwrap();
    let addr = lp.tcp_getsockname(srv).unwrap();
    let (child, pipe) = spawn_helper(&mut lp, "helper_shared_server");
    let st = Rc::new(RefCell::new(Shared {
        pipe,
        srv,
        addr,
        tags: Vec::new(),
        made: 0,
    }));
    lp.write2(pipe, &[b"S"], srv, |_, _, r| r.unwrap()).unwrap();
    let s2 = st.clone();
    lp.read_start(pipe, move |lp, _, r| {
        for &b in r.unwrap() {
            match b {
                b'R' => make_connections(lp, &s2, PHASE1),
                b'x' => make_connections(lp, &s2, PHASE3),
                other => panic!("unexpected message {other}"),
            }
        }
    })
    .unwrap();
    run_with_deadline(&mut lp, 20_000);
    wait_helper(child);
    let tags = st.borrow().tags.clone();
    assert_eq!(tags.len(), PHASE1 + PHASE2 + PHASE3);
    assert!(tags[..PHASE1].iter().all(|&t| t == b'C'), "{tags:?}");
    assert!(tags[PHASE1 + PHASE2..].iter().all(|&t| t == b'P'));
    let child_n = tags.iter().filter(|&&t| t == b'C').count();
    let parent_n = tags.iter().filter(|&&t| t == b'P').count();
    assert_eq!(child_n + parent_n, PHASE1 + PHASE2 + PHASE3);
    eprintln!("accepted: child {child_n}, parent {parent_n}");
    assert_loop_empty(&lp);
}

#[test]
fn helper_shared_server() {
    if !is_helper("helper_shared_server") {
        return;
    }
    let mut lp = Loop::new().unwrap();
    let pipe = channel_from_stdin(&mut lp);
    let listener: Rc<RefCell<Option<Handle<Tcp>>>> = Rc::default();
    let l = listener.clone();
    lp.read_start(pipe, move |lp, pipe, r| {
        let data = r.unwrap();
        if data.is_empty() {
            if let Some(t) = l.borrow_mut().take() {
                lp.close(t, |_| {}).unwrap();
            }
            lp.close(pipe, |_| {}).unwrap();
            return;
        }
        for &b in data {
            match b {
                b'S' => {
                    assert_eq!(lp.pipe_pending_count(pipe), 1);
                    assert_eq!(lp.pipe_pending_type(pipe), Some(PendingType::Tcp));
                    let Socket::Tcp(t) = lp.pipe_accept_pending(pipe).unwrap() else {
                        panic!("expected TCP");
                    };
                    lp.tcp_listen(t, 128, |lp, _, c| {
                        let c = c.unwrap();
                        lp.write(c, &[b"C"], |lp, c, r| {
                            r.unwrap();
                            lp.close(c, |_| {}).unwrap();
                        })
                        .unwrap();
                    })
                    .unwrap();
                    *l.borrow_mut() = Some(t);
                    send_byte(lp, pipe, b'R');
                }
                b'X' => {
                    let t = l.borrow_mut().take().unwrap();
                    lp.close(t, |_| {}).unwrap();
                    send_byte(lp, pipe, b'x');
                }
                other => panic!("unexpected message {other}"),
            }
        }
    })
    .unwrap();
    run_with_deadline(&mut lp, 20_000);
    assert_loop_empty(&lp);
}

// ----- (3) a connected socket to the child -----------------------------------

/// libuv's `ipc_tcp_connection`: the parent accepts a connection and sends
/// it to the child, which reads and echoes on it; the parent's client sees
/// the echo, then EOF once the child closes its copy.
#[test]
fn ipc_send_tcp_connection() {
    const MSG: &[u8] = b"hello through the child";
    let mut lp = Loop::new().unwrap();
    let (child, pipe) = spawn_helper(&mut lp, "helper_echo_connection");
    lp.read_start(pipe, |lp, p, r| {
        assert!(r.unwrap().is_empty(), "the child sends nothing");
        lp.close(p, |_| {}).unwrap();
    })
    .unwrap();
    let srv = lp.tcp_init();
    lp.tcp_bind(srv, "127.0.0.1:0".parse().unwrap(), BindFlags::default())
        .unwrap();
    lp.tcp_listen(srv, 8, move |lp, s, c| {
        let c = c.unwrap();
        lp.close(s, |_| {}).unwrap();
        lp.write2(pipe, &[b"C"], c, move |lp, _, r| {
            r.unwrap();
            // The child has its own copy now.
            lp.close(c, |_| {}).unwrap();
        })
        .unwrap();
    })
    .unwrap();
    let addr = lp.tcp_getsockname(srv).unwrap();
    let client = lp.tcp_init();
    let echoed = Rc::new(RefCell::new(Vec::new()));
    let e = echoed.clone();
    lp.tcp_connect(client, addr, move |lp, c, r| {
        r.unwrap();
        lp.write(c, &[MSG], |_, _, r| r.unwrap()).unwrap();
        let e = e.clone();
        lp.read_start(c, move |lp, c, r| {
            let d = r.unwrap();
            e.borrow_mut().extend_from_slice(d);
            if !d.is_empty() && e.borrow().len() == MSG.len() {
                // Done: shut down so the child sees EOF and closes.
                lp.shutdown(c, |_, _, r| r.unwrap()).unwrap();
            }
            if d.is_empty() {
                lp.close(c, |_| {}).unwrap();
            }
        })
        .unwrap();
    })
    .unwrap();
    run_with_deadline(&mut lp, 20_000);
    wait_helper(child);
    assert_eq!(&*echoed.borrow(), MSG);
    assert_loop_empty(&lp);
}

#[test]
fn helper_echo_connection() {
    if !is_helper("helper_echo_connection") {
        return;
    }
    let mut lp = Loop::new().unwrap();
    let pipe = channel_from_stdin(&mut lp);
    lp.read_start(pipe, |lp, pipe, r| {
        let data = r.unwrap();
        if data.is_empty() {
            lp.close(pipe, |_| {}).unwrap();
            return;
        }
        assert_eq!(data, b"C");
        let Socket::Tcp(c) = lp.pipe_accept_pending(pipe).unwrap() else {
            panic!("expected TCP");
        };
        assert!(lp.tcp_getpeername(c).is_ok(), "a connected socket");
        lp.read_start(c, move |lp, c, r| match r.unwrap() {
            [] => {
                lp.close(c, |_| {}).unwrap();
                lp.close(pipe, |_| {}).unwrap();
            }
            d => lp.write(c, &[d], |_, _, r| r.unwrap()).unwrap(),
        })
        .unwrap();
    })
    .unwrap();
    run_with_deadline(&mut lp, 20_000);
    assert_loop_empty(&lp);
}

// ----- (4) the child sends a handle back ------------------------------------

/// libuv's `ipc_send_recv_tcp` direction child → parent: the child binds a
/// TCP socket and sends it; the parent accepts it from the pipe, listens on
/// it and accepts a connection.
#[test]
fn ipc_child_sends_handle_back() {
    let mut lp = Loop::new().unwrap();
    let (child, pipe) = spawn_helper(&mut lp, "helper_send_back");
    let accepted = Counter::new();
    let a = accepted.clone();
    lp.read_start(pipe, move |lp, pipe, r| {
        let data = r.unwrap();
        if data.is_empty() {
            return;
        }
        assert_eq!(data, b"B");
        assert_eq!(lp.pipe_pending_count(pipe), 1);
        let Socket::Tcp(srv) = lp.pipe_accept_pending(pipe).unwrap() else {
            panic!("expected TCP");
        };
        let addr = lp.tcp_getsockname(srv).unwrap();
        let a = a.clone();
        lp.tcp_listen(srv, 8, move |lp, s, c| {
            a.hit();
            lp.close(c.unwrap(), |_| {}).unwrap();
            lp.close(s, |_| {}).unwrap();
            lp.close(pipe, |_| {}).unwrap();
        })
        .unwrap();
        let client = lp.tcp_init();
        lp.tcp_connect(client, addr, |lp, c, r| {
            r.unwrap();
            lp.close(c, |_| {}).unwrap();
        })
        .unwrap();
    })
    .unwrap();
    run_with_deadline(&mut lp, 20_000);
    wait_helper(child);
    assert_eq!(accepted.get(), 1);
    assert_loop_empty(&lp);
}

#[test]
fn helper_send_back() {
    if !is_helper("helper_send_back") {
        return;
    }
    let mut lp = Loop::new().unwrap();
    let pipe = channel_from_stdin(&mut lp);
    let t = lp.tcp_init();
    lp.tcp_bind(t, "127.0.0.1:0".parse().unwrap(), BindFlags::default())
        .unwrap();
    lp.write2(pipe, &[b"B"], t, move |lp, _, r| {
        r.unwrap();
        lp.close(t, |_| {}).unwrap();
    })
    .unwrap();
    lp.read_start(pipe, |lp, pipe, r| {
        assert!(r.unwrap().is_empty());
        lp.close(pipe, |_| {}).unwrap();
    })
    .unwrap();
    run_with_deadline(&mut lp, 20_000);
    assert_loop_empty(&lp);
}

// ----- (5) unaccepted fds are closed with the pipe --------------------------

/// libuv: fds received but never accepted are closed when the pipe closes.
#[test]
fn ipc_unaccepted_fd_closed_with_pipe() {
    isolated("ipc_unaccepted_fd_closed_with_pipe", || {
        let baseline = open_fds();
        {
            let mut lp = Loop::new().unwrap();
            let (a, b) = lp.pipe_pair(true).unwrap();
            let u = lp.udp_init();
            lp.udp_bind(u, "127.0.0.1:0".parse().unwrap(), BindFlags::default())
                .unwrap();
            lp.write2(a, &[b"u"], u, move |lp, a, r| {
                r.unwrap();
                lp.close(u, |_| {}).unwrap();
                lp.close(a, |_| {}).unwrap();
            })
            .unwrap();
            let seen = Counter::new();
            let s = seen.clone();
            lp.read_start(b, move |lp, b, r| {
                assert_eq!(r.unwrap(), b"u");
                assert_eq!(lp.pipe_pending_count(b), 1);
                s.hit();
                lp.close(b, |_| {}).unwrap();
            })
            .unwrap();
            run_with_deadline(&mut lp, 5000);
            assert_eq!(seen.get(), 1);
            assert_loop_empty(&lp);
        }
        assert_eq!(open_fds(), baseline, "an fd leaked");
    });
}

// ----- (6) heavy traffic both ways ------------------------------------------

const HEAVY_WRITES: usize = 256;
const HEAVY_CHUNK: usize = 8 << 10;
const HEAVY_TOTAL: usize = HEAVY_WRITES * 3 * HEAVY_CHUNK;

/// Writes 256 × 3 × 8 KiB on `pipe` while reading as much from the peer;
/// closes the pipe when both are done.
fn heavy_traffic(lp: &mut Loop, pipe: Handle<Pipe>) -> Rc<RefCell<(usize, usize)>> {
    // (bytes received, writes completed)
    let st = Rc::new(RefCell::new((0usize, 0usize)));
    fn maybe_close(lp: &mut Loop, pipe: Handle<Pipe>, st: &Rc<RefCell<(usize, usize)>>) {
        let (got, wrote) = *st.borrow();
        if got == HEAVY_TOTAL && wrote == HEAVY_WRITES && !lp.is_closing(pipe) {
            lp.close(pipe, |_| {}).unwrap();
        }
    }
    let s = st.clone();
    lp.read_start(pipe, move |lp, pipe, r| {
        let d = r.unwrap();
        assert!(!d.is_empty() || s.borrow().0 == HEAVY_TOTAL, "early EOF");
        assert!(d.iter().all(|&b| b == b'h'));
        s.borrow_mut().0 += d.len();
        maybe_close(lp, pipe, &s);
    })
    .unwrap();
    let chunk = vec![b'h'; HEAVY_CHUNK];
    for _ in 0..HEAVY_WRITES {
        let s = st.clone();
        lp.write(pipe, &[&chunk, &chunk, &chunk], move |lp, pipe, r| {
            r.unwrap();
            s.borrow_mut().1 += 1;
            maybe_close(lp, pipe, &s);
        })
        .unwrap();
    }
    st
}

/// libuv's `ipc_heavy_traffic_deadlock_bug`: both sides write a lot at once
/// over the IPC pipe; neither deadlocks.
#[test]
fn ipc_heavy_traffic() {
    let mut lp = Loop::new().unwrap();
    let (child, pipe) = spawn_helper(&mut lp, "helper_heavy_traffic");
    let st = heavy_traffic(&mut lp, pipe);
    run_with_deadline(&mut lp, 30_000);
    wait_helper(child);
    assert_eq!(*st.borrow(), (HEAVY_TOTAL, HEAVY_WRITES));
    assert_loop_empty(&lp);
}

#[test]
fn helper_heavy_traffic() {
    if !is_helper("helper_heavy_traffic") {
        return;
    }
    let mut lp = Loop::new().unwrap();
    let pipe = channel_from_stdin(&mut lp);
    let st = heavy_traffic(&mut lp, pipe);
    run_with_deadline(&mut lp, 30_000);
    assert_eq!(*st.borrow(), (HEAVY_TOTAL, HEAVY_WRITES));
    assert_loop_empty(&lp);
}

// ----- (7) write2 errors ----------------------------------------------------

/// `write2` on a pipe that is not in IPC mode, with no data, or with a
/// closing handle fails at once, and its callback is dropped.
#[test]
fn ipc_write2_errors() {
    let mut lp = Loop::new().unwrap();
    let (a, b) = lp.pipe_pair(false).unwrap();
    let (c, d) = lp.pipe_pair(true).unwrap();
    let t = lp.tcp_init();
    lp.tcp_bind(t, "127.0.0.1:0".parse().unwrap(), BindFlags::default())
        .unwrap();
    let e = lp
        .write2(a, &[b"x"], t, |_, _, _| unreachable!())
        .unwrap_err();
    assert_eq!(e.kind(), std::io::ErrorKind::InvalidInput, "non-IPC pipe");
    let e = lp.write2(c, &[], t, |_, _, _| unreachable!()).unwrap_err();
    assert_eq!(e.kind(), std::io::ErrorKind::InvalidInput, "no data");
    let e = lp
        .write2(c, &[b""], t, |_, _, _| unreachable!())
        .unwrap_err();
    assert_eq!(e.kind(), std::io::ErrorKind::InvalidInput, "empty data");
    let unset = lp.tcp_init();
    let e = lp
        .write2(c, &[b"x"], unset, |_, _, _| unreachable!())
        .unwrap_err();
    assert_eq!(e.raw_os_error(), Some(nix::libc::EBADF), "no socket");
    lp.close(t, |_| {}).unwrap();
    let e = lp
        .write2(c, &[b"x"], t, |_, _, _| unreachable!())
        .unwrap_err();
    assert_eq!(e.raw_os_error(), Some(nix::libc::EBADF), "closing handle");
    // A plain zero-length write on an IPC pipe is fine (libuv's ipc_send_zero).
    let zero = Counter::new();
    let z = zero.clone();
    lp.write(c, &[b""], move |_, _, r| {
        r.unwrap();
        z.hit();
    })
    .unwrap();
    for h in [a, b, c, d] {
        lp.close(h, |_| {}).unwrap();
    }
    lp.close(unset, |_| {}).unwrap();
    run_with_deadline(&mut lp, 5000);
    assert_eq!(zero.get(), 1);
    assert_loop_empty(&lp);
}

// ----- (8) unexpected control data ------------------------------------------

/// Credentials (`SCM_CREDENTIALS`) arriving on an IPC pipe, alone or next to
/// an fd, are ignored: no byte is lost and the fd is still delivered.
#[test]
fn ipc_unexpected_credentials_ignored() {
    let mut lp = Loop::new().unwrap();
    let (tx, rx) = raw_pair();
    // With SO_PASSCRED the kernel attaches credentials to every message.
    setsockopt(&rx, sockopt::PassCred, &true).unwrap();
    let p = lp.pipe_init(true);
    lp.pipe_open(p, rx).unwrap();
    let creds = UnixCredentials::new();
    send_raw(&tx, b"one", &[ControlMessage::ScmCredentials(&creds)]);
    let udp = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    send_raw(
        &tx,
        b"two",
        &[
            ControlMessage::ScmCredentials(&creds),
            ControlMessage::ScmRights(&[udp.as_raw_fd()]),
        ],
    );
    drop(udp);
    drop(tx);
    let got = Rc::new(RefCell::new(Vec::new()));
    let fds = Counter::new();
    let (g, f) = (got.clone(), fds.clone());
    lp.read_start(p, move |lp, p, r| {
        let d = r.unwrap();
        if d.is_empty() {
            lp.close(p, |_| {}).unwrap();
            return;
        }
        g.borrow_mut().extend_from_slice(d);
        while lp.pipe_pending_count(p) > 0 {
            let Socket::Udp(u) = lp.pipe_accept_pending(p).unwrap() else {
                panic!("expected UDP");
            };
            f.hit();
            lp.close(u, |_| {}).unwrap();
        }
    })
    .unwrap();
    run_with_deadline(&mut lp, 5000);
    assert_eq!(&*got.borrow(), b"onetwo");
    assert_eq!(fds.get(), 1);
    assert_loop_empty(&lp);
}

/// An fd sent to a pipe that is not in IPC mode: the data arrives intact,
/// no fd is queued, and none leaks (the kernel discards what a plain read
/// does not take).
#[test]
fn ipc_fd_on_non_ipc_pipe_does_not_leak() {
    isolated("ipc_fd_on_non_ipc_pipe_does_not_leak", || {
        let baseline = open_fds();
        {
            let mut lp = Loop::new().unwrap();
            let (tx, rx) = raw_pair();
            let p = lp.pipe_init(false);
            lp.pipe_open(p, rx).unwrap();
            {
                let udp = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
                send_raw(
                    &tx,
                    b"data",
                    &[ControlMessage::ScmRights(&[udp.as_raw_fd()])],
                );
            }
            drop(tx);
            let got = Rc::new(RefCell::new(Vec::new()));
            let g = got.clone();
            lp.read_start(p, move |lp, p, r| {
                let d = r.unwrap();
                assert_eq!(lp.pipe_pending_count(p), 0);
                if d.is_empty() {
                    lp.close(p, |_| {}).unwrap();
                } else {
                    g.borrow_mut().extend_from_slice(d);
                }
            })
            .unwrap();
            run_with_deadline(&mut lp, 5000);
            assert_eq!(&*got.borrow(), b"data");
            assert_loop_empty(&lp);
        }
        assert_eq!(open_fds(), baseline, "an fd leaked");
    });
}
