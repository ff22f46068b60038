//! The user log against a real nats-server: block lists read in O(1), changed by
//! compare-and-set, and announced on the notice subjects.

mod common;

use std::collections::BTreeSet;
use std::time::Duration;

use chat_log::{UserLog, UserLogError};
use chat_model::{decide_block_change, BlockChange, BlockEvent, UserId};
use common::*;
use futures::StreamExt;
use uuid::Uuid;

fn user(s: &str) -> UserId {
    UserId::parse(s).unwrap()
}

fn change(owner: &str, change: BlockChange, blocked: &BTreeSet<UserId>) -> BlockEvent {
    BlockEvent {
        id: Uuid::new_v4(),
        user: user(owner),
        ts: 1_763_900_000_000,
        change,
        blocked: blocked.clone(),
    }
}

/// Applies `c` to `owner`'s list the way the room service does: read from the leader, decide,
/// append conditionally, and on a conflict start over.
///
/// An answer of unknown outcome (a timeout, NATS unavailable) is tried again too, until
/// `UNKNOWN_OUTCOME_DEADLINE`, as a caller of the API would: on a fresh three-node cluster under
/// load the first request creates the replicated stream and can outlast the request timeout.
/// Trying again is safe: the change is decided afresh from the list the log holds.
async fn change_retrying(users: &UserLog, owner: &UserId, c: BlockChange) -> u64 {
    let deadline = tokio::time::Instant::now() + UNKNOWN_OUTCOME_DEADLINE;
    let mut conflicts = 0;
    loop {
        let attempt = async {
            let last = users.last_blocks(owner, true).await?;
            let (expected, current) = last.map(|e| (e.seq, e.event.blocked)).unwrap_or_default();
            let Some(next) = decide_block_change(owner, &current, &c).unwrap() else {
                return Ok(expected);
            };
            let event = change(owner.as_str(), c.clone(), &next);
            users.append_blocks(&event, expected).await
        };
        match attempt.await {
            Ok(seq) => return seq,
            Err(UserLogError::WrongLastSequence { .. }) if conflicts < 50 => conflicts += 1,
            // No pause: these answers come after a request timed out, which paces the tries.
            Err(UserLogError::Timeout { .. } | UserLogError::Unavailable { .. })
                if tokio::time::Instant::now() < deadline => {}
            Err(e) => panic!("change after {conflicts} conflicts: {e}"),
        }
    }
}

/// How long [`change_retrying`] tries again after answers of unknown outcome.
const UNKNOWN_OUTCOME_DEADLINE: Duration = Duration::from_secs(30);

#[tokio::test]
async fn a_block_list_is_the_last_entry_of_its_users_subject() {
    let server = chat_harness::NatsServer::start();
    let log = connect(&server.url()).await;
    let users = UserLog::new(&log);
    // A user with dots and an @ (never part of a subject) and one without.
    let alice = user("alice.smith@example.com");
    assert_eq!(users.last_blocks(&alice, false).await.unwrap(), None);

    let one: BTreeSet<UserId> = [user("bob")].into();
    let first = change(alice.as_str(), BlockChange::Block(user("bob")), &one);
    let s1 = users.append_blocks(&first, 0).await.unwrap();
    let two: BTreeSet<UserId> = [user("bob"), user("carol")].into();
    let second = change(alice.as_str(), BlockChange::Block(user("carol")), &two);
    let s2 = users.append_blocks(&second, s1).await.unwrap();
    // Another user's entries do not move alice's subject.
    let dave = user("dave");
    users
        .append_blocks(&change("dave", BlockChange::Block(user("bob")), &one), 0)
        .await
        .unwrap();

    for fresh in [false, true] {
        let last = users.last_blocks(&alice, fresh).await.unwrap().unwrap();
        assert_eq!((last.seq, &last.event), (s2, &second), "fresh: {fresh}");
    }
    assert_eq!(
        users
            .last_blocks(&dave, false)
            .await
            .unwrap()
            .unwrap()
            .event
            .blocked,
        one
    );

    // A change decided on an old list is refused, and so is "first change" for a user who has
    // one: the compare-and-set is per user.
    let stale = change(
        alice.as_str(),
        BlockChange::Unblock(user("bob")),
        &BTreeSet::new(),
    );
    assert!(matches!(
        users.append_blocks(&stale, s1).await,
        Err(UserLogError::WrongLastSequence { .. })
    ));
    assert!(matches!(
        users.append_blocks(&stale, 0).await,
        Err(UserLogError::WrongLastSequence { .. })
    ));
    assert_eq!(
        users.last_blocks(&alice, true).await.unwrap().unwrap().seq,
        s2
    );
}

#[tokio::test]
async fn concurrent_changes_of_one_list_are_all_kept() {
    let server = chat_harness::NatsServer::start();
    let log = connect(&server.url()).await;
    let owner = user("alice");
    let tasks = (0..8).map(|i| {
        let users = UserLog::new(&log);
        let owner = owner.clone();
        tokio::spawn(async move {
            change_retrying(&users, &owner, BlockChange::Block(user(&format!("u{i}")))).await
        })
    });
    for task in futures::future::join_all(tasks).await {
        task.unwrap();
    }
    let users = UserLog::new(&log);
    let list = users.last_blocks(&owner, true).await.unwrap().unwrap();
    let expected: BTreeSet<UserId> = (0..8).map(|i| user(&format!("u{i}"))).collect();
    assert_eq!(list.event.blocked, expected, "no change was lost");
    // Blocking someone already blocked appends nothing.
    let before = list.seq;
    assert_eq!(
        change_retrying(&users, &owner, BlockChange::Block(user("u3"))).await,
        before
    );
}

