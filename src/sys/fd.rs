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

/// Whether a connected stream socket has bytes waiting to be read, without
/// reading them (`recv` with `MSG_PEEK | MSG_DONTWAIT`, one byte). `Ok(false)`
/// when nothing is waiting; also at end of stream (the peer's FIN), where
/// nothing more will come.
pub(crate) fn has_unread_input(fd: BorrowedFd<'_>) -> io::Result<bool> {
    let mut b = [0u8; 1];
    let flags = socket::MsgFlags::MSG_PEEK | socket::MsgFlags::MSG_DONTWAIT;
    match socket::recv(fd.as_raw_fd(), &mut b, flags) {
        Ok(n) => Ok(n > 0),
        Err(nix::Error::EAGAIN) => Ok(false),
        Err(e) => Err(errno(e)),
    }
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

/// Marks every open fd numbered from `first` to `last` (inclusive)
/// `FD_CLOEXEC`, closing none: the fds stay usable here and vanish at the
/// next `exec`.
///
/// Async-signal-safe (no allocation, no lock), so it runs in a child
/// between `fork` and `exec`: `close_range(first, last,
/// CLOSE_RANGE_CLOEXEC)` (Linux 5.11) where the kernel has it; otherwise
/// the numbers listed in `/proc/self/fd`, read with `getdents64` into a
/// buffer on the stack; and without `/proc`, every number below the
/// `RLIMIT_NOFILE` soft limit. Errors on single fds (one closed meanwhile)
/// are ignored: the goal is that no fd in the range crosses `exec`.
pub(crate) fn cloexec_range(first: u32, last: u32) {
    if first > last || cloexec_range_by_close_range(first, last) {
        return;
    }
    if !cloexec_range_by_proc(first, last) {
        cloexec_range_by_probing(first, last);
    }
}

/// `close_range(first, last, CLOSE_RANGE_CLOEXEC)`; `false` if the kernel
/// lacks it (`ENOSYS` before 5.9, `EINVAL` for the flag before 5.11, or
/// `EPERM` from a seccomp filter that does not know the call).
#[cfg(target_os = "linux")]
pub(crate) fn cloexec_range_by_close_range(first: u32, last: u32) -> bool {
    use nix::libc;
    // SAFETY: a raw syscall (the libc wrapper needs glibc 2.34) that takes
    // two fd numbers and a flag, no pointers; with CLOSE_RANGE_CLOEXEC it
    // closes nothing. It is async-signal-safe.
    let r = unsafe {
        libc::syscall(
            libc::SYS_close_range,
            first,
            last,
            libc::CLOSE_RANGE_CLOEXEC,
        )
    };
    r == 0
}

#[cfg(not(target_os = "linux"))]
pub(crate) fn cloexec_range_by_close_range(_first: u32, _last: u32) -> bool {
    false
}

/// Sets `FD_CLOEXEC` on one fd number; a closed number is skipped.
fn set_cloexec_raw(fd: i32) {
    use nix::libc;
    // SAFETY: fcntl on any integer is harmless: a closed number fails
    // with EBADF, and F_SETFD only changes the descriptor's flags.
    // Async-signal-safe.
    unsafe {
        let flags = libc::fcntl(fd, libc::F_GETFD);
        if flags >= 0 && flags & libc::FD_CLOEXEC == 0 {
            libc::fcntl(fd, libc::F_SETFD, flags | libc::FD_CLOEXEC);
        }
    }
}

/// The fallback for kernels without `CLOSE_RANGE_CLOEXEC`: lists
/// `/proc/self/fd` with `open` and `getdents64` (no `opendir`, which
/// allocates) and marks each fd in range. `false` if `/proc` cannot be
/// read.
#[cfg(target_os = "linux")]
pub(crate) fn cloexec_range_by_proc(first: u32, last: u32) -> bool {
    use nix::libc;
    const PATH: &[u8] = b"/proc/self/fd\0";
    // SAFETY: PATH is NUL-terminated; open is async-signal-safe.
    let dir = unsafe {
        libc::open(
            PATH.as_ptr().cast(),
            libc::O_RDONLY | libc::O_DIRECTORY | libc::O_CLOEXEC,
        )
    };
    if dir < 0 {
        return false;
    }
    // 8-byte aligned, as the kernel writes `linux_dirent64` records into it.
    #[repr(C, align(8))]
    struct Buf([u8; 4096]);
    let mut buf = Buf([0; 4096]);
    let ok = loop {
        // SAFETY: `buf` is writable for its whole size; the kernel writes
        // at most that many bytes. Async-signal-safe.
        let n =
            unsafe { libc::syscall(libc::SYS_getdents64, dir, buf.0.as_mut_ptr(), buf.0.len()) };
        if n < 0 {
            break false;
        }
        if n == 0 {
            break true;
        }
        let bytes = &buf.0[..(n as usize).min(buf.0.len())];
        for name in dirent_names(bytes) {
            if let Some(fd) = parse_fd(name)
                && fd >= first
                && fd <= last
                && fd as i32 != dir
            {
                set_cloexec_raw(fd as i32);
            }
        }
    };
    // SAFETY: `dir` was opened above and is closed once.
    unsafe { libc::close(dir) };
    ok
}

#[cfg(not(target_os = "linux"))]
pub(crate) fn cloexec_range_by_proc(_first: u32, _last: u32) -> bool {
    false
}

/// The names in a buffer of `linux_dirent64` records: `d_ino` (8 bytes),
/// `d_off` (8), `d_reclen` (2), `d_type` (1), then the NUL-terminated name.
fn dirent_names(mut bytes: &[u8]) -> impl Iterator<Item = &[u8]> {
    std::iter::from_fn(move || {
        if bytes.len() < 19 {
            return None;
        }
        let reclen = usize::from(u16::from_ne_bytes([bytes[16], bytes[17]]));
        if reclen < 19 || reclen > bytes.len() {
            return None;
        }
        let rec = &bytes[19..reclen];
        bytes = &bytes[reclen..];
        let end = rec.iter().position(|&b| b == 0).unwrap_or(rec.len());
        Some(&rec[..end])
    })
}

/// A decimal fd number, or `None` (`.`, `..`, overflow).
fn parse_fd(name: &[u8]) -> Option<u32> {
    if name.is_empty() {
        return None;
    }
    let mut n: u32 = 0;
    for &b in name {
        if !b.is_ascii_digit() {
            return None;
        }
        n = n.checked_mul(10)?.checked_add(u32::from(b - b'0'))?;
    }
    Some(n)
}

/// The last resort, without `/proc`: tries every number in range below the
/// `RLIMIT_NOFILE` soft limit. An fd above that limit (opened before the
/// limit was lowered) is missed.
pub(crate) fn cloexec_range_by_probing(first: u32, last: u32) {
    use nix::libc;
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: `lim` is a valid, writable rlimit; getrlimit is a plain
    // system call.
    let end = if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } == 0 {
        lim.rlim_cur.min(i32::MAX as libc::rlim_t) as u32
    } else {
        1024
    };
    let mut fd = first;
    while fd < end && fd <= last {
        set_cloexec_raw(fd as i32);
        fd += 1;
    }
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

    fn cloexec(fd: &OwnedFd) -> bool {
        use nix::fcntl::{FcntlArg, FdFlag, fcntl};
        FdFlag::from_bits_retain(fcntl(fd, FcntlArg::F_GETFD).unwrap()).contains(FdFlag::FD_CLOEXEC)
    }

    /// Each way of marking a range (`close_range`, the `/proc/self/fd`
    /// listing, probing every number) marks the fd in range, leaves the
    /// one outside alone, and closes neither. Each range holds one fd, so
    /// other tests' fds are not touched.
    #[test]
    fn cloexec_range_marks_only_the_range_by_each_method() {
        use nix::fcntl::{FcntlArg, FdFlag, fcntl};
        type Mark = fn(u32, u32);
        let methods: [(&str, Mark); 4] = [
            ("any", cloexec_range),
            ("close_range", |a, b| {
                // Only where the kernel has CLOSE_RANGE_CLOEXEC (5.11).
                if !cloexec_range_by_close_range(a, b) {
                    cloexec_range_by_proc(a, b);
                }
            }),
            ("proc", |a, b| assert!(cloexec_range_by_proc(a, b))),
            ("probing", cloexec_range_by_probing),
        ];
        for (name, mark) in methods {
            let (r, w) = nix::unistd::pipe().unwrap();
            for fd in [&r, &w] {
                fcntl(fd, FcntlArg::F_SETFD(FdFlag::empty())).unwrap();
            }
            let n = r.as_raw_fd() as u32;
            mark(n, n);
            assert!(cloexec(&r), "{name}: the fd in range is marked");
            assert!(!cloexec(&w), "{name}: the fd outside is not");
            // Still open: marking closes nothing.
            nix::unistd::write(&w, b"x").unwrap();
            let mut b = [0u8; 1];
            assert_eq!(nix::unistd::read(&r, &mut b).unwrap(), 1, "{name}");
        }
        // An empty range is no range.
        let (r, _w) = nix::unistd::pipe().unwrap();
        fcntl(&r, FcntlArg::F_SETFD(FdFlag::empty())).unwrap();
        let n = r.as_raw_fd() as u32;
        cloexec_range(n + 1, n);
        assert!(!cloexec(&r));
    }

    #[test]
    fn dirent_records_and_fd_names_parse() {
        let mut buf = Vec::new();
        for name in [&b"."[..], b"..", b"3", b"1024"] {
            let reclen = (19 + name.len() + 1).next_multiple_of(8);
            let mut rec = vec![0u8; reclen];
            rec[16..18].copy_from_slice(&(reclen as u16).to_ne_bytes());
            rec[19..19 + name.len()].copy_from_slice(name);
            buf.extend_from_slice(&rec);
        }
        let names: Vec<&[u8]> = dirent_names(&buf).collect();
        assert_eq!(names, vec![&b"."[..], b"..", b"3", b"1024"]);
        let fds: Vec<u32> = names.into_iter().filter_map(parse_fd).collect();
        assert_eq!(fds, vec![3, 1024]);
        assert_eq!(parse_fd(b"99999999999"), None);
        // A truncated record ends the walk instead of reading past it.
        assert_eq!(dirent_names(&buf[..30]).count(), 1);
    }
}
