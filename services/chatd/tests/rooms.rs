//! Rooms, messages and resume end to end: the real binary, its own nats-server, real WebSocket
//! and HTTP clients on loopback.

mod common;

use common::client::seqs;
use common::server::Server;
use serde_json::{json, Value};
use uuid::Uuid;

#[tokio::test]
async fn a_message_from_a_appears_in_bs_stream_and_both_see_one_order() {
    let s = Server::start();
    s.group("alice", "general", &["bob"]);
    let mut alice = s.client("alice").await;
    let mut bob = s.client("bob").await;
    assert_eq!(alice.subscribe("general", None).await["head"], 1);
    assert_eq!(bob.subscribe("general", None).await["head"], 1);

    // Both send at once; the server assigns one order.
    let (a_acks, b_acks) = tokio::join!(
        async {
            let mut acks = Vec::new();
            for i in 0..15 {
                acks.push(alice.say("general", &format!("a{i}")).await);
            }
            (alice, acks)
        },
        async {
            let mut acks = Vec::new();
            for i in 0..15 {
                acks.push(bob.say("general", &format!("b{i}")).await);
            }
            (bob, acks)
        }
    );
    let ((mut alice, a_acks), (mut bob, b_acks)) = (a_acks, b_acks);
    for ack in a_acks.iter().chain(&b_acks) {
        assert_eq!(ack["type"], "ack", "{ack}");
        assert_eq!(ack["duplicate"], false);
    }
    let a_seen = alice.events("general", 30).await;
    let b_seen = bob.events("general", 30).await;
    assert_eq!(
        seqs(&a_seen),
        (2..=31).collect::<Vec<_>>(),
        "gap-free, in order"
    );
    assert_eq!(a_seen, b_seen, "the same events in the same order for both");
    let first_bob = a_seen.iter().find(|e| e["user"] == "bob").unwrap();
    assert_eq!(first_bob["text"], "b0");
    assert_eq!(first_bob["kind"], "message");
    // Every ack names the sequence its event has in the stream.
    for ack in a_acks.iter().chain(&b_acks) {
        let event = &a_seen[(ack["seq"].as_u64().unwrap() - 2) as usize];
        assert_eq!(event["id"], ack["id"]);
        assert_eq!(event["ts"], ack["ts"]);
    }
}

#[tokio::test]
async fn a_resent_id_returns_the_original_outcome_and_creates_nothing() {
    let s = Server::start();
    s.group("alice", "dup", &["bob"]);
    let mut alice = s.client("alice").await;
    let id = Uuid::new_v4();
    let first = alice.say_with_id("dup", "once", id).await;
    assert_eq!(first["duplicate"], false, "{first}");
    // Same connection, different text: still the original.
    let again = alice.say_with_id("dup", "twice?", id).await;
    assert_eq!(
        (&again["seq"], &again["ts"], &again["duplicate"]),
        (&first["seq"], &first["ts"], &json!(true))
    );
    alice.close().await;
    // After reconnecting.
    let mut alice = s.client("alice").await;
    let after = alice.say_with_id("dup", "once", id).await;
    assert_eq!(
        (&after["seq"], &after["ts"], &after["duplicate"]),
        (&first["seq"], &first["ts"], &json!(true))
    );
    let (_, history) = s.api("alice", "GET", "/v1/rooms/dup/messages", None);
    let texts: Vec<&Value> = history["events"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["kind"] == "message")
        .map(|e| &e["text"])
        .collect();
    assert_eq!(texts, [&json!("once")]);
}

#[tokio::test]
async fn a_resend_the_rules_would_refuse_still_returns_the_original_outcome() {
    let s = Server::start();
    s.group("alice", "again", &["bob"]);
    let mut alice = s.client("alice").await;
    // Each resend follows its original at once, before the store may hold it.
    let resends = [
        json!({"text": ""}),
        json!({"text": "bell\u{7}"}),
        json!({"text": "x".repeat(4_001)}),
        json!({"text": "in a thread", "thread": 9_999}),
        json!({"text": "a reply", "reply_to": 9_999}),
    ];
    for changed in resends {
        let id = Uuid::new_v4().to_string();
        let first = alice
            .request(json!({"type": "send", "room": "again", "id": id, "text": "fine"}))
            .await;
        assert_eq!(first["duplicate"], false, "{first}");
        let mut frame = json!({"type": "send", "room": "again", "id": id});
        frame
            .as_object_mut()
            .unwrap()
            .extend(changed.as_object().unwrap().clone());
        let again = alice.request(frame.clone()).await;
        assert_eq!(
            (
                &again["type"],
                &again["seq"],
                &again["ts"],
                &again["duplicate"]
            ),
            (&json!("ack"), &first["seq"], &first["ts"], &json!(true)),
            "{frame}"
        );
    }
    // A new id with the same refused content is still refused.
    let refused = alice.say("again", "").await;
    assert_eq!(refused["code"], "bad_request", "{refused}");
}

