//! Beyond one machine: nginx in front of two `uvcluster run` instances (two
//! ports on 127.0.0.1 standing in for two hosts), a closed-loop load
//! through nginx, and a rolling reload of each instance in turn, several
//! times. Prints one row per step (requests, failed requests by kind, and
//! how the load split between the instances) and exits 1 if any request
//! through nginx failed or any reload failed: the goal is zero.
//!
//! ```text
//! cargo run --release -p uvcluster-bench --bin multi_host [ROUNDS] [CONNECTIONS]
//! ```
//!
//! ROUNDS (default 3) is how many times each instance is reloaded;
//! CONNECTIONS (default 32) the client connections to nginx (keep-alive).
//! `APP=node` (the default; Node's reference hello world,
//! `reference/node-baseline/server.js`, as uvcluster's workers) or
//! `APP=rust` (the `cluster_hello` example); `WORKERS` per instance
//! (default 2). `UVCLUSTER_BIN` and `CLUSTER_HELLO` name prebuilt binaries
//! (otherwise they are built in this program's profile).
//!
//! nginx is Debian's `nginx-light`, installed with `apt-get` if missing;
//! when it cannot be had the program says so loudly and exits 77 (the
//! "skipped" status of automake's test harness), which the test reports as
//! a skip, never as a pass.
//!
//! The nginx configuration (printed with `-v`, and shown in
//! docs/deploy.md):
//!
//! * `proxy_next_upstream error timeout` (nginx's default, written out
//!   because it is the point): a request that fails on one instance, in
//!   connecting, sending or reading the response head, is retried on the
//!   other. A GET is idempotent, so the retry is safe. uvcluster itself
//!   never refuses a connection during a reload (the listener stays open
//!   and every accepted connection is served by an old or a new worker),
//!   so retries are only needed for the one race no server can avoid: a
//!   keep-alive connection from nginx that the draining worker closes just
//!   as nginx sends a request on it.
//! * `keepalive 16` idle upstream connections per nginx worker, with
//!   `keepalive_timeout 4s`: shorter than the workers' own idle timeout
//!   (Node's `server.keepAliveTimeout`, 5 s), so nginx, not the worker,
//!   closes an idle connection, and the race above stays rare;
//!   `proxy_http_version 1.1` and an empty `Connection` header, without
//!   which nginx would not reuse upstream connections at all.
//! * `max_fails=0`: an error never takes an instance out of rotation.
//!   nginx counts a failure on a reused keep-alive connection like any
//!   other, and a draining worker closes several at once, so with the
//!   default (`max_fails=1 fail_timeout=10s`), or even `max_fails=3
//!   fail_timeout=5s`, a reload of A marks A down; reloading B within the
//!   window then leaves no live upstream and nginx answers 502 (the first
//!   version of this program measured 3,596 failed requests of 9,898 that
//!   way). Every such error is a retried race, not a dead host. A host
//!   that is really gone refuses connections, and the request moves on at
//!   once; one that vanishes silently costs `proxy_connect_timeout` per
//!   request: give such deployments active health checks, or space the
//!   hosts' reloads by more than `fail_timeout`.
//! * `proxy_connect_timeout 2s`: a host that does not answer at all is
//!   given up quickly, and the request moves to the other.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::process::{Child, Command, ExitCode, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use uvcluster_bench::loadgen::{self, Failures, LoadConfig, LoadReport, RunOptions, Workload};
use uvcluster_bench::nginx;

/// Exit status when nginx cannot be had (automake's "skipped").
const SKIPPED: u8 = 77;

/// The longest wait for any one thing (a start, a reload, a stop).
const DEADLINE: Duration = Duration::from_secs(120);

/// The header nginx adds naming the upstream port that answered.
const UPSTREAM_HEADER: &str = "x-upstream-port";

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A child process, killed (and reaped) when dropped unless it was
/// stopped.
struct Proc {
    child: Option<Child>,
}

impl Proc {
    fn pid(&self) -> Pid {
        Pid::from_raw(self.child.as_ref().map_or(0, |c| c.id() as i32))
    }

