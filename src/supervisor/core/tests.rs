//! The supervisor's policy without processes: a unit test per rule and a
//! property test over random event sequences.

use std::collections::{BTreeMap, BTreeSet};

use proptest::prelude::{ProptestConfig, TestCaseError, prop_assert, prop_oneof, proptest};
use proptest::strategy::{Just, Strategy as Gen};

use super::*;

/// A core and a fake shell: forks are answered at once with new ids
/// (ids from 1, as the cluster gives them); every action is logged with
/// its time.
struct H {
    c: Core,
    now: u64,
    next_id: WorkerId,
    log: Vec<(u64, Action)>,
    /// Live workers (forked, not exited) and their slot.
    live: BTreeMap<WorkerId, SlotId>,
    /// Workers sent a kill or a disconnect.
    asked: BTreeSet<WorkerId>,
    exit: Option<i32>,
}

fn cfg(workers: usize) -> SupervisorConfig {
    SupervisorConfig {
        workers,
        worker_timeout: None,
        ..SupervisorConfig::default()
    }
}

fn ok(code: i64) -> ExitInfo {
    ExitInfo {
        code: Some(code),
        signal: None,
    }
}

fn sig(s: Signum) -> ExitInfo {
    ExitInfo {
        code: None,
        signal: Some(s),
    }
}

impl H {
    fn new(c: SupervisorConfig) -> H {
        H {
            c: Core::new(c, 7),
            now: 1_000,
            next_id: 1,
            log: Vec::new(),
            live: BTreeMap::new(),
            asked: BTreeSet::new(),
            exit: None,
        }
    }

    fn started(c: SupervisorConfig) -> H {
        let mut h = H::new(c);
        h.c.start(h.now);
        h.pump();
        h
    }

    /// Executes the queued actions as the shell would.
    fn pump(&mut self) {
        while let Some(a) = self.c.next_action() {
            self.log.push((self.now, a.clone()));
            match a {
                Action::Fork { slot, .. } => {
                    let id = self.next_id;
                    self.next_id += 1;
                    self.live.insert(id, slot);
                    self.c.forked(self.now, slot, id);
                }
                Action::Disconnect(w) | Action::Kill(w, _) => {
                    self.asked.insert(w);
                }
                Action::Exit(code) => {
                    assert!(self.exit.is_none(), "exit twice");
                    self.exit = Some(code);
                }
                _ => {}
            }
        }
    }

    fn at(&mut self, t: u64) {
        assert!(t >= self.now);
        self.now = t;
        self.c.tick(t);
        self.pump();
    }

    fn advance(&mut self, d: u64) {
        let t = self.now + d;
        self.at(t);
    }

    fn listen(&mut self, w: WorkerId) {
        self.c.listening(self.now, w, "tcp:8000".into());
        self.pump();
    }

    fn exit(&mut self, w: WorkerId, e: ExitInfo, after_disconnect: bool) {
        self.live.remove(&w);
        self.c.exited(self.now, w, e, after_disconnect);
        self.pump();
    }

    fn forks(&self) -> Vec<(u64, SlotId, ForkReason)> {
        self.log
            .iter()
            .filter_map(|(t, a)| match a {
                Action::Fork { slot, reason } => Some((*t, *slot, *reason)),
                _ => None,
            })
            .collect()
    }

    fn events(&self) -> Vec<String> {
        self.log
            .iter()
            .filter_map(|(_, a)| match a {
                Action::Report(e) => Some(e.to_string()),
                _ => None,
            })
            .collect()
    }

    fn reload_results(&self) -> Vec<Result<ReloadReport, ReloadError>> {
        self.log
            .iter()
            .filter_map(|(_, a)| match a {
                Action::ReloadDone(_, r) => Some(r.clone()),
                _ => None,
            })
            .collect()
    }

    fn index_of(&self, pred: impl Fn(&Action) -> bool) -> Option<usize> {
        self.log.iter().position(|(_, a)| pred(a))
    }

    fn all_ready(&mut self) {
        let ids: Vec<WorkerId> = self.live.keys().copied().collect();
        for w in ids {
            self.listen(w);
        }
    }
}

#[test]
fn start_forks_every_slot() {
    let h = H::started(cfg(3));
    assert_eq!(h.forks().len(), 3);
    assert!(h.forks().iter().all(|f| f.2 == ForkReason::Start));
    assert_eq!(h.c.slot_count(), 3);
}

#[test]
fn crash_restarts_after_backoff_that_doubles_and_caps() {
    let mut h = H::started(cfg(1));
    h.listen(1);
    // The first restart is immediate; then 100 ms, doubling.
    let mut expected = vec![0, 100, 200, 400];
    let mut id = 1;
    // A worker that got ready and crashes each time: delays double.
    for d in expected.drain(..) {
        h.exit(id, ok(1), false);
        assert!(
            h.events()
                .iter()
                .any(|e| e.contains(&format!("restarting in {d} ms"))),
            "{:?}",
            h.events()
        );
        if d > 0 {
            h.advance(d - 1);
            assert_eq!(h.forks().len() as u32, id, "not before the delay");
            h.advance(1);
        }
        id += 1;
        assert_eq!(h.forks().len() as u32, id, "forked once the delay passed");
        assert_eq!(h.forks().last().unwrap().2, ForkReason::Restart);
        assert_eq!(h.forks().last().unwrap().0, h.now);
        h.listen(id);
        // Up for a while, but not the stable period, nor long enough for
        // the crash window to forget.
        h.advance(1_000);
    }
    // Five crashes within 10 s so far is within budget; capped delays:
    let mut h = H::started(SupervisorConfig {
        max_restarts: 100,
        ..cfg(1)
    });
    let mut last = 0;
    for id in 1..=12 {
        h.listen(id);
        h.exit(id, ok(1), false);
        let e = (h.events().iter().rev())
            .find(|e| e.contains("restarting in"))
            .unwrap()
            .clone();
        last = e
            .trim_start_matches("slot 0 restarting in ")
            .trim_end_matches(" ms")
            .parse::<u64>()
            .unwrap();
        h.advance(last);
    }
    assert_eq!(last, 15_000, "capped at 15 s");
}

