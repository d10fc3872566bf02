//! Newline-delimited JSON framing, Node's `json` serialization mode
//! (`lib/internal/child_process/serialization.js`).
//!
//! Outgoing: `JSON.stringify(message) + "\n"`; the writer never leaves a raw
//! newline inside a string, so 0x0A only ever separates messages. Incoming:
//! bytes are split on `\n`, a partial line is kept across reads, and each
//! complete line is handed out. Pure code, no I/O: [`Decoder`] is fed with
//! whatever the socket returned, however it was chunked. How a line becomes a
//! value, and a value a line, is the JSON codec's job (`json.rs`): it reads
//! every line `JSON.stringify` can write.

use std::fmt;

use serde::Serialize;

use super::json::{self, JsFormatter};

/// The default limit on one message's size: 64 MiB. Node has none (V8's
/// string length, about 512 MiB, is its only bound); this one keeps what a
/// peer can make us buffer bounded. A longer line is skipped and reported
/// ([`FrameError::Oversized`]); the next one is read normally.
pub const DEFAULT_MAX_MESSAGE: usize = 64 * 1024 * 1024;

/// The default limit on how deeply arrays and objects nest in one message:
/// 4500 levels.
///
/// Node 20's `JSON.stringify` recurses, and with Node's default stack it
/// fails past 4183 levels (a `process.send` of 4182 nested arrays is the
/// deepest it sends); its `JSON.parse` has no limit. Decoding here never
/// recurses, but the [`serde_json::Value`] it builds is dropped, cloned,
/// compared and serialized recursively; 4500 levels fit in a main thread's
/// 8 MiB stack even in a debug build, where deeper values could abort the
/// process with a stack overflow on a peer's say-so. Threads with smaller
/// stacks (2 MiB for Rust's spawned threads) should lower
/// [`ChannelOptions::max_depth`](super::ChannelOptions::max_depth) to about
/// 1000. A deeper line is a [`FrameError::TooDeep`], and the channel goes on.
pub const DEFAULT_MAX_DEPTH: usize = 4500;

/// What went wrong with one incoming line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FrameError {
    /// A line was empty (Node's receiver dies on these with a `SyntaxError`).
    EmptyLine,
    /// A line held bytes that are not UTF-8 where JSON allows only ASCII
    /// (outside strings; inside a string they are read as U+FFFD, as
    /// Node's decoder reads them).
    InvalidUtf8 {
        /// Offset of the first invalid byte in the line.
        valid_up_to: usize,
    },
    /// A line was not JSON (Node's receiver dies on these with a
    /// `SyntaxError`).
    Malformed {
        /// What was expected where, with the byte offset in the line.
        error: String,
        /// The first characters of the line, for the log.
        prefix: String,
    },
    /// A line nested arrays and objects deeper than the limit
    /// ([`DEFAULT_MAX_DEPTH`]). Node reads such lines; see the limit for
    /// why this side does not.
    TooDeep {
        /// The configured limit, in levels of nesting.
        limit: usize,
    },
    /// A line grew past the size limit. The decoder reports it as soon as
    /// the limit is passed, then reads and drops the rest of the line
    /// without buffering it, and goes on with the next line.
    Oversized {
        /// How many bytes of the line had arrived when it was reported.
        size: usize,
        /// The configured limit, in bytes.
        limit: usize,
    },
    /// The stream ended in the middle of a message.
    TruncatedAtEof {
        /// How many bytes of the unfinished message had arrived.
        size: usize,
    },
}

impl fmt::Display for FrameError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FrameError::EmptyLine => f.write_str("empty line in IPC stream"),
            FrameError::InvalidUtf8 { valid_up_to } => {
                write!(
                    f,
                    "IPC message is not UTF-8 (invalid byte at {valid_up_to})"
                )
            }
            FrameError::Malformed { error, prefix } => {
                write!(f, "IPC message is not JSON ({error}): {prefix:?}")
            }
            FrameError::TooDeep { limit } => {
                write!(
                    f,
                    "IPC message nests deeper than the limit of {limit} levels (max_depth)"
                )
            }
            FrameError::Oversized { size, limit } => {
                write!(
                    f,
                    "IPC message of at least {size} bytes exceeds the limit of {limit} bytes \
                     (max_message); skipped"
                )
            }
            FrameError::TruncatedAtEof { size } => {
                write!(
                    f,
                    "IPC stream ended inside a message ({size} bytes unfinished)"
                )
            }
        }
    }
}

