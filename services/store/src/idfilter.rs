//! A Bloom filter over a store's id index, in memory: most appends carry an id the room has never
//! had, and the filter answers those without a read of the store.
//!
//! It may only say "maybe" for an id it was never given (then the store is read as before), never
//! "no" for one it was: every (room, id) the store's writer indexes is added before its
//! transaction commits, and the filter starts from a scan of the whole index. So it is only
//! correct in a process whose store no other process writes (see
//! [`crate::SqliteStore::filter_ids`]).

use std::hash::{BuildHasher, BuildHasherDefault, DefaultHasher};

/// Bits per id: with [`HASHES`] probes, about 0.24% of unseen ids still read the store.
const BITS_PER_ID: u64 = 16;
const HASHES: usize = 4;
/// 1 Mi bits (128 KiB): an empty store's filter.
const MIN_BITS: u64 = 1 << 20;
/// 512 Mi bits (64 MiB): about 33 million ids at [`BITS_PER_ID`]; past that the filter only
/// fills up, and more unseen ids read the store (it stays correct).
const MAX_BITS: u64 = 1 << 29;

pub(crate) struct IdFilter {
    bits: Vec<u64>,
    /// The number of bits, minus one (a power of two).
    mask: u64,
    /// Ids added (resends and replays included).
    added: u64,
}

impl IdFilter {
    /// An empty filter sized for `ids` ids and as many again.
    pub(crate) fn for_ids(ids: u64) -> IdFilter {
        let bits = ids
            .saturating_mul(2 * BITS_PER_ID)
            .next_power_of_two()
            .clamp(MIN_BITS, MAX_BITS);
        IdFilter {
            bits: vec![0; (bits / 64) as usize],
            mask: bits - 1,
            added: 0,
        }
    }

    /// The key of an id in a room: `head` is already a digest of the id (uniform), the room's
    /// name is hashed in so the same id in two rooms is two keys.
    pub(crate) fn key(room: &str, head: [u8; 8]) -> u64 {
        Self::key_in(Self::room_hash(room), head)
    }

    /// The room's part of its keys, for adding many of its ids.
    pub(crate) fn room_hash(room: &str) -> u64 {
        BuildHasherDefault::<DefaultHasher>::default().hash_one(room)
    }

    /// [`IdFilter::key`] with the room already hashed.
    pub(crate) fn key_in(room_hash: u64, head: [u8; 8]) -> u64 {
        u64::from_le_bytes(head)
            ^ room_hash
                .rotate_left(29)
                .wrapping_mul(0x9E37_79B9_7F4A_7C15)
    }

    /// The bits of `key` (double hashing).
    fn probes(&self, key: u64) -> [u64; HASHES] {
        let step = (key.rotate_left(32).wrapping_mul(0xBF58_476D_1CE4_E5B9) >> 1) | 1;
        std::array::from_fn(|i| key.wrapping_add((i as u64).wrapping_mul(step)) & self.mask)
    }

    pub(crate) fn add(&mut self, key: u64) {
        for bit in self.probes(key) {
            self.bits[(bit / 64) as usize] |= 1 << (bit % 64);
        }
        self.added += 1;
    }

    /// `false` only for a key never added.
    pub(crate) fn may_contain(&self, key: u64) -> bool {
        self.probes(key)
            .iter()
            .all(|&bit| self.bits[(bit / 64) as usize] & (1 << (bit % 64)) != 0)
    }

    /// Holds more ids than it was sized for, and could be larger: time to build it again.
    pub(crate) fn outgrown(&self) -> bool {
        self.added.saturating_mul(BITS_PER_ID) > self.mask + 1 && self.mask + 1 < MAX_BITS
    }

    /// The ids it holds (to size the next one).
    pub(crate) fn added(&self) -> u64 {
        self.added
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn head(n: u64) -> [u8; 8] {
        // Uniform like the real heads (a digest).
        n.wrapping_mul(0x9E37_79B9_7F4A_7C15).to_le_bytes()
    }

    #[test]
    fn never_says_no_to_an_added_id_and_rarely_yes_to_another() {
        let mut filter = IdFilter::for_ids(50_000);
        for n in 0..50_000 {
            filter.add(IdFilter::key("general", head(n)));
        }
        assert!((0..50_000).all(|n| filter.may_contain(IdFilter::key("general", head(n)))));
        let false_hits = (50_000..150_000)
            .filter(|&n| filter.may_contain(IdFilter::key("general", head(n))))
            .count();
        assert!(false_hits < 1_000, "{false_hits} of 100,000 unseen ids");
        // The same id in another room is another key.
        let other = (0..10_000)
            .filter(|&n| filter.may_contain(IdFilter::key("random", head(n))))
            .count();
        assert!(other < 100, "{other} of 10,000");
        assert!(!filter.outgrown());
        for n in 50_000..200_000 {
            filter.add(IdFilter::key("general", head(n)));
        }
        assert!(filter.outgrown());
    }
}
