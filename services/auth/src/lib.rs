//! Token verification for every entry point (WebSocket upgrade, first frame, HTTP `Bearer`).
//!
//! Accepted: HS256 with a shared secret, and RS256 / ES256 / EdDSA with public keys from a PEM
//! file (one or more `PUBLIC KEY` blocks) or a JWKS file. `exp`, `iss`, `aud` and `sub` are
//! required and checked, `nbf` is checked when present, with 5 s of clock leeway; a token whose
//! `alg` has no configured key is refused before any signature check (so `none`, and HS256
//! against a public key, never verify). `sub` must be a valid user id.
#![forbid(unsafe_code)]

use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use base64::Engine;
use chat_model::UserId;
use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::jwk::{
    AlgorithmParameters, EllipticCurve, JwkSet, KeyAlgorithm, KeyOperations, OctetKeyPairType,
    PublicKeyUse,
};
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::Deserialize;

/// Clock leeway for `exp` and `nbf`, in seconds (the contract allows at most 5).
pub const LEEWAY_SECS: u64 = 5;
/// The shortest HS256 secret accepted, in bytes.
pub const MIN_SECRET_BYTES: usize = 32;

/// Who a verified token speaks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    pub user: UserId,
    /// The optional `name` claim (display name).
    pub name: Option<String>,
    /// `exp`, whole seconds since the Unix epoch (a fraction cut off).
    pub expires_at: u64,
    /// `exp` in milliseconds, fraction kept.
    expires_at_ms: u64,
}

impl Identity {
    /// Seconds until the token expires (0 if it already has).
    pub fn seconds_left(&self) -> u64 {
        self.expires_at.saturating_sub(now_secs())
    }

    /// How long until verification would refuse the token: expiry plus the clock leeway. A
    /// session authenticated by it ends then.
    pub fn time_accepted(&self) -> std::time::Duration {
        // At most a century: a deadline that far is as good as none, and stays one a timer
        // can hold.
        const CENTURY_MS: u64 = 100 * 365 * 24 * 3600 * 1000;
        let until = self.expires_at_ms.saturating_add(LEEWAY_SECS * 1000);
        std::time::Duration::from_millis(until.saturating_sub(now_ms()).min(CENTURY_MS))
    }
}

/// Why a token was refused. The messages are safe to show to the client.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    #[error("token is malformed")]
    Malformed,
    #[error("token algorithm {0:?} is not accepted")]
    Algorithm(String),
    #[error("no key matches the token")]
    UnknownKey,
    #[error("token signature is invalid")]
    Signature,
    #[error("token has expired")]
    Expired,
    #[error("token is not valid yet")]
    NotYetValid,
    #[error("token issuer is not accepted")]
    Issuer,
    #[error("token audience is not accepted")]
    Audience,
    #[error("token lacks the {0:?} claim")]
    MissingClaim(String),
    #[error("token subject is not a valid user id")]
    Subject,
    #[error("token header lists critical extensions (crit), none of which this server supports")]
    Critical,
}

/// Why the configured keys cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("read {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {reason}")]
    Invalid { path: PathBuf, reason: String },
    #[error("{path}: no usable RS256, ES256 or EdDSA public key")]
    Empty { path: PathBuf },
    #[error("HS256 secret must be at least {MIN_SECRET_BYTES} bytes")]
    ShortSecret,
}

/// One verification key.
#[derive(Clone)]
struct Key {
    /// `kid` from a JWKS, matched against the token header's.
    kid: Option<String>,
    alg: Algorithm,
    key: DecodingKey,
}

/// The token of an `Authorization` header's value `Bearer <token>`; the scheme's case does
/// not matter (RFC 7235).
pub fn bearer_token(value: &str) -> Option<&str> {
    let (scheme, token) = value.trim().split_once(' ')?;
    let token = token.trim();
    (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then_some(token)
}

/// The token of a request's `Authorization` header values (`Bearer <token>`): `Ok(None)` when
/// there is none usable, `Err` when there is more than one header (an ambiguous request is
/// refused rather than resolved by header order).
pub fn request_bearer<'a>(
    mut values: impl Iterator<Item = &'a [u8]>,
) -> Result<Option<&'a str>, &'static str> {
    let first = values.next();
    if values.next().is_some() {
        return Err("more than one Authorization header");
    }
    Ok(first
        .and_then(|v| std::str::from_utf8(v).ok())
        .and_then(bearer_token))
}

