//! Helpers of the CLI's tests (options, Node workers, watch, control
//! socket, metrics, broadcast): the `uvcluster` command with a clean
//! environment, a running `uvcluster run` whose log is read line by line
//! with a deadline, a command run to its end with a deadline, `uvcluster
//! ctl`, raw control-socket clients, HTTP GETs, scratch directories, and a
//! bounded HTTP load that counts its failures.

#![allow(dead_code)] // each test file uses a part

use std::collections::HashSet;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, mpsc};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use uvcluster::serde_json;

/// The longest any single wait in these tests may take.
pub const LIMIT: Duration = Duration::from_secs(30);

/// A free TCP port on 127.0.0.1 (bound to 0, then released).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A fresh private directory for sockets and files, removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    /// Creates it under the system's temporary directory.
    pub fn new(tag: &str) -> TempDir {
        static N: AtomicUsize = AtomicUsize::new(0);
        let d = std::env::temp_dir().join(format!(
            "uvc-{tag}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&d).unwrap();
        // As the watcher and the log name it.
        TempDir(d.canonicalize().unwrap())
    }

    /// A path inside it.
    pub fn join(&self, p: &str) -> PathBuf {
        self.0.join(p)
    }

    /// Writes `text` to the file `rel` inside it, creating its directories.
    pub fn write(&self, rel: &str, text: &str) {
        let p = self.join(rel);
        if let Some(d) = p.parent() {
            std::fs::create_dir_all(d).unwrap();
        }
        std::fs::write(p, text).unwrap();
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The `uvcluster` binary this package's `cargo test` built.
pub fn bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_uvcluster"))
}

/// `uvcluster` with `RUST_LOG=info` and without the variables it reads
/// (`WEB_CONCURRENCY`, ...), so that the machine's own do not change what
/// a test sees.
pub fn uvcluster() -> Command {
    let mut c = Command::new(bin());
    for var in [
        "WEB_CONCURRENCY",
        "NODE_CLUSTER_SCHED_POLICY",
        "UVCLUSTER_HANDOFF_WINDOW",
        "JOURNAL_STREAM",
    ] {
        c.env_remove(var);
    }
    c.env("RUST_LOG", "info");
    // A runtime directory of this test process's own, so that the default
    // control socket (`$XDG_RUNTIME_DIR/uvcluster-<pid>.sock`) never meets
    // a stale one that a killed primary of another run left under a pid
    // now reused (its takeover is a WARN, which several tests forbid).
    // Tests that name their own `XDG_RUNTIME_DIR` set it after this.
    c.env("XDG_RUNTIME_DIR", runtime_dir());
    c
}

/// This test process's own `XDG_RUNTIME_DIR` (mode 0700, created once).
pub fn runtime_dir() -> &'static Path {
    use std::os::unix::fs::DirBuilderExt;
    static DIR: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    DIR.get_or_init(|| {
        let d = std::env::temp_dir().join(format!("uvcluster-tests-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(&d)
            .expect("create the tests' runtime dir");
        d
    })
}

/// Runs `c` to its end, with a deadline (killed after [`LIMIT`]): (exit
/// code, stdout, stderr).
pub fn finish(mut c: Command) -> (Option<i32>, String, String) {
    c.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let out = wait_output(c.spawn().expect("spawn uvcluster"));
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// `uvcluster run -w 1 --backoff-initial=10ms --max-restarts=N EXTRA --
/// COMMAND` with `envs`, run to its end: a slot whose workers fail, until
/// it is `errored`. (exit code, stdout, stderr).
pub fn crash_loop(
    max_restarts: u32,
    extra: &[&str],
    command: &[&str],
    envs: &[(&str, &str)],
) -> (Option<i32>, String, String) {
    let mut c = uvcluster();
    c.args(["run", "-w", "1", "--backoff-initial=10ms"])
        .arg(format!("--max-restarts={max_restarts}"))
        .args(extra)
        .arg("--")
        .args(command);
    for (k, v) in envs {
        c.env(k, v);
    }
    finish(c)
}

/// The `slot N errored: ...` line of `log`; panics when there is none.
pub fn errored_line(log: &str) -> &str {
    log.lines()
        .find(|l| l.contains(" errored: "))
        .unwrap_or_else(|| panic!("no errored line:\n{log}"))
}

/// A running `uvcluster run`, killed if the test ends first. A thread
/// forwards each stderr line (then `None` at EOF), so the test waits on
/// the binary's own log lines, with a deadline, instead of polling.
pub struct Running {
    child: Option<Child>,
    lines: mpsc::Receiver<Option<String>>,
    /// Every log line read so far.
    pub log: String,
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Some(c) = self.child.as_mut() {
            let _ = kill(Pid::from_raw(c.id() as i32), Signal::SIGKILL);
            let _ = c.wait();
        }
    }
}

impl Running {
    /// Starts `uvcluster ARGS` (stdout discarded, stderr read).
    pub fn start(args: &[&str], envs: &[(&str, &str)]) -> Running {
        let mut c = Command::new(bin());
        c.args(args).env("RUST_LOG", "info");
        for (k, v) in envs {
            c.env(k, v);
        }
        Running::spawn(c)
    }

    /// Starts `c` (stdin and stdout null, stderr read).
    pub fn spawn(mut c: Command) -> Running {
        c.stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let mut child = c.spawn().expect("spawn uvcluster");
        let err = child.stderr.take().unwrap();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(err).lines().map_while(Result::ok) {
                let _ = tx.send(Some(line));
            }
            let _ = tx.send(None);
        });
        Running {
            child: Some(child),
            lines: rx,
            log: String::new(),
        }
    }

    /// The next log line (kept in [`log`](Self::log)), waited for until
    /// [`LIMIT`] after `t0`: `Ok(None)` at the end of the log, `Err` at
    /// the deadline.
    fn next_line(&mut self, t0: Instant) -> Result<Option<String>, mpsc::RecvTimeoutError> {
        let line = self
            .lines
            .recv_timeout(LIMIT.saturating_sub(t0.elapsed()))?;
        if let Some(line) = &line {
            self.log.push_str(line);
            self.log.push('\n');
        }
        Ok(line)
    }

    /// Waits (with a deadline) for the next log line containing `what`.
    pub fn expect(&mut self, what: &str) -> String {
        let t0 = Instant::now();
        loop {
            match self.next_line(t0) {
                Ok(Some(line)) if line.contains(what) => return line,
                Ok(Some(_)) => {}
                Ok(None) => panic!("uvcluster ended before logging {what:?}:\n{}", self.log),
                Err(_) => panic!("no {what:?} from uvcluster within {LIMIT:?}:\n{}", self.log),
            }
        }
    }

    /// The first log line containing `what`, read already or waited for.
    pub fn line(&mut self, what: &str) -> String {
        match self.log.lines().find(|l| l.contains(what)) {
            Some(l) => l.to_owned(),
            None => self.expect(what),
        }
    }

    /// Sends `s` to the primary.
    pub fn signal(&self, s: Signal) {
        let c = self.child.as_ref().unwrap();
        kill(Pid::from_raw(c.id() as i32), s).unwrap();
    }

    /// The primary's pid.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().unwrap().id()
    }

    /// Whether it has not exited yet.
    pub fn running(&mut self) -> bool {
        self.child.as_mut().unwrap().try_wait().unwrap().is_none()
    }

    /// The lines logged since `from` (a byte offset into the log).
    pub fn since(&self, from: usize) -> &str {
        &self.log[from..]
    }

    /// SIGTERM, then the exit (with a deadline); asserts a clean stop
    /// (exit 0) and returns the log.
    pub fn stop(self) -> String {
        self.signal(Signal::SIGTERM);
        let (code, log) = self.wait();
        assert_eq!(code, Some(0), "{log}");
        log
    }

    /// Waits for the exit (with a deadline); returns (code, the log).
    pub fn wait(mut self) -> (Option<i32>, String) {
        let t0 = Instant::now();
        loop {
            match self.next_line(t0) {
                Ok(Some(_)) => {}
                Ok(None) => break,
                Err(_) => panic!("uvcluster did not exit:\n{}", self.log),
            }
        }
        let status = self.child.take().unwrap().wait().unwrap();
        (status.code(), std::mem::take(&mut self.log))
    }
}

