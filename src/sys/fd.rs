//! Socket creation and socket options (through `nix`).

use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::path::Path;

use nix::sys::socket::{
    self, AddressFamily, Backlog, SockFlag, SockType, SockaddrIn, SockaddrIn6, SockaddrLike,
    SockaddrStorage, UnixAddr, sockopt,
};

pub(crate) fn errno(e: nix::Error) -> io::Error {
    io::Error::from_raw_os_error(e as i32)
}

/// A new CLOEXEC, non-blocking socket.
pub(crate) fn socket(family: AddressFamily, ty: SockType) -> io::Result<OwnedFd> {
    socket::socket(
        family,
        ty,
        SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK,
        None,
    )
    .map_err(errno)
}

pub(crate) fn family_of(addr: &SocketAddr) -> AddressFamily {
    match addr {
        SocketAddr::V4(_) => AddressFamily::Inet,
        SocketAddr::V6(_) => AddressFamily::Inet6,
    }
}

fn bind_inet(fd: BorrowedFd<'_>, addr: &SocketAddr) -> nix::Result<()> {
    match addr {
        SocketAddr::V4(a) => socket::bind(fd.as_raw_fd(), &SockaddrIn::from(*a)),
        SocketAddr::V6(a) => socket::bind(fd.as_raw_fd(), &SockaddrIn6::from(*a)),
    }
}

/// Options for [`bind_tcp`] and [`bind_udp`].
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct BindOpts {
    pub(crate) ipv6_only: bool,
    pub(crate) reuse_addr: bool,
    pub(crate) reuse_port: bool,
}

/// Creates and binds an inet socket of the given type. `Err` carries the
/// errno of whichever step failed.
pub(crate) fn bind_inet_socket(
    ty: SockType,
    addr: &SocketAddr,
    opts: BindOpts,
) -> io::Result<OwnedFd> {
    let fd = socket(family_of(addr), ty)?;
    if opts.reuse_addr {
        socket::setsockopt(&fd, sockopt::ReuseAddr, &true).map_err(errno)?;
    }
    if opts.reuse_port {
        socket::setsockopt(&fd, sockopt::ReusePort, &true).map_err(errno)?;
    }
    if addr.is_ipv6() {
        socket::setsockopt(&fd, sockopt::Ipv6V6Only, &opts.ipv6_only).map_err(errno)?;
    }
    bind_inet(fd.as_fd(), addr).map_err(errno)?;
    Ok(fd)
}

/// Starts a non-blocking connect of an inet socket; `Ok(false)` means it is
/// in progress (EINPROGRESS).
pub(crate) fn connect_inet(fd: BorrowedFd<'_>, addr: &SocketAddr) -> io::Result<bool> {
    let r = match addr {
        SocketAddr::V4(a) => socket::connect(fd.as_raw_fd(), &SockaddrIn::from(*a)),
        SocketAddr::V6(a) => socket::connect(fd.as_raw_fd(), &SockaddrIn6::from(*a)),
    };
    match r {
        Ok(()) => Ok(true),
        Err(nix::Error::EINPROGRESS) => Ok(false),
        Err(e) => Err(errno(e)),
    }
}

/// Creates a Unix stream socket bound to `path`.
pub(crate) fn bind_unix(path: &Path) -> io::Result<OwnedFd> {
    let fd = socket(AddressFamily::Unix, SockType::Stream)?;
    let addr = UnixAddr::new(path).map_err(errno)?;
    socket::bind(fd.as_raw_fd(), &addr).map_err(errno)?;
    Ok(fd)
}

pub(crate) fn listen(fd: BorrowedFd<'_>, backlog: i32) -> io::Result<()> {
    let backlog = Backlog::new(backlog.clamp(0, libc_somaxconn())).map_err(errno)?;
    socket::listen(&fd, backlog).map_err(errno)
}

fn libc_somaxconn() -> i32 {
    nix::libc::SOMAXCONN
}

pub(crate) fn shutdown_write(fd: BorrowedFd<'_>) -> io::Result<()> {
    socket::shutdown(fd.as_raw_fd(), socket::Shutdown::Write).map_err(errno)
}

pub(crate) fn set_nodelay(fd: BorrowedFd<'_>, on: bool) -> io::Result<()> {
    socket::setsockopt(&fd, sockopt::TcpNoDelay, &on).map_err(errno)
}

pub(crate) fn set_keepalive(fd: BorrowedFd<'_>, on: bool, delay_secs: u32) -> io::Result<()> {
    socket::setsockopt(&fd, sockopt::KeepAlive, &on).map_err(errno)?;
    if on && delay_secs > 0 {
        socket::setsockopt(&fd, sockopt::TcpKeepIdle, &delay_secs).map_err(errno)?;
    }
    Ok(())
}

pub(crate) fn is_listening(fd: BorrowedFd<'_>) -> io::Result<bool> {
    socket::getsockopt(&fd, sockopt::AcceptConn).map_err(errno)
}

