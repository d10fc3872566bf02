//! `uvcluster run`'s surface, on the real binary: `--help` and
//! `--version`, the exit status of each way it ends, every bad flag,
//! variable and file value (exit 2, naming it, the value and the valid
//! values), the configuration file and its precedence, a missing program,
//! the log lines' format, and `--prefix-output`.

// The library's test helpers (this package's tests run the library's
// examples and Node scripts).
#[path = "../../tests/util/mod.rs"]
mod util;

mod ops_util;

use std::path::PathBuf;
use std::process::Command;

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use ops_util::{Running, crash_loop, errored_line, finish, forks, free_port, uvcluster};

/// A scratch directory of this test process (left for a failed test to
/// be looked at; its name says which).
fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("uvcluster-cli-{}-{name}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Every option `run --help` must list.
const FLAGS: &[&str] = &[
    "--workers",
    "--policy",
    "--restart",
    "--wait-ready",
    "--ready-timeout",
    "--kill-timeout",
    "--reload-batch",
    "--worker-timeout",
    "--max-memory",
    "--memory-check-interval",
    "--max-connections",
    "--max-connections-jitter",
    "--backoff-initial",
    "--backoff-cap",
    "--stable-period",
    "--max-restarts",
    "--restart-window",
    "--fail-before-ready",
    "--handoff-window",
    "--prefix-output",
    "--config",
    "--help",
    "--version",
];

/// `--help` (also `-h`, `run --help`, `run ... -h`) and `--version` print
/// on stdout and exit 0, with nothing on stderr; `run --help` lists every
/// option, its default and its variable.
#[test]
fn help_and_version_go_to_stdout_with_exit_0() {
    for args in [
        &["--help"][..],
        &["-h"][..],
        &["run", "--help"][..],
        &["run", "-w", "2", "-h"][..],
        &["--version"][..],
        &["-V"][..],
    ] {
        let mut c = uvcluster();
        c.args(args);
        let (code, out, err) = finish(c);
        assert_eq!(code, Some(0), "{args:?}: {err}");
        assert_eq!(err, "", "{args:?}");
        if args.contains(&"--version") || args.contains(&"-V") {
            assert_eq!(out, format!("uvcluster {}\n", env!("CARGO_PKG_VERSION")));
        } else {
            assert!(
                out.contains("usage: uvcluster run [OPTIONS] -- COMMAND [ARGS...]"),
                "{out}"
            );
        }
    }
    let mut c = uvcluster();
    c.args(["run", "--help"]);
    let (_, out, _) = finish(c);
    for flag in FLAGS {
        assert!(out.contains(flag), "run --help lacks {flag}:\n{out}");
    }
    for env in [
        "WEB_CONCURRENCY",
        "NODE_CLUSTER_SCHED_POLICY",
        "UVCLUSTER_HANDOFF_WINDOW",
        "rr, none, reuseport or leastconn",
        "always, on-failure or never",
        "[default: 30s]",
    ] {
        assert!(out.contains(env), "run --help lacks {env}:\n{out}");
    }
}

/// Every bad flag, variable or file value exits 2 with one message that
/// names where it came from, the value, and what is valid, then the usage.
#[test]
fn bad_values_exit_2_naming_the_flag_the_value_and_the_valid_values() {
    type Case<'a> = (&'a [&'a str], &'a [(&'a str, &'a str)], &'a str);
    let cases: &[Case] = &[
        (&[], &[], "no subcommand given (run or ctl)"),
        (
            &["walk"],
            &[],
            "unknown subcommand \"walk\"; the subcommands are run and ctl",
        ),
        (&["run"], &[], "no command given"),
        (&["run", "--frob", "--", "x"], &[], "unknown option --frob"),
        (&["run", "-w"], &[], "--workers needs a value"),
        (
            &["run", "-w", "0", "--", "x"],
            &[],
            "--workers takes a whole number above 0. Received \"0\"",
        ),
        (
            &["run", "--policy=bogus", "--", "x"],
            &[],
            "--policy should be rr, none, reuseport or leastconn. Received \"bogus\"",
        ),
        (
            &["run", "--restart", "sometimes", "--", "x"],
            &[],
            "--restart should be always, on-failure or never. Received \"sometimes\"",
        ),
        (
            &["run", "--kill-timeout", "30", "--", "x"],
            &[],
            "--kill-timeout should be a duration with its unit, such as 500ms, 30s or 2m. Received \"30\"",
        ),
        (
            &["run", "--ready-timeout=soon", "--", "x"],
            &[],
            "--ready-timeout should be a duration with its unit, such as 500ms, 30s or 2m. Received \"soon\"",
        ),
        (
            &["run", "--worker-timeout", "never", "--", "x"],
            &[],
            "--worker-timeout should be a duration with its unit, such as 500ms, 30s or 2m, or off. Received \"never\"",
        ),
        (
            &["run", "--max-memory", "1.5G", "--", "x"],
            &[],
            "--max-memory should be a size such as 512M or 1G (units K, M, G, T: powers of 1024), or off. Received \"1.5G\"",
        ),
        (
            &["run", "--max-connections", "-5", "--", "x"],
            &[],
            "--max-connections takes a whole number above 0, or off. Received \"-5\"",
        ),
        (
            &["run", "--reload-batch", "0", "--", "x"],
            &[],
            "--reload-batch takes a whole number above 0. Received \"0\"",
        ),
        (
            &["run", "--handoff-window", "65", "--", "x"],
            &[],
            "--handoff-window should be a whole number from 1 to 64. Received \"65\"",
        ),
        (
            &["run", "--wait-ready=maybe", "--", "x"],
            &[],
            "--wait-ready should be true or false. Received \"maybe\"",
        ),
        (
            &[
                "run",
                "--backoff-initial",
                "5s",
                "--backoff-cap",
                "1s",
                "--",
                "x",
            ],
            &[],
            "--backoff-cap should be at least --backoff-initial (5s). Received 1s",
        ),
        (
            &["run", "--", "x"],
            &[("NODE_CLUSTER_SCHED_POLICY", "robin")],
            "NODE_CLUSTER_SCHED_POLICY should be rr, none, reuseport or leastconn. Received \"robin\"",
        ),
        (
            &["run", "--", "x"],
            &[("UVCLUSTER_HANDOFF_WINDOW", "0")],
            "UVCLUSTER_HANDOFF_WINDOW should be a whole number from 1 to 64. Received \"0\"",
        ),
        (
            &["run", "--", "x"],
            &[("WEB_CONCURRENCY", "many")],
            "WEB_CONCURRENCY takes a whole number above 0. Received \"many\"",
        ),
    ];
    // The cases run where no `uvcluster.toml` is.
    let dir = scratch("bad-values");
    for (args, envs, want) in cases {
        let mut c = uvcluster();
        c.args(*args).current_dir(&dir);
        for (k, v) in *envs {
            c.env(k, v);
        }
        let (code, out, err) = finish(c);
        assert_eq!(code, Some(2), "{args:?} {envs:?}: {err}");
        assert_eq!(out, "", "{args:?}");
        assert_eq!(
            err,
            format!(
                "uvcluster: {want}\nusage: uvcluster run [OPTIONS] -- COMMAND [ARGS...]\n\
                 (uvcluster run --help lists the options)\n"
            ),
            "{args:?} {envs:?}"
        );
    }
    // A flag overrides a bad variable, which is then not read.
    let mut c = uvcluster();
    c.args(["run", "--policy", "rr", "--", "/nonexistent/program"])
        .env("NODE_CLUSTER_SCHED_POLICY", "robin");
    let (code, _, err) = finish(c);
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("spawn /nonexistent/program ENOENT"), "{err}");
}

/// A key the file does not know is an error that names it, the file, and
/// the keys; so is a bad value in it; exit 2, nothing started.
#[test]
fn config_file_unknown_key_or_bad_value_exits_2_naming_key_and_file() {
    let dir = scratch("unknown-key");
    let file = dir.join("uvcluster.toml");
    for (text, want) in [
        (
            "workers = 2\nwrokers = 3\n",
            format!(
                "unknown key \"wrokers\" in {}; the keys are workers, policy, restart,",
                file.display()
            ),
        ),
        (
            "kill-timeout = 30\n",
            format!(
                "kill-timeout in {} should be a duration with its unit, such as 500ms, 30s or 2m. \
                 Received \"30\"",
                file.display()
            ),
        ),
        (
            "policy = \"robin\"\n",
            format!(
                "policy in {} should be rr, none, reuseport or leastconn. Received \"robin\"",
                file.display()
            ),
        ),
        (
            "workers = [\n",
            format!("{} is not valid TOML", file.display()),
        ),
    ] {
        std::fs::write(&file, text).unwrap();
        let mut c = uvcluster();
        c.args(["run", "--config"]).arg(&file).args(["--", "x"]);
        let (code, _, err) = finish(c);
        assert_eq!(code, Some(2), "{text}: {err}");
        assert!(
            err.starts_with(&format!("uvcluster: {want}")),
            "{text}: {err}"
        );
        assert!(err.contains("usage: uvcluster run"), "{err}");
        // The same file found as ./uvcluster.toml.
        let mut c = uvcluster();
        c.args(["run", "--", "x"]).current_dir(&dir);
        let (code, _, err) = finish(c);
        assert_eq!(code, Some(2), "{text}: {err}");
        assert!(err.contains(" uvcluster.toml"), "{text}: {err}");
    }
    let mut c = uvcluster();
    c.args(["run", "--config", "/nonexistent/u.toml", "--", "x"]);
    let (code, _, err) = finish(c);
    assert_eq!(code, Some(2), "{err}");
    assert!(
        err.starts_with("uvcluster: cannot read the configuration file /nonexistent/u.toml: "),
        "{err}"
    );
}

/// Runs `cluster_hello` under `uvcluster` as `c` says, waits for `workers`
/// to listen, stops it with SIGTERM; returns the log.
fn serve_and_stop(mut c: Command, workers: usize) -> String {
    let exe = util::example("cluster_hello");
    c.arg("--").arg(&exe).env("PORT", free_port().to_string());
    let mut r = Running::spawn(c);
    for _ in 0..workers {
        r.expect(" listening on ");
    }
    r.signal(Signal::SIGTERM);
    let (code, log) = r.wait();
    assert_eq!(code, Some(0), "{log}");
    log
}

/// The file's options apply, a flag overrides the file, and the file
/// overrides the environment; `./uvcluster.toml` is read when `--config`
/// is not given, with the command from the file.
#[test]
fn config_file_applies_and_flags_override_it() {
    let dir = scratch("precedence");
    let file = dir.join("pool.toml");
    std::fs::write(&file, "workers = 3\nkill-timeout = \"5s\"\n").unwrap();

    // The file's 3 workers, over WEB_CONCURRENCY's 1.
    let mut c = uvcluster();
    c.args(["run", "--config"])
        .arg(&file)
        .env("WEB_CONCURRENCY", "1");
    let log = serve_and_stop(c, 3);
    assert_eq!(forks(&log), 3, "{log}");
    // The graceful stop announces the file's kill timeout.
    assert!(log.contains("(killed after 5s;"), "{log}");

    // A flag over the file.
    let mut c = uvcluster();
    c.args(["run", "-w", "2", "--kill-timeout=2m", "--config"])
        .arg(&file);
    let log = serve_and_stop(c, 2);
    assert_eq!(forks(&log), 2, "{log}");
    assert!(log.contains("(killed after 2m;"), "{log}");

    // The environment where neither says anything.
    std::fs::write(&file, "kill-timeout = \"5s\"\n").unwrap();
    let mut c = uvcluster();
    c.args(["run", "--config"])
        .arg(&file)
        .env("WEB_CONCURRENCY", "1");
    let log = serve_and_stop(c, 1);
    assert_eq!(forks(&log), 1, "{log}");

    // ./uvcluster.toml, with its command.
    let exe = util::example("cluster_hello");
    std::fs::write(
        dir.join("uvcluster.toml"),
        format!("workers = 2\ncommand = [{:?}]\n", exe.display().to_string()),
    )
    .unwrap();
    let mut c = uvcluster();
    c.arg("run")
        .current_dir(&dir)
        .env("PORT", free_port().to_string());
    let mut r = Running::spawn(c);
    r.expect(" listening on ");
    r.expect(" listening on ");
    r.signal(Signal::SIGTERM);
    let (code, log) = r.wait();
    assert_eq!(code, Some(0), "{log}");
    assert_eq!(forks(&log), 2, "{log}");
}

/// A program that is not there, or cannot be executed, is named in the
/// error, printed whatever `RUST_LOG` says; exit 1 (a start failure), no
/// worker forked.
#[test]
fn missing_program_is_named_exit_1() {
    let dir = scratch("missing");
    // A file without any execute bit (which even root cannot execute).
    let plain = dir.join("app.js");
    std::fs::write(&plain, "0").unwrap();
    let plain = plain.display().to_string();
    for (program, errno, what) in [
        (
            "no-such-program-uvcluster",
            "ENOENT (No such file or directory)",
            "no such program in PATH",
        ),
        (
            "/nonexistent/app",
            "ENOENT (No such file or directory)",
            "no such file",
        ),
        (
            plain.as_str(),
            "EACCES (Permission denied)",
            "not executable",
        ),
    ] {
        let mut c = uvcluster();
        c.args(["run", "-w", "2", "--", program])
            .current_dir(&dir)
            .env("RUST_LOG", "off");
        let (got, out, err) = finish(c);
        assert_eq!(got, Some(1), "{program}: {err}");
        assert_eq!(out, "");
        assert_eq!(
            err,
            format!("uvcluster: spawn {program} {errno}: {program:?} {what}\n"),
            "{program}"
        );
    }
}

/// The message of `line` if it is `<RFC 3339 time> <LEVEL> uvcluster:
/// <message>`.
fn log_line<'a>(line: &'a str, level: &str) -> Option<&'a str> {
    let (time, rest) = line.split_once(' ')?;
    let ok_time = time.len() == "2026-01-01T00:00:00.000Z".len()
        && time.ends_with('Z')
        && time.as_bytes()[10] == b'T';
    let rest = rest.strip_prefix(&format!("{level:<5} uvcluster: "))?;
    ok_time.then_some(rest)
}

