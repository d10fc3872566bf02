//! Test helpers shared by the integration tests (mio's `tests/util`, libuv's
//! `test/task.h`): counters, deadline-driven runs, helper processes by
//! re-executing the test binary, and fd accounting.
#![allow(dead_code)]

use std::cell::Cell;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::rc::Rc;
use std::time::Duration;

use uvcluster::uv::{Loop, RunMode};

/// A shared call counter (libuv's counters, Node's `mustCall`).
#[derive(Clone, Default, Debug)]
pub struct Counter(Rc<Cell<usize>>);

impl Counter {
    pub fn new() -> Self {
        Self::default()
    }
    pub fn hit(&self) {
        self.0.set(self.0.get() + 1)
    }
    pub fn get(&self) -> usize {
        self.0.get()
    }
}

/// A shared log of events, to check orderings.
#[derive(Clone, Default, Debug)]
pub struct Log(Rc<std::cell::RefCell<Vec<String>>>);

impl Log {
    pub fn new() -> Self {
        Self::default()
    }
    pub fn push(&self, s: impl Into<String>) {
        self.0.borrow_mut().push(s.into())
    }
    pub fn take(&self) -> Vec<String> {
        std::mem::take(&mut self.0.borrow_mut())
    }
    pub fn joined(&self) -> String {
        self.0.borrow().join(" ")
    }
}

/// Runs the loop in DEFAULT mode with an unreferenced watchdog timer: if the
/// loop is still running after `limit_ms` the test fails instead of hanging.
/// The watchdog is closed before returning, so the handle count afterwards
/// is the test's own.
pub fn run_with_deadline(lp: &mut Loop, limit_ms: u64) {
    let wd = lp.timer_init();
    lp.timer_start(
        wd,
        Duration::from_millis(limit_ms),
        Duration::ZERO,
        move |_, _| {
            panic!("loop still running after {limit_ms} ms (deadline)");
        },
    )
    .unwrap();
    lp.unref_handle(wd).unwrap();
    lp.run(RunMode::Default).unwrap();
    lp.close(wd, |_| {}).unwrap();
    lp.run(RunMode::Default).unwrap();
}

/// Runs `Once` iterations until `cond` holds, failing after `limit_ms`.
pub fn run_until(lp: &mut Loop, limit_ms: u64, mut cond: impl FnMut(&Loop) -> bool) {
    let wd = lp.timer_init();
    let fired = Counter::new();
    let f = fired.clone();
    lp.timer_start(
        wd,
        Duration::from_millis(limit_ms),
        Duration::ZERO,
        move |_, _| f.hit(),
    )
    .unwrap();
    while !cond(lp) {
        assert_eq!(fired.get(), 0, "condition not met within {limit_ms} ms");
        lp.run(RunMode::Once).unwrap();
    }
    lp.close(wd, |_| {}).unwrap();
    lp.run(RunMode::NoWait).unwrap();
}

/// Asserts the loop has nothing left: no handles, nothing alive.
pub fn assert_loop_empty(lp: &Loop) {
    let mut left = Vec::new();
    lp.walk(|h| left.push(h));
    assert!(left.is_empty(), "handles left open: {left:?}");
    assert!(!lp.alive(), "loop still alive");
}

/// The number of fds this process has open.
pub fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd").unwrap().count() - 1
}

const HELPER_ENV: &str = "UVCLUSTER_TEST_HELPER";

/// Whether this process was started as the helper `name`. A helper is a
/// `#[test]` function that returns at once unless this is true; see
/// [`helper_command`].
pub fn is_helper(name: &str) -> bool {
    std::env::var(HELPER_ENV).is_ok_and(|v| v == name)
}

/// A command that re-runs this test binary as helper `name` (the test
/// function of that name, alone), libuv's `spawn_helper`.
pub fn helper_command(name: &str) -> Command {
    let mut c = Command::new(std::env::current_exe().unwrap());
    c.args([name, "--exact", "--nocapture", "--test-threads=1"])
        .env(HELPER_ENV, name);
    c
}

/// Runs `body` alone in a fresh process (this binary, re-executed), so that
/// process-wide state such as the fd table or rlimits is the test's own.
/// Call it as the whole body of a `#[test]` named `name`.
pub fn isolated(name: &str, body: impl FnOnce()) {
    if is_helper(name) {
        body();
        return;
    }
    let out = helper_command(name).output().unwrap();
    assert!(
        out.status.success(),
        "isolated test {name} failed: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout) + String::from_utf8_lossy(&out.stderr).as_ref()
    );
}

/// Fails the test with instructions if `node` is not installed.
pub fn require_node() {
    let ok = Command::new("node")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    assert!(
        ok,
        "these tests run real `node`, which is not installed: \
         `apt-get install -y nodejs` (or run .ci/run, which installs it)"
    );
}

