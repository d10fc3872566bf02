//! The IPC channel: Node's child-process channel over a uv IPC pipe
//! (`lib/internal/child_process.js: setupChannel`, and the seq/ack helpers
//! of `lib/internal/cluster/utils.js`).
//!
//! A [`Channel`] reads newline-delimited JSON from its pipe, pairs each
//! `NODE_HANDLE` message with the next fd received (answering
//! `NODE_HANDLE_ACK`, or `NODE_HANDLE_NACK` when no fd came), and hands user
//! messages, internal messages and replies to their callbacks. After it
//! sends a handle it queues every later message until the peer's ACK
//! arrives, exactly as Node does; ACKs themselves bypass the queue, which
//! is what keeps two peers passing handles to each other from deadlocking.
//!
//! Bad input never blocks it. A line that cannot be decoded is reported
//! and skipped; if it claims to be a `NODE_HANDLE`, its fd is closed and the
//! peer is answered (ACK when an fd came, NACK when none did, Node's own
//! rule), so a Node peer's queue keeps moving. A peer that sends more bad
//! lines than its budget is disconnected, and reports of bad lines are
//! rate-limited ([`ChannelOptions`]).

use std::cell::RefCell;
use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::io;
use std::rc::Rc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::{Map, Value};

use super::frame::{self, DEFAULT_MAX_DEPTH, DEFAULT_MAX_MESSAGE, Decoder, FrameError};
use super::json;
use super::message::{self, HandleKind, Incoming, NODE_CLUSTER, RawMessage, is_internal};
use crate::uv::{Handle, Loop, Pipe, Socket};

/// Callback for user or internal messages: the message and the handle that
/// came with it, if any. The callback owns the handle (it must close it).
pub type MessageCb = Box<dyn FnMut(&mut Loop, &Channel, Value, Option<Socket>)>;
/// Callback for user messages with their JSON text
/// ([`Channel::on_message_raw`]).
pub type RawMessageCb = Box<dyn FnMut(&mut Loop, &Channel, RawMessage, Option<Socket>)>;
/// Callback for the reply to a request sent with [`Channel::send_cluster`].
pub type ReplyCb = Box<dyn FnOnce(&mut Loop, &Channel, Value, Option<Socket>)>;
/// Callback run once a message has been handed to the kernel, or failed.
pub type SentCb = Box<dyn FnOnce(&mut Loop, io::Result<()>)>;
/// Callback told how a handle sent with [`Channel::send_cluster_handle`]
/// fared; see [`HandleDelivery`].
pub type DeliveryCb = Box<dyn FnOnce(&mut Loop, &Channel, HandleDelivery)>;
type ErrorCb = Box<dyn FnMut(&mut Loop, &Channel, ChannelError)>;
type DisconnectCb = Box<dyn FnMut(&mut Loop, &Channel)>;

/// The `msg` of an encoded `NODE_HANDLE` wrapper, as its own line.
fn unwrap_handle_message(bytes: &[u8]) -> Option<Vec<u8>> {
    let line = bytes.strip_suffix(b"\n")?;
    let m = json::parse(line, usize::MAX).ok()?.msg?;
    let mut out = line[m.start..m.end].to_vec();
    out.push(b'\n');
    Some(out)
}

/// What the sender does with its own copy of a handle it sent.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AfterAck {
    /// Keep it open (Node's `net.Native`, `net.Server`, `dgram.*`; the
    /// cluster closes its copies itself).
    Keep,
    /// Close it when the peer's ACK or NACK arrives (Node's `net.Socket`).
    Close,
}

/// A handle to send with a message: the handle, the wrapper type to
/// announce, and what to do with the sender's copy.
#[derive(Clone, Copy, Debug)]
pub struct Attach {
    /// The socket.
    pub handle: Socket,
    /// The `type` field of the `NODE_HANDLE` wrapper.
    pub kind: HandleKind,
    /// What happens to our copy once the peer acknowledged.
    pub after_ack: AfterAck,
}

/// How a handle sent with [`Channel::send_cluster_handle`] fared: the peer's
/// answer to the `NODE_HANDLE` message (Node's `NODE_HANDLE_ACK` and
/// `NODE_HANDLE_NACK`, `lib/internal/child_process.js`), or the write's
/// failure. Exactly one of these is reported, unless the channel closes
/// first (then [`Channel::on_disconnect`] is what tells).
#[derive(Debug)]
pub enum HandleDelivery {
    /// `NODE_HANDLE_ACK`: the peer received the fd with the message.
    Acked,
    /// `NODE_HANDLE_NACK`: the message arrived without its fd (the kernel
    /// drops an fd that the receiver has no room for, `MSG_CTRUNC`, as at
    /// its `RLIMIT_NOFILE`), so the peer dropped the message. No reply to
    /// it will come; the reply callback is dropped.
    Nacked,
    /// The message could not be written (the peer's end is closed:
    /// `EPIPE`); neither it nor the fd left. The reply callback is dropped.
    NotSent(io::Error),
}

/// A fault on the channel, reported to [`Channel::on_error`]. Faults in the
/// incoming stream do not stop the channel, except where noted: one bad
/// message loses only itself. Each bad line counts against the peer's
/// budget ([`ChannelOptions::max_bad_lines`]); only the first
/// [`ChannelOptions::report_bad_lines`] are reported one by one.
#[derive(Debug)]
pub enum ChannelError {
    /// A line could not be decoded: empty, not JSON, nested too deeply, too
    /// long (the rest of it is skipped), or cut short by the end of the
    /// stream.
    Frame(FrameError),
    /// A line that could not be decoded claimed to be a `NODE_HANDLE`
    /// (`"cmd":"NODE_HANDLE"` at its top level). Its fd, if one came, was
    /// closed, and the peer was answered `NODE_HANDLE_ACK` if one came or
    /// `NODE_HANDLE_NACK` if not (what a Node receiver answers), so that a
    /// Node peer's queue of later messages moves on. The message is lost.
    UndecodableHandle {
        /// Why the line could not be decoded.
        error: FrameError,
        /// Whether an fd came with it (and was closed).
        had_fd: bool,
    },
    /// A `NODE_HANDLE` arrived with no fd; it was answered with
    /// `NODE_HANDLE_NACK` and dropped, as Node does.
    HandleWithoutFd,
    /// Fds arrived that no `NODE_HANDLE` message claimed; they were closed.
    FdWithoutHandle {
        /// How many fds were closed.
        count: usize,
    },
    /// A `NODE_HANDLE` named a type Node does not have; its fd was closed
    /// and the sender was answered with `NODE_HANDLE_NACK`.
    UnknownHandleType(String),
    /// The fd of a `NODE_HANDLE` could not be made into a handle (not a
    /// socket we know); it was closed and NACKed.
    BadHandle(io::Error),
    /// The peer answered a handle we sent with `NODE_HANDLE_NACK`.
    HandleRejected,
    /// The peer sent more bad lines than its budget
    /// ([`ChannelOptions::max_bad_lines`]); the channel was closed. This is
    /// also the summary of the bad lines not reported one by one.
    TooManyBadLines {
        /// Bad lines received, this one included.
        count: usize,
        /// The budget.
        limit: usize,
    },
    /// The channel closed after bad lines that were not reported one by one
    /// (past [`ChannelOptions::report_bad_lines`]): how many.
    BadLinesNotReported {
        /// Bad lines counted but not reported.
        count: usize,
    },
    /// Reading or writing the pipe failed; the channel closes.
    Io(io::Error),
}