/// `RUST_LOG=info`: one line per fork and per exit, `worker ID (pid PID)
/// ...`, with the exit code or the signal's number and name, warnings for
/// unasked failures, nothing in Rust's debug spelling; under systemd
/// (`JOURNAL_STREAM`) the journal's `<priority>` prefix instead of a
/// timestamp; `RUST_LOG=error` hides them.
#[test]
fn log_lines_for_fork_and_exit() {
    util::require_node();
    let script = "process.exit(Number(process.env.NODE_UNIQUE_ID) === 1 ? 3 : 0)";
    let mut c = uvcluster();
    c.args([
        "run",
        "-w",
        "2",
        "--restart",
        "never",
        "--",
        "node",
        "-e",
        script,
    ]);
    let (code, out, err) = finish(c);
    assert_eq!(code, Some(1), "a worker failed: {err}");
    assert_eq!(out, "");
    let mut forked = 0;
    let mut exited = Vec::new();
    for line in err.lines() {
        if let Some(m) = log_line(line, "INFO") {
            if m.starts_with("starting ") {
                assert_eq!(
                    m,
                    format!(
                        "starting 2 worker(s) of `node -e {script}` \
                         (policy rr, restart never, kill timeout 30s)"
                    )
                );
                continue;
            }
            // Where `uvcluster ctl` finds this primary (docs/control.md).
            if m.starts_with("control socket /") {
                continue;
            }
            let (who, what) = m.split_once(") ").unwrap_or_else(|| panic!("{line}"));
            let (w, pid) = who.split_once(" (pid ").unwrap_or_else(|| panic!("{line}"));
            assert!(w == "worker 1" || w == "worker 2", "{line}");
            assert!(pid.parse::<u32>().is_ok(), "{line}");
            match what {
                "forked" => forked += 1,
                "exited" => exited.push((w.to_string(), 0)),
                _ => panic!("unexpected INFO line {line}"),
            }
        } else if let Some(m) = log_line(line, "WARN") {
            assert!(m.starts_with("worker 1 (pid "), "{line}");
            assert!(m.ends_with(") exited with code 3"), "{line}");
            exited.push(("worker 1".into(), 3));
        } else if line.contains(" uvcluster::supervisor::") {
            // The supervisor's own records (their module path as target):
            // the CLI's vocabulary is the `uvcluster:` lines above.
            continue;
        } else {
            panic!("a line not in the log format: {line:?}\n{err}");
        }
    }
    assert_eq!(forked, 2, "{err}");
    exited.sort();
    assert_eq!(
        exited,
        [("worker 1".to_string(), 3), ("worker 2".to_string(), 0)],
        "{err}"
    );
    assert!(!err.contains("Some("), "{err}");

    // Killed by a signal: its number and name.
    let mut c = uvcluster();
    c.args(["run", "-w", "1", "--restart", "never", "--", "node", "-e"])
        .arg("process.kill(process.pid, 'SIGTERM')");
    let (code, _, err) = finish(c);
    assert_eq!(code, Some(1), "{err}");
    assert!(
        err.lines()
            .filter_map(|l| log_line(l, "WARN"))
            .any(|m| m.starts_with("worker 1 (pid ")
                && m.ends_with(") killed by signal 15 (SIGTERM)")),
        "{err}"
    );

    // Under systemd: `<6>worker 1 (pid N) forked`.
    let mut c = uvcluster();
    c.args([
        "run",
        "-w",
        "1",
        "--restart",
        "never",
        "--",
        "node",
        "-e",
        "0",
    ])
    .env("JOURNAL_STREAM", "8:1234");
    let (code, _, err) = finish(c);
    assert_eq!(code, Some(0), "{err}");
    let lines: Vec<&str> = err
        .lines()
        .filter(|l| !l.starts_with("<6>control socket /"))
        .collect();
    assert_eq!(lines.len(), 3, "{err}");
    assert!(
        lines[0].starts_with("<6>starting 1 worker(s) of `node -e 0` "),
        "{err}"
    );
    assert!(
        lines[1].starts_with("<6>worker 1 (pid ") && lines[1].ends_with(") forked"),
        "{err}"
    );
    assert!(
        lines[2].starts_with("<6>worker 1 (pid ") && lines[2].ends_with(") exited"),
        "{err}"
    );

    // RUST_LOG=error: only errors.
    let mut c = uvcluster();
    c.args([
        "run",
        "-w",
        "1",
        "--restart",
        "never",
        "--",
        "node",
        "-e",
        "process.exit(3)",
    ])
    .env("RUST_LOG", "error");
    let (code, _, err) = finish(c);
    assert_eq!(code, Some(1), "{err}");
    assert_eq!(err, "");
}

