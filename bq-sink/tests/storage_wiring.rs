//! The Storage Write API client's wiring, since Google itself cannot be reached from here: a
//! local gRPC endpoint that speaks only TLS (a certificate from a CA made for the test) must
//! see the caller's token and BigQuery's routing header on a write's first call, and the
//! client must trust it only through the configured CA.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use bq_sink::config::Cli;
use bq_sink::metrics::Metrics;
use bq_sink::row::Row;
use bq_sink::warehouse::rest::Rest;
use bq_sink::warehouse::storage::{Storage, StorageSettings};
use bq_sink::warehouse::{Warehouse, WriteError};
use clap::Parser;
use gcp_bigquery_client::auth::Authenticator;
use gcp_bigquery_client::error::BQError;
use tokio_rustls::rustls;

#[derive(Clone)]
struct Token(&'static str);

#[async_trait]
impl Authenticator for Token {
    async fn access_token(&self) -> Result<String, BQError> {
        Ok(self.0.to_owned())
    }
}

/// What the endpoint saw of each call: path, authorization, routing header.
type Seen = Arc<Mutex<Vec<(String, String, String)>>>;

/// A TLS-only HTTP/2 endpoint answering every gRPC call with PERMISSION_DENIED; returns its
/// port and the CA's certificate (PEM).
async fn tls_endpoint(seen: Seen) -> (u16, String) {
    let ca = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
    let key = rustls::pki_types::PrivateKeyDer::Pkcs8(ca.signing_key.serialize_der().into());
    let mut config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(vec![ca.cert.der().clone()], key)
    .unwrap();
    config.alpn_protocols = vec![b"h2".to_vec()];
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        loop {
            let (tcp, _) = listener.accept().await.unwrap();
            let (acceptor, seen) = (acceptor.clone(), seen.clone());
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else {
                    return; // not TLS: refused
                };
                let service = hyper::service::service_fn(
                    move |request: hyper::Request<hyper::body::Incoming>| {
                        let header = |name: &str| {
                            request
                                .headers()
                                .get(name)
                                .and_then(|v| v.to_str().ok())
                                .unwrap_or("")
                                .to_owned()
                        };
                        seen.lock().unwrap().push((
                            request.uri().path().to_owned(),
                            header("authorization"),
                            header("x-goog-request-params"),
                        ));
                        async move {
                            Ok::<_, std::convert::Infallible>(
                                hyper::Response::builder()
                                    .header("content-type", "application/grpc")
                                    .header("grpc-status", "7")
                                    .header("grpc-message", "denied%20by%20the%20test")
                                    .body(http_body_util::Empty::<bytes::Bytes>::new())
                                    .unwrap(),
                            )
                        }
                    },
                );
                let _ =
                    hyper::server::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
                        .serve_connection(hyper_util::rt::TokioIo::new(tls), service)
                        .await;
            });
        }
    });
    (port, ca.cert.pem())
}

fn settings(port: u16, ca_file: Option<std::path::PathBuf>) -> StorageSettings {
    StorageSettings {
        endpoint: format!("https://localhost:{port}"),
        ca_file,
        timeout: Duration::from_secs(5),
        in_flight: 4,
        idle: Duration::from_secs(60),
    }
}

async fn rest() -> Arc<Rest> {
    let cli = Cli::parse_from([
        "bq-sink",
        "--bigquery-auth=none",
        "--bigquery-endpoint=http://127.0.0.1:9/bigquery/v2",
    ]);
    Arc::new(
        Rest::connect(&cli.config.bigquery, Arc::new(Token("")))
            .await
            .unwrap(),
    )
}

fn row() -> Row {
    Row {
        hit_id: uuid::Uuid::now_v7(),
        payload: bytes::Bytes::from_static(b"orderId=N1"),
        received_at: 1_603_131_452_123,
        date: chrono::NaiveDate::from_ymd_opt(2020, 10, 19).unwrap(),
    }
}

#[tokio::test]
async fn writes_go_over_tls_with_the_callers_token_and_routing_header() {
    let seen: Seen = Arc::default();
    let (port, ca_pem) = tls_endpoint(seen.clone()).await;
    let dir = std::env::temp_dir().join(format!("hookpipe-ca-{}", uuid::Uuid::now_v7()));
    std::fs::create_dir_all(&dir).unwrap();
    let ca_file = dir.join("ca.pem");
    std::fs::write(&ca_file, ca_pem).unwrap();
    let storage = Storage::new(
        settings(port, Some(ca_file)),
        rest().await,
        Arc::new(Token("tok-123")),
        Arc::new(Metrics::new()),
    )
    .unwrap();
    let table = "p.d.t".parse().unwrap();
    let r = row();
    let result = storage.write(&table, 0, &[&r]).await;
    assert!(
        matches!(result, Err(WriteError::Denied(ref m)) if m.contains("denied by the test")),
        "{result:?}"
    );
    let seen = seen.lock().unwrap().clone();
    assert_eq!(
        seen,
        [(
            "/google.cloud.bigquery.storage.v1.BigQueryWrite/CreateWriteStream".to_owned(),
            "Bearer tok-123".to_owned(),
            "parent=projects/p/datasets/d/tables/t".to_owned(),
        )]
    );
}

#[tokio::test]
async fn an_endpoint_whose_certificate_no_trusted_ca_signed_is_refused() {
    let seen: Seen = Arc::default();
    let (port, _) = tls_endpoint(seen.clone()).await;
    let storage = Storage::new(
        settings(port, None),
        rest().await,
        Arc::new(Token("tok-123")),
        Arc::new(Metrics::new()),
    )
    .unwrap();
    let table = "p.d.t".parse().unwrap();
    let r = row();
    let result = storage.write(&table, 0, &[&r]).await;
    assert!(
        matches!(result, Err(WriteError::Transient(_))),
        "{result:?}"
    );
    assert!(
        seen.lock().unwrap().is_empty(),
        "a request got through: {seen:?}"
    );
}
