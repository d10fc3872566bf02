//! What the control socket (`control.rs`) and the metrics endpoint
//! (`metrics.rs`) read and do: one view of the running pool over the
//! [`Supervisor`], the counters the supervisor does not keep (reloads and
//! their outcome, connections handed to workers that are gone), and the
//! one place where a worker's resident memory and CPU time are sampled
//! from `/proc`.

use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::Rc;
use std::time::{Duration, Instant};

use serde::Serialize;
use uvcluster::cluster::DispatchStats;
use uvcluster::supervisor::{LifecycleEvent, Supervisor, WorkerState, WorkerStatus};
use uvcluster::uv::Loop;

/// A process's resident memory and CPU time, from `/proc/<pid>/statm` and
/// `/proc/<pid>/stat` (Linux; `proc(5)`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ProcSample {
    /// Resident set size in bytes (`statm`'s second field × the page
    /// size).
    pub rss_bytes: u64,
    /// User plus system CPU time in seconds (`stat`'s `utime` + `stime`,
    /// in clock ticks, over `CLK_TCK`).
    pub cpu_seconds: f64,
}

/// Reads `pid`'s [`ProcSample`]; `None` when the process is gone or
/// `/proc` is unreadable.
pub fn sample(pid: i32) -> Option<ProcSample> {
    let statm = std::fs::read_to_string(format!("/proc/{pid}/statm")).ok()?;
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    parse(&statm, &stat, page_size(), clock_ticks())
}

/// The pure part of [`sample`]: `statm` and `stat` as read, the page size
/// in bytes and the clock ticks per second.
fn parse(statm: &str, stat: &str, page: u64, ticks: u64) -> Option<ProcSample> {
    let resident: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    // The command name (field 2) is in parentheses and may hold spaces and
    // parentheses itself: the fields after it start after the last `)`.
    let rest = &stat[stat.rfind(')')? + 1..];
    let mut f = rest.split_whitespace();
    // `rest` starts at field 3 (state); utime and stime are fields 14, 15.
    let utime: u64 = f.nth(11)?.parse().ok()?;
    let stime: u64 = f.next()?.parse().ok()?;
    Some(ProcSample {
        rss_bytes: resident * page,
        cpu_seconds: (utime + stime) as f64 / ticks.max(1) as f64,
    })
}

fn page_size() -> u64 {
    use nix::unistd::{SysconfVar, sysconf};
    sysconf(SysconfVar::PAGE_SIZE)
        .ok()
        .flatten()
        .map_or(4096, |v| v as u64)
}

fn clock_ticks() -> u64 {
    use nix::unistd::{SysconfVar, sysconf};
    sysconf(SysconfVar::CLK_TCK)
        .ok()
        .flatten()
        .map_or(100, |v| v as u64)
}

/// The shortest interval over which CPU% is measured; a `status` sooner
/// repeats the previous figure.
const MIN_SAMPLE_GAP: Duration = Duration::from_millis(250);

/// One worker (or empty slot) as `uvcluster ctl status` shows it; the
/// `--json` form is this struct's fields.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Row {
    /// The cluster worker id; `None` for a slot without a worker.
    pub id: Option<u32>,
    /// Its process id.
    pub pid: Option<i32>,
    /// Its slot.
    pub slot: usize,
    /// `starting`, `ready`, `draining`, `errored`, `restarting`, `stopped`
    /// (a stop is under way) or `exited` (not to be restarted).
    pub state: String,
    /// Seconds since it was forked, to the millisecond.
    pub uptime_seconds: f64,
    /// Restarts of its slot after a crash.
    pub restarts: u32,
    /// Connections the primary handed it (round-robin policies).
    pub connections_handed: u64,
    /// Connections it holds open, as it last reported them to the
    /// primary's dispatcher (a Rust worker under `leastconn`): `None` where
    /// the primary cannot see them (plain `rr`, where a worker closes the
    /// connections it was handed without telling; `none` and `reuseport`,
    /// where the kernel hands them out; a Node worker; docs/control.md).
    pub connections_open: Option<u64>,
    /// Resident memory in bytes; `None` where unknown (no process, or one
    /// that has exited and is not yet reaped).
    pub rss_bytes: Option<u64>,
    /// CPU time used, user plus system, in seconds.
    pub cpu_seconds: Option<f64>,
    /// CPU use in percent of one core since the previous sample (or, at
    /// the first, since the fork).
    pub cpu_percent: Option<f64>,
}

