//! Socket activation: the fds a service manager passed with `LISTEN_FDS`,
//! `LISTEN_PID` and `LISTEN_FDNAMES` (systemd's `sd_listen_fds(3)` and
//! `sd_listen_fds_with_names(3)`, with `unset_environment` set).
//!
//! The protocol: the fds start at 3 (`SD_LISTEN_FDS_START`) and there are
//! `LISTEN_FDS` of them; they are for this process only if `LISTEN_PID` is
//! its pid (a child that inherited the variables must not take them);
//! `LISTEN_FDNAMES` is a colon-separated list of one name per fd (each
//! `unknown` when the variable is missing). The variables are removed from
//! the environment whatever the outcome, so that no child inherits them,
//! and every fd taken is made `FD_CLOEXEC`.

use std::ffi::OsString;
use std::fmt;
use std::io;
use std::os::fd::{FromRawFd, OwnedFd, RawFd};

/// The first fd of the passed ones (`SD_LISTEN_FDS_START`).
pub(crate) const LISTEN_FDS_START: RawFd = 3;

/// More than this many passed fds is refused as a bad `LISTEN_FDS` (systemd
/// itself never passes more than a few hundred; a huge number is garbage).
const MAX_LISTEN_FDS: u32 = 4096;

/// Why the socket-activation variables could not be used. Each case names
/// the variable and the value found, as `sd_listen_fds` would refuse them
/// (it returns `-EINVAL` or `-EBADF`).
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum ListenFdsError {
    /// `LISTEN_PID` is not a process id.
    BadPid(OsString),
    /// `LISTEN_FDS` is not a whole number from 0 to 4096.
    BadCount(OsString),
    /// `LISTEN_FDNAMES` does not hold one name per fd.
    NamesMismatch {
        /// `LISTEN_FDS`.
        fds: usize,
        /// The names in `LISTEN_FDNAMES`.
        names: usize,
    },
    /// Fd `fd` is not open, or could not be made `FD_CLOEXEC` (the errno).
    BadFd {
        /// The fd number.
        fd: RawFd,
        /// The OS error number.
        errno: i32,
    },
}

impl fmt::Display for ListenFdsError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ListenFdsError::BadPid(v) => write!(f, "LISTEN_PID={v:?} is not a process id"),
            ListenFdsError::BadCount(v) => {
                write!(
                    f,
                    "LISTEN_FDS={v:?} is not a number of fds from 0 to {MAX_LISTEN_FDS}"
                )
            }
            ListenFdsError::NamesMismatch { fds, names } => write!(
                f,
                "LISTEN_FDNAMES has {names} name(s) for LISTEN_FDS={fds} fd(s)"
            ),
            ListenFdsError::BadFd { fd, errno } => write!(
                f,
                "socket activation: fd {fd} (from LISTEN_FDS) is unusable: {}",
                io::Error::from_raw_os_error(*errno)
            ),
        }
    }
}

impl std::error::Error for ListenFdsError {}

impl From<ListenFdsError> for io::Error {
    fn from(e: ListenFdsError) -> io::Error {
        io::Error::new(io::ErrorKind::InvalidInput, e)
    }
}

/// The pure half of `sd_listen_fds_with_names`: from the three variables'
/// values and this process's pid, how many fds are ours and their names.
/// `Ok(None)` when the fds are not for this process (no `LISTEN_PID`, or
/// another pid's, or no `LISTEN_FDS`).
pub(crate) fn parse(
    pid: Option<&OsString>,
    count: Option<&OsString>,
    names: Option<&OsString>,
    our_pid: u32,
) -> Result<Option<Vec<String>>, ListenFdsError> {
    let Some(pid) = pid else { return Ok(None) };
    let listen_pid: u32 = pid
        .to_str()
        .and_then(|s| s.parse().ok())
        .filter(|&p| p > 0)
        .ok_or_else(|| ListenFdsError::BadPid(pid.clone()))?;
    if listen_pid != our_pid {
        return Ok(None);
    }
    let Some(count) = count else { return Ok(None) };
    let n: u32 = count
        .to_str()
        .filter(|s| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()))
        .and_then(|s| s.parse().ok())
        .filter(|&n| n <= MAX_LISTEN_FDS)
        .ok_or_else(|| ListenFdsError::BadCount(count.clone()))?;
    let n = n as usize;
    let names: Vec<String> = match names {
        // As sd_listen_fds_with_names: an empty element is an empty name.
        Some(v) => v.to_string_lossy().split(':').map(str::to_owned).collect(),
        None => vec!["unknown".to_owned(); n],
    };
    if names.len() != n {
        return Err(ListenFdsError::NamesMismatch {
            fds: n,
            names: names.len(),
        });
    }
    Ok(Some(names))
}