#[test]
fn backoff_resets_after_stable_period() {
    let mut h = H::started(cfg(1));
    h.listen(1);
    h.exit(1, ok(1), false);
    assert!(h.events().iter().any(|e| e == "slot 0 restarting in 0 ms"));
    h.listen(2);
    h.exit(2, ok(1), false);
    assert!(h.events().last().unwrap().contains("restarting in 100 ms"));
    h.advance(100);
    h.listen(3);
    h.exit(3, ok(1), false);
    assert!(h.events().last().unwrap().contains("restarting in 200 ms"));
    h.advance(200);
    h.listen(4);
    // Up for the stable period: the slot is reset, the next restart is
    // immediate again, and the one after it waits 100 ms.
    h.advance(30_000);
    h.exit(4, ok(1), false);
    assert_eq!(h.forks().len(), 5);
    assert_eq!(h.forks().last().unwrap().0, h.now, "at once");
    let n = h.events().len();
    h.listen(5);
    h.exit(5, ok(1), false);
    assert!(
        h.events()[n..]
            .iter()
            .any(|e| e == "slot 0 restarting in 100 ms"),
        "{:?}",
        &h.events()[n..]
    );
}

#[test]
fn a_worker_ended_by_a_group_stop_signal_waits_the_initial_backoff() {
    // SIGTERM may reach a worker (systemd's control group, Ctrl-C) before
    // the primary reads its own copy: no immediate restart for it.
    let mut h = H::started(cfg(1));
    h.all_ready();
    h.exit(1, sig(Signum::SIGTERM), false);
    assert!(h.events().last().unwrap().contains("restarting in 100 ms"));
    assert_eq!(h.forks().len(), 1);
    h.advance(100);
    assert_eq!(h.forks().len(), 2);
    // A SIGKILL or a crash is restarted at once (the next one after the
    // stable period).
    h.listen(2);
    h.advance(30_000);
    h.exit(2, sig(Signum::SIGKILL), false);
    assert_eq!(h.forks().len(), 3);
}

#[test]
fn crash_loop_before_ready_errors_the_slot_and_exits_non_zero() {
    let mut h = H::started(cfg(1));
    // A worker that exits at once, forever.
    let mut forks = 0;
    for _ in 0..100 {
        let Some((&w, _)) = h.live.iter().next() else {
            break;
        };
        forks += 1;
        h.exit(w, ok(1), false);
        h.advance(20_000);
    }
    // One start and max_restarts (5) restarts, then errored.
    assert_eq!(forks, 6);
    assert!(h.events().iter().any(|e| e.starts_with("slot 0 errored")));
    assert_eq!(h.exit, Some(1));
    let st = h.c.status(h.now);
    assert_eq!(st.len(), 1);
}

#[test]
fn an_errored_pool_held_waits_and_a_reload_starts_its_slots_afresh() {
    let mut h = H::started(cfg(2));
    h.c.hold_errored(h.now, true);
    h.pump();
    // Both slots crash before ready until they are errored.
    for _ in 0..100 {
        let Some((&w, _)) = h.live.iter().next() else {
            break;
        };
        h.exit(w, ok(1), false);
        h.advance(20_000);
    }
    assert_eq!(
        h.events()
            .iter()
            .filter(|e| e.contains(" errored: "))
            .count(),
        2
    );
    // Held: no exit, however long it waits.
    h.advance(600_000);
    assert_eq!(h.exit, None);
    let st = h.c.status(h.now);
    assert_eq!(st.len(), 2);
    assert!(st.iter().all(|r| r.state == WorkerState::Errored), "{st:?}");
    // A reload forks both slots again (one at a time) and they serve.
    let before = h.forks().len();
    h.c.reload(h.now);
    h.pump();
    for _ in 0..2 {
        h.all_ready();
    }
    assert_eq!(h.forks().len(), before + 2);
    assert!(matches!(
        h.reload_results()[..],
        [Ok(ReloadReport { replaced: 2, .. })]
    ));
    let st = h.c.status(h.now);
    assert!(st.iter().all(|r| r.state == WorkerState::Ready), "{st:?}");
    // The budgets were reset: a crash restarts, it does not error again.
    let w = *h.live.keys().next().unwrap();
    h.exit(w, ok(1), false);
    let ev = h.events();
    assert!(ev[ev.len() - 2].contains("slot 0 restarting"), "{ev:?}");
    assert_eq!(h.forks().len(), before + 3);
    // A stop still ends it, with 0.
    h.c.stop(h.now, false);
    h.pump();
    let ids: Vec<WorkerId> = h.live.keys().copied().collect();
    for w in ids {
        h.exit(w, sig(Signum::SIGKILL), false);
    }
    assert_eq!(h.exit, Some(0));
}

#[test]
fn an_errored_pool_not_held_exits_non_zero() {
    let mut h = H::started(cfg(1));
    h.c.hold_errored(h.now, true);
    h.c.hold_errored(h.now, false);
    h.pump();
    for _ in 0..100 {
        let Some((&w, _)) = h.live.iter().next() else {
            break;
        };
        h.exit(w, ok(1), false);
        h.advance(20_000);
    }
    assert_eq!(h.exit, Some(1));
}

