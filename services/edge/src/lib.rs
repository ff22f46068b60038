//! The WebSocket edge: `GET /v1/ws`.
//!
//! The client contract over one socket: the Origin check and subprotocol token answered before
//! the upgrade (403 / 401), first-frame authentication within a deadline (else close 4001),
//! `welcome` with the user's rooms, `subscribe` (resume by sequence, then live), `send` /
//! `edit` / `delete` / `react` answered by `ack`, `read`, `history`, `ping`; a defined `error`
//! for every malformed or refused frame; close 1009 for frames over the size limit, 4001 when
//! the token expires, 1001 when the server drains. Rules and storage live in
//! [`chat_rooms::Rooms`]; live events come from the edge's [`Hub`].
#![forbid(unsafe_code)]

mod delivered;
mod frame;
mod hub;
mod limits;
mod origin;
mod outbox;
mod presence;
mod protocol;
mod reads;
mod render;
mod session;
mod shared_limits;
mod socket;
mod source;
mod typing;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use chat_auth::Verifier;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub use delivered::{DeliveredConfig, DeliveredCursors};
pub use frame::Framed;
pub use hub::{Delivery, Follower, Hub};
pub use limits::{Limited, Rate, Rates, UserLimits, Work};
pub use presence::{Presence, PresenceConfig};
pub use protocol::{close_code, ErrorCode};
pub use render::event_frame;
pub use typing::Ephemeral;

/// The subprotocol a client offers (with `bearer.<jwt>`) and the server selects.
pub const SUBPROTOCOL: &str = "chat.v1";

/// Settings of the edge.
#[derive(Debug, Clone)]
pub struct EdgeConfig {
    /// Origins allowed to upgrade; `None`: only requests with no Origin or an Origin whose
    /// host matches the Host header.
    pub allowed_origins: Option<Vec<String>>,
    /// How long a client may take to send its `auth` frame when it did not authenticate in the
    /// upgrade request.
    pub auth_timeout: Duration,
    /// The largest frame accepted; larger ones close the connection with 1009.
    pub max_frame_bytes: usize,
    /// Frames a session may have queued for its socket.
    pub outbound_frames: usize,
    /// Bytes a session may have queued for its socket.
    pub outbound_bytes: usize,
    /// How long a chat frame may wait for room in a full queue before the client is closed
    /// with 4008 (also: how long a jammed socket gets to take its close frame).
    pub slow_grace: Duration,
    /// How long a closing socket gets to take its close frame (a client that stopped reading
    /// must first drain what the kernel holds for it).
    pub close_timeout: Duration,
    /// WebSocket pings this often.
    pub ping_interval: Duration,
    /// A client from which nothing (no frame, no pong) arrives for this long is closed.
    pub idle_timeout: Duration,
    /// Per-user and per-connection token buckets.
    pub rates: Rates,
    /// More refusals than a limit's burst within this window closes the connection with 4029.
    pub flood_window: Duration,
    /// Sockets this edge holds at most (authenticated or not); more are refused with 503.
    pub max_connections: usize,
    /// Sessions one user may have on this edge; more are refused with 429 (or closed with 1013
    /// after first-frame authentication).
    pub max_connections_per_user: usize,
    /// The most rooms one `subscribe` frame may name.
    pub max_rooms_per_subscribe: usize,
    /// Appends one session may have in flight: checked concurrently, sent to the log and
    /// answered in the client's order. At the limit the session reads no further frames.
    pub appends_in_flight: usize,
    /// An append whose outcome is unknown (NATS away, timeout) is retried with the same id for
    /// this long before the client is told `unavailable`.
    pub append_retry: Duration,
    /// Presence heartbeats, expiry and coalescing.
    pub presence: PresenceConfig,
    /// How `delivered` frames are coalesced into events.
    pub delivered: DeliveredConfig,
}

impl Default for EdgeConfig {
    fn default() -> Self {
        EdgeConfig {
            allowed_origins: None,
            auth_timeout: Duration::from_secs(5),
            max_frame_bytes: 64 * 1024,
            outbound_frames: 1024,
            outbound_bytes: 1 << 20,
            slow_grace: Duration::from_secs(5),
            close_timeout: Duration::from_secs(10),
            ping_interval: Duration::from_secs(30),
            idle_timeout: Duration::from_secs(90),
            rates: Rates::default(),
            flood_window: Duration::from_secs(10),
            max_connections: 50_000,
            max_connections_per_user: 32,
            max_rooms_per_subscribe: 256,
            appends_in_flight: 32,
            append_retry: Duration::from_secs(3),
            presence: PresenceConfig::default(),
            delivered: DeliveredConfig::default(),
        }
    }
}

