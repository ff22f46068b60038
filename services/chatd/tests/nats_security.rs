//! chatd against a NATS that requires credentials or TLS: every way to authenticate the `nats`
//! CLI knows, a private CA with client certificates, and what happens when they are wrong.
//! Secrets never reach the logs.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use chat_harness::{Chatd, NatsServer};
use common::*;
use serde_json::json;

/// chatd (all roles) on `nats` with `extra` settings; it must get ready, and take a write that
/// goes through JetStream (creating a room appends to a new stream).
fn serves(
    nats: &NatsServer,
    url: &str,
    extra: &[(&'static str, &str)],
) -> (Chatd, tempfile::TempDir) {
    let data = tempfile::tempdir().unwrap();
    let mut settings = vec![("NATS_URL", url)];
    settings.extend_from_slice(extra);
    let chatd = node(nats, data.path(), "all", &settings);
    let room = format!("secured-{}", uuid::Uuid::new_v4().simple());
    let (status, body) = api(
        &chatd,
        &token("alice"),
        "POST",
        "/v1/rooms",
        Some(json!({"room": room, "kind": "group", "members": ["bob"]})),
    );
    assert_eq!(status, 201, "{body}\n{}", chatd.stderr());
    (chatd, data)
}

/// chatd (all roles) on `nats` with `extra` settings must exit by itself, soon; its stderr.
fn refused(nats: &NatsServer, url: &str, extra: &[(&'static str, &str)]) -> String {
    let data = tempfile::tempdir().unwrap();
    let mut env = vec![
        ("CHAT_LISTEN", "127.0.0.1:0".to_owned()),
        ("CHAT_DATA_DIR", data.path().display().to_string()),
        ("NATS_URL", url.to_owned()),
        ("CHAT_JWT_HS256_SECRET", SHARED_SECRET.to_owned()),
        ("CHAT_JWT_ISSUER", "test-issuer".to_owned()),
        ("CHAT_JWT_AUDIENCE", "chat".to_owned()),
    ];
    env.extend(extra.iter().map(|(k, v)| (*k, v.to_string())));
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let started = Instant::now();
    let failed = match Chatd::try_start(bin(), &[], &env) {
        Ok(chatd) => panic!("chatd got ready on {}:\n{}", nats.url(), chatd.stderr()),
        Err(failed) => failed,
    };
    assert_eq!(
        failed.status.and_then(|s| s.code()),
        Some(1),
        "{}",
        failed.stderr
    );
    // Not the 60 s chatd waits for a NATS that does not answer yet.
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "took {:?}",
        started.elapsed()
    );
    failed.stderr
}

/// `chatd log verify` with `env`: (exit code, stderr).
fn verify(url: &str, env: &[(&str, &str)]) -> (i32, String) {
    let data = tempfile::tempdir().unwrap();
    let out = Command::new(bin())
        .args(["log", "verify"])
        .env("NATS_URL", url)
        .env("CHAT_DATA_DIR", data.path())
        .envs(env.iter().copied())
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn a_user_and_password_authenticate_from_the_url_or_the_environment_and_stay_secret() {
    let nats =
        NatsServer::start_with_config("authorization { user: chat, password: \"pa$$:w@rd\" }");
    let port = nats.port();
    // In the URL, percent-encoded as URLs have it.
    let (chatd, _data) = serves(
        &nats,
        &format!("nats://chat:pa%24%24%3Aw%40rd@127.0.0.1:{port}"),
        &[],
    );
    let logs = chatd.stderr();
    assert!(!logs.contains("w%40rd") && !logs.contains("w@rd"), "{logs}");
    assert!(logs.contains(&format!("nats://127.0.0.1:{port}")), "{logs}");
    drop(chatd);
    serves(
        &nats,
        &nats.url(),
        &[("NATS_USER", "chat"), ("NATS_PASSWORD", "pa$$:w@rd")],
    );

    // A wrong password, or none: a clear error at once, not a wait for a NATS that answers.
    let logs = refused(
        &nats,
        &format!("nats://chat:guess-again@127.0.0.1:{port}"),
        &[],
    );
    assert!(
        logs.contains("refused chatd's credentials (user and password)"),
        "{logs}"
    );
    assert!(!logs.contains("guess-again"), "{logs}");
    let logs = refused(&nats, &nats.url(), &[]);
    assert!(
        logs.contains("refused chatd's credentials (none)"),
        "{logs}"
    );

    // Operator commands take the same settings.
    let (code, err) = verify(
        &nats.url(),
        &[("NATS_USER", "chat"), ("NATS_PASSWORD", "pa$$:w@rd")],
    );
    assert_eq!(code, 0, "{err}");
    let (code, err) = verify(
        &nats.url(),
        &[("NATS_USER", "chat"), ("NATS_PASSWORD", "no")],
    );
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("authorization violation"), "{err}");
}

#[test]
fn a_token_or_an_nkey_authenticates() {
    let nats = NatsServer::start_with_config("authorization { token: \"t0ken-of-chat\" }");
    serves(&nats, &nats.url(), &[("NATS_TOKEN", "t0ken-of-chat")]);
    let in_url = format!("nats://t0ken-of-chat@127.0.0.1:{}", nats.port());
    serves(&nats, &in_url, &[]);
    let logs = refused(&nats, &nats.url(), &[("NATS_TOKEN", "not-it")]);
    assert!(logs.contains("(token)"), "{logs}");

    let key = nkeys::KeyPair::new_user();
    let nats = NatsServer::start_with_config(&format!(
        "authorization {{ users: [ {{ nkey: {} }} ] }}",
        key.public_key()
    ));
    let dir = tempfile::tempdir().unwrap();
    let seed_file = dir.path().join("chat.nk");
    std::fs::write(&seed_file, format!("{}\n", key.seed().unwrap())).unwrap();
    let (chatd, _data) = serves(
        &nats,
        &nats.url(),
        &[("NATS_NKEY", seed_file.to_str().unwrap())],
    );
    assert!(!chatd.stderr().contains(&key.seed().unwrap()));
    let other = dir.path().join("other.nk");
    let stranger = nkeys::KeyPair::new_user();
    std::fs::write(&other, stranger.seed().unwrap()).unwrap();
    let logs = refused(
        &nats,
        &nats.url(),
        &[("NATS_NKEY", other.to_str().unwrap())],
    );
    assert!(logs.contains("(nkey)"), "{logs}");
}

/// A CA, and a server and a client certificate it signed, as PEM files in `dir`.
fn certificates(dir: &Path) {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair};
    let ca_key = KeyPair::generate().unwrap();
    let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca = ca.self_signed(&ca_key).unwrap();
    std::fs::write(dir.join("ca.pem"), ca.pem()).unwrap();
    for (name, names) in [
        (
            "server",
            vec!["127.0.0.1".to_owned(), "localhost".to_owned()],
        ),
        ("client", vec!["chatd".to_owned()]),
    ] {
        let key = KeyPair::generate().unwrap();
        let cert = CertificateParams::new(names)
            .unwrap()
            .signed_by(&key, &ca, &ca_key)
            .unwrap();
        std::fs::write(dir.join(format!("{name}.pem")), cert.pem()).unwrap();
        std::fs::write(dir.join(format!("{name}-key.pem")), key.serialize_pem()).unwrap();
    }
}

#[test]
fn tls_with_a_private_ca_and_a_client_certificate() {
    let dir = tempfile::tempdir().unwrap();
    certificates(dir.path());
    let file = |name: &str| dir.path().join(name).display().to_string();
    // The server verifies its clients' certificates.
    let nats = NatsServer::start_with_config(&format!(
        "tls {{ cert_file: \"{}\", key_file: \"{}\", ca_file: \"{}\", verify: true }}",
        file("server.pem"),
        file("server-key.pem"),
        file("ca.pem")
    ));
    let (ca, cert, key) = (file("ca.pem"), file("client.pem"), file("client-key.pem"));
    let trusted = [
        ("NATS_CA", ca.as_str()),
        ("NATS_CERT", cert.as_str()),
        ("NATS_KEY", key.as_str()),
    ];
    serves(&nats, &nats.url(), &trusted);
    let tls_url = format!("tls://127.0.0.1:{}", nats.port());
    let (code, err) = verify(&tls_url, &trusted);
    assert_eq!(code, 0, "{err}");

    // The server's certificate is checked against NATS_CA, not taken on trust: without it the
    // system's roots do not know the CA.
    let (code, err) = verify(
        &tls_url,
        &[("NATS_CERT", cert.as_str()), ("NATS_KEY", key.as_str())],
    );
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("UnknownIssuer"), "{err}");
    // And the server wants a client certificate.
    let (code, err) = verify(&tls_url, &[("NATS_CA", ca.as_str())]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("CertificateRequired"), "{err}");
}

#[test]
fn a_credentials_file_authenticates_against_an_operator_mode_server() {
    let operator = chat_harness::OperatorMode::new();
    let nats = NatsServer::start_with_config(operator.config());
    let (creds, seed) = operator.creds("chatd");
    let creds = creds.to_str().unwrap();
    let (chatd, _data) = serves(&nats, &nats.url(), &[("NATS_CREDS", creds)]);
    assert!(!chatd.stderr().contains(&seed));
    let (code, err) = verify(&nats.url(), &[("NATS_CREDS", creds)]);
    assert_eq!(code, 0, "{err}");
    // A user the account did not sign.
    let (forged, _) = operator.forged_creds("stranger");
    let logs = refused(
        &nats,
        &nats.url(),
        &[("NATS_CREDS", forged.to_str().unwrap())],
    );
    assert!(logs.contains("(credentials file)"), "{logs}");
}
