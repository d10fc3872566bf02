//! `--metrics ADDR`: `/metrics` (the Prometheus text exposition format,
//! version 0.0.4), `/healthz` and `/readyz`, served by a small HTTP/1.1
//! responder on a TCP handle of the primary's own loop. docs/metrics.md
//! lists every metric.
//!
//! The responder reads one request head (at most [`MAX_HEAD`] bytes,
//! within [`HEAD_TIMEOUT`]), answers it and closes the connection
//! (`Connection: close`): it looks only at the request line, so it needs
//! no HTTP parser. A request line that is not HTTP/1.x (an HTTP/0.9
//! `GET /healthz` with no version, or garbage) is answered 400 as soon as
//! the line has arrived, not when the head would end: nothing more is
//! coming, and a probe must not wait out a deadline (Node's own server
//! keeps such a client until its `headersTimeout`; nginx answers HTTP/0.9
//! with a bare body, which cannot carry `/readyz`'s 503). The exposition is written by hand (`render`): a dozen
//! families of plain gauges and counters do not justify a dependency, and
//! `promtool check metrics` checks the result in the tests.

use std::cell::RefCell;
use std::collections::HashMap;
use std::fmt::Write as _;
use std::io;
use std::net::SocketAddr;
use std::rc::Rc;
use std::time::Duration;

use uvcluster::cluster::DispatchStats;
use uvcluster::uv::{BindFlags, Handle, Loop, Tcp, Timer};

use crate::events;
use crate::ops::{Ops, Row};

/// The longest request head read (8 KiB, as nginx's default header
/// buffer); a longer one gets 431 and a close.
pub const MAX_HEAD: usize = 8 * 1024;
/// How long a client may take to send its request head: 2 s. A probe
/// (kubelet, curl, Prometheus) sends its whole head in one write at once,
/// so only a slow or stuck client ever meets it; it then gets a 408 (if it
/// sent anything) and the connection is closed, freeing its place for a
/// probe. It bounds the whole connection: one answered but not yet
/// written out by then (a client that does not read) is closed too. nginx's `client_header_timeout` is 60 s and Node's
/// `headersTimeout` 60 s: they serve users on slow links, this serves
/// machines on a LAN.
pub const HEAD_TIMEOUT: Duration = Duration::from_secs(2);
/// Connections served at once. A connection beyond it takes the place of
/// the oldest one that has not sent its request yet (nginx reuses idle
/// connections the same way when it runs out), so that silent clients
/// cannot keep a probe out; it is closed only when every connection is
/// being answered.
pub const MAX_CONNECTIONS: usize = 64;

/// `--metrics`: `HOST:PORT` (`127.0.0.1:9100`, `[::1]:9100`, port 0 for
/// any), or `:PORT` for every IPv4 interface.
pub fn address(v: &str) -> Result<SocketAddr, String> {
    let full = match v.strip_prefix(':') {
        Some(port) => format!("0.0.0.0:{port}"),
        None => v.to_owned(),
    };
    full.parse()
        .map_err(|_| format!("takes HOST:PORT, such as 127.0.0.1:9100 or :9100. Received {v:?}"))
}

/// What `/metrics` shows, read at once.
#[derive(Debug, Clone, PartialEq)]
pub struct Snapshot {
    /// One row per worker and empty slot.
    pub rows: Vec<Row>,
    /// Reloads completed and failed closed.
    pub reloads: (u64, u64),
    /// Connections handed to workers, the gone ones included.
    pub handed_total: u64,
    /// Worker forks.
    pub forks: u64,
    /// `/readyz`'s answer.
    pub ready: bool,
    /// The primary's dispatchers: queue, handoff latencies, open
    /// connections where known.
    pub dispatch: DispatchStats,
}

/// The states a worker (or empty slot) can be in, as `uvcluster_workers`
/// labels them (each always present, 0 when none).
const STATES: [&str; 7] = [
    "starting",
    "ready",
    "draining",
    "errored",
    "restarting",
    "stopped",
    "exited",
];

fn family(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
}

