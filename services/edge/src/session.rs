//! One client connection, from upgrade to close.
//!
//! The session reads frames and answers them in order. Appends (`send`, `edit`, `delete`,
//! `react`) are pipelined: up to `EdgeConfig::appends_in_flight` of them are checked at once,
//! sent to the log in the client's order and acknowledged in that order (see [`Appends`]); any
//! other frame waits for the appends before it. A writer task owns the socket's sending
//! half: it drains one bounded queue of replies and ephemeral frames (see [`crate::outbox`])
//! and pulls the events of every subscribed room from that room's follower (the edge's shared
//! feed, see [`crate::Hub`]); a room's follower is handed to the writer through the queue, after
//! the `subscribed` reply, so the reply always precedes the room's events, which keep their
//! order.
//!
//! Every frame passes the connection's bucket, then its kind's per-user bucket; a client that
//! keeps sending after being refused is closed with 4029. A client from which nothing arrives
//! (no frame, no pong to the writer's pings) within the idle timeout is closed.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use chat_auth::Identity;
use chat_model::{RoomId, UserId};
use chat_rooms::{Command, RoomError};
use chat_store::PageQuery;
use futures::future::BoxFuture;
use futures::stream::FuturesOrdered;
use futures::{FutureExt, StreamExt};
use opentelemetry::KeyValue;
use serde::Deserialize;
use serde_json::{json, Value};
use tokio::time::{sleep_until, Instant};
use tracing::Instrument as _;
use tungstenite::Message;
use uuid::Uuid;

use crate::limits::{ConnectionLimits, Limited, Socket, Unauthenticated, UserSlot, Work};
use crate::outbox::{Outbox, OutboxLimits};
use crate::protocol::{self, close_code, ErrorCode, Frame};
use crate::socket::{Connection, FrameWriter, WsRead};
use crate::source::{EndOnDrop, Removals, RoomSource};
use crate::EdgeState;

/// How long a client gets to answer our close frame with its own, once it is sent.
const CLOSE_REPLY_WAIT: Duration = Duration::from_secs(1);

/// A session's places under the edge's connection caps, held for its life.
pub(crate) struct Slots {
    pub _socket: Socket,
    /// `None` until first-frame authentication names the user.
    pub user: Option<UserSlot>,
    /// Held until first-frame authentication ends, either way.
    pub unauthenticated: Option<Unauthenticated>,
}

async fn refuse(socket: &mut FrameWriter, code: u16, reason: String) {
    tracing::debug!(code, reason, "websocket refused");
    // A pong the client asked for first goes before the close frame.
    socket.take_control();
    socket.close(code, &reason);
    let _ = socket.flush().await;
}

/// Runs a session until the client leaves, its token expires, or the server drains.
///
/// A plain function returning the session's future rather than an `async fn`: an `async fn`
/// keeps its arguments twice (as passed, and as moved into its body), and every byte of this
/// future is held by every connection for its whole life. For the same reason the socket is
/// boxed until it is split: its halves share it on the heap from then on, and a future keeps
/// room for whatever it once held inline.
pub(crate) fn run(
    socket: Connection,
    state: EdgeState,
    identity: Option<Identity>,
    mut slots: Slots,
) -> impl std::future::Future<Output = ()> + Send {
    let mut socket = Box::new(socket);
    async move {
        // The `auth` frame's `rid`, which the welcome answers.
        let (identity, auth_rid) = match identity {
            Some(identity) => (identity, None),
            None => {
                let authenticated = first_frame_auth(&mut socket.read, &state).await;
                slots.unauthenticated = None;
                match authenticated {
                    Ok(authenticated) => authenticated,
                    Err((code, reason)) => return refuse(&mut socket.write, code, reason).await,
                }
            }
        };
        if slots.user.is_none() {
            match state.connections.user(&identity.user) {
                Some(slot) => slots.user = Some(slot),
                None => {
                    state.stats.refused_per_user.fetch_add(1, Ordering::Relaxed);
                    let reason = format!(
                        "at most {} connections per user",
                        state.connections.max_per_user()
                    );
                    return refuse(&mut socket.write, close_code::TRY_AGAIN_LATER, reason).await;
                }
            }
        }
        let Connection { read, write } = unbox(socket);
        serve_session(write, read, state, identity, auth_rid).await;
        drop(slots);
    }
}

/// The socket out of its box, the box freed now (moving out of a box in place would keep the
/// box allocated until the end of the session's future).
fn unbox(socket: Box<Connection>) -> Connection {
    *socket
}

