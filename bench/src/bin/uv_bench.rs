//! Loop benchmarks in the shape of libuv's own (`test/benchmark-*.c`), for
//! side-by-side runs with the C programs in `bench/reference/libuv-bench`
//! and the tokio and bare-mio programs in its `rust-compare/`.
//!
//! ```text
//! uv_bench million_timers [N] [PER_MS]   N one-shot timers, PER_MS due per ms (0: all at 1 ms)
//! uv_bench ping_pongs tcp|unix [MS]      5-byte PING, one in flight, echo server in a child process
//! uv_bench loop_count [N]                N empty iterations driven by one idle handle
//! uv_bench ipc_fd_pass [N] [WINDOW]      N TCP sockets passed over an IPC pipe pair (one loop)
//! ```
//!
//! Each run prints one line of `key=value` fields: at least `bench`, `count`,
//! `secs` (wall), `cpu_secs` (user + system, from `getrusage`), `rate` (per
//! second) and `maxrss_kib`. For `ping_pongs` the figures are the client's;
//! the server is this binary re-executed as `uv_bench --serve tcp|unix`, and
//! it prints its address on stdout for the client to connect to.
//!
//! Build with `cargo build --release -p uvcluster-bench --bin uv_bench`.

use std::cell::Cell;
use std::io::{self, BufRead, BufReader, Write};
use std::process::{Command, Stdio};
use std::rc::Rc;
use std::time::Duration;
use std::time::Instant;

use nix::sys::resource::{UsageWho, getrusage};
use uvcluster::uv::{BindFlags, Handle, Loop, RunMode, Socket, StreamType, Tcp};

const MSG: &[u8] = b"PING\n";

/// CPU seconds (user + system) this process has used so far.
fn cpu_secs() -> f64 {
    let u = getrusage(UsageWho::RUSAGE_SELF).expect("getrusage");
    let t = |tv: nix::sys::time::TimeVal| tv.tv_sec() as f64 + tv.tv_usec() as f64 / 1e6;
    t(u.user_time()) + t(u.system_time())
}

/// Peak resident set size of this process in KiB.
fn maxrss_kib() -> i64 {
    getrusage(UsageWho::RUSAGE_SELF)
        .expect("getrusage")
        .max_rss()
}

fn arg<T: std::str::FromStr>(args: &[String], i: usize, default: T) -> T {
    match args.get(i) {
        Some(s) => s
            .parse()
            .unwrap_or_else(|_| usage(&format!("bad argument {s:?}"))),
        None => default,
    }
}

fn usage(msg: &str) -> ! {
    eprintln!("uv_bench: {msg}");
    eprintln!(
        "usage: uv_bench million_timers [N] [PER_MS] | ping_pongs tcp|unix [MS] | \
         loop_count [N] | ipc_fd_pass [N] [WINDOW]"
    );
    std::process::exit(2)
}

fn main() -> io::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    match args.get(1).map(String::as_str) {
        Some("million_timers") => {
            million_timers(arg(&args, 2, 10_000_000), arg(&args, 3, 1000));
            Ok(())
        }
        Some("ping_pongs") => {
            let transport = args.get(2).map_or("tcp", String::as_str);
            ping_pongs(transport, arg(&args, 3, 5000))
        }
        Some("loop_count") => {
            loop_count(arg(&args, 2, 2_000_000));
            Ok(())
        }
        Some("ipc_fd_pass") => ipc_fd_pass(arg(&args, 2, 1_000_000), arg(&args, 3, 64)),
        Some("--serve") => serve(args.get(2).map_or("tcp", String::as_str)),
        _ => usage("which benchmark?"),
    }
}

// ----- million_timers (benchmark-million-timers.c) ------------------------------

thread_local! {
    static FIRED: Cell<u64> = const { Cell::new(0) };
    static CLOSED: Cell<u64> = const { Cell::new(0) };
}

/// libuv's `million_timers`: arm N one-shot timers (timer i due
/// `1 + i / PER_MS` ms after the loop's cached now), run until all fired,
/// then close them all; init, dispatch and cleanup are timed separately.
/// The callbacks capture nothing, as libuv's plain function pointers, so
/// boxing them allocates nothing.
fn million_timers(n: u64, per_ms: u64) {
    let mut lp = Loop::new().expect("loop");
    let mut timers: Vec<Handle<uvcluster::uv::Timer>> = Vec::with_capacity(n as usize);
    let c0 = cpu_secs();
    let t0 = Instant::now();
    for i in 0..n {
        let t = lp.timer_init();
        let timeout = i.checked_div(per_ms).map_or(1, |k| 1 + k);
        lp.timer_start(t, Duration::from_millis(timeout), Duration::ZERO, |_, _| {
            FIRED.set(FIRED.get() + 1)
        })
        .expect("timer_start");
        timers.push(t);
    }
    let t1 = Instant::now();
    let c1 = cpu_secs();
    lp.run(RunMode::Default).expect("run");
    let t2 = Instant::now();
    let c2 = cpu_secs();
    for &t in &timers {
        lp.close(t, |_| CLOSED.set(CLOSED.get() + 1))
            .expect("close");
    }
    lp.run(RunMode::Default).expect("run");
    let t3 = Instant::now();
    let c3 = cpu_secs();
    assert_eq!(FIRED.get(), n, "every timer fires once");
    assert_eq!(CLOSED.get(), n, "every timer closes once");
    let secs = (t3 - t0).as_secs_f64();
    let dispatch = (t2 - t1).as_secs_f64();
    println!(
        "bench=million_timers count={n} per_ms={per_ms} secs={secs:.3} cpu_secs={:.3} rate={:.0} \
         init_secs={:.3} dispatch_secs={dispatch:.3} dispatch_cpu_secs={:.3} cleanup_secs={:.3} \
         init_cpu_secs={:.3} cleanup_cpu_secs={:.3} maxrss_kib={}",
        c3 - c0,
        n as f64 / dispatch,
        (t1 - t0).as_secs_f64(),
        c2 - c1,
        (t3 - t2).as_secs_f64(),
        c1 - c0,
        c3 - c2,
        maxrss_kib()
    );
}

