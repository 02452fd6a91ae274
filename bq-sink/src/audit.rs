//! `bq-sink audit`: proves, per stream and receipt day, that every hit Kafka accepted is in
//! BigQuery exactly once. Kafka keeps every accepted hit for its retention, so the pipeline
//! can check itself: the main topic is read for the window, the tables are asked for those
//! hit_ids, and every hit is accounted for as a row, a dead letter (with its reason), a parked
//! row, or missing.
//!
//! Memory is bounded by one day of hits whatever the window: the window is cut into slices of
//! at most 24 h, and each slice is read from the offsets the broker gives for its start
//! (offset-for-time look-ups), compared and dropped before the next. A broker that does not
//! answer those look-ups is read from its earliest offsets for each slice, and the report says
//! so. The dead-letter and parking topics are read once, whole (they are small).

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::io::{IsTerminal, Write as _};
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::NaiveDate;
use hookpipe_common::Catalogue;
use hookpipe_common::catalogue::TableRef;
use hookpipe_common::zone::Zone;
use hookpipe_proto::{DeadLetter, Envelope, Message as _, Parked};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};
use serde::Serialize;
use uuid::Uuid;

use crate::warehouse::rest::{Param, Rest};

/// What to audit.
#[derive(clap::Args, Clone, Debug)]
pub struct AuditArgs {
    /// Start of the window, on `received_at` (RFC 3339, e.g. 2026-11-27T00:00:00Z).
    #[arg(long, value_parser = crate::replay::parse_instant, requires = "until", required_unless_present = "day")]
    pub since: Option<i64>,
    /// End of the window (exclusive), on `received_at` (RFC 3339).
    #[arg(long, value_parser = crate::replay::parse_instant, requires = "since")]
    pub until: Option<i64>,
    /// Instead of --since/--until: one UTC day, `yesterday`, `today` or `YYYY-MM-DD` (what the
    /// scheduled audit in Kubernetes runs, with no shell to compute dates).
    #[arg(long, conflicts_with_all = ["since", "until"])]
    pub day: Option<String>,
    /// Only this stream (repeatable); every stream by default.
    #[arg(long = "stream")]
    pub streams: Vec<Uuid>,
    /// `table` for people, `json` for machines.
    #[arg(long, default_value = "table", value_parser = ["table", "json"])]
    pub format: String,
    /// Put missing hits back on the main topic (the sink looks each up before writing, so a
    /// repeat is harmless) and print the SQL that removes duplicated rows (not run).
    #[arg(long)]
    pub repair: bool,
}

/// Exit statuses.
pub const EXIT_OK: u8 = 0;
pub const EXIT_FOUND: u8 = 1;
pub const EXIT_FAILED: u8 = 2;

/// The longest slice of the window read at once (bounds memory to a day of hits).
const SLICE_MS: i64 = 86_400_000;
/// How far a record's Kafka timestamp may be from its `received_at` (the gateway's producer
/// stamps it when the message is handed over, right after receipt).
const TIMESTAMP_SLACK_MS: i64 = 5 * 60_000;
/// hit_ids per look-up query.
const BATCH: usize = 5_000;
/// hit_ids listed in the JSON output (the counts are always complete).
const LIST_MAX: usize = 1_000;

/// Where one hit of the main topic is.
#[derive(Clone, Debug)]
struct Seen {
    stream: Uuid,
    table: TableRef,
    date: NaiveDate,
    partition: i32,
    offset: i64,
}

/// One line of the report.
#[derive(Clone, Debug, Default, Serialize, PartialEq, Eq)]
pub struct DayReport {
    pub stream: String,
    pub table: String,
    pub day: String,
    pub accepted: u64,
    pub rows: u64,
    pub missing: u64,
    pub duplicated: u64,
    pub dead_lettered: BTreeMap<String, u64>,
    pub parked: u64,
    pub not_in_kafka: u64,
}

#[derive(Debug, Default, Serialize)]
pub struct Report {
    pub topic: String,
    pub since: String,
    pub until: String,
    /// `offsets-for-time` or `from-earliest`.
    pub scan: String,
    pub records_scanned: u64,
    pub days: Vec<DayReport>,
    pub missing_hit_ids: Vec<String>,
    pub duplicated_hit_ids: Vec<String>,
    pub ok: bool,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub repaired: Vec<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub dedup_sql: Vec<String>,
}

