//! Golden bytes of the user log's block-list events: kept forever like the room events'.
//!
//! `tests/golden_blocks/v<N>/<name>.hex` hold events as this project wrote them with envelope
//! version N; they are never regenerated once committed. Missing files are written by
//! `UPDATE_GOLDEN=1 cargo test -p chat-model`, which never overwrites one.

use std::collections::BTreeSet;
use std::path::PathBuf;

use chat_model::{BlockChange, BlockEvent, UserId, ENVELOPE_VERSION};
use uuid::Uuid;

fn user(s: &str) -> UserId {
    UserId::parse(s).unwrap()
}

fn fixtures() -> Vec<(&'static str, BlockEvent)> {
    let id = |n: u8| {
        Uuid::from_bytes([
            0x01, 0x93, 0x5f, 0x2e, 0x4b, 0x1c, 0x7a, 0x00, 0x80, 0, 0, 0, 0, 0, 1, n,
        ])
    };
    let list = |users: &[&str]| users.iter().map(|u| user(u)).collect::<BTreeSet<_>>();
    vec![
        (
            "block",
            BlockEvent {
                id: id(1),
                user: user("alice"),
                ts: 1_763_900_000_123,
                change: BlockChange::Block(user("bob")),
                blocked: list(&["auth0|5f7c", "bob"]),
            },
        ),
        (
            "unblock_to_empty",
            BlockEvent {
                id: id(2),
                user: user("alice@example.com"),
                ts: 1_763_900_000_456,
                change: BlockChange::Unblock(user("bob")),
                blocked: list(&[]),
            },
        ),
    ]
}

fn golden_dir(version: u16) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(format!("tests/golden_blocks/v{version}"))
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
fn every_golden_file_ever_written_decodes_to_its_fixture() {
    let fixtures = fixtures();
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/golden_blocks");
    let mut checked = 0;
    for version_dir in std::fs::read_dir(&root).unwrap() {
        for file in std::fs::read_dir(version_dir.unwrap().path()).unwrap() {
            let path = file.unwrap().path();
            let event = BlockEvent::decode(&read_hex(&path))
                .unwrap_or_else(|e| panic!("{} no longer decodes: {e}", path.display()));
            let name = path.file_stem().unwrap().to_str().unwrap();
            if let Some((_, fixture)) = fixtures.iter().find(|(n, _)| *n == name) {
                assert_eq!(&event, fixture, "{}", path.display());
            }
            checked += 1;
        }
    }
    assert!(checked >= fixtures.len(), "only {checked} golden files");
}

#[test]
fn the_block_event_is_a_named_map_with_the_documented_fields() {
    let bytes = fixtures()[0].1.encode().unwrap();
    let value: serde_json::Value = rmp_serde::from_slice(&bytes).unwrap();
    assert_eq!(
        value,
        serde_json::json!({
            "v": 1, "kind": "block", "id": "01935f2e-4b1c-7a00-8000-000000000101",
            "user": "alice", "ts": 1_763_900_000_123_i64, "target": "bob",
            "blocked": ["auth0|5f7c", "bob"]
        })
    );
}
