//! The table writer: takes one table's batch and makes every row end up written, skipped as a
//! duplicate, dead-lettered or parked, marking each done in the offset tracker as it happens.
//! What to do after a failure is decided in `decide.rs`; this file only performs it.
//!
//! A batch is written per partition (each group under its partition's cancellation token, so
//! a revoked partition stops writing at once), groups of a table concurrently.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use backon::{BackoffBuilder, ExponentialBuilder};
use hookpipe_common::TableRef;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::batch::{Item, Limits, TableBatch, Trigger};
use crate::decide::{Action, Health, Policy, Situation, decide};
use crate::dedup::{RecentHits, first_occurrences};
use crate::metrics::Metrics;
use crate::offsets::OffsetTracker;
use crate::row::{self, Poison};
use crate::shelf::{Letter, Shelf, ShelfError, Stored, ToPark};
use crate::warehouse::{Warehouse, WriteError};

pub fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    match mutex.lock() {
        Ok(guard) => guard,
        Err(poisoned) => poisoned.into_inner(),
    }
}

/// Retry pauses: exponential from `initial` to `max`, with jitter so replicas that failed
/// together do not retry together.
pub fn backoff(initial: Duration, max: Duration) -> ExponentialBuilder {
    ExponentialBuilder::new()
        .with_min_delay(initial)
        .with_max_delay(max)
        .with_jitter()
        .without_max_times()
}

/// Everything a flush needs, shared between flush tasks.
pub struct Writer<W, S> {
    pub warehouse: Arc<W>,
    pub shelf: Arc<S>,
    pub metrics: Arc<Metrics>,
    pub tracker: Arc<Mutex<OffsetTracker>>,
    pub recent: Mutex<RecentHits>,
    pub backoff: ExponentialBuilder,
    pub limits: Limits,
    pub policy: Policy,
    pub topic: String,
    /// Tables known to exist with a fitting schema.
    pub ready_tables: Mutex<HashSet<TableRef>>,
    pub health: Mutex<Health>,
    /// Set by the pipeline while partitions are held back (paused at the dedup window, or
    /// memory full): a failing table's rows are parked at once then.
    pub pressure: AtomicBool,
    /// Woken when a parked table answers again, so its parked rows go back without waiting.
    pub unparked: tokio::sync::Notify,
    /// One token per owned partition, cancelled when it is revoked or lost.
    pub partitions: Mutex<HashMap<i32, CancellationToken>>,
    /// Writes running per partition, so a revoke can wait for them.
    pub active: Mutex<HashMap<i32, usize>>,
    /// How long after an assignment the partition's suspect rows wait before they are looked
    /// up: time for a previous owner that lost its session to notice and stop writing.
    pub fence: Duration,
}

/// Counts a running write of a partition for as long as it lives.
struct Active<'a> {
    active: &'a Mutex<HashMap<i32, usize>>,
    partition: i32,
}

impl<'a> Active<'a> {
    fn new(active: &'a Mutex<HashMap<i32, usize>>, partition: i32) -> Self {
        *lock(active).entry(partition).or_default() += 1;
        Self { active, partition }
    }
}

impl Drop for Active<'_> {
    fn drop(&mut self) {
        let mut active = lock(self.active);
        if let Some(n) = active.get_mut(&self.partition) {
            *n -= 1;
            if *n == 0 {
                active.remove(&self.partition);
            }
        }
    }
}

impl<W: Warehouse, S: Shelf> crate::consumer::Ownership for Writer<W, S> {
    fn revoke(&self, partition: i32) {
        self.cancel_partition(partition);
    }

    fn writing(&self, partition: i32) -> bool {
        lock(&self.active).contains_key(&partition)
    }

    fn release(&self, partition: i32) -> futures_util::future::BoxFuture<'_, ()> {
        Box::pin(self.warehouse.release(partition))
    }

    fn assign(&self, partition: i32) {
        lock(&self.partitions).insert(partition, CancellationToken::new());
    }
}

/// The rows of one partition for one table, and where the write stands.
struct Group {
    table: TableRef,
    partition: i32,
    items: Vec<Item>,
}

impl<W: Warehouse, S: Shelf> Writer<W, S> {
    /// The cancellation token of an owned partition; `None` once it is revoked.
    pub fn partition_token(&self, partition: i32) -> Option<CancellationToken> {
        lock(&self.partitions).get(&partition).cloned()
    }

