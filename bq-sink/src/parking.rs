//! Writing parked rows back. The parking topic holds rows whose table kept failing; this task
//! (one owner per parking partition, through its own consumer group) passes over it now and
//! then: each table is probed once per pass, rows of tables that answer are put back on the
//! main topic (flagged as replayed, so the sink looks their hit_id up before writing and a row
//! is never written twice), and rows of tables still failing stay. The group's commit on the
//! parking topic moves up to the first row still waiting; rows already sent back beyond it are
//! remembered so the next pass does not send them again (after a restart they may be sent once
//! more, which the lookup makes harmless).
//!
//! Passes happen after a doubling wait while rows are waiting, and at once when the main
//! pipeline sees a parked table answer again.

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::time::Duration;

use hookpipe_common::TableRef;
use hookpipe_proto::{Envelope, Message as _, Parked};
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::Message;
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};
use tokio_util::sync::CancellationToken;

use crate::metrics::Metrics;
use crate::warehouse::Warehouse;

/// The value to put back on the main topic: the original envelope flagged as replayed (looked
/// up before it is written), or the original bytes when they never were an envelope.
pub fn unpark_value(original: &[u8]) -> Vec<u8> {
    match Envelope::decode(original) {
        Ok(mut envelope) => {
            envelope.replayed = true;
            envelope.encode_to_vec()
        }
        Err(_) => original.to_vec(),
    }
}

/// What one pass found, per parking partition.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct PassPlan {
    /// Offsets to send back now (their table answers).
    pub send_back: Vec<i64>,
    /// Where the group's commit can move: the first offset still waiting, or the end.
    pub commit: i64,
}

/// Decides a partition's pass from what was read: `(offset, table answers)` in offset order,
/// the end read to, and the offsets already sent back earlier. Pure.
pub fn plan(read: &[(i64, bool)], end: i64, already: &BTreeSet<i64>) -> PassPlan {
    let mut out = PassPlan {
        send_back: Vec::new(),
        commit: end,
    };
    let mut waiting_seen = false;
    for (offset, answers) in read {
        if *answers {
            if !already.contains(offset) {
                out.send_back.push(*offset);
            }
        } else if !waiting_seen {
            waiting_seen = true;
            out.commit = *offset;
        }
    }
    out
}

pub struct Drainer<W> {
    pub warehouse: Arc<W>,
    pub metrics: Arc<Metrics>,
    pub main_topic: String,
    pub parking_topic: String,
    pub consumer: StreamConsumer,
    pub producer: FutureProducer,
    pub wait_initial: Duration,
    pub wait_max: Duration,
    pub unparked: Arc<tokio::sync::Notify>,
    /// Offsets sent back beyond the committed point, per partition.
    sent: HashMap<i32, BTreeSet<i64>>,
}

