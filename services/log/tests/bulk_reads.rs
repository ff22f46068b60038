//! Bulk range reads on connections of their own (decision 0008) against a real nats-server:
//! the same entries as the client library's reads, in order, whatever their size; with the
//! main connection's credentials; and through the client library when they cannot be used.

mod common;

use chat_harness::NatsServer;
use chat_log::{LogConfig, RawEntry, RoomLog, WireAuth};
use chat_model::{Event, RoomId};
use common::*;

/// Appends `events` to a new room in their order, pipelined (published one after the other,
/// acknowledgements awaited 256 at a time).
async fn fill(log: &RoomLog, name: &str, events: &[Event]) -> RoomId {
    let room = room(name);
    log.ensure_room(&room).await.unwrap();
    for chunk in events.chunks(256) {
        let mut pending = Vec::with_capacity(chunk.len());
        for event in chunk {
            pending.push(log.send(&room, event).await.unwrap());
        }
        for append in pending {
            append.appended().await.unwrap();
        }
    }
    room
}

async fn bulk(log: &RoomLog, room: &RoomId, from: u64, to: u64) -> Vec<RawEntry> {
    within(
        "the bulk read",
        60,
        log.read_range(room, from, to).bulk().collect(),
    )
    .await
    .unwrap()
}

/// `entries` are `events`, in their order, at sequences 1, 2, …
fn read_as_appended(entries: &[RawEntry], events: &[Event]) {
    assert_eq!(
        entries.iter().map(|e| e.seq).collect::<Vec<_>>(),
        (1..=events.len() as u64).collect::<Vec<u64>>()
    );
    assert_eq!(
        texts(entries),
        events
            .iter()
            .map(|e| text_of(e).to_owned())
            .collect::<Vec<_>>()
    );
}

fn texts(entries: &[RawEntry]) -> Vec<String> {
    entries
        .iter()
        .map(|e| text_of(&e.decode().unwrap()).to_owned())
        .collect()
}

#[tokio::test]
async fn a_bulk_read_gives_what_the_client_library_gives_in_order_and_stops_at_its_end() {
    let server = NatsServer::start();
    let log = connect(&server.url()).await;
    let events: Vec<Event> = (0..5_000).map(|i| message(format!("b{i}"))).collect();
    let room = fill(&log, "bulk", &events).await;

    let entries = bulk(&log, &room, 1, u64::MAX).await;
    assert_eq!(log.wire_reads(), 1, "read on a connection of its own");
    let plain = log.read_range(&room, 1, u64::MAX).collect().await.unwrap();
    assert_eq!(texts(&entries), texts(&plain));
    read_as_appended(&entries, &events);
    for (a, b) in entries.iter().zip(&plain) {
        assert_eq!(a.payload, b.payload, "seq {}", a.seq);
    }

    // A range inside the log: from its first to its last sequence, nothing past it (the
    // consumer delivers on; the reader stops).
    let middle = bulk(&log, &room, 1_201, 3_700).await;
    assert_eq!(log.wire_reads(), 2);
    assert_eq!(
        middle.iter().map(|e| e.seq).collect::<Vec<_>>(),
        (1_201..=3_700).collect::<Vec<u64>>()
    );
    // A short one is not worth a connection.
    assert_eq!(bulk(&log, &room, 10, 400).await.len(), 391);
    assert_eq!(log.wire_reads(), 2);
}

/// Consumers on the room's stream right now.
async fn consumers(log: &RoomLog, room: &RoomId) -> usize {
    let js = async_nats::jetstream::new(log.client().clone());
    let mut stream = js.get_stream(log.config().stream_name(room)).await.unwrap();
    stream.info().await.unwrap().state.consumer_count
}

