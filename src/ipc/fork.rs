//! Starting a child with an IPC channel, with the semantics of Node's
//! `child_process.fork` (`lib/child_process.js`).

use std::cell::Cell;
use std::ffi::{OsStr, OsString};
use std::io;
use std::rc::Rc;

use super::channel::{Channel, ChannelOptions, NODE_CHANNEL_FD, NODE_CHANNEL_SERIALIZATION_MODE};
use crate::uv::{Handle, Loop, Pipe, Process, ProcessOptions, Signum, Stdio};

/// The exit callback of a forked child: exit status and terminating signal
/// ([`ProcessOptions::on_exit`]).
pub use crate::uv::ExitCb;

/// What the child gets at one stdio slot of [`ForkOptions::stdio`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ForkStdio {
    /// The parent's fd of the same number.
    Inherit,
    /// `/dev/null` for 0–2, closed above.
    Ignore,
    /// A pipe the parent can read or write ([`Forked::stdio`]).
    Pipe,
    /// The IPC channel; exactly one slot must be `Ipc`.
    Ipc,
}

/// Options of [`fork`], named after Node's `child_process.fork` options.
///
/// The spawn underneath is a [`ProcessOptions`], held as it is: what a
/// fork adds (the module and `execArgv` around the arguments, variables
/// set on top of the environment, the stdio slots and the channel) is
/// here; everything else goes to [`Loop::spawn`] untouched.
///
/// # Examples
///
/// ```no_run
/// use uvcluster::ipc::{ForkOptions, fork};
/// use uvcluster::uv::Loop;
///
/// let mut lp = Loop::new()?;
/// let mut opts = ForkOptions::node("child.js");
/// opts.process.args = vec!["--verbose".into()];
/// opts.process.cwd = Some("/srv/app".into());
/// opts.env = vec![("MODE".into(), "test".into())];
/// opts.process.on_exit = Some(Box::new(|lp, p, status, signal| {
///     println!("child exited: {status} {signal:?}");
///     lp.close(p, |_| {}).unwrap();
/// }));
/// let child = fork(&mut lp, opts)?;
/// # let _ = child;
/// # Ok::<(), std::io::Error>(())
/// ```
pub struct ForkOptions {
    /// The spawn: `file` is the program (Node's `execPath`), `args` the
    /// arguments after the module, and `arg0`, `cwd`, `uid`, `gid`,
    /// `detached` and the exit callback (called once the child has exited
    /// and been reaped) are passed on as they are. Its `env`, when set, is
    /// the environment the fork's variables go on instead of this
    /// process's. Its `stdio` must stay empty: the child's slots are
    /// [`stdio`](Self::stdio).
    pub process: ProcessOptions<'static>,
    /// Arguments before the module: Node's `execArgv`.
    pub exec_args: Vec<OsString>,
    /// The module (script) path; `None` runs the program with the args alone.
    pub module: Option<OsString>,
    /// Variables set in the child on top of the environment.
    pub env: Vec<(OsString, OsString)>,
    /// Variables removed from the child's environment.
    pub env_remove: Vec<OsString>,
    /// Node's `silent`: fds 0–2 become pipes instead of inherited. Ignored
    /// when [`stdio`](Self::stdio) is given.
    pub silent: bool,
    /// Node's `stdio` array, one entry per child fd; `None` means
    /// `[inherit, inherit, inherit, ipc]` (or pipes with `silent`).
    pub stdio: Option<Vec<ForkStdio>>,
    /// Options for the channel.
    pub channel: ChannelOptions,
}

impl std::fmt::Debug for ForkOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ForkOptions")
            .field("process", &self.process)
            .field("exec_args", &self.exec_args)
            .field("module", &self.module)
            .field("env", &self.env)
            .field("env_remove", &self.env_remove)
            .field("silent", &self.silent)
            .field("stdio", &self.stdio)
            .field("channel", &self.channel)
            .finish()
    }
}

