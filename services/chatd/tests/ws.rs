//! The WebSocket session lifecycle of the client contract, against the real binary with a real
//! WebSocket client.

mod common;

use std::time::{Duration, Instant};

use common::*;
use futures::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::{Error as WsError, Message};
use tokio_tungstenite::{connect_async, MaybeTlsStream, WebSocketStream};

type Ws = WebSocketStream<MaybeTlsStream<tokio::net::TcpStream>>;

async fn connect(
    url: &str,
    protocols: Option<&str>,
    origin: Option<&str>,
) -> Result<(Ws, Option<String>), WsError> {
    let mut request = url.into_client_request().unwrap();
    if let Some(p) = protocols {
        request
            .headers_mut()
            .insert("Sec-WebSocket-Protocol", HeaderValue::from_str(p).unwrap());
    }
    if let Some(o) = origin {
        request
            .headers_mut()
            .insert("Origin", HeaderValue::from_str(o).unwrap());
    }
    let (ws, response) = connect_async(request).await?;
    let selected = response
        .headers()
        .get("Sec-WebSocket-Protocol")
        .map(|v| v.to_str().unwrap().to_owned());
    Ok((ws, selected))
}

/// The next JSON text frame (control frames skipped), within 10 s.
async fn next_json(ws: &mut Ws) -> Value {
    let deadline = Duration::from_secs(10);
    loop {
        let message = tokio::time::timeout(deadline, ws.next())
            .await
            .expect("a frame in time")
            .expect("connection open")
            .expect("frame read");
        match message {
            Message::Text(text) => return serde_json::from_str(&text).unwrap(),
            Message::Ping(_) | Message::Pong(_) => continue,
            other => panic!("expected a text frame, got {other:?}"),
        }
    }
}

/// Reads until the server closes; its close code and reason.
async fn expect_close(ws: &mut Ws) -> (u16, String) {
    let deadline = Duration::from_secs(15);
    loop {
        match tokio::time::timeout(deadline, ws.next())
            .await
            .expect("close in time")
        {
            Some(Ok(Message::Close(Some(frame)))) => {
                return (u16::from(frame.code), frame.reason.to_string())
            }
            Some(Ok(Message::Close(None))) => return (1005, String::new()),
            Some(Ok(_)) => continue,
            Some(Err(e)) => panic!("connection failed instead of closing cleanly: {e}"),
            None => panic!("connection ended without a close frame"),
        }
    }
}

async fn send(ws: &mut Ws, frame: &str) {
    ws.send(Message::Text(frame.into())).await.unwrap();
}

fn http_status(err: WsError) -> (u16, Value) {
    match err {
        WsError::Http(response) => {
            let body = response
                .body()
                .as_ref()
                .map(|b| serde_json::from_slice(b).unwrap())
                .unwrap_or(Value::Null);
            (response.status().as_u16(), body)
        }
        other => panic!("expected an HTTP refusal, got {other}"),
    }
}

/// A signed-in session of `user`, its welcome already read.
async fn signed_in(chatd: &chat_harness::Chatd, data: &std::path::Path, user: &str) -> Ws {
    let token = dev_token(data, user, 600);
    let protocols = format!("chat.v1, bearer.{token}");
    let (mut ws, _) = connect(&chatd.ws_url(), Some(&protocols), None)
        .await
        .unwrap();
    assert_eq!(next_json(&mut ws).await["type"], "welcome");
    ws
}

