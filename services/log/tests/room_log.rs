//! The room log against a real nats-server: order, idempotency, ranges, settings, errors.

mod common;

use std::collections::{BTreeMap, HashSet};

use chat_harness::{Cluster, NatsServer};
use chat_log::{LogConfig, LogError, RoomLog};
use chat_model::{Event, EventBody, RoomId};
use common::*;
use futures::future::join_all;

#[tokio::test]
async fn eight_concurrent_appenders_get_8000_consecutive_sequences_each_once() {
    let (_server, log, room) = with_room("busy").await;

    let appenders = (0..8).map(|w| {
        let log = log.clone();
        let room = room.clone();
        tokio::spawn(async move {
            let mut acked = Vec::with_capacity(1000);
            for i in 0..1000 {
                let event = message(format!("w{w}-{i}"));
                let appended = log.append(&room, &event).await.unwrap();
                assert!(!appended.duplicate);
                acked.push((appended.seq, event));
            }
            acked
        })
    });
    let mut by_seq = BTreeMap::new();
    for acked in join_all(appenders).await {
        for (seq, event) in acked.unwrap() {
            assert!(by_seq.insert(seq, event).is_none(), "seq {seq} acked twice");
        }
    }
    assert_eq!(by_seq.len(), 8000);
    assert_eq!(
        by_seq.keys().copied().collect::<Vec<_>>(),
        (1..=8000).collect::<Vec<u64>>()
    );
    assert_eq!(log.head(&room).await.unwrap(), 8000);

    // Read back in order: every sequence once, holding the event acked for it.
    let entries = log.read_range(&room, 1, 8000).collect().await.unwrap();
    assert_eq!(entries.len(), 8000);
    for (i, entry) in entries.iter().enumerate() {
        assert_eq!(entry.seq, i as u64 + 1);
        assert_eq!(&entry.decode().unwrap(), &by_seq[&entry.seq]);
    }
    // Each writer's own events appear in the order it wrote them.
    let mut last_index = [None::<usize>; 8];
    for entry in &entries {
        let event = entry.decode().unwrap();
        let (w, i) = text_of(&event)[1..].split_once('-').unwrap();
        let (w, i): (usize, usize) = (w.parse().unwrap(), i.parse().unwrap());
        assert!(
            last_index[w].is_none_or(|prev| prev < i),
            "writer {w} reordered"
        );
        last_index[w] = Some(i);
    }
}

#[tokio::test]
async fn a_repeated_id_returns_the_original_sequence_as_duplicate() {
    let (server, log, room) = with_room("general").await;

    log.append(&room, &message("before")).await.unwrap();
    let original = message("hi");
    let first = log.append(&room, &original).await.unwrap();
    assert_eq!((first.seq, first.duplicate), (2, false));
    log.append(&room, &message("after")).await.unwrap();

    // Same id, different content, through another connection: the original outcome.
    let other = connect(&server.url()).await;
    let mut resend = original.clone();
    resend.body = EventBody::Message {
        text: "changed".into(),
        thread: None,
        reply_to: None,
    };
    for log in [&log, &other] {
        let again = log.append(&room, &resend).await.unwrap();
        assert_eq!((again.seq, again.duplicate), (2, true));
    }
    assert_eq!(log.head(&room).await.unwrap(), 3);
    let stored = log.get(&room, 2).await.unwrap().unwrap().decode().unwrap();
    assert_eq!(stored, original, "the log keeps the first version");
}

#[tokio::test]
async fn append_if_last_lets_exactly_one_writer_be_first() {
    let (_server, log, room) = with_room("created-once").await;

    let attempts = join_all((0..4).map(|i| {
        let log = log.clone();
        let room = room.clone();
        async move {
            log.append_if_last(&room, &message(format!("first {i}")), 0)
                .await
        }
    }))
    .await;
    let winners = attempts.iter().filter(|r| r.is_ok()).count();
    assert_eq!(winners, 1, "{attempts:?}");
    for result in attempts.iter().filter(|r| r.is_err()) {
        assert!(
            matches!(
                result,
                Err(LogError::WrongLastSequence {
                    expected: 0,
                    actual: 1,
                    ..
                })
            ),
            "{result:?}"
        );
    }
}