impl ForkOptions {
    /// Options to run `node module` (Node's defaults).
    pub fn node(module: impl AsRef<OsStr>) -> ForkOptions {
        ForkOptions {
            module: Some(module.as_ref().to_owned()),
            ..ForkOptions::exec("node")
        }
    }

    /// Options to run a program directly, with no module argument (a Rust
    /// worker, say). argv is `[exec_path, ...exec_args, ...args]`.
    pub fn exec(exec_path: impl AsRef<OsStr>) -> ForkOptions {
        ForkOptions {
            process: ProcessOptions::new(exec_path),
            exec_args: Vec::new(),
            module: None,
            env: Vec::new(),
            env_remove: Vec::new(),
            silent: false,
            stdio: None,
            channel: ChannelOptions::default(),
        }
    }

    /// The stdio slots and the index of the `ipc` one.
    fn slots(&self) -> io::Result<(Vec<ForkStdio>, usize)> {
        let slots = self.stdio.clone().unwrap_or_else(|| {
            let s = if self.silent {
                ForkStdio::Pipe
            } else {
                ForkStdio::Inherit
            };
            vec![s, s, s, ForkStdio::Ipc]
        });
        let mut ipc = slots
            .iter()
            .enumerate()
            .filter(|(_, s)| **s == ForkStdio::Ipc);
        match (ipc.next(), ipc.next()) {
            (Some((i, _)), None) => Ok((slots, i)),
            _ => Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "fork: stdio needs exactly one 'ipc' slot",
            )),
        }
    }

    /// The child's environment: the base (ours unless `process.env` is
    /// set) without the channel's variables of our own channel and
    /// without `env_remove`, then `env`, then the new channel's.
    fn child_env(&mut self, ipc_index: usize) -> Vec<(OsString, OsString)> {
        let base = match self.process.env.take() {
            Some(env) => env,
            None => std::env::vars_os().collect(),
        };
        let mut env: Vec<(OsString, OsString)> = base
            .into_iter()
            .filter(|(k, _)| {
                k != NODE_CHANNEL_FD
                    && k != NODE_CHANNEL_SERIALIZATION_MODE
                    && !self.env_remove.contains(k)
                    && !self.env.iter().any(|(ok, _)| ok == k)
            })
            .collect();
        env.append(&mut self.env);
        env.push((NODE_CHANNEL_FD.into(), ipc_index.to_string().into()));
        env.push((NODE_CHANNEL_SERIALIZATION_MODE.into(), "json".into()));
        env
    }
}

/// A child started by [`fork`].
#[derive(Debug)]
pub struct Forked {
    /// The process handle (close it after it exits).
    pub process: Handle<Process>,
    /// The IPC channel to the child.
    pub channel: Channel,
    /// The parent's end of each [`ForkStdio::Pipe`] slot, by child fd.
    pub stdio: Vec<Option<Handle<Pipe>>>,
}

/// Starts a child with an IPC channel (`child_process.fork`): a socketpair
/// whose child end sits at the `ipc` slot's fd number, which the child finds
/// in `NODE_CHANNEL_FD`, with `NODE_CHANNEL_SERIALIZATION_MODE=json`. argv is
/// `[exec_path, ...exec_args, module, ...args]`.
///
/// # Errors
///
/// `InvalidInput` unless exactly one stdio slot is `Ipc`, or when
/// `process.stdio` is not empty; the spawn error, a
/// [`SpawnError`](crate::uv::SpawnError) naming the program
/// (`spawn /no/such/cmd ENOENT ...`, kind `NotFound` for a missing
/// program); or the error of opening the channel once the child runs. In
/// every case nothing is left open: a child already started is killed
/// (`SIGKILL`) and reaped by the loop, its exit callback dropped unrun.
///
/// The child gets its stdio slots and the channel, and no other fd of
/// ours (see [`Loop::spawn`]).
pub fn fork(lp: &mut Loop, opts: ForkOptions) -> io::Result<Forked> {
    fork_with(lp, opts, Channel::open)
}

