//! The webhook port's HTTP server. `axum::serve` sets no timer on hyper, so a client that
//! trickles its headers (or opens connections and never sends anything) would hold a
//! connection forever; this accept loop serves the webhook handler with a header-read timeout
//! and a graceful drain of open connections on shutdown.
//!
//! HTTP/1.1 only unless `HOOKPIPE_HTTP2` is on: webhook senders (Stripe, GitHub, Shopify,
//! Svix, CRMs) and the ingresses in front of the gateway speak HTTP/1.1 to it, and serving
//! both versions on one port costs every connection hyper_util's version detection and a
//! connection state sized for HTTP/2 (see docs/benchmarks.md: peak RSS at 1,000 connections).

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::http::Request;
use axum::response::Response;
use futures_util::FutureExt;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// Largest request head (request line and headers) the gateway reads.
pub const MAX_HEAD_BYTES: usize = 64 * 1024;

/// How the webhook port serves connections.
#[derive(Clone, Copy, Debug)]
pub struct ServeOptions {
    /// Longest wait for a request's headers (and an idle keep-alive connection's next one).
    pub header_timeout: Duration,
    /// Also accept HTTP/2 with prior knowledge (h2c) on the same port.
    pub http2: bool,
}

/// The handler's future as hyper's service returns it. `map`, not `async move {
/// Ok(response.await) }`: an async block would hold the handler's future twice (as captured and
/// as awaited), and hyper keeps this future for every connection (docs/benchmarks.md, "Issue
/// #14, round 5").
pub(crate) fn for_hyper<F>(response: F) -> impl Future<Output = Result<Response, Infallible>>
where
    F: Future<Output = Response>,
{
    response.map(Ok)
}

/// Serves `handler` until `cancel` fires, then stops accepting and waits up to `drain` for
/// open requests to finish. The handler gets each request with the peer's address; hyper
/// calls it directly (no router, no boxed body or future per request: see
/// [`crate::http::handle`]).
pub async fn serve<H, F>(
    listener: TcpListener,
    handler: H,
    options: ServeOptions,
    cancel: CancellationToken,
    drain: Duration,
) where
    H: Fn(Request<Incoming>, SocketAddr) -> F + Clone + Send + Sync + 'static,
    F: Future<Output = Response> + Send + 'static,
{
    let header_timeout = options.header_timeout;
    let graceful = GracefulShutdown::new();
    let mut http1 = http1::Builder::new();
    http1
        .timer(TokioTimer::new())
        .header_read_timeout(header_timeout)
        // Request line and headers must fit in this (hyper's default is ~400 KB): more gets
        // 431 (a URL over 64 KiB too). Bodies are streamed through the buffer, so they are not
        // limited by it.
        .max_header_size(MAX_HEAD_BYTES)
        .max_buf_size(MAX_HEAD_BYTES)
        .keep_alive(true);
    // Behind `Arc`s, and the HTTP/2-capable connection boxed below: a connection's task holds
    // its future inline, sized for the largest branch, and this keeps the HTTP/1.1 one small.
    let http1 = Arc::new(http1);
    let both = options.http2.then(|| {
        let mut builder = auto::Builder::new(TokioExecutor::new());
        builder
            .http1()
            .timer(TokioTimer::new())
            .header_read_timeout(header_timeout)
            .max_buf_size(MAX_HEAD_BYTES)
            .keep_alive(true);
        builder
            .http2()
            .timer(TokioTimer::new())
            .keep_alive_interval(Some(header_timeout));
        Arc::new(builder)
    });
    loop {
        let (stream, peer) = tokio::select! {
            () = cancel.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    // Out of file descriptors and the like: wait instead of spinning.
                    tracing::warn!(%error, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let handler = handler.clone();
        let service =
            service_fn(move |request: Request<Incoming>| for_hyper(handler(request, peer)));
        let (http1, both) = (http1.clone(), both.clone());
        let watcher = graceful.watcher();
        tokio::spawn(async move {
            // hyper's header timeout starts at the first byte: a client that connects and
            // says nothing is dropped here instead.
            let mut first = [0u8; 1];
            match tokio::time::timeout(header_timeout, stream.peek(&mut first)).await {
                Ok(Ok(n)) if n > 0 => {}
                _ => return,
            }
            let io = TokioIo::new(stream);
            let served = match both {
                Some(both) => Box::pin(
                    watcher.watch(
                        both.serve_connection_with_upgrades(io, service)
                            .into_owned(),
                    ),
                )
                .await
                .map_err(|e| e.to_string()),
                None => watcher
                    .watch(http1.serve_connection(io, service))
                    .await
                    .map_err(|e| e.to_string()),
            };
            if let Err(error) = served {
                tracing::debug!(%error, "connection ended with an error");
            }
        });
    }
    drop(listener);
    if tokio::time::timeout(drain, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!("drain timeout reached with requests still in flight");
    }
}
