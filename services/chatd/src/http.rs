//! HTTP surface shared by every role: health, readiness, identity, contract-shaped errors.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use axum::extract::{FromRequestParts, State};
use axum::http::request::Parts;
use axum::http::{header, HeaderValue, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use chat_auth::{Identity, Verifier};
use serde_json::json;

/// What the HTTP handlers share.
#[derive(Clone)]
pub struct AppState {
    /// Set when a drain begins: readiness turns false first, so balancers stop sending.
    pub draining: Arc<AtomicBool>,
    /// The NATS connection, whose state decides readiness.
    pub nats: async_nats::Client,
    /// Checks every request's token.
    pub verifier: Arc<Verifier>,
    /// The room service (roles that serve the rooms API).
    pub rooms: Option<Arc<chat_rooms::Rooms>>,
    /// Counters of the projector running in this process, if any.
    pub projector: Option<Arc<chat_projector::ProjectorStats>>,
    /// Counters of the edge running in this process, if any.
    pub edge: Option<Arc<chat_edge::EdgeStats>>,
}

pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/v1/me", get(me))
        .route("/metrics", get(metrics))
        .merge(crate::api::router())
        .fallback(not_found)
        .with_state(state)
}

/// Runs a routed request in a span of its own (see [`crate::telemetry`]).
pub async fn traced(request: axum::extract::Request, next: axum::middleware::Next) -> Response {
    use tracing::Instrument as _;
    let span = crate::telemetry::request_span(&request);
    let response = next.run(request).instrument(span.clone()).await;
    crate::telemetry::record_status(&span, response.status());
    response
}

/// Alive: the process answers.
async fn healthz() -> impl IntoResponse {
    Json(json!({ "status": "ok" }))
}

/// Ready: not draining and connected to NATS.
async fn readyz(State(state): State<AppState>) -> Response {
    if state.draining.load(Ordering::SeqCst) {
        return error(StatusCode::SERVICE_UNAVAILABLE, "unavailable", "draining");
    }
    if state.nats.connection_state() != async_nats::connection::State::Connected {
        return error(
            StatusCode::SERVICE_UNAVAILABLE,
            "unavailable",
            "not connected to nats",
        );
    }
    Json(json!({ "status": "ready" })).into_response()
}

/// Who the token says the caller is (a way to check a token).
async fn me(Authenticated(identity): Authenticated) -> impl IntoResponse {
    Json(json!({
        "user": identity.user,
        "name": identity.name,
        "expires_at": identity.expires_at,
    }))
}

/// Prometheus text exposition of this process's counters.
async fn metrics(State(state): State<AppState>) -> Response {
    use std::fmt::Write;
    use std::sync::atomic::AtomicU64;
    // (name, type, help, value) of every metric this process has.
    let mut metrics: Vec<(&str, &str, &str, u64)> = Vec::new();
    let mut add = |rows: &[(&'static str, &'static str, &'static str, &AtomicU64)]| {
        for (name, kind, help, value) in rows {
            metrics.push((name, kind, help, value.load(Ordering::Relaxed)));
        }
    };
    if let Some(p) = &state.projector {
        add(&[
            (
                "chat_projector_events_total",
                "counter",
                "Log entries written to the store.",
                &p.projected,
            ),
            (
                "chat_projector_dead_letters_total",
                "counter",
                "Entries that could not be decoded.",
                &p.dead_letters,
            ),
            (
                "chat_projector_fills_total",
                "counter",
                "Ranges read from streams (gaps, catch-up).",
                &p.fills,
            ),
            (
                "chat_projector_store_errors_total",
                "counter",
                "Failed (and retried) store writes.",
                &p.store_errors,
            ),
            (
                "chat_projector_lag_ms",
                "gauge",
                "Age of the oldest known event not yet stored.",
                &p.lag_ms,
            ),
        ]);
    }
    if let Some(e) = &state.edge {
        add(&[
            (
                "chat_edge_sockets",
                "gauge",
                "Open WebSocket connections, authenticated or not.",
                &e.sockets,
            ),
            (
                "chat_edge_sessions",
                "gauge",
                "Open authenticated WebSocket sessions.",
                &e.sessions,
            ),
            (
                "chat_edge_frames_in_total",
                "counter",
                "Frames received from clients.",
                &e.frames_in,
            ),
            (
                "chat_edge_appends_total",
                "counter",
                "Events appended for clients.",
                &e.appends,
            ),
            (
                "chat_edge_errors_total",
                "counter",
                "Error frames sent.",
                &e.errors,
            ),
            (
                "chat_edge_queued_bytes",
                "gauge",
                "Bytes queued for client sockets.",
                &e.queued_bytes,
            ),
            (
                "chat_edge_queued_bytes_peak",
                "gauge",
                "The most bytes ever queued for client sockets at once.",
                &e.queued_bytes_peak,
            ),
            (
                "chat_edge_slow_closes_total",
                "counter",
                "Sessions closed with 4008 (too slow to keep up).",
                &e.slow_closes,
            ),
            (
                "chat_edge_ephemeral_dropped_total",
                "counter",
                "Typing and presence frames dropped for slow readers.",
                &e.ephemeral_dropped,
            ),
            (
                "chat_edge_rate_limited_total",
                "counter",
                "Frames refused by a rate limit.",
                &e.rate_limited,
            ),
            (
                "chat_edge_flood_closes_total",
                "counter",
                "Sessions closed with 4029 (kept flooding).",
                &e.flood_closes,
            ),
            (
                "chat_edge_refused_total",
                "counter",
                "Connections refused by a connection cap.",
                &e.refused,
            ),
            (
                "chat_edge_idle_closes_total",
                "counter",
                "Sessions closed after the idle timeout.",
                &e.idle_closes,
            ),
            (
                "chat_edge_append_retries_total",
                "counter",
                "Appends retried (same id) after an unknown outcome.",
                &e.append_retries,
            ),
            (
                "chat_edge_presence_frames_total",
                "counter",
                "Presence frames handed to sessions (coalesced).",
                &e.presence_frames,
            ),
        ]);
    }
    let draining = u64::from(state.draining.load(Ordering::SeqCst));
    metrics.push((
        "chat_draining",
        "gauge",
        "1 while the process drains.",
        draining,
    ));
    let mut out = String::new();
    for (name, kind, help, value) in metrics {
        let _ = writeln!(
            out,
            "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}"
        );
    }
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], out).into_response()
}

async fn not_found(method: Method, uri: Uri) -> Response {
    error(
        StatusCode::NOT_FOUND,
        "not_found",
        &format!("no route for {method} {}", uri.path()),
    )
}

/// `{"error":{"code":…,"message":…}}` with the matching status, as the contract says.
pub fn error(status: StatusCode, code: &str, message: &str) -> Response {
    (
        status,
        Json(json!({ "error": { "code": code, "message": message } })),
    )
        .into_response()
}

/// A request whose `Authorization: Bearer` token verified.
pub struct Authenticated(pub Identity);

impl FromRequestParts<AppState> for Authenticated {
    type Rejection = Response;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, Response> {
        let token = parts
            .headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| {
                v.strip_prefix("Bearer ")
                    .or_else(|| v.strip_prefix("bearer "))
            })
            .map(str::trim);
        let result = match token {
            None => Err("missing Authorization: Bearer token".to_owned()),
            Some(token) => state.verifier.verify(token).map_err(|e| e.to_string()),
        };
        result.map(Authenticated).map_err(|message| {
            let mut response = error(StatusCode::UNAUTHORIZED, "unauthorized", &message);
            response
                .headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
            response
        })
    }
}
