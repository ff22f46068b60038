//! Delivery receipts: how many of a room's members a message reached and how many read it.
//!
//! Counted from the members' cursors, not stored per message: a room's cursors are read once
//! (one small partition, one indexed range) and every message of a page is counted against them
//! with two binary searches, so a page costs the same whether it holds one message or two
//! hundred, and no write per message per member is ever needed.

use std::collections::HashMap;

use chat_model::UserId;
use serde_json::{json, Value};

/// An active member's cursors in a room.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemberCursors {
    pub user: UserId,
    /// The read cursor (at least the seq the member joined at).
    pub read: u64,
    /// The delivered cursor: at least the read cursor (reading implies having received).
    pub delivered: u64,
}

/// The receipts of one message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Receipts {
    /// Members other than the author whose delivered cursor reaches the message.
    pub delivered: u64,
    /// Members other than the author whose read cursor reaches the message.
    pub read: u64,
    /// Active members other than the author.
    pub members: u64,
}

impl Receipts {
    /// `{"delivered","read","members"}`, as history entries and the receipts endpoint show it.
    pub fn to_json(self) -> Value {
        json!({"delivered": self.delivered, "read": self.read, "members": self.members})
    }
}

/// A room's cursors, sorted for counting.
#[derive(Debug, Clone, Default)]
pub struct ReceiptIndex {
    /// Every active member's delivered cursor, ascending.
    delivered: Vec<u64>,
    /// Every active member's read cursor, ascending.
    read: Vec<u64>,
    /// Each member's own cursors, to leave the author out.
    by_user: HashMap<UserId, (u64, u64)>,
}

impl ReceiptIndex {
    pub fn new(cursors: &[MemberCursors]) -> ReceiptIndex {
        let mut delivered: Vec<u64> = cursors.iter().map(|c| c.delivered.max(c.read)).collect();
        let mut read: Vec<u64> = cursors.iter().map(|c| c.read).collect();
        delivered.sort_unstable();
        read.sort_unstable();
        let by_user = cursors
            .iter()
            .map(|c| (c.user.clone(), (c.delivered.max(c.read), c.read)))
            .collect();
        ReceiptIndex {
            delivered,
            read,
            by_user,
        }
    }

    /// The receipts of the message at `seq` by `author`.
    pub fn receipts(&self, seq: u64, author: &str) -> Receipts {
        let at_least =
            |sorted: &[u64]| (sorted.len() - sorted.partition_point(|&c| c < seq)) as u64;
        let mut out = Receipts {
            delivered: at_least(&self.delivered),
            read: at_least(&self.read),
            members: self.by_user.len() as u64,
        };
        let own = UserId::parse(author)
            .ok()
            .and_then(|author| self.by_user.get(&author));
        if let Some(&(delivered, read)) = own {
            out.members -= 1;
            out.delivered -= u64::from(delivered >= seq);
            out.read -= u64::from(read >= seq);
        }
        out
    }
}

/// Adds `"receipts"` to every message of a page (materialized events) authored by `viewer`.
/// Whether the page needs the room's cursors at all: see [`wants_receipts`].
pub fn add_receipts(events: &mut [Value], viewer: &UserId, index: &ReceiptIndex) {
    for event in events {
        let Some(map) = event.as_object_mut() else {
            continue;
        };
        if !is_message_by(map, viewer) {
            continue;
        }
        let Some(seq) = map.get("seq").and_then(Value::as_u64) else {
            continue;
        };
        let receipts = index.receipts(seq, viewer.as_str());
        map.insert("receipts".into(), receipts.to_json());
    }
}

/// Whether a page holds a message by `viewer` (otherwise the cursors need not be read).
pub fn wants_receipts(events: &[Value], viewer: &UserId) -> bool {
    events
        .iter()
        .filter_map(Value::as_object)
        .any(|map| is_message_by(map, viewer))
}

fn is_message_by(map: &serde_json::Map<String, Value>, viewer: &UserId) -> bool {
    map.get("kind").and_then(Value::as_str) == Some("message")
        && map.get("user").and_then(Value::as_str) == Some(viewer.as_str())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cursors(list: &[(&str, u64, u64)]) -> Vec<MemberCursors> {
        list.iter()
            .map(|&(user, read, delivered)| MemberCursors {
                user: UserId::parse(user).unwrap(),
                read,
                delivered,
            })
            .collect()
    }

    #[test]
    fn counts_leave_the_author_out_and_reading_implies_delivery() {
        let index = ReceiptIndex::new(&cursors(&[
            ("alice", 4, 4),
            ("bob", 2, 4),
            ("carol", 1, 3),
            ("dave", 1, 0),
            // Read further than delivered (an old store, or a read without a delivered frame).
            ("erin", 3, 0),
        ]));
        let r = |seq| index.receipts(seq, "alice");
        assert_eq!(
            r(2),
            Receipts {
                delivered: 3,
                read: 2,
                members: 4
            }
        );
        assert_eq!(
            r(3),
            Receipts {
                delivered: 3,
                read: 1,
                members: 4
            }
        );
        assert_eq!(
            r(4),
            Receipts {
                delivered: 1,
                read: 0,
                members: 4
            }
        );
        assert_eq!(
            r(9),
            Receipts {
                delivered: 0,
                read: 0,
                members: 4
            }
        );
        // An author who has left is not a member: everyone counts.
        assert_eq!(
            index.receipts(2, "zed"),
            Receipts {
                delivered: 4,
                read: 3,
                members: 5
            }
        );
    }

    #[test]
    fn only_the_viewers_messages_get_receipts() {
        let index = ReceiptIndex::new(&cursors(&[("alice", 1, 1), ("bob", 1, 5)]));
        let alice = UserId::parse("alice").unwrap();
        let mut events = vec![
            json!({"seq": 5, "user": "alice", "kind": "message", "text": "hi"}),
            json!({"seq": 4, "user": "bob", "kind": "message", "text": "yo"}),
            json!({"seq": 3, "user": "alice", "kind": "read", "up_to": 2}),
        ];
        assert!(wants_receipts(&events, &alice));
        add_receipts(&mut events, &alice, &index);
        assert_eq!(
            events[0]["receipts"],
            json!({"delivered": 1, "read": 0, "members": 1})
        );
        assert!(events[1].get("receipts").is_none());
        assert!(events[2].get("receipts").is_none());
        assert!(!wants_receipts(&events[1..], &alice));
    }
}
