//! Which worker gets each connection: the primary's dispatcher as a pure
//! state machine (GUIDE.md §3, "Pure core, I/O shell").
//!
//! The primary's round-robin handle (`round_robin_handle.rs`, Node's
//! `lib/internal/cluster/round_robin_handle.js`) listens, accepts and talks
//! to workers; every decision about where a connection goes is taken here,
//! by a [`Dispatcher`] that does no I/O at all. The shell feeds it
//! **events** and executes the **actions** it queues:
//!
//! | event (a method) | from |
//! | --- | --- |
//! | [`accept`](Dispatcher::accept) | the listener accepted a connection |
//! | [`add_worker`](Dispatcher::add_worker) | a worker's `queryServer` was answered |
//! | [`drain`](Dispatcher::drain), [`remove_worker`](Dispatcher::remove_worker), [`lost`](Dispatcher::lost) | a worker takes nothing new, leaves, or can no longer answer |
//! | [`delivered`](Dispatcher::delivered) | the worker's `NODE_HANDLE_ACK`/`NACK`, or the write's failure |
//! | [`send_failed`](Dispatcher::send_failed) | a `newconn` could not even be queued (the channel is closed) |
//! | [`answered`](Dispatcher::answered), [`load`](Dispatcher::load) | the worker's `{accepted, load?}` reply, or its load report |
//! | [`tick`](Dispatcher::tick) | the timer asked for by [`Action::Timer`] fired |
//! | [`close`](Dispatcher::close), [`close_all`](Dispatcher::close_all) | the listener closes; the primary goes away |
//!
//! and the actions ([`Action`]) are: send this connection to that worker,
//! close the primary's copy of this connection, report a failed handoff,
//! arm (or drop) the one timer. Time is the loop's clock in milliseconds,
//! passed with each event.
//!
//! # Ownership
//!
//! At every instant each accepted connection is in exactly one place: the
//! shared queue, one worker's own queue (placed there by a user
//! scheduler), in flight to one worker (a *handoff*), or gone: the
//! dispatcher has asked for it to be closed, exactly once, either because
//! a worker accepted it (the primary closes its copy) or because no worker
//! could take it. The property test in this module's tests checks this
//! over random event sequences.
//!
//! # Strategies and the handoff window
//!
//! Which worker takes the next queued connection is a [`Strategy`]: Node's
//! round-robin ([`RoundRobin`]: the first free worker), least connections
//! ([`LeastConnections`]), or a user scheduler ([`UserScheduler`]: a
//! function that places each connection on a worker). Everything else,
//! the handoffs in flight, back-off after a failed one, timeouts, and
//! closing what no worker can take, is common to all three.
//!
//! A worker may have up to `window` handoffs in flight
//! ([`Config::window`]). Node's rule is a window of 1: a worker gets its
//! next connection only after it answered `{accepted}` for the previous
//! one. A wider window lets the primary hand a busy worker its next
//! connection before the answer comes; the IPC channel still sends one fd
//! at a time, each after the previous one's `NODE_HANDLE_ACK`, so a Node
//! worker sees nothing new. A worker whose handoff failed gets one at a
//! time until a handoff reaches it again.

mod least_connections;
mod round_robin;
mod user;

#[cfg(test)]
mod tests;

use std::collections::{BTreeMap, VecDeque};
use std::fmt;
use std::rc::Rc;

pub(crate) use least_connections::LeastConnections;
pub(crate) use round_robin::RoundRobin;
pub(crate) use user::UserScheduler;

/// How long a handoff may go unanswered, and how long a connection may wait
/// while no worker can take it, unless
/// [`Primary::set_handoff_timeout`](super::Primary::set_handoff_timeout)
/// says otherwise. A worker answers a `newconn` within a loop iteration or
/// two; five seconds is far beyond that, and short of the minutes a client
/// would otherwise hang.
pub const DEFAULT_HANDOFF_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// How many connections may be in flight to one worker at a time, unless
/// [`Primary::set_handoff_window`](super::Primary::set_handoff_window) or
/// [`HANDOFF_WINDOW_ENV`] says otherwise. 1 is Node's rule; see
/// [`Primary::set_handoff_window`](super::Primary::set_handoff_window) for
/// what a wider window buys.
pub const DEFAULT_HANDOFF_WINDOW: usize = 1;

/// The environment variable a [`Primary`](super::Primary) reads its handoff
/// window from when it is created (a whole number from 1 up); see
/// [`parse_handoff_window`].
pub const HANDOFF_WINDOW_ENV: &str = "UVCLUSTER_HANDOFF_WINDOW";

/// The largest handoff window [`parse_handoff_window`] takes: more
/// connections in flight to one worker than this only makes them wait in
/// its channel.
pub const MAX_HANDOFF_WINDOW: usize = 64;

/// Parses a handoff window as [`HANDOFF_WINDOW_ENV`] spells it: a decimal
/// whole number from 1 to [`MAX_HANDOFF_WINDOW`].
///
/// # Errors
///
/// [`std::io::ErrorKind::InvalidInput`] naming the value, for anything
/// else.
///
/// # Examples
///
/// ```
/// use uvcluster::cluster::parse_handoff_window;
///
/// assert_eq!(parse_handoff_window("2").unwrap(), 2);
/// assert!(parse_handoff_window("0").is_err());
/// assert!(parse_handoff_window("two").is_err());
/// ```
pub fn parse_handoff_window(s: &str) -> std::io::Result<usize> {
    match s.parse::<usize>() {
        Ok(n) if (1..=MAX_HANDOFF_WINDOW).contains(&n) && s.bytes().all(|b| b.is_ascii_digit()) => {
            Ok(n)
        }
        _ => Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!(
                "{HANDOFF_WINDOW_ENV} should be a whole number from 1 to \
                 {MAX_HANDOFF_WINDOW}. Received {s:?}"
            ),
        )),
    }
}

/// The first back-off of a worker whose handoff failed (NACK or a failed
/// write), in loop milliseconds; it doubles with each failure in a row.
pub(crate) const BACKOFF_MIN_MS: u64 = 10;

/// The longest back-off, in loop milliseconds: a worker at its fd limit is
/// tried at most twice a second, and takes connections again within half a
/// second of having fds.
pub(crate) const BACKOFF_MAX_MS: u64 = 500;

