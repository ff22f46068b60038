//! The materialized form of an event, the same for every backend.
//!
//! `{"seq","ts","user","kind","id", …}` plus the kind's fields, as in the contract's `event`
//! frame. Messages carry their current text, `"edited":true` once edited, `"deleted":true` and
//! no text once deleted, `reactions` (per emoji, who) and `replies` (count and last reply's
//! sequence) when they have any.
//!
//! For a reader who blocks the author, a message is `{"seq","ts","user","kind":"message","id",
//! "hidden":true}` and nothing else, and an edit of it keeps its `target` but not its text
//! ([`hide_blocked_authors`]): the sequence stays gap-free, the words stay out.

use std::collections::{HashMap, HashSet};

use chat_model::{Event, EventBody, RoomKind, RoomState, UserId};
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
        EventBody::Delivered { cursors } => json!({"cursors": cursors}),
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
        EventBody::RoomUpdated { read_only } => json!({"read_only": read_only}),
    }
}

/// The keys a hidden message keeps (the event frame adds `type` and `room`).
const HIDDEN_KEEPS: &[&str] = &["type", "room", "seq", "ts", "user", "kind", "id"];

/// Replaces, in a page of materialized events, every message and edit whose author is in
/// `blocked` by its hidden form (see the module docs). Other kinds are left as they are.
pub fn hide_blocked_authors(events: &mut [Value], blocked: &HashSet<UserId>) {
    if blocked.is_empty() {
        return;
    }
    for event in events {
        let Some(map) = event.as_object_mut() else {
            continue;
        };
        let kind = map.get("kind").and_then(Value::as_str);
        if !matches!(kind, Some("message" | "edit")) {
            continue;
        }
        let by_blocked = map
            .get("user")
            .and_then(Value::as_str)
            .and_then(|u| UserId::parse(u).ok())
            .is_some_and(|u| blocked.contains(&u));
        if by_blocked {
            let is_edit = kind == Some("edit");
            map.retain(|k, _| HIDDEN_KEEPS.contains(&k.as_str()) || (is_edit && k == "target"));
            map.insert("hidden".into(), json!(true));
        }
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

/// Who may edit and delete among the events the store does not hold yet, as the projector
/// decides it when it stores them: an edit is its message's author's; a delete is the author's,
/// or the group room's admin's (its creator) while a member.
#[derive(Debug, Clone, Default)]
pub struct ChangeRights {
    /// A group room's admin, and whether they are a member at the room's head.
    admin: Option<(UserId, bool)>,
}

impl ChangeRights {
    /// The rights in `state`'s room (read at its head).
    pub fn of(state: &RoomState) -> ChangeRights {
        let admin = (state.kind == RoomKind::Group)
            .then(|| (state.creator.clone(), state.is_member(&state.creator)));
        ChangeRights { admin }
    }

    /// Whether `event` (at `seq`, one of `unstored`) changes a message by `author`.
    pub fn allow(&self, unstored: &[(u64, Event)], seq: u64, event: &Event, author: &str) -> bool {
        if event.user.as_str() == author {
            return matches!(
                event.body,
                EventBody::Edit { .. } | EventBody::Delete { .. }
            );
        }
        let Some((admin, member_at_head)) = &self.admin else {
            return false;
        };
        matches!(event.body, EventBody::Delete { .. })
            && &event.user == admin
            && admin_member_at(unstored, admin, *member_at_head, seq)
    }
}

/// Whether `admin` is a member at `seq`: the last change of their membership among `unstored`
/// before it says, else the first one after it says the opposite, else the head's does.
fn admin_member_at(unstored: &[(u64, Event)], admin: &UserId, at_head: bool, seq: u64) -> bool {
    let change = |event: &Event| match &event.body {
        EventBody::MemberJoined { member } if member == admin => Some(true),
        EventBody::MemberLeft { member } if member == admin => Some(false),
        _ => None,
    };
    let before = unstored
        .iter()
        .rev()
        .filter(|(s, _)| *s < seq)
        .find_map(|(_, e)| change(e));
    let after = unstored
        .iter()
        .filter(|(s, _)| *s > seq)
        .find_map(|(_, e)| change(e));
    before.or(after.map(|joined| !joined)).unwrap_or(at_head)
}

/// The messages that the deletes among `unstored` which `rights` allow delete, of those whose
/// author `authors` knows (see [`authors`]).
pub fn unstored_deletes(
    unstored: &[(u64, Event)],
    rights: &ChangeRights,
    authors: &HashMap<u64, String>,
) -> HashSet<u64> {
    unstored
        .iter()
        .filter_map(|(seq, event)| match event.body {
            EventBody::Delete { target } => authors
                .get(&target)
                .is_some_and(|author| rights.allow(unstored, *seq, event, author))
                .then_some(target),
            _ => None,
        })
        .collect()
}

/// The authors of the messages the edits and deletes of `unstored` target, as far as `page`
/// and `unstored` tell: a message's own `user`; for a message in neither, the author of an edit
/// of it (only its author's edits ever take effect).
pub fn authors(page: &[Value], unstored: &[(u64, Event)]) -> HashMap<u64, String> {
    let mut authors = HashMap::new();
    let mut editors = HashMap::new();
    for event in page {
        let (Some(seq), Some(user)) = (
            event.get("seq").and_then(Value::as_u64),
            event.get("user").and_then(Value::as_str),
        ) else {
            continue;
        };
        match event.get("kind").and_then(Value::as_str) {
            Some("message") => {
                authors.insert(seq, user.to_owned());
            }
            Some("edit") => {
                if let Some(target) = event.get("target").and_then(Value::as_u64) {
                    editors.insert(target, user.to_owned());
                }
            }
            _ => {}
        }
    }
    for (seq, event) in unstored {
        match &event.body {
            EventBody::Message { .. } => {
                authors.insert(*seq, event.user.as_str().to_owned());
            }
            EventBody::Edit { target, .. } => {
                editors.insert(*target, event.user.as_str().to_owned());
            }
            _ => {}
        }
    }
    for (target, editor) in editors {
        authors.entry(target).or_insert(editor);
    }
    authors
}

/// Applies to a page of materialized events the edits and deletes the store does not hold yet
/// (`unstored`, from the log, in sequence order), as the projector will (those `rights`
/// allow): a deleted message loses its text, edited flag and reactions, and every edit of it in
/// the page its text (of a message deleted in the store too); an edit of a message that is not
/// deleted becomes its text. Reactions and thread counts are left to the store.
pub fn apply_unstored(events: &mut [Value], unstored: &[(u64, Event)], rights: &ChangeRights) {
    let authors = authors(events, unstored);
    let mut deleted = HashSet::new();
    for (seq, event) in unstored {
        let target = match &event.body {
            EventBody::Delete { target } | EventBody::Edit { target, .. } => *target,
            _ => continue,
        };
        let author = authors.get(&target).map(String::as_str).unwrap_or_default();
        if !rights.allow(unstored, *seq, event, author) {
            continue;
        }
        if matches!(event.body, EventBody::Delete { .. }) {
            deleted.insert(target);
        }
        let found = events
            .iter_mut()
            .filter_map(Value::as_object_mut)
            .find(|m| {
                m.get("seq").and_then(Value::as_u64) == Some(target)
                    && m.get("kind").and_then(Value::as_str) == Some("message")
            });
        let Some(message) = found else { continue };
        match &event.body {
            EventBody::Delete { .. } => {
                message.remove("text");
                message.remove("edited");
                message.remove("reactions");
                message.insert("deleted".into(), json!(true));
            }
            EventBody::Edit { text, .. } if !message.contains_key("deleted") => {
                message.insert("text".into(), json!(text));
                message.insert("edited".into(), json!(true));
            }
            _ => {}
        }
    }
    // A message the store already holds as deleted counts too: an edit of it that the store
    // does not hold yet shows no text either.
    deleted.extend(events.iter().filter_map(|e| {
        let deleted_message = e.get("kind").and_then(Value::as_str) == Some("message")
            && e.get("deleted") == Some(&json!(true));
        deleted_message
            .then(|| e.get("seq").and_then(Value::as_u64))
            .flatten()
    }));
    if deleted.is_empty() {
        return;
    }
    for map in events.iter_mut().filter_map(Value::as_object_mut) {
        let edit_of_deleted = map.get("kind").and_then(Value::as_str) == Some("edit")
            && map
                .get("target")
                .and_then(Value::as_u64)
                .is_some_and(|t| deleted.contains(&t));
        if edit_of_deleted {
            map.remove("text");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_and_edits_of_blocked_authors_keep_their_place_but_not_their_words() {
        let mut events = vec![
            json!({"seq": 5, "ts": 1, "user": "bob", "kind": "message", "id": "i5", "text": "secret",
                   "thread": 2, "reply_to": 3, "edited": true,
                   "reactions": [{"emoji": "👍", "count": 1, "users": ["alice"]}],
                   "replies": {"count": 1, "last": 6}}),
            json!({"seq": 4, "ts": 1, "user": "bob", "kind": "edit", "id": "i4", "target": 2, "text": "x"}),
            json!({"seq": 3, "ts": 1, "user": "carol", "kind": "message", "id": "i3", "text": "hi",
                   "thread": null, "reply_to": null}),
            json!({"seq": 2, "ts": 1, "user": "bob", "kind": "reaction", "id": "i2", "target": 3,
                   "emoji": "👍", "on": true}),
        ];
        let untouched = events.clone();
        hide_blocked_authors(&mut events, &HashSet::new());
        assert_eq!(events, untouched, "nothing blocked: nothing changes");

        let blocked: HashSet<UserId> = [UserId::parse("bob").unwrap()].into();
        hide_blocked_authors(&mut events, &blocked);
        assert_eq!(
            events[0],
            json!({"seq": 5, "ts": 1, "user": "bob", "kind": "message", "id": "i5", "hidden": true})
        );
        assert_eq!(
            events[1],
            json!({"seq": 4, "ts": 1, "user": "bob", "kind": "edit", "id": "i4", "target": 2, "hidden": true})
        );
        assert_eq!(events[2], untouched[2], "others' messages are shown");
        assert_eq!(
            events[3], untouched[3],
            "only messages and edits are hidden"
        );
    }

    /// An edit the store does not hold yet, of a message the store already holds as deleted
    /// (the delete was stored first): the page shows it without text, as the store will.
    #[test]
    fn an_unstored_edit_of_a_message_deleted_in_the_store_shows_no_text() {
        let edit = Event {
            id: uuid::Uuid::new_v4(),
            user: UserId::parse("alice").unwrap(),
            ts: 1,
            body: EventBody::Edit {
                target: 9,
                text: "too late".into(),
            },
        };
        let mut events = vec![
            render_entry(11, &edit),
            json!({"seq": 10, "ts": 1, "user": "alice", "kind": "delete", "id": "i10", "target": 9}),
            json!({"seq": 9, "ts": 1, "user": "alice", "kind": "message", "id": "i9", "deleted": true}),
        ];
        let unstored = vec![(11, edit)];
        assert_eq!(events[0]["text"], "too late");
        apply_unstored(&mut events, &unstored, &ChangeRights::default());
        assert!(events[0].get("text").is_none(), "{}", events[0]);
        assert!(events[2].get("text").is_none());
    }

    fn logged(user: &str, body: EventBody) -> Event {
        Event {
            id: uuid::Uuid::new_v4(),
            user: UserId::parse(user).unwrap(),
            ts: 1,
            body,
        }
    }

    fn group(creator: &str, members: &[&str]) -> RoomState {
        let created = logged(
            creator,
            EventBody::RoomCreated {
                room_kind: RoomKind::Group,
                name: "g".into(),
                members: members.iter().map(|m| UserId::parse(*m).unwrap()).collect(),
            },
        );
        RoomState::created(1, &created).expect("a group room")
    }

    fn message(seq: u64, user: &str) -> Value {
        json!({"seq": seq, "ts": 1, "user": user, "kind": "message", "id": format!("i{seq}"),
               "text": "words", "thread": null, "reply_to": null})
    }

    /// The projector stores only the author's edits, and the author's or the present admin's
    /// deletes: a page shows no other change of the events it does not hold yet.
    #[test]
    fn unstored_edits_and_deletes_count_only_when_the_projector_would_keep_them() {
        let state = group("alice", &["bob", "carol"]);
        let rights = ChangeRights::of(&state);
        let edit = |user: &str, target| {
            logged(
                user,
                EventBody::Edit {
                    target,
                    text: format!("by {user}"),
                },
            )
        };
        let delete = |user: &str, target| logged(user, EventBody::Delete { target });

        let mut events = vec![message(3, "bob"), message(2, "carol")];
        let unstored = vec![
            (4, edit("carol", 3)),
            (5, delete("bob", 2)),
            (6, edit("carol", 2)),
        ];
        apply_unstored(&mut events, &unstored, &rights);
        assert_eq!(
            events[0]["text"], "words",
            "carol may not edit bob's message"
        );
        assert!(
            events[1].get("deleted").is_none(),
            "bob may not delete carol's"
        );
        assert_eq!(events[1]["text"], "by carol", "carol edits her own");

        let mut events = vec![message(3, "bob"), message(2, "carol")];
        let unstored = vec![(4, delete("alice", 3)), (5, delete("carol", 2))];
        apply_unstored(&mut events, &unstored, &rights);
        assert_eq!(
            events[0]["deleted"], true,
            "the admin deletes others' messages"
        );
        assert_eq!(events[1]["deleted"], true, "the author deletes her own");

        // The admin's membership at the delete decides, whatever it is at the head.
        let left = logged(
            "alice",
            EventBody::MemberLeft {
                member: UserId::parse("alice").unwrap(),
            },
        );
        let joined = logged(
            "bob",
            EventBody::MemberJoined {
                member: UserId::parse("alice").unwrap(),
            },
        );
        let mut events = vec![message(3, "bob")];
        let unstored = vec![
            (4, left.clone()),
            (5, delete("alice", 3)),
            (6, joined.clone()),
        ];
        apply_unstored(&mut events, &unstored, &rights);
        assert!(
            events[0].get("deleted").is_none(),
            "an admin who left has no power"
        );
        let mut gone = state.clone();
        gone.apply(4, &left);
        let mut events = vec![message(3, "bob")];
        let unstored = vec![(4, delete("alice", 3)), (5, left.clone())];
        apply_unstored(&mut events, &unstored, &ChangeRights::of(&gone));
        assert_eq!(
            events[0]["deleted"], true,
            "a member when she deleted, gone since"
        );
        let mut events = vec![message(3, "bob")];
        apply_unstored(
            &mut events,
            &[(5, delete("alice", 3))],
            &ChangeRights::of(&gone),
        );
        assert!(
            events[0].get("deleted").is_none(),
            "not a member then, nor now"
        );

        // A direct room has no admin.
        let direct = ChangeRights::default();
        let mut events = vec![message(3, "bob")];
        apply_unstored(&mut events, &[(4, delete("alice", 3))], &direct);
        assert!(events[0].get("deleted").is_none());
    }

    /// A page holding an edit but not its message: the author's delete still takes the edit's
    /// text (the edit tells the author), another's does not.
    #[test]
    fn an_unstored_delete_of_a_message_beyond_the_page_takes_its_edits_text_if_allowed() {
        let rights = ChangeRights::of(&group("alice", &["bob", "carol"]));
        let page = || {
            vec![
                json!({"seq": 9, "ts": 1, "user": "bob", "kind": "edit", "id": "i9", "target": 2,
                        "text": "again"}),
            ]
        };
        let mut events = page();
        let delete = logged("carol", EventBody::Delete { target: 2 });
        apply_unstored(&mut events, &[(10, delete)], &rights);
        assert_eq!(
            events[0]["text"], "again",
            "carol may not delete bob's message"
        );
        let mut events = page();
        let delete = logged("bob", EventBody::Delete { target: 2 });
        apply_unstored(&mut events, &[(10, delete)], &rights);
        assert!(events[0].get("text").is_none(), "{}", events[0]);
    }
}