/// The authenticated part of a session: serves it, then closes the socket. (A function
/// returning a future, like [`run`], for the same reason.)
#[allow(clippy::manual_async_fn)] // deliberately not `async fn`: see above
fn serve_session(
    sink: FrameWriter,
    mut stream: WsRead,
    state: EdgeState,
    identity: Identity,
    auth_rid: Option<String>,
) -> impl std::future::Future<Output = ()> + Send {
    async move {
        state.stats.sessions.fetch_add(1, Ordering::Relaxed);
        let config = state.config.clone();
        let limits = OutboxLimits {
            frames: config.outbound_frames,
            bytes: config.outbound_bytes,
            grace: config.slow_grace,
            ping_every: config.ping_interval,
            close_timeout: config.close_timeout,
        };
        let (out, mut writer) = Outbox::start(sink, limits, state.stats.clone());
        let stop_writer = out.stopper();
        let stats = state.stats.clone();
        let mut session = Session {
            user: identity.user.clone(),
            state,
            out,
            subscriptions: HashMap::new(),
            limits: ConnectionLimits::new(config.rates.frames, config.flood_window),
            typing: HashSet::new(),
            appends: std::sync::Mutex::default(),
        };
        tracing::debug!(user = %session.user, "session open");
        let aborter = session.out.aborter();
        let hurry = session.state.hurry.clone();
        tokio::select! {
            () = session.serve(&mut stream, &identity, auth_rid) => {}
            // A drain's grace is over and the session is still waiting (on NATS, say): it
            // closes now, with what it has in flight unanswered (resent with their ids, they
            // land at most once).
            () = hurry.cancelled() => {
                aborter.abort(close_code::DRAINING, "server draining, reconnect elsewhere");
            }
        }
        session.unsubscribe_all();
        drop(session);
        // The writer sends what is queued, then the close frame. A client that does not read gets
        // the close timeout for that; then the writer gives up on the queue and closes. Meanwhile
        // what the client still sends is read and dropped until its own close frame (the closing
        // handshake): a socket closed with unread input is reset, and a reset can destroy the
        // close frame and the last acks before the client reads them.
        let writer_done = async {
            if tokio::time::timeout(config.close_timeout, &mut writer)
                .await
                .is_err()
            {
                stop_writer.stop();
                let _ = (&mut writer).await;
            }
        };
        let client_closed = async {
            while let Some(message) = stream.next().await {
                match message {
                    Ok(Message::Close(_)) => break,
                    Ok(_) => {}
                    // Frames refused after our close frame; the connection itself is still there.
                    Err(e) if !is_terminal(&e) => {}
                    Err(_) => break,
                }
            }
        };
        tokio::pin!(writer_done, client_closed);
        tokio::select! {
            _ = &mut client_closed => writer_done.await,
            _ = &mut writer_done => {
                // A client that answers close frames does so at once.
                let _ = tokio::time::timeout(CLOSE_REPLY_WAIT, client_closed).await;
            }
        }
        stats.sessions.fetch_sub(1, Ordering::Relaxed);
        tracing::debug!(user = %identity.user, "session closed");
    }
}

struct Subscription {
    /// Ends the room's event source in the writer when the subscription goes.
    _source: EndOnDrop,
    /// The user is online in the room while subscribed.
    _here: crate::presence::Here,
}

/// The session's appends in flight, at most `EdgeConfig::appends_in_flight`: each is checked
/// against the room's rules concurrently with the others, but sent to the log in the order
/// the client sent them (one NATS connection keeps that order), and answered in that order.
/// Other frames wait until the pipeline is empty, so every reply keeps the client's order.
#[derive(Default)]
struct Appends {
    /// Being decided; yielded in the client's order.
    deciding: Stage<Decided>,
    /// Sent to the log (or refused), waiting for the outcome; yielded in the client's order.
    settling: Stage<Settled>,
}

