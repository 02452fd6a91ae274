//! The observability pack against the real metrics: `promtool check rules` on the
//! PrometheusRule (and `promtool test rules` for the one alert no local broker can trigger),
//! then a real Prometheus scrapes a running gateway and sink while the trouble each alert is
//! meant for happens, and every alert must be seen *firing* in its scenario; afterwards every
//! dashboard panel must return data.
//!
//! The rules are evaluated with their time windows and `for:` durations divided by 20 (5
//! minutes become 15 seconds), so that a scenario takes seconds; thresholds and expressions
//! are otherwise exactly the shipped ones.

#![allow(clippy::unwrap_used)]

use std::process::Command;
use std::time::{Duration, Instant};

use hookpipe_proto::{Envelope, Message as _, Parked};
use hookpipe_tests::proxy::FaultProxy;
use hookpipe_tests::{
    PrivateBroker, PrivateEmulator, Proc, Servers, Wiring, eventually, free_port, produce,
    repo_root, send_hits, unique, write_catalogue,
};

/// Time in the rules is divided by this.
const SPEEDUP: u64 = 20;

/// `5m` → seconds.
fn seconds(duration: &str) -> u64 {
    let (n, unit) = duration.split_at(duration.len() - 1);
    let n: u64 = n.parse().unwrap();
    match unit {
        "s" => n,
        "m" => n * 60,
        "h" => n * 3600,
        other => panic!("unit {other}"),
    }
}

/// The expression with every range (`[5m]`, `[15m:1m]`) divided by SPEEDUP.
fn speed_up(expr: &str) -> String {
    let mut out = String::new();
    let mut rest = expr;
    while let Some(open) = rest.find('[') {
        let close = open + rest[open..].find(']').unwrap();
        out.push_str(&rest[..open]);
        let ranges: Vec<String> = rest[open + 1..close]
            .split(':')
            .map(|d| format!("{}s", (seconds(d) / SPEEDUP).max(1)))
            .collect();
        out.push_str(&format!("[{}]", ranges.join(":")));
        rest = &rest[close + 1..];
    }
    out.push_str(rest);
    out
}

/// The shipped rules (as a plain Prometheus rules file) and the sped-up ones; and the alerts.
fn rules_files(dir: &std::path::Path) -> (std::path::PathBuf, std::path::PathBuf, Vec<String>) {
    let text =
        std::fs::read_to_string(repo_root().join("k8s/base/observability/prometheusrule.yaml"))
            .unwrap();
    let rule: serde_json::Value = serde_yaml_ng::from_str(&text).unwrap();
    let spec = rule["spec"].clone();
    let shipped = dir.join("rules.yml");
    std::fs::write(&shipped, serde_yaml_ng::to_string(&spec).unwrap()).unwrap();
    let mut fast = spec;
    let mut alerts = Vec::new();
    for group in fast["groups"].as_array_mut().unwrap() {
        for r in group["rules"].as_array_mut().unwrap() {
            alerts.push(r["alert"].as_str().unwrap().to_owned());
            r["expr"] = speed_up(r["expr"].as_str().unwrap()).into();
            if let Some(f) = r["for"].as_str() {
                r["for"] = format!("{}s", seconds(f) / SPEEDUP).into();
            }
        }
    }
    let sped = dir.join("rules-fast.yml");
    std::fs::write(&sped, serde_yaml_ng::to_string(&fast).unwrap()).unwrap();
    (shipped, sped, alerts)
}

/// Every query of the dashboard, with Grafana's `$__rate_interval` set to what a 1 s scrape
/// interval gives.
fn panel_queries() -> Vec<(String, String)> {
    let text =
        std::fs::read_to_string(repo_root().join("k8s/base/observability/hookpipe-dashboard.json"))
            .unwrap();
    let dashboard: serde_json::Value = serde_json::from_str(&text).unwrap();
    let mut out = Vec::new();
    let mut stack: Vec<&serde_json::Value> =
        dashboard["panels"].as_array().unwrap().iter().collect();
    while let Some(panel) = stack.pop() {
        if let Some(inner) = panel["panels"].as_array() {
            stack.extend(inner);
        }
        for target in panel["targets"].as_array().into_iter().flatten() {
            out.push((
                format!(
                    "{} / {}",
                    panel["title"].as_str().unwrap(),
                    target["legendFormat"].as_str().unwrap_or("")
                ),
                target["expr"]
                    .as_str()
                    .unwrap()
                    .replace("$__rate_interval", "1m"),
            ));
        }
    }
    out
}

