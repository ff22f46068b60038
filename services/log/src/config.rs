//! Room log settings and the names derived from them.

use std::time::Duration;

use chat_model::{RoomId, UserId};
use sha2::{Digest, Sha256};

/// Settings of the room log. Every timeout is configuration so tests can shorten it.
#[derive(Debug, Clone)]
pub struct LogConfig {
    /// Deployment prefix in front of every subject and stream name, so several deployments can
    /// share one NATS account. Lowercase letters, digits and `-`, starting with a letter.
    pub prefix: String,
    /// Stream replicas: 1 on one machine, 3 in a cluster.
    pub replicas: usize,
    /// How long JetStream remembers an event id to answer a resend as a duplicate.
    pub duplicate_window: Duration,
    /// The largest message a room stream accepts (every legal event fits).
    pub max_event_bytes: usize,
    /// Timeout of JetStream API requests and of waiting for a publish acknowledgement.
    pub request_timeout: Duration,
    /// How many events a range read asks the server for at a time; a bulk read
    /// ([`crate::RangeReader::bulk`]: the projector's catch-up, rebuilds, exports) asks for
    /// [`BULK_READ_FACTOR`] times as many. It bounds the memory of a reader: with the next request
    /// sent at half, a reader holds up to 1.5 times its batch, and that must fit in the
    /// connection's subscription capacity (65,536 messages unless the connection was opened with
    /// another): what does not fit is dropped by the client library, and the reader then starts
    /// over asking for half as many.
    pub read_batch: u64,
}

/// How many times `read_batch` a bulk range read asks for at a time.
pub const BULK_READ_FACTOR: u64 = 8;

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            prefix: "chat".to_owned(),
            replicas: 1,
            duplicate_window: Duration::from_secs(10 * 60),
            max_event_bytes: chat_model::MAX_EVENT_BYTES + 4 * 1024,
            request_timeout: Duration::from_secs(5),
            read_batch: 500,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("prefix must be 1 to 32 characters of a-z 0-9 -, starting with a letter (got {0:?})")]
    Prefix(String),
    #[error("replicas must be 1 to 5 (got {0})")]
    Replicas(usize),
    #[error("duplicate window must be at least 1 s (got {0:?})")]
    DuplicateWindow(Duration),
    #[error("max event size must be between {min} and 8 MiB (got {got})")]
    MaxEventBytes { min: usize, got: usize },
    #[error("{0} must be positive")]
    Zero(&'static str),
}

impl LogConfig {
    /// Checks the settings before anything connects or binds.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let p = self.prefix.as_bytes();
        let prefix_ok = (1..=32).contains(&p.len())
            && p[0].is_ascii_lowercase()
            && p.iter()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-');
        if !prefix_ok {
            return Err(ConfigError::Prefix(self.prefix.clone()));
        }
        if !(1..=5).contains(&self.replicas) {
            return Err(ConfigError::Replicas(self.replicas));
        }
        if self.duplicate_window < Duration::from_secs(1) {
            return Err(ConfigError::DuplicateWindow(self.duplicate_window));
        }
        let min = chat_model::MAX_EVENT_BYTES;
        if self.max_event_bytes < min || self.max_event_bytes > 8 << 20 {
            return Err(ConfigError::MaxEventBytes {
                min,
                got: self.max_event_bytes,
            });
        }
        if self.request_timeout.is_zero() {
            return Err(ConfigError::Zero("request timeout"));
        }
        if self.read_batch == 0 {
            return Err(ConfigError::Zero("read batch"));
        }
        Ok(())
    }

    /// `<PREFIX>_<hash>`: a hex digest keeps names short, free of `.`/`*`/`>`, and distinct on
    /// case-insensitive file systems (`Foo` and `foo` are different rooms).
    pub fn stream_name(&self, room: &RoomId) -> String {
        let digest = Sha256::digest(room.as_str().as_bytes());
        format!(
            "{}_{}",
            self.prefix.to_ascii_uppercase(),
            hex::encode(&digest[..16])
        )
    }

    /// The subject a room's events are appended to, except changes of its membership and
    /// settings (see [`LogConfig::room_state_subject`]).
    pub fn room_subject(&self, room: &RoomId) -> String {
        format!("{}.room.{}", self.prefix, room)
    }

    /// The subject of a room's membership and settings changes, in the same stream (one order):
    /// a change is appended only if the last change is the one it was decided on
    /// (`Nats-Expected-Last-Subject-Sequence`), which messages arriving meanwhile do not disturb.
    pub fn room_state_subject(&self, room: &RoomId) -> String {
        format!("{}.change.{}", self.prefix, room)
    }

    /// What the room's stream republishes: both of its subjects (the same number of tokens,
    /// so one wildcard covers them; a transform from `>` to one subject is not allowed).
    pub fn republish_source(&self, room: &RoomId) -> String {
        format!("{}.*.{}", self.prefix, room)
    }

    /// The core subject each stored event is republished to.
    pub fn live_subject(&self, room: &RoomId) -> String {
        format!("{}.live.{}", self.prefix, room)
    }

    /// Wildcard matching every room's live subject (for consumers of all rooms).
    pub fn live_wildcard(&self) -> String {
        format!("{}.live.*", self.prefix)
    }

    /// The one stream holding every user's block-list changes: `<PREFIX>_USERS`. Room streams
    /// are `<PREFIX>_` and 32 hex digits, so the names never meet.
    pub fn users_stream_name(&self) -> String {
        format!("{}_USERS", self.prefix.to_ascii_uppercase())
    }

    /// The key of a user in the user log: 32 hex digits of sha256(user id). User ids may hold
    /// `.` and other characters a subject token may not, so they never become part of one.
    pub fn user_key(&self, user: &UserId) -> String {
        hex::encode(&Sha256::digest(user.as_str().as_bytes())[..16])
    }

    /// The subject a user's block-list changes are appended to.
    pub fn user_subject(&self, user: &UserId) -> String {
        format!("{}.user.{}", self.prefix, self.user_key(user))
    }

    /// Wildcard of every user's subject (the user stream's subjects).
    pub fn user_wildcard(&self) -> String {
        format!("{}.user.*", self.prefix)
    }

    /// The core subject a change of the user with `key` is republished to, so every process
    /// can drop what it caches of that user.
    pub fn blocks_notice_subject(&self, key: &str) -> String {
        format!("{}.blocks.{key}", self.prefix)
    }

    /// Wildcard of every block-list change notice.
    pub fn blocks_notice_wildcard(&self) -> String {
        format!("{}.blocks.*", self.prefix)
    }
}

