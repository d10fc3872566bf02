//! The `uvcluster` binary: `uvcluster run -w 2 --policy rr -- COMMAND`
//! with real Node workers and with the `cluster_hello` example; `PORT`
//! passes through the environment, worker exits are logged on stderr,
//! SIGINT disconnects gracefully (exit 0), a second signal kills, and bad
//! arguments exit 2 with the usage.

mod cluster_node_common;
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
    // Examples are built by `cargo test` next to the test binaries.
    let mut p = std::env::current_exe().unwrap();
    p.pop();
    if p.ends_with("deps") {
        p.pop();
    }
    p.join("examples").join(name)
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The running `uvcluster`, killed if the test fails first; stderr is
/// collected on a thread.
struct Cli {
    child: Option<Child>,
    stderr: mpsc::Receiver<String>,
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
    fn start(port: u16, envs: &[(&str, &str)], command: &[&str]) -> Cli {
        let mut c = Command::new(env!("CARGO_BIN_EXE_uvcluster"));
        c.args(["run", "-w", "2", "--policy", "rr", "--"])
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
            let mut s = String::new();
            for line in BufReader::new(err).lines().map_while(Result::ok) {
                s.push_str(&line);
                s.push('\n');
            }
            let _ = tx.send(s);
        });
        Cli {
            child: Some(child),
            stderr: rx,
        }
    }

    fn signal(&self, s: Signal) {
        let c = self.child.as_ref().unwrap();
        kill(Pid::from_raw(c.id() as i32), s).unwrap();
    }

    /// Waits for the exit (with a deadline); returns (code, stderr).
    fn wait(mut self) -> (Option<i32>, String) {
        let mut c = self.child.take().unwrap();
        let t0 = Instant::now();
        let status = loop {
            if let Some(s) = c.try_wait().unwrap() {
                break s;
            }
            if t0.elapsed() > LIMIT {
                let _ = c.kill();
                panic!("uvcluster did not exit");
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        let err = self.stderr.recv_timeout(LIMIT).unwrap_or_default();
        (status.code(), err)
    }
}

/// One request; the workers are separate processes, so a connection is
/// retried (with a deadline) until they listen.
fn get(port: u16) -> String {
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let t0 = Instant::now();
    loop {
        match TcpStream::connect(addr) {
            Ok(mut s) => {
                s.set_read_timeout(Some(LIMIT)).unwrap();
                s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                    .unwrap();
                let mut out = String::new();
                if s.read_to_string(&mut out).is_ok() && !out.is_empty() {
                    return out;
                }
            }
            Err(e) => assert!(t0.elapsed() < LIMIT, "no server on {port}: {e}"),
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn body(resp: &str) -> &str {
    resp.split_once("\r\n\r\n").map_or(resp, |(_, b)| b)
}

fn ports_worker() -> String {
    util::require_node();
    cluster_node_common::node_dir()
        .join("ports_worker.js")
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

/// A worker holding an open connection does not leave on the first
/// SIGINT (test-cluster-worker-no-exit); the second signal kills it.
#[test]
fn cli_second_signal_kills() {
    let port = free_port();
    let js = ports_worker();
    let cli = Cli::start(port, &[("SCENARIO", "hold")], &["node", &js]);
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let t0 = Instant::now();
    let mut held = loop {
        match TcpStream::connect(addr) {
            Ok(s) => break s,
            Err(e) => assert!(t0.elapsed() < LIMIT, "{e}"),
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    held.set_read_timeout(Some(LIMIT)).unwrap();
    let mut buf = [0u8; 16];
    assert!(held.read(&mut buf).unwrap() > 0, "the worker wrote its pid");
    cli.signal(Signal::SIGINT);
    // The other worker leaves; the one holding the connection stays.
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        cli.child.as_ref().map(|c| c.id()).is_some(),
        "still running"
    );
    cli.signal(Signal::SIGINT);
    let (code, err) = cli.wait();
    assert_eq!(code, Some(1), "a worker was killed: {err}");
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
