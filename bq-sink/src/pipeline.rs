//! The consumer loop: read envelopes, batch rows per table, write batches concurrently, send
//! what cannot be written to the dead-letter topic, and commit each partition's offsets only up
//! to the first record not yet durably handled (at-least-once).

use std::collections::HashSet;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use hookpipe_common::catalogue::Shared;
use hookpipe_common::{Catalogue, TableRef};
use rdkafka::consumer::{
    BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance, StreamConsumer,
};
use rdkafka::message::Message;
use rdkafka::statistics::Statistics;
use rdkafka::{ClientContext, Offset, TopicPartitionList};
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::batch::{Batches, Item, Limits, TableBatch, Trigger, chunks};
use crate::bigquery::{Warehouse, WriteError};
use crate::deadletter::{DeadLetters, Letter};
use crate::metrics::Metrics;
use crate::offsets::OffsetTracker;
use crate::row::{self, Poison};

fn lock(tracker: &Mutex<OffsetTracker>) -> MutexGuard<'_, OffsetTracker> {
    match tracker.lock() {
        Ok(guard) => guard,
        Err(poisoned) => poisoned.into_inner(),
    }
}

/// Consumer callbacks: keeps the offset tracker in step with partition ownership and exports
/// consumer lag from librdkafka's statistics.
pub struct SinkContext {
    pub tracker: Arc<Mutex<OffsetTracker>>,
    pub metrics: Arc<Metrics>,
    pub topic: String,
}

impl ClientContext for SinkContext {
    fn stats(&self, statistics: Statistics) {
        let Some(topic) = statistics.topics.get(&self.topic) else {
            return;
        };
        for (id, partition) in &topic.partitions {
            if *id >= 0 && partition.consumer_lag >= 0 {
                self.metrics
                    .consumer_lag
                    .with_label_values(&[&id.to_string()])
                    .set(partition.consumer_lag);
            }
        }
    }
}

impl ConsumerContext for SinkContext {
    /// Before partitions go to another consumer, commit what is safely written for them, so
    /// the new owner starts as late as possible; then stop tracking them. Rows of theirs still
    /// being written will land, and the new owner's re-read of them is what hit_id
    /// deduplication is for.
    fn pre_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        let Rebalance::Revoke(revoked) = rebalance else {
            return;
        };
        let partitions: HashSet<i32> = revoked.elements().iter().map(|e| e.partition()).collect();
        let mut tracker = lock(&self.tracker);
        let mut tpl = TopicPartitionList::new();
        for (p, offset) in tracker.to_commit() {
            if partitions.contains(&p) {
                let _ = tpl.add_partition_offset(&self.topic, p, Offset::Offset(offset));
            }
        }
        if tpl.count() > 0 {
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
        tracing::info!(partitions = ?partitions, "partitions revoked");
    }

    fn post_rebalance(&self, _consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Assign(assigned) = rebalance {
            let mut tracker = lock(&self.tracker);
            let partitions: Vec<i32> = assigned.elements().iter().map(|e| e.partition()).collect();
            for p in &partitions {
                tracker.assign(*p);
            }
            tracing::info!(?partitions, "partitions assigned");
        }
    }
}

pub type SinkConsumer = StreamConsumer<SinkContext>;

/// Retry pauses: exponential from `initial` to `max`, each with jitter so replicas that failed
/// together do not retry together.
#[derive(Clone, Copy, Debug)]
pub struct Backoff {
    pub initial: Duration,
    pub max: Duration,
}

impl Backoff {
    pub fn delay(&self, attempt: u32) -> Duration {
        let base = self
            .initial
            .saturating_mul(1u32 << attempt.min(16))
            .min(self.max);
        base.mul_f64(rand::random_range(0.5..=1.0))
    }
}

/// Everything a flush task needs, shared between tasks.
pub struct Writer<W> {
    pub warehouse: Arc<W>,
    pub dead_letters: Arc<DeadLetters>,
    pub metrics: Arc<Metrics>,
    pub backoff: Backoff,
    pub limits: Limits,
    pub topic: String,
    /// Tables known to exist with a fitting schema.
    pub ready_tables: Mutex<HashSet<TableRef>>,
}

/// Offsets a finished task has durably handled.
type Done = Vec<(i32, i64)>;

impl<W: Warehouse> Writer<W> {
    fn table_ready(&self, table: &TableRef) -> bool {
        self.ready_tables
            .lock()
            .map(|s| s.contains(table))
            .unwrap_or(false)
    }

    fn mark_ready(&self, table: &TableRef, ready: bool) {
        if let Ok(mut set) = self.ready_tables.lock() {
            if ready {
                set.insert(table.clone());
            } else {
                set.remove(table);
            }
        }
    }

