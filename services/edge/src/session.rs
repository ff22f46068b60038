//! One client connection, from upgrade to close.

use axum::extract::ws::{CloseFrame, Message, WebSocket};
use chat_auth::Identity;
use tokio::time::{sleep_until, Instant};

use crate::protocol::{self, close_code, ErrorCode, CLIENT_TYPES};
use crate::EdgeState;

/// Runs a session until the client leaves, its token expires, or the server drains.
pub async fn run(mut socket: WebSocket, state: EdgeState, identity: Option<Identity>) {
    let identity = match identity {
        Some(identity) => identity,
        None => match first_frame_auth(&mut socket, &state).await {
            Ok(identity) => identity,
            Err(reason) => {
                tracing::debug!(reason, "websocket refused");
                close(&mut socket, close_code::TOKEN, &reason).await;
                return;
            }
        },
    };
    let user = identity.user.to_string();
    tracing::debug!(user, "session open");
    // Rooms arrive with the room operations; until then a user has none to report.
    if socket
        .send(Message::Text(protocol::welcome(&user, &[]).into()))
        .await
        .is_err()
    {
        return;
    }
    // The session ends when verification would start refusing the token.
    let expires = Instant::now() + std::time::Duration::from_secs(identity.seconds_accepted());
    let expiry = sleep_until(expires);
    tokio::pin!(expiry);
    loop {
        let message = tokio::select! {
            _ = state.shutdown.cancelled() => {
                close(&mut socket, close_code::DRAINING, "server draining, reconnect elsewhere").await;
                break;
            }
            _ = &mut expiry => {
                close(&mut socket, close_code::TOKEN, "token expired").await;
                break;
            }
            message = socket.recv() => message,
        };
        let reply = match message {
            None | Some(Ok(Message::Close(_))) => break,
            Some(Err(e)) => {
                if is_capacity_error(&e) {
                    close(&mut socket, close_code::TOO_BIG, "frame too big").await;
                }
                tracing::debug!(user, error = %e, "websocket read failed");
                break;
            }
            // Control frames are answered by the WebSocket layer.
            Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
            Some(Ok(Message::Binary(_))) => protocol::error(
                None,
                ErrorCode::BadRequest,
                "frames are JSON text, not binary",
            ),
            Some(Ok(Message::Text(text))) => {
                if text.len() > state.config.max_frame_bytes {
                    close(&mut socket, close_code::TOO_BIG, "frame too big").await;
                    break;
                }
                answer(&text)
            }
        };
        if socket.send(Message::Text(reply.into())).await.is_err() {
            break;
        }
    }
    tracing::debug!(user, "session closed");
}

/// The reply to one text frame.
fn answer(text: &str) -> String {
    let frame = match protocol::parse(text) {
        Ok(frame) => frame,
        Err(malformed) => {
            return protocol::error(
                malformed.rid.as_deref(),
                ErrorCode::BadRequest,
                &malformed.message,
            )
        }
    };
    let rid = frame.rid.as_deref();
    match frame.kind.as_str() {
        "ping" => protocol::pong(rid),
        "auth" => protocol::error(rid, ErrorCode::BadRequest, "already authenticated"),
        known if CLIENT_TYPES.contains(&known) => protocol::error(
            rid,
            ErrorCode::BadRequest,
            &format!("{known} is not available in this server version yet"),
        ),
        unknown => protocol::error(
            rid,
            ErrorCode::BadRequest,
            &format!("unknown frame type {unknown:?}"),
        ),
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

async fn close(socket: &mut WebSocket, code: u16, reason: &str) {
    let frame = CloseFrame {
        code,
        reason: reason.into(),
    };
    let _ = socket.send(Message::Close(Some(frame))).await;
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