/// What every session of this edge shares.
#[derive(Clone)]
pub struct EdgeState {
    pub verifier: Arc<Verifier>,
    pub config: Arc<EdgeConfig>,
    /// Cancelled when the server drains: every session closes with 1001.
    pub shutdown: CancellationToken,
    /// Cancelled when a drain's grace is over: a session still finishing its appends closes
    /// with 1001 at once.
    pub hurry: CancellationToken,
    /// Room rules, appends and queries.
    pub rooms: Arc<chat_rooms::Rooms>,
    /// This edge's shared room feeds.
    pub hub: Arc<Hub>,
    pub stats: Arc<EdgeStats>,
    /// Latency histograms (no-ops unless the process set up a meter provider).
    pub metrics: EdgeMetrics,
    /// Every session; a drain waits for them to close.
    pub sessions: TaskTracker,
    /// Work that outlives the sessions in a drain: the last append of delivered cursors. A
    /// drain closes and waits for it after `sessions`.
    pub background: TaskTracker,
    /// Who is online where, across edges.
    pub presence: Arc<Presence>,
    /// Delivered cursors waiting to be appended, one event per room per interval.
    pub delivered: Arc<DeliveredCursors>,
    /// Read cursors: one `read` event per user per room per second, in increasing order.
    pub(crate) reads: Arc<reads::ReadCursors>,
    limits: Arc<UserLimits>,
    connections: Arc<limits::Connections>,
}

impl EdgeState {
    /// An edge drawing on the process's per-user buckets `limits` (see
    /// [`UserLimits::start`]); starts the task that appends delivered cursors (until `shutdown`
    /// and every session has ended, then once more).
    pub fn new(
        verifier: Arc<Verifier>,
        config: EdgeConfig,
        shutdown: CancellationToken,
        rooms: Arc<chat_rooms::Rooms>,
        hub: Arc<Hub>,
        limits: Arc<UserLimits>,
    ) -> EdgeState {
        let stats = Arc::new(EdgeStats::default());
        let presence = Presence::start(
            hub.clone(),
            config.presence,
            shutdown.clone(),
            stats.clone(),
        );
        let delivered = Arc::new(DeliveredCursors::new(config.delivered.max_pending));
        let reads = Arc::new(reads::ReadCursors::new(reads::READ_INTERVAL));
        let sessions = TaskTracker::new();
        let background = TaskTracker::new();
        background.spawn(delivered::run(
            delivered.clone(),
            rooms.clone(),
            config.delivered.interval,
            shutdown.clone(),
            sessions.clone(),
        ));
        background.spawn(reads::run(
            reads.clone(),
            rooms.clone(),
            shutdown.clone(),
            sessions.clone(),
        ));
        EdgeState {
            verifier,
            presence,
            delivered,
            reads,
            connections: limits::Connections::new(
                config.max_connections,
                config.max_connections_per_user,
                stats.clone(),
            ),
            config: Arc::new(config),
            shutdown,
            hurry: CancellationToken::new(),
            rooms,
            hub,
            stats,
            metrics: EdgeMetrics::new(),
            sessions,
            background,
            limits,
        }
    }
}

/// Subscribes to `subject`, retrying every second while NATS refuses (a drain does not wait for
/// it): `None` once `shutdown` is cancelled first. `what` names the subscription in the log.
pub(crate) async fn subscribe_retrying(
    client: &async_nats::Client,
    subject: &str,
    what: &str,
    shutdown: &CancellationToken,
) -> Option<async_nats::Subscriber> {
    loop {
        match client.subscribe(subject.to_owned()).await {
            Ok(subscriber) => return Some(subscriber),
            Err(e) => {
                tracing::warn!(error = %e, "{what} subscription failed; retrying");
                tokio::select! {
                    _ = shutdown.cancelled() => return None,
                    _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                }
            }
        }
    }
}

