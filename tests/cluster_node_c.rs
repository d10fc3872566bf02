//! Node's test-cluster-*.js, group C (TCP/pipe listening, round-robin and
//! shared handles), ported: a Rust primary with real Node workers
//! (`tests/node/ports_worker.js`), and Rust workers.

mod cluster_node_common;
mod util;

use std::os::unix::fs::PermissionsExt;

use cluster_node_common::*;
use serde_json::{Value, json};
use util::*;
use uvcluster::cluster::{SchedulingPolicy, Settings, Worker};
use uvcluster::net::{ListenOptions, Server};
use uvcluster::uv::Loop;

fn with_env(mut s: Settings, pairs: &[(&str, &str)]) -> Settings {
    s.env.as_mut().unwrap().extend(env(pairs));
    s
}

/// Runs one or more workers; `on_msg` sees their messages and must end
/// the run (disconnect). Returns the workers.
fn run_msgs(
    settings: Settings,
    n: usize,
    on_msg: impl FnMut(&mut Loop, &uvcluster::cluster::Primary, Worker, Value) + 'static,
) -> Vec<Worker> {
    let mut lp = Loop::new().unwrap();
    let (p, _log) = primary(&mut lp, settings);
    let mut on_msg = on_msg;
    let p2 = p;
    p.on_message(&mut lp, move |lp, w, m, _| {
        assert_ne!(m["op"], "error", "{m}");
        on_msg(lp, &p2, w, m)
    });
    let ws: Vec<Worker> = (0..n).map(|_| p.fork(&mut lp, vec![]).unwrap()).collect();
    run(&mut lp, 30_000);
    for w in &ws {
        assert_eq!(
            w.exit_status(&lp),
            Some((Some(0), None)),
            "worker {}",
            w.id()
        );
    }
    assert!(p.workers(&lp).is_empty());
    assert_loop_empty(&lp);
    ws
}

/// test-cluster-net-listen: `listen()` with no arguments works.
#[test]
fn net_listen_without_a_port() {
    run_msgs(node_worker("listen_noarg", RR), 1, |lp, _, w, m| {
        assert!(m["port"].as_u64().unwrap() > 0);
        w.disconnect(lp);
    });
}

/// test-cluster-net-listen-backlog: the worker's `backlog: 127` reaches
/// the primary's listen (the kernel shows it as the listener's Send-Q).
#[test]
fn net_listen_backlog_reaches_the_primary() {
    run_msgs(node_worker("backlog", RR), 1, |lp, _, w, m| {
        let port = m["port"].as_u64().unwrap();
        let out = std::process::Command::new("ss")
            .args(["-Hltn", &format!("sport = :{port}")])
            .output()
            .expect("ss (iproute2)");
        let text = String::from_utf8_lossy(&out.stdout);
        let send_q: Vec<&str> = text
            .lines()
            .filter_map(|l| l.split_whitespace().nth(2))
            .collect();
        assert_eq!(send_q, ["127"], "{text}");
        w.disconnect(lp);
    });
}

/// test-cluster-net-listen-ipv6only-false: 3 workers on `::` port 0 share
/// one port, dual-stack: an IPv4 connection works.
#[test]
fn ipv6only_false_dual_stack() {
    let ports = shared(Vec::<u64>::new());
    run_msgs(node_worker("ipv6", RR), 3, move |lp, p, _, m| {
        assert_eq!(m["family"], "IPv6");
        ports.borrow_mut().push(m["port"].as_u64().unwrap());
        if ports.borrow().len() < 3 {
            return;
        }
        let port = ports.borrow()[0];
        assert!(ports.borrow().iter().all(|&q| q == port));
        let p = *p;
        fetch(
            lp,
            &Target::Tcp(localhost(port as u16)),
            b"",
            move |lp, r| {
                assert!(!r.unwrap().is_empty());
                p.disconnect(lp, |_| {});
            },
        );
    });
}

