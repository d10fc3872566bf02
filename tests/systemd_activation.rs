//! Socket activation (systemd's `LISTEN_FDS`, `Loop::listen_fds`), with the
//! real `systemd-socket-activate` (Debian's `systemd` package) starting
//! `uvcluster run` and `cluster_hello`: connections made before the primary
//! exists queue in the inherited socket and are served, in every policy;
//! the workers do not see the variables; a parent that keeps the socket
//! restarts the whole primary under load and no request fails. And the
//! address rules of the loop's table, in-process.
//!
//! The TCP sockets are the test's own, bound on port 0 and handed to
//! `systemd-socket-activate` the way systemd hands it sockets (`LISTEN_FDS`
//! at fd 3; it passes them through to the service); the Unix-path tests
//! let the tool bind (`-l PATH`).

mod util;

use std::cell::{Cell, RefCell};
use std::collections::BTreeSet;
use std::ffi::OsString;
use std::net::{SocketAddr, TcpListener};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::rc::Rc;

use util::{assert_loop_empty, cli_bin, require_node, run_until};
use uvcluster::uv::{
    BindFlags, Handle, ListenAddress, Loop, Process, ProcessOptions, RunMode, Signum, Stdio,
    StreamType,
};

const ACTIVATE: &str = "systemd-socket-activate";
const LIMIT_MS: u64 = 30_000;

/// Fails with the command to install it if `systemd-socket-activate` is
/// missing (as `require_node` does; `.ci/run` installs it).
fn require_socket_activate() {
    let ok = std::process::Command::new(ACTIVATE)
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    assert!(
        ok,
        "these tests run the real `{ACTIVATE}`, which is not installed: \
         `apt-get install -y systemd` (or run .ci/run, which installs it)"
    );
}

fn node_worker() -> &'static str {
    concat!(env!("CARGO_MANIFEST_DIR"), "/tests/node/systemd_worker.js")
}

/// A temporary directory of this test's own, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> TempDir {
        let d = std::env::temp_dir().join(format!(
            "uvcluster-systemd-{tag}-{}-{}",
            std::process::id(),
            Loop::hrtime()
        ));
        std::fs::create_dir_all(&d).unwrap();
        TempDir(d)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A process's exit: code and signal, once it has exited.
type Exit = Rc<Cell<Option<(i64, Option<Signum>)>>>;

/// A service started by `systemd-socket-activate`: its output and its exit.
struct Service {
    process: Handle<Process>,
    out: Rc<RefCell<String>>,
    err: Rc<RefCell<String>>,
    exit: Exit,
}

impl Service {
    fn log(&self) -> String {
        format!(
            "stdout:\n{}\nstderr:\n{}",
            self.out.borrow(),
            self.err.borrow()
        )
    }

    /// SIGTERM (a graceful stop), then waits for the exit: code 0.
    fn stop(&self, lp: &mut Loop) {
        lp.process_kill(self.process, Signum::SIGTERM).unwrap();
        let exit = self.exit.clone();
        run_until(lp, LIMIT_MS, |_| exit.get().is_some());
        assert_eq!(self.exit.get(), Some((0, None)), "{}", self.log());
    }
}

fn read_into(lp: &mut Loop, pipe: Handle<uvcluster::uv::Pipe>) -> Rc<RefCell<String>> {
    let text = Rc::new(RefCell::new(String::new()));
    let t = text.clone();
    lp.read_start(pipe, move |lp, p, r| match r {
        Ok(d) if !d.is_empty() => t.borrow_mut().push_str(&String::from_utf8_lossy(d)),
        _ => {
            lp.close_if_open(p);
        }
    })
    .unwrap();
    text
}

