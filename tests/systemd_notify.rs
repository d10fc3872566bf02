//! systemd readiness notification (`uvcluster::systemd::Notifier`,
//! `sd_notify(3)`), checked against the test's own notify socket: a Unix
//! datagram socket bound here, named to the notifier (or to `uvcluster
//! run` through `NOTIFY_SOCKET`), whose datagrams are read with a
//! deadline.

mod util;

use std::io::{BufRead, BufReader, Read, Write};
use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use util::{assert_loop_empty, run_until};
use uvcluster::systemd::Notifier;
use uvcluster::uv::Loop;

const LIMIT: Duration = Duration::from_secs(20);

/// A directory of this test's own, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> TempDir {
        let d = std::env::temp_dir().join(format!(
            "uvcluster-notify-{tag}-{}-{}",
            std::process::id(),
            Loop::hrtime()
        ));
        std::fs::create_dir_all(&d).unwrap();
        TempDir(d)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The next datagram, as text, or `None` once `within` has passed.
fn next(sock: &UnixDatagram, within: Duration) -> Option<String> {
    sock.set_read_timeout(Some(within)).unwrap();
    let mut buf = [0u8; 4096];
    match sock.recv(&mut buf) {
        Ok(n) => Some(String::from_utf8(buf[..n].to_vec()).unwrap()),
        Err(e)
            if matches!(
                e.kind(),
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
            ) =>
        {
            None
        }
        Err(e) => panic!("recv: {e}"),
    }
}

/// Reads datagrams until one equals `want`, with a deadline; returns the
/// ones before it.
fn until(sock: &UnixDatagram, want: &str) -> Vec<String> {
    let end = Instant::now() + LIMIT;
    let mut before = Vec::new();
    loop {
        let left = end.saturating_duration_since(Instant::now());
        match next(sock, left.max(Duration::from_millis(1))) {
            Some(m) if m == want => return before,
            Some(m) => before.push(m),
            None => panic!("no {want:?} within {LIMIT:?}; got {before:?}"),
        }
    }
}

/// CLOCK_MONOTONIC in µs, as systemd reads it.
fn monotonic_usec() -> u64 {
    let t = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC).unwrap();
    t.tv_sec() as u64 * 1_000_000 + t.tv_nsec() as u64 / 1_000
}

/// Every state, to a socket bound at a path and to an abstract name
/// (`@name`): the exact datagrams `sd_notify` sends, `MONOTONIC_USEC` the
/// monotonic clock at the call; a `STATUS=` with a newline is refused and
/// sends nothing.
#[test]
fn notifier_sends_each_state_to_a_path_and_an_abstract_socket() {
    let dir = TempDir::new("states");
    let path = dir.0.join("notify.sock");
    let abstract_name = format!(
        "uvcluster-test-notify-{}-{}",
        std::process::id(),
        Loop::hrtime()
    );
    let by_path = UnixDatagram::bind(&path).unwrap();
    let by_name =
        UnixDatagram::bind_addr(&SocketAddr::from_abstract_name(abstract_name.as_bytes()).unwrap())
            .unwrap();
    for (sock, name) in [
        (&by_path, path.clone().into_os_string()),
        (&by_name, format!("@{abstract_name}").into()),
    ] {
        let n = Notifier::to_socket(&name).unwrap();
        assert!(n.is_enabled());
        assert_eq!(n.watchdog_interval(), None);
        n.ready().unwrap();
        assert_eq!(next(sock, LIMIT).as_deref(), Some("READY=1\n"));
        let before = monotonic_usec();
        n.reloading().unwrap();
        let after = monotonic_usec();
        let m = next(sock, LIMIT).unwrap();
        let usec: u64 = m
            .strip_prefix("RELOADING=1\nMONOTONIC_USEC=")
            .and_then(|r| r.strip_suffix('\n'))
            .unwrap_or_else(|| panic!("{m:?}"))
            .parse()
            .unwrap();
        assert!(
            (before..=after).contains(&usec),
            "{before} <= {usec} <= {after}"
        );
        n.stopping().unwrap();
        assert_eq!(next(sock, LIMIT).as_deref(), Some("STOPPING=1\n"));
        n.status("2 workers ready").unwrap();
        assert_eq!(
            next(sock, LIMIT).as_deref(),
            Some("STATUS=2 workers ready\n")
        );
        n.clone().watchdog().unwrap();
        assert_eq!(next(sock, LIMIT).as_deref(), Some("WATCHDOG=1\n"));
        let e = n.status("two\nREADY=1").unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::InvalidInput);
        assert_eq!(
            next(sock, Duration::from_millis(50)),
            None,
            "nothing was sent"
        );
    }
    // Nobody bound there: the error comes back, nothing panics.
    let gone = Notifier::to_socket(dir.0.join("nobody.sock")).unwrap();
    assert!(gone.ready().is_err());
}

