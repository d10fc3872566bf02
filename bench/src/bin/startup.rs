//! Start-up time and memory, ours next to Node's cluster in the same run:
//! the time from starting the primary to the first served request with 2
//! workers, and the resident memory of the primary and each worker.
//!
//! `cargo run --release -p uvcluster-bench --bin startup -- [runs=5]`
//!
//! Ours is the `cluster_hello` example (built by this program in its own
//! profile, or the binary `CLUSTER_HELLO` names); Node's is
//! `bench/reference/node-baseline/server.js` (skipped, with a note, if
//! `node` is missing).

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

struct Sample {
    first_ms: f64,
    primary_kib: u64,
    worker_kib: Vec<u64>,
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

fn children(pid: u32) -> Vec<u32> {
    std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))
        .unwrap_or_default()
        .split_whitespace()
        .filter_map(|s| s.parse().ok())
        .collect()
}

fn served(port: u16) -> bool {
    let Ok(mut s) = TcpStream::connect(("127.0.0.1", port)) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
    if s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .is_err()
    {
        return false;
    }
    let mut buf = [0u8; 256];
    matches!(s.read(&mut buf), Ok(n) if n > 0 && buf[..n].starts_with(b"HTTP/1.1 200"))
}

fn measure(cmd: &[&str], port: u16) -> Option<Sample> {
    let start = Instant::now();
    let mut child: Child = Command::new(cmd[0])
        .args(&cmd[1..])
        .env("PORT", port.to_string())
        .env("WORKERS", "2")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .ok()?;
    let deadline = start + Duration::from_secs(10);
    while !served(port) {
        if Instant::now() > deadline {
            let _ = child.kill();
            return None;
        }
        std::thread::yield_now();
    }
    let first_ms = start.elapsed().as_secs_f64() * 1000.0;
    // Let both workers finish starting before reading memory.
    std::thread::sleep(Duration::from_millis(300));
    let pid = child.id();
    let sample = Sample {
        first_ms,
        primary_kib: rss_kib(pid),
        worker_kib: children(pid).into_iter().map(rss_kib).collect(),
    };
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid as i32),
        nix::sys::signal::SIGINT,
    );
    let _ = child.wait();
    Some(sample)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn report(name: &str, samples: &[Sample]) {
    let first = median(samples.iter().map(|s| s.first_ms).collect());
    let worker = median(
        samples
            .iter()
            .flat_map(|s| s.worker_kib.iter().map(|&k| k as f64))
            .collect(),
    );
    let primary = median(samples.iter().map(|s| s.primary_kib as f64).collect());
    println!(
        "| {name} | {first:.1} ms | {:.1} MB | {:.1} MB |",
        worker / 1024.0,
        primary / 1024.0
    );
}

fn main() {
    let runs: usize = std::env::args()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(5);
    let ours: PathBuf = match uvcluster_bench::cluster_hello() {
        Ok(p) => p,
        Err(e) => {
            eprintln!("{e}");
            std::process::exit(1);
        }
    };
    let baseline = uvcluster_bench::node_baseline();
    println!("start to first served request (2 workers) and RSS, median of {runs}");
    println!();
    println!("| server | start to first response | RSS per worker | RSS of the primary |");
    println!("| --- | --- | --- | --- |");
    let ours_s: Vec<Sample> = (0..runs)
        .filter_map(|i| measure(&[ours.to_str().unwrap()], 18600 + i as u16))
        .collect();
    report("uvcluster (cluster_hello)", &ours_s);
    let have_node = Command::new("node")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if have_node && baseline.exists() {
        let node_s: Vec<Sample> = (0..runs)
            .filter_map(|i| measure(&["node", baseline.to_str().unwrap()], 18700 + i as u16))
            .collect();
        report("Node cluster (server.js)", &node_s);
    } else {
        println!(
            "| Node cluster | (node or {} not found) | | |",
            baseline.display()
        );
    }
}
