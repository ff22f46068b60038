//! Server → client `event` frames, rendered once per edge and shared by every session.
//!
//! A message (or an edit) is rendered twice: as everyone sees it, and as a reader who blocks its
//! author sees it, `{"kind":"message","hidden":true}` without text (an edit keeps its `target`).
//! Each session picks one with [`Delivery::frame_for`]; nothing is rendered per session.

use std::collections::HashSet;

use chat_log::RawEntry;
use chat_model::{Event, EventBody, RoomId, UserId};
use serde::ser::{Serialize, SerializeMap, Serializer};
use serde_json::json;
use tungstenite::Utf8Bytes;

use crate::{Delivery, Framed};

impl Delivery {
    /// The frame a reader who blocks the users in `blocked` receives: the hidden form when
    /// they block this message's (or edit's) author, else the frame everyone gets.
    pub fn frame_for(&self, blocked: &HashSet<UserId>) -> &Framed {
        match &self.hidden {
            Some(hidden) if self.hides_for(blocked) => hidden,
            _ => &self.frame,
        }
    }

    /// Whether a reader who blocks the users in `blocked` gets the hidden form.
    pub fn hides_for(&self, blocked: &HashSet<UserId>) -> bool {
        self.hidden.is_some() && self.author.as_ref().is_some_and(|a| blocked.contains(a))
    }
}

/// The contract's `event` frame for one log entry. An entry this build cannot decode becomes
/// `{"kind":"unsupported"}` with its sequence, so a client's sequence stays gap-free.
pub fn event_frame(room: &RoomId, entry: &RawEntry) -> Utf8Bytes {
    delivery(room, entry).frame.as_str().into()
}

/// One log entry as every session following the room receives it: rendered once.
pub(crate) fn delivery(room: &RoomId, entry: &RawEntry) -> Delivery {
    match entry.decode() {
        Ok(event) => {
            let left = match &event.body {
                EventBody::MemberLeft { member } => Some(member.clone()),
                _ => None,
            };
            let message_by = match &event.body {
                EventBody::Message { .. } => Some(event.user.clone()),
                _ => None,
            };
            Delivery {
                seq: entry.seq,
                frame: render(room, entry.seq, &event, false),
                left,
                message_by,
                hidden: hidden_frame(room, entry.seq, &event),
                author: Some(event.user),
                rendered: std::time::Instant::now(),
            }
        }
        Err(e) => {
            tracing::warn!(room = %room, seq = entry.seq, error = %e, "undecodable event sent as unsupported");
            let frame =
                json!({ "type": "event", "room": room, "seq": entry.seq, "kind": "unsupported" });
            Delivery {
                seq: entry.seq,
                frame: Framed::text(&frame.to_string()),
                left: None,
                message_by: None,
                author: None,
                hidden: None,
                rendered: std::time::Instant::now(),
            }
        }
    }
}

/// The frame of a message or edit for a reader who blocks its author; `None` for other kinds.
fn hidden_frame(room: &RoomId, seq: u64, event: &Event) -> Option<Framed> {
    matches!(
        event.body,
        EventBody::Message { .. } | EventBody::Edit { .. }
    )
    .then(|| render(room, seq, event, true))
}

/// The `event` frame of `event` at `seq`, or its hidden form.
fn render(room: &RoomId, seq: u64, event: &Event, hidden: bool) -> Framed {
    let frame = EventFrame {
        room,
        seq,
        event,
        hidden,
    };
    // Serializing borrowed fields into a string cannot fail.
    Framed::text(&serde_json::to_string(&frame).unwrap_or_default())
}

/// An `event` frame, serialized straight from the event: the envelope every frame has, then the
/// kind's fields (or, hidden, only an edit's `target` and `"hidden":true`).
struct EventFrame<'a> {
    room: &'a RoomId,
    seq: u64,
    event: &'a Event,
    hidden: bool,
}

