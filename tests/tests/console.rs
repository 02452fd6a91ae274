//! The stream console (issue #16) in a real browser: Debian's Chromium, driven by
//! playwright-core (tests/node/console.mjs), against a gateway and sink on the real broker and
//! emulator. The page lists every stream of the catalogue; on a stream's page the tabs switch
//! (by mouse and keyboard), each copy button puts exactly the CLI's snippet on the clipboard,
//! the test button lands a row, and the live figures count it; at 360 px nothing is wider than
//! the screen. Screenshots are kept in target/test-artifacts/console/.

#![allow(clippy::unwrap_used)]

use std::process::Command;
use std::time::Duration;

use hookpipe_tests::{Wiring, eventually, query, repo_root, unique};
use serde_json::Value;

const OPEN: &str = "6a1b2c3d-4e5f-4a6b-8c7d-9e0f1a2b3c4d";
const SIGNED: &str = "7b2c3d4e-5f6a-4b7c-9d8e-0f1a2b3c4d5e";
const STANDARD: &str = "8c3d4e5f-6a7b-4c8d-8e9f-1a2b3c4d5e6f";
const EXAMPLE_BODY: &str = "orderId=N1&status=delivered&total=120.13&userId=U1";
const LANGS: [&str; 9] = [
    "curl",
    "python",
    "python-stdlib",
    "node",
    "php",
    "ruby",
    "go",
    "java",
    "csharp",
];