/// How a handoff (a `newconn` sent to a worker with a connection's fd)
/// ended without the worker's `{accepted}` answer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HandoffFailure {
    /// The worker answered `NODE_HANDLE_NACK`: the message reached it
    /// without its fd. The kernel drops an fd the receiver has no room for
    /// (`MSG_CTRUNC`), as when the worker is at its `RLIMIT_NOFILE`.
    Rejected,
    /// The message could not be written to the worker's channel: its end is
    /// closed (`EPIPE`), because the worker exited or closed it.
    NotSent,
    /// The worker's channel closed before it answered (it exited or
    /// disconnected).
    ChannelClosed,
    /// The worker's process exited before it answered.
    Exited,
    /// The worker acknowledged the fd but sent no answer within the
    /// handoff timeout.
    NoAnswer,
    /// The worker has not read the handoff (no ACK) within the handoff
    /// timeout: its loop is not reading its channel.
    Unread,
    /// Connections waited the handoff timeout while no worker could take
    /// one (every worker was backing off or had a handoff unread).
    NoWorker,
}

impl fmt::Display for HandoffFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            HandoffFailure::Rejected => {
                "the worker could not receive a connection's fd (NODE_HANDLE_NACK; \
                 out of file descriptors?)"
            }
            HandoffFailure::NotSent => {
                "a connection could not be written to the worker's channel \
                 (its end is closed: the worker exited)"
            }
            HandoffFailure::ChannelClosed => {
                "the worker's channel closed (it exited or disconnected) before it \
                 answered for a connection"
            }
            HandoffFailure::Exited => "the worker exited before it answered for a connection",
            HandoffFailure::NoAnswer => {
                "the worker took a connection but sent no answer within the handoff timeout"
            }
            HandoffFailure::Unread => {
                "the worker has not read a connection handed to it within the handoff timeout"
            }
            HandoffFailure::NoWorker => {
                "connections waited the handoff timeout with no worker able to take them"
            }
        })
    }
}

/// What became of the connection(s) of a failed handoff.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HandoffOutcome {
    /// Back at the head of the queue: the next free worker takes it.
    Rehanded,
    /// Closed (no worker is left, or none could take it in time).
    Closed,
    /// Left to the worker, which holds it; the primary closed its copy.
    LeftWithWorker,
    /// Still in flight to the worker, which gets no other connection until
    /// it reads it.
    StillInFlight,
}

impl fmt::Display for HandoffOutcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            HandoffOutcome::Rehanded => "re-handed to the next free worker",
            HandoffOutcome::Closed => "closed",
            HandoffOutcome::LeftWithWorker => "left to the worker (the primary closed its copy)",
            HandoffOutcome::StillInFlight => "still in flight until the worker reads it",
        })
    }
}

/// What a scheduler sees of one worker when it picks where a connection
/// goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WorkerLoad {
    /// The worker's id.
    pub id: u32,
    /// Open connections: as the worker last reported them (Rust workers
    /// report with every accept reply and when connections end), plus those
    /// it accepted since; for a Node worker, everything it has accepted.
    pub open: u64,
    /// Connections handed to it and not yet answered, or waiting for it.
    pub queued: u64,
    /// Connections it has accepted in all.
    pub accepted: u64,
    /// When the worker last spoke to the primary (an accept reply or a
    /// load report), as a count that only grows: of two workers, the one
    /// with the larger `heard` answered more recently. A worker stuck in a
    /// long synchronous handler falls behind.
    pub heard: u64,
}

/// What a scheduler sees of the connection to place.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ConnInfo {
    /// The client's address (TCP), if known; an IPv4 client of a
    /// dual-stack listener appears as its IPv4 address.
    pub peer: Option<std::net::SocketAddr>,
}

/// A user scheduler: picks the worker for a connection from every worker's
/// load, or `None` for the default (first free worker).
pub type Scheduler = Rc<dyn Fn(&ConnInfo, &[WorkerLoad]) -> Option<u32>>;

/// The upper bounds of the [`LatencyHistogram`] buckets, in loop
/// milliseconds; a last bucket (`+Inf`) takes the rest.
pub const HANDOFF_LATENCY_BUCKETS_MS: [u64; 12] =
    [1, 2, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000];

/// A histogram of handoff latencies: for each handoff a worker answered,
/// the time from sending its `newconn` to the worker's `{accepted}` answer
/// reaching the dispatcher, in loop milliseconds (the loop's clock, so
/// whole milliseconds as of each loop iteration's start). A handoff that
/// failed or was never answered is not counted.
///
/// The buckets are fixed ([`HANDOFF_LATENCY_BUCKETS_MS`] and `+Inf`), so
/// histograms of several handles (and primaries) merge by adding.
///
/// # Examples
///
/// ```
/// use uvcluster::cluster::LatencyHistogram;
///
/// let mut h = LatencyHistogram::default();
/// h.record(0);
/// h.record(3);
/// h.record(9000);
/// assert_eq!((h.count(), h.sum_ms()), (3, 9003));
/// let b = h.cumulative();
/// assert_eq!(b[0], (Some(1), 1)); // at most 1 ms: one
/// assert_eq!(b[2], (Some(5), 2)); // at most 5 ms: two
/// assert_eq!(b[b.len() - 1], (None, 3)); // +Inf: all
/// ```
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LatencyHistogram {
    /// Per bucket (not cumulative), the last one `+Inf`.
    buckets: [u64; HANDOFF_LATENCY_BUCKETS_MS.len() + 1],
    count: u64,
    sum_ms: u64,
}

impl LatencyHistogram {
    /// Counts one handoff that took `ms` loop milliseconds.
    pub fn record(&mut self, ms: u64) {
        let i = HANDOFF_LATENCY_BUCKETS_MS
            .iter()
            .position(|&le| ms <= le)
            .unwrap_or(HANDOFF_LATENCY_BUCKETS_MS.len());
        self.buckets[i] += 1;
        self.count += 1;
        self.sum_ms = self.sum_ms.saturating_add(ms);
    }

    /// Adds `other`'s counts to these.
    pub fn merge(&mut self, other: &LatencyHistogram) {
        for (a, b) in self.buckets.iter_mut().zip(other.buckets) {
            *a += b;
        }
        self.count += other.count;
        self.sum_ms = self.sum_ms.saturating_add(other.sum_ms);
    }

    /// Handoffs counted.
    pub fn count(&self) -> u64 {
        self.count
    }

    /// Their latencies added up, in loop milliseconds.
    pub fn sum_ms(&self) -> u64 {
        self.sum_ms
    }

