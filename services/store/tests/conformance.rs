//! The store conformance suite: every backend must pass it.
//!
//! Each test runs against SQLite (a fresh file), and against ScyllaDB as well when `SCYLLA_URI`
//! is set (`scylla://host:port`; each run gets a keyspace of its own). The backends a test ran
//! on are printed, so a run's log says plainly whether ScyllaDB was exercised.

use std::collections::HashSet;
use std::sync::Arc;

use chat_model::{Event, EventBody, RoomId, RoomKind, RoomState, UserId};
use chat_store::{Entry, PageQuery, ProjectorStatus, RoomBatch, SqliteStore, Store};
use serde_json::{json, Value};
use uuid::Uuid;

struct Backend {
    store: Arc<dyn Store>,
    /// Keeps the SQLite file alive for the test.
    _dir: Option<tempfile::TempDir>,
}

async fn backends() -> Vec<Backend> {
    let dir = tempfile::tempdir().unwrap();
    let sqlite = SqliteStore::open(&dir.path().join("store.db")).unwrap();
    let mut out = vec![Backend {
        store: Arc::new(sqlite),
        _dir: Some(dir),
    }];
    out.extend(scylla_backend().await);
    for b in &out {
        eprintln!("conformance backend: {}", b.store.backend());
    }
    out
}

/// ScyllaDB when `SCYLLA_URI` (`scylla://host:port`) is set, in a keyspace of its own.
async fn scylla_backend() -> Option<Backend> {
    let uri = std::env::var("SCYLLA_URI").ok()?;
    let keyspace = format!("chat_test_{}", Uuid::new_v4().simple());
    // `SCYLLA_USER` and `SCYLLA_PASSWORD` for a cluster with `PasswordAuthenticator`.
    let login = std::env::var("SCYLLA_USER")
        .ok()
        .map(|user| chat_store::ScyllaLogin {
            user,
            password: std::env::var("SCYLLA_PASSWORD").unwrap_or_default(),
        });
    let store = chat_store::ScyllaStore::connect_fresh(&uri, &keyspace, login.as_ref())
        .await
        .unwrap_or_else(|e| panic!("SCYLLA_URI={uri}: {e}"));
    Some(Backend {
        store: Arc::new(store),
        _dir: None,
    })
}

fn room(s: &str) -> RoomId {
    RoomId::parse(s).unwrap()
}

fn user(s: &str) -> UserId {
    UserId::parse(s).unwrap()
}

/// An empty block list.
fn none() -> HashSet<UserId> {
    HashSet::new()
}

fn ev(by: &str, body: EventBody) -> Event {
    Event {
        id: Uuid::new_v4(),
        user: user(by),
        ts: 1_763_900_000_000,
        body,
    }
}

fn created(by: &str, members: &[&str]) -> Event {
    ev(
        by,
        EventBody::RoomCreated {
            name: "General".into(),
            room_kind: RoomKind::Group,
            members: members.iter().map(|m| user(m)).collect(),
        },
    )
}

fn msg(by: &str, text: &str) -> Event {
    ev(
        by,
        EventBody::Message {
            text: text.into(),
            thread: None,
            reply_to: None,
        },
    )
}

fn reply(by: &str, text: &str, root: u64) -> Event {
    ev(
        by,
        EventBody::Message {
            text: text.into(),
            thread: Some(root),
            reply_to: None,
        },
    )
}

/// Builds a room's log: events get sequences 1, 2, … (after `from`).
struct Log {
    room: RoomId,
    entries: Vec<Entry>,
}

impl Log {
    fn new(name: &str, events: Vec<Event>) -> Log {
        let mut log = Log {
            room: room(name),
            entries: Vec::new(),
        };
        for e in events {
            log.push(e);
        }
        log
    }

    fn push(&mut self, e: Event) -> u64 {
        let seq = self.entries.len() as u64 + 1;
        self.entries.push(Entry { seq, event: Ok(e) });
        seq
    }

    fn batch(&self) -> RoomBatch {
        RoomBatch {
            room: self.room.clone(),
            entries: self.entries.clone(),
        }
    }

    fn batch_from(&self, from: u64) -> RoomBatch {
        RoomBatch {
            room: self.room.clone(),
            entries: self.entries[(from as usize - 1)..].to_vec(),
        }
    }
}

async fn page(store: &dyn Store, room: &RoomId, before: Option<u64>, limit: usize) -> Vec<Value> {
    store
        .history(room, PageQuery { before, limit })
        .await
        .unwrap()
        .events
}

fn seqs(events: &[Value]) -> Vec<u64> {
    events.iter().map(|e| e["seq"].as_u64().unwrap()).collect()
}

