//! Integration snippets (issue #7), run for real: for every language whose runtime is on the
//! machine (`scripts/test` installs them: curl, Python, Node.js, PHP, Ruby, Go, Java), the
//! snippet served by the gateway's admin port is saved and executed against the running
//! gateway, once for a stream without auth, once for a stream with HMAC signatures and once
//! for a Standard Webhooks stream; the row each run made must be in the table with the example
//! payload byte for byte. The C#
//! snippet cannot run here and is checked for the same URL, headers and auth as the others.

#![allow(clippy::unwrap_used)]

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use hookpipe_tests::{Wiring, eventually, query, repo_root, unique};

const EXAMPLE_BODY: &str = "orderId=N1&status=delivered&total=120.13&userId=U1";
const EXAMPLE_KEY: &str = "N1-delivered";
const SECRET: &str = "snippet-test-signing-secret";
/// The Standard Webhooks stream's secret: `whsec_` + base64 of the key.
const SW_SECRET: &str = "whsec_c25pcHBldC10ZXN0LXN0YW5kYXJkLXdlYmhvb2tz";

/// Languages run here, with the command that runs a saved snippet.
fn runnable() -> Vec<(&'static str, Vec<String>)> {
    let python = std::env::var("HOOKPIPE_TEST_PYTHON").unwrap_or_else(|_| "python3".into());
    vec![
        ("curl", vec!["bash".into()]),
        ("python", vec![python]),
        ("python-stdlib", vec!["python3".into()]),
        ("node", vec!["node".into()]),
        ("php", vec!["php".into()]),
        ("ruby", vec!["ruby".into()]),
        ("go", vec!["go".into(), "run".into()]),
        ("java", vec!["java".into()]),
    ]
}

/// The body of a GET (the admin port's listings and snippets).
async fn get_text(client: &reqwest::Client, url: String) -> String {
    client.get(url).send().await.unwrap().text().await.unwrap()
}

/// Saves `code` as `dir/file` and runs it there with the language's command (off the
/// runtime: Go and Java compile first), with the signing secret in `WEBHOOK_SECRET`.
async fn run_snippet(
    command: &[String],
    dir: PathBuf,
    file: String,
    code: Vec<u8>,
    secret: &'static str,
) -> std::process::Output {
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join(&file), code).unwrap();
    let command = command.to_vec();
    tokio::task::spawn_blocking(move || {
        Command::new(&command[0])
            .args(&command[1..])
            .arg(&file)
            .current_dir(&dir)
            .env("WEBHOOK_SECRET", secret)
            .env("GOCACHE", repo_root().join("target/go-cache"))
            .output()
            .unwrap()
    })
    .await
    .unwrap()
}

