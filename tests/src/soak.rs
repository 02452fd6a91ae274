//! The soak: webhooks at a steady rate through two real gateways, the broker, a sink and the
//! BigQuery emulator, while faults are injected on a schedule (kill -9 of the sink, kill -9 of
//! a gateway, a broker restart, a broker pause longer than the sink's session timeout, an
//! emulator restart). At the end, once the sink's group committed to the end of every
//! partition, the tables are read and every acknowledged hit must be there exactly once.
//!
//! The senders behave as real ones should: each webhook has its own Idempotency-Key, reused on
//! every retry; connection errors, timeouts, 429 and 503 are retried (503/429 after the
//! Retry-After the gateway gives), a connection error moves to the other gateway. Some senders
//! send no key at all (`keyless_every`): a 503'd attempt the broker stored anyway is then a
//! second row with another hit_id, which the gateway bounds; those are counted separately.
//!
//! Run by `scripts/soak` (full or `--quick`) and, in its quick form, by `tests/tests/soak.rs`.

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use rdkafka::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;

use crate::{
    Gateway, PrivateBroker, PrivateEmulator, Servers, Sink, Wiring, free_port, query, unique,
    write_catalogue,
};

/// What to run.
#[derive(Clone, Debug)]
pub struct Config {
    /// Webhooks to send.
    pub hits: u64,
    /// Webhooks per second, steady.
    pub rate: u32,
    /// Most requests in flight at once (senders waiting on retries included).
    pub max_in_flight: usize,
    /// Partitions of the webhook topic.
    pub partitions: i32,
    pub sink_kills: u32,
    pub gateway_kills: u32,
    pub broker_restarts: u32,
    /// Broker freezes (SIGSTOP) of `pause_for`, longer than the sink's session timeout.
    pub broker_pauses: u32,
    pub emulator_restarts: u32,
    /// How long a killed or stopped server stays down before it is started again.
    pub down_for: Duration,
    /// How long a broker pause lasts.
    pub pause_for: Duration,
    /// Every n-th webhook is sent without an Idempotency-Key (0: none).
    pub keyless_every: u64,
    /// How long, after the last send, the pipeline may take to drain.
    pub drain_timeout: Duration,
}

impl Config {
    /// A few thousand hits and one fault of each kind: a few minutes, run by `scripts/test`.
    pub fn quick() -> Self {
        Self {
            hits: 3_000,
            rate: 60,
            max_in_flight: 256,
            partitions: 4,
            sink_kills: 1,
            gateway_kills: 1,
            broker_restarts: 1,
            broker_pauses: 1,
            emulator_restarts: 1,
            down_for: Duration::from_secs(2),
            // The soak's sink runs with a 3 s session timeout.
            pause_for: Duration::from_secs(10),
            keyless_every: 10,
            drain_timeout: Duration::from_secs(180),
        }
    }

    /// The documented full soak: 50,000 hits, several faults of each kind.
    pub fn full() -> Self {
        Self {
            hits: 50_000,
            rate: 100,
            sink_kills: 5,
            gateway_kills: 3,
            broker_restarts: 2,
            broker_pauses: 2,
            emulator_restarts: 2,
            drain_timeout: Duration::from_secs(600),
            ..Self::quick()
        }
    }
}

/// The kinds of fault, in the order the schedule interleaves them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Fault {
    SinkKill,
    GatewayKill,
    BrokerRestart,
    BrokerPause,
    EmulatorRestart,
}

impl Fault {
    fn label(self) -> &'static str {
        match self {
            Self::SinkKill => "sink kill -9",
            Self::GatewayKill => "gateway kill -9",
            Self::BrokerRestart => "broker restart",
            Self::BrokerPause => "broker pause",
            Self::EmulatorRestart => "emulator restart",
        }
    }
}

/// Faults spread evenly over the sending time, kinds interleaved (round robin) so that no kind
/// bunches at one end: `(seconds after start, fault)`.
pub fn schedule(config: &Config) -> Vec<(Duration, Fault)> {
    let mut left = [
        (Fault::SinkKill, config.sink_kills),
        (Fault::GatewayKill, config.gateway_kills),
        (Fault::BrokerRestart, config.broker_restarts),
        (Fault::BrokerPause, config.broker_pauses),
        (Fault::EmulatorRestart, config.emulator_restarts),
    ];
    let mut order = Vec::new();
    while left.iter().any(|(_, n)| *n > 0) {
        for (fault, n) in &mut left {
            if *n > 0 {
                *n -= 1;
                order.push(*fault);
            }
        }
    }
    let sending = Duration::from_secs_f64(config.hits as f64 / f64::from(config.rate));
    let slots = order.len() as u32 + 1;
    order
        .into_iter()
        .enumerate()
        .map(|(i, fault)| (sending * (i as u32 + 1) / slots, fault))
        .collect()
}

