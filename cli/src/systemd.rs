//! `uvcluster run` as a systemd service: `READY=1` once every worker
//! listens, `STATUS=` with the worker count, `STOPPING=1` at the first
//! SIGINT/SIGTERM, `WATCHDOG=1` when `WATCHDOG_USEC` asks; and a refusal
//! to start on bad socket-activation or notification variables (the
//! library takes the inherited sockets itself: `Loop::listen_fds`).

use std::cell::{Cell, RefCell};
use std::collections::BTreeSet;
use std::io;

use uvcluster::systemd::Notifier;
use uvcluster::uv::Loop;

/// The primary's side of the notify protocol.
pub(crate) struct Systemd {
    notify: Notifier,
    /// The pool's size: the start's, then each reload's and scale's.
    workers: Cell<usize>,
    listening: RefCell<BTreeSet<u32>>,
    ready: Cell<bool>,
    /// During a rolling reload: the workers that became ready since it
    /// began (its replacements).
    replaced: Cell<Option<usize>>,
    /// Every worker forked and not yet exited, ready or not.
    alive: RefCell<BTreeSet<u32>>,
    /// A stop has begun: the status counts the workers left, and nothing
    /// says `ready` again.
    stopping: Cell<bool>,
}

impl Systemd {
    /// Reads `NOTIFY_SOCKET`/`WATCHDOG_USEC` (removing them, so workers do
    /// not inherit them), checks that the loop could take `LISTEN_FDS`,
    /// and starts the watchdog pings.
    ///
    /// # Errors
    ///
    /// A bad variable (the message names it), or the watchdog timer's error.
    pub(crate) fn start(lp: &mut Loop, notify: Notifier, workers: usize) -> io::Result<Systemd> {
        lp.listen_fds().map_err(io::Error::from)?;
        notify.start_watchdog(lp)?;
        Ok(Systemd {
            notify,
            workers: Cell::new(workers),
            listening: RefCell::default(),
            ready: Cell::new(false),
            replaced: Cell::new(None),
            alive: RefCell::default(),
            stopping: Cell::new(false),
        })
    }

    /// Worker `id` was forked.
    pub(crate) fn forked(&self, id: u32) {
        self.alive.borrow_mut().insert(id);
    }

    /// Worker `id` is ready (the supervisor's readiness: it listens, or it
    /// said `'ready'`): once every worker is, `READY=1`. During a stop,
    /// nothing is sent.
    pub(crate) fn listening(&self, lp: &mut Loop, id: u32) {
        if self.stopping.get() {
            return;
        }
        let n = {
            let mut l = self.listening.borrow_mut();
            l.insert(id);
            l.len()
        };
        if let Some(k) = self.replaced.get() {
            let k = (k + 1).min(self.workers.get());
            self.replaced.set(Some(k));
            self.send(self.notify.status(&format!(
                "reloading: {k} of {} replaced",
                self.workers.get()
            )));
            return;
        }
        if n >= self.workers.get() && !self.ready.replace(true) {
            self.send(self.notify.ready());
            self.send(
                self.notify
                    .status(&format!("{} ready", crate::events::workers(n))),
            );
            lp.listen_fds_report_unused();
        }
    }

    /// A worker exited: `K of N workers ready`, or during a stop
    /// `stopping: K workers left` (every worker still running, ready or
    /// not).
    pub(crate) fn exited(&self, id: u32) {
        let alive = {
            let mut l = self.listening.borrow_mut();
            l.remove(&id);
            l.len()
        };
        let left = {
            let mut a = self.alive.borrow_mut();
            a.remove(&id);
            a.len()
        };
        if self.stopping.get() {
            self.send(
                self.notify
                    .status(&format!("stopping: {} left", crate::events::workers(left))),
            );
            return;
        }
        if self.replaced.get().is_some() {
            // An old worker leaving during a reload: the reload's status
            // stands.
            return;
        }
        self.send(self.notify.status(&format!(
            "{} of {} ready",
            alive.min(self.workers.get()),
            crate::events::workers(self.workers.get())
        )));
    }

    /// The first SIGINT/SIGTERM: a stop begins. (An immediate stop after
    /// a graceful one sends nothing more.)
    pub(crate) fn stopping(&self) {
        if self.stopping.replace(true) {
            return;
        }
        let alive = self.alive.borrow().len();
        self.send(self.notify.stopping());
        self.send(self.notify.status(&format!(
            "stopping: disconnecting {}",
            crate::events::workers(alive)
        )));
    }

    /// A rolling reload begins: `RELOADING=1` with `MONOTONIC_USEC=`
    /// (the `Type=notify-reload` protocol).
    pub(crate) fn reloading(&self, slots: usize) {
        self.workers.set(slots);
        self.replaced.set(Some(0));
        self.send(self.notify.reloading());
        self.send(
            self.notify
                .status(&format!("reloading: 0 of {slots} replaced")),
        );
    }