#[tokio::test]
async fn applying_twice_or_in_pieces_changes_nothing() {
    for b in backends().await {
        let s = &*b.store;
        let mut log = Log::new("r1", vec![created("alice", &["bob"])]);
        for i in 0..20 {
            log.push(msg(
                if i % 2 == 0 { "alice" } else { "bob" },
                &format!("m{i}"),
            ));
        }
        log.push(ev("bob", EventBody::Delete { target: 21 }));
        log.push(msg("bob", "after the delete"));
        s.apply(&[log.batch()]).await.unwrap();
        let once = s.digest(None).await.unwrap();
        let unread = || async {
            let mut out = Vec::new();
            for u in ["alice", "bob"] {
                let r = &s.rooms_of(&user(u), &none()).await.unwrap()[0];
                out.push((r.head, r.last_read, r.unread));
            }
            out
        };
        let unread_once = unread().await;
        assert_eq!(unread_once, [(23, 20, 1), (23, 23, 0)], "{}", s.backend());
        s.apply(&[log.batch()]).await.unwrap();
        s.apply(&[log.batch_from(10)]).await.unwrap();
        assert_eq!(s.digest(None).await.unwrap(), once, "{}", s.backend());
        assert_eq!(unread().await, unread_once);
        assert_eq!(s.checkpoint(&log.room).await.unwrap(), 23);
        assert_eq!(s.checkpoint(&room("nowhere")).await.unwrap(), 0);

        // The same log applied in pieces into a cleared room ends identical.
        s.clear_room(&log.room).await.unwrap();
        assert_eq!(s.checkpoint(&log.room).await.unwrap(), 0);
        for chunk in log.entries.chunks(3) {
            s.apply(&[RoomBatch {
                room: log.room.clone(),
                entries: chunk.to_vec(),
            }])
            .await
            .unwrap();
        }
        assert_eq!(s.digest(None).await.unwrap(), once, "{}", s.backend());
        assert_eq!(unread().await, unread_once, "{}", s.backend());
    }
}

#[tokio::test]
async fn history_pages_newest_first_with_before_limit_and_more() {
    for b in backends().await {
        let s = &*b.store;
        let mut log = Log::new("hist", vec![created("alice", &[])]);
        for i in 0..250 {
            log.push(msg("alice", &format!("m{i}")));
        }
        s.apply(&[log.batch()]).await.unwrap();
        let r = &log.room;

        let first = s.history(r, PageQuery::newest(50)).await.unwrap();
        assert_eq!(seqs(&first.events), (202..=251).rev().collect::<Vec<_>>());
        assert!(first.more);
        assert_eq!(first.events[0]["text"], "m249");
        assert_eq!(first.events[0]["kind"], "message");

        let clamped = s.history(r, PageQuery::newest(1000)).await.unwrap();
        assert_eq!(clamped.events.len(), 200, "limit is clamped to 200");

        let last = s
            .history(
                r,
                PageQuery {
                    before: Some(3),
                    limit: 50,
                },
            )
            .await
            .unwrap();
        assert_eq!(seqs(&last.events), vec![2, 1]);
        assert!(!last.more);
        assert_eq!(last.events[1]["kind"], "room_created");
        assert_eq!(last.events[1]["members"], json!([]));

        // Walking the pages visits every event once.
        let mut seen = Vec::new();
        let mut before = None;
        loop {
            let p = s.history(r, PageQuery { before, limit: 37 }).await.unwrap();
            seen.extend(seqs(&p.events));
            before = seen.last().copied();
            if !p.more {
                break;
            }
        }
        assert_eq!(seen, (1..=251).rev().collect::<Vec<_>>());
    }
}

#[tokio::test]
async fn edits_and_deletes_as_the_contract_shows_them() {
    for b in backends().await {
        let s = &*b.store;
        let mut log = Log::new("ed", vec![created("alice", &["bob", "carol"])]);
        let m_bob = log.push(msg("bob", "hello"));
        let m_carol = log.push(msg("carol", "secret"));
        let edit = log.push(ev(
            "bob",
            EventBody::Edit {
                target: m_bob,
                text: "hello!".into(),
            },
        ));
        // Not the author: no effect on the message.
        log.push(ev(
            "carol",
            EventBody::Edit {
                target: m_bob,
                text: "hijacked".into(),
            },
        ));
        log.push(ev(
            "carol",
            EventBody::Edit {
                target: m_carol,
                text: "secret, edited".into(),
            },
        ));
        // bob is neither author nor admin: no effect; alice is the admin.
        log.push(ev("bob", EventBody::Delete { target: m_carol }));
        let m_kept = log.push(msg("carol", "kept"));
        log.push(ev("bob", EventBody::Delete { target: m_kept }));
        log.push(ev("alice", EventBody::Delete { target: m_carol }));
        // An edit after the delete: ignored, and its event shows no text either.
        let late = log.push(ev(
            "carol",
            EventBody::Edit {
                target: m_carol,
                text: "resurrected?".into(),
            },
        ));
        s.apply(&[log.batch()]).await.unwrap();

        let events = page(s, &log.room, None, 50).await;
        let by_seq = |seq: u64| events.iter().find(|e| e["seq"] == seq).unwrap().clone();
        let bob = by_seq(m_bob);
        assert_eq!(bob["text"], "hello!");
        assert_eq!(bob["edited"], true);
        let carol = by_seq(m_carol);
        assert_eq!(carol["deleted"], true, "{carol}");
        assert!(carol.get("text").is_none(), "a tombstone has no text");
        assert_eq!(by_seq(m_kept)["text"], "kept");
        assert!(by_seq(m_kept).get("deleted").is_none());
        // The edit event itself is in the history, with its text while the message lives …
        assert_eq!(by_seq(edit)["kind"], "edit");
        assert_eq!(by_seq(edit)["text"], "hello!");
        // … and without it once the message is deleted.
        let carol_edit = by_seq(m_carol + 3);
        assert_eq!(carol_edit["kind"], "edit");
        assert!(carol_edit.get("text").is_none(), "{carol_edit}");
        assert!(by_seq(late).get("text").is_none(), "{}", by_seq(late));
        assert_eq!(by_seq(m_carol)["deleted"], true);
        // What the edge asks before accepting another edit, delete or reaction.
        assert!(s.is_deleted(&log.room, m_carol).await.unwrap());
        assert!(
            !s.is_deleted(&log.room, m_kept).await.unwrap(),
            "bob's delete had no effect"
        );
        assert!(
            !s.is_deleted(&log.room, late).await.unwrap(),
            "not a message"
        );
        assert!(!s.is_deleted(&log.room, 9_999).await.unwrap(), "not held");
    }
}

