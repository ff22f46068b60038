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

mod hub;
mod origin;
mod protocol;
mod render;
mod session;

use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{State, WebSocketUpgrade};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use chat_auth::Verifier;
use tokio_util::sync::CancellationToken;

pub use hub::{Delivery, Follower, Hub};
pub use protocol::{close_code, ErrorCode};
pub use render::event_frame;

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
    /// Frames a session may have queued for its socket before its producers wait.
    pub outbound_frames: usize,
}

impl Default for EdgeConfig {
    fn default() -> Self {
        EdgeConfig {
            allowed_origins: None,
            auth_timeout: Duration::from_secs(5),
            max_frame_bytes: 64 * 1024,
            outbound_frames: 1024,
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
    /// Room rules, appends and queries.
    pub rooms: Arc<chat_rooms::Rooms>,
    /// This edge's shared room feeds.
    pub hub: Arc<Hub>,
    pub stats: Arc<EdgeStats>,
}

/// Counters of an edge (for `/metrics`).
#[derive(Debug, Default)]
pub struct EdgeStats {
    /// Open authenticated sessions.
    pub sessions: AtomicU64,
    /// Text frames received after authentication.
    pub frames_in: AtomicU64,
    /// Events appended (acks sent, duplicates included).
    pub appends: AtomicU64,
    /// Error frames sent.
    pub errors: AtomicU64,
}

/// The edge's routes.
pub fn router(state: EdgeState) -> Router {
    Router::new()
        .route("/v1/ws", get(upgrade))
        .with_state(state)
}

async fn upgrade(
    State(state): State<EdgeState>,
    headers: HeaderMap,
    ws: WebSocketUpgrade,
) -> Response {
    if let Err(reason) = origin::check(&headers, state.config.allowed_origins.as_deref()) {
        return http_error(StatusCode::FORBIDDEN, "forbidden", &reason);
    }
    let offered: Vec<String> = ws
        .requested_protocols()
        .filter_map(|p| p.to_str().ok())
        .map(str::to_owned)
        .collect();
    let identity = match offered.iter().find_map(|p| p.strip_prefix("bearer.")) {
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
    // Our own limit is enforced on every frame; the library's, set above it, only bounds what
    // is buffered before that check can run.
    let buffer_limit = state.config.max_frame_bytes.saturating_mul(2);
    ws.protocols([SUBPROTOCOL])
        .max_message_size(buffer_limit)
        .max_frame_size(buffer_limit)
        .on_upgrade(move |socket| session::run(socket, state, identity))
}

fn http_error(status: StatusCode, code: &str, message: &str) -> Response {
    (
        status,
        Json(serde_json::json!({ "error": { "code": code, "message": message } })),
    )
        .into_response()
}
