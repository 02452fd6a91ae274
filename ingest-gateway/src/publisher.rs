//! Publishing envelopes to Kafka, behind a small trait so the HTTP layer can be tested without
//! a broker. The Kafka implementation answers only when the broker has acknowledged the message
//! (`acks=all`, idempotent producer), which is what lets the gateway promise a 202 means durable.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use hookpipe_common::kafka::ClientHealth;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::producer::{DeliveryFuture, FutureProducer, FutureRecord, Producer};
use rdkafka::{ClientConfig, ClientContext};

/// Why a message did not reach the broker. Every variant but `TooLarge` means the sender must
/// retry (503); `TooLarge` can never succeed and is a 413.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PublishError {
    #[error("producer queue is full")]
    QueueFull,
    #[error("broker did not acknowledge in time")]
    Timeout,
    /// The broker has stopped acknowledging (the oldest unacknowledged message is older than
    /// the publish timeout, or librdkafka reports every broker down). The message was not
    /// handed to the producer: answering 503 without queueing is what bounds a keyless
    /// sender's extra rows through an outage of any length to one per webhook.
    #[error("broker not acknowledging; message not queued")]
    Stalled,
    #[error("broker refused the message: {0}")]
    Broker(String),
    /// The message (body plus envelope) is larger than the producer or the topic takes.
    #[error("message too large for the topic")]
    TooLarge,
}

impl PublishError {
    /// The metric label.
    pub fn kind(&self) -> &'static str {
        match self {
            PublishError::QueueFull => "queue_full",
            PublishError::Timeout => "timeout",
            PublishError::Stalled => "stalled",
            PublishError::Broker(_) => "broker",
            PublishError::TooLarge => "too_large",
        }
    }

    /// Every kind, for starting the counters at 0.
    pub const KINDS: [&'static str; 5] =
        ["queue_full", "timeout", "stalled", "broker", "too_large"];

    /// The sender-facing reason.
    pub fn reason(&self) -> &'static str {
        match self {
            PublishError::QueueFull => "overloaded, retry later",
            PublishError::Timeout => "message not acknowledged in time, retry later",
            PublishError::Stalled => "broker not acknowledging, retry later",
            PublishError::Broker(_) => "broker unavailable, retry later",
            PublishError::TooLarge => "request too large for the topic (body, query and headers)",
        }
    }
}

pub trait Publish: Send + Sync + 'static {
    /// Resolves once the broker holds the message, or with the reason it does not. Takes the
    /// value by ownership so it can be let go as soon as the producer holds its own copy,
    /// rather than kept for the whole wait for the broker (one request in flight per
    /// connection: memory scales with connections).
    fn publish(
        &self,
        key: &[u8],
        value: Vec<u8>,
    ) -> impl std::future::Future<Output = Result<(), PublishError>> + Send;

    /// Messages handed over and not yet acknowledged.
    fn queue_len(&self) -> usize;

    /// Whether the broker answers and the topic exists. Blocking; call off the runtime.
    fn check_ready(&self, timeout: Duration) -> Result<(), String>;

    /// Waits for every queued message's acknowledgement, up to `timeout`.
    fn flush(&self, timeout: Duration) -> Result<(), String>;
}

/// Room in a Kafka record for the envelope's fields other than the body: hit_id, stream id,
/// table, zone, query string, content type, user agent, idempotency key, remote address. A
/// request whose envelope needs more than this (a huge query string or user agent) is a 413.
pub const ENVELOPE_ALLOWANCE: usize = 64 * 1024;

/// Framing around one record in a produce request (record and batch headers, topic name);
/// generous, so librdkafka never refuses what our own size check let through.
pub const RECORD_FRAMING: usize = 1024;

/// The largest record (key plus envelope) a gateway with this body limit publishes.
pub fn max_record_bytes(max_body_bytes: usize) -> usize {
    max_body_bytes + ENVELOPE_ALLOWANCE
}

/// The `message.max.bytes` the producer and the `max.message.bytes` the topic need for a body
/// limit: the one size contract (README, docs/operations.md) follows from
/// `HOOKPIPE_MAX_BODY_BYTES` alone.
pub fn required_message_bytes(max_body_bytes: usize) -> usize {
    max_record_bytes(max_body_bytes) + RECORD_FRAMING
}

/// Produce requests in flight per broker connection unless configured: the default of
/// `HOOKPIPE_PRODUCER_IN_FLIGHT_REQUESTS` (config.rs says why 2), shared with the benchmarks'
/// raw producer so both run the same settings.
pub const DEFAULT_IN_FLIGHT_REQUESTS: u8 = 2;