    /// Stops every write of a revoked or lost partition at its next step.
    pub fn cancel_partition(&self, partition: i32) {
        if let Some(token) = lock(&self.partitions).remove(&partition) {
            token.cancel();
        }
    }

    fn done<'a>(&self, items: impl IntoIterator<Item = &'a Item>) {
        let mut tracker = lock(&self.tracker);
        for item in items {
            tracker.done(item.partition, item.offset);
        }
    }

    /// Writes one table's batch. Returns the table (the pipeline's cue that the next batch of
    /// the table may go). `abort` stops everything (drain timeout); a partition's own token
    /// stops its rows.
    pub async fn flush(
        self: Arc<Self>,
        table: TableRef,
        batch: TableBatch,
        trigger: Trigger,
        abort: CancellationToken,
    ) -> TableRef {
        let mut by_partition: HashMap<i32, Vec<Item>> = HashMap::new();
        {
            let mut tracker = lock(&self.tracker);
            for item in batch.items {
                // A revoked partition's rows are the new owner's to write.
                if tracker.owns(item.partition) {
                    tracker.writing(item.partition, item.offset);
                    by_partition.entry(item.partition).or_default().push(item);
                }
            }
        }
        if by_partition.is_empty() {
            return table;
        }
        self.metrics.flush(trigger.as_str());
        self.metrics
            .batch_rows
            .observe(by_partition.values().map(Vec::len).sum::<usize>() as f64);
        self.metrics.batch_bytes.observe(batch.bytes as f64);
        let groups = by_partition.into_iter().filter_map(|(partition, items)| {
            // Revoked since the rows were read: they are the new owner's.
            let cancel = self.partition_token(partition)?.child_token();
            let abort = abort.clone();
            let this = self.clone();
            let group = Group {
                table: table.clone(),
                partition,
                items,
            };
            Some(async move {
                let _active = Active::new(&this.active, partition);
                // Either token stops the group at its next step: the partition's (revoked or
                // lost) or the drain's (timeout). A call in flight is dropped then.
                tokio::select! {
                    () = this.write_group(group, &cancel) => {}
                    () = abort.cancelled() => {}
                }
            })
        });
        futures_util::future::join_all(groups).await;
        table
    }

    async fn write_group(&self, group: Group, cancel: &CancellationToken) {
        let Group {
            table,
            partition,
            items,
        } = group;
        tracing::debug!(%table, partition, rows = items.len(), "writing");

        // Repeats inside the batch and hit_ids this process wrote recently.
        let (keep, repeats) = {
            let recent = lock(&self.recent);
            first_occurrences(items.iter().map(|i| (i.row.hit_id, i.replayed)), &recent)
        };
        if !repeats.is_empty() {
            self.metrics.duplicates_skipped.inc_by(repeats.len() as u64);
            self.done(repeats.iter().map(|&i| &items[i]));
        }
        let mut items: Vec<Item> = keep.into_iter().map(|i| items[i].clone()).collect();

        // A parked table's rows go straight back to parking until its next probe, except rows
        // that come back from parking or replay: they are the probe.
        let at_once = lock(&self.health).park_at_once(&table, Instant::now());
        if at_once && !items.iter().any(|i| i.replayed) {
            self.park(&table, &items, "parked", "the table is parked", cancel)
                .await;
            return;
        }

        let mut run = Run::new(self, &table, partition, cancel);
        loop {
            if cancel.is_cancelled() {
                return;
            }
            // 1. The table exists with a fitting schema.
            if !lock(&self.ready_tables).contains(&table) {
                let Some(result) = guarded(cancel, self.warehouse.ensure_table(&table)).await
                else {
                    return;
                };
                match result {
                    Ok(()) => {
                        lock(&self.ready_tables).insert(table.clone());
                    }
                    Err(error) => {
                        self.metrics.write_error(error.kind());
                        match run.after_failure(&error, items.len()).await {
                            Step::Again => continue,
                            Step::Park => {
                                self.park_after_failure(&table, &items, &error, cancel)
                                    .await;
                                return;
                            }
                            Step::Reject(reason, detail) => {
                                self.reject(&items, reason, &detail, cancel).await;
                                return;
                            }
                            Step::Stop => return,
                        }
                    }
                }
            }
            // 2. Rows a previous owner (or an attempt whose answer was lost) may have written:
            //    look them up and skip those already there, once a previous owner can no
            //    longer write (the fence).
            if items.iter().any(|i| i.suspect) {
                let wait = lock(&self.tracker).fence_remaining(partition, self.fence);
                if !wait.is_zero() {
                    tracing::debug!(%table, partition, wait_ms = wait.as_millis() as u64, "waiting out the fence before looking suspect rows up");
                    tokio::select! {
                        () = tokio::time::sleep(wait) => {}
                        () = cancel.cancelled() => return,
                    }
                }
                let Some(result) = guarded(cancel, self.lookup_suspects(&table, &items)).await
                else {
                    return;
                };
                match result {
                    Ok(existing) => {
                        if !existing.is_empty() {
                            let (dupes, fresh): (Vec<Item>, Vec<Item>) = items
                                .into_iter()
                                .partition(|i| i.suspect && existing.contains(&i.row.hit_id));
                            tracing::info!(%table, partition, skipped = dupes.len(), "rows already in the table skipped");
                            self.metrics.duplicates_skipped.inc_by(dupes.len() as u64);
                            self.metrics.lookup_skipped.inc_by(dupes.len() as u64);
                            lock(&self.recent).insert(dupes.iter().map(|i| i.row.hit_id));
                            self.done(&dupes);
                            items = fresh;
                        }
                        for item in &mut items {
                            item.suspect = false;
                        }
                    }
                    Err(error) => {
                        self.metrics.write_error("dedup_lookup");
                        match run.after_failure(&error, items.len()).await {
                            Step::Again | Step::Reject(..) => continue,
                            Step::Park => {
                                self.park_after_failure(&table, &items, &error, cancel)
                                    .await;
                                return;
                            }
                            Step::Stop => return,
                        }
                    }
                }
            }
            // 3. The write itself.
            match self.write_rows(&mut run, items, cancel).await {
                Written::Done => return,
                Written::Again(rest) => items = rest,
            }
        }
    }

    /// Writes rows in requests within the limits, acting on each failure as `decide` says.
    /// Returns `Again` with rows that must go through the lookup (or table check) first.
    async fn write_rows(
        &self,
        run: &mut Run<'_, W, S>,
        items: Vec<Item>,
        cancel: &CancellationToken,
    ) -> Written {
        let table = run.table;
        // Each unit of work goes to the warehouse whole; it splits it into requests itself.
        let mut work: Vec<Vec<Item>> = vec![items];
        while let Some(chunk) = work.pop() {
            if cancel.is_cancelled() {
                return Written::Done;
            }
            let rows: Vec<&row::Row> = chunk.iter().map(|i| &i.row).collect();
            fail::fail_point!("sink::before_write");
            let started = Instant::now();
            let Some(result) =
                guarded(cancel, self.warehouse.write(table, run.partition, &rows)).await
            else {
                return Written::Done;
            };
            self.metrics
                .write_duration
                .observe(started.elapsed().as_secs_f64());
            let (chunk, error) = match result {
                Ok(()) => {
                    // Dies like SIGKILL right after the rows are stored, before they count as
                    // done (so before any commit covers them).
                    fail::fail_point!("sink::after_write", |_| std::process::abort());
                    self.written(table, &chunk);
                    run.success();
                    continue;
                }
                Err(WriteError::Partial { written, error }) => {
                    let (stored, rest, error) = split_written(chunk, &written, *error);
                    if !stored.is_empty() {
                        fail::fail_point!("sink::after_write", |_| std::process::abort());
                        self.written(table, &stored);
                        run.success();
                    }
                    (rest, error)
                }
                Err(error) => (chunk, error),
            };
            if chunk.is_empty() {
                continue;
            }
            self.metrics.write_error(error.kind());
            let mut situation = run.situation(chunk.len());
            let mut action = decide(&self.policy, &error, &situation);
            if action == Action::ProbeTable {
                situation.table_answers = Some(self.table_answers(table).await);
                action = decide(&self.policy, &error, &situation);
            }
            match action {
                Action::RejectRows(rejected) => {
                    let bad: HashSet<usize> = rejected.iter().map(|(i, _)| *i).collect();
                    for (index, detail) in &rejected {
                        if let Some(item) = chunk.get(*index) {
                            tracing::warn!(%table, hit_id = %item.row.hit_id, %detail, "row rejected by BigQuery");
                            if !self
                                .dead_letter(item, Poison::RejectedByBigQuery, detail, cancel)
                                .await
                            {
                                return Written::Done;
                            }
                        }
                    }
                    let good: Vec<Item> = chunk
                        .into_iter()
                        .enumerate()
                        .filter(|(i, _)| !bad.contains(i))
                        .map(|(_, item)| item)
                        .collect();
                    if !good.is_empty() {
                        work.push(good);
                    }
                }
                Action::RejectAll(reason, detail) => {
                    tracing::warn!(%table, rows = chunk.len(), reason = reason.as_str(), %detail, "rows rejected, dead-lettering");
                    if !self.reject(&chunk, reason, &detail, cancel).await {
                        return Written::Done;
                    }
                }
                Action::Split => {
                    let mut second = chunk;
                    let first: Vec<Item> = second.drain(..second.len() / 2).collect();
                    work.push(second);
                    work.push(first);
                }
                // `decide` asks for the probe only while `table_answers` is unknown, and it
                // was answered above.
                Action::ProbeTable => work.push(chunk),
                Action::Strike => {
                    if let Some(item) = chunk.first() {
                        *run.strikes.entry(item.offset).or_default() += 1;
                    }
                    if !run.pause(&error).await {
                        return Written::Done;
                    }
                    work.push(chunk);
                }
                Action::Retry { suspect, recreate } => {
                    if !run.pause(&error).await {
                        return Written::Done;
                    }
                    if recreate {
                        lock(&self.ready_tables).remove(table);
                    }
                    if suspect || recreate {
                        // Everything not yet written goes through the lookup (and the table
                        // check) again, the failed request's rows as suspects.
                        let mut rest: Vec<Item> = chunk;
                        if suspect {
                            self.metrics.ambiguous_writes.inc();
                            for item in &mut rest {
                                item.suspect = true;
                            }
                        }
                        while let Some(more) = work.pop() {
                            rest.extend(more);
                        }
                        return Written::Again(rest);
                    }
                    work.push(chunk);
                }
                Action::Park => {
                    let mut rest: Vec<Item> = chunk;
                    while let Some(more) = work.pop() {
                        rest.extend(more);
                    }
                    self.park_after_failure(table, &rest, &error, cancel).await;
                    return Written::Done;
                }
            }
        }
        Written::Done
    }

    /// Whether BigQuery answers for the table right now (the emulator's 500-for-a-bad-row
    /// quirk). Asked twice: a server that just answered 500 may have closed the pooled
    /// connection the first probe reuses.
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

    async fn lookup_suspects(
        &self,
        table: &TableRef,
        items: &[Item],
    ) -> Result<HashSet<Uuid>, WriteError> {
        let suspects: Vec<&Item> = items.iter().filter(|i| i.suspect).collect();
        let mut existing = HashSet::new();
        for group in suspects.chunks(self.limits.max_rows.clamp(1, 1000)) {
            let dates: BTreeSet<_> = group.iter().map(|i| i.row.date).collect();
            let ids: Vec<Uuid> = group.iter().map(|i| i.row.hit_id).collect();
            self.metrics.lookups.inc();
            existing.extend(self.warehouse.existing_hit_ids(table, &dates, &ids).await?);
        }
        Ok(existing)
    }

    fn written(&self, table: &TableRef, chunk: &[Item]) {
        let now = hookpipe_common::now_ms();
        for item in chunk {
            self.metrics
                .end_to_end
                .observe((now - item.row.received_at).max(0) as f64 / 1000.0);
        }
        let mut id_buf = Uuid::encode_buffer();
        let mut counted = 0;
        while counted < chunk.len() {
            let stream = chunk[counted].stream;
            let n = chunk[counted..]
                .iter()
                .take_while(|i| i.stream == stream)
                .count();
            self.metrics
                .rows_written(stream.hyphenated().encode_lower(&mut id_buf), n as u64);
            // Per stream: a table may be shared by several streams.
            if let Some(newest) = chunk[counted..counted + n]
                .iter()
                .map(|i| i.row.received_at)
                .max()
            {
                self.metrics.stream_freshness(stream, newest);
            }
            counted += n;
        }
        lock(&self.recent).insert(chunk.iter().map(|i| i.row.hit_id));
        self.done(chunk);
        if lock(&self.health).succeeded(table, Instant::now()) {
            tracing::info!(%table, "parked table answers again, its parked rows go back");
            self.metrics.table_parked(table, false);
            self.unparked.notify_one();
        }
    }

    /// Dead-letters each row; false if cancelled first.
    async fn reject(
        &self,
        items: &[Item],
        reason: Poison,
        detail: &str,
        cancel: &CancellationToken,
    ) -> bool {
        for item in items {
            if !self.dead_letter(item, reason, detail, cancel).await {
                return false;
            }
        }
        true
    }

    /// Sends one record to the dead-letter topic, retrying until it is there, and marks it
    /// done. False if cancelled first.
    async fn dead_letter(
        &self,
        item: &Item,
        reason: Poison,
        detail: &str,
        cancel: &CancellationToken,
    ) -> bool {
        let key = item.row.hit_id.to_string();
        let letter = Letter {
            original: &item.original,
            key: Some(key.as_bytes()),
            reason,
            detail,
            source_topic: &self.topic,
            partition: item.partition,
            offset: item.offset,
        };
        if send_dead_letter(&*self.shelf, &self.metrics, self.backoff, letter, cancel).await {
            self.done([item]);
            true
        } else {
            false
        }
    }

    async fn park_after_failure(
        &self,
        table: &TableRef,
        items: &[Item],
        error: &WriteError,
        cancel: &CancellationToken,
    ) {
        tracing::warn!(%table, rows = items.len(), %error, "table keeps failing while others are written: parking its rows");
        self.park(table, items, error.kind(), &error.to_string(), cancel)
            .await;
    }

    /// Puts rows on the parking topic (each acknowledged before it counts as done) and marks
    /// the table parked.
    async fn park(
        &self,
        table: &TableRef,
        items: &[Item],
        reason: &str,
        detail: &str,
        cancel: &CancellationToken,
    ) {
        let newly = !lock(&self.health).park_at_once(table, Instant::now());
        lock(&self.health).parked(table, Instant::now());
        if newly {
            self.metrics.table_parked(table, true);
        }
        let table_name = table.to_string();
        let mut attempts = self.backoff.build();
        for item in items {
            let key = item.row.hit_id.to_string();
            let record = ToPark {
                original: &item.original,
                key: Some(key.as_bytes()),
                table: &table_name,
                reason,
                detail,
                source_topic: &self.topic,
                partition: item.partition,
                offset: item.offset,
            };
            loop {
                if cancel.is_cancelled() {
                    return;
                }
                match self.shelf.park(record).await {
                    Ok(()) => {
                        self.metrics.rows_parked(&table_name, 1);
                        self.done([item]);
                        break;
                    }
                    Err(error) => {
                        let delay = attempts.next().unwrap_or(Duration::from_secs(30));
                        match &error {
                            ShelfError::TooLarge(_) => {
                                tracing::error!(%table, offset = item.offset, %error, "a record is too large for the parking topic (raise its max.message.bytes): it stays on its partition until the table answers")
                            }
                            ShelfError::Transient(_) => {
                                tracing::warn!(%error, "parking a row failed, retrying")
                            }
                        }
                        if matches!(error, ShelfError::TooLarge(_)) {
                            // Left pending: the partition's commit waits for the table.
                            break;
                        }
                        tokio::select! {
                            () = tokio::time::sleep(delay) => {}
                            () = cancel.cancelled() => return,
                        }
                    }
                }
            }
        }
    }
}