/// `uvcluster ctl --control SOCK ARGS`, to its end.
pub fn ctl(sock: &Path, args: &[&str]) -> Output {
    let mut c = Command::new(bin());
    c.arg("ctl").arg("--control").arg(sock).args(args);
    let child = c
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    wait_output(child)
}

/// Waits for `child` with a deadline (killed after [`LIMIT`]).
pub fn wait_output(child: Child) -> Output {
    let pid = child.id() as i32;
    let done = Arc::new(AtomicBool::new(false));
    let d = done.clone();
    let guard = std::thread::spawn(move || {
        let t0 = Instant::now();
        while !d.load(Ordering::Relaxed) {
            if t0.elapsed() > LIMIT {
                let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
                return;
            }
            std::thread::park_timeout(Duration::from_millis(50));
        }
    });
    let out = child.wait_with_output().unwrap();
    done.store(true, Ordering::Relaxed);
    guard.thread().unpark();
    let _ = guard.join();
    out
}

/// `ctl --json status`'s reply, parsed.
pub fn status(sock: &Path) -> serde_json::Value {
    let out = ctl(sock, &["--json", "status"]);
    assert!(out.status.success(), "{out:?}");
    serde_json::from_slice(&out.stdout).unwrap()
}

/// How many workers `status` shows ready.
pub fn ready_count(sock: &Path) -> usize {
    let v = status(sock);
    v["workers"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|w| w["state"] == "ready")
        .count()
}

