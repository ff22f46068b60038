//! A room as its log defines it: who is in it, who created it, and what each may do.
//!
//! [`RoomState`] is a fold over the room's events (pure, no I/O). The decisions below turn a
//! request into the event to append, or a [`Refusal`], by the client contract's rules; the
//! caller appends the event and folds it in. Membership and settings therefore always come from
//! the log.
//!
//! Roles: the room's creator is its admin (while a member). The admin removes members, deletes
//! any message, and makes the room read-only; while it is, only the admin posts (send, edit,
//! react). Everyone may still read, leave, mark read, invite (membership is not posting) and
//! delete their own messages (retracting is never taken away).

use std::collections::BTreeMap;

use sha2::{Digest, Sha256};

use crate::event::{Event, EventBody, RoomKind};
use crate::ids::{RoomId, UserId};

/// Why a request is refused; maps onto the contract's error codes.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// `forbidden`
    #[error("{0}")]
    Forbidden(&'static str),
    /// `bad_request`
    #[error("{0}")]
    BadRequest(&'static str),
    /// `conflict`
    #[error("{0}")]
    Conflict(&'static str),
    /// `too_large`
    #[error("{0}")]
    TooLarge(&'static str),
}

/// The state of one room, folded from its log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RoomState {
    pub kind: RoomKind,
    pub name: String,
    /// Who created the room: its admin.
    pub creator: UserId,
    /// Current members, with the sequence at which each (last) joined: their read cursor
    /// starts there.
    pub members: BTreeMap<UserId, u64>,
    /// The last sequence folded in.
    pub head: u64,
    /// Set by the admin (`room_updated`): only the admin posts while it is.
    pub read_only: bool,
    /// A direct room's two users, whether or not they are in it now: the only users it may
    /// ever hold. `None` for a group room (or a direct room created with other than one other
    /// member, which no rule here writes).
    pub pair: Option<[UserId; 2]>,
}

impl RoomState {
    /// The state after the room's first event, which must be `room_created`.
    pub fn created(seq: u64, event: &Event) -> Option<RoomState> {
        let EventBody::RoomCreated {
            name,
            room_kind,
            members,
        } = &event.body
        else {
            return None;
        };
        let mut all: BTreeMap<UserId, u64> = members.iter().map(|m| (m.clone(), seq)).collect();
        all.insert(event.user.clone(), seq);
        let pair = match (room_kind, members.as_slice()) {
            (RoomKind::Direct, [other]) if *other != event.user => {
                Some([event.user.clone(), other.clone()])
            }
            _ => None,
        };
        Some(RoomState {
            kind: *room_kind,
            name: name.clone(),
            creator: event.user.clone(),
            members: all,
            head: seq,
            read_only: false,
            pair,
        })
    }

    /// Folds in the event at `seq`. Events at or below `head` are ignored, so replaying a range
    /// twice changes nothing.
    pub fn apply(&mut self, seq: u64, event: &Event) {
        if seq <= self.head {
            return;
        }
        self.head = seq;
        match &event.body {
            EventBody::MemberJoined { member } => {
                self.members.entry(member.clone()).or_insert(seq);
            }
            EventBody::MemberLeft { member } => {
                self.members.remove(member);
            }
            // Only what the rules allow takes effect (as the store applies it), so a log written
            // by a faulty writer still folds to a state the rules could have produced.
            EventBody::RoomUpdated { read_only } if self.may_administer(&event.user) => {
                self.read_only = *read_only;
            }
            _ => {}
        }
    }

    /// Whether an event with this body can change the state (beyond its head).
    pub fn changed_by(body: &EventBody) -> bool {
        matches!(
            body,
            EventBody::RoomCreated { .. }
                | EventBody::MemberJoined { .. }
                | EventBody::MemberLeft { .. }
                | EventBody::RoomUpdated { .. }
        )
    }

    pub fn is_member(&self, user: &UserId) -> bool {
        self.members.contains_key(user)
    }

    pub fn is_admin(&self, user: &UserId) -> bool {
        &self.creator == user
    }

    /// The admin acts as admin only while a member: an admin who left has no power left.
    fn may_administer(&self, user: &UserId) -> bool {
        self.is_admin(user) && self.is_member(user)
    }

    /// The other user of a direct room's pair, whether or not they are in it now: a block
    /// between the two holds while one of them has left (they may be brought back).
    pub fn direct_peer(&self, actor: &UserId) -> Option<&UserId> {
        if self.kind != RoomKind::Direct {
            return None;
        }
        match &self.pair {
            Some(pair) => pair.iter().find(|m| *m != actor),
            None => self.members.keys().find(|m| *m != actor),
        }
    }

    /// Posting (send, react; edits also check authorship): members only, and only the admin
    /// while the room is read-only.
    pub fn decide_post(&self, actor: &UserId) -> Result<(), Refusal> {
        if !self.is_member(actor) {
            return Err(Refusal::Forbidden("not a member of this room"));
        }
        if self.read_only && !self.may_administer(actor) {
            return Err(Refusal::Forbidden(
                "the room is read-only: only its admin may post",
            ));
        }
        Ok(())
    }

    /// The admin changes the room's settings; direct rooms have none to change.
    pub fn decide_update(&self, actor: &UserId, read_only: bool) -> Result<EventBody, Refusal> {
        if !self.may_administer(actor) {
            return Err(Refusal::Forbidden(
                "only the room's admin may change its settings",
            ));
        }
        if self.kind == RoomKind::Direct {
            return Err(Refusal::BadRequest(
                "direct rooms have no settings to change",
            ));
        }
        Ok(EventBody::RoomUpdated { read_only })
    }

    /// The state as a store that keeps left members holds it: `ever` is every user who was a
    /// member, with the seq they (last) joined at and whether they still are. A direct room's
    /// pair is known from them.
    pub fn stored(
        kind: RoomKind,
        name: String,
        creator: UserId,
        ever: Vec<(UserId, u64, bool)>,
        head: u64,
        read_only: bool,
    ) -> RoomState {
        let pair = RoomState::pair_of(kind, &creator, ever.iter().map(|(user, ..)| user));
        let members = ever
            .into_iter()
            .filter(|(.., active)| *active)
            .map(|(user, seq, _)| (user, seq))
            .collect();
        RoomState {
            kind,
            name,
            creator,
            members,
            head,
            read_only,
            pair,
        }
    }

    /// The pair of a direct room whose creator is `creator` and whose users, past and present,
    /// are `ever` (as a store that keeps left members knows them): `None` unless that is
    /// exactly the creator and one other.
    pub fn pair_of<'a>(
        kind: RoomKind,
        creator: &UserId,
        ever: impl IntoIterator<Item = &'a UserId>,
    ) -> Option<[UserId; 2]> {
        if kind != RoomKind::Direct {
            return None;
        }
        let mut others = ever.into_iter().filter(|u| *u != creator);
        match (others.next(), others.next()) {
            (Some(other), None) => Some([creator.clone(), other.clone()]),
            _ => None,
        }
    }

    /// Whether `user` is one of a direct room's pair.
    pub fn in_pair(&self, user: &UserId) -> bool {
        self.pair.as_ref().is_some_and(|pair| pair.contains(user))
    }

    /// Any member of a group room may add a user. A direct room holds its pair and no one else:
    /// either of the two may bring back the one who left (opening the room again does), and
    /// the one who left may come back.
    pub fn decide_invite(&self, actor: &UserId, user: &UserId) -> Result<EventBody, Refusal> {
        if self.kind == RoomKind::Direct {
            if !self.in_pair(user) {
                return Err(Refusal::BadRequest("direct rooms cannot get more members"));
            }
            if !self.in_pair(actor) {
                return Err(Refusal::Forbidden("only members may add users to a room"));
            }
        } else if !self.is_member(actor) {
            return Err(Refusal::Forbidden("only members may add users to a room"));
        }
        if self.is_member(user) {
            return Err(Refusal::Conflict("already a member"));
        }
        Ok(EventBody::MemberJoined {
            member: user.clone(),
        })
    }

    /// A member may leave; the admin of a group room may remove anyone. A direct room has no
    /// admin: whoever opened it first may not remove the other.
    pub fn decide_remove(&self, actor: &UserId, user: &UserId) -> Result<EventBody, Refusal> {
        if actor != user && self.kind == RoomKind::Direct {
            return Err(Refusal::Forbidden(
                "in a direct room each user may only leave it themself",
            ));
        }
        if actor != user && !(self.is_admin(actor) && self.is_member(actor)) {
            return Err(Refusal::Forbidden(
                "only the room's admin may remove other members",
            ));
        }
        if !self.is_member(user) {
            return Err(Refusal::Conflict("not a member"));
        }
        Ok(EventBody::MemberLeft {
            member: user.clone(),
        })
    }

    /// Only the author edits a message (and only while a member who may post).
    pub fn decide_edit(&self, actor: &UserId, author: &UserId) -> Result<(), Refusal> {
        self.decide_post(actor)?;
        if actor != author {
            return Err(Refusal::Forbidden("only the author may edit a message"));
        }
        Ok(())
    }

    /// The author or the admin of a group room deletes a message (in a read-only room too:
    /// retracting one's own words is never taken away). A direct room has no admin: whoever
    /// opened it deletes only their own messages.
    pub fn decide_delete(&self, actor: &UserId, author: &UserId) -> Result<(), Refusal> {
        if !self.is_member(actor) {
            return Err(Refusal::Forbidden("not a member of this room"));
        }
        if actor != author && !(self.kind == RoomKind::Group && self.may_administer(actor)) {
            return Err(Refusal::Forbidden(
                "only the author or the group room's admin may delete a message",
            ));
        }
        Ok(())
    }
}

/// Who of a direct room's pair blocks whom, as the block lists say at the time of a request.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PairBlocks {
    /// The requesting user blocks the other one.
    pub actor_blocks_peer: bool,
    /// The other user blocks the requesting one.
    pub peer_blocks_actor: bool,
}

