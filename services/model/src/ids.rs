//! Identifiers validated once, at the edge of the system.
//!
//! A [`RoomId`] can only be built by validation, so code that takes one (subject and stream
//! naming in the room log, for instance) never sees an unchecked string.

use std::fmt;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

/// Why a string is not a valid identifier.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdError {
    #[error("room id must be 1 to 64 characters of A-Z a-z 0-9 _ - (got {0:?})")]
    Room(String),
    #[error("user id must be 1 to 128 characters of A-Z a-z 0-9 _ . @ | : + = - (got {0:?})")]
    User(String),
}

/// Longest room id accepted, in bytes (all accepted characters are ASCII).
pub const MAX_ROOM_ID_LEN: usize = 64;
/// Longest user id accepted, in bytes.
pub const MAX_USER_ID_LEN: usize = 128;

fn room_char(c: u8) -> bool {
    c.is_ascii_alphanumeric() || c == b'_' || c == b'-'
}

fn user_char(c: u8) -> bool {
    c.is_ascii_alphanumeric() || b"_.@|:+=-".contains(&c)
}

/// A room id matching `^[A-Za-z0-9_-]{1,64}$`. Ids starting with `dm-` are direct rooms.
///
/// The accepted characters are safe in a NATS subject token (no `.`, `*`, `>` or white space).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct RoomId(Arc<str>);

impl RoomId {
    /// The prefix reserved for direct (two-person) rooms.
    pub const DIRECT_PREFIX: &'static str = "dm-";

    pub fn parse(s: impl Into<String>) -> Result<Self, IdError> {
        let s = s.into();
        if s.is_empty() || s.len() > MAX_ROOM_ID_LEN || !s.bytes().all(room_char) {
            return Err(IdError::Room(truncate_for_error(&s)));
        }
        Ok(RoomId(Arc::from(s)))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Whether this id is in the namespace reserved for direct rooms.
    pub fn is_direct(&self) -> bool {
        self.0.starts_with(Self::DIRECT_PREFIX)
    }
}

/// A user id matching `^[A-Za-z0-9_.@|:+=-]{1,128}$`.
///
/// User ids may contain `.`, so they never become part of a NATS subject.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct UserId(Arc<str>);

impl UserId {
    pub fn parse(s: impl Into<String>) -> Result<Self, IdError> {
        let s = s.into();
        if s.is_empty() || s.len() > MAX_USER_ID_LEN || !s.bytes().all(user_char) {
            return Err(IdError::User(truncate_for_error(&s)));
        }
        Ok(UserId(Arc::from(s)))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// Error messages echo the offending input, but never an unbounded amount of it.
fn truncate_for_error(s: &str) -> String {
    const SHOWN: usize = 80;
    match s.char_indices().nth(SHOWN) {
        Some((cut, _)) => format!("{}…", &s[..cut]),
        None => s.to_owned(),
    }
}

macro_rules! string_id_impls {
    ($ty:ident) => {
        impl TryFrom<String> for $ty {
            type Error = IdError;
            fn try_from(s: String) -> Result<Self, IdError> {
                $ty::parse(s)
            }
        }
        impl From<$ty> for String {
            fn from(id: $ty) -> String {
                id.0.to_string()
            }
        }
        impl std::str::FromStr for $ty {
            type Err = IdError;
            fn from_str(s: &str) -> Result<Self, IdError> {
                $ty::parse(s)
            }
        }
        impl fmt::Display for $ty {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }
        impl AsRef<str> for $ty {
            fn as_ref(&self) -> &str {
                &self.0
            }
        }
    };
}
string_id_impls!(RoomId);
string_id_impls!(UserId);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn room_ids_accept_the_contract_alphabet() {
        for ok in ["general", "a", "A-Z_09", "dm-alice-bob", &"x".repeat(64)] {
            assert!(RoomId::parse(ok).is_ok(), "{ok:?} should be accepted");
        }
    }

    #[test]
    fn room_ids_refuse_anything_that_could_reach_a_subject_unsafely() {
        let too_long = "x".repeat(65);
        for bad in [
            "",
            "a.b",
            "*",
            ">",
            "a b",
            "a\tb",
            "a\nb",
            "room>",
            "général",
            "a/b",
            "$JS",
            &too_long,
        ] {
            assert!(RoomId::parse(bad).is_err(), "{bad:?} should be refused");
        }
    }

    #[test]
    fn user_ids_accept_idp_subjects_and_emails() {
        for ok in [
            "alice",
            "auth0|5f7c8ec7",
            "alice@example.com",
            "a+b=c:d",
            &"u".repeat(128),
        ] {
            assert!(UserId::parse(ok).is_ok(), "{ok:?} should be accepted");
        }
        for bad in ["", "a b", "alice/x", "ü", "a*", &"u".repeat(129)] {
            assert!(UserId::parse(bad).is_err(), "{bad:?} should be refused");
        }
    }

    #[test]
    fn deserializing_validates() {
        let ok: RoomId = serde_json::from_str("\"general\"").unwrap();
        assert_eq!(ok.as_str(), "general");
        assert!(serde_json::from_str::<RoomId>("\"a.b\"").is_err());
        assert!(serde_json::from_str::<UserId>("\"\"").is_err());
    }

    #[test]
    fn direct_rooms_are_recognised_by_prefix() {
        assert!(RoomId::parse("dm-abc").unwrap().is_direct());
        assert!(!RoomId::parse("dmabc").unwrap().is_direct());
    }

    #[test]
    fn error_messages_do_not_echo_unbounded_input() {
        let huge = "é".repeat(10_000);
        let msg = RoomId::parse(huge).unwrap_err().to_string();
        assert!(msg.len() < 400, "{}", msg.len());
    }
}
