//! Socket activation (systemd's `sd_listen_fds(3)`): listening sockets a
//! service manager created and passed to this process, kept in a per-loop
//! table and used *instead of binding* when anything on the loop binds
//! their address.
//!
//! The first [`Loop`] a process creates takes the fds named by
//! `LISTEN_PID`/`LISTEN_FDS`/`LISTEN_FDNAMES` (fds from 3; only if
//! `LISTEN_PID` is this process; the variables are removed from the
//! environment, so no worker inherits them, and the fds are made
//! `FD_CLOEXEC` and non-blocking). [`Loop::listen_fd_add`] adds one by
//! hand (a socket received another way).
//!
//! [`Loop::tcp_bind`] and [`Loop::pipe_bind`] look the address up first:
//! every listening socket of the library is made by one of them (a
//! standalone `net::Server`, the cluster primary's round-robin and shared
//! handles, and the one-socket-per-worker binds of `ReusePort`), so
//! every path and every scheduling policy takes the inherited socket. A
//! match hands the handle a duplicate of the inherited fd: the table keeps
//! the original open, so the address can be bound again (a server that
//! closes and listens again, a worker replaced, a second worker of
//! `ReusePort`) and the socket is never closed by the process while it
//! runs. The address rules:
//!
//! * TCP (IPv4 or IPv6): the inherited listener whose `getsockname` equals
//!   the address; failing that, a wildcard address (`0.0.0.0` or `::`,
//!   which is what Node and `net::Server` bind when no host is given) takes
//!   an inherited listener on the same port whatever its address: the
//!   socket unit, not the application, chooses the interface. Port 0 never
//!   matches.
//! * Unix: the inherited listener bound to the same path (a relative path
//!   is taken from the current directory). The handle does not unlink the
//!   path when it closes: the file is the service manager's.
//! * `SO_REUSEPORT` asked for an inherited address (the `ReusePort`
//!   policy) cannot split one socket in several: every worker gets the
//!   same socket, which is the `None` policy for that address. This is
//!   logged once per socket at info level.
//!
//! Inherited sockets that nothing binds stay open (a later reload may
//! bind them); [`Loop::listen_fds_report_unused`] logs them once at info
//! level.

use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};

use super::event_loop::Loop;
use crate::sys;
use crate::sys::fd::SocketKind;

pub use crate::sys::listen_fds::ListenFdsError;

/// What an inherited socket is bound to (from `getsockname`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ListenAddress {
    /// A listening TCP socket, IPv4 or IPv6.
    Tcp(SocketAddr),
    /// A listening Unix stream socket bound to a filesystem path.
    Unix(PathBuf),
    /// Anything else (a datagram socket, an abstract Unix name, a socket
    /// that is not listening): kept open, never matched.
    Other,
}

impl std::fmt::Display for ListenAddress {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ListenAddress::Tcp(a) => write!(f, "{a}"),
            ListenAddress::Unix(p) => write!(f, "{}", p.display()),
            ListenAddress::Other => f.write_str("(not a TCP or Unix-path listener)"),
        }
    }
}

/// One inherited socket, as [`Loop::listen_fds`] describes it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ListenFd {
    /// Its fd number in this process (3 and up for `LISTEN_FDS`).
    pub fd: RawFd,
    /// Its name (`LISTEN_FDNAMES`, systemd's `FileDescriptorName=`;
    /// `unknown` when none was given).
    pub name: String,
    /// Its address.
    pub address: ListenAddress,
    /// Whether a bind has used it.
    pub used: bool,
}

/// One inherited socket in the table.
#[derive(Debug)]
struct Inherited {
    fd: OwnedFd,
    name: String,
    address: ListenAddress,
    used: bool,
    reuseport_logged: bool,
}

impl Inherited {
    fn info(&self) -> ListenFd {
        ListenFd {
            fd: self.fd.as_raw_fd(),
            name: self.name.clone(),
            address: self.address.clone(),
            used: self.used,
        }
    }
}