/// Splits a unit of work after a partial write: the rows stored, the rest, and the error with
/// its row indexes counted in the rest.
fn split_written(
    chunk: Vec<Item>,
    written: &[usize],
    error: WriteError,
) -> (Vec<Item>, Vec<Item>, WriteError) {
    let written: HashSet<usize> = written.iter().copied().collect();
    let mut position = HashMap::new();
    let (mut stored, mut rest) = (Vec::new(), Vec::new());
    for (i, item) in chunk.into_iter().enumerate() {
        if written.contains(&i) {
            stored.push(item);
        } else {
            position.insert(i, rest.len());
            rest.push(item);
        }
    }
    let error = match error {
        WriteError::RowsRejected(rows) => WriteError::RowsRejected(
            rows.into_iter()
                .filter_map(|(i, detail)| Some((*position.get(&i)?, detail)))
                .collect(),
        ),
        other => other,
    };
    (stored, rest, error)
}

/// Runs `call` unless `cancel` fires first (then the call in flight is dropped).
async fn guarded<T>(cancel: &CancellationToken, call: impl Future<Output = T>) -> Option<T> {
    tokio::select! {
        r = call => Some(r),
        () = cancel.cancelled() => None,
    }
}

/// Where a write stands when `write_rows` returns.
enum Written {
    Done,
    /// Rows to put through the table check and lookup again.
    Again(Vec<Item>),
}

