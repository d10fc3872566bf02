//! One worker, seen from either side (`lib/internal/cluster/worker.js`): in
//! the primary, each forked child; in a worker process, `cluster.worker`.

use std::io;

use serde_json::Value;

use super::error::ClusterError;
use super::protocol::{AddressType, Query};
use super::{ClusterContext, Side};
use crate::ipc::{Attach, Channel, RawMessage};
use crate::uv::{CallbackSlot, Handle, Id, Loop, Process, Signum, Socket};

/// A worker's life-cycle state (`worker.state`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WorkerState {
    /// Forked, not yet online.
    None,
    /// Sent `online`.
    Online,
    /// At least one server is listening.
    Listening,
    /// A disconnect was started.
    Disconnecting,
    /// The channel is closed.
    Disconnected,
    /// The process exited.
    Dead,
}

/// What `listening` reports (Node's `{address, port, addressType, fd}`).
#[derive(Clone, Debug, PartialEq)]
pub struct Address {
    /// The requested address: an IP, a Unix socket path, or `None` (any).
    pub address: Option<String>,
    /// The real port (`-1` for Unix sockets; `None` with `fd`).
    pub port: Option<i64>,
    /// What kind of socket.
    pub address_type: AddressType,
    /// The fd listened on, when the worker asked for one.
    pub fd: Option<i64>,
}

impl Address {
    pub(crate) fn from_query(q: &Query) -> Address {
        Address {
            address: q.address.clone(),
            port: q.port,
            address_type: q.address_type,
            fd: q.fd,
        }
    }
}

type WorkerFn = dyn FnMut(&mut Loop, Worker);
type ListeningFn = dyn FnMut(&mut Loop, Worker, &Address);
type MessageFn = dyn FnMut(&mut Loop, Worker, RawMessage, Option<Socket>);
type ExitFn = dyn FnMut(&mut Loop, Worker, Option<i64>, Option<Signum>);
type ErrorFn = dyn FnMut(&mut Loop, Worker, &ClusterError);
type ExitRequestFn = dyn FnMut(&mut Loop, Worker, ExitRequest);

/// Why the cluster ends a worker process, where Node calls
/// `process.exit(0)` (`lib/internal/cluster/child.js`). See
/// [`Worker::on_exit_request`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExitRequest {
    /// The channel to the primary closed without a disconnect that either
    /// side asked for: the primary died, or closed the channel
    /// (`_setupWorker`'s `process.once('disconnect')`).
    ChannelLost,
    /// `kill()` (Node's `destroy()`) in the worker: the channel is closed.
    Destroyed,
}

/// A worker's state, owned by the loop (in the cluster's context,
/// [`ClusterContext`]) and named by a [`Worker`] id. It stays there after
/// the worker is gone, with its callbacks dropped, so that its exit
/// status can still be read (a few hundred bytes per worker forked).
pub(crate) struct WorkerRecord {
    pub(crate) state: WorkerState,
    pub(crate) channel: Option<Channel>,
    pub(crate) process: Option<Handle<Process>>,
    pub(crate) pid: Option<i32>,
    /// `None` until decided (Node's `undefined`), then final at exit.
    pub(crate) exited_after_disconnect: Option<bool>,
    pub(crate) exit_code: Option<i64>,
    pub(crate) signal_code: Option<Signum>,
    /// The primary's ends of the worker's `pipe` stdio slots, by fd.
    pub(crate) stdio: Vec<Option<Handle<crate::uv::Pipe>>>,
    pub(crate) side: Side,
    on_online: CallbackSlot<WorkerFn>,
    on_listening: CallbackSlot<ListeningFn>,
    on_message: CallbackSlot<MessageFn>,
    on_disconnect: CallbackSlot<WorkerFn>,
    on_exit: CallbackSlot<ExitFn>,
    on_error: CallbackSlot<ErrorFn>,
    /// In a worker process: what ends it (empty: the loop's exit handler,
    /// [`set_exit_handler`](super::set_exit_handler)).
    on_exit_request: CallbackSlot<ExitRequestFn>,
}

/// A cluster worker (Node's `Worker`): a typed id for state the loop owns.
///
/// Like a [`Server`](crate::net::Server), a `Worker` is a copyable id: the
/// loop keeps the worker's state, every method takes the loop, and every
/// callback receives `&mut Loop` and the worker's id. Its number
/// ([`id`](Self::id)) travels with the id, so it needs no loop.
///
/// Each `on_*` method sets that event's callback, replacing an earlier one.
/// The primary's [`Primary`](super::Primary) has the same events for all
/// workers; a worker's own callback runs first, then the primary's.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub struct Worker {
    rec: Id<WorkerRecord>,
    id: u32,
}

