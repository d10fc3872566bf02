//! The `NODE_CLUSTER` message vocabulary (`lib/internal/cluster/*.js`), as
//! typed values: the only place where cluster messages touch JSON.
//!
//! A message arrives as a JSON value from the channel and is parsed once,
//! here, into an [`Act`] (a `#[serde(tag = "act")]` enum of every message
//! Node 20's primary and workers exchange, plus our `load`), and replies
//! into [`QueryReply`] and [`AcceptReply`]. Going out, each typed value
//! gives the fields the channel sends ([`Act::to_fields`],
//! [`QueryReply::to_fields`], ...); the channel adds `cmd` and `seq`.
//!
//! Parsing follows Node's loose rules where Node is loose: a port may be a
//! number or a string of digits, missing fields take the value Node would
//! see (`undefined`), `accepted` and `readableAll` are read for their
//! JavaScript truth, `backlog` may be `false`. A message with no `act`, or
//! one Node does not know, is [`Parsed::Ignored`], as Node ignores it; a
//! known act whose fields do not parse is a [`ProtocolError`]. An errno is
//! an [`Errno`] and becomes Node's negative number only on the wire.
//!
//! | act | direction | Node | here |
//! | --- | --- | --- | --- |
//! | `online` | W→P | `child.js` `_setupWorker` | [`Act::Online`] |
//! | `queryServer` | W→P, answered | `child.js` `_getServer` → `primary.js` `queryServer` | [`Act::QueryServer`] → [`QueryReply`] |
//! | `listening` | W→P | `child.js` `_getServer` | [`Act::Listening`] |
//! | `close` | W→P | `child.js` `shared`/`rr` `close` | [`Act::Close`] |
//! | `exitedAfterDisconnect` | W→P, answered | `child.js` `_disconnect`, `destroy` | [`Act::ExitedAfterDisconnect`] → [`Ack`] |
//! | `newconn` | P→W with a handle, answered | `round_robin_handle.js` `handoff` → `child.js` `onconnection` | [`Act::NewConn`] → [`AcceptReply`] |
//! | `disconnect` | P→W | `primary.js` `Worker.prototype.disconnect` | [`Act::Disconnect`] |
//! | `load` | W→P, beyond Node | — | [`Act::Load`] |

use std::fmt;
use std::net::{IpAddr, SocketAddr};

use serde::de::{self, Deserializer};
use serde::ser::{SerializeMap, Serializer};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::ipc::NODE_CLUSTER;
use crate::uv::Errno;

/// A cluster message, by its `act` (the fields besides `cmd`, `seq` and
/// `ack`, which the channel handles).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "act")]
pub enum Act {
    /// W→P: the worker is up.
    #[serde(rename = "online")]
    Online,
    /// W→P: a server in the worker wants to listen (answered with a
    /// [`QueryReply`]).
    #[serde(rename = "queryServer")]
    QueryServer(Query),
    /// W→P: that server is listening (`port` is the real one).
    #[serde(rename = "listening")]
    Listening(Query),
    /// W→P: the worker closed its server with this key.
    #[serde(rename = "close")]
    Close {
        /// The key from the [`QueryReply`].
        #[serde(deserialize_with = "js_string_field")]
        key: String,
    },
    /// W→P: the worker is disconnecting on its own (answered with an
    /// [`Ack`]).
    #[serde(rename = "exitedAfterDisconnect")]
    ExitedAfterDisconnect,
    /// P→W: a connection for the round-robin server `key` (comes with a
    /// handle; answered with an [`AcceptReply`]).
    #[serde(rename = "newconn")]
    NewConn {
        /// The server's key.
        #[serde(deserialize_with = "js_string_field")]
        key: String,
    },
    /// P→W: disconnect.
    #[serde(rename = "disconnect")]
    Disconnect,
    /// W→P, beyond Node: the worker's open connections on a round-robin
    /// server, sent when connections end (Node primaries ignore unknown
    /// acts). Accept replies carry the same number as `load`.
    #[serde(rename = "load")]
    Load {
        /// The server's key.
        #[serde(deserialize_with = "js_string_field")]
        key: String,
        /// Open connections.
        load: u64,
    },
}

/// Which [`Act`] a message is, without its fields: what a malformed
/// message is reported as.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum ActKind {
    /// `online`.
    #[serde(rename = "online")]
    Online,
    /// `queryServer`.
    #[serde(rename = "queryServer")]
    QueryServer,
    /// `listening`.
    #[serde(rename = "listening")]
    Listening,
    /// `close`.
    #[serde(rename = "close")]
    Close,
    /// `exitedAfterDisconnect`.
    #[serde(rename = "exitedAfterDisconnect")]
    ExitedAfterDisconnect,
    /// `newconn`.
    #[serde(rename = "newconn")]
    NewConn,
    /// `disconnect`.
    #[serde(rename = "disconnect")]
    Disconnect,
    /// `load`.
    #[serde(rename = "load")]
    Load,
    /// An act not in the vocabulary.
    #[serde(other)]
    Other,
}

impl ActKind {
    /// Whether Node's primary handles this act (`primary.js`'s
    /// `methodMessageMapping`): a malformed one is worth reporting, where
    /// Node's primary ignores everything else.
    pub fn node_primary_handles(self) -> bool {
        matches!(
            self,
            ActKind::Online
                | ActKind::QueryServer
                | ActKind::Listening
                | ActKind::Close
                | ActKind::ExitedAfterDisconnect
        )
    }
}

