//! A cluster TCP echo server: `WORKERS` workers (default: the number of
//! CPUs) share `PORT` (default 8002) with the scheduling policy from
//! `NODE_CLUSTER_SCHED_POLICY` (`rr` or `none`), and answer each line with
//! `Reply from <pid>: <line>`.
//!
//! The primary prints `ready <port>` once every worker listens (with
//! `PORT=0` that is the port the workers share) and logs worker exits on
//! stderr. A bad `PORT`, `WORKERS` or `NODE_CLUSTER_SCHED_POLICY` is an
//! error before anything starts, and a worker that cannot listen ends the
//! primary with its error and exit code 1.
//!
//! SIGINT/SIGTERM disconnects the workers: a client with no unfinished line
//! is closed at once, one in the middle of a line gets its answer first;
//! the primary exits 0 once the workers are gone, says every few seconds
//! whom it still waits for, and kills them on a second signal.
//!
//! A line may be at most 64 KiB: a longer one is answered
//! `line too long` and the connection closed, so that no client can make
//! a worker buffer without bound. Run as a worker under any primary (ours
//! or Node's) it serves on `PORT`.
//!
//! `cargo run --example cluster_echo`, then `nc localhost 8002`.

use std::cell::{Cell, RefCell};
use std::collections::{BTreeSet, HashMap};
use std::io;
use std::process::ExitCode;
use std::rc::Rc;
use std::time::Duration;

use serde_json::json;
use uvcluster::cluster::{self, Primary, SchedulingPolicy, Settings, Worker};
use uvcluster::net::{self, ListenOptions, Server};
use uvcluster::uv::{Handle, Loop, RunMode, Signum, Stream, Tcp};

/// The longest line a client may send, newline excluded.
const MAX_LINE: usize = 64 * 1024;
/// The most answer bytes queued for a client before its lines are no
/// longer read (1 MiB).
const MAX_QUEUED: usize = 1 << 20;
/// How long a connection refused for a too-long line keeps reading (and
/// dropping) what the client still sends after the answer and a FIN, so
/// that the close does not reset the connection before the answer is read.
const LINGER_MS: u64 = 1000;
/// How often a primary waiting for its workers to stop says so.
const STILL_WAITING_MS: u64 = 5000;

fn main() -> ExitCode {
    env_logger::init();
    match run() {
        Ok(code) => code,
        Err(e) => {
            eprintln!("cluster_echo: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run() -> io::Result<ExitCode> {
    let port = net::port_from_env("PORT", 8002)?;
    let mut lp = Loop::new()?;
    let exit_code = Rc::new(Cell::new(0u8));
    match cluster::setup_worker(&mut lp)? {
        Some(worker) => run_worker(&mut lp, port, worker)?,
        None => {
            let n = workers_from_env()?;
            if let Ok(v) = std::env::var("NODE_CLUSTER_SCHED_POLICY")
                && SchedulingPolicy::parse(&v).is_none()
            {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!(
                        "NODE_CLUSTER_SCHED_POLICY should be rr, none, reuseport or leastconn. Received {v:?}"
                    ),
                ));
            }
            run_primary(&mut lp, n, exit_code.clone())?;
        }
    }
    lp.run(RunMode::Default)?;
    Ok(ExitCode::from(exit_code.get()))
}

/// `WORKERS`: a whole number above 0, or one per CPU when it is not set.
/// The most workers `WORKERS` may ask for: far more than any machine this
/// runs on has CPUs, and few enough that a typo (an extra digit, `-1`
/// read as a huge number) is an error rather than a fork storm.
const MAX_WORKERS: usize = 4096;

fn workers_from_env() -> io::Result<usize> {
    let Some(v) = std::env::var_os("WORKERS") else {
        return Ok(std::thread::available_parallelism().map_or(2, |n| n.get()));
    };
    let v = v.to_string_lossy();
    let t = v.trim();
    match t.parse::<usize>() {
        Ok(n) if n <= MAX_WORKERS && n > 0 && t.bytes().all(|b| b.is_ascii_digit()) => Ok(n),
        _ => Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "WORKERS should be a whole number above 0, at most {MAX_WORKERS}. Received {v:?}"
            ),
        )),
    }
}