pub(crate) fn take_socket_error(fd: BorrowedFd<'_>) -> io::Result<Option<io::Error>> {
    let e = socket::getsockopt(&fd, sockopt::SocketError).map_err(errno)?;
    Ok((e != 0).then(|| io::Error::from_raw_os_error(e)))
}

fn storage_to_inet(s: &SockaddrStorage) -> Option<SocketAddr> {
    if let Some(a) = s.as_sockaddr_in() {
        return Some(SocketAddr::V4((*a).into()));
    }
    s.as_sockaddr_in6().map(|a| SocketAddr::V6((*a).into()))
}

pub(crate) fn local_inet_addr(fd: BorrowedFd<'_>) -> io::Result<SocketAddr> {
    let s: SockaddrStorage = socket::getsockname(fd.as_raw_fd()).map_err(errno)?;
    storage_to_inet(&s).ok_or_else(|| io::Error::from_raw_os_error(nix::libc::EAFNOSUPPORT))
}

pub(crate) fn peer_inet_addr(fd: BorrowedFd<'_>) -> io::Result<SocketAddr> {
    let s: SockaddrStorage = socket::getpeername(fd.as_raw_fd()).map_err(errno)?;
    storage_to_inet(&s).ok_or_else(|| io::Error::from_raw_os_error(nix::libc::EAFNOSUPPORT))
}

/// What kind of socket an fd is (`uv_guess_handle`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum SocketKind {
    TcpListener,
    /// An inet stream socket that is not listening: connected, or only bound.
    TcpStream {
        connected: bool,
    },
    UnixListener,
    UnixStream {
        connected: bool,
    },
    Udp,
    Other,
}

pub(crate) fn socket_kind(fd: BorrowedFd<'_>) -> SocketKind {
    let Ok(ty) = socket::getsockopt(&fd, sockopt::SockType) else {
        return SocketKind::Other;
    };
    // The common case, a connected stream (a connection handed over by a
    // primary), costs two syscalls as in libuv's `uv_guess_handle`: the
    // peer's address names the family. Only a stream without a peer is
    // asked whether it listens.
    let peer = match ty {
        SockType::Stream => socket::getpeername::<SockaddrStorage>(fd.as_raw_fd()).ok(),
        _ => None,
    };
    let connected = peer.is_some();
    let family = match peer {
        Some(p) => p.family(),
        None => match socket::getsockname::<SockaddrStorage>(fd.as_raw_fd()) {
            Ok(local) => local.family(),
            Err(_) => return SocketKind::Other,
        },
    };
    let listening = !connected && ty == SockType::Stream && is_listening(fd).unwrap_or(false);
    match (family, ty) {
        (Some(AddressFamily::Inet | AddressFamily::Inet6), SockType::Stream) => {
            if listening {
                SocketKind::TcpListener
            } else {
                SocketKind::TcpStream { connected }
            }
        }
        (Some(AddressFamily::Inet | AddressFamily::Inet6), SockType::Datagram) => SocketKind::Udp,
        (Some(AddressFamily::Unix), SockType::Stream) => {
            if listening {
                SocketKind::UnixListener
            } else {
                SocketKind::UnixStream { connected }
            }
        }
        _ => SocketKind::Other,
    }
}

/// Puts an adopted fd into the state every fd of ours has: CLOEXEC and
/// non-blocking.
pub(crate) fn set_cloexec_nonblock(fd: BorrowedFd<'_>) -> io::Result<()> {
    use nix::fcntl::{FcntlArg, FdFlag, OFlag, fcntl};
    let fl = fcntl(fd, FcntlArg::F_GETFL).map_err(errno)?;
    let fl = OFlag::from_bits_retain(fl) | OFlag::O_NONBLOCK;
    fcntl(fd, FcntlArg::F_SETFL(fl)).map_err(errno)?;
    fcntl(fd, FcntlArg::F_SETFD(FdFlag::FD_CLOEXEC)).map_err(errno)?;
    Ok(())
}

/// Makes `fd` non-blocking unless it already is: one `fcntl` in the common
/// case (a socket received from a peer whose socket was non-blocking).
pub(crate) fn ensure_nonblock(fd: BorrowedFd<'_>) -> io::Result<()> {
    use nix::fcntl::{FcntlArg, OFlag, fcntl};
    let fl = OFlag::from_bits_retain(fcntl(fd, FcntlArg::F_GETFL).map_err(errno)?);
    if !fl.contains(OFlag::O_NONBLOCK) {
        fcntl(fd, FcntlArg::F_SETFL(fl | OFlag::O_NONBLOCK)).map_err(errno)?;
    }
    Ok(())
}

/// A CLOEXEC duplicate of `fd`.
pub(crate) fn dup(fd: BorrowedFd<'_>) -> io::Result<OwnedFd> {
    fd.try_clone_to_owned()
}

