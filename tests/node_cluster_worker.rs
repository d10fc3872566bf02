//! Rust workers under a real Node primary: `tests/node/primary.js` runs
//! `cluster.fork()` with `process.execPath` set to the `cluster_hello`
//! example, makes HTTP requests, and reports what its cluster saw.

mod util;

use std::path::PathBuf;
use std::process::Command;

use serde_json::Value;

fn example(name: &str) -> PathBuf {
    // Examples are built by `cargo test` next to the test binaries.
    let mut p = std::env::current_exe().unwrap();
    p.pop();
    if p.ends_with("deps") {
        p.pop();
    }
    p.join("examples").join(name)
}

fn run_node_primary(policy: &str, workers: usize) -> Value {
    util::require_node();
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/node/primary.js");
    let bin = example("cluster_hello");
    assert!(bin.exists(), "{} not built", bin.display());
    let out = Command::new("node")
        .arg(script)
        .arg(&bin)
        .arg(policy)
        .arg(workers.to_string())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "node primary failed: {stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_str(stdout.lines().last().unwrap()).unwrap()
}

fn check(policy: &str) {
    let v = run_node_primary(policy, 2);
    let events: Vec<&str> = v["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e.as_str().unwrap())
        .collect();
    for id in ["1", "2"] {
        let pos = |what: &str| {
            events
                .iter()
                .position(|e| *e == format!("{what} {id}"))
                .unwrap_or_else(|| panic!("no {what} {id} in {events:?}"))
        };
        assert!(pos("fork") < pos("online"));
        assert!(pos("online") < pos("listening"));
        assert!(pos("listening") < pos("exit"));
    }
    // listen(0): every worker reports the same port.
    assert_eq!(v["ports"].as_array().unwrap().len(), 1, "{v}");
    assert_eq!(v["addr"]["addressType"], 4);
    assert!(v["addr"]["address"].is_null());
    let counts = &v["counts"];
    let total: u64 = ["1", "2"]
        .iter()
        .map(|id| counts[id].as_u64().unwrap())
        .sum();
    assert_eq!(total, 40, "{v}");
    if policy == "rr" {
        // Round-robin spreads evenly.
        assert_eq!(counts["1"], 20, "{v}");
    }
    // Worker 1 was disconnected by the primary, worker 2 killed (SIGTERM).
    assert_eq!(v["exits"]["1"]["code"], 0);
    assert_eq!(v["exits"]["1"]["exitedAfterDisconnect"], true);
    assert_eq!(v["exits"]["2"]["signal"], "SIGTERM");
    assert_eq!(v["exits"]["2"]["exitedAfterDisconnect"], false);
}

#[test]
fn node_primary_rust_workers_round_robin() {
    check("rr");
}

#[test]
fn node_primary_rust_workers_shared() {
    check("none");
}
