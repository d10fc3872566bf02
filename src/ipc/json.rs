//! JSON as JavaScript reads and writes it: the codec of the channel's
//! `json` serialization mode.
//!
//! Node's receiver decodes the byte stream as UTF-8 (invalid bytes become
//! U+FFFD, `StringDecoder`) and runs `JSON.parse` on each line; its sender
//! writes `JSON.stringify(message)`. This module does the same in Rust,
//! reading into a [`serde_json::Value`]:
//!
//! * **Strings are UTF-16 in JavaScript** and may hold unpaired surrogates;
//!   `JSON.stringify` writes them as `\ud800`-style escapes. A Rust `String`
//!   cannot hold them, so each becomes U+FFFD REPLACEMENT CHARACTER, and the
//!   value is marked *inexact*; the channel then keeps the message's JSON
//!   text ([`RawMessage`](super::RawMessage)). Bytes that are not UTF-8
//!   inside a string become U+FFFD as well (as Node's decoder makes them).
//! * **Numbers are doubles in JavaScript.** An integer literal that fits
//!   `u64`/`i64` is kept exactly; any other number is the nearest `f64`
//!   (`-0` stays `-0.0`). A literal beyond `f64`'s range, which `JSON.parse`
//!   reads as `±Infinity`, becomes `null`, what `JSON.stringify` writes for
//!   it, and marks the value inexact.
//! * **Nesting** is parsed without recursion, so no input can exhaust the
//!   stack here; the depth of the value built is bounded by the caller
//!   (see [`DEFAULT_MAX_DEPTH`](super::DEFAULT_MAX_DEPTH) for why).
//! * **Objects**: a repeated key keeps its last value, as in `JSON.parse`.
//!
//! The grammar is ECMA-404 exactly as `JSON.parse` takes it: whitespace is
//! space, tab, CR and LF only; no comments, trailing commas, leading zeros,
//! `NaN` or single quotes; control characters must be escaped in strings.
//!
//! Writing uses serde_json with one change, numbers formatted as
//! JavaScript's `Number.prototype.toString` formats them (`1e+21`, `100`,
//! `0` for `-0`), so that a message we send is byte for byte what
//! `JSON.stringify` would write for the same value. Strings need no change:
//! serde_json escapes exactly the characters `JSON.stringify` escapes, the
//! same way (`\b \t \n \f \r \" \\`, other C0 controls as `\u00xx`).

use std::io;

use serde_json::{Map, Number, Value};

use super::frame::FrameError;

/// The result of parsing one line.
#[derive(Debug)]
pub(crate) struct Parsed {
    pub value: Value,
    /// No replacement was made: `value` is what `JSON.parse` would give.
    pub exact: bool,
    /// Where the value of the top-level object's `msg` member lies in the
    /// line (the message a `NODE_HANDLE` wrapper carries), and whether it
    /// was read without replacement.
    pub msg: Option<Span>,
}

/// A byte range of the line.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Span {
    pub start: usize,
    pub end: usize,
    pub exact: bool,
}

/// A container being filled.
enum Open {
    Array(Vec<Value>),
    /// The object so far and the key whose value is being parsed.
    Object(Map<String, Value>, String),
}

struct Parser<'a> {
    b: &'a [u8],
    i: usize,
    /// Replacements made so far (lone surrogates, invalid UTF-8, ±Infinity).
    replaced: usize,
}

/// Parses one line as `JSON.parse` would, building at most `max_depth`
/// levels of arrays and objects.
pub(crate) fn parse(line: &[u8], max_depth: usize) -> Result<Parsed, FrameError> {
    let mut p = Parser {
        b: line,
        i: 0,
        replaced: 0,
    };
    p.run(max_depth).map_err(|e| p.error(e))
}

