//! The sink's group membership heals itself, by evidence, on a real broker: a broker frozen
//! for longer than the session timeout, a group held by a frozen member, a write task that
//! panics. Each ends with every acknowledged hit in its table exactly once, counted after the
//! group committed to the end.

#![allow(clippy::unwrap_used)]

use std::time::{Duration, Instant};

use hookpipe_tests::{
    PrivateBroker, Servers, Wiring, eventually, metric, send_hits, unique, write_catalogue,
};

fn new_stream() -> String {
    uuid::Uuid::new_v4().to_string()
}

const TUNING: &[(&str, &str)] = &[
    ("HOOKPIPE_BATCH_MAX_ROWS", "50"),
    ("HOOKPIPE_BATCH_MAX_AGE", "200ms"),
    ("HOOKPIPE_DEDUP_WINDOW", "400"),
    ("HOOKPIPE_RETRY_INITIAL", "50ms"),
    ("HOOKPIPE_RETRY_MAX", "1s"),
];

fn with(extra: &[(&'static str, &'static str)]) -> Vec<(&'static str, &'static str)> {
    TUNING
        .iter()
        .copied()
        .chain(extra.iter().copied())
        .collect()
}

async fn owned_partitions(admin: &str) -> f64 {
    metric(admin, "bq_sink_owned_partitions", &[]).await
}

/// The broker pause: frozen (SIGSTOP) for three session timeouts while hits wait, then
/// resumed. The sink owns its partitions again within the session timeout and a few seconds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_paused_past_the_session_timeout_is_survived() {
    let broker = PrivateBroker::start().await;
    let servers = Servers {
        brokers: broker.brokers(),
        ..Servers::from_env()
    };
    let stream = new_stream();
    let table = format!("local-project.{}.orders", unique("pause"));
    let wiring = Wiring::on(servers, write_catalogue(&[(&stream, &table, "UTC")]), 2).await;
    let gateway = wiring.gateway(&[("HOOKPIPE_PUBLISH_TIMEOUT", "1s")]).await;
    let sink = wiring
        .sink(&with(&[("HOOKPIPE_SESSION_TIMEOUT", "3s")]))
        .await;
    let mut acked = send_hits(&gateway.url, &stream, 200, 4, Duration::ZERO).await;
    eventually(
        Duration::from_secs(30),
        "the sink to own partitions",
        || {
            let admin = sink.admin.clone();
            async move { (owned_partitions(&admin).await == 2.0).then_some(()) }
        },
    )
    .await;
    assert_eq!(
        metric(&sink.admin, "bq_sink_assignments_lost_total", &[]).await,
        0.0
    );

    // Senders keep going through the pause (503 and retry, as the snippets do).
    let during = tokio::spawn({
        let (url, stream) = (gateway.url.clone(), stream.clone());
        async move { send_hits(&url, &stream, 300, 4, Duration::from_millis(30)).await }
    });
    broker.pause();
    tokio::time::sleep(Duration::from_secs(10)).await;
    broker.unpause();
    let resumed = Instant::now();
    // The session expired (the pause was three session timeouts long) and the partitions came
    // back within the session timeout and a few seconds.
    eventually(
        Duration::from_secs(3 + 10),
        "the sink to lose its session and own its partitions again",
        || {
            let admin = sink.admin.clone();
            async move {
                let lost = metric(&admin, "bq_sink_assignments_lost_total", &[]).await;
                (lost >= 1.0 && owned_partitions(&admin).await == 2.0).then_some(())
            }
        },
    )
    .await;
    eprintln!(
        "partitions owned again {:.1} s after the broker resumed",
        resumed.elapsed().as_secs_f64()
    );
    acked.extend(during.await.unwrap());
    acked.extend(send_hits(&gateway.url, &stream, 100, 4, Duration::ZERO).await);
    wiring
        .assert_exactly_once(&table, &acked, Duration::from_secs(90))
        .await;
}

