//! Token verification: every accepted kind of key, and every way a token is refused.

use std::path::PathBuf;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use chat_auth::{AuthError, KeyError, Verifier};
use jsonwebtoken::{encode, Algorithm, EncodingKey, Header};
use serde_json::{json, Value};

const SECRET: &[u8] = b"0123456789abcdef0123456789abcdef-test-only";
const ISS: &str = "https://idp.test/";
const AUD: &str = "chat";

fn keys(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/keys")
        .join(name)
}

fn private(name: &str) -> Vec<u8> {
    std::fs::read(keys(name)).unwrap()
}

fn now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

fn claims() -> Value {
    json!({ "sub": "alice@example.com", "iss": ISS, "aud": AUD, "exp": now() + 600, "name": "Alice" })
}

fn with(mut claims: Value, key: &str, value: Value) -> Value {
    claims[key] = value;
    claims
}

fn without(mut claims: Value, key: &str) -> Value {
    claims.as_object_mut().unwrap().remove(key);
    claims
}

fn sign(alg: Algorithm, key: &EncodingKey, kid: Option<&str>, claims: &Value) -> String {
    let mut header = Header::new(alg);
    header.kid = kid.map(str::to_owned);
    encode(&header, claims, key).unwrap()
}

fn hs(claims: &Value) -> String {
    sign(
        Algorithm::HS256,
        &EncodingKey::from_secret(SECRET),
        None,
        claims,
    )
}

fn rs(claims: &Value) -> String {
    sign(
        Algorithm::RS256,
        &EncodingKey::from_rsa_pem(&private("rsa.key")).unwrap(),
        None,
        claims,
    )
}

fn hs_verifier() -> Verifier {
    Verifier::new(ISS, AUD).with_hs256_secret(SECRET).unwrap()
}

fn pem_verifier() -> Verifier {
    Verifier::new(ISS, AUD)
        .with_public_keys_file(&keys("all.pub.pem"))
        .unwrap()
}

#[test]
fn a_valid_hs256_token_names_its_user() {
    let identity = hs_verifier().verify(&hs(&claims())).unwrap();
    assert_eq!(identity.user.as_str(), "alice@example.com");
    assert_eq!(identity.name.as_deref(), Some("Alice"));
    assert!(identity.seconds_left() > 590 && identity.seconds_left() <= 600);
}

#[test]
fn a_name_claim_that_is_not_a_string_is_ignored_not_fatal() {
    for name in [
        json!(42),
        json!({"given": "Alice"}),
        json!(null),
        json!(["A"]),
    ] {
        let identity = hs_verifier()
            .verify(&hs(&with(claims(), "name", name.clone())))
            .unwrap_or_else(|e| panic!("name {name}: {e}"));
        assert_eq!(identity.name, None, "{name}");
    }
    let identity = hs_verifier()
        .verify(&hs(&without(claims(), "name")))
        .unwrap();
    assert_eq!(identity.name, None);
}

#[test]
fn rs256_es256_and_eddsa_verify_from_a_pem_file() {
    let verifier = pem_verifier();
    let c = claims();
    let rsa = EncodingKey::from_rsa_pem(&private("rsa.key")).unwrap();
    let ec = EncodingKey::from_ec_pem(&private("ec.key")).unwrap();
    let ed = EncodingKey::from_ed_pem(&private("ed.key")).unwrap();
    for token in [
        sign(Algorithm::RS256, &rsa, None, &c),
        sign(Algorithm::ES256, &ec, None, &c),
        sign(Algorithm::EdDSA, &ed, None, &c),
    ] {
        assert_eq!(
            verifier.verify(&token).unwrap().user.as_str(),
            "alice@example.com"
        );
    }
    assert_eq!(
        verifier.algorithms(),
        vec![Algorithm::RS256, Algorithm::ES256, Algorithm::EdDSA]
    );
}

#[test]
fn jwks_keys_are_chosen_by_kid() {
    let verifier = Verifier::new(ISS, AUD)
        .with_public_keys_file(&keys("jwks.json"))
        .unwrap();
    let c = claims();
    let rsa = EncodingKey::from_rsa_pem(&private("rsa.key")).unwrap();
    let ec = EncodingKey::from_ec_pem(&private("ec.key")).unwrap();
    let ed = EncodingKey::from_ed_pem(&private("ed.key")).unwrap();
    assert!(verifier
        .verify(&sign(Algorithm::RS256, &rsa, Some("rsa-1"), &c))
        .is_ok());
    assert!(verifier
        .verify(&sign(Algorithm::ES256, &ec, Some("ec-1"), &c))
        .is_ok());
    assert!(verifier
        .verify(&sign(Algorithm::EdDSA, &ed, Some("ed-1"), &c))
        .is_ok());
    assert!(
        verifier
            .verify(&sign(Algorithm::RS256, &rsa, None, &c))
            .is_ok(),
        "no kid: try the alg's keys"
    );
    assert_eq!(
        verifier.verify(&sign(Algorithm::RS256, &rsa, Some("rotated-away"), &c)),
        Err(AuthError::UnknownKey)
    );
}

