//! Rust workers under a real Node primary: `tests/node/primary.js` runs
//! `cluster.fork()` with `process.execPath` set to the `cluster_hello`
//! example, makes HTTP requests, and reports what its cluster saw.

mod util;

use std::path::PathBuf;
use std::process::Command;

use serde_json::Value;

fn example(name: &str) -> PathBuf {
    // Built by `cargo test` next to the test binaries.
    util::example(name)
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
        // Node's round-robin spreads over both (a worker still busy with
        // its last hand-off is skipped, so the split varies with load;
        // seen as far as 30/10 on a busy machine).
        let c1 = counts["1"].as_u64().unwrap();
        assert!((5..=35).contains(&c1), "{v}");
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

// ----- one Rust worker, one scenario each --------------------------------

use serde_json::json;
use uvcluster::cluster;
use uvcluster::net::{ListenOptions, Server};
use uvcluster::uv::{Loop, RunMode};

fn scenario(name: &str) -> Value {
    util::require_node();
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/node/primary_scenarios.js");
    let out = Command::new("node")
        .arg(script)
        .arg(std::env::current_exe().unwrap())
        .arg(name)
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

fn events(v: &Value) -> String {
    v["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e.as_str().unwrap())
        .collect::<Vec<_>>()
        .join(", ")
}

/// Runs `body` as the Rust worker when this process is the helper `name`.
fn as_worker(name: &str, body: impl FnOnce(&mut Loop, cluster::Worker)) {
    if !util::is_helper(name) {
        return;
    }
    let mut lp = Loop::new().unwrap();
    let w = cluster::setup_worker(&mut lp)
        .unwrap()
        .expect("started as a worker");
    assert!(cluster::is_worker(&mut lp));
    assert!(
        std::env::var("NODE_UNIQUE_ID").is_err(),
        "NODE_UNIQUE_ID removed"
    );
    assert!(
        std::env::var("NODE_CHANNEL_FD").is_err(),
        "NODE_CHANNEL_FD removed"
    );
    assert_eq!(w.id(), 1);
    body(&mut lp, w);
    lp.run(RunMode::Default).unwrap();
}

fn listen_then(lp: &mut Loop, f: impl FnOnce(&mut Loop, Server) + 'static) {
    let s = Server::new(lp, |lp, s, c| s.close_connection(lp, c));
    s.listen(lp, ListenOptions::port(0), move |lp, s, r| {
        r.unwrap();
        f(lp, s)
    })
    .unwrap();
}

#[test]
fn helper_worker_disconnect() {
    as_worker("helper_worker_disconnect", |lp, _| {
        listen_then(lp, |lp, _| {
            let w = cluster::setup_worker(lp).unwrap().unwrap();
            w.disconnect(lp);
        });
    });
}

#[test]
fn node_primary_sees_worker_initiated_disconnect() {
    let v = scenario("worker_disconnect");
    assert_eq!(
        events(&v),
        "online, listening true, disconnect true, exit 0 null true"
    );
}

#[test]
fn helper_worker_destroy() {
    as_worker("helper_worker_destroy", |lp, w| {
        listen_then(lp, move |lp, _| w.kill(lp, None).unwrap());
    });
}

#[test]
fn node_primary_sees_worker_destroy() {
    let v = scenario("worker_destroy");
    assert_eq!(
        events(&v),
        "online, listening true, disconnect true, exit 0 null true"
    );
}

#[test]
fn helper_worker_exit42() {
    as_worker("helper_worker_exit42", |lp, _| {
        // The listen callback runs before `listening` is sent (as in Node):
        // exit on the next tick so the primary sees it.
        listen_then(lp, |lp, _| {
            uvcluster::net::defer(lp, |_| std::process::exit(42))
        });
    });
}

#[test]
fn node_primary_sees_worker_exit_code() {
    let v = scenario("worker_exit42");
    let e = events(&v);
    assert!(e.starts_with("online, listening true"), "{e}");
    assert!(e.contains("exit 42 null false"), "{e}");
}

#[test]
fn helper_eaddrinuse() {
    as_worker("helper_eaddrinuse", |lp, w| {
        let port: u16 = std::env::var("PORT").unwrap().parse().unwrap();
        let s = Server::new(lp, |lp, s, c| s.close_connection(lp, c));
        let w2 = w;
        s.listen(lp, ListenOptions::port(port), move |lp, _, r| {
            let e = r.unwrap_err();
            w2.send(
                lp,
                &json!({"op":"retry-me","code":e.code,"errno":e.errno,"syscall":e.syscall}),
                None,
            )
            .unwrap();
        })
        .unwrap();
        w.on_message(lp, move |lp, w, msg, _| {
            assert_eq!(msg["op"], "retry");
            let s = Server::new(lp, |lp, s, c| s.close_connection(lp, c));
            s.listen(lp, ListenOptions::port(port), move |lp, s, r| {
                assert_eq!(r.unwrap().port(), Some(port));
                let w = cluster::setup_worker(lp).unwrap().unwrap();
                let _ = s;
                w.disconnect(lp);
            })
            .unwrap();
            let _ = w;
        });
    });
}

#[test]
fn node_primary_bind_error_reaches_the_worker_which_retries() {
    let v = scenario("eaddrinuse");
    let m = &v["messages"][0];
    assert_eq!(m["code"], "EADDRINUSE", "{v}");
    assert_eq!(m["errno"], -98);
    assert_eq!(m["syscall"], "bind");
    assert_eq!(
        events(&v),
        "online, listening true, disconnect true, exit 0 null true"
    );
}

#[test]
fn helper_messages() {
    as_worker("helper_messages", |lp, w| {
        let payload = json!({"nested":[1,{"u":"ünïcødé ✓"}],"n":null});
        w.send(lp, &json!({"op":"echo-me","payload":payload.clone()}), None)
            .unwrap();
        w.on_message(lp, move |lp, w, msg, _| {
            assert_eq!(msg["payload"], payload);
            w.disconnect(lp);
        });
    });
}

#[test]
fn node_primary_messages_both_ways() {
    let v = scenario("messages");
    assert_eq!(v["messages"][0]["op"], "echo-me");
    assert_eq!(events(&v), "online, disconnect true, exit 0 null true");
}

#[test]
fn helper_udp() {
    as_worker("helper_udp", |lp, w| {
        use uvcluster::net::{BindOptions, bind_dgram};
        bind_dgram(
            lp,
            BindOptions {
                address: Some("127.0.0.1".into()),
                ..Default::default()
            },
            move |lp, r| {
                let u = r.expect("shared UDP socket from the primary");
                let port = lp.udp_getsockname(u).unwrap().port();
                w.send(lp, &json!({"op":"udp","port":port}), None).unwrap();
                let w2 = w;
                lp.udp_recv_start(u, move |lp, u, r| {
                    let (data, _) = r.unwrap();
                    w2.send(
                        lp,
                        &json!({"op":"got","data":String::from_utf8_lossy(data)}),
                        None,
                    )
                    .unwrap();
                    lp.close(u, |_| {}).unwrap();
                    w2.disconnect(lp);
                })
                .unwrap();
            },
        );
    });
}

#[test]
fn node_primary_shares_udp_with_a_rust_worker() {
    let v = scenario("udp");
    assert_eq!(v["messages"][0]["op"], "udp", "{v}");
    assert!(v["messages"][0]["port"].as_u64().unwrap() > 0);
    assert_eq!(v["messages"][1]["data"], "hello over udp", "{v}");
    // A bound dgram socket makes the worker `listening`, as in Node.
    assert_eq!(
        events(&v),
        "online, listening true, disconnect true, exit 0 null true"
    );
}
