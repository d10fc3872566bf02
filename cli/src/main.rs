//! `uvcluster run --workers N --policy rr|none|reuseport|leastconn -- COMMAND [ARGS...]`: runs
//! N copies of any program that speaks Node's cluster protocol (a Node app,
//! or a Rust one built on this crate) under a Rust primary.
//!
//! The environment passes through to the workers (`PORT=8000 uvcluster run
//! ...` works). Workers' listening addresses and exits are logged on stderr. SIGINT or SIGTERM asks every
//! worker to disconnect gracefully; a second one kills them. The command
//! exits once its workers are gone: 0 if all of them exited 0.

use std::cell::Cell;
use std::ffi::OsString;
use std::io;
use std::process::ExitCode;
use std::rc::Rc;
use std::time::Duration;

use uvcluster::cluster::{Primary, SchedulingPolicy, Settings, Worker};
use uvcluster::uv::{Loop, RunMode, Signum};

const USAGE: &str = "usage: uvcluster run [--workers|-w N] [--policy|-p rr|none|reuseport|leastconn] -- COMMAND [ARGS...]";

struct Args {
    workers: usize,
    policy: Option<SchedulingPolicy>,
    command: Vec<OsString>,
}

fn parse(mut args: impl Iterator<Item = OsString>) -> Result<Args, String> {
    match args.next().as_deref().and_then(|s| s.to_str()) {
        Some("run") => {}
        Some("-h" | "--help") | None => return Err(USAGE.into()),
        Some(other) => return Err(format!("unknown subcommand {other:?}\n{USAGE}")),
    }
    let mut out = Args {
        workers: std::thread::available_parallelism().map_or(2, |n| n.get()),
        policy: None,
        command: Vec::new(),
    };
    while let Some(a) = args.next() {
        let a = a
            .to_str()
            .ok_or_else(|| format!("argument {a:?} is not UTF-8"))?
            .to_owned();
        let mut value = |name: &str| {
            args.next()
                .and_then(|v| v.into_string().ok())
                .ok_or_else(|| format!("{name} needs a value\n{USAGE}"))
        };
        match a.as_str() {
            "-w" | "--workers" => {
                let v = value("--workers")?;
                out.workers = v
                    .parse()
                    .ok()
                    .filter(|n| *n > 0 && v.bytes().all(|b| b.is_ascii_digit()))
                    .ok_or_else(|| {
                        format!("--workers takes a whole number above 0. Received {v:?}\n{USAGE}")
                    })?;
            }
            "-p" | "--policy" => {
                let v = value("--policy")?;
                out.policy = Some(parse_policy("--policy", &v)?);
            }
            "--" => {
                out.command = args.collect();
                break;
            }
            other => return Err(format!("unknown option {other:?}\n{USAGE}")),
        }
    }
    if out.command.is_empty() {
        return Err(format!("no command given\n{USAGE}"));
    }
    Ok(out)
}

fn parse_policy(name: &str, v: &str) -> Result<SchedulingPolicy, String> {
    SchedulingPolicy::parse(v)
        .ok_or_else(|| format!("{name} should be rr, none, reuseport or leastconn. Received {v:?}"))
}

/// `NODE_CLUSTER_SCHED_POLICY`, when `--policy` does not override it, must
/// name a policy: Node falls back to round-robin on anything else,
/// silently, which hides a typo.
fn check_policy_env(args: &Args, env: Option<std::ffi::OsString>) -> Result<(), String> {
    match (args.policy, env) {
        (None, Some(v)) => {
            parse_policy("NODE_CLUSTER_SCHED_POLICY", &v.to_string_lossy()).map(|_| ())
        }
        _ => Ok(()),
    }
}

/// `UVCLUSTER_HANDOFF_WINDOW`, when set, must be a window the primary
/// takes (it reads the variable itself, and would only log a bad one).
fn check_window_env(env: Option<std::ffi::OsString>) -> Result<(), String> {
    match env {
        Some(v) => uvcluster::cluster::parse_handoff_window(&v.to_string_lossy())
            .map(|_| ())
            .map_err(|e| e.to_string()),
        None => Ok(()),
    }
}