/// Starts `systemd-socket-activate [listen...] COMMAND...`. With `fd3`,
/// that socket is passed to the tool as systemd passes sockets (fd 3,
/// `LISTEN_FDS=1`, `LISTEN_FDNAMES=web`, `LISTEN_PID` the tool's pid, set
/// by the shell that execs it), and the tool passes it on. `env` reaches
/// the service (`-E`); `RUST_LOG=info` shows the library's log lines.
fn activate(
    lp: &mut Loop,
    fd3: Option<BorrowedFd<'_>>,
    listen: &[String],
    env: &[(&str, String)],
    command: &[OsString],
) -> Service {
    let mut args: Vec<OsString> = vec![
        "-c".into(),
        "LISTEN_PID=$$ exec \"$@\"".into(),
        "sh".into(),
        ACTIVATE.into(),
    ];
    if fd3.is_some() {
        // The tool names passed-through fds from this flag, not from
        // LISTEN_FDNAMES.
        args.push("--fdname=web".into());
    }
    for l in listen {
        args.push(l.into());
    }
    let mut vars: Vec<(String, String)> = vec![
        ("PATH".into(), std::env::var("PATH").unwrap_or_default()),
        ("RUST_LOG".into(), "info".into()),
    ];
    vars.extend(env.iter().map(|(k, v)| (k.to_string(), v.clone())));
    for (k, _) in &vars {
        args.push(format!("--setenv={k}").into());
    }
    args.extend(command.iter().cloned());
    if fd3.is_some() {
        vars.push(("LISTEN_FDS".into(), "1".into()));
        vars.push(("LISTEN_FDNAMES".into(), "web".into()));
    }
    let (out, err) = (lp.pipe_init(false), lp.pipe_init(false));
    let exit = Rc::new(Cell::new(None));
    let e = exit.clone();
    let mut opts = ProcessOptions::new("sh")
        .args(args)
        .env(vars)
        .stdio(1, Stdio::Pipe(out))
        .stdio(2, Stdio::Pipe(err))
        .on_exit(move |lp, p, code, signal| {
            e.set(Some((code, signal)));
            lp.close(p, |_| {}).unwrap();
        });
    if let Some(fd) = fd3 {
        opts = opts.stdio(3, Stdio::Fd(fd));
    }
    let process = lp.spawn(opts).unwrap();
    Service {
        process,
        out: read_into(lp, out),
        err: read_into(lp, err),
        exit,
    }
}

fn uvcluster_run(workers: u32, policy: &str, command: &[&str]) -> Vec<OsString> {
    let mut v: Vec<OsString> = vec![
        cli_bin().into(),
        "run".into(),
        "-w".into(),
        workers.to_string().into(),
        "-p".into(),
        policy.into(),
        "--".into(),
    ];
    v.extend(command.iter().map(OsString::from));
    v
}

/// Where a client connects.
#[derive(Clone, Debug)]
enum Target {
    Tcp(SocketAddr),
    Unix(PathBuf),
}

/// One HTTP answer's body, or what went wrong.
type Answers = Rc<RefCell<Vec<Result<String, String>>>>;

/// Sends one `GET /` (`Connection: close`) and reads the answer to EOF.
fn get(lp: &mut Loop, target: &Target, answers: &Answers) {
    let a = answers.clone();
    match target {
        Target::Tcp(addr) => {
            let t = lp.tcp_init();
            lp.tcp_connect(t, *addr, move |lp, t, r| exchange(lp, t, r, a))
                .unwrap();
        }
        Target::Unix(path) => {
            let p = lp.pipe_init(false);
            lp.pipe_connect(p, path, move |lp, p, r| exchange(lp, p, r, a))
                .unwrap();
        }
    }
}

fn exchange<K: StreamType>(lp: &mut Loop, h: Handle<K>, r: std::io::Result<()>, a: Answers) {
    if let Err(e) = r {
        a.borrow_mut().push(Err(format!("connect: {e}")));
        lp.close_if_open(h);
        return;
    }
    lp.write(
        h,
        &[b"GET / HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n"],
        |_, _, _| {},
    )
    .unwrap();
    let mut buf = Vec::new();
    lp.read_start(h, move |lp, h, r| match r {
        Ok(d) if !d.is_empty() => buf.extend_from_slice(d),
        Ok(_) => {
            let text = String::from_utf8_lossy(&buf).into_owned();
            a.borrow_mut().push(match text.split_once("\r\n\r\n") {
                Some((head, body)) if head.starts_with("HTTP/1.1 200") => Ok(body.to_owned()),
                _ => Err(format!("not an answer: {text:?}")),
            });
            lp.close_if_open(h);
        }
        Err(e) => {
            a.borrow_mut().push(Err(format!("read: {e}")));
            lp.close_if_open(h);
        }
    })
    .unwrap();
}

