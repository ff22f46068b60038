//! The edge's fan-out hub against a real nats-server.

use std::time::Duration;

use chat_edge::{Follower, Hub};
use chat_harness::NatsServer;
use chat_log::{LogConfig, RoomLog};
use chat_model::{Event, EventBody, RoomId, UserId};
use serde_json::Value;

fn room(s: &str) -> RoomId {
    RoomId::parse(s).unwrap()
}

fn message(text: String) -> Event {
    Event {
        id: uuid::Uuid::new_v4(),
        user: UserId::parse("alice").unwrap(),
        ts: 1,
        body: EventBody::Message {
            text,
            thread: None,
            reply_to: None,
        },
    }
}

async fn log(server: &NatsServer) -> RoomLog {
    RoomLog::connect(&server.url(), LogConfig::default())
        .await
        .unwrap()
}

/// A fresh nats-server, a writer's room log on it, and the room `name` created.
async fn with_room(name: &str) -> (NatsServer, RoomLog, RoomId) {
    let server = NatsServer::start();
    let writer = log(&server).await;
    let room = room(name);
    writer.ensure_room(&room).await.unwrap();
    (server, writer, room)
}

/// Appends messages `m<i>` for each `i` of `numbers`, one after the other, in a task.
fn spawn_appends(
    writer: &RoomLog,
    room: &RoomId,
    numbers: std::ops::RangeInclusive<u32>,
) -> tokio::task::JoinHandle<()> {
    let (writer, room) = (writer.clone(), room.clone());
    tokio::spawn(async move {
        for i in numbers {
            writer
                .append(&room, &message(format!("m{i}")))
                .await
                .unwrap();
        }
    })
}

/// Reads `first..=last` from a follower and checks order, completeness and content.
async fn expect_exactly(follower: &mut Follower, first: u64, last: u64) {
    let got = tokio::time::timeout(Duration::from_secs(60), async {
        let mut got = Vec::new();
        while got.last().is_none_or(|&(seq, _)| seq < last) {
            let d = follower.next().await.unwrap();
            got.push((d.seq, d.frame.clone()));
        }
        got
    })
    .await
    .expect("follower got everything in time");
    let seqs: Vec<u64> = got.iter().map(|(s, _)| *s).collect();
    assert_eq!(seqs, (first..=last).collect::<Vec<_>>());
    for (seq, frame) in got {
        let frame: Value = serde_json::from_str(frame.as_str()).unwrap();
        assert_eq!(
            (frame["seq"].as_u64(), frame["text"].as_str()),
            (Some(seq), Some(format!("m{seq}").as_str()))
        );
    }
}

/// Subscriptions the server holds on `subject` (all clients).
fn server_subscriptions(server: &NatsServer, subject: &str) -> usize {
    let (_, body) = server.monitor("/subsz?subs=1").unwrap();
    let v: Value = serde_json::from_str(&body).unwrap();
    v["subscriptions_list"].as_array().map_or(0, |subs| {
        subs.iter().filter(|s| s["subject"] == subject).count()
    })
}

#[tokio::test]
async fn many_followers_share_one_subscription_and_each_gets_every_event() {
    let (server, writer, room) = with_room("shared").await;
    let hub = Hub::new(log(&server).await, 1024);
    let mut followers: Vec<Follower> = Vec::new();
    for _ in 0..50 {
        followers.push(hub.follow(&room, 0).await.unwrap());
    }
    assert_eq!(hub.live_rooms(), 1);
    // Followers read while the events are appended, so they take them from the shared feed.
    let readers: Vec<_> = followers
        .into_iter()
        .map(|mut f| {
            tokio::spawn(async move {
                expect_exactly(&mut f, 1, 100).await;
                f
            })
        })
        .collect();
    for i in 1..=100 {
        writer
            .append(&room, &message(format!("m{i}")))
            .await
            .unwrap();
    }
    let mut still_following = Vec::new();
    for reader in readers {
        still_following.push(reader.await.unwrap());
    }
    // Events arrived, so the subscription has reached the server: one for all 50 followers.
    assert_eq!(server_subscriptions(&server, "chat.live.shared"), 1);
}

