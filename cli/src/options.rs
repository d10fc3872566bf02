//! `uvcluster run`'s options from their three sources: the command line,
//! the configuration file (`uvcluster.toml`) and the environment.
//!
//! Every option has one name, its long flag without the dashes, used as the
//! file's key too (`--kill-timeout 10s` ↔ `kill-timeout = "10s"`), and one
//! parser (`values.rs`), so a value means the same and a bad one reads the
//! same wherever it comes from. Precedence: a flag overrides the file, the
//! file overrides the environment, the environment overrides the default.
//! The environment comes last because its variables are a deployment's
//! defaults (`WEB_CONCURRENCY`, as gunicorn reads it) or a process-wide
//! setting a program may override (Node lets `cluster.schedulingPolicy`, set
//! in code, win over `NODE_CLUSTER_SCHED_POLICY`).

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::time::Duration;

use uvcluster::cluster::{DEFAULT_HANDOFF_WINDOW, HANDOFF_WINDOW_ENV, SchedulingPolicy};
use uvcluster::supervisor::{ReadyMode, RestartPolicy, SupervisorConfig};

use crate::values;

/// The configuration file read when `--config` is not given, if it exists
/// in the working directory.
pub const DEFAULT_CONFIG: &str = "uvcluster.toml";

/// The environment variables `run` reads, with the option each stands for.
pub const ENV_VARS: &[(&str, &str)] = &[
    ("WEB_CONCURRENCY", "workers"),
    ("NODE_CLUSTER_SCHED_POLICY", "policy"),
    (HANDOFF_WINDOW_ENV, "handoff-window"),
];

/// What `uvcluster run` was asked to do, every option resolved.
#[derive(Debug)]
pub struct RunOptions {
    /// The supervisor's options.
    pub supervisor: SupervisorConfig,
    /// How connections are spread over workers.
    pub policy: SchedulingPolicy,
    /// Connections in flight to one worker at a time.
    pub handoff_window: usize,
    /// Prefix each line of worker output with the worker's id.
    pub prefix_output: bool,
    /// The program and its arguments.
    pub command: Vec<OsString>,
    /// The configuration file that was read, if any.
    pub config_file: Option<PathBuf>,
    /// `--watch`: reload on changes (`watch.rs`); `None` without a path.
    pub watch: Option<crate::watch::WatchOptions>,
    /// The control socket (`--control`, `--name`; docs/control.md).
    pub control: crate::control::ControlPath,
    /// A control client silent this long is closed.
    pub control_timeout: Duration,
    /// Where `/metrics`, `/healthz` and `/readyz` are served
    /// (`--metrics`; docs/metrics.md).
    pub metrics: Option<std::net::SocketAddr>,
    /// Relay every worker's user messages to every other worker.
    pub broadcast: bool,
}

/// An option's kind: how its value is parsed, and whether a flag takes a
/// value.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// A flag without a value (`--wait-ready`; `--wait-ready=false`), a
    /// boolean in the file.
    Switch,
    /// A flag with a value.
    Value,
    /// A flag with a value, repeatable (each adds one); an array of
    /// strings (or one string) in the file.
    List,
}

/// Every option: its name (flag and key), short flag, kind.
const OPTIONS: &[(&str, Option<char>, Kind)] = &[
    ("workers", Some('w'), Kind::Value),
    ("policy", Some('p'), Kind::Value),
    ("restart", None, Kind::Value),
    ("wait-ready", None, Kind::Switch),
    ("ready-timeout", None, Kind::Value),
    ("kill-timeout", None, Kind::Value),
    ("reload-batch", None, Kind::Value),
    ("worker-timeout", None, Kind::Value),
    ("max-memory", None, Kind::Value),
    ("memory-check-interval", None, Kind::Value),
    ("max-connections", None, Kind::Value),
    ("max-connections-jitter", None, Kind::Value),
    ("backoff-initial", None, Kind::Value),
    ("backoff-cap", None, Kind::Value),
    ("stable-period", None, Kind::Value),
    ("max-restarts", None, Kind::Value),
    ("restart-window", None, Kind::Value),
    ("fail-before-ready", None, Kind::Switch),
    ("handoff-window", None, Kind::Value),
    ("prefix-output", None, Kind::Switch),
    ("watch", None, Kind::List),
    ("ignore", None, Kind::List),
    ("watch-debounce", None, Kind::Value),
    ("name", None, Kind::Value),
    ("control", None, Kind::Value),
    ("control-timeout", None, Kind::Value),
    ("metrics", None, Kind::Value),
    ("broadcast", None, Kind::Switch),
];

/// The keys the file takes: every option, and `command`.
fn file_keys() -> String {
    let mut keys: Vec<&str> = OPTIONS.iter().map(|o| o.0).collect();
    keys.push("command");
    keys.join(", ")
}

