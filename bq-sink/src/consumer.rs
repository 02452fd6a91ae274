//! The Kafka consumer's I/O: rebalance callbacks that keep the offset tracker and the writer in
//! step with partition ownership, commits that cannot hang the loop, pauses, and lag metrics.

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rdkafka::consumer::{
    BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance, StreamConsumer,
};
use rdkafka::statistics::Statistics;
use rdkafka::{ClientContext, Offset, TopicPartitionList};

use crate::metrics::Metrics;
use crate::offsets::OffsetTracker;
use crate::writer::lock;

/// What the rebalance callbacks tell the writer: a partition is being taken away (stop its
/// writes, wait for them, release its write streams) or was given.
pub trait Ownership: Send + Sync + 'static {
    /// Stops the partition's writes at their next step. Returns at once.
    fn revoke(&self, partition: i32);
    /// Whether a write of the partition is still running.
    fn writing(&self, partition: i32) -> bool;
    /// Releases what the warehouse holds for the partition (finalizes its write streams), so
    /// nothing more can be written for it by this process. Async; called off the callback.
    fn release(&self, partition: i32) -> futures_util::future::BoxFuture<'_, ()>;
    fn assign(&self, partition: i32);
}

/// Consumer callbacks.
pub struct SinkContext {
    pub tracker: Arc<Mutex<OffsetTracker>>,
    pub metrics: Arc<Metrics>,
    pub topic: String,
    pub owner: Arc<dyn Ownership>,
    /// How long a revoke may wait for the partition's writes in progress.
    pub revoke_wait: Duration,
    /// Set while the group refuses this sink (another assignment strategy is in force);
    /// readiness is false meanwhile, so the pod shows the problem instead of idling "ready".
    pub group_refused: Arc<AtomicBool>,
    /// Set when librdkafka reported the assignment lost (session timed out): the group guard
    /// then expects ownership back within a bound.
    pub assignment_lost: Arc<AtomicBool>,
    /// Configuration problems (TLS, SASL) librdkafka reported, once per cause, for `/readyz`.
    pub health: hookpipe_common::kafka::ClientHealth,
    /// Set by the group guard just before it forces a rejoin; the next assignment then waits
    /// `takeover_fence` more before its lookups (`OffsetTracker::assign_taken_over`).
    pub takeover: AtomicBool,
    /// The extra fence of an assignment after a forced rejoin (the session timeout).
    pub takeover_fence: Duration,
    /// Set while the sink drains on shutdown: partitions assigned meanwhile stay paused (the
    /// process is leaving; their records are for the next owner).
    pub draining: AtomicBool,
}

pub type SinkConsumer = StreamConsumer<SinkContext>;

impl ClientContext for SinkContext {
    fn error(&self, error: rdkafka::error::KafkaError, reason: &str) {
        self.health.on_error(&error, reason);
    }

    fn log(&self, level: rdkafka::config::RDKafkaLogLevel, fac: &str, log_message: &str) {
        self.health.on_log(level, fac, log_message);
    }

    fn stats(&self, statistics: Statistics) {
        let Some(topic) = statistics.topics.get(&self.topic) else {
            return;
        };
        let tracker = lock(&self.tracker);
        for (id, partition) in &topic.partitions {
            if *id >= 0 && partition.consumer_lag >= 0 && tracker.owns(*id) {
                self.metrics
                    .consumer_lag
                    .with_label_values(&[&id.to_string()])
                    .set(partition.consumer_lag);
            }
        }
    }
}

