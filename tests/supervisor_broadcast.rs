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

/// WARN lines logged in this test binary (the relay test's logger).
static WARNINGS: std::sync::Mutex<Vec<String>> = std::sync::Mutex::new(Vec::new());

struct Capture;

impl log::Log for Capture {
    fn enabled(&self, m: &log::Metadata) -> bool {
        m.level() <= log::Level::Warn
    }
    fn log(&self, r: &log::Record) {
        if self.enabled(r.metadata()) {
            let line = r.args().to_string();
            eprintln!("WARN {line}");
            WARNINGS.lock().unwrap().push(line);
        }
    }
    fn flush(&self) {}
}

fn warnings(needle: &str) -> Vec<String> {
    let w = WARNINGS.lock().unwrap();
    w.iter().filter(|l| l.contains(needle)).cloned().collect()
}

/// The relay buffered without limit for a worker that does not read: one
/// worker stopped (SIGSTOP), the other sending 500 × 10 KB messages, and
/// the primary's memory grew by the whole flood. Now the stopped worker's
/// channel stays under the bound (plus one message), the relay counts
/// what it dropped and WARNs once; after SIGCONT the worker reads again
/// and receives new relayed messages, with the "reading again" WARN.
#[test]
fn broadcast_drops_for_a_worker_that_does_not_read() {
    util::require_node();
    log::set_logger(&Capture).expect("the only logger of this binary");
    log::set_max_level(log::LevelFilter::Warn);
    let mut lp = Loop::new().unwrap();
    let mut settings = node_settings("serve", SchedulingPolicy::RoundRobin);
    settings.exec = Some(node_script("bcast_flood.js"));
    let s = supervisor(&mut lp, settings, config(2));
    s.sup.set_broadcast(&mut lp, true);
    let pads = Rc::new(RefCell::new(0usize));
    let after: Rc<RefCell<Vec<u64>>> = Rc::default();
    {
        let (pads, after) = (pads.clone(), after.clone());
        s.sup.on_message(&mut lp, move |_, _, msg| {
            if msg.get("pad").is_some() {
                *pads.borrow_mut() += 1;
            } else if let Some(id) = msg["gotAfter"].as_u64() {
                after.borrow_mut().push(id);
            }
        });
    }
    start_ready(&mut lp, &s, 2);
    let rows = s.sup.status(&lp);
    let (a, b) = (rows[0].id.unwrap(), rows[1].id.unwrap());
    let b_pid = rows[1].pid.unwrap();
    let b_channel = s
        .sup
        .primary(&lp)
        .worker(&lp, b)
        .unwrap()
        .channel(&lp)
        .unwrap();

    kill(b_pid, nix::sys::signal::Signal::SIGSTOP);
    s.sup
        .send_all(&mut lp, &json!({"flood": a, "n": 500, "tag": "flood"}));
    let mut most = 0;
    {
        let pads = pads.clone();
        util::run_until(&mut lp, LIMIT_MS, |lp| {
            most = most.max(b_channel.write_queue_size(lp));
            *pads.borrow() == 500
        });
    }
    let bound = uvcluster::supervisor::RELAY_QUEUE_LIMIT + 11 * 1024;
    assert!(most <= bound, "{most} bytes queued for the stopped worker");
    assert!(b_channel.write_queue_size(&lp) <= bound);
    let dropped = s
        .sup
        .broadcast_dropped(&lp, b)
        .expect("an episode under way");
    assert!(dropped > 300, "only {dropped} dropped of 500 × 10 KB");
    let stop_warn = warnings(&format!("worker {b} (pid {b_pid}) is not reading"));
    assert_eq!(stop_warn.len(), 1, "{stop_warn:?}");
    assert_eq!(
        s.sup.broadcast_dropped(&lp, a),
        None,
        "the reader lost nothing"
    );

    // Let it read: its channel drains, then a new relayed message reaches it.
    kill(b_pid, nix::sys::signal::Signal::SIGCONT);
    util::run_until(&mut lp, LIMIT_MS, |lp| b_channel.write_queue_size(lp) == 0);
    s.sup
        .send_all(&mut lp, &json!({"flood": a, "n": 1, "tag": "after"}));
    {
        let after = after.clone();
        util::run_until(&mut lp, LIMIT_MS, move |_| !after.borrow().is_empty());
    }
    assert_eq!(*after.borrow(), vec![b as u64]);
    assert_eq!(s.sup.broadcast_dropped(&lp, b), None);
    let again = warnings(&format!(
        "worker {b} (pid {b_pid}) is reading again; {dropped} messages were dropped"
    ));
    assert_eq!(again.len(), 1, "{:?}", WARNINGS.lock().unwrap());
    assert_eq!(stop_and_wait(&mut lp, &s), 0);
}