/// `snapshot` in the Prometheus text format (version 0.0.4).
pub fn render(s: &Snapshot) -> String {
    let mut o = String::new();
    let workers: Vec<&Row> = s.rows.iter().filter(|r| r.id.is_some()).collect();
    let label = |r: &Row| format!("worker=\"{}\",slot=\"{}\"", r.id.unwrap_or(0), r.slot);

    family(&mut o, "uvcluster_up", "gauge", "1 while the primary runs.");
    o.push_str("uvcluster_up 1\n");
    family(
        &mut o,
        "uvcluster_ready",
        "gauge",
        "1 while at least one worker is ready and no stop has begun (/readyz), else 0.",
    );
    let _ = writeln!(o, "uvcluster_ready {}", u8::from(s.ready));
    family(
        &mut o,
        "uvcluster_workers",
        "gauge",
        "Workers and empty slots by state.",
    );
    for st in STATES {
        let n = s.rows.iter().filter(|r| r.state == st).count();
        let _ = writeln!(o, "uvcluster_workers{{state=\"{st}\"}} {n}");
    }
    family(
        &mut o,
        "uvcluster_worker_up",
        "gauge",
        "Per worker: 1 while it is ready and in rotation, else 0.",
    );
    for r in &workers {
        let _ = writeln!(
            o,
            "uvcluster_worker_up{{{}}} {}",
            label(r),
            u8::from(r.state == "ready")
        );
    }
    family(
        &mut o,
        "uvcluster_slot_restarts_total",
        "counter",
        "Per slot: workers restarted after a crash.",
    );
    for r in &s.rows {
        let _ = writeln!(
            o,
            "uvcluster_slot_restarts_total{{slot=\"{}\"}} {}",
            r.slot, r.restarts
        );
    }
    family(
        &mut o,
        "uvcluster_restarts_total",
        "counter",
        "Workers restarted after a crash, every slot.",
    );
    let restarts: u64 = s.rows.iter().map(|r| u64::from(r.restarts)).sum();
    let _ = writeln!(o, "uvcluster_restarts_total {restarts}");
    family(
        &mut o,
        "uvcluster_worker_forks_total",
        "counter",
        "Workers forked: starts, restarts, replacements and scale-ups.",
    );
    let _ = writeln!(o, "uvcluster_worker_forks_total {}", s.forks);
    family(
        &mut o,
        "uvcluster_worker_connections_handed_total",
        "counter",
        "Per worker: connections the primary handed it and it accepted (round-robin policies).",
    );
    for r in &workers {
        let _ = writeln!(
            o,
            "uvcluster_worker_connections_handed_total{{{}}} {}",
            label(r),
            r.connections_handed
        );
    }
    family(
        &mut o,
        "uvcluster_connections_handed_total",
        "counter",
        "Connections the primary handed to workers, those of workers gone included.",
    );
    let _ = writeln!(o, "uvcluster_connections_handed_total {}", s.handed_total);
    family(
        &mut o,
        "uvcluster_worker_resident_memory_bytes",
        "gauge",
        "Per worker: resident memory in bytes (/proc/PID/statm).",
    );
    for r in &workers {
        if let Some(b) = r.rss_bytes {
            let _ = writeln!(
                o,
                "uvcluster_worker_resident_memory_bytes{{{}}} {b}",
                label(r)
            );
        }
    }
    family(
        &mut o,
        "uvcluster_worker_cpu_seconds_total",
        "counter",
        "Per worker: user and system CPU time in seconds (/proc/PID/stat).",
    );
    for r in &workers {
        if let Some(c) = r.cpu_seconds {
            let _ = writeln!(o, "uvcluster_worker_cpu_seconds_total{{{}}} {c}", label(r));
        }
    }
    family(
        &mut o,
        "uvcluster_worker_uptime_seconds",
        "gauge",
        "Per worker: seconds since it was forked.",
    );
    for r in &workers {
        let _ = writeln!(
            o,
            "uvcluster_worker_uptime_seconds{{{}}} {}",
            label(r),
            r.uptime_seconds
        );
    }
    family(
        &mut o,
        "uvcluster_dispatch_queue_length",
        "gauge",
        "Connections the primary accepted that wait for a worker (round-robin policies; \
         0 where the kernel queues them).",
    );
    let _ = writeln!(o, "uvcluster_dispatch_queue_length {}", s.dispatch.queued);
    family(
        &mut o,
        "uvcluster_dispatch_in_flight",
        "gauge",
        "Connections handed to a worker that has not answered yet.",
    );
    let _ = writeln!(o, "uvcluster_dispatch_in_flight {}", s.dispatch.in_flight);
    family(
        &mut o,
        "uvcluster_worker_dispatch_queue_length",
        "gauge",
        "Per worker: connections waiting for it or in flight to it (round-robin policies).",
    );
    for r in &workers {
        if let Some(d) = r.id.and_then(|id| s.dispatch.workers.get(&id)) {
            let _ = writeln!(
                o,
                "uvcluster_worker_dispatch_queue_length{{{}}} {}",
                label(r),
                d.queued
            );
        }
    }
    family(
        &mut o,
        "uvcluster_worker_connections_open",
        "gauge",
        "Per worker: connections it holds open, as it reports them (leastconn); \
         absent where the primary cannot see them.",
    );
    for r in &workers {
        if let Some(n) = r.connections_open {
            let _ = writeln!(o, "uvcluster_worker_connections_open{{{}}} {n}", label(r));
        }
    }
    family(
        &mut o,
        "uvcluster_handoff_latency_seconds",
        "histogram",
        "From handing a connection to a worker to its answer, in seconds (loop clock, \
         millisecond resolution).",
    );
    let h = &s.dispatch.handoff_latency;
    for (le, n) in h.cumulative() {
        let le = le.map_or_else(|| "+Inf".to_owned(), |ms| seconds(ms).to_string());
        let _ = writeln!(
            o,
            "uvcluster_handoff_latency_seconds_bucket{{le=\"{le}\"}} {n}"
        );
    }
    let _ = writeln!(
        o,
        "uvcluster_handoff_latency_seconds_sum {}",
        seconds(h.sum_ms())
    );
    let _ = writeln!(o, "uvcluster_handoff_latency_seconds_count {}", h.count());
    family(
        &mut o,
        "uvcluster_reloads_total",
        "counter",
        "Rolling reloads by outcome: ok (every worker replaced) or failed (failed closed).",
    );
    let _ = writeln!(
        o,
        "uvcluster_reloads_total{{outcome=\"ok\"}} {}",
        s.reloads.0
    );
    let _ = writeln!(
        o,
        "uvcluster_reloads_total{{outcome=\"failed\"}} {}",
        s.reloads.1
    );
    o
}

