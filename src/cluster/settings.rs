//! Primary settings (`cluster.settings`, `setupPrimary`) and the scheduling
//! policy (`cluster.schedulingPolicy`, `NODE_CLUSTER_SCHED_POLICY`).

use std::ffi::OsString;
use std::path::PathBuf;

use crate::ipc::ForkStdio;

/// How a primary spreads connections over workers.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum SchedulingPolicy {
    /// Node's `SCHED_RR` (the default on Linux): the primary accepts and
    /// hands each connection to the next free worker.
    RoundRobin,
    /// Node's `SCHED_NONE`: the primary binds, every worker listens and
    /// accepts on the shared socket, and the kernel picks.
    None,
    /// Beyond Node: the primary binds one `SO_REUSEPORT` socket per worker
    /// on the same address and gives each worker its own; the kernel
    /// spreads connections over the sockets by hash. Linux only: elsewhere
    /// (where `SO_REUSEPORT` does not spread connections) a worker's TCP
    /// `listen` fails with `EOPNOTSUPP`; where the kernel lacks it, with
    /// the `setsockopt` error. TCP only: UDP and Unix sockets are shared as
    /// under [`None`](Self::None).
    ReusePort,
    /// Beyond Node: the primary accepts and hands each connection to the
    /// worker with the fewest open connections, as workers report them
    /// (Rust workers do, batched with their accept replies; a Node worker's
    /// load is what the primary has handed it).
    LeastConnections,
}

impl SchedulingPolicy {
    /// Parses a policy name as `NODE_CLUSTER_SCHED_POLICY` spells it: Node's
    /// `rr` and `none`, and our `reuseport` and `leastconn`.
    pub fn parse(s: &str) -> Option<SchedulingPolicy> {
        match s {
            "rr" => Some(SchedulingPolicy::RoundRobin),
            "none" => Some(SchedulingPolicy::None),
            "reuseport" => Some(SchedulingPolicy::ReusePort),
            "leastconn" => Some(SchedulingPolicy::LeastConnections),
            _ => None,
        }
    }

    /// The name `NODE_CLUSTER_SCHED_POLICY` uses.
    pub fn as_str(self) -> &'static str {
        match self {
            SchedulingPolicy::RoundRobin => "rr",
            SchedulingPolicy::None => "none",
            SchedulingPolicy::ReusePort => "reuseport",
            SchedulingPolicy::LeastConnections => "leastconn",
        }
    }

    /// The policy from `NODE_CLUSTER_SCHED_POLICY`; anything else (or
    /// nothing) gives round-robin, as Node does on non-Windows systems.
    pub fn from_env() -> SchedulingPolicy {
        std::env::var("NODE_CLUSTER_SCHED_POLICY")
            .ok()
            .and_then(|s| SchedulingPolicy::parse(&s))
            .unwrap_or(SchedulingPolicy::RoundRobin)
    }
}

/// How the primary starts workers (`cluster.settings`). Each field left
/// `None` in a `Primary::setup_primary`
/// call keeps its earlier value; repeated calls merge.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Settings {
    /// The program to run (Node's `process.execPath`). Default: this
    /// process's own executable.
    pub exec_path: Option<OsString>,
    /// Node's `exec`: the script passed after `exec_argv` (`node` workers
    /// need it; a Rust worker binary does not). Default: none.
    pub exec: Option<OsString>,
    /// Arguments after `exec`. Default: this process's arguments.
    pub args: Option<Vec<OsString>>,
    /// Arguments before `exec` (Node's `execArgv`). Default: none.
    pub exec_argv: Option<Vec<OsString>>,
    /// The workers' working directory. Default: the primary's.
    pub cwd: Option<PathBuf>,
    /// Variables set in every worker, on top of the primary's environment.
    pub env: Option<Vec<(OsString, OsString)>>,
    /// Pipe the workers' stdio to the primary instead of inheriting it.
    pub silent: Option<bool>,
    /// The workers' stdio slots; one must be `Ipc`.
    pub stdio: Option<Vec<ForkStdio>>,
    /// Run workers as this user id.
    pub uid: Option<u32>,
    /// Run workers as this group id.
    pub gid: Option<u32>,
    /// The scheduling policy; frozen at the first `setup_primary` or `fork`.
    /// Default: [`SchedulingPolicy::from_env`].
    pub scheduling_policy: Option<SchedulingPolicy>,
}

impl Settings {
    /// Merges `other` over `self`: fields set in `other` win.
    pub fn merge(&mut self, other: Settings) {
        macro_rules! take {
            ($($f:ident),*) => {$( if other.$f.is_some() { self.$f = other.$f; } )*};
        }
        take!(
            exec_path,
            exec,
            args,
            exec_argv,
            cwd,
            env,
            silent,
            stdio,
            uid,
            gid,
            scheduling_policy
        );
    }
}
