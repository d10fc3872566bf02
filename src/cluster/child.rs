//! The worker side (`lib/internal/cluster/child.js`).

use std::io;

use super::worker::Worker;
use crate::uv::Loop;

/// In a worker process: connects to the primary (wip).
///
/// # Errors
///
/// Not yet.
pub fn setup_worker(_lp: &mut Loop) -> io::Result<Option<Worker>> {
    Ok(None)
}

pub(crate) fn disconnect_self(_lp: &mut Loop, _w: &Worker) {}
pub(crate) fn destroy_self(_lp: &mut Loop, _w: &Worker) {}
