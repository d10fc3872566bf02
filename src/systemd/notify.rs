//! [`Notifier`]: `sd_notify(3)` and `sd_watchdog_enabled(3)` on the loop.

use std::ffi::{OsStr, OsString};
use std::fmt;
use std::io;
use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::sync::Arc;
use std::time::Duration;

use crate::sys;
use crate::uv::{Handle, Loop, Timer};

/// A bad systemd notification variable, naming it and the value found.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum NotifyEnvError {
    /// `NOTIFY_SOCKET` is neither an absolute path nor `@` and an abstract
    /// name.
    BadSocket(OsString),
    /// `WATCHDOG_USEC` is not a whole number of microseconds above 0.
    BadWatchdogUsec(OsString),
    /// `WATCHDOG_PID` is not a process id.
    BadWatchdogPid(OsString),
}

impl fmt::Display for NotifyEnvError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            NotifyEnvError::BadSocket(v) => write!(
                f,
                "NOTIFY_SOCKET={v:?} is neither an absolute path nor an abstract name (@...)"
            ),
            NotifyEnvError::BadWatchdogUsec(v) => write!(
                f,
                "WATCHDOG_USEC={v:?} is not a whole number of microseconds above 0"
            ),
            NotifyEnvError::BadWatchdogPid(v) => {
                write!(f, "WATCHDOG_PID={v:?} is not a process id")
            }
        }
    }
}

impl std::error::Error for NotifyEnvError {}

impl From<NotifyEnvError> for io::Error {
    fn from(e: NotifyEnvError) -> io::Error {
        io::Error::new(io::ErrorKind::InvalidInput, e)
    }
}

#[derive(Debug)]
struct Target {
    sock: UnixDatagram,
    addr: SocketAddr,
}

/// Sends state changes to the service manager (`sd_notify(3)`): `READY=1`,
/// `RELOADING=1`, `STOPPING=1`, `STATUS=`, `WATCHDOG=1`.
///
/// A notifier is a socket and the manager's address; cloning it is cheap
/// and clones share the socket. One made where `NOTIFY_SOCKET` is unset
/// ([`Notifier::disabled`]) sends nothing and every call succeeds, so a
/// program need not check. Each call is one non-blocking datagram: a
/// manager that does not read makes the call fail (`WouldBlock`) rather
/// than stall the loop; the caller logs it and goes on.
///
/// # Examples
///
/// ```no_run
/// use uvcluster::systemd::Notifier;
/// use uvcluster::uv::Loop;
///
/// let mut lp = Loop::new()?;
/// let notify = Notifier::from_env()?; // once, at start-up
/// notify.start_watchdog(&mut lp)?; // WATCHDOG=1 if WATCHDOG_USEC asks
/// // ... once the service is up:
/// notify.ready()?;
/// notify.status("4 workers")?;
/// # Ok::<(), std::io::Error>(())
/// ```
#[derive(Clone, Debug, Default)]
pub struct Notifier {
    target: Option<Arc<Target>>,
    watchdog: Option<Duration>,
}

impl Notifier {
    /// A notifier that sends nothing (no service manager).
    pub fn disabled() -> Notifier {
        Notifier::default()
    }

    /// The notifier the service manager asked for: `NOTIFY_SOCKET` names
    /// its socket (an absolute path, or `@name` for an abstract name), and
    /// `WATCHDOG_USEC` its watchdog interval, which applies only if
    /// `WATCHDOG_PID` is unset or this process's pid
    /// (`sd_watchdog_enabled(3)`). The three variables are removed from the
    /// environment, so that workers spawned later neither inherit them nor
    /// notify in the primary's place: call it once, at start-up before
    /// any thread is spawned, and clone the result. Without `NOTIFY_SOCKET`
    /// the notifier is [disabled](Self::disabled).
    ///
    /// # Errors
    ///
    /// `InvalidInput` wrapping a [`NotifyEnvError`] for a variable that
    /// does not parse; the socket's creation error (`EMFILE`).
    pub fn from_env() -> io::Result<Notifier> {
        let take = |name: &str| sys::env::take_var(OsStr::new(name));
        let (socket, usec, pid) = (
            take("NOTIFY_SOCKET"),
            take("WATCHDOG_USEC"),
            take("WATCHDOG_PID"),
        );
        let Some(socket) = socket else {
            return Ok(Notifier::disabled());
        };
        let n = Notifier::to_socket(&socket)?;
        match watchdog_from(usec.as_ref(), pid.as_ref(), std::process::id())? {
            Some(d) => Ok(n.with_watchdog(d)),
            None => Ok(n),
        }
    }

