//! The same program as Node's reference cluster server
//! (`bench/reference/node-baseline/server.js`): an HTTP/1.1 hello world on
//! `PORT` (default 8000) served by `WORKERS` workers (default: the number
//! of CPUs), with the policy from `NODE_CLUSTER_SCHED_POLICY`. On SIGUSR2
//! the primary prints each worker's connection and request counts as one
//! JSON line keyed by worker id, `{"1":{"conns":3,"reqs":5},...}` (Node's
//! reference server prints the connection counts alone, `{"1":3,...}`).
//!
//! Once every worker listens the primary prints `ready` on stdout (and the
//! port on stderr). A bad `PORT` (Node's `ERR_SOCKET_BAD_PORT`), `WORKERS`
//! or `NODE_CLUSTER_SCHED_POLICY` is an error before anything starts; a
//! worker that cannot listen (the port is in use) ends the primary with
//! that error and exit code 1.
//!
//! SIGINT/SIGTERM is a graceful stop, as Node's `http.Server.close()` makes
//! it: idle keep-alive connections are closed (once they have been idle for
//! `IDLE_GRACE_MS`, default 500, so that a request already on its way on a
//! connection that went idle a moment ago is answered, not lost; one whose
//! request has arrived unread is answered whatever the grace), a request in
//! progress is answered with `Connection: close`, and the program exits
//! when the last one has ended. While it waits, the primary says every few
//! seconds which workers it waits for; a second signal (not a duplicate
//! delivery within 500 ms), or a first SIGQUIT, kills them at once and the
//! primary exits with code 1; the kill timeout (`KILL_TIMEOUT_MS`,
//! default 30 s) kills them too.
//!
//! The primary runs on the supervisor (`uvcluster::supervisor`): a worker
//! that crashes is restarted with backoff, SIGHUP reloads the workers one
//! at a time without losing a connection, SIGTTIN/SIGTTOU add or remove a
//! worker, and each lifecycle event is one `cluster_hello:` line on stderr.
//!
//! Requests are read as Node's HTTP parser bounds them: a request line and
//! headers of 16 KiB or more (`--max-http-header-size`) are answered `431`,
//! a malformed request `400`, over-long chunk extensions `413`, each with
//! `Connection: close`; nothing from a client is buffered beyond that, and
//! a header arriving in pieces is scanned once, not re-parsed per read.
//! Bodies (`Content-Length` or chunked) are read and dropped.
//!
//! Run as a worker under any primary (ours or Node's, with
//! `process.execPath` set to this binary) it serves on `PORT`. With
//! `WORKERS=0` one process serves, without a cluster.
//!
//! `cargo run --release --example cluster_hello`

use std::cell::{Cell, RefCell};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::io;
use std::process::ExitCode;
use std::rc::Rc;
use std::time::{Duration, Instant};

use serde_json::json;
use uvcluster::cluster::{self, Primary, SchedulingPolicy, Settings, Worker};
use uvcluster::net::{self, ListenOptions, Server};
use uvcluster::supervisor::{LifecycleEvent, Supervisor, SupervisorConfig};
use uvcluster::uv::{Handle, Loop, RunMode, Signum, Stream, Tcp};

const RESPONSE_KEEP_ALIVE: &[u8] =
    b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 12\r\n\r\nhello world\n";
/// How long a connection must have been idle before a graceful stop
/// closes it (`net::Server::set_idle_grace`), unless `IDLE_GRACE_MS` says
/// otherwise.
const IDLE_GRACE: Duration = Duration::from_millis(500);

const RESPONSE_CLOSE: &[u8] = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 12\r\nConnection: close\r\n\r\nhello world\n";

/// Node's `--max-http-header-size` default. Node answers `431` once the
/// URL, the header names and the header values of one request add up to
/// this many bytes (llhttp counts those, not the method, the version, the
/// separators or the line ends); so does this server.
const MAX_HEADER_SIZE: usize = 16 * 1024;
/// The raw bytes one request line and headers may take, separators and
/// padding included. Node's parser streams and buffers nothing, so it
/// needs no such bound; this one buffers an unfinished header, and four
/// times the counted limit leaves room for every ordinary request Node
/// takes.
const MAX_HEADER_BYTES: usize = 4 * MAX_HEADER_SIZE;
/// Node's bound on a chunked body's chunk extensions (`413` beyond).
const MAX_CHUNK_EXTENSIONS: usize = 16 * 1024;
/// How long a connection refused with `400`/`413`/`431` keeps reading
/// (and dropping) what the client still sends after the answer and a FIN,
/// so that closing with unread input does not reset the connection before
/// the client has read the answer.
const LINGER_MS: u64 = 1000;
/// The most answer bytes queued for a client that does not read them
/// before its requests are no longer read (1 MiB).
const MAX_QUEUED_ANSWERS: usize = 1 << 20;
/// How often a primary waiting for its workers to stop says so.
const STILL_WAITING_MS: u64 = 5000;

