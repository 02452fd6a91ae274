//! Per-stream sender authentication: a bearer token, our HMAC-SHA256 signature of the raw
//! body (optionally with a signed timestamp against replay), or a provider's own signature
//! scheme (Standard Webhooks, Stripe, GitHub, Shopify) with its header names, encodings and
//! timestamp tolerance. Several secrets may be active at once for rotation; every comparison
//! is constant-time, and every secret is tried so the time taken does not tell which matched.

use std::fmt;
use std::time::Duration;

use base64::Engine;
use hmac::{Hmac, Mac};
use hookpipe_common::Secret;
use hookpipe_common::catalogue::{AuthSpec, HmacSpec, SecretRef, SignatureEncoding};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use axum::http::HeaderMap;

/// An HMAC key's bytes (a Standard Webhooks secret is base64 of them); never shown in `Debug`.
#[derive(Clone, PartialEq, Eq)]
pub struct Key(Vec<u8>);

impl fmt::Debug for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("\"[redacted]\"")
    }
}

impl Key {
    fn from_secret(secret: &Secret) -> Self {
        Key(secret.expose().as_bytes().to_vec())
    }
}

/// A stream's auth rule with its secrets resolved.
#[derive(Debug)]
pub enum Verifier {
    /// SHA-256 digests of the tokens: compared digest to digest, so neither the time taken
    /// nor an early length mismatch tells a sender anything about a token's length. The first
    /// token itself is kept for the console's test hit ([`Verifier::sign`]).
    Bearer {
        token_digests: Vec<[u8; 32]>,
        first: Secret,
    },
    Hmac {
        spec: HmacSpec,
        keys: Vec<Key>,
    },
    StandardWebhooks {
        tolerance: Duration,
        keys: Vec<Key>,
    },
    Stripe {
        tolerance: Duration,
        keys: Vec<Key>,
    },
    GitHub {
        keys: Vec<Key>,
    },
    Shopify {
        keys: Vec<Key>,
    },
}

/// A request that passed its stream's check.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Verified<'h> {
    /// The signature as the sender wrote it (the header's value), when the request was
    /// signed: the same for a replay of a captured request, different for any other request
    /// (it covers the body, and the timestamp or delivery id where the scheme has one). A
    /// signed request without an idempotency key takes its hit_id from this.
    pub signature: Option<&'h str>,
}

/// Why a request was refused; the text is what the sender sees, and the name is the metric's
/// `reason` label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthFailure {
    MissingCredentials,
    InvalidToken,
    MissingSignature,
    MalformedSignature,
    InvalidSignature,
    MissingTimestamp,
    StaleTimestamp,
    MissingDeliveryId,
}

impl AuthFailure {
    pub fn reason(self) -> &'static str {
        match self {
            AuthFailure::MissingCredentials => "missing_credentials",
            AuthFailure::InvalidToken => "invalid_token",
            AuthFailure::MissingSignature => "missing_signature",
            AuthFailure::MalformedSignature => "malformed_signature",
            AuthFailure::InvalidSignature => "invalid_signature",
            AuthFailure::MissingTimestamp => "missing_timestamp",
            AuthFailure::StaleTimestamp => "stale_timestamp",
            AuthFailure::MissingDeliveryId => "missing_delivery_id",
        }
    }

    pub fn message(self) -> &'static str {
        match self {
            AuthFailure::MissingCredentials => "missing bearer token",
            AuthFailure::InvalidToken => "invalid token",
            AuthFailure::MissingSignature => "missing signature",
            AuthFailure::MalformedSignature => "malformed signature",
            AuthFailure::InvalidSignature => "invalid signature",
            AuthFailure::MissingTimestamp => "missing signature timestamp",
            AuthFailure::StaleTimestamp => "signature timestamp outside tolerance",
            AuthFailure::MissingDeliveryId => "missing webhook-id",
        }
    }
}

/// Reads one secret from where the catalogue says it is.
pub fn resolve(secret: &SecretRef) -> Result<Secret, String> {
    let value = match (&secret.env, &secret.file) {
        (Some(env), _) => {
            std::env::var(env).map_err(|_| format!("environment variable {env} is not set"))?
        }
        (None, Some(file)) => std::fs::read_to_string(file)
            .map_err(|e| format!("cannot read secret file {}: {e}", file.display()))?,
        (None, None) => return Err("secret names no source".into()),
    };
    let value = value.trim();
    if value.is_empty() {
        return Err(format!("secret from {secret} is empty"));
    }
    Ok(Secret::new(value))
}