/// The executable of the root package's example `name`, as the `cargo
/// test` that runs this test built it.
///
/// No test runs `cargo`: Cargo builds every example of the packages it
/// tests before it runs any test, into `<target>/<profile>/examples/` next
/// to the test binaries' `deps/`, and `cargo test` at the root tests every
/// package of the workspace. A narrower run (`cargo test --test NAME`, or
/// `-p` another package) builds no example, so this checks that the binary
/// exists and is not older than any source in its Cargo dep-info file
/// (`<name>.d`), and otherwise fails saying how to build it.
pub fn example(name: &str) -> PathBuf {
    let mut dir = std::env::current_exe().unwrap();
    dir.pop();
    if dir.ends_with("deps") {
        dir.pop();
    }
    let exe = dir.join("examples").join(name);
    let build = format!(
        "run `cargo test` at the workspace root, or `cargo build -p uvcluster --example {name}` \
         (with the same profile) before a narrower `cargo test`"
    );
    let built = std::fs::metadata(&exe)
        .and_then(|m| m.modified())
        .unwrap_or_else(|_| panic!("example {name} is not built ({}): {build}", exe.display()));
    if let Some(newer) = newer_source(&exe.with_extension("d"), built) {
        panic!("example {name} is older than {}: {build}", newer.display());
    }
    exe
}

/// The `uvcluster` binary of the CLI package (`cli/`), as `cargo test` at
/// the workspace root built it beside the test binaries. The library's
/// tests that run `uvcluster run` (its regressions) use it; like
/// [`example`], it fails saying how to build it when it is missing or
/// older than its sources.
pub fn cli_bin() -> PathBuf {
    let mut dir = std::env::current_exe().unwrap();
    dir.pop();
    if dir.ends_with("deps") {
        dir.pop();
    }
    let exe = dir.join("uvcluster");
    let build = "run `cargo test` at the workspace root, or `cargo build -p uvcluster-cli` \
                 (with the same profile) before a narrower `cargo test`";
    let built = std::fs::metadata(&exe)
        .and_then(|m| m.modified())
        .unwrap_or_else(|_| panic!("uvcluster is not built ({}): {build}", exe.display()));
    if let Some(newer) = newer_source(&exe.with_extension("d"), built) {
        panic!("uvcluster is older than {}: {build}", newer.display());
    }
    exe
}

/// The first source listed in the Cargo dep-info file `dep_info` that was
/// modified after `built`, if any (none when the file is missing).
fn newer_source(dep_info: &Path, built: std::time::SystemTime) -> Option<PathBuf> {
    let text = std::fs::read_to_string(dep_info).ok()?;
    let first = text.lines().next()?;
    // `target: src1 src2 ...`, spaces inside a path escaped as `\ `.
    let (_, deps) = first.split_once(": ")?;
    let deps = deps.replace("\\ ", "\0");
    deps.split_whitespace()
        .map(|d| PathBuf::from(d.replace('\0', " ")))
        .find(|d| {
            std::fs::metadata(d)
                .and_then(|m| m.modified())
                .is_ok_and(|m| m > built)
        })
}

/// Copies the child's stderr (which must be piped) to this test's stderr
/// from a thread the test spawns, so that libtest captures it with the
/// test's own output: shown when the test fails, silent when it passes.
/// (A child's inherited stderr bypasses libtest and always shows.)
pub fn forward_stderr(child: &mut std::process::Child) {
    use std::io::BufRead;
    let Some(err) = child.stderr.take() else {
        return;
    };
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(err).lines() {
            let Ok(line) = line else { break };
            eprintln!("{line}");
        }
    });
}

/// Cluster settings that fork this test binary as the helper `name` (the
/// primary's workers run that test alone, and know it by
/// `UVCLUSTER_TEST_HELPER`).
pub fn helper_settings(name: &str) -> uvcluster::cluster::Settings {
    uvcluster::cluster::Settings {
        exec_path: Some(std::env::current_exe().unwrap().into()),
        args: Some(
            [name, "--exact", "--nocapture", "--test-threads=1"]
                .iter()
                .map(Into::into)
                .collect(),
        ),
        env: Some(vec![(HELPER_ENV.into(), name.into())]),
        ..uvcluster::cluster::Settings::default()
    }
}

/// A worker's HTTP server on `port` (through the primary when in a
/// cluster): each connection gets one `hello world` answer once its request
/// head is in, then is closed.
pub fn serve_hello(lp: &mut Loop, port: u16) -> uvcluster::net::Server {
    use uvcluster::net::{ListenOptions, Server};
    use uvcluster::uv::Stream;
    let server = Server::new(lp, |lp, server, conn| {
        let Stream::Tcp(t) = conn else {
            return server.close_connection(lp, conn);
        };
        let mut req = Vec::new();
        lp.read_start(t, move |lp, t, r| match r {
            Ok(d) if !d.is_empty() => {
                req.extend_from_slice(d);
                if req.windows(4).any(|w| w == b"\r\n\r\n") {
                    lp.read_stop(t).unwrap();
                    lp.write(
                        t,
                        &[b"HTTP/1.1 200 OK\r\nContent-Length: 12\r\nConnection: close\r\n\r\nhello world\n"],
                        move |lp, t, _| server.close_connection(lp, Stream::Tcp(t)),
                    )
                    .unwrap();
                }
            }
            _ => server.close_connection(lp, Stream::Tcp(t)),
        })
        .unwrap();
    });
    server
        .listen(lp, ListenOptions::port(port), |_, _, r| {
            r.unwrap();
        })
        .unwrap();
    server
}

/// A free TCP port on 127.0.0.1 (bound to 0, then released), for a
/// program that takes its port from its environment and does not report
/// the one it got (`cluster_hello` prints only `ready`).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("bind 127.0.0.1:0")
        .port()
}
