//! Which rooms a projector process owns: a stable hash of the room id modulo the partition count.

use std::fmt;
use std::str::FromStr;

use chat_model::RoomId;
use sha2::{Digest, Sha256};

/// Share `index` of `count` (`0/1`: every room).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Partition {
    pub index: u32,
    pub count: u32,
}

impl Partition {
    /// The whole set of rooms.
    pub const ALL: Partition = Partition { index: 0, count: 1 };

    /// Whether this share holds `room`. The hash is SHA-256 of the id, so every process (and
    /// every build) agrees, whatever the platform.
    pub fn owns(&self, room: &RoomId) -> bool {
        if self.count <= 1 {
            return true;
        }
        let digest = Sha256::digest(room.as_str().as_bytes());
        let mut first = [0u8; 8];
        first.copy_from_slice(&digest[..8]);
        u64::from_be_bytes(first) % u64::from(self.count) == u64::from(self.index)
    }
}

impl fmt::Display for Partition {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.index, self.count)
    }
}

impl FromStr for Partition {
    type Err = String;

    /// `INDEX/COUNT`, e.g. `1/3`.
    fn from_str(s: &str) -> Result<Partition, String> {
        let bad = || format!("{s:?} is not INDEX/COUNT with INDEX < COUNT (e.g. 0/1)");
        let (index, count) = s.split_once('/').ok_or_else(bad)?;
        let index: u32 = index.trim().parse().map_err(|_| bad())?;
        let count: u32 = count.trim().parse().map_err(|_| bad())?;
        if count == 0 || index >= count {
            return Err(bad());
        }
        Ok(Partition { index, count })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_room_has_exactly_one_owner_and_shares_are_even() {
        let parts: Vec<Partition> = (0..3).map(|i| Partition { index: i, count: 3 }).collect();
        let mut counts = [0usize; 3];
        for n in 0..3000 {
            let room = RoomId::parse(format!("room-{n}")).unwrap();
            let owners: Vec<usize> = (0..3).filter(|&i| parts[i].owns(&room)).collect();
            assert_eq!(owners.len(), 1, "{room}");
            counts[owners[0]] += 1;
        }
        for c in counts {
            assert!((800..1200).contains(&c), "uneven shares: {counts:?}");
        }
    }

    #[test]
    fn the_hash_is_stable() {
        // Pinned: changing the hash would move rooms between running projectors.
        let room = RoomId::parse("general").unwrap();
        let owner = (0..7)
            .find(|&i| Partition { index: i, count: 7 }.owns(&room))
            .unwrap();
        assert_eq!(owner, PINNED_OWNER_OF_GENERAL_OF_7);
    }

    const PINNED_OWNER_OF_GENERAL_OF_7: u32 = 1;

    #[test]
    fn partitions_parse() {
        assert_eq!("1/3".parse(), Ok(Partition { index: 1, count: 3 }));
        assert_eq!("0/1".parse(), Ok(Partition::ALL));
        for bad in ["", "1", "3/3", "0/0", "a/b", "-1/2"] {
            assert!(bad.parse::<Partition>().is_err(), "{bad}");
        }
    }
}
