//! Shared by the `tests/cluster_node_*.rs` ports of Node's
//! `test/parallel/test-cluster-*.js`: a Rust primary running the Node worker
//! `tests/node/ports_worker.js` (one `SCENARIO` each), or this test binary
//! re-run as a Rust worker helper, and a real Node primary
//! (`tests/node/ports_primary.js`) running Rust worker helpers.
#![allow(dead_code)]

use std::cell::RefCell;
use std::ffi::OsString;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::process::Command;
use std::rc::Rc;
use std::time::Duration;

use serde_json::Value;
use uvcluster::cluster::{self, Primary, SchedulingPolicy, Settings, Worker};
use uvcluster::uv::{Loop, RunMode};

use super::util::{self, Log};

pub type Shared<T> = Rc<RefCell<T>>;
pub fn shared<T>(t: T) -> Shared<T> {
    Rc::new(RefCell::new(t))
}

pub const RR: SchedulingPolicy = SchedulingPolicy::RoundRobin;
pub const NONE: SchedulingPolicy = SchedulingPolicy::None;

pub fn node_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/node")
}

pub fn env(pairs: &[(&str, &str)]) -> Vec<(OsString, OsString)> {
    pairs
        .iter()
        .map(|(k, v)| (OsString::from(k), OsString::from(v)))
        .collect()
}

/// Settings that run `tests/node/ports_worker.js` with `SCENARIO`.
pub fn node_worker(scenario: &str, policy: SchedulingPolicy) -> Settings {
    util::require_node();
    Settings {
        exec_path: Some("node".into()),
        exec: Some(node_dir().join("ports_worker.js").into_os_string()),
        exec_argv: Some(vec![]),
        args: Some(vec![]),
        env: Some(env(&[("SCENARIO", scenario)])),
        scheduling_policy: Some(policy),
        ..Settings::default()
    }
}

/// Settings that run this test binary as the Rust worker helper `name`.
pub fn rust_worker(name: &str, policy: SchedulingPolicy) -> Settings {
    Settings {
        exec_path: Some(std::env::current_exe().unwrap().into_os_string()),
        exec: None,
        exec_argv: Some(vec![]),
        args: Some(
            [name, "--exact", "--nocapture", "--test-threads=1"]
                .iter()
                .map(OsString::from)
                .collect(),
        ),
        env: Some(env(&[("UVCLUSTER_TEST_HELPER", name)])),
        silent: Some(true),
        scheduling_policy: Some(policy),
        ..Settings::default()
    }
}

/// A primary with `settings`, logging `fork:id`, `online:id`,
/// `listening:id`, `disconnect:id`, `exit:id` and failing on errors.
pub fn primary(lp: &mut Loop, settings: Settings) -> (Primary, Log) {
    let p = Primary::new(lp);
    p.setup_primary(lp, settings);
    let log = Log::new();
    let l = log.clone();
    p.on_fork(lp, move |_, w| l.push(format!("fork:{}", w.id())));
    let l = log.clone();
    p.on_online(lp, move |_, w| l.push(format!("online:{}", w.id())));
    let l = log.clone();
    p.on_listening(lp, move |_, w, _| l.push(format!("listening:{}", w.id())));
    let l = log.clone();
    p.on_disconnect(lp, move |_, w| l.push(format!("disconnect:{}", w.id())));
    let l = log.clone();
    p.on_exit(lp, move |_, w, _, _| l.push(format!("exit:{}", w.id())));
    p.on_error(lp, |_, w, e| {
        panic!("cluster error from {:?}: {e}", w.map(Worker::id))
    });
    (p, log)
}

/// The events of worker `id`, without the id.
pub fn events_of(log: &Log, id: u32) -> Vec<String> {
    let suffix = format!(":{id}");
    log.joined()
        .split(' ')
        .filter_map(|e| e.strip_suffix(&suffix).map(str::to_owned))
        .collect()
}

/// [`events_of`], with a trailing `exit` `disconnect` pair put in the
/// order `disconnect` `exit`: a worker's channel EOF and its SIGCHLD race,
/// in Node as here.
pub fn events(log: &Log, id: u32) -> Vec<String> {
    let mut ev = events_of(log, id);
    let n = ev.len();
    if n >= 2 && ev[n - 2] == "exit" && ev[n - 1] == "disconnect" {
        ev.swap(n - 2, n - 1);
    }
    ev
}