fn main() -> ExitCode {
    env_logger::init();
    match run() {
        Ok(code) => code,
        Err(e) => {
            eprintln!("cluster_hello: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run() -> io::Result<ExitCode> {
    let port = net::port_from_env("PORT", 8000)?;
    let mut lp = Loop::new()?;
    let exit_code = Rc::new(Cell::new(0u8));
    match cluster::setup_worker(&mut lp)? {
        Some(worker) => {
            run_worker(&mut lp, port, Some(worker), |_, _| {})?;
        }
        None => match workers_from_env()? {
            // WORKERS=0: no cluster, one process serves (the limit of the
            // machine for the dispatch benchmarks).
            Some(0) => run_single(&mut lp, port)?,
            n => {
                policy_from_env()?;
                window_from_env()?;
                idle_grace_from_env()?;
                let n = n
                    .unwrap_or_else(|| std::thread::available_parallelism().map_or(2, |n| n.get()));
                run_primary(&mut lp, n, exit_code.clone())?;
            }
        },
    }
    lp.run(RunMode::Default)?;
    Ok(ExitCode::from(exit_code.get()))
}

/// `WORKERS`: a whole number, 0 for one process without a cluster; `None`
/// when it is not set (one worker per CPU).
/// The most workers `WORKERS` may ask for: far more than any machine this
/// runs on has CPUs, and few enough that a typo (an extra digit, `-1`
/// read as a huge number) is an error rather than a fork storm.
const MAX_WORKERS: usize = 4096;

fn workers_from_env() -> io::Result<Option<usize>> {
    let Some(v) = std::env::var_os("WORKERS") else {
        return Ok(None);
    };
    let v = v.to_string_lossy();
    let t = v.trim();
    match t.parse::<usize>() {
        Ok(n) if n <= MAX_WORKERS && t.bytes().all(|b| b.is_ascii_digit()) => Ok(Some(n)),
        _ => Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "WORKERS should be a whole number of workers (0: one process, no cluster), at most {MAX_WORKERS}. Received {v:?}"
            ),
        )),
    }
}

/// `NODE_CLUSTER_SCHED_POLICY`, when set, must name a policy (Node falls
/// back to round-robin on anything else, silently).
fn policy_from_env() -> io::Result<()> {
    match std::env::var("NODE_CLUSTER_SCHED_POLICY") {
        Ok(v) if SchedulingPolicy::parse(&v).is_none() => Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "NODE_CLUSTER_SCHED_POLICY should be rr, none, reuseport or leastconn. Received {v:?}"
            ),
        )),
        _ => Ok(()),
    }
}

/// `UVCLUSTER_HANDOFF_WINDOW`, when set, must be a window the primary
/// takes (it reads the variable itself, and would only log a bad one).
fn window_from_env() -> io::Result<()> {
    match std::env::var(cluster::HANDOFF_WINDOW_ENV) {
        Ok(v) => cluster::parse_handoff_window(&v).map(|_| ()),
        Err(_) => Ok(()),
    }
}

/// Serves HTTP on `port`. `on_listening` runs once the server listens; a
/// failed listen prints the error, tells the primary (if any) and exits 1.
fn run_worker(
    lp: &mut Loop,
    port: u16,
    worker: Option<Worker>,
    on_listening: impl FnOnce(&mut Loop, Server) + 'static,
) -> io::Result<Server> {
    let conns = Rc::new(Cell::new(0u64));
    let reqs = Rc::new(Cell::new(0u64));
    let (c, r) = (conns.clone(), reqs.clone());
    let server = Server::new(lp, move |lp, server, conn| {
        c.set(c.get() + 1);
        match conn {
            Stream::Tcp(t) => HttpConn::start(lp, server, t, r.clone()),
            other => server.close_connection(lp, other),
        }
    });
    // A reload or a stop drains this worker: a keep-alive connection that
    // has just been answered (or handed over, its request not yet read)
    // stays open a moment, so that the request its client is already
    // sending is answered with `Connection: close` instead of meeting a
    // closed socket.
    server.set_idle_grace(lp, idle_grace_from_env()?);
    if let Some(worker) = &worker {
        worker.on_message(lp, move |lp, w, msg, handle| {
            // A handle sent with a message is ours to close.
            if let Some(h) = handle {
                lp.close_if_open(h);
            }
            if msg == json!("count") {
                let counts = json!({ "conns": conns.get(), "reqs": reqs.get() });
                let _ = w.send(lp, &counts, None);
            }
        });
    }
    server.listen(lp, ListenOptions::port(port), move |lp, server, r| {
        let e = match r {
            Ok(_) => return on_listening(lp, server),
            Err(e) => e,
        };
        eprintln!("worker {}: {e}", std::process::id());
        // A primary of ours reports the error and stops; any primary sees
        // the exit code.
        let sent = worker.as_ref().map(|w| {
            w.send_with_callback(
                lp,
                &json!({ "listenError": e.to_string() }),
                None,
                |_, _| std::process::exit(1),
            )
        });
        if !matches!(sent, Some(Ok(()))) {
            std::process::exit(1);
        }
    })?;
    Ok(server)
}

