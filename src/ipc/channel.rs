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

use std::collections::VecDeque;
use std::fmt;
use std::io;
use std::time::Duration;

use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::{Map, Value};

use super::frame::{self, DEFAULT_MAX_DEPTH, DEFAULT_MAX_MESSAGE, Decoder, FrameError};
use super::json;
use super::message::{self, HandleKind, Incoming, NODE_CLUSTER, RawMessage, is_internal};
use crate::uv::{CallbackSlot, Handle, Id, Ids, Loop, Pipe, Socket};

/// Callback for user or internal messages: the message and the handle that
/// came with it, if any. The callback owns the handle (it must close it).
pub type MessageCb = Box<dyn FnMut(&mut Loop, Channel, Value, Option<Socket>)>;
/// Callback for user messages with their JSON text
/// ([`Channel::on_message_raw`]).
pub type RawMessageCb = Box<dyn FnMut(&mut Loop, Channel, RawMessage, Option<Socket>)>;
/// Callback for the reply to a request sent with [`Channel::send_cluster`].
pub type ReplyCb = Box<dyn FnOnce(&mut Loop, Channel, Value, Option<Socket>)>;
/// Callback run once a message has been handed to the kernel, or failed.
pub type SentCb = Box<dyn FnOnce(&mut Loop, io::Result<()>)>;
/// Callback told how a handle sent with [`Channel::send_cluster_handle`]
/// fared; see [`HandleDelivery`].
pub type DeliveryCb = Box<dyn FnOnce(&mut Loop, Channel, HandleDelivery)>;

/// A map keyed by a counter of ours (a `seq`, a write number).
type CounterMap<V> = crate::uv::IdMap<u64, V>;

/// A reply callback that reads the reply's scalar fields
/// ([`Fields`]) rather than taking its value: the line of a flat reply
/// (what a worker answers to `newconn`) is then read without building a
/// [`Value`].
pub(crate) type FieldsReplyCb = Box<dyn FnOnce(&mut Loop, Channel, Fields<'_>, Option<Socket>)>;

/// A reply callback, by how it reads the reply.
pub(crate) enum Reply {
    Value(ReplyCb),
    Fields(FieldsReplyCb),
}

impl From<ReplyCb> for Reply {
    fn from(cb: ReplyCb) -> Reply {
        Reply::Value(cb)
    }
}

impl From<FieldsReplyCb> for Reply {
    fn from(cb: FieldsReplyCb) -> Reply {
        Reply::Fields(cb)
    }
}

/// A reply's fields, as [`FieldsReplyCb`] reads them: from the flat line
/// itself, or from the value the parser built when the line was not flat.
pub(crate) enum Fields<'a> {
    Flat(&'a Flat),
    Value(&'a Value),
}

impl Fields<'_> {
    /// JavaScript's truth of field `name` (`!!msg[name]`); `false` when
    /// absent.
    pub(crate) fn truthy(&self, name: &str) -> bool {
        match self {
            Fields::Flat(f) => f.get(name).is_some_and(Scalar::truthy),
            Fields::Value(v) => v.get(name).is_some_and(|v| match v {
                Value::Null => false,
                Value::Bool(b) => *b,
                Value::Number(n) => n.as_f64().is_some_and(|f| f != 0.0 && !f.is_nan()),
                Value::String(s) => !s.is_empty(),
                Value::Array(_) | Value::Object(_) => true,
            }),
        }
    }

    /// Field `name` when it is a non-negative integer
    /// ([`Value::as_u64`]).
    pub(crate) fn as_u64(&self, name: &str) -> Option<u64> {
        match self {
            Fields::Flat(f) => match f.get(name)? {
                Scalar::Uint(n) => Some(n),
                _ => None,
            },
            Fields::Value(v) => v.get(name).and_then(Value::as_u64),
        }
    }
}

/// A scalar of a [`Flat`] line.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Scalar {
    Null,
    Bool(bool),
    /// An integer of at most 15 digits (exact as a JavaScript number).
    Uint(u64),
    /// A non-empty string, or `""`: only its emptiness is kept.
    Str {
        empty: bool,
    },
}

impl Scalar {
    fn truthy(self) -> bool {
        match self {
            Scalar::Null => false,
            Scalar::Bool(b) => b,
            Scalar::Uint(n) => n != 0,
            Scalar::Str { empty } => !empty,
        }
    }
}

/// A cluster reply read straight from its line: `{"cmd":"NODE_CLUSTER",
/// "ack":<n>, ...}` with at most [`Flat::MAX`] members, every key a plain
/// identifier and every value `null`, `true`, `false`, an integer of at
/// most 15 digits or a string of printable ASCII without escapes, and no
/// whitespace, `cmd` only once: what Node's `JSON.stringify` and this
/// crate write for a reply to `newconn`. Any other line takes the JSON
/// parser.
#[derive(Debug)]
pub(crate) struct Flat {
    /// The `ack` member, when an integer.
    ack: Option<u64>,
    /// The members: the key's hash-free bytes (at most 16) and the value.
    members: [([u8; 16], u8, Scalar); Flat::MAX],
    len: usize,
}

impl Flat {
    const MAX: usize = 8;
    const PREFIX: &'static [u8] = b"{\"cmd\":\"NODE_CLUSTER\",\"ack\":";

    /// The line as a flat reply, or `None` when it is anything else.
    pub(crate) fn reply(line: &[u8]) -> Option<Flat> {
        if !line.starts_with(Self::PREFIX) || line.last() != Some(&b'}') {
            return None;
        }
        let mut f = Flat {
            ack: None,
            members: [([0; 16], 0, Scalar::Null); Flat::MAX],
            len: 0,
        };
        let body = &line[1..line.len() - 1];
        let mut i = 0;
        while i < body.len() {
            if f.len == Self::MAX {
                return None;
            }
            // "key":
            if body[i] != b'"' {
                return None;
            }
            let k0 = i + 1;
            let klen = body[k0..].iter().position(|&b| b == b'"')?;
            let key = &body[k0..k0 + klen];
            if key.is_empty()
                || key.len() > 16
                || !key.iter().all(|b| b.is_ascii_alphanumeric() || *b == b'_')
            {
                return None;
            }
            i = k0 + klen + 1;
            if body.get(i) != Some(&b':') {
                return None;
            }
            i += 1;
            let end = i + body[i..]
                .iter()
                .position(|&b| b == b',')
                .unwrap_or(body.len() - i);
            let v = &body[i..end];
            let value = match v {
                b"null" => Scalar::Null,
                b"true" => Scalar::Bool(true),
                b"false" => Scalar::Bool(false),
                [b'"', s @ .., b'"'] => {
                    if !s
                        .iter()
                        .all(|&b| (0x20..0x7f).contains(&b) && b != b'"' && b != b'\\')
                    {
                        return None;
                    }
                    Scalar::Str {
                        empty: s.is_empty(),
                    }
                }
                [b'0'] => Scalar::Uint(0),
                [b'1'..=b'9', rest @ ..]
                    if rest.len() < 15 && rest.iter().all(u8::is_ascii_digit) =>
                {
                    Scalar::Uint(v.iter().fold(0, |n, d| n * 10 + u64::from(d - b'0')))
                }
                _ => return None,
            };
            // A second `cmd` would be the one `JSON.parse` keeps: the
            // parser decides what such a line is.
            if key == b"cmd" && f.len > 0 {
                return None;
            }
            let mut k = [0; 16];
            k[..key.len()].copy_from_slice(key);
            // A repeated key: the last one counts, as in `JSON.parse`.
            if key == b"ack" {
                f.ack = match value {
                    Scalar::Uint(n) => Some(n),
                    _ => None,
                };
            }
            f.members[f.len] = (k, key.len() as u8, value);
            f.len += 1;
            i = end + 1;
            if end == body.len() - 1 {
                // A trailing comma.
                return None;
            }
        }
        Some(f)
    }

    /// The value of member `name` (the last, if repeated).
    fn get(&self, name: &str) -> Option<Scalar> {
        self.members[..self.len]
            .iter()
            .rev()
            .find(|(k, n, _)| &k[..usize::from(*n)] == name.as_bytes())
            .map(|m| m.2)
    }
}

/// A primary's round-robin `newconn` read straight from its line:
/// `{"cmd":"NODE_HANDLE","type":"net.Native","msg":{"cmd":"NODE_CLUSTER",
/// "act":"newconn","key":"<key>","seq":<n>}}`, byte for byte what Node's
/// `sendHelper` and `child_process` `send` write (and this crate's
/// primary), the key printable ASCII without escapes (at most
/// [`NewConn::MAX_KEY`] bytes), `seq` an integer of at most 15 digits. Any
/// other line takes the JSON parser.
#[derive(Debug, Clone, Copy)]
pub(crate) struct NewConn {
    key: [u8; NewConn::MAX_KEY],
    key_len: u8,
    seq: u64,
}

impl NewConn {
    const MAX_KEY: usize = 120;
    const PREFIX: &'static [u8] = b"{\"cmd\":\"NODE_HANDLE\",\"type\":\"net.Native\",\"msg\":{\"cmd\":\"NODE_CLUSTER\",\"act\":\"newconn\",\"key\":\"";
    const SEQ: &'static [u8] = b"\",\"seq\":";
    const END: &'static [u8] = b"}}";

