//! Node's cluster and our dispatch modes under the same load, in one run.
//!
//! `cargo run --release -p uvcluster-bench --bin compare -- [secs=4] [connections=50]`
//!
//! The slow-handler mixes run at 16 connections whatever `connections` is:
//! `slow mix` is [`Workload::SLOW_MIX`] (one request in 200 blocks its
//! worker's loop for 10 ms), `slow mix (cpu)` the same with a handler that
//! spins the CPU instead. Below saturation, where a connection goes decides
//! how long it waits; BENCHMARKS.md has them at other concurrencies.
//!
//! The load generator runs on a CPU of its own and the servers on the
//! others ([`CpuSplit`]; on 2 CPUs, one each), so every server gets the
//! same CPUs and no share of the generator's. `UVCLUSTER_PIN=0` lets them
//! share all CPUs instead (a server's figure then also depends on how much
//! CPU the generator leaves it).
//!
//! For each server it starts the cluster (2 workers, `PORT`), waits for its
//! `ready` line, runs the lab's load generator ([`loadgen`]) for
//! each workload, asks the primary for per-worker connection counts
//! (SIGUSR2, one JSON line, as Node's reference server does; ours adds
//! request counts), and measures
//! the primary's CPU time, the CPU time of all the server's processes per
//! request and each worker's RSS from `/proc`. Servers:
//! Node's reference cluster (`bench/reference/node-baseline/server.js`)
//! under `rr` and `none` (skipped, with a note, if `node`, or the binary
//! `NODE` names, or the file is missing), nginx with 2 worker processes
//! answering `return 200 'hello world\n'` on a `reuseport` listener
//! (Debian's `nginx-light`, installed with `apt-get` if missing; skipped
//! with a loud message if it cannot be), our `cluster_hello` example
//! (built by this program, or the binary `CLUSTER_HELLO` names) under `rr`
//! with the default handoff window (1, Node's rule) and windows of 2 and 4
//! (`ours rr w2`, `ours rr w4`: `UVCLUSTER_HANDOFF_WINDOW`), `none`,
//! `reuseport` and `leastconn`, and `cluster_hello` as a single process
//! (`WORKERS=0`), the limit of the machine. nginx and Node's server do not
//! serve the slow-handler mixes. `COMPARE_BEFORE=<path>` adds rows for
//! another build of `cluster_hello` (an earlier commit's) under `rr` and
//! `leastconn`, so that before and after are measured in the same run;
//! `COMPARE_ONLY` (a comma-separated list of substrings of server names)
//! and `COMPARE_WORKLOADS` (of workload names) run a subset. Prints a
//! markdown table and writes an SVG bar chart to `target/compare.svg` (or
//! the path in `COMPARE_SVG`).

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdout, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use plotters::prelude::*;
use uvcluster_bench::loadgen::{self, CpuSplit, LoadConfig, Slow, Workload, jain};

/// Connections for the slow-handler mixes.
const SLOW_CONNS: usize = 16;

struct Server {
    name: String,
    cmd: Vec<String>,
    policy: &'static str,
    workers: &'static str,
    /// Whether it answers `/block/<ms>` and `/spin/<ms>` (Node's reference
    /// server and nginx do not).
    slow: bool,
    /// More environment for the server.
    env: Vec<(String, String)>,
    /// nginx: started from a configuration written for the run, ready once
    /// its port accepts, no per-worker counts.
    nginx: bool,
}

impl Server {
    fn ours(name: &str, bin: &str, policy: &'static str, window: Option<&str>) -> Server {
        Server {
            name: name.to_string(),
            cmd: vec![bin.to_string()],
            policy,
            workers: "2",
            slow: true,
            env: window
                .map(|w| vec![("UVCLUSTER_HANDOFF_WINDOW".to_string(), w.to_string())])
                .unwrap_or_default(),
            nginx: false,
        }
    }
}

/// The nginx binary (`uvcluster_bench::nginx::find`), or `None` with a
/// loud message that the nginx row is skipped.
fn find_nginx() -> Option<String> {
    uvcluster_bench::nginx::find("the nginx row is")
}