/// A Standard Webhooks secret, `whsec_<base64>` (the prefix is optional, as in the
/// specification's libraries): the key is the decoded base64.
fn standard_webhooks_key(secret: &Secret) -> Result<Key, String> {
    let text = secret.expose();
    let encoded = text.strip_prefix("whsec_").unwrap_or(text);
    match base64::engine::general_purpose::STANDARD.decode(encoded) {
        Ok(bytes) if !bytes.is_empty() => Ok(Key(bytes)),
        _ => Err("a standard-webhooks secret must be `whsec_` followed by base64".into()),
    }
}

impl Verifier {
    pub fn from_spec(spec: &AuthSpec) -> Result<Self, String> {
        let secrets = spec
            .secrets()
            .iter()
            .map(resolve)
            .collect::<Result<Vec<_>, _>>()?;
        let keys = || secrets.iter().map(Key::from_secret).collect();
        Ok(match spec {
            AuthSpec::Bearer { .. } => Verifier::Bearer {
                token_digests: secrets
                    .iter()
                    .map(|t| Sha256::digest(t.expose().as_bytes()).into())
                    .collect(),
                first: secrets.first().cloned().unwrap_or_default(),
            },
            AuthSpec::HmacSha256(h) => Verifier::Hmac {
                spec: h.clone(),
                keys: keys(),
            },
            AuthSpec::StandardWebhooks { tolerance, .. } => Verifier::StandardWebhooks {
                tolerance: *tolerance,
                keys: secrets
                    .iter()
                    .enumerate()
                    .map(|(i, s)| {
                        standard_webhooks_key(s).map_err(|e| format!("secrets[{i}]: {e}"))
                    })
                    .collect::<Result<_, _>>()?,
            },
            AuthSpec::Stripe { tolerance, .. } => Verifier::Stripe {
                tolerance: *tolerance,
                keys: keys(),
            },
            AuthSpec::GitHub { .. } => Verifier::GitHub { keys: keys() },
            AuthSpec::Shopify { .. } => Verifier::Shopify { keys: keys() },
        })
    }

    /// Checks a request. `now_secs` is the gateway's clock (Unix seconds), passed in so the
    /// check stays pure.
    pub fn verify<'h>(
        &self,
        headers: &'h HeaderMap,
        body: &[u8],
        now_secs: i64,
    ) -> Result<Verified<'h>, AuthFailure> {
        let signature = match self {
            Verifier::Bearer { token_digests, .. } => {
                let value =
                    header(headers, "authorization").ok_or(AuthFailure::MissingCredentials)?;
                let token = value
                    .strip_prefix("Bearer ")
                    .or_else(|| value.strip_prefix("bearer "))
                    .ok_or(AuthFailure::MissingCredentials)?
                    .trim();
                let given: [u8; 32] = Sha256::digest(token.as_bytes()).into();
                let matched = token_digests
                    .iter()
                    .fold(0u8, |acc, t| acc | t.ct_eq(&given).unwrap_u8());
                if matched != 1 {
                    return Err(AuthFailure::InvalidToken);
                }
                return Ok(Verified { signature: None });
            }
            Verifier::Hmac { spec, keys } => verify_hmac(spec, keys, headers, body, now_secs)?,
            Verifier::StandardWebhooks { tolerance, keys } => {
                verify_standard_webhooks(*tolerance, keys, headers, body, now_secs)?
            }
            Verifier::Stripe { tolerance, keys } => {
                verify_stripe(*tolerance, keys, headers, body, now_secs)?
            }
            Verifier::GitHub { keys } => {
                let value =
                    header(headers, "x-hub-signature-256").ok_or(AuthFailure::MissingSignature)?;
                let given = value
                    .strip_prefix("sha256=")
                    .and_then(decode_hex)
                    .ok_or(AuthFailure::MalformedSignature)?;
                check_macs(keys, &[body], &[given.as_slice()])?;
                value
            }
            Verifier::Shopify { keys } => {
                let value = header(headers, "x-shopify-hmac-sha256")
                    .ok_or(AuthFailure::MissingSignature)?;
                let given = decode_base64(value).ok_or(AuthFailure::MalformedSignature)?;
                check_macs(keys, &[body], &[given.as_slice()])?;
                value
            }
        };
        Ok(Verified {
            signature: Some(signature),
        })
    }
}