/// Verifies tokens against the configured keys, issuer and audience.
pub struct Verifier {
    /// The HS256 secrets, then the public keys of `keys_file`.
    keys: std::sync::RwLock<std::sync::Arc<[Key]>>,
    /// How many of `keys` are secrets.
    secrets: usize,
    /// Where the public keys were read from: [`Verifier::reload_public_keys`] reads it again.
    keys_file: Option<PathBuf>,
    /// A hash of the keys file's text when it was last read (to say whether a reload changed
    /// anything).
    keys_file_hash: std::sync::atomic::AtomicU64,
    issuer: String,
    audience: String,
}

/// Optional here because jsonwebtoken deserializes the claims before validating them: a
/// missing one must reach the validation, which requires it and names it.
#[derive(Deserialize)]
struct Claims {
    sub: Option<String>,
    /// A NumericDate: RFC 7519 allows fractions (some libraries write `time.time() + 600`).
    /// Checked here rather than by jsonwebtoken, which compares whole seconds (a fraction
    /// rounded, the clock cut to the second), so the leeway was 5 s to 6.5 s instead of 5.
    #[serde(default, deserialize_with = "numeric_date")]
    exp: Option<f64>,
    #[serde(default, deserialize_with = "numeric_date")]
    nbf: Option<f64>,
    /// A display name when it is a string; anything else is ignored (an identity provider's
    /// claim of another shape must not make the whole token invalid).
    #[serde(default)]
    name: Option<serde_json::Value>,
}

/// A JWT NumericDate: a non-negative number of seconds, fraction allowed.
fn numeric_date<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<f64>, D::Error> {
    let Some(n) = Option::<serde_json::Number>::deserialize(d)? else {
        return Ok(None);
    };
    // Past what milliseconds in a `u64` hold (half a million years away) is as good as that.
    let far = (u64::MAX / 1000) as f64;
    match n.as_f64() {
        Some(secs) if secs.is_finite() && secs >= 0.0 => Ok(Some(secs.min(far))),
        _ => Err(serde::de::Error::custom(
            "a NumericDate must be a non-negative number",
        )),
    }
}

#[derive(Deserialize)]
struct RawHeader {
    alg: Option<String>,
    kid: Option<String>,
    /// Header parameters the recipient must understand or refuse the token (RFC 7515,
    /// 4.1.11); this server understands none.
    crit: Option<serde_json::Value>,
}

impl Verifier {
    /// A verifier with no keys yet: add a secret or a key file.
    pub fn new(issuer: impl Into<String>, audience: impl Into<String>) -> Verifier {
        Verifier {
            keys: std::sync::RwLock::new(std::sync::Arc::from(Vec::new())),
            secrets: 0,
            keys_file: None,
            keys_file_hash: std::sync::atomic::AtomicU64::new(0),
            issuer: issuer.into(),
            audience: audience.into(),
        }
    }

