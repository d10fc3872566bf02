//! The OS half of `sd_notify(3)`: a datagram to the service manager's
//! `NOTIFY_SOCKET` (a filesystem path, or an abstract name written with a
//! leading `@`), and `CLOCK_MONOTONIC` in microseconds for
//! `MONOTONIC_USEC=`. No `unsafe`: std reaches abstract addresses
//! (`SocketAddrExt`) and nix reads the clock.

use std::ffi::OsStr;
use std::io;
use std::os::linux::net::SocketAddrExt;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::{SocketAddr, UnixDatagram};

/// The notify socket's address from `NOTIFY_SOCKET`'s value: an absolute
/// path, or `@name` for the abstract name `name` (as `sd_notify` reads it).
///
/// # Errors
///
/// `InvalidInput` for anything else (empty, relative; systemd's newer
/// `vsock:` addresses are not supported).
pub(crate) fn notify_addr(value: &OsStr) -> io::Result<SocketAddr> {
    let b = value.as_bytes();
    match b.first() {
        Some(b'/') => SocketAddr::from_pathname(value),
        Some(b'@') if b.len() > 1 => SocketAddr::from_abstract_name(&b[1..]),
        _ => Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "NOTIFY_SOCKET={value:?} is neither an absolute path nor an abstract name (@...)"
            ),
        )),
    }
}

/// An unbound, non-blocking, CLOEXEC datagram socket to send from.
pub(crate) fn notify_socket() -> io::Result<UnixDatagram> {
    let s = UnixDatagram::unbound()?;
    s.set_nonblocking(true)?;
    Ok(s)
}

/// Sends `msg` as one datagram to `addr`. Non-blocking: a service manager
/// that does not read makes this fail with `WouldBlock` rather than stall
/// the loop.
///
/// # Errors
///
/// The `sendto` error (`ECONNREFUSED`, `ENOENT` for a path nobody binds,
/// `WouldBlock`), or `WriteZero` for a short send.
pub(crate) fn send(sock: &UnixDatagram, addr: &SocketAddr, msg: &[u8]) -> io::Result<()> {
    let n = sock.send_to_addr(msg, addr)?;
    if n != msg.len() {
        return Err(io::Error::new(
            io::ErrorKind::WriteZero,
            "short notify datagram",
        ));
    }
    Ok(())
}

/// `CLOCK_MONOTONIC` now, in microseconds (systemd's `now(CLOCK_MONOTONIC)`,
/// what `MONOTONIC_USEC=` carries).
///
/// # Errors
///
/// `clock_gettime`'s error (none on Linux).
pub(crate) fn monotonic_usec() -> io::Result<u64> {
    let t =
        nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC).map_err(super::fd::errno)?;
    Ok(t.tv_sec() as u64 * 1_000_000 + t.tv_nsec() as u64 / 1_000)
}
