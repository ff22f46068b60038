//! Development tokens: with no JWT settings, `chatd run` keeps a random HS256 secret in the data
//! directory and `chatd token USER` mints tokens with it, so a newcomer can connect at once.

use std::fs;
use std::io::{ErrorKind, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use chat_model::UserId;
use rand::RngCore;
use serde::{Deserialize, Serialize};

/// Issuer and audience of development tokens.
pub const DEV_ISSUER: &str = "chat-dev";
pub const DEV_AUDIENCE: &str = "chat-dev";
pub const SECRET_FILE: &str = "dev-secret";

/// The claims a token carries.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Claims {
    /// The user id.
    pub sub: String,
    pub iss: String,
    pub aud: String,
    /// Expiry, seconds since the epoch.
    pub exp: u64,
    /// Issued at, seconds since the epoch.
    pub iat: u64,
    /// Display name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
}

/// The development secret of this data directory, created (readable by its owner only) if
/// missing.
pub fn dev_secret(data_dir: &Path) -> anyhow::Result<String> {
    let path = data_dir.join(SECRET_FILE);
    fs::create_dir_all(data_dir).with_context(|| format!("create {}", data_dir.display()))?;
    let mut bytes = [0u8; 32];
    rand::rng().fill_bytes(&mut bytes);
    let fresh = hex::encode(bytes);
    match fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&path)
    {
        Ok(mut file) => {
            file.write_all(fresh.as_bytes())
                .with_context(|| format!("write {}", path.display()))?;
            tracing::info!(path = %path.display(), "created a development token secret");
            Ok(fresh)
        }
        Err(e) if e.kind() == ErrorKind::AlreadyExists => {
            let secret =
                fs::read_to_string(&path).with_context(|| format!("read {}", path.display()))?;
            let secret = secret.trim().to_owned();
            anyhow::ensure!(
                secret.len() >= 32,
                "{} is too short to be a secret",
                path.display()
            );
            Ok(secret)
        }
        Err(e) => Err(e).with_context(|| format!("create {}", path.display())),
    }
}

/// Mints an HS256 token for `user`.
pub fn mint_hs256(
    secret: &[u8],
    issuer: &str,
    audience: &str,
    user: &UserId,
    name: Option<&str>,
    ttl: Duration,
) -> anyhow::Result<String> {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .context("clock before 1970")?
        .as_secs();
    let claims = Claims {
        sub: user.to_string(),
        iss: issuer.to_owned(),
        aud: audience.to_owned(),
        exp: now + ttl.as_secs(),
        iat: now,
        name: name.map(str::to_owned),
    };
    let header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256);
    jsonwebtoken::encode(
        &header,
        &claims,
        &jsonwebtoken::EncodingKey::from_secret(secret),
    )
    .context("sign token")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_secret_is_created_once_and_private() {
        let dir = tempfile::tempdir().unwrap();
        let a = dev_secret(dir.path()).unwrap();
        let b = dev_secret(dir.path()).unwrap();
        assert_eq!(a, b);
        assert_eq!(a.len(), 64);
        let mode = fs::metadata(dir.path().join(SECRET_FILE))
            .unwrap()
            .permissions();
        assert_eq!(
            std::os::unix::fs::PermissionsExt::mode(&mode) & 0o777,
            0o600
        );
    }

    #[test]
    fn minted_tokens_verify_with_the_secret_only() {
        let user = UserId::parse("alice@example.com").unwrap();
        let token = mint_hs256(
            b"0123456789abcdef0123456789abcdef",
            DEV_ISSUER,
            DEV_AUDIENCE,
            &user,
            Some("Alice"),
            Duration::from_secs(60),
        )
        .unwrap();
        let mut validation = jsonwebtoken::Validation::new(jsonwebtoken::Algorithm::HS256);
        validation.set_issuer(&[DEV_ISSUER]);
        validation.set_audience(&[DEV_AUDIENCE]);
        let decoded = jsonwebtoken::decode::<Claims>(
            &token,
            &jsonwebtoken::DecodingKey::from_secret(b"0123456789abcdef0123456789abcdef"),
            &validation,
        )
        .unwrap();
        assert_eq!(decoded.claims.sub, "alice@example.com");
        assert_eq!(decoded.claims.name.as_deref(), Some("Alice"));
        let wrong = jsonwebtoken::decode::<Claims>(
            &token,
            &jsonwebtoken::DecodingKey::from_secret(b"another secret of thirty-two by"),
            &validation,
        );
        assert!(wrong.is_err());
    }
}
