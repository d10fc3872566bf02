//! Spawning, killing and reaping child processes (libuv's
//! `src/unix/process.c`).
//!
//! Spawning goes through `std::process::Command`, which forks, reports an
//! `execve` failure synchronously through a CLOEXEC error pipe (so `ENOENT`
//! and `EACCES` come back from `spawn` itself), and reaps a child whose exec
//! failed. What `Command` cannot express runs in a `pre_exec` hook in the
//! child, between `fork` and `exec`, with only async-signal-safe calls:
//! `setsid`, placing fds at arbitrary numbers, marking every fd it did not
//! place `FD_CLOEXEC`, and resetting every signal disposition and the
//! signal mask.

use std::ffi::{OsStr, OsString};
use std::io;
use std::mem;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::Command;

use nix::libc;

use super::signal::NSIG;

/// One fd to place in the child: `source` (a parent fd) becomes `target`.
#[derive(Clone, Copy, Debug)]
pub(crate) struct FdPlan {
    pub(crate) target: RawFd,
    pub(crate) source: RawFd,
    /// Skip it, instead of failing the spawn, if `source` is not open (an
    /// inherited stdio fd the parent does not have).
    pub(crate) optional: bool,
}

/// Everything [`spawn`] needs, borrowed from the caller.
#[derive(Debug)]
pub(crate) struct SpawnSpec<'a> {
    pub(crate) file: &'a OsStr,
    pub(crate) arg0: Option<&'a OsStr>,
    pub(crate) args: &'a [OsString],
    pub(crate) env: Option<&'a [(OsString, OsString)]>,
    pub(crate) cwd: Option<&'a Path>,
    pub(crate) uid: Option<u32>,
    pub(crate) gid: Option<u32>,
    pub(crate) detached: bool,
    /// The fds to place. Every `source` must stay open until `spawn`
    /// returns (the caller owns them).
    pub(crate) fds: Vec<FdPlan>,
}

/// Starts the child and returns its pid once `execve` has succeeded.
///
/// While forking, the calling thread blocks every signal, so the child
/// starts with all signals blocked and runs no handler of ours before its
/// dispositions are reset (libuv does the same around `fork`).
pub(crate) fn spawn(spec: SpawnSpec<'_>) -> io::Result<i32> {
    let mut cmd = Command::new(spec.file);
    if let Some(a0) = spec.arg0 {
        cmd.arg0(a0);
    }
    cmd.args(spec.args);
    if let Some(env) = spec.env {
        cmd.env_clear();
        cmd.envs(env.iter().map(|(k, v)| (k, v)));
    }
    if let Some(cwd) = spec.cwd {
        cmd.current_dir(cwd);
    }
    if let Some(uid) = spec.uid {
        cmd.uid(uid);
    }
    if let Some(gid) = spec.gid {
        cmd.gid(gid);
    }
    let plan = spec.fds;
    let detached = spec.detached;
    // Room for the temporary copies, allocated now: the child must not
    // allocate.
    let mut temps: Vec<RawFd> = vec![-1; plan.len()];
    let above = plan.iter().map(|p| p.target).max().unwrap_or(2).max(2) + 1;
    let unplaced = unplaced_ranges(&plan);
    // SAFETY: the hook runs in the child between fork and exec, where only
    // async-signal-safe functions may be called. `child_setup` calls only
    // setsid, fcntl, dup2, close_range, open, getdents64, close,
    // getrlimit, sigemptyset, sigaction and sigprocmask, and writes to
    // memory allocated before the fork (`plan`, `temps`, `unplaced`) or on
    // its stack. It takes no lock and allocates nothing; its errors are
    // `io::Error::from_raw_os_error`, which does not allocate either.
    unsafe {
        cmd.pre_exec(move || child_setup(&plan, &mut temps, above, &unplaced, detached));
    }
    let old = block_all_signals()?;
    let r = cmd.spawn();
    restore_signal_mask(&old);
    let child = r?;
    // Dropping `Child` neither waits nor kills; the loop reaps the pid.
    Ok(child.id() as i32)
}

fn errno_err() -> io::Error {
    io::Error::from_raw_os_error(nix::errno::Errno::last_raw())
}

