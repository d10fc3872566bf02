//! Node's child-process IPC protocol, byte for byte (`json` serialization).
//!
//! * [`frame`](self#framing): newline-delimited JSON ([`encode`], [`Decoder`]).
//! * Messages: internal vs user ([`is_internal`]), the `NODE_HANDLE`
//!   wrapper ([`wrap_handle`], [`HandleKind`]).
//! * [`Channel`]: the channel over an IPC [`Pipe`](crate::uv::Pipe): handle
//!   passing with ACK/NACK and the sender's queue, seq/ack requests
//!   ([`Channel::send_cluster`]), disconnect, and typed errors for bad input
//!   ([`ChannelError`]).
//!
//! # Framing
//!
//! Every message is `JSON + "\n"`; see [`encode`] and [`Decoder`].

mod channel;
mod fork;
mod frame;
mod message;

pub use channel::{
    AfterAck, Attach, Channel, ChannelError, ChannelOptions, DeliveryCb, HandleDelivery, MessageCb,
    NODE_CHANNEL_FD, NODE_CHANNEL_SERIALIZATION_MODE, ReplyCb, SendHandle, SentCb, close_accepted,
};
pub use fork::{ExitCb, ForkOptions, ForkStdio, Forked, fork};
pub use frame::{DEFAULT_MAX_MESSAGE, Decoder, FrameError, encode, parse_line};
pub use message::{
    HandleKind, NODE_CLUSTER, NODE_HANDLE, NODE_HANDLE_ACK, NODE_HANDLE_NACK, is_internal,
    wrap_handle,
};