fn rec(lp: &Loop, w: Worker) -> Option<&WorkerRecord> {
    lp.context::<ClusterContext>()?.workers.get(w.rec)
}

pub(crate) fn rec_mut(lp: &mut Loop, w: Worker) -> Option<&mut WorkerRecord> {
    lp.context_mut::<ClusterContext>().workers.get_mut(w.rec)
}

fn no_channel() -> io::Error {
    io::Error::new(io::ErrorKind::NotConnected, "worker has no channel")
}

impl Worker {
    pub(crate) fn new(lp: &mut Loop, id: u32, side: Side) -> Worker {
        let r = WorkerRecord {
            state: WorkerState::None,
            channel: None,
            process: None,
            pid: None,
            exited_after_disconnect: None,
            exit_code: None,
            signal_code: None,
            stdio: Vec::new(),
            side,
            on_online: CallbackSlot::empty(),
            on_listening: CallbackSlot::empty(),
            on_message: CallbackSlot::empty(),
            on_disconnect: CallbackSlot::empty(),
            on_exit: CallbackSlot::empty(),
            on_error: CallbackSlot::empty(),
            on_exit_request: CallbackSlot::empty(),
        };
        let rec = lp.context_mut::<ClusterContext>().workers.insert(r);
        Worker { rec, id }
    }

    /// The worker's id: 1, 2, ... in fork order (`worker.id`).
    pub fn id(self) -> u32 {
        self.id
    }

    /// The worker's process id, once forked (`worker.process.pid`).
    pub fn pid(self, lp: &Loop) -> Option<i32> {
        rec(lp, self)?.pid
    }

    /// The life-cycle state (`worker.state`).
    pub fn state(self, lp: &Loop) -> WorkerState {
        rec(lp, self).map_or(WorkerState::Dead, |r| r.state)
    }

    /// The process handle, on the primary's side.
    pub fn process(self, lp: &Loop) -> Option<Handle<Process>> {
        rec(lp, self)?.process
    }

    /// The primary's end of the worker's stdio slot `fd` when it is a pipe
    /// (`worker.process.stdio[fd]`): with `silent` or a custom
    /// [`Settings::stdio`](super::Settings::stdio). Slots 1 and 2 are read
    /// and dropped unless the caller takes over (`read_stop`, then its own
    /// `read_start`); slot 0 is closed (the worker reads EOF); slots from 3
    /// up are left to the caller. All are closed when the worker exits.
    pub fn stdio(self, lp: &Loop, fd: usize) -> Option<Handle<crate::uv::Pipe>> {
        rec(lp, self)?.stdio.get(fd).copied().flatten()
    }

    /// The IPC channel to the other side.
    pub fn channel(self, lp: &Loop) -> Option<Channel> {
        rec(lp, self)?.channel
    }

    /// Whether the channel is open (`worker.isConnected()`).
    pub fn is_connected(self, lp: &Loop) -> bool {
        self.channel(lp).is_some_and(|c| c.is_connected(lp))
    }

    /// Whether the process has exited (`worker.isDead()`); on the worker's
    /// own side, always `false`.
    pub fn is_dead(self, lp: &Loop) -> bool {
        // Node: `exitCode != null || signalCode != null`; the state may
        // have moved on to `Disconnected` after the exit.
        rec(lp, self).is_some_and(|r| r.exit_code.is_some() || r.signal_code.is_some())
    }

    /// `worker.exitedAfterDisconnect`: `Some(true)` if the worker left by a
    /// disconnect (started by either side), `Some(false)` once it is known
    /// that it did not (a crash, a signal, `kill` from the primary), `None`
    /// before anything happened.
    pub fn exited_after_disconnect(self, lp: &Loop) -> Option<bool> {
        rec(lp, self)?.exited_after_disconnect
    }

    /// The exit code and signal, once the process exited.
    pub fn exit_status(self, lp: &Loop) -> Option<(Option<i64>, Option<Signum>)> {
        let r = rec(lp, self)?;
        (r.exit_code.is_some() || r.signal_code.is_some()).then_some((r.exit_code, r.signal_code))
    }

    /// Sends a user message to the other side (`worker.send(msg)`), with a
    /// handle if given.
    ///
    /// # Errors
    ///
    /// `NotConnected` once the channel is closed.
    pub fn send(self, lp: &mut Loop, msg: &Value, handle: Option<Attach>) -> io::Result<()> {
        let ch = self.channel(lp).ok_or_else(no_channel)?;
        match handle {
            None => ch.send(lp, msg, None),
            Some(a) => ch.send_handle(lp, msg.clone(), a, Default::default(), None),
        }
    }

