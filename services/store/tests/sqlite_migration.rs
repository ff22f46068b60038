//! Stores made by earlier versions keep working: opening one brings it to the current schema.

use chat_model::{Event, EventBody, RoomId, RoomKind, UserId};
use chat_store::{Entry, RoomBatch, SqliteStore, Store};
use rusqlite::Connection;
use uuid::Uuid;

fn event(body: EventBody) -> Event {
    Event {
        id: Uuid::new_v4(),
        user: UserId::parse("alice").unwrap(),
        ts: 1_763_900_000_000,
        body,
    }
}

/// A room's entries: `room_created`, then `n` messages and a reaction.
fn room_log(room: &str, n: u64) -> RoomBatch {
    let mut entries = vec![Entry {
        seq: 1,
        event: Ok(event(EventBody::RoomCreated {
            name: room.into(),
            room_kind: RoomKind::Group,
            members: vec![],
        })),
    }];
    for seq in 2..=n + 1 {
        entries.push(Entry {
            seq,
            event: Ok(event(EventBody::Message {
                text: format!("message {seq}"),
                thread: None,
                reply_to: None,
            })),
        });
    }
    entries.push(Entry {
        seq: n + 2,
        event: Ok(event(EventBody::Reaction {
            target: 2,
            emoji: "👍".into(),
            on: true,
        })),
    });
    RoomBatch {
        room: RoomId::parse(room).unwrap(),
        entries,
    }
}

/// Every entry's (room, id, seq, ts).
fn ids_of(batches: &[RoomBatch]) -> Vec<(RoomId, Uuid, u64, i64)> {
    batches
        .iter()
        .flat_map(|b| {
            b.entries.iter().map(|e| {
                let event = e.event.as_ref().unwrap();
                (b.room.clone(), event.id, e.seq, event.ts)
            })
        })
        .collect()
}

async fn assert_ids_found(store: &SqliteStore, ids: &[(RoomId, Uuid, u64, i64)]) {
    for (room, id, seq, ts) in ids {
        let hit = store.find_id(room, *id).await.unwrap();
        assert_eq!(hit.map(|h| (h.seq, h.ts)), Some((*seq, *ts)), "{room} {id}");
    }
}

fn has_old_index(path: &std::path::Path) -> bool {
    Connection::open(path)
        .unwrap()
        .query_row(
            "SELECT count(*) FROM sqlite_master WHERE name = 'events_by_id'",
            [],
            |r| r.get::<_, i64>(0),
        )
        .unwrap()
        > 0
}

/// Turns a current store into what the version with the index `events_by_id` left: every other
/// table is the same, the compact id index and the room keys did not exist.
fn make_old_layout(path: &std::path::Path) {
    Connection::open(path)
        .unwrap()
        .execute_batch(
            "DROP TABLE event_ids;
             DROP TABLE room_keys;
             CREATE INDEX events_by_id ON events (room, id);",
        )
        .unwrap();
}

#[tokio::test]
async fn a_store_with_the_old_id_index_is_migrated_on_open() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("store.db");
    let batches = [room_log("old-a", 300), room_log("old-b", 20)];
    let digest = {
        let store = SqliteStore::open(&path).unwrap();
        store.apply(&batches).await.unwrap();
        store.digest(None).await.unwrap()
    };
    make_old_layout(&path);
    assert!(has_old_index(&path));

    let store = SqliteStore::open(&path).unwrap();
    assert!(!has_old_index(&path), "the old index is dropped");
    assert_ids_found(&store, &ids_of(&batches)).await;
    assert_eq!(
        store
            .find_id(&batches[0].room, Uuid::new_v4())
            .await
            .unwrap(),
        None
    );
    assert_eq!(store.digest(None).await.unwrap(), digest, "no row changed");

    // New events after the migration are indexed as they are applied.
    let more = RoomBatch {
        room: batches[1].room.clone(),
        entries: room_log("old-b", 40).entries.split_off(22),
    };
    store.apply(std::slice::from_ref(&more)).await.unwrap();
    assert_ids_found(&store, &ids_of(&[more])).await;
    assert_ids_found(&store, &ids_of(&batches)).await;
}

