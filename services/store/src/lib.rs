//! The projection store: what clients query, materialized from the room logs.
//!
//! The log is the truth; the store is a view of it that a projector keeps up to date and that
//! can be rebuilt from the log at any time. [`Store`] is the one interface the projector, the
//! API and the edge use; [`SqliteStore`] is the embedded backend. Every backend passes the same
//! conformance suite (`tests/conformance.rs`).
//!
//! Rows are keyed by (room, seq). A projector hands each room's events to [`Store::apply`] in
//! sequence order; the store skips what its checkpoint says it already holds and advances the
//! checkpoint with the rows, so a replay, a duplicate or a restart converges to the same rows.
#![forbid(unsafe_code)]

mod commits;
mod idfilter;
mod receipts;
mod render;
mod scylla;
mod sqlite;

use std::collections::HashSet;

use async_trait::async_trait;
use chat_model::{Event, RoomId, RoomKind, RoomState, UserId};
use serde_json::Value;
use uuid::Uuid;

pub use commits::Commits;
pub use receipts::{add_receipts, wants_receipts, MemberCursors, ReceiptIndex, Receipts};
pub use render::{
    apply_unstored, authors, hide_blocked_authors, render_entry, unstored_deletes, ChangeRights,
};
pub use scylla::{parse_uri as parse_scylla_uri, ScyllaLogin, ScyllaStore};
pub use sqlite::SqliteStore;

/// The most events one history or thread page returns.
pub const MAX_PAGE: usize = 200;

/// One entry of a room's log as the projector hands it to the store.
#[derive(Debug, Clone)]
pub struct Entry {
    pub seq: u64,
    /// The decoded event, or why it could not be decoded (it becomes a dead letter).
    pub event: Result<Event, String>,
}

/// A room's entries, in sequence order.
#[derive(Debug, Clone)]
pub struct RoomBatch {
    pub room: RoomId,
    pub entries: Vec<Entry>,
}

/// Which page of a room's history (or of a thread) to read: newest first.
#[derive(Debug, Clone, Copy)]
pub struct PageQuery {
    /// Only events with a lower sequence; `None`: from the newest.
    pub before: Option<u64>,
    /// At most this many (clamped to 1..=[`MAX_PAGE`]).
    pub limit: usize,
}

impl PageQuery {
    pub fn newest(limit: usize) -> PageQuery {
        PageQuery {
            before: None,
            limit,
        }
    }

    /// The limit as the store applies it.
    pub fn clamped_limit(&self) -> usize {
        self.limit.clamp(1, MAX_PAGE)
    }
}

/// A page of materialized events, newest first.
#[derive(Debug, Clone, PartialEq)]
pub struct Page {
    /// Events in the contract's materialized form (see [`render_entry`]).
    pub events: Vec<Value>,
    /// Whether older events exist before the last one returned.
    pub more: bool,
}

/// A thread: its root message and a page of its replies.
#[derive(Debug, Clone, PartialEq)]
pub struct ThreadPage {
    /// The root, `None` if the store holds no message at that sequence, or a reply (threads
    /// are one level deep).
    pub root: Option<Value>,
    pub replies: Page,
}

/// One room in a user's room list.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RoomSummary {
    pub room: RoomId,
    pub kind: RoomKind,
    pub name: String,
    /// The last sequence the store holds for the room.
    pub head: u64,
    /// The user's read cursor.
    pub last_read: u64,
    /// Messages by others, not deleted, not by a user the reader blocks, after `last_read`.
    pub unread: u64,
    /// Whether only the room's admin may post (set by `room_updated`).
    pub read_only: bool,
}

/// Where an event with a given client id landed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IdHit {
    pub seq: u64,
    pub ts: i64,
}

/// An entry the projector could not decode: recorded, counted, and passed over.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeadLetter {
    pub room: RoomId,
    pub seq: u64,
    pub error: String,
}