    /// Sends a user message given as its JSON text ([`RawMessage`]),
    /// unchanged ([`Channel::send_raw`]): the way to pass on a string with
    /// an unpaired surrogate exactly.
    ///
    /// # Errors
    ///
    /// `NotConnected` once the channel is closed.
    pub fn send_raw(self, lp: &mut Loop, msg: &RawMessage) -> io::Result<()> {
        let ch = self.channel(lp).ok_or_else(no_channel)?;
        ch.send_raw(lp, msg, None)
    }

    /// Like [`send`](Self::send), with `on_sent` run once the message is
    /// written or has failed (`worker.send(msg, handle, cb)`).
    ///
    /// # Errors
    ///
    /// `NotConnected` once the channel is closed; `on_sent` is then dropped.
    pub fn send_with_callback(
        self,
        lp: &mut Loop,
        msg: &Value,
        handle: Option<Attach>,
        on_sent: impl FnOnce(&mut Loop, io::Result<()>) + 'static,
    ) -> io::Result<()> {
        let ch = self.channel(lp).ok_or_else(no_channel)?;
        match handle {
            None => ch.send(lp, msg, Some(Box::new(on_sent))),
            Some(a) => ch.send_handle(
                lp,
                msg.clone(),
                a,
                Default::default(),
                Some(Box::new(on_sent)),
            ),
        }
    }

    pub(crate) fn side(self, lp: &Loop) -> Option<Side> {
        rec(lp, self).map(|r| r.side)
    }

    /// Sets the `online` callback.
    pub fn on_online(self, lp: &mut Loop, cb: impl FnMut(&mut Loop, Worker) + 'static) {
        if let Some(r) = rec_mut(lp, self) {
            r.on_online.set(Box::new(cb));
        }
    }
    /// Sets the `listening` callback.
    pub fn on_listening(
        self,
        lp: &mut Loop,
        cb: impl FnMut(&mut Loop, Worker, &Address) + 'static,
    ) {
        if let Some(r) = rec_mut(lp, self) {
            r.on_listening.set(Box::new(cb));
        }
    }
    /// Sets the `message` callback: a user message and its handle (the
    /// callback owns the handle and must close it). A string with an
    /// unpaired surrogate arrives with U+FFFD in its place;
    /// [`on_message_raw`](Self::on_message_raw) also gives the exact text.
    pub fn on_message(
        self,
        lp: &mut Loop,
        mut cb: impl FnMut(&mut Loop, Worker, Value, Option<Socket>) + 'static,
    ) {
        self.on_message_raw(lp, move |lp, w, m, h| cb(lp, w, m.into_value(), h));
    }
    /// Sets the `message` callback with messages as [`RawMessage`]s: the
    /// value, and the JSON text when the value could not hold it exactly
    /// (see [`Channel::on_message_raw`]), so that
    /// [`send_raw`](Self::send_raw) can pass it on unchanged, as a Node
    /// process would. Replaces [`on_message`](Self::on_message).
    pub fn on_message_raw(
        self,
        lp: &mut Loop,
        cb: impl FnMut(&mut Loop, Worker, RawMessage, Option<Socket>) + 'static,
    ) {
        if let Some(r) = rec_mut(lp, self) {
            r.on_message.set(Box::new(cb));
        }
    }
    /// Sets the `disconnect` callback.
    pub fn on_disconnect(self, lp: &mut Loop, cb: impl FnMut(&mut Loop, Worker) + 'static) {
        if let Some(r) = rec_mut(lp, self) {
            r.on_disconnect.set(Box::new(cb));
        }
    }
    /// Sets the `exit` callback: exit code (`None` if a signal ended it) and
    /// signal (`None` if it exited).
    pub fn on_exit(
        self,
        lp: &mut Loop,
        cb: impl FnMut(&mut Loop, Worker, Option<i64>, Option<Signum>) + 'static,
    ) {
        if let Some(r) = rec_mut(lp, self) {
            r.on_exit.set(Box::new(cb));
        }
    }
    /// Sets the `error` callback.
    pub fn on_error(
        self,
        lp: &mut Loop,
        cb: impl FnMut(&mut Loop, Worker, &ClusterError) + 'static,
    ) {
        if let Some(r) = rec_mut(lp, self) {
            r.on_error.set(Box::new(cb));
        }
    }

