//! Room and user identifiers, and the versioned event envelope that every room's log holds.
//!
//! This crate does no I/O. Everything that reaches a NATS subject or a stream name goes through
//! [`RoomId`] first, and every byte written to a room's log is produced by [`Event::encode`].
#![forbid(unsafe_code)]

mod event;
mod ids;
pub mod room;

pub use event::{
    DecodeError, EncodeError, Event, EventBody, RoomKind, ENVELOPE_VERSION, MAX_EVENT_BYTES,
};
pub use ids::{IdError, RoomId, UserId, MAX_ROOM_ID_LEN, MAX_USER_ID_LEN};
pub use room::{direct_room_id, Refusal, RoomState};