/// Milliseconds as seconds.
fn seconds(ms: u64) -> f64 {
    ms as f64 / 1000.0
}

/// What a request line is.
#[derive(Debug, PartialEq)]
enum Line<'a> {
    /// `METHOD TARGET HTTP/1.x`: the head goes on to a blank line.
    Http1 { method: &'a str, target: &'a str },
    /// `METHOD TARGET`: HTTP/0.9, no head follows.
    Http09,
    /// Three words, but another version.
    NotHttp1,
    /// Anything else.
    Malformed,
}

/// Reads a request line (its line end trimmed or not).
fn request_line(line: &str) -> Line<'_> {
    let mut words = line.trim_end_matches(['\r', '\n']).split(' ');
    let token = |w: &str| !w.is_empty() && w.bytes().all(|b| b.is_ascii_graphic());
    match (words.next(), words.next(), words.next(), words.next()) {
        (Some(m), Some(t), None, None) if token(m) && t.starts_with('/') => Line::Http09,
        (Some(m), Some(t), Some(v), None) if token(m) && token(t) => {
            if v.starts_with("HTTP/1.") {
                Line::Http1 {
                    method: m,
                    target: t,
                }
            } else {
                Line::NotHttp1
            }
        }
        _ => Line::Malformed,
    }
}

/// A response: status line, content type, body.
fn respond(ops: &Ops, lp: &Loop, head: &[u8]) -> (&'static str, &'static str, String, bool) {
    const TEXT: &str = "text/plain; charset=utf-8";
    let line_end = head.iter().position(|&b| b == b'\n').unwrap_or(head.len());
    let line = String::from_utf8_lossy(&head[..line_end]);
    let (method, target) = match request_line(&line) {
        Line::Http1 { method, target } => (method, target),
        Line::Http09 => {
            return (
                "400 Bad Request",
                TEXT,
                "HTTP/0.9 request (no version): HTTP/1.x only\n".into(),
                false,
            );
        }
        Line::NotHttp1 => return ("400 Bad Request", TEXT, "HTTP/1.x only\n".into(), false),
        Line::Malformed => return ("400 Bad Request", TEXT, "bad request line\n".into(), false),
    };
    let head_only = method == "HEAD";
    if method != "GET" && !head_only {
        return (
            "405 Method Not Allowed",
            TEXT,
            "GET or HEAD only\n".into(),
            false,
        );
    }
    let path = target.split('?').next().unwrap_or("");
    match path {
        "/metrics" => {
            let snap = Snapshot {
                rows: ops.rows(lp),
                reloads: ops.reloads(),
                handed_total: ops.handed_total(),
                forks: ops.forks(),
                ready: ops.ready(lp),
                dispatch: ops.dispatch(lp),
            };
            (
                "200 OK",
                "text/plain; version=0.0.4; charset=utf-8",
                render(&snap),
                head_only,
            )
        }
        "/healthz" => ("200 OK", TEXT, "ok\n".into(), head_only),
        "/readyz" if ops.ready(lp) => ("200 OK", TEXT, "ready\n".into(), head_only),
        "/readyz" => (
            "503 Service Unavailable",
            TEXT,
            if ops.stopping() {
                "stopping\n".into()
            } else {
                "no worker ready\n".into()
            },
            head_only,
        ),
        _ => (
            "404 Not Found",
            TEXT,
            "not found: /metrics, /healthz, /readyz\n".into(),
            head_only,
        ),
    }
}