/// The worker pid in a `systemd_worker.js` answer, after checking that the
/// worker saw none of the systemd variables.
fn worker_pid(body: &str) -> u64 {
    let v: serde_json::Value = serde_json::from_str(body.trim()).unwrap();
    assert_eq!(
        v["env"],
        serde_json::json!({}),
        "the worker inherited systemd variables: {body}"
    );
    v["pid"].as_u64().unwrap()
}

/// Sends `n` requests at once and waits for all the answers.
fn burst(lp: &mut Loop, target: &Target, n: usize, svc: &Service) -> Vec<String> {
    let answers: Answers = Rc::default();
    for _ in 0..n {
        get(lp, target, &answers);
    }
    let a = answers.clone();
    run_until(lp, LIMIT_MS, |_| a.borrow().len() == n);
    let got = answers.borrow().clone();
    got.into_iter()
        .map(|r| r.unwrap_or_else(|e| panic!("{e}\n{}", svc.log())))
        .collect()
}

/// Runs the loop until the closed pipes and handles are gone.
fn finish(mut lp: Loop) {
    lp.run(RunMode::Default).unwrap();
    assert_loop_empty(&lp);
}

/// `systemd-socket-activate` starts the service on the first connection:
/// every request sent before the primary (let alone its workers) exists
/// waits in the inherited socket and is served, under each policy; the
/// primary takes the socket instead of binding (a bind of the port would
/// fail: the socket is listening in this process too); the workers see
/// none of the variables.
fn node_cluster_under_socket_activate(policy: &str) {
    require_node();
    require_socket_activate();
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let mut lp = Loop::new().unwrap();
    let svc = activate(
        &mut lp,
        Some(listener.as_fd()),
        &[],
        &[("PORT", addr.port().to_string())],
        &uvcluster_run(2, policy, &["node", node_worker()]),
    );
    let bodies = burst(&mut lp, &Target::Tcp(addr), 8, &svc);
    let pids: BTreeSet<u64> = bodies.iter().map(|b| worker_pid(b)).collect();
    assert!(!pids.is_empty() && pids.len() <= 2, "{pids:?}");
    // The queued burst may all have gone to the first worker to listen;
    // the second listens too (on the inherited socket: a bind would fail).
    let err = svc.err.clone();
    run_until(&mut lp, LIMIT_MS, |_| {
        err.borrow().matches("listening on").count() == 2
    });
    svc.stop(&mut lp);
    let err = svc.err.borrow().clone();
    assert!(
        err.contains(&format!("socket activation: fd 3 (web) {addr}")),
        "{err}"
    );
    assert!(err.contains("Communication attempt on fd 3"), "{err}");
    if policy == "reuseport" {
        assert!(
            err.contains("one socket cannot be split, so every worker shares it"),
            "{err}"
        );
    }
    drop(listener);
    finish(lp);
}

#[test]
fn socket_activate_rr_serves_connections_made_before_the_primary_is_ready() {
    node_cluster_under_socket_activate("rr");
}

#[test]
fn socket_activate_none_serves_connections_made_before_the_primary_is_ready() {
    node_cluster_under_socket_activate("none");
}

#[test]
fn socket_activate_reuseport_shares_the_one_inherited_socket() {
    node_cluster_under_socket_activate("reuseport");
}

