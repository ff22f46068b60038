//! Appending to and reading from rooms' streams.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use async_nats::header::{
    NATS_EXPECTED_LAST_SEQUENCE, NATS_EXPECTED_LAST_SUBJECT_SEQUENCE, NATS_MESSAGE_ID,
};
use async_nats::jetstream::{self, context::PublishErrorKind, response::Response, stream};
use async_nats::{Client, ConnectOptions, HeaderMap};

use crate::wire::{WireAuth, WireTarget};
use bytes::Bytes;
use chat_model::{Event, RoomId};
use tokio::sync::broadcast;

use crate::config::{ConfigError, LogConfig, ROOM_METADATA_KEY};
use crate::error::LogError;
use crate::live::LiveSubscription;
use crate::range::RangeReader;

/// How often a duplicate acknowledged without a sequence (possible on a clustered stream while
/// the original is still being committed) is asked again before giving up as unavailable.
const ZERO_SEQ_RETRIES: u32 = 8;
/// Capacity of the connection-event broadcast each live subscription listens to.
const CONNECTION_EVENTS_CAPACITY: usize = 256;
/// The W3C trace-context header an event may carry (see [`RoomLog::send_traced`]).
pub const TRACEPARENT: &str = "traceparent";

/// The outcome of an append.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Appended {
    /// The event's sequence in its room: never 0.
    pub seq: u64,
    /// True when the event id was already in the log: `seq` is the original event's.
    pub duplicate: bool,
}

/// One stored entry of a room's log, not yet decoded (a reader decides what to do with bytes it
/// cannot decode; they must never stop the room).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RawEntry {
    pub seq: u64,
    pub payload: Bytes,
}

impl RawEntry {
    pub fn decode(&self) -> Result<Event, chat_model::DecodeError> {
        Event::decode(&self.payload)
    }
}

/// The sequences a room's stream holds: `first..=last`; `last == 0` for an empty room.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RoomBounds {
    pub first: u64,
    pub last: u64,
}

/// What the NATS connection went through; live subscriptions re-check heads on these.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConnectionEvent {
    Connected,
    Disconnected,
    SlowConsumer,
    /// The server refused the credentials (an authorization violation, or a nonce that could
    /// not be signed); the client library goes on trying.
    Refused,
}

/// Slow-consumer notices passed on at most once per [`SLOW_NOTICE_EVERY`]: the first of a burst
/// at once, and one more after the burst (so every drop is followed by a notice).
#[derive(Default)]
struct SlowNotices {
    state: std::sync::Mutex<SlowState>,
}

#[derive(Default)]
struct SlowState {
    /// When a notice was last passed on.
    sent: Option<std::time::Instant>,
    /// A notice is due at the end of the interval (a task waits to send it).
    due: bool,
    /// Notices received since the last one passed on.
    dropped: u64,
}

const SLOW_NOTICE_EVERY: Duration = Duration::from_secs(1);

impl SlowNotices {
    fn notice(self: Arc<Self>, tx: broadcast::Sender<ConnectionEvent>) {
        let Ok(mut state) = self.state.lock() else {
            return;
        };
        state.dropped += 1;
        let now = std::time::Instant::now();
        match state.sent {
            Some(sent) if now.duration_since(sent) < SLOW_NOTICE_EVERY => {
                if !state.due {
                    state.due = true;
                    let wait = SLOW_NOTICE_EVERY - now.duration_since(sent);
                    let this = self.clone();
                    tokio::spawn(async move {
                        tokio::time::sleep(wait).await;
                        this.pass_on(&tx);
                    });
                }
            }
            _ => {
                drop(state);
                self.pass_on(&tx);
            }
        }
    }

    fn pass_on(&self, tx: &broadcast::Sender<ConnectionEvent>) {
        let dropped = match self.state.lock() {
            Ok(mut state) => {
                state.sent = Some(std::time::Instant::now());
                state.due = false;
                std::mem::take(&mut state.dropped)
            }
            Err(_) => return,
        };
        tracing::warn!(notices = dropped, "nats slow consumer: messages dropped");
        let _ = tx.send(ConnectionEvent::SlowConsumer);
    }
}

/// A receiver of [`ConnectionEvent`]s.
pub type ConnectionEvents = broadcast::Receiver<ConnectionEvent>;

/// Failure to list the rooms (NATS unreachable or the request refused).
#[derive(Debug, thiserror::Error)]
#[error("list rooms: {0}")]
pub struct ListRoomsError(pub String);