impl ConsumerContext for SinkContext {
    /// Before partitions go to another consumer: stop their writes, wait for them (bounded),
    /// release their write streams, commit what is written, and stop tracking them. Their rows
    /// still only batched are dropped here and re-read by the new owner from the commit.
    fn pre_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        let Rebalance::Revoke(revoked) = rebalance else {
            return;
        };
        let partitions: HashSet<i32> = revoked.elements().iter().map(|e| e.partition()).collect();
        let lost = consumer.assignment_lost();
        if lost {
            self.assignment_lost.store(true, Ordering::Relaxed);
            self.metrics.assignments_lost.inc();
            tracing::warn!(
                ?partitions,
                "assignment lost (the group's session expired): stopping their writes"
            );
        }
        for p in &partitions {
            self.owner.revoke(*p);
        }
        // The callback runs inside the consumer poll on a runtime worker; block_in_place lets
        // the runtime move other tasks (the writes being stopped) off this thread.
        let deadline = Instant::now() + self.revoke_wait;
        tokio::task::block_in_place(|| {
            while partitions.iter().any(|p| self.owner.writing(*p)) {
                if Instant::now() > deadline {
                    tracing::warn!(
                        "writes for revoked partitions still running; the new owner will look their rows up"
                    );
                    break;
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            let handle = tokio::runtime::Handle::current();
            handle.block_on(futures_util::future::join_all(
                partitions.iter().map(|p| self.owner.release(*p)),
            ));
        });
        let mut tracker = lock(&self.tracker);
        let offsets = tracker.to_commit_for(|p| partitions.contains(&p));
        // A lost assignment's commit is refused by the group (another member owns them now).
        if !offsets.is_empty() && !lost {
            let mut tpl = TopicPartitionList::new();
            for (p, offset) in &offsets {
                let _ = tpl.add_partition_offset(&self.topic, *p, Offset::Offset(*offset));
            }
            match consumer.commit(&tpl, CommitMode::Sync) {
                Ok(()) => self.metrics.commits.with_label_values(&["ok"]).inc(),
                Err(error) => {
                    self.metrics.commits.with_label_values(&["error"]).inc();
                    tracing::warn!(%error, "commit on revoke failed");
                }
            }
        }
        for p in &partitions {
            tracker.revoke(*p);
            let _ = self
                .metrics
                .consumer_lag
                .remove_label_values(&[&p.to_string()]);
        }
        self.metrics
            .owned_partitions
            .set(tracker.owned().len() as i64);
        tracing::info!(partitions = ?partitions, "partitions revoked");
    }

    fn post_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Assign(assigned) = rebalance {
            let mut tracker = lock(&self.tracker);
            let partitions: Vec<i32> = assigned.elements().iter().map(|e| e.partition()).collect();
            // An empty assignment keeps the flag for the next one (a coordinator may give a
            // rejoined member nothing at first and the orphans a rebalance later).
            let taken_over = !partitions.is_empty() && self.takeover.swap(false, Ordering::Relaxed);
            for p in &partitions {
                if taken_over {
                    tracker.assign_taken_over(*p, self.takeover_fence);
                } else {
                    tracker.assign(*p);
                }
                self.owner.assign(*p);
            }
            if self.draining.load(Ordering::Relaxed) {
                // Leaving: read nothing more; the next owner reads them from the commit.
                if let Err(error) = consumer.pause(assigned) {
                    tracing::warn!(%error, "pausing partitions assigned while draining failed");
                }
            } else if let Err(error) = consumer.resume(assigned) {
                // A partition may come back with the pause flag of its previous assignment;
                // the tracker starts it unpaused, so the consumer must too.
                tracing::warn!(%error, "resuming newly assigned partitions failed");
            }
            if taken_over {
                tracing::info!(
                    ?partitions,
                    extra_fence_ms = self.takeover_fence.as_millis() as u64,
                    "assigned after a forced rejoin: a previous owner may still be finishing, so suspect rows wait the session timeout more before their lookups"
                );
            }
            self.group_refused.store(false, Ordering::Relaxed);
            self.metrics
                .owned_partitions
                .set(tracker.owned().len() as i64);
            tracing::info!(?partitions, "partitions assigned");
        }
    }
}

/// Commits what is safe, one commit at a time and never hanging the loop: a commit the broker
/// does not answer within `timeout` counts as failed and is asked again later (the blocking
/// call itself is left to finish on its thread; no second one starts meanwhile).
pub struct Committer {
    consumer: Arc<SinkConsumer>,
    tracker: Arc<Mutex<OffsetTracker>>,
    metrics: Arc<Metrics>,
    topic: String,
    timeout: Duration,
    running: Option<tokio::task::JoinHandle<Result<(), String>>>,
    asked: Vec<(i32, i64)>,
}