// ----- loop_count (benchmark-loop-count.c) ----------------------------------------

/// libuv's `loop_count`: one idle handle counts N iterations, then stops.
fn loop_count(n: u64) {
    let mut lp = Loop::new().expect("loop");
    let idle = lp.idle_init();
    let ticks = Rc::new(Cell::new(0u64));
    let tk = ticks.clone();
    lp.idle_start(idle, move |lp, h| {
        tk.set(tk.get() + 1);
        if tk.get() == n {
            lp.idle_stop(h).expect("idle_stop");
        }
    })
    .expect("idle_start");
    let c0 = cpu_secs();
    let t0 = Instant::now();
    lp.run(RunMode::Default).expect("run");
    let secs = t0.elapsed().as_secs_f64();
    let cpu = cpu_secs() - c0;
    lp.close(idle, |_| {}).expect("close");
    lp.run(RunMode::Default).expect("run");
    assert_eq!(ticks.get(), n);
    println!(
        "bench=loop_count count={n} secs={secs:.3} cpu_secs={cpu:.3} rate={:.0} ns_per_iter={:.1} maxrss_kib={}",
        n as f64 / secs,
        secs * 1e9 / n as f64,
        maxrss_kib()
    );
}

// ----- ping_pongs (benchmark-ping-pongs.c) ----------------------------------------

/// The echo server, run in a child process: accepts one connection, echoes
/// everything, exits at EOF. Prints its address (TCP) or path (Unix) first.
fn serve(transport: &str) -> io::Result<()> {
    fn echo<K: StreamType>(lp: &mut Loop, c: Handle<K>) {
        lp.read_start(c, |lp, c, data| match data {
            Ok(d) if !d.is_empty() => {
                if lp.write(c, &[d], |_, _, _| {}).is_err() {
                    lp.close_if_open(c);
                }
            }
            _ => {
                lp.close_if_open(c);
            }
        })
        .expect("read_start");
    }
    let mut lp = Loop::new()?;
    let mut out = io::stdout();
    if transport == "unix" {
        let path = std::env::temp_dir().join(format!("uv_bench-{}.sock", std::process::id()));
        let _ = std::fs::remove_file(&path);
        let server = lp.pipe_init(false);
        lp.pipe_bind(server, &path)?;
        lp.pipe_listen(server, 128, |lp, server, client| {
            echo(lp, client.expect("accept"));
            lp.close(server, |_| {}).expect("close");
        })?;
        writeln!(out, "{}", path.display())?;
    } else {
        let server = lp.tcp_init();
        lp.tcp_bind(server, ([127, 0, 0, 1], 0).into(), BindFlags::default())?;
        lp.tcp_listen(server, 128, |lp, server, client| {
            echo(lp, client.expect("accept"));
            lp.close(server, |_| {}).expect("close");
        })?;
        writeln!(out, "{}", lp.tcp_getsockname(server)?)?;
    }
    out.flush()?;
    lp.run(RunMode::Default)?;
    Ok(())
}

/// The client side of a ping-pong: what the connect callback starts.
struct Pinger {
    /// Bytes of the current PING echoed so far.
    got: Cell<usize>,
    trips: Cell<u64>,
    start_ms: Cell<u64>,
    dur_ms: u64,
    t0: Cell<Option<(Instant, f64)>>,
    result: Cell<Option<(f64, f64)>>,
}

fn ping<K: StreamType>(lp: &mut Loop, c: Handle<K>, p: Rc<Pinger>) {
    lp.write(c, &[MSG], |_, _, r| r.expect("write"))
        .expect("write");
    p.start_ms.set(lp.now());
    p.t0.set(Some((Instant::now(), cpu_secs())));
    lp.read_start(c, move |lp, c, data| {
        let d = data.expect("read");
        assert!(!d.is_empty(), "server closed early");
        let mut got = p.got.get() + d.len();
        let mut done = false;
        while got >= MSG.len() {
            got -= MSG.len();
            p.trips.set(p.trips.get() + 1);
            // libuv checks its cached now after each pong.
            if lp.now() - p.start_ms.get() >= p.dur_ms {
                done = true;
            }
        }
        p.got.set(got);
        if done {
            let (t0, c0) = p.t0.get().expect("started");
            p.result
                .set(Some((t0.elapsed().as_secs_f64(), cpu_secs() - c0)));
            lp.close(c, |_| {}).expect("close");
        } else {
            lp.write(c, &[MSG], |_, _, r| r.expect("write"))
                .expect("write");
        }
    })
    .expect("read_start");
}

