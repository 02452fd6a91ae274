//! Every metric the gateway exports, defined once. Label values come from closed sets: the
//! `stream` label is a catalogue stream id or `unknown`, never a raw path.

use hookpipe_common::admin::register;
use prometheus::{
    Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry,
};
use uuid::Uuid;

pub struct Metrics {
    pub registry: Registry,
    requests: IntCounterVec,
    /// `request_duration_seconds` for each outcome, resolved once: accepted, rejected,
    /// unavailable.
    request_duration: [Histogram; 3],
    publish_duration: Histogram,
    payload_size: Histogram,
    pub in_flight: IntGauge,
    pub producer_queue: IntGauge,
    auth_failures: IntCounterVec,
    publish_errors: IntCounterVec,
    catalogue_reloads: IntCounterVec,
    pub catalogue_streams: IntGauge,
    last_accepted: IntGaugeVec,
}

/// Label value for requests whose stream id is not in the catalogue.
pub const UNKNOWN_STREAM: &str = "unknown";

impl Metrics {
    #[allow(clippy::expect_used)] // fixed, valid metric definitions
    pub fn new() -> Self {
        let registry = Registry::new();
        let latency_buckets = vec![
            0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
            10.0,
        ];
        let requests = register(
            &registry,
            IntCounterVec::new(
                Opts::new(
                    "ingest_gateway_http_requests_total",
                    "Webhook requests by stream and HTTP status",
                ),
                &["stream", "status"],
            )
            .expect("valid metric"),
        );
        let request_duration = register(
            &registry,
            HistogramVec::new(
                HistogramOpts::new(
                    "ingest_gateway_http_request_duration_seconds",
                    "Time from request start to response, by outcome (accepted, rejected, unavailable)",
                )
                .buckets(latency_buckets.clone()),
                &["outcome"],
            )
            .expect("valid metric"),
        );
        let publish_duration = register(
            &registry,
            Histogram::with_opts(
                HistogramOpts::new(
                    "ingest_gateway_kafka_publish_duration_seconds",
                    "Time from handing a message to the producer to the broker's acknowledgement",
                )
                .buckets(latency_buckets),
            )
            .expect("valid metric"),
        );
        let payload_size = register(
            &registry,
            Histogram::with_opts(
                HistogramOpts::new(
                    "ingest_gateway_payload_size_bytes",
                    "Size of accepted payloads",
                )
                .buckets(prometheus::exponential_buckets(64.0, 4.0, 9).expect("valid buckets")),
            )
            .expect("valid metric"),
        );
        let in_flight = register(
            &registry,
            IntGauge::new(
                "ingest_gateway_http_requests_in_flight",
                "Webhook requests being handled",
            )
            .expect("valid metric"),
        );
        let producer_queue = register(
            &registry,
            IntGauge::new(
                "ingest_gateway_kafka_producer_queue_messages",
                "Messages handed to the producer and not yet acknowledged by the broker",
            )
            .expect("valid metric"),
        );
        let auth_failures = register(
            &registry,
            IntCounterVec::new(
                Opts::new(
                    "ingest_gateway_auth_failures_total",
                    "Requests refused by a stream's auth rule",
                ),
                &["stream", "reason"],
            )
            .expect("valid metric"),
        );
        let publish_errors = register(
            &registry,
            IntCounterVec::new(
                Opts::new(
                    "ingest_gateway_kafka_publish_errors_total",
                    "Publishes that failed, by kind (queue_full, timeout, stalled, broker: the sender got 503; too_large: 413)",
                ),
                &["kind"],
            )
            .expect("valid metric"),
        );
        let catalogue_reloads = register(
            &registry,
            IntCounterVec::new(
                Opts::new(
                    "ingest_gateway_catalogue_reloads_total",
                    "Catalogue reload attempts by outcome (applied, rejected)",
                ),
                &["outcome"],
            )
            .expect("valid metric"),
        );
        let catalogue_streams = register(
            &registry,
            IntGauge::new(
                "ingest_gateway_catalogue_streams",
                "Streams in the catalogue in force",
            )
            .expect("valid metric"),
        );
        // Start every kind at 0, so the first failure is an increase Prometheus sees.
        for kind in crate::publisher::PublishError::KINDS {
            publish_errors.with_label_values(&[kind]);
        }
        let last_accepted = register(
            &registry,
            IntGaugeVec::new(
                Opts::new(
                    "ingest_gateway_stream_last_accepted_timestamp_seconds",
                    "When the stream's last webhook was accepted (Unix seconds)",
                ),
                &["stream"],
            )
            .expect("valid metric"),
        );
        let request_duration = ["accepted", "rejected", "unavailable"]
            .map(|o| request_duration.with_label_values(&[o]));
        Self {
            registry,
            requests,
            request_duration,
            publish_duration,
            payload_size,
            in_flight,
            producer_queue,
            auth_failures,
            publish_errors,
            catalogue_reloads,
            catalogue_streams,
            last_accepted,
        }
    }

    pub fn request(&self, stream: &str, status: axum::http::StatusCode, seconds: f64) {
        self.requests
            .with_label_values(&[stream, status.as_str()])
            .inc();
        self.request_seconds(status, seconds);
    }

    /// Only the duration of a request (its count is kept by a handle from
    /// [`Metrics::accepted_counter`]).
    pub fn request_seconds(&self, status: axum::http::StatusCode, seconds: f64) {
        let outcome = match status.as_u16() {
            200..=299 => 0,
            503 => 2,
            _ => 1,
        };
        self.request_duration[outcome].observe(seconds);
    }

    /// The `requests_total{stream, status="202"}` counter of a stream, to keep with the
    /// catalogue version rather than look up per request.
    pub fn accepted_counter(&self, stream: &Uuid) -> IntCounter {
        let mut text = Uuid::encode_buffer();
        let stream = stream.hyphenated().encode_lower(&mut text);
        self.requests.with_label_values(&[stream, "202"])
    }

    /// The stream's `stream_last_accepted_timestamp_seconds` gauge, resolved once per
    /// catalogue version like [`Metrics::accepted_counter`].
    pub fn last_accepted_gauge(&self, stream: &Uuid) -> IntGauge {
        let mut text = Uuid::encode_buffer();
        let stream = stream.hyphenated().encode_lower(&mut text);
        self.last_accepted.with_label_values(&[stream])
    }

    pub fn published(&self, seconds: f64, payload_bytes: usize) {
        self.publish_duration.observe(seconds);
        self.payload_size.observe(payload_bytes as f64);
    }

    pub fn auth_failure(&self, stream: &str, reason: &str) {
        self.auth_failures
            .with_label_values(&[stream, reason])
            .inc();
    }

    pub fn publish_error(&self, kind: &str) {
        self.publish_errors.with_label_values(&[kind]).inc();
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