#[test]
fn crash_loop_window_errors_a_ready_slot() {
    let mut h = H::started(SupervisorConfig {
        max_restarts: 3,
        ..cfg(2)
    });
    h.all_ready();
    // Slot 0 crashes after getting ready, again and again within 10 s.
    let mut w = 1;
    for i in 0..4 {
        h.exit(w, ok(1), false);
        if i < 3 {
            h.advance(2_000);
            w = *h.live.keys().max().unwrap();
            h.listen(w);
        }
    }
    assert!(
        h.events()
            .iter()
            .any(|e| e.starts_with("slot 0 errored: 4 crashes"))
    );
    let st = h.c.status(h.now);
    assert!(
        st.iter()
            .any(|r| r.slot == 0 && r.state == WorkerState::Errored)
    );
    // The other slot still runs: no exit.
    assert_eq!(h.exit, None);
    let errored = h
        .log
        .iter()
        .any(|(_, a)| matches!(a, Action::ReleaseSlot(0)));
    assert!(errored);
}

#[test]
fn restart_policies() {
    let mut h = H::started(SupervisorConfig {
        restart: RestartPolicy::OnFailure,
        ..cfg(2)
    });
    h.all_ready();
    h.exit(1, ok(0), false);
    h.advance(1_000);
    assert_eq!(h.forks().len(), 2, "a clean exit is not restarted");
    h.exit(2, sig(Signum::SIGSEGV), false);
    h.advance(100);
    assert_eq!(h.forks().len(), 3, "a crash is");

    let mut h = H::started(SupervisorConfig {
        restart: RestartPolicy::Never,
        ..cfg(1)
    });
    h.all_ready();
    h.exit(1, ok(3), false);
    h.advance(5_000);
    assert_eq!(h.forks().len(), 1);
    assert_eq!(h.exit, Some(1));
}

#[test]
fn a_worker_that_disconnected_itself_is_not_replaced() {
    let mut h = H::started(cfg(2));
    h.all_ready();
    h.exit(1, ok(0), true);
    h.advance(5_000);
    assert_eq!(h.forks().len(), 2);
    assert_eq!(h.exit, None);
}

#[test]
fn wait_ready_needs_the_message() {
    let mut h = H::started(SupervisorConfig {
        ready: ReadyMode::Message,
        ..cfg(1)
    });
    h.listen(1);
    assert!(!h.events().iter().any(|e| e.contains("ready")));
    h.c.ready_message(h.now, 1);
    h.pump();
    assert!(h.events().iter().any(|e| e.starts_with("worker 1 ready")));
}

#[test]
fn ready_timeout_kills_and_counts_as_failed_start() {
    let mut h = H::started(SupervisorConfig {
        ready_timeout: Duration::from_millis(500),
        ..cfg(1)
    });
    h.advance(499);
    assert!(!h.asked.contains(&1));
    h.advance(1);
    assert!(
        h.log
            .iter()
            .any(|(_, a)| *a == Action::Kill(1, Signum::SIGKILL))
    );
    h.exit(1, sig(Signum::SIGKILL), false);
    // Its first restart: at once.
    assert!(h.events().iter().any(|e| e == "slot 0 restarting in 0 ms"));
    assert_eq!(h.forks().len(), 2);
}

#[test]
fn reload_replaces_one_slot_at_a_time_drain_before_disconnect() {
    let mut h = H::started(cfg(2));
    h.all_ready();
    let t = h.c.reload(h.now);
    h.pump();
    // One replacement at a time.
    assert_eq!(h.forks().len(), 3);
    assert_eq!(h.forks()[2].2, ForkReason::Replace);
    // Not ready yet: nothing drained.
    assert!(h.index_of(|a| matches!(a, Action::Drain(_))).is_none());
    h.listen(3);
    let d = h.index_of(|a| *a == Action::Drain(1)).unwrap();
    let x = h.index_of(|a| *a == Action::Disconnect(1)).unwrap();
    assert!(d < x, "drained before it is told anything");
    assert_eq!(h.forks().len(), 4, "next slot");
    h.exit(1, ok(0), true);
    h.listen(4);
    assert!(h.log.iter().any(|(_, a)| *a == Action::Disconnect(2)));
    let r = h.reload_results();
    assert_eq!(r.len(), 1);
    assert_eq!(r[0].as_ref().unwrap().replaced, 2);
    assert!(
        h.log
            .iter()
            .any(|(_, a)| matches!(a, Action::ReloadDone(tt, _) if *tt == t))
    );
    // The old worker that does not exit is killed after the kill timeout.
    h.advance(30_000);
    assert!(
        h.log
            .iter()
            .any(|(_, a)| *a == Action::Kill(2, Signum::SIGKILL))
    );
    h.exit(2, sig(Signum::SIGKILL), true);
    assert_eq!(h.forks().len(), 4, "retired workers are not restarted");
}

#[test]
fn reload_batch() {
    let mut h = H::started(SupervisorConfig {
        reload_batch: 2,
        ..cfg(3)
    });
    h.all_ready();
    h.c.reload(h.now);
    h.pump();
    assert_eq!(h.forks().len(), 5);
    h.listen(4);
    assert_eq!(h.forks().len(), 5, "the batch finishes first");
    h.listen(5);
    assert_eq!(h.forks().len(), 6);
}