/// The per-loop table (a loop context value).
#[derive(Debug, Default)]
pub(crate) struct ListenFds {
    fds: Vec<Inherited>,
    error: Option<ListenFdsError>,
    unused_reported: bool,
}

/// Takes this process's socket-activation fds, if any, into `lp`'s table;
/// called by [`Loop::new`]. An error is logged and kept for
/// [`Loop::listen_fds`]; the loop is made all the same.
pub(crate) fn adopt_from_env(lp: &mut Loop) {
    match sys::listen_fds::take_listen_fds() {
        Ok(fds) => {
            for (fd, name) in fds {
                match adopt(fd, name) {
                    Ok(i) => {
                        log::info!(
                            "socket activation: fd {} ({}) {}",
                            i.fd.as_raw_fd(),
                            i.name,
                            i.address
                        );
                        lp.context_mut::<ListenFds>().fds.push(i);
                    }
                    Err((n, e)) => {
                        log::error!("socket activation: fd {n} is unusable: {e}");
                        lp.context_mut::<ListenFds>().error = Some(ListenFdsError::BadFd {
                            fd: n,
                            errno: e.raw_os_error().unwrap_or(0),
                        });
                    }
                }
            }
        }
        Err(e) => {
            log::error!("socket activation: {e}");
            lp.context_mut::<ListenFds>().error = Some(e);
        }
    }
}

/// Makes `fd` non-blocking and CLOEXEC and reads its address.
fn adopt(fd: OwnedFd, name: String) -> Result<Inherited, (RawFd, io::Error)> {
    let n = fd.as_raw_fd();
    sys::fd::set_cloexec_nonblock(fd.as_fd()).map_err(|e| (n, e))?;
    let address = match sys::fd::socket_kind(fd.as_fd()) {
        SocketKind::TcpListener => sys::fd::local_inet_addr(fd.as_fd())
            .map(ListenAddress::Tcp)
            .unwrap_or(ListenAddress::Other),
        SocketKind::UnixListener => match sys::fd::local_unix_path(fd.as_fd()) {
            Ok(p) if p.is_absolute() => ListenAddress::Unix(p),
            _ => ListenAddress::Other,
        },
        _ => ListenAddress::Other,
    };
    Ok(Inherited {
        fd,
        name,
        address,
        used: false,
        reuseport_logged: false,
    })
}

/// For [`Loop::tcp_bind`]: a duplicate of the inherited listener for
/// `addr`, if there is one (see the module docs for the rules).
pub(crate) fn take_tcp(
    lp: &mut Loop,
    addr: &SocketAddr,
    reuse_port: bool,
) -> io::Result<Option<OwnedFd>> {
    if addr.port() == 0 || lp.context::<ListenFds>().is_none_or(|t| t.fds.is_empty()) {
        return Ok(None);
    }
    let table = lp.context_mut::<ListenFds>();
    let same = |a: &SocketAddr| a.ip() == addr.ip() && a.port() == addr.port();
    let tcp = |i: &Inherited| match i.address {
        ListenAddress::Tcp(a) => Some(a),
        _ => None,
    };
    let found = table
        .fds
        .iter()
        .position(|i| tcp(i).is_some_and(|a| same(&a)))
        .or_else(|| {
            addr.ip().is_unspecified().then(|| {
                table
                    .fds
                    .iter()
                    .position(|i| tcp(i).is_some_and(|a| a.port() == addr.port()))
            })?
        });
    let Some(k) = found else { return Ok(None) };
    let i = &mut table.fds[k];
    let dup = i.fd.try_clone()?;
    i.used = true;
    if reuse_port && !i.reuseport_logged {
        i.reuseport_logged = true;
        log::info!(
            "socket activation: SO_REUSEPORT asked for {addr}, which is inherited fd {} ({}, {}): \
             one socket cannot be split, so every worker shares it (as SchedulingPolicy::None)",
            i.fd.as_raw_fd(),
            i.name,
            i.address
        );
    }
    Ok(Some(dup))
}

