//! History while the store is behind the log, against a real nats-server: no projector runs
//! here, so every event of the page comes from the log, and the page must still read as the
//! projected one will.

use std::sync::Arc;
use std::time::Duration;

use chat_log::{LogConfig, RoomLog};
use chat_model::{RoomId, UserId};
use chat_rooms::{Command, RoomError, Rooms, RoomsConfig};
use chat_store::{PageQuery, SqliteStore};
use serde_json::{json, Value};
use uuid::Uuid;

fn user(s: &str) -> UserId {
    UserId::parse(s).unwrap()
}

/// A room service with no projector (the store stays behind the log, empty), and a group room
/// `name` of alice (its creator) and bob; the server and the store's directory live as long as
/// the caller holds them.
async fn behind(
    name: &str,
) -> (
    chat_harness::NatsServer,
    tempfile::TempDir,
    Arc<Rooms>,
    RoomId,
) {
    let server = chat_harness::NatsServer::start();
    let dir = tempfile::tempdir().unwrap();
    let log = RoomLog::connect(&server.url(), LogConfig::default())
        .await
        .unwrap();
    let store = SqliteStore::open(&dir.path().join("store.db")).unwrap();
    let rooms = Rooms::new(
        log,
        Arc::new(store),
        RoomsConfig {
            projection_wait: Duration::ZERO,
            ..RoomsConfig::default()
        },
    );
    let room = RoomId::parse(name).unwrap();
    rooms
        .create_group(&user("alice"), &room, name, vec![user("bob")], None)
        .await
        .unwrap();
    (server, dir, rooms, room)
}

/// Appends `command` as `by` (a new id); its sequence.
async fn append_as(rooms: &Rooms, by: &UserId, room: &RoomId, command: Command) -> u64 {
    rooms
        .append(by, room, Uuid::new_v4(), command)
        .await
        .unwrap()
        .seq
}

#[tokio::test]
async fn edits_deletes_and_receipts_apply_to_events_the_store_does_not_hold_yet() {
    let (_server, _dir, rooms, room) = behind("lagging").await;
    let alice = user("alice");
    let append = |command: Command| append_as(&rooms, &alice, &room, command);
    let send = |text: &str| Command::Send {
        text: text.into(),
        thread: None,
        reply_to: None,
    };
    let kept = append(send("first")).await; // 2
    let gone = append(send("secret")).await; // 3
    append(Command::Edit {
        target: kept,
        text: "first, edited".into(),
    })
    .await; // 4
    append(Command::Edit {
        target: gone,
        text: "secret, edited".into(),
    })
    .await; // 5
    append(Command::Delete { target: gone }).await; // 6

    for limit in [50, 3] {
        // The whole room, then a page holding only the newer half: the delete still applies
        // to what is in it.
        let page = rooms
            .history(&alice, &room, PageQuery::newest(limit))
            .await
            .unwrap();
        let by_seq = |seq: u64| -> &Value {
            page.events
                .iter()
                .find(|e| e["seq"] == json!(seq))
                .unwrap_or_else(|| panic!("no {seq} in {:?}", page.events))
        };
        let edit_of_gone = by_seq(5);
        assert_eq!(edit_of_gone["kind"], "edit");
        assert!(edit_of_gone.get("text").is_none(), "{edit_of_gone}");
        if limit == 3 {
            continue;
        }
        let message = by_seq(gone);
        assert_eq!(message["deleted"], true, "{message}");
        assert!(message.get("text").is_none(), "{message}");
        let message = by_seq(kept);
        assert_eq!(
            (&message["text"], &message["edited"]),
            (&json!("first, edited"), &json!(true)),
            "{message}"
        );
        // Receipts count bob, whom the store does not know yet.
        assert_eq!(
            message["receipts"],
            json!({"delivered": 0, "read": 0, "members": 1}),
            "{message}"
        );
    }
}

