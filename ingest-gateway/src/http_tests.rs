//! Router tests: every status of the webhook API, driven through the real router with
//! `oneshot`. The publisher is an in-memory stand-in; the real-broker behaviour is covered by
//! the integration tests in `tests/`.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use hookpipe_common::Catalogue;
use hookpipe_common::catalogue::Shared;
use hookpipe_proto::{Envelope, Message};
use http_body_util::BodyExt;
use tower::ServiceExt;

use crate::http::{AppState, GatewayStreams, Limits, app};
use crate::metrics::Metrics;
use crate::publisher::{Publish, PublishError};

const STREAM: &str = "522ed95e-9f07-45f6-a0b7-28bf2d0315e5";
const BEARER_STREAM: &str = "8d0c3b8e-52a5-4c0e-9d2a-9a1f7e3c1d01";

#[derive(Default)]
struct Recorder {
    sent: Mutex<Vec<(Vec<u8>, Envelope)>>,
    fail: Mutex<Option<PublishError>>,
}

impl Publish for Recorder {
    async fn publish(&self, key: &[u8], value: Vec<u8>) -> Result<(), PublishError> {
        if let Some(error) = self.fail.lock().unwrap().clone() {
            return Err(error);
        }
        let envelope = Envelope::decode(value.as_slice()).unwrap();
        self.sent.lock().unwrap().push((key.to_vec(), envelope));
        Ok(())
    }
    fn queue_len(&self) -> usize {
        0
    }
    fn check_ready(&self, _: Duration) -> Result<(), String> {
        Ok(())
    }
    fn flush(&self, _: Duration) -> Result<(), String> {
        Ok(())
    }
}

fn state(recorder: Arc<Recorder>, slots: usize) -> Arc<AppState<Recorder>> {
    let yaml = format!(
        "streams:\n  - id: {STREAM}\n    table: p.d.t\n    timezone: \"+03:00\"\n  - id: {BEARER_STREAM}\n    table: p.d.t2\n    timezone: UTC\n    auth:\n      type: bearer\n      secrets: [{{file: {}}}]\n",
        secret_file().display()
    );
    let metrics = Arc::new(Metrics::new());
    let streams = GatewayStreams::build(Catalogue::from_yaml(&yaml).unwrap())
        .unwrap()
        .counted_by(&metrics);
    Arc::new(AppState {
        streams: Arc::new(Shared::new(streams)),
        publisher: recorder,
        metrics,
        limits: Limits {
            max_body_bytes: 1024,
            body_timeout: Duration::from_secs(2),
        },
        slots: Arc::new(tokio::sync::Semaphore::new(slots)),
        idempotency_header: "idempotency-key".parse().unwrap(),
    })
}

/// Written once: tests run in parallel and must not see a half-written file.
fn secret_file() -> &'static std::path::Path {
    static PATH: std::sync::OnceLock<std::path::PathBuf> = std::sync::OnceLock::new();
    PATH.get_or_init(|| {
        let path =
            std::env::temp_dir().join(format!("hookpipe-gw-test-token-{}", std::process::id()));
        std::fs::write(&path, "tok-1\n").unwrap();
        path
    })
}

async fn call(
    state: Arc<AppState<Recorder>>,
    request: Request<Body>,
) -> (StatusCode, axum::http::HeaderMap, serde_json::Value) {
    let response = app(state).oneshot(request).await.unwrap();
    let status = response.status();
    let headers = response.headers().clone();
    let body = response.into_body().collect().await.unwrap().to_bytes();
    let json = serde_json::from_slice(&body).unwrap_or(serde_json::Value::Null);
    (status, headers, json)
}

fn post(path: &str, body: impl Into<Body>) -> Request<Body> {
    Request::post(path)
        .header("content-type", "application/x-www-form-urlencoded")
        .body(body.into())
        .unwrap()
}

