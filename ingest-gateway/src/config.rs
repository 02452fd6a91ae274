//! The gateway's configuration: command-line flags, each with an environment variable, with
//! defaults that match the local set-up in DESIGN.md.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use hookpipe_common::kafka::KafkaArgs;
use hookpipe_common::parse_duration;

/// ingest-gateway: receives webhook calls and publishes each one to Kafka as a protobuf
/// envelope, answering 202 only once the broker holds it.
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
    /// Manage data streams: write a new catalogue entry, validate or list a catalogue, print a
    /// sender's integration snippet.
    #[command(subcommand)]
    Streams(crate::streams::StreamsCommand),
}

/// The gateway's settings.
#[derive(clap::Args, Clone, Debug)]
pub struct Config {
    /// Address for webhook traffic (`POST|GET /ds/{stream_id}`).
    #[arg(long, env = "HOOKPIPE_LISTEN", default_value = "127.0.0.1:8080")]
    pub listen: SocketAddr,

    /// Address for `/healthz`, `/readyz` and `/metrics`.
    #[arg(long, env = "HOOKPIPE_ADMIN_LISTEN", default_value = "127.0.0.1:9101")]
    pub admin_listen: SocketAddr,

    /// The stream catalogue (YAML), required to serve. Reloaded when its content changes.
    #[arg(long, env = "HOOKPIPE_CATALOGUE")]
    pub catalogue: Option<PathBuf>,

    /// The gateway's address as senders reach it (scheme, host, port), for the stream list
    /// and snippets on the admin port. Defaults to `http://<HOOKPIPE_LISTEN>`.
    #[arg(long, env = "HOOKPIPE_PUBLIC_URL")]
    pub public_url: Option<String>,

    /// How often the catalogue file is checked for changes.
    #[arg(long, env = "HOOKPIPE_CATALOGUE_RELOAD_INTERVAL", default_value = "5s", value_parser = parse_duration)]
    pub catalogue_reload_interval: Duration,

    /// Largest accepted body in bytes; larger requests get 413 without the rest being read.
    /// The one size setting: the producer's `message.max.bytes` and the `max.message.bytes`
    /// the topic needs follow from it (body + 65 KiB for the envelope and framing), and the
    /// gateway checks the topic at start-up.
    #[arg(long, env = "HOOKPIPE_MAX_BODY_BYTES", default_value_t = 1024 * 1024)]
    pub max_body_bytes: usize,