/// What the audit needs from the sink's settings.
pub struct Setup<'a> {
    pub kafka: ClientConfig,
    pub topic: &'a str,
    pub dlq_topic: &'a str,
    pub parking_topic: &'a str,
    pub group_id: &'a str,
    pub catalogue: &'a Catalogue,
    pub rest: Arc<Rest>,
}

/// Terminal progress on stderr; quiet when stderr is not a terminal.
struct Progress {
    on: bool,
    last: Instant,
}

impl Progress {
    fn new() -> Self {
        Self {
            on: std::io::stderr().is_terminal(),
            last: Instant::now(),
        }
    }

    fn show(&mut self, records: u64, days: usize, force: bool) {
        if self.on && (force || self.last.elapsed() > Duration::from_millis(200)) {
            self.last = Instant::now();
            eprint!("\r{records} records scanned, {days} day(s) checked ");
            let _ = std::io::stderr().flush();
        }
    }

    fn done(&self) {
        if self.on {
            eprintln!();
        }
    }
}

impl AuditArgs {
    /// The window `[since, until)` in Unix ms.
    pub fn window(&self, now_ms: i64) -> Result<(i64, i64), String> {
        let (since, until) = match (&self.day, self.since, self.until) {
            (Some(day), _, _) => {
                let today = chrono::DateTime::from_timestamp_millis(now_ms)
                    .ok_or("clock out of range")?
                    .date_naive();
                let date = match day.as_str() {
                    "today" => today,
                    "yesterday" => today.pred_opt().ok_or("date out of range")?,
                    other => other.parse::<NaiveDate>().map_err(|e| {
                        format!("--day `{other}` is not yesterday, today or YYYY-MM-DD: {e}")
                    })?,
                };
                let start = date
                    .and_hms_opt(0, 0, 0)
                    .ok_or("date out of range")?
                    .and_utc()
                    .timestamp_millis();
                (start, start + 86_400_000)
            }
            (None, Some(since), Some(until)) => (since, until),
            _ => return Err("give --since and --until, or --day".into()),
        };
        if until <= since {
            return Err("--until must be after --since".into());
        }
        Ok((since, until))
    }
}