    /// The keys now (a reload swaps them whole).
    fn keys(&self) -> std::sync::Arc<[Key]> {
        self.keys.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Accepts HS256 tokens signed with `secret` (another call adds another: the previous
    /// secret, while tokens signed with it are still out).
    pub fn with_hs256_secret(mut self, secret: &[u8]) -> Result<Verifier, KeyError> {
        if secret.len() < MIN_SECRET_BYTES {
            return Err(KeyError::ShortSecret);
        }
        let mut keys = self.keys().to_vec();
        keys.insert(
            self.secrets,
            Key {
                kid: None,
                alg: Algorithm::HS256,
                key: DecodingKey::from_secret(secret),
            },
        );
        self.secrets += 1;
        self.keys = std::sync::RwLock::new(keys.into());
        Ok(self)
    }

    /// Accepts tokens signed by the public keys in `path`: a JWKS (JSON) or PEM blocks.
    pub fn with_public_keys_file(mut self, path: &Path) -> Result<Verifier, KeyError> {
        let (file_keys, hash) = read_public_keys(path)?;
        let mut keys = self.keys()[..self.secrets].to_vec();
        keys.extend(file_keys);
        self.keys = std::sync::RwLock::new(keys.into());
        self.keys_file = Some(path.to_owned());
        *self.keys_file_hash.get_mut() = hash;
        Ok(self)
    }

    /// Reads the public keys file again (an identity provider's rotated keys) and swaps them
    /// in at once; tokens are verified with the old keys until then, and on an error the old
    /// keys stay. `Ok(None)`: no keys file is configured.
    pub fn reload_public_keys(&self) -> Result<Option<Reloaded>, KeyError> {
        let Some(path) = &self.keys_file else {
            return Ok(None);
        };
        let (file_keys, hash) = read_public_keys(path)?;
        let keys_now = file_keys.len();
        let mut keys = self.keys.write().unwrap_or_else(|p| p.into_inner());
        let mut fresh = keys[..self.secrets].to_vec();
        fresh.extend(file_keys);
        *keys = fresh.into();
        let before = self
            .keys_file_hash
            .swap(hash, std::sync::atomic::Ordering::Relaxed);
        Ok(Some(Reloaded {
            keys: keys_now,
            changed: before != hash,
        }))
    }

    /// The algorithms some configured key accepts.
    pub fn algorithms(&self) -> Vec<Algorithm> {
        let mut algs: Vec<Algorithm> = Vec::new();
        for key in self.keys().iter() {
            if !algs.contains(&key.alg) {
                algs.push(key.alg);
            }
        }
        algs
    }

    /// Checks a token and says whose it is.
    pub fn verify(&self, token: &str) -> Result<Identity, AuthError> {
        let header = raw_header(token)?;
        if header.crit.is_some() {
            return Err(AuthError::Critical);
        }
        let alg_name = header
            .alg
            .ok_or_else(|| AuthError::Algorithm(String::new()))?;
        let keys = self.keys();
        let alg = keys
            .iter()
            .map(|k| k.alg)
            .find(|a| format!("{a:?}") == alg_name)
            .ok_or_else(|| AuthError::Algorithm(alg_name.clone()))?;
        let candidates: Vec<&Key> = keys
            .iter()
            .filter(|k| k.alg == alg)
            .filter(|k| match (&header.kid, &k.kid) {
                (Some(wanted), Some(kid)) => wanted == kid,
                _ => true,
            })
            .collect();
        if candidates.is_empty() {
            return Err(AuthError::UnknownKey);
        }
        let mut validation = Validation::new(alg);
        validation.set_issuer(&[&self.issuer]);
        validation.set_audience(&[&self.audience]);
        validation.set_required_spec_claims(&["iss", "aud", "sub"]);
        // `exp` (required) and `nbf` are checked below, to the millisecond (see
        // `Claims::exp`): jsonwebtoken reads `exp` as whole seconds in a `u64`, and calls one
        // too large for that (`1e20`) missing.
        validation.validate_exp = false;
        validation.validate_nbf = false;

        let mut last = AuthError::Signature;
        for key in candidates {
            match jsonwebtoken::decode::<Claims>(token, &key.key, &validation) {
                Ok(data) => {
                    let claims = data.claims;
                    let sub = claims
                        .sub
                        .ok_or_else(|| AuthError::MissingClaim("sub".into()))?;
                    let exp = claims
                        .exp
                        .ok_or_else(|| AuthError::MissingClaim("exp".into()))?;
                    let (now, leeway) = (now_ms() as f64 / 1000.0, LEEWAY_SECS as f64);
                    if now > exp + leeway {
                        return Err(AuthError::Expired);
                    }
                    if claims.nbf.is_some_and(|nbf| now + leeway < nbf) {
                        return Err(AuthError::NotYetValid);
                    }
                    let user = UserId::parse(sub).map_err(|_| AuthError::Subject)?;
                    return Ok(Identity {
                        user,
                        name: match claims.name {
                            Some(serde_json::Value::String(name)) => Some(name),
                            _ => None,
                        },
                        expires_at: exp as u64,
                        expires_at_ms: (exp * 1000.0) as u64,
                    });
                }
                Err(e) => match e.kind() {
                    ErrorKind::InvalidSignature => last = AuthError::Signature,
                    ErrorKind::ExpiredSignature => return Err(AuthError::Expired),
                    ErrorKind::ImmatureSignature => return Err(AuthError::NotYetValid),
                    ErrorKind::InvalidIssuer => return Err(AuthError::Issuer),
                    ErrorKind::InvalidAudience => return Err(AuthError::Audience),
                    ErrorKind::MissingRequiredClaim(claim) => {
                        return Err(AuthError::MissingClaim(claim.clone()))
                    }
                    ErrorKind::InvalidAlgorithm | ErrorKind::MissingAlgorithm => {
                        return Err(AuthError::Algorithm(alg_name))
                    }
                    // Wrong key type for this token, or a claim of the wrong shape.
                    _ => last = AuthError::Malformed,
                },
            }
        }
        Err(last)
    }
}

/// What a reload of the public keys file found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Reloaded {
    /// Public keys now.
    pub keys: usize,
    /// Whether the file differs from when it was last read.
    pub changed: bool,
}

/// The public keys in `path` (a JWKS, JSON, or PEM blocks), and a hash of the file's text.
fn read_public_keys(path: &Path) -> Result<(Vec<Key>, u64), KeyError> {
    let text = std::fs::read_to_string(path).map_err(|source| KeyError::Io {
        path: path.to_owned(),
        source,
    })?;
    let invalid = |reason: String| KeyError::Invalid {
        path: path.to_owned(),
        reason,
    };
    let keys = if text.trim_start().starts_with('{') {
        jwks_keys(&text).map_err(invalid)?
    } else {
        pem_keys(&text).map_err(invalid)?
    };
    if keys.is_empty() {
        return Err(KeyError::Empty {
            path: path.to_owned(),
        });
    }
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    std::hash::Hash::hash(&text, &mut hasher);
    Ok((keys, std::hash::Hasher::finish(&hasher)))
}

/// The header, read without trusting it (to name the algorithm in errors, `none` included).
fn raw_header(token: &str) -> Result<RawHeader, AuthError> {
    let mut parts = token.split('.');
    let (Some(header), Some(_), Some(_), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(AuthError::Malformed);
    };
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(header.trim_end_matches('='))
        .map_err(|_| AuthError::Malformed)?;
    serde_json::from_slice(&bytes).map_err(|_| AuthError::Malformed)
}

fn pem_keys(text: &str) -> Result<Vec<Key>, String> {
    const END: &str = "-----END PUBLIC KEY-----";
    let mut keys = Vec::new();
    for (i, block) in text.split_inclusive(END).enumerate() {
        if !block.contains("-----BEGIN") {
            continue;
        }
        let pem = block.trim().as_bytes();
        let key = if let Ok(key) = DecodingKey::from_rsa_pem(pem) {
            Key {
                kid: None,
                alg: Algorithm::RS256,
                key,
            }
        } else if let Ok(key) = DecodingKey::from_ec_pem(pem) {
            Key {
                kid: None,
                alg: Algorithm::ES256,
                key,
            }
        } else if let Ok(key) = DecodingKey::from_ed_pem(pem) {
            Key {
                kid: None,
                alg: Algorithm::EdDSA,
                key,
            }
        } else {
            return Err(format!(
                "PEM block {} is not an RSA, EC (P-256) or Ed25519 public key",
                i + 1
            ));
        };
        keys.push(key);
    }
    Ok(keys)
}

fn jwks_keys(text: &str) -> Result<Vec<Key>, String> {
    let set: JwkSet = serde_json::from_str(text).map_err(|e| format!("not a JWKS: {e}"))?;
    let mut keys = Vec::new();
    for jwk in &set.keys {
        let kid = jwk.common.key_id.clone();
        let name = kid.clone().unwrap_or_else(|| "(no kid)".to_owned());
        // A key published for encryption (`use`), or for operations that do not include
        // verifying (`key_ops`), must not verify tokens (RFC 7517 §4.2, §4.3).
        let for_signatures = match &jwk.common.public_key_use {
            None | Some(PublicKeyUse::Signature) => true,
            Some(_) => false,
        };
        let verifies = jwk
            .common
            .key_operations
            .as_ref()
            .is_none_or(|ops| ops.contains(&KeyOperations::Verify));
        if !for_signatures || !verifies {
            continue;
        }
        let alg = match (&jwk.algorithm, jwk.common.key_algorithm) {
            (AlgorithmParameters::RSA(_), None | Some(KeyAlgorithm::RS256)) => Algorithm::RS256,
            (AlgorithmParameters::EllipticCurve(p), None | Some(KeyAlgorithm::ES256))
                if p.curve == EllipticCurve::P256 =>
            {
                Algorithm::ES256
            }
            (AlgorithmParameters::OctetKeyPair(p), None | Some(KeyAlgorithm::EdDSA))
                if p.key_type == OctetKeyPairType::OctetKeyPair
                    && p.curve == EllipticCurve::Ed25519 =>
            {
                Algorithm::EdDSA
            }
            // Keys for other algorithms (or encryption) are not ours to use; skip them.
            _ => continue,
        };
        let key = DecodingKey::from_jwk(jwk).map_err(|e| format!("key {name}: {e}"))?;
        keys.push(Key { kid, alg, key });
    }
    Ok(keys)
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::bearer_token;

    #[test]
    fn the_bearer_scheme_is_case_insensitive_and_needs_a_token() {
        for value in ["Bearer abc", "bearer abc", "BEARER abc", "  Bearer   abc  "] {
            assert_eq!(bearer_token(value), Some("abc"), "{value:?}");
        }
        for value in ["Basic abc", "Bearer", "Bearer   ", "Bearerabc", "", "abc"] {
            assert_eq!(bearer_token(value), None, "{value:?}");
        }
    }
}
