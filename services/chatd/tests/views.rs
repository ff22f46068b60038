//! What clients see of a room over HTTP and WebSocket: the rooms API, edits, deletes,
//! reactions, threads and history pages.

mod common;

use std::time::{Duration, Instant};

use common::client::Client;
use common::*;
use serde_json::{json, Value};
use uuid::Uuid;

fn id() -> String {
    Uuid::new_v4().to_string()
}

#[tokio::test]
async fn rooms_api_creates_group_and_direct_rooms_and_changes_membership() {
    let data = tempfile::tempdir().unwrap();
    let chatd = start(&standalone_env(data.path()));
    let t = |user: &str| dev_token(data.path(), user, 3600);
    let call = |user: &str, method: &str, path: &str, body: Option<Value>| {
        api(&chatd, &t(user), method, path, body)
    };

    let group = json!({"room": "ops", "kind": "group", "name": "Ops", "members": ["bob"]});
    assert_eq!(
        call("alice", "POST", "/v1/rooms", Some(group.clone())),
        (201, json!({"room": "ops", "seq": 1}))
    );
    let (status, body) = call("carol", "POST", "/v1/rooms", Some(group));
    assert_eq!(
        (status, &body["error"]["code"]),
        (409, &json!("conflict")),
        "{body}"
    );
    let (status, _) = call(
        "alice",
        "POST",
        "/v1/rooms",
        Some(json!({"room": "dm-x", "kind": "group"})),
    );
    assert_eq!(status, 400, "dm- ids are reserved");
    let (status, _) = call(
        "alice",
        "POST",
        "/v1/rooms",
        Some(json!({"room": "bad id!", "kind": "group"})),
    );
    assert_eq!(status, 400);
    assert_eq!(
        chat_harness::http_request(chatd.http_addr(), "GET", "/v1/rooms", &[], None)
            .unwrap()
            .0,
        401,
        "no token"
    );

    // With an id, a retried creation is answered with the same room.
    let retried = json!({"room": "retry", "kind": "group", "id": Uuid::new_v4().to_string()});
    assert_eq!(
        call("alice", "POST", "/v1/rooms", Some(retried.clone())),
        (201, json!({"room": "retry", "seq": 1}))
    );
    assert_eq!(
        call("alice", "POST", "/v1/rooms", Some(retried.clone())),
        (200, json!({"room": "retry", "seq": 1}))
    );
    // The same id from someone else is not a retry of theirs.
    let (status, body) = call("bob", "POST", "/v1/rooms", Some(retried));
    assert_eq!(
        (status, &body["error"]["code"]),
        (409, &json!("conflict")),
        "{body}"
    );

    // Direct rooms: the same room for the pair, whoever asks.
    let (status, first) = call(
        "alice",
        "POST",
        "/v1/rooms",
        Some(json!({"kind": "direct", "members": ["bob"]})),
    );
    assert_eq!(status, 201, "{first}");
    let dm = first["room"].as_str().unwrap().to_owned();
    assert!(dm.starts_with("dm-"));
    let (status, again) = call(
        "bob",
        "POST",
        "/v1/rooms",
        Some(json!({"kind": "direct", "members": ["alice"]})),
    );
    assert_eq!((status, &again), (200, &json!({"room": dm, "seq": 1})));
    let (status, _) = call(
        "alice",
        "POST",
        &format!("/v1/rooms/{dm}/members"),
        Some(json!({"user": "carol"})),
    );
    assert_eq!(status, 400, "a direct room keeps its pair");

    // Any member invites; a non-member cannot; the admin removes; anyone leaves.
    let (status, joined) = call(
        "bob",
        "POST",
        "/v1/rooms/ops/members",
        Some(json!({"user": "carol"})),
    );
    assert_eq!((status, &joined), (200, &json!({"seq": 2})));
    assert_eq!(
        call(
            "dave",
            "POST",
            "/v1/rooms/ops/members",
            Some(json!({"user": "dave"}))
        )
        .0,
        403
    );
    assert_eq!(
        call(
            "bob",
            "POST",
            "/v1/rooms/ops/members",
            Some(json!({"user": "carol"}))
        )
        .0,
        409
    );
    assert_eq!(
        call("carol", "DELETE", "/v1/rooms/ops/members/carol", None),
        (200, json!({"seq": 3}))
    );

    let (status, list) = call("bob", "GET", "/v1/rooms", None);
    assert_eq!(status, 200);
    let rooms: Vec<&Value> = list["rooms"].as_array().unwrap().iter().collect();
    assert_eq!(rooms.len(), 2, "{list}");
    let ops = rooms.iter().find(|r| r["room"] == "ops").unwrap();
    assert_eq!(
        (&ops["kind"], &ops["name"], &ops["head"]),
        (&json!("group"), &json!("Ops"), &json!(3))
    );
    let direct = rooms.iter().find(|r| r["room"] == dm.as_str()).unwrap();
    assert_eq!(direct["kind"], "direct");
    assert!(call("carol", "GET", "/v1/rooms", None).1["rooms"]
        .as_array()
        .unwrap()
        .is_empty());
}