    /// A notifier for the socket `addr`, written as `NOTIFY_SOCKET` is: an
    /// absolute path, or `@name` for an abstract name. It has no watchdog.
    ///
    /// # Errors
    ///
    /// `InvalidInput` wrapping [`NotifyEnvError::BadSocket`] for another
    /// form; the socket's creation error.
    pub fn to_socket(addr: impl AsRef<OsStr>) -> io::Result<Notifier> {
        let value = addr.as_ref();
        let addr = sys::notify::notify_addr(value)
            .map_err(|_| NotifyEnvError::BadSocket(value.to_owned()))?;
        Ok(Notifier {
            target: Some(Arc::new(Target {
                sock: sys::notify::notify_socket()?,
                addr,
            })),
            watchdog: None,
        })
    }

    /// The same notifier with a watchdog interval (what `WATCHDOG_USEC`
    /// says): [`start_watchdog`](Self::start_watchdog) pings at half of it.
    pub fn with_watchdog(mut self, interval: Duration) -> Notifier {
        self.watchdog = Some(interval);
        self
    }

    /// Whether this notifier sends anything.
    pub fn is_enabled(&self) -> bool {
        self.target.is_some()
    }

    /// The watchdog interval the service manager asked for, if any (and
    /// if the notifier is enabled).
    pub fn watchdog_interval(&self) -> Option<Duration> {
        self.watchdog.filter(|_| self.is_enabled())
    }

    /// Sends `READY=1`: start-up (or a reload) is complete.
    ///
    /// # Errors
    ///
    /// The send error (`ECONNREFUSED`, `ENOENT`, `WouldBlock`).
    pub fn ready(&self) -> io::Result<()> {
        self.send("READY=1\n")
    }

    /// Sends `RELOADING=1` with `MONOTONIC_USEC=` the current
    /// `CLOCK_MONOTONIC` time in microseconds, as `Type=notify-reload`
    /// requires at the start of a reload; send [`ready`](Self::ready) when
    /// it is over.
    ///
    /// # Errors
    ///
    /// The send error.
    pub fn reloading(&self) -> io::Result<()> {
        if !self.is_enabled() {
            return Ok(());
        }
        let now = sys::notify::monotonic_usec()?;
        self.send(&format!("RELOADING=1\nMONOTONIC_USEC={now}\n"))
    }

    /// Sends `STOPPING=1`: the service is shutting down.
    ///
    /// # Errors
    ///
    /// The send error.
    pub fn stopping(&self) -> io::Result<()> {
        self.send("STOPPING=1\n")
    }