/// Options as one source gave them; `None` where it said nothing.
#[derive(Debug, Default, Clone)]
struct Partial {
    workers: Option<u64>,
    policy: Option<SchedulingPolicy>,
    restart: Option<RestartPolicy>,
    wait_ready: Option<bool>,
    ready_timeout: Option<Duration>,
    kill_timeout: Option<Duration>,
    reload_batch: Option<u64>,
    worker_timeout: Option<Option<Duration>>,
    max_memory: Option<Option<u64>>,
    memory_check_interval: Option<Duration>,
    max_connections: Option<Option<u64>>,
    max_connections_jitter: Option<u64>,
    backoff_initial: Option<Duration>,
    backoff_cap: Option<Duration>,
    stable_period: Option<Duration>,
    max_restarts: Option<u64>,
    restart_window: Option<Duration>,
    fail_before_ready: Option<bool>,
    handoff_window: Option<usize>,
    prefix_output: Option<bool>,
    watch: Option<Vec<PathBuf>>,
    ignore: Option<Vec<String>>,
    watch_debounce: Option<Duration>,
    name: Option<String>,
    control: Option<Option<PathBuf>>,
    control_timeout: Option<Duration>,
    metrics: Option<std::net::SocketAddr>,
    broadcast: Option<bool>,
    command: Option<Vec<OsString>>,
}

impl Partial {
    /// Sets option `name` from `v`; the error is the parser's message (the
    /// caller names the source).
    fn set(&mut self, name: &str, v: &str) -> Result<(), String> {
        use values::*;
        match name {
            "workers" => {
                let max = uvcluster::supervisor::MAX_WORKERS as u64;
                self.workers = Some(positive(v).and_then(|n| {
                    (n <= max).then_some(n).ok_or_else(|| {
                        format!("takes a whole number from 1 to {max}. Received {v:?}")
                    })
                })?)
            }
            "policy" => self.policy = Some(policy(v)?),
            "restart" => self.restart = Some(restart(v)?),
            "wait-ready" => self.wait_ready = Some(boolean(v)?),
            "ready-timeout" => self.ready_timeout = Some(duration(v)?),
            "kill-timeout" => self.kill_timeout = Some(duration(v)?),
            "reload-batch" => self.reload_batch = Some(positive(v)?),
            "worker-timeout" => self.worker_timeout = Some(duration_or_off(v)?),
            "max-memory" => self.max_memory = Some(size_or_off(v)?),
            "memory-check-interval" => self.memory_check_interval = Some(duration(v)?),
            "max-connections" => self.max_connections = Some(positive_or_off(v)?),
            "max-connections-jitter" => self.max_connections_jitter = Some(count(v)?),
            "backoff-initial" => self.backoff_initial = Some(duration(v)?),
            "backoff-cap" => self.backoff_cap = Some(duration(v)?),
            "stable-period" => self.stable_period = Some(duration(v)?),
            "max-restarts" => self.max_restarts = Some(positive(v)?),
            "restart-window" => self.restart_window = Some(duration(v)?),
            "fail-before-ready" => self.fail_before_ready = Some(boolean(v)?),
            "handoff-window" => self.handoff_window = Some(handoff_window(v)?),
            "prefix-output" => self.prefix_output = Some(boolean(v)?),
            "watch" if v.is_empty() => {
                return Err("should be a file or directory to watch. Received \"\"".into());
            }
            "watch" => self.watch.get_or_insert_default().push(PathBuf::from(v)),
            "ignore" => {
                crate::watch::check_glob(v)?;
                self.ignore.get_or_insert_default().push(v.to_string());
            }
            "watch-debounce" => self.watch_debounce = Some(duration(v)?),
            "name" => self.name = Some(crate::control::name(v)?),
            "control" => self.control = Some(crate::control::path_or_none(v)?),
            "control-timeout" => self.control_timeout = Some(duration(v)?),
            "metrics" => self.metrics = Some(crate::metrics::address(v)?),
            "broadcast" => self.broadcast = Some(boolean(v)?),
            _ => unreachable!("{name} is in OPTIONS"),
        }
        Ok(())
    }

    /// `self` over `under`: what `self` says wins.
    fn over(self, under: Partial) -> Partial {
        macro_rules! or {
            ($($f:ident),*) => { Partial { $($f: self.$f.or(under.$f)),* } };
        }
        or!(
            workers,
            policy,
            restart,
            wait_ready,
            ready_timeout,
            kill_timeout,
            reload_batch,
            worker_timeout,
            max_memory,
            memory_check_interval,
            max_connections,
            max_connections_jitter,
            backoff_initial,
            backoff_cap,
            stable_period,
            max_restarts,
            restart_window,
            fail_before_ready,
            handoff_window,
            prefix_output,
            watch,
            ignore,
            watch_debounce,
            name,
            control,
            control_timeout,
            metrics,
            broadcast,
            command
        )
    }
}

