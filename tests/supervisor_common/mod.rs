//! What the supervisor tests share: a supervisor on Rust or Node
//! workers, an event log, and a bounded load from client threads.
#![allow(dead_code)]

use std::cell::Cell;
use std::collections::HashMap;
use std::ffi::OsString;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use uvcluster::cluster::{Primary, SchedulingPolicy, Settings};
use uvcluster::supervisor::{Supervisor, SupervisorConfig};
use uvcluster::uv::Loop;

use crate::util;

/// The event lines, in order.
pub type Log = Rc<std::cell::RefCell<Vec<String>>>;

/// A supervisor under test: its event lines, the port its workers
/// listen on, and its exit code.
pub struct Sup {
    pub sup: Supervisor,
    pub log: Log,
    pub port: Rc<Cell<u16>>,
    pub exit: Rc<Cell<Option<i32>>>,
}

impl Sup {
    pub fn count(&self, needle: &str) -> usize {
        self.log
            .borrow()
            .iter()
            .filter(|l| l.contains(needle))
            .count()
    }
    pub fn lines(&self) -> String {
        self.log.borrow().join("\n")
    }
    pub fn ready_workers(&self, lp: &Loop) -> usize {
        (self.sup.status(lp).iter())
            .filter(|s| s.state == uvcluster::supervisor::WorkerState::Ready)
            .count()
    }
    pub fn pids(&self, lp: &Loop) -> Vec<i32> {
        let mut v: Vec<i32> = (self.sup.status(lp).iter())
            .filter(|s| s.state == uvcluster::supervisor::WorkerState::Ready)
            .filter_map(|s| s.pid)
            .collect();
        v.sort();
        v
    }
}

/// How long a helper below drives the loop before it fails the test: a
/// bound, not a timing (a worker starts in milliseconds; a loaded
/// machine may take seconds).
pub const LIMIT_MS: u64 = 30_000;

/// Starts the pool and drives the loop until `n` workers are ready and
/// the port is known.
pub fn start_ready(lp: &mut Loop, s: &Sup, n: usize) {
    s.sup.start(lp);
    util::run_until(lp, LIMIT_MS, |lp| {
        s.ready_workers(lp) == n && s.port.get() != 0
    });
}

/// Drives the loop until the supervisor has exited; its code.
pub fn wait_exit(lp: &mut Loop, s: &Sup) -> i32 {
    let exit = s.exit.clone();
    util::run_until(lp, LIMIT_MS, move |_| exit.get().is_some());
    s.exit.get().unwrap()
}

/// A graceful stop, driven to the supervisor's exit; its code.
pub fn stop_and_wait(lp: &mut Loop, s: &Sup) -> i32 {
    s.sup.stop(lp, true);
    wait_exit(lp, s)
}

/// SIGKILLs the ready worker `victim` and drives the loop until `n`
/// workers are ready again, none of them `victim`.
pub fn kill_and_wait_replaced(lp: &mut Loop, s: &Sup, victim: i32, n: usize) {
    kill(victim, nix::sys::signal::Signal::SIGKILL);
    util::run_until(lp, LIMIT_MS, |lp| {
        s.ready_workers(lp) == n && !s.pids(lp).contains(&victim)
    });
}

/// Settings for Rust workers: this test binary re-run as `helper` with
/// `SUP_MODE=mode`.
pub fn rust_settings(helper: &str, mode: &str, policy: SchedulingPolicy) -> Settings {
    let mut s = util::helper_settings(helper);
    s.env
        .get_or_insert_with(Vec::new)
        .push(("SUP_MODE".into(), mode.into()));
    s.scheduling_policy = Some(policy);
    // The helper's libtest lines would clutter the test's output.
    s.silent = Some(true);
    s
}

/// The env of [`rust_settings`] with another mode (a "new version").
pub fn rust_env(helper: &str, mode: &str) -> Settings {
    let s = rust_settings(helper, mode, SchedulingPolicy::RoundRobin);
    Settings {
        env: s.env,
        ..Settings::default()
    }
}

pub fn node_script(name: &str) -> OsString {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/node")
        .join(name)
        .into_os_string()
}

/// Settings for Node workers running `tests/node/supervised_app.js`.
pub fn node_settings(mode: &str, policy: SchedulingPolicy) -> Settings {
    Settings {
        exec_path: Some("node".into()),
        exec: Some(node_script("supervised_app.js")),
        args: Some(vec![]),
        env: Some(vec![("SUP_MODE".into(), mode.into())]),
        scheduling_policy: Some(policy),
        ..Settings::default()
    }
}

pub fn node_env(mode: &str) -> Settings {
    Settings {
        env: Some(vec![("SUP_MODE".into(), mode.into())]),
        ..Settings::default()
    }
}

/// A supervisor (not started) on a primary with `settings`, logging its
/// events and the port.
pub fn supervisor(lp: &mut Loop, settings: Settings, cfg: SupervisorConfig) -> Sup {
    let p = Primary::new(lp);
    p.setup_primary(lp, settings);
    let sup = Supervisor::with_primary(lp, p, cfg).unwrap();
    let log = Log::default();
    let l = log.clone();
    sup.on_event(lp, move |_, e| {
        eprintln!("supervisor: {e}");
        l.borrow_mut().push(e.to_string());
    });
    let port = Rc::new(Cell::new(0));
    let pt = port.clone();
    sup.on_listening(lp, move |_, _, a| {
        if let Some(p) = a.port.filter(|&p| p > 0) {
            pt.set(p as u16);
        }
    });
    let exit = Rc::new(Cell::new(None));
    let ex = exit.clone();
    sup.on_exit(lp, move |_, code| ex.set(Some(code)));
    Sup {
        sup,
        log,
        port,
        exit,
    }
}

