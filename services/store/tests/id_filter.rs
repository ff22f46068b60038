//! The SQLite store's id index kept in memory (`SqliteStore::filter_ids`): it never hides an id
//! the store holds, whether the id was written through it, was there when it was turned on, or
//! came after the filter had to grow.

use chat_model::{Event, EventBody, RoomId, UserId};
use chat_store::{Entry, IdHit, RoomBatch, SqliteStore, Store};
use uuid::Uuid;

fn message(seq: u64) -> Entry {
    Entry {
        seq,
        event: Ok(Event {
            id: Uuid::new_v4(),
            user: UserId::parse("alice").unwrap(),
            ts: 1_763_900_000_000 + seq as i64,
            body: EventBody::Message {
                text: format!("message {seq}"),
                thread: None,
                reply_to: None,
            },
        }),
    }
}

/// `n` messages of `room` from `from` on, in batches of 2,000 (as the projector writes).
async fn apply(store: &SqliteStore, room: &RoomId, from: u64, n: u64) -> Vec<(Uuid, u64, i64)> {
    let entries: Vec<Entry> = (from..from + n).map(message).collect();
    let ids = entries
        .iter()
        .map(|e| {
            let event = e.event.as_ref().unwrap();
            (event.id, e.seq, event.ts)
        })
        .collect();
    for chunk in entries.chunks(2_000) {
        store
            .apply(&[RoomBatch {
                room: room.clone(),
                entries: chunk.to_vec(),
            }])
            .await
            .unwrap();
    }
    ids
}

async fn assert_all_found(store: &SqliteStore, room: &RoomId, ids: &[(Uuid, u64, i64)]) {
    for &(id, seq, ts) in ids {
        assert_eq!(
            store.find_id(room, id).await.unwrap(),
            Some(IdHit { seq, ts }),
            "{room} {id} at {seq}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_filter_never_hides_an_id_the_store_holds() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("store.db");
    let (busy, quiet) = (
        RoomId::parse("busy").unwrap(),
        RoomId::parse("quiet").unwrap(),
    );
    // Written before the filter is on: found by its first scan.
    let before = {
        let store = SqliteStore::open(&path).unwrap();
        apply(&store, &quiet, 1, 500).await
    };
    let store = SqliteStore::open(&path).unwrap();
    store.filter_ids().unwrap();
    assert_all_found(&store, &quiet, &before).await;
    // Written through it, past what an empty filter is sized for (it grows on the way).
    let through = apply(&store, &busy, 1, 70_000).await;
    assert_all_found(&store, &busy, &through).await;
    assert_all_found(&store, &quiet, &before).await;
    // An id of one room is not another room's.
    for &(id, _, _) in before.iter().take(100) {
        assert_eq!(store.find_id(&busy, id).await.unwrap(), None);
    }
    for _ in 0..1_000 {
        assert_eq!(store.find_id(&busy, Uuid::new_v4()).await.unwrap(), None);
    }

    // Another process opening the file scans what is there.
    let reopened = SqliteStore::open(&path).unwrap();
    reopened.filter_ids().unwrap();
    assert_all_found(&reopened, &busy, &through).await;
    // A replay through the filtered store changes nothing it answers.
    apply(&store, &quiet, 1, 10).await;
    assert_all_found(&store, &quiet, &before).await;
}
