//! Golden bytes: the log is kept forever, so bytes written by any released version must decode.
//!
//! `tests/golden/v<N>/<name>.hex` hold events as this project wrote them with envelope version N.
//! They are never regenerated once committed: a change that makes one of them fail to decode (or
//! decode differently) breaks every log already written. When the envelope changes, add a new
//! `v<N+1>` folder next to the old ones, written by `UPDATE_GOLDEN=1 cargo test -p chat-model`,
//! which only ever creates missing files.

use std::path::PathBuf;

use chat_model::{DecodeError, Event, EventBody, RoomKind, UserId, ENVELOPE_VERSION};
use uuid::Uuid;

fn user(s: &str) -> UserId {
    UserId::parse(s).unwrap()
}

fn id(n: u8) -> Uuid {
    Uuid::from_bytes([
        0x01, 0x93, 0x5f, 0x2e, 0x4b, 0x1c, 0x7a, 0x00, 0x80, 0, 0, 0, 0, 0, 0, n,
    ])
}

/// One fixture per kind and per optional-field shape, as this version writes them.
fn fixtures() -> Vec<(&'static str, Event)> {
    let ev = |n: u8, who: &str, body| Event {
        id: id(n),
        user: user(who),
        ts: 1_763_900_000_123,
        body,
    };
    vec![
        (
            "message",
            ev(
                1,
                "alice",
                EventBody::Message {
                    text: "hi".into(),
                    thread: None,
                    reply_to: None,
                },
            ),
        ),
        (
            "message_thread_reply",
            ev(
                2,
                "bob@example.com",
                EventBody::Message {
                    text: "héllo 👍\nsecond line".into(),
                    thread: Some(46),
                    reply_to: Some(47),
                },
            ),
        ),
        (
            "edit",
            ev(
                3,
                "alice",
                EventBody::Edit {
                    target: 46,
                    text: "hi!".into(),
                },
            ),
        ),
        ("delete", ev(4, "alice", EventBody::Delete { target: 46 })),
        (
            "reaction_on",
            ev(
                5,
                "bob",
                EventBody::Reaction {
                    target: 46,
                    emoji: "👍".into(),
                    on: true,
                },
            ),
        ),
        (
            "reaction_off",
            ev(
                6,
                "bob",
                EventBody::Reaction {
                    target: 46,
                    emoji: "👍".into(),
                    on: false,
                },
            ),
        ),
        ("read", ev(7, "bob", EventBody::Read { up_to: 46 })),
        (
            "member_joined",
            ev(
                8,
                "alice",
                EventBody::MemberJoined {
                    member: user("carol"),
                },
            ),
        ),
        (
            "member_left",
            ev(
                9,
                "carol",
                EventBody::MemberLeft {
                    member: user("carol"),
                },
            ),
        ),
        (
            "room_created_group",
            ev(
                10,
                "alice",
                EventBody::RoomCreated {
                    name: "General".into(),
                    room_kind: RoomKind::Group,
                    members: vec![user("alice"), user("bob")],
                },
            ),
        ),
        (
            "room_created_direct",
            ev(
                11,
                "auth0|5f7c",
                EventBody::RoomCreated {
                    name: String::new(),
                    room_kind: RoomKind::Direct,
                    members: vec![user("auth0|5f7c"), user("bob")],
                },
            ),
        ),
        (
            "room_updated_read_only",
            ev(12, "alice", EventBody::RoomUpdated { read_only: true }),
        ),
        (
            "delivered",
            ev(
                13,
                "bob",
                EventBody::Delivered {
                    cursors: vec![(user("bob"), 46), (user("carol@example.com"), 45)],
                },
            ),
        ),
    ]
}

fn golden_dir(version: u16) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(format!("tests/golden/v{version}"))
}

fn read_hex(path: &std::path::Path) -> Vec<u8> {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    hex::decode(text.trim()).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

#[test]
fn this_version_writes_exactly_the_golden_bytes() {
    let dir = golden_dir(ENVELOPE_VERSION);
    let update = std::env::var_os("UPDATE_GOLDEN").is_some();
    for (name, event) in fixtures() {
        let path = dir.join(format!("{name}.hex"));
        let bytes = event.encode().unwrap();
        if update && !path.exists() {
            std::fs::create_dir_all(&dir).unwrap();
            std::fs::write(&path, hex::encode(&bytes) + "\n").unwrap();
        }
        assert_eq!(
            hex::encode(&bytes),
            hex::encode(read_hex(&path)),
            "{name}: the encoding changed; old readers and the golden files disagree"
        );
    }
}

#[test]
fn every_golden_file_ever_written_still_decodes() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/golden");
    let mut checked = 0;
    for version_dir in std::fs::read_dir(&root).unwrap() {
        let version_dir = version_dir.unwrap().path();
        for file in std::fs::read_dir(&version_dir).unwrap() {
            let path = file.unwrap().path();
            let event = Event::decode(&read_hex(&path))
                .unwrap_or_else(|e| panic!("{} no longer decodes: {e}", path.display()));
            // Decoding then re-encoding must keep the meaning: the re-encoded bytes decode equal.
            assert_eq!(
                Event::decode(&event.encode().unwrap()).unwrap(),
                event,
                "{}",
                path.display()
            );
            checked += 1;
        }
    }
    assert!(
        checked >= fixtures().len(),
        "only {checked} golden files found under {}",
        root.display()
    );
}