/// test-cluster-listen-pipe-readable-writable: `readableAll` and
/// `writableAll` reach the primary; the socket file is mode 0777.
/// test-cluster-http-pipe: HTTP on a Unix socket, remote address undefined.
#[test]
fn unix_socket_readable_writable_and_http_pipe() {
    let dir = tmpdir("pipe");
    let sock = dir.join("rw.sock");
    let s2 = sock.clone();
    run_msgs(
        with_env(
            node_worker("pipe_rw", RR),
            &[("SOCK", sock.to_str().unwrap())],
        ),
        1,
        move |lp, _, w, _| {
            let mode = std::fs::metadata(&s2).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o777);
            w.disconnect(lp);
        },
    );
    assert!(!sock.exists(), "the socket file is removed on close");
    let sock = dir.join("http.sock");
    let s2 = sock.clone();
    run_msgs(
        with_env(
            node_worker("http_pipe", RR),
            &[("SOCK", sock.to_str().unwrap())],
        ),
        1,
        move |lp, _, w, _| {
            fetch(lp, &Target::Unix(s2.clone()), HTTP_GET, move |lp, r| {
                let b: Value = serde_json::from_str(&body(&r.unwrap())).unwrap();
                assert_eq!(b, json!({"remote":"undefined"}));
                w.disconnect(lp);
            });
        },
    );
    std::fs::remove_dir_all(dir).unwrap();
}

/// test-cluster-child-index-net: two concurrent `listen(0)`s in one
/// worker, then both closed and re-listened, all succeed.
#[test]
fn child_index_net() {
    run_msgs(node_worker("child_index", RR), 1, |lp, _, w, m| {
        assert_eq!(m["op"], "done");
        let ports = m["ports"].as_array().unwrap();
        assert_eq!(ports.len(), 4);
        assert_ne!(ports[0], ports[1], "two servers, two handles");
        w.disconnect(lp);
    });
}

/// test-cluster-server-restart-rr / -none: worker 2 closes and re-listens
/// on port 0; both exit 0.
fn server_restart(policy: SchedulingPolicy) {
    let listening = Counter::new();
    run_msgs(
        node_worker("restart", policy),
        2,
        move |lp, p, w, m| match m["op"].as_str().unwrap() {
            "listening" => {
                listening.hit();
                if listening.get() == 2 {
                    p.worker(lp, 2)
                        .unwrap()
                        .send(lp, &json!({"op":"restart"}), None)
                        .unwrap();
                }
            }
            "relistening" => {
                assert_eq!(w.id(), 2);
                assert!(m["port"].as_u64().unwrap() > 0);
                p.disconnect(lp, |_| {});
            }
            _ => panic!("{m}"),
        },
    );
}

#[test]
fn server_restart_rr() {
    server_restart(RR);
}

#[test]
fn server_restart_none() {
    server_restart(NONE);
}

/// test-cluster-disconnect-leak: `cluster.disconnect()` right after fork
/// (SCHED_NONE) still gives 'disconnect' and 'exit'.
/// test-cluster-shared-leak / disconnect-race / disconnect-unshared-tcp:
/// one worker without servers disconnected while another is starting and
/// listening (SCHED_NONE); then `cluster.disconnect()`; all exit 0.
#[test]
fn disconnect_leak_race_and_unshared_tcp_sched_none() {
    let mut lp = Loop::new().unwrap();
    let (p, log) = primary(&mut lp, node_worker("listen_then", NONE));
    let ws: Vec<Worker> = (0..2).map(|_| p.fork(&mut lp, vec![]).unwrap()).collect();
    p.disconnect(&mut lp, |_| {});
    run(&mut lp, 20_000);
    for w in &ws {
        assert_eq!(w.exit_status(&lp), Some((Some(0), None)));
        let ev = events(&log, w.id());
        assert!(
            ev.ends_with(&["disconnect".into(), "exit".into()]),
            "{ev:?}"
        );
    }
    assert_loop_empty(&lp);

    let mut lp = Loop::new().unwrap();
    let (p, _log) = primary(&mut lp, node_worker("idle", NONE));
    let p2 = p;
    p.on_message(&mut lp, move |lp, w, _, _| {
        // Worker 1 (no servers) is disconnected while worker 2 starts.
        if w.id() == 1 {
            w.disconnect(lp);
            p2.fork(lp, env(&[("SCENARIO", "listen_then")])).unwrap();
        }
    });
    let p3 = p;
    p.on_listening(&mut lp, move |lp, w, _| {
        assert_eq!(w.id(), 2);
        let p4 = p3;
        let addr = localhost(0);
        let _ = addr;
        p4.disconnect(lp, |_| {});
    });
    let w1 = p.fork(&mut lp, vec![]).unwrap();
    run(&mut lp, 20_000);
    assert_eq!(w1.exit_status(&lp), Some((Some(0), None)));
    assert_eq!(p.workers(&lp).len(), 0);
    assert_loop_empty(&lp);
}