    /// The buckets as Prometheus counts them: for each upper bound in
    /// milliseconds (`None` for `+Inf`), the handoffs that took at most
    /// that long. The last count equals [`count`](Self::count).
    pub fn cumulative(&self) -> Vec<(Option<u64>, u64)> {
        let bounds = HANDOFF_LATENCY_BUCKETS_MS.iter().map(|&b| Some(b));
        let mut total = 0;
        bounds
            .chain(std::iter::once(None))
            .zip(self.buckets)
            .map(|(le, n)| {
                total += n;
                (le, total)
            })
            .collect()
    }
}

/// One worker as [`DispatchStats`] shows it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct WorkerDispatch {
    /// Connections waiting for it (placed on it by a user scheduler) or in
    /// flight to it (sent, not yet answered), as [`WorkerLoad::queued`].
    pub queued: u64,
    /// The connections it holds open, as it last reported them (plus those
    /// it accepted since): `Some` only when the worker reports its load,
    /// which a Rust worker does under a load-aware policy
    /// ([`SchedulingPolicy::LeastConnections`](super::SchedulingPolicy::LeastConnections)
    /// or a user scheduler). Under plain round-robin, and for a Node
    /// worker, the primary sees connections go out but never sees them
    /// close: `None`.
    pub open: Option<u64>,
}

/// What a primary's round-robin dispatchers hold, from
/// [`Primary::dispatch_stats`](super::Primary::dispatch_stats).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DispatchStats {
    /// The dispatch queue length: connections the primary accepted that
    /// wait for a worker (not yet sent to one), over every round-robin
    /// handle. 0 under the shared policies, where the kernel queues them.
    pub queued: u64,
    /// Connections sent to a worker that has not answered yet.
    pub in_flight: u64,
    /// Handoff latencies, merged over every round-robin handle, those
    /// closed since included (so its counts never go down).
    pub handoff_latency: LatencyHistogram,
    /// Per worker id, summed over the handles it serves; a worker on no
    /// round-robin handle is absent.
    pub workers: BTreeMap<u32, WorkerDispatch>,
}

/// A worker's id (Node's `worker.id`).
pub(crate) type WorkerId = u32;

/// A connection the dispatcher knows, numbered from 0 in the order the
/// listener accepted them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(crate) struct ConnId(pub(crate) u64);

/// One handoff: a connection sent to a worker, numbered in sending order,
/// so that its delivery report and its answer reach the right one even
/// when the same connection goes to the same worker twice.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(crate) struct HandoffId(pub(crate) u64);

/// How the `NODE_HANDLE` of a `newconn` fared (the channel's
/// `HandleDelivery`, without its I/O error).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Delivery {
    /// `NODE_HANDLE_ACK`: the fd reached the worker.
    Acked,
    /// `NODE_HANDLE_NACK`: the message arrived without its fd.
    Nacked,
    /// The write failed: the worker's end of the channel is closed.
    NotSent,
}

/// What the shell must do, in order.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Action {
    /// Send `conn` to `worker` as `newconn`, and feed back how it went:
    /// [`Dispatcher::delivered`] and [`Dispatcher::answered`] with
    /// `handoff`, or at once [`Dispatcher::send_failed`] if the message
    /// could not be queued on the channel.
    Send {
        /// The worker.
        worker: WorkerId,
        /// The connection.
        conn: ConnId,
        /// This handoff, for the events that report on it.
        handoff: HandoffId,
    },
    /// Close the primary's copy of `conn`: a worker accepted it, or no
    /// worker could take it. The dispatcher forgets it.
    Close(ConnId),
    /// Report a failed handoff through the primary's `error` event.
    Report {
        /// The worker it concerns, if any (`None` for
        /// [`HandoffFailure::NoWorker`], and for a worker that already left
        /// the handle).
        worker: Option<WorkerId>,
        /// How the handoff ended.
        failure: HandoffFailure,
        /// What became of the connections.
        outcome: HandoffOutcome,
        /// How many connections.
        connections: usize,
    },
    /// Arm the timer for loop time `Some(at)` (replacing an earlier
    /// arming), and call [`Dispatcher::tick`] when it fires; `None`: the
    /// timer is no longer needed, close it.
    Timer(Option<u64>),
}

/// A dispatcher's fixed parameters.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Config {
    /// The handoff timeout, in loop milliseconds (at least 1).
    pub(crate) timeout_ms: u64,
    /// Handoffs that may be in flight to one worker at a time (at least 1).
    pub(crate) window: usize,
}

/// What a [`Strategy`] decides for the connections waiting.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Next {
    /// Send the head of `worker`'s own queue (`own`) or of the shared queue
    /// to `worker`, which must be able to take one ([`Book::can_take`]).
    Send {
        /// The worker.
        worker: WorkerId,
        /// From the worker's own queue rather than the shared one.
        own: bool,
    },
    /// Send nothing now, and ask again at this loop time (the strategy's
    /// [`due`](Strategy::due) says so), or on the next event.
    Wait(u64),
    /// Send nothing until the next event.
    Idle,
}

/// How connections are spread over workers: what differs between Node's
/// round-robin, least connections and a user scheduler. The rest (handoffs
/// in flight, back-off, timeouts, ownership) is the [`Dispatcher`]'s, and
/// a strategy sees it through a read-only [`Book`].
pub(crate) trait Strategy: fmt::Debug {
    /// Whether workers should report their open connections (the primary
    /// then sends `loadReports: true` in its `queryServer` reply).
    fn wants_load(&self) -> bool;

    /// Whether [`place`](Self::place) is a real choice (so the shell finds
    /// each connection's [`ConnInfo`], a `getpeername` per connection).
    fn places(&self) -> bool {
        false
    }

    /// Where an arriving (or refused) connection waits: on one worker
    /// (`Some(id)`), or in the shared queue (`None`). Called only when
    /// [`places`](Self::places) and some worker is there; an id that is not
    /// a worker able to take connections is taken as `None`.
    fn place(&mut self, _conn: &ConnInfo, _workers: &[WorkerLoad]) -> Option<WorkerId> {
        None
    }

    /// Which worker takes the next waiting connection.
    fn next(&mut self, book: &Book, now: u64) -> Next;

    /// The worker answered a handoff.
    fn answered(&mut self, _id: WorkerId) {}

    /// The worker left a handoff unanswered past the timeout.
    fn silent(&mut self, _id: WorkerId) {}

