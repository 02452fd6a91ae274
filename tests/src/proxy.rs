//! A fault-injecting proxy in front of the BigQuery emulator, for the tests of what the sink
//! does when BigQuery misbehaves: one table refused (403 for that table only), a 5xx storm on
//! writes, slow answers, and answers lost after the request was served. It forwards everything
//! else unchanged, REST (HTTP/1.1) and the Storage Write API (gRPC over HTTP/2) alike, and
//! counts what it refused.

use std::convert::Infallible;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures_util::StreamExt as _;
use http_body_util::{BodyExt, Full, combinators::BoxBody};
use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo};

type BoxError = Box<dyn std::error::Error + Send + Sync>;
type Body = BoxBody<Bytes, BoxError>;

/// What the proxy does to requests now.
#[derive(Clone, Debug, Default)]
struct Rules {
    /// Tables (`dataset.table`) every request about which is refused with 403 accessDenied
    /// (gRPC: PERMISSION_DENIED).
    denied: Vec<(String, String)>,
    /// Every write (insertAll; gRPC AppendRows) is answered with this HTTP status (gRPC:
    /// UNAVAILABLE), without reaching the emulator; an AppendRows call already open is cut at
    /// its next append.
    fail_writes: Option<u16>,
    /// Every request waits this long before it is forwarded.
    delay: Duration,
    /// The next this-many writes are forwarded, served by the emulator, and then their answer
    /// is dropped (the connection is closed): the caller cannot know they landed.
    lose_answers: u32,
}

/// A running proxy. Dropping it stops it.
pub struct FaultProxy {
    pub port: u16,
    rules: Arc<Mutex<Rules>>,
    refused: Arc<AtomicU64>,
    lost: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

fn lock(rules: &Mutex<Rules>) -> std::sync::MutexGuard<'_, Rules> {
    match rules.lock() {
        Ok(g) => g,
        Err(p) => p.into_inner(),
    }
}