/// Runs the audit; `Err` when it could not run (exit 2).
pub async fn run(setup: &Setup<'_>, args: &AuditArgs) -> Result<Report, String> {
    let (since, until) = args.window(hookpipe_common::now_ms())?;
    let wanted: HashSet<Uuid> = args.streams.iter().copied().collect();
    let selected = |s: &Uuid| wanted.is_empty() || wanted.contains(s);
    let consumer = Arc::new(audit_consumer(setup)?);
    let (dead, parked) = {
        let (consumer, dlq, parking) = (
            consumer.clone(),
            setup.dlq_topic.to_owned(),
            setup.parking_topic.to_owned(),
        );
        tokio::task::spawn_blocking(move || -> Result<_, String> {
            Ok((
                read_dead_letters(&consumer, &dlq, since, until)?,
                read_parked(&consumer, &parking, since, until)?,
            ))
        })
        .await
        .map_err(|e| e.to_string())??
    };

    let mut report = Report {
        topic: setup.topic.to_owned(),
        since: instant(since),
        until: instant(until),
        ..Report::default()
    };
    let mut days: BTreeMap<(String, String, NaiveDate), DayReport> = BTreeMap::new();
    let mut missing: Vec<(Uuid, i32, i64)> = Vec::new();
    let mut duplicated: BTreeMap<(String, NaiveDate), Vec<Uuid>> = BTreeMap::new();
    let mut progress = Progress::new();
    let mut scan_mode = None;
    let mut slice_start = since;
    while slice_start < until {
        let slice_end = (slice_start + SLICE_MS).min(until);
        let (hits, records, mode) = {
            let (consumer, topic) = (consumer.clone(), setup.topic.to_owned());
            let (wanted, catalogue) = (wanted.clone(), setup.catalogue.clone());
            tokio::task::spawn_blocking(move || {
                scan_slice(
                    &consumer,
                    &topic,
                    slice_start,
                    slice_end,
                    &wanted,
                    &catalogue,
                )
            })
            .await
            .map_err(|e| e.to_string())??
        };
        scan_mode.get_or_insert(mode);
        report.records_scanned += records;

        // The tables to ask: those the hits went to, and every selected catalogue stream's
        // (rows there with no record in Kafka are reported too), each with its zones.
        let mut tables: BTreeMap<String, (TableRef, Vec<Zone>, BTreeSet<Uuid>)> = BTreeMap::new();
        for stream in setup.catalogue.streams().filter(|s| selected(&s.id)) {
            let entry = tables
                .entry(stream.table.to_string())
                .or_insert_with(|| (stream.table.clone(), Vec::new(), BTreeSet::new()));
            if !entry.1.contains(&stream.zone) {
                entry.1.push(stream.zone);
            }
            entry.2.insert(stream.id);
        }
        let mut by_table: HashMap<String, Vec<(Uuid, &Seen)>> = HashMap::new();
        for (hit, seen) in &hits {
            by_table
                .entry(seen.table.to_string())
                .or_default()
                .push((*hit, seen));
            let entry = tables
                .entry(seen.table.to_string())
                .or_insert_with(|| (seen.table.clone(), Vec::new(), BTreeSet::new()));
            entry.2.insert(seen.stream);
        }
        for (name, (table, zones, streams)) in &tables {
            let seen = by_table.remove(name).unwrap_or_default();
            let mut dates: BTreeSet<NaiveDate> = seen.iter().map(|(_, s)| s.date).collect();
            for zone in zones {
                dates.extend(zone.date_of(slice_start));
                dates.extend(zone.date_of(slice_end - 1));
            }
            let counts = row_counts(&setup.rest, table, &dates, &seen).await?;
            let mut matched_by_date: BTreeMap<NaiveDate, u64> = BTreeMap::new();
            for (hit, s) in &seen {
                let line = days
                    .entry((s.stream.to_string(), name.clone(), s.date))
                    .or_insert_with(|| day_line(&s.stream.to_string(), name, s.date));
                line.accepted += 1;
                let n = counts.get(hit).copied().unwrap_or(0);
                line.rows += n;
                *matched_by_date.entry(s.date).or_default() += n;
                if n > 1 {
                    line.duplicated += 1;
                    duplicated
                        .entry((name.clone(), s.date))
                        .or_default()
                        .push(*hit);
                } else if n == 0 {
                    if let Some(reason) = dead.get(hit) {
                        *line.dead_lettered.entry(reason.clone()).or_default() += 1;
                    } else if parked.contains(hit) {
                        line.parked += 1;
                    } else {
                        line.missing += 1;
                        missing.push((*hit, s.partition, s.offset));
                    }
                }
            }
            // Rows of the window that no record of the slice accounts for.
            let totals = window_totals(&setup.rest, table, &dates, slice_start, slice_end).await?;
            let owner = match streams.len() {
                1 => streams
                    .iter()
                    .next()
                    .map(Uuid::to_string)
                    .unwrap_or_default(),
                _ => "(shared table)".to_owned(),
            };
            for (date, total) in totals {
                let matched = matched_by_date.get(&date).copied().unwrap_or(0);
                if total > matched {
                    let line = days
                        .entry((owner.clone(), name.clone(), date))
                        .or_insert_with(|| day_line(&owner, name, date));
                    line.not_in_kafka += total - matched;
                }
            }
        }
        progress.show(report.records_scanned, days.len(), true);
        slice_start = slice_end;
    }
    progress.done();
    report.scan = scan_mode.unwrap_or("offsets-for-time").to_owned();
    report.days = days.into_values().collect();
    report.ok = missing.is_empty() && duplicated.is_empty();
    report.missing_hit_ids = missing
        .iter()
        .take(LIST_MAX)
        .map(|(h, _, _)| h.to_string())
        .collect();
    report.duplicated_hit_ids = duplicated
        .values()
        .flatten()
        .take(LIST_MAX)
        .map(Uuid::to_string)
        .collect();
    if args.repair {
        if !missing.is_empty() {
            let put_back = repair_missing(setup, &consumer, &missing).await?;
            report.repaired = put_back.iter().map(Uuid::to_string).collect();
        }
        report.dedup_sql = duplicated
            .iter()
            .map(|((table, date), hits)| dedup_sql(table, *date, hits))
            .collect();
    }
    Ok(report)
}