/// `--prefix-output`: each line a worker writes on stdout or stderr comes
/// out on ours whole, prefixed with `[worker ID] `, a last line without a
/// newline included; without it the output passes through untouched.
#[test]
fn prefix_output_prefixes_each_worker_line_with_its_id() {
    util::require_node();
    let script = "const id = process.env.NODE_UNIQUE_ID;\
                  process.stdout.write(`one ${id}\\ntwo ${id}\\n`);\
                  process.stderr.write(`err ${id}`);";
    let mut c = uvcluster();
    c.args([
        "run",
        "-w",
        "2",
        "--restart",
        "never",
        "--prefix-output",
        "--",
        "node",
        "-e",
        script,
    ]);
    let (code, out, err) = finish(c);
    assert_eq!(code, Some(0), "{err}");
    for id in [1, 2] {
        let mine: Vec<&str> = out
            .lines()
            .filter(|l| l.starts_with(&format!("[worker {id}] ")))
            .collect();
        assert_eq!(
            mine,
            [
                format!("[worker {id}] one {id}"),
                format!("[worker {id}] two {id}")
            ],
            "{out}"
        );
        assert!(
            err.contains(&format!("\n[worker {id}] err {id}\n"))
                || err.starts_with(&format!("[worker {id}] err {id}\n")),
            "{err}"
        );
    }
    assert_eq!(out.lines().count(), 4, "{out}");

    let mut c = uvcluster();
    c.args([
        "run",
        "-w",
        "1",
        "--restart",
        "never",
        "--",
        "node",
        "-e",
        script,
    ]);
    let (code, out, err) = finish(c);
    assert_eq!(code, Some(0), "{err}");
    assert_eq!(out, "one 1\ntwo 1\n");
    assert!(err.contains("err 1"), "{err}");
    assert!(!err.contains("[worker"), "{err}");
}