    /// The worker left, or can no longer answer.
    fn forget(&mut self, _id: WorkerId) {}

    /// The loop time at which the strategy wants [`wake`](Self::wake).
    fn due(&self) -> Option<u64> {
        None
    }

    /// The strategy's due time came.
    fn wake(&mut self, _book: &Book, _now: u64) {}

    /// The listener closed: nothing will be waiting any more.
    fn close(&mut self) {}
}

/// A connection waiting for a worker.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Queued {
    pub(crate) conn: ConnId,
    /// Loop time when it was accepted.
    since: u64,
    info: ConnInfo,
}

/// A connection sent to a worker, not yet answered.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Flight {
    handoff: HandoffId,
    q: Queued,
    /// Loop time when it was sent.
    pub(crate) sent: u64,
    /// Loop time when the worker acknowledged the fd (`NODE_HANDLE_ACK`).
    acked: Option<u64>,
    /// Whether it was reported as [`HandoffFailure::Unread`].
    unread: bool,
}

/// A worker whose handoffs failed.
#[derive(Clone, Copy, Debug)]
struct Backoff {
    /// Failures in a row.
    failures: u32,
    /// Loop time before which it is not tried again.
    until: u64,
    /// Handoffs numbered below this were sent before the last failure was
    /// counted: their failures belong to the same run.
    epoch: HandoffId,
    /// Whether the end of the back-off has been seen (the worker then
    /// counts as free from that moment).
    ended: bool,
}

/// One worker as the dispatcher knows it.
#[derive(Debug, Default)]
pub(crate) struct WorkerRec {
    /// Still a worker of this handle (Node's `all`); a worker that left
    /// stays known while handoffs to it are in flight.
    member: bool,
    /// Takes nothing new (its channel refused a write, or it is being
    /// drained); what is in flight to it still counts.
    draining: bool,
    /// Draining only until [`Dispatcher::admit`]: a worker held out of
    /// rotation (not yet ready, or at its connection limit).
    held: bool,
    /// Connections a scheduler placed on it, taken before the shared queue.
    pub(crate) own: VecDeque<Queued>,
    /// Its handoffs in flight, in sending order.
    pub(crate) flights: Vec<Flight>,
    /// Open connections, as last reported or counted.
    pub(crate) open: u64,
    /// Whether `open` comes from the worker's own report (a load-reporting
    /// worker under a load-aware policy) rather than from counting what it
    /// accepted, which never counts a close.
    reported: bool,
    /// Connections accepted in all.
    accepted: u64,
    /// When it last spoke (a reply or a load report), as a tick of
    /// [`Book::clock`].
    pub(crate) heard: u64,
    /// When it last became free to take a connection, as a tick: of the
    /// free workers, the one free longest is first (Node's `free` list).
    pub(crate) free_since: u64,
    backoff: Option<Backoff>,
}

/// The dispatcher's state that strategies read: the workers, the shared
/// queue, the parameters.
#[derive(Debug)]
pub(crate) struct Book {
    cfg: Config,
    workers: BTreeMap<WorkerId, WorkerRec>,
    shared: VecDeque<Queued>,
    /// Counts events that order workers: replies, load reports, becoming
    /// free.
    clock: u64,
}

impl Book {
    /// The workers of the handle, by id, with what they are doing.
    pub(crate) fn members(&self) -> impl Iterator<Item = (WorkerId, &WorkerRec)> {
        self.workers
            .iter()
            .filter(|(_, w)| w.member)
            .map(|(&id, w)| (id, w))
    }

    /// Whether the shared queue is empty.
    pub(crate) fn shared_is_empty(&self) -> bool {
        self.shared.is_empty()
    }

    /// Whether worker `id` is backing off at loop time `now`.
    fn cooling(&self, w: &WorkerRec, now: u64) -> bool {
        w.backoff.is_some_and(|b| b.until > now)
    }

    /// Whether worker `w` may be sent a connection at loop time `now`: a
    /// member, not draining, not backing off, and with room in its window
    /// (a window of 1 while its last handoff failed and none reached it
    /// since).
    pub(crate) fn can_take(&self, w: &WorkerRec, now: u64) -> bool {
        w.member && !w.draining && !self.cooling(w, now) && w.flights.len() < self.window(w)
    }

    /// Whether worker `w` takes part in picks at `now`: a member, neither
    /// draining nor backing off. It may still have a full window.
    pub(crate) fn available(&self, w: &WorkerRec, now: u64) -> bool {
        w.member && !w.draining && !self.cooling(w, now)
    }

    /// Handoffs worker `w` may have in flight at once.
    pub(crate) fn window(&self, w: &WorkerRec) -> usize {
        if w.backoff.is_some() {
            1
        } else {
            self.cfg.window
        }
    }

    /// Whether worker `w` cannot be counted on to take a connection: it is
    /// draining, or its last handoff failed and none has reached it since,
    /// or it has left one unread for the timeout.
    /// Whether no worker can take a queued connection, now or later:
    /// every member is failing and none is merely held (a held worker, not
    /// ready yet or at its connection limit, is admitted or removed by
    /// its owner within a bounded time; connections wait for it).
    fn stuck(&self, now: u64) -> bool {
        self.members().all(|(_, w)| self.failing(w, now) && !w.held)
    }

    fn failing(&self, w: &WorkerRec, now: u64) -> bool {
        w.draining
            || w.backoff.is_some()
            || w.flights
                .iter()
                .any(|f| f.acked.is_none() && now >= f.sent + self.cfg.timeout_ms)
    }

    fn tick(&mut self) -> u64 {
        self.clock += 1;
        self.clock
    }

    /// The next loop time at which [`Dispatcher::tick`] has work.
    fn next_deadline(&self, now: u64) -> Option<u64> {
        let t = self.cfg.timeout_ms;
        let backoffs = (self.workers.values())
            .filter_map(|w| w.backoff.map(|b| b.until))
            .filter(|&u| u > now);
        let flights = (self.workers.values())
            .flat_map(|w| &w.flights)
            .filter_map(|f| match f.acked {
                Some(a) => Some(a + t),
                None if !f.unread => Some(f.sent + t),
                None => None,
            });
        // A queued connection's deadline counts only when it is ahead, or
        // when every worker is failing (then `expire` closes it).
        let all_failing = self.stuck(now);
        let queued = (self.shared.front().into_iter())
            .chain(self.workers.values().filter_map(|w| w.own.front()))
            .map(|q| q.since + t)
            .filter(|&d| d > now || all_failing);
        backoffs.chain(flights).chain(queued).min()
    }
}

