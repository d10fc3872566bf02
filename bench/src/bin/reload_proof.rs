//! Reloads and restarts under load: issue 13's proof, with PM2 and Node's
//! own restart pattern side by side in the same run.
//!
//! ```text
//! cargo run --release -p uvcluster-bench --bin reload_proof -- [OPTIONS]
//! ```
//!
//! A closed-loop load of fixed concurrency (the lab's
//! [`loadgen`], with a timeout per request and
//! its failures counted by kind) runs against a cluster while a driver
//!
//! * `reload`: performs K rolling reloads, one at least every
//!   `--interval-ms` (SIGHUP to the primary; `pm2 reload` for PM2), each
//!   waited for until every worker that served before it has been
//!   replaced (a reload not done within `--reload-timeout-ms` counts as
//!   not done);
//! * `kill`: SIGKILLs a random worker every `--kill-every-ms`, K times (a
//!   kill when no worker runs is skipped and counted);
//! * `latency`: restart latency, from a worker's SIGKILL to the first
//!   response from its replacement under a light load (4 connections):
//!   median and max over N kills, each in a cluster just started (the
//!   first restart of a slot, what a rare crash meets). The Node app
//!   answers its pid (`x-worker-pid`), so the load sees the replacement's
//!   first answer; `cluster_hello` does not name its pid, so for Rust
//!   workers the replacement is found as the reload scenario finds workers
//!   (a new child of the primary), and a probe of our own (a keep-alive
//!   `GET /` every millisecond or so, besides the load) times its first
//!   answer: the answer whose server-side socket (its inode, asked of the
//!   kernel's `sock_diag`) is among the replacement's open files
//!   (`/proc/<pid>/fd`);
//! * `latency-repeat`: the same, N kills in one cluster `--latency-gap-ms`
//!   apart (repeated crashes: a supervisor's backoff shows here);
//! * `failclosed`: creates the marker file that makes the app fail on
//!   start (for Rust workers: replaces their binary by a script that exits
//!   1, as a broken deploy would), asks for a reload and watches for
//!   `--failclosed-ms` under load: the old workers should keep serving with
//!   no failed request (the row counts that window only); then mends the
//!   app and asks for a reload again, which should now complete.
//!
//! Targets: `rust` (the `cluster_hello` example, the README's main job;
//! Rust workers), `node` (`uvcluster run -- node bench/node/http_app.js`,
//! a Node `http` app as cluster workers), `pm2` (`pm2 start http_app.js -i
//! 2`, PM2 installed by this program with npm into
//! `bench/node/.pm2-install`; skipped, loudly, when npm cannot install it)
//! `refork` (Node's documented primary, `cluster.on('exit', () =>
//! cluster.fork())`, `bench/node/refork_primary.js`; no reload, so kill
//! and latency rows only) and `rust-run` (`uvcluster run --
//! cluster_hello`: Rust workers under the CLI's supervisor; latency rows
//! only). `rust` and `node` run under each policy
//! (`NODE_CLUSTER_SCHED_POLICY`: rr, none, reuseport, leastconn), every
//! target with one request per connection (`close`) and keep-alive.
//!
//! Every run is bounded: a request times out (`--timeout-ms`), a wait for
//! a reload or a restart times out, and a hard deadline (`--deadline-s`)
//! kills everything and exits 3. Every server is started in a process
//! group of its own, and every group (and PM2's daemon) is killed when its
//! row ends, on a panic, on SIGINT/SIGTERM and at the deadline.
//!
//! Options, with their defaults:
//!
//! | option | default |
//! | --- | --- |
//! | `--reloads K`, `--interval-ms MS` | 20, 500 |
//! | `--kills K`, `--kill-every-ms MS` | 20, 500 |
//! | `--latency-kills N`, `--latency-gap-ms MS` | 10, 1000 |
//! | `--connections C`, `--workers W` | 16, 2 |
//! | `--timeout-ms MS` (per request) | 2000 |
//! | `--reload-timeout-ms MS`, `--failclosed-ms MS` | 10000, 3000 |
//! | `--targets` | `rust,rust-run,node,pm2,refork` |
//! | `--policies` | `rr,none,reuseport,leastconn` |
//! | `--modes` | `close,keepalive` |
//! | `--scenarios` | `reload,kill,latency,latency-repeat,failclosed` |
//! | `--uvcluster-args "ARGS"` (more options for `uvcluster run`, such as `--max-restarts 1000`) | none |
//! | `--deadline-s S` (the hard deadline of the whole run) | 1200 |
//!
//! Environment: `CLUSTER_HELLO` and `UVCLUSTER_BIN` name prebuilt
//! binaries (otherwise cargo builds them); `NODE` another `node`; `PM2` a
//! `pm2` to use instead of installing one.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill, killpg};
use nix::unistd::Pid;
use uvcluster_bench::loadgen::{
    self, Failures, LoadConfig, LoadReport, RunOptions, SeenPids, Workload,
};

/// The PM2 this program installs (`npm install --prefix`).
const PM2_PACKAGE: &str = "pm2@7";
/// The app's pid header.
const PID_HEADER: &str = "x-worker-pid";
/// How long a server has to start serving with all its workers.
const START_TIMEOUT: Duration = Duration::from_secs(30);
/// How long the load goes on after the driver's last action.
const TAIL: Duration = Duration::from_millis(500);
/// How long the load runs before the driver's first action.
const WARMUP: Duration = Duration::from_millis(300);

// ---------------------------------------------------------------------
// Cleanup: everything this program started dies with it.

/// What must be killed when a row ends or the program stops.
#[derive(Clone, Debug)]
enum Owned {
    /// A process group this program created (`process_group(0)`).
    Group(i32),
    /// A PM2 daemon: `pm2 kill` with this `PM2_HOME`, then its group.
    Pm2 { pm2: PathBuf, home: PathBuf },
}

/// Every [`Owned`] still alive, by key.
static OWNED: Mutex<BTreeMap<u64, Owned>> = Mutex::new(BTreeMap::new());
static NEXT_KEY: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

fn own(o: Owned) -> u64 {
    let key = NEXT_KEY.fetch_add(1, Ordering::Relaxed);
    OWNED
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .insert(key, o);
    key
}

fn release(key: u64) {
    let o = OWNED.lock().unwrap_or_else(|e| e.into_inner()).remove(&key);
    if let Some(o) = o {
        destroy(&o);
    }
}

