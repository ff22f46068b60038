//! Why a room request was refused, with the contract's code and HTTP status for each.

use chat_log::{LogError, UserLogError};
use chat_model::Refusal;
use chat_store::StoreError;

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
            UserLogError::Unavailable { .. } | UserLogError::Timeout { .. } => {
                RoomError::Unavailable(e.to_string())
            }
            UserLogError::WrongLastSequence { .. } => RoomError::Conflict(e.to_string()),
            UserLogError::Encode(_) => RoomError::TooLarge(e.to_string()),
            UserLogError::Corrupt { .. }
            | UserLogError::StreamConflict { .. }
            | UserLogError::JetStream { .. } => {
                tracing::error!(error = %e, "user log refused a request");
                RoomError::Internal(e.to_string())
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
            LogError::Unavailable { .. } | LogError::Timeout { .. } => {
                RoomError::Unavailable(e.to_string())
            }
            LogError::StreamConflict { .. } | LogError::JetStream { .. } => {
                tracing::error!(error = %e, "room log refused a request");
                RoomError::Internal(e.to_string())
            }
        }
    }
}

impl From<StoreError> for RoomError {
    fn from(e: StoreError) -> RoomError {
        tracing::warn!(error = %e, "store request failed");
        RoomError::Unavailable(e.to_string())
    }
}