/// Why a parse failed, before it is turned into a [`FrameError`].
enum Fail {
    /// Expected something else at the current position.
    Expected(&'static str),
    Control,
    BadEscape,
    TooDeep(usize),
}

impl Parser<'_> {
    fn run(&mut self, max_depth: usize) -> Result<Parsed, Fail> {
        let mut stack: Vec<Open> = Vec::new();
        // The top-level `msg` member: where its value starts and the
        // replacement count there.
        let mut msg_start: Option<(usize, usize)> = None;
        let mut msg: Option<Span> = None;
        'value: loop {
            self.ws();
            let mut v = match self.peek() {
                Some(b'{') | Some(b'[') if stack.len() >= max_depth => {
                    return Err(Fail::TooDeep(max_depth));
                }
                Some(b'{') => {
                    self.i += 1;
                    self.ws();
                    if self.peek() == Some(b'}') {
                        self.i += 1;
                        Value::Object(Map::new())
                    } else {
                        let key = self.key()?;
                        if stack.is_empty() && key == "msg" {
                            self.ws();
                            msg_start = Some((self.i, self.replaced));
                        }
                        stack.push(Open::Object(Map::new(), key));
                        continue 'value;
                    }
                }
                Some(b'[') => {
                    self.i += 1;
                    self.ws();
                    if self.peek() == Some(b']') {
                        self.i += 1;
                        Value::Array(Vec::new())
                    } else {
                        stack.push(Open::Array(Vec::new()));
                        continue 'value;
                    }
                }
                Some(b'"') => Value::String(self.string()?),
                Some(b't') => self.literal(b"true", Value::Bool(true))?,
                Some(b'f') => self.literal(b"false", Value::Bool(false))?,
                Some(b'n') => self.literal(b"null", Value::Null)?,
                Some(b'-' | b'0'..=b'9') => self.number()?,
                _ => return Err(Fail::Expected("a value")),
            };
            // A value is complete: add it to the containers it closes.
            loop {
                let depth = stack.len();
                match stack.last_mut() {
                    None => {
                        self.ws();
                        if self.i != self.b.len() {
                            return Err(Fail::Expected("the end of the line"));
                        }
                        return Ok(Parsed {
                            value: v,
                            exact: self.replaced == 0,
                            msg,
                        });
                    }
                    Some(Open::Array(items)) => {
                        items.push(v);
                        self.ws();
                        match self.peek() {
                            Some(b',') => {
                                self.i += 1;
                                continue 'value;
                            }
                            Some(b']') => {
                                self.i += 1;
                                let Some(Open::Array(items)) = stack.pop() else {
                                    unreachable!("the top is an array")
                                };
                                v = Value::Array(items);
                            }
                            _ => return Err(Fail::Expected("',' or ']'")),
                        }
                    }
                    Some(Open::Object(map, key)) => {
                        if depth == 1
                            && let Some((s, r)) = msg_start.take()
                        {
                            msg = Some(Span {
                                start: s,
                                end: self.i,
                                exact: self.replaced == r,
                            });
                        }
                        map.insert(std::mem::take(key), v);
                        self.ws();
                        match self.peek() {
                            Some(b',') => {
                                self.i += 1;
                                self.ws();
                                let k = self.key()?;
                                if depth == 1 && k == "msg" {
                                    self.ws();
                                    msg_start = Some((self.i, self.replaced));
                                }
                                if let Some(Open::Object(_, key)) = stack.last_mut() {
                                    *key = k;
                                }
                                continue 'value;
                            }
                            Some(b'}') => {
                                self.i += 1;
                                let Some(Open::Object(map, _)) = stack.pop() else {
                                    unreachable!("the top is an object")
                                };
                                v = Value::Object(map);
                            }
                            _ => return Err(Fail::Expected("',' or '}'")),
                        }
                    }
                }
            }
        }
    }

    fn peek(&self) -> Option<u8> {
        self.b.get(self.i).copied()
    }

    fn ws(&mut self) {
        while let Some(b' ' | b'\t' | b'\n' | b'\r') = self.peek() {
            self.i += 1;
        }
    }

    /// `"key" :`
    fn key(&mut self) -> Result<String, Fail> {
        if self.peek() != Some(b'"') {
            return Err(Fail::Expected("a string key"));
        }
        let k = self.string()?;
        self.ws();
        if self.peek() != Some(b':') {
            return Err(Fail::Expected("':'"));
        }
        self.i += 1;
        Ok(k)
    }

    fn literal(&mut self, word: &'static [u8], v: Value) -> Result<Value, Fail> {
        if self.b[self.i..].starts_with(word) {
            self.i += word.len();
            Ok(v)
        } else {
            Err(Fail::Expected("a value"))
        }
    }

    /// A string, from its opening quote to past its closing one.
    fn string(&mut self) -> Result<String, Fail> {
        self.i += 1;
        // Most strings have no escapes: one scan, one allocation.
        let start = self.i;
        let end = self.b[start..]
            .iter()
            .position(|&c| c == b'"' || c == b'\\' || c < 0x20)
            .map(|n| start + n);
        if let Some(end) = end
            && self.b[end] == b'"'
            && let Ok(s) = std::str::from_utf8(&self.b[start..end])
        {
            self.i = end + 1;
            return Ok(s.to_owned());
        }
        let mut out = String::new();
        loop {
            let run = self.i;
            while let Some(&c) = self.b.get(self.i) {
                if c == b'"' || c == b'\\' || c < 0x20 {
                    break;
                }
                self.i += 1;
            }
            let bytes = &self.b[run..self.i];
            match std::str::from_utf8(bytes) {
                Ok(s) => out.push_str(s),
                Err(_) => {
                    // Node's decoder replaces each maximal invalid subpart
                    // with U+FFFD, as `from_utf8_lossy` does.
                    self.replaced += 1;
                    out.push_str(&String::from_utf8_lossy(bytes));
                }
            }
            match self.peek() {
                Some(b'"') => {
                    self.i += 1;
                    return Ok(out);
                }
                Some(b'\\') => self.escape(&mut out)?,
                Some(_) => return Err(Fail::Control),
                None => return Err(Fail::Expected("'\"'")),
            }
        }
    }

    fn escape(&mut self, out: &mut String) -> Result<(), Fail> {
        let c = match self.b.get(self.i + 1) {
            Some(b'"') => '"',
            Some(b'\\') => '\\',
            Some(b'/') => '/',
            Some(b'b') => '\u{8}',
            Some(b'f') => '\u{c}',
            Some(b'n') => '\n',
            Some(b'r') => '\r',
            Some(b't') => '\t',
            Some(b'u') => {
                let unit = self.hex4(self.i + 2).ok_or(Fail::BadEscape)?;
                self.i += 6;
                match unit {
                    0xD800..=0xDBFF => {
                        // A high surrogate pairs with an escaped low one
                        // that follows at once; alone it is unpaired.
                        if self.b.get(self.i) == Some(&b'\\')
                            && self.b.get(self.i + 1) == Some(&b'u')
                            && let Some(low @ 0xDC00..=0xDFFF) = self.hex4(self.i + 2)
                        {
                            self.i += 6;
                            let cp = 0x10000 + ((unit - 0xD800) << 10) + (low - 0xDC00);
                            out.push(char::from_u32(cp).expect("a surrogate pair"));
                        } else {
                            self.replaced += 1;
                            out.push('\u{FFFD}');
                        }
                    }
                    0xDC00..=0xDFFF => {
                        self.replaced += 1;
                        out.push('\u{FFFD}');
                    }
                    _ => out.push(char::from_u32(unit).expect("not a surrogate")),
                }
                return Ok(());
            }
            _ => return Err(Fail::BadEscape),
        };
        out.push(c);
        self.i += 2;
        Ok(())
    }

    fn hex4(&self, at: usize) -> Option<u32> {
        let h = self.b.get(at..at + 4)?;
        let mut n = 0;
        for &c in h {
            n = n * 16 + (c as char).to_digit(16)?;
        }
        Some(n)
    }

    fn digits(&mut self) -> usize {
        let s = self.i;
        while let Some(b'0'..=b'9') = self.peek() {
            self.i += 1;
        }
        self.i - s
    }

    fn number(&mut self) -> Result<Value, Fail> {
        let start = self.i;
        if self.peek() == Some(b'-') {
            self.i += 1;
        }
        match self.peek() {
            Some(b'0') => self.i += 1,
            Some(b'1'..=b'9') => {
                self.digits();
            }
            _ => return Err(Fail::Expected("a digit")),
        }
        let mut integer = true;
        if self.peek() == Some(b'.') {
            self.i += 1;
            integer = false;
            if self.digits() == 0 {
                return Err(Fail::Expected("a digit"));
            }
        }
        if let Some(b'e' | b'E') = self.peek() {
            self.i += 1;
            integer = false;
            if let Some(b'+' | b'-') = self.peek() {
                self.i += 1;
            }
            if self.digits() == 0 {
                return Err(Fail::Expected("a digit"));
            }
        }
        let bytes = &self.b[start..self.i];
        // Up to 18 digits fit an i64: the common case, without a parse.
        if integer && bytes.len() <= 18 && bytes != b"-0" {
            let (neg, digits) = match bytes {
                [b'-', rest @ ..] => (true, rest),
                _ => (false, bytes),
            };
            let n = digits
                .iter()
                .fold(0i64, |n, &d| n * 10 + i64::from(d - b'0'));
            return Ok(Value::Number(if neg { -n } else { n }.into()));
        }
        // ASCII by construction.
        let text = std::str::from_utf8(bytes).expect("ASCII digits");
        if integer && text != "-0" {
            if let Ok(n) = text.parse::<u64>() {
                return Ok(Value::Number(n.into()));
            }
            if let Ok(n) = text.parse::<i64>() {
                return Ok(Value::Number(n.into()));
            }
        }
        match Number::from_f64(parse_f64(text)) {
            Some(n) => Ok(Value::Number(n)),
            None => {
                self.replaced += 1;
                Ok(Value::Null)
            }
        }
    }

    fn error(&self, e: Fail) -> FrameError {
        let at = self.i.min(self.b.len());
        let error = match e {
            Fail::TooDeep(limit) => return FrameError::TooDeep { limit },
            Fail::Expected(what) => {
                if let Some(&c) = self.b.get(at)
                    && c >= 0x80
                    && let Err(u) = std::str::from_utf8(&self.b[at..])
                    && u.valid_up_to() == 0
                {
                    return FrameError::InvalidUtf8 { valid_up_to: at };
                }
                match self.b.get(at) {
                    None => format!("expected {what} at byte {at}, found the end"),
                    Some(_) => {
                        let found: String = String::from_utf8_lossy(&self.b[at..])
                            .chars()
                            .next()
                            .map(|c| c.escape_debug().to_string())
                            .unwrap_or_default();
                        format!("expected {what} at byte {at}, found '{found}'")
                    }
                }
            }
            Fail::Control => format!("unescaped control character in a string at byte {at}"),
            Fail::BadEscape => format!("invalid escape in a string at byte {at}"),
        };
        FrameError::Malformed {
            error,
            prefix: String::from_utf8_lossy(&self.b[..self.b.len().min(160)])
                .chars()
                .take(80)
                .collect(),
        }
    }
}