/// test-cluster-rr-handle-close / rr-ref: a Rust round-robin worker with
/// its channel unref'd exits once its server closes (the close callback
/// fires).
#[test]
fn rr_worker_with_unrefd_channel_exits_once_its_server_closes() {
    let mut lp = Loop::new().unwrap();
    let (p, log) = primary(&mut lp, rust_worker("helper_rr_close", RR));
    let w = p.fork(&mut lp, vec![]).unwrap();
    run(&mut lp, 20_000);
    assert_eq!(w.exit_status(&lp), Some((Some(0), None)));
    assert_eq!(
        events(&log, 1),
        ["fork", "online", "listening", "disconnect", "exit"]
    );
    assert_loop_empty(&lp);
}

#[test]
fn helper_rr_close() {
    as_worker("helper_rr_close", |lp, w| {
        let s = Server::new(lp, |lp, s, c| s.close_connection(lp, c));
        s.listen(lp, ListenOptions::port(0), move |lp, s, r| {
            r.unwrap();
            // As in Node's test: unref the channel once listening.
            w.channel(lp).unwrap().set_ref(lp, false).unwrap();
            s.close(lp, |_, _| println!("closed"));
        })
        .unwrap();
    });
}

/// test-cluster-rr-handle-keep-loop-alive: a listening round-robin server
/// keeps a Rust worker alive even with its channel unref'd, and serves.
#[test]
fn rr_server_keeps_an_unrefd_worker_alive() {
    let mut lp = Loop::new().unwrap();
    let (p, _log) = primary(&mut lp, rust_worker("helper_rr_alive", RR));
    p.on_listening(&mut lp, |lp, w, addr| {
        let port = addr.port.unwrap() as u16;
        fetch(lp, &Target::Tcp(localhost(port)), b"", move |lp, r| {
            assert_eq!(r.unwrap(), b"alive");
            w.disconnect(lp);
        });
    });
    let w = p.fork(&mut lp, vec![]).unwrap();
    run(&mut lp, 20_000);
    assert_eq!(w.exit_status(&lp), Some((Some(0), None)));
    assert_loop_empty(&lp);
}

#[test]
fn helper_rr_alive() {
    as_worker("helper_rr_alive", |lp, w| {
        let s = Server::new(lp, |lp, s, c| {
            let uvcluster::uv::Stream::Tcp(t) = c else {
                unreachable!()
            };
            lp.write(t, &[b"alive"], move |lp, t, _| {
                s.close_connection(lp, uvcluster::uv::Stream::Tcp(t))
            })
            .unwrap();
        });
        s.listen(lp, ListenOptions::port(0), move |lp, _, r| {
            r.unwrap();
            w.channel(lp).unwrap().set_ref(lp, false).unwrap();
        })
        .unwrap();
    });
}

