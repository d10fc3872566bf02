//! Starting a child with an IPC channel, with the semantics of Node's
//! `child_process.fork` (`lib/child_process.js`).

use std::ffi::{OsStr, OsString};
use std::io;
use std::path::PathBuf;

use super::channel::{Channel, ChannelOptions, NODE_CHANNEL_FD, NODE_CHANNEL_SERIALIZATION_MODE};
use crate::uv::{Handle, Loop, Pipe, Process, ProcessOptions, Signum, Stdio};

/// The exit callback of a forked child: exit status and terminating signal.
pub type ExitCb = Box<dyn FnOnce(&mut Loop, Handle<Process>, i64, Option<Signum>)>;

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
pub struct ForkOptions {
    /// The program to run: Node's `execPath` (default `node`, found in `PATH`).
    pub exec_path: OsString,
    /// Arguments before the module: Node's `execArgv`.
    pub exec_args: Vec<OsString>,
    /// The module (script) path; `None` runs `exec_path` with the args alone.
    pub module: Option<OsString>,
    /// Arguments after the module.
    pub args: Vec<OsString>,
    /// Variables set in the child on top of this process's environment.
    pub env: Vec<(OsString, OsString)>,
    /// Variables removed from the child's environment.
    pub env_remove: Vec<OsString>,
    /// The child's working directory (default: ours).
    pub cwd: Option<PathBuf>,
    /// Node's `silent`: fds 0–2 become pipes instead of inherited. Ignored
    /// when [`stdio`](Self::stdio) is given.
    pub silent: bool,
    /// Node's `stdio` array, one entry per child fd; `None` means
    /// `[inherit, inherit, inherit, ipc]` (or pipes with `silent`).
    pub stdio: Option<Vec<ForkStdio>>,
    /// Run as this user id.
    pub uid: Option<u32>,
    /// Run as this group id.
    pub gid: Option<u32>,
    /// Options for the channel.
    pub channel: ChannelOptions,
    /// Called once the child has exited and been reaped: exit status and
    /// terminating signal, as [`ProcessOptions::on_exit`].
    pub on_exit: Option<ExitCb>,
}

impl std::fmt::Debug for ForkOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ForkOptions")
            .field("exec_path", &self.exec_path)
            .field("exec_args", &self.exec_args)
            .field("module", &self.module)
            .field("args", &self.args)
            .field("env", &self.env)
            .field("cwd", &self.cwd)
            .field("silent", &self.silent)
            .field("stdio", &self.stdio)
            .finish_non_exhaustive()
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
            exec_path: exec_path.as_ref().to_owned(),
            exec_args: Vec::new(),
            module: None,
            args: Vec::new(),
            env: Vec::new(),
            env_remove: Vec::new(),
            cwd: None,
            silent: false,
            stdio: None,
            uid: None,
            gid: None,
            channel: ChannelOptions::default(),
            on_exit: None,
        }
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
/// `InvalidInput` unless exactly one stdio slot is `Ipc`; the spawn error,
/// a [`SpawnError`](crate::uv::SpawnError) naming `exec_path`
/// (`spawn /no/such/cmd ENOENT ...`, kind `NotFound` for a missing
/// program), in which case nothing is left open.
///
/// The child gets its stdio slots and the channel, and no other fd of
/// ours (see [`Loop::spawn`]).
pub fn fork(lp: &mut Loop, opts: ForkOptions) -> io::Result<Forked> {
    let slots = opts.stdio.clone().unwrap_or_else(|| {
        let s = if opts.silent {
            ForkStdio::Pipe
        } else {
            ForkStdio::Inherit
        };
        vec![s, s, s, ForkStdio::Ipc]
    });
    let ipc_index = match slots.iter().filter(|s| **s == ForkStdio::Ipc).count() {
        1 => slots
            .iter()
            .position(|s| *s == ForkStdio::Ipc)
            .expect("counted"),
        _ => {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "fork: stdio needs exactly one 'ipc' slot",
            ));
        }
    };
    let ipc = lp.pipe_init(true);
    let mut pipes: Vec<Option<Handle<Pipe>>> = Vec::with_capacity(slots.len());
    let mut po = ProcessOptions::new(&opts.exec_path)
        .args(&opts.exec_args)
        .args(opts.module.iter())
        .args(&opts.args);
    let mut env: Vec<(OsString, OsString)> = std::env::vars_os()
        .filter(|(k, _)| {
            k != NODE_CHANNEL_FD
                && k != NODE_CHANNEL_SERIALIZATION_MODE
                && !opts.env_remove.contains(k)
                && !opts.env.iter().any(|(ok, _)| ok == k)
        })
        .collect();
    env.extend(opts.env.iter().cloned());
    env.push((NODE_CHANNEL_FD.into(), ipc_index.to_string().into()));
    env.push((NODE_CHANNEL_SERIALIZATION_MODE.into(), "json".into()));
    po = po.env(env);
    if let Some(cwd) = &opts.cwd {
        po = po.cwd(cwd);
    }
    if let Some(uid) = opts.uid {
        po = po.uid(uid);
    }
    if let Some(gid) = opts.gid {
        po = po.gid(gid);
    }
    for (fd, slot) in slots.iter().enumerate() {
        let what = match slot {
            ForkStdio::Inherit => {
                pipes.push(None);
                Stdio::Inherit
            }
            ForkStdio::Ignore => {
                pipes.push(None);
                Stdio::Ignore
            }
            ForkStdio::Ipc => {
                pipes.push(None);
                Stdio::Ipc(ipc)
            }
            ForkStdio::Pipe => {
                let p = lp.pipe_init(false);
                pipes.push(Some(p));
                Stdio::Pipe(p)
            }
        };
        po = po.stdio(fd as i32, what);
    }
    if let Some(cb) = opts.on_exit {
        po = po.on_exit(cb);
    }
    let process = match lp.spawn(po) {
        Ok(p) => p,
        Err(e) => {
            lp.close_if_open(ipc);
            for p in pipes.into_iter().flatten() {
                lp.close_if_open(p);
            }
            return Err(e);
        }
    };
    let channel = match Channel::open(lp, ipc, opts.channel) {
        Ok(c) => c,
        Err(e) => {
            lp.close_if_open(ipc);
            return Err(e);
        }
    };
    Ok(Forked {
        process,
        channel,
        stdio: pipes,
    })
}