/// The double nearest to a JSON number literal, as `JSON.parse` reads it.
///
/// Rust's parser is exact except that it stops reading an exponent past
/// 65536 (`0.000…1e99999` with enough zeros comes out as `0`), so a long
/// exponent is first folded into the digits' position.
fn parse_f64(text: &str) -> f64 {
    let (mant, exp) = match text.find(['e', 'E']) {
        Some(i) => (&text[..i], &text[i + 1..]),
        None => (text, ""),
    };
    let exp_digits = exp.trim_start_matches(['+', '-']);
    if exp_digits.len() <= 5 {
        return text.parse().expect("a JSON number is a Rust float literal");
    }
    let negative = mant.starts_with('-');
    let mant = mant.trim_start_matches('-');
    let (int, frac) = mant.split_once('.').unwrap_or((mant, ""));
    let digits: String = [int, frac].concat();
    let lead = digits.bytes().take_while(|&b| b == b'0').count();
    let sig = digits[lead..].trim_end_matches('0');
    let sign = if negative { -1.0 } else { 1.0 };
    if sig.is_empty() {
        return sign * 0.0;
    }
    // Saturate far beyond any exponent that matters.
    let e = exp_digits.bytes().fold(0i128, |e, d| {
        (e * 10 + i128::from(d - b'0')).min(1_000_000_000_000_000_000)
    });
    let e = if exp.starts_with('-') { -e } else { e };
    // The value is 0.sig × 10^order.
    let order = int.len() as i128 - lead as i128 + e;
    if order > 400 {
        return sign * f64::INFINITY;
    }
    if order < -400 {
        return sign * 0.0;
    }
    let text = format!("{}0.{sig}e{order}", if negative { "-" } else { "" });
    text.parse().expect("a float literal")
}

