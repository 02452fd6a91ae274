//! Publishing envelopes to Kafka, behind a small trait so the HTTP layer can be tested without
//! a broker. The Kafka implementation answers only when the broker has acknowledged the message
//! (`acks=all`, idempotent producer), which is what lets the gateway promise a 202 means durable.

use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

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
    /// The metric label.
    pub fn kind(&self) -> &'static str {
        match self {
            PublishError::QueueFull => "queue_full",
            PublishError::Timeout => "timeout",
            PublishError::Broker(_) => "broker",
        }
    }

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
    config: ClientConfig,
    /// The producer in use. Replaced when the broker keeps refusing it (see `rebuild`).
    producer: RwLock<Arc<FutureProducer>>,
    last_rebuild: Mutex<Instant>,
    topic: String,
    publish_timeout: Duration,
    /// How long a sender waits for the broker's acknowledgement before getting 503.
    answer_deadline: Duration,
}

/// Least time between two producer rebuilds, so a broker that is really down does not make
/// the gateway churn producers.
const REBUILD_INTERVAL: Duration = Duration::from_secs(5);

/// Producer settings the delivery guarantee depends on. A user's pass-through properties are
/// applied after these, so `enable.idempotence` and `acks` are re-asserted last.
pub fn producer_config(
    base: ClientConfig,
    queue_messages: usize,
    linger: Duration,
    compression: &str,
) -> ClientConfig {
    let mut config = base;
    config
        .set("enable.idempotence", "true")
        .set("acks", "all")
        // librdkafka never gives up on a message by itself: when an idempotent producer times
        // messages out it bumps its epoch locally, which tansu cannot follow (its storage task
        // panics and the broker stops answering). The sender's deadline is enforced by
        // `answer_deadline` instead; a message not acknowledged by then is answered 503 but
        // stays queued and may still be delivered (at-least-once: a retry with the same
        // Idempotency-Key is deduplicated downstream).
        .set("message.timeout.ms", "0")
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
            producer: RwLock::new(Arc::new(config.create()?)),
            config,
            last_rebuild: Mutex::new(Instant::now()),
            topic,
            publish_timeout,
            answer_deadline: publish_timeout,
        })
    }

    fn current(&self) -> Arc<FutureProducer> {
        match self.producer.read() {
            Ok(p) => Arc::clone(&p),
            Err(poisoned) => Arc::clone(&poisoned.into_inner()),
        }
    }

    /// Replaces the producer after the broker refused a message outright (not a timeout or a
    /// full queue). An idempotent producer keeps its producer id and sequence numbers across
    /// broker trouble; if the broker lost or cannot match that state (tansu, after the epoch
    /// bump librdkafka makes when messages time out, refuses every later message), only a new
    /// producer id recovers. The old producer is flushed and dropped off the runtime.
    fn rebuild(&self) {
        {
            let Ok(mut last) = self.last_rebuild.lock() else {
                return;
            };
            if last.elapsed() < REBUILD_INTERVAL {
                return;
            }
            *last = Instant::now();
        }
        let fresh: FutureProducer = match self.config.create() {
            Ok(p) => p,
            Err(error) => {
                tracing::error!(%error, "creating a replacement producer failed");
                return;
            }
        };
        let old = match self.producer.write() {
            Ok(mut guard) => std::mem::replace(&mut *guard, Arc::new(fresh)),
            Err(_) => return,
        };
        tracing::warn!("broker refused messages; replaced the Kafka producer");
        let timeout = self.publish_timeout;
        tokio::task::spawn_blocking(move || {
            let _ = old.flush(timeout);
            drop(old);
        });
    }
}

impl Publish for KafkaPublisher {
    async fn publish(&self, key: &[u8], value: &[u8]) -> Result<(), PublishError> {
        let record = FutureRecord::to(&self.topic).key(key).payload(value);
        let delivery = match self.current().send_result(record) {
            Ok(delivery) => delivery,
            Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), _)) => {
                return Err(PublishError::QueueFull);
            }
            Err((error, _)) => {
                self.rebuild();
                return Err(PublishError::Broker(error.to_string()));
            }
        };
        match tokio::time::timeout(self.answer_deadline, delivery).await {
            Ok(Ok(Ok(_))) => Ok(()),
            Ok(Ok(Err((KafkaError::MessageProduction(RDKafkaErrorCode::MessageTimedOut), _)))) => {
                Err(PublishError::Timeout)
            }
            Ok(Ok(Err((error, _)))) => {
                self.rebuild();
                Err(PublishError::Broker(error.to_string()))
            }
            Ok(Err(_canceled)) => Err(PublishError::Broker("producer closed".into())),
            Err(_elapsed) => Err(PublishError::Timeout),
        }
    }

    fn queue_len(&self) -> usize {
        usize::try_from(self.current().in_flight_count()).unwrap_or(0)
    }

    fn check_ready(&self, timeout: Duration) -> Result<(), String> {
        hookpipe_common::kafka::check_topic(self.current().client(), &self.topic, timeout)
    }

    fn flush(&self, timeout: Duration) -> Result<(), String> {
        self.current().flush(timeout).map_err(|e| e.to_string())
    }
}