/// The dispatcher: the scheduling state of one round-robin handle, and the
/// rules, with no I/O. See the [module docs](self).
#[derive(Debug)]
pub(crate) struct Dispatcher {
    book: Book,
    strategy: Box<dyn Strategy>,
    /// The listener is open; once closed, connections that come back are
    /// closed.
    open: bool,
    /// Stay open when the last worker leaves (a supervisor replaces it):
    /// connections wait in the queue for the next worker, up to the
    /// handoff timeout.
    keep_open: bool,
    next_conn: u64,
    next_handoff: u64,
    /// When the timer is armed for, if it is.
    timer: Option<u64>,
    /// Whether the shell holds a timer (so a `Timer(None)` is owed once
    /// nothing needs it).
    timer_live: bool,
    actions: VecDeque<Action>,
    /// Handoff latencies: answer time minus send time.
    latency: LatencyHistogram,
}

impl Dispatcher {
    /// A dispatcher with no worker and nothing queued, spreading
    /// connections by `strategy`.
    ///
    /// # Panics
    ///
    /// If `cfg.timeout_ms` or `cfg.window` is 0.
    pub(crate) fn new(strategy: Box<dyn Strategy>, cfg: Config) -> Dispatcher {
        assert!(cfg.timeout_ms > 0 && cfg.window > 0, "{cfg:?}");
        Dispatcher {
            book: Book {
                cfg,
                workers: BTreeMap::new(),
                shared: VecDeque::new(),
                clock: 0,
            },
            strategy,
            open: true,
            keep_open: false,
            next_conn: 0,
            next_handoff: 0,
            timer: None,
            timer_live: false,
            actions: VecDeque::new(),
            latency: LatencyHistogram::default(),
        }
    }

    /// The next action to execute, in order.
    pub(crate) fn next_action(&mut self) -> Option<Action> {
        self.actions.pop_front()
    }

    /// Handoffs that may be in flight to one worker at a time.
    pub(crate) fn window(&self) -> usize {
        self.book.cfg.window
    }

    /// Whether the strategy wants load reports from workers.
    pub(crate) fn wants_load(&self) -> bool {
        self.strategy.wants_load()
    }

    /// Whether [`accept`](Self::accept) needs the connection's
    /// [`ConnInfo`] (a user scheduler looks at it).
    pub(crate) fn wants_conn_info(&self) -> bool {
        self.strategy.places()
    }

    /// Whether connections are in flight to some worker.
    pub(crate) fn has_in_flight(&self) -> bool {
        self.book.workers.values().any(|w| !w.flights.is_empty())
    }

    /// Whether `id` is a worker of this handle.
    pub(crate) fn has_worker(&self, id: WorkerId) -> bool {
        self.book.workers.get(&id).is_some_and(|w| w.member)
    }

    fn has_members(&self) -> bool {
        self.book.members().next().is_some()
    }

    // ----- events --------------------------------------------------------

    /// The listener accepted a connection at loop time `now`; `info` is
    /// what a user scheduler sees of it (see
    /// [`wants_conn_info`](Self::wants_conn_info)). Returns its id, which
    /// the actions name it by.
    pub(crate) fn accept(&mut self, now: u64, info: ConnInfo) -> ConnId {
        let conn = ConnId(self.next_conn);
        self.next_conn += 1;
        self.distribute(
            now,
            Queued {
                conn,
                since: now,
                info,
            },
        );
        self.settle(now);
        conn
    }

    /// Worker `id` is ready for connections (its `queryServer` reply went
    /// out; Node's `add` followed by `handoff`). Again for a worker already
    /// added, it is only a nudge to hand it what it can take.
    #[cfg(test)]
    pub(crate) fn add_worker(&mut self, now: u64, id: WorkerId) {
        self.add_worker_held(now, id, false);
    }

    /// [`add_worker`](Self::add_worker), the worker joining `held` (out of
    /// rotation until [`admit`](Self::admit)) when asked.
    pub(crate) fn add_worker_held(&mut self, now: u64, id: WorkerId, held: bool) {
        let tick = self.book.tick();
        let w = self.book.workers.entry(id).or_default();
        if !w.member {
            w.member = true;
            w.draining = held;
            w.held = held;
            w.free_since = tick;
        }
        self.settle(now);
    }

    /// Worker `id` takes no new connection until [`admit`](Self::admit),
    /// as after [`drain`](Self::drain) (a worker not ready yet, or at its
    /// connection limit, whose replacement is not ready yet).
    pub(crate) fn hold(&mut self, now: u64, id: WorkerId) {
        let Some(w) = self.book.workers.get_mut(&id).filter(|w| w.member) else {
            return;
        };
        if w.draining {
            return;
        }
        w.draining = true;
        w.held = true;
        self.reassign(now, id);
        self.settle(now);
    }

    /// A worker held by [`hold`](Self::hold) (or added held) takes
    /// connections again. Nothing for a worker drained for good.
    pub(crate) fn admit(&mut self, now: u64, id: WorkerId) {
        let tick = self.book.tick();
        let Some(w) = self.book.workers.get_mut(&id).filter(|w| w.member) else {
            return;
        };
        if !w.held {
            return;
        }
        w.held = false;
        w.draining = false;
        w.free_since = tick;
        self.settle(now);
    }

    /// Worker `id` takes no new connection from now on (it is being
    /// drained, or its channel refused a write): what waits on it goes to
    /// the others; what is in flight to it stays there, and its answers
    /// count as usual.
    pub(crate) fn drain(&mut self, now: u64, id: WorkerId) {
        let Some(w) = self.book.workers.get_mut(&id).filter(|w| w.member) else {
            return;
        };
        w.draining = true;
        w.held = false;
        self.reassign(now, id);
        self.settle(now);
    }