async fn prom_query(prometheus: &str, expr: &str) -> serde_json::Value {
    prom_try(prometheus, expr)
        .await
        .expect("Prometheus answers")
}

/// A query, or `None` while Prometheus does not answer (starting up).
async fn prom_try(prometheus: &str, expr: &str) -> Option<serde_json::Value> {
    reqwest::Client::new()
        .get(format!("{prometheus}/api/v1/query"))
        .query(&[("query", expr)])
        .send()
        .await
        .ok()?
        .json()
        .await
        .ok()
}

/// Waits until `alert` is firing (with the given label, if any).
async fn fires(prometheus: &str, alert: &str, label: Option<(&str, &str)>, timeout: Duration) {
    let started = Instant::now();
    let selector = match label {
        Some((k, v)) => {
            format!("ALERTS{{alertname=\"{alert}\", alertstate=\"firing\", {k}=\"{v}\"}}")
        }
        None => format!("ALERTS{{alertname=\"{alert}\", alertstate=\"firing\"}}"),
    };
    eventually(timeout, &format!("{alert} firing"), || {
        let (prometheus, selector) = (prometheus.to_owned(), selector.clone());
        async move {
            let r = prom_try(&prometheus, &selector).await?;
            (!r["data"]["result"].as_array()?.is_empty()).then_some(())
        }
    })
    .await;
    eprintln!(
        "{alert} fired after {:.0} s",
        started.elapsed().as_secs_f64()
    );
}

