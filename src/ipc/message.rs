//! The message vocabulary of Node's IPC channel: which messages are internal,
//! the `NODE_HANDLE` wrapper and its handle types
//! (`lib/internal/child_process.js`: `handleConversion`, `isInternal`).

use std::borrow::Cow;

use serde_json::{Map, Value};

use super::frame::{self, DEFAULT_MAX_DEPTH, FrameError};
use super::json;

/// `cmd` of a message that carries a handle.
pub const NODE_HANDLE: &str = "NODE_HANDLE";
/// `cmd` of the receiver's acknowledgement of a handle.
pub const NODE_HANDLE_ACK: &str = "NODE_HANDLE_ACK";
/// `cmd` of the receiver's answer to a `NODE_HANDLE` that came without an fd.
pub const NODE_HANDLE_NACK: &str = "NODE_HANDLE_NACK";
/// `cmd` of every cluster message.
pub const NODE_CLUSTER: &str = "NODE_CLUSTER";

/// Whether Node treats `msg` as internal: an object whose `cmd` is a string
/// longer than 5 characters that starts with `NODE_`. Everything else is a
/// user message.
///
/// # Examples
///
/// ```
/// use serde_json::json;
/// use uvcluster::ipc::is_internal;
///
/// assert!(is_internal(&json!({"cmd": "NODE_FOO"})));
/// assert!(!is_internal(&json!({"cmd": "NODE_"})));
/// assert!(!is_internal(&json!({"cmd": "node_x"})));
/// assert!(!is_internal(&json!("NODE_HANDLE")));
/// ```
pub fn is_internal(msg: &Value) -> bool {
    cmd_of(msg).is_some_and(|c| c.len() > 5 && c.starts_with("NODE_"))
}

pub(crate) fn cmd_of(msg: &Value) -> Option<&str> {
    msg.as_object()?.get("cmd")?.as_str()
}

/// The `type` of a `NODE_HANDLE` wrapper: which JS class the sender used.
/// The receiver builds its handle from the fd itself; the type only tells
/// Node which wrapper object to make.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum HandleKind {
    /// `net.Native`: a raw TCP or pipe handle (what the cluster sends).
    NetNative,
    /// `net.Server`: a listening server.
    NetServer,
    /// `net.Socket`: a connection.
    NetSocket,
    /// `dgram.Native`: a raw UDP handle (what the cluster sends).
    DgramNative,
    /// `dgram.Socket`: a UDP socket object.
    DgramSocket,
}

impl HandleKind {
    /// The wire name (`"net.Native"`, ...).
    pub fn as_str(self) -> &'static str {
        match self {
            HandleKind::NetNative => "net.Native",
            HandleKind::NetServer => "net.Server",
            HandleKind::NetSocket => "net.Socket",
            HandleKind::DgramNative => "dgram.Native",
            HandleKind::DgramSocket => "dgram.Socket",
        }
    }

    /// Parses a wire name.
    pub fn parse(s: &str) -> Option<HandleKind> {
        Some(match s {
            "net.Native" => HandleKind::NetNative,
            "net.Server" => HandleKind::NetServer,
            "net.Socket" => HandleKind::NetSocket,
            "dgram.Native" => HandleKind::DgramNative,
            "dgram.Socket" => HandleKind::DgramSocket,
            _ => return None,
        })
    }
}

/// Builds the wrapper `{"cmd":"NODE_HANDLE","type":T,"msg":msg, ...extra}`.
pub fn wrap_handle(msg: Value, kind: HandleKind, extra: Map<String, Value>) -> Value {
    let mut m = Map::new();
    m.insert("cmd".into(), NODE_HANDLE.into());
    m.insert("type".into(), kind.as_str().into());
    m.insert("msg".into(), msg);
    for (k, v) in extra {
        m.entry(k).or_insert(v);
    }
    Value::Object(m)
}

/// A message with its JSON text: what to use when a value must reach a
/// JavaScript peer exactly as it was written.
///
/// JavaScript strings are UTF-16 and may hold unpaired surrogates
/// (`'a\ud800b'`), which `JSON.stringify` writes as `\ud800` escapes; a
/// number literal may exceed `f64` (`JSON.parse` reads `1e400` as
/// `Infinity`). A [`serde_json::Value`] can hold neither, so the channel
/// reads an unpaired surrogate as U+FFFD and such a number as `null` (what
/// `JSON.stringify(Infinity)` writes) — and keeps the JSON text of every
/// message that needed such a replacement. [`Channel::on_message_raw`]
/// hands out that text with the value; [`Channel::send_raw`] sends it
/// back unchanged, so a message survives a round trip through this
/// process exactly as it would through a Node process.
///
/// [`Channel::on_message_raw`]: super::Channel::on_message_raw
/// [`Channel::send_raw`]: super::Channel::send_raw
///
/// # Examples
///
/// ```
/// use serde_json::json;
/// use uvcluster::ipc::RawMessage;
///
/// let m = RawMessage::parse(br#"{"note":"a\ud800b"}"#).unwrap();
/// assert_eq!(m.value(), &json!({"note": "a\u{FFFD}b"}));
/// assert!(!m.is_exact());
/// assert_eq!(&m.json()[..], br#"{"note":"a\ud800b"}"#);
///
/// let m = RawMessage::from(json!({"n": 1.0}));
/// assert!(m.is_exact());
/// assert_eq!(&m.json()[..], br#"{"n":1}"#);
/// ```
#[derive(Clone, Debug, PartialEq)]
pub struct RawMessage {
    value: Value,
    exact: bool,
    /// The JSON text, when it says more than `value` (or was given).
    json: Option<Box<[u8]>>,
}