/// [`fork`], with the step that opens the channel given, so that its
/// failure can be tested.
fn fork_with(
    lp: &mut Loop,
    mut opts: ForkOptions,
    open_channel: impl FnOnce(&mut Loop, Handle<Pipe>, ChannelOptions) -> io::Result<Channel>,
) -> io::Result<Forked> {
    let (slots, ipc_index) = opts.slots()?;
    if !opts.process.stdio.is_empty() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "fork: give the child's stdio as ForkOptions::stdio, not process.stdio",
        ));
    }
    let env = opts.child_env(ipc_index);
    let ipc = lp.pipe_init(true);
    let pipes = stdio_pipes(lp, &slots);
    let abandoned = Rc::new(Cell::new(false));
    let mut process = opts.process;
    process.args = argv_after_program(opts.exec_args, opts.module, process.args);
    process.env = Some(env);
    process.stdio = stdio_plan(&slots, ipc, &pipes);
    process.on_exit = Some(unless_abandoned(process.on_exit, abandoned.clone()));
    let process = match lp.spawn(process) {
        Ok(p) => p,
        Err(e) => {
            close_pipes(lp, ipc, pipes);
            return Err(e);
        }
    };
    match open_channel(lp, ipc, opts.channel) {
        Ok(channel) => Ok(Forked {
            process,
            channel,
            stdio: pipes,
        }),
        Err(e) => {
            abandon(lp, process, &abandoned);
            close_pipes(lp, ipc, pipes);
            Err(e)
        }
    }
}

/// `[...exec_args, module?, ...args]`: what follows the program in argv.
fn argv_after_program(
    exec_args: Vec<OsString>,
    module: Option<OsString>,
    args: Vec<OsString>,
) -> Vec<OsString> {
    exec_args.into_iter().chain(module).chain(args).collect()
}

/// A new pipe handle for each [`ForkStdio::Pipe`] slot, by child fd.
fn stdio_pipes(lp: &mut Loop, slots: &[ForkStdio]) -> Vec<Option<Handle<Pipe>>> {
    slots
        .iter()
        .map(|s| (*s == ForkStdio::Pipe).then(|| lp.pipe_init(false)))
        .collect()
}

/// What [`Loop::spawn`] places at each child fd.
fn stdio_plan(
    slots: &[ForkStdio],
    ipc: Handle<Pipe>,
    pipes: &[Option<Handle<Pipe>>],
) -> Vec<Stdio<'static>> {
    slots
        .iter()
        .zip(pipes)
        .map(|(slot, pipe)| match (slot, pipe) {
            (ForkStdio::Inherit, _) => Stdio::Inherit,
            (ForkStdio::Ignore, _) => Stdio::Ignore,
            (ForkStdio::Ipc, _) => Stdio::Ipc(ipc),
            (ForkStdio::Pipe, Some(p)) => Stdio::Pipe(*p),
            (ForkStdio::Pipe, None) => unreachable!("stdio_pipes made a pipe for each Pipe slot"),
        })
        .collect()
}

/// The exit callback given to the spawn: the caller's, unless the fork
/// failed after the spawn; then it only closes the process handle, once
/// the loop has reaped the child.
fn unless_abandoned(cb: Option<ExitCb>, abandoned: Rc<Cell<bool>>) -> ExitCb {
    Box::new(move |lp, process, status, signal| {
        if abandoned.get() {
            lp.close_if_open(process);
        } else if let Some(cb) = cb {
            cb(lp, process, status, signal);
        }
    })
}

/// The fork failed after the spawn: end the child, which has no channel.
/// The loop reaps it and its exit callback (see [`unless_abandoned`])
/// closes the handle; the caller's callback is dropped unrun, as after any
/// call that returns an error.
fn abandon(lp: &mut Loop, process: Handle<Process>, abandoned: &Cell<bool>) {
    abandoned.set(true);
    if let Err(e) = lp.process_kill(process, Signum::SIGKILL) {
        // ESRCH: it has exited already and is being reaped.
        log::debug!("fork: killing the child whose channel failed: {e}");
    }
}