/// `WORKERS=0`: one process serves; the first SIGINT/SIGTERM closes the
/// server gracefully (the loop then ends by itself), a second one exits.
fn run_single(lp: &mut Loop, port: u16) -> io::Result<()> {
    let server = run_worker(lp, port, None, |lp, server| {
        println!("ready");
        if let Some(p) = server.address(lp).and_then(|a| a.port()) {
            eprintln!("cluster_hello: listening on port {p}");
        }
    })?;
    let stopping = Rc::new(Cell::new(false));
    for signum in [Signum::SIGINT, Signum::SIGTERM] {
        let sig = lp.signal_init();
        let (server, stopping) = (server, stopping.clone());
        lp.signal_start(sig, signum, move |lp, _, _| {
            if stopping.replace(true) {
                std::process::exit(1);
            }
            eprintln!(
                "cluster_hello: closing; {} connection(s) open",
                server.connections(lp)
            );
            server.close(lp, |_, _| {});
        })?;
        lp.unref_handle(sig)?;
    }
    Ok(())
}

// ----- one HTTP/1.1 connection ----------------------------------------------

/// Why a request is refused: Node's answers, byte for byte
/// (lib/_http_server.js `badRequestResponse` and its siblings).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Reject {
    BadRequest,
    HeaderTooLarge,
    ExtensionsTooLarge,
}

impl Reject {
    fn response(self) -> &'static [u8] {
        match self {
            Reject::BadRequest => b"HTTP/1.1 400 Bad Request\r\nConnection: close\r\n\r\n",
            Reject::HeaderTooLarge => {
                b"HTTP/1.1 431 Request Header Fields Too Large\r\nConnection: close\r\n\r\n"
            }
            Reject::ExtensionsTooLarge => {
                b"HTTP/1.1 413 Payload Too Large\r\nConnection: close\r\n\r\n"
            }
        }
    }
}

/// A request's head, parsed: what the handler and the framing need.
#[derive(Debug)]
struct Head {
    /// The connection ends after this request's response.
    close: bool,
    body: Body,
    /// `GET /sleep/<ms>`: answer after that long (the slow-handler
    /// workload of the dispatch benchmarks).
    sleep_ms: u64,
    /// `GET /spin/<ms>`: keep the CPU (and so this worker's loop) busy
    /// that long.
    spin_ms: u64,
    /// `GET /block/<ms>`: block this worker's loop that long without
    /// using the CPU, as a synchronous file or lock wait does.
    block_ms: u64,
}

/// What of a request body is still to be read (and dropped).
#[derive(Debug, Default)]
enum Body {
    #[default]
    None,
    Length(u64),
    Chunked(Chunked),
    /// A framing the request may not use (a `Transfer-Encoding` whose last
    /// coding is not chunked): llhttp reports it once the head has been
    /// handed to the handler, so the request is answered and then the
    /// connection closed.
    Invalid,
}

/// Parses a complete request head at the start of `buf` (one `httparse`
/// pass); `None` if `buf` holds only part of one.
fn parse_head(buf: &[u8]) -> Result<Option<(usize, Head)>, Reject> {
    // Never look further than a head may reach: a longer one is refused
    // by the scan, and the fallback below sizes its header array by this.
    let buf = &buf[..buf.len().min(MAX_HEADER_BYTES + 1)];
    let mut headers = [httparse::EMPTY_HEADER; 64];
    let mut req = httparse::Request::new(&mut headers);
    match req.parse(buf) {
        Ok(httparse::Status::Complete(n)) => head_of(&req, n).map(|h| Some((n, h))),
        Ok(httparse::Status::Partial) => Ok(None),
        Err(httparse::Error::TooManyHeaders) => {
            // Rare: more headers than the array holds. A header takes a
            // line, so this many lines is always enough.
            let lines = buf.iter().filter(|&&b| b == b'\n').count();
            let mut headers = vec![httparse::EMPTY_HEADER; lines];
            let mut req = httparse::Request::new(&mut headers);
            match req.parse(buf) {
                Ok(httparse::Status::Complete(n)) => head_of(&req, n).map(|h| Some((n, h))),
                Ok(httparse::Status::Partial) => Ok(None),
                Err(_) => Err(Reject::BadRequest),
            }
        }
        Err(_) => Err(Reject::BadRequest),
    }
}

fn head_of(req: &httparse::Request<'_, '_>, len: usize) -> Result<Head, Reject> {
    let path = req.path.unwrap_or("");
    let counted = path.len()
        + req
            .headers
            .iter()
            .map(|h| h.name.len() + h.value.len())
            .sum::<usize>();
    if counted >= MAX_HEADER_SIZE || len > MAX_HEADER_BYTES {
        return Err(Reject::HeaderTooLarge);
    }
    let has =
        |name: &'static str, token: &[u8]| tokens(req, name).any(|t| t.eq_ignore_ascii_case(token));
    let close = match req.version {
        Some(0) => !has("connection", b"keep-alive"),
        _ => has("connection", b"close"),
    };
    let lengths: Vec<&[u8]> = tokens(req, "content-length").collect();
    let body = if tokens(req, "transfer-encoding").next().is_some() {
        // RFC 9112 6.1: chunked must be the last coding of a request, and
        // Content-Length beside Transfer-Encoding is refused (as llhttp
        // does).
        let last_chunked = tokens(req, "transfer-encoding")
            .last()
            .is_some_and(|t| t.eq_ignore_ascii_case(b"chunked"));
        if !lengths.is_empty() {
            return Err(Reject::BadRequest);
        }
        if last_chunked {
            Body::Chunked(Chunked::default())
        } else {
            Body::Invalid
        }
    } else if let Some(first) = lengths.first() {
        let parse = |t: &[u8]| {
            std::str::from_utf8(t)
                .ok()
                .filter(|s| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()))
                .and_then(|s| s.parse::<u64>().ok())
        };
        let n = parse(first).ok_or(Reject::BadRequest)?;
        if lengths.iter().any(|t| parse(t) != Some(n)) {
            return Err(Reject::BadRequest);
        }
        if n == 0 { Body::None } else { Body::Length(n) }
    } else {
        Body::None
    };
    let ms = |prefix: &str| {
        path.strip_prefix(prefix)
            .map_or(0, |ms| ms.parse().unwrap_or(0))
    };
    Ok(Head {
        close,
        body,
        sleep_ms: ms("/sleep/"),
        spin_ms: ms("/spin/"),
        block_ms: ms("/block/"),
    })
}

