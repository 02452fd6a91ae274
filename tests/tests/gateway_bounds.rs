//! ingest-gateway's bounds on the real broker: one size contract (the largest accepted body
//! lands, one byte more is 413, a topic too small for the limit stops the start, a sender still
//! writing a refused body reads the answer on a connection it can reuse), bounded
//! ambiguity through a broker pause (a keyless sender retrying through it leaves at most one
//! extra row), bounded producer memory while the broker is down under load, and per-stream
//! rate limits.

#![allow(clippy::unwrap_used)]

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use hookpipe_tests::{
    PrivateBroker, Servers, Wiring, counts, create_topic_sized, eventually, metric, query, unique,
    write_catalogue,
};

const MIB: usize = 1024 * 1024;
const FORM: &str = "application/x-www-form-urlencoded";

fn stream_and_table(prefix: &str) -> (String, String) {
    (
        uuid::Uuid::new_v4().to_string(),
        format!("local-project.{}.orders", unique(prefix)),
    )
}

#[tokio::test]
async fn the_largest_accepted_body_lands_and_anything_larger_is_413_never_503() {
    let (stream, table) = stream_and_table("size");
    let wiring = Wiring::new(write_catalogue(&[(&stream, &table, "UTC")]), 1).await;
    let gateway = wiring.gateway(&[]).await;
    let _sink = wiring.sink(&[]).await;
    let url = format!("{}/ds/{stream}", gateway.url);
    let client = reqwest::Client::new();

    // Exactly the documented limit (1 MiB): librdkafka's default message.max.bytes (1,000,000)
    // used to refuse it as a broker failure, forever.
    let body = format!("big={}", "x".repeat(MIB - 4));
    assert_eq!(body.len(), MIB);
    let response = client
        .post(&url)
        .header("content-type", FORM)
        .body(body.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 202);
    let json: serde_json::Value = response.json().await.unwrap();
    let hit_id = json["hit_id"].as_str().unwrap().to_owned();

    // One byte more: 413 with a JSON reason, and no Retry-After (retrying cannot help).
    let response = client
        .post(&url)
        .header("content-type", FORM)
        .body(format!("{body}y"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 413);
    assert!(response.headers().get("retry-after").is_none());
    let json: serde_json::Value = response.json().await.unwrap();
    assert_eq!(json["error"], "payload too large");

    // (A body under the limit whose envelope would not fit the record size cannot be made
    // through HTTP: the request head is capped at 64 KiB, the envelope's allowance. The
    // publisher's own check is unit-tested in ingest-gateway's publisher module.)

    // The largest body is one row, byte for byte.
    wiring
        .assert_exactly_once(
            &table,
            &std::collections::HashSet::from([hit_id.clone()]),
            Duration::from_secs(90),
        )
        .await;
    let rows = query(
        &wiring.servers,
        &format!(
            "SELECT LENGTH(payload), payload = '{body}' FROM `{table}` WHERE hit_id = '{hit_id}'"
        ),
    )
    .await
    .unwrap();
    assert_eq!(rows[0][0].as_deref(), Some("1048576"));
    assert_eq!(rows[0][1].as_deref(), Some("true"));
    // Size errors never made the gateway replace its producer.
    assert!(
        !gateway
            .proc
            .log_text()
            .contains("replaced the Kafka producer"),
        "a size error replaced the producer"
    );
}

#[tokio::test]
async fn a_topic_too_small_for_the_body_limit_stops_the_start_naming_the_settings() {
    let mut wiring =
        Wiring::new(hookpipe_tests::repo_root().join("examples/streams.yaml"), 1).await;
    // Kafka's default max.message.bytes: too small for a 1 MiB body in its envelope.
    wiring.topic = unique("small-topic");
    create_topic_sized(&wiring.servers, &wiring.topic, 1, 1_048_588).await;
    let mut gateway = wiring.spawn_gateway(&[]);
    let status = gateway
        .proc
        .wait_exit(Duration::from_secs(30))
        .await
        .expect("the gateway must refuse to start");
    assert!(!status.success());
    let log = gateway.proc.log_text();
    assert!(
        log.contains("max.message.bytes") && log.contains("HOOKPIPE_MAX_BODY_BYTES"),
        "the message must name both settings: {log}"
    );
    // The limit the message advises fits: the gateway starts with it.
    let advised = log
        .split("lower HOOKPIPE_MAX_BODY_BYTES to at most ")
        .nth(1)
        .and_then(|rest| rest.split(|c: char| !c.is_ascii_digit()).next())
        .expect("advice with a number")
        .to_owned();
    let _gateway = wiring
        .gateway(&[("HOOKPIPE_MAX_BODY_BYTES", advised.as_str())])
        .await;
}

#[tokio::test]
async fn a_keyless_sender_retrying_through_a_broker_pause_leaves_at_most_one_extra_row() {
    const WEBHOOKS: usize = 6;
    const REFUSALS_EACH: u64 = 4;
    let broker = PrivateBroker::start().await;
    let servers = Servers {
        brokers: broker.brokers(),
        ..Servers::from_env()
    };
    let (stream, table) = stream_and_table("keyless");
    let wiring = Wiring::on(servers, write_catalogue(&[(&stream, &table, "UTC")]), 2).await;
    let gateway = wiring.gateway(&[("HOOKPIPE_PUBLISH_TIMEOUT", "1s")]).await;
    let _sink = wiring.sink(&[]).await;
    let url = Arc::new(format!("{}/ds/{stream}", gateway.url));
    let client = reqwest::Client::new();

    broker.pause();
    // Each sender retries its webhook (no Idempotency-Key) after every 503, as the docs advise,
    // until it gets a 202.
    let refusals: Arc<Vec<AtomicU64>> =
        Arc::new((0..WEBHOOKS).map(|_| AtomicU64::new(0)).collect());
    let quick_refusals = Arc::new(AtomicU64::new(0));
    let done = Arc::new(AtomicBool::new(false));
    let mut senders = tokio::task::JoinSet::new();
    for i in 0..WEBHOOKS {
        let (client, url, refusals, quick, done) = (
            client.clone(),
            url.clone(),
            refusals.clone(),
            quick_refusals.clone(),
            done.clone(),
        );
        senders.spawn(async move {
            let body = format!("keyless={i}");
            loop {
                let started = Instant::now();
                let sent = client
                    .post(url.as_str())
                    .header("content-type", FORM)
                    .body(body.clone())
                    .send()
                    .await;
                match sent.map(|r| r.status().as_u16()) {
                    Ok(202) => return (i, body),
                    Ok(503) => {
                        refusals[i].fetch_add(1, Ordering::Relaxed);
                        if started.elapsed() < Duration::from_millis(250) {
                            quick.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                    other => assert!(!done.load(Ordering::Relaxed), "unexpected {other:?}"),
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        });
    }
    // Keep the broker frozen until every webhook was refused several times (each refusal
    // could have been one more row before the stall rule).
    eventually(
        Duration::from_secs(60),
        "every keyless webhook to be refused several times",
        || {
            let refusals = refusals.clone();
            async move {
                refusals
                    .iter()
                    .all(|r| r.load(Ordering::Relaxed) >= REFUSALS_EACH)
                    .then_some(())
            }
        },
    )
    .await;
    // Past the first attempt, refusals came at once, without waiting for the broker.
    assert!(
        quick_refusals.load(Ordering::Relaxed) >= WEBHOOKS as u64 * (REFUSALS_EACH - 2),
        "503s while stalled should not wait for the publish timeout"
    );
    broker.unpause();
    let mut bodies = Vec::new();
    while let Some(sent) = senders.join_next().await {
        bodies.push(sent.unwrap());
    }
    done.store(true, Ordering::Relaxed);

    eventually(
        Duration::from_secs(120),
        "the sink to commit every record",
        || async { wiring.quiescent().await.then_some(()) },
    )
    .await;
    let rows = query(
        &wiring.servers,
        &format!("SELECT payload, COUNT(*) FROM `{table}` GROUP BY payload"),
    )
    .await
    .unwrap();
    let per_body: HashMap<String, u64> = rows
        .into_iter()
        .map(|r| {
            (
                r[0].clone().unwrap(),
                r[1].as_deref().unwrap().parse().unwrap(),
            )
        })
        .collect();
    let total_attempts: u64 = refusals.iter().map(|r| r.load(Ordering::Relaxed) + 1).sum();
    for (i, body) in &bodies {
        let rows = per_body.get(body).copied().unwrap_or(0);
        let attempts = refusals[*i].load(Ordering::Relaxed) + 1;
        assert!(
            (1..=2).contains(&rows),
            "keyless webhook {i}: {rows} rows after {attempts} attempts (at most one extra row)"
        );
    }
    assert_eq!(
        per_body.len(),
        WEBHOOKS,
        "rows of unknown bodies: {per_body:?}"
    );
    let (rows, _) = counts(&wiring.servers, &table).await.unwrap();
    eprintln!("{WEBHOOKS} keyless webhooks, {total_attempts} attempts, {rows} rows");
}

/// Resident memory of a process, in bytes.
fn rss(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap();
    kb * 1024
}

#[tokio::test]
async fn the_producer_memory_stays_bounded_while_the_broker_is_down_under_load() {
    const BODY: usize = 200_000;
    const SENDERS: usize = 32;
    const REQUESTS: u64 = 600;
    const QUEUE: usize = 8 * MIB;
    let broker = PrivateBroker::start().await;
    let servers = Servers {
        brokers: broker.brokers(),
        ..Servers::from_env()
    };
    let (stream, table) = stream_and_table("membound");
    let wiring = Wiring::on(servers, write_catalogue(&[(&stream, &table, "UTC")]), 2).await;
    // A long publish timeout, so the stall rule does not turn senders away first: this test is
    // about the queue's own bound in bytes.
    let queue = QUEUE.to_string();
    let gateway = wiring
        .gateway(&[
            ("HOOKPIPE_PUBLISH_TIMEOUT", "60s"),
            ("HOOKPIPE_DRAIN_TIMEOUT", "60s"),
            ("HOOKPIPE_PRODUCER_QUEUE_BYTES", queue.as_str()),
        ])
        .await;
    let pid = gateway.proc.pid();
    let url = Arc::new(format!("{}/ds/{stream}", gateway.url));
    let client = reqwest::Client::new();
    // Warm up (connections, allocator), then the baseline.
    for _ in 0..20 {
        let r = client
            .post(url.as_str())
            .header("content-type", FORM)
            .body(format!("w={}", "x".repeat(BODY)))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 202);
    }
    let baseline = rss(pid);

    broker.pause();
    let next = Arc::new(AtomicU64::new(0));
    let peak = Arc::new(AtomicU64::new(baseline));
    let mut senders = tokio::task::JoinSet::new();
    for _ in 0..SENDERS {
        let (client, url, next) = (client.clone(), url.clone(), next.clone());
        senders.spawn(async move {
            let mut statuses = HashMap::<u16, u64>::new();
            while next.fetch_add(1, Ordering::Relaxed) < REQUESTS {
                let status = client
                    .post(url.as_str())
                    .header("content-type", FORM)
                    .body(format!("m={}", "y".repeat(BODY)))
                    .timeout(Duration::from_secs(2))
                    .send()
                    .await
                    .map_or(0, |r| r.status().as_u16());
                *statuses.entry(status).or_default() += 1;
            }
            statuses
        });
    }
    let sampler = {
        let peak = peak.clone();
        tokio::spawn(async move {
            loop {
                peak.fetch_max(rss(pid), Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
    };
    let mut statuses = HashMap::<u16, u64>::new();
    while let Some(s) = senders.join_next().await {
        for (k, v) in s.unwrap() {
            *statuses.entry(k).or_default() += v;
        }
    }
    sampler.abort();
    let full = metric(
        &gateway.admin,
        "ingest_gateway_kafka_publish_errors_total",
        &[("kind", "queue_full")],
    )
    .await;
    let grown = peak.load(Ordering::Relaxed).saturating_sub(baseline);
    eprintln!(
        "{REQUESTS} requests of {BODY} bytes with the broker paused: {statuses:?}, {full} refused as queue full, RSS grew {} MiB",
        grown / MIB as u64
    );
    broker.unpause();
    assert_eq!(
        statuses.get(&202),
        None,
        "no 2xx while the broker is paused"
    );
    assert!(
        full > 0.0,
        "the byte bound must have refused some: {statuses:?}"
    );
    // The queue's bytes, the requests in flight (body and envelope each), and slack for the
    // allocator; without the bound the queue alone held REQUESTS x BODY = 114 MiB.
    let bound = (QUEUE + SENDERS * 2 * BODY + 24 * MIB) as u64;
    assert!(
        grown < bound,
        "RSS grew {grown} bytes while the broker was down (bound {bound})"
    );
}

#[tokio::test]
async fn a_rate_limited_stream_answers_429_past_its_burst_and_recovers() {
    let (stream, table) = stream_and_table("limited");
    let (free, free_table) = stream_and_table("unlimited");
    let catalogue = write_catalogue(&[(&stream, &table, "UTC"), (&free, &free_table, "UTC")]);
    let text = std::fs::read_to_string(&catalogue).unwrap().replacen(
        &format!("    table: {table}\n"),
        &format!("    table: {table}\n    rate_limit: {{per_second: 2, burst: 5}}\n"),
        1,
    );
    std::fs::write(&catalogue, text).unwrap();
    let wiring = Wiring::new(catalogue, 1).await;
    let gateway = wiring.gateway(&[]).await;
    let client = reqwest::Client::new();
    let post = |stream: String| {
        let (client, url) = (client.clone(), format!("{}/ds/{stream}", gateway.url));
        async move {
            client
                .post(url)
                .header("content-type", FORM)
                .body("a=1")
                .send()
                .await
                .unwrap()
        }
    };
    let mut statuses = Vec::new();
    let mut first_429 = None;
    for _ in 0..8 {
        let r = post(stream.clone()).await;
        let status = r.status().as_u16();
        if status == 429 && first_429.is_none() {
            let retry_after: u64 = r.headers()["retry-after"]
                .to_str()
                .unwrap()
                .parse()
                .unwrap();
            let json: serde_json::Value = r.json().await.unwrap();
            first_429 = Some((retry_after, json["error"].as_str().unwrap().to_owned()));
        }
        statuses.push(status);
    }
    // The burst is 5; at 2 per second at most one more token can come in while the 8 are sent.
    let accepted = statuses.iter().filter(|s| **s == 202).count();
    assert!(
        (5..=6).contains(&accepted),
        "{statuses:?}: the burst of 5 and nothing like 8"
    );
    assert!(
        statuses.iter().all(|s| *s == 202 || *s == 429),
        "{statuses:?}"
    );
    let (retry_after, reason) = first_429.expect("a 429 past the burst");
    assert!((1..=2).contains(&retry_after), "Retry-After {retry_after}");
    assert_eq!(reason, "rate limit exceeded for this stream, retry later");
    // Another stream is not held back.
    for _ in 0..10 {
        assert_eq!(post(free.clone()).await.status(), 202);
    }
    // Recovers once tokens come back: a sender honouring Retry-After is accepted.
    tokio::time::sleep(Duration::from_secs(retry_after)).await;
    assert_eq!(post(stream.clone()).await.status(), 202);
    assert_eq!(
        metric(
            &gateway.admin,
            "ingest_gateway_http_requests_total",
            &[("stream", &stream), ("status", "429")]
        )
        .await,
        (8 - accepted) as f64
    );
}

/// One response read from a raw connection: status, headers (lower-cased) and body.
struct RawResponse {
    status: u16,
    headers: String,
    body: String,
}

/// Reads one response with a Content-Length body from `stream` (waits at most 30 s); `None`
/// when the connection ends first.
async fn read_response(stream: &mut tokio::net::TcpStream) -> Option<RawResponse> {
    use tokio::io::AsyncReadExt;
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut buf = Vec::new();
    let mut chunk = [0u8; 8192];
    let mut read = async |buf: &mut Vec<u8>| -> Option<()> {
        let left = deadline.checked_duration_since(Instant::now())?;
        match tokio::time::timeout(left, stream.read(&mut chunk)).await {
            Ok(Ok(n)) if n > 0 => {
                buf.extend_from_slice(&chunk[..n]);
                Some(())
            }
            _ => None,
        }
    };
    let head_end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        read(&mut buf).await?;
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).to_lowercase();
    let status = head.split_whitespace().nth(1)?.parse().ok()?;
    let length: usize = head
        .lines()
        .find_map(|line| line.strip_prefix("content-length:"))
        .map_or(0, |v| v.trim().parse().unwrap());
    while buf.len() < head_end + length {
        read(&mut buf).await?;
    }
    assert_eq!(buf.len(), head_end + length, "nothing after the response");
    Some(RawResponse {
        status,
        headers: head,
        body: String::from_utf8_lossy(&buf[head_end..]).into_owned(),
    })
}

#[tokio::test]
async fn a_sender_still_writing_a_refused_body_gets_the_answer_on_a_connection_it_can_reuse() {
    use tokio::io::AsyncWriteExt;
    let (stream, table) = stream_and_table("refused");
    let wiring = Wiring::new(write_catalogue(&[(&stream, &table, "UTC")]), 1).await;
    let gateway = wiring.gateway(&[]).await;
    let _sink = wiring.sink(&[]).await;
    let addr = gateway.url.trim_start_matches("http://").to_owned();
    let mut conn = tokio::net::TcpStream::connect(&addr).await.unwrap();
    let head = |path: &str, framing: &str| {
        format!("POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: {FORM}\r\n{framing}\r\n\r\n")
    };
    let path = format!("/ds/{stream}");

    // One byte over the limit, sent whole before reading: the gateway used to answer 413 after
    // the head and close, and a sender still writing got "broken pipe" instead of the 413.
    let body = format!("big={}", "x".repeat(MIB - 3));
    let mut request = head(&path, &format!("Content-Length: {}", body.len())).into_bytes();
    request.extend_from_slice(body.as_bytes());
    conn.write_all(&request)
        .await
        .expect("the whole body is read");
    let response = read_response(&mut conn).await.expect("an answer");
    assert_eq!(response.status, 413, "{}", response.headers);
    assert_eq!(response.body, r#"{"error":"payload too large"}"#);
    assert!(!response.headers.contains("connection: close"));

    // Over the limit without a Content-Length (chunked): refused while reading, then the rest
    // is read too, on the same connection.
    let mut request = head(&path, "Transfer-Encoding: chunked").into_bytes();
    let piece = "y".repeat(64 * 1024);
    for _ in 0..24 {
        request.extend_from_slice(format!("{:x}\r\n{piece}\r\n", piece.len()).as_bytes());
    }
    request.extend_from_slice(b"0\r\n\r\n");
    conn.write_all(&request)
        .await
        .expect("the whole body is read");
    let response = read_response(&mut conn).await.expect("an answer");
    assert_eq!(response.status, 413);

    // Refused before the body is read (an unknown stream): the same.
    let body = "a=1&".repeat(128 * 1024);
    let mut request = head(
        &format!("/ds/{}", uuid::Uuid::new_v4()),
        &format!("Content-Length: {}", body.len()),
    )
    .into_bytes();
    request.extend_from_slice(body.as_bytes());
    conn.write_all(&request)
        .await
        .expect("the whole body is read");
    let response = read_response(&mut conn).await.expect("an answer");
    assert_eq!(response.status, 404);

    // The connection still serves: a webhook on it lands once.
    let mut request = head(&path, "Content-Length: 7").into_bytes();
    request.extend_from_slice(b"after=1");
    conn.write_all(&request).await.unwrap();
    let response = read_response(&mut conn).await.expect("an answer");
    assert_eq!(response.status, 202, "{}", response.body);
    let json: serde_json::Value = serde_json::from_str(&response.body).unwrap();
    let hit_id = json["hit_id"].as_str().unwrap().to_owned();

    // A declared body far past what the gateway reads to throw away: 413 at once, and the
    // connection is closed rather than 100 MiB read.
    let mut request = head(&path, &format!("Content-Length: {}", 100 * MIB)).into_bytes();
    request.extend_from_slice(&[b'z'; 4096]);
    conn.write_all(&request).await.unwrap();
    let response = read_response(&mut conn).await.expect("an answer");
    assert_eq!(response.status, 413);
    let mut rest = [0u8; 1];
    let closed = tokio::time::timeout(Duration::from_secs(15), async {
        use tokio::io::AsyncReadExt;
        matches!(conn.read(&mut rest).await, Ok(0) | Err(_))
    })
    .await;
    assert_eq!(closed, Ok(true), "the connection is closed");

    wiring
        .assert_exactly_once(
            &table,
            &std::collections::HashSet::from([hit_id]),
            Duration::from_secs(90),
        )
        .await;
}