fn day_line(stream: &str, table: &str, date: NaiveDate) -> DayReport {
    DayReport {
        stream: stream.to_owned(),
        table: table.to_owned(),
        day: date.to_string(),
        ..DayReport::default()
    }
}

fn instant(ms: i64) -> String {
    chrono::DateTime::from_timestamp_millis(ms)
        .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true))
        .unwrap_or_default()
}

/// The audit's consumer callbacks: the end of a partition (which the audit asks to be told) is
/// not an error worth a log line; configuration problems are reported once, as by the services.
#[derive(Default)]
pub struct AuditContext {
    health: hookpipe_common::kafka::ClientHealth,
}

impl rdkafka::ClientContext for AuditContext {
    fn error(&self, error: rdkafka::error::KafkaError, reason: &str) {
        if !matches!(error, rdkafka::error::KafkaError::PartitionEOF(_))
            && error.rdkafka_error_code() != Some(rdkafka::types::RDKafkaErrorCode::PartitionEOF)
        {
            self.health.on_error(&error, reason);
        }
    }

    fn log(&self, level: rdkafka::config::RDKafkaLogLevel, fac: &str, log_message: &str) {
        self.health.on_log(level, fac, log_message);
    }
}

impl rdkafka::consumer::ConsumerContext for AuditContext {}

type AuditConsumer = BaseConsumer<AuditContext>;

fn audit_consumer(setup: &Setup<'_>) -> Result<AuditConsumer, String> {
    let mut config = setup.kafka.clone();
    config
        // Never committed: the audit reads, it does not move anyone's cursor.
        .set("group.id", format!("{}.audit", setup.group_id))
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("enable.partition.eof", "true")
        .set("auto.offset.reset", "earliest");
    config
        .create_with_context(AuditContext::default())
        .map_err(|e| format!("Kafka consumer: {e}"))
}

const KAFKA_TIMEOUT: Duration = Duration::from_secs(10);

/// Every partition of a topic with its low and high watermarks.
fn partitions(consumer: &AuditConsumer, topic: &str) -> Result<Vec<(i32, i64, i64)>, String> {
    let metadata = consumer
        .fetch_metadata(Some(topic), KAFKA_TIMEOUT)
        .map_err(|e| format!("metadata of {topic}: {e}"))?;
    let t = metadata
        .topics()
        .first()
        .filter(|t| t.error().is_none())
        .ok_or_else(|| format!("topic {topic} does not exist"))?;
    t.partitions()
        .iter()
        .map(|p| {
            let (low, high) = consumer
                .fetch_watermarks(topic, p.id(), KAFKA_TIMEOUT)
                .map_err(|e| format!("watermarks of {topic}/{}: {e}", p.id()))?;
            Ok((p.id(), low, high))
        })
        .collect()
}

/// Reads `topic` from the given offsets to its high watermarks, handing each record to `each`
/// (which returns `false` to stop reading that partition).
fn read_range(
    consumer: &AuditConsumer,
    topic: &str,
    starts: &[(i32, i64, i64)],
    mut each: impl FnMut(i32, i64, Option<i64>, &[u8]) -> bool,
) -> Result<u64, String> {
    let mut open: HashMap<i32, i64> = HashMap::new();
    let mut list = TopicPartitionList::new();
    for (partition, start, high) in starts {
        if start < high {
            list.add_partition_offset(topic, *partition, Offset::Offset(*start))
                .map_err(|e| e.to_string())?;
            open.insert(*partition, *high);
        }
    }
    if open.is_empty() {
        return Ok(0);
    }
    consumer.assign(&list).map_err(|e| format!("assign: {e}"))?;
    let mut records = 0;
    let mut quiet_since = Instant::now();
    while !open.is_empty() {
        match consumer.poll(Duration::from_millis(500)) {
            Some(Ok(message)) => {
                quiet_since = Instant::now();
                let partition = message.partition();
                let Some(high) = open.get(&partition).copied() else {
                    continue;
                };
                records += 1;
                let keep = each(
                    partition,
                    message.offset(),
                    message.timestamp().to_millis(),
                    message.payload().unwrap_or_default(),
                );
                if !keep || message.offset() + 1 >= high {
                    open.remove(&partition);
                }
            }
            Some(Err(rdkafka::error::KafkaError::PartitionEOF(partition))) => {
                open.remove(&partition);
            }
            Some(Err(error)) => return Err(format!("reading {topic}: {error}")),
            None if quiet_since.elapsed() > Duration::from_secs(60) => {
                return Err(format!("reading {topic}: no record for 60 s"));
            }
            None => {}
        }
    }
    let _ = consumer.unassign();
    Ok(records)
}