/// The comma-separated values of every header `name` (RFC 9110 5.3).
fn tokens<'a>(
    req: &'a httparse::Request<'_, '_>,
    name: &'a str,
) -> impl Iterator<Item = &'a [u8]> + 'a {
    req.headers
        .iter()
        .filter(move |h| h.name.eq_ignore_ascii_case(name))
        .flat_map(|h| h.value.split(|&b| b == b','))
        .map(|t| t.trim_ascii())
}

/// Where the scan of a request head stands.
#[derive(Clone, Copy, Debug, Default)]
enum At {
    #[default]
    Method,
    Url,
    Version,
    Name,
    Ows,
    Value,
}

/// The incremental scan of a request head that arrives in pieces: each
/// byte is looked at once, whatever the number of reads, and counted as
/// llhttp counts it toward Node's limit. Only a complete head is parsed.
#[derive(Debug, Default)]
struct HeadScan {
    at: At,
    /// Raw bytes of the head so far.
    len: usize,
    /// URL, header-name and header-value bytes so far.
    counted: usize,
    /// The current line has a byte other than CR.
    line_has_content: bool,
}

enum Scanned {
    /// The head ends after this many bytes of the input.
    Complete(usize),
    /// All of the input belongs to the head, which goes on.
    Partial,
    TooLarge,
}

impl HeadScan {
    fn scan(&mut self, data: &[u8]) -> Scanned {
        for (i, &b) in data.iter().enumerate() {
            self.len += 1;
            match b {
                b'\n' => {
                    match self.at {
                        // Empty lines before a request are ignored.
                        At::Method if !self.line_has_content => {}
                        At::Method | At::Url | At::Version => self.at = At::Name,
                        _ if !self.line_has_content => return Scanned::Complete(i + 1),
                        _ => self.at = At::Name,
                    }
                    self.line_has_content = false;
                }
                b'\r' => {}
                _ => {
                    self.line_has_content = true;
                    match self.at {
                        At::Method if b == b' ' => self.at = At::Url,
                        At::Url if b == b' ' => self.at = At::Version,
                        At::Name if b == b':' => self.at = At::Ows,
                        At::Ows if b == b' ' || b == b'\t' => {}
                        At::Ows => {
                            self.at = At::Value;
                            self.counted += 1;
                        }
                        At::Url | At::Name | At::Value => self.counted += 1,
                        At::Method | At::Version => {}
                    }
                }
            }
            if self.counted >= MAX_HEADER_SIZE || self.len > MAX_HEADER_BYTES {
                return Scanned::TooLarge;
            }
        }
        Scanned::Partial
    }
}

/// Where the skipping of a chunked body stands.
#[derive(Debug, Default)]
enum ChunkAt {
    #[default]
    Size,
    Extensions,
    Data,
    DataCr,
    DataLf,
    Trailers,
}

/// Skips a chunked body (RFC 9112 7.1) byte by byte, data in bulk,
/// buffering nothing.
#[derive(Debug, Default)]
struct Chunked {
    at: ChunkAt,
    size: u64,
    digits: u32,
    /// Whitespace followed the size's digits: no more digits may come.
    after_ws: bool,
    extensions: usize,
    trailers: usize,
    line_has_content: bool,
}

impl Chunked {
    /// Consumes what of `data` belongs to the body: `Ok((n, true))` when
    /// the body ended after `n` bytes.
    fn skip(&mut self, data: &[u8]) -> Result<(usize, bool), Reject> {
        let mut i = 0;
        while i < data.len() {
            if let ChunkAt::Data = self.at {
                let k = (data.len() - i).min(usize::try_from(self.size).unwrap_or(usize::MAX));
                i += k;
                self.size -= k as u64;
                if self.size == 0 {
                    self.at = ChunkAt::DataCr;
                }
                continue;
            }
            let b = data[i];
            i += 1;
            match self.at {
                ChunkAt::Size | ChunkAt::Extensions if b == b'\n' => {
                    if self.digits == 0 {
                        return Err(Reject::BadRequest);
                    }
                    self.digits = 0;
                    self.after_ws = false;
                    self.at = if self.size == 0 {
                        ChunkAt::Trailers
                    } else {
                        ChunkAt::Data
                    };
                }
                ChunkAt::Size | ChunkAt::Extensions if b == b'\r' => {}
                ChunkAt::Size => match (b as char).to_digit(16) {
                    Some(d) if self.digits < 16 && !self.after_ws => {
                        self.size = self.size * 16 + u64::from(d);
                        self.digits += 1;
                    }
                    None if b == b';' => self.at = ChunkAt::Extensions,
                    None if b == b' ' || b == b'\t' => self.after_ws = true,
                    _ => return Err(Reject::BadRequest),
                },
                ChunkAt::Extensions => {
                    self.extensions += 1;
                    if self.extensions > MAX_CHUNK_EXTENSIONS {
                        return Err(Reject::ExtensionsTooLarge);
                    }
                }
                ChunkAt::DataCr if b == b'\r' => self.at = ChunkAt::DataLf,
                ChunkAt::DataCr | ChunkAt::DataLf if b == b'\n' => self.at = ChunkAt::Size,
                ChunkAt::DataCr | ChunkAt::DataLf => return Err(Reject::BadRequest),
                ChunkAt::Trailers => match b {
                    b'\n' if !self.line_has_content => return Ok((i, true)),
                    b'\n' => self.line_has_content = false,
                    b'\r' => {}
                    _ => {
                        self.line_has_content = true;
                        self.trailers += 1;
                        if self.trailers >= MAX_HEADER_SIZE {
                            return Err(Reject::HeaderTooLarge);
                        }
                    }
                },
                ChunkAt::Data => unreachable!("handled above"),
            }
        }
        Ok((i, false))
    }
}