/// The fd numbers that `plan` does not place, as inclusive ranges up to
/// `u32::MAX`: everything the child must not keep across `exec`.
fn unplaced_ranges(plan: &[FdPlan]) -> Vec<(u32, u32)> {
    let mut targets: Vec<u32> = plan
        .iter()
        .filter_map(|p| u32::try_from(p.target).ok())
        .collect();
    targets.sort_unstable();
    targets.dedup();
    let mut ranges = Vec::with_capacity(targets.len() + 1);
    let mut next = 0u32;
    for t in targets {
        if t > next {
            ranges.push((next, t - 1));
        }
        next = t + 1;
    }
    ranges.push((next, u32::MAX));
    ranges
}

/// Runs in the child after `fork`: async-signal-safe calls only.
fn child_setup(
    plan: &[FdPlan],
    temps: &mut [RawFd],
    above: RawFd,
    unplaced: &[(u32, u32)],
    detached: bool,
) -> io::Result<()> {
    if detached {
        // SAFETY: setsid is async-signal-safe and takes no pointers.
        if unsafe { libc::setsid() } < 0 {
            return Err(errno_err());
        }
    }
    // First copy every source above the highest target, so that placing
    // one fd never overwrites the source of another (libuv's
    // uv__process_child_init does the same dance).
    for (p, t) in plan.iter().zip(temps.iter_mut()) {
        // SAFETY: fcntl(F_DUPFD_CLOEXEC) is async-signal-safe; a closed
        // source only makes it fail with EBADF.
        let fd = unsafe { libc::fcntl(p.source, libc::F_DUPFD_CLOEXEC, above) };
        if fd < 0 {
            if p.optional && nix::errno::Errno::last_raw() == libc::EBADF {
                *t = -1;
                continue;
            }
            return Err(errno_err());
        }
        *t = fd;
    }
    for (p, &t) in plan.iter().zip(temps.iter()) {
        if t < 0 {
            continue;
        }
        // SAFETY: dup2 is async-signal-safe; both fds are plain integers.
        // The new fd at `target` has FD_CLOEXEC clear, so it survives exec;
        // the temporary copies are CLOEXEC and vanish at exec.
        if unsafe { libc::dup2(t, p.target) } < 0 {
            return Err(errno_err());
        }
    }
    // Only what was placed may cross exec: an fd this process inherited, or
    // one that other code opened without O_CLOEXEC, would otherwise reach
    // the child (libuv relies on uv_disable_stdio_inheritance and on every
    // fd of its own being CLOEXEC; we also close the gap here). Marking,
    // not closing, keeps std's CLOEXEC error pipe working until exec.
    for &(first, last) in unplaced {
        super::fd::cloexec_range(first, last);
    }
    // Reset every disposition: handled signals reset at exec anyway, but
    // ignored ones would stay ignored in the new program.
    // SAFETY: all-zeroes is a valid sigaction (SIG_DFL, empty mask).
    let mut dfl: libc::sigaction = unsafe { mem::zeroed() };
    dfl.sa_sigaction = libc::SIG_DFL;
    for signum in 1..NSIG {
        if signum == libc::SIGKILL || signum == libc::SIGSTOP {
            continue;
        }
        // SAFETY: sigaction is async-signal-safe and `dfl` is initialised.
        if unsafe { libc::sigaction(signum, &dfl, std::ptr::null_mut()) } < 0 {
            reset_reserved(signum);
        }
    }
    // SAFETY: an all-zeroes sigset_t is valid storage for sigemptyset,
    // which is async-signal-safe, as is sigprocmask.
    unsafe {
        let mut empty: libc::sigset_t = mem::zeroed();
        libc::sigemptyset(&mut empty);
        if libc::sigprocmask(libc::SIG_SETMASK, &empty, std::ptr::null_mut()) < 0 {
            return Err(errno_err());
        }
    }
    Ok(())
}

/// The C library refuses to touch the signals it reserves for itself
/// (glibc's 32 and 33), yet a parent may have left them ignored, and an
/// ignored signal stays ignored across `exec`. Ask the kernel directly.
#[cfg(target_os = "linux")]
fn reset_reserved(signum: i32) {
    // The kernel's `struct sigaction` with SIG_DFL, no flags, no restorer
    // and an empty mask is all zeroes, and no larger than 32 bytes on any
    // Linux architecture.
    let dfl = [0u64; 4];
    // SAFETY: rt_sigaction is async-signal-safe; `dfl` is a readable,
    // zeroed kernel sigaction; a null old-action pointer is allowed; the
    // last argument is the kernel's sigset size (64 signals, 8 bytes).
    unsafe {
        libc::syscall(
            libc::SYS_rt_sigaction,
            signum,
            dfl.as_ptr(),
            std::ptr::null_mut::<u64>(),
            mem::size_of::<u64>(),
        )
    };
}

