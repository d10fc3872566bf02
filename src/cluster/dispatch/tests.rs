//! The dispatcher without processes: unit tests of each rule, and a
//! property test over random event sequences.
//!
//! The property test lives here rather than under `tests/`: the dispatcher
//! is an internal of the primary (`pub(crate)`), and making it public only
//! to test it would add an API to keep stable and document for no user.
//! In the module, the test drives exactly the interface the shell uses.

use std::cell::Cell;
use std::collections::{BTreeMap, BTreeSet};
use std::rc::Rc;

use proptest::prelude::{
    Just, ProptestConfig, TestCaseError, any, prop_assert, prop_assert_eq, prop_oneof, proptest,
};
use proptest::strategy::Strategy as Gen;

use super::least_connections::STALL_MS;
use super::*;

const T: u64 = 300;

/// A dispatcher, its clock, and the actions it asked for.
struct H {
    d: Dispatcher,
    now: u64,
}

fn rr(window: usize) -> H {
    H::new(Box::new(RoundRobin), window)
}

fn lc(window: usize) -> H {
    H::new(Box::<LeastConnections>::default(), window)
}

fn user(window: usize, f: impl Fn(&ConnInfo, &[WorkerLoad]) -> Option<u32> + 'static) -> H {
    H::new(Box::new(UserScheduler::new(Rc::new(f))), window)
}

fn send(worker: WorkerId, conn: u64, handoff: u64) -> Action {
    Action::Send {
        worker,
        conn: ConnId(conn),
        handoff: HandoffId(handoff),
    }
}

fn close(conn: u64) -> Action {
    Action::Close(ConnId(conn))
}

fn report(
    worker: Option<WorkerId>,
    failure: HandoffFailure,
    outcome: HandoffOutcome,
    connections: usize,
) -> Action {
    Action::Report {
        worker,
        failure,
        outcome,
        connections,
    }
}

impl H {
    fn new(s: Box<dyn Strategy>, window: usize) -> H {
        H::with_timeout(s, window, T)
    }

    fn with_timeout(s: Box<dyn Strategy>, window: usize, timeout_ms: u64) -> H {
        H {
            d: Dispatcher::new(s, Config { timeout_ms, window }),
            now: 0,
        }
    }

    /// The actions queued so far, leaving out timer arming.
    fn take(&mut self) -> Vec<Action> {
        std::iter::from_fn(|| self.d.next_action())
            .filter(|a| !matches!(a, Action::Timer(_)))
            .collect()
    }

    /// Every action queued so far.
    fn take_all(&mut self) -> Vec<Action> {
        std::iter::from_fn(|| self.d.next_action()).collect()
    }

    fn add(&mut self, ids: &[WorkerId]) {
        for &id in ids {
            self.d.add_worker(self.now, id);
        }
    }

    fn accept(&mut self) -> ConnId {
        self.d.accept(self.now, ConnInfo::default())
    }

    fn ack(&mut self, w: WorkerId, h: u64) {
        self.d.delivered(self.now, w, HandoffId(h), Delivery::Acked);
    }

    fn nack(&mut self, w: WorkerId, h: u64) {
        self.d
            .delivered(self.now, w, HandoffId(h), Delivery::Nacked);
    }

    /// ACK and `{accepted}` for handoff `h` to `w`.
    fn serve(&mut self, w: WorkerId, h: u64, accepted: bool) {
        self.ack(w, h);
        self.d.answered(self.now, w, HandoffId(h), accepted, None);
    }

    fn at(&mut self, now: u64) {
        self.now = now;
        self.d.tick(now);
    }
}

// ----- round-robin -------------------------------------------------------

/// Node's rule (a window of 1): each worker has one connection in flight;
/// the next goes to the worker free longest once it answered.
#[test]
fn round_robin_gives_a_worker_its_next_connection_only_after_its_answer() {
    let mut h = rr(1);
    h.add(&[1, 2]);
    for _ in 0..3 {
        h.accept();
    }
    assert_eq!(h.take(), [send(1, 0, 0), send(2, 1, 1)]);
    h.serve(2, 1, true);
    assert_eq!(h.take(), [close(1), send(2, 2, 2)]);
    h.serve(1, 0, true);
    assert_eq!(h.take(), [close(0)]);
    // Worker 1 has been free longest.
    h.accept();
    assert_eq!(h.take(), [send(1, 3, 3)]);
}

/// A window of 2: a worker is sent a second connection before it answers
/// the first, spreading over the workers first.
#[test]
fn a_window_of_two_sends_a_second_connection_before_the_answer() {
    let mut h = rr(2);
    h.add(&[1, 2]);
    for _ in 0..5 {
        h.accept();
    }
    assert_eq!(
        h.take(),
        [send(1, 0, 0), send(2, 1, 1), send(1, 2, 2), send(2, 3, 3)]
    );
    h.serve(2, 3, true);
    assert_eq!(h.take(), [close(3), send(2, 4, 4)]);
}

/// `accepted: false` (the worker's server is closed or full): the same
/// connection goes to another worker.
#[test]
fn a_refused_connection_goes_to_another_worker() {
    let mut h = rr(1);
    h.add(&[1, 2]);
    h.accept();
    assert_eq!(h.take(), [send(1, 0, 0)]);
    h.serve(1, 0, false);
    assert_eq!(h.take(), [send(2, 0, 1)]);
}