#[tokio::test]
async fn events_an_older_version_wrote_after_the_migration_are_indexed_on_the_next_open() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("store.db");
    let first = room_log("back-a", 10);
    SqliteStore::open(&path)
        .unwrap()
        .apply(std::slice::from_ref(&first))
        .await
        .unwrap();
    // An older version opened the file: its schema creates the old index again, and its rows
    // (here: one more message, and a room of its own) have no entry in `event_ids`.
    let later = event(EventBody::Message {
        text: "written by the older version".into(),
        thread: None,
        reply_to: None,
    });
    let other = event(EventBody::Message {
        text: "in a room only the older version saw".into(),
        thread: None,
        reply_to: None,
    });
    {
        let conn = Connection::open(&path).unwrap();
        conn.execute_batch("CREATE INDEX events_by_id ON events (room, id);")
            .unwrap();
        let mut insert = conn
            .prepare(
                "INSERT INTO events (room, seq, id, user, ts, kind, text)
                 VALUES (?1, ?2, ?3, 'alice', ?4, 'message', 'x')",
            )
            .unwrap();
        for (room, seq, e) in [("back-a", 13, &later), ("back-b", 1, &other)] {
            let id = e.id.hyphenated().to_string();
            insert
                .execute(rusqlite::params![room, seq, id, e.ts])
                .unwrap();
        }
    }

    let store = SqliteStore::open(&path).unwrap();
    assert!(!has_old_index(&path));
    assert_ids_found(&store, &ids_of(&[first])).await;
    let back_a = RoomId::parse("back-a").unwrap();
    let back_b = RoomId::parse("back-b").unwrap();
    assert_ids_found(
        &store,
        &[
            (back_a, later.id, 13, later.ts),
            (back_b, other.id, 1, other.ts),
        ],
    )
    .await;
}

/// A room made by alice with bob, `n` messages by alice, and the delete of message seq 3.
fn room_with_reader(room: &str, n: u64) -> RoomBatch {
    let mut batch = room_log(room, n);
    if let Ok(Event {
        body: EventBody::RoomCreated { members, .. },
        ..
    }) = &mut batch.entries[0].event
    {
        members.push(UserId::parse("bob").unwrap());
    }
    let seq = batch.entries.len() as u64 + 1;
    batch.entries.push(Entry {
        seq,
        event: Ok(event(EventBody::Delete { target: 3 })),
    });
    batch
}

async fn bobs_unread(store: &SqliteStore) -> Vec<(String, u64)> {
    store
        .rooms_of(&UserId::parse("bob").unwrap(), &Default::default())
        .await
        .unwrap()
        .into_iter()
        .map(|r| (r.room.to_string(), r.unread))
        .collect()
}

fn null_numbers(path: &std::path::Path) -> i64 {
    Connection::open(path)
        .unwrap()
        .query_row("SELECT count(*) FROM events WHERE mnum IS NULL", [], |r| {
            r.get(0)
        })
        .unwrap()
}

#[tokio::test]
async fn a_store_without_message_numbers_is_numbered_on_open() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("store.db");
    let batches = [room_with_reader("num-a", 50), room_with_reader("num-b", 7)];
    let digest = {
        let store = SqliteStore::open(&path).unwrap();
        store.apply(&batches).await.unwrap();
        assert_eq!(
            bobs_unread(&store).await,
            [("num-a".into(), 49), ("num-b".into(), 6)]
        );
        store.digest(None).await.unwrap()
    };
    Connection::open(&path)
        .unwrap()
        .execute_batch("ALTER TABLE events DROP COLUMN mnum;")
        .unwrap();

    let store = SqliteStore::open(&path).unwrap();
    assert_eq!(null_numbers(&path), 0);
    assert_eq!(
        store.digest(None).await.unwrap(),
        digest,
        "numbered as when written"
    );
    assert_eq!(
        bobs_unread(&store).await,
        [("num-a".into(), 49), ("num-b".into(), 6)]
    );
}

#[tokio::test]
async fn messages_an_older_version_wrote_are_counted_and_numbered_when_the_room_is_next_written() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("store.db");
    let first = room_with_reader("old-num", 5);
    let store = SqliteStore::open(&path).unwrap();
    store.apply(std::slice::from_ref(&first)).await.unwrap();
    assert_eq!(bobs_unread(&store).await, [("old-num".into(), 4)]);
    // An older version (which knows no `mnum`) stored two more messages.
    let next = first.entries.len() as i64 + 1;
    {
        let conn = Connection::open(&path).unwrap();
        for seq in [next, next + 1] {
            conn.execute(
                "INSERT INTO events (room, seq, id, user, ts, kind, text)
                 VALUES ('old-num', ?1, ?2, 'alice', 0, 'message', 'x')",
                rusqlite::params![seq, Uuid::new_v4().to_string()],
            )
            .unwrap();
        }
        conn.execute(
            "UPDATE checkpoints SET seq = ?1 WHERE room = 'old-num'",
            [next + 1],
        )
        .unwrap();
    }
    assert_eq!(null_numbers(&path), 2);
    assert_eq!(bobs_unread(&store).await, [("old-num".into(), 6)]);

    // This version writes the room again: its rows are numbered, the count stays right.
    store
        .apply(&[RoomBatch {
            room: first.room.clone(),
            entries: vec![Entry {
                seq: next as u64 + 2,
                event: Ok(event(EventBody::Message {
                    text: "new".into(),
                    thread: None,
                    reply_to: None,
                })),
            }],
        }])
        .await
        .unwrap();
    assert_eq!(null_numbers(&path), 0);
    assert_eq!(bobs_unread(&store).await, [("old-num".into(), 7)]);
}
