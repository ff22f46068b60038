//! Room and user identifiers, the versioned event envelope that every room's log holds, and the
//! block-list events of the user log.
//!
//! This crate does no I/O. Everything that reaches a NATS subject or a stream name goes through
//! [`RoomId`] first (user ids only ever as a digest), and every byte written to a room's log is
//! produced by [`Event::encode`] (to the user log, by [`BlockEvent::encode`]).
#![forbid(unsafe_code)]

pub mod blocks;
mod event;
mod ids;
pub mod room;

pub use blocks::{decide_block_change, BlockChange, BlockEvent, MAX_BLOCKED};
pub use event::{
    DecodeError, EncodeError, Event, EventBody, RoomKind, ENVELOPE_VERSION, MAX_EVENT_BYTES,
};
pub use ids::{IdError, RoomId, UserId, MAX_ROOM_ID_LEN, MAX_USER_ID_LEN};
pub use room::{decide_direct_contact, direct_room_id, PairBlocks, Refusal, RoomState};
