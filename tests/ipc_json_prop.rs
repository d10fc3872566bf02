//! The IPC JSON codec against JavaScript: values generated the way
//! JavaScript holds them (UTF-16 strings with unpaired surrogates, doubles
//! with `-0`, huge and tiny magnitudes, deep and wide nesting, every control
//! character), written as `JSON.stringify` writes them, must decode; a
//! sample is checked against real `node` (`tests/node/json_canon.js`) in
//! both directions; and no input makes the decoder panic.

mod util;

use std::io::{Read, Write};
use std::path::PathBuf;
use std::process::{Command, Stdio};

use proptest::prelude::*;
use proptest::strategy::ValueTree;
use proptest::test_runner::TestRunner;
use serde_json::Value;
use uvcluster::ipc::{FrameError, RawMessage, encode, parse_line};

// ----- JavaScript values ------------------------------------------------------

/// A JavaScript value as `JSON.stringify` sees it.
#[derive(Clone, Debug)]
enum Js {
    Null,
    Bool(bool),
    Num(f64),
    /// UTF-16 code units, paired or not.
    Str(Vec<u16>),
    Arr(Vec<Js>),
    /// Keys are distinct and never look like array indices (JavaScript
    /// would move those first).
    Obj(Vec<(Vec<u16>, Js)>),
}

fn code_units() -> impl Strategy<Value = Vec<u16>> {
    prop::collection::vec(
        prop_oneof![
            0u16..0x20,
            0x20u16..0x7f,
            Just(0x7f),
            Just(u16::from(b'"')),
            Just(u16::from(b'\\')),
            Just(0x2028),
            Just(0xfeff),
            0xd800u16..0xe000,
            any::<u16>(),
        ],
        0..12,
    )
}

fn number() -> impl Strategy<Value = f64> {
    prop_oneof![
        any::<f64>(),
        Just(-0.0),
        Just(1e21),
        Just(1e-7),
        Just(5e-324),
        Just(f64::MAX),
        Just(f64::MIN_POSITIVE),
        Just(9007199254740994.0),
        Just(12345678901234567000.0),
        (-1_000_000i64..1_000_000).prop_map(|n| n as f64),
        (-1e6f64..1e6),
        any::<i64>().prop_map(|n| n as f64),
    ]
}

fn js_value() -> impl Strategy<Value = Js> {
    let leaf = prop_oneof![
        Just(Js::Null),
        any::<bool>().prop_map(Js::Bool),
        number().prop_map(Js::Num),
        code_units().prop_map(Js::Str),
    ];
    leaf.prop_recursive(6, 96, 10, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..10).prop_map(Js::Arr),
            prop::collection::vec((code_units(), inner), 0..10).prop_map(|kv| {
                let mut seen = std::collections::HashSet::new();
                Js::Obj(
                    kv.into_iter()
                        .map(|(mut k, v)| {
                            k.insert(0, u16::from(b'k'));
                            (k, v)
                        })
                        .filter(|(k, _)| seen.insert(k.clone()))
                        .collect(),
                )
            }),
        ]
    })
}

/// `v` inside `depth` arrays and objects, alternately.
fn deep(depth: usize, v: Js) -> Js {
    (0..depth).fold(v, |v, i| {
        if i % 2 == 0 {
            Js::Arr(vec![v])
        } else {
            Js::Obj(vec![(vec![u16::from(b'k')], v)])
        }
    })
}

/// Whether `JSON.stringify` writes something a `Value` cannot hold.
fn has_lone_surrogate(v: &Js) -> bool {
    fn lone(s: &[u16]) -> bool {
        char::decode_utf16(s.iter().copied()).any(|c| c.is_err())
    }
    match v {
        Js::Str(s) => lone(s),
        Js::Arr(a) => a.iter().any(has_lone_surrogate),
        Js::Obj(o) => o.iter().any(|(k, v)| lone(k) || has_lone_surrogate(v)),
        _ => false,
    }
}

