//! A user's block list, as the user log holds it.
//!
//! A block list is not a room, so it does not live in a room's log: each user has one subject in
//! the user log (see `chat-log`), and every change is one [`BlockEvent`] carrying the change
//! *and* the complete list after it. The last event of a user's subject is therefore the whole
//! current state (read in O(1) with a direct get), and the events before it are the audit trail.
//! Changes are decided here ([`decide_block_change`], pure) against the last list and appended
//! only if that list is still the last (a compare-and-set on the subject's sequence), so two
//! concurrent changes never lose one another.
//!
//! The encoding follows the room events': a MessagePack **named** map with `v`, `kind`, `id`,
//! `user`, `ts`, then `target` (whom the change is about) and `blocked` (the list after it,
//! sorted). Golden bytes under `tests/golden_blocks/` pin it.

use std::borrow::Cow;
use std::collections::BTreeSet;

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::event::{DecodeError, EncodeError, ENVELOPE_VERSION, MAX_EVENT_BYTES};
use crate::ids::UserId;
use crate::room::Refusal;

/// The most users one user may block. The whole list travels in every change, so this bounds
/// the event (1,000 ids of at most 128 bytes stay well inside [`MAX_EVENT_BYTES`]).
pub const MAX_BLOCKED: usize = 1_000;

/// What one change does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BlockChange {
    /// Start blocking the user.
    Block(UserId),
    /// Stop blocking the user.
    Unblock(UserId),
}

impl BlockChange {
    /// The `kind` written to the log.
    pub fn kind(&self) -> &'static str {
        match self {
            BlockChange::Block(_) => "block",
            BlockChange::Unblock(_) => "unblock",
        }
    }

    /// The user the change is about.
    pub fn target(&self) -> &UserId {
        match self {
            BlockChange::Block(u) | BlockChange::Unblock(u) => u,
        }
    }
}

/// One entry of a user's subject in the user log: a change and the list it results in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlockEvent {
    /// Idempotency key of the append (its `Nats-Msg-Id`).
    pub id: Uuid,
    /// Whose list this is (the user who changed it).
    pub user: UserId,
    /// The appending process's wall clock, ms since the epoch; for display and audit only.
    pub ts: i64,
    pub change: BlockChange,
    /// The complete list after the change.
    pub blocked: BTreeSet<UserId>,
}

/// The map as it is written.
#[derive(Serialize, Deserialize)]
struct Wire<'a> {
    v: u16,
    #[serde(borrow)]
    kind: Cow<'a, str>,
    #[serde(borrow)]
    id: Cow<'a, str>,
    user: Cow<'a, UserId>,
    ts: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    target: Option<Cow<'a, UserId>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    blocked: Option<Vec<Cow<'a, UserId>>>,
}

impl BlockEvent {
    /// Encodes the event as it is stored in the user log.
    pub fn encode(&self) -> Result<Vec<u8>, EncodeError> {
        let kind = self.change.kind();
        let mut id_buf = Uuid::encode_buffer();
        let w = Wire {
            v: ENVELOPE_VERSION,
            kind: Cow::Borrowed(kind),
            id: Cow::Borrowed(self.id.hyphenated().encode_lower(&mut id_buf)),
            user: Cow::Borrowed(&self.user),
            ts: self.ts,
            target: Some(Cow::Borrowed(self.change.target())),
            blocked: Some(self.blocked.iter().map(Cow::Borrowed).collect()),
        };
        let mut bytes = Vec::with_capacity(96 + 24 * self.blocked.len());
        rmp_serde::encode::write_named(&mut bytes, &w)
            .map_err(|source| EncodeError::Msgpack { kind, source })?;
        if bytes.len() > MAX_EVENT_BYTES {
            return Err(EncodeError::TooLarge {
                kind,
                size: bytes.len(),
                max: MAX_EVENT_BYTES,
            });
        }
        Ok(bytes)
    }

    /// Decodes an event of any envelope version this build knows.
    pub fn decode(bytes: &[u8]) -> Result<BlockEvent, DecodeError> {
        let w: Wire<'_> = rmp_serde::from_slice(bytes)?;
        if w.v == 0 || w.v > ENVELOPE_VERSION {
            return Err(DecodeError::UnsupportedVersion(w.v));
        }
        let id = Uuid::try_parse(&w.id).map_err(|_| DecodeError::BadId(w.id.to_string()))?;
        let missing = |field| DecodeError::MissingField {
            kind: w.kind.to_string(),
            field,
        };
        let target = w
            .target
            .clone()
            .map(Cow::into_owned)
            .ok_or_else(|| missing("target"))?;
        let change = match w.kind.as_ref() {
            "block" => BlockChange::Block(target),
            "unblock" => BlockChange::Unblock(target),
            other => return Err(DecodeError::UnknownKind(other.to_owned())),
        };
        let blocked = w
            .blocked
            .ok_or_else(|| missing("blocked"))?
            .into_iter()
            .map(Cow::into_owned)
            .collect();
        Ok(BlockEvent {
            id,
            user: w.user.into_owned(),
            ts: w.ts,
            change,
            blocked,
        })
    }
}

