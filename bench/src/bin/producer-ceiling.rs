//! The gateway's ceiling: a plain rdkafka producer sending the same envelopes with the same
//! settings as the gateway (acks=all, idempotence, compression, linger, queue) to the same
//! broker, with `--concurrency` sends in flight, each waiting for its acknowledgement as an
//! HTTP connection to the gateway does. Prints one JSON line.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use clap::Parser;
use hookpipe_bench::{cpu_by_thread_kind, cpu_time, payload, percentile};
use ingest_gateway::envelope::{Received, encode};
use rdkafka::ClientConfig;
use rdkafka::producer::{FutureProducer, FutureRecord};

#[derive(Parser)]
struct Args {
    #[arg(long, default_value = "127.0.0.1:9092")]
    brokers: String,
    #[arg(long)]
    topic: String,
    /// Sends in flight at once.
    #[arg(long, default_value_t = 64)]
    concurrency: usize,
    /// How long to send, in seconds (after a 2 s warm-up).
    #[arg(long, default_value_t = 15)]
    seconds: u64,
    /// Or: send exactly this many (no warm-up), e.g. to fill a topic for the sink benchmark.
    #[arg(long)]
    count: Option<u64>,
    /// The gateway's defaults (HOOKPIPE_PRODUCER_LINGER, HOOKPIPE_PRODUCER_COMPRESSION).
    #[arg(long, default_value = ingest_gateway::publisher::DEFAULT_LINGER, value_parser = hookpipe_common::parse_duration)]
    linger: Duration,
    #[arg(long, default_value = "none")]
    compression: String,
    /// The gateway's default (HOOKPIPE_PRODUCER_IN_FLIGHT_REQUESTS).
    #[arg(long, default_value_t = ingest_gateway::publisher::DEFAULT_IN_FLIGHT_REQUESTS)]
    in_flight_requests: u8,
    /// The stream id in the envelopes (a fresh one if not given).
    #[arg(long)]
    stream: Option<uuid::Uuid>,
    /// Paced: at most this many messages per second in all (the `--concurrency` sends in
    /// flight still bound it). `bench/run` paces a second raw producer at the gateway's
    /// accepted rate (`HOOKPIPE_BENCH_PACED=1`), so the two are compared at the same message
    /// rate, and so the same batch sizes.
    #[arg(long)]
    rate: Option<f64>,
    /// Also report librdkafka's own counters per message over the measured window (from its
    /// statistics, every second): broker-thread wake-ups and requests sent.
    #[arg(long)]
    stats: bool,
}

/// Keeps librdkafka's latest statistics.
#[derive(Clone, Default)]
struct LatestStats(Arc<std::sync::Mutex<Option<rdkafka::Statistics>>>);

