//! The consumer loop: read envelopes, batch rows per table, hand due batches to the writer
//! (tables concurrently, one batch of a table at a time), dead-letter what cannot be placed,
//! and commit each partition only up to the first record not yet durably handled.

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use bytes::Bytes;
use hookpipe_common::catalogue::Shared;
use hookpipe_common::{Catalogue, TableRef};
use rdkafka::consumer::Consumer;
use rdkafka::message::Message;
use rdkafka::types::RDKafkaErrorCode;
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::batch::{Batches, Item, Trigger};
use crate::consumer::{Committer, SinkConsumer, apply_pauses};
use crate::row::{self, PlaceCache, Poison};
use crate::shelf::{Letter, Shelf};
use crate::warehouse::Warehouse;
use crate::writer::{Writer, lock, send_dead_letter};

/// Why the sink stops on its own (crash-only: the orchestrator restarts it, and redelivery
/// plus deduplication make the restart harmless).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Fatal {
    #[error("a write task panicked: {0}")]
    TaskPanicked(String),
    #[error("{0}")]
    GroupLost(String),
}

pub struct Pipeline<W, S> {
    pub consumer: Arc<SinkConsumer>,
    pub writer: Arc<Writer<W, S>>,
    pub catalogue: Arc<Shared<Catalogue>>,
    /// The catalogue file, re-read at once when a record names a stream the catalogue in
    /// force does not know (it may have been added since the last reload tick).
    pub catalogue_path: std::path::PathBuf,
    /// Records consumed and not yet handled above which all consumption pauses.
    pub max_buffered: usize,
    /// The same bound in bytes.
    pub max_buffered_bytes: usize,
    /// The dedup window: a partition pauses when it runs half of this ahead of its last
    /// confirmed commit.
    pub window: usize,
    pub drain_timeout: Duration,
    pub commit_timeout: Duration,
}

/// What a finished task reports: the table whose flush ended, or nothing (a dead letter).
type Finished = Option<TableRef>;

impl<W: Warehouse, S: Shelf> Pipeline<W, S> {
    /// Runs until `cancel`, then drains: flushes what it holds, waits up to the drain timeout,
    /// commits, and returns (dropping the consumer leaves the group). A panicked write task
    /// ends the run with `Fatal` (after the drain), so the process exits non-zero.
    pub async fn run(self, cancel: CancellationToken) -> Result<(), Fatal> {
        let limits = self.writer.limits;
        let metrics = self.writer.metrics.clone();
        let tracker = self.writer.tracker.clone();
        let topic = self.writer.topic.clone();
        let mut committer = Committer::new(
            self.consumer.clone(),
            tracker.clone(),
            metrics.clone(),
            topic.clone(),
            self.commit_timeout,
        );
        let mut batches = Batches::default();
        let mut busy: HashSet<TableRef> = HashSet::new();
        let mut tasks: JoinSet<Finished> = JoinSet::new();
        let mut cache = PlaceCache::default();
        let mut fatal: Option<Fatal> = None;
        // Cancelled only when the drain timeout runs out.
        let abort = CancellationToken::new();
        let mut memory_pause = false;
        let pause_span = i64::try_from(self.window / 2).unwrap_or(i64::MAX).max(1);
        let mut commit_tick = tokio::time::interval(Duration::from_millis(500));
        commit_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);