    /// Writes one table's batch: every row ends up written or dead-lettered, unless `cancel`
    /// fires first, in which case only what was handled is reported done.
    pub async fn flush(
        self: Arc<Self>,
        table: TableRef,
        batch: TableBatch,
        trigger: Trigger,
        cancel: CancellationToken,
    ) -> Done {
        self.metrics.flush(trigger.as_str());
        self.metrics.batch_rows.observe(batch.items.len() as f64);
        self.metrics.batch_bytes.observe(batch.bytes as f64);
        let items = batch.items;
        let mut done = Vec::with_capacity(items.len());

        // Make sure the table is there; a schema that does not fit sends the rows to dead
        // letters so other streams keep flowing.
        let mut attempt = 0;
        while !self.table_ready(&table) {
            match self.warehouse.ensure_table(&table).await {
                Ok(()) => self.mark_ready(&table, true),
                Err(WriteError::SchemaMismatch(detail)) => {
                    self.metrics.write_error("schema_mismatch");
                    tracing::error!(%table, %detail, "table schema does not fit, dead-lettering its rows");
                    for item in &items {
                        if self
                            .dead_letter(item, Poison::SchemaMismatch, detail.clone(), &cancel)
                            .await
                        {
                            done.push((item.partition, item.offset));
                        }
                    }
                    return done;
                }
                Err(error) => {
                    self.metrics.write_error(error.kind());
                    if !self.pause(&table, &error, &mut attempt, &cancel).await {
                        return done;
                    }
                }
            }
        }

        // Requests to make, as ranges of `items`; a rejected request is split until the bad
        // rows are isolated (the emulator refuses a whole request for one bad row).
        let mut work: Vec<std::ops::Range<usize>> =
            chunks(&items, self.limits.max_rows, self.limits.max_bytes);
        work.reverse();
        let mut attempt = 0;
        while let Some(range) = work.pop() {
            let slice = &items[range.clone()];
            let rows: Vec<row::Row> = slice.iter().map(|i| i.row.clone()).collect();
            let started = std::time::Instant::now();
            let result = tokio::select! {
                r = self.warehouse.insert(&table, &rows) => r,
                () = cancel.cancelled() => return done,
            };
            self.metrics
                .write_duration
                .observe(started.elapsed().as_secs_f64());
            match result {
                Ok(()) => {
                    attempt = 0;
                    let now = hookpipe_common::now_ms();
                    for item in slice {
                        self.metrics
                            .end_to_end
                            .observe((now - item.row.received_at).max(0) as f64 / 1000.0);
                        done.push((item.partition, item.offset));
                    }
                    let mut id_buf = Uuid::encode_buffer();
                    let mut counted = 0;
                    while counted < slice.len() {
                        let stream = slice[counted].stream;
                        let n = slice[counted..]
                            .iter()
                            .take_while(|i| i.stream == stream)
                            .count();
                        self.metrics
                            .rows_written(stream.hyphenated().encode_lower(&mut id_buf), n as u64);
                        counted += n;
                    }
                }
                Err(WriteError::RowsRejected(rejected)) => {
                    self.metrics.write_error("rows_rejected");
                    let bad: HashSet<usize> = rejected.iter().map(|(i, _)| *i).collect();
                    for (index, detail) in rejected {
                        if let Some(item) = slice.get(index) {
                            tracing::warn!(%table, hit_id = %item.row.hit_id, %detail, "row rejected by BigQuery");
                            if !self
                                .dead_letter(item, Poison::RejectedByBigQuery, detail, &cancel)
                                .await
                            {
                                return done;
                            }
                            done.push((item.partition, item.offset));
                        }
                    }
                    // Retry the good rows, each run of them as its own request.
                    let mut start = None;
                    for i in 0..=slice.len() {
                        match (start, i == slice.len() || bad.contains(&i)) {
                            (Some(s), true) => {
                                work.push(range.start + s..range.start + i);
                                start = None;
                            }
                            (None, false) => start = Some(i),
                            _ => {}
                        }
                    }
                }
                Err(WriteError::RequestRejected(detail)) if slice.len() == 1 => {
                    self.metrics.write_error("request_rejected");
                    tracing::warn!(%table, hit_id = %slice[0].row.hit_id, %detail, "row rejected by BigQuery");
                    if !self
                        .dead_letter(&slice[0], Poison::RejectedByBigQuery, detail, &cancel)
                        .await
                    {
                        return done;
                    }
                    done.push((slice[0].partition, slice[0].offset));
                }
                Err(WriteError::RequestRejected(_)) => {
                    self.metrics.write_error("request_rejected");
                    let mid = range.start + slice.len() / 2;
                    work.push(mid..range.end);
                    work.push(range.start..mid);
                }
                Err(error) => {
                    self.metrics.write_error(error.kind());
                    if error == WriteError::TableMissing {
                        // Deleted under us: re-create before the retry.
                        self.mark_ready(&table, false);
                        if let Err(e) = self.warehouse.ensure_table(&table).await {
                            tracing::warn!(%table, error = %e, "re-creating table failed");
                        } else {
                            self.mark_ready(&table, true);
                        }
                    }
                    if !self.pause(&table, &error, &mut attempt, &cancel).await {
                        return done;
                    }
                    work.push(range);
                }
            }
        }
        done
    }