/// Only a group room has an admin, and only while a member: in a direct room whoever opened it
/// deletes only their own messages, and a group's creator who left deletes nothing of others.
#[tokio::test]
async fn a_direct_rooms_opener_and_an_admin_who_left_delete_only_their_own() {
    for b in backends().await {
        let s = &*b.store;
        let mut direct = Log::new(
            "dm",
            vec![ev(
                "alice",
                EventBody::RoomCreated {
                    name: "dm".into(),
                    room_kind: RoomKind::Direct,
                    members: vec![user("bob")],
                },
            )],
        );
        let by_bob = direct.push(msg("bob", "mine"));
        let by_alice = direct.push(msg("alice", "hers"));
        direct.push(ev("alice", EventBody::Delete { target: by_bob }));
        direct.push(ev("alice", EventBody::Delete { target: by_alice }));

        let mut group = Log::new("left", vec![created("alice", &["bob"])]);
        let early = group.push(msg("bob", "early"));
        group.push(ev("alice", EventBody::Delete { target: early }));
        let late = group.push(msg("bob", "late"));
        group.push(ev(
            "alice",
            EventBody::MemberLeft {
                member: user("alice"),
            },
        ));
        group.push(ev("alice", EventBody::Delete { target: late }));
        s.apply(&[direct.batch(), group.batch()]).await.unwrap();

        assert!(
            !s.is_deleted(&direct.room, by_bob).await.unwrap(),
            "the opener of a direct room is no admin"
        );
        assert!(s.is_deleted(&direct.room, by_alice).await.unwrap());
        assert!(
            s.is_deleted(&group.room, early).await.unwrap(),
            "the admin, while a member"
        );
        assert!(
            !s.is_deleted(&group.room, late).await.unwrap(),
            "an admin who left has no power left"
        );
    }
}

#[tokio::test]
async fn reactions_aggregate_per_emoji_with_who_reacted() {
    for b in backends().await {
        let s = &*b.store;
        let mut log = Log::new("re", vec![created("alice", &["bob", "carol"])]);
        let m = log.push(msg("alice", "vote"));
        let react = |by: &str, emoji: &str, on: bool| {
            ev(
                by,
                EventBody::Reaction {
                    target: m,
                    emoji: emoji.into(),
                    on,
                },
            )
        };
        log.push(react("bob", "👍", true));
        log.push(react("carol", "👍", true));
        log.push(react("carol", "🎉", true));
        log.push(react("bob", "👍", true)); // again: still one
        log.push(react("carol", "🎉", false));
        log.push(react("alice", "🎉", false)); // clearing what was never set
        s.apply(&[log.batch()]).await.unwrap();
        let events = page(s, &log.room, Some(m + 1), 1).await;
        assert_eq!(
            events[0]["reactions"],
            json!([{"emoji": "👍", "count": 2, "users": ["bob", "carol"]}])
        );
    }
}

