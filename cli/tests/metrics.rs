//! `uvcluster run --metrics` (docs/metrics.md): `/metrics` passes
//! `promtool check metrics` (Prometheus's own parser and linter), a real
//! Prometheus server scrapes it and its query API returns the worker
//! count, and `/healthz` and `/readyz` answer as Kubernetes probes expect;
//! bad requests get 4xx and the service keeps serving.
//!
//! promtool and prometheus come from Debian's `prometheus` package
//! (`.ci/run` installs it); where they are missing the tests print a loud
//! SKIP and pass without checking (docs/TESTING.md).

#[path = "../../tests/util/mod.rs"]
mod util;

mod ops_util;

use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};

use nix::sys::signal::Signal;
use ops_util::*;
use uvcluster::serde_json::{self, Value};

/// The metrics port from the primary's log line.
fn metrics_port(r: &mut Running) -> u16 {
    let line = r.line("metrics on http://");
    let addr = line.split("http://").nth(1).unwrap();
    let addr = addr.split('/').next().unwrap();
    addr.rsplit(':').next().unwrap().parse().unwrap()
}

/// Whether `tool` runs; prints a loud SKIP when not.
fn have(tool: &str, test: &str, install: &str) -> bool {
    let ok = Command::new(tool)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !ok {
        eprintln!("\n*** SKIP {test}: `{tool}` is not installed ({install}) ***\n");
    }
    ok
}