/// One stage of the append pipeline: futures yielded in the order they were queued. Its
/// queue is made at the first append (a queue allocates as it is made, and most sessions
/// of a big deployment are idle readers that never append).
struct Stage<T>(Option<FuturesOrdered<BoxFuture<'static, T>>>);

impl<T> Default for Stage<T> {
    fn default() -> Self {
        Stage(None)
    }
}

impl<T> Stage<T> {
    fn len(&self) -> usize {
        self.0.as_ref().map_or(0, FuturesOrdered::len)
    }

    fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn push_back(&mut self, future: BoxFuture<'static, T>) {
        self.0
            .get_or_insert_with(FuturesOrdered::new)
            .push_back(future);
    }

    /// The next output in order; `None` when the stage is empty.
    async fn next(&mut self) -> Option<T> {
        match self.0.as_mut() {
            Some(queue) => queue.next().await,
            None => None,
        }
    }
}

impl Appends {
    fn len(&self) -> usize {
        self.deciding.len() + self.settling.len()
    }

    fn is_empty(&self) -> bool {
        self.deciding.is_empty() && self.settling.is_empty()
    }
}

/// An append frame on its way through the pipeline: what its reply and its retries need.
struct AppendFrame {
    rid: Option<String>,
    room: RoomId,
    id: Uuid,
    /// Asked again with the same id while the outcome is unknown.
    command: Command,
    /// When the frame arrived: no retry starts `append_retry` after it, and
    /// `chat.edge.append.duration` starts here.
    arrived: Instant,
    /// `chat.append`, from the frame's arrival to its answer (disabled unless traces are
    /// exported).
    span: tracing::Span,
}

/// The first stage's result. Only ever a future's output, moved once: boxing the common
/// variant would cost an allocation per append for nothing.
#[allow(clippy::large_enum_variant)]
enum Decided {
    Append(AppendFrame, Result<chat_rooms::DecidedAppend, RoomError>),
    /// A reply to a frame between appends (e.g. a refused one), given in its turn.
    Reply(String),
}

/// The second stage's result.
enum Settled {
    Append(AppendFrame, Result<chat_rooms::Ack, RoomError>),
    Reply(String),
}

/// What retrying an append needs, outside the session.
struct Retry {
    rooms: Arc<chat_rooms::Rooms>,
    user: UserId,
    out: Outbox,
    stats: Arc<crate::EdgeStats>,
    /// How long after its frame's arrival an append may still be retried.
    append_retry: Duration,
}

impl Retry {
    /// Appends again with the same id while the outcome is unknown (NATS away or slow), until
    /// the frame's deadline: a retry is answered as the original, so it can never append twice.
    /// What is still unknown then is `unavailable` to the client.
    async fn until_known(
        &self,
        frame: &AppendFrame,
        first: Result<chat_rooms::Ack, RoomError>,
    ) -> Result<chat_rooms::Ack, RoomError> {
        let mut result = first;
        let mut pause = Duration::from_millis(50);
        loop {
            match result {
                Err(RoomError::Unavailable(reason))
                    if Instant::now() + pause < frame.arrived + self.append_retry
                        && !self.out.is_stopped() =>
                {
                    tracing::debug!(room = %frame.room, id = %frame.id, reason, "append outcome unknown; retrying");
                    self.stats.append_retries.fetch_add(1, Ordering::Relaxed);
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(Duration::from_millis(800));
                    // Boxed: a retry is rare, and every append's future would otherwise
                    // keep room for a whole second append.
                    result = Box::pin(self.rooms.append_traced(
                        &self.user,
                        &frame.room,
                        frame.id,
                        frame.command.clone(),
                        traceparent(&frame.span),
                    ))
                    .await;
                }
                other => return other,
            }
        }
    }
}

struct Session {
    user: UserId,
    state: EdgeState,
    out: Outbox,
    subscriptions: HashMap<RoomId, Subscription>,
    limits: ConnectionLimits,
    /// The rooms where this session said it is typing (and has not stopped or sent since).
    typing: HashSet<RoomId>,
    /// Appends in flight. Only reached through `&mut self` (`get_mut`: never locked); the
    /// mutex makes the session `Sync`, which its `&self` futures need.
    appends: std::sync::Mutex<Appends>,
}

/// Whether the session goes on after a frame.
enum Flow {
    Continue,
    Stop,
}

/// A frame's fate under the rate limits.
enum Admission {
    Pass,
    /// Answered with `rate_limited`.
    Refused,
    /// Closed with 4029.
    Closed,
}

impl Session {
    fn appends_mut(&mut self) -> &mut Appends {
        self.appends.get_mut().unwrap_or_else(|p| p.into_inner())
    }

    /// Queues a reply; a client too slow to take it is being closed (the loop sees that).
    async fn send(&self, frame: String) {
        let _ = self.out.push(frame).await;
    }

    async fn close(&self, code: u16, reason: &str) {
        self.out.close(code, reason).await;
    }

    /// The read loop. What it awaits rarely, or only while answering, is boxed: an idle
    /// session's future keeps no room for it.
    async fn serve(&mut self, stream: &mut WsRead, identity: &Identity, auth_rid: Option<String>) {
        // The room list is dropped once rendered: this future lives as long as the session.
        let rooms = match Box::pin(self.state.rooms.rooms_of(&self.user)).await {
            Ok(rooms) => rooms
                .iter()
                .map(|r| {
                    json!({"room": r.room, "head": r.head, "last_read": r.last_read, "unread": r.unread})
                })
                .collect::<Vec<_>>(),
            Err(e) => {
                // A `welcome` with no rooms would tell the client it is in none (and a client
                // may clear what it holds): it reconnects instead, with its usual backoff.
                tracing::warn!(user = %self.user, error = %e, "no welcome: the room list is unavailable");
                self.close(
                    close_code::TRY_AGAIN_LATER,
                    "room list unavailable, reconnect later",
                )
                .await;
                return;
            }
        };
        let welcome = protocol::welcome(self.user.as_str(), &rooms, auth_rid.as_deref());
        drop((rooms, auth_rid));
        self.send(welcome).await;
        let removals = Arc::new(Removals::default());
        // The session ends when verification would start refusing the token.
        let expiry = sleep_until(Instant::now() + identity.time_accepted());
        tokio::pin!(expiry);
        let idle_timeout = self.state.config.idle_timeout;
        let max_in_flight = self.state.config.appends_in_flight.max(1);
        let mut heard = Instant::now();
        loop {
            let idle_at = heard + idle_timeout;
            let appends = self.appends.get_mut().unwrap_or_else(|p| p.into_inner());
            let message = tokio::select! {
                // Too slow, flooding: the writer is already closing the socket.
                _ = self.out.stopped() => return,
                _ = self.state.shutdown.cancelled() => {
                    Box::pin(self.finish_appends()).await;
                    self.close(close_code::DRAINING, "server draining, reconnect elsewhere").await;
                    return;
                }
                _ = &mut expiry => {
                    Box::pin(self.finish_appends()).await;
                    self.close(close_code::TOKEN, "token expired").await;
                    return;
                }
                _ = sleep_until(idle_at) => {
                    self.state.stats.idle_closes.fetch_add(1, Ordering::Relaxed);
                    let reason = format!("nothing heard for {} s", idle_timeout.as_secs());
                    self.out.abort(close_code::IDLE, &reason);
                    return;
                }
                _ = removals.notify.notified() => {
                    for (room, subscription) in removals.take() {
                        // Subscribed again since (invited back): that subscription goes on.
                        if self.subscriptions.get(&room).is_none_or(|s| s._source.id() != subscription) {
                            continue;
                        }
                        self.subscriptions.remove(&room);
                        self.send(protocol::reply("unsubscribed", None, json!({"room": room, "reason": "removed"}))).await;
                    }
                    continue;
                }
                Some(settled) = appends.settling.next(), if !appends.settling.is_empty() => {
                    Box::pin(self.settled(settled)).await;
                    continue;
                }
                Some(decided) = appends.deciding.next(), if !appends.deciding.is_empty() => {
                    Box::pin(self.decided(decided)).await;
                    continue;
                }
                message = stream.next(), if appends.len() < max_in_flight => message,
            };
            heard = Instant::now();
            if matches!(message, None | Some(Ok(Message::Close(_)) | Err(_))) {
                // The frames read before are answered (their events appended) all the same.
                Box::pin(self.finish_appends()).await;
            }
            match message {
                None => return,
                Some(Ok(Message::Close(_))) => {
                    // The next read has the WebSocket layer answer the close frame (through the
                    // writer, which sends the reply after what is queued); it ends the stream.
                    let _ = stream.next().now_or_never();
                    return;
                }
                Some(Err(e)) => {
                    if let Some((code, reason)) = close_for(&e) {
                        self.close(code, reason).await;
                    }
                    tracing::debug!(user = %self.user, error = %e, "websocket read failed");
                    return;
                }
                // Control frames are answered by the WebSocket layer (which never yields a raw
                // `Frame` when reading), but count against the connection's frame rate like
                // any frame: a flood of them is closed with 4029 (no `rate_limited` frame
                // answers a control frame).
                Some(Ok(Message::Ping(_) | Message::Pong(_))) => {
                    self.state.stats.frames_in.fetch_add(1, Ordering::Relaxed);
                    if let Err(Limited { burst, .. }) = self.limits.check_frame() {
                        if let Flow::Stop = Box::pin(self.refused(burst)).await {
                            return;
                        }
                    }
                }
                Some(Ok(Message::Frame(_))) => {}
                Some(Ok(Message::Binary(bytes)))
                    if bytes.len() > self.state.config.max_frame_bytes =>
                {
                    self.close(close_code::TOO_BIG, "frame too big").await;
                    return;
                }
                Some(Ok(Message::Binary(_))) => match Box::pin(self.admit_after_appends()).await {
                    Admission::Pass => {
                        self.error(
                            None,
                            ErrorCode::BadRequest,
                            "frames are JSON text, not binary",
                        )
                        .await
                    }
                    Admission::Refused => {}
                    Admission::Closed => return,
                },
                Some(Ok(Message::Text(text))) => {
                    if text.len() > self.state.config.max_frame_bytes {
                        self.close(close_code::TOO_BIG, "frame too big").await;
                        return;
                    }
                    self.state.stats.frames_in.fetch_add(1, Ordering::Relaxed);
                    // Boxed: answering is the largest future a session has, and an idle session
                    // should not keep room for it.
                    if let Flow::Stop = Box::pin(self.answer(&text, &removals)).await {
                        return;
                    }
                }
            }
        }
    }

    async fn error(&self, rid: Option<&str>, code: ErrorCode, message: &str) {
        self.state.stats.errors.fetch_add(1, Ordering::Relaxed);
        self.send(protocol::error(rid, code, message)).await;
    }

    async fn room_error(&self, rid: Option<&str>, room: &str, e: &RoomError) {
        self.send(self.room_error_frame(rid, room, e)).await;
    }

    /// The `error` frame refusing a frame about `room` (counted as an error sent).
    fn room_error_frame(&self, rid: Option<&str>, room: &str, e: &RoomError) -> String {
        self.state.stats.errors.fetch_add(1, Ordering::Relaxed);
        protocol::room_error(rid, room, e.code(), &e.to_string())
    }

    /// Counts a refused frame; closes with 4029 (`Flow::Stop`) a client that has had more
    /// refusals than `burst` within the flood window.
    async fn refused(&mut self, burst: u32) -> Flow {
        self.state
            .stats
            .rate_limited
            .fetch_add(1, Ordering::Relaxed);
        if !self.limits.refused(burst) {
            return Flow::Continue;
        }
        self.state
            .stats
            .flood_closes
            .fetch_add(1, Ordering::Relaxed);
        tracing::info!(user = %self.user, "closing a connection that kept flooding");
        // The appends already admitted are answered and the refusals already queued go out
        // before the close: the client learns what landed and that it was limited.
        Box::pin(self.finish_appends()).await;
        self.close(close_code::FLOOD, "kept sending after being rate-limited")
            .await;
        Flow::Stop
    }

    /// Checks a frame against the connection's bucket and, for `work`, the user's; answers a
    /// refusal with `rate_limited`, or closes with 4029 a client that keeps flooding.
    async fn admit(
        &mut self,
        rid: Option<&str>,
        frame: Option<&Frame<'_>>,
        work: Option<Work>,
    ) -> Admission {
        // A `subscribe` costs one token per room it names (each is a log read, a feed, perhaps
        // a NATS subscription), not one per frame.
        let tokens = match (work, frame) {
            (Some(Work::Subscribe), Some(frame)) => subscribe_rooms(frame),
            _ => 1,
        };
        let checked = self.limits.check_frame().and_then(|()| match work {
            Some(work) => self.state.limits.check_n(work, &self.user, tokens),
            None => Ok(()),
        });
        let Err(Limited { burst, retry_after }) = checked else {
            return Admission::Pass;
        };
        if let Flow::Stop = self.refused(burst).await {
            return Admission::Closed;
        }
        let retry_ms = retry_after.as_millis().max(1) as u64;
        let mut reply = json!({
            "type": "error",
            "code": ErrorCode::RateLimited.as_str(),
            "message": format!("rate limited; retry in {retry_ms} ms"),
            "retry_after_ms": retry_ms,
        });
        if let Some(rid) = rid {
            reply["rid"] = json!(rid);
        }
        // The room the refused frame was about, as every error about one says.
        if let Some(room) = frame.and_then(frame_room) {
            reply["room"] = json!(room);
        }
        self.state.stats.errors.fetch_add(1, Ordering::Relaxed);
        Box::pin(self.reply_in_turn(reply.to_string())).await;
        Admission::Refused
    }

    /// Admits a frame that is not an append, once the appends before it are answered.
    async fn admit_after_appends(&mut self) -> Admission {
        self.finish_appends().await;
        self.admit(None, None, None).await
    }

    /// Answers one text frame.
    async fn answer(&mut self, text: &str, removals: &Arc<Removals>) -> Flow {
        let parsed = protocol::parse(text);
        let (rid, kind) = match &parsed {
            Ok(frame) => (frame.rid.clone(), Some(frame.kind.as_str())),
            Err(malformed) => (malformed.rid.clone(), None),
        };
        let is_append = matches!(kind, Some("send" | "edit" | "delete" | "react"));
        if !is_append && !self.appends_mut().is_empty() {
            Box::pin(self.finish_appends()).await;
        }
        // `typing` draws on its own bucket once read (see `Session::typing`), which bounds the
        // look-ups it makes: only the connection's bucket refuses it.
        let work = match kind {
            _ if is_append => Some(Work::Send),
            Some("subscribe") => Some(Work::Subscribe),
            Some("history") => Some(Work::History),
            // About a room this connection does not follow, the edge may have to read the log
            // to learn whether the user is a member (a refusal always asks the log again): a
            // read like `history`'s, from the same bucket, or a stranger's frames would each
            // cost NATS a request, limited only by the connection's frame rate.
            Some("read" | "delivered") if parsed.as_ref().is_ok_and(|f| !self.follows(f)) => {
                Some(Work::History)
            }
            _ => None,
        };
        match self.admit(rid.as_deref(), parsed.as_ref().ok(), work).await {
            Admission::Pass => {}
            Admission::Refused => return Flow::Continue,
            Admission::Closed => return Flow::Stop,
        }
        let frame = match parsed {
            Ok(frame) => frame,
            Err(malformed) => {
                self.error(
                    malformed.rid.as_deref(),
                    ErrorCode::BadRequest,
                    &malformed.message,
                )
                .await;
                return Flow::Continue;
            }
        };
        let rid = frame.rid.as_deref();
        let body = &frame;
        // Each handler boxed: this future is held while a frame is answered, and when thousands
        // of sessions subscribe at once (a reconnect storm) each should hold only what its own
        // frame needs, not room for the largest handler.
        match frame.kind.as_str() {
            "ping" => self.send(protocol::pong(rid)).await,
            "auth" => {
                self.error(rid, ErrorCode::BadRequest, "already authenticated")
                    .await
            }
            "subscribe" => Box::pin(self.subscribe(rid, body, removals)).await,
            "unsubscribe" => Box::pin(self.unsubscribe(rid, body)).await,
            "send" | "edit" | "delete" | "react" => {
                if let Err(error) = self.append(&frame.kind, rid, body) {
                    Box::pin(self.reply_in_turn(error)).await;
                }
            }
            "read" => Box::pin(self.read(rid, body)).await,
            "delivered" => Box::pin(self.delivered(rid, body)).await,
            "typing" => Box::pin(self.typing(rid, body)).await,
            "history" => Box::pin(self.history(rid, body)).await,
            unknown => {
                self.error(
                    rid,
                    ErrorCode::BadRequest,
                    &format!("unknown frame type {unknown:?}"),
                )
                .await
            }
        }
        Flow::Continue
    }

    /// Whether the frame is about a room this connection has subscribed to (a frame naming no
    /// valid room is answered without a look-up, so it counts as followed).
    fn follows(&self, frame: &Frame<'_>) -> bool {
        frame_room(frame)
            .and_then(|room| RoomId::parse(room.as_str()).ok())
            .is_none_or(|room| self.subscriptions.contains_key(&room))
    }

    /// Reads a frame's fields, or answers `bad_request` naming what is wrong.
    async fn fields<T: for<'de> Deserialize<'de>>(
        &self,
        kind: &str,
        rid: Option<&str>,
        body: &Frame<'_>,
    ) -> Option<T> {
        match body.fields::<T>() {
            Ok(fields) => Some(fields),
            Err(e) => {
                let message = format!("{kind} frame: {e}");
                // The room the frame is about, when it names one, as every error about one says.
                match frame_room(body) {
                    Some(room) => {
                        let e = RoomError::BadRequest(message);
                        self.room_error(rid, &room, &e).await;
                    }
                    None => self.error(rid, ErrorCode::BadRequest, &message).await,
                }
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

    /// The frame's room if its id is valid and the user is a member; otherwise the error is
    /// answered and `None` returned.
    async fn member_room(&self, rid: Option<&str>, name: &str) -> Option<RoomId> {
        let room = self.room_id(rid, name).await?;
        match self.state.rooms.member_state(&room, &self.user).await {
            Ok(_) => Some(room),
            Err(e) => {
                self.room_error(rid, name, &e).await;
                None
            }
        }
    }

    async fn subscribe(&mut self, rid: Option<&str>, body: &Frame<'_>, removals: &Arc<Removals>) {
        #[derive(Deserialize)]
        struct Subscribe {
            rooms: Positions,
        }
        let Some(Subscribe {
            rooms: Positions(rooms),
        }) = self.fields::<Subscribe>("subscribe", rid, body).await
        else {
            return;
        };
        if rooms.is_empty() {
            let message = "rooms must name at least one room (unsubscribe leaves one)";
            return self.error(rid, ErrorCode::BadRequest, message).await;
        }
        let max_rooms = self.state.config.max_rooms_per_subscribe;
        if rooms.len() > max_rooms {
            return self
                .error(
                    rid,
                    ErrorCode::BadRequest,
                    &format!("at most {max_rooms} rooms per subscribe"),
                )
                .await;
        }
        for (name, from) in rooms {
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
            if let Err(e) = self.subscribe_room(rid, &room, from, removals).await {
                self.room_error(rid, &name, &e).await;
            }
        }
    }

    async fn subscribe_room(
        &mut self,
        rid: Option<&str>,
        room: &RoomId,
        from: Option<u64>,
        removals: &Arc<Removals>,
    ) -> Result<(), RoomError> {
        let rooms = &self.state.rooms;
        // Members only, before anything of the room is read (a stranger learns nothing of it).
        rooms.member_state(room, &self.user).await?;
        let (follower, bounds) = Box::pin(self.state.hub.follow_from(room, from))
            .await
            .map_err(RoomError::from)?;
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
        // The follower ends the subscription at the user's removal if it is after `after`;
        // one at or below it (a removal that landed meanwhile, or that a cached state has not
        // seen yet) must be known now: the state through `after` says whether the user is a
        // member there, and where the current membership began (a removal before it, followed
        // by a new invitation, is history the replay shows, not the end of this subscription).
        let state = Box::pin(rooms.state_through(room, after)).await?;
        let Some(&joined) = state.members.get(&self.user) else {
            return Err(RoomError::Forbidden("not a member of this room".into()));
        };
        // Replacing a subscription: the old forwarder stops before the new one starts. Its
        // presence goes only once the new one's is there (the user never shows offline).
        let previous_presence = self.subscriptions.remove(room).map(|old| {
            drop(old._source);
            old._here
        });
        let mut fields = json!({"room": room, "head": bounds.last});
        if after + 1 < bounds.first {
            fields["truncated"] = json!(true);
        }
        self.send(protocol::reply("subscribed", rid, fields)).await;
        let mut follower = follower;
        follower.listen(self.user.clone(), self.out.ephemeral_handle());
        let (source, end) = RoomSource::new(
            follower,
            self.state.rooms.clone(),
            self.user.clone(),
            joined,
            removals.clone(),
        );
        self.out.follow(Box::pin(source));
        let here = self.state.presence.here(room, &self.user);
        drop(previous_presence);
        self.subscriptions.insert(
            room.clone(),
            Subscription {
                _source: end,
                _here: here,
            },
        );
        Ok(())
    }

    async fn unsubscribe(&mut self, rid: Option<&str>, body: &Frame<'_>) {
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

    /// Puts an append frame into the session's pipeline (see [`Appends`]). A frame that cannot
    /// be read comes back as the `error` frame answering it, for the caller to send in its turn.
    /// Not `async`: nothing here waits, and every append would otherwise box a future of
    /// more than a KiB (glibc's slow path) only to hold the rare error's reply.
    fn append(&mut self, kind: &str, rid: Option<&str>, body: &Frame<'_>) -> Result<(), String> {
        let frame = self.read_append(kind, rid, body).inspect_err(|_| {
            self.state.stats.errors.fetch_add(1, Ordering::Relaxed);
        })?;
        let rooms = self.state.rooms.clone();
        let user = self.user.clone();
        let (room, id, command) = (frame.room.clone(), frame.id, frame.command.clone());
        let checks = tracing::info_span!(parent: &frame.span, "chat.append.decide");
        self.appends_mut().deciding.push_back(Box::pin(
            async move {
                let decided = rooms.decide_append(&user, &room, id, command).await;
                Decided::Append(frame, decided)
            }
            .instrument(checks),
        ));
        Ok(())
    }

    /// An append frame's fields, or the `error` frame answering it.
    fn read_append(
        &self,
        kind: &str,
        rid: Option<&str>,
        body: &Frame<'_>,
    ) -> Result<AppendFrame, String> {
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
        let frame = body.fields::<Append>().map_err(|e| {
            let message = format!("{kind} frame: {e}");
            // The room the frame is about, when it names one, as every error about one says.
            match frame_room(body) {
                Some(room) => protocol::room_error(rid, &room, "bad_request", &message),
                None => protocol::error(rid, ErrorCode::BadRequest, &message),
            }
        })?;
        let refuse =
            |e: RoomError| protocol::room_error(rid, &frame.room, e.code(), &e.to_string());
        let room = RoomId::parse(&frame.room)
            .map_err(|e| refuse(RoomError::BadRequest(format!("room: {e}"))))?;
        let id = match frame.id.as_str().map(Uuid::parse_str) {
            Some(Ok(id)) => id,
            _ => {
                return Err(refuse(RoomError::BadRequest(
                    "id must be a UUID string".into(),
                )))
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
        }
        .map_err(refuse)?;
        let span = tracing::info_span!(
            "chat.append",
            chat.kind = kind,
            chat.room = %room,
            chat.user = %self.user,
            chat.event_id = %id,
            chat.seq = tracing::field::Empty,
            chat.duplicate = tracing::field::Empty,
            error.type = tracing::field::Empty,
            otel.status_code = tracing::field::Empty,
        );
        Ok(AppendFrame {
            span,
            rid: rid.map(str::to_owned),
            room,
            id,
            command,
            arrived: Instant::now(),
        })
    }

    /// The next decided frame of the pipeline (in the client's order): sends its event to the
    /// log, and queues the wait for the log's answer.
    async fn decided(&mut self, decided: Decided) {
        let (frame, decided) = match decided {
            Decided::Append(frame, decided) => (frame, decided),
            Decided::Reply(reply) => return self.settled_in_turn(Settled::Reply(reply)).await,
        };
        let sent = match decided {
            Ok(decided) => {
                let traceparent = traceparent(&frame.span);
                self.state.rooms.send_append(decided, traceparent).await
            }
            Err(e) => Err(e),
        };
        let retry = Retry {
            rooms: self.state.rooms.clone(),
            user: self.user.clone(),
            out: self.out.clone(),
            stats: self.state.stats.clone(),
            append_retry: self.state.config.append_retry,
        };
        let answer = tracing::info_span!(parent: &frame.span, "chat.append.ack");
        self.appends_mut().settling.push_back(Box::pin(
            async move {
                let first = match sent {
                    Ok(pending) => pending.ack().await,
                    Err(e) => Err(e),
                };
                let result = retry.until_known(&frame, first).await;
                Settled::Append(frame, result)
            }
            .instrument(answer),
        ));
    }

    /// Queues `settled` behind the appends still waiting for the log, or answers it now.
    async fn settled_in_turn(&mut self, settled: Settled) {
        if self.appends_mut().settling.is_empty() {
            self.settled(settled).await;
        } else {
            self.appends_mut()
                .settling
                .push_back(Box::pin(async move { settled }));
        }
    }

    /// Answers the next settled frame of the pipeline (in the client's order).
    async fn settled(&mut self, settled: Settled) {
        let reply = self.settle(settled);
        self.send(reply).await;
    }

    /// The frame answering a settled frame: its ack, its error, or the reply it is. Apart from
    /// [`Session::settled`]'s one wait, so that the future boxed for every append stays small.
    fn settle(&mut self, settled: Settled) -> String {
        let (frame, ack) = match settled {
            Settled::Append(frame, Ok(ack)) => (frame, ack),
            Settled::Append(frame, Err(e)) => {
                self.record_append(&frame, e.code());
                frame.span.record("error.type", e.code());
                if matches!(e, RoomError::Unavailable(_) | RoomError::Internal(_)) {
                    frame.span.record("otel.status_code", "ERROR");
                }
                return self.room_error_frame(frame.rid.as_deref(), frame.room.as_str(), &e);
            }
            Settled::Reply(reply) => return reply,
        };
        self.state.stats.appends.fetch_add(1, Ordering::Relaxed);
        self.record_append(&frame, if ack.duplicate { "duplicate" } else { "ok" });
        // Integers go to traces as `i64` (a `u64` would go as a string).
        frame
            .span
            .record("chat.seq", i64::try_from(ack.seq).unwrap_or(i64::MAX));
        frame.span.record("chat.duplicate", ack.duplicate);
        if matches!(frame.command, Command::Send { .. }) {
            // The message ends the indicator (each edge's feed sees it): the next keystroke
            // starts a new one (shown once 2 s have passed since the last, see `typing.rs`).
            self.typing.remove(&frame.room);
            // The message moves the user's read cursor: a `read` below it is behind now.
            self.state.reads.sent(&frame.room, &self.user, ack.seq);
        }
        protocol::ack(
            frame.rid.as_deref(),
            frame.room.as_str(),
            &frame.id,
            ack.seq,
            ack.ts,
            ack.duplicate,
        )
    }

    /// Records an answered append's latency in `chat.edge.append.duration`.
    fn record_append(&self, frame: &AppendFrame, outcome: &'static str) {
        self.state.metrics.append_duration.record(
            frame.arrived.elapsed().as_secs_f64(),
            &[
                KeyValue::new("kind", frame.command.kind()),
                KeyValue::new("outcome", outcome),
            ],
        );
    }

    /// Answers a frame after the appends the client sent before it (now, if there are none).
    async fn reply_in_turn(&mut self, reply: String) {
        if self.appends_mut().deciding.is_empty() {
            self.settled_in_turn(Settled::Reply(reply)).await;
        } else {
            self.appends_mut()
                .deciding
                .push_back(Box::pin(async move { Decided::Reply(reply) }));
        }
    }

    /// Answers every append in the pipeline (a frame of another kind waits for them; so do a
    /// drain and a token expiry before the socket closes).
    async fn finish_appends(&mut self) {
        while !self.appends_mut().is_empty() {
            let appends = self.appends.get_mut().unwrap_or_else(|p| p.into_inner());
            tokio::select! {
                biased;
                _ = self.out.stopped() => return,
                Some(settled) = appends.settling.next(), if !appends.settling.is_empty() => {
                    self.settled(settled).await;
                }
                Some(decided) = appends.deciding.next(), if !appends.deciding.is_empty() => {
                    self.decided(decided).await;
                }
            }
        }
    }

    /// `{"type":"typing","room":…,"active":…}`: no reply; members only. A session publishes
    /// every `active:true` it admits, so a renewal moves the expiry the others see; what they
    /// see (one `active:true` per debounce interval) is decided by each edge's feed, see
    /// [`crate::typing`].
    async fn typing(&mut self, rid: Option<&str>, body: &Frame<'_>) {
        #[derive(Deserialize)]
        struct Typing {
            room: String,
            active: bool,
        }
        let Some(frame) = self.fields::<Typing>("typing", rid, body).await else {
            return;
        };
        // Over the user's typing bucket an `active:true` is dropped without an answer: what a
        // client sends on every keystroke is coalesced here as the feed coalesces it anyway (one
        // shown per debounce interval), not refused and counted towards a 4029 close. A flood
        // still meets the connection's bucket. `active:false` is never dropped: it only ends
        // an indicator this session started.
        if frame.active && self.state.limits.check(Work::Typing, &self.user).is_err() {
            self.state
                .stats
                .rate_limited
                .fetch_add(1, Ordering::Relaxed);
            return;
        }
        if !frame.active {
            // Ends only an indicator this session started: otherwise there is nothing to do,
            // and no need to ask whether the user is a member.
            let Some(room) = self.room_id(rid, &frame.room).await else {
                return;
            };
            if !self.typing.contains(&room) {
                return;
            }
        }
        let Some(room) = self.member_room(rid, &frame.room).await else {
            return;
        };
        if frame.active {
            // Every renewal goes out (the typing rate limit bounds them): each edge shows one
            // `active:true` per debounce interval, and a renewal within it moves the expiry.
            self.typing.insert(room.clone());
        } else if !self.typing.remove(&room) {
            return;
        }
        let published = self
            .state
            .hub
            .publish_typing(&room, &self.user, frame.active)
            .await;
        if let Err(e) = published {
            self.room_error(rid, &frame.room, &e.into()).await;
        }
    }

    /// `{"type":"delivered","room":…,"seq":…}`: no reply; members only. The client says its
    /// device has received the room up to `seq` (explicit, because a frame written to a socket
    /// is not a frame the device received). Only recorded here: the edge appends every room's
    /// recorded cursors as one event per interval (see [`crate::delivered`]).
    async fn delivered(&mut self, rid: Option<&str>, body: &Frame<'_>) {
        #[derive(Deserialize)]
        struct Delivered {
            room: String,
            seq: u64,
        }
        let Some(frame) = self.fields::<Delivered>("delivered", rid, body).await else {
            return;
        };
        let Some(room) = self.member_room(rid, &frame.room).await else {
            return;
        };
        let delivered = &self.state.delivered;
        if !delivered.within_known_head(&room, frame.seq) {
            match self.state.rooms.log().head(&room).await {
                Ok(head) if frame.seq > head => {
                    let e = RoomError::BadRequest(format!(
                        "seq {} is above the room's head {head}",
                        frame.seq
                    ));
                    return self.room_error(rid, &frame.room, &e).await;
                }
                Ok(head) => delivered.note_head(&room, head),
                Err(e) => return self.room_error(rid, &frame.room, &e.into()).await,
            }
        }
        delivered.record(&room, &self.user, frame.seq);
    }

    async fn read(&mut self, rid: Option<&str>, body: &Frame<'_>) {
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
        // Members only (checked first: a stranger learns nothing of the room), and never above
        // the head; the rest is up to the edge's shared read cursors.
        let checked = match self
            .state
            .rooms
            .check_read(&self.user, &room, frame.seq)
            .await
        {
            Ok(state) => state,
            Err(e) => return self.room_error(rid, &frame.room, &e).await,
        };
        if let Err(e) = self
            .state
            .reads
            .read(&self.state.rooms, &room, &self.user, frame.seq, checked)
            .await
        {
            self.room_error(rid, &frame.room, &e).await;
        }
    }

    async fn history(&mut self, rid: Option<&str>, body: &Frame<'_>) {
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

/// Waits for `{"type":"auth","token":…}` as the first frame, within the configured time: the
/// token's identity and the frame's `rid`. Refused first frames: the close code and reason.
async fn first_frame_auth(
    socket: &mut WsRead,
    state: &EdgeState,
) -> Result<(Identity, Option<String>), (u16, String)> {
    let refused = |reason: &str| (close_code::TOKEN, reason.to_owned());
    let deadline = Instant::now() + state.config.auth_timeout;
    loop {
        let message = tokio::select! {
            _ = sleep_until(deadline) => return Err(refused("no auth frame in time")),
            message = socket.next() => message,
        };
        match message {
            Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
            Some(Ok(Message::Text(text))) if text.len() > state.config.max_frame_bytes => {
                return Err((close_code::TOO_BIG, "frame too big".to_owned()))
            }
            Some(Ok(Message::Binary(bytes))) if bytes.len() > state.config.max_frame_bytes => {
                return Err((close_code::TOO_BIG, "frame too big".to_owned()))
            }
            Some(Ok(Message::Text(text))) => {
                let frame = protocol::parse(&text).map_err(|m| refused(&m.message))?;
                if frame.kind != "auth" {
                    return Err(refused("the first frame must be auth"));
                }
                #[derive(Deserialize)]
                struct Auth {
                    token: Option<Value>,
                }
                let token = frame
                    .fields::<Auth>()
                    .ok()
                    .and_then(|auth| match auth.token {
                        Some(Value::String(token)) => Some(token),
                        _ => None,
                    })
                    .ok_or_else(|| refused("auth frame without a token"))?;
                return state
                    .verifier
                    .verify(&token)
                    .map(|identity| (identity, frame.rid))
                    .map_err(|e| refused(&e.to_string()));
            }
            Some(Ok(_)) => return Err(refused("the first frame must be an auth text frame")),
            // A text frame that is not UTF-8 is one more first frame that is not `auth` (4001,
            // as the contract says of any other); after it, 1007 (RFC 6455).
            Some(Err(tungstenite::Error::Utf8(_))) => {
                return Err(refused("the first frame must be an auth text frame"))
            }
            Some(Err(e)) => {
                return Err(match close_for(&e) {
                    Some((code, reason)) => (code, reason.to_owned()),
                    None => refused(&format!("read failed: {e}")),
                })
            }
            None => return Err(refused("closed before authenticating")),
        }
    }
}

/// A `subscribe` frame's `rooms`: each room and where to resume it, in the client's order. A
/// room named twice is refused (as a field given twice is), not read as whichever came last.
struct Positions(Vec<(String, Value)>);

impl<'de> Deserialize<'de> for Positions {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl<'de> serde::de::Visitor<'de> for Visitor {
            type Value = Positions;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("an object of room ids and positions")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut map: A,
            ) -> Result<Positions, A::Error> {
                let mut rooms: Vec<(String, Value)> = Vec::new();
                let mut seen = HashSet::new();
                while let Some((room, from)) = map.next_entry::<String, Value>()? {
                    if !seen.insert(room.clone()) {
                        return Err(serde::de::Error::custom(format_args!(
                            "room {room:?} given twice"
                        )));
                    }
                    rooms.push((room, from));
                }
                Ok(Positions(rooms))
            }
        }
        d.deserialize_map(Visitor)
    }
}

/// The `room` a frame names, if it names a valid room id (whatever else is wrong with it; an
/// invalid one is not echoed back).
/// How many rooms a `subscribe` frame names (1 when it cannot say: the frame is refused later).
fn subscribe_rooms(frame: &Frame<'_>) -> u32 {
    #[derive(Deserialize)]
    struct Rooms {
        rooms: Option<serde_json::Map<String, Value>>,
    }
    frame
        .fields::<Rooms>()
        .ok()
        .and_then(|f| f.rooms)
        .map_or(1, |rooms| u32::try_from(rooms.len()).unwrap_or(u32::MAX))
}

fn frame_room(frame: &Frame<'_>) -> Option<String> {
    #[derive(Deserialize)]
    struct About {
        room: Option<Value>,
    }
    match frame.fields::<About>().ok()?.room {
        Some(Value::String(room)) if RoomId::parse(room.as_str()).is_ok() => Some(room),
        _ => None,
    }
}

/// The W3C `traceparent` of an append's span when it is exported (an OpenTelemetry span, sampled),
/// for the event to carry into the log: the projector links its commit to it. Nothing while
/// traces are off.
fn traceparent(span: &tracing::Span) -> Option<String> {
    use opentelemetry::trace::TraceContextExt as _;
    use tracing_opentelemetry::OpenTelemetrySpanExt as _;
    if span.is_disabled() {
        return None;
    }
    let context = span.context();
    let span = context.span();
    let span = span.span_context();
    (span.is_valid() && span.is_sampled()).then(|| {
        format!(
            "00-{}-{}-{:02x}",
            span.trace_id(),
            span.span_id(),
            span.trace_flags().to_u8()
        )
    })
}

/// Whether a read error ends the connection (rather than refusing one frame).
fn is_terminal(e: &tungstenite::Error) -> bool {
    matches!(
        e,
        tungstenite::Error::ConnectionClosed
            | tungstenite::Error::AlreadyClosed
            | tungstenite::Error::Io(_)
    )
}

/// How to close after a failed read: 1009 for a frame past the library's bound, 1007 for a text
/// frame that is not UTF-8, 1002 for a breach of the protocol; `None` when the connection is
/// gone (nothing can be sent).
fn close_for(e: &tungstenite::Error) -> Option<(u16, &'static str)> {
    match e {
        tungstenite::Error::Capacity(_) => Some((close_code::TOO_BIG, "frame too big")),
        tungstenite::Error::Utf8(_) => Some((close_code::INVALID_DATA, "text frame is not UTF-8")),
        tungstenite::Error::Protocol(_) => Some((close_code::PROTOCOL, "websocket protocol error")),
        _ => None,
    }
}
