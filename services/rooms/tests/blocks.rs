//! Block lists through the room service, against a real nats-server: two services on one NATS
//! stand for two processes (edges), each with its own cache.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use chat_log::{LogConfig, RoomLog};
use chat_model::UserId;
use chat_rooms::{RoomError, Rooms, RoomsConfig};
use chat_store::SqliteStore;

fn user(s: &str) -> UserId {
    UserId::parse(s).unwrap()
}

fn set(users: &[&str]) -> HashSet<UserId> {
    users.iter().map(|u| user(u)).collect()
}

/// A room service of its own (own connection, own cache) on `url`. The TTL is an hour, so only
/// a change notice can make a cached list change within the test.
async fn service(url: &str, dir: &tempfile::TempDir, name: &str) -> Arc<Rooms> {
    let log = RoomLog::connect(url, LogConfig::default()).await.unwrap();
    let store = SqliteStore::open(&dir.path().join(format!("{name}.db"))).unwrap();
    Rooms::new(
        log,
        Arc::new(store),
        RoomsConfig {
            block_list_ttl: Duration::from_secs(3600),
            ..RoomsConfig::default()
        },
    )
}

async fn eventually_blocked(rooms: &Rooms, who: &UserId, expected: &HashSet<UserId>) {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let blocked = rooms.blocked(who).await.unwrap();
        if &*blocked == expected {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "still {blocked:?}, expected {expected:?}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn a_change_made_through_one_process_reaches_the_others_cache() {
    let server = chat_harness::NatsServer::start();
    let dir = tempfile::tempdir().unwrap();
    let a = service(&server.url(), &dir, "a").await;
    let b = service(&server.url(), &dir, "b").await;
    let alice = user("alice");
    // b reads (and caches) alice's empty list before the change.
    assert!(b.blocked(&alice).await.unwrap().is_empty());

    let seq = a.block(&alice, &user("bob")).await.unwrap();
    assert!(seq > 0);
    assert_eq!(
        *a.blocked(&alice).await.unwrap(),
        set(&["bob"]),
        "the changing process knows at once"
    );
    eventually_blocked(&b, &alice, &set(&["bob"])).await;

    // Idempotent: blocking again appends nothing and answers the same entry.
    assert_eq!(a.block(&alice, &user("bob")).await.unwrap(), seq);
    assert_eq!(a.block_list(&alice).await.unwrap(), vec![user("bob")]);

    b.unblock(&alice, &user("bob")).await.unwrap();
    eventually_blocked(&a, &alice, &set(&[])).await;
    assert!(a.block_list(&alice).await.unwrap().is_empty());
}

#[tokio::test]
async fn concurrent_changes_through_two_processes_are_all_kept() {
    let server = chat_harness::NatsServer::start();
    let dir = tempfile::tempdir().unwrap();
    let a = service(&server.url(), &dir, "a").await;
    let b = service(&server.url(), &dir, "b").await;
    let alice = user("alice");
    let blocks = (0..10).map(|i| {
        let rooms = if i % 2 == 0 { a.clone() } else { b.clone() };
        let alice = alice.clone();
        tokio::spawn(async move { rooms.block(&alice, &user(&format!("u{i}"))).await })
    });
    for done in futures::future::join_all(blocks).await {
        done.unwrap().unwrap();
    }
    let all: HashSet<UserId> = (0..10).map(|i| user(&format!("u{i}"))).collect();
    assert_eq!(
        a.block_list(&alice)
            .await
            .unwrap()
            .into_iter()
            .collect::<HashSet<_>>(),
        all
    );
    eventually_blocked(&a, &alice, &all).await;
    eventually_blocked(&b, &alice, &all).await;
}

#[tokio::test]
async fn blocking_yourself_is_a_bad_request() {
    let server = chat_harness::NatsServer::start();
    let dir = tempfile::tempdir().unwrap();
    let a = service(&server.url(), &dir, "a").await;
    let alice = user("alice");
    assert!(matches!(
        a.block(&alice, &alice).await,
        Err(RoomError::BadRequest(_))
    ));
    assert!(a.block_list(&alice).await.unwrap().is_empty());
}