/// A thread while the store is behind the log (no projector here): its root and replies come
/// from the log, newest first and paged, with the root's reply count and the deletes and edits
/// the store does not hold yet, as the projected thread will show them.
#[tokio::test]
async fn a_thread_shows_the_root_and_replies_the_store_does_not_hold_yet() {
    let (_server, _dir, rooms, room) = behind("threads").await;
    let (alice, bob) = (user("alice"), user("bob"));
    let append = |command: Command| append_as(&rooms, &alice, &room, command);
    let message = |text: &str, thread: Option<u64>| Command::Send {
        text: text.into(),
        thread,
        reply_to: None,
    };
    let root = append(message("root", None)).await;
    let mut replies = Vec::new();
    for i in 0..3 {
        replies.push(append(message(&format!("r{i}"), Some(root))).await);
    }
    append(message("elsewhere", None)).await;
    append(Command::Delete { target: replies[1] }).await;
    append(Command::Edit {
        target: replies[2],
        text: "r2, edited".into(),
    })
    .await;

    let page = rooms
        .thread(&bob, &room, root, PageQuery::newest(50))
        .await
        .unwrap();
    let root_event = page.root.unwrap();
    assert_eq!(root_event["text"], "root");
    assert_eq!(
        root_event["replies"],
        json!({"count": 2, "last": replies[2]}),
        "the deleted reply is not counted"
    );
    let seqs: Vec<u64> = page
        .replies
        .events
        .iter()
        .map(|e| e["seq"].as_u64().unwrap())
        .collect();
    assert_eq!(seqs, [replies[2], replies[1], replies[0]]);
    assert_eq!(page.replies.events[0]["text"], "r2, edited");
    assert_eq!(page.replies.events[1]["deleted"], true);
    assert!(page.replies.events[1].get("text").is_none());
    assert!(!page.replies.more);

    let first = rooms
        .thread(
            &bob,
            &room,
            root,
            PageQuery {
                before: None,
                limit: 2,
            },
        )
        .await
        .unwrap();
    assert_eq!(first.replies.events.len(), 2);
    assert!(first.replies.more);
    let older = rooms
        .thread(
            &bob,
            &room,
            root,
            PageQuery {
                before: Some(replies[1]),
                limit: 2,
            },
        )
        .await
        .unwrap();
    let seqs: Vec<&Value> = older.replies.events.iter().map(|e| &e["seq"]).collect();
    assert_eq!(seqs, [&json!(replies[0])]);
    assert!(!older.replies.more);

    // A reply is no root, and a sequence the log does not hold is none either.
    for not_root in [replies[0], 999] {
        let refused = rooms
            .thread(&bob, &room, not_root, PageQuery::newest(50))
            .await;
        assert!(
            matches!(refused, Err(chat_rooms::RoomError::NotFound)),
            "{not_root}: {refused:?}"
        );
    }
}

/// More than 1,000 events behind (a projector down, or catching up a backlog), the page cannot
/// apply every edit and delete the store does not hold: history and threads answer
/// `unavailable` rather than show a message its author deleted, and answer again once a
/// projector has caught the store up.
#[tokio::test]
async fn a_store_far_behind_answers_unavailable_rather_than_show_deleted_text() {
    let (server, dir, rooms, room) = behind("far-behind").await;
    let alice = user("alice");
    let append = |command: Command| append_as(&rooms, &alice, &room, command);
    let send = |text: String, thread: Option<u64>| Command::Send {
        text,
        thread,
        reply_to: None,
    };
    let secret = append(send("secret".into(), None)).await; // 2
    for i in 0..1_000 {
        append(send(format!("m{i}"), Some(secret))).await; // 3..=1002
    }
    let last = append(send("last one".into(), None)).await;
    append(Command::Delete { target: secret }).await;

    let catching_up = |e: RoomError| match e {
        RoomError::Unavailable(m) => assert!(m.contains("catching up"), "{m}"),
        other => panic!("expected unavailable, got {other:?}"),
    };
    for query in [
        PageQuery::newest(50),
        PageQuery {
            before: Some(10),
            limit: 5,
        },
    ] {
        catching_up(rooms.history(&alice, &room, query).await.unwrap_err());
    }
    catching_up(
        rooms
            .thread(&alice, &room, secret, PageQuery::newest(10))
            .await
            .unwrap_err(),
    );

    // A projector catches the store up: the same pages answer, the secret deleted.
    let store = SqliteStore::open(&dir.path().join("store.db")).unwrap();
    let log = RoomLog::connect(&server.url(), LogConfig::default())
        .await
        .unwrap();
    let stop = tokio_util::sync::CancellationToken::new();
    let projector = tokio::spawn(chat_projector::run(
        log,
        Arc::new(store),
        chat_projector::ProjectorConfig::default(),
        Arc::new(chat_projector::ProjectorStats::default()),
        stop.clone(),
    ));
    let page = tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            match rooms.history(&alice, &room, PageQuery::newest(50)).await {
                Ok(page) => return page,
                Err(e) => catching_up(e),
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("history answers once the store caught up");
    assert_eq!(
        page.events[0]["seq"],
        json!(last + 1),
        "{:?}",
        page.events[0]
    );
    let old = rooms
        .history(
            &alice,
            &room,
            PageQuery {
                before: Some(3),
                limit: 5,
            },
        )
        .await
        .unwrap();
    let message = old
        .events
        .iter()
        .find(|e| e["seq"] == json!(secret))
        .unwrap_or_else(|| panic!("no {secret} in {:?}", old.events));
    assert_eq!(message["deleted"], true, "{message}");
    assert!(message.get("text").is_none(), "{message}");
    assert!(rooms
        .thread(&alice, &room, secret, PageQuery::newest(10))
        .await
        .is_ok());
    stop.cancel();
    projector.await.unwrap().unwrap();
}
