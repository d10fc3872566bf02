//! `uvcluster run --watch`: a change to a watched file reloads the pool
//! worker by worker while requests keep succeeding; ignored paths reload
//! nothing; new code that fails to start fails the reload closed (the old
//! workers keep answering, one log line says why) and the fix reloads; a
//! burst of writes is one reload; a change during a reload queues exactly
//! one more, never interleaved. Real binary, real Node workers and the
//! `cluster_hello` example as a Rust worker; every wait is on the binary's
//! own log lines with a deadline, never a sleep.

// The library's test helpers (the examples, `require_node`).
#[path = "../../tests/util/mod.rs"]
mod util;

use std::collections::HashSet;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

const LIMIT: Duration = Duration::from_secs(30);

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A fresh scratch directory for one test, removed when dropped.
struct Scratch(PathBuf);

impl Scratch {
    fn new(name: &str) -> Scratch {
        let dir =
            std::env::temp_dir().join(format!("uvcluster-watch-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        Scratch(dir.canonicalize().unwrap())
    }

    fn path(&self, rel: &str) -> PathBuf {
        self.0.join(rel)
    }

    fn write(&self, rel: &str, text: &str) {
        let p = self.path(rel);
        if let Some(d) = p.parent() {
            std::fs::create_dir_all(d).unwrap();
        }
        std::fs::write(p, text).unwrap();
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A Node HTTP app answering `PID VERSION`, listening after `delay_ms`.
fn node_app(version: u32, delay_ms: u64) -> String {
    format!(
        "const http = require('http');\n\
         const VERSION = {version};\n\
         const server = http.createServer((req, res) => {{\n\
         \x20 res.setHeader('connection', 'close');\n\
         \x20 res.end(`${{process.pid}} ${{VERSION}}`);\n\
         }});\n\
         setTimeout(() => server.listen(+process.env.PORT), {delay_ms});\n"
    )
}

/// The running `uvcluster`; a thread forwards its stderr lines so the test
/// waits on them with a deadline. Killed if the test fails first.
struct Run {
    child: Option<Child>,
    lines: mpsc::Receiver<Option<String>>,
    log: String,
}

impl Drop for Run {
    fn drop(&mut self) {
        if let Some(c) = self.child.as_mut() {
            let _ = kill(Pid::from_raw(c.id() as i32), Signal::SIGKILL);
            let _ = c.wait();
        }
    }
}

impl Run {
    /// `uvcluster run -w 2 ARGS -- COMMAND`, `PORT` set; waits until both
    /// workers are ready.
    fn start(port: u16, args: &[&str], command: &[&str]) -> Run {
        Run::start_with_config(port, Path::new("/dev/null"), args, command)
    }

    /// [`start`](Self::start) with the configuration file `config`.
    fn start_with_config(port: u16, config: &Path, args: &[&str], command: &[&str]) -> Run {
        let mut c = Command::new(util::cli_bin());
        for var in [
            "WEB_CONCURRENCY",
            "NODE_CLUSTER_SCHED_POLICY",
            "UVCLUSTER_HANDOFF_WINDOW",
            "JOURNAL_STREAM",
        ] {
            c.env_remove(var);
        }
        c.args(["run", "--config"])
            .arg(config)
            .args(["-w", "2"])
            .args(args)
            .arg("--")
            .args(command)
            .env("RUST_LOG", "info")
            .env("PORT", port.to_string())
            .stdin(Stdio::null())
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
        let mut run = Run {
            child: Some(child),
            lines: rx,
            log: String::new(),
        };
        for _ in 0..2 {
            run.expect(") ready (after ");
        }
        run
    }

    /// Waits for the next log line containing `what`; returns it.
    fn expect(&mut self, what: &str) -> String {
        let t0 = Instant::now();
        loop {
            match self.lines.recv_timeout(LIMIT.saturating_sub(t0.elapsed())) {
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

    /// The lines logged since `from` (a byte offset into the log).
    fn since(&self, from: usize) -> &str {
        &self.log[from..]
    }

    /// SIGTERM, then the exit (stderr's EOF, with a deadline); asserts a
    /// clean stop.
    fn stop(mut self) -> String {
        kill(
            Pid::from_raw(self.child.as_ref().unwrap().id() as i32),
            Signal::SIGTERM,
        )
        .unwrap();
        let t0 = Instant::now();
        loop {
            match self.lines.recv_timeout(LIMIT.saturating_sub(t0.elapsed())) {
                Ok(Some(line)) => {
                    self.log.push_str(&line);
                    self.log.push('\n');
                }
                Ok(None) => break,
                Err(_) => panic!("uvcluster did not exit:\n{}", self.log),
            }
        }
        let status = self.child.take().unwrap().wait().unwrap();
        let log = std::mem::take(&mut self.log);
        assert_eq!(status.code(), Some(0), "{log}");
        log
    }
}

/// Pids from the log's `worker N (pid P) ready` lines in `log`.
fn ready_pids(log: &str) -> HashSet<i32> {
    log.lines()
        .filter(|l| l.contains(") ready (after "))
        .filter_map(|l| {
            let at = l.find("(pid ")? + "(pid ".len();
            l[at..].split(')').next()?.parse().ok()
        })
        .collect()
}

/// One request on a new connection: the body, or why it failed.
fn get(port: u16) -> Result<String, String> {
    let mut s = TcpStream::connect(SocketAddr::from(([127, 0, 0, 1], port)))
        .map_err(|e| format!("connect: {e}"))?;
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .map_err(|e| format!("write: {e}"))?;
    let mut out = String::new();
    s.read_to_string(&mut out)
        .map_err(|e| format!("read: {e}"))?;
    match out.split_once("\r\n\r\n") {
        Some((head, body)) if head.starts_with("HTTP/1.1 200") => Ok(body.to_string()),
        _ => Err(format!("bad response {out:?}")),
    }
}

/// What a load saw.
#[derive(Debug, Default)]
struct Seen {
    ok: usize,
    failures: Vec<String>,
    bodies: HashSet<String>,
}

/// A bounded closed-loop load: `CLIENTS` threads, one request per
/// connection, until stopped (or 60 s, whichever comes first).
struct Load {
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<Seen>>,
}

const CLIENTS: usize = 2;

impl Load {
    fn start(port: u16) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let threads = (0..CLIENTS)
            .map(|_| {
                let stop = stop.clone();
                std::thread::spawn(move || {
                    let t0 = Instant::now();
                    let mut seen = Seen::default();
                    while !stop.load(Ordering::Relaxed) && t0.elapsed() < Duration::from_secs(60) {
                        match get(port) {
                            Ok(b) => {
                                seen.ok += 1;
                                seen.bodies.insert(b);
                            }
                            Err(e) => seen.failures.push(e),
                        }
                    }
                    seen
                })
            })
            .collect();
        Load { stop, threads }
    }

    fn finish(self) -> Seen {
        self.stop.store(true, Ordering::Relaxed);
        let mut all = Seen::default();
        for t in self.threads {
            let s = t.join().unwrap();
            all.ok += s.ok;
            all.failures.extend(s.failures);
            all.bodies.extend(s.bodies);
        }
        all
    }
}

/// Asks until both workers have answered: their `PID VERSION` bodies.
fn both_answer(port: u16) -> HashSet<String> {
    let mut bodies = HashSet::new();
    for _ in 0..50 {
        bodies.insert(get(port).unwrap());
        if bodies.len() == 2 {
            break;
        }
    }
    assert_eq!(bodies.len(), 2, "round-robin over both workers: {bodies:?}");
    bodies
}

fn node() -> String {
    util::require_node();
    "node".into()
}

/// Editing the Node app reloads it worker by worker: the new pids answer
/// with the new code, the old ones are gone, and not one request of a load
/// running throughout fails.
#[test]
fn watch_edit_reloads_node_workers_with_zero_failed_requests() {
    let node = node();
    let dir = Scratch::new("edit-node");
    dir.write("app.js", &node_app(1, 0));
    let app = dir.path("app.js");
    let port = free_port();
    let watched = dir.0.to_str().unwrap();
    let mut run = Run::start(
        port,
        &["--watch", watched, "--watch-debounce", "100ms"],
        &[&node, app.to_str().unwrap()],
    );
    assert!(
        run.log.contains(&format!("watching {watched} (")),
        "{}",
        run.log
    );
    let old = both_answer(port);
    assert!(old.iter().all(|b| b.ends_with(" 1")), "{old:?}");
    let load = Load::start(port);
    dir.write("app.js", &node_app(2, 0));
    let line = run.expect("uvcluster: watch: ");
    assert!(
        line.contains(&format!("{} changed", app.display())) && line.contains("reloading"),
        "{line}"
    );
    run.expect("reload finished (2 workers replaced");
    let seen = load.finish();
    assert!(
        seen.failures.is_empty(),
        "failed requests: {:?}",
        seen.failures
    );
    assert!(seen.ok > 0, "the load made requests");
    let new = both_answer(port);
    assert!(new.iter().all(|b| b.ends_with(" 2")), "{new:?}");
    let pid = |b: &String| b.split(' ').next().unwrap().to_string();
    let old_pids: HashSet<String> = old.iter().map(pid).collect();
    let new_pids: HashSet<String> = new.iter().map(pid).collect();
    assert!(old_pids.is_disjoint(&new_pids), "{old_pids:?} {new_pids:?}");
    // Every answer during the roll came from an old or a new worker.
    for b in &seen.bodies {
        assert!(old.contains(b) || new.contains(b), "{b} from neither");
    }
    run.stop();
}

/// The same with the `cluster_hello` example as a Rust worker: a change
/// anywhere under the watched directory replaces both worker processes
/// (the pids of the `ready` lines) while every request succeeds.
#[test]
fn watch_edit_reloads_rust_workers_with_zero_failed_requests() {
    let exe = util::example("cluster_hello");
    let dir = Scratch::new("edit-rust");
    dir.write("conf/settings.toml", "greeting = \"hello\"\n");
    let port = free_port();
    let mut run = Run::start(
        port,
        &[
            "--watch",
            dir.0.to_str().unwrap(),
            "--watch-debounce",
            "100ms",
        ],
        &[exe.to_str().unwrap()],
    );
    let old = ready_pids(&run.log);
    assert_eq!(old.len(), 2, "{}", run.log);
    let load = Load::start(port);
    let mark = run.log.len();
    dir.write("conf/settings.toml", "greeting = \"hi\"\n");
    run.expect("settings.toml changed");
    run.expect("reload finished (2 workers replaced");
    let seen = load.finish();
    assert!(
        seen.failures.is_empty(),
        "failed requests: {:?}",
        seen.failures
    );
    assert!(seen.ok > 0);
    assert_eq!(seen.bodies, HashSet::from(["hello world\n".to_string()]));
    let new = ready_pids(run.since(mark));
    assert_eq!(new.len(), 2, "{}", run.log);
    assert!(old.is_disjoint(&new), "{old:?} {new:?}");
    assert_eq!(get(port).unwrap(), "hello world\n");
    run.stop();
}

/// Changes under the default ignores (`node_modules`, `.git`, `target`,
/// existing or created while running) and under an `--ignore` glob reach
/// nothing: the next watched change is the first one the watcher reports,
/// and the only reload.
#[test]
fn watch_ignores_default_and_given_globs() {
    let node = node();
    let dir = Scratch::new("ignore");
    dir.write("app.js", &node_app(1, 0));
    dir.write("node_modules/dep/index.js", "1");
    dir.write(".git/HEAD", "ref: refs/heads/main\n");
    // Existing directories: creating one would be a change of its own
    // (`build/**` leaves out what is in `build`, not `build`).
    std::fs::create_dir(dir.path("logs")).unwrap();
    std::fs::create_dir(dir.path("build")).unwrap();
    let port = free_port();
    let mut run = Run::start(
        port,
        &[
            "--watch",
            dir.0.to_str().unwrap(),
            "--ignore",
            "*.log",
            "--ignore",
            "build/**",
            "--watch-debounce",
            "100ms",
        ],
        &[&node, dir.path("app.js").to_str().unwrap()],
    );
    let before = both_answer(port);
    let mark = run.log.len();
    // Every kind of ignored change; the queue keeps inotify's order, so a
    // reported one would come before the trigger below.
    dir.write("node_modules/dep/index.js", "2");
    dir.write("node_modules/new/index.js", "1");
    dir.write(".git/HEAD", "ref: refs/heads/other\n");
    dir.write("target/debug/out", "x");
    dir.write("target/debug/deeper/out", "x");
    dir.write("server.log", "a line\n");
    dir.write("logs/today.log", "a line\n");
    dir.write("build/bundle.js", "x");
    dir.write("trigger.txt", "now");
    let line = run.expect("uvcluster: watch: ");
    assert!(
        line.contains(&format!("{} changed", dir.path("trigger.txt").display())),
        "the first change reported is the trigger: {line}\n{}",
        run.log
    );
    run.expect("reload finished");
    let after = both_answer(port);
    assert!(before.is_disjoint(&after));
    let log = run.stop();
    let since = &log[mark..];
    assert_eq!(since.matches("uvcluster: watch: ").count(), 1, "{since}");
    assert_eq!(since.matches("reload started").count(), 1, "{since}");
}

/// A save that breaks the app (a syntax error) fails the reload closed:
/// the replacement dies before it listens, one log line names why, the old
/// workers keep answering (no request fails) with the old code. Fixing the
/// file reloads, and the new code answers.
#[test]
fn watch_broken_code_fails_closed_and_the_fix_reloads() {
    let node = node();
    let dir = Scratch::new("broken");
    dir.write("app.js", &node_app(1, 0));
    let port = free_port();
    let mut run = Run::start(
        port,
        &[
            "--watch",
            dir.path("app.js").to_str().unwrap(),
            "--watch-debounce",
            "100ms",
        ],
        &[&node, dir.path("app.js").to_str().unwrap()],
    );
    let old = both_answer(port);
    let load = Load::start(port);
    dir.write("app.js", "const = ;\n");
    let failed = run.expect("reload failed: ");
    assert!(
        failed.contains("exited with code 1 before it was ready")
            && failed.contains("the old workers keep serving"),
        "{failed}"
    );
    assert_eq!(run.log.matches("reload failed").count(), 1, "{}", run.log);
    let seen = load.finish();
    assert!(
        seen.failures.is_empty(),
        "failed requests: {:?}",
        seen.failures
    );
    assert!(seen.ok > 0);
    assert_eq!(seen.bodies, old, "only the old workers answered");
    assert_eq!(both_answer(port), old, "the old workers still serve");

    let load = Load::start(port);
    dir.write("app.js", &node_app(3, 0));
    run.expect("reload finished (2 workers replaced");
    let seen = load.finish();
    assert!(
        seen.failures.is_empty(),
        "failed requests: {:?}",
        seen.failures
    );
    let new = both_answer(port);
    assert!(new.iter().all(|b| b.ends_with(" 3")), "{new:?}");
    assert!(old.is_disjoint(&new));
    run.stop();
}

/// 50 files written in a burst are one batch and one reload: the watch
/// line counts at least 50 events, no second reload is queued or started
/// before a later, separate change.
#[test]
fn watch_burst_of_50_writes_is_one_reload() {
    let node = node();
    let dir = Scratch::new("burst");
    dir.write("app.js", &node_app(1, 0));
    std::fs::create_dir(dir.path("data")).unwrap();
    let port = free_port();
    let mut run = Run::start(
        port,
        &[
            "--watch",
            dir.0.to_str().unwrap(),
            "--watch-debounce",
            "500ms",
        ],
        &[&node, dir.path("app.js").to_str().unwrap()],
    );
    let mark = run.log.len();
    for i in 0..50 {
        dir.write(&format!("data/{i}.json"), &format!("{{\"n\":{i}}}"));
    }
    let line = run.expect("uvcluster: watch: ");
    let events: usize = line
        .rsplit_once(" (")
        .and_then(|(_, n)| n.split(' ').next()?.parse().ok())
        .unwrap_or_else(|| panic!("an event count: {line}"));
    assert!(events >= 50, "{line}");
    run.expect("reload finished");
    dir.write("later.txt", "x");
    run.expect("later.txt changed");
    run.expect("reload finished");
    let since = run.since(mark).to_string();
    run.stop();
    assert_eq!(since.matches("reload started").count(), 2, "{since}");
    assert_eq!(since.matches("uvcluster: watch: ").count(), 2, "{since}");
    assert!(!since.contains("reload queued"), "{since}");
}

/// A change during a reload queues one reload, started after the running
/// one finished (never interleaved); a second change during it adds none.
#[test]
fn watch_change_during_a_reload_queues_one_more() {
    let node = node();
    let dir = Scratch::new("queued");
    // Each worker takes 700 ms to listen, so a reload of two lasts > 1 s.
    dir.write("app.js", &node_app(1, 700));
    let port = free_port();
    let mut run = Run::start(
        port,
        &[
            "--watch",
            dir.0.to_str().unwrap(),
            "--watch-debounce",
            "100ms",
        ],
        &[&node, dir.path("app.js").to_str().unwrap()],
    );
    let mark = run.log.len();
    let load = Load::start(port);
    dir.write("app.js", &node_app(2, 700));
    run.expect("reload started");
    dir.write("one.txt", "x");
    run.expect("during a reload: one more reload queued after it");
    dir.write("two.txt", "x");
    run.expect("reload finished");
    let second = run.expect("uvcluster: watch: ");
    assert!(
        second.contains("changes during the last reload"),
        "{second}"
    );
    run.expect("reload finished");
    let seen = load.finish();
    assert!(
        seen.failures.is_empty(),
        "failed requests: {:?}",
        seen.failures
    );
    let since = run.since(mark).to_string();
    let log = run.stop();
    // started, finished, started, finished: in that order, two of each.
    let order: Vec<&str> = since
        .lines()
        .filter_map(|l| {
            if l.contains("reload started") {
                Some("started")
            } else if l.contains("reload finished") {
                Some("finished")
            } else {
                None
            }
        })
        .collect();
    assert_eq!(
        order,
        ["started", "finished", "started", "finished"],
        "{log}"
    );
    assert_eq!(
        since.matches("reload queued after it").count(),
        1,
        "{since}"
    );
}

/// `watch`, `ignore` and `watch-debounce` from `uvcluster.toml`: the
/// file's ignore applies, its watched directory reloads.
#[test]
fn watch_from_the_configuration_file() {
    let node = node();
    let dir = Scratch::new("config");
    dir.write("app/app.js", &node_app(1, 0));
    std::fs::create_dir(dir.path("app/cache")).unwrap();
    let conf = dir.path("uvcluster.toml");
    std::fs::write(
        &conf,
        format!(
            "watch = [{:?}]\nignore = [\"cache\"]\nwatch-debounce = \"100ms\"\n",
            dir.path("app").display().to_string()
        ),
    )
    .unwrap();
    let port = free_port();
    let mut run = Run::start_with_config(
        port,
        &conf,
        &[],
        &[&node, dir.path("app/app.js").to_str().unwrap()],
    );
    assert!(
        run.log
            .contains(&format!("watching {} (", dir.path("app").display()))
            && run
                .log
                .contains("ignoring .git, node_modules, target, cache)"),
        "{}",
        run.log
    );
    let old = both_answer(port);
    dir.write("app/cache/entry", "x");
    dir.write("app/app.js", &node_app(2, 0));
    let line = run.expect("uvcluster: watch: ");
    assert!(line.contains("app.js changed"), "{line}");
    run.expect("reload finished (2 workers replaced");
    let new = both_answer(port);
    assert!(new.iter().all(|b| b.ends_with(" 2")), "{new:?}");
    assert!(old.is_disjoint(&new));
    run.stop();
}

/// A watched path that does not exist is a start failure naming it
/// (exit 1), before any worker is forked.
#[test]
fn watch_missing_path_fails_the_start() {
    let dir = Scratch::new("missing");
    let missing = dir.path("nope");
    let child = Command::new(util::cli_bin())
        .args(["run", "--config", "/dev/null", "-w", "1", "--watch"])
        .arg(&missing)
        .args(["--", "true"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    let out = match rx.recv_timeout(LIMIT) {
        Ok(out) => out.unwrap(),
        Err(_) => {
            let _ = kill(Pid::from_raw(pid as i32), Signal::SIGKILL);
            panic!("uvcluster did not end within {LIMIT:?}");
        }
    };
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains(&format!("--watch {}: ", missing.display())) && err.contains("No such file"),
        "{err}"
    );
    assert!(!err.contains("forked"), "{err}");
}
