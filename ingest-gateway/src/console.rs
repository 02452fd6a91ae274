//! The stream console: a few server-rendered pages on the admin port, under `/ui/`, for the
//! person who sets a stream up. It lists the catalogue's streams (never a secret), and per
//! stream shows its endpoint, the integration snippet for each language (the same text as
//! `ingest-gateway streams snippet`) with a copy button, a button that sends the documented
//! example through the webhook handler exactly as a sender's request goes (signed with the
//! stream's first secret where it has auth), and live figures from the gateway's own metrics.
//!
//! The pages are minijinja templates (`ingest-gateway/ui/`, HTML auto-escaped) with a small
//! plain script and style sheet served from here: no build chain, nothing from the internet,
//! and a Content-Security-Policy that allows only this origin.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderName, HeaderValue, Request, StatusCode, header};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use hookpipe_common::catalogue::{AuthSpec, Shared, Stream};
use minijinja::{AutoEscape, Environment, context};
use prometheus::Registry;
use tower::ServiceExt as _;
use uuid::Uuid;

use crate::http::GatewayStreams;
use crate::snippets::{EXAMPLE_BODY, Lang, snippet};

/// How far back the live figures reach.
pub const WINDOW: Duration = Duration::from_secs(300);
/// How often the request counters are sampled for them.
pub const SAMPLE_EVERY: Duration = Duration::from_secs(10);
/// A test hit must carry this header: a page of another origin cannot add it without a CORS
/// preflight, which the admin port never grants, so no other site can make the gateway send.
pub const CONSOLE_HEADER: &str = "x-hookpipe-console";

/// What the console's routes need.
#[derive(Clone)]
pub struct Console {
    pub streams: Arc<Shared<GatewayStreams>>,
    /// The gateway's address as senders reach it (`HOOKPIPE_PUBLIC_URL`).
    pub public_url: String,
    /// The webhook app itself: a test hit goes through its handler like a sender's request.
    pub webhook: Router,
    /// The gateway's global idempotency header (`HOOKPIPE_IDEMPOTENCY_HEADER`).
    pub idempotency_header: HeaderName,
    pub registry: Registry,
    pub samples: Arc<Mutex<Samples>>,
}

/// Accepted and refused requests per stream, as counted since the gateway started.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counts {
    pub accepted: u64,
    pub refused: u64,
}

/// Snapshots of every stream's counts, one per [`SAMPLE_EVERY`], for the last [`WINDOW`].
#[derive(Debug, Default)]
pub struct Samples {
    taken: VecDeque<(Instant, HashMap<String, Counts>)>,
}

impl Samples {
    /// Keeps `counts` as taken at `at`, and forgets samples older than the window needs.
    pub fn record(&mut self, at: Instant, counts: HashMap<String, Counts>) {
        self.taken.push_back((at, counts));
        // Keep one sample at or beyond the window's start, so the window is always covered.
        while self.taken.len() > 1
            && self
                .taken
                .get(1)
                .is_some_and(|(t, _)| at.duration_since(*t) >= WINDOW)
        {
            self.taken.pop_front();
        }
    }

    /// The stream's counts over the last window (or since the first sample, when the
    /// gateway is younger), and the span they cover.
    pub fn over_window(&self, stream: &str, now: Instant, current: Counts) -> (Counts, Duration) {
        let base = self
            .taken
            .iter()
            .find(|(t, _)| now.duration_since(*t) <= WINDOW)
            .or(self.taken.back());
        match base {
            Some((at, counts)) => {
                let before = counts.get(stream).copied().unwrap_or_default();
                (
                    Counts {
                        accepted: current.accepted.saturating_sub(before.accepted),
                        refused: current.refused.saturating_sub(before.refused),
                    },
                    now.duration_since(*at),
                )
            }
            None => (current, Duration::ZERO),
        }
    }
}

/// Every stream's request counts, read from the registry: 202 is accepted, any other answer
/// (4xx, 5xx) refused.
pub fn read_counts(registry: &Registry) -> HashMap<String, Counts> {
    let mut counts: HashMap<String, Counts> = HashMap::new();
    for family in registry.gather() {
        if family.name() != "ingest_gateway_http_requests_total" {
            continue;
        }
        for metric in family.get_metric() {
            let label = |name: &str| {
                metric
                    .get_label()
                    .iter()
                    .find(|l| l.name() == name)
                    .map(|l| l.value().to_owned())
            };
            let (Some(stream), Some(status)) = (label("stream"), label("status")) else {
                continue;
            };
            let value = metric.get_counter().get_value() as u64;
            let entry = counts.entry(stream).or_default();
            if status == "202" {
                entry.accepted += value;
            } else {
                entry.refused += value;
            }
        }
    }
    counts
}

