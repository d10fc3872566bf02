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
        })
    }

    /// Worker `id` is ready (the supervisor's readiness: it listens, or it
    /// said `'ready'`): once every worker is, `READY=1`.
    pub(crate) fn listening(&self, lp: &mut Loop, id: u32) {
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

    /// A worker exited.
    pub(crate) fn exited(&self, id: u32) {
        let alive = {
            let mut l = self.listening.borrow_mut();
            l.remove(&id);
            l.len()
        };
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

    /// The first SIGINT/SIGTERM: a stop begins.
    pub(crate) fn stopping(&self) {
        let alive = self.listening.borrow().len();
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

    /// Regression (issue 13): during a rolling reload of a 2-worker pool
    /// the status says `reloading: K of 2 replaced`, and afterwards `2
    /// workers ready`, never `3 workers ready` while an old worker drains.
    #[test]
    fn reload_status_counts_replacements_of_the_pool_size() {
        let dir = std::env::temp_dir().join(format!("uvcluster-sd-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("notify.sock");
        let _ = std::fs::remove_file(&path);
        let sock = UnixDatagram::bind(&path).unwrap();
        sock.set_read_timeout(Some(Duration::from_millis(50)))
            .unwrap();
        let mut lp = Loop::new().unwrap();
        let sd = Systemd {
            notify: Notifier::to_socket(&path).unwrap(),
            workers: Cell::new(2),
            listening: RefCell::default(),
            ready: Cell::new(false),
            replaced: Cell::new(None),
        };
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
}