#[tokio::test]
async fn accepted_post_publishes_the_body_byte_for_byte() {
    let rec = Arc::new(Recorder::default());
    let body = "orderId=N1&status=delivered&total=120.13&userId=U1";
    let (status, _, json) =
        call(state(rec.clone(), 10), post(&format!("/ds/{STREAM}"), body)).await;
    assert_eq!(status, StatusCode::ACCEPTED);
    let hit_id = json["hit_id"].as_str().unwrap();
    let sent = rec.sent.lock().unwrap();
    assert_eq!(sent.len(), 1);
    let (key, env) = &sent[0];
    assert_eq!(key.as_slice(), hit_id.as_bytes(), "Kafka key is the hit_id");
    assert_eq!(env.hit_id, hit_id);
    assert_eq!(&env.payload[..], body.as_bytes());
    assert_eq!(env.stream_id, STREAM);
    assert_eq!(env.method, "POST");
    assert_eq!(env.content_type, "application/x-www-form-urlencoded");
}

#[tokio::test]
async fn get_postback_payload_is_the_raw_query_string() {
    let rec = Arc::new(Recorder::default());
    let q = "orderId=N1&status=delivered&note=a%20b&x=1&x=2";
    let req = Request::get(format!("/ds/{STREAM}?{q}"))
        .body(Body::empty())
        .unwrap();
    let (status, _, _) = call(state(rec.clone(), 10), req).await;
    assert_eq!(status, StatusCode::ACCEPTED);
    let sent = rec.sent.lock().unwrap();
    assert_eq!(&sent[0].1.payload[..], q.as_bytes());
    assert_eq!(sent[0].1.query, q);
    assert_eq!(sent[0].1.method, "GET");
}

#[tokio::test]
async fn idempotency_key_gives_the_same_hit_id() {
    let rec = Arc::new(Recorder::default());
    let st = state(rec.clone(), 10);
    let req = || {
        Request::post(format!("/ds/{STREAM}"))
            .header("idempotency-key", "N1-delivered")
            .body(Body::from("a=1"))
            .unwrap()
    };
    let (_, _, a) = call(st.clone(), req()).await;
    let (_, _, b) = call(st, req()).await;
    assert_eq!(a["hit_id"], b["hit_id"]);
    assert_eq!(
        rec.sent.lock().unwrap()[0].1.idempotency_key.as_deref(),
        Some("N1-delivered")
    );
}

#[tokio::test]
async fn an_idempotency_key_over_255_bytes_is_400_and_not_published() {
    let rec = Arc::new(Recorder::default());
    for (len, expected) in [(255, StatusCode::ACCEPTED), (256, StatusCode::BAD_REQUEST)] {
        let req = Request::post(format!("/ds/{STREAM}"))
            .header("idempotency-key", "k".repeat(len))
            .body(Body::from("a=1"))
            .unwrap();
        let (status, _, json) = call(state(rec.clone(), 10), req).await;
        assert_eq!(status, expected, "{len} bytes: {json}");
    }
    assert_eq!(rec.sent.lock().unwrap().len(), 1);
}

#[tokio::test]
async fn unknown_or_malformed_stream_is_404() {
    let rec = Arc::new(Recorder::default());
    for path in [
        "/ds/0b7c7c8e-3f7e-4c59-9a53-5d7f0f1f2b10".to_string(),
        "/ds/not-a-uuid".into(),
        format!("/ds/{STREAM}/"),
        format!("/ds/{STREAM}/extra"),
        "/elsewhere".into(),
    ] {
        let (status, _, json) = call(state(rec.clone(), 10), post(&path, "a=1")).await;
        assert_eq!(status, StatusCode::NOT_FOUND, "{path}");
        assert!(json["error"].is_string(), "{path}: {json}");
    }
    assert!(rec.sent.lock().unwrap().is_empty());
}

#[tokio::test]
async fn other_methods_are_405_with_allow() {
    let rec = Arc::new(Recorder::default());
    for method in ["PUT", "DELETE", "PATCH", "HEAD"] {
        let req = Request::builder()
            .method(method)
            .uri(format!("/ds/{STREAM}"))
            .body(Body::from("a=1"))
            .unwrap();
        let (status, headers, _) = call(state(rec.clone(), 10), req).await;
        assert_eq!(status, StatusCode::METHOD_NOT_ALLOWED, "{method}");
        assert_eq!(headers["allow"], "GET, POST");
    }
}

