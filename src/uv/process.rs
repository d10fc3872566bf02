//! Child processes (libuv's `src/unix/process.c`).
//!
//! [`Loop::spawn`] starts a child and returns a [`Handle<Process>`] that is
//! active until the child is reaped. Reaping follows libuv: every loop that
//! has spawned a child keeps an internal, unreferenced signal watcher on
//! `SIGCHLD` (not visible to [`Loop::walk`]), started before the first fork
//! so no exit can be missed. On `SIGCHLD` the loop calls
//! `waitpid(pid, WNOHANG)` for each of *its own* running children, never
//! `waitpid(-1)`, so it never steals a child that another loop or library
//! spawned. A reaped process becomes inactive (it is not closed: call
//! [`Loop::close`]) and its exit callback runs with the exit status and
//! the terminating signal.
//!
//! Only the fds that a spawn places on purpose cross `exec`: the child
//! marks every other fd `FD_CLOEXEC` before it execs. A process that
//! inherited fds it should not pass on (a parent's listening socket, a
//! build tool's jobserver pipe) calls [`disable_stdio_inheritance`] at
//! start-up, as Node does, so that no other spawner in the process
//! (`std::process::Command`, a C library) passes them on either. A spawn
//! that fails returns a [`SpawnError`] naming the program.

use std::ffi::{OsStr, OsString};
use std::io;
use std::os::fd::{BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};

use super::errno::Errno;
use super::event_loop::{Data, Loop, einval};
use super::handle::{Handle, Pipe, Process, RawHandle, flags};
use super::signal::{self, SignalState};
use super::signum::Signum;
use super::stream::{Sock, stream_ref};
use crate::sys;
use crate::sys::process::{FdPlan, SpawnSpec};

/// The exit callback of a child ([`ProcessOptions::on_exit`]): exit
/// status and terminating signal (`None` if it exited).
pub type ExitCb = Box<dyn FnOnce(&mut Loop, Handle<Process>, i64, Option<Signum>)>;

/// The parent's end of a stdio pipe, and the handle it is to be opened in.
type ParentEnd = (Handle<Pipe>, OwnedFd);

/// Per-loop process state: this loop's children, reaped on SIGCHLD.
#[derive(Default)]
pub(crate) struct LoopProcesses {
    /// Process handles whose child has not been reaped yet.
    live: Vec<RawHandle>,
    /// The internal SIGCHLD watcher (libuv's `loop->child_watcher`).
    sigchld: Option<RawHandle>,
}

/// The state of a process handle.
pub(crate) struct ProcessState {
    pid: i32,
    /// Reaped: later kills fail with ESRCH (libuv's `UV_HANDLE_ESRCH`).
    exited: bool,
    exit_cb: Option<ExitCb>,
}

/// What the child gets at one fd number (libuv's `uv_stdio_container_t`).
#[derive(Debug)]
pub enum Stdio<'a> {
    /// The child's fd is the parent's fd of the same number.
    Inherit,
    /// Fds 0, 1 and 2 get `/dev/null`; higher fds are left closed
    /// (`UV_IGNORE`). This is what fds not given to
    /// [`ProcessOptions::stdio`] get.
    Ignore,
    /// A new Unix socketpair: the child gets one end, and the other is
    /// opened into this pipe handle, which must have no socket yet
    /// (`UV_CREATE_PIPE`). The child's end is blocking.
    Pipe(Handle<Pipe>),
    /// Like [`Stdio::Pipe`], for a pipe created with `pipe_init(true)`, so
    /// that fds can be passed to and from the child (Node's IPC channel).
    Ipc(Handle<Pipe>),
    /// One of our fds, duplicated into the child (`UV_INHERIT_FD`). It
    /// stays open in the parent.
    Fd(BorrowedFd<'a>),
}

