//! A closed-loop HTTP/1.1 load generator on uvcluster's own loop, used by
//! the dispatch bench and the comparison with Node (`compare`): N
//! connections, each sending its next request as soon as the previous
//! response is complete, for a fixed duration.
//!
//! Workloads: keep-alive, one request per connection (`Connection: close`,
//! the connection-churn case where dispatch matters most), and a mix in
//! which every k-th request asks the server to take some milliseconds
//! (`GET /block/<ms>` or `GET /spin/<ms>`, a handler that keeps its worker's
//! loop busy), where dispatch by load should win.
//!
//! Every latency is measured from writing the request to the end of the
//! response; for one request per connection the connect happens first (the
//! kernel completes it before the server accepts, so waiting to be
//! accepted and dispatched counts).

use std::cell::RefCell;
use std::collections::{BTreeMap, HashMap};
use std::io;
use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use uvcluster::uv::{Handle, Loop, RunMode, Tcp};

/// What the generated requests look like.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Workload {
    /// Keep-alive: many requests per connection.
    KeepAlive,
    /// One request per connection (`Connection: close`).
    Close,
    /// One request per connection, where every `every`-th request is
    /// slow: the server's handler keeps its loop busy for `ms`
    /// milliseconds, so the worker serving it cannot serve anything else
    /// meanwhile.
    SlowMix {
        /// One slow request in this many.
        every: u32,
        /// How long a slow request takes, in ms.
        ms: u32,
        /// How the slow handler keeps its loop busy.
        slow: Slow,
    },
}

impl Workload {
    /// The slow-handler mix of the benchmarks and the comparison: one
    /// request in 200 blocks its worker's loop for 10 ms.
    pub const SLOW_MIX: Workload = Workload::SlowMix {
        every: 200,
        ms: 10,
        slow: Slow::Block,
    };
}

/// How a slow request of [`Workload::SlowMix`] keeps its worker busy.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Slow {
    /// `GET /block/<ms>`: the handler blocks its loop without using the
    /// CPU, as a synchronous file read, DNS lookup or lock wait does. What
    /// the other requests see then depends only on where the dispatcher
    /// sends them, not on how many cores the machine has.
    Block,
    /// `GET /spin/<ms>`: the handler keeps a CPU busy (a synchronous
    /// computation). On a machine with few cores the spinning worker also
    /// slows every other process, dispatcher or not.
    Spin,
}

impl Slow {
    /// The path prefix the server recognises.
    pub fn path(self) -> &'static str {
        match self {
            Slow::Block => "/block/",
            Slow::Spin => "/spin/",
        }
    }
}

/// Keeps the load generator and the servers it measures off each other's
/// CPUs: the generator (one thread, [`run`]) gets the first CPU this
/// process may use, the servers the rest.
///
/// Sharing CPUs, the generator's connects and reads (which on loopback
/// also carry the server side's TCP handshake) compete with the servers,
/// so a figure mixes the server's capacity with how much CPU the
/// generator leaves it, which in turn depends on the server's speed.
/// Split, every server gets the same CPUs and the generator none of them:
/// the figures are the servers' capacity on those CPUs. Linux only.
#[derive(Clone, Debug)]
pub struct CpuSplit {
    load: usize,
    servers: Vec<usize>,
}

impl CpuSplit {
    /// The split of the CPUs the calling thread may use, or `None` where
    /// there are fewer than two or affinity is not supported.
    pub fn new() -> Option<CpuSplit> {
        let cpus = crate::cpu::allowed_cpus().ok()?;
        let (&load, servers) = cpus.split_first()?;
        (!servers.is_empty()).then(|| CpuSplit {
            load,
            servers: servers.to_vec(),
        })
    }

    /// The split the benchmarks use: [`new`](Self::new), unless the
    /// environment says `UVCLUSTER_PIN=0` (share all CPUs) or affinity
    /// cannot be set (logged). The calling thread is on the generator's
    /// CPU when it returns a split.
    pub fn from_env() -> Option<CpuSplit> {
        if std::env::var("UVCLUSTER_PIN").is_ok_and(|v| v == "0") {
            return None;
        }
        let split = CpuSplit::new()?;
        match split.pin_load() {
            Ok(()) => Some(split),
            Err(e) => {
                log::warn!("cannot set CPU affinity ({e}): load generator and servers share CPUs");
                None
            }
        }
    }

