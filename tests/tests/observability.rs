//! The observability pack (issue #6), checked against the real metrics: `promtool check rules`
//! on the PrometheusRule, then a real Prometheus scrapes a running gateway and sink (with the
//! rules loaded) while traffic flows and trouble happens (BigQuery down, the broker down, a
//! poison record), and every dashboard panel query and every alert expression is evaluated
//! through Prometheus's HTTP API: each must parse, every panel must return data, and every
//! rule must evaluate without error.

#![allow(clippy::unwrap_used)]

use std::process::Command;
use std::time::Duration;

use hookpipe_tests::{
    PrivateBroker, PrivateEmulator, Proc, Servers, Wiring, eventually, free_port, metric, produce,
    repo_root, send_hits, unique, write_catalogue,
};

/// The alert rules of the PrometheusRule, as a plain Prometheus rules file.
fn rules_file(dir: &std::path::Path) -> (std::path::PathBuf, Vec<(String, String)>) {
    let text =
        std::fs::read_to_string(repo_root().join("k8s/base/observability/prometheusrule.yaml"))
            .unwrap();
    let rule: serde_json::Value = serde_yaml_ng::from_str(&text).unwrap();
    let spec = &rule["spec"];
    let mut alerts = Vec::new();
    for group in spec["groups"].as_array().unwrap() {
        for r in group["rules"].as_array().unwrap() {
            alerts.push((
                r["alert"].as_str().unwrap().to_owned(),
                r["expr"].as_str().unwrap().to_owned(),
            ));
        }
    }
    let path = dir.join("rules.yml");
    std::fs::write(&path, serde_yaml_ng::to_string(spec).unwrap()).unwrap();
    (path, alerts)
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
    reqwest::Client::new()
        .get(format!("{prometheus}/api/v1/query"))
        .query(&[("query", expr)])
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_panel_and_alert_works_on_the_real_metrics() {
    let dir = std::env::temp_dir().join(unique("hookpipe-prometheus"));
    std::fs::create_dir_all(&dir).unwrap();
    let (rules, alerts) = rules_file(&dir);
    let checked = Command::new("promtool")
        .arg("check")
        .arg("rules")
        .arg(&rules)
        .output()
        .expect("promtool (Debian package prometheus; scripts/test installs it)");
    assert!(
        checked.status.success(),
        "promtool check rules:\n{}{}",
        String::from_utf8_lossy(&checked.stdout),
        String::from_utf8_lossy(&checked.stderr)
    );
    let panels = panel_queries();
    assert!(panels.len() >= 13, "{} panel queries", panels.len());

    // The pipeline, on servers this test may stop.
    let mut broker = PrivateBroker::start().await;
    let mut emulator = PrivateEmulator::start().await;
    let servers = Servers {
        brokers: broker.brokers(),
        bq_rest: emulator.rest(),
        project: "local-project".into(),
    };
    let stream = uuid::Uuid::new_v4().to_string();
    let table = format!("local-project.{}.orders", unique("observed"));
    let catalogue = write_catalogue(&[(&stream, &table, "Europe/Paris")]);
    let wiring = Wiring::on(servers, catalogue, 2).await;
    let gateway = wiring
        .gateway(&[("HOOKPIPE_PUBLISH_TIMEOUT", "500ms")])
        .await;
    let sink = wiring
        .sink(&[
            ("HOOKPIPE_BATCH_MAX_AGE", "200ms"),
            ("HOOKPIPE_RETRY_INITIAL", "100ms"),
            ("HOOKPIPE_RETRY_MAX", "1s"),
        ])
        .await;

    // A real Prometheus scraping both every second, with the alert rules loaded.
    let port = free_port();
    let config = dir.join("prometheus.yml");
    let target = |url: &str| url.trim_start_matches("http://").to_owned();
    std::fs::write(
        &config,
        format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nrule_files: [{}]\nscrape_configs:\n  - job_name: ingest-gateway\n    static_configs: [{{targets: ['{}']}}]\n  - job_name: bq-sink\n    static_configs: [{{targets: ['{}']}}]\n",
            rules.display(),
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
            let r = reqwest::get(format!("{prometheus}/api/v1/query?query=sum(up)"))
                .await
                .ok()?
                .json::<serde_json::Value>()
                .await
                .ok()?;
            (r["data"]["result"][0]["value"][1] == "2").then_some(())
        }
    })
    .await;

    // Traffic, and each kind of trouble the dashboard shows.
    send_hits(&gateway.url, &stream, 300, 4, Duration::from_millis(5)).await;
    let client = reqwest::Client::new();
    for _ in 0..5 {
        let unknown = format!("{}/ds/{}", gateway.url, uuid::Uuid::new_v4());
        client.post(unknown).body("a=1").send().await.unwrap();
        let empty = format!("{}/ds/{stream}", gateway.url);
        client.post(empty).send().await.unwrap();
    }
    // BigQuery down: write errors and retries.
    emulator.stop();
    send_hits(&gateway.url, &stream, 50, 2, Duration::ZERO).await;
    eventually(Duration::from_secs(30), "sink retries", || {
        let admin = sink.admin.clone();
        async move { (metric(&admin, "bq_sink_retries_total", &[]).await >= 2.0).then_some(()) }
    })
    .await;
    emulator.resume().await;
    // The broker down: 503s and publish errors.
    broker.stop();
    for _ in 0..3 {
        let r = client
            .post(format!("{}/ds/{stream}", gateway.url))
            .body("orderId=while-down")
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 503);
    }
    broker.resume().await;
    // A poison record: a dead letter.
    produce(
        &wiring.servers.brokers,
        &wiring.topic,
        &[(b"k".to_vec(), b"not an envelope".to_vec())],
    )
    .await;
    send_hits(&gateway.url, &stream, 100, 2, Duration::from_millis(5)).await;

    // Every panel: parses and returns data.
    let mut report = Vec::new();
    for (name, expr) in &panels {
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
        report.push(format!(
            "{name}: {} series, e.g. {}",
            result.len(),
            result[0]["value"][1]
        ));
    }
    // Every alert expression parses and evaluates; every rule is healthy in Prometheus.
    for (alert, expr) in &alerts {
        let r = prom_query(&prometheus, expr).await;
        assert_eq!(
            r["status"], "success",
            "alert {alert}: {expr} does not evaluate: {r}"
        );
    }
    let rules_state: serde_json::Value =
        eventually(Duration::from_secs(30), "rules evaluated", || {
            let prometheus = prometheus.clone();
            async move {
                let r: serde_json::Value = reqwest::get(format!("{prometheus}/api/v1/rules"))
                    .await
                    .ok()?
                    .json()
                    .await
                    .ok()?;
                let all: Vec<serde_json::Value> = r["data"]["groups"]
                    .as_array()?
                    .iter()
                    .flat_map(|g| g["rules"].as_array().cloned().unwrap_or_default())
                    .collect();
                all.iter()
                    .all(|rule| {
                        rule["lastEvaluation"]
                            .as_str()
                            .is_some_and(|t| !t.starts_with("0001"))
                    })
                    .then_some(serde_json::Value::Array(all))
            }
        })
        .await;
    let rules_state = rules_state.as_array().unwrap();
    assert_eq!(rules_state.len(), alerts.len());
    for rule in rules_state {
        assert_eq!(
            rule["health"], "ok",
            "rule {}: {}",
            rule["name"], rule["lastError"]
        );
    }
    println!("{}", report.join("\n"));
    // The one dead letter makes its alert fire (it has no `for`): the counter starts at 0,
    // so even the first event is an increase.
    eventually(Duration::from_secs(30), "HookpipeDeadLetters firing", || {
        let prometheus = prometheus.clone();
        async move {
            let r = prom_query(
                &prometheus,
                "ALERTS{alertname=\"HookpipeDeadLetters\", alertstate=\"firing\", reason=\"undecodable\"}",
            )
            .await;
            (!r["data"]["result"].as_array()?.is_empty()).then_some(())
        }
    })
    .await;
}
