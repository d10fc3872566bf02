//! Unix-domain pipes bound to paths (libuv's `test-ping-pong.c`
//! `pipe_ping_pong`, `test-pipe-bind-error.c`, `test-pipe-connect-error.c`,
//! `test-pipe-getsockname.c`, `test-pipe-server-close.c`).
mod util;

use std::cell::{Cell, RefCell};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::rc::Rc;

use util::*;
use uvcluster::uv::{Handle, Loop, Pipe};

/// A fresh, empty directory for this test's socket paths, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(name: &str) -> TempDir {
        let dir = std::env::temp_dir().join(format!("uvcluster-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }
    fn path(&self, file: &str) -> PathBuf {
        self.0.join(file)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn listening(
    lp: &mut Loop,
    path: &Path,
    mut on_conn: impl FnMut(&mut Loop, Handle<Pipe>, Handle<Pipe>) + 'static,
) -> Handle<Pipe> {
    let s = lp.pipe_init(false);
    lp.pipe_bind(s, path).unwrap();
    lp.pipe_listen(s, 128, move |lp, s, c| on_conn(lp, s, c.unwrap()))
        .unwrap();
    s
}

/// libuv's `pipe_ping_pong`: PING/PONG over a named pipe, then shutdown and
/// EOF; the socket path is unlinked when the server closes.
#[test]
fn pipe_ping_pong() {
    const PINGS: usize = 100;
    let dir = TempDir::new("ping");
    let path = dir.path("sock");
    let mut lp = Loop::new().unwrap();
    let srv = listening(&mut lp, &path, |lp, s, c| {
        lp.close(s, |_| {}).unwrap();
        lp.read_start(c, |lp, c, r| match r.unwrap() {
            [] => lp.close(c, |_| {}).unwrap(),
            d => lp.write(c, &[d], |_, _, r| r.unwrap()).unwrap(),
        })
        .unwrap();
    });
    assert!(path.exists());
    let pongs = Counter::new();
    let eof = Counter::new();
    let client = lp.pipe_init(false);
    let (p, e) = (pongs.clone(), eof.clone());
    lp.pipe_connect(client, &path, move |lp, c, r| {
        r.unwrap();
        lp.write(c, &[b"PING"], |_, _, r| r.unwrap()).unwrap();
        let acc = RefCell::new(Vec::new());
        let (p, e) = (p.clone(), e.clone());
        lp.read_start(c, move |lp, c, r| {
            let d = r.unwrap();
            if d.is_empty() {
                e.hit();
                lp.close(c, |_| {}).unwrap();
                return;
            }
            let mut acc = acc.borrow_mut();
            acc.extend_from_slice(d);
            while acc.len() >= 4 {
                assert_eq!(&acc[..4], b"PING");
                acc.drain(..4);
                p.hit();
                if p.get() == PINGS {
                    lp.shutdown(c, |_, _, r| r.unwrap()).unwrap();
                } else {
                    lp.write(c, &[b"PING"], |_, _, r| r.unwrap()).unwrap();
                }
            }
        })
        .unwrap();
    })
    .unwrap();
    run_with_deadline(&mut lp, 5000);
    assert_eq!(pongs.get(), PINGS);
    assert_eq!(eof.get(), 1);
    assert!(!path.exists(), "the path is unlinked on close");
    assert!(lp.pipe_getsockname(srv).is_err(), "stale");
    assert_loop_empty(&lp);
}

/// libuv's `pipe_bind_error_addrinuse`, `pipe_listen_without_bind`.
#[test]
fn pipe_bind_errors() {
    let dir = TempDir::new("bind");
    let path = dir.path("sock");
    let mut lp = Loop::new().unwrap();
    let a = lp.pipe_init(false);
    lp.pipe_bind(a, &path).unwrap();
    let b = lp.pipe_init(false);
    let e = lp.pipe_bind(b, &path).unwrap_err();
    assert_eq!(e.raw_os_error(), Some(nix::libc::EADDRINUSE));
    assert!(lp.pipe_bind(a, dir.path("other")).is_err(), "bound twice");
    let c = lp.pipe_init(false);
    assert!(
        lp.pipe_listen(c, 8, |_, _, _| unreachable!()).is_err(),
        "listen without bind"
    );
    let ipc = lp.pipe_init(true);
    lp.pipe_bind(ipc, dir.path("ipc")).unwrap();
    assert!(
        lp.pipe_listen(ipc, 8, |_, _, _| unreachable!()).is_err(),
        "an IPC pipe cannot listen"
    );
    for h in [a, b, c, ipc] {
        lp.close(h, |_| {}).unwrap();
    }
    run_with_deadline(&mut lp, 5000);
    assert!(!path.exists());
    assert_loop_empty(&lp);
}

/// libuv's `pipe_connect_bad_name`/`pipe_connect_to_file`: errors come
/// through the callback, and the handle stays open.
#[test]
fn pipe_connect_errors() {
    let dir = TempDir::new("connect");
    let mut lp = Loop::new().unwrap();
    let called = Counter::new();
    let p = lp.pipe_init(false);
    let c = called.clone();
    lp.pipe_connect(p, dir.path("missing"), move |lp, p, r| {
        assert_eq!(r.unwrap_err().raw_os_error(), Some(nix::libc::ENOENT));
        assert!(!lp.is_closing(p));
        c.hit();
        lp.close(p, |_| {}).unwrap();
    })
    .unwrap();
    let file = dir.path("file");
    std::fs::write(&file, b"not a socket").unwrap();
    let q = lp.pipe_init(false);
    let c = called.clone();
    lp.pipe_connect(q, &file, move |lp, q, r| {
        assert_eq!(r.unwrap_err().raw_os_error(), Some(nix::libc::ECONNREFUSED));
        c.hit();
        lp.close(q, |_| {}).unwrap();
    })
    .unwrap();
    run_with_deadline(&mut lp, 5000);
    assert_eq!(called.get(), 2);
    assert_loop_empty(&lp);
}

/// libuv's `pipe_getsockname`: the server and the accepted side report the
/// path, the client's peer is the path, the client's own name is empty.
#[test]
fn pipe_getsockname_getpeername() {
    let dir = TempDir::new("names");
    let path = dir.path("sock");
    let mut lp = Loop::new().unwrap();
    let accepted: Rc<Cell<Option<Handle<Pipe>>>> = Rc::default();
    let a = accepted.clone();
    let srv = listening(&mut lp, &path, move |_, _, c| a.set(Some(c)));
    assert_eq!(lp.pipe_getsockname(srv).unwrap(), path);
    assert!(lp.pipe_getpeername(srv).is_err());
    let client = lp.pipe_init(false);
    let connected = Counter::new();
    let c = connected.clone();
    lp.pipe_connect(client, &path, move |_, _, r| {
        r.unwrap();
        c.hit();
    })
    .unwrap();
    run_until(&mut lp, 5000, |_| {
        connected.get() == 1 && accepted.get().is_some()
    });
    let conn = accepted.get().unwrap();
    assert_eq!(lp.pipe_getpeername(client).unwrap(), path);
    assert_eq!(lp.pipe_getsockname(client).unwrap(), PathBuf::new());
    assert_eq!(lp.pipe_getsockname(conn).unwrap(), path);
    let unset = lp.pipe_init(false);
    assert!(lp.pipe_getsockname(unset).is_err());
    for h in [srv, client, conn, unset] {
        lp.close(h, |_| {}).unwrap();
    }
    run_with_deadline(&mut lp, 5000);
    assert!(!path.exists());
    assert_loop_empty(&lp);
}

/// libuv's `pipe_set_chmod`.
#[test]
fn pipe_chmod() {
    let dir = TempDir::new("chmod");
    let path = dir.path("sock");
    let mut lp = Loop::new().unwrap();
    let p = lp.pipe_init(false);
    let unbound = lp.pipe_init(false);
    assert_eq!(
        lp.pipe_chmod(unbound, true, true)
            .unwrap_err()
            .raw_os_error(),
        Some(nix::libc::EBADF)
    );
    lp.pipe_bind(p, &path).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
    lp.pipe_chmod(p, true, false).unwrap();
    let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode & 0o444, 0o444);
    lp.pipe_chmod(p, true, true).unwrap();
    let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode & 0o666, 0o666);
    for h in [p, unbound] {
        lp.close(h, |_| {}).unwrap();
    }
    run_with_deadline(&mut lp, 5000);
    assert_loop_empty(&lp);
}

/// libuv's `pipe_server_close`: closing a server with a connected client;
/// the client reads EOF once the accepted side closes too.
#[test]
fn pipe_server_close() {
    let dir = TempDir::new("srvclose");
    let path = dir.path("sock");
    let mut lp = Loop::new().unwrap();
    listening(&mut lp, &path, |lp, s, c| {
        lp.close(s, |_| {}).unwrap();
        lp.close(c, |_| {}).unwrap();
    });
    let client = lp.pipe_init(false);
    let eof = Counter::new();
    let e = eof.clone();
    lp.pipe_connect(client, &path, move |lp, c, r| {
        r.unwrap();
        let e = e.clone();
        lp.read_start(c, move |lp, c, r| {
            assert!(r.unwrap().is_empty());
            e.hit();
            lp.close(c, |_| {}).unwrap();
        })
        .unwrap();
    })
    .unwrap();
    run_with_deadline(&mut lp, 5000);
    assert_eq!(eof.get(), 1);
    assert!(!path.exists());
    assert_loop_empty(&lp);
}

/// `socket_open` makes a handle of the fd's kind from an `OwnedFd` (what
/// Node's `listen({fd})` does with `uv_guess_handle`), and refuses an fd
/// that is no socket we know with `ENOTSUP`, closing it: the handle or
/// the error owns the fd, nothing leaks.
///
/// It counts the process's fds, so it runs in a process of its own: the
/// other tests of this file open and close fds in parallel.
#[test]
fn socket_open_makes_a_handle_of_the_fds_kind() {
    isolated(
        "socket_open_makes_a_handle_of_the_fds_kind",
        socket_open_makes_a_handle_of_the_fds_kind_body,
    );
}

fn socket_open_makes_a_handle_of_the_fds_kind_body() {
    use std::os::fd::OwnedFd;
    use uvcluster::uv::Socket;

    let mut lp = Loop::new().unwrap();
    let before = open_fds();
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let Socket::Tcp(t) = lp.socket_open(OwnedFd::from(listener)).unwrap() else {
        panic!("a TCP listener opens as a Handle<Tcp>");
    };
    assert_eq!(lp.tcp_getsockname(t).unwrap().port(), port);

    let (x, y) = std::os::unix::net::UnixStream::pair().unwrap();
    let Socket::Pipe(p) = lp.socket_open(OwnedFd::from(x)).unwrap() else {
        panic!("a Unix stream socket opens as a Handle<Pipe>");
    };
    assert!(!lp.pipe_is_ipc(p));

    let udp = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let uport = udp.local_addr().unwrap().port();
    let Socket::Udp(u) = lp.socket_open(OwnedFd::from(udp)).unwrap() else {
        panic!("a UDP socket opens as a Handle<Udp>");
    };
    assert_eq!(lp.udp_getsockname(u).unwrap().port(), uport);

    let file = std::fs::File::open("/dev/null").unwrap();
    let err = lp.socket_open(OwnedFd::from(file)).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(nix::libc::ENOTSUP));

    for s in [Socket::Tcp(t), Socket::Pipe(p), Socket::Udp(u)] {
        lp.close(s, |_| {}).unwrap();
    }
    lp.run(uvcluster::uv::RunMode::Default).unwrap();
    drop(y);
    assert_eq!(open_fds(), before, "every fd was closed by its owner");
    assert_loop_empty(&lp);
}