/// A member frozen while it leads the group (a long GC pause, a stopped container) holds the
/// group in a rebalance: a new member is given nothing while records wait. The sink must not
/// sit "ready" and idle: it reports not ready, rejoins, and then exits with status 3 so that it
/// is restarted; once the frozen member is gone, a restarted sink writes everything once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_stranded_by_a_frozen_leader_is_not_ready_and_exits_to_be_restarted() {
    let stream = new_stream();
    let table = format!("local-project.{}.orders", unique("stranded"));
    let wiring = Wiring::new(write_catalogue(&[(&stream, &table, "UTC")]), 2).await;
    let gateway = wiring.gateway(&[]).await;
    let mut frozen = wiring
        .sink(&with(&[("HOOKPIPE_SESSION_TIMEOUT", "30s")]))
        .await;
    eventually(
        Duration::from_secs(30),
        "the first sink to own partitions",
        || {
            let admin = frozen.admin.clone();
            async move { (owned_partitions(&admin).await == 2.0).then_some(()) }
        },
    )
    .await;
    frozen.proc.signal("STOP");
    let acked = send_hits(&gateway.url, &stream, 100, 4, Duration::ZERO).await;

    let started = Instant::now();
    let mut stranded = wiring.spawn_sink(&with(&[
        ("HOOKPIPE_SESSION_TIMEOUT", "3s"),
        ("HOOKPIPE_STALL_TIMEOUT", "3s"),
    ]));
    // Not ready while it owns nothing and nobody writes the waiting records.
    eventually(
        Duration::from_secs(30),
        "the stranded sink's /readyz to say why",
        || {
            let admin = stranded.admin.clone();
            async move {
                let r = reqwest::get(format!("{admin}/readyz")).await.ok()?;
                (r.status() == 503).then_some(())
            }
        },
    )
    .await;
    let status = stranded.proc.wait_exit(Duration::from_secs(60)).await;
    let status = status.expect("the stranded sink did not exit within 60 s");
    assert_eq!(status.code(), Some(3), "exit status of a crash-only exit");
    assert!(
        stranded
            .proc
            .log_text()
            .contains("2 rejoins did not change that"),
        "the exit names its reason"
    );
    eprintln!(
        "stranded sink exited with {status} after {:.1} s",
        started.elapsed().as_secs_f64()
    );

    // The frozen member dies for good; a restarted sink takes over once its session expires.
    frozen.proc.kill9();
    let _restarted = wiring
        .sink(&with(&[("HOOKPIPE_SESSION_TIMEOUT", "3s")]))
        .await;
    wiring
        .assert_exactly_once(&table, &acked, Duration::from_secs(120))
        .await;
}

/// A write task that panics leaves its rows pending for good: the sink exits with status 3
/// instead of running on with a partition that can never be committed again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_task_that_panics_makes_the_sink_exit_to_be_restarted() {
    let stream = new_stream();
    let table = format!("local-project.{}.orders", unique("panic"));
    let wiring = Wiring::new(write_catalogue(&[(&stream, &table, "UTC")]), 2).await;
    let gateway = wiring.gateway(&[]).await;
    let mut sink = wiring.spawn_sink(&with(&[("FAILPOINTS", "sink::before_write=panic")]));
    let acked = send_hits(&gateway.url, &stream, 20, 2, Duration::ZERO).await;
    let status = sink.proc.wait_exit(Duration::from_secs(60)).await;
    let status = status.expect("the sink did not exit after a write task panicked");
    assert_eq!(status.code(), Some(3));
    assert!(sink.proc.log_text().contains("a write task failed"));
    let _restarted = wiring.sink(TUNING).await;
    wiring
        .assert_exactly_once(&table, &acked, Duration::from_secs(60))
        .await;
}

/// A commit the broker does not answer must not stop the loop: rows keep being written while
/// it hangs, the commit counts as timed out and is asked again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hanging_commit_does_not_stop_the_sink() {
    let stream = new_stream();
    let table = format!("local-project.{}.orders", unique("hangingcommit"));
    let wiring = Wiring::new(write_catalogue(&[(&stream, &table, "UTC")]), 2).await;
    let gateway = wiring.gateway(&[]).await;
    // The first commit hangs for 15 s.
    let sink = wiring
        .sink(&with(&[
            ("FAILPOINTS", "sink::commit=1*sleep(15000)"),
            ("HOOKPIPE_COMMIT_TIMEOUT", "1s"),
        ]))
        .await;
    let first = send_hits(&gateway.url, &stream, 50, 2, Duration::ZERO).await;
    eventually(Duration::from_secs(10), "a commit to time out", || {
        let admin = sink.admin.clone();
        async move {
            (metric(
                &admin,
                "bq_sink_offset_commits_total",
                &[("outcome", "timeout")],
            )
            .await
                >= 1.0)
                .then_some(())
        }
    })
    .await;
    // While it hangs, later hits are still written.
    let second = send_hits(&gateway.url, &stream, 50, 2, Duration::ZERO).await;
    eventually(
        Duration::from_secs(10),
        "the later hits written while the commit hangs",
        || {
            let (servers, table, second) = (wiring.servers.clone(), table.clone(), second.clone());
            async move {
                let stored: std::collections::HashSet<String> =
                    hookpipe_tests::hit_ids(&servers, &table)
                        .await
                        .into_iter()
                        .collect();
                second.iter().all(|h| stored.contains(h)).then_some(())
            }
        },
    )
    .await;
    let acked = first.union(&second).cloned().collect();
    wiring
        .assert_exactly_once(&table, &acked, Duration::from_secs(60))
        .await;
}