/// `start_watchdog` arms an unreferenced loop timer that sends
/// `WATCHDOG=1` every half interval (200 ms asked for: a ping every
/// 100 ms, never sooner); it does not keep the loop alive; without a
/// watchdog, no timer.
#[test]
fn watchdog_pings_from_the_loop_at_half_the_interval() {
    let dir = TempDir::new("watchdog");
    let path = dir.0.join("notify.sock");
    let sock = UnixDatagram::bind(&path).unwrap();
    sock.set_nonblocking(true).unwrap();
    let mut lp = Loop::new().unwrap();
    assert_eq!(
        Notifier::to_socket(&path)
            .unwrap()
            .start_watchdog(&mut lp)
            .unwrap(),
        None
    );
    let n = Notifier::to_socket(&path)
        .unwrap()
        .with_watchdog(Duration::from_millis(200));
    assert_eq!(n.watchdog_interval(), Some(Duration::from_millis(200)));
    // Timers count from the loop's cached time: refresh it, so that the
    // pings are measured from when the timer really starts.
    lp.update_time();
    let started = Instant::now();
    let t = n.start_watchdog(&mut lp).unwrap().unwrap();
    assert!(!lp.alive(), "the watchdog timer keeps the loop alive");
    let mut pings = Vec::new();
    run_until(&mut lp, 10_000, |_| {
        let mut buf = [0u8; 64];
        while let Ok(k) = sock.recv(&mut buf) {
            assert_eq!(&buf[..k], b"WATCHDOG=1\n");
            pings.push(started.elapsed());
        }
        pings.len() >= 3
    });
    for (i, at) in pings.iter().enumerate() {
        assert!(
            *at >= Duration::from_millis(100 * (i as u64 + 1)) - Duration::from_millis(2),
            "ping {i} at {at:?}: {pings:?}"
        );
    }
    lp.close(t, |_| {}).unwrap();
    lp.run(uvcluster::uv::RunMode::Default).unwrap();
    assert_loop_empty(&lp);
}

/// The running `uvcluster run`, killed if the test fails first.
struct Cli {
    child: Child,
    stdout: mpsc::Receiver<String>,
    stderr: mpsc::Receiver<String>,
    log: String,
}

impl Drop for Cli {
    fn drop(&mut self) {
        let _ = kill(Pid::from_raw(self.child.id() as i32), Signal::SIGKILL);
        let _ = self.child.wait();
    }
}

fn lines(r: impl Read + Send + 'static) -> mpsc::Receiver<String> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for l in BufReader::new(r).lines() {
            let Ok(l) = l else { break };
            if tx.send(l).is_err() {
                break;
            }
        }
    });
    rx
}

impl Cli {
    /// The first line on `which` (stdout or stderr) that contains `text`.
    fn wait_line(&mut self, stderr: bool, text: &str) -> String {
        let end = Instant::now() + LIMIT;
        loop {
            let rx = if stderr { &self.stderr } else { &self.stdout };
            let left = end.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok(l) => {
                    self.log.push_str(&l);
                    self.log.push('\n');
                    if l.contains(text) {
                        return l;
                    }
                }
                Err(_) => panic!("no line with {text:?} within {LIMIT:?}:\n{}", self.log),
            }
        }
    }
}

