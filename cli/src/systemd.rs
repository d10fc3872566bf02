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
    workers: usize,
    listening: RefCell<BTreeSet<u32>>,
    ready: Cell<bool>,
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
            workers,
            listening: RefCell::default(),
            ready: Cell::new(false),
        })
    }

    /// Worker `id` listens: once every worker does, `READY=1`.
    pub(crate) fn listening(&self, lp: &mut Loop, id: u32) {
        let n = {
            let mut l = self.listening.borrow_mut();
            l.insert(id);
            l.len()
        };
        if n >= self.workers && !self.ready.replace(true) {
            self.send(self.notify.ready());
            self.send(self.notify.status(&format!("{n} workers ready")));
            lp.listen_fds_report_unused();
        }
    }

    /// A worker exited; `alive` are left.
    pub(crate) fn exited(&self, id: u32, alive: usize) {
        self.listening.borrow_mut().remove(&id);
        self.send(
            self.notify
                .status(&format!("{alive} of {} workers running", self.workers)),
        );
    }

    /// The first SIGINT/SIGTERM: a graceful stop begins.
    pub(crate) fn stopping(&self, alive: usize) {
        self.send(self.notify.stopping());
        self.send(
            self.notify
                .status(&format!("stopping: disconnecting {alive} workers")),
        );
    }

    fn send(&self, r: io::Result<()>) {
        if let Err(e) = r {
            eprintln!("uvcluster: systemd notification not sent: {e}");
        }
    }
}