fn destroy(o: &Owned) {
    match o {
        Owned::Group(pgid) => {
            let _ = killpg(Pid::from_raw(*pgid), Signal::SIGKILL);
        }
        Owned::Pm2 { pm2, home } => {
            let daemon = pm2_daemon_pid(home);
            // `pm2 kill` stops the daemon and its workers; bounded, and
            // followed by SIGKILL to the daemon's group (it runs in a
            // session of its own) whatever it did.
            let _ = run_bounded(
                Command::new(pm2).arg("kill").env("PM2_HOME", home),
                Duration::from_secs(10),
            );
            if let Some(d) = daemon {
                let _ = killpg(Pid::from_raw(d as i32), Signal::SIGKILL);
                let _ = kill(Pid::from_raw(d as i32), Signal::SIGKILL);
            }
            let _ = std::fs::remove_dir_all(home);
        }
    }
}

/// Kills everything still owned (panic, signal, deadline).
fn destroy_all() {
    let all: Vec<Owned> = std::mem::take(&mut *OWNED.lock().unwrap_or_else(|e| e.into_inner()))
        .into_values()
        .collect();
    for o in &all {
        destroy(o);
    }
}

/// Installs the safety nets: a panic anywhere kills what this program
/// started; SIGINT and SIGTERM (blocked in every thread, waited for on
/// one) do too and exit 130; so does the hard deadline, exiting 3.
fn safety_nets(deadline: Duration) {
    let hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        destroy_all();
        hook(info);
    }));
    let mut set = nix::sys::signal::SigSet::empty();
    set.add(Signal::SIGINT);
    set.add(Signal::SIGTERM);
    // Blocked before any other thread starts, so every thread inherits
    // the mask; children get an empty mask (std resets it at spawn).
    if set.thread_block().is_ok() {
        std::thread::spawn(move || {
            if let Ok(sig) = set.wait() {
                eprintln!("reload_proof: {sig}: killing every server started, exiting");
                destroy_all();
                std::process::exit(130);
            }
        });
    }
    std::thread::spawn(move || {
        std::thread::sleep(deadline);
        eprintln!(
            "reload_proof: hard deadline of {} s reached: killing every server started, exiting",
            deadline.as_secs()
        );
        destroy_all();
        std::process::exit(3);
    });
}

/// Runs `cmd` to completion, killing it after `limit`; its status and
/// output (stdout and stderr).
fn run_bounded(cmd: &mut Command, limit: Duration) -> Result<(bool, String), String> {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .spawn()
        .map_err(|e| format!("{cmd:?}: {e}"))?;
    let key = own(Owned::Group(child.id() as i32));
    let out = collect(child.stdout.take());
    let err = collect(child.stderr.take());
    let until = Instant::now() + limit;
    let status = loop {
        match child.try_wait() {
            Ok(Some(s)) => break Some(s),
            Ok(None) if Instant::now() < until => std::thread::sleep(Duration::from_millis(20)),
            _ => break None,
        }
    };
    if status.is_none() {
        release(key);
        let _ = child.wait();
    } else {
        OWNED.lock().unwrap_or_else(|e| e.into_inner()).remove(&key);
    }
    let text = format!(
        "{}{}",
        out.join().unwrap_or_default(),
        err.join().unwrap_or_default()
    );
    match status {
        Some(s) => Ok((s.success(), text)),
        None => Err(format!(
            "{cmd:?} still running after {} s: killed",
            limit.as_secs()
        )),
    }
}

fn collect(r: Option<impl Read + Send + 'static>) -> std::thread::JoinHandle<String> {
    std::thread::spawn(move || {
        let mut s = String::new();
        if let Some(mut r) = r {
            let _ = r.read_to_string(&mut s);
        }
        s
    })
}

// ---------------------------------------------------------------------
// Processes, ports, probes.

fn children(pid: u32) -> BTreeSet<u32> {
    // Every thread's children: Node's and PM2's primaries fork from the
    // main thread, but nothing says they must.
    let mut out = BTreeSet::new();
    if let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) {
        for t in tasks.flatten() {
            let list = std::fs::read_to_string(t.path().join("children")).unwrap_or_default();
            out.extend(
                list.split_whitespace()
                    .filter_map(|s| s.parse::<u32>().ok()),
            );
        }
    }
    out
}

/// Whether `pid` is alive and not a zombie.
fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| {
        s.rfind(')')
            .and_then(|i| s[i + 2..].chars().next())
            .is_some_and(|state| state != 'Z')
    })
}

/// A port nothing listens on now (bound to port 0 and released: the
/// servers need to be told a port).
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("bind 127.0.0.1:0")
}

/// One `GET /` with `Connection: close`: the status and the pid header.
fn probe(port: u16) -> Option<(u16, Option<u32>)> {
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_millis(200)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(1))).ok()?;
    s.write_all(b"GET / HTTP/1.1\r\nHost: probe\r\nConnection: close\r\n\r\n")
        .ok()?;
    let mut buf = Vec::new();
    let _ = s.read_to_end(&mut buf);
    let text = String::from_utf8_lossy(&buf);
    let status = text.split_whitespace().nth(1)?.parse().ok()?;
    let pid = text.lines().find_map(|l| {
        let (k, v) = l.split_once(':')?;
        k.eq_ignore_ascii_case(PID_HEADER)
            .then(|| v.trim().parse().ok())?
    });
    Some((status, pid))
}

/// A small xorshift generator: which worker to kill.
struct Rng(u64);

impl Rng {
    fn new() -> Rng {
        let seed = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(1, |d| d.as_nanos() as u64)
            | 1;
        Rng(seed)
    }
    fn below(&mut self, n: usize) -> usize {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 % n.max(1) as u64) as usize
    }
}

// ---------------------------------------------------------------------
// Targets.

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    /// `cluster_hello`: Rust primary and workers.
    Rust,
    /// `uvcluster run -- node http_app.js`.
    Node,
    /// `pm2 start http_app.js -i W`.
    Pm2,
    /// `node refork_primary.js`: Node's documented re-fork on exit.
    Refork,
    /// `uvcluster run -- cluster_hello`: Rust workers under the CLI
    /// (latency rows only).
    RustRun,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Rust => "uvcluster cluster_hello (Rust workers)",
            Kind::Node => "uvcluster run -- node http_app.js",
            Kind::Pm2 => "pm2 start http_app.js -i W",
            Kind::Refork => "node refork_primary.js (cluster.on('exit', fork))",
            Kind::RustRun => "uvcluster run -- cluster_hello (Rust workers)",
        }
    }
    fn short(self) -> &'static str {
        match self {
            Kind::Rust => "rust",
            Kind::Node => "node",
            Kind::Pm2 => "pm2",
            Kind::Refork => "refork",
            Kind::RustRun => "rust-run",
        }
    }
    /// Whether its responses name the worker (the Node app does;
    /// `cluster_hello` does not: see [`probe_answered_by`]).
    fn names_pid(self) -> bool {
        !matches!(self, Kind::Rust | Kind::RustRun)
    }
    /// Whether it has a rolling reload.
    fn reloads(self) -> bool {
        self != Kind::Refork
    }
    /// Whether the scheduling policy is ours to choose.
    fn has_policy(self) -> bool {
        matches!(self, Kind::Rust | Kind::Node | Kind::RustRun)
    }
    /// Whether it runs in the reload, kill and fail-closed scenarios too
    /// (`rust-run` is there for the restart latency only).
    fn under_load(self) -> bool {
        self != Kind::RustRun
    }
}

