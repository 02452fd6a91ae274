//! The admin HTTP server each binary runs on its own port: `/healthz` (the process is alive),
//! `/readyz` (it should receive work) and `/metrics` (Prometheus text format). Kept off the
//! webhook port so that probes and scrapes never compete with, or are exposed like, traffic.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use prometheus::{Encoder, Registry, TextEncoder};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// Whether the process should receive work, and why not. Starts false; the binary sets it once
/// its dependencies answer and clears it when draining.
#[derive(Clone, Debug, Default)]
pub struct Readiness(Arc<AtomicBool>, Arc<std::sync::Mutex<Option<String>>>);

impl Readiness {
    pub fn set(&self, ready: bool) {
        self.0.store(ready, Ordering::Release);
        if ready {
            self.set_reason(None);
        }
    }

    pub fn get(&self) -> bool {
        self.0.load(Ordering::Acquire)
    }

    /// Why the process is not ready (shown by `/readyz`; it must name a setting, never hold a
    /// secret).
    pub fn set_reason(&self, reason: Option<String>) {
        if let Ok(mut r) = self.1.lock() {
            *r = reason;
        }
    }

    pub fn reason(&self) -> Option<String> {
        self.1.lock().ok().and_then(|r| r.clone())
    }
}

#[derive(Clone)]
struct AdminState {
    registry: Registry,
    ready: Readiness,
}

/// The admin routes; a binary may merge routes of its own.
pub fn router(registry: Registry, ready: Readiness) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .with_state(AdminState { registry, ready })
}

async fn readyz(State(state): State<AdminState>) -> impl IntoResponse {
    if state.ready.get() {
        (
            StatusCode::OK,
            axum::Json(serde_json::json!({ "ready": true })),
        )
    } else {
        let reason = state
            .ready
            .reason()
            .unwrap_or_else(|| "starting or stopping".to_owned());
        (
            StatusCode::SERVICE_UNAVAILABLE,
            axum::Json(serde_json::json!({ "ready": false, "reason": reason })),
        )
    }
}

async fn metrics(State(state): State<AdminState>) -> impl IntoResponse {
    let encoder = TextEncoder::new();
    let mut body = Vec::with_capacity(16 * 1024);
    match encoder.encode(&state.registry.gather(), &mut body) {
        Ok(()) => (
            StatusCode::OK,
            [(header::CONTENT_TYPE, encoder.format_type().to_owned())],
            body,
        )
            .into_response(),
        Err(error) => {
            tracing::error!(%error, "encoding metrics failed");
            StatusCode::INTERNAL_SERVER_ERROR.into_response()
        }
    }
}

/// Serves `app` on `listener` until `cancel` fires. The admin server outlives the drain of the
/// main work (the caller cancels it last), so probes keep answering while the process drains.
pub async fn serve(
    listener: TcpListener,
    app: Router,
    cancel: CancellationToken,
) -> std::io::Result<()> {
    axum::serve(listener, app)
        .with_graceful_shutdown(async move { cancel.cancelled().await })
        .await
}

/// Registers a metric and returns it, for metric structs built once at start-up.
pub fn register<T: prometheus::core::Collector + Clone + 'static>(
    registry: &Registry,
    metric: T,
) -> T {
    // Names are fixed and distinct, so registration cannot fail at run time.
    #[allow(clippy::expect_used)]
    registry
        .register(Box::new(metric.clone()))
        .expect("metric registered twice");
    metric
}

/// Keeps `ready` equal to the outcome of `check` (a blocking call, such as a broker metadata
/// request, run off the async runtime). Polls fast until the first success so a fresh pod
/// becomes ready quickly, then every two seconds. `after_check` runs after each check, for
/// gauges sampled at the same pace. Clears readiness when `cancel` fires.
pub async fn readiness_loop<C, A>(
    check: C,
    after_check: A,
    ready: Readiness,
    cancel: CancellationToken,
) where
    C: Fn() -> Result<(), String> + Clone + Send + 'static,
    A: Fn(),
{
    let mut was_ready = false;
    while !cancel.is_cancelled() {
        let outcome = tokio::task::spawn_blocking(check.clone())
            .await
            .unwrap_or_else(|e| Err(e.to_string()));
        after_check();
        let now_ready = outcome.is_ok() && !cancel.is_cancelled();
        if let Err(reason) = &outcome {
            ready.set_reason(Some(reason.clone()));
        }
        if now_ready != was_ready {
            match &outcome {
                Ok(()) => tracing::info!("broker reachable, ready"),
                Err(error) => tracing::warn!(%error, "broker not reachable, not ready"),
            }
        }
        ready.set(now_ready);
        was_ready = now_ready;
        let pause = if now_ready {
            std::time::Duration::from_secs(2)
        } else {
            std::time::Duration::from_millis(250)
        };
        tokio::select! {
            () = cancel.cancelled() => break,
            () = tokio::time::sleep(pause) => {}
        }
    }
    ready.set(false);
}

/// A running admin server. It is stopped last, after the main work drained, so probes and
/// scrapes keep answering during shutdown.
pub struct AdminServer {
    pub ready: Readiness,
    cancel: CancellationToken,
    task: tokio::task::JoinHandle<std::io::Result<()>>,
}

impl AdminServer {
    /// Binds `addr` and serves the admin routes for `registry` (readiness starts false).
    pub async fn start(addr: std::net::SocketAddr, registry: Registry) -> std::io::Result<Self> {
        Self::start_with(addr, registry, Router::new()).await
    }

    /// The same, with the service's own routes beside the standard ones.
    pub async fn start_with(
        addr: std::net::SocketAddr,
        registry: Registry,
        extra: Router,
    ) -> std::io::Result<Self> {
        let listener = TcpListener::bind(addr).await.map_err(|e| {
            std::io::Error::new(e.kind(), format!("binding admin address {addr}: {e}"))
        })?;
        let ready = Readiness::default();
        let cancel = CancellationToken::new();
        let task = tokio::spawn(serve(
            listener,
            router(registry, ready.clone()).merge(extra),
            cancel.clone(),
        ));
        Ok(Self {
            ready,
            cancel,
            task,
        })
    }

    pub async fn stop(self) -> std::io::Result<()> {
        self.ready.set(false);
        self.cancel.cancel();
        self.task.await.map_err(std::io::Error::other)?
    }
}