/// What one projector reports about itself, so edges can tell how far behind it is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProjectorStatus {
    /// Which share of the rooms it projects, e.g. `0/1`.
    pub partition: String,
    /// Age of the oldest event it knows of and has not yet stored, in ms (0 when caught up).
    pub lag_ms: u64,
    /// Wall clock of this report, ms since the epoch.
    pub reported_at_ms: i64,
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("store {op}: {message}")]
    Backend { op: &'static str, message: String },
    #[error("store {op} for room {room}: {message}")]
    Room {
        op: &'static str,
        room: RoomId,
        message: String,
    },
    #[error("bad store address {0:?}")]
    BadAddress(String),
}

pub type Result<T, E = StoreError> = std::result::Result<T, E>;

/// The projection store.
#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// `sqlite` or `scylla`.
    fn backend(&self) -> &'static str;

    /// Applies each room's entries after its checkpoint, in order, and advances the checkpoint
    /// to the last entry. Entries at or below the checkpoint are skipped, so applying the same
    /// batch twice changes nothing. The caller gives each room's entries gap-free from the
    /// checkpoint on.
    async fn apply(&self, batches: &[RoomBatch]) -> Result<()>;

    /// The last sequence of `room` the store holds (0: none).
    async fn checkpoint(&self, room: &RoomId) -> Result<u64>;

    /// Every room's checkpoint.
    async fn checkpoints(&self) -> Result<Vec<(RoomId, u64)>>;

    /// The room's state (kind, creator, members, settings) as of its checkpoint, `None` before
    /// its `room_created` is stored.
    async fn room_state(&self, room: &RoomId) -> Result<Option<RoomState>>;

    /// The rooms `user` is a member of, by room id. Unread counts leave out the messages of
    /// the users in `blocked` (the user's block list: block lists live in the user log, not
    /// in the store, so the caller passes it).
    async fn rooms_of(&self, user: &UserId, blocked: &HashSet<UserId>) -> Result<Vec<RoomSummary>>;

    /// Whether the store holds the message at `seq` as deleted (false when it holds no message
    /// there, or does not hold it yet).
    async fn is_deleted(&self, room: &RoomId, seq: u64) -> Result<bool>;

    /// `user`'s stored read cursor in `room` (from read events and own messages; 0 when none is
    /// stored). It may or may not count the user's joining: callers take the max with the join
    /// point from the room state.
    async fn read_cursor(&self, room: &RoomId, user: &UserId) -> Result<u64>;

    /// Every active member's read and delivered cursors in `room` (for delivery receipts), by
    /// user; empty for a room the store does not hold.
    async fn member_cursors(&self, room: &RoomId) -> Result<Vec<MemberCursors>>;

    /// The highest sequence in `(after, up_to]` holding a message (deleted ones included),
    /// among what the store holds. Receipts count messages only, so a delivered cursor that
    /// crosses none changes no count (see `Rooms::delivered`).
    async fn last_message_in(&self, room: &RoomId, after: u64, up_to: u64) -> Result<Option<u64>>;

    /// A page of the room's history, newest first, as `viewer` sees it.
    async fn history(&self, room: &RoomId, query: PageQuery) -> Result<Page>;

    /// A thread: its root and a page of its replies, newest first.
    async fn thread(&self, room: &RoomId, root: u64, query: PageQuery) -> Result<ThreadPage>;

    /// The event `room` holds for the client id `id` (the idempotency index).
    async fn find_id(&self, room: &RoomId, id: Uuid) -> Result<Option<IdHit>>;

    /// Entries that could not be decoded, by room and sequence.
    async fn dead_letters(&self) -> Result<Vec<DeadLetter>>;

    /// Removes everything the store holds for `room` (before a rebuild of it).
    async fn clear_room(&self, room: &RoomId) -> Result<()>;

    /// A digest of every row (or one room's rows): equal digests, equal contents.
    async fn digest(&self, room: Option<&RoomId>) -> Result<String>;

    /// Records a projector's report.
    async fn report_projector(&self, status: &ProjectorStatus) -> Result<()>;

    /// Every projector's last report.
    async fn projectors(&self) -> Result<Vec<ProjectorStatus>>;
}
