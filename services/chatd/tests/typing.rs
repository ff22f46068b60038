//! Typing indicators across edges: two chatd processes on one nats-server, real sockets.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use chat_harness::{Chatd, NatsServer};
use common::client::Client;
use common::*;
use serde_json::{json, Value};

/// An `all` chatd on `nats` whose typing indicators expire after 1 s.
fn edge(nats: &NatsServer, data: &Path) -> Chatd {
    node(
        nats,
        data,
        "all",
        &[
            ("CHAT_TYPING_TIMEOUT", "1s"),
            ("CHAT_TYPING_RATE", "1000/1000"),
        ],
    )
}

/// Two edges on one nats-server, a room of alice and bob (created by `creator` on its edge),
/// alice connected to the first edge and bob to the second.
struct Pair {
    _nats: NatsServer,
    _dirs: (tempfile::TempDir, tempfile::TempDir),
    edge1: Chatd,
    edge2: Chatd,
    alice: Client,
    bob: Client,
}

async fn pair(room: &str, creator: &str) -> Pair {
    let nats = NatsServer::start();
    let dirs = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let (edge1, edge2) = (edge(&nats, dirs.0.path()), edge(&nats, dirs.1.path()));
    let (on, other) = if creator == "alice" {
        (&edge1, "bob")
    } else {
        (&edge2, "alice")
    };
    let (status, body) = api(
        on,
        &token(creator),
        "POST",
        "/v1/rooms",
        Some(json!({"room": room, "kind": "group", "members": [other]})),
    );
    assert_eq!(status, 201, "{body}");
    let alice = Client::connect(&edge1.ws_url(), &token("alice")).await;
    let bob = Client::connect(&edge2.ws_url(), &token("bob")).await;
    Pair {
        _nats: nats,
        _dirs: dirs,
        edge1,
        edge2,
        alice,
        bob,
    }
}

fn is_typing(frame: &Value, user: &str) -> bool {
    frame["type"] == "typing" && frame["user"] == user
}

async fn typing(client: &mut Client, room: &str, active: bool) {
    client
        .send(json!({"type": "typing", "room": room, "active": active}))
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn typing_crosses_edges_once_per_interval_ends_with_the_message_or_expires() {
    let mut p = pair("keys", "alice").await;
    let (alice, bob, edge2) = (&mut p.alice, &mut p.bob, &p.edge2);
    alice.subscribe("keys", None).await;
    bob.subscribe("keys", None).await;

    // Keystrokes: many active:true within the interval, then the message.
    for _ in 0..5 {
        typing(alice, "keys", true).await;
    }
    let first = bob.wait_for(|f| is_typing(f, "alice")).await;
    let first_shown = Instant::now();
    assert_eq!(
        first,
        json!({"type": "typing", "room": "keys", "user": "alice", "active": true})
    );
    for _ in 0..5 {
        typing(alice, "keys", true).await;
    }
    let ack = alice.say("keys", "done typing").await;
    assert_eq!(ack["type"], "ack", "{ack}");
    let ended = bob
        .wait_for(|f| is_typing(f, "alice") && f["active"] == false)
        .await;
    assert_eq!(ended["room"], "keys");
    let event = bob.wait_for(|f| f["type"] == "event").await;
    assert_eq!(event["text"], "done typing");
    assert!(
        !bob.buffered().iter().any(|f| is_typing(f, "alice")),
        "one active:true for the burst, one active:false for the message: {:?}",
        bob.buffered()
    );

    // Typing again at once starts a new indicator, shown once 2 s have passed since the last
    // one (at most one active:true per 2 s, across the message) while alice keeps typing.
    let deadline = Instant::now() + Duration::from_secs(15);
    let again = loop {
        assert!(
            Instant::now() < deadline,
            "typing again after the message is never shown"
        );
        typing(alice, "keys", true).await;
        let shown = tokio::time::timeout(
            Duration::from_millis(300),
            bob.wait_for(|f| is_typing(f, "alice")),
        )
        .await;
        if let Ok(shown) = shown {
            break shown;
        }
    };
    assert_eq!(again["active"], true);
    let apart = first_shown.elapsed();
    assert!(
        apart >= Duration::from_millis(1_500),
        "two active:true {apart:?} apart"
    );
    // A renewal-less indicator expires (1 s here, 5 s by default).
    let expired = bob.wait_for(|f| is_typing(f, "alice")).await;
    assert_eq!(expired["active"], false);

    // Bob types back: alice sees it; nobody ever gets their own (a round trip on each socket
    // first, so that an echo would have arrived).
    typing(bob, "keys", true).await;
    let seen = alice.wait_for(|f| is_typing(f, "bob")).await;
    assert_eq!(seen["active"], true);
    let pong = alice.request(json!({"type": "ping"})).await;
    assert_eq!(pong["type"], "pong");
    let pong = bob.request(json!({"type": "ping"})).await;
    assert_eq!(pong["type"], "pong");
    assert!(!alice.buffered().iter().any(|f| is_typing(f, "alice")));
    assert!(!bob.buffered().iter().any(|f| is_typing(f, "bob")));

    // Typing is for members only.
    let mut carol = Client::connect(&edge2.ws_url(), &token("carol")).await;
    let refused = carol
        .request(json!({"type": "typing", "room": "keys", "active": true}))
        .await;
    assert_eq!(refused["code"], "forbidden", "{refused}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_renewal_within_the_interval_moves_the_expiry() {
    let mut p = pair("slow", "alice").await;
    let (alice, bob) = (&mut p.alice, &mut p.bob);
    bob.subscribe("slow", None).await;

    typing(alice, "slow", true).await;
    let shown = bob.wait_for(|f| is_typing(f, "alice")).await;
    assert_eq!(shown["active"], true);
    // Renewals within the 2 s interval, 300 ms apart by the clock: bob is not told again, but
    // each moves the end. (A renewal later than the 1 s expiry would let the indicator end
    // early: the test could not tell, and says so.)
    let start = Instant::now();
    let mut last = start;
    for n in 1..=3u32 {
        tokio::time::sleep_until((start + Duration::from_millis(300) * n).into()).await;
        typing(alice, "slow", true).await;
        let gap = last.elapsed();
        assert!(
            gap < Duration::from_millis(800),
            "the machine stalled {gap:?} between renewals: too slow to judge the expiry"
        );
        last = Instant::now();
    }
    let ended = bob.wait_for(|f| is_typing(f, "alice")).await;
    assert_eq!(ended["active"], false, "one active:true for the interval");
    // The expiry (1 s here) counts from the last renewal, not from the first active:true
    // (when renewals within the interval were not forwarded, it came ~0.1 s after the last).
    let after = last.elapsed();
    assert!(
        after >= Duration::from_millis(950),
        "ended {after:?} after the last renewal"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_indicator_does_not_stick_when_the_typing_users_edge_is_killed() {
    let mut p = pair("vanish", "bob").await;
    let (alice, bob, edge1) = (&mut p.alice, &mut p.bob, &mut p.edge1);
    bob.subscribe("vanish", None).await;
    typing(alice, "vanish", true).await;
    let shown = bob.wait_for(|f| is_typing(f, "alice")).await;
    assert_eq!(shown["active"], true);

    edge1.kill();
    let cleared = bob.wait_for(|f| is_typing(f, "alice")).await;
    assert_eq!(
        cleared["active"], false,
        "the indicator expired without its edge"
    );
}