    /// Header whose value makes hit_id deterministic (UUID v5 of stream id + key), so a
    /// sender's retry is recognised as the same hit.
    #[arg(
        long,
        env = "HOOKPIPE_IDEMPOTENCY_HEADER",
        default_value = "Idempotency-Key"
    )]
    pub idempotency_header: String,

    /// How long Kafka may take to acknowledge a message before the sender gets 503. Also the
    /// stall rule: while a message has waited longer than this, new requests get 503 at once
    /// without being queued, so a sender retrying through an outage adds at most one row.
    #[arg(long, env = "HOOKPIPE_PUBLISH_TIMEOUT", default_value = "5s", value_parser = parse_duration)]
    pub publish_timeout: Duration,

    /// How long the producer keeps trying to deliver a message it holds before giving up on it
    /// (librdkafka `message.timeout.ms`); `0` is unbounded, which only the local tansu broker
    /// needs (scripts/run-local and the tests set it: tansu 0.6 cannot follow the epoch bump an
    /// idempotent producer makes when it times messages out). At least HOOKPIPE_PUBLISH_TIMEOUT.
    #[arg(long, env = "HOOKPIPE_PRODUCER_MESSAGE_TIMEOUT", default_value = "30s", value_parser = parse_duration)]
    pub producer_message_timeout: Duration,

    /// Bytes the producer may hold unacknowledged (librdkafka `queue.buffering.max.kbytes`);
    /// beyond it new requests get 503. Keep it well under the pod's memory limit
    /// (scripts/check-k8s checks the manifests).
    #[arg(
        long,
        env = "HOOKPIPE_PRODUCER_QUEUE_BYTES",
        default_value_t = 64 * 1024 * 1024
    )]
    pub producer_queue_bytes: usize,

    /// Refuse to start when the topic could lose acknowledged hits to one broker's failure
    /// (`min.insync.replicas` below 2 or `unclean.leader.election.enable` on a cluster of
    /// several brokers); by default the gateway only warns.
    #[arg(long, env = "HOOKPIPE_REQUIRE_DURABLE_TOPIC", default_value_t = false, action = clap::ArgAction::Set)]
    pub require_durable_topic: bool,

    /// How long a client may take to send a request's headers, and how long an idle
    /// keep-alive connection is kept; then the connection is closed (slow-header protection).
    #[arg(long, env = "HOOKPIPE_HEADER_TIMEOUT", default_value = "10s", value_parser = parse_duration)]
    pub header_timeout: Duration,

    /// Also accept HTTP/2 with prior knowledge (h2c) on the webhook port. Off by default:
    /// webhook senders and ingresses speak HTTP/1.1 to the gateway, and serving both versions
    /// costs every connection memory (docs/benchmarks.md). Turn it on for a proxy configured to
    /// speak cleartext HTTP/2 to its backends (Envoy, Istio with an `http2` port name).
    #[arg(long, env = "HOOKPIPE_HTTP2", default_value_t = false, action = clap::ArgAction::Set)]
    pub http2: bool,

    /// How long a sender may take to send its body before it gets 408.
    #[arg(long, env = "HOOKPIPE_BODY_TIMEOUT", default_value = "10s", value_parser = parse_duration)]
    pub body_timeout: Duration,

    /// Requests handled at once; beyond it new requests get 503 at once instead of queueing.
    #[arg(long, env = "HOOKPIPE_MAX_IN_FLIGHT", default_value_t = 4096)]
    pub max_in_flight: usize,

    /// Messages the producer may hold unacknowledged before new requests get 503
    /// (librdkafka `queue.buffering.max.messages`).
    #[arg(
        long,
        env = "HOOKPIPE_PRODUCER_QUEUE_MESSAGES",
        default_value_t = 100_000
    )]
    pub producer_queue_messages: usize,

    /// How long the producer waits to fill a batch (librdkafka `linger.ms`). 5 ms measured
    /// best against the local broker (docs/benchmarks.md, round 6, at 256 connections): 1 ms
    /// cost about the same CPU per message but lost a tenth of the throughput and added 13 ms
    /// of p99; 20 ms halved the throughput of senders that wait for their answers. (Before
    /// `producer_in_flight_requests`, a shorter linger also made librdkafka poll more.)
    #[arg(
        long,
        env = "HOOKPIPE_PRODUCER_LINGER",
        default_value = crate::publisher::DEFAULT_LINGER,
        value_parser = parse_duration
    )]
    pub producer_linger: Duration,

    /// Produce requests in flight per broker connection (librdkafka
    /// `max.in.flight.requests.per.connection`; 1-5 with the idempotent producer). 2, not
    /// librdkafka's 5: its idempotent producer keeps one request per partition in flight anyway
    /// (it counts the *messages* in flight against its limit of five requests), and while a
    /// partition's next batch is ready and its request is out, the broker thread polls without
    /// waiting until the answer comes (bench/librdkafka/idempotent-inflight-wakeup.patch). With
    /// fewer requests allowed per connection than the partitions the broker leads, the other
    /// partitions' batches wait in librdkafka's queue instead, which does not wake the thread:
    /// at 256 connections on 4 partitions, 2 µs of librdkafka CPU per message instead of 32-40
    /// (docs/benchmarks.md, round 6). Where a broker leads 2 of the topic's partitions, 1.
    #[arg(
        long,
        env = "HOOKPIPE_PRODUCER_IN_FLIGHT_REQUESTS",
        default_value_t = crate::publisher::DEFAULT_IN_FLIGHT_REQUESTS,
        value_parser = clap::value_parser!(u8).range(1..=5)
    )]
    pub producer_in_flight_requests: u8,

    /// Compression for produced batches: none, gzip, snappy or lz4 (librdkafka is built
    /// without zstd). `none` by default: ~300-byte webhooks in 5 ms batches gain little, and
    /// lz4 cost 1.5-3x the CPU per message and 30% of the throughput in the benchmarks; choose
    /// lz4 where the network to the brokers is the bottleneck.
    #[arg(long, env = "HOOKPIPE_PRODUCER_COMPRESSION", default_value = "none", value_parser = ["none", "gzip", "snappy", "lz4"])]
    pub producer_compression: String,

    /// On SIGTERM: how long in-flight requests and unacknowledged messages may take to finish.
    #[arg(long, env = "HOOKPIPE_DRAIN_TIMEOUT", default_value = "20s", value_parser = parse_duration)]
    pub drain_timeout: Duration,

    #[command(flatten)]
    pub kafka: KafkaArgs,
}

