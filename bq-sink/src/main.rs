//! Start-up and shutdown of the sink: parse configuration, load the catalogue, connect to
//! BigQuery and Kafka, run the consumer loop, the parking drainer, the group guard and the
//! admin port, and drain on SIGTERM. A state the process cannot repair by itself (a panicked
//! write task, a group that does not give it partitions back) ends it with exit status 3, so
//! the orchestrator restarts it.

use std::collections::{HashMap, HashSet};
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, bail};
use bq_sink::batch::Limits;
use bq_sink::config::{Cli, Command, Config};
use bq_sink::consumer::{Ownership, SinkConsumer, SinkContext};
use bq_sink::decide::{Health, Policy};
use bq_sink::dedup::RecentHits;
use bq_sink::group::{self, GuardSettings};
use bq_sink::metrics::Metrics;
use bq_sink::offsets::OffsetTracker;
use bq_sink::parking::Drainer;
use bq_sink::pipeline::Pipeline;
use bq_sink::replay;
use bq_sink::shelf::KafkaShelf;
use bq_sink::warehouse::AnyWarehouse;
use bq_sink::warehouse::credentials::credentials;
use bq_sink::warehouse::rest::{InsertAll, Rest};
use bq_sink::warehouse::storage::{Storage, StorageSettings};
use bq_sink::writer::{Writer, backoff};
use clap::Parser;
use hookpipe_common::Catalogue;
use hookpipe_common::admin::{self, AdminServer};
use hookpipe_common::catalogue::{Shared, watch_catalogue};
use rdkafka::consumer::Consumer;
use tokio_util::sync::CancellationToken;

/// Exit status of a crash-only exit (the orchestrator restarts the process).
const EXIT_RESTART: u8 = 3;

#[tokio::main]
async fn main() -> anyhow::Result<ExitCode> {
    hookpipe_common::telemetry::init();
    // Test builds only (feature `failpoints`): fail points named in $FAILPOINTS.
    let _failpoints = fail::FailScenario::setup();
    let cli = Cli::parse();
    let config = cli.config;
    if let Some(Command::ReplayDlq(args)) = cli.command {
        config
            .kafka
            .validate()
            .map_err(|p| anyhow::anyhow!("invalid configuration: {p}"))?;
        let mut base = config.kafka.client_config();
        config.kafka.apply_overrides(&mut base);
        let summary = replay::run(
            &base,
            &config.dlq_topic,
            &config.kafka.topic,
            &config.group_id,
            &args,
        )
        .await
        .map_err(|e| anyhow::anyhow!("replay failed: {e}"))?;
        println!(
            "{}",
            summary.describe(&config.dlq_topic, &config.kafka.topic, args.dry_run)
        );
        return Ok(ExitCode::SUCCESS);
    }
    if let Some(Command::Audit(args)) = cli.command {
        return Ok(ExitCode::from(audit(&config, &args).await));
    }
    if let Err(problem) = config.validate() {
        bail!("invalid configuration: {problem}");
    }
    tracing::info!(?config, "starting bq-sink");
    run(config).await
}

/// `bq-sink audit`: the report on stdout, problems on stderr, and the exit status.
async fn audit(config: &Config, args: &bq_sink::audit::AuditArgs) -> u8 {
    let outcome = async {
        config.kafka.validate()?;
        let catalogue = match &config.catalogue {
            Some(path) => Catalogue::load(path).map_err(|e| e.to_string())?,
            None => Catalogue::default(),
        };
        let auth = credentials(&config.bigquery)
            .await
            .map_err(|e| format!("BigQuery credentials: {e}"))?;
        let rest = Arc::new(
            Rest::connect(&config.bigquery, auth)
                .await
                .map_err(|e| format!("connecting to BigQuery: {e}"))?,
        );
        let mut kafka = config.kafka.client_config();
        config.kafka.apply_overrides(&mut kafka);
        let setup = bq_sink::audit::Setup {
            kafka,
            topic: &config.kafka.topic,
            dlq_topic: &config.dlq_topic,
            parking_topic: &config.parking_topic,
            group_id: &config.group_id,
            catalogue: &catalogue,
            rest,
        };
        bq_sink::audit::run(&setup, args).await
    }
    .await;
    match outcome {
        Ok(report) => {
            if args.format == "json" {
                match serde_json::to_string_pretty(&report) {
                    Ok(text) => println!("{text}"),
                    Err(e) => {
                        eprintln!("error: {e}");
                        return bq_sink::audit::EXIT_FAILED;
                    }
                }
            } else {
                print!("{}", report.table());
            }
            report.exit_code()
        }
        Err(problem) => {
            eprintln!("error: the audit could not run: {problem}");
            bq_sink::audit::EXIT_FAILED
        }
    }
}

