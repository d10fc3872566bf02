//! Smoke tests: timers and a TCP ping-pong on one loop.
mod util;
use std::io;
use std::time::Duration;
use util::*;
use uvcluster::uv::{BindFlags, Loop, RunMode};

#[test]
fn timers_fire_in_order() {
    let mut lp = Loop::new().unwrap();
    let log = Log::new();
    for (name, ms) in [("a", 10u64), ("b", 5), ("c", 5)] {
        let t = lp.timer_init();
        let l = log.clone();
        lp.timer_start(
            t,
            Duration::from_millis(ms),
            Duration::ZERO,
            move |lp, t| {
                l.push(name);
                lp.close(t, |_| {}).unwrap();
            },
        )
        .unwrap();
    }
    run_with_deadline(&mut lp, 5000);
    assert_eq!(log.joined(), "b c a");
    assert_loop_empty(&lp);
}

#[test]
fn tcp_ping_pong() {
    let mut lp = Loop::new().unwrap();
    let server = lp.tcp_init();
    lp.tcp_bind(server, "127.0.0.1:0".parse().unwrap(), BindFlags::default())
        .unwrap();
    let pongs = Counter::new();
    lp.tcp_listen(server, 128, move |lp, server, client| {
        let client = client.unwrap();
        lp.read_start(client, |lp, c, data: io::Result<&[u8]>| {
            let data = data.unwrap();
            if data.is_empty() {
                lp.close(c, |_| {}).unwrap();
            } else {
                lp.write(c, &[data], |_, _, r| r.unwrap()).unwrap();
            }
        })
        .unwrap();
        lp.close(server, |_| {}).unwrap();
    })
    .unwrap();
    let addr = lp.tcp_getsockname(server).unwrap();
    let client = lp.tcp_init();
    let p = pongs.clone();
    lp.tcp_connect(client, addr, move |lp, c, r| {
        r.unwrap();
        lp.write(c, &[b"PING\n"], |_, _, r| r.unwrap()).unwrap();
        let p = p.clone();
        lp.read_start(c, move |lp, c, data| {
            let data = data.unwrap();
            assert_eq!(data, b"PING\n");
            p.hit();
            if p.get() == 100 {
                lp.shutdown(c, |lp, c, r| {
                    r.unwrap();
                    lp.close(c, |_| {}).unwrap();
                })
                .unwrap();
                lp.read_stop(c).unwrap();
            } else {
                lp.write(c, &[b"PING\n"], |_, _, r| r.unwrap()).unwrap();
            }
        })
        .unwrap();
    })
    .unwrap();
    run_with_deadline(&mut lp, 5000);
    assert_eq!(pongs.get(), 100);
    assert_loop_empty(&lp);
    let _ = RunMode::Once;
}
