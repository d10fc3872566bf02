//! The lab's load generator against a real server: the library's
//! `cluster_hello` example, as `cargo test` built it.

// The library's test helpers (`example`).
#[path = "../../tests/util/mod.rs"]
mod util;

use std::io::{BufRead, BufReader};
use std::process::{Child, ChildStdout, Command, Stdio};
use std::time::Duration;

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use uvcluster_bench::loadgen::{self, LoadConfig, Slow, Workload};

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

/// Starts `cluster_hello` as one process (`WORKERS=0`) on `port` and
/// waits for its `ready` line; returns it and the rest of its stdout (kept
/// open while it runs).
fn cluster_hello(port: u16) -> (Reap, std::io::Lines<BufReader<ChildStdout>>) {
    let mut child = Reap(Some(
        Command::new(util::example("cluster_hello"))
            .env("PORT", port.to_string())
            .env("WORKERS", "0")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn cluster_hello"),
    ));
    util::forward_stderr(child.0.as_mut().unwrap());
    let out = child.0.as_mut().unwrap().stdout.take().unwrap();
    let mut lines = BufReader::new(out).lines();
    let first = lines.next();
    assert!(
        matches!(&first, Some(Ok(l)) if l == "ready"),
        "cluster_hello did not start: {first:?}"
    );
    (child, lines)
}

/// The load generator's slow-handler mix against `cluster_hello` as one
/// process: every 5th request blocks the loop (`/block/20`), then keeps
/// the CPU busy (`/spin/20`), for 20 ms, so at least a fifth of the
/// latencies, and so the p99, are 20 ms or more; the rest are counted
/// apart.
#[test]
fn loadgen_slow_mix_against_cluster_hello() {
    // A free port: cluster_hello prints only `ready`, not its port.
    let port = util::free_port();
    let (mut child, _stdout) = cluster_hello(port);
    let pid = Pid::from_raw(child.0.as_ref().unwrap().id() as i32);
    for slow in [Slow::Block, Slow::Spin] {
        let r = loadgen::run(LoadConfig {
            addr: ([127, 0, 0, 1], port).into(),
            connections: 2,
            duration: Duration::from_millis(300),
            workload: Workload::SlowMix {
                every: 5,
                ms: 20,
                slow,
            },
        })
        .unwrap();
        assert_eq!(r.errors, 0, "{slow:?}: {r:?}");
        assert!(r.requests >= 5, "{slow:?}: {r:?}");
        assert!(r.p99_us >= 20_000, "{slow:?}: {r:?}");
        // A subset's p99 can exceed the whole's when the slowest answer of
        // all is a fast request (a loaded machine): bound it by the max.
        assert!(r.fast_p99_us <= r.max_us, "{slow:?}: {r:?}");
    }
    kill(pid, Signal::SIGINT).unwrap();
    let status = child.0.take().unwrap().wait().unwrap();
    assert!(status.success() || status.code().is_none(), "{status:?}");
}

/// The load generator reads from the server under test, a peer like any
/// other: a response that never ends (a head announcing 1 GB, then bytes
/// until the generator hangs up, at most 64 MiB) is an error once 1 MiB of
/// it is kept, not a buffer that grows for as long as the server sends.
#[test]
fn loadgen_gives_up_on_a_response_that_never_ends() {
    use std::io::{Read, Write};
    const BUDGET: usize = 64 << 20;
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let server = std::thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        let mut req = [0u8; 1024];
        let _ = s.read(&mut req).unwrap();
        let _ = s.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 1000000000\r\n\r\n");
        let chunk = [b'z'; 64 * 1024];
        let mut sent = 0;
        while sent < BUDGET && s.write_all(&chunk).is_ok() {
            sent += chunk.len();
        }
        sent
    });
    let r = loadgen::run(LoadConfig {
        addr,
        connections: 1,
        duration: Duration::from_millis(200),
        workload: Workload::Close,
    })
    .unwrap();
    assert_eq!(r.requests, 0, "{r:?}");
    assert!(r.errors >= 1, "{r:?}");
    let sent = server.join().unwrap();
    assert!(
        sent < BUDGET / 2,
        "the generator took {sent} bytes of one response"
    );
}
