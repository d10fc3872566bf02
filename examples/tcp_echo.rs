//! A TCP echo server on the uvcluster loop: the smallest complete program.
//!
//! ```text
//! PORT=7000 cargo run --example tcp_echo     # PORT=0 picks a free port
//! ```
//!
//! It binds `127.0.0.1:$PORT` (default 7000; a value that is not a port is
//! an error naming it), prints `listening on ADDR`, echoes every connection
//! until the client's EOF, and on SIGINT or SIGTERM closes the server and
//! every client and lets the loop run to completion, so it exits 0 with
//! every handle closed (libuv's `uv_walk` + `uv_close` shutdown idiom).
//!
//! A client that sends without reading cannot make the server buffer
//! without bound: once `HIGH_WATER` bytes of echoes wait to be written,
//! the server stops reading that client until they have gone out (the
//! back-pressure idiom of libuv's stream API).

use std::io;
use std::net::SocketAddr;
use std::process::ExitCode;

use uvcluster::uv::{AnyHandle, BindFlags, Handle, Loop, RunMode, Signum, Tcp};

/// Echoes queued for one client beyond which its reading pauses (bytes).
const HIGH_WATER: usize = 1 << 20;

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("tcp_echo: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run() -> io::Result<()> {
    let port = uvcluster::net::port_from_env("PORT", 7000)?;
    let mut lp = Loop::new()?;

    let server = lp.tcp_init();
    // EADDRINUSE is reported by tcp_listen, not tcp_bind (as in libuv).
    lp.tcp_bind(
        server,
        SocketAddr::from(([127, 0, 0, 1], port)),
        BindFlags::default(),
    )?;
    lp.tcp_listen(server, 128, on_connection)?;
    println!("listening on {}", lp.tcp_getsockname(server)?);

    for signum in [Signum::SIGINT, Signum::SIGTERM] {
        let sig = lp.signal_init();
        lp.signal_start(sig, signum, |lp, _sig, signum| {
            eprintln!("tcp_echo: signal {}, closing", signum.as_raw());
            close_all(lp);
        })?;
    }

    // Returns once every handle is closed: nothing is left to keep it alive.
    lp.run(RunMode::Default)?;
    debug_assert_eq!(lp.handle_count(), 0);
    Ok(())
}

/// The server hands each accepted client over as a new handle that this
/// callback owns (libuv would call `uv_accept` here).
fn on_connection(lp: &mut Loop, _server: Handle<Tcp>, client: io::Result<Handle<Tcp>>) {
    match client {
        Ok(c) => {
            if let Err(e) = lp.read_start(c, on_read) {
                eprintln!("tcp_echo: read_start: {e}");
                lp.close_if_open(c);
            }
        }
        // Transient accept errors never get here; the server keeps listening.
        Err(e) => eprintln!("tcp_echo: accept: {e}"),
    }
}

/// `data` borrows the loop's read buffer; `write` copies what the socket
/// does not take at once, so nothing has to outlive this call. The copies
/// are bounded: past `HIGH_WATER` queued bytes, reading stops until the
/// client has taken them.
fn on_read(lp: &mut Loop, c: Handle<Tcp>, data: io::Result<&[u8]>) {
    match data {
        // EOF: flush the echoes still queued, then close.
        Ok([]) => {
            if lp
                .shutdown(c, |lp, c, _| {
                    lp.close_if_open(c);
                })
                .is_err()
            {
                lp.close_if_open(c);
            }
        }
        Ok(data) => {
            // Writes complete in order, so when this one has, the queue is
            // empty: if it fills the queue, reading pauses until then.
            let pause = lp.write_queue_size(c) + data.len() > HIGH_WATER;
            let written = if pause {
                lp.write(c, &[data], on_drained)
            } else {
                lp.write(c, &[data], on_written)
            };
            match written {
                Err(e) => {
                    eprintln!("tcp_echo: write: {e}");
                    lp.close_if_open(c);
                }
                Ok(()) if pause => {
                    let _ = lp.read_stop(c);
                }
                Ok(()) => {}
            }
        }
        Err(e) => {
            eprintln!("tcp_echo: read: {e}");
            lp.close_if_open(c);
        }
    }
}

fn on_written(lp: &mut Loop, c: Handle<Tcp>, res: io::Result<()>) {
    // ECANCELED after our own close is expected; other errors end the client.
    if let Err(e) = res
        && !lp.is_closing(c)
    {
        eprintln!("tcp_echo: write: {e}");
        lp.close_if_open(c);
    }
}

/// The write that filled the queue has gone out: read again.
fn on_drained(lp: &mut Loop, c: Handle<Tcp>, res: io::Result<()>) {
    let ok = res.is_ok();
    on_written(lp, c, res);
    if ok && !lp.is_closing(c) && lp.read_start(c, on_read).is_err() {
        lp.close_if_open(c);
    }
}

/// Closes a client unless it is already closing (closing twice is an error).
/// Closes every handle the program created: the server, the clients and
/// the signal watchers. The loop then has nothing left and `run` returns.
fn close_all(lp: &mut Loop) {
    let mut handles = Vec::new();
    lp.walk(|h| handles.push(h));
    for h in handles {
        match h {
            AnyHandle::Tcp(_) | AnyHandle::Signal(_) => {
                lp.close_if_open(h);
            }
            _ => {}
        }
    }
}
