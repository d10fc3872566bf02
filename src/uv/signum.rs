//! The signal type of the public API: a validated signal number with the
//! POSIX names as constants (what libuv passes as a bare `int signum`).

use std::fmt;
use std::num::NonZeroI32;
use std::str::FromStr;

use nix::libc;

/// A signal number, 1 up to (not including) the kernel's `NSIG` (65 on
/// Linux), so every value is one that can be sent: what
/// [`Loop::signal_start`](crate::uv::Loop::signal_start) watches,
/// [`Loop::process_kill`](crate::uv::Loop::process_kill) and
/// [`kill`](crate::uv::kill) send, and a process's exit callback reports.
///
/// It is a newtype rather than `nix`'s `Signal` enum for two reasons:
/// libuv takes any number below `NSIG`, including the real-time signals
/// (`SIGRTMIN`..`SIGRTMAX`) that `nix`'s enum does not list, and `nix`'s
/// types stay out of this crate's public API. The usual signals are
/// associated constants ([`Signum::SIGTERM`], [`Signum::SIGUSR1`], ...);
/// [`Signum::new`] takes any other number, and the `Display` and `FromStr`
/// forms are the names Node uses (`"SIGTERM"`).
///
/// # Examples
///
/// ```
/// use uvcluster::uv::Signum;
///
/// assert_eq!(Signum::SIGTERM.as_raw(), 15);
/// assert_eq!(Signum::new(10), Some(Signum::SIGUSR1));
/// assert_eq!(Signum::new(0), None); // "no signal" is not a signal
/// assert_eq!("SIGINT".parse::<Signum>(), Ok(Signum::SIGINT));
/// assert_eq!(Signum::SIGHUP.to_string(), "SIGHUP");
/// assert_eq!(Signum::new(40).unwrap().to_string(), "SIG40");
/// ```
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Signum(NonZeroI32);

/// One past the largest signal number (the kernel's `_NSIG`).
const NSIG: i32 = 65;

macro_rules! signals {
    ($($name:ident),* $(,)?) => {
        impl Signum {
            $(
                #[doc = concat!("`", stringify!($name), "`.")]
                pub const $name: Signum = Signum::known(libc::$name);
            )*
        }

        /// The named signals, for `Display` and `FromStr`.
        const NAMES: &[(Signum, &str)] = &[$((Signum::$name, stringify!($name))),*];
    };
}

signals!(
    SIGHUP, SIGINT, SIGQUIT, SIGILL, SIGTRAP, SIGABRT, SIGBUS, SIGFPE, SIGKILL, SIGUSR1, SIGSEGV,
    SIGUSR2, SIGPIPE, SIGALRM, SIGTERM, SIGSTKFLT, SIGCHLD, SIGCONT, SIGSTOP, SIGTSTP, SIGTTIN,
    SIGTTOU, SIGURG, SIGXCPU, SIGXFSZ, SIGVTALRM, SIGPROF, SIGWINCH, SIGIO, SIGPWR, SIGSYS,
);

impl Signum {
    /// A constant's value; `n` is a libc signal constant, so in range.
    const fn known(n: i32) -> Signum {
        match NonZeroI32::new(n) {
            Some(n) => Signum(n),
            None => panic!("signal 0"),
        }
    }

    /// The signal with number `n`, if it is one: `None` for 0 (which
    /// [`kill`](crate::uv::kill) takes as "only check", see there),
    /// negative numbers and numbers from `NSIG` (65) on.
    pub const fn new(n: i32) -> Option<Signum> {
        if n <= 0 || n >= NSIG {
            return None;
        }
        match NonZeroI32::new(n) {
            Some(n) => Some(Signum(n)),
            None => None,
        }
    }

    /// The signal number, as the OS and libuv know it.
    pub const fn as_raw(self) -> i32 {
        self.0.get()
    }

    /// The POSIX name (`"SIGTERM"`), or `None` for a number without one
    /// (a real-time signal).
    pub fn name(self) -> Option<&'static str> {
        NAMES.iter().find(|(s, _)| *s == self).map(|&(_, n)| n)
    }
}

impl fmt::Debug for Signum {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Signum({self})")
    }
}

/// The POSIX name (`SIGTERM`), or `SIG<number>` for a signal without one.
impl fmt::Display for Signum {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.name() {
            Some(n) => f.write_str(n),
            None => write!(f, "SIG{}", self.as_raw()),
        }
    }
}

/// The error for a string or number that names no signal.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BadSignal(pub String);

impl fmt::Display for BadSignal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "unknown signal: {}", self.0)
    }
}

impl std::error::Error for BadSignal {}

impl From<BadSignal> for std::io::Error {
    fn from(e: BadSignal) -> std::io::Error {
        std::io::Error::new(std::io::ErrorKind::InvalidInput, e)
    }
}

/// Parses a name as Node's `process.kill(pid, "SIGTERM")` takes it
/// (`"SIGTERM"`; also `"SIG40"` for an unnamed number), or a bare
/// number (`"15"`).
impl FromStr for Signum {
    type Err = BadSignal;

    fn from_str(s: &str) -> Result<Signum, BadSignal> {
        let bad = || BadSignal(s.to_owned());
        if let Some(&(sig, _)) = NAMES.iter().find(|(_, n)| *n == s) {
            return Ok(sig);
        }
        let digits = s.strip_prefix("SIG").unwrap_or(s);
        if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
            return Err(bad());
        }
        digits.parse().ok().and_then(Signum::new).ok_or_else(bad)
    }
}

impl TryFrom<i32> for Signum {
    type Error = BadSignal;

    fn try_from(n: i32) -> Result<Signum, BadSignal> {
        Signum::new(n).ok_or_else(|| BadSignal(n.to_string()))
    }
}

impl From<Signum> for i32 {
    fn from(s: Signum) -> i32 {
        s.as_raw()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn constants_are_the_os_numbers() {
        assert_eq!(Signum::SIGHUP.as_raw(), libc::SIGHUP);
        assert_eq!(Signum::SIGKILL.as_raw(), 9);
        assert_eq!(Signum::SIGTERM.as_raw(), 15);
        assert_eq!(Signum::SIGCHLD.as_raw(), libc::SIGCHLD);
    }

    #[test]
    fn range_is_one_to_nsig() {
        assert_eq!(Signum::new(0), None);
        assert_eq!(Signum::new(-1), None);
        assert_eq!(Signum::new(65), None);
        assert_eq!(Signum::new(64).map(Signum::as_raw), Some(64));
        assert_eq!(Signum::new(1), Some(Signum::SIGHUP));
        assert!(Signum::try_from(0).is_err());
    }

    #[test]
    fn names_round_trip() {
        for &(sig, name) in NAMES {
            assert_eq!(sig.to_string(), name);
            assert_eq!(name.parse::<Signum>(), Ok(sig));
            assert_eq!(Signum::new(sig.as_raw()), Some(sig));
        }
        assert_eq!("15".parse::<Signum>(), Ok(Signum::SIGTERM));
        assert_eq!("SIG40".parse::<Signum>().map(Signum::as_raw), Ok(40));
        for bad in [
            "", "SIG", "TERM", "sigterm", "SIGFOO", "0", "65", "-1", "+15", "SIG0",
        ] {
            assert_eq!(
                bad.parse::<Signum>(),
                Err(BadSignal(bad.to_owned())),
                "{bad:?}"
            );
        }
    }
}
