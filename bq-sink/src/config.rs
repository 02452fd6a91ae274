//! The sink's configuration: command-line flags, each with an environment variable, with
//! defaults that match the local set-up in DESIGN.md.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use hookpipe_common::kafka::KafkaArgs;
use hookpipe_common::parse_duration;

/// bq-sink: consumes webhook envelopes from Kafka and writes them to each stream's BigQuery
/// table in micro-batches, committing offsets only after the rows are written.
#[derive(clap::Parser, Clone, Debug)]
#[command(version, about)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,

    #[command(flatten)]
    pub config: Config,
}

#[derive(clap::Subcommand, Clone, Debug)]
pub enum Command {
    /// Put dead letters back on the main topic (after fixing their cause), filtered by
    /// stream, reason and receipt time. Uses the same Kafka settings and topics as the sink.
    ReplayDlq(crate::replay::ReplayArgs),
    /// Prove, per stream and receipt day, that every hit Kafka accepted in a window is in
    /// BigQuery exactly once. Exit 0: nothing missing or duplicated; 1: something is; 2: the
    /// audit could not run.
    Audit(crate::audit::AuditArgs),
}

/// The sink's settings.
#[derive(clap::Args, Clone, Debug)]
pub struct Config {
    /// Address for `/healthz`, `/readyz` and `/metrics`.
    #[arg(long, env = "HOOKPIPE_ADMIN_LISTEN", default_value = "127.0.0.1:9102")]
    pub admin_listen: SocketAddr,

    /// The stream catalogue (YAML), required to run the sink. Reloaded when its content
    /// changes.
    #[arg(long, env = "HOOKPIPE_CATALOGUE")]
    pub catalogue: Option<PathBuf>,

    /// How often the catalogue file is checked for changes.
    #[arg(long, env = "HOOKPIPE_CATALOGUE_RELOAD_INTERVAL", default_value = "5s", value_parser = parse_duration)]
    pub catalogue_reload_interval: Duration,

    /// Kafka consumer group; every sink replica uses the same one.
    #[arg(long, env = "HOOKPIPE_GROUP_ID", default_value = "bq-sink")]
    pub group_id: String,

    /// How long the group waits for a sink that stopped heartbeating (crashed, partitioned)
    /// before giving its partitions to the others (librdkafka `session.timeout.ms`; the
    /// broker's group.min/max.session.timeout.ms bound it).
    #[arg(long, env = "HOOKPIPE_SESSION_TIMEOUT", default_value = "10s", value_parser = parse_duration)]
    pub session_timeout: Duration,

    /// How partitions are shared among sink replicas (librdkafka
    /// `partition.assignment.strategy`). `cooperative-sticky` rebalances incrementally and
    /// suits a real Kafka cluster. The default, eager `range`, is the one the tansu broker
    /// handles reliably: with `cooperative-sticky` it leaves a crashed member's partitions
    /// unassigned, and with `roundrobin` two members can rebalance without end.
    #[arg(long, env = "HOOKPIPE_ASSIGNMENT_STRATEGY", default_value = "range", value_parser = ["range", "roundrobin", "cooperative-sticky"])]
    pub assignment_strategy: String,

    /// How long partitions this sink does not own may have waiting records with no progress
    /// (the group's committed offset not moving) before the sink rejoins the group to force a
    /// new assignment. Guards against a coordinator leaving partitions with nobody (seen on
    /// tansu after a crash and a broker restart). `0` turns the guard off.
    #[arg(long, env = "HOOKPIPE_STALL_TIMEOUT", default_value = "30s", value_parser = parse_duration)]
    pub stall_timeout: Duration,

    /// Topic for records the sink cannot write (with the reason).
    #[arg(long, env = "HOOKPIPE_DLQ_TOPIC", default_value = "webhooks-dlq")]
    pub dlq_topic: String,