#[test]
fn reload_fails_closed_when_the_replacement_is_not_ready() {
    let mut h = H::started(SupervisorConfig {
        ready_timeout: Duration::from_millis(1_000),
        ..cfg(2)
    });
    h.all_ready();
    h.c.reload(h.now);
    h.pump();
    h.advance(1_000);
    assert!(
        h.log
            .iter()
            .any(|(_, a)| *a == Action::Kill(3, Signum::SIGKILL))
    );
    h.exit(3, sig(Signum::SIGKILL), false);
    let r = h.reload_results();
    assert!(matches!(
        r[0],
        Err(ReloadError::NotReady {
            slot: 0,
            failure: StartFailure::ReadyTimeout(_),
            replaced: 0
        })
    ));
    // The old workers were never drained, and nothing else is forked.
    assert!(h.index_of(|a| matches!(a, Action::Drain(1 | 2))).is_none());
    h.advance(10_000);
    assert_eq!(h.forks().len(), 3);
    // A replacement that exits before ready fails the same way.
    h.c.reload(h.now);
    h.pump();
    h.exit(4, ok(1), false);
    assert!(matches!(
        h.reload_results()[1],
        Err(ReloadError::NotReady {
            failure: StartFailure::Exited(_),
            ..
        })
    ));
    assert_eq!(h.exit, None);
}

/// Regression (issue 13): a `--wait-ready` replacement that listened but
/// did not send `'ready'` in time is stopped gracefully (drained,
/// disconnected, SIGKILLed only after the kill timeout), because under
/// `none`/`reuseport` the kernel already hands it connections; the
/// reload fails closed at the ready timeout all the same, and the old
/// workers are never drained.
#[test]
fn a_replacement_that_listened_but_is_not_ready_is_stopped_gracefully() {
    let mut h = H::started(SupervisorConfig {
        ready: ReadyMode::Message,
        ready_timeout: Duration::from_millis(1_000),
        kill_timeout: Duration::from_millis(5_000),
        ..cfg(2)
    });
    for w in [1, 2] {
        h.listen(w);
        h.c.ready_message(h.now, w);
        h.pump();
    }
    h.c.reload(h.now);
    h.pump();
    h.listen(3);
    h.advance(1_000);
    assert!(matches!(
        h.reload_results()[..],
        [Err(ReloadError::NotReady {
            slot: 0,
            failure: StartFailure::ReadyTimeout(_),
            replaced: 0
        })]
    ));
    let drain = h.index_of(|a| *a == Action::Drain(3)).expect("drained");
    let disc = h
        .index_of(|a| *a == Action::Disconnect(3))
        .expect("disconnected");
    assert!(drain < disc);
    assert!(h.index_of(|a| matches!(a, Action::Kill(3, _))).is_none());
    assert!(h.index_of(|a| matches!(a, Action::Drain(1 | 2))).is_none());
    // Still alive at the kill timeout: SIGKILL then.
    h.advance(4_999);
    assert!(h.index_of(|a| matches!(a, Action::Kill(3, _))).is_none());
    h.advance(1);
    assert!(
        h.index_of(|a| *a == Action::Kill(3, Signum::SIGKILL))
            .is_some()
    );
    h.exit(3, sig(Signum::SIGKILL), true);
    h.advance(10_000);
    assert_eq!(h.forks().len(), 3, "nothing else forked");
    assert_eq!(h.exit, None);
}

#[test]
fn reload_during_reload_is_queued_not_interleaved() {
    let mut h = H::started(cfg(1));
    h.all_ready();
    let a = h.c.reload(h.now);
    let b = h.c.reload(h.now);
    let c = h.c.reload(h.now);
    h.pump();
    assert_ne!(a, b);
    assert_eq!(b, c, "later requests join the queued one");
    assert_eq!(h.forks().len(), 2);
    h.listen(2);
    // The first finished; the queued one starts now.
    assert_eq!(h.reload_results().len(), 1);
    assert_eq!(h.forks().len(), 3);
    h.listen(3);
    assert_eq!(h.reload_results().len(), 2);
}

#[test]
fn graceful_stop_drains_disconnects_and_kills_after_timeout() {
    let mut h = H::started(cfg(2));
    h.all_ready();
    h.c.signal(h.now, Signum::SIGTERM);
    h.pump();
    assert!(h.log.iter().any(|(_, a)| *a == Action::CloseListeners));
    for w in [1, 2] {
        let d = h.index_of(|a| *a == Action::Drain(w)).unwrap();
        let x = h.index_of(|a| *a == Action::Disconnect(w)).unwrap();
        assert!(d < x);
    }
    h.exit(1, ok(0), true);
    h.advance(29_999);
    assert!(!h.log.iter().any(|(_, a)| matches!(a, Action::Kill(..))));
    h.advance(1);
    assert!(
        h.log
            .iter()
            .any(|(_, a)| *a == Action::Kill(2, Signum::SIGKILL))
    );
    h.exit(2, sig(Signum::SIGKILL), true);
    assert_eq!(h.exit, Some(0));
    assert_eq!(h.forks().len(), 2);
}

#[test]
fn process_group_signal_during_stop_is_not_a_crash() {
    let mut h = H::started(cfg(2));
    h.all_ready();
    h.c.signal(h.now, Signum::SIGINT);
    h.pump();
    // The workers got SIGINT too and die of it (not after disconnect).
    h.exit(1, sig(Signum::SIGINT), false);
    h.exit(2, sig(Signum::SIGINT), false);
    h.advance(20_000);
    assert_eq!(h.forks().len(), 2, "nothing restarted");
    assert!(!h.events().iter().any(|e| e.contains("unexpectedly")));
    assert_eq!(h.exit, Some(0));
}