/// Writes the nginx configuration for `port` into a fresh directory and
/// returns the command that runs it in the foreground: 2 worker processes,
/// a `reuseport` listener on 127.0.0.1, `return 200 'hello world\n'` (the
/// same 12-byte body as the others), no access log.
fn nginx_command(nginx: &str, dir: &Path, port: u16) -> std::io::Result<Vec<String>> {
    let _ = std::fs::remove_dir_all(dir);
    std::fs::create_dir_all(dir)?;
    let d = dir.display();
    let conf = format!(
        "worker_processes 2;\n\
         daemon off;\n\
         master_process on;\n\
         pid {d}/nginx.pid;\n\
         error_log {d}/error.log warn;\n\
         events {{ worker_connections 4096; }}\n\
         http {{\n\
         access_log off;\n\
         client_body_temp_path {d}/body;\n\
         proxy_temp_path {d}/proxy;\n\
         fastcgi_temp_path {d}/fastcgi;\n\
         uwsgi_temp_path {d}/uwsgi;\n\
         scgi_temp_path {d}/scgi;\n\
         keepalive_requests 1000000;\n\
         server {{\n\
         listen 127.0.0.1:{port} reuseport;\n\
         location / {{ return 200 'hello world\\n'; }}\n\
         }}\n\
         }}\n"
    );
    let path = dir.join("nginx.conf");
    std::fs::write(&path, conf)?;
    Ok(vec![
        nginx.to_string(),
        "-p".into(),
        d.to_string(),
        "-c".into(),
        path.display().to_string(),
        "-e".into(),
        format!("{d}/error.log"),
    ])
}

/// Waits until something accepts connections on `port`.
fn wait_for_port(port: u16) -> bool {
    let until = std::time::Instant::now() + Duration::from_secs(15);
    while std::time::Instant::now() < until {
        let a = std::net::SocketAddr::from(([127, 0, 0, 1], port));
        if std::net::TcpStream::connect_timeout(&a, Duration::from_millis(100)).is_ok() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    false
}

struct Row {
    server: String,
    workload: &'static str,
    rps: f64,
    p99_ms: f64,
    /// p99 of the requests that were not slow.
    fast_p99_ms: f64,
    fairness: Option<f64>,
    counts: String,
    /// Requests per worker, where the server counts them.
    requests: String,
    primary_cpu_s: Option<f64>,
    /// CPU time of all the server's processes per request, in µs.
    cpu_per_req_us: Option<f64>,
    rss_mb: Option<f64>,
}

fn cpu_ticks(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after = &stat[stat.rfind(')')? + 2..];
    let f: Vec<&str> = after.split_whitespace().collect();
    Some(f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?)
}

fn rss_kib(pid: u32) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    s.lines()
        .find(|l| l.starts_with("VmRSS:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

fn children(pid: u32) -> Vec<u32> {
    std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))
        .unwrap_or_default()
        .split_whitespace()
        .filter_map(|s| s.parse().ok())
        .collect()
}

/// Lines of the server's stdout, read on a thread.
fn lines(out: ChildStdout) -> mpsc::Receiver<String> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for l in BufReader::new(out).lines().map_while(Result::ok) {
            if tx.send(l).is_err() {
                break;
            }
        }
    });
    rx
}

fn wait_for(rx: &mpsc::Receiver<String>, pred: impl Fn(&str) -> bool) -> Option<String> {
    loop {
        match rx.recv_timeout(Duration::from_secs(15)) {
            Ok(l) if pred(&l) => return Some(l),
            Ok(_) => continue,
            Err(_) => return None,
        }
    }
}

fn signal(child: &Child, sig: nix::sys::signal::Signal) {
    let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(child.id() as i32), sig);
}