    /// Worker `id` leaves the handle (Node's `remove`). `gone` says why
    /// when it can no longer answer (its channel closed, or its process
    /// exited): what is in flight to it then goes back to the head of the
    /// queue (see [`lost`](Self::lost)). Otherwise it stays in flight and
    /// the worker's answer decides. Returns `true` when it was the last
    /// worker: everything queued is then closed, and so is the handle
    /// ([`close`](Self::close)).
    pub(crate) fn remove_worker(
        &mut self,
        now: u64,
        id: WorkerId,
        gone: Option<HandoffFailure>,
    ) -> bool {
        let Some(w) = self.book.workers.get_mut(&id).filter(|w| w.member) else {
            return false;
        };
        w.member = false;
        w.open = 0;
        w.reported = false;
        w.backoff = None;
        self.strategy.forget(id);
        match gone {
            Some(why) => self.lost(now, id, why),
            None => {
                self.reassign(now, id);
                self.settle(now);
            }
        }
        if self.has_members() || self.keep_open {
            return false;
        }
        self.close(now);
        true
    }

    /// Whether the handle stays open with no worker (see
    /// [`remove_worker`](Self::remove_worker)). Turning it off with no
    /// worker left closes the handle, as the last worker's leaving would
    /// have: returns `true` then.
    pub(crate) fn set_keep_open(&mut self, now: u64, keep: bool) -> bool {
        self.keep_open = keep;
        if keep || !self.open || self.has_members() {
            return false;
        }
        self.close(now);
        true
    }

    /// How many connections worker `id` accepted from this handle.
    pub(crate) fn accepted(&self, id: WorkerId) -> u64 {
        self.book.workers.get(&id).map_or(0, |w| w.accepted)
    }

    /// What this handle's dispatcher holds right now: connections waiting
    /// for a worker, per worker what waits for or is in flight to it and
    /// its open connections where known, and the handoff latencies so far.
    pub(crate) fn stats(&self) -> DispatchStats {
        let own: usize = self.book.workers.values().map(|w| w.own.len()).sum();
        let workers = (self.book.members())
            .map(|(id, w)| {
                let s = WorkerDispatch {
                    queued: (w.own.len() + w.flights.len()) as u64,
                    open: w.reported.then_some(w.open),
                };
                (id, s)
            })
            .collect();
        DispatchStats {
            queued: (self.book.shared.len() + own) as u64,
            in_flight: (self.book.workers.values())
                .map(|w| w.flights.len() as u64)
                .sum(),
            handoff_latency: self.latency.clone(),
            workers,
        }
    }

    /// The handoff latencies so far.
    pub(crate) fn latency(&self) -> &LatencyHistogram {
        &self.latency
    }

    /// Worker `id` can no longer answer (its channel closed, or its process
    /// exited), whether or not it is still a worker of the handle: every
    /// connection in flight to it goes back to the head of the queue, in
    /// the order they were sent, or is closed when the handle is closed or
    /// no worker is left. Reported with `why`.
    pub(crate) fn lost(&mut self, now: u64, id: WorkerId, why: HandoffFailure) {
        self.strategy.forget(id);
        let flights = match self.book.workers.get_mut(&id) {
            Some(w) => {
                w.backoff = None;
                std::mem::take(&mut w.flights)
            }
            None => Vec::new(),
        };
        if !flights.is_empty() {
            let outcome = if !self.open || !self.has_members() {
                HandoffOutcome::Closed
            } else {
                HandoffOutcome::Rehanded
            };
            let n = flights.len();
            for f in flights.into_iter().rev() {
                self.requeue_front(f.q);
            }
            self.report(Some(id), why, outcome, n);
        }
        self.reassign(now, id);
        self.settle(now);
    }

    /// How the `NODE_HANDLE` of handoff `handoff` to worker `id` fared.
    ///
    /// An ACK marks it acknowledged (the answer timeout runs from now) and
    /// ends the worker's back-off (when it was sent after the failure). A
    /// NACK or a failed write puts the
    /// connection back at the head of the queue and makes the worker back
    /// off: [`BACKOFF_MIN_MS`], doubling with each failure in a row up to
    /// [`BACKOFF_MAX_MS`]. Handoffs already in flight when a failure is
    /// counted belong to the same run: their failures neither lengthen the
    /// back-off nor are reported again.
    pub(crate) fn delivered(&mut self, now: u64, id: WorkerId, handoff: HandoffId, d: Delivery) {
        let failure = match d {
            Delivery::Acked => {
                if let Some(w) = self.book.workers.get_mut(&id) {
                    if let Some(f) = w.flights.iter_mut().find(|f| f.handoff == handoff) {
                        f.acked = Some(now);
                    }
                    // The fd reached it: whatever made it fail is over.
                    end_backoff(w, handoff);
                }
                self.settle(now);
                return;
            }
            Delivery::Nacked => HandoffFailure::Rejected,
            Delivery::NotSent => HandoffFailure::NotSent,
        };
        let epoch = HandoffId(self.next_handoff);
        let Some(w) = self.book.workers.get_mut(&id) else {
            return;
        };
        let Some(f) = take_flight(w, handoff) else {
            return;
        };
        let counted = match &mut w.backoff {
            Some(b) if handoff < b.epoch => false,
            b => {
                let b = b.get_or_insert(Backoff {
                    failures: 0,
                    until: now,
                    epoch,
                    ended: false,
                });
                b.failures += 1;
                let delay = BACKOFF_MIN_MS
                    .saturating_mul(1 << (b.failures - 1).min(16))
                    .min(BACKOFF_MAX_MS);
                b.until = now + delay;
                b.epoch = epoch;
                b.ended = false;
                true
            }
        };
        let first = counted && w.backoff.is_some_and(|b| b.failures == 1);
        let outcome = if self.open {
            HandoffOutcome::Rehanded
        } else {
            HandoffOutcome::Closed
        };
        // Connections placed on it go to the others while it backs off.
        self.reassign(now, id);
        self.requeue_front(f.q);
        if first || failure == HandoffFailure::NotSent {
            // One report per run of failures, not one per retry.
            self.report(Some(id), failure, outcome, 1);
        }
        self.settle(now);
    }

    /// The `newconn` of handoff `handoff` could not be queued on worker
    /// `id`'s channel (it is closing or closed): the connection goes back
    /// to the head of the queue, and the worker is drained
    /// ([`drain`](Self::drain)) until it is removed. Not reported: the
    /// worker's disconnect is.
    pub(crate) fn send_failed(&mut self, now: u64, id: WorkerId, handoff: HandoffId) {
        let Some(w) = self.book.workers.get_mut(&id) else {
            return;
        };
        let Some(f) = take_flight(w, handoff) else {
            return;
        };
        self.requeue_front(f.q);
        if self.has_worker(id) {
            self.drain(now, id);
        } else {
            self.settle(now);
        }
    }

