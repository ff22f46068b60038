//! Rows as the store reads them back.

use ::scylla::DeserializeRow;
use uuid::Uuid;

use crate::render::StoredEvent;

/// A row of `events` (the columns of `statements::EVENT_COLUMNS`).
#[derive(Debug, Clone, DeserializeRow)]
pub(crate) struct EventRow {
    pub seq: i64,
    pub id: Option<Uuid>,
    pub author: Option<String>,
    pub ts: Option<i64>,
    pub kind: Option<String>,
    pub body: Option<String>,
    pub original_body: Option<String>,
    pub edit_seq: Option<i64>,
    pub deleted: Option<bool>,
    pub thread: Option<i64>,
    pub reply_to: Option<i64>,
    pub target: Option<i64>,
    pub fields: Option<String>,
}

impl EventRow {
    pub fn is_message(&self) -> bool {
        self.kind.as_deref() == Some("message")
    }

    pub fn is_deleted(&self) -> bool {
        self.deleted.unwrap_or(false)
    }

    /// The row in the shared rendering's form; `None` for a row without a kind, which only a
    /// write to a row that was never inserted could leave (none is made by design).
    pub fn stored(&self) -> Option<StoredEvent> {
        Some(StoredEvent {
            seq: self.seq.max(0) as u64,
            ts: self.ts.unwrap_or(0),
            user: self.author.clone().unwrap_or_default(),
            id: self
                .id
                .map(|id| id.hyphenated().to_string())
                .unwrap_or_default(),
            kind: self.kind.clone()?,
            text: self.body.clone(),
            edited: self.edit_seq.is_some(),
            deleted: self.is_deleted(),
            thread: self.thread.map(|s| s.max(0) as u64),
            reply_to: self.reply_to.map(|s| s.max(0) as u64),
            fields: self.fields.clone(),
            reactions: Vec::new(),
            replies: None,
        })
    }
}

/// A row of `checkpoints`.
#[derive(Debug, Clone, Copy, Default, DeserializeRow)]
pub(crate) struct CheckpointRow {
    pub seq: Option<i64>,
    pub written: Option<i64>,
    pub generation: Option<i64>,
}

impl CheckpointRow {
    /// The last sequence the store holds (0: none).
    pub fn seq(&self) -> u64 {
        self.seq.unwrap_or(0).max(0) as u64
    }

    /// The highest sequence rows may have been written for.
    pub fn written(&self) -> u64 {
        self.written.unwrap_or(0).max(0) as u64
    }

    pub fn generation(&self) -> i64 {
        self.generation.unwrap_or(0)
    }
}

/// A row of `rooms`.
#[derive(Debug, Clone, DeserializeRow)]
pub(crate) struct RoomRow {
    pub kind: Option<String>,
    pub name: Option<String>,
    pub creator: Option<String>,
    pub created_seq: Option<i64>,
}