#[tokio::test]
async fn oversized_body_is_413_with_or_without_content_length() {
    let rec = Arc::new(Recorder::default());
    let big = "a".repeat(1025);
    let (status, _, json) = call(
        state(rec.clone(), 10),
        post(&format!("/ds/{STREAM}"), big.clone()),
    )
    .await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(json["error"], "payload too large");
    // A streamed body carries no Content-Length: the limit applies while reading.
    let stream = futures_stream(big.into_bytes());
    let (status, _, _) = call(
        state(rec.clone(), 10),
        post(&format!("/ds/{STREAM}"), stream),
    )
    .await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);
    // Exactly at the limit is fine.
    let (status, _, _) = call(
        state(rec, 10),
        post(&format!("/ds/{STREAM}"), "a".repeat(1024)),
    )
    .await;
    assert_eq!(status, StatusCode::ACCEPTED);
}

/// A streamed body of `chunks` pieces of 100 bytes that counts the pieces read.
fn counted_body(chunks: usize) -> (Body, Arc<std::sync::atomic::AtomicUsize>) {
    let read = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counter = read.clone();
    let pieces = (0..chunks).map(move |_| {
        counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        Ok::<_, std::io::Error>(bytes::Bytes::from_static(&[b'a'; 100]))
    });
    struct Lazy<I>(I);
    impl<I: Iterator + Unpin> futures_core::Stream for Lazy<I> {
        type Item = I::Item;
        fn poll_next(
            mut self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
        ) -> std::task::Poll<Option<I::Item>> {
            std::task::Poll::Ready(self.0.next())
        }
    }
    (Body::from_stream(Lazy(pieces)), read)
}

#[tokio::test]
async fn a_refused_body_is_read_to_the_end_unless_the_sender_waits_for_100_continue() {
    use std::sync::atomic::Ordering::SeqCst;
    let rec = Arc::new(Recorder::default());
    // Over the limit while reading: the rest is read and thrown away, so hyper can keep the
    // connection and the sender, still writing, reads the 413.
    let (body, read) = counted_body(20);
    let (status, _, _) = call(state(rec.clone(), 10), post(&format!("/ds/{STREAM}"), body)).await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(read.load(SeqCst), 20);
    // Refused before reading (unknown stream, no free slot): the same.
    let (body, read) = counted_body(5);
    let unknown = format!("/ds/{}", uuid::Uuid::new_v4());
    let (status, _, _) = call(state(rec.clone(), 10), post(&unknown, body)).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_eq!(read.load(SeqCst), 5);
    let (body, read) = counted_body(5);
    let (status, _, _) = call(state(rec.clone(), 0), post(&format!("/ds/{STREAM}"), body)).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(read.load(SeqCst), 5);
    // Refused by its Content-Length: read too...
    let declared = |expect: bool| {
        let (body, read) = counted_body(20);
        let mut request = post(&format!("/ds/{STREAM}"), body);
        let headers = request.headers_mut();
        headers.insert("content-length", "2000".parse().unwrap());
        if expect {
            headers.insert("expect", "100-continue".parse().unwrap());
        }
        (request, read)
    };
    let (request, read) = declared(false);
    let (status, _, _) = call(state(rec.clone(), 10), request).await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(read.load(SeqCst), 20);
    // ...unless the sender waits for `100 Continue` and has sent nothing.
    let (request, read) = declared(true);
    let (status, _, _) = call(state(rec.clone(), 10), request).await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(read.load(SeqCst), 0);
    assert!(rec.sent.lock().unwrap().is_empty());
}

fn futures_stream(data: Vec<u8>) -> Body {
    let chunks: Vec<Result<bytes::Bytes, std::io::Error>> = data
        .chunks(100)
        .map(|c| Ok(bytes::Bytes::copy_from_slice(c)))
        .collect();
    Body::from_stream(tokio_stream_iter(chunks))
}

fn tokio_stream_iter<T: Send + 'static>(
    items: Vec<T>,
) -> impl futures_core::Stream<Item = T> + Send {
    struct Iter<T>(std::vec::IntoIter<T>);
    impl<T> futures_core::Stream for Iter<T> {
        type Item = T;
        fn poll_next(
            mut self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
        ) -> std::task::Poll<Option<T>> {
            std::task::Poll::Ready(self.0.next())
        }
    }
    impl<T> Unpin for Iter<T> {}
    Iter(items.into_iter())
}

