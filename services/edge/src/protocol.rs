//! Frames and codes of the client contract (version 1).

use serde_json::{json, Value};

/// Close codes of the contract.
pub mod close_code {
    /// Token invalid or expired (also: no valid `auth` frame in time).
    pub const TOKEN: u16 = 4001;
    /// Too slow to keep up.
    pub const TOO_SLOW: u16 = 4008;
    /// Kept flooding after being rate-limited.
    pub const FLOOD: u16 = 4029;
    /// Server draining: reconnect elsewhere.
    pub const DRAINING: u16 = 1001;
    /// Frame too big.
    pub const TOO_BIG: u16 = 1009;
    /// A text frame that is not UTF-8.
    pub const INVALID_DATA: u16 = 1007;
    /// A breach of the WebSocket protocol (an unmasked client frame, a reserved opcode or bit).
    pub const PROTOCOL: u16 = 1002;
    /// The user has the most connections allowed (after first-frame authentication; with a
    /// token in the upgrade request the answer is HTTP 429 instead).
    pub const TRY_AGAIN_LATER: u16 = 1013;
    /// Nothing (no frame, no pong) heard from the client within the idle timeout.
    pub const IDLE: u16 = 4002;
}

/// `code` of an `error` frame (and of HTTP error bodies).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorCode {
    BadRequest,
    Unauthorized,
    Forbidden,
    NotFound,
    TooLarge,
    RateLimited,
    Conflict,
    Unavailable,
    Internal,
}

impl ErrorCode {
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::BadRequest => "bad_request",
            ErrorCode::Unauthorized => "unauthorized",
            ErrorCode::Forbidden => "forbidden",
            ErrorCode::NotFound => "not_found",
            ErrorCode::TooLarge => "too_large",
            ErrorCode::RateLimited => "rate_limited",
            ErrorCode::Conflict => "conflict",
            ErrorCode::Unavailable => "unavailable",
            ErrorCode::Internal => "internal",
        }
    }
}

/// A client frame, read far enough to answer it: its type and its `rid`. Its other fields are
/// read from `text` by whoever handles its type, straight into the fields that type has (no
/// intermediate JSON tree: the frame is parsed once more, which costs less than building one).
#[derive(Debug)]
pub struct Frame<'a> {
    pub kind: String,
    pub rid: Option<String>,
    pub text: &'a str,
}

impl Frame<'_> {
    /// The frame's fields as `T` (unknown fields, `type` and `rid` among them, are ignored).
    pub fn fields<T: serde::de::DeserializeOwned>(&self) -> Result<T, serde_json::Error> {
        serde_json::from_str(self.text)
    }
}

/// Why a text frame could not be read as a client frame; the `rid` when it could be found.
#[derive(Debug)]
pub struct Malformed {
    pub rid: Option<String>,
    pub message: String,
}

/// What every frame has: its `type` and `rid`, whatever their JSON types (checked after).
#[derive(serde::Deserialize)]
struct Envelope {
    #[serde(rename = "type", default)]
    kind: Option<Value>,
    #[serde(default)]
    rid: Option<Value>,
}

/// Reads a text frame: a JSON object with a string `type` and, optionally, a string `rid`.
pub fn parse(text: &str) -> Result<Frame<'_>, Malformed> {
    let malformed = |message: String| Malformed { rid: None, message };
    let object = || malformed("a frame is a JSON object".to_owned());
    let envelope: Envelope = match serde_json::from_str(text) {
        Ok(envelope) => envelope,
        Err(e) if e.is_data() => {
            return Err(if text.trim_start().starts_with('{') {
                // A repeated `type` or `rid`.
                malformed(format!("malformed frame: {e}"))
            } else {
                object()
            });
        }
        Err(e) => return Err(malformed(format!("malformed JSON: {e}"))),
    };
    // The derived reader also takes a JSON array as a struct.
    if !text.trim_start().starts_with('{') {
        return Err(object());
    }
    let rid = match envelope.rid {
        None => None,
        Some(Value::String(s)) if s.len() <= 128 => Some(s),
        Some(_) => {
            return Err(malformed(
                "rid must be a string of at most 128 bytes".to_owned(),
            ))
        }
    };
    let kind = match envelope.kind {
        Some(Value::String(t)) => t,
        _ => {
            return Err(Malformed {
                rid,
                message: "a frame needs a string \"type\"".to_owned(),
            })
        }
    };
    Ok(Frame { kind, rid, text })
}

/// `{"type":"error","rid":…,"code":…,"message":…}`
pub fn error(rid: Option<&str>, code: ErrorCode, message: &str) -> String {
    let mut frame = json!({ "type": "error", "code": code.as_str(), "message": message });
    if let Some(rid) = rid {
        frame["rid"] = json!(rid);
    }
    frame.to_string()
}