#[tokio::test]
async fn subprotocol_token_selects_chat_v1_then_welcome_and_ping() {
    let data = tempfile::tempdir().unwrap();
    let chatd = start(&standalone_env(data.path()));
    let token = dev_token(data.path(), "alice", 600);
    let (mut ws, selected) = connect(
        &chatd.ws_url(),
        Some(&format!("chat.v1, bearer.{token}")),
        None,
    )
    .await
    .unwrap();
    assert_eq!(selected.as_deref(), Some("chat.v1"));
    assert_eq!(
        next_json(&mut ws).await,
        json!({"type":"welcome","user":"alice","rooms":[]})
    );
    send(&mut ws, r#"{"type":"ping","rid":"8"}"#).await;
    assert_eq!(next_json(&mut ws).await, json!({"type":"pong","rid":"8"}));
}

#[tokio::test]
async fn bad_tokens_in_the_upgrade_are_refused_with_401_before_upgrading() {
    let data = tempfile::tempdir().unwrap();
    let chatd = start(&standalone_env(data.path()));
    let secret = std::fs::read_to_string(data.path().join("dev-secret")).unwrap();
    let secret = secret.trim().as_bytes();
    let none_alg = {
        use base64::Engine;
        let b64 = |b: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b);
        let claims =
            json!({"sub":"alice","iss":"chat-dev","aud":"chat-dev","exp": 4_000_000_000u64});
        format!(
            "{}.{}.",
            b64(br#"{"alg":"none"}"#),
            b64(claims.to_string().as_bytes())
        )
    };
    for (what, token) in [
        (
            "forged",
            mint(
                b"a different secret of enough length!!",
                "chat-dev",
                "chat-dev",
                "alice",
                600,
            ),
        ),
        (
            "expired",
            mint(secret, "chat-dev", "chat-dev", "alice", -60),
        ),
        (
            "wrong audience",
            mint(secret, "chat-dev", "other", "alice", 600),
        ),
        ("alg none", none_alg),
        ("garbage", "xyz".to_owned()),
    ] {
        let err = connect(
            &chatd.ws_url(),
            Some(&format!("chat.v1, bearer.{token}")),
            None,
        )
        .await
        .err();
        let (status, body) = http_status(err.unwrap_or_else(|| panic!("{what}: upgraded")));
        assert_eq!(
            (status, body["error"]["code"].as_str()),
            (401, Some("unauthorized")),
            "{what}: {body}"
        );
    }
    // Two tokens: ambiguous, refused whatever their order (one of them is good).
    let good = dev_token(data.path(), "alice", 600);
    for protocols in [
        format!("chat.v1, bearer.{good}, bearer.xyz"),
        format!("chat.v1, bearer.xyz, bearer.{good}"),
    ] {
        let err = connect(&chatd.ws_url(), Some(&protocols), None).await.err();
        let (status, body) = http_status(err.expect("two tokens: upgraded"));
        assert_eq!(
            (status, body["error"]["code"].as_str()),
            (400, Some("bad_request")),
            "{body}"
        );
    }
}

#[tokio::test]
async fn origins_are_checked_before_upgrading() {
    let data = tempfile::tempdir().unwrap();
    let chatd = start(&standalone_env(data.path()));
    let token = dev_token(data.path(), "alice", 600);
    let protocols = format!("chat.v1, bearer.{token}");
    let (status, body) = http_status(
        connect(
            &chatd.ws_url(),
            Some(&protocols),
            Some("https://evil.example"),
        )
        .await
        .expect_err("refused"),
    );
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (403, Some("forbidden"))
    );
    // Same host as the Host header: allowed.
    let same = format!("http://{}", chatd.http_addr());
    assert!(connect(&chatd.ws_url(), Some(&protocols), Some(&same))
        .await
        .is_ok());

    // With an allow-list, exactly its origins.
    let data = tempfile::tempdir().unwrap();
    let mut env = standalone_env(data.path());
    env.push(("CHAT_ALLOWED_ORIGINS", "https://app.example".to_owned()));
    let chatd = start(&env);
    let token = dev_token(data.path(), "alice", 600);
    let protocols = format!("chat.v1, bearer.{token}");
    assert!(connect(
        &chatd.ws_url(),
        Some(&protocols),
        Some("https://app.example")
    )
    .await
    .is_ok());
    let err = connect(
        &chatd.ws_url(),
        Some(&protocols),
        Some(&format!("http://{}", chatd.http_addr())),
    )
    .await;
    assert_eq!(http_status(err.expect_err("refused")).0, 403);
}