/// Failure to connect the room log.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("room log settings: {0}")]
    Config(#[from] ConfigError),
    #[error("nats url {url:?}: {reason}")]
    Url { url: String, reason: String },
    /// The client library's error is in the message and not a `source`: its own chain repeats
    /// what its message already says.
    #[error("connect to nats at {url}: {error}")]
    Nats {
        url: String,
        error: async_nats::ConnectError,
    },
}

/// Handle to every room's log. Cheap to clone; clones share one NATS connection.
#[derive(Clone)]
pub struct RoomLog {
    inner: Arc<Inner>,
}

struct Inner {
    /// The NATS connection (core subscriptions for live subjects).
    client: Client,
    /// JetStream API on the same connection (appends, stream info, reads).
    js: jetstream::Context,
    /// Validated settings.
    config: LogConfig,
    /// Connection events fanned out to live subscriptions.
    events: broadcast::Sender<ConnectionEvent>,
    /// Where bulk range reads open connections of their own; `None`: through the client
    /// library (see [`crate::wire`]).
    wire: std::sync::RwLock<Option<WireTarget>>,
    /// Bulk range reads done on connections of their own.
    wire_reads: std::sync::atomic::AtomicU64,
}

/// How often an idle NATS connection is pinged.
const PING_EVERY: Duration = Duration::from_secs(5);

impl RoomLog {
    /// Connects to NATS at `url` (comma-separated for several servers).
    pub async fn connect(url: &str, config: LogConfig) -> Result<RoomLog, ConnectError> {
        RoomLog::connect_with_options(url, ConnectOptions::new(), config).await
    }

    /// Connects with caller-chosen options. The event callback is replaced by the room log's own
    /// (it must see reconnects and slow-consumer notices).
    pub async fn connect_with_options(
        url: &str,
        options: ConnectOptions,
        config: LogConfig,
    ) -> Result<RoomLog, ConnectError> {
        config.validate()?;
        let (events, _) = broadcast::channel(CONNECTION_EVENTS_CAPACITY);
        let events_tx = events.clone();
        let slow = Arc::new(SlowNotices::default());
        let options = options
            .request_timeout(Some(config.request_timeout))
            // Two pings unanswered end the connection (and the client reconnects): a server
            // that hangs is found within ~15 s, not the library's ~3 minutes.
            .ping_interval(PING_EVERY)
            .event_callback(move |event| {
                let events_tx = events_tx.clone();
                let slow = slow.clone();
                async move {
                    // One notice per message dropped, on any subscription of the connection:
                    // every live feed re-reads its room's head on each, so a burst of them is
                    // passed on as one now and one when it is over.
                    if let async_nats::Event::SlowConsumer(_) = event {
                        slow.notice(events_tx);
                        return;
                    }
                    let forwarded = match event {
                        async_nats::Event::Connected => Some(ConnectionEvent::Connected),
                        async_nats::Event::Disconnected => Some(ConnectionEvent::Disconnected),
                        async_nats::Event::ServerError(
                            async_nats::ServerError::AuthorizationViolation,
                        ) => Some(ConnectionEvent::Refused),
                        // How the client library reports a refused connection attempt.
                        async_nats::Event::ClientError(async_nats::ClientError::Other(ref e))
                            if e == "authorization violation" || e == "failed signing nonce" =>
                        {
                            Some(ConnectionEvent::Refused)
                        }
                        _ => None,
                    };
                    match forwarded {
                        Some(ConnectionEvent::Refused) => {
                            tracing::warn!(event = %event, "nats refused the credentials")
                        }
                        Some(_) => tracing::info!(event = %event, "nats connection"),
                        None => tracing::warn!(event = %event, "nats"),
                    }
                    if let Some(ev) = forwarded {
                        let _ = events_tx.send(ev);
                    }
                }
            });
        let servers = parse_servers(url)?;
        let wire = WireTarget {
            servers: servers
                .iter()
                .filter(|s| !s.tls_required() && !s.is_websocket())
                .map(|s| (s.host().to_owned(), s.port()))
                .collect(),
            auth: WireAuth::None,
        };
        let wire = (!wire.servers.is_empty()).then_some(wire);
        let client = options
            .connect(servers)
            .await
            .map_err(|error| ConnectError::Nats {
                url: url.to_owned(),
                error,
            })?;
        Ok(RoomLog::from_parts(client, config, events, wire))
    }