/// `{"type":"error","rid":…,"room":…,"code":…,"message":…}` for an error concerning a room.
pub fn room_error(rid: Option<&str>, room: &str, code: &str, message: &str) -> String {
    let mut frame = json!({ "type": "error", "room": room, "code": code, "message": message });
    if let Some(rid) = rid {
        frame["rid"] = json!(rid);
    }
    frame.to_string()
}

/// A reply frame of `kind` with the `rid` and the given fields.
pub fn reply(kind: &str, rid: Option<&str>, fields: Value) -> String {
    let mut frame = json!({ "type": kind });
    if let Some(rid) = rid {
        frame["rid"] = json!(rid);
    }
    if let (Some(frame), Value::Object(fields)) = (frame.as_object_mut(), fields) {
        frame.extend(fields);
    }
    frame.to_string()
}

/// `{"type":"ack","rid":…,"room":…,"id":…,"seq":…,"ts":…,"duplicate":…}`, the answer to every
/// accepted append: written straight from its fields (the same bytes as [`reply`] would make),
/// without building a map first.
pub fn ack(
    rid: Option<&str>,
    room: &str,
    id: &uuid::Uuid,
    seq: u64,
    ts: i64,
    duplicate: bool,
) -> String {
    #[derive(serde::Serialize)]
    struct Ack<'a> {
        r#type: &'static str,
        #[serde(skip_serializing_if = "Option::is_none")]
        rid: Option<&'a str>,
        room: &'a str,
        id: uuid::fmt::Hyphenated,
        seq: u64,
        ts: i64,
        duplicate: bool,
    }
    let ack = Ack {
        r#type: "ack",
        rid,
        room,
        id: id.hyphenated(),
        seq,
        ts,
        duplicate,
    };
    serde_json::to_string(&ack).unwrap_or_default()
}

/// `{"type":"pong","rid":…}`
pub fn pong(rid: Option<&str>) -> String {
    let mut frame = json!({ "type": "pong" });
    if let Some(rid) = rid {
        frame["rid"] = json!(rid);
    }
    frame.to_string()
}

/// `{"type":"welcome","user":…,"rooms":[…]}`
pub fn welcome(user: &str, rooms: &[Value], rid: Option<&str>) -> String {
    reply("welcome", rid, json!({ "user": user, "rooms": rooms }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn acks_are_the_bytes_a_reply_would_be() {
        let id = uuid::Uuid::from_u128(0x0123_4567_89ab_cdef_0123_4567_89ab_cdef);
        for rid in [None, Some("r\"1\n")] {
            let general = reply(
                "ack",
                rid,
                json!({"room": "general", "id": id.hyphenated().to_string(), "seq": 42,
                       "ts": -7, "duplicate": true}),
            );
            assert_eq!(ack(rid, "general", &id, 42, -7, true), general);
        }
    }

    #[test]
    fn frames_are_read_far_enough_to_answer_them() {
        let f = parse(r#"{"type":"ping","rid":"8"}"#).unwrap();
        assert_eq!((f.kind.as_str(), f.rid.as_deref()), ("ping", Some("8")));
        let e = parse(r#"{"rid":"3"}"#).unwrap_err();
        assert_eq!(
            e.rid.as_deref(),
            Some("3"),
            "the rid is kept so the error can answer it"
        );
        for bad in [
            "",
            "{",
            "[]",
            r#"["ping","8"]"#,
            "42",
            "null",
            r#"{"type":5}"#,
            r#"{"type":"ping","rid":7}"#,
            r#"{"type":"ping","type":"send"}"#,
            r#"{"type":"ping"} x"#,
        ] {
            assert!(parse(bad).is_err(), "{bad:?}");
        }
        let null_rid = parse(r#"{"type":"ping","rid":null,"extra":[1,{"a":2}]}"#).unwrap();
        assert_eq!((null_rid.kind.as_str(), null_rid.rid), ("ping", None));
        assert_eq!(parse("[]").unwrap_err().message, "a frame is a JSON object");
        assert!(parse("{")
            .unwrap_err()
            .message
            .starts_with("malformed JSON"));
    }

    #[test]
    fn error_frames_carry_the_rid_when_there_is_one() {
        let e: Value = serde_json::from_str(&error(Some("3"), ErrorCode::BadRequest, "x")).unwrap();
        assert_eq!(
            e,
            json!({"type":"error","rid":"3","code":"bad_request","message":"x"})
        );
        let e: Value = serde_json::from_str(&error(None, ErrorCode::Internal, "y")).unwrap();
        assert!(e.get("rid").is_none());
    }
}