impl Serialize for EventFrame<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let event = self.event;
        let mut m = s.serialize_map(None)?;
        m.serialize_entry("type", "event")?;
        m.serialize_entry("room", self.room)?;
        m.serialize_entry("seq", &self.seq)?;
        m.serialize_entry("ts", &event.ts)?;
        m.serialize_entry("user", &event.user)?;
        m.serialize_entry("kind", event.kind())?;
        m.serialize_entry("id", &event.id.hyphenated())?;
        if self.hidden {
            if let EventBody::Edit { target, .. } = &event.body {
                m.serialize_entry("target", target)?;
            }
            m.serialize_entry("hidden", &true)?;
            return m.end();
        }
        match &event.body {
            EventBody::Message {
                text,
                thread,
                reply_to,
            } => {
                m.serialize_entry("text", text)?;
                m.serialize_entry("thread", thread)?;
                m.serialize_entry("reply_to", reply_to)?;
            }
            EventBody::Edit { target, text } => {
                m.serialize_entry("target", target)?;
                m.serialize_entry("text", text)?;
            }
            EventBody::Delete { target } => m.serialize_entry("target", target)?,
            EventBody::Reaction { target, emoji, on } => {
                m.serialize_entry("target", target)?;
                m.serialize_entry("emoji", emoji)?;
                m.serialize_entry("on", on)?;
            }
            EventBody::Read { up_to } => m.serialize_entry("up_to", up_to)?,
            EventBody::Delivered { cursors } => m.serialize_entry("cursors", cursors)?,
            EventBody::MemberJoined { member } | EventBody::MemberLeft { member } => {
                m.serialize_entry("member", member)?
            }
            EventBody::RoomCreated {
                name,
                room_kind,
                members,
            } => {
                m.serialize_entry("name", name)?;
                m.serialize_entry("room_kind", room_kind.as_str())?;
                m.serialize_entry("members", members)?;
            }
            EventBody::RoomUpdated { read_only } => m.serialize_entry("read_only", read_only)?,
        }
        m.end()
    }
}

#[cfg(test)]
mod tests {
    use chat_model::{RoomKind, UserId};
    use serde_json::Value;

    use super::*;

    fn entry(seq: u64, body: EventBody) -> RawEntry {
        let event = Event {
            id: uuid::Uuid::from_u128(0x0193_5f2e_4b1c_7a00_8000_0000_0000_0001),
            user: UserId::parse("alice").unwrap(),
            ts: 1_763_900_000_123,
            body,
        };
        RawEntry {
            seq,
            payload: event.encode().unwrap().into(),
        }
    }

    fn render(e: &RawEntry) -> Value {
        serde_json::from_str(event_frame(&RoomId::parse("general").unwrap(), e).as_str()).unwrap()
    }

    /// The frame's bytes, field order included, as the contract's example shows them.
    #[test]
    fn a_message_frame_keeps_the_contracts_field_order() {
        let entry = entry(
            46,
            EventBody::Message {
                text: "hi \"there\"".into(),
                thread: Some(40),
                reply_to: None,
            },
        );
        let room = RoomId::parse("general").unwrap();
        assert_eq!(
            event_frame(&room, &entry).as_str(),
            r#"{"type":"event","room":"general","seq":46,"ts":1763900000123,"user":"alice","kind":"message","id":"01935f2e-4b1c-7a00-8000-000000000001","text":"hi \"there\"","thread":40,"reply_to":null}"#
        );
        assert_eq!(
            delivery(&room, &entry).hidden.unwrap().as_str(),
            r#"{"type":"event","room":"general","seq":46,"ts":1763900000123,"user":"alice","kind":"message","id":"01935f2e-4b1c-7a00-8000-000000000001","hidden":true}"#
        );
    }

    #[test]
    fn a_message_renders_exactly_as_the_contract_shows() {
        let frame = render(&entry(
            46,
            EventBody::Message {
                text: "hi".into(),
                thread: None,
                reply_to: None,
            },
        ));
        assert_eq!(
            frame,
            json!({"type":"event","room":"general","seq":46,"ts":1_763_900_000_123_i64,"user":"alice",
                   "kind":"message","id":"01935f2e-4b1c-7a00-8000-000000000001","text":"hi",
                   "thread":null,"reply_to":null})
        );
    }