/// SIGQUIT stops at once: every worker is killed and the exit status is
/// 128 + 3, as a shell reports a process killed by SIGQUIT (gunicorn's
/// quick shutdown; nginx's SIGQUIT is graceful: docs/cli.md compares them).
#[test]
fn sigquit_stops_at_once_with_128_plus_3() {
    let exe = util::example("cluster_hello");
    let mut c = uvcluster();
    c.args(["run", "-w", "2", "--"])
        .arg(&exe)
        .env("PORT", free_port().to_string());
    let mut r = Running::spawn(c);
    r.expect(" listening on ");
    r.expect(" listening on ");
    r.signal(Signal::SIGQUIT);
    let (code, log) = r.wait();
    assert_eq!(code, Some(131), "{log}");
    assert!(log.contains("signal SIGQUIT: stopping at once"), "{log}");
    assert_eq!(
        log.matches(") killed by signal 9 (SIGKILL)").count(),
        2,
        "{log}"
    );
}

/// The pid in a log line `... worker ID (pid PID) ...`.
fn pid_in(line: &str) -> i32 {
    let rest = line.split_once("(pid ").unwrap().1;
    rest.split_once(')').unwrap().0.parse().unwrap()
}

/// The supervisor's lifecycle through the CLI, one log line each: a worker
/// SIGKILLed from outside is an unasked exit (a warning naming the signal),
/// its slot restarts at once, its first restart (`restarting at once`);
/// SIGHUP rolls the pool (`reload started`, each old worker `draining`
/// after its replacement is `ready`, `reload finished`); SIGTTIN and SIGTTOU
/// scale; SIGTERM stops with exit 0.
#[test]
fn restart_reload_and_scale_each_log_one_line() {
    let exe = util::example("cluster_hello");
    let mut c = uvcluster();
    c.args(["run", "-w", "2", "--"])
        .arg(&exe)
        .env("PORT", free_port().to_string());
    let mut r = Running::spawn(c);
    r.expect(") ready (after ");
    let victim = pid_in(&r.expect(") ready (after "));
    kill(Pid::from_raw(victim), Signal::SIGKILL).unwrap();
    let line = r.expect(&format!("(pid {victim}) "));
    assert!(line.ends_with(") killed by signal 9 (SIGKILL)"), "{line}");
    assert!(line.contains(" WARN  uvcluster: worker "), "{line}");
    let line = r.expect(" restarting ");
    assert!(line.ends_with(" restarting at once"), "{line}");
    r.expect(") forked");
    r.expect(") ready (after ");

    r.signal(Signal::SIGHUP);
    r.expect("reload started (2 workers)");
    for _ in 0..2 {
        r.expect(") ready (after ");
        r.expect(") draining");
    }
    let line = r.expect("reload finished (");
    assert!(
        line.contains("reload finished (2 workers replaced in "),
        "{line}"
    );

    r.signal(Signal::SIGTTIN);
    r.expect("scaled from 2 to 3 workers");
    r.expect(") ready (after ");
    r.signal(Signal::SIGTTOU);
    r.expect("scaled from 3 to 2 workers");

    r.signal(Signal::SIGTERM);
    let (code, log) = r.wait();
    assert_eq!(code, Some(0), "{log}");
    // Drained: 2 by the reload, 1 by the scale-down, 2 by the stop.
    assert_eq!(log.matches(") draining\n").count(), 5, "{log}");
    assert!(!log.contains("Some("), "{log}");
}