#[tokio::test]
async fn threads_count_replies_on_the_root_and_page_on_their_own() {
    for b in backends().await {
        let s = &*b.store;
        let mut log = Log::new("th", vec![created("alice", &["bob"])]);
        let root = log.push(msg("alice", "root"));
        let r1 = log.push(reply("bob", "r1", root));
        log.push(msg("alice", "not in the thread"));
        let r2 = log.push(reply("alice", "r2", root));
        let r3 = log.push(reply("bob", "r3", root));
        log.push(ev("bob", EventBody::Delete { target: r3 }));
        s.apply(&[log.batch()]).await.unwrap();

        let events = page(s, &log.room, Some(root + 1), 1).await;
        assert_eq!(events[0]["replies"], json!({"count": 2, "last": r2}));

        let t = s
            .thread(&log.room, root, PageQuery::newest(50))
            .await
            .unwrap();
        assert_eq!(t.root.unwrap()["text"], "root");
        assert_eq!(seqs(&t.replies.events), vec![r3, r2, r1]);
        assert_eq!(t.replies.events[0]["deleted"], true);
        assert_eq!(t.replies.events[2]["thread"], root);
        let t = s
            .thread(
                &log.room,
                root,
                PageQuery {
                    before: Some(r3),
                    limit: 1,
                },
            )
            .await
            .unwrap();
        assert_eq!(seqs(&t.replies.events), vec![r2]);
        assert!(t.replies.more);
        let none = s
            .thread(&log.room, 999, PageQuery::newest(10))
            .await
            .unwrap();
        assert!(none.root.is_none() && none.replies.events.is_empty());
        // A reply roots no thread (threads are one level deep), deleted or not.
        for reply in [r1, r3] {
            let t = s
                .thread(&log.room, reply, PageQuery::newest(10))
                .await
                .unwrap();
            assert!(t.root.is_none(), "the thread of reply {reply}: {t:?}");
        }
    }
}

#[tokio::test]
async fn cursors_only_move_forward_and_unread_counts_follow_the_contract() {
    for b in backends().await {
        let s = &*b.store;
        let mut log = Log::new("cu", vec![created("alice", &["bob"])]);
        let a1 = log.push(msg("alice", "1"));
        log.push(msg("alice", "2"));
        let a3 = log.push(msg("alice", "3"));
        log.push(msg("bob", "mine")); // bob's own message moves his cursor to it
        let a5 = log.push(msg("alice", "5"));
        log.push(msg("alice", "6"));
        log.push(ev("alice", EventBody::Delete { target: a5 })); // deleted: not unread
        log.push(ev("bob", EventBody::Read { up_to: a1 })); // backwards: ignored
        s.apply(&[log.batch()]).await.unwrap();

        let rooms = s.rooms_of(&user("bob"), &none()).await.unwrap();
        assert_eq!(rooms.len(), 1);
        let r = &rooms[0];
        assert_eq!((r.head, r.last_read, r.unread), (9, 5, 1), "{r:?}");
        assert_eq!((r.kind, r.name.as_str()), (RoomKind::Group, "General"));
        let alice = &s.rooms_of(&user("alice"), &none()).await.unwrap()[0];
        assert_eq!((alice.last_read, alice.unread), (7, 0), "{alice:?}");

        let mut more = Log {
            room: log.room.clone(),
            entries: Vec::new(),
        };
        more.entries = log.entries.clone();
        more.push(ev("bob", EventBody::Read { up_to: a3 }));
        more.push(msg("carol-not-member", "x"));
        s.apply(&[more.batch()]).await.unwrap();
        let r = &s.rooms_of(&user("bob"), &none()).await.unwrap()[0];
        assert_eq!((r.last_read, r.unread), (5, 2), "still 5: 3 is behind it");
    }
}