/// A NACK: the connection goes at once to the other worker, and the worker
/// backs off 10 ms, then 20 after a second NACK in a row; one report for
/// the run. An ACK ends it.
#[test]
fn a_nacked_handoff_is_rehanded_and_the_worker_backs_off_doubling() {
    let mut h = rr(1);
    h.add(&[1, 2]);
    h.accept();
    h.take();
    h.nack(1, 0);
    let rejected = report(
        Some(1),
        HandoffFailure::Rejected,
        HandoffOutcome::Rehanded,
        1,
    );
    assert_eq!(
        h.take_all(),
        [rejected, send(2, 0, 1), Action::Timer(Some(10))]
    );
    h.accept();
    assert!(h.take().is_empty(), "worker 1 backs off, worker 2 is busy");
    h.at(9);
    assert!(h.take().is_empty());
    h.at(10);
    assert_eq!(h.take(), [send(1, 1, 2)]);
    h.nack(1, 2);
    assert!(h.take().is_empty(), "not reported again");
    h.serve(2, 1, true);
    // Worker 2 takes it; worker 1 waits 20 ms.
    assert_eq!(h.take(), [close(0), send(2, 1, 3)]);
    h.accept();
    h.at(29);
    assert!(h.take().is_empty());
    h.at(30);
    assert_eq!(h.take(), [send(1, 2, 4)]);
    h.serve(1, 4, true);
    assert_eq!(h.take(), [close(2)]);
}

/// An armed timer that is already due when another event comes (the loop
/// has not reached its timers yet this iteration) is kept, not moved to
/// the next deadline: a back-off that ended meanwhile is no longer among
/// the deadlines, and re-arming the timer later lost it, and the worker
/// with it (the shell's deadline-timer fix from main, kept here).
#[test]
fn a_due_timer_is_not_moved_later_and_the_back_off_still_ends() {
    let mut h = rr(1);
    h.add(&[1, 2]);
    h.accept();
    h.take();
    h.nack(1, 0);
    assert_eq!(h.take_all().last(), Some(&Action::Timer(Some(10))));
    // Past the back-off's end, before the timer fired: another event
    // (worker 2's ACK), whose next deadline is later.
    h.now = 12;
    h.ack(2, 1);
    assert_eq!(h.take_all(), [], "the timer stays at 10");
    h.at(12);
    assert!(h.take().is_empty());
    h.accept();
    assert_eq!(h.take(), [send(1, 1, 2)], "worker 1 is tried again");
}

/// The back-off doubles up to 500 ms: the times between tries of a
/// worker that NACKs everything (a new connection arriving at each try, so
/// that one is always waiting).
#[test]
fn the_back_off_stops_doubling_at_its_maximum() {
    // A timeout longer than the back-offs: no connection is closed.
    let mut h = H::with_timeout(Box::new(RoundRobin), 1, 5_000);
    h.add(&[1]);
    h.accept();
    let mut tries = Vec::new();
    let mut timer = None;
    while tries.len() < 9 {
        while let Some(a) = h.d.next_action() {
            match a {
                Action::Send { handoff, .. } => {
                    tries.push(h.now);
                    h.nack(1, handoff.0);
                    h.accept();
                }
                Action::Timer(at) => timer = at,
                _ => {}
            }
        }
        h.at(timer.take().expect("a timer"));
    }
    let gaps: Vec<u64> = tries.windows(2).map(|w| w[1] - w[0]).collect();
    assert_eq!(gaps, [10, 20, 40, 80, 160, 320, 500, 500]);
}

/// With a window of 2, two handoffs in flight to a worker that NACKs are
/// one run of failures: one report, one back-off step; then it gets one
/// handoff at a time until one is acknowledged.
#[test]
fn nacks_of_handoffs_already_in_flight_are_one_run_and_the_window_shrinks_to_one() {
    let mut h = rr(2);
    h.add(&[1]);
    h.accept();
    h.accept();
    assert_eq!(h.take(), [send(1, 0, 0), send(1, 1, 1)]);
    h.nack(1, 0);
    h.nack(1, 1);
    assert_eq!(
        h.take(),
        [report(
            Some(1),
            HandoffFailure::Rejected,
            HandoffOutcome::Rehanded,
            1
        )]
    );
    h.at(10);
    assert_eq!(h.take(), [send(1, 1, 2)], "one at a time; the head first");
    h.ack(1, 2);
    assert_eq!(
        h.take(),
        [send(1, 0, 3)],
        "acknowledged: the window is 2 again"
    );
}

/// With a window of 3, the ACKs and answers of handoffs sent before a
/// NACK arrive after it; they do not end the back-off (nor start a new run
/// of failures, reported again): only a handoff sent after the failure
/// does.
#[test]
fn answers_to_handoffs_sent_before_a_failure_do_not_end_the_back_off() {
    let mut h = rr(3);
    h.add(&[1]);
    for _ in 0..4 {
        h.accept();
    }
    assert_eq!(h.take(), [send(1, 0, 0), send(1, 1, 1), send(1, 2, 2)]);
    h.ack(1, 0);
    h.nack(1, 1);
    assert_eq!(h.take().len(), 1, "one report");
    h.ack(1, 2);
    h.serve(1, 0, true);
    h.d.answered(h.now, 1, HandoffId(2), true, None);
    assert_eq!(h.take(), [close(0), close(2)], "still backing off");
    h.at(10);
    assert_eq!(h.take(), [send(1, 1, 3)], "one at a time");
    h.nack(1, 3);
    assert!(h.take().is_empty(), "the same run: not reported again");
    h.at(30);
    assert_eq!(h.take(), [send(1, 1, 4)]);
    h.ack(1, 4);
    assert_eq!(
        h.take(),
        [send(1, 3, 5)],
        "the back-off is over: the window is 3"
    );
}