/// A worker that fails at once is restarted with growing delays until its
/// slot's budget is spent, then `errored` (an error line with how its last
/// worker ended); with no worker left the command exits 1 by itself.
#[test]
fn crash_loop_errors_the_slot_and_exits_1() {
    util::require_node();
    let (code, out, err) = crash_loop(2, &[], &["node", "-e", "process.exit(7)"], &[]);
    assert_eq!(code, Some(1), "{err}");
    assert_eq!(out, "");
    assert!(err.contains(" restarting in 10ms"), "{err}");
    let errored = errored_line(&err);
    assert!(
        errored.contains(" ERROR uvcluster: slot 0 errored: "),
        "{errored}"
    );
    assert!(
        errored.ends_with("; its last worker exited with code 7; not restarted"),
        "{errored}"
    );
    // The budget bounds the forks: the first start and 2 restarts at most.
    assert!(forks(&err) <= 3, "{err}");
    assert!(!err.contains("Some("), "{err}");

    // With --prefix-output the CLI sees the workers' stderr, and the
    // errored line quotes its last lines (an earlier worker's at least:
    // the last one's may still be in its pipe when its exit is seen).
    let (code, _, err) = crash_loop(
        2,
        &["--prefix-output"],
        &[
            "node",
            "-e",
            "console.error('boom: no config'); process.exit(7)",
        ],
        &[],
    );
    assert_eq!(code, Some(1), "{err}");
    let errored = errored_line(&err);
    assert!(
        errored.contains("; not restarted; its last output: boom: no config"),
        "{errored}"
    );
    assert!(err.contains("\n[worker 1] boom: no config\n"), "{err}");
}

/// A Node worker that throws at startup: the errored line quoted five
/// stack frames, a blank and Node's version, and cut off the
/// `Error: startup failure xyz` line itself. It now quotes that line and
/// the last one (Node's version), and no stack frame.
#[test]
fn errored_line_quotes_the_error_of_a_node_startup_exception() {
    util::require_node();
    let dir = ops_util::TempDir::new("crash-start");
    let script = dir.0.join("crash_start.js");
    std::fs::write(&script, "throw new Error('startup failure xyz');\n").unwrap();
    let (code, _, err) = crash_loop(1, &[], &["node", script.to_str().unwrap()], &[]);
    assert_eq!(code, Some(1), "{err}");
    let errored = errored_line(&err);
    let quoted = errored
        .split_once("; its last output: ")
        .unwrap_or_else(|| panic!("no output quoted: {errored}"))
        .1;
    assert!(
        quoted.starts_with("Error: startup failure xyz | Node.js v"),
        "{errored}"
    );
    assert!(!quoted.contains(" at "), "no stack frame: {errored}");
}

/// A Node worker whose listen fails (its port taken, policy `none` so the
/// worker binds): the errored line quoted Node's `Emitted 'error' event
/// on Server instance at: | Node.js v20...`, not the cause above it. It
/// now quotes the `Error: bind EADDRINUSE ...` line.
#[test]
fn errored_line_quotes_the_cause_of_a_node_listen_failure() {
    util::require_node();
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port().to_string();
    let dir = ops_util::TempDir::new("listen-taken");
    let script = dir.0.join("app.js");
    std::fs::write(
        &script,
        "require('http').createServer((q, r) => r.end('hi'))\n\
         .listen(process.env.PORT, '127.0.0.1');\n",
    )
    .unwrap();
    let (code, _, err) = crash_loop(
        1,
        &["-p", "none"],
        &["node", script.to_str().unwrap()],
        &[("PORT", &port)],
    );
    assert_eq!(code, Some(1), "{err}");
    let errored = errored_line(&err);
    let quoted = errored
        .split_once("; its last output: ")
        .unwrap_or_else(|| panic!("no output quoted: {errored}"))
        .1;
    // Under `none` a cluster worker's listen is the primary's bind, as in
    // Node (`Error: bind EADDRINUSE 127.0.0.1:PORT`, real node's text).
    assert!(
        quoted.starts_with(&format!(
            "Error: bind EADDRINUSE 127.0.0.1:{port} | Node.js v"
        )),
        "{errored}"
    );
    assert!(!quoted.contains("Emitted 'error' event"), "{errored}");
    drop(taken);
}