/// Closes the channel's pipe and the stdio pipes of a failed fork.
fn close_pipes(lp: &mut Loop, ipc: Handle<Pipe>, pipes: Vec<Option<Handle<Pipe>>>) {
    for p in std::iter::once(ipc).chain(pipes.into_iter().flatten()) {
        lp.close_if_open(p);
    }
}

#[cfg(test)]
mod tests {
    //! The fork's error path once the child runs. Opening a channel on the
    //! pipe a spawn has just connected does not fail in practice, so the
    //! failure is injected; the child, its pipes and the loop are real.
    use super::*;
    use crate::uv::RunMode;

    #[test]
    fn a_channel_that_fails_to_open_leaves_no_child_and_no_pipe() {
        let mut lp = Loop::new().unwrap();
        let ran = Rc::new(Cell::new(false));
        let mut opts = ForkOptions::exec("sleep");
        opts.process.args = vec!["30".into()];
        opts.silent = true; // three stdio pipes as well as the channel
        let r = ran.clone();
        opts.process.on_exit = Some(Box::new(move |_, _, _, _| r.set(true)));
        let started = std::time::Instant::now();
        let err = fork_with(&mut lp, opts, |_, _, _| {
            Err(io::Error::other("injected: the channel does not open"))
        })
        .unwrap_err();
        assert_eq!(err.to_string(), "injected: the channel does not open");
        // A watchdog, unreferenced: the loop must end by itself, once the
        // killed child is reaped and every handle closed.
        let wd = lp.timer_init();
        lp.timer_start(
            wd,
            std::time::Duration::from_secs(10),
            std::time::Duration::ZERO,
            |_, _| panic!("the child was not reaped"),
        )
        .unwrap();
        lp.unref_handle(wd).unwrap();
        lp.run(RunMode::Default).unwrap();
        lp.close(wd, |_| {}).unwrap();
        lp.run(RunMode::Default).unwrap();
        assert!(started.elapsed() < std::time::Duration::from_secs(10));
        assert_eq!(lp.handle_count(), 0, "the process and the pipes are closed");
        assert!(!ran.get(), "the caller's exit callback is dropped unrun");
    }

    #[test]
    fn the_arguments_and_the_environment_a_fork_gives() {
        let mut opts = ForkOptions::node("app.js");
        opts.exec_args = vec!["--inspect".into()];
        opts.process.args = vec!["a".into()];
        opts.process.env = Some(vec![
            ("KEEP".into(), "1".into()),
            ("DROP".into(), "1".into()),
            ("SET".into(), "old".into()),
            (NODE_CHANNEL_FD.into(), "9".into()),
        ]);
        opts.env_remove = vec!["DROP".into()];
        opts.env = vec![("SET".into(), "new".into())];
        let env = opts.child_env(3);
        let env: Vec<(&str, &str)> = env
            .iter()
            .map(|(k, v)| (k.to_str().unwrap(), v.to_str().unwrap()))
            .collect();
        assert_eq!(
            env,
            [
                ("KEEP", "1"),
                ("SET", "new"),
                (NODE_CHANNEL_FD, "3"),
                (NODE_CHANNEL_SERIALIZATION_MODE, "json")
            ]
        );
        let argv = argv_after_program(opts.exec_args, opts.module, opts.process.args);
        assert_eq!(argv, ["--inspect", "app.js", "a"]);
        let two_ipc = ForkOptions {
            stdio: Some(vec![ForkStdio::Ipc, ForkStdio::Ipc]),
            ..ForkOptions::exec("x")
        };
        assert_eq!(
            two_ipc.slots().unwrap_err().kind(),
            io::ErrorKind::InvalidInput
        );
        let silent = ForkOptions {
            silent: true,
            ..ForkOptions::exec("x")
        };
        assert_eq!(
            silent.slots().unwrap(),
            (
                vec![
                    ForkStdio::Pipe,
                    ForkStdio::Pipe,
                    ForkStdio::Pipe,
                    ForkStdio::Ipc
                ],
                3
            )
        );
    }
}
