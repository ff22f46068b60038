//! The HTTP API of rooms: create, join, leave, list, settings, history, receipts, threads; and
//! of block lists.

// Helpers return a ready error `Response` as their `Err`: it is built only on the failure path
// and returned straight to axum, so its size does not matter.
#![allow(clippy::result_large_err)]

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{FromRequestParts, Path, Query, State};
use axum::http::request::Parts;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, patch, post, put};
use axum::{Json, Router};
use chat_auth::Identity;
use chat_model::{RoomId, RoomKind, UserId};
use chat_rooms::{RoomError, Rooms};
use chat_store::{PageQuery, RoomSummary};
use serde::de::DeserializeOwned;
use serde::Deserialize;
use serde_json::{json, Value};
use uuid::Uuid;

use crate::http::{error, AppState, Authenticated};

/// The room routes; they need the room service in the state.
pub fn router() -> Router<AppState> {
    Router::new()
        .route("/v1/rooms", post(create_room).get(list_rooms))
        .route("/v1/rooms/{room}", patch(update_room))
        .route("/v1/rooms/{room}/members", post(add_member))
        .route("/v1/rooms/{room}/members/{user}", delete(remove_member))
        .route("/v1/rooms/{room}/messages", get(history))
        .route("/v1/rooms/{room}/messages/{seq}/receipts", get(receipts))
        .route("/v1/rooms/{room}/threads/{root}", get(thread))
        .route("/v1/blocks", get(list_blocks))
        .route("/v1/blocks/{user}", put(block).delete(unblock))
}

fn rooms(state: &AppState) -> Result<&Arc<Rooms>, Response> {
    state.rooms.as_ref().ok_or_else(|| {
        error(
            StatusCode::NOT_FOUND,
            "not_found",
            "this process does not serve the rooms API (CHAT_ROLE)",
        )
    })
}

fn room_error(e: RoomError) -> Response {
    let status = StatusCode::from_u16(e.status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    error(status, e.code(), &e.to_string())
}

fn bad_request(message: impl Into<String>) -> Response {
    error(StatusCode::BAD_REQUEST, "bad_request", &message.into())
}

fn room_id(room: &str) -> Result<RoomId, Response> {
    RoomId::parse(room).map_err(|e| bad_request(format!("room: {e}")))
}

fn user_id(user: String) -> Result<UserId, Response> {
    UserId::parse(user).map_err(|e| bad_request(format!("user: {e}")))
}

/// The path's segments, refused in the API's JSON error shape (a segment that is not UTF-8,
/// a number that is not one) rather than axum's plain text.
struct Segments<T>(T);

impl<T: DeserializeOwned + Send> FromRequestParts<AppState> for Segments<T> {
    type Rejection = Response;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, Response> {
        Path::<T>::from_request_parts(parts, state)
            .await
            .map(|Path(segments)| Segments(segments))
            .map_err(|e| bad_request(e.body_text()))
    }
}

/// `T` read from a JSON object only. serde also reads a struct from an array of its fields
/// in order (`["general","group"]`), and the contract's bodies are objects. Read straight from
/// the object (not through a `Value`), so a key given twice is still refused.
struct Object<T>(T);

impl<'de, T: Deserialize<'de>> Deserialize<'de> for Object<T> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visit<T>(std::marker::PhantomData<T>);
        impl<'de, T: Deserialize<'de>> serde::de::Visitor<'de> for Visit<T> {
            type Value = Object<T>;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                map: A,
            ) -> Result<Object<T>, A::Error> {
                T::deserialize(serde::de::value::MapAccessDeserializer::new(map)).map(Object)
            }
        }
        d.deserialize_map(Visit(std::marker::PhantomData))
    }
}