/// The tool binds a Unix socket itself (`-l PATH`); the workers listen on
/// that path through the primary and get the inherited socket (a bind
/// would fail: the path exists); the path is not unlinked by the primary.
/// A second inherited socket that nothing listens on stays open and is
/// reported once, when every worker listens.
#[test]
fn socket_activate_unix_path_rr_and_none() {
    require_node();
    require_socket_activate();
    for policy in ["rr", "none"] {
        let dir = TempDir::new("unix");
        let path = dir.0.join("app.sock");
        let spare = dir.0.join("spare.sock");
        let mut lp = Loop::new().unwrap();
        let svc = activate(
            &mut lp,
            None,
            &[
                format!("--listen={}", path.display()),
                format!("--listen={}", spare.display()),
                "--fdname=api:spare".into(),
            ],
            &[("LISTEN_PATH", path.display().to_string())],
            &uvcluster_run(2, policy, &["node", node_worker()]),
        );
        // The tool says when it listens; connecting before would find no
        // path.
        let err = svc.err.clone();
        let said = format!("Listening on {} as 3.", path.display());
        run_until(&mut lp, LIMIT_MS, |_| err.borrow().contains(&said));
        let bodies = burst(&mut lp, &Target::Unix(path.clone()), 6, &svc);
        for b in &bodies {
            worker_pid(b);
        }
        let unused = format!(
            "inherited fd 4 (spare, {}) is not used by any listener; it stays open",
            spare.display()
        );
        let err = svc.err.clone();
        run_until(&mut lp, LIMIT_MS, |_| {
            let e = err.borrow();
            e.contains(&unused) && e.matches("listening on").count() == 2
        });
        svc.stop(&mut lp);
        let err = svc.err.borrow().clone();
        assert_eq!(err.matches(&unused).count(), 1, "{err}");
        assert_eq!(err.matches("listening on").count(), 2, "{err}");
        assert!(
            err.contains(&format!("socket activation: fd 3 (api) {}", path.display())),
            "{err}"
        );
        assert!(
            path.exists(),
            "{policy}: the primary unlinked the inherited socket's path"
        );
        finish(lp);
    }
}

/// The README's main job, `cluster_hello`, as its own primary under
/// `systemd-socket-activate`, and as the workers of `uvcluster run`: its
/// `PORT` listen (no host: the wildcard address) takes the inherited
/// `127.0.0.1` socket of that port.
#[test]
fn socket_activate_cluster_hello_alone_and_under_uvcluster_run() {
    require_socket_activate();
    let hello = util::example("cluster_hello");
    let hello = hello.to_str().unwrap();
    let commands = [
        vec![OsString::from(hello)],
        uvcluster_run(2, "rr", &[hello]),
    ];
    for command in commands {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let mut lp = Loop::new().unwrap();
        let svc = activate(
            &mut lp,
            Some(listener.as_fd()),
            &[],
            &[("PORT", addr.port().to_string()), ("WORKERS", "2".into())],
            &command,
        );
        for body in burst(&mut lp, &Target::Tcp(addr), 6, &svc) {
            assert_eq!(body, "hello world\n", "{}", svc.log());
        }
        svc.stop(&mut lp);
        assert!(
            svc.err
                .borrow()
                .contains(&format!("socket activation: fd 3 (web) {addr}")),
            "{}",
            svc.log()
        );
        drop(listener);
        finish(lp);
    }
}