#[test]
fn worker_dies_of_the_signal_before_the_primary_sees_it() {
    // The exit can be read before the primary's own signal: the restart
    // waits its backoff, and the stop cancels it.
    let mut h = H::started(cfg(1));
    h.all_ready();
    h.exit(1, sig(Signum::SIGTERM), false);
    h.c.signal(h.now, Signum::SIGTERM);
    h.pump();
    h.advance(1_000);
    assert_eq!(h.forks().len(), 1);
    assert_eq!(h.exit, Some(0));
}

#[test]
fn duplicate_signal_is_not_a_second_request() {
    let mut h = H::started(cfg(1));
    h.all_ready();
    h.c.signal(h.now, Signum::SIGTERM);
    h.advance(10);
    h.c.signal(h.now, Signum::SIGTERM);
    h.pump();
    assert!(h.events().iter().any(|e| e.contains("received again")));
    assert!(!h.log.iter().any(|(_, a)| matches!(a, Action::Kill(..))));
    // A second one later is the user's: immediate.
    h.advance(1_000);
    h.c.signal(h.now, Signum::SIGTERM);
    h.pump();
    assert!(
        h.log
            .iter()
            .any(|(_, a)| *a == Action::Kill(1, Signum::SIGKILL))
    );
    assert!(h.events().iter().any(|e| e == "immediate stop on SIGTERM"));
}

#[test]
fn sigint_then_sigterm_is_a_second_request_and_sigquit_is_immediate() {
    let mut h = H::started(cfg(1));
    h.all_ready();
    h.c.signal(h.now, Signum::SIGINT);
    h.c.signal(h.now, Signum::SIGTERM);
    h.pump();
    assert!(
        h.log
            .iter()
            .any(|(_, a)| *a == Action::Kill(1, Signum::SIGKILL))
    );
    let mut h = H::started(cfg(1));
    h.all_ready();
    h.c.signal(h.now, Signum::SIGQUIT);
    h.pump();
    assert!(
        h.log
            .iter()
            .any(|(_, a)| *a == Action::Kill(1, Signum::SIGKILL))
    );
    h.exit(1, sig(Signum::SIGKILL), false);
    assert_eq!(h.exit, Some(0));
}

#[test]
fn sighup_reloads_ttin_ttou_scale_never_below_one() {
    let mut h = H::started(cfg(1));
    h.all_ready();
    h.c.signal(h.now, Signum::SIGTTIN);
    h.pump();
    assert_eq!(h.c.slot_count(), 2);
    h.listen(2);
    h.c.signal(h.now, Signum::SIGTTOU);
    h.pump();
    assert_eq!(h.c.slot_count(), 1);
    assert!(h.log.iter().any(|(_, a)| *a == Action::Drain(2)));
    h.c.signal(h.now, Signum::SIGTTOU);
    h.pump();
    assert_eq!(h.c.slot_count(), 1, "never below one");
    // Not silent: the log says why nothing happened.
    assert_eq!(
        h.events().last().unwrap(),
        "not scaled: SIGTTOU asks for one worker fewer, and one is the fewest; \
         still 1 worker(s)"
    );
    h.exit(2, ok(0), true);
    assert!(h.log.iter().any(|(_, a)| *a == Action::ReleaseSlot(1)));
    h.c.signal(h.now, Signum::SIGHUP);
    h.pump();
    assert!(h.events().iter().any(|e| e.starts_with("reload started")));
}

#[test]
fn scale_down_drains_the_removed_workers() {
    let mut h = H::started(cfg(4));
    h.all_ready();
    h.c.scale(h.now, 2);
    h.pump();
    for w in [3, 4] {
        let d = h.index_of(|a| *a == Action::Drain(w)).unwrap();
        let x = h.index_of(|a| *a == Action::Disconnect(w)).unwrap();
        assert!(d < x);
    }
    h.exit(3, ok(0), true);
    h.exit(4, sig(Signum::SIGTERM), false);
    h.advance(10_000);
    assert_eq!(h.forks().len(), 4, "removed slots are not restarted");
    assert!(
        h.events()
            .iter()
            .any(|e| e == "scaled from 4 to 2 worker(s)")
    );
}

#[test]
fn a_scale_up_reuses_the_lowest_free_slot_numbers() {
    let mut h = H::started(cfg(1));
    h.all_ready();
    h.c.scale(h.now, 3);
    h.pump();
    h.all_ready();
    h.c.scale(h.now, 1);
    h.pump();
    // Slot 2's worker is still draining: a scale up now takes slot 1
    // only once its worker has gone too.
    h.exit(2, ok(0), true);
    h.c.scale(h.now, 2);
    h.pump();
    assert_eq!(h.forks().last().unwrap().1, 1, "{:?}", h.forks());
    h.exit(3, ok(0), true);
    h.c.scale(h.now, 3);
    h.pump();
    let slots: Vec<SlotId> = h.forks().iter().map(|f| f.1).collect();
    assert_eq!(slots, [0, 1, 2, 1, 2], "PM2's instance numbers: 0..n again");
    let rows: BTreeSet<SlotId> = h.c.status(h.now).iter().map(|r| r.slot).collect();
    assert_eq!(rows, BTreeSet::from([0, 1, 2]));
}