    /// The line as a flat `newconn`, or `None` when it is anything else.
    pub(crate) fn parse(line: &[u8]) -> Option<NewConn> {
        let rest = line.strip_prefix(Self::PREFIX)?.strip_suffix(Self::END)?;
        let klen = rest.iter().position(|&b| b == b'"')?;
        let (key, rest) = rest.split_at(klen);
        let digits = rest.strip_prefix(Self::SEQ)?;
        if key.len() > Self::MAX_KEY
            || !key.iter().all(|&b| (0x20..0x7f).contains(&b) && b != b'\\')
        {
            return None;
        }
        let seq = match digits {
            [b'0'] => 0,
            [b'1'..=b'9', more @ ..] if more.len() < 15 && more.iter().all(u8::is_ascii_digit) => {
                digits.iter().fold(0, |n, d| n * 10 + u64::from(d - b'0'))
            }
            _ => return None,
        };
        let mut k = [0; Self::MAX_KEY];
        k[..key.len()].copy_from_slice(key);
        Some(NewConn {
            key: k,
            key_len: key.len() as u8,
            seq,
        })
    }

    /// The server key (printable ASCII, hence UTF-8).
    pub(crate) fn key(&self) -> &str {
        std::str::from_utf8(&self.key[..usize::from(self.key_len)]).unwrap_or_default()
    }

    /// The message's `seq`.
    pub(crate) fn seq(&self) -> u64 {
        self.seq
    }
}

/// A peer's `NODE_HANDLE_ACK` and `NODE_HANDLE_NACK` lines as Node writes
/// them (`JSON.stringify({cmd: 'NODE_HANDLE_ACK'})`): recognised by their
/// bytes, before any JSON parse. Any other spelling takes the parser.
const ACK_LINE: &[u8] = b"{\"cmd\":\"NODE_HANDLE_ACK\"}";
const NACK_LINE: &[u8] = b"{\"cmd\":\"NODE_HANDLE_NACK\"}";

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

/// What one received line is.
// A `Flat` is a few hundred bytes on the stack, for one line, moved once:
// cheaper than the allocation boxing it would cost per reply.
#[allow(clippy::large_enum_variant)]
enum Item {
    /// `NODE_HANDLE_ACK` (`true`) or `NODE_HANDLE_NACK`, recognised by its
    /// bytes.
    Ack(bool),
    /// A reply whose callback reads its fields ([`Reply::Fields`]),
    /// read without building a value ([`Flat::reply`]).
    FlatReply(FieldsReplyCb, Flat),
    /// A round-robin `newconn` in its flat shape, for `on_newconn`.
    NewConn(NewConn),
    /// Anything else, decoded.
    Line(Line),
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
    /// The number of the write that carried it: its write callback and its
    /// ACK find its delivery callback (in [`ChannelState::deliveries`]) by
    /// this number.
    write: u64,
    /// The `seq` of the message, when a reply to it is awaited.
    reply_seq: Option<u64>,
}

type UserFn = dyn FnMut(&mut Loop, Channel, RawMessage, Option<Socket>);
type InternalFn = dyn FnMut(&mut Loop, Channel, Value, Option<Socket>);
/// The typed `newconn` callback: the server key, the message's `seq`, the
/// connection's handle.
type NewConnFn = dyn FnMut(&mut Loop, Channel, &str, u64, Socket);
type ErrorFn = dyn FnMut(&mut Loop, Channel, ChannelError);
type DisconnectFn = dyn FnMut(&mut Loop, Channel);

/// A channel's state, owned by the loop (in the `ipc` layer's context,
/// [`IpcContext`]) and named by a [`Channel`] id. It lives from
/// [`Channel::open`] until the pipe's close completes.
pub(crate) struct ChannelState {
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
    on_message: CallbackSlot<UserFn>,
    on_internal: CallbackSlot<InternalFn>,
    /// Round-robin `newconn` lines in their flat shape ([`NewConn`]), when
    /// set; otherwise they go to `on_internal` as values.
    on_newconn: CallbackSlot<NewConnFn>,
    on_error: CallbackSlot<ErrorFn>,
    on_disconnect: CallbackSlot<DisconnectFn>,
    /// User messages that arrived before `on_message` was set (Node replays
    /// them to the first listener).
    backlog: VecDeque<(RawMessage, Option<Socket>)>,
    replies: CounterMap<Reply>,
    /// The delivery callbacks of handles sent with `send_cluster_handle`,
    /// by the number of their write, until the peer's answer or the
    /// write's failure. Kept after the channel closes (a write cancelled by
    /// the close still reports), until the state is dropped.
    deliveries: CounterMap<DeliveryCb>,
    /// The number of the next write that carries a handle.
    next_write: u64,
    /// While the channel handles one read's messages, messages without a
    /// handle that callbacks send are coalesced here and written in one go
    /// when the read is done.
    in_read: bool,
    corked: Vec<u8>,
    corked_cbs: Vec<SentCb>,
}

impl ChannelState {
    fn new(opts: ChannelOptions) -> ChannelState {
        ChannelState {
            decoder: Decoder::new(opts.max_message),
            opts,
            bad_lines: 0,
            unreported: 0,
            state: State::Open,
            awaiting: VecDeque::new(),
            handles_in_flight: 1,
            queue: VecDeque::new(),
            on_message: CallbackSlot::empty(),
            on_internal: CallbackSlot::empty(),
            on_newconn: CallbackSlot::empty(),
            on_error: CallbackSlot::empty(),
            on_disconnect: CallbackSlot::empty(),
            backlog: VecDeque::new(),
            replies: CounterMap::default(),
            deliveries: CounterMap::default(),
            next_write: 0,
            in_read: false,
            corked: Vec::new(),
            corked_cbs: Vec::new(),
        }
    }
}

/// The `ipc` layer's state, kept in the loop ([`Loop::context_mut`]): the
/// channels, by id, and the `seq` counter of cluster messages.
#[derive(Default)]
pub(crate) struct IpcContext {
    channels: Ids<ChannelState>,
    /// The `seq` of the next cluster message: one counter for every channel
    /// of the loop, as Node's process has one (a primary numbers its
    /// messages to all workers from it). One loop per process, as in Node,
    /// makes it the process's counter.
    seq: u64,
}

fn st(lp: &Loop, ch: Channel) -> Option<&ChannelState> {
    lp.context::<IpcContext>()?.channels.get(ch.id)
}

fn st_mut(lp: &mut Loop, ch: Channel) -> Option<&mut ChannelState> {
    lp.context_mut::<IpcContext>().channels.get_mut(ch.id)
}

fn not_connected() -> io::Error {
    io::Error::new(io::ErrorKind::NotConnected, "IPC channel is closed")
}

/// One end of a Node IPC channel: a typed id for state the loop owns.
///
/// Like a [`Server`](crate::net::Server), a `Channel` is a copyable id:
/// the loop keeps the channel's state (its decoder, queues and callbacks),
/// every method takes the loop, and every callback receives `&mut Loop` and
/// the channel's id. The state lives from [`open`](Self::open) until its
/// pipe has closed (after the disconnect callback); from then on the id is
/// stale and the channel answers as a closed one (`send` fails with
/// `NotConnected`, `is_connected` is `false`). An open channel lives as long
/// as its pipe, whether or not anyone keeps its id, as a Node channel does.
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
/// assert!(!a.is_connected(&lp) && !b.is_connected(&lp));
/// # Ok::<(), std::io::Error>(())
/// ```
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub struct Channel {
    id: Id<ChannelState>,
    pipe: Handle<Pipe>,
}

/// The loop's next cluster `seq`.
fn next_seq(lp: &mut Loop) -> u64 {
    let ctx = lp.context_mut::<IpcContext>();
    let seq = ctx.seq;
    ctx.seq += 1;
    seq
}

/// Writes `,"seq":<seq>}` and, for a `NODE_HANDLE` wrapper, its closing
/// `}`, then the line end.
fn close_cluster(out: &mut Vec<u8>, seq: u64, wrapped: bool) {
    out.extend_from_slice(b",\"seq\":");
    out.extend_from_slice(itoa_u64(seq, &mut [0; 20]));
    out.extend_from_slice(if wrapped { b"}}\n" } else { b"}\n" });
}