/// Acknowledged but never answered: after the timeout our copy is closed
/// (the worker holds the connection) and the worker's slot is free; a late
/// answer changes nothing else.
#[test]
fn an_answer_that_never_comes_leaves_the_connection_to_the_worker() {
    let mut h = rr(1);
    h.add(&[1]);
    h.accept();
    h.accept();
    h.take();
    h.now = 5;
    h.ack(1, 0);
    h.at(T + 4);
    assert!(h.take().is_empty());
    h.at(T + 5);
    assert_eq!(
        h.take(),
        [
            close(0),
            report(
                Some(1),
                HandoffFailure::NoAnswer,
                HandoffOutcome::LeftWithWorker,
                1
            ),
            send(1, 1, 1)
        ]
    );
    h.d.answered(h.now, 1, HandoffId(0), true, None);
    assert!(h.take().is_empty(), "a late answer closes nothing");
}

/// Not even read: reported once, and it stays in flight (no second
/// connection for that worker); when the worker dies it is re-handed.
#[test]
fn an_unread_handoff_is_reported_and_stays_in_flight_until_the_worker_dies() {
    let mut h = rr(1);
    h.add(&[1, 2]);
    h.accept();
    h.take();
    h.d.answered(0, 2, HandoffId(99), true, None);
    h.at(T);
    assert_eq!(
        h.take(),
        [report(
            Some(1),
            HandoffFailure::Unread,
            HandoffOutcome::StillInFlight,
            1
        )]
    );
    h.at(2 * T);
    assert!(h.take().is_empty(), "reported once");
    assert!(!h.d.remove_worker(h.now, 1, Some(HandoffFailure::Exited)));
    assert_eq!(
        h.take(),
        [
            report(Some(1), HandoffFailure::Exited, HandoffOutcome::Rehanded, 1),
            send(2, 0, 1)
        ]
    );
}

/// Every worker failing (backing off here): queued connections are closed
/// once they waited the timeout, with one report.
#[test]
fn connections_no_worker_can_take_are_closed_after_the_timeout() {
    let mut h = rr(1);
    h.add(&[1]);
    for _ in 0..3 {
        h.accept();
    }
    let mut handoff = 0;
    let mut closed = Vec::new();
    let mut timer = None;
    while h.now <= 2 * T && closed.len() < 3 {
        while let Some(a) = h.d.next_action() {
            match a {
                Action::Send { handoff: x, .. } => {
                    assert_eq!(x, HandoffId(handoff));
                    h.nack(1, handoff);
                    handoff += 1;
                }
                Action::Close(c) => closed.push(c),
                Action::Timer(at) => timer = at,
                _ => {}
            }
        }
        h.at(timer.take().expect("a timer"));
    }
    assert_eq!(closed.len(), 3);
    assert!(h.now >= T && h.now < T + BACKOFF_MAX_MS, "{}", h.now);
    assert!((2..=8).contains(&handoff), "{handoff} tries");
}

/// A worker that leaves with handoffs in flight (window 2): they go back to
/// the head of the queue in the order they were sent, reported as one.
#[test]
fn a_lost_worker_gives_back_its_handoffs_in_order() {
    let mut h = rr(2);
    h.add(&[1, 2]);
    for _ in 0..4 {
        h.accept();
    }
    h.take();
    h.accept();
    assert!(!h.d.remove_worker(h.now, 1, Some(HandoffFailure::ChannelClosed)));
    assert_eq!(
        h.take(),
        [report(
            Some(1),
            HandoffFailure::ChannelClosed,
            HandoffOutcome::Rehanded,
            2
        )]
    );
    h.serve(2, 1, true);
    assert_eq!(h.take(), [close(1), send(2, 0, 4)]);
    h.serve(2, 3, true);
    assert_eq!(h.take(), [close(3), send(2, 2, 5)]);
}

/// The last worker leaves: everything queued and in flight is closed.
#[test]
fn removing_the_last_worker_closes_what_it_leaves() {
    let mut h = rr(1);
    h.add(&[1]);
    h.accept();
    h.accept();
    h.take();
    assert!(h.d.remove_worker(0, 1, Some(HandoffFailure::Exited)));
    let got = h.take_all();
    assert_eq!(
        got,
        [
            report(Some(1), HandoffFailure::Exited, HandoffOutcome::Closed, 1),
            close(0),
            close(1),
            Action::Timer(None)
        ]
    );
}

/// A worker that closed its server leaves without being gone: what is in
/// flight to it waits for its answer, which decides.
#[test]
fn a_worker_that_leaves_alive_still_answers_for_its_connection() {
    let mut h = rr(1);
    h.add(&[1, 2]);
    h.accept();
    h.accept();
    h.take();
    assert!(!h.d.remove_worker(0, 1, None));
    assert!(h.take().is_empty());
    h.serve(1, 0, false);
    h.serve(2, 1, true);
    assert_eq!(h.take(), [close(1), send(2, 0, 2)]);
}

