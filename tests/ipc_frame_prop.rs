//! Property tests of the IPC framing ([`Decoder`]): whatever the bytes and
//! however they are chunked, the decoder does not panic, reassembles valid
//! streams exactly, holds no more than its limit, and skips a line over the
//! limit without losing the lines after it.

use proptest::prelude::*;
use serde_json::Value;
use uvcluster::ipc::{Decoder, FrameError, encode, parse_line};

/// Arbitrary JSON values (floats that are not integers: JavaScript's format
/// writes `2.0` as `2`, which reads back as an integer).
fn json_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        (-1000i32..1000).prop_map(|n| Value::from(f64::from(n) / 8.0 + 1.0 / 1024.0)),
        any::<String>().prop_map(Value::String),
        "[\\n\\r\"\\\\{}é😀\u{2028}a-z]{0,12}".prop_map(Value::String),
    ];
    leaf.prop_recursive(4, 64, 8, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..8).prop_map(Value::Array),
            prop::collection::btree_map(any::<String>(), inner, 0..8)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

/// Splits `bytes` at the given cut points (taken modulo the length).
fn chunks(bytes: &[u8], cuts: &[usize]) -> Vec<Vec<u8>> {
    let mut at: Vec<usize> = cuts
        .iter()
        .map(|c| c % (bytes.len() + 1))
        .collect::<Vec<_>>();
    at.push(0);
    at.push(bytes.len());
    at.sort_unstable();
    at.dedup();
    at.windows(2).map(|w| bytes[w[0]..w[1]].to_vec()).collect()
}

/// Feeds the chunks, draining after each; returns every item and checks
/// the buffer bound after each drain.
fn feed(d: &mut Decoder, parts: &[Vec<u8>], limit: usize) -> Vec<Result<Vec<u8>, FrameError>> {
    let mut out = Vec::new();
    for p in parts {
        d.push(p);
        while let Some(item) = d.next_line() {
            out.push(item.map(<[u8]>::to_vec));
        }
        assert!(
            d.buffered() <= limit,
            "holds {} bytes with a limit of {limit}",
            d.buffered()
        );
    }
    out
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn random_bytes_never_panic_and_stay_bounded(
        bytes in prop::collection::vec(
            prop_oneof![Just(b'\n'), Just(b'{'), Just(b'"'), any::<u8>()], 0..2048),
        cuts in prop::collection::vec(any::<usize>(), 0..32),
        limit in 0usize..512,
    ) {
        let mut d = Decoder::new(limit);
        let items = feed(&mut d, &chunks(&bytes, &cuts), limit);
        let mut oversized = false;
        for item in &items {
            match item {
                Ok(line) => {
                    prop_assert!(!line.is_empty() && line.len() <= limit);
                    prop_assert!(!line.contains(&b'\n'));
                    let _ = parse_line(line);
                }
                Err(FrameError::Oversized { size, limit: l }) => {
                    prop_assert_eq!(*l, limit);
                    prop_assert!(*size > limit);
                    oversized = true;
                }
                Err(FrameError::EmptyLine) => {}
                Err(e) => prop_assert!(false, "unexpected {:?}", e),
            }
        }
        let _ = d.finish();
        // The same bytes in one piece give the same items (an oversized
        // line is reported when the limit is passed, so its size depends on
        // the chunks).
        let mut whole = Decoder::new(limit);
        let once = feed(&mut whole, std::slice::from_ref(&bytes), limit);
        if !oversized {
            prop_assert_eq!(&once, &items);
        } else {
            let oks = |v: &[Result<Vec<u8>, FrameError>]| {
                v.iter().filter_map(|i| i.as_ref().ok().cloned()).collect::<Vec<_>>()
            };
            prop_assert_eq!(oks(&once), oks(&items));
        }
    }

    #[test]
    fn valid_streams_reassemble_however_split(
        values in prop::collection::vec(json_value(), 0..16),
        cuts in prop::collection::vec(any::<usize>(), 0..64),
    ) {
        let mut stream = Vec::new();
        let mut longest = 0;
        for v in &values {
            let frame = encode(v).unwrap();
            longest = longest.max(frame.len() - 1);
            stream.extend_from_slice(&frame);
        }
        // A limit of exactly the longest message still passes.
        let limit = longest;
        let mut d = Decoder::new(limit);
        let items = feed(&mut d, &chunks(&stream, &cuts), limit);
        let got: Vec<Value> = items
            .into_iter()
            .map(|i| parse_line(&i.unwrap()).unwrap())
            .collect();
        prop_assert_eq!(got, values);
        prop_assert!(d.at_boundary());
        prop_assert_eq!(d.finish(), Ok(()));
    }

    #[test]
    fn lines_over_the_limit_are_skipped_and_the_rest_reassemble(
        values in prop::collection::vec(json_value(), 0..16),
        cuts in prop::collection::vec(any::<usize>(), 0..64),
        limit in 1usize..64,
    ) {
        let mut stream = Vec::new();
        let mut short = Vec::new();
        let mut long = 0;
        for v in &values {
            let frame = encode(v).unwrap();
            if frame.len() - 1 <= limit {
                short.push(v.clone());
            } else {
                long += 1;
            }
            stream.extend_from_slice(&frame);
        }
        let mut d = Decoder::new(limit);
        let items = feed(&mut d, &chunks(&stream, &cuts), limit);
        let mut got = Vec::new();
        let mut skipped = 0;
        for i in items {
            match i {
                Ok(line) => got.push(parse_line(&line).unwrap()),
                Err(FrameError::Oversized { size, limit: l }) => {
                    prop_assert!(size > limit && l == limit);
                    skipped += 1;
                }
                Err(e) => prop_assert!(false, "unexpected {:?}", e),
            }
        }
        prop_assert_eq!(got, short);
        prop_assert_eq!(skipped, long);
        prop_assert!(d.at_boundary());
        prop_assert_eq!(d.finish(), Ok(()));
    }

    #[test]
    fn truncated_valid_stream_reports_what_was_left(
        values in prop::collection::vec(json_value(), 1..8),
        cut in any::<usize>(),
    ) {
        let mut stream = Vec::new();
        for v in &values {
            stream.extend_from_slice(&encode(v).unwrap());
        }
        let end = cut % stream.len();
        let mut d = Decoder::new(usize::MAX);
        let items = feed(&mut d, &[stream[..end].to_vec()], usize::MAX);
        let complete = stream[..end].iter().filter(|&&b| b == b'\n').count();
        prop_assert_eq!(items.len(), complete);
        let tail = end - stream[..end].iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1);
        match d.finish() {
            Ok(()) => prop_assert_eq!(tail, 0),
            Err(e) => prop_assert_eq!(e, FrameError::TruncatedAtEof { size: tail }),
        }
    }
}