struct Conn {
    head: Vec<u8>,
    timer: Handle<Timer>,
    answered: bool,
    /// Accepted at (loop time, ms): the oldest silent one makes room.
    since: u64,
}

struct Inner {
    ops: Ops,
    listener: Option<Handle<Tcp>>,
    conns: HashMap<Handle<Tcp>, Conn>,
}

/// The metrics and probes server. Cheap to clone.
#[derive(Clone)]
pub struct Metrics {
    inner: Rc<RefCell<Inner>>,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

impl Metrics {
    /// Listens on `addr`; returns the server and the address it listens
    /// on (the real port for port 0).
    ///
    /// # Errors
    ///
    /// The errors of binding and listening.
    pub fn start(lp: &mut Loop, ops: Ops, addr: SocketAddr) -> io::Result<(Metrics, SocketAddr)> {
        let h = lp.tcp_init();
        let m = Metrics {
            inner: Rc::new(RefCell::new(Inner {
                ops,
                listener: None,
                conns: HashMap::new(),
            })),
        };
        let me = m.clone();
        let res = lp.tcp_bind(h, addr, BindFlags::default()).and_then(|()| {
            lp.tcp_listen(h, 128, move |lp, _, r| match r {
                Ok(c) => me.accept(lp, c),
                Err(e) => log::warn!(target: events::TARGET, "metrics: {e}"),
            })
        });
        let bound = res.and_then(|()| lp.tcp_getsockname(h));
        let bound = match bound {
            Ok(a) => a,
            Err(e) => {
                lp.close_if_open(h);
                return Err(e);
            }
        };
        lp.unref_handle(h)?;
        m.inner.borrow_mut().listener = Some(h);
        log::info!(
            target: events::TARGET,
            "metrics on http://{bound}/metrics (probes /healthz, /readyz)"
        );
        Ok((m, bound))
    }

    /// Closes the listener and every connection.
    pub fn close(&self, lp: &mut Loop) {
        let (l, conns) = {
            let mut i = self.inner.borrow_mut();
            (i.listener.take(), std::mem::take(&mut i.conns))
        };
        if let Some(l) = l {
            lp.close_if_open(l);
        }
        for (h, c) in conns {
            lp.close_if_open(c.timer);
            lp.close_if_open(h);
        }
    }

    fn accept(&self, lp: &mut Loop, c: Handle<Tcp>) {
        if self.inner.borrow().conns.len() >= MAX_CONNECTIONS {
            let oldest_silent = (self.inner.borrow().conns.iter())
                .filter(|(_, conn)| !conn.answered)
                .min_by_key(|(_, conn)| conn.since)
                .map(|(&h, _)| h);
            match oldest_silent {
                Some(old) => self.drop_conn(lp, old),
                None => {
                    lp.close_if_open(c);
                    return;
                }
            }
        }
        let timer = lp.timer_init();
        let _ = lp.unref_handle(timer);
        self.inner.borrow_mut().conns.insert(
            c,
            Conn {
                head: Vec::new(),
                timer,
                answered: false,
                since: lp.now(),
            },
        );
        let me = self.clone();
        let _ = lp.timer_start(timer, HEAD_TIMEOUT, Duration::ZERO, move |lp, _| {
            me.timed_out(lp, c);
        });
        let me = self.clone();
        let r = lp.read_start(c, move |lp, c, r| match r {
            Ok([]) | Err(_) => me.drop_conn(lp, c),
            Ok(data) => me.received(lp, c, data),
        });
        if r.is_err() {
            self.drop_conn(lp, c);
        }
    }

