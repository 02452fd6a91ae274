//! The webhook HTTP API: `POST|GET /ds/{stream_id}`. Builds the router from explicit state so
//! tests drive it with `oneshot`, exactly as the server runs it.

use std::future::Future;
use std::net::SocketAddr;
use std::num::NonZeroU32;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::BoxError;
use axum::Router;
use axum::body::Body;
use axum::body::HttpBody;
use axum::extract::{ConnectInfo, Request, State};
use axum::http;
use axum::http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use bytes::{Buf, Bytes, BytesMut};
use governor::clock::{Clock, DefaultClock};
use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use hookpipe_common::Catalogue;
use hookpipe_common::catalogue::{RateLimit, Shared, UuidMap};
use http_body_util::BodyExt;
use prometheus::{IntCounter, IntGauge};
use sha2::{Digest, Sha256};
use tokio::sync::Semaphore;
use uuid::Uuid;

use crate::auth::{Verified, Verifier};
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
    pub verifiers: UuidMap<Verifier>,
    /// Each stream's table and zone as the envelope carries them, formatted once per catalogue
    /// version rather than per request.
    pub placements: UuidMap<Placement>,
    /// Each rate-limited stream's token bucket, with the limit it was made for.
    pub limiters: UuidMap<(RateLimit, Arc<DefaultDirectRateLimiter>)>,
    /// Each stream's `requests_total{status="202"}` counter and last-accepted gauge, resolved
    /// once per catalogue version (see [`GatewayStreams::counted_by`]) instead of looked up by
    /// label per request.
    pub accepted: UuidMap<(IntCounter, IntGauge)>,
    /// Every secret file the verifiers were built from, with a digest of the content they
    /// hold, so a rotated file (a Kubernetes Secret updated in place) is noticed.
    secret_files: Vec<(PathBuf, [u8; 32])>,
}

/// Where a stream's hits go, as written into every envelope, and which header keys them:
/// resolved once per catalogue version, found with the one look-up a request makes.
#[derive(Debug, Clone)]
pub struct Placement {
    pub table: String,
    pub timezone: String,
    /// The stream's own idempotency header (the catalogue's `idempotency_header`, or its auth
    /// scheme's delivery id header); `None` is the gateway's global one.
    pub idempotency_header: Option<HeaderName>,
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
        let mut verifiers = UuidMap::default();
        let placements = catalogue
            .streams()
            .map(|s| {
                let idempotency_header = s
                    .idempotency_header()
                    .map(HeaderName::try_from)
                    .transpose()
                    .map_err(|e| format!("stream {}: idempotency_header: {e}", s.id))?;
                let placement = Placement {
                    table: s.table.to_string(),
                    timezone: s.zone.to_string(),
                    idempotency_header,
                };
                Ok((s.id, placement))
            })
            .collect::<Result<_, String>>()?;
        let mut secret_files = Vec::new();
        for stream in catalogue.streams() {
            if let Some(spec) = &stream.auth {
                secret_files.extend(spec.secrets().iter().filter_map(|s| s.file.clone()).map(
                    |path| {
                        let digest = file_digest(&path).unwrap_or_default();
                        (path, digest)
                    },
                ));
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
            accepted: UuidMap::default(),
            secret_files,
        })
    }

    /// Whether a secret file now holds something else than when these verifiers were built:
    /// then the catalogue is built again (`watch_catalogue`'s `stale` check), so a rotated
    /// secret is in force within the reload interval without a catalogue edit. A file that
    /// cannot be read right now (a Secret volume mid-update) counts as unchanged.
    pub fn secrets_changed(&self) -> bool {
        self.secret_files
            .iter()
            .any(|(path, digest)| file_digest(path).is_some_and(|now| now != *digest))
    }

    /// The same streams, with their metric handles resolved in `metrics`.
    pub fn counted_by(mut self, metrics: &Metrics) -> Self {
        self.accepted = self
            .catalogue
            .streams()
            .map(|s| {
                let handles = (
                    metrics.accepted_counter(&s.id),
                    metrics.last_accepted_gauge(&s.id),
                );
                (s.id, handles)
            })
            .collect();
        self
    }
}