    #[test]
    fn every_kind_carries_its_fields() {
        let bob = UserId::parse("bob").unwrap();
        let cases = [
            (
                EventBody::Edit {
                    target: 46,
                    text: "hi!".into(),
                },
                json!({"target":46,"text":"hi!"}),
            ),
            (EventBody::Delete { target: 46 }, json!({"target":46})),
            (
                EventBody::Reaction {
                    target: 46,
                    emoji: "👍".into(),
                    on: false,
                },
                json!({"target":46,"emoji":"👍","on":false}),
            ),
            (EventBody::Read { up_to: 46 }, json!({"up_to":46})),
            (
                EventBody::Delivered {
                    cursors: vec![(bob.clone(), 46)],
                },
                json!({"cursors":[["bob",46]]}),
            ),
            (
                EventBody::MemberJoined {
                    member: bob.clone(),
                },
                json!({"member":"bob"}),
            ),
            (
                EventBody::MemberLeft {
                    member: bob.clone(),
                },
                json!({"member":"bob"}),
            ),
            (
                EventBody::RoomCreated {
                    name: "General".into(),
                    room_kind: RoomKind::Group,
                    members: vec![bob],
                },
                json!({"name":"General","room_kind":"group","members":["bob"]}),
            ),
            (
                EventBody::RoomUpdated { read_only: true },
                json!({"read_only":true}),
            ),
        ];
        for (body, fields) in cases {
            let kind = body.kind();
            let frame = render(&entry(7, body));
            assert_eq!(frame["kind"], kind);
            for (k, v) in fields.as_object().unwrap() {
                assert_eq!(&frame[k], v, "{kind}.{k}");
            }
        }
    }

    #[test]
    fn a_reader_who_blocks_the_author_gets_the_hidden_form() {
        let room = RoomId::parse("general").unwrap();
        let json = |b: &Framed| serde_json::from_str::<Value>(b.as_str()).unwrap();
        let message = delivery(
            &room,
            &entry(
                46,
                EventBody::Message {
                    text: "secret".into(),
                    thread: Some(40),
                    reply_to: Some(41),
                },
            ),
        );
        let alice: HashSet<UserId> = [UserId::parse("alice").unwrap()].into();
        let nobody = HashSet::new();
        assert_eq!(json(message.frame_for(&nobody))["text"], "secret");
        assert_eq!(
            json(message.frame_for(&alice)),
            json!({"type":"event","room":"general","seq":46,"ts":1_763_900_000_123_i64,
                   "user":"alice","kind":"message","id":"01935f2e-4b1c-7a00-8000-000000000001",
                   "hidden":true})
        );
        let edit = delivery(
            &room,
            &entry(
                47,
                EventBody::Edit {
                    target: 46,
                    text: "still secret".into(),
                },
            ),
        );
        let hidden = json(edit.frame_for(&alice));
        assert_eq!(
            (&hidden["target"], &hidden["hidden"]),
            (&json!(46), &json!(true))
        );
        assert!(hidden.get("text").is_none(), "{hidden}");
        // Other kinds are the same for everyone.
        let reaction = delivery(
            &room,
            &entry(
                48,
                EventBody::Reaction {
                    target: 46,
                    emoji: "👍".into(),
                    on: true,
                },
            ),
        );
        assert!(reaction.hidden.is_none());
        assert_eq!(reaction.frame_for(&alice), &reaction.frame);
        assert_eq!(reaction.author, Some(UserId::parse("alice").unwrap()));
    }

    #[test]
    fn undecodable_entries_keep_their_place_in_the_sequence() {
        let frame = render(&RawEntry {
            seq: 9,
            payload: bytes::Bytes::from_static(b"\xc1"),
        });
        assert_eq!(
            frame,
            json!({"type":"event","room":"general","seq":9,"kind":"unsupported"})
        );
    }
}
