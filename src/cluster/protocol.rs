//! The `NODE_CLUSTER` message vocabulary (lib/internal/cluster/*.js), as
//! typed values. The wire keeps Node's exact field names; loosely typed
//! fields (`backlog` may be `false`, `addressType` is `4`, `6`, `-1`,
//! `"udp4"` or `"udp6"`) are kept as JSON values and interpreted here.

use serde_json::{Map, Value, json};

/// The `act` of a cluster message.
#[derive(Clone, Debug, PartialEq)]
pub enum Act {
    /// W→P: the worker is up.
    Online,
    /// W→P: a server in the worker wants to listen (expects a reply).
    QueryServer(Query),
    /// W→P: that server is listening (`port` is the real one).
    Listening(Query),
    /// W→P: the worker closed its server with this key.
    Close {
        /// The key from the queryServer reply.
        key: String,
    },
    /// W→P: the worker is disconnecting on its own (expects a reply).
    ExitedAfterDisconnect,
    /// P→W: a connection for the round-robin server `key` (comes with a
    /// handle; expects `{accepted}`).
    NewConn {
        /// The server's key.
        key: String,
    },
    /// P→W: disconnect.
    Disconnect,
    /// W→P, beyond Node: the worker's open connections on a round-robin
    /// server, sent when connections end (Node primaries ignore unknown
    /// acts). Accept replies carry the same number as `load`.
    Load {
        /// The server's key.
        key: String,
        /// Open connections.
        load: u64,
    },
}

/// The fields of `queryServer` and `listening`.
#[derive(Clone, Debug, PartialEq)]
pub struct Query {
    /// Per-worker index of this server among those on the same address.
    pub index: u64,
    /// Server data (TLS ticket keys); `null` otherwise. Echoed back.
    pub data: Value,
    /// The address: an IP, a Unix socket path, or `null` (any).
    pub address: Value,
    /// The port: a number, `-1` for Unix sockets, `null` with `fd`.
    pub port: Value,
    /// `4`, `6`, `-1` (Unix), `"udp4"`, `"udp6"`, or `null` (fd).
    pub address_type: Value,
    /// An fd of the primary to listen on, or `-1` for dgram; may be absent.
    pub fd: Option<Value>,
    /// Bind flags (1 = IPv6-only for TCP; UDP: reuseaddr/ipv6only bits).
    pub flags: Option<Value>,
    /// The listen backlog: a number, `false`, `0` or absent (default 511).
    pub backlog: Option<Value>,
    /// Unix sockets: make the path readable by all.
    pub readable_all: Option<Value>,
    /// Unix sockets: make the path writable by all.
    pub writable_all: Option<Value>,
    /// Fields we do not know, kept so that `listening` echoes them.
    pub extra: Map<String, Value>,
}

/// What a server's address type says about the socket to make.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
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
    /// Given by fd (`null`).
    Fd,
}

impl AddressType {
    /// Reads Node's loosely typed `addressType`.
    pub fn from_wire(v: &Value) -> Option<AddressType> {
        match v {
            Value::Number(n) => match n.as_i64()? {
                4 => Some(AddressType::Tcp4),
                6 => Some(AddressType::Tcp6),
                -1 => Some(AddressType::Unix),
                _ => None,
            },
            Value::String(s) if s == "udp4" => Some(AddressType::Udp4),
            Value::String(s) if s == "udp6" => Some(AddressType::Udp6),
            Value::Null => Some(AddressType::Fd),
            _ => None,
        }
    }

    /// The wire value.
    pub fn to_wire(self) -> Value {
        match self {
            AddressType::Tcp4 => json!(4),
            AddressType::Tcp6 => json!(6),
            AddressType::Unix => json!(-1),
            AddressType::Udp4 => json!("udp4"),
            AddressType::Udp6 => json!("udp6"),
            AddressType::Fd => Value::Null,
        }
    }

    /// Whether this is a datagram socket (always a shared handle).
    pub fn is_udp(self) -> bool {
        matches!(self, AddressType::Udp4 | AddressType::Udp6)
    }
}

impl Query {
    /// The parsed address type, if it is one Node sends.
    pub fn kind(&self) -> Option<AddressType> {
        AddressType::from_wire(&self.address_type)
    }

