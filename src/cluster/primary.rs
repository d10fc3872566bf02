//! The primary (`lib/internal/cluster/primary.js`).

use std::cell::RefCell;
use std::fmt;
use std::io;
use std::rc::{Rc, Weak};

use super::worker::Worker;
use crate::ipc::ChannelError;
use crate::uv::Loop;

/// An error reported by the cluster through an `error` callback.
#[derive(Debug)]
pub enum ClusterError {
    /// Forking a worker failed.
    Spawn(io::Error),
    /// The worker's IPC channel reported a fault (malformed message, stray
    /// fd, I/O error).
    Channel(ChannelError),
    /// A cluster message was malformed or out of place.
    Protocol(String),
    /// Binding or listening for a worker's server failed.
    Listen {
        /// Node's negative errno (`-98` for EADDRINUSE).
        errno: i64,
        /// Node's error code (`"EADDRINUSE"`).
        code: String,
        /// The failing call (`"bind"`, `"listen"`).
        syscall: String,
    },
}

impl fmt::Display for ClusterError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ClusterError::Spawn(e) => write!(f, "fork failed: {e}"),
            ClusterError::Channel(e) => write!(f, "worker channel: {e}"),
            ClusterError::Protocol(m) => write!(f, "cluster protocol: {m}"),
            ClusterError::Listen {
                errno,
                code,
                syscall,
            } => write!(f, "{syscall} {code} ({errno})"),
        }
    }
}

impl std::error::Error for ClusterError {}

pub(crate) struct PrimaryInner {}

pub(crate) type PrimaryRef = Weak<RefCell<PrimaryInner>>;

/// The cluster primary.
#[derive(Clone)]
pub struct Primary {
    #[allow(dead_code)]
    inner: Rc<RefCell<PrimaryInner>>,
}

impl fmt::Debug for Primary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Primary").finish_non_exhaustive()
    }
}

pub(crate) fn disconnect_worker(_lp: &mut Loop, _p: &PrimaryRef, _w: &Worker) {}