/// What one read's worth of requests asks for.
#[derive(Clone, Copy, Debug, Default)]
struct Batch {
    /// Requests to answer, in order.
    answers: usize,
    /// The last one ends the connection.
    close: bool,
    /// Answer after this long.
    sleep_ms: u64,
    /// A request that cannot be answered; answered after the others.
    reject: Option<Reject>,
}

/// One HTTP/1.1 connection: each complete request (pipelining allowed) is
/// answered; `Connection: close`, HTTP/1.0 without keep-alive, or the
/// server closing ends the connection after the response. Between
/// requests the connection is marked idle, so that a graceful close of
/// the server closes it at once.
struct HttpConn {
    server: Server,
    t: Handle<Tcp>,
    reqs: Rc<Cell<u64>>,
    /// The head received so far, when it spans reads; never more than
    /// `MAX_HEADER_BYTES`.
    head: Vec<u8>,
    scan: HeadScan,
    body: Body,
    /// What the server was last told.
    idle: bool,
    /// Answers written whose write has not completed yet. While one is in
    /// flight a refusal gets no answer of its own, only the close: Node
    /// answers `400`/`431` only when no response is in progress on the
    /// socket (lib/_http_server.js `socketOnError`).
    writing: usize,
    /// Reading stopped because the client does not read its answers (more
    /// than `MAX_QUEUED_ANSWERS` waiting); the write callback resumes it.
    paused: bool,
}

type HttpRef = Rc<RefCell<HttpConn>>;

impl HttpConn {
    fn start(lp: &mut Loop, server: Server, t: Handle<Tcp>, reqs: Rc<Cell<u64>>) {
        let st = Rc::new(RefCell::new(HttpConn {
            server,
            t,
            reqs,
            head: Vec::new(),
            scan: HeadScan::default(),
            body: Body::None,
            idle: false,
            writing: 0,
            paused: false,
        }));
        // No request yet: idle, as Node counts a new connection.
        set_idle(lp, &st, true);
        if start_reading(lp, st).is_err() {
            server.close_connection(lp, Stream::Tcp(t));
        }
    }

    /// Nothing of a request is pending: no partial head, no body left.
    fn between_requests(&self) -> bool {
        self.head.is_empty() && self.scan.len == 0 && matches!(self.body, Body::None)
    }

    /// Reads requests from `data`; runs their handlers (spin, block) in
    /// order and says what to answer.
    fn feed(&mut self, data: &[u8]) -> Batch {
        let mut batch = Batch::default();
        let mut off = 0;
        while off < data.len() && !batch.close && batch.reject.is_none() {
            let rest = &data[off..];
            match &mut self.body {
                Body::None => {}
                Body::Invalid => unreachable!("a refusal ends the batch"),
                Body::Length(left) => {
                    let k = (rest.len() as u64).min(*left);
                    *left -= k;
                    if *left == 0 {
                        self.body = Body::None;
                    }
                    off += k as usize;
                    continue;
                }
                Body::Chunked(c) => {
                    match c.skip(rest) {
                        Ok((k, done)) => {
                            off += k;
                            if done {
                                self.body = Body::None;
                            }
                        }
                        Err(r) => {
                            batch.reject = Some(r);
                            break;
                        }
                    }
                    continue;
                }
            }
            let head = match self.take_head(rest) {
                Ok(Some((k, head))) => {
                    off += k;
                    head
                }
                Ok(None) => break,
                Err(r) => {
                    batch.reject = Some(r);
                    break;
                }
            };
            if head.spin_ms > 0 {
                let until = Instant::now() + Duration::from_millis(head.spin_ms);
                while Instant::now() < until {
                    std::hint::spin_loop();
                }
            }
            if head.block_ms > 0 {
                std::thread::sleep(Duration::from_millis(head.block_ms));
            }
            batch.sleep_ms = batch.sleep_ms.max(head.sleep_ms);
            batch.close = head.close;
            batch.answers += 1;
            self.reqs.set(self.reqs.get() + 1);
            self.body = head.body;
            if let Body::Invalid = self.body {
                batch.reject = Some(Reject::BadRequest);
            }
        }
        batch
    }