    /// The generator's CPU.
    pub fn load_cpu(&self) -> usize {
        self.load
    }

    /// The servers' CPUs.
    pub fn server_cpus(&self) -> &[usize] {
        &self.servers
    }

    /// Spawns a server on the servers' CPUs (its own children inherit
    /// them), then moves the calling thread to the generator's CPU, where
    /// [`run`] should follow.
    ///
    /// # Errors
    ///
    /// `sched_setaffinity`'s, or the spawn's.
    pub fn spawn(&self, cmd: &mut std::process::Command) -> io::Result<std::process::Child> {
        crate::cpu::set_cpus(&self.servers)?;
        let child = cmd.spawn();
        self.pin_load()?;
        child
    }

    /// Moves the calling thread to the generator's CPU.
    fn pin_load(&self) -> io::Result<()> {
        crate::cpu::set_cpus(&[self.load])
    }
}

impl std::fmt::Display for CpuSplit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let servers: Vec<String> = self.servers.iter().map(usize::to_string).collect();
        write!(
            f,
            "load generator on CPU {}, servers on CPU {}",
            self.load,
            servers.join(",")
        )
    }
}

/// A load run's parameters.
#[derive(Clone, Debug)]
pub struct LoadConfig {
    /// The server.
    pub addr: SocketAddr,
    /// Concurrent connections.
    pub connections: usize,
    /// How long to generate load.
    pub duration: Duration,
    /// The requests.
    pub workload: Workload,
}

/// What a run with [`run_with`] does besides generating load: a timeout
/// per request, an early stop, a pause after a failure, and the worker
/// each response names. [`run`] uses the default: none of them.
#[derive(Clone, Debug, Default)]
pub struct RunOptions {
    /// A request without a complete response this long after it was sent
    /// (for one request per connection: after the connect began) is a
    /// [`Failures::timeout`]: its connection is closed and replaced.
    /// `None`: wait for ever (a server that never answers hangs the run).
    pub timeout: Option<Duration>,
    /// Set from another thread to end the run before its duration: no new
    /// request starts, those in flight end (answered, failed or timed
    /// out). Checked every few milliseconds.
    pub stop: Option<Arc<AtomicBool>>,
    /// How long a connection slot waits after a failure before it
    /// connects again. Zero (the default) reconnects at once, which
    /// against a server that refuses every connection turns the closed
    /// loop into a busy loop counting refusals; a few milliseconds count
    /// failed requests at a rate a client would see.
    pub retry_delay: Duration,
    /// A response header naming the process that answered (such as
    /// `x-worker-pid`): each response's value is recorded in `pids`.
    pub pid_header: Option<String>,
    /// Start at most this many requests (for one request per connection:
    /// connections), then let those in flight end: a fixed amount of
    /// work, for counting a server's instructions per connection
    /// (`bench/scripts/instr_per_conn.sh`). `None`: until the duration
    /// ends.
    pub max_requests: Option<u64>,
    /// Where the answering processes are recorded, live (another thread
    /// may read it during the run, to see a new worker serve).
    pub pids: Option<SeenPids>,
}

/// The processes that answered a run, by pid (see
/// [`RunOptions::pid_header`]), shared with other threads.
pub type SeenPids = Arc<Mutex<BTreeMap<u32, PidSeen>>>;

/// When a process was seen answering.
#[derive(Clone, Copy, Debug)]
pub struct PidSeen {
    /// Its first complete response.
    pub first: Instant,
    /// Its latest complete response.
    pub last: Instant,
    /// Its complete responses.
    pub responses: u64,
}