/// The body, read as JSON whatever its `Content-Type` says (the contract does not ask for one,
/// and `curl -d` sends `application/x-www-form-urlencoded`), or the contract's answer to a bad
/// one.
fn body<T: DeserializeOwned>(payload: Result<Bytes, BytesRejection>) -> Result<T, Response> {
    let bytes = match payload {
        Ok(bytes) => bytes,
        Err(e) if e.status() == StatusCode::PAYLOAD_TOO_LARGE => {
            return Err(error(
                StatusCode::PAYLOAD_TOO_LARGE,
                "too_large",
                &e.body_text(),
            ))
        }
        Err(e) => return Err(bad_request(e.body_text())),
    };
    serde_json::from_slice::<Object<T>>(&bytes)
        .map(|Object(value)| value)
        .map_err(|e| bad_request(format!("the body is not the JSON object expected: {e}")))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateRoom {
    room: Option<RoomId>,
    kind: RoomKind,
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    members: Vec<UserId>,
    /// Makes a retried request idempotent (an extension of the contract).
    #[serde(default)]
    id: Option<Uuid>,
}

async fn create_room(
    State(state): State<AppState>,
    Authenticated(identity): Authenticated,
    payload: Result<Bytes, BytesRejection>,
) -> Response {
    let result = async {
        let rooms = rooms(&state)?;
        let req: CreateRoom = body(payload)?;
        let created = match req.kind {
            RoomKind::Group => {
                let room = req
                    .room
                    .ok_or_else(|| bad_request("a group room needs a \"room\" id"))?;
                let name = req.name.unwrap_or_else(|| room.to_string());
                rooms
                    .create_group(&identity.user, &room, &name, req.members, req.id)
                    .await
                    .map_err(room_error)?
            }
            RoomKind::Direct => {
                if req.room.is_some() {
                    return Err(bad_request(
                        "a direct room's id is derived from its pair; do not give one",
                    ));
                }
                let [other] = req.members.as_slice() else {
                    return Err(bad_request("a direct room takes exactly one other member"));
                };
                rooms
                    .create_direct(&identity.user, other)
                    .await
                    .map_err(room_error)?
            }
        };
        let status = if created.new {
            StatusCode::CREATED
        } else {
            StatusCode::OK
        };
        Ok::<_, Response>(
            (
                status,
                Json(json!({"room": created.room, "seq": created.seq})),
            )
                .into_response(),
        )
    }
    .await;
    result.unwrap_or_else(|r| r)
}

/// A room of the list, as the contract shows it.
pub fn summary_json(r: &RoomSummary) -> Value {
    json!({
        "room": r.room,
        "kind": r.kind.as_str(),
        "name": r.name,
        "head": r.head,
        "last_read": r.last_read,
        "unread": r.unread,
        "read_only": r.read_only,
    })
}

async fn list_rooms(
    State(state): State<AppState>,
    Authenticated(identity): Authenticated,
) -> Response {
    let rooms = match rooms(&state) {
        Ok(rooms) => rooms,
        Err(r) => return r,
    };
    match rooms.rooms_of(&identity.user).await {
        Ok(list) => Json(json!({"rooms": list.iter().map(summary_json).collect::<Vec<_>>()}))
            .into_response(),
        Err(e) => room_error(e),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AddMember {
    user: UserId,
}

async fn add_member(
    State(state): State<AppState>,
    Authenticated(identity): Authenticated,
    Segments(room): Segments<String>,
    payload: Result<Bytes, BytesRejection>,
) -> Response {
    let result = async {
        let rooms = rooms(&state)?;
        let room = room_id(&room)?;
        let req: AddMember = body(payload)?;
        let seq = rooms
            .invite(&identity.user, &room, &req.user)
            .await
            .map_err(room_error)?;
        Ok::<_, Response>(Json(json!({"seq": seq})).into_response())
    }
    .await;
    result.unwrap_or_else(|r| r)
}

async fn remove_member(
    State(state): State<AppState>,
    Authenticated(identity): Authenticated,
    Segments((room, user)): Segments<(String, String)>,
) -> Response {
    let result = async {
        let rooms = rooms(&state)?;
        let room = room_id(&room)?;
        let user = user_id(user)?;
        let seq = rooms
            .remove(&identity.user, &room, &user)
            .await
            .map_err(room_error)?;
        Ok::<_, Response>(Json(json!({"seq": seq})).into_response())
    }
    .await;
    result.unwrap_or_else(|r| r)
}

/// A room's settings; every field optional, at least one given.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct UpdateRoom {
    read_only: Option<bool>,
}

/// `PATCH /v1/rooms/{room}`: the admin changes the room's settings (a `room_updated` event).
async fn update_room(
    State(state): State<AppState>,
    Authenticated(identity): Authenticated,
    Segments(room): Segments<String>,
    payload: Result<Bytes, BytesRejection>,
) -> Response {
    let result = async {
        let rooms = rooms(&state)?;
        let room = room_id(&room)?;
        let req: UpdateRoom = body(payload)?;
        let read_only = req
            .read_only
            .ok_or_else(|| bad_request("nothing to change: give \"read_only\": true or false"))?;
        let seq = rooms
            .set_read_only(&identity.user, &room, read_only)
            .await
            .map_err(room_error)?;
        Ok::<_, Response>(Json(json!({"seq": seq})).into_response())
    }
    .await;
    result.unwrap_or_else(|r| r)
}

/// `GET /v1/blocks`: the caller's block list, as the user log holds it now.
async fn list_blocks(
    State(state): State<AppState>,
    Authenticated(identity): Authenticated,
) -> Response {
    let result = async {
        let rooms = rooms(&state)?;
        let blocked = rooms.block_list(&identity.user).await.map_err(room_error)?;
        Ok::<_, Response>(Json(json!({"blocked": blocked})).into_response())
    }
    .await;
    result.unwrap_or_else(|r| r)
}

/// `PUT /v1/blocks/{user}`: block (idempotent). `seq` is the user-log entry holding the list.
async fn block(
    State(state): State<AppState>,
    Authenticated(identity): Authenticated,
    Segments(user): Segments<String>,
) -> Response {
    change_block(&state, &identity, user, true).await
}

/// `DELETE /v1/blocks/{user}`: unblock (fine if not blocked).
async fn unblock(
    State(state): State<AppState>,
    Authenticated(identity): Authenticated,
    Segments(user): Segments<String>,
) -> Response {
    change_block(&state, &identity, user, false).await
}

async fn change_block(state: &AppState, identity: &Identity, user: String, on: bool) -> Response {
    let result = async {
        let rooms = rooms(state)?;
        let user = user_id(user)?;
        let changed = if on {
            rooms.block(&identity.user, &user).await
        } else {
            rooms.unblock(&identity.user, &user).await
        };
        let seq = changed.map_err(room_error)?;
        Ok::<_, Response>(Json(json!({"seq": seq})).into_response())
    }
    .await;
    result.unwrap_or_else(|r| r)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PageParams {
    before: Option<u64>,
    #[serde(default, deserialize_with = "saturating_limit")]
    limit: Option<usize>,
}

/// A `limit` of digits, however many: one too large for a number is as good as 200 (the
/// contract clamps limits, never refuses them).
fn saturating_limit<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<usize>, D::Error> {
    let Some(text) = Option::<String>::deserialize(d)? else {
        return Ok(None);
    };
    if text.is_empty() || !text.bytes().all(|b| b.is_ascii_digit()) {
        return Err(serde::de::Error::custom(format!(
            "limit: {text:?} is not a number"
        )));
    }
    Ok(Some(text.parse().unwrap_or(usize::MAX)))
}

impl PageParams {
    fn query(&self) -> PageQuery {
        PageQuery {
            before: self.before,
            limit: self.limit.unwrap_or(50),
        }
    }
}

fn page_params(
    params: Result<Query<PageParams>, axum::extract::rejection::QueryRejection>,
) -> Result<PageParams, Response> {
    params
        .map(|Query(p)| p)
        .map_err(|e| bad_request(e.body_text()))
}

async fn history(
    State(state): State<AppState>,
    Authenticated(identity): Authenticated,
    Segments(room): Segments<String>,
    params: Result<Query<PageParams>, axum::extract::rejection::QueryRejection>,
) -> Response {
    let result = async {
        let rooms = rooms(&state)?;
        let room = room_id(&room)?;
        let params = page_params(params)?;
        let page = rooms
            .history(&identity.user, &room, params.query())
            .await
            .map_err(room_error)?;
        Ok::<_, Response>(
            Json(json!({"room": room, "events": page.events, "more": page.more})).into_response(),
        )
    }
    .await;
    result.unwrap_or_else(|r| r)
}

/// `GET /v1/rooms/{room}/messages/{seq}/receipts`: for any member, how many of the other
/// members the message was delivered to and read by; 404 if `seq` is not a message.
async fn receipts(
    State(state): State<AppState>,
    Authenticated(identity): Authenticated,
    Segments((room, seq)): Segments<(String, String)>,
) -> Response {
    let result = async {
        let rooms = rooms(&state)?;
        let room = room_id(&room)?;
        let seq: u64 = seq
            .parse()
            .map_err(|_| bad_request("the message is named by its sequence number"))?;
        let receipts = rooms
            .receipts(&identity.user, &room, seq)
            .await
            .map_err(room_error)?;
        let mut body = receipts.to_json();
        body["seq"] = json!(seq);
        Ok::<_, Response>(Json(body).into_response())
    }
    .await;
    result.unwrap_or_else(|r| r)
}

async fn thread(
    State(state): State<AppState>,
    Authenticated(identity): Authenticated,
    Segments((room, root)): Segments<(String, String)>,
    params: Result<Query<PageParams>, axum::extract::rejection::QueryRejection>,
) -> Response {
    let result = async {
        let rooms = rooms(&state)?;
        let room = room_id(&room)?;
        let root: u64 = root
            .parse()
            .map_err(|_| bad_request("the thread root is a sequence number"))?;
        let params = page_params(params)?;
        let page = rooms
            .thread(&identity.user, &room, root, params.query())
            .await
            .map_err(room_error)?;
        Ok::<_, Response>(
            Json(json!({
                "room": room,
                "root": page.root,
                "events": page.replies.events,
                "more": page.replies.more,
            }))
            .into_response(),
        )
    }
    .await;
    result.unwrap_or_else(|r| r)
}
