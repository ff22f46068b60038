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
    /// The per-user rate limits the rooms API draws on (shared with the edge, if any).
    pub limits: Option<Arc<chat_edge::UserLimits>>,
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

/// What the operations listener (`CHAT_OPS_LISTEN`) serves: probes and scrapes, nothing a
/// client uses.
pub fn ops_router(state: AppState) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .fallback(not_found)
        .with_state(state)
}

/// What the listener answers while the process waits for NATS at start: alive, not ready, and
/// `503 unavailable` for everything else (with `Retry-After`), so a liveness probe does not
/// restart a process that is only waiting and a client gets an answer instead of a refused
/// connection.
pub fn starting_router() -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .fallback(|| async {
            let mut response = error(
                StatusCode::SERVICE_UNAVAILABLE,
                "unavailable",
                "starting: waiting for nats",
            );
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
            response
        })
}

/// A request must be received and answered within `limit` (`CHAT_HTTP_REQUEST_TIMEOUT`): the
/// head is bounded by the server's header timeout, and this bounds the body and the answer, so
/// that a client sending its body a byte at a time cannot hold one of the process's HTTP
/// connections for as long as it likes. Past it: `503 unavailable`, and the connection closes.
/// A WebSocket upgrade is answered at once; the session that follows is not a request.
pub async fn bounded(
    limit: std::time::Duration,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    match tokio::time::timeout(limit, next.run(request)).await {
        Ok(response) => response,
        Err(_) => {
            let mut response = error(
                StatusCode::SERVICE_UNAVAILABLE,
                "unavailable",
                &format!("the request was not received and answered within {limit:?}"),
            );
            response
                .headers_mut()
                .insert(header::CONNECTION, HeaderValue::from_static("close"));
            response
        }
    }
}

/// Runs a routed request in a span of its own (see [`crate::telemetry`]).
pub async fn traced(request: axum::extract::Request, next: axum::middleware::Next) -> Response {
    use tracing::Instrument as _;
    let started = std::time::Instant::now();
    let method = request.method().clone();
    let route = request
        .extensions()
        .get::<axum::extract::MatchedPath>()
        .map(|p| p.as_str().to_owned());
    let span = crate::telemetry::request_span(&request);
    let response = next.run(request).instrument(span.clone()).await;
    crate::telemetry::record_status(&span, response.status());
    if let Some(route) = route {
        crate::metrics::record_request(
            &method,
            &route,
            response.status().as_u16(),
            started.elapsed(),
        );
    }
    response
}

/// Alive: the process answers.
async fn healthz() -> impl IntoResponse {
    Json(json!({ "status": "ok" }))
}

/// Ready until a drain begins, as the contract says, with the NATS connection's state in the
/// body. `?nats=required` also answers 503 while NATS is unreachable: for a balancer in front
/// of edges connected to different NATS servers, which can send new clients to one that is.
async fn readyz(State(state): State<AppState>, uri: Uri) -> Response {
    let require_nats = match uri.query() {
        None => false,
        Some("nats=required") => true,
        Some(other) => {
            return error(
                StatusCode::BAD_REQUEST,
                "bad_request",
                &format!("unknown query {other:?} (the only one is nats=required)"),
            )
        }
    };
    if state.draining.load(Ordering::SeqCst) {
        return error(StatusCode::SERVICE_UNAVAILABLE, "unavailable", "draining");
    }
    let connected = state.nats.connection_state() == async_nats::connection::State::Connected;
    if require_nats && !connected {
        return error(
            StatusCode::SERVICE_UNAVAILABLE,
            "unavailable",
            "not connected to nats",
        );
    }
    let nats = if connected {
        "connected"
    } else {
        "disconnected"
    };
    Json(json!({ "status": "ready", "nats": nats })).into_response()
}

/// Who the token says the caller is (a way to check a token).
async fn me(Authenticated(identity): Authenticated) -> impl IntoResponse {
    Json(json!({
        "user": identity.user,
        "name": identity.name,
        "expires_at": identity.expires_at,
    }))
}

/// Prometheus text exposition of this process's instruments (see [`crate::metrics`]).
async fn metrics() -> Response {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        crate::metrics::render(),
    )
        .into_response()
}

/// A route asked with a method it does not have (axum adds the `Allow` header listing those it
/// has).
pub async fn method_not_allowed(method: Method, uri: Uri) -> Response {
    error(
        StatusCode::METHOD_NOT_ALLOWED,
        "bad_request",
        &format!("{method} is not allowed on {}", uri.path()),
    )
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
        let token = chat_auth::request_bearer(
            parts
                .headers
                .get_all(header::AUTHORIZATION)
                .iter()
                .map(HeaderValue::as_bytes),
        )
        .map_err(|message| error(StatusCode::BAD_REQUEST, "bad_request", message))?;
        let result = match token {
            None => Err("missing Authorization: Bearer token".to_owned()),
            Some(token) => state.verifier.verify(token).map_err(|e| e.to_string()),
        };
        let identity = result.map_err(|message| {
            let mut response = error(StatusCode::UNAUTHORIZED, "unauthorized", &message);
            response
                .headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
            response
        })?;
        if let Some(limits) = &state.limits {
            // Reads draw on the user's history bucket (as `history` frames do), changes on
            // the bucket of room and block changes; on every process alike.
            let work = if parts.method == Method::GET || parts.method == Method::HEAD {
                chat_edge::Work::History
            } else {
                chat_edge::Work::Manage
            };
            if let Err(limited) = limits.check(work, &identity.user) {
                limits.http_limited.fetch_add(1, Ordering::Relaxed);
                let retry_ms = limited.retry_after.as_millis().max(1);
                let mut response = error(
                    StatusCode::TOO_MANY_REQUESTS,
                    "rate_limited",
                    &format!("rate limited; retry in {retry_ms} ms"),
                );
                let seconds = retry_ms.div_ceil(1000).to_string();
                if let Ok(value) = HeaderValue::from_str(&seconds) {
                    response.headers_mut().insert(header::RETRY_AFTER, value);
                }
                return Err(response);
            }
        }
        Ok(Authenticated(identity))
    }
}