/// Counters of an edge (for `/metrics`).
#[derive(Debug, Default)]
pub struct EdgeStats {
    /// Open WebSocket connections, authenticated or not (what `CHAT_MAX_CONNECTIONS` caps).
    pub sockets: AtomicU64,
    /// Open authenticated sessions.
    pub sessions: AtomicU64,
    /// Text frames received after authentication.
    pub frames_in: AtomicU64,
    /// Events appended (acks sent, duplicates included).
    pub appends: AtomicU64,
    /// Error frames sent.
    pub errors: AtomicU64,
    /// Bytes queued for sockets, all sessions together (a gauge).
    pub queued_bytes: AtomicU64,
    /// The most `queued_bytes` has been.
    pub queued_bytes_peak: AtomicU64,
    /// Sessions closed with 4008 (too slow).
    pub slow_closes: AtomicU64,
    /// Ephemeral frames dropped for slow readers.
    pub ephemeral_dropped: AtomicU64,
    /// Frames refused by a rate limit.
    pub rate_limited: AtomicU64,
    /// Sessions closed with 4029 (kept flooding).
    pub flood_closes: AtomicU64,
    /// Connections refused because the edge held `CHAT_MAX_CONNECTIONS`.
    pub refused_full: AtomicU64,
    /// Connections refused because a sixteenth of `CHAT_MAX_CONNECTIONS` (at least 64) sockets
    /// were waiting for their `auth` frame.
    pub refused_unauthenticated: AtomicU64,
    /// Connections refused because their user held `CHAT_MAX_CONNECTIONS_PER_USER`.
    pub refused_per_user: AtomicU64,
    /// Sessions closed for silence (no frame, no pong within the idle timeout).
    pub idle_closes: AtomicU64,
    /// Appends retried after an unknown outcome.
    pub append_retries: AtomicU64,
    /// Presence frames handed to sessions (coalesced).
    pub presence_frames: AtomicU64,
}

/// An edge's histograms, OpenTelemetry instruments of the process's global meter provider
/// (read by `/metrics` and the OTLP exporter where chatd sets them up).
#[derive(Debug, Clone)]
pub struct EdgeMetrics {
    /// `chat.edge.append.duration`: from an appending frame's arrival to its answer (`ack` or
    /// `error`), in seconds, by `kind` (send, edit, delete, react) and `outcome` (`ok`,
    /// `duplicate` or the error code).
    pub append_duration: opentelemetry::metrics::Histogram<f64>,
}

impl EdgeMetrics {
    /// Bucket bounds, in seconds: a loopback append takes about a millisecond, a busy one tens.
    const APPEND_BOUNDS: [f64; 14] = [
        0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
    ];

    fn new() -> EdgeMetrics {
        let meter = opentelemetry::global::meter("chat-edge");
        EdgeMetrics {
            append_duration: meter
                .f64_histogram("chat.edge.append.duration")
                .with_unit("s")
                .with_description(
                    "From an appending frame's arrival to its answer (ack or error), by kind and outcome.",
                )
                .with_boundaries(Self::APPEND_BOUNDS.to_vec())
                .build(),
        }
    }
}

/// The edge's routes.
pub fn router(state: EdgeState) -> Router {
    Router::new()
        .route("/v1/ws", get(upgrade))
        .route("/v1/rooms/{room}/presence", get(presence_of))
        .with_state(state)
}