impl Verifier {
    /// Headers that make a request with `body` pass this check, signed with the first secret
    /// as the stream's sender would (the console's test hit, which goes through the same
    /// handler as a sender's). `delivery_id` is used where the scheme signs one.
    pub fn sign(&self, body: &[u8], now_secs: i64, delivery_id: &str) -> Vec<(String, String)> {
        let ts = now_secs.to_string();
        let mac = |keys: &[Key], parts: &[&[u8]]| -> Vec<u8> {
            let Some(Ok(mut mac)) = keys.first().map(|k| Hmac::<Sha256>::new_from_slice(&k.0))
            else {
                return Vec::new();
            };
            for part in parts {
                mac.update(part);
            }
            mac.finalize().into_bytes().to_vec()
        };
        let b64 = |bytes: Vec<u8>| base64::engine::general_purpose::STANDARD.encode(bytes);
        let hex = |bytes: Vec<u8>| bytes.iter().map(|b| format!("{b:02x}")).collect::<String>();
        let pair = |name: &str, value: String| (name.to_owned(), value);
        match self {
            Verifier::Bearer { first, .. } => {
                vec![pair("Authorization", format!("Bearer {}", first.expose()))]
            }
            Verifier::Hmac { spec, keys } => {
                let digest = match &spec.timestamp_header {
                    Some(_) => mac(keys, &[ts.as_bytes(), b".", body]),
                    None => mac(keys, &[body]),
                };
                let encoded = match spec.encoding {
                    SignatureEncoding::Hex => hex(digest),
                    SignatureEncoding::Base64 => b64(digest),
                };
                let mut headers = vec![pair(&spec.header, format!("{}{encoded}", spec.prefix))];
                if let Some(name) = &spec.timestamp_header {
                    headers.push(pair(name, ts));
                }
                headers
            }
            Verifier::StandardWebhooks { keys, .. } => {
                let digest = mac(
                    keys,
                    &[delivery_id.as_bytes(), b".", ts.as_bytes(), b".", body],
                );
                vec![
                    pair("webhook-id", delivery_id.to_owned()),
                    pair("webhook-signature", format!("v1,{}", b64(digest))),
                    pair("webhook-timestamp", ts),
                ]
            }
            Verifier::Stripe { keys, .. } => {
                let digest = mac(keys, &[ts.as_bytes(), b".", body]);
                vec![pair(
                    "Stripe-Signature",
                    format!("t={ts},v1={}", hex(digest)),
                )]
            }
            Verifier::GitHub { keys } => vec![pair(
                "X-Hub-Signature-256",
                format!("sha256={}", hex(mac(keys, &[body]))),
            )],
            Verifier::Shopify { keys } => {
                vec![pair("X-Shopify-Hmac-Sha256", b64(mac(keys, &[body])))]
            }
        }
    }
}

/// A header's value as text, trimmed; `None` when absent or not visible ASCII.
fn header<'h>(headers: &'h HeaderMap, name: &str) -> Option<&'h str> {
    headers
        .get(name)
        .and_then(|v| v.to_str().ok())
        .map(str::trim)
}

/// Passes when one of `candidates` (each 32 bytes) is HMAC-SHA256 of the concatenated
/// `message` parts under one of `keys`. Every key and every candidate is compared, in
/// constant time.
fn check_macs(keys: &[Key], message: &[&[u8]], candidates: &[&[u8]]) -> Result<(), AuthFailure> {
    let mut matched = 0u8;
    for key in keys {
        let Ok(mut mac) = Hmac::<Sha256>::new_from_slice(&key.0) else {
            continue;
        };
        for part in message {
            mac.update(part);
        }
        let expected = mac.finalize().into_bytes();
        for candidate in candidates {
            matched |= expected.as_slice().ct_eq(candidate).unwrap_u8();
        }
    }
    if matched == 1 {
        Ok(())
    } else {
        Err(AuthFailure::InvalidSignature)
    }
}

/// Refuses a signing time (Unix seconds, as text) further than `tolerance` from `now_secs`.
fn check_timestamp(ts: &str, tolerance: Duration, now_secs: i64) -> Result<(), AuthFailure> {
    let secs: i64 = ts.parse().map_err(|_| AuthFailure::MissingTimestamp)?;
    if now_secs.abs_diff(secs) > tolerance.as_secs() {
        return Err(AuthFailure::StaleTimestamp);
    }
    Ok(())
}