/// Polls `cond` every 50 ms until it holds, or panics after [`LIMIT`]
/// saying `what`.
pub fn eventually(what: &str, mut cond: impl FnMut() -> bool) {
    eventually_seen(what, || (cond(), String::new()));
}

/// [`eventually`] for a `cond` that also says what it saw: the last of
/// which is in the panic message.
pub fn eventually_seen(what: &str, mut cond: impl FnMut() -> (bool, String)) {
    let t0 = Instant::now();
    loop {
        let (ok, seen) = cond();
        if ok {
            return;
        }
        assert!(
            t0.elapsed() < LIMIT,
            "not within {LIMIT:?}: {what}; last seen:\n{seen}"
        );
        std::thread::park_timeout(Duration::from_millis(50));
    }
}

/// A raw client of the control socket.
pub struct Client {
    /// The connection.
    pub s: std::os::unix::net::UnixStream,
    r: BufReader<std::os::unix::net::UnixStream>,
}

impl Client {
    /// Connects to `sock`.
    pub fn connect(sock: &Path) -> Client {
        let s = std::os::unix::net::UnixStream::connect(sock).unwrap();
        s.set_read_timeout(Some(LIMIT)).unwrap();
        let r = BufReader::new(s.try_clone().unwrap());
        Client { s, r }
    }

    /// Writes `bytes` as they are.
    pub fn send(&mut self, bytes: &[u8]) {
        self.s.write_all(bytes).unwrap();
    }

    /// Reads one reply line, parsed; `None` at EOF.
    pub fn reply(&mut self) -> Option<serde_json::Value> {
        let mut line = String::new();
        match self.r.read_line(&mut line) {
            Ok(0) => None,
            Ok(_) => Some(serde_json::from_str(&line).unwrap_or_else(|e| panic!("{e}: {line}"))),
            Err(e) => panic!("no reply within {LIMIT:?}: {e}"),
        }
    }

    /// True once the server has closed the connection (reads EOF, or a
    /// reset).
    pub fn closed(&mut self) -> bool {
        let mut rest = Vec::new();
        match self.r.read_to_end(&mut rest) {
            Ok(_) => true,
            Err(e) => e.kind() == std::io::ErrorKind::ConnectionReset,
        }
    }
}

/// `GET path` on 127.0.0.1:`port`: (status code, body).
pub fn get(port: u16, path: &str) -> std::io::Result<(u16, String)> {
    request(
        port,
        &format!("GET {path} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n"),
    )
}

/// `GET /` on 127.0.0.1:`port`: the body of a 200, or why there was none.
pub fn get_ok(port: u16) -> Result<String, String> {
    match get(port, "/") {
        Ok((200, body)) => Ok(body),
        Ok((code, body)) => Err(format!("status {code}: {body:?}")),
        Err(e) => Err(e.to_string()),
    }
}

/// Pids from the log's `worker N (pid P) ready` lines in `log`.
pub fn ready_pids(log: &str) -> HashSet<i32> {
    log.lines()
        .filter(|l| l.contains(") ready (after "))
        .filter_map(|l| {
            let at = l.find("(pid ")? + "(pid ".len();
            l[at..].split(')').next()?.parse().ok()
        })
        .collect()
}

/// Counts the workers a run forked, from its log.
pub fn forks(log: &str) -> usize {
    log.lines().filter(|l| l.ends_with(" forked")).count()
}

