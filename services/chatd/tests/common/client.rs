//! A WebSocket client of the contract, for end-to-end tests.

use std::collections::VecDeque;
use std::time::Duration;

use futures::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{connect_async, MaybeTlsStream, WebSocketStream};
use uuid::Uuid;

type Ws = WebSocketStream<MaybeTlsStream<tokio::net::TcpStream>>;

/// How long any expected frame may take.
const FRAME_DEADLINE: Duration = Duration::from_secs(15);

pub struct Client {
    ws: Ws,
    /// Frames read while waiting for another one.
    buffered: VecDeque<Value>,
    pub welcome: Value,
    next_rid: u64,
}

impl Client {
    /// Connects with the token in the subprotocol and reads the welcome.
    pub async fn connect(ws_url: &str, token: &str) -> Client {
        let mut request = ws_url.into_client_request().unwrap();
        request.headers_mut().insert(
            "Sec-WebSocket-Protocol",
            HeaderValue::from_str(&format!("chat.v1, bearer.{token}")).unwrap(),
        );
        let (ws, _) = connect_async(request).await.expect("websocket connects");
        let mut client = Client {
            ws,
            buffered: VecDeque::new(),
            welcome: Value::Null,
            next_rid: 0,
        };
        let welcome = client.next().await;
        assert_eq!(welcome["type"], "welcome", "{welcome}");
        client.welcome = welcome;
        client
    }

    /// The welcome's entry for `room`.
    pub fn welcome_room(&self, room: &str) -> Option<Value> {
        self.welcome["rooms"]
            .as_array()?
            .iter()
            .find(|r| r["room"] == room)
            .cloned()
    }

    pub async fn send(&mut self, frame: Value) {
        self.ws
            .send(Message::Text(frame.to_string().into()))
            .await
            .expect("send frame");
    }

    async fn read(&mut self) -> Value {
        loop {
            let message = tokio::time::timeout(FRAME_DEADLINE, self.ws.next())
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

    /// The next frame, buffered ones first.
    pub async fn next(&mut self) -> Value {
        match self.buffered.pop_front() {
            Some(frame) => frame,
            None => self.read().await,
        }
    }

    /// The first frame matching `f` (earlier non-matching frames stay buffered, in order).
    pub async fn wait_for(&mut self, f: impl Fn(&Value) -> bool) -> Value {
        if let Some(i) = self.buffered.iter().position(&f) {
            return self.buffered.remove(i).unwrap();
        }
        loop {
            let frame = self.read().await;
            if f(&frame) {
                return frame;
            }
            self.buffered.push_back(frame);
        }
    }

    /// Frames read but not consumed yet.
    pub fn buffered(&self) -> Vec<Value> {
        self.buffered.iter().cloned().collect()
    }

    /// Sends `frame` with a fresh `rid` and returns the reply carrying it.
    pub async fn request(&mut self, mut frame: Value) -> Value {
        self.next_rid += 1;
        let rid = format!("r{}", self.next_rid);
        frame["rid"] = json!(rid);
        self.send(frame).await;
        self.wait_for(|f| f["rid"] == rid.as_str()).await
    }

    /// Subscribes to one room from `from` (`None`: only new events); the `subscribed` reply.
    pub async fn subscribe(&mut self, room: &str, from: Option<u64>) -> Value {
        self.request(json!({"type": "subscribe", "rooms": {room: from}}))
            .await
    }

    /// Sends a message with a new id; the ack (or error).
    pub async fn say(&mut self, room: &str, text: &str) -> Value {
        self.say_with_id(room, text, Uuid::new_v4()).await
    }

    pub async fn say_with_id(&mut self, room: &str, text: &str, id: Uuid) -> Value {
        self.request(json!({"type": "send", "room": room, "id": id.to_string(), "text": text}))
            .await
    }

    /// The next `n` event frames of `room`.
    pub async fn events(&mut self, room: &str, n: usize) -> Vec<Value> {
        let mut out = Vec::with_capacity(n);
        while out.len() < n {
            out.push(
                self.wait_for(|f| f["type"] == "event" && f["room"] == room)
                    .await,
            );
        }
        out
    }

    /// Reads until the server closes; the close code.
    pub async fn closed(&mut self) -> u16 {
        loop {
            match tokio::time::timeout(FRAME_DEADLINE, self.ws.next())
                .await
                .expect("close in time")
            {
                Some(Ok(Message::Close(Some(frame)))) => return u16::from(frame.code),
                Some(Ok(Message::Close(None))) | None => return 1005,
                Some(Ok(_)) => continue,
                Some(Err(e)) => panic!("connection failed instead of closing: {e}"),
            }
        }
    }

    pub async fn close(mut self) {
        let _ = self.ws.close(None).await;
    }
}

/// Sequences of event frames.
pub fn seqs(events: &[Value]) -> Vec<u64> {
    events.iter().map(|e| e["seq"].as_u64().unwrap()).collect()
}
