//! UDP handles (libuv's `src/unix/udp.c`).

use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};

use super::event_loop::{Data, Loop, Ready, einval};
use super::handle::{Handle, RawHandle, Udp};
use crate::sys;

/// The state of a UDP handle.
#[derive(Default)]
pub(crate) struct UdpState {
    sock: Option<mio::net::UdpSocket>,
}

impl UdpState {
    pub(crate) fn fd(&self) -> Option<BorrowedFd<'_>> {
        self.sock.as_ref().map(|s| s.as_fd())
    }
}

fn udp_mut(lp: &mut Loop, raw: RawHandle) -> io::Result<&mut UdpState> {
    match &mut lp.slot_mut(raw)?.data {
        Data::Udp(u) => Ok(u),
        _ => unreachable!("a Handle<Udp> always names a UDP slot"),
    }
}

impl Loop {
    /// Creates a UDP handle with no socket yet (`uv_udp_init`).
    pub fn udp_init(&mut self) -> Handle<Udp> {
        Handle::from_raw(self.insert(Data::Udp(Box::default())))
    }

    /// Adopts a UDP socket (`uv_udp_open`). The fd is made non-blocking and
    /// CLOEXEC.
    ///
    /// # Errors
    ///
    /// A stale id, a handle that already has a socket (`EBUSY`), or an fd
    /// that is not an inet datagram socket (`EINVAL`).
    pub fn udp_open(&mut self, h: Handle<Udp>, fd: OwnedFd) -> io::Result<()> {
        let u = udp_mut(self, h.raw)?;
        if u.sock.is_some() {
            return Err(io::Error::from_raw_os_error(nix::libc::EBUSY));
        }
        if sys::fd::socket_kind(fd.as_fd()) != sys::fd::SocketKind::Udp {
            return Err(einval("udp_open: not a UDP socket"));
        }
        sys::fd::set_cloexec_nonblock(fd.as_fd())?;
        u.sock = Some(mio::net::UdpSocket::from_std(fd.into()));
        Ok(())
    }
}

pub(crate) fn on_io(_lp: &mut Loop, _raw: RawHandle, _ready: Ready) {}

pub(crate) fn run_pending(_lp: &mut Loop, _raw: RawHandle) {}

pub(crate) fn close_now(lp: &mut Loop, raw: RawHandle) {
    if let Ok(u) = udp_mut(lp, raw) {
        u.sock = None;
    }
}

pub(crate) fn finish_close(_lp: &mut Loop, _raw: RawHandle) {}