#[tokio::test]
async fn non_utf8_and_empty_bodies_are_400() {
    let rec = Arc::new(Recorder::default());
    let (status, _, json) = call(
        state(rec.clone(), 10),
        post(&format!("/ds/{STREAM}"), vec![0x66, 0xff, 0x6f]),
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(json["error"], "payload is not valid UTF-8");
    let (status, _, json) = call(state(rec.clone(), 10), post(&format!("/ds/{STREAM}"), "")).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(json["error"], "empty payload");
    let req = Request::get(format!("/ds/{STREAM}"))
        .body(Body::empty())
        .unwrap();
    let (status, _, _) = call(state(rec.clone(), 10), req).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(rec.sent.lock().unwrap().is_empty());
}

#[tokio::test]
async fn bearer_stream_needs_its_token() {
    let rec = Arc::new(Recorder::default());
    let path = format!("/ds/{BEARER_STREAM}");
    let (status, headers, json) = call(state(rec.clone(), 10), post(&path, "a=1")).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert_eq!(json["error"], "missing bearer token");
    assert!(headers.contains_key("www-authenticate"));
    let with = |token: &str| {
        Request::post(&path)
            .header("authorization", format!("Bearer {token}"))
            .body(Body::from("a=1"))
            .unwrap()
    };
    let (status, _, json) = call(state(rec.clone(), 10), with("wrong")).await;
    assert_eq!(
        (status, json["error"].as_str()),
        (StatusCode::UNAUTHORIZED, Some("invalid token"))
    );
    let (status, _, _) = call(state(rec.clone(), 10), with("tok-1")).await;
    assert_eq!(status, StatusCode::ACCEPTED);
    assert_eq!(rec.sent.lock().unwrap().len(), 1);
}

#[tokio::test]
async fn broker_trouble_is_503_with_retry_after_and_never_2xx() {
    for error in [
        PublishError::QueueFull,
        PublishError::Timeout,
        PublishError::Stalled,
        PublishError::Broker("all brokers down".into()),
    ] {
        let rec = Arc::new(Recorder::default());
        *rec.fail.lock().unwrap() = Some(error.clone());
        let (status, headers, json) =
            call(state(rec, 10), post(&format!("/ds/{STREAM}"), "a=1")).await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{error:?}");
        assert_eq!(headers["retry-after"], "1");
        let reason = json["error"].as_str().unwrap();
        assert!(
            !reason.contains("all brokers down"),
            "internal text leaked: {reason}"
        );
    }
}

#[tokio::test]
async fn a_message_too_large_for_the_topic_is_413_never_503() {
    let rec = Arc::new(Recorder::default());
    *rec.fail.lock().unwrap() = Some(PublishError::TooLarge);
    let (status, headers, json) = call(state(rec, 10), post(&format!("/ds/{STREAM}"), "a=1")).await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);
    assert!(headers.get("retry-after").is_none());
    assert_eq!(
        json["error"], "payload too large",
        "a sender must not retry this"
    );
}

#[tokio::test]
async fn a_rate_limited_stream_answers_429_past_its_burst_and_other_streams_do_not_notice() {
    let limited = "4a1f3a52-6a43-4f43-8a3b-1f9e51a8d0aa";
    let yaml = format!(
        "streams:\n  - id: {STREAM}\n    table: p.d.t\n    timezone: UTC\n  - id: {limited}\n    table: p.d.l\n    timezone: UTC\n    rate_limit: {{per_second: 1, burst: 3}}\n"
    );
    let rec = Arc::new(Recorder::default());
    let st = state(rec.clone(), 10);
    let streams = GatewayStreams::build(Catalogue::from_yaml(&yaml).unwrap()).unwrap();
    st.streams.replace(streams);
    for _ in 0..3 {
        let (status, _, _) = call(st.clone(), post(&format!("/ds/{limited}"), "a=1")).await;
        assert_eq!(status, StatusCode::ACCEPTED);
    }
    let (status, headers, json) = call(st.clone(), post(&format!("/ds/{limited}"), "a=1")).await;
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(headers["retry-after"], "1");
    assert_eq!(
        json["error"],
        "rate limit exceeded for this stream, retry later"
    );
    assert_eq!(rec.sent.lock().unwrap().len(), 3, "a 429 is not published");
    // Another stream is not limited.
    for _ in 0..10 {
        let (status, _, _) = call(st.clone(), post(&format!("/ds/{STREAM}"), "a=1")).await;
        assert_eq!(status, StatusCode::ACCEPTED);
    }
    // A reload with the same limit keeps the bucket (no fresh burst); a changed limit is new.
    let again =
        GatewayStreams::build_after(Catalogue::from_yaml(&yaml).unwrap(), &st.streams.current())
            .unwrap();
    st.streams.replace(again);
    let (status, _, _) = call(st.clone(), post(&format!("/ds/{limited}"), "a=1")).await;
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS);
    let raised = GatewayStreams::build_after(
        Catalogue::from_yaml(&yaml.replace("burst: 3", "burst: 5")).unwrap(),
        &st.streams.current(),
    )
    .unwrap();
    st.streams.replace(raised);
    let (status, _, _) = call(st.clone(), post(&format!("/ds/{limited}"), "a=1")).await;
    assert_eq!(status, StatusCode::ACCEPTED);
    let text = st.metrics.registry.gather();
    let encoded = prometheus::TextEncoder::new()
        .encode_to_string(&text)
        .unwrap();
    assert!(
        encoded.contains(&format!(
            "ingest_gateway_http_requests_total{{status=\"429\",stream=\"{limited}\"}} 2"
        )),
        "{encoded}"
    );
}

