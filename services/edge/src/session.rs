//! One client connection, from upgrade to close.
//!
//! The session reads frames and answers them in order; a writer task owns the socket's sending
//! half and drains one bounded queue, into which replies and every followed room's events go.
//! Each subscribed room has a forwarder task moving the room's events (from the edge's shared
//! feed, see [`crate::Hub`]) into that queue, so a room's events keep their order and the
//! `subscribed` reply always precedes them.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::time::Duration;

use axum::extract::ws::{CloseFrame, Message, WebSocket};
use chat_auth::Identity;
use chat_model::{RoomId, UserId};
use chat_rooms::{Command, RoomError};
use chat_store::PageQuery;
use futures::{SinkExt, StreamExt};
use serde::Deserialize;
use serde_json::{json, Value};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::{sleep_until, Instant};
use uuid::Uuid;

use crate::protocol::{self, close_code, ErrorCode, CLIENT_TYPES};
use crate::EdgeState;

/// The most rooms one `subscribe` frame may name.
const MAX_ROOMS_PER_SUBSCRIBE: usize = 256;
/// A user's read cursor is appended at most this often per room (per session).
const READ_INTERVAL: Duration = Duration::from_secs(1);

/// What the session's writer sends.
enum Out {
    Frame(Message),
    /// Close with this code and reason, then stop.
    Close(u16, String),
}

/// Runs a session until the client leaves, its token expires, or the server drains.
pub async fn run(mut socket: WebSocket, state: EdgeState, identity: Option<Identity>) {
    let identity = match identity {
        Some(identity) => identity,
        None => match first_frame_auth(&mut socket, &state).await {
            Ok(identity) => identity,
            Err(reason) => {
                tracing::debug!(reason, "websocket refused");
                let _ = socket
                    .send(Message::Close(Some(CloseFrame {
                        code: close_code::TOKEN,
                        reason: reason.into(),
                    })))
                    .await;
                return;
            }
        },
    };
    state.stats.sessions.fetch_add(1, Ordering::Relaxed);
    let (sink, stream) = socket.split();
    let (out_tx, out_rx) = mpsc::channel::<Out>(state.config.outbound_frames.max(16));
    let writer = tokio::spawn(write_loop(sink, out_rx));
    let mut session = Session {
        user: identity.user.clone(),
        state: state.clone(),
        out: out_tx,
        subscriptions: HashMap::new(),
        reads: HashMap::new(),
    };
    tracing::debug!(user = %session.user, "session open");
    session.serve(stream, &identity).await;
    session.unsubscribe_all();
    drop(session.out);
    let _ = tokio::time::timeout(Duration::from_secs(5), writer).await;
    state.stats.sessions.fetch_sub(1, Ordering::Relaxed);
    tracing::debug!(user = %identity.user, "session closed");
}

async fn write_loop(
    mut sink: futures::stream::SplitSink<WebSocket, Message>,
    mut out: mpsc::Receiver<Out>,
) {
    while let Some(item) = out.recv().await {
        let result = match item {
            Out::Frame(message) => sink.send(message).await,
            Out::Close(code, reason) => {
                let _ = sink
                    .send(Message::Close(Some(CloseFrame {
                        code,
                        reason: reason.into(),
                    })))
                    .await;
                break;
            }
        };
        if result.is_err() {
            break;
        }
    }
    let _ = sink.close().await;
}

struct Subscription {
    task: JoinHandle<()>,
}

impl Drop for Subscription {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Read-cursor coalescing for one room.
struct ReadGate {
    last_append: Option<Instant>,
    /// The highest seq asked for and not yet appended.
    pending: Option<u64>,
}

struct Session {
    user: UserId,
    state: EdgeState,
    out: mpsc::Sender<Out>,
    subscriptions: HashMap<RoomId, Subscription>,
    reads: HashMap<RoomId, ReadGate>,
}

/// Why the session's read loop ended (a removed member's forwarder tells it so).
enum Ended {
    Removed(RoomId),
}

impl Session {
    async fn send(&self, frame: String) {
        let _ = self.out.send(Out::Frame(Message::Text(frame.into()))).await;
    }

    async fn close(&self, code: u16, reason: &str) {
        let _ = self.out.send(Out::Close(code, reason.to_owned())).await;
    }