    /// The next request head from `data`: `Some((bytes used, head))`, or
    /// `None` when all of `data` was kept as part of an unfinished head.
    fn take_head(&mut self, data: &[u8]) -> Result<Option<(usize, Head)>, Reject> {
        if self.scan.len == 0 {
            // The common case: a whole head in one read, parsed in place.
            if let Some(done) = parse_head(data)? {
                return Ok(Some(done));
            }
        }
        match self.scan.scan(data) {
            Scanned::TooLarge => Err(Reject::HeaderTooLarge),
            Scanned::Partial => {
                self.head.extend_from_slice(data);
                Ok(None)
            }
            Scanned::Complete(k) => {
                self.head.extend_from_slice(&data[..k]);
                let parsed = parse_head(&self.head);
                let len = self.head.len();
                self.head.clear();
                self.scan = HeadScan::default();
                match parsed? {
                    Some((n, head)) if n == len => Ok(Some((k, head))),
                    _ => Err(Reject::BadRequest),
                }
            }
        }
    }
}

fn set_idle(lp: &mut Loop, st: &HttpRef, idle: bool) {
    let (server, t) = {
        let mut c = st.borrow_mut();
        if c.idle == idle {
            return;
        }
        c.idle = idle;
        (c.server, c.t)
    };
    // The connection is the server's until its handle closes.
    let _ = server.set_idle(lp, Stream::Tcp(t), idle);
}

fn start_reading(lp: &mut Loop, st: HttpRef) -> io::Result<()> {
    let t = st.borrow().t;
    lp.read_start(t, move |lp, t, r| on_read(lp, &st, t, r))
}

fn on_read(lp: &mut Loop, st: &HttpRef, t: Handle<Tcp>, r: io::Result<&[u8]>) {
    let data = match r {
        Ok(d) if !d.is_empty() => d,
        _ => {
            lp.close_if_open(t);
            return;
        }
    };
    set_idle(lp, st, false);
    let batch = st.borrow_mut().feed(data);
    if batch.reject.is_none() && batch.sleep_ms > 0 {
        // Answer later; read nothing meanwhile, so answers keep their order.
        let _ = lp.read_stop(t);
        let timer = lp.timer_init();
        let st = st.clone();
        let _ = lp.timer_start(
            timer,
            Duration::from_millis(batch.sleep_ms),
            Duration::ZERO,
            move |lp, timer| {
                lp.close_if_open(timer);
                if !lp.is_closing(t) {
                    answer(lp, &st, t, batch, true);
                }
            },
        );
        return;
    }
    answer(lp, st, t, batch, false);
}

/// Writes a batch's answers, then ends the connection, or goes on reading
/// (`resume`: reading was stopped) and marks it idle when no request is
/// pending. The server closing makes the last answer `Connection: close`.
fn answer(lp: &mut Loop, st: &HttpRef, t: Handle<Tcp>, batch: Batch, resume: bool) {
    let (server, in_flight) = {
        let c = st.borrow();
        (c.server, c.writing > 0 || batch.answers > 0)
    };
    let close = batch.close || server.is_closing(lp);
    // A refusal is answered only when no answer is in flight.
    let reject_answer = batch.reject.filter(|_| !in_flight).map(Reject::response);
    if batch.answers > 0 {
        let mut resp = Vec::with_capacity(batch.answers * RESPONSE_CLOSE.len());
        for i in 0..batch.answers {
            let last = i + 1 == batch.answers;
            resp.extend_from_slice(if last && close && batch.reject.is_none() {
                RESPONSE_CLOSE
            } else {
                RESPONSE_KEEP_ALIVE
            });
        }
        let done = st.clone();
        if lp
            .write(t, &[&resp], move |lp, t, _| answers_written(lp, &done, t))
            .is_ok()
        {
            st.borrow_mut().writing += 1;
        }
    } else if let Some(r) = reject_answer {
        let _ = lp.write(t, &[r], |_, _, _| {});
    }
    if batch.reject.is_some() {
        return linger_close(lp, t);
    }
    if close && (batch.answers > 0 || st.borrow().between_requests()) {
        let _ = lp.read_stop(t);
        return end_connection(lp, t);
    }
    if resume && start_reading(lp, st.clone()).is_err() {
        lp.close_if_open(t);
        return;
    }
    if st.borrow().between_requests() {
        set_idle(lp, st, true);
    }
    if lp.write_queue_size(t) > MAX_QUEUED_ANSWERS {
        // A client that pipelines requests and does not read the answers:
        // read nothing more from it until they drain (Node pauses the
        // socket the same way once its buffer is full), so what it costs
        // is bounded.
        let _ = lp.read_stop(t);
        st.borrow_mut().paused = true;
    }
}

/// A write of answers completed: resume reading a paused client once what
/// is queued has drained to half the bound.
fn answers_written(lp: &mut Loop, st: &HttpRef, t: Handle<Tcp>) {
    let resume = {
        let mut c = st.borrow_mut();
        c.writing -= 1;
        c.paused && lp.write_queue_size(t) <= MAX_QUEUED_ANSWERS / 2
    };
    if resume && !lp.is_closing(t) {
        st.borrow_mut().paused = false;
        if !lp.is_reading(t) && start_reading(lp, st.clone()).is_err() {
            lp.close_if_open(t);
        }
    }
}

