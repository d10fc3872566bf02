//! Dispatch modes side by side: one criterion group per workload
//! (`dispatch/keep_alive`, `dispatch/close` (one request per connection),
//! `dispatch/slow_mix`), one benchmark per mode (`rr` with handoff windows
//! of 1, 2 and 4: `rr`, `rr-w2`, `rr-w4`; `none`, `reuseport`,
//! `leastconn`), plus a single process (`single`) as the limit of this
//! machine, and nginx (`nginx`: 2 worker processes, `return 200`, a
//! `reuseport` listener; Debian's `nginx-light`, installed with `apt-get`
//! if missing, skipped with a loud message if it cannot be; it has no slow
//! handlers, so it runs the plain workloads only). Criterion measures the
//! time per request under the lab's closed-loop load generator (50
//! connections; 16 for the slow-handler mix, [`Workload::SLOW_MIX`]); the
//! HTML report (`target/criterion/report/index.html`) plots them. The slow
//! mix's tail latency, which is where dispatch by load should win, is a
//! latency and not a time per iteration: it is measured apart (5 runs of
//! 0.5 s per mode, 3 with `--quick`) and printed as a table,
//! `dispatch/slow_mix_latency` (p50, p99 with its range, and the p99 of the
//! requests that were not slow).
//!
//! `cargo bench --bench dispatch -- FILTER` runs the benchmarks whose id
//! contains FILTER, as criterion does; the latency table's id is
//! `dispatch/slow_mix_latency`.
//!
//! The cluster runs out of process: this bench binary re-executes itself
//! as the primary (`DISPATCH_BENCH_PRIMARY=<mode>`), and the primary forks
//! it again as its two workers, each a minimal HTTP hello world (with
//! `/block/<ms>` and `/spin/<ms>`, handlers that keep its loop busy).
//! The load generator runs on a CPU of its own and the clusters on the
//! others ([`CpuSplit`]; `UVCLUSTER_PIN=0` to share all CPUs).
//! Nothing needs to be built or installed beyond `cargo bench`. The
//! comparison with Node's cluster is the lab's `compare` (`src/bin/compare.rs`).

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use criterion::Criterion;
use uvcluster::cluster::{self, Primary, SchedulingPolicy, Settings};
use uvcluster::net::{ListenOptions, Server};
use uvcluster::uv::Stream;
use uvcluster::uv::{Handle, Loop, RunMode, Tcp};
use uvcluster_bench::loadgen::{self, CpuSplit, LoadConfig, Workload};

const RESPONSE: &[u8] =
    b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 12\r\n\r\nhello world\n";
const MODES: [&str; 6] = ["rr", "rr-w2", "rr-w4", "none", "reuseport", "leastconn"];

/// A worker (or the single process): answers every request; `/block/<ms>`
/// blocks the loop first (without the CPU), `/spin/<ms>` keeps the CPU
/// busy first; `Connection: close` ends the connection.
fn serve(lp: &mut Loop, port: u16) {
    let server = Server::new(lp, |lp, s, conn| {
        let Stream::Tcp(t) = conn else { return };
        let _ = lp.read_start(t, move |lp, t: Handle<Tcp>, r| {
            let Ok(data) = r.map(<[u8]>::to_vec) else {
                return;
            };
            if data.is_empty() {
                s.close_connection(lp, Stream::Tcp(t));
                return;
            }
            let text = String::from_utf8_lossy(&data);
            let ms = |rest: &str| -> u64 {
                rest.split(' ')
                    .next()
                    .and_then(|m| m.parse().ok())
                    .unwrap_or(0)
            };
            if let Some(rest) = text.strip_prefix("GET /block/") {
                std::thread::sleep(Duration::from_millis(ms(rest)));
            }
            if let Some(rest) = text.strip_prefix("GET /spin/") {
                let until = std::time::Instant::now() + Duration::from_millis(ms(rest));
                while std::time::Instant::now() < until {
                    std::hint::spin_loop();
                }
            }
            let n = text.matches("\r\n\r\n").count().max(1);
            let _ = lp.write(t, &[&RESPONSE.repeat(n)], |_, _, _| {});
            if text.contains("Connection: close") {
                let _ = lp.read_stop(t);
                let s = s;
                let _ = lp.shutdown(t, move |lp, t, _| s.close_connection(lp, Stream::Tcp(t)));
            }
        });
    });
    server
        .listen(lp, ListenOptions::port(port), |_, _, r| {
            r.expect("listen");
        })
        .unwrap();
}

