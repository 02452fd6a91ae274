//! Per-stream sender authentication: a bearer token, or an HMAC-SHA256 signature of the raw
//! body (optionally with a signed timestamp against replay). Several secrets may be active at
//! once for rotation; every comparison is constant-time.

use base64::Engine;
use hmac::{Hmac, Mac};
use hookpipe_common::Secret;
use hookpipe_common::catalogue::{AuthSpec, HmacSpec, SecretRef, SignatureEncoding};
use sha2::Sha256;
use subtle::ConstantTimeEq;

use axum::http::HeaderMap;

/// A stream's auth rule with its secrets resolved.
#[derive(Debug)]
pub enum Verifier {
    Bearer { tokens: Vec<Secret> },
    Hmac { spec: HmacSpec, keys: Vec<Secret> },
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

impl Verifier {
    pub fn from_spec(spec: &AuthSpec) -> Result<Self, String> {
        let secrets = spec
            .secrets()
            .iter()
            .map(resolve)
            .collect::<Result<Vec<_>, _>>()?;
        Ok(match spec {
            AuthSpec::Bearer { .. } => Verifier::Bearer { tokens: secrets },
            AuthSpec::HmacSha256(h) => Verifier::Hmac {
                spec: h.clone(),
                keys: secrets,
            },
        })
    }

    /// Checks a request. `now_secs` is the gateway's clock (Unix seconds), passed in so the
    /// check stays pure.
    pub fn verify(
        &self,
        headers: &HeaderMap,
        body: &[u8],
        now_secs: i64,
    ) -> Result<(), AuthFailure> {
        match self {
            Verifier::Bearer { tokens } => {
                let value = headers
                    .get(axum::http::header::AUTHORIZATION)
                    .and_then(|v| v.to_str().ok())
                    .ok_or(AuthFailure::MissingCredentials)?;
                let token = value
                    .strip_prefix("Bearer ")
                    .or_else(|| value.strip_prefix("bearer "))
                    .ok_or(AuthFailure::MissingCredentials)?
                    .trim();
                // Check every token, so the time taken does not tell which one matched.
                let matched = tokens.iter().fold(0u8, |acc, t| {
                    acc | t.expose().as_bytes().ct_eq(token.as_bytes()).unwrap_u8()
                });
                if matched == 1 {
                    Ok(())
                } else {
                    Err(AuthFailure::InvalidToken)
                }
            }
            Verifier::Hmac { spec, keys } => verify_hmac(spec, keys, headers, body, now_secs),
        }
    }
}

fn verify_hmac(
    spec: &HmacSpec,
    keys: &[Secret],
    headers: &HeaderMap,
    body: &[u8],
    now_secs: i64,
) -> Result<(), AuthFailure> {
    let header = headers
        .get(spec.header.as_str())
        .and_then(|v| v.to_str().ok())
        .ok_or(AuthFailure::MissingSignature)?
        .trim();
    let encoded = header
        .strip_prefix(spec.prefix.as_str())
        .ok_or(AuthFailure::MalformedSignature)?;
    let given = match spec.encoding {
        SignatureEncoding::Hex => decode_hex(encoded),
        SignatureEncoding::Base64 => base64::engine::general_purpose::STANDARD
            .decode(encoded)
            .ok(),
    }
    .filter(|sig| sig.len() == 32)
    .ok_or(AuthFailure::MalformedSignature)?;

    let timestamp = match &spec.timestamp_header {
        Some(name) => {
            let ts = headers
                .get(name.as_str())
                .and_then(|v| v.to_str().ok())
                .ok_or(AuthFailure::MissingTimestamp)?
                .trim();
            let secs: i64 = ts.parse().map_err(|_| AuthFailure::MissingTimestamp)?;
            let tolerance = i64::try_from(spec.tolerance.as_secs()).unwrap_or(i64::MAX);
            if now_secs.abs_diff(secs) > tolerance.unsigned_abs() {
                return Err(AuthFailure::StaleTimestamp);
            }
            Some(ts)
        }
        None => None,
    };

    let mut matched = 0u8;
    for key in keys {
        let Ok(mut mac) = Hmac::<Sha256>::new_from_slice(key.expose().as_bytes()) else {
            continue;
        };
        if let Some(ts) = timestamp {
            mac.update(ts.as_bytes());
            mac.update(b".");
        }
        mac.update(body);
        matched |= mac
            .finalize()
            .into_bytes()
            .as_slice()
            .ct_eq(&given)
            .unwrap_u8();
    }
    if matched == 1 {
        Ok(())
    } else {
        Err(AuthFailure::InvalidSignature)
    }
}

fn decode_hex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
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