impl RawMessage {
    /// A message from its JSON text, read as Node's receiver reads a line
    /// (see [`parse_line`](super::parse_line)). The text is kept as given,
    /// except that newlines, which valid JSON can only hold as whitespace
    /// between tokens, become spaces so that the message fits one line.
    ///
    /// # Errors
    ///
    /// The [`FrameError`] of text that is not one JSON value, or that nests
    /// deeper than [`DEFAULT_MAX_DEPTH`].
    pub fn parse(json: &[u8]) -> Result<RawMessage, FrameError> {
        let p = json::parse(json, DEFAULT_MAX_DEPTH)?;
        let text: Box<[u8]> = json
            .iter()
            .map(|&b| if b == b'\n' { b' ' } else { b })
            .collect();
        Ok(RawMessage {
            value: p.value,
            exact: p.exact,
            json: Some(text),
        })
    }

    /// A received message: its text is kept only when the value lost
    /// something.
    pub(crate) fn received(value: Value, exact: bool, json: Option<Box<[u8]>>) -> RawMessage {
        RawMessage {
            value,
            exact,
            json: if exact { None } else { json },
        }
    }

    /// The value (with U+FFFD for unpaired surrogates and `null` for
    /// numbers beyond `f64`, if the text had any).
    pub fn value(&self) -> &Value {
        &self.value
    }

    /// The value, dropping the text.
    pub fn into_value(self) -> Value {
        self.value
    }

    /// Whether [`value`](Self::value) is exactly what `JSON.parse` makes of
    /// the text (no replacement was needed).
    pub fn is_exact(&self) -> bool {
        self.exact
    }

    /// The message's JSON text, one line without its newline: the text as
    /// received or given when there is one, otherwise the value as
    /// [`encode`](super::encode) writes it.
    pub fn json(&self) -> Cow<'_, [u8]> {
        match &self.json {
            Some(t) => Cow::Borrowed(t),
            None => {
                let mut line = frame::encode(&self.value).expect("a Value always serializes");
                line.pop();
                Cow::Owned(line)
            }
        }
    }
}

impl From<Value> for RawMessage {
    fn from(value: Value) -> RawMessage {
        RawMessage {
            value,
            exact: true,
            json: None,
        }
    }
}

/// What one incoming line is, for the channel.
#[derive(Debug)]
pub(crate) enum Incoming {
    /// A user message.
    User(Value),
    /// `NODE_HANDLE`: the wrapped message, the handle type as sent.
    Handle { msg: Value, kind: String },
    /// `NODE_HANDLE_ACK` or `NODE_HANDLE_NACK` (`false`).
    Ack(bool),
    /// Any other internal message.
    Internal(Value),
}

pub(crate) fn classify(v: Value) -> Incoming {
    if !is_internal(&v) {
        return Incoming::User(v);
    }
    match cmd_of(&v) {
        Some(NODE_HANDLE_ACK) => Incoming::Ack(true),
        Some(NODE_HANDLE_NACK) => Incoming::Ack(false),
        Some(NODE_HANDLE) => {
            let Value::Object(mut m) = v else {
                unreachable!("is_internal implies an object")
            };
            let kind = match m.remove("type") {
                Some(Value::String(s)) => s,
                Some(other) => other.to_string(),
                None => String::new(),
            };
            let msg = m.remove("msg").unwrap_or(Value::Null);
            Incoming::Handle { msg, kind }
        }
        _ => Incoming::Internal(v),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn classify_each_kind() {
        assert!(matches!(
            classify(json!({"cmd":"NODE_HANDLE_ACK"})),
            Incoming::Ack(true)
        ));
        assert!(matches!(
            classify(json!({"cmd":"NODE_HANDLE_NACK"})),
            Incoming::Ack(false)
        ));
        assert!(matches!(classify(json!([1, 2])), Incoming::User(_)));
        assert!(matches!(
            classify(json!({"cmd":"NODE_CLUSTER","act":"online"})),
            Incoming::Internal(_)
        ));
        match classify(json!({"cmd":"NODE_HANDLE","type":"net.Native","msg":{"act":"newconn"}})) {
            Incoming::Handle { msg, kind } => {
                assert_eq!(kind, "net.Native");
                assert_eq!(msg, json!({"act":"newconn"}));
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn wrap_keeps_node_shape() {
        let w = wrap_handle(json!({"kind":"socket"}), HandleKind::NetSocket, Map::new());
        assert_eq!(
            w,
            json!({"cmd":"NODE_HANDLE","type":"net.Socket","msg":{"kind":"socket"}})
        );
        for k in [
            HandleKind::NetNative,
            HandleKind::NetServer,
            HandleKind::NetSocket,
            HandleKind::DgramNative,
            HandleKind::DgramSocket,
        ] {
            assert_eq!(HandleKind::parse(k.as_str()), Some(k));
        }
    }
}
