//! Cached membership through the room service, against a real nats-server: two services on one
//! NATS stand for two processes (edges), each with its own cache.

use std::sync::Arc;
use std::time::{Duration, Instant};

use chat_log::{LogConfig, RoomLog};
use chat_model::{RoomId, UserId};
use chat_rooms::{Command, RoomError, Rooms, RoomsConfig};
use chat_store::SqliteStore;
use futures::StreamExt;
use uuid::Uuid;

fn user(s: &str) -> UserId {
    UserId::parse(s).unwrap()
}

async fn service(url: &str, dir: &tempfile::TempDir, name: &str) -> Arc<Rooms> {
    let log = RoomLog::connect(url, LogConfig::default()).await.unwrap();
    let store = SqliteStore::open(&dir.path().join(format!("{name}.db"))).unwrap();
    // No projector runs here: changes answer without waiting for one.
    let config = RoomsConfig {
        projection_wait: Duration::ZERO,
        ..RoomsConfig::default()
    };
    Rooms::new(log, Arc::new(store), config)
}

fn send(text: &str) -> Command {
    Command::Send {
        text: text.into(),
        thread: None,
        reply_to: None,
    }
}

/// A process's own appends keep its cached membership fresh only while nothing else was
/// appended in between: a removal appended through another process leaves a gap in the
/// sequences this one sees acked, so its cache is renewed from the log (within the membership
/// TTL) however busy the room stays here. And the removal itself goes through while the room
/// is busy: a change is conditional on the room's last change, not on its last message.
#[tokio::test]
async fn a_member_removed_elsewhere_is_refused_here_while_this_process_keeps_appending() {
    let server = chat_harness::NatsServer::start();
    let dir = tempfile::tempdir().unwrap();
    let a = service(&server.url(), &dir, "a").await;
    let b = service(&server.url(), &dir, "b").await;
    let (admin, xavier, yara) = (user("admin"), user("xavier"), user("yara"));
    let room = RoomId::parse("busy").unwrap();
    a.create_group(
        &admin,
        &room,
        "busy",
        vec![xavier.clone(), yara.clone()],
        None,
    )
    .await
    .unwrap();
    a.append(&xavier, &room, Uuid::new_v4(), send("here"))
        .await
        .unwrap();
    // `a` keeps appending to the room, four at a time, before, during and after the removal
    // through `b`: the removal is decided and appended meanwhile, however busy the room is.
    let (appended, mut appends) = tokio::sync::watch::channel(0u64);
    let appended = Arc::new(appended);
    let busy: Vec<_> = (0..4)
        .map(|_| {
            let (a, room, yara, appended) =
                (a.clone(), room.clone(), yara.clone(), appended.clone());
            tokio::spawn(async move {
                loop {
                    a.append(&yara, &room, Uuid::new_v4(), send("busy"))
                        .await
                        .unwrap();
                    appended.send_modify(|n| *n += 1);
                }
            })
        })
        .collect();
    appends.wait_for(|n| *n >= 10).await.unwrap();
    b.remove(&admin, &room, &xavier).await.unwrap();
    let after_removal = *appends.borrow();
    appends
        .wait_for(|n| *n >= after_removal + 10)
        .await
        .unwrap();

    let deadline = Instant::now() + Duration::from_secs(10);
    let mut accepted_after_removal = 0;
    loop {
        match a
            .append(&xavier, &room, Uuid::new_v4(), send("removed?"))
            .await
        {
            Err(RoomError::Forbidden(_)) => break,
            Ok(_) => accepted_after_removal += 1,
            Err(e) => panic!("unexpected {e:?}"),
        }
        assert!(
            Instant::now() < deadline,
            "a removed member's appends were still accepted ({accepted_after_removal} of them) \
             while this process kept appending to the room"
        );
    }
    for task in busy {
        task.abort();
    }
    // The other process, which appended the removal, refused at once.
    let refused = b
        .append(&xavier, &room, Uuid::new_v4(), send("elsewhere"))
        .await;
    assert!(
        matches!(refused, Err(RoomError::Forbidden(_))),
        "{refused:?}"
    );
}