    /// The largest dead letter the dead-letter topic accepts (its `max.message.bytes`); a
    /// bigger one is stored truncated, with the original's size and SHA-256.
    #[arg(
        long,
        env = "HOOKPIPE_DLQ_MAX_MESSAGE_BYTES",
        default_value_t = 1_048_576
    )]
    pub dlq_max_message_bytes: usize,

    /// Topic for rows whose table keeps failing (parked), written back when it answers again.
    #[arg(
        long,
        env = "HOOKPIPE_PARKING_TOPIC",
        default_value = "webhooks-parked"
    )]
    pub parking_topic: String,

    /// How long a table may keep failing, while other tables are written, before its rows are
    /// parked (sooner when its stuck rows hold partitions back at the dedup window).
    #[arg(long, env = "HOOKPIPE_PARK_AFTER", default_value = "60s", value_parser = parse_duration)]
    pub park_after: Duration,

    /// First wait before a parked table is tried again (its new rows, and a pass over the
    /// parking topic); doubles up to HOOKPIPE_PARK_PROBE_MAX while it keeps failing.
    #[arg(long, env = "HOOKPIPE_PARK_PROBE_INITIAL", default_value = "10s", value_parser = parse_duration)]
    pub park_probe_initial: Duration,

    /// Longest wait between two tries of a parked table.
    #[arg(long, env = "HOOKPIPE_PARK_PROBE_MAX", default_value = "5m", value_parser = parse_duration)]
    pub park_probe_max: Duration,

    #[command(flatten)]
    pub kafka: KafkaArgs,

    #[command(flatten)]
    pub bigquery: BigQueryArgs,

    /// Flush a table's batch when it holds this many rows (BigQuery recommends at most 500
    /// per insertAll request).
    #[arg(long, env = "HOOKPIPE_BATCH_MAX_ROWS", default_value_t = 500)]
    pub batch_max_rows: usize,

    /// Flush when the batch's rows add up to this many bytes (an insertAll request may carry
    /// at most 10 MB).
    #[arg(long, env = "HOOKPIPE_BATCH_MAX_BYTES", default_value_t = 5 * 1024 * 1024)]
    pub batch_max_bytes: usize,

    /// Flush a batch at the latest this long after its first row arrived. 500 ms from the
    /// end-to-end benchmarks (docs/benchmarks.md): at 100 and at 1,000 webhooks/s it gave a
    /// lower median and tail than 1 s; appends through the Storage Write API are billed by
    /// bytes, not by calls, so more, smaller appends cost nothing extra.
    #[arg(long, env = "HOOKPIPE_BATCH_MAX_AGE", default_value = "500ms", value_parser = parse_duration)]
    pub batch_max_age: Duration,

    /// Records consumed but not yet written above which the sink stops reading until writes
    /// catch up (memory bound).
    #[arg(long, env = "HOOKPIPE_MAX_BUFFERED_ROWS", default_value_t = 20_000)]
    pub max_buffered_rows: usize,

    /// The same bound in bytes of the records held (each record is held once).
    #[arg(long, env = "HOOKPIPE_MAX_BUFFERED_BYTES", default_value_t = 256 * 1024 * 1024)]
    pub max_buffered_bytes: usize,

    /// How long an offset commit may go unanswered before it counts as failed (and is asked
    /// again); a hanging commit never stops the consumer loop.
    #[arg(long, env = "HOOKPIPE_COMMIT_TIMEOUT", default_value = "10s", value_parser = parse_duration)]
    pub commit_timeout: Duration,

    /// Dedup window W: a partition never runs more than W/2 records ahead of its last
    /// confirmed commit, and after an assignment the first W records are looked up in the
    /// table before writing (rows a previous owner wrote but did not commit are skipped).
    #[arg(long, env = "HOOKPIPE_DEDUP_WINDOW", default_value_t = 10_000)]
    pub dedup_window: usize,

    /// How many recently written hit_ids each sink remembers, to drop senders' retries (same
    /// Idempotency-Key) that arrive later; 16 bytes each.
    #[arg(long, env = "HOOKPIPE_DEDUP_MEMORY", default_value_t = 1_000_000)]
    pub dedup_memory: usize,

    /// The ownership fence: after a partition is assigned, how long its suspect rows (those a
    /// previous owner may have written) wait before they are looked up. A previous owner that
    /// left cleanly has stopped and finalized its streams before the assignment; one whose
    /// session expired (a pause, a partition) notices within about a heartbeat and stops then;
    /// this is the time it gets. After a rejoin the group guard forced, the session timeout is
    /// added (the previous owner may be alive and hear of the new assignment only at its next
    /// heartbeat).
    #[arg(long, env = "HOOKPIPE_FENCE_WAIT", default_value = "2s", value_parser = parse_duration)]
    pub fence_wait: Duration,

    /// First pause before retrying a failed BigQuery write; doubles up to the maximum, with
    /// jitter.
    #[arg(long, env = "HOOKPIPE_RETRY_INITIAL", default_value = "200ms", value_parser = parse_duration)]
    pub retry_initial: Duration,

    /// Longest pause between retries.
    #[arg(long, env = "HOOKPIPE_RETRY_MAX", default_value = "30s", value_parser = parse_duration)]
    pub retry_max: Duration,

    /// On SIGTERM: how long the sink may take to write and commit what it holds.
    #[arg(long, env = "HOOKPIPE_DRAIN_TIMEOUT", default_value = "20s", value_parser = parse_duration)]
    pub drain_timeout: Duration,
}