/// SHA-256 of a secret file's trimmed content (what [`crate::auth::resolve`] uses).
fn file_digest(path: &Path) -> Option<[u8; 32]> {
    let text = std::fs::read(path).ok()?;
    Some(Sha256::digest(text.trim_ascii()).into())
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

/// The webhook API as an axum router, for the console's test hits and the unit tests: every
/// path goes to [`handle`], which takes `/ds/{stream_id}` apart itself. The webhook port calls
/// [`handle`] straight from hyper (see [`crate::server`]): the router would only add a boxed
/// body, a boxed future and an extension map per request.
pub fn app<P: Publish>(state: Arc<AppState<P>>) -> Router {
    Router::new().fallback(routed::<P>).with_state(state)
}

async fn routed<P: Publish>(State(state): State<Arc<AppState<P>>>, request: Request) -> Response {
    let peer = request
        .extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .map(|ConnectInfo(addr)| *addr);
    handle(state, request, peer).await.map(Body::from)
}

/// The stream id segment of a webhook path, `/ds/{stream_id}`, taken as it is (a stream id is a
/// UUID: nothing in it is percent-encoded).
fn stream_segment(path: &str) -> Option<&str> {
    path.strip_prefix("/ds/")
}

/// Length of a 202's body, `{"hit_id":"<36 characters>"}`.
const ACCEPTED_LEN: usize = 49;

/// A 202's body, written into the response itself: no buffer to allocate, and no box around
/// it as axum's [`Body`] would make (two allocations per accepted request fewer; issue #14
/// asked for the response body's).
#[derive(Debug)]
pub struct AcceptedJson {
    bytes: [u8; ACCEPTED_LEN],
    read: usize,
}

impl AcceptedJson {
    /// `{"hit_id":"…"}`, written without a JSON value tree.
    fn new(hit_id: &Uuid) -> Self {
        let mut bytes = [0u8; ACCEPTED_LEN];
        let (head, rest) = bytes.split_at_mut(11);
        head.copy_from_slice(br#"{"hit_id":""#);
        let (id, tail) = rest.split_at_mut(uuid::fmt::Hyphenated::LENGTH);
        hit_id.hyphenated().encode_lower(id);
        tail.copy_from_slice(br#""}"#);
        Self { bytes, read: 0 }
    }
}

impl Buf for AcceptedJson {
    fn remaining(&self) -> usize {
        ACCEPTED_LEN - self.read
    }

    fn chunk(&self) -> &[u8] {
        &self.bytes[self.read..]
    }

    fn advance(&mut self, count: usize) {
        assert!(count <= self.remaining(), "advance past the end");
        self.read += count;
    }
}

/// A piece of a webhook answer's body: the 202's inline JSON, or axum's bytes.
#[derive(Debug)]
pub enum Chunk {
    Accepted(AcceptedJson),
    Bytes(Bytes),
}

impl Buf for Chunk {
    fn remaining(&self) -> usize {
        match self {
            Chunk::Accepted(json) => json.remaining(),
            Chunk::Bytes(bytes) => bytes.remaining(),
        }
    }

    fn chunk(&self) -> &[u8] {
        match self {
            Chunk::Accepted(json) => json.chunk(),
            Chunk::Bytes(bytes) => bytes.chunk(),
        }
    }

    fn advance(&mut self, count: usize) {
        match self {
            Chunk::Accepted(json) => json.advance(count),
            Chunk::Bytes(bytes) => bytes.advance(count),
        }
    }
}

/// The body of a webhook answer as the webhook port sends it: a 202's JSON inline (the common
/// case), anything else (the errors' JSON) as axum makes it.
#[derive(Debug)]
pub enum Answer {
    Accepted(Option<AcceptedJson>),
    Other(Body),
}

impl HttpBody for Answer {
    type Data = Chunk;
    type Error = axum::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Chunk>, axum::Error>>> {
        match self.get_mut() {
            Answer::Accepted(json) => std::task::Poll::Ready(
                json.take()
                    .map(|j| Ok(hyper::body::Frame::data(Chunk::Accepted(j)))),
            ),
            Answer::Other(body) => Pin::new(body)
                .poll_frame(cx)
                .map(|frame| frame.map(|f| f.map(|f| f.map_data(Chunk::Bytes)))),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            Answer::Accepted(json) => json.is_none(),
            Answer::Other(body) => body.is_end_stream(),
        }
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        match self {
            Answer::Accepted(json) => {
                hyper::body::SizeHint::with_exact(json.as_ref().map_or(0, |j| j.remaining() as u64))
            }
            Answer::Other(body) => body.size_hint(),
        }
    }
}

impl From<Answer> for Body {
    /// For the axum router (the console's test hits, the unit tests).
    fn from(answer: Answer) -> Self {
        match answer {
            Answer::Accepted(json) => {
                Body::from(json.map_or_else(Vec::new, |j| j.chunk().to_vec()))
            }
            Answer::Other(body) => body,
        }
    }
}

/// `202 {"hit_id": "…"}`.
fn accepted_response(hit_id: &Uuid) -> http::Response<Answer> {
    let mut response = http::Response::new(Answer::Accepted(Some(AcceptedJson::new(hit_id))));
    *response.status_mut() = StatusCode::ACCEPTED;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    response
}

/// Decrements the in-flight gauge however the request ends (including a client disconnect that
/// drops the future).
struct InFlight<'a>(&'a Metrics);

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.in_flight.dec();
    }
}