/// The failed requests of a run, by what went wrong. Each failed request
/// counts once, under the first thing that went wrong with it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Failures {
    /// The connect failed (refused, or any other connect error).
    pub connect: u64,
    /// The connection was reset (`ECONNRESET`, `EPIPE` or another read or
    /// write error) before the response was complete.
    pub reset: u64,
    /// No complete response within [`RunOptions::timeout`].
    pub timeout: u64,
    /// A complete response whose status was not 200.
    pub status: u64,
    /// The server closed the connection before the response was complete
    /// (including before any of it: a keep-alive connection closed by the
    /// server as the next request was sent counts here).
    pub short: u64,
    /// A response that is not HTTP/1.1, has no length, or is longer than
    /// the generator keeps (1 MiB).
    pub malformed: u64,
}

impl Failures {
    /// Every failed request.
    pub fn total(&self) -> u64 {
        self.connect + self.reset + self.timeout + self.status + self.short + self.malformed
    }
}

impl std::fmt::Display for Failures {
    /// `connect=0 reset=0 timeout=0 status=0 short=0 malformed=0`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "connect={} reset={} timeout={} status={} short={} malformed={}",
            self.connect, self.reset, self.timeout, self.status, self.short, self.malformed
        )
    }
}

/// What a run measured.
#[derive(Clone, Debug, Default)]
pub struct LoadReport {
    /// Complete responses with status 200.
    pub requests: u64,
    /// Failed requests: [`failures`](Self::failures)`.total()`.
    pub errors: u64,
    /// The failed requests by kind.
    pub failures: Failures,
    /// Wall time of the run, in seconds.
    pub secs: f64,
    /// `requests / secs`.
    pub rps: f64,
    /// Median latency, µs.
    pub p50_us: u64,
    /// 99th percentile latency, µs.
    pub p99_us: u64,
    /// Worst latency, µs.
    pub max_us: u64,
    /// 99th percentile latency of the requests that were not slow, µs:
    /// in the slow-handler mix, what the slow requests cost everyone else
    /// (the same as `p99_us` for the other workloads).
    pub fast_p99_us: u64,
}

/// Jain's fairness index of `xs`: 1.0 when all are equal, `1/n` when one
/// takes everything.
pub fn jain(xs: &[f64]) -> f64 {
    let sum: f64 = xs.iter().sum();
    let sq: f64 = xs.iter().map(|x| x * x).sum();
    if xs.is_empty() || sq == 0.0 {
        return 1.0;
    }
    sum * sum / (xs.len() as f64 * sq)
}

struct State {
    cfg: LoadConfig,
    opts: RunOptions,
    end: Instant,
    latencies: Vec<u32>,
    /// Latencies of the requests that were not slow (slow-handler mix).
    fast: Vec<u32>,
    failures: Failures,
    seq: u64,
    /// Connections started ([`RunOptions::max_requests`]).
    started: u64,
    /// Every open connection, and when its current request began (for
    /// the timeout). A connection that is not in it has been finished:
    /// whatever callback of it still runs is ignored.
    live: HashMap<Handle<Tcp>, Instant>,
}

/// What went wrong with a request (see [`Failures`]).
#[derive(Clone, Copy, Debug)]
enum Kind {
    Connect,
    Reset,
    Timeout,
    Status,
    Short,
    Malformed,
}

impl State {
    fn fail(&mut self, kind: Kind) {
        let f = &mut self.failures;
        match kind {
            Kind::Connect => f.connect += 1,
            Kind::Reset => f.reset += 1,
            Kind::Timeout => f.timeout += 1,
            Kind::Status => f.status += 1,
            Kind::Short => f.short += 1,
            Kind::Malformed => f.malformed += 1,
        }
    }
}

/// Runs the load on this thread (with its own [`Loop`]) and reports.
///
/// # Errors
///
/// The loop's own errors; connection failures are counted in
/// [`LoadReport::errors`], not returned.
pub fn run(cfg: LoadConfig) -> io::Result<LoadReport> {
    run_with(cfg, RunOptions::default())
}