fn run_server(
    s: &Server,
    split: Option<&CpuSplit>,
    port: u16,
    secs: f64,
    conns: usize,
    rows: &mut Vec<Row>,
) {
    let cpu_mix = match Workload::SLOW_MIX {
        Workload::SlowMix { every, ms, .. } => Workload::SlowMix {
            every,
            ms,
            slow: Slow::Spin,
        },
        w => w,
    };
    let all = [
        ("keep-alive", Workload::KeepAlive, conns),
        ("close", Workload::Close, conns),
        ("slow mix", Workload::SLOW_MIX, SLOW_CONNS),
        ("slow mix (cpu)", cpu_mix, SLOW_CONNS),
    ];
    let workloads = if s.slow { &all[..] } else { &all[..2] };
    let only: Option<Vec<String>> = std::env::var("COMPARE_WORKLOADS")
        .ok()
        .map(|v| v.split(',').map(str::to_string).collect());
    let workloads = workloads
        .iter()
        .filter(|(w, _, _)| only.as_ref().is_none_or(|o| o.iter().any(|x| x == w)));
    for &(wname, workload, conns) in workloads {
        // A fresh cluster per workload, so counts and CPU are its own.
        let mut cmd = Command::new(&s.cmd[0]);
        cmd.args(&s.cmd[1..])
            .env("PORT", port.to_string())
            .env("WORKERS", s.workers)
            .env("NODE_CLUSTER_SCHED_POLICY", s.policy)
            .envs(s.env.iter().map(|(k, v)| (k, v)))
            .stdout(Stdio::piped());
        // The server's stderr goes to a file, shown when it never gets ready.
        let err_path =
            std::env::temp_dir().join(format!("uvc-compare-{}-{port}.stderr", std::process::id()));
        match std::fs::File::create(&err_path) {
            Ok(f) => cmd.stderr(f),
            Err(_) => cmd.stderr(Stdio::null()),
        };
        let spawned = match split {
            Some(split) => split.spawn(&mut cmd),
            None => cmd.spawn(),
        };
        let mut child = match spawned {
            Ok(c) => c,
            Err(e) => {
                eprintln!("{}: cannot start: {e}", s.name);
                return;
            }
        };
        let rx = lines(child.stdout.take().unwrap());
        let ready = if s.nginx {
            wait_for_port(port)
        } else {
            wait_for(&rx, |l| l.trim() == "ready").is_some()
        };
        if !ready {
            let err = std::fs::read_to_string(&err_path).unwrap_or_default();
            let tail: Vec<&str> = err.lines().rev().take(10).collect();
            eprintln!("{}: never ready; its stderr ends:", s.name);
            for l in tail.iter().rev() {
                eprintln!("  {l}");
            }
            let _ = std::fs::remove_file(&err_path);
            let _ = child.kill();
            let _ = child.wait();
            return;
        }
        let pid = child.id();
        let cpu0 = cpu_ticks(pid);
        // Every process of the server: the primary and its workers.
        let procs: Vec<u32> = std::iter::once(pid).chain(children(pid)).collect();
        let all_ticks = || procs.iter().map(|&p| cpu_ticks(p)).sum::<Option<u64>>();
        let all0 = all_ticks();
        let report = loadgen::run(LoadConfig {
            addr: ([127, 0, 0, 1], port).into(),
            connections: conns,
            duration: Duration::from_secs_f64(secs),
            workload,
        });
        let cpu1 = cpu_ticks(pid);
        let all1 = all_ticks();
        let workers = children(pid);
        let rss: Vec<u64> = workers.iter().filter_map(|&p| rss_kib(p)).collect();
        let (fairness, counts, requests) = if s.workers == "0" {
            (None, "1 process".to_string(), "1 process".to_string())
        } else if s.nginx {
            (None, "–".to_string(), "–".to_string())
        } else {
            signal(&child, nix::sys::signal::Signal::SIGUSR2);
            match wait_for(&rx, |l| l.starts_with('{')) {
                Some(line) => {
                    // Node's reference server: `{"1": conns, ...}`; ours:
                    // `{"1": {"conns": c, "reqs": r}, ...}`.
                    let v: serde_json::Value = serde_json::from_str(&line).unwrap_or_default();
                    let workers: Vec<&serde_json::Value> = v
                        .as_object()
                        .map(|m| m.values().collect())
                        .unwrap_or_default();
                    let conns: Vec<f64> = workers
                        .iter()
                        .filter_map(|w| w.as_f64().or_else(|| w["conns"].as_f64()))
                        .collect();
                    let reqs: Vec<f64> =
                        workers.iter().filter_map(|w| w["reqs"].as_f64()).collect();
                    let join = |xs: &[f64]| {
                        if xs.is_empty() {
                            "–".to_string()
                        } else {
                            xs.iter()
                                .map(|x| format!("{x:.0}"))
                                .collect::<Vec<_>>()
                                .join(" / ")
                        }
                    };
                    (Some(jain(&conns)), join(&conns), join(&reqs))
                }
                None => (None, "?".into(), "?".into()),
            }
        };
        // nginx stops gracefully on SIGQUIT (SIGINT is its fast stop).
        signal(
            &child,
            if s.nginx {
                nix::sys::signal::Signal::SIGQUIT
            } else {
                nix::sys::signal::Signal::SIGINT
            },
        );
        let _ = child.wait();
        let _ = std::fs::remove_file(&err_path);
        let tick = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
            .ok()
            .flatten()
            .unwrap_or(100) as f64;
        let r = match report {
            Ok(r) => r,
            Err(e) => {
                eprintln!("{} {wname}: load failed: {e}", s.name);
                continue;
            }
        };
        rows.push(Row {
            server: s.name.clone(),
            workload: wname,
            rps: r.rps,
            p99_ms: r.p99_us as f64 / 1000.0,
            fast_p99_ms: r.fast_p99_us as f64 / 1000.0,
            fairness,
            counts,
            requests,
            primary_cpu_s: match (cpu0, cpu1) {
                (Some(a), Some(b)) if s.workers != "0" && !s.nginx => Some((b - a) as f64 / tick),
                _ => None,
            },
            cpu_per_req_us: match (all0, all1) {
                (Some(a), Some(b)) if r.requests > 0 => {
                    Some((b - a) as f64 / tick * 1e6 / r.requests as f64)
                }
                _ => None,
            },
            rss_mb: (!rss.is_empty())
                .then(|| rss.iter().sum::<u64>() as f64 / rss.len() as f64 / 1024.0),
        });
        eprintln!("{} {wname}: {:.0} req/s", s.name, r.rps);
    }
}