/// The two HMAC styles alternate between languages, so both are run: hex with a prefix and a
/// signed timestamp, and base64 of the body alone.
fn hmac_auth(i: usize) -> &'static str {
    if i.is_multiple_of(2) {
        "    auth:\n      type: hmac-sha256\n      prefix: \"sha256=\"\n      timestamp_header: X-Timestamp\n      secrets: [{env: SNIPPET_SECRET}]\n"
    } else {
        "    auth:\n      type: hmac-sha256\n      header: X-Hub-Signature\n      encoding: base64\n      secrets: [{env: SNIPPET_SECRET}]\n"
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_snippet_sends_the_example_and_the_row_arrives() {
    let languages = runnable();
    let dataset = unique("snippets");
    let table = format!("local-project.{dataset}.orders");
    // Three streams per language: open, HMAC, and Standard Webhooks.
    let mut streams = Vec::new();
    let mut text = String::from("streams:\n");
    for (i, (lang, _)) in languages.iter().enumerate() {
        for kind in ["open", "hmac", "standard-webhooks"] {
            let id = uuid::Uuid::new_v4();
            let auth = match kind {
                "hmac" => hmac_auth(i),
                "standard-webhooks" => {
                    "    auth:\n      type: standard-webhooks\n      secrets: [{env: SNIPPET_SW_SECRET}]\n"
                }
                _ => "",
            };
            text.push_str(&format!(
                "  - id: {id}\n    name: \"{lang} {kind}\"\n    table: {table}\n    timezone: Europe/Madrid\n{auth}"
            ));
            streams.push((*lang, kind, id));
        }
    }
    let csharp_stream = uuid::Uuid::new_v4();
    text.push_str(&format!(
        "  - id: {csharp_stream}\n    table: {table}\n    timezone: UTC\n{}",
        hmac_auth(0)
    ));
    let dir = std::env::temp_dir().join(unique("hookpipe-snippets"));
    std::fs::create_dir_all(&dir).unwrap();
    let catalogue = dir.join("streams.yaml");
    std::fs::write(&catalogue, &text).unwrap();

    let wiring = Wiring::new(catalogue.clone(), 2).await;
    let gateway = wiring
        .gateway(&[("SNIPPET_SECRET", SECRET), ("SNIPPET_SW_SECRET", SW_SECRET)])
        .await;
    let _sink = wiring.sink(&[("HOOKPIPE_BATCH_MAX_AGE", "200ms")]).await;
    let client = reqwest::Client::new();

    // The admin listing: every stream, its auth mode, its URL, and no secret.
    let listing = get_text(&client, format!("{}/streams", gateway.admin)).await;
    assert!(!listing.contains(SECRET), "the listing shows a secret");
    let json: serde_json::Value = serde_json::from_str(&listing).unwrap();
    let listed = json["streams"].as_array().unwrap();
    assert_eq!(listed.len(), streams.len() + 1);
    let (_, _, first) = streams[1];
    let entry = listed
        .iter()
        .find(|s| s["id"] == first.to_string())
        .unwrap();
    assert_eq!(entry["auth"], "hmac-sha256");
    assert_eq!(entry["url"], format!("{}/ds/{first}", gateway.url));

    let mut expected = Vec::new();
    let mut failures = Vec::new();
    for (lang, kind, id) in &streams {
        let code = client
            .get(format!(
                "{}/streams/{id}/snippet?lang={lang}",
                gateway.admin
            ))
            .send()
            .await
            .unwrap();
        assert_eq!(code.status(), 200, "{lang} snippet");
        let file_name = code
            .headers()
            .get("content-disposition")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.split('"').nth(1))
            .unwrap()
            .to_owned();
        let code = code.text().await.unwrap();
        let command = &languages.iter().find(|(l, _)| l == lang).unwrap().1;
        let run_dir = dir.join(format!("{lang}-{kind}"));
        let secret = if *kind == "standard-webhooks" {
            SW_SECRET
        } else {
            SECRET
        };
        let output = run_snippet(
            command,
            run_dir,
            file_name,
            code.clone().into_bytes(),
            secret,
        )
        .await;
        let hit_id = uuid::Uuid::new_v5(id, EXAMPLE_KEY.as_bytes()).to_string();
        let stdout = String::from_utf8_lossy(&output.stdout);
        // Each prints the hit_id (curl prints the gateway's JSON answer, which holds it).
        if !output.status.success() || !stdout.contains(&hit_id) {
            failures.push(format!(
                "{lang} ({kind}): exit {:?}, printed {:?}, expected {hit_id}\n{}\n--- snippet ---\n{code}",
                output.status.code(),
                stdout.trim(),
                String::from_utf8_lossy(&output.stderr)
            ));
        }
        expected.push(hit_id);
    }
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));

    // The rows: one per run, the example payload byte for byte; counted once the sink has
    // committed to the end (no record still on its way to the table).
    let rows = eventually(
        Duration::from_secs(60),
        &format!("{} snippet rows", expected.len()),
        || {
            let (servers, table) = (wiring.servers.clone(), table.clone());
            let want = expected.len();
            let wiring = &wiring;
            async move {
                if !wiring.quiescent().await {
                    return None;
                }
                query(&servers, &format!("SELECT hit_id, payload FROM `{table}`"))
                    .await
                    .ok()
                    .filter(|rows| rows.len() >= want)
            }
        },
    )
    .await;
    assert_eq!(rows.len(), expected.len(), "one row per snippet run");
    for hit_id in &expected {
        let row = rows
            .iter()
            .find(|r| r[0].as_deref() == Some(hit_id.as_str()))
            .unwrap_or_else(|| panic!("no row for {hit_id}"));
        assert_eq!(row[1].as_deref(), Some(EXAMPLE_BODY));
    }

    // C#: the same URL, body, key, headers and signature recipe as the others.
    let csharp = get_text(
        &client,
        format!(
            "{}/streams/{csharp_stream}/snippet?lang=csharp",
            gateway.admin
        ),
    )
    .await;
    for needle in [
        format!("{}/ds/{csharp_stream}", gateway.url),
        EXAMPLE_BODY.into(),
        EXAMPLE_KEY.into(),
        "Idempotency-Key".into(),
        "application/x-www-form-urlencoded".into(),
        "X-Signature".into(),
        "X-Timestamp".into(),
        "\"sha256=\"".into(),
        "HMACSHA256".into(),
        "ts + \".\" + Body".into(),
        "WEBHOOK_SECRET".into(),
        "TooManyRequests".into(),
        "ServiceUnavailable".into(),
        "RetryAfter".into(),
    ] {
        assert!(
            csharp.contains(&needle),
            "the C# snippet lacks {needle}:\n{csharp}"
        );
    }

    // The command line gives the same snippet as the admin port.
    let (_, _, id) = streams[0];
    let cli = Command::new(repo_root().join("target/debug/ingest-gateway"))
        .args(["streams", "snippet", &id.to_string(), "--lang", "go"])
        .args(["--base-url", &gateway.url, "--catalogue"])
        .arg(&catalogue)
        .output()
        .unwrap();
    assert!(cli.status.success());
    let served = get_text(
        &client,
        format!("{}/streams/{id}/snippet?lang=go", gateway.admin),
    )
    .await;
    assert_eq!(String::from_utf8_lossy(&cli.stdout), served);
}