/// `uvcluster run` under a notify socket: `READY=1` only once *every*
/// worker listens (worker 2 holds back until told: no `READY=1` while it
/// does), then `STATUS=` with the count; `WATCHDOG=1` as `WATCHDOG_USEC`
/// asks; the workers inherit none of the variables; SIGTERM sends
/// `STOPPING=1` and the stopping status, and the command exits 0.
#[test]
fn uvcluster_run_is_ready_once_every_worker_listens_and_says_stopping() {
    util::require_node();
    let dir = TempDir::new("cli");
    let path = dir.0.join("notify.sock");
    let sock = UnixDatagram::bind(&path).unwrap();
    let mut child = Command::new(util::cli_bin())
        .args(["run", "-w", "2", "-p", "rr", "--", "node"])
        .arg(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/node/systemd_worker.js"
        ))
        .env("PORT", "0")
        .env("HOLD_WORKER", "2")
        .env("NOTIFY_SOCKET", &path)
        .env("WATCHDOG_USEC", "300000")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = lines(child.stdout.take().unwrap());
    let stderr = lines(child.stderr.take().unwrap());
    let mut cli = Cli {
        child,
        stdout,
        stderr,
        log: String::new(),
    };
    let held = cli.wait_line(false, "holding ");
    let held: i32 = held
        .trim()
        .strip_prefix("holding ")
        .unwrap()
        .parse()
        .unwrap();
    // The log says `worker 1 (pid P) forked` first, then where it listens.
    let one = cli.wait_line(true, "listening on");
    assert!(one.contains("worker 1 (pid"), "{one}");
    let port: u16 = one.rsplit(':').next().unwrap().trim().parse().unwrap();
    // Worker 1 listens, worker 2 does not: pings, and no READY=1.
    let mut seen = Vec::new();
    let quiet_until = Instant::now() + Duration::from_millis(500);
    while let Some(m) = next(
        &sock,
        quiet_until
            .saturating_duration_since(Instant::now())
            .max(Duration::from_millis(1)),
    ) {
        assert_ne!(m, "READY=1\n", "READY=1 before worker 2 listens: {seen:?}");
        seen.push(m);
    }
    assert!(
        seen.iter().all(|m| m == "WATCHDOG=1\n") && !seen.is_empty(),
        "{seen:?}"
    );
    kill(Pid::from_raw(held), Signal::SIGUSR2).unwrap();
    let before = until(&sock, "READY=1\n");
    assert!(before.iter().all(|m| m == "WATCHDOG=1\n"), "{before:?}");
    let before = until(&sock, "STATUS=2 workers ready\n");
    assert!(before.iter().all(|m| m == "WATCHDOG=1\n"), "{before:?}");
    cli.wait_line(true, "worker 2 (pid");

    // The workers see none of the variables.
    let mut c = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    c.set_read_timeout(Some(LIMIT)).unwrap();
    c.write_all(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n").unwrap();
    let mut answer = String::new();
    c.read_to_string(&mut answer).unwrap();
    let body = answer.split_once("\r\n\r\n").unwrap().1;
    let v: serde_json::Value = serde_json::from_str(body.trim()).unwrap();
    assert_eq!(v["env"], serde_json::json!({}), "{body}");

    kill(Pid::from_raw(cli.child.id() as i32), Signal::SIGTERM).unwrap();
    let before = until(&sock, "STOPPING=1\n");
    assert!(before.iter().all(|m| m == "WATCHDOG=1\n"), "{before:?}");
    until(&sock, "STATUS=stopping: disconnecting 2 workers\n");
    let end = Instant::now() + LIMIT;
    let status = loop {
        if let Some(s) = cli.child.try_wait().unwrap() {
            break s;
        }
        assert!(Instant::now() < end, "still running:\n{}", cli.log);
        // The exit is near; wait for the next datagram or a short deadline
        // rather than spin.
        next(&sock, Duration::from_millis(20));
    };
    assert!(status.success(), "{status}:\n{}", cli.log);
}