/// How to start a child: what [`Loop::spawn`] takes (libuv's
/// `uv_process_options_t`), built like `std::process::Command` or set
/// field by field. Layers above nest it rather than repeat its fields:
/// [`ipc::ForkOptions`](crate::ipc::ForkOptions) holds one for the spawn
/// under the channel.
///
/// # Examples
///
/// ```
/// use uvcluster::uv::{ProcessOptions, Stdio};
///
/// let opts = ProcessOptions::new("sh")
///     .args(["-c", "exit 3"])
///     .env([("PATH", "/usr/bin:/bin")])
///     .stdio(2, Stdio::Inherit)
///     .on_exit(|lp, p, status, signal| {
///         assert_eq!((status, signal), (3, None));
///         lp.close(p, |_| {}).unwrap();
///     });
/// # let _ = opts;
/// ```
pub struct ProcessOptions<'a> {
    /// The program, found in `PATH` if it has no slash ([`new`](Self::new)).
    pub file: OsString,
    /// `argv[0]`; by default the file name ([`arg0`](Self::arg0)).
    pub arg0: Option<OsString>,
    /// The arguments after `argv[0]` ([`args`](Self::args)).
    pub args: Vec<OsString>,
    /// Exactly the child's environment; `None` inherits ours
    /// ([`env`](Self::env)).
    pub env: Option<Vec<(OsString, OsString)>>,
    /// The child's working directory; `None` is ours ([`cwd`](Self::cwd)).
    pub cwd: Option<PathBuf>,
    /// Run as this user id ([`uid`](Self::uid)).
    pub uid: Option<u32>,
    /// Run as this group id ([`gid`](Self::gid)).
    pub gid: Option<u32>,
    /// Start in a new session ([`detached`](Self::detached)).
    pub detached: bool,
    /// What the child gets at each fd number, from 0
    /// ([`stdio`](Self::stdio)); missing ones are [`Stdio::Ignore`].
    pub stdio: Vec<Stdio<'a>>,
    /// The exit callback ([`on_exit`](Self::on_exit)).
    pub on_exit: Option<ExitCb>,
}

impl std::fmt::Debug for ProcessOptions<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProcessOptions")
            .field("file", &self.file)
            .field("arg0", &self.arg0)
            .field("args", &self.args)
            .field("env", &self.env)
            .field("cwd", &self.cwd)
            .field("uid", &self.uid)
            .field("gid", &self.gid)
            .field("detached", &self.detached)
            .field("stdio", &self.stdio)
            .field("on_exit", &self.on_exit.is_some())
            .finish()
    }
}

impl<'a> ProcessOptions<'a> {
    /// Options to run `file`, found in `PATH` if it has no slash (as
    /// `execvp` does; with [`env`](Self::env) given, its `PATH` is used).
    /// By default `argv[0]` is `file`, there are no other arguments, the
    /// environment and working directory are inherited, and fds 0 to 2 are
    /// `/dev/null` ([`Stdio::Ignore`]).
    pub fn new(file: impl AsRef<OsStr>) -> Self {
        ProcessOptions {
            file: file.as_ref().to_owned(),
            arg0: None,
            args: Vec::new(),
            env: None,
            cwd: None,
            uid: None,
            gid: None,
            detached: false,
            stdio: Vec::new(),
            on_exit: None,
        }
    }

    /// Sets `argv[0]` (libuv's `args[0]`); by default it is the file name.
    pub fn arg0(mut self, arg0: impl AsRef<OsStr>) -> Self {
        self.arg0 = Some(arg0.as_ref().to_owned());
        self
    }

    /// Appends one argument after `argv[0]`.
    pub fn arg(mut self, arg: impl AsRef<OsStr>) -> Self {
        self.args.push(arg.as_ref().to_owned());
        self
    }

    /// Appends arguments after `argv[0]`.
    pub fn args<I, S>(mut self, args: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        self.args
            .extend(args.into_iter().map(|a| a.as_ref().to_owned()));
        self
    }

    /// Gives the child exactly this environment, nothing inherited. Without
    /// this call the child inherits ours.
    pub fn env<I, K, V>(mut self, vars: I) -> Self
    where
        I: IntoIterator<Item = (K, V)>,
        K: AsRef<OsStr>,
        V: AsRef<OsStr>,
    {
        self.env = Some(
            vars.into_iter()
                .map(|(k, v)| (k.as_ref().to_owned(), v.as_ref().to_owned()))
                .collect(),
        );
        self
    }

    /// The child's working directory; by default ours.
    pub fn cwd(mut self, dir: impl AsRef<Path>) -> Self {
        self.cwd = Some(dir.as_ref().to_owned());
        self
    }