    fn headers(pairs: &[(&'static str, String)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(*k, v.parse().unwrap());
        }
        h
    }

    #[test]
    fn bearer_accepts_any_active_token_and_refuses_others() {
        let v = Verifier::Bearer {
            tokens: vec![Secret::new("old-token"), Secret::new("new-token")],
        };
        for t in ["old-token", "new-token"] {
            assert_eq!(
                v.verify(
                    &headers(&[("authorization", format!("Bearer {t}"))]),
                    b"",
                    0
                ),
                Ok(())
            );
        }
        assert_eq!(
            v.verify(&headers(&[("authorization", "Bearer nope".into())]), b"", 0),
            Err(AuthFailure::InvalidToken)
        );
        assert_eq!(
            v.verify(&HeaderMap::new(), b"", 0),
            Err(AuthFailure::MissingCredentials)
        );
        assert_eq!(
            v.verify(
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
            keys: vec![Secret::new("k1")],
        };
        let body = b"orderId=N1&status=delivered";
        let good = format!("sha256={}", hmac_hex("k1", body));
        assert_eq!(
            v.verify(&headers(&[("x-signature", good.clone())]), body, 0),
            Ok(())
        );
        assert_eq!(
            v.verify(
                &headers(&[("x-signature", good)]),
                b"orderId=N1&status=refunded",
                0
            ),
            Err(AuthFailure::InvalidSignature)
        );
        let wrong_key = format!("sha256={}", hmac_hex("k2", body));
        assert_eq!(
            v.verify(&headers(&[("x-signature", wrong_key)]), body, 0),
            Err(AuthFailure::InvalidSignature)
        );
        assert_eq!(
            v.verify(&headers(&[("x-signature", "sha256=zz".into())]), body, 0),
            Err(AuthFailure::MalformedSignature)
        );
        assert_eq!(
            v.verify(&headers(&[("x-signature", hmac_hex("k1", body))]), body, 0),
            Err(AuthFailure::MalformedSignature),
            "the configured prefix is required"
        );
        assert_eq!(
            v.verify(&HeaderMap::new(), body, 0),
            Err(AuthFailure::MissingSignature)
        );
    }

    #[test]
    fn hmac_rotation_accepts_old_and_new_secret() {
        let v = Verifier::Hmac {
            spec: spec(false, SignatureEncoding::Base64),
            keys: vec![Secret::new("new"), Secret::new("old")],
        };
        let body = b"x=1";
        for key in ["new", "old"] {
            let mut mac = Hmac::<Sha256>::new_from_slice(key.as_bytes()).unwrap();
            mac.update(body);
            let sig = base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes());
            assert_eq!(
                v.verify(
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
            keys: vec![Secret::new("k1")],
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
        assert_eq!(v.verify(&signed(now - 10), body, now), Ok(()));
        assert_eq!(
            v.verify(&signed(now - 301), body, now),
            Err(AuthFailure::StaleTimestamp)
        );
        assert_eq!(
            v.verify(&signed(now + 301), body, now),
            Err(AuthFailure::StaleTimestamp)
        );
        // A signature over the body alone does not pass when a timestamp is required.
        let mut h = headers(&[("x-signature", format!("sha256={}", hmac_hex("k1", body)))]);
        assert_eq!(v.verify(&h, body, now), Err(AuthFailure::MissingTimestamp));
        h.insert("x-timestamp", now.to_string().parse().unwrap());
        assert_eq!(v.verify(&h, body, now), Err(AuthFailure::InvalidSignature));
        // Replaying a signed request with a fresh timestamp does not verify.
        let mut replay = signed(now - 10);
        replay.insert("x-timestamp", now.to_string().parse().unwrap());
        assert_eq!(
            v.verify(&replay, body, now),
            Err(AuthFailure::InvalidSignature)
        );
    }

    #[test]
    fn debug_never_shows_secrets() {
        let v = Verifier::Bearer {
            tokens: vec![Secret::new("s3cr3t")],
        };
        assert!(!format!("{v:?}").contains("s3cr3t"));
    }
}