#[test]
fn a_worker_that_exits_at_once_for_10_s_is_no_fork_storm() {
    for fail_before_ready in [true, false] {
        let mut h = H::started(SupervisorConfig {
            fail_before_ready,
            ..cfg(1)
        });
        // Each worker exits 1 ms after its fork, for 10 s of loop time.
        let end = h.now + 10_000;
        while h.now < end && h.exit.is_none() {
            if let Some((&w, _)) = h.live.iter().next() {
                h.advance(1);
                h.exit(w, ok(1), false);
            } else {
                h.advance(1);
            }
        }
        let forks = h.forks();
        assert_eq!(forks.len(), 6, "{forks:?}");
        let gaps: Vec<u64> = forks.windows(2).map(|w| w[1].0 - w[0].0).collect();
        // The first restart at once (1 ms after the exit, as the worker
        // lived 1 ms), then 100 ms, doubling.
        assert_eq!(gaps, [1, 101, 201, 401, 801], "{fail_before_ready}");
        assert_eq!(h.exit, Some(1));
    }
}

#[test]
fn hung_worker_is_killed_and_replaced() {
    let mut h = H::started(cfg(2));
    h.all_ready();
    h.c.hung(h.now, 1);
    h.pump();
    let d = h.index_of(|a| *a == Action::Drain(1)).unwrap();
    let k = h
        .index_of(|a| *a == Action::Kill(1, Signum::SIGKILL))
        .unwrap();
    assert!(d < k);
    h.exit(1, sig(Signum::SIGKILL), false);
    h.advance(100);
    assert_eq!(h.forks().len(), 3);
}

#[test]
fn limits_replace_gracefully_one_slot_at_a_time() {
    let mut h = H::started(SupervisorConfig {
        max_memory: Some(1_000),
        max_connections: Some(10),
        max_connections_jitter: 5,
        ..cfg(2)
    });
    h.all_ready();
    h.c.rss(h.now, 1, 2_000);
    h.c.handed(h.now, 2, 100);
    h.pump();
    // One at a time: slot 0's replacement first.
    assert_eq!(h.forks().len(), 3);
    assert!(h.index_of(|a| matches!(a, Action::Drain(_))).is_none());
    h.listen(3);
    assert!(h.log.iter().any(|(_, a)| *a == Action::Drain(1)));
    assert_eq!(h.forks().len(), 4, "then slot 1's");
    h.listen(4);
    assert!(h.log.iter().any(|(_, a)| *a == Action::Drain(2)));
    // Under the limit: nothing.
    h.c.handed(h.now, 3, 9);
    h.pump();
    assert_eq!(h.forks().len(), 4);
}

#[test]
fn at_its_limit_a_worker_leaves_rotation_at_once() {
    let mut h = H::started(SupervisorConfig {
        max_connections: Some(10),
        ..cfg(2)
    });
    assert!(
        h.log
            .iter()
            .any(|(_, a)| *a == Action::LimitConnections(1, 10))
    );
    h.all_ready();
    h.c.handed(h.now, 1, 10);
    h.pump();
    // Held at once (worker 2 serves), then replaced by worker 3.
    let held = h.index_of(|a| *a == Action::Hold(1)).unwrap();
    let fork = (h
        .log
        .iter()
        .rposition(|(_, a)| matches!(a, Action::Fork { slot: 0, .. })))
    .unwrap();
    assert!(held < fork, "out of rotation before its replacement starts");
    // Worker 1's replacement fails: worker 1 is put back in rotation.
    h.exit(3, ok(1), false);
    assert!(h.log.iter().any(|(_, a)| *a == Action::Admit(1)));
    assert!(h.index_of(|a| *a == Action::Drain(1)).is_none());
    // Worker 2 at its limit: held, replaced; once ready, drained.
    h.c.handed(h.now, 2, 10);
    h.pump();
    assert!(h.log.iter().any(|(_, a)| *a == Action::Hold(2)));
    h.listen(4);
    assert!(h.log.iter().any(|(_, a)| *a == Action::Drain(2)));
}

#[test]
fn a_limit_reached_before_ready_applies_once_ready() {
    let mut h = H::started(SupervisorConfig {
        max_connections: Some(10),
        ready: ReadyMode::Message,
        ..cfg(2)
    });
    h.c.ready_message(h.now, 2);
    h.c.handed(h.now, 1, 10);
    h.pump();
    assert!(
        h.index_of(|a| *a == Action::Hold(1)).is_some(),
        "held as forked"
    );
    assert_eq!(h.forks().len(), 2, "not replaced while starting");
    h.c.ready_message(h.now, 1);
    h.pump();
    assert!(
        h.events()
            .iter()
            .any(|e| e.contains("connection limit reached (10 handed)"))
    );
    assert_eq!(h.forks().len(), 3);
}

#[test]
fn wait_ready_holds_a_worker_out_of_rotation_until_ready() {
    let mut h = H::started(SupervisorConfig {
        ready: ReadyMode::Message,
        ..cfg(1)
    });
    let hold = h.index_of(|a| *a == Action::Hold(1)).unwrap();
    let forked = h
        .index_of(|a| matches!(a, Action::Report(LifecycleEvent::Forked { .. })))
        .unwrap();
    assert!(hold < forked, "held before anything can listen");
    h.listen(1);
    assert!(h.index_of(|a| *a == Action::Admit(1)).is_none());
    h.c.ready_message(h.now, 1);
    h.pump();
    let admit = h.index_of(|a| *a == Action::Admit(1)).unwrap();
    let ready = h
        .index_of(|a| matches!(a, Action::Report(LifecycleEvent::Ready { .. })))
        .unwrap();
    assert!(admit < ready);
}

#[test]
fn jitter_spreads_the_limits() {
    let mut h = H::started(SupervisorConfig {
        max_connections: Some(100),
        max_connections_jitter: 50,
        ..cfg(8)
    });
    h.all_ready();
    let limits: BTreeSet<u64> = h.c.workers.values().filter_map(|w| w.conn_limit).collect();
    assert!(limits.iter().all(|l| (100..=150).contains(l)));
    assert!(limits.len() > 1, "{limits:?}");
}