    /// Runs the child as this user id (`UV_PROCESS_SETUID`).
    pub fn uid(mut self, uid: u32) -> Self {
        self.uid = Some(uid);
        self
    }

    /// Runs the child as this group id (`UV_PROCESS_SETGID`).
    pub fn gid(mut self, gid: u32) -> Self {
        self.gid = Some(gid);
        self
    }

    /// Starts the child in a new session with `setsid`, so it leads its own
    /// process group and has no controlling terminal
    /// (`UV_PROCESS_DETACHED`). The handle still reaps it.
    pub fn detached(mut self, on: bool) -> Self {
        self.detached = on;
        self
    }

    /// Sets what the child gets at fd number `fd` (any number, such as 3
    /// for an IPC channel). Fds not given are [`Stdio::Ignore`]: 0 to 2
    /// are `/dev/null`, higher ones closed.
    ///
    /// # Panics
    ///
    /// If `fd` is negative.
    pub fn stdio(mut self, fd: i32, what: Stdio<'a>) -> Self {
        let fd = usize::try_from(fd).expect("a child fd number is not negative");
        while self.stdio.len() <= fd {
            self.stdio.push(Stdio::Ignore);
        }
        self.stdio[fd] = what;
        self
    }

    /// The exit callback (`exit_cb`): it runs once the child has been
    /// reaped, with its exit status (0 if a signal killed it) and the
    /// signal that terminated it (`None` if it exited; libuv's 0). The
    /// handle is then
    /// inactive but not closed. Without it, the handle just becomes
    /// inactive.
    pub fn on_exit(
        mut self,
        cb: impl FnOnce(&mut Loop, Handle<Process>, i64, Option<Signum>) + 'static,
    ) -> Self {
        self.on_exit = Some(Box::new(cb));
        self
    }
}

fn state_mut(lp: &mut Loop, raw: RawHandle) -> io::Result<&mut ProcessState> {
    match &mut lp.slot_mut(raw)?.data {
        Data::Process(p) => Ok(p),
        _ => unreachable!("a Handle<Process> always names a process slot"),
    }
}

fn state_ref(lp: &Loop, raw: RawHandle) -> io::Result<&ProcessState> {
    match &lp.slot(raw)?.data {
        Data::Process(p) => Ok(p),
        _ => unreachable!("a Handle<Process> always names a process slot"),
    }
}

/// Starts the internal SIGCHLD watcher if it is not running.
fn start_sigchld(lp: &mut Loop) -> io::Result<()> {
    let raw = match lp.processes.sigchld {
        Some(raw) => raw,
        None => {
            let raw = lp.insert(Data::Signal(SignalState::new()));
            lp.slot_mut(raw)?.flags |= flags::INTERNAL;
            lp.set_ref(raw, false)?;
            lp.processes.sigchld = Some(raw);
            raw
        }
    };
    if lp.slot(raw)?.flags & flags::ACTIVE != 0 {
        return Ok(());
    }
    signal::start_raw(
        lp,
        raw,
        nix::libc::SIGCHLD,
        false,
        Box::new(|lp, _, _| wait_children(lp)),
    )
}

/// Stops the SIGCHLD watcher once no child of this loop is left to reap.
fn maybe_stop_sigchld(lp: &mut Loop) {
    if lp.processes.live.is_empty()
        && let Some(raw) = lp.processes.sigchld
    {
        signal::stop_raw(lp, raw);
    }
}

/// `uv__wait_children`: reap this loop's children that have exited, then
/// run their exit callbacks.
fn wait_children(lp: &mut Loop) {
    let mut done = Vec::new();
    for &raw in &lp.processes.live {
        let Ok(p) = state_ref(lp, raw) else { continue };
        // ECHILD: someone else reaped it; like libuv, skip it.
        if let Ok(Some((status, sig))) = sys::process::wait_nohang(p.pid) {
            done.push((raw, status, sig));
        }
    }
    if done.is_empty() {
        return;
    }
    lp.processes
        .live
        .retain(|r| !done.iter().any(|(d, _, _)| d == r));
    let mut cbs = Vec::with_capacity(done.len());
    for &(raw, status, sig) in &done {
        lp.deactivate(raw);
        if let Ok(p) = state_mut(lp, raw) {
            p.exited = true;
            cbs.push((raw, p.exit_cb.take(), status, sig));
        }
    }
    maybe_stop_sigchld(lp);
    for (raw, cb, status, sig) in cbs {
        // A callback earlier in this batch may have closed this handle.
        if lp.is_closing(Handle::<Process>::from_raw(raw)) {
            continue;
        }
        if let Some(cb) = cb {
            cb(lp, Handle::from_raw(raw), status, Signum::new(sig));
        }
    }
}