fn verify_hmac<'h>(
    spec: &HmacSpec,
    keys: &[Key],
    headers: &'h HeaderMap,
    body: &[u8],
    now_secs: i64,
) -> Result<&'h str, AuthFailure> {
    let value = header(headers, &spec.header).ok_or(AuthFailure::MissingSignature)?;
    let encoded = value
        .strip_prefix(spec.prefix.as_str())
        .ok_or(AuthFailure::MalformedSignature)?;
    let given = match spec.encoding {
        SignatureEncoding::Hex => decode_hex(encoded),
        SignatureEncoding::Base64 => decode_base64(encoded),
    }
    .ok_or(AuthFailure::MalformedSignature)?;
    match &spec.timestamp_header {
        Some(name) => {
            let ts = header(headers, name).ok_or(AuthFailure::MissingTimestamp)?;
            check_timestamp(ts, spec.tolerance, now_secs)?;
            check_macs(keys, &[ts.as_bytes(), b".", body], &[given.as_slice()])?;
        }
        None => check_macs(keys, &[body], &[given.as_slice()])?,
    }
    Ok(value)
}

/// Standard Webhooks: the id, timestamp and signature headers, under their `webhook-` names or
/// Svix's `svix-` ones.
fn verify_standard_webhooks<'h>(
    tolerance: Duration,
    keys: &[Key],
    headers: &'h HeaderMap,
    body: &[u8],
    now_secs: i64,
) -> Result<&'h str, AuthFailure> {
    let either = |name: &str, svix: &str| header(headers, name).or_else(|| header(headers, svix));
    let value =
        either("webhook-signature", "svix-signature").ok_or(AuthFailure::MissingSignature)?;
    let id = either("webhook-id", "svix-id").ok_or(AuthFailure::MissingDeliveryId)?;
    let ts = either("webhook-timestamp", "svix-timestamp").ok_or(AuthFailure::MissingTimestamp)?;
    check_timestamp(ts, tolerance, now_secs)?;
    // Space-separated `v1,<base64>` entries; other versions (v1a: asymmetric) are skipped.
    let candidates: Vec<Vec<u8>> = value
        .split(' ')
        .filter_map(|entry| entry.strip_prefix("v1,"))
        .map(decode_base64)
        .collect::<Option<_>>()
        .ok_or(AuthFailure::MalformedSignature)?;
    if candidates.is_empty() {
        return Err(AuthFailure::MalformedSignature);
    }
    let candidates: Vec<&[u8]> = candidates.iter().map(Vec::as_slice).collect();
    check_macs(
        keys,
        &[id.as_bytes(), b".", ts.as_bytes(), b".", body],
        &candidates,
    )?;
    Ok(value)
}

/// Stripe: `t=<ts>,v1=<hex>[,v1=<hex>…]`; other schemes' entries (v0) are skipped.
fn verify_stripe<'h>(
    tolerance: Duration,
    keys: &[Key],
    headers: &'h HeaderMap,
    body: &[u8],
    now_secs: i64,
) -> Result<&'h str, AuthFailure> {
    let value = header(headers, "stripe-signature").ok_or(AuthFailure::MissingSignature)?;
    let mut ts = None;
    let mut candidates = Vec::new();
    for item in value.split(',') {
        match item.trim().split_once('=') {
            Some(("t", t)) => ts = Some(t),
            Some(("v1", hex)) => {
                candidates.push(decode_hex(hex).ok_or(AuthFailure::MalformedSignature)?);
            }
            Some(_) => {}
            None => return Err(AuthFailure::MalformedSignature),
        }
    }
    let ts = ts.ok_or(AuthFailure::MissingTimestamp)?;
    if candidates.is_empty() {
        return Err(AuthFailure::MissingSignature);
    }
    check_timestamp(ts, tolerance, now_secs)?;
    let candidates: Vec<&[u8]> = candidates.iter().map(Vec::as_slice).collect();
    check_macs(keys, &[ts.as_bytes(), b".", body], &candidates)?;
    Ok(value)
}

