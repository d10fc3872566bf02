//! Runs the lab's load generator against an HTTP server and prints one
//! `key=value` line.
//!
//! `cargo run --release -p uvcluster-bench --bin loadgen -- 127.0.0.1:8000 [connections=50] [secs=5] [keepalive|close|slow|spin]`
//!
//! `slow`: every `EVERY`-th request (default 200) is `GET /block/<MS>`
//! (default 10 ms), a handler that blocks its worker's loop; `spin`: the
//! same with `GET /spin/<MS>`, a handler that keeps the CPU busy.
//! `REQUESTS=N` starts at most N requests (connections, for `close`) and
//! ends when they have: a fixed amount of work whatever the duration.

use std::time::Duration;

use uvcluster_bench::loadgen::{LoadConfig, RunOptions, Slow, Workload, run_with};

fn main() -> std::io::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let addr = args
        .first()
        .map_or("127.0.0.1:8000", String::as_str)
        .parse()
        .expect("address like 127.0.0.1:8000");
    let connections = args.get(1).and_then(|s| s.parse().ok()).unwrap_or(50);
    let secs = args.get(2).and_then(|s| s.parse().ok()).unwrap_or(5.0);
    let workload = match args.get(3).map(String::as_str) {
        Some("close") => Workload::Close,
        Some(w @ ("slow" | "spin")) => Workload::SlowMix {
            every: std::env::var("EVERY")
                .ok()
                .and_then(|s| s.parse().ok())
                .unwrap_or(200),
            ms: std::env::var("MS")
                .ok()
                .and_then(|s| s.parse().ok())
                .unwrap_or(10),
            slow: if w == "spin" { Slow::Spin } else { Slow::Block },
        },
        _ => Workload::KeepAlive,
    };
    let opts = RunOptions {
        max_requests: std::env::var("REQUESTS").ok().and_then(|s| s.parse().ok()),
        ..RunOptions::default()
    };
    let r = run_with(
        LoadConfig {
            addr,
            connections,
            duration: Duration::from_secs_f64(secs),
            workload,
        },
        opts,
    )?;
    println!(
        "workload={workload:?} requests={} errors={} secs={:.2} rps={:.0} p50_us={} p99_us={} max_us={} fast_p99_us={}",
        r.requests, r.errors, r.secs, r.rps, r.p50_us, r.p99_us, r.max_us, r.fast_p99_us
    );
    Ok(())
}