impl std::error::Error for FrameError {}

/// Serializes `msg` as one frame: its JSON and a newline, byte for byte
/// what `JSON.stringify` writes for the same value (numbers in
/// JavaScript's format: `1e+21`, `100` for `100.0`, `0` for `-0.0`;
/// non-finite floats as `null`).
///
/// # Errors
///
/// serde_json's error for values JSON cannot express (a map with
/// non-string keys, a failing `Serialize` impl).
///
/// # Examples
///
/// ```
/// use serde_json::json;
///
/// let frame = uvcluster::ipc::encode(&json!({"hello": "wörld", "n": [1e21, 2.0, -0.0]})).unwrap();
/// assert_eq!(frame, "{\"hello\":\"wörld\",\"n\":[1e+21,2,0]}\n".as_bytes());
/// ```
pub fn encode<T: Serialize + ?Sized>(msg: &T) -> serde_json::Result<Vec<u8>> {
    let mut out = Vec::with_capacity(128);
    let mut ser = serde_json::Serializer::with_formatter(&mut out, JsFormatter);
    msg.serialize(&mut ser)?;
    out.push(b'\n');
    Ok(out)
}

/// Splits an incoming byte stream into lines.
///
/// # Examples
///
/// ```
/// use uvcluster::ipc::Decoder;
///
/// let mut d = Decoder::new(1024);
/// d.push(b"{\"a\":1}\n{\"b\"");
/// assert_eq!(d.next_line().unwrap().unwrap(), b"{\"a\":1}");
/// assert!(d.next_line().is_none());
/// d.push(b":2}\n");
/// assert_eq!(d.next_line().unwrap().unwrap(), b"{\"b\":2}");
/// assert!(d.at_boundary());
/// ```
#[derive(Debug)]
pub struct Decoder {
    buf: Vec<u8>,
    /// Start of the first unconsumed byte.
    start: usize,
    /// Bytes before this offset (from `start`) hold no newline.
    scanned: usize,
    limit: usize,
    /// While a line over the limit is being dropped: how many of its bytes
    /// went, and its first bytes.
    skipping: Option<Skipped>,
}

#[derive(Debug)]
struct Skipped {
    size: usize,
    prefix: Vec<u8>,
}

/// How much of a line over the limit is kept for [`Decoder::skipped_prefix`].
const SKIPPED_PREFIX: usize = 1024;

impl Decoder {
    /// A decoder that refuses messages longer than `limit` bytes.
    pub fn new(limit: usize) -> Decoder {
        Decoder {
            buf: Vec::new(),
            start: 0,
            scanned: 0,
            limit,
            skipping: None,
        }
    }

    /// Appends bytes read from the stream.
    pub fn push(&mut self, data: &[u8]) {
        if self.start == self.buf.len() {
            self.buf.clear();
            self.start = 0;
            self.scanned = 0;
        } else if self.start > 0 && self.start >= self.buf.len() / 2 {
            // Compact once the consumed prefix dominates, so the buffer
            // does not grow with the stream.
            self.buf.drain(..self.start);
            self.scanned = self.scanned.saturating_sub(self.start);
            self.start = 0;
        }
        self.buf.extend_from_slice(data);
    }