/// Answers one webhook request; `peer` is the sender's address as the connection saw it.
///
/// Not an `async fn`: hyper keeps this future for every connection (in a box it allocates
/// when the connection opens), so its size is memory per connection. An `async fn` keeps each
/// argument twice (as given and as moved into its body), so the request is taken apart before
/// the future is made and the parts are only lent to the steps that read them:
/// docs/benchmarks.md ("Issue #14, round 5") has the sizes.
pub fn handle<P, B>(
    state: Arc<AppState<P>>,
    request: http::Request<B>,
    peer: Option<SocketAddr>,
) -> impl Future<Output = http::Response<Answer>>
where
    P: Publish,
    B: HttpBody<Data = Bytes>,
    B::Error: Into<BoxError>,
{
    let (parts, body) = request.into_parts();
    async move {
        let mut body = std::pin::pin!(body);
        let Some(raw_id) = stream_segment(parts.uri.path()) else {
            discard(&parts.headers, body, &state.limits, true).await;
            return ApiError::NotFound.into_response().map(Answer::Other);
        };
        let started = Instant::now();
        let received_at_ms = hookpipe_common::now_ms();
        let mut label_buf = Uuid::encode_buffer();
        let mut label = UNKNOWN_STREAM;
        let streams = state.streams.current();
        let stream_id = Uuid::try_parse(raw_id)
            .ok()
            .filter(|id| streams.catalogue.get(id).is_some());
        let result = match (stream_id, state.slots.try_acquire()) {
            (Some(id), Ok(_permit)) => {
                state.metrics.in_flight.inc();
                let _guard = InFlight(&state.metrics);
                label = id.hyphenated().encode_lower(&mut label_buf);
                let request = (&parts, body.as_mut());
                match prepare(&state, &streams, id, label, received_at_ms, request, peer).await {
                    Ok(prepared) => {
                        // The request's head (and its body, already copied into the
                        // envelope) are slices of hyper's read buffer for this connection:
                        // let them go before the wait for the broker, or a connection can
                        // hold a second 8 KiB buffer while its request is in flight (peak RSS
                        // at 1,000 connections: 52 -> 41.5 MiB with this).
                        drop(parts);
                        publish(&state, label, prepared).await
                    }
                    Err(error) => Err(error),
                }
            }
            (None, _) => {
                discard(&parts.headers, body, &state.limits, true).await;
                Err(ApiError::UnknownStream)
            }
            (Some(id), Err(_)) => {
                label = id.hyphenated().encode_lower(&mut label_buf);
                discard(&parts.headers, body, &state.limits, true).await;
                Err(ApiError::Unavailable(
                    "too many requests in flight, retry later",
                ))
            }
        };
        let response = match result {
            Ok(hit_id) => accepted_response(&hit_id),
            Err(error) => {
                // Not per request at warn level: during an outage every request is a 503, and
                // the cause is logged where it is known (a failed publish, the readiness
                // loop's state change); metrics count each answer.
                tracing::debug!(stream = label, %error, "webhook not accepted");
                error.into_response().map(Answer::Other)
            }
        };
        let (status, seconds) = (response.status(), started.elapsed().as_secs_f64());
        // A 202 (the common case) counts through the handle resolved for this catalogue
        // version; any other answer through a label look-up.
        let handle = stream_id
            .filter(|_| status == StatusCode::ACCEPTED)
            .and_then(|id| streams.accepted.get(&id));
        match handle {
            Some((counter, last)) => {
                counter.inc();
                last.set(received_at_ms.div_euclid(1000));
                state.metrics.request_seconds(status, seconds);
            }
            None => state.metrics.request(label, status, seconds),
        }
        response
    }
}

/// A request made into its envelope, ready to publish.
struct Prepared {
    hit_id: Uuid,
    envelope: Vec<u8>,
    payload_len: usize,
}