/// For [`Loop::pipe_bind`]: a duplicate of the inherited listener bound to
/// `path`, if there is one.
pub(crate) fn take_unix(lp: &mut Loop, path: &Path) -> io::Result<Option<OwnedFd>> {
    if lp.context::<ListenFds>().is_none_or(|t| t.fds.is_empty()) {
        return Ok(None);
    }
    let abs = if path.is_absolute() {
        path.to_path_buf()
    } else {
        std::env::current_dir()?.join(path)
    };
    // `dir/../x` and symlinked directories: the directory made canonical.
    let canonical = abs
        .parent()
        .and_then(|d| std::fs::canonicalize(d).ok())
        .zip(abs.file_name())
        .map(|(d, f)| d.join(f));
    let table = lp.context_mut::<ListenFds>();
    let Some(i) = table.fds.iter_mut().find(|i| match &i.address {
        ListenAddress::Unix(p) => *p == abs || p == path || Some(p) == canonical.as_ref(),
        _ => false,
    }) else {
        return Ok(None);
    };
    let dup = i.fd.try_clone()?;
    i.used = true;
    Ok(Some(dup))
}

impl Loop {
    /// The sockets this loop inherited for socket activation (systemd's
    /// `LISTEN_FDS`, `sd_listen_fds(3)`) or was given with
    /// [`listen_fd_add`](Self::listen_fd_add), in fd order, with their
    /// names, addresses and whether a bind has used them. Empty when the
    /// process was not socket-activated.
    ///
    /// The first loop a process creates takes the fds that
    /// `LISTEN_PID`/`LISTEN_FDS`/`LISTEN_FDNAMES` name (fds from 3; only
    /// if `LISTEN_PID` is this process). The variables are removed from the
    /// environment, so no child inherits them, and the fds are made
    /// `FD_CLOEXEC` and non-blocking. Create that loop before spawning
    /// threads (removing a variable races with other threads' reads).
    ///
    /// [`tcp_bind`](Self::tcp_bind) and [`pipe_bind`](Self::pipe_bind)
    /// look the address up first, and a match gives the handle a duplicate
    /// of the inherited socket instead of binding. Every listening socket
    /// of the library is made by one of them (a standalone `net::Server`,
    /// the cluster primary's round-robin and shared handles, the
    /// per-worker binds of `ReusePort`), so every path and every
    /// scheduling policy takes it. The table keeps the original open: the
    /// address can be bound again (a server that closes and listens again,
    /// a replaced worker, a second `ReusePort` worker), and the process
    /// never closes the socket while it runs. The rules:
    ///
    /// * TCP (IPv4 or IPv6): the inherited listener whose `getsockname`
    ///   equals the address; failing that, a wildcard address (`0.0.0.0`
    ///   or `::`, what Node and `net::Server` bind when no host is given)
    ///   takes an inherited listener on the same port whatever its
    ///   address: the socket unit, not the application, chooses the
    ///   interface. Port 0 never matches.
    /// * Unix: the inherited listener bound to the same path (a relative
    ///   path is taken from the current directory). The handle does not
    ///   unlink the path when it closes: the file is the service
    ///   manager's.
    /// * `SO_REUSEPORT` asked for an inherited address (the `ReusePort`
    ///   policy) cannot split one socket: every worker gets the same
    ///   socket, which is the `None` policy for that address (logged once
    ///   per socket at info level).
    ///
    /// Inherited sockets that nothing binds stay open (a reload may bind
    /// them): [`listen_fds_report_unused`](Self::listen_fds_report_unused).
    ///
    /// # Errors
    ///
    /// The [`ListenFdsError`] met when the variables were read (a
    /// `LISTEN_FDS` that is not a number, names that do not match the
    /// count, an fd that is not open), so that a program can refuse to
    /// start on a bad environment. The loop was made all the same, without
    /// the fds, and the error was logged.
    ///
    /// # Examples
    ///
    /// ```
    /// let lp = uvcluster::uv::Loop::new()?;
    /// for s in lp.listen_fds().map_err(std::io::Error::from)? {
    ///     println!("fd {} ({}): {}", s.fd, s.name, s.address);
    /// }
    /// # Ok::<(), std::io::Error>(())
    /// ```
    pub fn listen_fds(&self) -> Result<Vec<ListenFd>, ListenFdsError> {
        let Some(t) = self.context::<ListenFds>() else {
            return Ok(Vec::new());
        };
        if let Some(e) = &t.error {
            return Err(e.clone());
        }
        Ok(t.fds.iter().map(Inherited::info).collect())
    }