/// When each stream last had a webhook accepted (Unix seconds), from the registry.
fn last_accepted(registry: &Registry, stream: &str) -> Option<i64> {
    registry
        .gather()
        .into_iter()
        .find(|f| f.name() == "ingest_gateway_stream_last_accepted_timestamp_seconds")?
        .get_metric()
        .iter()
        .find(|m| m.get_label().iter().any(|l| l.value() == stream))
        .map(|m| m.get_gauge().get_value() as i64)
        .filter(|t| *t > 0)
}

/// Samples the counters every [`SAMPLE_EVERY`] until `cancel`.
pub async fn sample(
    registry: Registry,
    samples: Arc<Mutex<Samples>>,
    cancel: tokio_util::sync::CancellationToken,
) {
    let mut ticker = tokio::time::interval(SAMPLE_EVERY);
    loop {
        tokio::select! {
            () = cancel.cancelled() => return,
            _ = ticker.tick() => {}
        }
        let counts = read_counts(&registry);
        if let Ok(mut samples) = samples.lock() {
            samples.record(Instant::now(), counts);
        }
    }
}

/// `/ui/` and below.
pub fn routes(console: Console) -> Router {
    Router::new()
        .route("/ui", get(|| async { Redirect::permanent("/ui/") }))
        .route("/ui/", get(index))
        .route("/ui/streams/{id}", get(stream_page))
        .route("/ui/streams/{id}/stats", get(stats))
        .route("/ui/streams/{id}/test-hit", post(test_hit))
        .route(
            "/ui/static/console.js",
            get(|| async { asset("text/javascript", include_str!("../ui/console.js")) }),
        )
        .route(
            "/ui/static/console.css",
            get(|| async { asset("text/css", include_str!("../ui/console.css")) }),
        )
        .route(
            "/ui/static/favicon.svg",
            get(|| async { asset("image/svg+xml", include_str!("../ui/favicon.svg")) }),
        )
        .with_state(console)
}