/// A Rust-style panic (its message on the line after `panicked at`):
/// the errored line quotes the panic, its message and the last line.
#[test]
fn errored_line_quotes_a_rust_panic() {
    let (code, _, err) = crash_loop(
        1,
        &[],
        &[
            "sh",
            "-c",
            "printf '%s\\n' 'loading config' \"thread 'main' panicked at src/main.rs:2:5:\" \
             'startup failure xyz' \
             'note: run with `RUST_BACKTRACE=1` environment variable to display a backtrace' >&2; \
             exit 101",
        ],
        &[],
    );
    assert_eq!(code, Some(1), "{err}");
    let errored = errored_line(&err);
    assert!(
        errored.ends_with(
            "; its last output: thread 'main' panicked at src/main.rs:2:5: | \
             startup failure xyz | note: run with `RUST_BACKTRACE=1` environment variable \
             to display a backtrace"
        ),
        "{errored}"
    );
}

/// `uvcluster frob` said "the command is run", leaving `ctl` out: the
/// message lists both subcommands.
#[test]
fn unknown_subcommand_lists_run_and_ctl() {
    let mut c = uvcluster();
    c.arg("frob");
    let (code, out, err) = finish(c);
    assert_eq!(code, Some(2), "{err}");
    assert_eq!(out, "");
    assert!(
        err.starts_with(
            "uvcluster: unknown subcommand \"frob\"; the subcommands are run and ctl\n"
        ),
        "{err}"
    );
}

/// `uvcluster ctl --bogus` said "unknown option invalid option '--bogus'":
/// it names the option once, then how to get help and the usage line.
#[test]
fn ctl_unknown_option_is_named_once_with_a_usage_hint() {
    let mut c = uvcluster();
    c.args(["ctl", "--bogus", "status"]);
    let (code, out, err) = finish(c);
    assert_eq!(code, Some(2), "{err}");
    assert_eq!(out, "");
    assert!(
        err.starts_with(
            "uvcluster ctl: unknown option '--bogus' (uvcluster ctl --help lists the options)\n\
             usage: uvcluster ctl "
        ),
        "{err}"
    );
    assert!(!err.contains("invalid option"), "{err}");
}

/// `--control` on a path whose directory does not exist: `run` said only
/// "control socket: No such file or directory"; both `run` and `ctl` name
/// the path and the OS error.
#[test]
fn control_path_in_a_missing_directory_is_named_with_the_os_error() {
    let path = "/nonexistent/dir/x.sock";
    let mut c = uvcluster();
    c.args(["run", "--control", path, "--", "node", "-e", "0"]);
    let (code, _, err) = finish(c);
    assert_eq!(code, Some(1), "{err}");
    assert!(
        err.contains(&format!(
            "uvcluster: cannot start: control socket: {path}: No such file or directory (os error 2)"
        )),
        "{err}"
    );
    assert!(!err.contains(" forked"), "{err}");

    let mut c = uvcluster();
    c.args(["ctl", "--control", path, "status"]);
    let (code, _, err) = finish(c);
    assert_eq!(code, Some(1), "{err}");
    assert!(
        err.contains(&format!(
            "uvcluster ctl: cannot reach the primary at {path}: No such file or directory (os error 2)"
        )),
        "{err}"
    );
}

/// The `errored` line quoted the workers' last stderr lines only with
/// `--prefix-output` (the only case where stderr was piped). Now stderr is
/// always piped and teed: the line quotes a worker that writes to stderr
/// and exits at once, and the terminal still shows what it wrote, as it
/// wrote it (no prefix).
#[test]
fn errored_line_quotes_worker_stderr_without_prefix_output() {
    util::require_node();
    let script = "console.error('boom: no config'); console.log('on stdout'); process.exit(7)";
    let (code, out, err) = crash_loop(2, &[], &["node", "-e", script], &[]);
    assert_eq!(code, Some(1), "{err}");
    let errored = errored_line(&err);
    assert!(
        errored.contains("; not restarted; its last output: boom: no config"),
        "{errored}"
    );
    // What the user sees: each worker's line as it wrote it.
    assert!(err.contains("\nboom: no config\n"), "{err}");
    assert!(!err.contains("[worker "), "{err}");
    assert!(out.starts_with("on stdout\n"), "{out}");
    assert!(!out.contains("[worker "), "{out}");
}