/// Producer settings from the gateway's configuration.
#[derive(Clone, Debug)]
pub struct ProducerSettings {
    pub queue_messages: usize,
    pub queue_bytes: usize,
    pub linger: Duration,
    /// librdkafka `max.in.flight.requests.per.connection`
    /// (see `HOOKPIPE_PRODUCER_IN_FLIGHT_REQUESTS`).
    pub in_flight_requests: u8,
    pub compression: String,
    /// librdkafka `message.timeout.ms`; zero is unbounded.
    pub message_timeout: Duration,
    pub max_body_bytes: usize,
}

/// Producer settings the delivery guarantee depends on. A user's pass-through properties are
/// applied after these, so `enable.idempotence` and `acks` are re-asserted last.
pub fn producer_config(base: ClientConfig, settings: &ProducerSettings) -> ClientConfig {
    let mut config = base;
    let kbytes = settings.queue_bytes.div_ceil(1024).max(1);
    config
        .set("enable.idempotence", "true")
        .set("acks", "all")
        // How long librdkafka keeps trying a message before it reports it failed. Bounded by
        // default, so a broker that never comes back cannot hold queued messages (memory)
        // forever. Zero (unbounded) only where the local tansu broker needs it: when an
        // idempotent producer times messages out it bumps its epoch locally, which tansu 0.6
        // cannot follow (its storage task panics), so scripts/run-local and the tests set
        // HOOKPIPE_PRODUCER_MESSAGE_TIMEOUT=0. Either way the sender is answered by
        // `publish_timeout`, and the stall rule below keeps new messages out of the queue.
        .set(
            "message.timeout.ms",
            settings.message_timeout.as_millis().to_string(),
        )
        .set(
            "queue.buffering.max.messages",
            settings.queue_messages.to_string(),
        )
        // The producer's memory, bounded in bytes: with 1 MiB bodies a count alone lets the
        // queue grow to gigabytes while the broker is away.
        .set("queue.buffering.max.kbytes", kbytes.to_string())
        .set(
            "message.max.bytes",
            required_message_bytes(settings.max_body_bytes).to_string(),
        )
        .set("linger.ms", settings.linger.as_millis().to_string())
        // Below the partitions a broker leads, so that a partition whose batch is ready while
        // its request is out does not make librdkafka's broker thread poll without waiting.
        .set(
            "max.in.flight.requests.per.connection",
            settings.in_flight_requests.to_string(),
        )
        .set("compression.type", &settings.compression)
        // Keyed by hit_id: spread evenly, and every copy of a hit lands on one partition.
        .set("partitioner", "murmur2_random");
    config
}

/// What librdkafka reports outside of deliveries: "every broker is down" (the quickest sign
/// that new messages would only wait in the queue), and configuration problems (TLS, SASL),
/// recorded once per cause for `/readyz`.
#[derive(Clone, Default)]
pub struct GatewayContext {
    brokers_down: Arc<AtomicBool>,
    pub health: ClientHealth,
}

impl ClientContext for GatewayContext {
    fn error(&self, error: KafkaError, reason: &str) {
        if matches!(error, KafkaError::Global(RDKafkaErrorCode::AllBrokersDown)) {
            self.brokers_down.store(true, Ordering::Relaxed);
        }
        self.health.on_error(&error, reason);
    }

    fn log(&self, level: rdkafka::config::RDKafkaLogLevel, fac: &str, log_message: &str) {
        self.health.on_log(level, fac, log_message);
    }
}

/// Messages handed to the producer and not yet settled (acknowledged or failed), by the
/// instant each was handed over. The oldest one's age is how long the broker has not answered.
#[derive(Default)]
struct Unsettled {
    next: AtomicU64,
    since: Mutex<BTreeMap<u64, Instant>>,
}

impl Unsettled {
    fn add(&self) -> u64 {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        if let Ok(mut since) = self.since.lock() {
            since.insert(id, Instant::now());
        }
        id
    }

    fn settle(&self, id: u64) {
        if let Ok(mut since) = self.since.lock() {
            since.remove(&id);
        }
    }

    fn oldest_age(&self) -> Option<Duration> {
        let since = self.since.lock().ok()?;
        since.values().next().map(Instant::elapsed)
    }

    fn len(&self) -> usize {
        self.since.lock().map(|s| s.len()).unwrap_or(0)
    }
}

/// One message's delivery, kept track of even when the request stops waiting for it (the
/// answer deadline passed, or the client went away): the rest of the wait moves to a task, so
/// the message counts as unsettled until the producer really settles it.
struct Delivery {
    id: u64,
    unsettled: Arc<Unsettled>,
    brokers_down: Arc<AtomicBool>,
    future: Option<DeliveryFuture>,
}