/// Polls the HTTP history until `f` accepts it.
async fn history_until(
    chatd: &chat_harness::Chatd,
    token: &str,
    path: &str,
    f: impl Fn(&Value) -> bool,
) -> Value {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (status, body) = api(chatd, token, "GET", path, None);
        if status == 200 && f(&body) {
            return body;
        }
        assert!(Instant::now() < deadline, "{path}: {status} {body}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn edits_deletes_reactions_and_threads_as_clients_see_them() {
    let data = tempfile::tempdir().unwrap();
    let chatd = start(&standalone_env(data.path()));
    let t = |user: &str| dev_token(data.path(), user, 3600);
    let (status, _) = api(
        &chatd,
        &t("alice"),
        "POST",
        "/v1/rooms",
        Some(json!({"room": "v", "kind": "group", "members": ["bob"]})),
    );
    assert_eq!(status, 201);
    let mut alice = Client::connect(&chatd.ws_url(), &t("alice")).await;
    let mut bob = Client::connect(&chatd.ws_url(), &t("bob")).await;

    let root = alice.say("v", "root").await["seq"].as_u64().unwrap();
    let bobs = bob.say("v", "typo").await["seq"].as_u64().unwrap();
    // Only the author edits.
    let stolen = alice
        .request(json!({"type": "edit", "room": "v", "id": id(), "target": bobs, "text": "mine"}))
        .await;
    assert_eq!(stolen["code"], "forbidden");
    let edit = bob
        .request(json!({"type": "edit", "room": "v", "id": id(), "target": bobs, "text": "fixed"}))
        .await;
    assert_eq!(edit["type"], "ack", "{edit}");
    // bob may not delete alice's message; alice (admin) may delete bob's.
    let refused = bob
        .request(json!({"type": "delete", "room": "v", "id": id(), "target": root}))
        .await;
    assert_eq!(refused["code"], "forbidden");
    let doomed = bob.say("v", "to be deleted").await["seq"].as_u64().unwrap();
    let deleted = alice
        .request(json!({"type": "delete", "room": "v", "id": id(), "target": doomed}))
        .await;
    assert_eq!(deleted["type"], "ack", "{deleted}");
    // Reactions: set, set by another, cleared.
    for (who, on) in [("alice", true), ("bob", true), ("alice", false)] {
        let client = if who == "alice" { &mut alice } else { &mut bob };
        let ack = client.request(json!({"type": "react", "room": "v", "id": id(), "target": root, "emoji": "👍", "on": on})).await;
        assert_eq!(ack["type"], "ack", "{ack}");
    }
    let nowhere = bob.request(json!({"type": "react", "room": "v", "id": id(), "target": 999, "emoji": "👍", "on": true})).await;
    assert_eq!(nowhere["code"], "not_found");
    // A thread on the root.
    let r1 = bob
        .request(
            json!({"type": "send", "room": "v", "id": id(), "text": "reply 1", "thread": root}),
        )
        .await["seq"]
        .as_u64()
        .unwrap();
    let r2 = alice.request(json!({"type": "send", "room": "v", "id": id(), "text": "reply 2", "thread": root, "reply_to": r1})).await["seq"].as_u64().unwrap();
    let nested = alice
        .request(json!({"type": "send", "room": "v", "id": id(), "text": "x", "thread": r1}))
        .await;
    assert_eq!(
        nested["code"], "bad_request",
        "threads are one level deep: {nested}"
    );

    let body = history_until(&chatd, &t("bob"), "/v1/rooms/v/messages?limit=50", |b| {
        b["events"][0]["seq"] == r2
            && b["events"]
                .as_array()
                .unwrap()
                .iter()
                .any(|e| e["seq"] == root && e["replies"]["count"] == 2)
    })
    .await;
    let by_seq = |seq: u64| {
        body["events"]
            .as_array()
            .unwrap()
            .iter()
            .find(|e| e["seq"] == seq)
            .unwrap()
            .clone()
    };
    let root_view = by_seq(root);
    assert_eq!(
        root_view["reactions"],
        json!([{"emoji": "👍", "count": 1, "users": ["bob"]}])
    );
    assert_eq!(root_view["replies"], json!({"count": 2, "last": r2}));
    assert_eq!(
        (&by_seq(bobs)["text"], &by_seq(bobs)["edited"]),
        (&json!("fixed"), &json!(true))
    );
    let gone = by_seq(doomed);
    assert_eq!(gone["deleted"], true);
    assert!(gone.get("text").is_none(), "{gone}");
    assert_eq!(by_seq(r2)["reply_to"], r1);
    assert!(
        body["events"]
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["kind"] == "room_created"),
        "non-message events included"
    );
    assert_eq!(body["more"], false);

    // The same materialized form over WebSocket.
    let ws = bob
        .request(json!({"type": "history", "room": "v", "limit": 50}))
        .await;
    assert_eq!(
        (&ws["events"], &ws["more"]),
        (&body["events"], &body["more"])
    );
    // Once the store holds the delete, the message takes no more edits, deletes or reactions
    // (its author asking), rather than acknowledging events that would change nothing.
    for frame in [
        json!({"type": "edit", "room": "v", "id": id(), "target": doomed, "text": "back?"}),
        json!({"type": "delete", "room": "v", "id": id(), "target": doomed}),
        json!({"type": "react", "room": "v", "id": id(), "target": doomed, "emoji": "👍", "on": true}),
    ] {
        let refused = bob.request(frame.clone()).await;
        assert_eq!(refused["code"], "not_found", "{frame}: {refused}");
    }
    // Pages: `before` and `limit`.
    let page = bob
        .request(json!({"type": "history", "room": "v", "before": root + 1, "limit": 1}))
        .await;
    assert_eq!(page["events"].as_array().unwrap().len(), 1);
    assert_eq!(
        (&page["events"][0]["seq"], &page["more"]),
        (&json!(root), &json!(true))
    );

    // The thread view.
    let (status, thread) = api(
        &chatd,
        &t("alice"),
        "GET",
        &format!("/v1/rooms/v/threads/{root}"),
        None,
    );
    assert_eq!(status, 200, "{thread}");
    assert_eq!(thread["root"]["text"], "root");
    let replies: Vec<&Value> = thread["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| &e["text"])
        .collect();
    assert_eq!(replies, [&json!("reply 2"), &json!("reply 1")]);
    assert_eq!(
        api(&chatd, &t("alice"), "GET", "/v1/rooms/v/threads/999", None).0,
        404
    );
}

#[tokio::test]
async fn history_right_after_an_ack_includes_it_and_read_cursors_only_move_forward() {
    let data = tempfile::tempdir().unwrap();
    let chatd = start(&standalone_env(data.path()));
    let t = |user: &str| dev_token(data.path(), user, 3600);
    api(
        &chatd,
        &t("alice"),
        "POST",
        "/v1/rooms",
        Some(json!({"room": "ryw", "kind": "group", "members": ["bob"]})),
    );
    let mut alice = Client::connect(&chatd.ws_url(), &t("alice")).await;
    let mut bob = Client::connect(&chatd.ws_url(), &t("bob")).await;
    bob.subscribe("ryw", None).await;
    for i in 0..20 {
        let ack = alice.say("ryw", &format!("m{i}")).await;
        let seq = ack["seq"].clone();
        let page = alice
            .request(json!({"type": "history", "room": "ryw", "limit": 1}))
            .await;
        assert_eq!(page["events"][0]["seq"], seq, "read-your-writes: {page}");
    }
    // bob reads to 10, then asks to go back to 5: ignored.
    bob.send(json!({"type": "read", "room": "ryw", "seq": 10}))
        .await;
    let read = bob
        .wait_for(|f| f["type"] == "event" && f["kind"] == "read")
        .await;
    assert_eq!((&read["user"], &read["up_to"]), (&json!("bob"), &json!(10)));
    bob.send(json!({"type": "read", "room": "ryw", "seq": 5}))
        .await;
    bob.send(json!({"type": "read", "room": "ryw", "seq": 12}))
        .await;
    // The second forward read is coalesced and appended within about a second.
    let read = bob
        .wait_for(|f| f["type"] == "event" && f["kind"] == "read")
        .await;
    assert_eq!(read["up_to"], 12, "{read}");
    let above = bob
        .request(json!({"type": "read", "room": "ryw", "seq": 999}))
        .await;
    assert_eq!(above["code"], "bad_request", "{above}");

    // alice's own message moves her cursor to it: a read below it, sent right after the ack
    // (before the store has the message, as a rule), is ignored too; bob would otherwise see
    // her cursor go back. Her first read event is the one past it.
    let own = alice.say("ryw", "mine").await["seq"].as_u64().unwrap();
    alice
        .send(json!({"type": "read", "room": "ryw", "seq": own - 1}))
        .await;
    let after = bob.say("ryw", "after").await["seq"].as_u64().unwrap();
    alice
        .send(json!({"type": "read", "room": "ryw", "seq": after}))
        .await;
    let read = bob
        .wait_for(|f| f["type"] == "event" && f["kind"] == "read" && f["user"] == "alice")
        .await;
    assert_eq!(read["up_to"], after, "{read}");
}

#[tokio::test]
async fn read_events_are_one_per_user_per_second_across_sessions_and_never_go_back() {
    let data = tempfile::tempdir().unwrap();
    let chatd = start(&standalone_env(data.path()));
    let t = |user: &str| dev_token(data.path(), user, 3600);
    api(
        &chatd,
        &t("alice"),
        "POST",
        "/v1/rooms",
        Some(json!({"room": "receipts", "kind": "group", "members": ["bob"]})),
    );
    let mut alice = Client::connect(&chatd.ws_url(), &t("alice")).await;
    alice.subscribe("receipts", None).await;
    for i in 0..20 {
        alice.say("receipts", &format!("m{i}")).await;
    }
    // bob's two sessions race each other, each a step behind the other in turn.
    let mut phone = Client::connect(&chatd.ws_url(), &t("bob")).await;
    let mut laptop = Client::connect(&chatd.ws_url(), &t("bob")).await;
    for (high, low) in [(12, 11), (15, 13), (18, 17), (21, 19)] {
        let (a, b) = if high % 2 == 0 {
            (&mut phone, &mut laptop)
        } else {
            (&mut laptop, &mut phone)
        };
        tokio::join!(
            a.send(json!({"type": "read", "room": "receipts", "seq": high})),
            b.send(json!({"type": "read", "room": "receipts", "seq": low})),
        );
    }
    // Every read event bob's frames made, as alice sees them, until the last cursor lands.
    let mut reads: Vec<(u64, u64)> = Vec::new();
    while reads.last().map(|r| r.0) != Some(21) {
        let read = alice
            .wait_for(|f| f["type"] == "event" && f["kind"] == "read" && f["user"] == "bob")
            .await;
        reads.push((
            read["up_to"].as_u64().unwrap(),
            read["ts"].as_u64().unwrap(),
        ));
    }
    assert!(
        reads.windows(2).all(|w| w[0].0 < w[1].0),
        "cursors only move forward in the log: {reads:?}"
    );
    // At most one per second (the gate opens a second after an append starts; the event's
    // time is taken a moment into it, hence the slack).
    assert!(
        reads.windows(2).all(|w| w[1].1 >= w[0].1 + 950),
        "one read event per user per room per second: {reads:?}"
    );
    assert!(reads.len() <= 3, "coalesced: {reads:?}");
    // The stored cursor follows once the projector has the event.
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let rooms = api(&chatd, &t("bob"), "GET", "/v1/rooms", None).1;
        if rooms["rooms"][0]["last_read"] == 21 {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "{rooms}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // A stranger learns nothing of the room: not its head, and the error answers the frame.
    let mut carol = Client::connect(&chatd.ws_url(), &t("carol")).await;
    let refused = carol
        .request(json!({"type": "read", "rid": "r1", "room": "receipts", "seq": 9999}))
        .await;
    assert_eq!(
        (&refused["code"], &refused["rid"]),
        (&json!("forbidden"), &json!("r1")),
        "{refused}"
    );
    assert!(!refused["message"].as_str().unwrap().contains("head"));
}

#[tokio::test]
async fn bodies_that_are_not_objects_paths_that_are_not_utf8_and_huge_limits() {
    let data = tempfile::tempdir().unwrap();
    let chatd = start(&standalone_env(data.path()));
    let t = dev_token(data.path(), "alice", 3600);
    let body = json!({"room": "shape", "kind": "group", "members": ["bob"]});
    assert_eq!(api(&chatd, &t, "POST", "/v1/rooms", Some(body)).0, 201);

    // serde reads a struct from an array of its fields too; the contract's bodies are objects.
    for (path, body) in [
        ("/v1/rooms", json!(["arr", "group"])),
        ("/v1/rooms/shape/members", json!(["carol"])),
        ("/v1/rooms/shape", json!([true])),
    ] {
        let method = if path == "/v1/rooms/shape" {
            "PATCH"
        } else {
            "POST"
        };
        let (status, answer) = api(&chatd, &t, method, path, Some(body));
        assert_eq!(
            (status, &answer["error"]["code"]),
            (400, &json!("bad_request")),
            "{method} {path}: {answer}"
        );
    }
    let (status, _) = api(&chatd, &t, "GET", "/v1/rooms/arr/messages", None);
    assert_eq!(status, 404, "no room was created");
    // A key given twice is refused, not read as its last value.
    let auth = format!("Bearer {t}");
    for (method, path, body) in [
        (
            "PATCH",
            "/v1/rooms/shape",
            r#"{"read_only":true,"read_only":false}"#,
        ),
        (
            "POST",
            "/v1/rooms/shape/members",
            r#"{"user":"dave","user":"carol"}"#,
        ),
    ] {
        let (status, answer) = chat_harness::http_request(
            chatd.http_addr(),
            method,
            path,
            &[("Authorization", auth.as_str())],
            Some(body),
        )
        .unwrap();
        assert_eq!(status, 400, "{method} {path} {body}: {answer}");
        assert!(answer.contains("duplicate field"), "{answer}");
    }
    for name in ["", "   "] {
        let body = json!({"room": "blank", "kind": "group", "name": name});
        let (status, answer) = api(&chatd, &t, "POST", "/v1/rooms", Some(body));
        assert_eq!(status, 400, "name {name:?}: {answer}");
    }

    // A path segment that is not UTF-8: the JSON error, like every other refusal.
    for path in [
        "/v1/rooms/%FF/messages",
        "/v1/rooms/shape/threads/%FF",
        "/v1/blocks/%FF",
    ] {
        let method = if path.starts_with("/v1/blocks") {
            "PUT"
        } else {
            "GET"
        };
        let (status, answer) = api(&chatd, &t, method, path, None);
        assert_eq!(
            (status, &answer["error"]["code"]),
            (400, &json!("bad_request")),
            "{method} {path}: {answer}"
        );
    }

    // A limit too large for any number is clamped like any other above 200; a sign is no digit.
    let (status, page) = api(
        &chatd,
        &t,
        "GET",
        "/v1/rooms/shape/messages?limit=99999999999999999999999",
        None,
    );
    assert_eq!(status, 200, "{page}");
    assert_eq!(page["events"].as_array().unwrap().len(), 1, "{page}");
    let (status, _) = api(
        &chatd,
        &t,
        "GET",
        "/v1/rooms/shape/messages?limit=%2B3",
        None,
    );
    assert_eq!(status, 400);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_user_who_left_a_direct_room_comes_back_when_either_opens_it_again() {
    let data = tempfile::tempdir().unwrap();
    let chatd = start(&standalone_env(data.path()));
    let t = |user: &str| dev_token(data.path(), user, 3600);
    let call = |user: &str, method: &str, path: &str, body: Option<Value>| {
        api(&chatd, &t(user), method, path, body)
    };
    let open = |user: &str, other: &str| {
        call(
            user,
            "POST",
            "/v1/rooms",
            Some(json!({"kind": "direct", "members": [other]})),
        )
    };
    let (status, first) = open("alice", "bob");
    assert_eq!(status, 201, "{first}");
    let dm = first["room"].as_str().unwrap().to_owned();
    let history = |user: &str| call(user, "GET", &format!("/v1/rooms/{dm}/messages"), None);
    let leave = |user: &str| {
        call(
            user,
            "DELETE",
            &format!("/v1/rooms/{dm}/members/{user}"),
            None,
        )
        .0
    };

    // Whoever opened it first has no power over the other.
    let (status, body) = call(
        "alice",
        "DELETE",
        &format!("/v1/rooms/{dm}/members/bob"),
        None,
    );
    assert_eq!(status, 403, "{body}");
    assert_eq!(
        call(
            "bob",
            "DELETE",
            &format!("/v1/rooms/{dm}/members/bob"),
            None
        ),
        (200, json!({"seq": 2}))
    );
    assert_eq!(history("bob").0, 403, "gone while away");

    // Alice opening it again brings bob back; the room is the same.
    assert_eq!(open("alice", "bob"), (200, json!({"room": dm, "seq": 1})));
    let (status, page) = history("bob");
    assert_eq!(status, 200, "{page}");
    assert_eq!(page["events"][0]["kind"], "member_joined", "{page}");
    assert_eq!(page["events"][0]["member"], "bob", "{page}");
    assert_eq!(page["events"][0]["user"], "alice", "{page}");

    // Bob leaves again and comes back by himself, by opening it or by adding himself.
    assert_eq!(leave("bob"), 200);
    assert_eq!(open("bob", "alice"), (200, json!({"room": dm, "seq": 1})));
    assert_eq!(history("bob").0, 200);
    assert_eq!(leave("bob"), 200);
    let (status, body) = call(
        "bob",
        "POST",
        &format!("/v1/rooms/{dm}/members"),
        Some(json!({"user": "bob"})),
    );
    assert_eq!(status, 200, "{body}");
    // Opening it when both are in appends nothing.
    let head = history("alice").1["events"][0]["seq"].clone();
    assert_eq!(open("bob", "alice"), (200, json!({"room": dm, "seq": 1})));
    assert_eq!(history("alice").1["events"][0]["seq"], head);

    // Still no one else: not carol, not by alice, not by carol herself.
    for (actor, user) in [("alice", "carol"), ("carol", "carol")] {
        let (status, body) = call(
            actor,
            "POST",
            &format!("/v1/rooms/{dm}/members"),
            Some(json!({"user": user})),
        );
        assert_eq!(status, 400, "{actor} adds {user}: {body}");
    }
}
