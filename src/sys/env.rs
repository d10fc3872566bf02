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

/// Takes ownership of an fd this process inherited by number (for example
/// the IPC channel at `NODE_CHANNEL_FD`).
///
/// # Errors
///
/// `EBADF` if no such fd is open, `EINVAL` for a negative number.
pub(crate) fn adopt_inherited_fd(fd: RawFd) -> io::Result<OwnedFd> {
    if fd < 0 {
        return Err(io::Error::from_raw_os_error(nix::libc::EINVAL));
    }
    // SAFETY: F_GETFD on any integer is harmless; it only reports whether
    // the descriptor is open.
    if unsafe { nix::libc::fcntl(fd, nix::libc::F_GETFD) } < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the fd is open, and the caller (one adoption per inherited
    // fd, documented on the public API) makes this the only owner.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
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
