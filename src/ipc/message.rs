//! The message vocabulary of Node's IPC channel: which messages are internal,
//! the `NODE_HANDLE` wrapper and its handle types
//! (`lib/internal/child_process.js`: `handleConversion`, `isInternal`).

use serde_json::{Map, Value};

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
