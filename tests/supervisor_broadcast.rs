//! `Supervisor::set_broadcast` and `Supervisor::send_all` with Rust
//! workers (this test binary, re-run as the helper `bcast_worker`): a
//! message from one worker reaches every other worker, never its sender;
//! the supervisor's `'ready'` message is not relayed; the primary's own
//! `on_message` still sees every message; without broadcast nothing is
//! relayed.
//!
//! No test sleeps: each drives the loop until a condition or a deadline.

mod supervisor_common;
mod util;

use std::cell::RefCell;
use std::collections::BTreeSet;
use std::rc::Rc;

use serde_json::{Value, json};
use supervisor_common::*;
use uvcluster::cluster::{self, SchedulingPolicy};
use uvcluster::supervisor::ReadyMode;
use uvcluster::uv::{Loop, RunMode};

const HELPER: &str = "bcast_worker";

/// The worker: listens (through the primary), says `'ready'`, and on
/// `{"say": true}` from the primary sends `{"hi": ID}`; any other message
/// it receives, except such reports, it reports as `{"got": MESSAGE,
/// "by": ID}`.
#[test]
fn bcast_worker() {
    if !util::is_helper(HELPER) {
        return;
    }
    let mut lp = Loop::new().unwrap();
    let w = cluster::setup_worker(&mut lp).unwrap().expect("a worker");
    let _server = util::serve_hello(&mut lp, 0);
    w.on_message(&mut lp, |lp, w, msg, _| {
        let reply = if msg == json!({"say": true}) {
            json!({"hi": w.id()})
        } else if msg.get("got").is_none() {
            json!({"got": msg, "by": w.id()})
        } else {
            // Another worker's report, relayed: answering it would relay
            // forever (as with Node's classic relaying primary).
            return;
        };
        w.send(lp, &reply, None).unwrap();
    });
    w.send(&mut lp, &json!("ready"), None).unwrap();
    lp.run(RunMode::Default).unwrap();
}

/// Three workers; `rounds` times, the primary asks each to say hi
/// (`send_all`) and waits for the three hellos; then it waits until
/// `done` holds for the `(from, by)` pairs of relayed hellos the workers
/// reported, and returns them.
fn run(
    broadcast: bool,
    rounds: usize,
    done: impl Fn(&BTreeSet<(u64, u64)>) -> bool,
) -> BTreeSet<(u64, u64)> {
    let mut lp = Loop::new().unwrap();
    let mut cfg = config(3);
    cfg.ready = ReadyMode::Message;
    let s = supervisor(
        &mut lp,
        rust_settings(HELPER, "", SchedulingPolicy::RoundRobin),
        cfg,
    );
    s.sup.set_broadcast(&mut lp, broadcast);
    let pairs: Rc<RefCell<BTreeSet<(u64, u64)>>> = Rc::default();
    let his = Rc::new(RefCell::new(0usize));
    let others: Rc<RefCell<Vec<Value>>> = Rc::default();
    {
        let (pairs, his, others) = (pairs.clone(), his.clone(), others.clone());
        s.sup.on_message(&mut lp, move |_, _, msg| {
            if msg.get("hi").is_some() {
                *his.borrow_mut() += 1;
            } else if let (Some(from), Some(by)) = (msg["got"]["hi"].as_u64(), msg["by"].as_u64()) {
                pairs.borrow_mut().insert((from, by));
            } else {
                others.borrow_mut().push(msg);
            }
        });
    }
    s.sup.start(&mut lp);
    util::run_until(&mut lp, 20_000, |lp| s.ready_workers(lp) == 3);
    for k in 1..=rounds {
        assert_eq!(s.sup.send_all(&mut lp, &json!({"say": true})).pool, 3);
        let his = his.clone();
        util::run_until(&mut lp, 20_000, move |_| *his.borrow() == 3 * k);
    }
    {
        let pairs = pairs.clone();
        util::run_until(&mut lp, 20_000, move |_| done(&pairs.borrow()));
    }
    // The primary's own callback saw each hello; nothing else came (a
    // relayed 'ready' would be reported as {"got": "ready"}).
    assert_eq!(*his.borrow(), 3 * rounds);
    assert!(others.borrow().is_empty(), "{:?}", others.borrow());
    s.sup.stop(&mut lp, true);
    let exit = s.exit.clone();
    util::run_until(&mut lp, 20_000, move |_| exit.get().is_some());
    assert_eq!(s.exit.get(), Some(0));
    lp.run(RunMode::Default).unwrap();
    pairs.take()
}

#[test]
fn broadcast_relays_to_every_other_worker_never_the_sender() {
    let pairs = run(true, 1, |p| p.len() >= 6);
    assert_eq!(pairs.len(), 6, "{pairs:?}");
    let ids: BTreeSet<u64> = pairs.iter().map(|p| p.0).collect();
    assert_eq!(ids.len(), 3, "{pairs:?}");
    for &(from, by) in &pairs {
        assert_ne!(from, by, "a sender got its own message back: {pairs:?}");
    }
}

#[test]
fn without_broadcast_nothing_is_relayed() {
    // Two rounds: a hello of the first round relayed to a worker would
    // reach it before the primary's second `say` (one ordered channel),
    // so its report would come before that worker's second hello, which
    // the second round waits for.
    let pairs = run(false, 2, |_| true);
    assert!(pairs.is_empty(), "{pairs:?}");
}