/// Opening a direct room, or posting in one (send, edit, react), while either of the pair
/// blocks the other is refused, for both of them: a blocked user cannot reach the blocker, and
/// the blocker cannot write to someone who cannot answer (they unblock first). Reading the
/// room's history, leaving it and deleting one's own messages stay possible.
pub fn decide_direct_contact(blocks: PairBlocks) -> Result<(), Refusal> {
    if blocks.peer_blocks_actor {
        return Err(Refusal::Forbidden("you cannot contact this user"));
    }
    if blocks.actor_blocks_peer {
        return Err(Refusal::Forbidden(
            "you block this user; unblock them to write to them",
        ));
    }
    Ok(())
}

/// The id of the direct room of two users: the same whoever asks, `dm-` and a digest of the
/// sorted pair (user ids may hold characters a room id may not).
pub fn direct_room_id(a: &UserId, b: &UserId) -> RoomId {
    let (first, second) = if a <= b { (a, b) } else { (b, a) };
    let mut hasher = Sha256::new();
    hasher.update(first.as_str().as_bytes());
    hasher.update([0u8]);
    hasher.update(second.as_str().as_bytes());
    let digest = hasher.finalize();
    RoomId::parse(format!(
        "{}{}",
        RoomId::DIRECT_PREFIX,
        hex::encode(&digest[..20])
    ))
    .unwrap_or_else(|_| unreachable!("dm- and 40 hex digits form a valid room id"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn user(s: &str) -> UserId {
        UserId::parse(s).unwrap()
    }

    fn event(by: &str, body: EventBody) -> Event {
        Event {
            id: uuid::Uuid::new_v4(),
            user: user(by),
            ts: 0,
            body,
        }
    }

    /// given: these events (seq 1, 2, …)
    fn given(events: Vec<Event>) -> RoomState {
        let mut events = events.into_iter();
        let mut state = RoomState::created(1, &events.next().unwrap()).unwrap();
        for (i, e) in events.enumerate() {
            state.apply(i as u64 + 2, &e);
        }
        state
    }

    fn group(creator: &str, members: &[&str]) -> Event {
        event(
            creator,
            EventBody::RoomCreated {
                name: "General".into(),
                room_kind: RoomKind::Group,
                members: members.iter().map(|m| user(m)).collect(),
            },
        )
    }

    #[test]
    fn membership_is_the_fold_of_the_log() {
        let state = given(vec![
            group("alice", &["bob"]),
            event(
                "alice",
                EventBody::Message {
                    text: "hi".into(),
                    thread: None,
                    reply_to: None,
                },
            ),
            event(
                "bob",
                EventBody::MemberJoined {
                    member: user("carol"),
                },
            ),
            event(
                "bob",
                EventBody::MemberLeft {
                    member: user("bob"),
                },
            ),
        ]);
        assert_eq!(state.creator, user("alice"));
        assert_eq!(
            state.members,
            BTreeMap::from([(user("alice"), 1), (user("carol"), 3)])
        );
        assert_eq!(state.head, 4);
    }

    #[test]
    fn folding_is_idempotent_for_replayed_ranges() {
        let mut state = given(vec![
            group("alice", &[]),
            event(
                "alice",
                EventBody::MemberJoined {
                    member: user("bob"),
                },
            ),
        ]);
        let before = state.clone();
        state.apply(
            2,
            &event(
                "alice",
                EventBody::MemberLeft {
                    member: user("bob"),
                },
            ),
        );
        assert_eq!(
            state, before,
            "an event at or below head is not folded again"
        );
    }

    #[test]
    fn a_rejoining_member_starts_reading_at_the_rejoin() {
        let state = given(vec![
            group("alice", &["bob"]),
            event(
                "bob",
                EventBody::MemberLeft {
                    member: user("bob"),
                },
            ),
            event(
                "alice",
                EventBody::MemberJoined {
                    member: user("bob"),
                },
            ),
        ]);
        assert_eq!(state.members.get(&user("bob")), Some(&3));
    }

    #[test]
    fn invitations_follow_the_contract() {
        let state = given(vec![group("alice", &["bob"])]);
        assert_eq!(
            state.decide_invite(&user("bob"), &user("carol")),
            Ok(EventBody::MemberJoined {
                member: user("carol")
            }),
            "any member of a group room"
        );
        assert!(matches!(
            state.decide_invite(&user("mallory"), &user("carol")),
            Err(Refusal::Forbidden(_))
        ));
        assert!(matches!(
            state.decide_invite(&user("alice"), &user("bob")),
            Err(Refusal::Conflict(_))
        ));
        let dm = given(vec![event(
            "alice",
            EventBody::RoomCreated {
                name: String::new(),
                room_kind: RoomKind::Direct,
                members: vec![user("bob")],
            },
        )]);
        assert!(matches!(
            dm.decide_invite(&user("alice"), &user("carol")),
            Err(Refusal::BadRequest(_))
        ));
    }

    #[test]
    fn removal_is_by_self_or_the_admin() {
        let state = given(vec![group("alice", &["bob", "carol"])]);
        assert!(
            state.decide_remove(&user("bob"), &user("bob")).is_ok(),
            "leave"
        );
        assert!(
            state.decide_remove(&user("alice"), &user("bob")).is_ok(),
            "admin removes"
        );
        assert!(matches!(
            state.decide_remove(&user("bob"), &user("carol")),
            Err(Refusal::Forbidden(_))
        ));
        assert!(matches!(
            state.decide_remove(&user("alice"), &user("dave")),
            Err(Refusal::Conflict(_))
        ));
        // An admin who left has no power left in the room.
        let left = given(vec![
            group("alice", &["bob"]),
            event(
                "alice",
                EventBody::MemberLeft {
                    member: user("alice"),
                },
            ),
        ]);
        assert!(matches!(
            left.decide_remove(&user("alice"), &user("bob")),
            Err(Refusal::Forbidden(_))
        ));
    }

    #[test]
    fn edits_by_the_author_deletes_by_the_author_or_admin() {
        let state = given(vec![group("alice", &["bob", "carol"])]);
        assert!(state.decide_edit(&user("bob"), &user("bob")).is_ok());
        assert!(
            state.decide_edit(&user("alice"), &user("bob")).is_err(),
            "not even the admin edits"
        );
        assert!(state.decide_delete(&user("bob"), &user("bob")).is_ok());
        assert!(
            state.decide_delete(&user("alice"), &user("bob")).is_ok(),
            "admin deletes any"
        );
        assert!(state.decide_delete(&user("carol"), &user("bob")).is_err());
        assert!(
            state
                .decide_edit(&user("mallory"), &user("mallory"))
                .is_err(),
            "non-members"
        );
        let direct = given(vec![event(
            "alice",
            EventBody::RoomCreated {
                name: "dm".into(),
                room_kind: RoomKind::Direct,
                members: vec![user("bob")],
            },
        )]);
        assert!(
            direct.decide_delete(&user("alice"), &user("bob")).is_err(),
            "a direct room has no admin"
        );
        assert!(direct.decide_delete(&user("alice"), &user("alice")).is_ok());
    }

    fn read_only(by: &str, on: bool) -> Event {
        event(by, EventBody::RoomUpdated { read_only: on })
    }

    fn send(by: &str) -> Event {
        event(
            by,
            EventBody::Message {
                text: "hi".into(),
                thread: None,
                reply_to: None,
            },
        )
    }

    #[test]
    fn read_only_is_folded_from_the_admins_room_updated_only() {
        let state = given(vec![group("alice", &["bob"]), read_only("alice", true)]);
        assert!(state.read_only);
        // A non-admin's room_updated (a faulty writer) changes nothing.
        let state = given(vec![
            group("alice", &["bob"]),
            read_only("alice", true),
            read_only("bob", false),
        ]);
        assert!(state.read_only, "bob is not the admin");
        // Nor does one by an admin who left.
        let state = given(vec![
            group("alice", &["bob"]),
            event(
                "alice",
                EventBody::MemberLeft {
                    member: user("alice"),
                },
            ),
            read_only("alice", true),
        ]);
        assert!(!state.read_only);
        let state = given(vec![
            group("alice", &["bob"]),
            read_only("alice", true),
            send("alice"),
            read_only("alice", false),
        ]);
        assert!(!state.read_only, "the admin turns it off again");
    }

    #[test]
    fn only_the_admin_changes_settings_and_direct_rooms_have_none() {
        let state = given(vec![group("alice", &["bob"])]);
        assert_eq!(
            state.decide_update(&user("alice"), true),
            Ok(EventBody::RoomUpdated { read_only: true })
        );
        assert!(matches!(
            state.decide_update(&user("bob"), true),
            Err(Refusal::Forbidden(_))
        ));
        assert!(matches!(
            state.decide_update(&user("mallory"), true),
            Err(Refusal::Forbidden(_))
        ));
        let dm = given(vec![event(
            "alice",
            EventBody::RoomCreated {
                name: String::new(),
                room_kind: RoomKind::Direct,
                members: vec![user("bob")],
            },
        )]);
        assert!(matches!(
            dm.decide_update(&user("alice"), true),
            Err(Refusal::BadRequest(_))
        ));
    }

    #[test]
    fn a_read_only_room_takes_posts_from_its_admin_only() {
        let state = given(vec![
            group("alice", &["bob"]),
            send("bob"),
            read_only("alice", true),
        ]);
        assert!(state.decide_post(&user("alice")).is_ok(), "admin sends");
        assert!(matches!(
            state.decide_post(&user("bob")),
            Err(Refusal::Forbidden(m)) if m.contains("read-only")
        ));
        assert!(state.decide_edit(&user("bob"), &user("bob")).is_err());
        assert!(state.decide_edit(&user("alice"), &user("alice")).is_ok());
        // Retracting one's own message and the admin's moderation still work.
        assert!(state.decide_delete(&user("bob"), &user("bob")).is_ok());
        assert!(state.decide_delete(&user("alice"), &user("bob")).is_ok());
        assert!(state.decide_remove(&user("bob"), &user("bob")).is_ok());
        assert!(state.decide_remove(&user("alice"), &user("bob")).is_ok());
        assert!(matches!(
            state.decide_post(&user("mallory")),
            Err(Refusal::Forbidden(m)) if m.contains("not a member")
        ));
    }

    #[test]
    fn a_direct_room_is_closed_while_either_blocks_the_other() {
        assert!(decide_direct_contact(PairBlocks::default()).is_ok());
        let blocked = decide_direct_contact(PairBlocks {
            actor_blocks_peer: false,
            peer_blocks_actor: true,
        });
        assert!(matches!(blocked, Err(Refusal::Forbidden(_))));
        let blocker = decide_direct_contact(PairBlocks {
            actor_blocks_peer: true,
            peer_blocks_actor: false,
        });
        assert!(matches!(blocker, Err(Refusal::Forbidden(m)) if m.contains("unblock")));
        let dm = given(vec![event(
            "alice",
            EventBody::RoomCreated {
                name: String::new(),
                room_kind: RoomKind::Direct,
                members: vec![user("bob")],
            },
        )]);
        assert_eq!(dm.direct_peer(&user("alice")), Some(&user("bob")));
        assert_eq!(dm.direct_peer(&user("bob")), Some(&user("alice")));
        let mut left = dm.clone();
        left.members.remove(&user("bob"));
        assert_eq!(
            left.direct_peer(&user("alice")),
            Some(&user("bob")),
            "the pair's other user, after they left too"
        );
        let group = given(vec![group("alice", &["bob"])]);
        assert_eq!(group.direct_peer(&user("alice")), None);
    }

    #[test]
    fn a_direct_room_holds_its_pair_only_and_either_may_bring_the_other_back() {
        let created = event(
            "alice",
            EventBody::RoomCreated {
                name: String::new(),
                room_kind: RoomKind::Direct,
                members: vec![user("bob")],
            },
        );
        let left = event(
            "bob",
            EventBody::MemberLeft {
                member: user("bob"),
            },
        );
        let dm = given(vec![created.clone(), left]);
        assert_eq!(dm.pair, Some([user("alice"), user("bob")]));
        assert_eq!(
            RoomState::pair_of(
                RoomKind::Direct,
                &user("alice"),
                [&user("bob"), &user("alice")]
            ),
            dm.pair,
            "a store knows the pair from everyone who was a member"
        );
        let back = Ok(EventBody::MemberJoined {
            member: user("bob"),
        });
        assert_eq!(dm.decide_invite(&user("alice"), &user("bob")), back);
        assert_eq!(dm.decide_invite(&user("bob"), &user("bob")), back);
        assert!(matches!(
            dm.decide_invite(&user("alice"), &user("carol")),
            Err(Refusal::BadRequest(_))
        ));
        assert!(matches!(
            dm.decide_invite(&user("carol"), &user("bob")),
            Err(Refusal::Forbidden(_))
        ));
        assert!(matches!(
            dm.decide_invite(&user("bob"), &user("alice")),
            Err(Refusal::Conflict(_))
        ));
        // No admin in a direct room.
        let full = given(vec![created]);
        assert!(matches!(
            full.decide_remove(&user("alice"), &user("bob")),
            Err(Refusal::Forbidden(_))
        ));
        assert!(full.decide_remove(&user("bob"), &user("bob")).is_ok());
    }

    #[test]
    fn direct_room_ids_are_the_same_whoever_asks_and_valid() {
        let (a, b) = (user("alice@example.com"), user("auth0|bob"));
        let id = direct_room_id(&a, &b);
        assert_eq!(id, direct_room_id(&b, &a));
        assert!(id.is_direct() && id.as_str().len() == 43, "{id}");
        assert_ne!(id, direct_room_id(&a, &user("carol")));
        // The pair is delimited: ("ab","c") and ("a","bc") are different pairs.
        assert_ne!(
            direct_room_id(&user("ab"), &user("c")),
            direct_room_id(&user("a"), &user("bc"))
        );
    }
}