impl fmt::Display for ChannelError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ChannelError::Frame(e) => e.fmt(f),
            ChannelError::UndecodableHandle { error, had_fd } => write!(
                f,
                "NODE_HANDLE message could not be decoded ({}; answered {}): {error}",
                if *had_fd {
                    "its fd closed"
                } else {
                    "no fd came"
                },
                if *had_fd {
                    "NODE_HANDLE_ACK"
                } else {
                    "NODE_HANDLE_NACK"
                }
            ),
            ChannelError::HandleWithoutFd => {
                f.write_str("NODE_HANDLE message arrived without an fd")
            }
            ChannelError::FdWithoutHandle { count } => {
                write!(f, "{count} fd(s) arrived without a NODE_HANDLE message")
            }
            ChannelError::UnknownHandleType(t) => write!(f, "unknown handle type {t:?}"),
            ChannelError::BadHandle(e) => write!(f, "received fd is not a usable socket: {e}"),
            ChannelError::HandleRejected => {
                f.write_str("the peer did not receive the handle (NACK)")
            }
            ChannelError::TooManyBadLines { count, limit } => write!(
                f,
                "{count} bad lines from the peer, over the budget of {limit} (max_bad_lines): \
                 disconnected"
            ),
            ChannelError::BadLinesNotReported { count } => write!(
                f,
                "{count} more bad line(s) from the peer were not reported one by one"
            ),
            ChannelError::Io(e) => write!(f, "IPC channel I/O error: {e}"),
        }
    }
}

impl std::error::Error for ChannelError {}

impl From<ChannelError> for io::Error {
    fn from(e: ChannelError) -> io::Error {
        match e {
            ChannelError::Io(e) => e,
            other => io::Error::new(io::ErrorKind::InvalidData, other),
        }
    }
}

/// The default budget of bad lines per channel: 100.
///
/// Node's receiver tolerates none (a line `JSON.parse` rejects kills the
/// process). A budget instead keeps one stray write on the channel's fd from
/// costing a connection, while a peer that floods the channel with garbage
/// is cut off after 101 lines: at most a hundred failed parses of CPU and
/// [`DEFAULT_REPORT_BAD_LINES`] + 1 error reports, however many lines it
/// writes. A peer that has sent a hundred bad lines is broken, not
/// glitching.
pub const DEFAULT_MAX_BAD_LINES: usize = 100;

/// The default number of bad lines reported one by one on a channel: 10.
/// The rest are counted and reported once, in
/// [`ChannelError::TooManyBadLines`] or, if the channel closes first,
/// [`ChannelError::BadLinesNotReported`].
pub const DEFAULT_REPORT_BAD_LINES: usize = 10;

/// Options for [`Channel::open`].
///
/// # Examples
///
/// ```
/// use uvcluster::ipc::ChannelOptions;
///
/// // A channel read on a thread with a small stack.
/// let opts = ChannelOptions { max_depth: 1000, ..ChannelOptions::default() };
/// # let _ = opts;
/// ```
#[derive(Clone, Copy, Debug)]
pub struct ChannelOptions {
    /// The largest message accepted, in bytes (default
    /// [`DEFAULT_MAX_MESSAGE`], 64 MiB). A longer line is reported and
    /// skipped.
    pub max_message: usize,
    /// How deeply arrays and objects may nest in one message, in levels
    /// (default [`DEFAULT_MAX_DEPTH`], 4500, above the 4183 Node's
    /// `JSON.stringify` can write). A deeper line is reported and skipped.
    pub max_depth: usize,
    /// How many bad lines (undecodable, or breaking the handle protocol)
    /// the peer may send before the channel is closed (default
    /// [`DEFAULT_MAX_BAD_LINES`]); `usize::MAX` for no limit.
    pub max_bad_lines: usize,
    /// How many bad lines are reported one by one (default
    /// [`DEFAULT_REPORT_BAD_LINES`]); the rest are summed up.
    pub report_bad_lines: usize,
}