/// test-cluster-worker-handle-close, worker side: a `newconn` that arrives
/// after the worker closed its server is answered `accepted: false` and
/// the received socket is closed in the worker. The primary here is a raw
/// channel (as Node's test fakes the handle), so the `newconn` comes
/// deterministically after the worker's `close`: the client then sees EOF
/// with no data once the primary also closes its copy.
#[test]
fn worker_handle_close_rejects_a_late_newconn_rust_worker() {
    use std::io::Read;
    use std::os::fd::OwnedFd;
    use uvcluster::ipc::{AfterAck, Attach, ForkOptions, ForkStdio, HandleKind, fork};

    const KEY: &str = "fake:key";
    let mut lp = Loop::new().unwrap();
    let mut opts = ForkOptions::exec(std::env::current_exe().unwrap());
    opts.process.args = ["helper_handle_close", "--exact", "--nocapture"]
        .iter()
        .map(Into::into)
        .collect();
    // The helper's test-harness chatter to /dev/null; its stderr (a panic)
    // still shows.
    opts.stdio = Some(vec![
        ForkStdio::Ignore,
        ForkStdio::Ignore,
        ForkStdio::Inherit,
        ForkStdio::Ipc,
    ]);
    opts.env = env(&[
        ("UVCLUSTER_TEST_HELPER", "helper_handle_close"),
        ("NODE_UNIQUE_ID", "1"),
    ]);
    let exit = shared(None);
    let e = exit.clone();
    opts.process.on_exit = Some(Box::new(move |lp, p, code, sig| {
        *e.borrow_mut() = Some((code, sig));
        lp.close(p, |_| {}).unwrap();
    }));
    let child = fork(&mut lp, opts).unwrap();
    for p in child.stdio.into_iter().flatten() {
        lp.close(p, |_| {}).unwrap();
    }
    let steps = Log::new();
    let s = steps.clone();
    child
        .channel
        .on_message(&mut lp, |_, _, m, _| panic!("user message {m}"));
    child.channel.on_internal(&mut lp, move |lp, ch, m, h| {
        assert!(h.is_none());
        let act = m["act"].as_str().unwrap_or("").to_owned();
        s.push(act.clone());
        let seq = m["seq"].clone();
        let reply = |lp: &mut Loop, mut f: serde_json::Map<String, Value>| {
            f.insert("ack".into(), seq.clone());
            ch.send_cluster(lp, f, None, None).unwrap();
        };
        match act.as_str() {
            "online" => {}
            "queryServer" => {
                let f = json!({"errno":null,"key":KEY,"data":null,
                    "sockname":{"address":"127.0.0.1","family":"IPv4","port":1}});
                reply(lp, f.as_object().unwrap().clone());
            }
            "listening" => ch.send(lp, &json!({"op":"close"}), None).unwrap(),
            "close" => {
                assert_eq!(m["key"], KEY);
                // A connection for the closed server.
                let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
                let mut client = std::net::TcpStream::connect(l.local_addr().unwrap()).unwrap();
                let (conn, _) = l.accept().unwrap();
                let t = lp.tcp_init();
                lp.tcp_open(t, OwnedFd::from(conn)).unwrap();
                let attach = Attach {
                    handle: t.into(),
                    kind: HandleKind::NetNative,
                    after_ack: AfterAck::Keep,
                };
                let s = s.clone();
                let f = json!({"act":"newconn","key":KEY});
                ch.send_cluster(
                    lp,
                    f.as_object().unwrap().clone(),
                    Some(attach),
                    Some(Box::new(move |lp, ch, r, _| {
                        assert_eq!(r["accepted"], false, "{r}");
                        s.push("rejected");
                        // Our copy closed too: the client sees EOF, so the
                        // worker closed its copy.
                        lp.close(t, |_| {}).unwrap();
                        client
                            .set_read_timeout(Some(std::time::Duration::from_secs(10)))
                            .unwrap();
                        let mut buf = Vec::new();
                        client.read_to_end(&mut buf).unwrap();
                        assert!(buf.is_empty());
                        ch.send(lp, &json!({"op":"bye"}), None).unwrap();
                    })),
                )
                .unwrap();
            }
            "exitedAfterDisconnect" => reply(lp, serde_json::Map::new()),
            other => panic!("unexpected {other}: {m}"),
        }
    });
    run(&mut lp, 20_000);
    assert_eq!(
        steps.joined(),
        "online queryServer listening close rejected exitedAfterDisconnect"
    );
    assert_eq!(*exit.borrow(), Some((0, None)));
    assert_loop_empty(&lp);
}