/// How the sink reaches BigQuery.
#[derive(clap::Args, Clone, Debug)]
pub struct BigQueryArgs {
    /// Credentials: `application-default` (ADC: GOOGLE_APPLICATION_CREDENTIALS, gcloud, or the
    /// metadata server), `service-account` (a key file), `workload-identity` (GKE metadata
    /// server), or `none` (the local emulator).
    #[arg(long = "bigquery-auth", env = "HOOKPIPE_BIGQUERY_AUTH", default_value = "application-default", value_parser = ["application-default", "service-account", "workload-identity", "none"])]
    pub auth: String,

    /// Service-account key file, for `--bigquery-auth service-account`.
    #[arg(long = "bigquery-key-file", env = "HOOKPIPE_BIGQUERY_KEY_FILE")]
    pub key_file: Option<PathBuf>,

    /// BigQuery REST endpoint up to and including `/bigquery/v2`; set it for the emulator
    /// (`http://127.0.0.1:9050/bigquery/v2`).
    #[arg(long = "bigquery-endpoint", env = "HOOKPIPE_BIGQUERY_ENDPOINT")]
    pub endpoint: Option<String>,

    /// Location (region) for datasets the sink creates, such as `US` or `europe-west3`.
    #[arg(long = "bigquery-location", env = "HOOKPIPE_BIGQUERY_LOCATION")]
    pub location: Option<String>,

    /// Partition expiry, in days, for tables the sink creates (none: keep forever).
    #[arg(
        long = "partition-expiration-days",
        env = "HOOKPIPE_PARTITION_EXPIRATION_DAYS"
    )]
    pub partition_expiration_days: Option<u32>,

    /// How long one BigQuery request may take before it is abandoned and retried.
    #[arg(long = "bigquery-timeout", env = "HOOKPIPE_BIGQUERY_TIMEOUT", default_value = "30s", value_parser = parse_duration)]
    pub timeout: Duration,

    /// How rows are written: `storage` (the Storage Write API over gRPC: half the price per GB,
    /// no 1 KB minimum per row, and every write's outcome known from its offset) or
    /// `insert-all` (the legacy `tabledata.insertAll` over HTTPS, for networks that block gRPC).
    #[arg(long = "bigquery-write-api", env = "HOOKPIPE_BIGQUERY_WRITE_API", default_value = "storage", value_parser = ["storage", "insert-all"])]
    pub write_api: String,

    /// The Storage Write API's address: Google's by default (TLS); for the emulator its gRPC
    /// port in plaintext, `http://127.0.0.1:9060`.
    #[arg(
        long = "bigquery-storage-endpoint",
        env = "HOOKPIPE_BIGQUERY_STORAGE_ENDPOINT",
        default_value = "https://bigquerystorage.googleapis.com"
    )]
    pub storage_endpoint: String,

    /// An extra CA certificate (PEM) to trust for the Storage Write API endpoint, besides the
    /// system's (a TLS-inspecting proxy, a private endpoint).
    #[arg(long = "bigquery-ca-file", env = "HOOKPIPE_BIGQUERY_CA_FILE")]
    pub ca_file: Option<PathBuf>,

    /// Storage Write appends in flight per write stream (in order on one connection).
    #[arg(
        long = "appends-in-flight",
        env = "HOOKPIPE_APPENDS_IN_FLIGHT",
        default_value_t = 4
    )]
    pub appends_in_flight: usize,

    /// The destination answers a write holding one bad row with HTTP 500 for the whole
    /// request, as the local BigQuery emulator does (BigQuery itself reports bad rows per row
    /// and a 5xx is always transient there). With it, a 5xx while the table answers splits
    /// the request to find the bad row. Set by the local scripts and tests only.
    #[arg(
        long = "bigquery-bad-rows-as-5xx",
        env = "HOOKPIPE_BIGQUERY_BAD_ROWS_AS_5XX",
        default_value_t = false,
        action = clap::ArgAction::Set
    )]
    pub bad_rows_as_5xx: bool,
}