/// libuv's `ping_pongs`: one client, one echo server in another process,
/// one 5-byte message in flight, for `ms` milliseconds.
fn ping_pongs(transport: &str, ms: u64) -> io::Result<()> {
    if transport != "tcp" && transport != "unix" {
        usage("ping_pongs takes tcp or unix");
    }
    let mut child = Command::new(std::env::current_exe()?)
        .args(["--serve", transport])
        .stdout(Stdio::piped())
        .spawn()?;
    let mut addr = String::new();
    BufReader::new(child.stdout.take().expect("piped")).read_line(&mut addr)?;
    let addr = addr.trim().to_string();
    let p = Rc::new(Pinger {
        got: Cell::new(0),
        trips: Cell::new(0),
        start_ms: Cell::new(0),
        dur_ms: ms,
        t0: Cell::new(None),
        result: Cell::new(None),
    });
    let mut lp = Loop::new()?;
    let pc = p.clone();
    if transport == "unix" {
        let c = lp.pipe_init(false);
        lp.pipe_connect(c, &addr, move |lp, c, r| {
            r.expect("connect");
            ping(lp, c, pc);
        })?;
    } else {
        let c = lp.tcp_init();
        let sa = addr
            .parse()
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
        lp.tcp_connect(c, sa, move |lp, c: Handle<Tcp>, r| {
            r.expect("connect");
            ping(lp, c, pc);
        })?;
    }
    lp.run(RunMode::Default)?;
    let status = child.wait()?;
    let (secs, cpu) = p.result.get().expect("finished");
    let trips = p.trips.get();
    println!(
        "bench=ping_pongs transport={transport} count={trips} secs={secs:.3} cpu_secs={cpu:.3} \
         rate={:.0} server_ok={} maxrss_kib={}",
        trips as f64 / secs,
        status.success(),
        maxrss_kib()
    );
    Ok(())
}

// ----- ipc_fd_pass ------------------------------------------------------------------

/// Round-robin dispatch's hot path: a TCP socket is sent over an IPC pipe
/// with `write2`, and the receiver accepts the pending handle and closes it.
/// Both ends are on one loop; up to `window` sends are in flight.
fn ipc_fd_pass(n: u64, window: u64) -> io::Result<()> {
    let mut lp = Loop::new()?;
    // A connected TCP socket to send, as the primary sends accepted connections.
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    let conn = std::net::TcpStream::connect(listener.local_addr()?)?;
    let (_peer, _) = listener.accept()?;
    let sock = lp.tcp_init();
    lp.tcp_open(sock, conn.into())?;
    let (tx, rx) = lp.pipe_pair(true)?;
    let sent = Rc::new(Cell::new(0u64));
    let recvd = Rc::new(Cell::new(0u64));

    fn send_one(
        lp: &mut Loop,
        tx: Handle<uvcluster::uv::Pipe>,
        sock: Handle<Tcp>,
        sent: &Cell<u64>,
    ) {
        sent.set(sent.get() + 1);
        lp.write2(tx, &[b"h"], sock, |_, _, r| r.expect("write2"))
            .expect("write2");
    }

    let (s2, r2) = (sent.clone(), recvd.clone());
    lp.read_start(rx, move |lp, rx, data| {
        let d = data.expect("read");
        assert!(!d.is_empty(), "unexpected EOF");
        while lp.pipe_pending_count(rx) > 0 {
            match lp.pipe_accept_pending(rx).expect("accept") {
                Socket::Tcp(t) => lp.close(t, |_| {}).expect("close"),
                other => panic!("unexpected handle {other:?}"),
            }
            r2.set(r2.get() + 1);
            if s2.get() < n {
                send_one(lp, tx, sock, &s2);
            }
        }
        if r2.get() == n {
            lp.close(rx, |_| {}).expect("close");
            lp.close(tx, |_| {}).expect("close");
            lp.close(sock, |_| {}).expect("close");
        }
    })?;
    let c0 = cpu_secs();
    let t0 = Instant::now();
    for _ in 0..window.min(n) {
        send_one(&mut lp, tx, sock, &sent);
    }
    lp.run(RunMode::Default)?;
    let secs = t0.elapsed().as_secs_f64();
    let cpu = cpu_secs() - c0;
    assert_eq!(recvd.get(), n);
    println!(
        "bench=ipc_fd_pass count={n} window={window} secs={secs:.3} cpu_secs={cpu:.3} rate={:.0} maxrss_kib={}",
        n as f64 / secs,
        maxrss_kib()
    );
    Ok(())
}