impl fmt::Display for ActKind {
    /// The act as the wire spells it (`queryServer`).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (self, to_value(self)) {
            (ActKind::Other, _) => f.write_str("(unknown act)"),
            (_, Value::String(name)) => f.write_str(&name),
            (_, other) => unreachable!("a unit variant serializes as a string, not {other}"),
        }
    }
}

impl Act {
    /// Which act this is.
    pub fn kind(&self) -> ActKind {
        match self {
            Act::Online => ActKind::Online,
            Act::QueryServer(_) => ActKind::QueryServer,
            Act::Listening(_) => ActKind::Listening,
            Act::Close { .. } => ActKind::Close,
            Act::ExitedAfterDisconnect => ActKind::ExitedAfterDisconnect,
            Act::NewConn { .. } => ActKind::NewConn,
            Act::Disconnect => ActKind::Disconnect,
            Act::Load { .. } => ActKind::Load,
        }
    }

    /// The message's fields, for [`Channel::send_cluster`](crate::ipc::Channel::send_cluster)
    /// (which adds `cmd` and `seq`).
    pub fn to_fields(&self) -> Map<String, Value> {
        to_map(self)
    }
}

/// A cluster message as received: its act and its `seq` (what a reply
/// names in `ack`).
#[derive(Clone, Debug, PartialEq)]
pub struct Received {
    /// The message.
    pub act: Act,
    /// Its sequence number, if it had one.
    pub seq: Option<u64>,
}

/// What [`parse`] makes of an internal message.
#[derive(Clone, Debug, PartialEq)]
pub enum Parsed {
    /// A message of the vocabulary.
    Message(Received),
    /// A known act whose fields do not parse.
    Malformed(Malformed),
    /// Not a cluster message (another `NODE_` protocol), or one with no
    /// `act` or an act Node does not know: ignored, as Node ignores it.
    Ignored,
}

/// A message of the vocabulary that does not parse.
#[derive(Clone, Debug, PartialEq)]
pub struct Malformed {
    /// Which act it claimed to be.
    pub kind: ActKind,
    /// Its `seq`, so that a request can still be answered.
    pub seq: Option<u64>,
    /// For `queryServer`: Node's key for the fields as sent, what the
    /// (failed) reply names.
    pub key: String,
    /// The error.
    pub error: ProtocolError,
}

/// Parses an internal message (`cmd` starts with `NODE_`) once: a
/// `NODE_CLUSTER` message of Node's vocabulary, a malformed one, or one to
/// ignore.
pub fn parse(msg: &Value) -> Parsed {
    let Some(m) = msg.as_object() else {
        return Parsed::Ignored;
    };
    if m.get("cmd").and_then(Value::as_str) != Some(NODE_CLUSTER) {
        return Parsed::Ignored; // Another internal protocol (NODE_DEBUG_ENABLED, ...).
    }
    let kind = match m.get("act").map(ActKind::deserialize) {
        Some(Ok(ActKind::Other)) | Some(Err(_)) | None => return Parsed::Ignored,
        Some(Ok(kind)) => kind,
    };
    let seq = m.get("seq").and_then(Value::as_u64);
    // Every connection's message, read without serde's buffering of a
    // tagged enum: the same `Act` as below for a string key.
    if kind == ActKind::NewConn
        && let Some(Value::String(key)) = m.get("key")
    {
        let act = Act::NewConn { key: key.clone() };
        return Parsed::Message(Received { act, seq });
    }
    match Act::deserialize(msg) {
        Ok(act) => Parsed::Message(Received { act, seq }),
        Err(e) => Parsed::Malformed(Malformed {
            kind,
            seq,
            key: raw_key(m),
            error: ProtocolError::Malformed {
                kind,
                reason: e.to_string(),
                message: msg.to_string(),
            },
        }),
    }
}

/// A cluster message that breaks the protocol: what the primary reports
/// through its `error` event (as `ClusterError::Protocol`) and what a
/// worker's `listen` fails with (`EPROTO`).
#[derive(Clone, Debug, PartialEq)]
pub enum ProtocolError {
    /// A known act whose fields do not parse.
    Malformed {
        /// The act.
        kind: ActKind,
        /// What is wrong.
        reason: String,
        /// The message, as JSON text.
        message: String,
    },
    /// A `queryServer` whose fields parse but ask for something no socket
    /// can be made for.
    BadQuery {
        /// The server's key.
        key: String,
        /// What is wrong.
        reason: &'static str,
    },
    /// A `queryServer` for a server the worker already has.
    AlreadyAdded {
        /// The server's key.
        key: String,
    },
    /// A request that needs an answer came without a `seq` to answer.
    NoSeq {
        /// The act.
        kind: ActKind,
    },
    /// A message only a primary sends came from a worker.
    FromPrimaryOnly {
        /// The act.
        kind: ActKind,
    },
    /// A handle came with a message that takes none.
    UnexpectedHandle {
        /// The message, as JSON text.
        message: String,
    },
    /// A reply that does not parse.
    BadReply {
        /// What is wrong.
        reason: String,
    },
}

