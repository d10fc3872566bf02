//! Sending and receiving fds with `SCM_RIGHTS` on a Unix stream socket
//! (libuv's `uv__write` with a send handle, `uv__stream_recv_cmsg`).
//!
//! Both directions use a control buffer on the stack, so passing an fd
//! costs no allocation. Received fds are created with `MSG_CMSG_CLOEXEC`.

use std::io::{self, IoSlice};
use std::mem;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};

use nix::libc;

/// The control buffer of a read: 512 bytes, room for about 120 fds per
/// `recvmsg` (libuv's holds about 60; Node sends one per message).
const CMSG_BUF_WORDS: usize = 64;

/// `CMSG_SPACE(n * sizeof(int))`.
fn cmsg_space(n: usize) -> usize {
    // SAFETY: CMSG_SPACE is a pure arithmetic macro.
    unsafe { libc::CMSG_SPACE((n * mem::size_of::<RawFd>()) as u32) as usize }
}

/// Writes `bufs` with `send_fd` attached as one `SCM_RIGHTS` message.
/// Returns the number of bytes written; the fd travels with the first byte,
/// so on a partial write it has been sent all the same.
pub(crate) fn send_with_fd(
    sock: BorrowedFd<'_>,
    bufs: &[IoSlice<'_>],
    send_fd: BorrowedFd<'_>,
) -> io::Result<usize> {
    let mut cbuf = [0u64; 4];
    let space = cmsg_space(1);
    debug_assert!(space <= mem::size_of_val(&cbuf));
    // SAFETY: msghdr is a plain C struct for which all-zeroes is valid.
    let mut msg: libc::msghdr = unsafe { mem::zeroed() };
    msg.msg_iov = bufs.as_ptr() as *mut libc::iovec;
    msg.msg_iovlen = bufs.len() as _;
    msg.msg_control = cbuf.as_mut_ptr().cast();
    msg.msg_controllen = space as _;
    // SAFETY: msg_control points at `space` zeroed, 8-byte aligned bytes, enough
    // for one cmsghdr holding one int, so CMSG_FIRSTHDR is non-null and the
    // header and its data lie inside the buffer. IoSlice is ABI-compatible
    // with iovec (documented by std).
    let n = unsafe {
        let cmsg = libc::CMSG_FIRSTHDR(&msg);
        (*cmsg).cmsg_level = libc::SOL_SOCKET;
        (*cmsg).cmsg_type = libc::SCM_RIGHTS;
        (*cmsg).cmsg_len = libc::CMSG_LEN(mem::size_of::<RawFd>() as u32) as _;
        std::ptr::write_unaligned(libc::CMSG_DATA(cmsg).cast::<RawFd>(), send_fd.as_raw_fd());
        libc::sendmsg(sock.as_raw_fd(), &msg, libc::MSG_NOSIGNAL)
    };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(n as usize)
}

/// The result of [`recv_with_fds`].
pub(crate) struct Received {
    /// Bytes read; 0 means end of stream.
    pub(crate) bytes: usize,
    /// How many fds arrived with them.
    pub(crate) fds: usize,
    /// Whether the kernel dropped control data for lack of room
    /// (`MSG_CTRUNC`): some fds that were sent did not arrive.
    pub(crate) truncated: bool,
    /// Control messages of a type other than `SCM_RIGHTS` that were ignored.
    pub(crate) other_cmsgs: usize,
}

impl Received {
    /// Whether control data came with the bytes. The kernel
    /// (`unix_stream_read_generic`) ends a read right after a message that
    /// carries fds, so only a short read without control data proves the
    /// socket had nothing more queued.
    pub(crate) fn brought_control(&self) -> bool {
        self.fds > 0 || self.truncated || self.other_cmsgs > 0
    }
}

/// Reads into `buf` with `recvmsg`, appending any received fds to `fds`.
/// Each fd is owned from the moment it is parsed, so none leaks whatever
/// the caller does next.
pub(crate) fn recv_with_fds(
    sock: BorrowedFd<'_>,
    buf: &mut [u8],
    fds: &mut impl Extend<OwnedFd>,
) -> io::Result<Received> {
    let mut cbuf = [0u64; CMSG_BUF_WORDS];
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    // SAFETY: msghdr is a plain C struct for which all-zeroes is valid.
    let mut msg: libc::msghdr = unsafe { mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = cbuf.as_mut_ptr().cast();
    msg.msg_controllen = mem::size_of_val(&cbuf) as _;
    // SAFETY: iov points at `buf`, valid for writes of buf.len() bytes; the
    // control buffer is valid for its full, declared length.
    let n = unsafe { libc::recvmsg(sock.as_raw_fd(), &mut msg, libc::MSG_CMSG_CLOEXEC) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    let mut other = 0;
    let mut received = 0;
    // SAFETY: the kernel filled msg_control/msg_controllen; CMSG_FIRSTHDR and
    // CMSG_NXTHDR only walk headers inside that range. For SCM_RIGHTS the
    // data is an array of ints whose length follows from cmsg_len; each int
    // is an fd the kernel just installed in this process, owned by nobody
    // else, so wrapping it in OwnedFd is sound.
    unsafe {
        let mut cmsg = libc::CMSG_FIRSTHDR(&msg);
        while !cmsg.is_null() {
            if (*cmsg).cmsg_level == libc::SOL_SOCKET && (*cmsg).cmsg_type == libc::SCM_RIGHTS {
                let data = libc::CMSG_DATA(cmsg);
                let header = data.offset_from(cmsg.cast::<u8>()) as usize;
                let count = ((*cmsg).cmsg_len as usize - header) / mem::size_of::<RawFd>();
                for i in 0..count {
                    let fd = std::ptr::read_unaligned(data.cast::<RawFd>().add(i));
                    fds.extend(Some(OwnedFd::from_raw_fd(fd)));
                }
                received += count;
            } else {
                other += 1;
            }
            cmsg = libc::CMSG_NXTHDR(&msg, cmsg);
        }
    }
    Ok(Received {
        bytes: n as usize,
        fds: received,
        truncated: msg.msg_flags & libc::MSG_CTRUNC != 0,
        other_cmsgs: other,
    })
}