/// Shuts the write side once the answers are out, then closes.
fn end_connection(lp: &mut Loop, t: Handle<Tcp>) {
    let shut = lp.shutdown(t, |lp, t, _| {
        lp.close_if_open(t);
    });
    if shut.is_err() {
        lp.close_if_open(t);
    }
}

/// After a refusal: the answer and a FIN go out, then what the client
/// still sends is read and dropped until it closes or `LINGER_MS` pass.
fn linger_close(lp: &mut Loop, t: Handle<Tcp>) {
    let _ = lp.read_stop(t);
    let timer = lp.timer_init();
    let close_both = move |lp: &mut Loop| {
        lp.close_if_open(timer);
        lp.close_if_open(t);
    };
    let _ = lp.timer_start(
        timer,
        Duration::from_millis(LINGER_MS),
        Duration::ZERO,
        move |lp, _| close_both(lp),
    );
    let shut = lp.shutdown(t, move |lp, t, r| {
        let drained = r.is_ok()
            && lp
                .read_start(t, move |lp, _, r| {
                    if !matches!(r, Ok(d) if !d.is_empty()) {
                        close_both(lp);
                    }
                })
                .is_ok();
        if !drained {
            close_both(lp);
        }
    });
    if shut.is_err() {
        close_both(lp);
    }
}

// ----- the primary ----------------------------------------------------------

/// What the primary knows of its first workers' start.
#[derive(Default)]
struct Start {
    /// Workers that listen.
    listening: BTreeSet<u32>,
    /// `ready` was printed.
    ready: bool,
    /// A worker's listen error, as it reported it.
    errors: HashMap<u32, String>,
    /// Set once a worker failed before `ready`.
    failed: bool,
}

/// The primary runs on the supervisor (`uvcluster::supervisor`): a worker
/// that crashes after the start is restarted (with backoff), SIGHUP
/// reloads the workers one at a time without dropping a connection,
/// SIGTTIN/SIGTTOU add or remove one, and SIGINT/SIGTERM stop gracefully,
/// killing what remains after the kill timeout (`KILL_TIMEOUT_MS`,
/// default 30 s as gunicorn's). A worker that fails before every worker
/// of the first start listened ends the primary (exit code 1): a service
/// that cannot start is not retried here.
fn run_primary(lp: &mut Loop, n: usize, exit_code: Rc<Cell<u8>>) -> io::Result<()> {
    let primary = Primary::new(lp);
    // Workers are this same program (the default exec), run with no
    // arguments; PORT and the policy reach them through the environment.
    primary.setup_primary(
        lp,
        Settings {
            args: Some(Vec::new()),
            ..Settings::default()
        },
    );
    let mut config = SupervisorConfig {
        workers: n,
        ..SupervisorConfig::default()
    };
    if let Some(ms) = kill_timeout_from_env()? {
        config.kill_timeout = Duration::from_millis(ms);
    }
    let sup = Supervisor::with_primary(lp, primary, config)
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e.to_string()))?;
    let start: Rc<RefCell<Start>> = Rc::default();
    let st = start.clone();
    sup.on_listening(lp, move |_, w, addr| {
        let mut s = st.borrow_mut();
        s.listening.insert(w.id());
        if s.listening.len() == n && !s.ready && !s.failed {
            s.ready = true;
            println!("ready");
            if let Some(p) = addr.port {
                eprintln!("cluster_hello: {n} workers listening on port {p}");
            }
        }
    });
    // SIGUSR2: ask every worker for its counts; print them as one JSON
    // object keyed by worker id once all have answered.
    let counts: Rc<RefCell<BTreeMap<u32, serde_json::Value>>> = Rc::default();
    let c = counts.clone();
    let p = primary;
    let st = start.clone();
    sup.on_message(lp, move |lp, w, msg| {
        if let Some(e) = msg.get("listenError").and_then(|e| e.as_str()) {
            st.borrow_mut().errors.insert(w.id(), e.to_owned());
        } else if msg.get("conns").is_some() {
            c.borrow_mut().insert(w.id(), msg);
            if c.borrow().len() == p.workers(lp).len() {
                let line: serde_json::Map<String, serde_json::Value> = c
                    .borrow_mut()
                    .split_off(&0)
                    .into_iter()
                    .map(|(id, n)| (id.to_string(), n))
                    .collect();
                println!("{}", serde_json::Value::Object(line));
            }
        }
    });
    // A worker gone (exited and its channel closed, so that its last
    // message has been read) before every worker listened: the start
    // failed. Say why and stop the others at once.
    let failed_before_ready = {
        let (start, s, exit_code) = (start.clone(), sup, exit_code.clone());
        Rc::new(move |lp: &mut Loop, w: Worker| {
            // Disconnected on purpose (a stop asked for during start-up):
            // no failure.
            if !w.is_dead(lp) || w.is_connected(lp) || w.exited_after_disconnect(lp) == Some(true) {
                return;
            }
            let why = {
                let mut st = start.borrow_mut();
                if st.ready || st.failed || st.listening.contains(&w.id()) {
                    return;
                }
                st.failed = true;
                st.errors
                    .remove(&w.id())
                    .unwrap_or_else(|| match w.exit_status(lp) {
                        Some((Some(code), _)) => format!("it exited with code {code}"),
                        Some((_, Some(sig))) => format!("it was killed by signal {sig}"),
                        _ => "it exited".to_owned(),
                    })
            };
            eprintln!(
                "cluster_hello: worker {} failed before listening: {why}",
                w.id()
            );
            exit_code.set(1);
            s.stop(lp, false);
        })
    };
    // The supervisor's lifecycle events, one line each; the start-up
    // check on each new worker; the stop's messages.
    // (The callbacks hold the supervisor: it lives as long as the
    // process.)
    let (p, ec, me) = (primary, exit_code.clone(), sup);
    sup.on_event(lp, move |lp, e| {
        match e {
            LifecycleEvent::Forked { worker, .. } => {
                if let Some(w) = p.worker(lp, *worker) {
                    let f = failed_before_ready.clone();
                    w.on_disconnect(lp, move |lp, w| f(lp, w));
                    let f = failed_before_ready.clone();
                    w.on_exit(lp, move |lp, w, _, _| f(lp, w));
                }
            }
            LifecycleEvent::Stopping {
                graceful: true,
                signal: Some(sig),
            } => {
                eprintln!(
                    "cluster_hello: {sig}: disconnecting {} workers",
                    p.workers(lp).len()
                );
                remind_while_stopping(lp, &me);
            }
            LifecycleEvent::Stopping {
                graceful: false,
                signal: Some(sig),
            } => {
                // SIGQUIT stops at once on its first delivery; SIGINT and
                // SIGTERM do only when they come again during a graceful
                // stop. Either way the exit code is 1 (docs/supervisor.md).
                if *sig == Signum::SIGQUIT {
                    eprintln!("cluster_hello: {sig}: stopping at once, killing the workers");
                } else {
                    eprintln!("cluster_hello: {sig} again: stopping at once, killing the workers");
                }
                ec.set(1);
            }
            // The supervisor's own code is 0 after any stop; this program
            // exits 1 after an immediate one (and after a failed first
            // start): its line says the code it really exits with.
            LifecycleEvent::Exiting { code } => {
                let code = if *code != 0 { *code } else { ec.get().into() };
                eprintln!("cluster_hello: primary exiting with code {code}");
                return;
            }
            _ => {}
        }
        eprintln!("cluster_hello: {e}");
    });
    let ec = exit_code.clone();
    sup.on_exit(lp, move |_, code| {
        if code != 0 {
            ec.set(code as u8);
        }
    });
    let usr2 = lp.signal_init();
    let p = primary;
    lp.signal_start(usr2, Signum::SIGUSR2, move |lp, _, _| {
        counts.borrow_mut().clear();
        for w in p.workers(lp) {
            let _ = w.send(lp, &json!("count"), None);
        }
    })?;
    lp.unref_handle(usr2)?;
    sup.handle_signals(lp)?;
    sup.start(lp);
    Ok(())
}