    /// The head deadline passed: a client that sent part of a head gets
    /// a 408 (as Node's `headersTimeout` answers), a silent one is closed.
    fn timed_out(&self, lp: &mut Loop, c: Handle<Tcp>) {
        let partial = {
            let mut i = self.inner.borrow_mut();
            match i.conns.get_mut(&c) {
                Some(conn) if !conn.answered && !conn.head.is_empty() => {
                    conn.answered = true;
                    true
                }
                _ => false,
            }
        };
        if !partial {
            self.drop_conn(lp, c);
            return;
        }
        self.answer(
            lp,
            c,
            (
                "408 Request Timeout",
                "text/plain; charset=utf-8",
                format!("request head not received within {HEAD_TIMEOUT:?}\n"),
                false,
            ),
        );
    }

    fn drop_conn(&self, lp: &mut Loop, c: Handle<Tcp>) {
        let conn = self.inner.borrow_mut().conns.remove(&c);
        if let Some(conn) = conn {
            lp.close_if_open(conn.timer);
        }
        lp.close_if_open(c);
    }

    fn received(&self, lp: &mut Loop, c: Handle<Tcp>, data: &[u8]) {
        let head = {
            let mut i = self.inner.borrow_mut();
            let Some(conn) = i.conns.get_mut(&c) else {
                return;
            };
            if conn.answered {
                return;
            }
            conn.head.extend_from_slice(data);
            let end = find(&conn.head, b"\r\n\r\n").or_else(|| find(&conn.head, b"\n\n"));
            // A first line that is not HTTP/1.x ends the request there.
            let first_line_only = conn.head.iter().position(|&b| b == b'\n').is_some_and(|n| {
                n <= MAX_HEAD
                    && !matches!(
                        request_line(&String::from_utf8_lossy(&conn.head[..n])),
                        Line::Http1 { .. }
                    )
            });
            match end {
                _ if first_line_only => Some(std::mem::take(&mut conn.head)),
                Some(n) if n <= MAX_HEAD => Some(std::mem::take(&mut conn.head)),
                None if conn.head.len() <= MAX_HEAD => return,
                // Longer than the limit, ended or not.
                _ => None,
            }
        };
        let response = match &head {
            Some(h) => {
                let ops = self.inner.borrow().ops.clone();
                respond(&ops, lp, h)
            }
            None => (
                "431 Request Header Fields Too Large",
                "text/plain; charset=utf-8",
                "request head too large\n".into(),
                false,
            ),
        };
        if let Some(conn) = self.inner.borrow_mut().conns.get_mut(&c) {
            conn.answered = true;
        }
        self.answer(lp, c, response);
    }