impl<W: Warehouse> Drainer<W> {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        base: &ClientConfig,
        group: &str,
        warehouse: Arc<W>,
        metrics: Arc<Metrics>,
        main_topic: String,
        parking_topic: String,
        wait_initial: Duration,
        wait_max: Duration,
        unparked: Arc<tokio::sync::Notify>,
    ) -> Result<Self, rdkafka::error::KafkaError> {
        let mut consumer_config = base.clone();
        consumer_config
            .set("group.id", group)
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            .set("auto.offset.reset", "earliest");
        let consumer: StreamConsumer = consumer_config.create()?;
        consumer.subscribe(&[&parking_topic])?;
        let mut producer_config = base.clone();
        producer_config
            .set("enable.idempotence", "true")
            .set("acks", "all")
            .set("message.max.bytes", "16777216")
            .set("message.timeout.ms", "30000");
        Ok(Self {
            warehouse,
            metrics,
            main_topic,
            parking_topic,
            consumer,
            producer: producer_config.create()?,
            wait_initial,
            wait_max,
            unparked,
            sent: HashMap::new(),
        })
    }

    pub async fn run(mut self, cancel: CancellationToken) {
        let mut wait = self.wait_initial;
        loop {
            // Serve the group (assignment, heartbeats) while waiting.
            let sleep = tokio::time::sleep(wait);
            tokio::pin!(sleep);
            loop {
                tokio::select! {
                    () = cancel.cancelled() => return,
                    () = &mut sleep => break,
                    () = self.unparked.notified() => break,
                    // Records are read in passes, from the committed point; anything delivered
                    // between passes is read again then.
                    _ = self.consumer.recv() => {}
                }
            }
            match self.pass(&cancel).await {
                Ok(waiting) if waiting > 0 => wait = (wait * 2).min(self.wait_max),
                Ok(_) => wait = self.wait_initial.max(Duration::from_secs(1)) * 6,
                Err(error) => {
                    tracing::warn!(%error, "pass over the parking topic failed, will try again");
                    wait = (wait * 2).min(self.wait_max);
                }
            }
        }
    }

    /// One pass over the owned parking partitions. Returns the rows still waiting.
    async fn pass(&mut self, cancel: &CancellationToken) -> Result<u64, String> {
        let assignment = self.consumer.assignment().map_err(|e| e.to_string())?;
        let partitions: Vec<i32> = assignment
            .elements_for_topic(&self.parking_topic)
            .iter()
            .map(|e| e.partition())
            .collect();
        let mut waiting_by_table: HashMap<String, (i64, i64)> = HashMap::new();
        let mut probes: HashMap<String, bool> = HashMap::new();
        let mut waiting = 0;
        for partition in partitions {
            let (start, end) = self.bounds(partition).await?;
            if start >= end {
                self.sent.remove(&partition);
                continue;
            }
            self.consumer
                .seek(
                    &self.parking_topic,
                    partition,
                    Offset::Offset(start),
                    Duration::from_secs(10),
                )
                .map_err(|e| format!("seek: {e}"))?;
            let mut read: Vec<(i64, bool)> = Vec::new();
            let mut records: HashMap<i64, Parked> = HashMap::new();
            let mut next = start;
            while next < end {
                if cancel.is_cancelled() {
                    return Ok(waiting);
                }
                let message = tokio::time::timeout(Duration::from_secs(30), self.consumer.recv())
                    .await
                    .map_err(|_| "no progress reading the parking topic for 30 s".to_owned())?
                    .map_err(|e| e.to_string())?;
                if message.topic() != self.parking_topic || message.partition() != partition {
                    continue;
                }
                let offset = message.offset();
                if offset < next {
                    continue;
                }
                next = offset + 1;
                let Ok(parked) = Parked::decode(message.payload().unwrap_or(&[])) else {
                    tracing::warn!(partition, offset, "not a parked record, skipped");
                    read.push((offset, true));
                    continue;
                };
                let answers = match probes.get(&parked.table) {
                    Some(a) => *a,
                    None => {
                        let a = self.probe(&parked.table).await;
                        probes.insert(parked.table.clone(), a);
                        a
                    }
                };
                if !answers {
                    waiting += 1;
                    let entry = waiting_by_table
                        .entry(parked.table.clone())
                        .or_insert((0, parked.parked_at_ms));
                    entry.0 += 1;
                    entry.1 = entry.1.min(parked.parked_at_ms);
                }
                read.push((offset, answers));
                if answers {
                    records.insert(offset, parked);
                }
            }
            let already = self.sent.entry(partition).or_default();
            let plan = plan(&read, end, already);
            // Send back, pipelined, and wait for every acknowledgement before committing.
            let mut sends = Vec::new();
            for offset in &plan.send_back {
                let Some(parked) = records.get(offset) else {
                    continue; // not a parked record: nothing to send, just moved past
                };
                let value = unpark_value(&parked.original);
                let key = parked.original_key.clone();
                let producer = self.producer.clone();
                let topic = self.main_topic.clone();
                let table = parked.table.clone();
                let offset = *offset;
                sends.push(async move {
                    let mut record = FutureRecord::<[u8], [u8]>::to(&topic).payload(&value);
                    if !key.is_empty() {
                        record = record.key(&key);
                    }
                    producer
                        .send(record, Duration::from_secs(30))
                        .await
                        .map(|_| (offset, table))
                        .map_err(|(e, _)| e.to_string())
                });
            }
            let results = futures_util::future::join_all(sends).await;
            let mut all_sent = true;
            for result in results {
                match result {
                    Ok((offset, table)) => {
                        already.insert(offset);
                        self.metrics.rows_unparked(&table, 1);
                    }
                    Err(error) => {
                        all_sent = false;
                        tracing::warn!(%error, "sending a parked row back failed, will try again");
                    }
                }
            }
            // A failed send must be read again next pass: commit only up to the first
            // offset neither sent back nor moved past.
            let commit = if all_sent {
                plan.commit
            } else {
                read.iter()
                    .map(|(o, _)| *o)
                    .find(|o| !already.contains(o))
                    .unwrap_or(plan.commit)
                    .min(plan.commit)
            };
            already.retain(|o| *o >= commit);
            if commit > start {
                let mut tpl = TopicPartitionList::new();
                let _ = tpl.add_partition_offset(
                    &self.parking_topic,
                    partition,
                    Offset::Offset(commit),
                );
                let consumer = &self.consumer;
                consumer
                    .commit(&tpl, rdkafka::consumer::CommitMode::Sync)
                    .map_err(|e| format!("commit on the parking topic: {e}"))?;
            }
            if !plan.send_back.is_empty() {
                tracing::info!(
                    partition,
                    sent_back = plan.send_back.len(),
                    waiting,
                    "parked rows of tables that answer again sent back"
                );
            }
        }
        self.metrics.parked_waiting(&waiting_by_table);
        Ok(waiting)
    }

    /// Whether the table answers (exists with a fitting schema and may be read).
    async fn probe(&self, table: &str) -> bool {
        let Ok(table) = table.parse::<TableRef>() else {
            return false;
        };
        match self.warehouse.ensure_table(&table).await {
            Ok(()) => true,
            Err(error) => {
                tracing::info!(%table, %error, "parked table still failing");
                false
            }
        }
    }

    /// Where the partition's pass starts (the group's commit, or the partition's start) and
    /// ends (its end now).
    async fn bounds(&self, partition: i32) -> Result<(i64, i64), String> {
        let consumer = &self.consumer;
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition(&self.parking_topic, partition);
        let committed = consumer
            .committed_offsets(tpl, Duration::from_secs(10))
            .map_err(|e| format!("committed offsets: {e}"))?;
        let (low, high) = consumer
            .fetch_watermarks(&self.parking_topic, partition, Duration::from_secs(10))
            .map_err(|e| format!("watermarks: {e}"))?;
        let start = committed
            .elements()
            .first()
            .and_then(|e| match e.offset() {
                Offset::Offset(o) => Some(o),
                _ => None,
            })
            .unwrap_or(low)
            .max(low);
        Ok((start, high))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pass_sends_back_rows_of_tables_that_answer_and_commits_to_the_first_waiting() {
        let read = [(10, true), (11, false), (12, true), (13, false)];
        let p = plan(&read, 14, &BTreeSet::new());
        assert_eq!(p.send_back, [10, 12]);
        assert_eq!(p.commit, 11);
        // Next pass from 11: 12 was already sent back.
        let read = [(11, false), (12, true), (13, true)];
        let p = plan(&read, 14, &BTreeSet::from([12]));
        assert_eq!(p.send_back, [13]);
        assert_eq!(p.commit, 11);
        // Everything answers: the commit moves to the end.
        let read = [(11, true), (12, true), (13, true)];
        let p = plan(&read, 14, &BTreeSet::from([12, 13]));
        assert_eq!(p.send_back, [11]);
        assert_eq!(p.commit, 14);
    }

    #[test]
    fn unparked_envelopes_are_flagged_for_the_lookup() {
        let original = Envelope {
            hit_id: "83cc2a6a-4829-4410-bab4-95b680c5b8d7".into(),
            ..Default::default()
        }
        .encode_to_vec();
        let back = Envelope::decode(unpark_value(&original).as_slice()).unwrap();
        assert!(back.replayed);
        assert_eq!(back.hit_id, "83cc2a6a-4829-4410-bab4-95b680c5b8d7");
        assert_eq!(unpark_value(b"\xff\xff"), b"\xff\xff");
    }
}