/// A key the identity provider publishes for encryption, or for operations other than
/// verifying, does not verify tokens, even when the token names it.
#[test]
fn jwks_keys_for_encryption_do_not_verify_tokens() {
    let text = std::fs::read_to_string(keys("jwks.json")).unwrap();
    let mut set: Value = serde_json::from_str(&text).unwrap();
    let rsa_key = set["keys"]
        .as_array()
        .unwrap()
        .iter()
        .find(|k| k["kid"] == "rsa-1")
        .unwrap()
        .clone();
    let mut enc = rsa_key.clone();
    enc["kid"] = json!("rsa-enc");
    enc["use"] = json!("enc");
    let mut wrap = rsa_key.clone();
    wrap["kid"] = json!("rsa-wrap");
    wrap.as_object_mut().unwrap().remove("use");
    wrap["key_ops"] = json!(["encrypt", "wrapKey"]);
    let mut ops = rsa_key.clone();
    ops["kid"] = json!("rsa-ops");
    ops["key_ops"] = json!(["verify"]);
    set["keys"] = json!([enc, wrap, ops]);
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("jwks.json");
    std::fs::write(&file, set.to_string()).unwrap();
    let verifier = Verifier::new(ISS, AUD)
        .with_public_keys_file(&file)
        .unwrap();

    let rsa = EncodingKey::from_rsa_pem(&private("rsa.key")).unwrap();
    let c = claims();
    for kid in ["rsa-enc", "rsa-wrap"] {
        assert_eq!(
            verifier.verify(&sign(Algorithm::RS256, &rsa, Some(kid), &c)),
            Err(AuthError::UnknownKey),
            "{kid}"
        );
    }
    assert!(verifier
        .verify(&sign(Algorithm::RS256, &rsa, Some("rsa-ops"), &c))
        .is_ok());
}

#[test]
fn forged_signatures_are_refused() {
    let other = EncodingKey::from_secret(b"another secret, just as long as the real one!");
    assert_eq!(
        hs_verifier().verify(&sign(Algorithm::HS256, &other, None, &claims())),
        Err(AuthError::Signature)
    );
    let other_rsa = EncodingKey::from_rsa_pem(&private("other-rsa.key")).unwrap();
    assert_eq!(
        pem_verifier().verify(&sign(Algorithm::RS256, &other_rsa, None, &claims())),
        Err(AuthError::Signature)
    );
    // A valid token with its payload swapped.
    let good = hs(&claims());
    let evil = hs(&with(claims(), "sub", json!("mallory")));
    let parts: Vec<&str> = good.split('.').collect();
    let evil_payload = evil.split('.').nth(1).unwrap();
    let spliced = format!("{}.{}.{}", parts[0], evil_payload, parts[2]);
    assert_eq!(hs_verifier().verify(&spliced), Err(AuthError::Signature));
}