/// What the soak found.
#[derive(Clone, Debug, Default)]
pub struct Summary {
    pub sent: u64,
    /// Answered 2xx (after retries).
    pub acknowledged: u64,
    /// Given up on after retrying for the whole retry budget (never 2xx).
    pub unacknowledged: u64,
    /// Answered with a status a sender must not retry (4xx other than 429): a gateway bug here.
    pub refused: u64,
    pub retries: u64,
    pub rows: u64,
    pub distinct: u64,
    /// Acknowledged but not in the table.
    pub lost: u64,
    /// Rows beyond one per hit_id.
    pub duplicated: u64,
    /// Rows whose hit_id no sender made.
    pub unknown: u64,
    pub dead_letters: u64,
    /// Keyless webhooks (no Idempotency-Key): sent, acknowledged, acknowledged but with no row,
    /// rows beyond one per webhook, and the most rows one webhook became.
    pub keyless_sent: u64,
    pub keyless_acknowledged: u64,
    pub keyless_lost: u64,
    pub keyless_extra_rows: u64,
    pub keyless_most_rows: u64,
    pub faults: Vec<(Fault, u32)>,
    pub elapsed: Duration,
    /// From the last send until every acknowledged hit was in the table and the sink had
    /// committed everything.
    pub drained_in: Duration,
}

impl Summary {
    /// The soak's verdict: nothing acknowledged lost (keyed or keyless), nothing twice for
    /// keyed senders, nothing unexplained, and no keyless webhook more than one extra row.
    pub fn passed(&self) -> bool {
        self.lost == 0
            && self.duplicated == 0
            && self.unknown == 0
            && self.refused == 0
            && self.keyless_lost == 0
            && self.keyless_most_rows <= 2
    }
}

impl fmt::Display for Summary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let faults = self
            .faults
            .iter()
            .map(|(fault, n)| format!("{n}× {}", fault.label()))
            .collect::<Vec<_>>()
            .join(", ");
        writeln!(f, "soak summary")?;
        writeln!(f, "  sent            {}", self.sent)?;
        writeln!(f, "  acknowledged    {} (with a key)", self.acknowledged)?;
        writeln!(f, "  unacknowledged  {}", self.unacknowledged)?;
        writeln!(f, "  refused         {}", self.refused)?;
        writeln!(f, "  sender retries  {}", self.retries)?;
        writeln!(f, "  rows            {}", self.rows)?;
        writeln!(f, "  distinct hit_id {}", self.distinct)?;
        writeln!(f, "  lost            {}", self.lost)?;
        writeln!(f, "  duplicated      {}", self.duplicated)?;
        writeln!(f, "  unknown rows    {}", self.unknown)?;
        writeln!(f, "  dead letters    {}", self.dead_letters)?;
        writeln!(
            f,
            "  keyless         {} sent, {} acknowledged, {} lost, {} extra rows ({:.3} per webhook; at most {} rows for one webhook)",
            self.keyless_sent,
            self.keyless_acknowledged,
            self.keyless_lost,
            self.keyless_extra_rows,
            self.keyless_extra_rows as f64 / self.keyless_acknowledged.max(1) as f64,
            self.keyless_most_rows
        )?;
        writeln!(f, "  faults          {faults}")?;
        writeln!(
            f,
            "  time            {:.0} s ({:.1} s to drain after the last send)",
            self.elapsed.as_secs_f64(),
            self.drained_in.as_secs_f64()
        )?;
        write!(
            f,
            "  result          {}",
            if self.passed() { "PASS" } else { "FAIL" }
        )
    }
}

/// The sink settings the soak runs with: small batches and a small dedup window so commits,
/// pauses and suspect lookups happen many times, quick retries.
const SINK_TUNING: &[(&str, &str)] = &[
    // Short, so a broker pause of a few seconds outlasts it.
    ("HOOKPIPE_SESSION_TIMEOUT", "3s"),
    ("HOOKPIPE_BATCH_MAX_ROWS", "200"),
    ("HOOKPIPE_BATCH_MAX_AGE", "300ms"),
    ("HOOKPIPE_DEDUP_WINDOW", "2000"),
    ("HOOKPIPE_RETRY_INITIAL", "100ms"),
    ("HOOKPIPE_RETRY_MAX", "2s"),
];

