//! Least connections, among the workers known to be running
//! ([`SchedulingPolicy::LeastConnections`](crate::cluster::SchedulingPolicy::LeastConnections)).

use std::collections::BTreeSet;

use super::{Book, Next, Strategy, WorkerId, WorkerRec};

/// How long a worker may leave a connection unanswered before
/// [`LeastConnections`] passes it over, in loop milliseconds (so between 1
/// and 2 ms of real time). A Rust worker answers once its loop has polled
/// again, which takes microseconds unless a handler keeps the loop busy.
pub(crate) const STALL_MS: u64 = 2;

/// The least loaded worker that is known to be running takes the next
/// connection.
///
/// A worker's load is its open connections (as it last reported them; for
/// a Node worker, all it has accepted) plus its handoffs in flight. The
/// least loaded worker (ties: fewer in flight, then heard from last) takes
/// the connection if nothing is in flight to it. If something is, it may be
/// stuck in a long handler: the least loaded worker with nothing in flight
/// takes the connection unless it carries more than `2 × load + 1`; then
/// the connection waits for the busy worker's answer, but only until it has been
/// silent for [`STALL_MS`], after which it is passed over (*stalled*) until
/// it answers. Workers backing off after a failed handoff are not
/// candidates. When every worker is stalled, one with nothing in flight
/// (its handoff given up past the timeout) takes the connection, so that
/// connections never wait for an answer that may not come.
///
/// # One handoff in flight per worker, whatever the window
///
/// A worker gets a connection only when nothing is in flight to it, as
/// under Node's rule: the answer is what tells the primary that the
/// worker's loop is running (a Rust worker sends it only after its loop
/// polled again), and a wider window would hand a worker stuck in a long
/// handler its next connection before that answer could be missed.
#[derive(Debug, Default)]
pub(crate) struct LeastConnections {
    /// Workers that left a connection unanswered for [`STALL_MS`], or past
    /// the handoff timeout, passed over until they answer.
    stalled: BTreeSet<WorkerId>,
    /// When the worker waited for will have been silent for [`STALL_MS`].
    due: Option<u64>,
}

impl LeastConnections {
    fn rank(id: WorkerId, w: &WorkerRec) -> (u64, usize, std::cmp::Reverse<u64>, WorkerId) {
        (load(w), w.flights.len(), std::cmp::Reverse(w.heard), id)
    }
}

fn load(w: &WorkerRec) -> u64 {
    w.open + w.flights.len() as u64
}

impl Strategy for LeastConnections {
    fn wants_load(&self) -> bool {
        true
    }

    fn next(&mut self, book: &Book, now: u64) -> Next {
        if book.shared_is_empty() {
            return Next::Idle;
        }
        let candidates = || {
            book.members()
                .filter(|(id, w)| !self.stalled.contains(id) && book.available(w, now))
        };
        let send = |worker| Next::Send { worker, own: false };
        let Some((best, bw)) = candidates().min_by_key(|&(id, w)| Self::rank(id, w)) else {
            // Every worker is stalled. One with nothing in flight (its
            // handoff was given up past the timeout) takes the connection
            // rather than nobody: its answer may never come.
            return (book.members())
                .filter(|(_, w)| w.flights.is_empty() && book.can_take(w, now))
                .min_by_key(|&(id, w)| Self::rank(id, w))
                .map_or(Next::Idle, |(id, _)| send(id));
        };
        if bw.flights.is_empty() {
            return send(best);
        }
        let free = candidates()
            .filter(|(_, w)| w.flights.is_empty())
            .min_by_key(|&(id, w)| Self::rank(id, w));
        match free {
            Some((f, fw)) if load(fw) <= 2 * load(bw) + 1 => send(f),
            Some(_) => {
                let due = bw.flights.first().map_or(now, |f| f.sent) + STALL_MS;
                self.due = Some(self.due.map_or(due, |d| d.min(due)));
                Next::Wait(due)
            }
            // Every worker busy: the next answer runs this again.
            None => Next::Idle,
        }
    }

    fn answered(&mut self, id: WorkerId) {
        self.stalled.remove(&id);
    }

    fn silent(&mut self, id: WorkerId) {
        self.stalled.insert(id);
    }

    fn forget(&mut self, id: WorkerId) {
        self.stalled.remove(&id);
    }

    fn due(&self) -> Option<u64> {
        self.due
    }

    fn wake(&mut self, book: &Book, now: u64) {
        self.due = None;
        let late = book
            .members()
            .filter(|(_, w)| w.flights.first().is_some_and(|f| now >= f.sent + STALL_MS));
        self.stalled.extend(late.map(|(id, _)| id));
    }

    fn close(&mut self) {
        self.due = None;
    }
}