fn run_primary(mode: &str, port: u16) {
    let mut lp = Loop::new().unwrap();
    if mode == "single" {
        serve(&mut lp, port);
        println!("ready");
        lp.run(RunMode::Default).unwrap();
        return;
    }
    let p = Primary::new(&mut lp);
    // `rr-w<N>`: round-robin with a handoff window of N.
    let (mode, window) = match mode.split_once("-w") {
        Some((m, w)) => (m, w.parse().expect("rr-w<N>")),
        None => (mode, 1),
    };
    p.set_handoff_window(&mut lp, window);
    p.setup_primary(
        &mut lp,
        Settings {
            args: Some(vec![]),
            env: Some(vec![(
                "DISPATCH_BENCH_PORT".into(),
                port.to_string().into(),
            )]),
            scheduling_policy: SchedulingPolicy::parse(mode),
            ..Settings::default()
        },
    );
    let ready = std::rc::Rc::new(std::cell::Cell::new(0));
    p.on_listening(&mut lp, move |_, _, _| {
        ready.set(ready.get() + 1);
        if ready.get() == 2 {
            println!("ready");
        }
    });
    for _ in 0..2 {
        p.fork(&mut lp, vec![]).unwrap();
    }
    lp.run(RunMode::Default).unwrap();
}

/// The nginx binary, installed with `apt-get install nginx-light` if
/// missing; `None`, with a loud message, if it cannot be had.
fn find_nginx() -> Option<String> {
    let works = |bin: &str| {
        Command::new(bin)
            .arg("-v")
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    };
    let found = || ["nginx", "/usr/sbin/nginx"].into_iter().find(|b| works(b));
    if found().is_none() {
        eprintln!("nginx not found: installing Debian's nginx-light (apt-get)");
        let _ = Command::new("sh")
            .args([
                "-c",
                "apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nginx-light",
            ])
            .stdout(Stdio::null())
            .status();
    }
    let found = found().map(str::to_string);
    if found.is_none() {
        eprintln!(
            "\n!!! nginx is not available and could not be installed \
             (apt-get install nginx-light): the nginx benchmarks are SKIPPED !!!\n"
        );
    }
    found
}

/// Starts nginx on `port` (2 worker processes, `return 200 'hello
/// world\n'`, a `reuseport` listener, no access log) from a configuration
/// written to a fresh directory under the temporary directory, and waits for
/// its port.
fn start_nginx(nginx: &str, port: u16, split: Option<&CpuSplit>) -> Child {
    let dir = std::env::temp_dir().join(format!("dispatch-bench-nginx-{port}"));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let d = dir.display();
    let conf = format!(
        "worker_processes 2; daemon off; master_process on; pid {d}/nginx.pid;\n\
         error_log {d}/error.log warn; events {{ worker_connections 4096; }}\n\
         http {{ access_log off; keepalive_requests 1000000;\n\
         client_body_temp_path {d}/body; proxy_temp_path {d}/proxy;\n\
         fastcgi_temp_path {d}/fastcgi; uwsgi_temp_path {d}/uwsgi; scgi_temp_path {d}/scgi;\n\
         server {{ listen 127.0.0.1:{port} reuseport;\n\
         location / {{ return 200 'hello world\\n'; }} }} }}\n"
    );
    std::fs::write(dir.join("nginx.conf"), conf).unwrap();
    let mut cmd = Command::new(nginx);
    cmd.arg("-p")
        .arg(&dir)
        .arg("-c")
        .arg(dir.join("nginx.conf"))
        .arg("-e")
        .arg(dir.join("error.log"));
    let c = match split {
        Some(split) => split.spawn(&mut cmd),
        None => cmd.spawn(),
    }
    .expect("start nginx");
    let until = std::time::Instant::now() + Duration::from_secs(15);
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
    while std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(100)).is_err() {
        assert!(std::time::Instant::now() < until, "nginx did not start");
        std::thread::sleep(Duration::from_millis(20));
    }
    c
}