fn run_worker(lp: &mut Loop, port: u16, worker: Worker) -> io::Result<()> {
    let server = Server::new(lp, |lp, server, conn| match conn {
        Stream::Tcp(t) => echo_lines(lp, server, t),
        other => server.close_connection(lp, other),
    });
    server.listen(lp, ListenOptions::port(port), move |lp, _, r| {
        if let Err(e) = r {
            eprintln!("worker {}: {e}", std::process::id());
            // A primary of ours reports the error and stops.
            let sent = worker.send_with_callback(
                lp,
                &json!({ "listenError": e.to_string() }),
                None,
                |_, _| std::process::exit(1),
            );
            if sent.is_err() {
                std::process::exit(1);
            }
        }
    })
}

/// Answers every complete line; a partial last line is answered at EOF.
/// Between lines the connection is marked idle, so that a graceful close
/// of the server ends it. While more than `MAX_QUEUED` bytes of answers
/// wait for a client that does not read them, its lines are not read
/// either: what a client costs is bounded.
fn echo_lines(lp: &mut Loop, server: Server, t: Handle<Tcp>) {
    let st = Rc::new(RefCell::new(Echo {
        server,
        prefix: format!("Reply from {}: ", std::process::id()),
        pending: Vec::new(),
    }));
    let _ = server.set_idle(lp, Stream::Tcp(t), true);
    if start_echo(lp, st, t).is_err() {
        server.close_connection(lp, Stream::Tcp(t));
    }
}

/// One client's state: the unfinished line.
struct Echo {
    server: Server,
    prefix: String,
    pending: Vec<u8>,
}

fn start_echo(lp: &mut Loop, st: Rc<RefCell<Echo>>, t: Handle<Tcp>) -> io::Result<()> {
    lp.read_start(t, move |lp, t, r| on_echo_read(lp, &st, t, r))
}

fn on_echo_read(lp: &mut Loop, st: &Rc<RefCell<Echo>>, t: Handle<Tcp>, r: io::Result<&[u8]>) {
    let conn = Stream::Tcp(t);
    let mut e = st.borrow_mut();
    let s = e.server;
    let data = match r {
        Ok(d) if !d.is_empty() => d,
        _ => {
            if !e.pending.is_empty() {
                let mut out = e.prefix.clone().into_bytes();
                out.append(&mut e.pending);
                out.push(b'\n');
                let _ = lp.write(t, &[&out], |_, _, _| {});
            }
            drop(e);
            end(lp, t);
            return;
        }
    };
    let _ = s.set_idle(lp, conn, false);
    let mut out = Vec::new();
    let mut rest = data;
    // Only the new bytes are searched for a newline.
    while let Some(i) = rest.iter().position(|&b| b == b'\n') {
        if e.pending.len() + i > MAX_LINE {
            break;
        }
        out.extend_from_slice(e.prefix.as_bytes());
        out.append(&mut e.pending);
        out.extend_from_slice(&rest[..=i]);
        rest = &rest[i + 1..];
    }
    if e.pending.len() + rest.iter().position(|&b| b == b'\n').unwrap_or(rest.len()) > MAX_LINE {
        out.extend_from_slice(format!("line too long (over {MAX_LINE} bytes)\n").as_bytes());
        let _ = lp.write(t, &[&out], |_, _, _| {});
        drop(e);
        return linger_close(lp, t);
    }
    e.pending.extend_from_slice(rest);
    let idle = e.pending.is_empty();
    drop(e);
    if !out.is_empty() {
        // Writes complete in order: when the one that fills the queue has
        // gone out, the queue is empty and reading resumes.
        let pause = lp.write_queue_size(t) + out.len() > MAX_QUEUED;
        let st2 = st.clone();
        let written = lp.write(t, &[&out], move |lp, t, r| {
            if pause
                && r.is_ok()
                && !lp.is_closing(t)
                && !lp.is_reading(t)
                && start_echo(lp, st2, t).is_err()
            {
                lp.close_if_open(t);
            }
        });
        if pause && written.is_ok() {
            let _ = lp.read_stop(t);
        }
    }
    if idle {
        // Between lines. If the server is closing, this ends the
        // connection once the answers are out.
        let _ = s.set_idle(lp, conn, true);
    }
}

