//! Publishing envelopes to Kafka, behind a small trait so the HTTP layer can be tested without
//! a broker. The Kafka implementation answers only when the broker has acknowledged the message
//! (`acks=all`, idempotent producer), which is what lets the gateway promise a 202 means durable.

use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, PoisonError, RwLock};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use hookpipe_common::kafka::ClientHealth;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::producer::{BaseRecord, DeliveryResult, Producer, ProducerContext, ThreadedProducer};
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

/// The producer's batching delay unless configured: the default of `HOOKPIPE_PRODUCER_LINGER`
/// (config.rs says why 5 ms), shared with the benchmarks' raw producer like the one above.
pub const DEFAULT_LINGER: &str = "5ms";

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
/// recorded once per cause for `/readyz`. It also receives every delivery report (in
/// librdkafka's polling thread) and hands it to the request waiting for it.
#[derive(Clone, Default)]
pub struct GatewayContext {
    brokers_down: Arc<AtomicBool>,
    pub health: ClientHealth,
    deliveries: Arc<Deliveries>,
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

impl ProducerContext for GatewayContext {
    /// The message's id in the gateway's delivery ledger: a number, not a box, so handing a
    /// message over allocates nothing of ours.
    type DeliveryOpaque = usize;

    fn delivery(&self, result: &DeliveryResult<'_>, id: usize) {
        let outcome = result
            .as_ref()
            .map(|_| ())
            .map_err(|(error, _)| error.clone());
        if outcome.is_ok() {
            self.brokers_down.store(false, Ordering::Relaxed);
        }
        self.deliveries.settle(id as u64, outcome);
    }
}

/// What the broker answered for one message.
type Outcome = Result<(), KafkaError>;

/// One message handed to the producer and not yet settled.
struct Entry {
    /// When it was handed over: the oldest entry's age is how long the broker has not answered.
    since: Instant,
    /// The request waiting for it, to wake when the answer (or its deadline) comes.
    waker: Option<Waker>,
    outcome: Option<Outcome>,
    /// Its request was answered "not acknowledged in time" by the sweeper.
    timed_out: bool,
    /// Nobody waits any more (answered on timeout, or the client went away): the entry only
    /// keeps the message counted as unsettled until the producer settles it.
    abandoned: bool,
}

#[derive(Default)]
struct Ledger {
    next: u64,
    /// Entries below this id have been past their deadline already (see [`Deliveries::sweep`]).
    swept: u64,
    /// By id; ids are handed out under the lock with the time, so the first entry is the oldest.
    entries: BTreeMap<u64, Entry>,
}

impl Ledger {
    /// Whether the oldest unsettled message was handed over more than `timeout` before `now`.
    fn overdue(&self, now: Instant, timeout: Duration) -> bool {
        self.entries
            .first_key_value()
            .is_some_and(|(_, oldest)| now.saturating_duration_since(oldest.since) > timeout)
    }
}

/// Every message handed to the producer and not yet settled, with the request waiting for it.
///
/// One map behind one lock instead of a channel, a timer and a bookkeeping entry per message
/// (`FutureProducer`'s channel, `tokio::time::timeout` and the stall check's own map: about
/// 2,500 instructions per request in the handler, against about 1,100 for the ledger;
/// docs/benchmarks.md "Issue #14, round 7"). The publish timeout is
/// kept by one sweeper task for all requests ([`Deliveries::sweep`]), which wakes only when the
/// oldest waiting message reaches its deadline.
#[derive(Default)]
struct Deliveries {
    ledger: Mutex<Ledger>,
    sweeper: OnceLock<()>,
}

impl Deliveries {
    fn ledger(&self) -> MutexGuard<'_, Ledger> {
        self.ledger.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Records a message about to be handed over, unless the broker has left one unanswered
    /// for longer than `timeout` (then the stall rule keeps new messages out of the queue).
    fn admit(&self, timeout: Duration) -> Result<u64, PublishError> {
        let mut ledger = self.ledger();
        // Read under the lock, so ids and times rise together (the sweeper relies on it).
        let now = Instant::now();
        if ledger.overdue(now, timeout) {
            return Err(PublishError::Stalled);
        }
        let id = ledger.next;
        ledger.next += 1;
        ledger.entries.insert(
            id,
            Entry {
                since: now,
                waker: None,
                outcome: None,
                timed_out: false,
                abandoned: false,
            },
        );
        Ok(id)
    }

