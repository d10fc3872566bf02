//! The lab's `compare` program, run as a real process.

// The library's test helpers: `example` finds the `cluster_hello` example
// that `cargo test` at the workspace root built.
#[path = "../../tests/util/mod.rs"]
mod util;

use std::process::Command;

/// `compare` without node: it says so, measures ours only (every mode, the
/// single process, every workload) and still writes its table and chart.
/// Short runs at 4 connections; `NODE` names a node binary that is not
/// there.
#[test]
fn compare_without_node_compares_ours_only() {
    let exe = env!("CARGO_BIN_EXE_compare");
    let svg = std::env::temp_dir().join(format!("uvc-compare-{}.svg", std::process::id()));
    let out = Command::new(exe)
        .args(["0.2", "4"])
        .env("NODE", "/nonexistent/node")
        .env("COMPARE_SVG", &svg)
        // The example that `cargo test` built, so that compare runs no cargo.
        .env("CLUSTER_HELLO", util::example("cluster_hello"))
        .output()
        .expect("run compare");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{:?}\n{err}", out.status);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("note: /nonexistent/node"), "{text}");
    assert!(!text.contains("| node "), "{text}");
    // The header says where the generator and the servers ran.
    assert!(
        text.contains("load generator on CPU") || text.contains("share all CPUs"),
        "{text}"
    );
    for server in ["rr", "none", "reuseport", "leastconn", "1 process"] {
        for workload in ["keep-alive", "close", "slow mix", "slow mix (cpu)"] {
            let row = format!("| ours {server} | {workload} |");
            let line = text.lines().find(|l| l.starts_with(&row));
            let line = line.unwrap_or_else(|| panic!("no row {row}:\n{text}"));
            // Requests were served: req/s is a positive number.
            let rps: f64 = line.split('|').nth(3).unwrap().trim().parse().unwrap();
            assert!(rps > 0.0, "{line}");
        }
    }
    let chart = std::fs::read_to_string(&svg).expect("the chart");
    let _ = std::fs::remove_file(&svg);
    assert!(
        chart.starts_with("<svg"),
        "{}",
        &chart[..chart.len().min(80)]
    );
}