#[tokio::test]
async fn delivered_cursors_only_move_forward_and_receipts_count_members_other_than_the_author() {
    for b in backends().await {
        let s = &*b.store;
        let mut log = Log::new("rcpt", vec![created("alice", &["bob", "carol", "dave"])]);
        let m1 = log.push(msg("alice", "1"));
        let m2 = log.push(msg("alice", "2"));
        let m3 = log.push(msg("alice", "3"));
        // One coalesced event for two users; then bob reads m1 (reading implies delivery, but
        // his delivered cursor is already further), then a stale batch that would move both back.
        log.push(ev(
            "bob",
            EventBody::Delivered {
                cursors: vec![(user("bob"), m3), (user("carol"), m2)],
            },
        ));
        log.push(ev("bob", EventBody::Read { up_to: m1 }));
        log.push(ev(
            "carol",
            EventBody::Delivered {
                cursors: vec![(user("carol"), m1), (user("bob"), m1)],
            },
        ));
        // A cursor above the event's own seq is capped at it.
        log.push(ev(
            "dave",
            EventBody::Delivered {
                cursors: vec![(user("dave"), 999)],
            },
        ));
        s.apply(&[log.batch()]).await.unwrap();

        let cursors = s.member_cursors(&log.room).await.unwrap();
        let by_user = |u: &str| {
            cursors
                .iter()
                .find(|c| c.user.as_str() == u)
                .map(|c| (c.read, c.delivered))
                .unwrap()
        };
        assert_eq!(cursors.len(), 4, "{cursors:?}");
        assert_eq!(by_user("alice"), (m3, m3), "own messages read and deliver");
        assert_eq!(by_user("bob"), (m1, m3));
        assert_eq!(by_user("carol"), (1, m2), "never moved back");
        assert_eq!(by_user("dave"), (1, 8), "capped at the event's own seq");
        // One user's stored read cursor alone, without the join point (the caller has that).
        for (u, expected) in [("bob", m1), ("alice", m3)] {
            // alice's by her own messages.
            assert_eq!(
                s.read_cursor(&log.room, &user(u)).await.unwrap(),
                expected,
                "{u}"
            );
        }
        // carol never read: nothing past her joining (a store may hold the join point itself).
        assert!(s.read_cursor(&log.room, &user("carol")).await.unwrap() < m1);
        assert_eq!(
            s.read_cursor(&room("nowhere"), &user("bob")).await.unwrap(),
            0
        );

        // What a delivered cursor's move crosses: the last message in (after, up_to].
        let last = |after, up_to| s.last_message_in(&log.room, after, up_to);
        assert_eq!(last(0, 8).await.unwrap(), Some(m3));
        assert_eq!(last(0, m2).await.unwrap(), Some(m2));
        assert_eq!(last(m1, m2).await.unwrap(), Some(m2));
        assert_eq!(last(m3, 8).await.unwrap(), None, "only receipts after m3");
        assert_eq!(last(m2, m2).await.unwrap(), None);
        assert_eq!(
            last(0, 1).await.unwrap(),
            None,
            "room_created is no message"
        );
        assert_eq!(last(0, 99).await.unwrap(), Some(m3));

        let index = chat_store::ReceiptIndex::new(&cursors);
        let r = |seq| {
            let r = index.receipts(seq, "alice");
            (r.delivered, r.read, r.members)
        };
        assert_eq!(r(m1), (3, 1, 3));
        assert_eq!(r(m2), (3, 0, 3));
        assert_eq!(r(m3), (2, 0, 3));

        // A read further than any delivered cursor raises it; a member who left is not counted.
        let mut more = Log {
            room: log.room.clone(),
            entries: log.entries.clone(),
        };
        more.push(ev("carol", EventBody::Read { up_to: m3 }));
        more.push(ev(
            "dave",
            EventBody::MemberLeft {
                member: user("dave"),
            },
        ));
        s.apply(&[more.batch()]).await.unwrap();
        let cursors = s.member_cursors(&log.room).await.unwrap();
        assert_eq!(
            cursors.iter().map(|c| c.user.as_str()).collect::<Vec<_>>(),
            vec!["alice", "bob", "carol"]
        );
        let carol = cursors.iter().find(|c| c.user.as_str() == "carol").unwrap();
        assert_eq!((carol.read, carol.delivered), (m3, m3));
        let r = chat_store::ReceiptIndex::new(&cursors).receipts(m3, "alice");
        assert_eq!((r.delivered, r.read, r.members), (2, 1, 2));

        // The cursors are part of the digest, and a rebuild lands the same rows.
        let live = s.digest(Some(&log.room)).await.unwrap();
        s.clear_room(&log.room).await.unwrap();
        assert!(s.member_cursors(&log.room).await.unwrap().is_empty());
        s.apply(&[more.batch()]).await.unwrap();
        assert_eq!(s.digest(Some(&log.room)).await.unwrap(), live);
        assert!(s.member_cursors(&room("nowhere")).await.unwrap().is_empty());
    }
}

#[tokio::test]
async fn rooms_of_a_user_follow_membership() {
    for b in backends().await {
        let s = &*b.store;
        let mut a = Log::new("a-room", vec![created("alice", &["bob"])]);
        let b_log = Log::new("b-room", vec![created("carol", &[])]);
        a.push(msg("alice", "hi"));
        a.push(ev(
            "alice",
            EventBody::MemberJoined {
                member: user("dave"),
            },
        ));
        a.push(msg("alice", "after dave joined"));
        a.push(ev(
            "bob",
            EventBody::MemberLeft {
                member: user("bob"),
            },
        ));
        s.apply(&[a.batch(), b_log.batch()]).await.unwrap();

        let names = |rs: Vec<chat_store::RoomSummary>| {
            rs.into_iter()
                .map(|r| r.room.to_string())
                .collect::<Vec<_>>()
        };
        assert_eq!(
            names(s.rooms_of(&user("alice"), &none()).await.unwrap()),
            ["a-room"]
        );
        assert!(s.rooms_of(&user("bob"), &none()).await.unwrap().is_empty());
        assert_eq!(
            names(s.rooms_of(&user("carol"), &none()).await.unwrap()),
            ["b-room"]
        );
        let dave = &s.rooms_of(&user("dave"), &none()).await.unwrap()[0];
        assert_eq!(
            (dave.last_read, dave.unread),
            (3, 1),
            "a member's cursor starts at their joining"
        );

        // The store's room state is the fold of the log.
        let mut folded = None::<RoomState>;
        for e in &a.entries {
            let event = e.event.as_ref().unwrap();
            match &mut folded {
                None => folded = RoomState::created(e.seq, event),
                Some(state) => state.apply(e.seq, event),
            }
        }
        assert_eq!(s.room_state(&a.room).await.unwrap(), folded);
        assert_eq!(s.room_state(&room("nowhere")).await.unwrap(), None);
    }
}