    /// The producer's answer for a message (or, for one it refused at once, its removal).
    fn settle(&self, id: u64, outcome: Outcome) {
        let waker = {
            let mut ledger = self.ledger();
            let Some(entry) = ledger.entries.get_mut(&id) else {
                return;
            };
            if entry.abandoned {
                ledger.entries.remove(&id);
                return;
            }
            entry.outcome = Some(outcome);
            entry.waker.take()
        };
        if let Some(waker) = waker {
            waker.wake();
        }
    }

    fn forget(&self, id: u64) {
        self.ledger().entries.remove(&id);
    }

    /// The answer for `id` once there is one, or `Err(())` once its deadline passed.
    fn poll_outcome(&self, id: u64, cx: &mut Context<'_>) -> Poll<Result<Outcome, ()>> {
        let mut ledger = self.ledger();
        let Some(entry) = ledger.entries.get_mut(&id) else {
            return Poll::Ready(Ok(Err(KafkaError::Canceled)));
        };
        if entry.outcome.is_some() {
            let outcome = ledger.entries.remove(&id).and_then(|e| e.outcome);
            return Poll::Ready(Ok(outcome.unwrap_or(Err(KafkaError::Canceled))));
        }
        if entry.timed_out {
            entry.abandoned = true;
            entry.waker = None;
            return Poll::Ready(Err(()));
        }
        match &mut entry.waker {
            Some(waker) => waker.clone_from(cx.waker()),
            None => entry.waker = Some(cx.waker().clone()),
        }
        Poll::Pending
    }

    /// The request stopped waiting before its answer came.
    fn abandon(&self, id: u64) {
        let mut ledger = self.ledger();
        if let Some(entry) = ledger.entries.get_mut(&id) {
            if entry.outcome.is_some() {
                ledger.entries.remove(&id);
            } else {
                entry.abandoned = true;
                entry.waker = None;
            }
        }
    }

    /// Marks every message handed over more than `timeout` before `now` as past its deadline
    /// and wakes its request; returns when the next one will be (`None`: nothing waits).
    /// Ids rise with time, so each entry is looked at once.
    fn sweep(&self, now: Instant, timeout: Duration) -> Option<Instant> {
        let mut due = Vec::new();
        let next = {
            let mut ledger = self.ledger();
            let Ledger { swept, entries, .. } = &mut *ledger;
            let mut next = None;
            for (id, entry) in entries.range_mut(*swept..) {
                let deadline = entry.since + timeout;
                if deadline > now {
                    next = Some(deadline);
                    break;
                }
                *swept = id + 1;
                if entry.outcome.is_none() && !entry.abandoned {
                    entry.timed_out = true;
                    due.extend(entry.waker.take());
                }
            }
            next
        };
        due.into_iter().for_each(Waker::wake);
        next
    }

    /// Starts the sweeper (once, from the first publish: it needs the runtime). It ends when
    /// the publisher is dropped.
    fn start_sweeper(self: &Arc<Self>, timeout: Duration) {
        self.sweeper.get_or_init(|| {
            let weak = Arc::downgrade(self);
            tokio::spawn(async move {
                loop {
                    let now = Instant::now();
                    let Some(deliveries) = weak.upgrade() else {
                        return;
                    };
                    // Nothing waiting: anything handed over from now on is due after `timeout`.
                    let next = deliveries.sweep(now, timeout).unwrap_or(now + timeout);
                    drop(deliveries);
                    tokio::time::sleep_until(next.into()).await;
                }
            });
        });
    }

    /// The stall rule: whether the broker has left a message unanswered for longer than
    /// `timeout`.
    fn overdue(&self, timeout: Duration) -> bool {
        self.ledger().overdue(Instant::now(), timeout)
    }

