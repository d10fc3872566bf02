//! A Rust cluster in one binary that keeps its workers running. The same
//! program is the primary and, started by it with `NODE_UNIQUE_ID` set,
//! each of its workers (`setup_worker` tells which). A worker that exits is
//! forked again unless it was disconnected on purpose: Node's
//! `cluster.on('exit', w => { if (!w.exitedAfterDisconnect) cluster.fork() })`.
//! SIGINT or SIGTERM disconnects every worker gracefully, and the primary
//! exits once they are gone.
//!
//! `cargo run --example cluster_restart`, then `curl localhost:8000`, and
//! `kill -9` a worker: the primary logs its exit and forks another.
//! `PORT` (default 8000) and `WORKERS` (default 2) configure it.

use std::io;

use uvcluster::cluster::{self, Primary};
use uvcluster::net::{ListenOptions, Server};
use uvcluster::uv::{Loop, RunMode, Signum, Stream};

fn main() -> io::Result<()> {
    let mut lp = Loop::new()?;
    match cluster::setup_worker(&mut lp)? {
        Some(_worker) => serve(&mut lp)?,
        None => start_primary(&mut lp)?,
    }
    lp.run(RunMode::Default)?; // until every worker is gone
    Ok(())
}

fn start_primary(lp: &mut Loop) -> io::Result<()> {
    let primary = Primary::new(lp);
    primary.on_exit(lp, move |lp, worker, code, signal| {
        eprintln!(
            "worker {} exited (code {code:?}, signal {:?})",
            worker.id(),
            signal.map(Signum::as_raw)
        );
        // Disconnected on purpose (by `disconnect` below, or by the
        // worker itself): let it go. Anything else: replace it.
        if worker.exited_after_disconnect(lp) != Some(true)
            && let Err(e) = primary.fork(lp, Vec::new())
        {
            eprintln!("cannot fork a replacement: {e}");
        }
    });
    primary.on_listening(lp, |_, worker, addr| {
        println!(
            "worker {} listening on port {}",
            worker.id(),
            addr.port.unwrap_or(0)
        );
    });
    // Unreferenced: the signal handles alone do not keep the loop running.
    for signum in [Signum::SIGINT, Signum::SIGTERM] {
        let sig = lp.signal_init();
        lp.signal_start(sig, signum, move |lp, _, _| primary.disconnect(lp, |_| {}))?;
        lp.unref_handle(sig)?;
    }
    // Workers run this same executable with the same arguments.
    for _ in 0..env("WORKERS", 2usize) {
        primary.fork(lp, Vec::new())?;
    }
    Ok(())
}

/// A worker: an HTTP hello world on `PORT`, shared with the other workers
/// through the primary. One response per read, which is enough for `curl`;
/// the `cluster_hello` example parses requests properly.
fn serve(lp: &mut Loop) -> io::Result<()> {
    const HELLO: &[u8] = b"HTTP/1.1 200 OK\r\nContent-Length: 12\r\n\r\nhello world\n";
    let server = Server::new(lp, |lp, server, conn| {
        let Stream::Tcp(t) = conn else {
            return server.close_connection(lp, conn);
        };
        let s = server;
        let reading = lp.read_start(t, move |lp, t, data| match data {
            Ok(d) if !d.is_empty() => {
                if lp.write(t, &[HELLO], |_, _, _| {}).is_err() {
                    s.close_connection(lp, Stream::Tcp(t));
                }
            }
            _ => s.close_connection(lp, Stream::Tcp(t)), // EOF or a read error
        });
        if reading.is_err() {
            server.close_connection(lp, Stream::Tcp(t));
        }
    });
    server.listen(
        lp,
        ListenOptions::port(env("PORT", 8000u16)),
        |_, _, listened| {
            if let Err(e) = listened {
                eprintln!("worker {}: {e}", std::process::id());
                std::process::exit(1);
            }
        },
    )
}

/// `name` from the environment, or `default` when unset; exits with a
/// message when it does not parse.
fn env<T: std::str::FromStr>(name: &str, default: T) -> T {
    let Ok(v) = std::env::var(name) else {
        return default;
    };
    v.parse().unwrap_or_else(|_| {
        eprintln!("bad {name}={v:?}");
        std::process::exit(2)
    })
}