/// Starts the cluster for `mode` (on the servers' CPUs of `split`) and
/// waits for it to listen.
fn start(mode: &str, port: u16, split: Option<&CpuSplit>) -> Child {
    let mut cmd = Command::new(std::env::current_exe().unwrap());
    cmd.env("DISPATCH_BENCH_PRIMARY", mode)
        .env("DISPATCH_BENCH_PORT", port.to_string())
        .stdout(Stdio::piped());
    let mut c = match split {
        Some(split) => split.spawn(&mut cmd),
        None => cmd.spawn(),
    }
    .expect("start the cluster");
    let out = c.stdout.take().unwrap();
    let mut lines = BufReader::new(out).lines();
    assert!(
        lines.any(|l| l.is_ok_and(|l| l == "ready")),
        "{mode}: cluster did not start"
    );
    c
}

/// Criterion's options that take a value (`--baseline main`): the value is
/// not a filter.
const VALUE_OPTIONS: [&str; 14] = [
    "--save-baseline",
    "--baseline",
    "--baseline-lenient",
    "--load-baseline",
    "--measurement-time",
    "--warm-up-time",
    "--sample-size",
    "--nresamples",
    "--noise-threshold",
    "--confidence-level",
    "--significance-level",
    "--profile-time",
    "--color",
    "--plotting-backend",
];

/// Whether `id` passes the benchmark filter on the command line
/// (`cargo bench --bench dispatch -- FILTER`, a substring as in criterion).
fn selected(id: &str) -> bool {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let filter = args.iter().enumerate().find(|(i, a)| {
        !a.starts_with('-') && (*i == 0 || !VALUE_OPTIONS.contains(&args[i - 1].as_str()))
    });
    filter.is_none_or(|(_, f)| id.contains(f.as_str()))
}

/// The slow-handler mix's latency for one mode: p50, p99 and the p99 of the
/// requests that were not slow, in µs, over `runs` runs of 0.5 s each.
struct Latency {
    mode: &'static str,
    p50: Vec<u64>,
    p99: Vec<u64>,
    fast_p99: Vec<u64>,
}

/// Prints the latency table: the median of the runs, and for the p99 its
/// range.
fn print_latency(rows: &[Latency], connections: usize) {
    let ms = |us: u64| us as f64 / 1000.0;
    let median = |v: &[u64]| {
        let mut v = v.to_vec();
        v.sort_unstable();
        v[v.len() / 2]
    };
    println!();
    println!(
        "dispatch/slow_mix_latency: {connections} connections, one request in 200 blocks its worker for 10 ms; median of {} runs of 0.5 s",
        rows.first().map_or(0, |r| r.p99.len())
    );
    println!("| mode | p50 | p99 | p99 range | p99 others |");
    println!("| --- | --- | --- | --- | --- |");
    for r in rows {
        println!(
            "| {} | {:.2} ms | {:.2} ms | {:.2}–{:.2} ms | {:.2} ms |",
            r.mode,
            ms(median(&r.p50)),
            ms(median(&r.p99)),
            ms(*r.p99.iter().min().unwrap()),
            ms(*r.p99.iter().max().unwrap()),
            ms(median(&r.fast_p99)),
        );
    }
}