#[tokio::test]
async fn a_reconnecting_client_receives_exactly_what_it_missed_while_others_keep_sending() {
    let s = Server::start();
    s.group("alice", "resume", &["bob"]);
    let mut alice = s.client("alice").await;
    let mut bob = s.client("bob").await;
    bob.subscribe("resume", Some(0)).await;
    for i in 0..5 {
        alice.say("resume", &format!("before {i}")).await;
    }
    let seen = bob.events("resume", 6).await; // room_created + 5
    let last_seen = *seqs(&seen).last().unwrap();
    assert_eq!(last_seen, 6);
    bob.close().await;

    for i in 0..10 {
        alice.say("resume", &format!("missed {i}")).await;
    }
    // Alice keeps sending while bob resubscribes from what he has.
    let sender = tokio::spawn(async move {
        for i in 0..20 {
            alice.say("resume", &format!("during {i}")).await;
        }
        alice
    });
    let mut bob = s.client("bob").await;
    let subscribed = bob.subscribe("resume", Some(last_seen)).await;
    assert_eq!(subscribed["type"], "subscribed", "{subscribed}");
    let _alice = sender.await.unwrap();
    let rest = bob.events("resume", 30).await;
    assert_eq!(
        seqs(&rest),
        (7..=36).collect::<Vec<_>>(),
        "no gap, no duplicate at the seam"
    );
    assert_eq!(rest[0]["text"], "missed 0");
    assert_eq!(rest[29]["text"], "during 19");

    // A seq above the head is refused; null means nothing old.
    let above = bob.subscribe("resume", Some(1000)).await;
    assert_eq!(
        (&above["type"], &above["code"]),
        (&json!("error"), &json!("bad_request"))
    );
    assert_eq!(above["room"], "resume");
}

#[tokio::test]
async fn an_offline_users_unread_count_and_last_read_are_right_on_reconnect() {
    let s = Server::start();
    s.group("alice", "unread", &["bob"]);
    let mut alice = s.client("alice").await;
    let mut bob = s.client("bob").await;
    let m2 = alice.say("unread", "one").await["seq"].as_u64().unwrap();
    bob.send(json!({"type": "read", "room": "unread", "seq": m2}))
        .await;
    // Offline: three more, one of them deleted, and bob's own message does not count.
    bob.close().await;
    alice.say("unread", "two").await;
    let m4 = alice.say("unread", "three").await["seq"].as_u64().unwrap();
    alice.say("unread", "four").await;
    let del = alice
        .request(json!({"type": "delete", "room": "unread", "id": Uuid::new_v4().to_string(), "target": m4}))
        .await;
    assert_eq!(del["type"], "ack", "{del}");

    // Created, one, read, two, three, four, delete. (While the projector is still short of
    // `four`, two unread are also what `two` and `three` make: wait for the whole log.)
    let expected = |r: &Value| r["head"] == 7 && r["last_read"] == m2 && r["unread"] == 2;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let (_, rooms) = s.api("bob", "GET", "/v1/rooms", None);
        let room = rooms["rooms"][0].clone();
        if expected(&room) {
            assert_eq!(
                (&room["kind"], &room["name"]),
                (&json!("group"), &json!("unread"))
            );
            break;
        }
        assert!(std::time::Instant::now() < deadline, "room list: {rooms}");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    let bob = s.client("bob").await;
    let entry = bob
        .welcome_room("unread")
        .expect("the room is in the welcome");
    assert_eq!(
        entry,
        json!({"room": "unread", "head": 7, "last_read": m2, "unread": 2})
    );
}

