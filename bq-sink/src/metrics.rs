//! Every metric the sink exports, defined once. The `stream` label only takes stream ids the
//! gateway resolved from its catalogue (carried in the envelope) or the sink's catalogue;
//! `table` labels are those streams' tables.

use hookpipe_common::TableRef;
use hookpipe_common::admin::register;
use prometheus::{
    Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry,
};
use uuid::Uuid;

use crate::row::Poison;
use crate::warehouse::WRITE_ERROR_KINDS;

pub struct Metrics {
    pub registry: Registry,
    pub consumed: IntCounter,
    rows_written: IntCounterVec,
    pub duplicates_skipped: IntCounter,
    pub lookups: IntCounter,
    pub lookup_skipped: IntCounter,
    pub ambiguous_writes: IntCounter,
    pub already_exists: IntCounter,
    pub appends_settled: IntCounter,
    pub storage_streams_created: IntCounter,
    pub storage_connections: IntGauge,
    pub streams_released: IntCounter,
    pub batch_rows: Histogram,
    pub batch_bytes: Histogram,
    flushes: IntCounterVec,
    pub write_duration: Histogram,
    write_errors: IntCounterVec,
    pub retries: IntCounter,
    dead_letters: IntCounterVec,
    pub dead_letters_truncated: IntCounter,
    rows_parked: IntCounterVec,
    rows_unparked: IntCounterVec,
    tables_parked: IntGaugeVec,
    parked_rows: IntGaugeVec,
    parked_oldest: IntGaugeVec,
    pub buffered_rows: IntGauge,
    pub buffered_bytes: IntGauge,
    pub consumer_lag: IntGaugeVec,
    pub end_to_end: Histogram,
    pub commits: IntCounterVec,
    catalogue_reloads: IntCounterVec,
    pub paused: IntGauge,
    pub group_rejoins: IntCounter,
    pub owned_partitions: IntGauge,
    pub assignments_lost: IntCounter,
    pub orphaned_partitions: IntGauge,
    newest_row: IntGaugeVec,
    last_write: IntGaugeVec,
    /// Tables the parked gauges were ever set for (to zero them when drained).
    parked_tables: std::sync::Mutex<std::collections::HashSet<String>>,
}

/// Values of `bq_sink_flushes_total{trigger}`.
pub const FLUSH_TRIGGERS: [&str; 4] = ["rows", "bytes", "age", "shutdown"];

