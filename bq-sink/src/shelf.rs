//! Where records go that are not written to their table: the dead-letter topic (rows that can
//! never be written, with the reason) and the parking topic (rows whose table keeps failing,
//! written back once it answers). Behind a trait beside `Warehouse`, so the writer's decisions
//! are unit-tested with a scripted fake; the Kafka implementation waits for the broker's
//! acknowledgement before a record counts as handled.

use std::time::Duration;

use async_trait::async_trait;
use hookpipe_proto::{DeadLetter, Message, Parked};
use rdkafka::ClientConfig;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use sha2::{Digest, Sha256};

use crate::row::{Poison, envelope_facts};

/// A record to dead-letter, with where it came from.
#[derive(Clone, Copy, Debug)]
pub struct Letter<'a> {
    pub original: &'a [u8],
    pub key: Option<&'a [u8]>,
    pub reason: Poison,
    pub detail: &'a str,
    pub source_topic: &'a str,
    pub partition: i32,
    pub offset: i64,
}

/// A record to park, with where it came from and why its table was given up on for now.
#[derive(Clone, Copy, Debug)]
pub struct ToPark<'a> {
    pub original: &'a [u8],
    pub key: Option<&'a [u8]>,
    pub table: &'a str,
    pub reason: &'a str,
    pub detail: &'a str,
    pub source_topic: &'a str,
    pub partition: i32,
    pub offset: i64,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ShelfError {
    /// The broker did not take it (down, not acknowledged in time): retry.
    #[error("{0}")]
    Transient(String),
    /// The record is larger than the topic accepts.
    #[error("record larger than the topic accepts: {0}")]
    TooLarge(String),
}

/// How a dead letter came out: whole, or cut to fit the topic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stored {
    Whole,
    Truncated,
}