/// What the stand-in server saw of one request.
#[derive(Debug, Clone)]
struct Seen {
    path: String,
    key: Option<String>,
    at: std::time::Instant,
}

/// A stand-in for a gateway under pressure (not a mock of Kafka or BigQuery: it tests the
/// senders' code): the first request to each path gets 503 with `Retry-After: 1`, the next
/// one 202.
async fn busy_server() -> (String, std::sync::Arc<std::sync::Mutex<Vec<Seen>>>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::<Seen>::new()));
    let log = seen.clone();
    tokio::spawn(async move {
        loop {
            let Ok((mut socket, _)) = listener.accept().await else {
                return;
            };
            let log = log.clone();
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 4096];
                let head_end = loop {
                    if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                        break i + 4;
                    }
                    match socket.read(&mut chunk).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => buf.extend_from_slice(&chunk[..n]),
                    }
                };
                let head = String::from_utf8_lossy(&buf[..head_end]).to_string();
                let header = |name: &str| {
                    head.lines().find_map(|l| {
                        let (k, v) = l.split_once(':')?;
                        k.trim()
                            .eq_ignore_ascii_case(name)
                            .then(|| v.trim().to_owned())
                    })
                };
                let length: usize = header("content-length")
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(0);
                while buf.len() < head_end + length {
                    match socket.read(&mut chunk).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => buf.extend_from_slice(&chunk[..n]),
                    }
                }
                let path = head.split_whitespace().nth(1).unwrap_or("").to_owned();
                let first = {
                    let mut log = log.lock().unwrap();
                    let first = !log.iter().any(|s| s.path == path);
                    log.push(Seen {
                        path,
                        key: header("idempotency-key"),
                        at: std::time::Instant::now(),
                    });
                    first
                };
                let answer = if first {
                    "HTTP/1.1 503 Service Unavailable\r\nRetry-After: 1\r\nContent-Type: application/json\r\nContent-Length: 34\r\nConnection: close\r\n\r\n{\"error\": \"busy, retry later ...\"}".to_owned()
                } else {
                    let body = "{\"hit_id\":\"00000000-0000-4000-8000-000000000001\"}";
                    format!(
                        "HTTP/1.1 202 Accepted\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                        body.len()
                    )
                };
                let _ = socket.write_all(answer.as_bytes()).await;
                let _ = socket.shutdown().await;
            });
        }
    });
    (url, seen)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_snippet_retries_a_503_after_retry_after_with_the_same_key() {
    let languages = runnable();
    let mut text = String::from("streams:\n");
    let mut streams = Vec::new();
    for (lang, _) in &languages {
        let id = uuid::Uuid::new_v4();
        text.push_str(&format!(
            "  - id: {id}\n    table: local-project.unused.t\n    timezone: UTC\n"
        ));
        streams.push((*lang, id));
    }
    let dir = std::env::temp_dir().join(unique("hookpipe-snippets-retry"));
    std::fs::create_dir_all(&dir).unwrap();
    let catalogue = dir.join("streams.yaml");
    std::fs::write(&catalogue, &text).unwrap();
    let (busy_url, seen) = busy_server().await;

    let mut failures = Vec::new();
    for (lang, id) in &streams {
        // The snippet as `streams snippet` prints it, aimed at the busy server.
        let code = Command::new(repo_root().join("target/debug/ingest-gateway"))
            .args(["streams", "snippet", &id.to_string(), "--lang", lang])
            .args(["--base-url", &busy_url, "--catalogue"])
            .arg(&catalogue)
            .output()
            .unwrap();
        assert!(code.status.success(), "{lang}: streams snippet failed");
        let file = match *lang {
            "go" => "main.go",
            "java" => "SendWebhook.java",
            "node" => "send_webhook.mjs",
            _ => "snippet",
        };
        let command = &languages.iter().find(|(l, _)| l == lang).unwrap().1;
        let output = run_snippet(
            command,
            dir.join(lang),
            file.to_owned(),
            code.stdout,
            SECRET,
        )
        .await;
        let path = format!("/ds/{id}");
        let requests: Vec<Seen> = seen
            .lock()
            .unwrap()
            .iter()
            .filter(|s| s.path == path)
            .cloned()
            .collect();
        let ok = output.status.success()
            && requests.len() == 2
            && requests
                .iter()
                .all(|r| r.key.as_deref() == Some(EXAMPLE_KEY))
            && requests[1].at.duration_since(requests[0].at) >= Duration::from_millis(900);
        if !ok {
            failures.push(format!(
                "{lang}: exit {:?}, requests {requests:?}\n{}",
                output.status.code(),
                String::from_utf8_lossy(&output.stderr)
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}
