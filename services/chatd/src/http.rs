//! HTTP surface shared by every role: health, readiness, and contract-shaped errors.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use axum::extract::State;
use axum::http::{Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde_json::json;

/// What the health endpoints look at.
#[derive(Clone)]
pub struct Health {
    /// Set when a drain begins: readiness turns false first, so balancers stop sending.
    pub draining: Arc<AtomicBool>,
    /// The NATS connection, whose state decides readiness.
    pub nats: async_nats::Client,
}

pub fn router(health: Health) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .fallback(not_found)
        .with_state(health)
}

/// Alive: the process answers.
async fn healthz() -> impl IntoResponse {
    Json(json!({ "status": "ok" }))
}

/// Ready: not draining and connected to NATS.
async fn readyz(State(health): State<Health>) -> Response {
    if health.draining.load(Ordering::SeqCst) {
        return error(StatusCode::SERVICE_UNAVAILABLE, "unavailable", "draining");
    }
    if health.nats.connection_state() != async_nats::connection::State::Connected {
        return error(
            StatusCode::SERVICE_UNAVAILABLE,
            "unavailable",
            "not connected to nats",
        );
    }
    Json(json!({ "status": "ready" })).into_response()
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