/// What to do after a failure outside the write request (table check, lookup).
enum Step {
    Again,
    Park,
    Reject(Poison, String),
    Stop,
}

/// The state of one group's write across attempts: backoff, strikes, the table's health.
struct Run<'a, W, S> {
    writer: &'a Writer<W, S>,
    table: &'a TableRef,
    partition: i32,
    cancel: &'a CancellationToken,
    attempts: backon::ExponentialBackoff,
    /// 5xx strikes per row (by offset), for the emulator's bad-row hunt.
    strikes: HashMap<i64, u32>,
}

impl<'a, W: Warehouse, S: Shelf> Run<'a, W, S> {
    fn new(
        writer: &'a Writer<W, S>,
        table: &'a TableRef,
        partition: i32,
        cancel: &'a CancellationToken,
    ) -> Self {
        Self {
            writer,
            table,
            partition,
            cancel,
            attempts: writer.backoff.build(),
            strikes: HashMap::new(),
        }
    }

    fn success(&mut self) {
        self.attempts = self.writer.backoff.build();
    }

    /// Records the failure in the table's health and returns what `decide` needs.
    fn situation(&self, rows: usize) -> Situation {
        let (failing_for, others_writing) =
            lock(&self.writer.health).failed(self.table, Instant::now());
        Situation {
            rows,
            failing_for,
            others_writing,
            pressure: self.writer.pressure.load(Ordering::Relaxed),
            table_answers: None,
            strikes: 0,
        }
    }