#[test]
fn helper_handle_close() {
    as_worker("helper_handle_close", |lp, w| {
        let s = Server::new(lp, |_, _, c| panic!("a connection after close: {c:?}"));
        s.listen(lp, ListenOptions::port(0), |_, _, r| {
            r.unwrap();
        })
        .unwrap();
        w.on_message(lp, move |lp, w, m, _| match m["op"].as_str().unwrap() {
            "close" => s.close(lp, |_, _| {}),
            "bye" => w.disconnect(lp),
            other => panic!("unexpected {other}"),
        });
    });
}

/// test-cluster-net-listen-relative-path: a Unix socket path whose
/// absolute form is longer than `sun_path` (108 bytes). The worker sends
/// the absolute path; the primary binds with the shorter path relative to
/// its own cwd, and clients connect through the relative path. Node
/// workers in both policies and a Rust worker; the socket file is gone
/// once the workers are.
#[test]
fn net_listen_relative_path() {
    let cwd = std::env::current_dir().unwrap();
    // `target/tmp/<name>/s.sock`, long enough that the absolute path is
    // over 108 bytes wherever the checkout is, short enough to bind.
    let rel_len = 90.max(111 - cwd.as_os_str().len().min(111) - 1);
    let name_len = rel_len - "target/tmp//s.sock".len();
    let name =
        format!("rel-{}-{}", std::process::id(), "x".repeat(name_len))[..name_len].to_owned();
    let rel_dir = std::path::Path::new("target/tmp").join(name);
    let rel = rel_dir.join("s.sock");
    assert!(cwd.join(&rel).as_os_str().len() > 108);
    assert!(rel.as_os_str().len() < 107);
    let _ = std::fs::remove_dir_all(&rel_dir);
    std::fs::create_dir_all(&rel_dir).unwrap();
    let abs_dir = cwd.join(&rel_dir);
    let mut cases = vec![
        listen_on_path(node_worker("listen_on", RR)),
        listen_on_path(node_worker("listen_on", NONE)),
    ];
    cases.push(rust_worker("helper_relative_path", RR));
    for mut s in cases {
        s.cwd = Some(abs_dir.clone());
        let target = Target::Unix(rel.clone());
        let got = shared(String::new());
        let g = got.clone();
        run_msgs(s, 1, move |lp, _, w, m| {
            assert_eq!(m["op"], "listening", "{m}");
            let (w, g) = (w, g.clone());
            fetch(lp, &target, b"", move |lp, r| {
                *g.borrow_mut() = String::from_utf8(r.unwrap()).unwrap();
                w.disconnect(lp);
            });
        });
        assert!(!got.borrow().is_empty(), "served");
        assert!(!rel.exists(), "socket file removed");
    }
    std::fs::remove_dir_all(&rel_dir).unwrap();
}

fn listen_on_path(mut s: Settings) -> Settings {
    s.env
        .as_mut()
        .unwrap()
        .extend(env(&[("LISTEN", "./s.sock")]));
    s
}

#[test]
fn helper_relative_path() {
    as_worker("helper_relative_path", |lp, w| {
        let s = Server::new(lp, |lp, s, c| {
            let uvcluster::uv::Stream::Pipe(p) = c else {
                unreachable!()
            };
            lp.write(p, &[b"rust"], move |lp, p, _| {
                s.close_connection(lp, uvcluster::uv::Stream::Pipe(p))
            })
            .unwrap();
        });
        s.listen(lp, ListenOptions::path("s.sock"), move |lp, _, r| {
            r.unwrap();
            w.send(lp, &json!({"op":"listening"}), None).unwrap();
        })
        .unwrap();
    });
}