#[tokio::test]
async fn unread_counts_leave_out_the_authors_a_reader_blocks() {
    for b in backends().await {
        let s = &*b.store;
        let mut log = Log::new("bl", vec![created("alice", &["bob", "carol"])]);
        log.push(msg("alice", "1"));
        log.push(msg("carol", "2"));
        let c3 = log.push(msg("carol", "3"));
        log.push(msg("alice", "4"));
        log.push(ev("carol", EventBody::Delete { target: c3 }));
        s.apply(&[log.batch()]).await.unwrap();

        let bob = |blocked: &[&str]| {
            let blocked: HashSet<UserId> = blocked.iter().map(|u| user(u)).collect();
            async move { s.rooms_of(&user("bob"), &blocked).await.unwrap()[0].clone() }
        };
        assert_eq!(bob(&[]).await.unread, 3, "{}", s.backend());
        assert_eq!(
            bob(&["carol"]).await.unread,
            2,
            "carol's messages are not counted"
        );
        assert_eq!(bob(&["carol", "alice"]).await.unread, 0);
        assert_eq!(
            bob(&["dave"]).await.unread,
            3,
            "blocking a stranger changes nothing"
        );
        // The head and cursor are the same whoever is blocked.
        let (plain, blocking) = (bob(&[]).await, bob(&["carol"]).await);
        assert_eq!(
            (plain.head, plain.last_read),
            (blocking.head, blocking.last_read)
        );
    }
}

#[tokio::test]
async fn read_only_is_materialized_from_the_admins_room_updated_only() {
    for b in backends().await {
        let s = &*b.store;
        let mut log = Log::new("ro", vec![created("alice", &["bob"])]);
        log.push(msg("bob", "before"));
        // bob is not the admin: his room_updated is in the history but changes nothing.
        log.push(ev("bob", EventBody::RoomUpdated { read_only: true }));
        s.apply(&[log.batch()]).await.unwrap();
        assert!(!s.room_state(&log.room).await.unwrap().unwrap().read_only);
        assert!(!s.rooms_of(&user("bob"), &none()).await.unwrap()[0].read_only);

        let on = log.push(ev("alice", EventBody::RoomUpdated { read_only: true }));
        s.apply(&[log.batch()]).await.unwrap();
        let fold = |entries: &[Entry]| {
            let mut state = None::<RoomState>;
            for e in entries {
                let event = e.event.as_ref().unwrap();
                match &mut state {
                    None => state = RoomState::created(e.seq, event),
                    Some(st) => st.apply(e.seq, event),
                }
            }
            state
        };
        let stored = s.room_state(&log.room).await.unwrap();
        assert!(stored.as_ref().unwrap().read_only, "{}", s.backend());
        assert_eq!(stored, fold(&log.entries), "the store's state is the fold");
        for who in ["alice", "bob"] {
            let r = &s.rooms_of(&user(who), &none()).await.unwrap()[0];
            assert!(r.read_only, "{who}");
        }
        let events = page(s, &log.room, None, 10).await;
        assert_eq!(
            (
                &events[0]["seq"],
                &events[0]["kind"],
                &events[0]["read_only"]
            ),
            (&json!(on), &json!("room_updated"), &json!(true))
        );
        assert_eq!(events[0]["user"], "alice");

        // Turned off again; the latest wins, and a replay or a rebuild ends in the same rows.
        log.push(ev("alice", EventBody::RoomUpdated { read_only: false }));
        s.apply(&[log.batch()]).await.unwrap();
        assert!(!s.room_state(&log.room).await.unwrap().unwrap().read_only);
        let digest = s.digest(Some(&log.room)).await.unwrap();
        s.apply(&[log.batch()]).await.unwrap();
        assert_eq!(s.digest(Some(&log.room)).await.unwrap(), digest);
        s.clear_room(&log.room).await.unwrap();
        assert_eq!(s.room_state(&log.room).await.unwrap(), None);
        for chunk in log.entries.chunks(2) {
            s.apply(&[RoomBatch {
                room: log.room.clone(),
                entries: chunk.to_vec(),
            }])
            .await
            .unwrap();
        }
        assert_eq!(
            s.digest(Some(&log.room)).await.unwrap(),
            digest,
            "{}",
            s.backend()
        );
        assert_eq!(s.room_state(&log.room).await.unwrap(), fold(&log.entries));
    }
}

#[tokio::test]
async fn client_ids_find_their_event_and_dead_letters_are_kept() {
    for b in backends().await {
        let s = &*b.store;
        let mut log = Log::new("ids", vec![created("alice", &[])]);
        let m = msg("alice", "x");
        let id = m.id;
        let seq = log.push(m);
        log.entries.push(Entry {
            seq: 3,
            event: Err("unknown event kind \"poll\"".into()),
        });
        log.push(msg("alice", "after the bad one"));
        s.apply(&[log.batch()]).await.unwrap();

        let hit = s.find_id(&log.room, id).await.unwrap().unwrap();
        assert_eq!((hit.seq, hit.ts), (seq, 1_763_900_000_000));
        assert_eq!(s.find_id(&log.room, Uuid::new_v4()).await.unwrap(), None);
        assert_eq!(
            s.find_id(&room("other"), id).await.unwrap(),
            None,
            "ids are per room"
        );

        let dead = s.dead_letters().await.unwrap();
        assert_eq!(dead.len(), 1);
        assert_eq!((dead[0].room.as_str(), dead[0].seq), ("ids", 3));
        assert!(dead[0].error.contains("poll"));
        assert_eq!(
            s.checkpoint(&log.room).await.unwrap(),
            4,
            "the room moves past it"
        );
        let events = page(s, &log.room, None, 10).await;
        assert_eq!(seqs(&events), vec![4, 2, 1]);
    }
}