#[tokio::test]
async fn resuming_mid_stream_has_no_gap_or_duplicate_while_others_send() {
    let (server, writer, room) = with_room("resume").await;
    let hub = Hub::new(log(&server).await, 1024);
    let mut early = hub.follow(&room, 0).await.unwrap();
    let appends = spawn_appends(&writer, &room, 1..=600);
    // Join at whatever point the log has reached, from a position some way back.
    let head = tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            let head = writer.head(&room).await.unwrap();
            if head >= 200 {
                return head;
            }
            tokio::task::yield_now().await;
        }
    })
    .await
    .unwrap();
    let from = head - 150;
    let mut late = hub.follow(&room, from).await.unwrap();
    expect_exactly(&mut late, from + 1, 600).await;
    expect_exactly(&mut early, 1, 600).await;
    appends.await.unwrap();
}

#[tokio::test]
async fn following_from_the_head_or_a_position_read_while_others_send_misses_nothing() {
    let (server, writer, room) = with_room("from").await;
    let hub = Hub::new(log(&server).await, 1024);
    for i in 1..=50 {
        writer
            .append(&room, &message(format!("m{i}")))
            .await
            .unwrap();
    }
    let appends = spawn_appends(&writer, &room, 51..=400);
    // From the head, whatever it is by now: everything after it, once.
    let (mut at_head, bounds) = hub.follow_from(&room, None).await.unwrap();
    assert!(bounds.last >= 50 && bounds.first == 1);
    // From a position: the catch-up ends at the head read with it, the rest comes live.
    let (mut from_ten, _) = hub.follow_from(&room, Some(10)).await.unwrap();
    expect_exactly(&mut at_head, bounds.last + 1, 400).await;
    expect_exactly(&mut from_ten, 11, 400).await;
    appends.await.unwrap();
}

#[tokio::test]
async fn the_last_follower_leaving_releases_the_subscription() {
    let (server, writer, room) = with_room("released").await;
    let hub = Hub::new(log(&server).await, 16);
    let mut a = hub.follow(&room, 0).await.unwrap();
    let mut b = hub.follow(&room, 0).await.unwrap();
    writer.append(&room, &message("m1".into())).await.unwrap();
    expect_exactly(&mut a, 1, 1).await;
    expect_exactly(&mut b, 1, 1).await;
    assert_eq!(server_subscriptions(&server, "chat.live.released"), 1);
    drop(a);
    assert_eq!(hub.live_rooms(), 1, "b still follows");
    drop(b);
    assert_eq!(hub.live_rooms(), 0);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while server_subscriptions(&server, "chat.live.released") > 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "subscription not released"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Following again starts a fresh feed that works.
    let mut c = hub.follow(&room, 1).await.unwrap();
    writer.append(&room, &message("m2".into())).await.unwrap();
    expect_exactly(&mut c, 2, 2).await;
}

#[tokio::test]
async fn a_follower_that_falls_out_of_the_buffer_reads_the_rest_from_the_log() {
    let (server, writer, room) = with_room("slowpoke").await;
    let hub = Hub::new(log(&server).await, 8);
    let mut slow = hub.follow(&room, 0).await.unwrap();
    let mut fast = hub.follow(&room, 0).await.unwrap();
    let reader = tokio::spawn(async move { expect_exactly(&mut fast, 1, 500).await });
    // The slow follower is caught up and on the live feed (event 1 comes from it)...
    let first = tokio::spawn(async move {
        expect_exactly(&mut slow, 1, 1).await;
        slow
    });
    writer.append(&room, &message("m1".into())).await.unwrap();
    let mut slow = first.await.unwrap();
    // ...then stops reading while 499 more pass through a buffer of 8.
    for i in 2..=500 {
        writer
            .append(&room, &message(format!("m{i}")))
            .await
            .unwrap();
    }
    reader.await.unwrap();
    expect_exactly(&mut slow, 2, 500).await;
}

#[tokio::test]
async fn catching_up_needs_no_new_event_to_start() {
    let (server, writer, room) = with_room("quiet").await;
    for i in 1..=20 {
        writer
            .append(&room, &message(format!("m{i}")))
            .await
            .unwrap();
    }
    let hub = Hub::new(log(&server).await, 16);
    // Nothing is appended after this: the backlog alone must arrive.
    let mut follower = hub.follow(&room, 5).await.unwrap();
    expect_exactly(&mut follower, 6, 20).await;
}

#[tokio::test]
async fn following_a_room_that_does_not_exist_is_an_error() {
    let server = NatsServer::start();
    let hub = Hub::new(log(&server).await, 16);
    assert!(matches!(
        hub.follow(&room("nowhere"), 0).await,
        Err(chat_log::LogError::RoomNotFound { .. })
    ));
    assert_eq!(hub.live_rooms(), 0);
}