/// What the targets need: binaries and paths.
#[derive(Clone)]
struct Tools {
    cluster_hello: Option<PathBuf>,
    uvcluster: Option<PathBuf>,
    node: String,
    pm2: Option<PathBuf>,
    app: PathBuf,
    refork: PathBuf,
    /// More options for `uvcluster run`.
    uvcluster_args: Vec<String>,
}

/// A server under test, with its workers.
struct Target {
    kind: Kind,
    port: u16,
    workers: usize,
    child: Option<Child>,
    key: u64,
    pm2_home: Option<PathBuf>,
    /// The last lines of the server's stderr.
    stderr: Arc<Mutex<Vec<String>>>,
}

impl Target {
    fn start(
        tools: &Tools,
        kind: Kind,
        policy: &str,
        workers: usize,
        env: &[(&str, &str)],
    ) -> Result<Target, String> {
        let port = free_port();
        let stderr = Arc::new(Mutex::new(Vec::new()));
        let w = workers.to_string();
        let mut cmd = match kind {
            Kind::Rust => {
                let mut c = Command::new(tools.cluster_hello.as_ref().ok_or("no cluster_hello")?);
                c.env("WORKERS", &w);
                c
            }
            Kind::Node => {
                let mut c = Command::new(tools.uvcluster.as_ref().ok_or("no uvcluster")?);
                c.args(["run", "--workers", &w])
                    .args(&tools.uvcluster_args)
                    .arg("--")
                    .arg(&tools.node)
                    .arg(&tools.app);
                c
            }
            Kind::Refork => {
                let mut c = Command::new(&tools.node);
                c.arg(&tools.refork).env("WORKERS", &w);
                c
            }
            Kind::RustRun => {
                let mut c = Command::new(tools.uvcluster.as_ref().ok_or("no uvcluster")?);
                c.args(["run", "--workers", &w])
                    .args(&tools.uvcluster_args)
                    .arg("--")
                    .arg(tools.cluster_hello.as_ref().ok_or("no cluster_hello")?);
                c
            }
            Kind::Pm2 => return Target::start_pm2(tools, port, workers, env),
        };
        cmd.env("PORT", port.to_string())
            .env("NODE_CLUSTER_SCHED_POLICY", policy)
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .process_group(0);
        let mut child = cmd.spawn().map_err(|e| format!("{cmd:?}: {e}"))?;
        let key = own(Owned::Group(child.id() as i32));
        keep_lines(child.stderr.take(), stderr.clone());
        let mut t = Target {
            kind,
            port,
            workers,
            child: Some(child),
            key,
            pm2_home: None,
            stderr,
        };
        t.wait_serving()?;
        Ok(t)
    }