/// A resend after other appends of this process still gets its original answer, and the
/// cached state a process keeps by its own appends is the log's: an admin change through the
/// same process (read-only) takes effect at once.
#[tokio::test]
async fn own_appends_keep_the_cache_exact() {
    let server = chat_harness::NatsServer::start();
    let dir = tempfile::tempdir().unwrap();
    let a = service(&server.url(), &dir, "a").await;
    let (admin, yara) = (user("admin"), user("yara"));
    let room = RoomId::parse("quiet").unwrap();
    a.create_group(&admin, &room, "quiet", vec![yara.clone()], None)
        .await
        .unwrap();
    let id = Uuid::new_v4();
    let first = a.append(&yara, &room, id, send("one")).await.unwrap();
    for i in 0..5 {
        a.append(&yara, &room, Uuid::new_v4(), send(&format!("m{i}")))
            .await
            .unwrap();
    }
    let again = a.append(&yara, &room, id, send("one")).await.unwrap();
    assert_eq!((again.seq, again.duplicate), (first.seq, true));

    // The state's head is the log's.
    a.set_read_only(&admin, &room, true).await.unwrap();
    let refused = a.append(&yara, &room, Uuid::new_v4(), send("no")).await;
    assert!(
        matches!(refused, Err(RoomError::Forbidden(_))),
        "{refused:?}"
    );
    assert_eq!(a.state(&room).await.unwrap().head, first.seq + 6);
}

/// Two processes removing the same member at once: one removal is appended, the other is
/// decided again on the state that includes it and refused.
#[tokio::test]
async fn concurrent_changes_are_never_both_decided_on_the_same_state() {
    let server = chat_harness::NatsServer::start();
    let dir = tempfile::tempdir().unwrap();
    let a = service(&server.url(), &dir, "a").await;
    let b = service(&server.url(), &dir, "b").await;
    let (admin, xavier) = (user("admin"), user("xavier"));
    for round in 0..10 {
        let room = RoomId::parse(format!("race-{round}")).unwrap();
        a.create_group(&admin, &room, "race", vec![xavier.clone()], None)
            .await
            .unwrap();
        let (first, second) = tokio::join!(
            a.remove(&admin, &room, &xavier),
            b.remove(&admin, &room, &xavier)
        );
        let removed = [&first, &second].iter().filter(|r| r.is_ok()).count();
        assert_eq!(removed, 1, "{first:?} {second:?}");
        let refused = if first.is_ok() { second } else { first };
        assert!(
            matches!(refused, Err(RoomError::Conflict(_))),
            "{refused:?}"
        );
        let log = RoomLog::connect(&server.url(), LogConfig::default())
            .await
            .unwrap();
        assert_eq!(
            log.head(&room).await.unwrap(),
            2,
            "one event besides the creation"
        );
    }
}

/// A resend that the rules refuse now (the room was made read-only since its original) is
/// answered as its original was, though the store does not hold it (no projector runs here):
/// the entries the store lacks are read from the log. With more of them than a resend reads,
/// it waits for the store, and while the store stays behind the answer is `unavailable`
/// (retry with the same id), never a refusal of an append that landed.
#[tokio::test]
async fn a_refused_resend_finds_its_original_in_what_the_store_does_not_hold_yet() {
    let server = chat_harness::NatsServer::start();
    let dir = tempfile::tempdir().unwrap();
    let a = service(&server.url(), &dir, "a").await;
    let (admin, yara) = (user("admin"), user("yara"));
    let room = RoomId::parse("lagging").unwrap();
    a.create_group(&admin, &room, "lagging", vec![yara.clone()], None)
        .await
        .unwrap();
    let id = Uuid::new_v4();
    let original = a.append(&yara, &room, id, send("landed")).await.unwrap();
    assert!(!original.duplicate);
    a.set_read_only(&admin, &room, true).await.unwrap();

    let resent = a.append(&yara, &room, id, send("landed")).await.unwrap();
    assert_eq!(
        (resent.seq, resent.ts, resent.duplicate),
        (original.seq, original.ts, true)
    );
    // A new id is refused: nothing unstored holds it.
    let refused = a.append(&yara, &room, Uuid::new_v4(), send("new")).await;
    assert!(
        matches!(refused, Err(RoomError::Forbidden(_))),
        "{refused:?}"
    );

    // 1,000 more (the admin still posts) put the original past what a resend reads.
    futures::stream::iter(0..1_000)
        .map(|i| {
            let (a, admin, room) = (a.clone(), admin.clone(), room.clone());
            async move {
                a.append(&admin, &room, Uuid::new_v4(), send(&format!("m{i}")))
                    .await
                    .unwrap()
            }
        })
        .buffer_unordered(64)
        .collect::<Vec<_>>()
        .await;
    let resent = a.append(&yara, &room, id, send("landed")).await;
    assert!(
        matches!(&resent, Err(RoomError::Unavailable(m)) if m.contains("retry with the same id")),
        "{resent:?}"
    );
}