#[tokio::test]
async fn appending_to_a_missing_room_is_room_not_found() {
    let server = NatsServer::start();
    let log = connect(&server.url()).await;
    let missing = room("nowhere");
    let err = log.append(&missing, &message("x")).await.unwrap_err();
    assert!(
        matches!(&err, LogError::RoomNotFound { room } if room == &missing),
        "{err}"
    );
    assert!(
        err.to_string().contains("nowhere"),
        "the error names the room: {err}"
    );
    assert!(matches!(
        log.head(&missing).await,
        Err(LogError::RoomNotFound { .. })
    ));
    assert!(!log.room_exists(&missing).await.unwrap());
}

#[tokio::test]
async fn room_streams_have_the_documented_settings() {
    let server = NatsServer::start();
    let config = LogConfig {
        duplicate_window: std::time::Duration::from_secs(42),
        ..LogConfig::default()
    };
    let log = RoomLog::connect(&server.url(), config.clone())
        .await
        .unwrap();
    let room = room("Settings_1");
    log.ensure_room(&room).await.unwrap();
    log.ensure_room(&room).await.unwrap(); // idempotent

    let js = async_nats::jetstream::new(async_nats::connect(server.url()).await.unwrap());
    let info = js
        .get_stream(config.stream_name(&room))
        .await
        .unwrap()
        .cached_info()
        .clone();
    let c = &info.config;
    assert_eq!(
        c.subjects,
        vec![
            "chat.room.Settings_1".to_owned(),
            "chat.change.Settings_1".to_owned()
        ]
    );
    let republish = c.republish.as_ref().expect("republish");
    assert_eq!(republish.source, "chat.*.Settings_1", "both subjects");
    assert_eq!(republish.destination, "chat.live.Settings_1");
    assert!(!republish.headers_only);
    assert!(c.deny_delete && c.deny_purge && c.allow_direct);
    assert_eq!(c.storage, async_nats::jetstream::stream::StorageType::File);
    assert_eq!(c.duplicate_window, std::time::Duration::from_secs(42));
    assert_eq!(
        c.metadata.get("chat.room").map(String::as_str),
        Some("Settings_1")
    );
    assert!(c.max_age.is_zero(), "no age limit");
    assert!(
        c.max_messages <= 0 && c.max_bytes <= 0 && c.max_messages_per_subject <= 0,
        "no count limits"
    );
    assert!(c.max_message_size as usize >= chat_model::MAX_EVENT_BYTES);

    // Deletes and purges are refused by the server itself.
    log.append(&room, &message("keep me")).await.unwrap();
    let stream = js.get_stream(config.stream_name(&room)).await.unwrap();
    assert!(stream.delete_message(1).await.is_err());
    assert!(stream.purge().await.is_err());
    assert_eq!(log.head(&room).await.unwrap(), 1);
}

#[tokio::test]
async fn a_stream_of_another_room_under_our_name_is_never_used() {
    let server = NatsServer::start();
    let log = connect(&server.url()).await;
    let room = room("victim");
    // A foreign stream squatting on the name this room would get.
    let js = async_nats::jetstream::new(async_nats::connect(server.url()).await.unwrap());
    js.create_stream(async_nats::jetstream::stream::Config {
        name: log.config().stream_name(&room),
        subjects: vec!["elsewhere.>".into()],
        ..Default::default()
    })
    .await
    .unwrap();
    let err = log.ensure_room(&room).await.unwrap_err();
    assert!(matches!(err, LogError::StreamConflict { .. }), "{err}");
}

#[tokio::test]
async fn ranges_read_in_order_short_and_long_and_clamped_to_the_head() {
    let (_server, log, room) = with_room("ranges").await;
    assert_eq!(log.head(&room).await.unwrap(), 0);
    assert!(log
        .read_range(&room, 1, 100)
        .collect()
        .await
        .unwrap()
        .is_empty());
    for i in 1..=300 {
        log.append(&room, &message(format!("m{i}"))).await.unwrap();
    }
    let seqs = |entries: Vec<chat_log::RawEntry>| entries.iter().map(|e| e.seq).collect::<Vec<_>>();
    // Short (direct gets), long (ordered consumer), beyond the head, empty, single.
    assert_eq!(
        seqs(log.read_range(&room, 5, 9).collect().await.unwrap()),
        (5..=9).collect::<Vec<_>>()
    );
    assert_eq!(
        seqs(log.read_range(&room, 10, 250).collect().await.unwrap()),
        (10..=250).collect::<Vec<_>>()
    );
    assert_eq!(
        seqs(
            log.read_range(&room, 290, u64::MAX)
                .collect()
                .await
                .unwrap()
        ),
        (290..=300).collect::<Vec<_>>()
    );
    assert!(log
        .read_range(&room, 301, 400)
        .collect()
        .await
        .unwrap()
        .is_empty());
    assert!(log
        .read_range(&room, 9, 8)
        .collect()
        .await
        .unwrap()
        .is_empty());
    let one = log.read_range(&room, 0, 1).collect().await.unwrap();
    assert_eq!(text_of(&one[0].decode().unwrap()), "m1");
    assert_eq!(log.get(&room, 301).await.unwrap(), None);
}