/// The list after `change`, or `None` when it would not change (blocking someone already
/// blocked, unblocking someone who is not: both are fine and append nothing).
pub fn decide_block_change(
    owner: &UserId,
    current: &BTreeSet<UserId>,
    change: &BlockChange,
) -> Result<Option<BTreeSet<UserId>>, Refusal> {
    match change {
        BlockChange::Block(target) => {
            if target == owner {
                return Err(Refusal::BadRequest("you cannot block yourself"));
            }
            if current.contains(target) {
                return Ok(None);
            }
            if current.len() >= MAX_BLOCKED {
                return Err(Refusal::TooLarge(
                    "a user blocks at most 1,000 users; unblock someone first",
                ));
            }
            let mut next = current.clone();
            next.insert(target.clone());
            Ok(Some(next))
        }
        BlockChange::Unblock(target) => {
            if target == owner {
                return Err(Refusal::BadRequest("you cannot block yourself"));
            }
            if !current.contains(target) {
                return Ok(None);
            }
            let mut next = current.clone();
            next.remove(target);
            Ok(Some(next))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn user(s: &str) -> UserId {
        UserId::parse(s).unwrap()
    }

    fn set(users: &[&str]) -> BTreeSet<UserId> {
        users.iter().map(|u| user(u)).collect()
    }

    #[test]
    fn blocking_adds_and_unblocking_removes_idempotently() {
        let alice = user("alice");
        let empty = BTreeSet::new();
        let block_bob = BlockChange::Block(user("bob"));
        assert_eq!(
            decide_block_change(&alice, &empty, &block_bob),
            Ok(Some(set(&["bob"])))
        );
        assert_eq!(
            decide_block_change(&alice, &set(&["bob"]), &block_bob),
            Ok(None),
            "blocking twice changes nothing"
        );
        let unblock_bob = BlockChange::Unblock(user("bob"));
        assert_eq!(
            decide_block_change(&alice, &set(&["bob", "carol"]), &unblock_bob),
            Ok(Some(set(&["carol"])))
        );
        assert_eq!(decide_block_change(&alice, &empty, &unblock_bob), Ok(None));
    }

    #[test]
    fn blocking_yourself_or_past_the_cap_is_refused() {
        let alice = user("alice");
        assert!(matches!(
            decide_block_change(&alice, &BTreeSet::new(), &BlockChange::Block(alice.clone())),
            Err(Refusal::BadRequest(_))
        ));
        let full: BTreeSet<UserId> = (0..MAX_BLOCKED).map(|i| user(&format!("u{i}"))).collect();
        assert!(matches!(
            decide_block_change(&alice, &full, &BlockChange::Block(user("one-more"))),
            Err(Refusal::TooLarge(_))
        ));
        // Unblocking from a full list, and re-blocking someone on it, are fine.
        assert!(
            decide_block_change(&alice, &full, &BlockChange::Block(user("u7")))
                .unwrap()
                .is_none()
        );
        assert_eq!(
            decide_block_change(&alice, &full, &BlockChange::Unblock(user("u7")))
                .unwrap()
                .map(|l| l.len()),
            Some(MAX_BLOCKED - 1)
        );
    }

    #[test]
    fn a_full_list_of_the_longest_ids_fits_in_one_event() {
        let blocked: BTreeSet<UserId> = (0..MAX_BLOCKED)
            .map(|i| user(&format!("{i:04}{}", "u".repeat(124))))
            .collect();
        let event = BlockEvent {
            id: Uuid::new_v4(),
            user: user(&"a".repeat(128)),
            ts: 1,
            change: BlockChange::Block(blocked.iter().next().unwrap().clone()),
            blocked,
        };
        let bytes = event.encode().unwrap();
        assert!(bytes.len() < MAX_EVENT_BYTES, "{}", bytes.len());
        assert_eq!(BlockEvent::decode(&bytes).unwrap(), event);
    }

    #[test]
    fn unknown_kinds_and_missing_fields_are_typed_errors() {
        #[derive(Serialize)]
        struct Odd<'a> {
            v: u16,
            kind: &'a str,
            id: &'a str,
            user: &'a str,
            ts: i64,
            target: &'a str,
        }
        let odd = |kind| Odd {
            v: 1,
            kind,
            id: "01935f2e-4b1c-7a00-8000-000000000001",
            user: "alice",
            ts: 5,
            target: "bob",
        };
        let bytes = rmp_serde::to_vec_named(&odd("mute")).unwrap();
        assert!(matches!(
            BlockEvent::decode(&bytes),
            Err(DecodeError::UnknownKind(k)) if k == "mute"
        ));
        let bytes = rmp_serde::to_vec_named(&odd("block")).unwrap();
        assert!(matches!(
            BlockEvent::decode(&bytes),
            Err(DecodeError::MissingField {
                field: "blocked",
                ..
            })
        ));
    }
}
