//! The event envelope: what one entry of a room's log holds.
//!
//! Events are MessagePack **named** maps (`rmp_serde::to_vec_named`), so a reader ignores fields
//! it does not know and a writer may add optional fields without a version change. `v` changes
//! only when an existing field changes meaning; the decoder keeps accepting every version ever
//! written (the golden files under `tests/golden/` hold bytes of each).
//!
//! Common fields: `v`, `kind`, `id` (the client's UUID, also the `Nats-Msg-Id`), `user` (who
//! appended it), `ts` (the appending edge's wall clock in ms, for display only: the stream
//! sequence is the order). The kind's own fields follow in the same map.

use std::borrow::Cow;

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::ids::UserId;

/// The envelope version this build writes.
pub const ENVELOPE_VERSION: u16 = 1;

/// The largest encoded event accepted, in bytes. The room log sizes its streams' maximum
/// message size from this, so every legal event fits.
pub const MAX_EVENT_BYTES: usize = 256 * 1024;

/// One entry of a room's log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    /// Client-chosen idempotency key: a resend with the same id within the room is the same event.
    pub id: Uuid,
    /// The user who appended the event.
    pub user: UserId,
    /// Appending edge's wall clock, milliseconds since the Unix epoch; for display only.
    pub ts: i64,
    /// What happened.
    pub body: EventBody,
}

/// The kinds of event and their fields (the client contract's `event` frames).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EventBody {
    /// A chat message, optionally in a thread (seq of the root) or replying to a message.
    Message {
        text: String,
        thread: Option<u64>,
        reply_to: Option<u64>,
    },
    /// New text for the message at `target` (author only).
    Edit { target: u64, text: String },
    /// The message at `target` is deleted (author or room admin).
    Delete { target: u64 },
    /// `user` sets (`on`) or clears their `emoji` reaction on the message at `target`.
    Reaction {
        target: u64,
        emoji: String,
        on: bool,
    },
    /// `user` has read the room up to and including `up_to`.
    Read { up_to: u64 },
    /// Delivery cursors: each user's device has received the room up to and including the seq
    /// next to them. One event carries every cursor an edge gathered for the room during one
    /// interval (so a busy room costs one event per edge per interval, not one per message per
    /// member); the envelope's `user` is the first user of the batch.
    Delivered { cursors: Vec<(UserId, u64)> },
    /// `member` joined (added by `user`, or `user` themself).
    MemberJoined { member: UserId },
    /// `member` left (removed by `user`, or `user` themself).
    MemberLeft { member: UserId },
    /// The room's first event: its name, kind and initial members. The creator is the event's
    /// `user`, a member and the room's admin, and is not repeated in `members` (readers
    /// treat a creator listed there all the same).
    RoomCreated {
        name: String,
        room_kind: RoomKind,
        members: Vec<UserId>,
    },
    /// The room's admin changed its settings. `read_only`: only the admin may post (send,
    /// edit, react) while it is set. Settings added later arrive as further optional fields.
    RoomUpdated { read_only: bool },
}

/// Whether a room is a group room or a two-person direct room.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RoomKind {
    Group,
    Direct,
}

impl RoomKind {
    pub fn as_str(self) -> &'static str {
        match self {
            RoomKind::Group => "group",
            RoomKind::Direct => "direct",
        }
    }
}