    fn from_parts(
        client: Client,
        config: LogConfig,
        events: broadcast::Sender<ConnectionEvent>,
        wire: Option<WireTarget>,
    ) -> RoomLog {
        let js = jetstream::ContextBuilder::new()
            .timeout(config.request_timeout)
            .ack_timeout(config.request_timeout)
            .build(client.clone());
        RoomLog {
            inner: Arc::new(Inner {
                client,
                js,
                config,
                events,
                wire: std::sync::RwLock::new(wire),
                wire_reads: std::sync::atomic::AtomicU64::new(0),
            }),
        }
    }

    /// The credentials bulk range reads present on their own connections: those of the main
    /// connection (by default none). `None` makes them read through the client library, as a
    /// connection over TLS, or with an nkey or a credentials file, has to.
    pub fn set_bulk_read_auth(&self, auth: Option<WireAuth>) {
        let mut wire = self.inner.wire.write().unwrap_or_else(|p| p.into_inner());
        match auth {
            Some(auth) => {
                if let Some(wire) = wire.as_mut() {
                    wire.auth = auth;
                }
            }
            None => *wire = None,
        }
    }

    /// Where bulk reads connect, unless they go through the client library.
    pub(crate) fn wire_target(&self) -> Option<WireTarget> {
        self.inner
            .wire
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Bulk reads cannot use connections of their own here (the server wants TLS, say): from
    /// now on they read through the client library.
    pub(crate) fn disable_wire_reads(&self, reason: &str) {
        let mut wire = self.inner.wire.write().unwrap_or_else(|p| p.into_inner());
        if wire.take().is_some() {
            tracing::info!(reason, "bulk reads go through the client library");
        }
    }

    pub(crate) fn count_wire_read(&self) {
        self.inner
            .wire_reads
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }

    /// How many range reads went over connections of their own (see [`RoomLog::set_bulk_read_auth`]).
    pub fn wire_reads(&self) -> u64 {
        self.inner
            .wire_reads
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    pub fn config(&self) -> &LogConfig {
        &self.inner.config
    }

    /// The underlying NATS connection (for core subjects outside the log, e.g. typing).
    pub fn client(&self) -> &Client {
        &self.inner.client
    }

    /// Connection events from now on.
    pub fn connection_events(&self) -> ConnectionEvents {
        self.inner.events.subscribe()
    }

    /// How many times the connection has been (re)established; lets readers notice a reconnect
    /// even if its event was dropped.
    pub(crate) fn connects(&self) -> u64 {
        self.inner
            .client
            .statistics()
            .connects
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// The stream settings of a room (see the crate docs).
    pub fn stream_config(&self, room: &RoomId) -> stream::Config {
        let cfg = &self.inner.config;
        stream::Config {
            name: cfg.stream_name(room),
            description: Some(format!("chat room {room}")),
            subjects: vec![cfg.room_subject(room), cfg.room_state_subject(room)],
            storage: stream::StorageType::File,
            num_replicas: cfg.replicas,
            duplicate_window: cfg.duplicate_window,
            max_message_size: i32::try_from(cfg.max_event_bytes).unwrap_or(i32::MAX),
            deny_delete: true,
            deny_purge: true,
            allow_direct: true,
            republish: Some(stream::Republish {
                // Both subjects, in the stream's one order.
                source: cfg.republish_source(room),
                destination: cfg.live_subject(room),
                headers_only: false,
            }),
            metadata: HashMap::from([(ROOM_METADATA_KEY.to_owned(), room.to_string())]),
            ..Default::default()
        }
    }

    /// Makes sure the room's stream exists (creating it if needed) and belongs to this room.
    ///
    /// An existing stream whose settings an operator changed (retention, replicas) is left as it
    /// is.
    pub async fn ensure_room(&self, room: &RoomId) -> Result<(), LogError> {
        let config = self.stream_config(room);
        let name = config.name.clone();
        let info = match self.inner.js.create_stream(config).await {
            Ok(stream) => stream.cached_info().clone(),
            Err(e) if e.kind() == jetstream::context::CreateStreamErrorKind::TimedOut => {
                return Err(LogError::Timeout {
                    room: room.clone(),
                    op: "create stream",
                });
            }
            Err(e) => {
                // Exists with other settings, or a transient failure: ask what is there.
                tracing::debug!(room = %room, error = %e, "create stream refused; reading its info");
                match self.stream_info(room, "create stream").await {
                    Ok(info) => info,
                    // Not there and not creatable now (e.g. fewer servers up than replicas):
                    // the room is unavailable, not unknown.
                    Err(LogError::RoomNotFound { .. }) => {
                        return Err(LogError::Unavailable {
                            room: room.clone(),
                            op: "create stream",
                            reason: e.to_string(),
                        })
                    }
                    Err(other) => return Err(other),
                }
            }
        };
        let owner = info.config.metadata.get(ROOM_METADATA_KEY);
        if owner.map(String::as_str) != Some(room.as_str()) {
            return Err(LogError::StreamConflict {
                room: room.clone(),
                stream: name,
                owner: owner.cloned(),
            });
        }
        if info.config.num_replicas > 1 {
            self.wait_for_stream_leader(room, info).await?;
        }
        Ok(())
    }

    /// A replicated stream takes appends once its Raft group has elected a leader; a room is
    /// not reported ready before that.
    async fn wait_for_stream_leader(
        &self,
        room: &RoomId,
        mut info: stream::Info,
    ) -> Result<(), LogError> {
        let deadline = tokio::time::Instant::now() + self.inner.config.request_timeout;
        let mut pause = Duration::from_millis(5);
        loop {
            if info
                .cluster
                .as_ref()
                .is_some_and(|c| c.leader.as_ref().is_some_and(|l| !l.is_empty()))
            {
                return Ok(());
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(LogError::Unavailable {
                    room: room.clone(),
                    op: "create stream",
                    reason: "the stream has no leader yet".to_owned(),
                });
            }
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(Duration::from_millis(100));
            info = self.stream_info(room, "create stream").await?;
        }
    }

    /// Whether the room's stream exists.
    pub async fn room_exists(&self, room: &RoomId) -> Result<bool, LogError> {
        match self.stream_info(room, "stream info").await {
            Ok(_) => Ok(true),
            Err(LogError::RoomNotFound { .. }) => Ok(false),
            Err(e) => Err(e),
        }
    }

    async fn stream_info(&self, room: &RoomId, op: &'static str) -> Result<stream::Info, LogError> {
        let subject = format!("STREAM.INFO.{}", self.inner.config.stream_name(room));
        let response: Response<stream::Info> = self
            .inner
            .js
            .request(subject, &serde_json::json!({}))
            .await
            .map_err(|e| request_error(room, op, e))?;
        match response {
            Response::Ok(info) => Ok(info),
            Response::Err { error }
                if error.error_code() == jetstream::ErrorCode::STREAM_NOT_FOUND =>
            {
                Err(LogError::RoomNotFound { room: room.clone() })
            }
            Response::Err { error } => Err(LogError::JetStream {
                room: room.clone(),
                op,
                reason: error.to_string(),
            }),
        }
    }

    /// The sequences the room's stream holds.
    pub async fn bounds(&self, room: &RoomId) -> Result<RoomBounds, LogError> {
        let state = self.stream_info(room, "stream info").await?.state;
        Ok(RoomBounds {
            first: state.first_sequence,
            last: state.last_sequence,
        })
    }

    /// The room's last sequence (0 when empty).
    /// How many streams the NATS account holds (rooms of every deployment sharing it, and the
    /// user logs): what a cap on rooms is judged by.
    pub async fn stream_count(&self) -> Result<u64, LogError> {
        let unavailable = |reason: String| LogError::Unavailable {
            room: RoomId::parse("account").expect("a valid room id"),
            op: "count streams",
            reason,
        };
        let info = tokio::time::timeout(
            self.inner.config.request_timeout,
            self.inner.js.query_account(),
        )
        .await
        .map_err(|_| unavailable("timed out".to_owned()))?
        .map_err(|e| unavailable(e.to_string()))?;
        Ok(info.streams as u64)
    }

    pub async fn head(&self, room: &RoomId) -> Result<u64, LogError> {
        Ok(self.bounds(room).await?.last)
    }

    /// Appends an event; its `id` is the idempotency key (`Nats-Msg-Id`).
    pub async fn append(&self, room: &RoomId, event: &Event) -> Result<Appended, LogError> {
        self.append_event(room, event, None).await
    }

    /// Appends an event only if the room's last sequence is `expected_last` (e.g. 0 to be the
    /// room's first event); otherwise [`LogError::WrongLastSequence`].
    pub async fn append_if_last(
        &self,
        room: &RoomId,
        event: &Event,
        expected_last: u64,
    ) -> Result<Appended, LogError> {
        self.append_event(room, event, Some(expected_last)).await
    }

    async fn append_event(
        &self,
        room: &RoomId,
        event: &Event,
        expected_last: Option<u64>,
    ) -> Result<Appended, LogError> {
        self.send_event(room, event, Condition::from(expected_last))
            .await?
            .appended()
            .await
    }

    /// Appends a change of the room's membership or settings, decided on a state that includes
    /// the change at `last_change` (from [`RoomLog::last_change`]), only if no other change has
    /// been appended since; otherwise [`LogError::WrongLastSequence`]. Messages appended in
    /// between do not matter: they cannot change what was decided.
    pub async fn append_change(
        &self,
        room: &RoomId,
        event: &Event,
        last_change: u64,
    ) -> Result<Appended, LogError> {
        self.send_event(room, event, Condition::LastChange(last_change))
            .await?
            .appended()
            .await
    }

    /// The sequence of the room's last change appended with [`RoomLog::append_change`] (0 if
    /// none). A stream made before changes had their own subject gains that subject here.
    pub async fn last_change(&self, room: &RoomId) -> Result<u64, LogError> {
        let cfg = &self.inner.config;
        let info = self.stream_info(room, "last change").await?;
        let subject = cfg.room_state_subject(room);
        if !info.config.subjects.contains(&subject) {
            self.add_state_subject(room, info.config).await?;
            return Ok(0);
        }
        let last = self
            .direct_get(room, "last change", DirectGet::LastOf(subject))
            .await?;
        Ok(last.map_or(0, |msg| msg.sequence))
    }

    /// Adds the state subject to a stream made with the room's subject alone, and widens its
    /// republishing to both (the rest of its settings stay as they are).
    async fn add_state_subject(
        &self,
        room: &RoomId,
        mut config: stream::Config,
    ) -> Result<(), LogError> {
        let cfg = &self.inner.config;
        config.subjects.push(cfg.room_state_subject(room));
        if let Some(republish) = config.republish.as_mut() {
            republish.source = cfg.republish_source(room);
        }
        tracing::info!(room = %room, "adding the state subject to the room's stream");
        self.inner
            .js
            .update_stream(config)
            .await
            .map(|_| ())
            .map_err(|e| LogError::JetStream {
                room: room.clone(),
                op: "add the state subject",
                reason: e.to_string(),
            })
    }

    /// Appends already-encoded bytes under the idempotency key `msg_id`.
    ///
    /// Never returns a sequence of 0: a clustered duplicate acknowledged without one is asked
    /// again (same id, so it cannot be appended twice) until the original's sequence is known.
    pub async fn append_raw(
        &self,
        room: &RoomId,
        msg_id: &str,
        payload: Bytes,
        expected_last: Option<u64>,
    ) -> Result<Appended, LogError> {
        self.send_raw(room, msg_id, payload, Condition::from(expected_last), None)
            .await?
            .appended()
            .await
    }

    /// Sends an event to the room's stream without waiting for the stream's answer; see
    /// [`PendingAppend`]. Appends sent one after another by one caller are stored in that order
    /// (one connection), so a caller may have several in flight and still keep its order.
    pub async fn send(&self, room: &RoomId, event: &Event) -> Result<PendingAppend, LogError> {
        self.send_event(room, event, Condition::None).await
    }

    /// [`RoomLog::send`], the event carrying a W3C `traceparent` header (the trace of the
    /// request that appends it), so whoever reads it can link to that trace.
    pub async fn send_traced(
        &self,
        room: &RoomId,
        event: &Event,
        traceparent: Option<String>,
    ) -> Result<PendingAppend, LogError> {
        self.send_event_traced(room, event, Condition::None, traceparent)
            .await
    }

    /// Encodes `event` and sends it under its id (see [`RoomLog::send`]).
    async fn send_event(
        &self,
        room: &RoomId,
        event: &Event,
        condition: Condition,
    ) -> Result<PendingAppend, LogError> {
        self.send_event_traced(room, event, condition, None).await
    }

    async fn send_event_traced(
        &self,
        room: &RoomId,
        event: &Event,
        condition: Condition,
        traceparent: Option<String>,
    ) -> Result<PendingAppend, LogError> {
        let payload = event.encode().map_err(|source| LogError::Encode {
            room: room.clone(),
            source,
        })?;
        let mut id = uuid::Uuid::encode_buffer();
        let id = event.id.hyphenated().encode_lower(&mut id);
        self.send_raw(room, id, payload.into(), condition, traceparent)
            .await
    }

    async fn send_raw(
        &self,
        room: &RoomId,
        msg_id: &str,
        payload: Bytes,
        condition: Condition,
        traceparent: Option<String>,
    ) -> Result<PendingAppend, LogError> {
        let max = self.inner.config.max_event_bytes;
        if payload.len() > max {
            return Err(LogError::TooLarge {
                room: room.clone(),
                size: payload.len(),
                max,
            });
        }
        let pending = PendingAppend {
            log: self.clone(),
            room: room.clone(),
            msg_id: msg_id.to_owned(),
            payload,
            condition,
            ack: None,
        };
        // This first attempt carries the trace (a later one here only asks again for the
        // sequence of what is stored; an edge's retry after an unknown outcome sends its own).
        match pending.publish(traceparent.as_deref()).await {
            Ok(ack) => Ok(PendingAppend {
                ack: Some(ack),
                ..pending
            }),
            // Boxed: working out what went wrong may read the stream, and every append's
            // future would otherwise keep room for it.
            Err(e) => Err(Box::pin(pending.error(e)).await),
        }
    }

    async fn publish_error(
        &self,
        room: &RoomId,
        expected_last: Option<u64>,
        payload_len: usize,
        e: jetstream::context::PublishError,
    ) -> LogError {
        let room_owned = || room.clone();
        match e.kind() {
            // No stream listens on the subject: the room does not exist, or JetStream is down.
            PublishErrorKind::StreamNotFound => match self.room_exists(room).await {
                Ok(false) => LogError::RoomNotFound { room: room_owned() },
                Ok(true) => LogError::Unavailable {
                    room: room_owned(),
                    op: "append",
                    reason: "no responders".to_owned(),
                },
                Err(other) => other,
            },
            PublishErrorKind::TimedOut => LogError::Timeout {
                room: room_owned(),
                op: "append",
            },
            PublishErrorKind::WrongLastSequence => LogError::WrongLastSequence {
                room: room_owned(),
                expected: expected_last.unwrap_or_default(),
                actual: self.head(room).await.unwrap_or_default(),
            },
            // The server's max_payload is below our event limit (a nats-server setting).
            PublishErrorKind::MaxPayloadExceeded => LogError::TooLarge {
                room: room_owned(),
                size: payload_len,
                max: self.inner.client.server_info().max_payload,
            },
            _ => {
                let refused_by_jetstream = std::error::Error::source(&e)
                    .is_some_and(|s| s.downcast_ref::<jetstream::Error>().is_some());
                if refused_by_jetstream {
                    LogError::JetStream {
                        room: room_owned(),
                        op: "append",
                        reason: e.to_string(),
                    }
                } else {
                    LogError::Unavailable {
                        room: room_owned(),
                        op: "append",
                        reason: e.to_string(),
                    }
                }
            }
        }
    }

    /// One entry by sequence; `None` if the log does not hold it (e.g. removed by retention).
    pub async fn get(&self, room: &RoomId, seq: u64) -> Result<Option<RawEntry>, LogError> {
        let msg = self.direct_get(room, "get", DirectGet::Seq(seq)).await?;
        Ok(msg.map(|msg| RawEntry {
            seq: msg.sequence,
            payload: msg.payload,
        }))
    }

    /// One message of the room's stream by direct get (`None`: the stream holds no such
    /// message); `op` names the operation in errors.
    async fn direct_get(
        &self,
        room: &RoomId,
        op: &'static str,
        which: DirectGet,
    ) -> Result<Option<jetstream::message::StreamMessage>, LogError> {
        let stream = self
            .inner
            .js
            .get_stream_no_info(self.inner.config.stream_name(room))
            .await
            .map_err(|e| LogError::JetStream {
                room: room.clone(),
                op,
                reason: e.to_string(),
            })?;
        let got = match which {
            DirectGet::Seq(seq) => stream.direct_get(seq).await,
            DirectGet::LastOf(subject) => stream.direct_get_last_for_subject(subject).await,
        };
        match got {
            Ok(msg) => Ok(Some(msg)),
            Err(e) => match e.kind() {
                stream::DirectGetErrorKind::NotFound => Ok(None),
                stream::DirectGetErrorKind::TimedOut => Err(LogError::Timeout {
                    room: room.clone(),
                    op,
                }),
                _ => Err(LogError::Unavailable {
                    room: room.clone(),
                    op,
                    reason: e.to_string(),
                }),
            },
        }
    }

    /// Reads `from..=to` in order, lazily and without gaps (entries the log no longer holds are
    /// skipped: compare the first entry's seq with `from` to detect truncation). `to` beyond the
    /// head is clamped to the head at the time of the first read.
    pub fn read_range(&self, room: &RoomId, from: u64, to: u64) -> RangeReader {
        RangeReader::new(self.clone(), room.clone(), from, to, true)
    }

    /// As [`RoomLog::read_range`] for a `to` the caller knows the log holds (a head it just
    /// read): the reader does not ask for the head again.
    pub fn read_known_range(&self, room: &RoomId, from: u64, to: u64) -> RangeReader {
        RangeReader::new(self.clone(), room.clone(), from, to, false)
    }

    /// A live, gap-free, duplicate-free feed of the room's events with seq > `after`: first
    /// whatever the log already holds past `after`, then each event as it is stored.
    pub async fn subscribe_live(
        &self,
        room: &RoomId,
        after: u64,
    ) -> Result<LiveSubscription, LogError> {
        let subject = self.inner.config.live_subject(room);
        let events = self.connection_events();
        let connects = self.connects();
        let subscriber =
            self.inner
                .client
                .subscribe(subject)
                .await
                .map_err(|e| LogError::Unavailable {
                    room: room.clone(),
                    op: "subscribe",
                    reason: e.to_string(),
                })?;
        Ok(LiveSubscription::new(
            self.clone(),
            room.clone(),
            subscriber,
            events,
            after,
            connects,
        ))
    }

    /// Every room of this deployment with its bounds, from the stream list (which JetStream
    /// pages, so this scales to many rooms: one request per 256 streams).
    pub async fn rooms(&self) -> Result<Vec<(RoomId, RoomBounds)>, ListRoomsError> {
        use futures::TryStreamExt;
        let cfg = &self.inner.config;
        let prefix = format!("{}_", cfg.prefix.to_ascii_uppercase());
        let mut out = Vec::new();
        let mut streams = self.inner.js.streams();
        while let Some(info) = streams
            .try_next()
            .await
            .map_err(|e| ListRoomsError(e.to_string()))?
        {
            if !info.config.name.starts_with(&prefix) {
                continue;
            }
            // A stream is a room's only if its name is that room's digest under our prefix.
            let Some(room) = info
                .config
                .metadata
                .get(ROOM_METADATA_KEY)
                .and_then(|r| RoomId::parse(r.as_str()).ok())
            else {
                continue;
            };
            if cfg.stream_name(&room) != info.config.name {
                continue;
            }
            out.push((
                room,
                RoomBounds {
                    first: info.state.first_sequence,
                    last: info.state.last_sequence,
                },
            ));
        }
        Ok(out)
    }

    pub(crate) fn jetstream(&self) -> &jetstream::Context {
        &self.inner.js
    }
}

/// Which message a direct get asks for.
enum DirectGet {
    Seq(u64),
    /// The last message on this subject.
    LastOf(String),
}

/// What an append requires of the room's stream.
#[derive(Debug, Clone, Copy)]
enum Condition {
    None,
    /// The room's last sequence is this.
    Last(u64),
    /// The room's last change (on the state subject) is at this sequence.
    LastChange(u64),
}

impl Condition {
    fn expected(self) -> Option<u64> {
        match self {
            Condition::None => None,
            Condition::Last(seq) | Condition::LastChange(seq) => Some(seq),
        }
    }
}

impl From<Option<u64>> for Condition {
    fn from(expected_last: Option<u64>) -> Condition {
        expected_last.map_or(Condition::None, Condition::Last)
    }
}

/// An append sent to a room's stream, its acknowledgement not awaited yet.
pub struct PendingAppend {
    log: RoomLog,
    room: RoomId,
    msg_id: String,
    payload: Bytes,
    condition: Condition,
    /// The stream's answer to the first attempt.
    ack: Option<jetstream::context::PublishAckFuture>,
}

impl PendingAppend {
    /// The stream's answer. Never a sequence of 0: a clustered duplicate acknowledged without
    /// one is asked again (same id, so it cannot be appended twice) until the original's
    /// sequence is known.
    pub async fn appended(mut self) -> Result<Appended, LogError> {
        for attempt in 0..=ZERO_SEQ_RETRIES {
            let ack = match self.ack.take() {
                Some(ack) => ack.await,
                None => match self.publish(None).await {
                    Ok(ack) => ack.await,
                    Err(e) => Err(e),
                },
            };
            let ack = match ack {
                Ok(ack) => ack,
                Err(e) => return Err(self.error(e).await),
            };
            if ack.sequence != 0 {
                return Ok(Appended {
                    seq: ack.sequence,
                    duplicate: ack.duplicate,
                });
            }
            tracing::debug!(room = %self.room, attempt, "duplicate acknowledged without a sequence");
            tokio::time::sleep(Duration::from_millis(5u64 << attempt)).await;
        }
        Err(LogError::Unavailable {
            room: self.room.clone(),
            op: "append",
            reason: "duplicate acknowledged without its original sequence".to_owned(),
        })
    }

    async fn publish(
        &self,
        traceparent: Option<&str>,
    ) -> Result<jetstream::context::PublishAckFuture, jetstream::context::PublishError> {
        let mut headers = HeaderMap::new();
        headers.insert(NATS_MESSAGE_ID, self.msg_id.as_str());
        if let Some(traceparent) = traceparent {
            headers.insert(TRACEPARENT, traceparent);
        }
        let config = &self.log.inner.config;
        let subject = match self.condition {
            Condition::None => config.room_subject(&self.room),
            Condition::Last(expected) => {
                headers.insert(NATS_EXPECTED_LAST_SEQUENCE, expected.to_string().as_str());
                config.room_subject(&self.room)
            }
            Condition::LastChange(expected) => {
                headers.insert(
                    NATS_EXPECTED_LAST_SUBJECT_SEQUENCE,
                    expected.to_string().as_str(),
                );
                config.room_state_subject(&self.room)
            }
        };
        self.log
            .inner
            .js
            .publish_with_headers(subject, headers, self.payload.clone())
            .await
    }

    async fn error(&self, e: jetstream::context::PublishError) -> LogError {
        self.log
            .publish_error(&self.room, self.condition.expected(), self.payload.len(), e)
            .await
    }
}

/// `nats://a:4222,nats://b:4222` (or bare `host:port`s) as server addresses.
fn parse_servers(url: &str) -> Result<Vec<async_nats::ServerAddr>, ConnectError> {
    let servers = url
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| s.parse::<async_nats::ServerAddr>())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| ConnectError::Url {
            url: url.to_owned(),
            reason: e.to_string(),
        })?;
    if servers.is_empty() {
        return Err(ConnectError::Url {
            url: url.to_owned(),
            reason: "no server given".to_owned(),
        });
    }
    Ok(servers)
}

fn request_error(
    room: &RoomId,
    op: &'static str,
    e: async_nats::jetstream::context::RequestError,
) -> LogError {
    use async_nats::jetstream::context::RequestErrorKind;
    match e.kind() {
        RequestErrorKind::TimedOut => LogError::Timeout {
            room: room.clone(),
            op,
        },
        _ => LogError::Unavailable {
            room: room.clone(),
            op,
            reason: e.to_string(),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A burst of slow-consumer notices becomes one notice at once and one after the burst:
    /// every drop is followed by a notice, and the feeds re-read their heads twice, not per drop.
    #[tokio::test]
    async fn a_burst_of_slow_notices_is_passed_on_twice() {
        let (tx, mut rx) = broadcast::channel(CONNECTION_EVENTS_CAPACITY);
        let slow = Arc::new(SlowNotices::default());
        for _ in 0..1_000 {
            slow.clone().notice(tx.clone());
        }
        assert!(
            matches!(rx.try_recv(), Ok(ConnectionEvent::SlowConsumer)),
            "the first notice of a burst is passed on at once"
        );
        assert!(
            rx.try_recv().is_err(),
            "the rest of the burst waits for the interval"
        );
        let trailing = tokio::time::timeout(SLOW_NOTICE_EVERY * 5, rx.recv())
            .await
            .expect("a notice follows the burst");
        assert!(matches!(trailing, Ok(ConnectionEvent::SlowConsumer)));
        {
            let state = slow.state.lock().unwrap();
            assert!(!state.due, "no further notice is waiting to be sent");
            assert_eq!(state.dropped, 0, "the trailing notice covered the burst");
        }
        assert!(rx.try_recv().is_err(), "two notices for the whole burst");

        // A drop long after: passed on at once again.
        slow.state.lock().unwrap().sent = Some(std::time::Instant::now() - SLOW_NOTICE_EVERY);
        slow.clone().notice(tx.clone());
        assert!(matches!(rx.try_recv(), Ok(ConnectionEvent::SlowConsumer)));
    }
}
