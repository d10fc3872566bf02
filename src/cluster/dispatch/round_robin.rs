//! Node's round-robin (`lib/internal/cluster/round_robin_handle.js`): the
//! next waiting connection goes to the worker that has been free longest.

use super::{Book, Next, Strategy};

/// Node's rule: of the workers that can take a connection, the one that
/// became free first (Node's `free` list) takes the head of the queue. With
/// a window wider than 1, a worker with fewer handoffs in flight comes
/// first, so connections spread before they pile up on one worker.
#[derive(Debug, Default)]
pub(crate) struct RoundRobin;

impl Strategy for RoundRobin {
    fn wants_load(&self) -> bool {
        false
    }

    fn next(&mut self, book: &Book, now: u64) -> Next {
        first_free(book, now)
    }
}

/// The worker free longest among those that can take a connection and
/// have one waiting (in their own queue, taken first, or the shared one).
pub(super) fn first_free(book: &Book, now: u64) -> Next {
    book.members()
        .filter(|(_, w)| book.can_take(w, now) && (!w.own.is_empty() || !book.shared_is_empty()))
        .min_by_key(|(id, w)| (w.flights.len(), w.free_since, *id))
        .map_or(Next::Idle, |(worker, w)| Next::Send {
            worker,
            own: !w.own.is_empty(),
        })
}
