//! The errors the cluster reports through its `error` callbacks.

use std::fmt;

use super::dispatch::{HandoffFailure, HandoffOutcome};
use super::protocol::ProtocolError;
use crate::ipc::ChannelError;
use crate::uv::Errno;

/// An error reported by the cluster through an `error` callback. (A worker
/// that cannot be forked is no such report: [`Primary::fork`](super::Primary::fork) returns the
/// error.)
#[derive(Debug)]
pub enum ClusterError {
    /// The worker's IPC channel reported a fault (malformed message, stray
    /// fd, I/O error).
    Channel(ChannelError),
    /// A cluster message was malformed or out of place.
    Protocol(ProtocolError),
    /// A connection handed to the worker (round-robin and the modes built
    /// on it) came back without the worker's answer, or connections waited
    /// too long for a worker able to take them (then no worker is named).
    /// The service goes on: this says what happened to the connection.
    /// Node has no such report: its primary waits for the answer forever
    /// and the worker gets no other connection.
    Handoff {
        /// How the handoff ended.
        failure: HandoffFailure,
        /// What became of the connection(s).
        outcome: HandoffOutcome,
        /// How many connections this is about (more than one only for
        /// [`HandoffFailure::NoWorker`]).
        connections: usize,
    },
    /// A worker's shared socket did not reach it (`EMFILE`, after the
    /// worker answered `NODE_HANDLE_NACK`: it is out of fds); the worker's
    /// `listen` (or `bind`) fails with the same error. (A bind that fails
    /// in the primary is only the worker's error, as in Node: its `listen`
    /// fails with it.)
    Listen {
        /// The errno (`EMFILE`).
        errno: Errno,
        /// Node's error code (`"EADDRINUSE"`).
        code: String,
        /// The failing call (`"bind"`, `"listen"`).
        syscall: String,
    },
}

impl fmt::Display for ClusterError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ClusterError::Channel(e) => write!(f, "worker channel: {e}"),
            ClusterError::Protocol(m) => write!(f, "cluster protocol: {m}"),
            ClusterError::Handoff {
                failure,
                outcome,
                connections,
            } => {
                if *connections == 1 {
                    write!(f, "{failure}; the connection was {outcome}")
                } else {
                    write!(f, "{failure}; {connections} connections were {outcome}")
                }
            }
            ClusterError::Listen {
                errno,
                code,
                syscall,
            } => write!(f, "{syscall} {code} ({})", errno.to_wire()),
        }
    }
}

impl std::error::Error for ClusterError {}
