//! Kafka over TLS and SASL end to end, as a managed cluster offers it: webhooks become rows
//! through `ssl` and `sasl_ssl` (SCRAM-SHA-512 and SCRAM-SHA-256), dead letters and the operator
//! commands work with the same settings, and each misconfiguration is a clear `/readyz` reason
//! naming the setting, one error line per cause, and 503 with Retry-After for senders, with no
//! secret in logs, metrics or answers.

#![allow(clippy::unwrap_used)]

use std::time::Duration;

use hookpipe_tests::secured::{SecuredBroker, USERS};
use hookpipe_tests::{
    Gateway, Servers, Sink, Wiring, eventually, send_hits, unique, write_catalogue,
};

async fn wiring_on(broker: &SecuredBroker, sasl: bool) -> (Wiring, String, String) {
    let stream = uuid::Uuid::new_v4().to_string();
    let table = format!("local-project.{}.orders", unique("secured"));
    let servers = Servers {
        brokers: broker.brokers(),
        ..Servers::from_env()
    };
    let env = broker.env(sasl.then_some((USERS[0].0, USERS[0].1, "SCRAM-SHA-512")));
    let wiring = Wiring::secured(
        servers,
        write_catalogue(&[(&stream, &table, "UTC")]),
        2,
        broker.props(sasl),
        env,
    )
    .await;
    (wiring, stream, table)
}

fn pairs(env: &[(String, String)]) -> Vec<(&str, &str)> {
    env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect()
}

/// A dead letter: a record on the main topic that is not an envelope, published with the
/// harness's secured client.
async fn publish_garbage(wiring: &Wiring) {
    use rdkafka::producer::{FutureProducer, FutureRecord};
    let producer: FutureProducer = wiring.client_config().create().unwrap();
    producer
        .send(
            FutureRecord::to(&wiring.topic)
                .key("garbage")
                .payload("not an envelope"),
            Duration::from_secs(10),
        )
        .await
        .unwrap();
}

async fn rows_and_dead_letter(wiring: &Wiring, gateway: &Gateway, stream: &str, table: &str) {
    let acked = send_hits(&gateway.url, stream, 20, 2, Duration::ZERO).await;
    publish_garbage(wiring).await;
    wiring
        .assert_exactly_once(table, &acked, Duration::from_secs(90))
        .await;
    // The dead letter is on the dead-letter topic: replay-dlq (with the same settings) counts it.
    let (code, stdout, stderr) = wiring
        .sink_command(&["replay-dlq", "--reason", "unknown_stream", "--dry-run"])
        .await;
    assert_eq!(
        code, 0,
        "replay-dlq over the secured broker: {stdout}{stderr}"
    );
    let now = chrono::Utc::now();
    let since = rfc3339(now - chrono::Duration::minutes(10));
    let until = rfc3339(now + chrono::Duration::minutes(1));
    let (code, stdout, stderr) = wiring
        .sink_command(&["audit", "--since", &since, "--until", &until])
        .await;
    assert_eq!(code, 0, "audit over the secured broker: {stdout}{stderr}");
    assert!(stdout.contains("OK: nothing missing"), "{stdout}");
    // Panics unless the dead letter is there within the time.
    let letters = hookpipe_tests::read_raw_with(
        wiring.client_config(),
        &wiring.dlq_topic,
        1,
        Duration::from_secs(30),
    )
    .await;
    assert_eq!(
        letters[0].0, b"garbage",
        "the dead letter keeps the original key"
    );
}