#[async_trait]
pub trait Shelf: Send + Sync + 'static {
    /// Publishes a dead letter and waits for the acknowledgement. One over the topic's size
    /// limit is stored truncated (with the original's size and SHA-256), never refused.
    async fn dead_letter(&self, letter: Letter<'_>) -> Result<Stored, ShelfError>;
    /// Publishes a parked record and waits for the acknowledgement.
    async fn park(&self, record: ToPark<'_>) -> Result<(), ShelfError>;
}

/// The dead-letter message for `letter`, with `original` cut to at most `limit` bytes.
pub fn dead_letter_message(letter: &Letter<'_>, limit: Option<usize>) -> DeadLetter {
    let (stream_id, received_at_ms) = envelope_facts(letter.original).unwrap_or_default();
    let keep = limit.map_or(letter.original.len(), |l| l.min(letter.original.len()));
    DeadLetter {
        original: letter.original[..keep].to_vec(),
        reason: letter.reason.as_str().to_owned(),
        detail: letter.detail.to_owned(),
        source_topic: letter.source_topic.to_owned(),
        source_partition: letter.partition,
        source_offset: letter.offset,
        original_key: letter.key.map(<[u8]>::to_vec).unwrap_or_default(),
        dead_lettered_at_ms: hookpipe_common::now_ms(),
        stream_id,
        received_at_ms,
        truncated: keep < letter.original.len(),
        original_size: letter.original.len() as u64,
        original_sha256: Sha256::digest(letter.original).to_vec(),
    }
}

pub fn parked_message(record: &ToPark<'_>) -> Parked {
    let (stream_id, received_at_ms) = envelope_facts(record.original).unwrap_or_default();
    Parked {
        original: record.original.to_vec(),
        original_key: record.key.map(<[u8]>::to_vec).unwrap_or_default(),
        table: record.table.to_owned(),
        reason: record.reason.to_owned(),
        detail: record.detail.to_owned(),
        source_topic: record.source_topic.to_owned(),
        source_partition: record.partition,
        source_offset: record.offset,
        parked_at_ms: hookpipe_common::now_ms(),
        stream_id,
        received_at_ms,
        times_parked: 1,
    }
}

/// The dead-letter and parking topics on Kafka.
pub struct KafkaShelf {
    producer: FutureProducer,
    dlq_topic: String,
    parking_topic: String,
    /// The largest dead letter the topic takes (value bytes); bigger ones are truncated.
    dlq_max_bytes: usize,
    timeout: Duration,
}

/// Room left in a dead letter for everything but the original bytes (reason, detail, topic
/// name, key, hash).
const DEAD_LETTER_OVERHEAD: usize = 4096;

impl KafkaShelf {
    pub fn new(
        base: &ClientConfig,
        dlq_topic: String,
        parking_topic: String,
        dlq_max_bytes: usize,
    ) -> Result<Self, KafkaError> {
        let mut config = base.clone();
        config
            .set("enable.idempotence", "true")
            .set("acks", "all")
            // The topics' own limits decide; librdkafka's default (1,000,000) would refuse a
            // parked record of a main-topic record near that size before the broker is asked.
            .set("message.max.bytes", "16777216")
            .set("message.timeout.ms", "30000");
        Ok(Self {
            producer: config.create()?,
            dlq_topic,
            parking_topic,
            dlq_max_bytes,
            timeout: Duration::from_secs(30),
        })
    }

    pub fn dlq_topic(&self) -> &str {
        &self.dlq_topic
    }

    async fn send(&self, topic: &str, key: Option<&[u8]>, value: &[u8]) -> Result<(), ShelfError> {
        let mut record = FutureRecord::<[u8], [u8]>::to(topic).payload(value);
        if let Some(key) = key {
            record = record.key(key);
        }
        match self.producer.send(record, self.timeout).await {
            Ok(_) => Ok(()),
            Err((KafkaError::MessageProduction(code), _))
                if matches!(
                    code,
                    RDKafkaErrorCode::MessageSizeTooLarge | RDKafkaErrorCode::InvalidMessageSize
                ) =>
            {
                Err(ShelfError::TooLarge(code.to_string()))
            }
            Err((e, _)) => Err(ShelfError::Transient(e.to_string())),
        }
    }

    pub fn flush(&self, timeout: Duration) {
        let _ = self.producer.flush(timeout);
    }
}

#[async_trait]
impl Shelf for KafkaShelf {
    async fn dead_letter(&self, letter: Letter<'_>) -> Result<Stored, ShelfError> {
        let mut limit = self.dlq_max_bytes.saturating_sub(DEAD_LETTER_OVERHEAD);
        let mut stored = Stored::Whole;
        loop {
            let message = dead_letter_message(&letter, Some(limit));
            if message.truncated {
                stored = Stored::Truncated;
            }
            match self
                .send(&self.dlq_topic, letter.key, &message.encode_to_vec())
                .await
            {
                Ok(()) => return Ok(stored),
                // The broker's limit is lower than configured: halve until it fits.
                Err(ShelfError::TooLarge(_)) if limit > 1024 => limit /= 2,
                Err(e) => return Err(e),
            }
        }
    }

    async fn park(&self, record: ToPark<'_>) -> Result<(), ShelfError> {
        let message = parked_message(&record);
        self.send(&self.parking_topic, record.key, &message.encode_to_vec())
            .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_oversized_dead_letter_keeps_its_size_and_hash() {
        let original = vec![7u8; 10_000];
        let letter = Letter {
            original: &original,
            key: Some(b"k"),
            reason: Poison::Undecodable,
            detail: "not an envelope",
            source_topic: "webhooks",
            partition: 3,
            offset: 42,
        };
        let whole = dead_letter_message(&letter, None);
        assert!(!whole.truncated);
        assert_eq!(whole.original, original);
        let cut = dead_letter_message(&letter, Some(1000));
        assert!(cut.truncated);
        assert_eq!(cut.original.len(), 1000);
        assert_eq!(cut.original_size, 10_000);
        assert_eq!(cut.original_sha256, Sha256::digest(&original).to_vec());
        assert_eq!(cut.original_sha256, whole.original_sha256);
        assert_eq!((cut.source_partition, cut.source_offset), (3, 42));
    }
}
