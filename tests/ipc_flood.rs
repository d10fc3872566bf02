//! issue 10, part 5: a cluster worker that floods its channel with garbage
//! is cut off, not logged forever. A Rust primary (this test) runs two
//! workers (this binary re-run as helpers): one serves HTTP through the
//! primary (round-robin: the primary accepts every connection and hands it
//! over its channel), the other writes 200,000 malformed lines to its
//! channel. A client keeps making requests before, during and after the
//! flood. The flooding worker is disconnected with one typed error after
//! the budget; only the first few lines are reported; every request is
//! served.

mod util;

use std::cell::{Cell, RefCell};
use std::ffi::OsString;
use std::net::SocketAddr;
use std::rc::Rc;

use util::*;
use uvcluster::cluster::{self, ClusterError, Primary, SchedulingPolicy, Settings};
use uvcluster::ipc::{ChannelError, DEFAULT_MAX_BAD_LINES, DEFAULT_REPORT_BAD_LINES, FrameError};
use uvcluster::uv::{Loop, RunMode};

const HELPER: &str = "helper_flood_cluster_worker";
const GARBAGE_LINES: usize = 200_000;

/// The workers: `ROLE=serve` answers `hello world` over HTTP on port 0
/// (through the primary); `ROLE=flood` writes `GARBAGE_LINES` malformed
/// lines on its channel, and exits when the primary hangs up (a worker
/// whose channel closes unasked exits 0, as in Node).
#[test]
fn helper_flood_cluster_worker() {
    if !is_helper(HELPER) {
        return;
    }
    let mut lp = Loop::new().unwrap();
    let w = cluster::setup_worker(&mut lp)
        .unwrap()
        .expect("started as a worker");
    match std::env::var("ROLE").unwrap().as_str() {
        "serve" => {
            serve_hello(&mut lp, 0);
        }
        "flood" => {
            let pipe = w.channel(&lp).unwrap().pipe();
            let garbage = b"this is not json\n".repeat(GARBAGE_LINES);
            // Fails with EPIPE once the primary has hung up.
            lp.write(pipe, &[&garbage], |_, _, _| {}).unwrap();
        }
        "protocol" => {
            // Well-formed JSON, but a message only a primary may send.
            let pipe = w.channel(&lp).unwrap().pipe();
            let lines = b"{\"cmd\":\"NODE_CLUSTER\",\"act\":\"newconn\",\"key\":\"x\",\"seq\":1}\n"
                .repeat(GARBAGE_LINES);
            lp.write(pipe, &[&lines], |_, _, _| {}).unwrap();
        }
        other => panic!("unknown ROLE {other}"),
    }
    lp.run(RunMode::Default).unwrap();
}

/// The client: `CLIENTS` chains of HTTP requests, each one request at a
/// time, on the primary's own loop, so the loop that is being flooded is
/// also the one that must keep up.
#[derive(Default)]
struct Client {
    served: Cell<usize>,
    failed: Cell<usize>,
    /// Stop once this many have been served (0: not yet decided).
    stop_at: Cell<usize>,
    /// Chains that have stopped.
    done: Cell<usize>,
}

/// Requests in flight at once.
const CLIENTS: usize = 8;

/// At most this many requests, whatever happens.
const MAX_REQUESTS: usize = 20_000;