pub(crate) fn close_now(lp: &mut Loop, raw: RawHandle) {
    // The child is not killed (libuv neither); if it is still running it
    // will not be reaped by this loop.
    lp.processes.live.retain(|&r| r != raw);
    if let Ok(p) = state_mut(lp, raw) {
        p.exit_cb = None;
    }
    maybe_stop_sigchld(lp);
}

/// Checks every stdio pipe before anything is created: each can receive
/// a socket, and none is used twice.
fn check_stdio_pipes(lp: &Loop, stdio: &[Stdio<'_>]) -> io::Result<()> {
    let mut seen = Vec::new();
    for s in stdio {
        if let Stdio::Pipe(h) | Stdio::Ipc(h) = s {
            check_stdio_pipe(lp, *h, matches!(s, Stdio::Ipc(_)))?;
            if seen.contains(h) {
                return Err(einval("spawn: a pipe handle is used twice"));
            }
            seen.push(*h);
        }
    }
    Ok(())
}

/// Checks that `h` is a pipe handle that can receive a socket.
fn check_stdio_pipe(lp: &Loop, h: Handle<Pipe>, ipc: bool) -> io::Result<()> {
    if lp.is_closing(h) {
        return Err(einval("spawn: stdio pipe is closing"));
    }
    let s = stream_ref(lp, h.raw)?;
    if !matches!(s.sock, Sock::Unset) {
        return Err(einval("spawn: stdio pipe already has a socket"));
    }
    if ipc && !s.ipc {
        return Err(einval(
            "spawn: Stdio::Ipc needs a pipe created with ipc = true",
        ));
    }
    Ok(())
}

impl Loop {
    /// Starts a child process (`uv_spawn`) and returns its handle, active
    /// until the child is reaped.
    ///
    /// Reaping follows libuv: the loop keeps an internal, unreferenced
    /// `SIGCHLD` watcher (invisible to [`walk`](Loop::walk)), started before
    /// the first fork, and on `SIGCHLD` calls `waitpid(pid, WNOHANG)` for
    /// each of its own running children, never `waitpid(-1)`, so children
    /// spawned by others are left alone. A reaped process becomes inactive
    /// but is not closed, and its [exit callback](ProcessOptions::on_exit)
    /// runs. Closing a process handle does not kill the child.
    ///
    /// The child gets the fds that `options` places, at the numbers given,
    /// and no other: between `fork` and `exec` it marks every fd it did not
    /// place `FD_CLOEXEC` (`close_range` with `CLOSE_RANGE_CLOEXEC` where
    /// the kernel has it, else a walk of `/proc/self/fd`), so an fd this
    /// process inherited or that other code opened without `O_CLOEXEC`
    /// does not leak into the child. It also gets a fresh session if
    /// [`detached`](ProcessOptions::detached), and every signal disposition
    /// reset to `SIG_DFL` with an empty signal mask. Pipe handles named by
    /// [`Stdio::Pipe`] and [`Stdio::Ipc`] are opened on success and can be
    /// read and written at once.
    ///
    /// # Examples
    ///
    /// ```no_run
    /// use uvcluster::uv::{Loop, ProcessOptions, RunMode, Stdio};
    ///
    /// let mut lp = Loop::new()?;
    /// let out = lp.pipe_init(false);
    /// let child = lp.spawn(
    ///     ProcessOptions::new("echo")
    ///         .arg("hello")
    ///         .stdio(1, Stdio::Pipe(out))
    ///         .on_exit(|lp, p, status, _signal| {
    ///             println!("exited with {status}");
    ///             lp.close(p, |_| {}).unwrap();
    ///         }),
    /// )?;
    /// println!("pid {}", lp.process_pid(child)?);
    /// lp.read_start(out, |lp, out, data| match data {
    ///     Ok(d) if !d.is_empty() => print!("{}", String::from_utf8_lossy(d)),
    ///     _ => lp.close(out, |_| {}).unwrap(),
    /// })?;
    /// lp.run(RunMode::Default)?;
    /// # Ok::<(), std::io::Error>(())
    /// ```
    ///
    /// # Errors
    ///
    /// Returned synchronously, and then no handle exists and the exit
    /// callback is dropped. Errors from the OS are a [`SpawnError`] that
    /// names the program (`spawn /no/such/cmd ENOENT (No such file or
    /// directory)`, Node's message), with the OS error's kind; get the
    /// errno with [`SpawnError::of`]: `ENOENT` or `EACCES` when the file
    /// cannot be executed, other `execve`, `fork`, `chdir`,
    /// `setuid`/`setgid`, socketpair or fd placement errors, and
    /// `InvalidInput` for a NUL byte in an argument. Bad options are plain
    /// `EINVAL` errors: a pipe handle that is stale, closing, already has
    /// a socket, is used twice, or (for [`Stdio::Ipc`]) is not in IPC
    /// mode.
    pub fn spawn(&mut self, options: ProcessOptions<'_>) -> io::Result<Handle<Process>> {
        let ProcessOptions {
            file,
            arg0,
            args,
            env,
            cwd,
            uid,
            gid,
            detached,
            mut stdio,
            on_exit,
        } = options;
        while stdio.len() < 3 {
            stdio.push(Stdio::Ignore);
        }
        check_stdio_pipes(self, &stdio)?;
        let spec = SpawnSpec {
            file: &file,
            arg0: arg0.as_deref(),
            args: &args,
            env: env.as_deref(),
            cwd: cwd.as_deref(),
            uid,
            gid,
            detached,
            fds: Vec::new(),
        };
        let spawned = self.spawn_checked(spec, stdio);
        let (pid, our_ends) = spawned.map_err(|error| SpawnError::wrap(&file, error))?;
        self.open_parent_ends(our_ends);
        Ok(self.track_child(pid, on_exit))
    }

    /// Opens the parent's end of each stdio pipe into its handle.
    fn open_parent_ends(&mut self, our_ends: Vec<ParentEnd>) {
        for (h, fd) in our_ends {
            // The handle was checked before the spawn and this is a fresh
            // connected Unix socket, so this does not fail; if it ever did,
            // the child must still be tracked and reaped, so go on.
            if let Err(e) = self.pipe_open(h, fd) {
                log::error!("spawn: opening the parent's end of a stdio pipe failed: {e}");
            }
        }
    }

    /// Makes the active process handle of a child just started, reaped
    /// by this loop.
    fn track_child(&mut self, pid: i32, on_exit: Option<ExitCb>) -> Handle<Process> {
        let raw = self.insert(Data::Process(Box::new(ProcessState {
            pid,
            exited: false,
            exit_cb: on_exit,
        })));
        self.activate(raw);
        self.processes.live.push(raw);
        Handle::from_raw(raw)
    }

    /// The part of [`spawn`](Loop::spawn) after the options were checked:
    /// every error here comes from the OS and is wrapped in a
    /// [`SpawnError`] by the caller. Returns the pid and the parent's ends
    /// of the stdio pipes, not yet opened into their handles.
    fn spawn_checked(
        &mut self,
        mut spec: SpawnSpec<'_>,
        stdio: Vec<Stdio<'_>>,
    ) -> io::Result<(i32, Vec<ParentEnd>)> {
        // Fds we own until the child has its copies.
        let mut child_ends: Vec<OwnedFd> = Vec::new();
        let mut our_ends: Vec<ParentEnd> = Vec::new();
        let mut null: Option<OwnedFd> = None;
        let mut fds = Vec::new();
        for (target, s) in stdio.iter().enumerate() {
            let target = target as i32;
            match s {
                Stdio::Inherit => fds.push(FdPlan {
                    target,
                    source: target,
                    optional: true,
                }),
                Stdio::Ignore if target <= 2 => {
                    if null.is_none() {
                        null = Some(sys::process::dev_null()?);
                    }
                    fds.push(FdPlan {
                        target,
                        source: sys::process::raw(null.as_ref().expect("just opened")),
                        optional: false,
                    });
                }
                Stdio::Ignore => {}
                Stdio::Pipe(h) | Stdio::Ipc(h) => {
                    let (ours, theirs) = sys::process::stdio_socketpair()?;
                    fds.push(FdPlan {
                        target,
                        source: sys::process::raw(&theirs),
                        optional: false,
                    });
                    child_ends.push(theirs);
                    our_ends.push((*h, ours));
                }
                Stdio::Fd(fd) => fds.push(FdPlan {
                    target,
                    source: sys::process::raw(fd),
                    optional: false,
                }),
            }
        }
        // Watch SIGCHLD before forking, so an exit that comes at once is
        // not missed (libuv starts its child watcher first, too).
        start_sigchld(self)?;
        spec.fds = fds;
        let spawned = sys::process::spawn(spec);
        drop(child_ends);
        drop(null);
        match spawned {
            Ok(pid) => Ok((pid, our_ends)),
            Err(e) => {
                maybe_stop_sigchld(self);
                Err(e)
            }
        }
    }

    /// Sends `signum` to the child (`uv_process_kill`): a [`Signum`], or
    /// `None` (libuv's signal 0) to only check that it can be signalled.
    ///
    /// # Errors
    ///
    /// A stale id; `ESRCH` once the child has been reaped (its pid may
    /// belong to another process by then); `EPERM`.
    pub fn process_kill(
        &mut self,
        h: Handle<Process>,
        signum: impl Into<Option<Signum>>,
    ) -> io::Result<()> {
        let p = state_ref(self, h.raw)?;
        if p.exited {
            return Err(io::Error::from_raw_os_error(nix::libc::ESRCH));
        }
        sys::process::kill(p.pid, signum.into().map_or(0, Signum::as_raw))
    }

    /// The child's pid (`uv_process_get_pid`). It stays readable after the
    /// child has been reaped.
    ///
    /// # Errors
    ///
    /// A stale id.
    pub fn process_pid(&self, h: Handle<Process>) -> io::Result<i32> {
        Ok(state_ref(self, h.raw)?.pid)
    }

    /// Whether the child has been reaped (its exit callback has run or is
    /// about to).
    ///
    /// # Errors
    ///
    /// A stale id.
    pub fn process_exited(&self, h: Handle<Process>) -> io::Result<bool> {
        Ok(state_ref(self, h.raw)?.exited)
    }
}

/// Sends `signum` to process `pid` (`uv_kill`): a plain `kill(2)`, so
/// `pid` 0 or negative names a process group as usual. `None` (libuv's
/// signal 0) sends nothing and only checks that the process exists and
/// may be signalled.
///
/// # Examples
///
/// ```
/// use uvcluster::uv::{Signum, kill};
///
/// // No signal: only checks that the process exists.
/// kill(std::process::id() as i32, None)?;
/// // SIGCONT to ourselves does nothing visible.
/// kill(std::process::id() as i32, Signum::SIGCONT)?;
/// # Ok::<(), std::io::Error>(())
/// ```
///
/// # Errors
///
/// `ESRCH` for no such process, `EPERM` when not allowed.
pub fn kill(pid: i32, signum: impl Into<Option<Signum>>) -> io::Result<()> {
    sys::process::kill(pid, signum.into().map_or(0, Signum::as_raw))
}

/// Why [`Loop::spawn`] failed: the program it tried to start and the OS
/// error, as Node reports `spawn /no/such/cmd ENOENT` (`lib/internal/
/// child_process.js` builds its `ErrnoException` with the syscall
/// `spawn <file>`).
///
/// `spawn` returns it inside an [`io::Error`] of the same
/// [`ErrorKind`](io::ErrorKind) as the OS error (`NotFound` for
/// `ENOENT`), whose message names the program; since such an `io::Error`
/// has no [`raw_os_error`](io::Error::raw_os_error) of its own, get the
/// errno with [`SpawnError::of`] and [`raw_os_error`](Self::raw_os_error).
///
/// # Examples
///
/// ```
/// use uvcluster::uv::{Loop, ProcessOptions, SpawnError};
///
/// let mut lp = Loop::new()?;
/// let err = lp.spawn(ProcessOptions::new("/no/such/cmd")).unwrap_err();
/// assert_eq!(err.kind(), std::io::ErrorKind::NotFound);
/// assert!(err.to_string().starts_with("spawn /no/such/cmd ENOENT"));
/// let spawn = SpawnError::of(&err).expect("a spawn error");
/// assert_eq!(spawn.file(), "/no/such/cmd");
/// assert_eq!(spawn.raw_os_error(), Some(2));
/// assert_eq!(spawn.code().as_deref(), Some("ENOENT"));
/// # Ok::<(), std::io::Error>(())
/// ```
#[derive(Debug)]
pub struct SpawnError {
    file: OsString,
    error: io::Error,
}

impl SpawnError {
    /// Wraps `error`, from starting `file`, into an `io::Error` of the
    /// same kind whose message names `file`.
    fn wrap(file: &OsStr, error: io::Error) -> io::Error {
        io::Error::new(
            error.kind(),
            SpawnError {
                file: file.to_owned(),
                error,
            },
        )
    }

    /// The `SpawnError` inside an error returned by [`Loop::spawn`] (or by
    /// `ipc::fork` and `cluster::Primary::fork`, which pass it on), or
    /// `None` for an error of another kind (an invalid stdio pipe, say).
    pub fn of(error: &io::Error) -> Option<&SpawnError> {
        error.get_ref()?.downcast_ref()
    }

    /// The program that could not be started, as given to
    /// [`ProcessOptions::new`].
    pub fn file(&self) -> &OsStr {
        &self.file
    }

    /// The OS error itself.
    pub fn os_error(&self) -> &io::Error {
        &self.error
    }

    /// The errno (`ENOENT` is 2), when the error came from the OS.
    pub fn raw_os_error(&self) -> Option<i32> {
        self.error.raw_os_error()
    }

    /// The errno's name (`"ENOENT"`), Node's `err.code`, when the error
    /// came from the OS.
    pub fn code(&self) -> Option<String> {
        self.errno().filter(|e| e.is_known()).map(Errno::code)
    }

    /// The errno, when the error came from the OS.
    pub fn errno(&self) -> Option<Errno> {
        Errno::of(&self.error)
    }
}

impl std::fmt::Display for SpawnError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let file = self.file.to_string_lossy();
        match (self.code(), self.errno()) {
            // Node's message, then the OS's words for it.
            (Some(code), Some(e)) => write!(f, "spawn {file} {code} ({})", e.description()),
            _ => write!(f, "spawn {file}: {}", self.error),
        }
    }
}

