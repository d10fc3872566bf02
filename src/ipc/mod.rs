//! Node's child-process IPC protocol, byte for byte (`json` serialization).
//!
//! * [`frame`](self#framing): newline-delimited JSON ([`encode`], [`Decoder`]),
//!   read and written as JavaScript's `JSON.parse`/`JSON.stringify` do
//!   ([`parse_line`]); [`RawMessage`] keeps the exact text of what a
//!   [`serde_json::Value`] cannot hold (unpaired surrogates).
//! * Messages: internal vs user ([`is_internal`]), the `NODE_HANDLE`
//!   wrapper ([`wrap_handle`], [`HandleKind`]).
//! * [`Channel`]: the channel over an IPC [`Pipe`](crate::uv::Pipe): handle
//!   passing with ACK/NACK and the sender's queue, seq/ack requests
//!   ([`Channel::send_cluster`]), disconnect, and typed errors for bad input
//!   ([`ChannelError`]), with a budget of bad lines per peer.
//!
//! # Framing
//!
//! Every message is `JSON + "\n"`; see [`encode`] and [`Decoder`].

mod channel;
mod fork;
mod frame;
mod json;
mod message;

pub use channel::{
    AfterAck, Attach, Channel, ChannelError, ChannelOptions, DEFAULT_MAX_BAD_LINES,
    DEFAULT_REPORT_BAD_LINES, DeliveryCb, HandleDelivery, MessageCb, NODE_CHANNEL_FD,
    NODE_CHANNEL_SERIALIZATION_MODE, RawMessageCb, ReplyCb, SentCb,
};
pub(crate) use channel::{Fields, FieldsReplyCb};
pub use fork::{ExitCb, ForkOptions, ForkStdio, Forked, fork};
pub use frame::{DEFAULT_MAX_DEPTH, DEFAULT_MAX_MESSAGE, Decoder, FrameError, encode, parse_line};
pub use message::{
    HandleKind, NODE_CLUSTER, NODE_HANDLE, NODE_HANDLE_ACK, NODE_HANDLE_NACK, RawMessage,
    is_internal, wrap_handle,
};
