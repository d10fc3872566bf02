//! `dgram.Socket.bind` (lib/dgram.js): a UDP socket bound locally, or, in a
//! cluster worker, through the primary, which always shares UDP sockets.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use super::ListenError;
use crate::uv::{BindFlags, Errno, Handle, Loop, Udp};

/// What to bind (`socket.bind(options)`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct BindOptions {
    /// The port; 0 picks one (in a cluster every worker gets the same).
    pub port: u16,
    /// The address to bind; `None` is the wildcard of the family.
    pub address: Option<String>,
    /// `udp6` instead of `udp4`.
    pub ipv6: bool,
    /// `SO_REUSEADDR` (Node's `reuseAddr`).
    pub reuse_addr: bool,
    /// IPv6 only (Node's `ipv6Only`).
    pub ipv6_only: bool,
    /// In a cluster worker: bind locally instead of through the primary.
    pub exclusive: bool,
}

impl BindOptions {
    /// The Node wire flags: `UV_UDP_IPV6ONLY` (1) and `UV_UDP_REUSEADDR` (4).
    pub fn wire_flags(&self) -> i64 {
        (if self.ipv6_only { 1 } else { 0 }) | (if self.reuse_addr { 4 } else { 0 })
    }
}

/// Binds a UDP socket (`dgram.createSocket(type).bind(options, cb)`). `cb`
/// gets the bound handle (receive and send with the `udp_*` calls of the
/// loop) or the error, always from the loop. In a cluster worker, unless
/// `exclusive`, the primary binds and every worker asking for the same
/// address gets a copy of one socket, as in Node.
pub fn bind_dgram(
    lp: &mut Loop,
    opts: BindOptions,
    cb: impl FnOnce(&mut Loop, Result<Handle<Udp>, ListenError>) + 'static,
) {
    match super::cluster_hook(lp) {
        Some(hook) if !opts.exclusive => hook.bind_udp(lp, &opts, Box::new(cb)),
        _ => {
            let r = bind_local(lp, &opts);
            super::defer(lp, move |lp| cb(lp, r));
        }
    }
}

fn bind_local(lp: &mut Loop, opts: &BindOptions) -> Result<Handle<Udp>, ListenError> {
    let port = Some(opts.port as i64);
    let ip: IpAddr = match &opts.address {
        Some(a) => a
            .parse()
            .map_err(|_| ListenError::new(Errno::EINVAL, "bind", Some(a.clone()), port))?,
        None if opts.ipv6 => Ipv6Addr::UNSPECIFIED.into(),
        None => Ipv4Addr::UNSPECIFIED.into(),
    };
    let h = lp.udp_init();
    let flags = BindFlags {
        ipv6_only: opts.ipv6_only,
        reuse_addr: opts.reuse_addr,
        reuse_port: false,
    };
    match lp.udp_bind(h, SocketAddr::new(ip, opts.port), flags) {
        Ok(()) => Ok(h),
        Err(e) => {
            lp.close_if_open(h);
            Err(ListenError::from_io(&e, "bind", Some(ip.to_string()), port))
        }
    }
}