/// An id with the given first 8 bytes and last 8 bytes.
fn id_of(head: u64, tail: u64) -> Uuid {
    Uuid::from_u64_pair(head, tail)
}

#[tokio::test]
async fn ids_sharing_a_prefix_or_used_in_two_rooms_find_only_their_own_event() {
    for b in backends().await {
        let s = &*b.store;
        let mut x = Log::new("ids-x", vec![created("alice", &[])]);
        let mut y = Log::new("ids-y", vec![created("alice", &[])]);
        let with_id = |id: Uuid, text: &str| Event {
            id,
            ..msg("alice", text)
        };
        // Three ids that agree in their first 8 bytes (as time-ordered ids do), one of them in
        // both rooms at the same seq.
        let shared = id_of(0xfeed_0000_0000_0001, 1);
        let (a, c) = (
            id_of(0xfeed_0000_0000_0001, 2),
            id_of(0xfeed_0000_0000_0001, 3),
        );
        let in_x = [x.push(with_id(shared, "x1")), x.push(with_id(a, "x2"))];
        let in_y = [y.push(with_id(shared, "y1")), y.push(with_id(c, "y2"))];
        s.apply(&[x.batch(), y.batch()]).await.unwrap();

        let seq = |hit: Option<chat_store::IdHit>| hit.map(|h| h.seq);
        assert_eq!(
            seq(s.find_id(&x.room, shared).await.unwrap()),
            Some(in_x[0])
        );
        assert_eq!(seq(s.find_id(&x.room, a).await.unwrap()), Some(in_x[1]));
        assert_eq!(
            s.find_id(&x.room, c).await.unwrap(),
            None,
            "same first bytes as ids of x, but only y holds it"
        );
        assert_eq!(
            seq(s.find_id(&y.room, shared).await.unwrap()),
            Some(in_y[0])
        );
        assert_eq!(seq(s.find_id(&y.room, c).await.unwrap()), Some(in_y[1]));
        assert_eq!(s.find_id(&y.room, a).await.unwrap(), None);

        // Clearing one room leaves the other's ids; re-applying it finds them again.
        s.clear_room(&x.room).await.unwrap();
        assert_eq!(s.find_id(&x.room, shared).await.unwrap(), None);
        assert_eq!(
            seq(s.find_id(&y.room, shared).await.unwrap()),
            Some(in_y[0])
        );
        assert_eq!(seq(s.find_id(&y.room, c).await.unwrap()), Some(in_y[1]));
        s.apply(&[x.batch()]).await.unwrap();
        assert_eq!(seq(s.find_id(&x.room, a).await.unwrap()), Some(in_x[1]));
    }
}

#[tokio::test]
async fn digests_tell_rooms_and_contents_apart() {
    for b in backends().await {
        let s = &*b.store;
        let x = Log::new("x", vec![created("alice", &[]), msg("alice", "a")]);
        let y = Log::new("y", vec![created("alice", &[]), msg("alice", "b")]);
        let empty = s.digest(None).await.unwrap();
        s.apply(&[x.batch()]).await.unwrap();
        let only_x = s.digest(None).await.unwrap();
        let x_digest = s.digest(Some(&x.room)).await.unwrap();
        s.apply(&[y.batch()]).await.unwrap();
        assert_ne!(empty, only_x);
        assert_ne!(s.digest(None).await.unwrap(), only_x);
        assert_eq!(
            s.digest(Some(&x.room)).await.unwrap(),
            x_digest,
            "another room does not change x's digest"
        );
        assert_ne!(s.digest(Some(&y.room)).await.unwrap(), x_digest);
        assert_eq!(
            s.checkpoints().await.unwrap(),
            vec![(x.room.clone(), 2), (y.room.clone(), 2)]
        );
    }
}

#[tokio::test]
async fn projector_reports_are_kept_per_partition() {
    for b in backends().await {
        let s = &*b.store;
        assert!(s.projectors().await.unwrap().is_empty());
        for (partition, lag_ms) in [("0/2", 5), ("1/2", 7), ("0/2", 9)] {
            s.report_projector(&ProjectorStatus {
                partition: partition.into(),
                lag_ms,
                reported_at_ms: 1000 + lag_ms as i64,
            })
            .await
            .unwrap();
        }
        let lags: Vec<_> = s
            .projectors()
            .await
            .unwrap()
            .into_iter()
            .map(|p| (p.partition, p.lag_ms, p.reported_at_ms))
            .collect();
        assert_eq!(lags, vec![("0/2".into(), 9, 1009), ("1/2".into(), 7, 1007)]);
    }
}