/// Takes the fds passed for socket activation: reads and removes
/// `LISTEN_PID`, `LISTEN_FDS` and `LISTEN_FDNAMES`, and, if they are for
/// this process, adopts fds 3 to 3 + n − 1 as `OwnedFd`s made `FD_CLOEXEC`,
/// each with its name. An empty list when there is nothing for us.
///
/// Removing the variables is unsound if another thread reads or writes
/// the environment at the same time (see [`super::env::take_var`]); it is
/// meant for process start-up (the first `Loop::new`).
///
/// # Errors
///
/// A [`ListenFdsError`]: a variable that does not parse, a name count that
/// does not match, or an fd that is not open. No fd is adopted then (the
/// ones checked before the bad one stay open and unowned, as
/// `sd_listen_fds` leaves them).
pub(crate) fn take_listen_fds() -> Result<Vec<(OwnedFd, String)>, ListenFdsError> {
    let var = |name: &str| std::env::var_os(name);
    let (pid, count, names) = (var("LISTEN_PID"), var("LISTEN_FDS"), var("LISTEN_FDNAMES"));
    if pid.is_none() && count.is_none() && names.is_none() {
        return Ok(Vec::new());
    }
    for name in ["LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"] {
        super::env::take_var(name.as_ref());
    }
    let Some(names) = parse(
        pid.as_ref(),
        count.as_ref(),
        names.as_ref(),
        std::process::id(),
    )?
    else {
        return Ok(Vec::new());
    };
    // Check every fd before adopting any, so an error leaves no OwnedFd
    // that would close an fd when dropped.
    for (i, _) in names.iter().enumerate() {
        let fd = LISTEN_FDS_START + i as RawFd;
        set_cloexec(fd).map_err(|errno| ListenFdsError::BadFd { fd, errno })?;
    }
    Ok(names
        .into_iter()
        .enumerate()
        .map(|(i, name)| {
            let fd = LISTEN_FDS_START + i as RawFd;
            // SAFETY: `fd` is open (checked above), and `LISTEN_PID` naming
            // this process is the service manager's statement that fds 3
            // to 3 + LISTEN_FDS - 1 were placed for it. The variables were
            // removed before this, so this is the only adoption through
            // them; nothing else in the crate adopts fds by these numbers.
            (unsafe { OwnedFd::from_raw_fd(fd) }, name)
        })
        .collect())
}

/// Sets `FD_CLOEXEC` on `fd`, which may be any number: the errno if it is
/// not open.
fn set_cloexec(fd: RawFd) -> Result<(), i32> {
    // SAFETY: F_GETFD and F_SETFD on any integer are harmless: they fail
    // with EBADF for a number that is not open, and otherwise only read or
    // set the close-on-exec flag of that descriptor.
    let flags = unsafe { nix::libc::fcntl(fd, nix::libc::F_GETFD) };
    if flags < 0 {
        return Err(io::Error::last_os_error().raw_os_error().unwrap_or(0));
    }
    if flags & nix::libc::FD_CLOEXEC == 0 {
        // SAFETY: as above.
        let r = unsafe { nix::libc::fcntl(fd, nix::libc::F_SETFD, flags | nix::libc::FD_CLOEXEC) };
        if r < 0 {
            return Err(io::Error::last_os_error().raw_os_error().unwrap_or(0));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn os(s: &str) -> OsString {
        s.into()
    }

    #[test]
    fn parse_follows_sd_listen_fds() {
        // Not for us: no LISTEN_PID, another pid, no LISTEN_FDS.
        assert_eq!(parse(None, Some(&os("1")), None, 7), Ok(None));
        assert_eq!(parse(Some(&os("8")), Some(&os("1")), None, 7), Ok(None));
        assert_eq!(parse(Some(&os("7")), None, None, 7), Ok(None));
        // Ours, default names.
        assert_eq!(
            parse(Some(&os("7")), Some(&os("2")), None, 7),
            Ok(Some(vec!["unknown".to_owned(), "unknown".to_owned()]))
        );
        assert_eq!(
            parse(Some(&os("7")), Some(&os("2")), Some(&os("web:")), 7),
            Ok(Some(vec!["web".to_owned(), String::new()]))
        );
        assert_eq!(
            parse(Some(&os("7")), Some(&os("0")), None, 7),
            Ok(Some(vec![]))
        );
    }

    #[test]
    fn parse_refuses_garbage_with_a_typed_error() {
        assert_eq!(
            parse(Some(&os("x")), Some(&os("1")), None, 7),
            Err(ListenFdsError::BadPid(os("x")))
        );
        assert_eq!(
            parse(Some(&os("0")), Some(&os("1")), None, 7),
            Err(ListenFdsError::BadPid(os("0")))
        );
        for bad in ["", "-1", "+1", "1x", "99999"] {
            assert_eq!(
                parse(Some(&os("7")), Some(&os(bad)), None, 7),
                Err(ListenFdsError::BadCount(os(bad))),
                "{bad:?}"
            );
        }
        let e = parse(Some(&os("7")), Some(&os("2")), Some(&os("a")), 7).unwrap_err();
        assert_eq!(e, ListenFdsError::NamesMismatch { fds: 2, names: 1 });
        assert_eq!(
            e.to_string(),
            "LISTEN_FDNAMES has 1 name(s) for LISTEN_FDS=2 fd(s)"
        );
    }
}
