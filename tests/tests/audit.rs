//! `bq-sink audit` on the real broker and emulator: a clean pipeline audits OK; a row deleted,
//! a row doubled and a row written by something else are each found and reported per stream
//! and day; `--repair` puts the missing hit back (and the sink writes it once) and prints the
//! SQL for the duplicate; a stream filter and an audit that cannot run behave as documented.

#![allow(clippy::unwrap_used)]

use std::collections::HashSet;
use std::time::Duration;

use hookpipe_proto::{Envelope, Message as _};
use hookpipe_tests::{Wiring, eventually, produce, query, send_hits, unique, write_catalogue};

fn rfc3339(ms: i64) -> String {
    chrono::DateTime::from_timestamp_millis(ms)
        .unwrap()
        .to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

async fn audit(wiring: &Wiring, extra: &[&str]) -> (i32, serde_json::Value, String) {
    let (code, stdout, stderr) = wiring.sink_command(extra).await;
    let json = serde_json::from_str(&stdout).unwrap_or(serde_json::Value::Null);
    (code, json, format!("{stdout}\n{stderr}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_audit_proves_a_clean_day_and_finds_and_repairs_what_went_wrong() {
    let stream = uuid::Uuid::new_v4().to_string();
    let other = uuid::Uuid::new_v4().to_string();
    let dataset = unique("audit");
    let table = format!("local-project.{dataset}.orders");
    let other_table = format!("local-project.{dataset}.leads");
    let wiring = Wiring::new(
        write_catalogue(&[(&stream, &table, "+03:00"), (&other, &other_table, "UTC")]),
        2,
    )
    .await;
    let gateway = wiring.gateway(&[]).await;
    let mut sink = wiring.sink(&[]).await;
    let since = now_ms() - 1_000;
    // Traffic with a sink killed in the middle (SIGKILL: nothing flushed or committed), then
    // a new one: the audit must still see every hit once.
    let mut acked = send_hits(&gateway.url, &stream, 150, 4, Duration::ZERO).await;
    sink.proc.kill9();
    acked.extend(send_hits(&gateway.url, &stream, 150, 4, Duration::ZERO).await);
    let _sink = wiring.sink(&[]).await;
    let other_acked = send_hits(&gateway.url, &other, 20, 2, Duration::ZERO).await;
    // A hit the sink cannot write (its payload is not UTF-8; the gateway would have refused
    // it, so it is put on the topic directly): dead-lettered, and reported so, not missing.
    let poison_hit = uuid::Uuid::new_v4().to_string();
    let poison = Envelope {
        hit_id: poison_hit.clone(),
        received_at_ms: now_ms(),
        stream_id: other.clone(),
        payload: vec![0xff, 0xfe, 0x41].into(),
        method: "POST".into(),
        table: other_table.clone(),
        timezone: "UTC".into(),
        ..Default::default()
    }
    .encode_to_vec();
    produce(
        &wiring.servers.brokers,
        &wiring.topic,
        &[(poison_hit.clone().into_bytes(), poison)],
    )
    .await;
    wiring
        .assert_exactly_once(&table, &acked, Duration::from_secs(90))
        .await;
    wiring
        .assert_exactly_once(&other_table, &other_acked, Duration::from_secs(60))
        .await;
    let until = now_ms() + 1_000;
    let window = [
        "audit",
        "--since",
        &rfc3339(since),
        "--until",
        &rfc3339(until),
        "--format",
        "json",
    ];

    // Clean: exit 0, every accepted hit one row.
    let (code, json, text) = audit(&wiring, &window).await;
    assert_eq!(code, 0, "{text}");
    assert_eq!(json["ok"], true);
    assert_eq!(json["scan"], "offsets-for-time", "{text}");
    let days = json["days"].as_array().unwrap();
    let line = |days: &[serde_json::Value], s: &str| {
        days.iter()
            .filter(|d| d["stream"] == s)
            .fold((0, 0, 0, 0, 0), |acc, d| {
                (
                    acc.0 + d["accepted"].as_u64().unwrap(),
                    acc.1 + d["rows"].as_u64().unwrap(),
                    acc.2 + d["missing"].as_u64().unwrap(),
                    acc.3 + d["duplicated"].as_u64().unwrap(),
                    acc.4 + d["not_in_kafka"].as_u64().unwrap(),
                )
            })
    };
    assert_eq!(line(days, &stream), (300, 300, 0, 0, 0), "{text}");
    // 21 accepted: 20 rows and the poison hit, dead-lettered with its reason.
    assert_eq!(line(days, &other), (21, 20, 0, 0, 0), "{text}");
    let dead: u64 = days
        .iter()
        .filter(|d| d["stream"] == other.as_str())
        .filter_map(|d| d["dead_lettered"]["invalid_payload"].as_u64())
        .sum();
    assert_eq!(dead, 1, "{text}");

    // Break it: delete one hit's row, double another's, add a row nobody sent.
    let mut ids: Vec<&String> = acked.iter().collect();
    ids.sort();
    let (lost, doubled) = (ids[0].clone(), ids[1].clone());
    let stranger = uuid::Uuid::new_v4().to_string();
    for sql in [
        format!("DELETE FROM `{table}` WHERE hit_id = '{lost}'"),
        format!(
            "INSERT INTO `{table}` (hit_id, payload, received_at, date) SELECT hit_id, 'planted copy', received_at, date FROM `{table}` WHERE hit_id = '{doubled}'"
        ),
        format!(
            "INSERT INTO `{table}` (hit_id, payload, received_at, date) SELECT '{stranger}', 'planted stranger', received_at, date FROM `{table}` WHERE hit_id = '{doubled}' LIMIT 1"
        ),
    ] {
        query(&wiring.servers, &sql).await.unwrap();
    }
    let (code, json, text) = audit(&wiring, &window).await;
    assert_eq!(code, 1, "{text}");
    assert_eq!(json["ok"], false);
    let days = json["days"].as_array().unwrap();
    assert_eq!(line(days, &stream), (300, 300, 1, 1, 1), "{text}");
    assert_eq!(line(days, &other), (21, 20, 0, 0, 0), "{text}");
    assert_eq!(json["missing_hit_ids"], serde_json::json!([lost]));
    assert_eq!(json["duplicated_hit_ids"], serde_json::json!([doubled]));

    // The table format says the same for people.
    let table_window: Vec<&str> = window[..5].to_vec();
    let (code, _, text) = audit(&wiring, &table_window).await;
    assert_eq!(code, 1);
    assert!(text.contains("PROBLEM: 1 missing, 1 duplicated"), "{text}");

    // A stream filter audits only that stream.
    let mut filtered = window.to_vec();
    filtered.extend(["--stream", other.as_str()]);
    let (code, json, text) = audit(&wiring, &filtered).await;
    assert_eq!(code, 0, "{text}");
    assert!(
        json["days"]
            .as_array()
            .unwrap()
            .iter()
            .all(|d| d["stream"] == other.as_str()),
        "{text}"
    );

    // Repair: the missing hit goes back on the topic and the sink writes it once; the
    // duplicate gets its SQL, printed and not run.
    let mut repair = window.to_vec();
    repair.push("--repair");
    let (code, json, text) = audit(&wiring, &repair).await;
    assert_eq!(code, 1, "{text}");
    assert_eq!(json["repaired"], serde_json::json!([lost]));
    let sql = json["dedup_sql"][0].as_str().unwrap();
    assert!(sql.contains("MERGE") && sql.contains(&doubled), "{sql}");
    eventually(
        Duration::from_secs(60),
        "the repaired hit to be written",
        || async {
            let rows = query(
                &wiring.servers,
                &format!("SELECT COUNT(*) FROM `{table}` WHERE hit_id = '{lost}'"),
            )
            .await
            .ok()?;
            (rows[0][0].as_deref() == Some("1") && wiring.quiescent().await).then_some(())
        },
    )
    .await;
    // Remove the planted rows (the emulator's DML cannot run the printed MERGE); then clean.
    query(
        &wiring.servers,
        &format!("DELETE FROM `{table}` WHERE payload LIKE 'planted%'"),
    )
    .await
    .unwrap();
    let (code, json, text) = audit(&wiring, &window).await;
    assert_eq!(code, 0, "{text}");
    assert_eq!(
        line(json["days"].as_array().unwrap(), &stream),
        (300, 300, 0, 0, 0),
        "{text}"
    );
    let stored: HashSet<String> = hookpipe_tests::hit_ids(&wiring.servers, &table)
        .await
        .into_iter()
        .collect();
    assert_eq!(stored, acked);

    // An audit that cannot run (a topic that does not exist) exits 2 with the reason.
    let (code, stdout, stderr) = wiring
        .sink_command(&[
            "--topic",
            "no-such-topic-for-audit",
            "audit",
            "--since",
            &rfc3339(since),
            "--until",
            &rfc3339(until),
        ])
        .await;
    assert_eq!(code, 2, "{stdout}{stderr}");
    assert!(stderr.contains("could not run"), "{stderr}");
}
