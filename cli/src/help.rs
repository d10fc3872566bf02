//! The texts of `--help` (printed on stdout, exit 0) and the usage line
//! printed with every usage error (on stderr, exit 2). docs/cli.md has the
//! same table with the reasons for each default.

/// The line every usage error ends with.
pub const USAGE: &str = "usage: uvcluster run [OPTIONS] -- COMMAND [ARGS...]\n\
                         (uvcluster run --help lists the options)";

/// `uvcluster --help`.
pub const MAIN: &str = "\
uvcluster: run any program that speaks Node's cluster protocol (a Node app
unchanged, or a Rust worker) as a pool of workers under a Rust primary that
restarts them, reloads them without dropping a connection, and stops them
gracefully.

usage: uvcluster run [OPTIONS] -- COMMAND [ARGS...]
       uvcluster ctl [--control PATH | --name NAME] COMMAND
       uvcluster --help | --version

Commands:
  run    start COMMAND as a pool of workers (uvcluster run --help)
  ctl    status, reload, scale, restart, stop or message a running pool
         (uvcluster ctl --help)

Exit status: 0 after a clean stop, 1 when the service could not start (COMMAND
not found, say) or its workers failed, 2 for a usage error, 128+N after an
immediate stop by signal N. See docs/cli.md.
";

/// `uvcluster run --help`.
pub const RUN: &str = "\
usage: uvcluster run [OPTIONS] -- COMMAND [ARGS...]

Runs COMMAND (a Node app: `node app.js`, or a Rust worker) as a pool of
workers. The environment passes through to the workers (PORT=8000 works).
Values take `--opt value` or `--opt=value`; durations a unit (500ms, 30s,
2m), sizes a binary unit (512M, 1G), limits also `off`.

Pool:
  -w, --workers N              worker count [default: CPUs; env WEB_CONCURRENCY]
  -p, --policy POLICY          rr, none, reuseport or leastconn
                               [default: rr; env NODE_CLUSTER_SCHED_POLICY]
      --handoff-window N       connections in flight to one worker, 1 to 64
                               [default: 1; env UVCLUSTER_HANDOFF_WINDOW]

Restart:
      --restart WHEN           always, on-failure or never [default: always]
      --backoff-initial DUR    delay between restarts of a slot (its first
                               restart is at once), doubled per crash
                               [default: 100ms]
      --backoff-cap DUR        longest restart delay [default: 15s]
      --stable-period DUR      up this long resets the backoff [default: 30s]
      --max-restarts N         crashes of one slot within --restart-window
                               before it is errored [default: 5]
      --restart-window DUR     [default: 10s]
      --fail-before-ready[=B]  count starts that never got ready as a crash
                               loop (true or false) [default: true]

Readiness and stopping:
      --wait-ready[=B]         ready when the worker sends 'ready'
                               (process.send('ready'), as PM2) instead of
                               when it listens [default: false]
      --ready-timeout DUR      not ready by then: killed, a failed start [default: 30s]
      --kill-timeout DUR       a disconnected worker still running after this
                               is killed; bounds a graceful stop [default: 30s]
      --reload-batch N         workers replaced at once by a reload [default: 1]
      --worker-timeout DUR     a handed-over connection left unanswered this
                               long: the worker is hung, replaced [default: 30s]

Limits (each replaces a worker gracefully, as a one-worker reload):
      --max-memory SIZE        resident memory [default: off]
      --memory-check-interval DUR  [default: 1s]
      --max-connections N      connections handed to one worker [default: off]
      --max-connections-jitter N   adds random(0..=N) per worker [default: 0]

Development:
      --watch PATH             reload worker by worker when a file under PATH
                               changes (repeatable); a reload whose new code
                               fails to start leaves the old workers serving
      --ignore GLOB            changes to leave out (repeatable), added to
                               .git, node_modules, target and *.log; `*.tmp`
                               matches a name at any depth, `dist/**` a
                               relative path
      --watch-debounce DUR     quiet time after the last change before the
                               reload [default: 300ms]

Operations:
      --name NAME              the control socket's name: RUNTIME_DIR/NAME.sock
                               [default: uvcluster-PID]
      --control PATH|none      the control socket (uvcluster ctl)
                               [default: $XDG_RUNTIME_DIR/uvcluster/NAME.sock,
                               else /run/uvcluster/NAME.sock for root,
                               else /tmp/uvcluster-UID/NAME.sock]
      --control-timeout DUR    a silent control client is closed [default: 10s]
      --metrics HOST:PORT      serve /metrics, /healthz, /readyz [default: off]
      --broadcast[=B]          relay each worker's messages to every other
                               worker [default: false]

Output and configuration:
      --prefix-output[=B]      prefix each line a worker prints with
                               `[worker ID] ` [default: false]
  -c, --config FILE            options file [default: ./uvcluster.toml if present]
  -h, --help                   this text
  -V, --version                the version

Precedence: flags, then the file, then the environment, then the default.
The file takes the same names as keys (kill-timeout = \"10s\", workers = 4,
wait-ready = true), command = [\"node\", \"app.js\"], watch = [\"src\"] and
ignore = [\"*.log\"].

Signals: SIGTERM or SIGINT stops gracefully (a second one, or SIGQUIT, at
once); SIGHUP reloads worker by worker; SIGTTIN adds a worker, SIGTTOU
removes one. Log lines go to stderr; RUST_LOG=warn quiets them, RUST_LOG=debug
adds the library's. See docs/cli.md.
";

#[cfg(test)]
mod tests {
    use uvcluster::cluster::DEFAULT_HANDOFF_WINDOW;
    use uvcluster::supervisor::SupervisorConfig;

    use crate::values::show_duration;

    /// The defaults `run --help` states are the ones that apply.
    #[test]
    fn stated_defaults_are_the_real_ones() {
        let d = SupervisorConfig::default();
        let line = |flag: &str| {
            let at = super::RUN
                .find(&format!("--{flag} "))
                .unwrap_or_else(|| panic!("{flag}"));
            let rest = &super::RUN[at..];
            let start = rest.find("[default: ").unwrap() + "[default: ".len();
            let len = rest[start..].find([']', ';']).unwrap();
            rest[start..start + len].to_string()
        };
        for (flag, value) in [
            ("backoff-initial", d.backoff_initial),
            ("backoff-cap", d.backoff_cap),
            ("stable-period", d.stable_period),
            ("restart-window", d.restart_window),
            ("ready-timeout", d.ready_timeout),
            ("kill-timeout", d.kill_timeout),
            ("memory-check-interval", d.memory_check_interval),
        ] {
            assert_eq!(line(flag), show_duration(value), "--{flag}");
        }
        assert_eq!(
            line("worker-timeout"),
            d.worker_timeout.map_or("off".into(), show_duration)
        );
        assert_eq!(line("max-restarts"), d.max_restarts.to_string());
        assert_eq!(line("reload-batch"), d.reload_batch.to_string());
        assert_eq!(line("restart"), d.restart.to_string());
        assert_eq!(
            line("fail-before-ready[=B]").as_str(),
            d.fail_before_ready.to_string()
        );
        assert_eq!(
            line("max-connections-jitter"),
            d.max_connections_jitter.to_string()
        );
        assert_eq!(line("max-memory"), "off");
        assert_eq!(line("max-connections"), "off");
        assert_eq!(line("handoff-window"), DEFAULT_HANDOFF_WINDOW.to_string());
        assert_eq!(
            line("watch-debounce"),
            show_duration(crate::watch::DEFAULT_DEBOUNCE)
        );
    }
}