/// `JSON.stringify(v)`, ECMA-262 `SerializeJSONProperty` and
/// `QuoteJSONString`. Numbers go through `encode` (whose format node
/// checks below).
fn stringify(v: &Js, out: &mut Vec<u8>) {
    match v {
        Js::Null => out.extend_from_slice(b"null"),
        Js::Bool(b) => out.extend_from_slice(if *b { b"true" } else { b"false" }),
        Js::Num(n) => {
            let mut s = encode(n).unwrap();
            s.pop();
            out.extend_from_slice(&s);
        }
        Js::Str(s) => quote(s, out),
        Js::Arr(a) => {
            out.push(b'[');
            for (i, v) in a.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                stringify(v, out);
            }
            out.push(b']');
        }
        Js::Obj(o) => {
            out.push(b'{');
            for (i, (k, v)) in o.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                quote(k, out);
                out.push(b':');
                stringify(v, out);
            }
            out.push(b'}');
        }
    }
}

fn quote(s: &[u16], out: &mut Vec<u8>) {
    out.push(b'"');
    for c in char::decode_utf16(s.iter().copied()) {
        match c {
            Ok('"') => out.extend_from_slice(b"\\\""),
            Ok('\\') => out.extend_from_slice(b"\\\\"),
            Ok('\u{8}') => out.extend_from_slice(b"\\b"),
            Ok('\u{c}') => out.extend_from_slice(b"\\f"),
            Ok('\n') => out.extend_from_slice(b"\\n"),
            Ok('\r') => out.extend_from_slice(b"\\r"),
            Ok('\t') => out.extend_from_slice(b"\\t"),
            Ok(c) if (c as u32) < 0x20 => {
                out.extend_from_slice(format!("\\u{:04x}", c as u32).as_bytes())
            }
            Ok(c) => out.extend_from_slice(c.encode_utf8(&mut [0; 4]).as_bytes()),
            Err(e) => {
                out.extend_from_slice(format!("\\u{:04x}", e.unpaired_surrogate()).as_bytes())
            }
        }
    }
    out.push(b'"');
}

fn line_of(v: &Js) -> Vec<u8> {
    let mut out = Vec::new();
    stringify(v, &mut out);
    out
}

// ----- serde values (what a Rust sender holds) -------------------------------

fn rust_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        // Integers JavaScript holds exactly.
        (-(1i64 << 53)..=(1i64 << 53)).prop_map(Value::from),
        number()
            .prop_filter("finite", |f| f.is_finite())
            .prop_map(Value::from),
        any::<String>().prop_map(Value::String),
        "[\\x00-\\x1f\"\\\\/\u{7f}\u{2028}é😀a-z]{0,12}".prop_map(Value::String),
    ];
    leaf.prop_recursive(6, 96, 10, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..10).prop_map(Value::Array),
            prop::collection::btree_map(any::<String>(), inner, 0..10).prop_map(|m| {
                Value::Object(m.into_iter().map(|(k, v)| (format!("k{k}"), v)).collect())
            }),
        ]
    })
}

/// Equality as JavaScript sees it: numbers by value (`2` is `2.0`, `-0` is
/// `0`), integers beyond 2^53 exactly.
fn js_eq(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::Number(x), Value::Number(y)) => {
            if let (Some(x), Some(y)) = (x.as_i64(), y.as_i64()) {
                return x == y;
            }
            if let (Some(x), Some(y)) = (x.as_u64(), y.as_u64()) {
                return x == y;
            }
            x.as_f64() == y.as_f64()
        }
        (Value::Array(x), Value::Array(y)) => {
            x.len() == y.len() && x.iter().zip(y).all(|(a, b)| js_eq(a, b))
        }
        (Value::Object(x), Value::Object(y)) => {
            x.len() == y.len() && x.iter().all(|(k, v)| y.get(k).is_some_and(|w| js_eq(v, w)))
        }
        _ => a == b,
    }
}

// ----- real node ----------------------------------------------------------------

