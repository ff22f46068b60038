//! The real `chatd` binary: start, health, tokens, roles, shutdown, and refusals.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

mod common;

use chat_harness::{process_gone, Chatd, NatsServer};
use chatd::devauth::{Claims, DEV_AUDIENCE, DEV_ISSUER};
use common::*;
use nix::sys::signal::Signal;

fn nats_pid(data: &Path) -> u32 {
    let path = data.join("nats/nats-server.pid");
    std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .trim()
        .parse()
        .unwrap()
}

fn eventually(what: &str, deadline: Duration, mut check: impl FnMut() -> bool) {
    let end = Instant::now() + deadline;
    while !check() {
        assert!(Instant::now() < end, "{what}: not true within {deadline:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn all_in_one_starts_its_own_nats_and_serves_health() {
    let data = tempfile::tempdir().unwrap();
    let chatd = start(&standalone_env(data.path()));
    assert!(chatd.http_addr().starts_with("127.0.0.1:") && !chatd.http_addr().ends_with(":0"));
    assert_eq!(chatd.get("/healthz").unwrap().0, 200);
    let (status, body) = chatd.get("/readyz").unwrap();
    assert_eq!(status, 200, "{body}");
    let body: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(
        body,
        serde_json::json!({"status": "ready", "nats": "connected"})
    );
    let (status, body) = chatd.get("/no/such/thing").unwrap();
    assert_eq!(status, 404);
    let body: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(body["error"]["code"], "not_found");
    // A route asked with a method it does not have: 405 in the errors' shape, saying which
    // methods it has.
    for (method, path, allowed) in [
        ("PUT", "/v1/rooms", "GET,HEAD,POST"),
        ("POST", "/healthz", "GET,HEAD"),
        ("DELETE", "/v1/ws", "GET,HEAD"),
    ] {
        let (status, head, body) =
            chat_harness::http_exchange(chatd.http_addr(), method, path, &[], None).unwrap();
        assert_eq!(status, 405, "{method} {path}: {head}");
        let allow = head
            .lines()
            .find_map(|line| {
                let (name, value) = line.split_once(':')?;
                let mut methods: Vec<&str> = value.split(',').map(str::trim).collect();
                methods.sort_unstable();
                name.eq_ignore_ascii_case("allow")
                    .then(|| methods.join(","))
            })
            .unwrap_or_else(|| panic!("{method} {path}: no Allow header in {head}"));
        assert_eq!(allow, allowed, "{method} {path}");
        let body: serde_json::Value = serde_json::from_str(&body).expect(&body);
        assert_eq!(body["error"]["code"], "bad_request", "{body}");
        assert!(
            body["error"]["message"].as_str().unwrap().contains(path),
            "{body}"
        );
    }
    // HEAD reaches the upgrade (the router serves it with GET), which needs GET itself.
    let (status, head, _) =
        chat_harness::http_exchange(chatd.http_addr(), "HEAD", "/v1/ws", &[], None).unwrap();
    assert_eq!(status, 405, "{head}");
    assert!(
        head.to_ascii_lowercase().contains("\r\nallow: get"),
        "{head}"
    );
    // The WebSocket endpoint asked without an upgrade.
    let (status, body) = chatd.get("/v1/ws").unwrap();
    assert_eq!(status, 400);
    let body: serde_json::Value = serde_json::from_str(&body).expect(&body);
    assert_eq!(body["error"]["code"], "bad_request", "{body}");
    assert!(!process_gone(nats_pid(data.path())), "its nats-server runs");
    assert!(
        data.path().join("nats/jetstream").is_dir(),
        "the nats store lives in the data dir"
    );
}

#[test]
fn the_token_command_mints_tokens_the_dev_secret_verifies() {
    let data = tempfile::tempdir().unwrap();
    // No server has run on this data dir: no secret, and none is made up here (a token
    // signed with it would be refused by every server).
    let out = Command::new(bin())
        .args(["token", "alice"])
        .env("CHAT_DATA_DIR", data.path())
        .env_remove("CHAT_JWT_HS256_SECRET")
        .env_remove("CHAT_JWT_PUBLIC_KEYS")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("no development secret"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!data.path().join("dev-secret").exists());
    // As `chatd run` leaves it.
    std::fs::write(data.path().join("dev-secret"), "ab".repeat(32)).unwrap();
    let out = Command::new(bin())
        .args([
            "token",
            "alice@example.com",
            "--name",
            "Alice",
            "--ttl",
            "1h",
        ])
        .env("CHAT_DATA_DIR", data.path())
        .env_remove("CHAT_JWT_HS256_SECRET")
        .env_remove("CHAT_JWT_PUBLIC_KEYS")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let token = String::from_utf8(out.stdout).unwrap();
    let secret = std::fs::read_to_string(data.path().join("dev-secret")).unwrap();
    let mut validation = jsonwebtoken::Validation::new(jsonwebtoken::Algorithm::HS256);
    validation.set_issuer(&[DEV_ISSUER]);
    validation.set_audience(&[DEV_AUDIENCE]);
    let claims = jsonwebtoken::decode::<Claims>(
        token.trim(),
        &jsonwebtoken::DecodingKey::from_secret(secret.trim().as_bytes()),
        &validation,
    )
    .unwrap()
    .claims;
    assert_eq!(claims.sub, "alice@example.com");
    assert_eq!(claims.name.as_deref(), Some("Alice"));
    assert!(claims.exp > claims.iat && claims.exp - claims.iat == 3600);

    // A user id the contract refuses is refused here too.
    let bad = Command::new(bin())
        .args(["token", "not a user"])
        .env("CHAT_DATA_DIR", data.path())
        .output()
        .unwrap();
    assert!(!bad.status.success());
}

#[test]
fn sigterm_drains_exits_cleanly_and_stops_its_nats_server() {
    let data = tempfile::tempdir().unwrap();
    let mut chatd = start(&standalone_env(data.path()));
    let nats = nats_pid(data.path());
    chatd.signal(Signal::SIGTERM);
    let status = chatd
        .wait_exit(Duration::from_secs(30))
        .expect("chatd exits after SIGTERM");
    assert!(status.success(), "{status}: {}", chatd.stderr());
    eventually("nats-server stopped", Duration::from_secs(15), || {
        process_gone(nats)
    });
}

#[test]
fn ctrl_c_in_a_terminal_drains_through_its_own_nats_server_then_stops_it() {
    let data = tempfile::tempdir().unwrap();
    let mut chatd = start(&standalone_env(data.path()));
    let nats = nats_pid(data.path());
    // What a terminal does on Ctrl-C: SIGINT to the whole foreground job.
    chatd.signal_group(Signal::SIGINT);
    let status = chatd
        .wait_exit(Duration::from_secs(30))
        .expect("chatd exits after Ctrl-C");
    let stderr = chatd.stderr();
    assert!(status.success(), "{status}: {stderr}");
    // The server stayed up through the drain: chatd never lost its connection, and what it
    // had buffered went out.
    let drain = stderr
        .split("draining")
        .nth(1)
        .unwrap_or_else(|| panic!("the drain is logged: {stderr}"));
    assert!(
        !drain.contains("event=disconnected") && !drain.contains("nats unreachable at shutdown"),
        "its nats-server stayed up for the drain: {stderr}"
    );
    assert!(stderr.contains("nats-server stopped"), "{stderr}");
    eventually("nats-server stopped", Duration::from_secs(15), || {
        process_gone(nats)
    });
}

#[test]
fn sigkill_of_chatd_takes_its_nats_server_down_too() {
    let data = tempfile::tempdir().unwrap();
    let mut chatd = start(&standalone_env(data.path()));
    let nats = nats_pid(data.path());
    chatd.kill();
    eventually(
        "nats-server gone after its parent was killed",
        Duration::from_secs(15),
        || process_gone(nats),
    );
    // And the data dir can be used again right away.
    let again = start(&standalone_env(data.path()));
    assert_eq!(again.get("/readyz").unwrap().0, 200);
}

#[test]
fn invalid_configuration_is_refused_before_anything_starts() {
    let data = tempfile::tempdir().unwrap();
    for (var, value) in [
        ("CHAT_SEND_RATE", "fast"),
        ("CHAT_LISTEN", "everywhere"),
        ("CHAT_STORE", "mysql://db"),
        ("CHAT_ROLE", "router"),
        ("NATS_URL", "nats://:bad:port"),
        ("OTEL_EXPORTER_OTLP_ENDPOINT", "https://collector:4318"),
        ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "http://no such host/"),
        (
            "OTEL_EXPORTER_OTLP_METRICS_ENDPOINT",
            "https://collector:4318/v1/metrics",
        ),
        ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://"),
        ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://:4318"),
        // With a usable endpoint (below): a protocol this build does not speak.
        ("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc"),
        ("OTEL_EXPORTER_OTLP_METRICS_PROTOCOL", "http/json"),
        ("OTEL_TRACES_EXPORTER", "jaeger"),
        ("OTEL_METRICS_EXPORTER", "prometheus"),
        // With a usable endpoint (below): settings the SDK would drop for its default.
        ("OTEL_TRACES_SAMPLER", "ratio"),
        ("OTEL_TRACES_SAMPLER_ARG", "10%"),
        ("OTEL_TRACES_SAMPLER_ARG", "2"),
        ("OTEL_BSP_SCHEDULE_DELAY", "5s"),
        ("OTEL_METRIC_EXPORT_INTERVAL", "60s"),
        ("OTEL_EXPORTER_OTLP_TIMEOUT", "-1"),
        ("OTEL_EXPORTER_OTLP_HEADERS", "api-key"),
    ] {
        let mut env = standalone_env(data.path());
        if var.ends_with("_PROTOCOL") || (var.starts_with("OTEL_") && !var.ends_with("ENDPOINT")) {
            env.push((
                "OTEL_EXPORTER_OTLP_ENDPOINT",
                "http://127.0.0.1:4318".to_owned(),
            ));
        }
        env.push((var, value.to_owned()));
        let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
        let failed = Chatd::try_start(bin(), &[], &env)
            .err()
            .unwrap_or_else(|| panic!("{var}={value} accepted"));
        assert_eq!(
            failed.status.and_then(|s| s.code()),
            Some(2),
            "{var}: {}",
            failed.stderr
        );
        assert!(
            failed.stderr.contains(var),
            "the error names {var}: {}",
            failed.stderr
        );
        assert!(
            !data.path().join("nats").exists(),
            "{var}: nothing may start before validation"
        );
    }
}

#[test]
fn a_second_chatd_on_the_same_data_dir_is_refused() {
    let data = tempfile::tempdir().unwrap();
    let _first = start(&standalone_env(data.path()));
    let env = standalone_env(data.path());
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let second = Chatd::try_start(bin(), &[], &env)
        .err()
        .expect("second chatd refused");
    assert!(
        second.stderr.contains("in use by another chatd"),
        "{}",
        second.stderr
    );
}

#[test]
fn every_role_runs_against_an_external_nats() {
    let server = NatsServer::start();
    for role in ["edge", "projector", "api", "all"] {
        let data = tempfile::tempdir().unwrap();
        let env = vec![
            ("CHAT_LISTEN", "127.0.0.1:0".to_owned()),
            ("CHAT_DATA_DIR", data.path().display().to_string()),
            ("NATS_URL", server.url()),
            ("CHAT_ROLE", role.to_owned()),
        ];
        let chatd = start(&env);
        assert_eq!(chatd.get("/readyz").unwrap().0, 200, "{role}");
        assert!(
            !data.path().join("nats").exists(),
            "{role}: no nats-server of its own"
        );
    }
}

/// An all-in-one chatd's environment against `server` (no nats-server of its own).
fn external_nats_env(data: &Path, server: &NatsServer) -> Vec<(&'static str, String)> {
    vec![
        ("CHAT_LISTEN", "127.0.0.1:0".to_owned()),
        ("CHAT_DATA_DIR", data.display().to_string()),
        ("NATS_URL", server.url()),
    ]
}

/// `/readyz` answers 200 until a drain begins (the contract), saying whether NATS is connected;
/// `?nats=required` answers 503 while it is not.
#[test]
fn readiness_reports_the_nats_connection_and_can_require_it() {
    let mut server = NatsServer::start();
    let data = tempfile::tempdir().unwrap();
    let chatd = start(&external_nats_env(data.path(), &server));
    let required = "/readyz?nats=required";
    assert_eq!(chatd.get(required).unwrap().0, 200);
    server.kill();
    eventually("not ready without nats", Duration::from_secs(30), || {
        chatd.get(required).unwrap().0 == 503
    });
    let (status, body) = chatd.get("/readyz").unwrap();
    assert_eq!(status, 200, "ready until a drain begins: {body}");
    assert!(body.contains(r#""nats":"disconnected""#), "{body}");
    assert_eq!(chatd.get("/healthz").unwrap().0, 200, "still alive");
    let (status, body) = chatd.get("/readyz?nats=maybe").unwrap();
    assert_eq!(status, 400, "{body}");
    server.start_again();
    eventually("ready again", Duration::from_secs(30), || {
        chatd.get(required).unwrap().0 == 200
    });
    let (_, body) = chatd.get("/readyz").unwrap();
    assert!(body.contains(r#""nats":"connected""#), "{body}");
}

#[test]
fn sigterm_while_nats_is_unreachable_still_ends_the_process() {
    let mut server = NatsServer::start();
    let data = tempfile::tempdir().unwrap();
    let mut env = external_nats_env(data.path(), &server);
    env.push(("CHAT_DRAIN_GRACE", "2s".to_owned()));
    let mut chatd = start(&env);
    server.kill();
    eventually("not ready without nats", Duration::from_secs(30), || {
        chatd.get("/readyz?nats=required").unwrap().0 == 503
    });
    chatd.signal(Signal::SIGTERM);
    // Nothing can reach NATS any more: the drain gives up on it instead of waiting for it.
    let status = chatd
        .wait_exit(Duration::from_secs(60))
        .unwrap_or_else(|| panic!("chatd still runs after SIGTERM: {}", chatd.stderr()));
    assert!(status.success(), "{status}: {}", chatd.stderr());
}

/// A store that does not answer (here: held by another writer) does not keep the process from
/// stopping: what the projector could not write is read from the log again at the next start.
#[test]
fn sigterm_while_the_store_is_locked_still_ends_the_process() {
    let server = NatsServer::start();
    let data = tempfile::tempdir().unwrap();
    let mut env = external_nats_env(data.path(), &server);
    env.push(("CHAT_DRAIN_GRACE", "2s".to_owned()));
    let mut chatd = start(&env);
    let token = dev_token(data.path(), "alice", 3600);
    let locker = rusqlite::Connection::open(data.path().join("store.db")).unwrap();
    locker.execute_batch("BEGIN IMMEDIATE").unwrap();
    // A room created: an event the projector cannot store while the lock is held.
    let (status, created) = api(
        &chatd,
        &token,
        "POST",
        "/v1/rooms",
        Some(serde_json::json!({"room": "locked", "kind": "group", "name": "L"})),
    );
    assert_eq!(status, 201, "{created}");
    chatd.signal(Signal::SIGTERM);
    let status = chatd
        .wait_exit(Duration::from_secs(40))
        .unwrap_or_else(|| panic!("chatd still runs after SIGTERM: {}", chatd.stderr()));
    assert!(status.success(), "{status}: {}", chatd.stderr());
    locker.execute_batch("ROLLBACK").unwrap();

    // Started again, it stores the room it could not store before.
    let chatd = start(&env);
    let token = dev_token(data.path(), "alice", 3600);
    let end = Instant::now() + Duration::from_secs(30);
    loop {
        let (status, rooms) = api(&chatd, &token, "GET", "/v1/rooms", None);
        assert_eq!(status, 200, "{rooms}");
        if rooms["rooms"].as_array().is_some_and(|r| r.len() == 1) {
            assert_eq!(rooms["rooms"][0]["room"], "locked", "{rooms}");
            break;
        }
        assert!(Instant::now() < end, "the room was not stored: {rooms}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn a_missing_nats_server_binary_is_a_clear_error() {
    let data = tempfile::tempdir().unwrap();
    let mut env = standalone_env(data.path());
    env.retain(|(k, _)| *k != "NATS_SERVER_BIN");
    env.push((
        "NATS_SERVER_BIN",
        PathBuf::from("/nonexistent/nats-server")
            .display()
            .to_string(),
    ));
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let failed = Chatd::try_start(bin(), &[], &env).err().expect("refused");
    assert!(
        failed.stderr.contains("/nonexistent/nats-server"),
        "{}",
        failed.stderr
    );
}

fn bearer(chatd: &Chatd, token: &str) -> (u16, serde_json::Value) {
    let auth = format!("Bearer {token}");
    let (status, body) = chat_harness::http_request(
        chatd.http_addr(),
        "GET",
        "/v1/me",
        &[("Authorization", &auth)],
        None,
    )
    .unwrap();
    (
        status,
        serde_json::from_str(&body).unwrap_or(serde_json::Value::Null),
    )
}

#[test]
fn http_requests_are_authenticated_with_bearer_tokens() {
    let data = tempfile::tempdir().unwrap();
    let chatd = start(&standalone_env(data.path()));
    let token = Command::new(bin())
        .args(["token", "alice", "--name", "Alice"])
        .env("CHAT_DATA_DIR", data.path())
        .output()
        .unwrap();
    let token = String::from_utf8(token.stdout).unwrap();
    let (status, me) = bearer(&chatd, token.trim());
    assert_eq!(status, 200, "{me}");
    assert_eq!(
        (me["user"].as_str(), me["name"].as_str()),
        (Some("alice"), Some("Alice"))
    );
    // The scheme's case does not matter (RFC 7235).
    for scheme in ["BEARER", "bearer", "BeArEr"] {
        let auth = format!("{scheme} {}", token.trim());
        let (status, _) = chat_harness::http_request(
            chatd.http_addr(),
            "GET",
            "/v1/me",
            &[("Authorization", &auth)],
            None,
        )
        .unwrap();
        assert_eq!(status, 200, "{scheme}");
    }

    // Two Authorization headers are ambiguous, whatever their order: 400.
    let auth_good = format!("Bearer {}", token.trim());
    for path in ["/v1/me", "/v1/rooms/general/presence"] {
        for (first, second) in [
            (auth_good.as_str(), "Bearer xyz"),
            ("Bearer xyz", &auth_good),
        ] {
            let (status, body) = chat_harness::http_request(
                chatd.http_addr(),
                "GET",
                path,
                &[("Authorization", first), ("Authorization", second)],
                None,
            )
            .unwrap();
            assert_eq!(status, 400, "{path}: {body}");
            assert!(
                body.contains("more than one Authorization header"),
                "{body}"
            );
        }
    }

    // No token, a forged one, an expired one, one for another audience: 401 with the contract's body.
    let (status, body) = chatd.get("/v1/me").unwrap();
    assert_eq!(status, 401);
    let body: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(body["error"]["code"], "unauthorized");
    // The edge's own routes say how to authenticate too.
    for path in ["/v1/me", "/v1/rooms/general/presence"] {
        let (status, head, _) =
            chat_harness::http_exchange(chatd.http_addr(), "GET", path, &[], None).unwrap();
        assert_eq!(status, 401, "{path}");
        assert!(
            head.to_ascii_lowercase()
                .contains("www-authenticate: bearer"),
            "{path}: {head}"
        );
    }
    let secret = std::fs::read_to_string(data.path().join("dev-secret")).unwrap();
    let secret = secret.trim().as_bytes();
    for (what, token) in [
        (
            "forged",
            mint(
                b"not the secret, but just as long as it",
                DEV_ISSUER,
                DEV_AUDIENCE,
                "alice",
                600,
            ),
        ),
        (
            "expired",
            mint(secret, DEV_ISSUER, DEV_AUDIENCE, "alice", -60),
        ),
        (
            "wrong audience",
            mint(secret, DEV_ISSUER, "someone-else", "alice", 600),
        ),
        (
            "wrong issuer",
            mint(secret, "evil", DEV_AUDIENCE, "alice", 600),
        ),
        ("garbage", "not.a.token".to_owned()),
    ] {
        let (status, body) = bearer(&chatd, &token);
        assert_eq!(
            (status, body["error"]["code"].as_str()),
            (401, Some("unauthorized")),
            "{what}: {body}"
        );
    }
}

fn auth_keys(name: &str) -> String {
    chat_harness::workspace_root()
        .join("services/auth/tests/keys")
        .join(name)
        .display()
        .to_string()
}

#[test]
fn configured_public_keys_replace_the_development_secret() {
    let data = tempfile::tempdir().unwrap();
    let mut env = standalone_env(data.path());
    env.push(("CHAT_JWT_PUBLIC_KEYS", auth_keys("jwks.json")));
    env.push(("CHAT_JWT_ISSUER", "https://idp.test/".to_owned()));
    env.push(("CHAT_JWT_AUDIENCE", "chat".to_owned()));
    let chatd = start(&env);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let claims = serde_json::json!({ "sub": "bob", "iss": "https://idp.test/", "aud": "chat", "exp": now + 600 });
    let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::RS256);
    header.kid = Some("rsa-1".to_owned());
    let key =
        jsonwebtoken::EncodingKey::from_rsa_pem(&std::fs::read(auth_keys("rsa.key")).unwrap())
            .unwrap();
    let token = jsonwebtoken::encode(&header, &claims, &key).unwrap();
    let (status, me) = bearer(&chatd, &token);
    assert_eq!((status, me["user"].as_str()), (200, Some("bob")));
    assert!(
        !data.path().join("dev-secret").exists(),
        "no development secret when keys are configured"
    );
}

/// A token signed with `key` (a file of the auth tests' keys) for `sub`.
fn rs256_token(key: &str, sub: &str) -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let claims = serde_json::json!({ "sub": sub, "iss": "https://idp.test/", "aud": "chat", "exp": now + 600 });
    let key =
        jsonwebtoken::EncodingKey::from_rsa_pem(&std::fs::read(auth_keys(key)).unwrap()).unwrap();
    let header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::RS256);
    jsonwebtoken::encode(&header, &claims, &key).unwrap()
}

/// Key rotation without a restart: SIGHUP reads CHAT_JWT_PUBLIC_KEYS again. Tokens of the new
/// key are accepted from then on, those of the old one refused, and a session opened before
/// stays open. A file that does not read leaves the keys as they were.
#[test]
fn sighup_reloads_the_public_keys_file() {
    let data = tempfile::tempdir().unwrap();
    let file = data.path().join("keys.pem");
    std::fs::copy(auth_keys("rsa.pub.pem"), &file).unwrap();
    let mut env = standalone_env(data.path());
    env.push(("CHAT_JWT_PUBLIC_KEYS", file.display().to_string()));
    env.push(("CHAT_JWT_ISSUER", "https://idp.test/".to_owned()));
    env.push(("CHAT_JWT_AUDIENCE", "chat".to_owned()));
    let chatd = start(&env);
    let (old, new) = (
        rs256_token("rsa.key", "bob"),
        rs256_token("other-rsa.key", "bob"),
    );
    assert_eq!(bearer(&chatd, &old).0, 200);
    assert_eq!(bearer(&chatd, &new).0, 401);
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let mut session = runtime.block_on(common::client::Client::connect(&chatd.ws_url(), &old));

    std::fs::copy(auth_keys("other-rsa.pub.pem"), &file).unwrap();
    chatd.signal(Signal::SIGHUP);
    eventually("the new key", Duration::from_secs(30), || {
        bearer(&chatd, &new).0 == 200
    });
    assert_eq!(bearer(&chatd, &old).0, 401, "the old key is gone");
    let pong = runtime.block_on(session.request(serde_json::json!({"type": "ping"})));
    assert_eq!(pong["type"], "pong", "a session opened before stays");

    std::fs::write(&file, "not a key").unwrap();
    chatd.signal(Signal::SIGHUP);
    eventually("the failed reload logged", Duration::from_secs(30), || {
        chatd.stderr().contains("token public keys not reloaded")
    });
    assert_eq!(bearer(&chatd, &new).0, 200, "the keys before stay");
}

/// Secret rotation: tokens signed with CHAT_JWT_HS256_SECRET_PREVIOUS are accepted beside the
/// new secret's, so a rolling restart onto a new secret refuses no token already out.
#[test]
fn the_previous_hs256_secret_is_accepted_beside_the_new_one() {
    let data = tempfile::tempdir().unwrap();
    let (new, previous) = ("n".repeat(40), "p".repeat(40));
    let mut env = standalone_env(data.path());
    env.push(("CHAT_JWT_HS256_SECRET", new.clone()));
    env.push(("CHAT_JWT_HS256_SECRET_PREVIOUS", previous.clone()));
    env.push(("CHAT_JWT_ISSUER", "https://idp.test/".to_owned()));
    env.push(("CHAT_JWT_AUDIENCE", "chat".to_owned()));
    let chatd = start(&env);
    for (secret, sub) in [(&new, "nina"), (&previous, "pete")] {
        let token = mint(secret.as_bytes(), "https://idp.test/", "chat", sub, 600);
        let (status, me) = bearer(&chatd, &token);
        assert_eq!((status, me["user"].as_str()), (200, Some(sub)));
    }
    let other = mint(&[b'x'; 40], "https://idp.test/", "chat", "eve", 600);
    assert_eq!(bearer(&chatd, &other).0, 401);
}

#[test]
fn an_unusable_key_file_is_refused_before_anything_starts() {
    let data = tempfile::tempdir().unwrap();
    let junk = data.path().join("keys.pem");
    std::fs::write(
        &junk,
        "-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----\n",
    )
    .unwrap();
    let mut env = standalone_env(data.path());
    env.push(("CHAT_JWT_PUBLIC_KEYS", junk.display().to_string()));
    env.push(("CHAT_JWT_ISSUER", "i".to_owned()));
    env.push(("CHAT_JWT_AUDIENCE", "a".to_owned()));
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let failed = Chatd::try_start(bin(), &[], &env).err().expect("refused");
    assert_eq!(
        failed.status.and_then(|s| s.code()),
        Some(2),
        "{}",
        failed.stderr
    );
    assert!(
        failed.stderr.contains("CHAT_JWT_PUBLIC_KEYS"),
        "{}",
        failed.stderr
    );
    assert!(!data.path().join("nats").exists());
}

/// A chatd started against `url`, where no NATS answers yet, once it says it is waiting
/// (its stderr in `log`): the process and the address it listens on.
fn waiting_for_nats(data: &Path, url: &str) -> (std::process::Child, PathBuf, String) {
    let log = data.join("stderr");
    let child = Command::new(bin())
        .env("CHAT_LISTEN", "127.0.0.1:0")
        .env("CHAT_DATA_DIR", data)
        .env("NATS_URL", url)
        .env("CHAT_LOG", "info")
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    eventually("the wait for nats", Duration::from_secs(30), || {
        std::fs::read_to_string(&log).is_ok_and(|l| l.contains("waiting for nats"))
    });
    let stderr = std::fs::read_to_string(&log).unwrap();
    let listen = stderr
        .split_whitespace()
        .find_map(|word| word.strip_prefix("listen="))
        .unwrap_or_else(|| panic!("no listen address in: {stderr}"))
        .to_owned();
    (child, log, listen)
}

/// SIGTERM to `child`, then its exit status (within 30 s).
fn terminate(mut child: std::process::Child) -> std::process::ExitStatus {
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        Signal::SIGTERM,
    )
    .unwrap();
    eventually("chatd to exit", Duration::from_secs(30), || {
        child.try_wait().unwrap().is_some()
    });
    child.wait().unwrap()
}

#[test]
fn while_waiting_for_nats_at_start_only_health_answers_and_sigterm_ends_the_process() {
    // NATS never answers: chatd waits for it (up to a minute) before it serves. A SIGTERM in
    // that wait stops it then, rather than when the wait is over.
    let data = tempfile::tempdir().unwrap();
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("nats://{}", closed.local_addr().unwrap());
    drop(closed);
    let (child, log, listen) = waiting_for_nats(data.path(), &url);
    // Meanwhile the listener answers: alive, not ready, and 503 for the rest.
    let get = |path: &str| chat_harness::http_request(&listen, "GET", path, &[], None).unwrap();
    assert_eq!(get("/healthz"), (200, r#"{"status":"ok"}"#.to_owned()));
    for path in ["/readyz", "/v1/me", "/v1/ws"] {
        let (status, body) = get(path);
        assert_eq!(status, 503, "{path}: {body}");
        assert!(body.contains(r#""code":"unavailable""#), "{path}: {body}");
        assert!(body.contains("waiting for nats"), "{path}: {body}");
    }
    let status = terminate(child);
    assert!(
        status.success(),
        "{status}: {}",
        std::fs::read_to_string(&log).unwrap_or_default()
    );
}

#[test]
fn a_process_started_before_nats_serves_on_the_same_socket_once_nats_comes() {
    let mut server = NatsServer::start();
    server.kill();
    let data = tempfile::tempdir().unwrap();
    let (child, log, listen) = waiting_for_nats(data.path(), &server.url());
    let get = |path: &str| chat_harness::http_request(&listen, "GET", path, &[], None);
    assert_eq!(get("/readyz").map(|(status, _)| status), Some(503));
    server.start_again();
    // The same address, now served by the server proper.
    eventually("ready once nats is up", Duration::from_secs(30), || {
        get("/readyz").is_some_and(|(status, _)| status == 200)
    });
    let (status, body) = get("/v1/me").unwrap();
    assert_eq!(status, 401, "{body}");
    let status = terminate(child);
    assert!(
        status.success(),
        "{}",
        std::fs::read_to_string(&log).unwrap()
    );
}

/// A distribution's nats-server older than 2.10 (Debian 12 ships 2.9) first on the PATH is passed
/// over for a newer one further on; named in `NATS_SERVER_BIN`, or the only one, it is a
/// configuration error (exit 2, which the systemd unit does not restart), not a failure.
#[test]
fn an_old_nats_server_is_passed_over_or_refused_as_configuration() {
    use std::os::unix::fs::PermissionsExt;
    let dirs = tempfile::tempdir().unwrap();
    let old_dir = dirs.path().join("old");
    let new_dir = dirs.path().join("new");
    std::fs::create_dir_all(&old_dir).unwrap();
    std::fs::create_dir_all(&new_dir).unwrap();
    let old = old_dir.join("nats-server");
    std::fs::write(&old, "#!/bin/sh\necho 'nats-server: v2.9.10'\n").unwrap();
    std::fs::set_permissions(&old, std::fs::Permissions::from_mode(0o755)).unwrap();
    std::os::unix::fs::symlink(nats_bin(), new_dir.join("nats-server")).unwrap();
    let system_path = std::env::var("PATH").unwrap_or_default();

    // Named: refused, exit 2, saying which binary and what is needed.
    let data = tempfile::tempdir().unwrap();
    let mut env = standalone_env(data.path());
    env.retain(|(k, _)| *k != "NATS_SERVER_BIN");
    env.push(("NATS_SERVER_BIN", old.display().to_string()));
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let refused = Chatd::try_start(bin(), &[], &env)
        .err()
        .expect("chatd refuses nats-server 2.9");
    assert_eq!(
        refused.status.and_then(|s| s.code()),
        Some(2),
        "{}",
        refused.stderr
    );
    assert!(
        refused.stderr.contains("is version 2.9") && refused.stderr.contains("2.10 or newer"),
        "{}",
        refused.stderr
    );

    // Found on the PATH behind a newer one: the newer one serves.
    let data = tempfile::tempdir().unwrap();
    let mut env = standalone_env(data.path());
    env.retain(|(k, _)| *k != "NATS_SERVER_BIN");
    let path = format!("{}:{}:{system_path}", old_dir.display(), new_dir.display());
    env.push(("NATS_SERVER_BIN", String::new()));
    env.push(("PATH", path));
    let chatd = start(&env);
    assert_eq!(chatd.get("/readyz").map(|(status, _)| status), Some(200));
}