#[tokio::test]
async fn no_free_slot_is_503_at_once() {
    let rec = Arc::new(Recorder::default());
    let (status, headers, json) =
        call(state(rec.clone(), 0), post(&format!("/ds/{STREAM}"), "a=1")).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(headers["retry-after"], "1");
    assert_eq!(json["error"], "too many requests in flight, retry later");
    assert!(rec.sent.lock().unwrap().is_empty());
}

#[tokio::test]
async fn metrics_count_requests_by_stream_and_status() {
    let rec = Arc::new(Recorder::default());
    let st = state(rec, 10);
    call(st.clone(), post(&format!("/ds/{STREAM}"), "a=1")).await;
    call(st.clone(), post("/ds/not-a-uuid", "a=1")).await;
    let text = metrics_text(&st);
    assert!(
        text.contains(&format!(
            "ingest_gateway_http_requests_total{{status=\"202\",stream=\"{STREAM}\"}} 1"
        )),
        "{text}"
    );
    assert!(
        text.contains("ingest_gateway_http_requests_total{status=\"404\",stream=\"unknown\"} 1"),
        "{text}"
    );
    assert!(
        text.contains("ingest_gateway_kafka_publish_duration_seconds_count 1"),
        "{text}"
    );
    assert!(
        text.contains("ingest_gateway_http_requests_in_flight 0"),
        "{text}"
    );
}

#[tokio::test]
async fn a_body_that_never_finishes_is_408() {
    let rec = Arc::new(Recorder::default());
    let mut st = state(rec.clone(), 10);
    Arc::get_mut(&mut st).unwrap().limits.body_timeout = Duration::from_millis(100);
    struct Stalled(bool);
    impl futures_core::Stream for Stalled {
        type Item = Result<bytes::Bytes, std::io::Error>;
        fn poll_next(
            mut self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
        ) -> std::task::Poll<Option<Self::Item>> {
            if self.0 {
                std::task::Poll::Pending
            } else {
                self.0 = true;
                std::task::Poll::Ready(Some(Ok(bytes::Bytes::from_static(b"orderId="))))
            }
        }
    }
    let (status, headers, json) = call(
        st,
        post(&format!("/ds/{STREAM}"), Body::from_stream(Stalled(false))),
    )
    .await;
    assert_eq!(status, StatusCode::REQUEST_TIMEOUT);
    assert_eq!(json["error"], "request body not received in time");
    assert_eq!(headers["connection"], "close");
    assert!(rec.sent.lock().unwrap().is_empty());
}