impl EventBody {
    /// The `kind` string written to the log and shown to clients.
    pub fn kind(&self) -> &'static str {
        match self {
            EventBody::Message { .. } => "message",
            EventBody::Edit { .. } => "edit",
            EventBody::Delete { .. } => "delete",
            EventBody::Reaction { .. } => "reaction",
            EventBody::Read { .. } => "read",
            EventBody::Delivered { .. } => "delivered",
            EventBody::MemberJoined { .. } => "member_joined",
            EventBody::MemberLeft { .. } => "member_left",
            EventBody::RoomCreated { .. } => "room_created",
            EventBody::RoomUpdated { .. } => "room_updated",
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum EncodeError {
    #[error("{kind} event is {size} bytes encoded, more than the {max} allowed")]
    TooLarge {
        kind: &'static str,
        size: usize,
        max: usize,
    },
    #[error("encode {kind} event: {source}")]
    Msgpack {
        kind: &'static str,
        source: rmp_serde::encode::Error,
    },
}

#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    #[error("not an event envelope: {0}")]
    Msgpack(#[from] rmp_serde::decode::Error),
    #[error(
        "envelope version {0} is not supported by this build (it reads 1..={ENVELOPE_VERSION})"
    )]
    UnsupportedVersion(u16),
    #[error("unknown event kind {0:?}")]
    UnknownKind(String),
    #[error("{kind} event lacks field `{field}`")]
    MissingField { kind: String, field: &'static str },
    #[error("event id {0:?} is not a UUID")]
    BadId(String),
    #[error("bytes follow the event envelope")]
    TrailingBytes,
}

/// The map as it is written: every kind's fields, each optional, absent when unused.
#[derive(Serialize, Deserialize)]
struct Wire<'a> {
    v: u16,
    #[serde(borrow)]
    kind: Cow<'a, str>,
    #[serde(borrow)]
    id: Cow<'a, str>,
    user: Cow<'a, UserId>,
    ts: i64,
    #[serde(default, borrow, skip_serializing_if = "Option::is_none")]
    text: Option<Cow<'a, str>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    thread: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    reply_to: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    target: Option<u64>,
    #[serde(default, borrow, skip_serializing_if = "Option::is_none")]
    emoji: Option<Cow<'a, str>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    on: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    up_to: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    member: Option<Cow<'a, UserId>>,
    #[serde(default, borrow, skip_serializing_if = "Option::is_none")]
    name: Option<Cow<'a, str>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    room_kind: Option<RoomKind>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    members: Option<Cow<'a, [UserId]>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    read_only: Option<bool>,
    /// `delivered`: `[[user, seq], …]`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    cursors: Option<Cow<'a, [(UserId, u64)]>>,
}

impl<'a> Wire<'a> {
    fn new(event: &'a Event, id: &'a str) -> Self {
        Wire {
            v: ENVELOPE_VERSION,
            kind: Cow::Borrowed(event.body.kind()),
            id: Cow::Borrowed(id),
            user: Cow::Borrowed(&event.user),
            ts: event.ts,
            text: None,
            thread: None,
            reply_to: None,
            target: None,
            emoji: None,
            on: None,
            up_to: None,
            member: None,
            name: None,
            room_kind: None,
            members: None,
            read_only: None,
            cursors: None,
        }
    }
}