    /// The next complete line, without its `\n`; `None` when no complete line
    /// is buffered. An empty line is reported as [`FrameError::EmptyLine`]
    /// and skipped. A line that grows past the limit is reported once as
    /// [`FrameError::Oversized`] (its first bytes stay readable through
    /// [`skipped_prefix`](Self::skipped_prefix) until the next call); the
    /// rest of it is then dropped as it arrives, and the line after it is
    /// read normally.
    pub fn next_line(&mut self) -> Option<Result<&[u8], FrameError>> {
        if let Some(skip) = &mut self.skipping {
            let pending = &self.buf[self.start..];
            match memchr(b'\n', pending) {
                Some(i) => {
                    self.start += i + 1;
                    self.skipping = None;
                }
                None => {
                    skip.size += pending.len();
                    self.start = self.buf.len();
                    self.scanned = 0;
                    return None;
                }
            }
        }
        let pending = &self.buf[self.start..];
        let from = self.scanned.min(pending.len());
        match memchr(b'\n', &pending[from..]) {
            Some(i) => {
                let end = from + i;
                if end > self.limit {
                    // The whole line is here: drop it at once.
                    let e = FrameError::Oversized {
                        size: end,
                        limit: self.limit,
                    };
                    self.skipping = Some(Skipped {
                        size: end,
                        prefix: pending[..end.min(SKIPPED_PREFIX)].to_vec(),
                    });
                    self.start += end;
                    self.scanned = 0;
                    return Some(Err(e));
                }
                let line_start = self.start;
                self.start += end + 1;
                self.scanned = 0;
                if end == 0 {
                    return Some(Err(FrameError::EmptyLine));
                }
                Some(Ok(&self.buf[line_start..line_start + end]))
            }
            None => {
                self.scanned = pending.len();
                if pending.len() > self.limit {
                    let size = pending.len();
                    self.skipping = Some(Skipped {
                        size,
                        prefix: pending[..size.min(SKIPPED_PREFIX)].to_vec(),
                    });
                    self.start = self.buf.len();
                    self.scanned = 0;
                    return Some(Err(FrameError::Oversized {
                        size,
                        limit: self.limit,
                    }));
                }
                None
            }
        }
    }

    /// The first bytes (up to 1 KiB) of the line being dropped after an
    /// [`Oversized`](FrameError::Oversized) error, until its end arrives.
    pub fn skipped_prefix(&self) -> Option<&[u8]> {
        self.skipping.as_ref().map(|s| &s.prefix[..])
    }

    /// Whether no partial message is buffered (and none is being dropped).
    pub fn at_boundary(&self) -> bool {
        self.start == self.buf.len() && self.skipping.is_none()
    }

    /// Bytes of an unfinished message held.
    pub fn buffered(&self) -> usize {
        self.buf.len() - self.start
    }

    /// Checks the end of the stream: an unfinished message is an error.
    ///
    /// # Errors
    ///
    /// [`FrameError::TruncatedAtEof`] if bytes of a message were left (of a
    /// line being dropped, too: how many of its bytes came).
    pub fn finish(&self) -> Result<(), FrameError> {
        match (&self.skipping, self.buffered()) {
            (Some(s), _) => Err(FrameError::TruncatedAtEof { size: s.size }),
            (None, 0) => Ok(()),
            (None, size) => Err(FrameError::TruncatedAtEof { size }),
        }
    }
}

fn memchr(needle: u8, hay: &[u8]) -> Option<usize> {
    hay.iter().position(|&b| b == needle)
}

