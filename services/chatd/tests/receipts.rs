//! Delivery receipts end to end: `delivered` frames, coalesced into events, counted per message
//! for its author in the history (HTTP and WebSocket) and by the receipts endpoint.

mod common;

use std::time::{Duration, Instant};

use common::client::Client;
use common::*;
use serde_json::{json, Value};

/// A message's receipts as `(delivered, read, members)`.
fn counts(receipts: &Value) -> Option<(u64, u64, u64)> {
    Some((
        receipts["delivered"].as_u64()?,
        receipts["read"].as_u64()?,
        receipts["members"].as_u64()?,
    ))
}

/// The receipts of the messages at `seqs` in a history page, in that order.
fn receipts_of(events: &Value, seqs: &[u64]) -> Vec<Option<(u64, u64, u64)>> {
    seqs.iter()
        .map(|seq| {
            events
                .as_array()?
                .iter()
                .find(|e| e["seq"] == *seq)
                .and_then(|e| counts(&e["receipts"]))
        })
        .collect()
}

/// Polls alice's HTTP history until the messages at `seqs` show `want`; the last page.
async fn receipts_until(
    chatd: &chat_harness::Chatd,
    token: &str,
    seqs: &[u64],
    want: &[(u64, u64, u64)],
) -> Value {
    let want: Vec<_> = want.iter().copied().map(Some).collect();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (status, body) = api(chatd, token, "GET", "/v1/rooms/general/messages", None);
        if status == 200 && receipts_of(&body["events"], seqs) == want {
            return body;
        }
        assert!(
            Instant::now() < deadline,
            "receipts never became {want:?}: {status} {body}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Polls alice's HTTP history until `f` accepts a page (the events and the receipts of one
/// page are read one after the other, so a page may show a cursor before its event).
async fn page_until(chatd: &chat_harness::Chatd, token: &str, f: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (status, body) = api(chatd, token, "GET", "/v1/rooms/general/messages", None);
        if status == 200 && f(&body) {
            return body;
        }
        assert!(Instant::now() < deadline, "{status} {body}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The `delivered` events of a page after `after`.
fn delivered_events(page: &Value, after: u64) -> Vec<Value> {
    page["events"]
        .as_array()
        .map(|events| {
            events
                .iter()
                .filter(|e| e["kind"] == "delivered" && e["seq"].as_u64() > Some(after))
                .cloned()
                .collect()
        })
        .unwrap_or_default()
}

#[tokio::test]
async fn delivered_and_read_counts_are_right_for_a_room_with_members_offline() {
    let data = tempfile::tempdir().unwrap();
    let mut env = standalone_env(data.path());
    // Cursors are appended every 250 ms instead of every 2 s: the same path, a shorter wait.
    env.push(("CHAT_DELIVERED_INTERVAL", "250ms".to_owned()));
    let chatd = start(&env);
    let t = |user: &str| dev_token(data.path(), user, 3600);
    let ws = chatd.ws_url();

    let room = json!({"room": "general", "kind": "group", "members": ["bob", "carol", "dave"]});
    let (status, body) = api(&chatd, &t("alice"), "POST", "/v1/rooms", Some(room));
    assert_eq!(status, 201, "{body}");

    // Bob is online and subscribed; carol and dave are not.
    let mut bob = Client::connect(&ws, &t("bob")).await;
    bob.subscribe("general", None).await;
    let mut alice = Client::connect(&ws, &t("alice")).await;
    let mut m = Vec::new();
    for text in ["one", "two", "three"] {
        let ack = alice.say("general", text).await;
        assert_eq!(ack["type"], "ack", "{ack}");
        m.push(ack["seq"].as_u64().unwrap());
    }
    let got = bob.events("general", 3).await;
    assert_eq!(common::client::seqs(&got), m);

    // Bob's device has them all (one frame per message, as a client acknowledges them), and he
    // read the first.
    for seq in &m {
        bob.send(json!({"type": "delivered", "room": "general", "seq": seq}))
            .await;
    }
    bob.send(json!({"type": "read", "room": "general", "seq": m[0]}))
        .await;
    let pong = bob.request(json!({"type": "ping"})).await;
    assert_eq!(
        pong["type"], "pong",
        "the frames were taken silently: {pong}"
    );

    // Carol comes online later, catches up from the start, and has received the second only.
    let mut carol = Client::connect(&ws, &t("carol")).await;
    carol.subscribe("general", Some(0)).await;
    carol
        .wait_for(|f| f["type"] == "event" && f["seq"] == m[2])
        .await;
    carol
        .send(json!({"type": "delivered", "room": "general", "seq": m[1]}))
        .await;

    // Alice's history shows each of her messages' receipts (dave never connected).
    let page = receipts_until(&chatd, &t("alice"), &m, &[(2, 1, 3), (2, 0, 3), (1, 0, 3)]).await;
    // Only the author's own messages carry receipts; bob's view has none.
    assert!(page["events"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["kind"] == "message")
        .all(|e| e["receipts"].is_object()));
    let (_, bobs_page) = api(&chatd, &t("bob"), "GET", "/v1/rooms/general/messages", None);
    assert!(
        bobs_page["events"]
            .as_array()
            .unwrap()
            .iter()
            .all(|e| e.get("receipts").is_none()),
        "{bobs_page}"
    );
    // The coalesced events are in the log as `delivered` with `[[user, seq], …]`.
    let page = page_until(&chatd, &t("alice"), |p| !delivered_events(p, 0).is_empty()).await;
    for e in &delivered_events(&page, 0) {
        let cursors = e["cursors"].as_array().expect("cursors");
        assert_eq!(
            e["user"], cursors[0][0],
            "the envelope names the first user"
        );
    }

    // The same over the WebSocket.
    let history = alice
        .request(json!({"type": "history", "room": "general", "limit": 50}))
        .await;
    assert_eq!(history["type"], "history", "{history}");
    assert_eq!(
        receipts_of(&history["events"], &m),
        vec![Some((2, 1, 3)), Some((2, 0, 3)), Some((1, 0, 3))]
    );

    // The receipts endpoint agrees, for any member.
    let expected = [(2, 1, 3), (2, 0, 3), (1, 0, 3)];
    for (seq, (delivered, read, members)) in m.iter().zip(expected) {
        let path = format!("/v1/rooms/general/messages/{seq}/receipts");
        for user in ["alice", "dave"] {
            assert_eq!(
                api(&chatd, &t(user), "GET", &path, None),
                (
                    200,
                    json!({"seq": seq, "delivered": delivered, "read": read, "members": members})
                ),
                "{user} asks about {seq}"
            );
        }
    }
    let (status, body) = api(
        &chatd,
        &t("alice"),
        "GET",
        "/v1/rooms/general/messages/1/receipts",
        None,
    );
    assert_eq!((status, &body["error"]["code"]), (404, &json!("not_found")));
    let (status, body) = api(
        &chatd,
        &t("eve"),
        "GET",
        &format!("/v1/rooms/general/messages/{}/receipts", m[0]),
        None,
    );
    assert_eq!((status, &body["error"]["code"]), (403, &json!("forbidden")));
    let (status, body) = api(
        &chatd,
        &t("alice"),
        "GET",
        "/v1/rooms/general/messages/first/receipts",
        None,
    );
    assert_eq!(
        (status, &body["error"]["code"]),
        (400, &json!("bad_request"))
    );

    // A delivered cursor that moves backwards changes nothing: bob's goes back to the first
    // message, then carol's moves to the third; once carol's shows, bob's was flushed as well
    // (it was taken first) and the counts only grew by carol.
    bob.send(json!({"type": "delivered", "room": "general", "seq": m[0]}))
        .await;
    bob.request(json!({"type": "ping"})).await;
    carol
        .send(json!({"type": "delivered", "room": "general", "seq": m[2]}))
        .await;
    receipts_until(&chatd, &t("alice"), &m, &[(2, 1, 3), (2, 0, 3), (2, 0, 3)]).await;
    // The counts can show before carol's cursor does (bob's already covers the third message):
    // wait for carol's own, so no flush of it can land after the head read below.
    let page = page_until(&chatd, &t("alice"), |p| {
        delivered_events(p, 0)
            .iter()
            .flat_map(|e| e["cursors"].as_array().cloned().unwrap_or_default())
            .any(|c| c == json!(["carol", m[2]]))
    })
    .await;
    let backwards = page["events"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["kind"] == "delivered")
        .flat_map(|e| e["cursors"].as_array().unwrap().iter())
        .any(|c| *c == json!(["bob", m[0]]));
    assert!(
        !backwards,
        "a cursor that moves back is not appended: {page}"
    );

    // Acknowledging the room's head when it is a receipt event (as a client that acknowledges
    // whatever it receives does) crosses no message: nothing is appended, or receipts would
    // feed themselves every interval. Carol then acknowledges a new message; once that shows,
    // bob's acknowledgement was flushed too (it was recorded first).
    let head = page["events"][0]["seq"].as_u64().unwrap();
    assert_ne!(page["events"][0]["kind"], "message", "{page}");
    bob.send(json!({"type": "delivered", "room": "general", "seq": head}))
        .await;
    bob.request(json!({"type": "ping"})).await;
    let m4 = alice.say("general", "four").await["seq"].as_u64().unwrap();
    carol
        .wait_for(|f| f["type"] == "event" && f["seq"] == m4)
        .await;
    carol
        .send(json!({"type": "delivered", "room": "general", "seq": m4}))
        .await;
    let mut all = m.clone();
    all.push(m4);
    receipts_until(
        &chatd,
        &t("alice"),
        &all,
        &[(2, 1, 3), (2, 0, 3), (2, 0, 3), (1, 0, 3)],
    )
    .await;
    let page = page_until(&chatd, &t("alice"), |p| {
        !delivered_events(p, head).is_empty()
    })
    .await;
    let cursors: Vec<Value> = delivered_events(&page, head)
        .iter()
        .flat_map(|e| e["cursors"].as_array().cloned().unwrap_or_default())
        .collect();
    assert_eq!(cursors, vec![json!(["carol", m4])], "{page}");

    // Refusals: a non-member's frame, a seq above the head, a malformed frame.
    let mut eve = Client::connect(&ws, &t("eve")).await;
    let refused = eve
        .request(json!({"type": "delivered", "room": "general", "seq": m[0]}))
        .await;
    assert_eq!(
        (&refused["type"], &refused["code"], &refused["room"]),
        (&json!("error"), &json!("forbidden"), &json!("general")),
        "{refused}"
    );
    let above = bob
        .request(json!({"type": "delivered", "room": "general", "seq": 10_000}))
        .await;
    assert_eq!(above["code"], "bad_request", "{above}");
    let malformed = bob
        .request(json!({"type": "delivered", "room": "general", "seq": "x"}))
        .await;
    assert_eq!(malformed["code"], "bad_request", "{malformed}");

    for client in [alice, bob, carol, eve] {
        client.close().await;
    }
}

/// A `delivered` frame an edge took just before a drain is appended before the process exits,
/// though its interval (an hour here) is far from over: a drain flushes what its sessions left.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drain_appends_the_delivered_cursors_still_waiting() {
    let data = tempfile::tempdir().unwrap();
    let mut env = standalone_env(data.path());
    env.push(("CHAT_DELIVERED_INTERVAL", "1h".to_owned()));
    // The drain must not be cut short on a loaded machine (the default here is 2 s).
    env.retain(|(k, _)| *k != "CHAT_DRAIN_GRACE");
    env.push(("CHAT_DRAIN_GRACE", "30s".to_owned()));
    let mut chatd = start(&env);
    let t = |user: &str| dev_token(data.path(), user, 3600);
    let room = json!({"room": "general", "kind": "group", "members": ["bob"]});
    let (status, body) = api(&chatd, &t("alice"), "POST", "/v1/rooms", Some(room));
    assert_eq!(status, 201, "{body}");

    let mut bob = Client::connect(&chatd.ws_url(), &t("bob")).await;
    bob.subscribe("general", None).await;
    let mut alice = Client::connect(&chatd.ws_url(), &t("alice")).await;
    let ack = alice.say("general", "hello").await;
    let seq = ack["seq"].as_u64().expect("acked");
    bob.events("general", 1).await;
    bob.send(json!({"type": "delivered", "room": "general", "seq": seq}))
        .await;
    let pong = bob.request(json!({"type": "ping"})).await;
    assert_eq!(pong["type"], "pong", "the frame was taken: {pong}");
    let path = format!("/v1/rooms/general/messages/{seq}/receipts");
    let (_, before) = api(&chatd, &t("alice"), "GET", &path, None);
    assert_eq!(
        before["delivered"], 0,
        "nothing appended before the drain: {before}"
    );
    // And not merely unprojected: the log's head is still the message (a new subscription
    // says where the log ends).
    let mut carol_view = Client::connect(&chatd.ws_url(), &t("alice")).await;
    let subscribed = carol_view.subscribe("general", None).await;
    assert_eq!(
        subscribed["head"].as_u64(),
        Some(seq),
        "nothing appended before the drain: {subscribed}"
    );
    drop(carol_view);

    chatd.signal(nix::sys::signal::Signal::SIGTERM);
    assert_eq!(bob.closed().await, 1001, "the edge drains");
    assert!(
        chatd.wait_exit(Duration::from_secs(30)).is_some(),
        "chatd exits after the drain"
    );
    drop(chatd);

    let chatd = start(&env);
    let expected = json!({"seq": seq, "delivered": 1, "read": 0, "members": 1});
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (status, body) = api(&chatd, &t("alice"), "GET", &path, None);
        if (status, &body) == (200, &expected) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "receipts after the restart: {status} {body}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
