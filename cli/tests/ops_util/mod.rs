//! Helpers of the operations tests (control socket, metrics, broadcast):
//! a running `uvcluster run` whose log is read line by line with a
//! deadline, `uvcluster ctl`, raw control-socket clients, HTTP GETs, and a
//! bounded HTTP load that counts its failures.

#![allow(dead_code)] // each test file uses a part

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
        TempDir(d)
    }

    /// A path inside it.
    pub fn join(&self, p: &str) -> PathBuf {
        self.0.join(p)
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

/// A running `uvcluster run`, killed if the test ends first.
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
        c.args(args)
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        for (k, v) in envs {
            c.env(k, v);
        }
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

    /// Waits (with a deadline) for the next log line containing `what`.
    pub fn expect(&mut self, what: &str) -> String {
        let t0 = Instant::now();
        loop {
            let left = LIMIT.saturating_sub(t0.elapsed());
            match self.lines.recv_timeout(left) {
                Ok(Some(line)) => {
                    self.log.push_str(&line);
                    self.log.push('\n');
                    if line.contains(what) {
                        return line;
                    }
                }
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

    /// Waits for the exit (with a deadline); returns (code, the log).
    pub fn wait(mut self) -> (Option<i32>, String) {
        let t0 = Instant::now();
        loop {
            let left = LIMIT.saturating_sub(t0.elapsed());
            match self.lines.recv_timeout(left) {
                Ok(Some(line)) => {
                    self.log.push_str(&line);
                    self.log.push('\n');
                }
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
/// after another until told to stop or `max` requests each.
pub struct Load {
    stop: Arc<AtomicBool>,
    ok: Arc<AtomicUsize>,
    failed: Arc<Mutex>,
    threads: Vec<JoinHandle<()>>,
}

type Mutex = std::sync::Mutex<Vec<String>>;

impl Load {
    /// Starts it against 127.0.0.1:`port`.
    pub fn start(port: u16, threads: usize, max: usize) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let ok = Arc::new(AtomicUsize::new(0));
        let failed: Arc<Mutex> = Arc::default();
        let threads = (0..threads)
            .map(|_| {
                let (stop, ok, failed) = (stop.clone(), ok.clone(), failed.clone());
                std::thread::spawn(move || {
                    for _ in 0..max {
                        if stop.load(Ordering::Relaxed) {
                            break;
                        }
                        match get(port, "/") {
                            Ok((200, _)) => {
                                ok.fetch_add(1, Ordering::Relaxed);
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
            threads,
        }
    }

    /// Requests answered 200 so far.
    pub fn ok(&self) -> usize {
        self.ok.load(Ordering::Relaxed)
    }

    /// Stops it; returns (requests answered 200, failures).
    pub fn finish(self) -> (usize, Vec<String>) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads {
            t.join().unwrap();
        }
        let failed = std::mem::take(&mut *self.failed.lock().unwrap());
        (self.ok.load(Ordering::Relaxed), failed)
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