async fn upgrade(
    State(state): State<EdgeState>,
    headers: HeaderMap,
    ws: socket::Upgrade,
) -> Response {
    if state.shutdown.is_cancelled() {
        return http_error(
            StatusCode::SERVICE_UNAVAILABLE,
            "unavailable",
            "server draining, connect elsewhere",
        );
    }
    if let Err(reason) = origin::check(&headers, state.config.allowed_origins.as_deref()) {
        return http_error(StatusCode::FORBIDDEN, "forbidden", &reason);
    }
    let Some(socket_slot) = state.connections.socket() else {
        state.stats.refused_full.fetch_add(1, Ordering::Relaxed);
        return http_error(
            StatusCode::SERVICE_UNAVAILABLE,
            "unavailable",
            &format!(
                "this server holds its maximum of {} connections; retry later or elsewhere",
                state.connections.max_total()
            ),
        );
    };
    let offered = ws.offered();
    let mut bearers = offered.iter().filter_map(|p| p.strip_prefix("bearer."));
    let bearer = bearers.next();
    if bearers.next().is_some() {
        return http_error(
            StatusCode::BAD_REQUEST,
            "bad_request",
            "more than one bearer.<token> subprotocol",
        );
    }
    let identity = match bearer {
        None => None,
        Some(token) => match state.verifier.verify(token) {
            Ok(identity) => Some(identity),
            Err(e) => return http_error(StatusCode::UNAUTHORIZED, "unauthorized", &e.to_string()),
        },
    };
    if identity.is_some() && !offered.iter().any(|p| p == SUBPROTOCOL) {
        return http_error(
            StatusCode::BAD_REQUEST,
            "bad_request",
            "offer the chat.v1 subprotocol together with bearer.<token>",
        );
    }
    // Without a token in the upgrade, the socket waits for its `auth` frame: only so many
    // may wait at once, or sockets that never send one could keep the edge full.
    let unauthenticated = match &identity {
        Some(_) => None,
        None => match state.connections.unauthenticated() {
            Some(slot) => Some(slot),
            None => {
                state
                    .stats
                    .refused_unauthenticated
                    .fetch_add(1, Ordering::Relaxed);
                return http_error(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "unavailable",
                    &format!(
                        "{} connections are waiting to authenticate; offer bearer.<token> as a \
                         subprotocol, or retry later",
                        state.connections.max_unauthenticated()
                    ),
                );
            }
        },
    };
    let user_slot = match &identity {
        None => None,
        Some(identity) => match state.connections.user(&identity.user) {
            Some(slot) => Some(slot),
            None => {
                state.stats.refused_per_user.fetch_add(1, Ordering::Relaxed);
                return http_error(
                    StatusCode::TOO_MANY_REQUESTS,
                    "rate_limited",
                    &format!(
                        "at most {} connections per user",
                        state.connections.max_per_user()
                    ),
                );
            }
        },
    };
    // Our own limit is enforced on every frame; the library's, set above it, only bounds what
    // is buffered before that check can run. The read buffer starts at 1 KiB (client frames are
    // small; it grows for a big one, and a connection keeps it: 4 KiB measured 3 KiB more per
    // idle connection); what is written is gathered per batch and its buffer given back (see
    // `socket`): an idle connection costs little.
    let buffer_limit = state.config.max_frame_bytes.saturating_mul(2);
    let config = tungstenite::protocol::WebSocketConfig::default()
        .max_message_size(Some(buffer_limit))
        .max_frame_size(Some(buffer_limit))
        .read_buffer_size(1024);
    let sessions = state.sessions.clone();
    ws.on_upgrade(SUBPROTOCOL, config, move |socket| {
        sessions.track_future(session::run(
            socket,
            state,
            identity,
            session::Slots {
                _socket: socket_slot,
                user: user_slot,
                unauthenticated,
            },
        ))
    })
}

/// `GET /v1/rooms/{room}/presence`: `{"online":[…]}` for members (Bearer token).
async fn presence_of(
    State(state): State<EdgeState>,
    axum::extract::Path(room): axum::extract::Path<String>,
    headers: HeaderMap,
) -> Response {
    let token = match chat_auth::request_bearer(
        headers
            .get_all(axum::http::header::AUTHORIZATION)
            .iter()
            .map(|v| v.as_bytes()),
    ) {
        Ok(token) => token,
        Err(message) => return http_error(StatusCode::BAD_REQUEST, "bad_request", message),
    };
    let identity = match token.map(|t| state.verifier.verify(t)) {
        Some(Ok(identity)) => identity,
        Some(Err(e)) => {
            return http_error(StatusCode::UNAUTHORIZED, "unauthorized", &e.to_string())
        }
        None => {
            return http_error(
                StatusCode::UNAUTHORIZED,
                "unauthorized",
                "missing Authorization: Bearer token",
            )
        }
    };
    // A read, as the rooms API's: the user's history bucket.
    if let Err(limited) = state.limits.check(Work::History, &identity.user) {
        state.limits.http_limited.fetch_add(1, Ordering::Relaxed);
        let retry_ms = limited.retry_after.as_millis().max(1);
        let mut response = http_error(
            StatusCode::TOO_MANY_REQUESTS,
            "rate_limited",
            &format!("rate limited; retry in {retry_ms} ms"),
        );
        if let Ok(value) = axum::http::HeaderValue::from_str(&retry_ms.div_ceil(1000).to_string()) {
            response
                .headers_mut()
                .insert(axum::http::header::RETRY_AFTER, value);
        }
        return response;
    }
    let room = match chat_model::RoomId::parse(&room) {
        Ok(room) => room,
        Err(e) => {
            return http_error(
                StatusCode::BAD_REQUEST,
                "bad_request",
                &format!("room: {e}"),
            )
        }
    };
    if let Err(e) = state.rooms.member_state(&room, &identity.user).await {
        let status = StatusCode::from_u16(e.status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        return http_error(status, e.code(), &e.to_string());
    }
    Json(serde_json::json!({ "online": state.presence.online(&room) })).into_response()
}

fn http_error(status: StatusCode, code: &str, message: &str) -> Response {
    let mut response = (
        status,
        Json(serde_json::json!({ "error": { "code": code, "message": message } })),
    )
        .into_response();
    if status == StatusCode::UNAUTHORIZED {
        response.headers_mut().insert(
            axum::http::header::WWW_AUTHENTICATE,
            axum::http::HeaderValue::from_static("Bearer"),
        );
    }
    response
}
