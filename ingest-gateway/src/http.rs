//! The webhook HTTP API: `POST|GET /ds/{stream_id}`. Builds the router from explicit state so
//! tests drive it with `oneshot`, exactly as the server runs it.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Body;
use axum::extract::{ConnectInfo, Path, Request, State};
use axum::http::{HeaderMap, HeaderName, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::any;
use bytes::Bytes;
use governor::clock::{Clock, DefaultClock};
use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use hookpipe_common::Catalogue;
use hookpipe_common::catalogue::{RateLimit, Shared};
use hookpipe_proto::Message;
use http_body_util::{BodyExt, LengthLimitError, Limited};
use tokio::sync::Semaphore;
use uuid::Uuid;

use crate::auth::Verifier;
use crate::envelope::{self, Received};
use crate::error::{ApiError, Result};
use crate::metrics::{Metrics, UNKNOWN_STREAM};
use crate::publisher::{Publish, PublishError};

/// Longest idempotency key accepted (keys are usually UUIDs or order ids).
pub const MAX_IDEMPOTENCY_KEY_BYTES: usize = 255;

/// The catalogue as the gateway uses it: with each stream's secrets resolved.
#[derive(Debug, Default)]
pub struct GatewayStreams {
    pub catalogue: Catalogue,
    pub verifiers: HashMap<Uuid, Verifier>,
    /// Each stream's table and zone as the envelope carries them, formatted once per catalogue
    /// version rather than per request.
    pub placements: HashMap<Uuid, Placement>,
    /// Each rate-limited stream's token bucket, with the limit it was made for.
    pub limiters: HashMap<Uuid, (RateLimit, Arc<DefaultDirectRateLimiter>)>,
}

/// Where a stream's hits go, as written into every envelope.
#[derive(Debug, Clone)]
pub struct Placement {
    pub table: String,
    pub timezone: String,
}

impl GatewayStreams {
    /// Resolves every stream's secrets; a catalogue naming a secret the gateway cannot read is
    /// refused as a whole, so a stream is never served without its auth rule.
    pub fn build(catalogue: Catalogue) -> Result<Self, String> {
        Self::build_after(catalogue, &Self::default())
    }

    /// The same, keeping the token buckets of streams whose limit did not change, so a
    /// catalogue reload does not hand every limited stream a fresh burst.
    pub fn build_after(catalogue: Catalogue, previous: &GatewayStreams) -> Result<Self, String> {
        let limiters = catalogue
            .streams()
            .filter_map(|s| {
                let limit = s.rate_limit?;
                let kept = previous
                    .limiters
                    .get(&s.id)
                    .filter(|(old, _)| *old == limit)
                    .map(|(_, limiter)| limiter.clone());
                let limiter = kept.unwrap_or_else(|| Arc::new(RateLimiter::direct(quota(limit))));
                Some((s.id, (limit, limiter)))
            })
            .collect();
        let mut verifiers = HashMap::new();
        let placements = catalogue
            .streams()
            .map(|s| {
                (
                    s.id,
                    Placement {
                        table: s.table.to_string(),
                        timezone: s.zone.to_string(),
                    },
                )
            })
            .collect();
        for stream in catalogue.streams() {
            if let Some(spec) = &stream.auth {
                let verifier = Verifier::from_spec(spec)
                    .map_err(|e| format!("stream {}: auth: {e}", stream.id))?;
                verifiers.insert(stream.id, verifier);
            }
        }
        Ok(Self {
            catalogue,
            verifiers,
            placements,
            limiters,
        })
    }
}

fn quota(limit: RateLimit) -> Quota {
    let nonzero = |n: u32| NonZeroU32::new(n).unwrap_or(NonZeroU32::MIN);
    Quota::per_second(nonzero(limit.per_second)).allow_burst(nonzero(limit.burst))
}

/// Whether the stream may send one more request now; if not, the whole seconds until it may
/// (at least 1), for `Retry-After`.
fn rate_check(streams: &GatewayStreams, stream_id: &Uuid) -> Result<(), u64> {
    let Some((_, limiter)) = streams.limiters.get(stream_id) else {
        return Ok(());
    };
    limiter.check().map_err(|not_until| {
        let wait = not_until.wait_time_from(DefaultClock::default().now());
        (wait.as_secs() + u64::from(wait.subsec_nanos() > 0)).max(1)
    })
}

/// Request limits from the configuration.
#[derive(Clone, Debug)]
pub struct Limits {
    pub max_body_bytes: usize,
    pub body_timeout: Duration,
}

pub struct AppState<P> {
    pub streams: Arc<Shared<GatewayStreams>>,
    pub publisher: Arc<P>,
    pub metrics: Arc<Metrics>,
    pub limits: Limits,
    /// One permit per request being handled; none left means 503 at once, so overload sheds
    /// load instead of building an unbounded queue.
    pub slots: Arc<Semaphore>,
    pub idempotency_header: HeaderName,
}

pub fn app<P: Publish>(state: Arc<AppState<P>>) -> Router {
    Router::new()
        .route("/ds/{stream_id}", any(handle::<P>))
        .fallback(|| async { ApiError::NotFound })
        .with_state(state)
}

/// Decrements the in-flight gauge however the request ends (including a client disconnect that
/// drops the future).
struct InFlight<'a>(&'a Metrics);

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.in_flight.dec();
    }
}