/// Ctrl-C in a terminal reaches the whole process group, the workers as
/// well as the primary, and may come twice in a row (GNU `timeout` sends
/// its signal to the child and then to the group): the stop is graceful
/// (exit 0, not 130), nothing is restarted, the workers' deaths by the
/// signal they got directly are no crash (no warning), and the second
/// delivery is the same request.
#[test]
fn ctrl_c_to_the_process_group_twice_is_one_graceful_stop() {
    use std::os::unix::process::CommandExt;
    util::require_node();
    let js = concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/node/ports_worker.js");
    let mut c = uvcluster();
    c.args(["run", "-w", "2", "--", "node", js])
        .env("SCENARIO", "http_port")
        .env("PORT", free_port().to_string())
        .process_group(0);
    let mut r = Running::spawn(c);
    r.expect(") ready (after ");
    r.expect(") ready (after ");
    let group = Pid::from_raw(r.pid() as i32);
    nix::sys::signal::killpg(group, Signal::SIGINT).unwrap();
    nix::sys::signal::killpg(group, Signal::SIGINT).unwrap();
    let (code, log) = r.wait();
    assert_eq!(code, Some(0), "{log}");
    assert!(log.contains("signal SIGINT: stopping gracefully"), "{log}");
    assert!(!log.contains("stopping at once"), "{log}");
    assert!(!log.contains(" restarting "), "{log}");
    assert!(!log.contains(" WARN "), "{log}");
    assert_eq!(forks(&log), 2, "{log}");
}

/// `--wait-ready` reaches the supervisor: a Node worker is ready when it
/// sends `'ready'` (PM2's convention), after it listens; one that never
/// sends it is killed at `--ready-timeout` and, its start budget spent,
/// its slot is errored and the command exits 1. (The timeout leaves a
/// loaded machine's `node` time to listen: 2 s, against 0.1 s idle.)
#[test]
fn wait_ready_and_ready_timeout_reach_the_supervisor() {
    util::require_node();
    let dir = scratch("wait-ready");
    let app_js = dir.join("app.js");
    // Once `no-ready` exists, new workers never send 'ready'.
    let app_text = "require('http').createServer((q, s) => s.end('ok'))\
               .listen(process.env.PORT, () => {\
                 if (process.env.SEND_READY && !require('fs').existsSync(process.env.NO_READY))\
                   setTimeout(() => process.send('ready'), 50);\
               });";
    std::fs::write(&app_js, app_text).unwrap();
    let app = app_js.to_str().unwrap();
    let no_ready = dir.join("no-ready");
    let _ = std::fs::remove_file(&no_ready);
    let mut c = uvcluster();
    c.args(["run", "-w", "1", "--wait-ready", "--", "node", app])
        .env("PORT", free_port().to_string())
        .env("SEND_READY", "1")
        .env("NO_READY", &no_ready);
    let mut r = Running::spawn(c);
    r.expect(") listening on ");
    r.expect(") ready (after ");
    // A stop during a reload ends the reload: the log says so, and not
    // that old workers keep serving (they stop too).
    std::fs::write(&no_ready, "").unwrap();
    r.signal(Signal::SIGHUP);
    r.expect("reload started (1 worker)");
    r.expect(") listening on ");
    r.signal(Signal::SIGTERM);
    r.expect("reload abandoned: a stop began");
    let (code, log) = r.wait();
    assert_eq!(code, Some(0), "{log}");
    assert!(!log.contains("keep serving"), "{log}");
    assert!(!log.contains("1 workers"), "{log}");

    let mut c = uvcluster();
    c.args([
        "run",
        "-w",
        "1",
        "--wait-ready",
        "--ready-timeout=2s",
        "--max-restarts=1",
        "--",
        "node",
        app,
    ])
    .env("PORT", free_port().to_string());
    let (code, _, err) = finish(c);
    assert_eq!(code, Some(1), "{err}");
    // It listened (which is ready without --wait-ready) and was not ready.
    assert!(err.contains(") listening on "), "{err}");
    assert!(!err.contains(") ready"), "{err}");
    assert!(
        err.contains(") sent SIGKILL: not ready within the ready timeout"),
        "{err}"
    );
    assert!(err.contains(" ERROR uvcluster: slot 0 errored: "), "{err}");
}

/// Regression (issue 13): with `--wait-ready`, a connection that arrives
/// while the only worker listened but has not sent `'ready'` waits for it
/// (it is handed once the worker is ready), even past `--worker-timeout`:
/// a starting worker is not hung. No `no worker able to take them` line,
/// and none that says `worker -`.
#[test]
fn wait_ready_connections_wait_for_a_starting_worker_past_the_worker_timeout() {
    util::require_node();
    let dir = scratch("wait-ready-queue");
    let app_js = dir.join("app.js");
    std::fs::write(
        &app_js,
        "require('http').createServer((q, s) => s.end('ok'))\
           .listen(process.env.PORT, () => setTimeout(() => process.send('ready'), 1500));",
    )
    .unwrap();
    let port = free_port();
    let mut c = uvcluster();
    c.args(["run", "-w", "1", "--wait-ready", "--worker-timeout=300ms"])
        .args(["--ready-timeout=20s", "--", "node"])
        .arg(&app_js)
        .env("PORT", port.to_string());
    let mut r = Running::spawn(c);
    r.expect(") listening on ");
    let answer = ops_util::get_ok(port);
    r.expect(") ready (after ");
    let log = r.stop();
    assert_eq!(answer.as_deref(), Ok("ok"), "{log}");
    assert!(!log.contains("no worker able"), "{log}");
    assert!(!log.contains("worker -"), "{log}");
}

/// Regression (issue 13): `--max-connections` under `none` and
/// `reuseport` (where the kernel hands out connections and nothing counts
/// them) is warned about at start, and the start line does not claim the
/// limit; under `rr` the start line names it and there is no warning.
#[test]
fn max_connections_under_a_kernel_policy_is_warned_about() {
    for policy in ["none", "reuseport"] {
        let mut c = uvcluster();
        c.args(["run", "-w", "1", "-p", policy, "--max-connections", "10"]);
        let log = serve_and_stop(c, 1);
        let warn = log
            .lines()
            .find(|l| l.contains("--max-connections 10 has no effect"))
            .unwrap_or_else(|| panic!("no warning under {policy}:\n{log}"));
        assert!(warn.contains(" WARN  uvcluster: "), "{warn}");
        assert!(warn.contains(&format!("under policy {policy}")), "{warn}");
        assert!(!log.contains("max connections 10"), "{log}");
    }
    let mut c = uvcluster();
    c.args(["run", "-w", "1", "--max-connections", "10"]);
    let log = serve_and_stop(c, 1);
    assert!(log.contains("max connections 10"), "{log}");
    assert!(!log.contains("has no effect"), "{log}");
}