/// Runs `tests/node/json_canon.js` over `lines`: for each, node's
/// `JSON.stringify` of what its `JSON.parse` read, surrogates replaced and
/// keys sorted (or `ERR ...`).
fn node_canon(lines: &[Vec<u8>]) -> Vec<String> {
    util::require_node();
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/node/json_canon.js");
    // A deeper stack than the default, for the recursion of `norm` over
    // values nested 4183 deep (4 MB, within the 8 MB of a main thread).
    let mut child = Command::new("node")
        .arg("--stack-size=4000")
        .arg(script)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let input: Vec<u8> = lines
        .iter()
        .flat_map(|l| [&l[..], b"\n"].concat())
        .collect();
    let writer = std::thread::spawn(move || stdin.write_all(&input).unwrap());
    let mut out = String::new();
    child
        .stdout
        .take()
        .unwrap()
        .read_to_string(&mut out)
        .unwrap();
    writer.join().unwrap();
    assert!(child.wait().unwrap().success());
    let got: Vec<String> = out.lines().map(str::to_owned).collect();
    assert_eq!(got.len(), lines.len(), "node answered {} lines", got.len());
    got
}

/// Our canonical form of a line: decode, then encode (serde_json's maps
/// are sorted by code point already).
fn our_canon(line: &[u8]) -> String {
    let v = parse_line(line).unwrap_or_else(|e| panic!("{e}: {:?}", String::from_utf8_lossy(line)));
    let mut s = encode(&v).unwrap();
    s.pop();
    String::from_utf8(s).unwrap()
}

fn sample<S: Strategy>(s: S, n: usize) -> Vec<S::Value> {
    let mut runner = TestRunner::deterministic();
    (0..n)
        .map(|_| s.new_tree(&mut runner).unwrap().current())
        .collect()
}

/// Runs `f` on a thread with a large stack: deep `Value`s are dropped,
/// compared and serialized recursively.
fn big_stack(f: impl FnOnce() + Send + 'static) {
    std::thread::Builder::new()
        .stack_size(256 << 20)
        .spawn(f)
        .unwrap()
        .join()
        .unwrap();
}

/// Lines JavaScript writes, decoded here and by node: the same value
/// (after node replaces unpaired surrogates, as we do), byte for byte.
#[test]
fn decoder_agrees_with_node_on_what_json_stringify_writes() {
    big_stack(|| {
        let mut values = sample(js_value(), 500);
        values.push(deep(4183, Js::Num(-0.0)));
        values.push(deep(3000, Js::Str(vec![0xd800, u16::from(b'x')])));
        values.push(Js::Arr(
            (0..20_000).map(|i| Js::Num(f64::from(i) / 7.0)).collect(),
        ));
        values.push(Js::Obj(
            (0..5000u16)
                .map(|i| {
                    (
                        vec![u16::from(b'k'), 0xdc00 + (i % 1024), i],
                        Js::Bool(true),
                    )
                })
                .collect(),
        ));
        let mut lines: Vec<Vec<u8>> = values.iter().map(line_of).collect();
        // Not JSON.stringify's output, but JSON.parse's input all the same.
        for extra in [
            &b"-0"[..],
            b"1e400",
            b"[-1e400, 1E-400, 0.0000001e7]",
            b" { \"a\" : [ 1 , 2 ] }\r",
            b"\"\\u00e9\\uD83D\\uDE00\\/\"",
            b"{\"a\":1,\"a\":2}",
            b"123456789012345678901234567890",
            b"\"\xff\xfe\xed\xa0\x80\"",
        ] {
            lines.push(extra.to_vec());
        }
        // Exponents Rust's own float parser stops reading.
        let zeros = "0".repeat(70_000);
        lines.push(format!("0.{zeros}1e0000000070002").into_bytes());
        lines.push(format!("[-1{zeros}e-0000070001, 0.{zeros}1e99999999999]").into_bytes());
        let node = node_canon(&lines);
        for (i, line) in lines.iter().enumerate() {
            let ours = our_canon(line);
            assert_eq!(
                ours,
                node[i],
                "line {i}: {:?}",
                String::from_utf8_lossy(&line[..line.len().min(200)])
            );
            let m = RawMessage::parse(line).unwrap();
            assert_eq!(&m.json()[..], &line[..]);
            if let Some(v) = values.get(i) {
                assert_eq!(m.is_exact(), !has_lone_surrogate(v), "line {i}");
            }
        }
    });
}