impl FaultProxy {
    /// Starts a proxy on a free port of 127.0.0.1 forwarding to `upstream` (`host:port`).
    pub async fn start(upstream: &str) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let rules = Arc::new(Mutex::new(Rules::default()));
        let refused = Arc::new(AtomicU64::new(0));
        let lost = Arc::new(AtomicU64::new(0));
        let state = Arc::new(State {
            upstream: upstream.to_owned(),
            rules: rules.clone(),
            refused: refused.clone(),
            lost: lost.clone(),
            http1: Client::builder(TokioExecutor::new()).build(HttpConnector::new()),
            http2: Client::builder(TokioExecutor::new())
                .http2_only(true)
                .build(HttpConnector::new()),
        });
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let state = state.clone();
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(move |request| {
                        let state = state.clone();
                        async move { Ok::<_, Infallible>(state.handle(request).await) }
                    });
                    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        Self {
            port,
            rules,
            refused,
            lost,
            task,
        }
    }

    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// Refuses every request about `table` (`project.dataset.table` or `dataset.table`).
    pub fn deny_table(&self, table: &str) {
        let parts: Vec<&str> = table.split('.').collect();
        let (dataset, name) = (parts[parts.len() - 2], parts[parts.len() - 1]);
        lock(&self.rules)
            .denied
            .push((dataset.to_owned(), name.to_owned()));
    }

    /// Lets every table through again.
    pub fn allow_all_tables(&self) {
        lock(&self.rules).denied.clear();
    }

    /// Answers every write with `status` (None: forwards them again).
    pub fn fail_writes(&self, status: Option<u16>) {
        lock(&self.rules).fail_writes = status;
    }

    pub fn delay(&self, delay: Duration) {
        lock(&self.rules).delay = delay;
    }

    /// Serves the next `n` writes and then drops their answers.
    pub fn lose_answers(&self, n: u32) {
        lock(&self.rules).lose_answers = n;
    }

    /// Requests refused so far.
    pub fn refused(&self) -> u64 {
        self.refused.load(Ordering::Relaxed)
    }

    /// Answers dropped so far (after the emulator served the request).
    pub fn lost(&self) -> u64 {
        self.lost.load(Ordering::Relaxed)
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

struct State {
    upstream: String,
    rules: Arc<Mutex<Rules>>,
    refused: Arc<AtomicU64>,
    lost: Arc<AtomicU64>,
    http1: Client<HttpConnector, Body>,
    http2: Client<HttpConnector, Body>,
}

fn full(bytes: impl Into<Bytes>) -> Body {
    Full::new(bytes.into())
        .map_err(|never| match never {})
        .boxed()
}

/// An upstream (or client) body as the proxy's body type.
fn boxed<B>(body: B) -> Body
where
    B: hyper::body::Body<Data = Bytes> + Send + Sync + 'static,
    B::Error: Into<BoxError>,
{
    BodyExt::boxed(body.map_err(Into::into))
}

/// Whether `text` holds `needle` followed by something that cannot continue a table name.
fn names(text: &str, needle: &str) -> bool {
    text.match_indices(needle).any(|(at, _)| {
        text[at + needle.len()..]
            .chars()
            .next()
            .is_none_or(|c| !(c.is_ascii_alphanumeric() || c == '_' || c == '-'))
    })
}

/// Whether the request (path and the start of its body) is about one of the denied tables.
fn about_denied(path: &str, head: &[u8], denied: &[(String, String)]) -> bool {
    let body = String::from_utf8_lossy(head);
    denied.iter().any(|(dataset, table)| {
        let resource = format!("datasets/{dataset}/tables/{table}");
        names(path, &resource)
            // A query naming it, a table being created, a write stream's name (gRPC).
            || body.contains(&format!("{dataset}.{table}`"))
            || (body.contains(&format!("\"datasetId\":\"{dataset}\""))
                && body.contains(&format!("\"tableId\":\"{table}\"")))
            || names(&body, &resource)
    })
}

/// The error that cuts a proxied gRPC call after the emulator answered: hyper resets the
/// stream, and the client sees the call fail without the answer.
fn lost_answer() -> BoxError {
    Box::new(std::io::Error::other("answer lost (fault proxy)"))
}

fn is_write(path: &str) -> bool {
    path.ends_with("/insertAll") || path.ends_with("/AppendRows")
}

fn refusal(grpc: bool, status: u16, reason: &str, message: &str) -> Response<Body> {
    if grpc {
        // A trailers-only gRPC answer: the status travels in the headers.
        let code = match status {
            403 => "7", // PERMISSION_DENIED
            404 => "5", // NOT_FOUND
            429 => "8", // RESOURCE_EXHAUSTED
            _ => "14",  // UNAVAILABLE
        };
        return Response::builder()
            .status(StatusCode::OK)
            .header("content-type", "application/grpc")
            .header("grpc-status", code)
            .header("grpc-message", message.replace(' ', "%20"))
            .body(full(Bytes::new()))
            .unwrap();
    }
    let body = serde_json::json!({"error": {
        "code": status,
        "message": message,
        "errors": [{"reason": reason, "message": message}],
        "status": reason,
    }});
    Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .body(full(body.to_string()))
        .unwrap()
}

impl State {
    async fn handle(&self, request: Request<Incoming>) -> Response<Body> {
        let rules = lock(&self.rules).clone();
        let grpc = request
            .headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.starts_with("application/grpc"));
        let path = request.uri().path().to_owned();
        if !rules.delay.is_zero() {
            tokio::time::sleep(rules.delay).await;
        }
        let (parts, mut body) = request.into_parts();
        // Read the start of the body (all of a REST request; the first frame of a gRPC one),
        // to see which table it is about, then forward it unchanged.
        let mut head = Vec::new();
        let mut ended = false;
        while head.len() < 64 * 1024 {
            match body.frame().await {
                Some(Ok(frame)) => {
                    if let Ok(data) = frame.into_data() {
                        head.extend_from_slice(&data);
                        if grpc {
                            break;
                        }
                    }
                }
                Some(Err(_)) => return refusal(grpc, 503, "backendError", "broken request"),
                None => {
                    ended = true;
                    break;
                }
            }
        }
        if about_denied(&path, &head, &rules.denied) {
            self.refused.fetch_add(1, Ordering::Relaxed);
            return refusal(
                grpc,
                403,
                "accessDenied",
                "Access Denied: the fault proxy refuses this table",
            );
        }
        if is_write(&path)
            && let Some(status) = rules.fail_writes
        {
            self.refused.fetch_add(1, Ordering::Relaxed);
            return refusal(grpc, status, "backendError", "Backend error (fault proxy)");
        }
        // A REST write's answer is dropped whole; a gRPC stream's answers one at a time, as
        // they come (below), since one AppendRows call carries many appends.
        let lose = !grpc && is_write(&path) && {
            let mut r = lock(&self.rules);
            if r.lose_answers > 0 {
                r.lose_answers -= 1;
                true
            } else {
                false
            }
        };
        let first = Bytes::from(head);
        let rest: Body = if ended {
            full(first)
        } else {
            // A write call already open when writes start failing (one gRPC AppendRows call
            // carries many appends) is cut at its next append, as a failing server would.
            let (rules, refused) = (self.rules.clone(), self.refused.clone());
            let cut = is_write(&path);
            let stream = futures_util::stream::once(async move {
                Ok::<_, BoxError>(hyper::body::Frame::data(first))
            })
            .chain(http_body_util::BodyStream::new(body).map(move |f| {
                if cut && lock(&rules).fail_writes.is_some() {
                    refused.fetch_add(1, Ordering::Relaxed);
                    return Err(BoxError::from("writes failing (fault proxy)"));
                }
                f.map_err(BoxError::from)
            }));
            BodyExt::boxed(http_body_util::StreamBody::new(stream))
        };
        let mut forward = Request::from_parts(parts, rest);
        let uri = format!(
            "http://{}{}",
            self.upstream,
            forward
                .uri()
                .path_and_query()
                .map(|p| p.as_str())
                .unwrap_or("/")
        );
        *forward.uri_mut() = uri.parse().unwrap();
        forward.headers_mut().remove("host");
        let client = if grpc { &self.http2 } else { &self.http1 };
        match client.request(forward).await {
            Ok(response) if lose => {
                // Let the emulator serve it, then drop the answer: all of a REST answer; the
                // first answer of a gRPC stream (the first append was stored), after which the
                // call is cut.
                let (_, mut body) = response.into_parts();
                if grpc {
                    while let Some(Ok(frame)) = body.frame().await {
                        if frame.is_data() {
                            break;
                        }
                    }
                } else {
                    let _ = body.collect().await;
                }
                self.lost.fetch_add(1, Ordering::Relaxed);
                refusal(grpc, 503, "backendError", "answer lost (fault proxy)")
            }
            Ok(response) if grpc && is_write(&path) => {
                // Each answer frame: forwarded, unless an answer is to be lost; then the
                // emulator has stored that append and the call is cut before its answer.
                let (parts, body) = response.into_parts();
                let (rules, lost) = (self.rules.clone(), self.lost.clone());
                let frames = http_body_util::BodyStream::new(body).map(move |frame| {
                    let frame = frame.map_err(BoxError::from)?;
                    if frame.is_data() {
                        let mut r = lock(&rules);
                        if r.lose_answers > 0 {
                            r.lose_answers -= 1;
                            lost.fetch_add(1, Ordering::Relaxed);
                            return Err(lost_answer());
                        }
                    }
                    Ok(frame)
                });
                Response::from_parts(
                    parts,
                    BodyExt::boxed(http_body_util::StreamBody::new(frames)),
                )
            }
            Ok(response) => response.map(boxed),
            Err(_) => refusal(grpc, 502, "backendError", "upstream unreachable"),
        }
    }
}