/// One slice of the main topic: the hits received in `[since, until)`, each with where it is.
fn scan_slice(
    consumer: &AuditConsumer,
    topic: &str,
    since: i64,
    until: i64,
    wanted: &HashSet<Uuid>,
    catalogue: &Catalogue,
) -> Result<(HashMap<Uuid, Seen>, u64, &'static str), String> {
    let parts = partitions(consumer, topic)?;
    // Offset-for-time look-ups: the first record stamped at or after the slice's start.
    let mut query = TopicPartitionList::new();
    for (partition, _, _) in &parts {
        query
            .add_partition_offset(
                topic,
                *partition,
                Offset::Offset(since - TIMESTAMP_SLACK_MS),
            )
            .map_err(|e| e.to_string())?;
    }
    let (starts, mode) = match consumer.offsets_for_times(query, KAFKA_TIMEOUT) {
        Ok(found) => {
            let starts = parts
                .iter()
                .map(|(p, low, high)| {
                    let at = match found.find_partition(topic, *p).map(|e| e.offset()) {
                        Some(Offset::Offset(o)) => o.max(*low),
                        // No record at or after that time.
                        _ => *high,
                    };
                    (*p, at, *high)
                })
                .collect::<Vec<_>>();
            (starts, "offsets-for-time")
        }
        Err(error) => {
            tracing::warn!(%error, "the broker does not answer offset-for-time look-ups; reading from the earliest offsets");
            (parts.clone(), "from-earliest")
        }
    };
    let mut hits = HashMap::new();
    let records = read_range(consumer, topic, &starts, |partition, offset, ts, value| {
        // Past the slice by more than the slack: later records belong to later slices.
        if ts.is_some_and(|ts| ts >= until + TIMESTAMP_SLACK_MS) {
            return false;
        }
        let Some(seen) = locate(value, catalogue) else {
            // Not an envelope, or one whose table cannot be known: the dead-letter topic
            // accounts for it (undecodable).
            return true;
        };
        let (hit, stream, received, table, date) = seen;
        if received < since || received >= until {
            return true;
        }
        if !wanted.is_empty() && !wanted.contains(&stream) {
            return true;
        }
        // The first copy of a hit (a keyed retry is the same hit_id) stands for it.
        hits.entry(hit).or_insert(Seen {
            stream,
            table,
            date,
            partition,
            offset,
        });
        true
    })?;
    Ok((hits, records, mode))
}

/// Where an envelope's hit belongs: hit_id, stream, received_at, table and receipt day, from
/// the envelope's own table and zone (or the catalogue's, for envelopes without them). Unlike
/// the sink's placing, a payload the sink refuses (not UTF-8) still counts as accepted: the
/// audit reports it as dead-lettered, not as missing.
fn locate(value: &[u8], catalogue: &Catalogue) -> Option<(Uuid, Uuid, i64, TableRef, NaiveDate)> {
    let envelope = Envelope::decode(value).ok()?;
    let hit = Uuid::try_parse(&envelope.hit_id).ok()?;
    let stream = Uuid::try_parse(&envelope.stream_id).ok()?;
    let (table, zone): (TableRef, Zone) =
        if envelope.table.is_empty() || envelope.timezone.is_empty() {
            let s = catalogue.get(&stream)?;
            (s.table.clone(), s.zone)
        } else {
            (
                envelope.table.parse().ok()?,
                envelope.timezone.parse().ok()?,
            )
        };
    let date = zone.date_of(envelope.received_at_ms)?;
    Some((hit, stream, envelope.received_at_ms, table, date))
}