/// A parent that keeps the listening socket (here the test, standing in for
/// systemd) runs the service twice in sequence, each time through the real
/// `systemd-socket-activate`, while a bounded load goes on: 4 clients at a
/// time, 160 requests, the first primary stopped (SIGTERM, a graceful
/// stop) after 40 answers and the second started when it has exited.
/// No connection is refused: connections made while no primary runs wait
/// in the socket's backlog. With `all_answered`, every request is answered
/// too (`none`: the workers accept, and a worker that stops accepting
/// leaves what it did not accept in the shared socket). Under `rr` the
/// primary accepts, and what it accepted but had not handed to a worker
/// when its last worker left is closed, as Node's `round_robin_handle.js`
/// does: those few requests are reset, and are counted, not failed.
fn restart_under_load(policy: &str, all_answered: bool) {
    require_node();
    require_socket_activate();
    const TOTAL: usize = 160;
    const CONCURRENT: usize = 4;
    const STOP_AFTER: usize = 40;
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let target = Target::Tcp(addr);
    let mut lp = Loop::new().unwrap();
    let start = |lp: &mut Loop| {
        activate(
            lp,
            Some(listener.as_fd()),
            &[],
            &[("PORT", addr.port().to_string())],
            &uvcluster_run(2, policy, &["node", node_worker()]),
        )
    };
    let first = start(&mut lp);
    let answers: Answers = Rc::default();
    let sent = Rc::new(Cell::new(0usize));
    // Each answer sends the next request, until TOTAL are sent: a timer
    // polls the answers in flight (a closed loop of CONCURRENT clients).
    for _ in 0..CONCURRENT {
        get(&mut lp, &target, &answers);
        sent.set(sent.get() + 1);
    }
    let mut second: Option<Service> = None;
    let mut stopped = false;
    // The deadline: a timer that wakes the loop and fails the test.
    let late = util::Counter::new();
    let deadline = lp.timer_init();
    let l = late.clone();
    lp.timer_start(
        deadline,
        std::time::Duration::from_millis(LIMIT_MS * 2),
        std::time::Duration::ZERO,
        move |_, _| l.hit(),
    )
    .unwrap();
    while answers.borrow().len() < TOTAL {
        assert_eq!(
            late.get(),
            0,
            "{} of {TOTAL} answers\n{}",
            answers.borrow().len(),
            first.log()
        );
        lp.run(RunMode::Once).unwrap();
        let done = answers.borrow().len();
        if let Some(Err(e)) = answers.borrow().iter().find(|r| {
            r.as_ref()
                .is_err_and(|e| all_answered || e.starts_with("connect"))
        }) {
            panic!(
                "{policy}: a request failed across the restart: {e}\nfirst:\n{}\nsecond:\n{}",
                first.log(),
                second.as_ref().map(Service::log).unwrap_or_default()
            );
        }
        while sent.get() < TOTAL && sent.get() - done < CONCURRENT {
            get(&mut lp, &target, &answers);
            sent.set(sent.get() + 1);
        }
        if done >= STOP_AFTER && !stopped {
            stopped = true;
            lp.process_kill(first.process, Signum::SIGTERM).unwrap();
        }
        if second.is_none() && first.exit.get().is_some() {
            assert_eq!(first.exit.get(), Some((0, None)), "{}", first.log());
            second = Some(start(&mut lp));
        }
    }
    lp.close(deadline, |_| {}).unwrap();
    let second =
        second.unwrap_or_else(|| panic!("the first primary never exited\n{}", first.log()));
    let pids: Vec<u64> = answers
        .borrow()
        .iter()
        .filter_map(|r| r.as_ref().ok())
        .map(|b| worker_pid(b))
        .collect();
    let reset = TOTAL - pids.len();
    eprintln!("{policy}: {reset} of {TOTAL} requests reset across the restart");
    // Most of them are answered whatever the policy.
    assert!(reset <= CONCURRENT * 2, "{policy}: {reset} reset");
    second.stop(&mut lp);
    // Both generations served: the first answers came from the first
    // primary's workers, the last ones from the second's.
    assert_ne!(pids.first(), pids.last(), "{pids:?}");
    drop(listener);
    finish(lp);
}

#[test]
fn restart_of_the_whole_primary_under_load_refuses_no_connection_rr() {
    restart_under_load("rr", false);
}

#[test]
fn restart_of_the_whole_primary_under_load_fails_no_request_none() {
    restart_under_load("none", true);
}