/// Both of the emulator's APIs behind fault proxies: REST (tables, lookups, insertAll) and
/// the Storage Write API (gRPC). Faults apply to whichever path carries them.
pub struct FaultyBigQuery {
    pub rest: FaultProxy,
    pub grpc: FaultProxy,
}

impl FaultyBigQuery {
    /// Proxies in front of `servers`' emulator.
    pub async fn start(servers: &crate::Servers) -> Self {
        let addr = |url: &str| url.trim_start_matches("http://").to_owned();
        Self {
            rest: FaultProxy::start(&addr(&servers.bq_rest)).await,
            grpc: FaultProxy::start(&addr(&servers.bq_grpc)).await,
        }
    }

    /// The sink settings that send it through the proxies.
    pub fn sink_env(&self) -> [(&'static str, String); 2] {
        [
            (
                "HOOKPIPE_BIGQUERY_ENDPOINT",
                format!("http://{}/bigquery/v2", self.rest.addr()),
            ),
            (
                "HOOKPIPE_BIGQUERY_STORAGE_ENDPOINT",
                format!("http://{}", self.grpc.addr()),
            ),
        ]
    }

    pub fn deny_table(&self, table: &str) {
        self.rest.deny_table(table);
        self.grpc.deny_table(table);
    }

    pub fn allow_all_tables(&self) {
        self.rest.allow_all_tables();
        self.grpc.allow_all_tables();
    }

    /// Every write (insertAll, AppendRows) answered with `status`.
    pub fn fail_writes(&self, status: Option<u16>) {
        self.rest.fail_writes(status);
        self.grpc.fail_writes(status);
    }

    pub fn delay(&self, delay: Duration) {
        self.rest.delay(delay);
        self.grpc.delay(delay);
    }

    /// The next `n` writes served and their answers dropped.
    pub fn lose_answers(&self, n: u32) {
        self.rest.lose_answers(n);
        self.grpc.lose_answers(n);
    }

    pub fn refused(&self) -> u64 {
        self.rest.refused() + self.grpc.refused()
    }

    pub fn lost(&self) -> u64 {
        self.rest.lost() + self.grpc.lost()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_about_a_denied_table_are_recognised() {
        let denied = vec![("d".to_owned(), "t".to_owned())];
        assert!(about_denied(
            "/bigquery/v2/projects/p/datasets/d/tables/t/insertAll",
            b"",
            &denied
        ));
        assert!(about_denied(
            "/bigquery/v2/projects/p/datasets/d/tables/t",
            b"",
            &denied
        ));
        assert!(!about_denied(
            "/bigquery/v2/projects/p/datasets/d/tables/t2",
            b"",
            &denied
        ));
        assert!(about_denied(
            "/bigquery/v2/projects/p/queries",
            b"{\"query\":\"SELECT DISTINCT hit_id FROM `p.d.t` WHERE\"}",
            &denied
        ));
        assert!(!about_denied(
            "/bigquery/v2/projects/p/queries",
            b"{\"query\":\"SELECT DISTINCT hit_id FROM `p.d.t2` WHERE\"}",
            &denied
        ));
        assert!(about_denied(
            "/google.cloud.bigquery.storage.v1.BigQueryWrite/AppendRows",
            b"\x00\x00\x00\x00\x30\n.projects/p/datasets/d/tables/t/streams/abc",
            &denied
        ));
        assert!(about_denied(
            "/google.cloud.bigquery.storage.v1.BigQueryWrite/CreateWriteStream",
            b"\x00\x00\x00\x00\x30\n\x1fprojects/p/datasets/d/tables/t\x12\x02\x08\x01",
            &denied
        ));
        assert!(!about_denied(
            "/google.cloud.bigquery.storage.v1.BigQueryWrite/CreateWriteStream",
            b"\x00\x00\x00\x00\x30\n\x1fprojects/p/datasets/d/tables/t2\x12\x02\x08\x01",
            &denied
        ));
    }
}