/// Everything before the publish: the rate limit, the body, the checks a sender can act on,
/// the signature, the idempotency key and the envelope.
async fn prepare<P, B>(
    state: &AppState<P>,
    streams: &GatewayStreams,
    stream_id: Uuid,
    label: &str,
    received_at_ms: i64,
    (parts, mut body): (&http::request::Parts, Pin<&mut B>),
    remote_addr: Option<SocketAddr>,
) -> Result<Prepared>
where
    P: Publish,
    B: HttpBody<Data = Bytes>,
    B::Error: Into<BoxError>,
{
    // Before the body is read: a sender over its stream's limit costs the gateway nothing more
    // than throwing its body away.
    if let Err(retry_after) = rate_check(streams, &stream_id) {
        discard(&parts.headers, body, &state.limits, true).await;
        return Err(ApiError::RateLimited(retry_after));
    }
    let query = parts.uri.query().unwrap_or("");
    let payload = match parts.method {
        Method::POST => match read_body(&parts.headers, body.as_mut(), &state.limits).await {
            Ok(payload) => payload,
            Err(ApiError::PayloadTooLarge) => {
                // Unread when refused by its Content-Length; otherwise partly read.
                let unread = declared_length(&parts.headers).is_some();
                discard(&parts.headers, body, &state.limits, unread).await;
                return Err(ApiError::PayloadTooLarge);
            }
            Err(error) => return Err(error),
        },
        // Postback style: the data is the query string, taken raw (not decoded or reordered).
        Method::GET => Bytes::copy_from_slice(query.as_bytes()),
        _ => {
            discard(&parts.headers, body, &state.limits, true).await;
            return Err(ApiError::MethodNotAllowed);
        }
    };
    if payload.is_empty() {
        return Err(ApiError::EmptyPayload);
    }
    // BigQuery STRING holds UTF-8 only; refusing here tells the sender, where the sink could
    // only dead-letter it.
    if std::str::from_utf8(&payload).is_err() {
        return Err(ApiError::NotUtf8);
    }
    let verified = match streams.verifiers.get(&stream_id) {
        Some(verifier) => {
            let now_secs = received_at_ms.div_euclid(1000);
            verifier
                .verify(&parts.headers, &payload, now_secs)
                .map_err(|failure| {
                    state.metrics.auth_failure(label, failure.reason());
                    ApiError::Unauthorized(failure.message())
                })?
        }
        None => Verified { signature: None },
    };
    let header_str = |name: &HeaderName| parts.headers.get(name).and_then(|v| v.to_str().ok());
    let placement = streams.placements.get(&stream_id);
    let key_header = placement
        .and_then(|p| p.idempotency_header.as_ref())
        .unwrap_or(&state.idempotency_header);
    let idempotency_key = match parts.headers.get(key_header) {
        None => None,
        // A key the gateway would otherwise have to ignore (non-ASCII, control characters)
        // is refused: ignoring it would turn the sender's retries into extra rows.
        Some(value) => Some(
            value
                .to_str()
                .map_err(|_| ApiError::IdempotencyKeyNotAscii)?,
        ),
    }
    .filter(|k| !k.is_empty());
    // The key travels in every envelope: a sender must not make it a second payload.
    if idempotency_key.is_some_and(|k| k.len() > MAX_IDEMPOTENCY_KEY_BYTES) {
        return Err(ApiError::IdempotencyKeyTooLong);
    }
    let payload_len = payload.len();
    let (hit_id, envelope) = envelope::encode(&Received {
        table: placement.map_or("", |p| p.table.as_str()),
        timezone: placement.map_or("", |p| p.timezone.as_str()),
        stream_id,
        received_at_ms,
        payload,
        method: parts.method.as_str(),
        content_type: header_str(&header::CONTENT_TYPE).unwrap_or(""),
        query,
        idempotency_key,
        signature: verified.signature,
        remote_addr,
        user_agent: header_str(&header::USER_AGENT).unwrap_or(""),
    });
    Ok(Prepared {
        hit_id,
        envelope,
        payload_len,
    })
}

/// Hands the envelope to the producer and waits for the broker's acknowledgement.
async fn publish<P: Publish>(state: &AppState<P>, label: &str, prepared: Prepared) -> Result<Uuid> {
    let Prepared {
        hit_id,
        envelope,
        payload_len,
    } = prepared;
    let mut key = Uuid::encode_buffer();
    let key = hit_id.hyphenated().encode_lower(&mut key);
    let publish_started = Instant::now();
    state
        .publisher
        .publish(key.as_bytes(), envelope)
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
    Ok(hit_id)
}

