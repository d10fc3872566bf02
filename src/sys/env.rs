//! The process environment and inherited fds.

use std::ffi::{OsStr, OsString};
use std::io;
use std::os::fd::{FromRawFd, OwnedFd, RawFd};

/// Reads `name` and removes it from the environment, so that children
/// spawned later do not inherit it (Node removes `NODE_CHANNEL_FD` and
/// friends this way).
pub(crate) fn take_var(name: &OsStr) -> Option<OsString> {
    let v = std::env::var_os(name)?;
    // SAFETY: `remove_var` is unsound only when another thread reads or
    // writes the environment at the same time. Callers document that this
    // is for process start-up, before threads are spawned; the loop itself
    // is single-threaded.
    unsafe { std::env::remove_var(name) };
    Some(v)
}

/// Takes the fd that environment variable `var` names (`uv::take_env_fd`):
/// removes the variable, parses its value as a decimal fd number, checks
/// that the fd is open, and adopts it.
///
/// # Errors
///
/// `InvalidInput` naming the variable for a value that is not an fd
/// number; `EBADF` if the fd is not open.
pub(crate) fn take_env_fd(var: &OsStr) -> io::Result<Option<OwnedFd>> {
    let Some(value) = take_var(var) else {
        return Ok(None);
    };
    let fd: RawFd = value
        .to_str()
        .and_then(|s| s.trim().parse().ok())
        .filter(|&n: &RawFd| n >= 0)
        .ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{}={value:?} is not an fd number", var.to_string_lossy()),
            )
        })?;
    // SAFETY: F_GETFD on any integer is harmless; it only reports whether
    // the descriptor is open.
    if unsafe { nix::libc::fcntl(fd, nix::libc::F_GETFD) } < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the fd is open, and the variable naming it is the parent's
    // statement that it was placed for this process. The variable has just
    // been removed, so this is its one adoption through it; the public
    // `take_env_fd` documents that the number must not be adopted another
    // way too.
    Ok(Some(unsafe { OwnedFd::from_raw_fd(fd) }))
}

/// Duplicates an fd this process has open, by number, into a new
/// CLOEXEC fd that the caller owns; the original stays open and is not
/// adopted (Node's cluster `listen({fd})` names an fd of the primary).
///
/// # Errors
///
/// `EBADF` if no such fd is open, `EINVAL` for a negative number, `EMFILE`.
pub(crate) fn dup_fd_number(fd: RawFd) -> io::Result<OwnedFd> {
    if fd < 0 {
        return Err(io::Error::from_raw_os_error(nix::libc::EINVAL));
    }
    // SAFETY: F_DUPFD_CLOEXEC on any integer is harmless: it fails with
    // EBADF for a closed fd and otherwise makes a new descriptor.
    let new = unsafe { nix::libc::fcntl(fd, nix::libc::F_DUPFD_CLOEXEC, 0) };
    if new < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `new` was just created by fcntl and nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(new) })
}
