//! Why a room request was refused, with the contract's code and HTTP status for each.

use chat_log::{LogError, UserLogError};
use chat_model::Refusal;
use chat_store::StoreError;

/// What a client is told of a failure inside the service; the details go to the log at error.
const INTERNAL: &str = "internal error (logged on the server)";

/// A refusal's message is sent to the client: what NATS or the store said about a failure is
/// logged here and not passed on (it can name hosts, files and streams).
#[derive(Debug, Clone, thiserror::Error)]
pub enum RoomError {
    #[error("{0}")]
    BadRequest(String),
    #[error("{0}")]
    Forbidden(String),
    #[error("no such room or message")]
    NotFound,
    #[error("{0}")]
    Conflict(String),
    #[error("{0}")]
    TooLarge(String),
    /// NATS or the store cannot answer now; for an append the outcome is unknown (retry with
    /// the same id).
    #[error("{0}")]
    Unavailable(String),
    #[error("{0}")]
    Internal(String),
}

impl RoomError {
    /// The contract's error code.
    pub fn code(&self) -> &'static str {
        match self {
            RoomError::BadRequest(_) => "bad_request",
            RoomError::Forbidden(_) => "forbidden",
            RoomError::NotFound => "not_found",
            RoomError::Conflict(_) => "conflict",
            RoomError::TooLarge(_) => "too_large",
            RoomError::Unavailable(_) => "unavailable",
            RoomError::Internal(_) => "internal",
        }
    }

    /// The matching HTTP status.
    pub fn status(&self) -> u16 {
        match self {
            RoomError::BadRequest(_) => 400,
            RoomError::Forbidden(_) => 403,
            RoomError::NotFound => 404,
            RoomError::Conflict(_) => 409,
            RoomError::TooLarge(_) => 413,
            RoomError::Unavailable(_) => 503,
            RoomError::Internal(_) => 500,
        }
    }
}

impl From<Refusal> for RoomError {
    fn from(r: Refusal) -> RoomError {
        match r {
            Refusal::Forbidden(m) => RoomError::Forbidden(m.into()),
            Refusal::BadRequest(m) => RoomError::BadRequest(m.into()),
            Refusal::Conflict(m) => RoomError::Conflict(m.into()),
            Refusal::TooLarge(m) => RoomError::TooLarge(m.into()),
        }
    }
}

impl From<UserLogError> for RoomError {
    fn from(e: UserLogError) -> RoomError {
        match e {
            // What NATS said stays in this process's log; the client learns what failed.
            UserLogError::Unavailable { op, .. } => {
                tracing::debug!(error = %e, "user log unavailable");
                RoomError::Unavailable(format!("user log: {op}: the log is unavailable"))
            }
            UserLogError::Timeout { .. } => RoomError::Unavailable(e.to_string()),
            UserLogError::WrongLastSequence { .. } => RoomError::Conflict(e.to_string()),
            UserLogError::Encode(_) => RoomError::TooLarge(e.to_string()),
            UserLogError::Corrupt { .. }
            | UserLogError::StreamConflict { .. }
            | UserLogError::JetStream { .. } => {
                tracing::error!(error = %e, "user log refused a request");
                RoomError::Internal(INTERNAL.into())
            }
        }
    }
}

impl From<LogError> for RoomError {
    fn from(e: LogError) -> RoomError {
        match e {
            LogError::RoomNotFound { .. } => RoomError::NotFound,
            LogError::TooLarge { .. } | LogError::Encode { .. } => {
                RoomError::TooLarge(e.to_string())
            }
            LogError::WrongLastSequence { .. } => RoomError::Conflict(e.to_string()),
            LogError::Unavailable { ref room, op, .. } => {
                tracing::debug!(error = %e, "room log unavailable");
                RoomError::Unavailable(format!("room {room}: {op}: the log is unavailable"))
            }
            LogError::Timeout { .. } => RoomError::Unavailable(e.to_string()),
            LogError::StreamConflict { .. } | LogError::JetStream { .. } => {
                tracing::error!(error = %e, "room log refused a request");
                RoomError::Internal(INTERNAL.into())
            }
        }
    }
}

impl From<StoreError> for RoomError {
    fn from(e: StoreError) -> RoomError {
        tracing::warn!(error = %e, "store request failed");
        let op = match e {
            StoreError::Backend { op, .. } | StoreError::Room { op, .. } => op,
            StoreError::BadAddress(_) => "open",
        };
        RoomError::Unavailable(format!("store {op}: the store is unavailable"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chat_model::RoomId;

    /// Clients are told what failed, never what NATS or the store said about it: that can name
    /// hosts, files and streams, and stays in the server's log.
    #[test]
    fn what_nats_and_the_store_said_is_not_passed_on() {
        let room = RoomId::parse("general").unwrap();
        let secret = "nats://10.1.2.3:4222 /var/lib/chat/store.db stream CHAT_ab12";
        let cases: Vec<(RoomError, &str, &str)> = vec![
            (
                LogError::Unavailable {
                    room: room.clone(),
                    op: "append",
                    reason: secret.into(),
                }
                .into(),
                "unavailable",
                "room general: append: the log is unavailable",
            ),
            (
                LogError::JetStream {
                    room: room.clone(),
                    op: "read",
                    reason: secret.into(),
                }
                .into(),
                "internal",
                INTERNAL,
            ),
            (
                LogError::StreamConflict {
                    room: room.clone(),
                    stream: secret.into(),
                    owner: None,
                }
                .into(),
                "internal",
                INTERNAL,
            ),
            (
                UserLogError::Unavailable {
                    op: "block",
                    reason: secret.into(),
                }
                .into(),
                "unavailable",
                "user log: block: the log is unavailable",
            ),
            (
                UserLogError::JetStream {
                    op: "read",
                    reason: secret.into(),
                }
                .into(),
                "internal",
                INTERNAL,
            ),
            (
                StoreError::Room {
                    op: "history",
                    room: room.clone(),
                    message: secret.into(),
                }
                .into(),
                "unavailable",
                "store history: the store is unavailable",
            ),
            (
                StoreError::Backend {
                    op: "apply",
                    message: secret.into(),
                }
                .into(),
                "unavailable",
                "store apply: the store is unavailable",
            ),
        ];
        for (error, code, message) in cases {
            assert_eq!((error.code(), error.to_string().as_str()), (code, message));
        }
        let timeout: RoomError = LogError::Timeout { room, op: "append" }.into();
        assert_eq!(timeout.to_string(), "room general: append timed out");
    }
}