/// [`run`], with a timeout per request, an early stop, a pause after each
/// failure and the answering pids recorded, as `opts` asks.
///
/// # Errors
///
/// The loop's own errors; failed requests are counted in
/// [`LoadReport::failures`], not returned.
pub fn run_with(cfg: LoadConfig, opts: RunOptions) -> io::Result<LoadReport> {
    let mut lp = Loop::new()?;
    let start = Instant::now();
    let st = Rc::new(RefCell::new(State {
        end: start + cfg.duration,
        latencies: Vec::with_capacity(1 << 20),
        fast: Vec::new(),
        failures: Failures::default(),
        seq: 0,
        started: 0,
        live: HashMap::new(),
        cfg: cfg.clone(),
        opts: opts.clone(),
    }));
    if opts.timeout.is_some() || opts.stop.is_some() {
        // One sweep for every connection, rather than a timer each: it
        // neither keeps the loop alive (unreferenced) nor fires more than
        // every few milliseconds.
        let every = opts
            .timeout
            .map_or(Duration::from_millis(10), |t| t / 4)
            .clamp(Duration::from_millis(1), Duration::from_millis(10));
        let sweep = lp.timer_init();
        let st2 = st.clone();
        lp.timer_start(sweep, every, every, move |lp, _| sweep_once(lp, &st2))?;
        lp.unref_handle(sweep)?;
    }
    for _ in 0..cfg.connections {
        connect(&mut lp, st.clone());
    }
    lp.run(RunMode::Default)?;
    let secs = start.elapsed().as_secs_f64();
    let mut s = st.borrow_mut();
    s.latencies.sort_unstable();
    s.fast.sort_unstable();
    let pct = |xs: &[u32], p: f64| -> u64 {
        if xs.is_empty() {
            return 0;
        }
        let i = ((xs.len() as f64 - 1.0) * p).round() as usize;
        xs[i] as u64
    };
    let fast_p99_us = if matches!(s.cfg.workload, Workload::SlowMix { .. }) {
        pct(&s.fast, 0.99)
    } else {
        pct(&s.latencies, 0.99)
    };
    Ok(LoadReport {
        requests: s.latencies.len() as u64,
        errors: s.failures.total(),
        failures: s.failures,
        secs,
        rps: s.latencies.len() as f64 / secs,
        p50_us: pct(&s.latencies, 0.50),
        p99_us: pct(&s.latencies, 0.99),
        fast_p99_us,
        max_us: s.latencies.last().copied().unwrap_or(0) as u64,
    })
}

/// The sweep: ends the run early when asked to, and fails the requests
/// that have waited longer than the timeout.
fn sweep_once(lp: &mut Loop, st: &Rc<RefCell<State>>) {
    let now = Instant::now();
    let expired: Vec<Handle<Tcp>> = {
        let mut s = st.borrow_mut();
        if s.opts
            .stop
            .as_ref()
            .is_some_and(|f| f.load(Ordering::Relaxed))
            && now < s.end
        {
            s.end = now;
        }
        match s.opts.timeout {
            Some(limit) => (s.live.iter())
                .filter(|(_, began)| now.duration_since(**began) >= limit)
                .map(|(t, _)| *t)
                .collect(),
            None => Vec::new(),
        }
    };
    for t in expired {
        fail(lp, st, t, Kind::Timeout);
    }
}

/// The next request, and whether it is a slow one.
fn request(st: &State) -> (Vec<u8>, bool) {
    let (path, slow) = match st.cfg.workload {
        Workload::SlowMix { every, ms, slow }
            if every > 0 && st.seq.is_multiple_of(every as u64) =>
        {
            (format!("{}{ms}", slow.path()), true)
        }
        _ => ("/".into(), false),
    };
    let conn = match st.cfg.workload {
        Workload::KeepAlive => "keep-alive",
        _ => "close",
    };
    let req = format!("GET {path} HTTP/1.1\r\nHost: bench\r\nConnection: {conn}\r\n\r\n");
    (req.into_bytes(), slow)
}