/// `take_env_fd` adopts the fd a parent placed for this process and named
/// in an environment variable, removes the variable so the fd is adopted
/// once, and reports a value that is no fd number, or an fd that is not
/// open, as a typed error. The parent places a socket at fd 3 with
/// `Loop::spawn`; the child (this test, re-executed) adopts it and writes
/// through it.
#[test]
fn take_env_fd_adopts_a_placed_fd_once() {
    use std::io::Read;
    use std::os::fd::AsFd;
    use uvcluster::uv::{ProcessOptions, RunMode, Stdio, take_env_fd};

    const NAME: &str = "take_env_fd_adopts_a_placed_fd_once";
    if is_helper(NAME) {
        let fd = take_env_fd("UVC_TEST_FD")
            .unwrap()
            .expect("the fd is named");
        assert!(
            std::env::var_os("UVC_TEST_FD").is_none(),
            "variable removed"
        );
        assert!(take_env_fd("UVC_TEST_FD").unwrap().is_none(), "taken once");
        let e = take_env_fd("UVC_BAD_FD").unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::InvalidInput);
        assert!(e.to_string().contains("UVC_BAD_FD=\"abc\""), "{e}");
        assert!(std::env::var_os("UVC_BAD_FD").is_none(), "removed as well");
        let e = take_env_fd("UVC_CLOSED_FD").unwrap_err();
        assert_eq!(e.raw_os_error(), Some(nix::libc::EBADF));
        let mut lp = Loop::new().unwrap();
        let p = lp.pipe_init(false);
        lp.pipe_open(p, fd).unwrap();
        lp.write(p, &[b"adopted"], |lp, p, r| {
            r.unwrap();
            lp.close(p, |_| {}).unwrap();
        })
        .unwrap();
        lp.run(RunMode::Default).unwrap();
        return;
    }
    let mut lp = Loop::new().unwrap();
    let (mut ours, theirs) = std::os::unix::net::UnixStream::pair().unwrap();
    let status = std::rc::Rc::new(Cell::new(None));
    let s = status.clone();
    let exe = std::env::current_exe().unwrap();
    lp.spawn(
        ProcessOptions::new(&exe)
            .args([NAME, "--exact", "--nocapture", "--test-threads=1"])
            .env([
                ("UVCLUSTER_TEST_HELPER", NAME),
                ("UVC_TEST_FD", "3"),
                ("UVC_BAD_FD", "abc"),
                ("UVC_CLOSED_FD", "1000000"),
            ])
            .stdio(2, Stdio::Inherit)
            .stdio(3, Stdio::Fd(theirs.as_fd()))
            .on_exit(move |lp, p, code, sig| {
                s.set(Some((code, sig)));
                lp.close(p, |_| {}).unwrap();
            }),
    )
    .unwrap();
    drop(theirs);
    run_with_deadline(&mut lp, 20_000);
    assert_eq!(status.get(), Some((0, None)), "the helper's checks passed");
    let mut got = String::new();
    ours.read_to_string(&mut got).unwrap();
    assert_eq!(got, "adopted");
    assert_loop_empty(&lp);
}