/// Whether a line that could not be parsed says it is a `NODE_HANDLE`
/// message: its top-level object has `"cmd":"NODE_HANDLE"`. The scan
/// tolerates anything else in the line (it only follows strings and
/// bracket depth), so a fault deep inside `msg`, or a line cut short, does
/// not hide the claim.
pub(crate) fn claims_node_handle(line: &[u8]) -> bool {
    let mut depth = 0usize;
    let mut top_is_object = false;
    // A top-level string just seen, with nothing but whitespace since.
    let mut last_string: Option<&[u8]> = None;
    // Just seen a top-level `"cmd" :`.
    let mut cmd_value_next = false;
    let mut i = 0;
    while i < line.len() {
        let c = line[i];
        match c {
            b' ' | b'\t' | b'\r' | b'\n' => {
                i += 1;
                continue;
            }
            b'"' => {
                let start = i + 1;
                i += 1;
                while i < line.len() && line[i] != b'"' {
                    if line[i] == b'\\' {
                        i += 1;
                    }
                    i += 1;
                }
                let s = &line[start..i.min(line.len())];
                i += 1;
                if depth == 1 && top_is_object {
                    if cmd_value_next && s == b"NODE_HANDLE" {
                        return true;
                    }
                    last_string = Some(s);
                } else {
                    last_string = None;
                }
                cmd_value_next = false;
                continue;
            }
            b':' if depth == 1 => cmd_value_next = last_string == Some(b"cmd"),
            b'{' | b'[' => {
                if depth == 0 {
                    top_is_object = c == b'{';
                }
                depth += 1;
                cmd_value_next = false;
            }
            b'}' | b']' => {
                depth = depth.saturating_sub(1);
                cmd_value_next = false;
            }
            _ => cmd_value_next = false,
        }
        last_string = None;
        i += 1;
    }
    false
}