    /// Worker `id` answered handoff `handoff`: `accepted` (its server took
    /// the connection: the primary closes its copy) or not (it goes to
    /// another worker, through the strategy's placement), with its open
    /// connections if it reports them (`load`). An answer to a handoff
    /// given up earlier (past the timeout) only updates the worker's
    /// counts.
    pub(crate) fn answered(
        &mut self,
        now: u64,
        id: WorkerId,
        handoff: HandoffId,
        accepted: bool,
        load: Option<u64>,
    ) {
        let tick = self.book.tick();
        let Some(w) = self.book.workers.get_mut(&id) else {
            return;
        };
        let taken = take_flight(w, handoff);
        if !w.member && taken.is_none() {
            return;
        }
        end_backoff(w, handoff);
        // Rust workers send their open-connection count with the reply; for
        // others, count what they accepted.
        match load {
            Some(n) => {
                w.open = n;
                w.reported = true;
            }
            None if accepted => w.open += 1,
            None => {}
        }
        if accepted {
            w.accepted += 1;
        }
        w.heard = tick;
        // It is free again (Node's `handoff`): behind those free before.
        let tick = self.book.tick();
        let w = self.book.workers.get_mut(&id).expect("looked up above");
        if w.member {
            w.free_since = tick;
        }
        self.strategy.answered(id);
        if let Some(f) = taken {
            self.latency.record(now.saturating_sub(f.sent));
            if accepted {
                self.close_conn(f.q.conn);
            } else {
                self.distribute(now, f.q);
            }
        }
        self.forget_if_done(id);
        self.settle(now);
    }

    /// Worker `id` reported `load` open connections.
    pub(crate) fn load(&mut self, now: u64, id: WorkerId, load: u64) {
        let tick = self.book.tick();
        let Some(w) = self.book.workers.get_mut(&id).filter(|w| w.member) else {
            return;
        };
        w.open = load;
        w.reported = true;
        w.heard = tick;
        self.settle(now);
    }

    /// The timer fired: the strategy's due time, back-offs that end,
    /// handoffs past the timeout (an acknowledged one is left to the
    /// worker, our copy closed; an unread one is reported and stays in
    /// flight), and connections that waited the timeout while no worker
    /// could take one (closed).
    pub(crate) fn tick(&mut self, now: u64) {
        self.timer = None;
        if self.strategy.due().is_some_and(|d| d <= now) {
            self.strategy.wake(&self.book, now);
        }
        self.expire(now);
        self.settle(now);
    }

    /// The listener closes: every queued connection is closed, and so is
    /// every connection that comes back from now on. Handoffs in flight
    /// still end as their answers say.
    pub(crate) fn close(&mut self, now: u64) {
        self.open = false;
        self.strategy.close();
        let shared = std::mem::take(&mut self.book.shared);
        let own: Vec<Queued> = (self.book.workers.values_mut())
            .flat_map(|w| std::mem::take(&mut w.own))
            .collect();
        for q in shared.into_iter().chain(own) {
            self.close_conn(q.conn);
        }
        self.settle(now);
    }

    /// Closes everything, connections in flight included (the primary is
    /// going away and no answer will be handled).
    pub(crate) fn close_all(&mut self, now: u64) {
        self.open = false;
        self.strategy.close();
        let workers = std::mem::take(&mut self.book.workers);
        let queued = std::mem::take(&mut self.book.shared);
        let mut in_flight = Vec::new();
        let mut own = Vec::new();
        for (id, w) in workers {
            self.strategy.forget(id);
            own.extend(w.own);
            in_flight.extend(w.flights.into_iter().map(|f| f.q.conn));
        }
        for q in queued.into_iter().chain(own) {
            self.close_conn(q.conn);
        }
        for c in in_flight {
            self.close_conn(c);
        }
        self.settle(now);
    }

    // ----- the rules -----------------------------------------------------

    /// A connection arrives or comes back (Node's `distribute`): the
    /// strategy places it on a worker or in the shared queue; once the
    /// listener is closed it is closed instead.
    fn distribute(&mut self, now: u64, q: Queued) {
        if !self.open {
            self.close_conn(q.conn);
            return;
        }
        let placed = if self.strategy.places() && self.has_members() {
            let loads: Vec<WorkerLoad> = (self.book.members())
                .map(|(id, w)| WorkerLoad {
                    id,
                    open: w.open,
                    queued: (w.own.len() + w.flights.len()) as u64,
                    accepted: w.accepted,
                    heard: w.heard,
                })
                .collect();
            self.strategy.place(&q.info, &loads).filter(|id| {
                self.book
                    .workers
                    .get(id)
                    .is_some_and(|w| self.book.available(w, now))
            })
        } else {
            None
        };
        match placed.and_then(|id| self.book.workers.get_mut(&id)) {
            Some(w) => w.own.push_back(q),
            None => self.book.shared.push_back(q),
        }
    }

    /// A connection whose handoff failed goes back to the head of the
    /// queue (closed once the listener is).
    fn requeue_front(&mut self, q: Queued) {
        if self.open {
            self.book.shared.push_front(q);
        } else {
            self.close_conn(q.conn);
        }
    }

    /// Connections placed on worker `id` that it never took go back: to
    /// the shared queue while it is a member that is only backing off, or
    /// through the strategy to the others.
    fn reassign(&mut self, now: u64, id: WorkerId) {
        let Some(w) = self.book.workers.get_mut(&id) else {
            return;
        };
        let stays = w.member && !w.draining;
        let own = std::mem::take(&mut w.own);
        for q in own {
            if stays {
                if self.open {
                    self.book.shared.push_back(q);
                } else {
                    self.close_conn(q.conn);
                }
            } else {
                self.distribute(now, q);
            }
        }
    }

    /// Hands out what can be handed out, then arms the timer for what
    /// comes next; after every event.
    fn settle(&mut self, now: u64) {
        if self.open {
            self.dispatch(now);
        }
        self.arm(now);
        if !self.open && !self.has_in_flight() && self.timer_live {
            // Nothing left that a timer could be for.
            self.timer_live = false;
            self.timer = None;
            self.actions.push_back(Action::Timer(None));
        }
    }