    async fn serve(
        &mut self,
        mut stream: futures::stream::SplitStream<WebSocket>,
        identity: &Identity,
    ) {
        let rooms = match self.state.rooms.rooms_of(&self.user).await {
            Ok(rooms) => rooms
                .iter()
                .map(|r| {
                    json!({"room": r.room, "head": r.head, "last_read": r.last_read, "unread": r.unread})
                })
                .collect::<Vec<_>>(),
            Err(e) => {
                tracing::warn!(user = %self.user, error = %e, "welcome without rooms");
                Vec::new()
            }
        };
        self.send(protocol::welcome(self.user.as_str(), &rooms))
            .await;
        let (ended_tx, mut ended_rx) = mpsc::channel::<Ended>(16);
        // The session ends when verification would start refusing the token.
        let expiry = sleep_until(Instant::now() + Duration::from_secs(identity.seconds_accepted()));
        tokio::pin!(expiry);
        loop {
            let next_read_flush = self
                .reads
                .values()
                .filter(|g| g.pending.is_some())
                .filter_map(|g| g.last_append.map(|t| t + READ_INTERVAL))
                .min();
            let message = tokio::select! {
                _ = self.state.shutdown.cancelled() => {
                    self.close(close_code::DRAINING, "server draining, reconnect elsewhere").await;
                    return;
                }
                _ = &mut expiry => {
                    self.close(close_code::TOKEN, "token expired").await;
                    return;
                }
                _ = sleep_until(next_read_flush.unwrap_or_else(|| Instant::now() + Duration::from_secs(3600))), if next_read_flush.is_some() => {
                    self.flush_reads().await;
                    continue;
                }
                Some(Ended::Removed(room)) = ended_rx.recv() => {
                    self.subscriptions.remove(&room);
                    self.send(protocol::reply("unsubscribed", None, json!({"room": room, "reason": "removed"}))).await;
                    continue;
                }
                message = stream.next() => message,
            };
            match message {
                None | Some(Ok(Message::Close(_))) => return,
                Some(Err(e)) => {
                    if is_capacity_error(&e) {
                        self.close(close_code::TOO_BIG, "frame too big").await;
                    }
                    tracing::debug!(user = %self.user, error = %e, "websocket read failed");
                    return;
                }
                // Control frames are answered by the WebSocket layer.
                Some(Ok(Message::Ping(_) | Message::Pong(_))) => {}
                Some(Ok(Message::Binary(_))) => {
                    self.error(
                        None,
                        ErrorCode::BadRequest,
                        "frames are JSON text, not binary",
                    )
                    .await
                }
                Some(Ok(Message::Text(text))) => {
                    if text.len() > self.state.config.max_frame_bytes {
                        self.close(close_code::TOO_BIG, "frame too big").await;
                        return;
                    }
                    self.state.stats.frames_in.fetch_add(1, Ordering::Relaxed);
                    self.answer(&text, &ended_tx).await;
                }
            }
        }
    }

    async fn error(&self, rid: Option<&str>, code: ErrorCode, message: &str) {
        self.state.stats.errors.fetch_add(1, Ordering::Relaxed);
        self.send(protocol::error(rid, code, message)).await;
    }

    async fn room_error(&self, rid: Option<&str>, room: &str, e: &RoomError) {
        self.state.stats.errors.fetch_add(1, Ordering::Relaxed);
        self.send(protocol::room_error(rid, room, e.code(), &e.to_string()))
            .await;
    }

    /// Answers one text frame.
    async fn answer(&mut self, text: &str, ended: &mpsc::Sender<Ended>) {
        let frame = match protocol::parse(text) {
            Ok(frame) => frame,
            Err(malformed) => {
                return self
                    .error(
                        malformed.rid.as_deref(),
                        ErrorCode::BadRequest,
                        &malformed.message,
                    )
                    .await
            }
        };
        let rid = frame.rid.as_deref();
        let body = frame.body.clone();
        match frame.kind.as_str() {
            "ping" => self.send(protocol::pong(rid)).await,
            "auth" => {
                self.error(rid, ErrorCode::BadRequest, "already authenticated")
                    .await
            }
            "subscribe" => self.subscribe(rid, body, ended).await,
            "unsubscribe" => self.unsubscribe(rid, body).await,
            "send" | "edit" | "delete" | "react" => {
                self.append(&frame.kind, rid, body).await;
            }
            "read" => self.read(rid, body).await,
            "history" => self.history(rid, body).await,
            known if CLIENT_TYPES.contains(&known) => {
                self.error(
                    rid,
                    ErrorCode::BadRequest,
                    &format!("{known} is not available in this server version yet"),
                )
                .await
            }
            unknown => {
                self.error(
                    rid,
                    ErrorCode::BadRequest,
                    &format!("unknown frame type {unknown:?}"),
                )
                .await
            }
        }
    }