impl Config {
    pub fn validate(&self) -> Result<(), String> {
        self.kafka.validate()?;
        if self.catalogue.is_none() {
            return Err("HOOKPIPE_CATALOGUE (--catalogue) is required".into());
        }
        if self.dlq_topic == self.kafka.topic {
            return Err("HOOKPIPE_DLQ_TOPIC must differ from HOOKPIPE_TOPIC".into());
        }
        if self.parking_topic == self.kafka.topic || self.parking_topic == self.dlq_topic {
            return Err(
                "HOOKPIPE_PARKING_TOPIC must differ from HOOKPIPE_TOPIC and HOOKPIPE_DLQ_TOPIC"
                    .into(),
            );
        }
        if self.dlq_max_message_bytes < 8192 {
            return Err("HOOKPIPE_DLQ_MAX_MESSAGE_BYTES must be at least 8192".into());
        }
        if self.park_probe_initial.is_zero() || self.park_probe_max < self.park_probe_initial {
            return Err("HOOKPIPE_PARK_PROBE_INITIAL must be above zero and at most HOOKPIPE_PARK_PROBE_MAX".into());
        }
        if self.max_buffered_bytes < self.batch_max_bytes {
            return Err(
                "HOOKPIPE_MAX_BUFFERED_BYTES must be at least HOOKPIPE_BATCH_MAX_BYTES".into(),
            );
        }
        if self.commit_timeout < Duration::from_millis(500) {
            return Err("HOOKPIPE_COMMIT_TIMEOUT must be at least 500ms".into());
        }
        if self.group_id.trim().is_empty() {
            return Err("HOOKPIPE_GROUP_ID is empty".into());
        }
        if self.batch_max_rows == 0 || self.batch_max_rows > 50_000 {
            return Err("HOOKPIPE_BATCH_MAX_ROWS must be between 1 and 50000".into());
        }
        if self.batch_max_bytes < 1024 || self.batch_max_bytes > 9 * 1024 * 1024 {
            return Err("HOOKPIPE_BATCH_MAX_BYTES must be between 1 KiB and 9 MiB (insertAll takes at most 10 MB)".into());
        }
        if self.dedup_window < 2 * self.batch_max_rows {
            return Err("HOOKPIPE_DEDUP_WINDOW must be at least twice HOOKPIPE_BATCH_MAX_ROWS, or partitions would pause before a batch fills".into());
        }
        if self.max_buffered_rows < self.batch_max_rows {
            return Err(
                "HOOKPIPE_MAX_BUFFERED_ROWS must be at least HOOKPIPE_BATCH_MAX_ROWS".into(),
            );
        }
        if self.retry_initial.is_zero() || self.retry_max < self.retry_initial {
            return Err(
                "HOOKPIPE_RETRY_INITIAL must be above zero and at most HOOKPIPE_RETRY_MAX".into(),
            );
        }
        match (self.bigquery.auth.as_str(), &self.bigquery.key_file) {
            ("service-account", None) => {
                return Err(
                    "--bigquery-auth service-account needs HOOKPIPE_BIGQUERY_KEY_FILE".into(),
                );
            }
            ("service-account", Some(_)) | (_, None) => {}
            (other, Some(_)) => {
                return Err(format!(
                    "HOOKPIPE_BIGQUERY_KEY_FILE is only used with service-account auth, not {other}"
                ));
            }
        }
        if self.bigquery.auth == "none" && self.bigquery.endpoint.is_none() {
            return Err(
                "--bigquery-auth none is for the emulator: set HOOKPIPE_BIGQUERY_ENDPOINT".into(),
            );
        }
        if self.bigquery.auth == "none"
            && self.bigquery.write_api == "storage"
            && self
                .bigquery
                .storage_endpoint
                .starts_with("https://bigquerystorage.googleapis.com")
        {
            return Err("--bigquery-auth none is for the emulator: set HOOKPIPE_BIGQUERY_STORAGE_ENDPOINT to its gRPC address (http://127.0.0.1:9060), or HOOKPIPE_BIGQUERY_WRITE_API=insert-all".into());
        }
        if !self.bigquery.storage_endpoint.starts_with("https://")
            && !self.bigquery.storage_endpoint.starts_with("http://")
        {
            return Err(
                "HOOKPIPE_BIGQUERY_STORAGE_ENDPOINT must start with https:// or http://".into(),
            );
        }
        if self.bigquery.appends_in_flight == 0 || self.bigquery.appends_in_flight > 64 {
            return Err("HOOKPIPE_APPENDS_IN_FLIGHT must be between 1 and 64".into());
        }
        Ok(())
    }
}