fn cli_snippet(catalogue: &std::path::Path, id: &str, lang: &str, base_url: &str) -> String {
    let out = Command::new(repo_root().join("target/debug/ingest-gateway"))
        .args([
            "streams",
            "snippet",
            id,
            "--lang",
            lang,
            "--base-url",
            base_url,
        ])
        .arg("--catalogue")
        .arg(catalogue)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

async fn row_payload(wiring: &Wiring, table: &str, hit_id: &str) -> String {
    eventually(
        Duration::from_secs(60),
        &format!("the row of test hit {hit_id}"),
        || async {
            let rows = query(
                &wiring.servers,
                &format!("SELECT payload FROM `{table}` WHERE hit_id = '{hit_id}'"),
            )
            .await
            .ok()?;
            rows.first().and_then(|r| r[0].clone())
        },
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_console_in_chromium_lists_streams_copies_snippets_and_lands_a_test_hit() {
    let chromium = std::env::var("HOOKPIPE_TEST_CHROMIUM")
        .expect("HOOKPIPE_TEST_CHROMIUM (set by scripts/test: ensure_node_test_tools)");
    let tools = std::env::var("HOOKPIPE_TEST_NODE_TOOLS")
        .expect("HOOKPIPE_TEST_NODE_TOOLS (set by scripts/test: ensure_node_test_tools)");
    let dataset = unique("console");
    let dir = std::env::temp_dir().join(unique("hookpipe-console"));
    std::fs::create_dir_all(&dir).unwrap();
    let catalogue = dir.join("streams.yaml");
    std::fs::write(
        &catalogue,
        format!(
            "streams:
  - id: {OPEN}
    name: CRM orders <b>&</b>
    table: local-project.{dataset}.orders
    timezone: \"+03:00\"
  - id: {SIGNED}
    name: Signed leads
    table: local-project.{dataset}.leads
    timezone: Europe/Berlin
    auth:
      type: hmac-sha256
      prefix: \"sha256=\"
      timestamp_header: X-Timestamp
      secrets: [{{env: CONSOLE_HMAC}}]
  - id: {STANDARD}
    name: SaaS events
    table: local-project.{dataset}.events
    timezone: UTC
    auth:
      type: standard-webhooks
      secrets: [{{env: CONSOLE_WHSEC}}]
"
        ),
    )
    .unwrap();
    let wiring = Wiring::new(catalogue.clone(), 2).await;
    let gateway = wiring
        .gateway(&[
            ("CONSOLE_HMAC", "console-test-hmac-secret"),
            (
                "CONSOLE_WHSEC",
                "whsec_Y29uc29sZS10ZXN0LXN0YW5kYXJkLXdlYmhvb2tz",
            ),
        ])
        .await;
    let _sink = wiring.sink(&[("HOOKPIPE_BATCH_MAX_AGE", "200ms")]).await;

    let shots = repo_root().join("target/test-artifacts/console");
    std::fs::create_dir_all(&shots).unwrap();
    let args = serde_json::json!({
        "chromium": chromium,
        "admin": gateway.admin,
        "stream": SIGNED,
        "shots": shots,
    });
    let out = tokio::task::spawn_blocking(move || {
        Command::new("node")
            .arg(std::path::Path::new(&tools).join("console.mjs"))
            .arg(args.to_string())
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    assert!(
        out.status.success(),
        "the browser run failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();

    // The list: every stream of the catalogue, with its endpoint and auth, name escaped.
    assert_eq!(report["index"]["lang"], "en");
    assert_eq!(report["index"]["h1"], serde_json::json!(["Data streams"]));
    let rows = report["index"]["rows"].as_array().unwrap();
    let ids: Vec<&str> = rows.iter().map(|r| r["id"].as_str().unwrap()).collect();
    assert_eq!(ids, [OPEN, SIGNED, STANDARD]);
    assert_eq!(rows[0]["name"], "CRM orders <b>&</b>", "shown as text");
    for (row, (id, auth)) in rows.iter().zip([
        (OPEN, "none"),
        (SIGNED, "hmac-sha256"),
        (STANDARD, "standard-webhooks"),
    ]) {
        let cells: Vec<&str> = row["cells"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c.as_str().unwrap())
            .collect();
        assert!(cells.contains(&format!("{}/ds/{id}", gateway.url).as_str()));
        assert_eq!(cells.last(), Some(&auth), "{row}");
    }

    // The stream page, its tabs and what each copy button copies: the CLI's snippet.
    assert!(
        report["stream"]["url"]
            .as_str()
            .unwrap()
            .ends_with(&format!("/ui/streams/{SIGNED}"))
    );
    assert_eq!(report["stream"]["h1"], serde_json::json!(["Signed leads"]));
    assert_eq!(
        report["stream"]["endpoint"],
        format!("{}/ds/{SIGNED}", gateway.url)
    );
    let tabs = report["tabs"].as_array().unwrap();
    assert_eq!(tabs.len(), LANGS.len());
    for (tab, lang) in tabs.iter().zip(LANGS) {
        assert_eq!(tab["lang"], lang);
        assert_eq!(tab["selected"], "true", "{lang}: selected after a click");
        assert_eq!(tab["panelVisible"], true, "{lang}: its panel shows");
        assert_eq!(tab["visiblePanels"], 1, "{lang}: only its panel shows");
        assert_eq!(tab["copyStatus"], "Copied.", "{lang}");
        let cli = cli_snippet(&catalogue, SIGNED, lang, &gateway.url);
        assert_eq!(tab["copied"].as_str().unwrap(), cli, "{lang}: copied text");
        assert_eq!(tab["shown"].as_str().unwrap(), cli, "{lang}: shown text");
    }
    assert_eq!(report["keyboard"]["afterArrow"], "tab-python");
    assert_eq!(report["keyboard"]["selectedAfterArrow"], "tab-python");
    assert_eq!(report["keyboard"]["afterEnd"], "tab-csharp");

    // The test hit went through the signed stream's auth and landed as the example row.
    let hit_id = report["testHit"]["hitId"].as_str().unwrap().to_owned();
    assert!(
        report["testHit"]["status"]
            .as_str()
            .unwrap()
            .starts_with("Accepted (202)")
    );
    let payload = row_payload(&wiring, &format!("local-project.{dataset}.leads"), &hit_id).await;
    assert_eq!(payload, EXAMPLE_BODY);
    assert!(
        report["figures"]["accepted"]
            .as_str()
            .unwrap()
            .parse::<u64>()
            .unwrap()
            >= 1
    );
    assert_eq!(report["figures"]["refused"], "0");
    assert!(
        report["figures"]["lastHit"]
            .as_str()
            .unwrap()
            .contains("UTC"),
        "{}",
        report["figures"]
    );

    // Accessibility basics and no script errors.
    assert_eq!(report["a11y"]["unnamedButtons"], 0);
    assert_eq!(report["a11y"]["panelsWithoutTab"], 0);
    assert!(report["a11y"]["liveRegions"].as_u64().unwrap() >= 2);
    assert_eq!(report["a11y"]["skipLink"], "#main");
    assert_eq!(report["consoleErrors"], serde_json::json!([]));

    // A phone's width: nothing wider than the screen, the button reachable.
    for page in ["index", "stream"] {
        let width = report["phone"]["widths"][page].as_u64().unwrap();
        assert!(width <= 360, "{page} is {width} px wide at 360 px");
    }
    assert_eq!(report["phone"]["sendButtonVisible"], true);
    for shot in ["index-1280", "stream-1280", "index-360", "stream-360"] {
        let png = std::fs::read(shots.join(format!("{shot}.png"))).unwrap();
        assert!(
            png.starts_with(b"\x89PNG") && png.len() > 5_000,
            "{shot}.png"
        );
    }

    // The other kinds land too, through the same route the button calls (which a page of
    // another origin cannot call: it needs the console's header).
    let client = reqwest::Client::new();
    for (id, table) in [(OPEN, "orders"), (STANDARD, "events")] {
        let url = format!("{}/ui/streams/{id}/test-hit", gateway.admin);
        let refused = client.post(&url).send().await.unwrap();
        assert_eq!(refused.status(), 403, "without the console header");
        let answer: Value = client
            .post(&url)
            .header("X-Hookpipe-Console", "1")
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert_eq!(answer["status"], 202, "{answer}");
        let hit_id = answer["hit_id"].as_str().unwrap();
        let payload =
            row_payload(&wiring, &format!("local-project.{dataset}.{table}"), hit_id).await;
        assert_eq!(payload, EXAMPLE_BODY);
    }
}