/// Dead letters of hits received in the window: hit_id → reason.
fn read_dead_letters(
    consumer: &AuditConsumer,
    topic: &str,
    since: i64,
    until: i64,
) -> Result<HashMap<Uuid, String>, String> {
    let parts = partitions(consumer, topic)?;
    let mut dead = HashMap::new();
    read_range(consumer, topic, &parts, |_, _, _, value| {
        if let Ok(letter) = DeadLetter::decode(value)
            && (since..until).contains(&letter.received_at_ms)
            && let Ok(envelope) = Envelope::decode(letter.original.as_slice())
            && let Ok(hit) = Uuid::try_parse(&envelope.hit_id)
        {
            dead.insert(hit, letter.reason);
        }
        true
    })?;
    Ok(dead)
}

/// Hits received in the window that were parked (their table kept failing).
fn read_parked(
    consumer: &AuditConsumer,
    topic: &str,
    since: i64,
    until: i64,
) -> Result<HashSet<Uuid>, String> {
    let parts = partitions(consumer, topic)?;
    let mut parked = HashSet::new();
    read_range(consumer, topic, &parts, |_, _, _, value| {
        if let Ok(record) = Parked::decode(value)
            && (since..until).contains(&record.received_at_ms)
            && let Ok(envelope) = Envelope::decode(record.original.as_slice())
            && let Ok(hit) = Uuid::try_parse(&envelope.hit_id)
        {
            parked.insert(hit);
        }
        true
    })?;
    Ok(parked)
}

fn dates_param(dates: &BTreeSet<NaiveDate>) -> Param {
    Param::Array("DATE", dates.iter().map(NaiveDate::to_string).collect())
}

fn is_not_found(error: &str) -> bool {
    error.contains("Not found") || error.contains("not found") || error.contains("404")
}

/// How many rows each hit has in `table`, in batches, pruned to the dates concerned.
async fn row_counts(
    rest: &Rest,
    table: &TableRef,
    dates: &BTreeSet<NaiveDate>,
    seen: &[(Uuid, &Seen)],
) -> Result<HashMap<Uuid, u64>, String> {
    let mut counts = HashMap::new();
    let sql = format!(
        "SELECT hit_id, COUNT(*) FROM `{table}` WHERE date IN UNNEST(@dates) AND hit_id IN UNNEST(@ids) GROUP BY hit_id"
    );
    for batch in seen.chunks(BATCH) {
        let ids = batch.iter().map(|(h, _)| h.to_string()).collect();
        let rows = match rest
            .query_rows(
                &table.project,
                &sql,
                &[
                    ("dates", dates_param(dates)),
                    ("ids", Param::Array("STRING", ids)),
                ],
            )
            .await
        {
            Ok(rows) => rows,
            // A table that does not exist holds no rows.
            Err(e) if is_not_found(&e) => return Ok(HashMap::new()),
            Err(e) => return Err(format!("{table}: {e}")),
        };
        for row in rows {
            if let (Some(Some(hit)), Some(Some(n))) = (row.first(), row.get(1))
                && let (Ok(hit), Ok(n)) = (Uuid::try_parse(hit), n.parse::<u64>())
            {
                counts.insert(hit, n);
            }
        }
    }
    Ok(counts)
}

/// Rows of `table` received in `[since, until)`, by date.
async fn window_totals(
    rest: &Rest,
    table: &TableRef,
    dates: &BTreeSet<NaiveDate>,
    since: i64,
    until: i64,
) -> Result<BTreeMap<NaiveDate, u64>, String> {
    let sql = format!(
        "SELECT date, COUNT(*) FROM `{table}` WHERE date IN UNNEST(@dates) AND received_at >= @since AND received_at < @until GROUP BY date"
    );
    let rows = match rest
        .query_rows(
            &table.project,
            &sql,
            &[
                ("dates", dates_param(dates)),
                ("since", Param::Scalar("INT64", since.to_string())),
                ("until", Param::Scalar("INT64", until.to_string())),
            ],
        )
        .await
    {
        Ok(rows) => rows,
        Err(e) if is_not_found(&e) => return Ok(BTreeMap::new()),
        Err(e) => return Err(format!("{table}: {e}")),
    };
    Ok(rows
        .into_iter()
        .filter_map(|row| {
            let date = row.first()?.as_deref()?.parse().ok()?;
            let n = row.get(1)?.as_deref()?.parse().ok()?;
            Some((date, n))
        })
        .collect())
}