    /// Sets what ends this worker's process when the cluster would end it
    /// ([`ExitRequest`]): its channel to the primary was lost, or it was
    /// [killed](Self::kill) from inside. Node calls `process.exit(0)`
    /// then, and so does a worker without this callback (unless the loop's
    /// [exit handler](super::set_exit_handler) was replaced); an embedder
    /// that must not lose its process that way (to flush, to run
    /// destructors, to go on without the cluster) sets its own. When it
    /// runs, the channel is closed and the worker's cluster state dropped,
    /// so the loop ends by itself once the program's own handles are
    /// closed. Only the worker process's own [`Worker`] (from
    /// [`setup_worker`](super::setup_worker)) is ever asked.
    ///
    /// # Examples
    ///
    /// ```no_run
    /// use uvcluster::cluster::{self, ExitRequest};
    /// use uvcluster::uv::{Loop, RunMode};
    ///
    /// let mut lp = Loop::new()?;
    /// if let Some(worker) = cluster::setup_worker(&mut lp)? {
    ///     worker.on_exit_request(&mut lp, |lp, _, why| {
    ///         eprintln!("leaving the cluster: {why:?}");
    ///         lp.stop();
    ///     });
    /// }
    /// lp.run(RunMode::Default)?;
    /// // Clean up here, then return from main.
    /// # Ok::<(), std::io::Error>(())
    /// ```
    pub fn on_exit_request(
        self,
        lp: &mut Loop,
        cb: impl FnMut(&mut Loop, Worker, ExitRequest) + 'static,
    ) {
        if let Some(r) = rec_mut(lp, self) {
            r.on_exit_request.set(Box::new(cb));
        }
    }

    /// Ends the worker's process as [`on_exit_request`](Self::on_exit_request)
    /// says; without one, as the loop's exit handler says (by default as
    /// Node does).
    pub(crate) fn request_exit(self, lp: &mut Loop, why: ExitRequest) {
        let asked = lp.call_slot(
            |lp| rec_mut(lp, self).map(|r| &mut r.on_exit_request),
            |lp, f| f(lp, self, why),
        );
        if asked.is_none() {
            super::exit_by_default(lp, self, why);
        }
    }

    pub(crate) fn emit_online(self, lp: &mut Loop) {
        lp.call_slot(
            |lp| rec_mut(lp, self).map(|r| &mut r.on_online),
            |lp, f| f(lp, self),
        );
    }

    pub(crate) fn emit_listening(self, lp: &mut Loop, a: &Address) {
        lp.call_slot(
            |lp| rec_mut(lp, self).map(|r| &mut r.on_listening),
            |lp, f| f(lp, self, a),
        );
    }

    pub(crate) fn emit_disconnect(self, lp: &mut Loop) {
        lp.call_slot(
            |lp| rec_mut(lp, self).map(|r| &mut r.on_disconnect),
            |lp, f| f(lp, self),
        );
    }

    pub(crate) fn emit_exit(self, lp: &mut Loop, code: Option<i64>, signal: Option<Signum>) {
        lp.call_slot(
            |lp| rec_mut(lp, self).map(|r| &mut r.on_exit),
            |lp, f| f(lp, self, code, signal),
        );
    }

    pub(crate) fn emit_error(self, lp: &mut Loop, e: &ClusterError) {
        lp.call_slot(
            |lp| rec_mut(lp, self).map(|r| &mut r.on_error),
            |lp, f| f(lp, self, e),
        );
    }

    /// Delivers a user message; `false` without a callback (the caller then
    /// owns the handle).
    pub(crate) fn emit_message(self, lp: &mut Loop, msg: RawMessage, h: Option<Socket>) -> bool {
        lp.call_slot(
            |lp| rec_mut(lp, self).map(|r| &mut r.on_message),
            |lp, f| f(lp, self, msg, h),
        )
        .is_some()
    }

    pub(crate) fn set_state(self, lp: &mut Loop, state: WorkerState) {
        if let Some(r) = rec_mut(lp, self) {
            r.state = state;
        }
    }

    pub(crate) fn set_exited_after_disconnect(self, lp: &mut Loop, on: bool) {
        if let Some(r) = rec_mut(lp, self) {
            r.exited_after_disconnect = Some(on);
        }
    }

    /// The worker reached `state` (`Disconnected` or `Dead`): whether it
    /// left by a disconnect is decided now if it was not before. Returns
    /// its exit code and signal.
    pub(crate) fn settle(self, lp: &mut Loop, state: WorkerState) -> (Option<i64>, Option<Signum>) {
        let Some(r) = rec_mut(lp, self) else {
            return (None, None);
        };
        r.exited_after_disconnect = Some(r.exited_after_disconnect.unwrap_or(false));
        r.state = state;
        (r.exit_code, r.signal_code)
    }

    /// Drops the record of a worker that never existed (its fork failed).
    pub(crate) fn forget(self, lp: &mut Loop) {
        lp.context_mut::<ClusterContext>().workers.remove(self.rec);
    }

    /// Drops every callback once the worker is gone.
    pub(crate) fn clear_callbacks(self, lp: &mut Loop) {
        if let Some(r) = rec_mut(lp, self) {
            r.on_online.clear();
            r.on_listening.clear();
            r.on_message.clear();
            r.on_disconnect.clear();
            r.on_exit.clear();
            r.on_error.clear();
            r.on_exit_request.clear();
        }
    }
}
