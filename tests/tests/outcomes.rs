//! Every write's outcome is known, never guessed: deterministic faults at the exact step that
//! matters, on the real broker and emulator, each ending with the group committed to the end
//! of every partition and `COUNT(*) = COUNT(DISTINCT hit_id) =` hits acknowledged, and a metric
//! showing that the intended mechanism acted.
//!
//! - the sink dies (abort, like SIGKILL) right after an append is acknowledged, before the
//!   offset commit: the next owner's lookup skips those rows;
//! - an append's answer is lost after BigQuery stored the rows: sent again at the same offset,
//!   BigQuery answers ALREADY_EXISTS (with insertAll: the rows are looked up first);
//! - a rebalance while an append is in flight to a slow BigQuery: the old owner's streams are
//!   finalized before the new owner looks its rows up;
//! - the emulator restarts mid-stream (its write streams vanish): new streams, nothing twice.
//!
//! They run with the write path `scripts/test` chose (`HOOKPIPE_TEST_WRITE_API`, the Storage
//! Write API by default); the mechanism checked differs per path where the paths differ.

#![allow(clippy::unwrap_used)]

use std::time::Duration;

use hookpipe_tests::proxy::FaultyBigQuery;
use hookpipe_tests::{
    PrivateEmulator, Servers, Wiring, eventually, metric, send_hits, unique, write_catalogue,
};

fn new_stream() -> String {
    uuid::Uuid::new_v4().to_string()
}

fn storage() -> bool {
    std::env::var("HOOKPIPE_TEST_WRITE_API").map_or(true, |v| v == "storage")
}

const TUNING: &[(&str, &str)] = &[
    ("HOOKPIPE_BATCH_MAX_ROWS", "50"),
    ("HOOKPIPE_BATCH_MAX_AGE", "200ms"),
    ("HOOKPIPE_DEDUP_WINDOW", "400"),
    ("HOOKPIPE_RETRY_INITIAL", "50ms"),
    ("HOOKPIPE_RETRY_MAX", "1s"),
    ("HOOKPIPE_SESSION_TIMEOUT", "3s"),
];

