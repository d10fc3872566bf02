//! IPC round trips per second, Rust to Rust next to Node to Node in the
//! same run (issue figures: `ipc_messages`, `ipc_handles`).
//!
//! `cargo run --release -p uvcluster-bench --bin ipc_bench -- [secs=3] [window=32]`
//!
//! A parent forks a child over Node's IPC protocol and keeps `window`
//! messages in flight: the child answers each message, and each answer lets
//! the parent send one more. `messages` sends a small user
//! message; `handles` sends one connected TCP socket with each message
//! (kept open by the sender, closed by the receiver), so each round trip
//! includes the fd passing and its `NODE_HANDLE_ACK`. The Node side runs
//! `bench/node/ipc_bench.js`, the same protocol between two `node`
//! processes.

use std::cell::Cell;
use std::io;
use std::process::Command;
use std::rc::Rc;
use std::time::{Duration, Instant};

use serde_json::json;
use uvcluster::ipc::{AfterAck, Attach, Channel, ChannelOptions, ForkOptions, HandleKind, fork};
use uvcluster::uv::{BindFlags, Loop, RunMode};

fn main() -> io::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.first().map(String::as_str) == Some("child") {
        return child();
    }
    let secs: f64 = args.first().and_then(|s| s.parse().ok()).unwrap_or(3.0);
    let window: u64 = args.get(1).and_then(|s| s.parse().ok()).unwrap_or(32);
    println!("{secs} s per run, {window} in flight");
    println!("| workload | uvcluster (round trips/s) | node (round trips/s) | ratio |");
    println!("| --- | --- | --- | --- |");
    for mode in ["messages", "handles"] {
        let ours = rust_rate(mode, secs, window)?;
        let node = node_rate(mode, secs, window);
        match node {
            Some(n) => println!("| ipc_{mode} | {ours:.0} | {n:.0} | {:.1}× |", ours / n),
            None => println!("| ipc_{mode} | {ours:.0} | (node not found) | |"),
        }
    }
    Ok(())
}

fn node_rate(mode: &str, secs: f64, window: u64) -> Option<f64> {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/node/ipc_bench.js");
    let out = Command::new("node")
        .arg(script)
        .arg(mode)
        .arg(secs.to_string())
        .arg(window.to_string())
        .output()
        .ok()?;
    let text = String::from_utf8_lossy(&out.stdout);
    text.split_whitespace()
        .find_map(|f| f.strip_prefix("rate="))
        .and_then(|r| r.parse().ok())
}

fn rust_rate(mode: &'static str, secs: f64, window: u64) -> io::Result<f64> {
    let mut lp = Loop::new()?;
    let mut opts = ForkOptions::exec(std::env::current_exe()?);
    opts.process.args = vec!["child".into()];
    opts.process.on_exit = Some(Box::new(|lp, p, _, _| {
        lp.close_if_open(p);
    }));
    let forked = fork(&mut lp, opts)?;
    let ch = forked.channel;
    // For `handles`: one connected socket, sent again and again.
    let sock = if mode == "handles" {
        let server = lp.tcp_init();
        lp.tcp_bind(server, ([127, 0, 0, 1], 0).into(), BindFlags::default())?;
        let addr = lp.tcp_getsockname(server)?;
        lp.tcp_listen(server, 16, move |lp, server, c| {
            if let Ok(c) = c {
                lp.close_if_open(c);
            }
            lp.close_if_open(server);
        })?;
        let s = lp.tcp_init();
        lp.tcp_connect(s, addr, |_, _, r| r.expect("connect"))?;
        Some(s)
    } else {
        None
    };
    let count = Rc::new(Cell::new(0u64));
    let end = Instant::now() + Duration::from_secs_f64(secs);
    let start = Instant::now();
    let send = move |lp: &mut Loop, ch: Channel, n: u64| match sock {
        Some(s) => {
            let attach = Attach {
                handle: s.into(),
                kind: HandleKind::NetSocket,
                after_ack: AfterAck::Keep,
            };
            ch.send_handle(lp, json!({ "n": n }), attach, Default::default(), None)
        }
        None => ch.send(lp, &json!({ "n": n, "payload": "ping" }), None),
    };
    let c = count.clone();
    let done = Rc::new(Cell::new(false));
    ch.on_message(&mut lp, move |lp, ch, _, _| {
        c.set(c.get() + 1);
        if done.get() {
            return;
        }
        if Instant::now() >= end {
            done.set(true);
            ch.disconnect(lp);
            if let Some(s) = sock {
                lp.close_if_open(s);
            }
            return;
        }
        send(lp, ch, c.get()).expect("send");
    });
    for i in 0..window {
        send(&mut lp, ch, i)?;
    }
    lp.run(RunMode::Default)?;
    Ok(count.get() as f64 / start.elapsed().as_secs_f64())
}

fn child() -> io::Result<()> {
    let mut lp = Loop::new()?;
    let ch = Channel::from_env(&mut lp, ChannelOptions::default())?
        .ok_or_else(|| io::Error::other("not started by ipc_bench"))?;
    ch.on_message(&mut lp, |lp, ch, msg, handle| {
        if let Some(h) = handle {
            lp.close_if_open(h);
        }
        let _ = ch.send(lp, &msg, None);
    });
    lp.run(RunMode::Default)?;
    Ok(())
}
