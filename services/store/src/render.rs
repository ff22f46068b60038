//! The materialized form of an event, the same for every backend.
//!
//! `{"seq","ts","user","kind","id", …}` plus the kind's fields, as in the contract's `event`
//! frame. Messages carry their current text, `"edited":true` once edited, `"deleted":true` and
//! no text once deleted, `reactions` (per emoji, who) and `replies` (count and last reply's
//! sequence) when they have any.

use chat_model::{Event, EventBody};
use serde_json::{json, Map, Value};

/// An event as a backend reads it back.
#[derive(Debug, Clone, Default)]
pub(crate) struct StoredEvent {
    pub seq: u64,
    pub ts: i64,
    pub user: String,
    pub id: String,
    pub kind: String,
    /// Messages: the current text (`None` once deleted).
    pub text: Option<String>,
    pub edited: bool,
    pub deleted: bool,
    pub thread: Option<u64>,
    pub reply_to: Option<u64>,
    /// Other kinds: their fields, as JSON.
    pub fields: Option<String>,
    /// Per emoji (sorted), who reacted (in the order they did).
    pub reactions: Vec<(String, Vec<String>)>,
    /// Replies in the thread this message roots: count and last sequence.
    pub replies: Option<(u64, u64)>,
}

impl StoredEvent {
    pub fn to_json(&self) -> Value {
        let mut out = Map::new();
        out.insert("seq".into(), json!(self.seq));
        out.insert("ts".into(), json!(self.ts));
        out.insert("user".into(), json!(self.user));
        out.insert("kind".into(), json!(self.kind));
        out.insert("id".into(), json!(self.id));
        if self.kind == "message" {
            if self.deleted {
                out.insert("deleted".into(), json!(true));
            } else {
                out.insert("text".into(), json!(self.text));
                if self.edited {
                    out.insert("edited".into(), json!(true));
                }
            }
            out.insert("thread".into(), json!(self.thread));
            out.insert("reply_to".into(), json!(self.reply_to));
            if !self.reactions.is_empty() {
                let reactions: Vec<Value> = self
                    .reactions
                    .iter()
                    .map(|(emoji, users)| {
                        json!({"emoji": emoji, "count": users.len(), "users": users})
                    })
                    .collect();
                out.insert("reactions".into(), Value::Array(reactions));
            }
            if let Some((count, last)) = self.replies {
                out.insert("replies".into(), json!({"count": count, "last": last}));
            }
        } else if let Some(fields) = &self.fields {
            if let Ok(Value::Object(fields)) = serde_json::from_str::<Value>(fields) {
                out.extend(fields);
            }
        }
        Value::Object(out)
    }
}

/// The kind's own fields of a non-message event, as stored and shown.
pub(crate) fn fields_of(body: &EventBody) -> Value {
    match body {
        EventBody::Message {
            text,
            thread,
            reply_to,
        } => json!({"text": text, "thread": thread, "reply_to": reply_to}),
        EventBody::Edit { target, text } => json!({"target": target, "text": text}),
        EventBody::Delete { target } => json!({"target": target}),
        EventBody::Reaction { target, emoji, on } => {
            json!({"target": target, "emoji": emoji, "on": on})
        }
        EventBody::Read { up_to } => json!({"up_to": up_to}),
        EventBody::MemberJoined { member } | EventBody::MemberLeft { member } => {
            json!({"member": member.as_str()})
        }
        EventBody::RoomCreated {
            name,
            room_kind,
            members,
        } => json!({
            "name": name,
            "room_kind": room_kind.as_str(),
            "members": members.iter().map(|m| m.as_str()).collect::<Vec<_>>(),
        }),
    }
}

/// An event straight from the log in the history form, before any projection (used to show
/// events the store does not hold yet).
pub fn render_entry(seq: u64, event: &Event) -> Value {
    let mut out = Map::new();
    out.insert("seq".into(), json!(seq));
    out.insert("ts".into(), json!(event.ts));
    out.insert("user".into(), json!(event.user.as_str()));
    out.insert("kind".into(), json!(event.body.kind()));
    out.insert("id".into(), json!(event.id.hyphenated().to_string()));
    if let Value::Object(fields) = fields_of(&event.body) {
        out.extend(fields);
    }
    Value::Object(out)
}
