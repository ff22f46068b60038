//! Cached membership through the room service, against a real nats-server: two services on one
//! NATS stand for two processes (edges), each with its own cache.

use std::sync::Arc;
use std::time::{Duration, Instant};

use chat_log::{LogConfig, RoomLog};
use chat_model::{RoomId, UserId};
use chat_rooms::{Command, RoomError, Rooms, RoomsConfig};
use chat_store::SqliteStore;
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
/// TTL) however busy the room stays here.
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
    // `a` keeps appending to the room before and after the removal through `b`. It holds the
    // gate for each append; the removal takes it, so that `b`'s conditional append (made only
    // if the log has not moved since it read the room) is not raced for ever.
    let gate = Arc::new(tokio::sync::Mutex::new(()));
    let (appended, mut appends) = tokio::sync::watch::channel(0u64);
    let busy = tokio::spawn({
        let (a, room, yara, gate) = (a.clone(), room.clone(), yara.clone(), gate.clone());
        async move {
            for n in 1.. {
                let _turn = gate.lock().await;
                a.append(&yara, &room, Uuid::new_v4(), send("busy"))
                    .await
                    .unwrap();
                appended.send_replace(n);
            }
        }
    });
    appends.wait_for(|n| *n >= 10).await.unwrap();
    {
        let _turn = gate.lock().await;
        b.remove(&admin, &room, &xavier).await.unwrap();
    }

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
    busy.abort();
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

    // The state's head is the log's (a change decided on it appends with the right last
    // sequence, at the first try).
    a.set_read_only(&admin, &room, true).await.unwrap();
    let refused = a.append(&yara, &room, Uuid::new_v4(), send("no")).await;
    assert!(
        matches!(refused, Err(RoomError::Forbidden(_))),
        "{refused:?}"
    );
    assert_eq!(a.state(&room).await.unwrap().head, first.seq + 6);
}