impl fmt::Display for ProtocolError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ProtocolError::Malformed {
                kind,
                reason,
                message,
            } => write!(f, "malformed {kind} message ({reason}): {message}"),
            ProtocolError::BadQuery { key, reason } => write!(f, "queryServer {key}: {reason}"),
            ProtocolError::AlreadyAdded { key } => {
                write!(f, "queryServer {key}: already added")
            }
            ProtocolError::NoSeq { kind } => write!(f, "{kind} without seq"),
            ProtocolError::FromPrimaryOnly { kind } => {
                write!(f, "primary-to-worker message from a worker: {kind}")
            }
            ProtocolError::UnexpectedHandle { message } => {
                write!(f, "unexpected handle with {message}")
            }
            ProtocolError::BadReply { reason } => write!(f, "malformed reply: {reason}"),
        }
    }
}

impl std::error::Error for ProtocolError {}

/// The fields of `queryServer` and `listening` (Node's `serverQuery`,
/// `net.js` `listenInCluster`, sent by `child.js` `_getServer`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Query {
    /// Per-worker index of this server among those on the same address.
    #[serde(default, deserialize_with = "index_field")]
    pub index: u64,
    /// Server data (TLS ticket keys); `null` otherwise. Opaque: stored by
    /// the primary and echoed in every reply.
    #[serde(default)]
    pub data: Value,
    /// The address: an IP, a Unix socket path, or `None` (`null`: any).
    #[serde(default)]
    pub address: Option<String>,
    /// The port; `-1` for Unix sockets, `None` (`null`) with `fd`. Read as
    /// a number or a string of digits.
    #[serde(default, deserialize_with = "port_field")]
    pub port: Option<i64>,
    /// What kind of socket.
    #[serde(default)]
    pub address_type: AddressType,
    /// An fd of the primary to listen on (`listen({fd})`), or `-1` for
    /// dgram; absent otherwise.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "int_field"
    )]
    pub fd: Option<i64>,
    /// Bind flags: libuv's `UV_TCP_IPV6ONLY` (1) for TCP; for UDP
    /// `UV_UDP_IPV6ONLY` (1) and `UV_UDP_REUSEADDR` (4).
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "flags_field"
    )]
    pub flags: Option<u32>,
    /// The listen backlog: a number, or absent (`false` reads as absent).
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "backlog_field"
    )]
    pub backlog: Option<i32>,
    /// Unix sockets: make the path readable by all (read for its truth).
    #[serde(
        default,
        skip_serializing_if = "is_false",
        deserialize_with = "truthy_field"
    )]
    pub readable_all: bool,
    /// Unix sockets: make the path writable by all (read for its truth).
    #[serde(
        default,
        skip_serializing_if = "is_false",
        deserialize_with = "truthy_field"
    )]
    pub writable_all: bool,
}

/// What a server's address type says about the socket to make
/// (`addressType`: `4`, `6`, `-1`, `"udp4"`, `"udp6"` or `null`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum AddressType {
    /// TCP over IPv4 (`4`).
    Tcp4,
    /// TCP over IPv6 (`6`).
    Tcp6,
    /// A Unix stream socket (`-1`).
    Unix,
    /// UDP over IPv4 (`"udp4"`).
    Udp4,
    /// UDP over IPv6 (`"udp6"`).
    Udp6,
    /// Given by fd (`null`, or absent).
    #[default]
    Fd,
}

impl AddressType {
    /// Whether this is a datagram socket (always a shared handle).
    pub fn is_udp(self) -> bool {
        matches!(self, AddressType::Udp4 | AddressType::Udp6)
    }

    /// Whether this is a TCP socket.
    pub fn is_tcp(self) -> bool {
        matches!(self, AddressType::Tcp4 | AddressType::Tcp6)
    }

    /// JavaScript's `String(addressType)`: `"4"`, `"udp4"`, `"null"`.
    fn js_string(self) -> &'static str {
        match self {
            AddressType::Tcp4 => "4",
            AddressType::Tcp6 => "6",
            AddressType::Unix => "-1",
            AddressType::Udp4 => "udp4",
            AddressType::Udp6 => "udp6",
            AddressType::Fd => "null",
        }
    }
}

impl Serialize for AddressType {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            AddressType::Tcp4 => s.serialize_i64(4),
            AddressType::Tcp6 => s.serialize_i64(6),
            AddressType::Unix => s.serialize_i64(-1),
            AddressType::Udp4 => s.serialize_str("udp4"),
            AddressType::Udp6 => s.serialize_str("udp6"),
            AddressType::Fd => s.serialize_unit(),
        }
    }
}

impl<'de> Deserialize<'de> for AddressType {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<AddressType, D::Error> {
        let v = Value::deserialize(d)?;
        match &v {
            Value::Null => Some(AddressType::Fd),
            Value::Number(_) => match as_integer(&v) {
                Some(4) => Some(AddressType::Tcp4),
                Some(6) => Some(AddressType::Tcp6),
                Some(-1) => Some(AddressType::Unix),
                _ => None,
            },
            Value::String(s) if s == "udp4" => Some(AddressType::Udp4),
            Value::String(s) if s == "udp6" => Some(AddressType::Udp6),
            _ => None,
        }
        .ok_or_else(|| de::Error::custom(format!("bad addressType {v}")))
    }
}

impl Query {
    /// The backlog to listen with: Node's `backlog || 511`.
    pub fn backlog(&self) -> i32 {
        match self.backlog {
            Some(n) if n > 0 => n,
            _ => 511,
        }
    }