/// serde_json's writer with JavaScript's number format.
#[derive(Clone, Copy, Debug)]
pub(crate) struct JsFormatter;

impl serde_json::ser::Formatter for JsFormatter {
    fn write_f64<W: ?Sized + io::Write>(&mut self, w: &mut W, v: f64) -> io::Result<()> {
        // Whole numbers that a double holds exactly print as integers.
        if v.fract() == 0.0 && v.abs() < 9007199254740992.0 {
            return write!(w, "{}", v as i64);
        }
        w.write_all(js_number(v, format!("{:e}", v.abs())).as_bytes())
    }

    fn write_f32<W: ?Sized + io::Write>(&mut self, w: &mut W, v: f32) -> io::Result<()> {
        w.write_all(js_number(f64::from(v), format!("{:e}", v.abs())).as_bytes())
    }
}

/// `Number.prototype.toString()` of a finite `v`, given the shortest
/// round-trip digits of `|v|` in Rust's `{:e}` form (`1.2345e-7`):
/// ECMA-262 `Number::toString`, steps for radix 10.
fn js_number(v: f64, exp_form: String) -> String {
    if v == 0.0 {
        return "0".into();
    }
    let (mant, exp) = exp_form.split_once('e').expect("{:e} has an exponent");
    let digits: String = mant.chars().filter(|&c| c != '.').collect();
    let k = digits.len() as i64;
    // v = 0.digits × 10^n
    let n = exp.parse::<i64>().expect("{:e} exponent") + 1;
    let mut s = String::with_capacity(32);
    if v < 0.0 {
        s.push('-');
    }
    if k <= n && n <= 21 {
        s.push_str(&digits);
        s.extend(std::iter::repeat_n('0', (n - k) as usize));
    } else if 0 < n && n <= 21 {
        s.push_str(&digits[..n as usize]);
        s.push('.');
        s.push_str(&digits[n as usize..]);
    } else if -6 < n && n <= 0 {
        s.push_str("0.");
        s.extend(std::iter::repeat_n('0', (-n) as usize));
        s.push_str(&digits);
    } else {
        let e = n - 1;
        s.push_str(&digits[..1]);
        if k > 1 {
            s.push('.');
            s.push_str(&digits[1..]);
        }
        s.push('e');
        s.push(if e < 0 { '-' } else { '+' });
        s.push_str(&e.abs().to_string());
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn ok(s: &str) -> (Value, bool) {
        let p = parse(s.as_bytes(), 100).unwrap_or_else(|e| panic!("{s:?}: {e}"));
        (p.value, p.exact)
    }

    fn bad(s: &[u8]) -> FrameError {
        parse(s, 100).expect_err(&String::from_utf8_lossy(s))
    }

    #[test]
    fn values_as_json_parse_reads_them() {
        assert_eq!(
            ok(" {\"a\" : [1, -2, 1.5, true, false, null, \"x\"]}\r"),
            (json!({"a":[1,-2,1.5,true,false,null,"x"]}), true)
        );
        assert_eq!(
            ok("\"\\\"\\\\\\/\\b\\f\\n\\r\\t\\u00e9\\u20AC\""),
            (json!("\"\\/\u{8}\u{c}\n\r\té€"), true)
        );
        assert_eq!(ok("\"\\ud83d\\ude00\"").0, json!("😀"));
        assert_eq!(ok("{\"a\":1,\"a\":2}").0, json!({"a":2}));
        assert_eq!(ok("\"\u{7f}\u{2028}\"").0, json!("\u{7f}\u{2028}"));
    }

    #[test]
    fn lone_surrogates_become_replacement_characters() {
        for (line, want) in [
            ("\"a\\ud800b\"", "a\u{FFFD}b"),
            ("\"\\udc00\"", "\u{FFFD}"),
            ("\"\\ud800\\ud800\\udc00\"", "\u{FFFD}\u{10000}"),
            ("\"\\ud800\\n\"", "\u{FFFD}\n"),
            ("\"\\ud800\"", "\u{FFFD}"),
        ] {
            assert_eq!(ok(line), (json!(want), false), "{line}");
        }
    }

    #[test]
    fn invalid_utf8_in_strings_is_replaced_outside_is_an_error() {
        let p = parse(b"[\"a\xffb\xf0\x9f\x98\"]", 10).unwrap();
        assert_eq!(p.value, json!(["a\u{FFFD}b\u{FFFD}"]));
        assert!(!p.exact);
        assert_eq!(bad(b"[1,\xff]"), FrameError::InvalidUtf8 { valid_up_to: 3 });
        assert!(matches!(
            bad("[1,é]".as_bytes()),
            FrameError::Malformed { .. }
        ));
    }

    #[test]
    fn numbers_as_javascript_reads_them() {
        assert_eq!(ok("18446744073709551615").0, json!(u64::MAX));
        assert_eq!(ok("-9223372036854775808").0, json!(i64::MIN));
        assert_eq!(ok("100000000000000000000").0, json!(1e20));
        let (z, exact) = ok("-0");
        assert!(exact && z.as_f64().unwrap().is_sign_negative());
        assert_eq!(ok("1e-400").0, json!(0.0));
        assert_eq!(ok("1E+2").0, json!(100.0));
        assert_eq!(
            ok("[1e400,-1e999999999999999999999]"),
            (json!([null, null]), false)
        );
        for s in [
            "01", "-", "1.", ".5", "+1", "1e", "1e+", "0x1", "NaN", "Infinity", "-01",
        ] {
            assert!(
                matches!(bad(s.as_bytes()), FrameError::Malformed { .. }),
                "{s}"
            );
        }
    }

    #[test]
    fn syntax_errors_are_malformed() {
        for s in [
            "",
            " ",
            "[1,]",
            "{\"a\":1,}",
            "{a:1}",
            "'a'",
            "[1 2]",
            "\"a",
            "\"\\x\"",
            "\"\\u12\"",
            "\"\t\"",
            "nul",
            "truex",
            "[]]",
            "{\"a\" 1}",
            "\u{feff}1",
        ] {
            assert!(
                matches!(bad(s.as_bytes()), FrameError::Malformed { .. }),
                "{s:?}"
            );
        }
    }

    #[test]
    fn depth_is_bounded_without_recursion() {
        assert_eq!(bad(&[b'['; 101]), FrameError::TooDeep { limit: 100 });
        let ok100 = format!("{}{}", "[".repeat(100), "]".repeat(100));
        assert!(parse(ok100.as_bytes(), 100).is_ok());
        // A million open brackets: an error, not a stack overflow.
        assert_eq!(
            parse(&vec![b'['; 1 << 20], usize::MAX).unwrap_err(),
            (FrameError::Malformed {
                error: format!("expected a value at byte {}, found the end", 1 << 20),
                prefix: "[".repeat(80)
            })
        );
    }

    #[test]
    fn msg_span_of_a_handle_wrapper() {
        let line = br#"{"cmd":"NODE_HANDLE","type":"net.Native","msg": {"x":"\ud800"} ,"k":1}"#;
        let p = parse(line, 10).unwrap();
        let m = p.msg.unwrap();
        assert_eq!(&line[m.start..m.end], br#"{"x":"\ud800"}"#);
        assert!(!m.exact && !p.exact);
        let p = parse(br#"{"msg":1,"b":"\udc00"}"#, 10).unwrap();
        assert!(p.msg.unwrap().exact && !p.exact);
        assert!(parse(br#"[{"msg":1}]"#, 10).unwrap().msg.is_none());
    }

    #[test]
    fn claims() {
        assert!(claims_node_handle(
            br#"{"cmd":"NODE_HANDLE","type":"net.Native","msg":[[[[oops"#
        ));
        assert!(claims_node_handle(
            br#"{"msg":{"bad":},"cmd" : "NODE_HANDLE"}"#
        ));
        assert!(!claims_node_handle(br#"{"msg":{"cmd":"NODE_HANDLE"}}"#));
        assert!(!claims_node_handle(br#"{"cmd":"NODE_HANDLE_ACK"}"#));
        assert!(!claims_node_handle(br#"{"x":"NODE_HANDLE"}"#));
        assert!(!claims_node_handle(br#"["cmd","NODE_HANDLE"]"#));
        assert!(!claims_node_handle(b"garbage"));
    }

    #[test]
    fn numbers_as_javascript_writes_them() {
        let js = |v: f64| {
            let mut out = Vec::new();
            serde_json::ser::Formatter::write_f64(&mut JsFormatter, &mut out, v).unwrap();
            String::from_utf8(out).unwrap()
        };
        for (v, want) in [
            (0.0, "0"),
            (-0.0, "0"),
            (100.0, "100"),
            (1.5, "1.5"),
            (-1.5, "-1.5"),
            (0.1, "0.1"),
            (1e21, "1e+21"),
            (1e20, "100000000000000000000"),
            (1.2345678901234569e23, "1.2345678901234569e+23"),
            (1e-7, "1e-7"),
            (1.5e-7, "1.5e-7"),
            (0.000001, "0.000001"),
            (123456.789, "123456.789"),
            (5e-324, "5e-324"),
            (f64::MAX, "1.7976931348623157e+308"),
            (9007199254740994.0, "9007199254740994"),
        ] {
            assert_eq!(js(v), want, "{v:e}");
        }
    }
}