async fn run(config: Config) -> anyhow::Result<ExitCode> {
    let catalogue_path = config.catalogue.clone().unwrap_or_default();
    let catalogue = Arc::new(Shared::new(Catalogue::load(&catalogue_path)?));
    let metrics = Arc::new(Metrics::new());
    let auth = credentials(&config.bigquery)
        .await
        .context("BigQuery credentials")?;
    let rest = Arc::new(
        Rest::connect(&config.bigquery, auth.clone())
            .await
            .context("connecting to BigQuery")?,
    );
    let cancel = CancellationToken::new();
    let warehouse = Arc::new(match config.bigquery.write_api.as_str() {
        "insert-all" => AnyWarehouse::InsertAll(InsertAll {
            rest,
            max_rows: config.batch_max_rows,
            max_bytes: config.batch_max_bytes,
        }),
        _ => {
            let storage = Storage::new(
                StorageSettings {
                    endpoint: config.bigquery.storage_endpoint.clone(),
                    ca_file: config.bigquery.ca_file.clone(),
                    timeout: config.bigquery.timeout,
                    in_flight: config.bigquery.appends_in_flight,
                    idle: Duration::from_secs(60),
                },
                rest,
                auth,
                metrics.clone(),
            )
            .map_err(|e| anyhow::anyhow!("the Storage Write API client: {e}"))?;
            tokio::spawn(storage.clone().close_idle(cancel.clone()));
            AnyWarehouse::Storage(storage)
        }
    });

    let base = config.kafka.client_config();
    let mut producer_config = base.clone();
    config.kafka.apply_overrides(&mut producer_config);
    let shelf = Arc::new(
        KafkaShelf::new(
            &producer_config,
            config.dlq_topic.clone(),
            config.parking_topic.clone(),
            config.dlq_max_message_bytes,
        )
        .context("creating the dead-letter and parking producer")?,
    );

    let tracker = Arc::new(Mutex::new(OffsetTracker::new(config.dedup_window)));
    let retry = backoff(config.retry_initial, config.retry_max);
    let writer = Arc::new(Writer {
        warehouse: warehouse.clone(),
        shelf: shelf.clone(),
        metrics: metrics.clone(),
        tracker: tracker.clone(),
        recent: Mutex::new(RecentHits::new(config.dedup_memory)),
        backoff: retry,
        limits: Limits {
            max_rows: config.batch_max_rows,
            max_bytes: config.batch_max_bytes,
            max_age: config.batch_max_age,
        },
        policy: Policy {
            park_after: config.park_after,
            bad_rows_as_5xx: config.bigquery.bad_rows_as_5xx,
            poison_strikes: 3,
        },
        topic: config.kafka.topic.clone(),
        ready_tables: Mutex::new(HashSet::new()),
        health: Mutex::new(Health::new(
            config.park_probe_initial,
            config.park_probe_max,
        )),
        pressure: AtomicBool::new(false),
        unparked: tokio::sync::Notify::new(),
        partitions: Mutex::new(HashMap::new()),
        active: Mutex::new(HashMap::new()),
        fence: config.fence_wait,
    });

    let mut consumer_config = base.clone();
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
    let owner: Arc<dyn Ownership> = writer.clone();
    let consumer: SinkConsumer = consumer_config
        .create_with_context(SinkContext {
            tracker: tracker.clone(),
            metrics: metrics.clone(),
            topic: config.kafka.topic.clone(),
            owner,
            revoke_wait: config.drain_timeout,
            group_refused: Default::default(),
            assignment_lost: Default::default(),
            health: Default::default(),
            takeover: Default::default(),
            takeover_fence: config.session_timeout,
            draining: Default::default(),
        })
        .context("creating the Kafka consumer")?;
    consumer
        .subscribe(&[&config.kafka.topic])
        .context("subscribing to the topic")?;
    let consumer = Arc::new(consumer);

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

    let drainer = Drainer::new(
        &producer_config,
        &format!("{}.parking", config.group_id),
        warehouse.clone(),
        metrics.clone(),
        config.kafka.topic.clone(),
        config.parking_topic.clone(),
        config.park_probe_initial,
        config.park_probe_max,
        Arc::new(tokio::sync::Notify::new()),
    )
    .context("creating the parking consumer")?;
    let unparked = drainer.unparked.clone();
    tokio::spawn({
        let writer = writer.clone();
        let cancel = cancel.clone();
        async move {
            // The writer wakes its own Notify; pass it on to the drainer's.
            loop {
                tokio::select! {
                    () = cancel.cancelled() => return,
                    () = writer.unparked.notified() => unparked.notify_one(),
                }
            }
        }
    });
    tokio::spawn(drainer.run(cancel.clone()));

    // The group guard: rejoin, readiness, or a crash-only exit.
    let group_ready = Arc::new(AtomicBool::new(true));
    let fatal = Arc::new(Mutex::new(None::<String>));
    if !config.stall_timeout.is_zero() {
        // Of the same group, never subscribed: reads the group's commits without joining it.
        let mut observer_config = base.clone();
        observer_config
            .set("group.id", &config.group_id)
            .set("enable.auto.commit", "false");
        config.kafka.apply_overrides(&mut observer_config);
        let observer: Arc<rdkafka::consumer::BaseConsumer> = Arc::new(
            observer_config
                .create()
                .context("creating the group guard's client")?,
        );
        let settings = GuardSettings {
            stall: config.stall_timeout,
            max_rejoins: 2,
            // A member whose session expired rejoins as a new member; the coordinator may wait
            // for its old self to expire first and then rebalance (over 30 s with a 10 s
            // session was seen on tansu after a broker restart).
            regain: config.session_timeout * 3 + Duration::from_secs(10),
        };
        tokio::spawn({
            let (consumer, topic, group_id) = (
                consumer.clone(),
                config.kafka.topic.clone(),
                config.group_id.clone(),
            );
            let (metrics, group_ready, cancel, fatal) = (
                metrics.clone(),
                group_ready.clone(),
                cancel.clone(),
                fatal.clone(),
            );
            async move {
                if let Some(reason) = group::watch(
                    consumer,
                    observer,
                    topic,
                    group_id,
                    settings,
                    metrics,
                    group_ready,
                    cancel.clone(),
                )
                .await
                {
                    tracing::error!(%reason, "exiting so that the sink is restarted");
                    *bq_sink::writer::lock(&fatal) = Some(reason);
                    cancel.cancel();
                }
            }
        });
    }
    tokio::spawn({
        let (consumer, topic, group_ready) = (
            consumer.clone(),
            config.kafka.topic.clone(),
            group_ready.clone(),
        );
        let probe_config = config.kafka.client_config();
        admin::readiness_loop(
            move || {
                if let Err(error) = hookpipe_common::kafka::check_topic(
                    consumer.client(),
                    &topic,
                    Duration::from_secs(2),
                ) {
                    // A configuration problem says which setting to check.
                    let health = &consumer.context().health;
                    if health.current().is_none()
                        && let Some(found) = hookpipe_common::kafka::probe_listener(&probe_config)
                    {
                        health.record(found);
                    }
                    return Err(match consumer.context().health.current() {
                        Some(diagnosis) => diagnosis.message.to_owned(),
                        None => error,
                    });
                }
                consumer.context().health.clear();
                if consumer.context().group_refused.load(Ordering::Relaxed) {
                    return Err("the consumer group refuses this sink's assignment strategy".into());
                }
                if !group_ready.load(Ordering::Relaxed) {
                    return Err(
                        "this sink owns no partition while records wait that no member owns".into(),
                    );
                }
                Ok(())
            },
            || {},
            ready.clone(),
            cancel.clone(),
        )
    });

    let pipeline = Pipeline {
        consumer,
        writer,
        catalogue,
        catalogue_path,
        max_buffered: config.max_buffered_rows,
        max_buffered_bytes: config.max_buffered_bytes,
        window: config.dedup_window,
        drain_timeout: config.drain_timeout,
        commit_timeout: config.commit_timeout,
    };
    let outcome = pipeline.run(cancel.clone()).await;
    ready.set(false);
    shelf.flush(Duration::from_secs(5));
    admin.stop().await?;
    let fatal = bq_sink::writer::lock(&fatal).take();
    match (outcome, fatal) {
        (Err(error), _) => {
            tracing::error!(%error, "bq-sink stopped to be restarted");
            Ok(ExitCode::from(EXIT_RESTART))
        }
        (Ok(()), Some(reason)) => {
            tracing::error!(%reason, "bq-sink stopped to be restarted");
            Ok(ExitCode::from(EXIT_RESTART))
        }
        (Ok(()), None) => {
            tracing::info!("bq-sink stopped");
            Ok(ExitCode::SUCCESS)
        }
    }
}
