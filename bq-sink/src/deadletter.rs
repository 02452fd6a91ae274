//! The dead-letter topic: records the sink cannot write are kept there with the reason, so
//! nothing is lost and the partition never blocks. Publishing waits for the broker's
//! acknowledgement before the record counts as handled.

use std::time::Duration;

use hookpipe_proto::{DeadLetter, Message};
use rdkafka::ClientConfig;
use rdkafka::error::KafkaError;
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};

use crate::row::{Poison, envelope_facts};

pub struct DeadLetters {
    producer: FutureProducer,
    topic: String,
}

/// A record to dead-letter, with where it came from.
pub struct Letter<'a> {
    pub original: &'a [u8],
    pub key: Option<&'a [u8]>,
    pub reason: Poison,
    pub detail: String,
    pub source_topic: &'a str,
    pub partition: i32,
    pub offset: i64,
}

impl DeadLetters {
    pub fn new(base: &ClientConfig, topic: String) -> Result<Self, KafkaError> {
        let mut config = base.clone();
        config
            .set("enable.idempotence", "true")
            .set("acks", "all")
            .set("message.timeout.ms", "30000");
        Ok(Self {
            producer: config.create()?,
            topic,
        })
    }

    pub fn topic(&self) -> &str {
        &self.topic
    }

    /// Publishes one dead letter and waits for the acknowledgement.
    pub async fn send(&self, letter: Letter<'_>) -> Result<(), String> {
        let (stream_id, received_at_ms) = envelope_facts(letter.original).unwrap_or_default();
        let value = DeadLetter {
            original: letter.original.to_vec(),
            reason: letter.reason.as_str().to_owned(),
            detail: letter.detail,
            source_topic: letter.source_topic.to_owned(),
            source_partition: letter.partition,
            source_offset: letter.offset,
            original_key: letter.key.map(<[u8]>::to_vec).unwrap_or_default(),
            dead_lettered_at_ms: hookpipe_common::now_ms(),
            stream_id,
            received_at_ms,
        }
        .encode_to_vec();
        let mut record = FutureRecord::<[u8], [u8]>::to(&self.topic).payload(&value);
        if let Some(key) = letter.key {
            record = record.key(key);
        }
        self.producer
            .send(record, Duration::from_secs(5))
            .await
            .map(|_| ())
            .map_err(|(e, _)| e.to_string())
    }

    pub fn flush(&self, timeout: Duration) {
        let _ = self.producer.flush(timeout);
    }
}