#[tokio::test]
async fn non_members_and_bad_input_are_refused_with_the_contracts_codes() {
    let s = Server::start();
    s.group("alice", "private", &[]);
    let mut carol = s.client("carol").await;
    let code = |f: &Value| (f["type"].clone(), f["code"].clone(), f["room"].clone());
    let forbidden = (json!("error"), json!("forbidden"), json!("private"));
    assert_eq!(code(&carol.subscribe("private", None).await), forbidden);
    assert_eq!(code(&carol.say("private", "let me in").await), forbidden);
    let history = carol
        .request(json!({"type": "history", "room": "private"}))
        .await;
    assert_eq!(code(&history), forbidden);
    assert_eq!(
        s.api("carol", "GET", "/v1/rooms/private/messages", None).0,
        403
    );
    assert_eq!(
        code(&carol.say("nowhere", "hi").await),
        (json!("error"), json!("not_found"), json!("nowhere"))
    );
    let bad_room = carol.say("no spaces allowed", "hi").await;
    assert_eq!(bad_room["code"], "bad_request");
    let bad_id = carol
        .request(json!({"type": "send", "room": "private", "id": "not-a-uuid", "text": "x"}))
        .await;
    assert_eq!(bad_id["code"], "bad_request");
    let missing = carol
        .request(json!({"type": "send", "room": "private"}))
        .await;
    assert_eq!(missing["code"], "bad_request");
    // The connection stays open after all of that.
    assert_eq!(carol.request(json!({"type": "ping"})).await["type"], "pong");

    let mut alice = s.client("alice").await;
    let control = alice.say("private", "bell\u{7}").await;
    assert_eq!(control["code"], "bad_request", "{control}");
    let long = alice.say("private", &"x".repeat(4_001)).await;
    assert_eq!(long["code"], "too_large", "{long}");
}

#[tokio::test]
async fn a_removed_member_is_cut_off() {
    let s = Server::start();
    s.group("alice", "team", &["bob", "carol"]);
    let mut alice = s.client("alice").await;
    let mut bob = s.client("bob").await;
    bob.subscribe("team", None).await;
    alice.say("team", "hello bob").await;
    assert_eq!(bob.events("team", 1).await[0]["text"], "hello bob");

    // carol is not the admin: she cannot remove bob.
    assert_eq!(
        s.api("carol", "DELETE", "/v1/rooms/team/members/bob", None)
            .0,
        403
    );
    let (status, removed) = s.api("alice", "DELETE", "/v1/rooms/team/members/bob", None);
    assert_eq!(status, 200, "{removed}");
    let left = bob.events("team", 1).await;
    assert_eq!(
        (&left[0]["kind"], &left[0]["member"]),
        (&json!("member_left"), &json!("bob"))
    );
    let notice = bob.wait_for(|f| f["type"] == "unsubscribed").await;
    assert_eq!(notice["reason"], "removed");

    alice.say("team", "bob is gone").await;
    assert_eq!(bob.say("team", "still here?").await["code"], "forbidden");
    assert_eq!(bob.subscribe("team", None).await["code"], "forbidden");
    // Nothing of the room reached bob after his removal (a message sent to the room since
    // would be queued before this pong).
    bob.request(json!({"type": "ping"})).await;
    assert!(
        bob.buffered().iter().all(|f| f["type"] != "event"),
        "events after removal: {:?}",
        bob.buffered()
    );

    // Added again, bob resumes from the start: the replay passes his old removal and goes on
    // to the live events.
    let (status, added) = s.api(
        "alice",
        "POST",
        "/v1/rooms/team/members",
        Some(json!({"user": "bob"})),
    );
    assert_eq!(status, 200, "{added}");
    let mut bob = s.client("bob").await;
    let subscribed = bob.subscribe("team", Some(0)).await;
    assert_eq!(subscribed["type"], "subscribed", "{subscribed}");
    let head = subscribed["head"].as_u64().unwrap();
    let replayed = bob.events("team", head as usize).await;
    let seqs: Vec<u64> = replayed
        .iter()
        .map(|e| e["seq"].as_u64().unwrap())
        .collect();
    assert_eq!(seqs, (1..=head).collect::<Vec<_>>());
    let back = alice.say("team", "welcome back").await;
    let live = bob.events("team", 1).await;
    assert_eq!(
        (&live[0]["seq"], &live[0]["text"]),
        (&back["seq"], &json!("welcome back"))
    );
    assert!(
        bob.buffered().iter().all(|f| f["type"] != "unsubscribed"),
        "{:?}",
        bob.buffered()
    );
}