#[tokio::test]
async fn undecodable_bytes_are_still_delivered_as_entries() {
    let (_server, log, room) = with_room("garbage").await;
    log.append_raw(
        &room,
        "raw-1",
        bytes::Bytes::from_static(b"\xc1not msgpack"),
        None,
    )
    .await
    .unwrap();
    log.append(&room, &message("fine")).await.unwrap();
    let entries = log.read_range(&room, 1, 2).collect().await.unwrap();
    assert_eq!(entries.len(), 2);
    assert!(entries[0].decode().is_err());
    assert_eq!(text_of(&entries[1].decode().unwrap()), "fine");
    // Oversized payloads are refused before publishing.
    let huge = bytes::Bytes::from(vec![0u8; log.config().max_event_bytes + 1]);
    assert!(matches!(
        log.append_raw(&room, "raw-2", huge, None).await,
        Err(LogError::TooLarge { .. })
    ));
}

#[tokio::test]
async fn invalid_room_ids_never_reach_nats() {
    let server = NatsServer::start();
    // The log only takes validated `RoomId`s; every unsafe string is refused while parsing.
    let too_long = "x".repeat(65);
    let candidates = [
        "a.b",
        "*",
        ">",
        "chat.>",
        "",
        " ",
        "a\r\nPUB x 1",
        "é",
        too_long.as_str(),
    ];
    let parsed: Vec<RoomId> = candidates
        .iter()
        .filter_map(|c| RoomId::parse(*c).ok())
        .collect();
    assert!(parsed.is_empty(), "accepted: {parsed:?}");
    // And so nothing was created on the server.
    let log = connect(&server.url()).await;
    let js = async_nats::jetstream::new(log.client().clone());
    let names: Vec<String> = futures::TryStreamExt::try_collect(js.stream_names())
        .await
        .unwrap();
    assert!(names.is_empty(), "{names:?}");
}

#[tokio::test]
async fn a_three_node_cluster_serves_r3_rooms_with_dedup_and_reads() {
    let cluster = Cluster::start();
    let config = LogConfig {
        replicas: 3,
        ..LogConfig::default()
    };
    let log = RoomLog::connect(&cluster.urls(), config).await.unwrap();
    let room = room("replicated");
    log.ensure_room(&room).await.unwrap();
    let events: Vec<Event> = (0..50).map(|i| message(format!("r{i}"))).collect();
    let acks = join_all(events.iter().map(|e| log.append(&room, e))).await;
    let seqs: HashSet<u64> = acks.iter().map(|a| a.as_ref().unwrap().seq).collect();
    assert_eq!(seqs, (1..=50).collect());
    // Concurrent resends of the same ids never yield a sequence of 0 or a new event.
    let again = join_all(events.iter().map(|e| log.append(&room, e))).await;
    for (a, b) in acks.iter().zip(&again) {
        let (a, b) = (a.as_ref().unwrap(), b.as_ref().unwrap());
        assert_eq!((b.seq, b.duplicate), (a.seq, true));
    }
    assert_eq!(
        log.read_range(&room, 1, 50).collect().await.unwrap().len(),
        50
    );
    let js = async_nats::jetstream::new(log.client().clone());
    let info = js
        .get_stream(log.config().stream_name(&room))
        .await
        .unwrap()
        .cached_info()
        .clone();
    assert_eq!(info.config.num_replicas, 3);

    // With one server of three down, a new R3 room cannot be placed: that is unavailable (retry
    // later), never "no such room".
    let mut cluster = cluster;
    cluster.nodes[2].stop();
    // (Timeouts while the survivors elect a new meta leader, if the stopped one led.)
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    loop {
        match log.ensure_room(&common::room("placed-later")).await {
            Err(LogError::Unavailable { .. }) => break,
            Err(LogError::Timeout { .. }) if std::time::Instant::now() < deadline => continue,
            other => panic!("creating an R3 room on two servers: {other:?}"),
        }
    }
}