/// The loop's table, in-process, with sockets added by hand
/// (`Loop::listen_fd_add`, what `LISTEN_FDS` does at `Loop::new`): exact
/// and wildcard matches, port 0 and other addresses never match, the
/// inherited socket outlives the handles that used it, a Unix path is
/// taken and not unlinked, a socket that is not a listener is kept and
/// never matched, and unused sockets are reported once.
#[test]
fn inherited_sockets_are_matched_by_address_and_outlive_their_handles() {
    let mut lp = Loop::new().unwrap();
    let web = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = web.local_addr().unwrap();
    let info = lp.listen_fd_add(OwnedFd::from(web), "web").unwrap();
    assert_eq!(info.address, ListenAddress::Tcp(addr));
    assert_eq!((info.name.as_str(), info.used), ("web", false));
    let spare = TcpListener::bind("127.0.0.1:0").unwrap();
    lp.listen_fd_add(OwnedFd::from(spare), "spare").unwrap();
    let udp = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let other = lp.listen_fd_add(OwnedFd::from(udp), "dgram").unwrap();
    assert_eq!(other.address, ListenAddress::Other);

    let accepted = util::Counter::new();
    let listen_on = |lp: &mut Loop, bind: SocketAddr| {
        let t = lp.tcp_init();
        lp.tcp_bind(t, bind, BindFlags::default()).unwrap();
        let a = accepted.clone();
        lp.tcp_listen(t, 16, move |lp, _, c| {
            a.hit();
            lp.close_if_open(c.unwrap());
        })
        .unwrap();
        t
    };
    let connect_once = |lp: &mut Loop, to: SocketAddr| {
        let before = accepted.get();
        let _c = std::net::TcpStream::connect(to).unwrap();
        let a = accepted.clone();
        run_until(lp, 5_000, |_| a.get() > before);
    };
    // Exact address, then the wildcard of its port: both take the socket.
    let exact = listen_on(&mut lp, addr);
    assert_eq!(lp.tcp_getsockname(exact).unwrap(), addr);
    let wildcard = listen_on(&mut lp, SocketAddr::from(([0u16; 8], addr.port())));
    assert_eq!(lp.tcp_getsockname(wildcard).unwrap(), addr);
    connect_once(&mut lp, addr);
    // Port 0 and another address bind sockets of their own.
    let fresh = listen_on(&mut lp, SocketAddr::from(([127, 0, 0, 1], 0)));
    let fresh_addr = lp.tcp_getsockname(fresh).unwrap();
    assert_ne!(fresh_addr.port(), addr.port());
    let elsewhere = listen_on(&mut lp, SocketAddr::from(([127, 0, 0, 2], addr.port())));
    assert_eq!(
        lp.tcp_getsockname(elsewhere).unwrap(),
        SocketAddr::from(([127, 0, 0, 2], addr.port()))
    );
    // Closing every handle that used it leaves the inherited socket open:
    // a later bind takes it again, and it still accepts.
    for t in [exact, wildcard, fresh, elsewhere] {
        lp.close(t, |_| {}).unwrap();
    }
    lp.run(RunMode::NoWait).unwrap();
    let again = listen_on(&mut lp, addr);
    connect_once(&mut lp, addr);
    lp.close(again, |_| {}).unwrap();

    // A Unix path: taken, and still there after the handle closes.
    let dir = TempDir::new("table");
    let path = dir.0.join("s.sock");
    let unix = std::os::unix::net::UnixListener::bind(&path).unwrap();
    lp.listen_fd_add(OwnedFd::from(unix), "unix").unwrap();
    let p = lp.pipe_init(false);
    lp.pipe_bind(p, &path).unwrap();
    // `readableAll`/`writableAll` reach the inherited socket's path.
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o700)).unwrap();
        lp.pipe_chmod(p, true, true).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o766, "{mode:o}");
    }
    lp.pipe_listen(p, 16, |lp, _, c| {
        lp.close_if_open(c.unwrap());
    })
    .unwrap();
    let _c = std::os::unix::net::UnixStream::connect(&path).unwrap();
    lp.close(p, |_| {}).unwrap();
    lp.run(RunMode::NoWait).unwrap();
    assert!(path.exists(), "the inherited socket's path was unlinked");
    // Taken from the current directory: a relative path matches too.
    let rel = lp.pipe_init(false);
    let cwd = std::env::current_dir().unwrap();
    let relative = pathdiff(&path, &cwd);
    lp.pipe_bind(rel, &relative).unwrap();
    lp.close(rel, |_| {}).unwrap();

    let fds = lp.listen_fds().unwrap();
    let used: Vec<(&str, bool)> = fds.iter().map(|f| (f.name.as_str(), f.used)).collect();
    assert_eq!(
        used,
        [
            ("web", true),
            ("spare", false),
            ("dgram", false),
            ("unix", true)
        ]
    );
    assert_eq!(lp.listen_fds_report_unused(), 2, "spare and dgram");
    assert_eq!(lp.listen_fds_report_unused(), 0, "reported once");
    finish(lp);
}

/// `path` relative to `base`, with `..` steps (the temp dir and the test's
/// directory share only `/`).
fn pathdiff(path: &Path, base: &Path) -> PathBuf {
    let ups = base.components().count() - 1;
    let mut rel = PathBuf::new();
    for _ in 0..ups {
        rel.push("..");
    }
    rel.join(path.strip_prefix("/").unwrap())
}