    /// Adds a listening socket to the loop's socket-activation table, as
    /// if it had been inherited with `LISTEN_FDS` under `name`: from now
    /// on a [`tcp_bind`](Self::tcp_bind) or [`pipe_bind`](Self::pipe_bind)
    /// of its address uses a duplicate of it instead of binding. For a
    /// socket received some other way (systemd's fd store, a parent that
    /// passes it under another variable). The fd is made CLOEXEC and
    /// non-blocking.
    ///
    /// # Errors
    ///
    /// The `fcntl` error making it CLOEXEC and non-blocking. A socket that
    /// is not a TCP or Unix-path listener is accepted and described as
    /// [`ListenAddress::Other`]: it is kept, never matched.
    ///
    /// # Examples
    ///
    /// ```
    /// use std::net::TcpListener;
    /// use std::os::fd::OwnedFd;
    /// use uvcluster::uv::{BindFlags, ListenAddress, Loop};
    ///
    /// let mut lp = Loop::new()?;
    /// let l = TcpListener::bind("127.0.0.1:0")?;
    /// let addr = l.local_addr()?;
    /// let info = lp.listen_fd_add(OwnedFd::from(l), "web")?;
    /// assert_eq!(info.address, ListenAddress::Tcp(addr));
    /// // Binding that address takes the socket instead of failing with
    /// // EADDRINUSE.
    /// let t = lp.tcp_init();
    /// lp.tcp_bind(t, addr, BindFlags::default())?;
    /// lp.tcp_listen(t, 511, |lp, _, c| { let _ = c.map(|c| lp.close_if_open(c)); })?;
    /// assert_eq!(lp.tcp_getsockname(t)?, addr);
    /// assert!(lp.listen_fds().unwrap()[0].used);
    /// lp.close(t, |_| {})?;
    /// lp.run(uvcluster::uv::RunMode::Default)?;
    /// # Ok::<(), std::io::Error>(())
    /// ```
    pub fn listen_fd_add(&mut self, fd: OwnedFd, name: &str) -> io::Result<ListenFd> {
        let i = adopt(fd, name.to_owned()).map_err(|(_, e)| e)?;
        let info = i.info();
        self.context_mut::<ListenFds>().fds.push(i);
        Ok(info)
    }

    /// Logs, once per loop and at info level, every inherited socket that
    /// no bind has used so far, and returns how many there are (0 on later
    /// calls). They stay open: a reload may still bind them. Call it once
    /// the program has made its listeners (`uvcluster run` does when every
    /// worker listens).
    pub fn listen_fds_report_unused(&mut self) -> usize {
        let Some(t) = self.context::<ListenFds>() else {
            return 0;
        };
        if t.unused_reported {
            return 0;
        }
        let t = self.context_mut::<ListenFds>();
        t.unused_reported = true;
        let mut n = 0;
        for i in t.fds.iter().filter(|i| !i.used) {
            n += 1;
            log::info!(
                "socket activation: inherited fd {} ({}, {}) is not used by any listener; it stays open",
                i.fd.as_raw_fd(),
                i.name,
                i.address
            );
        }
        n
    }
}
