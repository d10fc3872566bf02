//! The control socket and `uvcluster ctl` (docs/control.md): every
//! command against a real pool of `cluster_hello` workers; the socket's
//! mode, a live owner refused and a stale socket taken over; a reload that
//! fails closed makes `ctl reload` exit 1; and each kind of bad client
//! (garbage, a huge line, a silent peer, too many at once) gets an error
//! line or is dropped while a bounded HTTP load through the same primary
//! sees zero failed requests.

#[path = "../../tests/util/mod.rs"]
mod util;

mod ops_util;

use std::os::unix::fs::PermissionsExt;
use std::time::Duration;

use nix::sys::signal::Signal;
use ops_util::*;
use uvcluster::serde_json::{Value, json};

fn text(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr)
}

#[test]
fn ctl_status_scale_restart_send_reload_stop() {
    let dir = TempDir::new("ctl");
    let sock = dir.join("c.sock");
    let port = free_port();
    let mut r = start_hello(2, port, &sock, &[]);

    // status: one row per worker, with the documented columns.
    let out = ctl(&sock, &["status"]);
    assert!(out.status.success(), "{}", text(&out));
    let t = String::from_utf8(out.stdout).unwrap();
    let lines: Vec<&str> = t.lines().collect();
    assert_eq!(lines.len(), 3, "{t}");
    for col in [
        "ID", "PID", "STATE", "UPTIME", "RESTARTS", "OPEN", "HANDED", "RSS", "CPU%",
    ] {
        assert!(lines[0].contains(col), "{t}");
    }
    assert!(lines[1..].iter().all(|l| l.contains(" ready ")), "{t}");

    // --json: the rows with RSS and CPU from /proc.
    let v = status(&sock);
    assert_eq!(v["ok"], true);
    let ws = v["workers"].as_array().unwrap();
    assert_eq!(ws.len(), 2, "{v}");
    for w in ws {
        assert!(w["pid"].as_i64().unwrap() > 0, "{w}");
        assert!(w["rss_bytes"].as_u64().unwrap() > 0, "{w}");
        assert!(w["cpu_seconds"].as_f64().is_some(), "{w}");
    }
    let (ok, _) = (get(port, "/").unwrap(), ());
    assert_eq!(ok.0, 200);

    // scale 3, then back to 2.
    let out = ctl(&sock, &["scale", "3"]);
    assert!(out.status.success(), "{}", text(&out));
    eventually("3 workers ready", || ready_count(&sock) == 3);
    let out = ctl(&sock, &["scale", "0"]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(
        text(&out).contains("\"workers\" must be a whole number from 1 to 4096. Received 0"),
        "{}",
        text(&out)
    );

    // restart ID: a replacement, then the old one goes.
    let id = status(&sock)["workers"][0]["id"].as_u64().unwrap();
    let out = ctl(&sock, &["restart", &id.to_string()]);
    assert!(out.status.success(), "{}", text(&out));
    eventually("worker replaced", || {
        let v = status(&sock);
        let ws = v["workers"].as_array().unwrap().clone();
        ws.iter().all(|w| w["id"].as_u64() != Some(id))
            && ws.iter().filter(|w| w["state"] == "ready").count() == 3
    });
    let out = ctl(&sock, &["restart", "999"]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));

    // send: to every worker.
    let out = ctl(&sock, &["send", r#"{"hello":1}"#]);
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(String::from_utf8_lossy(&out.stdout), "sent to 3 workers\n");

    // reload: waits for the roll, then reports it.
    let before: Vec<Value> = status(&sock)["workers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|w| w["id"].clone())
        .collect();
    let out = ctl(&sock, &["reload"]);
    assert!(out.status.success(), "{}", text(&out));
    // The duration as the log writes it (`1s 218ms`), not `1.218s`.
    let said = String::from_utf8_lossy(&out.stdout).into_owned();
    let took = said
        .strip_prefix("reload finished: 3 workers replaced in ")
        .unwrap_or_else(|| panic!("{said}"));
    assert!(
        took.ends_with("ms\n") || took.ends_with("s\n") && !took.contains('.'),
        "{said}"
    );
    let after = status(&sock);
    assert!(
        after["workers"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|w| w["state"] == "ready")
            .all(|w| !before.contains(&w["id"])),
        "{after}"
    );
    assert_eq!(after["reloads"], json!({"ok": 1, "failed": 0}));

    // Usage errors exit 2.
    let out = ctl(&sock, &["frobnicate"]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));

    // stop: graceful; the primary exits 0 and its socket is gone.
    let out = ctl(&sock, &["stop"]);
    assert!(out.status.success(), "{}", text(&out));
    r.expect("stop requested");
    let (code, log) = r.wait();
    assert_eq!(code, Some(0), "{log}");
    assert!(!sock.exists(), "the socket is unlinked");
    let out = ctl(&sock, &["status"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out).contains("cannot reach the primary"),
        "{}",
        text(&out)
    );
}

#[test]
fn socket_is_0600_a_live_owner_is_refused_a_stale_socket_taken_over() {
    let dir = TempDir::new("own");
    let sock = dir.join("c.sock");

    // A stale socket: bound, its listener gone (connect is refused).
    drop(std::os::unix::net::UnixListener::bind(&sock).unwrap());
    assert!(sock.exists());
    let r = start_hello(1, free_port(), &sock, &[]);
    assert!(r.log.contains("taken over"), "{}", r.log);
    let mode = std::fs::metadata(&sock).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    assert_eq!(ready_count(&sock), 1);

    // A second primary on the same socket: refused, exit 1, nothing
    // forked, the first one unharmed.
    let exe = hello();
    let port = free_port().to_string();
    let second = Running::start(
        &[
            "run",
            "-w",
            "1",
            "--control",
            sock.to_str().unwrap(),
            "--",
            exe.to_str().unwrap(),
        ],
        &[("PORT", &port)],
    );
    let (code, log) = second.wait();
    assert_eq!(code, Some(1), "{log}");
    assert!(log.contains("another primary is running"), "{log}");
    assert!(!log.contains("forked"), "{log}");
    assert_eq!(ready_count(&sock), 1);

    // A path that is not a socket is never unlinked.
    let file = dir.join("not-a-socket");
    std::fs::write(&file, "x").unwrap();
    let third = Running::start(
        &[
            "run",
            "-w",
            "1",
            "--control",
            file.to_str().unwrap(),
            "--",
            exe.to_str().unwrap(),
        ],
        &[("PORT", &port)],
    );
    let (code, log) = third.wait();
    assert_eq!(code, Some(1), "{log}");
    assert!(log.contains("is not a socket"), "{log}");
    assert_eq!(std::fs::read_to_string(&file).unwrap(), "x");

    r.signal(Signal::SIGTERM);
    assert_eq!(r.wait().0, Some(0));
}

#[test]
fn ctl_reload_exits_1_when_the_reload_fails_closed() {
    util::require_node();
    let dir = TempDir::new("failreload");
    let sock = dir.join("c.sock");
    let broken = dir.join("broken");
    let port = free_port().to_string();
    // New code that cannot start: a worker exits at once while `broken`
    // exists.
    let app = concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/node/fail_on_file.js");
    let mut r = Running::start(
        &[
            "run",
            "-w",
            "2",
            "--control",
            sock.to_str().unwrap(),
            "--",
            "node",
            app,
        ],
        &[("PORT", &port), ("BROKEN", broken.to_str().unwrap())],
    );
    r.expect(" ready");
    r.expect(" ready");
    let before = status(&sock);
    std::fs::write(&broken, "").unwrap();
    let out = ctl(&sock, &["reload"]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(
        text(&out).contains("reload failed closed"),
        "{}",
        text(&out)
    );
    // The old workers still serve.
    let after = status(&sock);
    let ids = |v: &Value| -> Vec<Value> {
        v["workers"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|w| w["state"] == "ready")
            .map(|w| w["id"].clone())
            .collect()
    };
    assert_eq!(ids(&before), ids(&after), "{after}");
    assert_eq!(after["reloads"], json!({"ok": 0, "failed": 1}));
    let p: u16 = port.parse().unwrap();
    assert_eq!(get(p, "/").unwrap(), (200, "hi".into()));
    r.signal(Signal::SIGTERM);
    assert_eq!(r.wait().0, Some(0));
}

/// A pool under a bounded load on `port`, for the bad-client tests: runs
/// `bad` while the load runs, then checks the load saw no failure and the
/// socket still answers.
fn under_load(tag: &str, idle: &str, bad: impl FnOnce(&std::path::Path)) {
    let dir = TempDir::new(tag);
    let sock = dir.join("c.sock");
    let port = free_port();
    let r = start_hello(2, port, &sock, &["--control-timeout", idle]);
    let load = Load::start(port, 4, 2000);
    eventually("the load runs", || load.ok() >= 50);
    bad(&sock);
    let seen = load.ok();
    eventually("the load goes on", || load.ok() >= seen + 50);
    let (ok, failed) = load.finish();
    assert!(
        failed.is_empty(),
        "{} failed of {}: {:?}",
        failed.len(),
        ok + failed.len(),
        &failed[..failed.len().min(5)]
    );
    assert!(ok >= 100, "{ok}");
    assert_eq!(ready_count(&sock), 2, "{}", r.log);
    r.signal(Signal::SIGTERM);
    let (code, log) = r.wait();
    assert_eq!(code, Some(0), "{log}");
}

#[test]
fn garbage_gets_an_error_reply_and_the_connection_stays_usable() {
    under_load("garbage", "10s", |sock| {
        let mut c = Client::connect(sock);
        for junk in [
            &b"\x00\x01\x02garbage\n"[..],
            b"{\"command\":\n",
            b"{\"command\":\"explode\"}\n",
            b"\xff\xfe\xfd\n",
            b"scale many\n",
        ] {
            c.send(junk);
            let v = c.reply().expect("an error reply");
            assert_eq!(v["ok"], false, "{junk:?}: {v}");
            assert!(!v["error"].as_str().unwrap().is_empty(), "{v}");
        }
        c.send(b"status\n");
        let v = c.reply().unwrap();
        assert_eq!(v["ok"], true, "{v}");
        assert_eq!(v["workers"].as_array().unwrap().len(), 2);
    });
}

#[test]
fn a_huge_line_gets_an_error_reply_then_a_close() {
    under_load("huge", "10s", |sock| {
        let mut c = Client::connect(sock);
        // 100 KiB without a newline (the limit is 64 KiB).
        let big = vec![b'x'; 100 * 1024];
        // The server may close before it has read all of it.
        let _ = std::io::Write::write_all(&mut c.s, &big);
        let v = c.reply().expect("an error reply before the close");
        assert_eq!(v["ok"], false);
        assert!(
            v["error"]
                .as_str()
                .unwrap()
                .contains("longer than 65536 bytes"),
            "{v}"
        );
        assert!(c.closed());
        // Others are served.
        let mut d = Client::connect(sock);
        d.send(b"{\"command\":\"status\"}\n");
        assert_eq!(d.reply().unwrap()["ok"], true);
    });
}

#[test]
fn a_silent_peer_is_closed_after_the_idle_timeout() {
    under_load("idle", "1s", |sock| {
        let mut c = Client::connect(sock);
        let t0 = std::time::Instant::now();
        let v = c.reply().expect("an idle error line");
        assert!(
            t0.elapsed() >= Duration::from_millis(900),
            "{:?}",
            t0.elapsed()
        );
        assert_eq!(v["ok"], false);
        assert!(v["error"].as_str().unwrap().contains("idle"), "{v}");
        assert!(c.closed());
    });
}

#[test]
fn too_many_clients_at_once_the_extra_ones_are_told_and_dropped() {
    under_load("many", "30s", |sock| {
        // 16 clients held open (each proven accepted by a reply), then
        // 8 more.
        let mut held: Vec<Client> = (0..16)
            .map(|_| {
                let mut c = Client::connect(sock);
                c.send(b"status\n");
                assert_eq!(c.reply().unwrap()["ok"], true);
                c
            })
            .collect();
        for _ in 0..8 {
            let mut c = Client::connect(sock);
            let v = c.reply().expect("an error line");
            assert_eq!(v["ok"], false);
            assert!(
                v["error"]
                    .as_str()
                    .unwrap()
                    .contains("too many control clients"),
                "{v}"
            );
            assert!(c.closed());
        }
        // The held ones still work; once they go, new ones are served.
        for c in &mut held {
            c.send(b"status\n");
            assert_eq!(c.reply().unwrap()["ok"], true);
        }
        drop(held);
        eventually("a new client is served", || {
            let mut c = Client::connect(sock);
            c.send(b"status\n");
            c.reply().is_some_and(|v| v["ok"] == true)
        });
    });
}

/// `uvcluster ctl` with an environment: `XDG_RUNTIME_DIR` and the rest.
fn ctl_env(args: &[&str], runtime: &std::path::Path) -> std::process::Output {
    let child = std::process::Command::new(bin())
        .arg("ctl")
        .args(args)
        .env("XDG_RUNTIME_DIR", runtime)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    wait_output(child)
}

#[test]
fn default_socket_in_the_runtime_dir_named_or_found_by_ctl() {
    let runtime = TempDir::new("xdg");
    let exe = hello();
    let xdg = runtime.0.to_str().unwrap().to_owned();
    let start = |extra: &[&str]| {
        let port = free_port().to_string();
        let mut args = vec!["run", "-w", "1"];
        args.extend_from_slice(extra);
        args.extend(["--", exe.to_str().unwrap()]);
        let mut r = Running::start(&args, &[("PORT", &port), ("XDG_RUNTIME_DIR", &xdg)]);
        r.expect(" ready");
        r
    };
    // Named: RUNTIME/uvcluster/web.sock, in a directory made 0700.
    let web = start(&["--name", "web"]);
    let dir = runtime.join("uvcluster");
    let mode = std::fs::metadata(&dir).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o700);
    assert!(dir.join("web.sock").exists());
    let out = ctl_env(&["--name", "web", "status"], &runtime.0);
    assert!(out.status.success(), "{}", text(&out));
    // The only one running: found without a name.
    let out = ctl_env(&["status"], &runtime.0);
    assert!(out.status.success(), "{}", text(&out));
    // A second, unnamed: uvcluster-PID.sock; now ctl must be told which.
    let other = start(&[]);
    let pid_sock = dir.join(format!("uvcluster-{}.sock", other.pid()));
    assert!(pid_sock.exists(), "{}", other.log);
    let out = ctl_env(&["status"], &runtime.0);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(
        text(&out).contains("several primaries are running"),
        "{}",
        text(&out)
    );
    assert!(text(&out).contains("web.sock"), "{}", text(&out));
    // The same name twice: refused.
    let port = free_port().to_string();
    let dup = Running::start(
        &[
            "run",
            "-w",
            "1",
            "--name",
            "web",
            "--",
            exe.to_str().unwrap(),
        ],
        &[("PORT", &port), ("XDG_RUNTIME_DIR", &xdg)],
    );
    let (code, log) = dup.wait();
    assert_eq!(code, Some(1), "{log}");
    assert!(log.contains("another primary is running"), "{log}");
    for r in [web, other] {
        r.signal(Signal::SIGTERM);
        assert_eq!(r.wait().0, Some(0));
    }
    assert!(!pid_sock.exists());
    let out = ctl_env(&["status"], &runtime.0);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(text(&out).contains("no running primary"), "{}", text(&out));
}

/// The control socket's and ctl's words for a person: replies named Rust
/// types (`expected usize`, ``missing field `command` ``), a bare empty
/// line got no reply at all, `uptime_seconds` had 16 decimals, and
/// `ctl send` without JSON said `wrong arguments for send: `.
#[test]
fn control_replies_in_plain_words() {
    let dir = TempDir::new("words");
    let sock = dir.join("c.sock");
    let port = free_port();
    let r = start_hello(1, port, &sock, &[]);
    let mut c = Client::connect(&sock);
    for (line, want) in [
        (
            &b"\n"[..],
            "an empty line is not a request; the commands are status, reload, scale N, \
             restart ID, stop, send JSON",
        ),
        (b"  \r\n", "an empty line is not a request"),
        (
            br#"{"command":"scale","workers":-1}
"#,
            "\"workers\" must be a whole number from 1 to 4096. Received -1",
        ),
        (
            br#"{"command":"restart","worker":"x"}
"#,
            "\"worker\" must be a worker id, a whole number (the id of a status row). \
             Received \"x\"",
        ),
        (
            br#"{"workers":2}
"#,
            "a request needs \"command\": status, reload, scale, restart, stop or send",
        ),
        (
            b"scale lots\n",
            "scale takes a worker count, a whole number from 1 to 4096. Received \"lots\"",
        ),
    ] {
        c.send(line);
        let v = c.reply().expect("an error reply");
        assert_eq!(v["ok"], false, "{v}");
        let e = v["error"].as_str().unwrap();
        assert!(e.contains(want), "{:?}: {e}", String::from_utf8_lossy(line));
    }
    // Uptime to the millisecond.
    c.send(b"status\n");
    let v = c.reply().unwrap();
    let up = v["workers"][0]["uptime_seconds"].as_f64().unwrap();
    assert!(up > 0.0, "{v}");
    let decimals = up.to_string().split('.').nth(1).map_or(0, str::len);
    assert!(decimals <= 3, "{v}");
    // ctl send without its JSON.
    let out = ctl(&sock, &["send"]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(
        text(&out).contains(
            r#"uvcluster ctl: ctl send needs a JSON message, e.g. uvcluster ctl send '{"cmd":"flush"}'"#
        ),
        "{}",
        text(&out)
    );
    r.signal(Signal::SIGTERM);
    assert_eq!(r.wait().0, Some(0));
}

/// `ctl reload` said `was not ready within 2000 ms` where the log says
/// `2s`: the reply's durations are the log's.
#[test]
fn a_reload_not_ready_in_time_says_the_duration_as_the_log() {
    util::require_node();
    let dir = TempDir::new("slowreload");
    let sock = dir.join("c.sock");
    let broken = dir.join("broken");
    // New code that never gets ready: it hangs while `broken` exists.
    let app = dir.join("hang_on_file.js");
    std::fs::write(
        &app,
        "const fs = require('fs');\n\
         if (fs.existsSync(process.env.BROKEN)) setInterval(() => {}, 1000);\n\
         else require('http').createServer((q, s) => s.end('hi')).listen(Number(process.env.PORT));\n",
    )
    .unwrap();
    let port = free_port().to_string();
    let mut r = Running::start(
        &[
            "run",
            "-w",
            "1",
            "--ready-timeout",
            "1500ms",
            "--control",
            sock.to_str().unwrap(),
            "--",
            "node",
            app.to_str().unwrap(),
        ],
        &[("PORT", &port), ("BROKEN", broken.to_str().unwrap())],
    );
    r.expect(" ready");
    std::fs::write(&broken, "").unwrap();
    let out = ctl(&sock, &["reload"]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(
        text(&out).contains(
            "uvcluster ctl: reload failed closed: the replacement for slot 0 was not ready \
             within 1s 500ms (0 slot(s) replaced before it); the old workers keep serving"
        ),
        "{}",
        text(&out)
    );
    r.signal(Signal::SIGTERM);
    let (code, log) = r.wait();
    assert_eq!(code, Some(0), "{log}");
    assert!(log.contains("was not ready within 1s 500ms"), "{log}");
}

/// Regression (issue 13): during a graceful stop every request that would
/// change the pool is refused, clearly and alike: `ctl scale`, `ctl
/// reload` and `ctl restart` exit 1 with `refused: the primary is
/// stopping` (not a failed-closed reload, not a `scaling to` that does
/// nothing); SIGHUP, SIGTTIN and SIGTTOU each log a line with the count of
/// workers still running. The slot whose worker is gone is `stopped` in
/// `ctl status`, `--json` and the metrics, not `restarting`.
#[test]
fn requests_during_a_stop_are_refused_and_empty_slots_are_stopped() {
    util::require_node();
    let dir = TempDir::new("stopping");
    let sock = dir.join("c.sock");
    // Worker 1 lingers after its disconnect (a timer keeps it alive), so
    // the stop waits for it; worker 2 exits at once.
    dir.write(
        "app.js",
        "const cluster = require('cluster');\
         require('http').createServer((q, s) => s.end('hi')).listen(process.env.PORT);\
         if (cluster.worker.id === 1) process.on('disconnect', () => setInterval(() => {}, 1000));",
    );
    let app = dir.join("app.js");
    let port = free_port().to_string();
    let mut r = Running::start(
        &[
            "run",
            "-w",
            "2",
            "--kill-timeout",
            "60s",
            "--metrics",
            "127.0.0.1:0",
            "--control",
            sock.to_str().unwrap(),
            "--",
            "node",
            app.to_str().unwrap(),
        ],
        &[("PORT", &port)],
    );
    let line = r.line("metrics on http://");
    let mport: u16 = (line.split("http://").nth(1).unwrap())
        .split('/')
        .next()
        .unwrap()
        .rsplit(':')
        .next()
        .unwrap()
        .parse()
        .unwrap();
    r.expect(" ready");
    r.expect(" ready");
    r.signal(Signal::SIGTERM);
    r.expect("stopping gracefully");
    eventually("worker 2 gone, slot 1 stopped", || {
        let v = status(&sock);
        (v["workers"].as_array().unwrap().iter())
            .any(|w| w["state"] == "stopped" && w["id"].is_null())
    });
    let out = ctl(&sock, &["status"]);
    let t = text(&out);
    assert!(t.contains(" stopped "), "{t}");
    assert!(!t.contains("restarting"), "{t}");
    let (code, body) = get(mport, "/metrics").unwrap();
    assert_eq!(code, 200);
    assert!(
        body.contains("uvcluster_workers{state=\"stopped\"} 1\n"),
        "{body}"
    );
    assert!(
        body.contains("uvcluster_workers{state=\"restarting\"} 0\n"),
        "{body}"
    );

    for args in [&["scale", "4"][..], &["reload"], &["restart", "1"]] {
        let out = ctl(&sock, args);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {}", text(&out));
        assert!(
            text(&out).contains("refused: the primary is stopping"),
            "{args:?}: {}",
            text(&out)
        );
        assert!(!text(&out).contains("failed closed"), "{}", text(&out));
    }
    for (sig, name) in [
        (Signal::SIGHUP, "SIGHUP"),
        (Signal::SIGTTIN, "SIGTTIN"),
        (Signal::SIGTTOU, "SIGTTOU"),
    ] {
        r.signal(sig);
        let line = r.expect(&format!("{name} refused: the primary is stopping"));
        assert!(line.ends_with("; 1 worker still running"), "{line}");
    }
    // Nothing was forked or scaled meanwhile.
    r.signal(Signal::SIGQUIT);
    let (_, log) = r.wait();
    assert_eq!(forks(&log), 2, "{log}");
    assert!(!log.contains("scaled from"), "{log}");
    assert!(!log.contains("reload started"), "{log}");
}
