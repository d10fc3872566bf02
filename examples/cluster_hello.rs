//! The same program as Node's reference cluster server
//! (`bench/reference/node-baseline/server.js`): an HTTP/1.1 hello world on
//! `PORT` (default 8000) served by `WORKERS` workers (default: the number
//! of CPUs), with the policy from `NODE_CLUSTER_SCHED_POLICY`. On SIGUSR2
//! the primary prints each worker's connection and request counts as one
//! JSON line keyed by worker id, `{"1":{"conns":3,"reqs":5},...}` (Node's
//! reference server prints the connection counts alone, `{"1":3,...}`).
//!
//! Run as a worker under any primary (ours or Node's, with
//! `process.execPath` set to this binary) it serves on `PORT`.
//!
//! `cargo run --release --example cluster_hello`

use std::cell::{Cell, RefCell};
use std::collections::BTreeMap;
use std::io;
use std::rc::Rc;

use serde_json::json;
use uvcluster::cluster::{self, Primary, Settings, Worker};
use uvcluster::net::{Conn, ListenOptions, Server};
use uvcluster::uv::{Loop, RunMode, Tcp};

const RESPONSE_KEEP_ALIVE: &[u8] =
    b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 12\r\n\r\nhello world\n";
const RESPONSE_CLOSE: &[u8] = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 12\r\nConnection: close\r\n\r\nhello world\n";

fn main() -> io::Result<()> {
    env_logger::init();
    let mut lp = Loop::new()?;
    match cluster::setup_worker(&mut lp)? {
        Some(worker) => run_worker(&mut lp, Some(worker))?,
        // WORKERS=0: no cluster, one process serves (the limit of the
        // machine for the dispatch benchmarks).
        None if std::env::var("WORKERS").as_deref() == Ok("0") => {
            run_worker(&mut lp, None)?;
            for signum in [nix::libc::SIGINT, nix::libc::SIGTERM] {
                let sig = lp.signal_init();
                lp.signal_start(sig, signum, |_, _, _| std::process::exit(0))?;
                lp.unref_handle(sig)?;
            }
            println!("ready");
        }
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

fn run_worker(lp: &mut Loop, worker: Option<Worker>) -> io::Result<()> {
    let conns = Rc::new(Cell::new(0u64));
    let reqs = Rc::new(Cell::new(0u64));
    let (c, r) = (conns.clone(), reqs.clone());
    let server = Server::new(move |lp, server, conn| {
        c.set(c.get() + 1);
        if let Conn::Tcp(t) = conn {
            serve_http(lp, server.clone(), t, r.clone());
        } else {
            server.close_connection(lp, conn);
        }
    });
    if let Some(worker) = worker {
        worker.on_message(move |lp, w, msg, _| {
            if msg == json!("count") {
                let counts = json!({ "conns": conns.get(), "reqs": reqs.get() });
                let _ = w.send(lp, &counts, None);
            }
        });
    }
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
fn serve_http(lp: &mut Loop, server: Server, t: uvcluster::uv::Handle<Tcp>, reqs: Rc<Cell<u64>>) {
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
                    // `GET /spin/<ms>`: a handler that keeps the CPU (and
                    // so this worker's loop) busy that long: the slow
                    // requests of the slow-handler workload.
                    if let Some(ms) = req.path.and_then(|p| p.strip_prefix("/spin/")) {
                        let until = std::time::Instant::now()
                            + std::time::Duration::from_millis(ms.parse().unwrap_or(0));
                        while std::time::Instant::now() < until {
                            std::hint::spin_loop();
                        }
                    }
                    // `GET /block/<ms>`: a handler that blocks this
                    // worker's loop that long without using the CPU, as a
                    // synchronous file or lock wait does.
                    if let Some(ms) = req.path.and_then(|p| p.strip_prefix("/block/")) {
                        std::thread::sleep(std::time::Duration::from_millis(
                            ms.parse().unwrap_or(0),
                        ));
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
                    reqs.set(reqs.get() + 1);
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

fn run_primary(lp: &mut Loop) -> io::Result<()> {
    let n: usize = std::env::var("WORKERS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(2, |n| n.get()));
    let primary = Primary::new();
    // Workers are this same program (the default exec), run with no
    // arguments; PORT and the policy reach them through the environment.
    primary.setup_primary(
        lp,
        Settings {
            args: Some(Vec::new()),
            ..Settings::default()
        },
    );
    let ready = Rc::new(Cell::new(0usize));
    primary.on_listening(move |_, _, _| {
        ready.set(ready.get() + 1);
        if ready.get() == n {
            println!("ready");
        }
    });
    // SIGUSR2: ask every worker for its counts; print them as one JSON
    // object keyed by worker id once all have answered.
    let counts: Rc<RefCell<BTreeMap<u32, serde_json::Value>>> = Rc::default();
    let c = counts.clone();
    let p = primary.clone();
    primary.on_message(move |_, w, msg, _| {
        if msg.get("conns").is_some() {
            c.borrow_mut().insert(w.id(), msg);
            if c.borrow().len() == p.workers().len() {
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
    primary.on_exit(|_, w, code, signal| {
        eprintln!(
            "worker {} exited (code {code:?}, signal {signal:?})",
            w.id()
        );
    });
    let usr2 = lp.signal_init();
    let p = primary.clone();
    lp.signal_start(usr2, nix::libc::SIGUSR2, move |lp, _, _| {
        counts.borrow_mut().clear();
        for w in p.workers() {
            let _ = w.send(lp, &json!("count"), None);
        }
    })?;
    lp.unref_handle(usr2)?;
    // SIGINT/SIGTERM: a graceful disconnect; the loop ends with the workers.
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
