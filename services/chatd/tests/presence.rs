//! Presence across edges: two chatd processes on one nats-server, real sockets, short timeouts.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use chat_harness::{Chatd, NatsServer};
use common::client::Client;
use common::*;
use serde_json::{json, Value};

/// An `all` chatd on `nats`: presence renewed every 200 ms, a silent edge's users gone after
/// 1 s, changes shown every 100 ms.
fn edge(nats: &NatsServer, data: &Path) -> Chatd {
    node(
        nats,
        data,
        "all",
        &[
            ("CHAT_PRESENCE_HEARTBEAT", "200ms"),
            ("CHAT_PRESENCE_TIMEOUT", "1s"),
            ("CHAT_PRESENCE_INTERVAL", "100ms"),
        ],
    )
}

fn presence_of(frame: &Value, user: &str) -> Option<String> {
    (frame["type"] == "presence" && frame["user"] == user)
        .then(|| frame["status"].as_str().unwrap_or_default().to_owned())
}

/// The presence endpoint's answer on `chatd`, as `bob` asks it.
fn online(chatd: &Chatd, room: &str) -> Vec<String> {
    let (status, body) = api(
        chatd,
        &token("bob"),
        "GET",
        &format!("/v1/rooms/{room}/presence"),
        None,
    );
    assert_eq!(status, 200, "{body}");
    body["online"]
        .as_array()
        .unwrap()
        .iter()
        .map(|u| u.as_str().unwrap().to_owned())
        .collect()
}

async fn eventually(what: &str, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !check() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn sessions(chatd: &Chatd) -> u64 {
    let (_, text) = chatd.get("/metrics").unwrap();
    text.lines()
        .find_map(|l| l.strip_prefix("chat_edge_sessions ")?.parse().ok())
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn presence_across_edges_without_flapping_and_a_killed_edge_takes_its_users_offline() {
    let nats = NatsServer::start();
    let (d1, d2) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let (mut edge1, edge2) = (edge(&nats, d1.path()), edge(&nats, d2.path()));
    let (status, body) = api(
        &edge2,
        &token("bob"),
        "POST",
        "/v1/rooms",
        Some(json!({"room": "lobby", "kind": "group", "members": ["alice", "carol"]})),
    );
    assert_eq!(status, 201, "{body}");
    let mut bob = Client::connect(&edge2.ws_url(), &token("bob")).await;
    bob.subscribe("lobby", None).await;

    // Alice subscribes on edge 1: bob, on edge 2, sees her come online; both endpoints agree.
    let mut alice1 = Client::connect(&edge1.ws_url(), &token("alice")).await;
    alice1.subscribe("lobby", None).await;
    let came = bob.wait_for(|f| presence_of(f, "alice").is_some()).await;
    assert_eq!(
        came,
        json!({"type": "presence", "room": "lobby", "user": "alice", "status": "online"})
    );
    assert_eq!(online(&edge2, "lobby"), ["alice", "bob"]);
    eventually("edge 1 to see bob", || {
        online(&edge1, "lobby") == ["alice", "bob"]
    })
    .await;

    // A second session of alice (edge 2), then the first one leaves: no flap.
    let mut alice2 = Client::connect(&edge2.ws_url(), &token("alice")).await;
    alice2.subscribe("lobby", None).await;
    alice1.close().await;
    eventually("alice's first session to end", || sessions(&edge1) == 0).await;
    // A marker published by edge 1 after alice's departure from it: by the time bob sees it,
    // any offline frame for alice would have come first.
    let mut carol = Client::connect(&edge1.ws_url(), &token("carol")).await;
    carol.subscribe("lobby", None).await;
    bob.wait_for(|f| presence_of(f, "carol").as_deref() == Some("online"))
        .await;
    assert!(
        !bob.buffered()
            .iter()
            .any(|f| presence_of(f, "alice").is_some()),
        "alice flapped: {:?}",
        bob.buffered()
    );
    assert_eq!(online(&edge2, "lobby"), ["alice", "bob", "carol"]);

    // Her last session closes cleanly: offline promptly (well before the 1 s expiry matters).
    alice2.close().await;
    let gone = bob.wait_for(|f| presence_of(f, "alice").is_some()).await;
    assert_eq!(gone["status"], "offline");
    assert_eq!(online(&edge2, "lobby"), ["bob", "carol"]);

    // Edge 1 is killed with carol on it: she goes offline on edge 2 once its renewals stop.
    edge1.kill();
    let killed = bob.wait_for(|f| presence_of(f, "carol").is_some()).await;
    assert_eq!(killed["status"], "offline");
    assert_eq!(online(&edge2, "lobby"), ["bob"]);

    // Presence is for members only.
    let (status, _) = api(
        &edge2,
        &token("mallory"),
        "GET",
        "/v1/rooms/lobby/presence",
        None,
    );
    assert_eq!(status, 403);
    // And for valid tokens, named rooms that exist.
    let endpoint = |token: &str, path: &str| api(&edge2, token, "GET", path, None);
    let (status, body) = endpoint("not-a-token", "/v1/rooms/lobby/presence");
    assert_eq!(
        (status, &body["error"]["code"]),
        (401, &json!("unauthorized"))
    );
    let (status, body) = endpoint(&token("bob"), "/v1/rooms/nowhere/presence");
    assert_eq!((status, &body["error"]["code"]), (404, &json!("not_found")));
    let (status, body) = endpoint(&token("bob"), "/v1/rooms/Bad%20Room!/presence");
    assert_eq!(
        (status, &body["error"]["code"]),
        (400, &json!("bad_request"))
    );
}

/// More changes in one interval than `CHAT_PRESENCE_MAX_FRAMES`: one `changed` frame with their
/// number instead of a frame per user, and the endpoint has the list.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_changes_in_one_interval_come_as_one_changed_frame() {
    let nats = NatsServer::start();
    let data = tempfile::tempdir().unwrap();
    let chatd = node(
        &nats,
        data.path(),
        "all",
        &[
            ("CHAT_PRESENCE_INTERVAL", "2s"),
            ("CHAT_PRESENCE_MAX_FRAMES", "1"),
        ],
    );
    let (status, body) = api(
        &chatd,
        &token("bob"),
        "POST",
        "/v1/rooms",
        Some(json!({"room": "hall", "kind": "group", "members": ["u1", "u2", "u3"]})),
    );
    assert_eq!(status, 201, "{body}");
    let mut bob = Client::connect(&chatd.ws_url(), &token("bob")).await;
    bob.subscribe("hall", None).await;
    let mut others = Vec::new();
    for user in ["u1", "u2", "u3"] {
        let mut client = Client::connect(&chatd.ws_url(), &token(user)).await;
        client.subscribe("hall", None).await;
        others.push(client);
    }
    // Three users come online well within one 2 s interval, so at least two of them (bob
    // too, perhaps) are shown together: over the maximum of one frame.
    let changed = bob
        .wait_for(|f| f["type"] == "presence" && f.get("changed").is_some())
        .await;
    assert_eq!(changed["room"], "hall", "{changed}");
    assert!(changed["changed"].as_u64().unwrap() >= 2, "{changed}");
    assert!(
        changed.get("user").is_none() && changed.get("status").is_none(),
        "{changed}"
    );
    eventually("the endpoint to list all four", || {
        online(&chatd, "hall") == ["bob", "u1", "u2", "u3"]
    })
    .await;
}