/// Every room is a stream, and a NATS server holds tens of thousands at most: a user who is a
/// member of `CHAT_MAX_ROOMS_PER_USER` rooms creates no more, and once the account holds
/// `CHAT_MAX_ROOMS` streams nobody does. Existing rooms stay reachable.
#[test]
fn room_creation_is_capped_per_user_and_in_total() {
    let nats = chat_harness::NatsServer::start();
    let data = tempfile::tempdir().unwrap();
    let chatd = common::node(
        &nats,
        data.path(),
        "all",
        &[("CHAT_MAX_ROOMS_PER_USER", "2"), ("CHAT_MAX_ROOMS", "4")],
    );
    let call = |user: &str, method: &str, path: &str, body: Option<Value>| {
        common::api(&chatd, &common::token(user), method, path, body)
    };
    let group = |user: &str, room: &str| {
        call(
            user,
            "POST",
            "/v1/rooms",
            Some(json!({"room": room, "kind": "group", "name": room})),
        )
    };
    let direct = |user: &str, with: &str| {
        call(
            user,
            "POST",
            "/v1/rooms",
            Some(json!({"kind": "direct", "members": [with]})),
        )
    };
    assert_eq!(group("alice", "a1").0, 201);
    assert_eq!(group("alice", "a2").0, 201);
    let (status, refused) = group("alice", "a3");
    assert_eq!(status, 403, "{refused}");
    assert_eq!(refused["error"]["code"], "forbidden");
    assert!(
        refused["error"]["message"]
            .as_str()
            .unwrap()
            .contains("CHAT_MAX_ROOMS_PER_USER"),
        "{refused}"
    );
    assert_eq!(direct("alice", "bob").0, 403, "alice is in 2 rooms");
    // Bob may open it; alice then reaches the same room (not a new one).
    let (status, dm) = direct("bob", "alice");
    assert_eq!(status, 201, "{dm}");
    let (status, again) = direct("alice", "bob");
    assert_eq!((status, &again["room"]), (200, &dm["room"]), "{again}");
    // A room that exists is answered as before (409), not refused by the cap.
    assert_eq!(group("alice", "a1").0, 409);

    // Carol (in no room) creates until the account is full: 3 streams so far (the rooms; the
    // user log's comes with the first block), 4 at most.
    let mut created = 0;
    let refused = loop {
        let (status, body) = group("carol", &format!("c{created}"));
        if status != 201 {
            break (status, body, format!("c{created}"));
        }
        created += 1;
        assert!(created <= 2, "carol created {created} rooms");
    };
    assert_eq!((created, refused.0), (1, 403), "{}", refused.1);
    let message = refused.1["error"]["message"].as_str().unwrap();
    assert!(message.contains("(CHAT_MAX_ROOMS)"), "{message}");
    let (status, _) = call(
        "carol",
        "GET",
        &format!("/v1/rooms/{}/messages", refused.2),
        None,
    );
    assert_eq!(status, 404, "the refused room was not created");
    // Existing rooms still take messages and members.
    let (status, joined) = call(
        "alice",
        "POST",
        "/v1/rooms/a1/members",
        Some(json!({"user": "carol"})),
    );
    assert_eq!(status, 200, "{joined}");
}

/// Bodies are JSON whatever their `Content-Type` says: the contract asks for none, and
/// `curl -d '{…}'` sends `application/x-www-form-urlencoded`.
#[test]
fn a_json_body_is_read_whatever_its_content_type() {
    let server = Server::start();
    let auth = format!("Bearer {}", server.token("alice"));
    let post = |content_type: &str, room: &str| {
        let body = json!({"room": room, "kind": "group"}).to_string();
        chat_harness::http_exchange(
            server.chatd.http_addr(),
            "POST",
            "/v1/rooms",
            &[
                ("Authorization", auth.as_str()),
                ("Content-Type", content_type),
            ],
            Some(&body),
        )
        .expect("an answer")
    };
    for (content_type, room) in [
        ("application/x-www-form-urlencoded", "curl"),
        ("text/plain", "plain"),
        ("application/json; charset=utf-8", "charset"),
    ] {
        let (status, _, answer) = post(content_type, room);
        assert_eq!(status, 201, "{content_type}: {answer}");
    }
    // What is not a JSON object is still refused, as the contract's error.
    let (status, _, answer) = chat_harness::http_exchange(
        server.chatd.http_addr(),
        "POST",
        "/v1/rooms",
        &[("Authorization", auth.as_str())],
        Some("room=general&kind=group"),
    )
    .expect("an answer");
    assert_eq!(status, 400, "{answer}");
    let answer: Value = serde_json::from_str(&answer).unwrap();
    assert_eq!(answer["error"]["code"], "bad_request", "{answer}");
}