/// A `newconn` that cannot be queued (the channel is closing): the
/// connection goes to another worker, not reported, and the worker gets
/// nothing more.
#[test]
fn a_send_that_fails_at_once_drains_the_worker() {
    let mut h = rr(1);
    h.add(&[1, 2]);
    h.accept();
    assert_eq!(h.take(), [send(1, 0, 0)]);
    h.d.send_failed(0, 1, HandoffId(0));
    assert_eq!(h.take(), [send(2, 0, 1)]);
    h.serve(2, 1, true);
    h.accept();
    assert_eq!(h.take(), [close(0), send(2, 1, 2)]);
}

/// A drained worker gets nothing new; its answers still count.
#[test]
fn a_drained_worker_gets_nothing_new() {
    let mut h = rr(1);
    h.add(&[1, 2]);
    h.accept();
    h.take();
    h.d.drain(0, 1);
    h.serve(1, 0, true);
    h.accept();
    h.accept();
    assert_eq!(h.take(), [close(0), send(2, 1, 1)]);
    h.serve(2, 1, true);
    assert_eq!(h.take(), [close(1), send(2, 2, 2)]);
}

/// A worker added held (a supervisor's worker not ready yet) gets
/// nothing until admitted; what waits meanwhile waits for it or goes to
/// another worker. A drain is not undone by an admit.
#[test]
fn a_held_worker_gets_nothing_until_admitted() {
    let mut h = rr(1);
    h.d.add_worker_held(0, 1, true);
    h.accept();
    assert_eq!(h.take(), [], "held: the connection waits");
    h.d.admit(0, 1);
    assert_eq!(h.take(), [send(1, 0, 0)]);
    h.serve(1, 0, true);
    h.take();
    // Held again (at its connection limit): worker 2 takes everything.
    h.add(&[2]);
    h.d.hold(0, 1);
    h.accept();
    h.accept();
    assert_eq!(h.take(), [send(2, 1, 1)]);
    h.serve(2, 1, true);
    assert_eq!(h.take(), [close(1), send(2, 2, 2)]);
    // Drained for good: an admit does nothing.
    h.d.drain(0, 2);
    h.d.admit(0, 2);
    h.serve(2, 2, true);
    h.accept();
    assert_eq!(h.take(), [close(2)], "no worker in rotation");
    h.d.admit(0, 1);
    assert_eq!(h.take(), [send(1, 3, 3)]);
}

/// `close_all`: what is in flight is closed too, and the timer goes.
#[test]
fn close_all_closes_every_connection_and_the_timer() {
    let mut h = rr(1);
    h.add(&[1]);
    h.accept();
    h.accept();
    h.take();
    h.d.close_all(0);
    assert_eq!(h.take_all(), [close(1), close(0), Action::Timer(None)]);
    assert!(!h.d.has_in_flight());
}

// ----- user scheduler ------------------------------------------------------

/// A connection placed on a busy worker waits for it, even while another
/// is free; one placed on no worker (or on one that does not exist) goes
/// round-robin.
#[test]
fn a_user_scheduler_places_connections_on_a_worker_which_takes_them_in_turn() {
    let pick = Rc::new(Cell::new(Some(1)));
    let p = pick.clone();
    let mut h = user(1, move |_, loads| {
        assert_eq!(loads.iter().map(|l| l.id).collect::<Vec<_>>(), [1, 2]);
        p.get()
    });
    h.add(&[1, 2]);
    h.accept();
    h.accept();
    assert_eq!(h.take(), [send(1, 0, 0)], "the second waits for worker 1");
    pick.set(Some(7));
    h.accept();
    assert_eq!(h.take(), [send(2, 2, 1)], "no worker 7: round-robin");
    h.serve(1, 0, true);
    assert_eq!(h.take(), [close(0), send(1, 1, 2)]);
}

/// The scheduler sees each worker's counts: open connections as reported,
/// and connections queued on it or in flight.
#[test]
fn a_user_scheduler_sees_the_loads() {
    let seen = Rc::new(std::cell::RefCell::new(Vec::new()));
    let s = seen.clone();
    let mut h = user(1, move |_, loads| {
        s.borrow_mut().push(loads.to_vec());
        Some(1)
    });
    h.add(&[1]);
    h.d.load(0, 1, 4);
    h.accept();
    h.accept();
    let seen = seen.borrow();
    assert_eq!(seen[1][0].open, 4);
    assert_eq!(seen[1][0].queued, 1);
    assert_eq!(seen[1][0].heard, seen[0][0].heard);
}

// ----- least connections ---------------------------------------------------

/// The least loaded worker takes the connection.
#[test]
fn least_connections_picks_the_least_loaded_worker() {
    let mut h = lc(1);
    h.add(&[1, 2]);
    h.d.load(0, 1, 3);
    h.d.load(0, 2, 1);
    h.accept();
    assert_eq!(h.take(), [send(2, 0, 0)]);
}

/// The stall rule. Worker 1 (least loaded) has a connection in flight, and
/// worker 2 carries more than `2 × load + 1`: the next connection waits for
/// worker 1's answer, but only for [`STALL_MS`]; then worker 1 is passed
/// over until it answers.
#[test]
fn least_connections_waits_for_a_busy_worker_only_until_it_stalls() {
    let mut h = lc(1);
    h.add(&[1, 2]);
    h.d.load(0, 2, 5);
    h.accept();
    assert_eq!(h.take(), [send(1, 0, 0)]);
    h.now = 1;
    h.accept();
    assert_eq!(h.take_all(), [Action::Timer(Some(STALL_MS))]);
    h.at(STALL_MS);
    assert_eq!(h.take(), [send(2, 1, 1)], "worker 1 stalled");
    // Stalled: passed over although least loaded, until it answers.
    h.accept();
    assert_eq!(h.take_all(), []);
    h.serve(2, 1, true);
    assert_eq!(h.take(), [close(1), send(2, 2, 2)]);
    h.serve(1, 0, true);
    h.accept();
    assert_eq!(h.take(), [close(0), send(1, 3, 3)]);
}

