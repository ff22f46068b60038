//! Live subscriptions against a real nats-server: catch-up, seams, gaps, restarts.

mod common;

use std::time::Duration;

use chat_harness::{NatsServer, TcpProxy};
use chat_log::{LiveSubscription, LogConfig, RawEntry, RoomLog};
use common::*;
use tokio::sync::mpsc;

/// Reads the subscription in a task of its own and forwards every entry.
fn collect(mut live: LiveSubscription) -> mpsc::UnboundedReceiver<RawEntry> {
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        loop {
            match live.next().await {
                Ok(entry) => {
                    if tx.send(entry).is_err() {
                        return;
                    }
                }
                // NATS is away (restart under test): try again shortly, resuming where it was.
                Err(e) if e.is_transient() => tokio::time::sleep(Duration::from_millis(20)).await,
                Err(e) => panic!("live subscription failed: {e}"),
            }
        }
    });
    rx
}

/// Receives until `last` arrives and checks that exactly `first..=last` came, in order.
async fn expect_exactly(
    rx: &mut mpsc::UnboundedReceiver<RawEntry>,
    first: u64,
    last: u64,
) -> Vec<RawEntry> {
    let mut got = Vec::new();
    within(&format!("receive {first}..={last}"), 60, async {
        while got.last().is_none_or(|e: &RawEntry| e.seq < last) {
            got.push(rx.recv().await.expect("subscription ended"));
        }
    })
    .await;
    let seqs: Vec<u64> = got.iter().map(|e| e.seq).collect();
    assert_eq!(
        seqs,
        (first..=last).collect::<Vec<_>>(),
        "not exactly {first}..={last} in order"
    );
    got
}

fn assert_texts(entries: &[RawEntry], prefix: &str) {
    for e in entries {
        assert_eq!(
            text_of(&e.decode().unwrap()),
            format!("{prefix}{}", e.seq),
            "seq {}",
            e.seq
        );
    }
}

async fn fast_reconnecting(url: &str) -> RoomLog {
    let options =
        async_nats::ConnectOptions::new().reconnect_delay_callback(|_| Duration::from_millis(50));
    RoomLog::connect_with_options(url, options, LogConfig::default())
        .await
        .unwrap()
}

#[tokio::test]
async fn catch_up_then_live_with_no_gap_or_duplicate_at_the_seam() {
    let (server, log, room) = with_room("seam").await;
    for i in 1..=20 {
        log.append(&room, &message(format!("m{i}"))).await.unwrap();
    }
    // A writer keeps appending while the subscriber starts from 10.
    let writer = {
        let log = log.clone();
        let room = room.clone();
        tokio::spawn(async move {
            for i in 21..=500 {
                log.append(&room, &message(format!("m{i}"))).await.unwrap();
            }
        })
    };
    let reader = connect(&server.url()).await;
    let mut rx = collect(reader.subscribe_live(&room, 10).await.unwrap());
    let got = expect_exactly(&mut rx, 11, 500).await;
    assert_texts(&got, "m");
    writer.await.unwrap();
}

#[tokio::test]
async fn starting_at_the_head_yields_only_new_events() {
    let (_server, log, room) = with_room("fresh").await;
    for i in 1..=5 {
        log.append(&room, &message(format!("m{i}"))).await.unwrap();
    }
    let head = log.head(&room).await.unwrap();
    let mut rx = collect(log.subscribe_live(&room, head).await.unwrap());
    log.append(&room, &message("m6")).await.unwrap();
    assert_texts(&expect_exactly(&mut rx, 6, 6).await, "m");
}

