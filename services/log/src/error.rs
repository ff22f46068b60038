//! What can go wrong with a room's log, always saying which room.

use chat_model::RoomId;

/// A room log operation failed. Every variant names the room.
#[derive(Debug, thiserror::Error)]
pub enum LogError {
    /// The room's stream does not exist.
    #[error("room {room}: no such room")]
    RoomNotFound { room: RoomId },
    /// NATS or JetStream cannot be reached or cannot serve the request right now. For an append
    /// the outcome is unknown: retry with the same event id (it cannot create a duplicate).
    #[error("room {room}: {op}: nats unavailable: {reason}")]
    Unavailable {
        room: RoomId,
        op: &'static str,
        reason: String,
    },
    /// No answer in time. For an append the outcome is unknown, as for `Unavailable`.
    #[error("room {room}: {op} timed out")]
    Timeout { room: RoomId, op: &'static str },
    /// The event is larger than a room stream accepts.
    #[error("room {room}: event of {size} bytes exceeds the {max}-byte limit")]
    TooLarge {
        room: RoomId,
        size: usize,
        max: usize,
    },
    /// The room's stream already holds events past the sequence the append expected.
    #[error("room {room}: expected last sequence {expected}, the log is at {actual}")]
    WrongLastSequence {
        room: RoomId,
        expected: u64,
        actual: u64,
    },
    /// A stream with this room's name belongs to another room (digest collision, or a foreign
    /// stream using this deployment's prefix). Never written to.
    #[error("room {room}: stream {stream} belongs to {owner:?}, not to this room")]
    StreamConflict {
        room: RoomId,
        stream: String,
        owner: Option<String>,
    },
    /// The event could not be encoded.
    #[error("room {room}: {source}")]
    Encode {
        room: RoomId,
        source: chat_model::EncodeError,
    },
    /// Any other refusal from JetStream, with its message.
    #[error("room {room}: {op}: {reason}")]
    JetStream {
        room: RoomId,
        op: &'static str,
        reason: String,
    },
}

impl LogError {
    /// The room the failed operation concerned.
    pub fn room(&self) -> &RoomId {
        match self {
            LogError::RoomNotFound { room }
            | LogError::Unavailable { room, .. }
            | LogError::Timeout { room, .. }
            | LogError::TooLarge { room, .. }
            | LogError::WrongLastSequence { room, .. }
            | LogError::StreamConflict { room, .. }
            | LogError::Encode { room, .. }
            | LogError::JetStream { room, .. } => room,
        }
    }

    /// Whether retrying the same operation later may succeed (NATS trouble, not a refusal).
    pub fn is_transient(&self) -> bool {
        matches!(
            self,
            LogError::Unavailable { .. } | LogError::Timeout { .. }
        )
    }
}