    /// The fd of a `listen({fd})` / `bind({fd})` query: a number ≥ 0.
    pub fn listen_fd(&self) -> Option<i32> {
        self.fd
            .filter(|&fd| fd >= 0)
            .and_then(|fd| i32::try_from(fd).ok())
    }

    /// The port of a TCP or UDP query, if it is a valid one.
    pub fn inet_port(&self) -> Option<u16> {
        self.port.and_then(|p| u16::try_from(p).ok())
    }

    /// The bind flags, `0` when absent.
    pub fn flags(&self) -> u32 {
        self.flags.unwrap_or(0)
    }

    /// The primary's key for this server (`primary.js` `queryServer`):
    /// `${address}:${port}:${addressType}:${fd}:${index}` with JavaScript's
    /// string conversion, so a null address prints `null` and an absent
    /// fd `undefined`. Opaque: it may contain colons (IPv6).
    pub fn key(&self) -> String {
        format!(
            "{}:{}:{}:{}:{}",
            self.address.as_deref().unwrap_or("null"),
            self.port
                .map_or_else(|| "null".to_owned(), |p| p.to_string()),
            self.address_type.js_string(),
            self.fd
                .map_or_else(|| "undefined".to_owned(), |f| f.to_string()),
            self.index
        )
    }

    /// The worker's key for the servers on one address, among which
    /// `index` counts (`child.js` `indexesKey`: `[address, port,
    /// addressType, fd].join(':')`, where `null` and `undefined` join as
    /// empty strings).
    pub fn indexes_key(&self) -> String {
        let address_type = match self.address_type {
            AddressType::Fd => "",
            t => t.js_string(),
        };
        format!(
            "{}:{}:{}:{}",
            self.address.as_deref().unwrap_or(""),
            self.port.map(|p| p.to_string()).unwrap_or_default(),
            address_type,
            self.fd.map(|f| f.to_string()).unwrap_or_default(),
        )
    }
}

/// A TCP server's address as Node's `getsockname` reports it, in a
/// round-robin [`QueryReply`] (`{address, family, port}`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Sockname(pub SocketAddr);

impl Serialize for Sockname {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let a = self.0;
        let mut m = s.serialize_map(Some(3))?;
        m.serialize_entry("address", &a.ip().to_string())?;
        m.serialize_entry("family", if a.is_ipv4() { "IPv4" } else { "IPv6" })?;
        m.serialize_entry("port", &a.port())?;
        m.end()
    }
}

impl<'de> Deserialize<'de> for Sockname {
    /// `address` and `port`; `family` (a string, or a number before
    /// Node 18.4) is implied by the address. A scope (`fe80::1%lo`) is
    /// dropped.
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Sockname, D::Error> {
        #[derive(Deserialize)]
        struct Wire {
            address: String,
            port: u16,
        }
        let w = Wire::deserialize(d)?;
        let ip = w.address.split('%').next().unwrap_or_default();
        let ip: IpAddr = ip
            .parse()
            .map_err(|_| de::Error::custom(format!("bad sockname address {:?}", w.address)))?;
        Ok(Sockname(SocketAddr::new(ip, w.port)))
    }
}

/// How the worker is to listen, when the primary grants a `queryServer`.
#[derive(Clone, Debug, PartialEq)]
pub enum Grant {
    /// Round-robin: the primary listens and hands connections over as
    /// `newconn` (Node's reply has `errno: null`).
    RoundRobin {
        /// The listener's address (TCP only).
        sockname: Option<Sockname>,
        /// Beyond Node: the primary wants the worker's connection counts
        /// (`loadReports: true`; Node workers ignore it).
        load_reports: bool,
    },
    /// A bound socket comes with the reply; the worker listens on it
    /// (Node's reply has `errno: 0`).
    Shared,
}

/// The primary's reply to `queryServer` (`primary.js`: `{errno, key, ack,
/// data, ...reply}`).
#[derive(Clone, Debug, PartialEq)]
pub struct QueryReply {
    /// How to listen, or the errno (negative on the wire).
    pub result: Result<Grant, Errno>,
    /// The server's key: what the worker's `close` names.
    pub key: String,
    /// The stored server data.
    pub data: Value,
}

impl QueryReply {
    /// The reply's fields, `ack` the request's `seq`.
    pub fn to_fields(&self, ack: u64) -> Map<String, Value> {
        let mut m = Map::new();
        let errno = match &self.result {
            Ok(Grant::RoundRobin { .. }) => Value::Null,
            Ok(Grant::Shared) => 0.into(),
            Err(e) => e.to_wire().into(),
        };
        m.insert("errno".into(), errno);
        m.insert("key".into(), self.key.clone().into());
        m.insert("ack".into(), ack.into());
        m.insert("data".into(), self.data.clone());
        if let Ok(Grant::RoundRobin {
            sockname,
            load_reports,
        }) = &self.result
        {
            if let Some(s) = sockname {
                m.insert("sockname".into(), to_value(s));
            }
            if *load_reports {
                m.insert("loadReports".into(), true.into());
            }
        }
        m
    }

