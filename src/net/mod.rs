//! Node's `net`-level conveniences on [`uv`](crate::uv) handles: a
//! [`Server`] that listens on a TCP port, a Unix socket path or an
//! inherited fd, and tracks its connections (open, idle, closed however
//! they are closed) so that a graceful [`Server::close`] ends; and
//! [`parse_port`] for ports given as text.
//!
//! In a cluster worker, [`Server::listen`] does not bind by itself: it asks
//! the primary (Node's `listenInCluster`). The cluster installs a
//! [`ClusterHook`] for that, so this module never depends on the cluster.

mod dgram;
mod server;

use std::rc::Rc;
use std::time::Duration;

pub use dgram::{BindOptions, bind_dgram};
pub use server::{
    BadPort, ListenError, ListenOptions, Server, ServerAddress, parse_port, port_from_env,
};

use crate::uv::{Handle, Ids, Loop, Udp};

/// The completion of a UDP bind through the cluster.
pub type BindCb = Box<dyn FnOnce(&mut Loop, Result<Handle<Udp>, ListenError>)>;

/// How a cluster worker routes [`Server::listen`] and [`Server::close`]
/// through its primary. Installed on a loop with [`set_cluster_hook`] by
/// [`cluster::setup_worker`](crate::cluster::setup_worker).
pub trait ClusterHook {
    /// Starts listening for `server` through the primary. The hook finishes
    /// by calling the server's listen completion (success or error).
    fn listen(&self, lp: &mut Loop, server: Server, opts: &ListenOptions);
    /// Tells the primary that `server` closed.
    fn close(&self, lp: &mut Loop, server: Server);
    /// Binds a UDP socket through the primary (always a shared socket).
    fn bind_udp(&self, lp: &mut Loop, opts: &BindOptions, cb: BindCb);
}

/// The `net` layer's state, kept in the loop ([`Loop::context_mut`]): the
/// servers, by id, and the cluster hook of a worker.
#[derive(Default)]
pub(crate) struct NetContext {
    servers: Ids<server::ServerState>,
    hook: Option<Rc<dyn ClusterHook>>,
}

/// Installs (or with `None` removes) the hook that routes listens through a
/// cluster primary, for the servers of loop `lp`.
pub fn set_cluster_hook(lp: &mut Loop, hook: Option<Rc<dyn ClusterHook>>) {
    lp.context_mut::<NetContext>().hook = hook;
}

pub(crate) fn cluster_hook(lp: &Loop) -> Option<Rc<dyn ClusterHook>> {
    lp.context::<NetContext>()?.hook.clone()
}

/// Runs `f` on the next loop iteration (Node's `process.nextTick` /
/// `setImmediate` for events that must not fire inside the call that
/// caused them): from a zero timer. The cluster uses it too, for the
/// events Node emits on the next tick.
pub fn defer(lp: &mut Loop, f: impl FnOnce(&mut Loop) + 'static) {
    let t = lp.timer_init();
    let mut f = Some(f);
    let started = lp.timer_start(t, Duration::ZERO, Duration::ZERO, move |lp, t| {
        lp.close_if_open(t);
        if let Some(f) = f.take() {
            f(lp);
        }
    });
    // A 0 ms timer does not fail to start on a fresh handle; if it ever
    // did, the handle must not be left behind.
    if started.is_err() {
        lp.close_if_open(t);
    }
}