fn bench(c: &mut Criterion) {
    // The load generator on a CPU of its own, the clusters on the rest, as
    // in `compare`; UVCLUSTER_PIN=0 lets them share all CPUs.
    let split = CpuSplit::from_env();
    if let Some(sp) = &split {
        eprintln!("{sp}");
    }
    // Criterion measures time per request; the slow mix's tail latency,
    // which is where dispatch by load should win, is not a time per
    // iteration: it is measured apart and printed as a table
    // (`dispatch/slow_mix_latency`).
    let latency_id = "dispatch/slow_mix_latency";
    let latency_runs = if std::env::args().any(|a| a == "--quick") {
        3
    } else {
        5
    };
    let mut latency = Vec::new();
    let nginx = find_nginx();
    let workloads = [
        ("keep_alive", Workload::KeepAlive, 50),
        ("close", Workload::Close, 50),
        ("slow_mix", Workload::SLOW_MIX, 16),
    ];
    for (i, (wname, workload, connections)) in workloads.into_iter().enumerate() {
        let group = format!("dispatch/{wname}");
        let with_latency = workload == Workload::SLOW_MIX && selected(latency_id);
        // nginx has no slow handlers: the plain workloads only.
        let nginx = nginx
            .as_deref()
            .filter(|_| !matches!(workload, Workload::SlowMix { .. }));
        let extra: &[&'static str] = if nginx.is_some() {
            &["single", "nginx"]
        } else {
            &["single"]
        };
        let modes: Vec<&'static str> = MODES
            .iter()
            .chain(extra)
            .copied()
            .filter(|m| with_latency || selected(&format!("{group}/{m}")))
            .collect();
        if modes.is_empty() {
            continue;
        }
        let mut g = c.benchmark_group(group);
        g.sample_size(10)
            .warm_up_time(Duration::from_millis(300))
            .measurement_time(Duration::from_secs(4));
        for (j, mode) in modes.into_iter().enumerate() {
            let port = 19100 + (i * 10 + j) as u16;
            let mut child = match (mode, nginx) {
                ("nginx", Some(bin)) => start_nginx(bin, port, split.as_ref()),
                _ => start(mode, port, split.as_ref()),
            };
            // One closed-loop run of `ms` against this cluster.
            let load = |ms| {
                loadgen::run(LoadConfig {
                    addr: ([127, 0, 0, 1], port).into(),
                    connections,
                    duration: Duration::from_millis(ms),
                    workload,
                })
                .expect("load")
            };
            // Time per request: a short closed-loop run, scaled.
            g.bench_function(mode, |b| {
                b.iter_custom(|iters| {
                    let r = load(300);
                    let per = r.secs / r.requests.max(1) as f64;
                    Duration::from_secs_f64(per * iters as f64)
                })
            });
            if with_latency {
                // 0.5 s a run: some 40 slow requests among thousands.
                let mut row = Latency {
                    mode,
                    p50: Vec::new(),
                    p99: Vec::new(),
                    fast_p99: Vec::new(),
                };
                for _ in 0..latency_runs {
                    let r = load(500);
                    row.p50.push(r.p50_us);
                    row.p99.push(r.p99_us);
                    row.fast_p99.push(r.fast_p99_us);
                }
                latency.push(row);
            }
            // nginx's master stops its workers on SIGTERM; SIGKILL would
            // leave them listening.
            let sig = if mode == "nginx" {
                nix::sys::signal::Signal::SIGTERM
            } else {
                nix::sys::signal::Signal::SIGKILL
            };
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(child.id() as i32), sig);
            let _ = child.wait();
        }
        g.finish();
    }
    if !latency.is_empty() {
        print_latency(&latency, 16);
    }
}

fn main() {
    // Re-executed as a worker of the cluster, or as its primary.
    let mut lp = Loop::new().unwrap();
    if cluster::is_worker(&mut lp) {
        cluster::setup_worker(&mut lp).unwrap();
        let port = std::env::var("DISPATCH_BENCH_PORT")
            .unwrap()
            .parse()
            .unwrap();
        serve(&mut lp, port);
        lp.run(RunMode::Default).unwrap();
        return;
    }
    if let Ok(mode) = std::env::var("DISPATCH_BENCH_PRIMARY") {
        let port = std::env::var("DISPATCH_BENCH_PORT")
            .unwrap()
            .parse()
            .unwrap();
        run_primary(&mode, port);
        return;
    }
    let mut c = Criterion::default().configure_from_args();
    bench(&mut c);
    c.final_summary();
}