    fn start_pm2(
        tools: &Tools,
        port: u16,
        workers: usize,
        env: &[(&str, &str)],
    ) -> Result<Target, String> {
        let pm2 = tools.pm2.as_ref().ok_or("PM2 is not installed")?;
        let home = std::env::temp_dir().join(format!(
            "reload_proof-pm2-{}-{}",
            std::process::id(),
            NEXT_KEY.load(Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&home).map_err(|e| format!("{}: {e}", home.display()))?;
        let key = own(Owned::Pm2 {
            pm2: pm2.clone(),
            home: home.clone(),
        });
        let mut cmd = Command::new(pm2);
        cmd.arg("start")
            .arg(&tools.app)
            .args(["-i", &workers.to_string(), "--name", "http_app"])
            .env("PM2_HOME", &home)
            .env("PORT", port.to_string())
            .envs(env.iter().copied());
        let (ok, out) = run_bounded(&mut cmd, Duration::from_secs(60))?;
        let mut t = Target {
            kind: Kind::Pm2,
            port,
            workers,
            child: None,
            key,
            pm2_home: Some(home),
            stderr: Arc::new(Mutex::new(Vec::new())),
        };
        if !ok {
            return Err(format!("pm2 start failed:\n{out}"));
        }
        t.wait_serving()?;
        Ok(t)
    }

    /// The primary: our child, or PM2's daemon.
    fn primary(&self) -> Option<u32> {
        match (&self.child, &self.pm2_home) {
            (Some(c), _) => Some(c.id()),
            (None, Some(home)) => pm2_daemon_pid(home),
            _ => None,
        }
    }

    fn primary_alive(&mut self) -> bool {
        match &mut self.child {
            Some(c) => matches!(c.try_wait(), Ok(None)),
            None => self.primary().is_some_and(alive),
        }
    }

    /// The live worker processes.
    fn worker_pids(&self) -> BTreeSet<u32> {
        let Some(p) = self.primary() else {
            return BTreeSet::new();
        };
        children(p).into_iter().filter(|c| alive(*c)).collect()
    }

    /// Waits until the server answers 200 with all its workers up.
    fn wait_serving(&mut self) -> Result<(), String> {
        let until = Instant::now() + START_TIMEOUT;
        while Instant::now() < until {
            if !self.primary_alive() {
                return Err(format!(
                    "{} exited while starting:\n{}",
                    self.kind.name(),
                    self.last_stderr()
                ));
            }
            if self.worker_pids().len() >= self.workers
                && probe(self.port).is_some_and(|(s, _)| s == 200)
            {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Err(format!(
            "{} not serving with {} workers after {} s:\n{}",
            self.kind.name(),
            self.workers,
            START_TIMEOUT.as_secs(),
            self.last_stderr()
        ))
    }

    fn last_stderr(&self) -> String {
        let l = self.stderr.lock().unwrap_or_else(|e| e.into_inner());
        l[l.len().saturating_sub(8)..].join("\n")
    }

    /// Asks for a rolling reload: SIGHUP to our primary, `pm2 reload`
    /// (which returns when PM2 considers it done) for PM2.
    fn ask_reload(&mut self) -> Result<(), String> {
        match self.kind {
            Kind::Pm2 => {
                let home = self.pm2_home.clone().ok_or("no PM2_HOME")?;
                let pm2 = match OWNED
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .get(&self.key)
                {
                    Some(Owned::Pm2 { pm2, .. }) => pm2.clone(),
                    _ => return Err("PM2 is gone".into()),
                };
                let (ok, out) = run_bounded(
                    Command::new(pm2)
                        .args(["reload", "http_app"])
                        .env("PM2_HOME", home),
                    Duration::from_secs(60),
                )?;
                if ok {
                    Ok(())
                } else {
                    Err(format!("pm2 reload failed: {}", out.trim()))
                }
            }
            Kind::Rust | Kind::Node | Kind::RustRun => {
                let p = self.primary().ok_or("no primary")?;
                kill(Pid::from_raw(p as i32), Signal::SIGHUP).map_err(|e| format!("SIGHUP: {e}"))
            }
            Kind::Refork => Err("Node's re-fork pattern has no reload".into()),
        }
    }
}

impl Drop for Target {
    fn drop(&mut self) {
        release(self.key);
        if let Some(c) = &mut self.child {
            let _ = c.wait();
        }
    }
}

fn pm2_daemon_pid(home: &Path) -> Option<u32> {
    std::fs::read_to_string(home.join("pm2.pid"))
        .ok()?
        .trim()
        .parse()
        .ok()
}

/// Keeps the last lines of `r` in `into` (read on a thread).
fn keep_lines(r: Option<impl Read + Send + 'static>, into: Arc<Mutex<Vec<String>>>) {
    let Some(r) = r else { return };
    std::thread::spawn(move || {
        for line in BufReader::new(r).lines().map_while(Result::ok) {
            let mut l = into.lock().unwrap_or_else(|e| e.into_inner());
            if l.len() >= 200 {
                l.remove(0);
            }
            l.push(line);
        }
    });
}

// ---------------------------------------------------------------------
// Load.

/// A load running on a thread of its own until stopped.
struct Load {
    stop: Arc<AtomicBool>,
    pids: SeenPids,
    thread: std::thread::JoinHandle<std::io::Result<LoadReport>>,
}

impl Load {
    /// Starts the load, and returns once it has run for [`WARMUP`].
    fn start(port: u16, connections: usize, workload: Workload, timeout: Duration) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let pids = SeenPids::default();
        let cfg = LoadConfig {
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
            connections,
            // The stop flag ends it; this only bounds it.
            duration: Duration::from_secs(3600),
            workload,
        };
        let opts = RunOptions {
            timeout: Some(timeout),
            stop: Some(stop.clone()),
            retry_delay: Duration::from_millis(5),
            pid_header: Some(PID_HEADER.into()),
            pids: Some(pids.clone()),
            max_requests: None,
        };
        let thread = std::thread::spawn(move || loadgen::run_with(cfg, opts));
        std::thread::sleep(WARMUP);
        Load { stop, pids, thread }
    }

    fn finish(self) -> LoadReport {
        std::thread::sleep(TAIL);
        self.stop.store(true, Ordering::Relaxed);
        match self.thread.join() {
            Ok(Ok(r)) => r,
            Ok(Err(e)) => panic!("load generator: {e}"),
            Err(_) => panic!("load generator panicked"),
        }
    }

    /// The pids that have answered since `since`, and when each first did.
    fn new_pids_since(&self, since: Instant, known: &BTreeSet<u32>) -> Option<Instant> {
        let pids = self.pids.lock().unwrap_or_else(|e| e.into_inner());
        pids.iter()
            .filter(|(p, s)| !known.contains(p) && s.first >= since)
            .map(|(_, s)| s.first)
            .min()
    }
}

// ---------------------------------------------------------------------
// Scenarios.

struct Opts {
    reloads: usize,
    interval: Duration,
    kills: usize,
    kill_every: Duration,
    latency_kills: usize,
    latency_gap: Duration,
    connections: usize,
    workers: usize,
    timeout: Duration,
    reload_timeout: Duration,
    failclosed: Duration,
    targets: Vec<Kind>,
    policies: Vec<String>,
    modes: Vec<Workload>,
    scenarios: Vec<String>,
    deadline: Duration,
    /// More options for `uvcluster run` (the `node` target).
    uvcluster_args: Vec<String>,
}

/// One line of the table.
struct Row {
    scenario: &'static str,
    target: Kind,
    policy: String,
    mode: &'static str,
    requests: u64,
    failures: Failures,
    /// Reloads or kills done, of those asked.
    done: String,
    note: String,
}

fn mode_name(w: Workload) -> &'static str {
    match w {
        Workload::KeepAlive => "keep-alive",
        _ => "close",
    }
}

/// Waits until none of `old` is a worker any more and there are as many
/// as before: the reload (or the replacement) is done.
fn wait_replaced(t: &mut Target, old: &BTreeSet<u32>, limit: Duration) -> bool {
    let until = Instant::now() + limit;
    while Instant::now() < until {
        let now = t.worker_pids();
        if now.len() >= t.workers && now.is_disjoint(old) {
            return true;
        }
        if !t.primary_alive() {
            return false;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    false
}

fn scenario_reload(o: &Opts, t: &mut Target, workload: Workload) -> (LoadReport, String, String) {
    let load = Load::start(t.port, o.connections, workload, o.timeout);
    let load_began = Instant::now();
    let mut done = 0;
    let mut note = String::new();
    let first = t.worker_pids();
    for i in 0..o.reloads {
        let began = Instant::now();
        let old = t.worker_pids();
        if let Err(e) = t.ask_reload() {
            note = format!("reload {}: {e}", i + 1);
            break;
        }
        if wait_replaced(t, &old, o.reload_timeout) {
            done += 1;
        } else {
            note = if t.primary_alive() {
                format!("reload {} not done in {:?}", i + 1, o.reload_timeout)
            } else {
                format!("primary gone after reload {}", i + 1)
            };
            break;
        }
        let spent = began.elapsed();
        if spent < o.interval {
            std::thread::sleep(o.interval - spent);
        }
    }
    // A run cut short (the primary gone) lasts as long as a full one
    // would have: what a client sees for that long.
    let full = o.interval * o.reloads as u32;
    if let Some(rest) = full.checked_sub(load_began.elapsed()) {
        std::thread::sleep(rest);
    }
    let report = load.finish();
    if done == o.reloads && !t.worker_pids().is_disjoint(&first) {
        note = "an original worker survived every reload".into();
    }
    (report, format!("{done}/{}", o.reloads), note)
}

fn scenario_kill(o: &Opts, t: &mut Target, workload: Workload) -> (LoadReport, String, String) {
    let load = Load::start(t.port, o.connections, workload, o.timeout);
    let load_began = Instant::now();
    let mut rng = Rng::new();
    let mut skipped = 0;
    let mut done = 0;
    let mut note = String::new();
    for _ in 0..o.kills {
        std::thread::sleep(o.kill_every);
        let pids: Vec<u32> = t.worker_pids().into_iter().collect();
        if pids.is_empty() {
            // Every worker is being restarted (or none will be): this
            // kill is skipped, the next one tries again.
            skipped += 1;
            continue;
        }
        let victim = pids[rng.below(pids.len())];
        if kill(Pid::from_raw(victim as i32), Signal::SIGKILL).is_ok() {
            done += 1;
        }
    }
    if skipped > 0 {
        note = format!("{skipped} kill(s) skipped: no worker running then; ");
    }
    // A run cut short (no worker left) lasts as long as a full one.
    let full = o.kill_every * o.kills as u32;
    if let Some(rest) = full.checked_sub(load_began.elapsed()) {
        std::thread::sleep(rest);
    }
    let primary = if t.primary_alive() {
        "primary up"
    } else {
        "primary exited"
    };
    let report = load.finish();
    let left = t.worker_pids().len();
    note.push_str(&format!(
        "{left}/{} workers at the end, {primary}",
        t.workers
    ));
    (report, format!("{done}/{}", o.kills), note)
}

/// Kills a random worker of `t` and waits for a response from a worker
/// that had not answered before: the time from the kill to that
/// response's arrival, or `None` after 5 s. For a target whose answers
/// do not name their worker, the new worker is a child of the primary
/// not seen before, and its first answer is found by
/// [`probe_answered_by`].
fn kill_and_time(t: &mut Target, load: &Load, rng: &mut Rng) -> Option<Option<Duration>> {
    let pids: Vec<u32> = t.worker_pids().into_iter().collect();
    if pids.is_empty() {
        return None;
    }
    let known: BTreeSet<u32> = load
        .pids
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .keys()
        .copied()
        .chain(pids.iter().copied())
        .collect();
    let victim = pids[rng.below(pids.len())];
    let at = Instant::now();
    kill(Pid::from_raw(victim as i32), Signal::SIGKILL).ok()?;
    let until = at + Duration::from_secs(5);
    let mut fresh: BTreeSet<u32> = BTreeSet::new();
    loop {
        if t.kind.names_pid() {
            if let Some(first) = load.new_pids_since(at, &known) {
                return Some(Some(first - at));
            }
        } else {
            fresh.extend(t.worker_pids().difference(&known));
            if !fresh.is_empty()
                && let Some(answered) = probe_answered_by(t.port, &fresh)
            {
                return Some(Some(answered - at));
            }
        }
        if Instant::now() >= until {
            return Some(None);
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// One keep-alive `GET /` to `port`: when its complete answer arrived, if
/// one of `pids` answered it (holds the server side of the connection,
/// which stays open after a keep-alive answer). The server side's socket
/// inode comes from [`server_socket_inode`], and a process holds it when
/// a link in its `/proc/<pid>/fd` reads `socket:[inode]`.
fn probe_answered_by(port: u16, pids: &BTreeSet<u32>) -> Option<Instant> {
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_millis(200)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(1))).ok()?;
    s.write_all(b"GET / HTTP/1.1\r\nHost: probe\r\n\r\n").ok()?;
    let ours = s.local_addr().ok()?.port();
    let mut buf = Vec::new();
    let mut chunk = [0u8; 1024];
    let answered = loop {
        let n = s.read(&mut chunk).ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
        if answer_complete(&buf) {
            break Instant::now();
        }
    };
    let inode = server_socket_inode(port, ours)?;
    let needle = format!("socket:[{inode}]");
    pids.iter()
        .any(|p| {
            std::fs::read_dir(format!("/proc/{p}/fd")).is_ok_and(|dir| {
                dir.filter_map(Result::ok).any(|e| {
                    std::fs::read_link(e.path()).is_ok_and(|l| l.as_os_str() == needle.as_str())
                })
            })
        })
        .then_some(answered)
}

/// Whether `buf` holds a whole answer: its head and `Content-Length`
/// bytes of body.
fn answer_complete(buf: &[u8]) -> bool {
    let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
        return false;
    };
    let head = String::from_utf8_lossy(&buf[..end]);
    let len: usize = head
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.trim()
                .eq_ignore_ascii_case("content-length")
                .then(|| v.trim().parse().ok())?
        })
        .unwrap_or(0);
    buf.len() >= end + 4 + len
}

/// The inode of the TCP socket, on 127.0.0.1, whose local port is
/// `local` and remote port `remote` (the server's side of one of our
/// connections): one exact lookup with the kernel's `sock_diag` (netlink,
/// `SOCK_DIAG_BY_FAMILY` with the whole address in the request, as `ss`
/// does for one socket), not a walk of `/proc/net/tcp`, which lists every
/// socket in `TIME_WAIT` too (tens of thousands after a load with one
/// request per connection: seconds to read).
fn server_socket_inode(local: u16, remote: u16) -> Option<u64> {
    use nix::sys::socket::{
        AddressFamily, MsgFlags, NetlinkAddr, SockFlag, SockProtocol, SockType, recv, sendto,
        socket,
    };
    use std::os::fd::AsRawFd;
    // struct nlmsghdr (16 bytes) + struct inet_diag_req_v2 (56 bytes).
    const SOCK_DIAG_BY_FAMILY: u16 = 20;
    const NLM_F_REQUEST: u16 = 1;
    const NLMSG_ERROR: u16 = 2;
    let mut req = Vec::with_capacity(72);
    req.extend_from_slice(&72u32.to_ne_bytes());
    req.extend_from_slice(&SOCK_DIAG_BY_FAMILY.to_ne_bytes());
    req.extend_from_slice(&NLM_F_REQUEST.to_ne_bytes());
    req.extend_from_slice(&1u32.to_ne_bytes()); // seq
    req.extend_from_slice(&0u32.to_ne_bytes()); // pid: the kernel
    // family AF_INET (a v4-mapped socket of a dual-stack listener is
    // found too: the lookup is by address), protocol TCP, no extensions,
    // every state.
    req.extend_from_slice(&[2, 6, 0, 0]);
    req.extend_from_slice(&u32::MAX.to_ne_bytes());
    // struct inet_diag_sockid: ports and addresses in network order.
    req.extend_from_slice(&local.to_be_bytes());
    req.extend_from_slice(&remote.to_be_bytes());
    for _ in 0..2 {
        req.extend_from_slice(&[127, 0, 0, 1]);
        req.extend_from_slice(&[0; 12]);
    }
    req.extend_from_slice(&0u32.to_ne_bytes()); // interface
    req.extend_from_slice(&[0xff; 8]); // INET_DIAG_NOCOOKIE
    let fd = socket(
        AddressFamily::Netlink,
        SockType::Datagram,
        SockFlag::SOCK_CLOEXEC,
        SockProtocol::NetlinkSockDiag,
    )
    .ok()?;
    sendto(
        fd.as_raw_fd(),
        &req,
        &NetlinkAddr::new(0, 0),
        MsgFlags::empty(),
    )
    .ok()?;
    // The kernel answers within the send: nothing to wait for.
    let mut buf = [0u8; 1024];
    let n = recv(fd.as_raw_fd(), &mut buf, MsgFlags::MSG_DONTWAIT).ok()?;
    let kind = u16::from_ne_bytes([*buf.get(4)?, *buf.get(5)?]);
    // struct inet_diag_msg after the header: idiag_inode at offset 68.
    if n < 16 + 72 || kind == NLMSG_ERROR || kind != SOCK_DIAG_BY_FAMILY {
        return None;
    }
    let inode = u32::from_ne_bytes(buf[16 + 68..16 + 72].try_into().ok()?);
    (inode != 0).then_some(u64::from(inode))
}

/// Adds `r`'s counts to `into`.
fn add_report(into: &mut LoadReport, r: &LoadReport) {
    into.requests += r.requests;
    let (f, g) = (&mut into.failures, r.failures);
    f.connect += g.connect;
    f.reset += g.reset;
    f.timeout += g.timeout;
    f.status += g.status;
    f.short += g.short;
    f.malformed += g.malformed;
    into.errors = f.total();
}

/// Restart latency. `fresh`: each kill in a cluster just started (the
/// first restart of a slot, what a rare crash meets); otherwise every
/// kill in the same cluster, `--latency-gap-ms` apart (what repeated
/// crashes meet: a supervisor's backoff shows here).
fn scenario_latency(
    o: &Opts,
    start: &dyn Fn() -> Result<Target, String>,
    fresh: bool,
) -> (LoadReport, String, String) {
    let mut rng = Rng::new();
    let mut lat: Vec<Duration> = Vec::new();
    let mut missed = 0;
    let mut total = LoadReport::default();
    let mut problem = String::new();
    let mut shared: Option<(Target, Load)> = None;
    for _ in 0..o.latency_kills {
        if shared.is_none() {
            match start() {
                // A light load: enough to reach a new worker at once,
                // little enough not to slow its start.
                Ok(t) => {
                    let load = Load::start(t.port, 4, Workload::Close, o.timeout);
                    shared = Some((t, load));
                }
                Err(e) => {
                    problem = e;
                    break;
                }
            }
        } else {
            std::thread::sleep(o.latency_gap);
        }
        let Some((t, load)) = shared.as_mut() else {
            break;
        };
        match kill_and_time(t, load, &mut rng) {
            Some(Some(d)) => lat.push(d),
            Some(None) => missed += 1,
            None => {
                problem = "no worker left".into();
                break;
            }
        }
        if fresh && let Some((t, load)) = shared.take() {
            add_report(&mut total, &load.finish());
            drop(t);
        }
    }
    if let Some((t, load)) = shared.take() {
        add_report(&mut total, &load.finish());
        drop(t);
    }
    lat.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    let mut note = if lat.is_empty() {
        "no replacement served".to_string()
    } else {
        format!(
            "median {:.0} ms, max {:.0} ms",
            ms(lat[lat.len() / 2]),
            ms(*lat.last().expect("not empty"))
        )
    };
    if missed > 0 {
        note.push_str(&format!("; {missed} kill(s) not replaced within 5 s"));
    }
    if !problem.is_empty() {
        note.push_str(&format!("; {problem}"));
    }
    (total, format!("{}/{}", lat.len(), o.latency_kills), note)
}

/// How the fail-closed scenario breaks the app and mends it again.
struct Breakage {
    /// Makes new workers fail on start.
    break_app: Box<dyn Fn() -> std::io::Result<()>>,
    /// Undoes it.
    mend_app: Box<dyn Fn() -> std::io::Result<()>>,
    /// What it does, for the notes.
    how: &'static str,
}

impl Breakage {
    /// The Node app: the marker file `FAIL_MARKER` names.
    fn marker(marker: &Path) -> Breakage {
        let (m1, m2) = (marker.to_path_buf(), marker.to_path_buf());
        Breakage {
            break_app: Box::new(move || std::fs::write(&m1, b"fail on start\n")),
            mend_app: Box::new(move || std::fs::remove_file(&m2)),
            how: "app exits 1 on start",
        }
    }

    /// A Rust program run from a copy at `exe`: the copy is replaced (a
    /// rename, as a deploy does) by a script that exits 1, then by the
    /// program again.
    fn binary(exe: &Path, original: &Path) -> Breakage {
        let (e1, e2, orig) = (exe.to_path_buf(), exe.to_path_buf(), original.to_path_buf());
        Breakage {
            break_app: Box::new(move || {
                let tmp = e1.with_extension("broken");
                std::fs::write(&tmp, "#!/bin/sh\necho broken deploy >&2\nexit 1\n")?;
                std::fs::set_permissions(
                    &tmp,
                    std::os::unix::fs::PermissionsExt::from_mode(0o755),
                )?;
                std::fs::rename(&tmp, &e1)
            }),
            mend_app: Box::new(move || {
                let tmp = e2.with_extension("mended");
                std::fs::copy(&orig, &tmp)?;
                std::fs::rename(&tmp, &e2)
            }),
            how: "binary replaced by a script that exits 1",
        }
    }
}

fn scenario_failclosed(
    o: &Opts,
    t: &mut Target,
    workload: Workload,
    breakage: &Breakage,
) -> (LoadReport, String, String) {
    let load = Load::start(t.port, o.connections, workload, o.timeout);
    let old = t.worker_pids();
    let broke = (breakage.break_app)();
    let began = Instant::now();
    let asked = t.ask_reload();
    // Watch: the old workers should stay and serve.
    while began.elapsed() < o.failclosed && t.primary_alive() {
        std::thread::sleep(Duration::from_millis(20));
    }
    let kept = old.iter().filter(|p| alive(**p)).count();
    let served_late = {
        let pids = load.pids.lock().unwrap_or_else(|e| e.into_inner());
        old.iter()
            .filter(|p| {
                pids.get(p)
                    .is_some_and(|s| s.last > began + o.failclosed / 2)
            })
            .count()
    };
    // The row counts the bad reload's window only: the good reload after
    // it is a reload like those of the `reload` rows.
    let report = load.finish();
    let mended = (breakage.mend_app)();
    // Then a good reload should complete.
    let before_good = t.worker_pids();
    let recovered = t.primary_alive()
        && t.ask_reload().is_ok()
        && wait_replaced(t, &before_good, o.reload_timeout);
    let mut note = format!(
        "{}: old workers alive {kept}/{} after {} ms",
        breakage.how,
        old.len(),
        o.failclosed.as_millis()
    );
    if t.kind.names_pid() {
        note.push_str(&format!(
            ", {served_late} of them still serving in its second half"
        ));
    }
    for (what, r) in [
        ("breaking", broke.err().map(|e| e.to_string())),
        ("reload", asked.err()),
    ] {
        if let Some(e) = r {
            note.push_str(&format!("; {what}: {e}"));
        }
    }
    if let Err(e) = mended {
        note.push_str(&format!("; mending: {e}"));
    }
    (
        report,
        format!(
            "bad reload, then good one {}",
            if recovered { "done" } else { "NOT done" }
        ),
        note,
    )
}

// ---------------------------------------------------------------------

fn parse_opts() -> Result<Opts, String> {
    let mut o = Opts {
        reloads: 20,
        interval: Duration::from_millis(500),
        kills: 20,
        kill_every: Duration::from_millis(500),
        latency_kills: 10,
        latency_gap: Duration::from_millis(1000),
        connections: 16,
        workers: 2,
        timeout: Duration::from_millis(2000),
        reload_timeout: Duration::from_millis(10_000),
        failclosed: Duration::from_millis(3000),
        targets: vec![
            Kind::Rust,
            Kind::RustRun,
            Kind::Node,
            Kind::Pm2,
            Kind::Refork,
        ],
        policies: ["rr", "none", "reuseport", "leastconn"]
            .map(String::from)
            .to_vec(),
        modes: vec![Workload::Close, Workload::KeepAlive],
        scenarios: ["reload", "kill", "latency", "latency-repeat", "failclosed"]
            .map(String::from)
            .to_vec(),
        deadline: Duration::from_secs(1200),
        uvcluster_args: Vec::new(),
    };
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let (name, inline) = match a.split_once('=') {
            Some((n, v)) => (n.to_string(), Some(v.to_string())),
            None => (a.clone(), None),
        };
        if name == "-h" || name == "--help" {
            println!("{}", USAGE);
            std::process::exit(0);
        }
        let v = match inline {
            Some(v) => v,
            None => args
                .next()
                .ok_or_else(|| format!("{name} needs a value\n{USAGE}"))?,
        };
        let num = |v: &str| -> Result<u64, String> {
            v.parse()
                .map_err(|_| format!("{name} takes a whole number. Received {v:?}"))
        };
        let list = |v: &str, valid: &[&str]| -> Result<Vec<String>, String> {
            v.split(',')
                .map(|x| {
                    valid
                        .contains(&x)
                        .then(|| x.to_string())
                        .ok_or_else(|| format!("{name}: {x:?} is not one of {}", valid.join(", ")))
                })
                .collect()
        };
        match name.as_str() {
            "--reloads" => o.reloads = num(&v)? as usize,
            "--interval-ms" => o.interval = Duration::from_millis(num(&v)?),
            "--kills" => o.kills = num(&v)? as usize,
            "--kill-every-ms" => o.kill_every = Duration::from_millis(num(&v)?),
            "--latency-kills" => o.latency_kills = num(&v)? as usize,
            "--latency-gap-ms" => o.latency_gap = Duration::from_millis(num(&v)?),
            "--connections" => o.connections = num(&v)?.max(1) as usize,
            "--workers" => o.workers = num(&v)?.max(1) as usize,
            "--timeout-ms" => o.timeout = Duration::from_millis(num(&v)?.max(1)),
            "--reload-timeout-ms" => o.reload_timeout = Duration::from_millis(num(&v)?),
            "--failclosed-ms" => o.failclosed = Duration::from_millis(num(&v)?),
            "--deadline-s" => o.deadline = Duration::from_secs(num(&v)?.max(1)),
            "--uvcluster-args" => {
                o.uvcluster_args = v.split_whitespace().map(String::from).collect()
            }
            "--targets" => {
                o.targets = list(&v, &["rust", "rust-run", "node", "pm2", "refork"])?
                    .iter()
                    .map(|t| match t.as_str() {
                        "rust" => Kind::Rust,
                        "rust-run" => Kind::RustRun,
                        "node" => Kind::Node,
                        "pm2" => Kind::Pm2,
                        _ => Kind::Refork,
                    })
                    .collect()
            }
            "--policies" => o.policies = list(&v, &["rr", "none", "reuseport", "leastconn"])?,
            "--modes" => {
                o.modes = list(&v, &["close", "keepalive"])?
                    .iter()
                    .map(|m| {
                        if m == "close" {
                            Workload::Close
                        } else {
                            Workload::KeepAlive
                        }
                    })
                    .collect()
            }
            "--scenarios" => {
                o.scenarios = list(
                    &v,
                    &["reload", "kill", "latency", "latency-repeat", "failclosed"],
                )?
            }
            _ => return Err(format!("unknown option {name:?}\n{USAGE}")),
        }
    }
    Ok(o)
}

const USAGE: &str = "usage: reload_proof [--reloads K] [--interval-ms MS] [--kills K] \
[--kill-every-ms MS] [--latency-kills N] [--connections C] [--workers W] [--timeout-ms MS] \
[--reload-timeout-ms MS] [--failclosed-ms MS] [--targets rust,rust-run,node,pm2,refork] \
[--policies rr,none,reuseport,leastconn] [--modes close,keepalive] \
[--scenarios reload,kill,latency,latency-repeat,failclosed] [--latency-gap-ms MS] \
[--uvcluster-args \"ARGS\"] [--deadline-s S]";

/// PM2: `PM2` if set, else installed with npm into
/// `bench/node/.pm2-install` (once; later runs reuse it).
fn find_pm2() -> Result<PathBuf, String> {
    if let Some(p) = std::env::var_os("PM2") {
        return Ok(PathBuf::from(p));
    }
    let prefix = uvcluster_bench::lab_dir().join("node/.pm2-install");
    let bin = prefix.join("node_modules/.bin/pm2");
    if bin.exists() {
        return Ok(bin);
    }
    println!(
        "installing {PM2_PACKAGE} with npm into {} ...",
        prefix.display()
    );
    let (ok, out) = run_bounded(
        Command::new("npm")
            .args(["install", "--no-audit", "--no-fund", "--prefix"])
            .arg(&prefix)
            .arg(PM2_PACKAGE),
        Duration::from_secs(300),
    )?;
    if ok && bin.exists() {
        Ok(bin)
    } else {
        Err(format!("npm install {PM2_PACKAGE} failed:\n{}", out.trim()))
    }
}

fn main() {
    let o = match parse_opts() {
        Ok(o) => o,
        Err(e) => {
            eprintln!("reload_proof: {e}");
            std::process::exit(2);
        }
    };
    safety_nets(o.deadline);
    let command: Vec<String> = std::env::args().collect();
    println!("command: {}", command.join(" "));
    let node = std::env::var("NODE").unwrap_or_else(|_| "node".into());
    let lab = uvcluster_bench::lab_dir();
    let wants = |k: Kind| o.targets.contains(&k);
    let mut tools = Tools {
        cluster_hello: None,
        uvcluster: None,
        node: node.clone(),
        pm2: None,
        app: lab.join("node/http_app.js"),
        refork: lab.join("node/refork_primary.js"),
        uvcluster_args: o.uvcluster_args.clone(),
    };
    let mut targets = o.targets.clone();
    if wants(Kind::Rust) || wants(Kind::RustRun) {
        match uvcluster_bench::cluster_hello() {
            Ok(p) => tools.cluster_hello = Some(p),
            Err(e) => {
                println!("SKIPPED rust, rust-run: {e}");
                targets.retain(|k| !matches!(k, Kind::Rust | Kind::RustRun));
            }
        }
    }
    if wants(Kind::Node) || targets.contains(&Kind::RustRun) {
        match uvcluster_bench::uvcluster_cli() {
            Ok(p) => tools.uvcluster = Some(p),
            Err(e) => {
                println!("SKIPPED node, rust-run: {e}");
                targets.retain(|k| !matches!(k, Kind::Node | Kind::RustRun));
            }
        }
    }
    let have_node = Command::new(&node)
        .arg("--version")
        .output()
        .is_ok_and(|out| out.status.success());
    if !have_node {
        println!("SKIPPED node, pm2, refork: {node} cannot be run");
        targets.retain(|k| matches!(k, Kind::Rust | Kind::RustRun));
    }
    if targets.contains(&Kind::Pm2) {
        match find_pm2() {
            Ok(p) => {
                // Its package's version: `pm2 --version` would start a
                // daemon in ~/.pm2.
                let v = p
                    .parent()
                    .and_then(|bin| bin.parent())
                    .map(|nm| nm.join("pm2/package.json"))
                    .and_then(|pkg| std::fs::read_to_string(pkg).ok())
                    .and_then(|text| serde_json::from_str::<serde_json::Value>(&text).ok())
                    .and_then(|v| v["version"].as_str().map(String::from))
                    .unwrap_or_else(|| "(version unknown)".into());
                println!("PM2 {v}: {}", p.display());
                tools.pm2 = Some(p);
            }
            Err(e) => {
                println!("!!!! SKIPPED PM2: it could not be installed: {e}");
                targets.retain(|k| *k != Kind::Pm2);
            }
        }
    }
    println!(
        "{} workers, {} connections, request timeout {} ms; {} reloads at least {} ms apart; \
         {} kills every {} ms; {} kills for latency",
        o.workers,
        o.connections,
        o.timeout.as_millis(),
        o.reloads,
        o.interval.as_millis(),
        o.kills,
        o.kill_every.as_millis(),
        o.latency_kills
    );
    let scratch = std::env::temp_dir().join(format!("reload_proof-{}", std::process::id()));
    if let Err(e) = std::fs::create_dir_all(&scratch) {
        eprintln!("reload_proof: {}: {e}", scratch.display());
        std::process::exit(1);
    }
    let marker = scratch.join("fail-on-start");
    let marker_s = marker.to_string_lossy().into_owned();
    let mut rows: Vec<Row> = Vec::new();
    for scenario in &o.scenarios {
        for &kind in &targets {
            let reloading = scenario == "reload" || scenario == "failclosed";
            let latency = scenario.starts_with("latency");
            if (reloading && !kind.reloads()) || (!latency && !kind.under_load()) {
                continue;
            }
            let default_policy = vec!["rr".to_string()];
            let policies = if kind.has_policy() && !latency {
                &o.policies
            } else {
                &default_policy
            };
            let modes = if latency {
                vec![Workload::Close]
            } else {
                o.modes.clone()
            };
            for policy in policies {
                for &mode in &modes {
                    let env: Vec<(&str, &str)> = if scenario == "failclosed" {
                        vec![("FAIL_MARKER", &marker_s)]
                    } else {
                        Vec::new()
                    };
                    let label = format!("{scenario} {} {policy} {}", kind.short(), mode_name(mode));
                    eprintln!("-- {label}");
                    // The fail-closed scenario breaks the app: the Node
                    // app by its marker, the Rust one by replacing a copy
                    // of its binary.
                    let mut tools = tools.clone();
                    let breakage = match (&tools.cluster_hello, kind) {
                        (Some(orig), Kind::Rust) if scenario == "failclosed" => {
                            let copy = scratch.join("cluster_hello");
                            if let Err(e) = std::fs::copy(orig, &copy) {
                                println!("{label}: cannot copy {}: {e}", orig.display());
                                continue;
                            }
                            let b = Breakage::binary(&copy, orig);
                            tools.cluster_hello = Some(copy);
                            b
                        }
                        _ => Breakage::marker(&marker),
                    };
                    let start = || Target::start(&tools, kind, policy, o.workers, &env);
                    let (report, done, note) = if latency {
                        scenario_latency(&o, &start, scenario == "latency")
                    } else {
                        let mut t = match start() {
                            Ok(t) => t,
                            Err(e) => {
                                println!("{label}: could not start: {e}");
                                continue;
                            }
                        };
                        match scenario.as_str() {
                            "reload" => scenario_reload(&o, &mut t, mode),
                            "kill" => scenario_kill(&o, &mut t, mode),
                            _ => scenario_failclosed(&o, &mut t, mode, &breakage),
                        }
                    };
                    let row = Row {
                        scenario: match scenario.as_str() {
                            "reload" => "reload",
                            "kill" => "kill",
                            "latency" => "restart latency (first restart)",
                            "latency-repeat" => "restart latency (repeated kills)",
                            _ => "fail-closed",
                        },
                        target: kind,
                        policy: if kind.has_policy() {
                            policy.clone()
                        } else {
                            "(node rr)".into()
                        },
                        mode: mode_name(mode),
                        requests: report.requests,
                        failures: report.failures,
                        done,
                        note,
                    };
                    eprintln!(
                        "   {} ok, {} failed ({}), {}; {}",
                        row.requests,
                        row.failures.total(),
                        row.failures,
                        row.done,
                        row.note
                    );
                    rows.push(row);
                }
            }
        }
    }
    let _ = std::fs::remove_dir_all(&scratch);
    print_table(&rows);
    destroy_all();
}

fn print_table(rows: &[Row]) {
    println!();
    println!(
        "| scenario | target | policy | mode | requests ok | failed | connect | reset | timeout | non-200 | short | done | notes |"
    );
    println!(
        "| --- | --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- | --- |"
    );
    for r in rows {
        let f = r.failures;
        println!(
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            r.scenario,
            r.target.name(),
            r.policy,
            r.mode,
            r.requests,
            f.total(),
            f.connect,
            f.reset,
            f.timeout,
            f.status,
            f.short + f.malformed,
            r.done,
            r.note
        );
    }
}