    /// Writes a response and closes the connection once it is written.
    fn answer(
        &self,
        lp: &mut Loop,
        c: Handle<Tcp>,
        (status, ctype, body, head_only): (&str, &str, String, bool),
    ) {
        let _ = lp.read_stop(c);
        let mut resp = format!(
            "HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\n\
             Cache-Control: no-store\r\nConnection: close\r\n\r\n",
            body.len()
        );
        if !head_only {
            resp.push_str(&body);
        }
        let me = self.clone();
        if lp
            .write(c, &[resp.as_bytes()], move |lp, c, _| me.drop_conn(lp, c))
            .is_err()
        {
            self.drop_conn(lp, c);
        }
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

#[cfg(test)]
mod tests {
    use uvcluster::cluster::{LatencyHistogram, WorkerDispatch};

    use super::*;

    fn row(id: Option<u32>, slot: usize, state: &str) -> Row {
        Row {
            id,
            pid: id.map(|i| 1000 + i as i32),
            slot,
            state: state.into(),
            uptime_seconds: 1.5,
            restarts: 2,
            connections_handed: 7,
            connections_open: None,
            rss_bytes: Some(4096),
            cpu_seconds: Some(0.25),
            cpu_percent: Some(1.0),
        }
    }

    #[test]
    fn renders_every_family_with_help_and_type() {
        let s = Snapshot {
            rows: vec![
                row(Some(1), 0, "ready"),
                row(Some(3), 1, "starting"),
                row(None, 2, "errored"),
            ],
            reloads: (4, 1),
            handed_total: 20,
            forks: 9,
            ready: true,
            dispatch: DispatchStats {
                queued: 4,
                in_flight: 1,
                handoff_latency: {
                    let mut h = LatencyHistogram::default();
                    h.record(3);
                    h.record(40);
                    h.record(7000);
                    h
                },
                workers: [(
                    1,
                    WorkerDispatch {
                        queued: 2,
                        open: Some(5),
                    },
                )]
                .into(),
            },
        };
        let mut rows = s.rows.clone();
        rows[0].connections_open = Some(5);
        let s = Snapshot { rows, ..s };
        let t = render(&s);
        assert!(t.contains("uvcluster_dispatch_queue_length 4\n"), "{t}");
        assert!(t.contains("uvcluster_dispatch_in_flight 1\n"), "{t}");
        assert!(
            t.contains("uvcluster_worker_dispatch_queue_length{worker=\"1\",slot=\"0\"} 2\n"),
            "{t}"
        );
        assert!(!t.contains("uvcluster_worker_dispatch_queue_length{worker=\"3\""));
        assert!(
            t.contains("uvcluster_worker_connections_open{worker=\"1\",slot=\"0\"} 5\n"),
            "{t}"
        );
        assert!(!t.contains("uvcluster_worker_connections_open{worker=\"3\""));
        for want in [
            "uvcluster_handoff_latency_seconds_bucket{le=\"0.001\"} 0\n",
            "uvcluster_handoff_latency_seconds_bucket{le=\"0.005\"} 1\n",
            "uvcluster_handoff_latency_seconds_bucket{le=\"0.05\"} 2\n",
            "uvcluster_handoff_latency_seconds_bucket{le=\"5\"} 2\n",
            "uvcluster_handoff_latency_seconds_bucket{le=\"+Inf\"} 3\n",
            "uvcluster_handoff_latency_seconds_sum 7.043\n",
            "uvcluster_handoff_latency_seconds_count 3\n",
            "# TYPE uvcluster_handoff_latency_seconds histogram\n",
        ] {
            assert!(t.contains(want), "{want:?} in\n{t}");
        }
        assert!(t.contains("uvcluster_workers{state=\"ready\"} 1\n"), "{t}");
        assert!(
            t.contains("uvcluster_workers{state=\"errored\"} 1\n"),
            "{t}"
        );
        assert!(
            t.contains("uvcluster_workers{state=\"draining\"} 0\n"),
            "{t}"
        );
        assert!(t.contains("uvcluster_worker_up{worker=\"1\",slot=\"0\"} 1\n"));
        assert!(t.contains("uvcluster_worker_up{worker=\"3\",slot=\"1\"} 0\n"));
        assert!(t.contains("uvcluster_restarts_total 6\n"));
        assert!(t.contains("uvcluster_reloads_total{outcome=\"failed\"} 1\n"));
        assert!(t.contains("uvcluster_connections_handed_total 20\n"));
        assert!(
            t.contains("uvcluster_worker_resident_memory_bytes{worker=\"1\",slot=\"0\"} 4096\n")
        );
        // Every sample's family has HELP and TYPE before it.
        for line in t.lines().filter(|l| !l.starts_with('#')) {
            let mut name = line.split(['{', ' ']).next().unwrap();
            for suffix in ["_bucket", "_sum", "_count"] {
                if let Some(base) = name.strip_suffix(suffix)
                    && t.contains(&format!("# TYPE {base} histogram\n"))
                {
                    name = base;
                }
            }
            assert!(t.contains(&format!("# TYPE {name} ")), "{name}");
            assert!(t.contains(&format!("# HELP {name} ")), "{name}");
        }
    }

    #[test]
    fn request_lines() {
        assert_eq!(
            request_line("GET /metrics HTTP/1.1\r\n"),
            Line::Http1 {
                method: "GET",
                target: "/metrics"
            }
        );
        assert_eq!(request_line("GET /healthz\r\n"), Line::Http09);
        assert_eq!(request_line("GET /healthz"), Line::Http09);
        assert_eq!(request_line("GET /healthz HTTP/2.0\n"), Line::NotHttp1);
        assert_eq!(request_line("\r\n"), Line::Malformed);
        assert_eq!(request_line("hello\n"), Line::Malformed);
        assert_eq!(request_line("GET  /x HTTP/1.1"), Line::Malformed);
        assert_eq!(request_line("GET /x HTTP/1.1 more"), Line::Malformed);
    }

    #[test]
    fn addresses() {
        assert_eq!(address(":9100"), Ok("0.0.0.0:9100".parse().unwrap()));
        assert_eq!(address("[::1]:0"), Ok("[::1]:0".parse().unwrap()));
        assert!(address("localhost").is_err());
    }
}