    /// The backlog to listen with: Node treats `false`, `0` and absent as
    /// its default, 511.
    pub fn backlog(&self) -> i32 {
        match self.backlog.as_ref().and_then(Value::as_i64) {
            Some(n) if n > 0 => n.min(i32::MAX as i64) as i32,
            _ => 511,
        }
    }

    /// The primary's key for this server: `${address}:${port}:${addressType}:${fd}:${index}`
    /// with JavaScript's string conversion, so an absent fd prints as
    /// `undefined`. Opaque: it may contain colons (IPv6).
    pub fn key(&self) -> String {
        format!(
            "{}:{}:{}:{}:{}",
            js_string(Some(&self.address)),
            js_string(Some(&self.port)),
            js_string(Some(&self.address_type)),
            js_string(self.fd.as_ref()),
            self.index
        )
    }

    fn to_fields(&self, act: &str) -> Map<String, Value> {
        let mut m = Map::new();
        m.insert("act".into(), act.into());
        m.insert("index".into(), self.index.into());
        m.insert("data".into(), self.data.clone());
        m.insert("address".into(), self.address.clone());
        m.insert("port".into(), self.port.clone());
        m.insert("addressType".into(), self.address_type.clone());
        let opt = [
            ("fd", &self.fd),
            ("flags", &self.flags),
            ("backlog", &self.backlog),
            ("readableAll", &self.readable_all),
            ("writableAll", &self.writable_all),
        ];
        for (k, v) in opt {
            if let Some(v) = v {
                m.insert(k.into(), v.clone());
            }
        }
        for (k, v) in &self.extra {
            m.entry(k.clone()).or_insert_with(|| v.clone());
        }
        m
    }

    fn from_fields(m: &Map<String, Value>) -> Option<Query> {
        const KNOWN: [&str; 14] = [
            "cmd",
            "act",
            "seq",
            "ack",
            "index",
            "data",
            "address",
            "port",
            "addressType",
            "fd",
            "flags",
            "backlog",
            "readableAll",
            "writableAll",
        ];
        Some(Query {
            index: m.get("index").and_then(Value::as_u64).unwrap_or(0),
            data: m.get("data").cloned().unwrap_or(Value::Null),
            address: m.get("address").cloned().unwrap_or(Value::Null),
            port: m.get("port").cloned().unwrap_or(Value::Null),
            address_type: m.get("addressType").cloned().unwrap_or(Value::Null),
            fd: m.get("fd").cloned(),
            flags: m.get("flags").cloned(),
            backlog: m.get("backlog").cloned(),
            readable_all: m.get("readableAll").cloned(),
            writable_all: m.get("writableAll").cloned(),
            extra: m
                .iter()
                .filter(|(k, _)| !KNOWN.contains(&k.as_str()))
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
        })
    }
}