#[tokio::test]
async fn first_frame_authentication_and_its_refusals() {
    let data = tempfile::tempdir().unwrap();
    let mut env = standalone_env(data.path());
    env.push(("CHAT_AUTH_TIMEOUT", "300ms".to_owned()));
    let chatd = start(&env);
    let url = chatd.ws_url();

    let (mut ws, _) = connect(&url, None, None).await.unwrap();
    let token = dev_token(data.path(), "bob", 600);
    send(&mut ws, &json!({"type":"auth","token":token}).to_string()).await;
    let welcome = next_json(&mut ws).await;
    assert_eq!(
        (&welcome["type"], &welcome["user"]),
        (&json!("welcome"), &json!("bob"))
    );
    assert!(
        welcome.get("rid").is_none(),
        "no rid asked, none given: {welcome}"
    );
    // The welcome answers the auth frame: it carries the frame's rid.
    let (mut ws, _) = connect(&url, None, None).await.unwrap();
    send(
        &mut ws,
        &json!({"type":"auth","rid":"hello","token":token}).to_string(),
    )
    .await;
    let welcome = next_json(&mut ws).await;
    assert_eq!(
        (&welcome["type"], &welcome["rid"]),
        (&json!("welcome"), &json!("hello"))
    );

    let (mut ws, _) = connect(&url, None, None).await.unwrap();
    send(&mut ws, r#"{"type":"auth","token":"forged.token.here"}"#).await;
    assert_eq!(expect_close(&mut ws).await.0, 4001);

    let (mut ws, _) = connect(&url, None, None).await.unwrap();
    send(&mut ws, r#"{"type":"ping","rid":"1"}"#).await;
    assert_eq!(expect_close(&mut ws).await.0, 4001, "any other first frame");

    let (mut ws, _) = connect(&url, None, None).await.unwrap();
    let (code, reason) = expect_close(&mut ws).await;
    assert_eq!(code, 4001, "nothing within the auth timeout: {reason}");
}

#[tokio::test]
async fn bad_frames_get_errors_and_the_connection_stays_open() {
    let data = tempfile::tempdir().unwrap();
    let chatd = start(&standalone_env(data.path()));
    let mut ws = signed_in(&chatd, data.path(), "alice").await;

    for (frame, rid) in [
        ("{", None),
        ("[1,2]", None),
        (r#"{"rid":"5"}"#, Some("5")),
        (r#"{"type":"teleport","rid":"6"}"#, Some("6")),
        (r#"{"type":"auth","token":"x","rid":"7"}"#, Some("7")),
        (
            r#"{"type":"subscribe","rid":"9","rooms":["general"]}"#,
            Some("9"),
        ),
        // Nothing to subscribe to: answered all the same.
        (r#"{"type":"subscribe","rid":"10","rooms":{}}"#, Some("10")),
        // A room named twice, as a field given twice.
        (
            r#"{"type":"subscribe","rid":"12","rooms":{"general":0,"general":5}}"#,
            Some("12"),
        ),
    ] {
        send(&mut ws, frame).await;
        let reply = next_json(&mut ws).await;
        assert_eq!(reply["type"], "error", "{frame}: {reply}");
        assert_eq!(reply["code"], "bad_request", "{frame}: {reply}");
        assert_eq!(reply["rid"].as_str(), rid, "{frame}: {reply}");
    }
    // A frame about a room that fails to parse still says which room, appends included.
    for frame in [
        r#"{"type":"history","rid":"11","room":"general","limit":-1}"#,
        r#"{"type":"send","rid":"11","room":"general","id":"x","text":5}"#,
        r#"{"type":"edit","rid":"11","room":"general","id":"x","target":"1","text":"t"}"#,
        r#"{"type":"delete","rid":"11","room":"general","id":"x","target":-1}"#,
        r#"{"type":"react","rid":"11","room":"general","id":"x","target":1,"emoji":"a","on":1}"#,
    ] {
        send(&mut ws, frame).await;
        let reply = next_json(&mut ws).await;
        assert_eq!(
            (&reply["code"], &reply["rid"], &reply["room"]),
            (&json!("bad_request"), &json!("11"), &json!("general")),
            "{frame}: {reply}"
        );
    }
    ws.send(Message::Binary(vec![1, 2, 3].into()))
        .await
        .unwrap();
    assert_eq!(next_json(&mut ws).await["code"], "bad_request");
    // Still open and answering.
    send(&mut ws, r#"{"type":"ping","rid":"last"}"#).await;
    assert_eq!(
        next_json(&mut ws).await,
        json!({"type":"pong","rid":"last"})
    );
}

#[tokio::test]
async fn frames_over_the_limit_close_with_1009() {
    let data = tempfile::tempdir().unwrap();
    let mut env = standalone_env(data.path());
    env.push(("CHAT_MAX_FRAME_BYTES", "2048".to_owned()));
    let chatd = start(&env);
    // Just over our limit, and far over it (past what the WebSocket layer buffers).
    for size in [3_000, 100_000] {
        let mut ws = signed_in(&chatd, data.path(), "alice").await;
        let frame = json!({"type":"ping","rid": "x".repeat(size)}).to_string();
        let _ = ws.send(Message::Text(frame.into())).await;
        assert_eq!(expect_close(&mut ws).await.0, 1009, "{size} bytes");
    }
    // Binary frames too, though binary is refused anyway (under the library's bound as well).
    for size in [3_000, 100_000] {
        let mut ws = signed_in(&chatd, data.path(), "alice").await;
        let _ = ws.send(Message::Binary(vec![0u8; size].into())).await;
        assert_eq!(expect_close(&mut ws).await.0, 1009, "binary, {size} bytes");
    }
    // Also as the first (auth) frame of a connection without a token in the upgrade.
    for size in [3_000, 100_000] {
        for binary in [false, true] {
            let (mut ws, _) = tokio_tungstenite::connect_async(chatd.ws_url())
                .await
                .unwrap();
            let frame = json!({"type":"auth","token": "x".repeat(size)}).to_string();
            let message = if binary {
                Message::Binary(frame.into_bytes().into())
            } else {
                Message::Text(frame.into())
            };
            let _ = ws.send(message).await;
            assert_eq!(
                expect_close(&mut ws).await.0,
                1009,
                "first frame, {size} bytes, binary: {binary}"
            );
        }
    }
}

#[tokio::test]
async fn broken_websocket_frames_close_with_the_rfc_codes() {
    use tokio_tungstenite::tungstenite::protocol::frame::coding::{Data, OpCode};
    use tokio_tungstenite::tungstenite::protocol::frame::Frame;
    let data = tempfile::tempdir().unwrap();
    let chatd = start(&standalone_env(data.path()));
    // A text frame that is not UTF-8: 1007.
    let mut ws = signed_in(&chatd, data.path(), "alice").await;
    let bad_text = Frame::message(vec![b'{', 0xff, 0xfe, b'}'], OpCode::Data(Data::Text), true);
    let _ = ws.send(Message::Frame(bad_text)).await;
    assert_eq!(expect_close(&mut ws).await.0, 1007);
    // A reserved opcode: 1002.
    let mut ws = signed_in(&chatd, data.path(), "alice").await;
    let reserved = Frame::message(vec![b'x'], OpCode::Data(Data::Reserved(3)), true);
    let _ = ws.send(Message::Frame(reserved)).await;
    assert_eq!(expect_close(&mut ws).await.0, 1002);
    // Before authenticating, a first frame that is not UTF-8 is one that is not `auth`: 4001,
    // as the contract says of any other first frame.
    let (mut ws, _) = tokio_tungstenite::connect_async(chatd.ws_url())
        .await
        .unwrap();
    let bad_text = Frame::message(vec![0xc3, 0x28], OpCode::Data(Data::Text), true);
    let _ = ws.send(Message::Frame(bad_text)).await;
    assert_eq!(expect_close(&mut ws).await.0, 4001);
}

#[tokio::test]
async fn a_session_is_closed_with_4001_when_its_token_expires() {
    let data = tempfile::tempdir().unwrap();
    let chatd = start(&standalone_env(data.path()));
    // Expired 3 s ago: still inside the 5 s leeway, so accepted, and closed about 2 s later.
    let token = dev_token(data.path(), "alice", -3);
    let (mut ws, _) = connect(
        &chatd.ws_url(),
        Some(&format!("chat.v1, bearer.{token}")),
        None,
    )
    .await
    .unwrap();
    next_json(&mut ws).await;
    let (code, reason) = expect_close(&mut ws).await;
    assert_eq!((code, reason.as_str()), (4001, "token expired"));
}

#[tokio::test]
async fn a_drain_closes_sessions_with_1001() {
    let data = tempfile::tempdir().unwrap();
    let mut chatd = start(&standalone_env(data.path()));
    let mut sessions = Vec::new();
    for _ in 0..3 {
        sessions.push(signed_in(&chatd, data.path(), "alice").await);
    }
    chatd.signal(nix::sys::signal::Signal::SIGTERM);
    for ws in &mut sessions {
        assert_eq!(expect_close(ws).await.0, u16::from(CloseCode::Away));
    }
    assert!(chatd
        .wait_exit(Duration::from_secs(30))
        .is_some_and(|s| s.success()));
}

#[tokio::test]
async fn a_drain_delay_turns_readiness_off_while_the_process_serves_on() {
    let data = tempfile::tempdir().unwrap();
    let mut env = standalone_env(data.path());
    env.push(("CHAT_DRAIN_DELAY", "2s".to_owned()));
    let mut chatd = start(&env);
    let mut early = signed_in(&chatd, data.path(), "alice").await;
    chatd.signal(nix::sys::signal::Signal::SIGTERM);
    // Not ready at once, and still serving: requests, a new session, the open one.
    let deadline = Instant::now() + Duration::from_secs(10);
    while chatd.get("/readyz").map(|(status, _)| status) != Some(503) {
        assert!(Instant::now() < deadline, "readiness never turned off");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(chatd.get("/healthz").map(|(status, _)| status), Some(200));
    let mut late = signed_in(&chatd, data.path(), "bob").await;
    send(&mut early, r#"{"type":"ping","rid":"still"}"#).await;
    assert_eq!(
        next_json(&mut early).await,
        json!({"type":"pong","rid":"still"})
    );
    // Then the drain proper: both sessions are closed with 1001 and the process exits.
    for ws in [&mut early, &mut late] {
        assert_eq!(expect_close(ws).await.0, u16::from(CloseCode::Away));
    }
    assert!(chatd
        .wait_exit(Duration::from_secs(30))
        .is_some_and(|s| s.success()));
}