fn rfc3339(t: chrono::DateTime<chrono::Utc>) -> String {
    t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webhooks_become_rows_over_tls() {
    let broker = SecuredBroker::start(false).await;
    let (wiring, stream, table) = wiring_on(&broker, false).await;
    let gateway = wiring.gateway(&[]).await;
    let _sink = wiring.sink(&[]).await;
    rows_and_dead_letter(&wiring, &gateway, &stream, &table).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webhooks_become_rows_over_sasl_ssl_with_scram_512_and_256() {
    let broker = SecuredBroker::start(true).await;
    let (wiring, stream, table) = wiring_on(&broker, true).await;
    // The sink as the SCRAM-SHA-512 user (the wiring's), the gateway as the SCRAM-SHA-256 one.
    let gateway_env = broker.env(Some((USERS[1].0, USERS[1].1, "SCRAM-SHA-256")));
    let gateway = wiring.gateway(&pairs(&gateway_env)).await;
    let sink: Sink = wiring.sink(&[]).await;
    rows_and_dead_letter(&wiring, &gateway, &stream, &table).await;
    for (_, password, _) in USERS {
        assert!(!gateway.proc.log_text().contains(password));
        assert!(!sink.proc.log_text().contains(password));
    }
}

/// A misconfiguration: what it is, the settings that make it, the setting `/readyz` must name.
type Case<'a> = (&'a str, Vec<(&'a str, &'a str)>, &'a str);

/// Waits for `/readyz` to be 503 with a reason naming `setting`; returns the reason.
async fn unready_for(admin: &str, setting: &str) -> String {
    let url = format!("{admin}/readyz");
    eventually(
        Duration::from_secs(60),
        &format!("/readyz to name {setting}"),
        || {
            let url = url.clone();
            async move {
                let r = reqwest::get(url).await.ok()?;
                if r.status() != 503 {
                    return None;
                }
                let json: serde_json::Value = r.json().await.ok()?;
                let reason = json["reason"].as_str()?.to_owned();
                reason.contains(setting).then_some(reason)
            }
        },
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_misconfiguration_is_a_clear_reason_not_a_silent_503() {
    let broker = SecuredBroker::start(true).await;
    let (wiring, stream, _table) = wiring_on(&broker, true).await;
    let ca = broker.ca.display().to_string();
    let other_ca = broker.other_ca.display().to_string();
    let wrong_password = "not-the-Password-42";
    let (user, _, _) = USERS[0];
    let cases: Vec<Case> = vec![
        (
            "wrong password",
            vec![
                ("HOOKPIPE_KAFKA_SASL_USERNAME", user),
                ("HOOKPIPE_KAFKA_SASL_PASSWORD", wrong_password),
            ],
            "HOOKPIPE_KAFKA_SASL_PASSWORD",
        ),
        (
            "a mechanism the user does not have",
            vec![("HOOKPIPE_KAFKA_SASL_MECHANISM", "SCRAM-SHA-256")],
            "HOOKPIPE_KAFKA_SASL_MECHANISM",
        ),
        (
            "a CA that did not sign the broker's certificate",
            vec![("HOOKPIPE_KAFKA_SSL_CA_LOCATION", other_ca.as_str())],
            "HOOKPIPE_KAFKA_SSL_CA_LOCATION",
        ),
        (
            "plaintext against the TLS port",
            vec![
                ("HOOKPIPE_KAFKA_SECURITY_PROTOCOL", "sasl_plaintext"),
                ("HOOKPIPE_KAFKA_SSL_CA_LOCATION", ca.as_str()),
            ],
            "HOOKPIPE_KAFKA_SECURITY_PROTOCOL",
        ),
    ];
    let client = reqwest::Client::new();
    for (case, overrides, setting) in cases {
        let gateway = wiring.spawn_gateway(&overrides);
        let reason = unready_for(&gateway.admin, setting).await;
        // Senders get the usual outage answer.
        let r = client
            .post(format!("{}/ds/{stream}", gateway.url))
            .body("a=1")
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 503, "{case}");
        assert_eq!(r.headers()["retry-after"], "1", "{case}");
        // The sink says the same.
        let sink = wiring.spawn_sink(&overrides);
        let sink_reason = unready_for(&sink.admin, setting).await;
        // Some more retries, then: one error line for the cause, however often it recurred.
        tokio::time::sleep(Duration::from_secs(3)).await;
        for (what, log, reason) in [
            ("gateway", gateway.proc.log_text(), &reason),
            ("sink", sink.proc.log_text(), &sink_reason),
        ] {
            let lines = log
                .lines()
                .filter(|l| l.contains("ERROR") && l.contains(setting))
                .count();
            assert_eq!(
                lines, 1,
                "{case}, {what}: one error line for the cause:\n{log}"
            );
            for secret in [wrong_password, USERS[0].1, USERS[1].1] {
                assert!(!log.contains(secret), "{case}, {what}: a secret in the log");
                assert!(
                    !reason.contains(secret),
                    "{case}, {what}: a secret in /readyz"
                );
            }
        }
        for admin in [&gateway.admin, &sink.admin] {
            let metrics = reqwest::get(format!("{admin}/metrics"))
                .await
                .unwrap()
                .text()
                .await
                .unwrap();
            assert!(!metrics.contains(wrong_password) && !metrics.contains(USERS[0].1));
        }
    }
}