fn chart(rows: &[Row], path: &Path) -> Result<(), Box<dyn std::error::Error>> {
    let workloads = ["keep-alive", "close", "slow mix", "slow mix (cpu)"];
    let servers: Vec<String> = {
        let mut v: Vec<String> = Vec::new();
        for r in rows {
            if !v.contains(&r.server) {
                v.push(r.server.clone());
            }
        }
        v
    };
    let root = SVGBackend::new(path, (1100, 260 * workloads.len() as u32)).into_drawing_area();
    root.fill(&WHITE)?;
    let panels = root.split_evenly((workloads.len(), 1));
    for (panel, w) in panels.iter().zip(workloads) {
        // Throughput for the plain workloads; for the slow mixes, the tail
        // latency that dispatch decides.
        let slow = w.starts_with("slow");
        let data: Vec<(usize, f64)> = servers
            .iter()
            .enumerate()
            .filter_map(|(i, s)| {
                rows.iter()
                    .find(|r| &r.server == s && r.workload == w)
                    .map(|r| (i, if slow { r.p99_ms } else { r.rps }))
            })
            .collect();
        let max = data.iter().map(|d| d.1).fold(1.0, f64::max) * 1.15;
        let mut c = ChartBuilder::on(panel)
            .caption(
                if slow {
                    format!("{w}: p99 latency, ms, lower is better (2 workers, same run)")
                } else {
                    format!("{w}: requests/s (2 workers, same run)")
                },
                ("sans-serif", 18),
            )
            .margin(10)
            .x_label_area_size(40)
            .y_label_area_size(70)
            .build_cartesian_2d(0f64..servers.len() as f64, 0f64..max)?;
        c.configure_mesh()
            .disable_x_mesh()
            .x_labels(servers.len() * 2)
            .x_label_formatter(&|x| {
                let i = (*x - 0.5).round();
                if (x - 0.5 - i).abs() < 1e-6 && i >= 0.0 {
                    servers.get(i as usize).cloned().unwrap_or_default()
                } else {
                    String::new()
                }
            })
            .y_label_formatter(&|y| {
                if slow {
                    format!("{y:.0}")
                } else {
                    format!("{:.0}k", y / 1000.0)
                }
            })
            .draw()?;
        c.draw_series(data.iter().map(|&(i, v)| {
            let color = if servers[i].starts_with("node") {
                RGBColor(200, 90, 60)
            } else if servers[i] == "nginx" {
                RGBColor(70, 150, 80)
            } else {
                RGBColor(60, 110, 190)
            };
            Rectangle::new(
                [(i as f64 + 0.15, 0.0), (i as f64 + 0.85, v)],
                color.filled(),
            )
        }))?;
    }
    root.present()?;
    Ok(())
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let secs: f64 = args.first().and_then(|s| s.parse().ok()).unwrap_or(4.0);
    let conns: usize = args.get(1).and_then(|s| s.parse().ok()).unwrap_or(50);
    // The server we compare: the `cluster_hello` example (built now, in
    // this program's profile, unless `CLUSTER_HELLO` names it).
    let ours = match uvcluster_bench::cluster_hello() {
        Ok(p) => p,
        Err(e) => {
            eprintln!("{e}");
            std::process::exit(1);
        }
    };
    let ours = ours.to_string_lossy().into_owned();
    let mut servers = Vec::new();
    let baseline = uvcluster_bench::node_baseline();
    // `NODE` names another node binary to compare against.
    let node = std::env::var("NODE").unwrap_or_else(|_| "node".into());
    let have_node = Command::new(&node)
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if have_node && baseline.exists() {
        for policy in ["rr", "none"] {
            servers.push(Server {
                name: format!("node {policy}"),
                cmd: vec![node.clone(), baseline.to_string_lossy().into_owned()],
                policy,
                workers: "2",
                slow: false,
                env: Vec::new(),
                nginx: false,
            });
        }
    } else {
        println!(
            "note: {node} or {} not found: comparing ours only",
            baseline.display()
        );
    }
    // nginx's port comes after ours; its configuration lives in target/.
    let nginx = find_nginx();
    if let Some(nginx) = &nginx {
        servers.push(Server {
            name: "nginx".into(),
            cmd: vec![nginx.clone()],
            policy: "none",
            workers: "2",
            slow: false,
            env: Vec::new(),
            nginx: true,
        });
    }
    // Round-robin with the default handoff window, then wider ones.
    servers.push(Server::ours("ours rr", &ours, "rr", None));
    for window in ["2", "4"] {
        let name = format!("ours rr w{window}");
        servers.push(Server::ours(&name, &ours, "rr", Some(window)));
    }
    for policy in ["none", "reuseport", "leastconn"] {
        servers.push(Server::ours(&format!("ours {policy}"), &ours, policy, None));
    }
    if let Ok(before) = std::env::var("COMPARE_BEFORE") {
        for policy in ["rr", "leastconn"] {
            let name = format!("before {policy}");
            servers.push(Server::ours(&name, &before, policy, None));
        }
    }
    servers.push(Server {
        workers: "0",
        ..Server::ours("ours 1 process", &ours, "rr", None)
    });
    if let Ok(only) = std::env::var("COMPARE_ONLY") {
        let only: Vec<&str> = only.split(',').collect();
        servers.retain(|s| only.iter().any(|o| s.name.contains(o)));
    }
    // The load generator on a CPU of its own, the servers on the rest
    // (see `CpuSplit`); UVCLUSTER_PIN=0 lets them share all CPUs.
    let split = CpuSplit::from_env();
    let mut rows = Vec::new();
    for (i, s) in servers.iter().enumerate() {
        let port = 18900 + i as u16;
        let s = if s.nginx {
            let dir = uvcluster_bench::lab_dir()
                .join(format!("../target/compare-nginx-{}", std::process::id()));
            match nginx_command(&s.cmd[0], &dir, port) {
                Ok(cmd) => &Server {
                    cmd,
                    name: s.name.clone(),
                    env: Vec::new(),
                    ..*s
                },
                Err(e) => {
                    eprintln!("\n!!! nginx: cannot write its configuration: {e}: SKIPPED !!!\n");
                    continue;
                }
            }
        } else {
            s
        };
        run_server(s, split.as_ref(), port, secs, conns, &mut rows);
        if s.nginx {
            let _ = std::fs::remove_dir_all(Path::new(&s.cmd[4]).parent().unwrap());
        }
    }
    let placement = split.map_or_else(
        || "load generator and servers share all CPUs".to_string(),
        |sp| sp.to_string(),
    );
    println!(
        "{secs} s per run, {conns} connections ({SLOW_CONNS} for the slow mixes), 2 workers; {placement}; fairness is Jain's index over per-worker connection counts; \"p99 others\" leaves the slow requests out"
    );
    println!();
    println!(
        "| server | workload | req/s | p99 | p99 others | fairness | connections per worker | requests per worker | primary CPU | CPU per request | RSS per worker |"
    );
    println!("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |");
    for r in &rows {
        println!(
            "| {} | {} | {:.0} | {:.2} ms | {} | {} | {} | {} | {} | {} | {} |",
            r.server,
            r.workload,
            r.rps,
            r.p99_ms,
            if r.workload.starts_with("slow") {
                format!("{:.2} ms", r.fast_p99_ms)
            } else {
                "–".into()
            },
            r.fairness.map_or("–".into(), |f| format!("{f:.4}")),
            r.counts,
            r.requests,
            r.primary_cpu_s.map_or("–".into(), |c| format!("{c:.2} s")),
            r.cpu_per_req_us
                .map_or("–".into(), |c| format!("{c:.1} µs")),
            r.rss_mb.map_or("–".into(), |m| format!("{m:.1} MB")),
        );
    }
    let svg = std::env::var("COMPARE_SVG")
        .map(PathBuf::from)
        .unwrap_or_else(|_| uvcluster_bench::lab_dir().join("../target/compare.svg"));
    match chart(&rows, &svg) {
        Ok(()) => println!("\nchart: {}", svg.display()),
        Err(e) => eprintln!("chart failed: {e}"),
    }
}
