//! Several chatd processes on one nats-server: edges that talk to each other, and a projector
//! killed mid-stream.

mod common;

use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use chat_harness::{Chatd, NatsServer};
use chat_log::{LogConfig, RoomLog};
use chat_model::{Event, EventBody, RoomId, RoomKind, UserId};
use chat_store::{SqliteStore, Store};
use common::client::Client;
use common::*;
use serde_json::json;
use uuid::Uuid;

/// A chatd on `nats` with its own data dir and the shared secret.
fn node(nats: &NatsServer, data: &Path, role: &str) -> Chatd {
    common::node(nats, data, role, &[("CHAT_RECONCILE_EVERY", "500ms")])
}

#[tokio::test]
async fn users_on_different_edges_talk_and_a_resend_through_the_other_edge_is_a_duplicate() {
    let nats = NatsServer::start();
    let (d1, d2) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let edge1 = node(&nats, d1.path(), "all");
    let edge2 = node(&nats, d2.path(), "all");
    create_group(&edge1, "bridge");

    let mut alice = Client::connect(&edge1.ws_url(), &token("alice")).await;
    let mut bob = Client::connect(&edge2.ws_url(), &token("bob")).await;
    alice.subscribe("bridge", None).await;
    bob.subscribe("bridge", None).await;
    let id = Uuid::new_v4();
    let ack = alice.say_with_id("bridge", "across edges", id).await;
    assert_eq!(ack["duplicate"], false, "{ack}");
    let seen = bob.events("bridge", 1).await;
    assert_eq!(
        (&seen[0]["text"], &seen[0]["seq"]),
        (&json!("across edges"), &ack["seq"])
    );
    let reply = bob.say("bridge", "heard you").await;
    assert_eq!(alice.events("bridge", 2).await[1]["seq"], reply["seq"]);

    // The same id through the other edge (alice reconnected there): the original outcome.
    let mut alice2 = Client::connect(&edge2.ws_url(), &token("alice")).await;
    let resend = alice2.say_with_id("bridge", "across edges", id).await;
    assert_eq!(
        (&resend["seq"], &resend["ts"], &resend["duplicate"]),
        (&ack["seq"], &ack["ts"], &json!(true))
    );
    // Bob's edge projects into its own store; it lists the room too.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (_, rooms) = api(&edge2, &token("bob"), "GET", "/v1/rooms", None);
        if rooms["rooms"][0]["head"] == 3 {
            break;
        }
        assert!(Instant::now() < deadline, "{rooms}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Creates the group room `room` of alice and bob through `edge`.
fn create_group(edge: &Chatd, room: &str) {
    let (status, body) = api(
        edge,
        &token("alice"),
        "POST",
        "/v1/rooms",
        Some(json!({"room": room, "kind": "group", "members": ["bob"]})),
    );
    assert_eq!(status, 201, "{body}");
}

fn event(text: &str) -> Event {
    Event {
        id: Uuid::new_v4(),
        user: UserId::parse("alice").unwrap(),
        ts: 1_763_900_000_000,
        body: EventBody::Message {
            text: text.into(),
            thread: None,
            reply_to: None,
        },
    }
}

fn chatd_command(data: &Path, nats: &NatsServer, args: &[&str]) -> String {
    let out = Command::new(bin())
        .args(args)
        .env("CHAT_DATA_DIR", data)
        .env("NATS_URL", nats.url())
        .env("CHAT_JWT_HS256_SECRET", SHARED_SECRET)
        .env("CHAT_JWT_ISSUER", "test-issuer")
        .env("CHAT_JWT_AUDIENCE", "chat")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "chatd {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap().trim().to_owned()
}

async fn checkpoint(store: &Arc<dyn Store>, room: &RoomId) -> u64 {
    store.checkpoint(room).await.unwrap_or(0)
}

#[tokio::test]
async fn a_projector_killed_mid_stream_then_restarted_equals_a_fresh_rebuild() {
    let nats = NatsServer::start();
    let data = tempfile::tempdir().unwrap();
    let log = RoomLog::connect(&nats.url(), LogConfig::default())
        .await
        .unwrap();
    let room = RoomId::parse("busy").unwrap();
    log.ensure_room(&room).await.unwrap();
    log.append(
        &room,
        &Event {
            id: Uuid::new_v4(),
            user: UserId::parse("alice").unwrap(),
            ts: 0,
            body: EventBody::RoomCreated {
                name: "Busy".into(),
                room_kind: RoomKind::Group,
                members: vec![UserId::parse("bob").unwrap()],
            },
        },
    )
    .await
    .unwrap();

    let mut projector = node(&nats, data.path(), "projector");
    // Appends keep coming while the projector is killed and restarted.
    let writer = tokio::spawn({
        let (log, room) = (log.clone(), room.clone());
        async move {
            for i in 0..3_000 {
                log.append(&room, &event(&format!("m{i}"))).await.unwrap();
            }
        }
    });
    let store: Arc<dyn Store> = Arc::new(SqliteStore::open(&data.path().join("store.db")).unwrap());
    let deadline = Instant::now() + Duration::from_secs(30);
    while checkpoint(&store, &room).await < 500 {
        assert!(Instant::now() < deadline, "projector never got going");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    projector.kill();
    let at_kill = checkpoint(&store, &room).await;
    let projector = node(&nats, data.path(), "projector");
    writer.await.unwrap();
    let head = log.head(&room).await.unwrap();
    assert_eq!(head, 3_001);
    assert!(at_kill < head, "killed mid-stream (at {at_kill} of {head})");
    let deadline = Instant::now() + Duration::from_secs(60);
    while checkpoint(&store, &room).await < head {
        assert!(
            Instant::now() < deadline,
            "restarted projector did not catch up"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    drop(projector);

    let fresh = data.path().join("fresh.db");
    let fresh_arg = fresh.display().to_string();
    let report = chatd_command(data.path(), &nats, &["rebuild", "--into", &fresh_arg]);
    assert!(report.contains("3001 events"), "{report}");
    let live = chatd_command(data.path(), &nats, &["digest"]);
    let rebuilt = chatd_command(data.path(), &nats, &["digest", "--store", &fresh_arg]);
    assert_eq!(live.len(), 64);
    assert_eq!(live, rebuilt, "the restarted projection equals a rebuild");
}

#[tokio::test]
async fn history_read_from_the_log_says_more_only_when_older_events_exist() {
    // An api process whose store has nothing (no projector writes it): every page comes from
    // the log.
    let nats = NatsServer::start();
    let (d1, d2) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let all = node(&nats, d1.path(), "all");
    let api_only = node(&nats, d2.path(), "api");
    let t = token("alice");
    let body = json!({"room": "logged", "kind": "group", "members": ["bob"]});
    let (status, answer) = api(&all, &t, "POST", "/v1/rooms", Some(body));
    assert_eq!(status, 201, "{answer}");
    let page = |query: &str| {
        let (status, page) = api(
            &api_only,
            &t,
            "GET",
            &format!("/v1/rooms/logged/messages{query}"),
            None,
        );
        assert_eq!(status, 200, "{page}");
        let seqs: Vec<u64> = page["events"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e["seq"].as_u64().unwrap())
            .collect();
        (seqs, page["more"].as_bool().unwrap())
    };
    assert_eq!(page("?limit=1"), (vec![1], false), "the room's only event");
    let mut alice = Client::connect(&all.ws_url(), &t).await;
    for i in 0..5 {
        alice.say("logged", &format!("m{i}")).await;
    }
    assert_eq!(page("?limit=6"), (vec![6, 5, 4, 3, 2, 1], false));
    assert_eq!(page("?limit=3"), (vec![6, 5, 4], true));
    assert_eq!(page("?before=4&limit=3"), (vec![3, 2, 1], false));
    assert_eq!(page("?before=4&limit=2"), (vec![3, 2], true));
}

/// A metric's value from `/metrics` (0 while the counter has not been exported yet).
fn metric(chatd: &Chatd, name: &str) -> u64 {
    let (_, text) = chatd.get("/metrics").expect("metrics answer");
    text.lines()
        .find_map(|line| line.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or(0)
}

#[tokio::test]
async fn a_users_send_allowance_is_one_across_edges() {
    let nats = NatsServer::start();
    let (d1, d2) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    // One send a second, four at once; the edges share what they gave out every 50 ms.
    let settings = [
        ("CHAT_SEND_RATE", "1/4"),
        ("CHAT_RATE_SHARE", "50ms"),
        ("CHAT_FLOOD_WINDOW", "1m"),
    ];
    let edge1 = common::node(&nats, d1.path(), "all", &settings);
    let edge2 = common::node(&nats, d2.path(), "all", &settings);
    let (status, body) = api(
        &edge1,
        &token("alice"),
        "POST",
        "/v1/rooms",
        Some(json!({"room": "quota", "kind": "group", "members": ["bob"]})),
    );
    assert_eq!(status, 201, "{body}");
    let mut on_edge1 = Client::connect(&edge1.ws_url(), &token("alice")).await;
    let mut on_edge2 = Client::connect(&edge2.ws_url(), &token("alice")).await;

    // Alice spends her burst on edge 1.
    let started = Instant::now();
    for i in 0..4 {
        let ack = on_edge1.say("quota", &format!("m{i}")).await;
        assert_eq!(ack["type"], "ack", "{ack}");
    }
    // Edge 2 hears of it and draws as much from its own bucket for her.
    let deadline = Instant::now() + Duration::from_secs(30);
    while metric(&edge2, "chat_edge_rate_charged_total") < 4 {
        assert!(Instant::now() < deadline, "edge 2 never drew alice's sends");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // So on edge 2 she gets only what refilled since (one a second), not a burst of her own.
    let mut acked = 0;
    let mut limited = 0;
    for i in 0..4 {
        let reply = on_edge2.say("quota", &format!("n{i}")).await;
        match reply["code"].as_str() {
            None => acked += 1,
            Some("rate_limited") => limited += 1,
            Some(other) => panic!("unexpected error {other}: {reply}"),
        }
    }
    let refilled = started.elapsed().as_secs() + 1;
    // Past 3 s everything could have refilled, and the check below would say nothing.
    assert!(
        refilled < 4,
        "the run took {:?}: too slow to judge the shared allowance",
        started.elapsed()
    );
    assert!(
        acked <= refilled && limited >= 4 - refilled,
        "{acked} of 4 acked on edge 2, {limited} limited; at most {refilled} tokens refilled \
         since the burst on edge 1"
    );
    // Another user's allowance is untouched.
    let mut bob = Client::connect(&edge2.ws_url(), &token("bob")).await;
    assert_eq!(bob.say("quota", "mine").await["type"], "ack");
}

#[tokio::test]
async fn an_edge_whose_store_no_projector_fills_refuses_appends() {
    // An edge on SQLite has a store of its own that nothing fills: its id index cannot answer
    // a resend past the duplicate window, so it appends nothing rather than risk a second copy.
    let nats = NatsServer::start();
    let (d1, d2) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let all = node(&nats, d1.path(), "all");
    let edge = node(&nats, d2.path(), "edge");
    let t = token("alice");
    let body = json!({"room": "lonely", "kind": "group", "members": ["bob"]});
    let (status, answer) = api(&all, &t, "POST", "/v1/rooms", Some(body));
    assert_eq!(status, 201, "{answer}");
    let mut alice = Client::connect(&edge.ws_url(), &t).await;
    let refused = alice.say("lonely", "anyone?").await;
    assert_eq!(refused["code"], "unavailable", "{refused}");
    assert!(
        refused["message"]
            .as_str()
            .unwrap()
            .contains("no projector has reported"),
        "{refused}"
    );
    // The all-in-one process, whose projector fills its own store, appends.
    let mut alice = Client::connect(&all.ws_url(), &t).await;
    assert_eq!(alice.say("lonely", "here").await["type"], "ack");
}

/// A subscribe that comes after a removal made through another edge, while this edge's cached
/// membership still has the user (a long membership TTL here makes that certain), is refused:
/// the subscription would start after the removal and never see it end the subscription.
#[tokio::test]
async fn a_subscribe_after_a_removal_elsewhere_is_refused_though_the_cache_has_the_member() {
    let nats = NatsServer::start();
    let (d1, d2) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let edge1 = common::node(&nats, d1.path(), "all", &[("CHAT_MEMBERSHIP_TTL", "60s")]);
    let edge2 = node(&nats, d2.path(), "all");
    create_group(&edge1, "team");
    // bob's edge caches the room's membership, with bob in it.
    let mut bob = Client::connect(&edge1.ws_url(), &token("bob")).await;
    assert_eq!(bob.say("team", "here").await["type"], "ack");
    let (status, body) = api(
        &edge2,
        &token("alice"),
        "DELETE",
        "/v1/rooms/team/members/bob",
        None,
    );
    assert!(status < 300, "{status} {body}");

    let answer = bob.subscribe("team", None).await;
    assert_eq!(
        (&answer["type"], &answer["code"]),
        (&json!("error"), &json!("forbidden")),
        "{answer}"
    );
}