#[test]
fn restart_request_is_a_graceful_replacement_that_fails_closed() {
    let mut h = H::started(cfg(1));
    h.all_ready();
    assert!(h.c.replace(h.now, 1, ReplaceReason::Requested));
    h.pump();
    h.exit(2, ok(1), false);
    assert!(h.events().iter().any(|e| e.contains("keeps serving")));
    assert!(h.index_of(|a| matches!(a, Action::Drain(1))).is_none());
    assert_eq!(h.exit, None);
    // It may be asked for again.
    assert!(h.c.replace(h.now, 1, ReplaceReason::Requested));
}

#[test]
fn status_rows() {
    let mut h = H::started(cfg(2));
    h.listen(1);
    h.advance(500);
    let st = h.c.status(h.now);
    assert_eq!(st[0].state, WorkerState::Ready);
    assert_eq!(st[1].state, WorkerState::Starting);
    assert_eq!(st[0].uptime, Duration::from_millis(500));
}

/// Regression (issue 13): an empty slot says `restarting` only when it
/// will restart: during a graceful stop it is `stopped`, under restart
/// `never` after its worker exited it is `exited`, and while its backoff
/// runs it is `restarting`.
#[test]
fn empty_slots_are_stopped_or_exited_unless_they_restart() {
    let state = |h: &H, slot: SlotId| {
        let st = h.c.status(h.now);
        st.iter()
            .find(|r| r.slot == slot && r.worker.is_none())
            .map(|r| r.state)
    };
    // Restart `never`: the slot is exited, not restarting.
    let mut h = H::started(SupervisorConfig {
        restart: RestartPolicy::Never,
        ..cfg(2)
    });
    h.all_ready();
    h.exit(1, ok(3), false);
    assert_eq!(state(&h, 0), Some(WorkerState::Exited));
    assert_eq!(WorkerState::Exited.to_string(), "exited");
    // Restart `always` with a backoff: restarting while it waits.
    let mut h = H::started(SupervisorConfig {
        backoff_initial: Duration::from_millis(500),
        ..cfg(2)
    });
    h.all_ready();
    h.exit(1, ok(3), false);
    h.listen(3);
    h.exit(3, ok(3), false);
    assert_eq!(state(&h, 0), Some(WorkerState::Restarting));
    // A graceful stop: the slots emptied by it are stopped.
    h.c.stop(h.now, true);
    h.pump();
    h.exit(2, ok(0), true);
    assert_eq!(state(&h, 0), Some(WorkerState::Stopped));
    assert_eq!(state(&h, 1), Some(WorkerState::Stopped));
    assert_eq!(WorkerState::Stopped.to_string(), "stopped");
}

/// Regression (issue 13): the supervisor's lines give durations and
/// sizes in words: `6 crashes within 10s`, `memory limit reached (195
/// MiB resident)`, not `10000 ms` and a byte count.
#[test]
fn crash_window_and_memory_read_as_words() {
    assert_eq!(duration_words(Duration::from_millis(10_000)), "10s");
    assert_eq!(
        duration_words(Duration::from_millis(90_250)),
        "1m 30s 250ms"
    );
    assert_eq!(duration_words(Duration::ZERO), "0ms");
    assert_eq!(
        ReplaceReason::Memory(204_484_608).to_string(),
        "memory limit reached (195 MiB resident)"
    );
    assert_eq!(size_words(512 << 10), "512 KiB");
    assert_eq!(size_words(100), "100 bytes");
    let mut h = H::started(SupervisorConfig {
        max_restarts: 1,
        restart_window: Duration::from_secs(10),
        fail_before_ready: false,
        ..cfg(1)
    });
    h.all_ready();
    h.exit(1, ok(3), false);
    h.listen(2);
    h.exit(2, ok(3), false);
    let errored = (h.events().into_iter())
        .find(|e| e.contains("errored"))
        .expect("errored");
    assert!(
        errored.contains("2 crashes within 10s (at most 1 restarts)"),
        "{errored}"
    );
}

#[test]
fn event_lines_have_no_debug_formatting() {
    let e = LifecycleEvent::Exited {
        worker: 3,
        slot: 1,
        exit: sig(Signum::SIGKILL),
        expected: false,
    };
    assert_eq!(
        e.to_string(),
        "worker 3 (slot 1) exited unexpectedly: killed by SIGKILL"
    );
    let e = LifecycleEvent::Errored {
        slot: 0,
        last: Some(ok(2)),
        why: "x".into(),
    };
    assert_eq!(e.to_string(), "slot 0 errored: x; last worker: exit code 2");
}

// ----- the property test -----------------------------------------------

#[derive(Debug, Clone)]
enum Op {
    Wait(u64),
    Listen(usize),
    Ready(usize),
    Crash(usize, bool),
    ExitAsked(usize),
    Reload,
    Scale(usize),
    Signal(u8),
    Hung(usize),
    Rss(usize),
    Handed(usize),
    Replace(usize),
}

fn op() -> impl Gen<Value = Op> {
    prop_oneof![
        (1u64..3_000).prop_map(Op::Wait),
        (0usize..8).prop_map(Op::Listen),
        (0usize..8).prop_map(Op::Ready),
        ((0usize..8), proptest::bool::ANY).prop_map(|(i, b)| Op::Crash(i, b)),
        (0usize..8).prop_map(Op::ExitAsked),
        Just(Op::Reload),
        (0usize..5).prop_map(Op::Scale),
        (0u8..6).prop_map(Op::Signal),
        (0usize..8).prop_map(Op::Hung),
        (0usize..8).prop_map(Op::Rss),
        (0usize..8).prop_map(Op::Handed),
        (0usize..8).prop_map(Op::Replace),
    ]
}