fn connect(lp: &mut Loop, st: Rc<RefCell<State>>) {
    {
        let mut s = st.borrow_mut();
        if Instant::now() >= s.end || s.opts.max_requests.is_some_and(|m| s.seq >= m) {
            return;
        }
        if s.cfg.workload != Workload::KeepAlive
            && s.opts.max_requests.is_some_and(|m| s.started >= m)
        {
            return;
        }
        s.started += 1;
    }
    let addr = st.borrow().cfg.addr;
    let t = lp.tcp_init();
    st.borrow_mut().live.insert(t, Instant::now());
    let st2 = st.clone();
    let r = lp.tcp_connect(t, addr, move |lp, t, r| {
        if !st2.borrow().live.contains_key(&t) {
            return;
        }
        if r.is_err() {
            fail(lp, &st2, t, Kind::Connect);
            return;
        }
        let _ = lp.tcp_nodelay(t, true);
        send(lp, &st2, t);
    });
    if r.is_err() {
        fail(lp, &st, t, Kind::Connect);
    }
}

fn send(lp: &mut Loop, st: &Rc<RefCell<State>>, t: Handle<Tcp>) {
    let (req, slow) = {
        let mut s = st.borrow_mut();
        s.seq += 1;
        // Keep-alive: the timeout counts from this request; one request
        // per connection: from the connect, which the server's accept
        // (and dispatch) completes.
        if s.cfg.workload == Workload::KeepAlive {
            s.live.insert(t, Instant::now());
        }
        request(&s)
    };
    let sent = Instant::now();
    if lp.write(t, &[&req], |_, _, _| {}).is_err() {
        fail(lp, st, t, Kind::Reset);
        return;
    }
    let mut buf: Vec<u8> = Vec::new();
    let st2 = st.clone();
    let r = lp.read_start(t, move |lp, t, r| {
        if !st2.borrow().live.contains_key(&t) {
            return;
        }
        let data = match r {
            Ok(d) if !d.is_empty() => d,
            Ok(_) => return fail(lp, &st2, t, Kind::Short),
            Err(_) => return fail(lp, &st2, t, Kind::Reset),
        };
        buf.extend_from_slice(data);
        // A response is re-parsed per read until complete: bounding what
        // is kept bounds both the memory and that work (a server under
        // test answering without end is an error, not a wait).
        if buf.len() > MAX_RESPONSE {
            return fail(lp, &st2, t, Kind::Malformed);
        }
        let pid_header = st2.borrow().opts.pid_header.clone();
        match response_head(&buf, pid_header.as_deref()) {
            Ok(Some(head)) if buf.len() >= head.len => {
                if head.status != 200 {
                    // The response is complete: the connection could go
                    // on, but the request failed; start afresh.
                    return fail(lp, &st2, t, Kind::Status);
                }
                let now = Instant::now();
                let lat = sent.elapsed().as_micros().min(u32::MAX as u128) as u32;
                let keep = {
                    let mut s = st2.borrow_mut();
                    s.latencies.push(lat);
                    // Kept apart only where there are slow ones.
                    if !slow && matches!(s.cfg.workload, Workload::SlowMix { .. }) {
                        s.fast.push(lat);
                    }
                    if let (Some(pid), Some(pids)) = (head.pid, &s.opts.pids) {
                        let mut pids = pids.lock().unwrap_or_else(|e| e.into_inner());
                        let seen = pids.entry(pid).or_insert(PidSeen {
                            first: now,
                            last: now,
                            responses: 0,
                        });
                        seen.last = now;
                        seen.responses += 1;
                    }
                    // A keep-alive client honours `Connection: close` (a
                    // draining server sends it): the next request goes on
                    // a new connection, as RFC 9112 section 9.6 asks.
                    s.cfg.workload == Workload::KeepAlive
                        && now < s.end
                        && !head.close
                        && s.opts.max_requests.is_none_or(|m| s.seq < m)
                };
                let _ = lp.read_stop(t);
                if keep {
                    send(lp, &st2, t);
                } else {
                    finish(lp, &st2, t, false);
                }
            }
            Ok(_) => {}
            Err(()) => fail(lp, &st2, t, Kind::Malformed),
        }
    });
    if r.is_err() {
        fail(lp, st, t, Kind::Reset);
    }
}

/// The most of one response the generator keeps (bytes); a longer one
/// counts as an error. The workloads' responses are a few hundred bytes.
const MAX_RESPONSE: usize = 1 << 20;

/// What the generator reads from a response's head.
#[derive(Debug, PartialEq, Eq)]
struct Head {
    /// The full length of the response, head and body.
    len: usize,
    status: u16,
    /// The value of the pid header, if asked for and present.
    pid: Option<u32>,
    /// The server said `Connection: close`.
    close: bool,
}

