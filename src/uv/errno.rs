//! OS error numbers as one type ([`Errno`]), for every layer that reports
//! them the way Node does.
//!
//! libuv returns errors as negative numbers (`UV_EADDRINUSE` is `-98` on
//! Linux) and Node passes that number on: it is `err.errno` in JavaScript
//! and the `errno` of the cluster's `queryServer` reply. Inside this crate
//! an errno is an [`Errno`], a positive OS error number with its name;
//! Node's negative form exists only at the wire ([`Errno::to_wire`],
//! [`Errno::from_wire`], and its serde form).

use std::fmt;
use std::io;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// An OS error number (`EADDRINUSE`), positive as the OS gives it.
///
/// Node's form, the negative number libuv returns (`-98`), is used only
/// on the wire: [`to_wire`](Self::to_wire) and
/// [`from_wire`](Self::from_wire) convert, and serde reads and writes that
/// form, so a message field of type `Errno` is what Node sends.
///
/// # Examples
///
/// ```
/// use uvcluster::uv::Errno;
///
/// let e = Errno::EADDRINUSE;
/// assert_eq!(e.code(), "EADDRINUSE");
/// assert_eq!(Errno::from_wire(e.to_wire()), Some(e));
/// assert_eq!(
///     Errno::of(&std::io::Error::from(e)),
///     Some(Errno::EADDRINUSE)
/// );
/// assert_eq!(serde_json::to_string(&e).unwrap(), e.to_wire().to_string());
/// ```
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Errno(i32);

macro_rules! errno_consts {
    ($($name:ident),* $(,)?) => {
        impl Errno {
            $(
                #[doc = concat!("`", stringify!($name), "`.")]
                pub const $name: Errno = Errno(nix::errno::Errno::$name as i32);
            )*
        }
    };
}

errno_consts!(
    EACCES,
    EADDRINUSE,
    EADDRNOTAVAIL,
    EAGAIN,
    EBADF,
    ECANCELED,
    ECONNREFUSED,
    ECONNRESET,
    EINVAL,
    EMFILE,
    ENFILE,
    ENOENT,
    ENOTCONN,
    ENOTSOCK,
    ENOTSUP,
    EOPNOTSUPP,
    EPERM,
    EPIPE,
    EPROTO,
    ESRCH,
);

impl Errno {
    /// The errno `n`, as the OS numbers it (`98` for `EADDRINUSE` on
    /// Linux).
    pub const fn from_raw(n: i32) -> Errno {
        Errno(n)
    }

    /// The OS's number.
    pub const fn raw(self) -> i32 {
        self.0
    }

    /// The errno an `io::Error` carries, if it came from the OS.
    pub fn of(e: &io::Error) -> Option<Errno> {
        e.raw_os_error().map(Errno)
    }

    /// The errno to report a failed call with, as Node must have one: the
    /// `io::Error`'s, or `EINVAL` when it carries none (an address that
    /// does not parse, say).
    pub fn of_failed(e: &io::Error) -> Errno {
        Errno::of(e).unwrap_or(Errno::EINVAL)
    }

    /// Node's form: the negative number libuv returns (`-98`).
    pub const fn to_wire(self) -> i64 {
        -(self.0 as i64)
    }

    /// Reads Node's form: `Some` for a negative number that fits an errno,
    /// `None` for zero (success), a positive number or one out of range.
    pub fn from_wire(n: i64) -> Option<Errno> {
        if n >= 0 {
            return None;
        }
        n.checked_neg()
            .and_then(|n| i32::try_from(n).ok())
            .map(Errno)
    }

    /// Whether the OS knows this number.
    pub fn is_known(self) -> bool {
        nix::errno::Errno::from_raw(self.0) != nix::errno::Errno::UnknownErrno
    }

    /// The symbolic name, Node's `err.code` (`"EADDRINUSE"`);
    /// `"UnknownErrno"` for a number the OS does not know.
    pub fn code(self) -> String {
        format!("{:?}", nix::errno::Errno::from_raw(self.0))
    }

    /// The OS's description (`"Address already in use"`).
    pub fn description(self) -> &'static str {
        nix::errno::Errno::from_raw(self.0).desc()
    }
}

impl From<Errno> for io::Error {
    fn from(e: Errno) -> io::Error {
        io::Error::from_raw_os_error(e.0)
    }
}

impl fmt::Debug for Errno {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}({})", self.code(), self.0)
    }
}

impl fmt::Display for Errno {
    /// The name, as Node prints `err.code`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.code())
    }
}

impl Serialize for Errno {
    /// Node's negative number.
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_i64(self.to_wire())
    }
}

impl<'de> Deserialize<'de> for Errno {
    /// Node's negative number; anything else is an error.
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Errno, D::Error> {
        let n = i64::deserialize(d)?;
        Errno::from_wire(n).ok_or_else(|| {
            serde::de::Error::custom(format!("{n} is not a negative errno (Node's form)"))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wire_form_is_negative_and_only_at_the_wire() {
        assert_eq!(Errno::EADDRINUSE.raw(), 98);
        assert_eq!(Errno::EADDRINUSE.to_wire(), -98);
        assert_eq!(Errno::from_wire(-22), Some(Errno::EINVAL));
        assert_eq!(Errno::from_wire(0), None);
        assert_eq!(Errno::from_wire(22), None);
        assert_eq!(Errno::from_wire(i64::MIN), None);
        assert_eq!(serde_json::to_value(Errno::EMFILE).unwrap(), -24);
        assert_eq!(
            serde_json::from_value::<Errno>((-98).into()).unwrap(),
            Errno::EADDRINUSE
        );
        assert!(serde_json::from_value::<Errno>(98.into()).is_err());
        assert!(serde_json::from_value::<Errno>("EINVAL".into()).is_err());
    }

    #[test]
    fn names_and_io_errors() {
        assert_eq!(Errno::EPROTO.code(), "EPROTO");
        assert_eq!(Errno::ENOENT.to_string(), "ENOENT");
        assert!(!Errno::from_raw(100_000).is_known());
        assert_eq!(Errno::from_raw(100_000).code(), "UnknownErrno");
        let io = io::Error::from(Errno::ENOTCONN);
        assert_eq!(io.kind(), io::ErrorKind::NotConnected);
        assert_eq!(Errno::of(&io), Some(Errno::ENOTCONN));
        assert_eq!(Errno::of(&io::Error::other("no errno")), None);
        assert_eq!(
            Errno::of_failed(&io::Error::other("no errno")),
            Errno::EINVAL
        );
        assert_eq!(Errno::of_failed(&io), Errno::ENOTCONN);
        assert_eq!(format!("{:?}", Errno::EINVAL), "EINVAL(22)");
    }
}
