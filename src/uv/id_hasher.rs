//! One cheap hasher for the maps keyed by ids this process assigns itself.

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};

/// The hasher of maps keyed by an id this process assigned (a handle, a
/// `seq`, a write number): no peer chooses the keys, so there is nothing
/// to defend against, and one rotate-xor-multiply per word spreads them,
/// where the default SipHash cost a few hundred instructions per lookup on
/// the per-connection paths of `ipc` and `net` (BENCHMARKS.md, "Round-robin's
/// cost per connection, counted").
#[derive(Default)]
pub(crate) struct IdHasher(u64);

impl Hasher for IdHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.write_u64(u64::from(b));
        }
    }
    fn write_u32(&mut self, n: u32) {
        self.write_u64(u64::from(n));
    }
    fn write_u64(&mut self, n: u64) {
        self.0 = (self.0.rotate_left(5) ^ n).wrapping_mul(0x51_7c_c1_b7_27_22_0a_95);
    }
}

/// A map keyed by an id of ours (see [`IdHasher`]).
pub(crate) type IdMap<K, V> = HashMap<K, V, BuildHasherDefault<IdHasher>>;
