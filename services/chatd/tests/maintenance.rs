//! `chatd rebuild` and `chatd digest` as an operator runs them: beside a running server, against
//! a NATS that is not there, and with mistyped stores and rooms.

mod common;

use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::client::Client;
use common::*;
use nix::sys::signal::Signal;
use serde_json::json;

/// Runs `chatd ARGS` with `env`, failing the test if it has not ended within `limit`.
fn run(env: &[(&'static str, String)], args: &[&str], limit: Duration) -> Output {
    let mut child = Command::new(bin())
        .args(args)
        .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
        .env("CHAT_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run chatd");
    let deadline = Instant::now() + limit;
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            let out = child.wait_with_output().unwrap();
            panic!(
                "chatd {args:?} still running after {limit:?}\n{}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    child.wait_with_output().unwrap()
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rebuild_into_a_file_and_digest_beside_a_running_server() {
    let data = tempfile::tempdir().unwrap();
    let env = standalone_env(data.path());
    let mut chatd = start(&env);
    let token = dev_token(data.path(), "alice", 3600);
    let body = json!({"room": "general", "kind": "group", "members": ["bob"]});
    let (status, answer) = api(&chatd, &token, "POST", "/v1/rooms", Some(body));
    assert_eq!(status, 201, "{answer}");
    let mut alice = Client::connect(&chatd.ws_url(), &token).await;
    let mut head = 0;
    for i in 0..20 {
        head = alice.say("general", &format!("m{i}")).await["seq"]
            .as_u64()
            .unwrap();
    }
    let limit = Duration::from_secs(60);
    // Digests of the live store until the projector has stored the last message.
    let deadline = Instant::now() + limit;
    loop {
        let (_, rooms) = api(&chatd, &token, "GET", "/v1/rooms", None);
        if rooms["rooms"][0]["head"] == head {
            break;
        }
        assert!(Instant::now() < deadline, "never projected: {rooms}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    let fresh = data.path().join("rebuilt.db").display().to_string();
    let out = run(&env, &["rebuild", "--into", &fresh], limit);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stdout(&out).contains(&format!("{head} events")),
        "{}",
        stdout(&out)
    );
    let live = run(&env, &["digest"], limit);
    assert!(live.status.success(), "{}", stderr(&live));
    let rebuilt = run(&env, &["digest", "--store", &fresh], limit);
    assert_eq!(stdout(&live).len(), 64);
    assert_eq!(
        stdout(&live),
        stdout(&rebuilt),
        "the live store equals a rebuild"
    );
    let one = run(&env, &["digest", "--room", "general"], limit);
    assert!(one.status.success(), "{}", stderr(&one));
    // A projector's share in the environment does not make a partial store: one of the two
    // shares does not own `general`, and both rebuild it.
    for share in ["0/2", "1/2"] {
        let mut projector_env = env.clone();
        projector_env.push(("CHAT_PROJECTOR_PARTITION", share.to_owned()));
        let file = data.path().join(format!("share-{}.db", &share[..1]));
        let file = file.display().to_string();
        let out = run(&projector_env, &["rebuild", "--into", &file], limit);
        assert!(out.status.success(), "{}", stderr(&out));
        assert!(
            stderr(&out).contains("covers every room"),
            "{}",
            stderr(&out)
        );
        let digest = run(&env, &["digest", "--store", &file], limit);
        assert_eq!(
            stdout(&digest),
            stdout(&live),
            "rebuilt with {share} in the environment"
        );
    }

    // In place, it is refused while the server runs (its projector writes the store).
    let out = run(&env, &["rebuild"], limit);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(stderr(&out).contains("in use"), "{}", stderr(&out));
    // So is --into an existing file: the live store, or the rebuild just made.
    let live_store = data.path().join("store.db").display().to_string();
    for existing in [&live_store, &fresh] {
        let out = run(&env, &["rebuild", "--into", existing], limit);
        assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
        assert!(stderr(&out).contains("exists"), "{}", stderr(&out));
    }
    assert_eq!(
        stdout(&run(&env, &["digest"], limit)),
        stdout(&live),
        "the live store is untouched"
    );
    // A rebuild that fails leaves no file behind.
    let failed = data.path().join("failed.db");
    let out = run(
        &env,
        &[
            "rebuild",
            "--room",
            "nosuch",
            "--into",
            &failed.display().to_string(),
        ],
        limit,
    );
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(!failed.exists(), "{}", stderr(&out));

    // Mistakes are errors, not the empty store's digest.
    let missing = data.path().join("no-such-dir").join("store.db");
    let out = run(
        &env,
        &["digest", "--store", &missing.display().to_string()],
        limit,
    );
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("no store at"), "{}", stderr(&out));
    assert!(!missing.parent().unwrap().exists(), "nothing is created");
    let out = run(&env, &["digest", "--room", "nosuch"], limit);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("not in the store"),
        "{}",
        stderr(&out)
    );

    // Stopped, in place. Against another deployment's prefix the logs hold none of the store's
    // rooms: the rebuild refuses and clears nothing. With the server's own, it rebuilds.
    chatd.signal(Signal::SIGTERM);
    let stopped = chatd.wait_exit(limit);
    assert!(stopped.is_some_and(|s| s.success()), "{stopped:?}");
    let mut elsewhere = env.clone();
    elsewhere.push(("CHAT_PREFIX", "elsewhere".to_owned()));
    let out = run(&elsewhere, &["rebuild"], limit);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("1 of the store's rooms have no log (general)"),
        "{}",
        stderr(&out)
    );
    assert!(stderr(&out).contains("\"elsewhere\""), "{}", stderr(&out));
    assert_eq!(stdout(&run(&env, &["digest"], limit)), stdout(&live));
    let out = run(&env, &["rebuild"], limit);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(stdout(&run(&env, &["digest"], limit)), stdout(&live));
}

/// The maintenance commands read the log a server wrote: without NATS_URL, from the data dir's
/// own nats-server store. A data dir without one (not the server's) is an error, not an empty
/// log (which a rebuild would take as a reason to clear the store); nothing is started there,
/// and a mistyped data dir is not created.
#[test]
fn commands_refuse_a_data_dir_without_a_log() {
    let data = tempfile::tempdir().unwrap();
    let mistyped = data.path().join("mistyped");
    for dir in [data.path(), &mistyped] {
        let env = standalone_env(dir);
        each_fails_saying(
            &env,
            &[
                &["log", "verify"],
                &["log", "export", "general"],
                &["rebuild"],
            ],
            "no NATS_URL, and no log in",
        );
    }
    assert!(!data.path().join("nats").exists());
    assert!(!data.path().join("chatd.lock").exists());
    assert!(!mistyped.exists());
}

/// Runs each of `commands` with `env`: each must exit 1 with `says` in its stderr.
fn each_fails_saying(env: &[(&'static str, String)], commands: &[&[&str]], says: &str) {
    for args in commands {
        let out = run(env, args, Duration::from_secs(30));
        assert_eq!(
            out.status.code(),
            Some(1),
            "chatd {args:?}: {}",
            stderr(&out)
        );
        assert!(
            stderr(&out).contains(says),
            "chatd {args:?}: {}",
            stderr(&out)
        );
    }
}

#[test]
fn commands_fail_at_once_when_nats_is_not_there() {
    let data = tempfile::tempdir().unwrap();
    // A port nothing listens on.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut env = standalone_env(data.path());
    env.push(("NATS_URL", format!("nats://127.0.0.1:{port}")));
    let into = data.path().join("x.db").display().to_string();
    each_fails_saying(
        &env,
        &[
            &["log", "verify"],
            &["log", "export", "general"],
            &["rebuild", "--into", &into],
        ],
        "nats",
    );
}

#[test]
fn arguments_that_cannot_mean_anything_are_usage_errors() {
    let data = tempfile::tempdir().unwrap();
    let env = standalone_env(data.path());
    for (args, says) in [
        (
            &["log", "export", "general", "--from", "5", "--to", "3"][..],
            "Usage: chatd log export",
        ),
        (&["log", "export", "general", "--to", "0"], "--to"),
        (&["log", "export", "general", "--from", "0"], "--from"),
        (&["token", "alice", "--ttl", "0"], "more than 0"),
        (&["token", "alice", "--ttl", "87601h"], "at most"),
        (&["token", "a b"], "user id"),
        (&["log", "export", "bad/room"], "room id"),
        (&["rebuild", "--room", "a/b"], "room id"),
        (&["digest", "--room", "a b"], "room id"),
        (
            &["token", "alice", "--ttl", "18446744073709551615s"],
            "at most",
        ),
    ] {
        let out = run(&env, args, Duration::from_secs(30));
        assert_eq!(
            out.status.code(),
            Some(2),
            "chatd {args:?}: {}",
            stderr(&out)
        );
        assert!(
            stderr(&out).contains(says),
            "chatd {args:?}: {}",
            stderr(&out)
        );
    }
}

#[test]
fn an_in_place_rebuild_finds_the_nats_server_make_run_installed() {
    // `make run` installs nats-server under the project (`.tools/`) when none is on the PATH,
    // and only its own process is told where; an operator's `chatd rebuild` from the project
    // directory finds it there.
    let project = tempfile::tempdir().unwrap();
    let local = project.path().join(".tools/nats-server/usr/sbin");
    std::fs::create_dir_all(&local).unwrap();
    std::os::unix::fs::symlink(chat_harness::nats_server_bin(), local.join("nats-server")).unwrap();
    // The default data dir, as a server left it (with the log's directory).
    std::fs::create_dir_all(project.path().join("data/nats")).unwrap();
    let out = Command::new(bin())
        .args(["rebuild"])
        .current_dir(project.path())
        .env_remove("NATS_SERVER_BIN")
        .env_remove("NATS_URL")
        .env("PATH", "/nonexistent")
        .env("CHAT_LOG", "warn")
        .output()
        .expect("run chatd");
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        project.path().join("data/store.db").exists(),
        "rebuilt in the default data dir"
    );
}