        loop {
            let (rows, bytes) = {
                let t = lock(&tracker);
                (t.in_flight(), t.in_flight_bytes())
            };
            metrics.buffered_rows.set(rows as i64);
            metrics.buffered_bytes.set(bytes as i64);
            // Too much buffered: pause everything until half of it is written.
            let was = memory_pause;
            let over = rows >= self.max_buffered || bytes >= self.max_buffered_bytes;
            let half = rows > self.max_buffered / 2 || bytes > self.max_buffered_bytes / 2;
            memory_pause = over || (memory_pause && half);
            if memory_pause != was {
                self.pauses(memory_pause, pause_span);
            }
            let deadline = batches.next_deadline(&limits, &busy).map(Instant::from_std);
            tokio::select! {
                biased;
                () = cancel.cancelled() => break,
                Some(joined) = tasks.join_next() => match joined {
                    Ok(Some(table)) => {
                        busy.remove(&table);
                        if let Some(trigger) = batches.is_due(&table, &limits, std::time::Instant::now()) {
                            self.spawn_flush(&mut tasks, &mut batches, &mut busy, &table, trigger, &abort);
                        }
                    }
                    Ok(None) => {}
                    Err(error) => {
                        // Its rows stay pending and uncommitted for good: only a restart
                        // (re-reading from the commit) can write them.
                        tracing::error!(%error, "a write task failed; exiting so the sink restarts");
                        fatal = Some(Fatal::TaskPanicked(error.to_string()));
                        break;
                    }
                },
                () = sleep_until(deadline) => {
                    for table in batches.due(&limits, std::time::Instant::now()) {
                        if !busy.contains(&table) {
                            self.spawn_flush(&mut tasks, &mut batches, &mut busy, &table, Trigger::Age, &abort);
                        }
                    }
                }
                _ = commit_tick.tick() => {
                    committer.commit().await;
                    self.pauses(memory_pause, pause_span);
                }
                // Keep polling while paused: paused partitions deliver nothing, but rebalance
                // callbacks and group heartbeats are served by the poll.
                message = self.consumer.recv() => match message {
                    Ok(message) => {
                        metrics.consumed.inc();
                        let (partition, offset) = (message.partition(), message.offset());
                        let value = Bytes::copy_from_slice(message.payload().unwrap_or(&[]));
                        let consumed = lock(&tracker).consumed(partition, offset, value.len());
                        let Some(suspect) = consumed else {
                            // Left in librdkafka's queue from before a revoke: the new owner's.
                            tracing::debug!(partition, offset, "record of a partition not owned, dropped");
                            continue;
                        };
                        let span = lock(&tracker).span(partition);
                        if span >= pause_span || memory_pause {
                            // Past the window, or a newly assigned partition under memory
                            // pressure: pause it now rather than at the next tick.
                            self.pauses(memory_pause, pause_span);
                        }
                        match self.place(&value, &mut cache) {
                            Ok(placed) => {
                                let item = Item {
                                    row: placed.row,
                                    stream: placed.stream_id,
                                    partition,
                                    offset,
                                    original: value,
                                    suspect: suspect || placed.replayed,
                                    replayed: placed.replayed,
                                };
                                if let Some(trigger) = batches.push(&placed.table, item, &limits, std::time::Instant::now())
                                    && !busy.contains(&placed.table)
                                {
                                    self.spawn_flush(&mut tasks, &mut batches, &mut busy, &placed.table, trigger, &abort);
                                }
                            }
                            Err((reason, detail)) => {
                                tracing::warn!(partition, offset, reason = reason.as_str(), %detail, "record cannot be written, dead-lettering");
                                let key = message.key().map(<[u8]>::to_vec);
                                self.spawn_dead_letter(&mut tasks, value, key, reason, detail, partition, offset, &abort);
                            }
                        }
                    }
                    Err(error) => {
                        if error.rdkafka_error_code() == Some(RDKafkaErrorCode::InconsistentGroupProtocol) {
                            let refused = &self.consumer.context().group_refused;
                            if !refused.swap(true, Ordering::Relaxed) {
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
        // The drain keeps serving the consumer: the group may hand partitions to another
        // member meanwhile (a member joining, or the guard of one that judged them ownerless),
        // and only a poll runs the revoke that stops their writes and finalizes their streams
        // before the new owner looks their rows up. Nothing more is read (every partition
        // paused, including any assigned meanwhile), and commits go on, so the group sees
        // progress while a slow BigQuery is drained.
        self.consumer
            .context()
            .draining
            .store(true, Ordering::Relaxed);
        apply_pauses(
            &self.consumer,
            &self.writer.tracker,
            &self.writer.topic,
            true,
            pause_span,
        );
        let drained = tokio::time::timeout(self.drain_timeout, async {
            loop {
                if fatal.is_none() {
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
                }
                if tasks.is_empty() {
                    break;
                }
                tokio::select! {
                    biased;
                    Some(joined) = tasks.join_next() => match joined {
                        Ok(Some(table)) => {
                            busy.remove(&table);
                        }
                        Ok(None) => {}
                        Err(error) => {
                            tracing::error!(%error, "a write task failed while draining");
                            fatal.get_or_insert(Fatal::TaskPanicked(error.to_string()));
                        }
                    },
                    _ = commit_tick.tick() => committer.commit().await,
                    message = self.consumer.recv() => match message {
                        // Read before the pause took effect: the next owner's, from the
                        // commit (never tracked, so no commit passes it).
                        Ok(message) => tracing::debug!(partition = message.partition(), offset = message.offset(), "record read while draining, left for the next owner"),
                        // Broker trouble: do not spin on it.
                        Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
                    },
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
        committer.commit().await;
        tracing::info!("sink drained");
        match fatal {
            Some(f) => Err(f),
            None => Ok(()),
        }
    }

    /// Places a record; for an unknown stream (an envelope from before the gateway wrote the
    /// table into it), first re-reads the catalogue file, since it may have changed since the
    /// last reload tick.
    fn place(
        &self,
        value: &Bytes,
        cache: &mut PlaceCache,
    ) -> Result<row::Placed, (Poison, String)> {
        match row::place(value, &self.catalogue.current(), cache) {
            Err((Poison::UnknownStream, detail)) => match Catalogue::load(&self.catalogue_path) {
                Ok(fresh) if row::place(value, &fresh, cache).is_ok() => {
                    tracing::info!("unknown stream: re-read the catalogue file");
                    self.catalogue.replace(fresh);
                    row::place(value, &self.catalogue.current(), cache)
                }
                _ => Err((Poison::UnknownStream, detail)),
            },
            other => other,
        }
    }

    fn pauses(&self, all: bool, pause_span: i64) {
        let held = apply_pauses(
            &self.consumer,
            &self.writer.tracker,
            &self.writer.topic,
            all,
            pause_span,
        );
        self.writer.pressure.store(held, Ordering::Relaxed);
        self.writer.metrics.paused.set(i64::from(all));
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
            let flush = self
                .writer
                .clone()
                .flush(table.clone(), batch, trigger, abort.clone());
            tasks.spawn(async move { Some(flush.await) });
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn spawn_dead_letter(
        &self,
        tasks: &mut JoinSet<Finished>,
        original: Bytes,
        key: Option<Vec<u8>>,
        reason: Poison,
        detail: String,
        partition: i32,
        offset: i64,
        abort: &CancellationToken,
    ) {
        let writer = self.writer.clone();
        let abort = abort.clone();
        tasks.spawn(async move {
            let letter = Letter {
                original: &original,
                key: key.as_deref(),
                reason,
                detail: &detail,
                source_topic: &writer.topic,
                partition,
                offset,
            };
            if send_dead_letter(
                &*writer.shelf,
                &writer.metrics,
                writer.backoff,
                letter,
                &abort,
            )
            .await
            {
                lock(&writer.tracker).done(partition, offset);
            }
            None
        });
    }
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}