impl std::error::Error for SpawnError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&self.error)
    }
}

/// Marks every fd above 2 that this process has open `FD_CLOEXEC`, so
/// that no program this process starts, by any means, inherits an fd it
/// was not given on purpose (libuv's `uv_disable_stdio_inheritance`, which
/// Node calls at start-up in `src/node.cc`). The fds stay open and usable
/// here; only `exec` drops them.
///
/// Call it at start-up, before anything opens an fd that must be
/// inherited without being placed: the cluster primary
/// ([`cluster::Primary::setup_primary`](crate::cluster::Primary::setup_primary))
/// and `uvcluster run` call it for you. [`Loop::spawn`] marks every fd it
/// does not place in the child anyway; this covers what the process
/// inherited from its own parent (a listening socket, a jobserver pipe)
/// for every other spawner in the process (`std::process::Command`, a C
/// library). An fd meant to reach a child, such as a socket-activation
/// socket, is passed by placing it ([`Stdio::Inherit`] at its number, or
/// [`Stdio::Fd`]).
///
/// Unlike libuv, fds 0 to 2 are left inheritable (other spawners, such as
/// `std::process::Command`, hand them to children by leaving them in
/// place), and every higher fd is marked, not only those up to the first
/// gap past 15. It uses `close_range(3, ~0, CLOSE_RANGE_CLOEXEC)` where
/// the kernel has it (Linux 5.11), and otherwise walks `/proc/self/fd`.
///
/// # Examples
///
/// ```
/// // At the top of main, before spawning anything.
/// uvcluster::uv::disable_stdio_inheritance();
/// ```
pub fn disable_stdio_inheritance() {
    sys::fd::cloexec_range(3, u32::MAX);
}