/// A config for tests: `workers`, short timeouts, no sampler.
pub fn config(workers: usize) -> SupervisorConfig {
    SupervisorConfig {
        workers,
        kill_timeout: Duration::from_secs(5),
        ready_timeout: Duration::from_secs(10),
        worker_timeout: None,
        exit_grace: Duration::from_millis(100),
        ..SupervisorConfig::default()
    }
}

/// One HTTP request on a new connection; the response body, or what
/// went wrong.
pub fn get(port: u16) -> Result<String, String> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).map_err(|e| format!("connect: {e}"))?;
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.set_write_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .map_err(|e| format!("write: {e}"))?;
    let mut out = Vec::new();
    s.read_to_end(&mut out).map_err(|e| format!("read: {e}"))?;
    let text = String::from_utf8_lossy(&out).into_owned();
    if !text.starts_with("HTTP/1.1 200") {
        return Err(format!("bad response: {text:?}"));
    }
    // A `--wait-ready` worker answers `not-ready` until it sent 'ready':
    // the supervisor should not have handed it the connection.
    if text.contains("not-ready") {
        return Err(format!("answered before it was ready: {text:?}"));
    }
    Ok(text)
}

/// A closed-loop load: `threads` clients, each making one request per
/// connection until told to stop (at most `max` requests each).
pub struct Load {
    stop: Arc<AtomicBool>,
    pub ok: Arc<AtomicUsize>,
    /// Answers by who answered: the word after `hello from ` (a Node
    /// worker's pid).
    pub by_server: Arc<Mutex<HashMap<String, usize>>>,
    pub finished: Arc<AtomicUsize>,
    pub errors: Arc<Mutex<Vec<String>>>,
    threads: usize,
    handles: Vec<std::thread::JoinHandle<()>>,
}

impl Load {
    pub fn start(port: u16, threads: usize, max: usize) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let ok = Arc::new(AtomicUsize::new(0));
        let finished = Arc::new(AtomicUsize::new(0));
        let errors = Arc::new(Mutex::new(Vec::new()));
        let by_server = Arc::new(Mutex::new(HashMap::new()));
        let handles = (0..threads)
            .map(|_| {
                let (stop, ok, finished, errors) =
                    (stop.clone(), ok.clone(), finished.clone(), errors.clone());
                let by_server = by_server.clone();
                std::thread::spawn(move || {
                    for _ in 0..max {
                        if stop.load(Ordering::SeqCst) {
                            break;
                        }
                        match get(port) {
                            Ok(text) => {
                                ok.fetch_add(1, Ordering::SeqCst);
                                let who = (text.split("hello from ").nth(1))
                                    .and_then(|t| t.split_whitespace().next())
                                    .unwrap_or("")
                                    .to_owned();
                                *by_server.lock().unwrap().entry(who).or_default() += 1;
                            }
                            Err(e) => errors.lock().unwrap().push(e),
                        }
                    }
                    finished.fetch_add(1, Ordering::SeqCst);
                })
            })
            .collect();
        Load {
            stop,
            ok,
            by_server,
            finished,
            errors,
            threads,
            handles,
        }
    }

    pub fn ok(&self) -> usize {
        self.ok.load(Ordering::SeqCst)
    }

    /// Tells the clients to stop, waits for them (no loop of ours is
    /// involved: the server is another process), returns the errors.
    pub fn finish_blocking(mut self) -> Vec<String> {
        self.stop.store(true, Ordering::SeqCst);
        for h in self.handles.drain(..) {
            h.join().unwrap();
        }
        std::mem::take(&mut self.errors.lock().unwrap())
    }

    /// Tells the clients to stop, runs the loop (the primary dispatches
    /// their connections) until they have, and returns the errors.
    pub fn finish(mut self, lp: &mut Loop, limit_ms: u64) -> Vec<String> {
        self.stop.store(true, Ordering::SeqCst);
        let (finished, n) = (self.finished.clone(), self.threads);
        run_until_threads(lp, limit_ms, move || finished.load(Ordering::SeqCst) == n);
        for h in self.handles.drain(..) {
            h.join().unwrap();
        }
        std::mem::take(&mut self.errors.lock().unwrap())
    }
}

/// [`util::run_until`] for a condition that client threads make true:
/// they cannot wake the loop, so a 5 ms ticker does (the loop may
/// otherwise have nothing to wake it under the shared-socket policies,
/// where the kernel, not the primary, hands out the connections).
pub fn run_until_threads(lp: &mut Loop, limit_ms: u64, cond: impl Fn() -> bool) {
    let t = lp.timer_init();
    let tick = Duration::from_millis(5);
    lp.timer_start(t, tick, tick, |_, _| {}).unwrap();
    util::run_until(lp, limit_ms, |_| cond());
    lp.close_if_open(t);
}

/// Reloads `k` times in a row (each after the previous one finished),
/// counting the successes in the returned cell.
pub fn reload_times(lp: &mut Loop, sup: &Supervisor, k: usize, ok: Rc<Cell<usize>>) {
    if k == 0 {
        return;
    }
    let s = *sup;
    sup.reload(lp, move |lp, r| {
        match r {
            Ok(_) => ok.set(ok.get() + 1),
            Err(e) => panic!("reload failed: {e}"),
        }
        reload_times(lp, &s, k - 1, ok);
    });
}

pub fn kill(pid: i32, sig: nix::sys::signal::Signal) {
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), sig).unwrap();
}
