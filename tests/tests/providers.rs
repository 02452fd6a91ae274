//! Provider signatures (issue #16), on the real broker and emulator: requests signed by the
//! providers' own libraries (Standard Webhooks, Svix, Stripe, GitHub's Octokit; Shopify's
//! documented recipe with node:crypto), run through tests/node/sign.mjs, against a
//! gateway whose catalogue uses each `auth.type`. Checks accept, wrong secret, tampered body,
//! stale timestamp, a rotated secret (a secret file's new content, no catalogue edit), the
//! providers' delivery ids as idempotency keys (a redelivery is one row), a replayed keyless
//! request (one row), and a non-ASCII key (400).

#![allow(clippy::unwrap_used)]

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::time::Duration;

use hookpipe_tests::{Gateway, Wiring, eventually, unique};
use reqwest::header::{HeaderMap, HeaderName, HeaderValue};
use serde_json::{Value, json};

const SW: &str = "1d2c3b4a-5e6f-4a7b-8c9d-0e1f2a3b4c5d";
const STRIPE: &str = "2e3d4c5b-6f7a-4b8c-9d0e-1f2a3b4c5d6e";
const GITHUB: &str = "3f4e5d6c-7a8b-4c9d-8e1f-2a3b4c5d6e7f";
const SHOPIFY: &str = "4a5f6e7d-8b9c-4d0e-9f2a-3b4c5d6e7f8a";

// Standard Webhooks secrets are `whsec_` + base64 of the key bytes.
const SW_OLD: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
const SW_NEW: &str = "whsec_c2Vjb25kLXN0YW5kYXJkLXdlYmhvb2tzLWtleQ==";
const STRIPE_SECRET: &str = "whsec_stripe_test_0123456789abcdef";
const GITHUB_OLD: &str = "github-old-secret";
const GITHUB_NEW: &str = "github-new-secret";
const SHOPIFY_SECRET: &str = "shpss_0123456789abcdef0123456789abcdef";

const BODY: &str = r#"{"order_id":"N1","status":"delivered","total":120.13}"#;

/// One request to sign with a provider's library.
fn req(scheme: &str, secret: &str, body: &str, timestamp: i64, id: &str) -> Value {
    json!({"scheme": scheme, "secret": secret, "body": body, "timestamp": timestamp, "id": id})
}

/// Headers for each request, made by tests/node/sign.mjs with the providers' libraries.
fn sign(requests: &[Value]) -> Vec<HeaderMap> {
    let tools = std::env::var("HOOKPIPE_TEST_NODE_TOOLS")
        .expect("HOOKPIPE_TEST_NODE_TOOLS (set by scripts/test: ensure_node_test_tools)");
    let signer = std::path::Path::new(&tools).join("sign.mjs");
    let mut child = std::process::Command::new("node")
        .arg(&signer)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    {
        use std::io::Write as _;
        let mut stdin = child.stdin.take().unwrap();
        stdin
            .write_all(serde_json::to_string(requests).unwrap().as_bytes())
            .unwrap();
    }
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "the signer failed");
    let signed: Vec<serde_json::Map<String, Value>> = serde_json::from_slice(&out.stdout).unwrap();
    signed
        .into_iter()
        .map(|headers| {
            headers
                .into_iter()
                .map(|(k, v)| {
                    (
                        HeaderName::try_from(k).unwrap(),
                        HeaderValue::from_str(v.as_str().unwrap()).unwrap(),
                    )
                })
                .collect()
        })
        .collect()
}

fn now() -> i64 {
    chrono::Utc::now().timestamp()
}

struct Answer {
    status: u16,
    body: Value,
}

impl Answer {
    fn hit_id(&self) -> String {
        assert_eq!(
            self.status, 202,
            "expected 202, got {}: {}",
            self.status, self.body
        );
        self.body["hit_id"].as_str().unwrap().to_owned()
    }

    fn refused(&self, status: u16, error: &str) {
        assert_eq!(self.status, status, "{}", self.body);
        assert_eq!(self.body["error"], error, "{}", self.body);
    }
}

async fn send(gateway: &Gateway, stream: &str, headers: HeaderMap, body: &str) -> Answer {
    let response = reqwest::Client::new()
        .post(format!("{}/ds/{stream}", gateway.url))
        .headers(headers)
        .header("content-type", "application/json")
        .body(body.to_owned())
        .send()
        .await
        .unwrap();
    let status = response.status().as_u16();
    let body = response.json().await.unwrap_or(Value::Null);
    Answer { status, body }
}