#[tokio::test]
async fn fifty_thousand_messages_paginate_without_gap_or_duplicate() {
    for b in backends().await {
        let s = &*b.store;
        let mut log = Log::new("big", vec![created("alice", &[])]);
        for i in 0..50_000 {
            log.push(msg("alice", &format!("message {i}")));
        }
        for chunk in log.entries.chunks(5_000) {
            s.apply(&[RoomBatch {
                room: log.room.clone(),
                entries: chunk.to_vec(),
            }])
            .await
            .unwrap();
        }
        let mut expected = 50_001u64;
        let mut before = None;
        let mut pages = 0;
        loop {
            let p = s
                .history(&log.room, PageQuery { before, limit: 200 })
                .await
                .unwrap();
            pages += 1;
            for e in &p.events {
                assert_eq!(e["seq"].as_u64(), Some(expected), "page {pages}");
                expected -= 1;
            }
            before = p.events.last().map(|e| e["seq"].as_u64().unwrap());
            if !p.more {
                break;
            }
        }
        assert_eq!(expected, 0, "every event seen once");
        assert_eq!(pages, 251);
    }
}

/// Unread counts, worked out by a backend however it likes, equal a plain count of the contract's
/// definition over random rooms: messages and thread replies by several users, deletes by authors,
/// by the admin and by others (ignored), reads, reactions and joins, applied in batches of random
/// sizes, checked after every batch for every user and several block lists.
#[tokio::test]
async fn unread_counts_equal_a_plain_count_over_random_rooms() {
    use rand::{Rng, SeedableRng};
    const USERS: [&str; 4] = ["alice", "bob", "carol", "dave"];
    for b in backends().await {
        let s = &*b.store;
        for trial in 0..12u64 {
            let mut rng = rand::rngs::StdRng::seed_from_u64(trial);
            let name = format!("unread-{trial}");
            // alice creates the room (its admin) with bob and carol; dave joins later.
            let mut log = Log::new(&name, vec![created("alice", &["bob", "carol"])]);
            let mut messages: Vec<(u64, &str)> = Vec::new();
            let mut deleted: HashSet<u64> = HashSet::new();
            let mut applied = 0u64;
            for step in 0..160 {
                let by = USERS[rng.random_range(0..USERS.len())];
                let roll = rng.random_range(0..100);
                if step == 40 {
                    log.push(ev(
                        "alice",
                        EventBody::MemberJoined {
                            member: user("dave"),
                        },
                    ));
                } else if roll < 55 || messages.is_empty() {
                    let seq = if roll % 5 == 0 && !messages.is_empty() {
                        let root = messages[rng.random_range(0..messages.len())].0;
                        log.push(reply(by, "r", root))
                    } else {
                        log.push(msg(by, "m"))
                    };
                    messages.push((seq, by));
                } else if roll < 70 {
                    let (target, author) = messages[rng.random_range(0..messages.len())];
                    if by == author || by == "alice" {
                        deleted.insert(target);
                    }
                    log.push(ev(by, EventBody::Delete { target }));
                } else if roll < 85 {
                    let up_to = rng.random_range(1..=log.entries.len() as u64 + 3);
                    log.push(ev(by, EventBody::Read { up_to }));
                } else {
                    let (target, _) = messages[rng.random_range(0..messages.len())];
                    log.push(ev(
                        by,
                        EventBody::Reaction {
                            target,
                            emoji: "👍".into(),
                            on: true,
                        },
                    ));
                }
                let end = log.entries.len() as u64;
                if rng.random_range(0..10) == 0 || step == 159 {
                    s.apply(&[RoomBatch {
                        room: log.room.clone(),
                        entries: log.entries[applied as usize..].to_vec(),
                    }])
                    .await
                    .unwrap();
                    applied = end;
                    for reader in USERS {
                        for blocked in [&[][..], &["bob"], &["carol", "dave"]] {
                            let blocked: HashSet<UserId> =
                                blocked.iter().map(|u| user(u)).collect();
                            let rooms = s.rooms_of(&user(reader), &blocked).await.unwrap();
                            let Some(r) = rooms.iter().find(|r| r.room == log.room) else {
                                assert!(reader == "dave" && step < 40, "{reader} lost the room");
                                continue;
                            };
                            let expected = messages
                                .iter()
                                .filter(|(seq, author)| {
                                    *seq <= applied
                                        && *seq > r.last_read
                                        && *author != reader
                                        && !deleted.contains(seq)
                                        && !blocked.contains(&user(author))
                                })
                                .count() as u64;
                            assert_eq!(
                                r.unread,
                                expected,
                                "{}: trial {trial} step {step}, {reader} blocking {blocked:?}, {r:?}",
                                s.backend()
                            );
                        }
                    }
                }
            }
        }
    }
}