#[test]
fn alg_none_and_unconfigured_algorithms_are_refused_before_any_check() {
    // {"alg":"none","typ":"JWT"} . claims . (no signature)
    let payload = base64_url(&serde_json::to_vec(&claims()).unwrap());
    let none = format!(
        "{}.{payload}.",
        base64_url(br#"{"alg":"none","typ":"JWT"}"#)
    );
    assert_eq!(
        hs_verifier().verify(&none),
        Err(AuthError::Algorithm("none".into()))
    );
    // HS256 where only public keys are configured: the classic key-confusion attack, signing
    // with the public key's bytes as the HMAC secret.
    let confused = sign(
        Algorithm::HS256,
        &EncodingKey::from_secret(&std::fs::read(keys("rsa.pub.pem")).unwrap()),
        None,
        &claims(),
    );
    assert_eq!(
        pem_verifier().verify(&confused),
        Err(AuthError::Algorithm("HS256".into()))
    );
    // RS256 where only a secret is configured.
    assert_eq!(
        hs_verifier().verify(&rs(&claims())),
        Err(AuthError::Algorithm("RS256".into()))
    );
    // Algorithms the contract does not list, even with a fitting key type.
    let hs384 = sign(
        Algorithm::HS384,
        &EncodingKey::from_secret(SECRET),
        None,
        &claims(),
    );
    assert_eq!(
        hs_verifier().verify(&hs384),
        Err(AuthError::Algorithm("HS384".into()))
    );
}

#[test]
fn time_claims_are_checked_with_five_seconds_of_leeway() {
    let v = hs_verifier();
    assert_eq!(
        v.verify(&hs(&with(claims(), "exp", json!(now() - 60)))),
        Err(AuthError::Expired)
    );
    assert!(
        v.verify(&hs(&with(claims(), "exp", json!(now() - 2))))
            .is_ok(),
        "within leeway"
    );
    assert_eq!(
        v.verify(&hs(&with(claims(), "nbf", json!(now() + 60)))),
        Err(AuthError::NotYetValid)
    );
    assert!(
        v.verify(&hs(&with(claims(), "nbf", json!(now() + 2))))
            .is_ok(),
        "within leeway"
    );
    assert!(v
        .verify(&hs(&with(claims(), "nbf", json!(now() - 60))))
        .is_ok());
}

#[test]
fn time_claims_may_have_fractions_as_rfc_7519_allows() {
    let v = hs_verifier();
    let exp = now() as f64 + 600.7;
    let identity = v
        .verify(&hs(&with(claims(), "exp", json!(exp))))
        .expect("a fractional exp is a valid NumericDate");
    assert_eq!(identity.expires_at, exp as u64);
    let accepted = identity.time_accepted().as_secs_f64();
    assert!((604.0..=605.8).contains(&accepted), "{accepted}");
    assert_eq!(
        v.verify(&hs(&with(claims(), "exp", json!(now() as f64 - 60.5)))),
        Err(AuthError::Expired)
    );
    assert!(v
        .verify(&hs(&with(claims(), "nbf", json!(now() as f64 - 0.25))))
        .is_ok());
    // The leeway is 5 s to the millisecond, not to the second.
    let now_f = || {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs_f64()
    };
    assert_eq!(
        v.verify(&hs(&with(claims(), "exp", json!(now_f() - 5.6)))),
        Err(AuthError::Expired)
    );
    assert!(v
        .verify(&hs(&with(claims(), "exp", json!(now_f() - 4.4))))
        .is_ok());
    assert_eq!(
        v.verify(&hs(&with(claims(), "nbf", json!(now_f() + 5.6)))),
        Err(AuthError::NotYetValid)
    );
    assert!(v
        .verify(&hs(&with(claims(), "nbf", json!(now_f() + 4.4))))
        .is_ok());
    for bad in [json!("soon"), json!(-5.5), json!(true)] {
        assert_eq!(
            v.verify(&hs(&with(claims(), "exp", bad.clone()))),
            Err(AuthError::Malformed),
            "exp {bad}"
        );
    }
    // Any non-negative number is a NumericDate, however far away.
    for far in [
        json!(i64::MAX),
        json!(u64::MAX),
        json!(1e20),
        json!(f64::MAX),
    ] {
        let identity = v
            .verify(&hs(&with(claims(), "exp", far.clone())))
            .unwrap_or_else(|e| panic!("exp {far}: {e}"));
        assert!(
            identity.time_accepted() >= Duration::from_secs(99 * 365 * 24 * 3600),
            "exp {far}"
        );
    }
}

#[test]
fn issuer_audience_and_required_claims_are_enforced() {
    let v = hs_verifier();
    assert_eq!(
        v.verify(&hs(&with(claims(), "iss", json!("https://evil/")))),
        Err(AuthError::Issuer)
    );
    assert_eq!(
        v.verify(&hs(&with(claims(), "aud", json!("other-app")))),
        Err(AuthError::Audience)
    );
    assert!(
        v.verify(&hs(&with(claims(), "aud", json!(["other-app", AUD]))))
            .is_ok(),
        "aud may be a list"
    );
    for claim in ["exp", "iss", "aud", "sub"] {
        let result = v.verify(&hs(&without(claims(), claim)));
        assert_eq!(
            result,
            Err(AuthError::MissingClaim(claim.into())),
            "{claim}"
        );
    }
}

#[test]
fn the_subject_must_be_a_valid_user_id() {
    for sub in ["", "alice bob", "a/b", &"u".repeat(129)] {
        assert_eq!(
            hs_verifier().verify(&hs(&with(claims(), "sub", json!(sub)))),
            Err(AuthError::Subject),
            "{sub:?}"
        );
    }
}

#[test]
fn garbage_is_malformed() {
    let v = hs_verifier();
    for token in [
        "",
        "abc",
        "a.b",
        "a.b.c.d",
        "!!!.!!!.!!!",
        "eyJhbGciOiJIUzI1NiJ9.@@@.xyz",
    ] {
        assert!(
            matches!(
                v.verify(token),
                Err(AuthError::Malformed | AuthError::Signature)
            ),
            "{token:?}"
        );
    }
}

#[test]
fn bad_key_configuration_is_refused_at_start() {
    assert!(matches!(
        Verifier::new(ISS, AUD).with_hs256_secret(b"short"),
        Err(KeyError::ShortSecret)
    ));
    assert!(matches!(
        Verifier::new(ISS, AUD).with_public_keys_file(&keys("missing.pem")),
        Err(KeyError::Io { .. })
    ));
    let dir = tempfile::tempdir().unwrap();
    let junk = dir.path().join("junk.pem");
    std::fs::write(
        &junk,
        "-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----\n",
    )
    .unwrap();
    assert!(matches!(
        Verifier::new(ISS, AUD).with_public_keys_file(&junk),
        Err(KeyError::Invalid { .. })
    ));
    let empty = dir.path().join("empty.json");
    std::fs::write(&empty, r#"{"keys":[]}"#).unwrap();
    assert!(matches!(
        Verifier::new(ISS, AUD).with_public_keys_file(&empty),
        Err(KeyError::Empty { .. })
    ));
}

fn base64_url(bytes: &[u8]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

#[test]
fn a_header_with_critical_extensions_is_refused() {
    // RFC 7515, 4.1.11: a recipient that does not understand what `crit` lists must refuse.
    let with_header = |header: &[u8]| {
        let signed = format!(
            "{}.{}",
            base64_url(header),
            base64_url(&serde_json::to_vec(&claims()).unwrap())
        );
        let signature = jsonwebtoken::crypto::sign(
            signed.as_bytes(),
            &EncodingKey::from_secret(SECRET),
            Algorithm::HS256,
        )
        .unwrap();
        format!("{signed}.{signature}")
    };
    let critical = with_header(br#"{"alg":"HS256","typ":"JWT","crit":["exp"]}"#);
    assert_eq!(hs_verifier().verify(&critical), Err(AuthError::Critical));
    // The same token without `crit` is fine: the refusal is for `crit` alone.
    let plain = with_header(br#"{"alg":"HS256","typ":"JWT"}"#);
    assert!(hs_verifier().verify(&plain).is_ok());
}

/// Rotation: a second HS256 secret is accepted beside the first (tokens signed with the one
/// being retired keep working), and the public keys file is read again on request: the new
/// keys replace the old at once, and a file that does not read leaves them as they were.
#[test]
fn secrets_rotate_side_by_side_and_public_keys_reload_from_their_file() {
    const NEW: &[u8] = b"fedcba9876543210fedcba9876543210-test-only";
    let both = Verifier::new(ISS, AUD)
        .with_hs256_secret(NEW)
        .unwrap()
        .with_hs256_secret(SECRET)
        .unwrap();
    let by_new = sign(
        Algorithm::HS256,
        &EncodingKey::from_secret(NEW),
        None,
        &claims(),
    );
    assert!(both.verify(&hs(&claims())).is_ok(), "the previous secret");
    assert!(both.verify(&by_new).is_ok(), "the new secret");
    assert_eq!(hs_verifier().verify(&by_new), Err(AuthError::Signature));
    assert_eq!(both.reload_public_keys().unwrap(), None, "no file to read");

    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("keys.pem");
    std::fs::copy(keys("rsa.pub.pem"), &file).unwrap();
    let verifier = Verifier::new(ISS, AUD)
        .with_hs256_secret(SECRET)
        .unwrap()
        .with_public_keys_file(&file)
        .unwrap();
    let by_other = sign(
        Algorithm::RS256,
        &EncodingKey::from_rsa_pem(&private("other-rsa.key")).unwrap(),
        None,
        &claims(),
    );
    assert!(verifier.verify(&rs(&claims())).is_ok());
    assert_eq!(verifier.verify(&by_other), Err(AuthError::Signature));

    // The identity provider moved to another key.
    std::fs::copy(keys("other-rsa.pub.pem"), &file).unwrap();
    let reloaded = verifier.reload_public_keys().unwrap().unwrap();
    assert_eq!((reloaded.keys, reloaded.changed), (1, true));
    let again = verifier.reload_public_keys().unwrap().unwrap();
    assert_eq!(
        (again.keys, again.changed),
        (1, false),
        "the same file again"
    );
    assert!(verifier.verify(&by_other).is_ok(), "the new key");
    assert_eq!(verifier.verify(&rs(&claims())), Err(AuthError::Signature));
    assert!(verifier.verify(&hs(&claims())).is_ok(), "the secret stays");

    std::fs::write(&file, "not a key").unwrap();
    assert!(matches!(
        verifier.reload_public_keys(),
        Err(KeyError::Invalid { .. } | KeyError::Empty { .. })
    ));
    assert!(verifier.verify(&by_other).is_ok(), "the keys before stay");
}