    fn len(&self) -> usize {
        self.ledger().entries.len()
    }
}

/// The wait for one message's answer. Dropped before the answer (the client went away), it
/// leaves the message counted as unsettled until the producer settles it.
struct Acknowledgement<'a> {
    deliveries: &'a Deliveries,
    id: u64,
    finished: bool,
}

impl Future for Acknowledgement<'_> {
    type Output = Result<Outcome, ()>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let polled = self.deliveries.poll_outcome(self.id, cx);
        if polled.is_ready() {
            self.finished = true;
        }
        polled
    }
}

impl Drop for Acknowledgement<'_> {
    fn drop(&mut self) {
        if !self.finished {
            self.deliveries.abandon(self.id);
        }
    }
}

type GatewayProducer = ThreadedProducer<GatewayContext>;

pub struct KafkaPublisher {
    config: ClientConfig,
    /// The producer in use. Replaced when the broker keeps refusing it (see `rebuild`).
    producer: RwLock<Arc<GatewayProducer>>,
    context: GatewayContext,
    last_rebuild: Mutex<Instant>,
    topic: String,
    publish_timeout: Duration,
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
            max_record_bytes: max_record_bytes(max_body_bytes),
        })
    }

    fn current(&self) -> Arc<GatewayProducer> {
        match self.producer.read() {
            Ok(p) => Arc::clone(&p),
            Err(poisoned) => Arc::clone(&poisoned.into_inner()),
        }
    }

    /// Why new messages should not be queued now, if they should not: the broker has left a
    /// message unanswered for longer than the publish timeout, or every broker is down.
    pub fn stalled(&self) -> Option<&'static str> {
        if self.context.deliveries.overdue(self.publish_timeout) {
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
    /// the runtime; its messages stay counted as unsettled until it settles them (its delivery
    /// reports come to the same [`Deliveries`]).
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
        let fresh: GatewayProducer = match self.config.create_with_context(self.context.clone()) {
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
        if self.context.brokers_down.load(Ordering::Relaxed) {
            return Err(PublishError::Stalled);
        }
        let deliveries = &self.context.deliveries;
        deliveries.start_sweeper(self.publish_timeout);
        let id = deliveries.admit(self.publish_timeout)?;
        let record = BaseRecord::with_opaque_to(&self.topic, id as usize)
            .key(key)
            .payload(&value);
        let sent = self
            .current()
            .send(record)
            .map_err(|(error, _record)| error);
        // librdkafka copied the message: ours is not needed during the wait.
        drop(value);
        if let Err(error) = sent {
            deliveries.forget(id);
            return Err(match error {
                KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull) => {
                    PublishError::QueueFull
                }
                error if too_large(&error) => PublishError::TooLarge,
                error => {
                    self.rebuild();
                    PublishError::Broker(error.to_string())
                }
            });
        }
        let acknowledgement = Acknowledgement {
            deliveries,
            id,
            finished: false,
        };
        match acknowledgement.await {
            Ok(Ok(())) => Ok(()),
            // The sweeper found it past HOOKPIPE_PUBLISH_TIMEOUT; the message stays counted as
            // unsettled until the producer settles it.
            Err(()) => Err(PublishError::Timeout),
            Ok(Err(KafkaError::MessageProduction(RDKafkaErrorCode::MessageTimedOut))) => {
                Err(PublishError::Timeout)
            }
            Ok(Err(error)) if too_large(&error) => Err(PublishError::TooLarge),
            Ok(Err(KafkaError::Canceled)) => Err(PublishError::Broker("producer closed".into())),
            Ok(Err(error)) => {
                self.rebuild();
                Err(PublishError::Broker(error.to_string()))
            }
        }
    }

    fn queue_len(&self) -> usize {
        self.context.deliveries.len()
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

    /// A waker that counts how often it was woken.
    #[derive(Default)]
    struct Counting(std::sync::atomic::AtomicUsize);

    impl std::task::Wake for Counting {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::Relaxed);
        }
    }

    impl Counting {
        fn woken(&self) -> usize {
            self.0.load(Ordering::Relaxed)
        }

        fn waker() -> (Arc<Self>, Waker) {
            let counting = Arc::new(Self::default());
            (counting.clone(), Waker::from(counting))
        }
    }

    const TIMEOUT: Duration = Duration::from_secs(10);

    #[test]
    fn an_answer_wakes_its_request_once_and_settles_the_message() {
        let deliveries = Deliveries::default();
        let (counting, waker) = Counting::waker();
        let mut cx = Context::from_waker(&waker);
        let id = deliveries.admit(TIMEOUT).unwrap();
        assert!(deliveries.poll_outcome(id, &mut cx).is_pending());
        assert_eq!(deliveries.len(), 1, "unsettled while waiting");
        deliveries.settle(id, Ok(()));
        assert_eq!(counting.woken(), 1);
        assert!(matches!(
            deliveries.poll_outcome(id, &mut cx),
            Poll::Ready(Ok(Ok(())))
        ));
        assert_eq!(
            deliveries.len(),
            0,
            "settled once its request has the answer"
        );
    }

    #[test]
    fn a_request_past_its_deadline_is_answered_and_its_message_stays_unsettled() {
        let deliveries = Deliveries::default();
        let (counting, waker) = Counting::waker();
        let mut cx = Context::from_waker(&waker);
        let first = deliveries.admit(TIMEOUT).unwrap();
        let second = deliveries.admit(TIMEOUT).unwrap();
        assert!(deliveries.poll_outcome(first, &mut cx).is_pending());
        assert!(deliveries.poll_outcome(second, &mut cx).is_pending());
        let start = Instant::now();
        // Before the deadline nothing is due; the sweeper is told when the first one will be.
        let next = deliveries
            .sweep(start, TIMEOUT)
            .expect("a deadline to wait for");
        assert!(next > start && next <= start + TIMEOUT + Duration::from_secs(1));
        assert_eq!(counting.woken(), 0);
        // Past it, both requests are woken once and answered "not in time".
        assert_eq!(deliveries.sweep(start + 2 * TIMEOUT, TIMEOUT), None);
        assert_eq!(counting.woken(), 2);
        assert!(matches!(
            deliveries.poll_outcome(first, &mut cx),
            Poll::Ready(Err(()))
        ));
        assert!(matches!(
            deliveries.poll_outcome(second, &mut cx),
            Poll::Ready(Err(()))
        ));
        // A second sweep looks at nothing again.
        assert_eq!(deliveries.sweep(start + 3 * TIMEOUT, TIMEOUT), None);
        assert_eq!(counting.woken(), 2);
        // Both still count for the stall rule until the producer settles them.
        assert_eq!(deliveries.len(), 2);
        deliveries.settle(first, Ok(()));
        deliveries.settle(second, Err(KafkaError::Canceled));
        assert_eq!(deliveries.len(), 0);
    }

    #[test]
    fn a_request_that_went_away_leaves_its_message_unsettled_until_the_answer() {
        let deliveries = Deliveries::default();
        let id = deliveries.admit(TIMEOUT).unwrap();
        let waiting = Acknowledgement {
            deliveries: &deliveries,
            id,
            finished: false,
        };
        drop(waiting);
        assert_eq!(deliveries.len(), 1);
        deliveries.settle(id, Ok(()));
        assert_eq!(deliveries.len(), 0);
        // An answer that came before the request went away settles it as the request leaves.
        let id = deliveries.admit(TIMEOUT).unwrap();
        deliveries.settle(id, Ok(()));
        drop(Acknowledgement {
            deliveries: &deliveries,
            id,
            finished: false,
        });
        assert_eq!(deliveries.len(), 0);
    }

    #[test]
    fn a_message_unanswered_past_the_timeout_keeps_new_ones_out() {
        let deliveries = Deliveries::default();
        let old = deliveries.admit(TIMEOUT).unwrap();
        // Zero: the message handed over above is already older than that.
        std::thread::sleep(Duration::from_millis(2));
        assert_eq!(deliveries.admit(Duration::ZERO), Err(PublishError::Stalled));
        assert_eq!(deliveries.len(), 1, "the refused one was not recorded");
        deliveries.settle(old, Ok(()));
        deliveries.forget(old);
        assert!(deliveries.admit(Duration::ZERO).is_ok());
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