/// A record to put back: key, envelope flagged as replayed, hit_id.
type PutBack = (Vec<u8>, Vec<u8>, Uuid);

/// Puts missing hits back on the main topic: each record read again from where the scan saw
/// it, flagged as replayed (the sink looks it up before writing) and sent with its key.
async fn repair_missing(
    setup: &Setup<'_>,
    consumer: &Arc<AuditConsumer>,
    missing: &[(Uuid, i32, i64)],
) -> Result<Vec<Uuid>, String> {
    let records = {
        let (consumer, topic) = (consumer.clone(), setup.topic.to_owned());
        let missing = missing.to_vec();
        tokio::task::spawn_blocking(move || -> Result<Vec<PutBack>, String> {
            let mut out = Vec::new();
            for (hit, partition, offset) in missing {
                let mut list = TopicPartitionList::new();
                list.add_partition_offset(&topic, partition, Offset::Offset(offset))
                    .map_err(|e| e.to_string())?;
                consumer.assign(&list).map_err(|e| e.to_string())?;
                let deadline = Instant::now() + Duration::from_secs(30);
                loop {
                    match consumer.poll(Duration::from_millis(500)) {
                        Some(Ok(m)) if m.partition() == partition && m.offset() == offset => {
                            let mut envelope = Envelope::decode(m.payload().unwrap_or_default())
                                .map_err(|e| e.to_string())?;
                            envelope.replayed = true;
                            out.push((
                                m.key().unwrap_or_default().to_vec(),
                                envelope.encode_to_vec(),
                                hit,
                            ));
                            break;
                        }
                        _ if Instant::now() > deadline => {
                            return Err(format!("record {topic}/{partition}@{offset} not read"));
                        }
                        _ => {}
                    }
                }
            }
            let _ = consumer.unassign();
            Ok(out)
        })
        .await
        .map_err(|e| e.to_string())??
    };
    let mut config = setup.kafka.clone();
    config
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .set("message.max.bytes", "16777216");
    let producer: FutureProducer = config.create().map_err(|e| e.to_string())?;
    let sends = records.iter().map(|(key, value, _)| {
        producer.send(
            FutureRecord::to(setup.topic).key(key).payload(value),
            Duration::from_secs(30),
        )
    });
    for outcome in futures_util::future::join_all(sends).await {
        outcome.map_err(|(e, _)| format!("putting a hit back: {e}"))?;
    }
    Ok(records.into_iter().map(|(_, _, hit)| hit).collect())
}

/// SQL that keeps one row of each duplicated hit of one day (printed, not run: BigQuery may
/// refuse DML on rows streamed in the last minutes; run it once they are older).
pub fn dedup_sql(table: &str, date: NaiveDate, hits: &[Uuid]) -> String {
    let ids = hits
        .iter()
        .map(|h| format!("'{h}'"))
        .collect::<Vec<_>>()
        .join(", ");
    format!(
        "-- {table}, {date}: {n} hit_id(s) with more than one row; keeps the first row of each\n\
         MERGE `{table}` AS t\n\
         USING (\n  SELECT * FROM `{table}`\n  WHERE date = DATE '{date}' AND hit_id IN ({ids})\n  \
         QUALIFY ROW_NUMBER() OVER (PARTITION BY hit_id ORDER BY received_at) = 1\n) AS keep\n\
         ON FALSE\n\
         WHEN NOT MATCHED BY SOURCE AND t.date = DATE '{date}' AND t.hit_id IN ({ids}) THEN DELETE\n\
         WHEN NOT MATCHED BY TARGET THEN INSERT ROW;",
        n = hits.len()
    )
}

impl Report {
    /// The exit status: 0 nothing missing or duplicated, 1 otherwise.
    pub fn exit_code(&self) -> u8 {
        if self.ok { EXIT_OK } else { EXIT_FOUND }
    }