async fn handle<P: Publish>(
    State(state): State<Arc<AppState<P>>>,
    Path(raw_id): Path<String>,
    request: Request,
) -> Response {
    let started = Instant::now();
    let received_at_ms = hookpipe_common::now_ms();
    let mut label_buf = Uuid::encode_buffer();
    let mut label = UNKNOWN_STREAM;
    let result = match state.slots.clone().try_acquire_owned() {
        Ok(_permit) => {
            state.metrics.in_flight.inc();
            let _guard = InFlight(&state.metrics);
            let streams = state.streams.current();
            let stream_id = Uuid::try_parse(&raw_id)
                .ok()
                .filter(|id| streams.catalogue.get(id).is_some());
            if let Some(id) = stream_id {
                label = id.hyphenated().encode_lower(&mut label_buf);
            }
            match stream_id {
                Some(id) => accept(&state, &streams, id, label, received_at_ms, request).await,
                None => Err(ApiError::UnknownStream),
            }
        }
        Err(_) => Err(ApiError::Unavailable(
            "too many requests in flight, retry later",
        )),
    };
    let response = match result {
        Ok(hit_id) => (
            StatusCode::ACCEPTED,
            axum::Json(serde_json::json!({ "hit_id": hit_id })),
        )
            .into_response(),
        Err(error) => {
            // Not per request at warn level: during an outage every request is a 503, and the
            // cause is logged where it is known (a failed publish, the readiness loop's state
            // change); metrics count each answer.
            tracing::debug!(stream = label, %error, "webhook not accepted");
            error.into_response()
        }
    };
    state
        .metrics
        .request(label, response.status(), started.elapsed().as_secs_f64());
    response
}

async fn accept<P: Publish>(
    state: &AppState<P>,
    streams: &GatewayStreams,
    stream_id: Uuid,
    label: &str,
    received_at_ms: i64,
    request: Request,
) -> Result<String> {
    // Before the body is read: a sender over its stream's limit costs the gateway nothing more.
    rate_check(streams, &stream_id).map_err(ApiError::RateLimited)?;
    let (parts, body) = request.into_parts();
    let query = parts.uri.query().unwrap_or("");
    let payload = match parts.method {
        Method::POST => read_body(&parts.headers, body, &state.limits).await?,
        // Postback style: the data is the query string, taken raw (not decoded or reordered).
        Method::GET => Bytes::copy_from_slice(query.as_bytes()),
        _ => return Err(ApiError::MethodNotAllowed),
    };
    if payload.is_empty() {
        return Err(ApiError::EmptyPayload);
    }
    // BigQuery STRING holds UTF-8 only; refusing here tells the sender, where the sink could
    // only dead-letter it.
    if std::str::from_utf8(&payload).is_err() {
        return Err(ApiError::NotUtf8);
    }
    if let Some(verifier) = streams.verifiers.get(&stream_id) {
        let now_secs = received_at_ms.div_euclid(1000);
        if let Err(failure) = verifier.verify(&parts.headers, &payload, now_secs) {
            state.metrics.auth_failure(label, failure.reason());
            return Err(ApiError::Unauthorized(failure.message()));
        }
    }
    let header_str = |name: &HeaderName| parts.headers.get(name).and_then(|v| v.to_str().ok());
    let idempotency_key = header_str(&state.idempotency_header).filter(|k| !k.is_empty());
    // The key travels in every envelope: a sender must not make it a second payload.
    if idempotency_key.is_some_and(|k| k.len() > MAX_IDEMPOTENCY_KEY_BYTES) {
        return Err(ApiError::IdempotencyKeyTooLong);
    }
    let remote_addr = parts
        .extensions
        .get::<ConnectInfo<SocketAddr>>()
        .map(|ConnectInfo(addr)| addr.to_string())
        .unwrap_or_default();
    let payload_len = payload.len();
    let placement = streams.placements.get(&stream_id);
    let envelope = envelope::build(Received {
        table: placement.map_or("", |p| p.table.as_str()),
        timezone: placement.map_or("", |p| p.timezone.as_str()),
        stream_id,
        received_at_ms,
        payload,
        method: parts.method.as_str(),
        content_type: header_str(&header::CONTENT_TYPE).unwrap_or(""),
        query,
        idempotency_key,
        remote_addr,
        user_agent: header_str(&header::USER_AGENT).unwrap_or(""),
    });
    let value = envelope.encode_to_vec();
    let publish_started = Instant::now();
    state
        .publisher
        .publish(envelope.hit_id.as_bytes(), &value)
        .await
        .map_err(|error| {
            state.metrics.publish_error(error.kind());
            match error {
                PublishError::TooLarge => ApiError::PayloadTooLarge,
                // Logged once per state change by the readiness loop, not per request.
                PublishError::Stalled => ApiError::Unavailable(error.reason()),
                _ => {
                    tracing::warn!(stream = label, %error, "publish failed");
                    ApiError::Unavailable(error.reason())
                }
            }
        })?;
    state
        .metrics
        .published(publish_started.elapsed().as_secs_f64(), payload_len);
    Ok(envelope.hit_id)
}

/// Reads the body, refusing more than the limit while reading (a missing or lying
/// Content-Length cannot make the gateway buffer more) and a sender too slow to finish.
async fn read_body(headers: &HeaderMap, body: Body, limits: &Limits) -> Result<Bytes> {
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|len| len > limits.max_body_bytes as u64) {
        return Err(ApiError::PayloadTooLarge);
    }
    let limited = Limited::new(body, limits.max_body_bytes);
    match tokio::time::timeout(limits.body_timeout, limited.collect()).await {
        Ok(Ok(collected)) => Ok(collected.to_bytes()),
        Ok(Err(error)) if error.downcast_ref::<LengthLimitError>().is_some() => {
            Err(ApiError::PayloadTooLarge)
        }
        Ok(Err(_)) => Err(ApiError::BodyRead),
        Err(_) => Err(ApiError::BodyTimeout),
    }
}