#[tokio::test]
async fn hmac_stream_checks_the_signature_through_the_router() {
    use hmac::Mac;
    let rec = Arc::new(Recorder::default());
    let key_file =
        std::env::temp_dir().join(format!("hookpipe-gw-test-hmac-{}", std::process::id()));
    std::fs::write(&key_file, "hmac-key").unwrap();
    let stream = "3a6f7c1e-1d2b-4c3d-9e8f-7a6b5c4d3e2f";
    let yaml = format!(
        "streams:\n  - id: {stream}\n    table: p.d.t\n    timezone: UTC\n    auth:\n      type: hmac-sha256\n      timestamp_header: X-Timestamp\n      secrets: [{{file: {}}}]\n",
        key_file.display()
    );
    let mut st = state(rec.clone(), 10);
    Arc::get_mut(&mut st).unwrap().streams = Arc::new(Shared::new(
        GatewayStreams::build(Catalogue::from_yaml(&yaml).unwrap()).unwrap(),
    ));
    let body = "orderId=N1&status=delivered";
    let sign = |ts: i64, key: &str| {
        let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(key.as_bytes()).unwrap();
        mac.update(format!("{ts}.{body}").as_bytes());
        mac.finalize()
            .into_bytes()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect::<String>()
    };
    let request = |ts: i64, sig: String| {
        Request::post(format!("/ds/{stream}"))
            .header("x-timestamp", ts.to_string())
            .header("x-signature", sig)
            .body(Body::from(body))
            .unwrap()
    };
    let now = hookpipe_common::now_ms() / 1000;
    let (status, _, _) = call(st.clone(), request(now, sign(now, "hmac-key"))).await;
    assert_eq!(status, StatusCode::ACCEPTED);
    let (status, _, json) = call(st.clone(), request(now, sign(now, "other-key"))).await;
    assert_eq!(
        (status, json["error"].as_str()),
        (StatusCode::UNAUTHORIZED, Some("invalid signature"))
    );
    let old = now - 3600;
    let (status, _, json) = call(st.clone(), request(old, sign(old, "hmac-key"))).await;
    assert_eq!(
        (status, json["error"].as_str()),
        (
            StatusCode::UNAUTHORIZED,
            Some("signature timestamp outside tolerance")
        )
    );
    assert_eq!(rec.sent.lock().unwrap().len(), 1);
    let text = metrics_text(&st);
    assert!(text.contains(&format!("ingest_gateway_auth_failures_total{{reason=\"invalid_signature\",stream=\"{stream}\"}} 1")), "{text}");
    assert!(
        text.contains(&format!(
            "ingest_gateway_auth_failures_total{{reason=\"stale_timestamp\",stream=\"{stream}\"}} 1"
        )),
        "{text}"
    );
}

#[test]
fn a_catalogue_naming_an_unreadable_secret_is_refused() {
    let yaml = format!(
        "streams:\n  - id: {STREAM}\n    table: p.d.t\n    timezone: UTC\n    auth:\n      type: bearer\n      secrets: [{{env: HOOKPIPE_TEST_SURELY_UNSET_VARIABLE}}]\n"
    );
    let error = GatewayStreams::build(Catalogue::from_yaml(&yaml).unwrap()).unwrap_err();
    assert!(
        error.contains("HOOKPIPE_TEST_SURELY_UNSET_VARIABLE is not set"),
        "{error}"
    );
    assert!(error.contains(STREAM), "{error}");
}

/// hyper keeps the webhook handler's future in a box per connection, so its size is memory per
/// open connection (docs/benchmarks.md, "Issue #14, round 5": 3,832 bytes before, when the
/// future was held twice over).
#[tokio::test]
async fn the_handler_future_hyper_keeps_per_connection_stays_small() {
    let mut config = rdkafka::ClientConfig::new();
    // Nothing listens there, and nothing is published: only the future's size is looked at.
    config.set("bootstrap.servers", "127.0.0.1:9");
    let publisher =
        crate::publisher::KafkaPublisher::new(&config, "t".into(), Duration::from_secs(1), 1024)
            .unwrap();
    let recorder_state = state(Arc::default(), 1);
    let state = Arc::new(AppState {
        streams: recorder_state.streams.clone(),
        publisher: Arc::new(publisher),
        metrics: recorder_state.metrics.clone(),
        limits: recorder_state.limits.clone(),
        slots: recorder_state.slots.clone(),
        idempotency_header: recorder_state.idempotency_header.clone(),
    });
    // As the webhook port hands it to hyper.
    let future = crate::server::for_hyper(crate::http::handle(
        state,
        post(&format!("/ds/{STREAM}"), "a=1"),
        None,
    ));
    let size = std::mem::size_of_val(&future);
    assert!(
        size <= 1280,
        "the per-connection handler future is {size} bytes"
    );
}

fn metrics_text(st: &AppState<Recorder>) -> String {
    let mut out = Vec::new();
    prometheus::Encoder::encode(
        &prometheus::TextEncoder::new(),
        &st.metrics.registry.gather(),
        &mut out,
    )
    .unwrap();
    String::from_utf8(out).unwrap()
}
