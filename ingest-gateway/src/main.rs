//! Start-up and shutdown of the gateway: parse configuration, load the catalogue, connect the
//! producer, serve webhooks and the admin port, and drain cleanly on SIGTERM.

use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::Parser;
use hookpipe_common::Catalogue;
use hookpipe_common::admin::{self, AdminServer};
use hookpipe_common::catalogue::{Shared, watch_catalogue_and};
use ingest_gateway::config::{Cli, Command};
use ingest_gateway::http::{AppState, GatewayStreams, Limits, app};
use ingest_gateway::metrics::Metrics;
use ingest_gateway::publisher::{KafkaPublisher, ProducerSettings, Publish, producer_config};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    if let Some(Command::Streams(command)) = &cli.command {
        let mut out = String::new();
        return match ingest_gateway::streams::run(command, &mut out) {
            Ok(()) => {
                print!("{out}");
                Ok(())
            }
            Err(problem) => {
                eprintln!("error: {problem}");
                std::process::exit(1);
            }
        };
    }
    hookpipe_common::telemetry::init();
    let config = cli.config;
    let Some(catalogue_path) = config.catalogue.clone() else {
        bail!("HOOKPIPE_CATALOGUE (--catalogue) is required");
    };
    if let Err(problem) = config.validate() {
        bail!("invalid configuration: {problem}");
    }
    tracing::info!(?config, "starting ingest-gateway");

    let catalogue = Catalogue::load(&catalogue_path)?;
    let metrics = Arc::new(Metrics::new());
    let streams = GatewayStreams::build(catalogue)
        .map_err(|e| anyhow::anyhow!("stream catalogue: {e}"))?
        .counted_by(&metrics);
    metrics
        .catalogue_streams
        .set(streams.catalogue.len() as i64);
    let streams = Arc::new(Shared::new(streams));

    let mut kafka_config = producer_config(
        config.kafka.client_config(),
        &ProducerSettings {
            queue_messages: config.producer_queue_messages,
            queue_bytes: config.producer_queue_bytes,
            linger: config.producer_linger,
            in_flight_requests: config.producer_in_flight_requests,
            compression: config.producer_compression.clone(),
            message_timeout: config.producer_message_timeout,
            max_body_bytes: config.max_body_bytes,
        },
    );
    config.kafka.apply_overrides(&mut kafka_config);
    let publisher = Arc::new(
        KafkaPublisher::new(
            &kafka_config,
            config.kafka.topic.clone(),
            config.publish_timeout,
            config.max_body_bytes,
        )
        .context("creating the Kafka producer")?,
    );
    ingest_gateway::topic_check::at_start_up(&kafka_config, &config)
        .await
        .map_err(|problem| anyhow::anyhow!("{problem}"))?;

    let cancel = CancellationToken::new();
    hookpipe_common::shutdown::cancel_on_signal(cancel.clone());
    let public_url = config
        .public_url
        .clone()
        .unwrap_or_else(|| format!("http://{}", config.listen));
    let state = Arc::new(AppState {
        streams: streams.clone(),
        publisher: publisher.clone(),
        metrics: metrics.clone(),
        limits: Limits {
            max_body_bytes: config.max_body_bytes,
            body_timeout: config.body_timeout,
        },
        slots: Arc::new(tokio::sync::Semaphore::new(config.max_in_flight)),
        idempotency_header: config.idempotency_header.parse()?,
    });
    let webhook = app(state.clone());
    let samples = Arc::default();
    tokio::spawn(ingest_gateway::console::sample(
        metrics.registry.clone(),
        Arc::clone(&samples),
        cancel.clone(),
    ));
    let admin = AdminServer::start_with(
        config.admin_listen,
        metrics.registry.clone(),
        ingest_gateway::streams::admin_routes(ingest_gateway::streams::AdminStreams {
            streams: streams.clone(),
            public_url: public_url.clone(),
        })
        .merge(ingest_gateway::console::routes(
            ingest_gateway::console::Console {
                streams: streams.clone(),
                public_url,
                webhook: webhook.clone(),
                idempotency_header: config.idempotency_header.parse()?,
                registry: metrics.registry.clone(),
                samples,
            },
        )),
    )
    .await?;
    let ready = admin.ready.clone();
    let listener = TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("binding webhook address {}", config.listen))?;
    tracing::info!(listen = %config.listen, admin = %config.admin_listen, "listening");

    tokio::spawn({
        let (streams, metrics, cancel) = (streams.clone(), metrics.clone(), cancel.clone());
        let (gauge_metrics, previous) = (metrics.clone(), streams.clone());
        watch_catalogue_and(
            catalogue_path,
            config.catalogue_reload_interval,
            streams,
            cancel,
            move |catalogue| {
                let built = GatewayStreams::build_after(catalogue, &previous.current())?
                    .counted_by(&gauge_metrics);
                gauge_metrics
                    .catalogue_streams
                    .set(built.catalogue.len() as i64);
                Ok(built)
            },
            GatewayStreams::secrets_changed,
            move |outcome| metrics.catalogue_reload(outcome.as_str()),
        )
    });

    tokio::spawn({
        let (check_publisher, gauge_publisher, metrics) =
            (publisher.clone(), publisher.clone(), metrics.clone());
        admin::readiness_loop(
            move || check_publisher.check_ready(Duration::from_secs(2)),
            move || {
                metrics
                    .producer_queue
                    .set(gauge_publisher.queue_len() as i64)
            },
            ready.clone(),
            cancel.clone(),
        )
    });

    // Readiness turns off as soon as `cancel` fires (the readiness loop ends), so load
    // balancers stop sending while the requests in flight finish.
    let drain_timeout = config.drain_timeout;
    ingest_gateway::server::serve(
        listener,
        move |request, peer| ingest_gateway::http::handle(state.clone(), request, Some(peer)),
        ingest_gateway::server::ServeOptions {
            header_timeout: config.header_timeout,
            http2: config.http2,
        },
        cancel.clone(),
        drain_timeout,
    )
    .await;
    tracing::info!("webhook server stopped, flushing the producer");
    let flush = tokio::task::spawn_blocking({
        let publisher = publisher.clone();
        move || publisher.flush(drain_timeout)
    })
    .await?;
    if let Err(error) = flush {
        tracing::error!(%error, "producer flush did not complete");
    }
    admin.stop().await?;
    tracing::info!("ingest-gateway stopped");
    Ok(())
}