    /// Waits before a retry. False if cancelled meanwhile.
    async fn pause(
        &self,
        table: &TableRef,
        error: &WriteError,
        attempt: &mut u32,
        cancel: &CancellationToken,
    ) -> bool {
        let delay = self.backoff.delay(*attempt);
        *attempt += 1;
        self.metrics.retries.inc();
        tracing::warn!(%table, attempt = *attempt, delay_ms = delay.as_millis() as u64, %error, "bigquery write failed, retrying");
        tokio::select! {
            () = tokio::time::sleep(delay) => true,
            () = cancel.cancelled() => false,
        }
    }

    /// Sends one record to the dead-letter topic, retrying until it is there. False if
    /// cancelled first.
    async fn dead_letter(
        &self,
        item: &Item,
        reason: Poison,
        detail: String,
        cancel: &CancellationToken,
    ) -> bool {
        send_dead_letter(
            &self.dead_letters,
            &self.metrics,
            self.backoff,
            Letter {
                original: &item.original,
                key: Some(item.row.hit_id.as_bytes()),
                reason,
                detail,
                source_topic: &self.topic,
                partition: item.partition,
                offset: item.offset,
            },
            cancel,
        )
        .await
    }
}

/// Publishes a dead letter, retrying transient failures. False if cancelled first.
pub async fn send_dead_letter(
    dead_letters: &DeadLetters,
    metrics: &Metrics,
    backoff: Backoff,
    letter: Letter<'_>,
    cancel: &CancellationToken,
) -> bool {
    let mut attempt = 0;
    loop {
        let result = tokio::select! {
            r = dead_letters.send(Letter { detail: letter.detail.clone(), ..letter }) => r,
            () = cancel.cancelled() => return false,
        };
        match result {
            Ok(()) => {
                metrics.dead_letter(letter.reason.as_str());
                return true;
            }
            Err(error) => {
                let delay = backoff.delay(attempt);
                attempt += 1;
                tracing::warn!(%error, topic = dead_letters.topic(), "dead-letter publish failed, retrying");
                tokio::select! {
                    () = tokio::time::sleep(delay) => {}
                    () = cancel.cancelled() => return false,
                }
            }
        }
    }
}

pub struct Pipeline<W> {
    pub consumer: Arc<SinkConsumer>,
    pub tracker: Arc<Mutex<OffsetTracker>>,
    pub writer: Arc<Writer<W>>,
    pub catalogue: Arc<Shared<Catalogue>>,
    /// Records consumed and not yet handled above which consumption pauses.
    pub max_buffered: usize,
    pub drain_timeout: Duration,
}

impl<W: Warehouse> Pipeline<W> {
    /// Runs until `cancel`, then drains: flushes what it holds, waits up to the drain timeout,
    /// commits, and returns (dropping the consumer leaves the group).
    pub async fn run(self, cancel: CancellationToken) {
        let limits = self.writer.limits;
        let metrics = self.writer.metrics.clone();
        let mut batches = Batches::default();
        let mut tasks: JoinSet<Done> = JoinSet::new();
        // Cancelled only when the drain timeout runs out.
        let abort = CancellationToken::new();
        let mut paused = false;
        let mut commit_tick = tokio::time::interval(Duration::from_secs(1));
        commit_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);

