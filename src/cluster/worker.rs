//! One worker, seen from either side (`lib/internal/cluster/worker.js`): in
//! the primary, each forked child; in a worker process, `cluster.worker`.

use std::cell::RefCell;
use std::fmt;
use std::io;
use std::rc::Rc;

use serde_json::Value;

use super::primary::{ClusterError, PrimaryRef};
use super::protocol::{AddressType, Query};
use crate::ipc::{Attach, Channel, RawMessage};
use crate::uv::{Handle, Loop, Process, Signum, Socket};

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

type WorkerCb = Box<dyn FnMut(&mut Loop, &Worker)>;
type ListeningCb = Box<dyn FnMut(&mut Loop, &Worker, &Address)>;
type MessageCb = Box<dyn FnMut(&mut Loop, &Worker, Value, Option<Socket>)>;
type RawMessageCb = Box<dyn FnMut(&mut Loop, &Worker, RawMessage, Option<Socket>)>;

/// The user's `message` callback, taking values or [`RawMessage`]s.
enum MessageSlot {
    Value(MessageCb),
    Raw(RawMessageCb),
}
type ExitCb = Box<dyn FnMut(&mut Loop, &Worker, Option<i64>, Option<Signum>)>;
type ErrorCb = Box<dyn FnMut(&mut Loop, &Worker, &ClusterError)>;
type ExitRequestCb = Box<dyn FnMut(&mut Loop, &Worker, ExitRequest)>;

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

/// Which side this worker object lives on.
pub(crate) enum Side {
    /// The primary's record of a child.
    Primary(PrimaryRef),
    /// `cluster.worker` inside the worker process.
    Child,
}

pub(crate) struct WorkerInner {
    pub(crate) id: u32,
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
    on_online: Option<WorkerCb>,
    on_listening: Option<ListeningCb>,
    on_message: Option<MessageSlot>,
    on_disconnect: Option<WorkerCb>,
    on_exit: Option<ExitCb>,
    on_error: Option<ErrorCb>,
    /// In a worker process: what ends it (`None`: `process::exit(0)`).
    on_exit_request: Option<ExitRequestCb>,
}

/// A cluster worker. Cheap to clone: clones name the same worker.
///
/// Each `on_*` method sets that event's callback, replacing an earlier one.
/// The primary's [`Primary`](super::Primary) has the same events for all
/// workers; a worker's own callback runs first, then the primary's.
#[derive(Clone)]
pub struct Worker {
    pub(crate) inner: Rc<RefCell<WorkerInner>>,
}

impl fmt::Debug for Worker {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let i = self.inner.borrow();
        f.debug_struct("Worker")
            .field("id", &i.id)
            .field("pid", &i.pid)
            .field("state", &i.state)
            .field("exited_after_disconnect", &i.exited_after_disconnect)
            .finish()
    }
}

macro_rules! emitter {
    ($emit:ident, $field:ident, ($($arg:ident : $ty:ty),*)) => {
        pub(crate) fn $emit(&self, lp: &mut Loop $(, $arg: $ty)*) {
            let cb = self.inner.borrow_mut().$field.take();
            if let Some(mut cb) = cb {
                cb(lp, self $(, $arg)*);
                let mut i = self.inner.borrow_mut();
                if i.$field.is_none() {
                    i.$field = Some(cb);
                }
            }
        }
    };
}

impl Worker {
    pub(crate) fn new(id: u32, side: Side) -> Worker {
        Worker {
            inner: Rc::new(RefCell::new(WorkerInner {
                id,
                state: WorkerState::None,
                channel: None,
                process: None,
                pid: None,
                exited_after_disconnect: None,
                exit_code: None,
                signal_code: None,
                stdio: Vec::new(),
                side,
                on_online: None,
                on_listening: None,
                on_message: None,
                on_disconnect: None,
                on_exit: None,
                on_error: None,
                on_exit_request: None,
            })),
        }
    }

    /// The worker's id: 1, 2, ... in fork order (`worker.id`).
    pub fn id(&self) -> u32 {
        self.inner.borrow().id
    }

    /// The worker's process id, once forked (`worker.process.pid`).
    pub fn pid(&self) -> Option<i32> {
        self.inner.borrow().pid
    }

    /// The life-cycle state (`worker.state`).
    pub fn state(&self) -> WorkerState {
        self.inner.borrow().state
    }

    /// The process handle, on the primary's side.
    pub fn process(&self) -> Option<Handle<Process>> {
        self.inner.borrow().process
    }

    /// The primary's end of the worker's stdio slot `fd` when it is a pipe
    /// (`worker.process.stdio[fd]`): with `silent` or a custom
    /// [`Settings::stdio`](super::Settings::stdio). Slots 1 and 2 are read
    /// and dropped unless the caller takes over (`read_stop`, then its own
    /// `read_start`); slot 0 is closed (the worker reads EOF); slots from 3
    /// up are left to the caller. All are closed when the worker exits.
    pub fn stdio(&self, fd: usize) -> Option<Handle<crate::uv::Pipe>> {
        self.inner.borrow().stdio.get(fd).copied().flatten()
    }