/// Stream metadata key holding the room id (the stream name is only a digest of it).
pub(crate) const ROOM_METADATA_KEY: &str = "chat.room";
/// Stream metadata key marking the user stream as this project's (value `users`).
pub(crate) const LOG_METADATA_KEY: &str = "chat.log";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_the_documented_layout() {
        let cfg = LogConfig::default();
        let room = RoomId::parse("general").unwrap();
        assert_eq!(cfg.room_subject(&room), "chat.room.general");
        assert_eq!(cfg.room_state_subject(&room), "chat.change.general");
        assert_eq!(cfg.live_subject(&room), "chat.live.general");
        let name = cfg.stream_name(&room);
        assert!(name.starts_with("CHAT_") && name.len() == 5 + 32, "{name}");
        assert!(name[5..]
            .bytes()
            .all(|c| c.is_ascii_hexdigit() && !c.is_ascii_uppercase()));
    }

    #[test]
    fn user_names_are_digests_and_never_meet_room_names() {
        let cfg = LogConfig::default();
        let user = UserId::parse("alice.smith@example.com").unwrap();
        let subject = cfg.user_subject(&user);
        assert!(subject.starts_with("chat.user."), "{subject}");
        let key = &subject["chat.user.".len()..];
        assert_eq!(key, cfg.user_key(&user));
        assert!(key.len() == 32 && key.bytes().all(|c| c.is_ascii_hexdigit()));
        assert!(
            !subject.contains("alice"),
            "a user id never becomes part of a subject"
        );
        assert_eq!(cfg.blocks_notice_subject(key), format!("chat.blocks.{key}"));
        assert_eq!(cfg.users_stream_name(), "CHAT_USERS");
        assert_ne!(
            cfg.users_stream_name().len(),
            cfg.stream_name(&RoomId::parse("USERS").unwrap()).len()
        );
    }

    #[test]
    fn rooms_differing_only_in_case_get_different_streams() {
        let cfg = LogConfig::default();
        let a = cfg.stream_name(&RoomId::parse("Foo").unwrap());
        let b = cfg.stream_name(&RoomId::parse("foo").unwrap());
        assert_ne!(a.to_ascii_lowercase(), b.to_ascii_lowercase());
    }

    #[test]
    fn bad_settings_are_refused() {
        let ok = LogConfig::default();
        assert!(ok.validate().is_ok());
        for prefix in [
            "",
            "Chat",
            "1chat",
            "chat.x",
            "chat*",
            "a_b",
            &"a".repeat(33),
        ] {
            let cfg = LogConfig {
                prefix: prefix.into(),
                ..ok.clone()
            };
            assert!(cfg.validate().is_err(), "{prefix:?}");
        }
        assert!(LogConfig {
            replicas: 0,
            ..ok.clone()
        }
        .validate()
        .is_err());
        assert!(LogConfig {
            duplicate_window: Duration::ZERO,
            ..ok.clone()
        }
        .validate()
        .is_err());
        assert!(LogConfig {
            max_event_bytes: 10,
            ..ok.clone()
        }
        .validate()
        .is_err());
        assert!(LogConfig {
            read_batch: 0,
            ..ok
        }
        .validate()
        .is_err());
    }
}
