//! A cluster TCP echo server: `WORKERS` workers (default: the number of
//! CPUs) share `PORT` (default 8002) with the scheduling policy from
//! `NODE_CLUSTER_SCHED_POLICY` (`rr` or `none`), and answer each line with
//! `Reply from <pid>: <line>`.
//!
//! The primary prints `ready <port>` once every worker listens (with
//! `PORT=0` that is the port the workers share), logs worker exits on
//! stderr, and on SIGINT/SIGTERM disconnects the workers and exits 0.
//! Run as a worker under any primary (ours or Node's) it serves on `PORT`.
//!
//! `cargo run --example cluster_echo`, then `nc localhost 8002`.

use std::cell::Cell;
use std::io;
use std::rc::Rc;

use uvcluster::cluster::{self, Primary, Settings};
use uvcluster::net::{Conn, ListenOptions, Server};
use uvcluster::uv::{Handle, Loop, RunMode, Tcp};

fn main() -> io::Result<()> {
    env_logger::init();
    let mut lp = Loop::new()?;
    match cluster::setup_worker(&mut lp)? {
        Some(_) => run_worker(&mut lp)?,
        None => run_primary(&mut lp)?,
    }
    lp.run(RunMode::Default)?;
    Ok(())
}

fn port() -> u16 {
    std::env::var("PORT")
        .ok()
        .and_then(|p| p.parse().ok())
        .unwrap_or(8002)
}

fn run_worker(lp: &mut Loop) -> io::Result<()> {
    let server = Server::new(|lp, server, conn| match conn {
        Conn::Tcp(t) => echo_lines(lp, server.clone(), t),
        other => server.close_connection(lp, other),
    });
    server.listen(lp, ListenOptions::port(port()), |_, _, r| {
        if let Err(e) = r {
            eprintln!("worker {}: {e}", std::process::id());
            std::process::exit(1);
        }
    })
}

/// Answers every complete line; a partial last line is answered at EOF.
fn echo_lines(lp: &mut Loop, server: Server, t: Handle<Tcp>) {
    let prefix = format!("Reply from {}: ", std::process::id());
    let mut pending: Vec<u8> = Vec::new();
    let s = server.clone();
    let r = lp.read_start(t, move |lp, t, r| {
        let data = match r {
            Ok(d) if !d.is_empty() => d,
            _ => {
                if !pending.is_empty() {
                    let mut out = prefix.clone().into_bytes();
                    out.append(&mut pending);
                    out.push(b'\n');
                    let _ = lp.write(t, &[&out], |_, _, _| {});
                }
                let s2 = s.clone();
                if lp
                    .shutdown(t, move |lp, t, _| s2.close_connection(lp, Conn::Tcp(t)))
                    .is_err()
                {
                    s.close_connection(lp, Conn::Tcp(t));
                }
                return;
            }
        };
        pending.extend_from_slice(data);
        let mut out = Vec::new();
        while let Some(i) = pending.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = pending.drain(..=i).collect();
            out.extend_from_slice(prefix.as_bytes());
            out.extend_from_slice(&line);
        }
        if !out.is_empty() {
            let _ = lp.write(t, &[&out], |_, _, _| {});
        }
    });
    if r.is_err() {
        server.close_connection(lp, Conn::Tcp(t));
    }
}

fn run_primary(lp: &mut Loop) -> io::Result<()> {
    let n: usize = std::env::var("WORKERS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(2, |n| n.get()));
    let primary = Primary::new();
    // Workers are this same program, run with no arguments; PORT and the
    // policy reach them through the environment.
    primary.setup_primary(
        lp,
        Settings {
            args: Some(Vec::new()),
            ..Settings::default()
        },
    );
    let ready = Rc::new(Cell::new(0usize));
    primary.on_listening(move |_, _, addr| {
        ready.set(ready.get() + 1);
        if ready.get() == n {
            println!("ready {}", addr.port.unwrap_or(0));
        }
    });
    primary.on_exit(|_, w, code, signal| {
        eprintln!(
            "worker {} exited (code {code:?}, signal {signal:?})",
            w.id()
        );
    });
    for signum in [nix::libc::SIGINT, nix::libc::SIGTERM] {
        let sig = lp.signal_init();
        let p = primary.clone();
        lp.signal_start(sig, signum, move |lp, _, _| {
            p.disconnect(lp, |_| {});
        })?;
        lp.unref_handle(sig)?;
    }
    for _ in 0..n {
        primary.fork(lp, Vec::new())?;
    }
    Ok(())
}