    /// Parses a reply that came `with_handle` or without one: with a
    /// handle it grants a shared socket, without one round-robin
    /// (`child.js`); a negative `errno` fails either way, and `null`, `0`
    /// or no `errno` is success.
    ///
    /// # Errors
    ///
    /// [`ProtocolError::BadReply`] for a reply without a key, with an
    /// `errno` that is not Node's negative number, or a bad `sockname`.
    pub fn from_wire(msg: &Value, with_handle: bool) -> Result<QueryReply, ProtocolError> {
        #[derive(Deserialize)]
        #[serde(rename_all = "camelCase")]
        struct Wire {
            #[serde(default)]
            errno: Option<Value>,
            #[serde(deserialize_with = "js_string_field")]
            key: String,
            #[serde(default)]
            data: Value,
            #[serde(default)]
            sockname: Option<Sockname>,
            #[serde(default)]
            load_reports: Option<Value>,
        }
        let bad = |reason: String| ProtocolError::BadReply { reason };
        let w = Wire::deserialize(msg).map_err(|e| bad(e.to_string()))?;
        let failed = match &w.errno {
            None | Some(Value::Null) => None,
            Some(v) => match as_integer(v) {
                Some(0) => None,
                Some(n) => Some(Errno::from_wire(n).ok_or_else(|| bad(format!("errno {n}")))?),
                None => return Err(bad(format!("errno {v}"))),
            },
        };
        let result = match failed {
            Some(e) => Err(e),
            None if with_handle => Ok(Grant::Shared),
            None => Ok(Grant::RoundRobin {
                sockname: w.sockname,
                load_reports: w.load_reports == Some(Value::Bool(true)),
            }),
        };
        Ok(QueryReply {
            result,
            key: w.key,
            data: w.data,
        })
    }
}

/// A worker's answer to `newconn` (`child.js` `onconnection`: `{ack,
/// accepted}`), with our `load`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AcceptReply {
    /// The worker took the connection (`false`: its server is closed or
    /// full, and the primary hands the connection to another worker).
    pub accepted: bool,
    /// Beyond Node: the worker's open connections on that server, once
    /// this one is counted (sent when the primary asked for load
    /// reports).
    pub load: Option<u64>,
}

impl AcceptReply {
    /// The reply's fields; `ack` is the `newconn`'s `seq` (`null` when it
    /// had none, which no primary sends).
    pub fn to_fields(&self, ack: Option<u64>) -> Map<String, Value> {
        let mut m = Map::new();
        m.insert("ack".into(), ack.map_or(Value::Null, Value::from));
        m.insert("accepted".into(), self.accepted.into());
        if let Some(load) = self.load {
            m.insert("load".into(), load.into());
        }
        m
    }

    /// The reply's fields as JSON members, `"ack":<n>,"accepted":<b>`
    /// and `,"load":<n>` when there is one: the bytes of
    /// [`to_fields`](Self::to_fields)' map, written into `buf` without
    /// building it. Returns the length written.
    pub(crate) fn write_fields(&self, ack: Option<u64>, buf: &mut [u8; 96]) -> usize {
        use std::io::Write;
        let mut w = &mut buf[..];
        let total = w.len();
        // 96 bytes hold the longest reply (two 20-digit numbers): the
        // writes cannot fail.
        let _ = match ack {
            Some(n) => write!(w, "\"ack\":{n}"),
            None => w.write_all(b"\"ack\":null"),
        };
        let _ = w.write_all(if self.accepted {
            b",\"accepted\":true"
        } else {
            b",\"accepted\":false"
        });
        if let Some(load) = self.load {
            let _ = write!(w, ",\"load\":{load}");
        }
        total - w.len()
    }

    /// Reads an answer as Node's round-robin handle does
    /// (`if (reply.accepted)`): `accepted` for its truth; `load` when it
    /// is a count.
    pub fn from_wire(msg: &Value) -> AcceptReply {
        AcceptReply {
            accepted: msg.get("accepted").is_some_and(truthy),
            load: msg.get("load").and_then(Value::as_u64),
        }
    }

    /// [`from_wire`](Self::from_wire), from the fields the channel read
    /// without building a value (the round-robin handle's hot path).
    pub(crate) fn from_fields(f: &crate::ipc::Fields<'_>) -> AcceptReply {
        AcceptReply {
            accepted: f.truthy("accepted"),
            load: f.as_u64("load"),
        }
    }
}

/// An answer with nothing in it but `ack` (`primary.js`
/// `exitedAfterDisconnect`: `{ack: message.seq}`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ack;

impl Ack {
    /// The reply's fields.
    pub fn to_fields(self, ack: u64) -> Map<String, Value> {
        let mut m = Map::new();
        m.insert("ack".into(), ack.into());
        m
    }
}

/// JavaScript's truth of a JSON value (`!!value`).
pub fn truthy(v: &Value) -> bool {
    match v {
        Value::Null => false,
        Value::Bool(b) => *b,
        Value::Number(n) => n.as_f64().is_some_and(|f| f != 0.0 && !f.is_nan()),
        Value::String(s) => !s.is_empty(),
        Value::Array(_) | Value::Object(_) => true,
    }
}

// ----- the wire's loose fields ---------------------------------------------

fn to_value<T: Serialize>(v: &T) -> Value {
    // Nothing here serializes a map with non-string keys, the one way
    // serde_json's `to_value` can fail.
    serde_json::to_value(v).expect("a cluster message serializes")
}

fn to_map<T: Serialize>(v: &T) -> Map<String, Value> {
    match to_value(v) {
        Value::Object(m) => m,
        other => unreachable!("a cluster message is an object, not {other}"),
    }
}

fn is_false(b: &bool) -> bool {
    !*b
}