    fn dispatch(&mut self, now: u64) {
        loop {
            let waiting = !self.book.shared.is_empty()
                || self.book.workers.values().any(|w| !w.own.is_empty());
            if !waiting {
                return;
            }
            let (worker, own) = match self.strategy.next(&self.book, now) {
                Next::Send { worker, own } => (worker, own),
                Next::Wait(_) | Next::Idle => return,
            };
            let can = (self.book.workers.get(&worker)).is_some_and(|w| self.book.can_take(w, now));
            let q = match self.book.workers.get_mut(&worker) {
                Some(w) if can && own => w.own.pop_front(),
                Some(_) if can => self.book.shared.pop_front(),
                _ => None,
            };
            let Some(q) = q else {
                debug_assert!(false, "a connection for {worker}, which cannot take it");
                return;
            };
            let handoff = HandoffId(self.next_handoff);
            self.next_handoff += 1;
            let w = self.book.workers.get_mut(&worker).expect("looked up above");
            w.flights.push(Flight {
                handoff,
                q,
                sent: now,
                acked: None,
                unread: false,
            });
            self.actions.push_back(Action::Send {
                worker,
                conn: q.conn,
                handoff,
            });
        }
    }

    /// Arms the timer for the next deadline or the strategy's due time, if
    /// it is not already armed for that or earlier.
    fn arm(&mut self, now: u64) {
        if !self.open && !self.has_in_flight() {
            return;
        }
        let due = self.book.next_deadline(now);
        let due = match (due, self.strategy.due()) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        let Some(due) = due else { return };
        // An armed timer that fires no later still does: `tick` looks at
        // everything that is due by then. (It may be due already, as when
        // the loop has not yet reached its timers this iteration; re-arming
        // it later lost a back-off that had ended meanwhile, since
        // `next_deadline` no longer counts it, and with it the worker, for
        // good.)
        if self.timer.is_some_and(|d| d <= due) {
            return;
        }
        self.timer = Some(due);
        self.timer_live = true;
        self.actions.push_back(Action::Timer(Some(due)));
    }

    fn expire(&mut self, now: u64) {
        let ids: Vec<WorkerId> = self.book.workers.keys().copied().collect();
        for id in ids {
            self.expire_worker(id, now);
        }
        self.expire_queued(now);
    }

    /// The timeouts of worker `id`'s handoffs and back-off at `now`.
    fn expire_worker(&mut self, id: WorkerId, now: u64) {
        let t = self.book.cfg.timeout_ms;
        let w = self.book.workers.get_mut(&id).expect("listed by expire");
        // A back-off that ended: free from now, behind the others.
        let ended = match &mut w.backoff {
            Some(b) if b.until <= now && !b.ended => {
                b.ended = true;
                true
            }
            _ => false,
        };
        // Acknowledged and unanswered: the worker holds the connection
        // and may be serving it, so it cannot go to another. Ours is
        // closed; the slot is free.
        let (silent, rest): (Vec<Flight>, Vec<Flight>) = std::mem::take(&mut w.flights)
            .into_iter()
            .partition(|f| f.acked.is_some_and(|a| now >= a + t));
        w.flights = rest;
        // Not even read: it stays in flight (its fd is in the worker's
        // socket buffer), reported once.
        let mut unread = 0;
        for f in &mut w.flights {
            if f.acked.is_none() && !f.unread && now >= f.sent + t {
                f.unread = true;
                unread += 1;
            }
        }
        let member = w.member;
        if member && (ended || !silent.is_empty()) {
            let tick = self.book.tick();
            let w = self.book.workers.get_mut(&id).expect("listed by expire");
            w.free_since = tick;
        }
        let who = member.then_some(id);
        if !silent.is_empty() {
            self.strategy.silent(id);
            for f in &silent {
                self.close_conn(f.q.conn);
            }
            let n = silent.len();
            self.report(
                who,
                HandoffFailure::NoAnswer,
                HandoffOutcome::LeftWithWorker,
                n,
            );
        }
        if unread > 0 {
            self.report(
                who,
                HandoffFailure::Unread,
                HandoffOutcome::StillInFlight,
                unread,
            );
        }
        self.forget_if_done(id);
    }

    /// Queued connections that no worker can take: once every worker is
    /// failing, those that waited the timeout are closed.
    fn expire_queued(&mut self, now: u64) {
        let t = self.book.cfg.timeout_ms;
        if self.book.stuck(now) {
            let keep = |q: &Queued| q.since + t > now;
            let mut expired = Vec::new();
            let shared = std::mem::take(&mut self.book.shared);
            let (kept, gone): (VecDeque<Queued>, VecDeque<Queued>) =
                shared.into_iter().partition(keep);
            self.book.shared = kept;
            expired.extend(gone);
            for w in self.book.workers.values_mut() {
                let own = std::mem::take(&mut w.own);
                let (kept, gone): (VecDeque<Queued>, VecDeque<Queued>) =
                    own.into_iter().partition(keep);
                w.own = kept;
                expired.extend(gone);
            }
            if !expired.is_empty() {
                let n = expired.len();
                for q in expired {
                    self.close_conn(q.conn);
                }
                self.report(None, HandoffFailure::NoWorker, HandoffOutcome::Closed, n);
            }
        }
    }

    fn close_conn(&mut self, conn: ConnId) {
        self.actions.push_back(Action::Close(conn));
    }

    fn report(
        &mut self,
        worker: Option<WorkerId>,
        failure: HandoffFailure,
        outcome: HandoffOutcome,
        connections: usize,
    ) {
        self.actions.push_back(Action::Report {
            worker,
            failure,
            outcome,
            connections,
        });
    }

    /// Forgets a worker that left once nothing is in flight to it.
    fn forget_if_done(&mut self, id: WorkerId) {
        if self
            .book
            .workers
            .get(&id)
            .is_some_and(|w| !w.member && w.flights.is_empty() && w.own.is_empty())
        {
            self.book.workers.remove(&id);
        }
    }
}

/// Handoff `handoff` reached worker `w` (its ACK or its answer came): its
/// back-off ends, unless the handoff was sent before the last failure was
/// counted. With a window wider than 1, those (sent back to back with the
/// one that failed) are answered after the failure and say nothing about
/// whether it has passed.
fn end_backoff(w: &mut WorkerRec, handoff: HandoffId) {
    if w.backoff.is_some_and(|b| handoff >= b.epoch) {
        w.backoff = None;
    }
}

/// Removes handoff `handoff` from `w`'s flights.
fn take_flight(w: &mut WorkerRec, handoff: HandoffId) -> Option<Flight> {
    let i = w.flights.iter().position(|f| f.handoff == handoff)?;
    Some(w.flights.remove(i))
}