/// Regression (issue 13): a fail-closed reload of a one-worker pool says
/// `the old worker keeps serving` (not `workers keep`), and its
/// replacement, which listened but never sent `'ready'`, is drained, not
/// SIGKILLed; the old worker still answers.
#[test]
fn failed_reload_of_one_worker_says_the_old_worker_keeps_serving() {
    util::require_node();
    let dir = scratch("one-old-worker");
    let app_js = dir.join("app.js");
    std::fs::write(
        &app_js,
        "require('http').createServer((q, s) => s.end('ok'))\
           .listen(process.env.PORT, () => {\
             if (!require('fs').existsSync(process.env.NO_READY)) process.send('ready');\
           });",
    )
    .unwrap();
    let no_ready = dir.join("no-ready");
    let _ = std::fs::remove_file(&no_ready);
    let port = free_port();
    let mut c = uvcluster();
    c.args(["run", "-w", "1", "-p", "none", "--wait-ready"])
        .args(["--ready-timeout=1500ms", "--", "node"])
        .arg(&app_js)
        .env("PORT", port.to_string())
        .env("NO_READY", &no_ready);
    let mut r = Running::spawn(c);
    r.expect(") ready (after ");
    std::fs::write(&no_ready, "").unwrap();
    r.signal(Signal::SIGHUP);
    r.expect("reload started (1 worker)");
    // The replacement is drained first, then the failure reported.
    r.expect(") draining");
    let failed = r.expect("reload failed: ");
    assert!(
        failed.ends_with("; the old worker keeps serving"),
        "{failed}"
    );
    assert_eq!(ops_util::get_ok(port).as_deref(), Ok("ok"));
    let log = r.stop();
    assert!(!log.contains("SIGKILL"), "{log}");
}

/// A reload to code with a syntax error said only `reload failed: the
/// replacement for slot 0 exited with code 1 before it was ready`, unlike
/// the `errored` line: the log line and the `ctl reload` reply now quote
/// the replacement's stderr (Node's `SyntaxError: ...`).
#[test]
fn failed_reload_quotes_the_replacements_syntax_error() {
    util::require_node();
    let dir = ops_util::TempDir::new("reload-syntax");
    let sock = dir.join("c.sock");
    let app = dir.join("app.js");
    std::fs::write(
        &app,
        "require('http').createServer((q, s) => s.end('ok')).listen(process.env.PORT);\n",
    )
    .unwrap();
    let port = free_port();
    let mut c = uvcluster();
    c.args(["run", "-w", "1", "--control"])
        .arg(&sock)
        .args(["--", "node"])
        .arg(&app)
        .env("PORT", port.to_string())
        .env("RUST_LOG", "info");
    let mut r = Running::spawn(c);
    r.expect(") ready (after ");
    std::fs::write(&app, "require('http').createServer((q, s) => {;\n").unwrap();
    let out = ops_util::ctl(&sock, &["reload"]);
    let reply =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{reply}");
    assert!(
        reply.contains("exited with code 1 before it was ready")
            && reply.contains("; its last output: SyntaxError: ")
            && reply.contains(" | Node.js v"),
        "{reply}"
    );
    let failed = r.expect("reload failed: ");
    assert!(
        failed.contains("exited with code 1 before it was ready")
            && failed.contains("; its last output: SyntaxError: ")
            && failed.ends_with("; the old worker keeps serving"),
        "{failed}"
    );
    assert_eq!(ops_util::get_ok(port).as_deref(), Ok("ok"));
    r.stop();
}

/// A reload whose new code listens on another port waited the whole ready
/// timeout and then said only `was not ready within ...`: the line now
/// says what the replacement listened on and what its slot needs.
#[test]
fn failed_reload_says_the_replacement_listened_elsewhere() {
    util::require_node();
    let dir = ops_util::TempDir::new("reload-other-port");
    let app = dir.join("app.js");
    let port_file = dir.join("port");
    std::fs::write(
        &app,
        "const port = require('fs').readFileSync(process.env.PORT_FILE, 'utf8').trim();\n\
         require('http').createServer((q, s) => s.end('ok')).listen(Number(port));\n",
    )
    .unwrap();
    let (old, new) = (free_port(), free_port());
    std::fs::write(&port_file, old.to_string()).unwrap();
    let mut c = uvcluster();
    c.args(["run", "-w", "1", "--ready-timeout=1500ms", "--", "node"])
        .arg(&app)
        .env("PORT_FILE", &port_file)
        .env("RUST_LOG", "info");
    let mut r = Running::spawn(c);
    r.expect(") ready (after ");
    std::fs::write(&port_file, new.to_string()).unwrap();
    r.signal(Signal::SIGHUP);
    let failed = r.expect("reload failed: ");
    assert!(
        failed.contains(&format!(
            "was not ready within 1s 500ms (0 slot(s) replaced before it); \
             it listened on *:{new}; its slot needs *:{old}; "
        )),
        "{failed}"
    );
    assert_eq!(ops_util::get_ok(old).as_deref(), Ok("ok"));
    r.stop();
}
