//! The HTTP floor: the gateway's own webhook server (`ingest_gateway::server::serve`, the same
//! hyper settings, header timeout and shutdown watch) with a handler that reads the body and
//! answers `202 {"hit_id": …}` at once, without an envelope, a stream look-up or Kafka. Its CPU
//! per request under `wrk` is what serving HTTP/1.1 over loopback costs on the machine (the
//! kernel's TCP path both ways, the wake-ups, hyper), which `bench/run gateway` reports beside
//! the raw producer: the gateway's CPU per request is about floor + producer + its own work.
//!
//!     http-floor --listen 127.0.0.1:28090 [--tick-us N]   # until SIGTERM or Ctrl-C

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::http::{HeaderValue, Request, StatusCode, header};
use axum::response::Response;
use clap::Parser;
use http_body_util::BodyExt;
use hyper::body::Incoming;
use ingest_gateway::server::{ServeOptions, serve};
use tokio::net::TcpListener;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

#[derive(Parser)]
struct Args {
    #[arg(long, default_value = "127.0.0.1:28090")]
    listen: SocketAddr,
    /// Answer requests in batches, on the ticks of one clock this many microseconds apart, as
    /// the gateway answers when the broker acknowledges a batch: a closed loop of C senders
    /// then runs at C requests per tick, the gateway's rate when `bench/run` sets the tick to
    /// C / the gateway's accepted rate. One wake-up per tick answers every waiting request,
    /// fewer than the gateway's (one per produce response), so the floor errs low. 0: at once.
    #[arg(long, default_value_t = 0)]
    tick_us: u64,
}

/// What the gateway answers for an accepted webhook: 202 with a hit id in a JSON body.
async fn accept(request: Request<Incoming>, tick: Option<Arc<Notify>>) -> Response {
    let received = request.into_body().collect().await;
    if let Some(tick) = tick {
        tick.notified().await;
    }
    let mut response = Response::new(Body::from(
        &br#"{"hit_id":"00000000-0000-7000-8000-000000000000"}"#[..],
    ));
    *response.status_mut() = match received {
        Ok(_) => StatusCode::ACCEPTED,
        Err(_) => StatusCode::BAD_REQUEST,
    };
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    response
}

#[tokio::main]
async fn main() {
    let args = Args::parse();
    let listener = TcpListener::bind(args.listen).await.expect("bind");
    let cancel = CancellationToken::new();
    let stop = cancel.clone();
    tokio::spawn(async move {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("SIGTERM handler");
        tokio::select! {
            _ = term.recv() => {}
            _ = tokio::signal::ctrl_c() => {}
        }
        stop.cancel();
    });
    // The gateway's defaults: 10 s for headers, HTTP/1.1 only.
    let options = ServeOptions {
        header_timeout: Duration::from_secs(10),
        http2: false,
    };
    let tick = (args.tick_us > 0).then(|| {
        let tick = Arc::new(Notify::new());
        let clock = tick.clone();
        let period = Duration::from_micros(args.tick_us);
        tokio::spawn(async move {
            let mut interval = tokio::time::interval(period);
            loop {
                interval.tick().await;
                clock.notify_waiters();
            }
        });
        tick
    });
    let handler = move |request, _peer| accept(request, tick.clone());
    serve(listener, handler, options, cancel, Duration::from_secs(5)).await;
}
