//! Publishing envelopes to Kafka, behind a small trait so the HTTP layer can be tested without
//! a broker. The Kafka implementation answers only when the broker has acknowledged the message
//! (`acks=all`, idempotent producer), which is what lets the gateway promise a 202 means durable.

use std::time::Duration;

use rdkafka::ClientConfig;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};

/// Why a message did not reach the broker. Every variant means the sender must retry (503).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PublishError {
    #[error("producer queue is full")]
    QueueFull,
    #[error("broker did not acknowledge in time")]
    Timeout,
    #[error("broker refused the message: {0}")]
    Broker(String),
}

impl PublishError {
    /// The sender-facing reason.
    pub fn reason(&self) -> &'static str {
        match self {
            PublishError::QueueFull => "overloaded, retry later",
            PublishError::Timeout => "message not acknowledged in time, retry later",
            PublishError::Broker(_) => "broker unavailable, retry later",
        }
    }
}

pub trait Publish: Send + Sync + 'static {
    /// Resolves once the broker holds the message, or with the reason it does not.
    fn publish(
        &self,
        key: &[u8],
        value: &[u8],
    ) -> impl std::future::Future<Output = Result<(), PublishError>> + Send;

    /// Messages handed over and not yet acknowledged.
    fn queue_len(&self) -> usize;

    /// Whether the broker answers and the topic exists. Blocking; call off the runtime.
    fn check_ready(&self, timeout: Duration) -> Result<(), String>;

    /// Waits for every queued message's acknowledgement, up to `timeout`.
    fn flush(&self, timeout: Duration) -> Result<(), String>;
}

pub struct KafkaPublisher {
    producer: FutureProducer,
    topic: String,
    /// The delivery report always comes within `message.timeout.ms`; this guard only protects
    /// against a report that never comes.
    answer_deadline: Duration,
}

/// Producer settings the delivery guarantee depends on. A user's pass-through properties are
/// applied after these, so `enable.idempotence` and `acks` are re-asserted last.
pub fn producer_config(
    base: ClientConfig,
    publish_timeout: Duration,
    queue_messages: usize,
    linger: Duration,
    compression: &str,
) -> ClientConfig {
    let mut config = base;
    config
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .set(
            "message.timeout.ms",
            publish_timeout.as_millis().to_string(),
        )
        .set("queue.buffering.max.messages", queue_messages.to_string())
        .set("linger.ms", linger.as_millis().to_string())
        .set("compression.type", compression)
        // Keyed by hit_id: spread evenly, and every copy of a hit lands on one partition.
        .set("partitioner", "murmur2_random");
    config
}

impl KafkaPublisher {
    pub fn new(
        config: &ClientConfig,
        topic: String,
        publish_timeout: Duration,
    ) -> Result<Self, KafkaError> {
        let mut config = config.clone();
        // The guarantee depends on these; never let a pass-through property weaken them.
        config.set("enable.idempotence", "true").set("acks", "all");
        Ok(Self {
            producer: config.create()?,
            topic,
            answer_deadline: publish_timeout + Duration::from_secs(1),
        })
    }
}

impl Publish for KafkaPublisher {
    async fn publish(&self, key: &[u8], value: &[u8]) -> Result<(), PublishError> {
        let record = FutureRecord::to(&self.topic).key(key).payload(value);
        let delivery = match self.producer.send_result(record) {
            Ok(delivery) => delivery,
            Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), _)) => {
                return Err(PublishError::QueueFull);
            }
            Err((error, _)) => return Err(PublishError::Broker(error.to_string())),
        };
        match tokio::time::timeout(self.answer_deadline, delivery).await {
            Ok(Ok(Ok(_))) => Ok(()),
            Ok(Ok(Err((KafkaError::MessageProduction(RDKafkaErrorCode::MessageTimedOut), _)))) => {
                Err(PublishError::Timeout)
            }
            Ok(Ok(Err((error, _)))) => Err(PublishError::Broker(error.to_string())),
            Ok(Err(_canceled)) => Err(PublishError::Broker("producer closed".into())),
            Err(_elapsed) => Err(PublishError::Timeout),
        }
    }

    fn queue_len(&self) -> usize {
        usize::try_from(self.producer.in_flight_count()).unwrap_or(0)
    }

    fn check_ready(&self, timeout: Duration) -> Result<(), String> {
        hookpipe_common::kafka::check_topic(self.producer.client(), &self.topic, timeout)
    }

    fn flush(&self, timeout: Duration) -> Result<(), String> {
        self.producer.flush(timeout).map_err(|e| e.to_string())
    }
}