        loop {
            let in_flight = lock(&self.tracker).in_flight();
            metrics.buffered_rows.set(in_flight as i64);
            if !paused && in_flight >= self.max_buffered {
                paused = self.set_paused(true);
            } else if paused && in_flight <= self.max_buffered / 2 {
                paused = !self.set_paused(false);
            }
            let deadline = batches.next_deadline(&limits).map(Instant::from_std);
            tokio::select! {
                biased;
                () = cancel.cancelled() => break,
                Some(joined) = tasks.join_next() => self.finish(joined),
                () = sleep_until(deadline) => {
                    for table in batches.due(&limits, std::time::Instant::now()) {
                        self.spawn_flush(&mut tasks, &mut batches, &table, Trigger::Age, &abort);
                    }
                }
                _ = commit_tick.tick() => self.commit(CommitMode::Async),
                // Keep polling while paused: paused partitions deliver nothing, but rebalance
                // callbacks and group heartbeats are served by the poll.
                message = self.consumer.recv() => match message {
                    Ok(message) => {
                        if paused {
                            // A newly assigned partition is not paused yet.
                            self.set_paused(true);
                        }
                        metrics.consumed.inc();
                        let (partition, offset) = (message.partition(), message.offset());
                        let value = message.payload().unwrap_or(&[]);
                        lock(&self.tracker).consumed(partition, offset);
                        match row::place(value, &self.catalogue.current()) {
                            Ok(placed) => {
                                let item = Item { row: placed.row, stream: placed.stream_id, partition, offset, original: value.to_vec() };
                                if let Some(trigger) = batches.push(&placed.table, item, &limits, std::time::Instant::now()) {
                                    self.spawn_flush(&mut tasks, &mut batches, &placed.table, trigger, &abort);
                                }
                            }
                            Err((reason, detail)) => {
                                tracing::warn!(partition, offset, reason = reason.as_str(), %detail, "record cannot be written, dead-lettering");
                                let writer = self.writer.clone();
                                let (original, key) = (value.to_vec(), message.key().map(<[u8]>::to_vec));
                                let abort = abort.clone();
                                tasks.spawn(async move {
                                    let letter = Letter { original: &original, key: key.as_deref(), reason, detail, source_topic: &writer.topic, partition, offset };
                                    if send_dead_letter(&writer.dead_letters, &writer.metrics, writer.backoff, letter, &abort).await {
                                        vec![(partition, offset)]
                                    } else {
                                        vec![]
                                    }
                                });
                            }
                        }
                    }
                    Err(error) => {
                        tracing::warn!(%error, "kafka consumer error");
                    }
                },
            }
        }

        tracing::info!(rows = batches.rows(), "draining: flushing buffered rows");
        for table in batches.tables() {
            self.spawn_flush(&mut tasks, &mut batches, &table, Trigger::Shutdown, &abort);
        }
        let drained = tokio::time::timeout(self.drain_timeout, async {
            while let Some(joined) = tasks.join_next().await {
                self.finish(joined);
            }
        })
        .await;
        if drained.is_err() {
            tracing::warn!(
                "drain timeout reached; unwritten rows stay uncommitted and will be re-read"
            );
            abort.cancel();
            while let Some(joined) = tasks.join_next().await {
                self.finish(joined);
            }
        }
        self.commit(CommitMode::Sync);
        tracing::info!("sink drained");
    }

    fn spawn_flush(
        &self,
        tasks: &mut JoinSet<Done>,
        batches: &mut Batches,
        table: &TableRef,
        trigger: Trigger,
        abort: &CancellationToken,
    ) {
        if let Some(batch) = batches.take(table) {
            tasks.spawn(
                self.writer
                    .clone()
                    .flush(table.clone(), batch, trigger, abort.clone()),
            );
        }
    }

    fn finish(&self, joined: Result<Done, tokio::task::JoinError>) {
        match joined {
            Ok(done) => {
                let mut tracker = lock(&self.tracker);
                for (p, o) in done {
                    tracker.done(p, o);
                }
            }
            // A panicking flush leaves its offsets pending: they are never committed, and are
            // re-read after a restart.
            Err(error) => tracing::error!(%error, "flush task failed"),
        }
    }

    fn commit(&self, mode: CommitMode) {
        let mut tracker = lock(&self.tracker);
        let offsets = tracker.to_commit();
        if offsets.is_empty() {
            return;
        }
        let mut tpl = TopicPartitionList::new();
        for (p, o) in &offsets {
            let _ = tpl.add_partition_offset(&self.writer.topic, *p, Offset::Offset(*o));
        }
        match self.consumer.commit(&tpl, mode) {
            Ok(()) => {
                self.writer.metrics.commits.with_label_values(&["ok"]).inc();
                for (p, o) in offsets {
                    tracker.committed(p, o);
                }
            }
            Err(error) => {
                self.writer
                    .metrics
                    .commits
                    .with_label_values(&["error"])
                    .inc();
                tracing::warn!(%error, "offset commit failed, will retry");
            }
        }
    }

    /// Pauses or resumes every assigned partition. Returns whether it took effect.
    fn set_paused(&self, pause: bool) -> bool {
        let assignment = match self.consumer.assignment() {
            Ok(a) => a,
            Err(error) => {
                tracing::warn!(%error, "cannot read assignment");
                return false;
            }
        };
        let result = if pause {
            self.consumer.pause(&assignment)
        } else {
            self.consumer.resume(&assignment)
        };
        match result {
            Ok(()) => {
                self.writer.metrics.paused.set(i64::from(pause));
                tracing::info!(
                    paused = pause,
                    "consumption {}",
                    if pause {
                        "paused: buffer full"
                    } else {
                        "resumed"
                    }
                );
                true
            }
            Err(error) => {
                tracing::warn!(%error, "pause/resume failed");
                false
            }
        }
    }
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}