#[derive(Default)]
struct State {
    reloads_ok: u64,
    reloads_failed: u64,
    stopping: bool,
    /// Per pid: the last CPU time seen and when.
    cpu: HashMap<i32, (f64, Instant, Option<f64>)>,
    /// Per live worker: the connections last seen handed to it.
    handed: HashMap<u32, u64>,
    /// Connections handed to workers that are gone.
    handed_retired: u64,
    /// Worker forks seen (starts, restarts, replacements).
    forks: u64,
}

/// The pool as the operators' interfaces see it. Cheap to clone.
#[derive(Clone)]
pub struct Ops {
    sup: Supervisor,
    state: Rc<RefCell<State>>,
}

impl std::fmt::Debug for Ops {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ops").finish_non_exhaustive()
    }
}

impl Ops {
    /// A view of `sup`; feed it every lifecycle event with
    /// [`event`](Self::event).
    pub fn new(sup: Supervisor) -> Ops {
        Ops {
            sup,
            state: Rc::default(),
        }
    }

    /// The supervisor.
    pub fn supervisor(&self) -> Supervisor {
        self.sup
    }

    /// Counts what the metrics report of a lifecycle event.
    pub fn event(&self, lp: &mut Loop, e: &LifecycleEvent) {
        self.refresh(lp);
        if let LifecycleEvent::Forked { worker, .. } = e
            && let Some(w) = self.sup.primary(lp).worker(lp, *worker)
        {
            // A worker's own exit callback runs before the supervisor
            // forgets it: its last count of handed connections is kept.
            let me = self.clone();
            w.on_exit(lp, move |lp, _, _, _| me.refresh(lp));
        }
        let mut s = self.state.borrow_mut();
        match e {
            LifecycleEvent::ReloadFinished(_) => s.reloads_ok += 1,
            LifecycleEvent::ReloadFailed(_) => s.reloads_failed += 1,
            LifecycleEvent::Stopping { .. } => s.stopping = true,
            LifecycleEvent::Forked { .. } => s.forks += 1,
            _ => {}
        }
    }

    /// Reloads that replaced every worker, and reloads that failed closed.
    pub fn reloads(&self) -> (u64, u64) {
        let s = self.state.borrow();
        (s.reloads_ok, s.reloads_failed)
    }

    /// Worker forks so far.
    pub fn forks(&self) -> u64 {
        self.state.borrow().forks
    }

    /// Whether a stop has begun.
    pub fn stopping(&self) -> bool {
        self.state.borrow().stopping
    }

    /// Ready: at least one worker ready and no stop begun (`/readyz`).
    pub fn ready(&self, lp: &Loop) -> bool {
        !self.stopping()
            && self
                .sup
                .status(lp)
                .iter()
                .any(|r| r.state == WorkerState::Ready)
    }

    /// Every connection the primary handed a worker, those of workers
    /// gone included (a counter that never goes down).
    pub fn handed_total(&self) -> u64 {
        let s = self.state.borrow();
        s.handed_retired + s.handed.values().sum::<u64>()
    }

    /// What the primary's dispatchers hold: the dispatch queue, the
    /// handoff latencies, each worker's open connections where known
    /// ([`Primary::dispatch_stats`](uvcluster::cluster::Primary::dispatch_stats)).
    pub fn dispatch(&self, lp: &Loop) -> DispatchStats {
        self.sup.primary(lp).dispatch_stats(lp)
    }

    /// One row per worker and empty slot, by slot, with fresh `/proc`
    /// samples.
    pub fn rows(&self, lp: &Loop) -> Vec<Row> {
        let status = self.sup.status(lp);
        let dispatch = self.dispatch(lp);
        let now = Instant::now();
        let mut s = self.state.borrow_mut();
        let mut live_pids = Vec::new();
        let rows = status
            .iter()
            .map(|w| {
                let proc_ = w.pid.and_then(sample);
                let mut cpu_percent = None;
                if let (Some(pid), Some(p)) = (w.pid, proc_) {
                    live_pids.push(pid);
                    let pct = match s.cpu.get(&pid) {
                        // Too close to the previous sample to measure:
                        // its figure stands, and so does the sample.
                        Some(&(_, at, last)) if now - at < MIN_SAMPLE_GAP => last,
                        Some(&(cpu, at, _)) => Some(percent(p.cpu_seconds - cpu, now - at)),
                        None => Some(percent(p.cpu_seconds, w.uptime)),
                    };
                    let fresh = s
                        .cpu
                        .get(&pid)
                        .is_some_and(|&(_, at, _)| now - at < MIN_SAMPLE_GAP);
                    if !fresh {
                        s.cpu.insert(pid, (p.cpu_seconds, now, pct));
                    }
                    cpu_percent = pct;
                }
                Row {
                    id: w.id,
                    pid: w.pid,
                    slot: w.slot,
                    state: w.state.to_string(),
                    // Milliseconds: `1.695`, not `1.6949999999999998`.
                    uptime_seconds: w.uptime.as_millis() as f64 / 1000.0,
                    restarts: w.restarts,
                    connections_handed: w.connections,
                    connections_open: w
                        .id
                        .and_then(|id| dispatch.workers.get(&id))
                        .and_then(|d| d.open),
                    rss_bytes: proc_.as_ref().and_then(known_rss),
                    cpu_seconds: proc_.map(|p| p.cpu_seconds),
                    cpu_percent,
                }
            })
            .collect();
        s.cpu.retain(|pid, _| live_pids.contains(pid));
        drop(s);
        self.note_handed(&status);
        rows
    }