#[cfg(not(target_os = "linux"))]
fn reset_reserved(_signum: i32) {}

fn block_all_signals() -> io::Result<libc::sigset_t> {
    // SAFETY: all-zeroes is valid storage for a sigset_t; sigfillset and
    // pthread_sigmask only write through the valid pointers given.
    unsafe {
        let mut all: libc::sigset_t = mem::zeroed();
        let mut old: libc::sigset_t = mem::zeroed();
        libc::sigfillset(&mut all);
        let r = libc::pthread_sigmask(libc::SIG_SETMASK, &all, &mut old);
        if r != 0 {
            return Err(io::Error::from_raw_os_error(r));
        }
        Ok(old)
    }
}

fn restore_signal_mask(old: &libc::sigset_t) {
    // SAFETY: `old` is the mask pthread_sigmask returned; a null old-mask
    // pointer is allowed.
    unsafe { libc::pthread_sigmask(libc::SIG_SETMASK, old, std::ptr::null_mut()) };
}

/// `kill(2)`.
pub(crate) fn kill(pid: i32, signum: i32) -> io::Result<()> {
    // SAFETY: kill takes no pointers; any pid and signal number are
    // checked by the kernel (EINVAL, ESRCH, EPERM).
    if unsafe { libc::kill(pid, signum) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// `waitpid(pid, WNOHANG)`: `Ok(None)` while the child runs, else its
/// `(exit_status, term_signal)` (libuv's `WEXITSTATUS`/`WTERMSIG` pair).
pub(crate) fn wait_nohang(pid: i32) -> io::Result<Option<(i64, i32)>> {
    let mut status: libc::c_int = 0;
    loop {
        // SAFETY: `status` is a valid, writable int.
        let r = unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG) };
        if r < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        if r == 0 {
            return Ok(None);
        }
        if libc::WIFEXITED(status) {
            return Ok(Some((i64::from(libc::WEXITSTATUS(status)), 0)));
        }
        if libc::WIFSIGNALED(status) {
            return Ok(Some((0, libc::WTERMSIG(status))));
        }
        return Ok(None);
    }
}

/// A connected pair of Unix stream sockets, both CLOEXEC and blocking:
/// the parent makes its end non-blocking when it adopts it; the child's
/// end stays blocking, as programs expect of their stdio (libuv's
/// `uv__process_init_stdio`).
pub(crate) fn stdio_socketpair() -> io::Result<(OwnedFd, OwnedFd)> {
    use nix::sys::socket::{AddressFamily, SockFlag, SockType, socketpair};
    socketpair(
        AddressFamily::Unix,
        SockType::Stream,
        None,
        SockFlag::SOCK_CLOEXEC,
    )
    .map_err(|e| io::Error::from_raw_os_error(e as i32))
}

/// `/dev/null`, read-write and CLOEXEC, for ignored stdio fds.
pub(crate) fn dev_null() -> io::Result<OwnedFd> {
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/null")
        .map(OwnedFd::from)
}

/// The raw number of an fd, for an [`FdPlan`].
pub(crate) fn raw(fd: &impl AsRawFd) -> RawFd {
    fd.as_raw_fd()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan(targets: &[RawFd]) -> Vec<FdPlan> {
        targets
            .iter()
            .map(|&target| FdPlan {
                target,
                source: 0,
                optional: false,
            })
            .collect()
    }

    /// The ranges cover every number the plan does not place, and none
    /// that it does: below, between and above the targets.
    #[test]
    fn unplaced_ranges_are_the_gaps_between_targets() {
        assert_eq!(unplaced_ranges(&plan(&[0, 1, 2])), vec![(3, u32::MAX)]);
        assert_eq!(
            unplaced_ranges(&plan(&[2, 0, 1, 3, 5, 200, 5])),
            vec![(4, 4), (6, 199), (201, u32::MAX)]
        );
        assert_eq!(unplaced_ranges(&plan(&[1, 2])), vec![(0, 0), (3, u32::MAX)]);
        assert_eq!(unplaced_ranges(&plan(&[])), vec![(0, u32::MAX)]);
    }
}
