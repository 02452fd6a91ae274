//! Start-up and shutdown of the sink: parse configuration, load the catalogue, connect to
//! BigQuery and Kafka, run the consumer loop and the admin port, and drain on SIGTERM.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, bail};
use bq_sink::batch::Limits;
use bq_sink::bigquery::BigQuery;
use bq_sink::config::{Cli, Command};
use bq_sink::deadletter::DeadLetters;
use bq_sink::dedup::RecentHits;
use bq_sink::metrics::Metrics;
use bq_sink::offsets::OffsetTracker;
use bq_sink::pipeline::{Backoff, Pipeline, SinkConsumer, SinkContext, Writer};
use bq_sink::replay;
use clap::Parser;
use hookpipe_common::Catalogue;
use hookpipe_common::admin::{self, AdminServer};
use hookpipe_common::catalogue::{Shared, watch_catalogue};
use rdkafka::consumer::Consumer;
use tokio_util::sync::CancellationToken;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    hookpipe_common::telemetry::init();
    let cli = Cli::parse();
    let config = cli.config;
    if let Some(Command::ReplayDlq(args)) = cli.command {
        config
            .kafka
            .validate()
            .map_err(|p| anyhow::anyhow!("invalid configuration: {p}"))?;
        let mut base = config.kafka.client_config();
        config.kafka.apply_overrides(&mut base);
        let summary = replay::run(&base, &config.dlq_topic, &config.kafka.topic, &args)
            .await
            .map_err(|e| anyhow::anyhow!("replay failed: {e}"))?;
        println!(
            "read {} dead letters from {}, {} matched, {} replayed to {}{}",
            summary.read,
            config.dlq_topic,
            summary.matched,
            summary.replayed,
            config.kafka.topic,
            if args.dry_run { " (dry run)" } else { "" }
        );
        return Ok(());
    }
    if let Err(problem) = config.validate() {
        bail!("invalid configuration: {problem}");
    }
    tracing::info!(?config, "starting bq-sink");
    let catalogue_path = config.catalogue.clone().unwrap_or_default();

    let catalogue = Arc::new(Shared::new(Catalogue::load(&catalogue_path)?));
    let metrics = Arc::new(Metrics::new());
    let warehouse = Arc::new(
        BigQuery::connect(&config.bigquery)
            .await
            .context("connecting to BigQuery")?,
    );

    let base = config.kafka.client_config();
    let mut dlq_config = base.clone();
    config.kafka.apply_overrides(&mut dlq_config);
    let dead_letters = Arc::new(
        DeadLetters::new(&dlq_config, config.dlq_topic.clone())
            .context("creating the dead-letter producer")?,
    );

    let tracker = Arc::new(Mutex::new(OffsetTracker::new(config.dedup_window)));
    let mut consumer_config = base;
    consumer_config
        .set("group.id", &config.group_id)
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("auto.offset.reset", "earliest")
        .set("partition.assignment.strategy", &config.assignment_strategy)
        .set("statistics.interval.ms", "5000")
        .set(
            "session.timeout.ms",
            config.session_timeout.as_millis().to_string(),
        )
        .set(
            "heartbeat.interval.ms",
            (config.session_timeout.as_millis() / 3)
                .max(100)
                .to_string(),
        );
    config.kafka.apply_overrides(&mut consumer_config);
    // At-least-once depends on these; a pass-through property must not turn them off.
    consumer_config
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false");
    let consumer: SinkConsumer = consumer_config
        .create_with_context(SinkContext {
            tracker: tracker.clone(),
            metrics: metrics.clone(),
            topic: config.kafka.topic.clone(),
            revoke_wait: config.drain_timeout,
            group_refused: Default::default(),
        })
        .context("creating the Kafka consumer")?;
    consumer
        .subscribe(&[&config.kafka.topic])
        .context("subscribing to the topic")?;
    let consumer = Arc::new(consumer);

    let cancel = CancellationToken::new();
    hookpipe_common::shutdown::cancel_on_signal(cancel.clone());
    let admin = AdminServer::start(config.admin_listen, metrics.registry.clone()).await?;
    let ready = admin.ready.clone();
    tracing::info!(admin = %config.admin_listen, topic = %config.kafka.topic, group = %config.group_id, "consuming");

    tokio::spawn({
        let metrics = metrics.clone();
        watch_catalogue(
            catalogue_path.clone(),
            config.catalogue_reload_interval,
            catalogue.clone(),
            cancel.clone(),
            Ok,
            move |outcome| metrics.catalogue_reload(outcome.as_str()),
        )
    });
    if !config.stall_timeout.is_zero() {
        tokio::spawn(bq_sink::stall::watch(
            consumer.clone(),
            config.kafka.topic.clone(),
            config.stall_timeout,
            metrics.clone(),
            cancel.clone(),
        ));
    }
    tokio::spawn({
        let (consumer, topic) = (consumer.clone(), config.kafka.topic.clone());
        admin::readiness_loop(
            move || {
                hookpipe_common::kafka::check_topic(
                    consumer.client(),
                    &topic,
                    Duration::from_secs(2),
                )?;
                if consumer
                    .context()
                    .group_refused
                    .load(std::sync::atomic::Ordering::Relaxed)
                {
                    return Err("the consumer group refuses this sink's assignment strategy".into());
                }
                Ok(())
            },
            || {},
            ready.clone(),
            cancel.clone(),
        )
    });

    let limits = Limits {
        max_rows: config.batch_max_rows,
        max_bytes: config.batch_max_bytes,
        max_age: config.batch_max_age,
    };
    let pipeline = Pipeline {
        consumer,
        writer: Arc::new(Writer {
            tracker,
            recent: Mutex::new(RecentHits::new(config.dedup_memory)),
            warehouse,
            dead_letters: dead_letters.clone(),
            metrics,
            backoff: Backoff {
                initial: config.retry_initial,
                max: config.retry_max,
            },
            limits,
            topic: config.kafka.topic.clone(),
            ready_tables: Mutex::new(HashSet::new()),
        }),
        catalogue,
        catalogue_path,
        max_buffered: config.max_buffered_rows,
        window: config.dedup_window,
        drain_timeout: config.drain_timeout,
    };
    pipeline.run(cancel.clone()).await;
    ready.set(false);
    dead_letters.flush(Duration::from_secs(5));
    admin.stop().await?;
    tracing::info!("bq-sink stopped");
    Ok(())
}