fn write_secret(dir: &Path, name: &str, value: &str) -> PathBuf {
    let path = dir.join(name);
    // Written whole and renamed, as the kubelet swaps a Secret volume's files.
    let tmp = dir.join(format!(".{name}.tmp"));
    std::fs::write(&tmp, format!("{value}\n")).unwrap();
    std::fs::rename(&tmp, &path).unwrap();
    path
}

async fn pipeline() -> (Wiring, Gateway, PathBuf) {
    let dir = std::env::temp_dir().join(unique("hookpipe-providers"));
    std::fs::create_dir_all(&dir).unwrap();
    let sw = write_secret(&dir, "sw", SW_OLD);
    let github = write_secret(&dir, "github", GITHUB_OLD);
    let catalogue = dir.join("streams.yaml");
    std::fs::write(
        &catalogue,
        format!(
            "streams:
  - id: {SW}
    table: local-project.providers.standard_webhooks
    timezone: UTC
    auth:
      type: standard-webhooks
      secrets: [{{file: {sw}}}, {{env: PROVIDERS_SW_NEW}}]
  - id: {STRIPE}
    table: local-project.providers.stripe
    timezone: UTC
    auth:
      type: stripe
      secrets: [{{env: PROVIDERS_STRIPE}}]
  - id: {GITHUB}
    table: local-project.providers.github
    timezone: UTC
    auth:
      type: github
      secrets: [{{file: {github}}}]
  - id: {SHOPIFY}
    table: local-project.providers.shopify
    timezone: UTC
    auth:
      type: shopify
      secrets: [{{env: PROVIDERS_SHOPIFY}}]
",
            sw = sw.display(),
            github = github.display(),
        ),
    )
    .unwrap();
    let wiring = Wiring::new(catalogue, 2).await;
    let gateway = wiring
        .gateway(&[
            ("PROVIDERS_SW_NEW", SW_NEW),
            ("PROVIDERS_STRIPE", STRIPE_SECRET),
            ("PROVIDERS_SHOPIFY", SHOPIFY_SECRET),
            ("HOOKPIPE_CATALOGUE_RELOAD_INTERVAL", "1s"),
        ])
        .await;
    (wiring, gateway, dir)
}

