//! End to end on the real broker and emulator: the documented curl call becomes exactly the
//! documented row.

#![allow(clippy::unwrap_used)]

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use hookpipe_tests::{Wiring, eventually, query, repo_root};

const STREAM: &str = "522ed95e-9f07-45f6-a0b7-28bf2d0315e5";
const BODY: &str = "orderId=N1&status=delivered&total=120.13&userId=U1";

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
}

#[tokio::test]
async fn a_curl_webhook_becomes_one_row_in_crm_orders() {
    let wiring = Wiring::new(repo_root().join("examples/streams.yaml"), 4).await;
    let gateway = wiring.gateway(&[]).await;
    let sink = wiring.sink(&[]).await;

    // Exactly what `curl -d "..." -X POST URL` sends.
    let started = now_ms();
    let response = reqwest::Client::new()
        .post(format!("{}/ds/{STREAM}", gateway.url))
        .header("content-type", "application/x-www-form-urlencoded")
        .header("user-agent", "curl/8.0")
        .body(BODY)
        .send()
        .await
        .unwrap();
    let ended = now_ms();
    assert_eq!(response.status(), 202);
    let json: serde_json::Value = response.json().await.unwrap();
    let hit_id = json["hit_id"].as_str().unwrap().to_owned();
    uuid::Uuid::parse_str(&hit_id).expect("hit_id is a UUID");

    let sql = format!(
        "SELECT hit_id, payload, received_at, CAST(date AS STRING) FROM `local-project.offline_data.crm_orders` WHERE hit_id = '{hit_id}'"
    );
    let rows = eventually(Duration::from_secs(15), "the row in crm_orders", || {
        let (servers, sql) = (wiring.servers.clone(), sql.clone());
        async move {
            query(&servers, &sql)
                .await
                .ok()
                .filter(|rows| !rows.is_empty())
        }
    })
    .await;

    assert_eq!(rows.len(), 1, "exactly one row for the hit: {rows:?}");
    let row = &rows[0];
    assert_eq!(row[0].as_deref(), Some(hit_id.as_str()));
    assert_eq!(row[1].as_deref(), Some(BODY), "payload is byte-identical");
    let received_at: i64 = row[2].as_deref().unwrap().parse().unwrap();
    assert!(
        (started..=ended).contains(&received_at),
        "received_at {received_at} is not within the request [{started}, {ended}]"
    );
    // The receipt day at UTC+03:00.
    let expected_day = chrono_day(received_at + 3 * 3600 * 1000);
    assert_eq!(row[3].as_deref(), Some(expected_day.as_str()));

    // The table was created with exactly the documented schema, partitioned by day on `date`.
    let table: serde_json::Value = reqwest::get(format!(
        "{}/bigquery/v2/projects/local-project/datasets/offline_data/tables/crm_orders",
        wiring.servers.bq_rest
    ))
    .await
    .unwrap()
    .json()
    .await
    .unwrap();
    let fields: Vec<(String, String, String)> = table["schema"]["fields"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| {
            (
                f["name"].as_str().unwrap().to_owned(),
                f["type"].as_str().unwrap().to_owned(),
                f["mode"].as_str().unwrap_or("NULLABLE").to_owned(),
            )
        })
        .collect();
    let expect = |n: &str, t: &str, m: &str| (n.to_owned(), t.to_owned(), m.to_owned());
    assert_eq!(
        fields,
        [
            expect("hit_id", "STRING", "REQUIRED"),
            expect("payload", "STRING", "NULLABLE"),
            expect("received_at", "INT64", "NULLABLE"),
            expect("date", "DATE", "NULLABLE"),
        ]
    );
    assert_eq!(table["timePartitioning"]["type"], "DAY");
    assert_eq!(table["timePartitioning"]["field"], "date");

    // The sink counted the row for its stream.
    let written = hookpipe_tests::metric(
        &sink.admin,
        "bq_sink_rows_written_total",
        &[("stream", STREAM)],
    )
    .await;
    assert!(written >= 1.0, "rows_written_total = {written}");
}

/// `YYYY-MM-DD` of a Unix-ms instant already shifted to local time (civil-from-days, so the
/// test does not reuse the code under test).
fn chrono_day(local_ms: i64) -> String {
    let days = local_ms.div_euclid(86_400_000);
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!("{y:04}-{m:02}-{d:02}")
}

#[test]
fn civil_day_helper() {
    assert_eq!(chrono_day(1_603_131_452_123), "2020-10-19");
    assert_eq!(chrono_day(0), "1970-01-01");
    assert_eq!(chrono_day(951_782_400_000), "2000-02-29");
}
