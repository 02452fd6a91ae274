//! The stall guard: a member rejoins its group when partitions it does not own have had work
//! waiting (committed offset below the end) without any progress for a whole stall timeout.
//!
//! Why: a group coordinator can leave partitions with nobody. Found by the soak on tansu: a
//! sink restarted after kill -9 joined while the dead member still counted, was given `[]`,
//! and when the broker restarted before the dead member expired, the group settled with the
//! live member owning nothing and every partition orphaned, for good. A real Kafka should not
//! do this, but a pipeline must not hang forever on it either. Rejoining forces a new
//! assignment. Legitimate owners commit as they go, so their partitions never look stalled;
//! an owner that cannot write (BigQuery down) does look stalled, which costs one eager
//! rebalance per stall timeout and loses nothing.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rdkafka::consumer::Consumer;
use rdkafka::{Offset, TopicPartitionList};
use tokio_util::sync::CancellationToken;

use crate::metrics::Metrics;
use crate::pipeline::SinkConsumer;

/// What the guard learned of one partition this member does not own.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Seen {
    pub partition: i32,
    /// The group's committed offset, or the partition's start when nothing was committed.
    pub committed: i64,
    /// The partition's end (high watermark).
    pub end: i64,
}

/// Remembers since when each partition's committed offset has not moved.
#[derive(Debug)]
pub struct StallGuard {
    timeout: Duration,
    since: HashMap<i32, (i64, Instant)>,
}

impl StallGuard {
    pub fn new(timeout: Duration) -> Self {
        Self {
            timeout,
            since: HashMap::new(),
        }
    }

    /// Records the partitions this member does not own; returns those stalled for the whole
    /// timeout (then starts counting afresh, so one stall gives one rejoin per timeout).
    pub fn observe(&mut self, now: Instant, others: &[Seen]) -> Vec<i32> {
        let mut kept = HashMap::new();
        let mut stalled = Vec::new();
        for seen in others {
            if seen.committed >= seen.end {
                continue; // nothing waiting
            }
            let since = match self.since.get(&seen.partition) {
                Some((committed, since)) if *committed == seen.committed => *since,
                _ => now,
            };
            if now.duration_since(since) >= self.timeout {
                stalled.push(seen.partition);
            }
            kept.insert(seen.partition, (seen.committed, since));
        }
        self.since = if stalled.is_empty() {
            kept
        } else {
            HashMap::new()
        };
        stalled
    }
}

/// Looks at the group every quarter of `timeout` and rejoins when the guard says so. Runs
/// beside the pipeline until `cancel`; librdkafka's calls are thread-safe, and the rebalance
/// this causes is served by the pipeline's poll as any other.
pub async fn watch(
    consumer: Arc<SinkConsumer>,
    topic: String,
    timeout: Duration,
    metrics: Arc<Metrics>,
    cancel: CancellationToken,
) {
    let mut guard = StallGuard::new(timeout);
    let mut tick = tokio::time::interval((timeout / 4).max(Duration::from_millis(250)));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = cancel.cancelled() => return,
            _ = tick.tick() => {}
        }
        let (c, t) = (consumer.clone(), topic.clone());
        let Ok(Some(others)) = tokio::task::spawn_blocking(move || others(&c, &t)).await else {
            continue; // broker unreachable: nothing to judge
        };
        let stalled = guard.observe(Instant::now(), &others);
        if stalled.is_empty() {
            continue;
        }
        tracing::warn!(
            ?stalled,
            ?timeout,
            "partitions owned by no active member: rejoining the group"
        );
        metrics.group_rejoins.inc();
        let (c, t) = (consumer.clone(), topic.clone());
        let rejoined = tokio::task::spawn_blocking(move || {
            c.unsubscribe();
            c.subscribe(&[&t])
        })
        .await;
        if !matches!(rejoined, Ok(Ok(()))) {
            tracing::error!(?rejoined, "rejoining the group failed");
        }
    }
}

/// The partitions of `topic` this member does not own, with the group's committed offsets and
/// the ends; `None` when the broker does not answer.
fn others(consumer: &SinkConsumer, topic: &str) -> Option<Vec<Seen>> {
    const WAIT: Duration = Duration::from_secs(5);
    let owned = consumer.assignment().ok()?;
    let metadata = consumer.fetch_metadata(Some(topic), WAIT).ok()?;
    let mut list = TopicPartitionList::new();
    for p in metadata.topics().first()?.partitions() {
        if owned.find_partition(topic, p.id()).is_none() {
            list.add_partition(topic, p.id());
        }
    }
    if list.count() == 0 {
        return Some(Vec::new());
    }
    let committed = consumer.committed_offsets(list, WAIT).ok()?;
    let mut out = Vec::new();
    for element in committed.elements() {
        let (start, end) = consumer
            .fetch_watermarks(topic, element.partition(), WAIT)
            .ok()?;
        let committed = match element.offset() {
            Offset::Offset(o) => o,
            _ => start,
        };
        out.push(Seen {
            partition: element.partition(),
            committed,
            end,
        });
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seen(partition: i32, committed: i64, end: i64) -> Seen {
        Seen {
            partition,
            committed,
            end,
        }
    }

    #[test]
    fn a_partition_with_work_and_no_progress_for_the_timeout_is_stalled_once() {
        let t0 = Instant::now();
        let mut guard = StallGuard::new(Duration::from_secs(10));
        assert!(guard.observe(t0, &[seen(0, 5, 9)]).is_empty());
        assert!(
            guard
                .observe(t0 + Duration::from_secs(9), &[seen(0, 5, 12)])
                .is_empty()
        );
        assert_eq!(
            guard.observe(t0 + Duration::from_secs(10), &[seen(0, 5, 12)]),
            [0]
        );
        // Counting starts again after a rejoin.
        assert!(
            guard
                .observe(t0 + Duration::from_secs(11), &[seen(0, 5, 12)])
                .is_empty()
        );
        assert_eq!(
            guard.observe(t0 + Duration::from_secs(21), &[seen(0, 5, 12)]),
            [0]
        );
    }

    #[test]
    fn progress_or_no_work_is_never_a_stall() {
        let t0 = Instant::now();
        let mut guard = StallGuard::new(Duration::from_secs(10));
        for s in 0..30 {
            let now = t0 + Duration::from_secs(s);
            // Partition 0 advances every second; partition 1 has nothing waiting.
            let others = [seen(0, s as i64, s as i64 + 100), seen(1, 7, 7)];
            assert!(guard.observe(now, &others).is_empty(), "at {s} s");
        }
    }

    #[test]
    fn a_partition_that_comes_back_after_being_owned_starts_a_fresh_count() {
        let t0 = Instant::now();
        let mut guard = StallGuard::new(Duration::from_secs(10));
        assert!(guard.observe(t0, &[seen(0, 5, 9)]).is_empty());
        // Owned by this member for a while (not reported), then someone else's again.
        assert!(guard.observe(t0 + Duration::from_secs(5), &[]).is_empty());
        assert!(
            guard
                .observe(t0 + Duration::from_secs(12), &[seen(0, 5, 9)])
                .is_empty()
        );
        assert_eq!(
            guard.observe(t0 + Duration::from_secs(22), &[seen(0, 5, 9)]),
            [0]
        );
    }
}
