//! Criterion benchmarks of the loop's hot paths: timers, empty iterations,
//! a one-in-flight ping-pong over TCP and Unix sockets (both ends on one
//! loop), and passing a socket over an IPC pipe.
//!
//! Each group is kept short (few samples, a few seconds) so that
//! `cargo bench` finishes in a few minutes on two cores. The side-by-side
//! figures against libuv, tokio and mio come from `examples/uv_bench.rs`;
//! see BENCHMARKS.md.

use std::cell::Cell;
use std::hint::black_box;
use std::rc::Rc;
use std::time::Duration;

use criterion::{BenchmarkGroup, Criterion, Throughput, criterion_group, criterion_main};
use uvcluster::uv::{BindFlags, Handle, Loop, RunMode, Socket, StreamType, Tcp};

fn short(g: &mut BenchmarkGroup<'_, criterion::measurement::WallTime>) {
    g.sample_size(10)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(3));
}

/// Starts `n` one-shot timers spread over `spread_ms`, runs until all fired,
/// closes them.
fn timers(c: &mut Criterion) {
    let mut g = c.benchmark_group("timers");
    short(&mut g);
    const N: u64 = 100_000;
    g.throughput(Throughput::Elements(N));
    g.bench_function("100k_start_fire_close_same_ms", |b| {
        b.iter(|| {
            let mut lp = Loop::new().unwrap();
            let fired = Rc::new(Cell::new(0u64));
            let mut hs = Vec::with_capacity(N as usize);
            for _ in 0..N {
                let t = lp.timer_init();
                let f = fired.clone();
                lp.timer_start(t, Duration::ZERO, Duration::ZERO, move |_, _| {
                    f.set(f.get() + 1)
                })
                .unwrap();
                hs.push(t);
            }
            lp.run(RunMode::Default).unwrap();
            for t in hs {
                lp.close(t, |_| {}).unwrap();
            }
            lp.run(RunMode::Default).unwrap();
            assert_eq!(fired.get(), N);
        })
    });
    g.bench_function("100k_start_stop_restart", |b| {
        // The idle-timeout pattern: re-arming a timer that has not fired.
        let mut lp = Loop::new().unwrap();
        let t = lp.timer_init();
        b.iter(|| {
            for i in 0..N {
                lp.timer_start(
                    t,
                    Duration::from_millis(1000 + (i & 7)),
                    Duration::ZERO,
                    |_, _| {},
                )
                .unwrap();
            }
            lp.timer_stop(t).unwrap();
        });
        lp.close(t, |_| {}).unwrap();
        lp.run(RunMode::Default).unwrap();
    });
    g.finish();
}

/// Empty iterations driven by an idle handle (libuv's `loop_count`).
fn loop_count(c: &mut Criterion) {
    let mut g = c.benchmark_group("loop_count");
    short(&mut g);
    const N: u64 = 100_000;
    g.throughput(Throughput::Elements(N));
    g.bench_function("idle_100k_iterations", |b| {
        let mut lp = Loop::new().unwrap();
        let idle = lp.idle_init();
        b.iter(|| {
            let ticks = Rc::new(Cell::new(0u64));
            let tk = ticks.clone();
            lp.idle_start(idle, move |lp, h| {
                tk.set(tk.get() + 1);
                if tk.get() == N {
                    lp.idle_stop(h).unwrap();
                }
            })
            .unwrap();
            lp.run(RunMode::Default).unwrap();
            black_box(ticks.get());
        });
        lp.close(idle, |_| {}).unwrap();
        lp.run(RunMode::Default).unwrap();
    });
    g.finish();
}

/// The client end of an in-process ping-pong: `rounds` round trips, then
/// close. The server end echoes.
fn pinger<K: StreamType>(lp: &mut Loop, c: Handle<K>, rounds: u64, left: Rc<Cell<u64>>) {
    left.set(rounds);
    lp.write(c, &[b"PING\n"], |_, _, r| r.unwrap()).unwrap();
    let got = Cell::new(0usize);
    lp.read_start(c, move |lp, c, data| {
        let d = data.unwrap();
        got.set(got.get() + d.len());
        while got.get() >= 5 {
            got.set(got.get() - 5);
            left.set(left.get() - 1);
            if left.get() == 0 {
                lp.read_stop(c).unwrap();
                return;
            }
            lp.write(c, &[b"PING\n"], |_, _, r| r.unwrap()).unwrap();
        }
    })
    .unwrap();
}