/// Worker 1 is busy, but worker 2 carries no more than `2 × load + 1`: it
/// takes the connection at once.
#[test]
fn least_connections_sends_to_a_free_worker_that_is_not_much_more_loaded() {
    let mut h = lc(1);
    h.add(&[1, 2]);
    h.d.load(0, 2, 2);
    h.accept();
    h.accept();
    assert_eq!(h.take(), [send(1, 0, 0), send(2, 1, 1)]);
}

/// Every worker busy: the connection waits for the first answer.
#[test]
fn least_connections_with_every_worker_busy_waits_for_an_answer() {
    let mut h = lc(1);
    h.add(&[1, 2]);
    for _ in 0..3 {
        h.accept();
    }
    assert_eq!(h.take(), [send(1, 0, 0), send(2, 1, 1)]);
    h.at(50);
    assert!(h.take().is_empty());
    h.serve(2, 1, true);
    assert_eq!(h.take(), [close(1), send(2, 2, 2)]);
}

/// Least connections keeps Node's one handoff in flight per worker
/// whatever the window: the answer is what shows that a worker's loop is
/// running.
#[test]
fn least_connections_keeps_one_handoff_in_flight_whatever_the_window() {
    let mut h = lc(4);
    h.add(&[1]);
    for _ in 0..3 {
        h.accept();
    }
    assert_eq!(h.take(), [send(1, 0, 0)]);
    h.serve(1, 0, true);
    assert_eq!(h.take(), [close(0), send(1, 1, 1)]);
}

/// A worker that never answers is passed over once its handoff timed out,
/// until it answers again.
#[test]
fn least_connections_passes_over_a_worker_that_never_answered() {
    let mut h = lc(1);
    h.add(&[1, 2]);
    h.d.load(0, 2, 1);
    h.accept();
    h.take();
    h.ack(1, 0);
    h.at(T);
    assert_eq!(
        h.take(),
        [
            close(0),
            report(
                Some(1),
                HandoffFailure::NoAnswer,
                HandoffOutcome::LeftWithWorker,
                1
            )
        ]
    );
    h.accept();
    assert_eq!(h.take(), [send(2, 1, 1)]);
}

// ----- the window setting ----------------------------------------------------

#[test]
fn handoff_window_parses_whole_numbers_from_1_to_the_maximum() {
    assert_eq!(parse_handoff_window("1").unwrap(), 1);
    assert_eq!(parse_handoff_window("64").unwrap(), MAX_HANDOFF_WINDOW);
    for bad in ["0", "65", "-1", "+2", " 2", "2.0", "", "two"] {
        let e = parse_handoff_window(bad).unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::InvalidInput);
        assert!(e.to_string().contains(HANDOFF_WINDOW_ENV), "{e}");
        assert!(e.to_string().contains(&format!("{bad:?}")), "{e}");
    }
}

// ----- the property test -------------------------------------------------------

/// One event the shell can feed. Indices pick among the handoffs the
/// model knows to be in flight.
#[derive(Clone, Debug)]
enum Op {
    Accept,
    Add(WorkerId),
    Remove(WorkerId, Option<HandoffFailure>),
    Drain(WorkerId),
    Ack(usize),
    Nack(usize),
    NotSent(usize),
    Answer(usize, bool, Option<u64>),
    Load(WorkerId, u64),
    /// Sends to this worker fail at once from now on (its channel closes).
    Break(WorkerId),
    Advance(u64),
}

fn op() -> impl Gen<Value = Op> {
    let w = 1u32..=4;
    prop_oneof![
        6 => Just(Op::Accept),
        2 => w.clone().prop_map(Op::Add),
        1 => (
            w.clone(),
            prop_oneof![
                Just(None),
                Just(Some(HandoffFailure::ChannelClosed)),
                Just(Some(HandoffFailure::Exited))
            ]
        )
            .prop_map(|(w, g)| Op::Remove(w, g)),
        1 => w.clone().prop_map(Op::Drain),
        4 => any::<usize>().prop_map(Op::Ack),
        1 => any::<usize>().prop_map(Op::Nack),
        1 => any::<usize>().prop_map(Op::NotSent),
        4 => (any::<usize>(), any::<bool>(), proptest::option::of(0u64..20))
            .prop_map(|(i, a, l)| Op::Answer(i, a, l)),
        1 => (w.clone(), 0u64..20).prop_map(|(w, l)| Op::Load(w, l)),
        1 => w.prop_map(Op::Break),
        3 => prop_oneof![0u64..5, 0u64..600].prop_map(Op::Advance),
    ]
}

/// Where the model believes a connection is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Place {
    Waiting,
    InFlight(WorkerId, HandoffId),
}

/// A handoff the model knows of.
#[derive(Clone, Copy, Debug)]
struct Known {
    worker: WorkerId,
    conn: ConnId,
    handoff: HandoffId,
    acked: bool,
    /// Given up by the dispatcher (no answer in time): an answer may still
    /// come, late.
    late: bool,
}

