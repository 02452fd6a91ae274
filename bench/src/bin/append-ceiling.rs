//! The write path's ceiling: the same rows the sink benchmark writes (the ~300-byte payload,
//! one row per hit), appended straight to BigQuery through the sink's own Storage Write API
//! code (`bq_sink::warehouse::storage`), with no Kafka, no batching decisions, no dedup and no
//! offset bookkeeping. One task per partition appends batches of `--batch` rows one after the
//! other, as the sink does for a partition with a backlog. Prints one JSON line: rows, seconds,
//! CPU time.
//!
//! BigQuery settings come from the sink's own variables (`HOOKPIPE_BIGQUERY_*`).

use std::sync::Arc;
use std::time::{Duration, Instant};

use bq_sink::config::BigQueryArgs;
use bq_sink::metrics::Metrics;
use bq_sink::row::Row;
use bq_sink::warehouse::Warehouse as _;
use bq_sink::warehouse::credentials::credentials;
use bq_sink::warehouse::rest::Rest;
use bq_sink::warehouse::storage::{Storage, StorageSettings};
use clap::Parser;
use hookpipe_bench::{cpu_time, payload};
use hookpipe_common::TableRef;

#[derive(Parser)]
struct Args {
    /// `project.dataset.table`; created if missing.
    #[arg(long)]
    table: TableRef,
    #[arg(long)]
    count: u64,
    /// Concurrent appenders, like the partitions a sink owns.
    #[arg(long, default_value_t = 4)]
    partitions: u64,
    /// Rows per write, like the sink's HOOKPIPE_BATCH_MAX_ROWS.
    #[arg(long, default_value_t = 500)]
    batch: u64,
    #[command(flatten)]
    bigquery: BigQueryArgs,
}

#[tokio::main]
async fn main() {
    let args = Args::parse();
    let auth = credentials(&args.bigquery).await.expect("credentials");
    let rest = Arc::new(
        Rest::connect(&args.bigquery, auth.clone())
            .await
            .expect("BigQuery REST client"),
    );
    let storage = Storage::new(
        StorageSettings {
            endpoint: args.bigquery.storage_endpoint.clone(),
            ca_file: args.bigquery.ca_file.clone(),
            timeout: args.bigquery.timeout,
            in_flight: args.bigquery.appends_in_flight,
            idle: Duration::from_secs(60),
        },
        rest,
        auth,
        Arc::new(Metrics::new()),
    )
    .expect("Storage Write API client");
    storage.ensure_table(&args.table).await.expect("table");

    let today = chrono::Utc::now().date_naive();
    let per_partition = args.count.div_ceil(args.partitions);
    let cpu_start = cpu_time();
    let start = Instant::now();
    let mut tasks = Vec::new();
    for partition in 0..args.partitions {
        let (storage, table) = (storage.clone(), args.table.clone());
        let first = partition * per_partition;
        let last = (first + per_partition).min(args.count);
        let batch = args.batch;
        tasks.push(tokio::spawn(async move {
            let mut i = first;
            while i < last {
                let end = (i + batch).min(last);
                // Rows are made as the sink makes them: from bytes it already holds.
                let rows: Vec<Row> = (i..end)
                    .map(|n| Row {
                        hit_id: uuid::Uuid::new_v4(),
                        payload: bytes::Bytes::from(payload(n)),
                        received_at: 1_764_633_600_000 + n as i64,
                        date: today,
                    })
                    .collect();
                let refs: Vec<&Row> = rows.iter().collect();
                storage
                    .write(&table, partition as i32, &refs)
                    .await
                    .expect("append");
                i = end;
            }
        }));
    }
    for task in tasks {
        task.await.expect("appender");
    }
    let seconds = start.elapsed().as_secs_f64();
    let cpu = cpu_time().saturating_sub(cpu_start);
    println!(
        "{}",
        serde_json::json!({
            "rows": args.count,
            "seconds": seconds,
            "rows_per_s": args.count as f64 / seconds,
            "cpu_seconds": cpu.as_secs_f64(),
            "cpu_ms_per_1000": cpu.as_secs_f64() * 1e6 / args.count.max(1) as f64,
        })
    );
}
