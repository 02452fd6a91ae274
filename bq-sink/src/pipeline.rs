//! The consumer loop: read envelopes, batch rows per table, write each table's batches one at
//! a time (tables concurrently), deduplicate by hit_id, send what cannot be written to the
//! dead-letter topic, and commit each partition's offsets only up to the first record not yet
//! durably handled (at-least-once; deduplication makes redelivery invisible).

use std::collections::{BTreeSet, HashSet};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use hookpipe_common::catalogue::Shared;
use hookpipe_common::{Catalogue, TableRef};
use rdkafka::consumer::{
    BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance, StreamConsumer,
};
use rdkafka::message::Message;
use rdkafka::statistics::Statistics;
use rdkafka::types::RDKafkaErrorCode;
use rdkafka::{ClientContext, Offset, TopicPartitionList};
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::batch::{Batches, Item, Limits, TableBatch, Trigger, chunks};
use crate::bigquery::{Warehouse, WriteError};
use crate::deadletter::{DeadLetters, Letter};
use crate::dedup::{RecentHits, first_occurrences};
use crate::metrics::Metrics;
use crate::offsets::OffsetTracker;
use crate::row::{self, Poison};

/// Server errors a single row may get, while BigQuery answers for its table, before it is
/// taken for a bad row.
const POISON_STRIKES: u32 = 3;

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    match mutex.lock() {
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
    /// How long a revoke may wait for the partition's writes in progress.
    pub revoke_wait: Duration,
    /// Set while the group refuses this sink (another assignment strategy is in force);
    /// readiness is false meanwhile, so the pod shows the problem instead of idling "ready".
    pub group_refused: Arc<std::sync::atomic::AtomicBool>,
}