    /// Reads a frame's fields, or answers `bad_request` naming what is wrong.
    async fn fields<T: for<'de> Deserialize<'de>>(
        &self,
        kind: &str,
        rid: Option<&str>,
        body: Value,
    ) -> Option<T> {
        match serde_json::from_value::<T>(body) {
            Ok(fields) => Some(fields),
            Err(e) => {
                self.error(rid, ErrorCode::BadRequest, &format!("{kind} frame: {e}"))
                    .await;
                None
            }
        }
    }

    async fn room_id(&self, rid: Option<&str>, room: &str) -> Option<RoomId> {
        match RoomId::parse(room) {
            Ok(room) => Some(room),
            Err(e) => {
                self.room_error(rid, room, &RoomError::BadRequest(format!("room: {e}")))
                    .await;
                None
            }
        }
    }

    async fn subscribe(&mut self, rid: Option<&str>, body: Value, ended: &mpsc::Sender<Ended>) {
        #[derive(Deserialize)]
        struct Subscribe {
            rooms: serde_json::Map<String, Value>,
        }
        let Some(frame) = self.fields::<Subscribe>("subscribe", rid, body).await else {
            return;
        };
        if frame.rooms.len() > MAX_ROOMS_PER_SUBSCRIBE {
            return self
                .error(
                    rid,
                    ErrorCode::BadRequest,
                    &format!("at most {MAX_ROOMS_PER_SUBSCRIBE} rooms per subscribe"),
                )
                .await;
        }
        for (name, from) in frame.rooms {
            let Some(room) = self.room_id(rid, &name).await else {
                continue;
            };
            let from = match from {
                Value::Null => None,
                Value::Number(n) if n.as_u64().is_some() => n.as_u64(),
                _ => {
                    let e = RoomError::BadRequest(
                        "the value is the last seq the client has (a number) or null".into(),
                    );
                    self.room_error(rid, &name, &e).await;
                    continue;
                }
            };
            if let Err(e) = self.subscribe_room(rid, &room, from, ended).await {
                self.room_error(rid, &name, &e).await;
            }
        }
    }

    async fn subscribe_room(
        &mut self,
        rid: Option<&str>,
        room: &RoomId,
        from: Option<u64>,
        ended: &mpsc::Sender<Ended>,
    ) -> Result<(), RoomError> {
        let rooms = &self.state.rooms;
        rooms.member_state(room, &self.user).await?;
        let bounds = rooms.log().bounds(room).await?;
        let after = match from {
            None => bounds.last,
            Some(seq) if seq > bounds.last => {
                return Err(RoomError::BadRequest(format!(
                    "seq {seq} is above the room's head {}",
                    bounds.last
                )))
            }
            Some(seq) => seq,
        };
        // Replacing a subscription: the old forwarder stops before the new one starts.
        self.subscriptions.remove(room);
        let follower = self
            .state
            .hub
            .follow(room, after)
            .await
            .map_err(RoomError::from)?;
        let mut fields = json!({"room": room, "head": bounds.last});
        if after + 1 < bounds.first {
            fields["truncated"] = json!(true);
        }
        self.send(protocol::reply("subscribed", rid, fields)).await;
        let task = tokio::spawn(forward(
            follower,
            self.user.clone(),
            self.out.clone(),
            ended.clone(),
        ));
        self.subscriptions
            .insert(room.clone(), Subscription { task });
        Ok(())
    }