/// A CLOEXEC, non-blocking connected pair of Unix stream sockets.
pub(crate) fn socketpair() -> io::Result<(OwnedFd, OwnedFd)> {
    socket::socketpair(
        AddressFamily::Unix,
        SockType::Stream,
        None,
        SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK,
    )
    .map_err(errno)
}

/// Opens the spare fd used by the EMFILE trick.
pub(crate) fn open_spare() -> io::Result<OwnedFd> {
    std::fs::File::open("/dev/null")
        .or_else(|_| std::fs::File::open("/"))
        .map(OwnedFd::from)
}

/// Starts a connect of a Unix stream socket to `path`; `Ok(false)` means
/// it is in progress.
pub(crate) fn connect_unix(fd: BorrowedFd<'_>, path: &Path) -> io::Result<bool> {
    let addr = UnixAddr::new(path).map_err(errno)?;
    match socket::connect(fd.as_raw_fd(), &addr) {
        Ok(()) => Ok(true),
        Err(nix::Error::EINPROGRESS) => Ok(false),
        Err(e) => Err(errno(e)),
    }
}

fn unix_path(addr: &UnixAddr) -> std::path::PathBuf {
    match (addr.path(), addr.as_abstract()) {
        (Some(p), _) => p.to_path_buf(),
        (None, Some(name)) => {
            let mut v = vec![0u8];
            v.extend_from_slice(name);
            let os: std::ffi::OsString = std::os::unix::ffi::OsStringExt::from_vec(v);
            std::path::PathBuf::from(os)
        }
        _ => std::path::PathBuf::new(),
    }
}

pub(crate) fn local_unix_path(fd: BorrowedFd<'_>) -> io::Result<std::path::PathBuf> {
    let a: UnixAddr = socket::getsockname(fd.as_raw_fd()).map_err(errno)?;
    Ok(unix_path(&a))
}

pub(crate) fn peer_unix_path(fd: BorrowedFd<'_>) -> io::Result<std::path::PathBuf> {
    let a: UnixAddr = socket::getpeername(fd.as_raw_fd()).map_err(errno)?;
    Ok(unix_path(&a))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::OwnedFd;

    fn kind(fd: impl Into<OwnedFd>) -> SocketKind {
        let fd: OwnedFd = fd.into();
        socket_kind(fd.as_fd())
    }

    /// Every kind `socket_kind` tells apart, connected streams (the fast
    /// path: type and peer only) and everything else alike.
    #[test]
    fn socket_kind_of_each_socket() {
        let l4 = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let a4 = l4.local_addr().unwrap();
        let c4 = std::net::TcpStream::connect(a4).unwrap();
        let (s4, _) = l4.accept().unwrap();
        assert_eq!(kind(l4), SocketKind::TcpListener);
        assert_eq!(kind(c4), SocketKind::TcpStream { connected: true });
        assert_eq!(kind(s4), SocketKind::TcpStream { connected: true });
        if let Ok(l6) = std::net::TcpListener::bind("[::1]:0") {
            let c6 = std::net::TcpStream::connect(l6.local_addr().unwrap()).unwrap();
            assert_eq!(kind(c6), SocketKind::TcpStream { connected: true });
            assert_eq!(kind(l6), SocketKind::TcpListener);
        }
        let bound = bind_inet_socket(
            SockType::Stream,
            &"127.0.0.1:0".parse().unwrap(),
            BindOpts::default(),
        )
        .unwrap();
        assert_eq!(kind(bound), SocketKind::TcpStream { connected: false });
        let fresh = socket(AddressFamily::Inet6, SockType::Stream).unwrap();
        assert_eq!(kind(fresh), SocketKind::TcpStream { connected: false });

        let (p1, p2) = std::os::unix::net::UnixStream::pair().unwrap();
        assert_eq!(kind(p1), SocketKind::UnixStream { connected: true });
        drop(p2);
        let dir = std::env::temp_dir().join(format!("uvc-kind-{}", std::process::id()));
        let _ = std::fs::remove_file(&dir);
        let ul = std::os::unix::net::UnixListener::bind(&dir).unwrap();
        let uc = std::os::unix::net::UnixStream::connect(&dir).unwrap();
        assert_eq!(kind(ul), SocketKind::UnixListener);
        assert_eq!(kind(uc), SocketKind::UnixStream { connected: true });
        let _ = std::fs::remove_file(&dir);
        let unconnected = socket(AddressFamily::Unix, SockType::Stream).unwrap();
        assert_eq!(
            kind(unconnected),
            SocketKind::UnixStream { connected: false }
        );

        let u = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let v = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        u.connect(v.local_addr().unwrap()).unwrap();
        assert_eq!(kind(u), SocketKind::Udp);
        assert_eq!(kind(v), SocketKind::Udp);

        let (r, _w) = nix::unistd::pipe().unwrap();
        assert_eq!(kind(r), SocketKind::Other);
    }
}
