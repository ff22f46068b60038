//! The edge under trouble, against the real binary: slow readers, silent clients, floods,
//! connection caps, a drain under load, and NATS going away under attached clients.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use chat_harness::{Chatd, NatsServer};
use common::client::{seqs, Client};
use common::{api, dev_token, standalone_env, start};
use futures::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::Message;
use uuid::Uuid;

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// How long a condition a test waits for may take.
const DEADLINE: Duration = Duration::from_secs(60);

/// A metric's value from `/metrics`.
fn metric(chatd: &Chatd, name: &str) -> u64 {
    let (_, text) = chatd.get("/metrics").expect("metrics answer");
    text.lines()
        .find_map(|line| line.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or_else(|| panic!("no metric {name} in:\n{text}"))
}

/// Waits (polling, bounded) until `check` holds.
async fn eventually(what: &str, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + DEADLINE;
    while !check() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A raw WebSocket with the token in the subprotocol (for clients that misbehave on purpose).
async fn raw(chatd: &Chatd, token: &str) -> Ws {
    let mut request = chatd.ws_url().into_client_request().unwrap();
    request.headers_mut().insert(
        "Sec-WebSocket-Protocol",
        HeaderValue::from_str(&format!("chat.v1, bearer.{token}")).unwrap(),
    );
    let (ws, _) = tokio_tungstenite::connect_async(request)
        .await
        .expect("websocket connects");
    ws
}

/// A raw WebSocket whose TCP receive buffer is small (64 KiB, no autotuning): a client that
/// stops reading jams quickly.
async fn raw_small_buffer(chatd: &Chatd, token: &str) -> Ws {
    let addr: std::net::SocketAddr = chatd.http_addr().parse().unwrap();
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(64 * 1024).unwrap();
    let stream = socket.connect(addr).await.unwrap();
    let mut request = chatd.ws_url().into_client_request().unwrap();
    request.headers_mut().insert(
        "Sec-WebSocket-Protocol",
        HeaderValue::from_str(&format!("chat.v1, bearer.{token}")).unwrap(),
    );
    let (ws, _) =
        tokio_tungstenite::client_async(request, tokio_tungstenite::MaybeTlsStream::Plain(stream))
            .await
            .expect("websocket connects");
    ws
}

/// The HTTP status of an upgrade the server refuses (panics if it upgrades).
async fn refused_upgrade<R>(request: R) -> u16
where
    R: IntoClientRequest + Unpin,
{
    match tokio_tungstenite::connect_async(request).await {
        Err(tokio_tungstenite::tungstenite::Error::Http(response)) => response.status().as_u16(),
        other => panic!("expected a refusal, got {other:?}"),
    }
}

/// Reads every text frame until the server closes: the frames and the close code.
async fn read_until_closed(ws: &mut Ws) -> (Vec<Value>, u16) {
    let mut frames = Vec::new();
    loop {
        let message = tokio::time::timeout(DEADLINE, ws.next())
            .await
            .expect("a frame or a close in time");
        match message {
            Some(Ok(Message::Text(text))) => frames.push(serde_json::from_str(&text).unwrap()),
            Some(Ok(Message::Close(Some(frame)))) => return (frames, u16::from(frame.code)),
            Some(Ok(Message::Close(None))) | None => return (frames, 1005),
            Some(Ok(_)) => {}
            Some(Err(e)) => panic!("connection failed instead of closing: {e}"),
        }
    }
}

fn env_with(data: &Path, extra: &[(&'static str, &str)]) -> Vec<(&'static str, String)> {
    let mut env = standalone_env(data);
    env.extend(extra.iter().map(|(k, v)| (*k, v.to_string())));
    env
}

/// A chatd whose sessions' queues fill fast (64 KiB, 64 frames) and whose slow readers are
/// given a minute, sends not limited; `extra` last.
fn jammable_env(data: &Path, extra: &[(&'static str, &str)]) -> Vec<(&'static str, String)> {
    let mut env = env_with(
        data,
        &[
            ("CHAT_OUTBOUND_BYTES", "65536"),
            ("CHAT_OUTBOUND_FRAMES", "64"),
            ("CHAT_SLOW_CLIENT_GRACE", "60s"),
            ("CHAT_SEND_RATE", "100000/100000"),
            ("CHAT_FRAME_RATE", "100000/100000"),
        ],
    );
    env.extend(extra.iter().map(|(k, v)| (*k, v.to_string())));
    env
}

/// Ten messages of `text` to `room`, each acked.
async fn send_ten(client: &mut Client, room: &str, text: &str) {
    let ids: Vec<String> = (0..10).map(|_| Uuid::new_v4().to_string()).collect();
    for id in &ids {
        client
            .send(json!({"type":"send","rid":id,"room":room,"id":id,"text":text}))
            .await;
    }
    for id in &ids {
        let ack = client.wait_for(|f| f["rid"] == id.as_str()).await;
        assert_eq!(ack["type"], "ack", "{ack}");
    }
}

fn create_room(chatd: &Chatd, data: &Path, room: &str, owner: &str, members: &[&str]) {
    let token = dev_token(data, owner, 3600);
    let (status, body) = api(
        chatd,
        &token,
        "POST",
        "/v1/rooms",
        Some(json!({"room": room, "kind": "group", "name": room, "members": members})),
    );
    assert_eq!(status, 201, "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reader_that_stops_is_closed_with_4008_its_memory_bounded_and_it_resumes_by_seq() {
    const QUEUE_BYTES: u64 = 64 * 1024;
    let data = tempfile::tempdir().unwrap();
    let chatd = start(&env_with(
        data.path(),
        &[
            ("CHAT_OUTBOUND_BYTES", "65536"),
            ("CHAT_OUTBOUND_FRAMES", "64"),
            ("CHAT_SLOW_CLIENT_GRACE", "1s"),
            ("CHAT_SEND_RATE", "100000/100000"),
            ("CHAT_FRAME_RATE", "100000/100000"),
        ],
    ));
    create_room(&chatd, data.path(), "firehose", "alice", &["bob"]);
    let mut alice = Client::connect(&chatd.ws_url(), &dev_token(data.path(), "alice", 3600)).await;
    alice.subscribe("firehose", Some(0)).await;
    alice.events("firehose", 1).await;

    // Bob subscribes, then stops reading: his kernel buffers fill, then his queue.
    let mut bob = raw_small_buffer(&chatd, &dev_token(data.path(), "bob", 3600)).await;
    bob.send(Message::Text(
        json!({"type":"subscribe","rid":"s","rooms":{"firehose":0}})
            .to_string()
            .into(),
    ))
    .await
    .unwrap();

    // Messages of 3,900 bytes, 20 in flight, until bob is closed: far more than the socket
    // buffers (the server's send buffer autotunes up to a few MB) and the 64 KiB queue hold.
    let text = "x".repeat(3_900);
    let mut sent = 0u64;
    while metric(&chatd, "chat_edge_slow_closes_total") == 0 {
        assert!(sent < 20_000, "bob was never closed as too slow");
        let ids: Vec<String> = (0..20).map(|_| Uuid::new_v4().to_string()).collect();
        for id in &ids {
            alice
                .send(json!({"type":"send","rid":id,"room":"firehose","id":id,"text":text}))
                .await;
        }
        for id in &ids {
            let ack = alice.wait_for(|f| f["rid"] == id.as_str()).await;
            assert_eq!(ack["type"], "ack", "{ack}");
        }
        sent += 20;
        // Alice reads her own events as they come: she is not slow.
        alice.events("firehose", 20).await;
    }
    // The bound: two sessions, each holding at most its queue's bytes (one frame larger than
    // the rest would count whole). Without it bob's session would hold everything sent since
    // his socket jammed; what is beyond the queue waits in the log, not in memory.
    let peak = metric(&chatd, "chat_edge_queued_bytes_peak");
    assert!(
        peak <= 2 * (QUEUE_BYTES + 4_096),
        "queued bytes peaked at {peak}"
    );
    assert_eq!(metric(&chatd, "chat_edge_slow_closes_total"), 1);

    // Bob reads at last: what he got is gap-free from the start, then the close.
    let (frames, code) = read_until_closed(&mut bob).await;
    assert_eq!(code, 4008, "too slow to keep up");
    let events: Vec<Value> = frames
        .into_iter()
        .filter(|f| f["type"] == "event")
        .collect();
    let got = seqs(&events);
    assert!(!got.is_empty());
    assert_eq!(got, (1..=got.len() as u64).collect::<Vec<_>>());
    let head = 1 + sent;
    assert!((got.len() as u64) < head, "bob was closed before the end");

    // He reconnects and resumes from his last seq: exactly the rest.
    let mut bob = Client::connect(&chatd.ws_url(), &dev_token(data.path(), "bob", 3600)).await;
    let last = *got.last().unwrap();
    bob.subscribe("firehose", Some(last)).await;
    let rest = bob.events("firehose", (head - last) as usize).await;
    assert_eq!(seqs(&rest), (last + 1..=head).collect::<Vec<_>>());
    // Alice, who kept up, is still connected.
    let pong = alice.request(json!({"type": "ping"})).await;
    assert_eq!(pong["type"], "pong");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pings_keep_a_reading_client_and_a_silent_one_is_closed() {
    let data = tempfile::tempdir().unwrap();
    let chatd = start(&env_with(
        data.path(),
        &[
            ("CHAT_PING_INTERVAL", "100ms"),
            ("CHAT_IDLE_TIMEOUT", "600ms"),
        ],
    ));
    let token = dev_token(data.path(), "alice", 3600);
    // Silent: never reads, so never answers a ping.
    let mut silent = raw(&chatd, &token).await;
    // Reading: the client library answers every ping with a pong.
    let mut reading = raw(&chatd, &token).await;
    let mut pings = 0;
    while pings < 10 {
        match tokio::time::timeout(DEADLINE, reading.next())
            .await
            .unwrap()
        {
            Some(Ok(Message::Ping(_))) => pings += 1,
            Some(Ok(Message::Text(_) | Message::Pong(_))) => {}
            other => panic!("the reading client was closed: {other:?}"),
        }
    }
    // The silent one is closed as idle.
    eventually("the silent client to be closed", || {
        metric(&chatd, "chat_edge_idle_closes_total") == 1
    })
    .await;
    // Ten pings (a second) later, well past the idle timeout, the reading one is still served.
    reading
        .send(Message::Text(
            json!({"type":"ping","rid":"p"}).to_string().into(),
        ))
        .await
        .unwrap();
    loop {
        match tokio::time::timeout(DEADLINE, reading.next())
            .await
            .unwrap()
        {
            Some(Ok(Message::Text(text))) => {
                let frame: Value = serde_json::from_str(&text).unwrap();
                if frame["type"] == "pong" {
                    assert_eq!(frame["rid"], "p");
                    break;
                }
            }
            Some(Ok(Message::Ping(_) | Message::Pong(_))) => {}
            other => panic!("the reading client was closed: {other:?}"),
        }
    }
    assert_eq!(metric(&chatd, "chat_edge_idle_closes_total"), 1);
    // Reading now, its client library answers the queued pings; the server may have closed the
    // TCP connection by then, so the close frame is read only if it comes before that.
    let ended = tokio::time::timeout(DEADLINE, async {
        loop {
            match silent.next().await {
                Some(Ok(Message::Close(Some(frame)))) => return Some(u16::from(frame.code)),
                Some(Ok(_)) => continue,
                Some(Err(_)) | None => return None,
            }
        }
    })
    .await
    .expect("the silent connection ends");
    assert!(matches!(ended, Some(4002) | None), "{ended:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_is_rate_limited_then_closed_with_4029() {
    let data = tempfile::tempdir().unwrap();
    let chatd = start(&env_with(
        data.path(),
        &[("CHAT_SEND_RATE", "1/5"), ("CHAT_FLOOD_WINDOW", "1m")],
    ));
    create_room(&chatd, data.path(), "busy", "alice", &["bob"]);
    let mut alice = Client::connect(&chatd.ws_url(), &dev_token(data.path(), "alice", 3600)).await;
    let mut acked = 0;
    let mut limited = 0;
    let code = loop {
        let id = Uuid::new_v4().to_string();
        alice
            .send(json!({"type":"send","rid":id,"room":"busy","id":id,"text":"spam"}))
            .await;
        let reply = alice.wait_for(|f| f["rid"] == id.as_str()).await;
        match reply["code"].as_str() {
            None => {
                assert_eq!(reply["type"], "ack", "{reply}");
                acked += 1;
            }
            Some("rate_limited") => {
                assert!(reply["retry_after_ms"].as_u64().unwrap() > 0, "{reply}");
                assert_eq!(reply["room"], "busy", "the refusal names the frame's room");
                limited += 1;
                if limited == 5 {
                    // The burst (5) of refusals is allowed; the next frame is one too many.
                    alice
                        .send(json!({"type":"send","room":"busy","id":Uuid::new_v4().to_string(),"text":"spam"}))
                        .await;
                    break alice.closed().await;
                }
            }
            Some(other) => panic!("unexpected error {other}: {reply}"),
        }
    };
    assert_eq!(code, 4029, "kept flooding after being rate-limited");
    // The burst got through (a token may have refilled meanwhile); the limit is per user.
    assert!((5..=6).contains(&acked), "{acked} acked");
    assert_eq!(metric(&chatd, "chat_edge_flood_closes_total"), 1);
    let mut bob = Client::connect(&chatd.ws_url(), &dev_token(data.path(), "bob", 3600)).await;
    assert_eq!(bob.say("busy", "hello").await["type"], "ack");
}

/// A client that sends `typing` on every keystroke, far over the typing limit (default 2/5), is
/// not answered with refusals or closed with 4029: the excess is dropped, and the room still sees
/// the indicator start and end. A flood of them still meets the connection's limit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn typing_on_every_keystroke_is_coalesced_not_refused() {
    let data = tempfile::tempdir().unwrap();
    let chatd = start(&env_with(data.path(), &[("CHAT_FLOOD_WINDOW", "1m")]));
    create_room(&chatd, data.path(), "keys", "alice", &["bob"]);
    let mut alice = Client::connect(&chatd.ws_url(), &dev_token(data.path(), "alice", 3600)).await;
    let mut bob = Client::connect(&chatd.ws_url(), &dev_token(data.path(), "bob", 3600)).await;
    bob.subscribe("keys", None).await;
    for _ in 0..40 {
        alice
            .send(json!({"type": "typing", "room": "keys", "active": true}))
            .await;
    }
    alice
        .send(json!({"type": "typing", "room": "keys", "active": false}))
        .await;
    let pong = alice.request(json!({"type": "ping"})).await;
    assert_eq!(pong["type"], "pong", "{pong}");
    assert_eq!(alice.buffered(), Vec::<Value>::new(), "no answer to typing");
    let shown = bob
        .wait_for(|f| f["type"] == "typing" && f["user"] == "alice")
        .await;
    assert_eq!(shown["active"], true, "{shown}");
    let ended = bob
        .wait_for(|f| f["type"] == "typing" && f["user"] == "alice")
        .await;
    assert_eq!(ended["active"], false, "the end is never dropped: {ended}");
    // The bucket did act: of 40 within a moment, at most the burst and a refill or two passed.
    assert!(metric(&chatd, "chat_edge_rate_limited_total") >= 30);
    assert_eq!(metric(&chatd, "chat_edge_flood_closes_total"), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_websocket_pings_is_closed_with_4029_too() {
    let data = tempfile::tempdir().unwrap();
    let chatd = start(&env_with(
        data.path(),
        &[("CHAT_FRAME_RATE", "1/10"), ("CHAT_FLOOD_WINDOW", "1m")],
    ));
    let mut ws = raw(&chatd, &dev_token(data.path(), "alice", 3600)).await;
    let welcome = ws.next().await.unwrap().unwrap();
    assert!(welcome.to_text().unwrap().contains("welcome"));
    // The burst of 10, then 10 refusals allowed, then one too many: 21 pings at least, sent
    // at once (the WebSocket layer answers each with a pong meanwhile).
    for _ in 0..40 {
        if ws.send(Message::Ping(b"hi".to_vec().into())).await.is_err() {
            break;
        }
    }
    let (_, code) = read_until_closed(&mut ws).await;
    assert_eq!(code, 4029);
    assert_eq!(metric(&chatd, "chat_edge_flood_closes_total"), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_closed_for_flooding_still_gets_its_acks_and_refusals_first() {
    let data = tempfile::tempdir().unwrap();
    let chatd = start(&env_with(
        data.path(),
        &[("CHAT_SEND_RATE", "1/5"), ("CHAT_FLOOD_WINDOW", "1m")],
    ));
    create_room(&chatd, data.path(), "burst", "alice", &[]);
    let mut ws = raw(&chatd, &dev_token(data.path(), "alice", 3600)).await;
    // 40 sends written back to back, none waiting for an answer (an outbox flushed at once).
    let ids: Vec<String> = (0..40).map(|_| Uuid::new_v4().to_string()).collect();
    for id in &ids {
        let frame = json!({"type": "send", "rid": id, "room": "burst", "id": id, "text": "x"});
        ws.feed(Message::text(frame.to_string())).await.unwrap();
    }
    ws.flush().await.unwrap();
    let (frames, code) = read_until_closed(&mut ws).await;
    assert_eq!(code, 4029, "{frames:?}");
    let answers: Vec<&Value> = frames.iter().filter(|f| f["rid"].is_string()).collect();
    let acked: Vec<&str> = answers
        .iter()
        .filter(|f| f["type"] == "ack")
        .map(|f| f["rid"].as_str().unwrap())
        .collect();
    let limited = answers
        .iter()
        .filter(|f| f["code"] == "rate_limited")
        .count();
    // The burst is acked, five refusals are told, and the refusal past them closes; answers
    // come in the order of the frames.
    assert!((5..=6).contains(&acked.len()), "{answers:?}");
    assert_eq!(limited, 5, "{answers:?}");
    let answered: Vec<&str> = answers.iter().map(|f| f["rid"].as_str().unwrap()).collect();
    assert_eq!(answered, ids[..answered.len()].to_vec());
    // Every ack is a message in the room, and nothing else was appended.
    let (status, page) = api(
        &chatd,
        &dev_token(data.path(), "alice", 3600),
        "GET",
        "/v1/rooms/burst/messages?limit=100",
        None,
    );
    assert_eq!(status, 200, "{page}");
    let stored: Vec<&str> = page["events"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["kind"] == "message")
        .map(|e| e["id"].as_str().unwrap())
        .collect();
    let mut stored_sorted = stored.clone();
    stored_sorted.sort_unstable();
    let mut acked_sorted = acked.clone();
    acked_sorted.sort_unstable();
    assert_eq!(stored_sorted, acked_sorted);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_caps_refuse_with_a_clear_status() {
    let data = tempfile::tempdir().unwrap();
    let chatd = start(&env_with(
        data.path(),
        &[
            ("CHAT_MAX_CONNECTIONS", "3"),
            ("CHAT_MAX_CONNECTIONS_PER_USER", "2"),
        ],
    ));
    let alice = dev_token(data.path(), "alice", 3600);
    let _a1 = Client::connect(&chatd.ws_url(), &alice).await;
    let _a2 = Client::connect(&chatd.ws_url(), &alice).await;

    // A third session of alice: 429 before the upgrade.
    let mut request = chatd.ws_url().into_client_request().unwrap();
    request.headers_mut().insert(
        "Sec-WebSocket-Protocol",
        HeaderValue::from_str(&format!("chat.v1, bearer.{alice}")).unwrap(),
    );
    assert_eq!(refused_upgrade(request).await, 429);
    // The same by first-frame authentication: the upgrade succeeds, then close 1013.
    let (mut ws, _) = tokio_tungstenite::connect_async(chatd.ws_url())
        .await
        .unwrap();
    ws.send(Message::Text(
        json!({"type":"auth","token":alice}).to_string().into(),
    ))
    .await
    .unwrap();
    let (_, code) = read_until_closed(&mut ws).await;
    assert_eq!(code, 1013);
    // Its socket's place is free once the closing handshake is over.
    eventually("the refused socket to close", || {
        metric(&chatd, "chat_edge_sockets") == 2
    })
    .await;

    // Bob takes the last place; carol finds the edge full: 503.
    let _b = Client::connect(&chatd.ws_url(), &dev_token(data.path(), "bob", 3600)).await;
    let mut request = chatd.ws_url().into_client_request().unwrap();
    let carol = dev_token(data.path(), "carol", 3600);
    request.headers_mut().insert(
        "Sec-WebSocket-Protocol",
        HeaderValue::from_str(&format!("chat.v1, bearer.{carol}")).unwrap(),
    );
    assert_eq!(refused_upgrade(request).await, 503);
    // Counted by the cap that refused: alice's two (before and after the upgrade), carol's one.
    assert_eq!(
        metric(&chatd, r#"chat_edge_refused_total{cap="per_user"}"#),
        2
    );
    assert_eq!(
        metric(&chatd, r#"chat_edge_refused_total{cap="connections"}"#),
        1
    );
    assert_eq!(
        metric(&chatd, r#"chat_edge_refused_total{cap="unauthenticated"}"#),
        0
    );
    // A place freed is a place taken again.
    drop(_a1);
    eventually("alice's first session to end", || {
        metric(&chatd, "chat_edge_sessions") == 2
    })
    .await;
    Client::connect(&chatd.ws_url(), &carol).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sockets_waiting_for_their_auth_frame_cannot_fill_the_edge() {
    // 100 sockets at most, of which 64 (the floor) may wait for an `auth` frame.
    let data = tempfile::tempdir().unwrap();
    let chatd = start(&env_with(
        data.path(),
        &[
            ("CHAT_MAX_CONNECTIONS", "100"),
            ("CHAT_AUTH_TIMEOUT", "30s"),
        ],
    ));
    let mut waiting = Vec::new();
    for _ in 0..64 {
        let (ws, _) = tokio_tungstenite::connect_async(chatd.ws_url())
            .await
            .expect("a socket without a token is upgraded");
        waiting.push(ws);
    }
    assert_eq!(refused_upgrade(chatd.ws_url()).await, 503);
    // A client with its token in the upgrade still gets in, and so does one more waiting
    // socket once one of them has authenticated.
    let token = dev_token(data.path(), "alice", 3600);
    let mut alice = raw(&chatd, &token).await;
    assert!(alice
        .next()
        .await
        .unwrap()
        .unwrap()
        .to_text()
        .unwrap()
        .contains("welcome"));
    let first = &mut waiting[0];
    first
        .send(Message::Text(
            json!({"type":"auth","token":token}).to_string().into(),
        ))
        .await
        .unwrap();
    assert!(first
        .next()
        .await
        .unwrap()
        .unwrap()
        .to_text()
        .unwrap()
        .contains("welcome"));
    let (ws, _) = tokio_tungstenite::connect_async(chatd.ws_url())
        .await
        .expect("a place among the waiting is free again");
    waiting.push(ws);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_low_open_file_limit_lowers_the_connection_cap_so_clients_past_it_get_503() {
    // A hard limit of 256 descriptors: chatd keeps 64 for itself and 32 for HTTP connections,
    // and caps sockets at 160, instead of accepting until `accept` fails and leaving the next
    // clients unanswered.
    let data = tempfile::tempdir().unwrap();
    let env = env_with(data.path(), &[("CHAT_MAX_CONNECTIONS_PER_USER", "64")]);
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let chatd_bin = common::bin().display().to_string();
    let chatd = Chatd::start(
        Path::new("/usr/bin/prlimit"),
        &["--nofile=256:256", &chatd_bin],
        &env,
    );
    assert!(
        chatd.stderr().contains("open-file limit is too low"),
        "{}",
        chatd.stderr()
    );
    let tokens: Vec<String> = (0..4)
        .map(|i| dev_token(data.path(), &format!("user{i}"), 3600))
        .collect();
    let mut open = Vec::new();
    for i in 0..160 {
        let mut ws = raw(&chatd, &tokens[i % 4]).await;
        let welcome = ws.next().await.unwrap().unwrap();
        assert!(
            welcome.to_text().unwrap().contains("welcome"),
            "{welcome:?}"
        );
        open.push(ws);
    }
    let mut request = chatd.ws_url().into_client_request().unwrap();
    request.headers_mut().insert(
        "Sec-WebSocket-Protocol",
        HeaderValue::from_str(&format!("chat.v1, bearer.{}", tokens[0])).unwrap(),
    );
    assert_eq!(refused_upgrade(request).await, 503);
    // The process still answers on its own descriptors.
    assert_eq!(chatd.get("/readyz").map(|(status, _)| status), Some(200));
    assert_eq!(metric(&chatd, "chat_edge_sockets"), 160);
}

/// Whether the server has closed `stream` (EOF or reset), waiting at most `wait`.
fn closed_by_server(stream: &mut std::net::TcpStream, wait: Duration) -> bool {
    use std::io::Read;
    stream.set_read_timeout(Some(wait)).unwrap();
    let mut buf = [0u8; 256];
    loop {
        match stream.read(&mut buf) {
            Ok(0) => return true,
            Ok(_) => continue,
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return true,
            Err(_) => return false,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_that_never_finish_a_request_are_bounded_and_timed_out() {
    use std::io::Write;
    let data = tempfile::tempdir().unwrap();
    let chatd = start(&env_with(
        data.path(),
        &[
            ("CHAT_MAX_HTTP_CONNECTIONS", "8"),
            ("CHAT_HTTP_HEADER_TIMEOUT", "2s"),
            ("CHAT_DRAIN_GRACE", "30s"),
        ],
    ));
    // WebSocket sessions are not HTTP connections once upgraded: more than 8 of them are fine.
    let token = dev_token(data.path(), "alice", 3600);
    let mut sessions = Vec::new();
    for _ in 0..10 {
        let mut ws = raw(&chatd, &token).await;
        assert!(ws
            .next()
            .await
            .unwrap()
            .unwrap()
            .to_text()
            .unwrap()
            .contains("welcome"));
        sessions.push(ws);
    }
    // Eight clients send half a request and stop; a ninth waits to be accepted.
    let connect = || std::net::TcpStream::connect(chatd.http_addr()).unwrap();
    let mut stalled: Vec<std::net::TcpStream> = (0..8)
        .map(|_| {
            let mut stream = connect();
            stream
                .write_all(b"GET /v1/me HTTP/1.1\r\nHost: x\r\n")
                .unwrap();
            stream
        })
        .collect();
    let (http, stalled_at) = (chatd.http_addr().to_owned(), std::time::Instant::now());
    let waiting = std::thread::spawn(move || chat_harness::http_get_addr(&http, "/healthz"));
    // The stalled ones are closed by the header timeout (2 s), and only then is the ninth
    // served: it waited in the listen queue instead of being turned away.
    for stream in &mut stalled {
        assert!(
            closed_by_server(stream, DEADLINE),
            "a stalled request stays open"
        );
    }
    let answer = waiting.join().unwrap();
    assert_eq!(answer.map(|(status, _)| status), Some(200));
    assert!(
        stalled_at.elapsed() >= Duration::from_millis(1_500),
        "served before a place was free"
    );
    assert!(metric(&chatd, "chat_http_accept_waits_total") >= 1);
    for ws in &mut sessions {
        ws.send(Message::Text(r#"{"type":"ping","rid":"p"}"#.into()))
            .await
            .unwrap();
        let pong = ws.next().await.unwrap().unwrap();
        assert!(pong.to_text().unwrap().contains("pong"), "{pong:?}");
    }

    // A drain does not wait for a request that never comes.
    let mut stalled = connect();
    stalled.write_all(b"GET /v1/me HTTP/1.1\r\n").unwrap();
    drop(sessions);
    let mut chatd = chatd;
    chatd.signal(nix::sys::signal::Signal::SIGTERM);
    let status = chatd
        .wait_exit(DEADLINE)
        .expect("chatd exits after SIGTERM");
    assert!(status.success(), "{}", chatd.stderr());
    assert!(
        !chatd.stderr().contains("drain grace elapsed"),
        "{}",
        chatd.stderr()
    );
}

/// A body sent a byte at a time holds its HTTP connection no longer than the request timeout:
/// the answer is `503` and the connection closes.
#[test]
fn a_request_body_that_never_finishes_is_timed_out() {
    use std::io::{Read, Write};
    let data = tempfile::tempdir().unwrap();
    let chatd = start(&env_with(
        data.path(),
        &[("CHAT_HTTP_REQUEST_TIMEOUT", "1s")],
    ));
    let token = dev_token(data.path(), "alice", 3600);
    let mut stream = std::net::TcpStream::connect(chatd.http_addr()).unwrap();
    stream
        .write_all(
            format!(
                "POST /v1/rooms HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\n\
                 Content-Type: application/json\r\nContent-Length: 100000\r\n\r\n{{"
            )
            .as_bytes(),
        )
        .unwrap();
    // Trickle the body until the server answers (a byte every 200 ms: never done in time).
    let mut answer = Vec::new();
    let mut buf = [0u8; 4096];
    let started = std::time::Instant::now();
    stream
        .set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    loop {
        assert!(started.elapsed() < DEADLINE, "no answer to a trickled body");
        match stream.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => answer.extend_from_slice(&buf[..n]),
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                if !answer.is_empty() {
                    continue;
                }
                if stream.write_all(b" ").is_err() {
                    break;
                }
            }
            Err(_) => break,
        }
    }
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 503"), "{answer}");
    assert!(answer.contains("not received and answered"), "{answer}");
    // And the process still serves, and counts the request with its answer.
    let (status, _) = chatd.get("/healthz").unwrap();
    assert_eq!(status, 200);
    let (status, metrics) = chatd.get("/metrics").unwrap();
    assert_eq!(status, 200);
    assert!(
        metrics.lines().any(|line| {
            line.starts_with("http_server_request_duration_seconds_count{")
                && line.contains(r#"http_route="/v1/rooms""#)
                && line.contains(r#"http_response_status_code="503""#)
        }),
        "{metrics}"
    );
}

/// Probes and scrapes on `CHAT_OPS_LISTEN` are answered while the HTTP listener holds its
/// `CHAT_MAX_HTTP_CONNECTIONS`, and through a drain, where readiness turns 503 there too.
#[test]
fn the_ops_listener_answers_while_the_http_listener_is_full_and_through_a_drain() {
    use std::io::Write;
    let data = tempfile::tempdir().unwrap();
    let mut chatd = start(&env_with(
        data.path(),
        &[
            ("CHAT_OPS_LISTEN", "127.0.0.1:0"),
            ("CHAT_MAX_HTTP_CONNECTIONS", "1"),
            ("CHAT_HTTP_HEADER_TIMEOUT", "60s"),
            ("CHAT_DRAIN_DELAY", "60s"),
        ],
    ));
    let ops = chatd
        .ops_addr()
        .expect("an ops line before the ready line")
        .to_owned();
    assert_ne!(ops, chatd.http_addr());
    let get =
        |path: &str| chat_harness::http_get_addr(&ops, path).expect("the ops listener answers");
    // The HTTP listener's one place, held by half a request head.
    let mut held = std::net::TcpStream::connect(chatd.http_addr()).unwrap();
    held.write_all(b"GET /healthz HTTP/1.1\r\n").unwrap();
    // Its accept loop then waits for a place to free up; the ops listener says so.
    let deadline = Instant::now() + DEADLINE;
    loop {
        let (status, text) = get("/metrics");
        assert_eq!(status, 200, "{text}");
        let waits = text.lines().find_map(|line| {
            line.strip_prefix("chat_http_accept_waits_total ")?
                .parse::<u64>()
                .ok()
        });
        if waits.is_some_and(|w| w >= 1) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the HTTP listener never filled:\n{text}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let (status, body) = get("/readyz");
    assert_eq!(status, 200, "{body}");
    assert!(body.contains(r#""nats":"connected""#), "{body}");
    assert_eq!(get("/healthz").0, 200);
    // Nothing a client uses is served there.
    assert_eq!(get("/v1/me").0, 404);
    // A drain: not ready, on the ops listener as well.
    chatd.signal(nix::sys::signal::Signal::SIGTERM);
    loop {
        let (status, body) = get("/readyz");
        if status == 503 {
            assert!(body.contains("draining"), "{body}");
            break;
        }
        assert_eq!(status, 200, "{body}");
        assert!(Instant::now() < deadline, "readiness never turned 503");
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(get("/healthz").0, 200);
    // A second signal ends the drain at once.
    chatd.signal(nix::sys::signal::Signal::SIGTERM);
    assert!(chatd.wait_exit(DEADLINE).is_some(), "{}", chatd.stderr());
    drop(held);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drain_under_load_closes_with_1001_and_loses_no_acked_message() {
    let data = tempfile::tempdir().unwrap();
    let env = env_with(
        data.path(),
        &[
            ("CHAT_SEND_RATE", "100000/100000"),
            ("CHAT_FRAME_RATE", "100000/100000"),
            ("CHAT_DRAIN_GRACE", "20s"),
        ],
    );
    let mut chatd = start(&env);
    create_room(&chatd, data.path(), "drained", "alice", &[]);
    let token = dev_token(data.path(), "alice", 3600);
    let mut ws = raw(&chatd, &token).await;

    // Keep 32 sends in flight while the drain begins.
    let mut sent = Vec::new();
    let mut acks = std::collections::HashMap::new();
    let mut code = None;
    let mut signalled = false;
    while code.is_none() {
        while sent.len() - acks.len() < 32 && code.is_none() {
            let id = Uuid::new_v4().to_string();
            let frame = json!({"type":"send","rid":id,"room":"drained","id":id,"text":"in flight"});
            if ws
                .send(Message::Text(frame.to_string().into()))
                .await
                .is_err()
            {
                break;
            }
            sent.push(id);
        }
        if !signalled && acks.len() >= 200 {
            chatd.signal(nix::sys::signal::Signal::SIGTERM);
            signalled = true;
        }
        match tokio::time::timeout(DEADLINE, ws.next()).await.unwrap() {
            Some(Ok(Message::Text(text))) => {
                let frame: Value = serde_json::from_str(&text).unwrap();
                if frame["type"] == "ack" {
                    acks.insert(
                        frame["id"].as_str().unwrap().to_owned(),
                        frame["seq"].as_u64().unwrap(),
                    );
                } else {
                    assert_eq!(frame["type"], "welcome", "{frame}");
                }
            }
            Some(Ok(Message::Close(Some(frame)))) => code = Some(u16::from(frame.code)),
            Some(Ok(_)) => {}
            other => panic!(
                "connection ended without a close frame: {other:?}\n{}",
                chatd.stderr()
            ),
        }
    }
    assert_eq!(code, Some(1001), "server draining");
    assert!(
        chatd.wait_exit(DEADLINE).is_some(),
        "chatd exits after the drain"
    );

    // Every acknowledged message is in the log with the acknowledged sequence.
    let chatd = start(&env);
    let mut reader = Client::connect(&chatd.ws_url(), &token).await;
    let subscribed = reader.subscribe("drained", Some(0)).await;
    let head = subscribed["head"].as_u64().unwrap();
    let events = reader.events("drained", head as usize).await;
    let logged: std::collections::HashMap<String, u64> = events
        .iter()
        .filter(|e| e["kind"] == "message")
        .map(|e| {
            (
                e["id"].as_str().unwrap().to_owned(),
                e["seq"].as_u64().unwrap(),
            )
        })
        .collect();
    assert!(acks.len() >= 200);
    for (id, seq) in &acks {
        assert_eq!(logged.get(id), Some(seq), "acked {id} at {seq}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_restarted_under_an_edge_gives_no_false_ack_and_service_resumes() {
    let mut nats = NatsServer::start_with_jetstream("");
    let data = tempfile::tempdir().unwrap();
    let mut env = env_with(
        data.path(),
        &[("CHAT_NATS_TIMEOUT", "1s"), ("CHAT_APPEND_RETRY", "1s")],
    );
    env.push(("NATS_URL", nats.url()));
    let chatd = start(&env);
    create_room(&chatd, data.path(), "sturdy", "alice", &["bob", "dave"]);
    let mut alice = Client::connect(&chatd.ws_url(), &dev_token(data.path(), "alice", 3600)).await;
    let mut bob = Client::connect(&chatd.ws_url(), &dev_token(data.path(), "bob", 3600)).await;
    bob.subscribe("sturdy", Some(0)).await;
    bob.events("sturdy", 1).await;

    nats.kill();
    let id = Uuid::new_v4();
    let answer = alice.say_with_id("sturdy", "while nats is away", id).await;
    assert_eq!(
        answer["type"], "error",
        "never an ack without the log: {answer}"
    );
    assert_eq!(answer["code"], "unavailable", "{answer}");
    // What failed, in the service's words: what the client library said stays in the log.
    let message = answer["message"].as_str().unwrap();
    assert!(
        message.starts_with("room sturdy: append")
            && (message.ends_with(": the log is unavailable") || message.ends_with(" timed out")),
        "{answer}"
    );
    // The sockets stay open meanwhile.
    assert_eq!(alice.request(json!({"type":"ping"})).await["type"], "pong");
    // A member whose room list cannot be read now (their block list is not cached) is not
    // welcomed into no rooms: close 1013, reconnect later.
    let dave = dev_token(data.path(), "dave", 3600);
    let (mut ws, _) = tokio_tungstenite::connect_async(chatd.ws_url())
        .await
        .unwrap();
    ws.send(Message::Text(
        json!({"type":"auth","token":dave}).to_string().into(),
    ))
    .await
    .unwrap();
    let (frames, code) = read_until_closed(&mut ws).await;
    assert_eq!(code, 1013, "{frames:?}");
    assert!(!frames.iter().any(|f| f["type"] == "welcome"), "{frames:?}");

    nats.start_again();
    eventually("readiness after nats returns", || {
        chatd
            .get("/readyz?nats=required")
            .is_some_and(|(status, _)| status == 200)
    })
    .await;
    // The retry with the same id appends it once, whatever happened to the first attempt.
    let ack = loop {
        let answer = alice.say_with_id("sturdy", "while nats is away", id).await;
        if answer["type"] == "ack" {
            break answer;
        }
        assert_eq!(answer["code"], "unavailable", "{answer}");
    };
    let seq = ack["seq"].as_u64().unwrap();
    let event = bob
        .wait_for(|f| f["type"] == "event" && f["kind"] == "message")
        .await;
    assert_eq!(event["seq"].as_u64(), Some(seq));
    assert_eq!(event["id"], id.to_string());
    // And the room goes on.
    let next = alice.say("sturdy", "after").await;
    assert_eq!(next["seq"].as_u64(), Some(seq + 1), "{next}");
    let after = bob.events("sturdy", 1).await;
    assert_eq!(after[0]["text"], "after");
    let dave = Client::connect(&chatd.ws_url(), &dave).await;
    assert!(dave.welcome_room("sturdy").is_some(), "{}", dave.welcome);
}

/// The next text frame of `ws`, as JSON (pings and pongs skipped); a close fails the test.
async fn next_json(ws: &mut Ws) -> Value {
    loop {
        match tokio::time::timeout(DEADLINE, ws.next()).await.unwrap() {
            Some(Ok(Message::Text(text))) => return serde_json::from_str(&text).unwrap(),
            Some(Ok(Message::Ping(_) | Message::Pong(_))) => {}
            other => panic!("closed: {other:?}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_reader_loses_typing_frames_first_and_never_an_event() {
    let data = tempfile::tempdir().unwrap();
    let chatd = start(&jammable_env(
        data.path(),
        // No indicator ends by itself during the test: only what the typists send ends them.
        &[
            ("CHAT_TYPING_RATE", "100000/100000"),
            ("CHAT_TYPING_TIMEOUT", "10m"),
        ],
    ));
    // Typists: each user is shown at most one active:true (and its active:false) per 2 s, so it
    // takes several for bob's queue to fill with their frames.
    let typist_names: Vec<String> = (0..16).map(|i| format!("typist{i}")).collect();
    let mut members = vec!["bob", "sticky"];
    members.extend(typist_names.iter().map(String::as_str));
    create_room(&chatd, data.path(), "lagging", "alice", &members);
    let mut alice = Client::connect(&chatd.ws_url(), &dev_token(data.path(), "alice", 3600)).await;
    let mut typists = Vec::new();
    for name in &typist_names {
        typists.push(Client::connect(&chatd.ws_url(), &dev_token(data.path(), name, 3600)).await);
    }
    let mut sticky =
        Client::connect(&chatd.ws_url(), &dev_token(data.path(), "sticky", 3600)).await;
    let mut bob = raw_small_buffer(&chatd, &dev_token(data.path(), "bob", 3600)).await;
    bob.send(Message::Text(
        json!({"type":"subscribe","rid":"s","rooms":{"lagging":0}})
            .to_string()
            .into(),
    ))
    .await
    .unwrap();
    // Before the jam, bob is shown that sticky is typing (the room's first event may come
    // meanwhile).
    let mut events = Vec::new();
    tokio::time::timeout(DEADLINE, async {
        while next_json(&mut bob).await["type"] != "subscribed" {}
        sticky
            .send(json!({"type":"typing","room":"lagging","active":true}))
            .await;
        loop {
            let frame = next_json(&mut bob).await;
            if frame["type"] == "event" {
                events.push(frame);
            } else if frame["type"] == "typing" && frame["user"] == "sticky" {
                assert_eq!(frame["active"], true, "{frame}");
                break;
            }
        }
    })
    .await
    .expect("bob shown sticky typing");

    // Jam bob's session: his socket fills first (the server's send buffer grows for a while),
    // then his writer waits on it while his queue fills with typing frames. The typists start
    // and stop all along, in turn. Bob is the only subscriber, so every dropped typing frame is
    // his.
    let text = "y".repeat(3_900);
    let mut sent = 0u64;
    let mut signals = 0u64;
    while metric(&chatd, "chat_edge_ephemeral_dropped_total") == 0 {
        assert!(sent < 20_000, "no typing frame was ever dropped for bob");
        send_ten(&mut alice, "lagging", &text).await;
        sent += 10;
        let typist = &mut typists[(sent / 10) as usize % typist_names.len()];
        for active in [true, false] {
            typist
                .send(json!({"type":"typing","room":"lagging","active":active}))
                .await;
        }
        signals += 2;
    }
    // A reader that keeps up gets them (shown within 2 s of the typist's last one).
    alice.subscribe("lagging", None).await;
    typists[0]
        .send(json!({"type":"typing","room":"lagging","active":true}))
        .await;
    // (An active:false of the loop may still be on its way: the active:true is what counts.)
    let seen = alice
        .wait_for(|f| f["type"] == "typing" && f["active"] == true && f["user"] == "typist0")
        .await;
    assert_eq!(seen["room"], "lagging");
    // Sticky stops typing while bob's queue is still jammed: his copy of that is dropped. Alice
    // seeing it means the room's feed has handed it to every session here.
    sticky
        .send(json!({"type":"typing","room":"lagging","active":false}))
        .await;
    alice
        .wait_for(|f| f["type"] == "typing" && f["active"] == false && f["user"] == "sticky")
        .await;

    // Bob reads at last: every event, in order, and not closed.
    let head = 1 + sent;
    let mut typing = Vec::new();
    while events
        .last()
        .map_or(0, |e: &Value| e["seq"].as_u64().unwrap())
        < head
    {
        match tokio::time::timeout(DEADLINE, bob.next()).await.unwrap() {
            Some(Ok(Message::Text(text))) => {
                let frame: Value = serde_json::from_str(&text).unwrap();
                match frame["type"].as_str() {
                    Some("event") => events.push(frame),
                    Some("typing") => typing.push(frame),
                    _ => {}
                }
            }
            Some(Ok(Message::Ping(_) | Message::Pong(_))) => {}
            other => panic!("bob was closed: {other:?}"),
        }
    }
    assert_eq!(seqs(&events), (1..=head).collect::<Vec<_>>());
    // The typists' indicators that came while his queue had room reached him (the first ones
    // at least); those that came while it was half full were dropped (the loop above waited
    // for that), and no event was.
    assert!(
        !typing.is_empty(),
        "none of {} typing signals reached bob",
        signals + 1
    );
    assert!(metric(&chatd, "chat_edge_ephemeral_dropped_total") >= 1);
    // The last typing frame dropped for him is sent once his queue has room: sticky's
    // indicator, shown before the jam, ends for him too (within the deadline of each read).
    let sticky_typing = |typing: &[Value]| {
        typing
            .iter()
            .rev()
            .find(|f| f["user"] == "sticky")
            .map(|f| f["active"].clone())
    };
    tokio::time::timeout(DEADLINE, async {
        while sticky_typing(&typing) != Some(json!(false)) {
            let frame = next_json(&mut bob).await;
            if frame["type"] == "typing" {
                typing.push(frame);
            }
        }
    })
    .await
    .expect("sticky's indicator never ended for bob");
    assert_eq!(metric(&chatd, "chat_edge_slow_closes_total"), 0);
}

/// A slow reader loses presence frames too, and is told so: once its queue has room again it
/// gets one `changed` frame for the room, after which the presence endpoint says who is online
/// (the frames it lost are not sent late: they may be stale by then).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_reader_that_lost_presence_frames_is_told_presence_changed() {
    let data = tempfile::tempdir().unwrap();
    let chatd = start(&jammable_env(
        data.path(),
        &[
            ("CHAT_HISTORY_RATE", "100000/100000"),
            ("CHAT_PRESENCE_INTERVAL", "50ms"),
        ],
    ));
    let churner_names: Vec<String> = (0..6).map(|i| format!("churner{i}")).collect();
    let mut members = vec!["bob"];
    members.extend(churner_names.iter().map(String::as_str));
    create_room(&chatd, data.path(), "lagging", "alice", &members);
    let mut alice = Client::connect(&chatd.ws_url(), &dev_token(data.path(), "alice", 3600)).await;
    let bob_token = dev_token(data.path(), "bob", 3600);
    let mut bob = raw_small_buffer(&chatd, &bob_token).await;
    bob.send(Message::Text(
        json!({"type":"subscribe","rid":"s","rooms":{"lagging":0}})
            .to_string()
            .into(),
    ))
    .await
    .unwrap();
    let online_now = || {
        let (status, body) = api(
            &chatd,
            &bob_token,
            "GET",
            "/v1/rooms/lagging/presence",
            None,
        );
        assert_eq!(status, 200, "{body}");
        body["online"].clone()
    };

    // Jam bob's session (as above), while the churners come and go in turn: each change is
    // shown (the endpoint follows what the frames show) before the next.
    let text = "y".repeat(3_900);
    let mut churners: Vec<Option<Client>> = churner_names.iter().map(|_| None).collect();
    let mut sent = 0u64;
    let mut turn = 0;
    while metric(&chatd, "chat_edge_ephemeral_dropped_total") == 0 {
        assert!(sent < 20_000, "no presence frame was ever dropped for bob");
        send_ten(&mut alice, "lagging", &text).await;
        sent += 10;
        let i = turn % churners.len();
        turn += 1;
        match churners[i].take() {
            Some(churner) => drop(churner),
            None => {
                let token = dev_token(data.path(), &churner_names[i], 3600);
                let mut churner = Client::connect(&chatd.ws_url(), &token).await;
                churner.subscribe("lagging", None).await;
                churners[i] = Some(churner);
            }
        }
        let mut expected: Vec<&str> = churners
            .iter()
            .zip(&churner_names)
            .filter(|(c, _)| c.is_some())
            .map(|(_, name)| name.as_str())
            .collect();
        expected.push("bob");
        expected.sort();
        eventually("the change shown", || online_now() == json!(expected)).await;
    }

    // Bob reads at last: every event in order, then (once his queue had room) one `changed`.
    let head = 1 + sent;
    let mut last_seq = 0;
    let mut changed = None;
    // One deadline for all of it: pings keep coming whatever else does not.
    let until = tokio::time::Instant::now() + DEADLINE;
    while last_seq < head || changed.is_none() {
        let next = tokio::time::timeout_at(until, bob.next()).await;
        let next = next.unwrap_or_else(|_| {
            panic!("after {DEADLINE:?}: events up to {last_seq} of {head}, changed: {changed:?}")
        });
        match next {
            Some(Ok(Message::Text(text))) => {
                let frame: Value = serde_json::from_str(&text).unwrap();
                match frame["type"].as_str() {
                    Some("event") => {
                        let seq = frame["seq"].as_u64().unwrap();
                        assert_eq!(seq, last_seq + 1, "events in order, none lost");
                        last_seq = seq;
                    }
                    Some("presence") if frame.get("changed").is_some() => {
                        changed = Some(frame);
                    }
                    _ => {}
                }
            }
            Some(Ok(Message::Ping(_) | Message::Pong(_))) => {}
            other => panic!("bob was closed: {other:?}"),
        }
    }
    let changed = changed.unwrap();
    assert_eq!(changed["room"], "lagging", "{changed}");
    assert!(changed["changed"].as_u64().unwrap() >= 1, "{changed}");
    assert_eq!(metric(&chatd, "chat_edge_slow_closes_total"), 0);
}

/// A nats-server that hangs (stopped, not gone: the socket stays open) is found by pings
/// within seconds: readiness with `?nats=required` answers 503 and the metrics say so; once
/// it answers again the edge reconnects by itself.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_nats_server_is_found_by_pings_and_readiness_says_so() {
    use nix::sys::signal::{kill, Signal};
    use nix::unistd::Pid;
    let nats = NatsServer::start_with_jetstream("");
    let data = tempfile::tempdir().unwrap();
    let mut env = env_with(data.path(), &[]);
    env.push(("NATS_URL", nats.url()));
    let chatd = start(&env);
    let ready = |chatd: &Chatd| chatd.get("/readyz?nats=required").map(|(status, _)| status);
    assert_eq!(ready(&chatd).unwrap(), 200);
    assert_eq!(metric(&chatd, "chat_nats_connected"), 1);
    let pid = Pid::from_raw(nats.pid().unwrap() as i32);
    kill(pid, Signal::SIGSTOP).unwrap();
    // The client library's default would take some 3 minutes (60 s pings, two missed); the
    // deadline here is well below that.
    let hung = Instant::now();
    eventually("readiness to say NATS is gone", || {
        assert!(
            hung.elapsed() < Duration::from_secs(60),
            "still ready after 60 s"
        );
        ready(&chatd).is_some_and(|status| status == 503)
    })
    .await;
    assert_eq!(metric(&chatd, "chat_nats_connected"), 0);
    kill(pid, Signal::SIGCONT).unwrap();
    eventually("readiness back", || ready(&chatd).is_some_and(|s| s == 200)).await;
    assert_eq!(metric(&chatd, "chat_nats_connected"), 1);
    assert!(metric(&chatd, "chat_nats_reconnects_total") >= 1);
}

/// A client that writes many frames without waiting: its appends are pipelined, but every
/// reply still comes in the order of the frames, a non-append frame is answered after the
/// appends before it, a refusal in the middle keeps its place, a resend of an id inside the
/// pipeline acks the original, and the log holds the sends in the order they were written.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelined_appends_are_answered_and_stored_in_the_clients_order() {
    let data = tempfile::tempdir().unwrap();
    let env = env_with(
        data.path(),
        &[
            ("CHAT_SEND_RATE", "100000/100000"),
            ("CHAT_FRAME_RATE", "100000/100000"),
            ("CHAT_APPENDS_IN_FLIGHT", "16"),
        ],
    );
    let chatd = start(&env);
    create_room(&chatd, data.path(), "piped", "alice", &[]);
    let token = dev_token(data.path(), "alice", 3600);
    let mut ws = raw(&chatd, &token).await;

    // 200 frames written at once: sends, a ping at 50, a refused send (no such room) at 100,
    // a resend of frame 10's id at 150.
    let ids: Vec<Uuid> = (0..200).map(|_| Uuid::new_v4()).collect();
    for (i, id) in ids.iter().enumerate() {
        let frame = match i {
            50 => json!({"type": "ping", "rid": "50"}),
            100 => json!({"type": "send", "rid": "100", "room": "nowhere", "id": id, "text": "x"}),
            150 => {
                json!({"type": "send", "rid": "150", "room": "piped", "id": ids[10], "text": "again"})
            }
            _ => {
                json!({"type": "send", "rid": i.to_string(), "room": "piped", "id": id, "text": format!("m{i}")})
            }
        };
        ws.feed(Message::Text(frame.to_string().into()))
            .await
            .unwrap();
    }
    ws.flush().await.unwrap();

    let mut replies = Vec::new();
    while replies.len() < 200 {
        let message = tokio::time::timeout(DEADLINE, ws.next())
            .await
            .expect("a reply in time");
        if let Some(Ok(Message::Text(text))) = message {
            let frame: Value = serde_json::from_str(&text).unwrap();
            if frame["type"] != "welcome" {
                replies.push(frame);
            }
        }
    }
    let rids: Vec<String> = replies
        .iter()
        .map(|r| r["rid"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(
        rids,
        (0..200).map(|i| i.to_string()).collect::<Vec<_>>(),
        "replies in order"
    );
    assert_eq!(replies[50]["type"], "pong");
    assert_eq!(
        (&replies[100]["type"], &replies[100]["code"]),
        (&json!("error"), &json!("not_found"))
    );
    assert_eq!(replies[150]["type"], "ack");
    assert_eq!(replies[150]["duplicate"], true);
    assert_eq!(replies[150]["seq"], replies[10]["seq"]);
    let acked: Vec<u64> = replies
        .iter()
        .enumerate()
        .filter(|(i, _)| ![50, 100, 150].contains(i))
        .map(|(_, r)| {
            assert_eq!(
                (&r["type"], &r["duplicate"]),
                (&json!("ack"), &json!(false)),
                "{r}"
            );
            r["seq"].as_u64().unwrap()
        })
        .collect();
    assert!(
        acked.windows(2).all(|w| w[0] + 1 == w[1]),
        "stored in the order written: {acked:?}"
    );

    // The log agrees: the texts in sequence order are the frames' order.
    let mut reader = Client::connect(&chatd.ws_url(), &token).await;
    reader.subscribe("piped", Some(acked[0] - 1)).await;
    let events = reader.events("piped", acked.len()).await;
    let texts: Vec<&str> = events.iter().map(|e| e["text"].as_str().unwrap()).collect();
    let expected: Vec<String> = (0..200)
        .filter(|i| ![50, 100, 150].contains(i))
        .map(|i| format!("m{i}"))
        .collect();
    assert_eq!(texts, expected);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drain_whose_grace_runs_out_while_nats_is_away_still_closes_with_1001() {
    let mut nats = NatsServer::start_with_jetstream("");
    let data = tempfile::tempdir().unwrap();
    // Membership is read from the log for every frame, and a NATS request may take 30 s: the
    // drain's second of grace runs out while the session waits on one.
    let mut env = env_with(
        data.path(),
        &[
            ("CHAT_NATS_TIMEOUT", "30s"),
            ("CHAT_MEMBERSHIP_TTL", "1ms"),
            ("CHAT_DRAIN_GRACE", "1s"),
        ],
    );
    env.push(("NATS_URL", nats.url()));
    let mut chatd = start(&env);
    create_room(&chatd, data.path(), "stuck", "alice", &[]);
    let mut alice = Client::connect(&chatd.ws_url(), &dev_token(data.path(), "alice", 3600)).await;
    assert_eq!(alice.say("stuck", "before").await["type"], "ack");

    nats.kill();
    alice
        .send(json!({"type": "read", "room": "stuck", "seq": 2}))
        .await;
    chatd.signal(nix::sys::signal::Signal::SIGTERM);
    // The session is still waiting on NATS when the grace is over: it gets its close frame
    // all the same, rather than a dropped socket.
    assert_eq!(alice.closed().await, 1001);
    assert!(chatd.wait_exit(DEADLINE).is_some(), "chatd exits");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_requests_draw_on_the_users_rate_limits() {
    let data = tempfile::tempdir().unwrap();
    // Rates of one a second: nothing refills in the moments the test takes.
    let chatd = start(&env_with(
        data.path(),
        &[("CHAT_HISTORY_RATE", "1/3"), ("CHAT_MANAGE_RATE", "1/2")],
    ));
    let alice = dev_token(data.path(), "alice", 3600);
    let bob = dev_token(data.path(), "bob", 3600);
    let auth = format!("Bearer {alice}");
    let exchange = |method: &str, path: &str, body: Option<&str>| {
        chat_harness::http_exchange(
            chatd.http_addr(),
            method,
            path,
            &[("Authorization", auth.as_str())],
            body,
        )
        .expect("an answer")
    };
    // Changes: two rooms (the burst), then a refusal with Retry-After.
    for room in ["r1", "r2"] {
        let body = json!({"room": room, "kind": "group"}).to_string();
        let (status, _, answer) = exchange("POST", "/v1/rooms", Some(&body));
        assert_eq!(status, 201, "{answer}");
    }
    let body = json!({"room": "r3", "kind": "group"}).to_string();
    let (status, head, answer) = exchange("POST", "/v1/rooms", Some(&body));
    assert_eq!(status, 429, "{answer}");
    let answer: Value = serde_json::from_str(&answer).unwrap();
    assert_eq!(answer["error"]["code"], "rate_limited", "{answer}");
    assert!(
        head.lines()
            .any(|l| l.to_ascii_lowercase().starts_with("retry-after: ")),
        "{head}"
    );
    // Reads: the history bucket, shared with the WebSocket's history frames.
    for _ in 0..3 {
        let (status, _, answer) = exchange("GET", "/v1/rooms/r1/messages", None);
        assert_eq!(status, 200, "{answer}");
    }
    let (status, _, answer) = exchange("GET", "/v1/rooms", None);
    assert_eq!(status, 429, "{answer}");
    let mut ws = Client::connect(&chatd.ws_url(), &alice).await;
    let history = ws.request(json!({"type": "history", "room": "r1"})).await;
    assert_eq!(history["code"], "rate_limited", "{history}");
    // Another user's allowance is their own.
    let (status, rooms) = api(&chatd, &bob, "GET", "/v1/rooms", None);
    assert_eq!(status, 200, "{rooms}");
    assert!(metric(&chatd, "chat_http_rate_limited_total") >= 2);
}

/// A `subscribe` costs one token per room it names: a frame of many rooms is as much work as as
/// many frames of one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscribe_draws_one_token_per_room() {
    let data = tempfile::tempdir().unwrap();
    let chatd = start(&env_with(data.path(), &[("CHAT_SUBSCRIBE_RATE", "1/50")]));
    let alice = dev_token(data.path(), "alice", 3600);
    for room in ["s1", "s2", "s3"] {
        let body = json!({"room": room, "kind": "group"});
        let (status, answer) = api(&chatd, &alice, "POST", "/v1/rooms", Some(body));
        assert_eq!(status, 201, "{answer}");
    }
    let mut ws = Client::connect(&chatd.ws_url(), &alice).await;
    // 16 frames of 3 rooms take 48 of the 50 tokens; by one a frame, 50 frames would pass.
    let mut passed = 0;
    let refused = loop {
        let frame = json!({"type": "subscribe", "rooms": {"s1": null, "s2": null, "s3": null}});
        let reply = ws.request(frame).await;
        if reply["type"] == "error" {
            break reply;
        }
        assert_eq!(reply["type"], "subscribed", "{reply}");
        // The other two rooms' replies.
        ws.wait_for(|f| f["type"] == "subscribed" && f["room"] == "s3")
            .await;
        passed += 1;
        assert!(
            passed <= 20,
            "{passed} frames of 3 rooms passed a burst of 50"
        );
    };
    assert_eq!(refused["code"], "rate_limited", "{refused}");
    assert!(passed >= 16, "refused after {passed} frames: {refused}");
}

/// Frames about a room the connection does not follow may each cost the edge a read of the log
/// (is the sender a member?), so they draw on the user's history bucket: a stranger repeating
/// them is limited, then closed with 4029. Members' frames about rooms they follow are not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn frames_about_rooms_not_followed_draw_on_the_history_limit() {
    let data = tempfile::tempdir().unwrap();
    let chatd = start(&env_with(
        data.path(),
        &[("CHAT_HISTORY_RATE", "1/5"), ("CHAT_FLOOD_WINDOW", "1m")],
    ));
    create_room(&chatd, data.path(), "secret", "alice", &[]);

    let mut alice = Client::connect(&chatd.ws_url(), &dev_token(data.path(), "alice", 3600)).await;
    assert_eq!(
        alice.subscribe("secret", Some(0)).await["type"],
        "subscribed"
    );
    for _ in 0..20 {
        alice
            .send(json!({"type": "read", "room": "secret", "seq": 1}))
            .await;
        alice
            .send(json!({"type": "typing", "room": "secret", "active": false}))
            .await;
    }
    let pong = alice.request(json!({"type": "ping"})).await;
    assert_eq!(pong["type"], "pong", "{pong}");
    let errors: Vec<Value> = alice
        .buffered()
        .into_iter()
        .filter(|f| f["type"] == "error")
        .collect();
    assert!(
        errors.is_empty(),
        "a member's frames were refused: {errors:?}"
    );

    let mut mallory =
        Client::connect(&chatd.ws_url(), &dev_token(data.path(), "mallory", 3600)).await;
    let mut refused = 0;
    let mut limited = 0;
    let code = loop {
        let reply = mallory
            .request(json!({"type": "read", "room": "secret", "seq": 1}))
            .await;
        match reply["code"].as_str() {
            Some("forbidden" | "not_found") => refused += 1,
            Some("rate_limited") => {
                assert_eq!(reply["room"], "secret", "{reply}");
                limited += 1;
                if limited == 5 {
                    mallory
                        .send(json!({"type": "delivered", "room": "secret", "seq": 1}))
                        .await;
                    break mallory.closed().await;
                }
            }
            _ => panic!("unexpected answer to a stranger's read: {reply}"),
        }
        assert!(refused <= 10, "{refused} look-ups and not limited");
    };
    assert_eq!(code, 4029);
    assert!((5..=6).contains(&refused), "{refused} look-ups answered");
}