impl Default for ChannelOptions {
    fn default() -> Self {
        ChannelOptions {
            max_message: DEFAULT_MAX_MESSAGE,
            max_depth: DEFAULT_MAX_DEPTH,
            max_bad_lines: DEFAULT_MAX_BAD_LINES,
            report_bad_lines: DEFAULT_REPORT_BAD_LINES,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    Open,
    /// `disconnect` was called; waiting for queued handles to drain.
    Disconnecting,
    Closed,
}

/// One decoded line, with the text kept where the value lost something.
struct Line {
    value: Value,
    exact: bool,
    /// The whole line, when not exact.
    raw: Option<Box<[u8]>>,
    /// For a `NODE_HANDLE` wrapper: whether its `msg` was read exactly,
    /// and its text when not.
    msg_exact: bool,
    msg_raw: Option<Box<[u8]>>,
}

impl Line {
    fn decoded(line: &[u8], p: json::Parsed) -> Line {
        let msg_exact = p.msg.is_none_or(|m| m.exact);
        Line {
            raw: (!p.exact).then(|| line.into()),
            msg_raw: p
                .msg
                .filter(|m| !m.exact)
                .map(|m| line[m.start..m.end].into()),
            msg_exact,
            exact: p.exact,
            value: p.value,
        }
    }
}

struct Outgoing {
    bytes: Vec<u8>,
    attach: Option<Attach>,
    on_sent: Option<SentCb>,
    /// For a handle sent by `send_cluster_handle`: who hears how it fared,
    /// and the `seq` whose reply to forget if it was not delivered.
    delivery: Option<(DeliveryCb, Option<u64>)>,
}

/// A handle we sent whose ACK has not come yet.
struct Awaiting {
    /// The handle to close when the answer comes (`AfterAck::Close`).
    to_close: Option<Socket>,
    /// Shared with the write's callback, which reports a failed write.
    delivery: Rc<std::cell::Cell<Option<DeliveryCb>>>,
    /// The `seq` of the message, when a reply to it is awaited.
    reply_seq: Option<u64>,
}

/// The user-message callback, with or without the JSON text.
enum UserCb {
    Value(MessageCb),
    Raw(RawMessageCb),
}

struct Inner {
    pipe: Handle<Pipe>,
    decoder: Decoder,
    opts: ChannelOptions,
    /// Bad lines received so far, and how many of them went unreported.
    bad_lines: usize,
    unreported: usize,
    state: State,
    /// Handles we sent whose ACK has not come yet, oldest first.
    awaiting: VecDeque<Awaiting>,
    /// How many handles may await their ACK at once (1: Node's sender).
    handles_in_flight: usize,
    queue: VecDeque<Outgoing>,
    on_message: Option<UserCb>,
    on_internal: Option<MessageCb>,
    on_error: Option<ErrorCb>,
    on_disconnect: Option<DisconnectCb>,
    /// User messages that arrived before `on_message` was set (Node replays
    /// them to the first listener).
    backlog: VecDeque<(RawMessage, Option<Socket>)>,
    replies: HashMap<u64, ReplyCb>,
    /// While the channel handles one read's messages, messages without a
    /// handle that callbacks send are coalesced here and written in one go
    /// when the read is done.
    in_read: bool,
    corked: Vec<u8>,
    corked_cbs: Vec<SentCb>,
}

/// One end of a Node IPC channel. Cloning gives another reference to the
/// same channel.
///
/// # Examples
///
/// Two ends in one process, over a socketpair:
///
/// ```
/// use serde_json::json;
/// use uvcluster::ipc::{Channel, ChannelOptions};
/// use uvcluster::uv::{Loop, RunMode};
///
/// let mut lp = Loop::new()?;
/// let (a, b) = lp.pipe_pair(true)?;
/// let a = Channel::open(&mut lp, a, ChannelOptions::default())?;
/// let b = Channel::open(&mut lp, b, ChannelOptions::default())?;
/// b.on_message(&mut lp, |lp, ch, msg, _handle| {
///     assert_eq!(msg, json!({"hello": "world"}));
///     ch.disconnect(lp);
/// });
/// a.send(&mut lp, &json!({"hello": "world"}), None)?;
/// lp.run(RunMode::Default)?;
/// assert!(!a.is_connected() && !b.is_connected());
/// # Ok::<(), std::io::Error>(())
/// ```
#[derive(Clone)]
pub struct Channel {
    inner: Rc<RefCell<Inner>>,
}

impl fmt::Debug for Channel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let i = self.inner.borrow();
        f.debug_struct("Channel")
            .field("pipe", &i.pipe)
            .field("state", &i.state)
            .field("awaiting_ack", &i.awaiting.len())
            .field("queued", &i.queue.len())
            .finish()
    }
}

/// The `seq` counter of cluster messages: one per process, as in Node,
/// shared by every channel (a primary numbers its messages to all workers
/// from one counter).
static SEQ: AtomicU64 = AtomicU64::new(0);

/// `{"cmd":"NODE_CLUSTER", ...fields, "seq":n}` with the next `seq`.
fn cluster_message(fields: &mut Map<String, Value>) -> (u64, Map<String, Value>) {
    let seq = SEQ.fetch_add(1, Ordering::Relaxed);
    let mut msg = Map::new();
    msg.insert("cmd".into(), NODE_CLUSTER.into());
    msg.append(fields);
    msg.insert("seq".into(), seq.into());
    (seq, msg)
}

/// The environment variable that names the channel's fd in a child.
pub const NODE_CHANNEL_FD: &str = "NODE_CHANNEL_FD";
/// The environment variable that names the serialization mode.
pub const NODE_CHANNEL_SERIALIZATION_MODE: &str = "NODE_CHANNEL_SERIALIZATION_MODE";

