//! Newline-delimited JSON framing, Node's `json` serialization mode
//! (`lib/internal/child_process/serialization.js`).
//!
//! Outgoing: `JSON.stringify(message) + "\n"`; serde_json never leaves a raw
//! newline inside a string, so 0x0A only ever separates messages. Incoming:
//! bytes are split on `\n`, a partial line is kept across reads, and each
//! complete line is handed out. Pure code, no I/O: [`Decoder`] is fed with
//! whatever the socket returned, however it was chunked.

use std::fmt;

use serde::Serialize;

/// The default limit on one message's size: 64 MiB.
pub const DEFAULT_MAX_MESSAGE: usize = 64 * 1024 * 1024;

/// What went wrong with one incoming line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FrameError {
    /// A line was empty (Node's receiver dies on these with a `SyntaxError`).
    EmptyLine,
    /// A line was not valid UTF-8.
    InvalidUtf8 {
        /// Offset of the first invalid byte in the line.
        valid_up_to: usize,
    },
    /// A line was not valid JSON.
    Malformed {
        /// serde_json's description, with line and column.
        error: String,
        /// The first bytes of the line, for the log.
        prefix: String,
    },
    /// A message grew past the limit before its newline arrived. The decoder
    /// stops: the stream cannot be resynchronised without reading the rest.
    Oversized {
        /// How many bytes of the message had arrived.
        size: usize,
        /// The configured limit.
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
            FrameError::Oversized { size, limit } => {
                write!(
                    f,
                    "IPC message of at least {size} bytes exceeds the limit of {limit} bytes"
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

/// Serializes `msg` as one frame: its JSON and a newline.
///
/// # Errors
///
/// serde_json's error for values JSON cannot express (a map with
/// non-string keys, a failing `Serialize` impl).
///
/// # Examples
///
/// ```
/// let frame = uvcluster::ipc::encode(&serde_json::json!({"hello": "wörld"})).unwrap();
/// assert_eq!(frame, b"{\"hello\":\"w\xc3\xb6rld\"}\n");
/// ```
pub fn encode<T: Serialize + ?Sized>(msg: &T) -> serde_json::Result<Vec<u8>> {
    let mut out = Vec::with_capacity(128);
    serde_json::to_writer(&mut out, msg)?;
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
    failed: bool,
}

impl Decoder {
    /// A decoder that refuses messages longer than `limit` bytes.
    pub fn new(limit: usize) -> Decoder {
        Decoder {
            buf: Vec::new(),
            start: 0,
            scanned: 0,
            limit,
            failed: false,
        }
    }

    /// Appends bytes read from the stream. Ignored after an
    /// [`Oversized`](FrameError::Oversized) error.
    pub fn push(&mut self, data: &[u8]) {
        if self.failed {
            return;
        }
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
    /// and skipped; a message over the limit as [`FrameError::Oversized`],
    /// after which the decoder yields nothing more.
    pub fn next_line(&mut self) -> Option<Result<&[u8], FrameError>> {
        if self.failed {
            return None;
        }
        let pending = &self.buf[self.start..];
        let from = self.scanned.min(pending.len());
        match memchr(b'\n', &pending[from..]) {
            Some(i) => {
                let end = from + i;
                if end > self.limit {
                    return Some(Err(self.fail(end)));
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
                    return Some(Err(self.fail(pending.len())));
                }
                None
            }
        }
    }

    fn fail(&mut self, size: usize) -> FrameError {
        self.failed = true;
        self.buf = Vec::new();
        self.start = 0;
        self.scanned = 0;
        FrameError::Oversized {
            size,
            limit: self.limit,
        }
    }

    /// Whether no partial message is buffered.
    pub fn at_boundary(&self) -> bool {
        self.start == self.buf.len()
    }

    /// Bytes of an unfinished message held.
    pub fn buffered(&self) -> usize {
        self.buf.len() - self.start
    }

    /// Checks the end of the stream: an unfinished message is an error.
    ///
    /// # Errors
    ///
    /// [`FrameError::TruncatedAtEof`] if bytes of a message were left.
    pub fn finish(&self) -> Result<(), FrameError> {
        match self.buffered() {
            0 => Ok(()),
            size if !self.failed => Err(FrameError::TruncatedAtEof { size }),
            _ => Ok(()),
        }
    }
}

fn memchr(needle: u8, hay: &[u8]) -> Option<usize> {
    hay.iter().position(|&b| b == needle)
}

/// Parses one line into a JSON value, checking UTF-8 first so the error
/// says which it was.
///
/// # Errors
///
/// [`FrameError::InvalidUtf8`] or [`FrameError::Malformed`].
pub fn parse_line(line: &[u8]) -> Result<serde_json::Value, FrameError> {
    let text = std::str::from_utf8(line).map_err(|e| FrameError::InvalidUtf8 {
        valid_up_to: e.valid_up_to(),
    })?;
    serde_json::from_str(text).map_err(|e| FrameError::Malformed {
        error: e.to_string(),
        prefix: text.chars().take(80).collect(),
    })
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
    fn oversized_without_newline_stops_the_decoder() {
        let mut d = Decoder::new(8);
        d.push(b"123456789");
        assert_eq!(
            lines(&mut d),
            vec![Err(FrameError::Oversized { size: 9, limit: 8 })]
        );
        d.push(b"\n{}\n");
        assert!(lines(&mut d).is_empty());
    }

    #[test]
    fn oversized_with_newline() {
        let mut d = Decoder::new(4);
        d.push(b"{\"a\":1}\n");
        assert!(matches!(
            lines(&mut d)[..],
            [Err(FrameError::Oversized { size: 7, .. })]
        ));
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