/// Reads the body, refusing more than the limit while reading (a missing or lying
/// Content-Length cannot make the gateway buffer more) and a sender too slow to finish. A body
/// over the limit is left where it stopped, for [`discard`].
async fn read_body<B>(headers: &HeaderMap, mut body: Pin<&mut B>, limits: &Limits) -> Result<Bytes>
where
    B: HttpBody<Data = Bytes>,
    B::Error: Into<BoxError>,
{
    let max = limits.max_body_bytes;
    let declared = declared_length(headers);
    if declared.is_some_and(|len| len > max as u64) {
        return Err(ApiError::PayloadTooLarge);
    }
    let read = async {
        // Most bodies arrive as one frame, a slice of hyper's read buffer: kept as it is, and
        // copied only when a second frame comes.
        let mut first = Bytes::new();
        let mut joined: Option<BytesMut> = None;
        let mut total = 0usize;
        while let Some(frame) = body.as_mut().frame().await {
            let frame = frame.map_err(|_| ApiError::BodyRead)?;
            let Ok(data) = frame.into_data() else {
                continue; // trailers: not part of the payload
            };
            total += data.len();
            if total > max {
                return Err(ApiError::PayloadTooLarge);
            }
            if let Some(buf) = joined.as_mut() {
                buf.extend_from_slice(&data);
            } else if first.is_empty() {
                first = data;
            } else {
                let capacity = declared.map_or(2 * total, |len| len as usize).min(max);
                let mut buf = BytesMut::with_capacity(capacity.max(total));
                buf.extend_from_slice(&first);
                buf.extend_from_slice(&data);
                joined = Some(buf);
            }
        }
        Ok(joined.map_or(first, BytesMut::freeze))
    };
    tokio::time::timeout(limits.body_timeout, read)
        .await
        .unwrap_or(Err(ApiError::BodyTimeout))
}

fn declared_length(headers: &HeaderMap) -> Option<u64> {
    headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
}

/// How much of a refused request's body the gateway reads and throws away so the sender gets
/// the answer.
const DISCARD_MAX_BYTES: u64 = 16 * 1024 * 1024;

/// Reads and throws away what is left of the body of a request answered with an error (at most
/// [`DISCARD_MAX_BYTES`], within the body timeout). hyper closes a connection whose request
/// body was not read to the end, and a sender still writing its body then gets a reset ("broken
/// pipe") instead of the 413, 429 or 404 it should act on. A declared body larger than the
/// allowance is not read (that connection is closed, as before), nor an unread one whose
/// sender waits for `100 Continue`: it has sent nothing yet, and reading would invite it to.
async fn discard<B>(headers: &HeaderMap, mut body: Pin<&mut B>, limits: &Limits, unread: bool)
where
    B: HttpBody<Data = Bytes>,
{
    let mut left = (limits.max_body_bytes as u64).saturating_add(DISCARD_MAX_BYTES);
    if body.is_end_stream()
        || (unread && headers.contains_key(header::EXPECT))
        || declared_length(headers).is_some_and(|len| len > left)
    {
        return;
    }
    let drain = async {
        while let Some(Ok(frame)) = body.as_mut().frame().await {
            let len = frame.data_ref().map_or(0, |data| data.len() as u64);
            match left.checked_sub(len) {
                Some(rest) => left = rest,
                None => break,
            }
        }
    };
    let _ = tokio::time::timeout(limits.body_timeout, drain).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The webhook port's 202 (inline, no allocation) is the same JSON, with the same declared
    /// length, as the router's.
    #[tokio::test]
    async fn an_accepted_answer_is_the_hit_id_json_with_its_exact_length() {
        let hit_id = Uuid::now_v7();
        let expected = format!(r#"{{"hit_id":"{hit_id}"}}"#);
        let response = accepted_response(&hit_id);
        assert_eq!(response.status(), StatusCode::ACCEPTED);
        assert_eq!(response.headers()[header::CONTENT_TYPE], "application/json");
        let body = response.into_body();
        assert_eq!(body.size_hint().exact(), Some(expected.len() as u64));
        let bytes = body.collect().await.unwrap().to_bytes();
        assert_eq!(bytes, expected.as_bytes());
        // Through the router the same bytes.
        let routed = Body::from(accepted_response(&hit_id).into_body());
        let bytes = routed.collect().await.unwrap().to_bytes();
        assert_eq!(bytes, expected.as_bytes());
    }

    #[test]
    fn the_inline_json_reads_in_pieces() {
        let hit_id = Uuid::now_v7();
        let mut json = Chunk::Accepted(AcceptedJson::new(&hit_id));
        json.advance(11);
        assert_eq!(json.remaining(), 38);
        assert_eq!(json.chunk(), format!(r#"{hit_id}"}}"#).as_bytes());
        json.advance(38);
        assert!(!json.has_remaining());
    }
}
