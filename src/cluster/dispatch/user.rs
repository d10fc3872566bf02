//! A user scheduler ([`Primary::set_scheduler`](crate::cluster::Primary::set_scheduler)):
//! a function places each connection on a worker.

use super::{Book, ConnInfo, Next, Scheduler, Strategy, WorkerId, WorkerLoad};

/// Each arriving connection is placed by the user's function: on a worker
/// (it waits in that worker's own queue, which the worker drains before the
/// shared one, so the window still holds) or, for `None` or a worker that
/// cannot take connections, in the shared queue, which goes round-robin.
pub(crate) struct UserScheduler {
    f: Scheduler,
}

impl UserScheduler {
    /// A strategy that places connections with `f`.
    pub(crate) fn new(f: Scheduler) -> UserScheduler {
        UserScheduler { f }
    }
}

impl std::fmt::Debug for UserScheduler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("UserScheduler")
    }
}

impl Strategy for UserScheduler {
    fn wants_load(&self) -> bool {
        true
    }

    fn places(&self) -> bool {
        true
    }

    fn place(&mut self, conn: &ConnInfo, workers: &[WorkerLoad]) -> Option<WorkerId> {
        (self.f)(conn, workers)
    }

    fn next(&mut self, book: &Book, now: u64) -> Next {
        super::round_robin::first_free(book, now)
    }
}