impl rdkafka::ClientContext for LatestStats {
    fn stats(&self, statistics: rdkafka::Statistics) {
        *self.0.lock().unwrap_or_else(|e| e.into_inner()) = Some(statistics);
    }
}
impl rdkafka::producer::ProducerContext for LatestStats {
    type DeliveryOpaque = ();
    fn delivery(&self, _: &rdkafka::message::DeliveryResult<'_>, _: Self::DeliveryOpaque) {}
}

/// Wake-ups, requests sent and produce requests, summed over the brokers.
fn broker_counters(stats: &LatestStats) -> [u64; 3] {
    let latest = stats.0.lock().unwrap_or_else(|e| e.into_inner());
    let Some(s) = latest.as_ref() else {
        return [0; 3];
    };
    s.brokers.values().fold([0; 3], |[w, t, p], b| {
        let produce = b.req.get("Produce").copied().unwrap_or(0).max(0) as u64;
        [w + b.wakeups.unwrap_or(0), t + b.tx, p + produce]
    })
}

#[tokio::main]
async fn main() {
    let args = Args::parse();
    let mut base = ClientConfig::new();
    base.set("bootstrap.servers", &args.brokers);
    // The gateway's own producer settings (the local broker needs the unbounded timeout).
    let config = ingest_gateway::publisher::producer_config(
        base,
        &ingest_gateway::publisher::ProducerSettings {
            queue_messages: 100_000,
            queue_bytes: 64 * 1024 * 1024,
            linger: args.linger,
            in_flight_requests: args.in_flight_requests,
            compression: args.compression.clone(),
            message_timeout: Duration::ZERO,
            max_body_bytes: 1024 * 1024,
        },
    );
    let mut config = config;
    if args.stats {
        config.set("statistics.interval.ms", "1000");
    }
    let stats = LatestStats::default();
    let producer: FutureProducer<LatestStats> =
        config.create_with_context(stats.clone()).expect("producer");
    let stream = args.stream.unwrap_or_else(uuid::Uuid::new_v4);
    let next = Arc::new(AtomicU64::new(0));
    let warmup = if args.count.is_some() { 0 } else { 2 };
    let start = Instant::now();
    let measure_from = start + Duration::from_secs(warmup);
    let stop = measure_from + Duration::from_secs(args.seconds);
    let cpu_at_start = Arc::new(std::sync::Mutex::new(None));
    // librdkafka's counters when the measured window opens (statistics come every second).
    let counters_at_start = tokio::spawn({
        let stats = stats.clone();
        async move {
            tokio::time::sleep_until(measure_from.into()).await;
            broker_counters(&stats)
        }
    });
    let rate = args.rate.filter(|r| *r > 0.0);
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..args.concurrency {
        let (producer, next, topic, count, cpu_at_start) = (
            producer.clone(),
            next.clone(),
            args.topic.clone(),
            args.count,
            cpu_at_start.clone(),
        );
        tasks.spawn(async move {
            let mut latencies = Vec::new();
            let mut measured = 0u64;
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if count.is_some_and(|c| i >= c) || (count.is_none() && Instant::now() >= stop) {
                    return (latencies, measured);
                }
                if let Some(rate) = rate {
                    let due = start + Duration::from_secs_f64(i as f64 / rate);
                    tokio::time::sleep_until(due.into()).await;
                }
                let now_ms = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .unwrap_or_default()
                    .as_millis() as i64;
                // Encoded as the gateway encodes it.
                let (hit_id, value) = encode(&Received {
                    stream_id: stream,
                    received_at_ms: now_ms,
                    payload: bytes::Bytes::from(payload(i)),
                    method: "POST",
                    content_type: "application/x-www-form-urlencoded",
                    query: "",
                    idempotency_key: None,
                    signature: None,
                    remote_addr: Some(std::net::SocketAddr::from(([127, 0, 0, 1], 50000))),
                    user_agent: "bench",
                    // Like an envelope from a gateway before these fields existed: the sink
                    // places it with its catalogue.
                    table: "",
                    timezone: "",
                });
                let mut key = uuid::Uuid::encode_buffer();
                let key = hit_id.hyphenated().encode_lower(&mut key);
                let sent = Instant::now();
                let record = FutureRecord::to(&topic).key(key.as_bytes()).payload(&value);
                if producer
                    .send(record, Duration::from_secs(30))
                    .await
                    .is_err()
                {
                    eprintln!("send failed");
                    continue;
                }
                if sent >= measure_from {
                    let mut cpu = cpu_at_start.lock().unwrap_or_else(|e| e.into_inner());
                    if cpu.is_none() {
                        *cpu = Some((cpu_time(), cpu_by_thread_kind()));
                    }
                    latencies.push(sent.elapsed());
                    measured += 1;
                }
            }
        });
    }
    let mut latencies = Vec::new();
    let mut measured = 0;
    while let Some(done) = tasks.join_next().await {
        let (l, n) = done.expect("sender task");
        latencies.extend(l);
        measured += n;
    }
    let elapsed = Instant::now().saturating_duration_since(measure_from);
    let counters_start = counters_at_start.await.unwrap_or_default();
    let counters_end = broker_counters(&stats);
    let per_message = |i: usize| {
        counters_end[i].saturating_sub(counters_start[i]) as f64 / measured.max(1) as f64
    };
    let (cpu_start, threads_start) = cpu_at_start
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .take()
        .unwrap_or_default();
    let cpu = cpu_time().saturating_sub(cpu_start);
    let by_thread: serde_json::Map<String, serde_json::Value> = cpu_by_thread_kind()
        .into_iter()
        .map(|(kind, end)| {
            let used = end.saturating_sub(threads_start.get(kind).copied().unwrap_or_default());
            let per_message = used.as_secs_f64() * 1e6 / measured.max(1) as f64;
            (kind.to_string(), serde_json::json!(per_message))
        })
        .collect();
    latencies.sort_unstable();
    println!(
        "{}",
        serde_json::json!({
            "concurrency": args.concurrency,
            "messages": measured,
            "seconds": elapsed.as_secs_f64(),
            "per_second": measured as f64 / elapsed.as_secs_f64(),
            "p50_ms": percentile(&latencies, 50.0).as_secs_f64() * 1000.0,
            "p99_ms": percentile(&latencies, 99.0).as_secs_f64() * 1000.0,
            "cpu_us_per_message": cpu.as_secs_f64() * 1e6 / measured.max(1) as f64,
            "cpu_us_per_message_by_thread": by_thread,
            "librdkafka_per_message": args.stats.then(|| serde_json::json!({
                "wakeups": per_message(0),
                "requests": per_message(1),
                "produce_requests": per_message(2),
            })),
        })
    );
}
