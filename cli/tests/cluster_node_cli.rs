//! The `uvcluster` binary: `uvcluster run -w 2 --policy rr -- COMMAND`
//! with real Node workers and with the `cluster_hello` example; `PORT`
//! passes through the environment, worker exits are logged on stderr,
//! SIGINT disconnects gracefully (exit 0), a second signal kills, and bad
//! arguments exit 2 with the usage.

// The library's test helpers (this package's tests run the library's
// examples and Node scripts).
#[path = "../../tests/util/mod.rs"]
mod util;

use std::collections::HashSet;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

const LIMIT: Duration = Duration::from_secs(20);

fn example(name: &str) -> PathBuf {
    // The library's examples, built by `cargo test` at the workspace root.
    util::example(name)
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The running `uvcluster`, killed if the test fails first. A thread
/// forwards each stderr line (then `None` at EOF), so the test waits on the
/// binary's own log lines, with a deadline, instead of polling.
struct Cli {
    child: Option<Child>,
    lines: mpsc::Receiver<Option<String>>,
    log: String,
}

impl Drop for Cli {
    fn drop(&mut self) {
        if let Some(c) = self.child.as_mut() {
            let _ = kill(Pid::from_raw(c.id() as i32), Signal::SIGKILL);
            let _ = c.wait();
        }
    }
}

impl Cli {
    /// Starts `uvcluster run -w 2 --policy rr -- command` and waits until
    /// both workers listen.
    fn start(port: u16, envs: &[(&str, &str)], command: &[&str]) -> Cli {
        Cli::start_with(Some("rr"), port, envs, command)
    }

    /// [`start`](Self::start) with another `--policy`, or none.
    fn start_with(policy: Option<&str>, port: u16, envs: &[(&str, &str)], command: &[&str]) -> Cli {
        let mut c = Command::new(env!("CARGO_BIN_EXE_uvcluster"));
        c.args(["run", "-w", "2"]);
        if let Some(p) = policy {
            c.args(["--policy", p]);
        }
        c.arg("--")
            .args(command)
            .env("PORT", port.to_string())
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
        let mut cli = Cli {
            child: Some(child),
            lines: rx,
            log: String::new(),
        };
        for _ in 0..2 {
            cli.expect(" listening on ");
        }
        cli
    }

    /// Waits (with a deadline) for the next log line containing `what`.
    fn expect(&mut self, what: &str) -> String {
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

    fn signal(&self, s: Signal) {
        let c = self.child.as_ref().unwrap();
        kill(Pid::from_raw(c.id() as i32), s).unwrap();
    }

    fn running(&mut self) -> bool {
        self.child.as_mut().unwrap().try_wait().unwrap().is_none()
    }

    /// Waits for the exit: stderr reaches EOF when the process ends (with a
    /// deadline); returns (code, the whole log).
    fn wait(mut self) -> (Option<i32>, String) {
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

/// One request (the workers listen: `Cli::start` waited for them).
fn get(port: u16) -> String {
    let mut s = TcpStream::connect(SocketAddr::from(([127, 0, 0, 1], port)))
        .unwrap_or_else(|e| panic!("no server on {port}: {e}"));
    s.set_read_timeout(Some(LIMIT)).unwrap();
    s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    out
}

fn body(resp: &str) -> &str {
    resp.split_once("\r\n\r\n").map_or(resp, |(_, b)| b)
}

fn ports_worker() -> String {
    util::require_node();
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/node/ports_worker.js")
        .to_string_lossy()
        .into_owned()
}

#[test]
fn cli_runs_node_http_workers_round_robin_and_stops_on_sigint() {
    let port = free_port();
    let js = ports_worker();
    let cli = Cli::start(port, &[("SCENARIO", "http_port")], &["node", &js]);
    let mut pids = HashSet::new();
    for _ in 0..20 {
        let r = get(port);
        assert!(r.starts_with("HTTP/1.1 200"), "{r}");
        pids.insert(body(&r).to_string());
    }
    assert_eq!(pids.len(), 2, "round-robin over both workers: {pids:?}");
    cli.signal(Signal::SIGINT);
    let (code, err) = cli.wait();
    assert_eq!(code, Some(0), "{err}");
    assert!(err.contains("disconnecting workers"), "{err}");
    for (id, pid) in [1, 2].iter().zip(&pids) {
        let _ = pid;
        assert!(err.contains(&format!("worker {id} (pid")), "{err}");
    }
    for pid in &pids {
        assert!(err.contains(&format!("(pid {pid}) exited\n")), "{err}");
    }
}

#[test]
fn cli_runs_the_cluster_hello_example() {
    let port = free_port();
    let exe = example("cluster_hello");
    assert!(exe.exists(), "{} not built", exe.display());
    let cli = Cli::start(port, &[], &[exe.to_str().unwrap()]);
    for _ in 0..4 {
        assert_eq!(body(&get(port)), "hello world\n");
    }
    cli.signal(Signal::SIGTERM);
    let (code, err) = cli.wait();
    assert_eq!(code, Some(0), "{err}");
    assert_eq!(err.matches(") exited\n").count(), 2, "{err}");
}

/// TCP sockets listening on `port` (IPv4 and IPv6), from /proc/net.
fn listening_sockets(port: u16) -> usize {
    ["/proc/net/tcp", "/proc/net/tcp6"]
        .iter()
        .filter_map(|f| std::fs::read_to_string(f).ok())
        .map(|t| {
            t.lines()
                .skip(1)
                .filter(|l| {
                    let f: Vec<&str> = l.split_whitespace().collect();
                    // local_address is ADDR:PORT in hex; state 0A is LISTEN.
                    f.len() > 3
                        && f[3] == "0A"
                        && f[1].rsplit(':').next() == Some(&format!("{port:04X}")[..])
                })
                .count()
        })
        .sum()
}

/// Our own policies reach the primary by `--policy` and by
/// `NODE_CLUSTER_SCHED_POLICY`: `cluster_hello` serves under each;
/// `reuseport` listens with one socket per worker, `leastconn` (like `rr`)
/// with the primary's one.
#[test]
fn cli_policies_reuseport_and_leastconn() {
    let exe = example("cluster_hello");
    let cases = [
        ("rr", 1, true),
        ("reuseport", 2, true),
        ("leastconn", 1, true),
        ("reuseport", 2, false),
        ("leastconn", 1, false),
    ];
    for (policy, sockets, by_flag) in cases {
        let port = free_port();
        let (flag, env) = if by_flag {
            (Some(policy), vec![])
        } else {
            (None, vec![("NODE_CLUSTER_SCHED_POLICY", policy)])
        };
        let cli = Cli::start_with(flag, port, &env, &[exe.to_str().unwrap()]);
        for _ in 0..4 {
            assert_eq!(body(&get(port)), "hello world\n", "{policy}");
        }
        assert_eq!(listening_sockets(port), sockets, "{policy}");
        cli.signal(Signal::SIGTERM);
        let (code, err) = cli.wait();
        assert_eq!(code, Some(0), "{policy}: {err}");
    }
}

/// A worker holding an open connection does not leave on the first
/// SIGINT (test-cluster-worker-no-exit); the second signal kills it.
#[test]
fn cli_second_signal_kills() {
    let port = free_port();
    let js = ports_worker();
    let mut cli = Cli::start(port, &[("SCENARIO", "hold")], &["node", &js]);
    let mut held = TcpStream::connect(SocketAddr::from(([127, 0, 0, 1], port))).unwrap();
    held.set_read_timeout(Some(LIMIT)).unwrap();
    let mut buf = [0u8; 16];
    assert!(held.read(&mut buf).unwrap() > 0, "the worker wrote its pid");
    cli.signal(Signal::SIGINT);
    // The other worker leaves; the one holding the connection stays.
    cli.expect(") exited");
    assert!(
        cli.running(),
        "still running with a worker holding a connection"
    );
    // A second SIGINT within 500 ms of the first is the same Ctrl-C
    // delivered twice (docs/cli.md, "Signals"); the reminder the stop
    // writes after 5 s marks a later one, the user's second request.
    let line = cli.expect("still waiting for worker(s)");
    // The worker it waits for, by id and pid (never an empty list).
    assert!(line.contains("still waiting for worker(s) "), "{line}");
    assert!(!line.contains("worker(s)  to finish"), "{line}");
    assert!(line.contains(" (pid "), "{line}");
    cli.signal(Signal::SIGINT);
    let (code, err) = cli.wait();
    // An immediate stop exits 128 + the signal's number, as a shell reports
    // a process killed by it (docs/cli.md, "Exit status"); it was 1 before
    // the exit codes were documented (issue 13).
    assert_eq!(code, Some(130), "stopped at once by SIGINT: {err}");
    assert!(err.contains("killed by signal 9"), "{err}");
    drop(held);
}

#[test]
fn cli_bad_arguments_exit_2_with_usage() {
    for args in [
        &[][..],
        &["walk"][..],
        &["run", "-w", "0", "--", "x"][..],
        &["run", "--policy", "bogus", "--", "x"][..],
        &["run", "-w"][..],
    ] {
        let out = Command::new(env!("CARGO_BIN_EXE_uvcluster"))
            .args(args)
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!err.is_empty(), "{args:?}");
        if args.len() < 2 || args == ["run", "-w"] {
            assert!(err.contains("usage: uvcluster run"), "{args:?}: {err}");
        }
    }
}