impl Committer {
    pub fn new(
        consumer: Arc<SinkConsumer>,
        tracker: Arc<Mutex<OffsetTracker>>,
        metrics: Arc<Metrics>,
        topic: String,
        timeout: Duration,
    ) -> Self {
        Self {
            consumer,
            tracker,
            metrics,
            topic,
            timeout,
            running: None,
            asked: Vec::new(),
        }
    }

    /// Commits the offsets that became safe. Only a commit the broker confirmed moves the
    /// point the dedup window is counted from. (An async commit's result would come through
    /// the commit callback, which the stream consumer does not serve.)
    pub async fn commit(&mut self) {
        if let Some(running) = &mut self.running {
            if !running.is_finished() {
                // The previous commit still hangs: do not pile another one on it.
                return;
            }
            let finished = self.running.take();
            if let Some(handle) = finished {
                let result = handle.await.unwrap_or_else(|e| Err(e.to_string()));
                self.settle(result);
            }
        }
        let offsets = lock(&self.tracker).to_commit();
        if offsets.is_empty() {
            return;
        }
        let mut tpl = TopicPartitionList::new();
        for (p, o) in &offsets {
            let _ = tpl.add_partition_offset(&self.topic, *p, Offset::Offset(*o));
        }
        self.asked = offsets;
        let consumer = self.consumer.clone();
        let mut handle = tokio::task::spawn_blocking(move || {
            // Test builds: a commit the broker does not answer.
            fail::fail_point!("sink::commit");
            consumer
                .commit(&tpl, CommitMode::Sync)
                .map_err(|e| e.to_string())
        });
        match tokio::time::timeout(self.timeout, &mut handle).await {
            Ok(result) => self.settle(result.unwrap_or_else(|e| Err(e.to_string()))),
            Err(_) => {
                self.metrics.commits.with_label_values(&["timeout"]).inc();
                tracing::warn!(timeout = ?self.timeout, "offset commit did not answer in time, will ask again");
                let mut tracker = lock(&self.tracker);
                for (p, _) in &self.asked {
                    tracker.commit_failed(*p);
                }
                self.running = Some(handle);
            }
        }
    }

    fn settle(&mut self, result: Result<(), String>) {
        let mut tracker = lock(&self.tracker);
        match result {
            Ok(()) => {
                self.metrics.commits.with_label_values(&["ok"]).inc();
                for (p, o) in &self.asked {
                    tracker.committed(*p, *o);
                }
            }
            Err(error) => {
                self.metrics.commits.with_label_values(&["error"]).inc();
                for (p, _) in &self.asked {
                    tracker.commit_failed(*p);
                }
                tracing::warn!(%error, "offset commit failed, will retry");
            }
        }
        self.asked.clear();
    }
}

/// Brings the consumer's paused partitions in line with the tracker: pause partitions that ran
/// too far past their confirmed commit (or all, when too much is buffered), resume those that
/// caught up. Returns whether any partition is held back.
pub fn apply_pauses(
    consumer: &SinkConsumer,
    tracker: &Mutex<OffsetTracker>,
    topic: &str,
    all: bool,
    pause_span: i64,
) -> bool {
    let (pause, resume) = lock(tracker).pause_changes(all, pause_span);
    for (partitions, paused) in [(pause, true), (resume, false)] {
        if partitions.is_empty() {
            continue;
        }
        let mut tpl = TopicPartitionList::new();
        for p in &partitions {
            tpl.add_partition(topic, *p);
        }
        let result = if paused {
            consumer.pause(&tpl)
        } else {
            consumer.resume(&tpl)
        };
        match result {
            Ok(()) => tracing::debug!(?partitions, paused, "consumption paused/resumed"),
            Err(error) => {
                tracing::warn!(%error, ?partitions, paused, "pause/resume failed, will retry");
                let mut tracker = lock(tracker);
                for p in partitions {
                    tracker.set_paused(p, !paused);
                }
            }
        }
    }
    lock(tracker).any_paused()
}