/// Two streams in different zones, written to two tables.
const STREAMS: [(&str, &str); 2] = [
    ("soak_orders", "+03:00"),
    ("soak_leads", "America/New_York"),
];

/// One sender's view of a hit.
enum Outcome {
    Acknowledged,
    Unacknowledged,
    Refused(u16),
}

struct Senders {
    client: reqwest::Client,
    gateways: Vec<String>,
    retries: AtomicU64,
}

impl Senders {
    /// Sends hit `i` until a gateway answers 2xx, retrying as a well-behaved sender does; with
    /// `key` None, without an Idempotency-Key (and marked `orderId=K<i>` to be found later).
    async fn send(&self, i: u64, stream: &str, key: Option<&str>) -> Outcome {
        let deadline = Instant::now() + Duration::from_secs(300);
        let mut gateway = i as usize % self.gateways.len();
        let mut backoff = Duration::from_millis(100);
        loop {
            let mut request = self
                .client
                .post(format!("{}/ds/{stream}", self.gateways[gateway]))
                .header("content-type", "application/x-www-form-urlencoded")
                .body(body(i, key.is_none()));
            if let Some(key) = key {
                request = request.header("idempotency-key", key);
            }
            let answer = request.send().await;
            let wait = match answer {
                Ok(r) if r.status().is_success() => return Outcome::Acknowledged,
                Ok(r) if r.status() == 429 || r.status() == 503 => r
                    .headers()
                    .get("retry-after")
                    .and_then(|v| v.to_str().ok()?.parse::<u64>().ok())
                    .map_or(backoff, Duration::from_secs),
                Ok(r) => return Outcome::Refused(r.status().as_u16()),
                Err(_) => {
                    // Connection refused or reset, or no answer in time: try the other gateway.
                    gateway = (gateway + 1) % self.gateways.len();
                    backoff
                }
            };
            if Instant::now() + wait > deadline {
                return Outcome::Unacknowledged;
            }
            self.retries.fetch_add(1, Ordering::Relaxed);
            tokio::time::sleep(wait).await;
            backoff = (backoff * 2).min(Duration::from_secs(2));
        }
    }
}

/// The payload of hit `i`; keyless hits are marked so their rows can be told apart.
fn body(i: u64, keyless: bool) -> String {
    let id = if keyless { 'K' } else { 'S' };
    format!("orderId={id}{i}&status=delivered&amount=42.50&currency=EUR&note=soak%20test")
}

/// The pipeline under test, with the processes the faults hit.
struct Pipeline {
    wiring: Wiring,
    broker: PrivateBroker,
    emulator: PrivateEmulator,
    gateways: Vec<(Gateway, u16, u16)>,
    sink: Sink,
}

impl Pipeline {
    async fn start(partitions: i32) -> (Self, Vec<(String, String)>) {
        let broker = PrivateBroker::start().await;
        let emulator = PrivateEmulator::start().await;
        let servers = Servers {
            brokers: broker.brokers(),
            bq_rest: emulator.rest(),
            bq_grpc: emulator.grpc(),
            project: "local-project".into(),
        };
        let dataset = unique("soak");
        let streams: Vec<(String, String, &str)> = STREAMS
            .iter()
            .map(|(table, zone)| {
                (
                    uuid::Uuid::new_v4().to_string(),
                    format!("local-project.{dataset}.{table}"),
                    *zone,
                )
            })
            .collect();
        let catalogue = write_catalogue(
            &streams
                .iter()
                .map(|(id, table, zone)| (id.as_str(), table.as_str(), *zone))
                .collect::<Vec<_>>(),
        );
        let wiring = Wiring::on(servers, catalogue, partitions).await;
        let mut gateways = Vec::new();
        for _ in 0..2 {
            let (port, admin) = (free_port(), free_port());
            gateways.push((wiring.gateway_at(port, admin, &[]).await, port, admin));
        }
        let sink = wiring.sink(SINK_TUNING).await;
        let streams = streams.into_iter().map(|(id, t, _)| (id, t)).collect();
        (
            Self {
                wiring,
                broker,
                emulator,
                gateways,
                sink,
            },
            streams,
        )
    }

