//! The webhook port's HTTP server. `axum::serve` sets no timer on hyper, so a client that
//! trickles its headers (or opens connections and never sends anything) would hold a
//! connection forever; this accept loop serves the webhook handler with a header-read timeout
//! and a graceful drain of open connections on shutdown.
//!
//! HTTP/1.1 only unless `HOOKPIPE_HTTP2` is on: webhook senders (Stripe, GitHub, Shopify,
//! Svix, CRMs) and the ingresses in front of the gateway speak HTTP/1.1 to it, and serving
//! both versions on one port costs every connection hyper_util's version detection and a
//! connection state sized for HTTP/2 (see docs/benchmarks.md: peak RSS at 1,000 connections).

use std::collections::HashMap;
use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::Waker;
use std::time::Duration;

use axum::http::Request;
use axum::response::Response;
use futures_util::FutureExt;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulConnection;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

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
pub(crate) fn for_hyper<F, B>(response: F) -> impl Future<Output = Result<Response<B>, Infallible>>
where
    F: Future<Output = Response<B>>,
{
    response.map(Ok)
}

/// Tells open connections to finish their request and close, at shutdown. hyper_util's
/// `GracefulShutdown` does this with a `watch` channel that every connection polls each time it
/// is woken (about 500 instructions per request, docs/benchmarks.md "Issue #14, round 7"); here
/// a connection checks one flag per poll and hands its task's waker over once, when it opens.
#[derive(Default)]
struct Closing {
    now: AtomicBool,
    next: AtomicU64,
    wakers: Mutex<HashMap<u64, Waker>>,
}

impl Closing {
    fn wakers(&self) -> MutexGuard<'_, HashMap<u64, Waker>> {
        self.wakers.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Sets the flag, then wakes every connection that registered before: one that registers
    /// after finds the flag set (the lock orders the two).
    fn close_all(&self) {
        self.now.store(true, Ordering::Release);
        let wakers: Vec<Waker> = self.wakers().values().cloned().collect();
        wakers.into_iter().for_each(Waker::wake);
    }

    /// Serves `connection` until it ends, shutting it down gracefully once [`Self::close_all`]
    /// is called. Polled as its task's own future, so the waker registered on the first poll
    /// stays the one that wakes the task.
    async fn watch<C: GracefulConnection>(&self, connection: C) -> Result<(), C::Error> {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        // Unregisters however the connection ends (also if its task is dropped).
        let _registration = Registration { closing: self, id };
        let mut connection = pin!(connection);
        let (mut registered, mut told) = (false, false);
        std::future::poll_fn(|cx| {
            if !told {
                if !registered {
                    self.wakers().insert(id, cx.waker().clone());
                    registered = true;
                }
                if self.now.load(Ordering::Acquire) {
                    connection.as_mut().graceful_shutdown();
                    told = true;
                }
            }
            connection.as_mut().poll(cx)
        })
        .await
    }
}

/// A connection's entry in [`Closing`]'s wakers, removed when the connection ends.
struct Registration<'a> {
    closing: &'a Closing,
    id: u64,
}

impl Drop for Registration<'_> {
    fn drop(&mut self) {
        self.closing.wakers().remove(&self.id);
    }
}