    /// The IPC channel to the other side.
    pub fn channel(&self) -> Option<Channel> {
        self.inner.borrow().channel
    }

    /// Whether the channel is open (`worker.isConnected()`).
    pub fn is_connected(&self, lp: &Loop) -> bool {
        self.inner
            .borrow()
            .channel
            .is_some_and(|c| c.is_connected(lp))
    }

    /// Whether the process has exited (`worker.isDead()`); on the worker's
    /// own side, always `false`.
    pub fn is_dead(&self) -> bool {
        // Node: `exitCode != null || signalCode != null`; the state may
        // have moved on to `Disconnected` after the exit.
        let i = self.inner.borrow();
        i.exit_code.is_some() || i.signal_code.is_some()
    }

    /// `worker.exitedAfterDisconnect`: `Some(true)` if the worker left by a
    /// disconnect (started by either side), `Some(false)` once it is known
    /// that it did not (a crash, a signal, `kill` from the primary), `None`
    /// before anything happened.
    pub fn exited_after_disconnect(&self) -> Option<bool> {
        self.inner.borrow().exited_after_disconnect
    }

    /// The exit code and signal, once the process exited.
    pub fn exit_status(&self) -> Option<(Option<i64>, Option<Signum>)> {
        let i = self.inner.borrow();
        (i.exit_code.is_some() || i.signal_code.is_some()).then_some((i.exit_code, i.signal_code))
    }