/// The model: what the shell would see, and the invariants checked on
/// every action.
struct Model {
    d: Dispatcher,
    now: u64,
    window: usize,
    /// Least connections: one in flight per worker whatever the window.
    lc: bool,
    timer: Option<u64>,
    /// Handle closed (its last worker left): nothing is accepted any more.
    closed: bool,
    members: BTreeSet<WorkerId>,
    drained: BTreeSet<WorkerId>,
    broken: BTreeSet<WorkerId>,
    live: BTreeMap<ConnId, Place>,
    closes: BTreeMap<ConnId, usize>,
    /// Accepted by a worker: the primary's copy is to be closed now.
    handed: BTreeSet<ConnId>,
    accepted: u64,
    flights: Vec<Known>,
}

impl Model {
    fn new(kind: u8, window: usize) -> Model {
        let strategy = strategy_of(kind);
        Model {
            lc: kind == 1,
            d: Dispatcher::new(
                strategy,
                Config {
                    timeout_ms: T,
                    window,
                },
            ),
            now: 0,
            window,
            timer: None,
            closed: false,
            members: BTreeSet::new(),
            drained: BTreeSet::new(),
            broken: BTreeSet::new(),
            live: BTreeMap::new(),
            closes: BTreeMap::new(),
            handed: BTreeSet::new(),
            accepted: 0,
            flights: Vec::new(),
        }
    }

    fn in_flight_to(&self, w: WorkerId) -> usize {
        self.flights
            .iter()
            .filter(|f| f.worker == w && !f.late)
            .count()
    }

    /// Executes the dispatcher's actions as the shell does, checking each.
    fn run(&mut self) -> Result<(), TestCaseError> {
        while let Some(a) = self.d.next_action() {
            match a {
                Action::Send {
                    worker,
                    conn,
                    handoff,
                } => {
                    prop_assert_eq!(
                        self.live.get(&conn),
                        Some(&Place::Waiting),
                        "{:?} sent to {} while not waiting",
                        conn,
                        worker
                    );
                    prop_assert!(
                        self.members.contains(&worker),
                        "{:?} sent to {}, not a worker",
                        conn,
                        worker
                    );
                    // (A send to a worker whose channel refused one fails
                    // too, when the dispatcher emitted both at once.)
                    prop_assert!(
                        !self.drained.contains(&worker) || self.broken.contains(&worker),
                        "{:?} sent to {}, draining",
                        conn,
                        worker
                    );
                    prop_assert!(
                        self.in_flight_to(worker) < if self.lc { 1 } else { self.window },
                        "{} would have more than {} in flight",
                        worker,
                        self.window
                    );
                    if self.broken.contains(&worker) {
                        // The channel refuses the message.
                        self.drained.insert(worker);
                        self.d.send_failed(self.now, worker, handoff);
                    } else {
                        self.live.insert(conn, Place::InFlight(worker, handoff));
                        self.flights.push(Known {
                            worker,
                            conn,
                            handoff,
                            acked: false,
                            late: false,
                        });
                    }
                }
                Action::Close(conn) => {
                    *self.closes.entry(conn).or_default() += 1;
                    prop_assert_eq!(self.closes[&conn], 1, "{:?} closed twice", conn);
                    let place = self.live.remove(&conn);
                    prop_assert!(
                        place.is_some() || self.handed.remove(&conn),
                        "{:?} closed but not known",
                        conn
                    );
                    if let Some(Place::InFlight(_, h)) = place {
                        // Given up: the worker holds it (acknowledged).
                        let f = self.flights.iter_mut().find(|f| f.handoff == h);
                        prop_assert!(
                            f.as_ref().is_some_and(|f| f.acked),
                            "{:?} closed while in flight, unacknowledged",
                            conn
                        );
                        if let Some(f) = f {
                            f.late = true;
                        }
                    }
                }
                Action::Report { .. } => {}
                Action::Timer(at) => self.timer = at,
            }
        }
        Ok(())
    }

    /// A handoff back in the dispatcher's hands.
    fn back(&mut self, i: usize) -> Known {
        let f = self.flights.remove(i);
        if !f.late {
            self.live.insert(f.conn, Place::Waiting);
        }
        f
    }

    /// The worker answers handoff `j`.
    fn answer(&mut self, j: usize, accepted: bool) -> Known {
        let f = self.flights.remove(j);
        if !f.late {
            self.live.remove(&f.conn);
            if accepted {
                self.handed.insert(f.conn);
            } else {
                self.live.insert(f.conn, Place::Waiting);
            }
        }
        f
    }

    fn pick(&self, i: usize, ok: impl Fn(&Known) -> bool) -> Option<usize> {
        let idx: Vec<usize> = (0..self.flights.len())
            .filter(|&j| ok(&self.flights[j]))
            .collect();
        (!idx.is_empty()).then(|| idx[i % idx.len()])
    }