fn asset(content_type: &'static str, text: &'static str) -> Response {
    (
        [
            (header::CONTENT_TYPE, content_type),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        text,
    )
        .into_response()
}

/// The page templates, HTML auto-escaped.
fn pages() -> &'static Environment<'static> {
    static PAGES: OnceLock<Environment<'static>> = OnceLock::new();
    PAGES.get_or_init(|| {
        let mut env = Environment::new();
        env.set_auto_escape_callback(|_| AutoEscape::Html);
        env.set_undefined_behavior(minijinja::UndefinedBehavior::Strict);
        for (name, source) in [
            ("layout.html", include_str!("../ui/layout.html")),
            ("index.html", include_str!("../ui/index.html")),
            ("stream.html", include_str!("../ui/stream.html")),
        ] {
            // Every page is rendered by the unit tests and the browser test.
            if let Err(error) = env.add_template(name, source) {
                panic!("console template {name}: {error}");
            }
        }
        env
    })
}

fn page(name: &str, ctx: minijinja::Value) -> Response {
    match pages()
        .get_template(name)
        .and_then(|template| template.render(ctx))
    {
        Ok(html) => (
            [
                (header::CONTENT_TYPE, "text/html; charset=utf-8"),
                // Nothing but this origin; no inline script or style.
                (
                    header::CONTENT_SECURITY_POLICY,
                    "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
                ),
                (header::REFERRER_POLICY, "no-referrer"),
                (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
            ],
            html,
        )
            .into_response(),
        Err(error) => {
            tracing::error!(template = name, error = %format!("{error:#}"), "console page failed");
            (StatusCode::INTERNAL_SERVER_ERROR, "console page failed").into_response()
        }
    }
}

fn auth_kind(stream: &Stream) -> &'static str {
    stream.auth.as_ref().map_or("none", AuthSpec::kind)
}

fn endpoint(base_url: &str, stream: &Stream) -> String {
    format!("{}/ds/{}", base_url.trim_end_matches('/'), stream.id)
}

fn summary(console: &Console, stream: &Stream) -> minijinja::Value {
    context! {
        id => stream.id.to_string(),
        name => stream.name.clone(),
        url => endpoint(&console.public_url, stream),
        table => stream.table.to_string(),
        zone => stream.zone.to_string(),
        auth => auth_kind(stream),
    }
}

async fn index(State(console): State<Console>) -> Response {
    let current = console.streams.current();
    let streams: Vec<minijinja::Value> = current
        .catalogue
        .streams()
        .map(|s| summary(&console, s))
        .collect();
    page("index.html", context! { streams })
}

fn find(console: &Console, id: &str) -> Option<Arc<Stream>> {
    let id = Uuid::try_parse(id).ok()?;
    console.streams.current().catalogue.get(&id).cloned()
}

fn not_found() -> Response {
    (
        StatusCode::NOT_FOUND,
        axum::Json(serde_json::json!({ "error": "unknown stream" })),
    )
        .into_response()
}

async fn stream_page(State(console): State<Console>, Path(id): Path<String>) -> Response {
    let Some(stream) = find(&console, &id) else {
        return not_found();
    };
    let snippets: Vec<minijinja::Value> = Lang::ALL
        .iter()
        .map(|lang| {
            context! {
                lang => lang.name(),
                label => lang.title(),
                file => lang.file_name(),
                code => snippet(*lang, &stream, &console.public_url),
            }
        })
        .collect();
    page(
        "stream.html",
        context! {
            stream => summary(&console, &stream),
            snippets,
            example => EXAMPLE_BODY,
            key_header => stream.idempotency_header().unwrap_or(console.idempotency_header.as_str()),
            window_minutes => WINDOW.as_secs() / 60,
        },
    )
}

async fn stats(State(console): State<Console>, Path(id): Path<String>) -> Response {
    let Some(stream) = find(&console, &id) else {
        return not_found();
    };
    let label = stream.id.to_string();
    let current = read_counts(&console.registry)
        .get(&label)
        .copied()
        .unwrap_or_default();
    let (counts, span) = match console.samples.lock() {
        Ok(samples) => samples.over_window(&label, Instant::now(), current),
        Err(_) => (current, Duration::ZERO),
    };
    axum::Json(serde_json::json!({
        "accepted": counts.accepted,
        "refused": counts.refused,
        "window_seconds": span.as_secs(),
        "last_accepted_at": last_accepted(&console.registry, &label),
    }))
    .into_response()
}

/// Sends the documented example to the stream through the webhook handler, with a fresh
/// idempotency key and, where the stream has auth, the headers its sender would add (signed
/// with its first secret); answers what the handler answered.
async fn test_hit(
    State(console): State<Console>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Response {
    if headers.get(CONSOLE_HEADER).is_none() {
        return (
            StatusCode::FORBIDDEN,
            axum::Json(serde_json::json!({ "error": "test hits come from the console page" })),
        )
            .into_response();
    }
    let Some(stream) = find(&console, &id) else {
        return not_found();
    };
    let key = format!("console-test-{}", Uuid::new_v4());
    let key_header = stream
        .idempotency_header()
        .and_then(|h| HeaderName::try_from(h).ok())
        .unwrap_or_else(|| console.idempotency_header.clone());
    let mut request = Request::post(format!("/ds/{}", stream.id))
        .header(header::CONTENT_TYPE, "application/x-www-form-urlencoded")
        .header(header::USER_AGENT, "hookpipe-console")
        .body(Body::from(EXAMPLE_BODY))
        .unwrap_or_default();
    if let Ok(value) = HeaderValue::try_from(key.as_str()) {
        request.headers_mut().insert(key_header, value);
    }
    if let Some(verifier) = console.streams.current().verifiers.get(&stream.id) {
        let now = hookpipe_common::now_ms().div_euclid(1000);
        for (name, value) in verifier.sign(EXAMPLE_BODY.as_bytes(), now, &key) {
            if let (Ok(name), Ok(value)) =
                (HeaderName::try_from(name), HeaderValue::try_from(value))
            {
                request.headers_mut().insert(name, value);
            }
        }
    }
    let response = match console.webhook.clone().oneshot(request).await {
        Ok(response) => response,
        Err(never) => match never {},
    };
    let status = response.status();
    let body = axum::body::to_bytes(response.into_body(), 64 * 1024)
        .await
        .unwrap_or_default();
    let answer: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
    tracing::info!(stream = %stream.id, status = status.as_u16(), "console test hit");
    axum::Json(serde_json::json!({
        "status": status.as_u16(),
        "hit_id": answer.get("hit_id"),
        "error": answer.get("error"),
    }))
    .into_response()
}

impl Lang {
    /// The tab's title.
    fn title(self) -> &'static str {
        match self {
            Lang::Curl => "curl",
            Lang::Python => "Python",
            Lang::PythonStdlib => "Python (stdlib)",
            Lang::Node => "Node.js",
            Lang::Php => "PHP",
            Lang::Ruby => "Ruby",
            Lang::Go => "Go",
            Lang::Java => "Java",
            Lang::CSharp => "C#",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hookpipe_common::Catalogue;

    fn console() -> Console {
        let catalogue = Catalogue::from_yaml(
            "streams:
  - id: 522ed95e-9f07-45f6-a0b7-28bf2d0315e5
    name: \"Orders <script>alert(1)</script>\"
    table: p.d.orders
    timezone: \"+03:00\"
  - id: 9f1c2d3e-4b5a-4c6d-8e7f-0a1b2c3d4e5f
    table: p.d.leads
    timezone: UTC
",
        )
        .unwrap();
        Console {
            streams: Arc::new(Shared::new(GatewayStreams::build(catalogue).unwrap())),
            public_url: "https://hooks.example.com".into(),
            webhook: Router::new(),
            idempotency_header: HeaderName::from_static("idempotency-key"),
            registry: Registry::new(),
            samples: Arc::default(),
        }
    }

    /// As minijinja's HTML escaping writes text (a browser reads it back as the same text).
    fn escaped(text: &str) -> String {
        text.replace('&', "&amp;")
            .replace('<', "&lt;")
            .replace('>', "&gt;")
            .replace('"', "&quot;")
            .replace('\'', "&#x27;")
            .replace('/', "&#x2f;")
    }

    async fn text(response: Response) -> (StatusCode, HeaderMap, String) {
        let status = response.status();
        let headers = response.headers().clone();
        let body = axum::body::to_bytes(response.into_body(), 1 << 20)
            .await
            .unwrap();
        (status, headers, String::from_utf8(body.to_vec()).unwrap())
    }

    #[tokio::test]
    async fn pages_list_every_stream_escape_names_and_show_each_snippet_verbatim() {
        let console = console();
        let (status, headers, html) = text(index(State(console.clone())).await).await;
        assert_eq!(status, StatusCode::OK);
        assert!(
            headers[header::CONTENT_SECURITY_POLICY]
                .to_str()
                .unwrap()
                .contains("script-src 'self'")
        );
        assert!(html.contains("Orders &lt;script&gt;"), "names are escaped");
        assert!(!html.contains("<script>alert"));
        for id in [
            "522ed95e-9f07-45f6-a0b7-28bf2d0315e5",
            "9f1c2d3e-4b5a-4c6d-8e7f-0a1b2c3d4e5f",
        ] {
            assert!(html.contains(&format!("href=\"/ui/streams/{id}\"")));
            assert!(html.contains(&escaped(&format!("https://hooks.example.com/ds/{id}"))));
        }
        let id = "9f1c2d3e-4b5a-4c6d-8e7f-0a1b2c3d4e5f";
        let (status, _, html) =
            text(stream_page(State(console.clone()), Path(id.into())).await).await;
        assert_eq!(status, StatusCode::OK);
        let stream = console
            .streams
            .current()
            .catalogue
            .streams()
            .nth(1)
            .unwrap()
            .clone();
        for lang in Lang::ALL {
            let code = snippet(lang, &stream, "https://hooks.example.com");
            assert!(html.contains(&escaped(&code)), "{lang} snippet verbatim");
            assert!(html.contains(&format!("id=\"tab-{lang}\"")));
        }
        let (status, _, _) = text(stream_page(State(console), Path("nope".into())).await).await;
        assert_eq!(status, StatusCode::NOT_FOUND);
    }

    fn counts(accepted: u64, refused: u64) -> HashMap<String, Counts> {
        HashMap::from([("s".to_owned(), Counts { accepted, refused })])
    }

    #[test]
    fn the_window_subtracts_the_sample_from_its_start() {
        let start = Instant::now();
        let mut samples = Samples::default();
        let at = |secs| start + Duration::from_secs(secs);
        // A young gateway: figures since the first sample.
        samples.record(at(0), counts(0, 0));
        let now = Counts {
            accepted: 5,
            refused: 1,
        };
        assert_eq!(samples.over_window("s", at(20), now).0, now);
        for t in (10..=400).step_by(10) {
            samples.record(at(t), counts(t, t / 10));
        }
        // At 400 s: the window starts at 100 s, whose sample said 100 accepted, 10 refused.
        let (window, span) = samples.over_window(
            "s",
            at(400),
            Counts {
                accepted: 400,
                refused: 40,
            },
        );
        assert_eq!(
            window,
            Counts {
                accepted: 300,
                refused: 30
            }
        );
        assert_eq!(span, Duration::from_secs(300));
        assert!(samples.taken.len() <= 32, "old samples are forgotten");
        // A stream the samples never saw counts from zero.
        assert_eq!(samples.over_window("other", at(400), now).0, now);
    }
}