fn next_request(lp: &mut Loop, addr: SocketAddr, c: Rc<Client>) {
    let stop = c.stop_at.get();
    if (stop != 0 && c.served.get() >= stop) || c.served.get() + c.failed.get() >= MAX_REQUESTS {
        c.done.set(c.done.get() + 1);
        return;
    }
    let h = lp.tcp_init();
    lp.tcp_connect(h, addr, move |lp, h, r| {
        if r.is_err() {
            c.failed.set(c.failed.get() + 1);
            lp.close(h, |_| {}).unwrap();
            return next_request(lp, addr, c);
        }
        lp.write(
            h,
            &[b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"],
            |_, _, _| {},
        )
        .unwrap();
        let mut body = Vec::new();
        lp.read_start(h, move |lp, h, r| {
            match r {
                Ok(d) if !d.is_empty() => return body.extend_from_slice(d),
                Ok(_) if body.ends_with(b"\r\n\r\nhello world\n") => {
                    c.served.set(c.served.get() + 1)
                }
                _ => c.failed.set(c.failed.get() + 1),
            }
            lp.close(h, |_| {}).unwrap();
            next_request(lp, addr, c.clone());
        })
        .unwrap();
    })
    .unwrap();
}

#[test]
fn a_worker_flooding_its_channel_is_cut_off_while_the_others_serve() {
    let mut lp = Loop::new().unwrap();
    let primary = Primary::new(&mut lp);
    primary.setup_primary(
        &mut lp,
        Settings {
            scheduling_policy: Some(SchedulingPolicy::RoundRobin),
            silent: Some(true),
            ..helper_settings(HELPER)
        },
    );
    let role = |r: &str| {
        vec![
            (
                OsString::from("UVCLUSTER_TEST_HELPER"),
                OsString::from(HELPER),
            ),
            (OsString::from("ROLE"), OsString::from(r)),
        ]
    };
    let errors = Rc::new(RefCell::new(Vec::<(u32, String)>::new()));
    let typed = Rc::new(RefCell::new(Vec::<(u32, ChannelError)>::new()));
    {
        let errors = errors.clone();
        primary.on_error(&mut lp, move |_, w, e| {
            errors
                .borrow_mut()
                .push((w.map_or(0, |w| w.id()), e.to_string()));
        });
    }
    let log = Log::new();
    let client = Rc::new(Client::default());
    {
        let client = client.clone();
        let log = log.clone();
        primary.on_listening(&mut lp, move |lp, w, addr| {
            log.push(format!("listening:{}", w.id()));
            let port = addr.port.unwrap() as u16;
            let addr: SocketAddr = ([127, 0, 0, 1], port).into();
            // Requests before, during and after the flood, until 50
            // after the flooder is cut off.
            for _ in 0..CLIENTS {
                next_request(lp, addr, client.clone());
            }
            // The flooder joins once the client is running.
            let p = cluster_primary(lp);
            p.fork(lp, role("flood")).unwrap();
        });
    }
    // Channel errors of the flooder, typed, by reading its worker's events.
    {
        let (typed, log) = (typed.clone(), log.clone());
        primary.on_fork(&mut lp, move |lp, w| {
            log.push(format!("fork:{}", w.id()));
            let (typed, id) = (typed.clone(), w.id());
            w.on_error(lp, move |_, _, e| {
                if let ClusterError::Channel(c) = e {
                    typed.borrow_mut().push((id, clone_channel_error(c)));
                }
            });
        });
    }
    {
        let (client, log) = (client.clone(), log.clone());
        primary.on_disconnect(&mut lp, move |_, w| {
            log.push(format!("disconnect:{}", w.id()));
            if w.id() == 2 {
                // Cut off: fifty more requests, then stop.
                client.stop_at.set(client.served.get() + 50);
            }
        });
    }
    {
        let log = log.clone();
        primary.on_exit(&mut lp, move |_, w, code, signal| {
            log.push(format!("exit:{}:{code:?}:{signal:?}", w.id()))
        });
    }
    PRIMARY.with(|p| *p.borrow_mut() = Some(primary));
    primary.fork(&mut lp, role("serve")).unwrap();

    let c = client.clone();
    let l = log.clone();
    run_until(&mut lp, 60_000, move |_| {
        c.done.get() == CLIENTS && l.joined().contains("exit:2")
    });

    // Every request was served, during the flood too.
    assert_eq!(client.failed.get(), 0);
    assert!(client.served.get() >= 50);
    // The flooder: cut off, its few reports, then the summary.
    let typed = typed.borrow();
    assert!(typed.iter().all(|(id, _)| *id == 2), "{typed:?}");
    assert_eq!(typed.len(), DEFAULT_REPORT_BAD_LINES + 1, "{typed:?}");
    for (_, e) in &typed[..DEFAULT_REPORT_BAD_LINES] {
        assert!(
            matches!(e, ChannelError::Frame(FrameError::Malformed { prefix, .. }) if prefix == "this is not json"),
            "{e:?}"
        );
    }
    assert!(
        matches!(
            typed.last().unwrap().1,
            ChannelError::TooManyBadLines { count, limit }
                if count == DEFAULT_MAX_BAD_LINES + 1 && limit == DEFAULT_MAX_BAD_LINES
        ),
        "{typed:?}"
    );
    assert_eq!(errors.borrow().len(), typed.len(), "{:?}", errors.borrow());
    let events = log.joined();
    assert!(events.contains("disconnect:2"), "{events}");
    assert!(events.contains("exit:2:Some(0):None"), "{events}");
    assert!(!events.contains("disconnect:1"), "{events}");

    primary.disconnect(&mut lp, |_| {});
    PRIMARY.with(|p| p.borrow_mut().take());
    run_with_deadline(&mut lp, 30_000);
    assert!(
        log.joined().contains("exit:1:Some(0):None"),
        "{}",
        log.joined()
    );
}

thread_local! {
    static PRIMARY: RefCell<Option<Primary>> = const { RefCell::new(None) };
}

/// The primary, from inside its own callbacks.
fn cluster_primary(_: &mut Loop) -> Primary {
    PRIMARY.with(|p| (*p.borrow()).unwrap())
}

/// `ChannelError` is not `Clone` (it can hold an `io::Error`); the kinds
/// this test looks at are copied.
fn clone_channel_error(e: &ChannelError) -> ChannelError {
    match e {
        ChannelError::Frame(f) => ChannelError::Frame(f.clone()),
        ChannelError::TooManyBadLines { count, limit } => ChannelError::TooManyBadLines {
            count: *count,
            limit: *limit,
        },
        ChannelError::BadLinesNotReported { count } => {
            ChannelError::BadLinesNotReported { count: *count }
        }
        other => ChannelError::Io(std::io::Error::other(other.to_string())),
    }
}

/// A worker flooding its channel with well-formed cluster messages that
/// break the protocol (`newconn`, which only a primary sends) is cut off
/// by the same budget as one flooding garbage: the first few are reported,
/// then one summary, and its channel is closed (found trying issue 10:
/// 200,000 error lines and 1.45 s of the primary's CPU).
#[test]
fn a_worker_flooding_protocol_errors_is_cut_off() {
    let mut lp = Loop::new().unwrap();
    let primary = Primary::new(&mut lp);
    primary.setup_primary(
        &mut lp,
        Settings {
            silent: Some(true),
            ..helper_settings(HELPER)
        },
    );
    let errors = Rc::new(RefCell::new(Vec::<String>::new()));
    let last_is_budget = Rc::new(Cell::new(false));
    {
        let (errors, last) = (errors.clone(), last_is_budget.clone());
        primary.on_error(&mut lp, move |_, _, e| {
            errors.borrow_mut().push(e.to_string());
            last.set(matches!(
                e,
                ClusterError::Channel(ChannelError::TooManyBadLines { .. })
            ));
        });
    }
    let exits = Rc::new(RefCell::new(Vec::new()));
    let x = exits.clone();
    primary.on_exit(&mut lp, move |_, _, code, signal| {
        x.borrow_mut().push((code, signal))
    });
    primary
        .fork(
            &mut lp,
            vec![
                (
                    OsString::from("UVCLUSTER_TEST_HELPER"),
                    OsString::from(HELPER),
                ),
                (OsString::from("ROLE"), OsString::from("protocol")),
            ],
        )
        .unwrap();
    let x = exits.clone();
    run_until(&mut lp, 60_000, move |_| !x.borrow().is_empty());
    let errors = errors.borrow();
    assert_eq!(errors.len(), DEFAULT_REPORT_BAD_LINES + 1, "{errors:#?}");
    assert!(last_is_budget.get(), "{errors:#?}");
    assert_eq!(*exits.borrow(), vec![(Some(0), None)]);
    run_with_deadline(&mut lp, 10_000);
}