/// An integer, written as one or as a float with no fraction (`8000.0`).
fn as_integer(v: &Value) -> Option<i64> {
    let n = v.as_number()?;
    n.as_i64().or_else(|| {
        n.as_f64()
            .filter(|f| f.fract() == 0.0 && f.abs() < 9.0e15)
            .map(|f| f as i64)
    })
}

/// JavaScript's `String(value)` for JSON values, `undefined` for `None`.
fn js_string(v: Option<&Value>) -> String {
    match v {
        None => "undefined".into(),
        Some(Value::Null) => "null".into(),
        Some(Value::String(s)) => s.clone(),
        Some(Value::Bool(b)) => b.to_string(),
        Some(Value::Number(n)) => match (n.as_i64(), n.as_f64()) {
            (Some(i), _) => i.to_string(),
            (None, Some(f)) if f.fract() == 0.0 && f.abs() < 1e21 => format!("{f:.0}"),
            _ => n.to_string(),
        },
        Some(other) => other.to_string(),
    }
}

/// Node's key over the fields as sent, for a query that does not parse.
fn raw_key(m: &Map<String, Value>) -> String {
    format!(
        "{}:{}:{}:{}:{}",
        js_string(m.get("address")),
        js_string(m.get("port")),
        js_string(m.get("addressType")),
        js_string(m.get("fd")),
        js_string(m.get("index"))
    )
}

/// A key, as JavaScript would print it: a string, or a number.
fn js_string_field<'de, D: Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    match Value::deserialize(d)? {
        Value::String(s) => Ok(s),
        v @ Value::Number(_) => Ok(js_string(Some(&v))),
        v => Err(de::Error::custom(format!("bad key {v}"))),
    }
}

/// `index`: a count; `null` reads as 0.
fn index_field<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
    match Value::deserialize(d)? {
        Value::Null => Ok(0),
        v => v
            .as_u64()
            .ok_or_else(|| de::Error::custom(format!("bad index {v}"))),
    }
}

/// A port: an integer, or a string of decimal digits (Node binds what
/// `Int32Value` makes of either); `null` is none.
fn port_field<'de, D: Deserializer<'de>>(d: D) -> Result<Option<i64>, D::Error> {
    let v = Value::deserialize(d)?;
    let port = match &v {
        Value::Null => return Ok(None),
        Value::Number(_) => as_integer(&v),
        Value::String(s) => {
            let t = s.trim();
            let digits = t.strip_prefix('-').unwrap_or(t);
            let decimal = !digits.is_empty()
                && digits.len() <= 10
                && digits.bytes().all(|b| b.is_ascii_digit());
            decimal.then(|| t.parse().ok()).flatten()
        }
        _ => None,
    };
    port.map(Some)
        .ok_or_else(|| de::Error::custom(format!("bad port {v}")))
}

/// An integer or `null`.
fn int_field<'de, D: Deserializer<'de>>(d: D) -> Result<Option<i64>, D::Error> {
    let v = Value::deserialize(d)?;
    match &v {
        Value::Null => Ok(None),
        _ => as_integer(&v)
            .map(Some)
            .ok_or_else(|| de::Error::custom(format!("bad number {v}"))),
    }
}

/// Bind flags: a non-negative integer or `null`.
fn flags_field<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u32>, D::Error> {
    let v = Value::deserialize(d)?;
    match &v {
        Value::Null => Ok(None),
        _ => as_integer(&v)
            .and_then(|n| u32::try_from(n).ok())
            .map(Some)
            .ok_or_else(|| de::Error::custom(format!("bad flags {v}"))),
    }
}

/// A backlog: an integer (clamped to `i32`), or `false`/`null` for none.
fn backlog_field<'de, D: Deserializer<'de>>(d: D) -> Result<Option<i32>, D::Error> {
    let v = Value::deserialize(d)?;
    match &v {
        Value::Null | Value::Bool(false) => Ok(None),
        Value::Number(n) => {
            let f = n.as_f64().unwrap_or(0.0);
            Ok(Some(f.clamp(i32::MIN as f64, i32::MAX as f64) as i32))
        }
        _ => Err(de::Error::custom(format!("bad backlog {v}"))),
    }
}