    /// The report for people.
    pub fn table(&self) -> String {
        use std::fmt::Write as _;
        let mut out = String::new();
        let _ = writeln!(
            out,
            "audit of {} from {} to {} ({} records read; main topic read {})",
            self.topic,
            self.since,
            self.until,
            self.records_scanned,
            match self.scan.as_str() {
                "from-earliest" =>
                    "from its earliest offsets: the broker does not answer offset-for-time look-ups",
                _ => "from the offsets for the window's start",
            }
        );
        let _ = writeln!(
            out,
            "{:<36}  {:<10}  {:>8}  {:>8}  {:>7}  {:>10}  {:>13}  {:>6}  {:>12}  table",
            "stream",
            "day",
            "accepted",
            "rows",
            "missing",
            "duplicated",
            "dead-lettered",
            "parked",
            "not-in-kafka"
        );
        for d in &self.days {
            let dead: u64 = d.dead_lettered.values().sum();
            let _ = writeln!(
                out,
                "{:<36}  {:<10}  {:>8}  {:>8}  {:>7}  {:>10}  {:>13}  {:>6}  {:>12}  {}",
                d.stream,
                d.day,
                d.accepted,
                d.rows,
                d.missing,
                d.duplicated,
                dead,
                d.parked,
                d.not_in_kafka,
                d.table
            );
            for (reason, n) in &d.dead_lettered {
                let _ = writeln!(out, "    dead-lettered as {reason}: {n}");
            }
        }
        let missing: u64 = self.days.iter().map(|d| d.missing).sum();
        let duplicated: u64 = self.days.iter().map(|d| d.duplicated).sum();
        if self.ok {
            let _ = writeln!(out, "OK: nothing missing, nothing duplicated");
        } else {
            let _ = writeln!(
                out,
                "PROBLEM: {missing} missing, {duplicated} duplicated (hit_ids with --format json)"
            );
        }
        if !self.repaired.is_empty() {
            let _ = writeln!(
                out,
                "put {} missing hit(s) back on {}; run the audit again once the sink caught up",
                self.repaired.len(),
                self.topic
            );
        }
        for sql in &self.dedup_sql {
            let _ = writeln!(out, "\n{sql}");
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_dedup_sql_keeps_one_row_per_hit_and_touches_only_that_day() {
        let hit: Uuid = "0190f3e4-7c1a-7000-8000-000000000001".parse().unwrap();
        let sql = dedup_sql(
            "p.d.t",
            NaiveDate::from_ymd_opt(2026, 11, 27).unwrap(),
            &[hit],
        );
        assert!(sql.contains("MERGE `p.d.t` AS t"));
        assert!(sql.contains("ROW_NUMBER() OVER (PARTITION BY hit_id ORDER BY received_at) = 1"));
        assert_eq!(sql.matches("DATE '2026-11-27'").count(), 2);
        assert_eq!(sql.matches(&format!("'{hit}'")).count(), 2);
    }

    #[test]
    fn a_day_is_one_utc_day_and_windows_must_be_ordered() {
        let now = 1_795_808_199_561; // 2026-11-27T...Z
        let day = |d: &str| AuditArgs {
            since: None,
            until: None,
            day: Some(d.into()),
            streams: vec![],
            format: "table".into(),
            repair: false,
        };
        let (since, until) = day("yesterday").window(now).unwrap();
        assert_eq!(instant(since), "2026-11-26T00:00:00.000Z");
        assert_eq!(until - since, 86_400_000);
        assert_eq!(
            instant(day("2026-01-02").window(now).unwrap().0),
            "2026-01-02T00:00:00.000Z"
        );
        assert!(day("last week").window(now).is_err());
        let backwards = AuditArgs {
            since: Some(2),
            until: Some(1),
            day: None,
            ..day("x")
        };
        assert!(backwards.window(now).is_err());
    }

    #[test]
    fn the_verdict_and_exit_status_follow_missing_and_duplicated() {
        let mut report = Report {
            ok: true,
            ..Report::default()
        };
        assert_eq!(report.exit_code(), EXIT_OK);
        assert!(report.table().contains("OK: nothing missing"));
        report.ok = false;
        report.days.push(DayReport {
            missing: 2,
            duplicated: 1,
            ..DayReport::default()
        });
        assert_eq!(report.exit_code(), EXIT_FOUND);
        assert!(report.table().contains("PROBLEM: 2 missing, 1 duplicated"));
    }
}
