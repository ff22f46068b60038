//! Helpers shared by the binary's end-to-end tests.
#![allow(dead_code)]

pub mod client;
pub mod server;

use std::path::Path;

use chat_harness::{nats_server_bin, Chatd};

pub fn bin() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_chatd"))
}

pub fn nats_bin() -> String {
    nats_server_bin().display().to_string()
}

/// Settings for a chatd that starts its own nats-server (fast sync: this is a test; a send
/// rate no test reaches unless it means to: the rate-limit tests set their own).
pub fn standalone_env(data: &Path) -> Vec<(&'static str, String)> {
    vec![
        ("CHAT_LISTEN", "127.0.0.1:0".to_owned()),
        ("CHAT_DATA_DIR", data.display().to_string()),
        ("NATS_SERVER_BIN", nats_bin()),
        ("CHAT_NATS_SYNC", "default".to_owned()),
        ("CHAT_DRAIN_GRACE", "2s".to_owned()),
        ("CHAT_SEND_RATE", "1000/1000".to_owned()),
    ]
}

pub fn start(env: &[(&'static str, String)]) -> Chatd {
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    Chatd::start(bin(), &[], &env)
}

/// An HS256 token with `exp` = now + `exp_offset` seconds.
pub fn mint(secret: &[u8], iss: &str, aud: &str, sub: &str, exp_offset: i64) -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    let claims = serde_json::json!({ "sub": sub, "iss": iss, "aud": aud, "exp": now + exp_offset });
    jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &claims,
        &jsonwebtoken::EncodingKey::from_secret(secret),
    )
    .unwrap()
}

/// A development token for `user`, signed with the data dir's secret (chatd creates it at start).
pub fn dev_token(data: &Path, user: &str, exp_offset: i64) -> String {
    let secret = std::fs::read_to_string(data.join("dev-secret")).expect("dev secret");
    mint(
        secret.trim().as_bytes(),
        chatd::devauth::DEV_ISSUER,
        chatd::devauth::DEV_AUDIENCE,
        user,
        exp_offset,
    )
}

/// An HTTP request with `user`'s bearer token; `(status, JSON body)`.
pub fn api(
    chatd: &Chatd,
    token: &str,
    method: &str,
    path: &str,
    body: Option<serde_json::Value>,
) -> (u16, serde_json::Value) {
    let auth = format!("Bearer {token}");
    let body = body.map(|b| b.to_string());
    let (status, text) = chat_harness::http_request(
        chatd.http_addr(),
        method,
        path,
        &[("Authorization", auth.as_str())],
        body.as_deref(),
    )
    .expect("http answer");
    let json = serde_json::from_str(&text).unwrap_or(serde_json::Value::Null);
    (status, json)
}

/// The HS256 secret shared by the processes of a multi-edge test.
pub const SHARED_SECRET: &str = "a-shared-secret-of-at-least-32-bytes!";

/// A chatd of `role` on `nats` with its own data dir, verifying tokens with [`SHARED_SECRET`]
/// (issuer `test-issuer`, audience `chat`); `extra` settings last (they win).
pub fn node(
    nats: &chat_harness::NatsServer,
    data: &Path,
    role: &str,
    extra: &[(&'static str, &str)],
) -> Chatd {
    let mut env = vec![
        ("CHAT_LISTEN", "127.0.0.1:0".to_owned()),
        ("CHAT_DATA_DIR", data.display().to_string()),
        ("NATS_URL", nats.url()),
        ("CHAT_ROLE", role.to_owned()),
        ("CHAT_JWT_HS256_SECRET", SHARED_SECRET.to_owned()),
        ("CHAT_JWT_ISSUER", "test-issuer".to_owned()),
        ("CHAT_JWT_AUDIENCE", "chat".to_owned()),
        ("CHAT_DRAIN_GRACE", "2s".to_owned()),
    ];
    env.extend(extra.iter().map(|(k, v)| (*k, v.to_string())));
    start(&env)
}

/// A token for `user` that [`node`]s accept.
pub fn token(user: &str) -> String {
    mint(SHARED_SECRET.as_bytes(), "test-issuer", "chat", user, 3600)
}