    /// Decides after a failed table check or lookup.
    async fn after_failure(&mut self, error: &WriteError, rows: usize) -> Step {
        let situation = self.situation(rows);
        match decide(&self.writer.policy, error, &situation) {
            Action::Park => Step::Park,
            Action::RejectAll(reason, detail) => Step::Reject(reason, detail),
            _ => {
                if self.pause(error).await {
                    Step::Again
                } else {
                    Step::Stop
                }
            }
        }
    }

    /// Waits before a retry. False if cancelled meanwhile.
    async fn pause(&mut self, error: &WriteError) -> bool {
        let delay = self.attempts.next().unwrap_or(Duration::from_secs(30));
        self.writer.metrics.retries.inc();
        tracing::warn!(table = %self.table, partition = self.partition, delay_ms = delay.as_millis() as u64, %error, "bigquery call failed, retrying");
        tokio::select! {
            () = tokio::time::sleep(delay) => true,
            () = self.cancel.cancelled() => false,
        }
    }
}

/// Publishes a dead letter, retrying transient failures. False if cancelled first.
pub async fn send_dead_letter<S: Shelf + ?Sized>(
    shelf: &S,
    metrics: &Metrics,
    backoff: ExponentialBuilder,
    letter: Letter<'_>,
    cancel: &CancellationToken,
) -> bool {
    let mut attempts = backoff.build();
    loop {
        let result = tokio::select! {
            r = shelf.dead_letter(letter) => r,
            () = cancel.cancelled() => return false,
        };
        match result {
            Ok(stored) => {
                metrics.dead_letter(letter.reason.as_str());
                if stored == Stored::Truncated {
                    metrics.dead_letters_truncated.inc();
                    tracing::warn!(
                        size = letter.original.len(),
                        "dead letter larger than the topic accepts: stored truncated, with its size and SHA-256"
                    );
                }
                return true;
            }
            Err(error) => {
                let delay = attempts.next().unwrap_or(Duration::from_secs(30));
                tracing::warn!(%error, "dead-letter publish failed, retrying");
                tokio::select! {
                    () = tokio::time::sleep(delay) => {}
                    () = cancel.cancelled() => return false,
                }
            }
        }
    }
}
