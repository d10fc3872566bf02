//! `uvcluster run --broadcast`: every user message a worker sends is
//! relayed by the primary to every other worker, so the seed's visit
//! counter (tests/node/visit_counter.js) works unchanged with Node
//! workers: after N visits spread over two workers, each one's count is
//! N. Without `--broadcast` each counts only its own.

#[path = "../../tests/util/mod.rs"]
mod util;

mod ops_util;

use std::collections::HashMap;

use nix::sys::signal::Signal;
use ops_util::*;
use uvcluster::serde_json::{self, Value};

const VISITS: u64 = 40;

/// Runs the counter app on 2 workers, makes [`VISITS`] visits, and
/// returns each worker's `{visits, served}` once both have been seen and
/// `done` holds for them (with a deadline).
fn counts(broadcast: bool, done: impl Fn(&Value) -> bool) -> HashMap<i64, Value> {
    util::require_node();
    let dir = TempDir::new("broadcast");
    let sock = dir.join("c.sock");
    let port = free_port();
    let app = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../tests/node/visit_counter.js"
    );
    let port_s = port.to_string();
    let mut args = vec!["run", "-w", "2", "--control", sock.to_str().unwrap()];
    if broadcast {
        args.push("--broadcast");
    }
    args.extend(["--", "node", app]);
    let mut r = Running::start(&args, &[("PORT", &port_s)]);
    r.expect(" ready");
    r.expect(" ready");
    for _ in 0..VISITS {
        let (code, body) = get(port, "/").unwrap();
        assert_eq!(code, 200, "{body}");
    }
    let mut seen: HashMap<i64, Value> = HashMap::new();
    eventually("both workers report their final counts", || {
        let (_, body) = get(port, "/count").unwrap();
        let v: Value = serde_json::from_str(&body).unwrap();
        seen.insert(v["pid"].as_i64().unwrap(), v);
        seen.len() == 2 && seen.values().all(&done)
    });
    r.signal(Signal::SIGTERM);
    assert_eq!(r.wait().0, Some(0));
    seen
}

#[test]
fn broadcast_keeps_every_node_workers_visit_counter_at_the_total() {
    let seen = counts(true, |v| v["visits"] == VISITS);
    let served: Vec<u64> = seen
        .values()
        .map(|v| v["served"].as_u64().unwrap())
        .collect();
    // Spread over both workers (round-robin), and the counts are the
    // total, not each worker's own.
    assert_eq!(served.iter().sum::<u64>(), VISITS, "{seen:?}");
    assert!(served.iter().all(|&s| s > 0 && s < VISITS), "{seen:?}");
}

#[test]
fn without_broadcast_each_worker_counts_only_its_own() {
    let seen = counts(false, |v| v["visits"] == v["served"]);
    let served: u64 = seen.values().map(|v| v["served"].as_u64().unwrap()).sum();
    assert_eq!(served, VISITS, "{seen:?}");
    assert!(seen.values().all(|v| v["visits"] != VISITS), "{seen:?}");
}