/// Sends `raw` to 127.0.0.1:`port`, reads to EOF: (status code, body).
pub fn request(port: u16, raw: &str) -> std::io::Result<(u16, String)> {
    let mut s = TcpStream::connect(SocketAddr::from(([127, 0, 0, 1], port)))?;
    s.set_read_timeout(Some(LIMIT))?;
    s.write_all(raw.as_bytes())?;
    let mut resp = String::new();
    s.read_to_string(&mut resp)?;
    let code = resp
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("not an HTTP response: {resp:?}")))?;
    let body = resp
        .split_once("\r\n\r\n")
        .map_or(String::new(), |(_, b)| b.to_owned());
    Ok((code, body))
}

/// A bounded HTTP load: `threads` clients, each making GET requests one
/// after another (one per connection) until told to stop, `max` requests
/// each, or [`LOAD_LIMIT`], whichever comes first.
pub struct Load {
    stop: Arc<AtomicBool>,
    ok: Arc<AtomicUsize>,
    failed: Arc<Mutex>,
    bodies: Arc<std::sync::Mutex<HashSet<String>>>,
    threads: Vec<JoinHandle<()>>,
}

/// The longest a [`Load`] runs.
pub const LOAD_LIMIT: Duration = Duration::from_secs(60);

type Mutex = std::sync::Mutex<Vec<String>>;

impl Load {
    /// Starts it against 127.0.0.1:`port`.
    pub fn start(port: u16, threads: usize, max: usize) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let ok = Arc::new(AtomicUsize::new(0));
        let failed: Arc<Mutex> = Arc::default();
        let bodies: Arc<std::sync::Mutex<HashSet<String>>> = Arc::default();
        let threads = (0..threads)
            .map(|_| {
                let (stop, ok, failed) = (stop.clone(), ok.clone(), failed.clone());
                let bodies = bodies.clone();
                std::thread::spawn(move || {
                    let t0 = Instant::now();
                    for _ in 0..max {
                        if stop.load(Ordering::Relaxed) || t0.elapsed() > LOAD_LIMIT {
                            break;
                        }
                        match get(port, "/") {
                            Ok((200, body)) => {
                                ok.fetch_add(1, Ordering::Relaxed);
                                bodies.lock().unwrap().insert(body);
                            }
                            Ok((code, body)) => failed
                                .lock()
                                .unwrap()
                                .push(format!("status {code}: {body}")),
                            Err(e) => failed.lock().unwrap().push(e.to_string()),
                        }
                    }
                })
            })
            .collect();
        Load {
            stop,
            ok,
            failed,
            bodies,
            threads,
        }
    }

    /// Requests answered 200 so far.
    pub fn ok(&self) -> usize {
        self.ok.load(Ordering::Relaxed)
    }

    /// Stops it; returns (requests answered 200, failures).
    pub fn finish(self) -> (usize, Vec<String>) {
        let (ok, failed, _) = self.finish_with_bodies();
        (ok, failed)
    }

    /// Stops it; returns (requests answered 200, failures, the distinct
    /// bodies of the 200s).
    pub fn finish_with_bodies(self) -> (usize, Vec<String>, HashSet<String>) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads {
            t.join().unwrap();
        }
        let failed = std::mem::take(&mut *self.failed.lock().unwrap());
        let bodies = std::mem::take(&mut *self.bodies.lock().unwrap());
        (self.ok.load(Ordering::Relaxed), failed, bodies)
    }
}

/// The library's `cluster_hello` example (a worker answering `hello
/// world`), built by `cargo test` at the workspace root.
pub fn hello() -> PathBuf {
    crate::util::example("cluster_hello")
}

/// Starts `uvcluster run -w N --control SOCK [extra] -- cluster_hello` on
/// `port` and waits until N workers listen.
pub fn start_hello(n: usize, port: u16, sock: &Path, extra: &[&str]) -> Running {
    let exe = hello();
    let n_s = n.to_string();
    let sock_s = sock.to_str().unwrap().to_owned();
    let port_s = port.to_string();
    let mut args = vec!["run", "-w", &n_s, "--control", &sock_s];
    args.extend_from_slice(extra);
    args.push("--");
    let exe_s = exe.to_str().unwrap().to_owned();
    args.push(&exe_s);
    let mut r = Running::start(&args, &[("PORT", &port_s)]);
    for _ in 0..n {
        r.expect(" ready");
    }
    r
}
