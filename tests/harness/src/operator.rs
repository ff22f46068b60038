//! nats-server in operator mode (decentralized JWT authentication) for tests: an operator, its
//! system account and an account with JetStream, signed here with nkeys, and user credentials
//! files such as `nsc` writes.

use std::path::PathBuf;

use base64::Engine as _;
use serde_json::json;

/// An operator, a system account and the account `chat`; [`OperatorMode::config`] is what
/// [`crate::NatsServer::start_with_config`] takes.
pub struct OperatorMode {
    account: nkeys::KeyPair,
    config: String,
    dir: tempfile::TempDir,
}

/// A JWT as nats-server reads them: `nats` claims about `subject`, signed by `issuer`.
fn jwt(issuer: &nkeys::KeyPair, subject: &str, name: &str, nats: serde_json::Value) -> String {
    let b64 = |bytes: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes);
    let header = b64(br#"{"typ":"JWT","alg":"ed25519-nkey"}"#);
    let claims = json!({
        "jti": format!("{:032X}", unique_id()),
        "iat": 1_700_000_000,
        "iss": issuer.public_key(),
        "sub": subject,
        "name": name,
        "nats": nats,
    });
    let signed = format!("{header}.{}", b64(claims.to_string().as_bytes()));
    let signature = issuer.sign(signed.as_bytes()).expect("sign");
    format!("{signed}.{}", b64(&signature))
}

/// A unique id: the JWT id only has to differ between tokens.
fn unique_id() -> u128 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(1);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    nanos ^ u128::from(NEXT.fetch_add(1, Ordering::Relaxed)) << 96
}

impl OperatorMode {
    pub fn new() -> OperatorMode {
        let (operator, system, account) = (
            nkeys::KeyPair::new_operator(),
            nkeys::KeyPair::new_account(),
            nkeys::KeyPair::new_account(),
        );
        let dir = tempfile::Builder::new()
            .prefix("nats-operator-")
            .tempdir()
            .expect("temp dir");
        let operator_jwt = jwt(
            &operator,
            &operator.public_key(),
            "operator",
            json!({"type": "operator", "version": 2, "system_account": system.public_key()}),
        );
        let system_jwt = jwt(
            &operator,
            &system.public_key(),
            "SYS",
            json!({"type": "account", "version": 2}),
        );
        let unlimited = json!({
            "subs": -1, "data": -1, "payload": -1, "imports": -1, "exports": -1,
            "wildcards": true, "conn": -1, "leaf": -1, "mem_storage": -1, "disk_storage": -1,
            "streams": -1, "consumer": -1,
        });
        let account_jwt = jwt(
            &operator,
            &account.public_key(),
            "chat",
            json!({"type": "account", "version": 2, "limits": unlimited}),
        );
        let operator_file = dir.path().join("operator.jwt");
        std::fs::write(&operator_file, operator_jwt).expect("write operator.jwt");
        let config = format!(
            "operator: \"{}\"\nsystem_account: {sys}\nresolver: MEMORY\n\
             resolver_preload: {{ {sys}: \"{system_jwt}\", {acc}: \"{account_jwt}\" }}",
            operator_file.display(),
            sys = system.public_key(),
            acc = account.public_key(),
        );
        OperatorMode {
            account,
            config,
            dir,
        }
    }

    /// The server's top-level settings.
    pub fn config(&self) -> &str {
        &self.config
    }

    /// A credentials file of a new user of the account, and the user's seed.
    pub fn creds(&self, name: &str) -> (PathBuf, String) {
        self.creds_signed_by(&self.account, name)
    }

    /// A credentials file of a user no account of the server signed (it signed itself).
    pub fn forged_creds(&self, name: &str) -> (PathBuf, String) {
        self.creds_signed_by(&nkeys::KeyPair::new_account(), name)
    }

    fn creds_signed_by(&self, account: &nkeys::KeyPair, name: &str) -> (PathBuf, String) {
        let user = nkeys::KeyPair::new_user();
        let seed = user.seed().expect("seed");
        let user_jwt = jwt(
            account,
            &user.public_key(),
            name,
            json!({"type": "user", "version": 2, "pub": {}, "sub": {}, "subs": -1, "data": -1, "payload": -1}),
        );
        let path = self.dir.path().join(format!("{name}.creds"));
        std::fs::write(
            &path,
            format!(
                "-----BEGIN NATS USER JWT-----\n{user_jwt}\n------END NATS USER JWT------\n\n\
                 ************************* IMPORTANT *************************\n\
                 NKEY Seed printed below can be used to sign and prove identity.\n\n\
                 -----BEGIN USER NKEY SEED-----\n{seed}\n------END USER NKEY SEED------\n"
            ),
        )
        .expect("write creds");
        (path, seed)
    }
}

impl Default for OperatorMode {
    fn default() -> Self {
        OperatorMode::new()
    }
}