/// What the command line asked for.
#[derive(Debug)]
pub enum Request {
    /// `uvcluster run ...`.
    Run(Box<RunOptions>),
    /// `--help` (for `run` or not): print the text on stdout, exit 0.
    Help(&'static str),
    /// `--version`.
    Version,
}

/// A usage error: the message, printed with the usage line, exit 2.
#[derive(Debug, PartialEq, Eq)]
pub struct Usage(pub String);

/// Parses the command line (without the program name), reads the
/// configuration file it names (or `./uvcluster.toml`) and the environment
/// through `env`, and resolves every option.
///
/// # Errors
///
/// [`Usage`] naming the flag, key or variable, the value and the valid
/// values.
pub fn parse(
    args: impl IntoIterator<Item = OsString>,
    env: impl Fn(&str) -> Option<OsString>,
) -> Result<Request, Usage> {
    use lexopt::prelude::*;
    let mut p = lexopt::Parser::from_args(args);
    let err = |m: String| Usage(m);
    match p.next().map_err(|e| err(e.to_string()))? {
        Some(Value(v)) if v == "run" => {}
        Some(Value(v)) => {
            return Err(err(format!(
                "unknown subcommand {:?}; the subcommands are run and ctl",
                v.to_string_lossy()
            )));
        }
        Some(Short('h') | Long("help")) => return Ok(Request::Help(crate::help::MAIN)),
        Some(Short('V') | Long("version")) => return Ok(Request::Version),
        Some(other) => {
            return Err(err(format!(
                "{} before the subcommand: options go after run",
                show_arg(&other)
            )));
        }
        None => return Err(err("no subcommand given (run or ctl)".into())),
    }
    let mut flags = Partial::default();
    let mut config: Option<PathBuf> = None;
    while let Some(arg) = p.next().map_err(|e| err(e.to_string()))? {
        let (name, kind) = match &arg {
            Short('h') | Long("help") => return Ok(Request::Help(crate::help::RUN)),
            Short('V') | Long("version") => return Ok(Request::Version),
            Long("config") | Short('c') => {
                let v = p
                    .value()
                    .map_err(|_| err("--config needs a value (a file)".into()))?;
                config = Some(PathBuf::from(v));
                continue;
            }
            Value(v) => {
                // The command starts at its first word (`run node app.js`)
                // or after `--`.
                let mut command = vec![v.clone()];
                command.extend(p.raw_args().map_err(|e| err(e.to_string()))?);
                flags.command = Some(command);
                break;
            }
            Short(c) => match OPTIONS.iter().find(|o| o.1 == Some(*c)) {
                Some(&(name, _, kind)) => (name, kind),
                None => return Err(err(format!("unknown option {}", show_arg(&arg)))),
            },
            Long(l) => match OPTIONS.iter().find(|o| o.0 == *l) {
                Some(&(name, _, kind)) => (name, kind),
                None => return Err(err(format!("unknown option {}", show_arg(&arg)))),
            },
        };
        let value = match kind {
            Kind::Switch => match p.optional_value() {
                Some(v) => v,
                None => "true".into(),
            },
            Kind::Value | Kind::List => p
                .value()
                .map_err(|_| err(format!("--{name} needs a value")))?,
        };
        let value = value
            .into_string()
            .map_err(|v| err(format!("--{name}: {v:?} is not UTF-8")))?;
        flags
            .set(name, &value)
            .map_err(|m| err(format!("--{name} {m}")))?;
    }
    let (file, config_file) = read_config(config.as_deref())?;
    let given = flags.over(file);
    // A variable is read only when neither a flag nor the file set its
    // option, so a bad one is an error only then (as `--policy` always
    // overrode a bad `NODE_CLUSTER_SCHED_POLICY`).
    let mut from_env = Partial::default();
    for &(var, name) in ENV_VARS {
        let set = match name {
            "workers" => given.workers.is_some(),
            "policy" => given.policy.is_some(),
            _ => given.handoff_window.is_some(),
        };
        if let (false, Some(v)) = (set, env(var)) {
            from_env
                .set(name, &v.to_string_lossy())
                .map_err(|m| err(format!("{var} {m}")))?;
        }
    }
    resolve(given.over(from_env), config_file)
}

/// Reads `path` (or `./uvcluster.toml` when it exists); returns what it
/// sets and the path read.
fn read_config(path: Option<&Path>) -> Result<(Partial, Option<PathBuf>), Usage> {
    let path = match path {
        Some(p) => p.to_path_buf(),
        None if Path::new(DEFAULT_CONFIG).is_file() => PathBuf::from(DEFAULT_CONFIG),
        None => return Ok((Partial::default(), None)),
    };
    let shown = path.display();
    let text = std::fs::read_to_string(&path)
        .map_err(|e| Usage(format!("cannot read the configuration file {shown}: {e}")))?;
    let table: toml::Table =
        toml::from_str(&text).map_err(|e| Usage(format!("{shown} is not valid TOML: {e}")))?;
    let mut out = Partial::default();
    for (key, value) in table {
        if key == "command" {
            out.command = Some(command_from_toml(&value).ok_or_else(|| {
                Usage(format!(
                    "command in {shown} should be an array of strings, such as \
                     [\"node\", \"app.js\"]. Received {value}"
                ))
            })?);
            continue;
        }
        let Some(&(name, _, kind)) = OPTIONS.iter().find(|o| o.0 == key) else {
            return Err(Usage(format!(
                "unknown key {key:?} in {shown}; the keys are {}",
                file_keys()
            )));
        };
        if let (toml::Value::Array(items), Kind::List) = (&value, kind) {
            for item in items {
                let Some(v) = item.as_str() else {
                    return Err(Usage(format!(
                        "{name} in {shown} should be an array of strings. Received {value}"
                    )));
                };
                out.set(name, v)
                    .map_err(|m| Usage(format!("{name} in {shown} {m}")))?;
            }
            continue;
        }
        let v = match (&value, kind) {
            (toml::Value::String(s), Kind::Value | Kind::List) => s.clone(),
            // `watch = 5`: not a path, whatever it names; said here with
            // the file and key rather than at start as `--watch 5`.
            (_, Kind::List) => {
                return Err(Usage(format!(
                    "{name} in {shown} should be a string or an array of strings. \
                     Received {value}"
                )));
            }
            (toml::Value::Integer(i), Kind::Value) => i.to_string(),
            (toml::Value::Boolean(b), Kind::Switch) => b.to_string(),
            (toml::Value::String(s), Kind::Switch) => s.clone(),
            // Anything else is refused by the parser, which shows it as the
            // file wrote it.
            (other, _) => other.to_string(),
        };
        out.set(name, &v)
            .map_err(|m| Usage(format!("{name} in {shown} {m}")))?;
    }
    Ok((out, Some(path)))
}

fn command_from_toml(v: &toml::Value) -> Option<Vec<OsString>> {
    let items = v.as_array()?;
    let words: Option<Vec<OsString>> = items
        .iter()
        .map(|w| w.as_str().map(OsString::from))
        .collect();
    words.filter(|w| !w.is_empty())
}

/// The flag as the user wrote it, for an error.
pub(crate) fn show_arg(arg: &lexopt::Arg<'_>) -> String {
    match arg {
        lexopt::Arg::Short(c) => format!("-{c}"),
        lexopt::Arg::Long(l) => format!("--{l}"),
        lexopt::Arg::Value(v) => format!("{:?}", v.to_string_lossy()),
    }
}

/// Whether `command` is `node -e SCRIPT` (or `-p`, `--eval`, `--print`)
/// with nothing after the script that would become `process.argv[1]`:
/// an `errored` slot of such workers then says why they never listened.
///
/// Node's `initializeClusterIPC` (lib/internal/process/pre_execution.js)
/// runs `cluster._setupWorker()` only when `process.argv[1]` is set; with
/// `-e` alone it is not, so `NODE_UNIQUE_ID` makes `require('cluster')` a
/// worker whose channel was never set up: its `listen` waits for a reply
/// nobody reads, and with nothing else referenced the process exits 0.
/// Options after the script are Node's (`node -e S --no-warnings` leaves
/// `argv[1]` unset), so only a word not starting with `-`, or any word
/// after `--`, counts.
pub fn node_eval_without_argv1(command: &[OsString]) -> bool {
    let Some(program) = command.first() else {
        return false;
    };
    let name = Path::new(program)
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    if name != "node" && name != "nodejs" {
        return false;
    }
    let args: Vec<String> = command[1..]
        .iter()
        .map(|a| a.to_string_lossy().into_owned())
        .collect();
    let eval = |a: &str| {
        matches!(a, "-e" | "-p" | "--eval" | "--print" | "-pe" | "-ep")
            || a.starts_with("--eval=")
            || a.starts_with("--print=")
    };
    let Some(at) = args.iter().position(|a| eval(a) || a == "--") else {
        return false;
    };
    if args[at] == "--" {
        return false;
    }
    // The script: the next word, or inline (`--eval=SCRIPT`).
    let after = if args[at].contains('=') {
        at + 1
    } else {
        at + 2
    };
    let mut rest = args.iter().skip(after);
    while let Some(a) = rest.next() {
        if a == "--" {
            return rest.next().is_none();
        }
        if !a.starts_with('-') {
            return false;
        }
    }
    true
}

/// Fills the defaults and checks what only the whole can tell.
fn resolve(p: Partial, config_file: Option<PathBuf>) -> Result<Request, Usage> {
    let d = SupervisorConfig::default();
    let command = p
        .command
        .filter(|c| !c.is_empty())
        .ok_or_else(|| Usage("no command given".into()))?;
    let supervisor = SupervisorConfig {
        workers: p.workers.map_or(d.workers, |n| n as usize),
        restart: p.restart.unwrap_or(d.restart),
        backoff_initial: p.backoff_initial.unwrap_or(d.backoff_initial),
        backoff_cap: p.backoff_cap.unwrap_or(d.backoff_cap),
        stable_period: p.stable_period.unwrap_or(d.stable_period),
        max_restarts: p
            .max_restarts
            .map_or(d.max_restarts, |n| u32::try_from(n).unwrap_or(u32::MAX)),
        restart_window: p.restart_window.unwrap_or(d.restart_window),
        fail_before_ready: p.fail_before_ready.unwrap_or(d.fail_before_ready),
        ready: match p.wait_ready {
            Some(true) => ReadyMode::Message,
            Some(false) => ReadyMode::Listening,
            None => d.ready,
        },
        ready_timeout: p.ready_timeout.unwrap_or(d.ready_timeout),
        kill_timeout: p.kill_timeout.unwrap_or(d.kill_timeout),
        reload_batch: p.reload_batch.map_or(d.reload_batch, |n| n as usize),
        worker_timeout: p.worker_timeout.unwrap_or(d.worker_timeout),
        max_memory: p.max_memory.unwrap_or(d.max_memory),
        memory_check_interval: p.memory_check_interval.unwrap_or(d.memory_check_interval),
        max_connections: p.max_connections.unwrap_or(d.max_connections),
        max_connections_jitter: p.max_connections_jitter.unwrap_or(d.max_connections_jitter),
        ..d
    };
    if supervisor.backoff_cap < supervisor.backoff_initial {
        return Err(Usage(format!(
            "--backoff-cap should be at least --backoff-initial ({}). Received {}",
            values::show_duration(supervisor.backoff_initial),
            values::show_duration(supervisor.backoff_cap)
        )));
    }
    supervisor.validate().map_err(|e| {
        Usage(format!(
            "--{} should be {}. Received {}",
            e.option, e.expected, e.value
        ))
    })?;
    Ok(Request::Run(Box::new(RunOptions {
        supervisor,
        policy: p.policy.unwrap_or(SchedulingPolicy::RoundRobin),
        handoff_window: p.handoff_window.unwrap_or(DEFAULT_HANDOFF_WINDOW),
        prefix_output: p.prefix_output.unwrap_or(false),
        command,
        config_file,
        watch: p
            .watch
            .filter(|w| !w.is_empty())
            .map(|paths| crate::watch::WatchOptions {
                paths,
                ignore: p.ignore.unwrap_or_default(),
                debounce: p.watch_debounce.unwrap_or(crate::watch::DEFAULT_DEBOUNCE),
            }),
        control: crate::control::ControlPath::resolve(p.control, p.name.as_deref(), |v| {
            std::env::var_os(v)
        }),
        control_timeout: p
            .control_timeout
            .unwrap_or(crate::control::DEFAULT_IDLE_TIMEOUT),
        metrics: p.metrics,
        broadcast: p.broadcast.unwrap_or(false),
    })))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env_of(vars: &'static [(&'static str, &'static str)]) -> impl Fn(&str) -> Option<OsString> {
        move |k| vars.iter().find(|v| v.0 == k).map(|v| OsString::from(v.1))
    }

    fn with(
        args: &[&str],
        vars: &'static [(&'static str, &'static str)],
    ) -> Result<RunOptions, String> {
        // No `./uvcluster.toml` is read: every test names its file, or
        // `/dev/null` (an empty file) when it wants none.
        let mut all = vec!["run", "--config", "/dev/null"];
        all.extend(&args[1..]);
        match parse(all.iter().map(OsString::from), env_of(vars)) {
            Ok(Request::Run(o)) => Ok(*o),
            Ok(other) => panic!("{other:?}"),
            Err(Usage(m)) => Err(m),
        }
    }

    fn p(args: &[&str]) -> Result<RunOptions, String> {
        with(args, &[])
    }

    #[test]
    fn parses_the_documented_forms() {
        let a = p(&["run", "-w", "3", "--policy", "none", "--", "node", "app.js"]).unwrap();
        assert_eq!(a.supervisor.workers, 3);
        assert_eq!(a.policy, SchedulingPolicy::None);
        assert_eq!(
            a.command,
            vec![OsString::from("node"), OsString::from("app.js")]
        );
        assert!(p(&["run", "--", "x"]).unwrap().supervisor.workers >= 1);
        for (name, policy) in [
            ("rr", SchedulingPolicy::RoundRobin),
            ("reuseport", SchedulingPolicy::ReusePort),
            ("leastconn", SchedulingPolicy::LeastConnections),
        ] {
            assert_eq!(p(&["run", "-p", name, "--", "x"]).unwrap().policy, policy);
        }
        // --opt=value, -wN, and a command without `--` (its own flags stay
        // its own).
        let a = p(&[
            "run",
            "--workers=2",
            "--kill-timeout=500ms",
            "-p=none",
            "node",
            "-e",
            "x",
        ])
        .unwrap();
        assert_eq!(a.supervisor.workers, 2);
        assert_eq!(a.supervisor.kill_timeout, Duration::from_millis(500));
        assert_eq!(a.command, ["node", "-e", "x"].map(OsString::from));
        assert_eq!(p(&["run", "-w4", "--", "x"]).unwrap().supervisor.workers, 4);
        let a = p(&[
            "run",
            "--restart",
            "on-failure",
            "--wait-ready",
            "--ready-timeout",
            "2m",
            "--reload-batch",
            "2",
            "--worker-timeout",
            "off",
            "--max-memory",
            "512M",
            "--max-connections",
            "1000",
            "--max-connections-jitter",
            "50",
            "--backoff-initial",
            "200ms",
            "--backoff-cap",
            "5s",
            "--stable-period",
            "1m",
            "--max-restarts",
            "3",
            "--restart-window",
            "20s",
            "--fail-before-ready=false",
            "--handoff-window",
            "8",
            "--prefix-output",
            "--memory-check-interval",
            "250ms",
            "--",
            "x",
        ])
        .unwrap();
        let s = &a.supervisor;
        assert_eq!(s.restart, RestartPolicy::OnFailure);
        assert_eq!(s.ready, ReadyMode::Message);
        assert_eq!(s.ready_timeout, Duration::from_secs(120));
        assert_eq!(s.reload_batch, 2);
        assert_eq!(s.worker_timeout, None);
        assert_eq!(s.max_memory, Some(512 << 20));
        assert_eq!(s.max_connections, Some(1000));
        assert_eq!(s.max_connections_jitter, 50);
        assert_eq!(s.backoff_initial, Duration::from_millis(200));
        assert_eq!(s.backoff_cap, Duration::from_secs(5));
        assert_eq!(s.stable_period, Duration::from_secs(60));
        assert_eq!(s.max_restarts, 3);
        assert_eq!(s.restart_window, Duration::from_secs(20));
        assert!(!s.fail_before_ready);
        assert_eq!(s.memory_check_interval, Duration::from_millis(250));
        assert_eq!(a.handoff_window, 8);
        assert!(a.prefix_output);
    }

    #[test]
    fn defaults_are_the_supervisors() {
        let a = p(&["run", "--", "x"]).unwrap();
        let d = SupervisorConfig::default();
        assert_eq!(a.supervisor, d);
        assert_eq!(a.policy, SchedulingPolicy::RoundRobin);
        assert_eq!(a.handoff_window, DEFAULT_HANDOFF_WINDOW);
        assert!(!a.prefix_output);
    }

    /// A bad `--workers` or `--policy` is an error that names the flag and
    /// the value (as Node's `ERR_SOCKET_BAD_PORT` names the port).
    #[test]
    fn bad_flag_values_are_errors_that_name_them() {
        for bad in ["0", "-1", "2.5", "abc", "", "+3", " 2"] {
            let e = p(&["run", "-w", bad, "--", "x"]).err().unwrap();
            assert_eq!(
                e,
                format!("--workers takes a whole number above 0. Received {bad:?}")
            );
        }
        let e = p(&["run", "--policy", "bogus", "--", "x"]).err().unwrap();
        assert_eq!(
            e,
            "--policy should be rr, none, reuseport or leastconn. Received \"bogus\""
        );
        let e = p(&["run", "-w"]).err().unwrap();
        assert_eq!(e, "--workers needs a value");
        assert_eq!(p(&["run"]).err().unwrap(), "no command given");
        assert_eq!(
            p(&["run", "--frob", "--", "x"]).err().unwrap(),
            "unknown option --frob"
        );
        assert_eq!(
            p(&["run", "--wait-ready=yes", "--", "x"]).err().unwrap(),
            "--wait-ready should be true or false. Received \"yes\""
        );
        let e = p(&[
            "run",
            "--backoff-initial",
            "2s",
            "--backoff-cap",
            "1s",
            "--",
            "x",
        ])
        .err()
        .unwrap();
        assert_eq!(
            e,
            "--backoff-cap should be at least --backoff-initial (2s). Received 1s"
        );
    }

    #[test]
    fn node_eval_needs_an_argument_after_the_script() {
        let yes =
            |c: &[&str]| node_eval_without_argv1(&c.iter().map(OsString::from).collect::<Vec<_>>());
        assert!(yes(&["node", "-e", "s"]));
        assert!(yes(&["/usr/bin/node", "--no-warnings", "-p", "s"]));
        assert!(yes(&["node", "--eval=s"]));
        assert!(yes(&["nodejs", "-e", "s", "--no-warnings"]));
        assert!(yes(&["node", "-e", "s", "--"]));
        assert!(!yes(&["node", "-e", "s", "worker"]));
        assert!(!yes(&["node", "-e", "s", "--", "-x"]));
        assert!(!yes(&["node", "--eval=s", "w"]));
        assert!(!yes(&["node", "app.js"]));
        assert!(!yes(&["node", "--", "-e"]));
        assert!(!yes(&["python3", "-e", "s"]));
    }

    #[test]
    fn subcommand_help_and_version() {
        let req = |a: &[&str]| parse(a.iter().map(OsString::from), env_of(&[]));
        assert!(matches!(req(&["--help"]), Ok(Request::Help(t)) if t == crate::help::MAIN));
        assert!(matches!(req(&["-h"]), Ok(Request::Help(t)) if t == crate::help::MAIN));
        assert!(matches!(req(&["run", "--help"]), Ok(Request::Help(t)) if t == crate::help::RUN));
        assert!(matches!(
            req(&["run", "-w", "2", "-h"]),
            Ok(Request::Help(_))
        ));
        assert!(matches!(req(&["--version"]), Ok(Request::Version)));
        assert!(matches!(req(&["-V"]), Ok(Request::Version)));
        assert_eq!(
            req(&["walk"]).unwrap_err(),
            Usage("unknown subcommand \"walk\"; the subcommands are run and ctl".into())
        );
        assert_eq!(
            req(&[]).unwrap_err(),
            Usage("no subcommand given (run or ctl)".into())
        );
    }

    /// `NODE_CLUSTER_SCHED_POLICY` must name a policy unless `--policy`
    /// (or the file) overrides it.
    #[test]
    fn bad_policy_in_the_environment_is_an_error() {
        let e = with(
            &["run", "--", "x"],
            &[("NODE_CLUSTER_SCHED_POLICY", "robin")],
        )
        .unwrap_err();
        assert_eq!(
            e,
            "NODE_CLUSTER_SCHED_POLICY should be rr, none, reuseport or leastconn. Received \"robin\""
        );
        let a = with(
            &["run", "--", "x"],
            &[("NODE_CLUSTER_SCHED_POLICY", "none")],
        )
        .unwrap();
        assert_eq!(a.policy, SchedulingPolicy::None);
        let a = with(
            &["run", "-p", "rr", "--", "x"],
            &[("NODE_CLUSTER_SCHED_POLICY", "robin")],
        )
        .unwrap();
        assert_eq!(a.policy, SchedulingPolicy::RoundRobin);
    }

    /// `UVCLUSTER_HANDOFF_WINDOW` must be a whole number from 1 to 64;
    /// `WEB_CONCURRENCY` a worker count.
    #[test]
    fn bad_handoff_window_or_concurrency_in_the_environment_is_an_error() {
        let e = with(&["run", "--", "x"], &[("UVCLUSTER_HANDOFF_WINDOW", "0")]).unwrap_err();
        assert_eq!(
            e,
            "UVCLUSTER_HANDOFF_WINDOW should be a whole number from 1 to 64. Received \"0\""
        );
        let a = with(&["run", "--", "x"], &[("UVCLUSTER_HANDOFF_WINDOW", "4")]).unwrap();
        assert_eq!(a.handoff_window, 4);
        let e = with(&["run", "--", "x"], &[("WEB_CONCURRENCY", "lots")]).unwrap_err();
        assert_eq!(
            e,
            "WEB_CONCURRENCY takes a whole number above 0. Received \"lots\""
        );
        let a = with(&["run", "--", "x"], &[("WEB_CONCURRENCY", "3")]).unwrap();
        assert_eq!(a.supervisor.workers, 3);
        let a = with(&["run", "-w", "5", "--", "x"], &[("WEB_CONCURRENCY", "3")]).unwrap();
        assert_eq!(a.supervisor.workers, 5);
    }

    fn file(name: &str, text: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("uvcluster-cli-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join(name);
        std::fs::write(&path, text).unwrap();
        path
    }

    fn with_file(
        path: &Path,
        args: &[&str],
        vars: &'static [(&'static str, &'static str)],
    ) -> Result<RunOptions, String> {
        let mut all = vec![
            "run".to_string(),
            "--config".into(),
            path.display().to_string(),
        ];
        all.extend(args.iter().map(|s| s.to_string()));
        match parse(all.into_iter().map(OsString::from), env_of(vars)) {
            Ok(Request::Run(o)) => Ok(*o),
            Ok(other) => panic!("{other:?}"),
            Err(Usage(m)) => Err(m),
        }
    }

    /// Flags over the file over the environment over the defaults.
    #[test]
    fn precedence_flag_file_environment_default() {
        let f = file(
            "precedence.toml",
            "workers = 3\npolicy = \"none\"\nkill-timeout = \"10s\"\nwait-ready = true\n\
             max-memory = \"1G\"\ncommand = [\"node\", \"app.js\"]\n",
        );
        let a = with_file(
            &f,
            &[],
            &[
                ("WEB_CONCURRENCY", "7"),
                ("NODE_CLUSTER_SCHED_POLICY", "leastconn"),
            ],
        )
        .unwrap();
        assert_eq!(a.supervisor.workers, 3);
        assert_eq!(a.policy, SchedulingPolicy::None);
        assert_eq!(a.supervisor.kill_timeout, Duration::from_secs(10));
        assert_eq!(a.supervisor.ready, ReadyMode::Message);
        assert_eq!(a.supervisor.max_memory, Some(1 << 30));
        assert_eq!(a.command, ["node", "app.js"].map(OsString::from));
        assert_eq!(a.config_file.as_deref(), Some(f.as_path()));
        let a = with_file(
            &f,
            &[
                "-w",
                "2",
                "--kill-timeout=1s",
                "--wait-ready=false",
                "--",
                "other",
            ],
            &[("WEB_CONCURRENCY", "7")],
        )
        .unwrap();
        assert_eq!(a.supervisor.workers, 2);
        assert_eq!(a.supervisor.kill_timeout, Duration::from_secs(1));
        assert_eq!(a.supervisor.ready, ReadyMode::Listening);
        assert_eq!(a.command, [OsString::from("other")]);
        // What the file leaves unset comes from the environment.
        let g = file("partial.toml", "restart = \"never\"\n");
        let a = with_file(&g, &["--", "x"], &[("WEB_CONCURRENCY", "7")]).unwrap();
        assert_eq!(a.supervisor.workers, 7);
        assert_eq!(a.supervisor.restart, RestartPolicy::Never);
    }

    /// `--watch` and `--ignore` repeat and add up; the file takes arrays;
    /// flags replace the file's list; no `--watch`, no watch.
    #[test]
    fn watch_ignore_and_debounce_from_flags_and_file() {
        assert_eq!(p(&["run", "--", "x"]).unwrap().watch, None);
        let a = p(&[
            "run",
            "--watch",
            "src",
            "--watch=app.js",
            "--ignore",
            "*.log",
            "--ignore",
            "dist/**",
            "--watch-debounce",
            "50ms",
            "--",
            "x",
        ])
        .unwrap();
        let w = a.watch.unwrap();
        assert_eq!(w.paths, [PathBuf::from("src"), PathBuf::from("app.js")]);
        assert_eq!(w.ignore, ["*.log", "dist/**"]);
        assert_eq!(w.debounce, Duration::from_millis(50));
        let w = p(&["run", "--watch", ".", "--", "x"])
            .unwrap()
            .watch
            .unwrap();
        assert_eq!(w.debounce, crate::watch::DEFAULT_DEBOUNCE);
        assert!(w.ignore.is_empty());
        assert_eq!(
            p(&["run", "--ignore", "[a", "--", "x"]).unwrap_err(),
            "--ignore should be a glob pattern, such as *.log or dist/** \
             (error parsing glob '[a': unclosed character class; missing ']'). Received \"[a\""
        );
        assert_eq!(
            p(&["run", "--watch", "", "--", "x"]).unwrap_err(),
            "--watch should be a file or directory to watch. Received \"\""
        );
        let f = file(
            "watch.toml",
            "watch = [\"src\", \"lib\"]\nignore = \"*.tmp\"\nwatch-debounce = \"1s\"\n",
        );
        let w = with_file(&f, &["--", "x"], &[]).unwrap().watch.unwrap();
        assert_eq!(w.paths, [PathBuf::from("src"), PathBuf::from("lib")]);
        assert_eq!(w.ignore, ["*.tmp"]);
        assert_eq!(w.debounce, Duration::from_secs(1));
        let w = with_file(&f, &["--watch", "app", "--", "x"], &[])
            .unwrap()
            .watch
            .unwrap();
        assert_eq!(w.paths, [PathBuf::from("app")]);
        let f = file("watch-bad.toml", "watch = [\"src\", 3]\n");
        let e = with_file(&f, &["--", "x"], &[]).unwrap_err();
        assert_eq!(
            e,
            format!(
                "watch in {} should be an array of strings. Received [\"src\", 3]",
                f.display()
            )
        );
    }

    #[test]
    fn file_errors_name_the_key_and_the_file() {
        let f = file("unknown.toml", "workers = 2\nwrokers = 3\n");
        let e = with_file(&f, &["--", "x"], &[]).unwrap_err();
        assert!(
            e.starts_with(&format!(
                "unknown key \"wrokers\" in {}; the keys are workers, policy,",
                f.display()
            )),
            "{e}"
        );
        for (text, want) in [
            (
                "workers = 0",
                "workers in {} takes a whole number above 0. Received \"0\"",
            ),
            (
                "workers = \"two\"",
                "workers in {} takes a whole number above 0. Received \"two\"",
            ),
            (
                "kill-timeout = 30",
                "kill-timeout in {} should be a duration with its unit, such as 500ms, 30s or 2m. Received \"30\"",
            ),
            (
                "policy = \"robin\"",
                "policy in {} should be rr, none, reuseport or leastconn. Received \"robin\"",
            ),
            (
                "wait-ready = \"yes\"",
                "wait-ready in {} should be true or false. Received \"yes\"",
            ),
            // Was accepted as a path and failed at start as `--watch 5`.
            (
                "watch = 5",
                "watch in {} should be a string or an array of strings. Received 5",
            ),
            (
                "ignore = true",
                "ignore in {} should be a string or an array of strings. Received true",
            ),
            (
                "restart = \"sometimes\"",
                "restart in {} should be always, on-failure or never. Received \"sometimes\"",
            ),
        ] {
            let f = file("bad.toml", text);
            let e = with_file(&f, &["--", "x"], &[]).unwrap_err();
            assert_eq!(e, want.replace("{}", &f.display().to_string()), "{text}");
        }
        let f = file("command.toml", "command = \"node app.js\"\n");
        let e = with_file(&f, &[], &[]).unwrap_err();
        assert!(e.starts_with("command in "), "{e}");
        assert!(e.contains("an array of strings"), "{e}");
        let f = file("syntax.toml", "workers = \n");
        let e = with_file(&f, &["--", "x"], &[]).unwrap_err();
        assert!(
            e.starts_with(&format!("{} is not valid TOML", f.display())),
            "{e}"
        );
        let e = with_file(Path::new("/nonexistent/uvcluster.toml"), &["--", "x"], &[]).unwrap_err();
        assert!(
            e.starts_with("cannot read the configuration file /nonexistent/uvcluster.toml"),
            "{e}"
        );
    }
}
