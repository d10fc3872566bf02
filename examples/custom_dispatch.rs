//! Connection dispatch without the cluster module: a parent accepts TCP
//! connections and passes each one to a child over Node's IPC protocol
//! with its own algorithm (here: the child with the fewest connections in
//! hand, ties to the lowest id). Each child greets the client with its pid
//! and hangs up, then tells the parent it is done.
//!
//! `cargo run --release --example custom_dispatch` then
//! `nc 127.0.0.1 8001` (CHILDREN, default 2; PORT, default 8001; Ctrl-C
//! to stop).

use std::cell::RefCell;
use std::io;
use std::rc::Rc;

use serde_json::json;
use uvcluster::ipc::{AfterAck, Attach, Channel, ChannelOptions, ForkOptions, HandleKind, fork};
use uvcluster::uv::{BindFlags, Loop, RunMode, Signum, Socket};

fn main() -> io::Result<()> {
    let mut lp = Loop::new()?;
    if std::env::args().nth(1).as_deref() == Some("child") {
        child(&mut lp)?;
    } else {
        parent(&mut lp)?;
    }
    lp.run(RunMode::Default)?;
    Ok(())
}

fn parent(lp: &mut Loop) -> io::Result<()> {
    // A bad value is an error that names it, never a silent default.
    let fail = |msg: String| -> ! {
        eprintln!("custom_dispatch: {msg}");
        std::process::exit(1)
    };
    let n: usize = match std::env::var("CHILDREN") {
        Err(_) => 2,
        Ok(v) => v
            .parse()
            .ok()
            .filter(|n| *n > 0 && v.bytes().all(|b| b.is_ascii_digit()))
            .unwrap_or_else(|| {
                fail(format!(
                    "CHILDREN should be a whole number above 0. Received {v:?}"
                ))
            }),
    };
    let port = uvcluster::net::port_from_env("PORT", 8001).unwrap_or_else(|e| fail(e.to_string()));
    let exe = std::env::current_exe()?;
    // Per child: its channel and how many connections it has in hand.
    let children: Rc<RefCell<Vec<(Channel, usize)>>> = Rc::default();
    for id in 0..n {
        let mut opts = ForkOptions::exec(&exe);
        opts.process.args = vec!["child".into()];
        opts.process.on_exit = Some(Box::new(|lp, p, code, sig| {
            eprintln!(
                "child exited: code {code} signal {}",
                sig.map_or(0, Signum::as_raw)
            );
            lp.close_if_open(p);
        }));
        let forked = fork(lp, opts)?;
        let kids = children.clone();
        forked.channel.on_message(lp, move |_, _, msg, _| {
            if msg["done"].as_bool() == Some(true) {
                kids.borrow_mut()[id].1 -= 1;
            }
        });
        children.borrow_mut().push((forked.channel, 0));
    }
    let server = lp.tcp_init();
    lp.tcp_bind(server, ([127, 0, 0, 1], port).into(), BindFlags::default())?;
    let kids = children.clone();
    lp.tcp_listen(server, 511, move |lp, _, client| {
        let Ok(client) = client else { return };
        let mut k = kids.borrow_mut();
        let Some((i, _)) = k
            .iter()
            .enumerate()
            .min_by_key(|(i, (_, load))| (*load, *i))
        else {
            lp.close_if_open(client);
            return;
        };
        k[i].1 += 1;
        let ch = k[i].0;
        drop(k);
        let attach = Attach {
            handle: client.into(),
            kind: HandleKind::NetSocket,
            // Like Node's net.Socket: our copy closes once the child has it.
            after_ack: AfterAck::Close,
        };
        if let Err(e) = ch.send_handle(lp, json!({"conn": true}), attach, Default::default(), None)
        {
            eprintln!("dispatch failed: {e}");
            lp.close_if_open(client);
        }
    })?;
    println!("listening on 127.0.0.1:{port} with {n} children");
    // Ctrl-C: close the listener and the channels; children exit on EOF.
    let sig = lp.signal_init();
    lp.signal_start(sig, Signum::SIGINT, move |lp, sig, _| {
        lp.close_if_open(server);
        for (ch, _) in children.borrow().iter() {
            ch.disconnect(lp);
        }
        lp.close_if_open(sig);
    })?;
    Ok(())
}

fn child(lp: &mut Loop) -> io::Result<()> {
    let ch = Channel::from_env(lp, ChannelOptions::default())?
        .ok_or_else(|| io::Error::other("child started without NODE_CHANNEL_FD"))?;
    let greeting = format!("Handled by child {}\n", std::process::id());
    ch.on_message(lp, move |lp, ch, _msg, handle| {
        let Some(Socket::Tcp(sock)) = handle else {
            return;
        };
        let r = lp.write(sock, &[greeting.as_bytes()], move |lp, sock, _| {
            lp.close_if_open(sock);
            let _ = ch.send(lp, &json!({"done": true}), None);
        });
        if r.is_err() {
            lp.close_if_open(sock);
        }
    });
    // The parent going away ends the child.
    ch.on_disconnect(lp, |_, _| {});
    Ok(())
}