    async fn inject(&mut self, fault: Fault, n: u32, down_for: Duration, pause_for: Duration) {
        match fault {
            Fault::SinkKill => {
                self.sink.proc.kill9();
                tokio::time::sleep(down_for).await;
                self.sink = self.wiring.sink(SINK_TUNING).await;
            }
            Fault::GatewayKill => {
                let which = n as usize % self.gateways.len();
                let (gateway, port, admin) = &mut self.gateways[which];
                gateway.proc.kill9();
                tokio::time::sleep(down_for).await;
                *gateway = self.wiring.gateway_at(*port, *admin, &[]).await;
            }
            Fault::BrokerRestart => {
                self.broker.stop();
                tokio::time::sleep(down_for).await;
                self.broker.resume().await;
            }
            Fault::BrokerPause => {
                self.broker.pause();
                tokio::time::sleep(pause_for).await;
                self.broker.unpause();
            }
            Fault::EmulatorRestart => {
                self.emulator.stop();
                tokio::time::sleep(down_for).await;
                self.emulator.resume().await;
            }
        }
    }
}

/// Runs the soak and returns what it found (it does not judge: see [`Summary::passed`]).
pub async fn run(config: &Config) -> Summary {
    let started = Instant::now();
    let (mut pipeline, streams) = Pipeline::start(config.partitions).await;
    let senders = Arc::new(Senders {
        client: reqwest::Client::builder()
            .timeout(Duration::from_secs(10))
            .build()
            .unwrap(),
        gateways: pipeline
            .gateways
            .iter()
            .map(|(g, _, _)| g.url.clone())
            .collect(),
        retries: AtomicU64::new(0),
    });
    let run_id = unique("soak");

    // Senders: one task per hit, started at the steady rate, at most max_in_flight at once.
    let load = {
        let (senders, streams, config) = (senders.clone(), streams.clone(), config.clone());
        let run_id = run_id.clone();
        tokio::spawn(async move {
            let slots = Arc::new(Semaphore::new(config.max_in_flight));
            let mut ticker =
                tokio::time::interval(Duration::from_secs_f64(1.0 / f64::from(config.rate)));
            ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let mut tasks = JoinSet::new();
            for i in 0..config.hits {
                ticker.tick().await;
                let permit = slots.clone().acquire_owned().await.unwrap();
                let (senders, stream) = (
                    senders.clone(),
                    streams[i as usize % streams.len()].0.clone(),
                );
                let keyless = config.keyless_every > 0 && i % config.keyless_every == 0;
                let key = (!keyless).then(|| format!("{run_id}-{i}"));
                tasks.spawn(async move {
                    let outcome = senders.send(i, &stream, key.as_deref()).await;
                    drop(permit);
                    (i, stream, key, outcome)
                });
            }
            let mut results = Vec::new();
            while let Some(r) = tasks.join_next().await {
                results.push(r.unwrap());
            }
            results
        })
    };

    // Faults on schedule while the load runs.
    let mut injected: HashMap<Fault, u32> = HashMap::new();
    for (at, fault) in schedule(config) {
        tokio::time::sleep_until((started + at).into()).await;
        let n = *injected.get(&fault).unwrap_or(&0);
        eprintln!(
            "[soak {:>4.0}s] {}",
            started.elapsed().as_secs_f64(),
            fault.label()
        );
        pipeline
            .inject(fault, n, config.down_for, config.pause_for)
            .await;
        *injected.entry(fault).or_default() += 1;
    }
    let results = load.await.unwrap();
    let sent_all = Instant::now();
    eprintln!(
        "[soak {:>4.0}s] all sent; draining",
        started.elapsed().as_secs_f64()
    );

    let mut summary = Summary {
        sent: config.hits,
        retries: senders.retries.load(Ordering::Relaxed),
        ..Summary::default()
    };
    let mut acked: HashSet<String> = HashSet::new();
    let mut made: HashSet<String> = HashSet::new();
    let mut keyless_acked: HashSet<String> = HashSet::new();
    for (i, stream, key, outcome) in &results {
        let Some(key) = key else {
            summary.keyless_sent += 1;
            match outcome {
                Outcome::Acknowledged => {
                    summary.keyless_acknowledged += 1;
                    keyless_acked.insert(body(*i, true));
                }
                Outcome::Unacknowledged => summary.unacknowledged += 1,
                Outcome::Refused(status) => {
                    eprintln!("keyless hit {i} refused with {status}");
                    summary.refused += 1;
                }
            }
            continue;
        };
        let hit_id = uuid::Uuid::new_v5(&stream.parse().unwrap(), key.as_bytes()).to_string();
        match outcome {
            Outcome::Acknowledged => {
                summary.acknowledged += 1;
                acked.insert(hit_id.clone());
            }
            Outcome::Unacknowledged => summary.unacknowledged += 1,
            Outcome::Refused(status) => {
                eprintln!("hit {key} refused with {status}");
                summary.refused += 1;
            }
        }
        made.insert(hit_id);
    }

    // Drain: every acknowledged hit stored and the sink's group committed to the end of every
    // partition (so no later copy can still arrive), or the deadline.
    let servers = pipeline.wiring.servers.clone();
    let tables: Vec<String> = streams.iter().map(|(_, t)| t.clone()).collect();
    let deadline = sent_all + config.drain_timeout;
    // Counted only once the group has committed everything (then no row is still on its way).
    let mut rows: Vec<(String, String)>;
    loop {
        let quiet = pipeline.wiring.quiescent().await;
        rows = all_rows(&servers, &tables).await;
        if quiet || Instant::now() > deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    summary.drained_in = sent_all.elapsed();
    let (keyless_rows, stored): (Vec<_>, Vec<_>) = rows
        .into_iter()
        .partition(|(_, payload)| payload.starts_with("orderId=K"));
    let stored: Vec<String> = stored.into_iter().map(|(id, _)| id).collect();
    let distinct: HashSet<&String> = stored.iter().collect();
    summary.rows = stored.len() as u64;
    summary.distinct = distinct.len() as u64;
    summary.duplicated = summary.rows - summary.distinct;
    summary.lost = acked.iter().filter(|h| !distinct.contains(h)).count() as u64;
    summary.unknown = distinct.iter().filter(|h| !made.contains(**h)).count() as u64;
    let mut per_webhook: HashMap<String, u64> = HashMap::new();
    for (_, payload) in keyless_rows {
        *per_webhook.entry(payload).or_default() += 1;
    }
    summary.keyless_lost = keyless_acked
        .iter()
        .filter(|b| !per_webhook.contains_key(*b))
        .count() as u64;
    summary.keyless_extra_rows = per_webhook.values().map(|n| n - 1).sum();
    summary.keyless_most_rows = per_webhook.values().copied().max().unwrap_or(0);
    summary.dead_letters = topic_size(&pipeline.wiring.servers.brokers, &pipeline.wiring.dlq_topic);
    summary.faults = [
        Fault::SinkKill,
        Fault::GatewayKill,
        Fault::BrokerRestart,
        Fault::BrokerPause,
        Fault::EmulatorRestart,
    ]
    .into_iter()
    .map(|f| (f, *injected.get(&f).unwrap_or(&0)))
    .collect();
    summary.elapsed = started.elapsed();
    summary
}

/// Every row's (hit_id, payload) in the tables (a table not created yet counts as empty).
async fn all_rows(servers: &Servers, tables: &[String]) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for table in tables {
        if let Ok(rows) = query(servers, &format!("SELECT hit_id, payload FROM `{table}`")).await {
            out.extend(rows.into_iter().filter_map(|mut r| {
                let payload = r.pop()??;
                Some((r.pop()??, payload))
            }));
        }
    }
    out
}

/// Records in a one-partition topic.
fn topic_size(brokers: &str, topic: &str) -> u64 {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .create()
        .unwrap();
    let (low, high) = consumer
        .fetch_watermarks(topic, 0, Duration::from_secs(10))
        .unwrap();
    (high - low).max(0) as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schedule_interleaves_kinds_and_spreads_them_over_the_sending_time() {
        let config = Config {
            hits: 1_000,
            rate: 10,
            sink_kills: 3,
            gateway_kills: 1,
            broker_restarts: 1,
            broker_pauses: 0,
            emulator_restarts: 0,
            ..Config::quick()
        };
        let plan = schedule(&config);
        let kinds: Vec<Fault> = plan.iter().map(|(_, f)| *f).collect();
        assert_eq!(
            kinds,
            [
                Fault::SinkKill,
                Fault::GatewayKill,
                Fault::BrokerRestart,
                Fault::SinkKill,
                Fault::SinkKill
            ]
        );
        // 100 s of sending, 5 faults: every 100/6 s, the last well before the end.
        assert_eq!(plan[0].0.as_secs(), 16);
        assert_eq!(plan[4].0.as_secs(), 83);
    }
}