fn pick(h: &H, i: usize) -> Option<WorkerId> {
    let ids: Vec<WorkerId> = h.live.keys().copied().collect();
    (!ids.is_empty()).then(|| ids[i % ids.len()])
}

fn check_log(h: &H, cfg: &SupervisorConfig) -> Result<(), TestCaseError> {
    let mut drained = BTreeSet::new();
    let mut last_restart: BTreeMap<SlotId, u64> = BTreeMap::new();
    let mut stop_at: Option<usize> = None;
    let mut reload_running = 0i32;
    for (i, (t, a)) in h.log.iter().enumerate() {
        match a {
            Action::Drain(w) => {
                drained.insert(*w);
            }
            // Every disconnect the supervisor sends follows the worker's
            // drain: a draining worker gets no new connection.
            Action::Disconnect(w) => prop_assert!(drained.contains(w), "disconnect before drain"),
            Action::Kill(w, _) => prop_assert!(drained.contains(w), "kill before drain"),
            // A slot gone (scaled down, errored) may come back as a new
            // one: its restarts start afresh.
            Action::ReleaseSlot(slot) => {
                last_restart.remove(slot);
            }
            Action::Report(LifecycleEvent::Stopping { .. }) => {
                stop_at.get_or_insert(i);
            }
            // Reloads never interleave.
            Action::Report(LifecycleEvent::ReloadStarted { .. }) => {
                reload_running += 1;
                prop_assert!(reload_running == 1, "interleaved reloads");
            }
            Action::Report(LifecycleEvent::ReloadFinished(_) | LifecycleEvent::ReloadFailed(_)) => {
                reload_running = (reload_running - 1).max(0);
            }
            Action::Fork { slot, reason } => {
                // Nothing is forked during a stop.
                prop_assert!(stop_at.is_none(), "fork during stop");
                // No fork storm: the first restart may be immediate, but
                // two restarts of one slot are at least the initial
                // backoff apart (a reset needs a worker up for the stable
                // period, longer than that).
                if *reason == ForkReason::Restart
                    && let Some(last) = last_restart.insert(*slot, *t)
                {
                    prop_assert!(*t >= last + ms(cfg.backoff_initial), "restart too soon");
                }
            }
            _ => {}
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(400))]

    #[test]
    fn random_event_sequences_keep_the_invariants(
        ops in proptest::collection::vec(op(), 1..120),
        workers in 1usize..4,
        message in proptest::bool::ANY,
    ) {
        let c = SupervisorConfig {
            workers,
            ready: if message { ReadyMode::Message } else { ReadyMode::Listening },
            ready_timeout: Duration::from_secs(2),
            kill_timeout: Duration::from_secs(3),
            max_memory: Some(100),
            max_connections: Some(50),
            max_connections_jitter: 10,
            ..cfg(workers)
        };
        let mut h = H::started(c.clone());
        for o in ops {
            if h.exit.is_some() {
                break;
            }
            let now = h.now;
            match o {
                Op::Wait(d) => h.advance(d),
                Op::Listen(i) => if let Some(w) = pick(&h, i) { h.listen(w) },
                Op::Ready(i) => if let Some(w) = pick(&h, i) {
                    h.c.ready_message(now, w);
                    h.pump();
                },
                Op::Crash(i, after) => if let Some(w) = pick(&h, i) {
                    h.exit(w, ok(1), after);
                },
                Op::ExitAsked(i) => {
                    let asked: Vec<WorkerId> =
                        h.asked.iter().copied().filter(|w| h.live.contains_key(w)).collect();
                    if !asked.is_empty() {
                        let w = asked[i % asked.len()];
                        h.exit(w, ok(0), true);
                    }
                }
                Op::Reload => { h.c.reload(now); h.pump(); }
                Op::Scale(n) => { h.c.scale(now, n); h.pump(); }
                Op::Signal(s) => {
                    let s = [Signum::SIGTERM, Signum::SIGINT, Signum::SIGQUIT,
                        Signum::SIGHUP, Signum::SIGTTIN, Signum::SIGTTOU][s as usize];
                    h.c.signal(now, s);
                    h.pump();
                }
                Op::Hung(i) => if let Some(w) = pick(&h, i) { h.c.hung(now, w); h.pump(); },
                Op::Rss(i) => if let Some(w) = pick(&h, i) { h.c.rss(now, w, 1_000); h.pump(); },
                Op::Handed(i) => if let Some(w) = pick(&h, i) { h.c.handed(now, w, 60); h.pump(); },
                Op::Replace(i) => if let Some(w) = pick(&h, i) {
                    h.c.replace(now, w, ReplaceReason::Requested);
                    h.pump();
                },
            }
        }
        check_log(&h, &c)?;
        // Every worker is eventually exited or running: stop, let every
        // worker asked to go do so (or be killed), and the primary exits.
        if h.exit.is_none() {
            let now = h.now;
            h.c.stop(now, true);
            h.pump();
        }
        for _ in 0..10 {
            let asked: Vec<WorkerId> =
                h.asked.iter().copied().filter(|w| h.live.contains_key(w)).collect();
            for w in asked {
                h.exit(w, sig(Signum::SIGKILL), true);
            }
            h.advance(5_000);
        }
        prop_assert!(h.exit.is_some(), "the primary never exited");
        prop_assert!(h.live.is_empty(), "workers left: {:?}", h.live);
        check_log(&h, &c)?;
    }
}