#[test]
fn golden_v1_decodes_to_the_fixtures() {
    let dir = golden_dir(1);
    for (name, event) in fixtures() {
        let decoded = Event::decode(&read_hex(&dir.join(format!("{name}.hex")))).unwrap();
        assert_eq!(decoded, event, "{name}");
    }
}

#[test]
fn the_envelope_is_a_named_map_with_the_documented_fields() {
    let bytes = fixtures()[0].1.encode().unwrap();
    let value: serde_json::Value = rmp_serde::from_slice(&bytes).unwrap();
    assert_eq!(
        value,
        serde_json::json!({
            "v": 1, "kind": "message", "id": "01935f2e-4b1c-7a00-8000-000000000001",
            "user": "alice", "ts": 1_763_900_000_123_i64, "text": "hi"
        })
    );
}

#[derive(serde::Serialize)]
struct FutureMessage<'a> {
    v: u16,
    kind: &'a str,
    id: &'a str,
    user: &'a str,
    ts: i64,
    text: &'a str,
    /// A field a later version might add.
    format: &'a str,
}

#[test]
fn unknown_fields_are_ignored_so_writers_can_add_optional_ones() {
    let future = FutureMessage {
        v: 1,
        kind: "message",
        id: "01935f2e-4b1c-7a00-8000-000000000001",
        user: "alice",
        ts: 5,
        text: "hi",
        format: "markdown",
    };
    let event = Event::decode(&rmp_serde::to_vec_named(&future).unwrap()).unwrap();
    assert_eq!(
        event.body,
        EventBody::Message {
            text: "hi".into(),
            thread: None,
            reply_to: None
        }
    );
}

#[test]
fn unknown_kinds_and_versions_and_garbage_are_typed_errors() {
    let mut future = FutureMessage {
        v: 1,
        kind: "poll",
        id: "01935f2e-4b1c-7a00-8000-000000000001",
        user: "alice",
        ts: 5,
        text: "?",
        format: "",
    };
    let bytes = rmp_serde::to_vec_named(&future).unwrap();
    assert!(matches!(Event::decode(&bytes), Err(DecodeError::UnknownKind(k)) if k == "poll"));
    future.kind = "message";
    future.v = ENVELOPE_VERSION + 1;
    let bytes = rmp_serde::to_vec_named(&future).unwrap();
    assert!(matches!(
        Event::decode(&bytes),
        Err(DecodeError::UnsupportedVersion(_))
    ));
    future.v = 1;
    future.id = "not-a-uuid";
    let bytes = rmp_serde::to_vec_named(&future).unwrap();
    assert!(matches!(Event::decode(&bytes), Err(DecodeError::BadId(_))));
    assert!(matches!(
        Event::decode(b"\xc1garbage"),
        Err(DecodeError::Msgpack(_))
    ));
    assert!(matches!(Event::decode(b""), Err(DecodeError::Msgpack(_))));
    // An envelope with anything after it: more msgpack, or bytes that are none.
    future.id = "01935f2e-4b1c-7a00-8000-000000000001";
    let mut bytes = rmp_serde::to_vec_named(&future).unwrap();
    assert!(Event::decode(&bytes).is_ok());
    for tail in [&b"\xa7TRAILER"[..], b"\xc1", b"\x00"] {
        let len = bytes.len();
        bytes.extend_from_slice(tail);
        assert!(
            matches!(Event::decode(&bytes), Err(DecodeError::TrailingBytes)),
            "{tail:?}"
        );
        bytes.truncate(len);
    }
}

#[test]
fn a_kind_without_its_required_field_is_refused() {
    #[derive(serde::Serialize)]
    struct EditWithoutTarget<'a> {
        v: u16,
        kind: &'a str,
        id: &'a str,
        user: &'a str,
        ts: i64,
        text: &'a str,
    }
    let bytes = rmp_serde::to_vec_named(&EditWithoutTarget {
        v: 1,
        kind: "edit",
        id: "01935f2e-4b1c-7a00-8000-000000000001",
        user: "alice",
        ts: 5,
        text: "x",
    })
    .unwrap();
    assert!(matches!(
        Event::decode(&bytes),
        Err(DecodeError::MissingField {
            field: "target",
            ..
        })
    ));
}

#[test]
fn oversized_events_are_refused_at_encoding() {
    let event = Event {
        id: id(1),
        user: user("alice"),
        ts: 0,
        body: EventBody::Message {
            text: "x".repeat(chat_model::MAX_EVENT_BYTES + 1),
            thread: None,
            reply_to: None,
        },
    };
    assert!(matches!(
        event.encode(),
        Err(chat_model::EncodeError::TooLarge { .. })
    ));
}