/// What we send is what `JSON.stringify` writes for the value node reads
/// from it, byte for byte, and it reads back the same.
#[test]
fn encoder_writes_what_json_stringify_writes() {
    let values = sample(rust_value(), 500);
    let lines: Vec<Vec<u8>> = values
        .iter()
        .map(|v| {
            let mut l = encode(v).unwrap();
            assert_eq!(l.pop(), Some(b'\n'));
            assert!(!l.contains(&b'\n'));
            l
        })
        .collect();
    let node = node_canon(&lines);
    for (i, (v, line)) in values.iter().zip(&lines).enumerate() {
        assert_eq!(String::from_utf8_lossy(line), node[i], "value {i}: {v:?}");
        let back = parse_line(line).unwrap();
        assert!(js_eq(&back, v), "value {i}: {v:?} came back as {back:?}");
    }
}

/// Pieces of JSON, and of broken JSON, for the byte soup below.
const TOKENS: &[&[u8]] = &[
    b"{",
    b"}",
    b"[",
    b"]",
    b",",
    b":",
    b"\"",
    b"\\",
    b"\\u",
    b"\\ud800",
    b"\\udc00",
    b"d8",
    b"-",
    b"0",
    b"1e",
    b".",
    b"+",
    b"true",
    b"nul",
    b" ",
    b"\r",
    b"\xff",
    b"\xc3",
    b"\xe2\x80\xa8",
    b"\"cmd\":\"NODE_HANDLE\"",
];

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn every_line_javascript_writes_decodes(v in js_value()) {
        let line = line_of(&v);
        let m = RawMessage::parse(&line);
        prop_assert!(m.is_ok(), "{:?}: {:?}", String::from_utf8_lossy(&line), m);
        let m = m.unwrap();
        prop_assert_eq!(m.is_exact(), !has_lone_surrogate(&v));
        prop_assert_eq!(&m.json()[..], &line[..]);
        // Decoding what we encode of it changes nothing more.
        let again = parse_line(&encode(m.value()).unwrap()[..]).unwrap();
        prop_assert!(js_eq(&again, m.value()));
    }

    #[test]
    fn rust_values_round_trip(v in rust_value()) {
        let line = encode(&v).unwrap();
        let back = parse_line(&line[..line.len() - 1]).unwrap();
        prop_assert!(js_eq(&back, &v), "{:?} came back as {:?}", v, back);
    }

    /// Bytes from JSON's alphabet and anything else: the decoder returns,
    /// never panics, and an error is typed.
    #[test]
    fn arbitrary_bytes_never_panic(
        bytes in prop::collection::vec(
            prop_oneof![
                prop::sample::select(TOKENS).prop_map(<[u8]>::to_vec),
                any::<u8>().prop_map(|b| vec![b]),
            ],
            0..200,
        ),
    ) {
        let line: Vec<u8> = bytes.concat();
        match parse_line(&line) {
            Ok(_) => prop_assert!(RawMessage::parse(&line).is_ok()),
            Err(FrameError::Malformed { .. } | FrameError::InvalidUtf8 { .. }) => {}
            Err(FrameError::TooDeep { limit }) => {
                prop_assert_eq!(limit, uvcluster::ipc::DEFAULT_MAX_DEPTH)
            }
            Err(e) => prop_assert!(false, "unexpected {:?}", e),
        }
    }
}

/// Inputs built to be slow or deep finish at once: the decoder is one pass.
#[test]
fn adversarial_lines_finish() {
    let start = std::time::Instant::now();
    let cases: Vec<Vec<u8>> = vec![
        vec![b'['; 8 << 20],
        [b"\"", &b"\\ud800".repeat(1 << 20)[..], b"\""].concat(),
        [&b"1"[..], &vec![b'0'; 1 << 20], b"e-1048576"].concat(),
        [&b"0."[..], &vec![b'0'; 1 << 20], b"1e99999999999999999999"].concat(),
        b"{\"a\":".repeat(1 << 20),
    ];
    let want_ok = [false, true, true, true, false];
    for (c, ok) in cases.iter().zip(want_ok) {
        assert_eq!(parse_line(c).is_ok(), ok, "{:?}", &c[..20]);
    }
    assert_eq!(
        parse_line(&[&b"0."[..], &vec![b'0'; 1 << 20], b"1e99999999999999999999"].concat())
            .unwrap(),
        Value::Null
    );
    // Generous: a second per megabyte would still mean linear time.
    assert!(start.elapsed() < std::time::Duration::from_secs(30));
}
