//! The examples, run as real processes (`examples/tcp_echo.rs` echoes and
//! stops cleanly on SIGINT), and the README example kept equal to a doc test.

mod util;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

const LIMIT: Duration = Duration::from_secs(20);

/// The example `name`, built once by the `cargo test` that runs this test
/// (see [`util::example`]); no test runs `cargo`.
fn build_example(name: &str) -> PathBuf {
    util::example(name)
}

/// Kills the child if the test fails before it exits.
struct Reap(Option<Child>);

impl Drop for Reap {
    fn drop(&mut self) {
        if let Some(c) = self.0.as_mut() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// The child's stdout, line by line, read on a thread so that a silent
/// child fails the test instead of hanging it.
fn stdout_lines(c: &mut Child) -> mpsc::Receiver<String> {
    let stdout = c.stdout.take().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    rx
}

/// The child's first line of stdout.
fn first_line(c: &mut Child, what: &str) -> String {
    stdout_lines(c)
        .recv_timeout(LIMIT)
        .unwrap_or_else(|_| panic!("{what}: no first line"))
}

fn connect(addr: SocketAddr) -> TcpStream {
    let s = TcpStream::connect(addr).expect("connect to tcp_echo");
    s.set_read_timeout(Some(LIMIT)).unwrap();
    s.set_write_timeout(Some(LIMIT)).unwrap();
    s
}

fn echo(s: &mut TcpStream, msg: &[u8]) {
    s.write_all(msg).unwrap();
    let mut back = vec![0; msg.len()];
    s.read_exact(&mut back).expect("echo within the time limit");
    assert_eq!(back, msg);
}

#[test]
fn tcp_echo_echoes_and_stops_on_sigint() {
    let exe = build_example("tcp_echo");
    let mut child = Reap(Some(
        Command::new(exe)
            .env("PORT", "0")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn tcp_echo"),
    ));
    let c = child.0.as_mut().unwrap();
    util::forward_stderr(c);
    let pid = Pid::from_raw(c.id() as i32);

    // The first line of stdout names the address.
    let line = first_line(c, "tcp_echo");
    let addr: SocketAddr = line
        .trim()
        .strip_prefix("listening on ")
        .unwrap_or_else(|| panic!("unexpected first line {line:?}"))
        .parse()
        .expect("an address");
    assert_ne!(addr.port(), 0);

    // One client echoes a few messages and half-closes: the server flushes
    // and closes it, so the client reads EOF.
    let mut a = connect(addr);
    for msg in [&b"hello"[..], b"world", &[7u8; 100_000]] {
        echo(&mut a, msg);
    }
    a.shutdown(Shutdown::Write).unwrap();
    let mut rest = Vec::new();
    a.read_to_end(&mut rest).expect("EOF from the server");
    assert!(rest.is_empty());

    // Another client stays connected until SIGINT closes it.
    let mut b = connect(addr);
    echo(&mut b, b"still here");

    kill(pid, Signal::SIGINT).unwrap();
    let mut buf = [0u8; 16];
    assert_eq!(b.read(&mut buf).expect("EOF after SIGINT"), 0);

    let mut c = child.0.take().unwrap();
    let (tx, rx) = mpsc::channel::<ExitStatus>();
    std::thread::spawn(move || {
        let _ = tx.send(c.wait().expect("wait for tcp_echo"));
    });
    let status = match rx.recv_timeout(LIMIT) {
        Ok(s) => s,
        Err(_) => {
            let _ = kill(pid, Signal::SIGKILL);
            panic!("tcp_echo did not exit after SIGINT");
        }
    };
    assert!(status.success(), "tcp_echo exited with {status}");
}

/// The README's example is not compiled by itself; it must stay the same
/// code as the crate-level doc test in `src/lib.rs`, which is.
#[test]
fn readme_example_is_the_compiled_doc_test() {
    let readme = include_str!("../README.md");
    let block = readme
        .split("```rust\n")
        .nth(1)
        .and_then(|rest| rest.split("\n```").next())
        .expect("README.md has a ```rust block");
    let docs = include_str!("../src/lib.rs")
        .lines()
        .filter_map(|l| l.strip_prefix("//!"))
        .map(|l| l.strip_prefix(' ').unwrap_or(l))
        .collect::<Vec<_>>()
        .join("\n");
    assert!(
        docs.contains(block),
        "README.md's example differs from the doc test in src/lib.rs"
    );
}

/// The README's cluster example is not compiled by itself; it must stay a
/// part of `examples/cluster_restart.rs`, which is compiled (as an example
/// and as a doc test of `cluster`) and run by
/// `cluster_restart_replaces_a_killed_worker_but_not_on_sigterm`.
#[test]
fn readme_cluster_example_is_the_tested_example() {
    let readme = include_str!("../README.md");
    let block = readme
        .split("```rust\n")
        .nth(2)
        .and_then(|rest| rest.split("\n```").next())
        .expect("README.md has a second ```rust block");
    assert!(
        include_str!("../examples/cluster_restart.rs").contains(block),
        "README.md's cluster example differs from examples/cluster_restart.rs"
    );
    assert!(
        include_str!("../src/cluster/mod.rs")
            .contains("include_str!(\"../../examples/cluster_restart.rs\")"),
        "the cluster docs include examples/cluster_restart.rs"
    );
}

/// `examples/cluster_echo.rs`: two workers share one port under both
/// policies, each line comes back as `Reply from <pid>: <line>`, and
/// SIGINT disconnects the workers and exits 0, logging their exits.
fn cluster_echo(policy: &str) {
    let exe = build_example("cluster_echo");
    let mut child = Reap(Some(
        Command::new(exe)
            .env("PORT", "0")
            .env("WORKERS", "2")
            .env("NODE_CLUSTER_SCHED_POLICY", policy)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn cluster_echo"),
    ));
    let c = child.0.as_mut().unwrap();
    let pid = Pid::from_raw(c.id() as i32);
    let stderr = c.stderr.take().unwrap();
    let (etx, erx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut s = String::new();
        let _ = BufReader::new(stderr).read_to_string(&mut s);
        let _ = etx.send(s);
    });
    let line = first_line(c, "cluster_echo");
    let port: u16 = line
        .trim()
        .strip_prefix("ready ")
        .unwrap_or_else(|| panic!("unexpected first line {line:?}"))
        .parse()
        .unwrap();
    assert_ne!(port, 0);
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let mut pids = std::collections::HashSet::new();
    for i in 0..200 {
        let mut s = connect(addr);
        s.write_all(format!("line {i}\nsecond\n").as_bytes())
            .unwrap();
        s.shutdown(Shutdown::Write).unwrap();
        let mut all = String::new();
        s.read_to_string(&mut all).unwrap();
        let lines: Vec<&str> = all.lines().collect();
        assert_eq!(lines.len(), 2, "{all:?}");
        let (who, rest) = lines[0]
            .strip_prefix("Reply from ")
            .and_then(|l| l.split_once(": "))
            .unwrap_or_else(|| panic!("{all:?}"));
        assert_eq!(rest, format!("line {i}"));
        assert_eq!(lines[1], format!("Reply from {who}: second"));
        pids.insert(who.to_string());
        if pids.len() == 2 && i >= 3 {
            break;
        }
    }
    assert_eq!(pids.len(), 2, "both workers answered: {pids:?}");
    kill(pid, Signal::SIGINT).unwrap();
    let mut c = child.0.take().unwrap();
    let (tx, rx) = mpsc::channel::<ExitStatus>();
    std::thread::spawn(move || {
        let _ = tx.send(c.wait().expect("wait for cluster_echo"));
    });
    let status = match rx.recv_timeout(LIMIT) {
        Ok(s) => s,
        Err(_) => {
            let _ = kill(pid, Signal::SIGKILL);
            panic!("cluster_echo did not exit after SIGINT");
        }
    };
    assert!(status.success(), "cluster_echo exited with {status}");
    let err = erx.recv_timeout(LIMIT).unwrap();
    for id in [1, 2] {
        assert!(
            err.contains(&format!("worker {id} exited (code Some(0)")),
            "{err}"
        );
    }
}

#[test]
fn cluster_echo_round_robin() {
    cluster_echo("rr");
}

#[test]
fn cluster_echo_shared() {
    cluster_echo("none");
}

/// Starts `cluster_hello` on `port` with `workers` workers under
/// `policy` and waits for its `ready` line; returns it and the rest of
/// its stdout.
fn cluster_hello(port: u16, workers: &str, policy: &str) -> (Reap, mpsc::Receiver<String>) {
    let exe = build_example("cluster_hello");
    let mut child = Reap(Some(
        Command::new(exe)
            .env("PORT", port.to_string())
            .env("WORKERS", workers)
            .env("NODE_CLUSTER_SCHED_POLICY", policy)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn cluster_hello"),
    ));
    util::forward_stderr(child.0.as_mut().unwrap());
    let lines = stdout_lines(child.0.as_mut().unwrap());
    assert_eq!(lines.recv_timeout(LIMIT).unwrap(), "ready");
    (child, lines)
}

/// `cluster_hello` with two workers: on SIGUSR2 the primary prints one
/// JSON line with each worker's connection and request counts. Two
/// connections with one request each and one keep-alive connection with
/// three requests: 3 connections, 5 requests in all.
#[test]
fn cluster_hello_counts_connections_and_requests_on_sigusr2() {
    // A per-test port: cluster_hello prints only `ready`.
    let port = 18612;
    let (mut child, lines) = cluster_hello(port, "2", "rr");
    let pid = Pid::from_raw(child.0.as_ref().unwrap().id() as i32);
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let get = |s: &mut TcpStream, close: bool| {
        let conn = if close { "close" } else { "keep-alive" };
        write!(s, "GET / HTTP/1.1\r\nHost: t\r\nConnection: {conn}\r\n\r\n").unwrap();
        // The whole response: headers and the 12-byte body.
        let mut got = Vec::new();
        let mut buf = [0u8; 256];
        while !got.ends_with(b"hello world\n") {
            let n = s.read(&mut buf).unwrap();
            assert_ne!(n, 0, "connection ended early: {got:?}");
            got.extend_from_slice(&buf[..n]);
        }
    };
    for _ in 0..2 {
        get(&mut connect(addr), true);
    }
    let mut k = connect(addr);
    for i in 0..3 {
        get(&mut k, i == 2);
    }
    drop(k);
    kill(pid, Signal::SIGUSR2).unwrap();
    let line = lines.recv_timeout(LIMIT).expect("the counts line");
    let v: serde_json::Value = serde_json::from_str(&line).unwrap();
    let workers = v.as_object().unwrap();
    assert_eq!(workers.len(), 2, "{line}");
    let sum = |k: &str| -> u64 { workers.values().map(|w| w[k].as_u64().unwrap()).sum() };
    assert_eq!(sum("conns"), 3, "{line}");
    assert_eq!(sum("reqs"), 5, "{line}");
    kill(pid, Signal::SIGINT).unwrap();
    let status = child.0.take().unwrap().wait().unwrap();
    assert!(status.success(), "{status:?}");
}

/// `examples/cluster_restart.rs`, the restart-on-exit example of the
/// `cluster` docs and the README: a worker killed with SIGKILL is forked
/// again (and the service keeps answering), while the workers that SIGTERM
/// disconnects gracefully are not, and the primary then exits 0.
#[test]
fn cluster_restart_replaces_a_killed_worker_but_not_on_sigterm() {
    let exe = build_example("cluster_restart");
    let mut child = Reap(Some(
        Command::new(exe)
            .env("PORT", "0")
            .env("WORKERS", "2")
            .env("NODE_CLUSTER_SCHED_POLICY", "rr")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn cluster_restart"),
    ));
    let c = child.0.as_mut().unwrap();
    let pid = Pid::from_raw(c.id() as i32);
    let stderr = c.stderr.take().unwrap();
    let (etx, erx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut s = String::new();
        let _ = BufReader::new(stderr).read_to_string(&mut s);
        let _ = etx.send(s);
    });
    let lines = stdout_lines(c);
    // `worker <id> listening on port <port>`
    let listening = |lines: &mpsc::Receiver<String>| -> (u32, u16) {
        let line = lines.recv_timeout(LIMIT).expect("a listening line");
        let rest = line
            .strip_prefix("worker ")
            .unwrap_or_else(|| panic!("unexpected line {line:?}"));
        let (id, port) = rest
            .split_once(" listening on port ")
            .unwrap_or_else(|| panic!("unexpected line {line:?}"));
        (id.parse().unwrap(), port.parse().unwrap())
    };
    let (a, port) = listening(&lines);
    let (b, port_b) = listening(&lines);
    assert_eq!([a.min(b), a.max(b)], [1, 2]);
    assert_ne!(port, 0);
    assert_eq!(port, port_b, "the workers share one port");
    let hello = || {
        let mut s = connect(SocketAddr::from(([127, 0, 0, 1], port)));
        s.write_all(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n").unwrap();
        let mut got = Vec::new();
        let mut buf = [0u8; 256];
        while !got.ends_with(b"hello world\n") {
            let n = s.read(&mut buf).unwrap();
            assert_ne!(n, 0, "connection ended early: {got:?}");
            got.extend_from_slice(&buf[..n]);
        }
        assert!(got.starts_with(b"HTTP/1.1 200 OK\r\n"), "{got:?}");
    };
    hello();

    // Kill one worker: the primary forks worker 3 in its place.
    let workers: Vec<i32> = std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))
        .unwrap()
        .split_whitespace()
        .map(|p| p.parse().unwrap())
        .collect();
    assert_eq!(workers.len(), 2, "{workers:?}");
    kill(Pid::from_raw(workers[0]), Signal::SIGKILL).unwrap();
    assert_eq!(listening(&lines), (3, port));
    for _ in 0..4 {
        hello();
    }

    // A graceful stop: nothing is replaced, and the primary exits 0.
    kill(pid, Signal::SIGTERM).unwrap();
    let mut c = child.0.take().unwrap();
    let (tx, rx) = mpsc::channel::<ExitStatus>();
    std::thread::spawn(move || {
        let _ = tx.send(c.wait().expect("wait for cluster_restart"));
    });
    let status = match rx.recv_timeout(LIMIT) {
        Ok(s) => s,
        Err(_) => {
            let _ = kill(pid, Signal::SIGKILL);
            panic!("cluster_restart did not exit after SIGTERM");
        }
    };
    assert!(status.success(), "cluster_restart exited with {status}");
    let rest: Vec<String> = lines.try_iter().collect();
    assert!(rest.is_empty(), "no worker after the stop: {rest:?}");
    let err = erx.recv_timeout(LIMIT).unwrap();
    let exits: Vec<&str> = err.lines().filter(|l| l.contains(" exited (")).collect();
    assert_eq!(exits.len(), 3, "{err}");
    assert_eq!(
        exits
            .iter()
            .filter(|l| l.ends_with("(code None, signal Some(9))"))
            .count(),
        1,
        "{err}"
    );
    assert_eq!(
        exits
            .iter()
            .filter(|l| l.ends_with("(code Some(0), signal None)"))
            .count(),
        2,
        "{err}"
    );
}