    async fn unsubscribe(&mut self, rid: Option<&str>, body: Value) {
        #[derive(Deserialize)]
        struct Unsubscribe {
            room: String,
        }
        let Some(frame) = self.fields::<Unsubscribe>("unsubscribe", rid, body).await else {
            return;
        };
        let Some(room) = self.room_id(rid, &frame.room).await else {
            return;
        };
        self.subscriptions.remove(&room);
        self.send(protocol::reply("ok", rid, json!({}))).await;
    }

    fn unsubscribe_all(&mut self) {
        self.subscriptions.clear();
    }

    async fn append(&mut self, kind: &str, rid: Option<&str>, body: Value) {
        #[derive(Deserialize)]
        struct Append {
            room: String,
            id: Value,
            #[serde(default)]
            text: Option<String>,
            #[serde(default)]
            thread: Option<u64>,
            #[serde(default)]
            reply_to: Option<u64>,
            #[serde(default)]
            target: Option<u64>,
            #[serde(default)]
            emoji: Option<String>,
            #[serde(default)]
            on: Option<bool>,
        }
        let Some(frame) = self.fields::<Append>(kind, rid, body).await else {
            return;
        };
        let Some(room) = self.room_id(rid, &frame.room).await else {
            return;
        };
        let id = match frame.id.as_str().map(Uuid::parse_str) {
            Some(Ok(id)) => id,
            _ => {
                let e = RoomError::BadRequest("id must be a UUID string".into());
                return self.room_error(rid, &frame.room, &e).await;
            }
        };
        let missing = |field: &str| RoomError::BadRequest(format!("{kind} needs \"{field}\""));
        let command = match kind {
            "send" => frame
                .text
                .ok_or_else(|| missing("text"))
                .map(|text| Command::Send {
                    text,
                    thread: frame.thread,
                    reply_to: frame.reply_to,
                }),
            "edit" => match (frame.target, frame.text) {
                (Some(target), Some(text)) => Ok(Command::Edit { target, text }),
                (None, _) => Err(missing("target")),
                (_, None) => Err(missing("text")),
            },
            "delete" => frame
                .target
                .ok_or_else(|| missing("target"))
                .map(|target| Command::Delete { target }),
            _ => match (frame.target, frame.emoji, frame.on) {
                (Some(target), Some(emoji), Some(on)) => Ok(Command::React { target, emoji, on }),
                (None, _, _) => Err(missing("target")),
                (_, None, _) => Err(missing("emoji")),
                (_, _, None) => Err(missing("on")),
            },
        };
        let command = match command {
            Ok(command) => command,
            Err(e) => return self.room_error(rid, &frame.room, &e).await,
        };
        match self
            .state
            .rooms
            .append(&self.user, &room, id, command)
            .await
        {
            Ok(ack) => {
                self.state.stats.appends.fetch_add(1, Ordering::Relaxed);
                let fields = json!({
                    "room": room,
                    "id": id.hyphenated().to_string(),
                    "seq": ack.seq,
                    "ts": ack.ts,
                    "duplicate": ack.duplicate,
                });
                self.send(protocol::reply("ack", rid, fields)).await;
            }
            Err(e) => self.room_error(rid, &frame.room, &e).await,
        }
    }

    async fn read(&mut self, rid: Option<&str>, body: Value) {
        #[derive(Deserialize)]
        struct Read {
            room: String,
            seq: u64,
        }
        let Some(frame) = self.fields::<Read>("read", rid, body).await else {
            return;
        };
        let Some(room) = self.room_id(rid, &frame.room).await else {
            return;
        };
        // Refuse what can never be valid now; the rest is checked when it is appended.
        match self.state.rooms.log().head(&room).await {
            Ok(head) if frame.seq > head => {
                let e = RoomError::BadRequest(format!(
                    "seq {} is above the room's head {head}",
                    frame.seq
                ));
                return self.room_error(rid, &frame.room, &e).await;
            }
            Ok(_) => {}
            Err(e) => return self.room_error(rid, &frame.room, &e.into()).await,
        }
        let gate = self.reads.entry(room.clone()).or_insert(ReadGate {
            last_append: None,
            pending: None,
        });
        gate.pending = Some(gate.pending.map_or(frame.seq, |p| p.max(frame.seq)));
        let due = gate
            .last_append
            .is_none_or(|t| t.elapsed() >= READ_INTERVAL);
        if due {
            self.flush_read(rid, &room).await;
        }
    }