/// A 32-byte signature in hex.
fn decode_hex(s: &str) -> Option<Vec<u8>> {
    if s.len() != 64 {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

/// A 32-byte signature in standard base64.
fn decode_base64(s: &str) -> Option<Vec<u8>> {
    base64::engine::general_purpose::STANDARD
        .decode(s)
        .ok()
        .filter(|sig| sig.len() == 32)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn hmac_hex(key: &str, msg: &[u8]) -> String {
        let mut mac = Hmac::<Sha256>::new_from_slice(key.as_bytes()).unwrap();
        mac.update(msg);
        mac.finalize()
            .into_bytes()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect()
    }

    fn bearer(tokens: &[&str]) -> Verifier {
        Verifier::Bearer {
            token_digests: tokens
                .iter()
                .map(|t| Sha256::digest(t.as_bytes()).into())
                .collect(),
            first: Secret::new(tokens[0]),
        }
    }

    /// What the console signs passes the same stream's check, for every scheme.
    #[test]
    fn sign_makes_requests_that_verify() {
        let key = |k: &str| vec![Key(k.as_bytes().to_vec())];
        let verifiers = [
            bearer(&["tok"]),
            Verifier::Hmac {
                spec: spec(true, SignatureEncoding::Hex),
                keys: key("k1"),
            },
            Verifier::Hmac {
                spec: spec(false, SignatureEncoding::Base64),
                keys: key("k1"),
            },
            Verifier::StandardWebhooks {
                tolerance: Duration::from_secs(300),
                keys: key("sw"),
            },
            Verifier::Stripe {
                tolerance: Duration::from_secs(300),
                keys: key("whsec_x"),
            },
            Verifier::GitHub { keys: key("gh") },
            Verifier::Shopify { keys: key("shp") },
        ];
        let body = b"orderId=N1&status=delivered";
        let now = 1_700_000_000;
        for v in &verifiers {
            let mut h = HeaderMap::new();
            for (name, value) in v.sign(body, now, "console-1") {
                h.insert(
                    axum::http::HeaderName::try_from(name).unwrap(),
                    value.parse().unwrap(),
                );
            }
            assert_eq!(check(v, &h, body, now), Ok(()), "{v:?}");
            if !matches!(v, Verifier::Bearer { .. }) {
                assert_eq!(
                    check(v, &h, b"tampered", now),
                    Err(AuthFailure::InvalidSignature),
                    "{v:?}"
                );
            }
        }
    }

    fn spec(timestamp: bool, encoding: SignatureEncoding) -> HmacSpec {
        HmacSpec {
            header: "X-Signature".into(),
            encoding,
            prefix: "sha256=".into(),
            timestamp_header: timestamp.then(|| "X-Timestamp".into()),
            tolerance: Duration::from_secs(300),
            secrets: vec![],
        }
    }

    fn check(v: &Verifier, h: &HeaderMap, body: &[u8], now: i64) -> Result<(), AuthFailure> {
        v.verify(h, body, now).map(|_| ())
    }

    fn headers(pairs: &[(&'static str, String)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(*k, v.parse().unwrap());
        }
        h
    }

    #[test]
    fn bearer_accepts_any_active_token_and_refuses_others() {
        let v = bearer(&["old-token", "new-token"]);
        for t in ["old-token", "new-token"] {
            assert_eq!(
                check(
                    &v,
                    &headers(&[("authorization", format!("Bearer {t}"))]),
                    b"",
                    0
                ),
                Ok(())
            );
        }
        assert_eq!(
            check(
                &v,
                &headers(&[("authorization", "Bearer nope".into())]),
                b"",
                0
            ),
            Err(AuthFailure::InvalidToken)
        );
        assert_eq!(
            check(&v, &HeaderMap::new(), b"", 0),
            Err(AuthFailure::MissingCredentials)
        );
        assert_eq!(
            check(
                &v,
                &headers(&[("authorization", "Basic b2xkLXRva2Vu".into())]),
                b"",
                0
            ),
            Err(AuthFailure::MissingCredentials)
        );
    }

    #[test]
    fn hmac_hex_signature_of_the_body() {
        let v = Verifier::Hmac {
            spec: spec(false, SignatureEncoding::Hex),
            keys: vec![Key(b"k1".to_vec())],
        };
        let body = b"orderId=N1&status=delivered";
        let good = format!("sha256={}", hmac_hex("k1", body));
        assert_eq!(
            check(&v, &headers(&[("x-signature", good.clone())]), body, 0),
            Ok(())
        );
        assert_eq!(
            check(
                &v,
                &headers(&[("x-signature", good)]),
                b"orderId=N1&status=refunded",
                0
            ),
            Err(AuthFailure::InvalidSignature)
        );
        let wrong_key = format!("sha256={}", hmac_hex("k2", body));
        assert_eq!(
            check(&v, &headers(&[("x-signature", wrong_key)]), body, 0),
            Err(AuthFailure::InvalidSignature)
        );
        assert_eq!(
            check(
                &v,
                &headers(&[("x-signature", "sha256=zz".into())]),
                body,
                0
            ),
            Err(AuthFailure::MalformedSignature)
        );
        assert_eq!(
            check(
                &v,
                &headers(&[("x-signature", hmac_hex("k1", body))]),
                body,
                0
            ),
            Err(AuthFailure::MalformedSignature),
            "the configured prefix is required"
        );
        assert_eq!(
            check(&v, &HeaderMap::new(), body, 0),
            Err(AuthFailure::MissingSignature)
        );
    }

    #[test]
    fn hmac_rotation_accepts_old_and_new_secret() {
        let v = Verifier::Hmac {
            spec: spec(false, SignatureEncoding::Base64),
            keys: vec![Key(b"new".to_vec()), Key(b"old".to_vec())],
        };
        let body = b"x=1";
        for key in ["new", "old"] {
            let mut mac = Hmac::<Sha256>::new_from_slice(key.as_bytes()).unwrap();
            mac.update(body);
            let sig = base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes());
            assert_eq!(
                check(
                    &v,
                    &headers(&[("x-signature", format!("sha256={sig}"))]),
                    body,
                    0
                ),
                Ok(())
            );
        }
    }

    #[test]
    fn hmac_timestamp_is_signed_and_bounded() {
        let v = Verifier::Hmac {
            spec: spec(true, SignatureEncoding::Hex),
            keys: vec![Key(b"k1".to_vec())],
        };
        let body = b"x=1";
        let now = 1_700_000_000;
        let signed = |ts: i64| {
            let mut msg = format!("{ts}.").into_bytes();
            msg.extend_from_slice(body);
            headers(&[
                ("x-signature", format!("sha256={}", hmac_hex("k1", &msg))),
                ("x-timestamp", ts.to_string()),
            ])
        };
        assert_eq!(check(&v, &signed(now - 10), body, now), Ok(()));
        assert_eq!(
            check(&v, &signed(now - 301), body, now),
            Err(AuthFailure::StaleTimestamp)
        );
        assert_eq!(
            check(&v, &signed(now + 301), body, now),
            Err(AuthFailure::StaleTimestamp)
        );
        // A signature over the body alone does not pass when a timestamp is required.
        let mut h = headers(&[("x-signature", format!("sha256={}", hmac_hex("k1", body)))]);
        assert_eq!(check(&v, &h, body, now), Err(AuthFailure::MissingTimestamp));
        h.insert("x-timestamp", now.to_string().parse().unwrap());
        assert_eq!(check(&v, &h, body, now), Err(AuthFailure::InvalidSignature));
        // Replaying a signed request with a fresh timestamp does not verify.
        let mut replay = signed(now - 10);
        replay.insert("x-timestamp", now.to_string().parse().unwrap());
        assert_eq!(
            check(&v, &replay, body, now),
            Err(AuthFailure::InvalidSignature)
        );
    }

    /// The Standard Webhooks specification's own example (its libraries' test vector).
    #[test]
    fn standard_webhooks_matches_the_specifications_example() {
        let key =
            standard_webhooks_key(&Secret::new("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw")).unwrap();
        let v = Verifier::StandardWebhooks {
            tolerance: Duration::from_secs(300),
            keys: vec![Key(b"another key".to_vec()), key],
        };
        let body = br#"{"test": 2432232314}"#;
        let sig = "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=";
        let h = headers(&[
            ("webhook-id", "msg_p5jXN8AQM9LWM0D4loKWxJek".into()),
            ("webhook-timestamp", "1614265330".into()),
            // Several entries: an unknown version and a stale signature are skipped.
            (
                "webhook-signature",
                format!("v1a,AAAA v1,{} {sig}", "A".repeat(43) + "="),
            ),
        ]);
        let now = 1_614_265_330 + 60;
        assert_eq!(
            v.verify(&h, body, now).unwrap().signature,
            h.get("webhook-signature").and_then(|v| v.to_str().ok())
        );
        assert_eq!(
            check(&v, &h, body, 1_614_265_330 + 301),
            Err(AuthFailure::StaleTimestamp)
        );
        assert_eq!(
            check(&v, &h, b"{\"test\": 1}", now),
            Err(AuthFailure::InvalidSignature)
        );
        let mut other_id = h.clone();
        other_id.insert("webhook-id", "msg_other".parse().unwrap());
        assert_eq!(
            check(&v, &other_id, body, now),
            Err(AuthFailure::InvalidSignature),
            "the id is signed"
        );
        // Svix's header names carry the same scheme.
        let svix = headers(&[
            ("svix-id", "msg_p5jXN8AQM9LWM0D4loKWxJek".into()),
            ("svix-timestamp", "1614265330".into()),
            ("svix-signature", sig.into()),
        ]);
        assert_eq!(check(&v, &svix, body, now), Ok(()));
        let mut no_id = svix;
        no_id.remove("svix-id");
        assert_eq!(
            check(&v, &no_id, body, now),
            Err(AuthFailure::MissingDeliveryId)
        );
        assert!(standard_webhooks_key(&Secret::new("whsec_not base64!")).is_err());
    }

    #[test]
    fn stripe_header_with_several_v1_entries_and_a_timestamp() {
        let v = Verifier::Stripe {
            tolerance: Duration::from_secs(300),
            keys: vec![Key(b"whsec_test".to_vec())],
        };
        let body = b"{}";
        let now = 1_700_000_000;
        let good = hmac_hex("whsec_test", format!("{now}.{{}}").as_bytes());
        let old = hmac_hex("whsec_retired", format!("{now}.{{}}").as_bytes());
        let h = |value: String| headers(&[("stripe-signature", value)]);
        assert_eq!(
            check(
                &v,
                &h(format!("t={now},v1={old},v1={good},v0=abc")),
                body,
                now
            ),
            Ok(())
        );
        assert_eq!(
            check(&v, &h(format!("t={now},v1={old}")), body, now),
            Err(AuthFailure::InvalidSignature)
        );
        assert_eq!(
            check(&v, &h(format!("v1={good}")), body, now),
            Err(AuthFailure::MissingTimestamp)
        );
        assert_eq!(
            check(&v, &h(format!("t={now}")), body, now),
            Err(AuthFailure::MissingSignature)
        );
        assert_eq!(
            check(&v, &h(format!("t={now},v1={good}")), body, now + 301),
            Err(AuthFailure::StaleTimestamp)
        );
        assert_eq!(
            check(&v, &h(format!("t={now},v1=xyz")), body, now),
            Err(AuthFailure::MalformedSignature)
        );
    }

    #[test]
    fn github_and_shopify_sign_the_body_in_their_headers() {
        let body = b"{\"zen\":\"Keep it logically awesome.\"}";
        let github = Verifier::GitHub {
            keys: vec![Key(b"gh".to_vec())],
        };
        let sig = format!("sha256={}", hmac_hex("gh", body));
        let h = headers(&[("x-hub-signature-256", sig.clone())]);
        assert_eq!(
            github.verify(&h, body, 0).unwrap().signature,
            Some(sig.as_str())
        );
        assert_eq!(
            check(&github, &headers(&[("x-hub-signature", sig)]), body, 0),
            Err(AuthFailure::MissingSignature),
            "the SHA-1 header is not accepted"
        );
        let shopify = Verifier::Shopify {
            keys: vec![Key(b"shp".to_vec())],
        };
        let mut mac = Hmac::<Sha256>::new_from_slice(b"shp").unwrap();
        mac.update(body);
        let sig = base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes());
        assert_eq!(
            check(
                &shopify,
                &headers(&[("x-shopify-hmac-sha256", sig)]),
                body,
                0
            ),
            Ok(())
        );
        assert_eq!(
            check(
                &shopify,
                &headers(&[("x-shopify-hmac-sha256", "AAAA".into())]),
                body,
                0
            ),
            Err(AuthFailure::MalformedSignature)
        );
    }

    #[test]
    fn a_bearer_request_has_no_signature_to_key_on() {
        let v = bearer(&["t"]);
        let h = headers(&[("authorization", "Bearer t".into())]);
        assert_eq!(v.verify(&h, b"", 0).unwrap().signature, None);
    }

    #[test]
    fn debug_never_shows_secrets() {
        let v = Verifier::Hmac {
            spec: spec(false, SignatureEncoding::Hex),
            keys: vec![Key(b"s3cr3t".to_vec())],
        };
        assert!(!format!("{v:?}").contains("s3cr3t"));
        assert!(!format!("{v:?}").contains("115, 51"), "nor its bytes");
    }
}