    /// Takes note of the connections handed to each worker, so that
    /// [`handed_total`](Self::handed_total) keeps those of workers that
    /// are gone. Called at every lifecycle event, at every worker's exit
    /// (before the supervisor forgets it) and at every status or scrape.
    pub fn refresh(&self, lp: &Loop) {
        self.note_handed(&self.sup.status(lp));
    }

    fn note_handed(&self, status: &[WorkerStatus]) {
        let mut s = self.state.borrow_mut();
        let mut live = Vec::new();
        for w in status {
            if let Some(id) = w.id {
                live.push(id);
                let seen = s.handed.entry(id).or_default();
                *seen = (*seen).max(w.connections);
            }
        }
        let gone: Vec<u32> = (s.handed.keys())
            .filter(|id| !live.contains(id))
            .copied()
            .collect();
        for id in gone {
            let n = s.handed.remove(&id).unwrap_or(0);
            s.handed_retired += n;
        }
    }
}

/// The resident memory of a sample, unless unknown: a process that has
/// exited and is not yet reaped (a draining worker, at its end) has a
/// `statm` of zeros, which is no memory to report, not 0 bytes (status
/// shows `null`, /metrics omits the sample).
fn known_rss(p: &ProcSample) -> Option<u64> {
    (p.rss_bytes > 0).then_some(p.rss_bytes)
}

fn percent(cpu: f64, over: Duration) -> f64 {
    let secs = over.as_secs_f64();
    if secs <= 0.0 {
        return 0.0;
    }
    (cpu.max(0.0) / secs * 1000.0).round() / 10.0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_proc_stat_and_statm() {
        let statm = "2000 300 100 10 0 200 0\n";
        // A command name with a space and a parenthesis.
        let stat = "1234 (my (app) x) S 1 1234 1234 0 -1 4194560 100 0 0 0 \
                    250 50 0 0 20 0 1 0 100 8192000 300 18446744073709551615\n";
        let p = parse(statm, stat, 4096, 100).unwrap();
        assert_eq!(p.rss_bytes, 300 * 4096);
        assert!((p.cpu_seconds - 3.0).abs() < 1e-9, "{p:?}");
        assert_eq!(parse("", stat, 4096, 100), None);
        assert_eq!(parse(statm, "garbage", 4096, 100), None);
    }

    /// `ctl status` showed `rss_bytes: 0` for a draining worker: an
    /// exited, unreaped process reads as zeros, now unknown (`None`).
    #[test]
    fn rss_of_an_exited_unreaped_process_is_unknown() {
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let pid = child.id() as i32;
        let t0 = std::time::Instant::now();
        // Until it is a zombie (state Z), to a deadline.
        let zombie = loop {
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
            if stat[stat.rfind(')').unwrap() + 1..]
                .trim_start()
                .starts_with('Z')
            {
                break sample(pid).unwrap();
            }
            assert!(t0.elapsed() < Duration::from_secs(10), "{stat}");
            std::thread::yield_now();
        };
        assert_eq!(zombie.rss_bytes, 0, "{zombie:?}");
        assert_eq!(known_rss(&zombie), None);
        let me = sample(std::process::id() as i32).unwrap();
        assert_eq!(known_rss(&me), Some(me.rss_bytes));
        child.wait().unwrap();
    }

    #[test]
    fn samples_this_process() {
        let p = sample(std::process::id() as i32).unwrap();
        assert!(p.rss_bytes > 0);
        assert!(p.cpu_seconds >= 0.0);
    }

    #[test]
    fn percent_of_one_core() {
        assert_eq!(percent(0.5, Duration::from_secs(1)), 50.0);
        assert_eq!(percent(1.0, Duration::ZERO), 0.0);
    }
}
