//! End-to-end latency: webhooks at a steady rate through a running gateway; the time from
//! each 202 to the moment its row is queryable in BigQuery. The table is polled every 100 ms
//! for the rows received since the oldest hit not seen yet (less a second), so a poll reads
//! about a second of rows however long the run; a row counts as visible when the poll that
//! found it answered (conservative by the poll's own time, reported as `poll_p50_ms`).
//! Prints one JSON line with p50/p95/p99.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use clap::Parser;
use hookpipe_bench::{payload, percentile};

#[derive(Parser)]
struct Args {
    #[arg(long, default_value = "http://127.0.0.1:8080")]
    gateway: String,
    #[arg(long)]
    stream: String,
    /// `project.dataset.table` of the stream.
    #[arg(long)]
    table: String,
    #[arg(long, default_value = "http://127.0.0.1:9050")]
    bigquery: String,
    /// Webhooks per second.
    #[arg(long, default_value_t = 50)]
    rate: u32,
    #[arg(long, default_value_t = 30)]
    seconds: u64,
}

#[tokio::main]
async fn main() {
    let args = Args::parse();
    let client = reqwest::Client::new();
    // hit_id → (202 at, sent at in Unix ms).
    let acked = std::sync::Arc::new(std::sync::Mutex::new(
        HashMap::<String, (Instant, u128)>::new(),
    ));
    let sender = {
        let (client, acked) = (client.clone(), acked.clone());
        let url = format!("{}/ds/{}", args.gateway, args.stream);
        let total = u64::from(args.rate) * args.seconds;
        let rate = args.rate;
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / f64::from(rate)));
            let mut tasks = tokio::task::JoinSet::new();
            for i in 0..total {
                tick.tick().await;
                let (client, acked, url) = (client.clone(), acked.clone(), url.clone());
                tasks.spawn(async move {
                    let sent_ms = unix_ms();
                    let r = client
                        .post(&url)
                        .header("content-type", "application/x-www-form-urlencoded")
                        .body(payload(i))
                        .send()
                        .await;
                    if let Ok(r) = r
                        && r.status() == 202
                        && let Ok(json) = r.json::<serde_json::Value>().await
                        && let Some(id) = json["hit_id"].as_str()
                    {
                        acked
                            .lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .insert(id.to_owned(), (Instant::now(), sent_ms));
                    }
                });
            }
            while tasks.join_next().await.is_some() {}
        })
    };
    let mut seen: HashMap<String, Duration> = HashMap::new();
    let query_url = format!(
        "{}/bigquery/v2/projects/local-project/queries",
        args.bigquery
    );
    let deadline = Instant::now() + Duration::from_secs(args.seconds + 60);
    let mut since_ms = unix_ms().saturating_sub(1000);
    let mut polls: Vec<Duration> = Vec::new();
    loop {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let sql = format!(
            "SELECT hit_id FROM `{}` WHERE received_at >= {since_ms}",
            args.table
        );
        let poll_started = Instant::now();
        if let Ok(r) = client
            .post(&query_url)
            .json(&serde_json::json!({"query": sql, "useLegacySql": false, "maxResults": 100000}))
            .send()
            .await
            && let Ok(json) = r.json::<serde_json::Value>().await
        {
            let now = Instant::now();
            polls.push(now - poll_started);
            let acked = acked.lock().unwrap_or_else(|e| e.into_inner());
            for row in json["rows"].as_array().into_iter().flatten() {
                if let Some(id) = row["f"][0]["v"].as_str()
                    && !seen.contains_key(id)
                    && let Some((at, _)) = acked.get(id)
                {
                    seen.insert(id.to_owned(), now.saturating_duration_since(*at));
                }
            }
            // The next poll reads from the oldest hit still unseen (its receipt is after its
            // send), less a second for clock steps; with none unseen, from a second ago.
            since_ms = acked
                .iter()
                .filter(|(id, _)| !seen.contains_key(*id))
                .map(|(_, (_, sent))| *sent)
                .min()
                .unwrap_or_else(unix_ms)
                .saturating_sub(1000);
            if sender.is_finished() && seen.len() >= acked.len() {
                break;
            }
        }
        if Instant::now() > deadline {
            break;
        }
    }
    let acked = acked.lock().unwrap_or_else(|e| e.into_inner()).len();
    let mut latencies: Vec<Duration> = seen.into_values().collect();
    latencies.sort_unstable();
    polls.sort_unstable();
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    println!(
        "{}",
        serde_json::json!({
            "rate": args.rate,
            "acknowledged": acked,
            "rows_seen": latencies.len(),
            "p50_ms": ms(percentile(&latencies, 50.0)),
            "p95_ms": ms(percentile(&latencies, 95.0)),
            "p99_ms": ms(percentile(&latencies, 99.0)),
            "max_ms": ms(percentile(&latencies, 100.0)),
            "poll_p50_ms": ms(percentile(&polls, 50.0)),
        })
    );
}

fn unix_ms() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .as_millis()
}