/// The full length of the first response in `buf` once its headers are
/// complete: `Ok(None)` while they are not, `Err` if malformed.
#[cfg(test)]
fn response_len(buf: &[u8]) -> Result<Option<usize>, ()> {
    response_head(buf, None).map(|h| h.map(|h| h.len))
}

/// The head of the first response in `buf` once its headers are complete
/// (its full length, status and the `pid_header`'s value): `Ok(None)`
/// while they are not, `Err` if malformed.
fn response_head(buf: &[u8], pid_header: Option<&str>) -> Result<Option<Head>, ()> {
    let mut headers = [httparse::EMPTY_HEADER; 16];
    let mut resp = httparse::Response::new(&mut headers);
    match resp.parse(buf) {
        Ok(httparse::Status::Complete(n)) => {
            let header = |name: &str| {
                resp.headers
                    .iter()
                    .find(|h| h.name.eq_ignore_ascii_case(name))
                    .map(|h| h.value)
            };
            let pid = pid_header
                .and_then(header)
                .and_then(|v| std::str::from_utf8(v).ok()?.trim().parse().ok());
            let status = resp.code.ok_or(())?;
            let len = if header("transfer-encoding")
                .is_some_and(|v| v.eq_ignore_ascii_case(b"chunked"))
            {
                match chunked_len(&buf[n..])? {
                    Some(l) => n + l,
                    None => return Ok(None),
                }
            } else {
                n + header("content-length")
                    .and_then(|v| std::str::from_utf8(v).ok()?.trim().parse::<usize>().ok())
                    .ok_or(())?
            };
            // `Connection: close`: the server ends the connection after
            // this answer; a client opens a new one for its next request.
            let close = header("connection").is_some_and(|v| {
                v.split(|&b| b == b',')
                    .any(|t| t.trim_ascii().eq_ignore_ascii_case(b"close"))
            });
            Ok(Some(Head {
                len,
                status,
                pid,
                close,
            }))
        }
        Ok(httparse::Status::Partial) => Ok(None),
        Err(_) => Err(()),
    }
}

/// The length of a chunked body (Node's default framing), trailers not
/// supported: `Ok(None)` until the last chunk has arrived.
fn chunked_len(body: &[u8]) -> Result<Option<usize>, ()> {
    let mut off = 0;
    loop {
        let Some(eol) = body[off..].windows(2).position(|w| w == b"\r\n") else {
            return Ok(None);
        };
        let line = std::str::from_utf8(&body[off..off + eol]).map_err(|_| ())?;
        let size = usize::from_str_radix(line.split(';').next().unwrap_or("").trim(), 16)
            .map_err(|_| ())?;
        off += eol + 2;
        if size == 0 {
            return Ok((body.len() >= off + 2).then_some(off + 2));
        }
        off += size + 2;
        if off > body.len() {
            return Ok(None);
        }
    }
}

/// Counts a failed request of kind `kind` on `t` and finishes it.
fn fail(lp: &mut Loop, st: &Rc<RefCell<State>>, t: Handle<Tcp>, kind: Kind) {
    st.borrow_mut().fail(kind);
    finish(lp, st, t, true);
}