impl Delivery {
    fn settled(&mut self, acknowledged: bool) {
        self.future = None;
        self.unsettled.settle(self.id);
        if acknowledged {
            self.brokers_down.store(false, Ordering::Relaxed);
        }
    }
}

impl Drop for Delivery {
    fn drop(&mut self) {
        let Some(future) = self.future.take() else {
            return;
        };
        let (id, unsettled, down) = (self.id, self.unsettled.clone(), self.brokers_down.clone());
        match tokio::runtime::Handle::try_current() {
            Ok(runtime) => {
                runtime.spawn(async move {
                    if let Ok(Ok(_)) = future.await {
                        down.store(false, Ordering::Relaxed);
                    }
                    unsettled.settle(id);
                });
            }
            Err(_) => unsettled.settle(id),
        }
    }
}

pub struct KafkaPublisher {
    config: ClientConfig,
    /// The producer in use. Replaced when the broker keeps refusing it (see `rebuild`).
    producer: RwLock<Arc<FutureProducer<GatewayContext>>>,
    context: GatewayContext,
    last_rebuild: Mutex<Instant>,
    topic: String,
    publish_timeout: Duration,
    unsettled: Arc<Unsettled>,
    max_record_bytes: usize,
}

/// Least time between two producer rebuilds, so a broker that is really down does not make
/// the gateway churn producers.
const REBUILD_INTERVAL: Duration = Duration::from_secs(5);

impl KafkaPublisher {
    pub fn new(
        config: &ClientConfig,
        topic: String,
        publish_timeout: Duration,
        max_body_bytes: usize,
    ) -> Result<Self, KafkaError> {
        let mut config = config.clone();
        // The guarantee depends on these; never let a pass-through property weaken them.
        config.set("enable.idempotence", "true").set("acks", "all");
        let context = GatewayContext::default();
        Ok(Self {
            producer: RwLock::new(Arc::new(config.create_with_context(context.clone())?)),
            context,
            config,
            last_rebuild: Mutex::new(Instant::now()),
            topic,
            publish_timeout,
            unsettled: Arc::default(),
            max_record_bytes: max_record_bytes(max_body_bytes),
        })
    }

    fn current(&self) -> Arc<FutureProducer<GatewayContext>> {
        match self.producer.read() {
            Ok(p) => Arc::clone(&p),
            Err(poisoned) => Arc::clone(&poisoned.into_inner()),
        }
    }

