//! Blocking and room roles end to end: the real binary, its own nats-server, real WebSocket and
//! HTTP clients on loopback. Block lists live in the user log, read-only is a `room_updated`
//! event; both are enforced and shown by whichever door a request comes in.

mod common;

use std::time::{Duration, Instant};

use common::server::Server;
use serde_json::{json, Value};
use uuid::Uuid;

impl Server {
    fn direct(&self, user: &str, other: &str) -> (u16, Value) {
        self.api(
            user,
            "POST",
            "/v1/rooms",
            Some(json!({"kind": "direct", "members": [other]})),
        )
    }

    fn block(&self, user: &str, whom: &str) -> (u16, Value) {
        self.api(user, "PUT", &format!("/v1/blocks/{whom}"), None)
    }

    fn unblock(&self, user: &str, whom: &str) -> (u16, Value) {
        self.api(user, "DELETE", &format!("/v1/blocks/{whom}"), None)
    }

    /// Polls `GET path` as `user` until `f` accepts the body.
    async fn until(&self, user: &str, path: &str, f: impl Fn(&Value) -> bool) -> Value {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let (status, body) = self.api(user, "GET", path, None);
            if status == 200 && f(&body) {
                return body;
            }
            assert!(
                Instant::now() < deadline,
                "{path} as {user}: {status} {body}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// `user`'s entry for `room` in `GET /v1/rooms`, once `f` accepts it.
    async fn room_entry(&self, user: &str, room: &str, f: impl Fn(&Value) -> bool) -> Value {
        let list = self
            .until(user, "/v1/rooms", |b| {
                b["rooms"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .any(|r| r["room"] == room && f(r))
            })
            .await;
        list["rooms"]
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["room"] == room)
            .unwrap()
            .clone()
    }
}

fn id() -> String {
    Uuid::new_v4().to_string()
}

/// The event with `seq` in a history body (`events`).
fn at(body: &Value, seq: u64) -> Value {
    body["events"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["seq"] == seq)
        .unwrap_or_else(|| panic!("no event {seq} in {body}"))
        .clone()
}

fn seq_of(ack: &Value) -> u64 {
    ack["seq"]
        .as_u64()
        .unwrap_or_else(|| panic!("not an ack: {ack}"))
}

/// The hidden form: these keys and nothing else (an edit also keeps `target`).
fn assert_hidden(event: &Value) {
    assert_eq!(event["hidden"], true, "{event}");
    for gone in [
        "text",
        "thread",
        "reply_to",
        "edited",
        "reactions",
        "replies",
    ] {
        assert!(event.get(gone).is_none(), "{gone} shown in {event}");
    }
}

#[tokio::test]
async fn a_blocked_user_cannot_open_or_write_the_direct_room() {
    let s = Server::start();
    let (status, dm) = s.direct("alice", "bob");
    assert_eq!(status, 201, "{dm}");
    let dm = dm["room"].as_str().unwrap().to_owned();
    let mut bob = s.client("bob").await;
    let earlier = seq_of(&bob.say(&dm, "hi alice").await);

    // alice blocks bob; blocking again is fine and changes nothing.
    let (status, first) = s.block("alice", "bob");
    assert_eq!(status, 200, "{first}");
    assert!(first["seq"].as_u64().unwrap() > 0, "{first}");
    assert_eq!(s.block("alice", "bob"), (200, first.clone()));
    assert_eq!(
        s.api("alice", "GET", "/v1/blocks", None),
        (200, json!({"blocked": ["bob"]}))
    );
    assert_eq!(
        s.api("bob", "GET", "/v1/blocks", None),
        (200, json!({"blocked": []}))
    );
    // Bad input.
    let (status, body) = s.block("alice", "alice");
    assert_eq!(
        (status, &body["error"]["code"]),
        (400, &json!("bad_request")),
        "{body}"
    );
    let (status, body) = s.block("alice", "not*valid");
    assert_eq!(
        (status, &body["error"]["code"]),
        (400, &json!("bad_request"))
    );
    let (status, _) =
        chat_harness::http_request(s.chatd.http_addr(), "PUT", "/v1/blocks/bob", &[], None)
            .unwrap();
    assert_eq!(status, 401, "no token");

    // bob can neither open the room nor write to it.
    let (status, body) = s.direct("bob", "alice");
    assert_eq!(
        (status, &body["error"]["code"]),
        (403, &json!("forbidden")),
        "{body}"
    );
    let code = |f: &Value| (f["type"].clone(), f["code"].clone(), f["room"].clone());
    let forbidden = (json!("error"), json!("forbidden"), json!(dm.clone()));
    assert_eq!(code(&bob.say(&dm, "please").await), forbidden);
    let edit = bob
        .request(json!({"type": "edit", "room": dm, "id": id(), "target": earlier, "text": "x"}))
        .await;
    assert_eq!(code(&edit), forbidden);
    let react = bob
        .request(json!({"type": "react", "room": dm, "id": id(), "target": earlier, "emoji": "👍", "on": true}))
        .await;
    assert_eq!(code(&react), forbidden);
    // Neither can alice write while she blocks him (she unblocks first).
    let mut alice = s.client("alice").await;
    let hers = alice.say(&dm, "one last word").await;
    assert_eq!(code(&hers), forbidden);
    assert!(
        hers["message"].as_str().unwrap().contains("unblock"),
        "{hers}"
    );
    // Both may still read the room, and retract their own words.
    assert_eq!(
        s.api("bob", "GET", &format!("/v1/rooms/{dm}/messages"), None)
            .0,
        200
    );
    let retract = bob
        .request(json!({"type": "delete", "room": dm, "id": id(), "target": earlier}))
        .await;
    assert_eq!(retract["type"], "ack", "{retract}");
    // Someone alice does not block reaches her as before.
    assert_eq!(s.direct("carol", "alice").0, 201);

    // Unblocked: the room opens again for both.
    let (status, _) = s.unblock("alice", "bob");
    assert_eq!(status, 200);
    assert_eq!(
        s.api("alice", "GET", "/v1/blocks", None),
        (200, json!({"blocked": []}))
    );
    assert_eq!(s.unblock("alice", "bob").0, 200, "unblocking twice is fine");
    assert_eq!(bob.say(&dm, "friends again?").await["type"], "ack");
    assert_eq!(alice.say(&dm, "yes").await["type"], "ack");
    assert_eq!(s.direct("bob", "alice").0, 200);
}

/// A block holds between a direct room's pair while one of them has left it: the one who stayed
/// can neither write to the blocker's room nor bring the blocker back into it.
#[tokio::test]
async fn a_block_holds_after_the_blocker_has_left_the_direct_room() {
    let s = Server::start();
    let (status, dm) = s.direct("alice", "bob");
    assert_eq!(status, 201, "{dm}");
    let dm = dm["room"].as_str().unwrap().to_owned();
    let (status, body) = s.api(
        "bob",
        "DELETE",
        &format!("/v1/rooms/{dm}/members/bob"),
        None,
    );
    assert_eq!(status, 200, "{body}");
    assert_eq!(s.block("bob", "alice").0, 200);

    let mut alice = s.client("alice").await;
    let refused = alice.say(&dm, "are you there?").await;
    assert_eq!(
        (&refused["type"], &refused["code"]),
        (&json!("error"), &json!("forbidden")),
        "{refused}"
    );
    let (status, body) = s.api(
        "alice",
        "POST",
        &format!("/v1/rooms/{dm}/members"),
        Some(json!({"user": "bob"})),
    );
    assert_eq!(
        (status, &body["error"]["code"]),
        (403, &json!("forbidden")),
        "{body}"
    );
    let (_, rooms) = s.api("bob", "GET", "/v1/rooms", None);
    assert!(
        !rooms["rooms"]
            .as_array()
            .unwrap()
            .iter()
            .any(|r| r["room"] == dm),
        "{rooms}"
    );
    // Nor may the blocker come back while he blocks her; unblocked, either may.
    let (status, body) = s.api(
        "bob",
        "POST",
        &format!("/v1/rooms/{dm}/members"),
        Some(json!({"user": "bob"})),
    );
    assert_eq!(status, 403, "{body}");
    assert_eq!(s.unblock("bob", "alice").0, 200);
    let (status, body) = s.api(
        "alice",
        "POST",
        &format!("/v1/rooms/{dm}/members"),
        Some(json!({"user": "bob"})),
    );
    assert_eq!(status, 200, "{body}");
    assert_eq!(alice.say(&dm, "welcome back").await["type"], "ack");
}

#[tokio::test]
async fn the_blocker_sees_hidden_placeholders_in_history_and_does_not_count_them_unread() {
    let s = Server::start();
    s.group("carol", "team", &["alice", "bob"]);
    assert_eq!(s.block("alice", "bob").0, 200);
    let mut bob = s.client("bob").await;
    let mut carol = s.client("carol").await;
    let mut alice = s.client("alice").await;

    let secret = seq_of(&bob.say("team", "secret").await);
    // Read-your-writes: right after the ack the event may not be projected yet; it is hidden
    // on that path (straight from the log) too.
    let page = alice
        .request(json!({"type": "history", "room": "team", "limit": 1}))
        .await;
    assert_eq!(page["events"][0]["seq"], secret, "{page}");
    assert_hidden(&page["events"][0]);

    let edit = seq_of(
        &bob.request(
            json!({"type": "edit", "room": "team", "id": id(), "target": secret, "text": "secret!"}),
        )
        .await,
    );
    let public = seq_of(&carol.say("team", "public").await);
    let reply = seq_of(
        &bob.request(
            json!({"type": "send", "room": "team", "id": id(), "text": "in a thread", "thread": public}),
        )
        .await,
    );

    // HTTP history, as the blocker and as anyone else.
    let path = "/v1/rooms/team/messages?limit=50";
    let mine = s
        .until("alice", path, |b| b["events"][0]["seq"] == reply)
        .await;
    let hidden = at(&mine, secret);
    assert_hidden(&hidden);
    assert_eq!(
        (&hidden["kind"], &hidden["user"], &hidden["id"].is_string()),
        (&json!("message"), &json!("bob"), &true)
    );
    let hidden_edit = at(&mine, edit);
    assert_hidden(&hidden_edit);
    assert_eq!(
        (&hidden_edit["kind"], &hidden_edit["target"]),
        (&json!("edit"), &json!(secret))
    );
    assert_hidden(&at(&mine, reply));
    assert_eq!(at(&mine, public)["text"], "public");
    let theirs = s
        .until("carol", path, |b| b["events"][0]["seq"] == reply)
        .await;
    assert_eq!(
        (&at(&theirs, secret)["text"], &at(&theirs, secret)["edited"]),
        (&json!("secret!"), &json!(true))
    );
    assert!(at(&theirs, secret).get("hidden").is_none());

    // The same over WebSocket, and in the thread view.
    let ws = alice
        .request(json!({"type": "history", "room": "team", "limit": 50}))
        .await;
    assert_eq!(ws["events"], mine["events"]);
    let (status, thread) = s.api(
        "alice",
        "GET",
        &format!("/v1/rooms/team/threads/{public}"),
        None,
    );
    assert_eq!(status, 200, "{thread}");
    assert_eq!(thread["root"]["text"], "public");
    assert_hidden(&thread["events"][0]);
    let (_, thread) = s.api(
        "carol",
        "GET",
        &format!("/v1/rooms/team/threads/{public}"),
        None,
    );
    assert_eq!(thread["events"][0]["text"], "in a thread");

    // Unread: alice counts carol's message only; carol (whose own message moved her cursor)
    // counts bob's reply.
    let entry = s.room_entry("alice", "team", |r| r["head"] == reply).await;
    assert_eq!(
        (&entry["last_read"], &entry["unread"]),
        (&json!(1), &json!(1)),
        "{entry}"
    );
    let entry = s.room_entry("carol", "team", |r| r["head"] == reply).await;
    assert_eq!(
        (&entry["last_read"], &entry["unread"]),
        (&json!(public), &json!(1)),
        "{entry}"
    );
    let again = s.client("alice").await;
    assert_eq!(
        again.welcome_room("team").unwrap()["unread"],
        1,
        "{}",
        again.welcome
    );

    // Unblocked: the words come back, and count.
    assert_eq!(s.unblock("alice", "bob").0, 200);
    let (_, mine) = s.api("alice", "GET", path, None);
    assert_eq!(at(&mine, secret)["text"], "secret!");
    assert!(at(&mine, secret).get("hidden").is_none());
    let entry = s.room_entry("alice", "team", |_| true).await;
    assert_eq!(entry["unread"], 3, "{entry}");
}

#[tokio::test]
async fn the_blocker_receives_hidden_placeholders_live() {
    let s = Server::start();
    s.group("carol", "live", &["alice", "bob"]);
    assert_eq!(s.block("alice", "bob").0, 200);
    let mut alice = s.client("alice").await;
    let mut carol = s.client("carol").await;
    let mut bob = s.client("bob").await;
    alice.subscribe("live", None).await;
    carol.subscribe("live", None).await;

    let secret = seq_of(&bob.say("live", "secret").await);
    let edit = seq_of(
        &bob.request(
            json!({"type": "edit", "room": "live", "id": id(), "target": secret, "text": "secret!"}),
        )
        .await,
    );
    let public = seq_of(&carol.say("live", "public").await);

    let seen = carol.events("live", 3).await;
    assert_eq!(seen[0]["text"], "secret", "others see the text");
    let seen = alice.events("live", 3).await;
    assert_eq!(
        seen.iter()
            .map(|e| e["seq"].as_u64().unwrap())
            .collect::<Vec<_>>(),
        vec![secret, edit, public],
        "gap-free"
    );
    assert_eq!(
        seen[0],
        json!({"type": "event", "room": "live", "seq": secret, "ts": seen[0]["ts"],
               "user": "bob", "kind": "message", "id": seen[0]["id"], "hidden": true}),
        "the blocker gets the placeholder"
    );
    assert_hidden(&seen[1]);
    assert_eq!(seen[1]["target"], secret);
    assert_eq!(seen[2]["text"], "public");

    // Unblocked: the next message arrives with its text.
    assert_eq!(s.unblock("alice", "bob").0, 200);
    bob.say("live", "hello again").await;
    let next = alice.events("live", 1).await;
    assert_eq!(next[0]["text"], "hello again", "{}", next[0]);
}

#[tokio::test]
async fn a_read_only_room_takes_posts_from_its_admin_only() {
    let s = Server::start();
    s.group("alice", "news", &["bob"]);
    let mut bob = s.client("bob").await;
    let early = seq_of(&bob.say("news", "early").await);
    bob.subscribe("news", None).await;

    // Only the admin changes it; bad bodies and direct rooms are refused.
    let patch = |user: &str, room: &str, body: Value| {
        s.api(user, "PATCH", &format!("/v1/rooms/{room}"), Some(body))
    };
    let (status, body) = patch("bob", "news", json!({"read_only": true}));
    assert_eq!(
        (status, &body["error"]["code"]),
        (403, &json!("forbidden")),
        "{body}"
    );
    for bad in [
        json!({"read_only": "yes"}),
        json!({}),
        json!({"read_only": true, "name": "x"}),
        json!([true]),
    ] {
        let (status, body) = patch("alice", "news", bad.clone());
        assert_eq!(
            (status, &body["error"]["code"]),
            (400, &json!("bad_request")),
            "{bad}: {body}"
        );
    }
    let (status, dm) = s.direct("alice", "bob");
    assert_eq!(status, 201);
    let dm = dm["room"].as_str().unwrap().to_owned();
    assert_eq!(patch("alice", &dm, json!({"read_only": true})).0, 400);
    assert_eq!(patch("alice", "nowhere", json!({"read_only": true})).0, 404);
    assert_eq!(
        patch("alice", "bad*room", json!({"read_only": true})).0,
        400
    );

    let (status, body) = patch("alice", "news", json!({"read_only": true}));
    assert_eq!(status, 200, "{body}");
    let updated = seq_of(&body);
    let event = bob
        .wait_for(|f| f["type"] == "event" && f["kind"] == "room_updated")
        .await;
    assert_eq!(
        (&event["seq"], &event["user"], &event["read_only"]),
        (&json!(updated), &json!("alice"), &json!(true))
    );

    // bob may not post; he may still retract his own message and read.
    let refused = bob.say("news", "can I?").await;
    assert_eq!(refused["code"], "forbidden", "{refused}");
    assert!(
        refused["message"].as_str().unwrap().contains("read-only"),
        "{refused}"
    );
    let react = bob
        .request(json!({"type": "react", "room": "news", "id": id(), "target": early, "emoji": "👍", "on": true}))
        .await;
    assert_eq!(react["code"], "forbidden");
    let edit = bob
        .request(json!({"type": "edit", "room": "news", "id": id(), "target": early, "text": "x"}))
        .await;
    assert_eq!(edit["code"], "forbidden");
    let retract = bob
        .request(json!({"type": "delete", "room": "news", "id": id(), "target": early}))
        .await;
    assert_eq!(retract["type"], "ack", "{retract}");
    // The admin posts, and everyone sees it.
    let mut alice = s.client("alice").await;
    let announcement = seq_of(&alice.say("news", "announcement").await);
    let seen = bob
        .wait_for(|f| f["type"] == "event" && f["seq"] == announcement)
        .await;
    assert_eq!(seen["text"], "announcement");

    let entry = s
        .room_entry("bob", "news", |r| r["read_only"] == true)
        .await;
    assert_eq!(entry["kind"], "group");
    let direct = s.room_entry("bob", &dm, |_| true).await;
    assert_eq!(direct["read_only"], false);
    let history = s
        .until("bob", "/v1/rooms/news/messages", |b| {
            b["events"][0]["seq"] == announcement
        })
        .await;
    assert_eq!(at(&history, updated)["kind"], "room_updated");
    assert_eq!(at(&history, updated)["read_only"], true);

    // Lifted again: bob posts.
    assert_eq!(patch("alice", "news", json!({"read_only": false})).0, 200);
    assert_eq!(bob.say("news", "finally").await["type"], "ack");
}

#[tokio::test]
async fn the_admin_removes_members_and_deletes_their_messages() {
    let s = Server::start();
    s.group("alice", "mod", &["bob", "carol"]);
    let mut bob = s.client("bob").await;
    let mut carol = s.client("carol").await;
    let spam = seq_of(&bob.say("mod", "spam").await);

    let refused = carol
        .request(json!({"type": "delete", "room": "mod", "id": id(), "target": spam}))
        .await;
    assert_eq!(refused["code"], "forbidden", "a member is not the admin");
    let mut alice = s.client("alice").await;
    let deleted = alice
        .request(json!({"type": "delete", "room": "mod", "id": id(), "target": spam}))
        .await;
    assert_eq!(deleted["type"], "ack", "{deleted}");
    let history = s
        .until("carol", "/v1/rooms/mod/messages", |b| {
            b["events"][0]["seq"] == deleted["seq"]
        })
        .await;
    assert_eq!(at(&history, spam)["deleted"], true);
    assert!(at(&history, spam).get("text").is_none());

    assert_eq!(
        s.api("carol", "DELETE", "/v1/rooms/mod/members/bob", None)
            .0,
        403
    );
    assert_eq!(
        s.api("bob", "DELETE", "/v1/rooms/mod/members/alice", None)
            .0,
        403
    );
    let (status, removed) = s.api("alice", "DELETE", "/v1/rooms/mod/members/bob", None);
    assert_eq!(status, 200, "{removed}");
    assert_eq!(bob.say("mod", "still here?").await["code"], "forbidden");
    assert_eq!(
        s.api("alice", "DELETE", "/v1/rooms/mod/members/not*valid", None)
            .0,
        400
    );
}