#[tokio::test]
async fn a_range_read_whose_batches_do_not_fit_the_connection_still_reads_everything_in_order() {
    let (server, log, room) = with_room("narrow").await;
    let events: Vec<Event> = (0..3000).map(|i| message(format!("n{i}"))).collect();
    for event in &events {
        log.append(&room, event).await.unwrap();
    }
    // Batches of 4,096 into a subscription buffer of 256: the client library drops most of
    // each batch (the losses at a batch's end show up only as silence), so the reader must
    // notice, start over where it is and ask for less.
    let options = async_nats::ConnectOptions::new().subscription_capacity(256);
    let config = LogConfig {
        read_batch: 4_096,
        request_timeout: std::time::Duration::from_secs(1),
        ..LogConfig::default()
    };
    let narrow = RoomLog::connect_with_options(&server.url(), options, config)
        .await
        .unwrap();
    let entries = within(
        "the narrow read",
        60,
        narrow.read_range(&room, 1, u64::MAX).collect(),
    )
    .await
    .unwrap();
    assert_eq!(
        entries.iter().map(|e| e.seq).collect::<Vec<_>>(),
        (1..=3000).collect::<Vec<u64>>()
    );
    for (entry, event) in entries.iter().zip(&events) {
        assert_eq!(text_of(&entry.decode().unwrap()), text_of(event));
    }
}

#[tokio::test]
async fn a_range_read_that_loses_the_last_messages_of_a_batch_starts_over_and_finishes() {
    let (server, log, room) = with_room("tail").await;
    for i in 0..300 {
        log.append(&room, &message(format!("t{i}"))).await.unwrap();
    }
    // One batch of all 300 into a subscription buffer of 256: while the reader is not reading,
    // the client library drops what does not fit, the last messages of the range among them,
    // and no later delivery reveals the loss. Only the silence does.
    let options = async_nats::ConnectOptions::new().subscription_capacity(256);
    let config = LogConfig {
        request_timeout: std::time::Duration::from_secs(1),
        ..LogConfig::default()
    };
    let narrow = RoomLog::connect_with_options(&server.url(), options, config)
        .await
        .unwrap();
    let mut events = narrow.connection_events();
    let mut reader = narrow.read_range(&room, 1, u64::MAX);
    let first = reader.next().await.unwrap().unwrap();
    within("the client library drops deliveries", 10, async {
        while !matches!(
            events.recv().await,
            Ok(chat_log::ConnectionEvent::SlowConsumer)
        ) {}
    })
    .await;
    let mut seqs = vec![first.seq];
    within("the rest of the range", 30, async {
        while let Some(entry) = reader.next().await {
            seqs.push(entry.unwrap().seq);
        }
    })
    .await;
    assert_eq!(seqs, (1..=300).collect::<Vec<u64>>());
}

#[tokio::test]
async fn a_change_is_refused_only_if_another_change_came_first_and_messages_do_not_count() {
    let (_server, log, room) = with_room("changes").await;
    let mut live = live_copies(&log, &room).await;
    log.append(&room, &message("before")).await.unwrap();
    assert_eq!(log.last_change(&room).await.unwrap(), 0);

    let first = log
        .append_change(&room, &message("change 1"), 0)
        .await
        .unwrap();
    assert_eq!(first.seq, 2);
    assert_eq!(log.last_change(&room).await.unwrap(), 2);
    // Messages after the change do not make a change decided on it stale.
    for i in 0..5 {
        log.append(&room, &message(format!("between {i}")))
            .await
            .unwrap();
    }
    let second = log
        .append_change(&room, &message("change 2"), 2)
        .await
        .unwrap();
    assert_eq!(second.seq, 8);
    // A change decided before the second one is.
    let stale = log.append_change(&room, &message("change 3"), 2).await;
    assert!(
        matches!(stale, Err(LogError::WrongLastSequence { expected: 2, .. })),
        "{stale:?}"
    );
    assert_eq!(log.last_change(&room).await.unwrap(), 8);

    // Both subjects are one order, in ranges and live.
    let seqs: Vec<u64> = log
        .read_range(&room, 1, u64::MAX)
        .collect()
        .await
        .unwrap()
        .iter()
        .map(|e| e.seq)
        .collect();
    assert_eq!(seqs, (1..=8).collect::<Vec<_>>());
    for seq in 1..=8 {
        assert_eq!(live_seq(&mut live).await, seq);
    }
}