/// Bad socket-activation or notification variables stop `uvcluster run`
/// before it starts anything, with a message naming the variable (exit 1).
#[test]
fn bad_systemd_variables_are_refused_with_their_name() {
    let cases = [
        (
            "LISTEN_PID=$$ LISTEN_FDS=abc",
            "LISTEN_FDS=\"abc\" is not a number of fds from 0 to 4096",
        ),
        (
            "LISTEN_PID=$$ LISTEN_FDS=2 LISTEN_FDNAMES=one",
            "LISTEN_FDNAMES has 1 name(s) for LISTEN_FDS=2 fd(s)",
        ),
        (
            "LISTEN_PID=nobody LISTEN_FDS=1",
            "LISTEN_PID=\"nobody\" is not a process id",
        ),
        (
            "NOTIFY_SOCKET=relative/notify",
            "NOTIFY_SOCKET=\"relative/notify\" is neither an absolute path nor an abstract name",
        ),
        (
            "NOTIFY_SOCKET=@x WATCHDOG_USEC=soon",
            "WATCHDOG_USEC=\"soon\" is not a whole number of microseconds above 0",
        ),
    ];
    for (vars, message) in cases {
        let out = std::process::Command::new("sh")
            .args(["-c", &format!("{vars} exec \"$@\""), "sh"])
            .arg(cli_bin())
            .args(["run", "-w", "1", "--", "/no/such/worker"])
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{vars}: {err}");
        assert!(err.contains(message), "{vars}: {err}");
        assert!(
            !err.contains("spawn"),
            "{vars}: a worker was started: {err}"
        );
    }
}

/// The unit files `docs/` ships pass `systemd-analyze verify` (the
/// `systemd` package's own checker: unknown keys, bad values, a missing
/// `ExecStart` program), with `ExecStart` pointed at this build and the
/// test's worker script.
#[test]
fn shipped_unit_files_pass_systemd_analyze_verify() {
    require_socket_activate();
    require_node();
    let docs = Path::new(env!("CARGO_MANIFEST_DIR")).join("docs");
    let dir = TempDir::new("units");
    let service = std::fs::read_to_string(docs.join("uvcluster.service")).unwrap();
    let node = String::from_utf8(
        std::process::Command::new("sh")
            .args(["-c", "command -v node"])
            .output()
            .unwrap()
            .stdout,
    )
    .unwrap();
    let exec = "ExecStart=/usr/local/bin/uvcluster run --workers 4 --policy none -- /usr/bin/node /srv/app/server.js";
    assert!(service.contains(exec), "the shipped ExecStart changed");
    let service = service.replace(
        exec,
        &format!(
            "ExecStart={} run --workers 4 --policy none -- {} {}",
            cli_bin().display(),
            node.trim(),
            node_worker()
        ),
    );
    // The shipped Type=notify-reload needs systemd 253; older ones get the
    // two lines the file names for them (cli/tests/systemd_manager.rs runs
    // both variants under a real manager).
    let version = std::process::Command::new("systemd-analyze")
        .arg("--version")
        .output()
        .unwrap();
    let version: u32 = String::from_utf8_lossy(&version.stdout)
        .split_whitespace()
        .nth(1)
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let service = if version < 253 {
        let old = service
            .replace("\nType=notify-reload\n", "\n#Type=notify-reload\n")
            .replace("\n#Type=notify\n", "\nType=notify\n")
            .replace("\n#ExecReload=", "\nExecReload=");
        assert_ne!(old, service, "the systemd 252 variant is gone");
        old
    } else {
        service
    };
    std::fs::write(dir.0.join("uvcluster.service"), service).unwrap();
    std::fs::copy(
        docs.join("uvcluster.socket"),
        dir.0.join("uvcluster.socket"),
    )
    .unwrap();
    let out = std::process::Command::new("systemd-analyze")
        .args(["verify", "./uvcluster.socket", "./uvcluster.service"])
        .current_dir(&dir.0)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert_eq!(err.trim(), "", "systemd-analyze complained");
}