#[test]
fn metrics_pass_promtool_check_metrics() {
    let dir = TempDir::new("promtool");
    let sock = dir.join("c.sock");
    let port = free_port();
    let mut r = start_hello(2, port, &sock, &["--metrics", "127.0.0.1:0"]);
    let mport = metrics_port(&mut r);
    // Some traffic and a reload, so that every family has samples.
    for _ in 0..20 {
        assert_eq!(get(port, "/").unwrap().0, 200);
    }
    let out = ctl(&sock, &["reload"]);
    assert!(out.status.success(), "{out:?}");

    let (code, body) = get(mport, "/metrics").unwrap();
    assert_eq!(code, 200);
    for want in [
        "uvcluster_workers{state=\"ready\"} 2\n",
        "uvcluster_ready 1\n",
        "uvcluster_reloads_total{outcome=\"ok\"} 1\n",
        "uvcluster_reloads_total{outcome=\"failed\"} 0\n",
        "uvcluster_connections_handed_total 20\n",
        "uvcluster_handoff_latency_seconds_count 20\n",
        "uvcluster_handoff_latency_seconds_bucket{le=\"+Inf\"} 20\n",
        "uvcluster_dispatch_queue_length 0\n",
        "# TYPE uvcluster_handoff_latency_seconds histogram\n",
        "# TYPE uvcluster_worker_resident_memory_bytes gauge\n",
        "# TYPE uvcluster_worker_cpu_seconds_total counter\n",
    ] {
        assert!(body.contains(want), "{want:?} in\n{body}");
    }
    let rss = body
        .lines()
        .filter(|l| l.starts_with("uvcluster_worker_resident_memory_bytes{"))
        .count();
    assert!(rss >= 2, "{body}");

    if have(
        "promtool",
        "metrics_pass_promtool_check_metrics",
        "apt-get install -y prometheus; .ci/run installs it",
    ) {
        let mut p = Command::new("promtool")
            .args(["check", "metrics"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        p.stdin.take().unwrap().write_all(body.as_bytes()).unwrap();
        let out = wait_output(p);
        assert!(
            out.status.success(),
            "promtool check metrics: {}{}\n{body}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    r.signal(Signal::SIGTERM);
    assert_eq!(r.wait().0, Some(0));
}

/// The value of the sample `name` (with its labels, if any) in `body`.
fn sample(body: &str, name: &str) -> Option<f64> {
    body.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
        .map(|v| v.parse().unwrap())
}

/// Under `rr` each request is one handoff: once the primary has the
/// workers' answers, the handoff latency histogram counts exactly the
/// requests made (every bucket cumulative, `+Inf` = `_count`), the queue is
/// empty, and no worker's open connections are shown (the primary cannot
/// see them close); `ctl status` shows `-` for OPEN.
#[test]
fn handoff_latency_counts_exactly_the_handoffs_under_rr() {
    const N: usize = 25;
    let dir = TempDir::new("dstats-rr");
    let sock = dir.join("c.sock");
    let port = free_port();
    let mut r = start_hello(2, port, &sock, &["--metrics", "127.0.0.1:0"]);
    let mport = metrics_port(&mut r);
    for _ in 0..N {
        assert_eq!(get(port, "/").unwrap().0, 200);
    }
    let count = "uvcluster_handoff_latency_seconds_count";
    // A worker answers the primary as it takes the connection; the answer
    // may reach the primary after the client has its response.
    let mut body = String::new();
    eventually("every handoff answered", || {
        body = get(mport, "/metrics").unwrap().1;
        sample(&body, count) == Some(N as f64)
    });
    assert_eq!(
        sample(
            &body,
            "uvcluster_handoff_latency_seconds_bucket{le=\"+Inf\"}"
        ),
        Some(N as f64),
        "{body}"
    );
    let buckets: Vec<f64> = body
        .lines()
        .filter(|l| l.starts_with("uvcluster_handoff_latency_seconds_bucket{"))
        .map(|l| l.rsplit(' ').next().unwrap().parse().unwrap())
        .collect();
    assert_eq!(buckets.len(), 13, "{body}");
    assert!(buckets.windows(2).all(|w| w[0] <= w[1]), "{body}");
    let sum = sample(&body, "uvcluster_handoff_latency_seconds_sum").unwrap();
    assert!((0.0..N as f64 * 5.0).contains(&sum), "{body}");
    assert_eq!(
        sample(&body, "uvcluster_connections_handed_total"),
        Some(N as f64)
    );
    assert_eq!(sample(&body, "uvcluster_dispatch_queue_length"), Some(0.0));
    assert_eq!(sample(&body, "uvcluster_dispatch_in_flight"), Some(0.0));
    assert!(
        !body.contains("\nuvcluster_worker_connections_open{"),
        "unknown under rr: {body}"
    );
    // Scraping is no handoff: the count stays.
    let again = get(mport, "/metrics").unwrap().1;
    assert_eq!(sample(&again, count), Some(N as f64), "{again}");
    let v = status(&sock);
    for w in v["workers"].as_array().unwrap() {
        assert!(w["connections_open"].is_null(), "{w}");
    }
    r.signal(Signal::SIGTERM);
    assert_eq!(r.wait().0, Some(0));
}

/// Under `leastconn` Rust workers report their open connections: once the
/// requests are done, `/metrics` and `ctl status` show each worker's count
/// (0: every connection closed), and the histogram counts the handoffs.
#[test]
fn leastconn_shows_each_workers_open_connections() {
    const N: usize = 10;
    let dir = TempDir::new("dstats-lc");
    let sock = dir.join("c.sock");
    let port = free_port();
    let mut r = start_hello(
        2,
        port,
        &sock,
        &["--metrics", "127.0.0.1:0", "--policy", "leastconn"],
    );
    let mport = metrics_port(&mut r);
    // Both workers must get a connection, or one never reports its count:
    // sequential requests would all go to the first whenever its report
    // of the last close comes before the next request (a race that failed
    // this test about one run in three). So one connection is held open
    // first; once its worker has reported it, the others go to the other
    // worker.
    let mut held = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    held.set_read_timeout(Some(LIMIT)).unwrap();
    eventually_seen("the held connection's worker reports it", || {
        let body = get(mport, "/metrics").unwrap().1;
        let ok = body
            .lines()
            .any(|l| l.starts_with("uvcluster_worker_connections_open{") && l.ends_with(" 1"));
        (ok, body)
    });
    for _ in 1..N {
        assert_eq!(get(port, "/").unwrap().0, 200);
    }
    held.write_all(b"GET / HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
        .unwrap();
    let mut resp = String::new();
    std::io::Read::read_to_string(&mut held, &mut resp).unwrap();
    assert!(resp.starts_with("HTTP/1.1 200 "), "{resp}");
    drop(held);
    eventually_seen("both workers' open connections known, all closed", || {
        let body = get(mport, "/metrics").unwrap().1;
        let open: Vec<&str> = body
            .lines()
            .filter(|l| l.starts_with("uvcluster_worker_connections_open{"))
            .collect();
        let ok = open.len() == 2
            && open.iter().all(|l| l.ends_with(" 0"))
            && sample(&body, "uvcluster_handoff_latency_seconds_count") == Some(N as f64);
        (ok, body)
    });
    let out = ctl(&sock, &["status"]);
    assert!(out.status.success());
    let t = String::from_utf8(out.stdout).unwrap();
    let lines: Vec<&str> = t.lines().collect();
    let open_col = lines[0]
        .split_whitespace()
        .position(|c| c == "OPEN")
        .unwrap();
    for l in &lines[1..] {
        assert_eq!(l.split_whitespace().nth(open_col), Some("0"), "{t}");
    }
    let v = status(&sock);
    for w in v["workers"].as_array().unwrap() {
        assert_eq!(w["connections_open"].as_u64(), Some(0), "{w}");
    }
    r.signal(Signal::SIGTERM);
    assert_eq!(r.wait().0, Some(0));
}

#[test]
fn healthz_readyz_and_bad_requests() {
    util::require_node();
    let dir = TempDir::new("probes");
    let sock = dir.join("c.sock");
    let port = free_port().to_string();
    // Workers that listen but never say `ready` (--wait-ready): the
    // primary is healthy, not ready.
    let app = concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/node/fail_on_file.js");
    let mut r = Running::start(
        &[
            "run",
            "-w",
            "1",
            "--wait-ready",
            "--ready-timeout",
            "1m",
            "--metrics",
            "127.0.0.1:0",
            "--control",
            sock.to_str().unwrap(),
            "--",
            "node",
            app,
        ],
        &[("PORT", &port)],
    );
    let mport = metrics_port(&mut r);
    r.expect(" listening on ");
    assert_eq!(get(mport, "/healthz").unwrap(), (200, "ok\n".into()));
    assert_eq!(
        get(mport, "/readyz").unwrap(),
        (503, "no worker ready\n".into())
    );
    assert!(
        get(mport, "/metrics")
            .unwrap()
            .1
            .contains("uvcluster_workers{state=\"starting\"} 1\n")
    );
    // Bad requests: 4xx, and the endpoint goes on.
    assert_eq!(get(mport, "/nope").unwrap().0, 404);
    assert_eq!(
        request(mport, "POST /metrics HTTP/1.1\r\nHost: t\r\n\r\n")
            .unwrap()
            .0,
        405
    );
    assert_eq!(request(mport, "garbage\r\n\r\n").unwrap().0, 400);
    let huge = format!("GET /metrics HTTP/1.1\r\nX: {}\r\n\r\n", "a".repeat(10_000));
    assert_eq!(request(mport, &huge).unwrap().0, 431);
    assert_eq!(get(mport, "/healthz").unwrap().0, 200);
    // Silent clients (more than the connection limit, none sending a
    // byte) do not keep a probe out: each new connection takes the place
    // of the oldest silent one.
    let silent: Vec<std::net::TcpStream> = (0..100)
        .map(|_| std::net::TcpStream::connect(("127.0.0.1", mport)).unwrap())
        .collect();
    for _ in 0..3 {
        assert_eq!(get(mport, "/healthz").unwrap(), (200, "ok\n".into()));
    }
    drop(silent);
    r.signal(Signal::SIGTERM);
    assert_eq!(r.wait().0, Some(0));

    // Ready once a worker is.
    let sock = dir.join("d.sock");
    let port = free_port();
    let mut r = start_hello(2, port, &sock, &["--metrics", "127.0.0.1:0"]);
    let mport = metrics_port(&mut r);
    assert_eq!(get(mport, "/readyz").unwrap(), (200, "ready\n".into()));
    r.signal(Signal::SIGTERM);
    assert_eq!(r.wait().0, Some(0));
}

/// `GET /api/v1/query?query=Q` on Prometheus: the first result's value.
fn query(prom: u16, q: &str) -> Option<String> {
    let enc: String = q
        .bytes()
        .map(|b| match b {
            b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'_' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect();
    let (code, body) = get(prom, &format!("/api/v1/query?query={enc}")).ok()?;
    if code != 200 {
        return None;
    }
    let json = &body[body.find('{')?..body.rfind('}')? + 1];
    let v: Value = serde_json::from_str(json).ok()?;
    v["data"]["result"][0]["value"][1]
        .as_str()
        .map(str::to_owned)
}

/// A Prometheus server, killed on drop.
struct Prometheus(std::process::Child);

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn start_prometheus(dir: &Path, target: u16) -> (Prometheus, u16) {
    let cfg = dir.join("prometheus.yml");
    std::fs::write(
        &cfg,
        format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n\
             scrape_configs:\n  - job_name: uvcluster\n    static_configs:\n      \
             - targets: ['127.0.0.1:{target}']\n"
        ),
    )
    .unwrap();
    let port = free_port();
    let child = Command::new("prometheus")
        .arg(format!("--config.file={}", cfg.display()))
        .arg(format!(
            "--storage.tsdb.path={}",
            dir.join("data").display()
        ))
        .arg(format!("--web.listen-address=127.0.0.1:{port}"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    (Prometheus(child), port)
}

#[test]
fn a_real_prometheus_scrapes_the_worker_count() {
    if !have(
        "prometheus",
        "a_real_prometheus_scrapes_the_worker_count",
        "apt-get install -y prometheus; .ci/run installs it",
    ) {
        return;
    }
    let dir = TempDir::new("prometheus");
    let sock = dir.join("c.sock");
    let port = free_port();
    let mut r = start_hello(3, port, &sock, &["--metrics", "127.0.0.1:0"]);
    let mport = metrics_port(&mut r);
    let (_prom, pport) = start_prometheus(&dir.0, mport);
    eventually("Prometheus reports 3 ready workers", || {
        query(pport, "uvcluster_workers{state=\"ready\"}").as_deref() == Some("3")
    });
    assert_eq!(
        query(pport, "count(uvcluster_worker_up == 1)").as_deref(),
        Some("3")
    );
    assert_eq!(query(pport, "up{job=\"uvcluster\"}").as_deref(), Some("1"));
    // Scaled down, the next scrapes say so.
    let out = ctl(&sock, &["scale", "2"]);
    assert!(out.status.success(), "{out:?}");
    eventually("Prometheus reports 2 ready workers", || {
        query(pport, "uvcluster_workers{state=\"ready\"}").as_deref() == Some("2")
    });
    r.signal(Signal::SIGTERM);
    assert_eq!(r.wait().0, Some(0));
}

/// Reads from `s` to EOF (or to its read timeout): what arrived, and
/// whether the server closed the connection.
fn read_until_closed(s: &mut std::net::TcpStream) -> (String, bool) {
    use std::io::Read;
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return (String::from_utf8_lossy(&got).into_owned(), true),
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {
                return (String::from_utf8_lossy(&got).into_owned(), true);
            }
            Err(_) => return (String::from_utf8_lossy(&got).into_owned(), false),
        }
    }
}

/// An HTTP/0.9 request (`GET /healthz` and a line end, no version: what
/// `echo GET /healthz | nc` sends) used to wait out the 10 s head timeout
/// with nothing said. Now it is answered 400 as soon as its line is in and
/// the connection closed, well before the (2 s) head deadline could have
/// done it; a client that sends half a head gets a 408 at the deadline, a
/// silent one is closed then; 100 slow clients do not delay a probe; curl
/// (as a probe sends it) is answered; and `/healthz` answers throughout.
#[test]
fn http09_request_is_answered_at_once_and_slow_clients_meet_a_short_deadline() {
    let dir = TempDir::new("http09");
    let sock = dir.join("c.sock");
    let port = free_port();
    let mut r = start_hello(1, port, &sock, &["--metrics", "127.0.0.1:0"]);
    let mport = metrics_port(&mut r);
    let connect = || {
        let s = std::net::TcpStream::connect(("127.0.0.1", mport)).unwrap();
        s.set_read_timeout(Some(LIMIT)).unwrap();
        s
    };
    // Before the head deadline: the answer does not come from it.
    let before_deadline = std::time::Duration::from_millis(1900);

    let partial = {
        let mut s = connect();
        s.write_all(b"GET /metrics HTTP/1.1\r\nHost: t\r\n")
            .unwrap();
        s
    };
    let silent = connect();
    for line in ["GET /healthz\r\n", "GET /readyz\n", "hello\r\n"] {
        let mut s = connect();
        s.set_read_timeout(Some(before_deadline)).unwrap();
        let t0 = std::time::Instant::now();
        s.write_all(line.as_bytes()).unwrap();
        let (resp, closed) = read_until_closed(&mut s);
        assert!(
            closed,
            "{line:?}: not closed within {before_deadline:?} (after {:?}): {resp:?}",
            t0.elapsed()
        );
        assert!(
            resp.starts_with("HTTP/1.1 400 Bad Request\r\n"),
            "{line:?}: {resp:?}"
        );
    }
    let mut s = connect();
    s.set_read_timeout(Some(before_deadline)).unwrap();
    s.write_all(b"GET /healthz\r\n").unwrap();
    let (resp, _) = read_until_closed(&mut s);
    assert!(
        resp.ends_with("HTTP/0.9 request (no version): HTTP/1.x only\n"),
        "{resp:?}"
    );
    assert_eq!(get(mport, "/healthz").unwrap(), (200, "ok\n".into()));

    // The slow ones, at the deadline (bounded by the read timeout).
    let (resp, closed) = read_until_closed(&mut { partial });
    assert!(closed, "{resp:?}");
    assert!(
        resp.starts_with("HTTP/1.1 408 Request Timeout\r\n"),
        "{resp:?}"
    );
    let (resp, closed) = read_until_closed(&mut { silent });
    assert!(closed && resp.is_empty(), "{resp:?}");

    // 100 slow clients (more than the 64 served at once), each with half
    // a head sent: a probe is still answered before any deadline, and
    // every slow one is closed (made room for, or given its 408).
    let slow: Vec<std::net::TcpStream> = (0..100)
        .map(|_| {
            let mut s = connect();
            s.write_all(b"GET /metrics HTTP/1.1\r\n").unwrap();
            s
        })
        .collect();
    let mut probe = connect();
    probe.set_read_timeout(Some(before_deadline)).unwrap();
    probe
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n")
        .unwrap();
    let (resp, closed) = read_until_closed(&mut probe);
    assert!(
        closed && resp.starts_with("HTTP/1.1 200 OK\r\n") && resp.ends_with("\r\n\r\nok\n"),
        "{resp:?}"
    );
    for mut s in slow {
        let (resp, closed) = read_until_closed(&mut s);
        assert!(
            closed && (resp.is_empty() || resp.starts_with("HTTP/1.1 408 ")),
            "{resp:?}"
        );
    }

    // What a probe sends: curl's request (HTTP/1.1, Host, User-Agent,
    // Accept), where curl is installed.
    if have("curl", "the curl step", "apt-get install -y curl") {
        let mut c = Command::new("curl");
        c.args(["-sS", "-m", "20", "-w", " %{http_code}"])
            .arg(format!("http://127.0.0.1:{mport}/healthz"));
        let out = wait_output(
            c.stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap(),
        );
        assert_eq!(String::from_utf8_lossy(&out.stdout), "ok\n 200", "{out:?}");
    }
    assert_eq!(get(mport, "/healthz").unwrap(), (200, "ok\n".into()));
    r.signal(Signal::SIGTERM);
    assert_eq!(r.wait().0, Some(0));
}

/// Regression (issue 13): under `--restart never` a slot whose worker
/// exited is `exited` (it will not restart), in the metrics' `state`
/// label, `ctl status` and `--json`; `restarting` stays 0.
#[test]
fn a_slot_not_restarted_under_restart_never_is_exited_not_restarting() {
    let dir = TempDir::new("exited");
    let sock = dir.join("c.sock");
    let port = free_port();
    let mut r = start_hello(
        2,
        port,
        &sock,
        &["--metrics", "127.0.0.1:0", "--restart", "never"],
    );
    let mport = metrics_port(&mut r);
    let pid = status(&sock)["workers"][0]["pid"].as_i64().unwrap();
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), Signal::SIGKILL).unwrap();
    eventually("the slot is exited", || {
        (status(&sock)["workers"].as_array().unwrap().iter())
            .any(|w| w["state"] == "exited" && w["id"].is_null())
    });
    let (code, body) = get(mport, "/metrics").unwrap();
    assert_eq!(code, 200);
    for want in [
        "uvcluster_workers{state=\"exited\"} 1\n",
        "uvcluster_workers{state=\"restarting\"} 0\n",
        "uvcluster_workers{state=\"stopped\"} 0\n",
        "uvcluster_workers{state=\"ready\"} 1\n",
    ] {
        assert!(body.contains(want), "{want:?} in\n{body}");
    }
    let out = ctl(&sock, &["status"]);
    let t = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(t.contains(" exited "), "{t}");
    assert!(!t.contains("restarting"), "{t}");
    assert_eq!(get(port, "/").unwrap().0, 200, "the other worker serves");
    r.signal(Signal::SIGTERM);
    let (code, log) = r.wait();
    assert_eq!(code, Some(0), "{log}");
}
