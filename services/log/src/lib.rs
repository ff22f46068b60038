//! The room log: every chat event of a room is appended to that room's JetStream stream, and the
//! stream's sequence is the room's one order. This crate is the only code that knows how rooms map
//! onto streams and subjects:
//!
//! | what | name (prefix `chat`) |
//! |---|---|
//! | stream | `CHAT_<32 hex of sha256(room)>`, the room id in the metadata key `chat.room` |
//! | subject appended to | `chat.room.<room>` |
//! | subject of membership and settings changes | `chat.change.<room>` (same stream) |
//! | republished (persist, then broadcast) | `chat.live.<room>` with `Nats-Sequence` etc. |
//!
//! Streams keep everything (no age or count limits), deny deletes and purges, allow direct gets,
//! and deduplicate by `Nats-Msg-Id` (the event's client id) within the configured window.
//!
//! What belongs to a user rather than a room (block lists) lives in the user log ([`UserLog`]):
//! one stream, one subject per user named by a digest of the user id.
#![forbid(unsafe_code)]

mod config;
mod error;
mod live;
mod log;
mod range;
mod users;
mod wire;

pub use config::{ConfigError, LogConfig, BULK_READ_FACTOR};
pub use error::LogError;
pub use live::LiveSubscription;
pub use log::{
    Appended, ConnectError, ConnectionEvent, ConnectionEvents, ListRoomsError, PendingAppend,
    RawEntry, RoomBounds, RoomLog, TRACEPARENT,
};
pub use range::RangeReader;
pub use users::{BlocksEntry, UserLog, UserLogError};
pub use wire::WireAuth;