impl ClientContext for SinkContext {
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
    /// Before partitions go to another consumer: let writes in progress for them finish, commit
    /// what is written, and stop tracking them. Rows of theirs still only batched are dropped
    /// here and re-read by the new owner from the committed offset.
    fn pre_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        let Rebalance::Revoke(revoked) = rebalance else {
            return;
        };
        let partitions: HashSet<i32> = revoked.elements().iter().map(|e| e.partition()).collect();
        // The callback runs inside the consumer poll on a runtime worker; block_in_place lets
        // the runtime move other tasks (the flush tasks being waited for) off this thread.
        let deadline = std::time::Instant::now() + self.revoke_wait;
        tokio::task::block_in_place(|| {
            while partitions
                .iter()
                .any(|p| lock(&self.tracker).is_writing(*p))
            {
                if std::time::Instant::now() > deadline {
                    tracing::warn!(
                        "writes for revoked partitions still running; the new owner will look their rows up"
                    );
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        });
        let mut tracker = lock(&self.tracker);
        let offsets = tracker.to_commit_for(|p| partitions.contains(&p));
        if !offsets.is_empty() {
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
        tracing::info!(partitions = ?partitions, "partitions revoked");
    }

    fn post_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Assign(assigned) = rebalance {
            let mut tracker = lock(&self.tracker);
            let partitions: Vec<i32> = assigned.elements().iter().map(|e| e.partition()).collect();
            for p in &partitions {
                tracker.assign(*p);
            }
            // A partition may come back with the pause flag of its previous assignment;
            // the tracker starts it unpaused, so the consumer must too.
            if let Err(error) = consumer.resume(assigned) {
                tracing::warn!(%error, "resuming newly assigned partitions failed");
            }
            self.group_refused
                .store(false, std::sync::atomic::Ordering::Relaxed);
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
    pub tracker: Arc<Mutex<OffsetTracker>>,
    pub recent: Mutex<RecentHits>,
    pub backoff: Backoff,
    pub limits: Limits,
    pub topic: String,
    /// Tables known to exist with a fitting schema.
    pub ready_tables: Mutex<HashSet<TableRef>>,
}

impl<W: Warehouse> Writer<W> {
    fn done<'a>(&self, items: impl IntoIterator<Item = &'a Item>) {
        let mut tracker = lock(&self.tracker);
        for item in items {
            tracker.done(item.partition, item.offset);
        }
    }

    /// Writes one table's batch: every row ends up written, skipped as a duplicate, or
    /// dead-lettered, each marked done in the tracker as it happens; unless `cancel` fires
    /// first, in which case the rest stays pending (and uncommitted). Returns the table.
    pub async fn flush(
        self: Arc<Self>,
        table: TableRef,
        batch: TableBatch,
        trigger: Trigger,
        cancel: CancellationToken,
    ) -> Option<TableRef> {
        let items: Vec<Item> = {
            let mut tracker = lock(&self.tracker);
            // A revoked partition's rows are the new owner's to write.
            let owned: Vec<Item> = batch
                .items
                .into_iter()
                .filter(|i| tracker.owns(i.partition))
                .collect();
            for item in &owned {
                tracker.writing(item.partition, item.offset);
            }
            owned
        };
        if items.is_empty() {
            return Some(table);
        }
        self.metrics.flush(trigger.as_str());
        tracing::debug!(%table, rows = items.len(), suspects = items.iter().filter(|i| i.suspect).count(), trigger = trigger.as_str(), "flushing");
        self.metrics.batch_rows.observe(items.len() as f64);
        self.metrics.batch_bytes.observe(batch.bytes as f64);

        // Repeats inside the batch and hit_ids this process wrote recently.
        let (keep, repeats) = {
            let recent = lock(&self.recent);
            first_occurrences(items.iter().map(|i| i.row.hit_id.as_str()), &recent)
        };
        if !repeats.is_empty() {
            self.metrics.duplicates_skipped.inc_by(repeats.len() as u64);
            self.done(repeats.iter().map(|&i| &items[i]));
        }
        let mut items: Vec<Item> = keep.into_iter().map(|i| items[i].clone()).collect();

        if !self.ensure_table(&table, &items, &cancel).await {
            return Some(table);
        }

        // Rows a previous owner may have written before it could commit: look them up.
        if items.iter().any(|i| i.suspect) {
            let Some(existing) = self.lookup_suspects(&table, &items, &cancel).await else {
                return Some(table);
            };
            if !existing.is_empty() {
                let (dupes, fresh): (Vec<Item>, Vec<Item>) = items
                    .into_iter()
                    .partition(|i| i.suspect && existing.contains(&i.row.hit_id));
                tracing::info!(%table, skipped = dupes.len(), "rows already written before the last commit skipped");
                self.metrics.duplicates_skipped.inc_by(dupes.len() as u64);
                lock(&self.recent).insert(dupes.iter().map(|i| i.row.hit_id.as_str()));
                self.done(&dupes);
                items = fresh;
            }
        }

        self.write(&table, &items, &cancel).await;
        Some(table)
    }

    /// Makes sure the table exists with a fitting schema. A schema that does not fit sends the
    /// rows to dead letters, so other streams keep flowing. False if the caller should stop.
    async fn ensure_table(
        &self,
        table: &TableRef,
        items: &[Item],
        cancel: &CancellationToken,
    ) -> bool {
        let mut attempt = 0;
        while !lock(&self.ready_tables).contains(table) {
            match self.warehouse.ensure_table(table).await {
                Ok(()) => {
                    lock(&self.ready_tables).insert(table.clone());
                }
                Err(WriteError::SchemaMismatch(detail)) => {
                    self.metrics.write_error("schema_mismatch");
                    tracing::error!(%table, %detail, "table schema does not fit, dead-lettering its rows");
                    for item in items {
                        if !self
                            .dead_letter(item, Poison::SchemaMismatch, detail.clone(), cancel)
                            .await
                        {
                            return false;
                        }
                        self.done([item]);
                    }
                    return false;
                }
                Err(error) => {
                    self.metrics.write_error(error.kind());
                    if !self
                        .pause("ensure", table, &error, &mut attempt, cancel)
                        .await
                    {
                        return false;
                    }
                }
            }
        }
        true
    }

    /// The suspect rows' hit_ids that the table already holds, retrying transient failures.
    /// None if cancelled.
    async fn lookup_suspects(
        &self,
        table: &TableRef,
        items: &[Item],
        cancel: &CancellationToken,
    ) -> Option<HashSet<String>> {
        let suspects: Vec<&Item> = items.iter().filter(|i| i.suspect).collect();
        let mut existing = HashSet::new();
        for group in suspects.chunks(self.limits.max_rows.max(1)) {
            let dates: BTreeSet<_> = group.iter().map(|i| i.row.date).collect();
            let ids: Vec<&str> = group.iter().map(|i| i.row.hit_id.as_str()).collect();
            let mut attempt = 0;
            loop {
                let result = tokio::select! {
                    r = self.warehouse.existing_hit_ids(table, &dates, &ids) => r,
                    () = cancel.cancelled() => return None,
                };
                match result {
                    Ok(found) => {
                        existing.extend(found);
                        break;
                    }
                    Err(error) => {
                        self.metrics.write_error("dedup_lookup");
                        if !self
                            .pause("lookup", table, &error, &mut attempt, cancel)
                            .await
                        {
                            return None;
                        }
                    }
                }
            }
        }
        Some(existing)
    }

    /// insertAll in requests within the row and byte limits; a rejected request is split until
    /// the bad rows are isolated (the emulator refuses a whole request for one bad row).
    async fn write(&self, table: &TableRef, items: &[Item], cancel: &CancellationToken) {
        let mut work: Vec<std::ops::Range<usize>> =
            chunks(items, self.limits.max_rows, self.limits.max_bytes);
        work.reverse();
        let mut attempt = 0;
        // Per row (index into `items`): server errors for that row alone while BigQuery
        // answered other calls.
        let mut strikes: std::collections::HashMap<usize, u32> = std::collections::HashMap::new();
        while let Some(range) = work.pop() {
            let slice = &items[range.clone()];
            let rows: Vec<&row::Row> = slice.iter().map(|i| &i.row).collect();
            let started = std::time::Instant::now();
            let result = tokio::select! {
                r = self.warehouse.insert(table, &rows) => r,
                () = cancel.cancelled() => return,
            };
            self.metrics
                .write_duration
                .observe(started.elapsed().as_secs_f64());
            match result {
                Ok(()) => {
                    attempt = 0;
                    self.written(slice);
                }
                Err(WriteError::RowsRejected(rejected)) => {
                    self.metrics.write_error("rows_rejected");
                    let bad: HashSet<usize> = rejected.iter().map(|(i, _)| *i).collect();
                    for (index, detail) in rejected {
                        if let Some(item) = slice.get(index) {
                            tracing::warn!(%table, hit_id = %item.row.hit_id, %detail, "row rejected by BigQuery");
                            if !self
                                .dead_letter(item, Poison::RejectedByBigQuery, detail, cancel)
                                .await
                            {
                                return;
                            }
                            self.done([item]);
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
                        .dead_letter(&slice[0], Poison::RejectedByBigQuery, detail, cancel)
                        .await
                    {
                        return;
                    }
                    self.done(slice);
                }
                Err(WriteError::RequestRejected(_)) => {
                    self.metrics.write_error("request_rejected");
                    let mid = range.start + slice.len() / 2;
                    work.push(mid..range.end);
                    work.push(range.start..mid);
                }
                // A server error while the table itself answers means one of these rows is
                // bad (the emulator's way of rejecting a row): split to find it. A single row
                // that fails like that `POISON_STRIKES` times is dead-lettered.
                Err(WriteError::ServerError(detail)) if self.table_answers(table).await => {
                    self.metrics.write_error("server_error");
                    if slice.len() > 1 {
                        let mid = range.start + slice.len() / 2;
                        work.push(mid..range.end);
                        work.push(range.start..mid);
                        continue;
                    }
                    let count = strikes.entry(range.start).or_default();
                    *count += 1;
                    if *count >= POISON_STRIKES {
                        let item = &slice[0];
                        tracing::warn!(%table, hit_id = %item.row.hit_id, %detail, "row fails alone while BigQuery is up, dead-lettering");
                        let detail = format!(
                            "BigQuery answered this row alone with a server error {POISON_STRIKES} times while the table answered: {detail}"
                        );
                        if !self
                            .dead_letter(item, Poison::RejectedByBigQuery, detail, cancel)
                            .await
                        {
                            return;
                        }
                        self.done(slice);
                        continue;
                    }
                    if !self
                        .pause(
                            "insert",
                            table,
                            &WriteError::ServerError(detail),
                            &mut attempt,
                            cancel,
                        )
                        .await
                    {
                        return;
                    }
                    work.push(range);
                }
                Err(error) => {
                    self.metrics.write_error(error.kind());
                    if error == WriteError::TableMissing {
                        // Deleted under us: re-create before the retry.
                        lock(&self.ready_tables).remove(table);
                        if self.warehouse.ensure_table(table).await.is_ok() {
                            lock(&self.ready_tables).insert(table.clone());
                        }
                    }
                    if !self
                        .pause("insert", table, &error, &mut attempt, cancel)
                        .await
                    {
                        return;
                    }
                    work.push(range);
                }
            }
        }
    }

    /// Whether BigQuery answers for the table right now. Asked twice: a server that just
    /// answered 500 may have closed the pooled connection the first probe reuses.
    async fn table_answers(&self, table: &TableRef) -> bool {
        for _ in 0..2 {
            match self.warehouse.ensure_table(table).await {
                Ok(()) => return true,
                Err(error) => {
                    tracing::debug!(%table, %error, "table probe after a server error failed")
                }
            }
        }
        false
    }

    fn written(&self, slice: &[Item]) {
        let now = hookpipe_common::now_ms();
        for item in slice {
            self.metrics
                .end_to_end
                .observe((now - item.row.received_at).max(0) as f64 / 1000.0);
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
        lock(&self.recent).insert(slice.iter().map(|i| i.row.hit_id.as_str()));
        self.done(slice);
    }

    /// Waits before a retry. False if cancelled meanwhile.
    async fn pause(
        &self,
        phase: &'static str,
        table: &TableRef,
        error: &WriteError,
        attempt: &mut u32,
        cancel: &CancellationToken,
    ) -> bool {
        let delay = self.backoff.delay(*attempt);
        *attempt += 1;
        self.metrics.retries.inc();
        tracing::warn!(%table, phase, attempt = *attempt, delay_ms = delay.as_millis() as u64, %error, "bigquery call failed, retrying");
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
    pub writer: Arc<Writer<W>>,
    pub catalogue: Arc<Shared<Catalogue>>,
    /// The catalogue file, re-read at once when a record names a stream the catalogue in
    /// force does not know (it may have been added since the last reload tick).
    pub catalogue_path: std::path::PathBuf,
    /// Records consumed and not yet handled above which all consumption pauses.
    pub max_buffered: usize,
    /// The dedup window: a partition pauses when it runs half of this ahead of its last
    /// confirmed commit.
    pub window: usize,
    pub drain_timeout: Duration,
}

/// What a finished task reports: the table whose flush ended, or nothing (a dead letter).
type Finished = Option<TableRef>;

impl<W: Warehouse> Pipeline<W> {
    /// Runs until `cancel`, then drains: flushes what it holds, waits up to the drain timeout,
    /// commits, and returns (dropping the consumer leaves the group).
    pub async fn run(self, cancel: CancellationToken) {
        let limits = self.writer.limits;
        let metrics = self.writer.metrics.clone();
        let mut batches = Batches::default();
        let mut busy: HashSet<TableRef> = HashSet::new();
        let mut tasks: JoinSet<Finished> = JoinSet::new();
        // Cancelled only when the drain timeout runs out.
        let abort = CancellationToken::new();
        let mut memory_pause = false;
        let pause_span = i64::try_from(self.window / 2).unwrap_or(i64::MAX).max(1);
        let mut commit_tick = tokio::time::interval(Duration::from_millis(500));
        commit_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);

        loop {
            let in_flight = lock(&self.writer.tracker).in_flight();
            metrics.buffered_rows.set(in_flight as i64);
            // Too much buffered: pause everything until half of it is written.
            let was = memory_pause;
            memory_pause = in_flight >= self.max_buffered
                || (memory_pause && in_flight > self.max_buffered / 2);
            if memory_pause != was {
                self.apply_pauses(memory_pause, pause_span);
            }
            let deadline = batches.next_deadline(&limits, &busy).map(Instant::from_std);
            tokio::select! {
                biased;
                () = cancel.cancelled() => break,
                Some(joined) = tasks.join_next() => {
                    if let Some(table) = finished(joined) {
                        busy.remove(&table);
                        if let Some(trigger) = batches.is_due(&table, &limits, std::time::Instant::now()) {
                            self.spawn_flush(&mut tasks, &mut batches, &mut busy, &table, trigger, &abort);
                        }
                    }
                }
                () = sleep_until(deadline) => {
                    for table in batches.due(&limits, std::time::Instant::now()) {
                        if !busy.contains(&table) {
                            self.spawn_flush(&mut tasks, &mut batches, &mut busy, &table, Trigger::Age, &abort);
                        }
                    }
                }
                _ = commit_tick.tick() => {
                    self.commit().await;
                    self.apply_pauses(memory_pause, pause_span);
                }
                // Keep polling while paused: paused partitions deliver nothing, but rebalance
                // callbacks and group heartbeats are served by the poll.
                message = self.consumer.recv() => match message {
                    Ok(message) => {
                        metrics.consumed.inc();
                        let (partition, offset) = (message.partition(), message.offset());
                        let value = message.payload().unwrap_or(&[]);
                        let (suspect, span) = {
                            let mut tracker = lock(&self.writer.tracker);
                            (tracker.consumed(partition, offset), tracker.span(partition))
                        };
                        if span >= pause_span || memory_pause {
                            // Past the window, or a newly assigned partition under memory
                            // pressure: pause it now rather than at the next tick.
                            self.apply_pauses(memory_pause, pause_span);
                        }
                        match self.place(value) {
                            Ok(placed) => {
                                let item = Item { row: placed.row, stream: placed.stream_id, partition, offset, original: value.to_vec(), suspect: suspect || placed.replayed };
                                if let Some(trigger) = batches.push(&placed.table, item, &limits, std::time::Instant::now())
                                    && !busy.contains(&placed.table)
                                {
                                    self.spawn_flush(&mut tasks, &mut batches, &mut busy, &placed.table, trigger, &abort);
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
                                        lock(&writer.tracker).done(partition, offset);
                                    }
                                    None
                                });
                            }
                        }
                    }
                    Err(error) => {
                        if error.rdkafka_error_code() == Some(RDKafkaErrorCode::InconsistentGroupProtocol) {
                            let refused = &self.consumer.context().group_refused;
                            if !refused.swap(true, std::sync::atomic::Ordering::Relaxed) {
                                tracing::error!(
                                    "the consumer group refuses this sink: it is in use with another partition assignment strategy (HOOKPIPE_ASSIGNMENT_STRATEGY must be the same on every replica; tansu also keeps an emptied group's strategy for good: go back to the old strategy, or move to a new HOOKPIPE_GROUP_ID starting from the old group's committed offsets); not ready until it is resolved"
                                );
                            }
                        }
                        // Broker trouble: librdkafka reconnects by itself; do not spin on it.
                        tracing::warn!(%error, "kafka consumer error");
                        tokio::time::sleep(Duration::from_millis(500)).await;
                    }
                },
            }
        }

        tracing::info!(rows = batches.rows(), "draining: flushing buffered rows");
        let drained = tokio::time::timeout(self.drain_timeout, async {
            loop {
                for table in batches.tables() {
                    if !busy.contains(&table) {
                        self.spawn_flush(
                            &mut tasks,
                            &mut batches,
                            &mut busy,
                            &table,
                            Trigger::Shutdown,
                            &abort,
                        );
                    }
                }
                match tasks.join_next().await {
                    Some(joined) => {
                        if let Some(table) = finished(joined) {
                            busy.remove(&table);
                        }
                    }
                    None => break,
                }
            }
        })
        .await;
        if drained.is_err() {
            tracing::warn!(
                "drain timeout reached; unwritten rows stay uncommitted and will be re-read"
            );
            abort.cancel();
            while tasks.join_next().await.is_some() {}
        }
        self.commit().await;
        tracing::info!("sink drained");
    }

    /// Places a record; for an unknown stream, first re-reads the catalogue file, since the
    /// gateway may have loaded a newer version than this sink's last reload tick.
    fn place(&self, value: &[u8]) -> Result<row::Placed, (Poison, String)> {
        match row::place(value, &self.catalogue.current()) {
            Err((Poison::UnknownStream, detail)) => match Catalogue::load(&self.catalogue_path) {
                Ok(fresh) if row::place(value, &fresh).is_ok() => {
                    tracing::info!("unknown stream: re-read the catalogue file");
                    self.catalogue.replace(fresh);
                    row::place(value, &self.catalogue.current())
                }
                _ => Err((Poison::UnknownStream, detail)),
            },
            other => other,
        }
    }

    fn spawn_flush(
        &self,
        tasks: &mut JoinSet<Finished>,
        batches: &mut Batches,
        busy: &mut HashSet<TableRef>,
        table: &TableRef,
        trigger: Trigger,
        abort: &CancellationToken,
    ) {
        if let Some(batch) = batches.take(table) {
            busy.insert(table.clone());
            tasks.spawn(
                self.writer
                    .clone()
                    .flush(table.clone(), batch, trigger, abort.clone()),
            );
        }
    }

    /// Commits what is safe, synchronously (off the runtime), so that only a commit the broker
    /// confirmed moves the point the dedup window is counted from. (An async commit's result
    /// would come through the commit callback, which the stream consumer does not serve.)
    async fn commit(&self) {
        let offsets = lock(&self.writer.tracker).to_commit();
        if offsets.is_empty() {
            return;
        }
        let mut tpl = TopicPartitionList::new();
        for (p, o) in &offsets {
            let _ = tpl.add_partition_offset(&self.writer.topic, *p, Offset::Offset(*o));
        }
        let consumer = self.consumer.clone();
        let result = match tokio::task::spawn_blocking(move || {
            consumer.commit(&tpl, CommitMode::Sync)
        })
        .await
        {
            Ok(result) => result.map_err(|e| e.to_string()),
            Err(error) => Err(error.to_string()),
        };
        let mut tracker = lock(&self.writer.tracker);
        match result {
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
                for (p, _) in offsets {
                    tracker.commit_failed(p);
                }
                tracing::warn!(%error, "offset commit failed, will retry");
            }
        }
    }

    /// Brings the consumer's paused partitions in line with the tracker: pause partitions
    /// that ran too far past their confirmed commit (or all, when too much is buffered),
    /// resume those that caught up.
    fn apply_pauses(&self, all: bool, pause_span: i64) {
        let (pause, resume) = lock(&self.writer.tracker).pause_changes(all, pause_span);
        for (partitions, paused) in [(pause, true), (resume, false)] {
            if partitions.is_empty() {
                continue;
            }
            let mut tpl = TopicPartitionList::new();
            for p in &partitions {
                tpl.add_partition(&self.writer.topic, *p);
            }
            let result = if paused {
                self.consumer.pause(&tpl)
            } else {
                self.consumer.resume(&tpl)
            };
            match result {
                Ok(()) => tracing::debug!(?partitions, paused, "consumption paused/resumed"),
                Err(error) => {
                    tracing::warn!(%error, ?partitions, paused, "pause/resume failed, will retry");
                    let mut tracker = lock(&self.writer.tracker);
                    for p in partitions {
                        tracker.set_paused(p, !paused);
                    }
                }
            }
        }
        self.writer.metrics.paused.set(i64::from(all));
    }
}

fn finished(joined: Result<Finished, tokio::task::JoinError>) -> Finished {
    match joined {
        Ok(table) => table,
        // A panicking task leaves its offsets pending: they are never committed, and are
        // re-read after a restart.
        Err(error) => {
            tracing::error!(%error, "sink task failed");
            None
        }
    }
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}