impl Metrics {
    #[allow(clippy::expect_used)] // fixed, valid metric definitions
    pub fn new() -> Self {
        let r = Registry::new();
        let counter = |name: &str, help: &str| {
            register(&r, IntCounter::new(name, help).expect("valid metric"))
        };
        let counter_vec = |name: &str, help: &str, labels: &[&str]| {
            register(
                &r,
                IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric"),
            )
        };
        let gauge =
            |name: &str, help: &str| register(&r, IntGauge::new(name, help).expect("valid metric"));
        let gauge_vec = |name: &str, help: &str, labels: &[&str]| {
            register(
                &r,
                IntGaugeVec::new(Opts::new(name, help), labels).expect("valid metric"),
            )
        };
        let histogram = |name: &str, help: &str, buckets: Vec<f64>| {
            register(
                &r,
                Histogram::with_opts(HistogramOpts::new(name, help).buckets(buckets))
                    .expect("valid metric"),
            )
        };
        let seconds = vec![
            0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0,
        ];
        let e2e = vec![
            0.1, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0, 30.0, 60.0, 300.0, 1800.0,
        ];
        let metrics = Self {
            consumed: counter(
                "bq_sink_messages_consumed_total",
                "Records read from the main topic",
            ),
            rows_written: counter_vec(
                "bq_sink_rows_written_total",
                "Rows stored in BigQuery, by stream",
                &["stream"],
            ),
            duplicates_skipped: counter(
                "bq_sink_duplicates_skipped_total",
                "Records not written because their hit_id was already written",
            ),
            lookups: counter(
                "bq_sink_dedup_lookups_total",
                "Queries that looked suspect rows up in their table before writing",
            ),
            lookup_skipped: counter(
                "bq_sink_lookup_skipped_rows_total",
                "Suspect rows a lookup found already in the table (not written again)",
            ),
            ambiguous_writes: counter(
                "bq_sink_ambiguous_writes_total",
                "Write requests whose outcome was unknown (answer lost); their rows were looked up before being sent again",
            ),
            already_exists: counter(
                "bq_sink_append_already_exists_total",
                "Storage Write appends re-sent at their offset that BigQuery answered ALREADY_EXISTS: proof the lost append had landed",
            ),
            appends_settled: counter(
                "bq_sink_append_streams_settled_total",
                "Write streams finalized to learn from their row count which unanswered appends had landed",
            ),
            storage_streams_created: counter(
                "bq_sink_write_streams_created_total",
                "Storage Write API streams created (one per partition and table in use; again after a stream was finalized)",
            ),
            streams_released: counter(
                "bq_sink_write_streams_released_total",
                "Write streams finalized because their partition was revoked or lost (no append of this replica lands on them afterwards)",
            ),
            storage_connections: gauge(
                "bq_sink_write_stream_connections",
                "Open Storage Write API connections (one per write stream in use; idle ones are closed)",
            ),
            batch_rows: histogram(
                "bq_sink_batch_rows",
                "Rows per flushed table batch",
                vec![1.0, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0],
            ),
            batch_bytes: histogram(
                "bq_sink_batch_bytes",
                "Approximate bytes per flushed table batch",
                prometheus::exponential_buckets(1024.0, 4.0, 8).expect("valid buckets"),
            ),
            flushes: counter_vec(
                "bq_sink_flushes_total",
                "Table batches flushed, by trigger (rows, bytes, age, shutdown)",
                &["trigger"],
            ),
            write_duration: histogram(
                "bq_sink_write_duration_seconds",
                "Duration of one write request (an append or an insertAll)",
                seconds,
            ),
            write_errors: counter_vec(
                "bq_sink_write_errors_total",
                "Failed BigQuery calls, by kind",
                &["kind"],
            ),
            group_rejoins: counter(
                "bq_sink_group_rejoins_total",
                "Times the group guard rejoined the group because partitions with work had no owner",
            ),
            assignments_lost: counter(
                "bq_sink_assignments_lost_total",
                "Times the group expired this replica's session and its partitions were taken away (a broker pause, a network partition, a process frozen past the session timeout)",
            ),
            owned_partitions: gauge(
                "bq_sink_owned_partitions",
                "Partitions of the main topic this replica owns",
            ),
            orphaned_partitions: gauge(
                "bq_sink_orphaned_partitions",
                "Partitions with records waiting that no member of the group owns, as this replica judges it (from DescribeGroups, or no committed progress for the stall timeout)",
            ),
            retries: counter(
                "bq_sink_retries_total",
                "BigQuery calls retried after a failure",
            ),
            dead_letters: counter_vec(
                "bq_sink_dead_letters_total",
                "Records sent to the dead-letter topic, by reason",
                &["reason"],
            ),
            dead_letters_truncated: counter(
                "bq_sink_dead_letters_truncated_total",
                "Dead letters larger than the dead-letter topic accepts, stored truncated with the original's size and SHA-256",
            ),
            rows_parked: counter_vec(
                "bq_sink_rows_parked_total",
                "Rows put on the parking topic because their table kept failing, by table",
                &["table"],
            ),
            rows_unparked: counter_vec(
                "bq_sink_rows_unparked_total",
                "Parked rows sent back to the main topic once their table answered, by table",
                &["table"],
            ),
            tables_parked: gauge_vec(
                "bq_sink_table_parked",
                "1 while this replica parks the table's rows (the table keeps failing)",
                &["table"],
            ),
            parked_rows: gauge_vec(
                "bq_sink_parked_rows",
                "Rows waiting on the parking topic, by table (as of the last pass over it)",
                &["table"],
            ),
            parked_oldest: gauge_vec(
                "bq_sink_parked_oldest_timestamp_seconds",
                "When the oldest row waiting on the parking topic was parked, by table (Unix seconds)",
                &["table"],
            ),
            buffered_rows: gauge(
                "bq_sink_buffered_rows",
                "Records consumed and not yet written or dead-lettered",
            ),
            buffered_bytes: gauge(
                "bq_sink_buffered_bytes",
                "Bytes of the records consumed and not yet written or dead-lettered",
            ),
            consumer_lag: gauge_vec(
                "bq_sink_consumer_lag_messages",
                "Messages behind the partition's end, per assigned partition",
                &["partition"],
            ),
            end_to_end: histogram(
                "bq_sink_end_to_end_latency_seconds",
                "From receipt at the gateway (received_at) to the BigQuery write acknowledgement",
                e2e,
            ),
            commits: counter_vec(
                "bq_sink_offset_commits_total",
                "Offset commits, by outcome (ok, error, timeout)",
                &["outcome"],
            ),
            catalogue_reloads: counter_vec(
                "bq_sink_catalogue_reloads_total",
                "Catalogue reload attempts by outcome (applied, rejected)",
                &["outcome"],
            ),
            paused: gauge(
                "bq_sink_consumption_paused",
                "1 while consumption is paused because too much is buffered",
            ),
            newest_row: gauge_vec(
                "bq_sink_stream_newest_row_received_timestamp_seconds",
                "received_at of the newest row this replica wrote for the stream (Unix seconds)",
                &["stream"],
            ),
            last_write: gauge_vec(
                "bq_sink_stream_last_write_timestamp_seconds",
                "When this replica last wrote a row for the stream (Unix seconds)",
                &["stream"],
            ),
            parked_tables: Default::default(),
            registry: r,
        };
        // Every known label value starts at 0, so the first event is an increase Prometheus
        // sees (a series born at 1 has no increase, and an alert on it would never fire).
        for kind in WRITE_ERROR_KINDS {
            metrics.write_errors.with_label_values(&[kind]);
        }
        for reason in Poison::ALL {
            metrics.dead_letters.with_label_values(&[reason.as_str()]);
        }
        for trigger in FLUSH_TRIGGERS {
            metrics.flushes.with_label_values(&[trigger]);
        }
        for outcome in ["ok", "error", "timeout"] {
            metrics.commits.with_label_values(&[outcome]);
        }
        metrics
    }