    fn apply(&mut self, op: Op) -> Result<(), TestCaseError> {
        match op {
            Op::Accept if !self.closed => {
                let c = self.d.accept(self.now, ConnInfo::default());
                prop_assert_eq!(c, ConnId(self.accepted));
                self.accepted += 1;
                self.live.insert(c, Place::Waiting);
            }
            Op::Add(w) if !self.closed && !self.members.contains(&w) => {
                self.members.insert(w);
                self.drained.remove(&w);
                self.broken.remove(&w);
                self.d.add_worker(self.now, w);
            }
            Op::Remove(w, Some(why)) if !self.members.contains(&w) => {
                // A worker that left earlier dies: what it still had in
                // flight comes back.
                while let Some(i) = self.pick(0, |f| f.worker == w) {
                    self.back(i);
                }
                self.d.lost(self.now, w, why);
            }
            Op::Remove(w, gone) if self.members.contains(&w) => {
                self.members.remove(&w);
                if gone.is_some() {
                    // Everything in flight to it comes back.
                    while let Some(i) = self.pick(0, |f| f.worker == w) {
                        self.back(i);
                    }
                }
                let last = self.d.remove_worker(self.now, w, gone);
                prop_assert_eq!(last, self.members.is_empty());
                if last {
                    self.closed = true;
                }
            }
            Op::Drain(w) if self.members.contains(&w) => {
                self.drained.insert(w);
                self.d.drain(self.now, w);
            }
            Op::Ack(i) => {
                if let Some(j) = self.pick(i, |f| !f.acked) {
                    self.flights[j].acked = true;
                    let f = self.flights[j];
                    self.d
                        .delivered(self.now, f.worker, f.handoff, Delivery::Acked);
                }
            }
            Op::Nack(i) | Op::NotSent(i) => {
                if let Some(j) = self.pick(i, |f| !f.acked) {
                    let f = self.back(j);
                    let d = if matches!(op, Op::Nack(_)) {
                        Delivery::Nacked
                    } else {
                        Delivery::NotSent
                    };
                    self.d.delivered(self.now, f.worker, f.handoff, d);
                }
            }
            Op::Answer(i, accepted, load) => {
                if let Some(j) = self.pick(i, |f| f.acked) {
                    let f = self.answer(j, accepted);
                    self.d
                        .answered(self.now, f.worker, f.handoff, accepted, load);
                    self.run()?;
                    prop_assert!(self.handed.is_empty(), "our copy is closed at once");
                }
            }
            Op::Load(w, n) => self.d.load(self.now, w, n),
            Op::Break(w) => {
                self.broken.insert(w);
            }
            Op::Advance(ms) => {
                self.now += ms;
                self.fire()?;
            }
            _ => {}
        }
        self.run()
    }

    /// Runs the timer while it is due.
    fn fire(&mut self) -> Result<(), TestCaseError> {
        while let Some(at) = self.timer.filter(|&at| at <= self.now) {
            self.timer = None;
            let _ = at;
            self.d.tick(self.now);
            self.run()?;
        }
        Ok(())
    }

    /// Lets every worker acknowledge and accept what it is sent, and time
    /// pass, until nothing is left waiting or in flight.
    fn settle(&mut self) -> Result<(), TestCaseError> {
        for _ in 0..1000 {
            if self.live.is_empty() {
                return Ok(());
            }
            let mut progressed = false;
            while let Some(j) = self.pick(0, |f| !f.late) {
                progressed = true;
                if !self.flights[j].acked {
                    self.flights[j].acked = true;
                    let f = self.flights[j];
                    self.d
                        .delivered(self.now, f.worker, f.handoff, Delivery::Acked);
                    self.run()?;
                    continue;
                }
                let f = self.answer(j, true);
                self.d.answered(self.now, f.worker, f.handoff, true, None);
                self.run()?;
                prop_assert!(self.handed.is_empty(), "our copy is closed at once");
            }
            if !progressed {
                let Some(at) = self.timer else {
                    prop_assert!(
                        false,
                        "connections waiting with nothing to wake them: {:?}",
                        self.live
                    );
                    unreachable!();
                };
                self.now = self.now.max(at);
                self.fire()?;
            }
        }
        prop_assert!(false, "still waiting: {:?}", self.live);
        Ok(())
    }
}

