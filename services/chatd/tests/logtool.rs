//! `chatd log export` and `chatd log verify` against a running chatd's own nats-server: the
//! operator reads and checks room logs beside the live server.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Duration;

use chat_log::LogConfig;
use chat_model::{Event, EventBody, RoomId, UserId};
use common::client::Client;
use common::*;
use serde_json::{json, Value};

/// Runs `chatd log ARGS` with `env`.
fn run_log(env: &[(&'static str, String)], args: &[&str]) -> std::process::Output {
    Command::new(bin())
        .arg("log")
        .args(args)
        .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
        .output()
        .expect("run chatd log")
}

/// Runs `chatd log ARGS` with `env`; (exit code: 0, or 3 for problems found; stdout lines as
/// JSON).
fn chatd_log(env: &[(&'static str, String)], args: &[&str]) -> (i32, Vec<Value>) {
    let out = run_log(env, args);
    let stdout = String::from_utf8(out.stdout).expect("utf-8");
    let lines = stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{l:?}: {e}")))
        .collect();
    let code = out.status.code().unwrap_or(-1);
    assert!(
        code == 0 || code == 3,
        "chatd log {args:?}: {code}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    (code, lines)
}

/// Publishes `payload` straight to `room`'s stream, as a faulty writer would.
async fn publish_raw(nats: &str, room: &str, payload: Vec<u8>) {
    let client = async_nats::connect(nats).await.unwrap();
    let js = async_nats::jetstream::new(client);
    let subject = LogConfig::default().room_subject(&RoomId::parse(room).unwrap());
    js.publish(subject, payload.into())
        .await
        .unwrap()
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn export_and_verify_read_the_log_beside_a_running_server() {
    let data = tempfile::tempdir().unwrap();
    let env = standalone_env(data.path());
    let chatd = start(&env);
    let t = |user: &str| dev_token(data.path(), user, 3600);
    for room in ["general", "faulty"] {
        let body = json!({"room": room, "kind": "group", "members": ["bob"]});
        let (status, answer) = api(&chatd, &t("alice"), "POST", "/v1/rooms", Some(body));
        assert_eq!(status, 201, "{answer}");
    }
    let mut alice = Client::connect(&chatd.ws_url(), &t("alice")).await;
    let first = alice.say("general", "first").await["seq"].as_u64().unwrap();
    let second = alice.say("general", "second").await["seq"]
        .as_u64()
        .unwrap();
    let edit = alice
        .request(
            json!({"type": "edit", "room": "general", "id": uuid::Uuid::new_v4(),
                        "target": first, "text": "first, edited"}),
        )
        .await;
    assert_eq!(edit["type"], "ack", "{edit}");
    let delete = alice
        .request(
            json!({"type": "delete", "room": "general", "id": uuid::Uuid::new_v4(),
                        "target": second}),
        )
        .await;
    assert_eq!(delete["type"], "ack", "{delete}");
    let head = delete["seq"].as_u64().unwrap();

    // Export: every event, in order, as appended (the edit and the delete are lines of their
    // own; the first message keeps its first text).
    let (code, lines) = chatd_log(&env, &["export", "general"]);
    assert_eq!(code, 0);
    let seqs: Vec<u64> = lines.iter().map(|l| l["seq"].as_u64().unwrap()).collect();
    assert_eq!(seqs, (1..=head).collect::<Vec<_>>(), "{lines:?}");
    let kinds: Vec<&str> = lines.iter().map(|l| l["kind"].as_str().unwrap()).collect();
    assert_eq!(
        kinds,
        ["room_created", "message", "message", "edit", "delete"]
    );
    assert_eq!(lines[1]["text"], "first");
    assert_eq!(lines[3]["text"], "first, edited");
    assert_eq!(lines[4]["target"], second);
    let (_, part) = chatd_log(&env, &["export", "general", "--from", "2", "--to", "3"]);
    assert_eq!(part, lines[1..3]);

    // Verify: a sound log, and a digest that does not change when nothing does.
    let (code, verdicts) = chatd_log(&env, &["verify", "general"]);
    assert_eq!(code, 0, "{verdicts:?}");
    let verdict = &verdicts[0];
    assert_eq!(
        (
            &verdict["ok"],
            &verdict["first"],
            &verdict["last"],
            &verdict["events"]
        ),
        (&json!(true), &json!(1), &json!(head), &json!(head)),
        "{verdict}"
    );
    assert_eq!(verdict["problems"], json!([]));
    assert_eq!(verdict["refused_by_rules"], json!([]));
    let digest = verdict["sha256"].as_str().unwrap().to_owned();
    assert_eq!(digest.len(), 64);
    assert_eq!(
        chatd_log(&env, &["verify", "general"]).1[0]["sha256"],
        digest
    );

    // A faulty writer: a message by a non-member, then bytes that are no event.
    let nats = chatd::nats_child::running_url(data.path()).expect("chatd's nats-server");
    let intruder = Event {
        id: uuid::Uuid::new_v4(),
        user: UserId::parse("mallory").unwrap(),
        ts: 1,
        body: EventBody::Message {
            text: "not a member".into(),
            thread: None,
            reply_to: None,
        },
    };
    publish_raw(&nats, "faulty", intruder.encode().unwrap()).await;
    let (code, verdicts) = chatd_log(&env, &["verify", "faulty"]);
    assert_eq!(code, 3, "an event no chatd would append fails the verdict");
    assert_eq!(verdicts[0]["ok"], false);
    assert_eq!(
        verdicts[0]["problems"],
        json!([]),
        "the record itself is intact"
    );
    let refused = verdicts[0]["refused_by_rules"].as_array().unwrap();
    assert_eq!(refused.len(), 1, "{refused:?}");
    assert!(refused[0]
        .as_str()
        .unwrap()
        .starts_with("2: message by mallory"));

    publish_raw(&nats, "faulty", b"\xc1 not msgpack".to_vec()).await;
    let (code, verdicts) = chatd_log(&env, &["verify"]);
    assert_eq!(code, 3, "a room with a problem fails the run");
    let by_room = |room: &str| verdicts.iter().find(|v| v["room"] == room).unwrap().clone();
    assert_eq!(by_room("general")["ok"], true);
    let faulty = by_room("faulty");
    assert_eq!(faulty["ok"], false);
    let problems = faulty["problems"].as_array().unwrap();
    assert!(
        problems.len() == 1
            && problems[0]
                .as_str()
                .unwrap()
                .starts_with("3: does not decode"),
        "{problems:?}"
    );
    let (_, lines) = chatd_log(&env, &["export", "faulty"]);
    assert_eq!(lines[2]["seq"], 3);
    assert_eq!(lines[2]["payload_hex"], hex::encode(b"\xc1 not msgpack"));
    assert!(lines[2]["undecodable"].is_string());

    // Unknown rooms and invalid ids are errors, not empty output.
    let out = run_log(&env, &["export", "nowhere"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("no room nowhere"));
    let out = run_log(&env, &["verify", "Not A Room"]);
    assert_eq!(out.status.code(), Some(2), "a usage error");
    assert!(String::from_utf8_lossy(&out.stderr).contains("room id"));
    // Nothing verified (another deployment's prefix) is not a pass.
    let mut elsewhere = env.clone();
    elsewhere.push(("CHAT_PREFIX", "elsewhere".to_owned()));
    let out = run_log(&elsewhere, &["verify"]);
    assert_eq!(out.status.code(), Some(3));
    assert!(String::from_utf8_lossy(&out.stderr).contains("nothing verified"));

    // An event with bytes after it is not read as that event: verify and export show it as
    // undecodable, its bytes in hex.
    let mut trailing = intruder.encode().unwrap();
    trailing.extend_from_slice(b"\xa7TRAILER");
    publish_raw(&nats, "faulty", trailing.clone()).await;
    let (code, verdicts) = chatd_log(&env, &["verify", "faulty"]);
    assert_eq!(code, 3);
    let problems = verdicts[0]["problems"].as_array().unwrap();
    assert!(
        problems.iter().any(|p| p
            .as_str()
            .unwrap()
            .starts_with("4: does not decode (bytes follow the event envelope)")),
        "{problems:?}"
    );
    let (_, lines) = chatd_log(&env, &["export", "faulty", "--from", "4"]);
    assert_eq!(lines[0]["payload_hex"], hex::encode(&trailing), "{lines:?}");

    // Output nobody reads is no failure (`| head`); output that cannot be written is.
    for args in [&["log", "verify"][..], &["digest"], &["token", "alice"]] {
        let (reader, writer) = std::io::pipe().unwrap();
        drop(reader);
        let out = Command::new(bin())
            .args(args)
            .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
            .stdout(writer)
            .stderr(Stdio::piped())
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(0), "chatd {args:?}: {stderr}");
        assert!(!stderr.contains("panicked"), "chatd {args:?}: {stderr}");
        let full = Command::new(bin())
            .args(args)
            .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
            .stdout(std::fs::File::create("/dev/full").unwrap())
            .stderr(Stdio::piped())
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&full.stderr);
        assert_eq!(
            full.status.code(),
            Some(1),
            "chatd {args:?} > /dev/full: {stderr}"
        );
        assert!(!stderr.contains("panicked"), "chatd {args:?}: {stderr}");
    }

    // --follow prints the log so far, then each new event as it is stored.
    let mut follower = Command::new(bin())
        .args(["log", "export", "general", "--follow"])
        .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let stdout = follower.stdout.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { return };
            if tx
                .send(serde_json::from_str::<Value>(&line).unwrap())
                .is_err()
            {
                return;
            }
        }
    });
    for seq in 1..=head {
        assert_eq!(next_line(&mut rx).await["seq"], seq);
    }
    let live = alice.say("general", "while following").await["seq"]
        .as_u64()
        .unwrap();
    let line = next_line(&mut rx).await;
    assert_eq!(
        (&line["seq"], &line["text"]),
        (&json!(live), &json!("while following"))
    );
    follower.kill().unwrap();
    follower.wait().unwrap();
}

async fn next_line(rx: &mut tokio::sync::mpsc::UnboundedReceiver<Value>) -> Value {
    tokio::time::timeout(Duration::from_secs(30), rx.recv())
        .await
        .expect("a line in time")
        .expect("follower running")
}