/// Closes `t` and, while the run lasts, replaces it (closed loop): at
/// once, or after [`RunOptions::retry_delay`] when it `failed`.
fn finish(lp: &mut Loop, st: &Rc<RefCell<State>>, t: Handle<Tcp>, failed: bool) {
    lp.close_if_open(t);
    let delay = {
        let mut s = st.borrow_mut();
        s.live.remove(&t);
        s.opts.retry_delay
    };
    if failed && !delay.is_zero() {
        let pause = lp.timer_init();
        let st2 = st.clone();
        let started = lp.timer_start(pause, delay, Duration::ZERO, move |lp, p| {
            lp.close_if_open(p);
            connect(lp, st2.clone());
        });
        if started.is_ok() {
            return;
        }
        lp.close_if_open(pause);
    }
    connect(lp, st.clone());
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cpus_allowed_list(status: &str) -> String {
        (status.lines())
            .find_map(|l| l.strip_prefix("Cpus_allowed_list:"))
            .unwrap()
            .trim()
            .to_string()
    }

    /// The split covers the allowed CPUs, the generator's apart; a process
    /// spawned through it runs on the servers' CPUs only, and the calling
    /// thread ends on the generator's.
    #[test]
    fn cpu_split_places_servers_and_generator() {
        // On a thread of its own: the split pins the calling thread.
        std::thread::spawn(cpu_split_check).join().unwrap();
    }

    fn cpu_split_check() {
        let allowed = crate::cpu::allowed_cpus().unwrap();
        let Some(split) = CpuSplit::new() else {
            assert!(allowed.len() < 2, "no split of {allowed:?}");
            return;
        };
        assert!(!split.server_cpus().contains(&split.load_cpu()));
        let mut all = split.server_cpus().to_vec();
        all.push(split.load_cpu());
        all.sort_unstable();
        assert_eq!(all, allowed);
        let out = split
            .spawn(
                std::process::Command::new("cat")
                    .arg("/proc/self/status")
                    .stdout(std::process::Stdio::piped()),
            )
            .unwrap()
            .wait_with_output()
            .unwrap();
        let child = cpus_allowed_list(&String::from_utf8_lossy(&out.stdout));
        let ids: Vec<usize> = (child.split(','))
            .flat_map(|r| match r.split_once('-') {
                Some((a, b)) => (a.parse().unwrap()..=b.parse().unwrap()).collect::<Vec<usize>>(),
                None => vec![r.parse().unwrap()],
            })
            .collect();
        assert_eq!(ids, split.server_cpus());
        assert_eq!(crate::cpu::allowed_cpus().unwrap(), [split.load_cpu()]);
        assert!(
            split
                .to_string()
                .contains(&format!("CPU {}", split.load_cpu()))
        );
    }

    #[test]
    fn jain_index() {
        assert!((jain(&[1.0, 1.0, 1.0]) - 1.0).abs() < 1e-9);
        assert!((jain(&[1.0, 0.0]) - 0.5).abs() < 1e-9);
        assert!((jain(&[17.0, 19.5]) - 0.995).abs() < 0.001);
    }

    #[test]
    fn response_length() {
        let r = b"HTTP/1.1 200 OK\r\nContent-Length: 12\r\n\r\nhello world\n";
        assert_eq!(response_len(r), Ok(Some(r.len())));
        assert_eq!(response_len(&r[..10]), Ok(None));
        assert_eq!(response_len(b"HTTP/1.1 200 OK\r\n\r\n"), Err(()));
        let c =
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nc\r\nhello world\n\r\n0\r\n\r\n";
        assert_eq!(response_len(c), Ok(Some(c.len())));
        assert_eq!(response_len(&c[..c.len() - 1]), Ok(None));
    }

    #[test]
    fn response_status_and_pid() {
        let r = b"HTTP/1.1 503 Busy\r\nX-Worker-Pid: 4242\r\nContent-Length: 0\r\n\r\n";
        let head = response_head(r, Some("x-worker-pid")).unwrap().unwrap();
        assert_eq!(
            head,
            Head {
                len: r.len(),
                status: 503,
                pid: Some(4242),
                close: false,
            }
        );
        let c = b"HTTP/1.1 200 OK\r\nConnection: keep-alive, Close\r\nContent-Length: 0\r\n\r\n";
        assert!(response_head(c, None).unwrap().unwrap().close);
        assert_eq!(response_head(r, None).unwrap().unwrap().pid, None);
        assert_eq!(
            response_head(r, Some("x-other")).unwrap().unwrap().pid,
            None
        );
    }

    #[test]
    fn failures_total_and_display() {
        let f = Failures {
            connect: 1,
            reset: 2,
            timeout: 3,
            status: 4,
            short: 5,
            malformed: 6,
        };
        assert_eq!(f.total(), 21);
        assert_eq!(
            f.to_string(),
            "connect=1 reset=2 timeout=3 status=4 short=5 malformed=6"
        );
    }
}