fn strategy_of(kind: u8) -> Box<dyn Strategy> {
    match kind {
        0 => Box::new(RoundRobin),
        1 => Box::<LeastConnections>::default(),
        _ => {
            // Places on the least loaded, on no worker, or on one that
            // does not exist, in turn.
            let n = Cell::new(0u32);
            Box::new(UserScheduler::new(Rc::new(move |_, loads| {
                n.set(n.get() + 1);
                match n.get() % 3 {
                    0 => loads.iter().min_by_key(|l| l.open + l.queued).map(|l| l.id),
                    1 => None,
                    _ => Some(99),
                }
            })))
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    /// Over random event sequences, for every strategy and windows 1 to 4:
    /// no connection is handed out while in flight or after it was closed,
    /// none is closed twice, no worker that left or is draining is sent a
    /// connection, no worker has more than the window in flight; and once
    /// the workers answer and time passes, every connection has been
    /// handed out (and its copy closed) or closed.
    #[test]
    fn no_connection_is_lost_or_handed_out_twice(
        kind in 0u8..3,
        window in 1usize..=4,
        ops in proptest::collection::vec(op(), 1..150),
    ) {
        let mut m = Model::new(kind, window);
        for op in ops {
            m.apply(op)?;
        }
        m.settle()?;
        prop_assert!(m.live.is_empty());
        prop_assert_eq!(m.closes.len() as u64, m.accepted, "every connection closed once");
        prop_assert!(!m.d.has_in_flight());
    }
}

// ----- for a supervisor: keep open with no worker ----------------------

/// With `keep_open`, the last worker leaving does not close the handle:
/// connections wait for the next worker (a supervisor restarting a lone
/// worker), which takes them; turning it off with no worker closes.
#[test]
fn keep_open_waits_for_the_next_worker_then_closes_when_turned_off() {
    let mut h = rr(1);
    h.d.set_keep_open(0, true);
    h.add(&[1]);
    assert!(!h.d.remove_worker(0, 1, Some(HandoffFailure::Exited)));
    h.accept();
    assert_eq!(h.take(), []);
    h.add(&[2]);
    assert_eq!(h.take(), [send(2, 0, 0)]);
    h.serve(2, 0, true);
    assert_eq!(h.take(), [close(0)]);
    assert_eq!(h.d.accepted(2), 1);
    assert!(!h.d.remove_worker(0, 2, None));
    h.accept();
    assert!(h.d.set_keep_open(0, false), "no worker: closed");
    assert_eq!(h.take(), [close(1)]);
}

// ----- dispatch stats ------------------------------------------------------

/// The queue length counts connections waiting for a worker, not those in
/// flight; each answered handoff's latency (answer time − send time) lands
/// in its bucket, refused ones included, and a failed handoff is not
/// counted.
#[test]
fn stats_count_the_queue_and_each_answered_handoffs_latency() {
    let mut h = rr(1);
    h.add(&[1, 2]);
    for _ in 0..5 {
        h.accept();
    }
    assert_eq!(h.take(), [send(1, 0, 0), send(2, 1, 1)]);
    let s = h.d.stats();
    assert_eq!((s.queued, s.in_flight), (3, 2));
    assert_eq!(s.workers[&1].queued, 1);
    assert_eq!(s.handoff_latency.count(), 0);

    h.now = 3;
    h.serve(1, 0, true); // 3 ms
    assert_eq!(h.take(), [close(0), send(1, 2, 2)]);
    h.now = 40;
    h.serve(2, 1, false); // 40 ms, refused: goes to worker 1's successor
    h.take();
    h.nack(1, 2); // failed: not an answer, not counted
    h.take();
    let s = h.d.stats();
    assert_eq!(s.handoff_latency.count(), 2);
    assert_eq!(s.handoff_latency.sum_ms(), 43);
    let b = s.handoff_latency.cumulative();
    assert_eq!(b.len(), HANDOFF_LATENCY_BUCKETS_MS.len() + 1);
    assert_eq!(b[1], (Some(2), 0));
    assert_eq!(b[2], (Some(5), 1));
    assert_eq!(b[5], (Some(50), 2));
    assert_eq!(b[b.len() - 1], (None, 2));
    // Nothing was lost: 5 accepted = 1 closed + queued + in flight.
    assert_eq!(1 + s.queued + s.in_flight, 5);
}

/// Plain round-robin: the primary counts what a worker accepted but never
/// sees a connection close, so its open connections are unknown (`None`);
/// once the worker reports its load they are known, and the report is the
/// number.
#[test]
fn open_connections_are_known_only_from_the_workers_reports() {
    let mut h = rr(1);
    h.add(&[1]);
    h.accept();
    h.serve(1, 0, true);
    h.take();
    assert_eq!(h.d.stats().workers[&1].open, None);

    let mut h = lc(1);
    h.add(&[1, 2]);
    h.accept();
    h.take();
    h.ack(1, 0);
    h.d.answered(h.now, 1, HandoffId(0), true, Some(7));
    h.d.load(h.now, 2, 0);
    let s = h.d.stats();
    assert_eq!(s.workers[&1].open, Some(7));
    assert_eq!(s.workers[&2].open, Some(0));
    h.d.load(h.now, 1, 2);
    assert_eq!(h.d.stats().workers[&1].open, Some(2));
    // A worker that left is not shown.
    h.d.remove_worker(h.now, 2, None);
    assert!(!h.d.stats().workers.contains_key(&2));
}

/// Latencies past the last bound land in `+Inf`; histograms merge by
/// adding.
#[test]
fn the_latency_histogram_overflows_into_inf_and_merges() {
    let mut a = LatencyHistogram::default();
    a.record(5000);
    a.record(5001);
    let mut b = LatencyHistogram::default();
    b.record(1);
    a.merge(&b);
    let c = a.cumulative();
    assert_eq!(c[0], (Some(1), 1));
    assert_eq!(c[11], (Some(5000), 2));
    assert_eq!(c[12], (None, 3));
    assert_eq!((a.count(), a.sum_ms()), (3, 10002));
}

/// Regression (issue 13): a connection queued while the only worker is
/// held (a `--wait-ready` worker that listened and is not ready yet) is
/// not closed at the handoff timeout: it waits and is handed once the
/// worker is admitted. Once the held worker is drained for good (it
/// failed to start), what waited the timeout is closed.
#[test]
fn connections_queued_for_a_held_worker_wait_past_the_handoff_timeout() {
    let mut h = rr(1);
    h.d.add_worker_held(0, 1, true);
    h.accept();
    h.at(T * 3);
    assert_eq!(
        h.take(),
        [],
        "held within its ready time: the connection waits"
    );
    h.d.admit(h.now, 1);
    assert_eq!(h.take(), [send(1, 0, 0)]);
    h.serve(1, 0, true);
    h.take();
    // Held again, then drained for good: the queue has no worker left.
    h.d.hold(h.now, 1);
    h.accept();
    h.at(T * 5);
    assert_eq!(h.take(), [], "held: still waiting");
    h.d.drain(h.now, 1);
    h.at(T * 5 + 1);
    assert_eq!(
        h.take(),
        [
            close(1),
            report(None, HandoffFailure::NoWorker, HandoffOutcome::Closed, 1)
        ]
    );
}