fn main() -> ExitCode {
    env_logger::init();
    let args = parse(std::env::args_os().skip(1)).and_then(|a| {
        check_policy_env(&a, std::env::var_os("NODE_CLUSTER_SCHED_POLICY"))?;
        check_window_env(std::env::var_os(uvcluster::cluster::HANDOFF_WINDOW_ENV))?;
        Ok(a)
    });
    let args = match args {
        Ok(a) => a,
        Err(msg) => {
            eprintln!("{msg}");
            return ExitCode::from(2);
        }
    };
    match run(args) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("uvcluster: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run(args: Args) -> io::Result<bool> {
    uvcluster::uv::disable_stdio_inheritance();
    let mut lp = Loop::new()?;
    let primary = Primary::new(&mut lp);
    let mut command = args.command.into_iter();
    primary.setup_primary(
        &mut lp,
        Settings {
            exec_path: command.next(),
            args: Some(command.collect()),
            exec_argv: Some(Vec::new()),
            scheduling_policy: args.policy,
            ..Settings::default()
        },
    );
    let all_ok = Rc::new(Cell::new(true));
    let ok = all_ok.clone();
    primary.on_exit(&mut lp, move |lp, w, code, signal| {
        let pid = w.pid(lp).unwrap_or(0);
        match (code, signal) {
            (Some(0), _) => eprintln!("uvcluster: worker {} (pid {pid}) exited", w.id()),
            (Some(c), _) => {
                ok.set(false);
                eprintln!(
                    "uvcluster: worker {} (pid {pid}) exited with code {c}",
                    w.id()
                );
            }
            (None, Some(s)) => {
                ok.set(false);
                eprintln!(
                    "uvcluster: worker {} (pid {pid}) killed by signal {}",
                    w.id(),
                    s.as_raw()
                );
            }
            (None, None) => eprintln!("uvcluster: worker {} (pid {pid}) exited", w.id()),
        }
    });
    primary.on_listening(&mut lp, |lp, w, a| {
        let pid = w.pid(lp).unwrap_or(0);
        let addr = a.address.as_deref().unwrap_or("*");
        match a.port {
            Some(port) if port >= 0 => {
                eprintln!(
                    "uvcluster: worker {} (pid {pid}) listening on {addr}:{port}",
                    w.id()
                )
            }
            _ => eprintln!(
                "uvcluster: worker {} (pid {pid}) listening on {addr}",
                w.id()
            ),
        }
    });
    primary.on_error(&mut lp, |_, w, e| match w {
        Some(w) => eprintln!("uvcluster: worker {}: {e}", w.id()),
        None => eprintln!("uvcluster: {e}"),
    });
    // First SIGINT/SIGTERM: graceful disconnect. Second: kill. A worker
    // being disconnected has already left `primary.workers()` (Node's
    // order), so the kill goes to every forked worker still alive.
    let forked: Rc<std::cell::RefCell<Vec<Worker>>> = Rc::default();
    let stopping = Rc::new(Cell::new(false));
    for signum in [Signum::SIGINT, Signum::SIGTERM] {
        let sig = lp.signal_init();
        let p = primary;
        let stopping = stopping.clone();
        let forked = forked.clone();
        lp.signal_start(sig, signum, move |lp, _, signum| {
            if stopping.replace(true) {
                let alive: Vec<Worker> = (forked.borrow().iter().copied())
                    .filter(|w| !w.is_dead(lp))
                    .collect();
                for w in alive {
                    let _ = w.kill(lp, Some(Signum::SIGKILL));
                }
            } else {
                eprintln!(
                    "uvcluster: signal {}: disconnecting workers",
                    signum.as_raw()
                );
                p.disconnect(lp, |_| {});
                // A graceful stop waits for workers to finish what they
                // hold; it must never wait silently (issue 10).
                let waiting = lp.timer_init();
                let forked = forked.clone();
                let _ = lp.timer_start(
                    waiting,
                    Duration::from_millis(STILL_WAITING_MS),
                    Duration::from_millis(STILL_WAITING_MS),
                    move |lp, _| {
                        let left: Vec<String> = forked
                            .borrow()
                            .iter()
                            .filter(|w| !w.is_dead(lp))
                            .map(|w| format!("{} (pid {})", w.id(), w.pid(lp).unwrap_or(0)))
                            .collect();
                        eprintln!(
                            "uvcluster: still waiting for worker(s) {} to finish; \
                         a second SIGINT/SIGTERM kills them",
                            left.join(", ")
                        );
                    },
                );
                // The reminder must not keep the primary alive by itself.
                let _ = lp.unref_handle(waiting);
            }
        })?;
        // The signals must not keep the primary alive once workers are gone.
        lp.unref_handle(sig)?;
    }
    for _ in 0..args.workers {
        let w = primary.fork(&mut lp, Vec::new())?;
        forked.borrow_mut().push(w);
    }
    lp.run(RunMode::Default)?;
    Ok(all_ok.get())
}

/// How often a graceful stop that is still waiting says for whom (ms).
const STILL_WAITING_MS: u64 = 5_000;

#[cfg(test)]
mod tests {
    use super::*;

    fn p(args: &[&str]) -> Result<Args, String> {
        parse(args.iter().map(OsString::from))
    }

    #[test]
    fn parses_the_documented_forms() {
        let a = p(&["run", "-w", "3", "--policy", "none", "--", "node", "app.js"]).unwrap();
        assert_eq!(a.workers, 3);
        assert_eq!(a.policy, Some(SchedulingPolicy::None));
        assert_eq!(
            a.command,
            vec![OsString::from("node"), OsString::from("app.js")]
        );
        assert!(p(&["run", "--", "x"]).unwrap().workers >= 1);
        for (name, policy) in [
            ("rr", SchedulingPolicy::RoundRobin),
            ("reuseport", SchedulingPolicy::ReusePort),
            ("leastconn", SchedulingPolicy::LeastConnections),
        ] {
            assert_eq!(
                p(&["run", "-p", name, "--", "x"]).unwrap().policy,
                Some(policy)
            );
        }
        assert!(p(&["run", "--policy", "bogus", "--", "x"]).is_err());
        assert!(p(&["run"]).is_err());
        assert!(p(&["walk"]).is_err());
        assert!(p(&[]).is_err());
    }

    /// A bad `--workers` or `--policy` is an error that names the flag and
    /// the value (as Node's `ERR_SOCKET_BAD_PORT` names the port).
    #[test]
    fn bad_flag_values_are_errors_that_name_them() {
        for bad in ["0", "-1", "2.5", "abc", "", "+3", " 2"] {
            let e = p(&["run", "-w", bad, "--", "x"]).err().unwrap();
            assert!(
                e.starts_with(&format!(
                    "--workers takes a whole number above 0. Received {bad:?}"
                )),
                "{e}"
            );
        }
        let e = p(&["run", "--policy", "bogus", "--", "x"]).err().unwrap();
        assert!(
            e.starts_with(
                "--policy should be rr, none, reuseport or leastconn. Received \"bogus\""
            ),
            "{e}"
        );
        let e = p(&["run", "-w"]).err().unwrap();
        assert!(e.starts_with("--workers needs a value"), "{e}");
    }

    /// `NODE_CLUSTER_SCHED_POLICY` must name a policy unless `--policy`
    /// overrides it.
    #[test]
    fn bad_policy_in_the_environment_is_an_error() {
        let a = p(&["run", "--", "x"]).unwrap();
        let e = check_policy_env(&a, Some("robin".into())).unwrap_err();
        assert_eq!(
            e,
            "NODE_CLUSTER_SCHED_POLICY should be rr, none, reuseport or leastconn. Received \"robin\""
        );
        assert!(check_policy_env(&a, Some("none".into())).is_ok());
        assert!(check_policy_env(&a, None).is_ok());
        let a = p(&["run", "-p", "rr", "--", "x"]).unwrap();
        assert!(check_policy_env(&a, Some("robin".into())).is_ok());
    }

    /// `UVCLUSTER_HANDOFF_WINDOW` must be a whole number from 1 to 64.
    #[test]
    fn bad_handoff_window_in_the_environment_is_an_error() {
        let e = check_window_env(Some("0".into())).unwrap_err();
        assert_eq!(
            e,
            "UVCLUSTER_HANDOFF_WINDOW should be a whole number from 1 to 64. Received \"0\""
        );
        assert!(check_window_env(Some("4".into())).is_ok());
        assert!(check_window_env(None).is_ok());
    }
}
