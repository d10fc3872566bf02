//! The `uvcluster` binary: `uvcluster run -w 2 --policy rr -- COMMAND`
//! with real Node workers and with the `cluster_hello` example; `PORT`
//! passes through the environment, worker exits are logged on stderr,
//! SIGINT disconnects gracefully (exit 0), a second signal kills, and bad
//! arguments exit 2 with the usage.

// The library's test helpers (this package's tests run the library's
// examples and Node scripts).
#[path = "../../tests/util/mod.rs"]
mod util;

mod ops_util;

use std::collections::HashSet;
use std::io::Read;
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::process::Command;

use nix::sys::signal::Signal;
use ops_util::{LIMIT, Running, free_port, get, uvcluster};

fn example(name: &str) -> PathBuf {
    // The library's examples, built by `cargo test` at the workspace root.
    util::example(name)
}

/// Starts `uvcluster run -w 2 --policy rr -- command` and waits until both
/// workers listen.
fn start(port: u16, envs: &[(&str, &str)], command: &[&str]) -> Running {
    start_with(Some("rr"), port, envs, command)
}

/// [`start`] with another `--policy`, or none.
fn start_with(policy: Option<&str>, port: u16, envs: &[(&str, &str)], command: &[&str]) -> Running {
    let mut c = uvcluster();
    c.args(["run", "-w", "2"]);
    if let Some(p) = policy {
        c.args(["--policy", p]);
    }
    c.arg("--").args(command).env("PORT", port.to_string());
    for (k, v) in envs {
        c.env(k, v);
    }
    let mut cli = Running::spawn(c);
    for _ in 0..2 {
        cli.expect(" listening on ");
    }
    cli
}

/// One request (the workers listen: `start` waited for them): its body.
fn body(port: u16) -> String {
    get(port, "/")
        .unwrap_or_else(|e| panic!("no server on {port}: {e}"))
        .1
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
    let cli = start(port, &[("SCENARIO", "http_port")], &["node", &js]);
    let mut pids = HashSet::new();
    for _ in 0..20 {
        let (code, b) = get(port, "/").unwrap();
        assert_eq!(code, 200, "{b}");
        pids.insert(b);
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
    let cli = start(port, &[], &[exe.to_str().unwrap()]);
    for _ in 0..4 {
        assert_eq!(body(port), "hello world\n");
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
        let cli = start_with(flag, port, &env, &[exe.to_str().unwrap()]);
        for _ in 0..4 {
            assert_eq!(body(port), "hello world\n", "{policy}");
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
    let mut cli = start(port, &[("SCENARIO", "hold")], &["node", &js]);
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
        let out = Command::new(ops_util::bin()).args(args).output().unwrap();
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!err.is_empty(), "{args:?}");
        if args.len() < 2 || args == ["run", "-w"] {
            assert!(err.contains("usage: uvcluster run"), "{args:?}: {err}");
        }
    }
}

/// `uvcluster run -- node -e SCRIPT`: the workers exited (code 0) before
/// they listened, and nothing said why. Node makes a process a cluster
/// worker only when `process.argv[1]` is set (`initializeClusterIPC` in
/// lib/internal/process/pre_execution.js), which `-e` alone leaves unset;
/// the `errored` slot now says so and what to do, and with an argument
/// after the script the same workers listen and serve.
#[test]
fn node_eval_workers_need_an_argument_and_the_errored_line_says_so() {
    util::require_node();
    let script = "require('http').createServer((q, r) => r.end('hi from -e\\n'))\
                  .listen(+process.env.PORT)";
    let port = free_port();
    let (code, _, err) = ops_util::crash_loop(
        1,
        &[],
        &["node", "-e", script],
        &[("PORT", &port.to_string())],
    );
    assert_eq!(code, Some(1), "{err}");
    assert!(
        err.contains(
            "slot 0: `node -e SCRIPT` with no argument after the script cannot be a cluster \
             worker: Node makes a process one only when process.argv[1] is set"
        ),
        "{err}"
    );
    assert!(
        err.contains("give the script an argument (`node -e SCRIPT worker`)"),
        "{err}"
    );
    assert!(!err.contains(" listening on "), "{err}");

    let cli = start(port, &[], &["node", "-e", script, "worker"]);
    for _ in 0..4 {
        assert_eq!(body(port), "hi from -e\n");
    }
    let log = cli.stop();
    assert!(!log.contains("cannot be a cluster worker"), "{log}");
}