/// The republished copies of the room's events themselves (a live subscription would fill a
/// gap from the stream, and so could not show what is republished).
async fn live_copies(log: &RoomLog, room: &RoomId) -> async_nats::Subscriber {
    log.client()
        .subscribe(log.config().live_subject(room))
        .await
        .unwrap()
}

async fn live_seq(live: &mut async_nats::Subscriber) -> u64 {
    use futures::StreamExt;
    let message = live.next().await.unwrap();
    let headers = message.headers.unwrap();
    headers
        .get(async_nats::header::NATS_SEQUENCE)
        .unwrap()
        .as_str()
        .parse()
        .unwrap()
}

#[tokio::test]
async fn a_stream_made_with_the_room_subject_alone_gains_the_state_subject() {
    let server = NatsServer::start();
    let config = LogConfig::default();
    let log = RoomLog::connect(&server.url(), config.clone())
        .await
        .unwrap();
    let room = room("older");
    // The settings streams had before changes got their own subject.
    let mut older = log.stream_config(&room);
    older.subjects = vec![config.room_subject(&room)];
    if let Some(republish) = older.republish.as_mut() {
        republish.source = config.room_subject(&room);
    }
    let js = async_nats::jetstream::new(log.client().clone());
    js.create_stream(older).await.unwrap();
    log.append(&room, &message("old")).await.unwrap();

    assert_eq!(log.last_change(&room).await.unwrap(), 0);
    let info = js
        .get_stream(config.stream_name(&room))
        .await
        .unwrap()
        .cached_info()
        .clone();
    assert_eq!(info.config.subjects, log.stream_config(&room).subjects);
    assert_eq!(
        info.config.republish.unwrap().source,
        config.republish_source(&room)
    );
    assert_eq!(info.state.messages, 1, "the events stay");

    let mut live = live_copies(&log, &room).await;
    let change = log
        .append_change(&room, &message("change"), 0)
        .await
        .unwrap();
    assert_eq!(change.seq, 2);
    assert_eq!(log.last_change(&room).await.unwrap(), 2);
    assert_eq!(live_seq(&mut live).await, 2, "changes are republished");
}

/// A stream whose last messages were deleted (only possible on a stream made by hand: rooms'
/// streams deny deletes) reports a last sequence that no longer exists. A read up to it ends
/// with what there is, rather than waiting for it forever (an operator's `log verify` then says
/// what is missing).
#[tokio::test]
async fn a_range_whose_end_was_deleted_ends_with_what_the_stream_holds() {
    let server = chat_harness::NatsServer::start();
    let log = RoomLog::connect(
        &server.url(),
        LogConfig {
            request_timeout: std::time::Duration::from_millis(300),
            ..LogConfig::default()
        },
    )
    .await
    .unwrap();
    let room = room("tampered");
    let js = async_nats::jetstream::new(log.client().clone());
    let mut config = log.stream_config(&room);
    config.deny_delete = false;
    js.create_stream(config).await.unwrap();
    for i in 1..=20 {
        log.append(&room, &message(format!("t{i}"))).await.unwrap();
    }
    let stream = js
        .get_stream(log.config().stream_name(&room))
        .await
        .unwrap();
    for seq in [19, 20] {
        assert!(stream.delete_message(seq).await.unwrap());
    }
    let seqs = |entries: Vec<chat_log::RawEntry>| entries.iter().map(|e| e.seq).collect::<Vec<_>>();
    for (from, to) in [(1, u64::MAX), (1, 20), (15, 20)] {
        let read = within(
            "a read past the deleted end",
            30,
            log.read_range(&room, from, to).collect(),
        )
        .await
        .unwrap();
        assert_eq!(seqs(read), (from..=18).collect::<Vec<_>>(), "{from}..={to}");
    }
}