/// `n` in decimal, in `buf`.
fn itoa_u64(mut n: u64, buf: &mut [u8; 20]) -> &[u8] {
    let mut i = buf.len();
    loop {
        i -= 1;
        buf[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    &buf[i..]
}

/// The start of a cluster message: `{"cmd":"NODE_CLUSTER"`, inside a
/// `NODE_HANDLE` wrapper of type `kind` if there is one.
fn open_cluster(out: &mut Vec<u8>, kind: Option<HandleKind>) {
    if let Some(kind) = kind {
        out.extend_from_slice(b"{\"cmd\":\"NODE_HANDLE\",\"type\":\"");
        out.extend_from_slice(kind.as_str().as_bytes());
        out.extend_from_slice(b"\",\"msg\":");
    }
    out.extend_from_slice(b"{\"cmd\":\"NODE_CLUSTER\"");
}

/// The line of `{"cmd":"NODE_CLUSTER", ...fields, "seq":seq}` (wrapped as
/// a `NODE_HANDLE` of type `kind` if given), written field by field: the
/// same bytes as encoding the map [`cluster_message`] builds (and
/// [`message::wrap_handle`] wraps), without building it. `None` when
/// `fields` holds `cmd` or `seq` themselves, whose places and values the
/// map's rules decide.
fn encode_cluster(
    fields: &Map<String, Value>,
    seq: u64,
    kind: Option<HandleKind>,
) -> Option<serde_json::Result<Vec<u8>>> {
    if fields.contains_key("cmd") || fields.contains_key("seq") {
        return None;
    }
    let mut out = Vec::with_capacity(128);
    open_cluster(&mut out, kind);
    for (k, v) in fields {
        out.push(b',');
        let mut ser = serde_json::Serializer::with_formatter(&mut out, json::JsFormatter);
        if let Err(e) = k.serialize(&mut ser) {
            return Some(Err(e));
        }
        out.push(b':');
        let mut ser = serde_json::Serializer::with_formatter(&mut out, json::JsFormatter);
        if let Err(e) = v.serialize(&mut ser) {
            return Some(Err(e));
        }
    }
    close_cluster(&mut out, seq, kind.is_some());
    Some(Ok(out))
}

/// `{"cmd":"NODE_CLUSTER", ...fields, "seq":n}` with the loop's next `seq`.
fn cluster_message(lp: &mut Loop, fields: &mut Map<String, Value>) -> (u64, Map<String, Value>) {
    let ctx = lp.context_mut::<IpcContext>();
    let seq = ctx.seq;
    ctx.seq += 1;
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
        let id = (lp.context_mut::<IpcContext>().channels).insert(ChannelState::new(opts));
        let ch = Channel { id, pipe };
        // The read callback names the channel by its id: the channel lives
        // as long as its pipe, whether or not the caller keeps the id.
        if let Err(e) = lp.read_start(pipe, move |lp, _, r| ch.on_read(lp, r)) {
            lp.context_mut::<IpcContext>().channels.remove(id);
            return Err(e);
        }
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
    /// The pipe under the channel.
    pub fn pipe(self) -> Handle<Pipe> {
        self.pipe
    }

    /// Whether the channel is open: neither end has disconnected (and its
    /// state is still in `lp`).
    pub fn is_connected(self, lp: &Loop) -> bool {
        st(lp, self).is_some_and(|s| s.state == State::Open)
    }

    /// Sets the callback for user messages. Messages that arrived before it
    /// was set are delivered to it first, from the loop (never inside this
    /// call). A string with an unpaired surrogate arrives with U+FFFD in
    /// its place; [`on_message_raw`](Self::on_message_raw) also gives the
    /// exact text.
    pub fn on_message(
        self,
        lp: &mut Loop,
        mut cb: impl FnMut(&mut Loop, Channel, Value, Option<Socket>) + 'static,
    ) {
        self.set_user_cb(
            lp,
            Box::new(move |lp, ch, m: RawMessage, h| cb(lp, ch, m.into_value(), h)),
        );
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
        self,
        lp: &mut Loop,
        cb: impl FnMut(&mut Loop, Channel, RawMessage, Option<Socket>) + 'static,
    ) {
        self.set_user_cb(lp, Box::new(cb));
    }

    fn set_user_cb(self, lp: &mut Loop, cb: Box<UserFn>) {
        let Some(s) = st_mut(lp, self) else { return };
        s.on_message.set(cb);
        if s.backlog.is_empty() {
            return;
        }
        let t = lp.timer_init();
        let started = lp.timer_start(t, Duration::ZERO, Duration::ZERO, move |lp, t| {
            lp.close_if_open(t);
            self.replay_backlog(lp);
        });
        if started.is_err() {
            lp.close_if_open(t);
        }
    }

    /// Delivers the user messages that arrived before there was a callback.
    fn replay_backlog(self, lp: &mut Loop) {
        while let Some((m, h)) = st_mut(lp, self).and_then(|s| s.backlog.pop_front()) {
            if let Err(item) = self.deliver_user(lp, m, h) {
                if let Some(s) = st_mut(lp, self) {
                    s.backlog.push_front(item);
                }
                break;
            }
        }
    }

    /// Sets the callback for user messages, deserialized into `T`. A message
    /// that does not fit `T` is passed as `Err` with the raw value dropped.
    pub fn on_message_typed<T: DeserializeOwned + 'static>(
        self,
        lp: &mut Loop,
        mut cb: impl FnMut(&mut Loop, Channel, serde_json::Result<T>, Option<Socket>) + 'static,
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
        self,
        lp: &mut Loop,
        cb: impl FnMut(&mut Loop, Channel, Value, Option<Socket>) + 'static,
    ) {
        if let Some(s) = st_mut(lp, self) {
            s.on_internal.set(Box::new(cb));
        }
    }

    /// Sets the callback for the primary's round-robin `newconn` messages
    /// whose line is in the shape Node's primary writes ([`NewConn`]): they
    /// are answered `NODE_HANDLE_ACK` and handed over as the server key,
    /// the `seq` and the connection, without building a [`Value`]. Any
    /// other shape still goes to [`on_internal`](Self::on_internal).
    pub(crate) fn on_newconn(
        self,
        lp: &mut Loop,
        cb: impl FnMut(&mut Loop, Channel, &str, u64, Socket) + 'static,
    ) {
        if let Some(s) = st_mut(lp, self) {
            s.on_newconn.set(Box::new(cb));
        }
    }

    /// Sets the callback for faults; without one they are logged.
    pub fn on_error(
        self,
        lp: &mut Loop,
        cb: impl FnMut(&mut Loop, Channel, ChannelError) + 'static,
    ) {
        if let Some(s) = st_mut(lp, self) {
            s.on_error.set(Box::new(cb));
        }
    }

    /// Sets the callback run once when the channel closes, whichever end
    /// disconnected.
    pub fn on_disconnect(self, lp: &mut Loop, cb: impl FnMut(&mut Loop, Channel) + 'static) {
        if let Some(s) = st_mut(lp, self) {
            s.on_disconnect.set(Box::new(cb));
        }
    }

    /// Sends a message (`process.send(msg)`). `on_sent` runs once it is
    /// written or has failed; without it a write error goes to
    /// [`on_error`](Self::on_error). While a handle we sent awaits its ACK,
    /// the message is queued behind it.
    ///
    /// # Errors
    ///
    /// `NotConnected` after disconnect; serde_json's error as `InvalidInput`.
    pub fn send(self, lp: &mut Loop, msg: &Value, on_sent: Option<SentCb>) -> io::Result<()> {
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
        self,
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
        self,
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
        self,
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
    /// "seq":n}` with `n` from the loop's counter (Node's `sendHelper`,
    /// whose counter is the process's). With `reply`, the peer's message
    /// carrying `"ack":n` goes to it instead of
    /// [`on_internal`](Self::on_internal). Returns `n`.
    ///
    /// # Errors
    ///
    /// As [`send_handle`](Self::send_handle); `reply` is then dropped.
    pub fn send_cluster(
        self,
        lp: &mut Loop,
        mut fields: Map<String, Value>,
        attach: Option<Attach>,
        mut reply: Option<ReplyCb>,
    ) -> io::Result<u64> {
        if attach.is_none()
            && let Some(seq) = self.try_send_cluster_direct(lp, &fields, &mut reply)
        {
            return seq;
        }
        let (seq, msg) = cluster_message(lp, &mut fields);
        self.expect_reply(lp, seq, reply);
        let r = match attach {
            Some(a) => self.send_handle(lp, Value::Object(msg), a, Map::new(), None),
            None => self.send(lp, &Value::Object(msg), None),
        };
        if let Err(e) = r {
            self.forget_reply(lp, seq);
            return Err(e);
        }
        Ok(seq)
    }

    /// [`send_cluster`](Self::send_cluster) without a handle, its line
    /// written field by field ([`encode_cluster`]); `None` (and `reply`
    /// untouched) when the fields need the general path.
    fn try_send_cluster_direct(
        self,
        lp: &mut Loop,
        fields: &Map<String, Value>,
        reply: &mut Option<ReplyCb>,
    ) -> Option<io::Result<u64>> {
        let seq = lp.context::<IpcContext>().map_or(0, |c| c.seq);
        let bytes = encode_cluster(fields, seq, None)?;
        let seq = next_seq(lp);
        let bytes = match bytes {
            Ok(b) => b,
            Err(e) => return Some(Err(io::Error::new(io::ErrorKind::InvalidInput, e))),
        };
        self.expect_reply(lp, seq, reply.take());
        let r = self.submit(
            lp,
            Outgoing {
                bytes,
                attach: None,
                on_sent: None,
                delivery: None,
            },
        );
        Some(match r {
            Ok(()) => Ok(seq),
            Err(e) => {
                self.forget_reply(lp, seq);
                Err(e)
            }
        })
    }

    fn expect_reply(self, lp: &mut Loop, seq: u64, reply: Option<impl Into<Reply>>) {
        if let (Some(cb), Some(s)) = (reply, st_mut(lp, self)) {
            s.replies.insert(seq, cb.into());
        }
    }

    fn forget_reply(self, lp: &mut Loop, seq: u64) {
        if let Some(s) = st_mut(lp, self) {
            s.replies.remove(&seq);
        }
    }

    /// [`send_cluster`](Self::send_cluster) without a handle or a reply,
    /// with the fields given as their JSON text (`"name":value` pairs
    /// joined by commas, such as `"ack":3,"accepted":true`), written as
    /// they are: what a worker answers to every `newconn`. The caller
    /// answers for `fields` being valid JSON members without `cmd` or
    /// `seq`. Returns the message's `seq`.
    ///
    /// # Errors
    ///
    /// As [`send`](Self::send).
    pub(crate) fn send_cluster_json(self, lp: &mut Loop, fields: &[u8]) -> io::Result<u64> {
        let seq = next_seq(lp);
        let mut bytes = Vec::with_capacity(fields.len() + 40);
        open_cluster(&mut bytes, None);
        if !fields.is_empty() {
            bytes.push(b',');
            bytes.extend_from_slice(fields);
        }
        close_cluster(&mut bytes, seq, false);
        self.submit(
            lp,
            Outgoing {
                bytes,
                attach: None,
                on_sent: None,
                delivery: None,
            },
        )?;
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
        self,
        lp: &mut Loop,
        mut fields: Map<String, Value>,
        attach: Attach,
        reply: Option<ReplyCb>,
        on_delivery: DeliveryCb,
    ) -> io::Result<u64> {
        let seq = lp.context::<IpcContext>().map_or(0, |c| c.seq);
        let bytes = match encode_cluster(&fields, seq, Some(attach.kind)) {
            Some(r) => {
                next_seq(lp);
                r
            }
            None => {
                let (s, msg) = cluster_message(lp, &mut fields);
                debug_assert_eq!(s, seq);
                let wrapped = message::wrap_handle(Value::Object(msg), attach.kind, Map::new());
                frame::encode(&wrapped)
            }
        };
        let bytes = bytes.map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e));
        self.submit_cluster_handle(lp, seq, bytes, attach, reply.map(Reply::Value), on_delivery)
    }

    /// [`send_cluster_handle`](Self::send_cluster_handle) with the fields
    /// given as their JSON text, `"name":value` pairs joined by commas
    /// (such as `"act":"newconn","key":"..."`), written as they are: what
    /// the round-robin handle sends for every connection, encoded once.
    /// The caller answers for `fields` being valid JSON members without
    /// `cmd` or `seq`.
    pub(crate) fn send_cluster_handle_json(
        self,
        lp: &mut Loop,
        fields: &[u8],
        attach: Attach,
        reply: Option<FieldsReplyCb>,
        on_delivery: DeliveryCb,
    ) -> io::Result<u64> {
        let seq = next_seq(lp);
        let mut bytes = Vec::with_capacity(fields.len() + 80);
        open_cluster(&mut bytes, Some(attach.kind));
        if !fields.is_empty() {
            bytes.push(b',');
            bytes.extend_from_slice(fields);
        }
        close_cluster(&mut bytes, seq, true);
        self.submit_cluster_handle(
            lp,
            seq,
            Ok(bytes),
            attach,
            reply.map(Reply::Fields),
            on_delivery,
        )
    }

    fn submit_cluster_handle(
        self,
        lp: &mut Loop,
        seq: u64,
        bytes: io::Result<Vec<u8>>,
        attach: Attach,
        reply: Option<Reply>,
        on_delivery: DeliveryCb,
    ) -> io::Result<u64> {
        let reply_seq = reply.is_some().then_some(seq);
        self.expect_reply(lp, seq, reply);
        let r = bytes.and_then(|bytes| {
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
            self.forget_reply(lp, seq);
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
    pub fn set_handles_in_flight(self, lp: &mut Loop, n: usize) {
        assert!(n > 0, "at least one handle must be allowed in flight");
        if let Some(s) = st_mut(lp, self) {
            s.handles_in_flight = n;
        }
        self.flush(lp);
    }

    /// Bytes written to the channel and not yet taken by the pipe, in
    /// bytes: the pipe's own write queue (libuv's
    /// `uv_stream_get_write_queue_size`, which Node's
    /// `channel.writeQueueSize` reads), plus messages queued behind a
    /// handle awaiting its ACK and messages coalesced during a read. A peer
    /// that does not read makes it grow; 0 for a closed channel.
    pub fn write_queue_size(self, lp: &Loop) -> usize {
        let Some(s) = st(lp, self) else { return 0 };
        let mine = s.corked.len() + s.queue.iter().map(|o| o.bytes.len()).sum::<usize>();
        mine + lp.write_queue_size(self.pipe)
    }

    /// How many handles we sent may await the peer's ACK at once (see
    /// [`set_handles_in_flight`](Self::set_handles_in_flight)); 1 for a
    /// closed channel.
    pub fn handles_in_flight(self, lp: &Loop) -> usize {
        st(lp, self).map_or(1, |s| s.handles_in_flight)
    }

    /// Closes the channel (`process.disconnect()`): once handles we sent
    /// have been acknowledged and any partly received message has arrived,
    /// the pipe closes; both ends then see their disconnect callback.
    /// Does nothing if already disconnecting or closed.
    pub fn disconnect(self, lp: &mut Loop) {
        match st_mut(lp, self) {
            Some(s) if s.state == State::Open => s.state = State::Disconnecting,
            _ => return,
        }
        self.maybe_finish_disconnect(lp);
    }

    /// Lets the channel stop keeping the loop alive (`channel.unref()`),
    /// or makes it keep it alive again.
    ///
    /// # Errors
    ///
    /// A closed channel's stale pipe.
    pub fn set_ref(self, lp: &mut Loop, on: bool) -> io::Result<()> {
        if on {
            lp.ref_handle(self.pipe)
        } else {
            lp.unref_handle(self.pipe)
        }
    }

    // ----- sending ---------------------------------------------------------

    fn submit(self, lp: &mut Loop, out: Outgoing) -> io::Result<()> {
        let s = st_mut(lp, self)
            .filter(|s| s.state == State::Open)
            .ok_or_else(not_connected)?;
        if s.awaiting.len() >= s.handles_in_flight || !s.queue.is_empty() {
            s.queue.push_back(out);
            return Ok(());
        }
        self.write_out(lp, out).map_err(|(e, _)| e)
    }

    /// Writes one message. On a failure reported at once, gives back the
    /// error with the message's delivery callback, which was not called.
    #[allow(clippy::type_complexity)]
    fn write_out(
        self,
        lp: &mut Loop,
        out: Outgoing,
    ) -> Result<(), (io::Error, Option<(DeliveryCb, Option<u64>)>)> {
        let Some(a) = out.attach else {
            self.cork(lp, &out.bytes, out.on_sent);
            return Ok(());
        };
        // A handle goes with its own write; whatever was corked goes first.
        self.flush_corked(lp);
        let (delivery, reply_seq) = match out.delivery {
            Some((cb, seq)) => (Some(cb), seq),
            None => (None, None),
        };
        let Some(s) = st_mut(lp, self) else {
            return Err((not_connected(), delivery.map(|cb| (cb, reply_seq))));
        };
        let write = s.next_write;
        s.next_write += 1;
        if let Some(cb) = delivery {
            s.deliveries.insert(write, cb);
        }
        let done = self.handle_completion(out.on_sent, write);
        match lp.write2(self.pipe, &[&out.bytes], a.handle, done) {
            Ok(()) => {
                if let Some(s) = st_mut(lp, self) {
                    s.awaiting.push_back(Awaiting {
                        to_close: (a.after_ack == AfterAck::Close).then_some(a.handle),
                        write,
                        reply_seq,
                    });
                }
                Ok(())
            }
            Err(e) => {
                let cb = st_mut(lp, self).and_then(|s| s.deliveries.remove(&write));
                Err((e, cb.map(|cb| (cb, reply_seq))))
            }
        }
    }

    /// The write callback of a message carrying a handle: as
    /// [`completion`](Self::completion), except that when the message was
    /// sent by `send_cluster_handle`, a failed write goes to its delivery
    /// callback and the channel stops waiting for an ACK that cannot come.
    fn handle_completion(
        self,
        on_sent: Option<SentCb>,
        write: u64,
    ) -> impl FnOnce(&mut Loop, Handle<Pipe>, io::Result<()>) + 'static {
        let has_on_sent = on_sent.is_some();
        let plain = self.completion(on_sent.into_iter().collect());
        move |lp: &mut Loop, pipe: Handle<Pipe>, r: io::Result<()>| {
            let taken = match &r {
                Err(e) => st_mut(lp, self)
                    .and_then(|s| s.deliveries.remove(&write))
                    .map(|cb| (io::Error::new(e.kind(), e.to_string()), cb)),
                Ok(()) => None,
            };
            let Some((e, cb)) = taken else {
                return plain(lp, pipe, r);
            };
            let to_close = st_mut(lp, self).and_then(|s| {
                let at = s.awaiting.iter().position(|a| a.write == write)?;
                let a = s.awaiting.remove(at)?;
                if let Some(seq) = a.reply_seq {
                    s.replies.remove(&seq);
                }
                a.to_close
            });
            if let Some(h) = to_close {
                lp.close_if_open(h);
            }
            cb(lp, self, HandleDelivery::NotSent(e));
            // `on_sent`, if any, still hears of the failure; without one,
            // the delivery callback was the one to tell.
            if has_on_sent {
                plain(lp, pipe, r);
            }
            self.flush(lp);
            self.maybe_finish_disconnect(lp);
        }
    }

    /// The write callback for one write carrying the messages whose
    /// `on_sent` callbacks are `cbs`: each gets the result; without any, an
    /// error goes to `on_error`.
    fn completion(
        self,
        cbs: Vec<SentCb>,
    ) -> impl FnOnce(&mut Loop, Handle<Pipe>, io::Result<()>) + 'static {
        move |lp: &mut Loop, _: Handle<Pipe>, r: io::Result<()>| {
            if cbs.is_empty() {
                if let Err(e) = r {
                    self.emit_error(lp, ChannelError::Io(e));
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
    fn cork(self, lp: &mut Loop, bytes: &[u8], on_sent: Option<SentCb>) {
        if let Some(s) = st_mut(lp, self)
            && s.in_read
        {
            s.corked.extend_from_slice(bytes);
            if let Some(cb) = on_sent {
                s.corked_cbs.push(cb);
            }
            return;
        }
        let done = self.completion(on_sent.into_iter().collect());
        if let Err(e) = lp.write(self.pipe, &[bytes], done) {
            self.emit_error(lp, ChannelError::Io(e));
        }
    }

    /// Writes the coalesced messages now.
    fn flush_corked(self, lp: &mut Loop) {
        let Some(s) = st_mut(lp, self).filter(|s| !s.corked.is_empty()) else {
            return;
        };
        let (bytes, cbs) = (
            std::mem::take(&mut s.corked),
            std::mem::take(&mut s.corked_cbs),
        );
        let done = self.completion(cbs);
        if let Err(e) = lp.write(self.pipe, &[&bytes], done) {
            self.emit_error(lp, ChannelError::Io(e));
        }
        // Keep the buffer's allocation for the next batch.
        if let Some(s) = st_mut(lp, self)
            && s.corked.is_empty()
        {
            let mut b = bytes;
            b.clear();
            s.corked = b;
        }
    }

    fn write_ack(self, lp: &mut Loop, ok: bool) {
        if st(lp, self).is_none_or(|s| s.state == State::Closed) {
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

    fn on_ack(self, lp: &mut Loop, ok: bool) {
        // The peer answers handles in the order it reads them.
        let waiting = st_mut(lp, self).and_then(|s| {
            let a = s.awaiting.pop_front()?;
            if !ok && let Some(seq) = a.reply_seq {
                // The peer dropped the message: no reply will come.
                s.replies.remove(&seq);
            }
            Some((a.to_close, s.deliveries.remove(&a.write)))
        });
        match waiting {
            None => log::warn!(
                "IPC: NODE_HANDLE_{} with no handle in flight",
                if ok { "ACK" } else { "NACK" }
            ),
            Some((to_close, delivery)) => {
                if let Some(h) = to_close {
                    lp.close_if_open(h);
                }
                match delivery {
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

    fn flush(self, lp: &mut Loop) {
        loop {
            let next = match st_mut(lp, self) {
                Some(s) if s.awaiting.len() < s.handles_in_flight && s.state != State::Closed => {
                    s.queue.pop_front()
                }
                _ => return,
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
                        self.forget_reply(lp, seq);
                    }
                    cb(lp, self, HandleDelivery::NotSent(e));
                }
                Err((e, None)) => self.emit_error(lp, ChannelError::Io(e)),
            }
        }
    }

    fn maybe_finish_disconnect(self, lp: &mut Loop) {
        let ready = st(lp, self).is_some_and(|s| {
            s.state == State::Disconnecting
                && s.awaiting.is_empty()
                && s.queue.is_empty()
                && s.decoder.at_boundary()
        });
        if ready {
            self.close_channel(lp, true);
        }
    }

    /// Closes the channel at once (after EOF or an error).
    fn close_now(self, lp: &mut Loop) {
        self.close_channel(lp, false);
    }

    /// Closes the channel. After a local `disconnect` (`graceful`), what is
    /// already written or corked still reaches the peer: the pipe is shut
    /// down once its write queue drains, then closed. After EOF or an error
    /// it closes at once. The disconnect callback runs from the pipe's close
    /// callback ([`finish_close`](Self::finish_close)).
    fn close_channel(self, lp: &mut Loop, graceful: bool) {
        if graceful {
            self.flush_corked(lp);
        }
        let Some(s) = st_mut(lp, self).filter(|s| s.state != State::Closed) else {
            return;
        };
        s.state = State::Closed;
        s.awaiting.clear();
        s.replies.clear();
        s.corked.clear();
        s.corked_cbs.clear();
        let unreported = std::mem::take(&mut s.unreported);
        if unreported > 0 {
            self.emit_error(lp, ChannelError::BadLinesNotReported { count: unreported });
        }
        if graceful {
            let shut = lp.shutdown(self.pipe, move |lp, pipe, _| {
                let _ = lp.close(pipe, move |lp| self.finish_close(lp));
            });
            if shut.is_ok() {
                return;
            }
        }
        let _ = lp.close(self.pipe, move |lp| self.finish_close(lp));
    }

    /// The pipe has closed: fail what was still queued, run the disconnect
    /// callback, and drop the channel's state (its id is stale from here).
    fn finish_close(self, lp: &mut Loop) {
        let queued = st_mut(lp, self).map(|s| std::mem::take(&mut s.queue));
        for out in queued.into_iter().flatten() {
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
        lp.call_slot(
            |lp| st_mut(lp, self).map(|s| &mut s.on_disconnect),
            |lp, f| f(lp, self),
        );
        let removed = lp.context_mut::<IpcContext>().channels.remove(self.id);
        for (_, h) in removed.into_iter().flat_map(|s| s.backlog) {
            if let Some(h) = h {
                lp.close_if_open(h);
            }
        }
    }

    // ----- receiving -------------------------------------------------------

    fn on_read(self, lp: &mut Loop, r: io::Result<&[u8]>) {
        match r {
            Err(e) => {
                self.emit_error(lp, ChannelError::Io(e));
                self.close_now(lp);
            }
            Ok([]) => {
                if let Some(Err(e)) = st(lp, self).map(|s| s.decoder.finish()) {
                    self.fault(lp, ChannelError::Frame(e));
                }
                self.drop_stray_fds(lp);
                self.close_now(lp);
            }
            Ok(data) => {
                if let Some(s) = st_mut(lp, self) {
                    s.decoder.push(data);
                }
                self.drain_lines(lp);
            }
        }
    }

    fn set_in_read(self, lp: &mut Loop, on: bool) {
        if let Some(s) = st_mut(lp, self) {
            s.in_read = on;
        }
    }

    fn drain_lines(self, lp: &mut Loop) {
        self.set_in_read(lp, true);
        self.drain_lines_inner(lp);
        self.set_in_read(lp, false);
        if st(lp, self).is_some_and(|s| s.state != State::Closed) {
            self.flush_corked(lp);
        }
    }

    /// The next complete line, decoded, or why it could not be (with
    /// whether it claims to carry a handle); `None` when no line is
    /// complete or the channel is closed.
    fn next_line(self, lp: &mut Loop) -> Option<Result<Item, (FrameError, bool)>> {
        let s = st_mut(lp, self).filter(|s| s.state != State::Closed)?;
        let max_depth = s.opts.max_depth;
        let decoder = &mut s.decoder;
        Some(match decoder.next_line()? {
            Ok(ACK_LINE) => Ok(Item::Ack(true)),
            Ok(NACK_LINE) => Ok(Item::Ack(false)),
            // (Not `if let` match guards: those need Rust 1.95, above
            // rust-version.)
            Ok(line) => {
                if let Some(flat) = Flat::reply(line)
                    && let Some(ack) = flat.ack
                    && let Some(Reply::Fields(_)) = s.replies.get(&ack)
                {
                    let Some(Reply::Fields(cb)) = s.replies.remove(&ack) else {
                        unreachable!("just found")
                    };
                    Ok(Item::FlatReply(cb, flat))
                } else if s.on_newconn.is_set()
                    && let Some(nc) = NewConn::parse(line)
                {
                    Ok(Item::NewConn(nc))
                } else {
                    match json::parse(line, max_depth) {
                        Ok(p) => Ok(Item::Line(Line::decoded(line, p))),
                        Err(e) => Err((e, json::claims_node_handle(line))),
                    }
                }
            }
            Err(e) => {
                // An oversized line is reported at once; its fd (if any)
                // came with its first bytes, which are kept.
                let claims = decoder
                    .skipped_prefix()
                    .is_some_and(json::claims_node_handle);
                Err((e, claims))
            }
        })
    }

    fn drain_lines_inner(self, lp: &mut Loop) {
        while let Some(item) = self.next_line(lp) {
            match item {
                Ok(Item::Ack(ok)) => self.on_ack(lp, ok),
                Ok(Item::FlatReply(cb, flat)) => cb(lp, self, Fields::Flat(&flat), None),
                Ok(Item::NewConn(nc)) => self.dispatch_newconn(lp, &nc),
                Ok(Item::Line(line)) => self.dispatch(lp, line),
                Err((e, claims_handle)) => self.bad_line(lp, e, claims_handle),
            }
        }
        match st(lp, self) {
            None => return,
            Some(s) if s.state == State::Closed => return,
            Some(s) if s.decoder.at_boundary() => self.drop_stray_fds(lp),
            Some(_) => {}
        }
        self.maybe_finish_disconnect(lp);
    }

    /// A line that could not be decoded. If it claimed to carry a handle,
    /// the peer (a Node sender queues everything behind a handle until it
    /// is answered) gets the answer a Node receiver would give: ACK when an
    /// fd came, which is then closed, NACK when none did.
    fn bad_line(self, lp: &mut Loop, error: FrameError, claims_handle: bool) {
        if !claims_handle {
            self.fault(lp, ChannelError::Frame(error));
            return;
        }
        // Dropping the fd closes it.
        let had_fd = lp.pipe_take_pending_fd(self.pipe).is_ok();
        self.write_ack(lp, had_fd);
        self.fault(lp, ChannelError::UndecodableHandle { error, had_fd });
    }

    /// Counts a bad line against the peer's budget, reports it if it is
    /// among the first few, and closes the channel once the budget is
    /// spent.
    fn fault(self, lp: &mut Loop, e: ChannelError) {
        self.peer_fault(lp, |lp| self.emit_error(lp, e));
    }

    /// Counts a message from the peer that a layer above found malformed
    /// (a cluster protocol error: a message only the other side may send,
    /// a request without its fields) against the same budget as the lines
    /// this channel cannot decode ([`ChannelOptions::max_bad_lines`]), so
    /// that a peer flooding well-formed nonsense is cut off like one
    /// flooding garbage. `report` runs for the first
    /// [`ChannelOptions::report_bad_lines`] faults only; past the budget the
    /// channel reports [`ChannelError::TooManyBadLines`] and closes. On a
    /// closed channel, `report` runs and nothing is counted.
    pub fn peer_fault(self, lp: &mut Loop, report: impl FnOnce(&mut Loop)) {
        let Some(s) = st_mut(lp, self) else {
            return report(lp);
        };
        s.bad_lines += 1;
        let report_it = s.bad_lines <= s.opts.report_bad_lines;
        if !report_it {
            s.unreported += 1;
        }
        let over = s.bad_lines > s.opts.max_bad_lines;
        if over {
            s.unreported = 0;
        }
        let over = over.then_some((s.bad_lines, s.opts.max_bad_lines));
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
    fn drop_stray_fds(self, lp: &mut Loop) {
        let mut count = 0;
        while lp.pipe_take_pending_fd(self.pipe).is_ok() {
            count += 1;
        }
        if count > 0 {
            self.fault(lp, ChannelError::FdWithoutHandle { count });
        }
    }

    fn dispatch(self, lp: &mut Loop, line: Line) {
        match message::classify(line.value) {
            Incoming::User(v) => {
                let m = RawMessage::received(v, line.exact, line.raw);
                self.emit_user(lp, m, None)
            }
            Incoming::Ack(ok) => self.on_ack(lp, ok),
            Incoming::Internal(v) => self.route_internal(lp, v, None),
            Incoming::Handle { msg, kind } => {
                let pipe = self.pipe;
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

    /// [`dispatch`](Self::dispatch) for a flat `newconn`: the same answers
    /// to the handle protocol, then `on_newconn` (or, if it was cleared
    /// meanwhile, `on_internal` with the message's value).
    fn dispatch_newconn(self, lp: &mut Loop, nc: &NewConn) {
        let pipe = self.pipe;
        if lp.pipe_pending_count(pipe) == 0 {
            self.write_ack(lp, false);
            self.fault(lp, ChannelError::HandleWithoutFd);
            return;
        }
        let h = match lp.pipe_accept_pending(pipe) {
            Ok(h) => h,
            Err(e) => {
                self.write_ack(lp, false);
                self.fault(lp, ChannelError::BadHandle(e));
                return;
            }
        };
        self.write_ack(lp, true);
        let called = lp.call_slot(
            |lp| st_mut(lp, self).map(|s| &mut s.on_newconn),
            |lp, f| f(lp, self, nc.key(), nc.seq(), h),
        );
        if called.is_none() {
            let v = serde_json::json!({
                "cmd": NODE_CLUSTER, "act": "newconn", "key": nc.key(), "seq": nc.seq(),
            });
            self.route_internal(lp, v, Some(h));
        }
    }

    fn route_internal(self, lp: &mut Loop, v: Value, h: Option<Socket>) {
        if message::cmd_of(&v) == Some(NODE_CLUSTER)
            && let Some(ack) = v.get("ack").and_then(Value::as_u64)
            && let Some(cb) = st_mut(lp, self).and_then(|s| s.replies.remove(&ack))
        {
            match cb {
                Reply::Value(cb) => cb(lp, self, v, h),
                Reply::Fields(cb) => cb(lp, self, Fields::Value(&v), h),
            }
            return;
        }
        let mut item = Some((v, h));
        let called = lp.call_slot(
            |lp| st_mut(lp, self).map(|s| &mut s.on_internal),
            |lp, f| {
                let (v, h) = item.take().expect("called once");
                f(lp, self, v, h)
            },
        );
        if called.is_none()
            && let Some((_, Some(h))) = item
        {
            lp.close_if_open(h);
        }
    }

    fn emit_user(self, lp: &mut Loop, m: RawMessage, h: Option<Socket>) {
        // While a backlog waits for its replay, new messages queue behind
        // it so that they cannot overtake it.
        if let Some(s) = st_mut(lp, self)
            && !s.backlog.is_empty()
        {
            s.backlog.push_back((m, h));
            return;
        }
        if let Err(item) = self.deliver_user(lp, m, h)
            && let Some(s) = st_mut(lp, self)
        {
            s.backlog.push_back(item);
        }
    }

    /// Runs the message callback; gives the message back without one.
    fn deliver_user(
        self,
        lp: &mut Loop,
        m: RawMessage,
        h: Option<Socket>,
    ) -> Result<(), (RawMessage, Option<Socket>)> {
        let mut item = Some((m, h));
        let called = lp.call_slot(
            |lp| st_mut(lp, self).map(|s| &mut s.on_message),
            |lp, f| {
                let (m, h) = item.take().expect("called once");
                f(lp, self, m, h)
            },
        );
        match (called, item) {
            (None, Some(item)) => Err(item),
            _ => Ok(()),
        }
    }

    /// Reports a fault to the error callback; without one it is logged.
    /// Nothing is reported for a channel whose state is gone.
    fn emit_error(self, lp: &mut Loop, e: ChannelError) {
        if st(lp, self).is_none() {
            return;
        }
        let mut e = Some(e);
        lp.call_slot(
            |lp| st_mut(lp, self).map(|s| &mut s.on_error),
            |lp, f| f(lp, self, e.take().expect("called once")),
        );
        if let Some(e) = e {
            log::error!("IPC channel: {e}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::uv::RunMode;

    fn channels(lp: &Loop) -> usize {
        lp.context::<IpcContext>().map_or(0, |c| c.channels.len())
    }

    /// The general path's bytes: the map `cluster_message` builds, wrapped
    /// by `wrap_handle` when a handle goes with it, through `frame::encode`.
    fn general(fields: &Map<String, Value>, seq: u64, kind: Option<HandleKind>) -> Vec<u8> {
        let mut msg = Map::new();
        msg.insert("cmd".into(), NODE_CLUSTER.into());
        msg.append(&mut fields.clone());
        msg.insert("seq".into(), seq.into());
        let v = match kind {
            Some(k) => message::wrap_handle(Value::Object(msg), k, Map::new()),
            None => Value::Object(msg),
        };
        frame::encode(&v).unwrap()
    }

    /// Cluster messages written field by field (`encode_cluster`, and the
    /// round-robin handle's pre-encoded `newconn` fields) are byte for byte
    /// what encoding the message's map writes: the wire stays Node's.
    #[test]
    fn cluster_messages_written_field_by_field_match_the_encoded_map() {
        let cases = [
            serde_json::json!({"act": "newconn", "key": "127.0.0.1:8000:4:0:-1"}),
            serde_json::json!({"ack": 7, "accepted": true, "load": 3}),
            serde_json::json!({"act": "queryServer", "port": 0, "addressType": 4,
                "data": null, "n": [1e21, -0.0, 0.5], "s": "é\"\\\u{1}\u{2028}"}),
            serde_json::json!({}),
        ];
        for fields in cases {
            let fields = fields.as_object().unwrap();
            for seq in [0, 9, 10, 12345678901234] {
                for kind in [
                    None,
                    Some(HandleKind::NetNative),
                    Some(HandleKind::DgramNative),
                ] {
                    let direct = encode_cluster(fields, seq, kind).unwrap().unwrap();
                    assert_eq!(
                        String::from_utf8(direct).unwrap(),
                        String::from_utf8(general(fields, seq, kind)).unwrap()
                    );
                }
            }
        }
        // `cmd` or `seq` among the fields take the general path.
        for f in [
            serde_json::json!({"cmd": "x"}),
            serde_json::json!({"a": 1, "seq": 2}),
        ] {
            assert!(encode_cluster(f.as_object().unwrap(), 1, None).is_none());
        }
    }

    /// A pre-encoded `newconn` goes out as the map would have: sent over a
    /// real pipe pair with an fd, the peer reads the same line.
    #[test]
    fn a_pre_encoded_newconn_is_the_wire_line_of_its_map() {
        let mut lp = Loop::new().unwrap();
        let (a, b) = lp.pipe_pair(true).unwrap();
        let a = Channel::open(&mut lp, a, ChannelOptions::default()).unwrap();
        let key = "127.0.0.1:8000:4:0:-1\"\\";
        let mut raw = b"\"act\":\"newconn\",\"key\":".to_vec();
        raw.extend_from_slice(&serde_json::to_vec(key).unwrap());
        let t = lp.tcp_init();
        lp.tcp_bind(
            t,
            "127.0.0.1:0".parse().unwrap(),
            crate::uv::BindFlags::default(),
        )
        .unwrap();
        let attach = Attach {
            handle: t.into(),
            kind: HandleKind::NetNative,
            after_ack: AfterAck::Close,
        };
        let seq = a
            .send_cluster_handle_json(&mut lp, &raw, attach, None, Box::new(|_, _, _| {}))
            .unwrap();
        let got = std::rc::Rc::new(std::cell::RefCell::new(Vec::new()));
        let g = got.clone();
        lp.read_start(b, move |lp, b, r| {
            if let Ok(d) = r {
                g.borrow_mut().extend_from_slice(d);
                if d.ends_with(b"\n") {
                    lp.close_if_open(b);
                }
            }
        })
        .unwrap();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while !got.borrow().ends_with(b"\n") && std::time::Instant::now() < deadline {
            lp.run(RunMode::Once).unwrap();
        }
        let mut fields = Map::new();
        fields.insert("act".into(), "newconn".into());
        fields.insert("key".into(), key.into());
        assert_eq!(
            String::from_utf8(got.borrow().clone()).unwrap(),
            String::from_utf8(general(&fields, seq, Some(HandleKind::NetNative))).unwrap()
        );
        while lp.pipe_take_pending_fd(b).is_ok() {}
        a.disconnect(&mut lp);
    }

    /// A `newconn` line in Node's shape is read as the parser reads it
    /// (key and `seq`), and every other shape is left to the parser.
    #[test]
    fn flat_newconn_lines_read_as_the_parser_reads_them() {
        for key in [
            "127.0.0.1:8000:4:0:-1",
            "::1:0:6:-1",
            "/tmp/a b.sock:-1:-1:-1",
            "",
        ] {
            for seq in [0, 9, 10, 123456789012345] {
                let mut fields = Map::new();
                fields.insert("act".into(), "newconn".into());
                fields.insert("key".into(), key.into());
                let line = general(&fields, seq, Some(HandleKind::NetNative));
                let line = line.strip_suffix(b"\n").unwrap();
                let nc = NewConn::parse(line).expect("flat");
                let v: Value = serde_json::from_slice(line).unwrap();
                assert_eq!(Some(nc.key()), v["msg"]["key"].as_str());
                assert_eq!(Some(nc.seq()), v["msg"]["seq"].as_u64());
            }
        }
        let long = format!(
            r#"{{"cmd":"NODE_HANDLE","type":"net.Native","msg":{{"cmd":"NODE_CLUSTER","act":"newconn","key":"{}","seq":1}}}}"#,
            "k".repeat(NewConn::MAX_KEY + 1)
        );
        let others = [
            &br#"{"cmd":"NODE_HANDLE","type":"net.Native","msg":{"cmd":"NODE_CLUSTER","act":"newconn","key":"a\"b","seq":1}}"#[..],
            br#"{"cmd":"NODE_HANDLE","type":"net.Native","msg":{"cmd":"NODE_CLUSTER","act":"newconn","key":"a\\b","seq":1}}"#,
            "{\"cmd\":\"NODE_HANDLE\",\"type\":\"net.Native\",\"msg\":{\"cmd\":\"NODE_CLUSTER\",\"act\":\"newconn\",\"key\":\"\u{e9}\",\"seq\":1}}".as_bytes(),
            br#"{"cmd":"NODE_HANDLE","type":"net.Native","msg":{"cmd":"NODE_CLUSTER","act":"newconn","key":"k","seq":1e3}}"#,
            br#"{"cmd":"NODE_HANDLE","type":"net.Native","msg":{"cmd":"NODE_CLUSTER","act":"newconn","key":"k","seq":1.0}}"#,
            br#"{"cmd":"NODE_HANDLE","type":"net.Native","msg":{"cmd":"NODE_CLUSTER","act":"newconn","key":"k","seq":01}}"#,
            br#"{"cmd":"NODE_HANDLE","type":"net.Native","msg":{"cmd":"NODE_CLUSTER","act":"newconn","key":"k","seq":-1}}"#,
            br#"{"cmd":"NODE_HANDLE","type":"net.Native","msg":{"cmd":"NODE_CLUSTER","act":"newconn","key":"k","seq":1234567890123456}}"#,
            br#"{"cmd":"NODE_HANDLE","type":"net.Native","msg":{"cmd":"NODE_CLUSTER","act":"newconn","key":"k","seq":""}}"#,
            br#"{"cmd":"NODE_HANDLE","type":"net.Native","msg":{"cmd":"NODE_CLUSTER","act":"newconn","key":"k","x":1,"seq":1}}"#,
            br#"{"cmd":"NODE_HANDLE","type":"net.Native","msg":{"cmd":"NODE_CLUSTER","act":"newconn","key":"k","seq":1},"x":1}"#,
            br#"{"cmd":"NODE_HANDLE","type":"net.Socket","msg":{"cmd":"NODE_CLUSTER","act":"newconn","key":"k","seq":1}}"#,
            br#"{"cmd":"NODE_HANDLE", "type":"net.Native","msg":{"cmd":"NODE_CLUSTER","act":"newconn","key":"k","seq":1}}"#,
            br#"{"cmd":"NODE_HANDLE","type":"net.Native","msg":{"cmd":"NODE_CLUSTER","act":"newconn","key":"k","seq":1 }}"#,
            br#"{"cmd":"NODE_HANDLE","type":"net.Native","msg":{"cmd":"NODE_CLUSTER","act":"newconn","key":"k"}}"#,
            long.as_bytes(),
        ];
        for line in others {
            assert!(
                NewConn::parse(line).is_none(),
                "{}",
                String::from_utf8_lossy(line)
            );
        }
    }

    /// Over a real pipe pair: a `newconn` in Node's shape reaches
    /// `on_newconn` with its key, `seq` and fd and is acknowledged; one in
    /// another shape (an extra field) still reaches `on_internal` as a
    /// value; the answer written by `send_cluster_json` is the line of its
    /// map, byte for byte.
    #[test]
    fn newconn_lines_reach_on_newconn_or_on_internal_and_the_answer_is_the_map_line() {
        use std::cell::RefCell;
        use std::rc::Rc;
        let mut lp = Loop::new().unwrap();
        let (a, b) = lp.pipe_pair(true).unwrap();
        let a = Channel::open(&mut lp, a, ChannelOptions::default()).unwrap();
        let b = Channel::open(&mut lp, b, ChannelOptions::default()).unwrap();
        let typed = Rc::new(RefCell::new(Vec::new()));
        let t2 = typed.clone();
        b.on_newconn(&mut lp, move |lp, ch, key, seq, h| {
            t2.borrow_mut().push((key.to_owned(), seq));
            lp.close_if_open(h);
            let _ = ch.send_cluster_json(lp, format!("\"ack\":{seq},\"accepted\":true").as_bytes());
        });
        let values = Rc::new(RefCell::new(Vec::new()));
        let v2 = values.clone();
        b.on_internal(&mut lp, move |lp, _, v, h| {
            v2.borrow_mut().push((v, h.is_some()));
            if let Some(h) = h {
                lp.close_if_open(h);
            }
        });
        let answers = Rc::new(RefCell::new(Vec::new()));
        let a2 = answers.clone();
        a.on_internal(&mut lp, move |_, _, v, _| a2.borrow_mut().push(v));
        let acks = Rc::new(RefCell::new(Vec::new()));
        let mut seqs = Vec::new();
        for extra in [false, true] {
            let t = lp.tcp_init();
            lp.tcp_bind(
                t,
                "127.0.0.1:0".parse().unwrap(),
                crate::uv::BindFlags::default(),
            )
            .unwrap();
            let attach = Attach {
                handle: t.into(),
                kind: HandleKind::NetNative,
                after_ack: AfterAck::Close,
            };
            let mut fields = Map::new();
            fields.insert("act".into(), "newconn".into());
            fields.insert("key".into(), "127.0.0.1:8000:4:-1".into());
            if extra {
                fields.insert("x".into(), 1.into());
            }
            let k = acks.clone();
            let seq = a
                .send_cluster_handle(
                    &mut lp,
                    fields,
                    attach,
                    None,
                    Box::new(move |_, _, d| {
                        k.borrow_mut().push(matches!(d, HandleDelivery::Acked))
                    }),
                )
                .unwrap();
            seqs.push(seq);
        }
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while (acks.borrow().len() < 2 || answers.borrow().is_empty() || values.borrow().is_empty())
            && std::time::Instant::now() < deadline
        {
            lp.run(RunMode::Once).unwrap();
        }
        assert_eq!(*acks.borrow(), [true, true]);
        assert_eq!(
            *typed.borrow(),
            [("127.0.0.1:8000:4:-1".to_owned(), seqs[0])]
        );
        let values = values.borrow();
        assert_eq!(values.len(), 1);
        assert_eq!(values[0].0["x"], 1);
        assert_eq!(values[0].0["seq"], seqs[1]);
        assert!(values[0].1, "the fd came with the value");
        // The answer, as the map path would have encoded it.
        let answers = answers.borrow();
        let mut fields = Map::new();
        fields.insert("ack".into(), seqs[0].into());
        fields.insert("accepted".into(), true.into());
        let seq = answers[0]["seq"].as_u64().unwrap();
        assert_eq!(
            frame::encode(&answers[0]).unwrap(),
            general(&fields, seq, None)
        );
        a.disconnect(&mut lp);
        b.disconnect(&mut lp);
    }

    /// A reply read from its flat line gives every field as the parsed
    /// value does (truth, integers, the last of a repeated key, `ack`),
    /// and anything not flat is left to the parser.
    #[test]
    fn flat_replies_read_as_their_parsed_values() {
        let flat = [
            &br#"{"cmd":"NODE_CLUSTER","ack":7,"accepted":true,"seq":3}"#[..],
            br#"{"cmd":"NODE_CLUSTER","ack":7,"accepted":false,"load":12,"seq":3}"#,
            br#"{"cmd":"NODE_CLUSTER","ack":0,"accepted":0,"load":0,"seq":0}"#,
            br#"{"cmd":"NODE_CLUSTER","ack":123456789012345,"accepted":"yes","seq":1}"#,
            br#"{"cmd":"NODE_CLUSTER","ack":5,"accepted":"","load":null,"seq":1}"#,
            br#"{"cmd":"NODE_CLUSTER","ack":5,"accepted":true,"accepted":false,"seq":1}"#,
            br#"{"cmd":"NODE_CLUSTER","ack":5,"ack":6,"accepted":1,"seq":1}"#,
            br#"{"cmd":"NODE_CLUSTER","ack":5,"ack":true,"accepted":1,"seq":1}"#,
        ];
        for line in flat {
            let f =
                Flat::reply(line).unwrap_or_else(|| panic!("{}", String::from_utf8_lossy(line)));
            let v = json::parse(line, DEFAULT_MAX_DEPTH).unwrap().value;
            let (a, b) = (Fields::Flat(&f), Fields::Value(&v));
            for name in ["accepted", "load", "ack", "seq", "cmd", "missing"] {
                assert_eq!(a.truthy(name), b.truthy(name), "{name} in {v}");
                assert_eq!(a.as_u64(name), b.as_u64(name), "{name} in {v}");
            }
            assert_eq!(f.ack, v.get("ack").and_then(Value::as_u64), "{v}");
        }
        let not_flat = [
            &br#"{"cmd":"NODE_CLUSTER","ack":7, "accepted":true,"seq":3}"#[..],
            br#"{"cmd":"NODE_CLUSTER","ack":7,"accepted":1.0,"seq":3}"#,
            br#"{"cmd":"NODE_CLUSTER","ack":7,"accepted":-1,"seq":3}"#,
            br#"{"cmd":"NODE_CLUSTER","ack":07,"accepted":true,"seq":3}"#,
            br#"{"cmd":"NODE_CLUSTER","ack":1234567890123456,"accepted":true}"#,
            br#"{"cmd":"NODE_CLUSTER","ack":7,"accepted":{"a":1},"seq":3}"#,
            br#"{"cmd":"NODE_CLUSTER","ack":7,"accepted":"a,b","seq":3}"#,
            br#"{"cmd":"NODE_CLUSTER","ack":7,"accepted":"a\"b","seq":3}"#,
            br#"{"cmd":"NODE_CLUSTER","ack":7,"acc-epted":true,"seq":3}"#,
            br#"{"cmd":"NODE_CLUSTER","ack":7,"accepted":true,}"#,
            br#"{"cmd":"NODE_CLUSTER","ack":7,"accepted":true,"seq":3"#,
            br#"{"cmd":"NODE_CLUSTER","ack":7,"a":1,"b":1,"c":1,"d":1,"e":1,"f":1,"g":1}"#,
            br#"{"cmd":"NODE_CLUSTER","accepted":true,"ack":7}"#,
            br#"{"cmd":"NODE_HANDLE_ACK"}"#,
            br#"{"cmd":"NODE_CLUSTER","ack":7,"accepted":true,"cmd":"x"}"#,
        ];
        for line in not_flat {
            assert!(
                Flat::reply(line).is_none(),
                "{}",
                String::from_utf8_lossy(line)
            );
        }
    }

    /// An ACK recognised by its bytes and one spelt otherwise (spaces,
    /// which only the parser reads) release the next handle alike.
    #[test]
    fn handle_acks_by_their_bytes_and_by_the_parser_alike() {
        for ack in [
            &b"{\"cmd\":\"NODE_HANDLE_ACK\"}\n"[..],
            b"{ \"cmd\" : \"NODE_HANDLE_ACK\" }\n",
        ] {
            let mut lp = Loop::new().unwrap();
            let (a, b) = lp.pipe_pair(true).unwrap();
            let a = Channel::open(&mut lp, a, ChannelOptions::default()).unwrap();
            let acked = std::rc::Rc::new(std::cell::Cell::new(false));
            let t = lp.tcp_init();
            lp.tcp_bind(
                t,
                "127.0.0.1:0".parse().unwrap(),
                crate::uv::BindFlags::default(),
            )
            .unwrap();
            let attach = Attach {
                handle: t.into(),
                kind: HandleKind::NetNative,
                after_ack: AfterAck::Close,
            };
            let ac = acked.clone();
            a.send_cluster_handle(
                &mut lp,
                Map::new(),
                attach,
                None,
                Box::new(move |_, _, d| ac.set(matches!(d, HandleDelivery::Acked))),
            )
            .unwrap();
            lp.write(b, &[ack], |_, _, _| {}).unwrap();
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
            while !acked.get() && std::time::Instant::now() < deadline {
                lp.run(RunMode::NoWait).unwrap();
            }
            assert!(acked.get(), "{}", String::from_utf8_lossy(ack));
            assert!(!lp.is_active(t) || lp.is_closing(t));
        }
    }

    /// The loop owns a channel's state from `open` until its pipe has
    /// closed; the id is then stale, and answers as a closed channel.
    #[test]
    fn a_closed_channels_state_is_dropped_and_its_id_answers_as_closed() {
        let mut lp = Loop::new().unwrap();
        let (a, b) = lp.pipe_pair(true).unwrap();
        let a = Channel::open(&mut lp, a, ChannelOptions::default()).unwrap();
        let b = Channel::open(&mut lp, b, ChannelOptions::default()).unwrap();
        assert_eq!(channels(&lp), 2);
        let disconnects = std::rc::Rc::new(std::cell::Cell::new(0));
        for ch in [a, b] {
            let d = disconnects.clone();
            ch.on_disconnect(&mut lp, move |lp, ch| {
                assert!(!ch.is_connected(lp));
                d.set(d.get() + 1);
            });
        }
        a.set_handles_in_flight(&mut lp, 3);
        a.disconnect(&mut lp);
        lp.run(RunMode::Default).unwrap();
        assert_eq!(disconnects.get(), 2, "each end saw its disconnect once");
        assert_eq!(channels(&lp), 0, "both states dropped with their pipes");
        let e = a.send(&mut lp, &Value::Null, None).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::NotConnected);
        assert!(!a.is_connected(&lp) && !b.is_connected(&lp));
        assert_eq!(a.handles_in_flight(&lp), 1);
    }

    /// The `seq` of cluster messages comes from the loop's counter, shared
    /// by every channel of the loop (Node's one counter per process).
    #[test]
    fn one_seq_counter_per_loop_for_every_channel() {
        let mut lp = Loop::new().unwrap();
        let (a, b) = lp.pipe_pair(true).unwrap();
        let (c, d) = lp.pipe_pair(true).unwrap();
        let mut open = |p| Channel::open(&mut lp, p, ChannelOptions::default()).unwrap();
        let (a, b, c, d) = (open(a), open(b), open(c), open(d));
        let s0 = a.send_cluster(&mut lp, Map::new(), None, None).unwrap();
        let s1 = c.send_cluster(&mut lp, Map::new(), None, None).unwrap();
        let s2 = a.send_cluster(&mut lp, Map::new(), None, None).unwrap();
        assert_eq!((s0, s1, s2), (0, 1, 2));
        for ch in [a, b, c, d] {
            ch.disconnect(&mut lp);
        }
        lp.run(RunMode::Default).unwrap();
        assert_eq!(channels(&lp), 0);
    }
}
