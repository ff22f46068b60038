//! Shared helpers for the room log's tests against a real nats-server.
#![allow(dead_code)]

use std::future::Future;
use std::time::{Duration, Instant};

use chat_log::{Appended, LogConfig, LogError, RoomLog};
use chat_model::{Event, EventBody, RoomId, UserId};
use uuid::Uuid;

pub fn room(s: &str) -> RoomId {
    RoomId::parse(s).unwrap()
}

pub fn message(text: impl Into<String>) -> Event {
    Event {
        id: Uuid::new_v4(),
        user: UserId::parse("alice").unwrap(),
        ts: 1_763_900_000_000,
        body: EventBody::Message {
            text: text.into(),
            thread: None,
            reply_to: None,
        },
    }
}

pub fn text_of(event: &Event) -> &str {
    match &event.body {
        EventBody::Message { text, .. } => text,
        other => panic!("not a message: {other:?}"),
    }
}

pub async fn connect(url: &str) -> RoomLog {
    RoomLog::connect(url, LogConfig::default())
        .await
        .expect("connect room log")
}

/// Appends, retrying with the same id while NATS is unavailable (a retry cannot duplicate).
pub async fn append_retrying(log: &RoomLog, room: &RoomId, event: &Event) -> Appended {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match log.append(room, event).await {
            Ok(appended) => return appended,
            Err(e) if e.is_transient() && Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(LogError::RoomNotFound { .. }) if Instant::now() < deadline => {
                // Right after a restart JetStream may answer before it has loaded the stream.
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(e) => panic!("append failed: {e}"),
        }
    }
}

/// Runs `f` until it returns `Some`, or panics at the deadline.
pub async fn within<T, F: Future<Output = T>>(what: &str, secs: u64, f: F) -> T {
    tokio::time::timeout(Duration::from_secs(secs), f)
        .await
        .unwrap_or_else(|_| panic!("{what}: not done within {secs} s"))
}

/// A fresh nats-server, a room log connected to it, and the room `name` created on it.
pub async fn with_room(name: &str) -> (chat_harness::NatsServer, RoomLog, RoomId) {
    let server = chat_harness::NatsServer::start();
    let log = connect(&server.url()).await;
    let room = room(name);
    log.ensure_room(&room).await.unwrap();
    (server, log, room)
}