fn promtool(args: &[&str]) {
    let out = Command::new("promtool")
        .args(args)
        .output()
        .expect("promtool (Debian package prometheus; scripts/test installs it)");
    assert!(
        out.status.success(),
        "promtool {args:?}:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The one alert no local broker can produce (tansu does not describe groups, so a stranded
/// sink there exits to be restarted rather than report orphans for minutes): its rule is
/// tested on synthetic series, in Prometheus' own rule-test format.
#[test]
fn the_orphaned_partitions_alert_fires_on_its_series() {
    let dir = std::env::temp_dir().join(unique("hookpipe-promtool"));
    std::fs::create_dir_all(&dir).unwrap();
    let (shipped, _, _) = rules_files(&dir);
    let test = dir.join("orphaned-test.yml");
    std::fs::write(
        &test,
        format!(
            r#"rule_files: ["{}"]
evaluation_interval: 1m
tests:
  - interval: 1m
    input_series:
      - series: 'bq_sink_orphaned_partitions{{instance="sink-0"}}'
        values: '0 0 2 2 2 2 2 2 2 0'
    alert_rule_test:
      - eval_time: 5m
        alertname: HookpipeSinkPartitionsOrphaned
        exp_alerts: []
      - eval_time: 7m
        alertname: HookpipeSinkPartitionsOrphaned
        exp_alerts:
          - exp_labels: {{severity: critical}}
            exp_annotations:
              summary: Partitions with waiting records have no owner in the sink's consumer group.
              runbook_url: https://github.com/example/hookpipe/blob/main/docs/operations.md#hookpipesinkpartitionsorphaned
      - eval_time: 9m
        alertname: HookpipeSinkPartitionsOrphaned
        exp_alerts: []
"#,
            shipped.display()
        ),
    )
    .unwrap();
    promtool(&["test", "rules", test.to_str().unwrap()]);
}

fn envelope(stream: &str, table: &str, received_at_ms: i64, payload: &str) -> (Vec<u8>, Vec<u8>) {
    let hit_id = uuid::Uuid::now_v7().to_string();
    let value = Envelope {
        hit_id: hit_id.clone(),
        received_at_ms,
        stream_id: stream.to_owned(),
        payload: payload.as_bytes().to_vec().into(),
        table: table.to_owned(),
        timezone: "UTC".into(),
        ..Default::default()
    }
    .encode_to_vec();
    (hit_id.into_bytes(), value)
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_alert_fires_in_its_scenario_and_every_panel_has_data() {
    let dir = std::env::temp_dir().join(unique("hookpipe-prometheus"));
    std::fs::create_dir_all(&dir).unwrap();
    let (shipped, fast, alerts) = rules_files(&dir);
    promtool(&["check", "rules", shipped.to_str().unwrap()]);
    promtool(&["check", "rules", fast.to_str().unwrap()]);

    // The pipeline, on servers this test may stop; the sink reaches BigQuery through a fault
    // proxy that can refuse one table.
    let mut broker = PrivateBroker::start().await;
    let mut emulator = PrivateEmulator::start().await;
    let servers = Servers {
        brokers: broker.brokers(),
        bq_rest: emulator.rest(),
        bq_grpc: emulator.grpc(),
        project: "local-project".into(),
    };
    let (orders, leads) = (
        uuid::Uuid::new_v4().to_string(),
        uuid::Uuid::new_v4().to_string(),
    );
    let dataset = unique("observed");
    let (orders_table, leads_table) = (
        format!("local-project.{dataset}.orders"),
        format!("local-project.{dataset}.leads"),
    );
    let catalogue = write_catalogue(&[
        (&orders, &orders_table, "Europe/Paris"),
        (&leads, &leads_table, "UTC"),
    ]);
    let wiring = Wiring::on(servers, catalogue, 2).await;
    let proxy = FaultProxy::start(&format!("127.0.0.1:{}", emulator.rest_port)).await;
    let gateway = wiring.gateway(&[("HOOKPIPE_PUBLISH_TIMEOUT", "3s")]).await;
    let endpoint = format!("http://{}/bigquery/v2", proxy.addr());
    let sink = wiring
        .sink(&[
            ("HOOKPIPE_BIGQUERY_ENDPOINT", &endpoint),
            // Longer than the broker outage of the first scenario: this test is about alerts,
            // tests/tests/group.rs about losing and regaining the group.
            ("HOOKPIPE_SESSION_TIMEOUT", "45s"),
            ("HOOKPIPE_BATCH_MAX_AGE", "200ms"),
            ("HOOKPIPE_RETRY_INITIAL", "100ms"),
            ("HOOKPIPE_RETRY_MAX", "1s"),
            ("HOOKPIPE_PARK_AFTER", "2s"),
            ("HOOKPIPE_PARK_PROBE_INITIAL", "2s"),
            ("HOOKPIPE_PARK_PROBE_MAX", "4s"),
        ])
        .await;

    // A real Prometheus scraping both every second, with the sped-up rules.
    let port = free_port();
    let config = dir.join("prometheus.yml");
    let target = |url: &str| url.trim_start_matches("http://").to_owned();
    std::fs::write(
        &config,
        format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nrule_files: [{}]\nscrape_configs:\n  - job_name: ingest-gateway\n    static_configs: [{{targets: ['{}']}}]\n  - job_name: bq-sink\n    static_configs: [{{targets: ['{}']}}]\n",
            fast.display(),
            target(&gateway.admin),
            target(&sink.admin)
        ),
    )
    .unwrap();
    let _prometheus = Proc::spawn_program(
        "prometheus",
        "prometheus",
        &[
            format!("--config.file={}", config.display()),
            format!("--storage.tsdb.path={}", dir.join("data").display()),
            format!("--web.listen-address=127.0.0.1:{port}"),
        ],
    );
    let prometheus = format!("http://127.0.0.1:{port}");
    eventually(Duration::from_secs(30), "both targets up", || {
        let prometheus = prometheus.clone();
        async move {
            let r = prom_try(&prometheus, "sum(up)").await?;
            (r["data"]["result"][0]["value"][1] == "2").then_some(())
        }
    })
    .await;
    send_hits(&gateway.url, &orders, 200, 4, Duration::from_millis(5)).await;

    // 1. Senders get 503 (the broker is down) and many calls are refused with 4xx.
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap();
    let refusals = tokio::spawn({
        let (client, url) = (client.clone(), gateway.url.clone());
        async move {
            let stop = Instant::now() + Duration::from_secs(60);
            while Instant::now() < stop {
                let _ = client
                    .post(format!("{url}/ds/{}", uuid::Uuid::new_v4()))
                    .body("a=1")
                    .send()
                    .await;
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    });
    broker.stop();
    let unavailable = tokio::spawn({
        let (client, url, orders) = (client.clone(), gateway.url.clone(), orders.clone());
        async move {
            let stop = Instant::now() + Duration::from_secs(25);
            while Instant::now() < stop {
                let _ = client
                    .post(format!("{url}/ds/{orders}"))
                    .body("orderId=while-down")
                    .send()
                    .await;
                // While the broker does not acknowledge the gateway answers 503 at once (it
                // queues nothing): pace the retries as a sender would, so the 503s do not
                // drown the 4xx ratio of the next alert.
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    });
    fires(
        &prometheus,
        "HookpipeGatewayUnavailableRatio",
        None,
        Duration::from_secs(60),
    )
    .await;
    unavailable.await.unwrap();
    broker.resume().await;
    fires(
        &prometheus,
        "HookpipeGatewayErrorRatio",
        None,
        Duration::from_secs(90),
    )
    .await;
    refusals.await.unwrap();

    // 2. Kafka acknowledges slowly: the broker freezes for 800 ms every 1.5 s, while webhooks
    //    keep coming.
    let stop_slow = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let slow = tokio::spawn({
        let (url, orders, stop) = (gateway.url.clone(), orders.clone(), stop_slow.clone());
        async move {
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                send_hits(&url, &orders, 40, 8, Duration::ZERO).await;
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    });
    let freezing = Instant::now();
    while freezing.elapsed() < Duration::from_secs(80) {
        broker.pause();
        tokio::time::sleep(Duration::from_millis(800)).await;
        broker.unpause();
        tokio::time::sleep(Duration::from_millis(700)).await;
        if freezing.elapsed() > Duration::from_secs(32)
            && !prom_query(
                &prometheus,
                "ALERTS{alertname=\"HookpipePublishLatencyHigh\", alertstate=\"firing\"}",
            )
            .await["data"]["result"]
                .as_array()
                .unwrap()
                .is_empty()
        {
            break;
        }
    }
    fires(
        &prometheus,
        "HookpipePublishLatencyHigh",
        None,
        Duration::from_secs(30),
    )
    .await;
    stop_slow.store(true, std::sync::atomic::Ordering::Relaxed);
    slow.await.unwrap();

    // 3. BigQuery down while hits keep arriving: write errors, no rows written, lag growing;
    //    and a record that is not an envelope is dead-lettered meanwhile.
    emulator.stop();
    produce(
        &wiring.servers.brokers,
        &wiring.topic,
        &[(b"k".to_vec(), b"not an envelope".to_vec())],
    )
    .await;
    let backlog = tokio::spawn({
        let (url, orders) = (gateway.url.clone(), orders.clone());
        async move { send_hits(&url, &orders, 2500, 4, Duration::from_millis(60)).await }
    });
    fires(
        &prometheus,
        "HookpipeDeadLetters",
        Some(("reason", "undecodable")),
        Duration::from_secs(30),
    )
    .await;
    fires(
        &prometheus,
        "HookpipeBigQueryWriteErrors",
        None,
        Duration::from_secs(90),
    )
    .await;
    fires(
        &prometheus,
        "HookpipeSinkNotWriting",
        None,
        Duration::from_secs(90),
    )
    .await;
    fires(
        &prometheus,
        "HookpipeSinkLagGrowing",
        None,
        Duration::from_secs(120),
    )
    .await;
    backlog.await.unwrap();
    emulator.resume().await;

    // 4. One table refuses every write while the other is written: its rows are parked; a
    //    parked row from seven hours ago is ageing towards the topic's retention.
    proxy.deny_table(&leads_table);
    let parked = Parked {
        original: envelope(&leads, &leads_table, now_ms() - 7 * 3_600_000, "leadId=old").1,
        original_key: b"old".to_vec(),
        table: leads_table.clone(),
        reason: "denied".into(),
        parked_at_ms: now_ms() - 7 * 3_600_000,
        times_parked: 1,
        ..Default::default()
    }
    .encode_to_vec();
    produce(
        &wiring.servers.brokers,
        &wiring.parking_topic,
        &[(b"old".to_vec(), parked)],
    )
    .await;
    let mixed = tokio::spawn({
        let (url, orders, leads) = (gateway.url.clone(), orders.clone(), leads.clone());
        async move {
            for _ in 0..40 {
                send_hits(&url, &orders, 10, 2, Duration::ZERO).await;
                send_hits(&url, &leads, 2, 1, Duration::ZERO).await;
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        }
    });
    fires(
        &prometheus,
        "HookpipeTableParked",
        Some(("table", &leads_table)),
        Duration::from_secs(90),
    )
    .await;
    fires(
        &prometheus,
        "HookpipeParkedRowsAgeing",
        Some(("table", &leads_table)),
        Duration::from_secs(60),
    )
    .await;
    mixed.await.unwrap();
    proxy.allow_all_tables();

    // 5. Rows reach BigQuery long after receipt (hits received two minutes ago).
    let late = Instant::now();
    while late.elapsed() < Duration::from_secs(75) {
        let batch: Vec<(Vec<u8>, Vec<u8>)> = (0..20)
            .map(|i| {
                envelope(
                    &orders,
                    &orders_table,
                    now_ms() - 120_000,
                    &format!("orderId=late{i}"),
                )
            })
            .collect();
        produce(&wiring.servers.brokers, &wiring.topic, &batch).await;
        if late.elapsed() > Duration::from_secs(50)
            && !prom_query(
                &prometheus,
                "ALERTS{alertname=\"HookpipeEndToEndLatencyHigh\", alertstate=\"firing\"}",
            )
            .await["data"]["result"]
                .as_array()
                .unwrap()
                .is_empty()
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    fires(
        &prometheus,
        "HookpipeEndToEndLatencyHigh",
        None,
        Duration::from_secs(30),
    )
    .await;

    // Every alert of the rules was seen firing, but the one tested on synthetic series.
    for alert in &alerts {
        let r = prom_query(
            &prometheus,
            &format!("max_over_time(ALERTS{{alertname=\"{alert}\", alertstate=\"firing\"}}[30m])"),
        )
        .await;
        let seen = !r["data"]["result"].as_array().unwrap().is_empty();
        assert!(
            seen || alert == "HookpipeSinkPartitionsOrphaned",
            "{alert} never fired in its scenario"
        );
    }
    // Every rule is healthy in Prometheus.
    let r: serde_json::Value = reqwest::get(format!("{prometheus}/api/v1/rules"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    for rule in r["data"]["groups"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|g| g["rules"].as_array().cloned().unwrap_or_default())
    {
        assert_eq!(
            rule["health"], "ok",
            "rule {}: {}",
            rule["name"], rule["lastError"]
        );
    }
    // Every panel: parses and returns data.
    for (name, expr) in panel_queries() {
        let result = eventually(
            Duration::from_secs(60),
            &format!("data for {name}: {expr}"),
            || {
                let (prometheus, expr) = (prometheus.clone(), expr.clone());
                async move {
                    let r = prom_query(&prometheus, &expr).await;
                    assert_eq!(r["status"], "success", "{expr} does not evaluate: {r}");
                    let result = r["data"]["result"].as_array().cloned().unwrap_or_default();
                    (!result.is_empty()).then_some(result)
                }
            },
        )
        .await;
        eprintln!("{name}: {} series", result.len());
    }
}