/// JavaScript's `String(value)` for JSON values, `undefined` for `None`.
pub fn js_string(v: Option<&Value>) -> String {
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

impl Act {
    /// Parses a `NODE_CLUSTER` message's act. `None` for messages Node would
    /// ignore (no or unknown `act`), and for malformed fields.
    pub fn parse(msg: &Value) -> Option<Act> {
        let m = msg.as_object()?;
        let key = || m.get("key").map(|k| js_string(Some(k)));
        Some(match m.get("act")?.as_str()? {
            "online" => Act::Online,
            "queryServer" => Act::QueryServer(Query::from_fields(m)?),
            "listening" => Act::Listening(Query::from_fields(m)?),
            "close" => Act::Close { key: key()? },
            "exitedAfterDisconnect" => Act::ExitedAfterDisconnect,
            "newconn" => Act::NewConn { key: key()? },
            "disconnect" => Act::Disconnect,
            "load" => Act::Load {
                key: key()?,
                load: m.get("load").and_then(Value::as_u64)?,
            },
            _ => return None,
        })
    }

    /// The message fields (without `cmd` and `seq`, which the channel adds).
    pub fn to_fields(&self) -> Map<String, Value> {
        let simple = |act: &str| {
            let mut m = Map::new();
            m.insert("act".into(), act.into());
            m
        };
        match self {
            Act::Online => simple("online"),
            Act::QueryServer(q) => q.to_fields("queryServer"),
            Act::Listening(q) => q.to_fields("listening"),
            Act::Close { key } => {
                let mut m = simple("close");
                m.insert("key".into(), key.clone().into());
                m
            }
            Act::ExitedAfterDisconnect => simple("exitedAfterDisconnect"),
            Act::NewConn { key } => {
                let mut m = simple("newconn");
                m.insert("key".into(), key.clone().into());
                m
            }
            Act::Disconnect => simple("disconnect"),
            Act::Load { key, load } => {
                let mut m = simple("load");
                m.insert("key".into(), key.clone().into());
                m.insert("load".into(), (*load).into());
                m
            }
        }
    }
}

/// The primary's reply to `queryServer`.
#[derive(Clone, Debug, PartialEq)]
pub struct QueryReply {
    /// `None` (JSON `null`) or `0` on success; a negative errno otherwise.
    pub errno: Option<i64>,
    /// The server's key.
    pub key: String,
    /// The stored server data.
    pub data: Value,
    /// Round-robin TCP: the listening socket's address
    /// `{address, family, port}`.
    pub sockname: Option<Value>,
}

impl QueryReply {
    /// The reply fields, with `ack` set to the request's seq.
    pub fn to_fields(&self, ack: u64) -> Map<String, Value> {
        let mut m = Map::new();
        m.insert("errno".into(), self.errno.map_or(Value::Null, Value::from));
        m.insert("key".into(), self.key.clone().into());
        m.insert("ack".into(), ack.into());
        m.insert("data".into(), self.data.clone());
        if let Some(s) = &self.sockname {
            m.insert("sockname".into(), s.clone());
        }
        m
    }

    /// Parses a reply.
    pub fn parse(msg: &Value) -> Option<QueryReply> {
        let m = msg.as_object()?;
        Some(QueryReply {
            errno: m.get("errno").and_then(Value::as_i64),
            key: js_string(Some(m.get("key")?)),
            data: m.get("data").cloned().unwrap_or(Value::Null),
            sockname: m.get("sockname").cloned(),
        })
    }
}

/// `sockname` as Node's `getsockname` reports it.
pub fn sockname(addr: &std::net::SocketAddr) -> Value {
    json!({
        "address": addr.ip().to_string(),
        "family": if addr.is_ipv4() { "IPv4" } else { "IPv6" },
        "port": addr.port(),
    })
}

/// Node's name for an errno (`EADDRINUSE`), from the negative libuv errno.
pub fn errno_code(errno: i64) -> String {
    let e = nix::errno::Errno::from_raw((-errno) as i32);
    format!("{e:?}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_match_node() {
        let q = Act::parse(&json!({"cmd":"NODE_CLUSTER","act":"queryServer","index":0,"data":null,"address":null,"port":0,"addressType":4,"backlog":0,"seq":1})).unwrap();
        let Act::QueryServer(q) = q else { panic!() };
        assert_eq!(q.key(), "null:0:4:undefined:0");
        assert_eq!(q.backlog(), 511);
        let q = Act::parse(&json!({"act":"queryServer","index":0,"data":null,"address":"127.0.0.1","port":0,"addressType":"udp4","fd":-1,"flags":0})).unwrap();
        let Act::QueryServer(q) = q else { panic!() };
        assert_eq!(q.key(), "127.0.0.1:0:udp4:-1:0");
        assert_eq!(q.kind(), Some(AddressType::Udp4));
        let q = Act::parse(&json!({"act":"queryServer","index":1,"data":null,"address":"::","port":0,"addressType":6,"flags":1,"backlog":false})).unwrap();
        let Act::QueryServer(q) = q else { panic!() };
        assert_eq!(q.key(), ":::0:6:undefined:1");
        assert_eq!(q.backlog(), 511);
    }

    #[test]
    fn round_trip_and_unknown_acts() {
        for a in [
            Act::Online,
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
            assert_eq!(Act::parse(&Value::Object(a.to_fields())), Some(a));
        }
        assert_eq!(Act::parse(&json!({"cmd":"NODE_CLUSTER","ack":-1})), None);
        assert_eq!(Act::parse(&json!({"act":"bogus"})), None);
        assert_eq!(Act::parse(&json!({"act":"close"})), None);
    }

    #[test]
    fn reply_shape() {
        let r = QueryReply {
            errno: None,
            key: "k".into(),
            data: Value::Null,
            sockname: None,
        };
        assert_eq!(
            Value::Object(r.to_fields(3)),
            json!({"errno":null,"key":"k","ack":3,"data":null})
        );
        assert_eq!(errno_code(-98), "EADDRINUSE");
        assert_eq!(js_string(Some(&json!(1.0))), "1");
    }
}