fn echo<K: StreamType>(lp: &mut Loop, c: Handle<K>) {
    lp.read_start(c, |lp, c, data| match data {
        Ok(d) if !d.is_empty() => lp.write(c, &[d], |_, _, _| {}).unwrap(),
        _ => lp.close(c, |_| {}).unwrap(),
    })
    .unwrap();
}

fn ping_pong(c: &mut Criterion) {
    let mut g = c.benchmark_group("ping_pong");
    short(&mut g);
    const ROUNDS: u64 = 10_000;
    g.throughput(Throughput::Elements(ROUNDS));

    g.bench_function("tcp_10k_round_trips", |b| {
        let mut lp = Loop::new().unwrap();
        let server = lp.tcp_init();
        lp.tcp_bind(server, ([127, 0, 0, 1], 0).into(), BindFlags::default())
            .unwrap();
        lp.tcp_listen(server, 16, |lp, _, client| echo(lp, client.unwrap()))
            .unwrap();
        let addr = lp.tcp_getsockname(server).unwrap();
        let client: Handle<Tcp> = lp.tcp_init();
        let connected = Rc::new(Cell::new(false));
        let cn = connected.clone();
        lp.tcp_connect(client, addr, move |_, _, r| {
            r.unwrap();
            cn.set(true);
        })
        .unwrap();
        while !connected.get() {
            lp.run(RunMode::Once).unwrap();
        }
        let left = Rc::new(Cell::new(0));
        b.iter(|| {
            pinger(&mut lp, client, ROUNDS, left.clone());
            while left.get() > 0 {
                lp.run(RunMode::Once).unwrap();
            }
        });
        lp.close(client, |_| {}).unwrap();
        lp.close(server, |_| {}).unwrap();
        lp.run(RunMode::Default).unwrap();
    });

    g.bench_function("unix_10k_round_trips", |b| {
        let mut lp = Loop::new().unwrap();
        let (client, server_end) = lp.pipe_pair(false).unwrap();
        echo(&mut lp, server_end);
        let left = Rc::new(Cell::new(0));
        b.iter(|| {
            pinger(&mut lp, client, ROUNDS, left.clone());
            while left.get() > 0 {
                lp.run(RunMode::Once).unwrap();
            }
        });
        lp.close(client, |_| {}).unwrap();
        lp.run(RunMode::Default).unwrap();
    });
    g.finish();
}

/// A TCP socket sent over an IPC pipe with `write2`; the receiver accepts the
/// pending handle and closes it (round-robin dispatch's hot path).
fn ipc_fd_pass(c: &mut Criterion) {
    let mut g = c.benchmark_group("ipc_fd_pass");
    short(&mut g);
    const N: u64 = 10_000;
    const WINDOW: u64 = 32;
    g.throughput(Throughput::Elements(N));
    g.bench_function("write2_accept_close_10k", |b| {
        let mut lp = Loop::new().unwrap();
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let conn = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let _peer = listener.accept().unwrap();
        let sock = lp.tcp_init();
        lp.tcp_open(sock, conn.into()).unwrap();
        let (tx, rx) = lp.pipe_pair(true).unwrap();
        let sent = Rc::new(Cell::new(0u64));
        let recvd = Rc::new(Cell::new(0u64));
        let (s2, r2) = (sent.clone(), recvd.clone());
        lp.read_start(rx, move |lp, rx, data| {
            assert!(!data.unwrap().is_empty());
            while lp.pipe_pending_count(rx) > 0 {
                match lp.pipe_accept_pending(rx).unwrap() {
                    Socket::Tcp(t) => lp.close(t, |_| {}).unwrap(),
                    other => panic!("unexpected {other:?}"),
                }
                r2.set(r2.get() + 1);
                if s2.get() < N {
                    s2.set(s2.get() + 1);
                    lp.write2(tx, &[b"h"], sock, |_, _, r| r.unwrap()).unwrap();
                }
            }
        })
        .unwrap();
        b.iter(|| {
            sent.set(0);
            recvd.set(0);
            for _ in 0..WINDOW {
                sent.set(sent.get() + 1);
                lp.write2(tx, &[b"h"], sock, |_, _, r| r.unwrap()).unwrap();
            }
            while recvd.get() < N {
                lp.run(RunMode::Once).unwrap();
            }
        });
        for h in [tx, rx] {
            lp.close(h, |_| {}).unwrap();
        }
        lp.close(sock, |_| {}).unwrap();
        lp.run(RunMode::Default).unwrap();
    });
    g.finish();
}

criterion_group!(benches, timers, loop_count, ping_pong, ipc_fd_pass);
criterion_main!(benches);