    /// Sends a user message to the other side (`worker.send(msg)`), with a
    /// handle if given.
    ///
    /// # Errors
    ///
    /// `NotConnected` once the channel is closed.
    pub fn send(&self, lp: &mut Loop, msg: &Value, handle: Option<Attach>) -> io::Result<()> {
        let ch = self
            .channel()
            .ok_or_else(|| io::Error::new(io::ErrorKind::NotConnected, "worker has no channel"))?;
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
    pub fn send_raw(&self, lp: &mut Loop, msg: &RawMessage) -> io::Result<()> {
        let ch = self
            .channel()
            .ok_or_else(|| io::Error::new(io::ErrorKind::NotConnected, "worker has no channel"))?;
        ch.send_raw(lp, msg, None)
    }

    /// Like [`send`](Self::send), with `on_sent` run once the message is
    /// written or has failed (`worker.send(msg, handle, cb)`).
    ///
    /// # Errors
    ///
    /// `NotConnected` once the channel is closed; `on_sent` is then dropped.
    pub fn send_with_callback(
        &self,
        lp: &mut Loop,
        msg: &Value,
        handle: Option<Attach>,
        on_sent: impl FnOnce(&mut Loop, io::Result<()>) + 'static,
    ) -> io::Result<()> {
        let ch = self
            .channel()
            .ok_or_else(|| io::Error::new(io::ErrorKind::NotConnected, "worker has no channel"))?;
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

    /// Disconnects gracefully (`worker.disconnect()`). In the primary: sends
    /// `disconnect`; the worker closes its servers and its channel and
    /// exits once idle. In a worker: closes every server, tells the primary
    /// (`exitedAfterDisconnect`), then closes the channel.
    pub fn disconnect(&self, lp: &mut Loop) {
        let primary = match &self.inner.borrow().side {
            Side::Primary(p) => Some(p.clone()),
            Side::Child => None,
        };
        match primary {
            Some(p) => super::primary::disconnect_worker(lp, &p, self),
            None => super::child::disconnect_self(lp, self),
        }
    }

    /// Kills the worker (`worker.kill(signal)`, default SIGTERM). In the
    /// primary this only signals the process, as Node 20 does, so
    /// `exited_after_disconnect` ends up `false`. In a worker it disconnects
    /// and then exits the process with code 0 (`worker.destroy()`), or
    /// does what [`on_exit_request`](Self::on_exit_request) says.
    ///
    /// # Errors
    ///
    /// The `kill(2)` error in the primary (`ESRCH` after exit).
    pub fn kill(&self, lp: &mut Loop, signal: Option<Signum>) -> io::Result<()> {
        let side_primary = matches!(self.inner.borrow().side, Side::Primary(_));
        if side_primary {
            let p = self
                .process()
                .ok_or_else(|| io::Error::from_raw_os_error(3))?;
            lp.process_kill(p, signal.unwrap_or(Signum::SIGTERM))
        } else {
            super::child::destroy_self(lp, self);
            Ok(())
        }
    }

    /// Sets the `online` callback.
    pub fn on_online(&self, cb: impl FnMut(&mut Loop, &Worker) + 'static) {
        self.inner.borrow_mut().on_online = Some(Box::new(cb));
    }
    /// Sets the `listening` callback.
    pub fn on_listening(&self, cb: impl FnMut(&mut Loop, &Worker, &Address) + 'static) {
        self.inner.borrow_mut().on_listening = Some(Box::new(cb));
    }
    /// Sets the `message` callback: a user message and its handle (the
    /// callback owns the handle and must close it). A string with an
    /// unpaired surrogate arrives with U+FFFD in its place;
    /// [`on_message_raw`](Self::on_message_raw) also gives the exact text.
    pub fn on_message(&self, cb: impl FnMut(&mut Loop, &Worker, Value, Option<Socket>) + 'static) {
        self.inner.borrow_mut().on_message = Some(MessageSlot::Value(Box::new(cb)));
    }
    /// Sets the `message` callback with messages as [`RawMessage`]s: the
    /// value, and the JSON text when the value could not hold it exactly
    /// (see [`Channel::on_message_raw`]), so that
    /// [`send_raw`](Self::send_raw) can pass it on unchanged, as a Node
    /// process would. Replaces [`on_message`](Self::on_message).
    pub fn on_message_raw(
        &self,
        cb: impl FnMut(&mut Loop, &Worker, RawMessage, Option<Socket>) + 'static,
    ) {
        self.inner.borrow_mut().on_message = Some(MessageSlot::Raw(Box::new(cb)));
    }
    /// Sets the `disconnect` callback.
    pub fn on_disconnect(&self, cb: impl FnMut(&mut Loop, &Worker) + 'static) {
        self.inner.borrow_mut().on_disconnect = Some(Box::new(cb));
    }
    /// Sets the `exit` callback: exit code (`None` if a signal ended it) and
    /// signal (`None` if it exited).
    pub fn on_exit(
        &self,
        cb: impl FnMut(&mut Loop, &Worker, Option<i64>, Option<Signum>) + 'static,
    ) {
        self.inner.borrow_mut().on_exit = Some(Box::new(cb));
    }
    /// Sets the `error` callback.
    pub fn on_error(&self, cb: impl FnMut(&mut Loop, &Worker, &ClusterError) + 'static) {
        self.inner.borrow_mut().on_error = Some(Box::new(cb));
    }

    /// Sets what ends this worker's process when the cluster would end it
    /// ([`ExitRequest`]): its channel to the primary was lost, or it was
    /// [killed](Self::kill) from inside. Node calls `process.exit(0)`
    /// then, and so does a worker without this callback; an embedder that
    /// must not lose its process that way (to flush, to run destructors,
    /// to go on without the cluster) sets its own. When it runs, the
    /// channel is closed and the worker's cluster state dropped, so the
    /// loop ends by itself once the program's own handles are closed.
    /// Only the worker process's own [`Worker`] (from
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
    ///     worker.on_exit_request(|lp, _, why| {
    ///         eprintln!("leaving the cluster: {why:?}");
    ///         lp.stop();
    ///     });
    /// }
    /// lp.run(RunMode::Default)?;
    /// // Clean up here, then return from main.
    /// # Ok::<(), std::io::Error>(())
    /// ```
    pub fn on_exit_request(&self, cb: impl FnMut(&mut Loop, &Worker, ExitRequest) + 'static) {
        self.inner.borrow_mut().on_exit_request = Some(Box::new(cb));
    }

    /// Ends the worker's process as [`on_exit_request`](Self::on_exit_request)
    /// says; by default as Node does.
    pub(crate) fn request_exit(&self, lp: &mut Loop, why: ExitRequest) {
        let cb = self.inner.borrow_mut().on_exit_request.take();
        match cb {
            Some(mut cb) => {
                cb(lp, self, why);
                let mut i = self.inner.borrow_mut();
                if i.on_exit_request.is_none() {
                    i.on_exit_request = Some(cb);
                }
            }
            // Node: `process.exit(kNoFailure)`.
            None => std::process::exit(0),
        }
    }

    emitter!(emit_online, on_online, ());
    emitter!(emit_listening, on_listening, (a: &Address));
    emitter!(emit_disconnect, on_disconnect, ());
    emitter!(emit_exit, on_exit, (code: Option<i64>, signal: Option<Signum>));
    emitter!(emit_error, on_error, (e: &ClusterError));

    /// Delivers a user message; without a callback, a handle that came with
    /// it is closed.
    pub(crate) fn emit_message(&self, lp: &mut Loop, msg: RawMessage, h: Option<Socket>) -> bool {
        let cb = self.inner.borrow_mut().on_message.take();
        match cb {
            Some(mut cb) => {
                match &mut cb {
                    MessageSlot::Value(f) => f(lp, self, msg.into_value(), h),
                    MessageSlot::Raw(f) => f(lp, self, msg, h),
                }
                let mut i = self.inner.borrow_mut();
                if i.on_message.is_none() {
                    i.on_message = Some(cb);
                }
                true
            }
            None => false,
        }
    }

    /// Drops every callback (breaks reference cycles once the worker is gone).
    pub(crate) fn clear_callbacks(&self) {
        let mut i = self.inner.borrow_mut();
        i.on_online = None;
        i.on_listening = None;
        i.on_message = None;
        i.on_disconnect = None;
        i.on_exit = None;
        i.on_error = None;
        i.on_exit_request = None;
    }
}