#[tokio::test]
async fn every_change_is_announced_on_the_users_notice_subject() {
    let server = chat_harness::NatsServer::start();
    let log = connect(&server.url()).await;
    let users = UserLog::new(&log);
    users.ensure().await.unwrap();
    let mut notices = users.subscribe_notices().await.unwrap();
    log.client().flush().await.unwrap();

    let alice = user("alice");
    let blocked: BTreeSet<UserId> = [user("bob")].into();
    let seq = users
        .append_blocks(
            &change("alice", BlockChange::Block(user("bob")), &blocked),
            0,
        )
        .await
        .unwrap();
    let notice = tokio::time::timeout(Duration::from_secs(5), notices.next())
        .await
        .expect("a notice in time")
        .expect("subscription open");
    assert_eq!(
        UserLog::key_of_notice(notice.subject.as_str()),
        Some(users.key(&alice).as_str())
    );
    assert!(
        !notice.subject.as_str().contains("alice"),
        "{}",
        notice.subject
    );
    let headers = notice.headers.expect("republished with headers");
    assert_eq!(
        headers
            .get(async_nats::header::NATS_SEQUENCE)
            .map(|v| v.as_str().to_owned()),
        Some(seq.to_string())
    );
    assert!(notice.payload.is_empty(), "a notice carries headers only");

    // The stream is set up like a room's.
    let info = log
        .client()
        .request("$JS.API.STREAM.INFO.CHAT_USERS", "".into())
        .await
        .unwrap();
    let info: serde_json::Value = serde_json::from_slice(&info.payload).unwrap();
    let config = &info["config"];
    assert_eq!(
        (
            &config["deny_delete"],
            &config["deny_purge"],
            &config["allow_direct"],
            &config["storage"]
        ),
        (
            &serde_json::json!(true),
            &serde_json::json!(true),
            &serde_json::json!(true),
            &serde_json::json!("file")
        )
    );
}

#[tokio::test]
async fn on_a_three_node_cluster_the_list_is_replicated_and_changes_stay_compare_and_set() {
    let cluster = chat_harness::Cluster::start();
    let config = chat_log::LogConfig {
        replicas: 3,
        ..chat_log::LogConfig::default()
    };
    let log = chat_log::RoomLog::connect(&cluster.urls(), config)
        .await
        .unwrap();
    let users = UserLog::new(&log);
    let owner = user("auth0|5f7c");
    // Right after the stream is created (ensure waits for its leader), through several handles
    // at once: every change is kept.
    let tasks = (0..4).map(|i| {
        let users = UserLog::new(&log);
        let owner = owner.clone();
        tokio::spawn(async move {
            change_retrying(&users, &owner, BlockChange::Block(user(&format!("u{i}")))).await
        })
    });
    for task in futures::future::join_all(tasks).await {
        task.unwrap();
    }
    let expected: BTreeSet<UserId> = (0..4).map(|i| user(&format!("u{i}"))).collect();
    assert_eq!(
        users
            .last_blocks(&owner, true)
            .await
            .unwrap()
            .unwrap()
            .event
            .blocked,
        expected
    );
    let info = log
        .client()
        .request("$JS.API.STREAM.INFO.CHAT_USERS", "".into())
        .await
        .unwrap();
    let info: serde_json::Value = serde_json::from_slice(&info.payload).unwrap();
    assert_eq!(info["config"]["num_replicas"], 3, "{info}");
}

/// Reading a list never creates the user stream: before anyone changes a list every list is
/// empty, and that is the answer even while the cluster cannot place a new replicated stream
/// (a server down), where creating it on a read made every read wait and then fail.
#[tokio::test]
async fn reading_lists_before_any_change_needs_no_stream_even_with_a_server_down() {
    let mut cluster = chat_harness::Cluster::start();
    let config = chat_log::LogConfig {
        replicas: 3,
        ..chat_log::LogConfig::default()
    };
    let log = chat_log::RoomLog::connect(&cluster.urls(), config)
        .await
        .unwrap();
    let users = UserLog::new(&log);
    assert!(users
        .last_blocks(&user("bob"), false)
        .await
        .unwrap()
        .is_none());
    let info = log
        .client()
        .request("$JS.API.STREAM.INFO.CHAT_USERS", "".into())
        .await
        .unwrap();
    let info: serde_json::Value = serde_json::from_slice(&info.payload).unwrap();
    assert_eq!(
        info["error"]["err_code"], 10059,
        "no stream created by a read: {info}"
    );

    cluster.nodes[2].stop();
    let started = std::time::Instant::now();
    // (A timeout while the survivors elect a new meta leader, if the stopped server led.)
    let answer = loop {
        match users.last_blocks(&user("bob"), true).await {
            Err(UserLogError::Timeout { .. } | UserLogError::Unavailable { .. })
                if started.elapsed() < Duration::from_secs(60) => {}
            other => break other,
        }
    };
    assert!(answer.unwrap().is_none(), "an empty list, not an error");
    // A change cannot be made until the stream can be placed: said so, not hidden.
    let event = change(
        "bob",
        BlockChange::Block(user("mallory")),
        &[user("mallory")].into(),
    );
    assert!(users.append_blocks(&event, 0).await.is_err());
}