#[tokio::test]
async fn providers_signatures_delivery_ids_replays_and_rotation() {
    let (wiring, gateway, dir) = pipeline().await;
    let _sink = wiring.sink(&[]).await;
    let t = now();
    let mut acked: [HashSet<String>; 4] = Default::default();

    // --- Standard Webhooks (and Svix's header names) -----------------------------------
    let signed = sign(&[
        req("standard-webhooks", SW_OLD, BODY, t, "msg_1"),
        req("standard-webhooks", SW_NEW, BODY, t, "msg_2"),
        // The provider's retry of msg_1: a new attempt, a new timestamp, the same id.
        req("standard-webhooks", SW_OLD, BODY, t + 7, "msg_1"),
        req("svix", SW_OLD, BODY, t, "msg_3"),
        req(
            "standard-webhooks",
            "whsec_d3Jvbmcta2V5LXdyb25nLWtleQ==",
            BODY,
            t,
            "msg_4",
        ),
        req("standard-webhooks", SW_OLD, BODY, t - 600, "msg_5"),
        req("standard-webhooks", SW_OLD, BODY, t, "msg_6"),
    ]);
    let first = send(&gateway, SW, signed[0].clone(), BODY).await.hit_id();
    let rotated = send(&gateway, SW, signed[1].clone(), BODY).await.hit_id();
    let retry = send(&gateway, SW, signed[2].clone(), BODY).await.hit_id();
    assert_eq!(
        first, retry,
        "a redelivery (same webhook-id) is the same hit"
    );
    assert_ne!(first, rotated);
    let svix = send(&gateway, SW, signed[3].clone(), BODY).await.hit_id();
    acked[0].extend([first, rotated, svix]);
    send(&gateway, SW, signed[4].clone(), BODY)
        .await
        .refused(401, "invalid signature");
    send(&gateway, SW, signed[5].clone(), BODY)
        .await
        .refused(401, "signature timestamp outside tolerance");
    send(
        &gateway,
        SW,
        signed[6].clone(),
        &BODY.replace("120.13", "0.01"),
    )
    .await
    .refused(401, "invalid signature");
    let mut no_id = signed[6].clone();
    no_id.remove("webhook-id");
    send(&gateway, SW, no_id, BODY)
        .await
        .refused(401, "missing webhook-id");

    // --- Stripe: no delivery id header; a replayed request keys on its signature --------
    let signed = sign(&[
        req("stripe", STRIPE_SECRET, BODY, t, ""),
        req("stripe", STRIPE_SECRET, BODY, t + 1, ""),
        req("stripe", "whsec_wrong", BODY, t, ""),
        req("stripe", STRIPE_SECRET, BODY, t - 600, ""),
    ]);
    let captured = send(&gateway, STRIPE, signed[0].clone(), BODY)
        .await
        .hit_id();
    let replayed = send(&gateway, STRIPE, signed[0].clone(), BODY)
        .await
        .hit_id();
    assert_eq!(
        captured, replayed,
        "a replayed signed request is the same hit"
    );
    let other = send(&gateway, STRIPE, signed[1].clone(), BODY)
        .await
        .hit_id();
    assert_ne!(captured, other, "another signing is another hit");
    acked[1].extend([captured, other]);
    send(&gateway, STRIPE, signed[2].clone(), BODY)
        .await
        .refused(401, "invalid signature");
    send(&gateway, STRIPE, signed[3].clone(), BODY)
        .await
        .refused(401, "signature timestamp outside tolerance");
    send(&gateway, STRIPE, signed[0].clone(), "{}")
        .await
        .refused(401, "invalid signature");

    // --- GitHub: X-GitHub-Delivery is the key; the secret rotates in its file -----------
    let signed = sign(&[
        req(
            "github",
            GITHUB_OLD,
            BODY,
            0,
            "72d3162e-cc78-11e3-81ab-4c9367dc0958",
        ),
        req(
            "github",
            GITHUB_NEW,
            BODY,
            0,
            "72d3162e-cc78-11e3-81ab-4c9367dc0959",
        ),
    ]);
    let delivery = send(&gateway, GITHUB, signed[0].clone(), BODY)
        .await
        .hit_id();
    let redelivery = send(&gateway, GITHUB, signed[0].clone(), BODY)
        .await
        .hit_id();
    assert_eq!(delivery, redelivery, "a GitHub redelivery is the same hit");
    acked[2].insert(delivery);
    send(&gateway, GITHUB, signed[1].clone(), BODY)
        .await
        .refused(401, "invalid signature");
    send(&gateway, GITHUB, signed[0].clone(), "{}")
        .await
        .refused(401, "invalid signature");
    // A delivery id that is not visible ASCII is refused, not ignored (it would make every
    // redelivery a new row).
    let mut bad_key = signed[0].clone();
    bad_key.insert(
        "x-github-delivery",
        HeaderValue::from_bytes("caf\u{e9}".as_bytes()).unwrap(),
    );
    send(&gateway, GITHUB, bad_key, BODY)
        .await
        .refused(400, "idempotency key must be visible ASCII");
    // Rotation: the Secret's file gets the new secret; within the reload interval (1 s here)
    // the new one passes and the old one no longer does. No catalogue edit.
    write_secret(&dir, "github", GITHUB_NEW);
    let rotated = eventually(Duration::from_secs(15), "the rotated GitHub secret", || {
        let headers = signed[1].clone();
        let gateway = &gateway;
        async move {
            let answer = send(gateway, GITHUB, headers, BODY).await;
            (answer.status == 202).then(|| answer.hit_id())
        }
    })
    .await;
    acked[2].insert(rotated);
    send(&gateway, GITHUB, signed[0].clone(), BODY)
        .await
        .refused(401, "invalid signature");

    // --- Shopify: X-Shopify-Webhook-Id is the key ----------------------------------------
    let signed = sign(&[
        req(
            "shopify",
            SHOPIFY_SECRET,
            BODY,
            0,
            "b54557e4-bdd9-4b37-8a5f-bf7d70bcd043",
        ),
        req(
            "shopify",
            "shpss_wrong",
            BODY,
            0,
            "b54557e4-bdd9-4b37-8a5f-bf7d70bcd044",
        ),
    ]);
    let shop = send(&gateway, SHOPIFY, signed[0].clone(), BODY)
        .await
        .hit_id();
    let shop_again = send(&gateway, SHOPIFY, signed[0].clone(), BODY)
        .await
        .hit_id();
    assert_eq!(shop, shop_again, "a Shopify retry is the same hit");
    acked[3].insert(shop);
    send(&gateway, SHOPIFY, signed[1].clone(), BODY)
        .await
        .refused(401, "invalid signature");
    let mut unsigned = signed[0].clone();
    unsigned.remove("x-shopify-hmac-sha256");
    send(&gateway, SHOPIFY, unsigned, BODY)
        .await
        .refused(401, "missing signature");

    // Every accepted hit is one row; redeliveries and replays added none.
    for (table, hits) in [
        "local-project.providers.standard_webhooks",
        "local-project.providers.stripe",
        "local-project.providers.github",
        "local-project.providers.shopify",
    ]
    .into_iter()
    .zip(&acked)
    {
        wiring
            .assert_exactly_once(table, hits, Duration::from_secs(120))
            .await;
    }
}