/// Serves `handler` until `cancel` fires, then stops accepting and waits up to `drain` for
/// open requests to finish. The handler gets each request with the peer's address; hyper
/// calls it directly (no router, no boxed body or future per request: see
/// [`crate::http::handle`]).
pub async fn serve<H, F, B>(
    listener: TcpListener,
    handler: H,
    options: ServeOptions,
    cancel: CancellationToken,
    drain: Duration,
) where
    H: Fn(Request<Incoming>, SocketAddr) -> F + Clone + Send + Sync + 'static,
    F: Future<Output = Response<B>> + Send + 'static,
    B: hyper::body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let header_timeout = options.header_timeout;
    let closing = Arc::new(Closing::default());
    let connections = TaskTracker::new();
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
        let (closing, cancel) = (closing.clone(), cancel.clone());
        connections.spawn(async move {
            // hyper's header timeout starts at the first byte: a client that connects and
            // says nothing is dropped here instead, and at once on shutdown (load balancers
            // keep such pre-opened connections; they must not hold a rollout up).
            let mut first = [0u8; 1];
            let peeked = tokio::select! {
                biased;
                peeked = tokio::time::timeout(header_timeout, stream.peek(&mut first)) => peeked,
                () = cancel.cancelled() => return,
            };
            match peeked {
                Ok(Ok(n)) if n > 0 => {}
                _ => return,
            }
            let io = TokioIo::new(stream);
            let served = match both {
                Some(both) => Box::pin(
                    closing.watch(
                        both.serve_connection_with_upgrades(io, service)
                            .into_owned(),
                    ),
                )
                .await
                .map_err(|e| e.to_string()),
                None => closing
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
    connections.close();
    closing.close_all();
    if tokio::time::timeout(drain, connections.wait())
        .await
        .is_err()
    {
        tracing::warn!("drain timeout reached with requests still in flight");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpStream;
    use tokio::sync::Notify;

    const REQUEST: &[u8] = b"POST /x HTTP/1.1\r\nHost: t\r\nContent-Length: 2\r\n\r\nhi";

    /// Reads one response's head and its `ok` body off a keep-alive connection.
    async fn read_response(stream: &mut TcpStream) -> String {
        let mut got = Vec::new();
        let mut buf = [0u8; 512];
        while !got.ends_with(b"\r\n\r\nok") {
            let n = stream.read(&mut buf).await.unwrap();
            assert!(n > 0, "connection closed before the response: {got:?}");
            got.extend_from_slice(&buf[..n]);
        }
        String::from_utf8(got).unwrap()
    }

    /// At shutdown an idle keep-alive connection and one that has sent nothing yet are closed at
    /// once, and a request in flight is answered before its connection closes; the server
    /// returns without waiting out the drain or the header timeout.
    #[tokio::test]
    async fn shutdown_closes_idle_connections_and_finishes_requests_in_flight() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let release = Arc::new(Notify::new());
        let entered = Arc::new(Notify::new());
        let handler = {
            let (release, entered) = (release.clone(), entered.clone());
            move |request: Request<Incoming>, _peer: SocketAddr| {
                let (release, entered) = (release.clone(), entered.clone());
                async move {
                    if request.headers().contains_key("x-wait") {
                        entered.notify_one();
                        release.notified().await;
                    }
                    Response::new(axum::body::Body::from("ok"))
                }
            }
        };
        let cancel = CancellationToken::new();
        let options = ServeOptions {
            header_timeout: Duration::from_secs(30),
            http2: false,
        };
        let drain = Duration::from_secs(60);
        let server = tokio::spawn(serve(listener, handler, options, cancel.clone(), drain));

        let mut idle = TcpStream::connect(addr).await.unwrap();
        idle.write_all(REQUEST).await.unwrap();
        assert!(read_response(&mut idle).await.starts_with("HTTP/1.1 200"));
        // Connected, and has sent nothing (a load balancer's pre-opened connection).
        let mut silent = TcpStream::connect(addr).await.unwrap();
        let mut busy = TcpStream::connect(addr).await.unwrap();
        let waiting =
            [&b"POST /x HTTP/1.1\r\nHost: t\r\nX-Wait: 1\r\nContent-Length: 2\r\n\r\nhi"[..]]
                .concat();
        busy.write_all(&waiting).await.unwrap();
        entered.notified().await;

        cancel.cancel();
        // The idle connection is closed by the server (EOF), long before the drain's 60 s.
        let mut rest = Vec::new();
        let read = tokio::time::timeout(Duration::from_secs(20), idle.read_to_end(&mut rest));
        assert_eq!(read.await.expect("idle connection closed").unwrap(), 0);
        // So is the silent one, long before its 30 s header timeout.
        let read = tokio::time::timeout(Duration::from_secs(20), silent.read_to_end(&mut rest));
        assert_eq!(read.await.expect("silent connection closed").unwrap(), 0);
        assert!(!server.is_finished(), "a request is still in flight");

        release.notify_one();
        let answer = read_response(&mut busy).await;
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
        let mut rest = Vec::new();
        busy.read_to_end(&mut rest).await.unwrap();
        tokio::time::timeout(Duration::from_secs(20), server)
            .await
            .expect("server returned once its connections closed")
            .unwrap();
    }
}
