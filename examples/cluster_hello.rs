//! The same program as Node's reference cluster server
//! (`shared/reference/node-baseline/server.js`): an HTTP/1.1 hello world on
//! `PORT` (default 8000) served by `WORKERS` workers (default: the number
//! of CPUs), with the policy from `NODE_CLUSTER_SCHED_POLICY`. On SIGUSR2
//! the primary prints each worker's connection count as one JSON line
//! keyed by worker id.
//!
//! Run as a worker under any primary (ours or Node's, with
//! `process.execPath` set to this binary) it serves on `PORT`.
//!
//! `cargo run --release --example cluster_hello`

use std::cell::Cell;
use std::io;
use std::rc::Rc;

use serde_json::json;
use uvcluster::cluster::{self, Worker};
use uvcluster::net::{Conn, ListenOptions, Server};
use uvcluster::uv::{Loop, RunMode, Tcp};

const RESPONSE_KEEP_ALIVE: &[u8] =
    b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 12\r\n\r\nhello world\n";
const RESPONSE_CLOSE: &[u8] = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 12\r\nConnection: close\r\n\r\nhello world\n";

fn main() -> io::Result<()> {
    env_logger::init();
    let mut lp = Loop::new()?;
    match cluster::setup_worker(&mut lp)? {
        Some(worker) => run_worker(&mut lp, worker)?,
        None => run_primary(&mut lp)?,
    }
    lp.run(RunMode::Default)?;
    Ok(())
}

fn port() -> u16 {
    std::env::var("PORT")
        .ok()
        .and_then(|p| p.parse().ok())
        .unwrap_or(8000)
}

fn run_worker(lp: &mut Loop, worker: Worker) -> io::Result<()> {
    let conns = Rc::new(Cell::new(0u64));
    let c = conns.clone();
    let server = Server::new(move |lp, server, conn| {
        c.set(c.get() + 1);
        if let Conn::Tcp(t) = conn {
            serve_http(lp, server.clone(), t);
        } else {
            server.close_connection(lp, conn);
        }
    });
    worker.on_message(move |lp, w, msg, _| {
        if msg == json!("count") {
            let _ = w.send(lp, &json!({ "conns": conns.get() }), None);
        }
    });
    server.listen(lp, ListenOptions::port(port()), |_, _, r| {
        if let Err(e) = r {
            eprintln!("worker {}: {e}", std::process::id());
            std::process::exit(1);
        }
    })
}

/// One HTTP/1.1 connection: parse each complete request (pipelining
/// allowed) and answer it; `Connection: close` (or HTTP/1.0 without
/// keep-alive) ends the connection after the response.
fn serve_http(lp: &mut Loop, server: Server, t: uvcluster::uv::Handle<Tcp>) {
    let mut pending: Vec<u8> = Vec::new();
    let s = server.clone();
    let r = lp.read_start(t, move |lp, t, r| {
        let data = match r {
            Ok(d) if !d.is_empty() => d,
            _ => {
                s.close_connection(lp, Conn::Tcp(t));
                return;
            }
        };
        let buf: &[u8] = if pending.is_empty() {
            data
        } else {
            pending.extend_from_slice(data);
            &pending
        };
        let mut off = 0;
        let mut close = false;
        let mut out = 0usize;
        let mut sleep_ms = 0u64;
        while off < buf.len() && !close {
            let mut headers = [httparse::EMPTY_HEADER; 32];
            let mut req = httparse::Request::new(&mut headers);
            match req.parse(&buf[off..]) {
                Ok(httparse::Status::Complete(n)) => {
                    off += n;
                    // `GET /sleep/<ms>`: answer after that long (the
                    // slow-handler workload of the dispatch benchmarks).
                    if let Some(ms) = req.path.and_then(|p| p.strip_prefix("/sleep/")) {
                        sleep_ms = sleep_ms.max(ms.parse().unwrap_or(0));
                    }
                    let conn_hdr = req
                        .headers
                        .iter()
                        .find(|h| h.name.eq_ignore_ascii_case("connection"))
                        .map(|h| h.value.to_ascii_lowercase());
                    close = match req.version {
                        Some(0) => conn_hdr.as_deref() != Some(b"keep-alive"),
                        _ => conn_hdr.as_deref() == Some(b"close"),
                    };
                    out += 1;
                }
                Ok(httparse::Status::Partial) => break,
                Err(_) => {
                    close = true;
                    off = buf.len();
                }
            }
        }
        let rest = buf[off..].to_vec();
        pending = rest;
        if out > 0 {
            let mut resp = Vec::with_capacity(out * RESPONSE_KEEP_ALIVE.len());
            for i in 0..out {
                resp.extend_from_slice(if close && i == out - 1 {
                    RESPONSE_CLOSE
                } else {
                    RESPONSE_KEEP_ALIVE
                });
            }
            if sleep_ms > 0 {
                let _ = lp.read_stop(t);
                let timer = lp.timer_init();
                let s = s.clone();
                let _ = lp.timer_start(timer, sleep_ms, 0, move |lp, timer| {
                    let _ = lp.close(timer, |_| {});
                    let _ = lp.write(t, &[&resp], |_, _, _| {});
                    end_connection(lp, &s, t);
                });
                return;
            }
            let _ = lp.write(t, &[&resp], |_, _, _| {});
        }
        if close {
            let _ = lp.read_stop(t);
            end_connection(lp, &s, t);
        }
    });
    if r.is_err() {
        server.close_connection(lp, Conn::Tcp(t));
    }
}

/// Shuts the write side once the response is out, then closes.
fn end_connection(lp: &mut Loop, s: &Server, t: uvcluster::uv::Handle<Tcp>) {
    let s2 = s.clone();
    if lp
        .shutdown(t, move |lp, t, _| s2.close_connection(lp, Conn::Tcp(t)))
        .is_err()
    {
        s.close_connection(lp, Conn::Tcp(t));
    }
}

fn run_primary(_lp: &mut Loop) -> io::Result<()> {
    Err(io::Error::other(
        "the primary side lands with the cluster primary",
    ))
}