impl Channel {
    /// Opens a channel on an IPC pipe that is already connected (for example
    /// one end of [`Loop::pipe_pair`], or the pipe of a spawned child's
    /// `ipc` stdio slot) and starts reading.
    ///
    /// # Errors
    ///
    /// `EINVAL` if the pipe is not in IPC mode; otherwise `read_start`'s error.
    pub fn open(lp: &mut Loop, pipe: Handle<Pipe>, opts: ChannelOptions) -> io::Result<Channel> {
        if !lp.pipe_is_ipc(pipe) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "an IPC channel needs a pipe opened in IPC mode",
            ));
        }
        let ch = Channel {
            inner: Rc::new(RefCell::new(Inner {
                pipe,
                decoder: Decoder::new(opts.max_message),
                opts,
                bad_lines: 0,
                unreported: 0,
                state: State::Open,
                awaiting: VecDeque::new(),
                handles_in_flight: 1,
                queue: VecDeque::new(),
                on_message: None,
                on_internal: None,
                on_error: None,
                on_disconnect: None,
                backlog: VecDeque::new(),
                replies: HashMap::new(),
                in_read: false,
                corked: Vec::new(),
                corked_cbs: Vec::new(),
            })),
        };
        // The read callback holds the channel: an open channel lives as long
        // as its pipe, whether or not the caller keeps a `Channel` (as a
        // Node channel does). Closing the pipe drops the callback, and with
        // it this reference; `close_now` clears the user callbacks that
        // could hold the channel in a cycle.
        let me = ch.clone();
        lp.read_start(pipe, move |lp, _, r| me.on_read(lp, r))?;
        Ok(ch)
    }

    /// Opens the channel this process was started with, if any: reads
    /// `NODE_CHANNEL_FD` and `NODE_CHANNEL_SERIALIZATION_MODE`, removes both
    /// from the environment (so grandchildren do not inherit them), and
    /// opens the fd as an IPC pipe. Returns `None` without a channel. Call
    /// it at start-up, before spawning threads.
    ///
    /// # Errors
    ///
    /// `InvalidInput` for a mode other than `json` (this crate does not
    /// speak V8's `advanced` serialization) or an fd number that does not
    /// parse; `EBADF` if the fd is not open.
    pub fn from_env(lp: &mut Loop, opts: ChannelOptions) -> io::Result<Option<Channel>> {
        let mode = crate::uv::take_env_var(NODE_CHANNEL_SERIALIZATION_MODE);
        if std::env::var_os(NODE_CHANNEL_FD).is_none() {
            return Ok(None);
        }
        if let Some(mode) = mode
            && mode != "json"
        {
            crate::uv::take_env_var(NODE_CHANNEL_FD);
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "{NODE_CHANNEL_SERIALIZATION_MODE}={} is not supported: only \"json\" is \
                     (use serialization: 'json' in child_process.fork / cluster.setupPrimary)",
                    mode.to_string_lossy()
                ),
            ));
        }
        // The parent placed the channel at this number for us: the one
        // adoption of a raw fd from the environment (`uv::take_env_fd`).
        let Some(fd) = crate::uv::take_env_fd(NODE_CHANNEL_FD)? else {
            return Ok(None);
        };
        let pipe = lp.pipe_init(true);
        if let Err(e) = lp.pipe_open(pipe, fd) {
            lp.close_if_open(pipe);
            return Err(e);
        }
        Channel::open(lp, pipe, opts).map(Some)
    }

    /// The pipe under the channel.
    pub fn pipe(&self) -> Handle<Pipe> {
        self.inner.borrow().pipe
    }

    /// Whether the channel is open: neither end has disconnected.
    pub fn is_connected(&self) -> bool {
        self.inner.borrow().state == State::Open
    }

    /// Sets the callback for user messages. Messages that arrived before it
    /// was set are delivered to it first, from the loop (never inside this
    /// call). A string with an unpaired surrogate arrives with U+FFFD in
    /// its place; [`on_message_raw`](Self::on_message_raw) also gives the
    /// exact text.
    pub fn on_message(
        &self,
        lp: &mut Loop,
        cb: impl FnMut(&mut Loop, &Channel, Value, Option<Socket>) + 'static,
    ) {
        self.set_user_cb(lp, UserCb::Value(Box::new(cb)));
    }

    /// Sets the callback for user messages, given as [`RawMessage`]s: the
    /// value and, when the value could not hold the message exactly (an
    /// unpaired surrogate, a number beyond `f64`), its JSON text, which
    /// [`send_raw`](Self::send_raw) can send on unchanged. Replaces
    /// [`on_message`](Self::on_message); messages that arrived before are
    /// delivered to it first, as there.
    ///
    /// # Examples
    ///
    /// An echo that gives a Node peer back exactly what it sent:
    ///
    /// ```
    /// use uvcluster::ipc::{Channel, ChannelOptions};
    /// use uvcluster::uv::{Loop, RunMode};
    ///
    /// let mut lp = Loop::new()?;
    /// let (a, b) = lp.pipe_pair(true)?;
    /// let a = Channel::open(&mut lp, a, ChannelOptions::default())?;
    /// let b = Channel::open(&mut lp, b, ChannelOptions::default())?;
    /// b.on_message_raw(&mut lp, |lp, ch, msg, _| {
    ///     assert!(!msg.is_exact());
    ///     ch.send_raw(lp, &msg, None).unwrap();
    /// });
    /// a.on_message_raw(&mut lp, |lp, ch, msg, _| {
    ///     assert_eq!(&msg.json()[..], br#"{"note":"a\ud800b"}"#);
    ///     ch.disconnect(lp);
    /// });
    /// let m = uvcluster::ipc::RawMessage::parse(br#"{"note":"a\ud800b"}"#).unwrap();
    /// a.send_raw(&mut lp, &m, None)?;
    /// lp.run(RunMode::Default)?;
    /// # Ok::<(), std::io::Error>(())
    /// ```
    pub fn on_message_raw(
        &self,
        lp: &mut Loop,
        cb: impl FnMut(&mut Loop, &Channel, RawMessage, Option<Socket>) + 'static,
    ) {
        self.set_user_cb(lp, UserCb::Raw(Box::new(cb)));
    }

    fn set_user_cb(&self, lp: &mut Loop, cb: UserCb) {
        let replay = {
            let mut i = self.inner.borrow_mut();
            i.on_message = Some(cb);
            !i.backlog.is_empty()
        };
        if replay {
            let t = lp.timer_init();
            let weak = Rc::downgrade(&self.inner);
            let _ = lp.timer_start(t, Duration::ZERO, Duration::ZERO, move |lp, t| {
                lp.close_if_open(t);
                if let Some(inner) = weak.upgrade() {
                    let ch = Channel { inner };
                    loop {
                        let item = ch.inner.borrow_mut().backlog.pop_front();
                        let Some((v, h)) = item else { break };
                        if let Err((v, h)) = ch.deliver_user(lp, v, h) {
                            ch.inner.borrow_mut().backlog.push_front((v, h));
                            break;
                        }
                    }
                }
            });
        }
    }

    /// Sets the callback for user messages, deserialized into `T`. A message
    /// that does not fit `T` is passed as `Err` with the raw value dropped.
    pub fn on_message_typed<T: DeserializeOwned + 'static>(
        &self,
        lp: &mut Loop,
        mut cb: impl FnMut(&mut Loop, &Channel, serde_json::Result<T>, Option<Socket>) + 'static,
    ) {
        self.on_message(lp, move |lp, ch, v, h| {
            cb(lp, ch, serde_json::from_value(v), h)
        });
    }

    /// Sets the callback for internal messages (`cmd` starting with `NODE_`)
    /// other than the handle protocol's own and replies to
    /// [`send_cluster`](Self::send_cluster) requests. Without one they are
    /// dropped (and any handle closed).
    pub fn on_internal(
        &self,
        cb: impl FnMut(&mut Loop, &Channel, Value, Option<Socket>) + 'static,
    ) {
        self.inner.borrow_mut().on_internal = Some(Box::new(cb));
    }

    /// Sets the callback for faults; without one they are logged.
    pub fn on_error(&self, cb: impl FnMut(&mut Loop, &Channel, ChannelError) + 'static) {
        self.inner.borrow_mut().on_error = Some(Box::new(cb));
    }

    /// Sets the callback run once when the channel closes, whichever end
    /// disconnected.
    pub fn on_disconnect(&self, cb: impl FnMut(&mut Loop, &Channel) + 'static) {
        self.inner.borrow_mut().on_disconnect = Some(Box::new(cb));
    }

    /// Sends a message (`process.send(msg)`). `on_sent` runs once it is
    /// written or has failed; without it a write error goes to
    /// [`on_error`](Self::on_error). While a handle we sent awaits its ACK,
    /// the message is queued behind it.
    ///
    /// # Errors
    ///
    /// `NotConnected` after disconnect; serde_json's error as `InvalidInput`.
    pub fn send(&self, lp: &mut Loop, msg: &Value, on_sent: Option<SentCb>) -> io::Result<()> {
        self.send_serde(lp, msg, on_sent)
    }

    /// Sends a message given as its JSON text ([`RawMessage`]), unchanged:
    /// the way to send a string with an unpaired surrogate, which a
    /// JavaScript peer receives as such. Queued like [`send`](Self::send).
    ///
    /// # Errors
    ///
    /// `NotConnected` after disconnect.
    pub fn send_raw(
        &self,
        lp: &mut Loop,
        msg: &RawMessage,
        on_sent: Option<SentCb>,
    ) -> io::Result<()> {
        let mut bytes = msg.json().into_owned();
        bytes.push(b'\n');
        self.submit(
            lp,
            Outgoing {
                bytes,
                attach: None,
                on_sent,
                delivery: None,
            },
        )
    }

    /// Sends any serializable value as a message.
    ///
    /// # Errors
    ///
    /// As [`send`](Self::send).
    pub fn send_serde<T: Serialize + ?Sized>(
        &self,
        lp: &mut Loop,
        msg: &T,
        on_sent: Option<SentCb>,
    ) -> io::Result<()> {
        let bytes =
            frame::encode(msg).map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
        self.submit(
            lp,
            Outgoing {
                bytes,
                attach: None,
                on_sent,
                delivery: None,
            },
        )
    }

    /// Sends a message with a handle (`process.send(msg, handle)`): the
    /// message goes out wrapped as `{"cmd":"NODE_HANDLE","type":..,"msg":..}`
    /// with the handle's fd on the same write. Every later message waits
    /// until the peer's ACK.
    ///
    /// # Errors
    ///
    /// As [`send`](Self::send); `EBADF` if the handle is closed.
    pub fn send_handle(
        &self,
        lp: &mut Loop,
        msg: Value,
        attach: Attach,
        extra: Map<String, Value>,
        on_sent: Option<SentCb>,
    ) -> io::Result<()> {
        let wrapped = message::wrap_handle(msg, attach.kind, extra);
        let bytes =
            frame::encode(&wrapped).map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
        self.submit(
            lp,
            Outgoing {
                bytes,
                attach: Some(attach),
                on_sent,
                delivery: None,
            },
        )
    }

    /// Sends a cluster message: `{"cmd":"NODE_CLUSTER", ...fields,
    /// "seq":n}` with `n` from the process-wide counter (Node's
    /// `sendHelper`). With `reply`, the peer's message carrying `"ack":n`
    /// goes to it instead of [`on_internal`](Self::on_internal). Returns `n`.
    ///
    /// # Errors
    ///
    /// As [`send_handle`](Self::send_handle); `reply` is then dropped.
    pub fn send_cluster(
        &self,
        lp: &mut Loop,
        mut fields: Map<String, Value>,
        attach: Option<Attach>,
        reply: Option<ReplyCb>,
    ) -> io::Result<u64> {
        let (seq, msg) = cluster_message(&mut fields);
        if let Some(cb) = reply {
            self.inner.borrow_mut().replies.insert(seq, cb);
        }
        let r = match attach {
            Some(a) => self.send_handle(lp, Value::Object(msg), a, Map::new(), None),
            None => self.send(lp, &Value::Object(msg), None),
        };
        if let Err(e) = r {
            self.inner.borrow_mut().replies.remove(&seq);
            return Err(e);
        }
        Ok(seq)
    }

    /// Sends a cluster message with a handle, as
    /// [`send_cluster`](Self::send_cluster) with `attach` does, and tells
    /// `on_delivery` how the handle fared ([`HandleDelivery`]): the peer's
    /// ACK, its NACK (which then goes to `on_delivery` instead of
    /// [`on_error`](Self::on_error) as [`ChannelError::HandleRejected`]),
    /// or a failed write. After a NACK or a failed write, `reply` is
    /// dropped: the peer never saw the message.
    ///
    /// Node's sender (`lib/internal/child_process.js`) re-sends a NACKed
    /// `net.Socket` up to `MAX_HANDLE_RETRANSMISSIONS` (3) times and then
    /// only warns; any other handle type (the cluster's `net.Native`) is
    /// dropped at the first NACK and its reply callback waits forever. Here
    /// the caller hears of it and decides (the round-robin handle hands the
    /// connection to another worker).
    ///
    /// # Errors
    ///
    /// As [`send_handle`](Self::send_handle); `reply` and `on_delivery` are
    /// then dropped.
    pub fn send_cluster_handle(
        &self,
        lp: &mut Loop,
        mut fields: Map<String, Value>,
        attach: Attach,
        reply: Option<ReplyCb>,
        on_delivery: DeliveryCb,
    ) -> io::Result<u64> {
        let (seq, msg) = cluster_message(&mut fields);
        let reply_seq = reply.is_some().then_some(seq);
        if let Some(cb) = reply {
            self.inner.borrow_mut().replies.insert(seq, cb);
        }
        let wrapped = message::wrap_handle(Value::Object(msg), attach.kind, Map::new());
        let r = frame::encode(&wrapped)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))
            .and_then(|bytes| {
                self.submit(
                    lp,
                    Outgoing {
                        bytes,
                        attach: Some(attach),
                        on_sent: None,
                        delivery: Some((on_delivery, reply_seq)),
                    },
                )
            });
        if let Err(e) = r {
            self.inner.borrow_mut().replies.remove(&seq);
            return Err(e);
        }
        Ok(seq)
    }

    /// Lets up to `n` handles we sent await the peer's `NODE_HANDLE_ACK` at
    /// once (default 1). Node's sender (`lib/internal/child_process.js`)
    /// holds every message that follows a handle until the handle's ACK
    /// comes, so each fd costs a round trip to the peer. With `n` above 1
    /// up to `n` handles go out back to back, each in its own write; the
    /// kernel never lets two fd-carrying messages share a read, and the
    /// peer answers them in order (Node's receiver: "there will be at most
    /// one NODE_HANDLE message in every chunk we read because SCM_RIGHTS
    /// messages don't get coalesced"), so ACKs and NACKs are matched to
    /// handles oldest first. Messages still keep their order. A handle
    /// sent twice with [`AfterAck::Close`] goes twice with its fd, where
    /// Node's sender, waiting for the first ACK, sends the second without
    /// it; keep `n` at 1 for that.
    ///
    /// # Panics
    ///
    /// If `n` is 0.
    pub fn set_handles_in_flight(&self, lp: &mut Loop, n: usize) {
        assert!(n > 0, "at least one handle must be allowed in flight");
        self.inner.borrow_mut().handles_in_flight = n;
        self.flush(lp);
    }

    /// How many handles we sent may await the peer's ACK at once (see
    /// [`set_handles_in_flight`](Self::set_handles_in_flight)).
    pub fn handles_in_flight(&self) -> usize {
        self.inner.borrow().handles_in_flight
    }

    /// Closes the channel (`process.disconnect()`): once handles we sent
    /// have been acknowledged and any partly received message has arrived,
    /// the pipe closes; both ends then see their disconnect callback.
    /// Does nothing if already disconnecting or closed.
    pub fn disconnect(&self, lp: &mut Loop) {
        {
            let mut i = self.inner.borrow_mut();
            if i.state != State::Open {
                return;
            }
            i.state = State::Disconnecting;
        }
        self.maybe_finish_disconnect(lp);
    }

    /// Lets the channel stop keeping the loop alive (`channel.unref()`),
    /// or makes it keep it alive again.
    ///
    /// # Errors
    ///
    /// A closed channel's stale pipe.
    pub fn set_ref(&self, lp: &mut Loop, on: bool) -> io::Result<()> {
        let pipe = self.pipe();
        if on {
            lp.ref_handle(pipe)
        } else {
            lp.unref_handle(pipe)
        }
    }

    // ----- sending ---------------------------------------------------------

    fn submit(&self, lp: &mut Loop, out: Outgoing) -> io::Result<()> {
        {
            let mut i = self.inner.borrow_mut();
            if i.state != State::Open {
                return Err(io::Error::new(
                    io::ErrorKind::NotConnected,
                    "IPC channel is closed",
                ));
            }
            if i.awaiting.len() >= i.handles_in_flight || !i.queue.is_empty() {
                i.queue.push_back(out);
                return Ok(());
            }
        }
        self.write_out(lp, out).map_err(|(e, _)| e)
    }

    /// Writes one message. On a failure reported at once, gives back the
    /// error with the message's delivery callback, which was not called.
    #[allow(clippy::type_complexity)]
    fn write_out(
        &self,
        lp: &mut Loop,
        out: Outgoing,
    ) -> Result<(), (io::Error, Option<(DeliveryCb, Option<u64>)>)> {
        let Some(a) = out.attach else {
            self.cork(lp, &out.bytes, out.on_sent);
            return Ok(());
        };
        // A handle goes with its own write; whatever was corked goes first.
        self.flush_corked(lp);
        let pipe = self.pipe();
        let (delivery, reply_seq) = match out.delivery {
            Some((cb, seq)) => (Some(cb), seq),
            None => (None, None),
        };
        let delivery = Rc::new(std::cell::Cell::new(delivery));
        let done = self.handle_completion(out.on_sent, delivery.clone());
        let r = lp.write2(pipe, &[&out.bytes], a.handle, done);
        match r {
            Ok(()) => {
                self.inner.borrow_mut().awaiting.push_back(Awaiting {
                    to_close: (a.after_ack == AfterAck::Close).then_some(a.handle),
                    delivery,
                    reply_seq,
                });
                Ok(())
            }
            Err(e) => Err((e, delivery.take().map(|cb| (cb, reply_seq)))),
        }
    }

    /// The write callback of a message carrying a handle: as
    /// [`completion`](Self::completion), except that when the message was
    /// sent by `send_cluster_handle`, a failed write goes to its delivery
    /// callback and the channel stops waiting for an ACK that cannot come.
    fn handle_completion(
        &self,
        on_sent: Option<SentCb>,
        delivery: Rc<std::cell::Cell<Option<DeliveryCb>>>,
    ) -> impl FnOnce(&mut Loop, Handle<Pipe>, io::Result<()>) + 'static {
        let weak = Rc::downgrade(&self.inner);
        let has_on_sent = on_sent.is_some();
        let plain = self.completion(on_sent.into_iter().collect());
        move |lp: &mut Loop, pipe: Handle<Pipe>, r: io::Result<()>| {
            let failed = match &r {
                Err(e) => Some(io::Error::new(e.kind(), e.to_string())),
                Ok(()) => None,
            };
            let taken = match (failed, weak.upgrade()) {
                (Some(e), Some(inner)) => delivery.take().map(|cb| (e, cb, Channel { inner })),
                _ => None,
            };
            let Some((e, cb, ch)) = taken else {
                return plain(lp, pipe, r);
            };
            let to_close = {
                let mut i = ch.inner.borrow_mut();
                let at = (i.awaiting.iter()).position(|a| Rc::ptr_eq(&a.delivery, &delivery));
                match at.and_then(|at| i.awaiting.remove(at)) {
                    Some(a) => {
                        if let Some(seq) = a.reply_seq {
                            i.replies.remove(&seq);
                        }
                        a.to_close
                    }
                    None => None,
                }
            };
            if let Some(h) = to_close {
                lp.close_if_open(h);
            }
            cb(lp, &ch, HandleDelivery::NotSent(e));
            // `on_sent`, if any, still hears of the failure; without one,
            // the delivery callback was the one to tell.
            if has_on_sent {
                plain(lp, pipe, r);
            }
            ch.flush(lp);
            ch.maybe_finish_disconnect(lp);
        }
    }

    /// The write callback for one write carrying the messages whose
    /// `on_sent` callbacks are `cbs`: each gets the result; without any, an
    /// error goes to `on_error`.
    fn completion(
        &self,
        cbs: Vec<SentCb>,
    ) -> impl FnOnce(&mut Loop, Handle<Pipe>, io::Result<()>) + 'static {
        let weak = Rc::downgrade(&self.inner);
        move |lp: &mut Loop, _: Handle<Pipe>, r: io::Result<()>| {
            if cbs.is_empty() {
                if let Err(e) = r
                    && let Some(inner) = weak.upgrade()
                {
                    Channel { inner }.emit_error(lp, ChannelError::Io(e));
                }
                return;
            }
            for cb in cbs {
                let r = match &r {
                    Ok(()) => Ok(()),
                    Err(e) => Err(io::Error::new(e.kind(), e.to_string())),
                };
                cb(lp, r);
            }
        }
    }

    /// Writes a message without a handle, or, while the channel is handling
    /// a read, adds it to that read's coalesced write: the answers to every
    /// message of one read then cost one `write` instead of one each. The
    /// coalesced write goes out before the read callback returns to the loop.
    fn cork(&self, lp: &mut Loop, bytes: &[u8], on_sent: Option<SentCb>) {
        {
            let mut i = self.inner.borrow_mut();
            if i.in_read {
                i.corked.extend_from_slice(bytes);
                if let Some(cb) = on_sent {
                    i.corked_cbs.push(cb);
                }
                return;
            }
        }
        let done = self.completion(on_sent.into_iter().collect());
        if let Err(e) = lp.write(self.pipe(), &[bytes], done) {
            self.emit_error(lp, ChannelError::Io(e));
        }
    }

    /// Writes the coalesced messages now.
    fn flush_corked(&self, lp: &mut Loop) {
        let (bytes, cbs) = {
            let mut i = self.inner.borrow_mut();
            if i.corked.is_empty() {
                return;
            }
            (
                std::mem::take(&mut i.corked),
                std::mem::take(&mut i.corked_cbs),
            )
        };
        let done = self.completion(cbs);
        if let Err(e) = lp.write(self.pipe(), &[&bytes], done) {
            self.emit_error(lp, ChannelError::Io(e));
        }
        // Keep the buffer's allocation for the next batch.
        let mut i = self.inner.borrow_mut();
        if i.corked.is_empty() {
            let mut b = bytes;
            b.clear();
            i.corked = b;
        }
    }

    fn write_ack(&self, lp: &mut Loop, ok: bool) {
        if self.inner.borrow().state == State::Closed {
            return;
        }
        let line: &[u8] = if ok {
            b"{\"cmd\":\"NODE_HANDLE_ACK\"}\n"
        } else {
            b"{\"cmd\":\"NODE_HANDLE_NACK\"}\n"
        };
        // ACKs bypass the handle queue (Node's `_send` with `ackedByPeer`).
        self.cork(lp, line, None);
    }

    fn on_ack(&self, lp: &mut Loop, ok: bool) {
        // The peer answers handles in the order it reads them.
        let waiting = self.inner.borrow_mut().awaiting.pop_front();
        match waiting {
            None => log::warn!(
                "IPC: NODE_HANDLE_{} with no handle in flight",
                if ok { "ACK" } else { "NACK" }
            ),
            Some(a) => {
                if let Some(h) = a.to_close {
                    lp.close_if_open(h);
                }
                if !ok && let Some(seq) = a.reply_seq {
                    // The peer dropped the message: no reply will come.
                    self.inner.borrow_mut().replies.remove(&seq);
                }
                match a.delivery.take() {
                    Some(cb) => {
                        let d = if ok {
                            HandleDelivery::Acked
                        } else {
                            HandleDelivery::Nacked
                        };
                        cb(lp, self, d);
                    }
                    None if !ok => self.emit_error(lp, ChannelError::HandleRejected),
                    None => {}
                }
            }
        }
        self.flush(lp);
        self.maybe_finish_disconnect(lp);
    }

    fn flush(&self, lp: &mut Loop) {
        loop {
            let next = {
                let mut i = self.inner.borrow_mut();
                if i.awaiting.len() >= i.handles_in_flight || i.state == State::Closed {
                    return;
                }
                i.queue.pop_front()
            };
            let Some(mut out) = next else { return };
            // Node's `_send`: a socket closed while its message was queued
            // (sent before with `keepOpen: false`, closed by that ACK)
            // goes without it, as the bare message
            // (test-cluster-send-handle-twice).
            if out.attach.is_some_and(|a| lp.is_closing(a.handle)) {
                out.attach = None;
                out.bytes = unwrap_handle_message(&out.bytes).unwrap_or(out.bytes);
            }
            // A queued message's failure has no caller to return to.
            match self.write_out(lp, out) {
                Ok(()) => {}
                Err((e, Some((cb, seq)))) => {
                    if let Some(seq) = seq {
                        self.inner.borrow_mut().replies.remove(&seq);
                    }
                    cb(lp, self, HandleDelivery::NotSent(e));
                }
                Err((e, None)) => self.emit_error(lp, ChannelError::Io(e)),
            }
        }
    }

    fn maybe_finish_disconnect(&self, lp: &mut Loop) {
        let ready = {
            let i = self.inner.borrow();
            i.state == State::Disconnecting
                && i.awaiting.is_empty()
                && i.queue.is_empty()
                && i.decoder.at_boundary()
        };
        if ready {
            self.close_channel(lp, true);
        }
    }

    /// Closes the pipe; the disconnect callback runs from its close callback.
    /// Closes the channel. After a local `disconnect` (`graceful`), what is
    /// already written or corked still reaches the peer: the pipe is shut
    /// down once its write queue drains, then closed. After EOF or an error
    /// it closes at once. The disconnect callback runs from the pipe's close
    /// callback.
    fn close_now(&self, lp: &mut Loop) {
        self.close_channel(lp, false);
    }

    fn close_channel(&self, lp: &mut Loop, graceful: bool) {
        if graceful {
            self.flush_corked(lp);
        }
        let (pipe, queued, unreported) = {
            let mut i = self.inner.borrow_mut();
            if i.state == State::Closed {
                return;
            }
            i.state = State::Closed;
            i.awaiting.clear();
            i.replies.clear();
            i.corked.clear();
            i.corked_cbs.clear();
            (
                i.pipe,
                std::mem::take(&mut i.queue),
                std::mem::take(&mut i.unreported),
            )
        };
        if unreported > 0 {
            self.emit_error(lp, ChannelError::BadLinesNotReported { count: unreported });
        }
        let inner = self.inner.clone();
        let finish = move |lp: &mut Loop| {
            for out in queued {
                if let Some(cb) = out.on_sent {
                    cb(
                        lp,
                        Err(io::Error::new(
                            io::ErrorKind::NotConnected,
                            "IPC channel closed",
                        )),
                    );
                }
            }
            let ch = Channel { inner };
            let cb = ch.inner.borrow_mut().on_disconnect.take();
            if let Some(mut cb) = cb {
                cb(lp, &ch);
            }
            // Break reference cycles through callbacks that hold the channel.
            let mut i = ch.inner.borrow_mut();
            i.on_message = None;
            i.on_internal = None;
            i.on_error = None;
            let backlog = std::mem::take(&mut i.backlog);
            drop(i);
            for (_, h) in backlog {
                if let Some(h) = h {
                    lp.close_if_open(h);
                }
            }
        };
        if graceful {
            let finish = std::cell::Cell::new(Some(finish));
            let finish = Rc::new(finish);
            let f2 = finish.clone();
            let shut = lp.shutdown(pipe, move |lp, pipe, _| {
                if let Some(f) = f2.take() {
                    let _ = lp.close(pipe, f);
                }
            });
            if shut.is_ok() {
                return;
            }
            if let Some(f) = finish.take() {
                let _ = lp.close(pipe, f);
            }
            return;
        }
        let _ = lp.close(pipe, finish);
    }

    // ----- receiving -------------------------------------------------------

    fn on_read(&self, lp: &mut Loop, r: io::Result<&[u8]>) {
        match r {
            Err(e) => {
                self.emit_error(lp, ChannelError::Io(e));
                self.close_now(lp);
            }
            Ok([]) => {
                let res = self.inner.borrow().decoder.finish();
                if let Err(e) = res {
                    self.fault(lp, ChannelError::Frame(e));
                }
                self.drop_stray_fds(lp);
                self.close_now(lp);
            }
            Ok(data) => {
                self.inner.borrow_mut().decoder.push(data);
                self.drain_lines(lp);
            }
        }
    }

    fn drain_lines(&self, lp: &mut Loop) {
        self.inner.borrow_mut().in_read = true;
        self.drain_lines_inner(lp);
        self.inner.borrow_mut().in_read = false;
        if self.inner.borrow().state != State::Closed {
            self.flush_corked(lp);
        }
    }

    fn drain_lines_inner(&self, lp: &mut Loop) {
        loop {
            let item = {
                let mut i = self.inner.borrow_mut();
                if i.state == State::Closed {
                    return;
                }
                let max_depth = i.opts.max_depth;
                let decoder = &mut i.decoder;
                match decoder.next_line() {
                    None => break,
                    Some(Ok(line)) => match json::parse(line, max_depth) {
                        Ok(p) => Ok(Line::decoded(line, p)),
                        Err(e) => Err((e, json::claims_node_handle(line))),
                    },
                    Some(Err(e)) => {
                        // An oversized line is reported at once; its fd (if
                        // any) came with its first bytes, which are kept.
                        let claims = decoder
                            .skipped_prefix()
                            .is_some_and(json::claims_node_handle);
                        Err((e, claims))
                    }
                }
            };
            match item {
                Ok(line) => self.dispatch(lp, line),
                Err((e, claims_handle)) => self.bad_line(lp, e, claims_handle),
            }
        }
        if self.inner.borrow().decoder.at_boundary() {
            self.drop_stray_fds(lp);
        }
        self.maybe_finish_disconnect(lp);
    }

    /// A line that could not be decoded. If it claimed to carry a handle,
    /// the peer (a Node sender queues everything behind a handle until it
    /// is answered) gets the answer a Node receiver would give: ACK when an
    /// fd came, which is then closed, NACK when none did.
    fn bad_line(&self, lp: &mut Loop, error: FrameError, claims_handle: bool) {
        if !claims_handle {
            self.fault(lp, ChannelError::Frame(error));
            return;
        }
        // Dropping the fd closes it.
        let had_fd = lp.pipe_take_pending_fd(self.pipe()).is_ok();
        self.write_ack(lp, had_fd);
        self.fault(lp, ChannelError::UndecodableHandle { error, had_fd });
    }

    /// Counts a bad line against the peer's budget, reports it if it is
    /// among the first few, and closes the channel once the budget is
    /// spent.
    fn fault(&self, lp: &mut Loop, e: ChannelError) {
        self.peer_fault(lp, |lp| self.emit_error(lp, e));
    }

    /// Counts a message from the peer that a layer above found malformed
    /// (a cluster protocol error: a message only the other side may send,
    /// a request without its fields) against the same budget as the lines
    /// this channel cannot decode ([`ChannelOptions::max_bad_lines`]), so
    /// that a peer flooding well-formed nonsense is cut off like one
    /// flooding garbage. `report` runs for the first
    /// [`ChannelOptions::report_bad_lines`] faults only; past the budget the
    /// channel reports [`ChannelError::TooManyBadLines`] and closes.
    pub fn peer_fault(&self, lp: &mut Loop, report: impl FnOnce(&mut Loop)) {
        let (report_it, over) = {
            let mut i = self.inner.borrow_mut();
            i.bad_lines += 1;
            let first = i.bad_lines <= i.opts.report_bad_lines;
            if !first {
                i.unreported += 1;
            }
            let over = i.bad_lines > i.opts.max_bad_lines;
            if over {
                i.unreported = 0;
            }
            (first, over.then_some((i.bad_lines, i.opts.max_bad_lines)))
        };
        if report_it {
            report(lp);
        }
        if let Some((count, limit)) = over {
            self.emit_error(lp, ChannelError::TooManyBadLines { count, limit });
            self.close_now(lp);
        }
    }

    /// Fds left once every complete message is handled and no message is
    /// half-read belong to no `NODE_HANDLE`: close them.
    fn drop_stray_fds(&self, lp: &mut Loop) {
        let pipe = self.pipe();
        let mut count = 0;
        while lp.pipe_take_pending_fd(pipe).is_ok() {
            count += 1;
        }
        if count > 0 {
            self.fault(lp, ChannelError::FdWithoutHandle { count });
        }
    }

    fn dispatch(&self, lp: &mut Loop, line: Line) {
        match message::classify(line.value) {
            Incoming::User(v) => {
                let m = RawMessage::received(v, line.exact, line.raw);
                self.emit_user(lp, m, None)
            }
            Incoming::Ack(ok) => self.on_ack(lp, ok),
            Incoming::Internal(v) => self.route_internal(lp, v, None),
            Incoming::Handle { msg, kind } => {
                let pipe = self.pipe();
                if HandleKind::parse(&kind).is_none() {
                    let _ = lp.pipe_take_pending_fd(pipe);
                    self.write_ack(lp, false);
                    self.fault(lp, ChannelError::UnknownHandleType(kind));
                    return;
                }
                if lp.pipe_pending_count(pipe) == 0 {
                    self.write_ack(lp, false);
                    self.fault(lp, ChannelError::HandleWithoutFd);
                    return;
                }
                match lp.pipe_accept_pending(pipe) {
                    Ok(h) => {
                        self.write_ack(lp, true);
                        if is_internal(&msg) {
                            self.route_internal(lp, msg, Some(h));
                        } else {
                            let m = RawMessage::received(msg, line.msg_exact, line.msg_raw);
                            self.emit_user(lp, m, Some(h));
                        }
                    }
                    Err(e) => {
                        self.write_ack(lp, false);
                        self.fault(lp, ChannelError::BadHandle(e));
                    }
                }
            }
        }
    }

    fn route_internal(&self, lp: &mut Loop, v: Value, h: Option<Socket>) {
        if message::cmd_of(&v) == Some(NODE_CLUSTER)
            && let Some(ack) = v.get("ack").and_then(Value::as_u64)
        {
            let reply = self.inner.borrow_mut().replies.remove(&ack);
            if let Some(cb) = reply {
                cb(lp, self, v, h);
                return;
            }
        }
        let cb = self.inner.borrow_mut().on_internal.take();
        match cb {
            Some(mut cb) => {
                cb(lp, self, v, h);
                let mut i = self.inner.borrow_mut();
                if i.on_internal.is_none() && i.state != State::Closed {
                    i.on_internal = Some(cb);
                }
            }
            None => {
                if let Some(h) = h {
                    lp.close_if_open(h);
                }
            }
        }
    }

    fn emit_user(&self, lp: &mut Loop, m: RawMessage, h: Option<Socket>) {
        {
            let mut i = self.inner.borrow_mut();
            // While a backlog waits for its replay, new messages queue
            // behind it so that they cannot overtake it.
            if !i.backlog.is_empty() {
                i.backlog.push_back((m, h));
                return;
            }
        }
        if let Err(item) = self.deliver_user(lp, m, h) {
            self.inner.borrow_mut().backlog.push_back(item);
        }
    }

    /// Runs the message callback; gives the message back without one.
    fn deliver_user(
        &self,
        lp: &mut Loop,
        m: RawMessage,
        h: Option<Socket>,
    ) -> Result<(), (RawMessage, Option<Socket>)> {
        let cb = self.inner.borrow_mut().on_message.take();
        match cb {
            Some(mut cb) => {
                match &mut cb {
                    UserCb::Value(f) => f(lp, self, m.into_value(), h),
                    UserCb::Raw(f) => f(lp, self, m, h),
                }
                let mut i = self.inner.borrow_mut();
                if i.on_message.is_none() && i.state != State::Closed {
                    i.on_message = Some(cb);
                }
                Ok(())
            }
            None => Err((m, h)),
        }
    }

    fn emit_error(&self, lp: &mut Loop, e: ChannelError) {
        let cb = self.inner.borrow_mut().on_error.take();
        match cb {
            Some(mut cb) => {
                cb(lp, self, e);
                let mut i = self.inner.borrow_mut();
                if i.on_error.is_none() {
                    i.on_error = Some(cb);
                }
            }
            None => log::error!("IPC channel: {e}"),
        }
    }
}
