//! The lab's `multi_host` program, run as a real process: nginx in front
//! of two `uvcluster run` instances with Node workers, a load through
//! nginx across a rolling reload of each instance: zero failed requests.

// The library's test helpers: `cli_bin` and `example` find what `cargo
// test` at the workspace root built.
#[path = "../../tests/util/mod.rs"]
mod util;

use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

/// Bounded: one round (each instance reloaded once), 8 connections; the
/// program's own deadlines end every wait, and this one ends the run.
const LIMIT: Duration = Duration::from_secs(180);

#[test]
fn multi_host_rolling_reload_behind_nginx_fails_no_request() {
    util::require_node();
    let child = Command::new(env!("CARGO_BIN_EXE_multi_host"))
        .args(["1", "8"])
        .env("UVCLUSTER_BIN", util::cli_bin())
        .env("CLUSTER_HELLO", util::example("cluster_hello"))
        .env("APP", "node")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        // Its own process group: on a timeout the whole group (nginx, the
        // instances and their workers) is killed with it.
        .process_group(0)
        .spawn()
        .expect("run multi_host");
    let pid = child.id();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    let out = match rx.recv_timeout(LIMIT) {
        Ok(out) => out.unwrap(),
        Err(_) => {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(-(pid as i32)),
                nix::sys::signal::Signal::SIGKILL,
            );
            panic!("multi_host did not end within {LIMIT:?}");
        }
    };
    let text = String::from_utf8_lossy(&out.stdout);
    let err = String::from_utf8_lossy(&out.stderr);
    if out.status.code() == Some(77) {
        // Loud, never a silent pass: nginx could not be installed.
        eprintln!("\n!!! SKIPPED: nginx is not available (multi_host exit 77) !!!\n{err}");
        return;
    }
    assert!(out.status.success(), "{:?}\n{text}\n{err}", out.status);
    // One row per instance reloaded, each with requests and no failure.
    for inst in ["A", "B"] {
        let row = format!("| round 1 | {inst} | ");
        let line = text
            .lines()
            .find(|l| l.starts_with(&row))
            .unwrap_or_else(|| panic!("no row {row}:\n{text}"));
        let cells: Vec<&str> = line.split('|').map(str::trim).collect();
        assert_ne!(cells[3], "FAILED", "{line}");
        let requests: u64 = cells[4].parse().unwrap();
        let failed: u64 = cells[5].parse().unwrap();
        assert!(requests > 0, "{line}");
        assert_eq!(failed, 0, "{line}");
    }
    let total = text
        .lines()
        .find(|l| l.starts_with("| TOTAL |"))
        .unwrap_or_else(|| panic!("no total:\n{text}"));
    let cells: Vec<&str> = total.split('|').map(str::trim).collect();
    assert_eq!(cells[5], "0", "{total}");
    assert!(
        text.contains(" 0 failed (connect=0 reset=0 timeout=0 status=0 short=0 malformed=0)"),
        "{text}"
    );
}