    /// Appends the pending read cursors whose interval has passed.
    async fn flush_reads(&mut self) {
        let due: Vec<RoomId> = self
            .reads
            .iter()
            .filter(|(_, g)| {
                g.pending.is_some() && g.last_append.is_none_or(|t| t.elapsed() >= READ_INTERVAL)
            })
            .map(|(room, _)| room.clone())
            .collect();
        for room in due {
            self.flush_read(None, &room).await;
        }
    }

    async fn flush_read(&mut self, rid: Option<&str>, room: &RoomId) {
        let Some(gate) = self.reads.get_mut(room) else {
            return;
        };
        let Some(seq) = gate.pending.take() else {
            return;
        };
        gate.last_append = Some(Instant::now());
        if let Err(e) = self.state.rooms.read(&self.user, room, seq).await {
            self.room_error(rid, room.as_str(), &e).await;
        }
    }

    async fn history(&mut self, rid: Option<&str>, body: Value) {
        #[derive(Deserialize)]
        struct History {
            room: String,
            #[serde(default)]
            before: Option<u64>,
            #[serde(default)]
            limit: Option<usize>,
        }
        let Some(frame) = self.fields::<History>("history", rid, body).await else {
            return;
        };
        let Some(room) = self.room_id(rid, &frame.room).await else {
            return;
        };
        let query = PageQuery {
            before: frame.before,
            limit: frame.limit.unwrap_or(50),
        };
        match self.state.rooms.history(&self.user, &room, query).await {
            Ok(page) => {
                let fields = json!({"room": room, "events": page.events, "more": page.more});
                self.send(protocol::reply("history", rid, fields)).await;
            }
            Err(e) => self.room_error(rid, &frame.room, &e).await,
        }
    }
}

/// Moves a followed room's events into the session's queue, in order; stops after the event
/// that removes this user from the room.
async fn forward(
    mut follower: crate::Follower,
    user: UserId,
    out: mpsc::Sender<Out>,
    ended: mpsc::Sender<Ended>,
) {
    let mut pause = Duration::from_millis(50);
    loop {
        match follower.next().await {
            Ok(delivery) => {
                pause = Duration::from_millis(50);
                let removed = delivery.left.as_ref() == Some(&user);
                if out
                    .send(Out::Frame(Message::Text(delivery.frame)))
                    .await
                    .is_err()
                {
                    return;
                }
                if removed {
                    let _ = ended.send(Ended::Removed(follower.room().clone())).await;
                    return;
                }
            }
            Err(e) => {
                // NATS away: the follower resumes where it was when called again.
                tracing::debug!(room = %follower.room(), error = %e, "follow interrupted; retrying");
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(Duration::from_secs(2));
            }
        }
    }
}

/// Waits for `{"type":"auth","token":…}` as the first frame, within the configured time.
async fn first_frame_auth(socket: &mut WebSocket, state: &EdgeState) -> Result<Identity, String> {
    let deadline = Instant::now() + state.config.auth_timeout;
    loop {
        let message = tokio::select! {
            _ = sleep_until(deadline) => return Err("no auth frame in time".to_owned()),
            message = socket.recv() => message,
        };
        match message {
            Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
            Some(Ok(Message::Text(text))) if text.len() <= state.config.max_frame_bytes => {
                let frame = protocol::parse(&text).map_err(|m| m.message)?;
                if frame.kind != "auth" {
                    return Err("the first frame must be auth".to_owned());
                }
                let token = frame
                    .body
                    .get("token")
                    .and_then(|t| t.as_str())
                    .ok_or("auth frame without a token")?;
                return state.verifier.verify(token).map_err(|e| e.to_string());
            }
            Some(Ok(_)) => return Err("the first frame must be an auth text frame".to_owned()),
            Some(Err(e)) => return Err(format!("read failed: {e}")),
            None => return Err("closed before authenticating".to_owned()),
        }
    }
}

fn is_capacity_error(e: &axum::Error) -> bool {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = source {
        if let Some(tungstenite::Error::Capacity(_)) = err.downcast_ref::<tungstenite::Error>() {
            return true;
        }
        source = err.source();
    }
    false
}