    /// Sends `sig` and waits for the exit (with the deadline, then
    /// SIGKILL): its status code.
    fn stop(&mut self, sig: Signal) -> Option<i32> {
        let mut child = self.child.take()?;
        let _ = kill(Pid::from_raw(child.id() as i32), sig);
        let t0 = Instant::now();
        loop {
            if let Ok(Some(s)) = child.try_wait() {
                return s.code();
            }
            if t0.elapsed() > DEADLINE {
                let _ = child.kill();
                let _ = child.wait();
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Some(c) = self.child.as_mut() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// One `uvcluster run` instance: a "host".
struct Instance {
    name: &'static str,
    port: u16,
    proc: Proc,
    lines: Receiver<Option<String>>,
}

impl Instance {
    fn start(
        name: &'static str,
        uvcluster: &Path,
        app: &[String],
        workers: usize,
    ) -> Result<Instance, String> {
        let port = free_port();
        let mut c = Command::new(uvcluster);
        c.args(["run", "--config", "/dev/null", "-w", &workers.to_string()])
            .arg("--")
            .args(app)
            .env("PORT", port.to_string())
            .env("RUST_LOG", "info")
            .env_remove("WEB_CONCURRENCY")
            .env_remove("NODE_CLUSTER_SCHED_POLICY")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let mut child = c
            .spawn()
            .map_err(|e| format!("cannot run {}: {e}", uvcluster.display()))?;
        let err = child.stderr.take().unwrap();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(err).lines().map_while(Result::ok) {
                if tx.send(Some(line)).is_err() {
                    return;
                }
            }
            let _ = tx.send(None);
        });
        let mut inst = Instance {
            name,
            port,
            proc: Proc { child: Some(child) },
            lines: rx,
        };
        for _ in 0..workers {
            inst.wait_for(&[") ready (after "])?;
        }
        Ok(inst)
    }

    /// The next log line containing one of `what` (within the deadline).
    fn wait_for(&mut self, what: &[&str]) -> Result<String, String> {
        let t0 = Instant::now();
        loop {
            match self
                .lines
                .recv_timeout(DEADLINE.saturating_sub(t0.elapsed()))
            {
                Ok(Some(line)) => {
                    if std::env::var_os("VERBOSE").is_some() {
                        eprintln!("[{}] {line}", self.name);
                    }
                    if what.iter().any(|w| line.contains(w)) {
                        return Ok(line);
                    }
                }
                Ok(None) => return Err(format!("instance {} ended early", self.name)),
                Err(_) => {
                    return Err(format!(
                        "instance {}: none of {what:?} within {DEADLINE:?}",
                        self.name
                    ));
                }
            }
        }
    }

    /// SIGHUP (the supervisor's rolling reload) and its outcome: the log's
    /// `reload finished` line once every replaced worker has exited (the
    /// last one drains after the roll ends), or `Err` with the `reload
    /// failed` line.
    fn reload(&mut self, workers: usize) -> Result<String, String> {
        kill(self.proc.pid(), Signal::SIGHUP).map_err(|e| e.to_string())?;
        self.wait_for(&["reload started"])?;
        let mut exited = 0;
        let done = loop {
            let line = self.wait_for(&["reload finished", "reload failed", ") exited"])?;
            if line.contains("reload failed") {
                return Err(line);
            }
            if line.contains(") exited") {
                exited += 1;
            } else {
                break line;
            }
        };
        while exited < workers {
            self.wait_for(&[") exited"])?;
            exited += 1;
        }
        Ok(done)
    }
}

/// nginx's configuration: one upstream of the two instances (see the
/// module docs for each setting).
fn nginx_conf(dir: &Path, port: u16, upstreams: &[u16]) -> String {
    let servers: String = upstreams
        .iter()
        .map(|p| format!("        server 127.0.0.1:{p} max_fails=0;\n"))
        .collect();
    format!(
        "{preamble}\
         worker_processes 1;\n\
         events {{ worker_connections 4096; }}\n\
         http {{\n\
         \x20   access_log off;\n\
         {temp}\
         \x20   keepalive_requests 1000000;\n\
         \x20   upstream app {{\n\
         {servers}\
         \x20       keepalive 16;\n\
         \x20       keepalive_timeout 4s;\n\
         \x20   }}\n\
         \x20   # The upstream port that answered (the last one tried).\n\
         \x20   map $upstream_addr $upstream_port {{\n\
         \x20       ~:(?<p>[0-9]+)$ $p;\n\
         \x20       default 0;\n\
         \x20   }}\n\
         \x20   server {{\n\
         \x20       listen 127.0.0.1:{port};\n\
         \x20       location / {{\n\
         \x20           proxy_pass http://app;\n\
         \x20           proxy_http_version 1.1;\n\
         \x20           proxy_set_header Connection \"\";\n\
         \x20           proxy_next_upstream error timeout;\n\
         \x20           proxy_next_upstream_tries 3;\n\
         \x20           proxy_connect_timeout 2s;\n\
         \x20           add_header {UPSTREAM_HEADER} $upstream_port always;\n\
         \x20       }}\n\
         \x20   }}\n\
         }}\n",
        preamble = nginx::preamble(dir),
        temp = nginx::temp_paths(dir),
    )
}

/// One GET through nginx: whether it was answered 200.
fn get_ok(port: u16) -> bool {
    let Ok(mut s) = TcpStream::connect_timeout(
        &SocketAddr::from(([127, 0, 0, 1], port)),
        Duration::from_millis(500),
    ) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
    if s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .is_err()
    {
        return false;
    }
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    out.starts_with("HTTP/1.1 200")
}

/// Starts nginx and waits until a request through it is answered.
fn start_nginx(bin: &str, dir: &Path, port: u16, upstreams: &[u16]) -> Result<Proc, String> {
    let _ = std::fs::remove_dir_all(dir);
    std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let conf_path = dir.join("nginx.conf");
    let conf = nginx_conf(dir, port, upstreams);
    if std::env::var_os("VERBOSE").is_some() {
        eprintln!("{conf}");
    }
    std::fs::write(&conf_path, conf).map_err(|e| e.to_string())?;
    let cmd = nginx::command(bin, dir, &conf_path);
    let child = Command::new(&cmd[0])
        .args(&cmd[1..])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .map_err(|e| format!("cannot run nginx: {e}"))?;
    let mut proc = Proc { child: Some(child) };
    let t0 = Instant::now();
    while !get_ok(port) {
        if let Some(Ok(Some(s))) = proc.child.as_mut().map(Child::try_wait) {
            let log = std::fs::read_to_string(dir.join("error.log")).unwrap_or_default();
            return Err(format!("nginx exited ({s}):\n{log}"));
        }
        if t0.elapsed() > Duration::from_secs(15) {
            return Err("nginx did not answer within 15 s".into());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(proc)
}

/// A load through nginx, on its own thread, until stopped.
struct Load {
    stop: Arc<AtomicBool>,
    seen: loadgen::SeenPids,
    thread: std::thread::JoinHandle<std::io::Result<LoadReport>>,
}

impl Load {
    fn start(port: u16, connections: usize, duration: Duration) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let seen: loadgen::SeenPids = Arc::new(Mutex::new(Default::default()));
        let opts = RunOptions {
            timeout: Some(Duration::from_secs(5)),
            stop: Some(stop.clone()),
            retry_delay: Duration::from_millis(5),
            pid_header: Some(UPSTREAM_HEADER.into()),
            pids: Some(seen.clone()),
            max_requests: None,
        };
        let cfg = LoadConfig {
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
            connections,
            duration,
            workload: Workload::KeepAlive,
        };
        let thread = std::thread::spawn(move || loadgen::run_with(cfg, opts));
        Load { stop, seen, thread }
    }

    /// Waits until both instances have answered this load (checked every
    /// few milliseconds, within the deadline).
    fn wait_for_both(&self, a: u32, b: u32) -> Result<(), String> {
        let t0 = Instant::now();
        loop {
            {
                let seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
                if seen.contains_key(&a) && seen.contains_key(&b) {
                    return Ok(());
                }
            }
            if t0.elapsed() > DEADLINE || self.thread.is_finished() {
                return Err("the load did not reach both instances".into());
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Stops the load; its report and the responses by upstream port.
    fn finish(self) -> Result<(LoadReport, Vec<(u32, u64)>), String> {
        self.stop.store(true, Ordering::Relaxed);
        self.join()
    }

    /// Waits for the load's end (its duration, or [`Load::finish`]'s stop).
    fn join(self) -> Result<(LoadReport, Vec<(u32, u64)>), String> {
        let r = self
            .thread
            .join()
            .map_err(|_| "the load generator panicked".to_string())?
            .map_err(|e| format!("load generator: {e}"))?;
        let by = self.seen.lock().unwrap_or_else(|e| e.into_inner());
        Ok((r, by.iter().map(|(p, s)| (*p, s.responses)).collect()))
    }
}

/// One row of the table.
struct Row {
    step: String,
    reloaded: String,
    reload: String,
    report: LoadReport,
    split: String,
}

fn print_table(rows: &[Row]) {
    println!(
        "| step | reloaded | reload | requests | failed | failures by kind | req/s | by instance |"
    );
    println!("| --- | --- | --- | ---: | ---: | --- | ---: | --- |");
    for r in rows {
        println!(
            "| {} | {} | {} | {} | {} | {} | {:.0} | {} |",
            r.step,
            r.reloaded,
            r.reload,
            r.report.requests,
            r.report.errors,
            r.report.failures,
            r.report.rps,
            r.split
        );
    }
}

fn main() -> ExitCode {
    match run() {
        Ok(code) => code,
        Err(e) => {
            eprintln!("multi_host: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run() -> Result<ExitCode, String> {
    let mut args = std::env::args().skip(1);
    let rounds: usize = args.next().map_or(Ok(3), |a| a.parse()).map_err(|e| {
        format!("ROUNDS should be a whole number ({e}); usage: multi_host [ROUNDS] [CONNECTIONS]")
    })?;
    let connections: usize = args.next().map_or(Ok(32), |a| a.parse()).map_err(|e| {
        format!(
            "CONNECTIONS should be a whole number ({e}); usage: multi_host [ROUNDS] [CONNECTIONS]"
        )
    })?;
    let workers: usize = std::env::var("WORKERS")
        .ok()
        .map_or(Ok(2), |w| w.parse())
        .map_err(|e| format!("WORKERS should be a whole number: {e}"))?;

    let Some(nginx_bin) = nginx::find("multi_host is") else {
        return Ok(ExitCode::from(SKIPPED));
    };
    let uvcluster = uvcluster_bench::uvcluster_cli()?;
    let node = std::env::var("NODE").unwrap_or_else(|_| "node".into());
    let has_node = Command::new(&node)
        .arg("--version")
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    let app: Vec<String> = match std::env::var("APP").as_deref() {
        Ok("rust") => vec![path_string(&uvcluster_bench::cluster_hello()?)],
        Ok("node") | Err(_) if has_node => {
            vec![node, path_string(&uvcluster_bench::node_baseline())]
        }
        Ok("node") | Err(_) => {
            println!("note: {node} not found: the instances run the cluster_hello example");
            vec![path_string(&uvcluster_bench::cluster_hello()?)]
        }
        Ok(other) => return Err(format!("APP should be node or rust. Received {other:?}")),
    };

    let mut a = Instance::start("A", &uvcluster, &app, workers)?;
    let mut b = Instance::start("B", &uvcluster, &app, workers)?;
    let nginx_port = free_port();
    let dir = std::env::temp_dir().join(format!("uvcluster-multi-host-{}", std::process::id()));
    let mut nginx = start_nginx(&nginx_bin, &dir, nginx_port, &[a.port, b.port])?;

    println!(
        "multi_host: nginx on 127.0.0.1:{nginx_port} in front of two `uvcluster run -w {workers}` \
         instances (A on {}, B on {}) of `{}`; {connections} keep-alive connections; \
         {rounds} rolling reload(s) of each instance in turn\n",
        a.port,
        b.port,
        app.join(" ")
    );
    let (port_a, port_b) = (u32::from(a.port), u32::from(b.port));
    let instance_of = move |port: u32| {
        if port == port_a {
            "A"
        } else if port == port_b {
            "B"
        } else {
            "?"
        }
    };
    let split = |by: &[(u32, u64)]| {
        let mut cells: Vec<String> = by
            .iter()
            .map(|(p, n)| format!("{} {n}", instance_of(*p)))
            .collect();
        cells.sort();
        cells.join(", ")
    };

    let mut rows = Vec::new();
    let mut reload_failures = Vec::new();
    // A baseline: the same load with nothing happening.
    let load = Load::start(nginx_port, connections, Duration::from_secs(1));
    let (report, by) = load.join()?;
    rows.push(Row {
        step: "baseline".into(),
        reloaded: "-".into(),
        reload: "-".into(),
        split: split(&by),
        report,
    });
    for round in 1..=rounds {
        for inst in [&mut a, &mut b] {
            let load = Load::start(nginx_port, connections, DEADLINE);
            // The load flows through both instances before the reload, and
            // goes on until the last old worker has exited.
            load.wait_for_both(port_a, port_b)?;
            let outcome = inst.reload(workers);
            let (report, by) = load.finish()?;
            let reload = match &outcome {
                Ok(line) => line
                    .split_once(" in ")
                    .map_or("ok".into(), |(_, t)| t.trim_end_matches(')').to_string()),
                Err(line) => {
                    reload_failures.push(format!("{}: {line}", inst.name));
                    "FAILED".into()
                }
            };
            rows.push(Row {
                step: format!("round {round}"),
                reloaded: inst.name.into(),
                reload,
                split: split(&by),
                report,
            });
        }
    }

    let mut total = LoadReport::default();
    let mut failures = Failures::default();
    let mut secs = 0.0;
    for r in &rows {
        total.requests += r.report.requests;
        total.errors += r.report.errors;
        let f = r.report.failures;
        failures.connect += f.connect;
        failures.reset += f.reset;
        failures.timeout += f.timeout;
        failures.status += f.status;
        failures.short += f.short;
        failures.malformed += f.malformed;
        secs += r.report.secs;
    }
    total.failures = failures;
    total.secs = secs;
    total.rps = total.requests as f64 / secs.max(f64::EPSILON);
    rows.push(Row {
        step: "TOTAL".into(),
        reloaded: format!("{} reloads", rounds * 2),
        reload: "-".into(),
        split: String::new(),
        report: total.clone(),
    });
    print_table(&rows);

    // Stop everything gracefully: nginx on SIGQUIT, the instances on
    // SIGTERM (each exits 0 after a clean stop).
    let _ = nginx.stop(Signal::SIGQUIT);
    // nginx's error log: each `[error]` line is a request nginx retried on
    // the other instance (or, if any failed, why).
    let errors = std::fs::read_to_string(dir.join("error.log")).unwrap_or_default();
    let retried = errors.lines().filter(|l| l.contains("[error]")).count();
    if total.errors > 0 && !errors.is_empty() {
        println!("nginx's error log (first lines):");
        for l in errors.lines().take(10) {
            println!("  {l}");
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
    let codes = [
        (a.name, a.proc.stop(Signal::SIGTERM)),
        (b.name, b.proc.stop(Signal::SIGTERM)),
    ];
    let mut ok = true;
    for (name, code) in codes {
        if code != Some(0) {
            println!("instance {name} did not stop cleanly: exit {code:?}");
            ok = false;
        }
    }
    for f in &reload_failures {
        println!("reload failed: {f}");
        ok = false;
    }
    println!(
        "\nthrough nginx: {} requests, {} failed ({}); {retried} upstream error(s) \
         retried by nginx (proxy_next_upstream)",
        total.requests, total.errors, total.failures
    );
    if total.errors > 0 || total.requests == 0 {
        ok = false;
    }
    Ok(if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

fn path_string(p: &Path) -> String {
    p.display().to_string()
}
