//! bq-sink on the real broker and emulator, under the failures that lose or duplicate data
//! elsewhere: kill -9 mid-stream, a consumer leaving the group, BigQuery down, poison records,
//! a sender's retry. Each test checks what an analyst would: every acknowledged hit is in the
//! table exactly once (`COUNT(*) = COUNT(DISTINCT hit_id)` = number acknowledged).

#![allow(clippy::unwrap_used)]

use std::collections::HashSet;
use std::time::Duration;

use hookpipe_proto::{DeadLetter, Envelope, Message as _};
use hookpipe_tests::{
    PrivateBroker, PrivateEmulator, Servers, Wiring, counts, eventually, hit_ids, metric, produce,
    query, read_raw, replace_catalogue, send_hits, unique, write_catalogue,
};

fn new_stream() -> String {
    uuid::Uuid::new_v4().to_string()
}

/// Small batches and a small dedup window, so commits, pauses and suspect lookups all happen
/// within a short test.
const SINK_TUNING: &[(&str, &str)] = &[
    ("HOOKPIPE_BATCH_MAX_ROWS", "50"),
    ("HOOKPIPE_BATCH_MAX_AGE", "200ms"),
    ("HOOKPIPE_DEDUP_WINDOW", "400"),
    ("HOOKPIPE_RETRY_INITIAL", "50ms"),
    ("HOOKPIPE_RETRY_MAX", "1s"),
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_of_the_sink_at_random_moments_loses_and_duplicates_nothing() {
    let stream = new_stream();
    let table = format!("local-project.{}.orders", unique("kill9"));
    let catalogue = write_catalogue(&[(&stream, &table, "+03:00")]);
    let wiring = Wiring::new(catalogue, 3).await;
    let gateway = wiring.gateway(&[]).await;
    // A short session timeout, so the group notices each crash quickly.
    let tuning: Vec<(&str, &str)> = SINK_TUNING
        .iter()
        .copied()
        .chain([("HOOKPIPE_SESSION_TIMEOUT", "2s")])
        .collect();
    let mut sink = wiring.sink(&tuning).await;

    let load = tokio::spawn({
        let (url, stream) = (gateway.url.clone(), stream.clone());
        async move { send_hits(&url, &stream, 3000, 6, Duration::from_millis(5)).await }
    });
    for round in 0..4 {
        // Once this sink is writing, a random moment up to 1.5 s later.
        eventually(Duration::from_secs(60), "the sink to write rows", || {
            let admin = sink.admin.clone();
            async move { (metric(&admin, "bq_sink_rows_written_total", &[]).await > 0.0).then_some(()) }
        })
        .await;
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .subsec_nanos();
        tokio::time::sleep(Duration::from_millis(u64::from(nanos % 1500))).await;
        let written = metric(&sink.admin, "bq_sink_rows_written_total", &[]).await;
        sink.proc.kill9();
        eprintln!("round {round}: killed the sink after it wrote {written} rows");
        // Restart at once, as a supervisor would: the new member joins before the group
        // notices the crash (session timeout 2 s here) and must still get the partitions.
        sink = wiring.sink(&tuning).await;
    }
    let acked = load.await.unwrap();
    assert_eq!(acked.len(), 3000);
    wiring
        .assert_exactly_once(&table, &acked, Duration::from_secs(90))
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_sinks_share_the_partitions_and_one_leaves() {
    let stream = new_stream();
    let table = format!("local-project.{}.orders", unique("rebalance"));
    let catalogue = write_catalogue(&[(&stream, &table, "UTC")]);
    let wiring = Wiring::new(catalogue, 4).await;
    let gateway = wiring.gateway(&[]).await;
    let first = wiring.sink(SINK_TUNING).await;
    let mut second = wiring.sink(SINK_TUNING).await;

    let load = tokio::spawn({
        let (url, stream) = (gateway.url.clone(), stream.clone());
        async move { send_hits(&url, &stream, 2000, 6, Duration::from_millis(5)).await }
    });
    // Both members work, then the second leaves mid-stream. Up to 90 s: after an assignment a
    // sink looks its first records up in the table before it writes them, and the emulator has
    // twice taken tens of seconds to answer (lookups, appends) while the other tests in this
    // binary load it.
    eventually(Duration::from_secs(90), "both sinks to write rows", || {
        let (a, b) = (first.admin.clone(), second.admin.clone());
        async move {
            let wa = metric(&a, "bq_sink_rows_written_total", &[]).await;
            let wb = metric(&b, "bq_sink_rows_written_total", &[]).await;
            (wa > 0.0 && wb > 0.0).then_some(())
        }
    })
    .await;
    let status =
        tokio::task::spawn_blocking(move || second.proc.terminate(Duration::from_secs(30)))
            .await
            .unwrap();
    assert!(status.success(), "the leaving sink exited with {status:?}");
    // And a new member joins while traffic flows.
    let third = wiring.sink(SINK_TUNING).await;
    let acked = load.await.unwrap();
    wiring
        .assert_exactly_once(&table, &acked, Duration::from_secs(90))
        .await;
    drop((first, third));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bigquery_down_for_a_while_is_retried_without_loss_or_duplicates() {
    let mut emulator = PrivateEmulator::start().await;
    let servers = Servers {
        bq_rest: emulator.rest(),
        bq_grpc: emulator.grpc(),
        ..Servers::from_env()
    };
    let stream = new_stream();
    let table = format!("local-project.{}.orders", unique("outage"));
    let catalogue = write_catalogue(&[(&stream, &table, "Europe/Berlin")]);
    let wiring = Wiring::on(servers, catalogue, 2).await;
    let gateway = wiring.gateway(&[]).await;
    let sink = wiring.sink(SINK_TUNING).await;

    let mut acked = send_hits(&gateway.url, &stream, 300, 4, Duration::ZERO).await;
    eventually(Duration::from_secs(30), "the first rows", || {
        let servers = wiring.servers.clone();
        let table = table.clone();
        async move { counts(&servers, &table).await.filter(|(n, _)| *n > 0) }
    })
    .await;
    emulator.stop();
    acked.extend(send_hits(&gateway.url, &stream, 300, 4, Duration::ZERO).await);
    eventually(Duration::from_secs(30), "the sink to retry", || {
        let admin = sink.admin.clone();
        async move { (metric(&admin, "bq_sink_retries_total", &[]).await >= 3.0).then_some(()) }
    })
    .await;
    emulator.resume().await;
    wiring
        .assert_exactly_once(&table, &acked, Duration::from_secs(90))
        .await;
    assert_eq!(
        metric(&sink.admin, "bq_sink_dead_letters_total", &[]).await,
        0.0,
        "nothing was dead-lettered"
    );
}

/// Found while checking the README's flow on an old local broker: a group that another
/// assignment strategy holds refuses the sink; it must say so and not claim to be ready.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sink_the_group_refuses_says_why_and_is_not_ready() {
    let stream = new_stream();
    let table = format!("local-project.{}.orders", unique("refused"));
    let catalogue = write_catalogue(&[(&stream, &table, "UTC")]);
    let wiring = Wiring::new(catalogue, 2).await;
    let _holder = wiring
        .sink(&[("HOOKPIPE_ASSIGNMENT_STRATEGY", "roundrobin")])
        .await;
    let refused = wiring.spawn_sink(&[("HOOKPIPE_ASSIGNMENT_STRATEGY", "range")]);
    eventually(Duration::from_secs(30), "the refusal in the log", || {
        let text = refused.proc.log_text();
        async move {
            text.contains("the consumer group refuses this sink")
                .then_some(())
        }
    })
    .await;
    // Readiness is checked every 2 s; two answers in a row after the refusal must be 503.
    let client = reqwest::Client::new();
    for _ in 0..2 {
        tokio::time::sleep(Duration::from_millis(2100)).await;
        let status = client
            .get(format!("{}/readyz", refused.admin))
            .send()
            .await
            .unwrap()
            .status();
        assert_eq!(status, 503, "a refused sink must not be ready");
    }
}

/// Found by the soak: after a broker restart the sink must rejoin its group and go on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_restart_is_survived_without_loss_or_duplicates() {
    let mut broker = PrivateBroker::start().await;
    let servers = Servers {
        brokers: broker.brokers(),
        ..Servers::from_env()
    };
    let stream = new_stream();
    let table = format!("local-project.{}.orders", unique("brokerrestart"));
    let catalogue = write_catalogue(&[(&stream, &table, "Asia/Tokyo")]);
    let wiring = Wiring::on(servers, catalogue, 2).await;
    let gateway = wiring.gateway(&[]).await;
    let _sink = wiring.sink(SINK_TUNING).await;

    let mut acked = send_hits(&gateway.url, &stream, 300, 4, Duration::ZERO).await;
    wiring
        .assert_exactly_once(&table, &acked, Duration::from_secs(60))
        .await;
    broker.stop();
    broker.resume().await;
    acked.extend(send_hits(&gateway.url, &stream, 300, 4, Duration::ZERO).await);
    wiring
        .assert_exactly_once(&table, &acked, Duration::from_secs(90))
        .await;
}

fn envelope(stream: &str, payload: &str, received_at_ms: i64) -> (Vec<u8>, Vec<u8>) {
    let hit_id = uuid::Uuid::now_v7().to_string();
    let value = Envelope {
        hit_id: hit_id.clone(),
        received_at_ms,
        stream_id: stream.to_owned(),
        payload: payload.as_bytes().to_vec().into(),
        content_type: "application/x-www-form-urlencoded".into(),
        method: "POST".into(),
        ..Default::default()
    }
    .encode_to_vec();
    (hit_id.into_bytes(), value)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn poison_unknown_stream_and_bad_rows_are_dead_lettered_and_replay_brings_them_back() {
    let (good, unknown, misfit) = (new_stream(), new_stream(), new_stream());
    let dataset = unique("poison");
    let good_table = format!("local-project.{dataset}.good");
    let unknown_table = format!("local-project.{dataset}.later");
    let misfit_table = format!("local-project.{dataset}.misfit");
    let catalogue =
        write_catalogue(&[(&good, &good_table, "UTC"), (&misfit, &misfit_table, "UTC")]);
    let wiring = Wiring::new(catalogue.clone(), 1).await;

    // A table whose schema does not fit: `payload` is INT64.
    let servers = wiring.servers.clone();
    let http = reqwest::Client::new();
    let api = format!("{}/bigquery/v2/projects/local-project", servers.bq_rest);
    http.post(format!("{api}/datasets"))
        .json(&serde_json::json!({"datasetReference": {"projectId": "local-project", "datasetId": dataset}}))
        .send()
        .await
        .unwrap();
    let created = http
        .post(format!("{api}/datasets/{dataset}/tables"))
        .json(&serde_json::json!({
            "tableReference": {"projectId": "local-project", "datasetId": dataset, "tableId": "misfit"},
            "schema": {"fields": [
                {"name": "hit_id", "type": "STRING", "mode": "REQUIRED"},
                {"name": "payload", "type": "INT64"},
                {"name": "received_at", "type": "INT64"},
                {"name": "date", "type": "DATE"}]}
        }))
        .send()
        .await
        .unwrap();
    assert!(created.status().is_success());

    let now = hookpipe_tests_now_ms();
    let good_1 = envelope(&good, "orderId=N1&status=delivered", now);
    let not_an_envelope = (b"k1".to_vec(), b"\xff\xfe this is not protobuf".to_vec());
    let unknown_1 = envelope(&unknown, "leadId=L1&status=new", now);
    // Received in the year 11476: its `date` is outside BigQuery's DATE range. BigQuery would
    // refuse it (the emulator with HTTP 500 for the whole request), so the sink dead-letters it
    // before writing (found by the property tests).
    let bad_row = envelope(&good, "orderId=N2&status=refunded", 300_000_000_000_000);
    let misfit_1 = envelope(&misfit, "orderId=N3", now);
    let good_2 = envelope(&good, "orderId=N4&status=shipped", now);
    produce(
        &servers.brokers,
        &wiring.topic,
        &[
            good_1.clone(),
            not_an_envelope.clone(),
            unknown_1.clone(),
            bad_row.clone(),
            misfit_1.clone(),
            good_2.clone(),
        ],
    )
    .await;
    let sink = wiring.sink(SINK_TUNING).await;

    // The good rows around them land.
    let good_ids: HashSet<String> = [&good_1, &good_2]
        .iter()
        .map(|(k, _)| String::from_utf8(k.clone()).unwrap())
        .collect();
    let landed = eventually(Duration::from_secs(60), "the good rows", || {
        let (servers, table) = (servers.clone(), good_table.clone());
        async move {
            let ids: HashSet<String> = query(&servers, &format!("SELECT hit_id FROM `{table}`"))
                .await
                .ok()?
                .into_iter()
                .filter_map(|r| r.into_iter().next().flatten())
                .collect();
            (ids.len() >= 2).then_some(ids)
        }
    })
    .await;
    assert_eq!(landed, good_ids);

    // The other four are on the dead-letter topic, each with its reason and the original bytes.
    let letters: Vec<DeadLetter> = read_raw(
        &servers.brokers,
        &wiring.dlq_topic,
        4,
        Duration::from_secs(60),
    )
    .await
    .into_iter()
    .map(|(_, v)| DeadLetter::decode(v.as_slice()).unwrap())
    .collect();
    let reason_of = |original: &[u8]| {
        letters
            .iter()
            .find(|l| l.original == original)
            .map(|l| l.reason.clone())
            .unwrap_or_else(|| panic!("no dead letter for a record"))
    };
    assert_eq!(reason_of(&not_an_envelope.1), "undecodable");
    assert_eq!(reason_of(&unknown_1.1), "unknown_stream");
    assert_eq!(reason_of(&bad_row.1), "undecodable");
    assert_eq!(reason_of(&misfit_1.1), "schema_mismatch");
    for (reason, count) in [
        ("undecodable", 2.0),
        ("unknown_stream", 1.0),
        ("schema_mismatch", 1.0),
    ] {
        assert_eq!(
            metric(
                &sink.admin,
                "bq_sink_dead_letters_total",
                &[("reason", reason)]
            )
            .await,
            count,
            "{reason}"
        );
    }

    // Fix the cause (add the stream), then replay that reason: the row lands, once, even when
    // replayed twice.
    replace_catalogue(
        &catalogue,
        &[
            (&good, &good_table, "UTC"),
            (&misfit, &misfit_table, "UTC"),
            (&unknown, &unknown_table, "UTC"),
        ],
    );
    eventually(
        Duration::from_secs(10),
        "the sink to load the new catalogue",
        || {
            let admin = sink.admin.clone();
            async move {
                (metric(
                    &admin,
                    "bq_sink_catalogue_reloads_total",
                    &[("outcome", "applied")],
                )
                .await
                    >= 1.0)
                    .then_some(())
            }
        },
    )
    .await;
    // The replay's cursor: a second run finds nothing new; `--from-start` replays again,
    // which the sink's lookup makes harmless.
    let output = replay(&wiring, &["--reason", "unknown_stream"]);
    assert!(output.contains("1 matched, 1 replayed"), "{output}");
    let output = replay(&wiring, &["--reason", "unknown_stream"]);
    assert!(output.contains("0 matched, 0 replayed"), "{output}");
    let output = replay(&wiring, &["--reason", "unknown_stream", "--from-start"]);
    assert!(output.contains("1 matched, 1 replayed"), "{output}");
    // Records that can never be rows are refused.
    let refused = replay_output(&wiring, &["--reason", "undecodable"]);
    assert!(!refused.status.success());
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("can never become rows"),
        "{refused:?}"
    );
    let unknown_id = String::from_utf8(unknown_1.0.clone()).unwrap();
    eventually(Duration::from_secs(60), "the replayed row", || {
        let (servers, table) = (servers.clone(), unknown_table.clone());
        async move { counts(&servers, &table).await.filter(|(n, _)| *n >= 1) }
    })
    .await;
    // Give the second replay's copy time to be read and looked up, then check it was skipped.
    eventually(
        Duration::from_secs(30),
        "the second replayed copy to be skipped",
        || {
            let admin = sink.admin.clone();
            async move {
                (metric(&admin, "bq_sink_duplicates_skipped_total", &[]).await >= 1.0).then_some(())
            }
        },
    )
    .await;
    assert_eq!(counts(&servers, &unknown_table).await, Some((1, 1)));
    assert_eq!(hit_ids(&servers, &unknown_table).await, [unknown_id]);
}

fn replay_output(wiring: &Wiring, args: &[&str]) -> std::process::Output {
    let exe = std::env::current_exe().unwrap();
    let bin = exe.parent().unwrap().parent().unwrap().join("bq-sink");
    std::process::Command::new(bin)
        .arg("replay-dlq")
        .args(args)
        .env("HOOKPIPE_KAFKA_BROKERS", &wiring.servers.brokers)
        .env("HOOKPIPE_TOPIC", &wiring.topic)
        .env("HOOKPIPE_DLQ_TOPIC", &wiring.dlq_topic)
        .env("HOOKPIPE_GROUP_ID", &wiring.group)
        .output()
        .unwrap()
}

fn replay(wiring: &Wiring, args: &[&str]) -> String {
    let output = replay_output(wiring, args);
    assert!(
        output.status.success(),
        "replay failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).unwrap()
}

fn hookpipe_tests_now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_idempotency_key_twice_gives_one_row() {
    let stream = new_stream();
    let table = format!("local-project.{}.orders", unique("idem"));
    let wiring = Wiring::new(write_catalogue(&[(&stream, &table, "UTC")]), 2).await;
    let gateway = wiring.gateway(&[]).await;
    let _sink = wiring.sink(SINK_TUNING).await;
    let client = reqwest::Client::new();
    let send = || {
        client
            .post(format!("{}/ds/{stream}", gateway.url))
            .header("idempotency-key", "order-N1-delivered")
            .body("orderId=N1&status=delivered")
            .send()
    };
    let first: serde_json::Value = send().await.unwrap().json().await.unwrap();
    // The retry comes after the first is written, at a new offset.
    eventually(Duration::from_secs(30), "the first row", || {
        let (servers, table) = (wiring.servers.clone(), table.clone());
        async move { counts(&servers, &table).await.filter(|(n, _)| *n >= 1) }
    })
    .await;
    let second: serde_json::Value = send().await.unwrap().json().await.unwrap();
    assert_eq!(first["hit_id"], second["hit_id"]);
    // And once more right away, so two copies may share a batch.
    let third: serde_json::Value = send().await.unwrap().json().await.unwrap();
    assert_eq!(first["hit_id"], third["hit_id"]);
    let acked = HashSet::from([first["hit_id"].as_str().unwrap().to_owned()]);
    eventually(
        Duration::from_secs(30),
        "both retries to be consumed and skipped",
        || {
            let admin = _sink.admin.clone();
            async move {
                (metric(&admin, "bq_sink_duplicates_skipped_total", &[]).await >= 2.0).then_some(())
            }
        },
    )
    .await;
    wiring
        .assert_exactly_once(&table, &acked, Duration::from_secs(30))
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_added_since_the_last_reload_tick_is_not_dead_lettered() {
    let (old, new) = (new_stream(), new_stream());
    let dataset = unique("added");
    let (old_table, new_table) = (
        format!("local-project.{dataset}.old"),
        format!("local-project.{dataset}.new"),
    );
    let catalogue = write_catalogue(&[(&old, &old_table, "UTC")]);
    let wiring = Wiring::new(catalogue.clone(), 1).await;
    // Reload ticks far apart: only the re-read on an unknown stream can find the new one.
    let tuning: Vec<(&str, &str)> = SINK_TUNING
        .iter()
        .copied()
        .chain([("HOOKPIPE_CATALOGUE_RELOAD_INTERVAL", "1h")])
        .collect();
    let sink = wiring.sink(&tuning).await;
    replace_catalogue(
        &catalogue,
        &[(&old, &old_table, "UTC"), (&new, &new_table, "UTC")],
    );
    let record = envelope(&new, "leadId=L9&status=new", hookpipe_tests_now_ms());
    produce(
        &wiring.servers.brokers,
        &wiring.topic,
        std::slice::from_ref(&record),
    )
    .await;
    let acked = HashSet::from([String::from_utf8(record.0).unwrap()]);
    wiring
        .assert_exactly_once(&new_table, &acked, Duration::from_secs(30))
        .await;
    assert_eq!(
        metric(&sink.admin, "bq_sink_dead_letters_total", &[]).await,
        0.0
    );
}

/// A dead letter larger than the dead-letter topic accepts is stored truncated, with the
/// original's size and SHA-256, and counted; it never blocks the partition.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversized_dead_letter_is_stored_truncated_with_its_size_and_hash() {
    use sha2::Digest as _;
    let stream = new_stream();
    let table = format!("local-project.{}.orders", unique("bigletter"));
    let wiring = Wiring::new(write_catalogue(&[(&stream, &table, "UTC")]), 1).await;
    let sink = wiring
        .sink(&[("HOOKPIPE_DLQ_MAX_MESSAGE_BYTES", "10000")])
        .await;
    // 30 kB that are not an envelope, then a good record behind it.
    let big = (b"k-big".to_vec(), vec![0xffu8; 30_000]);
    let good = envelope(&stream, "orderId=N1", hookpipe_tests_now_ms());
    produce(
        &wiring.servers.brokers,
        &wiring.topic,
        &[big.clone(), good.clone()],
    )
    .await;
    let acked = HashSet::from([String::from_utf8(good.0).unwrap()]);
    wiring
        .assert_exactly_once(&table, &acked, Duration::from_secs(60))
        .await;
    let letters = read_raw(
        &wiring.servers.brokers,
        &wiring.dlq_topic,
        1,
        Duration::from_secs(30),
    )
    .await;
    let letter = DeadLetter::decode(letters[0].1.as_slice()).unwrap();
    assert!(letter.truncated);
    assert_eq!(letter.original_size, 30_000);
    assert!(letter.original.len() < 10_000);
    assert_eq!(
        letter.original_sha256,
        sha2::Sha256::digest(&big.1).to_vec()
    );
    assert_eq!(letter.reason, "undecodable");
    assert_eq!(
        metric(&sink.admin, "bq_sink_dead_letters_truncated_total", &[]).await,
        1.0
    );
}