/// Any value, for its JavaScript truth.
fn truthy_field<'de, D: Deserializer<'de>>(d: D) -> Result<bool, D::Error> {
    Value::deserialize(d).map(|v| truthy(&v))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn query(v: Value) -> Query {
        match parse(&v) {
            Parsed::Message(Received {
                act: Act::QueryServer(q),
                ..
            }) => q,
            other => panic!("not a queryServer: {other:?}"),
        }
    }

    #[test]
    fn keys_match_node() {
        // What a Node 20 worker sends for `listen(0)`.
        let q = query(
            json!({"cmd":"NODE_CLUSTER","act":"queryServer","index":0,"data":null,"address":null,"port":0,"addressType":4,"backlog":0,"seq":1}),
        );
        assert_eq!(q.key(), "null:0:4:undefined:0");
        assert_eq!(q.indexes_key(), ":0:4:");
        assert_eq!(q.backlog(), 511);
        let q = query(
            json!({"cmd":"NODE_CLUSTER","act":"queryServer","index":0,"data":null,"address":"127.0.0.1","port":0,"addressType":"udp4","fd":-1,"flags":0}),
        );
        assert_eq!(q.key(), "127.0.0.1:0:udp4:-1:0");
        assert_eq!(q.indexes_key(), "127.0.0.1:0:udp4:-1");
        assert_eq!(q.address_type, AddressType::Udp4);
        let q = query(
            json!({"cmd":"NODE_CLUSTER","act":"queryServer","index":1,"data":null,"address":"::","port":0,"addressType":6,"flags":1,"backlog":false}),
        );
        assert_eq!(q.key(), ":::0:6:undefined:1");
        assert_eq!(q.backlog(), 511);
        assert_eq!(q.flags(), 1);
        let q = query(
            json!({"cmd":"NODE_CLUSTER","act":"queryServer","index":0,"data":null,"address":null,"port":null,"addressType":null,"fd":7}),
        );
        assert_eq!(q.key(), "null:null:null:7:0");
        assert_eq!(q.indexes_key(), ":::7");
        assert_eq!(q.listen_fd(), Some(7));
    }

    #[test]
    fn loose_fields_as_node_reads_them() {
        // A port given as a string; missing fields take Node's values.
        let q = query(
            json!({"cmd":"NODE_CLUSTER","act":"queryServer","port":"8000","addressType":4,"readableAll":1}),
        );
        assert_eq!(q.port, Some(8000));
        assert_eq!(q.inet_port(), Some(8000));
        assert_eq!((q.index, &q.data, &q.address), (0, &Value::Null, &None));
        assert!(q.readable_all && !q.writable_all);
        assert_eq!(q.key(), "null:8000:4:undefined:0");
        let q = query(
            json!({"cmd":"NODE_CLUSTER","act":"queryServer","port":8000.0,"addressType":4.0,"backlog":16}),
        );
        assert_eq!(
            (q.port, q.address_type, q.backlog()),
            (Some(8000), AddressType::Tcp4, 16)
        );
        // A query with no fields parses (and fails validation later).
        let q = query(json!({"cmd":"NODE_CLUSTER","act":"queryServer","seq":1}));
        assert_eq!((q.port, q.address_type), (None, AddressType::Fd));
    }

    #[test]
    fn malformed_and_ignored() {
        for bad in [
            json!({"cmd":"NODE_CLUSTER","act":"queryServer","port":"80a","seq":5}),
            json!({"cmd":"NODE_CLUSTER","act":"queryServer","port":true,"seq":5}),
            json!({"cmd":"NODE_CLUSTER","act":"queryServer","addressType":5,"seq":5}),
        ] {
            let Parsed::Malformed(m) = parse(&bad) else {
                panic!("{bad}")
            };
            assert_eq!((m.kind, m.seq), (ActKind::QueryServer, Some(5)));
            assert!(matches!(m.error, ProtocolError::Malformed { .. }), "{m:?}");
        }
        let Parsed::Malformed(m) = parse(&json!({"cmd":"NODE_CLUSTER","act":"close"})) else {
            panic!()
        };
        assert_eq!(m.kind, ActKind::Close);
        assert!(m.error.to_string().starts_with("malformed close message"));
        for ignored in [
            json!({"cmd":"NODE_CLUSTER","ack":-1}),
            json!({"cmd":"NODE_CLUSTER","act":"bogus"}),
            json!({"cmd":"NODE_CLUSTER","act":7}),
            json!({"cmd":"NODE_DEBUG_ENABLED","act":"online"}),
            json!("NODE_CLUSTER"),
        ] {
            assert_eq!(parse(&ignored), Parsed::Ignored, "{ignored}");
        }
    }

    #[test]
    fn round_trip() {
        let q = Query {
            index: 2,
            data: json!({"type":"Buffer","data":[1]}),
            address: Some("/tmp/s".into()),
            port: Some(-1),
            address_type: AddressType::Unix,
            fd: None,
            flags: None,
            backlog: Some(0),
            readable_all: true,
            writable_all: false,
        };
        for a in [
            Act::Online,
            Act::QueryServer(q.clone()),
            Act::Listening(q),
            Act::Close { key: "k".into() },
            Act::ExitedAfterDisconnect,
            Act::NewConn {
                key: "null:0:4:undefined:0".into(),
            },
            Act::Disconnect,
            Act::Load {
                key: "k".into(),
                load: 3,
            },
        ] {
            let mut m = a.to_fields();
            assert_eq!(ActKind::deserialize(&m["act"]).unwrap(), a.kind(), "{m:?}");
            assert_eq!(m["act"], a.kind().to_string());
            m.insert("cmd".into(), NODE_CLUSTER.into());
            m.insert("seq".into(), 9.into());
            let want = Parsed::Message(Received {
                act: a,
                seq: Some(9),
            });
            assert_eq!(parse(&Value::Object(m)), want);
        }
        assert_eq!(
            Value::Object(Act::Disconnect.to_fields()),
            json!({"act":"disconnect"})
        );
        // Numeric keys read as JavaScript prints them.
        assert_eq!(
            parse(&json!({"cmd":"NODE_CLUSTER","act":"newconn","key":5,"seq":1})),
            Parsed::Message(Received {
                act: Act::NewConn { key: "5".into() },
                seq: Some(1)
            })
        );
    }

    /// `newconn` read by the direct path is what serde's reading of the
    /// tagged enum makes of it, extra fields and a missing `seq` included.
    #[test]
    fn newconn_read_directly_as_serde_reads_it() {
        for v in [
            json!({"cmd":"NODE_CLUSTER","act":"newconn","key":"127.0.0.1:8000:4:0:-1","seq":7}),
            json!({"cmd":"NODE_CLUSTER","act":"newconn","key":"","x":[1],"seq":0}),
            json!({"cmd":"NODE_CLUSTER","act":"newconn","key":"k"}),
            json!({"cmd":"NODE_CLUSTER","act":"newconn","key":"k","seq":-1}),
        ] {
            let want = Parsed::Message(Received {
                act: Act::deserialize(&v).unwrap(),
                seq: v.get("seq").and_then(Value::as_u64),
            });
            assert_eq!(parse(&v), want, "{v}");
        }
        // No key, or one of another type, still takes serde's reading.
        assert!(matches!(
            parse(&json!({"cmd":"NODE_CLUSTER","act":"newconn","key":true,"seq":1})),
            Parsed::Malformed(_)
        ));
        assert!(matches!(
            parse(&json!({"cmd":"NODE_CLUSTER","act":"newconn","seq":1})),
            Parsed::Malformed(_)
        ));
    }

    #[test]
    fn reply_shapes() {
        let rr = QueryReply {
            result: Ok(Grant::RoundRobin {
                sockname: None,
                load_reports: false,
            }),
            key: "k".into(),
            data: Value::Null,
        };
        assert_eq!(
            Value::Object(rr.to_fields(3)),
            json!({"errno":null,"key":"k","ack":3,"data":null})
        );
        let shared = QueryReply {
            result: Ok(Grant::Shared),
            ..rr.clone()
        };
        assert_eq!(Value::Object(shared.to_fields(3))["errno"], 0);
        let failed = QueryReply {
            result: Err(Errno::EADDRINUSE),
            ..rr.clone()
        };
        let wire = Value::Object(failed.to_fields(4));
        assert_eq!(wire["errno"], -98);
        assert_eq!(QueryReply::from_wire(&wire, false).unwrap(), failed);
        let addr: SocketAddr = "[::]:8000".parse().unwrap();
        let granted = QueryReply {
            result: Ok(Grant::RoundRobin {
                sockname: Some(Sockname(addr)),
                load_reports: true,
            }),
            ..rr.clone()
        };
        let wire = Value::Object(granted.to_fields(5));
        assert_eq!(
            wire["sockname"],
            json!({"address":"::","family":"IPv6","port":8000})
        );
        assert_eq!(wire["loadReports"], true);
        assert_eq!(QueryReply::from_wire(&wire, false).unwrap(), granted);
        assert_eq!(
            QueryReply::from_wire(&Value::Object(shared.to_fields(1)), true).unwrap(),
            shared
        );
        // Node's primary: `errno: 0` with a handle is shared, with a
        // scoped link-local sockname and a numeric family (Node < 18.4).
        let r = QueryReply::from_wire(
            &json!({"errno":0,"key":"k","ack":1,"data":null,
                    "sockname":{"address":"fe80::1%lo","family":6,"port":1}}),
            false,
        )
        .unwrap();
        let want: SocketAddr = "[fe80::1]:1".parse().unwrap();
        assert!(matches!(
            r.result,
            Ok(Grant::RoundRobin { sockname: Some(Sockname(a)), load_reports: false }) if a == want
        ));
        for bad in [
            json!({"errno":null}),
            json!({"errno":5,"key":"k"}),
            json!({"errno":"EADDRINUSE","key":"k"}),
            json!({"errno":null,"key":"k","sockname":{"address":"nowhere","port":1}}),
        ] {
            assert!(
                matches!(
                    QueryReply::from_wire(&bad, false),
                    Err(ProtocolError::BadReply { .. })
                ),
                "{bad}"
            );
        }
    }

    #[test]
    fn accept_replies_written_field_by_field_are_their_maps() {
        for ack in [None, Some(0), Some(7), Some(u64::MAX)] {
            for accepted in [true, false] {
                for load in [None, Some(0), Some(12), Some(u64::MAX)] {
                    let r = AcceptReply { accepted, load };
                    let mut buf = [0; 96];
                    let n = r.write_fields(ack, &mut buf);
                    let map = serde_json::to_string(&r.to_fields(ack)).unwrap();
                    assert_eq!(
                        std::str::from_utf8(&buf[..n]).unwrap(),
                        &map[1..map.len() - 1]
                    );
                }
            }
        }
    }

    #[test]
    fn accept_replies_and_acks() {
        let a = AcceptReply {
            accepted: true,
            load: Some(2),
        };
        let wire = Value::Object(a.to_fields(Some(7)));
        assert_eq!(wire, json!({"ack":7,"accepted":true,"load":2}));
        assert_eq!(AcceptReply::from_wire(&wire), a);
        // Node reads `accepted` for its truth.
        assert!(AcceptReply::from_wire(&json!({"accepted":1})).accepted);
        assert!(!AcceptReply::from_wire(&json!({"accepted":""})).accepted);
        assert!(!AcceptReply::from_wire(&json!({})).accepted);
        assert_eq!(
            Value::Object(
                AcceptReply {
                    accepted: false,
                    load: None
                }
                .to_fields(None)
            ),
            json!({"ack":null,"accepted":false})
        );
        assert_eq!(Value::Object(Ack.to_fields(3)), json!({"ack":3}));
        assert_eq!(js_string(Some(&json!(1.0))), "1");
    }
}