/// Parses one line into a JSON value as Node's receiver does (`JSON.parse`
/// of the line decoded as UTF-8), with at most [`DEFAULT_MAX_DEPTH`] levels
/// of nesting. What `JSON.parse` would read as a string with an unpaired
/// surrogate has U+FFFD in its place, and a number beyond `f64` (`±Infinity`
/// there) is `null`; [`RawMessage`](super::RawMessage) keeps the exact text.
///
/// # Errors
///
/// [`FrameError::InvalidUtf8`], [`FrameError::Malformed`] or
/// [`FrameError::TooDeep`].
///
/// # Examples
///
/// ```
/// use serde_json::json;
/// use uvcluster::ipc::parse_line;
///
/// assert_eq!(parse_line(br#"{"note":"a\ud800b","n":1e400}"#).unwrap(), json!({"note":"a\u{FFFD}b","n":null}));
/// assert!(parse_line(b"{\"a\":}").is_err());
/// ```
pub fn parse_line(line: &[u8]) -> Result<serde_json::Value, FrameError> {
    json::parse(line, DEFAULT_MAX_DEPTH).map(|p| p.value)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lines(d: &mut Decoder) -> Vec<Result<Vec<u8>, FrameError>> {
        let mut v = Vec::new();
        while let Some(l) = d.next_line() {
            v.push(l.map(|s| s.to_vec()));
        }
        v
    }

    #[test]
    fn several_messages_in_one_chunk_and_one_split_over_three() {
        let mut d = Decoder::new(100);
        d.push(b"1\n\"x\"\nnu");
        assert_eq!(
            lines(&mut d),
            vec![Ok(b"1".to_vec()), Ok(b"\"x\"".to_vec())]
        );
        d.push(b"l");
        assert!(lines(&mut d).is_empty());
        d.push(b"l\n");
        assert_eq!(lines(&mut d), vec![Ok(b"null".to_vec())]);
        assert!(d.at_boundary());
    }

    #[test]
    fn empty_line_is_reported_and_skipped() {
        let mut d = Decoder::new(100);
        d.push(b"\n{}\n");
        assert_eq!(
            lines(&mut d),
            vec![Err(FrameError::EmptyLine), Ok(b"{}".to_vec())]
        );
    }

    #[test]
    fn oversized_line_is_skipped_without_buffering_and_the_next_is_read() {
        let mut d = Decoder::new(8);
        d.push(b"{}\n123456789");
        assert_eq!(
            lines(&mut d),
            vec![
                Ok(b"{}".to_vec()),
                Err(FrameError::Oversized { size: 9, limit: 8 })
            ]
        );
        assert_eq!(d.skipped_prefix(), Some(&b"123456789"[..]));
        assert!(!d.at_boundary());
        for _ in 0..1000 {
            d.push(&[b'x'; 1000]);
            assert!(lines(&mut d).is_empty());
            assert!(d.buffered() == 0 && d.buf.capacity() < 4096);
        }
        d.push(b"xx\n{\"a\":1}\n");
        assert_eq!(lines(&mut d), vec![Ok(b"{\"a\":1}".to_vec())]);
        assert!(d.at_boundary() && d.skipped_prefix().is_none());
    }

    #[test]
    fn oversized_with_newline() {
        let mut d = Decoder::new(4);
        d.push(b"{\"a\":1}\n1\n");
        assert_eq!(
            lines(&mut d),
            vec![
                Err(FrameError::Oversized { size: 7, limit: 4 }),
                Ok(b"1".to_vec())
            ]
        );
    }

    #[test]
    fn eof_while_skipping_is_truncated() {
        let mut d = Decoder::new(2);
        d.push(b"12345");
        assert_eq!(lines(&mut d).len(), 1);
        d.push(b"67");
        assert!(lines(&mut d).is_empty());
        assert_eq!(d.finish(), Err(FrameError::TruncatedAtEof { size: 7 }));
    }

    #[test]
    fn encode_writes_what_json_stringify_writes() {
        let v = serde_json::json!({"s":"\u{0}\u{1f}\u{7f}\u{2028}\"\\/\u{8}\u{c}\n\r\t","n":[0.1,-0.0,1e21,5e-324,100.0,-7]});
        assert_eq!(
            encode(&v).unwrap(),
            b"{\"s\":\"\\u0000\\u001f\x7f\xe2\x80\xa8\\\"\\\\/\\b\\f\\n\\r\\t\",\"n\":[0.1,0,1e+21,5e-324,100,-7]}\n"
        );
        assert_eq!(encode(&f64::NAN).unwrap(), b"null\n");
    }

    #[test]
    fn message_at_the_limit_passes() {
        let mut d = Decoder::new(4);
        d.push(b"1234\n");
        assert_eq!(lines(&mut d), vec![Ok(b"1234".to_vec())]);
    }

    #[test]
    fn truncated_at_eof() {
        let mut d = Decoder::new(100);
        d.push(b"{}\n{\"a\"");
        lines(&mut d);
        assert_eq!(d.finish(), Err(FrameError::TruncatedAtEof { size: 4 }));
    }

    #[test]
    fn parse_errors_are_typed() {
        assert!(matches!(
            parse_line(b"\xff"),
            Err(FrameError::InvalidUtf8 { valid_up_to: 0 })
        ));
        assert_eq!(
            parse_line(b"\"\xff\"").unwrap(),
            serde_json::json!("\u{FFFD}")
        );
        assert!(matches!(
            parse_line(b"garbage"),
            Err(FrameError::Malformed { .. })
        ));
        assert_eq!(
            parse_line("\"é\"\r".as_bytes()).unwrap(),
            serde_json::json!("é")
        );
    }

    #[test]
    fn buffer_is_compacted() {
        let mut d = Decoder::new(1 << 20);
        for _ in 0..10_000 {
            d.push(b"{\"k\":\"v\"}\n{\"par");
            assert_eq!(lines(&mut d).len(), 1);
            d.push(b"t\":1}\n");
            assert_eq!(lines(&mut d).len(), 1);
        }
        assert!(d.buf.capacity() < 4096);
    }
}
