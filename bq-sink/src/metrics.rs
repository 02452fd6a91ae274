//! Every metric the sink exports, defined once. The `stream` label only takes ids from the
//! catalogue; `table` labels are catalogue tables.

use hookpipe_common::admin::register;
use prometheus::{
    Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry,
};

pub struct Metrics {
    pub registry: Registry,
    pub consumed: IntCounter,
    rows_written: IntCounterVec,
    pub duplicates_skipped: IntCounter,
    pub batch_rows: Histogram,
    pub batch_bytes: Histogram,
    flushes: IntCounterVec,
    pub write_duration: Histogram,
    write_errors: IntCounterVec,
    pub retries: IntCounter,
    dead_letters: IntCounterVec,
    pub buffered_rows: IntGauge,
    pub consumer_lag: IntGaugeVec,
    pub end_to_end: Histogram,
    pub commits: IntCounterVec,
    catalogue_reloads: IntCounterVec,
    pub paused: IntGauge,
    pub group_rejoins: IntCounter,
}

/// Values of `bq_sink_write_errors_total{kind}`.
pub const WRITE_ERROR_KINDS: [&str; 7] = [
    "transient",
    "server_error",
    "rows_rejected",
    "request_rejected",
    "schema_mismatch",
    "table_missing",
    "dedup_lookup",
];

/// Values of `bq_sink_dead_letters_total{reason}` (the `Poison` reasons).
pub const DEAD_LETTER_REASONS: [&str; 5] = [
    "undecodable",
    "unknown_stream",
    "invalid_payload",
    "rejected_by_bigquery",
    "schema_mismatch",
];

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
            0.1, 0.25, 0.5, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0, 30.0, 60.0, 300.0, 1800.0,
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
                "Duration of one insertAll request",
                seconds,
            ),
            write_errors: counter_vec(
                "bq_sink_write_errors_total",
                "Failed BigQuery calls, by kind",
                &["kind"],
            ),
            group_rejoins: counter(
                "bq_sink_group_rejoins_total",
                "Times the stall guard rejoined the group because partitions had no active owner",
            ),
            retries: counter(
                "bq_sink_retries_total",
                "BigQuery writes retried after a transient failure",
            ),
            dead_letters: counter_vec(
                "bq_sink_dead_letters_total",
                "Records sent to the dead-letter topic, by reason",
                &["reason"],
            ),
            buffered_rows: register(
                &r,
                IntGauge::new(
                    "bq_sink_buffered_rows",
                    "Records consumed and not yet written or dead-lettered",
                )
                .expect("valid metric"),
            ),
            consumer_lag: register(
                &r,
                IntGaugeVec::new(
                    Opts::new(
                        "bq_sink_consumer_lag_messages",
                        "Messages behind the partition's end, per assigned partition",
                    ),
                    &["partition"],
                )
                .expect("valid metric"),
            ),
            end_to_end: histogram(
                "bq_sink_end_to_end_latency_seconds",
                "From receipt at the gateway (received_at) to the BigQuery write acknowledgement",
                e2e,
            ),
            commits: counter_vec(
                "bq_sink_offset_commits_total",
                "Offset commits, by outcome (ok, error)",
                &["outcome"],
            ),
            catalogue_reloads: counter_vec(
                "bq_sink_catalogue_reloads_total",
                "Catalogue reload attempts by outcome (applied, rejected)",
                &["outcome"],
            ),
            paused: register(
                &r,
                IntGauge::new(
                    "bq_sink_consumption_paused",
                    "1 while consumption is paused because too much is buffered",
                )
                .expect("valid metric"),
            ),
            registry: r,
        };
        // Every known label value starts at 0, so the first event is an increase Prometheus
        // sees (a series born at 1 has no increase, and an alert on it would never fire).
        for kind in WRITE_ERROR_KINDS {
            metrics.write_errors.with_label_values(&[kind]);
        }
        for reason in DEAD_LETTER_REASONS {
            metrics.dead_letters.with_label_values(&[reason]);
        }
        for trigger in ["rows", "bytes", "age", "shutdown"] {
            metrics.flushes.with_label_values(&[trigger]);
        }
        metrics
    }

    pub fn rows_written(&self, stream: &str, n: u64) {
        self.rows_written.with_label_values(&[stream]).inc_by(n);
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
        let text = String::from_utf8(
            prometheus::TextEncoder::new()
                .encode_to_string(&metrics.registry.gather())
                .unwrap()
                .into_bytes(),
        )
        .unwrap();
        for reason in DEAD_LETTER_REASONS {
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
}