    pub fn rows_written(&self, stream: &str, n: u64) {
        self.rows_written.with_label_values(&[stream]).inc_by(n);
    }

    /// A row of `stream` received at `received_at_ms` was just written.
    pub fn stream_freshness(&self, stream: Uuid, received_at_ms: i64) {
        let mut buf = Uuid::encode_buffer();
        let label: &str = stream.hyphenated().encode_lower(&mut buf);
        let newest = self.newest_row.with_label_values(&[label]);
        newest.set(newest.get().max(received_at_ms.div_euclid(1000)));
        self.last_write
            .with_label_values(&[label])
            .set(hookpipe_common::now_ms().div_euclid(1000));
    }

    pub fn flush(&self, trigger: &str) {
        self.flushes.with_label_values(&[trigger]).inc();
    }

    pub fn write_error(&self, kind: &str) {
        self.write_errors.with_label_values(&[kind]).inc();
    }

    pub fn dead_letter(&self, reason: &str) {
        self.dead_letters.with_label_values(&[reason]).inc();
    }

    pub fn catalogue_reload(&self, outcome: &str) {
        self.catalogue_reloads.with_label_values(&[outcome]).inc();
    }

    pub fn table_parked(&self, table: &TableRef, parked: bool) {
        let label = table.to_string();
        self.tables_parked
            .with_label_values(&[&label])
            .set(i64::from(parked));
        // The counters start at 0 so the first parked row is an increase an alert sees.
        self.rows_parked.with_label_values(&[&label]);
        self.rows_unparked.with_label_values(&[&label]);
    }

    pub fn rows_parked(&self, table: &str, n: u64) {
        self.rows_parked.with_label_values(&[table]).inc_by(n);
    }

    pub fn rows_unparked(&self, table: &str, n: u64) {
        self.rows_unparked.with_label_values(&[table]).inc_by(n);
    }

    /// What the last pass over the parking topic found waiting: per table, rows and the time
    /// the oldest was parked (Unix ms). Tables no longer waiting are set to 0.
    pub fn parked_waiting(&self, waiting: &std::collections::HashMap<String, (i64, i64)>) {
        let mut exported = match self.parked_tables.lock() {
            Ok(guard) => guard,
            Err(poisoned) => poisoned.into_inner(),
        };
        for table in exported.iter() {
            if !waiting.contains_key(table) {
                self.parked_rows.with_label_values(&[table]).set(0);
                let _ = self.parked_oldest.remove_label_values(&[table]);
            }
        }
        exported.extend(waiting.keys().cloned());
        for (table, (rows, oldest_ms)) in waiting {
            self.parked_rows.with_label_values(&[table]).set(*rows);
            self.parked_oldest
                .with_label_values(&[table])
                .set(oldest_ms.div_euclid(1000));
        }
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_and_dead_letter_series_exist_at_zero_from_the_start() {
        let metrics = Metrics::new();
        let text = prometheus::TextEncoder::new()
            .encode_to_string(&metrics.registry.gather())
            .unwrap();
        for reason in Poison::ALL {
            let reason = reason.as_str();
            assert!(
                text.contains(&format!(
                    "bq_sink_dead_letters_total{{reason=\"{reason}\"}} 0"
                )),
                "{reason}"
            );
        }
        for kind in WRITE_ERROR_KINDS {
            assert!(
                text.contains(&format!("bq_sink_write_errors_total{{kind=\"{kind}\"}} 0")),
                "{kind}"
            );
        }
    }

    #[test]
    fn parked_gauges_follow_the_last_pass() {
        let metrics = Metrics::new();
        let mut waiting = std::collections::HashMap::new();
        waiting.insert("p.d.a".to_owned(), (5, 1_700_000_000_000));
        metrics.parked_waiting(&waiting);
        assert_eq!(metrics.parked_rows.with_label_values(&["p.d.a"]).get(), 5);
        assert_eq!(
            metrics.parked_oldest.with_label_values(&["p.d.a"]).get(),
            1_700_000_000
        );
        metrics.parked_waiting(&std::collections::HashMap::new());
        assert_eq!(metrics.parked_rows.with_label_values(&["p.d.a"]).get(), 0);
    }
}