fn with<'a>(extra: &[(&'a str, &'a str)]) -> Vec<(&'a str, &'a str)> {
    TUNING
        .iter()
        .copied()
        .chain(extra.iter().copied())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sink_dying_after_an_append_and_before_its_commit_writes_nothing_twice() {
    let stream = new_stream();
    let table = format!("local-project.{}.orders", unique("diebeforecommit"));
    let wiring = Wiring::new(write_catalogue(&[(&stream, &table, "UTC")]), 2).await;
    let gateway = wiring.gateway(&[]).await;
    let acked = send_hits(&gateway.url, &stream, 200, 4, Duration::ZERO).await;
    // The first acknowledged write aborts the process before its rows count as done.
    let mut dying = wiring.spawn_sink(&with(&[("FAILPOINTS", "sink::after_write=1*return")]));
    let status = dying.proc.wait_exit(Duration::from_secs(60)).await;
    let status = status.expect("the sink did not die after its first write");
    assert!(!status.success(), "{status:?}");
    let written = hookpipe_tests::counts(&wiring.servers, &table)
        .await
        .map_or(0, |(n, _)| n);
    assert!(written > 0, "the first write did not land before the abort");
    let next = wiring.sink(&with(&[])).await;
    wiring
        .assert_exactly_once(&table, &acked, Duration::from_secs(60))
        .await;
    let skipped = metric(&next.admin, "bq_sink_lookup_skipped_rows_total", &[]).await;
    assert!(
        skipped >= written as f64,
        "the next owner's lookups skipped {skipped} rows, {written} had landed"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_append_whose_answer_is_lost_is_settled_not_guessed() {
    let stream = new_stream();
    let table = format!("local-project.{}.orders", unique("lostanswer"));
    let wiring = Wiring::new(write_catalogue(&[(&stream, &table, "UTC")]), 1).await;
    let gateway = wiring.gateway(&[]).await;
    // The proxies serve the next writes and then drop their answers.
    let proxy = FaultyBigQuery::start(&wiring.servers).await;
    let [rest, grpc] = proxy.sink_env();
    let sink = wiring
        .sink(&with(&[(rest.0, &rest.1), (grpc.0, &grpc.1)]))
        .await;
    // Past the suspect window of the assignment, so the lookups seen are the ones this fault
    // causes (window 400: the first 400 records are looked up anyway).
    let mut acked = send_hits(&gateway.url, &stream, 450, 4, Duration::ZERO).await;
    wiring
        .assert_exactly_once(&table, &acked, Duration::from_secs(60))
        .await;
    let skipped_before = metric(&sink.admin, "bq_sink_lookup_skipped_rows_total", &[]).await;
    proxy.lose_answers(2);
    acked.extend(send_hits(&gateway.url, &stream, 100, 4, Duration::ZERO).await);
    wiring
        .assert_exactly_once(&table, &acked, Duration::from_secs(60))
        .await;
    assert!(proxy.lost() >= 1, "no answer was dropped");
    if storage() {
        let proofs = metric(&sink.admin, "bq_sink_append_already_exists_total", &[]).await;
        assert!(
            proofs >= 1.0,
            "no append was proven landed by ALREADY_EXISTS"
        );
        let skipped = metric(&sink.admin, "bq_sink_lookup_skipped_rows_total", &[]).await;
        assert_eq!(
            skipped, skipped_before,
            "the Storage Write path needed no lookup"
        );
    } else {
        let ambiguous = metric(&sink.admin, "bq_sink_ambiguous_writes_total", &[]).await;
        let skipped = metric(&sink.admin, "bq_sink_lookup_skipped_rows_total", &[]).await;
        assert!(ambiguous >= 1.0, "no write was taken as of unknown outcome");
        assert!(
            skipped > skipped_before,
            "no lookup skipped the stored rows"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rebalance_while_an_append_is_in_flight_to_a_slow_bigquery() {
    let stream = new_stream();
    let table = format!("local-project.{}.orders", unique("slowrebalance"));
    let wiring = Wiring::new(write_catalogue(&[(&stream, &table, "UTC")]), 4).await;
    let gateway = wiring.gateway(&[]).await;
    let proxy = FaultyBigQuery::start(&wiring.servers).await;
    let [rest, grpc] = proxy.sink_env();
    let env = with(&[(rest.0, &rest.1), (grpc.0, &grpc.1)]);
    let first = wiring.sink(&env).await;
    let mut acked = send_hits(&gateway.url, &stream, 100, 4, Duration::ZERO).await;
    wiring
        .assert_exactly_once(&table, &acked, Duration::from_secs(60))
        .await;
    // Every call to BigQuery now takes a second; hits keep coming; a second sink joins.
    proxy.delay(Duration::from_secs(1));
    let load = tokio::spawn({
        let (url, stream) = (gateway.url.clone(), stream.clone());
        async move { send_hits(&url, &stream, 400, 4, Duration::from_millis(10)).await }
    });
    eventually(
        Duration::from_secs(30),
        "writes in flight to the slow BigQuery",
        || {
            let admin = first.admin.clone();
            async move { (metric(&admin, "bq_sink_buffered_rows", &[]).await > 0.0).then_some(()) }
        },
    )
    .await;
    let second = wiring.sink(&env).await;
    acked.extend(load.await.unwrap());
    proxy.delay(Duration::ZERO);
    wiring
        .assert_exactly_once(&table, &acked, Duration::from_secs(90))
        .await;
    if storage() {
        let released = metric(&first.admin, "bq_sink_write_streams_released_total", &[]).await;
        assert!(
            released >= 1.0,
            "the revoked partitions' streams were not finalized"
        );
    }
    eventually(Duration::from_secs(30), "the second sink to own partitions", || {
        let admin = second.admin.clone();
        async move {
            (metric(&admin, "bq_sink_owned_partitions", &[]).await >= 1.0).then_some(())
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sink_draining_into_failing_writes_hands_its_partitions_over_and_writes_nothing_twice() {
    let stream = new_stream();
    let table = format!("local-project.{}.orders", unique("drainhandover"));
    let wiring = Wiring::new(write_catalogue(&[(&stream, &table, "UTC")]), 2).await;
    let gateway = wiring.gateway(&[]).await;
    let proxy = FaultyBigQuery::start(&wiring.servers).await;
    let [rest, grpc] = proxy.sink_env();
    // A drain far longer than the handover takes: the sink must not sit it out.
    let leaving = wiring
        .sink(&with(&[
            (rest.0, &rest.1),
            (grpc.0, &grpc.1),
            ("HOOKPIPE_DRAIN_TIMEOUT", "300s"),
        ]))
        .await;
    // Past the suspect window of the assignment (400): the rows it holds next are not looked
    // up before it writes them, as after any long run.
    let mut acked = send_hits(&gateway.url, &stream, 450, 4, Duration::ZERO).await;
    wiring
        .assert_exactly_once(&table, &acked, Duration::from_secs(60))
        .await;
    // Its writes now fail; it reads the next hits and holds them.
    proxy.fail_writes(Some(503));
    acked.extend(send_hits(&gateway.url, &stream, 100, 4, Duration::ZERO).await);
    eventually(
        Duration::from_secs(30),
        "the sink to hold the new hits",
        || {
            let admin = leaving.admin.clone();
            async move { (metric(&admin, "bq_sink_buffered_rows", &[]).await >= 100.0).then_some(()) }
        },
    )
    .await;
    // Asked to stop, it drains (retrying the failing writes) while a new member joins.
    leaving.proc.signal("TERM");
    let next = wiring.sink(&with(&[])).await;
    wiring
        .assert_exactly_once(&table, &acked, Duration::from_secs(90))
        .await;
    // BigQuery answers the leaving sink again: it must have stopped writing what it no longer
    // owns, and it leaves (status 0) well within its drain timeout.
    proxy.fail_writes(None);
    let mut leaving = leaving;
    let status =
        tokio::task::spawn_blocking(move || leaving.proc.terminate(Duration::from_secs(60)))
            .await
            .unwrap();
    assert!(status.success(), "the leaving sink exited with {status:?}");
    wiring
        .assert_exactly_once(&table, &acked, Duration::from_secs(60))
        .await;
    eventually(
        Duration::from_secs(30),
        "the remaining sink to own every partition",
        || {
            let admin = next.admin.clone();
            async move {
                (metric(&admin, "bq_sink_owned_partitions", &[]).await == 2.0).then_some(())
            }
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_emulator_restarting_mid_stream_loses_and_duplicates_nothing() {
    let mut emulator = PrivateEmulator::start().await;
    let servers = Servers {
        bq_rest: emulator.rest(),
        bq_grpc: emulator.grpc(),
        ..Servers::from_env()
    };
    let stream = new_stream();
    let table = format!("local-project.{}.orders", unique("emurestart"));
    let wiring = Wiring::on(servers, write_catalogue(&[(&stream, &table, "UTC")]), 2).await;
    let gateway = wiring.gateway(&[]).await;
    let sink = wiring.sink(&with(&[])).await;
    let load = tokio::spawn({
        let (url, stream) = (gateway.url.clone(), stream.clone());
        async move { send_hits(&url, &stream, 2000, 4, Duration::from_millis(20)).await }
    });
    eventually(
        Duration::from_secs(30),
        "rows written before the restart",
        || {
            let (servers, table) = (wiring.servers.clone(), table.clone());
            async move {
                hookpipe_tests::counts(&servers, &table)
                    .await
                    .filter(|(n, _)| *n > 0)
            }
        },
    )
    .await;
    emulator.stop();
    emulator.resume().await;
    assert!(!load.is_finished(), "the traffic ended before the restart");
    let acked = load.await.unwrap();
    wiring
        .assert_exactly_once(&table, &acked, Duration::from_secs(90))
        .await;
    if storage() {
        // The restarted emulator no longer knows the first streams: new ones were made.
        let created = metric(&sink.admin, "bq_sink_write_streams_created_total", &[]).await;
        assert!(
            created >= 3.0,
            "only {created} write streams for 2 partitions across a restart"
        );
    }
}