/// Shuts the write side once the answers are out, then closes.
fn end(lp: &mut Loop, t: Handle<Tcp>) {
    let shut = lp.shutdown(t, |lp, t, _| {
        lp.close_if_open(t);
    });
    if shut.is_err() && !lp.is_closing(t) {
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

fn run_primary(lp: &mut Loop, n: usize, exit_code: Rc<Cell<u8>>) -> io::Result<()> {
    let primary = Primary::new(lp);
    // Workers are this same program, run with no arguments; PORT and the
    // policy reach them through the environment.
    primary.setup_primary(
        lp,
        Settings {
            args: Some(Vec::new()),
            ..Settings::default()
        },
    );
    let listening: Rc<RefCell<BTreeSet<u32>>> = Rc::default();
    let ready = Rc::new(Cell::new(false));
    let (l, r) = (listening.clone(), ready.clone());
    primary.on_listening(lp, move |_, w, addr| {
        l.borrow_mut().insert(w.id());
        if l.borrow().len() == n && !r.replace(true) {
            println!("ready {}", addr.port.unwrap_or(0));
        }
    });
    let errors: Rc<RefCell<HashMap<u32, String>>> = Rc::default();
    let e = errors.clone();
    primary.on_message(lp, move |_, w, msg, _| {
        if let Some(err) = msg.get("listenError").and_then(|e| e.as_str()) {
            e.borrow_mut().insert(w.id(), err.to_owned());
        }
    });
    // A worker gone (exited, its channel closed and so its last message
    // read) before every worker listened: say why and stop the others.
    let failed = Rc::new(Cell::new(false));
    let check = {
        let p = primary;
        Rc::new(move |lp: &mut Loop, w: Worker| {
            if !w.is_dead(lp)
                || w.is_connected(lp)
                || ready.get()
                || failed.get()
                || listening.borrow().contains(&w.id())
            {
                return;
            }
            failed.set(true);
            let why = errors
                .borrow_mut()
                .remove(&w.id())
                .unwrap_or_else(|| format!("it exited ({:?})", w.exit_status(lp)));
            eprintln!(
                "cluster_echo: worker {} failed before listening: {why}",
                w.id()
            );
            exit_code.set(1);
            for other in p.workers(lp) {
                let _ = other.kill(lp, Some(Signum::SIGTERM));
            }
        })
    };
    let c = check.clone();
    primary.on_disconnect(lp, move |lp, w| c(lp, w));
    primary.on_exit(lp, move |lp, w, code, signal| {
        eprintln!(
            "worker {} exited (code {code:?}, signal {signal:?})",
            w.id()
        );
        check(lp, w);
    });
    let mut forked = Vec::new();
    for _ in 0..n {
        forked.push(primary.fork(lp, Vec::new())?);
    }
    let forked = Rc::new(forked);
    let stopping = Rc::new(Cell::new(false));
    for signum in [Signum::SIGINT, Signum::SIGTERM] {
        let sig = lp.signal_init();
        let (p, forked, stopping) = (primary, forked.clone(), stopping.clone());
        lp.signal_start(sig, signum, move |lp, _, _| {
            if stopping.replace(true) {
                let alive: Vec<_> = forked.iter().copied().filter(|w| !w.is_dead(lp)).collect();
                for w in alive {
                    let _ = w.kill(lp, Some(Signum::SIGKILL));
                }
                return;
            }
            p.disconnect(lp, |_| {});
            let waiting = lp.timer_init();
            let forked = forked.clone();
            let _ = lp.timer_start(waiting, Duration::from_millis(STILL_WAITING_MS), Duration::from_millis(STILL_WAITING_MS), move |lp, _| {
                let left: Vec<String> = forked
                    .iter()
                    .filter(|w| !w.is_dead(lp))
                    .map(|w| w.id().to_string())
                    .collect();
                eprintln!(
                    "cluster_echo: still waiting for worker(s) {}; a second SIGINT/SIGTERM kills them",
                    left.join(", ")
                );
            });
            let _ = lp.unref_handle(waiting);
        })?;
        lp.unref_handle(sig)?;
    }
    Ok(())
}