    /// Sends `STATUS=text`, a one-line status shown by `systemctl status`.
    ///
    /// # Errors
    ///
    /// `InvalidInput` for a text with a newline (it would end the
    /// assignment and start another); the send error.
    pub fn status(&self, text: &str) -> io::Result<()> {
        if text.contains('\n') {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "STATUS= text must be one line",
            ));
        }
        self.send(&format!("STATUS={text}\n"))
    }

    /// Sends `WATCHDOG=1`: the service is alive.
    ///
    /// # Errors
    ///
    /// The send error.
    pub fn watchdog(&self) -> io::Result<()> {
        self.send("WATCHDOG=1\n")
    }

    /// Starts a repeating, unreferenced loop timer that sends `WATCHDOG=1`
    /// every half [`watchdog_interval`](Self::watchdog_interval), as
    /// `sd_watchdog_enabled(3)` advises, and returns it (close it to stop
    /// the pings). A ping from the loop proves the loop turns: a primary
    /// stuck in a callback misses its pings and the service manager
    /// restarts it. A failed ping is logged at warn level. `Ok(None)`, and
    /// no timer, when no watchdog was asked for.
    ///
    /// # Errors
    ///
    /// The timer's start error.
    pub fn start_watchdog(&self, lp: &mut Loop) -> io::Result<Option<Handle<Timer>>> {
        let Some(interval) = self.watchdog_interval() else {
            return Ok(None);
        };
        let every = (interval / 2).max(Duration::from_millis(1));
        let t = lp.timer_init();
        let me = self.clone();
        let started = lp.timer_start(t, every, every, move |_, _| {
            if let Err(e) = me.watchdog() {
                log::warn!("systemd: WATCHDOG=1 not sent: {e}");
            }
        });
        if let Err(e) = started.and_then(|()| lp.unref_handle(t)) {
            lp.close_if_open(t);
            return Err(e);
        }
        Ok(Some(t))
    }

    fn send(&self, msg: &str) -> io::Result<()> {
        match &self.target {
            Some(t) => sys::notify::send(&t.sock, &t.addr, msg.as_bytes()),
            None => Ok(()),
        }
    }
}

/// `sd_watchdog_enabled`'s rule: the interval if `WATCHDOG_USEC` is set and
/// `WATCHDOG_PID` is unset or `our_pid`.
fn watchdog_from(
    usec: Option<&OsString>,
    pid: Option<&OsString>,
    our_pid: u32,
) -> Result<Option<Duration>, NotifyEnvError> {
    let Some(usec) = usec else { return Ok(None) };
    let n: u64 = usec
        .to_str()
        .filter(|s| s.bytes().all(|b| b.is_ascii_digit()))
        .and_then(|s| s.parse().ok())
        .filter(|&n| n > 0)
        .ok_or_else(|| NotifyEnvError::BadWatchdogUsec(usec.clone()))?;
    if let Some(pid) = pid {
        let p: u32 = pid
            .to_str()
            .and_then(|s| s.parse().ok())
            .filter(|&p| p > 0)
            .ok_or_else(|| NotifyEnvError::BadWatchdogPid(pid.clone()))?;
        if p != our_pid {
            return Ok(None);
        }
    }
    Ok(Some(Duration::from_micros(n)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn os(s: &str) -> OsString {
        s.into()
    }

    #[test]
    fn watchdog_follows_sd_watchdog_enabled() {
        assert_eq!(watchdog_from(None, None, 7), Ok(None));
        assert_eq!(
            watchdog_from(Some(&os("2000000")), None, 7),
            Ok(Some(Duration::from_secs(2)))
        );
        assert_eq!(
            watchdog_from(Some(&os("2000000")), Some(&os("7")), 7),
            Ok(Some(Duration::from_secs(2)))
        );
        assert_eq!(
            watchdog_from(Some(&os("2000000")), Some(&os("8")), 7),
            Ok(None)
        );
        for bad in ["0", "", "-5", "1.5", "x"] {
            assert_eq!(
                watchdog_from(Some(&os(bad)), None, 7),
                Err(NotifyEnvError::BadWatchdogUsec(os(bad)))
            );
        }
        assert_eq!(
            watchdog_from(Some(&os("5")), Some(&os("me")), 7),
            Err(NotifyEnvError::BadWatchdogPid(os("me")))
        );
    }

    #[test]
    fn bad_socket_names_are_typed_errors_and_disabled_sends_nothing() {
        for bad in ["", "relative/path", "@", "vsock:2:5"] {
            let e = Notifier::to_socket(bad).unwrap_err();
            assert_eq!(e.kind(), io::ErrorKind::InvalidInput);
            let inner = e
                .into_inner()
                .unwrap()
                .downcast::<NotifyEnvError>()
                .unwrap();
            assert_eq!(*inner, NotifyEnvError::BadSocket(os(bad)));
        }
        let n = Notifier::disabled().with_watchdog(Duration::from_secs(1));
        assert!(!n.is_enabled());
        assert_eq!(n.watchdog_interval(), None);
        n.ready().unwrap();
        n.reloading().unwrap();
        n.stopping().unwrap();
        n.status("x").unwrap();
    }
}