    /// The pool was scaled to `to` workers.
    pub(crate) fn scaled(&self, to: usize) {
        self.workers.set(to);
    }

    /// A rolling reload ended (finished, or failed closed with the old
    /// workers serving): `READY=1` again, and the count.
    /// The count is of the pool's size at most: the old workers still
    /// draining are not counted twice.
    pub(crate) fn reloaded(&self) {
        self.replaced.set(None);
        if self.stopping.get() {
            // A reload abandoned by the stop: the stop's status stands.
            return;
        }
        let n = self.listening.borrow().len().min(self.workers.get());
        self.send(self.notify.ready());
        self.send(
            self.notify
                .status(&format!("{} ready", crate::events::workers(n))),
        );
    }

    fn send(&self, r: io::Result<()>) {
        if let Err(e) = r {
            eprintln!("uvcluster: systemd notification not sent: {e}");
        }
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::net::UnixDatagram;
    use std::path::PathBuf;
    use std::time::Duration;

    use super::*;

    /// The `STATUS=` texts `s` sent so far.
    fn statuses(sock: &UnixDatagram) -> Vec<String> {
        let mut out = Vec::new();
        let mut buf = [0u8; 512];
        while let Ok(n) = sock.recv(&mut buf) {
            let m = String::from_utf8_lossy(&buf[..n]).into_owned();
            if let Some(s) = m.strip_prefix("STATUS=") {
                out.push(s.trim_end().to_string());
            }
        }
        out
    }

    /// A `Systemd` for a pool of `workers` that notifies a datagram socket
    /// of the test's own (in a fresh directory named after `name`), and
    /// that socket, reading with a 50 ms timeout.
    fn notifier_for_test(name: &str, workers: usize) -> (PathBuf, UnixDatagram, Systemd) {
        let dir = std::env::temp_dir().join(format!("{name}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("notify.sock");
        let _ = std::fs::remove_file(&path);
        let sock = UnixDatagram::bind(&path).unwrap();
        sock.set_read_timeout(Some(Duration::from_millis(50)))
            .unwrap();
        let sd = Systemd {
            notify: Notifier::to_socket(&path).unwrap(),
            workers: Cell::new(workers),
            listening: RefCell::default(),
            ready: Cell::new(false),
            replaced: Cell::new(None),
            alive: RefCell::default(),
            stopping: Cell::new(false),
        };
        (dir, sock, sd)
    }

    /// Regression (issue 13): during a rolling reload of a 2-worker pool
    /// the status says `reloading: K of 2 replaced`, and afterwards `2
    /// workers ready`, never `3 workers ready` while an old worker drains.
    #[test]
    fn reload_status_counts_replacements_of_the_pool_size() {
        let (dir, sock, sd) = notifier_for_test("uvcluster-sd", 2);
        let mut lp = Loop::new().unwrap();
        sd.listening(&mut lp, 1);
        sd.listening(&mut lp, 2);
        assert_eq!(statuses(&sock), ["2 workers ready"]);
        sd.reloading(2);
        sd.listening(&mut lp, 3);
        sd.exited(1);
        sd.listening(&mut lp, 4);
        sd.reloaded();
        assert_eq!(
            statuses(&sock),
            [
                "reloading: 0 of 2 replaced",
                "reloading: 1 of 2 replaced",
                "reloading: 2 of 2 replaced",
                "2 workers ready"
            ]
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// During a stop the status said `stopping: disconnecting 3 workers`,
    /// then `2 of 2 workers ready`, `1 of 2 ...` as workers left,
    /// overwriting the stop: it now says `stopping: K workers left`,
    /// counting a worker that never got ready too, and a second stop
    /// signal or a worker getting ready sends nothing.
    #[test]
    fn stop_status_counts_the_workers_left() {
        let (dir, sock, sd) = notifier_for_test("uvcluster-sd-stop", 3);
        let mut lp = Loop::new().unwrap();
        for id in 1..=3 {
            sd.forked(id);
        }
        sd.listening(&mut lp, 1);
        sd.listening(&mut lp, 2);
        sd.exited(2);
        assert_eq!(statuses(&sock), ["1 of 3 workers ready"]);
        sd.forked(4);
        sd.stopping();
        sd.listening(&mut lp, 3);
        sd.exited(1);
        sd.stopping();
        sd.exited(3);
        sd.exited(4);
        sd.reloaded();
        assert_eq!(
            statuses(&sock),
            [
                "stopping: disconnecting 3 workers",
                "stopping: 2 workers left",
                "stopping: 1 worker left",
                "stopping: 0 workers left"
            ]
        );
        let _ = std::fs::remove_dir_all(&dir);
    }
}