#[tokio::test]
async fn range_reads_delete_their_consumers_when_done_or_dropped() {
    let server = NatsServer::start();
    let log = connect(&server.url()).await;
    let events: Vec<Event> = (0..2_000).map(|i| message(format!("d{i}"))).collect();
    let room = fill(&log, "consumers", &events).await;

    // A reader part-way through a range holds a consumer on the server...
    let mut reader = log.read_range(&room, 1, u64::MAX);
    for _ in 0..5 {
        reader.next().await.unwrap().unwrap();
    }
    assert_eq!(consumers(&log, &room).await, 1, "the reader's consumer");
    // ...until it is dropped; finished reads let theirs go too: through the client library, on
    // a connection of their own, and one that stops at a range's end inside the log.
    drop(reader);
    assert_eq!(
        log.read_range(&room, 10, 400)
            .collect()
            .await
            .unwrap()
            .len(),
        391
    );
    assert_eq!(bulk(&log, &room, 1, u64::MAX).await.len(), 2_000);
    assert_eq!(log.wire_reads(), 1);
    assert_eq!(bulk(&log, &room, 1, 1_500).await.len(), 1_500);
    // The server would drop them 30 s after their last pull; they go long before that.
    within("every consumer deleted", 10, async {
        while consumers(&log, &room).await > 0 {
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    })
    .await;
}

#[tokio::test]
async fn large_events_end_pull_requests_by_bytes_and_nothing_is_lost() {
    let server = NatsServer::start();
    let log = connect(&server.url()).await;
    // 20 KiB each: a 2 MiB request holds about a hundred, so requests end on their bytes and
    // are asked again many times over, and messages arrive split across socket reads.
    let events: Vec<Event> = (0..1_200)
        .map(|i| message(format!("{i:05}{}", "x".repeat(20 * 1024))))
        .collect();
    let room = fill(&log, "large", &events).await;
    let entries = bulk(&log, &room, 1, u64::MAX).await;
    assert_eq!(log.wire_reads(), 1);
    read_as_appended(&entries, &events);
}

#[tokio::test]
async fn bulk_reads_present_the_main_connection_s_credentials_or_use_the_client_library() {
    let server =
        NatsServer::start_with_config("authorization { user: reader, password: \"r3ad:er\" }");
    let options =
        async_nats::ConnectOptions::new().user_and_password("reader".into(), "r3ad:er".into());
    let log = RoomLog::connect_with_options(&server.url(), options, LogConfig::default())
        .await
        .unwrap();
    let events: Vec<Event> = (0..1_500).map(|i| message(format!("c{i}"))).collect();
    let room = fill(&log, "secured", &events).await;

    // Not told the credentials: the server refuses the connection, and bulk reads go through
    // the client library from then on.
    let entries = bulk(&log, &room, 1, u64::MAX).await;
    assert_eq!(entries.len(), 1_500);
    assert_eq!(log.wire_reads(), 0);
    assert_eq!(bulk(&log, &room, 1, u64::MAX).await.len(), 1_500);
    assert_eq!(log.wire_reads(), 0);

    // Told them (as chatd does with its own): on a connection of their own.
    let log = RoomLog::connect_with_options(
        &server.url(),
        async_nats::ConnectOptions::new().user_and_password("reader".into(), "r3ad:er".into()),
        LogConfig::default(),
    )
    .await
    .unwrap();
    log.set_bulk_read_auth(Some(WireAuth::UserPassword {
        user: "reader".into(),
        password: "r3ad:er".into(),
    }));
    let entries = bulk(&log, &room, 1, u64::MAX).await;
    assert_eq!(log.wire_reads(), 1);
    read_as_appended(&entries, &events);

    // Turned off: the client library.
    log.set_bulk_read_auth(None);
    assert_eq!(bulk(&log, &room, 1, u64::MAX).await.len(), 1_500);
    assert_eq!(log.wire_reads(), 1);
}

#[tokio::test]
async fn a_server_that_wants_tls_is_read_through_the_client_library() {
    let dir = tempfile::tempdir().unwrap();
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = rcgen::CertificateParams::new(vec!["127.0.0.1".to_owned()])
        .unwrap()
        .self_signed(&key)
        .unwrap();
    let (cert_file, key_file) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
    std::fs::write(&cert_file, cert.pem()).unwrap();
    std::fs::write(&key_file, key.serialize_pem()).unwrap();
    let server = NatsServer::start_with_config(&format!(
        "tls {{ cert_file: \"{}\", key_file: \"{}\" }}",
        cert_file.display(),
        key_file.display()
    ));
    // A `nats://` URL: the bulk reader tries, learns from the server's INFO that it wants TLS,
    // and leaves bulk reads to the client library (which speaks TLS) from then on.
    let options = async_nats::ConnectOptions::new()
        .add_root_certificates(cert_file.clone())
        .require_tls(true);
    let log = RoomLog::connect_with_options(&server.url(), options, LogConfig::default())
        .await
        .unwrap();
    let events: Vec<Event> = (0..1_200).map(|i| message(format!("t{i}"))).collect();
    let room = fill(&log, "tls", &events).await;
    for _ in 0..2 {
        let entries = bulk(&log, &room, 1, u64::MAX).await;
        assert_eq!(
            texts(&entries),
            events
                .iter()
                .map(|e| text_of(e).to_owned())
                .collect::<Vec<_>>()
        );
    }
    assert_eq!(log.wire_reads(), 0);
}

#[tokio::test]
async fn an_nkey_or_a_user_jwt_signs_the_bulk_connection_s_nonce() {
    let key = nkeys::KeyPair::new_user();
    let seed = key.seed().unwrap();
    let server = NatsServer::start_with_config(&format!(
        "authorization {{ users: [ {{ nkey: {} }} ] }}",
        key.public_key()
    ));
    let log = RoomLog::connect_with_options(
        &server.url(),
        async_nats::ConnectOptions::new().nkey(seed.clone()),
        LogConfig::default(),
    )
    .await
    .unwrap();
    log.set_bulk_read_auth(Some(WireAuth::Nkey(seed)));
    let events: Vec<Event> = (0..1_100).map(|i| message(format!("k{i}"))).collect();
    let room = fill(&log, "nkey", &events).await;
    assert_eq!(bulk(&log, &room, 1, u64::MAX).await.len(), 1_100);
    assert_eq!(log.wire_reads(), 1, "read on a connection of its own");

    let operator = chat_harness::OperatorMode::new();
    let server = NatsServer::start_with_config(operator.config());
    let (creds, _) = operator.creds("reader");
    let file = std::fs::read_to_string(&creds).unwrap();
    let jwt = file.lines().nth(1).unwrap().to_owned();
    let seed = file
        .lines()
        .find(|l| l.starts_with("SU"))
        .unwrap()
        .to_owned();
    let log = RoomLog::connect_with_options(
        &server.url(),
        async_nats::ConnectOptions::with_credentials_file(&creds)
            .await
            .unwrap(),
        LogConfig::default(),
    )
    .await
    .unwrap();
    log.set_bulk_read_auth(Some(WireAuth::Jwt { jwt, seed }));
    let room = fill(&log, "jwt", &events).await;
    let entries = bulk(&log, &room, 1, u64::MAX).await;
    assert_eq!(log.wire_reads(), 1, "read on a connection of its own");
    read_as_appended(&entries, &events);
}

#[tokio::test]
async fn a_bulk_read_polled_once_and_dropped_between_entries_loses_nothing() {
    use futures::FutureExt as _;
    let server = NatsServer::start();
    let log = connect(&server.url()).await;
    let events: Vec<Event> = (0..3_000).map(|i| message(format!("p{i}"))).collect();
    let room = fill(&log, "polled", &events).await;
    // As the projector reads: wait for one entry, then take what is already there without
    // waiting (a pending `next` is dropped, often mid-read of the socket), and again.
    let mut reader = log.read_range(&room, 1, u64::MAX).bulk();
    let mut entries = Vec::new();
    let mut dropped = 0;
    within("the polled read", 60, async {
        'read: while let Some(entry) = reader.next().await {
            entries.push(entry.unwrap());
            loop {
                match reader.next().now_or_never() {
                    Some(Some(entry)) => entries.push(entry.unwrap()),
                    Some(None) => break 'read,
                    None => {
                        dropped += 1;
                        break;
                    }
                }
            }
        }
    })
    .await;
    assert!(dropped > 0, "no pending read was dropped");
    assert_eq!(log.wire_reads(), 1, "read on a connection of its own");
    read_as_appended(&entries, &events);
}