/// `IDLE_GRACE_MS`: the workers' idle grace ([`IDLE_GRACE`] when it is not
/// set), a whole number of milliseconds, 0 for none (Node's behaviour).
fn idle_grace_from_env() -> io::Result<Duration> {
    let Some(v) = std::env::var_os("IDLE_GRACE_MS") else {
        return Ok(IDLE_GRACE);
    };
    match v.to_str().and_then(|t| t.parse::<u64>().ok()) {
        Some(ms) => Ok(Duration::from_millis(ms)),
        None => Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("IDLE_GRACE_MS should be a whole number of milliseconds. Received {v:?}"),
        )),
    }
}

/// `KILL_TIMEOUT_MS`: how long a graceful stop waits for a worker before
/// it kills it.
fn kill_timeout_from_env() -> io::Result<Option<u64>> {
    let Some(v) = std::env::var_os("KILL_TIMEOUT_MS") else {
        return Ok(None);
    };
    match v.to_str().and_then(|t| t.parse::<u64>().ok()) {
        Some(ms) if ms > 0 => Ok(Some(ms)),
        _ => Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "KILL_TIMEOUT_MS should be a whole number of milliseconds above 0. Received {v:?}"
            ),
        )),
    }
}

/// During a graceful stop the primary says every `STILL_WAITING_MS` which
/// workers it waits for (a second SIGINT/SIGTERM kills them).
fn remind_while_stopping(lp: &mut Loop, sup: &Supervisor) {
    let waiting = lp.timer_init();
    let s = *sup;
    let _ = lp.timer_start(
        waiting,
        Duration::from_millis(STILL_WAITING_MS),
        Duration::from_millis(STILL_WAITING_MS),
        move |lp, _| {
            // Disconnected workers have left the primary's `workers()`;
            // the supervisor knows them until they exit.
            let left: Vec<String> = (s.status(lp).iter())
                .filter_map(|w| Some(format!("{} (pid {})", w.id?, w.pid.unwrap_or(0))))
                .collect();
            eprintln!(
                "cluster_hello: still waiting for worker(s) {} to finish their requests; \
                 a second SIGINT/SIGTERM kills them",
                left.join(", ")
            );
        },
    );
    // The reminder must not keep the primary alive by itself.
    let _ = lp.unref_handle(waiting);
}