/// Runs the loop to the end, failing after `ms`.
pub fn run(lp: &mut Loop, ms: u64) {
    util::run_with_deadline(lp, ms);
}

/// Blocking TCP fetch (connect, read to EOF) for use from a loop callback
/// where the server is another process.
pub fn fetch_blocking(addr: SocketAddr) -> String {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    out
}

/// Connects and reads the first bytes (the worker's pid), leaving the
/// connection open.
pub fn connect_hold(addr: SocketAddr) -> (TcpStream, String) {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut buf = [0u8; 32];
    let n = s.read(&mut buf).unwrap();
    let _ = s.write(b"");
    (s, String::from_utf8_lossy(&buf[..n]).into_owned())
}

pub fn localhost(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

/// Runs `body` as a Rust worker when this process is the helper `name`;
/// the loop then runs to its end.
pub fn as_worker(name: &str, body: impl FnOnce(&mut Loop, cluster::Worker)) {
    if !util::is_helper(name) {
        return;
    }
    let mut lp = Loop::new().unwrap();
    let w = cluster::setup_worker(&mut lp)
        .unwrap()
        .expect("started as a worker");
    body(&mut lp, w);
    lp.run(RunMode::Default).unwrap();
}

/// Runs `node tests/node/ports_primary.js <this binary> <scenario>` (a real
/// Node primary forking the helper `helper_<scenario>` of this binary) and
/// returns the JSON on its last stdout line. The script asserts; a failed
/// assertion fails the test with its output.
pub fn node_primary(scenario: &str, extra: &[&str]) -> Value {
    util::require_node();
    let out = Command::new("node")
        .arg(node_dir().join("ports_primary.js"))
        .arg(std::env::current_exe().unwrap())
        .arg(scenario)
        .args(extra)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "node primary ({scenario}) failed: {}\n{stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_str(stdout.lines().last().unwrap_or("null")).unwrap()
}

/// Where a loop client connects.
#[derive(Clone, Debug)]
pub enum Target {
    Tcp(SocketAddr),
    Unix(PathBuf),
}

fn read_to_end<K: uvcluster::uv::StreamType>(
    lp: &mut Loop,
    h: uvcluster::uv::Handle<K>,
    cb: impl FnOnce(&mut Loop, std::io::Result<Vec<u8>>) + 'static,
) {
    let mut buf = Vec::new();
    let mut cb = Some(cb);
    lp.read_start(h, move |lp, h, r| {
        let done = match r {
            Ok([]) => Ok(std::mem::take(&mut buf)),
            Ok(d) => {
                buf.extend_from_slice(d);
                return;
            }
            Err(e) => Err(e),
        };
        lp.close(h, |_| {}).unwrap();
        if let Some(cb) = cb.take() {
            cb(lp, done);
        }
    })
    .unwrap();
}

pub const HTTP_GET: &[u8] = b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n";

/// One client connection on the loop: connect, send `req`, read to EOF.
pub fn fetch(
    lp: &mut Loop,
    t: &Target,
    req: &'static [u8],
    cb: impl FnOnce(&mut Loop, std::io::Result<Vec<u8>>) + 'static,
) {
    match t {
        Target::Tcp(addr) => {
            let h = lp.tcp_init();
            lp.tcp_connect(h, *addr, move |lp, h, r| match r {
                Ok(()) => {
                    if !req.is_empty() {
                        lp.write(h, &[req], |_, _, _| {}).unwrap();
                    }
                    read_to_end(lp, h, cb);
                }
                Err(e) => {
                    lp.close(h, |_| {}).unwrap();
                    cb(lp, Err(e));
                }
            })
            .unwrap();
        }
        Target::Unix(path) => {
            let h = lp.pipe_init(false);
            lp.pipe_connect(h, path, move |lp, h, r| match r {
                Ok(()) => {
                    if !req.is_empty() {
                        lp.write(h, &[req], |_, _, _| {}).unwrap();
                    }
                    read_to_end(lp, h, cb);
                }
                Err(e) => {
                    lp.close(h, |_| {}).unwrap();
                    cb(lp, Err(e));
                }
            })
            .unwrap();
        }
    }
}

/// The body of an HTTP response (or the whole of a raw one).
pub fn body(resp: &[u8]) -> String {
    let s = String::from_utf8_lossy(resp);
    match s.find("\r\n\r\n") {
        Some(i) => s[i + 4..].to_string(),
        None => s.into_owned(),
    }
}

/// A fresh temporary directory for this test.
pub fn tmpdir(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("uvc-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}