impl Event {
    /// The `kind` string of this event.
    pub fn kind(&self) -> &'static str {
        self.body.kind()
    }

    /// Encodes the event as it is stored in the log.
    pub fn encode(&self) -> Result<Vec<u8>, EncodeError> {
        let mut id_buf = Uuid::encode_buffer();
        let id = self.id.hyphenated().encode_lower(&mut id_buf);
        let mut w = Wire::new(self, id);
        match &self.body {
            EventBody::Message {
                text,
                thread,
                reply_to,
            } => {
                w.text = Some(Cow::Borrowed(text));
                w.thread = *thread;
                w.reply_to = *reply_to;
            }
            EventBody::Edit { target, text } => {
                w.target = Some(*target);
                w.text = Some(Cow::Borrowed(text));
            }
            EventBody::Delete { target } => w.target = Some(*target),
            EventBody::Reaction { target, emoji, on } => {
                w.target = Some(*target);
                w.emoji = Some(Cow::Borrowed(emoji));
                w.on = Some(*on);
            }
            EventBody::Read { up_to } => w.up_to = Some(*up_to),
            EventBody::Delivered { cursors } => w.cursors = Some(Cow::Borrowed(cursors)),
            EventBody::MemberJoined { member } | EventBody::MemberLeft { member } => {
                w.member = Some(Cow::Borrowed(member));
            }
            EventBody::RoomCreated {
                name,
                room_kind,
                members,
            } => {
                w.name = Some(Cow::Borrowed(name));
                w.room_kind = Some(*room_kind);
                w.members = Some(Cow::Borrowed(members));
            }
            EventBody::RoomUpdated { read_only } => w.read_only = Some(*read_only),
        }
        let kind = self.kind();
        // Sized for the envelope plus the text, so encoding allocates once.
        let text_len = w.text.as_ref().map_or(0, |t| t.len());
        let mut bytes = Vec::with_capacity(128 + text_len);
        rmp_serde::encode::write_named(&mut bytes, &w)
            .map_err(|source| EncodeError::Msgpack { kind, source })?;
        if bytes.len() > MAX_EVENT_BYTES {
            return Err(EncodeError::TooLarge {
                kind,
                size: bytes.len(),
                max: MAX_EVENT_BYTES,
            });
        }
        Ok(bytes)
    }

    /// Decodes an event of any envelope version this build knows.
    pub fn decode(bytes: &[u8]) -> Result<Event, DecodeError> {
        let mut de = rmp_serde::Deserializer::from_read_ref(bytes);
        let w = <Wire<'_> as serde::Deserialize>::deserialize(&mut de)?;
        // An entry is one envelope: anything after it means the bytes are not what a writer of
        // events wrote, and reading them as the event would hide that.
        match <serde::de::IgnoredAny as serde::Deserialize>::deserialize(&mut de) {
            Err(rmp_serde::decode::Error::InvalidMarkerRead(e))
                if e.kind() == std::io::ErrorKind::UnexpectedEof => {}
            _ => return Err(DecodeError::TrailingBytes),
        }
        if w.v == 0 || w.v > ENVELOPE_VERSION {
            return Err(DecodeError::UnsupportedVersion(w.v));
        }
        let id = Uuid::try_parse(&w.id).map_err(|_| DecodeError::BadId(w.id.to_string()))?;
        let kind = w.kind.as_ref();
        let missing = |field| DecodeError::MissingField {
            kind: kind.to_owned(),
            field,
        };
        let text = || {
            w.text
                .clone()
                .map(Cow::into_owned)
                .ok_or_else(|| missing("text"))
        };
        let target = || w.target.ok_or_else(|| missing("target"));
        let member = || {
            w.member
                .clone()
                .map(Cow::into_owned)
                .ok_or_else(|| missing("member"))
        };
        let body = match kind {
            "message" => EventBody::Message {
                text: text()?,
                thread: w.thread,
                reply_to: w.reply_to,
            },
            "edit" => EventBody::Edit {
                target: target()?,
                text: text()?,
            },
            "delete" => EventBody::Delete { target: target()? },
            "reaction" => EventBody::Reaction {
                target: target()?,
                emoji: w
                    .emoji
                    .clone()
                    .map(Cow::into_owned)
                    .ok_or_else(|| missing("emoji"))?,
                on: w.on.ok_or_else(|| missing("on"))?,
            },
            "read" => EventBody::Read {
                up_to: w.up_to.ok_or_else(|| missing("up_to"))?,
            },
            "delivered" => EventBody::Delivered {
                cursors: w
                    .cursors
                    .clone()
                    .map(Cow::into_owned)
                    .ok_or_else(|| missing("cursors"))?,
            },
            "member_joined" => EventBody::MemberJoined { member: member()? },
            "member_left" => EventBody::MemberLeft { member: member()? },
            "room_created" => EventBody::RoomCreated {
                name: w.name.clone().map(Cow::into_owned).unwrap_or_default(),
                room_kind: w.room_kind.ok_or_else(|| missing("room_kind"))?,
                members: w
                    .members
                    .clone()
                    .map(Cow::into_owned)
                    .ok_or_else(|| missing("members"))?,
            },
            "room_updated" => EventBody::RoomUpdated {
                read_only: w.read_only.ok_or_else(|| missing("read_only"))?,
            },
            other => return Err(DecodeError::UnknownKind(other.to_owned())),
        };
        Ok(Event {
            id,
            user: w.user.into_owned(),
            ts: w.ts,
            body,
        })
    }
}