#[tokio::test]
async fn a_gap_in_live_delivery_is_filled_from_the_stream() {
    let server = NatsServer::start();
    let proxy = TcpProxy::start(format!("127.0.0.1:{}", server.port())).await;
    let writer = connect(&server.url()).await;
    let reader = connect(&proxy.url()).await;
    let room = room("gappy");
    writer.ensure_room(&room).await.unwrap();
    let mut rx = collect(reader.subscribe_live(&room, 0).await.unwrap());
    writer.append(&room, &message("m1")).await.unwrap();
    expect_exactly(&mut rx, 1, 1).await;

    // Seqs 2..=4 are stored but their live copies never reach the reader.
    proxy.cut();
    for i in 2..=4 {
        writer
            .append(&room, &message(format!("m{i}")))
            .await
            .unwrap();
    }
    within("live copies dropped", 10, async {
        while proxy.dropped_bytes() < 3 * 100 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await;
    proxy.heal();
    writer.append(&room, &message("m5")).await.unwrap();
    assert_texts(&expect_exactly(&mut rx, 2, 5).await, "m");
}

#[tokio::test]
async fn a_restart_loses_nothing_not_even_the_last_event_before_it() {
    let mut server = NatsServer::start();
    let proxy = TcpProxy::start(format!("127.0.0.1:{}", server.port())).await;
    let writer = fast_reconnecting(&server.url()).await;
    let reader = fast_reconnecting(&proxy.url()).await;
    let room = room("restarted");
    writer.ensure_room(&room).await.unwrap();
    let mut rx = collect(reader.subscribe_live(&room, 0).await.unwrap());
    for i in 1..=49 {
        writer
            .append(&room, &message(format!("m{i}")))
            .await
            .unwrap();
    }
    expect_exactly(&mut rx, 1, 49).await;

    // The reader's link goes dark; seq 50 is stored but its live copy is lost; then the
    // server crashes. No later live message will reveal seq 50.
    proxy.cut();
    writer.append(&room, &message("m50")).await.unwrap();
    within("live copy of 50 dropped", 10, async {
        while proxy.dropped_bytes() < 100 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await;
    server.restart();
    // Appended while the reader is still away: these are the tail it must find by itself.
    for i in 51..=60 {
        append_retrying(&writer, &room, &message(format!("m{i}"))).await;
    }
    proxy.heal();
    assert_texts(&expect_exactly(&mut rx, 50, 60).await, "m");
    // Nothing more of those (a late copy of one would come before the next event).
    append_retrying(&writer, &room, &message("m61")).await;
    assert_texts(&expect_exactly(&mut rx, 61, 61).await, "m");
}

#[tokio::test]
async fn events_appended_across_a_restart_arrive_once_each_in_order() {
    let mut server = NatsServer::start();
    let writer = fast_reconnecting(&server.url()).await;
    let reader = fast_reconnecting(&server.url()).await;
    let room = room("across");
    writer.ensure_room(&room).await.unwrap();
    let mut rx = collect(reader.subscribe_live(&room, 0).await.unwrap());

    let (restart_tx, mut restart_rx) = mpsc::channel::<()>(1);
    let appends = {
        let writer = writer.clone();
        let room = room.clone();
        tokio::spawn(async move {
            for i in 1..=400u64 {
                let appended = append_retrying(&writer, &room, &message(format!("m{i}"))).await;
                assert_eq!(
                    appended.seq, i,
                    "a retry created a duplicate or skipped a sequence"
                );
                if i == 150 {
                    restart_tx.send(()).await.unwrap();
                }
            }
        })
    };
    within("150 appends", 30, restart_rx.recv()).await;
    server.restart();
    appends.await.unwrap();
    assert_texts(&expect_exactly(&mut rx, 1, 400).await, "m");
}

#[tokio::test]
async fn a_slow_consumer_notice_makes_the_reader_fetch_what_was_dropped() {
    let server = NatsServer::start();
    let writer = connect(&server.url()).await;
    // A small subscription buffer: the client library drops what does not fit and says so.
    // (It applies to every subscription of the connection, so it must still hold the batches
    // of the range read that fills the gap, as the read batch's documentation says.)
    let options = async_nats::ConnectOptions::new().subscription_capacity(1024);
    let config = LogConfig {
        read_batch: 512,
        ..LogConfig::default()
    };
    let reader = RoomLog::connect_with_options(&server.url(), options, config)
        .await
        .unwrap();
    let room = room("slow");
    writer.ensure_room(&room).await.unwrap();
    let mut live = reader.subscribe_live(&room, 0).await.unwrap();
    writer.append(&room, &message("m1")).await.unwrap();
    assert_eq!(within("first event", 10, live.next()).await.unwrap().seq, 1);

    // The reader stops reading while 3,000 events are appended: the live copies past its
    // buffer are dropped, the last ones included, so no later live message would reveal them.
    let events: Vec<_> = (2..=3000).map(|i| message(format!("m{i}"))).collect();
    for event in &events {
        writer.append(&room, event).await.unwrap();
    }
    let mut got = Vec::new();
    within("all 3,000 after the slow-consumer notice", 30, async {
        while got.last().is_none_or(|e: &RawEntry| e.seq < 3000) {
            got.push(live.next().await.unwrap());
        }
    })
    .await;
    let seqs: Vec<u64> = got.iter().map(|e| e.seq).collect();
    assert_eq!(seqs, (2..=3000).collect::<Vec<_>>());
    assert_texts(&got, "m");
}
