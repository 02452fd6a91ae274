//! The quick soak (issue #5): a few thousand webhooks through two gateways, the broker, a sink
//! and the emulator while each kind of fault happens once; every acknowledged hit must be in
//! the tables exactly once. The full soak is `scripts/soak` (README, "Reliability").

use hookpipe_tests::soak::{Config, run};

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn quick_soak_loses_and_duplicates_nothing() {
    let summary = run(&Config::quick()).await;
    println!("{summary}");
    assert!(summary.passed(), "{summary}");
    assert!(
        summary.acknowledged > 0 && summary.unacknowledged == 0,
        "every webhook should be acknowledged in the end: {summary}"
    );
    assert_eq!(summary.dead_letters, 0, "{summary}");
}