    /// Why new messages should not be queued now, if they should not: the broker has left a
    /// message unanswered for longer than the publish timeout, or every broker is down.
    pub fn stalled(&self) -> Option<&'static str> {
        if self
            .unsettled
            .oldest_age()
            .is_some_and(|age| age > self.publish_timeout)
        {
            return Some(
                "a message has waited longer than HOOKPIPE_PUBLISH_TIMEOUT for the broker",
            );
        }
        if self.context.brokers_down.load(Ordering::Relaxed) {
            return Some("every broker is down");
        }
        None
    }

    /// Replaces the producer after the broker refused a message outright (not a timeout, a
    /// full queue or a size limit). An idempotent producer keeps its producer id and sequence
    /// numbers across broker trouble; if the broker lost or cannot match that state (tansu,
    /// after the epoch bump librdkafka makes when messages time out, refuses every later
    /// message), only a new producer id recovers. The old producer is flushed and dropped off
    /// the runtime; its messages stay counted as unsettled until it settles them.
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
        let fresh: FutureProducer<GatewayContext> =
            match self.config.create_with_context(self.context.clone()) {
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

/// Whether an error says the message is too large (for the producer or for the topic): the
/// request can never succeed, so it is a 413 and never a reason to replace the producer.
fn too_large(error: &KafkaError) -> bool {
    matches!(
        error.rdkafka_error_code(),
        Some(RDKafkaErrorCode::MessageSizeTooLarge | RDKafkaErrorCode::InvalidMessageSize)
    )
}

impl Publish for KafkaPublisher {
    async fn publish(&self, key: &[u8], value: Vec<u8>) -> Result<(), PublishError> {
        if key.len() + value.len() > self.max_record_bytes {
            return Err(PublishError::TooLarge);
        }
        if self.stalled().is_some() {
            return Err(PublishError::Stalled);
        }
        let record = FutureRecord::to(&self.topic).key(key).payload(&value);
        let sent = self
            .current()
            .send_result(record)
            .map_err(|(error, _record)| error);
        // librdkafka copied the message: ours is not needed during the wait.
        drop(value);
        let future = match sent {
            Ok(future) => future,
            Err(KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull)) => {
                return Err(PublishError::QueueFull);
            }
            Err(error) if too_large(&error) => return Err(PublishError::TooLarge),
            Err(error) => {
                self.rebuild();
                return Err(PublishError::Broker(error.to_string()));
            }
        };
        let mut delivery = Delivery {
            id: self.unsettled.add(),
            unsettled: self.unsettled.clone(),
            brokers_down: self.context.brokers_down.clone(),
            future: Some(future),
        };
        let Some(future) = delivery.future.as_mut() else {
            return Err(PublishError::Broker("delivery lost".into()));
        };
        // On timeout `delivery` is dropped still holding its future: the wait goes on in a task.
        let outcome = tokio::time::timeout(self.publish_timeout, future)
            .await
            .map_err(|_elapsed| PublishError::Timeout)?;
        delivery.settled(matches!(outcome, Ok(Ok(_))));
        match outcome {
            Ok(Ok(_)) => Ok(()),
            Ok(Err((KafkaError::MessageProduction(RDKafkaErrorCode::MessageTimedOut), _))) => {
                Err(PublishError::Timeout)
            }
            Ok(Err((error, _))) if too_large(&error) => Err(PublishError::TooLarge),
            Ok(Err((error, _))) => {
                self.rebuild();
                Err(PublishError::Broker(error.to_string()))
            }
            Err(_canceled) => Err(PublishError::Broker("producer closed".into())),
        }
    }

    fn queue_len(&self) -> usize {
        self.unsettled.len()
    }

    fn check_ready(&self, timeout: Duration) -> Result<(), String> {
        if let Err(error) =
            hookpipe_common::kafka::check_topic(self.current().client(), &self.topic, timeout)
        {
            // A configuration problem says which setting to check; otherwise the raw error.
            if self.context.health.current().is_none()
                && let Some(found) = hookpipe_common::kafka::probe_listener(&self.config)
            {
                self.context.health.record(found);
            }
            return Err(match self.context.health.current() {
                Some(diagnosis) => diagnosis.message.to_owned(),
                None => error,
            });
        }
        // The broker answers metadata again: the "all brokers down" report is over.
        self.context.brokers_down.store(false, Ordering::Relaxed);
        self.context.health.clear();
        match self.stalled() {
            Some(reason) => Err(format!("not queueing new messages: {reason}")),
            None => Ok(()),
        }
    }

    fn flush(&self, timeout: Duration) -> Result<(), String> {
        self.current().flush(timeout).map_err(|e| e.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_record_over_the_size_contract_is_too_large_before_any_broker_is_asked() {
        let mut config = ClientConfig::new();
        // Nothing listens there: the size check must answer without a broker.
        config.set("bootstrap.servers", "127.0.0.1:9");
        let publisher =
            KafkaPublisher::new(&config, "t".into(), Duration::from_secs(1), 1000).unwrap();
        let limit = max_record_bytes(1000);
        let key = [0u8; 36];
        let value = vec![b'x'; limit - key.len() + 1];
        assert_eq!(
            publisher.publish(&key, value).await,
            Err(PublishError::TooLarge)
        );
        assert_eq!(publisher.queue_len(), 0, "nothing was queued");
        // Exactly at the limit it passes the size check: it is handed to the producer (which
        // then waits for a broker), or refused as stalled if librdkafka has already reported
        // every broker down (a race with the refused connection to port 9).
        let value = vec![b'x'; limit - key.len()];
        let outcome = publisher.publish(&key, value).await;
        assert!(
            matches!(
                outcome,
                Err(PublishError::Timeout) | Err(PublishError::Stalled)
            ),
            "{outcome:?}"
        );
    }

    #[test]
    fn the_producer_takes_what_the_gateway_accepts() {
        let config = producer_config(
            ClientConfig::new(),
            &ProducerSettings {
                queue_messages: 10,
                queue_bytes: 8 * 1024 * 1024,
                linger: Duration::from_millis(5),
                in_flight_requests: 2,
                compression: "none".into(),
                message_timeout: Duration::from_secs(30),
                max_body_bytes: 1024 * 1024,
            },
        );
        assert_eq!(config.get("message.max.bytes"), Some("1115136"));
        assert_eq!(config.get("queue.buffering.max.kbytes"), Some("8192"));
        assert_eq!(config.get("message.timeout.ms"), Some("30000"));
        assert_eq!(config.get("acks"), Some("all"));
        assert_eq!(
            config.get("max.in.flight.requests.per.connection"),
            Some("2")
        );
    }
}
