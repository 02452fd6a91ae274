//! No stream can stop another, and BigQuery's own trouble never loses or dead-letters a row:
//! the sink behind a fault-injecting proxy in front of the emulator.
//!
//! - One table refused (403 accessDenied for that table only) for two minutes while another
//!   stream flows at a steady rate: the healthy stream's rows keep landing within seconds
//!   throughout, the refused table's rows are parked and land after the fix, counts exact.
//! - A 5xx storm on every write for a minute while webhooks arrive: nothing is dead-lettered,
//!   everything lands once.

#![allow(clippy::unwrap_used)]

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use hookpipe_tests::proxy::FaultyBigQuery;
use hookpipe_tests::{Wiring, counts, eventually, metric, send_hits, unique, write_catalogue};

fn new_stream() -> String {
    uuid::Uuid::new_v4().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_table_refused_for_two_minutes_does_not_stop_the_other_streams() {
    let (healthy, broken) = (new_stream(), new_stream());
    let dataset = unique("isolation");
    let healthy_table = format!("local-project.{dataset}.healthy");
    let broken_table = format!("local-project.{dataset}.broken");
    let catalogue = write_catalogue(&[
        (&healthy, &healthy_table, "UTC"),
        (&broken, &broken_table, "UTC"),
    ]);
    let wiring = Wiring::new(catalogue, 2).await;
    let proxy = FaultyBigQuery::start(&wiring.servers).await;
    proxy.deny_table(&broken_table);
    let [rest, grpc] = proxy.sink_env();
    let gateway = wiring.gateway(&[]).await;
    // A small dedup window: without parking, the broken table's oldest row would hold every
    // partition's commit and pause them after 100 records (the 485 of 800 rows).
    let sink = wiring
        .sink(&[
            (rest.0, &rest.1),
            (grpc.0, &grpc.1),
            ("HOOKPIPE_BATCH_MAX_ROWS", "50"),
            ("HOOKPIPE_BATCH_MAX_AGE", "200ms"),
            ("HOOKPIPE_DEDUP_WINDOW", "200"),
            ("HOOKPIPE_RETRY_INITIAL", "100ms"),
            ("HOOKPIPE_RETRY_MAX", "1s"),
            ("HOOKPIPE_PARK_AFTER", "5s"),
            ("HOOKPIPE_PARK_PROBE_INITIAL", "2s"),
            ("HOOKPIPE_PARK_PROBE_MAX", "5s"),
        ])
        .await;

    // Both streams send at a steady rate for two minutes while the broken table is refused.
    let outage = Duration::from_secs(120);
    let started = Instant::now();
    let acked_healthy = Arc::new(std::sync::Mutex::new(Vec::<(Instant, String)>::new()));
    let senders = {
        let (url, healthy, broken) = (gateway.url.clone(), healthy.clone(), broken.clone());
        let acked_healthy = acked_healthy.clone();
        tokio::spawn(async move {
            let mut acked_broken = HashSet::new();
            while started.elapsed() < outage {
                for id in send_hits(&url, &healthy, 10, 2, Duration::ZERO).await {
                    acked_healthy.lock().unwrap().push((Instant::now(), id));
                }
                acked_broken.extend(send_hits(&url, &broken, 2, 1, Duration::ZERO).await);
                tokio::time::sleep(Duration::from_millis(400)).await;
            }
            acked_broken
        })
    };
    // Throughout: every healthy hit acknowledged more than 10 s ago is in its table.
    let mut checks = 0;
    let mut worst = Duration::ZERO;
    while !senders.is_finished() {
        tokio::time::sleep(Duration::from_secs(5)).await;
        let due: Vec<String> = acked_healthy
            .lock()
            .unwrap()
            .iter()
            .filter(|(at, _)| at.elapsed() > Duration::from_secs(10))
            .map(|(_, id)| id.clone())
            .collect();
        if due.is_empty() {
            continue;
        }
        let stored: HashSet<String> = hookpipe_tests::hit_ids(&wiring.servers, &healthy_table)
            .await
            .into_iter()
            .collect();
        let missing = due.iter().filter(|id| !stored.contains(*id)).count();
        assert_eq!(
            missing,
            0,
            "{missing} healthy hits acknowledged over 10 s ago are not written ({:.0} s into the outage)",
            started.elapsed().as_secs_f64()
        );
        checks += 1;
        worst = worst.max(started.elapsed());
    }
    assert!(checks >= 15, "only {checks} checks during the outage");
    let acked_broken = senders.await.unwrap();
    assert!(proxy.refused() > 0, "the proxy refused nothing");
    // The broken table's rows were parked (not retried in place, not dead-lettered).
    let parked = metric(
        &sink.admin,
        "bq_sink_rows_parked_total",
        &[("table", &broken_table)],
    )
    .await;
    assert!(parked > 0.0, "nothing was parked");
    assert_eq!(
        metric(&sink.admin, "bq_sink_dead_letters_total", &[]).await,
        0.0
    );
    assert_eq!(
        counts(&wiring.servers, &broken_table).await,
        None,
        "refused table written to"
    );

    // The table answers again: its parked rows go back, once each.
    proxy.allow_all_tables();
    let acked_healthy: HashSet<String> = acked_healthy
        .lock()
        .unwrap()
        .iter()
        .map(|(_, id)| id.clone())
        .collect();
    wiring
        .assert_exactly_once(&healthy_table, &acked_healthy, Duration::from_secs(60))
        .await;
    wiring
        .assert_exactly_once(&broken_table, &acked_broken, Duration::from_secs(120))
        .await;
    let unparked = metric(
        &sink.admin,
        "bq_sink_rows_unparked_total",
        &[("table", &broken_table)],
    )
    .await;
    assert!(unparked >= parked, "unparked {unparked} < parked {parked}");
    eventually(
        Duration::from_secs(30),
        "the parked gauge back to 0",
        || {
            let admin = sink.admin.clone();
            let table = broken_table.clone();
            async move {
                (metric(&admin, "bq_sink_parked_rows", &[("table", &table)]).await == 0.0
                    && metric(&admin, "bq_sink_table_parked", &[("table", &table)]).await == 0.0)
                    .then_some(())
            }
        },
    )
    .await;
    eprintln!(
        "healthy: {} rows, checked {checks} times; broken: {} rows, {parked} parked",
        acked_healthy.len(),
        acked_broken.len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_5xx_storm_on_every_write_dead_letters_nothing_and_loses_nothing() {
    let stream = new_stream();
    let table = format!("local-project.{}.orders", unique("storm"));
    let wiring = Wiring::new(write_catalogue(&[(&stream, &table, "UTC")]), 2).await;
    let proxy = FaultyBigQuery::start(&wiring.servers).await;
    let [rest, grpc] = proxy.sink_env();
    let gateway = wiring.gateway(&[]).await;
    // The emulator's bad-row quirk is on, as locally: a 503 must still not be taken for a bad
    // row.
    let sink = wiring
        .sink(&[
            (rest.0, &rest.1),
            (grpc.0, &grpc.1),
            ("HOOKPIPE_BATCH_MAX_ROWS", "50"),
            ("HOOKPIPE_BATCH_MAX_AGE", "200ms"),
            ("HOOKPIPE_RETRY_INITIAL", "100ms"),
            ("HOOKPIPE_RETRY_MAX", "2s"),
        ])
        .await;
    let mut acked = send_hits(&gateway.url, &stream, 20, 2, Duration::ZERO).await;
    eventually(Duration::from_secs(30), "the first rows", || {
        let (servers, table) = (wiring.servers.clone(), table.clone());
        async move { counts(&servers, &table).await.filter(|(n, _)| *n > 0) }
    })
    .await;
    proxy.fail_writes(Some(503));
    let storm = Instant::now();
    while storm.elapsed() < Duration::from_secs(60) {
        acked.extend(send_hits(&gateway.url, &stream, 10, 2, Duration::ZERO).await);
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
    assert!(
        proxy.refused() >= 10,
        "the storm refused only {} writes",
        proxy.refused()
    );
    proxy.fail_writes(None);
    wiring
        .assert_exactly_once(&table, &acked, Duration::from_secs(90))
        .await;
    assert_eq!(
        metric(&sink.admin, "bq_sink_dead_letters_total", &[]).await,
        0.0,
        "healthy rows were dead-lettered"
    );
}