impl Config {
    /// Cross-field rules; the message names the setting.
    pub fn validate(&self) -> Result<(), String> {
        self.kafka.validate()?;
        if self.max_body_bytes == 0 {
            return Err("HOOKPIPE_MAX_BODY_BYTES must be at least 1".into());
        }
        // BigQuery's insertAll request limit is 10 MB; a row must fit with room to spare.
        if self.max_body_bytes > 8 * 1024 * 1024 {
            return Err(
                "HOOKPIPE_MAX_BODY_BYTES above 8 MiB cannot be written to BigQuery in one request"
                    .into(),
            );
        }
        if self.header_timeout < Duration::from_millis(100) {
            return Err("HOOKPIPE_HEADER_TIMEOUT must be at least 100ms".into());
        }
        if self.max_in_flight == 0 {
            return Err("HOOKPIPE_MAX_IN_FLIGHT must be at least 1".into());
        }
        if self.publish_timeout < Duration::from_millis(100) {
            return Err("HOOKPIPE_PUBLISH_TIMEOUT must be at least 100ms".into());
        }
        if !self.producer_message_timeout.is_zero()
            && self.producer_message_timeout < self.publish_timeout
        {
            return Err("HOOKPIPE_PRODUCER_MESSAGE_TIMEOUT must be 0 (unbounded) or at least HOOKPIPE_PUBLISH_TIMEOUT".into());
        }
        let needed = crate::publisher::required_message_bytes(self.max_body_bytes);
        if self.producer_queue_bytes < 2 * needed {
            return Err(format!(
                "HOOKPIPE_PRODUCER_QUEUE_BYTES must hold at least two of the largest messages ({} bytes for HOOKPIPE_MAX_BODY_BYTES={})",
                2 * needed,
                self.max_body_bytes
            ));
        }
        if self.drain_timeout < self.publish_timeout {
            return Err("HOOKPIPE_DRAIN_TIMEOUT must be at least HOOKPIPE_PUBLISH_TIMEOUT, or requests in flight at shutdown could be cut off before Kafka answers".into());
        }
        if axum::http::HeaderName::try_from(self.idempotency_header.as_str()).is_err() {
            return Err(format!(
                "HOOKPIPE_IDEMPOTENCY_HEADER `{}` is not a header name",
                self.idempotency_header
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::Cli;

    #[test]
    fn the_linger_defaults_to_the_measured_five_milliseconds() {
        let cli = Cli::try_parse_from(["ingest-gateway"]).expect("defaults parse");
        assert_eq!(
            cli.config.producer_linger,
            std::time::Duration::from_millis(5)
        );
    }

    #[test]
    fn produce_requests_in_flight_default_to_two_and_stay_within_idempotence() {
        let cli = Cli::try_parse_from(["ingest-gateway"]).expect("defaults parse");
        assert_eq!(cli.config.producer_in_flight_requests, 2);
        // librdkafka refuses an idempotent producer with more than 5; say so before it does.
        for refused in ["0", "6"] {
            let error =
                Cli::try_parse_from(["ingest-gateway", "--producer-in-flight-requests", refused])
                    .expect_err(refused)
                    .to_string();
            assert!(error.contains("--producer-in-flight-requests"), "{error}");
            assert!(error.contains("1..=5"), "{error}");
        }
    }
}
